// Every model family against HF transformers' own outputs (the project's fixtures, tools/scripts/make_hf_fixtures.py,
// computed on the CPU in fp32): config.json reading, logits, loss and every parameter's gradient for the whole model
// and for splits into 2..6 stages (tied heads included: the head-only stage gets the embedding matrix), checkpoint
// load (single file, sharded, GPT-2's legacy names) and save (bytes equal to HF's file, tensor by tensor; GPT-2's
// Conv1D transposed back; no lm_head.weight when tied; bf16/fp16 = the weights rounded), random init by kind, and the
// compiler's memory model of each layer kind against what the layer keeps.
#include <ATen/ATen.h>
#include <malloc.h>
#include <torch/csrc/autograd/autograd.h>
#include <unistd.h>

#include "arch/arch.hpp"
#include "cost/spec.hpp"
#include "engine/io/fsutil.hpp"
#include "engine/io/hf_config.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/model.hpp"

#include "tests/model/hf_ref.hpp"
#include "tests/torch_doctest.hpp"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

using namespace mmoc;
using namespace mmoc::engine;
using namespace mmoc::test;

namespace {
// One fixture per family and tie (the llama ones are covered by test_model.cpp).
const char* kFixtures[] = {"llama3-gqa-fp32", "llama3-tied-fp32", "qwen2-fp32", "qwen2-tied-fp32", "qwen3-fp32",
                           "qwen3-tied-fp32", "mistral-fp32",     "gpt2-fp32",  "llama-gqa-fp32", "llama-tied-mha-fp32"};
// HF's gradient of a parameter in the flat tensor's orientation.
at::Tensor ref_grad(const Ref& r, const ParamInfo& p) {
  at::Tensor g = read_tensor(r.file, "grad." + p.name);
  return p.transposed ? g.t() : g;
}

struct TmpDir {
  std::string p;
  TmpDir() {
    char tmpl[] = "/tmp/mmoc_families_test.XXXXXX";
    p = ::mkdtemp(tmpl);
  }
  ~TmpDir() { io::remove_tree(p); }
  std::string operator/(const std::string& n) const { return io::join_path(p, n); }
};

struct Run {
  at::Tensor logits;
  std::vector<at::Tensor> grads;  // per stage, flat
  double loss = 0;
};
// Stages chained like the engine does: each stage gets a detached input, backward feeds input.grad back. A tied model's
// head-only stage gets its own copy of the embedding matrix, whose gradient is added into the embedding's stage (what
// the engine will do across pipeline stages).
Run run_stages(const ir::ModelArch& a, const std::vector<StageLayout>& Ls, std::vector<at::Tensor> flats, const Ref& r) {
  auto rope = make_rope(a, r.ids.size(1));
  for (auto& f : flats) f = f.detach().clone().requires_grad_(true);
  std::vector<at::Tensor> ins, outs;
  at::Tensor x = r.ids, tied;
  const std::string emb = embedding_name(a);
  for (size_t s = 0; s < Ls.size(); ++s) {
    if (s > 0) x = x.detach().requires_grad_(true);
    ins.push_back(x);
    if (s + 1 == Ls.size() && head_needs_embedding(a) && !Ls[s].has_embedding()) {
      CHECK(Ls[0].find(emb) == Ls[0].find(0, Role::Embed));
      tied = embedding_view(a, Ls[0], flats[0].detach()).clone().requires_grad_(true);  // what the engine will send
    }
    x = stage_forward(a, Ls[s], flats[s], x, rope, s + 1 == Ls.size() ? tied : at::Tensor());
    outs.push_back(x);
  }
  auto loss = lm_loss_sum(outs.back(), r.labels) / static_cast<double>(count_tokens(r.labels));
  loss.backward();
  for (size_t s = Ls.size() - 1; s-- > 0;) outs[s].backward(ins[s + 1].grad());
  Run res{outs.back().detach(), {}, loss.item<double>()};
  for (size_t s = 0; s < Ls.size(); ++s) res.grads.push_back(flats[s].grad().clone());
  if (tied.defined()) add_tied_embedding_grad(a, Ls[0], res.grads[0], tied.grad());  // and the gradient it will return
  return res;
}

// Boundaries of `n` stages over the model's layers, as even as possible.
std::vector<int> even_bounds(int model_layers, int n) {
  std::vector<int> b;
  for (int i = 0; i <= n; ++i) b.push_back((int)((int64_t)i * model_layers / n));
  return b;
}
}  // namespace

