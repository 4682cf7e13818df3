// Data parallelism with pipelines (pp x dp): mmoc-run with pp*dp worker processes (gloo on the CPU) trains to the
// same losses and final weights as the plain single-process loop on the whole batch, for (pp, dp) in {(1,2), (2,2)}
// x v in {1,2} x offload all/none on two families (the GQA tiny-8l, GPT-2), tied embeddings over stages with dp (the
// tied gradient reduced with stage 0's); a checkpoint saved under one layout
// resumes under another (dp 2 -> 1, 1 -> 2) to the uninterrupted run's weights; bad layouts exit 2 naming why.
// Tensor parallelism: (pp, dp, tp) in {(1,1,2), (2,1,2), (2,2,2), (3,1,2)} x v {1,2} x offload all/none on the same
// two families, tied heads under tp, resumes across (dp, tp), and partial recompute (Stage::keep_layers) under tp.
#include <ATen/ATen.h>
#include <sys/wait.h>
#include <unistd.h>
#include "tests/torch_doctest.hpp"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "compiler/pipeline.hpp"
#include "engine/io/fsutil.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "ir/ops.hpp"
#include "passes/pass.hpp"
#include "tests/engine/reference.hpp"

using namespace mmoc;

namespace {
const std::string kConfigs = MMOC_CONFIGS_DIR;
const std::string kRun = MMOC_RUN_BIN;
const std::string kCompile = MMOC_COMPILE_BIN;
const std::string kData = MMOC_SOURCE_DIR "/data/sample/tiny_tokens.jsonl";

std::string tmp_root() {
  const char* t = std::getenv("TMPDIR");
  return std::string(t ? t : "/tmp") + "/mmoc-dp-" + std::to_string(::getpid());
}
std::string scratch(const std::string& name) {
  std::string p = tmp_root() + "/" + name;
  io::remove_tree(p);
  io::make_dirs(p);
  return p;
}

ir::Plan make_plan(int pp, int dp, int v, const std::string& offload, const std::string& model, double clip = 0,
                   int microbatches = 4, int tp = 1, double bucket_mib = JobConfig{}.bucket_mib) {
  JobConfig j;
  j.bucket_mib = bucket_mib;
  j.model = model;
  j.hardware = "cpu8";
  j.gpus = pp;
  j.dp = dp;
  j.tp = tp;
  j.v = std::to_string(v);
  j.micro_batch_size = 2;
  j.microbatches = microbatches;
  j.seq_len = 32;
  j.schedule = v > 1 ? "grouped" : "1f1b";
  j.offload = offload;
  j.recompute = "auto";
  j.budget_gib = 1;
  j.train.precision = "fp32";
  j.train.lr = 1e-3;
  j.train.weight_decay = 0.01;
  // Tensor parallelism changes the GEMM shapes, so gradients differ from the plain loop's by fp32 rounding (~1e-8
  // relative to their terms). AdamW's first steps move an element by about lr * g / (|g| + eps): for the few elements
  // whose gradient is itself at rounding level (GPT-2's tiny c_proj rows: |g| ~ 4e-9 against a median of 1e-3) a
  // 1e-9 difference moves the update by 5% of lr with eps 1e-8 (5e-5 of the weights). With eps 1e-6 such elements step
  // in proportion to g and the rounding stays rounding; a wrong gradient of any real size is still caught.
  if (tp > 1) j.train.eps = 1e-6;
  j.train.max_grad_norm = clip;
  j.train.lr_schedule = clip > 0 ? "cosine" : "constant";
  j.train.warmup_steps = clip > 0 ? 1 : 0;
  j.train.total_steps = 4;
  ModelSpec m = load_model(j.model, kConfigs);
  HardwareSpec hw = load_hardware(j.hardware, kConfigs);
  return compile_job(j, m, hw, {}).plan;
}

std::vector<double> read_losses(const std::string& metrics) {
  std::ifstream f(metrics);
  std::vector<double> l;
  std::string line;
  while (std::getline(f, line)) l.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return l;
}

// Runs cmd; returns its exit code and (in out) what it printed.
int run(const std::string& cmd, std::string* out = nullptr) {
  const std::string log = tmp_root() + ".log";
  int rc = std::system((cmd + " > " + log + " 2>&1").c_str());
  std::ifstream f(log);
  std::stringstream ss;
  ss << f.rdbuf();
  if (out) *out = ss.str();
  const int code = WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
  if (code != 0 && !out) MESSAGE("command failed: " << cmd << "\n" << ss.str());
  return code;
}

double rel_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(1e-12, b.abs().max().item<double>());
}

at::Tensor load_full(const ir::Plan& p, const std::string& dir) {
  engine::StageLayout full = engine::full_layout(p.model);
  return engine::load_hf_weights(dir, p.model, {full})[0];
}

int count_ops(const ir::Plan& p, ir::Op op) {
  int n = 0;
  for (const auto& prog : p.programs)
    for (const auto& in : prog.instrs) n += in.op == op;
  return n;
}

