#include "arch/hf_config.hpp"

#include <climits>
#include <cmath>
#include <nlohmann/json.hpp>
#include <vector>

namespace mmoc::arch {
using json = nlohmann::json;

namespace {
[[noreturn]] void fail(const std::string& src, const std::string& what) { throw ConfigError(src + ": " + what); }

bool present(const json& j, const char* k) { return j.contains(k) && !j[k].is_null(); }

int64_t get_int(const json& j, const char* k, const std::string& src, bool required, int64_t dflt, bool positive = true) {
  if (!present(j, k)) {
    if (required) fail(src, std::string("missing '") + k + "'");
    return dflt;
  }
  const json& v = j[k];
  int64_t x = 0;
  if (v.is_number_integer()) x = v.get<int64_t>();
  else if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()) x = static_cast<int64_t>(v.get<double>());
  else fail(src, std::string("'") + k + "' must be an integer, got " + v.dump());
  if (positive && x <= 0) fail(src, std::string("'") + k + "' must be positive, got " + v.dump());
  if (x > INT32_MAX) fail(src, std::string("'") + k + "' is too large: " + v.dump());
  return x;
}
double get_num(const json& j, const char* k, const std::string& src, double dflt) {
  if (!present(j, k)) return dflt;
  if (!j[k].is_number()) fail(src, std::string("'") + k + "' must be a number, got " + j[k].dump());
  double x = j[k].get<double>();
  if (!(x > 0) || !std::isfinite(x)) fail(src, std::string("'") + k + "' must be positive, got " + j[k].dump());
  return x;
}
bool get_bool(const json& j, const char* k, const std::string& src, bool dflt) {
  if (!present(j, k)) return dflt;
  if (!j[k].is_boolean()) fail(src, std::string("'") + k + "' must be true or false, got " + j[k].dump());
  return j[k].get<bool>();
}
std::string get_str(const json& j, const char* k, const std::string& src, const std::string& dflt) {
  if (!present(j, k)) return dflt;
  if (!j[k].is_string()) fail(src, std::string("'") + k + "' must be a string, got " + j[k].dump());
  return j[k].get<std::string>();
}
std::optional<int64_t> get_token(const json& j, const char* k, const std::string& src, std::optional<int64_t> dflt) {
  if (!j.contains(k)) return dflt;
  const json& v = j[k];
  if (v.is_null()) return std::nullopt;
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_array() && !v.empty() && v[0].is_number_integer()) return v[0].get<int64_t>();
  if (v.is_array() && v.empty()) return std::nullopt;
  fail(src, std::string("'") + k + "' must be an integer or null, got " + v.dump());
}
std::optional<int64_t> token_default(long t) { return t < 0 ? std::nullopt : std::optional<int64_t>(t); }

struct ArchName {
  Family f;
  const char* cls;
};
constexpr ArchName kArchitectures[] = {{Family::Llama, "LlamaForCausalLM"},
                                       {Family::Mistral, "MistralForCausalLM"},
                                       {Family::Qwen2, "Qwen2ForCausalLM"},
                                       {Family::Qwen3, "Qwen3ForCausalLM"},
                                       {Family::Gpt2, "GPT2LMHeadModel"}};
std::string architecture_list() {
  std::string s;
  for (const auto& a : kArchitectures) s += (s.empty() ? "" : ", ") + std::string(a.cls);
  return s;
}

