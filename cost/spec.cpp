// Model, hardware and job descriptions: loading, validation, per-layer size/FLOP formulas.
// Formulas are documented next to each function and in configs/README.md.
#include "cost/spec.hpp"

#include "common/fs.hpp"
#include "common/json.hpp"
#include "common/size.hpp"

#include "arch/hf_config.hpp"
#include "arch/layout.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>
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
  ObjReader r(j, origin, JsonNaming::Key);
  skip_comment(r);
  std::string fam = "llama";
  r.read("family", fam, {"llama", "mistral", "qwen2", "qwen3", "gpt2"});
  arch::Family f;
  arch::parse_family(fam, f);
  ModelSpec m;
  static_cast<ir::ModelArch&>(m) = arch::make_arch(f);  // family features and HF's defaults (norm_eps, rope_theta, tie)
  r.read("name", m.name);
  r.read("layers", m.layers, 1);
  r.read("hidden", m.hidden, 1);
  r.read("ffn", m.ffn, 1);
  r.read("heads", m.heads, 1);
  r.read("kv_heads", m.kv_heads, 1);
  r.read("head_dim", m.head_dim, 1);
  r.read("vocab", m.vocab, 1);
  r.read("max_seq", m.max_seq, 1);
  r.read("max_positions", m.max_positions, 1);
  r.read("sliding_window", m.sliding_window, 0);
  r.read("rope_theta", m.rope_theta, finite_min());
  r.read("norm_eps", m.norm_eps, finite_min());
  r.read("tied_embeddings", m.tied_embeddings);
  if (auto* v = r.get("rope_scaling")) {
    ObjReader rs(*v, origin + ": rope_scaling", JsonNaming::Key);
    rs.read("rope_type", m.rope_type, {"default", "llama3"});
    rs.read("factor", m.rope_factor, finite_min(0));
    rs.read("low_freq_factor", m.rope_low_freq_factor, finite_min(0));
    rs.read("high_freq_factor", m.rope_high_freq_factor, finite_min(0));
    rs.read("original_max_position_embeddings", m.rope_original_max_positions, 1);
    rs.done();
  }
  for (const char* req : {"layers", "hidden", "ffn", "heads", "vocab"})
    if (!r.has(req)) throw InputError(origin + ": missing required key '" + req + "'");
  if (!r.has("kv_heads")) m.kv_heads = m.heads;
  if (f == arch::Family::Gpt2 && !r.has("max_positions")) m.max_positions = m.max_seq;
  r.done();
  if (m.head_dim > 0 && m.hidden % m.heads == 0 && m.head_dim == m.hidden / m.heads) m.head_dim = 0;  // canonical
  validate_model(m, origin);
  return m;
}

ModelSpec load_model(const std::string& name_or_path, const std::string& configs_dir) {
  std::string path = resolve_config(name_or_path, configs_dir, "models");
  ModelSpec m = parse_model(read_file_or_throw(path, "model"), path);
  if (m.name.empty()) m.name = base_name(path) == "config.json" ? base_name(parent_dir(path)) : stem_of(path);
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
  if (tp <= 1) return arch::layer_param_count(*this, layer);
  // one tp rank's shard (the same count on every rank: the vocabulary is padded to a multiple of tp); the embedding,
  // a decoder layer and the head each have one count (with_tp computed them)
  const int k = layer == 0 ? 0 : layer == layers + 1 ? 2 : 1;
  return tp_layer_params[k] > 0 ? tp_layer_params[k] : arch::layer_param_count(*this, layer, tp);
}

