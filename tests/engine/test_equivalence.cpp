// Engine equivalence: mmoc-run (N worker processes, every schedule, v in {1,2}, offload on and off; every model family) trains the
// tiny GQA LLaMA to the same losses and final weights as a plain single-process LibTorch loop, fp32 on the CPU.
#include <ATen/ATen.h>
#include <sys/wait.h>
#include <unistd.h>
#include "tests/torch_doctest.hpp"

#include <cstdlib>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "compiler/pipeline.hpp"
#include "engine/io/fsutil.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "tests/engine/reference.hpp"

using namespace mmoc;

namespace {
const std::string kConfigs = MMOC_CONFIGS_DIR;
const std::string kRun = MMOC_RUN_BIN;
const std::string kData = MMOC_SOURCE_DIR "/data/sample/tiny_tokens.jsonl";

// Paths as strings: std::filesystem and LibTorch do not mix in one binary (engine/io/fsutil.hpp).
struct Path {
  std::string s;
  Path operator/(const std::string& x) const { return {s + "/" + x}; }
  std::string string() const { return s; }
};
Path scratch(const std::string& name) {
  const char* t = std::getenv("TMPDIR");
  Path p{std::string(t ? t : "/tmp") + "/mmoc-eq-" + std::to_string(::getpid()) + "/" + name};
  io::remove_tree(p.s);
  io::make_dirs(p.s);
  return p;
}

ir::Plan make_plan(int gpus, int v, const std::string& sched, const std::string& offload, double clip = 0,
                   const std::string& lr_sched = "constant", const std::string& model = "tiny-8l") {
  JobConfig j;
  j.model = model;
  j.hardware = "cpu8";
  j.gpus = gpus;
  j.v = std::to_string(v);
  j.micro_batch_size = 2;
  j.microbatches = 4;
  j.seq_len = 32;
  j.schedule = sched;
  j.offload = offload;
  j.recompute = "auto";
  j.budget_gib = 1;
  j.train.precision = "fp32";
  j.train.lr = 1e-3;
  j.train.weight_decay = 0.01;
  j.train.max_grad_norm = clip;
  j.train.lr_schedule = lr_sched;
  j.train.warmup_steps = lr_sched == "constant" ? 0 : 1;
  j.train.total_steps = 4;
  ModelSpec m = load_model(j.model, kConfigs);
  HardwareSpec hw = load_hardware(j.hardware, kConfigs);
  return compile_job(j, m, hw, {}).plan;
}

std::vector<double> read_losses(const Path& metrics) {
  std::ifstream f(metrics.s);
  std::vector<double> l;
  std::string line;
  while (std::getline(f, line)) l.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return l;
}

std::string scratch_log() {
  const char* t = std::getenv("TMPDIR");
  return std::string(t ? t : "/tmp") + "/mmoc-eq-" + std::to_string(::getpid()) + ".log";
}

int run(const std::string& cmd) {
  int rc = std::system((cmd + " > " + scratch_log() + " 2>&1").c_str());
  if (rc != 0) {
    std::ifstream f(scratch_log());
    std::stringstream ss;
    ss << f.rdbuf();
    MESSAGE("command failed: " << cmd << "\n" << ss.str());
  }
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

double rel_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(1e-12, b.abs().max().item<double>());
}

at::Tensor load_full(const ir::Plan& p, const Path& dir) {
  engine::StageLayout full = engine::full_layout(p.model);
  return engine::load_hf_weights(dir.string(), p.model, {full})[0];
}

void check_against_reference(const ir::Plan& plan, const std::string& label, int steps = 3) {
  Path dir = scratch(label);
  ir::save_file_atomic((dir / "plan.json").string(), ir::to_json_string(plan));
  int rc = run(kRun + " " + (dir / "plan.json").string() + " --data " + kData + " --steps " + std::to_string(steps) +
               " --device cpu --seed 7 -q --optim-threads 1 --metrics " + (dir / "m.jsonl").string() + " --save " +
               (dir / "ckpt").string());
  REQUIRE_MESSAGE(rc == 0, label);
  auto losses = read_losses(dir / "m.jsonl");
  auto ref = test::reference_train(plan, kData, steps, 7);
  REQUIRE(losses.size() == ref.losses.size());
  for (size_t i = 0; i < losses.size(); ++i)
    CHECK_MESSAGE(std::abs(losses[i] - ref.losses[i]) <= 1e-5 * std::abs(ref.losses[i]), label << " step " << i << ": " << losses[i] << " vs " << ref.losses[i]);
  double d = rel_diff(load_full(plan, dir / "ckpt"), ref.weights);
  CHECK_MESSAGE(d <= 1e-5, label << ": final weights differ by " << d << " (relative)");
  // training moved the weights at all (the comparison is not vacuous)
  engine::StageLayout full = engine::full_layout(plan.model);
  at::Tensor init = engine::new_flat(full, at::TensorOptions().dtype(at::kFloat));
  engine::init_weights(plan.model, full, init, 7);
  CHECK(rel_diff(ref.weights, init) > 1e-4);
  io::remove_tree(dir.s);
}
}  // namespace

