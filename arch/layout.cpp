#include "arch/layout.hpp"

#include <algorithm>
#include <stdexcept>

namespace mmoc::arch {

const char* to_string(Role r) {
  switch (r) {
    case Role::Embed: return "embed";
    case Role::PosEmbed: return "pos_embed";
    case Role::AttnNorm: return "attn_norm";
    case Role::AttnNormBias: return "attn_norm_bias";
    case Role::Q: return "q";
    case Role::K: return "k";
    case Role::V: return "v";
    case Role::QKV: return "qkv";
    case Role::QBias: return "q_bias";
    case Role::KBias: return "k_bias";
    case Role::VBias: return "v_bias";
    case Role::QKVBias: return "qkv_bias";
    case Role::QNorm: return "q_norm";
    case Role::KNorm: return "k_norm";
    case Role::O: return "o";
    case Role::OBias: return "o_bias";
    case Role::MlpNorm: return "mlp_norm";
    case Role::MlpNormBias: return "mlp_norm_bias";
    case Role::Gate: return "gate";
    case Role::Up: return "up";
    case Role::UpBias: return "up_bias";
    case Role::Down: return "down";
    case Role::DownBias: return "down_bias";
    case Role::FinalNorm: return "final_norm";
    case Role::FinalNormBias: return "final_norm_bias";
    case Role::Head: return "head";
  }
  return "?";
}

const ParamInfo* StageLayout::find(const std::string& name) const {
  for (const auto& p : params)
    if (p.name == name) return &p;
  return nullptr;
}

const ParamInfo* StageLayout::find(int layer, Role role) const {
  for (const auto& p : params)
    if (p.layer == layer && p.role == role) return &p;
  return nullptr;
}

bool head_needs_embedding(const ir::ModelArch& a) { return a.tied_embeddings; }

std::string embedding_name(const ir::ModelArch& a) {
  return is_gpt2(a) ? "transformer.wte.weight" : "model.embed_tokens.weight";
}

const char* to_string(TpSplit t) {
  switch (t) {
    case TpSplit::Replicated: return "replicated";
    case TpSplit::Column: return "column";
    case TpSplit::Row: return "row";
    case TpSplit::Vocab: return "vocab";
  }
  return "?";
}

int64_t Shard::rows() const {
  int64_t n = 0;
  for (const auto& p : pieces) n += p.length;
  return n;
}

std::vector<int64_t> ParamInfo::full_hf_shape() const {
  const auto& f = shard.full_shape.empty() ? shape : shard.full_shape;
  return transposed ? std::vector<int64_t>{f[1], f[0]} : f;
}

void check_tp(const ir::ModelArch& a, int tp, const std::string& where) {
  auto need = [&](bool ok, const std::string& msg) {
    if (!ok) throw ConfigError(where + ": " + msg);
  };
  need(tp >= 1, "tp (tensor-parallel degree) must be >= 1, got " + std::to_string(tp));
  if (tp == 1) return;
  const std::string t = "tp " + std::to_string(tp);
  need(a.heads % tp == 0, t + " does not divide the attention heads (num_attention_heads " + std::to_string(a.heads) +
                              "): every tensor-parallel rank needs whole heads");
  need(a.kv_heads % tp == 0, t + " does not divide the key/value heads (num_key_value_heads " +
                                 std::to_string(a.kv_heads) + "): every tensor-parallel rank needs whole kv heads");
  need(a.ffn % tp == 0, t + " does not divide the MLP size (intermediate_size " + std::to_string(a.ffn) + ")");
}

TpVocab tp_vocab(int64_t vocab, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size || vocab < 1)
    throw std::invalid_argument("tp_vocab: rank " + std::to_string(rank) + " of " + std::to_string(size) +
                                " with vocabulary " + std::to_string(vocab));
  TpVocab v;
  v.rows = (vocab + size - 1) / size;
  v.padded = v.rows * size;
  v.begin = v.rows * rank;
  v.valid = std::max<int64_t>(0, std::min(v.rows, vocab - v.begin));
  return v;
}

namespace {
TpSplit split_of(Role r) {
  switch (r) {
    case Role::Embed: case Role::Head: return TpSplit::Vocab;
    case Role::Q: case Role::K: case Role::V: case Role::QKV:
    case Role::QBias: case Role::KBias: case Role::VBias: case Role::QKVBias:
    case Role::Gate: case Role::Up: case Role::UpBias: return TpSplit::Column;
    case Role::O: case Role::Down: return TpSplit::Row;
    default: return TpSplit::Replicated;
  }
}
}  // namespace

