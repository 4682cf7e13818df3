// The NVMe tier in the compiler (docs/nvme-tier.md): read/write of opt(S) on the io stream around the CPU optimizer
// steps, their dependencies and host-memory effects, the tier's staging and the host prediction with the tier
// (cost/host_memory.hpp), placement within --host-budget and host_mem_gib (the fewest stages, errors naming the
// missing amount), both plan forms, the structural verifier and the simulator.
#include <regex>

#include "ir/ops.hpp"
#include "passes_common.hpp"

using namespace mmoc;
using namespace mmoc::test;

namespace {
constexpr int64_t kGiB = 1LL << 30;

JobConfig tier_job(int gpus, int v, const std::string& sched, const std::string& place = "all") {
  JobConfig j = tiny_job(gpus, v, 4, sched);
  j.offload = "all";
  j.nvme = {"/nonexistent-nvme0/mmoc", "/nonexistent-nvme1/mmoc"};
  j.nvme_place = place;
  j.update_order = "fixed";  // the alternating order has its own tests (below)
  return j;
}

CompileResult compile(const JobConfig& j) { return compile_job(j, model(j.model), hardware(j.hardware), {}); }

// The one host-memory model (cost/host_memory.hpp) with the tier's staging, per node against the plan's budget.
HostMemoryCheck host_of(const ir::Plan& p, const HardwareSpec& hw) {
  return check_host_memory(predict_host_memory(p, host_memory_options(hw, p)), hw, p.host_budget_bytes);
}
int64_t nvme_of(const ir::Plan& p, const HardwareSpec& hw) {
  int64_t b = 0;
  for (const auto& h : predict_host_memory(p, host_memory_options(hw, p))) b += h.nvme;
  return b;
}

int nvme_stage_count(const ir::Plan& p) {
  int n = 0;
  for (const auto& d : p.buffers) n += d.kind == ir::BufKind::Opt && d.home == ir::Tier::Nvme;
  return n;
}
}  // namespace

TEST_CASE("tier: one read and one write per tier stage on the io stream, ordered around its optim") {
  for (const char* sched : {"grouped", "gpipe", "1f1b", "interleaved-1f1b"})
    for (int v : {1, 2, 3})
      for (double clip : {0.0, 1.0}) {
        try { check_schedule(sched, 2, v, 4); } catch (const InputError&) { continue; }
        CAPTURE(sched); CAPTURE(v); CAPTURE(clip);
        JobConfig j = tier_job(2, v, sched);
        j.train.max_grad_norm = clip;
        const ir::Plan p = compile(j).plan;
        CHECK(nvme_stage_count(p) == p.num_stages());
        CHECK(p.nvme == j.nvme);
        CHECK(p.nvme_weights == std::vector<double>{1.0, 1.0});
        CHECK(verify_deadlock(p, false) == "");
        CHECK(verify_deadlock(p, true) == "");
        CHECK(ir::verify_structure(p).empty());
        HappensBefore hb = happens_before(p);
        for (const auto& prog : p.programs) {
          std::vector<int> order;  // tier stages in optimizer order
          for (const auto& in : prog.instrs)
            if (in.op == ir::Op::Optim) order.push_back(in.stage);
          for (size_t k = 0; k < order.size(); ++k) {
            const int s = order[k];
            const ir::BufRef opt{ir::BufKind::Opt, s, -1};
            const int r = find_op(prog, ir::Op::TierRead, opt), o = find_op(prog, ir::Op::Optim, std::nullopt, s),
                      w = find_op(prog, ir::Op::TierWrite, opt);
            REQUIRE(r >= 0);
            REQUIRE(w >= 0);
            CHECK(prog.instrs[r].stream == ir::Stream::Io);
            CHECK(prog.instrs[w].stream == ir::Stream::Io);
            CHECK(hb.hb(prog.gpu, r, prog.gpu, o));
            CHECK(hb.hb(prog.gpu, o, prog.gpu, w));
            // at most two stages' state in host memory: the read of the third waits for the first one's write
            if (k >= 2) {
              const int w_prev = find_op(prog, ir::Op::TierWrite, ir::BufRef{ir::BufKind::Opt, order[k - 2], -1});
              CHECK(hb.hb(prog.gpu, w_prev, prog.gpu, r));
            }
            // no GPU effect; on host memory the read allocates, the write frees
            CHECK(ir::effects(p, prog.instrs[r]).list.empty());
            CHECK(ir::effects(p, prog.instrs[w]).list.empty());
            REQUIRE(ir::host_effects(p, prog.instrs[r]).list.size() == 1);
            CHECK(ir::host_effects(p, prog.instrs[r]).list[0].access == ir::Access::Alloc);
            CHECK(ir::host_effects(p, prog.instrs[w]).list[0].access == ir::Access::Free);
          }
        }
        // staging per rank: at most the two largest opt(S) of the rank, at least one
        const std::vector<int64_t> staging = tier_staging_bytes(p);
        REQUIRE((int)staging.size() == p.gpus);
        for (const auto& prog : p.programs) {
          std::vector<int64_t> b;
          for (const auto& s : p.stages)
            if (s.gpu == prog.gpu) b.push_back(p.buffer_bytes({ir::BufKind::Opt, s.id, -1}));
          std::sort(b.rbegin(), b.rend());
          CHECK(staging[prog.gpu] <= b[0] + (b.size() > 1 ? b[1] : 0));
          CHECK(staging[prog.gpu] >= b.back());
        }
        // the header's host prediction includes the tier (its state off the host, its staging on it)
        const auto pred = predict_host_memory(p, host_memory_options(hardware(j.hardware), p));
        REQUIRE(p.host_bytes.size() == pred.size());
        for (size_t g = 0; g < pred.size(); ++g) {
          CHECK(p.host_bytes[g] == pred[g].total());
          CHECK(pred[g].nvme_staging == staging[g]);
          CHECK(pred[g].master == 0);
        }
        // both forms read back the same plan
        CHECK(ir::parse_text(ir::print_text(p)) == p);
        CHECK(ir::from_json_string(ir::to_json_string(p)) == p);
      }
}

