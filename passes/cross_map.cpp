// cross-map: pipeline ranks -> physical GPUs, from the host topology. The contract
// below is the pass's documentation (docs/passes.md is generated from it).
#include <algorithm>
#include <functional>
#include <boost/graph/adjacency_list.hpp>
#include <boost/graph/connected_components.hpp>
#include <numeric>

#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kCrossMapContract = R"md(Pipeline ranks -> physical GPUs, from the host topology.

- **Requires**: `plan.gpus`, the hardware's host groups.
- **Guarantees**: `plan.gpu_order[rank]` is a physical GPU, a permutation of distinct GPUs of the machine.
- **Decides**: the topology is a graph (Boost.Graph) whose edges join GPUs that share a host link (PCIe switch / root
  complex); its connected components are the link groups. Mobius's rule: minimise
  sum_{i<j} shared(a_i, a_j) / (j - i) over orders a, where shared is the size of the link group when two GPUs share
  one and 1 otherwise, so consecutive ranks (whose host transfers overlap in time) sit under different links. Exact
  search over all orders (and subsets, when fewer GPUs than the machine has are used) up to 8 GPUs; greedy with
  pairwise-swap improvement beyond. Ties go to the lexicographically smallest order, so where no link is shared the
  identity order is kept. `cross_map: off` keeps 0..N-1.
- **Recovers from the plan**: nothing beyond `order`.
)md";

namespace {
struct Topology { std::vector<int> group; std::vector<int> group_size; };

Topology topology(const HardwareSpec& hw) {
  using G = boost::adjacency_list<boost::vecS, boost::vecS, boost::undirectedS>;
  G g(hw.gpus);
  for (const auto& grp : hw.host_groups)
    for (size_t i = 1; i < grp.size(); ++i)
      if (grp[0] < hw.gpus && grp[i] < hw.gpus) boost::add_edge(grp[0], grp[i], g);
  Topology t;
  t.group.assign(hw.gpus, 0);
  int ncomp = boost::connected_components(g, t.group.data());
  t.group_size.assign(ncomp, 0);
  for (int x : t.group) t.group_size[x]++;
  return t;
}

double order_cost(const std::vector<int>& a, const Topology& t) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = i + 1; j < a.size(); ++j) {
      int gi = t.group[a[i]], gj = t.group[a[j]];
      double shared = gi == gj ? t.group_size[gi] : 1.0;
      s += shared / double(j - i);
    }
  return s;
}
}  // namespace

std::vector<int> cross_map_order(const HardwareSpec& hw, int n) {
  if (n > hw.gpus)
    throw InputError("--gpus " + std::to_string(n) + " but hardware " + hw.name + " has " + std::to_string(hw.gpus) + " GPUs");
  Topology t = topology(hw);
  std::vector<int> best(n);
  std::iota(best.begin(), best.end(), 0);
  double best_cost = order_cost(best, t);
  const double eps = 1e-12;
  if (hw.gpus <= 8) {
    // all ordered selections of n GPUs out of hw.gpus, in lexicographic order
    std::vector<int> all(hw.gpus);
    std::iota(all.begin(), all.end(), 0);
    std::vector<int> cur;
    std::vector<bool> used(hw.gpus, false);
    std::function<void()> rec = [&]() {
      if ((int)cur.size() == n) {
        double c = order_cost(cur, t);
        if (c < best_cost - eps) { best_cost = c; best = cur; }
        return;
      }
      for (int x = 0; x < hw.gpus; ++x)
        if (!used[x]) { used[x] = true; cur.push_back(x); rec(); cur.pop_back(); used[x] = false; }
    };
    rec();
  } else {
    bool improved = true;
    while (improved) {
      improved = false;
      for (int i = 0; i < n; ++i)
        for (int j = i + 1; j < n; ++j) {
          std::swap(best[i], best[j]);
          double c = order_cost(best, t);
          if (c < best_cost - eps) { best_cost = c; improved = true; }
          else std::swap(best[i], best[j]);
        }
    }
  }
  return best;
}

double cross_map_cost(const HardwareSpec& hw, const std::vector<int>& order) { return order_cost(order, topology(hw)); }

void cross_map_pass(PassContext& c) {
  auto& p = c.plan;
  if (p.gpus > c.hw.gpus)
    throw InputError("--gpus " + std::to_string(p.gpus) + " but hardware " + c.hw.name + " has only " +
                     std::to_string(c.hw.gpus) + " GPUs");
  if (c.job.cross_map == "off") {
    p.gpu_order.resize(p.gpus);
    std::iota(p.gpu_order.begin(), p.gpu_order.end(), 0);
    return;
  }
  p.gpu_order = cross_map_order(c.hw, p.gpus);
  std::string s;
  for (int x : p.gpu_order) s += (s.empty() ? "" : ",") + std::to_string(x);
  c.notes.push_back("cross-map: rank -> GPU order " + s);
}

}  // namespace mmoc
