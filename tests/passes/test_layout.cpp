// Layouts pp x dp x tp in the compiler: tensor-parallel plans (one shard's sizes and times, groups, the verifier),
// the cost of the tensor-parallel collectives, host memory per shard, and --layout auto.
#include <cmath>

#include "arch/layout.hpp"
#include "cost/host_memory.hpp"
#include "passes_common.hpp"

using namespace mmoc;
using namespace mmoc::test;

namespace {
JobConfig tp_job(int pp, int dp, int tp, const std::string& model = "tiny-8l", const std::string& hw = "cpu8") {
  JobConfig j = tiny_job(pp, 1, 4, "1f1b", hw);
  j.model = model;
  j.dp = dp;
  j.tp = tp;
  return j;
}
// The parameters of tp rank k's shard of stage [b, e) in the engine's layout (arch/layout.hpp).
int64_t engine_free_numel(const ModelSpec& m, int b, int e, int k, int tp) { return arch::stage_layout(m, b, e, k, tp).param_count; }
}  // namespace

TEST_CASE("layout: a tp plan's stages are one shard's (parameters, weight buffers) and its header and groups say so") {
  auto m = model("tiny-8l");  // heads 4, kv heads 2 (GQA), ffn 176
  auto hw = hardware("cpu8");
  for (int tp : {1, 2}) {
    CAPTURE(tp);
    CompileResult r = compile_job(tp_job(2, 1, tp), m, hw, {});
    const ir::Plan& p = r.plan;
    CHECK(p.tp == tp);
    CHECK(ir::world_size(p) == 2 * tp);
    for (const auto& s : p.stages) {
      // the engine's sharded layout of the stage, for every tp rank (the vocabulary padded: the same size on all)
      for (int k = 0; k < tp; ++k)
        CHECK(s.params == engine_free_numel(m, s.layer_begin, s.layer_end, k, tp));
      CHECK(p.buffer_bytes({ir::BufKind::W, s.id, -1}) == s.params * 2);  // bf16
    }
    CHECK(ir::parse_text(ir::print_text(p)) == p);
    CHECK(ir::from_json_string(ir::to_json_string(p)) == p);
    CHECK(ir::verify_structure(p).empty());
  }
  // tp 2 halves the decoder layers' parameters (q/k/v by heads and kv heads, o, gate/up, down; norms replicated)
  const ModelSpec m2 = with_tp(m, 2);
  CHECK(m2.layer_params(1) < m.layer_params(1));
  CHECK(m2.layer_params(1) > m.layer_params(1) / 2);
  CHECK(m2.layer_params(1) - m.layer_params(1) / 2 == m.hidden);  // two norms of `hidden`, replicated: hidden more than half
}

TEST_CASE("layout: tp groups and dp groups per shard; programs name them relative to the rank") {
  auto m = model("tiny-8l");
  auto hw = hardware("cpu8");
  const ir::Plan p = compile_job(tp_job(2, 2, 2), m, hw, {}).plan;
  REQUIRE(ir::world_size(p) == 8);
  // world rank = (replica * pp + pipe) * tp + shard: a tp group is two neighbouring ranks
  const auto g = ir::process_groups(p);
  CHECK(g.at("tp.g0.r0") == std::vector<int>{0, 1});
  CHECK(g.at("tp.g1.r1") == std::vector<int>{6, 7});
  CHECK(g.at("dp.g0.t0") == std::vector<int>{0, 4});
  CHECK(g.at("dp.g1.t1") == std::vector<int>{3, 7});
  CHECK(g.count("dp.g0") == 0);  // with tp > 1 a rank's dp group is its shard's
  CHECK(ir::rank_group(p, "dp.g1", 7) == "dp.g1.t1");
  CHECK(ir::rank_group(p, "tp.g1", 7) == "tp.g1.r1");
  CHECK(ir::rank_group(p, "world", 7) == "world");
  const auto pg = ir::program_groups(p);
  CHECK(pg.at("dp.g0") == std::vector<int>{0, 1, 4, 5});
  CHECK(pg.at("tp.g1") == std::vector<int>{2, 3, 6, 7});
  // the data-parallel pass's collectives name the program's group, every one verified
  int colls = 0;
  for (const auto& prog : p.programs)
    for (const auto& in : prog.instrs)
      if (in.op == ir::Op::AllReduce) {
        ++colls;
        CHECK(in.group == "dp.g" + std::to_string(prog.gpu));
      }
  CHECK(colls == p.num_stages());
  CHECK(ir::verify_structure(p).empty());
  // tp 1: the groups as before (dp.g<p>, no tp groups)
  const ir::Plan q = compile_job(tp_job(2, 2, 1), m, hw, {}).plan;
  CHECK(ir::process_groups(q).at("dp.g1") == std::vector<int>{1, 3});
  CHECK(ir::rank_group(q, "dp.g1", 3) == "dp.g1");
}