Family read_family(const json& j, const std::string& src) {
  std::optional<Family> from_type, from_arch;
  if (present(j, "model_type")) {
    std::string mt = get_str(j, "model_type", src, "");
    Family f;
    if (!parse_family(mt, f)) fail(src, "model_type '" + mt + "' is not supported (supported: " + family_list() + ")");
    from_type = f;
  }
  if (present(j, "architectures")) {
    const json& v = j["architectures"];
    if (!v.is_array()) fail(src, "'architectures' must be a list of class names, got " + v.dump());
    for (const json& e : v) {
      if (!e.is_string()) fail(src, "'architectures' must be a list of class names, got " + v.dump());
      const std::string cls = e.get<std::string>();
      std::optional<Family> f;
      for (const auto& a : kArchitectures)
        if (cls == a.cls) f = a.f;
      if (!f) fail(src, "architectures '" + cls + "' is not supported (supported: " + architecture_list() + ")");
      if (from_type && *f != *from_type)
        fail(src, "architectures '" + cls + "' does not match model_type '" + to_string(*from_type) + "'");
      if (!from_arch) from_arch = f;
    }
  }
  return from_type ? *from_type : from_arch ? *from_arch : Family::Llama;
}

// The rope dict transformers 5 uses: a non-empty rope_scaling wins over rope_parameters (BC), then rope_theta.
void read_rope(const json& j, const std::string& src, Family fam, int64_t max_pos, ir::ModelArch& a) {
  const json* r = nullptr;
  std::string key;
  if (present(j, "rope_scaling") && !(j["rope_scaling"].is_object() && j["rope_scaling"].empty())) {
    r = &j["rope_scaling"];
    key = "rope_scaling";
  } else if (present(j, "rope_parameters")) {
    r = &j["rope_parameters"];
    key = "rope_parameters";
  }
  a.rope_theta = get_num(j, "rope_theta", src, defaults(fam).rope_theta);
  if (!r) return;
  if (!r->is_object()) fail(src, std::string("'") + key + "' must be an object, got " + r->dump());
  const std::string where = std::string(key) + ".";
  auto sub = [&](const char* k) { return where + k; };
  if (present(*r, "rope_theta")) {
    if (!(*r)["rope_theta"].is_number() || !((*r)["rope_theta"].get<double>() > 0))
      fail(src, "'" + sub("rope_theta") + "' must be a positive number, got " + (*r)["rope_theta"].dump());
    a.rope_theta = (*r)["rope_theta"].get<double>();
  }
  if (present(*r, "partial_rotary_factor") && (*r)["partial_rotary_factor"] != 1.0)
    fail(src, "'" + sub("partial_rotary_factor") + "' != 1 is not supported");
  std::string t = "default";
  if (present(*r, "rope_type")) t = get_str(*r, "rope_type", src, "default");
  else if (present(*r, "type")) t = get_str(*r, "type", src, "default");
  if (t == "default") return;
  if (t != "llama3")
    fail(src, "'" + key + "' has rope_type '" + t + "': supported are default and llama3");
  auto num = [&](const char* k) {
    if (!present(*r, k)) fail(src, "'" + key + "' of rope_type llama3 lacks '" + k + "'");
    if (!(*r)[k].is_number()) fail(src, "'" + sub(k) + "' must be a number, got " + (*r)[k].dump());
    return (*r)[k].get<double>();
  };
  a.rope_type = "llama3";
  a.rope_factor = num("factor");
  a.rope_low_freq_factor = num("low_freq_factor");
  a.rope_high_freq_factor = num("high_freq_factor");
  a.rope_original_max_positions = present(*r, "original_max_position_embeddings")
                                      ? (int)get_int(*r, "original_max_position_embeddings", src, true, 0)
                                      : (int)max_pos;
}

