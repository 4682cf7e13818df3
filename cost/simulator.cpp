// Discrete-event simulation of all programs of a Plan at once.
//
// Model:
//  - Each (gpu, stream) is an in-order queue. An instruction starts when its stream predecessor has finished and all of
//    its `after` dependencies have finished. send/recv are a rendezvous: a matching pair (same tag, peers agree) starts
//    together when both are ready and both end after p2p_ms(bytes) over the link of their two physical GPUs
//    (HardwareSpec::link_gbps: p2p_links, else p2p_gbps; the plan's order maps ranks to GPUs), occupying both p2p
//    streams.
//  - Fixed durations: forward/backward from plan.stages[s].fwd_ms/bwd_ms, GPU optim from gpu_adam_ms, gradnorm 0.05 ms,
//    allreduce 2(n-1)/n x p2p of the buffer over its group's n ranks (a ring in rank order over their physical GPUs,
//    at its slowest link: HardwareSpec::ring_gbps), load_batch / free / evict without copy 0;
//    a gradient bucket (wgrad(S)[k/n]) moves its bucket's bytes (ir::transfer_bytes), in its collective and its copy.
//  - Fluid (bandwidth-shared) operations, rates recomputed by max-min fair sharing whenever one starts or ends:
//      prefetch (H2D)        : caps h2d_gbps (per GPU), duplex_gbps (per GPU, shared with D2H), group_link_gbps (H2D
//                              direction of the GPU's host group, shared with the group's other GPUs)
//      evict -> host (D2H)   : caps d2h_gbps, duplex_gbps, group_link_gbps (D2H direction)
//      optim on the CPU      : work = params * adam_bytes_per_param bytes of host memory traffic; cap
//                              host_mem_gbps * min(1, threads / adam_threads_to_saturate()); all CPU optimizers of all
//                              GPUs share host_mem_gbps. One cpu stream per GPU = one thread pool (runs in order).
//  - Memory per GPU follows docs/plan-format.md: persistent gpu-home weights/optimizer state from t=0; ops allocate at
//    start and free at end; fwd_ws/bwd_ws are alive only while the op runs. At equal times frees come before allocations.
//  - Layouts (dp, tp > 1): the programs are one replica's and one tensor-parallel shard's; the other copies run the same
//    programs at the same time, so the host's shared resources are divided among them: host memory bandwidth and the
//    cores by world_size / gpus, a host group's link by its world ranks per simulated rank on it; an offloaded stage's
//    CPU optimizer updates its 1/dp shard (ZeRO). Tensor-parallel collectives are instructions (tp-lowering) like the
//    data-parallel ones: `allreduce part/partgrad` over the tp group's p.tp ranks, a ring of 2(n-1)/n x p2p of the
//    [mbs, seq, hidden] buffer, on comp between the segments of forward/backward; a segment takes 1/(n+1) of the
//    stage's fwd_ms/bwd_ms (n its collectives), which hold only the small collectives left inside (tp_inline_comm_ms).
//  - Deadlock: when nothing runs and instructions remain, the result says so and lists per GPU and stream the first
//    blocked instruction and what it waits for.
#include "cost/simulator.hpp"

#include "ir/exec.hpp"
#include "ir/ops.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <tuple>