TEST_CASE("config.json of every family: family, features, HF's defaults") {
  struct Want {
    const char* folder;
    const char* family;
    int head_dim, window, max_positions;
    bool qkv_bias, qk_norm, tied;
    const char* rope_type;
  };
  for (const Want& w : {Want{"llama3-gqa-fp32", "llama", 32, 0, 0, false, false, false, "llama3"},
                        Want{"llama3-tied-fp32", "llama", 32, 0, 0, false, false, true, "llama3"},
                        Want{"qwen2-fp32", "qwen2", 16, 0, 0, true, false, false, "default"},
                        Want{"qwen3-fp32", "qwen3", 24, 0, 0, false, true, false, "default"},
                        Want{"mistral-fp32", "mistral", 16, 7, 0, false, false, false, "default"},
                        Want{"gpt2-fp32", "gpt2", 16, 0, 64, false, false, true, "default"},
                        Want{"gpt2-legacy-names-fp32", "gpt2", 16, 0, 64, false, false, true, "default"}}) {
    CAPTURE(std::string(w.folder));
    auto c = io::read_hf_config(kFix + w.folder);
    const auto& a = c.arch;
    CHECK(a.family == w.family);
    CHECK(arch::head_dim(a) == w.head_dim);
    CHECK(a.sliding_window == w.window);
    CHECK(a.max_positions == w.max_positions);
    CHECK(a.qkv_bias == w.qkv_bias);
    CHECK(a.qk_norm == w.qk_norm);
    CHECK(a.tied_embeddings == w.tied);
    CHECK(a.rope_type == w.rope_type);
    // the parameter count of the layout = the fixture's own count (HF's num_parameters)
    std::ifstream in(kFix + w.folder + "/hf_reference.json");
    CHECK(full_layout(a).param_count == nlohmann::json::parse(in)["num_parameters"].get<int64_t>());
    // what we write reads back as the same model
    auto back = io::parse_hf_config(io::hf_config_json(c));
    back.arch.name = a.name;
    CHECK(back.arch == a);
  }
  auto l3 = io::read_hf_config(kFix + "llama3-gqa-fp32").arch;
  CHECK(l3.rope_theta == 500000.0);
  CHECK(l3.rope_factor == 8.0);
  CHECK(l3.rope_low_freq_factor == 1.0);
  CHECK(l3.rope_high_freq_factor == 4.0);
  CHECK(l3.rope_original_max_positions == 1024);
  CHECK(l3.norm_eps == 1e-5);
  CHECK(io::read_hf_config(kFix + "qwen3-fp32").arch.head_dim == 24);  // 24 != 64/4: kept
  CHECK(io::read_hf_config(kFix + "qwen2-fp32").arch.head_dim == 0);   // = hidden/heads: canonical 0
}

