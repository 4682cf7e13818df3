// Internal: the per-ISA kernel entry points behind adamw.cpp's dispatcher.
#pragma once

#include <cstdint>

namespace mmoc::engine::optim {

struct KernelArgs {
  float* param;
  float* exp_avg;
  float* exp_avg_sq;
  const void* grad;
  void* out;
  bool grad_bf16;
  int out_kind;   // 0 none, 1 fp32, 2 bf16
  int moment;     // 0 lerp small weight, 1 lerp large weight, 2 mul/add
  float decay, lerp_coeff, one_minus_b1, beta2, one_minus_b2, bc2_sqrt, eps, neg_step_size, grad_scale;
};

#define MMOC_OPTIM_DECLARE_ISA(ns)                                                    \
  namespace ns {                                                                      \
  void adamw_kernel(const KernelArgs& a, int64_t begin, int64_t end);                 \
  double sumsq_kernel(const void* src, bool bf16, int64_t begin, int64_t end);        \
  }
MMOC_OPTIM_DECLARE_ISA(isa_baseline)
#if defined(__x86_64__)
MMOC_OPTIM_DECLARE_ISA(isa_avx2)
MMOC_OPTIM_DECLARE_ISA(isa_avx512)
#endif
#undef MMOC_OPTIM_DECLARE_ISA

}  // namespace mmoc::engine::optim
