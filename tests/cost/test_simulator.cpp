// Simulator on small hand-built plans: rendezvous timing, host-link contention, deadlock reports, memory, trace.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>
#include <set>

#include "cost/simulator.hpp"

using namespace mmoc;
using ir::BufKind;
using ir::BufRef;
using ir::Instr;
using ir::Op;
using ir::Stream;

namespace {
ModelSpec tiny() {
  ModelSpec m;
  m.name = "t";
  m.layers = 2;
  m.hidden = 64;
  m.ffn = 128;
  m.heads = 4;
  m.kv_heads = 2;
  m.vocab = 100;
  return m;
}
HardwareSpec hw2(std::vector<std::vector<int>> groups) {
  HardwareSpec hw;
  hw.name = "test";
  hw.gpus = 2;
  hw.h2d_gbps = hw.d2h_gbps = 25;
  hw.duplex_gbps = 40;
  hw.group_link_gbps = 25;
  hw.p2p_gbps = 20;
  hw.host_groups = std::move(groups);
  hw.cpu_cores = 16;
  hw.host_mem_gbps = 80;
  return hw;
}
ir::Stage stage(int id, int gpu, int lb, int le, double fwd = 0, double bwd = 0) {
  ir::Stage s;
  s.id = id;
  s.gpu = gpu;
  s.layer_begin = lb;
  s.layer_end = le;
  s.fwd_ms = fwd;
  s.bwd_ms = bwd;
  return s;
}
ir::BufferDecl decl(BufKind k, int s, int64_t bytes, ir::Tier home) { return ir::BufferDecl{k, s, bytes, home}; }
Instr I(Op op, Stream st, std::vector<int> after = {}) {
  Instr in;
  in.op = op;
  in.stream = st;
  in.after = std::move(after);
  return in;
}
Instr fwd(int s, int mb, std::vector<int> after = {}) {
  Instr in = I(Op::Forward, Stream::Comp, after);
  in.stage = s;
  in.mb = mb;
  return in;
}
Instr bwd(int s, int mb, std::vector<int> after = {}) {
  Instr in = I(Op::Backward, Stream::Comp, after);
  in.stage = s;
  in.mb = mb;
  return in;
}
Instr buf_op(Op op, Stream st, BufRef b, std::vector<int> after = {}) {
  Instr in = I(op, st, after);
  in.buf = b;
  return in;
}
Instr sendrecv(Op op, BufRef b, int peer, std::string tag, std::vector<int> after = {}) {
  Instr in = buf_op(op, Stream::P2P, b, after);
  in.peer = peer;
  in.tag = std::move(tag);
  return in;
}
ir::Plan base_plan(int gpus) {
  ir::Plan p;
  p.hardware = "test";
  p.schedule = "gpipe";
  p.gpus = gpus;
  p.microbatches = 1;
  p.micro_batch_size = 2;
  p.seq_len = 16;
  p.model = tiny().arch();
  for (int g = 0; g < gpus; ++g) {
    p.programs.push_back(ir::Program{g, {}});
    p.gpu_order.push_back(g);
  }
  return p;
}
const SimInterval& interval(const SimResult& r, int gpu, int instr) {
  for (auto& iv : r.intervals)
    if (iv.gpu == gpu && iv.instr == instr) return iv;
  FAIL("no interval for g" << gpu << " %" << instr);
  return r.intervals.front();
}
}  // namespace

