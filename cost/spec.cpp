// Model, hardware and job descriptions: loading, validation, per-layer size/FLOP formulas.
// Formulas are documented next to each function and in configs/README.md.
#include "cost/spec.hpp"

#include "common/fs.hpp"
#include "common/json.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <unistd.h>

#ifndef MMOC_SOURCE_CONFIGS
#define MMOC_SOURCE_CONFIGS "configs"
#endif

namespace mmoc {
using nlohmann::json;

namespace {

// ---- JSON reading with unknown-key and type checks (common/json.hpp: JsonError is an InputError naming
// "<file>: key '<k>'") ----
using ObjReader = JsonObject<json>;

json parse_json_text(const std::string& text, const std::string& origin) { return json_parse(text, origin); }

std::string read_file_or_throw(const std::string& path, const std::string& what) {
  try {
    return read_file(path, what);
  } catch (const std::runtime_error& e) {
    throw InputError(e.what());
  }
}

JsonNumberRule finite_min(double min = -INFINITY) { return JsonNumberRule{.min = min, .finite = true}; }

// "comment": a string or a list of strings, ignored.
void skip_comment(ObjReader& r) {
  if (const json* v = r.get("comment")) {
    bool ok = v->is_string();
    if (v->is_array()) {
      ok = true;
      for (auto& e : *v) ok = ok && e.is_string();
    }
    if (!ok) json_fail(r.at("comment"), "expected a string or a list of strings, got " + json_describe(*v));
  }
}

bool looks_like_path(const std::string& s) {
  return s.find('/') != std::string::npos || (s.size() > 5 && s.substr(s.size() - 5) == ".json");
}

std::string resolve_config_impl(const std::string& name_or_path, const std::string& configs_dir, const std::string& sub,
                                const char* what) {
  if (name_or_path.empty()) throw InputError(std::string("no ") + what + " given");
  if (looks_like_path(name_or_path)) {
    if (!path_exists(name_or_path)) throw InputError(std::string(what) + " file '" + name_or_path + "' does not exist");
    return name_or_path;
  }
  const std::string dir = join_path(configs_dir, sub);
  const std::string p = join_path(dir, name_or_path + ".json");
  if (path_exists(p)) return p;
  auto names = list_configs(configs_dir, sub);
  std::string list;
  for (auto& n : names) list += (list.empty() ? "" : ", ") + n;
  throw InputError(std::string("unknown ") + what + " '" + name_or_path + "' (looked in " + dir +
                   "); available: " + (list.empty() ? "(none)" : list));
}

}  // namespace

std::string resolve_config(const std::string& name_or_path, const std::string& configs_dir, const std::string& sub) {
  return resolve_config_impl(name_or_path, configs_dir, sub, sub == "models" ? "model" : sub == "jobs" ? "job" : sub.c_str());
}

std::vector<std::string> list_configs(const std::string& configs_dir, const std::string& sub) {
  std::vector<std::string> names;
  const std::string dir = join_path(configs_dir, sub);
  if (!is_directory(dir)) return names;
  for (const auto& n : list_dir(dir))
    if (n.size() > 5 && n.compare(n.size() - 5, 5, ".json") == 0) names.push_back(n.substr(0, n.size() - 5));
  return names;  // list_dir sorts
}

namespace {
// File name without its folder and a ".json" ending.
std::string stem_of(const std::string& path) {
  std::string b = base_name(path);
  auto dot = b.rfind('.');
  return dot == std::string::npos || dot == 0 ? b : b.substr(0, dot);
}
}  // namespace

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
  ObjReader r(j, origin, JsonNaming::Key);
  skip_comment(r);
  r.read("name", m.name);
  r.read("layers", m.layers, 1);
  r.read("hidden", m.hidden, 1);
  r.read("ffn", m.ffn, 1);
  r.read("heads", m.heads, 1);
  r.read("kv_heads", m.kv_heads, 1);
  r.read("vocab", m.vocab, 1);
  r.read("max_seq", m.max_seq, 1);
  r.read("rope_theta", m.rope_theta, finite_min());
  r.read("norm_eps", m.norm_eps, finite_min());
  r.read("tied_embeddings", m.tied_embeddings);
  for (const char* req : {"layers", "hidden", "ffn", "heads", "vocab"})
    if (!r.has(req)) throw InputError(origin + ": missing required key '" + req + "'");
  if (!r.has("kv_heads")) m.kv_heads = m.heads;
  r.done();
  validate_model(m, origin);
  return m;
}

