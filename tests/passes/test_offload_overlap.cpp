// offload-insertion, overlap and linearize on small inputs: weight runs, gradient eviction and optimizer
// placement for offload=all/none, clipping (gradnorm before every optim), the "budget too small" message,
// auto residency against the budget, stream assignment, deadlock-freedom and the memory bound of final plans.
#include <cmath>
#include <regex>

#include "cost/simulator.hpp"
#include "passes_common.hpp"

using namespace mmoc;
using namespace mmoc::test;

namespace {
JobConfig seed7b() { return load_job(std::string(MMOC_CONFIGS_DIR) + "/jobs/seed-llama2-7b-l20x4.json"); }

// Number of maximal runs of consecutive uses of each stage (grouped) or 1 per stage (other schedules).
std::map<int, int> expected_runs(const ir::Program& prog, bool grouped) {
  std::map<int, int> runs;
  int prev = -1;
  for (const auto& in : prog.instrs) {
    if (!is_compute(in)) continue;
    if (grouped) { if (in.stage != prev) runs[in.stage]++; }
    else runs[in.stage] = 1;
    prev = in.stage;
  }
  return runs;
}
double smallest_named_gib(const std::string& msg) {
  std::smatch m;
  std::regex re("smallest budget that fits is ([0-9.]+) GiB");
  REQUIRE(std::regex_search(msg, m, re));
  return std::stod(m[1]);
}
}  // namespace

TEST_CASE("offload-insertion, offload=all: prefetch before each weight run, evict after; wgrad -> host then optim @cpu") {
  for (const char* sched : {"grouped", "gpipe", "1f1b", "interleaved-1f1b"})
    for (int v : {1, 2, 3}) {
      int M = 4;
      try { check_schedule(sched, 2, v, M); } catch (const InputError&) { continue; }
      CAPTURE(sched); CAPTURE(v);
      JobConfig j = tiny_job(2, v, M, sched);
      j.offload = "all";
      auto f = fixture(j, v, sched);
      // the program before offload-insertion, to count weight runs independently
      f->run_until("comm-lowering");
      ir::Plan before = f->plan();
      std::vector<Pass> one{{"offload-insertion", offload_insertion_pass}};
      run_passes(*f->c, one, {});
      const auto& p = f->plan();
      CHECK(f->c->memory_complete);
      CHECK(check_weight_runs(p) == "");
      CHECK_NOTHROW(memory_events(p));
      for (const auto& s : p.stages) {
        CHECK(s.weights == ir::Residency::Offload);
        CHECK(s.optim == ir::OptimPlace::Cpu);
        auto* d = p.find_buffer(ir::BufKind::W, s.id);
        REQUIRE(d);
        CHECK(d->home == ir::Tier::Host);
      }
      HappensBefore hb = happens_before(p);
      for (const auto& prog : p.programs) {
        auto runs = expected_runs(before.programs[prog.gpu], std::string(sched) == "grouped");
        for (auto [s, n] : runs) {
          int pf = 0, ev = 0;
          for (const auto& in : prog.instrs) {
            if (in.op == ir::Op::Prefetch && in.buf->stage == s) { pf++; CHECK(in.stream == ir::Stream::H2D); }
            if (in.op == ir::Op::Evict && in.buf->kind == ir::BufKind::W && in.buf->stage == s) ev++;
          }
          CHECK(pf == n);
          CHECK(ev == n);
          // gradients: evict wgrad(S) -> host @d2h after the stage's last backward, then optim S @cpu
          int last_b = -1;
          for (int i = 0; i < (int)prog.instrs.size(); ++i)
            if (prog.instrs[i].op == ir::Op::Backward && prog.instrs[i].stage == s) last_b = i;
          int evg = find_op(prog, ir::Op::Evict, ir::BufRef{ir::BufKind::WGrad, s, -1});
          int opt = find_op(prog, ir::Op::Optim, std::nullopt, s);
          REQUIRE(evg >= 0);
          REQUIRE(opt >= 0);
          CHECK(prog.instrs[evg].to_host);
          CHECK(prog.instrs[evg].stream == ir::Stream::D2H);
          CHECK(prog.instrs[opt].stream == ir::Stream::Cpu);
          CHECK(hb.hb(prog.gpu, last_b, prog.gpu, evg));
          CHECK(hb.hb(prog.gpu, evg, prog.gpu, opt));
        }
        // load_batch before first use, free batch after the last
        for (int m = 0; m < p.microbatches; ++m) {
          bool uses = false;
          for (const auto& in : prog.instrs) uses |= is_compute(in) && (in.stage == 0 || in.stage == p.num_stages() - 1) && in.mb == m;
          CHECK((find_op(prog, ir::Op::LoadBatch) >= 0) == (count_op(p, ir::Op::LoadBatch) > 0));
          if (!uses) continue;
          int lb = -1;
          for (int i = 0; i < (int)prog.instrs.size(); ++i) if (prog.instrs[i].op == ir::Op::LoadBatch && prog.instrs[i].mb == m) lb = i;
          CHECK(lb >= 0);
          CHECK(find_op(prog, ir::Op::Free, ir::BufRef{ir::BufKind::Batch, -1, m}) > lb);
        }
      }
      CHECK(count_op(p, ir::Op::GradNorm) == 0);
    }
}