TEST_CASE("the one config.json reader: HF's defaults per family, both spellings, refusals that name the key") {
  auto parse = [](const std::string& body) { return io::parse_hf_config("{" + body + "}", "cfg.json").arch; };
  auto err = [](const std::string& body) { return error_of([&] { io::parse_hf_config("{" + body + "}", "cfg.json"); }); };
  const std::string shape = R"("hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":8,"vocab_size":50)";
  // norm eps left out: the family's HF default (LlamaConfig/MistralConfig/Qwen2Config/Qwen3Config 1e-6, GPT2Config 1e-5)
  for (const char* mt : {"llama", "mistral", "qwen2", "qwen3"}) {
    CAPTURE(std::string(mt));
    auto a = parse(R"("model_type":")" + std::string(mt) + R"(",)" + shape + R"(,"num_key_value_heads":8)");
    CHECK(a.family == mt);
    CHECK(a.norm_eps == 1e-6);
    CHECK(a.rope_theta == 10000.0);
    CHECK_FALSE(a.tied_embeddings);
  }
  auto g = parse(R"("model_type":"gpt2","n_embd":64,"n_layer":2,"n_head":4,"vocab_size":50)");
  CHECK(g.norm_eps == 1e-5);
  CHECK(g.tied_embeddings);
  CHECK(g.ffn == 256);            // n_inner null: 4 * n_embd
  CHECK(g.max_positions == 1024); // n_positions default
  // family defaults for keys HF's classes fill in: Qwen3 head_dim 128, Qwen2 kv heads 32, Mistral window 4096
  CHECK(arch::head_dim(parse(R"("model_type":"qwen3",)" + shape + R"(,"num_key_value_heads":8)")) == 128);
  CHECK(parse(R"("model_type":"qwen2","hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":32,"vocab_size":50)").kv_heads == 32);
  CHECK(parse(R"("model_type":"mistral",)" + shape).sliding_window == 4096);
  CHECK(parse(R"("model_type":"mistral",)" + shape + R"(,"sliding_window":null)").sliding_window == 0);
  CHECK(parse(R"("model_type":"llama",)" + shape).kv_heads == 8);  // LlamaConfig: None -> heads
  // family from architectures alone; neither: llama
  CHECK(parse(R"("architectures":["Qwen3ForCausalLM"],)" + shape + R"(,"num_key_value_heads":8)").family == "qwen3");
  CHECK(parse(shape).family == "llama");
  // rope: transformers 4's rope_scaling (with top-level rope_theta) and 5's rope_parameters read the same
  const std::string l3 = R"("factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192,"rope_type":"llama3")";
  auto v4 = parse(shape + R"(,"rope_theta":500000.0,"rope_scaling":{)" + l3 + "}");
  auto v5 = parse(shape + R"(,"rope_parameters":{"rope_theta":500000.0,)" + l3 + "}");
  CHECK(v4 == v5);
  CHECK(v4.rope_type == "llama3");
  CHECK(v4.rope_original_max_positions == 8192);
  CHECK(parse(shape + R"(,"max_position_embeddings":4096,"rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"type":"llama3"})")
            .rope_original_max_positions == 4096);  // falls back to max_position_embeddings, as HF does
  // Qwen2/3 sliding windows: all layers or none
  CHECK(parse(R"("model_type":"qwen2",)" + shape + R"(,"num_key_value_heads":8,"use_sliding_window":true,"sliding_window":32,"max_window_layers":0)")
            .sliding_window == 32);
  CHECK(parse(R"("model_type":"qwen2",)" + shape + R"(,"num_key_value_heads":8,"use_sliding_window":false,"sliding_window":32)").sliding_window == 0);
  CHECK(has(err(R"("model_type":"qwen2",)" + shape + R"(,"num_key_value_heads":8,"use_sliding_window":true,"sliding_window":32,"max_window_layers":1)"),
            "1 of 2 layers use sliding-window attention"));
  // refusals name the key
  CHECK(has(err(R"("model_type":"qwen3",)" + shape + R"(,"num_key_value_heads":8,"attention_bias":true)"), "attention_bias"));
  CHECK(has(err(R"("model_type":"llama",)" + shape + R"(,"mlp_bias":true)"), "mlp_bias"));
  CHECK(has(err(R"("model_type":"gpt2","n_embd":64,"n_layer":2,"n_head":4,"vocab_size":50,"activation_function":"relu")"), "activation_function"));
  CHECK(has(err(R"("model_type":"gpt2","n_embd":64,"n_layer":2,"n_head":4,"vocab_size":50,"scale_attn_by_inverse_layer_idx":true)"),
            "scale_attn_by_inverse_layer_idx"));
  CHECK(has(err(shape + R"(,"rope_scaling":{"rope_type":"llama3","factor":8.0})"), "lacks 'low_freq_factor'"));
  CHECK(has(err(shape + R"(,"rope_parameters":{"rope_type":"dynamic","factor":2.0})"), "rope_type 'dynamic'"));
  CHECK(has(err(R"("model_type":"mistral","architectures":["LlamaForCausalLM"],)" + shape), "does not match model_type 'mistral'"));
  CHECK(has(err(R"("model_type":"gemma3",)" + shape), "model_type 'gemma3' is not supported (supported: llama, mistral, qwen2, qwen3, gpt2)"));
  CHECK(has(err(R"("architectures":["MistralForSequenceClassification"],)" + shape), "architectures 'MistralForSequenceClassification'"));
  // the writer: every feature survives a round trip
  io::HfConfig c;
  c.arch = parse(R"("model_type":"qwen3",)" + shape + R"(,"num_key_value_heads":2,"head_dim":24,"rms_norm_eps":1e-5,"tie_word_embeddings":true)");
  CHECK(io::parse_hf_config(io::hf_config_json(c)).arch == c.arch);
  c.arch = parse(R"("model_type":"qwen2",)" + shape + R"(,"num_key_value_heads":8,"use_sliding_window":true,"sliding_window":16,"max_window_layers":0)");
  CHECK(io::parse_hf_config(io::hf_config_json(c)).arch == c.arch);
  c.arch = v5;
  CHECK(io::parse_hf_config(io::hf_config_json(c)).arch == c.arch);
  c.arch = g;
  c.max_position_embeddings = g.max_positions;
  CHECK(io::parse_hf_config(io::hf_config_json(c)).arch == c.arch);
}