std::string run_cmd(const std::string& dir, int steps) {
  return kRun + " " + dir + "/plan.json --data " + kData + " --steps " + std::to_string(steps) +
         " --device cpu --seed 7 -q --optim-threads 1";
}

// env: variables for mmoc-run ("NAME=value ")
void check_against_reference(const ir::Plan& plan, const std::string& label, int steps = 3, const std::string& env = "") {
  const std::string dir = scratch(label);
  ir::save_file_atomic(dir + "/plan.json", ir::to_json_string(plan));
  int rc = run(env + run_cmd(dir, steps) + " --metrics " + dir + "/m.jsonl --save " + dir + "/ckpt");
  REQUIRE_MESSAGE(rc == 0, label);
  auto losses = read_losses(dir + "/m.jsonl");
  auto ref = test::reference_train(plan, kData, steps, 7);
  REQUIRE(losses.size() == ref.losses.size());
  for (size_t i = 0; i < losses.size(); ++i)
    CHECK_MESSAGE(std::abs(losses[i] - ref.losses[i]) <= 1e-5 * std::abs(ref.losses[i]),
                  label << " step " << i << ": " << losses[i] << " vs " << ref.losses[i]);
  double d = rel_diff(load_full(plan, dir + "/ckpt"), ref.weights);
  CHECK_MESSAGE(d <= 1e-5, label << ": final weights differ by " << d << " (relative)");
  engine::StageLayout full = engine::full_layout(plan.model);
  at::Tensor init = engine::new_flat(full, at::TensorOptions().dtype(at::kFloat));
  engine::init_weights(plan.model, full, init, 7);
  CHECK(rel_diff(ref.weights, init) > 1e-4);  // training moved the weights: the comparison is not vacuous
  io::remove_tree(dir);
}
}  // namespace

TEST_CASE("a dp plan: the layout, its groups, one gradient allreduce per stage over its replicas") {
  ir::Plan p = make_plan(2, 2, 2, "none", "tiny-8l");
  CHECK(p.dp == 2);
  CHECK(p.gpus == 2);
  CHECK(p.microbatches == 2);  // per replica: the step's 4 split over 2 replicas
  CHECK(ir::world_size(p) == 4);
  CHECK(ir::rank_coord(p, 3).pipe == 1);
  CHECK(ir::rank_coord(p, 3).replica == 1);
  auto g = ir::process_groups(p);
  CHECK(g.at("dp.g0") == std::vector<int>{0, 2});
  CHECK(g.at("dp.g1") == std::vector<int>{1, 3});
  CHECK(count_ops(p, ir::Op::AllReduce) == p.num_stages());
  for (const auto& prog : p.programs)
    for (const auto& in : prog.instrs)
      if (in.op == ir::Op::AllReduce) {
        CHECK(in.group == "dp.g" + std::to_string(prog.gpu));
        CHECK(in.buf->kind == ir::BufKind::WGrad);
      }
  // dp = 1: no collective, the plan as before
  CHECK(count_ops(make_plan(2, 1, 2, "none", "tiny-8l"), ir::Op::AllReduce) == 0);
  // the text form round-trips, and the verifier rejects an unknown group and a mismatched collective
  CHECK(ir::parse_text(ir::print_text(p)) == p);
  ir::Plan bad = p;
  for (auto& in : bad.programs[0].instrs)
    if (in.op == ir::Op::AllReduce) { in.group = "dp.g7"; break; }
  auto problems = ir::verify_structure(bad);
  REQUIRE(!problems.empty());
  CHECK(problems[0].find("unknown group 'dp.g7'") != std::string::npos);
  bad = p;
  for (auto& in : bad.programs[0].instrs)
    if (in.op == ir::Op::AllReduce) { in.group = "dp.g1"; break; }
  problems = ir::verify_structure(bad);
  REQUIRE(!problems.empty());
  CHECK(problems[0].find("group 'dp.g1' has no rank that runs g0") != std::string::npos);
}

TEST_CASE("offloaded stages of a dp plan: reduce_scatter after the last backward, sharded cpu optim, allgather of w") {
  ir::Plan p = make_plan(2, 2, 1, "all", "tiny-8l");
  CHECK(count_ops(p, ir::Op::ReduceScatter) == p.num_stages());
  CHECK(count_ops(p, ir::Op::AllGather) == p.num_stages());
  CHECK(count_ops(p, ir::Op::AllReduce) == 0);
  for (const auto& prog : p.programs)
    for (const auto& st : p.stages) {
      if (st.gpu != prog.gpu) continue;
      CAPTURE(st.id);
      int last_bwd = -1, rs = -1, evict = -1, opt = -1, ag = -1;
      for (int i = 0; i < (int)prog.instrs.size(); ++i) {
        const auto& in = prog.instrs[i];
        const bool wg = in.buf && *in.buf == ir::BufRef{ir::BufKind::WGrad, st.id, -1};
        if (in.op == ir::Op::Backward && in.stage == st.id) last_bwd = i;
        if (in.op == ir::Op::ReduceScatter && wg) rs = i;
        if (in.op == ir::Op::Evict && wg) evict = i;
        if (in.op == ir::Op::Optim && in.stage == st.id) opt = i;
        if (in.op == ir::Op::AllGather && in.buf->stage == st.id) ag = i;
      }
      REQUIRE(rs > last_bwd);
      REQUIRE(evict > rs);
      const auto& ev = prog.instrs[evict].after;
      CHECK(std::find(ev.begin(), ev.end(), rs) != ev.end());  // the copy to the host waits for the reduction
      CHECK(opt > evict);
      CHECK(ag > opt);
      CHECK(prog.instrs[ag].stream == ir::Stream::Cpu);
      CHECK(prog.instrs[ag].group == "dp.g" + std::to_string(prog.gpu));
    }
  CHECK(ir::parse_text(ir::print_text(p)) == p);
  CHECK(ir::from_json_string(ir::to_json_string(p)) == p);
}