namespace mmoc {
using ir::BufKind;
using ir::BufRef;
using ir::Instr;
using ir::Stream;

namespace {

constexpr int kStreams = ir::kNumStreams;

struct Node {
  double start = 0, end = 0;
  int64_t bytes = 0;
  int flow = -1;  // index in flows when fluid
};

struct Flow {
  int gpu = 0, instr = 0;
  double remaining = 0;  // bytes
  double rate = 0;       // bytes per ms
  std::vector<int> res;  // resource indices
  bool active = true;
};

// A buffer an instruction reads that an instruction of another program (or earlier in its own) produces, in plans
// whose transfers are not explicit yet (SimOptions::implicit_transfers).
struct Producer {
  int gpu = 0, instr = 0;
  double delay_ms = 0;  // the transfer to this GPU (0 on the same GPU)
};

struct Sim {
  const ir::Plan& p;
  const HardwareSpec& hw;
  const ModelSpec& model;
  SimOptions opt;
  CostModel cost;
  ir::Dispatch d;  // queues, deps, rendezvous partners (ir/exec.hpp)
  int G = 0;
  std::vector<std::vector<Node>> nodes;  // [gpu][instr]
  std::vector<std::vector<std::vector<Producer>>> producers;  // [gpu][instr], implicit transfers only
  std::vector<Flow> flows;
  std::vector<double> res_cap;  // bytes/ms
  // resource index helpers
  int r_h2d(int g) const { return 3 * g; }
  int r_d2h(int g) const { return 3 * g + 1; }
  int r_duplex(int g) const { return 3 * g + 2; }
  int r_group_up(int grp) const { return 3 * G + 2 * grp; }
  int r_group_down(int grp) const { return 3 * G + 2 * grp + 1; }
  int r_host_mem = 0;
  int cpu_threads = 1;
  // NVMe tier (docs/nvme-tier.md): the node's reads, its writes, and both together. An object is striped over the
  // plan's paths by nvme_weights, so a transfer runs at min over devices of (device bandwidth / its share of the
  // object); paths with the same device (hw.storage) share it. Reads and writes of one disk together are capped at
  // its faster direction. Paths the hardware file has not measured: kTierDefaultGbps.
  int r_tier_rd = -1, r_tier_wr = -1, r_tier_any = -1;
  static constexpr double kTierDefaultGbps = 2.0;
  void setup_tier() {
    if (p.nvme.empty()) return;
    const size_t n = p.nvme.size();
    double tot = 0;
    std::vector<double> w(n, 1.0);
    for (size_t i = 0; i < n && i < p.nvme_weights.size(); ++i) w[i] = p.nvme_weights[i];
    for (double x : w) tot += x;
    std::map<std::string, std::tuple<double, double, double>> dev;  // device -> (share, read, write)
    for (size_t i = 0; i < n; ++i) {
      double rd = kTierDefaultGbps, wr = kTierDefaultGbps;
      std::string key = "path:" + p.nvme[i];
      for (const auto& sp : hw.storage)
        if (sp.path == p.nvme[i]) {
          if (sp.read_gbps > 0) rd = sp.read_gbps;
          if (sp.write_gbps > 0) wr = sp.write_gbps;
          if (!sp.device.empty()) key = "dev:" + sp.device;
        }
      auto& e = dev[key];
      std::get<0>(e) += tot > 0 ? w[i] / tot : 1.0 / n;
      std::get<1>(e) = std::max(std::get<1>(e), rd);
      std::get<2>(e) = std::max(std::get<2>(e), wr);
    }
    double rd = std::numeric_limits<double>::infinity(), wr = rd, any = rd;
    for (const auto& [k, e] : dev) {
      const double f = std::max(std::get<0>(e), 1e-12);
      rd = std::min(rd, std::get<1>(e) / f);
      wr = std::min(wr, std::get<2>(e) / f);
      any = std::min(any, std::max(std::get<1>(e), std::get<2>(e)) / f);
    }
    r_tier_rd = (int)res_cap.size();
    res_cap.push_back(rd * 1e6);  // GB/s -> bytes/ms
    r_tier_wr = (int)res_cap.size();
    res_cap.push_back(wr * 1e6);
    r_tier_any = (int)res_cap.size();
    res_cap.push_back(any * 1e6);
  }

  // memory
  std::vector<std::set<BufRef>> present;
  std::vector<int64_t> mem;
  SimResult R;
  double now = 0;

  Sim(const ir::Plan& plan, const HardwareSpec& h, const ModelSpec& m, const SimOptions& o)
      : p(plan), hw(h), model(m), opt(o), cost{m, h}, d(plan, ir::Order::Streams) {}

