// overlap: stream assignment and prefetch hoisting. The contract
// below is the pass's documentation (docs/passes.md is generated from it).
#include <algorithm>

#include "cost/simulator.hpp"
#include "ir/ops.hpp"
#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kOverlapContract = R"md(Stream assignment and the prefetch window.

- **Requires**: offload-insertion done (its choice in the context).
- **Guarantees**: every instruction is on the stream the op table gives its kind (compute and weight drops on comp,
  host->device on h2d, device->host on d2h, send/recv on p2p, CPU optimizer on cpu; GPU-resident optimizer on comp);
  each prefetch sits in the program right after the evict it must wait for (or at the start), so the engine issues
  it as early as memory allows.
- **Decides**: the prefetch window (how many weight runs a prefetch may run ahead of use): offload-insertion's plan
  (window 1) is re-lowered with its residency and recompute and windows 2..4, while every GPU stays within the
  budget; the fastest simulated plan wins (a wider window only when strictly faster).
- **Recovers from the plan**: the window (from the prefetches' dependencies).
)md";

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
  if (c.memory_complete && c.offload) {
    double best_ms = simulate(c.plan, c.hw, c.model).step_ms;
    int best_w = c.offload->window;
    ir::Plan best = c.plan;
    for (int w = 2; w <= 4; ++w) {
      OffloadConfig cfg = *c.offload;  // offload-insertion's residency and recompute
      cfg.window = w;
      ir::Plan cand = lower_offload(c, c.pre_offload, cfg);
      MemoryBound mb = memory_bound(cand);
      if (c.plan.budget_bytes > 0 && *std::max_element(mb.bound.begin(), mb.bound.end()) > c.hw.usable_bytes(c.plan.budget_bytes)) break;
      double ms = simulate(cand, c.hw, c.model).step_ms;
      if (ms < best_ms * (1 - 1e-6)) { best_ms = ms; best_w = w; best = std::move(cand); }
    }
    c.plan = std::move(best);
    c.offload->window = best_w;
    c.notes.push_back("overlap: prefetch window " + std::to_string(best_w));
  }
  hoist_prefetches(c.plan);
}

void recover_overlap(PassContext& c) {
  if (c.offload) c.offload->window = offload_config_of(c, c.plan).window;
}

}  // namespace mmoc
