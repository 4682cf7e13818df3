// The verifiers on planted faults: verify_deadlock reports two GPUs that each receive first and a send moved
// behind a compute that depends on it (naming the stuck instructions); memory_events rejects a use of weights
// whose prefetch was removed; memory_bound grows when the dependency serialising two prefetches is removed.
#include "passes_common.hpp"

using namespace mmoc;
using namespace mmoc::test;
using ir::BufKind;
using ir::Instr;
using ir::Op;
using ir::Stream;

namespace {
Instr p2p(Op op, BufKind k, int s, int m, int peer, std::vector<int> after = {}) {
  Instr in = make_buf_op(op, Stream::P2P, {k, s, m});
  in.peer = peer;
  in.tag = std::string(k == BufKind::Act ? "F" : "B") + ".S" + std::to_string(s) + ".m" + std::to_string(m);
  in.after = std::move(after);
  return in;
}
Instr comp(Op op, int s, int m, std::vector<int> after = {}) {
  Instr in = make_compute(op, s, m);
  in.after = std::move(after);
  return in;
}
ir::Plan two_stage_plan() {
  ir::Plan p;
  p.gpus = 2;
  p.schedule = "gpipe";
  p.microbatches = 1;
  for (int s = 0; s < 2; ++s) {
    ir::Stage st;
    st.id = s; st.gpu = s; st.layer_begin = s; st.layer_end = s + 1;
    p.stages.push_back(st);
  }
  p.programs.resize(2);
  p.programs[0].gpu = 0;
  p.programs[1].gpu = 1;
  return p;
}
}  // namespace

TEST_CASE("verify_deadlock: two GPUs that each receive from the other first") {
  ir::Plan p = two_stage_plan();
  // g0 waits for grad(S0,m0) before sending act(S0,m0); g1 waits for act(S0,m0) before sending grad(S0,m0)
  p.programs[0].instrs = {comp(Op::Forward, 0, 0), p2p(Op::Recv, BufKind::Grad, 0, 0, 1),
                          p2p(Op::Send, BufKind::Act, 0, 0, 1, {0}), comp(Op::Backward, 0, 0, {1})};
  p.programs[1].instrs = {p2p(Op::Recv, BufKind::Act, 0, 0, 0), comp(Op::Forward, 1, 0, {0}), comp(Op::Backward, 1, 0),
                          p2p(Op::Send, BufKind::Grad, 0, 0, 0, {2})};
  CHECK(ir::verify_structure(p).empty());
  for (bool seq : {false, true}) {
    std::string r = verify_deadlock(p, seq);
    CAPTURE(r);
    CHECK(r.find("deadlock") != std::string::npos);
    CHECK(r.find("g0 " + ir::print_instr(p.programs[0].instrs[1], 1)) != std::string::npos);
    CHECK(r.find("g1 " + ir::print_instr(p.programs[1].instrs[0], 0)) != std::string::npos);
    CHECK(r.find("tag B.S0.m0") != std::string::npos);
  }
  // the simulator agrees
  HardwareSpec hw = hardware("h200x2");
  ModelSpec m = model("tiny-8l");
  SimResult sim = simulate(p, hw, m, SimOptions{0, true});
  CHECK(sim.deadlock);
  // the same programs with g0's send first run
  std::swap(p.programs[0].instrs[1], p.programs[0].instrs[2]);
  p.programs[0].instrs[3].after = {2};
  CHECK(ir::verify_structure(p).empty());
  CHECK(verify_deadlock(p, false) == "");
  CHECK(verify_deadlock(p, true) == "");
}

TEST_CASE("verify_deadlock: a send moved behind the compute that depends on its answer") {
  auto f = tiny(2, 1, 2, "1f1b");
  f->run_until("linearize");
  ir::Plan p = f->plan();
  REQUIRE(verify_deadlock(p, false) == "");
  auto& g0 = p.programs[0];
  int snd = find_op(g0, Op::Send, ir::BufRef{BufKind::Act, 0, 0});
  int bwd = find_compute(g0, Op::Backward, 0, 0);
  REQUIRE(snd >= 0);
  REQUIRE(bwd > snd);
  // g0 sends act(S0,m0) only after backward S0 m0, which needs grad(S0,m0), which g1 computes from that act
  move_to_end(g0, snd);
  g0.instrs.back().after.push_back(bwd - 1);  // backward moved up by one
  REQUIRE(g0.instrs[bwd - 1].op == Op::Backward);
  CHECK(ir::verify_structure(p).empty());
  for (bool seq : {false, true}) {
    std::string r = verify_deadlock(p, seq);
    CAPTURE(r);
    CHECK(r.find("deadlock") != std::string::npos);
    CHECK(r.find("instructions cannot run") != std::string::npos);
    // g1 is stuck on receiving act(S0,m0)
    int rcv = find_op(p.programs[1], Op::Recv, ir::BufRef{BufKind::Act, 0, 0});
    CHECK(r.find("g1 " + ir::print_instr(p.programs[1].instrs[rcv], rcv)) != std::string::npos);
  }
  SimResult sim = simulate(p, f->hw, f->m);
  CHECK(sim.deadlock);
  CHECK_FALSE(sim.deadlock_report.empty());
}