TEST_CASE("offload-insertion, offload=none: everything resident, no prefetch, optim @opt (or @comp) after the last backward") {
  for (const char* sched : {"grouped", "1f1b"})
  for (const char* os : {"opt", "comp"}) {
    CAPTURE(sched); CAPTURE(os);
    JobConfig j = tiny_job(2, 1, 4, sched);
    j.offload = "none";
    j.gpu_optim_stream = os;
    auto f = fixture(j, 1, sched);
    f->run_until("offload-insertion");
    const auto& p = f->plan();
    CHECK(count_op(p, ir::Op::Prefetch) == 0);
    CHECK(count_op(p, ir::Op::Evict) == 0);
    CHECK(count_op(p, ir::Op::Optim) == p.num_stages());
    HappensBefore hb = happens_before(p);
    for (const auto& s : p.stages) {
      CHECK(s.weights == ir::Residency::Resident);
      CHECK(s.optim == ir::OptimPlace::Gpu);
      CHECK(p.find_buffer(ir::BufKind::W, s.id)->home == ir::Tier::Gpu);
      CHECK(p.find_buffer(ir::BufKind::Opt, s.id)->home == ir::Tier::Gpu);
      const auto& prog = p.programs[s.gpu];
      int opt = find_op(prog, ir::Op::Optim, std::nullopt, s.id);
      REQUIRE(opt >= 0);
      CHECK(prog.instrs[opt].stream == (std::string(os) == "opt" ? ir::Stream::Opt : ir::Stream::Comp));
      int last_bwd = -1;
      for (int i = 0; i < (int)prog.instrs.size(); ++i)
        if (prog.instrs[i].op == ir::Op::Backward && prog.instrs[i].stage == s.id) {
          CHECK(hb.hb(s.gpu, i, s.gpu, opt));
          last_bwd = i;
        }
      // on its own stream it waits for its stage's last backward explicitly, and for nothing else
      if (std::string(os) == "opt") CHECK(prog.instrs[opt].after == std::vector<int>{last_bwd});
    }
    auto ev = memory_events(p);
    // w and opt of every stage are persistent on their GPU
    int persistent = 0;
    for (const auto& lt : ev.lifetimes) persistent += lt.alloc == -1;
    CHECK(persistent == 2 * p.num_stages());
  }
}