// Sliding window of a qwen2/qwen3 config: per layer from layer_types, or from use_sliding_window + max_window_layers
// (transformers' Qwen2Config.__post_init__); the engine supports one kind for all layers.
int qwen_window(const json& j, const std::string& src, int layers) {
  const bool use = get_bool(j, "use_sliding_window", src, false);
  const int64_t window = use ? get_int(j, "sliding_window", src, false, 4096) : 0;
  std::vector<std::string> types;
  if (present(j, "layer_types")) {
    const json& v = j["layer_types"];
    if (!v.is_array() || (int)v.size() != layers)
      fail(src, "'layer_types' must list one entry per layer (" + std::to_string(layers) + ")");
    for (const json& e : v) {
      if (!e.is_string() || (e != "full_attention" && e != "sliding_attention"))
        fail(src, "'layer_types' entries must be \"full_attention\" or \"sliding_attention\", got " + e.dump());
      types.push_back(e.get<std::string>());
    }
  } else {
    const int64_t mwl = get_int(j, "max_window_layers", src, false, 28, false);
    for (int i = 0; i < layers; ++i) types.push_back(window > 0 && i >= mwl ? "sliding_attention" : "full_attention");
  }
  int sliding = 0;
  for (auto& t : types) sliding += t == "sliding_attention";
  if (sliding == 0) return 0;
  if (sliding != layers)
    fail(src, std::to_string(sliding) + " of " + std::to_string(layers) +
                  " layers use sliding-window attention (use_sliding_window/max_window_layers/layer_types): a mixture "
                  "of sliding and full attention layers is not supported");
  if (window <= 0) fail(src, "'layer_types' asks for sliding attention but use_sliding_window is false");
  return (int)window;
}

HfConfig parse_gpt2(const json& j, const std::string& src) {
  HfConfig c;
  ir::ModelArch& a = c.arch;
  a = make_arch(Family::Gpt2);
  const FamilyDefaults d = defaults(Family::Gpt2);
  auto alias = [&](const char* k, const char* k2) { return present(j, k) || !present(j, k2) ? k : k2; };
  a.hidden = (int)get_int(j, alias("n_embd", "hidden_size"), src, true, 0);
  a.layers = (int)get_int(j, alias("n_layer", "num_hidden_layers"), src, true, 0);
  a.heads = (int)get_int(j, alias("n_head", "num_attention_heads"), src, true, 0);
  a.kv_heads = a.heads;
  a.vocab = (int)get_int(j, "vocab_size", src, true, 0);
  a.ffn = (int)get_int(j, "n_inner", src, false, 4 * (int64_t)a.hidden);
  a.max_positions = (int)get_int(j, alias("n_positions", "max_position_embeddings"), src, false, d.max_positions);
  a.norm_eps = get_num(j, "layer_norm_epsilon", src, d.norm_eps);
  a.tied_embeddings = get_bool(j, "tie_word_embeddings", src, d.tied);
  a.rope_theta = d.rope_theta;
  const std::string act = get_str(j, "activation_function", src, "gelu_new");
  if (act != "gelu_new" && act != "gelu_pytorch_tanh")
    fail(src, "activation_function \"" + act + "\" is not supported (gelu_new, gelu_pytorch_tanh)");
  if (!get_bool(j, "scale_attn_weights", src, true)) fail(src, "scale_attn_weights=false is not supported");
  if (get_bool(j, "scale_attn_by_inverse_layer_idx", src, false))
    fail(src, "scale_attn_by_inverse_layer_idx=true is not supported");
  if (get_bool(j, "add_cross_attention", src, false)) fail(src, "add_cross_attention=true is not supported");
  if (a.hidden % a.heads != 0)
    fail(src, "n_embd " + std::to_string(a.hidden) + " is not a multiple of n_head " + std::to_string(a.heads));
  c.max_position_embeddings = a.max_positions;
  c.bos_token_id = get_token(j, "bos_token_id", src, token_default(d.bos));
  c.eos_token_id = get_token(j, "eos_token_id", src, token_default(d.eos));
  return c;
}
}  // namespace

const char* hf_architecture(Family f) {
  for (const auto& a : kArchitectures)
    if (a.f == f) return a.cls;
  return "?";
}

