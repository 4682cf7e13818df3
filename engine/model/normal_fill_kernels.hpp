// Per-ISA entry points of the normal-fill kernel (normal_fill_kernels.inc).
#pragma once
#include <cstdint>

namespace mmoc::engine {
#define MMOC_INIT_DECLARE(ns) \
  namespace ns {              \
  void fill_normal_kernel(float* out, int64_t n, uint64_t key, uint64_t first, double mean, double std); \
  }
MMOC_INIT_DECLARE(isa_baseline)
MMOC_INIT_DECLARE(isa_avx2)
MMOC_INIT_DECLARE(isa_avx512)
#undef MMOC_INIT_DECLARE
}  // namespace mmoc::engine