TEST_CASE("send/recv rendezvous timing") {
  auto p = base_plan(2);
  p.stages = {stage(0, 0, 0, 2, 5.0), stage(1, 1, 2, 4, 3.0)};
  p.buffers = {decl(BufKind::Act, 0, 1000000000, ir::Tier::Gpu)};  // 1 GB at 20 GB/s = 50 ms
  BufRef a{BufKind::Act, 0, 0};
  p.programs[0].instrs = {fwd(0, 0), sendrecv(Op::Send, a, 1, "F.S0.m0", {0})};
  p.programs[1].instrs = {sendrecv(Op::Recv, a, 0, "F.S0.m0"), fwd(1, 0, {0})};
  auto hw = hw2({{0}, {1}});
  auto m = tiny();
  auto r = simulate(p, hw, m);
  REQUIRE_FALSE(r.deadlock);
  double xfer = CostModel{m, hw}.p2p_ms(1000000000);
  CHECK(xfer == doctest::Approx(50.02));
  CHECK(interval(r, 1, 0).start_ms == doctest::Approx(5.0));  // recv waits for the send, which waits for forward
  CHECK(interval(r, 0, 1).start_ms == doctest::Approx(5.0));
  CHECK(interval(r, 1, 0).end_ms == doctest::Approx(5.0 + xfer));
  CHECK(interval(r, 0, 1).end_ms == doctest::Approx(5.0 + xfer));
  CHECK(interval(r, 1, 1).start_ms == doctest::Approx(5.0 + xfer));
  CHECK(r.step_ms == doctest::Approx(8.0 + xfer));
  CHECK(r.tokens_per_s == doctest::Approx(32.0 / (r.step_ms / 1e3)));
  CHECK(r.compute_busy[0] == doctest::Approx(5.0 / r.step_ms));
  // the receiver's memory holds the activation from the recv's start
  CHECK(r.peak_bytes[1] == 1000000000);
}

TEST_CASE("host-group contention: two GPUs on one host link take twice as long") {
  auto make = [] {
    auto p = base_plan(2);
    p.stages = {stage(0, 0, 0, 2), stage(1, 1, 2, 4)};
    p.buffers = {decl(BufKind::W, 0, 2500000000, ir::Tier::Host), decl(BufKind::W, 1, 2500000000, ir::Tier::Host)};
    p.programs[0].instrs = {buf_op(Op::Prefetch, Stream::H2D, BufRef{BufKind::W, 0, -1})};
    p.programs[1].instrs = {buf_op(Op::Prefetch, Stream::H2D, BufRef{BufKind::W, 1, -1})};
    return p;
  };
  auto m = tiny();
  auto p = make();
  auto shared = simulate(p, hw2({{0, 1}}), m);
  auto separate = simulate(p, hw2({{0}, {1}}), m);
  REQUIRE_FALSE(shared.deadlock);
  REQUIRE_FALSE(separate.deadlock);
  CHECK(separate.step_ms == doctest::Approx(100.0).epsilon(0.01));  // 2.5 GB at 25 GB/s
  CHECK(shared.step_ms == doctest::Approx(200.0).epsilon(0.01));
  CHECK(shared.step_ms / separate.step_ms == doctest::Approx(2.0).epsilon(0.01));
  CHECK(separate.h2d_util[0] == doctest::Approx(1.0).epsilon(0.01));
  CHECK(shared.h2d_util[0] == doctest::Approx(0.5).epsilon(0.01));
  // cross mapping: ranks 0,1 on physical GPUs of different groups
  p.gpu_order = {0, 2};
  auto hw4 = hw2({{0, 1}, {2, 3}});
  hw4.gpus = 4;
  CHECK(simulate(p, hw4, m).step_ms == doctest::Approx(100.0).epsilon(0.01));

  // staggered: the second transfer starts halfway; rates are recomputed at starts and ends
  auto q = make();
  q.stages[1].fwd_ms = 50;
  q.programs[1].instrs = {fwd(1, 0), buf_op(Op::Prefetch, Stream::H2D, BufRef{BufKind::W, 1, -1}, {0})};
  auto st = simulate(q, hw2({{0, 1}}), m);
  // g0 alone 0..50 ms (1.25 GB), shares 12.5 GB/s until it finishes at 150 ms; g1 then alone: 1.25 GB left -> 200 ms
  CHECK(interval(st, 0, 0).end_ms == doctest::Approx(150.0).epsilon(0.001));
  CHECK(interval(st, 1, 1).end_ms == doctest::Approx(200.0).epsilon(0.001));
}

