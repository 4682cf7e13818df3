#include "arch/arch.hpp"

#include <cmath>
#include <cstdio>

namespace mmoc::arch {

namespace {
struct FamilyName {
  Family f;
  const char* name;
};
constexpr FamilyName kFamilies[] = {{Family::Llama, "llama"},
                                    {Family::Mistral, "mistral"},
                                    {Family::Qwen2, "qwen2"},
                                    {Family::Qwen3, "qwen3"},
                                    {Family::Gpt2, "gpt2"}};
}  // namespace

const char* to_string(Family f) {
  for (const auto& x : kFamilies)
    if (x.f == f) return x.name;
  return "?";
}

std::string family_list() {
  std::string s;
  for (const auto& x : kFamilies) s += (s.empty() ? "" : ", ") + std::string(x.name);
  return s;
}

bool parse_family(const std::string& name, Family& out) {
  for (const auto& x : kFamilies)
    if (name == x.name) {
      out = x.f;
      return true;
    }
  return false;
}

Family family(const ir::ModelArch& a) {
  Family f;
  if (!parse_family(a.family, f))
    throw ConfigError("model family '" + a.family + "' is not supported (supported: " + family_list() + ")");
  return f;
}

LayerKind layer_kind(const ir::ModelArch& a) { return family(a) == Family::Gpt2 ? LayerKind::Gpt2 : LayerKind::Llama; }

int head_dim(const ir::ModelArch& a) { return a.head_dim > 0 ? a.head_dim : (a.heads > 0 ? a.hidden / a.heads : 0); }

// Values from transformers 5.17's configuration_<family>.py (class attribute defaults and __post_init__).
FamilyDefaults defaults(Family f) {
  switch (f) {
    case Family::Llama: return {1e-6, 10000.0, false, 0, 0, 0, 2048, 1, 2};
    case Family::Mistral: return {1e-6, 10000.0, false, 8, 0, 4096, 4096 * 32, 1, 2};
    case Family::Qwen2: return {1e-6, 10000.0, false, 32, 0, 0, 32768, -1, -1};
    case Family::Qwen3: return {1e-6, 10000.0, false, 32, 128, 0, 32768, -1, -1};
    case Family::Gpt2: return {1e-5, 10000.0, true, 0, 0, 0, 1024, 50256, 50256};
  }
  return {1e-6, 10000.0, false, 0, 0, 0, 2048, -1, -1};
}

ir::ModelArch make_arch(Family f) {
  ir::ModelArch a;
  a.family = to_string(f);
  a.norm_eps = defaults(f).norm_eps;
  a.rope_theta = defaults(f).rope_theta;
  a.tied_embeddings = defaults(f).tied;
  a.qkv_bias = f == Family::Qwen2;
  a.qk_norm = f == Family::Qwen3;
  return a;
}

void validate(const ir::ModelArch& a, const std::string& where) {
  auto need = [&](bool ok, const std::string& msg) {
    if (!ok) throw ConfigError(where + ": " + msg);
  };
  Family f;
  need(parse_family(a.family, f), "family '" + a.family + "' is not supported (supported: " + family_list() + ")");
  need(a.layers >= 1, "layers must be >= 1");
  need(a.hidden >= 1 && a.ffn >= 1 && a.vocab >= 1, "hidden, ffn and vocab must be >= 1");
  need(a.heads >= 1 && a.kv_heads >= 1, "heads and kv_heads must be >= 1");
  need(a.head_dim >= 0, "head_dim must be >= 0");
  if (a.head_dim == 0)
    need(a.hidden % a.heads == 0, "hidden (" + std::to_string(a.hidden) + ") must be divisible by heads (" +
                                      std::to_string(a.heads) + ") unless head_dim is given");
  need(a.heads % a.kv_heads == 0,
       "heads (" + std::to_string(a.heads) + ") must be divisible by kv_heads (" + std::to_string(a.kv_heads) + ")");
  need(a.norm_eps > 0 && std::isfinite(a.norm_eps), "norm_eps must be > 0");
  need(a.sliding_window >= 0, "sliding_window must be >= 0");
  need(a.qkv_bias == (f == Family::Qwen2),
       std::string("qkv_bias is ") + (a.qkv_bias ? "on" : "off") + " but family " + a.family + " has it " +
           (f == Family::Qwen2 ? "on" : "off"));
  need(a.qk_norm == (f == Family::Qwen3),
       std::string("qk_norm is ") + (a.qk_norm ? "on" : "off") + " but family " + a.family + " has it " +
           (f == Family::Qwen3 ? "on" : "off"));
  if (f == Family::Gpt2) {
    need(a.max_positions >= 1, "family gpt2 needs max_positions (n_positions) >= 1");
    need(a.kv_heads == a.heads, "family gpt2 has no grouped-query attention (kv_heads must equal heads)");
    need(a.head_dim == 0 || a.head_dim * a.heads == a.hidden, "family gpt2 has head_dim = hidden / heads");
    need(a.sliding_window == 0, "family gpt2 has no sliding-window attention");
    need(a.rope_type == "default", "family gpt2 has no rotary embeddings (rope_type must be default)");
    return;
  }
  need(a.max_positions == 0, "max_positions (learned position embeddings) belongs to family gpt2, not " + a.family);
  need(head_dim(a) % 2 == 0, "head dimension " + std::to_string(head_dim(a)) + " must be even for rotary embeddings");
  need(a.rope_theta > 0 && std::isfinite(a.rope_theta), "rope_theta must be > 0");
  if (a.rope_type == "default") {
    need(a.rope_factor == 0 && a.rope_low_freq_factor == 0 && a.rope_high_freq_factor == 0 &&
             a.rope_original_max_positions == 0,
         "rope scaling values are set but rope_type is default");
  } else if (a.rope_type == "llama3") {
    need(a.rope_factor > 0, "rope_type llama3 needs factor > 0");
    need(a.rope_low_freq_factor > 0, "rope_type llama3 needs low_freq_factor > 0");
    need(a.rope_high_freq_factor > a.rope_low_freq_factor, "rope_type llama3 needs high_freq_factor > low_freq_factor");
    need(a.rope_original_max_positions >= 1, "rope_type llama3 needs original_max_position_embeddings >= 1");
  } else {
    need(false, "rope_type '" + a.rope_type + "' is not supported (default, llama3)");
  }
}

std::string differences(const ir::ModelArch& got, const ir::ModelArch& want) {
  std::string out;
  auto add = [&](const char* key, const std::string& g, const std::string& w) {
    if (g != w) out += (out.empty() ? "" : ", ") + std::string(key) + " " + g + " (plan: " + w + ")";
  };
  auto num = [](double x) {
    char b[40];
    std::snprintf(b, sizeof b, "%.10g", x);
    return std::string(b);
  };
  auto i = [](long x) { return std::to_string(x); };
  add("family", got.family, want.family);
  add("num_hidden_layers", i(got.layers), i(want.layers));
  add("hidden_size", i(got.hidden), i(want.hidden));
  add("intermediate_size", i(got.ffn), i(want.ffn));
  add("num_attention_heads", i(got.heads), i(want.heads));
  add("num_key_value_heads", i(got.kv_heads), i(want.kv_heads));
  add("head_dim", i(head_dim(got)), i(head_dim(want)));
  add("vocab_size", i(got.vocab), i(want.vocab));
  add("rope_theta", num(got.rope_theta), num(want.rope_theta));
  add("norm_eps", num(got.norm_eps), num(want.norm_eps));
  add("tie_word_embeddings", i(got.tied_embeddings), i(want.tied_embeddings));
  add("max_positions", i(got.max_positions), i(want.max_positions));
  add("sliding_window", i(got.sliding_window), i(want.sliding_window));
  add("qkv_bias", i(got.qkv_bias), i(want.qkv_bias));
  add("qk_norm", i(got.qk_norm), i(want.qk_norm));
  add("rope_type", got.rope_type, want.rope_type);
  add("rope factor", num(got.rope_factor), num(want.rope_factor));
  add("rope low_freq_factor", num(got.rope_low_freq_factor), num(want.rope_low_freq_factor));
  add("rope high_freq_factor", num(got.rope_high_freq_factor), num(want.rope_high_freq_factor));
  add("rope original_max_position_embeddings", i(got.rope_original_max_positions), i(want.rope_original_max_positions));
  return out;
}

}  // namespace mmoc::arch
