// verify-memory and verify-deadlock.
// verify-memory: a timing-independent upper bound on each GPU's memory. At the start of every instruction that
// allocates (or runs with a workspace), it adds every buffer that may be live then under SOME execution the
// dependencies allow: allocated by an instruction that does not happen after this one, and not freed by one that
// happens before it; plus the largest workspace of a compute op that may overlap. Whatever the timing of the
// streams, the GPU never holds more, so a plan within the bound cannot exceed its budget at run time.
// verify-deadlock: the untimed executor (ir/exec.hpp) runs all programs (in-order streams, `after` deps, send/recv
// rendezvous: both at the heads of their queues); with `sequential` each program is one in-order queue, as the CPU
// engine runs it.
#include <cmath>
#include <cstdio>

#include "common/format.hpp"
#include "cost/host_memory.hpp"
#include "ir/exec.hpp"
#include "passes/analysis.hpp"
#include "passes/pass.hpp"

namespace mmoc {

MemoryBound memory_bound(const ir::Plan& p, int only_gpu) {
  if (ir::num_bodies(p) == 2) {  // alternating update order: the worse of the two step bodies, per GPU
    MemoryBound a = memory_bound(ir::step_body(p, 0), only_gpu), b = memory_bound(ir::step_body(p, 1), only_gpu);
    for (size_t g = 0; g < a.bound.size() && g < b.bound.size(); ++g)
      if (b.bound[g] > a.bound[g]) { a.bound[g] = b.bound[g]; a.worst_instr[g] = -1; }
    return a;
  }
  MemoryEvents ev = memory_events(p);
  HappensBefore hb = happens_before(p, /*with_descendants=*/true);
  if (hb.cyclic) throw ir::VerifyError("dependency cycle between instructions (the plan cannot run)");
  MemoryBound mb;
  const int G = (int)p.programs.size();
  mb.bound.assign(G, 0);
  mb.worst_instr.assign(G, -1);
  mb.persistent.assign(G, 0);
  std::vector<std::vector<const Lifetime*>> on(G);
  for (const auto& lt : ev.lifetimes) {
    on[lt.gpu].push_back(&lt);
    if (lt.alloc == -1) mb.persistent[lt.gpu] += lt.bytes;
  }
  for (int g = 0; g < G; ++g) {
    if (only_gpu >= 0 && g != only_gpu) continue;
    const auto& prog = p.programs[g].instrs;
    std::vector<char> is_point(prog.size(), 0);
    for (const auto* lt : on[g]) if (lt->alloc >= 0) is_point[lt->alloc] = 1;
    std::vector<int> ws_ops;
    for (int i = 0; i < (int)prog.size(); ++i) if (ev.transient[g][i] > 0) { is_point[i] = 1; ws_ops.push_back(i); }
    mb.bound[g] = mb.persistent[g];
    // node ids once: an allocation (free) at instruction a, or -1 (persistent, never freed)
    struct Span { int alloc, free, alloc_node, free_node; int64_t bytes; };
    std::vector<Span> spans;
    spans.reserve(on[g].size());
    for (const auto* lt : on[g])
      spans.push_back({lt->alloc, lt->free, lt->alloc >= 0 ? hb.node_of(g, lt->alloc) : -1,
                       lt->free >= 0 ? hb.node_of(g, lt->free) : -1, lt->bytes});
    std::vector<int> ws_nodes;
    for (int c : ws_ops) ws_nodes.push_back(hb.node_of(g, c));
    for (int a = 0; a < (int)prog.size(); ++a) {
      if (!is_point[a]) continue;
      const int na = hb.node_of(g, a);
      const auto& before_a = hb.anc[na];  // happens before a
      const auto& after_a = hb.desc[na];  // happens after a
      int64_t sum = 0;
      for (const Span& sp : spans) {
        // allocated by an instruction that does not happen after a, not freed by one that happens before it
        bool allocated = sp.alloc == -1 || sp.alloc == a || sp.alloc_node == na || !HappensBefore::has(after_a, sp.alloc_node);
        bool not_freed = sp.free == -1 || sp.free == a || sp.free_node == na || !HappensBefore::has(before_a, sp.free_node);
        if (allocated && not_freed) sum += sp.bytes;
      }
      int64_t ws = 0;
      for (size_t k = 0; k < ws_ops.size(); ++k) {
        const int c = ws_ops[k], nc = ws_nodes[k];
        if (c == a || nc == na || (!HappensBefore::has(before_a, nc) && !HappensBefore::has(after_a, nc)))
          ws = std::max(ws, ev.transient[g][c]);
      }
      if (sum + ws > mb.bound[g]) { mb.bound[g] = sum + ws; mb.worst_instr[g] = a; }
    }
  }
  return mb;
}

void verify_memory(const PassContext& c) {
  MemoryBound mb = memory_bound(c.plan);
  for (size_t g = 0; g < mb.bound.size(); ++g)
    if (c.plan.budget_bytes > 0 && mb.bound[g] > c.hw.usable_bytes(c.plan.budget_bytes)) {
      std::string at = mb.worst_instr[g] >= 0 ? " at " + print_instr(c.plan.programs[g].instrs[mb.worst_instr[g]], mb.worst_instr[g]) : "";
      throw BudgetError("verify-memory: GPU g" + std::to_string(g) + " may need " + gib_at_least(mb.bound[g]) + " but the budget is " +
                       gib_at_least(c.plan.budget_bytes) + " (of which " + gib_at_least(c.hw.usable_bytes(c.plan.budget_bytes)) + " for the plan)" + at +
                       "; raise --budget to at least " + gib_at_least(c.hw.budget_for(mb.bound[g])) +
                       " or lower --micro-batch-size", c.hw.budget_for(mb.bound[g]));
    }
  // host memory: every rank's predicted host state with the NVMe tier's placement and staging (the tier's reads and
  // writes must pair up), per node against host_mem_gib and the plan's host budget, every world rank of the layout
  // counted (cost/host_memory.hpp)
  const HostMemoryCheck hc =
      check_host_memory(predict_host_memory(c.plan, host_memory_options(c.hw, c.plan), mb.bound), c.hw, &c.plan);
  if (!hc.ok) throw HostMemoryError("verify-memory: " + hc.message, hc.needed, hc.available);
}

std::string verify_deadlock(const ir::Plan& p, bool sequential) {
  const ir::Order o = sequential ? ir::Order::Sequential : ir::Order::Streams;
  if (ir::num_bodies(p) == 2) {  // alternating update order: each step body
    std::string r = ir::execute(ir::step_body(p, 0), o).report;
    if (!r.empty()) return r;
    r = ir::execute(ir::step_body(p, 1), o).report;
    return r.empty() ? r : "odd step: " + r;
  }
  return ir::execute(p, o).report;
}

}  // namespace mmoc
