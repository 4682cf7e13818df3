// Model families as data. An ir::ModelArch names its family and carries the family's features; this header says what
// they mean, what HF's config classes default them to, and checks a description once for every reader (mmoc's model
// JSON, HF config.json, plans). Torch-free; depends on ir/ only.
//
// Two layer kinds:
//  - LLaMA-style decoder layer (families llama, mistral, qwen2, qwen3): RMSNorm, rotary positions, SwiGLU MLP, no
//    biases, grouped-query attention; features: qkv_bias (qwen2: bias on q/k/v), qk_norm (qwen3: per-head RMSNorm of q
//    and k before the rotation), head_dim independent of hidden/heads, sliding_window (mistral), rope scaling (llama3).
//  - GPT-2 block (family gpt2): LayerNorm with bias, learned absolute positions (max_positions rows), fused q/k/v
//    projection, GELU (tanh approximation) MLP, a bias on every projection, lm_head tied to the token embedding.
#pragma once
#include <stdexcept>
#include <string>

#include "ir/plan.hpp"

namespace mmoc::arch {

// An invalid or unsupported model description. The message starts with the source (file) and names the field.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Family { Llama, Mistral, Qwen2, Qwen3, Gpt2 };
enum class LayerKind { Llama, Gpt2 };

const char* to_string(Family);
std::string family_list();                                           // "llama, mistral, qwen2, qwen3, gpt2"
bool parse_family(const std::string& name, Family& out);             // false for an unknown name
Family family(const ir::ModelArch&);                                 // throws ConfigError for an unknown name
LayerKind layer_kind(const ir::ModelArch&);
inline bool is_gpt2(const ir::ModelArch& a) { return layer_kind(a) == LayerKind::Gpt2; }

// Attention geometry: head_dim is a.head_dim, or hidden / heads when that is 0.
int head_dim(const ir::ModelArch&);
inline int64_t q_dim(const ir::ModelArch& a) { return (int64_t)a.heads * head_dim(a); }
inline int64_t kv_dim(const ir::ModelArch& a) { return (int64_t)a.kv_heads * head_dim(a); }

// Defaults of HF's config classes (transformers 5.17) for the keys a config.json may leave out.
struct FamilyDefaults {
  double norm_eps;          // rms_norm_eps / layer_norm_epsilon
  double rope_theta;        // rope_theta (rotary families)
  bool tied;                // tie_word_embeddings
  int kv_heads;             // num_key_value_heads; 0 = num_attention_heads
  int head_dim;             // 0 = hidden_size / num_attention_heads
  int sliding_window;       // mistral: 4096 when the key is absent (null = none)
  int max_positions;        // max_position_embeddings / n_positions
  long bos, eos;            // -1 = none
};
FamilyDefaults defaults(Family);

// A ModelArch of family `f` with its fixed features set (qkv_bias for qwen2, qk_norm for qwen3) and the family's
// default norm_eps and rope_theta; shape fields 0.
ir::ModelArch make_arch(Family f);

// Throws ConfigError("<where>: <problem>") unless `a` describes a model the engine computes: positive sizes,
// heads divisible by kv_heads, head_dim even for rotary, features that belong to the family, consistent rope scaling.
void validate(const ir::ModelArch& a, const std::string& where);

// The fields in which `got` differs from `want` (the name aside), as "key got (plan: want), ..."; "" when equal.
std::string differences(const ir::ModelArch& got, const ir::ModelArch& want);

}  // namespace mmoc::arch
