// The NVMe tier's stage update order (docs/nvme-tier.md, "The alternating update order"; pass.hpp).
//
// A fixed plan updates a rank's tier stages in one order every step, the order their gradients land (the highest
// first, overlapping the backward); each update reads opt(S) before and writes it after, through kTierSlots staging
// slots. The stage updated last is the one needed last in the next step, so nothing can stay in host memory.
// The alternating plan has two bodies (ir::Plan::odd_programs):
//   even steps: the fixed order o_1..o_n; the first kTierSlots are still in host memory (no read), the last
//               kTierSlots stay there (no write): carry_odd.
//   odd steps:  the tier updates after the rank's backward, in the reverse order o_n..o_1 (at the end of the program,
//               where every gradient is in): the first kTierSlots are the even step's last, still in host memory; the
//               last kTierSlots stay for the next even step (carry_even).
// So each step reads and writes kTierSlots stages fewer per rank, in the same host memory (the slots exist anyway);
// odd steps give up the overlap of those updates with the backward. Checkpoints read a kept stage from its slot.
#include <algorithm>
#include <cstdio>
#include <set>
#include <stdexcept>

#include "cost/simulator.hpp"
#include "passes/pass.hpp"

namespace mmoc {

namespace {
using ir::BufKind;
using ir::Op;
using ir::Stream;

bool is_tier_io(const ir::Instr& in) {
  return (in.op == Op::TierRead || in.op == Op::TierWrite) && in.buf && in.buf->kind == BufKind::Opt;
}

// Program `prog` with its tier reads and writes made again for the tier updates at `order` (instruction indices of
// optim ops, in the order they run); with to_end the updates move to the end of the program in that order. The first
// kTierSlots updates find their state in host memory (no read), the last kTierSlots leave it there (no write); in
// between, as offload-insertion's add_tier_io: write after its update, the read kTierSlots updates later after that
// write (it reuses the write's host memory).
ir::Program rebuild(const ir::Program& prog, const std::vector<int>& order, bool to_end) {
  struct Node {
    ir::Instr in;
    std::vector<int> deps;  // node ids
  };
  std::vector<Node> nodes;
  std::vector<int> node_of(prog.instrs.size(), -1), seq;
  for (int i = 0; i < (int)prog.instrs.size(); ++i) {
    if (is_tier_io(prog.instrs[i])) continue;
    node_of[i] = (int)nodes.size();
    nodes.push_back({prog.instrs[i], {}});
    nodes.back().in.after.clear();
  }
  std::set<int> moved(order.begin(), order.end());
  for (int i = 0; i < (int)prog.instrs.size(); ++i) {
    if (node_of[i] < 0) continue;
    for (int a : prog.instrs[i].after) {
      if (node_of[a] < 0) continue;  // a tier read or write: made again below
      if (to_end && moved.count(a) && !moved.count(i))
        throw std::logic_error("update order: g" + std::to_string(prog.gpu) + " %" + std::to_string(i) + " depends on the update %" +
                               std::to_string(a) + ", which moves to the end of the step");
      nodes[node_of[i]].deps.push_back(node_of[a]);
    }
    if (!(to_end && moved.count(i))) seq.push_back(node_of[i]);
  }
  if (to_end)
    for (int i : order) seq.push_back(node_of[i]);
  const int n = (int)order.size();
  auto io = [&](Op op, int stage, int dep) {
    ir::Instr in;
    in.op = op;
    in.stream = Stream::Io;
    in.buf = ir::BufRef{BufKind::Opt, stage, -1};
    nodes.push_back({in, {dep}});
    return (int)nodes.size() - 1;
  };
  auto put_behind = [&](int at, int node) { seq.insert(std::find(seq.begin(), seq.end(), at) + 1, node); };
  std::vector<int> writes(n, -1);
  for (int k = 0; k < n; ++k) {
    const int o = node_of[order[k]], s = nodes[o].in.stage;
    if (k >= kTierSlots) {
      const int r = io(Op::TierRead, s, writes[k - kTierSlots]);
      put_behind(writes[k - kTierSlots], r);
      nodes[o].deps.push_back(r);
    }
    if (k < n - kTierSlots) {
      writes[k] = io(Op::TierWrite, s, o);
      put_behind(o, writes[k]);
    }
  }
  std::vector<int> pos(nodes.size(), -1);
  for (int i = 0; i < (int)seq.size(); ++i) pos[seq[i]] = i;
  ir::Program out;
  out.gpu = prog.gpu;
  for (int id : seq) {
    ir::Instr in = nodes[id].in;
    for (int d : nodes[id].deps) in.after.push_back(pos[d]);
    std::sort(in.after.begin(), in.after.end());
    in.after.erase(std::unique(in.after.begin(), in.after.end()), in.after.end());
    out.instrs.push_back(std::move(in));
  }
  return out;
}
}  // namespace

std::optional<ir::Plan> alternate_update_order(const ir::Plan& fixed) {
  if (fixed.nvme.empty() || !fixed.odd_programs.empty()) return std::nullopt;
  auto on_tier = [&](int s) {
    const ir::BufferDecl* d = fixed.find_buffer(BufKind::Opt, s);
    return d && d->home == ir::Tier::Nvme;
  };
  ir::Plan p = fixed;
  p.carry_even.clear();
  p.carry_odd.clear();
  p.odd_programs = p.programs;
  bool any = false;
  for (size_t g = 0; g < p.programs.size(); ++g) {
    const ir::Program& prog = fixed.programs[g];
    std::vector<int> order;  // the rank's tier updates, in the order the fixed plan runs them (its cpu stream's)
    for (int i = 0; i < (int)prog.instrs.size(); ++i) {
      const ir::Instr& in = prog.instrs[i];
      if (in.op == Op::Optim && in.stream == Stream::Cpu && on_tier(in.stage)) order.push_back(i);
    }
    const int n = (int)order.size();
    if (n <= kTierSlots) continue;  // every update would find its state in host memory: as the host (placement's call)
    any = true;
    p.programs[g] = rebuild(prog, order, false);
    std::vector<int> rev(order.rbegin(), order.rend());
    p.odd_programs[g] = rebuild(prog, rev, true);
    for (int k = 0; k < kTierSlots; ++k) {
      p.carry_odd.push_back(prog.instrs[order[n - 1 - k]].stage);  // the even step's last updates
      p.carry_even.push_back(prog.instrs[order[k]].stage);         // the odd step's last = the even step's first
    }
  }
  if (!any) return std::nullopt;
  std::sort(p.carry_even.begin(), p.carry_even.end());
  std::sort(p.carry_odd.begin(), p.carry_odd.end());
  return p;
}

std::string apply_update_order(const PassContext& c, ir::Plan& plan) {
  const std::string& mode = c.job.update_order;
  if (mode == "fixed" || plan.nvme.empty() || !plan.odd_programs.empty()) return "";
  std::optional<ir::Plan> alt = alternate_update_order(plan);
  if (!alt)
    return mode == "alternate" ? "update order: alternate asked, but no rank updates more than " + std::to_string(kTierSlots) +
                                     " stages from the NVMe tier (nothing to keep in host memory): fixed"
                               : "";
  const SimResult f = simulate(plan, c.hw, c.model), a = simulate(*alt, c.hw, c.model);
  char b[320];
  std::snprintf(b, sizeof b,
                "update order: fixed %.1f ms per step (tier %.1f MB read+written), alternate %.1f ms (even %.1f, odd %.1f; tier "
                "%.1f MB per step): %s",
                f.step_ms, (double)(f.tier_read_bytes + f.tier_write_bytes) / 1e6, a.step_ms, a.even_step_ms, a.odd_step_ms,
                (double)(a.tier_read_bytes + a.tier_write_bytes) / 1e6,
                mode == "alternate" ? "alternate (asked)" : a.step_ms < f.step_ms ? "alternate (faster)" : "fixed (faster)");
  if (mode == "alternate" || a.step_ms < f.step_ms) plan = std::move(*alt);
  return b;
}

}  // namespace mmoc