  void setup() {
    G = (int)p.programs.size();
    nodes.resize(G);
    present.assign(G, {});
    mem.assign(G, 0);
    R.peak_bytes.assign(G, 0);
    R.compute_busy.assign(G, 0);
    R.h2d_util.assign(G, 0);
    R.d2h_util.assign(G, 0);
    R.memory.assign(G, {});
    for (int g = 0; g < G; ++g) nodes[g].resize(p.programs[g].instrs.size());
    // resources
    int ngroups = (int)hw.host_groups.size();
    res_cap.assign(3 * G + 2 * ngroups + 1, 0);
    for (int g = 0; g < G; ++g) {
      res_cap[r_h2d(g)] = cost.h2d_rate();
      res_cap[r_d2h(g)] = cost.d2h_rate();
      res_cap[r_duplex(g)] = cost.duplex_rate();
    }
    // Layouts with dp or tp > 1: the programs are one replica's and one tp shard's; every other copy runs the same
    // program at the same time (symmetry), so shared host resources are split with them: a host group's link among
    // the world ranks on its GPUs (world rank r runs on the plan's GPU ir::physical_gpu, as mmoc-run places it), host memory
    // bandwidth and the host's cores among all world ranks.
    const int W = ir::world_size(p), copies = std::max(1, W / std::max(1, G));
    for (int k = 0; k < ngroups; ++k) {
      int sims = 0, worlds = 0;
      for (int g = 0; g < G; ++g) sims += hw.group_of(phys(g)) == k;
      for (int r = 0; r < W; ++r) worlds += hw.group_of(ir::physical_gpu(p, r)) == k;
      const double share = copies > 1 && sims > 0 ? std::max(1.0, double(worlds) / sims) : 1.0;
      res_cap[r_group_up(k)] = cost.group_link_rate() / share;
      res_cap[r_group_down(k)] = cost.group_link_rate() / share;
    }
    r_host_mem = 3 * G + 2 * ngroups;
    res_cap[r_host_mem] = cost.host_mem_rate() / copies;
    setup_tier();
    cpu_threads = opt.cpu_optim_threads > 0 ? opt.cpu_optim_threads : cost.optim_threads_per_gpu(W);
    if (opt.implicit_transfers) find_producers();
    init_memory();
  }

  // Physical GPU of simulated rank g, the program of pipeline rank g as replica 0's shard 0 runs it (host groups and
  // links are physical; ir::physical_gpu).
  int phys(int g) const { return ir::physical_gpu(p, ir::world_rank(p, g, 0, 0)); }
  // The link between pipeline ranks g and h: the slowest over the replicas and shards, which all send at once (each
  // replica's shard k to the same replica's shard k).
  std::map<std::pair<int, int>, double> pair_gbps_;
  double pair_gbps(int g, int h) {
    auto [it, fresh] = pair_gbps_.try_emplace({g, h}, hw.p2p_gbps);
    if (!fresh) return it->second;
    const int dp = std::max(1, p.dp), tp = std::max(1, p.tp);
    double bw = std::numeric_limits<double>::infinity();
    if (g < 0 || h < 0 || g >= std::max(1, p.gpus) || h >= std::max(1, p.gpus)) return it->second;
    for (int r = 0; r < dp; ++r)
      for (int t = 0; t < tp; ++t)
        bw = std::min(bw, hw.link_gbps(ir::physical_gpu(p, ir::world_rank(p, g, r, t)), ir::physical_gpu(p, ir::world_rank(p, h, r, t))));
    return it->second = bw;
  }
  // The ring a collective of program g on group `name` runs over: the slowest of the concrete groups (ir::rank_group)
  // of every world rank that runs program g (they reduce at the same time), each a ring in rank order
  // (HardwareSpec::ring_gbps of its physical GPUs).
  std::map<std::pair<int, std::string>, double> group_gbps_;
  std::map<std::string, std::vector<int>> groups_;
  double group_gbps(int g, const std::string& name) {
    auto [it, fresh] = group_gbps_.try_emplace({g, name}, hw.p2p_gbps);
    if (!fresh) return it->second;
    if (groups_.empty()) groups_ = ir::process_groups(p);
    double bw = std::numeric_limits<double>::infinity();
    const int W = ir::world_size(p);
    for (int r = 0; r < W; ++r) {
      if (ir::rank_coord(p, r).pipe != g) continue;
      auto gi = groups_.find(ir::rank_group(p, name, r));
      if (gi == groups_.end() || gi->second.size() < 2) continue;
      std::vector<int> gpus;
      for (int m : gi->second) gpus.push_back(ir::physical_gpu(p, m));
      bw = std::min(bw, hw.ring_gbps(gpus));
    }
    if (bw < std::numeric_limits<double>::infinity()) it->second = bw;
    return it->second;
  }

