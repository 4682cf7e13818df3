// Tensor parallelism at the model level, every family, against the unsharded model and HF's fixtures
// (tools/scripts/make_hf_fixtures.py): the ranks of a group run as threads of this process (tp_thread_comm.hpp).
// For every family fixture, tp in {1, 2} (4 where heads, kv heads and ffn allow) and 1 or 2 pipeline stages (a tied
// head-only stage gets the embedding's shard): the loss and the gathered logits equal the unsharded model's (and
// HF's) to 1e-5; the gradients, gathered to whole tensors, equal the unsharded gradients (and HF's) to 1e-5, with the
// replicated parameters' gradients bit-identical on every rank and the vocabulary padding's zero; one AdamW step on
// the shards is the corresponding slice of the step on the whole model (bit for bit on the same gradient; within
// HF's bound on the shards' own gradients); load-into-shards, gather and save give HF's file byte for byte; random
// init of a shard is the slice of the unsharded init; bad layouts are refused with a message naming the reason.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>

#include "arch/arch.hpp"
#include "engine/io/fsutil.hpp"
#include "engine/io/hf_config.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/model.hpp"
#include "engine/model/tp.hpp"
#include "engine/optim/adamw.hpp"
#include "tests/model/tp_thread_comm.hpp"
#include "tests/torch_doctest.hpp"

using namespace mmoc;
using namespace mmoc::engine;

namespace {
const std::string kFix = std::string(MMOC_FIXTURES_DIR) + "/hf-tiny/";
const char* kFixtures[] = {"llama-gqa-fp32",  "llama-tied-mha-fp32", "llama3-gqa-fp32", "llama3-tied-fp32",
                           "qwen2-fp32",      "qwen2-tied-fp32",     "qwen3-fp32",      "qwen3-tied-fp32",
                           "mistral-fp32",    "gpt2-fp32"};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }
double max_abs(const at::Tensor& t) { return t.numel() ? t.abs().max().item<double>() : 0.0; }
double rel_diff(const at::Tensor& a, const at::Tensor& ref) {
  return max_abs(a.to(at::kDouble) - ref.to(at::kDouble)) / std::max(max_abs(ref.to(at::kDouble)), 1e-12);
}

struct Ref {
  at::Tensor ids, labels, logits;
  double loss = 0;
  nlohmann::json meta;
  io::SafetensorsFile file;
};
Ref read_ref(const std::string& folder) {
  Ref r{{}, {}, {}, 0, {}, io::SafetensorsFile::open(kFix + folder + "/hf_reference.safetensors")};
  r.ids = read_tensor(r.file, "input_ids");
  r.labels = read_tensor(r.file, "labels");
  r.logits = read_tensor(r.file, "logits");
  std::ifstream in(kFix + folder + "/hf_reference.json");
  r.meta = nlohmann::json::parse(in);
  r.loss = r.meta["loss"].get<double>();
  return r;
}
at::Tensor hf_tensor(const Ref& r, const std::string& key, const ParamInfo& p) {  // in the flat orientation
  at::Tensor t = read_tensor(r.file, key);
  return p.transposed ? t.t() : t;
}

std::vector<int> even_bounds(int model_layers, int n) {
  std::vector<int> b;
  for (int i = 0; i <= n; ++i) b.push_back((int)((int64_t)i * model_layers / n));
  return b;
}
bool tp_fits(const ir::ModelArch& a, int tp) { return a.heads % tp == 0 && a.kv_heads % tp == 0 && a.ffn % tp == 0; }

struct TmpDir {
  std::string p;
  TmpDir() {
    char tmpl[] = "/tmp/mmoc_tp_test.XXXXXX";
    p = ::mkdtemp(tmpl);
  }
  ~TmpDir() { io::remove_tree(p); }
  std::string operator/(const std::string& n) const { return io::join_path(p, n); }
};