// Gradient buckets (JobConfig::bucket_mib): a stage's wgrad(S) reduced and copied to the host in slices.
struct Buckets {
  int n = 0;                                 // buckets of the stage (0: none, the whole buffer)
  std::vector<int> red, evict;               // their reductions, copies to the host (instruction indices)
};
Buckets buckets_of(const ir::Program& prog, int stage, ir::Op red_op) {
  Buckets b;
  const ir::BufRef wg{ir::BufKind::WGrad, stage, -1};
  for (int i = 0; i < (int)prog.instrs.size(); ++i) {
    const auto& in = prog.instrs[i];
    if (!in.buf || *in.buf != wg) continue;
    if (in.op == red_op) { b.red.push_back(i); b.n = in.buckets; }
    if (in.op == ir::Op::Evict && in.to_host) b.evict.push_back(i);
  }
  return b;
}

TEST_CASE("gradient buckets of a dp plan: each its own collective on a slice, the copies to the host cut the same") {
  // 0.1 MiB buckets: tiny-8l's decoder stages (~0.7 MiB of fp32 gradient) are cut in several, the embedding's not
  for (std::string off : {"all", "none"}) {
    CAPTURE(off);
    ir::Plan p = make_plan(2, 2, 1, off, "tiny-8l", 0, 4, 1, 0.1);
    const ir::Op red_op = off == "all" ? ir::Op::ReduceScatter : ir::Op::AllReduce;
    int bucketed = 0;
    for (const auto& st : p.stages) {
      CAPTURE(st.id);
      const auto& prog = p.programs[st.gpu];
      Buckets b = buckets_of(prog, st.id, red_op);
      const int64_t bytes = p.buffer_bytes({ir::BufKind::WGrad, st.id, -1});
      if (bytes <= int64_t(0.1 * 1048576)) {  // fits in one bucket: the whole buffer, as without buckets
        CHECK(b.n == 0);
        CHECK(b.red.size() == 1);
        continue;
      }
      ++bucketed;
      REQUIRE(b.n >= 3);
      REQUIRE((int)b.red.size() == b.n);
      if (off == "all") CHECK(b.n % p.dp == 0);  // aligned to the ZeRO shards
      int64_t sum = 0;
      for (int k = 0; k < b.n; ++k) {
        const auto& in = prog.instrs[b.red[k]];
        CHECK(in.bucket == k);
        CHECK(in.stream == ir::Stream::P2P);
        CHECK(in.group == "dp.g" + std::to_string(prog.gpu));
        if (k > 0) CHECK(b.red[k] > b.red[k - 1]);  // in order on the p2p stream
        sum += ir::transfer_bytes(p, in);
      }
      CHECK(sum == bytes);  // the buckets cover the gradient exactly
      if (off == "all") {
        REQUIRE((int)b.evict.size() == b.n);
        for (int k = 0; k < b.n; ++k) {
          const auto& ev = prog.instrs[b.evict[k]];
          CHECK(ev.bucket == k);
          CHECK(ev.buckets == b.n);
          CHECK(ev.stream == ir::Stream::D2H);
          // each copy waits for its own bucket's reduction, not the last one's
          CHECK(std::find(ev.after.begin(), ev.after.end(), b.red[k]) != ev.after.end());
          if (k < b.n - 1) CHECK(std::find(ev.after.begin(), ev.after.end(), b.red.back()) == ev.after.end());
          // the buffer leaves with the last bucket only
          bool frees = false;
          for (const auto& e : ir::effects(p, ev)) frees = frees || e.access == ir::Access::Free;
          CHECK(frees == (k == b.n - 1));
        }
      } else {
        CHECK(b.evict.empty());
      }
      // the stage's update: offloaded, on the cpu in the same buckets, each after its own bucket's copy (then the
      // allgather of the weights after the last); resident, on the GPU after the last bucket
      std::vector<int> opts;
      int ag = -1;
      for (int i = 0; i < (int)prog.instrs.size(); ++i) {
        if (prog.instrs[i].op == ir::Op::Optim && prog.instrs[i].stage == st.id) opts.push_back(i);
        if (prog.instrs[i].op == ir::Op::AllGather && prog.instrs[i].buf->stage == st.id) ag = i;
      }
      if (off == "all") {
        REQUIRE((int)opts.size() == b.n);
        for (int k = 0; k < b.n; ++k) {
          const auto& o = prog.instrs[opts[k]];
          CHECK(o.stream == ir::Stream::Cpu);
          CHECK(o.bucket == k);
          CHECK(std::find(o.after.begin(), o.after.end(), b.evict[k]) != o.after.end());
        }
        CHECK(ag > opts.back());
      } else {
        REQUIRE(opts.size() == 1);
        const auto& o = prog.instrs[opts[0]];
        CHECK(o.buckets == 0);
        CHECK(std::find(o.after.begin(), o.after.end(), b.red.back()) != o.after.end());
      }
    }
    CHECK(bucketed >= 1);
    CHECK(ir::verify_structure(p).empty());
    CHECK(ir::parse_text(ir::print_text(p)) == p);
    CHECK(ir::from_json_string(ir::to_json_string(p)) == p);
    CHECK(ir::print_text(p).find("wgrad(S1)[2/") != std::string::npos);
    if (off == "all") CHECK(ir::print_text(p).find("optim S1[2/") != std::string::npos);
    // the verifier: buckets out of order, and a bucket left out
    for (const auto& st : p.stages) {
      Buckets b = buckets_of(p.programs[st.gpu], st.id, red_op);
      if (b.n < 3) continue;
      ir::Plan bad = p;
      std::swap(bad.programs[st.gpu].instrs[b.red[0]].bucket, bad.programs[st.gpu].instrs[b.red[1]].bucket);
      auto problems = ir::verify_structure(bad);
      REQUIRE(!problems.empty());
      CHECK(problems[0].find("in its buckets 1..n in order") != std::string::npos);
      bad = p;
      bad.programs[st.gpu].instrs[b.red[1]].buckets = b.n + 1;
      CHECK(!ir::verify_structure(bad).empty());
      bad = p;
      bad.programs[st.gpu].instrs[b.red[1]].bucket = b.n;  // [n+1/n]
      problems = ir::verify_structure(bad);
      REQUIRE(!problems.empty());
      CHECK(problems[0].find("out of range") != std::string::npos);
      break;
    }
  }
  // 0: one bucket per stage (the plan as before buckets)
  ir::Plan whole = make_plan(2, 2, 1, "all", "tiny-8l", 0, 4, 1, 0);
  CHECK(count_ops(whole, ir::Op::ReduceScatter) == whole.num_stages());
  for (const auto& prog : whole.programs)
    for (const auto& in : prog.instrs) CHECK(in.buckets == 0);
}