  // Implicit transfers: each buffer an instruction requires or frees waits for the instruction that allocates it;
  // from another GPU it also takes the p2p time of its bytes (unbounded buffering, no contention).
  void find_producers() {
    std::map<BufRef, std::pair<int, int>> made;
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < (int)p.programs[g].instrs.size(); ++i)
        for (const ir::BufEffect& e : ir::effects(p, p.programs[g].instrs[i]))
          if (e.access == ir::Access::Alloc) made.emplace(e.buf, std::make_pair(g, i));
    producers.assign(G, {});
    for (int g = 0; g < G; ++g) {
      producers[g].resize(p.programs[g].instrs.size());
      for (int i = 0; i < (int)p.programs[g].instrs.size(); ++i)
        for (const ir::BufEffect& e : ir::effects(p, p.programs[g].instrs[i])) {
          if (e.access != ir::Access::Require && e.access != ir::Access::Free) continue;
          auto it = made.find(e.buf);
          if (it == made.end()) continue;
          auto [pg, pi] = it->second;
          producers[g][i].push_back({pg, pi, pg == g ? 0.0 : cost.p2p_ms(p.buffer_bytes(e.buf), pair_gbps(pg, g))});
        }
    }
  }
  // When the implicit inputs of (g, i) are on its GPU: +inf while a producer has not finished.
  double inputs_at(int g, int i) const {
    double t = 0;
    if (!opt.implicit_transfers) return t;
    for (const Producer& pr : producers[g][i]) {
      if (!d.finished(pr.gpu, pr.instr)) return std::numeric_limits<double>::infinity();
      t = std::max(t, nodes[pr.gpu][pr.instr].end + pr.delay_ms);
    }
    return t;
  }

  const ir::Stage* stage(int s) const { return s >= 0 && s < (int)p.stages.size() ? &p.stages[s] : nullptr; }
  int64_t bytes_of(const BufRef& b) const { return p.buffer_bytes(b); }

  void record_mem(int g) {
    R.peak_bytes[g] = std::max(R.peak_bytes[g], mem[g]);
    auto& tl = R.memory[g];
    if (tl.empty() || tl.back().second != mem[g]) tl.push_back({now, mem[g]});
  }
  void alloc(int g, const BufRef& b) {
    if (present[g].insert(b).second) mem[g] += bytes_of(b);
  }
  void release(int g, const BufRef& b) {
    if (present[g].erase(b)) mem[g] -= bytes_of(b);
  }

  void init_memory() {
    for (int g = 0; g < G; ++g) {
      for (const BufRef& b : ir::persistent_buffers(p, g)) alloc(g, b);
      record_mem(g);
    }
  }

  // ---- starting and finishing: memory follows the op table's effects (allocations at the start, frees at the end,
  // the workspace while it runs); the simulator takes a plan as it is (an absent buffer is not an error here) ----
  void on_start(int g, int i) {
    const ir::Effects e = ir::effects(p, p.programs[g].instrs[i]);
    for (const ir::BufEffect& x : e)
      if (x.access == ir::Access::Alloc || x.access == ir::Access::AllocIfAbsent) alloc(g, x.buf);
    mem[g] += e.transient;
    record_mem(g);
  }
  void on_end(int g, int i) {
    const ir::Effects e = ir::effects(p, p.programs[g].instrs[i]);
    mem[g] -= e.transient;
    for (const ir::BufEffect& x : e)
      if (x.access == ir::Access::Free || x.access == ir::Access::FreeIfPresent) release(g, x.buf);
    record_mem(g);
  }

  // Ready now: at the head of its idle stream, its deps done, and its implicit inputs arrived.
  bool ready(int g, int i) const { return d.ready(g, i) && inputs_at(g, i) <= now; }