TEST_CASE("verify_deadlock: a recv with no partner is reported, not hung") {
  ir::Plan p = two_stage_plan();
  p.programs[1].instrs = {p2p(Op::Recv, BufKind::Act, 0, 0, 0)};
  std::string r = verify_deadlock(p, false);
  CHECK(r.find("g1 %0") != std::string::npos);
  CHECK_FALSE(ir::verify_structure(p).empty());
}

TEST_CASE("memory_events: a use of weights whose prefetch was removed throws, naming gpu and instruction") {
  JobConfig j = tiny_job(2, 2, 2, "grouped");
  j.offload = "all";
  auto f = fixture(j, 2, "grouped");
  f->run_until("linearize");
  ir::Plan p = f->plan();
  CHECK_NOTHROW(memory_events(p));
  auto& g1 = p.programs[1];
  int pf = find_op(g1, Op::Prefetch);
  REQUIRE(pf >= 0);
  ir::BufRef w = *g1.instrs[pf].buf;
  erase_instr(g1, pf);
  CHECK(ir::verify_structure(p).empty());
  CHECK_THROWS_WITH_AS(memory_events(p), doctest::Contains("g1 %"), ir::VerifyError);
  CHECK_THROWS_WITH_AS(memory_events(p), doctest::Contains(w.str().c_str()), ir::VerifyError);
  // and a second prefetch of a present weight
  ir::Plan q = f->plan();
  auto& q1 = q.programs[1];
  int pf2 = find_op(q1, Op::Prefetch);
  insert_instr(q1, pf2 + 1, q1.instrs[pf2]);
  CHECK_THROWS_WITH_AS(memory_events(q), doctest::Contains("already present"), ir::VerifyError);
  // an evict of an absent buffer
  ir::Plan e = f->plan();
  insert_instr(e.programs[0], 0, make_buf_op(Op::Evict, Stream::Comp, {BufKind::W, 0, -1}));
  CHECK_THROWS_WITH_AS(memory_events(e), doctest::Contains("freed but not present"), ir::VerifyError);
}

TEST_CASE("memory_bound: removing the dependency that serialises two prefetches raises the bound") {
  // 13B weights dominate: the bound moves with the number of weight sets that may be on the GPU at once (the 7B seed
  // job's plan has reached its worst point in the backward since 2026-12-02, where a second copy of w(S0) does not fall)
  JobConfig j = load_job(std::string(MMOC_CONFIGS_DIR) + "/jobs/seed-llama2-13b-l20x4.json");
  j.offload = "all";
  j.micro_batch_size = 1;
  auto f = fixture(j, 2, "grouped");
  f->run_until("offload-insertion");
  const ir::Plan base = f->plan();
  MemoryBound b0 = memory_bound(base);
  int tried = 0;
  for (int g = 0; g < base.gpus; ++g)
    for (int i = 0; i < (int)base.programs[g].instrs.size(); ++i) {
      const auto& in = base.programs[g].instrs[i];
      if (in.op != Op::Prefetch || in.after.empty()) continue;
      ++tried;
      ir::Plan p = base;
      p.programs[g].instrs[i].after.clear();
      MemoryBound b1 = memory_bound(p);
      CAPTURE(g); CAPTURE(i);
      CHECK(b1.bound[g] > b0.bound[g]);
      for (int h = 0; h < base.gpus; ++h) CHECK(b1.bound[h] >= b0.bound[h]);
    }
  CHECK(tried > 0);
  // memory_bound at least the persistent part and at least the simulated peak
  SimResult sim = simulate(base, f->hw, f->m);
  for (int g = 0; g < base.gpus; ++g) {
    CHECK(b0.bound[g] >= b0.persistent[g]);
    CHECK(b0.bound[g] >= sim.peak_bytes[g]);
  }
}

TEST_CASE("verify_deadlock: an instruction waiting for a later one on its own stream never runs") {
  auto f = tiny(1, 1, 1, "gpipe", "h200x1");
  f->run_until("linearize");
  ir::Plan p = f->plan();
  auto& g0 = p.programs[0].instrs;
  int first = -1, last = -1;
  for (int i = 0; i < (int)g0.size(); ++i)
    if (g0[i].stream == Stream::Comp) { if (first < 0) first = i; last = i; }
  REQUIRE(first >= 0);
  REQUIRE(last > first);
  g0[first].after.push_back(last);
  CHECK_FALSE(ir::verify_structure(p).empty());
  for (bool seq : {false, true}) {
    std::string r = verify_deadlock(p, seq);
    CHECK(r.find("g0 " + ir::print_instr(g0[first], first)) != std::string::npos);
    CHECK(r.find("waits for %" + std::to_string(last)) != std::string::npos);
  }
}
