// Model, hardware and job descriptions: loading, validation, per-layer size/FLOP formulas.
// Formulas are documented next to each function and in configs/README.md.
#include "compiler/spec.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <unistd.h>

#ifndef MMOC_SOURCE_CONFIGS
#define MMOC_SOURCE_CONFIGS "configs"
#endif

namespace mmoc {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// ---- JSON reading with unknown-key and type checks -----------------------------------------
std::string type_name(const json& j) {
  if (j.is_number_integer()) return "integer";
  if (j.is_number()) return "number";
  return j.type_name();
}

json parse_json_text(const std::string& text, const std::string& origin) {
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw InputError(origin + ": invalid JSON: " + e.what());
  }
}

std::string read_file_or_throw(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot read " + what + " file '" + path + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Reads fields of one JSON object; finish() rejects keys nobody asked for.
class ObjReader {
 public:
  ObjReader(const json& j, std::string where) : j_(j), where_(std::move(where)) {
    if (!j_.is_object()) throw InputError(where_ + ": expected a JSON object, got " + type_name(j_));
  }
  bool has(const char* k) { seen_.insert(k); return j_.contains(k); }
  const json* get(const char* k) {
    seen_.insert(k);
    auto it = j_.find(k);
    return it == j_.end() ? nullptr : &*it;
  }
  [[noreturn]] void bad(const char* k, const char* want, const json& v) {
    throw InputError(where_ + ": key '" + k + "' must be " + want + ", got " + type_name(v) + " " + v.dump());
  }
  void int_(const char* k, int& out, int min_value = INT32_MIN) {
    if (auto* v = get(k)) {
      if (!v->is_number_integer()) bad(k, "an integer", *v);
      int64_t x = v->get<int64_t>();
      if (x < min_value || x > INT32_MAX)
        throw InputError(where_ + ": key '" + k + "' = " + std::to_string(x) + " is out of range (minimum " + std::to_string(min_value) + ")");
      out = (int)x;
    }
  }
  void num(const char* k, double& out, double min_value = -INFINITY) {
    if (auto* v = get(k)) {
      if (!v->is_number()) bad(k, "a number", *v);
      double x = v->get<double>();
      if (!std::isfinite(x) || x < min_value)
        throw InputError(where_ + ": key '" + k + "' = " + v->dump() + " is out of range (minimum " + json(min_value).dump() + ")");
      out = x;
    }
  }
  void str(const char* k, std::string& out, std::initializer_list<const char*> allowed = {}) {
    if (auto* v = get(k)) {
      if (!v->is_string()) bad(k, "a string", *v);
      out = v->get<std::string>();
      check_allowed(k, out, allowed);
    }
  }
  void check_allowed(const char* k, const std::string& val, std::initializer_list<const char*> allowed) {
    if (allowed.size() == 0) return;
    std::string list;
    for (const char* a : allowed) {
      if (val == a) return;
      list += (list.empty() ? "" : ", ") + std::string(a);
    }
    throw InputError(where_ + ": key '" + k + "' = \"" + val + "\" is not one of: " + list);
  }
  void boolean(const char* k, bool& out) {
    if (auto* v = get(k)) {
      if (!v->is_boolean()) bad(k, "true or false", *v);
      out = v->get<bool>();
    }
  }
  // "comment": a string or a list of strings, ignored.
  void comment() {
    if (auto* v = get("comment")) {
      bool ok = v->is_string();
      if (v->is_array()) {
        ok = true;
        for (auto& e : *v) ok = ok && e.is_string();
      }
      if (!ok) bad("comment", "a string or a list of strings", *v);
    }
  }
  void finish() {
    for (auto it = j_.begin(); it != j_.end(); ++it)
      if (!seen_.count(it.key())) throw InputError(where_ + ": unknown key '" + it.key() + "'");
  }
  const std::string& where() const { return where_; }

 private:
  const json& j_;
  std::string where_;
  std::set<std::string> seen_;
};

bool looks_like_path(const std::string& s) {
  return s.find('/') != std::string::npos || (s.size() > 5 && s.substr(s.size() - 5) == ".json");
}

std::string resolve_config(const std::string& name_or_path, const std::string& configs_dir, const std::string& sub,
                           const char* what) {
  if (name_or_path.empty()) throw InputError(std::string("no ") + what + " given");
  if (looks_like_path(name_or_path)) {
    if (!fs::exists(name_or_path)) throw InputError(std::string(what) + " file '" + name_or_path + "' does not exist");
    return name_or_path;
  }
  fs::path p = fs::path(configs_dir) / sub / (name_or_path + ".json");
  if (fs::exists(p)) return p.string();
  auto names = list_configs(configs_dir, sub);
  std::string list;
  for (auto& n : names) list += (list.empty() ? "" : ", ") + n;
  throw InputError(std::string("unknown ") + what + " '" + name_or_path + "' (looked in " + (fs::path(configs_dir) / sub).string() +
                   "); available: " + (list.empty() ? "(none)" : list));
}

}  // namespace