  // duration for fixed ops; returns <0 when the op is fluid (then sets flow up)
  double fixed_duration(int g, int i, int64_t& bytes) {
    const Instr& in = p.programs[g].instrs[i];
    bytes = ir::transfer_bytes(p, in);
    const ir::Stage* st = stage(in.stage);
    if (opt.unit_costs) return 1.0;
    switch (ir::op_info(in.op).timing) {
      case ir::Timing::StageForward:
      case ir::Timing::StageBackward: {  // a tensor-parallel segment: its share of the stage's time
        const double t = !st ? 0 : ir::op_info(in.op).timing == ir::Timing::StageForward ? st->fwd_ms : st->bwd_ms;
        return in.seg >= 0 ? t / (ir::tp_collectives(p, in.stage, in.op) + 1) : t;
      }
      case ir::Timing::PeerToPeer: return cost.p2p_ms(bytes, pair_gbps(g, in.peer));  // the link of the two GPUs
      case ir::Timing::Collective: {  // a ring over the group's n ranks moves 2(n-1)/n of the buffer per rank
        const int n = in.group == "world"               ? ir::world_size(p)
                      : in.group.rfind("dp.", 0) == 0   ? std::max(1, p.dp)
                      : in.group.rfind("tp.", 0) == 0   ? std::max(1, p.tp)
                                                        : 2;
        return n <= 1 ? 0 : cost.allreduce_ms(bytes, group_gbps(g, in.group)) * (n - 1) / n;  // its slowest link
      }
      case ir::Timing::GradNorm: return cost.gradnorm_ms();
      case ir::Timing::HostToDevice:
      case ir::Timing::DeviceToHost: return bytes > 0 ? -1 : 0;
      case ir::Timing::TierRead:
      case ir::Timing::TierWrite: return bytes > 0 && r_tier_any >= 0 ? -1 : 0;
      case ir::Timing::Optimizer:
        if (in.stream == Stream::Cpu || (st && st->optim == ir::OptimPlace::Cpu)) return st && st->params > 0 ? -1 : 0;
        return cost.gpu_adam_ms(st ? st->params : 0);
      case ir::Timing::Instant: return 0;
    }
    return 0;
  }

  void start(int g, int i) {
    Node& n = nodes[g][i];
    const Instr& in = p.programs[g].instrs[i];
    n.start = now;
    d.start(g, i);
    double dur = fixed_duration(g, i, n.bytes);
    if (dur >= 0) {
      n.end = now + dur;
    } else {
      Flow f;
      f.gpu = g;
      f.instr = i;
      int pg = phys(g);
      int grp = hw.group_of(pg);
      const ir::Timing timing = ir::op_info(in.op).timing;
      if (timing == ir::Timing::HostToDevice) {
        f.remaining = (double)n.bytes;
        f.res = {r_h2d(g), r_duplex(g)};
        if (grp >= 0) f.res.push_back(r_group_up(grp));
      } else if (timing == ir::Timing::DeviceToHost) {
        f.remaining = (double)n.bytes;
        f.res = {r_d2h(g), r_duplex(g)};
        if (grp >= 0) f.res.push_back(r_group_down(grp));
      } else if (timing == ir::Timing::TierRead || timing == ir::Timing::TierWrite) {
        f.remaining = (double)n.bytes;
        f.res = {timing == ir::Timing::TierRead ? r_tier_rd : r_tier_wr, r_tier_any};
      } else {  // CPU optimizer
        const ir::Stage* st = stage(in.stage);
        // dp > 1: the data-parallel pass shards an offloaded stage's CPU optimizer over the replicas (ZeRO); a bucket
        // of it (optim S[k/n]) updates each replica's part of the bucket: 1/dp of its parameters on average (the
        // buckets are interleaved over the shards, ir::bucket_range)
        int64_t params = st->params;
        if (in.buckets > 1) {
          const auto [b, e] = ir::bucket_range(st->params, in.bucket, in.buckets, ir::bucket_shards(p, in.stage));
          params = e - b;
        }
        f.remaining = cost.adam_traffic_bytes(p.dp > 1 ? (params + p.dp - 1) / p.dp : params);
        // private cap: this GPU's thread pool
        res_cap.push_back(cost.adam_pool_rate(cpu_threads));
        f.res = {r_host_mem, (int)res_cap.size() - 1};
      }
      n.flow = (int)flows.size();
      n.end = std::numeric_limits<double>::infinity();
      flows.push_back(f);
    }
    on_start(g, i);
  }

  void finish(int g, int i) {
    Node& n = nodes[g][i];
    const Instr& in = p.programs[g].instrs[i];
    n.end = now;
    d.finish(g, i);
    if (n.flow >= 0) flows[n.flow].active = false;
    on_end(g, i);
    SimInterval iv;
    iv.gpu = g;
    iv.instr = i;
    iv.stream = in.stream;
    iv.lane = (int)in.stream;
    iv.start_ms = n.start;
    iv.end_ms = n.end;
    iv.bytes = n.bytes;
    R.intervals.push_back(iv);
    if (in.stream == Stream::Comp) R.compute_busy[g] += n.end - n.start;
    const ir::Timing timing = ir::op_info(in.op).timing;
    if (timing == ir::Timing::HostToDevice) R.h2d_util[g] += (double)n.bytes;
    if (timing == ir::Timing::DeviceToHost) R.d2h_util[g] += (double)n.bytes;
    if (timing == ir::Timing::TierRead) R.tier_read_bytes += n.bytes;
    if (timing == ir::Timing::TierWrite) R.tier_write_bytes += n.bytes;
  }

