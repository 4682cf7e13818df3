// Flat-weight layout of a pipeline stage, for every model family (arch/arch.hpp). Torch-free (used by the compiler's
// cost model, the optimizer, the engine and the checkpoint code).
//
// A stage covers model layers [layer_begin, layer_end): layer 0 = token (and position) embedding, 1..L = decoder
// layers (HF decoder index i is model layer i+1), L+1 = final norm + lm_head. Its parameters live in ONE flat 1-D
// tensor in the fixed order below, each starting at an offset that is a multiple of kParamAlign elements (padding,
// if any, is zero and receives zero gradient). Names are HF's; shapes are [out, in] for every projection.
//
// LLaMA-style families (llama, mistral, qwen2, qwen3), P = "model.layers.{i}.":
//   layer 0:    model.embed_tokens.weight                      [V, H]
//   layer i+1:  P input_layernorm.weight                        [H]
//               P self_attn.q_proj.weight                       [heads*hd, H]
//               P self_attn.k_proj.weight                       [kv_heads*hd, H]
//               P self_attn.v_proj.weight                       [kv_heads*hd, H]
//               P self_attn.{q,k,v}_proj.bias                   [heads*hd], [kv_heads*hd], [kv_heads*hd]  (qwen2)
//               P self_attn.q_norm.weight, k_norm.weight        [hd], [hd]                               (qwen3)
//               P self_attn.o_proj.weight                       [H, heads*hd]
//               P post_attention_layernorm.weight               [H]
//               P mlp.gate_proj.weight, up_proj.weight          [F, H] each
//               P mlp.down_proj.weight                          [H, F]
//   layer L+1:  model.norm.weight                               [H]
//               lm_head.weight                                  [V, H]   (absent when tied_embeddings)
// GPT-2, P = "transformer.h.{i}.": HF stores its Conv1D weights as [in, out]; the flat tensor holds their transpose
// ([out, in], `transposed` below), so that every family's projections are used the same way.
//   layer 0:    transformer.wte.weight [V, H], transformer.wpe.weight [max_positions, H]
//   layer i+1:  P ln_1.weight, P ln_1.bias                      [H] each
//               P attn.c_attn.weight [3H, H], P attn.c_attn.bias [3H]   (q, k, v rows in that order)
//               P attn.c_proj.weight [H, H], P attn.c_proj.bias [H]
//               P ln_2.weight, P ln_2.bias                      [H] each
//               P mlp.c_fc.weight [F, H], P mlp.c_fc.bias [F]
//               P mlp.c_proj.weight [H, F], P mlp.c_proj.bias [H]
//   layer L+1:  transformer.ln_f.weight, transformer.ln_f.bias [H] each; lm_head.weight [V, H] (absent when tied)
//
// Tensor parallelism (Megatron-LM): stage_layout(arch, begin, end, tp_rank, tp_size) gives rank tp_rank's shard of
// every parameter, in the same order, in its own flat tensor (the same numel on every rank). In the flat ([out, in])
// orientation:
//   column-parallel (output rows split): q/k/v by query heads and kv heads (GQA), their biases with them, gate/up,
//     GPT-2's c_fc and its bias; GPT-2's fused c_attn (and its bias) takes the rank's rows of each of q, k and v;
//   row-parallel (input columns split): o_proj, down_proj, GPT-2's attn/mlp c_proj; their biases are replicated and
//     added once, after the sum over ranks;
//   vocab-parallel (rows split by vocabulary): the token embedding and lm_head, the vocabulary padded up to a
//     multiple of tp (tp_vocab): the padding rows are zero, get zero gradient and are excluded from the loss;
//   replicated: every norm (Qwen3's per-head q_norm/k_norm too), GPT-2's position embeddings, row-parallel biases.
// tp must divide heads, kv_heads and ffn (check_tp). Each shard records its part of the whole tensor (ParamInfo::
// shard: the split dimension and the pieces of the whole tensor it holds), so load, save, init and resharding map
// shard <-> whole tensor. tp_size 1 gives exactly the unsharded layout.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "arch/arch.hpp"
#include "ir/plan.hpp"