std::vector<std::string> list_configs(const std::string& configs_dir, const std::string& sub) {
  std::vector<std::string> names;
  std::error_code ec;
  fs::path dir = fs::path(configs_dir) / sub;
  if (!fs::is_directory(dir, ec)) return names;
  for (auto& e : fs::directory_iterator(dir, ec))
    if (e.path().extension() == ".json") names.push_back(e.path().stem().string());
  std::sort(names.begin(), names.end());
  return names;
}

// ---- model ---------------------------------------------------------------------------------
namespace {
void validate_model(const ModelSpec& m, const std::string& where) {
  auto need = [&](bool ok, const std::string& msg) {
    if (!ok) throw InputError(where + ": " + msg);
  };
  need(m.layers >= 1, "layers must be >= 1");
  need(m.hidden >= 1 && m.ffn >= 1 && m.vocab >= 1, "hidden, ffn and vocab must be >= 1");
  need(m.heads >= 1 && m.kv_heads >= 1, "heads and kv_heads must be >= 1");
  need(m.hidden % m.heads == 0, "hidden (" + std::to_string(m.hidden) + ") must be divisible by heads (" + std::to_string(m.heads) + ")");
  need(m.heads % m.kv_heads == 0, "heads (" + std::to_string(m.heads) + ") must be divisible by kv_heads (" + std::to_string(m.kv_heads) + ")");
  need(m.max_seq >= 1, "max_seq must be >= 1");
  need(m.norm_eps > 0, "norm_eps must be > 0");
  need(m.rope_theta > 0, "rope_theta must be > 0");
}

// HuggingFace LlamaForCausalLM config.json: known keys mapped, the rest ignored (HF configs carry many).
ModelSpec from_hf_config(const json& j, const std::string& origin) {
  ModelSpec m;
  auto geti = [&](const char* k, int& out, bool required) {
    auto it = j.find(k);
    if (it == j.end() || it->is_null()) {
      if (required) throw InputError(origin + ": HF config lacks '" + k + "'");
      return;
    }
    if (!it->is_number_integer()) throw InputError(origin + ": HF key '" + std::string(k) + "' must be an integer");
    out = it->get<int>();
  };
  geti("num_hidden_layers", m.layers, true);
  geti("hidden_size", m.hidden, true);
  geti("intermediate_size", m.ffn, true);
  geti("num_attention_heads", m.heads, true);
  m.kv_heads = m.heads;
  geti("num_key_value_heads", m.kv_heads, false);
  geti("vocab_size", m.vocab, true);
  geti("max_position_embeddings", m.max_seq, false);
  if (j.contains("head_dim") && j["head_dim"].is_number_integer() && j["head_dim"].get<int>() * m.heads != m.hidden)
    throw InputError(origin + ": head_dim * num_attention_heads != hidden_size is not supported");
  if (j.contains("rms_norm_eps") && j["rms_norm_eps"].is_number()) m.norm_eps = j["rms_norm_eps"].get<double>();
  if (j.contains("rope_theta") && j["rope_theta"].is_number()) m.rope_theta = j["rope_theta"].get<double>();
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    auto& rp = j["rope_parameters"];
    if (rp.contains("rope_theta") && rp["rope_theta"].is_number()) m.rope_theta = rp["rope_theta"].get<double>();
  }
  if (j.contains("tie_word_embeddings") && j["tie_word_embeddings"].is_boolean()) m.tied_embeddings = j["tie_word_embeddings"].get<bool>();
  if (j.contains("model_type") && j["model_type"].is_string() && j["model_type"].get<std::string>() != "llama")
    throw InputError(origin + ": model_type '" + j["model_type"].get<std::string>() + "' is not supported (llama only)");
  if (j.contains("name_or_path") && j["name_or_path"].is_string()) m.name = j["name_or_path"].get<std::string>();
  return m;
}
}  // namespace

