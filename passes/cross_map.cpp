// cross-map: world ranks -> physical GPUs, from the host topology and the GPU-to-GPU links. The contract below is the
// pass's documentation (docs/passes.md is generated from it).
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <boost/graph/adjacency_list.hpp>
#include <boost/graph/connected_components.hpp>
#include <map>
#include <numeric>
#include <sstream>

#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kCrossMapContract = R"md(World ranks -> physical GPUs, from the GPU-to-GPU links and the host topology.

- **Requires**: `plan.gpus`, `plan.dp`, `plan.tp`; the hardware's `p2p_links` (else every pair at `p2p_gbps`) and host
  groups.
- **Guarantees**: `plan.gpu_order[r]` is the physical GPU of world rank r (`world_size` entries), distinct GPUs of the
  machine; `mmoc-run` runs rank r on it and the simulator times every send/recv on the link of its two GPUs and every
  collective as a ring over its group's GPUs in rank order, bounded by the ring's slowest link.
- **Decides**: the mapping, by these keys in turn: (1) the tensor-parallel groups' slowest ring links, (2) the
  data-parallel groups', (3) the pipeline neighbours' (pipe p and p+1 of one replica and shard) links — each compared
  as the list of per-group bottlenecks sorted ascending, larger first (the slowest group as fast as it can be, then the
  next); (4) Mobius's host-link rule: the topology is a graph (Boost.Graph) whose edges join GPUs that share a host
  link (PCIe switch / root complex), its connected components the link groups; minimise
  sum_{i<j} w_ij shared(a_i, a_j) over the world ranks' GPUs a, where shared is the size of the link group when two
  GPUs share one and 1 otherwise and w_ij = 1 / |pipe_i - pipe_j|, or 2 for two ranks of the same pipeline rank
  (replicas and shards run the same program at the same time), so ranks whose host transfers overlap in time sit
  under different links (with dp = tp = 1: sum shared / (j - i), consecutive ranks apart, as in Mobius). Exact
  search over all assignments (and subsets, when fewer GPUs than the machine has are used) up to 8 GPUs; greedy with
  pairwise-swap improvement beyond. Ties go to the lexicographically smallest mapping, so with uniform links and no shared host link the
  identity is kept. `cross_map: off` keeps 0..W-1.
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

// The rank groups of a layout whose links the mapping weighs, as world ranks in ring order.
struct LayoutGroups {
  int world = 1;
  std::vector<int> pipe;                     // pipeline rank of each world rank
  std::vector<std::vector<int>> tp, dp, pp;  // tensor-parallel groups, data-parallel groups, pipeline neighbours
};

LayoutGroups layout_groups(int gpus, int dp, int tp) {
  ir::Plan p;
  p.gpus = std::max(1, gpus);
  p.dp = std::max(1, dp);
  p.tp = std::max(1, tp);
  LayoutGroups L;
  L.world = ir::world_size(p);
  for (int r = 0; r < L.world; ++r) L.pipe.push_back(ir::rank_coord(p, r).pipe);
  for (int pi = 0; pi < p.gpus; ++pi)
    for (int d = 0; d < p.dp; ++d)
      for (int t = 0; t < p.tp; ++t) {
        if (t == 0 && p.tp > 1) {
          L.tp.emplace_back();
          for (int k = 0; k < p.tp; ++k) L.tp.back().push_back(ir::world_rank(p, pi, d, k));
        }
        if (d == 0 && p.dp > 1) {
          L.dp.emplace_back();
          for (int k = 0; k < p.dp; ++k) L.dp.back().push_back(ir::world_rank(p, pi, k, t));
        }
        if (pi + 1 < p.gpus) L.pp.push_back({ir::world_rank(p, pi, d, t), ir::world_rank(p, pi + 1, d, t)});
      }
  return L;
}

double order_cost(const std::vector<int>& a, const Topology& t, const std::vector<int>& pipe) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = i + 1; j < a.size(); ++j) {
      int gi = t.group[a[i]], gj = t.group[a[j]];
      double shared = gi == gj ? t.group_size[gi] : 1.0;
      const int d = std::abs(pipe[j] - pipe[i]);
      s += d == 0 ? 2.0 * shared : shared / double(d);  // d = 0: the same program at the same time
    }
  return s;
}

