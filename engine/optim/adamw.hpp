// Fused CPU AdamW over flat fp32 master weights (torch-free).
//
// One pass over param (fp32), exp_avg (fp32), exp_avg_sq (fp32) and the incoming gradient (bf16 or fp32,
// converted inside the loop and multiplied by grad_scale), optionally writing the updated weights as
// bf16 or fp32 into an output buffer. ≈28 bytes of memory traffic per parameter with bf16 in and out.
//
// The arithmetic is torch's own, operation by operation, in fp32 with the scalars rounded to fp32 as
// torch's CPU kernels do, with one deliberate exception: sqrt is the correctly rounded IEEE sqrt, while
// torch's CPU Tensor.sqrt() (measured; presumably MKL VML) is off by one ulp for some inputs (≈17% on an AMD
// EPYC, far fewer on the H100 host's Xeon). So exp_avg / exp_avg_sq are bit-identical to torch 2.11
// and params are bit-identical to torch's op sequence with an exact sqrt (tests/optim checks both),
// within ~1 ulp(p) per step of torch itself. Same result for every ISA and thread count:
//   g    = float(grad) * grad_scale
//   p    = p * float(1 - lr*wd)                                   (param.mul_(1 - lr*wd))
//   kLerp  (torch.optim.AdamW, Python):  m = m.lerp(g, 1-b1)      (fma form of torch's lerp kernel)
//   kMulAdd (torch::optim::AdamW, C++):  m = m*b1; m = m + (1-b1)*g
//   v    = v*b2; v = v + ((1-b2)*g)*g                             (mul_ then addcmul_)
//   bc1  = 1 - b1^step, bc2 = 1 - b2^step                         (double)
//   denom = sqrt(v) / float(sqrt(bc2)) + float(eps)
//   p    = p + (float(-lr/bc1) * m) / denom                       (addcdiv_)
#pragma once

#include <cstdint>

namespace mmoc::engine::optim {

class ThreadPool;

enum class GradType : uint8_t { kFloat32, kBFloat16 };
enum class OutType : uint8_t { kNone, kFloat32, kBFloat16 };

// Which torch implementation the first-moment update reproduces bit for bit. They differ by an ulp
// from the second step on.
enum class MomentForm : uint8_t {
  kLerp,    // torch.optim.AdamW (Python, single-tensor/foreach path): exp_avg.lerp_(grad, 1 - beta1)
  kMulAdd,  // torch::optim::AdamW (LibTorch C++): exp_avg.mul_(beta1).add_(grad, 1 - beta1)
};

struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  MomentForm moment_form = MomentForm::kLerp;
};

// One flat parameter range. All pointers address n elements; param/exp_avg/exp_avg_sq are updated in
// place. out may be null (out_type kNone); it may alias nothing else.
struct AdamWBuffers {
  float* param = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  const void* grad = nullptr;  // uint16_t bf16 bits or float, per grad_type
  GradType grad_type = GradType::kBFloat16;
  void* out = nullptr;  // uint16_t bf16 bits or float, per out_type
  OutType out_type = OutType::kNone;
  int64_t n = 0;
};

// The per-step scalars, already rounded to fp32 as torch rounds them.
struct AdamWCoeffs {
  float decay;        // 1 - lr*wd
  float lerp_w;       // 1 - beta1 (kLerp)
  float beta1;        // kMulAdd
  float one_minus_b1; // kMulAdd
  float beta2;
  float one_minus_b2;
  float bc2_sqrt;     // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  float grad_scale;
  MomentForm moment_form;
};

// step: the AdamW step count after its increment, i.e. 1 for the first update (torch's state["step"]).
// Throws std::invalid_argument for step < 1.
AdamWCoeffs adamw_coeffs(const AdamWHyper& h, int64_t step, float grad_scale);

// Update elements [begin, end) on the calling thread.
void adamw_update_range(const AdamWBuffers& b, const AdamWCoeffs& c, int64_t begin, int64_t end);

// Update all n elements, split over the pool (nullptr: calling thread only). Results do not depend on
// the thread count. grad_scale multiplies the gradient (loss normalisation, clipping: clip_scale()).
void adamw_step(const AdamWBuffers& b, const AdamWHyper& h, int64_t step, float grad_scale,
                ThreadPool* pool);

// Sum of squares of a gradient (each element converted to fp32, squared and summed in double), for
// global-norm clipping. The order of additions is fixed (blocks of kReduceBlock elements, 16 lanes per
// block, blocks combined in order), so the result does not depend on the pool's thread count or the ISA.
inline constexpr int64_t kReduceBlock = 1 << 16;
double sum_of_squares(const void* grad, GradType type, int64_t n, ThreadPool* pool);

// torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (total_norm + 1e-6)).
// total_norm = sqrt(sum of sum_of_squares over all ranges). torch computes it in fp32:
// clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.0. This returns it rounded to fp32.
float clip_scale(double total_norm, double max_norm);

// The instruction set the kernels dispatch to: "avx512", "avx2" or "baseline". Chosen once from
// __builtin_cpu_supports; MMOC_OPTIM_ISA=avx512|avx2|baseline overrides (capped at what the CPU has).
const char* adamw_isa();

}  // namespace mmoc::engine::optim
