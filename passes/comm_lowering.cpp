// comm-lowering: matched send/recv pairs for every stage boundary that crosses GPUs. The contract
// below is the pass's documentation (docs/passes.md is generated from it).
#include <algorithm>
#include <map>
#include <tuple>

#include "cost/simulator.hpp"
#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kCommLoweringContract = R"md(Matched send/recv pairs for every stage boundary that crosses GPUs.

- **Requires**: programs hold only forward/backward on comp (the schedule pass).
- **Guarantees**: for each (s, m) with stages s and s+1 on different ranks: `send act(S,m)` after forward S m and
  `recv act(S,m)` before forward S+1 m (tag `F.S<s>.m<m>`); `send grad(S,m)` after backward S+1 m and
  `recv grad(S,m)` before backward S m (tag `B.S<s>.m<m>`); each send followed by a `free` of the sent buffer on the
  p2p stream. No send/recv between stages on one GPU (local hand-over). Every rank's p2p stream carries its messages
  in one global order (by the time each message is ready in an estimate of the schedule with unbounded buffering,
  then by tag), which makes the rendezvous order consistent across ranks: no deadlock.
- **Decides**: the estimate is the timed executor's (the simulator with implicit transfers: each compute op waits
  for its inputs from the GPU that makes them plus their p2p time). A compute order that cannot make progress is an
  InputError naming the stuck instructions.
- **Recovers from the plan**: nothing beyond the programs.
)md";

namespace {
struct Key {
  ir::Op op; int s; int m;
  bool operator<(const Key& o) const { return std::tie(op, s, m) < std::tie(o.op, o.s, o.m); }
};
}  // namespace

// Estimated start/end of every compute op (ms): the timed executor (the simulator) on the plan as the schedule left
// it, each compute op waiting for its inputs from the GPU that makes them plus their p2p time (implicit transfers:
// unbounded buffering, no memory limits). Throws InputError if the compute order itself cannot make progress.
std::map<std::pair<int, int>, std::pair<double, double>> estimate_compute_times(const PassContext& c) {
  const auto& p = c.plan;
  ir::Plan est = p;
  // what crosses GPUs: activations and their gradients, of the size offload-insertion will declare
  const int64_t bytes = boundary_bytes(c);
  est.buffers.clear();
  for (int s = 0; s + 1 < p.num_stages(); ++s) {
    est.buffers.push_back({ir::BufKind::Act, s, bytes, ir::Tier::Gpu});
    est.buffers.push_back({ir::BufKind::Grad, s, bytes, ir::Tier::Gpu});
  }
  SimOptions o;
  o.implicit_transfers = true;
  SimResult r = simulate(est, c.hw, c.model, o);
  if (r.deadlock)
    throw InputError("schedule '" + p.schedule + "' cannot make progress with these knobs:\n" + r.deadlock_report);
  std::map<std::pair<int, int>, std::pair<double, double>> times;  // (rank, index) -> (start, end)
  for (const auto& iv : r.intervals) times[{iv.gpu, iv.instr}] = {iv.start_ms, iv.end_ms};
  return times;
}

void comm_lowering_pass(PassContext& c) {
  auto& p = c.plan;
  const int P = p.num_stages();
  auto times = estimate_compute_times(c);
  std::map<Key, double> end_of;
  for (int r = 0; r < p.gpus; ++r)
    for (size_t i = 0; i < p.programs[r].instrs.size(); ++i) {
      const auto& in = p.programs[r].instrs[i];
      if (in.op == ir::Op::Forward || in.op == ir::Op::Backward) end_of[{in.op, in.stage, in.mb}] = times[{r, (int)i}].second;
    }
  struct Msg { double t; std::string tag; ir::BufRef buf; int from, to; Key producer, consumer; };
  std::vector<Msg> msgs;
  for (int s = 0; s + 1 < P; ++s) {
    int a = p.stages[s].gpu, b = p.stages[s + 1].gpu;
    if (a == b) continue;
    for (int m = 0; m < p.microbatches; ++m) {
      msgs.push_back({end_of[{ir::Op::Forward, s, m}], "F.S" + std::to_string(s) + ".m" + std::to_string(m),
                      {ir::BufKind::Act, s, m}, a, b, {ir::Op::Forward, s, m}, {ir::Op::Forward, s + 1, m}});
      msgs.push_back({end_of[{ir::Op::Backward, s + 1, m}], "B.S" + std::to_string(s) + ".m" + std::to_string(m),
                      {ir::BufKind::Grad, s, m}, b, a, {ir::Op::Backward, s + 1, m}, {ir::Op::Backward, s, m}});
    }
  }
  std::sort(msgs.begin(), msgs.end(), [](const Msg& x, const Msg& y) { return std::tie(x.t, x.tag) < std::tie(y.t, y.tag); });

  for (int r = 0; r < p.gpus; ++r) {
    const auto& old = p.programs[r].instrs;
    // p2p ops of this rank in global message order
    struct P2P { const Msg* msg; bool is_send; };
    std::vector<P2P> q;
    for (const auto& mg : msgs) {
      if (mg.from == r) q.push_back({&mg, true});
      if (mg.to == r) q.push_back({&mg, false});
    }
    std::vector<ir::Instr> out;
    std::map<Key, int> pos;      // compute op -> new index
    std::vector<std::pair<int, Key>> pending_after;  // (new index of consumer/send, key it depends on)
    std::map<Key, std::vector<int>> recv_for;        // consumer -> recv indices
    size_t qi = 0;
    auto emit_p2p = [&](const P2P& e) {
      ir::Instr in;
      in.stream = ir::Stream::P2P;
      in.buf = e.msg->buf;
      in.tag = e.msg->tag;
      if (e.is_send) {
        in.op = ir::Op::Send;
        in.peer = e.msg->to;
        auto it = pos.find(e.msg->producer);
        if (it == pos.end()) throw std::logic_error("comm-lowering: send before its producer " + e.msg->tag);
        in.after = {it->second};
        out.push_back(in);
        ir::Instr fr = make_buf_op(ir::Op::Free, ir::Stream::P2P, e.msg->buf);
        out.push_back(fr);
      } else {
        in.op = ir::Op::Recv;
        in.peer = e.msg->from;
        recv_for[e.msg->consumer].push_back((int)out.size());
        out.push_back(in);
      }
    };
    for (size_t i = 0; i < old.size(); ++i) {
      const auto& in = old[i];
      double start = times[{r, (int)i}].first;
      while (qi < q.size() && q[qi].msg->t <= start) {
        // a send can only go once its producer has been emitted
        if (q[qi].is_send && !pos.count(q[qi].msg->producer)) break;
        emit_p2p(q[qi++]);
      }
      ir::Instr ni = in;
      Key k{in.op, in.stage, in.mb};
      auto rf = recv_for.find(k);
      if (rf != recv_for.end()) ni.after.insert(ni.after.end(), rf->second.begin(), rf->second.end());
      pos[k] = (int)out.size();
      out.push_back(ni);
    }
    while (qi < q.size()) emit_p2p(q[qi++]);
    // a recv emitted after its consumer would be an error in the estimate
    for (auto& [k, v] : recv_for)
      for (int ri : v)
        if (!pos.count(k) || ri > pos[k]) throw std::logic_error("comm-lowering: recv placed after its consumer");
    p.programs[r].instrs = std::move(out);
  }
}

}  // namespace mmoc