ModelSpec parse_model(const std::string& json_text, const std::string& origin) {
  json j = parse_json_text(json_text, origin);
  if (j.is_object() && j.contains("hidden_size")) {
    ModelSpec m = from_hf_config(j, origin);
    validate_model(m, origin);
    return m;
  }
  ModelSpec m;
  ObjReader r(j, origin);
  r.comment();
  r.str("name", m.name);
  r.int_("layers", m.layers, 1);
  r.int_("hidden", m.hidden, 1);
  r.int_("ffn", m.ffn, 1);
  r.int_("heads", m.heads, 1);
  r.int_("kv_heads", m.kv_heads, 1);
  r.int_("vocab", m.vocab, 1);
  r.int_("max_seq", m.max_seq, 1);
  r.num("rope_theta", m.rope_theta);
  r.num("norm_eps", m.norm_eps);
  r.boolean("tied_embeddings", m.tied_embeddings);
  for (const char* req : {"layers", "hidden", "ffn", "heads", "vocab"})
    if (!r.has(req)) throw InputError(origin + ": missing required key '" + req + "'");
  if (!r.has("kv_heads")) m.kv_heads = m.heads;
  r.finish();
  validate_model(m, origin);
  return m;
}

ModelSpec load_model(const std::string& name_or_path, const std::string& configs_dir) {
  std::string path = resolve_config(name_or_path, configs_dir, "models", "model");
  ModelSpec m = parse_model(read_file_or_throw(path, "model"), path);
  if (m.name.empty()) {
    fs::path p(path);
    m.name = p.filename() == "config.json" ? p.parent_path().filename().string() : p.stem().string();
  }
  return m;
}

// Parameters per model layer.
//  embedding: vocab*hidden (the tied lm_head weight is counted here);
//  decoder:   q,o: hidden^2 each; k,v: hidden*kv_heads*head_dim each; gate,up,down: hidden*ffn each; 2 RMSNorm weights;
//  head:      final RMSNorm (hidden) + lm_head vocab*hidden (0 when tied).
int64_t ModelSpec::layer_params(int layer) const {
  const int64_t h = hidden, kvd = (int64_t)kv_heads * head_dim();
  if (layer == 0) return (int64_t)vocab * h;
  if (layer >= 1 && layer <= layers) return 2 * h * h + 2 * h * kvd + 3 * h * ffn + 2 * h;
  if (layer == layers + 1) return h + (tied_embeddings ? 0 : (int64_t)vocab * h);
  throw std::out_of_range("layer " + std::to_string(layer) + " out of range 0.." + std::to_string(layers + 1));
}

int64_t ModelSpec::total_params() const {
  int64_t n = 0;
  for (int l = 0; l < num_model_layers(); ++l) n += layer_params(l);
  return n;
}

// Forward FLOPs for one micro-batch of T = mbs*seq tokens.
//  decoder: 2 * (matmul params) * T  +  attention QK^T and AV: 2 matmuls of 2*mbs*seq^2*hidden each = 4*mbs*seq^2*hidden,
//           halved for the causal mask (flash/SDPA kernels skip the masked upper triangle) -> 2*mbs*seq^2*hidden.
//  head:    2*vocab*hidden*T for lm_head (also when tied: the matmul still runs) + ~5 FLOPs per logit for softmax/CE.
//  embedding: a gather, counted as 0 FLOPs (its time is launch overhead and memory traffic).
double ModelSpec::layer_fwd_flops(int layer, int mbs, int seq) const {
  const double T = (double)mbs * seq, h = hidden;
  if (layer == 0) return 0.0;
  if (layer >= 1 && layer <= layers) {
    const double kvd = (double)kv_heads * head_dim();
    const double matmul_params = 2 * h * h + 2 * h * kvd + 3 * h * ffn;
    return 2.0 * matmul_params * T + 2.0 * mbs * (double)seq * seq * h;
  }
  if (layer == layers + 1) return 2.0 * vocab * h * T + 5.0 * vocab * T;
  throw std::out_of_range("layer out of range");
}

// Backward: gradients w.r.t. inputs and weights, each a matmul of forward's size: 2x forward.
double ModelSpec::layer_bwd_flops(int layer, int mbs, int seq) const { return 2.0 * layer_fwd_flops(layer, mbs, seq); }