TEST_CASE("duplex cap: H2D and D2H at once on one GPU") {
  auto p = base_plan(1);
  p.stages = {stage(0, 0, 0, 4)};
  p.buffers = {decl(BufKind::W, 0, 2000000000, ir::Tier::Host), decl(BufKind::WGrad, 0, 2000000000, ir::Tier::Host)};
  Instr ev = buf_op(Op::Evict, Stream::D2H, BufRef{BufKind::WGrad, 0, -1});
  ev.to_host = true;
  p.programs[0].instrs = {buf_op(Op::Prefetch, Stream::H2D, BufRef{BufKind::W, 0, -1}), ev};
  auto hw = hw2({{0}});
  hw.gpus = 1;
  auto r = simulate(p, hw, tiny());
  CHECK(r.step_ms == doctest::Approx(100.0).epsilon(0.01));  // 2 GB each at 20 GB/s (duplex 40 shared)
}

TEST_CASE("CPU optimizers share host memory bandwidth") {
  auto p = base_plan(2);
  p.stages = {stage(0, 0, 0, 2), stage(1, 1, 2, 4)};
  p.stages[0].params = p.stages[1].params = 100000000;  // 100M params * 28 B = 2.8 GB
  Instr o0 = I(Op::Optim, Stream::Cpu);
  o0.stage = 0;
  Instr o1 = I(Op::Optim, Stream::Cpu);
  o1.stage = 1;
  p.programs[0].instrs = {o0};
  auto hw = hw2({{0}, {1}});  // 16 cores, 2 GPUs -> 8 threads each = saturating (cores/2): cap 80 GB/s each
  auto m = tiny();
  auto alone = simulate(p, hw, m);
  CHECK(alone.step_ms == doctest::Approx(CostModel{m, hw}.adam_ms(100000000, 8)));
  CHECK(alone.step_ms == doctest::Approx(35.0));
  p.programs[1].instrs = {o1};
  auto both = simulate(p, hw, m);
  CHECK(both.step_ms == doctest::Approx(70.0));
  // two optimizers on one cpu stream run in order
  auto q = base_plan(1);
  q.stages = {stage(0, 0, 0, 2), stage(1, 0, 2, 4)};
  q.stages[0].params = q.stages[1].params = 100000000;
  q.programs[0].instrs = {o0, o1};
  auto seq = simulate(q, hw, m, SimOptions{8, false});
  CHECK(interval(seq, 0, 1).start_ms == doctest::Approx(35.0));
}

TEST_CASE("deadlocks are reported, not hung") {
  auto m = tiny();
  auto hw = hw2({{0}, {1}});
  SUBCASE("recv without a send") {
    auto p = base_plan(2);
    p.stages = {stage(0, 0, 0, 2, 1), stage(1, 1, 2, 4, 1)};
    p.programs[0].instrs = {fwd(0, 0)};
    p.programs[1].instrs = {sendrecv(Op::Recv, BufRef{BufKind::Act, 0, 0}, 0, "F.S0.m0"), fwd(1, 0, {0})};
    auto r = simulate(p, hw, m);
    CHECK(r.deadlock);
    CHECK(r.tokens_per_s == 0);
    CHECK(r.deadlock_report.find("no matching send on g0 with tag F.S0.m0") != std::string::npos);
    CHECK(r.deadlock_report.find("recv act(S0,m0) <- g0") != std::string::npos);
    CHECK(r.deadlock_report.find("forward S1 m0") != std::string::npos);  // blocked on its dependency
    MESSAGE(r.deadlock_report);
  }
  SUBCASE("both GPUs receive first") {
    auto p = base_plan(2);
    p.stages = {stage(0, 0, 0, 2, 1), stage(1, 1, 2, 4, 1)};
    BufRef a{BufKind::Act, 0, 0}, g{BufKind::Grad, 0, 0};
    p.programs[0].instrs = {sendrecv(Op::Recv, g, 1, "B.S1.m0"), sendrecv(Op::Send, a, 1, "F.S0.m0")};
    p.programs[1].instrs = {sendrecv(Op::Recv, a, 0, "F.S0.m0"), sendrecv(Op::Send, g, 0, "B.S1.m0")};
    auto r = simulate(p, hw, m);
    CHECK(r.deadlock);
    CHECK(r.deadlock_report.find("g0 @p2p") != std::string::npos);
    CHECK(r.deadlock_report.find("g1 @p2p") != std::string::npos);
    CHECK(r.deadlock_report.find("not reached") != std::string::npos);
    auto u = simulate(p, hw, m, SimOptions{0, true});
    CHECK(u.deadlock);
    MESSAGE(r.deadlock_report);
  }
  SUBCASE("dependency on a later instruction") {
    auto p = base_plan(1);
    p.stages = {stage(0, 0, 0, 4, 1)};
    p.programs[0].instrs = {buf_op(Op::Prefetch, Stream::H2D, BufRef{BufKind::W, 0, -1}, {1}), fwd(0, 0, {0})};
    auto r = simulate(p, hw, m);
    CHECK(r.deadlock);
  }
}

