// Discrete-event simulation of all programs of a Plan at once.
//
// Model:
//  - Each (gpu, stream) is an in-order queue. An instruction starts when its stream predecessor has finished and all of
//    its `after` dependencies have finished. send/recv are a rendezvous: a matching pair (same tag, peers agree) starts
//    together when both are ready and both end after p2p_ms(bytes), occupying both p2p streams.
//  - Fixed durations: forward/backward from plan.stages[s].fwd_ms/bwd_ms, GPU optim from gpu_adam_ms, gradnorm 0.05 ms,
//    allreduce 2x p2p of the buffer, load_batch / free / evict without copy 0.
//  - Fluid (bandwidth-shared) operations, rates recomputed by max-min fair sharing whenever one starts or ends:
//      prefetch (H2D)        : caps h2d_gbps (per GPU), duplex_gbps (per GPU, shared with D2H), group_link_gbps (H2D
//                              direction of the GPU's host group, shared with the group's other GPUs)
//      evict -> host (D2H)   : caps d2h_gbps, duplex_gbps, group_link_gbps (D2H direction)
//      optim on the CPU      : work = params * adam_bytes_per_param bytes of host memory traffic; cap
//                              host_mem_gbps * min(1, threads / adam_threads_to_saturate()); all CPU optimizers of all
//                              GPUs share host_mem_gbps. One cpu stream per GPU = one thread pool (runs in order).
//  - Memory per GPU follows docs/plan-format.md: persistent gpu-home weights/optimizer state from t=0; ops allocate at
//    start and free at end; fwd_ws/bwd_ws are alive only while the op runs. At equal times frees come before allocations.
//  - Deadlock: when nothing runs and instructions remain, the result says so and lists per GPU and stream the first
//    blocked instruction and what it waits for.
#include "cost/simulator.hpp"

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
using ir::Op;
using ir::Stream;

namespace {

constexpr int kStreams = 5;
constexpr double kGradNormMs = 0.05;

int stream_index(Stream s) { return (int)s; }  // Comp 0, H2D 1, D2H 2, P2P 3, Cpu 4 = trace lane

enum class St { Waiting, Running, Done };

struct Node {
  St st = St::Waiting;
  double start = 0, end = 0;
  int64_t bytes = 0;
  int flow = -1;      // index in flows when fluid
  int partner_gpu = -1, partner = -1;  // send/recv rendezvous partner
};

struct Flow {
  int gpu = 0, instr = 0;
  double remaining = 0;  // bytes
  double rate = 0;       // bytes per ms
  std::vector<int> res;  // resource indices
  bool active = true;
};

struct Sim {
  const ir::Plan& p;
  const HardwareSpec& hw;
  const ModelSpec& model;
  SimOptions opt;
  CostModel cost;
  int G = 0;
  std::vector<std::vector<Node>> nodes;                 // [gpu][instr]
  std::vector<std::array<std::vector<int>, kStreams>> q; // per gpu per stream: instr indices in order
  std::vector<std::array<size_t, kStreams>> head;
  std::vector<std::array<int, kStreams>> running;       // running instr per stream, -1 none
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

  // memory
  std::vector<std::set<BufRef>> present;
  std::vector<int64_t> mem;
  SimResult R;
  double now = 0;
  size_t remaining_instrs = 0;

  Sim(const ir::Plan& plan, const HardwareSpec& h, const ModelSpec& m, const SimOptions& o)
      : p(plan), hw(h), model(m), opt(o), cost{m, h} {}

  static double gbps_to_bpms(double gbps) { return gbps * 1e6; }  // GB/s -> bytes per ms

