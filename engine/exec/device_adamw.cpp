#include "engine/exec/device_adamw.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace mmoc::engine {

namespace {
constexpr int64_t kChunk = int64_t(1) << 25;     // AdamW: 32M elements, 128 MiB per fp32 temporary
constexpr int64_t kSumsqChunk = int64_t(1) << 24;  // sum of squares: one reduction per 16M elements

void check(const at::Tensor& t, int64_t n, const char* what, bool fp32) {
  if (!t.defined() || t.dim() != 1 || t.numel() != n || !t.is_contiguous() || (fp32 && t.scalar_type() != at::kFloat))
    throw std::invalid_argument(std::string("adamw_step_tensors: ") + what + " must be a contiguous 1-D " + (fp32 ? "fp32 " : "") +
                                "tensor of " + std::to_string(n) + " elements");
}
}  // namespace

at::Tensor sum_of_squares_tensor(const at::Tensor& g) {
  if (!g.is_cuda()) return g.to(at::kDouble).pow(2).sum();
  // on a GPU: one fp32-accumulating reduction per chunk (the 2-norm, squared in fp64), reading the gradient once; an
  // fp64 copy of each chunk for a dot product read and wrote 5x the gradient's bytes, which made the resident stages'
  // update 3.4x its predicted time at 130 GiB (bench/results/2026-12-01-h200-s3). fp32 partial sums over a chunk of
  // 16M elements are accurate to ~1e-6 relative, far inside what clipping and the non-finite check need.
  at::Tensor acc = at::zeros({}, g.options().dtype(at::kDouble));
  const at::Tensor flat = g.reshape({-1});
  for (int64_t off = 0; off < flat.numel(); off += kSumsqChunk) {
    const at::Tensor x = flat.narrow(0, off, std::min(kSumsqChunk, flat.numel() - off));
    acc.add_(at::linalg_vector_norm(x, 2, c10::nullopt, false, at::kFloat).to(at::kDouble).square());
  }
  return acc;
}

void adamw_step_tensors(const at::Tensor& master, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                        const at::Tensor& grad, const at::Tensor& weights, const optim::AdamWHyper& h, int64_t step,
                        float grad_scale, DeviceAdamWKernel kernel, const at::Tensor* grad_sumsq) {
  if (step < 1) throw std::invalid_argument("adamw_step_tensors: step must be >= 1");
  const int64_t n = master.numel();
  check(master, n, "master", true);
  check(exp_avg, n, "exp_avg", true);
  check(exp_avg_sq, n, "exp_avg_sq", true);
  check(grad, n, "grad", false);
  if (weights.defined()) check(weights, n, "weights", false);
  if (kernel == DeviceAdamWKernel::kAuto) kernel = master.is_cuda() ? DeviceAdamWKernel::kFused : DeviceAdamWKernel::kFormula;
  const double bc1 = 1.0 - std::pow(h.beta1, (double)step);
  const double bc2 = 1.0 - std::pow(h.beta2, (double)step);
  at::Tensor steps;  // _fused_adamw_ reads the step from a tensor on the params' device (it does not increment it)
  if (kernel == DeviceAdamWKernel::kFused) steps = at::full({}, (double)step, master.options());
  for (int64_t off = 0; off < n; off += kChunk) {
    const int64_t len = std::min(kChunk, n - off);
    at::Tensor m = master.narrow(0, off, len), ea = exp_avg.narrow(0, off, len), eas = exp_avg_sq.narrow(0, off, len);
    at::Tensor g = grad.narrow(0, off, len).to(at::kFloat);  // a copy only when grad is not fp32
    if (grad_sumsq) grad_sumsq->add_(sum_of_squares_tensor(g));
    if (grad_scale != 1.0f) g.mul_(grad_scale);  // in place in grad itself when it is fp32
    if (kernel == DeviceAdamWKernel::kFused) {
      at::_fused_adamw_({m}, {g}, {ea}, {eas}, {}, {steps}, h.lr, h.beta1, h.beta2, h.weight_decay, h.eps,
                        /*amsgrad=*/false, /*maximize=*/false);
    } else {
      m.mul_(1.0 - h.lr * h.weight_decay);
      ea.lerp_(g, 1.0 - h.beta1);
      eas.mul_(h.beta2).addcmul_(g, g, 1.0 - h.beta2);
      at::Tensor denom = eas.sqrt();
      denom.div_(std::sqrt(bc2)).add_(h.eps);
      m.addcdiv_(ea, denom, -h.lr / bc1);
    }
    if (weights.defined()) weights.narrow(0, off, len).copy_(m);
  }
}

}  // namespace mmoc::engine