TEST_CASE("the GPU optimizer's own stream: the backward below runs beside it, so the simulated step is shorter") {
  // one GPU, four resident stages: on @comp every AdamW waits in line before the next stage's backward; on @opt only
  // the last one (stage 0's, after the step's last backward) is on the critical path
  auto step = [](const char* os, double* adam_ms) {
    JobConfig j = tiny_job(1, 4, 4, "grouped");
    j.offload = "none";
    j.gpu_optim_stream = os;
    auto f = fixture(j, 4, "grouped");
    f->run_until("linearize");
    const auto& p = f->plan();
    CHECK(count_op(p, ir::Op::Optim) == 4);
    CHECK(verify_deadlock(p, true) == "");
    CHECK(verify_deadlock(p, false) == "");
    SimResult r = simulate(p, f->hw, f->m);
    *adam_ms = 0;
    for (const auto& iv : r.intervals)
      if (p.programs[iv.gpu].instrs[iv.instr].op == ir::Op::Optim) {
        CHECK(iv.stream == (std::string(os) == "opt" ? ir::Stream::Opt : ir::Stream::Comp));
        *adam_ms += iv.end_ms - iv.start_ms;
      }
    return r.step_ms;
  };
  double a_comp = 0, a_opt = 0;
  const double comp = step("comp", &a_comp), opt = step("opt", &a_opt);
  CHECK(a_comp > 0);
  CHECK(a_opt == doctest::Approx(a_comp));
  CHECK(opt < comp);
  CHECK(comp - opt > 0.5 * a_comp);  // three of the four updates leave the critical path
}

TEST_CASE("offload-insertion with clipping: a gradnorm after every gradient, before every optim") {
  for (const char* off : {"all", "none", "auto"})
    for (const char* sched : {"grouped", "gpipe"}) {
      CAPTURE(off); CAPTURE(sched);
      JobConfig j = tiny_job(2, 2, 4, sched);
      j.offload = off;
      j.train.max_grad_norm = 1.0;
      auto f = fixture(j, 2, sched);
      f->run_until("linearize");
      const auto& p = f->plan();
      CHECK(p.train.max_grad_norm == 1.0);
      HappensBefore hb = happens_before(p);
      for (const auto& prog : p.programs) {
        int gn = find_op(prog, ir::Op::GradNorm);
        REQUIRE(gn >= 0);
        CHECK(std::count_if(prog.instrs.begin(), prog.instrs.end(), [](auto& in) { return in.op == ir::Op::GradNorm; }) == 1);
        CHECK(prog.instrs[gn].stream == ir::Stream::Cpu);
        int optims = 0;
        for (int i = 0; i < (int)prog.instrs.size(); ++i) {
          const auto& in = prog.instrs[i];
          if (in.op == ir::Op::Optim) { ++optims; CHECK(hb.hb(prog.gpu, gn, prog.gpu, i)); }
          if (in.op == ir::Op::Backward) CHECK(hb.hb(prog.gpu, i, prog.gpu, gn));
          if (in.op == ir::Op::Evict && in.buf->kind == ir::BufKind::WGrad) CHECK(hb.hb(prog.gpu, i, prog.gpu, gn));
          // linearize: gradnorm (a collective) comes after every send/recv of its program
          if (in.op == ir::Op::Send || in.op == ir::Op::Recv) CHECK(i < gn);
        }
        CHECK(optims == p.v);
      }
      CHECK(verify_deadlock(p, true) == "");
      CHECK(verify_deadlock(p, false) == "");
    }
  // without clipping there is none
  auto f = tiny(2, 2, 4, "grouped");
  f->run_until("linearize");
  CHECK(count_op(f->plan(), ir::Op::GradNorm) == 0);
}

TEST_CASE("offload-insertion: a budget too small names the smallest budget that fits, and that budget fits") {
  for (int mbs : {8, 4}) {
    JobConfig j = seed7b();
    j.micro_batch_size = mbs;
    j.budget_gib = 3;
    auto f = fixture(j, 2, "grouped");
    std::string msg;
    try { f->run_until("linearize"); } catch (const InputError& e) { msg = e.what(); }
    CAPTURE(msg);
    REQUIRE(msg.find("too small") != std::string::npos);
    double named = smallest_named_gib(msg);
    CHECK(named > 3);
    // the named budget (printed to 0.01 GiB) must be enough, and clearly less must not be
    j.budget_gib = named + 0.005;
    CHECK_NOTHROW(compile_one(j, f->m, f->hw, 2, "grouped", {}));
    j.budget_gib = named - 0.01;
    CHECK_THROWS_AS(compile_one(j, f->m, f->hw, 2, "grouped", {}), InputError);
  }
}

