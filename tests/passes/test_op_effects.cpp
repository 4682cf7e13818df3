// The op table's effects against an independent reference on real plans: docs/plan-format.md's instruction table
// coded here op by op (as the analyses and the simulator each coded it before the table), compared with ir::effects
// for every instruction of plans compiled for every schedule, offload mode and clipping; then the simulator's memory
// curve against a replay of that reference in the simulated order, and the untimed executor against verify-deadlock's
// rule on the same plans.
#include "passes_common.hpp"

#include "ir/exec.hpp"
#include "ir/ops.hpp"

using namespace mmoc;
using namespace mmoc::test;
using ir::BufKind;
using ir::BufRef;
using ir::Op;

namespace {
struct RefEffects {
  std::vector<BufRef> need, alloc, alloc_if_absent, free, free_if_present;
  int64_t ws = 0;
};

// docs/plan-format.md, "Instructions and their memory semantics", one op at a time.
RefEffects reference(const ir::Plan& p, const ir::Instr& in) {
  RefEffects r;
  const int S = in.stage, m = in.mb, last = p.num_stages() - 1;
  switch (in.op) {
    case Op::LoadBatch: r.alloc.push_back({BufKind::Batch, -1, m}); break;
    case Op::Prefetch: r.alloc.push_back(*in.buf); break;
    case Op::Recv: r.alloc.push_back(*in.buf); break;
    case Op::Send: r.need.push_back(*in.buf); break;
    case Op::AllReduce: r.need.push_back(*in.buf); break;
    case Op::ReduceScatter: r.need.push_back(*in.buf); break;  // the whole buffer stays (this rank uses its shard)
    case Op::AllGather: break;                                  // host copies only
    case Op::Evict:  // a bucket of wgrad(S) copied out: the buffer leaves with the last one
      if (in.buckets <= 1 || in.bucket == in.buckets - 1) r.free.push_back(*in.buf);
      else r.need.push_back(*in.buf);
      break;
    case Op::Free: r.free.push_back(*in.buf); break;
    case Op::Forward:
      r.need.push_back({BufKind::W, S, -1});
      if (S == 0 || S == last) r.need.push_back({BufKind::Batch, -1, m});
      if (S > 0) r.need.push_back({BufKind::Act, S - 1, m});
      if (S < last) r.alloc.push_back({BufKind::Act, S, m});
      if (S == last && S > 0 && p.model.tied_embeddings) r.need.push_back({BufKind::Tie, S, -1});  // a tied head
      r.alloc.push_back({BufKind::Stash, S, m});
      r.ws = p.stages[S].fwd_ws;
      break;
    case Op::Backward:
      r.need.push_back({BufKind::W, S, -1});
      if (S == 0 || S == last) r.need.push_back({BufKind::Batch, -1, m});
      if (S < last) r.need.push_back({BufKind::Grad, S, m});
      if (S > 0) r.alloc.push_back({BufKind::Grad, S - 1, m});
      r.alloc_if_absent.push_back({BufKind::WGrad, S, -1});
      if (S == last && S > 0 && p.model.tied_embeddings) {
        r.need.push_back({BufKind::Tie, S, -1});
        r.alloc_if_absent.push_back({BufKind::TieGrad, S, -1});
      }
      r.free.push_back({BufKind::Stash, S, m});
      if (S > 0) r.free.push_back({BufKind::Act, S - 1, m});
      if (S < last) r.free.push_back({BufKind::Grad, S, m});
      r.ws = p.stages[S].bwd_ws;
      break;
    case Op::Optim:
      if (in.stream != ir::Stream::Cpu) r.free.push_back({BufKind::WGrad, S, -1});  // the gradient on its tier
      break;
    case Op::GradNorm: break;
    case Op::AddGrad:  // B and wgrad(S) present; B dropped
      r.need.push_back(*in.buf);
      r.need.push_back({BufKind::WGrad, S, -1});
      r.free.push_back(*in.buf);
      break;
    case Op::TierRead: case Op::TierWrite: break;  // none on the GPU (host memory: ir::host_effects)
  }
  return r;
}

RefEffects from_table(const ir::Effects& e) {
  RefEffects r;
  for (const ir::BufEffect& x : e) {
    switch (x.access) {
      case ir::Access::Require: r.need.push_back(x.buf); break;
      case ir::Access::Alloc: r.alloc.push_back(x.buf); break;
      case ir::Access::AllocIfAbsent: r.alloc_if_absent.push_back(x.buf); break;
      case ir::Access::Free: r.free.push_back(x.buf); break;
      case ir::Access::FreeIfPresent: r.free_if_present.push_back(x.buf); break;
    }
  }
  r.ws = e.transient;
  return r;
}

std::vector<JobConfig> sample_jobs() {
  std::vector<JobConfig> out;
  for (const char* sched : {"grouped", "gpipe", "1f1b", "interleaved-1f1b"})
    for (const char* off : {"all", "auto", "none"})
      for (double clip : {0.0, 1.0}) {
        const int v = std::string(sched) == "1f1b" ? 1 : 2;
        JobConfig j = tiny_job(2, v, 4, sched);
        j.offload = off;
        j.train.max_grad_norm = clip;
        out.push_back(j);
      }
  JobConfig one = tiny_job(1, 3, 2, "grouped", "h200x1");
  one.offload = "all";
  out.push_back(one);
  // a tied model (tie/tiegrad, addgrad): the head on another GPU and on stage 0's
  for (const char* sched : {"grouped", "interleaved-1f1b"}) {
    JobConfig t = tiny_job(2, 2, 4, sched);
    t.model = "tiny-tied";
    t.offload = "auto";
    t.train.max_grad_norm = 1.0;
    out.push_back(t);
  }
  JobConfig t1 = tiny_job(1, 2, 2, "gpipe", "h200x1");
  t1.model = "tiny-tied";
  t1.offload = "all";
  out.push_back(t1);
  // the NVMe tier (read/write of opt(S) on the io stream), with a tied model's plumbing too
  for (const char* model : {"tiny-8l", "tiny-tied"}) {
    JobConfig n = tiny_job(2, 2, 4, "grouped");
    n.model = model;
    n.offload = "all";
    n.nvme = {"/nonexistent-nvme0/mmoc"};
    n.nvme_place = "all";
    out.push_back(n);
  }
  return out;
}
}  // namespace