TEST_CASE("memory: persistent + per-op allocations and transient workspace") {
  auto p = base_plan(1);
  p.stages = {stage(0, 0, 0, 2, 1, 2), stage(1, 0, 2, 4, 1, 2)};
  p.stages[0].fwd_ws = 50;
  p.stages[0].bwd_ws = 70;
  p.stages[1].fwd_ws = 40;
  p.stages[1].bwd_ws = 80;
  p.stages[0].optim = p.stages[1].optim = ir::OptimPlace::Gpu;
  p.stages[0].weights = p.stages[1].weights = ir::Residency::Resident;
  p.buffers = {decl(BufKind::W, 0, 1000, ir::Tier::Gpu),     decl(BufKind::W, 1, 600, ir::Tier::Gpu),
               decl(BufKind::Opt, 0, 500, ir::Tier::Gpu),    decl(BufKind::Opt, 1, 300, ir::Tier::Host),
               decl(BufKind::Act, 0, 100, ir::Tier::Gpu),    decl(BufKind::Grad, 0, 100, ir::Tier::Gpu),
               decl(BufKind::Stash, 0, 200, ir::Tier::Gpu),  decl(BufKind::Stash, 1, 300, ir::Tier::Gpu),
               decl(BufKind::WGrad, 0, 1000, ir::Tier::Gpu), decl(BufKind::WGrad, 1, 400, ir::Tier::Gpu),
               decl(BufKind::Batch, -1, 10, ir::Tier::Gpu)};
  Instr lb = I(Op::LoadBatch, Stream::Comp);
  lb.mb = 0;
  Instr o0 = I(Op::Optim, Stream::Comp), o1 = I(Op::Optim, Stream::Comp);
  o0.stage = 0;
  o1.stage = 1;
  p.programs[0].instrs = {lb, fwd(0, 0), fwd(1, 0), bwd(1, 0), bwd(0, 0), buf_op(Op::Free, Stream::Comp, BufRef{BufKind::Batch, -1, 0}),
                          o1, o0};
  auto r = simulate(p, hw2({{0}}), tiny());
  REQUIRE_FALSE(r.deadlock);
  // persistent 1000+600+500 = 2100 (opt(S1) lives on the host)
  REQUIRE_FALSE(r.memory[0].empty());
  CHECK(r.memory[0].front().second == 2100);
  // peak inside backward S0: 2100 + batch 10 + stash(S0) 200 + grad(S0) 100 + wgrad(S1) 400 + wgrad(S0) 1000 + bwd_ws 70
  CHECK(r.peak_bytes[0] == 3880);
  CHECK(r.memory[0].back().second == 2100);
  bool saw_fwd1 = false;
  for (auto& [t, b] : r.memory[0])
    if (b == 2750) saw_fwd1 = true;  // during forward S1: +10 +100 +200 +300 +40
  CHECK(saw_fwd1);
}

