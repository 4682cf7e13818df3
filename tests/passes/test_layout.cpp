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
  // the data-parallel pass's collectives name the program's dp group, tp-lowering's its tp group (one all-reduce per
  // tp collective of every forward and backward), every one verified
  int colls = 0, tp_colls = 0, tp_expected = 0;
  for (const auto& prog : p.programs)
    for (const auto& in : prog.instrs)
      if (in.op == ir::Op::AllReduce && in.seg < 0) {
        ++colls;
        CHECK(in.group == "dp.g" + std::to_string(prog.gpu));
      } else if (in.op == ir::Op::AllReduce) {
        ++tp_colls;
        CHECK(in.group == "tp.g" + std::to_string(prog.gpu));
      }
  for (int s = 0; s < p.num_stages(); ++s)
    tp_expected += p.microbatches * (ir::tp_collectives(p, s, ir::Op::Forward) + ir::tp_collectives(p, s, ir::Op::Backward));
  CHECK(colls == p.num_stages());
  CHECK(tp_expected > 0);
  CHECK(tp_colls == tp_expected);
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

TEST_CASE("layout: a tensor-parallel rank's layer time is its share of the compute plus the collectives left inside it") {
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
  // inside forward/backward only the small ones stay (the loss's, Qwen3's q/k-norm gradients): the hidden-state
  // all-reduces are instructions (tp-lowering) the simulator times
  CHECK(c2.tp_inline_comm_ms(1, mbs, seq, true) == 0);
  CHECK(c2.tp_inline_comm_ms(0, mbs, seq, true) == 0);
  CHECK(c2.tp_inline_comm_ms(m.layers + 1, mbs, seq, false) == 0);
  CHECK(c2.tp_inline_comm_ms(m.layers + 1, mbs, seq, true) > 0);
  CHECK(c2.tp_inline_comm_ms(m.layers + 1, mbs, seq, true) == doctest::Approx(c2.tp_comm_ms(m.layers + 1, mbs, seq, true)));
  // compute-bound at 8k tokens: half the FLOPs (the decoder layer's collectives are outside its time)
  CHECK(m2.layer_fwd_flops(1, mbs, seq) == doctest::Approx(m.layer_fwd_flops(1, mbs, seq) / 2));
  const double f1 = c1.layer_fwd_ms(1, mbs, seq), f2 = c2.layer_fwd_ms(1, mbs, seq);
  // half the matmuls and attention, plus what every rank repeats on the whole hidden state (norms, residual adds) and
  // the row-parallel GEMMs' shorter inner dimension (cost/cost.cpp): a little above half
  CHECK(f2 > (f1 - hw.launch_overhead_ms) / 2 + hw.launch_overhead_ms);
  CHECK(f2 < 0.6 * f1);
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

// ---- tp-lowering: the tensor-parallel collectives as instructions ------------------------------------------------
namespace {
// Index of the first instruction of program g matching `pred`, or -1.
template <class P> int find_instr(const ir::Plan& p, int g, P pred) {
  const auto& v = p.programs[g].instrs;
  for (int i = 0; i < (int)v.size(); ++i)
    if (pred(v[i])) return i;
  return -1;
}
bool mentions(const std::vector<std::string>& problems, const std::string& what) {
  for (const auto& s : problems)
    if (s.find(what) != std::string::npos) return true;
  return false;
}
}  // namespace

TEST_CASE("tp-lowering: every forward and backward of a tp stage in segments, an all-reduce of the tp group between them") {
  auto m = model("tiny-8l");
  auto hw = hardware("cpu8");
  for (int pp : {1, 2}) {
    CAPTURE(pp);
    const ir::Plan p = compile_job(tp_job(pp, 1, 2), m, hw, {}).plan;
    REQUIRE(ir::verify_structure(p).empty());
    for (const auto& st : p.stages) {
      // forward: the embedding's g and two per decoder layer; backward: two f's per decoder layer and the head's
      // (and a recomputing stage's backward replays the forward's of its recomputed layers)
      const int rc_end = st.layer_begin + st.recompute_layers();
      int dec = 0, dec_rc = 0;
      for (int l = st.layer_begin; l < st.layer_end; ++l) {
        dec += l >= 1 && l <= m.layers;
        dec_rc += l >= 1 && l <= m.layers && l < rc_end;
      }
      const int emb = st.layer_begin == 0, head = st.layer_end == m.layers + 2, emb_rc = emb && rc_end > 0;
      CHECK(ir::tp_collectives(p, st.id, ir::Op::Forward) == emb + 2 * dec);
      CHECK(ir::tp_collectives(p, st.id, ir::Op::Backward) == 2 * dec + head + emb_rc + 2 * dec_rc);
      CHECK(p.buffer_bytes({ir::BufKind::Part, st.id, 0}) == (int64_t)p.micro_batch_size * p.seq_len * m.hidden * 2);
    }
    const int g = p.stages[0].gpu;
    for (int mb = 0; mb < p.microbatches; ++mb)
      for (ir::Op op : {ir::Op::Forward, ir::Op::Backward}) {
        const int n = ir::tp_collectives(p, 0, op);
        REQUIRE(n > 0);
        std::vector<int> seg_at, coll_at;
        for (int i = 0; i < (int)p.programs[g].instrs.size(); ++i) {
          const auto& in = p.programs[g].instrs[i];
          if (in.op == op && in.stage == 0 && in.mb == mb) {
            CHECK(in.seg == (int)seg_at.size());
            seg_at.push_back(i);
          }
          if (in.op == ir::Op::AllReduce && in.buf &&
              *in.buf == ir::BufRef{op == ir::Op::Forward ? ir::BufKind::Part : ir::BufKind::PartGrad, 0, mb}) {
            CHECK(in.seg == (int)coll_at.size());
            CHECK(in.group == "tp.g" + std::to_string(g));
            CHECK(in.stream == ir::Stream::Comp);
            coll_at.push_back(i);
          }
        }
        REQUIRE((int)seg_at.size() == n + 1);
        REQUIRE((int)coll_at.size() == n);
        for (int k = 0; k < n; ++k) CHECK((seg_at[k] < coll_at[k] && coll_at[k] < seg_at[k + 1]));
      }
    // both forms round-trip; tp-lowering's inverse gives whole instructions, and lowering them again the same plan
    CHECK(ir::parse_text(ir::print_text(p)) == p);
    CHECK(ir::from_json_string(ir::to_json_string(p)) == p);
    ir::Plan whole = p;
    unlower_tp(whole);
    CHECK(find_instr(whole, g, [](const ir::Instr& in) { return in.seg >= 0; }) < 0);
    CHECK(ir::verify_structure(whole).empty());
    ir::Plan again = whole;
    lower_tp(again);
    for (int r = 0; r < p.gpus; ++r) {
      // the same instructions (linearize may have put a segment's collective after other streams' work: compare
      // each stream's sequence)
      for (int s = 0; s < ir::kNumStreams; ++s) {
        std::vector<std::string> a, b;
        for (const auto& in : p.programs[r].instrs) if ((int)in.stream == s) a.push_back(ir::print_op(in));
        for (const auto& in : again.programs[r].instrs) if ((int)in.stream == s) b.push_back(ir::print_op(in));
        CHECK(a == b);
      }
    }
  }
  // tp 1: nothing to lower
  const ir::Plan q = compile_job(tp_job(2, 1, 1), m, hw, {}).plan;
  for (const auto& prog : q.programs)
    for (const auto& in : prog.instrs) CHECK(in.seg == -1);
}

TEST_CASE("tp-lowering: the verifier refuses a missing, misplaced or foreign tp collective") {
  auto m = model("tiny-8l");
  auto hw = hardware("cpu8");
  const ir::Plan p = compile_job(tp_job(2, 1, 2), m, hw, {}).plan;
  REQUIRE(ir::verify_structure(p).empty());
  const int g = p.stages[0].gpu;
  const ir::BufRef part{ir::BufKind::Part, 0, 1};
  const int ar = find_instr(p, g, [&](const ir::Instr& in) { return in.op == ir::Op::AllReduce && in.buf == part && in.seg == 1; });
  REQUIRE(ar > 0);
  {  // missing
    ir::Plan bad = p;
    erase_instr(bad.programs[g], ar);
    const auto v = ir::verify_structure(bad);
    CHECK(mentions(v, "no `allreduce part(S0,m1) seg=1`"));
  }
  {  // after the segment that reads it
    ir::Plan bad = p;
    const int next = find_instr(bad, g, [](const ir::Instr& in) { return in.op == ir::Op::Forward && in.stage == 0 && in.mb == 1 && in.seg == 2; });
    REQUIRE(next > ar);
    ir::Instr moved = bad.programs[g].instrs[ar];
    erase_instr(bad.programs[g], ar);
    insert_instr(bad.programs[g], next, moved);  // now right after segment 2
    CHECK(mentions(ir::verify_structure(bad), "comes before the allreduce of the partial sum it reads"));
  }
  {  // two collectives swapped (seg=1 before seg=0's place)
    ir::Plan bad = p;
    const int ar0 = find_instr(bad, g, [&](const ir::Instr& in) { return in.op == ir::Op::AllReduce && in.buf == part && in.seg == 0; });
    bad.programs[g].instrs[ar0].seg = 1;
    bad.programs[g].instrs[ar].seg = 0;
    CHECK(!ir::verify_structure(bad).empty());
  }
  {  // another program's tp group
    ir::Plan bad = p;
    bad.programs[g].instrs[ar].group = "tp.g" + std::to_string(1 - g);
    CHECK(mentions(ir::verify_structure(bad), "is summed over group 'tp.g" + std::to_string(1 - g) + "'"));
  }
  {  // on another stream than its segments
    ir::Plan bad = p;
    bad.programs[g].instrs[ar].stream = ir::Stream::P2P;
    CHECK(mentions(ir::verify_structure(bad), "not @comp"));
  }
  {  // a segment missing, and seg= where it means nothing
    ir::Plan bad = p;
    const int s1 = find_instr(bad, g, [](const ir::Instr& in) { return in.op == ir::Op::Forward && in.stage == 0 && in.mb == 1 && in.seg == 1; });
    erase_instr(bad.programs[g], s1);
    CHECK(mentions(ir::verify_structure(bad), "forward S0 m1: no segment seg=1"));
    ir::Plan bad2 = p;
    const int ld = find_instr(bad2, g, [](const ir::Instr& in) { return in.op == ir::Op::LoadBatch; });
    bad2.programs[g].instrs[ld].seg = 0;
    CHECK(mentions(ir::verify_structure(bad2), "seg= only marks"));
  }
  {  // another computation between the segments of one (the engine parks one at a time)
    ir::Plan bad = p;
    const int s1 = find_instr(bad, g, [](const ir::Instr& in) { return in.op == ir::Op::Forward && in.stage == 0 && in.mb == 1 && in.seg == 1; });
    const int other = find_instr(bad, g, [](const ir::Instr& in) { return in.op == ir::Op::Forward && in.stage == 0 && in.mb == 2 && in.seg == 0; });
    REQUIRE(other > s1);
    ir::Instr moved = bad.programs[g].instrs[other];
    moved.after.clear();
    erase_instr(bad.programs[g], other);
    insert_instr(bad.programs[g], s1, moved);
    CHECK(mentions(ir::verify_structure(bad), "runs between the segments of forward S0 m1"));
  }
  {  // memory: the partial sum is workspace of each segment and all-reduce, and of a whole forward
    const int s0 = find_instr(p, g, [](const ir::Instr& in) { return in.op == ir::Op::Forward && in.stage == 0 && in.mb == 1 && in.seg == 0; });
    CHECK(ir::effects(p, p.programs[g].instrs[ar]).transient == p.buffer_bytes(part));
    CHECK(ir::effects(p, p.programs[g].instrs[ar]).list.empty());
    CHECK(ir::effects(p, p.programs[g].instrs[s0]).transient == p.stages[0].fwd_ws + p.buffer_bytes(part));
    ir::Plan whole = p;
    unlower_tp(whole);
    const int w = find_instr(whole, g, [](const ir::Instr& in) { return in.op == ir::Op::Forward && in.stage == 0 && in.mb == 1; });
    CHECK(ir::effects(whole, whole.programs[g].instrs[w]).transient == ir::effects(p, p.programs[g].instrs[s0]).transient);
    // the lowered plan's bound is within the whole plan's (what offload-insertion checked the budget with)
    for (int r = 0; r < p.gpus; ++r) CHECK(memory_bound(p).bound[r] <= memory_bound(whole).bound[r]);
  }
}

TEST_CASE("tp-lowering: the simulator times each tp all-reduce on the link: the step grows with its bytes, falls with bandwidth") {
  auto m = model("llama2-7b");
  auto hw = hardware("h200x4");
  JobConfig j = tp_job(2, 1, 2, "llama2-7b", "h200x4");
  j.micro_batch_size = 2;
  j.seq_len = 1024;
  j.budget_gib = 60;
  const ir::Plan p = compile_job(j, m, hw, {}).plan;
  REQUIRE(p.tp == 2);
  const ModelSpec m2 = with_tp(m, 2);
  const double base = simulate(p, hw, m2).step_ms;
  // the collectives' time is outside the stages' fwd_ms/bwd_ms now: without them (whole instructions, the same
  // stage times) the step is shorter
  ir::Plan whole = p;
  unlower_tp(whole);
  CHECK(simulate(whole, hw, m2).step_ms < base);
  // a slower link: every tp all-reduce takes longer
  HardwareSpec slow = hw;
  slow.p2p_gbps = hw.p2p_gbps / 4;
  CHECK(simulate(p, slow, m2).step_ms > base);
  HardwareSpec fast = hw;
  fast.p2p_gbps = hw.p2p_gbps * 4;
  CHECK(simulate(p, fast, m2).step_ms < base);
  // larger partial sums (the buffer table's bytes): longer all-reduces, a longer step
  ir::Plan big = p;
  for (auto& d : big.buffers)
    if (d.kind == ir::BufKind::Part || d.kind == ir::BufKind::PartGrad) d.bytes *= 8;
  CHECK(simulate(big, hw, m2).step_ms > base);
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