// Regression: the smallest budget used to print as "0.00 GiB" for small models (now rounded up, with more digits
// below 1 GiB), and a budget below the hardware's reserve used to lift the limit instead of failing.
TEST_CASE("offload-insertion: the smallest-budget hint is non-zero for a tiny model") {
  JobConfig j = tiny_job(2, 1, 2, "grouped");
  j.budget_gib = 1e-6;
  auto f = fixture(j, 1, "grouped");
  std::string msg;
  try { f->run_until("linearize"); } catch (const InputError& e) { msg = e.what(); }
  CAPTURE(msg);
  CHECK(smallest_named_gib(msg) > 0);
}

TEST_CASE("offload-insertion, offload=auto: the bound stays within every budget; more budget, more resident stages") {
  JobConfig j = seed7b();
  int prev_res = -1;
  for (double b : {14.0, 20.0, 26.0, 32.0, 44.0}) {  // 7B needs 12.9 GiB with the l20x4 reserve (weight-gradient workspace included)
    CAPTURE(b);
    j.budget_gib = b;
    auto f = fixture(j, 2, "grouped");
    f->run_until("linearize");
    const auto& p = f->plan();
    auto mb = memory_bound(p);
    for (auto x : mb.bound) CHECK(x <= p.budget_bytes);
    int res = 0;
    for (char r : f->c->offload->resident) res += r;
    for (const auto& s : p.stages) CHECK((s.weights == ir::Residency::Resident) == (bool)f->c->offload->resident[s.id]);
    CHECK(res >= prev_res);
    prev_res = res;
    // per GPU the resident stages are its lowest-id ones
    for (int g = 0; g < p.gpus; ++g) {
      bool seen_offload = false;
      for (const auto& s : p.stages) {
        if (s.gpu != g) continue;
        if (s.weights == ir::Residency::Offload) seen_offload = true;
        else CHECK_FALSE(seen_offload);
      }
    }
    // maximal: one more resident stage on any GPU would break the usable part of that GPU's budget
    for (int g = 0; g < p.gpus; ++g) {
      OffloadConfig cfg{f->c->offload->resident, p.stages[0].recompute, 1};
      int next = -1;
      for (const auto& s : p.stages)
        if (s.gpu == g && !cfg.resident[s.id]) { next = s.id; break; }
      if (next < 0) continue;
      cfg.resident[next] = 1;
      MemoryBound more = memory_bound(lower_offload(*f->c, f->c->pre_offload, cfg));
      CAPTURE(g);
      CHECK(more.bound[g] > f->c->hw.usable_bytes(p.budget_bytes));  // the plan may use the budget less the reserve
    }
  }
  CHECK(prev_res == 8);  // 44 GiB holds the whole 7B model on 4 GPUs
}

