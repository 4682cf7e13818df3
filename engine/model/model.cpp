#include "engine/model/model.hpp"
#include "engine/model/kernels.hpp"
#include "engine/model/tp_detail.hpp"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <stdexcept>
#include <cstring>
#include <optional>
#include <string>

namespace mmoc::engine {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {
// MMOC_LAYER_GRAPH=plain: the decoder layer as plain autograd ops, without the nodes below that trim what it keeps
// (SwiGluDown, NormLinear, the copy of v out of the fused qkv output; then `selective` and `output_unused` have no
// effect), for the tests that compare the two. Read at each stage's forward (tests switch it).
bool plain_layer_graph() {
  const char* e = std::getenv("MMOC_LAYER_GRAPH");
  return e && std::strcmp(e, "plain") == 0;
}

// MMOC_KERNELS=aten: ATen's ops even where mmoc's own CUDA kernels (kernels.hpp: RopeQKV, SwiGluDown) could run (tests
// and A/B measurements compare the two). Read at each use.
bool aten_kernels() {
  const char* e = std::getenv("MMOC_KERNELS");
  return e && std::strcmp(e, "aten") == 0;
}
// The kernels' dtype code for t; none for a dtype they do not run (they run float, half and bfloat16)
std::optional<kernels::DType> kernel_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kernels::DType::F32;
    case at::kHalf: return kernels::DType::F16;
    case at::kBFloat16: return kernels::DType::BF16;
    default: return std::nullopt;
  }
}
kernels::DType kernel_dtype(const at::Tensor& t) {
  if (auto d = kernel_dtype_of(t)) return *d;
  throw std::invalid_argument("mmoc kernels: float, half or bfloat16 expected");
}
// mmoc's kernels take this tensor (CUDA, a dtype they run, kernels built, not switched off)
bool use_kernels(const at::Tensor& t) {
  return t.is_cuda() && kernel_dtype_of(t).has_value() && kernels::available() && !aten_kernels();
}
void check_kernel(const char* what, int rc) {
  if (rc != 0) throw std::runtime_error(std::string(what) + ": CUDA kernel failed: " + kernels::error_string(rc));
}
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }


// A piece of the flat tensor handed to the model as one view: one parameter, or several parameters that sit back to
// back (q/k/v, gate/up) so that they are used as one matrix without a copy.
struct Segment {
  int64_t offset = 0, numel = 0;
  std::vector<int64_t> shape;
};

// SwiGLU and the down projection as one autograd node: out = linear(silu(g) * u, W) for gu = [g | u] (the fused
// gate/up projection's output), its backward assembling the gradient of gu with one cat (on a GPU: written by one
// kernel). The graph of the same ops
// under autograd (two narrows of gu, silu, mul, linear) keeps the same tensors, but each narrow's backward
// zero-fills a gu-sized gradient and the two are then summed: ~10 x ffn elements per token of memory traffic the
// cat does not have (the engine's layer was 3-4% slower in backward than HF's, which projects gate and up
// separately: bench/results/2026-12-02-h200-s7).
// recompute = false keeps gu and the product (3F per token and element size; autograd would keep silu(g) too, 4F) and
// recomputes silu(g) in backward; recompute = true keeps gu only (2F) and recomputes silu(g) * u as well: selective
// recompute inside the layer (issue 14; the plan's Stage::selective, stage_forward_layers' `selective`). W is a view
// of the flat weights (no copy). On a GPU the elementwise work is mmoc's kernels (kernels.hpp: silu(g) * u in one
// pass; backward reads gu and d(act) once and writes d(gu), no cat). Every gradient is what the ops autograd would run
// give (mm in the same arrangement, silu_backward), bit for bit (test_model.cpp).
// output_unused: the caller never reads the output's value, only sends a gradient through it (the last layer of a
// range the engine recomputes inside backward: engine/exec/handlers.cpp): the down projection's GEMM is skipped and
// the output is zeros of its shape; the backward is unchanged (it does not read the output).
struct SwiGluDown : torch::autograd::Function<SwiGluDown> {
  // silu(gate) * up: mmoc's kernel (one pass over gu; kernels.hpp) or ATen's two strided passes
  static at::Tensor swiglu(const at::Tensor& gu, int64_t F) {
    if (!use_kernels(gu)) return at::silu(gu.narrow(-1, 0, F)) * gu.narrow(-1, F, F);
    const at::Tensor x = gu.contiguous();
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = F;
    at::Tensor act = at::empty(shape, x.options());
    const c10::cuda::CUDAGuard guard(x.device());
    check_kernel("SwiGluDown", kernels::swiglu_forward(kernel_dtype(x), x.numel() / (2 * F), F, x.data_ptr(), act.data_ptr(),
                                                       stream_of(x)));
    return act;
  }
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gu, const at::Tensor& w, bool recompute,
                            bool output_unused) {
    const int64_t F = gu.size(-1) / 2;
    const at::Tensor act = swiglu(gu, F);
    // kept: act for the down projection's weight gradient; silu(gate) is recomputed in backward (an elementwise
    // pass, in the backward kernel itself on a GPU)
    if (recompute) ctx->save_for_backward({gu, w});
    else ctx->save_for_backward({gu, w, act});
    if (output_unused) {
      std::vector<int64_t> shape = gu.sizes().vec();
      shape.back() = w.size(0);
      return at::zeros(shape, gu.options());
    }
    return at::linear(act, w);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor gu = saved[0], w = saved[1];
    const at::Tensor& dout = grads[0];
    const int64_t F = gu.size(-1) / 2, H = dout.size(-1);
    const at::Tensor g = gu.narrow(-1, 0, F), u = gu.narrow(-1, F, F);
    const at::Tensor act = saved.size() == 3 ? saved[2] : swiglu(gu, F);
    const at::Tensor d2 = dout.reshape({-1, H});
    // linear's backward as matmul's mm: d(act) = dout . W, dW = dout^T . act
    const at::Tensor dact = d2.mm(w).view(g.sizes());
    const at::Tensor dw = d2.t().mm(act.reshape({-1, F}));
    // the product's and silu's backward: one kernel writing d(gu), or ATen's passes and a cat
    if (use_kernels(gu)) {
      const at::Tensor x = gu.contiguous();
      at::Tensor dgu = at::empty_like(x);
      const c10::cuda::CUDAGuard guard(x.device());
      check_kernel("SwiGluDown", kernels::swiglu_backward(kernel_dtype(x), x.numel() / (2 * F), F, x.data_ptr(),
                                                          dact.data_ptr(), dgu.data_ptr(), stream_of(x)));
      return {dgu, dw, at::Tensor(), at::Tensor()};
    }
    const at::Tensor dg = at::silu_backward(dact * u, g);
    const at::Tensor du = dact * at::silu(g);
    return {at::cat({dg, du}, -1), dw, at::Tensor(), at::Tensor()};
  }
};