// One rank's training step over the stages `bounds` (chained as the engine does: detached stage inputs, the
// backward fed stage by stage; a tied head-only stage gets the embedding shard, whose gradient goes back to the
// first stage). comm == nullptr: the unsharded model through stage_forward / lm_loss_sum.
struct Step {
  std::vector<StageLayout> layouts;
  std::vector<at::Tensor> weights, grads;   // per stage, this rank's flat tensors
  std::vector<at::Tensor> gathered_grads;   // per stage, tp_gather_flat of grads (tp > 1)
  std::vector<at::Tensor> gathered_weights; // per stage, tp_gather_flat of weights (tp > 1)
  std::vector<at::Tensor> input_grads;      // per stage > 0, the gradient of its input (what goes back to the stage before)
  at::Tensor logits;                        // whole vocabulary [B,T,V] (tp_gather_logits)
  double loss = 0;
  double replica_divergence = 0;            // tp_replica_divergence of the gradients, worst stage
};
Step run_step(const ir::ModelArch& a, const std::vector<int>& bounds, const std::string& folder, const Ref& r,
              TpComm* comm) {
  Step st;
  const int rank = comm ? comm->rank() : 0, tp = comm ? comm->size() : 1;
  st.layouts = stage_layouts(a, bounds, rank, tp);
  st.weights = load_hf_weights(kFix + folder, a, st.layouts);
  auto rope = make_rope(a, r.ids.size(1));
  std::vector<at::Tensor> flats, ins, outs;
  for (auto& f : st.weights) flats.push_back(f.detach().clone().requires_grad_(true));
  at::Tensor x = r.ids, tied;
  const size_t n = st.layouts.size();
  for (size_t s = 0; s < n; ++s) {
    if (s > 0) x = x.detach().requires_grad_(true);
    ins.push_back(x);
    if (s + 1 == n && head_needs_embedding(a) && !st.layouts[s].has_embedding())
      tied = embedding_view(a, st.layouts[0], flats[0].detach()).clone().requires_grad_(true);
    const at::Tensor te = s + 1 == n ? tied : at::Tensor();
    x = comm ? tp_stage_forward(a, st.layouts[s], flats[s], x, rope, *comm, te)
             : stage_forward(a, st.layouts[s], flats[s], x, rope, te);
    outs.push_back(x);
  }
  at::Tensor sum = comm ? tp_lm_loss_sum(outs.back(), r.labels, a.vocab, *comm) : lm_loss_sum(outs.back(), r.labels);
  auto loss = sum / static_cast<double>(count_tokens(r.labels));
  loss.backward();
  for (size_t s = n - 1; s-- > 0;) outs[s].backward(ins[s + 1].grad());
  st.loss = loss.item<double>();
  for (size_t s = 1; s < n; ++s) st.input_grads.push_back(ins[s].grad().clone());
  st.logits = comm ? tp_gather_logits(outs.back().detach(), a.vocab, *comm) : outs.back().detach();
  for (size_t s = 0; s < n; ++s) st.grads.push_back(flats[s].grad().clone());
  if (tied.defined()) add_tied_embedding_grad(a, st.layouts[0], st.grads[0], tied.grad());
  if (comm)
    for (size_t s = 0; s < n; ++s) {
      st.gathered_grads.push_back(tp_gather_flat(a, st.layouts[s], st.grads[s], *comm));
      st.gathered_weights.push_back(tp_gather_flat(a, st.layouts[s], st.weights[s], *comm));
      st.replica_divergence = std::max(st.replica_divergence, tp_replica_divergence(st.layouts[s], st.grads[s], *comm));
    }
  return st;
}

// Every rank's run_step, on a thread group of tp ranks.
std::vector<Step> run_group(const ir::ModelArch& a, const std::vector<int>& bounds, const std::string& folder,
                            const Ref& r, int tp) {
  std::vector<Step> steps(tp);
  test::ThreadGroup g(tp);
  g.run([&](TpComm& c) { steps[c.rank()] = run_step(a, bounds, folder, r, &c); });
  return steps;
}