TEST_CASE("layout: the verifier refuses a tp that does not divide heads, kv heads or ffn") {
  auto m = model("tiny-8l");
  auto hw = hardware("cpu8");
  ir::Plan p = compile_job(tp_job(2, 1, 2), m, hw, {}).plan;
  p.tp = 4;  // kv heads 2
  auto problems = ir::verify_structure(p);
  REQUIRE(!problems.empty());
  CHECK(problems[0].find("tp=4 does not divide") != std::string::npos);
}

TEST_CASE("layout: bad layouts are refused naming the reason") {
  auto m = model("tiny-8l");
  auto hw = hardware("cpu8");
  std::string e = error_of([&] { compile_job(tp_job(2, 1, 3), m, hw, {}); });
  CHECK(e.find("tp 3 does not divide the attention heads (num_attention_heads 4)") != std::string::npos);
  e = error_of([&] { compile_job(tp_job(2, 1, 4), m, hw, {}); });
  CHECK(e.find("tp 4 does not divide the key/value heads (num_key_value_heads 2)") != std::string::npos);
  e = error_of([&] { compile_job(tp_job(4, 2, 2), m, hw, {}); });
  CHECK(e.find("layout pp x dp x tp = 4 x 2 x 2 = 16 ranks, but hardware 'cpu8' has 8 GPU(s)") != std::string::npos);
  e = error_of([&] { compile_job(tp_job(1, 3, 2), m, hw, {}); });
  CHECK(e.find("--dp 3 does not divide the batch") != std::string::npos);
  e = error_of([&] { compile_job(tp_job(1, 1, 0), m, hw, {}); });
  CHECK(e.find("--tp must be >= 1") != std::string::npos);
}