  // Starts whatever can start now. Returns true if something started.
  bool start_ready() {
    bool any = false;
    for (int g = 0; g < G; ++g)
      for (int q = 0; q < kStreams; ++q) {
        const int i = d.head(g, q);
        if (i < 0 || !ready(g, i)) continue;
        if (d.paired(g, i)) {
          auto [pg, pi] = d.partner(g, i);
          if (pg < 0) continue;  // never matched: stays blocked (reported as deadlock)
          if (!ready(pg, pi)) continue;
          start(g, i);
          start(pg, pi);
          // both end together: the longer of the two (same bytes by construction)
          double e = std::max(nodes[g][i].end, nodes[pg][pi].end);
          nodes[g][i].end = nodes[pg][pi].end = e;
        } else {
          start(g, i);
        }
        any = true;
      }
    return any;
  }

  // Finishes fixed ops ending at or before now. Returns true if any finished.
  bool finish_due() {
    bool any = false;
    for (int g = 0; g < G; ++g)
      for (int q = 0; q < kStreams; ++q) {
        int i = d.running(g, q);
        if (i < 0) continue;
        Node& n = nodes[g][i];
        if (n.flow < 0 && n.end <= now + 1e-12) {
          finish(g, i);
          any = true;
        }
      }
    return any;
  }

  // Max-min fair rates of active flows (progressive filling).
  void compute_rates() {
    std::vector<int> act;
    for (size_t f = 0; f < flows.size(); ++f)
      if (flows[f].active) {
        act.push_back((int)f);
        flows[f].rate = 0;
      }
    if (act.empty()) return;
    std::vector<double> rem = res_cap;
    std::vector<char> frozen(flows.size(), 0);
    size_t left = act.size();
    while (left > 0) {
      std::vector<int> users(rem.size(), 0);
      for (int f : act)
        if (!frozen[f])
          for (int r : flows[f].res) users[r]++;
      double delta = std::numeric_limits<double>::infinity();
      for (size_t r = 0; r < rem.size(); ++r)
        if (users[r] > 0) delta = std::min(delta, std::max(0.0, rem[r]) / users[r]);
      if (!std::isfinite(delta)) break;
      for (int f : act)
        if (!frozen[f]) {
          flows[f].rate += delta;
          for (int r : flows[f].res) rem[r] -= delta;
        }
      for (int f : act) {
        if (frozen[f]) continue;
        for (int r : flows[f].res)
          if (rem[r] <= 1e-9 * std::max(1.0, res_cap[r])) {
            frozen[f] = 1;
            --left;
            break;
          }
      }
    }
  }

  void run() {
    setup();
    const double inf = std::numeric_limits<double>::infinity();
    while (true) {
      // settle everything that happens at `now`: completions first, then starts, until nothing changes
      bool changed = true;
      while (changed) {
        changed = finish_due();
        if (start_ready()) changed = true;
      }
      if (d.remaining() == 0) break;
      compute_rates();
      double next = inf;
      for (int g = 0; g < G; ++g)
        for (int q = 0; q < kStreams; ++q) {
          int i = d.running(g, q);
          if (i >= 0 && nodes[g][i].flow < 0) next = std::min(next, nodes[g][i].end);
          // a head whose only wait is an implicit transfer in flight
          const int h = d.head(g, q);
          if (opt.implicit_transfers && h >= 0 && d.ready(g, h)) {
            const double t = inputs_at(g, h);
            if (t > now && std::isfinite(t)) next = std::min(next, t);
          }
        }
      for (auto& f : flows)
        if (f.active && f.rate > 0) next = std::min(next, now + f.remaining / f.rate);
      if (!std::isfinite(next)) {  // nothing running and nothing can start
        R.deadlock = true;
        R.deadlock_report = deadlock_report();
        break;
      }
      double dt = std::max(0.0, next - now);
      now = next;
      for (size_t k = 0; k < flows.size(); ++k) {
        Flow& f = flows[k];
        if (!f.active) continue;
        f.remaining -= f.rate * dt;
        if (f.remaining <= 1e-6 || (f.rate > 0 && f.remaining / f.rate <= 1e-9)) finish(f.gpu, f.instr);
      }
    }
    finalize();
  }