// A mapping's keys (see the contract): per-group ring bottlenecks sorted ascending, then the Mobius cost.
struct Key {
  std::vector<double> tp, dp, pp;
  double mobius = 0;
};

std::vector<double> bottlenecks(const HardwareSpec& hw, const std::vector<std::vector<int>>& groups, const std::vector<int>& a) {
  std::vector<double> v;
  v.reserve(groups.size());
  std::vector<int> gpus;
  for (const auto& g : groups) {
    gpus.clear();
    for (int r : g) gpus.push_back(a[r]);
    v.push_back(hw.ring_gbps(gpus));
  }
  std::sort(v.begin(), v.end());
  return v;
}

// Whether the links matter: some pair differs from p2p_gbps (else every link key ties and only Mobius decides).
bool links_differ(const HardwareSpec& hw) {
  for (const auto& l : hw.p2p_links)
    if (l.gbps != hw.p2p_gbps) return true;
  return false;
}

Key key_of(const HardwareSpec& hw, const Topology& t, const LayoutGroups& L, const std::vector<int>& a, bool links) {
  Key k;
  if (links) {
    k.tp = bottlenecks(hw, L.tp, a);
    k.dp = bottlenecks(hw, L.dp, a);
    k.pp = bottlenecks(hw, L.pp, a);
  }
  k.mobius = order_cost(a, t, L.pipe);
  return k;
}

// +1 when a's bottlenecks are better (larger, the slowest first), -1 when worse, 0 when equal (relative 1e-9).
int compare_links(const std::vector<double>& a, const std::vector<double>& b) {
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double tol = 1e-9 * std::max(std::abs(a[i]), std::abs(b[i]));
    if (a[i] > b[i] + tol) return 1;
    if (a[i] < b[i] - tol) return -1;
  }
  return 0;
}

bool better(const Key& a, const Key& b) {
  for (auto m : {&Key::tp, &Key::dp, &Key::pp})
    if (int c = compare_links(a.*m, b.*m)) return c > 0;
  return a.mobius < b.mobius - 1e-12;
}

std::vector<int> best_mapping(const HardwareSpec& hw, const LayoutGroups& L) {
  const int n = L.world;
  const Topology t = topology(hw);
  const bool links = links_differ(hw);
  std::vector<int> best(n);
  std::iota(best.begin(), best.end(), 0);
  Key best_key = key_of(hw, t, L, best, links);
  if (hw.gpus <= 8) {
    // all ordered selections of n GPUs out of hw.gpus, in lexicographic order
    std::vector<int> cur;
    std::vector<bool> used(hw.gpus, false);
    std::function<void()> rec = [&]() {
      if ((int)cur.size() == n) {
        Key k = key_of(hw, t, L, cur, links);
        if (better(k, best_key)) { best_key = std::move(k); best = cur; }
        return;
      }
      for (int x = 0; x < hw.gpus; ++x)
        if (!used[x]) { used[x] = true; cur.push_back(x); rec(); cur.pop_back(); used[x] = false; }
    };
    rec();
  } else {
    // pairwise swaps between the used GPUs (and, when the links differ, with the unused ones) until none improves
    std::vector<int> slots(hw.gpus);
    std::iota(slots.begin(), slots.end(), 0);
    const int reach = links ? hw.gpus : n;
    bool improved = true;
    while (improved) {
      improved = false;
      for (int i = 0; i < n; ++i)
        for (int j = i + 1; j < reach; ++j) {
          std::swap(slots[i], slots[j]);
          std::vector<int> cand(slots.begin(), slots.begin() + n);
          Key k = key_of(hw, t, L, cand, links);
          if (better(k, best_key)) { best_key = std::move(k); best = cand; improved = true; }
          else std::swap(slots[i], slots[j]);
        }
    }
  }
  return best;
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (int x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}
}  // namespace

