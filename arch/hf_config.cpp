#include "engine/io/hf_config.hpp"

#include "engine/io/fsutil.hpp"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace mmoc::io {
using json = nlohmann::json;

namespace {
[[noreturn]] void fail(const std::string& src, const std::string& what) { throw FormatError(src + ": " + what); }

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
std::optional<int64_t> get_token(const json& j, const char* k, const std::string& src, std::optional<int64_t> dflt) {
  if (!j.contains(k)) return dflt;
  const json& v = j[k];
  if (v.is_null()) return std::nullopt;
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_array() && !v.empty() && v[0].is_number_integer()) return v[0].get<int64_t>();
  if (v.is_array() && v.empty()) return std::nullopt;
  fail(src, std::string("'") + k + "' must be an integer or null, got " + v.dump());
}
// rope type in a rope_parameters / rope_scaling object: only "default" (no scaling) is supported.
void check_rope_type(const json& r, const char* key, const std::string& src) {
  if (r.is_null()) return;
  if (!r.is_object()) fail(src, std::string("'") + key + "' must be an object, got " + r.dump());
  std::string t = "default";
  if (r.contains("rope_type") && r["rope_type"].is_string()) t = r["rope_type"].get<std::string>();
  else if (r.contains("type") && r["type"].is_string()) t = r["type"].get<std::string>();
  if (t != "default")
    fail(src, std::string("'") + key + "' has rope_type '" + t + "': only unscaled (default) rotary embeddings are supported");
}
}  // namespace

HfConfig parse_hf_config(const std::string& text, const std::string& src) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(src, std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(src, "not a JSON object");
  if (present(j, "model_type")) {
    if (!j["model_type"].is_string()) fail(src, "'model_type' must be a string");
    std::string mt = j["model_type"].get<std::string>();
    if (mt != "llama") fail(src, "model_type '" + mt + "' is not supported (only 'llama')");
  }
  if (present(j, "hidden_act")) {
    if (!j["hidden_act"].is_string() || j["hidden_act"].get<std::string>() != "silu")
      fail(src, "hidden_act " + j["hidden_act"].dump() + " is not supported (only \"silu\")");
  }
  if (get_bool(j, "attention_bias", src, false)) fail(src, "attention_bias=true is not supported");
  if (get_bool(j, "mlp_bias", src, false)) fail(src, "mlp_bias=true is not supported");

  HfConfig c;
  ir::ModelArch& a = c.arch;
  a.hidden = static_cast<int>(get_int(j, "hidden_size", src, true, 0));
  a.ffn = static_cast<int>(get_int(j, "intermediate_size", src, true, 0));
  a.layers = static_cast<int>(get_int(j, "num_hidden_layers", src, true, 0));
  a.heads = static_cast<int>(get_int(j, "num_attention_heads", src, true, 0));
  a.kv_heads = static_cast<int>(get_int(j, "num_key_value_heads", src, false, a.heads));
  a.vocab = static_cast<int>(get_int(j, "vocab_size", src, true, 0));
  a.norm_eps = get_num(j, "rms_norm_eps", src, 1e-6);
  a.tied_embeddings = get_bool(j, "tie_word_embeddings", src, false);
  if (a.hidden % a.heads != 0)
    fail(src, "hidden_size " + std::to_string(a.hidden) + " is not a multiple of num_attention_heads " + std::to_string(a.heads));
  if (a.heads % a.kv_heads != 0)
    fail(src, "num_attention_heads " + std::to_string(a.heads) + " is not a multiple of num_key_value_heads " +
                  std::to_string(a.kv_heads));
  int64_t hd = get_int(j, "head_dim", src, false, a.hidden / a.heads);
  if (hd != a.hidden / a.heads)
    fail(src, "head_dim " + std::to_string(hd) + " != hidden_size/num_attention_heads = " + std::to_string(a.hidden / a.heads) +
                  " is not supported");
  if ((a.hidden / a.heads) % 2 != 0) fail(src, "head dimension must be even for rotary embeddings");

  // rope theta: transformers 5 puts it in rope_parameters, older configs at the top level.
  double theta = 10000.0;
  bool have_theta = false;
  if (present(j, "rope_parameters")) {
    check_rope_type(j["rope_parameters"], "rope_parameters", src);
    if (present(j["rope_parameters"], "rope_theta")) {
      theta = get_num(j["rope_parameters"], "rope_theta", src, 10000.0);
      have_theta = true;
    }
    if (present(j["rope_parameters"], "partial_rotary_factor") && j["rope_parameters"]["partial_rotary_factor"] != 1.0)
      fail(src, "partial_rotary_factor != 1 is not supported");
  }
  if (present(j, "rope_scaling")) check_rope_type(j["rope_scaling"], "rope_scaling", src);
  if (!have_theta && present(j, "rope_theta")) theta = get_num(j, "rope_theta", src, 10000.0);
  a.rope_theta = theta;

  for (const char* k : {"dtype", "torch_dtype"}) {
    if (present(j, k)) {
      if (!j[k].is_string()) fail(src, std::string("'") + k + "' must be a string");
      c.dtype = j[k].get<std::string>();
      if (c.dtype.rfind("torch.", 0) == 0) c.dtype = c.dtype.substr(6);
      break;
    }
  }
  c.max_position_embeddings = get_int(j, "max_position_embeddings", src, false, 2048);
  c.bos_token_id = get_token(j, "bos_token_id", src, 1);
  c.eos_token_id = get_token(j, "eos_token_id", src, 2);
  c.pad_token_id = get_token(j, "pad_token_id", src, std::nullopt);
  return c;
}

