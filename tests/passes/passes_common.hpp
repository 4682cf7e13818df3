// Shared helpers of the pass tests: specs from configs/, a PassContext kept alive with its specs, running the
// pipeline up to a pass, and small independent checks (program walks) used by several test files.
#pragma once
#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "compiler/pipeline.hpp"
#include "cost/simulator.hpp"
#include "cost/spec.hpp"
#include "passes/analysis.hpp"
#include "passes/pass.hpp"

#ifndef MMOC_CONFIGS_DIR
#error "MMOC_CONFIGS_DIR must be defined (tests/passes/CMakeLists.txt)"
#endif

namespace mmoc::test {

inline ModelSpec model(const std::string& name) { return load_model(name, MMOC_CONFIGS_DIR); }
inline HardwareSpec hardware(const std::string& name) { return load_hardware(name, MMOC_CONFIGS_DIR); }

// The message f throws ("" when it does not throw).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// An 8-GPU machine built in code: l20x4's numbers, four host links shared by two GPUs each.
inline HardwareSpec hw8() {
  HardwareSpec hw = hardware("l20x4");
  hw.name = "test-l20x8";
  hw.gpus = 8;
  hw.host_groups = {{0, 1}, {2, 3}, {4, 5}, {6, 7}};
  return hw;
}

// A small job on tiny-8l (seq 32 <= its max_seq 64).
inline JobConfig tiny_job(int gpus, int v, int microbatches, const std::string& schedule, const std::string& hw = "h200x2") {
  JobConfig j;
  j.model = "tiny-8l";
  j.hardware = hw;
  j.gpus = gpus;
  j.v = std::to_string(v);
  j.microbatches = microbatches;
  j.micro_batch_size = 1;
  j.seq_len = 32;
  j.schedule = schedule;
  return j;
}

// Job, specs and the PassContext that refers to them (not movable: the context holds references).
struct Fixture {
  JobConfig job;
  ModelSpec m;
  HardwareSpec hw;
  std::optional<PassContext> c;
  Fixture(JobConfig j, ModelSpec mm, HardwareSpec h, int v, const std::string& schedule)
      : job(std::move(j)), m(std::move(mm)), hw(std::move(h)) {
    c.emplace(job, m, hw);
    c->plan = initial_plan(job, m, hw, v, schedule);
  }
  Fixture(const Fixture&) = delete;
  Fixture& operator=(const Fixture&) = delete;
  ir::Plan& plan() { return c->plan; }
  // Runs the default pipeline's passes up to and including `last` (with the pass manager's verifiers).
  void run_until(const std::string& last, bool verify = true) {
    std::vector<Pass> sel;
    for (const auto& p : default_pipeline()) {
      sel.push_back(p);
      if (p.name == last) break;
    }
    REQUIRE(sel.back().name == last);
    PassManagerOptions o;
    o.verify = verify;
    run_passes(*c, sel, o);
  }
};

inline std::unique_ptr<Fixture> fixture(const JobConfig& j, int v, const std::string& schedule, const HardwareSpec* hw = nullptr) {
  return std::make_unique<Fixture>(j, model(j.model), hw ? *hw : hardware(j.hardware), v, schedule);
}
inline std::unique_ptr<Fixture> tiny(int gpus, int v, int mbs, const std::string& sched, const std::string& hw = "h200x2") {
  return fixture(tiny_job(gpus, v, mbs, sched, hw), v, sched);
}

// ---- program edits (tests plant faults) ------------------------------------------------------
// Removes instruction i; `after` references to it are dropped, later ones shift down.
inline void erase_instr(ir::Program& p, int i) {
  p.instrs.erase(p.instrs.begin() + i);
  for (auto& in : p.instrs) {
    std::vector<int> a;
    for (int x : in.after)
      if (x != i) a.push_back(x > i ? x - 1 : x);
    in.after = a;
  }
}
// Moves instruction i to the end of the program, keeping every `after` pointing at the same instruction.
inline void move_to_end(ir::Program& p, int i) {
  const int n = (int)p.instrs.size();
  ir::Instr in = p.instrs[i];
  p.instrs.erase(p.instrs.begin() + i);
  p.instrs.push_back(in);
  for (auto& x : p.instrs)
    for (auto& a : x.after) a = a == i ? n - 1 : (a > i ? a - 1 : a);
}

// ---- queries -------------------------------------------------------------------------------
inline int find_op(const ir::Program& p, ir::Op op, const std::optional<ir::BufRef>& buf = std::nullopt, int stage = -1) {
  for (int i = 0; i < (int)p.instrs.size(); ++i) {
    const auto& in = p.instrs[i];
    if (in.op != op) continue;
    if (buf && in.buf != buf) continue;
    if (stage >= 0 && in.stage != stage) continue;
    return i;
  }
  return -1;
}
inline int count_op(const ir::Plan& p, ir::Op op) {
  int n = 0;
  for (const auto& prog : p.programs)
    for (const auto& in : prog.instrs) n += in.op == op;
  return n;
}
inline bool is_compute(const ir::Instr& in) { return in.op == ir::Op::Forward || in.op == ir::Op::Backward; }

// Each (stage, mb) of the rank's stages: exactly one forward and one backward, forward first (program order).
inline std::string check_fwd_bwd(const ir::Plan& p) {
  for (const auto& prog : p.programs) {
    std::map<std::pair<int, int>, int> f, b;
    for (int i = 0; i < (int)prog.instrs.size(); ++i) {
      const auto& in = prog.instrs[i];
      if (in.op == ir::Op::Forward && f.count({in.stage, in.mb})) return "two forwards of S" + std::to_string(in.stage);
      if (in.op == ir::Op::Backward && b.count({in.stage, in.mb})) return "two backwards of S" + std::to_string(in.stage);
      if (in.op == ir::Op::Forward) f[{in.stage, in.mb}] = i;
      if (in.op == ir::Op::Backward) {
        b[{in.stage, in.mb}] = i;
        if (!f.count({in.stage, in.mb}))
          return "g" + std::to_string(prog.gpu) + ": backward S" + std::to_string(in.stage) + " m" + std::to_string(in.mb) +
                 " before its forward";
      }
      if (is_compute(in) && p.stages[in.stage].gpu != prog.gpu) return "stage on the wrong rank";
    }
    for (const auto& s : p.stages) {
      if (s.gpu != prog.gpu) continue;
      for (int m = 0; m < p.microbatches; ++m)
        if (!f.count({s.id, m}) || !b.count({s.id, m}))
          return "g" + std::to_string(prog.gpu) + ": missing forward/backward of S" + std::to_string(s.id) + " m" + std::to_string(m);
    }
    if (f.size() != b.size()) return "extra compute";
  }
  return "";
}

// Walks each program in order and checks that every use of w(S) of an offloaded stage sees a prefetched copy,
// that prefetches and evicts of weights alternate, and that no weight is left on the GPU at the end.
inline std::string check_weight_runs(const ir::Plan& p) {
  for (const auto& prog : p.programs) {
    std::set<int> present;
    for (int i = 0; i < (int)prog.instrs.size(); ++i) {
      const auto& in = prog.instrs[i];
      std::string at = "g" + std::to_string(prog.gpu) + " " + ir::print_instr(in, i);
      if (in.op == ir::Op::Prefetch && in.buf->kind == ir::BufKind::W) {
        if (!present.insert(in.buf->stage).second) return at + ": prefetch of a present weight";
      }
      if (in.op == ir::Op::Evict && in.buf->kind == ir::BufKind::W) {
        if (!present.erase(in.buf->stage)) return at + ": evict of an absent weight";
        if (in.to_host) return at + ": weights are dropped, not copied back";
      }
      if (is_compute(in) && p.stages[in.stage].weights == ir::Residency::Offload && !present.count(in.stage))
        return at + ": weights not prefetched";
    }
    if (!present.empty()) return "g" + std::to_string(prog.gpu) + ": weights left on the GPU at the end";
  }
  return "";
}

}  // namespace mmoc::test