TEST_CASE("trace JSON and annotate_prediction") {
  auto p = base_plan(2);
  p.stages = {stage(0, 0, 0, 2, 5.0), stage(1, 1, 2, 4, 3.0)};
  p.budget_bytes = 1 << 30;
  p.buffers = {decl(BufKind::Act, 0, 1000000, ir::Tier::Gpu), decl(BufKind::W, 0, 1000, ir::Tier::Host)};
  BufRef a{BufKind::Act, 0, 0};
  p.programs[0].instrs = {buf_op(Op::Prefetch, Stream::H2D, BufRef{BufKind::W, 0, -1}), fwd(0, 0, {0}),
                          sendrecv(Op::Send, a, 1, "F.S0.m0", {1})};
  p.programs[1].instrs = {sendrecv(Op::Recv, a, 0, "F.S0.m0"), fwd(1, 0, {0})};
  auto r = simulate(p, hw2({{0, 1}}), tiny());
  REQUIRE_FALSE(r.deadlock);
  auto j = nlohmann::json::parse(trace_json(p, r));
  REQUIRE(j.contains("traceEvents"));
  std::set<std::string> lanes, procs;
  int x = 0, c = 0;
  bool saw_deps = false;
  for (auto& e : j["traceEvents"]) {
    std::string ph = e["ph"];
    if (ph == "M" && e["name"] == "thread_name") lanes.insert(e["args"]["name"].get<std::string>());
    if (ph == "M" && e["name"] == "process_name") procs.insert(e["args"]["name"].get<std::string>());
    if (ph == "X") {
      ++x;
      CHECK(e["args"].contains("op"));
      CHECK(e["args"].contains("instr"));
      CHECK(e["dur"].get<double>() >= 0);
      if (e["name"] == "forward S0 m0") {
        CHECK(e["args"]["deps"] == "%0");
        CHECK(e["tid"] == 0);
        saw_deps = true;
      }
    }
    if (ph == "C") ++c;
  }
  CHECK(saw_deps);
  CHECK(x == 5);
  CHECK(c > 0);
  CHECK(lanes == std::set<std::string>{"comp", "h2d", "d2h", "p2p", "cpu"});
  CHECK(procs == std::set<std::string>{"GPU 0", "GPU 1"});
  CHECK(j["metadata"]["source"] == "predicted");
  CHECK(j["metadata"]["gpus"] == 2);
  CHECK(j["metadata"]["peak_bytes"].size() == 2);
  CHECK(j["metadata"]["step_s"].get<double>() == doctest::Approx(r.step_ms / 1e3));

  p.predicted = ir::Predicted{};
  p.predicted->bound_bytes = {7, 8};
  annotate_prediction(p, r);
  CHECK(p.predicted->bound_bytes == std::vector<int64_t>{7, 8});
  CHECK(p.predicted->step_s == doctest::Approx(r.step_ms / 1e3));
  CHECK(p.predicted->peak_bytes == r.peak_bytes);
  CHECK(p.predicted->tokens_per_s == r.tokens_per_s);
}