TEST_CASE("tier: text form of the ops and the header") {
  const ir::Plan p = compile(tier_job(1, 2, "grouped")).plan;
  const std::string t = ir::print_text(p);
  CHECK(t.find("nvme=/nonexistent-nvme0/mmoc,/nonexistent-nvme1/mmoc nvme_weights=1,1") != std::string::npos);
  CHECK(std::regex_search(t, std::regex(R"(%\d+ = read opt\(S\d\) <- nvme @io\n)")));
  CHECK(std::regex_search(t, std::regex(R"(%\d+ = write opt\(S\d\) -> nvme @io after\(%\d+\)\n)")));
  CHECK(t.find("buffer opt(S0) bytes=") != std::string::npos);
  CHECK(t.find("home=nvme") != std::string::npos);
  // without --nvme nothing changes: no tier keys, no io ops
  JobConfig j = tier_job(1, 2, "grouped", "auto");
  j.nvme.clear();
  const std::string t0 = ir::print_text(compile(j).plan);
  CHECK(t0.find("nvme") == std::string::npos);
  CHECK(t0.find("@io") == std::string::npos);
}

TEST_CASE("tier: the structural verifier and the host bound reject malformed tier ops") {
  ir::Plan p = compile(tier_job(1, 2, "grouped")).plan;
  SUBCASE("a read of opt(S) whose home is host") {
    for (auto& d : p.buffers)
      if (d.kind == ir::BufKind::Opt && d.stage == 0) d.home = ir::Tier::Host;
    bool found = false;
    for (const auto& e : ir::verify_structure(p)) found |= e.find("not optimizer state whose home is nvme") != std::string::npos;
    CHECK(found);
  }
  SUBCASE("a plan without paths") {
    p.nvme.clear();
    bool found = false;
    for (const auto& e : ir::verify_structure(p)) found |= e.find("names no nvme path") != std::string::npos;
    CHECK(found);
  }
  SUBCASE("a layout with data or tensor parallelism (the tier holds whole stages of one pipeline)") {
    for (auto [dp, tp] : {std::pair{2, 1}, std::pair{1, 2}}) {
      ir::Plan q = p;
      q.dp = dp;
      q.tp = tp;
      bool found = false;
      for (const auto& e : ir::verify_structure(q)) found |= e.find("the NVMe tier (nvme=) with dp=") != std::string::npos;
      CHECK(found);
    }
    CHECK(ir::verify_structure(p).empty());  // and the plan as compiled passes
  }
  SUBCASE("the compiler refuses --nvme with --dp or --tp > 1") {
    for (auto [dp, tp] : {std::pair{2, 1}, std::pair{1, 2}}) {
      JobConfig j = tier_job(1, 1, "gpipe");
      j.dp = dp;
      j.tp = tp;
      CHECK_THROWS_WITH_AS(compile(j), doctest::Contains("is not supported: the tier holds whole stages of one pipeline"), InputError);
    }
  }
  SUBCASE("a read without its write") {
    auto& prog = p.programs[0];
    erase_instr(prog, find_op(prog, ir::Op::TierWrite));
    CHECK_THROWS_WITH_AS(tier_staging_bytes(p), doctest::Contains("never written back"), ir::VerifyError);
  }
  SUBCASE("on the wrong stream") {
    auto& prog = p.programs[0];
    prog.instrs[find_op(prog, ir::Op::TierRead)].stream = ir::Stream::Cpu;
    bool found = false;
    for (const auto& e : ir::verify_structure(p)) found |= e.find("runs on @cpu, not on @io") != std::string::npos;
    CHECK(found);
  }
}

