// Host memory for a worker's training state: exactly sized mappings with transparent huge pages advised, faulted in
// by several threads at once, and on CUDA page-locked with one cudaHostRegister. (The caching host allocator behind
// at::empty(pinned) rounds every block up to a power of two — up to twice the memory — and pins on one thread.)
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mmoc::engine {

// A 1-D tensor of n zeros, owning its mapping (unregistered and unmapped when the last reference goes). pinned:
// page-locked for asynchronous copies to and from `cuda_device`. threads: how many threads fault the pages in.
at::Tensor host_tensor(int64_t n, at::ScalarType dtype, bool pinned, int cuda_device, int threads);

// Bytes held by host_tensor mappings now (all of them, this process).
int64_t host_tensor_bytes();

}  // namespace mmoc::engine