ModelSpec load_model(const std::string& name_or_path, const std::string& configs_dir) {
  std::string path = resolve_config(name_or_path, configs_dir, "models");
  ModelSpec m = parse_model(read_file_or_throw(path, "model"), path);
  if (m.name.empty()) m.name = base_name(path) == "config.json" ? base_name(parent_dir(path)) : stem_of(path);
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
  ObjReader r(j, origin, JsonNaming::Key);
  skip_comment(r);
  r.read("name", hw.name);
  r.read("gpus", hw.gpus, 1);
  r.read("gpu_mem_gib", hw.gpu_mem_gib, finite_min(0));
  r.read("gpu_tflops", hw.gpu_tflops, finite_min(1e-6));
  r.read("gpu_mem_gbps", hw.gpu_mem_gbps, finite_min(1e-6));
  r.read("mfu_small", hw.mfu_small, finite_min(1e-3));
  r.read("mfu_small_tokens", hw.mfu_small_tokens, finite_min(1));
  r.read("mfu_full_tokens", hw.mfu_full_tokens, finite_min(1));
  r.read("h2d_gbps", hw.h2d_gbps, finite_min(1e-6));
  r.read("d2h_gbps", hw.d2h_gbps, finite_min(1e-6));
  r.read("duplex_gbps", hw.duplex_gbps, finite_min(1e-6));
  r.read("group_link_gbps", hw.group_link_gbps, finite_min(1e-6));
  r.read("p2p_gbps", hw.p2p_gbps, finite_min(1e-6));
  r.read("host_mem_gib", hw.host_mem_gib, finite_min(0));
  r.read("cpu_cores", hw.cpu_cores, 1);
  r.read("host_mem_gbps", hw.host_mem_gbps, finite_min(1e-6));
  r.read("adam_bytes_per_param", hw.adam_bytes_per_param, finite_min(1e-6));
  r.read("adam_saturating_threads", hw.adam_saturating_threads, 0);
  r.read("launch_overhead_ms", hw.launch_overhead_ms, finite_min(0));
  r.read("reserve_gib", hw.reserve_gib, finite_min(0));
  r.read("reserve_fraction", hw.reserve_fraction, finite_min(0));
  bool groups_given = false;
  if (auto* v = r.get("host_groups")) {
    groups_given = true;
    if (!v->is_array()) json_fail(r.at("host_groups"), "expected a list of lists of GPU indices, got " + json_describe(*v));
    for (auto& g : *v) {
      if (!g.is_array()) json_fail(r.at("host_groups"), "expected a list of lists of GPU indices, got " + json_describe(*v));
      std::vector<int> grp;
      for (auto& x : g) {
        if (!x.is_number_integer()) json_fail(r.at("host_groups"), "expected a list of lists of GPU indices, got " + json_describe(*v));
        grp.push_back(x.get<int>());
      }
      hw.host_groups.push_back(grp);
    }
  }
  if (auto* v = r.get("calibrated_ms")) {
    if (!v->is_object()) json_fail(r.at("calibrated_ms"), "expected an object of \"key\": ms, got " + json_describe(*v));
    for (auto it = v->begin(); it != v->end(); ++it) {
      if (!it->is_number() || it->get<double>() < 0)
        throw InputError(origin + ": calibrated_ms['" + it.key() + "'] must be a non-negative number");
      hw.calibrated_ms[it.key()] = it->get<double>();
    }
  }
  r.done();
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
  std::string path = resolve_config(name_or_path, configs_dir, "hardware");
  HardwareSpec hw = parse_hardware(read_file_or_throw(path, "hardware"), path);
  if (hw.name.empty()) hw.name = stem_of(path);
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
  ObjReader r(j, origin, JsonNaming::Key);
  skip_comment(r);
  r.read("model", c.model);
  r.read("hardware", c.hardware);
  r.read("gpus", c.gpus, 1);
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
      json_fail(r.at("v"), "expected a positive integer or \"auto\", got " + json_describe(*v));
    }
  }
  r.read("budget_gib", c.budget_gib, finite_min(0));
  r.read("micro_batch_size", c.micro_batch_size, 1);
  r.read("microbatches", c.microbatches, 1);
  r.read("seq_len", c.seq_len, 1);
  r.read("schedule", c.schedule, {"gpipe", "1f1b", "interleaved-1f1b", "grouped", "auto"});
  r.read("recompute", c.recompute, {"auto", "on", "off"});
  r.read("offload", c.offload, {"auto", "all", "none"});
  r.read("cross_map", c.cross_map, {"auto", "off"});
  r.read("dp", c.dp, 1);
  if (auto* t = r.get("train")) {
    ObjReader tr(*t, origin + ": train", JsonNaming::Key);
    ir::TrainConfig& T = c.train;
    skip_comment(tr);
    tr.read("precision", T.precision, {"bf16", "fp32"});
    tr.read("lr", T.lr, finite_min(0));
    tr.read("beta1", T.beta1, finite_min(0));
    tr.read("beta2", T.beta2, finite_min(0));
    tr.read("eps", T.eps, finite_min(0));
    tr.read("weight_decay", T.weight_decay, finite_min(0));
    tr.read("max_grad_norm", T.max_grad_norm, finite_min(0));
    tr.read("lr_schedule", T.lr_schedule, {"constant", "linear", "cosine"});
    tr.read("warmup_steps", T.warmup_steps, 0);
    tr.read("total_steps", T.total_steps, 0);
    tr.read("seed", T.seed);
    tr.read("on_nonfinite", T.on_nonfinite, {"stop", "skip"});
    tr.done();
    if (T.beta1 >= 1 || T.beta2 >= 1) throw InputError(origin + ": train: beta1 and beta2 must be < 1");
  }
  r.done();
  return c;
}

JobConfig load_job(const std::string& path) { return parse_job(read_file_or_throw(path, "job"), path); }

// ---- where configs live --------------------------------------------------------------------
std::string default_configs_dir() {
  if (const char* env = std::getenv("MMOC_CONFIGS"); env && *env) return env;
  const std::string dir = exe_dir();
  if (!dir.empty())
    for (const char* up : {"../configs", "../../configs", "../../../configs"}) {
      const std::string cand = join_path(dir, up);
      if (is_directory(join_path(cand, "models"))) return real_path(cand);
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
