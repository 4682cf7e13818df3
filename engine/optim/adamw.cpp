#include "engine/optim/adamw.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/optim/adamw_kernels.hpp"
#include "engine/optim/thread_pool.hpp"

namespace mmoc::engine::optim {

namespace {

using AdamWFn = void (*)(const KernelArgs&, int64_t, int64_t);
using SumsqFn = double (*)(const void*, bool, int64_t, int64_t);

struct Isa {
  const char* name;
  AdamWFn adamw;
  SumsqFn sumsq;
};

Isa pick_isa() {
  Isa baseline{"baseline", &isa_baseline::adamw_kernel, &isa_baseline::sumsq_kernel};
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  Isa avx2{"avx2", &isa_avx2::adamw_kernel, &isa_avx2::sumsq_kernel};
  Isa avx512{"avx512", &isa_avx512::adamw_kernel, &isa_avx512::sumsq_kernel};
  std::string want = "avx512";
  if (const char* env = std::getenv("MMOC_OPTIM_ISA"); env != nullptr && *env != '\0') want = env;
  if (want == "avx512" && has_avx512) return avx512;
  if ((want == "avx512" || want == "avx2") && has_avx2) return avx2;
  return baseline;
#else
  return baseline;
#endif
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

KernelArgs make_args(const AdamWBuffers& b, const AdamWCoeffs& c) {
  if (b.n > 0 && (b.param == nullptr || b.exp_avg == nullptr || b.exp_avg_sq == nullptr || b.grad == nullptr)) {
    throw std::invalid_argument("adamw: param, exp_avg, exp_avg_sq and grad must not be null");
  }
  if (b.out_type != OutType::kNone && b.out == nullptr && b.n > 0) {
    throw std::invalid_argument("adamw: out_type set but out is null");
  }
  KernelArgs a{};
  a.param = b.param;
  a.exp_avg = b.exp_avg;
  a.exp_avg_sq = b.exp_avg_sq;
  a.grad = b.grad;
  a.out = b.out;
  a.grad_bf16 = b.grad_type == GradType::kBFloat16;
  a.out_kind = b.out_type == OutType::kNone ? 0 : (b.out_type == OutType::kFloat32 ? 1 : 2);
  a.decay = c.decay;
  if (c.moment_form == MomentForm::kLerp) {
    // torch's lerp_vec: coeff = |w| < 0.5 ? w : w - 1, computed in fp32.
    const bool small = std::abs(c.lerp_w) < 0.5f;
    a.moment = small ? 0 : 1;
    a.lerp_coeff = small ? c.lerp_w : c.lerp_w - 1.0f;
  } else {
    a.moment = 2;
    a.lerp_coeff = c.beta1;
  }
  a.one_minus_b1 = c.one_minus_b1;
  a.beta2 = c.beta2;
  a.one_minus_b2 = c.one_minus_b2;
  a.bc2_sqrt = c.bc2_sqrt;
  a.eps = c.eps;
  a.neg_step_size = c.neg_step_size;
  a.grad_scale = c.grad_scale;
  return a;
}

constexpr int64_t kAdamWChunk = 4096;  // elements; keeps every thread's range 16 KiB aligned

}  // namespace

const char* adamw_isa() { return isa().name; }

AdamWCoeffs adamw_coeffs(const AdamWHyper& h, int64_t step, float grad_scale) {
  if (step < 1) throw std::invalid_argument("adamw: step must be >= 1 (1 for the first update)");
  const double s = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(h.beta1, s);
  const double bc2 = 1.0 - std::pow(h.beta2, s);
  const double step_size = h.lr / bc1;
  AdamWCoeffs c{};
  c.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  c.lerp_w = static_cast<float>(1.0 - h.beta1);
  c.beta1 = static_cast<float>(h.beta1);
  c.one_minus_b1 = static_cast<float>(1.0 - h.beta1);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_b2 = static_cast<float>(1.0 - h.beta2);
  c.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  c.eps = static_cast<float>(h.eps);
  c.neg_step_size = static_cast<float>(-step_size);
  c.grad_scale = grad_scale;
  c.moment_form = h.moment_form;
  return c;
}

void adamw_update_range(const AdamWBuffers& b, const AdamWCoeffs& c, int64_t begin, int64_t end) {
  begin = std::max<int64_t>(begin, 0);
  end = std::min(end, b.n);
  if (begin >= end) return;
  const KernelArgs a = make_args(b, c);
  isa().adamw(a, begin, end);
}

void adamw_step(const AdamWBuffers& b, const AdamWHyper& h, int64_t step, float grad_scale, ThreadPool* pool) {
  const AdamWCoeffs c = adamw_coeffs(h, step, grad_scale);
  if (b.n <= 0) return;
  const KernelArgs a = make_args(b, c);
  const AdamWFn fn = isa().adamw;
  if (pool == nullptr || pool->num_threads() == 1) {
    fn(a, 0, b.n);
    return;
  }
  pool->parallel_for(b.n, kAdamWChunk, [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
}

double sum_of_squares(const void* grad, GradType type, int64_t n, ThreadPool* pool) {
  if (n <= 0) return 0.0;
  if (grad == nullptr) throw std::invalid_argument("sum_of_squares: grad is null");
  const bool bf16 = type == GradType::kBFloat16;
  const SumsqFn fn = isa().sumsq;
  const int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
  auto body = [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; s += kReduceBlock) {
      partial[static_cast<size_t>(s / kReduceBlock)] = fn(grad, bf16, s, std::min(hi, s + kReduceBlock));
    }
  };
  if (pool == nullptr) {
    body(0, n);
  } else {
    pool->parallel_for(n, kReduceBlock, body);
  }
  double total = 0.0;
  for (double x : partial) total += x;
  return total;
}

float clip_scale(double total_norm, double max_norm) {
  // torch: clip_coef = max_norm / (total_norm + 1e-6) on an fp32 tensor, i.e.
  // (total_norm + 1e-6).reciprocal() * max_norm, then clamp(max=1.0).
  const float denom = static_cast<float>(total_norm) + static_cast<float>(1e-6);
  const float coef = (1.0f / denom) * static_cast<float>(max_norm);
  return coef > 1.0f ? 1.0f : coef;
}

}  // namespace mmoc::engine::optim
