// engine/model against HF transformers' own outputs (tools/scripts/make_hf_fixtures.py): logits, loss, gradients,
// stage splits, checkpoint load/save round trips and loader errors.
#include <ATen/ATen.h>
#include <unistd.h>

#include "engine/io/fsutil.hpp"
#include "engine/io/hf_config.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/model.hpp"

#include "tests/model/hf_ref.hpp"
#include "tests/torch_doctest.hpp"

#include <cstdlib>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

using namespace mmoc;
using namespace mmoc::engine;
using namespace mmoc::test;

namespace {
const char* kFolders[] = {"llama-gqa-fp32", "llama-gqa-fp32-sharded", "llama-gqa-bf16", "llama-tied-mha-fp32"};

// (no std::filesystem here: libtorch.so exports its own copies of those symbols; see engine/io/fsutil.hpp)
struct TmpDir {
  std::string p;
  TmpDir() {
    char tmpl[] = "/tmp/mmoc_model_test.XXXXXX";
    p = ::mkdtemp(tmpl);
  }
  ~TmpDir() { io::remove_tree(p); }
  std::string operator/(const std::string& n) const { return io::join_path(p, n); }
};

// Single-stage run: logits, loss mean, flat gradient.
struct Run {
  at::Tensor logits, grad;
  double loss = 0;
};
Run run_single(const ir::ModelArch& a, const StageLayout& L, const at::Tensor& flat0, const Ref& r) {
  auto flat = flat0.detach().clone().requires_grad_(true);
  auto rope = make_rope(a, r.ids.size(1), flat.device());
  auto logits = stage_forward(a, L, flat, r.ids, rope);
  auto n = count_tokens(r.labels);
  auto loss = lm_loss_sum(logits, r.labels) / static_cast<double>(n);
  loss.backward();
  return {logits.detach(), flat.grad(), loss.item<double>()};
}

// Three stages chained like the engine does: each stage gets a detached input, backward feeds input.grad back.
// For a tied model the head stage gets its own copy of the embedding, whose gradient is added to stage 0's.
std::vector<Run> run_split(const ir::ModelArch& a, const std::vector<StageLayout>& Ls, std::vector<at::Tensor> flats, const Ref& r) {
  auto rope = make_rope(a, r.ids.size(1));
  for (auto& f : flats) f = f.detach().clone().requires_grad_(true);
  std::vector<at::Tensor> ins, outs;
  at::Tensor x = r.ids;
  at::Tensor tied;
  for (size_t s = 0; s < Ls.size(); ++s) {
    if (s > 0) x = x.detach().requires_grad_(true);
    ins.push_back(x);
    if (s + 1 == Ls.size() && head_needs_embedding(a) && !Ls[s].has_embedding()) {
      auto* p = Ls[0].find("model.embed_tokens.weight");
      tied = flats[0].detach().narrow(0, p->offset, p->numel).view(p->shape).clone().requires_grad_(true);
    }
    x = stage_forward(a, Ls[s], flats[s], x, rope, s + 1 == Ls.size() ? tied : at::Tensor());
    outs.push_back(x);
  }
  auto loss = lm_loss_sum(outs.back(), r.labels) / static_cast<double>(count_tokens(r.labels));
  loss.backward();
  for (size_t s = Ls.size() - 1; s-- > 0;) outs[s].backward(ins[s + 1].grad());
  std::vector<Run> res;
  for (size_t s = 0; s < Ls.size(); ++s) res.push_back({outs[s].detach(), flats[s].grad().clone(), loss.item<double>()});
  if (tied.defined()) {
    auto* p = Ls[0].find("model.embed_tokens.weight");
    res[0].grad.narrow(0, p->offset, p->numel).add_(tied.grad().reshape({-1}));
  }
  return res;
}
}  // namespace

TEST_CASE("stage layout: names, shapes, offsets, splits") {
  auto c = io::read_hf_config(kFix + "llama-gqa-fp32");
  auto full = full_layout(c.arch);
  CHECK(full.params.size() == 1 + 4 * 9 + 2);
  CHECK(full.params.front().name == "model.embed_tokens.weight");
  CHECK(full.params[1].name == "model.layers.0.input_layernorm.weight");
  CHECK(full.params[1].layer == 1);
  CHECK((full.find("model.layers.0.self_attn.k_proj.weight")->shape == std::vector<int64_t>{32, 64}));
  CHECK((full.find("model.layers.3.mlp.down_proj.weight")->shape == std::vector<int64_t>{64, 176}));
  CHECK(full.params.back().name == "lm_head.weight");
  CHECK(full.param_count == 197824);  // the fixture index's total_parameters
  for (auto& p : full.params) CHECK(p.offset % kParamAlign == 0);
  auto split = stage_layouts(c.arch, {0, 2, 4, 6});
  int64_t sum = 0;
  for (auto& s : split) sum += s.param_count;
  CHECK(sum == full.param_count);
  CHECK(split[1].params.front().name == "model.layers.1.input_layernorm.weight");
  CHECK(split[2].has_head(c.arch));
  auto t = io::read_hf_config(kFix + "llama-tied-mha-fp32");
  CHECK(head_needs_embedding(t.arch));
  CHECK(full_layout(t.arch).find("lm_head.weight") == nullptr);
  CHECK(has(error_of([&] { stage_layout(c.arch, 3, 3); }), "range"));
  CHECK(has(error_of([&] { stage_layout(c.arch, 0, 7); }), "range"));
}

