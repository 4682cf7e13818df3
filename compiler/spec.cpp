// Model, hardware and job descriptions: loading, validation, per-layer size/FLOP formulas.
// Formulas are documented next to each function and in configs/README.md.
#include "compiler/spec.hpp"

#include "arch/hf_config.hpp"
#include "arch/layout.hpp"

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
  try {
    arch::validate(m, where);
  } catch (const arch::ConfigError& e) {
    throw InputError(e.what());
  }
  if (m.max_seq < 1) throw InputError(where + ": max_seq must be >= 1");
  if (m.max_positions > 0 && m.max_seq > m.max_positions)
    throw InputError(where + ": max_seq " + std::to_string(m.max_seq) + " exceeds the " + std::to_string(m.max_positions) +
                     " learned positions (max_positions)");
}

bool looks_like_hf(const json& j) {
  return j.is_object() && (j.contains("model_type") || j.contains("architectures") || j.contains("hidden_size") ||
                           j.contains("n_embd"));
}
}  // namespace

ModelSpec parse_model(const std::string& json_text, const std::string& origin) {
  json j = parse_json_text(json_text, origin);
  if (looks_like_hf(j)) {  // HF config.json: the one reader, shared with the engine
    arch::HfConfig c;
    try {
      c = arch::parse_hf_config(json_text, origin);
    } catch (const arch::ConfigError& e) {
      throw InputError(e.what());
    }
    ModelSpec m;
    static_cast<ir::ModelArch&>(m) = c.arch;
    m.max_seq = (int)c.max_position_embeddings;
    if (j.contains("name_or_path") && j["name_or_path"].is_string()) m.name = j["name_or_path"].get<std::string>();
    validate_model(m, origin);
    return m;
  }
  ObjReader r(j, origin);
  r.comment();
  std::string fam = "llama";
  r.str("family", fam, {"llama", "mistral", "qwen2", "qwen3", "gpt2"});
  arch::Family f;
  arch::parse_family(fam, f);
  ModelSpec m;
  static_cast<ir::ModelArch&>(m) = arch::make_arch(f);  // family features and HF's defaults (norm_eps, rope_theta, tie)
  r.str("name", m.name);
  r.int_("layers", m.layers, 1);
  r.int_("hidden", m.hidden, 1);
  r.int_("ffn", m.ffn, 1);
  r.int_("heads", m.heads, 1);
  r.int_("kv_heads", m.kv_heads, 1);
  r.int_("head_dim", m.head_dim, 1);
  r.int_("vocab", m.vocab, 1);
  r.int_("max_seq", m.max_seq, 1);
  r.int_("max_positions", m.max_positions, 1);
  r.int_("sliding_window", m.sliding_window, 0);
  r.num("rope_theta", m.rope_theta);
  r.num("norm_eps", m.norm_eps);
  r.boolean("tied_embeddings", m.tied_embeddings);
  if (auto* v = r.get("rope_scaling")) {
    ObjReader rs(*v, origin + ": rope_scaling");
    rs.str("rope_type", m.rope_type, {"default", "llama3"});
    rs.num("factor", m.rope_factor, 0);
    rs.num("low_freq_factor", m.rope_low_freq_factor, 0);
    rs.num("high_freq_factor", m.rope_high_freq_factor, 0);
    rs.int_("original_max_position_embeddings", m.rope_original_max_positions, 1);
    rs.finish();
  }
  for (const char* req : {"layers", "hidden", "ffn", "heads", "vocab"})
    if (!r.has(req)) throw InputError(origin + ": missing required key '" + req + "'");
  if (!r.has("kv_heads")) m.kv_heads = m.heads;
  if (f == arch::Family::Gpt2 && !r.has("max_positions")) m.max_positions = m.max_seq;
  r.finish();
  if (m.head_dim > 0 && m.hidden % m.heads == 0 && m.head_dim == m.hidden / m.heads) m.head_dim = 0;  // canonical
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

// Parameters per model layer: those of the engine's flat layout (arch/layout.hpp lists every tensor), e.g.
//  LLaMA-style decoder: q,o: hidden*q_dim each; k,v: hidden*kv_dim each; gate,up,down: hidden*ffn each; 2 RMSNorm
//  weights; + q/k/v biases (qwen2: q_dim + 2*kv_dim) + q/k norms (qwen3: 2*head_dim);
//  GPT-2 block: c_attn 3h^2+3h, c_proj h^2+h, c_fc h*ffn+ffn, mlp c_proj ffn*h+h, two LayerNorms 4h;
//  embedding: vocab*hidden (+ max_positions*hidden for GPT-2; the tied lm_head weight is counted here);
//  head: final norm (hidden; GPT-2 2*hidden) + lm_head vocab*hidden (0 when tied).
int64_t ModelSpec::layer_params(int layer) const {
  if (layer < 0 || layer > layers + 1)
    throw std::out_of_range("layer " + std::to_string(layer) + " out of range 0.." + std::to_string(layers + 1));
  return arch::layer_param_count(*this, layer);
}

int64_t ModelSpec::total_params() const {
  int64_t n = 0;
  for (int l = 0; l < num_model_layers(); ++l) n += layer_params(l);
  return n;
}

namespace {
// True when attention runs with an explicit sliding-window mask (the engine's SDPA call then processes the whole
// seq x seq score matrix: no causal skipping) rather than is_causal.
bool windowed(const ModelSpec& m, int seq) { return m.sliding_window > 0 && m.sliding_window < seq; }
}  // namespace

// Forward FLOPs for one micro-batch of T = mbs*seq tokens.
//  decoder: 2 * (matmul params) * T  +  attention QK^T and AV: 2 matmuls of 2*mbs*seq^2*q_dim each = 4*mbs*seq^2*q_dim,
//           halved for the causal mask (flash/SDPA kernels skip the masked upper triangle) -> 2*mbs*seq^2*q_dim; with
//           a sliding window shorter than seq the engine passes an explicit mask and no block is skipped: 4*mbs*seq^2*q_dim.
//           q_dim = heads*head_dim (= hidden unless head_dim is set).
//  head:    2*vocab*hidden*T for lm_head (also when tied: the matmul still runs) + ~5 FLOPs per logit for softmax/CE.
//  embedding: a gather, counted as 0 FLOPs (its time is launch overhead and memory traffic).
double ModelSpec::layer_fwd_flops(int layer, int mbs, int seq) const {
  const double T = (double)mbs * seq, h = hidden, f = ffn, qd = (double)arch::q_dim(*this), kvd = (double)arch::kv_dim(*this);
  if (layer == 0) return 0.0;
  if (layer >= 1 && layer <= layers) {
    const double matmul_params = arch::is_gpt2(*this) ? 4 * h * h + 2 * h * f : 2 * h * qd + 2 * h * kvd + 3 * h * f;
    return 2.0 * matmul_params * T + (windowed(*this, seq) ? 4.0 : 2.0) * mbs * (double)seq * seq * qd;
  }
  if (layer == layers + 1) return 2.0 * vocab * h * T + 5.0 * vocab * T;
  throw std::out_of_range("layer out of range");
}

// Backward: gradients w.r.t. inputs and weights, each a matmul of forward's size: 2x forward.
double ModelSpec::layer_bwd_flops(int layer, int mbs, int seq) const { return 2.0 * layer_fwd_flops(layer, mbs, seq); }

// Saved-for-backward bytes without recompute (SDPA/flash attention: no seq^2 score matrix is kept), per token, as
// engine/model/model.cpp's layers keep them (fused projections are views of the flat weights: no weight copy):
//  LLaMA-style decoder: x, norm1(x), mid residual, norm2 (4*hidden) and the attention output (q_dim); the fused
//           gate|up output, silu(gate) and silu(gate)*up (4*ffn); and what attention keeps: with MHA the fused qkv
//           output (v is a view of it) plus the rotated q and k (q_dim + 2*kv_dim + q_dim + kv_dim); with GQA the rotated
//           q and the repeated k and v (3*q_dim), and with qk_norm (qwen3) also the qkv output the norms read
//           (q_dim + 2*kv_dim) -- all times act_bytes; plus fp32 small terms: attention log-sum-exp (heads*4), two
//           RMSNorm inverse-rms (2*4) and with qk_norm one per head of q and k ((heads + kv_heads)*4). With a sliding
//           window shorter than seq, the boolean mask (seq^2 bytes per micro-batch) too. For LLaMA-2-7B that is
//           10*hidden + 4*ffn = ~20.75*hidden elements per token.
//  GPT-2 block: x, ln_1(x), the qkv output (q, k, v are views of it), the attention output, mid residual, ln_2 (8*hidden),
//           the c_fc output and its GELU (2*ffn), times act_bytes; plus log-sum-exp (heads*4) and two LayerNorms'
//           mean and inverse std (16).
//  head:    final-norm input and output and its fp32 statistics (2*hidden*act_bytes + 4; LayerNorm 8) plus the fp32 log-softmax that
//           cross-entropy keeps (vocab*4).
//  embedding: nothing (the token ids are batch(m)).
// recompute=true: 0 (forward keeps only the stage input, counted as the previous layer's output / the batch).
int64_t ModelSpec::layer_stash_bytes(int layer, int mbs, int seq, bool recompute, int act_bytes) const {
  if (recompute) return 0;
  const int64_t T = (int64_t)mbs * seq, h = hidden, f = ffn, qd = arch::q_dim(*this), kvd = arch::kv_dim(*this);
  const bool gpt2 = arch::is_gpt2(*this);
  if (layer == 0) return 0;
  if (layer >= 1 && layer <= layers) {
    if (gpt2) return T * ((8 * h + 2 * f) * act_bytes + (int64_t)heads * 4 + 16);
    int64_t attn = kv_heads == heads ? 2 * qd + 3 * kvd : 3 * qd;
    int64_t small = (int64_t)heads * 4 + 8;
    if (qk_norm) {
      if (kv_heads != heads) attn += qd + 2 * kvd;
      small += (int64_t)(heads + kv_heads) * 4;
    }
    const int64_t mask = windowed(*this, seq) ? (int64_t)seq * seq : 0;
    return T * ((4 * h + qd + attn + 4 * f) * act_bytes + small) + mask;
  }
  if (layer == layers + 1) return T * (2 * h * act_bytes + (gpt2 ? 8 : 4) + (int64_t)vocab * 4);
  throw std::out_of_range("layer out of range");
}

// Hidden state mbs*seq*hidden*act_bytes; the head outputs only the loss (0).
int64_t ModelSpec::layer_output_bytes(int layer, int mbs, int seq, int act_bytes) const {
  if (layer == layers + 1) return 0;
  return (int64_t)mbs * seq * hidden * act_bytes;
}

// Transient bytes while the layer runs (beyond its stash and output), per micro-batch of T tokens, a = max(hidden, q_dim):
//  decoder fwd: MLP intermediates being formed + attention temporaries: T*(2*ffn + 2*a)*act_bytes.
//  decoder bwd: gradient temporaries of the MLP and attention: T*(3*ffn + 4*a)*act_bytes. With recompute the pass
//               must add the layer's layer_stash_bytes(recompute=false) (the recomputed forward is alive during backward).
//  head fwd:    bf16 logits + fp32 logits: T*vocab*(act_bytes + 4).
//  head bwd:    fp32 softmax and its gradient (2 x T*vocab*4) + bf16 logits gradient (T*vocab*act_bytes).
//  embedding:   fwd 0; bwd T*hidden*4 (fp32 scatter-add of the incoming gradient), and for GPT-2 the position
//               table's gradient (max_positions*hidden*act_bytes).
int64_t ModelSpec::layer_fwd_workspace(int layer, int mbs, int seq, int act_bytes) const {
  const int64_t T = (int64_t)mbs * seq, a = std::max<int64_t>(hidden, arch::q_dim(*this));
  if (layer == 0) return 0;
  if (layer >= 1 && layer <= layers) return T * (2 * (int64_t)ffn + 2 * a) * act_bytes;
  if (layer == layers + 1) return T * (int64_t)vocab * (act_bytes + 4);
  throw std::out_of_range("layer out of range");
}

int64_t ModelSpec::layer_bwd_workspace(int layer, int mbs, int seq, int act_bytes) const {
  const int64_t T = (int64_t)mbs * seq, h = hidden, a = std::max<int64_t>(hidden, arch::q_dim(*this));
  if (layer == 0) return T * h * 4 + (int64_t)max_positions * h * act_bytes;
  if (layer >= 1 && layer <= layers) return T * (3 * (int64_t)ffn + 4 * a) * act_bytes;
  if (layer == layers + 1) return T * (int64_t)vocab * (2 * 4 + act_bytes);
  throw std::out_of_range("layer out of range");
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
  if (auto* v = r.get("storage")) {
    const char* want = "a list of {\"path\", \"read_gbps\", \"write_gbps\"[, \"device\", \"virtual\"]} objects";
    if (!v->is_array()) r.bad("storage", want, *v);
    for (size_t i = 0; i < v->size(); ++i) {
      const std::string where = origin + ": storage[" + std::to_string(i) + "]";
      ObjReader s((*v)[i], where);
      StoragePath sp;
      s.str("path", sp.path);
      s.num("read_gbps", sp.read_gbps, 1e-6);
      s.num("write_gbps", sp.write_gbps, 1e-6);
      s.str("device", sp.device);
      s.boolean("virtual", sp.virtual_tier);
      s.finish();
      for (const char* k : {"path", "read_gbps", "write_gbps"})
        if (!s.has(k)) throw InputError(where + ": missing required key '" + k + "'");
      if (sp.path.empty()) throw InputError(where + ": 'path' is empty");
      for (const auto& o : hw.storage)
        if (o.path == sp.path) throw InputError(where + ": path '" + sp.path + "' listed twice");
      hw.storage.push_back(sp);
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
