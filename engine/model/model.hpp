// Functional LLaMA forward over a stage's flat weight tensor (LibTorch), matching HF transformers'
// LlamaForCausalLM numerics (RMSNorm in fp32 cast back before the weight multiply, rotate_half RoPE,
// repeat-kv GQA through scaled_dot_product_attention, SwiGLU MLP, fp32 logits and loss).
// Layout of the flat tensor: engine/model/layout.hpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <vector>

#include "engine/model/layout.hpp"

namespace mmoc::engine {

// Rotary tables like HF's LlamaRotaryEmbedding (default rope type): cos/sin of pos * inv_freq, with
// inv_freq = 1 / theta^(arange(0, hd, 2)/hd), both halves concatenated. fp32 [max_seq, head_dim] on `device`;
// cast to the compute dtype at use (as HF does).
struct Rope {
  at::Tensor cos, sin;
  int64_t max_seq = 0;
};
Rope make_rope(const ir::ModelArch& arch, int64_t max_seq, c10::Device device = c10::Device(c10::kCPU));

// Views of each parameter of `layout` into `flat` (1-D, contiguous, numel == layout.numel), shaped as the
// parameter, in layout order. Autograd-aware: the gradients of all views reach `flat` as ONE flat gradient
// (one allocation; padding and unused parameters get zeros), so after backward flat.grad() is the stage's
// weight gradient. The views must not be modified in place while they take part in autograd.
std::vector<at::Tensor> param_views(const StageLayout& layout, const at::Tensor& flat);

// Runs the stage [layout.layer_begin, layout.layer_end).
//  input: int64 token ids [B,T] when the stage starts at layer 0, else hidden states [B,T,H] in flat's dtype.
//  returns hidden [B,T,H] (flat's dtype), or fp32 logits [B,T,V] when the stage ends with the head.
// Computes in flat's dtype (fp32 or bf16/fp16), on flat's device; T <= rope.max_seq.
// tied_embedding: the [V,H] embedding matrix, needed (only) when arch is tied and the stage has the head but not
// the embedding (see head_needs_embedding); its gradient then flows into that tensor, which the caller must
// add into the embedding's owner. With the whole model in one stage the stage's own embedding is used.
// fused_norm_on_cpu: use ATen's fused rms_norm on the CPU too (what bf16 on a GPU runs; tests measure its memory).
at::Tensor stage_forward(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat,
                         const at::Tensor& input, const Rope& rope, const at::Tensor& tied_embedding = at::Tensor(),
                         bool fused_norm_on_cpu = false);

// Sum over tokens of next-token cross-entropy, in fp32, with HF's shift: logits[:, :-1] against labels[:, 1:],
// labels == -100 ignored. Returns a 0-dim fp32 tensor on logits' device (differentiable).
at::Tensor lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels);
// Number of labels that count in lm_loss_sum: (labels[:, 1:] != -100).sum(). HF's mean loss = sum / count.
int64_t count_tokens(const at::Tensor& labels);

// A zero flat tensor for `layout`.
at::Tensor new_flat(const StageLayout& layout, at::TensorOptions options);
// HF-style random init, deterministic per (seed, parameter name, element) and so independent of the stage split,
// the thread count, the dtype and the device: Linear/Embedding ~ normal(0, std), norms = 1, padding = 0. Writes
// into `flat` (no grad), multithreaded (ATen's intra-op threads); computed on the host (engine/model/init.cpp).
void init_weights(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat, uint64_t seed,
                  double std = 0.02);

}  // namespace mmoc::engine