// Saved-for-backward bytes without recompute (SDPA/flash attention: no seq^2 score matrix is kept), per token, as
// engine/model/model.cpp's decoder keeps them (q/k/v and gate/up are views of the flat weights: no weight copy):
//  decoder: x, norm1(x), attention output, mid residual, norm2 (5*hidden); the fused gate|up output, silu(gate) and
//           silu(gate)*up (4*ffn); and what attention keeps: with MHA the fused qkv output (v is a view of it) plus the
//           rotated q and k (hidden + 2*kv_dim + hidden + kv_dim); with GQA the rotated q and the repeated k and v
//           (3*hidden) -- all times act_bytes; plus fp32 small terms: attention log-sum-exp (heads*4) and two RMSNorm
//           inverse-rms (2*4). For LLaMA-2-7B that is 10*hidden + 4*ffn = ~20.75*hidden elements per token.
//  head:    final-norm input and output (2*hidden*act_bytes + 4) plus the fp32 log-softmax that cross-entropy keeps (vocab*4).
//  embedding: nothing (the token ids are batch(m)).
// recompute=true: 0 (forward keeps only the stage input, counted as the previous layer's output / the batch).
int64_t ModelSpec::layer_stash_bytes(int layer, int mbs, int seq, bool recompute, int act_bytes) const {
  if (recompute) return 0;
  const int64_t T = (int64_t)mbs * seq, h = hidden, kvd = (int64_t)kv_heads * head_dim();
  if (layer == 0) return 0;
  const int64_t attn = kv_heads == heads ? 2 * h + 3 * kvd : 3 * h;
  if (layer >= 1 && layer <= layers) return T * ((5 * h + attn + 4 * (int64_t)ffn) * act_bytes + (int64_t)heads * 4 + 8);
  if (layer == layers + 1) return T * (2 * h * act_bytes + 4 + (int64_t)vocab * 4);
  throw std::out_of_range("layer out of range");
}

// Hidden state mbs*seq*hidden*act_bytes; the head outputs only the loss (0).
int64_t ModelSpec::layer_output_bytes(int layer, int mbs, int seq, int act_bytes) const {
  if (layer == layers + 1) return 0;
  return (int64_t)mbs * seq * hidden * act_bytes;
}

// Transient bytes while the layer runs (beyond its stash and output), per micro-batch of T tokens:
//  decoder fwd: MLP intermediates being formed + attention temporaries: T*(2*ffn + 2*hidden)*act_bytes.
//  decoder bwd: gradient temporaries of the MLP and attention: T*(3*ffn + 4*hidden)*act_bytes. With recompute the pass
//               must add the layer's layer_stash_bytes(recompute=false) (the recomputed forward is alive during backward).
//  head fwd:    bf16 logits + fp32 logits: T*vocab*(act_bytes + 4).
//  head bwd:    fp32 softmax and its gradient (2 x T*vocab*4) + bf16 logits gradient (T*vocab*act_bytes).
//  embedding:   fwd 0; bwd T*hidden*4 (fp32 scatter-add of the incoming gradient).
int64_t ModelSpec::layer_fwd_workspace(int layer, int mbs, int seq, int act_bytes) const {
  const int64_t T = (int64_t)mbs * seq, h = hidden;
  if (layer == 0) return 0;
  if (layer >= 1 && layer <= layers) return T * (2 * (int64_t)ffn + 2 * h) * act_bytes;
  if (layer == layers + 1) return T * (int64_t)vocab * (act_bytes + 4);
  throw std::out_of_range("layer out of range");
}

int64_t ModelSpec::layer_bwd_workspace(int layer, int mbs, int seq, int act_bytes) const {
  const int64_t T = (int64_t)mbs * seq, h = hidden;
  if (layer == 0) return T * h * 4;
  if (layer >= 1 && layer <= layers) return T * (3 * (int64_t)ffn + 4 * h) * act_bytes;
  if (layer == layers + 1) return T * (int64_t)vocab * (2 * 4 + act_bytes);
  throw std::out_of_range("layer out of range");
}

ir::ModelArch ModelSpec::arch() const {
  ir::ModelArch a;
  a.name = name;
  a.layers = layers;
  a.hidden = hidden;
  a.ffn = ffn;
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.vocab = vocab;
  a.rope_theta = rope_theta;
  a.norm_eps = norm_eps;
  a.tied_embeddings = tied_embeddings;
  return a;
}