TEST_CASE("ir::effects agrees with the format's table, op by op, on every instruction of compiled plans") {
  int instrs = 0;
  for (const JobConfig& j : sample_jobs()) {
    auto f = fixture(j, std::stoi(j.v), j.schedule);
    f->run_until("linearize");
    const ir::Plan& p = f->plan();
    for (const auto& prog : p.programs)
      for (int i = 0; i < (int)prog.instrs.size(); ++i) {
        const auto& in = prog.instrs[i];
        CAPTURE(j.schedule); CAPTURE(j.offload); CAPTURE(ir::print_instr(in, i));
        RefEffects want = reference(p, in), got = from_table(ir::effects(p, in));
        CHECK(got.need == want.need);
        CHECK(got.alloc == want.alloc);
        CHECK(got.alloc_if_absent == want.alloc_if_absent);
        CHECK(got.free == want.free);
        CHECK(got.free_if_present == want.free_if_present);
        CHECK(got.ws == want.ws);
        ++instrs;
      }
    // and the replay of each program by the table finds nothing missing and nothing left behind
    for (int g = 0; g < p.gpus; ++g) {
      ir::Replay r = ir::replay_program(p, g);
      CHECK(r.problems.empty());
      CHECK(r.leaked.empty());
    }
  }
  CHECK(instrs > 1000);
}