TEST_CASE("forward/loss/backward match HF for every fixture, single stage and 3 stages") {
  for (const char* folder : kFolders) {
    std::string folder_s = folder;
    CAPTURE(folder_s);
    auto c = io::read_hf_config(kFix + folder);
    const auto& a = c.arch;
    auto L = full_layout(a);
    auto flat = load_hf_weights(kFix + folder, a, {L})[0];  // bf16 on disk -> fp32
    CHECK((flat.scalar_type() == at::kFloat));
    Ref r = read_ref(folder);

    auto run = run_single(a, L, flat, r);
    CHECK((run.logits.scalar_type() == at::kFloat));
    CHECK((run.logits.sizes() == r.logits.sizes()));
    CHECK(rel_diff(run.logits, r.logits) < 1e-5);
    CHECK(max_abs(run.logits - r.logits) < 1e-4);
    CHECK(std::abs(run.loss - r.loss) < 1e-5 * std::abs(r.loss));
    int checked = 0;
    for (auto& p : L.params) {
      CAPTURE(p.name);
      auto g = run.grad.narrow(0, p.offset, p.numel).view(p.shape);
      auto ref = read_tensor(r.file, "grad." + p.name);
      // The references were computed on a GPU. For q/k projections (RoPE + softmax backward, with cancellation)
      // HF itself on the CPU is up to 6e-4 (relative to the max) away from them on llama-gqa-bf16 -- and mmoc
      // reproduces HF-on-CPU's deviation to 7 digits -- so these two get a looser bound.
      const bool qk = has(p.name, "q_proj") || has(p.name, "k_proj");
      CHECK(rel_diff(g, ref) < (qk ? 2e-3 : 1e-4));
      ++checked;
    }
    CHECK(checked == static_cast<int>(L.params.size()));
    // padding gets zero gradient, and the whole gradient is one flat tensor
    CHECK(run.grad.numel() == L.numel);

    // 3 stages: [embed, dec0] [dec1, dec2] [dec3, norm+head]
    auto Ls = stage_layouts(a, {0, 2, 4, 6});
    auto flats = load_hf_weights(kFix + folder, a, Ls);
    auto split = run_split(a, Ls, flats, r);
    CHECK(max_abs(split.back().logits - run.logits) < 1e-6);
    CHECK(std::abs(split.back().loss - run.loss) < 1e-7);
    for (size_t s = 0; s < Ls.size(); ++s)
      for (auto& p : Ls[s].params) {
        CAPTURE(p.name);
        auto g = split[s].grad.narrow(0, p.offset, p.numel);
        auto* q = L.find(p.name);
        CHECK(rel_diff(g, run.grad.narrow(0, q->offset, q->numel)) < 1e-5);
      }
  }
}

TEST_CASE("bf16 compute: bf16 flat weights run, stay close to HF, gradient is one bf16 flat tensor") {
  auto c = io::read_hf_config(kFix + "llama-gqa-bf16");
  auto L = full_layout(c.arch);
  std::vector<at::Tensor> flats = {at::zeros({L.numel}, at::kBFloat16)};
  load_hf_weights(kFix + "llama-gqa-bf16", c.arch, {L}, flats);
  Ref r = read_ref("llama-gqa-bf16");
  auto run = run_single(c.arch, L, flats[0], r);
  CHECK((run.logits.scalar_type() == at::kFloat));
  CHECK((run.grad.scalar_type() == at::kBFloat16));
  CHECK(run.grad.numel() == L.numel);
  CHECK(max_abs(run.logits - r.logits) < 0.05);
  CHECK(std::abs(run.loss - r.loss) < 0.01);
  auto* p = L.find("model.layers.0.mlp.up_proj.weight");
  CHECK(rel_diff(run.grad.narrow(0, p->offset, p->numel).view(p->shape).to(at::kFloat), read_tensor(r.file, "grad." + p->name)) < 0.1);
}

TEST_CASE("sharded checkpoint loads the same as the single file; bf16 checkpoint = fp32 weights rounded") {
  auto c = io::read_hf_config(kFix + "llama-gqa-fp32");
  auto Ls = stage_layouts(c.arch, {0, 3, 6});
  auto a = load_hf_weights(kFix + "llama-gqa-fp32", c.arch, Ls);
  auto b = load_hf_weights(kFix + "llama-gqa-fp32-sharded", c.arch, Ls);
  for (size_t i = 0; i < a.size(); ++i) CHECK(at::equal(a[i], b[i]));
  auto h = load_hf_weights(kFix + "llama-gqa-bf16", c.arch, Ls);
  for (size_t i = 0; i < a.size(); ++i) CHECK(at::equal(h[i], a[i].to(at::kBFloat16).to(at::kFloat)));
}