// ---- hardware ------------------------------------------------------------------------------
int HardwareSpec::group_of(int gpu) const {
  for (size_t g = 0; g < host_groups.size(); ++g)
    for (int x : host_groups[g])
      if (x == gpu) return (int)g;
  return -1;
}

HardwareSpec parse_hardware(const std::string& json_text, const std::string& origin) {
  json j = parse_json_text(json_text, origin);
  HardwareSpec hw;
  ObjReader r(j, origin);
  r.comment();
  r.str("name", hw.name);
  r.int_("gpus", hw.gpus, 1);
  r.num("gpu_mem_gib", hw.gpu_mem_gib, 0);
  r.num("gpu_tflops", hw.gpu_tflops, 1e-6);
  r.num("gpu_mem_gbps", hw.gpu_mem_gbps, 1e-6);
  r.num("mfu_small", hw.mfu_small, 1e-3);
  r.num("mfu_small_tokens", hw.mfu_small_tokens, 1);
  r.num("mfu_full_tokens", hw.mfu_full_tokens, 1);
  r.num("h2d_gbps", hw.h2d_gbps, 1e-6);
  r.num("d2h_gbps", hw.d2h_gbps, 1e-6);
  r.num("duplex_gbps", hw.duplex_gbps, 1e-6);
  r.num("group_link_gbps", hw.group_link_gbps, 1e-6);
  r.num("p2p_gbps", hw.p2p_gbps, 1e-6);
  r.num("host_mem_gib", hw.host_mem_gib, 0);
  r.int_("cpu_cores", hw.cpu_cores, 1);
  r.num("host_mem_gbps", hw.host_mem_gbps, 1e-6);
  r.num("adam_bytes_per_param", hw.adam_bytes_per_param, 1e-6);
  r.int_("adam_saturating_threads", hw.adam_saturating_threads, 0);
  r.num("launch_overhead_ms", hw.launch_overhead_ms, 0);
  r.num("reserve_gib", hw.reserve_gib, 0);
  r.num("reserve_fraction", hw.reserve_fraction, 0);
  bool groups_given = false;
  if (auto* v = r.get("host_groups")) {
    groups_given = true;
    if (!v->is_array()) r.bad("host_groups", "a list of lists of GPU indices", *v);
    for (auto& g : *v) {
      if (!g.is_array()) r.bad("host_groups", "a list of lists of GPU indices", *v);
      std::vector<int> grp;
      for (auto& x : g) {
        if (!x.is_number_integer()) r.bad("host_groups", "a list of lists of GPU indices", *v);
        grp.push_back(x.get<int>());
      }
      hw.host_groups.push_back(grp);
    }
  }
  if (auto* v = r.get("calibrated_ms")) {
    if (!v->is_object()) r.bad("calibrated_ms", "an object of \"key\": ms", *v);
    for (auto it = v->begin(); it != v->end(); ++it) {
      if (!it->is_number() || it->get<double>() < 0)
        throw InputError(origin + ": calibrated_ms['" + it.key() + "'] must be a non-negative number");
      hw.calibrated_ms[it.key()] = it->get<double>();
    }
  }
  r.finish();
  if (!r.has("gpus")) throw InputError(origin + ": missing required key 'gpus'");
  if (hw.mfu_small > 1) throw InputError(origin + ": mfu_small must be <= 1");
  if (hw.mfu_full_tokens < hw.mfu_small_tokens) throw InputError(origin + ": mfu_full_tokens must be >= mfu_small_tokens");
  if (!groups_given)
    for (int g = 0; g < hw.gpus; ++g) hw.host_groups.push_back({g});
  std::vector<int> seen(hw.gpus, 0);
  for (auto& g : hw.host_groups)
    for (int x : g) {
      if (x < 0 || x >= hw.gpus)
        throw InputError(origin + ": host_groups names GPU " + std::to_string(x) + " but gpus = " + std::to_string(hw.gpus));
      if (seen[x]++) throw InputError(origin + ": host_groups lists GPU " + std::to_string(x) + " twice");
    }
  return hw;
}

HardwareSpec load_hardware(const std::string& name_or_path, const std::string& configs_dir) {
  std::string path = resolve_config(name_or_path, configs_dir, "hardware", "hardware");
  HardwareSpec hw = parse_hardware(read_file_or_throw(path, "hardware"), path);
  if (hw.name.empty()) hw.name = fs::path(path).stem().string();
  return hw;
}