TEST_CASE("pipelined and offloaded training equals plain training (every schedule, N in {1,2,4}, v in {1,2})") {
  int runs = 0;
  for (int gpus : {1, 2, 4})
    for (int v : {1, 2})
      for (std::string sched : {"gpipe", "1f1b", "interleaved-1f1b", "grouped"})
        for (std::string off : {"all", "none"}) {
          if (sched == "1f1b" && v != 1) continue;
          if (sched == "interleaved-1f1b" && (v < 2 || 4 % gpus != 0)) continue;
          std::string label = "N" + std::to_string(gpus) + "-v" + std::to_string(v) + "-" + sched + "-offload-" + off;
          CAPTURE(label);
          ir::Plan p = make_plan(gpus, v, sched, off);
          check_against_reference(p, label);
          ++runs;
        }
  CHECK(runs >= 20);
}

TEST_CASE("every model family: pipelined and offloaded training equals plain training") {
  // Llama-3.1 rope, Qwen2 q/k/v biases, Qwen3 q/k norms with head_dim != hidden/heads, Mistral's sliding window (8,
  // shorter than seq 32), GPT-2 blocks; tied GPT-2 in one stage (across stages: the next test case).
  struct Cfg {
    int gpus, v;
    const char* sched;
    const char* off;
  };
  int runs = 0;
  for (const char* model : {"tiny-llama3", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gpt2"})
    for (Cfg c : {Cfg{2, 2, "grouped", "all"}, Cfg{4, 1, "1f1b", "none"}, Cfg{2, 2, "interleaved-1f1b", "none"}}) {
      std::string label = std::string(model) + "-N" + std::to_string(c.gpus) + "-v" + std::to_string(c.v) + "-" + c.sched +
                          "-offload-" + c.off;
      CAPTURE(label);
      check_against_reference(make_plan(c.gpus, c.v, c.sched, c.off, 0.05, "cosine", model), label);
      ++runs;
    }
  for (const char* off : {"all", "none"}) {
    check_against_reference(make_plan(1, 1, "gpipe", off, 0, "constant", "tiny-gpt2-tied"),
                            std::string("tiny-gpt2-tied-N1-v1-offload-") + off);
    ++runs;
  }
  CHECK(runs == 17);
}

TEST_CASE("tied embeddings over several stages: one master copy and optimizer state, as plain training") {
  // The head stage gets stage 0's embedding each step (a copy on the same GPU, send/recv to another) and its gradient
  // goes back into stage 0's before the step: the same GPU (N1 v2, N2 grouped v2's S0/S3 on g0/g1), another rank,
  // offloaded (host master, CPU AdamW) and resident stage 0, clipping (the shared weight counted once in the norm).
  struct Cfg {
    const char* model;
    int gpus, v;
    const char* sched;
    const char* off;
    double clip;
  };
  int runs = 0;
  for (Cfg c : {Cfg{"tiny-tied", 1, 2, "gpipe", "all", 0}, Cfg{"tiny-tied", 1, 3, "grouped", "none", 0.05},
                Cfg{"tiny-tied", 2, 2, "interleaved-1f1b", "none", 0}, Cfg{"tiny-tied", 2, 2, "grouped", "all", 0.05},
                Cfg{"tiny-tied", 4, 1, "1f1b", "auto", 0.05}, Cfg{"tiny-tied", 3, 1, "gpipe", "all", 0},
                Cfg{"tiny-gpt2-tied", 2, 2, "grouped", "all", 0.05}, Cfg{"tiny-gpt2-tied", 4, 1, "1f1b", "none", 0}}) {
    std::string label = std::string(c.model) + "-N" + std::to_string(c.gpus) + "-v" + std::to_string(c.v) + "-" + c.sched +
                        "-offload-" + c.off + (c.clip > 0 ? "-clip" : "");
    CAPTURE(label);
    const ir::Plan p = make_plan(c.gpus, c.v, c.sched, c.off, c.clip, c.clip > 0 ? "cosine" : "constant", c.model);
    REQUIRE(p.num_stages() == c.gpus * c.v);
    int adds = 0;
    for (const auto& prog : p.programs)
      for (const auto& in : prog.instrs) adds += in.op == ir::Op::AddGrad;
    CHECK(adds == 1);
    check_against_reference(p, label);
    ++runs;
  }
  CHECK(runs == 8);
}

TEST_CASE("clipping by the global norm and a warmup+cosine schedule across ranks equal plain training") {
  check_against_reference(make_plan(2, 2, "grouped", "auto", 0.05, "cosine"), "N2-v2-grouped-clip-cosine", 4);
  check_against_reference(make_plan(4, 1, "1f1b", "none", 0.05, "linear"), "N4-v1-1f1b-resident-clip-linear", 4);
}

TEST_CASE("resuming from a checkpoint gives the same losses and weights as an uninterrupted run") {
  for (const char* model : {"tiny-8l", "tiny-tied"}) {
  CAPTURE(model);
  ir::Plan plan = make_plan(2, 2, "grouped", "all", 0.05, "cosine", model);
  Path dir = scratch("resume");
  ir::save_file_atomic((dir / "plan.json").string(), ir::to_json_string(plan));
  std::string base = kRun + " " + (dir / "plan.json").string() + " --data " + kData + " --device cpu --seed 3 -q --optim-threads 1";
  REQUIRE(run(base + " --steps 4 --metrics " + (dir / "full.jsonl").string() + " --save " + (dir / "full").string()) == 0);
  REQUIRE(run(base + " --steps 2 --metrics " + (dir / "part.jsonl").string() + " --save " + (dir / "part").string()) == 0);
  REQUIRE(run(base + " --steps 4 --resume " + (dir / "part").string() + " --metrics " + (dir / "part.jsonl").string() + " --save " +
              (dir / "resumed").string()) == 0);
  auto full = read_losses(dir / "full.jsonl"), part = read_losses(dir / "part.jsonl");
  REQUIRE(full.size() == 4);
  REQUIRE(part.size() == 4);
  for (int i = 0; i < 4; ++i) CHECK(part[i] == doctest::Approx(full[i]).epsilon(1e-12));
  CHECK(rel_diff(load_full(plan, dir / "resumed"), load_full(plan, dir / "full")) == 0.0);
  io::remove_tree(dir.s);
  }
}

namespace {
// The plan with partial recompute in every stage of more than one layer: its last `keep` layers (at most all but one)
// keep their stash, the first ones recompute (Stage::keep_layers; the engine splits the stage's forward there).
ir::Plan with_partial_recompute(ir::Plan p, int keep) {
  for (auto& s : p.stages)
    if (s.layers() > 1) {
      s.recompute = true;
      s.keep_layers = std::min(keep, s.layers() - 1);
    }
  REQUIRE(ir::verify_structure(p).empty());
  return p;
}

// The compiler's own choice: tiny-8l on cpu8 (2 GPUs, 4 micro-batches of 2 x 32 tokens, weights resident, fp32),
// compiled at budgets from 0.006 GiB (tiny-8l fits from 0.0065) up by `factor` while below `hi`, until a plan has
// what `want` asks; that plan is checked against plain training. False when no budget gave one.
bool check_first_compiled(const std::string& v, const std::string& sched, const std::string& recompute, double hi,
                          double factor, const std::function<bool(const ir::Plan&)>& want, const std::string& label) {
  JobConfig j;
  j.model = "tiny-8l";
  j.hardware = "cpu8";
  j.gpus = 2;
  j.v = v;
  j.micro_batch_size = 2;
  j.microbatches = 4;
  j.seq_len = 32;
  j.schedule = sched;
  j.offload = "none";
  j.recompute = recompute;
  j.train.precision = "fp32";
  j.train.lr = 1e-3;
  const ModelSpec m = load_model(j.model, kConfigs);
  const HardwareSpec hw = load_hardware(j.hardware, kConfigs);
  for (double b = 0.006; b < hi; b *= factor) {
    j.budget_gib = b;
    ir::Plan p;
    try {
      p = compile_job(j, m, hw, {}).plan;
    } catch (const InputError&) {
      continue;
    }
    if (!want(p)) continue;
    CAPTURE(b);
    check_against_reference(p, label);
    return true;
  }
  return false;
}
}  // namespace

TEST_CASE("partial recompute (a stage's first layers recompute, the others keep their stash) equals plain training") {
  // one stage of everything: the embedding and the first decoder layers recompute, the last ones and the head keep
  check_against_reference(with_partial_recompute(make_plan(1, 1, "gpipe", "none"), 3), "partial-N1-v1-gpipe");
  // pipelined, offloaded weights and resident ones, split stages in the middle of the model
  check_against_reference(with_partial_recompute(make_plan(2, 1, "1f1b", "none"), 2), "partial-N2-v1-1f1b");
  check_against_reference(with_partial_recompute(make_plan(2, 2, "interleaved-1f1b", "all", 0.05, "cosine"), 1),
                          "partial-N2-v2-interleaved-clip");
  // tied GPT-2 in one stage: the embedding recomputes, the tied head (the embedding's matrix) keeps its stash
  check_against_reference(with_partial_recompute(make_plan(1, 1, "gpipe", "all", 0, "constant", "tiny-gpt2-tied"), 2),
                          "partial-gpt2-tied-N1");
  // the compiler's own choice: a budget between all-recompute and none gives a partial plan (1f1b: no stage forced)
  const bool found = check_first_compiled("1", "1f1b", "auto", 0.02, 1.05, [](const ir::Plan& p) {
    bool partial = false;
    for (const auto& s : p.stages) partial |= s.recompute && s.keep_layers > 0;
    return partial;
  }, "partial-compiled-N2-1f1b");
  CHECK_MESSAGE(found, "no budget gave a plan with partial recompute");
}

namespace {
// The plan with selective recompute inside the layer in every stage that keeps the stash of a decoder layer
// (Stage::selective: the engine runs those layers' SwiGLU and down projection as one node that recomputes the SwiGLU).
ir::Plan with_selective(ir::Plan p) {
  int n = 0;
  for (auto& s : p.stages) {
    const int kept_from = std::max(s.layer_begin + s.recompute_layers(), 1);
    s.selective = kept_from < std::min(s.layer_end, p.model.layers + 1);
    n += s.selective;
  }
  REQUIRE(n > 0);
  REQUIRE(ir::verify_structure(p).empty());
  return p;
}
}  // namespace

TEST_CASE("selective recompute inside the layer equals plain training") {
  // every layer kept, one stage; pipelined with offloaded weights; with partial recompute (only the kept layers
  // select) and clipping; GQA
  check_against_reference(with_selective(make_plan(1, 1, "gpipe", "none")), "selective-N1-v1-gpipe");
  check_against_reference(with_selective(make_plan(2, 1, "1f1b", "all")), "selective-N2-v1-1f1b-offload-all");
  check_against_reference(with_selective(with_partial_recompute(make_plan(2, 2, "interleaved-1f1b", "all", 0.05, "cosine"), 1)),
                          "selective-partial-N2-v2-interleaved-clip");
  check_against_reference(with_selective(make_plan(2, 1, "1f1b", "none", 0, "constant", "tiny-gqa")), "selective-gqa-N2");
  // the compiler's own choice (selective=auto): a budget where some stages select and others do not
  const bool found = check_first_compiled("2", "interleaved-1f1b", "off", 0.05, 1.03, [](const ir::Plan& p) {
    int sel = 0;
    for (const auto& s : p.stages) sel += s.selective;
    return sel > 0 && sel < p.num_stages() - 2;  // the embedding's and the head's stages never select
  }, "selective-compiled-N2-v2");
  CHECK_MESSAGE(found, "no budget gave a plan where some stages select and others do not");
}
