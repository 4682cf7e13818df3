// AdamW over fp32 tensors on the device that holds them (GPU-resident stages; on the CPU device, the same code runs
// on host tensors), in chunks so that its temporaries stay small (at most 2 x 128 MiB, within the plan's reserve).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "engine/optim/adamw.hpp"

namespace mmoc::engine {

enum class DeviceAdamWKernel {
  kAuto,     // kFused on CUDA, kFormula elsewhere
  kFused,    // at::_fused_adamw_ per chunk: one kernel per chunk (plus the gradient's conversion to fp32)
  kFormula,  // torch.optim.AdamW's single-tensor op sequence (mul_, lerp_, mul_/addcmul_, sqrt, div_/add_, addcdiv_)
};

// master, exp_avg, exp_avg_sq: fp32, contiguous, 1-D, n elements, one device; updated in place.
// grad: n elements of any float dtype on that device, multiplied by grad_scale (clipping) in fp32 (an fp32 grad is
// scaled in place: the caller drops it after the update).
// weights: when defined, n elements (the compute-dtype copy the model reads) that receive the updated master.
// step: the AdamW step after its increment (1 for the first update). grad_sumsq: when given, a 0-dim fp64 tensor on
// the device to which the sum of squares of grad (unscaled) is added.
// The two kernels agree to rounding: exp_avg and exp_avg_sq bit for bit on the CPU, the weights within an ulp
// (measured on the CPU for 3 x 2^20 elements: 1% of the weights differ in the last bit). kFormula is what the CPU
// equivalence tests compare against torch::optim::AdamW.
void adamw_step_tensors(const at::Tensor& master, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                        const at::Tensor& grad, const at::Tensor& weights, const optim::AdamWHyper& h, int64_t step,
                        float grad_scale, DeviceAdamWKernel kernel = DeviceAdamWKernel::kAuto,
                        const at::Tensor* grad_sumsq = nullptr);

// Sum of squares of g (any float dtype, any device) as a 0-dim fp64 tensor on g's device: on a GPU, the sum over
// chunks of 16M elements of each chunk's squared 2-norm (fp32 accumulation, no temporary); on the CPU, in fp64 in one
// reduction.
at::Tensor sum_of_squares_tensor(const at::Tensor& g);

}  // namespace mmoc::engine