HfConfig parse_hf_config(const std::string& text, const std::string& src) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(src, std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(src, "not a JSON object");
  const Family fam = read_family(j, src);
  const FamilyDefaults d = defaults(fam);
  HfConfig c;
  if (fam == Family::Gpt2) {
    c = parse_gpt2(j, src);
  } else {
    ir::ModelArch& a = c.arch;
    a = make_arch(fam);
    const std::string act = get_str(j, "hidden_act", src, "silu");
    if (act != "silu") fail(src, "hidden_act \"" + act + "\" is not supported (only \"silu\")");
    if (fam == Family::Llama || fam == Family::Qwen3)
      if (get_bool(j, "attention_bias", src, false)) fail(src, "attention_bias=true is not supported");
    if (fam == Family::Llama && get_bool(j, "mlp_bias", src, false)) fail(src, "mlp_bias=true is not supported");
    a.hidden = (int)get_int(j, "hidden_size", src, true, 0);
    a.ffn = (int)get_int(j, "intermediate_size", src, true, 0);
    a.layers = (int)get_int(j, "num_hidden_layers", src, true, 0);
    a.heads = (int)get_int(j, "num_attention_heads", src, true, 0);
    a.kv_heads = (int)get_int(j, "num_key_value_heads", src, false, d.kv_heads > 0 ? d.kv_heads : a.heads);
    a.vocab = (int)get_int(j, "vocab_size", src, true, 0);
    a.norm_eps = get_num(j, "rms_norm_eps", src, d.norm_eps);
    a.tied_embeddings = get_bool(j, "tie_word_embeddings", src, d.tied);
    if (a.heads % a.kv_heads != 0)
      fail(src, "num_attention_heads " + std::to_string(a.heads) + " is not a multiple of num_key_value_heads " +
                    std::to_string(a.kv_heads));
    const int64_t derived = a.hidden % a.heads == 0 ? a.hidden / a.heads : 0;
    const int64_t hd = get_int(j, "head_dim", src, false, d.head_dim > 0 ? d.head_dim : derived);
    if (hd == 0)
      fail(src, "hidden_size " + std::to_string(a.hidden) + " is not a multiple of num_attention_heads " +
                    std::to_string(a.heads) + " and no head_dim is given");
    a.head_dim = hd == derived ? 0 : (int)hd;  // canonical: 0 when hidden / heads
    if (hd % 2 != 0) fail(src, "head_dim " + std::to_string(hd) + " must be even for rotary embeddings");
    c.max_position_embeddings = get_int(j, "max_position_embeddings", src, false, d.max_positions);
    read_rope(j, src, fam, c.max_position_embeddings, a);
    if (fam == Family::Mistral) {
      if (!j.contains("sliding_window")) a.sliding_window = d.sliding_window;
      else a.sliding_window = (int)get_int(j, "sliding_window", src, false, 0);
    } else if (fam == Family::Qwen2 || fam == Family::Qwen3) {
      a.sliding_window = qwen_window(j, src, a.layers);
    }
    c.bos_token_id = get_token(j, "bos_token_id", src, token_default(d.bos));
    c.eos_token_id = get_token(j, "eos_token_id", src, token_default(d.eos));
  }
  for (const char* k : {"dtype", "torch_dtype"}) {
    if (present(j, k)) {
      c.dtype = get_str(j, k, src, "");
      if (c.dtype.rfind("torch.", 0) == 0) c.dtype = c.dtype.substr(6);
      break;
    }
  }
  c.pad_token_id = get_token(j, "pad_token_id", src, std::nullopt);
  validate(c.arch, src);
  return c;
}