// HF LlamaRMSNorm (fused: ATen's rms_norm, as bf16 on a GPU runs) followed by a linear projection, as one autograd
// node that keeps the norm's input, not its output: y = linear(norm(x), W, b). Under plain autograd the norm keeps x
// and the projection keeps norm(x), a second hidden-sized tensor per token; here backward recomputes norm(x) (an
// elementwise pass) and runs the norm's own backward on it through autograd. The projection's gradients are the mm
// calls linear's backward makes (the same arrangement as SwiGluDown's), so every gradient is bit-identical to the
// plain graph's (test_model.cpp). Used by LLaMA-style layers at tp 1 before q/k/v and before gate/up.
// HF LlamaRMSNorm: fp32 variance, normalise in fp32, cast back to the input dtype, then weight * x.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto dt = x.scalar_type();
  auto h = x.to(at::kFloat);
  auto var = h.pow(2).mean({-1}, /*keepdim=*/true);
  h = h * at::rsqrt(var + eps);
  return w * h.to(dt);
}

// The decoder's RMSNorm: ATen's fused kernel (bf16/fp16 on a GPU, or fused_norm_on_cpu) or HF's op sequence.
at::Tensor norm_of(const at::Tensor& x, const at::Tensor& w, bool fused, double eps) {
  return fused ? at::rms_norm(x, {x.size(-1)}, w, eps) : rms_norm(x, w, eps);
}
// (Two nodes, with and without a bias: an undefined tensor cannot be an autograd Function's input.)
at::Tensor norm_linear_forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& nw, const at::Tensor& w,
                               const at::Tensor& b, bool fused, double eps) {
  ctx->save_for_backward({x, nw, w});
  ctx->saved_data["fused"] = fused;
  ctx->saved_data["eps"] = eps;
  return at::linear(norm_of(x, nw, fused, eps), w, b);
}
// d(x), d(norm weight), d(W), d(b) (undefined without a bias)
std::array<at::Tensor, 4> norm_linear_backward(AutogradContext* ctx, const at::Tensor& dy, bool bias) {
  auto saved = ctx->get_saved_variables();
  const at::Tensor& w = saved[2];
  at::Tensor x = saved[0].detach().requires_grad_(ctx->needs_input_grad(0));
  at::Tensor nw = saved[1].detach().requires_grad_(ctx->needs_input_grad(1));
  at::Tensor n;
  {
    torch::autograd::AutoGradMode on(true);
    n = norm_of(x, nw, ctx->saved_data["fused"].toBool(), ctx->saved_data["eps"].toDouble());
  }
  const int64_t O = dy.size(-1), H = n.size(-1);
  const at::Tensor d2 = dy.reshape({-1, O});
  // linear's backward as matmul's mm: d(n) = dy . W, dW = dy^T . n, db = the rows' sum (addmm's sum_to)
  const at::Tensor dn = d2.mm(w).view(n.sizes());
  const at::Tensor dw = d2.t().mm(n.detach().reshape({-1, H}));
  const at::Tensor db = bias ? d2.sum(0) : at::Tensor();
  torch::autograd::variable_list ins;
  if (x.requires_grad()) ins.push_back(x);
  if (nw.requires_grad()) ins.push_back(nw);
  at::Tensor dx, dnw;
  if (!ins.empty()) {
    auto g = torch::autograd::grad({n}, ins, {dn}, /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
    size_t i = 0;
    if (x.requires_grad()) dx = g[i++];
    if (nw.requires_grad()) dnw = g[i++];
  }
  return {dx, dnw, dw, db};
}
struct NormLinear : torch::autograd::Function<NormLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& nw, const at::Tensor& w, bool fused,
                            double eps) {
    return norm_linear_forward(ctx, x, nw, w, {}, fused, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto g = norm_linear_backward(ctx, grads[0], false);
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor()};
  }
};
struct NormLinearBias : torch::autograd::Function<NormLinearBias> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& nw, const at::Tensor& w,
                            const at::Tensor& b, bool fused, double eps) {
    return norm_linear_forward(ctx, x, nw, w, b, fused, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto g = norm_linear_backward(ctx, grads[0], true);
    return {g[0], g[1], g[2], g[3], at::Tensor(), at::Tensor()};
  }
};