TEST_CASE("save then load round-trips bit-exactly (fp32, bf16, sharded, replacing an existing folder)") {
  TmpDir d;
  for (const char* folder : {"llama-gqa-fp32", "llama-tied-mha-fp32"}) {
    std::string folder_s = folder;
    CAPTURE(folder_s);
    auto c = io::read_hf_config(kFix + folder);
    auto Ls = stage_layouts(c.arch, {0, 2, 4, 6});
    auto flats = load_hf_weights(kFix + folder, c.arch, Ls);
    auto out = d / folder;
    save_hf_checkpoint(out, c.arch, Ls, flats, at::kFloat);
    CHECK(io::path_exists(io::join_path(out, "model.safetensors")));
    CHECK(io::path_exists(io::join_path(out, "config.json")));
    auto back_cfg = io::read_hf_config(out);
    back_cfg.arch.name = c.arch.name;
    CHECK(back_cfg.arch == c.arch);
    // load with a different split: equal parameter by parameter
    auto L = full_layout(c.arch);
    auto whole = load_hf_weights(out, c.arch, {L})[0];
    for (size_t s = 0; s < Ls.size(); ++s)
      for (auto& p : Ls[s].params)
        CHECK(at::equal(flats[s].narrow(0, p.offset, p.numel), whole.narrow(0, L.find(p.name)->offset, p.numel)));
    // bytes identical to HF's file, tensor by tensor
    auto mine = io::Checkpoint::open(out), hf = io::Checkpoint::open(kFix + folder);
    CHECK(mine.names() == hf.names());
    for (auto& n : hf.names()) {
      auto x = mine.data(n), y = hf.data(n);
      CHECK((x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size()) == 0));
    }
    // bf16, sharded, over the existing folder
    SaveOptions so;
    so.max_shard_bytes = 40000;
    save_hf_checkpoint(out, c.arch, Ls, flats, at::kBFloat16, so);
    CHECK(io::path_exists(io::join_path(out, "model.safetensors.index.json")));
    CHECK_FALSE(io::path_exists(io::join_path(out, "model.safetensors")));  // the old folder was replaced, not merged
    CHECK(io::read_hf_config(out).dtype == "bfloat16");
    auto bf = load_hf_weights(out, c.arch, Ls);
    for (size_t s = 0; s < Ls.size(); ++s) CHECK(at::equal(bf[s], flats[s].to(at::kBFloat16).to(at::kFloat)));
    std::vector<at::Tensor> bf_native = {at::empty({L.numel}, at::kBFloat16)};
    load_hf_weights(out, c.arch, {L}, bf_native);
    CHECK(at::equal(bf_native[0], whole.to(at::kBFloat16)));
  }
  // nothing but the saved folders is left
  for (auto& e : io::list_dir(d.p)) CHECK_FALSE(has(e, ".tmp."));
  CHECK(io::Checkpoint::open(d / "llama-gqa-fp32").sharded());
  // the sharded bf16 save equals the bf16 fixture byte for byte
  auto c = io::read_hf_config(kFix + "llama-gqa-fp32");
  auto mine = io::Checkpoint::open(d / "llama-gqa-fp32"), hf = io::Checkpoint::open(kFix + "llama-gqa-bf16");
  for (auto& n : hf.names()) {
    auto x = mine.data(n), y = hf.data(n);
    CHECK((x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size()) == 0));
  }
  // saving needs every parameter exactly once
  auto Ls = stage_layouts(c.arch, {0, 3, 6});
  auto flats = load_hf_weights(kFix + "llama-gqa-fp32", c.arch, Ls);
  CHECK(has(error_of([&] { save_hf_checkpoint(d / "x", c.arch, {Ls[0]}, {flats[0]}, at::kFloat); }), "no stage holds"));
  CHECK_FALSE(io::path_exists(d / "x"));
}

TEST_CASE("loader errors name the tensor") {
  TmpDir d;
  auto c = io::read_hf_config(kFix + "llama-gqa-fp32");
  auto ck = io::Checkpoint::open(kFix + "llama-gqa-fp32");
  auto write_without = [&](const std::string& skip, const std::string& reshape, const std::string& extra) {
    std::vector<io::TensorToWrite> tw;
    std::vector<int64_t> odd = {64, 101};
    for (auto& n : ck.names()) {
      if (n == skip) continue;
      auto& ti = ck.info(n);
      auto bytes = ck.data(n);
      tw.push_back({n, ti.dtype, n == reshape ? odd : ti.shape, bytes.data(), bytes.size()});
    }
    float one = 1;
    if (!extra.empty()) tw.push_back({extra, io::DType::F32, {1}, &one, 4});
    io::write_safetensors(d / "model.safetensors", tw);
  };
  auto L = full_layout(c.arch);
  write_without("model.layers.2.mlp.up_proj.weight", "", "");
  auto e = error_of([&] { load_hf_weights(d.p, c.arch, {L}); });
  CHECK(has(e, "missing tensor 'model.layers.2.mlp.up_proj.weight'"));
  CHECK(has(e, "[176,64]"));
  write_without("", "lm_head.weight", "");
  e = error_of([&] { load_hf_weights(d.p, c.arch, {L}); });
  CHECK(has(e, "'lm_head.weight' has shape [64,101], expected [101,64]"));
  write_without("", "", "model.layers.9.mlp.up_proj.weight");
  CHECK(has(error_of([&] { load_hf_weights(d.p, c.arch, {L}); }), "unexpected tensor(s) not part of the model: 'model.layers.9"));
  write_without("", "", "model.layers.0.self_attn.rotary_emb.inv_freq");
  CHECK(error_of([&] { load_hf_weights(d.p, c.arch, {L}); }).empty());
  // a checkpoint for another architecture
  auto other = c.arch;
  other.layers = 5;
  CHECK(has(error_of([&] { load_hf_weights(kFix + "llama-gqa-fp32", other, {full_layout(other)}); }), "model.layers.4."));
  // flat of the wrong size
  std::vector<at::Tensor> bad = {at::zeros({5})};
  CHECK(has(error_of([&] { load_hf_weights(kFix + "llama-gqa-fp32", c.arch, {L}, bad); }), "elements"));
}