TEST_CASE("layout: a tensor-parallel rank's layer time is its share of the compute plus the collectives on the p2p link") {
  auto m = model("llama2-7b");
  auto hw = hardware("h200x4");
  const ModelSpec m2 = with_tp(m, 2);
  CostModel c1{m, hw}, c2{m2, hw};
  const int mbs = 8, seq = 1024;
  const int64_t hidden_bytes = (int64_t)mbs * seq * m.hidden * 2;
  // a ring all-reduce over 2 ranks moves half the buffer each way: allreduce_ms x (n-1)/n
  CHECK(c2.tp_allreduce_ms(hidden_bytes) == doctest::Approx(c1.allreduce_ms(hidden_bytes) / 2));
  CHECK(c1.tp_comm_ms(1, mbs, seq, true) == 0);
  CHECK(c2.tp_comm_ms(1, mbs, seq, true) == doctest::Approx(2 * c2.tp_allreduce_ms(hidden_bytes)));
  CHECK(c2.tp_comm_ms(1, mbs, seq, false) == doctest::Approx(2 * c2.tp_allreduce_ms(hidden_bytes)));
  CHECK(c2.tp_comm_ms(0, mbs, seq, true) == doctest::Approx(c2.tp_allreduce_ms(hidden_bytes)));
  CHECK(c2.tp_comm_ms(0, mbs, seq, false) == 0);
  CHECK(c2.tp_comm_ms(m.layers + 1, mbs, seq, false) == doctest::Approx(c2.tp_allreduce_ms(hidden_bytes)));
  // compute-bound at 8k tokens: half the FLOPs, plus the collectives
  CHECK(m2.layer_fwd_flops(1, mbs, seq) == doctest::Approx(m.layer_fwd_flops(1, mbs, seq) / 2));
  const double f1 = c1.layer_fwd_ms(1, mbs, seq), f2 = c2.layer_fwd_ms(1, mbs, seq);
  CHECK(f2 == doctest::Approx((f1 - hw.launch_overhead_ms) / 2 + hw.launch_overhead_ms + c2.tp_comm_ms(1, mbs, seq, true)).epsilon(0.02));
  // the head's logits, stash and workspace: the rank's vocabulary rows
  CHECK(m2.layer_fwd_workspace(m.layers + 1, mbs, seq, 2) == m.layer_fwd_workspace(m.layers + 1, mbs, seq, 2) / 2);
  CHECK(m2.layer_stash_bytes(1, mbs, seq, false, 2) < m.layer_stash_bytes(1, mbs, seq, false, 2));
  // the simulated plan carries it: a tp 2 stage's forward is the sum of its layers' (with collectives)
  JobConfig j = tp_job(1, 1, 2, "llama2-7b", "h200x4");
  j.micro_batch_size = mbs;
  j.seq_len = seq;
  j.budget_gib = 140;
  j.offload = "all";
  const ir::Plan p = compile_job(j, m, hw, {}).plan;
  double want = 0;
  for (int l = p.stages[0].layer_begin; l < p.stages[0].layer_end; ++l) want += c2.layer_fwd_ms(l, mbs, seq);
  CHECK(p.stages[0].fwd_ms == doctest::Approx(want));
}

TEST_CASE("layout: each tensor-parallel shard holds 1/tp of an offloaded stage's host state") {
  auto m = model("llama2-7b");
  auto hw = hardware("h200x4");
  JobConfig j = tp_job(1, 1, 1, "llama2-7b", "h200x4");
  j.micro_batch_size = 8;
  j.microbatches = 4;
  j.seq_len = 1024;
  j.budget_gib = 48;
  j.offload = "all";
  j.v = "auto";
  j.schedule = "auto";
  const ir::Plan p1 = compile_job(j, m, hw, {}).plan;
  j.tp = 2;
  const ir::Plan p2 = compile_job(j, m, hw, {}).plan;
  const auto o = host_memory_options(hw);
  const auto h1 = predict_host_memory(p1, o)[0], h2 = predict_host_memory(p2, o)[0];
  int64_t n1 = 0, n2 = 0;
  for (const auto& s : p1.stages) n1 += s.params;
  for (const auto& s : p2.stages) n2 += s.params;
  CHECK(n2 == engine_free_numel(m, 0, m.layers + 2, 1, 2));
  CHECK(h2.master == 4 * n2);
  CHECK(h2.moments == 8 * n2);
  CHECK(double(n2) / n1 == doctest::Approx(0.5).epsilon(0.01));
  CHECK(p2.host_bytes[0] < p1.host_bytes[0]);
  // every world rank counts on the node
  CHECK(check_host_memory(predict_host_memory(p2, o), hw, &p2).needed == 2 * h2.total());
}