// The fused q/k/v projection's output [B, T, nh*hd + 2*nkv*hd] -> q and k rotated (HF's x*cos + rotate_half(x)*sin)
// and v, each [B, T, heads, hd] and contiguous, in one CUDA kernel; backward writes qkv's gradient in one more
// (kernels.hpp). ATen's version is about ten elementwise passes over q and k (muls, a negation and a cat on
// strided views), and in backward three zero-filled qkv-sized gradients summed: ~14% of a LLaMA-2-7B layer's
// forward+backward on an H200 (bench/layer_profile.py). Bit-identical to those ops in fp32, fp16 and bf16 (test_model).
// Keeps only cos and sin; q, k and v are what attention keeps anyway, and qkv is not kept.
struct RopeQKV : torch::autograd::Function<RopeQKV> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               int64_t nh, int64_t nkv, int64_t hd) {
    const at::Tensor x = qkv.contiguous(), c = cos.contiguous(), sn = sin.contiguous();
    if (x.dim() != 3 || x.size(2) != (nh + 2 * nkv) * hd || c.dim() != 2 || c.size(0) != x.size(1) || c.size(1) != hd ||
        sn.sizes() != c.sizes() || c.scalar_type() != x.scalar_type() || sn.scalar_type() != x.scalar_type() ||
        !x.is_cuda() || c.device() != x.device() || sn.device() != x.device())
      throw std::invalid_argument("RopeQKV: qkv [B, T, (nh + 2 nkv) hd] and cos/sin [T, hd] of its dtype and device expected");
    const int64_t B = x.size(0), T = x.size(1);
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor q = at::empty({B, T, nh, hd}, x.options()), k = at::empty({B, T, nkv, hd}, x.options()),
               v = at::empty({B, T, nkv, hd}, x.options());
    const kernels::RopeShape s{B * T, T, (int)nh, (int)nkv, (int)hd};
    check_kernel("RopeQKV", kernels::rope_forward(kernel_dtype(x), s, x.data_ptr(), c.data_ptr(), sn.data_ptr(), q.data_ptr(), k.data_ptr(),
                               v.data_ptr(), stream_of(x)));
    ctx->save_for_backward({c, sn});
    ctx->saved_data["shape"] = std::vector<int64_t>{B, T, nh, nkv, hd};
    return {q, k, v};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> d = ctx->saved_data["shape"].toIntVector();
    const int64_t B = d[0], T = d[1], nh = d[2], nkv = d[3], hd = d[4];
    const at::Tensor& c = saved[0];
    const c10::cuda::CUDAGuard guard(c.device());
    auto grad = [&](size_t i, int64_t heads) {
      return g[i].defined() ? g[i].contiguous() : at::zeros({B, T, heads, hd}, c.options());
    };
    const at::Tensor gq = grad(0, nh), gk = grad(1, nkv), gv = grad(2, nkv);
    at::Tensor gqkv = at::empty({B, T, (nh + 2 * nkv) * hd}, c.options());
    const kernels::RopeShape s{B * T, T, (int)nh, (int)nkv, (int)hd};
    check_kernel("RopeQKV", kernels::rope_backward(kernel_dtype(c), s, gq.data_ptr(), gk.data_ptr(), gv.data_ptr(), c.data_ptr(),
                                saved[1].data_ptr(), gqkv.data_ptr(), stream_of(c)));
    return {gqkv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// flat -> segment views; backward gathers the segments' gradients into one flat gradient.
struct FlatSplit : torch::autograd::Function<FlatSplit> {
  static variable_list forward(AutogradContext* ctx, at::Tensor flat, const std::vector<Segment>* segs,
                               c10::intrusive_ptr<FlatGradTarget> target) {
    ctx->set_materialize_grads(false);
    if (target) ctx->saved_data["target"] = c10::IValue::make_capsule(target);
    std::vector<int64_t> offs, numels;
    variable_list out;
    out.reserve(segs->size());
    for (const auto& p : *segs) {
      offs.push_back(p.offset);
      numels.push_back(p.numel);
      out.push_back(flat.narrow(0, p.offset, p.numel).view(p.shape));
    }
    ctx->saved_data["offs"] = offs;
    ctx->saved_data["numels"] = numels;
    ctx->saved_data["total"] = flat.numel();
    ctx->saved_data["dtype"] = flat.scalar_type();
    ctx->saved_data["device"] = flat.device();
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto offs = ctx->saved_data["offs"].toIntVector();
    auto numels = ctx->saved_data["numels"].toIntVector();
    int64_t total = ctx->saved_data["total"].toInt();
    auto opts = at::TensorOptions().dtype(ctx->saved_data["dtype"].toScalarType()).device(ctx->saved_data["device"].toDevice());
    bool any = false;
    for (auto& g : grads) any |= g.defined();
    if (!any) return {at::Tensor(), at::Tensor(), at::Tensor()};
    c10::intrusive_ptr<FlatGradTarget> target;
    if (auto it = ctx->saved_data.find("target"); it != ctx->saved_data.end())
      target = c10::static_intrusive_pointer_cast<FlatGradTarget>(it->second.toCapsule());
    if (target && target->grad.defined()) {  // accumulate in place: no flat temporary, no second pass over it
      if (target->grad.numel() != total || target->grad.scalar_type() != opts.dtype().toScalarType())
        throw std::invalid_argument("FlatGradTarget: the gradient does not match the flat tensor");
      at::NoGradGuard ng;
      for (size_t i = 0; i < offs.size(); ++i)
        if (grads[i].defined()) target->grad.narrow(0, offs[i], numels[i]).add_(grads[i].reshape({-1}));
      return {at::Tensor(), at::Tensor(), at::Tensor()};
    }
    at::Tensor g = at::empty({total}, opts);
    int64_t pos = 0;
    for (size_t i = 0; i < offs.size(); ++i) {
      if (offs[i] > pos) g.narrow(0, pos, offs[i] - pos).zero_();
      auto seg = g.narrow(0, offs[i], numels[i]);
      if (grads[i].defined()) seg.copy_(grads[i].reshape({-1}));
      else seg.zero_();
      pos = offs[i] + numels[i];
    }
    if (total > pos) g.narrow(0, pos, total - pos).zero_();
    if (target) {
      target->grad = g;
      return {at::Tensor(), at::Tensor(), at::Tensor()};
    }
    return {g, at::Tensor(), at::Tensor()};
  }
};

at::Tensor rotate_half(const at::Tensor& x) {
  int64_t d = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, d);
  auto x2 = x.narrow(-1, d, d);
  return at::cat({-x2, x1}, -1);
}

// [B, kvh, T, hd] -> [B, kvh*rep, T, hd] like HF repeat_kv.
at::Tensor repeat_kv(const at::Tensor& x, int64_t rep) {
  if (rep == 1) return x;
  auto B = x.size(0), kvh = x.size(1), T = x.size(2), hd = x.size(3);
  return x.unsqueeze(2).expand({B, kvh, rep, T, hd}).reshape({B, kvh * rep, T, hd});
}

}  // namespace