TEST_CASE("random init is deterministic per parameter name, whatever the split") {
  auto c = io::read_hf_config(kFix + "llama-tied-mha-fp32");
  auto L = full_layout(c.arch);
  auto whole = new_flat(L, at::kFloat);
  init_weights(c.arch, L, whole, 1234);
  auto Ls = stage_layouts(c.arch, {0, 1, 3, 6});
  for (auto& s : Ls) {
    auto f = new_flat(s, at::kFloat);
    init_weights(c.arch, s, f, 1234);
    for (auto& p : s.params) {
      CAPTURE(p.name);
      CHECK(at::equal(f.narrow(0, p.offset, p.numel), whole.narrow(0, L.find(p.name)->offset, p.numel)));
    }
  }
  auto* n = L.find("model.norm.weight");
  CHECK(at::equal(whole.narrow(0, n->offset, n->numel), at::ones({n->numel})));
  auto* q = L.find("model.layers.1.mlp.gate_proj.weight");
  double sd = whole.narrow(0, q->offset, q->numel).std().item<double>();
  CHECK(std::abs(sd - 0.02) < 0.002);
  auto other = new_flat(L, at::kFloat);
  init_weights(c.arch, L, other, 1235);
  CHECK_FALSE(at::equal(other, whole));
  auto bf = new_flat(L, at::kBFloat16);
  init_weights(c.arch, L, bf, 1234);
  CHECK(at::equal(bf, whole.to(at::kBFloat16)));
}

TEST_CASE("CUDA forward/backward matches HF (skipped without a GPU)") {
  if (!at::hasCUDA() || at::getNumGPUs() == 0) {
    MESSAGE("no CUDA device: skipped");
    return;
  }
  for (const char* folder : {"llama-gqa-fp32", "llama-tied-mha-fp32"}) {
    std::string folder_s = folder;
    CAPTURE(folder_s);
    auto c = io::read_hf_config(kFix + folder);
    auto L = full_layout(c.arch);
    std::vector<at::Tensor> flats = {at::zeros({L.numel}, at::TensorOptions().device(at::kCUDA))};
    load_hf_weights(kFix + folder, c.arch, {L}, flats);
    Ref r = read_ref(folder);
    auto run = run_single(c.arch, L, flats[0], r);
    CHECK(run.grad.is_cuda());
    CHECK(max_abs(run.logits.cpu() - r.logits) < 1e-3);  // TF32 may be on for matmuls
    CHECK(std::abs(run.loss - r.loss) < 1e-3);
    auto* p = L.find("model.embed_tokens.weight");
    CHECK(rel_diff(run.grad.narrow(0, p->offset, p->numel).cpu().view(p->shape), read_tensor(r.file, "grad." + p->name)) < 1e-2);
    // bf16 on the GPU runs and keeps one flat bf16 gradient
    std::vector<at::Tensor> bf = {at::zeros({L.numel}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16))};
    load_hf_weights(kFix + folder, c.arch, {L}, bf);
    auto rb = run_single(c.arch, L, bf[0], r);
    CHECK((rb.grad.scalar_type() == at::kBFloat16));
    CHECK(std::abs(rb.loss - r.loss) < 0.02);
  }
}

// Used by the hf_check_load ctest: writes mmoc-saved checkpoints of the fixtures to $MMOC_HF_SAVE_DIR.
TEST_CASE("save checkpoints for transformers to load (MMOC_HF_SAVE_DIR)") {
  const char* dir = std::getenv("MMOC_HF_SAVE_DIR");
  if (!dir) return;
  for (const char* folder : {"llama-gqa-fp32", "llama-tied-mha-fp32"}) {
    auto c = io::read_hf_config(kFix + folder);
    auto Ls = stage_layouts(c.arch, {0, 2, 4, 6});
    auto flats = load_hf_weights(kFix + folder, c.arch, Ls);
    save_hf_checkpoint(io::join_path(dir, folder), c.arch, Ls, flats, at::kFloat);
    SaveOptions so;
    so.max_shard_bytes = 100000;
    save_hf_checkpoint(io::join_path(dir, std::string(folder) + "-bf16-sharded"), c.arch, Ls, flats, at::kBFloat16, so);
  }
}