// One torch.optim.AdamW step (the fixtures' hyper-parameters) on a flat fp32 tensor with fresh state.
at::Tensor adamw_once(const at::Tensor& w, const at::Tensor& g, const nlohmann::json& ad) {
  at::Tensor p = w.detach().clone().contiguous(), m = at::zeros_like(p), v = at::zeros_like(p);
  at::Tensor gr = g.detach().contiguous();
  optim::AdamWHyper h;
  h.lr = ad["lr"].get<double>();
  h.beta1 = ad["betas"][0].get<double>();
  h.beta2 = ad["betas"][1].get<double>();
  h.eps = ad["eps"].get<double>();
  h.weight_decay = ad["weight_decay"].get<double>();
  h.moment_form = optim::MomentForm::kLerp;
  optim::AdamWBuffers b;
  b.param = p.data_ptr<float>();
  b.exp_avg = m.data_ptr<float>();
  b.exp_avg_sq = v.data_ptr<float>();
  b.grad = gr.data_ptr<float>();
  b.grad_type = optim::GradType::kFloat32;
  b.n = p.numel();
  optim::adamw_step(b, h, 1, 1.0f, nullptr);
  return p;
}

// tests/engine/hf_families_test.py's bound for weights after one AdamW step: 1e-5 of the tensor's largest value, plus
// the step's own uncertainty where the gradient is at its 1e-5 noise floor (the direction of lr * g / (|g| + eps) is
// then undetermined). Returns the worst |got - want| / bound.
double adamw_worst(const at::Tensor& got, const at::Tensor& want, const at::Tensor& hf_grad, const nlohmann::json& ad) {
  const double lr = ad["lr"].get<double>(), eps = ad["eps"].get<double>();
  at::Tensor g = hf_grad.to(at::kDouble);
  const double dg = 1e-5 * max_abs(g);
  at::Tensor cond = (lr * eps * dg / (g.abs() + eps).pow(2)).clamp_max(2 * lr);
  at::Tensor bound = cond + 1e-5 * max_abs(want.to(at::kDouble));
  return ((got.to(at::kDouble) - want.to(at::kDouble)).abs() / bound).max().item<double>();
}
}  // namespace