TEST_CASE("every family: logits, loss and gradients equal HF's, whole model and 2..6 stages") {
  for (const char* folder : kFixtures) {
    std::string folder_s = folder;
    CAPTURE(folder_s);
    auto c = io::read_hf_config(kFix + folder);
    const auto& a = c.arch;
    Ref r = read_ref(folder);
    const int nl = a.layers + 2;
    double worst_logits = 0, worst_grad = 0, worst_loss = 0;
    for (int n : {1, 2, 3, 4, 6}) {
      if (n > nl) continue;
      CAPTURE(n);
      auto Ls = stage_layouts(a, even_bounds(nl, n));
      auto flats = load_hf_weights(kFix + folder, a, Ls);
      Run run = run_stages(a, Ls, flats, r);
      CHECK((run.logits.sizes() == r.logits.sizes()));
      CHECK(rel_diff(run.logits, r.logits) < 1e-5);
      CHECK(std::abs(run.loss - r.loss) <= 1e-5 * std::abs(r.loss));
      worst_logits = std::max(worst_logits, rel_diff(run.logits, r.logits));
      worst_loss = std::max(worst_loss, std::abs(run.loss - r.loss) / std::abs(r.loss));
      int checked = 0;
      for (size_t s = 0; s < Ls.size(); ++s)
        for (const auto& p : Ls[s].params) {
          CAPTURE(p.name);
          const double d = rel_diff(run.grads[s].narrow(0, p.offset, p.numel).view(p.shape), ref_grad(r, p));
          CHECK(d < 1e-5);
          worst_grad = std::max(worst_grad, d);
          ++checked;
        }
      CHECK(checked == (int)full_layout(a).params.size());
    }
    MESSAGE(folder_s << ": worst relative difference from HF over 1.." << std::min(nl, 6) << " stages: logits "
                     << worst_logits << ", loss " << worst_loss << ", gradients " << worst_grad);
  }
}