ModelSpec with_tp(const ModelSpec& m, int tp) {
  ModelSpec r = m;
  r.tp = tp;
  for (auto& x : r.tp_layer_params) x = 0;
  if (tp == 1) return r;
  try {
    arch::check_tp(m, tp, m.name);
  } catch (const std::exception& e) {
    throw InputError(std::string("--tp: ") + e.what());
  }
  r.tp_layer_params[0] = arch::layer_param_count(m, 0, tp);
  r.tp_layer_params[1] = m.layers > 0 ? arch::layer_param_count(m, 1, tp) : 0;
  r.tp_layer_params[2] = arch::layer_param_count(m, m.layers + 1, tp);
  return r;
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
//  tensor parallelism (tp > 1): every matmul and the attention are split over the ranks (heads, ffn, vocabulary rows):
//  one rank's share is 1/tp (the head's of the padded vocabulary).
double ModelSpec::layer_fwd_flops(int layer, int mbs, int seq) const {
  const double T = (double)mbs * seq, h = hidden, f = ffn, qd = (double)arch::q_dim(*this), kvd = (double)arch::kv_dim(*this);
  const double share = 1.0 / std::max(1, tp);
  if (layer == 0) return 0.0;
  if (layer >= 1 && layer <= layers) {
    const double matmul_params = arch::is_gpt2(*this) ? 4 * h * h + 2 * h * f : 2 * h * qd + 2 * h * kvd + 3 * h * f;
    return share * (2.0 * matmul_params * T + (windowed(*this, seq) ? 4.0 : 2.0) * mbs * (double)seq * seq * qd);
  }
  if (layer == layers + 1) {
    const double v = tp > 1 ? (double)arch::tp_vocab(vocab, 0, tp).rows : (double)vocab;
    return 2.0 * v * h * T + 5.0 * v * T;
  }
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
//           window shorter than seq, the boolean mask (seq^2 bytes per micro-batch) too. That is the plain autograd
//           graph's (tp > 1); at tp 1 (layer_can_select) the engine's NormLinear nodes keep the norms' inputs only (x and
//           the mid residual: 2*hidden, not 4*hidden), and with MHA and no q/k norms v is copied out of qkv, so
//           attention keeps the rotated q and k and v (q_dim + 2*kv_dim). For LLaMA-2-7B that is 6*hidden + 4*ffn
//           = ~16.75*hidden elements per token (10*hidden + 4*ffn under the plain graph).
//  GPT-2 block: x, ln_1(x), the qkv output (q, k, v are views of it), the attention output, mid residual, ln_2 (8*hidden),
//           the c_fc output and its GELU (2*ffn), times act_bytes; plus log-sum-exp (heads*4) and two LayerNorms'
//           mean and inverse std (16).
//  head:    final-norm input and output and its fp32 statistics (2*hidden*act_bytes + 4; LayerNorm 8) plus the fp32 log-softmax that
//           cross-entropy keeps (vocab*4).
//  embedding: nothing (the token ids are batch(m)).
// recompute=true: 0 (forward keeps only the stage input, counted as the previous layer's output / the batch).
// selective=true (a LLaMA-style decoder layer without tensor parallelism, layer_can_select): the engine's SwiGluDown node
// keeps the fused gate|up output only and recomputes silu(gate) and silu(gate)*up in backward (selective recompute
// inside the layer, Stage::selective): 2*ffn instead of 4*ffn; no effect on other layers.
// Tensor parallelism (tp > 1): what depends on heads, kv heads, ffn or the vocabulary is one rank's 1/tp (its heads,
// its MLP columns, its vocabulary rows); the replicated hidden-state tensors (x, the norms' outputs, the residuals)
// stay whole.
bool ModelSpec::layer_can_select(int layer) const {
  return layer >= 1 && layer <= layers && !arch::is_gpt2(*this) && tp <= 1;
}

int64_t ModelSpec::layer_stash_bytes(int layer, int mbs, int seq, bool recompute, int act_bytes, bool selective) const {
  if (recompute) return 0;
  const int64_t n = std::max(1, tp);
  const int64_t T = (int64_t)mbs * seq, h = hidden, f = ffn / n, qd = arch::q_dim(*this) / n, kvd = arch::kv_dim(*this) / n;
  const int64_t nh = heads / n, nkv = kv_heads / n;
  const bool gpt2 = arch::is_gpt2(*this);
  if (layer == 0) return 0;
  if (layer >= 1 && layer <= layers) {
    if (gpt2) return T * ((4 * h + 4 * h / n + 2 * f) * act_bytes + nh * 4 + 16);
    int64_t attn = kv_heads == heads ? 2 * qd + 3 * kvd : 3 * qd;
    int64_t small = nh * 4 + 8;
    if (qk_norm) {
      if (kv_heads != heads) attn += qd + 2 * kvd;
      small += (nh + nkv) * 4;
    }
    const int64_t mask = windowed(*this, seq) ? (int64_t)seq * seq : 0;
    // SwiGluDown (layer_can_select) keeps gate|up and the product, or with selective gate|up alone; the plain graph
    // keeps silu(gate) too
    const int64_t mlp = layer_can_select(layer) ? (selective ? 2 * f : 3 * f) : 4 * f;
    int64_t hs = 4 * h;
    if (layer_can_select(layer)) {  // tp 1: NormLinear recomputes the norms' outputs; MHA: v copied out of qkv
      hs = 2 * h;
      if (kv_heads == heads && !qk_norm) attn = qd + 2 * kvd;
    }
    return T * ((hs + qd + attn + mlp) * act_bytes + small) + mask;
  }
  if (layer == layers + 1) {
    const int64_t v = n > 1 ? arch::tp_vocab(vocab, 0, (int)n).rows : vocab;
    return T * (2 * h * act_bytes + (gpt2 ? 8 : 4) + v * 4);
  }
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
//  (The head's figures here and in layer_stash_bytes are what cross_entropy over the whole fp32 copy held. Since
//  2026-12-02 the engine's lm_loss_sum works in pieces of at most 2^25 fp32 logits and keeps the logits in their own
//  dtype, so for a 32K vocabulary at 8 x 1024 tokens these are upper bounds by about 1.5-2.5 GB: headroom for the
//  caching allocator until a GPU measurement re-fits them.)
//  embedding:   fwd 0; bwd T*hidden*4 (fp32 scatter-add of the incoming gradient), and for GPT-2 the position
//               table's gradient (max_positions*hidden*act_bytes).
// Tensor parallelism (tp > 1): the MLP intermediates and the head's logits are one rank's 1/tp; attention's
// temporaries are the larger of the (whole) hidden state and the rank's heads.
int64_t ModelSpec::layer_fwd_workspace(int layer, int mbs, int seq, int act_bytes) const {
  const int64_t n = std::max(1, tp);
  const int64_t T = (int64_t)mbs * seq, a = std::max<int64_t>(hidden, arch::q_dim(*this) / n);
  const int64_t v = n > 1 ? arch::tp_vocab(vocab, 0, (int)n).rows : vocab;
  if (layer == 0) return 0;
  if (layer >= 1 && layer <= layers) return T * (2 * (int64_t)ffn / n + 2 * a) * act_bytes;
  if (layer == layers + 1) return T * v * (act_bytes + 4);
  throw std::out_of_range("layer out of range");
}

int64_t ModelSpec::layer_bwd_workspace(int layer, int mbs, int seq, int act_bytes) const {
  const int64_t n = std::max(1, tp);
  const int64_t T = (int64_t)mbs * seq, h = hidden, a = std::max<int64_t>(hidden, arch::q_dim(*this) / n);
  const int64_t v = n > 1 ? arch::tp_vocab(vocab, 0, (int)n).rows : vocab;
  if (layer == 0) return T * h * 4 + (int64_t)max_positions * h * act_bytes;
  if (layer >= 1 && layer <= layers) return T * (3 * (int64_t)ffn / n + 4 * a) * act_bytes;
  if (layer == layers + 1) return T * v * (2 * 4 + act_bytes);
  throw std::out_of_range("layer out of range");
}

// ---- hardware ------------------------------------------------------------------------------
int HardwareSpec::group_of(int gpu) const {
  for (size_t g = 0; g < host_groups.size(); ++g)
    for (int x : host_groups[g])
      if (x == gpu) return (int)g;
  return -1;
}

const HardwareSpec::P2PLink* HardwareSpec::link(int a, int b) const {
  if (a > b) std::swap(a, b);
  for (const auto& l : p2p_links)
    if (l.a == a && l.b == b) return &l;
  return nullptr;
}

double HardwareSpec::link_gbps(int a, int b) const {
  const P2PLink* l = link(a, b);
  return l ? l->gbps : p2p_gbps;
}

double HardwareSpec::ring_gbps(const std::vector<int>& gpus) const {
  const size_t n = gpus.size();
  if (n < 2) return p2p_gbps;
  double bw = std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < n; ++i) bw = std::min(bw, link_gbps(gpus[i], gpus[(i + 1) % n]));
  return bw;
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
  r.read("peak_bf16_tflops", hw.peak_bf16_tflops, finite_min(1e-6));
  r.read("gemm_k0", hw.gemm_k0, finite_min(0));
  r.read("attn_efficiency", hw.attn_efficiency, finite_min(1e-3));
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
  r.read("host_process_gib", hw.host_process_gib, finite_min(0));
  r.read("cpu_cores", hw.cpu_cores, 1);
  r.read("host_mem_gbps", hw.host_mem_gbps, finite_min(1e-6));
  r.read("adam_bytes_per_param", hw.adam_bytes_per_param, finite_min(1e-6));
  r.read("adam_saturating_threads", hw.adam_saturating_threads, 0);
  r.read("launch_overhead_ms", hw.launch_overhead_ms, finite_min(0));
  r.read("engine_kernels", hw.engine_kernels);
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
  if (auto* v = r.get("storage")) {
    const std::string want = "a list of {\"path\", \"read_gbps\", \"write_gbps\"[, \"device\", \"virtual\"]} objects";
    if (!v->is_array()) json_fail(r.at("storage"), "expected " + want + ", got " + json_describe(*v));
    for (size_t i = 0; i < v->size(); ++i) {
      const std::string where = origin + ": storage[" + std::to_string(i) + "]";
      ObjReader s((*v)[i], where, JsonNaming::Key);
      StoragePath sp;
      s.read("path", sp.path);
      s.read("read_gbps", sp.read_gbps, finite_min(1e-6));
      s.read("write_gbps", sp.write_gbps, finite_min(1e-6));
      s.read("device", sp.device);
      s.read("virtual", sp.virtual_tier);
      s.done();
      for (const char* k : {"path", "read_gbps", "write_gbps"})
        if (!s.has(k)) throw InputError(where + ": missing required key '" + k + "'");
      if (sp.path.empty()) throw InputError(where + ": 'path' is empty");
      for (const auto& o : hw.storage)
        if (o.path == sp.path) throw InputError(where + ": path '" + sp.path + "' listed twice");
      hw.storage.push_back(sp);
    }
  }
  const json* links = r.get("p2p_links");
  r.done();
  if (!r.has("gpus")) throw InputError(origin + ": missing required key 'gpus'");
  if (links) {  // after `gpus` is known: each pair's ids are checked against it
    const std::string want = "a list of {\"gpus\": [a, b], \"gbps\": x[, \"kind\": \"...\"]} objects";
    if (!links->is_array()) json_fail(r.at("p2p_links"), "expected " + want + ", got " + json_describe(*links));
    for (size_t i = 0; i < links->size(); ++i) {
      const std::string where = origin + ": p2p_links[" + std::to_string(i) + "]";
      const json& e = (*links)[i];
      ObjReader s(e, where, JsonNaming::Key);
      HardwareSpec::P2PLink l;
      s.read("gbps", l.gbps, finite_min(0));
      s.read("kind", l.kind);
      const json* g = s.get("gpus");
      s.done();
      if (!g) throw InputError(where + ": missing required key 'gpus'");
      if (!s.has("gbps")) throw InputError(where + ": missing required key 'gbps'");
      if (!(l.gbps > 0)) throw InputError(where + ".gbps: must be > 0 (got " + ir::format_double(l.gbps) + ")");
      if (!g->is_array() || g->size() != 2 || !(*g)[0].is_number_integer() || !(*g)[1].is_number_integer())
        throw InputError(where + ".gpus: expected two GPU ids [a, b], got " + json_describe(*g));
      l.a = (*g)[0].get<int>();
      l.b = (*g)[1].get<int>();
      for (int x : {l.a, l.b})
        if (x < 0 || x >= hw.gpus)
          throw InputError(where + ".gpus: names GPU " + std::to_string(x) + " but gpus = " + std::to_string(hw.gpus));
      if (l.a == l.b) throw InputError(where + ".gpus: a link joins two different GPUs (got [" + std::to_string(l.a) + ", " + std::to_string(l.b) + "])");
      if (l.a > l.b) std::swap(l.a, l.b);
      if (hw.link(l.a, l.b))
        throw InputError(where + ".gpus: the pair [" + std::to_string(l.a) + ", " + std::to_string(l.b) + "] is listed twice");
      hw.p2p_links.push_back(l);
    }
  }
  if (hw.mfu_small > 1) throw InputError(origin + ": mfu_small must be <= 1");
  if (hw.attn_efficiency > 1) throw InputError(origin + ": attn_efficiency must be <= 1");
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
  auto read_gib = [&](const char* key, double& out) {  // GiB: a number, or a string with a unit (common/size.hpp)
    if (auto* b = r.get(key)) {
      if (b->is_number()) r.read(key, out, finite_min(0));
      else if (b->is_string()) out = parse_gib(b->get<std::string>(), origin + ": key '" + key + "'");
      else json_fail(r.at(key), "expected GiB as a number or a string such as \"48GiB\" or \"48GB\", got " + json_describe(*b));
    }
  };
  read_gib("budget_gib", c.budget_gib);
  r.read("micro_batch_size", c.micro_batch_size, 1);
  r.read("microbatches", c.microbatches, 1);
  r.read("seq_len", c.seq_len, 1);
  r.read("schedule", c.schedule, {"gpipe", "1f1b", "interleaved-1f1b", "grouped", "auto"});
  r.read("recompute", c.recompute, {"auto", "on", "off"});
  r.read("selective", c.selective, {"auto", "on", "off"});
  r.read("offload", c.offload, {"auto", "all", "none"});
  r.read("cross_map", c.cross_map, {"auto", "off"});
  r.read("dp", c.dp, 1);
  r.read("tp", c.tp, 1);
  r.read("bucket_mib", c.bucket_mib, finite_min(0));
  r.read("layout", c.layout, {"", "auto"});
  read_gib("host_budget_gib", c.host_budget_gib);  // the node's host memory cap (NVMe tier)
  r.read("nvme_place", c.nvme_place, {"auto", "all"});
  r.read("update_order", c.update_order, {"auto", "fixed", "alternate"});
  r.read("gpu_optim_stream", c.gpu_optim_stream, {"opt", "comp"});
  if (auto* nv = r.get("nvme")) {  // "a,b" or ["a", "b"]
    auto bad = [&] { json_fail(r.at("nvme"), "expected a directory, a comma-separated list or an array of directories, got " + json_describe(*nv)); };
    std::vector<std::string> parts;
    if (nv->is_string()) {
      std::string v = nv->get<std::string>();
      size_t b = 0;
      for (;;) {
        auto c2 = v.find(',', b);
        parts.push_back(v.substr(b, c2 == std::string::npos ? std::string::npos : c2 - b));
        if (c2 == std::string::npos) break;
        b = c2 + 1;
      }
    } else if (nv->is_array()) {
      for (const auto& e : *nv) {
        if (!e.is_string()) bad();
        parts.push_back(e.get<std::string>());
      }
    } else bad();
    for (const auto& x : parts)
      if (x.empty()) bad();
    c.nvme = parts;
  }
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