TEST_CASE("GPipe pipeline: step time matches the closed form") {
  const int P = 4, M = 8;
  const double f = 1.0, b = 2.0;
  auto p = base_plan(P);
  p.microbatches = M;
  for (int s = 0; s < P; ++s) p.stages.push_back(stage(s, s, s == 0 ? 0 : s + 1, s + 2 + (s == P - 1), f, b));
  for (int s = 0; s < P; ++s) {
    auto& v = p.programs[s].instrs;
    for (int k = 0; k < M; ++k) {
      std::vector<int> dep;
      if (s > 0) {
        v.push_back(sendrecv(Op::Recv, BufRef{BufKind::Act, s - 1, k}, s - 1, "F.S" + std::to_string(s - 1) + ".m" + std::to_string(k)));
        dep = {(int)v.size() - 1};
      }
      v.push_back(fwd(s, k, dep));
      if (s < P - 1)
        v.push_back(sendrecv(Op::Send, BufRef{BufKind::Act, s, k}, s + 1, "F.S" + std::to_string(s) + ".m" + std::to_string(k),
                             {(int)v.size() - 1}));
    }
    for (int k = 0; k < M; ++k) {
      std::vector<int> dep;
      if (s < P - 1) {
        v.push_back(sendrecv(Op::Recv, BufRef{BufKind::Grad, s, k}, s + 1, "B.S" + std::to_string(s + 1) + ".m" + std::to_string(k)));
        dep = {(int)v.size() - 1};
      }
      v.push_back(bwd(s, k, dep));
      if (s > 0)
        v.push_back(sendrecv(Op::Send, BufRef{BufKind::Grad, s - 1, k}, s - 1, "B.S" + std::to_string(s) + ".m" + std::to_string(k),
                             {(int)v.size() - 1}));
    }
  }
  auto hw = hw2({{0, 1}, {2, 3}});
  hw.gpus = 4;
  auto m = tiny();
  auto r = simulate(p, hw, m);
  REQUIRE_FALSE(r.deadlock);
  const double d = CostModel{m, hw}.p2p_ms(0);
  // Fill and drain: (P-1) hops of (op + transfer) per phase. The middle stages' single in-order p2p stream alternates
  // send(k) and recv(k+1), so their period is op + 2 transfers: 2*(M-1) extra transfers per phase on top
  // (derived by hand: last forward ends at (M+P-1)*f + (P-1 + 2*(M-1))*d).
  CHECK(r.step_ms == doctest::Approx(M * f + (P - 1) * (f + d) + M * b + (P - 1) * (b + d) + 4 * (M - 1) * d));
  CHECK(r.bubble == doctest::Approx(1.0 - M * (f + b) / r.step_ms));
  CHECK(r.intervals.size() == [&] { size_t n = 0; for (auto& pr : p.programs) n += pr.instrs.size(); return n; }());
  auto u = simulate(p, hw, m, SimOptions{0, true});
  CHECK_FALSE(u.deadlock);
}