Rope make_rope(const ir::ModelArch& a, int64_t max_seq, c10::Device device) {
  if (max_seq <= 0) throw std::invalid_argument("make_rope: max_seq must be positive");
  Rope r;
  r.max_seq = max_seq;
  if (arch::is_gpt2(a)) return r;  // learned positions: no tables
  const int64_t hd = arch::head_dim(a);
  at::NoGradGuard ng;
  // Same ops as HF (modeling_rope_utils): inv_freq on the CPU in fp32 (Python's `s / t` is t.reciprocal() * s), then
  // positions x inv_freq, cos/sin on the device.
  auto inv_freq = at::reciprocal(at::pow(a.rope_theta, at::arange(0, hd, 2, at::kLong).to(at::kFloat) / static_cast<double>(hd)));
  if (a.rope_type == "llama3") {  // _compute_llama3_parameters
    const double factor = a.rope_factor, low = a.rope_low_freq_factor, high = a.rope_high_freq_factor;
    const double old_ctx = a.rope_original_max_positions;
    const double low_freq_wavelen = old_ctx / low, high_freq_wavelen = old_ctx / high;
    auto wavelen = at::reciprocal(inv_freq) * (2 * M_PI);
    auto inv_llama = at::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
    auto smooth = (at::reciprocal(wavelen) * old_ctx - low) / (high - low);
    auto smoothed = at::rsub(smooth, 1.0) * inv_llama / factor + smooth * inv_llama;
    auto medium = at::logical_not(wavelen < high_freq_wavelen) * at::logical_not(wavelen > low_freq_wavelen);
    inv_freq = at::where(medium, smoothed, inv_llama);
  } else if (a.rope_type != "default") {
    throw std::invalid_argument("make_rope: rope_type '" + a.rope_type + "' is not supported");
  }
  inv_freq = inv_freq.to(device);
  auto pos = at::arange(max_seq, at::TensorOptions().dtype(at::kLong).device(device)).to(at::kFloat);
  auto freqs = at::matmul(inv_freq.unsqueeze(1), pos.unsqueeze(0)).transpose(0, 1);  // [T, hd/2]
  auto emb = at::cat({freqs, freqs}, -1);
  r.cos = emb.cos().contiguous();
  r.sin = emb.sin().contiguous();
  return r;
}

std::vector<at::Tensor> param_views(const StageLayout& layout, const at::Tensor& flat) {
  if (!flat.defined() || flat.dim() != 1 || flat.numel() != layout.numel || !flat.is_contiguous())
    throw std::invalid_argument("param_views: flat must be a contiguous 1-D tensor of " + std::to_string(layout.numel) +
                                " elements (got " + (flat.defined() ? std::to_string(flat.numel()) : std::string("undefined")) + ")");
  std::vector<Segment> segs;
  for (const auto& p : layout.params) segs.push_back({p.offset, p.numel, p.shape});
  return FlatSplit::apply(flat, &segs, c10::intrusive_ptr<FlatGradTarget>());
}