TEST_CASE("the simulator's memory curve is the reference effects replayed in its own order") {
  for (const JobConfig& j : sample_jobs()) {
    auto f = fixture(j, std::stoi(j.v), j.schedule);
    f->run_until("linearize");
    const ir::Plan& p = f->plan();
    SimResult sim = simulate(p, f->hw, f->m);
    REQUIRE_FALSE(sim.deadlock);
    CAPTURE(j.schedule); CAPTURE(j.offload); CAPTURE(j.train.max_grad_norm);
    for (int g = 0; g < p.gpus; ++g) {
      // events: allocations at an instruction's start, frees at its end; at equal times frees first
      struct Ev { double t; int kind; int instr; };  // kind 0 end, 1 start
      std::vector<Ev> evs;
      for (const auto& iv : sim.intervals)
        if (iv.gpu == g) {
          evs.push_back({iv.start_ms, 1, iv.instr});
          evs.push_back({iv.end_ms, 0, iv.instr});
        }
      std::stable_sort(evs.begin(), evs.end(), [](const Ev& a, const Ev& b) { return a.t < b.t || (a.t == b.t && a.kind < b.kind); });
      std::set<BufRef> live;
      int64_t mem = 0, peak = 0;
      for (const auto& d : p.buffers)
        if (d.home == ir::Tier::Gpu && (d.kind == BufKind::W || d.kind == BufKind::Opt) && p.stages[d.stage].gpu == g) {
          live.insert({d.kind, d.stage, -1});
          mem += d.bytes;
        }
      peak = mem;
      for (const Ev& e : evs) {
        const RefEffects r = reference(p, p.programs[g].instrs[e.instr]);
        if (e.kind == 1) {
          for (const auto& b : r.alloc) if (live.insert(b).second) mem += p.buffer_bytes(b);
          for (const auto& b : r.alloc_if_absent) if (live.insert(b).second) mem += p.buffer_bytes(b);
          mem += r.ws;
          peak = std::max(peak, mem);
        } else {
          mem -= r.ws;
          for (const auto& b : r.free) if (live.erase(b)) mem -= p.buffer_bytes(b);
          for (const auto& b : r.free_if_present) if (live.erase(b)) mem -= p.buffer_bytes(b);
        }
      }
      CAPTURE(g);
      CHECK(sim.peak_bytes[g] == peak);
      CHECK(sim.memory[g].back().second == mem);  // what is left at the end: the persistent buffers
      CHECK(mem == memory_bound(p).persistent[g]);
    }
  }
}

TEST_CASE("untimed executor: compiled plans complete in both orders; each instruction after its deps and partner-synchronous") {
  for (const JobConfig& j : sample_jobs()) {
    auto f = fixture(j, std::stoi(j.v), j.schedule);
    f->run_until("linearize");
    const ir::Plan& p = f->plan();
    const auto partners = ir::pair_partners(p);
    for (ir::Order o : {ir::Order::Streams, ir::Order::Sequential}) {
      std::vector<std::pair<int, int>> ran;
      ir::Execution x = ir::execute(p, o, [&](int g, int i) { ran.push_back({g, i}); });
      CAPTURE(j.schedule); CAPTURE(j.offload);
      REQUIRE(x.complete);
      std::map<std::pair<int, int>, size_t> when;
      for (size_t k = 0; k < ran.size(); ++k) when[ran[k]] = k;
      for (int g = 0; g < p.gpus; ++g)
        for (int i = 0; i < (int)p.programs[g].instrs.size(); ++i) {
          for (int a : p.programs[g].instrs[i].after) CHECK(when.at({g, a}) < when.at({g, i}));
          auto [pg, pi] = partners[g][i];
          REQUIRE(pg >= 0);
          if (pg != g || pi != i) CHECK((when.at({g, i}) + 1 == when.at({pg, pi}) || when.at({pg, pi}) + 1 == when.at({g, i})));
        }
    }
  }
}