TEST_CASE("every family: checkpoints load (single, sharded, legacy GPT-2 names) and save as HF's bytes") {
  TmpDir d;
  // sharded = single file; GPT-2 files without "transformer." = with it
  for (auto [x, y] : {std::pair{"qwen2-fp32", "qwen2-fp32-sharded"}, std::pair{"gpt2-fp32", "gpt2-legacy-names-fp32"}}) {
    auto a = io::read_hf_config(kFix + x).arch;
    auto Ls = stage_layouts(a, {0, 2, a.layers + 2});
    auto p = load_hf_weights(kFix + x, a, Ls), q = load_hf_weights(kFix + y, a, Ls);
    for (size_t i = 0; i < p.size(); ++i) CHECK(at::equal(p[i], q[i]));
  }
  for (const char* folder : kFixtures) {
    std::string folder_s = folder;
    CAPTURE(folder_s);
    auto c = io::read_hf_config(kFix + folder);
    const auto& a = c.arch;
    auto Ls = stage_layouts(a, even_bounds(a.layers + 2, 3));
    auto flats = load_hf_weights(kFix + folder, a, Ls);
    const std::string out = d / folder;
    save_hf_checkpoint(out, a, Ls, flats, at::kFloat);
    auto mine = io::Checkpoint::open(out), hf = io::Checkpoint::open(kFix + folder);
    CHECK(mine.names() == hf.names());  // tied: no lm_head.weight on disk, as HF writes it
    if (a.tied_embeddings) CHECK_FALSE(mine.contains("lm_head.weight"));
    for (auto& n : hf.names()) {
      CAPTURE(n);
      CHECK(mine.info(n).shape == hf.info(n).shape);  // GPT-2: Conv1D [in, out] again
      auto x = mine.data(n), y = hf.data(n);
      CHECK((x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size()) == 0));
    }
    auto back = io::read_hf_config(out).arch;
    back.name = a.name;
    CHECK(back == a);
    for (auto dt : {at::kBFloat16, at::kHalf}) {
      SaveOptions so;
      so.max_shard_bytes = 20000;  // sharded too
      save_hf_checkpoint(out, a, Ls, flats, dt, so);
      CHECK(io::Checkpoint::open(out).sharded());
      auto lo = load_hf_weights(out, a, Ls);
      for (size_t i = 0; i < Ls.size(); ++i) CHECK(at::equal(lo[i], flats[i].to(dt).to(at::kFloat)));
    }
  }
}

TEST_CASE("loader errors for the new layouts name the tensor") {
  TmpDir d;
  auto a = io::read_hf_config(kFix + "gpt2-fp32").arch;
  auto ck = io::Checkpoint::open(kFix + "gpt2-fp32");
  std::vector<io::TensorToWrite> tw;
  std::vector<int64_t> wrong = {192, 64};  // c_attn stored as [out, in]: not HF's Conv1D layout
  for (auto& n : ck.names()) {
    auto& ti = ck.info(n);
    auto bytes = ck.data(n);
    tw.push_back({n, ti.dtype, n == "transformer.h.1.attn.c_attn.weight" ? wrong : ti.shape, bytes.data(), bytes.size()});
  }
  io::write_safetensors(d / "model.safetensors", tw);
  auto e = error_of([&] { load_hf_weights(d.p, a, {full_layout(a)}); });
  CHECK(has(e, "'transformer.h.1.attn.c_attn.weight' has shape [192,64], expected [64,192]"));
  // a Qwen2 checkpoint without its q bias
  auto q = io::read_hf_config(kFix + "qwen2-fp32").arch;
  auto qk = io::Checkpoint::open(kFix + "qwen2-fp32");
  tw.clear();
  for (auto& n : qk.names()) {
    if (n == "model.layers.2.self_attn.q_proj.bias") continue;
    auto bytes = qk.data(n);
    tw.push_back({n, qk.info(n).dtype, qk.info(n).shape, bytes.data(), bytes.size()});
  }
  io::write_safetensors(d / "model.safetensors", tw);
  CHECK(has(error_of([&] { load_hf_weights(d.p, q, {full_layout(q)}); }), "missing tensor 'model.layers.2.self_attn.q_proj.bias'"));
  // Qwen3 weights are not a LLaMA model of the same sizes (q_norm/k_norm are unexpected there)
  auto l = io::read_hf_config(kFix + "qwen3-fp32").arch;
  l.family = "llama";
  l.qk_norm = false;
  CHECK(has(error_of([&] { load_hf_weights(kFix + "qwen3-fp32", l, {full_layout(l)}); }), "q_norm"));
}