TEST_CASE("overlap and linearize: streams by kind, deadlock-free in both modes, bound within budget") {
  for (const char* sched : {"grouped", "gpipe", "1f1b", "interleaved-1f1b"})
    for (const char* off : {"all", "auto", "none"}) {
      int v = std::string(sched) == "1f1b" ? 1 : 2;
      CAPTURE(sched); CAPTURE(off);
      JobConfig j = tiny_job(2, v, 4, sched);
      j.offload = off;
      auto f = fixture(j, v, sched);
      f->run_until("overlap");
      {
        // overlap: each prefetch right after the evict it waits for, or after the previous prefetch / at the start
        const auto& p = f->plan();
        for (const auto& prog : p.programs) {
          int prev_pf = -1;
          for (int i = 0; i < (int)prog.instrs.size(); ++i) {
            const auto& in = prog.instrs[i];
            if (in.op != ir::Op::Prefetch) continue;
            int want = prev_pf + 1;
            for (int a : in.after) want = std::max(want, a + 1);
            CHECK(i == want);
            prev_pf = i;
          }
        }
      }
      std::vector<Pass> lin{{"linearize", linearize_pass}};
      run_passes(*f->c, lin, {});
      const auto& p = f->plan();
      CHECK(ir::verify_structure(p).empty());
      for (const auto& prog : p.programs)
        for (const auto& in : prog.instrs) {
          switch (in.op) {
            case ir::Op::Prefetch: CHECK(in.stream == ir::Stream::H2D); break;
            case ir::Op::Evict: CHECK(in.stream == (in.to_host ? ir::Stream::D2H : ir::Stream::Comp)); break;
            case ir::Op::Send: case ir::Op::Recv: CHECK(in.stream == ir::Stream::P2P); break;
            case ir::Op::Forward: case ir::Op::Backward: case ir::Op::LoadBatch: CHECK(in.stream == ir::Stream::Comp); break;
            case ir::Op::GradNorm: CHECK(in.stream == ir::Stream::Cpu); break;
            case ir::Op::Optim:
              CHECK(in.stream == (p.stages[in.stage].optim == ir::OptimPlace::Cpu ? ir::Stream::Cpu : ir::Stream::Comp));
              break;
            default: break;
          }
          for (int a : in.after) CHECK(a < (int)(&in - &prog.instrs[0]));
        }
      CHECK(verify_deadlock(p, true) == "");
      CHECK(verify_deadlock(p, false) == "");
      auto mb = memory_bound(p);
      for (auto x : mb.bound) CHECK(x <= p.budget_bytes);
      CHECK(check_weight_runs(p) == "");
      CHECK(check_fwd_bwd(p) == "");
      // linearize: program order follows simulated start times
      SimResult sim = simulate(p, f->hw, f->m);
      REQUIRE_FALSE(sim.deadlock);
      std::vector<std::vector<double>> start(p.gpus);
      for (int g = 0; g < p.gpus; ++g) start[g].assign(p.programs[g].instrs.size(), 0);
      for (const auto& iv : sim.intervals) start[iv.gpu][iv.instr] = iv.start_ms;
      for (int g = 0; g < p.gpus; ++g)
        for (size_t i = 1; i < start[g].size(); ++i)
          if (p.programs[g].instrs[i].op != ir::Op::GradNorm && p.programs[g].instrs[i - 1].op != ir::Op::GradNorm)
            CHECK(start[g][i] >= start[g][i - 1] - 1e-9);
    }
}

TEST_CASE("overlap: the seed 7B job's final plan (window, streams, bound)") {
  JobConfig j = seed7b();
  j.offload = "all";
  auto f = fixture(j, 2, "grouped");
  f->run_until("linearize");
  const auto& p = f->plan();
  CHECK(f->c->offload->window >= 1);
  CHECK(f->c->offload->window <= 4);
  CHECK(verify_deadlock(p, true) == "");
  CHECK(verify_deadlock(p, false) == "");
  for (auto x : memory_bound(p).bound) CHECK(x <= p.budget_bytes);
  CHECK(check_weight_runs(p) == "");
}

