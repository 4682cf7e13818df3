// verify-memory and verify-deadlock.
// verify-memory: a timing-independent upper bound on each GPU's memory. At the start of every instruction that
// allocates (or runs with a workspace), it adds every buffer that may be live then under SOME execution the
// dependencies allow: allocated by an instruction that does not happen after this one, and not freed by one that
// happens before it; plus the largest workspace of a compute op that may overlap. Whatever the timing of the
// streams, the GPU never holds more, so a plan within the bound cannot exceed its budget at run time.
// verify-deadlock: executes all programs untimed (in-order streams, `after` deps, send/recv rendezvous: both at
// the heads of their queues); with `sequential` each program is one in-order queue, as the CPU engine runs it.
#include <cmath>
#include <cstdio>
#include <map>

#include "common/format.hpp"
#include "passes/analysis.hpp"
#include "passes/pass.hpp"

namespace mmoc {

MemoryBound memory_bound(const ir::Plan& p) {
  MemoryEvents ev = memory_events(p);
  HappensBefore hb = happens_before(p);
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
    const auto& prog = p.programs[g].instrs;
    std::vector<char> is_point(prog.size(), 0);
    for (const auto* lt : on[g]) if (lt->alloc >= 0) is_point[lt->alloc] = 1;
    std::vector<int> ws_ops;
    for (int i = 0; i < (int)prog.size(); ++i) if (ev.transient[g][i] > 0) { is_point[i] = 1; ws_ops.push_back(i); }
    mb.bound[g] = mb.persistent[g];
    for (int a = 0; a < (int)prog.size(); ++a) {
      if (!is_point[a]) continue;
      int64_t sum = 0;
      for (const auto* lt : on[g]) {
        bool allocated = lt->alloc == -1 || lt->alloc == a || !hb.hb(g, a, g, lt->alloc);
        bool not_freed = lt->free == -1 || lt->free == a || !hb.hb(g, lt->free, g, a);
        if (allocated && not_freed) sum += lt->bytes;
      }
      int64_t ws = 0;
      for (int c : ws_ops)
        if (c == a || (!hb.hb(g, c, g, a) && !hb.hb(g, a, g, c))) ws = std::max(ws, ev.transient[g][c]);
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
      throw InputError("verify-memory: GPU g" + std::to_string(g) + " may need " + gib_at_least(mb.bound[g]) + " but the budget is " +
                       gib_at_least(c.plan.budget_bytes) + " (of which " + gib_at_least(c.hw.usable_bytes(c.plan.budget_bytes)) + " for the plan)" + at +
                       "; raise --budget to at least " + gib_at_least(c.hw.budget_for(mb.bound[g])) +
                       " or lower --micro-batch-size");
    }
}

std::string verify_deadlock(const ir::Plan& p, bool sequential) {
  const int G = (int)p.programs.size();
  // queues[g][q] = instruction indices in order
  std::vector<std::vector<std::vector<int>>> queues(G);
  std::vector<std::vector<size_t>> head(G);
  std::vector<std::vector<char>> done(G);
  auto qid = [&](const ir::Instr& in) { return sequential ? 0 : (int)in.stream; };
  size_t remaining = 0;
  std::map<std::string, std::pair<int, int>> send_at, recv_at;
  for (int g = 0; g < G; ++g) {
    queues[g].assign(sequential ? 1 : 5, {});
    head[g].assign(queues[g].size(), 0);
    done[g].assign(p.programs[g].instrs.size(), 0);
    for (int i = 0; i < (int)p.programs[g].instrs.size(); ++i) {
      const auto& in = p.programs[g].instrs[i];
      queues[g][qid(in)].push_back(i);
      if (in.op == ir::Op::Send) send_at[in.tag] = {g, i};
      if (in.op == ir::Op::Recv) recv_at[in.tag] = {g, i};
      ++remaining;
    }
  }
  auto deps_done = [&](int g, int i) {
    for (int a : p.programs[g].instrs[i].after) if (a < 0 || a >= (int)done[g].size() || !done[g][a]) return false;
    return true;
  };
  auto at_head = [&](int g, int i) {
    const auto& q = queues[g][qid(p.programs[g].instrs[i])];
    size_t h = head[g][qid(p.programs[g].instrs[i])];
    return h < q.size() && q[h] == i;
  };
  auto complete = [&](int g, int i) { done[g][i] = 1; head[g][qid(p.programs[g].instrs[i])]++; --remaining; };
  bool progress = true;
  while (remaining > 0 && progress) {
    progress = false;
    for (int g = 0; g < G; ++g)
      for (size_t q = 0; q < queues[g].size(); ++q) {
        while (head[g][q] < queues[g][q].size()) {
          int i = queues[g][q][head[g][q]];
          const auto& in = p.programs[g].instrs[i];
          if (!deps_done(g, i)) break;
          if (in.op == ir::Op::Send || in.op == ir::Op::Recv) {
            auto& other = in.op == ir::Op::Send ? recv_at : send_at;
            auto it = other.find(in.tag);
            if (it == other.end()) break;  // unmatched: stuck (structure verifier names it)
            auto [og, oi] = it->second;
            if (!at_head(og, oi) || !deps_done(og, oi)) break;
            complete(g, i);
            complete(og, oi);
          } else {
            complete(g, i);
          }
          progress = true;
        }
      }
  }
  if (remaining == 0) return "";
  std::string rep = std::string("deadlock (") + (sequential ? "sequential" : "streams") + "): " + std::to_string(remaining) +
                    " instructions cannot run; stuck heads:";
  for (int g = 0; g < G; ++g)
    for (size_t q = 0; q < queues[g].size(); ++q)
      if (head[g][q] < queues[g][q].size()) {
        int i = queues[g][q][head[g][q]];
        const auto& in = p.programs[g].instrs[i];
        rep += "\n  g" + std::to_string(g) + " " + print_instr(in, i);
        std::string waits;
        for (int a : in.after) if (!done[g][a]) waits += " %" + std::to_string(a);
        if (!waits.empty()) rep += "   waits for" + waits;
        else if (in.op == ir::Op::Send || in.op == ir::Op::Recv) rep += "   waits for its partner (tag " + in.tag + ")";
      }
  return rep;
}

}  // namespace mmoc