TEST_CASE("sharded layouts: every element of every parameter on exactly one rank, replicas whole, padding last") {
  for (const char* folder : {"llama3-gqa-fp32", "qwen2-fp32", "qwen3-fp32", "gpt2-fp32", "llama-tied-mha-fp32"}) {
    auto a = io::read_hf_config(kFix + folder).arch;
    const StageLayout full = full_layout(a);
    CHECK(full.tp_size == 1);
    for (const auto& p : full.params) CHECK_FALSE(p.shard.sharded());
    for (int tp : {2, 4}) {
      if (!tp_fits(a, tp)) continue;
      CAPTURE(std::string(folder));
      CAPTURE(tp);
      std::vector<StageLayout> Ls;
      for (int r = 0; r < tp; ++r) Ls.push_back(full_layout(a, r, tp));
      const auto voc = arch::tp_vocab(a.vocab, 0, tp);
      CHECK(voc.padded % tp == 0);
      CHECK(voc.padded - a.vocab < tp);
      int64_t counted = 0;  // elements the gradient norm counts, over all ranks
      for (int r = 0; r < tp; ++r) {
        CHECK(Ls[r].numel == Ls[0].numel);  // one flat size on every rank
        for (auto [b, e] : arch::grad_norm_ranges(Ls[r])) counted += e - b;
      }
      int64_t whole = 0;
      for (size_t i = 0; i < full.params.size(); ++i) {
        const ParamInfo& f = full.params[i];
        CAPTURE(f.name);
        whole += f.numel;
        at::Tensor seen = at::zeros(f.shape, at::kInt);  // how many ranks hold each element
        for (int r = 0; r < tp; ++r) {
          const ParamInfo& p = Ls[r].params[i];
          CHECK(p.name == f.name);
          CHECK(p.shard.full_shape == f.shape);
          CHECK(p.full_hf_shape() == f.hf_shape());
          if (p.split == arch::TpSplit::Replicated) {
            CHECK(Ls[r].replicated(p));
            CHECK(p.shape == f.shape);
            seen.add_(1);
            continue;
          }
          REQUIRE(p.shard.sharded());
          CHECK(p.shard.dim == (p.split == arch::TpSplit::Row ? 1 : 0));
          const int64_t padding = p.shape[p.shard.dim] - p.shard.rows();
          CHECK(padding == (p.split == arch::TpSplit::Vocab ? voc.rows - arch::tp_vocab(a.vocab, r, tp).valid : 0));
          for (const auto& pc : p.shard.pieces) seen.narrow(p.shard.dim, pc.start, pc.length).add_(1);
        }
        CHECK(at::equal(seen, at::full_like(seen, Ls[0].params[i].split == arch::TpSplit::Replicated ? tp : 1)));
      }
      // the vocabulary padding rows count too (they are zero); everything else exactly once
      int64_t vocab_padding = 0;
      for (const auto& p : Ls[0].params)
        if (p.split == arch::TpSplit::Vocab) vocab_padding += (voc.padded - a.vocab) * a.hidden;
      CHECK(counted == whole + vocab_padding);
      CHECK(arch::layer_param_count(a, 1, tp) == stage_layout(a, 1, 2, 0, tp).param_count);
    }
  }
  // GPT-2's fused c_attn: the rank's rows of q, of k and of v, in that order; its bias likewise
  auto g = io::read_hf_config(kFix + "gpt2-fp32").arch;
  auto L1 = stage_layout(g, 1, 2, 1, 2);
  const ParamInfo* qkv = L1.find(1, Role::QKV);
  REQUIRE(qkv);
  CHECK((qkv->shard.pieces == std::vector<arch::ShardPiece>{{32, 32}, {96, 32}, {160, 32}}));
  CHECK(qkv->hf_dim() == 1);  // HF's Conv1D [in, out]: the split is along out
  CHECK(L1.find(1, Role::O)->hf_dim() == 0);
  CHECK(L1.find(1, Role::OBias)->split == arch::TpSplit::Replicated);
  CHECK((L1.find(1, Role::UpBias)->shard.pieces == std::vector<arch::ShardPiece>{{128, 128}}));
}