  void setup() {
    G = (int)p.programs.size();
    nodes.resize(G);
    q.resize(G);
    head.assign(G, {});
    running.assign(G, {-1, -1, -1, -1, -1});
    present.assign(G, {});
    mem.assign(G, 0);
    R.peak_bytes.assign(G, 0);
    R.compute_busy.assign(G, 0);
    R.h2d_util.assign(G, 0);
    R.d2h_util.assign(G, 0);
    R.memory.assign(G, {});
    for (int g = 0; g < G; ++g) {
      const auto& prog = p.programs[g];
      nodes[g].resize(prog.instrs.size());
      for (size_t i = 0; i < prog.instrs.size(); ++i) q[g][stream_index(prog.instrs[i].stream)].push_back((int)i);
      remaining_instrs += prog.instrs.size();
    }
    // resources
    int ngroups = (int)hw.host_groups.size();
    res_cap.assign(3 * G + 2 * ngroups + 1, 0);
    for (int g = 0; g < G; ++g) {
      res_cap[r_h2d(g)] = gbps_to_bpms(hw.h2d_gbps);
      res_cap[r_d2h(g)] = gbps_to_bpms(hw.d2h_gbps);
      res_cap[r_duplex(g)] = gbps_to_bpms(hw.duplex_gbps);
    }
    for (int k = 0; k < ngroups; ++k) {
      res_cap[r_group_up(k)] = gbps_to_bpms(hw.group_link_gbps);
      res_cap[r_group_down(k)] = gbps_to_bpms(hw.group_link_gbps);
    }
    r_host_mem = 3 * G + 2 * ngroups;
    res_cap[r_host_mem] = gbps_to_bpms(hw.host_mem_gbps);
    cpu_threads = opt.cpu_optim_threads > 0 ? opt.cpu_optim_threads : std::max(1, hw.cpu_cores / std::max(1, G));
    match_send_recv();
    init_memory();
  }

  // Physical GPU of rank g (host groups are physical).
  int phys(int g) const { return g < (int)p.gpu_order.size() ? p.gpu_order[g] : g; }

