#include "engine/model/model.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <stdexcept>

namespace mmoc::engine {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// A piece of the flat tensor handed to the model as one view: one parameter, or several parameters that sit back to
// back (q/k/v, gate/up) so that they are used as one matrix without a copy.
struct Segment {
  int64_t offset = 0, numel = 0;
  std::vector<int64_t> shape;
};

// flat -> segment views; backward gathers the segments' gradients into one flat gradient.
struct FlatSplit : torch::autograd::Function<FlatSplit> {
  static variable_list forward(AutogradContext* ctx, at::Tensor flat, const std::vector<Segment>* segs) {
    ctx->set_materialize_grads(false);
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
    if (!any) return {at::Tensor(), at::Tensor()};
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
    return {g, at::Tensor()};
  }
};

// HF LlamaRMSNorm: fp32 variance, normalise in fp32, cast back to the input dtype, then weight * x.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto dt = x.scalar_type();
  auto h = x.to(at::kFloat);
  auto var = h.pow(2).mean({-1}, /*keepdim=*/true);
  h = h * at::rsqrt(var + eps);
  return w * h.to(dt);
}

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
  const int64_t hd = a.hidden / a.heads;
  at::NoGradGuard ng;
  // Same ops as HF: inv_freq on the CPU in fp32, then positions x inv_freq, cos/sin on the device.
  auto inv_freq = 1.0 / at::pow(a.rope_theta, at::arange(0, hd, 2, at::kLong).to(at::kFloat) / static_cast<double>(hd));
  inv_freq = inv_freq.to(device);
  auto pos = at::arange(max_seq, at::TensorOptions().dtype(at::kLong).device(device)).to(at::kFloat);
  auto freqs = at::matmul(inv_freq.unsqueeze(1), pos.unsqueeze(0)).transpose(0, 1);  // [T, hd/2]
  auto emb = at::cat({freqs, freqs}, -1);
  Rope r;
  r.cos = emb.cos().contiguous();
  r.sin = emb.sin().contiguous();
  r.max_seq = max_seq;
  return r;
}

std::vector<at::Tensor> param_views(const StageLayout& layout, const at::Tensor& flat) {
  if (!flat.defined() || flat.dim() != 1 || flat.numel() != layout.numel || !flat.is_contiguous())
    throw std::invalid_argument("param_views: flat must be a contiguous 1-D tensor of " + std::to_string(layout.numel) +
                                " elements (got " + (flat.defined() ? std::to_string(flat.numel()) : std::string("undefined")) + ")");
  std::vector<Segment> segs;
  for (const auto& p : layout.params) segs.push_back({p.offset, p.numel, p.shape});
  return FlatSplit::apply(flat, &segs);
}