namespace {
constexpr int kRoles = static_cast<int>(Role::Head) + 1;
// Where each role's tensor of one model layer is among the views; -1 when absent. Q/K/V (their biases; gate/up) that
// sit back to back in the flat tensor are one view, at the slot of QKV (QKVBias; Gate, with `gate_up` set).
struct Slots {
  std::array<int, kRoles> at;
  bool gate_up = false;
  Slots() { at.fill(-1); }
  int operator[](Role r) const { return at[static_cast<int>(r)]; }
};

// Segments of the flat tensor: every parameter, except that q/k/v, their biases, and gate/up become one matrix each
// when adjacent in the flat tensor (the layout's order; true unless alignment padding separates them). A fused matrix
// is a view, so the forward saves no copy of the weights for backward.
std::vector<Segment> segments(const ir::ModelArch& a, const StageLayout& layout, std::vector<Slots>& slots) {
  std::vector<Segment> segs;
  slots.assign(layout.layer_end - layout.layer_begin, Slots());
  const auto& P = layout.params;
  auto adjacent = [&](size_t i, size_t n) {
    for (size_t j = i; j + 1 < i + n; ++j)
      if (P[j].offset + P[j].numel != P[j + 1].offset) return false;
    return true;
  };
  for (size_t i = 0; i < P.size();) {
    Slots& s = slots[P[i].layer - layout.layer_begin];
    const Role r = P[i].role;
    const bool triple = (r == Role::Q || r == Role::QBias) && i + 3 <= P.size();
    const bool pair = r == Role::Gate && i + 2 <= P.size() && P[i + 1].role == Role::Up;
    const size_t n = triple ? 3 : pair ? 2 : 1;
    if (n > 1 && adjacent(i, n)) {
      int64_t rows = 0, numel = 0;
      for (size_t j = i; j < i + n; ++j) {
        rows += P[j].shape[0];
        numel += P[j].numel;
      }
      std::vector<int64_t> shape = {rows};
      if (P[i].shape.size() == 2) shape.push_back(P[i].shape[1]);
      s.at[static_cast<int>(r == Role::Q ? Role::QKV : r == Role::QBias ? Role::QKVBias : Role::Gate)] = (int)segs.size();
      s.gate_up = s.gate_up || pair;
      segs.push_back({P[i].offset, numel, shape});
    } else {
      for (size_t j = i; j < i + n; ++j) {
        s.at[static_cast<int>(P[j].role)] = (int)segs.size();
        segs.push_back({P[j].offset, P[j].numel, P[j].shape});
      }
    }
    i += n;
  }
  (void)a;
  return segs;
}
}  // namespace

at::Tensor stage_forward(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat, const at::Tensor& input,
                         const Rope& rope, const at::Tensor& tied_embedding, bool fused_norm_on_cpu) {
  if (layout.tp_size != 1)
    throw std::invalid_argument("stage_forward: the layout is tensor-parallel shard " + std::to_string(layout.tp_rank) +
                                " of " + std::to_string(layout.tp_size) + " (use tp_stage_forward)");
  return detail::forward_stage(a, layout, flat, input, rope, tied_embedding, fused_norm_on_cpu, nullptr);
}

at::Tensor stage_forward_layers(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat,
                                const at::Tensor& input, const Rope& rope, int layer_from, int layer_to,
                                const at::Tensor& tied_embedding, bool fused_norm_on_cpu,
                                c10::intrusive_ptr<FlatGradTarget> grad_target, bool selective, bool output_unused) {
  if (layout.tp_size != 1)
    throw std::invalid_argument("stage_forward_layers: the layout is a tensor-parallel shard (not supported)");
  if (layer_from < layout.layer_begin || layer_from >= layer_to || layer_to > layout.layer_end)
    throw std::invalid_argument("stage_forward_layers: layers [" + std::to_string(layer_from) + ", " + std::to_string(layer_to) +
                                ") are not a non-empty part of the stage's [" + std::to_string(layout.layer_begin) + ", " +
                                std::to_string(layout.layer_end) + ")");
  return detail::forward_stage(a, layout, flat, input, rope, tied_embedding, fused_norm_on_cpu, nullptr, layer_from, layer_to,
                               std::move(grad_target), selective, output_unused);
}

