// Flat-weight layout of a pipeline stage. Torch-free (usable by the compiler, optimizer, data code).
//
// A stage covers model layers [layer_begin, layer_end): layer 0 = token embedding, 1..L = decoder layers
// (HF decoder index i is model layer i+1), L+1 = final RMSNorm + lm_head. Its parameters live in ONE flat 1-D
// tensor in the fixed order below, each starting at an offset that is a multiple of kParamAlign elements
// (padding, if any, is zero and receives zero gradient):
//   layer 0:      model.embed_tokens.weight                      [V, H]
//   layer i+1:    model.layers.{i}.input_layernorm.weight         [H]
//                 model.layers.{i}.self_attn.q_proj.weight        [heads*hd, H]
//                 model.layers.{i}.self_attn.k_proj.weight        [kv_heads*hd, H]
//                 model.layers.{i}.self_attn.v_proj.weight        [kv_heads*hd, H]
//                 model.layers.{i}.self_attn.o_proj.weight        [H, heads*hd]
//                 model.layers.{i}.post_attention_layernorm.weight [H]
//                 model.layers.{i}.mlp.gate_proj.weight           [F, H]
//                 model.layers.{i}.mlp.up_proj.weight             [F, H]
//                 model.layers.{i}.mlp.down_proj.weight           [H, F]
//   layer L+1:    model.norm.weight                               [H]
//                 lm_head.weight                                  [V, H]   (absent when tied_embeddings)
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ir/plan.hpp"

namespace mmoc::engine {

inline constexpr int64_t kParamAlign = 64;  // elements; every parameter offset is a multiple of this

enum class ParamKind { Embedding, Norm, Linear, Head };

struct ParamInfo {
  std::string name;            // HF name
  std::vector<int64_t> shape;
  int64_t offset = 0;          // element offset in the stage's flat tensor
  int64_t numel = 0;
  int layer = 0;               // model layer (0 = embedding, L+1 = head)
  ParamKind kind = ParamKind::Linear;
};

struct StageLayout {
  int layer_begin = 0, layer_end = 0;  // [begin, end) model layers
  std::vector<ParamInfo> params;       // in flat order
  int64_t numel = 0;                   // flat tensor length (includes alignment padding)
  int64_t param_count = 0;             // sum of params' numel (no padding)
  bool has_embedding() const { return layer_begin == 0; }
  bool has_head(const ir::ModelArch& a) const { return layer_end == a.layers + 2; }
  const ParamInfo* find(const std::string& name) const;  // nullptr when not in this stage
};

// Throws std::invalid_argument for an empty/out-of-range layer range or an inconsistent arch.
StageLayout stage_layout(const ir::ModelArch& arch, int layer_begin, int layer_end);
// Layouts of consecutive stages given their boundaries: bounds = {0, b1, ..., L+2}.
std::vector<StageLayout> stage_layouts(const ir::ModelArch& arch, const std::vector<int>& bounds);
// The whole model as one stage: [0, L+2).
inline StageLayout full_layout(const ir::ModelArch& a) { return stage_layout(a, 0, a.layers + 2); }
// True when lm_head shares model.embed_tokens.weight: a stage holding the head but not the embedding then
// needs the embedding matrix passed to stage_forward (and its gradient summed into the embedding's owner).
bool head_needs_embedding(const ir::ModelArch& arch);
// HF names of all parameters of the model, in flat order (what a checkpoint must hold).
std::vector<std::string> model_param_names(const ir::ModelArch& arch);

}  // namespace mmoc::engine
