// Functional forward of every model family (arch/arch.hpp) over a stage's flat weight tensor (LibTorch), matching HF
// transformers' numerics: LLaMA-style layers as LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM /
// Qwen3ForCausalLM (RMSNorm in fp32 cast back before the weight multiply, rotate_half RoPE with default or llama3
// frequencies, repeat-kv GQA through scaled_dot_product_attention, q/k/v biases, per-head q/k RMSNorm, sliding-window
// masks, SwiGLU MLP), GPT-2 blocks as GPT2LMHeadModel (LayerNorm, learned positions, GELU-tanh MLP, biases); fp32
// logits and loss. The model's tensors are picked by their role in the layout, not by name.
// Layout of the flat tensor: arch/layout.hpp.
#pragma once
#include <functional>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <vector>

#include "engine/model/layout.hpp"

namespace mmoc::engine {

// Rotary tables like HF's rotary embeddings: cos/sin of pos * inv_freq, with inv_freq = 1 / theta^(arange(0, hd, 2)/hd)
// (rope_type default) or that rescaled as Llama-3.1 does (rope_type llama3), both halves concatenated. fp32
// [max_seq, head_dim] on `device`; cast to the compute dtype at use (as HF does). GPT-2 (learned positions): no tables,
// only max_seq.
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

// Where a stage's weight gradient goes when the engine runs it (stage_forward_layers' grad_target): instead of a new
// zeroed flat gradient per backward that the caller then adds into its accumulator, the backward adds every
// parameter's gradient into `grad` in place (when `grad` is undefined it allocates it, copying the gradients and
// zeroing only the padding and unused parameters). The autograd gradient of the flat tensor is then undefined: call
// autograd::grad with allow_unused. One target serves both halves of a partially recomputed stage.
struct FlatGradTarget : torch::CustomClassHolder {
  at::Tensor grad;
};

// Runs only the model layers [layer_from, layer_to) of the stage (layout.layer_begin <= layer_from < layer_to <=
// layout.layer_end), as stage_forward would for a stage of just those layers: input token ids when layer_from is 0,
// else hidden states; output logits when layer_to ends with the head. The parameters are still views of the whole
// flat tensor: its gradient through this call is zero outside those layers' parameters. Partial recompute splits a
// stage's forward in two such calls (the engine's first layers recompute, the others keep their autograd stash).
// A tied head in the second part uses the stage's own embedding view.
// selective: selective recompute inside the layer (the plan's Stage::selective): each LLaMA-style decoder layer's
// SwiGLU and down projection run as one autograd node that keeps the gate|up output only and recomputes
// silu(gate) * up in its backward (2 x ffn elements per token less kept; gradients bit-identical). GPT-2 layers
// (no SwiGLU) run as without it.
// output_unused: the caller reads only the gradients through the output, never its value (the engine's recompute
// inside backward): the last layer, when LLaMA-style at tp 1, skips its down projection (zeros in its place; the
// gradients are the same). Every LLaMA-style layer at tp 1 also keeps its norms' inputs rather than their outputs, and
// with multi-head attention a copy of v rather than the whole fused qkv output (ModelSpec::layer_stash_bytes).
at::Tensor stage_forward_layers(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat,
                                const at::Tensor& input, const Rope& rope, int layer_from, int layer_to,
                                const at::Tensor& tied_embedding = at::Tensor(), bool fused_norm_on_cpu = false,
                                c10::intrusive_ptr<FlatGradTarget> grad_target = {}, bool selective = false,
                                bool output_unused = false);

// Tied embeddings across stages (head_needs_embedding): the [V,H] token-embedding view of the flat tensor of the stage
// holding layer 0 (what the head's stage needs as stage_forward's tied_embedding), and the head stage's gradient of it
// added into that stage's flat weight gradient before the optimizer step (one master copy, one optimizer state).
// Both throw std::invalid_argument when the layout has no embedding or the shapes disagree.
at::Tensor embedding_view(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat);
void add_tied_embedding_grad(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat_grad,
                             const at::Tensor& grad);

// Sum over tokens of next-token cross-entropy, in fp32, with HF's shift: logits[:, :-1] against labels[:, 1:],
// labels == -100 ignored. Returns a 0-dim fp32 tensor on logits' device (differentiable).
at::Tensor lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels);
// Number of labels that count in lm_loss_sum: (labels[:, 1:] != -100).sum(). HF's mean loss = sum / count.
int64_t count_tokens(const at::Tensor& labels);

// A zero flat tensor for `layout`.
at::Tensor new_flat(const StageLayout& layout, at::TensorOptions options);
// HF-style random init, deterministic per (seed, parameter name, element) and so independent of the stage split,
// the thread count, the dtype and the device: Linear/Embedding/PosEmbedding/Head ~ normal(0, std), norms = 1,
// biases = 0, padding = 0 (by ParamKind). Writes into `flat` (no grad), computed on the host (engine/model/init.cpp),
// multithreaded: by `pfor` when given (e.g. the worker's own thread pool), else by ATen's intra-op threads.
using ParallelFor = std::function<void(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn)>;
void init_weights(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat, uint64_t seed,
                  double std = 0.02, const ParallelFor& pfor = {});

}  // namespace mmoc::engine