TEST_CASE("tier: placement within --host-budget takes the fewest stages; errors name the missing host memory") {
  // the 7B seed job on one H200: host state 16 B/param all on the host
  JobConfig j;
  j.model = "llama2-7b";
  j.hardware = "h200x1";
  j.gpus = 1;
  j.v = "16";
  j.schedule = "grouped";
  j.budget_gib = 48;
  j.micro_batch_size = 8;
  j.microbatches = 8;
  j.seq_len = 1024;
  j.offload = "all";
  j.update_order = "fixed";  // every tier stage read and written each step (the alternating order: tested below)
  const HardwareSpec hw = hardware(j.hardware);
  const CompileResult host = compile(j);
  const HostMemoryCheck all_host = host_of(host.plan, hw);
  CHECK(nvme_stage_count(host.plan) == 0);
  CHECK(all_host.needed > 90 * kGiB);  // ~16 B per parameter + the process
  SUBCASE("over the budget without --nvme") {
    j.host_budget_gib = 48;
    CHECK_THROWS_WITH_AS(compile(j), doctest::Contains("GiB missing; give --nvme"), HostMemoryError);
  }
  SUBCASE("within the budget with --nvme: the fewest stages") {
    j.host_budget_gib = 48;
    j.nvme = {"/nonexistent-nvme0/mmoc"};
    const CompileResult r = compile(j);
    const HostMemoryCheck h = host_of(r.plan, hw);
    CHECK(h.ok);
    CHECK(h.by_budget);
    CHECK(h.needed <= 48 * kGiB);
    REQUIRE(r.plan.host_bytes.size() == 1);
    CHECK(r.plan.host_bytes[0] == h.needed);  // the header's prediction is the placement's
    const int n = nvme_stage_count(r.plan);
    CHECK(n > 0);
    CHECK(n < r.plan.num_stages());
    CHECK(r.plan.host_budget_bytes == 48 * kGiB);
    // a larger budget takes fewer stages; with the all-in-host need as the budget, none
    JobConfig j2 = j;
    j2.host_budget_gib = 64;
    const int n2 = nvme_stage_count(compile(j2).plan);
    CHECK(n2 < n);
    CHECK(n2 > 0);
    j2.host_budget_gib = (double)all_host.needed / kGiB + 0.01;
    CHECK(nvme_stage_count(compile(j2).plan) == 0);
    // the simulator moves the tier's bytes both ways
    CHECK(r.sim.tier_read_bytes == nvme_of(r.plan, hw));
    CHECK(r.sim.tier_write_bytes == nvme_of(r.plan, hw));
    CHECK(r.sim.step_ms >= host.sim.step_ms - 1e-6);  // the disk only adds time here
  }
  SUBCASE("too small even with everything on the tier") {
    j.host_budget_gib = 20;
    j.nvme = {"/nonexistent-nvme0/mmoc"};
    CHECK_THROWS_WITH_AS(compile(j), doctest::Contains("even with the optimizer state of all"), HostMemoryError);
  }
}