StageLayout stage_layout(const ir::ModelArch& a, int b, int e, int tp_rank, int tp_size) {
  try {
    validate(a, "stage_layout");
    check_tp(a, tp_size, "stage_layout");
  } catch (const ConfigError& err) {
    throw std::invalid_argument(err.what());
  }
  if (tp_rank < 0 || tp_rank >= tp_size)
    throw std::invalid_argument("stage_layout: tp rank " + std::to_string(tp_rank) + " is not in [0," +
                                std::to_string(tp_size) + ")");
  if (b < 0 || e > a.layers + 2 || b >= e)
    throw std::invalid_argument("stage_layout: layer range [" + std::to_string(b) + "," + std::to_string(e) +
                                ") is not a non-empty range inside [0," + std::to_string(a.layers + 2) + ")");
  const int64_t H = a.hidden, F = a.ffn, V = a.vocab, hd = head_dim(a), qd = q_dim(a), kvd = kv_dim(a);
  const int64_t tp = tp_size, r = tp_rank;
  const TpVocab voc = tp_vocab(V, tp_rank, tp_size);
  StageLayout s;
  s.layer_begin = b;
  s.layer_end = e;
  s.tp_rank = tp_rank;
  s.tp_size = tp_size;
  int64_t off = 0;
  // The rank's shard of a parameter of whole shape `shape` with role `role` (tp 1: the whole tensor).
  auto shard_of = [&](Role role, std::vector<int64_t>& shape, Shard& sh) {
    sh.full_shape = shape;
    const TpSplit split = split_of(role);
    if (tp == 1 || split == TpSplit::Replicated) return;
    auto rows = [&](int64_t n) { return ShardPiece{r * n / tp, n / tp}; };  // rank r's 1/tp of n rows
    switch (role) {
      case Role::Embed: case Role::Head:
        sh.dim = 0;
        if (voc.valid > 0) sh.pieces = {{voc.begin, voc.valid}};
        shape[0] = voc.rows;  // padding rows after the valid ones
        return;
      case Role::Q: case Role::QBias: sh.dim = 0; sh.pieces = {rows(qd)}; break;
      case Role::K: case Role::V: case Role::KBias: case Role::VBias: sh.dim = 0; sh.pieces = {rows(kvd)}; break;
      case Role::QKV: case Role::QKVBias:  // GPT-2's c_attn: the rank's heads of q, of k and of v
        sh.dim = 0;
        for (int64_t part = 0; part < 3; ++part) sh.pieces.push_back({part * H + r * H / tp, H / tp});
        break;
      case Role::Gate: case Role::Up: case Role::UpBias: sh.dim = 0; sh.pieces = {rows(F)}; break;
      case Role::O: sh.dim = 1; sh.pieces = {rows(qd)}; break;
      case Role::Down: sh.dim = 1; sh.pieces = {rows(F)}; break;
      default: return;
    }
    shape[sh.dim] = sh.rows();
  };
  auto add = [&](std::string name, std::vector<int64_t> shape, int layer, ParamKind kind, Role role,
                 bool transposed = false) {
    ParamInfo p;
    p.name = std::move(name);
    p.split = split_of(role);
    shard_of(role, shape, p.shard);
    p.numel = 1;
    for (auto d : shape) p.numel *= d;
    p.shape = std::move(shape);
    p.offset = off;
    p.layer = layer;
    p.kind = kind;
    p.role = role;
    p.transposed = transposed;
    off += (p.numel + kParamAlign - 1) / kParamAlign * kParamAlign;
    s.param_count += p.numel;
    s.params.push_back(std::move(p));
  };
  using K = ParamKind;
  using R = Role;
  const bool gpt2 = is_gpt2(a);
  for (int l = b; l < e; ++l) {
    if (gpt2) {
      const std::string p = "transformer.h." + std::to_string(l - 1) + ".";
      if (l == 0) {
        add("transformer.wte.weight", {V, H}, l, K::Embedding, R::Embed);
        add("transformer.wpe.weight", {a.max_positions, H}, l, K::PosEmbedding, R::PosEmbed);
      } else if (l == a.layers + 1) {
        add("transformer.ln_f.weight", {H}, l, K::Norm, R::FinalNorm);
        add("transformer.ln_f.bias", {H}, l, K::Bias, R::FinalNormBias);
        if (!a.tied_embeddings) add("lm_head.weight", {V, H}, l, K::Head, R::Head);
      } else {
        add(p + "ln_1.weight", {H}, l, K::Norm, R::AttnNorm);
        add(p + "ln_1.bias", {H}, l, K::Bias, R::AttnNormBias);
        add(p + "attn.c_attn.weight", {3 * H, H}, l, K::Linear, R::QKV, true);
        add(p + "attn.c_attn.bias", {3 * H}, l, K::Bias, R::QKVBias);
        add(p + "attn.c_proj.weight", {H, H}, l, K::Linear, R::O, true);
        add(p + "attn.c_proj.bias", {H}, l, K::Bias, R::OBias);
        add(p + "ln_2.weight", {H}, l, K::Norm, R::MlpNorm);
        add(p + "ln_2.bias", {H}, l, K::Bias, R::MlpNormBias);
        add(p + "mlp.c_fc.weight", {F, H}, l, K::Linear, R::Up, true);
        add(p + "mlp.c_fc.bias", {F}, l, K::Bias, R::UpBias);
        add(p + "mlp.c_proj.weight", {H, F}, l, K::Linear, R::Down, true);
        add(p + "mlp.c_proj.bias", {H}, l, K::Bias, R::DownBias);
      }
      continue;
    }
    if (l == 0) {
      add("model.embed_tokens.weight", {V, H}, l, K::Embedding, R::Embed);
    } else if (l == a.layers + 1) {
      add("model.norm.weight", {H}, l, K::Norm, R::FinalNorm);
      if (!a.tied_embeddings) add("lm_head.weight", {V, H}, l, K::Head, R::Head);
    } else {
      const std::string p = "model.layers." + std::to_string(l - 1) + ".";
      add(p + "input_layernorm.weight", {H}, l, K::Norm, R::AttnNorm);
      add(p + "self_attn.q_proj.weight", {qd, H}, l, K::Linear, R::Q);
      add(p + "self_attn.k_proj.weight", {kvd, H}, l, K::Linear, R::K);
      add(p + "self_attn.v_proj.weight", {kvd, H}, l, K::Linear, R::V);
      if (a.qkv_bias) {
        add(p + "self_attn.q_proj.bias", {qd}, l, K::Bias, R::QBias);
        add(p + "self_attn.k_proj.bias", {kvd}, l, K::Bias, R::KBias);
        add(p + "self_attn.v_proj.bias", {kvd}, l, K::Bias, R::VBias);
      }
      if (a.qk_norm) {
        add(p + "self_attn.q_norm.weight", {hd}, l, K::Norm, R::QNorm);
        add(p + "self_attn.k_norm.weight", {hd}, l, K::Norm, R::KNorm);
      }
      add(p + "self_attn.o_proj.weight", {H, qd}, l, K::Linear, R::O);
      add(p + "post_attention_layernorm.weight", {H}, l, K::Norm, R::MlpNorm);
      add(p + "mlp.gate_proj.weight", {F, H}, l, K::Linear, R::Gate);
      add(p + "mlp.up_proj.weight", {F, H}, l, K::Linear, R::Up);
      add(p + "mlp.down_proj.weight", {H, F}, l, K::Linear, R::Down);
    }
  }
  s.numel = off;
  return s;
}