// The most buckets any stage's gradient is reduced in.
int max_buckets(const ir::Plan& p) {
  int n = 0;
  for (const auto& prog : p.programs)
    for (const auto& in : prog.instrs)
      if (in.op == ir::Op::AllReduce || in.op == ir::Op::ReduceScatter) n = std::max(n, in.buckets);
  return n;
}

TEST_CASE("dp training with gradient buckets (>= 3 per stage) equals plain training (offload all/none)") {
  auto check = [](const ir::Plan& p, const std::string& label) {
    CAPTURE(label);
    REQUIRE(max_buckets(p) >= 3);
    check_against_reference(p, label);
  };
  // 0.1 MiB buckets: several per decoder stage; the copies to the host per bucket (offload all) land in the shards
  check(make_plan(2, 2, 1, "all", "tiny-8l", 0, 4, 1, 0.1), "buckets-pp2-dp2-offload-all");
  check(make_plan(1, 2, 2, "none", "tiny-8l", 0, 4, 1, 0.1), "buckets-pp1-dp2-v2-offload-none");
  // clipping by the global norm (gradnorm waits for every bucket), 4 replicas (4 shards per stage), GPT-2
  check(make_plan(1, 4, 1, "all", "tiny-gpt2", 0.05, 8, 1, 0.05), "buckets-pp1-dp4-offload-all-clip");
  check(make_plan(2, 2, 2, "none", "tiny-gpt2", 0.05, 4, 1, 0.05), "buckets-pp2-dp2-v2-offload-none-clip");
  // dp x tp: each tp shard's gradient in buckets over its own replicas
  check(make_plan(1, 2, 1, "all", "tiny-8l", 0, 4, 2, 0.05), "buckets-pp1-dp2-tp2-offload-all");
}

TEST_CASE("pp x dp training equals plain training ((1,2), (2,2) x v 1,2 x offload all/none x GQA llama, GPT-2)") {
  int runs = 0;
  for (const char* model : {"tiny-8l", "tiny-gpt2"})
    for (int pp : {1, 2})
      for (int v : {1, 2})
        for (std::string off : {"all", "none"}) {
          const std::string label = std::string(model) + "-pp" + std::to_string(pp) + "-dp2-v" + std::to_string(v) + "-offload-" + off;
          CAPTURE(label);
          check_against_reference(make_plan(pp, 2, v, off, model), label);
          ++runs;
        }
  CHECK(runs == 16);
}