TEST_CASE("tier: with --nvme the search keeps a candidate the tier makes fit (13B on one H200, no --host-budget)") {
  // LLaMA-2-13B at 48 GiB on h200x1 needs more than the node's 125 GiB with all state in host memory: refused
  // naming host memory without --nvme (test_host_memory.cpp), compiled with the tier within host_mem_gib with it
  JobConfig j;
  j.model = "llama2-13b";
  j.hardware = "h200x1";
  j.gpus = 1;
  j.v = "auto";
  j.schedule = "grouped";
  j.budget_gib = 48;
  j.micro_batch_size = 8;
  j.microbatches = 4;
  j.seq_len = 1024;
  j.nvme = {"/nonexistent-nvme0/mmoc"};
  const HardwareSpec hw = hardware(j.hardware);
  const CompileResult r = compile(j);
  const HostMemoryCheck h = host_of(r.plan, hw);
  CHECK(h.ok);
  CHECK_FALSE(h.by_budget);
  CHECK(h.needed <= (int64_t)(hw.host_mem_gib * kGiB));
  CHECK(nvme_stage_count(r.plan) > 0);
  REQUIRE(r.plan.host_bytes.size() == 1);
  CHECK(r.plan.host_bytes[0] == h.needed);
  j.nvme.clear();
  CHECK_THROWS_WITH_AS(compile(j), doctest::Contains("host memory: the plan needs"), HostMemoryError);
}

TEST_CASE("tier: the simulator times the tier by the paths' bandwidth") {
  JobConfig j = tier_job(1, 2, "grouped");
  HardwareSpec slow = hardware("h200x2"), fast = slow;
  slow.storage = {{j.nvme[0], 0.2, 0.2, "1:0", false}, {j.nvme[1], 0.2, 0.2, "1:0", false}};  // one disk, slow
  fast.storage = {{j.nvme[0], 20, 20, "1:0", false}, {j.nvme[1], 20, 20, "1:1", false}};      // two fast disks
  const ModelSpec m = model(j.model);
  const CompileResult a = compile_job(j, m, slow, {}), b = compile_job(j, m, fast, {});
  CHECK(a.sim.tier_read_bytes > 0);
  CHECK(a.sim.tier_read_bytes == b.sim.tier_read_bytes);
  // on the slow disk the step takes at least every byte read and written once at 0.2 GB/s (one disk: shared)
  const double io_ms = (double)(a.sim.tier_read_bytes + a.sim.tier_write_bytes) / 0.2e6;
  CHECK(a.sim.step_ms >= io_ms * 0.5);  // reads and writes may overlap each other on one disk's faster direction
  CHECK(b.sim.step_ms < a.sim.step_ms);
}

// ---- the alternating (cache-friendly) update order (passes/update_order.cpp) ----------------------------------------

namespace {
std::vector<int> tier_optims(const ir::Program& prog) {
  std::vector<int> o;
  for (const auto& in : prog.instrs)
    if (in.op == ir::Op::Optim && in.stream == ir::Stream::Cpu) o.push_back(in.stage);
  return o;
}
std::vector<int> io_stages(const ir::Program& prog, ir::Op op) {
  std::vector<int> o;
  for (const auto& in : prog.instrs)
    if (in.op == op) o.push_back(in.buf->stage);
  return o;
}
}  // namespace

