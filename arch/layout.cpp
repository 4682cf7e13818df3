#include "engine/model/layout.hpp"

#include <stdexcept>

namespace mmoc::engine {

const ParamInfo* StageLayout::find(const std::string& name) const {
  for (const auto& p : params)
    if (p.name == name) return &p;
  return nullptr;
}

bool head_needs_embedding(const ir::ModelArch& a) { return a.tied_embeddings; }

StageLayout stage_layout(const ir::ModelArch& a, int b, int e) {
  if (a.layers < 0 || a.hidden <= 0 || a.ffn <= 0 || a.heads <= 0 || a.kv_heads <= 0 || a.vocab <= 0 ||
      a.hidden % a.heads != 0 || a.heads % a.kv_heads != 0)
    throw std::invalid_argument("stage_layout: inconsistent model architecture");
  if (b < 0 || e > a.layers + 2 || b >= e)
    throw std::invalid_argument("stage_layout: layer range [" + std::to_string(b) + "," + std::to_string(e) +
                                ") is not a non-empty range inside [0," + std::to_string(a.layers + 2) + ")");
  const int64_t H = a.hidden, F = a.ffn, V = a.vocab, hd = a.hidden / a.heads;
  StageLayout s;
  s.layer_begin = b;
  s.layer_end = e;
  int64_t off = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, int layer, ParamKind kind) {
    ParamInfo p;
    p.name = std::move(name);
    p.numel = 1;
    for (auto d : shape) p.numel *= d;
    p.shape = std::move(shape);
    p.offset = off;
    p.layer = layer;
    p.kind = kind;
    off += (p.numel + kParamAlign - 1) / kParamAlign * kParamAlign;
    s.param_count += p.numel;
    s.params.push_back(std::move(p));
  };
  for (int l = b; l < e; ++l) {
    if (l == 0) {
      add("model.embed_tokens.weight", {V, H}, l, ParamKind::Embedding);
    } else if (l == a.layers + 1) {
      add("model.norm.weight", {H}, l, ParamKind::Norm);
      if (!a.tied_embeddings) add("lm_head.weight", {V, H}, l, ParamKind::Head);
    } else {
      const std::string p = "model.layers." + std::to_string(l - 1) + ".";
      add(p + "input_layernorm.weight", {H}, l, ParamKind::Norm);
      add(p + "self_attn.q_proj.weight", {a.heads * hd, H}, l, ParamKind::Linear);
      add(p + "self_attn.k_proj.weight", {a.kv_heads * hd, H}, l, ParamKind::Linear);
      add(p + "self_attn.v_proj.weight", {a.kv_heads * hd, H}, l, ParamKind::Linear);
      add(p + "self_attn.o_proj.weight", {H, a.heads * hd}, l, ParamKind::Linear);
      add(p + "post_attention_layernorm.weight", {H}, l, ParamKind::Norm);
      add(p + "mlp.gate_proj.weight", {F, H}, l, ParamKind::Linear);
      add(p + "mlp.up_proj.weight", {F, H}, l, ParamKind::Linear);
      add(p + "mlp.down_proj.weight", {H, F}, l, ParamKind::Linear);
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

std::vector<std::string> model_param_names(const ir::ModelArch& a) {
  std::vector<std::string> v;
  for (auto& p : full_layout(a).params) v.push_back(p.name);
  return v;
}

}  // namespace mmoc::engine
