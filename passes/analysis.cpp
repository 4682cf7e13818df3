#include "passes/analysis.hpp"

#include <functional>
#include <map>
#include <numeric>
#include <queue>
#include <set>

namespace mmoc {

using ir::BufKind;
using ir::BufRef;
using ir::Op;

MemoryEvents memory_events(const ir::Plan& p) {
  MemoryEvents ev;
  const int last = p.num_stages() - 1;
  ev.transient.resize(p.programs.size());
  for (const auto& d : p.buffers)
    if (d.home == ir::Tier::Gpu && (d.kind == BufKind::W || d.kind == BufKind::Opt) && d.stage >= 0 &&
        d.stage < p.num_stages())
      ev.lifetimes.push_back({p.stages[d.stage].gpu, {d.kind, d.stage, -1}, d.bytes, -1, -1});
  for (const auto& prog : p.programs) {
    const int g = prog.gpu;
    std::map<BufRef, size_t> live;  // -> lifetime index
    for (const auto& lt : ev.lifetimes)
      if (lt.gpu == g && lt.alloc == -1) live[lt.buf] = &lt - &ev.lifetimes[0];
    ev.transient[g].assign(prog.instrs.size(), 0);
    auto where = [&](int i) { return "g" + std::to_string(g) + " %" + std::to_string(i) + ": "; };
    auto alloc = [&](int i, BufRef b) {
      if (live.count(b)) throw ir::VerifyError(where(i) + b.str() + " allocated while already present");
      live[b] = ev.lifetimes.size();
      ev.lifetimes.push_back({g, b, p.buffer_bytes(b), i, -1});
    };
    auto release = [&](int i, BufRef b) {
      auto it = live.find(b);
      if (it == live.end()) throw ir::VerifyError(where(i) + b.str() + " freed but not present");
      ev.lifetimes[it->second].free = i;
      live.erase(it);
    };
    auto need = [&](int i, BufRef b) {
      if (!live.count(b)) throw ir::VerifyError(where(i) + "needs " + b.str() + " on the GPU, but it is not present");
    };
    for (int i = 0; i < (int)prog.instrs.size(); ++i) {
      const auto& in = prog.instrs[i];
      switch (in.op) {
        case Op::LoadBatch: alloc(i, {BufKind::Batch, -1, in.mb}); break;
        case Op::Prefetch: alloc(i, *in.buf); break;
        case Op::Recv: alloc(i, *in.buf); break;
        case Op::Send: need(i, *in.buf); break;
        case Op::AllReduce: need(i, *in.buf); break;
        case Op::Evict: case Op::Free: release(i, *in.buf); break;
        case Op::Forward: {
          const auto& st = p.stages[in.stage];
          need(i, {BufKind::W, in.stage, -1});
          if (in.stage == 0 || in.stage == last) need(i, {BufKind::Batch, -1, in.mb});
          if (in.stage > 0) need(i, {BufKind::Act, in.stage - 1, in.mb});
          if (in.stage < last) alloc(i, {BufKind::Act, in.stage, in.mb});
          alloc(i, {BufKind::Stash, in.stage, in.mb});
          ev.transient[g][i] = st.fwd_ws;
          break;
        }
        case Op::Backward: {
          const auto& st = p.stages[in.stage];
          need(i, {BufKind::W, in.stage, -1});
          if (in.stage == 0 || in.stage == last) need(i, {BufKind::Batch, -1, in.mb});
          if (in.stage < last) need(i, {BufKind::Grad, in.stage, in.mb});
          if (in.stage > 0) alloc(i, {BufKind::Grad, in.stage - 1, in.mb});
          if (!live.count({BufKind::WGrad, in.stage, -1})) alloc(i, {BufKind::WGrad, in.stage, -1});
          release(i, {BufKind::Stash, in.stage, in.mb});
          if (in.stage > 0) release(i, {BufKind::Act, in.stage - 1, in.mb});
          if (in.stage < last) release(i, {BufKind::Grad, in.stage, in.mb});
          ev.transient[g][i] = st.bwd_ws;
          break;
        }
        case Op::Optim: {
          BufRef wg{BufKind::WGrad, in.stage, -1};
          if (in.stream != ir::Stream::Cpu && live.count(wg)) release(i, wg);
          break;
        }
        case Op::GradNorm: break;
      }
    }
  }
  return ev;
}

bool HappensBefore::hb(int ga, int a, int gb, int b) const {
  int na = node[offset[ga] + a], nb = node[offset[gb] + b];
  if (na == nb) return false;
  return (anc[nb][na >> 6] >> (na & 63)) & 1ULL;
}

HappensBefore happens_before(const ir::Plan& p) {
  HappensBefore h;
  int total = 0;
  for (const auto& prog : p.programs) { h.offset.push_back(total); total += (int)prog.instrs.size(); }
  // union send/recv pairs
  std::vector<int> parent(total);
  std::iota(parent.begin(), parent.end(), 0);
  std::function<int(int)> find = [&](int x) { return parent[x] == x ? x : parent[x] = find(parent[x]); };
  std::map<std::string, int> send_of;
  for (const auto& prog : p.programs)
    for (int i = 0; i < (int)prog.instrs.size(); ++i)
      if (prog.instrs[i].op == Op::Send) send_of[prog.instrs[i].tag] = h.offset[prog.gpu] + i;
  for (const auto& prog : p.programs)
    for (int i = 0; i < (int)prog.instrs.size(); ++i)
      if (prog.instrs[i].op == Op::Recv) {
        auto it = send_of.find(prog.instrs[i].tag);
        if (it != send_of.end()) parent[find(h.offset[prog.gpu] + i)] = find(it->second);
      }
  std::vector<int> id_of_root(total, -1);
  h.node.resize(total);
  for (int x = 0; x < total; ++x) {
    int r = find(x);
    if (id_of_root[r] < 0) id_of_root[r] = h.nodes++;
    h.node[x] = id_of_root[r];
  }
  std::vector<std::set<int>> preds(h.nodes);
  for (const auto& prog : p.programs) {
    std::map<ir::Stream, int> last_on;
    for (int i = 0; i < (int)prog.instrs.size(); ++i) {
      const auto& in = prog.instrs[i];
      int me = h.node[h.offset[prog.gpu] + i];
      auto it = last_on.find(in.stream);
      if (it != last_on.end()) { int pn = h.node[h.offset[prog.gpu] + it->second]; if (pn != me) preds[me].insert(pn); }
      last_on[in.stream] = i;
      for (int a : in.after)
        if (a >= 0 && a < (int)prog.instrs.size()) { int pn = h.node[h.offset[prog.gpu] + a]; if (pn != me) preds[me].insert(pn); }
    }
  }
  // topological order (Kahn)
  std::vector<std::vector<int>> succ(h.nodes);
  std::vector<int> indeg(h.nodes, 0);
  for (int n = 0; n < h.nodes; ++n)
    for (int q : preds[n]) { succ[q].push_back(n); indeg[n]++; }
  std::queue<int> ready;
  for (int n = 0; n < h.nodes; ++n) if (!indeg[n]) ready.push(n);
  const size_t words = (h.nodes + 63) / 64;
  h.anc.assign(h.nodes, std::vector<uint64_t>(words, 0));
  int done = 0;
  while (!ready.empty()) {
    int n = ready.front(); ready.pop();
    ++done;
    for (int q : preds[n]) {
      auto& a = h.anc[n];
      const auto& b = h.anc[q];
      for (size_t w = 0; w < words; ++w) a[w] |= b[w];
      a[q >> 6] |= 1ULL << (q & 63);
    }
    for (int s : succ[n]) if (--indeg[s] == 0) ready.push(s);
  }
  h.cyclic = done != h.nodes;
  return h;
}

}  // namespace mmoc