TEST_CASE("tier: the alternating update order: two bodies, the carries, both forms, verifiers, staging, simulated traffic") {
  int alternated = 0;
  for (const char* sched : {"grouped", "gpipe", "1f1b", "interleaved-1f1b"})
    for (int v : {1, 2, 3, 4}) {
      try { check_schedule(sched, 2, v, 4); } catch (const InputError&) { continue; }
      CAPTURE(sched); CAPTURE(v);
      JobConfig j = tier_job(2, v, sched);
      const CompileResult fixed = compile(j);
      j.update_order = "alternate";
      const CompileResult alt = compile(j);
      const ir::Plan& f = fixed.plan;
      const ir::Plan& p = alt.plan;
      if (v <= 2) {  // at most two tier stages per rank: nothing to keep, the plan stays as fixed
        CHECK(p == f);
        continue;
      }
      ++alternated;
      REQUIRE(ir::num_bodies(p) == 2);
      CHECK(ir::verify_structure(p).empty());
      CHECK(verify_deadlock(p, false) == "");
      CHECK(verify_deadlock(p, true) == "");
      CHECK(p.carry_even.size() == 4);
      CHECK(p.carry_odd.size() == 4);
      for (int g = 0; g < p.gpus; ++g) {
        const std::vector<int> o = tier_optims(f.programs[g]);
        const int n = (int)o.size();
        std::vector<int> rev(o.rbegin(), o.rend());
        CHECK(tier_optims(p.programs[g]) == o);
        CHECK(tier_optims(p.odd_programs[g]) == rev);
        CHECK(io_stages(p.programs[g], ir::Op::TierRead) == std::vector<int>(o.begin() + 2, o.end()));
        CHECK(io_stages(p.programs[g], ir::Op::TierWrite) == std::vector<int>(o.begin(), o.begin() + n - 2));
        CHECK(io_stages(p.odd_programs[g], ir::Op::TierRead) == std::vector<int>(rev.begin() + 2, rev.end()));
        CHECK(io_stages(p.odd_programs[g], ir::Op::TierWrite) == std::vector<int>(rev.begin(), rev.begin() + n - 2));
        // the odd step's tier updates come after the rank's last backward
        int last_bwd = -1, first_tier = -1;
        for (int i = 0; i < (int)p.odd_programs[g].instrs.size(); ++i) {
          const auto& in = p.odd_programs[g].instrs[i];
          if (in.op == ir::Op::Backward) last_bwd = i;
          if (in.op == ir::Op::Optim && in.stream == ir::Stream::Cpu && first_tier < 0) first_tier = i;
        }
        CHECK(first_tier > last_bwd);
        for (int k = 0; k < 2; ++k) {
          CHECK(std::count(p.carry_even.begin(), p.carry_even.end(), o[k]) == 1);
          CHECK(std::count(p.carry_odd.begin(), p.carry_odd.end(), o[n - 1 - k]) == 1);
        }
      }
      // the body views: one-body plans that the analyses see
      CHECK(ir::step_body(p, 0).programs == p.programs);
      CHECK(ir::step_body(p, 1).programs == p.odd_programs);
      CHECK(ir::step_body(p, 1).odd_programs.empty());
      // both forms read back the same plan
      const std::string text = ir::print_text(p);
      CHECK(text.find("gpu g0 odd {") != std::string::npos);
      CHECK(std::regex_search(text, std::regex(R"(carry_even=\d+,\d+,\d+,\d+ carry_odd=\d+,\d+,\d+,\d+\n)")));
      CHECK(ir::parse_text(text) == p);
      CHECK(ir::from_json_string(ir::to_json_string(p)) == p);
      // staging: still at most two stages per rank, counted across the step boundary; host memory as the fixed plan's
      const std::vector<int64_t> sa = tier_staging_bytes(p), sf = tier_staging_bytes(f);
      CHECK(sa == sf);
      CHECK(p.host_bytes == f.host_bytes);
      // the simulator times both bodies: each reads and writes two stages per rank fewer
      int64_t total = 0, carry = 0;
      for (const auto& d : p.buffers) total += d.kind == ir::BufKind::Opt && d.home == ir::Tier::Nvme ? d.bytes : 0;
      for (int s : p.carry_even) carry += p.buffer_bytes({ir::BufKind::Opt, s, -1});
      for (int s : p.carry_odd) carry += p.buffer_bytes({ir::BufKind::Opt, s, -1});
      CHECK(fixed.sim.tier_read_bytes + fixed.sim.tier_write_bytes == 2 * total);
      CHECK(alt.sim.even_tier_bytes == 2 * total - carry);
      CHECK(alt.sim.odd_tier_bytes == 2 * total - carry);
      CHECK(alt.sim.step_ms == doctest::Approx((alt.sim.even_step_ms + alt.sim.odd_step_ms) / 2));
      CHECK(p.predicted->step_s == doctest::Approx(alt.sim.step_ms / 1000.0));
    }
  CHECK(alternated >= 4);
}