std::vector<StageLayout> stage_layouts(const ir::ModelArch& a, const std::vector<int>& bounds, int tp_rank,
                                       int tp_size) {
  if (bounds.size() < 2 || bounds.front() != 0 || bounds.back() != a.layers + 2)
    throw std::invalid_argument("stage_layouts: bounds must start at 0 and end at layers+2");
  std::vector<StageLayout> v;
  for (std::size_t i = 0; i + 1 < bounds.size(); ++i)
    v.push_back(stage_layout(a, bounds[i], bounds[i + 1], tp_rank, tp_size));
  return v;
}

int64_t layer_param_count(const ir::ModelArch& a, int layer, int tp_size) {
  return stage_layout(a, layer, layer + 1, 0, tp_size).param_count;
}

std::vector<std::pair<int64_t, int64_t>> grad_norm_ranges(const StageLayout& s) {
  std::vector<std::pair<int64_t, int64_t>> v;
  for (const auto& p : s.params) {
    if (s.replicated(p) && s.tp_rank != 0) continue;
    if (!v.empty() && v.back().second == p.offset) v.back().second = p.offset + p.numel;
    else v.push_back({p.offset, p.offset + p.numel});
  }
  return v;
}

std::vector<std::string> model_param_names(const ir::ModelArch& a) {
  std::vector<std::string> v;
  for (auto& p : full_layout(a).params) v.push_back(p.name);
  return v;
}

namespace {
bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}
}  // namespace

bool ignorable_hf_tensor(const ir::ModelArch& a, const std::string& n) {
  if (ends_with(n, "rotary_emb.inv_freq")) return true;
  if (is_gpt2(a)) return ends_with(n, ".attn.bias") || ends_with(n, ".attn.masked_bias");
  return false;
}

std::string legacy_hf_name(const ir::ModelArch& a, const std::string& n) {
  const std::string pre = "transformer.";
  if (is_gpt2(a) && n.compare(0, pre.size(), pre) == 0) return n.substr(pre.size());
  return "";
}

}  // namespace mmoc::arch