namespace mmoc::arch {

inline constexpr int64_t kParamAlign = 64;  // elements; every parameter offset is a multiple of this

// What a parameter is, for initialisation and optimizers: Linear/Embedding/PosEmbedding/Head are random
// (HF: normal(0, initializer_range)), Norm weights are 1, Bias (projection and LayerNorm biases) are 0.
enum class ParamKind { Embedding, PosEmbedding, Norm, Bias, Linear, Head };

// What a parameter does in the layer: the model code picks its tensors by role, not by name.
enum class Role {
  Embed, PosEmbed,                       // layer 0
  AttnNorm, AttnNormBias,                // input_layernorm / ln_1
  Q, K, V, QKV,                          // projections (QKV: GPT-2's fused c_attn)
  QBias, KBias, VBias, QKVBias,
  QNorm, KNorm,                          // qwen3
  O, OBias,
  MlpNorm, MlpNormBias,                  // post_attention_layernorm / ln_2
  Gate, Up, UpBias, Down, DownBias,      // GPT-2: c_fc = Up, mlp.c_proj = Down
  FinalNorm, FinalNormBias, Head,        // layer L+1
};
const char* to_string(Role);

// How tensor parallelism splits a parameter (see the header comment).
enum class TpSplit { Replicated, Column, Row, Vocab };
const char* to_string(TpSplit);

// Rows [start, start + length) of the whole tensor along the split dimension.
struct ShardPiece {
  int64_t start = 0, length = 0;
  bool operator==(const ShardPiece&) const = default;
};
// A rank's part of a parameter. Along `dim` (flat orientation) the shard holds the pieces one after the other, then
// zero padding rows up to its size (only the vocabulary shards of the last ranks have them); every other dimension is
// whole. dim -1: the shard is the whole tensor (tp 1, or a replicated parameter).
struct Shard {
  int dim = -1;
  std::vector<ShardPiece> pieces;
  std::vector<int64_t> full_shape;  // the whole parameter (flat orientation)
  bool sharded() const { return dim >= 0; }
  int64_t rows() const;             // sum of the pieces' lengths (without padding)
};

struct ParamInfo {
  std::string name;            // HF name
  std::vector<int64_t> shape;  // in the flat tensor (the shard's shape under tensor parallelism)
  int64_t offset = 0;          // element offset in the stage's flat tensor
  int64_t numel = 0;
  int layer = 0;               // model layer (0 = embedding, L+1 = head)
  ParamKind kind = ParamKind::Linear;
  Role role = Role::Embed;
  bool transposed = false;     // HF's file holds the transpose (GPT-2 Conv1D): its shape is hf_shape()
  TpSplit split = TpSplit::Replicated;  // how tensor parallelism splits it (also set for tp 1)
  Shard shard;                 // the part of the whole tensor this layout holds
  std::vector<int64_t> hf_shape() const { return transposed ? std::vector<int64_t>{shape[1], shape[0]} : shape; }
  // The whole tensor's shape as HF stores it, and the split dimension in that orientation (-1 when not sharded).
  std::vector<int64_t> full_hf_shape() const;
  int hf_dim() const { return shard.dim < 0 ? -1 : transposed ? 1 - shard.dim : shard.dim; }
};

struct StageLayout {
  int layer_begin = 0, layer_end = 0;  // [begin, end) model layers
  int tp_rank = 0, tp_size = 1;        // tensor-parallel shard tp_rank of tp_size (1: unsharded)
  std::vector<ParamInfo> params;       // in flat order
  int64_t numel = 0;                   // flat tensor length (includes alignment padding)
  int64_t param_count = 0;             // sum of params' numel (no padding)
  bool has_embedding() const { return layer_begin == 0; }
  bool has_head(const ir::ModelArch& a) const { return layer_end == a.layers + 2; }
  // A parameter every tensor-parallel rank holds whole (tp_size > 1 and not split).
  bool replicated(const ParamInfo& p) const { return tp_size > 1 && !p.shard.sharded(); }
  const ParamInfo* find(const std::string& name) const;  // nullptr when not in this stage
  const ParamInfo* find(int layer, Role role) const;     // nullptr when not in this stage
};

// Throws ConfigError("<where>: tp N does not divide ...") unless tensor parallelism of degree tp_size can split the
// model: tp_size >= 1 dividing heads, kv_heads (whole key/value heads per rank) and ffn.
void check_tp(const ir::ModelArch& arch, int tp_size, const std::string& where);
// The vocabulary shard of a rank: the vocabulary is padded to `padded` (a multiple of tp_size), rank r holds rows
// [begin, begin + rows) of it, of which the first `valid` are real tokens (the rest padding).
struct TpVocab {
  int64_t padded = 0, rows = 0, begin = 0, valid = 0;
};
TpVocab tp_vocab(int64_t vocab, int tp_rank, int tp_size);

// Throws std::invalid_argument for an empty/out-of-range layer range, an invalid arch (arch::validate's message), a
// tp_rank outside [0, tp_size) or a tp_size the model cannot be split by (check_tp's message).
StageLayout stage_layout(const ir::ModelArch& arch, int layer_begin, int layer_end, int tp_rank = 0, int tp_size = 1);
// Layouts of consecutive stages given their boundaries: bounds = {0, b1, ..., L+2}.
std::vector<StageLayout> stage_layouts(const ir::ModelArch& arch, const std::vector<int>& bounds, int tp_rank = 0,
                                       int tp_size = 1);
// The whole model as one stage: [0, L+2).
inline StageLayout full_layout(const ir::ModelArch& a, int tp_rank = 0, int tp_size = 1) {
  return stage_layout(a, 0, a.layers + 2, tp_rank, tp_size);
}
// Parameters (elements, no alignment padding; vocabulary padding included) of model layer `layer` on one
// tensor-parallel rank: what the cost model counts.
int64_t layer_param_count(const ir::ModelArch& arch, int layer, int tp_size = 1);

// Flat ranges [begin, end) whose squares this rank adds to the global gradient norm (a sum over all ranks): every
// parameter at tp 1; under tensor parallelism the split parameters on every rank and the replicated ones on tp rank 0
// only (so each element of the model counts once).
std::vector<std::pair<int64_t, int64_t>> grad_norm_ranges(const StageLayout& layout);

// Tied embeddings. When true, lm_head is the token embedding matrix (embedding_name, in layer 0): a stage holding the
// head but not the embedding needs that matrix passed to the model (stage_forward's tied_embedding) and its gradient
// added into the embedding's owner before the optimizer step (one master copy, one optimizer state).
bool head_needs_embedding(const ir::ModelArch& arch);
std::string embedding_name(const ir::ModelArch& arch);  // "model.embed_tokens.weight" / "transformer.wte.weight"
// HF names of all parameters of the model, in flat order (what a checkpoint must hold).
std::vector<std::string> model_param_names(const ir::ModelArch& arch);

// Checkpoint names beyond the parameters. A tensor the loader may skip: rotary inv_freq buffers, GPT-2's causal-mask
// buffers (h.{i}.attn.bias / attn.masked_bias) in older files.
bool ignorable_hf_tensor(const ir::ModelArch& arch, const std::string& name);
// The name under which older files store a parameter: GPT-2 checkpoints written from GPT2Model lack "transformer."
// ("h.0.ln_1.weight"); "" when the family has no such spelling.
std::string legacy_hf_name(const ir::ModelArch& arch, const std::string& name);

}  // namespace mmoc::arch