// ---- memory: what a decoder layer's forward keeps for backward, against the compiler's model --------------------
// glibc's heap statistics count every live CPU tensor (LibTorch allocates through malloc/posix_memalign), so the
// bytes a forward leaves behind (its saved-for-backward tensors plus its output) are measured exactly.
#include <malloc.h>
#include <torch/csrc/autograd/autograd.h>
#include "arch/arch.hpp"
#include "cost/spec.hpp"
static int64_t heap_in_use() {
  struct mallinfo2 mi = mallinfo2();
  return (int64_t)mi.uordblks + (int64_t)mi.hblkhd;
}

TEST_CASE("a decoder layer's forward keeps no weight copies: saved bytes are linear in the tokens, near the model") {
  // The compiler's ModelSpec::layer_stash_bytes is the CUDA bf16 count (fused RMSNorm); the CPU runs the same layer with
  // ATen's composite RMSNorm, which keeps fp32 copies too, so on the CPU the measurement is checked for shape: no
  // constant term (a per-forward copy of the weights, e.g. concatenating q/k/v, would be one) and the model's size
  // within +50%.
  for (int kv : {8, 2}) {
    mmoc::ModelSpec m;
    m.name = "probe";
    m.layers = 2; m.hidden = 512; m.ffn = 1376; m.heads = 8; m.kv_heads = kv; m.vocab = 1000; m.max_seq = 512;
    const ir::ModelArch a = m.arch();
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
    INFO("kv_heads " << kv << ": kept " << k1 << " bytes at 128 tokens/row, " << k2 << " at 256; model at 256: " << model);
    CHECK(std::abs(double(k2 - 2 * k1)) < 0.02 * double(k2));                 // no constant term
    CHECK(double(k2) >= 0.98 * double(model));
    CHECK(double(k2) <= 1.5 * double(model));
  }
}

// lm_loss_sum computes the loss piece by piece (rows of the shifted logits) so that no vocabulary-wide fp32 tensor
// outlives a piece. Against cross_entropy over the whole fp32 copy (what it replaced): every gradient element equal,
// bit for bit, in fp32 and bf16, for a single piece and for pieces that split sequences; the loss equal to rounding
// (only its sum is taken piece by piece); ignored labels (-100) ignored; and the graph keeps the logits in their own
// dtype, not an fp32 log-softmax.
TEST_CASE("lm_loss_sum in pieces: gradients bit-identical to cross_entropy over the whole fp32 logits") {
  auto reference = [](const at::Tensor& logits, const at::Tensor& labels) {
    const int64_t T = logits.size(1), V = logits.size(2);
    auto lg = logits.narrow(1, 0, T - 1).to(at::kFloat).reshape({-1, V});
    auto lb = labels.narrow(1, 1, T - 1).to(at::kLong).reshape({-1});
    return at::cross_entropy_loss(lg, lb, {}, at::Reduction::Sum, -100);
  };
  at::manual_seed(3);
  const int64_t B = 3, T = 7, V = 50;
  at::Tensor labels = at::randint(0, V, {B, T}, at::kLong);
  labels.index_put_({1, 3}, -100);
  labels.index_put_({2, 6}, -100);
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    const at::Tensor base = (at::randn({B, T, V}) * 3).to(dt);
    for (const char* rows : {"", "2", "6", "100"}) {  // default (one piece), pieces within and across sequences
      const std::string what = std::string(c10::toString(dt)) + " rows " + (*rows ? rows : "default");
      CAPTURE(what);
      if (*rows) setenv("MMOC_LOSS_CHUNK_ROWS", rows, 1);
      else unsetenv("MMOC_LOSS_CHUNK_ROWS");
      at::Tensor a = base.clone().requires_grad_(true), b = base.clone().requires_grad_(true);
      at::Tensor la = lm_loss_sum(a, labels), lb = reference(b, labels);
      CHECK((la.scalar_type() == at::kFloat));
      CHECK(la.item<double>() == doctest::Approx(lb.item<double>()).epsilon(1e-6));
      (la * 0.37).backward();
      (lb * 0.37).backward();
      CHECK((a.grad().scalar_type() == dt));
      CHECK(at::equal(a.grad(), b.grad()));
      CHECK(at::all(a.grad().select(1, T - 1) == 0).item<bool>());  // the last position has no label
      if (*rows == '\0') CHECK(la.item<double>() == lb.item<double>());  // one piece: the same sum
    }
  }
  unsetenv("MMOC_LOSS_CHUNK_ROWS");
  // what the graph keeps: bf16 logits [2, 512, 8000] (16 MB) come in; cross_entropy over the fp32 copy keeps its fp32
  // log-softmax (33 MB), lm_loss_sum only the labels beside the logits it was given
  {
    at::Tensor big = at::randn({2, 512, 8000}).to(at::kBFloat16).requires_grad_(true);
    at::Tensor bl = at::randint(0, 8000, {2, 512}, at::kLong);
    auto kept = [&](bool pieces) {
      (void)(pieces ? lm_loss_sum(big, bl) : reference(big, bl));  // warm-up
      const int64_t before = heap_in_use();
      at::Tensor l = pieces ? lm_loss_sum(big, bl) : reference(big, bl);
      return heap_in_use() - before;
    };
    const int64_t mine = kept(true), theirs = kept(false), fp32 = int64_t(2) * 511 * 8000 * 4;
    INFO("kept by the graph: lm_loss_sum " << mine << " bytes, cross_entropy " << theirs);
    CHECK(theirs >= fp32);
    CHECK(mine < fp32 / 50);
  }
  // an out-of-vocabulary label is refused as by cross_entropy
  CHECK_THROWS(lm_loss_sum(at::zeros({1, 3, V}), at::full({1, 3}, V + 5, at::kLong)));
}