TEST_CASE("tier: --update-order auto takes the faster of the two by simulation; fixed is today's plan") {
  JobConfig j = tier_job(1, 4, "grouped");
  HardwareSpec slow = hardware("h200x2"), fast = slow;
  slow.storage = {{j.nvme[0], 0.05, 0.05, "1:0", false}, {j.nvme[1], 0.05, 0.05, "1:0", false}};  // the disk is the step
  fast.storage = {{j.nvme[0], 500, 500, "1:0", false}, {j.nvme[1], 500, 500, "1:1", false}};      // the disk costs nothing
  const ModelSpec m = model(j.model);
  for (const HardwareSpec* hw : {&slow, &fast}) {
    j.update_order = "fixed";
    const CompileResult f = compile_job(j, m, *hw, {});
    j.update_order = "alternate";
    const CompileResult a = compile_job(j, m, *hw, {});
    j.update_order = "auto";
    const CompileResult au = compile_job(j, m, *hw, {});
    CHECK(ir::num_bodies(f.plan) == 1);
    REQUIRE(ir::num_bodies(a.plan) == 2);
    const bool alt_faster = a.sim.step_ms < f.sim.step_ms;
    CHECK(au.plan == (alt_faster ? a.plan : f.plan));
    if (hw == &slow) CHECK(alt_faster);  // 2 of 4 stages' I/O less per step, where the I/O is the step
    if (hw == &fast) CHECK(!alt_faster); // odd steps' updates no longer overlap the backward, and I/O saves nothing
    bool noted = false;
    for (const auto& n : au.notes) noted = noted || n.rfind("update order: fixed ", 0) == 0;
    CHECK(noted);
  }
}

TEST_CASE("tier: the verifiers reject a malformed two-step plan") {
  JobConfig j = tier_job(1, 4, "grouped");
  j.update_order = "alternate";
  ir::Plan p = compile(j).plan;
  REQUIRE(ir::num_bodies(p) == 2);
  SUBCASE("a carry naming a stage that is not on the tier") {
    p.carry_even[0] = 99;
    bool named = false;
    for (const auto& m : ir::verify_structure(p)) named = named || m.find("carry_even names S99") != std::string::npos;
    CHECK(named);
  }
  SUBCASE("carries without odd-step programs") {
    p.odd_programs.clear();
    bool named = false;
    for (const auto& m : ir::verify_structure(p)) named = named || m.find("without odd-step programs") != std::string::npos;
    CHECK(named);
  }
  SUBCASE("a body that keeps in host memory what the next step does not expect") {
    ir::Plan q = p;
    q.carry_odd.erase(q.carry_odd.begin());  // the even body leaves it in host memory, the odd body does not expect it
    CHECK_THROWS_WITH_AS(tier_staging_bytes(q), doctest::Contains("even step: g0: opt(S"), ir::VerifyError);
    CHECK_THROWS_WITH_AS(tier_staging_bytes(q), doctest::Contains("never written back"), ir::VerifyError);
  }
  SUBCASE("a body entered without what it updates first") {
    ir::Plan q = p;
    q.carry_even.erase(q.carry_even.begin());  // the even body updates it without a read
    CHECK_THROWS_WITH_AS(tier_staging_bytes(q), doctest::Contains("written to nvme but not in host memory"), ir::VerifyError);
  }
  SUBCASE("an even body that does not keep what the odd step expects") {
    auto& prog = p.programs[0].instrs;
    // the last update's state: the even body keeps it (no write); a write there leaves the odd body's carry short
    int last = -1;
    for (int i = 0; i < (int)prog.size(); ++i)
      if (prog[i].op == ir::Op::Optim && prog[i].stream == ir::Stream::Cpu) last = i;
    REQUIRE(last >= 0);
    ir::Instr w;
    w.op = ir::Op::TierWrite;
    w.stream = ir::Stream::Io;
    w.buf = ir::BufRef{ir::BufKind::Opt, prog[last].stage, -1};
    w.after = {last};
    prog.push_back(w);
    CHECK_THROWS_WITH_AS(tier_staging_bytes(p), doctest::Contains("should stay in host memory"), ir::VerifyError);
  }
  SUBCASE("the odd body's text block count must match gpus") {
    std::string t = ir::print_text(p);
    t = t.substr(0, t.find("gpu g0 odd {"));
    CHECK(ir::parse_text(t).odd_programs.empty());  // no odd blocks at all: read as a plan of one body (then refused)
    CHECK(!ir::verify_structure(ir::parse_text(t)).empty());
  }
}
