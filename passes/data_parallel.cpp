// data-parallel: the gradient reduction of replicated pipelines (dp > 1). The contract below is the pass's
// documentation (docs/passes.md is generated from it).
#include <algorithm>
#include <cmath>
#include <initializer_list>

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
  stage's optimizer step, the gradient norm) waits for it. Buckets (job `bucket_mib`, `--bucket-mib`, default 25; 0 = one per
  stage): a stage's flat gradient larger than the bucket size is reduced in n buckets of about that size
  (`wgrad(S)[k/n]`, ir::bucket_range; with the ZeRO split n is a multiple of dp and each bucket lies in one replica's
  shard, interleaved over the shards), one collective each, in order on the p2p stream; an offloaded stage's copy
  to the host and its sharded CPU update are cut in the same buckets (`evict wgrad(S)[k/n] -> host` after bucket k's
  reduction, the buffer leaving with the last; `optim S[k/n]` after bucket k's copy): bucket k's reduction overlaps
  bucket k-1's copy and the update of the ones before (with clipping the updates wait for the global norm, so for
  every bucket). GPU-resident stages: `allreduce wgrad(S)`, every replica updates the whole stage. Offloaded stages (CPU
  optimizer), ZeRO style: `reduce_scatter wgrad(S)` (each replica keeps and copies to the host its 1/dp shard),
  `optim S` updates that shard of the fp32 master and AdamW moments only, then `allgather w(S)` on the cpu stream
  gathers the updated weights' shards into every replica's host copy (what the next step prefetches). With dp = 1
  the plan is unchanged.
- **Recovers from the plan**: nothing (it keeps no state).
)md";

using ir::BufKind;
using ir::Op;

namespace {
// How many buckets of about bucket_bytes a stage's gradient is reduced in: 1 when it fits in one (or bucketing is
// off); with the ZeRO split over `shards` replicas a multiple of shards, so that each bucket lies in one replica's
// shard (ir::bucket_range); at most 4096 (larger buckets beyond that).
int bucket_count(const ir::Plan& p, int stage, int shards, int64_t bucket_bytes) {
  const int64_t bytes = p.buffer_bytes({BufKind::WGrad, stage, -1});
  if (bucket_bytes <= 0 || bytes <= bucket_bytes) return 1;
  const int64_t es = ir::grad_element_bytes(p), elems = bytes / es;
  const int64_t per_bucket = std::max<int64_t>(ir::kBucketAlign, bucket_bytes / es);
  const int64_t shard = (elems + shards - 1) / shards;
  const int64_t per_shard = (shard + per_bucket - 1) / per_bucket;
  // at most kMaxBuckets collectives per stage (the bucket size grows beyond that): instruction count and latency
  constexpr int64_t kMaxBuckets = 4096;
  const int64_t n = shards * std::min(per_shard, std::max<int64_t>(1, kMaxBuckets / shards));
  return (int)n;
}

// Splits instruction i into n buckets: n - 1 copies go in before it, copy k (bucket k of n) waiting for instruction
// dep0 + k instead of those in `drop`; the original, now at i + n - 1 and unchanged otherwise, is the last bucket.
// Returns its index.
int split_into_buckets(ir::Program& prog, int i, int n, int dep0, std::initializer_list<int> drop) {
  ir::Instr base = prog.instrs[i];
  for (int d : drop) std::erase(base.after, d);
  for (int k = 0; k < n - 1; ++k) {
    ir::Instr b = base;
    b.bucket = k, b.buckets = n;
    b.after.push_back(dep0 + k);
    std::sort(b.after.begin(), b.after.end());
    b.after.erase(std::unique(b.after.begin(), b.after.end()), b.after.end());
    insert_instr(prog, i + k, b);
  }
  ir::Instr& last = prog.instrs[i + n - 1];
  last.bucket = n - 1, last.buckets = n;
  return i + n - 1;
}
}  // namespace

void data_parallel_pass(PassContext& c) {
  ir::Plan& p = c.plan;
  if (p.dp <= 1) return;
  const int64_t bucket_bytes = (int64_t)std::llround(c.job.bucket_mib * 1048576.0);
  int bucketed = 0, collectives = 0;
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
      const int n = bucket_count(p, st.id, zero ? p.dp : 1, bucket_bytes);
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
      // the buckets, in order on the p2p stream: bucket k's reduction overlaps bucket k-1's copy to the host
      const int first = std::min(pos, first_use);
      for (int k = 0; k < n; ++k) {
        ir::Instr b = ar;
        if (n > 1) b.bucket = k, b.buckets = n;
        insert_instr(prog, first + k, b);
      }
      const int at = first + n - 1;  // the last bucket: the stream runs them in order
      for (int i = at + 1; i < (int)prog.instrs.size(); ++i) {
        auto& in = prog.instrs[i];
        if (uses(in) && std::find(in.after.begin(), in.after.end(), at) == in.after.end()) {
          in.after.push_back(at);
          std::sort(in.after.begin(), in.after.end());
        }
      }
      if (zero && n > 1) {  // the copy to the host in the same buckets, each after its own reduction
        int ev = -1;
        for (int i = at + 1; i < (int)prog.instrs.size() && ev < 0; ++i)
          if (prog.instrs[i].op == Op::Evict && prog.instrs[i].to_host && prog.instrs[i].buf == wg) ev = i;
        if (ev < 0) throw std::logic_error("data-parallel: offloaded S" + std::to_string(st.id) + " has no evict of its gradient to the host");
        const int last_ev = split_into_buckets(prog, ev, n, first, {at});  // the last one after the last reduction
        // and the sharded CPU update in the same buckets, each after its own bucket's copy (the buckets are interleaved
        // over the replicas' shards: every replica's update starts with the first buckets)
        int op = -1;
        for (int i = last_ev + 1; i < (int)prog.instrs.size() && op < 0; ++i)
          if (prog.instrs[i].op == Op::Optim && prog.instrs[i].stage == st.id && prog.instrs[i].stream == ir::Stream::Cpu) op = i;
        if (op < 0) throw std::logic_error("data-parallel: offloaded S" + std::to_string(st.id) + " has no cpu optim after its gradient's copy");
        // (not after the last copy or the last reduction: bucket k's copy is what its update waits for)
        auto& lastop = prog.instrs[split_into_buckets(prog, op, n, ev, {last_ev, at})];
        if (std::find(lastop.after.begin(), lastop.after.end(), last_ev) == lastop.after.end()) {
          lastop.after.push_back(last_ev);
          std::sort(lastop.after.begin(), lastop.after.end());
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
      bucketed += n > 1;
      collectives += n;
    }
  }
  c.notes.push_back("data-parallel: " + std::to_string(p.dp) + " replicas of the " + std::to_string(p.gpus) +
                    "-rank pipeline; per stage after its last backward a gradient allreduce (resident) or "
                    "reduce_scatter + sharded CPU update + allgather of the weights (offloaded); buckets of " +
                    ir::format_double(c.job.bucket_mib) + " MiB: " + std::to_string(bucketed) + " stage(s) in buckets, " +
                    std::to_string(collectives) + " gradient collective(s) per step");
}

}  // namespace mmoc
