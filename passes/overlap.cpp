// overlap: stream assignment and prefetch hoisting.
// Requires: offload-insertion done (memory_complete). Guarantees: every instruction is on the stream its kind
// runs on (compute and weight drops on comp, host->device on h2d, device->host on d2h, send/recv on p2p,
// CPU optimizer on cpu; GPU-resident optimizer on comp); the prefetch window (how many weight runs a
// prefetch may run ahead of use) is the widest in 1..4 that keeps every GPU within the budget and does not
// simulate slower; each prefetch sits in the program right after the evict it must wait for (or at the
// start), so the engine issues it as early as memory allows.
#include <algorithm>

#include "cost/simulator.hpp"
#include "ir/ops.hpp"
#include "passes/pass.hpp"

namespace mmoc {

using ir::Op;
using ir::Stream;

static void hoist_prefetches(ir::Plan& p) {
  for (auto& prog : p.programs) {
    int floor = 0;  // keep the h2d stream order
    for (int i = 0; i < (int)prog.instrs.size(); ++i) {
      if (prog.instrs[i].op != Op::Prefetch) continue;
      int to = floor;
      for (int a : prog.instrs[i].after) to = std::max(to, a + 1);
      if (to < i) move_instr(prog, i, to);
      floor = std::max(floor, std::min(to, i) + 1);
    }
  }
}

void overlap_pass(PassContext& c) {
  for (auto& prog : c.plan.programs)
    for (auto& in : prog.instrs) in.stream = ir::natural_stream(in);  // the op table
  if (c.memory_complete && !c.resident.empty()) {
    double best_ms = c.sim_available ? simulate(c.plan, c.hw, c.model).step_ms : 0;
    int best_w = 1;
    ir::Plan best = c.plan;
    for (int w = 2; w <= 4; ++w) {
      OffloadConfig cfg{c.resident, c.plan.stages.empty() ? true : c.plan.stages[0].recompute, w};
      ir::Plan cand = lower_offload(c, c.pre_offload, cfg);
      MemoryBound mb = memory_bound(cand);
      if (c.plan.budget_bytes > 0 && *std::max_element(mb.bound.begin(), mb.bound.end()) > c.hw.usable_bytes(c.plan.budget_bytes)) break;
      double ms = c.sim_available ? simulate(cand, c.hw, c.model).step_ms : 0;
      if (ms < best_ms * (1 - 1e-6)) { best_ms = ms; best_w = w; best = std::move(cand); }
    }
    c.plan = std::move(best);
    c.prefetch_window = best_w;
    c.notes.push_back("overlap: prefetch window " + std::to_string(best_w));
  }
  hoist_prefetches(c.plan);
}

}  // namespace mmoc