// BUG (passes/offload_insertion.cpp, lower_offload, "memory dependency" loop; surfaced by passes/overlap.cpp's
// hoist_prefetches): with window >= 2 a prefetch of w(S) waits only on the evict of the (window+1)-th most
// recently ended run, not on the evict of the previous run of the SAME stage. Under `grouped` with v >= 2 a stage
// has two runs (its forward block and its backward block), so the second prefetch of w(S) may start while w(S)
// from the first run is still on the GPU (same buffer allocated twice). hoist_prefetches then moves that prefetch
// before the evict in program order and verify-memory throws "w(S4) allocated while already present":
//   mmoc-compile configs/jobs/seed-llama2-7b-l20x4.json --offload all --v 3   -> exit 3, internal error
// Fix: also make each prefetch wait (after) on the evict of the latest earlier run of the same stage.
TEST_CASE("offload-insertion: with window >= 2 a stage's second prefetch waits for its first evict") {
  for (int w : {1, 2, 3}) {
    CAPTURE(w);
    JobConfig j = tiny_job(2, 3, 4, "grouped");
    j.offload = "all";
    auto f = fixture(j, 3, "grouped");
    f->run_until("offload-insertion");
    OffloadConfig cfg{std::vector<char>(f->plan().num_stages(), 0), f->plan().stages[0].recompute, w};
    ir::Plan p = lower_offload(*f->c, f->c->pre_offload, cfg);
    HappensBefore hb = happens_before(p);
    for (const auto& prog : p.programs) {
      std::map<int, int> last_evict;  // stage -> index of its latest evict so far
      for (int i = 0; i < (int)prog.instrs.size(); ++i) {
        const auto& in = prog.instrs[i];
        if (in.op == ir::Op::Evict && in.buf->kind == ir::BufKind::W) last_evict[in.buf->stage] = i;
        if (in.op == ir::Op::Prefetch) {
          auto it = last_evict.find(in.buf->stage);
          if (it != last_evict.end()) CHECK(hb.hb(prog.gpu, it->second, prog.gpu, i));
        }
      }
    }
  }
}

TEST_CASE("compile: seed 7B with --offload all and v=3 compiles (grouped)") {
  // Same bug as above, end to end.
  JobConfig j = seed7b();
  j.offload = "all";
  ModelSpec m = model(j.model);
  HardwareSpec hw = hardware(j.hardware);
  CHECK_NOTHROW(compile_one(j, m, hw, 3, "grouped", {}));
}

// ---- partial recompute -----------------------------------------------------------------------------------------------
namespace {
// Layers whose stash the plan keeps (a stage without recompute keeps all of its layers').
int kept_layers(const ir::Plan& p) {
  int k = 0;
  for (const auto& s : p.stages) k += s.layers() - s.recompute_layers();
  return k;
}
// LLaMA-2-13B on 4 H200, grouped v=2, 8 micro-batches of 2 x 1024: each rank's last stage (S4..S6, 5 layers each) is
// free to keep its stash (its forward and backward runs are adjacent), the others and the head recompute whole.
JobConfig partial_job(const std::string& offload, double budget_gib) {
  JobConfig j = load_job(std::string(MMOC_CONFIGS_DIR) + "/jobs/seed-llama2-13b-l20x4.json");
  j.hardware = "h200x4";
  j.seq_len = 1024;
  j.micro_batch_size = 2;
  j.offload = offload;
  j.budget_gib = budget_gib;
  return j;
}
}  // namespace