HfConfig read_hf_config(const std::string& path) {
  const bool dir_given = is_directory(path);
  const std::string file = dir_given ? join_path(path, "config.json") : path;
  std::ifstream in(file);
  if (!in) throw std::runtime_error(file + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  HfConfig c = parse_hf_config(ss.str(), file);
  std::string dir = dir_given ? path : parent_dir(path);
  c.arch.name = base_name(real_path(dir.empty() ? std::string(".") : dir));
  return c;
}

namespace {
json token(const std::optional<int64_t>& t) { return t ? json(*t) : json(nullptr); }
}  // namespace

std::string hf_config_json(const HfConfig& c) {
  const ir::ModelArch& a = c.arch;
  std::string dtype = c.dtype.empty() ? "float32" : c.dtype;
  nlohmann::ordered_json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["bos_token_id"] = token(c.bos_token_id);
  j["dtype"] = dtype;
  j["eos_token_id"] = token(c.eos_token_id);
  j["head_dim"] = a.hidden / a.heads;
  j["hidden_act"] = "silu";
  j["hidden_size"] = a.hidden;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = a.ffn;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["mlp_bias"] = false;
  j["model_type"] = "llama";
  j["num_attention_heads"] = a.heads;
  j["num_hidden_layers"] = a.layers;
  j["num_key_value_heads"] = a.kv_heads;
  j["pad_token_id"] = token(c.pad_token_id);
  j["pretraining_tp"] = 1;
  j["rms_norm_eps"] = a.norm_eps;
  j["rope_parameters"] = {{"rope_theta", a.rope_theta}, {"rope_type", "default"}};
  j["rope_scaling"] = nullptr;
  j["rope_theta"] = a.rope_theta;
  j["tie_word_embeddings"] = a.tied_embeddings;
  j["torch_dtype"] = dtype;
  j["use_cache"] = true;
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

void write_hf_config(const std::string& dir, const HfConfig& cfg, bool generation_config) {
  write_file_atomic(join_path(dir, "config.json"), hf_config_json(cfg));
  if (generation_config) write_file_atomic(join_path(dir, "generation_config.json"), hf_generation_config_json(cfg));
}

}  // namespace mmoc::io