TEST_CASE("random init by parameter kind: norms 1, biases 0, weights and position embeddings normal") {
  for (const char* folder : {"gpt2-fp32", "qwen2-fp32", "qwen3-fp32"}) {
    auto a = io::read_hf_config(kFix + folder).arch;
    auto L = full_layout(a);
    auto flat = new_flat(L, at::kFloat);
    init_weights(a, L, flat, 3);
    int biases = 0, norms = 0, pos = 0;
    for (auto& p : L.params) {
      CAPTURE(p.name);
      auto seg = flat.narrow(0, p.offset, p.numel);
      if (p.kind == ParamKind::Norm) {
        CHECK(at::equal(seg, at::ones_like(seg)));
        ++norms;
      } else if (p.kind == ParamKind::Bias) {
        CHECK(max_abs(seg) == 0);
        ++biases;
      } else {
        CHECK(std::abs(seg.std().item<double>() - 0.02) < 0.004);
        pos += p.kind == ParamKind::PosEmbedding;
      }
    }
    CHECK(norms > 0);
    if (arch::is_gpt2(a)) CHECK((biases == 6 * a.layers + 1 && pos == 1));
    if (a.qkv_bias) CHECK(biases == 3 * a.layers);
  }
}

TEST_CASE("stage_forward refusals: tied head without the embedding, sequences past the learned positions") {
  auto a = io::read_hf_config(kFix + "gpt2-fp32").arch;
  auto L = stage_layout(a, a.layers + 1, a.layers + 2);  // head only, tied
  auto flat = new_flat(L, at::kFloat);
  auto h = at::zeros({1, 4, a.hidden});
  CHECK(has(error_of([&] { stage_forward(a, L, flat, h, make_rope(a, 128)); }), "tied lm_head needs the embedding"));
  CHECK(has(error_of([&] { embedding_view(a, L, flat); }), "does not hold the token embedding"));
  auto E = stage_layout(a, 0, 1);
  auto ids = at::zeros({1, 65}, at::kLong);
  CHECK(has(error_of([&] { stage_forward(a, E, new_flat(E, at::kFloat), ids, make_rope(a, 128)); }), "64 learned positions"));
}

// ---- memory: what a decoder layer's forward keeps for backward, against the compiler's model --------------------
// As test_model.cpp's LLaMA case: glibc's heap statistics count every live CPU tensor, so the bytes a forward leaves
// behind (saved-for-backward tensors plus the output) are measured exactly; fused RMSNorm as on the GPU.
static int64_t heap_in_use() {
  struct mallinfo2 mi = mallinfo2();
  return (int64_t)mi.uordblks + (int64_t)mi.hblkhd;
}

