#include "arch/layout.hpp"

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

StageLayout stage_layout(const ir::ModelArch& a, int b, int e) {
  try {
    validate(a, "stage_layout");
  } catch (const ConfigError& err) {
    throw std::invalid_argument(err.what());
  }
  if (b < 0 || e > a.layers + 2 || b >= e)
    throw std::invalid_argument("stage_layout: layer range [" + std::to_string(b) + "," + std::to_string(e) +
                                ") is not a non-empty range inside [0," + std::to_string(a.layers + 2) + ")");
  const int64_t H = a.hidden, F = a.ffn, V = a.vocab, hd = head_dim(a), qd = q_dim(a), kvd = kv_dim(a);
  StageLayout s;
  s.layer_begin = b;
  s.layer_end = e;
  int64_t off = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, int layer, ParamKind kind, Role role,
                 bool transposed = false) {
    ParamInfo p;
    p.name = std::move(name);
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

std::vector<StageLayout> stage_layouts(const ir::ModelArch& a, const std::vector<int>& bounds) {
  if (bounds.size() < 2 || bounds.front() != 0 || bounds.back() != a.layers + 2)
    throw std::invalid_argument("stage_layouts: bounds must start at 0 and end at layers+2");
  std::vector<StageLayout> v;
  for (std::size_t i = 0; i + 1 < bounds.size(); ++i) v.push_back(stage_layout(a, bounds[i], bounds[i + 1]));
  return v;
}

int64_t layer_param_count(const ir::ModelArch& a, int layer) { return stage_layout(a, layer, layer + 1).param_count; }

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