namespace {
json token(const std::optional<int64_t>& t) { return t ? json(*t) : json(nullptr); }

std::string gpt2_config_json(const HfConfig& c, const std::string& dtype) {
  const ir::ModelArch& a = c.arch;
  nlohmann::ordered_json j;
  j["activation_function"] = "gelu_new";
  j["architectures"] = {"GPT2LMHeadModel"};
  j["attn_pdrop"] = 0.1;
  j["bos_token_id"] = token(c.bos_token_id);
  j["dtype"] = dtype;
  j["embd_pdrop"] = 0.1;
  j["eos_token_id"] = token(c.eos_token_id);
  j["initializer_range"] = 0.02;
  j["layer_norm_epsilon"] = a.norm_eps;
  j["model_type"] = "gpt2";
  j["n_embd"] = a.hidden;
  j["n_head"] = a.heads;
  j["n_inner"] = a.ffn;
  j["n_layer"] = a.layers;
  j["n_positions"] = a.max_positions;
  j["pad_token_id"] = token(c.pad_token_id);
  j["reorder_and_upcast_attn"] = false;
  j["resid_pdrop"] = 0.1;
  j["scale_attn_by_inverse_layer_idx"] = false;
  j["scale_attn_weights"] = true;
  j["tie_word_embeddings"] = a.tied_embeddings;
  j["torch_dtype"] = dtype;
  j["use_cache"] = true;
  j["vocab_size"] = a.vocab;
  return j.dump(2) + "\n";
}
}  // namespace

std::string hf_config_json(const HfConfig& c) {
  const ir::ModelArch& a = c.arch;
  const Family fam = family(a);
  const std::string dtype = c.dtype.empty() ? "float32" : c.dtype;
  if (fam == Family::Gpt2) return gpt2_config_json(c, dtype);
  nlohmann::ordered_json rope = {{"rope_theta", a.rope_theta}, {"rope_type", a.rope_type}};
  nlohmann::ordered_json scaling = nullptr;
  if (a.rope_type == "llama3") {
    scaling = {{"factor", a.rope_factor},
               {"high_freq_factor", a.rope_high_freq_factor},
               {"low_freq_factor", a.rope_low_freq_factor},
               {"original_max_position_embeddings", a.rope_original_max_positions},
               {"rope_type", "llama3"}};
    rope = scaling;
    rope["rope_theta"] = a.rope_theta;
  }
  nlohmann::ordered_json j;
  j["architectures"] = {hf_architecture(fam)};
  if (fam == Family::Llama || fam == Family::Qwen3) j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["bos_token_id"] = token(c.bos_token_id);
  j["dtype"] = dtype;
  j["eos_token_id"] = token(c.eos_token_id);
  j["head_dim"] = head_dim(a);
  j["hidden_act"] = "silu";
  j["hidden_size"] = a.hidden;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = a.ffn;
  j["max_position_embeddings"] = c.max_position_embeddings;
  if (fam == Family::Qwen2 || fam == Family::Qwen3) j["max_window_layers"] = 0;
  if (fam == Family::Llama) j["mlp_bias"] = false;
  j["model_type"] = to_string(fam);
  j["num_attention_heads"] = a.heads;
  j["num_hidden_layers"] = a.layers;
  j["num_key_value_heads"] = a.kv_heads;
  j["pad_token_id"] = token(c.pad_token_id);
  if (fam == Family::Llama) j["pretraining_tp"] = 1;
  j["rms_norm_eps"] = a.norm_eps;
  j["rope_parameters"] = rope;
  j["rope_scaling"] = scaling;
  j["rope_theta"] = a.rope_theta;
  if (fam != Family::Llama) j["sliding_window"] = a.sliding_window > 0 ? json(a.sliding_window) : json(nullptr);
  j["tie_word_embeddings"] = a.tied_embeddings;
  j["torch_dtype"] = dtype;
  j["use_cache"] = true;
  if (fam == Family::Qwen2 || fam == Family::Qwen3) j["use_sliding_window"] = a.sliding_window > 0;
  j["vocab_size"] = a.vocab;
  return j.dump(2) + "\n";
}

std::string hf_generation_config_json(const HfConfig& c) {
  nlohmann::ordered_json j;
  j["_from_model_config"] = true;
  j["bos_token_id"] = token(c.bos_token_id);
  j["eos_token_id"] = token(c.eos_token_id);
  if (c.pad_token_id) j["pad_token_id"] = *c.pad_token_id;
  return j.dump(2) + "\n";
}

}  // namespace mmoc::arch