TEST_CASE("every layer kind keeps what the compiler's stash model says: linear in tokens, no weight copies") {
  struct Case {
    const char* name;
    std::function<void(mmoc::ModelSpec&)> set;
  };
  auto base = [](mmoc::ModelSpec& m, const char* fam) {
    arch::Family f;
    arch::parse_family(fam, f);
    static_cast<ir::ModelArch&>(m) = arch::make_arch(f);
    m.name = "probe";
    m.layers = 2; m.hidden = 512; m.ffn = 1376; m.heads = 8; m.kv_heads = 8; m.vocab = 1000; m.max_seq = 512;
  };
  const Case cases[] = {
      {"qwen2 gqa", [&](mmoc::ModelSpec& m) { base(m, "qwen2"); m.kv_heads = 2; }},
      {"qwen3 mha head_dim 96", [&](mmoc::ModelSpec& m) { base(m, "qwen3"); m.head_dim = 96; }},
      {"qwen3 gqa head_dim 96", [&](mmoc::ModelSpec& m) { base(m, "qwen3"); m.head_dim = 96; m.kv_heads = 2; }},
      {"llama3 rope", [&](mmoc::ModelSpec& m) {
         base(m, "llama"); m.kv_heads = 2; m.rope_type = "llama3"; m.rope_factor = 8; m.rope_low_freq_factor = 1;
         m.rope_high_freq_factor = 4; m.rope_original_max_positions = 64; }},
      {"mistral window >= seq", [&](mmoc::ModelSpec& m) { base(m, "mistral"); m.kv_heads = 2; m.sliding_window = 4096; }},
      {"gpt2", [&](mmoc::ModelSpec& m) { base(m, "gpt2"); m.ffn = 2048; m.max_positions = 512; m.tied_embeddings = true; }},
  };
  for (const Case& c : cases) {
    mmoc::ModelSpec m;
    c.set(m);
    INFO(std::string(c.name));
    const ir::ModelArch a = m.arch();
    arch::validate(a, "probe");
    const StageLayout lay = stage_layout(a, 1, 2);  // one decoder layer
    at::Tensor flat = at::zeros({lay.numel}, at::kFloat);
    init_weights(a, lay, flat, 1);
    flat = flat.to(at::kBFloat16);
    at::Tensor w = flat.detach().requires_grad_(true);
    auto kept = [&](int T) {
      const Rope rope = make_rope(a, T);
      at::Tensor x = at::randn({2, T, a.hidden}).to(at::kBFloat16).requires_grad_(true);
      (void)stage_forward(a, lay, w, x, rope, {}, true);  // warm-up (one-time allocations)
      const int64_t before = heap_in_use();
      at::Tensor out = stage_forward(a, lay, w, x, rope, {}, true);
      const int64_t k = heap_in_use() - before;
      auto g = torch::autograd::grad({out}, {w, x}, {at::ones_like(out)});
      CHECK(g[0].numel() == lay.numel);
      return k;
    };
    const int64_t k1 = kept(128), k2 = kept(256);
    const int64_t model = m.layer_stash_bytes(1, 2, 256, /*recompute=*/false, 2);
    // The model counts what the CUDA kernels keep. On the CPU ATen's RMSNorm is composite: it keeps an fp32 copy of
    // its input and of the normalised values (8 bytes per normalised element) instead of the bf16 input (which the
    // fused kernel keeps; for the decoder norms the model counts it anyway, as the layer input and mid residual); with
    // qk_norm and GQA nothing else keeps the q/k/v projection output alive (the CUDA kernel's saved input does).
    const int64_t T = 2 * 256, qd = arch::q_dim(a), kvd = arch::kv_dim(a);
    int64_t cpu = model;
    // (the decoder norms' inputs only: NormLinear recomputes the rest in backward, model.cpp)
    if (!arch::is_gpt2(a)) cpu += T * 8 * (a.qk_norm ? qd + kvd : 0);
    if (a.qk_norm && a.kv_heads != a.heads) cpu -= T * (qd + 2 * kvd) * 2;
    INFO("kept " << k1 << " bytes at 128 tokens/row, " << k2 << " at 256; model at 256: " << model << ", on the CPU " << cpu);
    CHECK(std::abs(double(k2 - 2 * k1)) < 0.02 * double(k2));  // no constant term
    CHECK(double(k2) >= 0.95 * double(cpu));
    CHECK(double(k2) <= 1.05 * double(cpu));
  }
}