at::Tensor detail::forward_stage(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat,
                                 const at::Tensor& input, const Rope& rope, const at::Tensor& tied_embedding,
                                 bool fused_norm_on_cpu, TpComm* comm, int layer_from, int layer_to,
                                 c10::intrusive_ptr<FlatGradTarget> grad_target, bool selective, bool output_unused) {
  if (!flat.defined() || flat.dim() != 1 || flat.numel() != layout.numel || !flat.is_contiguous())
    throw std::invalid_argument("stage_forward: flat must be a contiguous 1-D tensor of " + std::to_string(layout.numel) + " elements");
  if (layer_from < 0) layer_from = layout.layer_begin;
  if (layer_to < 0) layer_to = layout.layer_end;
  std::vector<Slots> slots;
  const std::vector<Segment> segs = segments(a, layout, slots);
  auto views = FlatSplit::apply(flat, &segs, std::move(grad_target));
  const auto dt = flat.scalar_type();
  const bool gpt2 = arch::is_gpt2(a);
  // Tensor parallelism (comm set): this rank's heads, kv heads, MLP rows and vocabulary rows; f/g around the
  // column- and row-parallel projections (tp.hpp). Without comm every branch below is the unsharded model's.
  const int tp = comm ? comm->size() : 1;
  const arch::TpVocab voc = arch::tp_vocab(a.vocab, comm ? comm->rank() : 0, tp);
  auto to_tp = [&](const at::Tensor& x) { return comm ? detail::copy_to_tp(x, *comm) : x; };
  const int64_t H = a.hidden, nh = a.heads / tp, nkv = a.kv_heads / tp, hd = arch::head_dim(a), qd = nh * hd,
                kvd = nkv * hd;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  at::Tensor h;
  if (layer_from == 0) {
    if (input.scalar_type() != at::kLong || input.dim() != 2)
      throw std::invalid_argument("stage_forward: a stage starting at layer 0 takes int64 token ids [B,T]");
  } else {
    if (input.dim() != 3 || input.size(2) != H || input.scalar_type() != dt)
      throw std::invalid_argument("stage_forward: stage input must be hidden states [B,T," + std::to_string(H) +
                                  "] in the weights' dtype");
    h = input;
  }
  const int64_t B = input.size(0), T = input.size(1);
  if (T > rope.max_seq)
    throw std::invalid_argument("stage_forward: sequence length " + std::to_string(T) + " exceeds the rope table (" +
                                std::to_string(rope.max_seq) + ")");
  if (gpt2 && T > a.max_positions)
    throw std::invalid_argument("stage_forward: sequence length " + std::to_string(T) + " exceeds the model's " +
                                std::to_string(a.max_positions) + " learned positions");
  at::Tensor cos, sin, window_mask;
  // RMSNorm: HF's exact op sequence, except bf16/fp16 on a GPU, where ATen's fused kernel computes the same
  // normalisation in fp32 internally (differences at the low-precision rounding level). LayerNorm (GPT-2): ATen's, as HF.
  const bool fused_norm = (flat.is_cuda() || fused_norm_on_cpu) && dt != at::kFloat;
  auto norm = [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    if (gpt2) return at::layer_norm(x, {x.size(-1)}, w, b, a.norm_eps);
    return norm_of(x, w, fused_norm, a.norm_eps);
  };
  auto view = [&](const Slots& s, Role r) { return s[r] >= 0 ? views[s[r]] : at::Tensor(); };
  // LLaMA-style layers at tp 1 keep less (NormLinear, SwiGluDown, v copied out of qkv: ModelSpec::layer_stash_bytes)
  const bool trim = !comm && !gpt2 && !plain_layer_graph();
  // RoPE and the q/k/v split in one CUDA kernel each way (RopeQKV); Qwen3's q/k norms sit between the two: ATen's ops
  const bool fused_rope = trim && !a.qk_norm && hd % 2 == 0 && use_kernels(flat);
  // linear(norm(x)): one NormLinear node when trimming, else the plain ops (GPT-2's LayerNorm with its bias nb)
  auto norm_linear = [&](const at::Tensor& x, const at::Tensor& nw, const at::Tensor& nb, const at::Tensor& w,
                         const at::Tensor& b) {
    if (trim) return b.defined() ? NormLinearBias::apply(x, nw, w, b, fused_norm, a.norm_eps)
                                 : NormLinear::apply(x, nw, w, fused_norm, a.norm_eps);
    return at::linear(to_tp(norm(x, nw, nb)), w, b);
  };
  at::Tensor embed;  // this stage's token embedding view, if any
  if (layer_from > 0 && layout.has_embedding()) embed = view(slots[0], Role::Embed);  // a tied head after a split
  for (int l = layer_from; l < layer_to; ++l) {
    const Slots& s = slots[l - layout.layer_begin];
    if (l == 0) {
      embed = view(s, Role::Embed);
      if (comm) h = detail::vocab_parallel_embedding(embed, input.to(flat.device()), voc.begin, voc.valid, *comm);
      else h = at::embedding(embed, input.to(flat.device()));
      if (gpt2) h = h + view(s, Role::PosEmbed).narrow(0, 0, T);  // HF: wte(ids) + wpe(arange(T))
    } else if (l == a.layers + 1) {
      h = norm(h, view(s, Role::FinalNorm), view(s, Role::FinalNormBias));
      at::Tensor head;
      if (!a.tied_embeddings) head = view(s, Role::Head);
      else if (embed.defined()) head = embed;
      else if (tied_embedding.defined()) {
        if (tied_embedding.dim() != 2 || tied_embedding.size(0) != voc.rows || tied_embedding.size(1) != H)
          throw std::invalid_argument(comm ? "stage_forward: tied_embedding must be the rank's embedding shard [" +
                                                 std::to_string(voc.rows) + ", hidden]"
                                           : std::string("stage_forward: tied_embedding must be [vocab, hidden]"));
        head = tied_embedding.to(dt);
      } else {
        throw std::invalid_argument("stage_forward: tied lm_head needs the embedding matrix (pass tied_embedding)");
      }
      h = at::linear(to_tp(h), head).to(at::kFloat);
    } else {
      // q/k/v: one GEMM (and one for gate and up below): larger matrices run closer to peak
      at::Tensor w_qkv = s[Role::QKV] >= 0 ? views[s[Role::QKV]]
                                           : at::cat({view(s, Role::Q), view(s, Role::K), view(s, Role::V)}, 0);
      at::Tensor b_qkv = s[Role::QKVBias] >= 0 ? views[s[Role::QKVBias]]
                         : s[Role::QBias] >= 0 ? at::cat({view(s, Role::QBias), view(s, Role::KBias), view(s, Role::VBias)}, 0)
                                               : at::Tensor();
      auto residual = h;
      auto qkv = norm_linear(h, view(s, Role::AttnNorm), view(s, Role::AttnNormBias), w_qkv, b_qkv);
      if (!gpt2 && !cos.defined()) {
        cos = rope.cos.narrow(0, 0, T).to(h.device(), dt).contiguous();  // [T, hd]; broadcasts over [B, heads, T, hd]
        sin = rope.sin.narrow(0, 0, T).to(h.device(), dt).contiguous();
      }
      at::Tensor q, kk, v;
      if (fused_rope) {  // one kernel: q and k rotated, v copied out (qkv itself is not kept)
        auto r = RopeQKV::apply(qkv, cos, sin, nh, nkv, hd);
        q = r[0].transpose(1, 2);
        kk = r[1].transpose(1, 2);
        v = r[2].transpose(1, 2);
      } else {
        q = qkv.narrow(-1, 0, qd).reshape({B, T, nh, hd});
        kk = qkv.narrow(-1, qd, kvd).reshape({B, T, nkv, hd});
        // v a view of qkv keeps all of qkv alive in attention's stash; with MHA (no repeat_kv copy) and no q/k norms
        // (which keep qkv anyway) a copy of v lets the q and k parts go
        v = (trim && nkv == nh && !a.qk_norm ? qkv.narrow(-1, qd + kvd, kvd).contiguous() : qkv.narrow(-1, qd + kvd, kvd))
                .reshape({B, T, nkv, hd})
                .transpose(1, 2);
        if (a.qk_norm) {  // Qwen3: RMSNorm over each head's vector, before the rotation
          // TP: the weight's partial gradients summed inside the backward (tp.hpp; not a plan instruction)
          auto w_tp = [&](const at::Tensor& w) { return comm ? detail::copy_to_tp(w, *comm, /*planned=*/false) : w; };
          q = norm(q, w_tp(view(s, Role::QNorm)), {});
          kk = norm(kk, w_tp(view(s, Role::KNorm)), {});
        }
        q = q.transpose(1, 2);
        kk = kk.transpose(1, 2);
        if (!gpt2) {
          q = q * cos + rotate_half(q) * sin;
          kk = kk * cos + rotate_half(kk) * sin;
        }
      }
      kk = repeat_kv(kk, nh / nkv);
      v = repeat_kv(v, nh / nkv);
      at::Tensor att;
      if (a.sliding_window > 0 && a.sliding_window < T) {
        if (!window_mask.defined()) {  // HF: key j visible from query i when i - window < j <= i
          auto i = at::arange(T, at::TensorOptions().dtype(at::kLong).device(h.device())).unsqueeze(1);
          auto j = i.transpose(0, 1);
          window_mask = at::logical_and(j <= i, j > i - a.sliding_window);
        }
        att = at::scaled_dot_product_attention(q, kk, v, window_mask, /*dropout_p=*/0.0, /*is_causal=*/false, scale);
      } else {
        att = at::scaled_dot_product_attention(q, kk, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true, scale);
      }
      att = att.transpose(1, 2).reshape({B, T, qd});
      if (comm) {  // row-parallel: the sum over ranks, then the bias once
        auto o = detail::reduce_from_tp(at::linear(att, view(s, Role::O)), *comm);
        h = residual + (s[Role::OBias] >= 0 ? o + view(s, Role::OBias) : o);
      } else {
        h = residual + at::linear(att, view(s, Role::O), view(s, Role::OBias));
      }
      residual = h;
      const int64_t F = a.ffn / tp;
      at::Tensor x, act;
      if (gpt2) {  // GELU (tanh approximation: HF's gelu_new)
        act = at::gelu(norm_linear(h, view(s, Role::MlpNorm), view(s, Role::MlpNormBias), view(s, Role::Up), view(s, Role::UpBias)),
                       "tanh");
      } else {
        at::Tensor w_gu = s.gate_up ? view(s, Role::Gate) : at::cat({view(s, Role::Gate), view(s, Role::Up)}, 0);
        auto gu = norm_linear(h, view(s, Role::MlpNorm), {}, w_gu, {});
        if (trim) {  // SwiGLU and down in one node; kept: 3F per token, selective: 2F
          x = SwiGluDown::apply(gu, view(s, Role::Down), selective, output_unused && l + 1 == layer_to);
          if (s[Role::DownBias] >= 0) x = x + view(s, Role::DownBias);
        } else {
          act = at::silu(gu.narrow(-1, 0, F)) * gu.narrow(-1, F, F);
        }
      }
      if (act.defined()) {  // (else SwiGluDown projected down already)
        if (comm) {  // row-parallel: the sum over ranks, then the bias once
          x = detail::reduce_from_tp(at::linear(act, view(s, Role::Down)), *comm);
          if (s[Role::DownBias] >= 0) x = x + view(s, Role::DownBias);
        } else {
          x = at::linear(act, view(s, Role::Down), view(s, Role::DownBias));
        }
      }
      h = residual + x;
    }
  }
  return h;
}