// A LLaMA-style decoder layer at tp 1 runs with nodes that trim what it keeps: the SwiGLU and down projection as one
// node (SwiGluDown), each norm and the projection after it as one (NormLinear, which keeps the norm's input and not
// its output), and with multi-head attention v copied out of the fused qkv output (so its q and k parts are not
// kept). Selective recompute inside the layer (stage_forward_layers' `selective`, the plan's Stage::selective) makes
// SwiGluDown recompute the SwiGLU in backward; `output_unused` (the engine's recompute inside backward) skips the last
// layer's down projection. Against the plain autograd graph of the same ops (MMOC_LAYER_GRAPH=plain), with and
// without each: the output (where it is computed) and the gradients of the weights and the input are bit-identical
// (bf16; fp32, whose HF norm reads its input twice, sums the input's gradient in another order: to rounding).
// Kept bytes: the plain graph keeps 2 x hidden (the norms' outputs) plus, with MHA, q_dim + kv_dim (the rest of qkv)
// per token more than the node graph (at least: the CPU's composite norms keep more), and selective 2 x ffn
// less again: what the compiler's ModelSpec::layer_stash_bytes counts. A GPT-2 layer (no SwiGLU) is unaffected.
TEST_CASE("the decoder layer's trimmed stash: gradients bit-identical to the plain graph, kept bytes as the model says") {
  struct Probe { int kv; bool bias; };
  for (Probe pr : {Probe{8, false}, Probe{2, false}, Probe{8, true}}) {
    mmoc::ModelSpec m;
    m.name = "probe";
    m.layers = 2; m.hidden = 512; m.ffn = 1376; m.heads = 8; m.kv_heads = pr.kv; m.vocab = 1000; m.max_seq = 512;
    m.qkv_bias = pr.bias;
    if (pr.bias) m.family = "qwen2";
    const ir::ModelArch a = m.arch();
    const StageLayout lay = stage_layout(a, 1, 2);  // one decoder layer
    at::Tensor flat = at::zeros({lay.numel}, at::kFloat);
    init_weights(a, lay, flat, 1);
    if (pr.bias) flat.normal_(0.0, 0.02);  // biases not zero
    for (auto dt : {at::kFloat, at::kBFloat16}) {
      const int T = 256;
      const Rope rope = make_rope(a, T);
      at::manual_seed(5);
      const at::Tensor x0 = at::randn({2, T, a.hidden}).to(dt), dout = at::randn({2, T, a.hidden}).to(dt);
      struct R { at::Tensor out, gw, gx; int64_t kept; };
      auto run = [&](bool selective, bool plain = false, bool unused = false) {
        if (plain) setenv("MMOC_LAYER_GRAPH", "plain", 1);
        at::Tensor w = flat.to(dt).detach().requires_grad_(true), x = x0.clone().requires_grad_(true);
        auto fwd = [&] { return stage_forward_layers(a, lay, w, x, rope, 1, 2, {}, true, {}, selective, unused); };
        (void)fwd();  // warm-up (one-time allocations)
        const int64_t before = heap_in_use();
        at::Tensor out = fwd();
        const int64_t kept = heap_in_use() - before;
        auto g = torch::autograd::grad({out}, {w, x}, {dout});
        unsetenv("MMOC_LAYER_GRAPH");
        return R{out.detach(), g[0], g[1], kept};
      };
      const R sel = run(true), node = run(false), plain = run(false, true), unused = run(false, false, true),
              unused_sel = run(true, false, true);
      const std::string what = "kv_heads " + std::to_string(pr.kv) + (pr.bias ? " qkv bias " : " ") + c10::toString(dt);
      CAPTURE(what);
      for (const R* r : {&sel, &node, &unused, &unused_sel}) {
        if (r == &sel || r == &node) CHECK(at::equal(r->out, plain.out));
        // bf16 (and the GPU's fused norm): bit-identical. fp32 runs HF's composite norm, which reads x twice, so x's
        // gradient sums three parts (two inside the norm, the residual) in another order: equal to rounding
        auto same = [&](const at::Tensor& g, const at::Tensor& ref) {
          if (dt != at::kFloat) return at::equal(g, ref);
          return at::allclose(g, ref, 1e-5, 1e-6 * ref.abs().max().item<double>());
        };
        CHECK(same(r->gw, plain.gw));
        CHECK(same(r->gx, plain.gx));
      }
      // output_unused skipped the down projection: the output is the mid residual alone, not the layer's output
      CHECK_FALSE(at::equal(unused.out, plain.out));
      const int64_t es = (int64_t)at::elementSize(dt), tokens = 2 * T;
      const double sel_less = 1.0 * tokens * a.ffn * es;  // the SwiGLU's product
      // the norms' outputs, with MHA q and k's part of qkv, and silu(gate)
      const double node_less =
          (double)tokens * es * (2 * a.hidden + a.ffn + (pr.kv == m.heads ? arch::q_dim(a) + arch::kv_dim(a) : 0));
      INFO("kept: selective " << sel.kept << " bytes, node " << node.kept << ", plain graph " << plain.kept
                              << "; expected: node " << node_less << " less than plain, selective " << sel_less << " less than node");
      // (on the CPU ATen's RMSNorm is composite and keeps fp32 copies too, which the node drops as well: at least;
      // test_families checks the node graph's kept bytes against the model exactly)
      CHECK(double(plain.kept - node.kept) > 0.95 * node_less);
      CHECK(std::abs(double(node.kept - sel.kept) - sel_less) < 0.05 * sel_less);
      const int ab = (int)es;
      if (dt == at::kBFloat16) {  // the node graph keeps no norm internals, so even on the CPU it keeps what the model says
        const double model = (double)m.layer_stash_bytes(1, 2, T, false, ab), model_sel = (double)m.layer_stash_bytes(1, 2, T, false, ab, true);
        INFO("model: " << model << " bytes, selective " << model_sel);
        CHECK(std::abs(double(node.kept) - model) < 0.03 * model);
        CHECK(std::abs(double(sel.kept) - model_sel) < 0.03 * model_sel);
      }
      CHECK(m.layer_stash_bytes(1, 2, T, false, ab) - m.layer_stash_bytes(1, 2, T, false, ab, true) == (int64_t)sel_less);
    }
  }
  // the compiler's model of what the plain graph kept, minus the trimmed tensors, for LLaMA-2-7B's shapes (MHA)
  mmoc::ModelSpec l7;
  l7.name = "llama2-7b-shape";
  l7.layers = 32; l7.hidden = 4096; l7.ffn = 11008; l7.heads = 32; l7.kv_heads = 32; l7.vocab = 32000; l7.max_seq = 4096;
  const int64_t per_token = l7.layer_stash_bytes(1, 1, 1024, false, 2) / 1024;
  CHECK(per_token == (6 * l7.hidden + 3 * l7.ffn) * 2 + l7.heads * 4 + 8);
  // GPT-2: no SwiGLU, nothing to select (the compiler's model agrees: layer_can_select is false)
  mmoc::ModelSpec g;
  g.name = "probe-gpt2"; g.family = "gpt2";
  g.layers = 2; g.hidden = 256; g.ffn = 1024; g.heads = 4; g.kv_heads = 4; g.vocab = 1000; g.max_seq = 256;
  g.max_positions = 256;
  CHECK_FALSE(g.layer_can_select(1));
  CHECK(g.layer_stash_bytes(1, 2, 64, false, 2, true) == g.layer_stash_bytes(1, 2, 64, false, 2));
  const ir::ModelArch ga = g.arch();
  const StageLayout gl = stage_layout(ga, 1, 2);
  at::Tensor gf = at::zeros({gl.numel}, at::kFloat);
  init_weights(ga, gl, gf, 1);
  const Rope rope = make_rope(ga, 64);
  const at::Tensor x = at::randn({2, 64, ga.hidden});
  CHECK(at::equal(stage_forward_layers(ga, gl, gf, x, rope, 1, 2, {}, false, {}, true),
                  stage_forward_layers(ga, gl, gf, x, rope, 1, 2, {}, false, {}, false)));
}