TEST_CASE("partial recompute: the kept layers grow with the budget, and the chosen plan stays within it") {
  const ModelSpec m = model("llama2-13b");
  const HardwareSpec hw = hardware("h200x4");
  const int64_t layer_stash = m.layer_stash_bytes(1, 2, 1024, false, 2);
  int prev = -1, partial = 0, compiled = 0;
  std::vector<int> kept;
  for (double b : {24.0, 26.0, 28.0, 30.0, 32.0, 36.0, 40.0, 48.0}) {
    CAPTURE(b);
    CompileResult r;
    try {
      r = compile_job(partial_job("all", b), m, hw, {});
    } catch (const InputError&) {
      CHECK(compiled == 0);  // only the smallest budgets may not fit
      continue;
    }
    ++compiled;
    const ir::Plan& p = r.plan;
    const int k = kept_layers(p);
    kept.push_back(k);
    CHECK(k >= prev);  // more budget never keeps fewer stashes (offload all: the residency is fixed)
    prev = k;
    OffloadConfig cfg;
    for (const auto& s : p.stages) cfg.resident.push_back(s.weights == ir::Residency::Resident);
    const int64_t usable = hw.usable_bytes(p.budget_bytes);
    const MemoryBound mb = memory_bound(p);  // verify-memory's bound, recomputed here
    for (int64_t x : mb.bound) CHECK(x <= usable);
    for (const auto& s : p.stages) {
      partial += s.recompute && s.keep_layers > 0;
      if (recompute_forced(p, cfg, s.id)) {
        CHECK(s.recompute);
        CHECK(s.keep_layers == 0);
      } else if (s.recompute) {
        // greedy stopped because one more layer's stash (8 micro-batches of it live in a grouped run) did not fit
        CHECK(mb.bound[s.gpu] + 8 * layer_stash > usable);
      }
    }
  }
  REQUIRE(kept.size() >= 4);
  CHECK(kept.front() < kept.back());
  CHECK(kept.back() == 15);  // S4..S6 keep everything at the largest budgets
  CHECK(partial > 0);        // and some budget gave stages that recompute part of their layers
  // with the residency chosen too (offload=auto), the plan still fits
  for (double b : {28.0, 40.0}) {
    CompileResult r = compile_job(partial_job("auto", b), m, hw, {});
    for (int64_t x : memory_bound(r.plan).bound) CHECK(x <= hw.usable_bytes(r.plan.budget_bytes));
  }
}

TEST_CASE("partial recompute: stage costs, stash buffer and the text form follow the kept layers") {
  const ModelSpec m = model("llama2-13b");
  const HardwareSpec hw = hardware("h200x4");
  // the first budget whose plan recomputes part of a stage (the test above shows some does)
  CompileResult r;
  const ir::Stage* st = nullptr;
  for (double b : {24.0, 26.0, 28.0, 30.0, 32.0, 36.0, 40.0, 48.0}) {
    try {
      r = compile_job(partial_job("all", b), m, hw, {});
    } catch (const InputError&) {
      continue;
    }
    for (const auto& s : r.plan.stages) if (s.recompute && s.keep_layers > 0) st = &s;
    if (st) break;
  }
  REQUIRE(st);
  const ir::Plan& p = r.plan;
  const int k = st->recompute_layers();
  REQUIRE(k > 0);
  REQUIRE(k < st->layers());
  // the stash buffer holds the kept layers' stash (selective: without the SwiGLU's two tensors); the backward time adds
  // the recomputed layers' forward (and a selective stage's kept layers' SwiGLU)
  int64_t stash = 0;
  double fwd_rc = 0, fwd = 0, bwd = 0;
  CostModel cm{m, hw, 2};
  for (int l = st->layer_begin; l < st->layer_end; ++l) {
    if (l >= st->layer_begin + k) {
      stash += m.layer_stash_bytes(l, 2, 1024, false, 2, st->selective);
      if (st->selective) fwd_rc += cm.layer_selective_ms(l, 2, 1024);
    } else {  // the last recomputed layer without its down projection (its output's value is not read)
      fwd_rc += cm.layer_recompute_ms(l, 2, 1024, l + 1 < st->layer_begin + k);
    }
    fwd += cm.layer_fwd_ms(l, 2, 1024);
    bwd += cm.layer_bwd_ms(l, 2, 1024);
  }
  CHECK(p.buffer_bytes({ir::BufKind::Stash, st->id, 0}) == stash);
  CHECK(st->fwd_ms == doctest::Approx(fwd));
  CHECK(st->bwd_ms == doctest::Approx(bwd + fwd_rc));
  const std::string text = ir::print_text(p);
  CHECK(text.find("recompute=" + std::to_string(k) + "/" + std::to_string(st->layers())) != std::string::npos);
  CHECK(ir::parse_text(text) == p);
  CHECK(ir::from_json_string(ir::to_json_string(p)) == p);
}

