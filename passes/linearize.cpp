// linearize: the final issue order of each program. The contract
// below is the pass's documentation (docs/passes.md is generated from it).
#include <algorithm>
#include <map>
#include <queue>

#include "cost/simulator.hpp"
#include "ir/ops.hpp"
#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kLinearizeContract = R"md(The final issue order of each program.

- **Requires**: a complete plan.
- **Guarantees**: each program lists its instructions in the order of their simulated start times (a topological
  order of stream order and `after` deps, ties by the previous order), with `gradnorm` after every send/recv of its
  program (it is a collective over all ranks); `after` indices are renumbered. Executing every program strictly in
  this order (the CPU engine does) cannot deadlock, and the GPU engine issues work to its streams in the order it will
  be needed: from here on the checker of sequential semantics runs. Then the NVMe tier's update order (job
  `update_order`, `apply_update_order`): with `alternate`, or `auto` when the simulated mean step is faster, a plan
  whose ranks update more than two stages from the tier becomes a two-step plan (`odd_programs`, `carry_even`,
  `carry_odd`: the odd steps update the tier stages after the backward in the reverse order, and each step leaves the
  last two updated in host memory for the next); `fixed` leaves the plan as it is.
- **Recovers from the plan**: that the programs are linearized.
)md";

void linearize_pass(PassContext& c) {
  auto& p = c.plan;
  if (!p.odd_programs.empty()) throw InputError("linearize: the plan already has odd-step programs (it was linearized)");
  SimResult sim = simulate(p, c.hw, c.model);
  if (sim.deadlock) throw InputError("linearize: the plan deadlocks in simulation:\n" + sim.deadlock_report);
  std::vector<std::vector<double>> start(p.gpus);
  for (int g = 0; g < p.gpus; ++g) start[g].assign(p.programs[g].instrs.size(), 0.0);
  for (const auto& iv : sim.intervals) start[iv.gpu][iv.instr] = iv.start_ms;
  for (int g = 0; g < p.gpus; ++g) {
    auto& prog = p.programs[g].instrs;
    const int n = (int)prog.size();
    double last_p2p = 0;
    for (int i = 0; i < n; ++i)
      if (ir::op_info(prog[i].op).sync != ir::Sync::None) last_p2p = std::max(last_p2p, start[g][i]);  // paired (p2p) ops
    std::vector<double> key(n);
    for (int i = 0; i < n; ++i) key[i] = prog[i].op == ir::Op::GradNorm ? std::max(start[g][i], last_p2p + 1e-9) : start[g][i];
    std::vector<std::vector<int>> succ(n);
    std::vector<int> indeg(n, 0);
    std::map<ir::Stream, int> prev;
    for (int i = 0; i < n; ++i) {
      auto it = prev.find(prog[i].stream);
      if (it != prev.end()) { succ[it->second].push_back(i); indeg[i]++; }
      prev[prog[i].stream] = i;
      for (int a : prog[i].after) { succ[a].push_back(i); indeg[i]++; }
    }
    using E = std::pair<std::pair<double, int>, int>;
    std::priority_queue<E, std::vector<E>, std::greater<E>> ready;
    for (int i = 0; i < n; ++i) if (!indeg[i]) ready.push({{key[i], i}, i});
    std::vector<int> order, pos(n);
    while (!ready.empty()) {
      int i = ready.top().second; ready.pop();
      pos[i] = (int)order.size();
      order.push_back(i);
      for (int s : succ[i]) if (--indeg[s] == 0) ready.push({{key[s], s}, s});
    }
    if ((int)order.size() != n) throw InputError("linearize: dependency cycle in program g" + std::to_string(g));
    std::vector<ir::Instr> out;
    out.reserve(n);
    for (int i : order) {
      ir::Instr in = prog[i];
      for (auto& a : in.after) a = pos[a];
      std::sort(in.after.begin(), in.after.end());
      out.push_back(std::move(in));
    }
    prog = std::move(out);
  }
  c.linearized = true;
  if (std::string note = apply_update_order(c, p); !note.empty()) c.notes.push_back(note);
}

void recover_linearize(PassContext& c) { c.linearized = true; }

}  // namespace mmoc