TEST_CASE("every family: TP forward, loss, logits and gathered gradients equal the unsharded model and HF") {
  for (const char* folder : kFixtures) {
    const std::string folder_s = folder;
    CAPTURE(folder_s);
    auto a = io::read_hf_config(kFix + folder).arch;
    Ref r = read_ref(folder);
    const int nl = a.layers + 2;
    double worst_logits = 0, worst_loss = 0, worst_grad = 0, worst_hf = 0;
    int cases = 0;
    for (int n : {1, 2}) {
      CAPTURE(n);
      const auto bounds = even_bounds(nl, n);
      const Step ref = run_step(a, bounds, folder, r, nullptr);
      CHECK(std::abs(ref.loss - r.loss) <= 1e-5 * std::abs(r.loss));
      for (int tp : {1, 2, 4}) {
        if (!tp_fits(a, tp)) continue;
        CAPTURE(tp);
        ++cases;
        auto steps = run_group(a, bounds, folder, r, tp);
        for (int k = 0; k < tp; ++k) {
          CAPTURE(k);
          CHECK(steps[k].loss == steps[0].loss);  // the same value on every rank
          CHECK(at::equal(steps[k].logits, steps[0].logits));
          CHECK(steps[k].replica_divergence == 0.0);
          for (size_t s = 0; s + 1 < ref.layouts.size(); ++s)  // stage boundaries: replicated both ways
            CHECK(at::equal(steps[k].input_grads[s], steps[0].input_grads[s]));
        }
        const Step& s0 = steps[0];
        CHECK((s0.logits.sizes() == r.logits.sizes()));
        const double dl = rel_diff(s0.logits, ref.logits), dloss = std::abs(s0.loss - ref.loss) / std::abs(ref.loss);
        CHECK(dl < 1e-5);
        CHECK(dloss < 1e-5);
        CHECK(rel_diff(s0.logits, r.logits) < 1e-5);
        CHECK(std::abs(s0.loss - r.loss) <= 1e-5 * std::abs(r.loss));
        worst_logits = std::max(worst_logits, dl);
        for (size_t s = 0; s + 1 < ref.layouts.size(); ++s) CHECK(rel_diff(s0.input_grads[s], ref.input_grads[s]) < 1e-5);
        worst_loss = std::max(worst_loss, dloss);
        for (size_t s = 0; s < ref.layouts.size(); ++s) {
          std::vector<at::Tensor> shards;
          for (auto& st : steps) shards.push_back(st.grads[s]);
          // replicated gradients bit-identical on every rank (check_replicas), and the group's gather = the same
          const at::Tensor whole = assemble_flat(a, ref.layouts[s].layer_begin, ref.layouts[s].layer_end, shards, true);
          if (tp > 1)
            for (auto& st : steps) CHECK(at::equal(st.gathered_grads[s], whole));
          for (const auto& p : ref.layouts[s].params) {
            CAPTURE(p.name);
            at::Tensor g = whole.narrow(0, p.offset, p.numel).view(p.shape);
            const double d = rel_diff(g, ref.grads[s].narrow(0, p.offset, p.numel).view(p.shape));
            const double dh = rel_diff(g, hf_tensor(r, "grad." + p.name, p));
            CHECK(d < 1e-5);
            CHECK(dh < 1e-5);
            worst_grad = std::max(worst_grad, d);
            worst_hf = std::max(worst_hf, dh);
          }
          // the vocabulary padding rows: zero weights, zero gradient; alignment padding: zero gradient
          for (int k = 0; k < tp; ++k) {
            const StageLayout& L = steps[k].layouts[s];
            int64_t pos = 0;
            for (const auto& p : L.params) {
              CHECK(max_abs(steps[k].grads[s].narrow(0, pos, p.offset - pos)) == 0);
              pos = p.offset + p.numel;
              if (!p.shard.sharded() || p.shard.rows() == p.shape[p.shard.dim]) continue;
              const int64_t pad = p.shape[0] - p.shard.rows();
              CHECK(max_abs(steps[k].grads[s].narrow(0, p.offset, p.numel).view(p.shape).narrow(0, p.shard.rows(), pad)) == 0);
              CHECK(max_abs(steps[k].weights[s].narrow(0, p.offset, p.numel).view(p.shape).narrow(0, p.shard.rows(), pad)) == 0);
            }
          }
        }
      }
    }
    MESSAGE(folder_s << ": " << cases << " (tp, stages) cases; worst relative difference from the unsharded model: "
                     << "logits " << worst_logits << ", loss " << worst_loss << ", gradients " << worst_grad
                     << "; gradients from HF " << worst_hf);
  }
}