TEST_CASE("links: send/recv on its two GPUs' link, a collective at its ring's slowest link") {
  auto m = tiny();
  HardwareSpec hw = hw2({{0}, {1}, {2}, {3}});
  hw.gpus = 4;
  hw.p2p_gbps = 10;  // every pair but those below
  hw.p2p_links = {{0, 2, 100, "nvlink"}, {1, 3, 100, "nvlink"}};
  const CostModel cost{m, hw};
  const int64_t B = 1000000000;  // 1 GB: 100 ms at 10 GB/s, 10 ms at 100 GB/s

  // send/recv between pipeline ranks 0 and 1: the link of the physical GPUs the plan's order puts them on
  auto sr = [&](std::vector<int> order) {
    auto p = base_plan(2);
    p.gpu_order = std::move(order);
    p.stages = {stage(0, 0, 0, 2, 5.0), stage(1, 1, 2, 4, 3.0)};
    p.buffers = {decl(BufKind::Act, 0, B, ir::Tier::Gpu)};
    BufRef a{BufKind::Act, 0, 0};
    p.programs[0].instrs = {fwd(0, 0), sendrecv(Op::Send, a, 1, "F.S0.m0", {0})};
    p.programs[1].instrs = {sendrecv(Op::Recv, a, 0, "F.S0.m0"), fwd(1, 0, {0})};
    auto r = simulate(p, hw, m);
    REQUIRE_FALSE(r.deadlock);
    return interval(r, 1, 0).end_ms - interval(r, 1, 0).start_ms;
  };
  CHECK(sr({0, 2}) == doctest::Approx(cost.p2p_ms(B, 100)));
  CHECK(sr({0, 2}) == doctest::Approx(10.02));
  CHECK(sr({0, 1}) == doctest::Approx(cost.p2p_ms(B, 10)));
  CHECK(sr({0, 1}) == doctest::Approx(cost.p2p_ms(B)));  // the unlisted pair: p2p_gbps
  CHECK(sr({3, 1}) == doctest::Approx(sr({0, 2})));

  // an all-reduce over a data-parallel group of 2 (one pipeline rank, dp 2): 2(n-1)/n x 2 x p2p over its link
  auto coll = [&](int dp, int tp, std::vector<int> order, const std::string& group) {
    auto p = base_plan(1);
    p.dp = dp;
    p.tp = tp;
    p.microbatches = 1;
    p.gpu_order = std::move(order);
    p.stages = {stage(0, 0, 0, 4)};
    p.buffers = {decl(BufKind::WGrad, 0, B, ir::Tier::Gpu)};
    Instr ar = buf_op(Op::AllReduce, Stream::P2P, BufRef{BufKind::WGrad, 0, -1});
    ar.group = group;
    p.programs[0].instrs = {ar};
    auto r = simulate(p, hw, m);
    REQUIRE_FALSE(r.deadlock);
    return interval(r, 0, 0).end_ms - interval(r, 0, 0).start_ms;
  };
  const double fast2 = coll(2, 1, {0, 2}, "dp.g0"), slow2 = coll(2, 1, {0, 1}, "dp.g0");
  CHECK(fast2 == doctest::Approx(cost.allreduce_ms(B, 100) / 2));
  CHECK(slow2 == doctest::Approx(cost.allreduce_ms(B, 10) / 2));
  CHECK(slow2 / fast2 == doctest::Approx(100.02 / 10.02));  // latency 0.02 ms per link crossing
  // a ring of 4 (dp 4): one slow link bounds it, whatever the others
  hw.p2p_links = {{0, 1, 100, ""}, {1, 2, 100, ""}, {2, 3, 100, ""}, {0, 3, 100, ""}};  // ring 0-1-2-3-0 all fast
  const double ring_fast = coll(4, 1, {0, 1, 2, 3}, "dp.g0");
  const double ring_slow = coll(4, 1, {0, 2, 1, 3}, "dp.g0");  // 0-2 and 1-3 are at 10 GB/s
  CHECK(ring_fast == doctest::Approx(cost.allreduce_ms(B, 100) * 3 / 4));
  CHECK(ring_slow == doctest::Approx(cost.allreduce_ms(B, 10) * 3 / 4));
  hw.p2p_links.pop_back();  // 3-0 slow: the same ring in rank order is now bounded by it
  CHECK(coll(4, 1, {0, 1, 2, 3}, "dp.g0") == doctest::Approx(ring_slow));
  // a tensor-parallel group (tp 2, dp 2): the slowest of the replicas' groups bounds every replica's collective
  hw.p2p_links = {{0, 1, 100, ""}, {2, 3, 100, ""}};
  CHECK(coll(2, 2, {0, 1, 2, 3}, "tp.g0") == doctest::Approx(cost.allreduce_ms(B, 100) / 2));  // tp.g0.r0 {0,1}, .r1 {2,3}
  CHECK(coll(2, 2, {0, 1, 3, 2}, "tp.g0") == doctest::Approx(cost.allreduce_ms(B, 100) / 2));
  CHECK(coll(2, 2, {0, 2, 1, 3}, "tp.g0") == doctest::Approx(cost.allreduce_ms(B, 10) / 2));
  CHECK(coll(2, 2, {0, 1, 2, 3}, "dp.g0") == doctest::Approx(cost.allreduce_ms(B, 10) / 2));  // dp pairs {0,2}, {1,3}
  // uniform links (no p2p_links): the same times as before per-pair links existed
  hw.p2p_links.clear();
  CHECK(coll(2, 1, {1, 0}, "dp.g0") == cost.allreduce_ms(B) / 2);
}