at::Tensor embedding_view(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat) {
  const ParamInfo* p = layout.find(0, Role::Embed);
  if (!p) throw std::invalid_argument("embedding_view: the stage does not hold the token embedding (layer 0)");
  if (!flat.defined() || flat.dim() != 1 || flat.numel() != layout.numel)
    throw std::invalid_argument("embedding_view: flat tensor does not match the layout");
  (void)a;
  return flat.narrow(0, p->offset, p->numel).view(p->shape);
}

void add_tied_embedding_grad(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat_grad,
                             const at::Tensor& grad) {
  at::Tensor v = embedding_view(a, layout, flat_grad);
  if (!grad.defined() || grad.sizes() != v.sizes())
    throw std::invalid_argument("add_tied_embedding_grad: gradient must be [vocab, hidden]");
  at::NoGradGuard ng;
  v.add_(grad.to(v.device(), v.scalar_type()));
}

namespace {

// Rows of fp32 logits per piece of the chunked loss: a piece's fp32 temporaries are at most 2^25 elements (128 MiB)
// each. MMOC_LOSS_CHUNK_ROWS overrides it (tests: force several pieces on a tiny model).
int64_t loss_rows_per_piece(int64_t V) {
  if (const char* e = std::getenv("MMOC_LOSS_CHUNK_ROWS")) {
    const long long r = std::atoll(e);
    if (r > 0) return r;
  }
  return std::max<int64_t>(1, (int64_t(1) << 25) / std::max<int64_t>(1, V));
}

// The pieces of the shifted logits logits[:, :-1] (B x (T-1) rows of V) as views: one piece holding all rows when
// they fit (then the rows are copied into one [B*(T-1), V] tensor, as a plain reshape would), otherwise runs of rows
// of one sequence each (a run of one sequence's rows is a view: the shift only drops each sequence's last row).
struct Piece {
  int64_t b, t0, rows;  // b < 0: all rows at once
};
std::vector<Piece> loss_pieces(int64_t B, int64_t T1, int64_t V) {
  const int64_t per = loss_rows_per_piece(V);
  if (B * T1 <= per) return {{-1, 0, B * T1}};
  std::vector<Piece> out;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T1; t += per) out.push_back({b, t, std::min(per, T1 - t)});
  return out;
}
at::Tensor piece_rows(const at::Tensor& t3, const Piece& p, int64_t T1) {  // [rows, last dim] of t3 [B, T, ...]
  if (p.b < 0) return t3.narrow(1, 0, T1).reshape({-1, t3.size(2)});
  return t3[p.b].narrow(0, p.t0, p.rows);
}
at::Tensor piece_labels(const at::Tensor& lb2, const Piece& p) {  // lb2: the shifted labels [B, T-1]
  if (p.b < 0) return lb2.reshape({-1});
  return lb2[p.b].narrow(0, p.t0, p.rows);
}

