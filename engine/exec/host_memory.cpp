#include "engine/exec/host_memory.hpp"

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace mmoc::engine {

namespace {
std::atomic<int64_t> g_bytes{0};
constexpr std::size_t kHuge = std::size_t(2) << 20;

// Faults [p, p+n) in with `threads` threads by writing zeros (the pages of an anonymous mapping are zero anyway).
// Not madvise(MADV_POPULATE_WRITE): on a huge-page mapping that was measured 20-40x slower than touching the memory
// (2 GiB: 27-35 s against 0.9 s, 2 threads, Linux 6.18, THP "madvise").
void populate(std::byte* p, std::size_t n, int threads) {
  const std::size_t slice = std::max<std::size_t>(kHuge, (n / std::max(1, threads) + kHuge - 1) / kHuge * kHuge);
  std::vector<std::thread> ts;
  for (std::size_t off = 0; off < n; off += slice) ts.emplace_back([p, n, off, slice] { std::memset(p + off, 0, std::min(slice, n - off)); });
  for (auto& t : ts) t.join();
}
}  // namespace

at::Tensor host_tensor(int64_t n, at::ScalarType dtype, bool pinned, int cuda_device, int threads) {
  const std::size_t bytes = (std::size_t)n * c10::elementSize(dtype);
  if (bytes == 0) return at::zeros({n}, at::TensorOptions().dtype(dtype));
  const std::size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
  void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED)
    throw std::runtime_error("cannot map " + std::to_string(len >> 20) + " MiB of host memory: " + std::strerror(errno));
  auto* p = static_cast<std::byte*>(m);
  (void)::madvise(p, len, MADV_HUGEPAGE);  // best effort: fewer faults, fewer TLB misses in the optimizer
  if (pinned) {
    populate(p, len, threads);  // cudaHostRegister would fault them in on one thread
    if (cudaSetDevice(cuda_device) != cudaSuccess || cudaHostRegister(p, len, cudaHostRegisterDefault) != cudaSuccess) {
      const std::string e = cudaGetErrorString(cudaGetLastError());
      ::munmap(p, len);
      throw std::runtime_error("cannot page-lock " + std::to_string(len >> 20) + " MiB of host memory: " + e);
    }
  }
  g_bytes += (int64_t)len;
  auto del = [len, pinned](void* q) {
    if (pinned) cudaHostUnregister(q);
    ::munmap(q, len);
    g_bytes -= (int64_t)len;
  };
  return at::from_blob(p, {n}, del, at::TensorOptions().dtype(dtype));
}

int64_t host_tensor_bytes() { return g_bytes.load(); }

}  // namespace mmoc::engine