// ---- mmoc's CUDA kernels in the decoder layer (RopeQKV, SwiGluDown) -------------------------------------------------
// On a GPU the trimmed LLaMA-style layer runs mmoc's kernels (engine/model/kernels.hpp); MMOC_KERNELS=aten runs ATen's
// ops instead. The two must agree bit for bit (output, weight and input gradients) in fp32, fp16 and bf16, kept and
// selective, for MHA and GQA, with q/k/v biases, and with sizes that are not multiples of the kernels' 8-wide loads
// (their scalar paths). The graph must hold RopeQKV (else this would compare ATen with itself), and on bf16 the layer
// must keep what ModelSpec::layer_stash_bytes says, measured by the CUDA caching allocator.
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/autograd/function.h>
#include <unordered_set>
#include "engine/model/kernels.hpp"
static bool graph_has(const at::Tensor& out, const std::string& needle) {
  std::vector<torch::autograd::Node*> todo{out.grad_fn().get()};
  std::unordered_set<torch::autograd::Node*> seen;
  while (!todo.empty()) {
    auto* n = todo.back();
    todo.pop_back();
    if (!n || !seen.insert(n).second) continue;
    if (n->name().find(needle) != std::string::npos) return true;
    for (const auto& e : n->next_edges()) todo.push_back(e.function.get());
  }
  return false;
}
TEST_CASE("mmoc's CUDA kernels: bit-identical to ATen's ops, the layer keeps what the model says (skipped without a GPU)") {
  if (!at::hasCUDA() || at::getNumGPUs() == 0) {
    MESSAGE("no CUDA device: skipped");
    return;
  }
  struct Probe { int hidden, heads, kv; bool bias; };
  for (Probe pr : {Probe{512, 8, 8, false}, Probe{512, 8, 2, false}, Probe{512, 8, 8, true}, Probe{96, 4, 2, false}}) {
    mmoc::ModelSpec m;
    m.name = "probe";
    // ffn: a multiple of 8 at 512 (the SwiGLU kernel's 8-wide path), 261 at 96 (its scalar path)
    m.layers = 2; m.hidden = pr.hidden; m.ffn = pr.hidden == 96 ? 261 : 2 * pr.hidden + 64; m.heads = pr.heads; m.kv_heads = pr.kv;
    m.vocab = 1000; m.max_seq = 512;
    m.qkv_bias = pr.bias;
    if (pr.bias) m.family = "qwen2";
    const ir::ModelArch a = m.arch();
    const StageLayout lay = stage_layout(a, 1, 2);
    at::Tensor flat = at::zeros({lay.numel}, at::kFloat);
    init_weights(a, lay, flat, 1);
    if (pr.bias) flat.normal_(0.0, 0.02);
    for (auto dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
      const int T = 200;  // shorter than the rope table: rows wrap at T
      const Rope rope = make_rope(a, 256, at::kCUDA);
      at::manual_seed(7);
      const auto o = at::TensorOptions().device(at::kCUDA).dtype(dt);
      const at::Tensor x0 = at::randn({3, T, a.hidden}).to(o), dout = at::randn({3, T, a.hidden}).to(o);
      struct R { at::Tensor out, gw, gx; bool node; int64_t kept; kernels::Launches ran; };
      auto run = [&](bool aten, bool selective) {
        if (aten) setenv("MMOC_KERNELS", "aten", 1);
        const kernels::Launches l0 = kernels::launches();
        at::Tensor w = flat.to(o).detach().requires_grad_(true), x = x0.clone().requires_grad_(true);
        auto fwd = [&] { return stage_forward_layers(a, lay, w, x, rope, 1, 2, {}, true, {}, selective); };
        (void)fwd();
        c10::cuda::device_synchronize();
        const int64_t before = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
        at::Tensor out = fwd();
        const int64_t kept = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current - before;
        const bool node = graph_has(out, "RopeQKV");
        auto g = torch::autograd::grad({out}, {w, x}, {dout});
        unsetenv("MMOC_KERNELS");
        kernels::Launches d = kernels::launches();
        d.rope_forward -= l0.rope_forward; d.rope_backward -= l0.rope_backward;
        d.swiglu_forward -= l0.swiglu_forward; d.swiglu_backward -= l0.swiglu_backward;
        return R{out.detach(), g[0], g[1], node, kept, d};
      };
      for (bool selective : {false, true}) {
        const R fused = run(false, selective), aten = run(true, selective);
        const std::string what = "hidden " + std::to_string(pr.hidden) + " kv_heads " + std::to_string(pr.kv) +
                                 (pr.bias ? " qkv bias " : " ") + c10::toString(dt) + (selective ? " selective" : "");
        CAPTURE(what);
        CHECK(fused.node);
        CHECK_FALSE(aten.node);
        // two forwards (warm-up, measured), one backward; selective runs the SwiGLU kernel again inside backward
        CHECK(fused.ran.rope_forward == 2);
        CHECK(fused.ran.rope_backward == 1);
        CHECK(fused.ran.swiglu_forward == (selective ? 3 : 2));
        CHECK(fused.ran.swiglu_backward == 1);
        CHECK(aten.ran.rope_forward + aten.ran.rope_backward + aten.ran.swiglu_forward + aten.ran.swiglu_backward == 0);
        CHECK(at::equal(fused.out, aten.out));
        CHECK(at::equal(fused.gw, aten.gw));
        CHECK(at::equal(fused.gx, aten.gx));
        // (head size 64; at 24, the hidden-96 probe, SDPA takes another backend, which kept ~one hidden-sized tensor
        // per token more on the H200, with ATen's ops as with the kernels)
        if (dt == at::kBFloat16 && pr.hidden == 512) {
          const int64_t model = m.layer_stash_bytes(1, 3, T, false, 2, selective);
          INFO("kept on the GPU: fused " << fused.kept << " bytes, ATen " << aten.kept << "; model " << model);
          CHECK(std::abs(double(fused.kept - model)) < 0.03 * double(model));
          CHECK(fused.kept <= aten.kept);
        }
      }
    }
  }
}
