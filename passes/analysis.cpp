#include "passes/analysis.hpp"

#include "ir/exec.hpp"

#include <functional>
#include <map>
#include <numeric>
#include <queue>
#include <set>

namespace mmoc {

using ir::BufKind;
using ir::BufRef;

MemoryEvents memory_events(const ir::Plan& p) {
  MemoryEvents ev;
  ev.transient.resize(p.programs.size());
  // buffers on the GPU all step
  for (const auto& d : p.buffers) {
    const BufRef b{d.kind, d.stage, -1};
    if (d.stage >= 0 && d.stage < p.num_stages() && ir::is_persistent(p, b))
      ev.lifetimes.push_back({p.stages[d.stage].gpu, b, d.bytes, -1, -1});
  }
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
    for (int i = 0; i < (int)prog.instrs.size(); ++i) {
      const ir::Effects e = ir::effects(p, prog.instrs[i]);
      for (const ir::BufEffect& x : e) {
        switch (x.access) {
          case ir::Access::Require:
            if (!live.count(x.buf)) throw ir::VerifyError(where(i) + "needs " + x.buf.str() + " on the GPU, but it is not present");
            break;
          case ir::Access::Alloc: alloc(i, x.buf); break;
          case ir::Access::AllocIfAbsent: if (!live.count(x.buf)) alloc(i, x.buf); break;
          case ir::Access::Free: release(i, x.buf); break;
          case ir::Access::FreeIfPresent: if (live.count(x.buf)) release(i, x.buf); break;
        }
      }
      ev.transient[g][i] = e.transient;
    }
  }
  return ev;
}

bool HappensBefore::hb(int ga, int a, int gb, int b) const {
  int na = node[offset[ga] + a], nb = node[offset[gb] + b];
  if (na == nb) return false;
  return (anc[nb][na >> 6] >> (na & 63)) & 1ULL;
}

HappensBefore happens_before(const ir::Plan& p, bool with_descendants) {
  HappensBefore h;
  int total = 0;
  for (const auto& prog : p.programs) { h.offset.push_back(total); total += (int)prog.instrs.size(); }
  // union send/recv pairs
  std::vector<int> parent(total);
  std::iota(parent.begin(), parent.end(), 0);
  std::function<int(int)> find = [&](int x) { return parent[x] == x ? x : parent[x] = find(parent[x]); };
  const auto partner = ir::pair_partners(p);
  for (int g = 0; g < (int)p.programs.size(); ++g)
    for (int i = 0; i < (int)p.programs[g].instrs.size(); ++i) {
      auto [pg, pi] = partner[g][i];
      if (pg >= 0 && (pg != g || pi != i)) parent[find(h.offset[g] + i)] = find(h.offset[pg] + pi);
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
  std::vector<int> topo;
  topo.reserve(h.nodes);
  while (!ready.empty()) {
    int n = ready.front(); ready.pop();
    ++done;
    topo.push_back(n);
    for (int q : preds[n]) {
      auto& a = h.anc[n];
      const auto& b = h.anc[q];
      for (size_t w = 0; w < words; ++w) a[w] |= b[w];
      a[q >> 6] |= 1ULL << (q & 63);
    }
    for (int s : succ[n]) if (--indeg[s] == 0) ready.push(s);
  }
  h.cyclic = done != h.nodes;
  if (with_descendants && !h.cyclic) {
    h.desc.assign(h.nodes, std::vector<uint64_t>(words, 0));
    for (auto it = topo.rbegin(); it != topo.rend(); ++it) {
      auto& d = h.desc[*it];
      for (int s : succ[*it]) {
        const auto& b = h.desc[s];
        for (size_t w = 0; w < words; ++w) d[w] |= b[w];
        d[s >> 6] |= 1ULL << (s & 63);
      }
    }
  }
  return h;
}

}  // namespace mmoc