at::Tensor stage_forward(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat, const at::Tensor& input,
                         const Rope& rope, const at::Tensor& tied_embedding, bool fused_norm_on_cpu) {
  if (!flat.defined() || flat.dim() != 1 || flat.numel() != layout.numel || !flat.is_contiguous())
    throw std::invalid_argument("stage_forward: flat must be a contiguous 1-D tensor of " + std::to_string(layout.numel) + " elements");
  // Segments: every parameter, except that q/k/v and gate/up become one [rows, hidden] matrix each when they are
  // adjacent in the flat tensor (the layout's order; true unless alignment padding separates them). A fused matrix
  // is a view, so the forward saves no copy of the weights for backward.
  std::vector<Segment> segs;
  std::vector<char> fused_qkv, fused_gu;  // per decoder layer of the stage
  for (size_t i = 0; i < layout.params.size();) {
    const auto& p = layout.params[i];
    auto adjacent = [&](size_t a, size_t n) {
      for (size_t j = a; j + 1 < a + n; ++j)
        if (layout.params[j].offset + layout.params[j].numel != layout.params[j + 1].offset) return false;
      return true;
    };
    auto merge = [&](size_t a, size_t n) {
      int64_t rows = 0, numel = 0;
      for (size_t j = a; j < a + n; ++j) { rows += layout.params[j].shape[0]; numel += layout.params[j].numel; }
      segs.push_back({layout.params[a].offset, numel, {rows, layout.params[a].shape[1]}});
    };
    const bool decoder = p.layer >= 1 && p.layer <= a.layers;
    if (decoder && i + 3 <= layout.params.size() && p.name.find("self_attn.q_proj.weight") != std::string::npos) {
      const bool f = adjacent(i, 3);
      fused_qkv.push_back(f);
      if (f) merge(i, 3);
      else for (size_t j = i; j < i + 3; ++j) segs.push_back({layout.params[j].offset, layout.params[j].numel, layout.params[j].shape});
      i += 3;
    } else if (decoder && i + 2 <= layout.params.size() && p.name.find("mlp.gate_proj.weight") != std::string::npos) {
      const bool f = adjacent(i, 2);
      fused_gu.push_back(f);
      if (f) merge(i, 2);
      else for (size_t j = i; j < i + 2; ++j) segs.push_back({layout.params[j].offset, layout.params[j].numel, layout.params[j].shape});
      i += 2;
    } else {
      segs.push_back({p.offset, p.numel, p.shape});
      ++i;
    }
  }
  auto views = FlatSplit::apply(flat, &segs);
  const auto dt = flat.scalar_type();
  const int64_t H = a.hidden, nh = a.heads, nkv = a.kv_heads, hd = a.hidden / a.heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  size_t k = 0;  // next view
  at::Tensor h;
  at::Tensor embed;  // this stage's embedding view, if any
  if (layout.has_embedding()) {
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
  at::Tensor cos, sin;
  // RMSNorm: HF's exact op sequence, except bf16/fp16 on a GPU, where ATen's fused kernel computes the same
  // normalisation in fp32 internally (differences at the low-precision rounding level).
  const bool fused_norm = (flat.is_cuda() || fused_norm_on_cpu) && dt != at::kFloat;
  auto norm = [&](const at::Tensor& x, const at::Tensor& w) {
    return fused_norm ? at::rms_norm(x, {x.size(-1)}, w, a.norm_eps) : rms_norm(x, w, a.norm_eps);
  };
  for (int l = layout.layer_begin; l < layout.layer_end; ++l) {
    if (l == 0) {
      embed = views[k++];
      h = at::embedding(embed, input.to(flat.device()));
    } else if (l == a.layers + 1) {
      auto norm_w = views[k++];
      h = norm(h, norm_w);
      at::Tensor head;
      if (!a.tied_embeddings) head = views[k++];
      else if (embed.defined()) head = embed;
      else if (tied_embedding.defined()) {
        if (tied_embedding.dim() != 2 || tied_embedding.size(0) != a.vocab || tied_embedding.size(1) != H)
          throw std::invalid_argument("stage_forward: tied_embedding must be [vocab, hidden]");
        head = tied_embedding.to(dt);
      } else {
        throw std::invalid_argument("stage_forward: tied lm_head needs the embedding matrix (pass tied_embedding)");
      }
      h = at::linear(h, head).to(at::kFloat);
    } else {
      if (!cos.defined()) {
        cos = rope.cos.narrow(0, 0, T).to(h.device(), dt);  // [T, hd]; broadcasts over [B, heads, T, hd]
        sin = rope.sin.narrow(0, 0, T).to(h.device(), dt);
      }
      const size_t li = (size_t)(l - std::max(layout.layer_begin, 1));  // decoder layer index within the stage
      auto& w_in = views[k++];
      // one GEMM for q, k and v (and one for gate and up below): larger matrices run closer to peak
      at::Tensor w_qkv = fused_qkv[li] ? views[k] : at::cat({views[k], views[k + 1], views[k + 2]}, 0);
      k += fused_qkv[li] ? 1 : 3;
      auto& wo = views[k++];
      auto& w_post = views[k++];
      at::Tensor w_gu = fused_gu[li] ? views[k] : at::cat({views[k], views[k + 1]}, 0);
      k += fused_gu[li] ? 1 : 2;
      auto& wd = views[k++];
      auto residual = h;
      auto x = norm(h, w_in);
      auto qkv = at::linear(x, w_qkv);
      auto q = qkv.narrow(-1, 0, nh * hd).reshape({B, T, nh, hd}).transpose(1, 2);
      auto kk = qkv.narrow(-1, nh * hd, nkv * hd).reshape({B, T, nkv, hd}).transpose(1, 2);
      auto v = qkv.narrow(-1, (nh + nkv) * hd, nkv * hd).reshape({B, T, nkv, hd}).transpose(1, 2);
      q = q * cos + rotate_half(q) * sin;
      kk = kk * cos + rotate_half(kk) * sin;
      kk = repeat_kv(kk, nh / nkv);
      v = repeat_kv(v, nh / nkv);
      auto att = at::scaled_dot_product_attention(q, kk, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true, scale);
      att = att.transpose(1, 2).reshape({B, T, nh * hd});
      h = residual + at::linear(att, wo);
      residual = h;
      x = norm(h, w_post);
      const int64_t F = a.ffn;
      auto gu = at::linear(x, w_gu);
      x = at::linear(at::silu(gu.narrow(-1, 0, F)) * gu.narrow(-1, F, F), wd);
      h = residual + x;
    }
  }
  return h;
}

at::Tensor lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels) {
  if (logits.dim() != 3 || labels.dim() != 2 || logits.size(0) != labels.size(0) || logits.size(1) != labels.size(1))
    throw std::invalid_argument("lm_loss_sum: logits [B,T,V] and labels [B,T] expected");
  const int64_t T = logits.size(1), V = logits.size(2);
  if (T < 2) return (logits.sum() * 0).to(at::kFloat);
  auto lg = logits.narrow(1, 0, T - 1).to(at::kFloat).reshape({-1, V});
  auto lb = labels.narrow(1, 1, T - 1).to(logits.device(), at::kLong).reshape({-1});
  return at::cross_entropy_loss(lg, lb, /*weight=*/{}, at::Reduction::Sum, /*ignore_index=*/-100);
}

int64_t count_tokens(const at::Tensor& labels) {
  if (labels.dim() != 2) throw std::invalid_argument("count_tokens: labels [B,T] expected");
  if (labels.size(1) < 2) return 0;
  return labels.narrow(1, 1, labels.size(1) - 1).ne(-100).sum().item<int64_t>();
}

at::Tensor new_flat(const StageLayout& layout, at::TensorOptions options) { return at::zeros({layout.numel}, options); }

// init_weights: engine/model/init.cpp

}  // namespace mmoc::engine