TEST_CASE("layout auto: the fastest simulated pp x dp x tp over the GPUs; bad uses refused") {
  auto m = model("tiny-8l");
  auto hw = hardware("cpu8");
  JobConfig j = tp_job(8, 1, 1);
  j.v = "auto";
  j.schedule = "auto";
  j.microbatches = 8;
  j.layout = "auto";
  CompileResult best = compile_job(j, m, hw, {});
  const ir::Plan& b = best.plan;
  CHECK(ir::world_size(b) == 8);
  CHECK(best.candidates > 6);
  // every layout the model and batch allow, compiled on its own, is no faster
  int layouts = 0;
  bool found = false;
  for (auto [pp, dp, tp] : {std::tuple{8, 1, 1}, {4, 2, 1}, {2, 4, 1}, {1, 8, 1}, {4, 1, 2}, {2, 2, 2}, {1, 4, 2}}) {
    JobConfig c = j;
    c.layout.clear();
    c.gpus = pp;
    c.dp = dp;
    c.tp = tp;
    CompileResult r = compile_job(c, m, hw, {});
    ++layouts;
    CHECK(best.sim.step_ms <= r.sim.step_ms);
    found = found || (pp == b.gpus && dp == b.dp && tp == b.tp && r.sim.step_ms == best.sim.step_ms);
  }
  CHECK(layouts == 7);
  CHECK(found);
  // the job JSON says it too
  JobConfig from_json = parse_job(R"({"model": "tiny-8l", "hardware": "cpu8", "gpus": 8, "layout": "auto", "tp": 1})", "job.json");
  CHECK(from_json.layout == "auto");
  CHECK(error_of([] { parse_job(R"({"model": "tiny-8l", "layout": "2x2"})", "job.json"); }).find("layout") != std::string::npos);
  // --layout auto chooses dp and tp: giving them is an error; no feasible layout names the reasons
  JobConfig both = j;
  both.tp = 2;
  CHECK(error_of([&] { compile_job(both, m, hw, {}); }).find("--layout auto chooses dp and tp itself") != std::string::npos);
  JobConfig tight = j;
  tight.budget_gib = 0.0001;
  const std::string e = error_of([&] { compile_job(tight, m, hw, {}); });
  CHECK(e.find("--layout auto: no feasible layout of 8 GPU(s)") != std::string::npos);
  CHECK(e.find("pp 2 x dp 2 x tp 2") != std::string::npos);
}

TEST_CASE("layout: gradient buckets on 7B dp=2 plans: several per stage, the simulated step not slower, the summary says so") {
  auto m = model("llama2-7b");
  for (auto [hwname, pp] : {std::pair<std::string, int>{"h200x2", 1}, std::pair<std::string, int>{"l20x4", 2}}) {
    CAPTURE(hwname);
    auto hw = hardware(hwname);
    JobConfig j;
    j.model = "llama2-7b";
    j.hardware = hwname;
    j.gpus = pp;
    j.dp = 2;
    j.v = "1";
    j.schedule = "1f1b";
    j.offload = "all";
    j.micro_batch_size = 1;
    j.microbatches = 8;
    j.seq_len = 1024;
    j.bucket_mib = 0;  // one bucket per stage
    const CompileResult whole = compile_job(j, m, hw, {});
    j.bucket_mib = 25;  // the default
    const CompileResult bucketed = compile_job(j, m, hw, {});
    int buckets = 0;
    for (const auto& in : bucketed.plan.programs[0].instrs)
      if (in.op == ir::Op::ReduceScatter) buckets = std::max(buckets, in.buckets);
    CHECK(buckets >= 3);
    REQUIRE(whole.plan.predicted);
    REQUIRE(bucketed.plan.predicted);
    const double t0 = whole.plan.predicted->step_s, t1 = bucketed.plan.predicted->step_s;
    MESSAGE(hwname << " pp" << pp << " dp2 7B offload all: step " << t0 << " s in one bucket per stage, " << t1
                   << " s in buckets of 25 MiB (at most " << buckets << " per stage)");
    CHECK(t1 <= t0 * (1 + 1e-9));
    const std::string s = summary(bucketed, m, hw);
    CHECK(s.find("gradient reduction: ") != std::string::npos);
    CHECK(s.find(std::to_string(bucketed.plan.num_stages()) + " of " + std::to_string(bucketed.plan.num_stages()) + " stage(s) in buckets") != std::string::npos);
    CHECK(summary(whole, m, hw).find("0 of ") != std::string::npos);
  }
}