std::vector<int> cross_map_layout(const HardwareSpec& hw, int gpus, int dp, int tp) {
  const int64_t W = (int64_t)std::max(1, gpus) * std::max(1, dp) * std::max(1, tp);
  if (W > hw.gpus)
    throw InputError("layout pp x dp x tp = " + std::to_string(gpus) + " x " + std::to_string(dp) + " x " + std::to_string(tp) + " = " +
                     std::to_string(W) + " ranks but hardware " + hw.name + " has " + std::to_string(hw.gpus) + " GPUs");
  // the layout search compiles many candidates of one layout: each mapping is searched once per hardware and layout
  std::ostringstream key;
  key << hw.name << '|' << hw.gpus << '|' << hw.p2p_gbps << '|' << gpus << ',' << dp << ',' << tp << '|';
  for (const auto& l : hw.p2p_links) key << l.a << '-' << l.b << ':' << l.gbps << ';';
  key << '|';
  for (const auto& g : hw.host_groups) key << join(g) << ';';
  thread_local std::map<std::string, std::vector<int>> cache;
  auto it = cache.find(key.str());
  if (it != cache.end()) return it->second;
  std::vector<int> m = best_mapping(hw, layout_groups(gpus, dp, tp));
  if (cache.size() > 256) cache.clear();
  cache.emplace(key.str(), m);
  return m;
}

std::vector<int> cross_map_order(const HardwareSpec& hw, int n) {
  if (n > hw.gpus)
    throw InputError("--gpus " + std::to_string(n) + " but hardware " + hw.name + " has " + std::to_string(hw.gpus) + " GPUs");
  return cross_map_layout(hw, n, 1, 1);
}

double cross_map_cost(const HardwareSpec& hw, const std::vector<int>& order) {
  std::vector<int> pipe(order.size());
  std::iota(pipe.begin(), pipe.end(), 0);
  return order_cost(order, topology(hw), pipe);
}

std::vector<GroupLink> layout_links(const HardwareSpec& hw, const ir::Plan& p) {
  std::vector<GroupLink> out;
  for (const auto& [name, ranks] : ir::process_groups(p)) {
    if (ranks.size() < 2 || name == "world") continue;
    GroupLink g;
    g.name = name;
    for (int r : ranks) g.gpus.push_back(ir::physical_gpu(p, r));
    // a pipeline (pp.r<d>) hands activations to its neighbours: its slowest neighbour link; a group: its ring's
    const bool path = name.rfind("pp.", 0) == 0;
    const size_t links = path ? g.gpus.size() - 1 : g.gpus.size();
    g.gbps = std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < links; ++i) g.gbps = std::min(g.gbps, hw.link_gbps(g.gpus[i], g.gpus[(i + 1) % g.gpus.size()]));
    for (size_t i = 0; i < links; ++i) {  // the kind of the slowest link (the first one at the bottleneck)
      const int a = g.gpus[i], b = g.gpus[(i + 1) % g.gpus.size()];
      if (hw.link_gbps(a, b) == g.gbps) {
        const auto* l = hw.link(a, b);
        g.kind = l && !l->kind.empty() ? l->kind : "";
        break;
      }
    }
    out.push_back(std::move(g));
  }
  return out;
}

std::string describe_layout_links(const HardwareSpec& hw, const ir::Plan& p) {
  std::string s;
  for (const auto& g : layout_links(hw, p)) {
    std::ostringstream os;
    os << g.name << " GPUs " << join(g.gpus) << " " << ir::format_double(g.gbps) << " GB/s";
    if (!g.kind.empty()) os << " (" << g.kind << ")";
    s += (s.empty() ? "" : "; ") + os.str();
  }
  return s;
}

void cross_map_pass(PassContext& c) {
  auto& p = c.plan;
  if (p.gpus > c.hw.gpus)
    throw InputError("--gpus " + std::to_string(p.gpus) + " but hardware " + c.hw.name + " has only " +
                     std::to_string(c.hw.gpus) + " GPUs");
  if (c.job.cross_map == "off") {
    p.gpu_order.resize(ir::world_size(p));
    std::iota(p.gpu_order.begin(), p.gpu_order.end(), 0);
    return;
  }
  p.gpu_order = cross_map_layout(c.hw, p.gpus, p.dp, p.tp);
  c.notes.push_back("cross-map: rank -> GPU order " + join(p.gpu_order));
}

}  // namespace mmoc