  void match_send_recv() {
    // key: (src, dst, tag or buffer name) -> queue of instr indices
    std::map<std::tuple<int, int, std::string>, std::vector<int>> sends;
    for (int g = 0; g < G; ++g)
      for (size_t i = 0; i < p.programs[g].instrs.size(); ++i) {
        const Instr& in = p.programs[g].instrs[i];
        if (in.op == Op::Send) sends[{g, in.peer, key_of(in)}].push_back((int)i);
      }
    std::map<std::tuple<int, int, std::string>, size_t> used;
    for (int g = 0; g < G; ++g)
      for (size_t i = 0; i < p.programs[g].instrs.size(); ++i) {
        const Instr& in = p.programs[g].instrs[i];
        if (in.op != Op::Recv) continue;
        auto key = std::make_tuple(in.peer, g, key_of(in));
        auto it = sends.find(key);
        if (it == sends.end()) continue;
        size_t& u = used[key];
        if (u >= it->second.size()) continue;
        int s = it->second[u++];
        if (in.peer < 0 || in.peer >= G) continue;
        nodes[g][i].partner_gpu = in.peer;
        nodes[g][i].partner = s;
        nodes[in.peer][s].partner_gpu = g;
        nodes[in.peer][s].partner = (int)i;
      }
  }
  static std::string key_of(const Instr& in) { return in.tag.empty() ? (in.buf ? in.buf->str() : std::string()) : in.tag; }

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
      for (const auto& s : p.stages) {
        if (s.gpu != g) continue;
        const auto* w = p.find_buffer(BufKind::W, s.id);
        if ((w && w->home == ir::Tier::Gpu) || (!w && s.weights == ir::Residency::Resident)) alloc(g, BufRef{BufKind::W, s.id, -1});
        const auto* o = p.find_buffer(BufKind::Opt, s.id);
        if (o && o->home == ir::Tier::Gpu) alloc(g, BufRef{BufKind::Opt, s.id, -1});
      }
      record_mem(g);
    }
  }

  bool is_last_stage(int s) const { return s == (int)p.stages.size() - 1; }
  bool is_first_stage(int s) const { return s == 0; }

  // ---- starting and finishing ----
  void on_start(int g, int i) {
    const Instr& in = p.programs[g].instrs[i];
    const ir::Stage* st = stage(in.stage);
    switch (in.op) {
      case Op::LoadBatch: alloc(g, BufRef{BufKind::Batch, -1, in.mb}); break;
      case Op::Prefetch:
      case Op::Recv:
        if (in.buf) alloc(g, *in.buf);
        break;
      case Op::Forward:
        if (!is_last_stage(in.stage)) alloc(g, BufRef{BufKind::Act, in.stage, in.mb});
        alloc(g, BufRef{BufKind::Stash, in.stage, in.mb});
        if (st) mem[g] += st->fwd_ws;
        break;
      case Op::Backward:
        if (!is_first_stage(in.stage)) alloc(g, BufRef{BufKind::Grad, in.stage - 1, in.mb});
        alloc(g, BufRef{BufKind::WGrad, in.stage, -1});
        if (st) mem[g] += st->bwd_ws;
        break;
      default: break;
    }
    record_mem(g);
  }
  void on_end(int g, int i) {
    const Instr& in = p.programs[g].instrs[i];
    const ir::Stage* st = stage(in.stage);
    switch (in.op) {
      case Op::Forward:
        if (st) mem[g] -= st->fwd_ws;
        break;
      case Op::Backward:
        if (st) mem[g] -= st->bwd_ws;
        release(g, BufRef{BufKind::Stash, in.stage, in.mb});
        if (!is_first_stage(in.stage)) release(g, BufRef{BufKind::Act, in.stage - 1, in.mb});
        if (!is_last_stage(in.stage)) release(g, BufRef{BufKind::Grad, in.stage, in.mb});
        break;
      case Op::Evict:
      case Op::Free:
        if (in.buf) release(g, *in.buf);
        break;
      case Op::Optim: release(g, BufRef{BufKind::WGrad, in.stage, -1}); break;
      default: break;
    }
    record_mem(g);
  }

  bool deps_done(int g, int i) const {
    for (int d : p.programs[g].instrs[i].after) {
      if (d < 0 || d >= (int)nodes[g].size() || d == i) return false;
      if (nodes[g][d].st != St::Done) return false;
    }
    return true;
  }
  bool at_head(int g, int i) const {
    int s = stream_index(p.programs[g].instrs[i].stream);
    return head[g][s] < q[g][s].size() && q[g][s][head[g][s]] == i && running[g][s] < 0;
  }
  bool ready(int g, int i) const { return at_head(g, i) && deps_done(g, i); }

  // duration for fixed ops; returns <0 when the op is fluid (then sets flow up)
  double fixed_duration(int g, int i, int64_t& bytes) {
    const Instr& in = p.programs[g].instrs[i];
    bytes = 0;
    const ir::Stage* st = stage(in.stage);
    if (in.buf && (in.op == Op::Prefetch || in.op == Op::Send || in.op == Op::Recv || (in.op == Op::Evict && in.to_host) ||
                   in.op == Op::AllReduce))
      bytes = bytes_of(*in.buf);
    if (opt.unit_costs) return 1.0;
    switch (in.op) {
      case Op::Forward: return st ? st->fwd_ms : 0;
      case Op::Backward: return st ? st->bwd_ms : 0;
      case Op::Send:
      case Op::Recv: return cost.p2p_ms(bytes);
      case Op::AllReduce: return 2 * cost.p2p_ms(bytes);
      case Op::GradNorm: return kGradNormMs;
      case Op::Prefetch: return bytes > 0 ? -1 : 0;
      case Op::Evict: return (in.to_host && bytes > 0) ? -1 : 0;
      case Op::Optim:
        if (in.stream == Stream::Cpu || (st && st->optim == ir::OptimPlace::Cpu)) return st && st->params > 0 ? -1 : 0;
        return cost.gpu_adam_ms(st ? st->params : 0);
      default: return 0;
    }
  }

  void start(int g, int i) {
    Node& n = nodes[g][i];
    const Instr& in = p.programs[g].instrs[i];
    int s = stream_index(in.stream);
    n.st = St::Running;
    n.start = now;
    running[g][s] = i;
    double d = fixed_duration(g, i, n.bytes);
    if (d >= 0) {
      n.end = now + d;
    } else {
      Flow f;
      f.gpu = g;
      f.instr = i;
      int pg = phys(g);
      int grp = hw.group_of(pg);
      if (in.op == Op::Prefetch) {
        f.remaining = (double)n.bytes;
        f.res = {r_h2d(g), r_duplex(g)};
        if (grp >= 0) f.res.push_back(r_group_up(grp));
      } else if (in.op == Op::Evict) {
        f.remaining = (double)n.bytes;
        f.res = {r_d2h(g), r_duplex(g)};
        if (grp >= 0) f.res.push_back(r_group_down(grp));
      } else {  // CPU optimizer
        const ir::Stage* st = stage(in.stage);
        f.remaining = (double)st->params * hw.adam_bytes_per_param;
        // private cap: this GPU's thread pool
        res_cap.push_back(gbps_to_bpms(hw.host_mem_gbps) * std::min(1.0, (double)cpu_threads / hw.adam_threads_to_saturate()));
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
    int s = stream_index(in.stream);
    n.st = St::Done;
    n.end = now;
    running[g][s] = -1;
    head[g][s]++;
    --remaining_instrs;
    if (n.flow >= 0) flows[n.flow].active = false;
    on_end(g, i);
    SimInterval iv;
    iv.gpu = g;
    iv.instr = i;
    iv.stream = in.stream;
    iv.lane = s;
    iv.start_ms = n.start;
    iv.end_ms = n.end;
    iv.bytes = n.bytes;
    R.intervals.push_back(iv);
    if (in.stream == Stream::Comp) R.compute_busy[g] += n.end - n.start;
    if (in.op == Op::Prefetch) R.h2d_util[g] += (double)n.bytes;
    if (in.op == Op::Evict && in.to_host) R.d2h_util[g] += (double)n.bytes;
  }

  // Starts whatever can start now. Returns true if something started.
  bool start_ready() {
    bool any = false;
    for (int g = 0; g < G; ++g)
      for (int s = 0; s < kStreams; ++s) {
        if (running[g][s] >= 0 || head[g][s] >= q[g][s].size()) continue;
        int i = q[g][s][head[g][s]];
        if (!deps_done(g, i)) continue;
        const Instr& in = p.programs[g].instrs[i];
        if (in.op == Op::Send || in.op == Op::Recv) {
          const Node& n = nodes[g][i];
          if (n.partner < 0) continue;  // never matched: stays blocked (reported as deadlock)
          if (!ready(n.partner_gpu, n.partner)) continue;
          start(g, i);
          start(n.partner_gpu, n.partner);
          // both end together: the longer of the two (same bytes by construction)
          double e = std::max(nodes[g][i].end, nodes[n.partner_gpu][n.partner].end);
          nodes[g][i].end = nodes[n.partner_gpu][n.partner].end = e;
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
      for (int s = 0; s < kStreams; ++s) {
        int i = running[g][s];
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
      if (remaining_instrs == 0) break;
      compute_rates();
      double next = inf;
      for (int g = 0; g < G; ++g)
        for (int s = 0; s < kStreams; ++s) {
          int i = running[g][s];
          if (i >= 0 && nodes[g][i].flow < 0) next = std::min(next, nodes[g][i].end);
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
    for (int d : in.after) {
      if (d < 0 || d >= (int)nodes[g].size() || d == i) {
        why.push_back("invalid dependency %" + std::to_string(d));
        continue;
      }
      if (nodes[g][d].st != St::Done) why.push_back("dependency " + ir::print_instr(p.programs[g].instrs[d], d) + " (not done)");
    }
    if (in.op == Op::Send || in.op == Op::Recv) {
      const Node& n = nodes[g][i];
      const char* other = in.op == Op::Send ? "recv" : "send";
      if (n.partner < 0) {
        why.push_back(std::string("no matching ") + other + " on g" + std::to_string(in.peer) + " with tag " + key_of(in));
      } else if (!ready(n.partner_gpu, n.partner)) {
        std::string w = std::string("matching ") + other + " " + describe(n.partner_gpu, n.partner);
        if (!at_head(n.partner_gpu, n.partner)) {
          int s = stream_index(p.programs[n.partner_gpu].instrs[n.partner].stream);
          const auto& qq = q[n.partner_gpu][s];
          size_t h = head[n.partner_gpu][s];
          w += " (not reached: its stream is blocked at ";
          w += h < qq.size() ? ir::print_instr(p.programs[n.partner_gpu].instrs[qq[h]], qq[h]) : std::string("end");
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
    os << "deadlock at t=" << now << " ms: " << remaining_instrs << " instruction(s) cannot start\n";
    for (int g = 0; g < G; ++g)
      for (int s = 0; s < kStreams; ++s) {
        if (head[g][s] >= q[g][s].size()) continue;
        int i = q[g][s][head[g][s]];
        os << "  g" << g << " @" << ir::to_string((Stream)s) << ": " << ir::print_instr(p.programs[g].instrs[i], i)
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
      R.h2d_util[g] /= gbps_to_bpms(hw.h2d_gbps) * step;
      R.d2h_util[g] /= gbps_to_bpms(hw.d2h_gbps) * step;
    }
    R.bubble = G > 0 ? 1.0 - busy_sum / G : 0.0;
    std::sort(R.intervals.begin(), R.intervals.end(), [](const SimInterval& a, const SimInterval& b) {
      return std::tie(a.start_ms, a.gpu, a.instr) < std::tie(b.start_ms, b.gpu, b.instr);
    });
  }
};

std::string event_name(const Instr& in) {
  std::string s = ir::to_string(in.op);
  switch (in.op) {
    case Op::Forward:
    case Op::Backward: return s + " S" + std::to_string(in.stage) + " m" + std::to_string(in.mb);
    case Op::Optim: return s + " S" + std::to_string(in.stage);
    case Op::LoadBatch: return s + " m" + std::to_string(in.mb);
    case Op::Send: return s + " " + (in.buf ? in.buf->str() : "?") + " -> g" + std::to_string(in.peer);
    case Op::Recv: return s + " " + (in.buf ? in.buf->str() : "?") + " <- g" + std::to_string(in.peer);
    case Op::Prefetch: return s + " " + (in.buf ? in.buf->str() : "?") + " <- host";
    case Op::Evict: return s + " " + (in.buf ? in.buf->str() : "?") + (in.to_host ? " -> host" : "");
    case Op::Free:
    case Op::AllReduce: return s + " " + (in.buf ? in.buf->str() : "?");
    default: return s;
  }
}

}  // namespace

SimResult simulate(const ir::Plan& plan, const HardwareSpec& hw, const ModelSpec& model, const SimOptions& opt) {
  Sim sim(plan, hw, model, opt);
  sim.run();
  return std::move(sim.R);
}

std::string trace_json(const ir::Plan& p, const SimResult& r) {
  using nlohmann::json;
  json ev = json::array();
  static const char* lane_names[] = {"comp", "h2d", "d2h", "p2p", "cpu"};
  const int G = (int)p.programs.size();
  for (int g = 0; g < G; ++g) {
    ev.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", g}, {"tid", 0}, {"args", {{"name", "GPU " + std::to_string(g)}}}});
    ev.push_back({{"ph", "M"}, {"name", "process_sort_index"}, {"pid", g}, {"tid", 0}, {"args", {{"sort_index", g}}}});
    for (int l = 0; l < 5; ++l)
      ev.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", g}, {"tid", l}, {"args", {{"name", lane_names[l]}}}});
  }
  for (const auto& iv : r.intervals) {
    if (iv.gpu < 0 || iv.gpu >= G || iv.instr < 0 || iv.instr >= (int)p.programs[iv.gpu].instrs.size()) continue;
    const Instr& in = p.programs[iv.gpu].instrs[iv.instr];
    std::string deps;
    for (int d : in.after) deps += (deps.empty() ? "%" : ",%") + std::to_string(d);
    json args = {{"op", ir::to_string(in.op)}, {"stage", in.stage}, {"mb", in.mb}, {"bytes", iv.bytes}, {"instr", iv.instr}, {"deps", deps}};
    if (in.buf) args["buf"] = in.buf->str();
    ev.push_back({{"ph", "X"},
                  {"name", event_name(in)},
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