TEST_CASE("dp with tied embeddings over stages: stage 0's gradient is reduced after the head's tied gradient is added") {
  // the plan: on the stage-0 rank the reduction of wgrad(S0) follows addgrad tiegrad(S<last>) -> S0
  for (std::string off : {"none", "all"}) {
    CAPTURE(off);
    ir::Plan p = make_plan(2, 2, 1, off, "tiny-tied");
    REQUIRE(p.model.tied_embeddings);
    const auto& prog = p.programs[p.stages[0].gpu].instrs;
    int add = -1, red = -1;
    for (int i = 0; i < (int)prog.size(); ++i) {
      if (prog[i].op == ir::Op::AddGrad) add = i;
      if ((prog[i].op == ir::Op::AllReduce || prog[i].op == ir::Op::ReduceScatter) && prog[i].buf &&
          *prog[i].buf == ir::BufRef{ir::BufKind::WGrad, 0, -1})
        red = i;
    }
    REQUIRE(add >= 0);
    REQUIRE(red > add);
    CHECK(std::find(prog[red].after.begin(), prog[red].after.end(), add) != prog[red].after.end());
  }
  // and training equals the plain loop (the tied weight's one gradient, reduced over the replicas)
  for (int v : {1, 2})
    for (std::string off : {"all", "none"}) {
      const std::string label = "tied-pp2-dp2-v" + std::to_string(v) + "-offload-" + off;
      CAPTURE(label);
      check_against_reference(make_plan(2, 2, v, off, "tiny-tied", v == 2 ? 0.05 : 0), label);
    }
  check_against_reference(make_plan(1, 2, 2, "all", "tiny-gpt2-tied"), "tied-gpt2-pp1-dp2-v2-offload-all");
}

TEST_CASE("dp with clipping by the global norm, a cosine schedule and 4 replicas equals plain training") {
  // the weights' allgather in pieces of 997 elements (its temporary stays small): pieces straddle the shards' bounds
  check_against_reference(make_plan(2, 2, 1, "all", "tiny-8l", 0.05), "clip-pp2-dp2-offload-all", 4, "MMOC_GATHER_CHUNK=997 ");
  check_against_reference(make_plan(1, 4, 2, "none", "tiny-8l", 0.05, 8), "clip-pp1-dp4-v2-resident", 3);
}

TEST_CASE("a checkpoint saved under one layout resumes under another exactly (dp 2 -> 1 and 1 -> 2)") {
  for (auto [dp_a, dp_b] : {std::pair{2, 1}, std::pair{1, 2}}) {
    const std::string label = "resume-dp" + std::to_string(dp_a) + "-to-dp" + std::to_string(dp_b);
    CAPTURE(label);
    ir::Plan pa = make_plan(2, dp_a, 1, "all", "tiny-8l", 0.05), pb = make_plan(2, dp_b, 1, "all", "tiny-8l", 0.05);
    const std::string dir = scratch(label), a = dir + "/a", b = dir + "/b";
    io::make_dirs(a);
    io::make_dirs(b);
    ir::save_file_atomic(a + "/plan.json", ir::to_json_string(pa));
    ir::save_file_atomic(b + "/plan.json", ir::to_json_string(pb));
    // 2 steps under layout a, then 2 more under b from its checkpoint: the uninterrupted plain loop's 4 steps
    REQUIRE(run(run_cmd(a, 2) + " --metrics " + dir + "/part.jsonl --save " + dir + "/part") == 0);
    REQUIRE(run(run_cmd(b, 4) + " --resume " + dir + "/part --metrics " + dir + "/part.jsonl --save " + dir + "/resumed") == 0);
    auto full = test::reference_train(pb, kData, 4, 7);
    auto part = read_losses(dir + "/part.jsonl");
    REQUIRE(part.size() == 4);
    for (int i = 0; i < 4; ++i) CHECK(part[i] == doctest::Approx(full.losses[i]).epsilon(1e-5));
    CHECK(rel_diff(load_full(pb, dir + "/resumed"), full.weights) <= 1e-5);
    io::remove_tree(dir);
  }
}

// ---- tensor parallelism (pp, dp, tp) --------------------------------------------------------------------------
// Training under layout (pp, dp, tp) x v in {1, 2} x offload all/none on the GQA tiny-8l and GPT-2 equals the plain
// loop: one test case per layout (ctest runs each as its own entry: engine_tp_<pp><dp><tp>).
void check_tp_layout(int pp, int dp, int tp) {
  int runs = 0;
  for (const char* model : {"tiny-8l", "tiny-gpt2"})
    for (int v : {1, 2})
      for (std::string off : {"all", "none"}) {
        const std::string label = std::string(model) + "-pp" + std::to_string(pp) + "-dp" + std::to_string(dp) + "-tp" +
                                  std::to_string(tp) + "-v" + std::to_string(v) + "-offload-" + off;
        CAPTURE(label);
        ir::Plan p = make_plan(pp, dp, v, off, model, v == 2 ? 0.05 : 0, 4, tp);
        REQUIRE(p.tp == tp);
        REQUIRE(ir::world_size(p) == pp * dp * tp);
        check_against_reference(p, label);
        ++runs;
      }
  CHECK(runs == 8);
}

