// data-parallel: the gradient reduction of replicated pipelines (dp > 1). The contract below is the pass's
// documentation (docs/passes.md is generated from it).
#include <algorithm>

#include "ir/ops.hpp"
#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kDataParallelContract = R"md(Gradient reduction across data-parallel replicas.

- **Requires**: overlap done (streams assigned); the plan header's `dp` (the programs are one replica's: replica d
  runs them on its own ranks, on its own micro-batches).
- **Guarantees**: with dp > 1, each stage's accumulated gradient `wgrad(S)` is reduced over the stage's
  data-parallel group `dp.g<p>` (p the stage's pipeline rank; with tp > 1 each rank's own tp shard's replicas,
  `ir::rank_group`) right after the stage's last backward (and the send
  of that backward's input gradient; for stage 0 of a tied model split over stages, after the `addgrad` of the
  head's tied gradient, so the shared weight's whole gradient is reduced), on the p2p stream, so it overlaps the rest of the backward pass; every later user of the gradient (its copy to the host, the
  stage's optimizer step, the gradient norm) waits for it. One bucket per stage (a stage's gradient is one flat
  buffer). GPU-resident stages: `allreduce wgrad(S)`, every replica updates the whole stage. Offloaded stages (CPU
  optimizer), ZeRO style: `reduce_scatter wgrad(S)` (each replica keeps and copies to the host its 1/dp shard),
  `optim S` updates that shard of the fp32 master and AdamW moments only, then `allgather w(S)` on the cpu stream
  gathers the updated weights' shards into every replica's host copy (what the next step prefetches). With dp = 1
  the plan is unchanged.
- **Recovers from the plan**: nothing (it keeps no state).
)md";

using ir::BufKind;
using ir::Op;

void data_parallel_pass(PassContext& c) {
  ir::Plan& p = c.plan;
  if (p.dp <= 1) return;
  for (auto& prog : p.programs) {
    for (const auto& st : p.stages) {
      if (st.gpu != prog.gpu) continue;
      int last_bwd = -1;
      for (int i = 0; i < (int)prog.instrs.size(); ++i)
        if (prog.instrs[i].op == Op::Backward && prog.instrs[i].stage == st.id) last_bwd = i;
      if (last_bwd < 0) throw std::logic_error("data-parallel: S" + std::to_string(st.id) + " has no backward");
      // a tied model's stage 0: its gradient is complete only after the head's tied gradient is added (addgrad)
      int anchor = last_bwd;
      for (int i = last_bwd + 1; i < (int)prog.instrs.size(); ++i)
        if (prog.instrs[i].op == Op::AddGrad && prog.instrs[i].stage == st.id) anchor = i;
      const ir::BufRef wg{BufKind::WGrad, st.id, -1};
      const bool zero = st.optim == ir::OptimPlace::Cpu;  // sharded CPU optimizer
      ir::Instr ar = make_buf_op(zero ? Op::ReduceScatter : Op::AllReduce, ir::Stream::P2P, wg);
      ar.group = ir::dp_group_name(p, prog.gpu);
      ar.after = {anchor};
      // after the hand-off of the last backward's input gradient (its send on the p2p stream): the pipeline's
      // remaining backward does not wait for the reduction
      // (but before the first user of the gradient: its copy to the host, the stage's optim, the gradient norm)
      auto uses = [&](const ir::Instr& in) {
        return in.op == Op::GradNorm || (in.op == Op::Optim && in.stage == st.id) || (in.buf && *in.buf == wg);
      };
      int pos = anchor + 1, first_use = (int)prog.instrs.size();
      for (int i = anchor + 1; i < (int)prog.instrs.size(); ++i) {
        const auto& in = prog.instrs[i];
        if (in.op == Op::Send && std::find(in.after.begin(), in.after.end(), last_bwd) != in.after.end()) pos = i + 1;
        if (uses(in)) first_use = std::min(first_use, i);
      }
      const int at = insert_instr(prog, std::min(pos, first_use), ar);
      for (int i = at + 1; i < (int)prog.instrs.size(); ++i) {
        auto& in = prog.instrs[i];
        if (uses(in) && std::find(in.after.begin(), in.after.end(), at) == in.after.end()) {
          in.after.push_back(at);
          std::sort(in.after.begin(), in.after.end());
        }
      }
      if (zero) {  // the updated shards of the host weights, gathered right after the stage's (cpu) update
        int opt = -1;
        for (int i = at + 1; i < (int)prog.instrs.size(); ++i)
          if (prog.instrs[i].op == Op::Optim && prog.instrs[i].stage == st.id) opt = i;
        if (opt < 0 || prog.instrs[opt].stream != ir::Stream::Cpu)
          throw std::logic_error("data-parallel: offloaded S" + std::to_string(st.id) + " has no cpu optim after its last backward");
        ir::Instr ag = make_buf_op(Op::AllGather, ir::Stream::Cpu, {BufKind::W, st.id, -1});
        ag.group = ar.group;
        insert_instr(prog, opt + 1, ag);
      }
    }
  }
  c.notes.push_back("data-parallel: " + std::to_string(p.dp) + " replicas of the " + std::to_string(p.gpus) +
                    "-rank pipeline; per stage after its last backward a gradient allreduce (resident) or "
                    "reduce_scatter + sharded CPU update + allgather of the weights (offloaded)");
}

}  // namespace mmoc