TEST_CASE("every family: one AdamW step on the shards is the slice of the step on the whole model") {
  for (const char* folder : kFixtures) {
    const std::string folder_s = folder;
    CAPTURE(folder_s);
    auto a = io::read_hf_config(kFix + folder).arch;
    Ref r = read_ref(folder);
    const auto& ad = r.meta["adamw"];
    const auto bounds = even_bounds(a.layers + 2, 2);
    const Step ref = run_step(a, bounds, folder, r, nullptr);
    double worst = 0;
    for (int tp : {2, 4}) {
      if (!tp_fits(a, tp)) continue;
      CAPTURE(tp);
      auto steps = run_group(a, bounds, folder, r, tp);
      for (size_t s = 0; s < ref.layouts.size(); ++s) {
        const StageLayout& F = ref.layouts[s];
        const at::Tensor full_step = adamw_once(ref.weights[s], ref.grads[s], ad);
        std::vector<at::Tensor> same, own;
        for (int k = 0; k < tp; ++k) {
          const StageLayout& L = steps[k].layouts[s];
          CHECK(at::equal(steps[k].weights[s], shard_flat(a, L, ref.weights[s])));  // loaded shard = slice
          // (a) the unsharded gradient's slice: bit for bit the slice of the whole step (padding stays zero)
          same.push_back(adamw_once(steps[k].weights[s], shard_flat(a, L, ref.grads[s]), ad));
          CHECK(at::equal(same.back(), shard_flat(a, L, full_step)));
          // (b) the shard's own gradient
          own.push_back(adamw_once(steps[k].weights[s], steps[k].grads[s], ad));
        }
        CHECK(at::equal(assemble_flat(a, F.layer_begin, F.layer_end, same, true), full_step));
        // replicas stay bit-identical after the step (check_replicas), and the step agrees with HF's AdamW step
        const at::Tensor whole = assemble_flat(a, F.layer_begin, F.layer_end, own, true);
        for (const auto& p : F.params) {
          CAPTURE(p.name);
          const double w = adamw_worst(whole.narrow(0, p.offset, p.numel).view(p.shape),
                                       hf_tensor(r, "after_adamw." + p.name, p), hf_tensor(r, "grad." + p.name, p), ad);
          CHECK(w <= 1.0);
          worst = std::max(worst, w);
        }
      }
    }
    MESSAGE(folder_s << ": weights after one AdamW step on the shards vs HF's: worst element at " << worst
                     << " of its bound");
  }
}

TEST_CASE("every family: HF checkpoint into shards (only their slices), gathered and saved = HF's file") {
  TmpDir d;
  for (const char* folder : kFixtures) {
    const std::string folder_s = folder;
    CAPTURE(folder_s);
    auto c = io::read_hf_config(kFix + folder);
    const auto& a = c.arch;
    const auto bounds = even_bounds(a.layers + 2, 2);
    const auto full = load_hf_weights(kFix + folder, a, stage_layouts(a, bounds));
    for (int tp : {2, 4}) {
      if (!tp_fits(a, tp)) continue;
      CAPTURE(tp);
      std::vector<std::vector<at::Tensor>> gathered(tp);
      test::ThreadGroup g(tp);
      g.run([&](TpComm& comm) {
        auto Ls = stage_layouts(a, bounds, comm.rank(), comm.size());
        auto shards = load_hf_weights(kFix + folder, a, Ls);
        for (size_t s = 0; s < Ls.size(); ++s) gathered[comm.rank()].push_back(tp_gather_flat(a, Ls[s], shards[s], comm));
      });
      for (int k = 0; k < tp; ++k)
        for (size_t s = 0; s < full.size(); ++s) CHECK(at::equal(gathered[k][s], full[s]));
      const std::string out = d / (folder_s + "-tp" + std::to_string(tp));
      save_hf_checkpoint(out, a, stage_layouts(a, bounds), gathered[0], at::kFloat);
      auto mine = io::Checkpoint::open(out), hf = io::Checkpoint::open(kFix + folder);
      CHECK(mine.names() == hf.names());
      for (auto& n : hf.names()) {
        CAPTURE(n);
        CHECK(mine.info(n).shape == hf.info(n).shape);
        auto x = mine.data(n), y = hf.data(n);
        CHECK((x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size()) == 0));
      }
    }
  }
  // the sharded and the legacy-named files give the same shards
  for (auto [x, y] : {std::pair{"qwen2-fp32", "qwen2-fp32-sharded"}, std::pair{"gpt2-fp32", "gpt2-legacy-names-fp32"}}) {
    auto a = io::read_hf_config(kFix + x).arch;
    auto Ls = stage_layouts(a, {0, 2, a.layers + 2}, 1, 2);
    auto p = load_hf_weights(kFix + x, a, Ls), q = load_hf_weights(kFix + y, a, Ls);
    for (size_t i = 0; i < p.size(); ++i) CHECK(at::equal(p[i], q[i]));
  }
  // bf16 flats: the shard is the slice of the bf16 load
  auto a = io::read_hf_config(kFix + "llama-gqa-bf16").arch;
  const auto L = full_layout(a), L1 = full_layout(a, 1, 2);
  std::vector<at::Tensor> f = {at::zeros({L.numel}, at::kBFloat16)}, s = {at::zeros({L1.numel}, at::kBFloat16)};
  load_hf_weights(kFix + "llama-gqa-bf16", a, {L}, f);
  load_hf_weights(kFix + "llama-gqa-bf16", a, {L1}, s);
  CHECK(at::equal(s[0], shard_flat(a, L1, f[0])));
  // a shard is not a checkpoint: save wants the gathered stage
  CHECK(has(error_of([&] { save_hf_checkpoint(d / "x", a, {L1}, s, at::kFloat); }), "gather the stage first"));
}