TEST_CASE("tp layout pp1-dp1-tp2: trains as the plain loop") { check_tp_layout(1, 1, 2); }
TEST_CASE("tp layout pp2-dp1-tp2: trains as the plain loop") { check_tp_layout(2, 1, 2); }
TEST_CASE("tp layout pp2-dp2-tp2: trains as the plain loop") { check_tp_layout(2, 2, 2); }
TEST_CASE("tp layout pp3-dp1-tp2: trains as the plain loop") { check_tp_layout(3, 1, 2); }

// Partial recompute under tensor parallelism (Stage::keep_layers): a stage's first layers run without autograd in
// forward and again in backward, the others keep their stash; the tp collectives run in both parts, in the same order
// on every shard (tp_stage_forward_layers).
ir::Plan with_partial_recompute(ir::Plan p, int keep) {
  unlower_tp(p);  // a recomputing stage's backward replays forward all-reduces: its tp segments change
  for (auto& s : p.stages)
    if (s.layers() > 1) {
      s.recompute = true;
      s.keep_layers = std::min(keep, s.layers() - 1);
    }
  lower_tp(p);
  REQUIRE(ir::verify_structure(p).empty());
  return p;
}

TEST_CASE("tp layout with partial recompute: trains as the plain loop") {
  check_against_reference(with_partial_recompute(make_plan(1, 1, 1, "none", "tiny-8l", 0, 4, 2), 3), "partial-tiny-8l-pp1-tp2");
  check_against_reference(with_partial_recompute(make_plan(2, 2, 1, "all", "tiny-8l", 0.05, 4, 2), 1), "partial-tiny-8l-pp2-dp2-tp2");
  // GPT-2 with a tied head in one stage: the vocabulary-parallel embedding recomputes, the tied head keeps its stash
  check_against_reference(with_partial_recompute(make_plan(1, 1, 2, "all", "tiny-gpt2-tied", 0, 4, 2), 2), "partial-gpt2-tied-pp1-tp2");
  // the compiler's own choice under tp 2: a budget between all-recompute and none gives a partial plan
  bool found = false;
  for (double b = 0.002; b < 0.02 && !found; b *= 1.05) {
    ir::Plan p;
    try {
      JobConfig j;
      j.model = "tiny-8l";
      j.hardware = "cpu8";
      j.gpus = 2;
      j.tp = 2;
      j.v = "1";
      j.micro_batch_size = 2;
      j.microbatches = 4;
      j.seq_len = 32;
      j.schedule = "1f1b";
      j.offload = "none";
      j.recompute = "auto";
      j.budget_gib = b;
      j.train.precision = "fp32";
      j.train.lr = 1e-3;
      j.train.eps = 1e-6;  // make_plan's eps for tp (see there)
      j.train.total_steps = 4;
      p = compile_job(j, load_model(j.model, kConfigs), load_hardware(j.hardware, kConfigs), {}).plan;
    } catch (const InputError&) {
      continue;
    }
    for (const auto& s : p.stages) found |= s.recompute && s.keep_layers > 0;
    if (found) {
      CAPTURE(b);
      check_against_reference(p, "partial-compiled-pp2-tp2-1f1b");
    }
  }
  CHECK_MESSAGE(found, "no budget gave a tp 2 plan with partial recompute");
}