  std::string describe(int g, int i) const { return "g" + std::to_string(g) + " " + ir::print_instr(p.programs[g].instrs[i], i); }

  std::string blocked_reason(int g, int i) const {
    const Instr& in = p.programs[g].instrs[i];
    std::vector<std::string> why;
    for (int a : in.after) {
      if (a < 0 || a >= (int)nodes[g].size() || a == i) {
        why.push_back("invalid dependency %" + std::to_string(a));
        continue;
      }
      if (!d.finished(g, a)) why.push_back("dependency " + ir::print_instr(p.programs[g].instrs[a], a) + " (not done)");
    }
    if (opt.implicit_transfers)
      for (const Producer& pr : producers[g][i])
        if (!d.finished(pr.gpu, pr.instr)) why.push_back("input from " + describe(pr.gpu, pr.instr) + " (not done)");
    if (d.paired(g, i)) {
      auto [pg, pi] = d.partner(g, i);
      const char* other = ir::op_info(in.op).sync == ir::Sync::PairSource ? "recv" : "send";
      if (pg < 0) {
        why.push_back(std::string("no matching ") + other + " on g" + std::to_string(in.peer) + " with tag " +
                      (in.tag.empty() ? (in.buf ? in.buf->str() : std::string()) : in.tag));
      } else if (!ready(pg, pi)) {
        std::string w = std::string("matching ") + other + " " + describe(pg, pi);
        const int q = d.queue_of(pg, pi);
        if (d.head(pg, q) != pi || d.busy(pg, q)) {
          const int h = d.head(pg, q);
          w += " (not reached: its stream is blocked at ";
          w += h >= 0 ? ir::print_instr(p.programs[pg].instrs[h], h) : std::string("end");
          w += ")";
        } else {
          w += " (its dependencies are not done)";
        }
        why.push_back(w);
      }
    }
    std::string s;
    for (auto& w : why) s += (s.empty() ? "" : "; ") + w;
    return s.empty() ? "nothing (internal error)" : s;
  }

  std::string deadlock_report() const {
    std::ostringstream os;
    os << "deadlock at t=" << now << " ms: " << d.remaining() << " instruction(s) cannot start\n";
    for (int g = 0; g < G; ++g)
      for (int q = 0; q < kStreams; ++q) {
        const int i = d.head(g, q);
        if (i < 0) continue;
        os << "  g" << g << " @" << ir::to_string((Stream)q) << ": " << ir::print_instr(p.programs[g].instrs[i], i)
           << "\n      waits for: " << blocked_reason(g, i) << "\n";
      }
    return os.str();
  }

  void finalize() {
    R.step_ms = now;
    double step = std::max(now, 1e-12);
    double tokens = (double)p.microbatches * p.micro_batch_size * p.seq_len * std::max(1, p.dp);
    R.tokens_per_s = R.deadlock ? 0.0 : tokens / (step / 1e3);
    double busy_sum = 0;
    for (int g = 0; g < G; ++g) {
      R.compute_busy[g] /= step;
      busy_sum += R.compute_busy[g];
      R.h2d_util[g] /= cost.h2d_rate() * step;
      R.d2h_util[g] /= cost.d2h_rate() * step;
    }
    R.bubble = G > 0 ? 1.0 - busy_sum / G : 0.0;
    std::sort(R.intervals.begin(), R.intervals.end(), [](const SimInterval& a, const SimInterval& b) {
      return std::tie(a.start_ms, a.gpu, a.instr) < std::tie(b.start_ms, b.gpu, b.instr);
    });
  }
};

}  // namespace