TEST_CASE("random init of a shard is the slice of the unsharded init") {
  for (const char* folder : {"gpt2-fp32", "qwen2-fp32", "qwen3-tied-fp32", "llama-tied-mha-fp32"}) {
    auto a = io::read_hf_config(kFix + folder).arch;
    for (auto bounds : {std::vector<int>{0, a.layers + 2}, even_bounds(a.layers + 2, 2)}) {
      for (int tp : {2, 4}) {
        if (!tp_fits(a, tp)) continue;
        CAPTURE(std::string(folder));
        CAPTURE(tp);
        for (size_t s = 0; s + 1 < bounds.size(); ++s) {
          const StageLayout F = stage_layout(a, bounds[s], bounds[s + 1]);
          at::Tensor whole = new_flat(F, at::kFloat);
          init_weights(a, F, whole, 7);
          std::vector<at::Tensor> shards;
          for (int k = 0; k < tp; ++k) {
            const StageLayout L = stage_layout(a, bounds[s], bounds[s + 1], k, tp);
            shards.push_back(at::full({L.numel}, 3.0));  // garbage first: init writes every element
            tp_init_weights(a, L, shards.back(), 7);
            CHECK(at::equal(shards.back(), shard_flat(a, L, whole)));  // padding rows zero too
          }
          CHECK(at::equal(assemble_flat(a, bounds[s], bounds[s + 1], shards, true), whole));
        }
      }
    }
  }
}

TEST_CASE("bf16 shards run: the loss is close to fp32's, gradients bf16, replicas identical") {
  auto a = io::read_hf_config(kFix + "qwen3-fp32").arch;
  Ref r = read_ref("qwen3-fp32");
  test::ThreadGroup g(2);
  std::vector<double> loss(2), div(2);
  g.run([&](TpComm& comm) {
    auto L = full_layout(a, comm.rank(), 2);
    std::vector<at::Tensor> f = {at::zeros({L.numel}, at::kBFloat16)};
    load_hf_weights(kFix + "qwen3-fp32", a, {L}, f);
    at::Tensor flat = f[0].requires_grad_(true);
    auto logits = tp_stage_forward(a, L, flat, r.ids, make_rope(a, r.ids.size(1)), comm, {}, /*fused_norm_on_cpu=*/true);
    CHECK((logits.scalar_type() == at::kFloat));
    auto l = tp_lm_loss_sum(logits, r.labels, a.vocab, comm) / static_cast<double>(count_tokens(r.labels));
    l.backward();
    CHECK((flat.grad().scalar_type() == at::kBFloat16));
    loss[comm.rank()] = l.item<double>();
    div[comm.rank()] = tp_replica_divergence(L, flat.grad(), comm);
  });
  CHECK(loss[0] == loss[1]);
  CHECK(std::abs(loss[0] - r.loss) < 0.02 * r.loss);
  CHECK(div[0] == 0.0);
}