// The tensor-parallel all-reduces are the plan's instructions (tp-lowering): the engine runs each where its
// `allreduce part/partgrad` stands (engine/exec/tp_segments.hpp; the equivalence runs above go through them, and a
// count that differed from what the model issues would stop them). A plan with one missing or moved is refused.
TEST_CASE("tp collectives are plan instructions: mmoc-run refuses a plan with one missing or moved") {
  const ir::Plan p = make_plan(1, 1, 1, "none", "tiny-8l", 0, 4, 2);
  REQUIRE(p.tp == 2);
  int parts = 0;
  for (const auto& in : p.programs[0].instrs) parts += in.op == ir::Op::AllReduce && in.seg >= 0;
  CHECK(parts == p.microbatches * (ir::tp_collectives(p, 0, ir::Op::Forward) + ir::tp_collectives(p, 0, ir::Op::Backward)));
  auto index_of = [](const ir::Plan& q, ir::Op op, int seg, bool coll) {
    const auto& v = q.programs[0].instrs;
    for (int i = 0; i < (int)v.size(); ++i)
      if (coll ? (v[i].op == ir::Op::AllReduce && v[i].buf && v[i].buf->kind == ir::BufKind::PartGrad && v[i].buf->mb == 1 && v[i].seg == seg)
               : (v[i].op == op && v[i].mb == 1 && v[i].seg == seg))
        return i;
    return -1;
  };
  auto drop = [](ir::Plan& q, int i) {
    auto& v = q.programs[0].instrs;
    v.erase(v.begin() + i);
    for (auto& in : v) {
      std::vector<int> a;
      for (int x : in.after)
        if (x != i) a.push_back(x > i ? x - 1 : x);
      in.after = a;
    }
  };
  const std::string dir = scratch("tp-refused");
  {  // missing: backward S0 m1's second all-reduce
    ir::Plan bad = p;
    const int i = index_of(bad, ir::Op::Backward, 1, true);
    REQUIRE(i > 0);
    drop(bad, i);
    ir::save_file_atomic(dir + "/plan.json", ir::to_json_string(bad));
    std::string out;
    CHECK(run(run_cmd(dir, 1), &out) == 2);
    CHECK_MESSAGE(out.find("no `allreduce partgrad(S0,m1) seg=1`") != std::string::npos, out);
  }
  {  // moved after the segment that reads it
    ir::Plan bad = p;
    const int i = index_of(bad, ir::Op::Backward, 1, true);
    ir::Instr moved = bad.programs[0].instrs[i];
    drop(bad, i);
    const int next = index_of(bad, ir::Op::Backward, 2, false);
    REQUIRE(next > 0);
    insert_instr(bad.programs[0], next + 1, moved);
    ir::save_file_atomic(dir + "/plan.json", ir::to_json_string(bad));
    std::string out;
    CHECK(run(run_cmd(dir, 1), &out) == 2);
    CHECK_MESSAGE(out.find("comes before the allreduce of the partial sum it reads") != std::string::npos, out);
  }
  io::remove_tree(dir);
}

TEST_CASE("tp with tied embeddings: the head's shard of the embedding, its gradient back to the same shard") {
  for (std::string off : {"all", "none"}) {
    const std::string label = "tied-pp2-dp1-tp2-offload-" + off;
    CAPTURE(label);
    check_against_reference(make_plan(2, 1, 1, off, "tiny-tied", 0.05, 4, 2), label);
  }
  check_against_reference(make_plan(1, 2, 2, "all", "tiny-gpt2-tied", 0, 4, 2), "tied-gpt2-pp1-dp2-tp2-v2-offload-all");
}

TEST_CASE("a checkpoint saved under one layout resumes under another: resharded and exact") {
  // dp 2 -> tp 2, tp 2 -> dp 2 x tp 2 and pp 2 x tp 2 -> pp 2 x dp 2 (the same stages); pp 2 -> tp 2 and dp 2 ->
  // pp 3 x tp 2 (other stages: gathered parameter by parameter from the saved ones)
  // GPT-2 too (its fp32 masters are the HF Conv1D tensors, transposed)
  struct Case { int pp_a, dp_a, tp_a, pp_b, dp_b, tp_b; const char* off; const char* model = "tiny-8l"; };
  for (Case c : {Case{1, 2, 1, 1, 1, 2, "all"}, Case{1, 1, 2, 1, 2, 2, "all"}, Case{2, 1, 2, 2, 2, 1, "none"},
                 Case{2, 1, 1, 1, 1, 2, "all"}, Case{1, 2, 1, 3, 1, 2, "none"}, Case{2, 1, 1, 1, 1, 2, "none", "tiny-gpt2"}}) {
    const std::string label = std::string("resume-") + c.model + "-" + std::to_string(c.pp_a) + std::to_string(c.dp_a) +
                              std::to_string(c.tp_a) + "-to-" + std::to_string(c.pp_b) + std::to_string(c.dp_b) + std::to_string(c.tp_b);
    CAPTURE(label);
    ir::Plan pa = make_plan(c.pp_a, c.dp_a, 1, c.off, c.model, 0.05, 4, c.tp_a);
    ir::Plan pb = make_plan(c.pp_b, c.dp_b, 1, c.off, c.model, 0.05, 4, c.tp_b);
    pa.train.eps = pb.train.eps = 1e-6;  // one optimizer on both sides (make_plan's eps for tp: see there)
    const bool same_stages = pa.num_stages() == pb.num_stages() &&
                             std::equal(pa.stages.begin(), pa.stages.end(), pb.stages.begin(),
                                        [](const ir::Stage& x, const ir::Stage& y) { return x.layer_end == y.layer_end; });
    CHECK(same_stages == (c.pp_a == c.pp_b));  // the cases cover both
    const std::string dir = scratch(label), a = dir + "/a", b = dir + "/b";
    io::make_dirs(a);
    io::make_dirs(b);
    ir::save_file_atomic(a + "/plan.json", ir::to_json_string(pa));
    ir::save_file_atomic(b + "/plan.json", ir::to_json_string(pb));
    REQUIRE(run(run_cmd(a, 2) + " --metrics " + dir + "/part.jsonl --save " + dir + "/part") == 0);
    // the checkpoint is HF's layout whatever the layout: the whole tensors
    CHECK(load_full(pb, dir + "/part").numel() == engine::full_layout(pb.model).numel);
    REQUIRE(run(run_cmd(b, 4) + " --resume " + dir + "/part --metrics " + dir + "/part.jsonl --save " + dir + "/resumed") == 0);
    auto full = test::reference_train(pb, kData, 4, 7);
    auto part = read_losses(dir + "/part.jsonl");
    REQUIRE(part.size() == 4);
    for (int i = 0; i < 4; ++i) CHECK(part[i] == doctest::Approx(full.losses[i]).epsilon(1e-5));
    CHECK(rel_diff(load_full(pb, dir + "/resumed"), full.weights) <= 1e-5);
    io::remove_tree(dir);
  }
}