TEST_CASE("selective recompute inside the layer: chosen per stage where the budget limits the stash; text, JSON, verify") {
  const ModelSpec m = model("llama2-7b");
  const HardwareSpec hw = hardware("h200x1");
  JobConfig j;
  j.model = "llama2-7b";
  j.hardware = "h200x1";
  j.gpus = 1;
  j.v = "34";
  j.schedule = "interleaved-1f1b";
  j.micro_batch_size = 8;
  j.microbatches = 4;
  j.seq_len = 1024;
  j.budget_gib = 115;
  auto compile = [&](const std::string& sel) {
    JobConfig k = j;
    k.selective = sel;
    return compile_job(k, m, hw, {});
  };
  const CompileResult off = compile("off"), on = compile("on"), aut = compile("auto");
  auto count = [](const ir::Plan& p) {
    int n = 0;
    for (const auto& s : p.stages) n += s.selective;
    return n;
  };
  CHECK(count(off.plan) == 0);
  // on: every stage that keeps a decoder layer's stash (not the embedding's, not the head's)
  int keeps = 0;
  for (const auto& s : on.plan.stages) keeps += s.layer_begin >= 1 && s.layer_begin <= m.layers && s.recompute_layers() < s.layers();
  CHECK(count(on.plan) == keeps);
  // auto: at 115 GiB the stash limits the plan (without it seven layers recompute), so it selects, and the simulated
  // step is the fastest of the three (off is one of its candidates)
  CHECK(count(aut.plan) > 0);
  CHECK(aut.sim.step_ms < off.sim.step_ms);
  CHECK(aut.sim.step_ms <= on.sim.step_ms + 1e-9);
  for (const CompileResult* r : {&off, &on, &aut})
    for (int64_t x : memory_bound(r->plan).bound) CHECK(x <= hw.usable_bytes(r->plan.budget_bytes));
  // a selective stage: its stash buffer without the SwiGLU's two tensors, its backward with their recompute
  CostModel cm{m, hw, 2};
  for (const auto& s : aut.plan.stages) {
    if (!s.selective) continue;
    int64_t stash = 0;
    double bwd = 0;
    for (int l = s.layer_begin; l < s.layer_end; ++l) {
      const int rc_end = s.layer_begin + s.recompute_layers();
      bwd += cm.layer_bwd_ms(l, 8, 1024) +
             (l < rc_end ? cm.layer_recompute_ms(l, 8, 1024, l + 1 < rc_end) : cm.layer_selective_ms(l, 8, 1024));
      if (l >= s.layer_begin + s.recompute_layers()) stash += m.layer_stash_bytes(l, 8, 1024, false, 2, true);
    }
    CHECK(aut.plan.buffer_bytes({ir::BufKind::Stash, s.id, 0}) == stash);
    CHECK(s.bwd_ms == doctest::Approx(bwd));
    CHECK(stash < m.layer_stash_bytes(s.layer_begin, 8, 1024, false, 2) * s.layers());
  }
  // the IR's text and JSON forms carry it; a plan without it prints as before (no selective key)
  const std::string text = ir::print_text(aut.plan);
  CHECK(text.find(" selective=1 ") != std::string::npos);
  CHECK(ir::print_text(off.plan).find("selective") == std::string::npos);
  CHECK(ir::parse_text(text) == aut.plan);
  CHECK(ir::from_json_string(ir::to_json_string(aut.plan)) == aut.plan);
  // verify: selective needs a kept decoder layer and tp 1
  ir::Plan bad = aut.plan;
  for (auto& s : bad.stages)
    if (s.layer_begin == 0) s.selective = true;  // the embedding's stage
  bool named = false;
  for (const auto& e : ir::verify_structure(bad)) named |= e.find("none of its decoder layers keeps its stash") != std::string::npos;
  CHECK(named);
  // a bad job value is refused with the key named
  JobConfig k = j;
  k.selective = "sometimes";
  CHECK_THROWS_WITH_AS(compile_job(k, m, hw, {}), doctest::Contains("selective must be auto, on or off"), InputError);
}