std::string calibration_key(const std::string& model, int layer_kind, bool fwd, int mbs, int seq) {
  static const char* kinds[] = {"embed", "decoder", "head"};
  if (layer_kind < 0 || layer_kind > 2) throw std::out_of_range("layer_kind");
  return "model=" + model + ",layer=" + kinds[layer_kind] + (fwd ? ".fwd" : ".bwd") + ",mbs=" + std::to_string(mbs) +
         ",seq=" + std::to_string(seq);
}

// ---- job -----------------------------------------------------------------------------------
JobConfig parse_job(const std::string& json_text, const std::string& origin) {
  json j = parse_json_text(json_text, origin);
  JobConfig c;
  ObjReader r(j, origin);
  r.comment();
  r.str("model", c.model);
  r.str("hardware", c.hardware);
  r.int_("gpus", c.gpus, 1);
  if (auto* v = r.get("v")) {
    if (v->is_number_integer()) {
      if (v->get<int64_t>() < 1) throw InputError(origin + ": key 'v' must be >= 1 or \"auto\"");
      c.v = std::to_string(v->get<int64_t>());
    } else if (v->is_string()) {
      c.v = v->get<std::string>();
      bool digits = !c.v.empty() && std::all_of(c.v.begin(), c.v.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
      if (c.v != "auto" && !(digits && std::stoll(c.v) >= 1))
        throw InputError(origin + ": key 'v' must be a positive integer or \"auto\", got \"" + c.v + "\"");
    } else {
      r.bad("v", "a positive integer or \"auto\"", *v);
    }
  }
  r.num("budget_gib", c.budget_gib, 0);
  r.int_("micro_batch_size", c.micro_batch_size, 1);
  r.int_("microbatches", c.microbatches, 1);
  r.int_("seq_len", c.seq_len, 1);
  r.str("schedule", c.schedule, {"gpipe", "1f1b", "interleaved-1f1b", "grouped", "auto"});
  r.str("recompute", c.recompute, {"auto", "on", "off"});
  r.str("offload", c.offload, {"auto", "all", "none"});
  r.str("cross_map", c.cross_map, {"auto", "off"});
  r.int_("dp", c.dp, 1);
  if (auto* t = r.get("train")) {
    ObjReader tr(*t, origin + ": train");
    ir::TrainConfig& T = c.train;
    tr.comment();
    tr.str("precision", T.precision, {"bf16", "fp32"});
    tr.num("lr", T.lr, 0);
    tr.num("beta1", T.beta1, 0);
    tr.num("beta2", T.beta2, 0);
    tr.num("eps", T.eps, 0);
    tr.num("weight_decay", T.weight_decay, 0);
    tr.num("max_grad_norm", T.max_grad_norm, 0);
    tr.str("lr_schedule", T.lr_schedule, {"constant", "linear", "cosine"});
    tr.int_("warmup_steps", T.warmup_steps, 0);
    tr.int_("total_steps", T.total_steps, 0);
    tr.int_("seed", T.seed);
    tr.str("on_nonfinite", T.on_nonfinite, {"stop", "skip"});
    tr.finish();
    if (T.beta1 >= 1 || T.beta2 >= 1) throw InputError(origin + ": train: beta1 and beta2 must be < 1");
  }
  r.finish();
  return c;
}

JobConfig load_job(const std::string& path) { return parse_job(read_file_or_throw(path, "job"), path); }

// ---- where configs live --------------------------------------------------------------------
std::string default_configs_dir() {
  if (const char* env = std::getenv("MMOC_CONFIGS"); env && *env) return env;
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    fs::path dir = exe.parent_path();
    for (fs::path cand : {dir / ".." / "configs", dir / ".." / ".." / "configs"})
      if (fs::is_directory(cand / "models", ec)) return fs::weakly_canonical(cand, ec).string();
  }
  return MMOC_SOURCE_CONFIGS;
}

int64_t HardwareSpec::usable_bytes(int64_t budget) const {
  if (budget <= 0) return budget;
  // at least 1 byte: 0 means "no budget" to the passes, and a budget below the reserve must fail, not lift the limit
  return std::max<int64_t>(1, (int64_t)(double(budget) * (1.0 - reserve_fraction) - reserve_gib * GiB));
}

int64_t HardwareSpec::budget_for(int64_t bound) const {
  return (int64_t)std::ceil((double(bound) + reserve_gib * GiB) / (1.0 - reserve_fraction));
}

}  // namespace mmoc