TEST_CASE("an HF checkpoint loads into tp shards (each rank reads its slices) and trains as the plain loop") {
  // the seed-7 initial weights saved as an HF checkpoint by a tp 1 run, then loaded by tp 2 (GQA: kv heads split) and
  // by GPT-2 tp 2 (Conv1D c_attn split into q, k and v pieces): the same training as from the seed
  for (const char* model : {"tiny-8l", "tiny-gpt2"}) {
    CAPTURE(model);
    ir::Plan p1 = make_plan(1, 1, 1, "none", model, 0, 4, 1), p2 = make_plan(2, 1, 1, "all", model, 0, 4, 2);
    const std::string dir = scratch(std::string("hf-init-") + model);
    ir::save_file_atomic(dir + "/p1.json", ir::to_json_string(p1));
    ir::save_file_atomic(dir + "/plan.json", ir::to_json_string(p2));
    REQUIRE(run(kRun + " " + dir + "/p1.json --data " + kData + " --steps 0 --device cpu --seed 7 -q --save " + dir + "/init") == 0);
    // --seed 99: a random init would differ from the reference's seed 7; the loaded weights do not
    REQUIRE(run(kRun + " " + dir + "/plan.json --data " + kData + " --steps 3 --device cpu --seed 99 -q --optim-threads 1 --init " + dir +
                "/init --metrics " + dir + "/m.jsonl --save " + dir + "/ckpt") == 0);
    auto losses = read_losses(dir + "/m.jsonl");
    auto ref = test::reference_train(p2, kData, 3, 7);
    REQUIRE(losses.size() == 3);
    for (int i = 0; i < 3; ++i) CHECK(losses[i] == doctest::Approx(ref.losses[i]).epsilon(1e-5));
    CHECK(rel_diff(load_full(p2, dir + "/ckpt"), ref.weights) <= 1e-5);
    io::remove_tree(dir);
  }
}

TEST_CASE("bad layouts exit 2 with a message naming the reason") {
  const std::string base = kCompile + " --configs " + kConfigs + " --model tiny-8l --hardware cpu8 --micro-batch-size 2 --seq-len 32 -o " +
                           tmp_root() + "-bad.json";
  std::string out;
  CHECK(run(base + " --gpus 2 --dp 3 --microbatches 4", &out) == 2);
  CHECK(out.find("--dp 3 does not divide the batch") != std::string::npos);
  CHECK(run(base + " --gpus 4 --dp 3 --microbatches 6", &out) == 2);
  CHECK(out.find("12 ranks, but hardware 'cpu8' has 8 GPU(s)") != std::string::npos);
  CHECK(run(base + " --gpus 2 --dp 0 --microbatches 4", &out) == 2);
  CHECK(out.find("--dp must be >= 1") != std::string::npos);
  CHECK(run(base + " --gpus 2 --dp 2 --microbatches 4", &out) == 0);  // and a good one compiles
  // tensor parallelism: tp must divide the heads and the kv heads; the layout must fit the GPUs
  CHECK(run(base + " --gpus 2 --tp 3 --microbatches 4", &out) == 2);
  CHECK(out.find("tp 3 does not divide the attention heads (num_attention_heads 4)") != std::string::npos);
  CHECK(run(base + " --gpus 2 --tp 4 --microbatches 4", &out) == 2);
  CHECK(out.find("tp 4 does not divide the key/value heads (num_key_value_heads 2)") != std::string::npos);
  CHECK(run(base + " --gpus 2 --dp 2 --tp 4 --microbatches 4", &out) == 2);
  CHECK(out.find("pp x dp x tp = 2 x 2 x 4 = 16 ranks, but hardware 'cpu8' has 8 GPU(s)") != std::string::npos);
  CHECK(run(base + " --gpus 1 --dp 3 --tp 2 --microbatches 4", &out) == 2);
  CHECK(out.find("--dp 3 does not divide the batch") != std::string::npos);
  CHECK(run(base + " --gpus 2 --tp 2 --microbatches 4", &out) == 0);
  // mmoc-run refuses a plan whose layout the machine cannot hold only on CUDA; on the CPU it runs: checked above
}