TEST_CASE("collectives per step: two all-reduces per layer each way, plus embedding, head, loss and q/k norms") {
  for (const char* folder : {"llama-gqa-fp32", "qwen3-fp32", "gpt2-fp32"}) {
    CAPTURE(std::string(folder));
    auto a = io::read_hf_config(kFix + folder).arch;
    Ref r = read_ref(folder);
    test::ThreadGroup g(2);
    int fwd = 0, bwd = 0;
    g.run([&](TpComm& comm) {
      auto L = full_layout(a, comm.rank(), 2);
      auto flats = load_hf_weights(kFix + folder, a, {L});
      at::Tensor flat = flats[0].requires_grad_(true);
      auto loss = tp_lm_loss_sum(tp_stage_forward(a, L, flat, r.ids, make_rope(a, r.ids.size(1)), comm), r.labels,
                                 a.vocab, comm);
      if (comm.rank() == 0) fwd = g.collectives();  // only rank 0 counts: no race
      loss.backward();
      if (comm.rank() == 0) bwd = g.collectives() - fwd;
    });
    // forward: g at the embedding and after o and down of every layer; the loss's max and [sum-exp, target]
    CHECK(fwd == 1 + 2 * a.layers + 2);
    // backward: f before q/k/v and gate/up of every layer (and q_norm, k_norm), and before the head
    CHECK(bwd == 2 * a.layers + (a.qk_norm ? 2 * a.layers : 0) + 1);
  }
}

TEST_CASE("bad tensor-parallel layouts and misuse: one clear message") {
  auto gqa = io::read_hf_config(kFix + "llama3-gqa-fp32").arch;  // 4 heads, 2 kv heads
  auto e = error_of([&] { full_layout(gqa, 0, 4); });
  CHECK(has(e, "tp 4 does not divide the key/value heads (num_key_value_heads 2)"));
  e = error_of([&] { full_layout(gqa, 0, 3); });
  CHECK(has(e, "tp 3 does not divide the attention heads (num_attention_heads 4)"));
  auto odd = gqa;
  odd.kv_heads = 4;
  odd.ffn = 250;
  CHECK(has(error_of([&] { arch::check_tp(odd, 4, "model.json"); }), "model.json: tp 4 does not divide the MLP size (intermediate_size 250)"));
  CHECK_THROWS_AS(arch::check_tp(gqa, 4, "x"), arch::ConfigError);
  CHECK(has(error_of([&] { arch::check_tp(gqa, 0, "x"); }), "tp (tensor-parallel degree) must be >= 1"));
  CHECK(has(error_of([&] { full_layout(gqa, 2, 2); }), "tp rank 2 is not in [0,2)"));
  // the unsharded forward refuses a shard, the TP forward a group that does not match the layout
  auto L = full_layout(gqa, 1, 2);
  auto flat = new_flat(L, at::kFloat);
  auto ids = at::zeros({1, 4}, at::kLong);
  auto rope = make_rope(gqa, 8);
  CHECK(has(error_of([&] { stage_forward(gqa, L, flat, ids, rope); }), "tensor-parallel shard 1 of 2 (use tp_stage_forward)"));
  test::ThreadGroup g(2);
  std::vector<std::string> errs(2);
  g.run([&](TpComm& comm) {  // (refused before any collective, so rank 0 need not take part)
    if (comm.rank() == 1)
      errs[1] = error_of([&] { tp_stage_forward(gqa, full_layout(gqa, 0, 2), flat, ids, rope, comm); });
  });
  CHECK(has(errs[1], "the layout is tensor-parallel shard 0 of 2 but the group is rank 1 of 2"));
  // ids and labels outside the vocabulary: refused as the unsharded model refuses them
  g.run([&](TpComm& comm) {
    auto Lr = full_layout(gqa, comm.rank(), 2);
    errs[comm.rank()] = error_of([&] { tp_stage_forward(gqa, Lr, new_flat(Lr, at::kFloat), ids + gqa.vocab, rope, comm); });
  });
  CHECK(has(errs[0], "token id 113 outside the vocabulary [0,113)"));
  g.run([&](TpComm& comm) {
    auto rows = arch::tp_vocab(gqa.vocab, comm.rank(), 2).rows;
    errs[comm.rank()] = error_of([&] { tp_lm_loss_sum(at::zeros({1, 4, rows}), at::full({1, 4}, 200, at::kLong), gqa.vocab, comm); });
  });
  CHECK(has(errs[1], "label 200 outside the vocabulary [0,113)"));
}