SimResult simulate(const ir::Plan& plan, const HardwareSpec& hw, const ModelSpec& model, const SimOptions& opt) {
  if (ir::num_bodies(plan) == 2) {  // alternating update order: each step body on its own, the step is their mean
    SimResult e = simulate(ir::step_body(plan, 0), hw, model, opt), o = simulate(ir::step_body(plan, 1), hw, model, opt);
    if (o.deadlock && !e.deadlock) { e.deadlock = true; e.deadlock_report = "odd step: " + o.deadlock_report; }
    e.even_step_ms = e.step_ms;
    e.odd_step_ms = o.step_ms;
    e.even_tier_bytes = e.tier_read_bytes + e.tier_write_bytes;
    e.odd_tier_bytes = o.tier_read_bytes + o.tier_write_bytes;
    e.step_ms = (e.step_ms + o.step_ms) / 2;
    if (e.even_step_ms > 0) e.tokens_per_s *= e.even_step_ms / e.step_ms;
    e.tier_read_bytes = (e.tier_read_bytes + o.tier_read_bytes) / 2;
    e.tier_write_bytes = (e.tier_write_bytes + o.tier_write_bytes) / 2;
    for (size_t g = 0; g < e.peak_bytes.size() && g < o.peak_bytes.size(); ++g) e.peak_bytes[g] = std::max(e.peak_bytes[g], o.peak_bytes[g]);
    return e;
  }
  Sim sim(plan, hw, model, opt);
  sim.run();
  return std::move(sim.R);
}

std::string trace_json(const ir::Plan& p, const SimResult& r) {
  using nlohmann::json;
  json ev = json::array();
  const int G = (int)p.programs.size();
  for (int g = 0; g < G; ++g) {
    ev.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", g}, {"tid", 0}, {"args", {{"name", "GPU " + std::to_string(g)}}}});
    ev.push_back({{"ph", "M"}, {"name", "process_sort_index"}, {"pid", g}, {"tid", 0}, {"args", {{"sort_index", g}}}});
    for (int l = 0; l < kStreams; ++l)
      if (l < 5 || std::any_of(p.programs[g].instrs.begin(), p.programs[g].instrs.end(), [&](const Instr& in) { return (int)in.stream == l; }))
        ev.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", g}, {"tid", l}, {"args", {{"name", ir::to_string((ir::Stream)l)}}}});
  }
  for (const auto& iv : r.intervals) {
    if (iv.gpu < 0 || iv.gpu >= G || iv.instr < 0 || iv.instr >= (int)p.programs[iv.gpu].instrs.size()) continue;
    const Instr& in = p.programs[iv.gpu].instrs[iv.instr];
    std::string deps;
    for (int d : in.after) deps += (deps.empty() ? "%" : ",%") + std::to_string(d);
    json args = {{"op", ir::to_string(in.op)}, {"stage", in.stage}, {"mb", in.mb}, {"bytes", iv.bytes}, {"instr", iv.instr}, {"deps", deps}};
    if (in.buf) args["buf"] = in.buf->str();
    ev.push_back({{"ph", "X"},
                  {"name", ir::print_op(in)},
                  {"cat", ir::to_string(in.op)},
                  {"pid", iv.gpu},
                  {"tid", iv.lane},
                  {"ts", iv.start_ms * 1e3},
                  {"dur", (iv.end_ms - iv.start_ms) * 1e3},
                  {"args", args}});
  }
  for (int g = 0; g < (int)r.memory.size(); ++g)
    for (auto& [t, b] : r.memory[g]) ev.push_back({{"ph", "C"}, {"name", "mem"}, {"pid", g}, {"ts", t * 1e3}, {"args", {{"bytes", b}}}});
  json meta = {{"source", "predicted"},
               {"budget_bytes", p.budget_bytes},
               {"step_s", r.step_ms / 1e3},
               {"tokens_per_s", r.tokens_per_s},
               {"gpus", G},
               {"peak_bytes", r.peak_bytes},
               {"schedule", p.schedule},
               {"hardware", p.hardware},
               {"deadlock", r.deadlock}};
  json root = {{"traceEvents", ev}, {"displayTimeUnit", "ms"}, {"metadata", meta}};
  return root.dump();
}

void annotate_prediction(ir::Plan& plan, const SimResult& r) {
  ir::Predicted pr;
  if (plan.predicted) pr.bound_bytes = plan.predicted->bound_bytes;
  pr.step_s = r.step_ms / 1e3;
  pr.tokens_per_s = r.tokens_per_s;
  pr.bubble = r.bubble;
  pr.peak_bytes = r.peak_bytes;
  plan.predicted = pr;
}

}  // namespace mmoc