// Next-token cross-entropy summed in fp32, computed piece by piece: nothing vocabulary-wide in fp32 outlives a piece.
// The same operations as cross_entropy over the whole fp32 copy (log_softmax of the fp32 rows, nll_loss summed), so
// every element of the gradient is what that gives, bit for bit (both are row-wise); only the loss's sum is taken
// piece by piece. Forward saves the logits as they came (the head's output, bf16 in training: half the bytes of the
// fp32 log-softmax that cross_entropy keeps); backward recomputes each piece's log-softmax and writes its gradient
// (nll_loss_backward, log_softmax backward, the cast back) into the logits' dtype. Before this the head held the fp32
// copy, its log-softmax and in backward their gradients at once, 4-5 x T x V x 4 bytes: the allocator's retries at a
// full 130 GiB budget fell on the head's forward (issue 14).
struct ChunkedLmLoss : torch::autograd::Function<ChunkedLmLoss> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& lb2) {
    const int64_t B = logits.size(0), T1 = lb2.size(1), V = logits.size(2);
    at::Tensor loss;
    for (const Piece& p : loss_pieces(B, T1, V)) {
      const at::Tensor x = piece_rows(logits, p, T1).to(at::kFloat);
      const at::Tensor part = at::nll_loss(at::log_softmax(x, 1), piece_labels(lb2, p), /*weight=*/{},
                                           at::Reduction::Sum, /*ignore_index=*/-100);
      loss = loss.defined() ? loss + part : part;
    }
    ctx->save_for_backward({logits, lb2});
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor logits = saved[0], lb2 = saved[1];
    const int64_t B = logits.size(0), T1 = lb2.size(1), V = logits.size(2);
    at::Tensor g = at::zeros_like(logits);  // the last position of each sequence has no label: gradient zero
    const at::Tensor gout = grads[0].to(at::kFloat);
    for (const Piece& p : loss_pieces(B, T1, V)) {
      const at::Tensor x = piece_rows(logits, p, T1).to(at::kFloat);
      const at::Tensor lsm = at::log_softmax(x, 1);
      const at::Tensor lb = piece_labels(lb2, p);
      auto [l, total_weight] = at::nll_loss_forward(lsm, lb, /*weight=*/{}, at::Reduction::Sum, -100);
      (void)l;
      const at::Tensor gl = at::nll_loss_backward(gout, lsm, lb, /*weight=*/{}, at::Reduction::Sum, -100, total_weight);
      const at::Tensor gx = at::_log_softmax_backward_data(gl, lsm, 1, at::kFloat);
      if (p.b < 0) g.narrow(1, 0, T1).copy_(gx.view({B, T1, V}));
      else g[p.b].narrow(0, p.t0, p.rows).copy_(gx);
    }
    return {g, at::Tensor()};
  }
};

}  // namespace

at::Tensor lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels) {
  if (logits.dim() != 3 || labels.dim() != 2 || logits.size(0) != labels.size(0) || logits.size(1) != labels.size(1))
    throw std::invalid_argument("lm_loss_sum: logits [B,T,V] and labels [B,T] expected");
  const int64_t T = logits.size(1);
  if (T < 2) return (logits.sum() * 0).to(at::kFloat);
  const at::Tensor lb2 = labels.narrow(1, 1, T - 1).to(logits.device(), at::kLong).contiguous();
  return ChunkedLmLoss::apply(logits.contiguous(), lb2);
}

int64_t count_tokens(const at::Tensor& labels) {
  if (labels.dim() != 2) throw std::invalid_argument("count_tokens: labels [B,T] expected");
  if (labels.size(1) < 2) return 0;
  return labels.narrow(1, 1, labels.size(1) - 1).ne(-100).sum().item<int64_t>();
}

at::Tensor new_flat(const StageLayout& layout, at::TensorOptions options) { return at::zeros({layout.numel}, options); }

// init_weights: engine/model/init.cpp

}  // namespace mmoc::engine
