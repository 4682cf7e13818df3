// Host memory for a worker's training state: exactly sized mappings with transparent huge pages advised, and on CUDA
// page-locked with one cudaHostRegister after several threads have faulted the pages in. (The caching host allocator behind
// at::empty(pinned) rounds every block up to a power of two — up to twice the memory — and pins on one thread.)
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mmoc::engine {

// A 1-D tensor of n zeros, owning its mapping (unregistered and unmapped when the last reference goes). pinned:
// page-locked for asynchronous copies to and from `cuda_device` (its pages are faulted in first by `threads`
// threads). Unpinned memory is faulted in by whoever writes it first (the init or loader threads for weights, the
// optimizer threads for the moments in the first step), so no thread zeroes memory that is written right after.
at::Tensor host_tensor(int64_t n, at::ScalarType dtype, bool pinned, int cuda_device, int threads);

// Bytes held by host_tensor mappings now (all of them, this process).
int64_t host_tensor_bytes();

}  // namespace mmoc::engine
