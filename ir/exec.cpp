// The executors' shared state (Dispatch) and the untimed executor (execute). See exec.hpp.
#include "ir/exec.hpp"

#include <map>
#include <set>
#include <tuple>

namespace mmoc::ir {

namespace {
constexpr int kStreams = kNumStreams;
// What pairs a source with its sink: the tag, or (untagged) the buffer's name.
std::string pair_key(const Instr& in) { return in.tag.empty() ? (in.buf ? in.buf->str() : std::string()) : in.tag; }
}  // namespace

Dispatch::Dispatch(const Plan& p, Order order) : p_(p), order_(order) {
  const int G = (int)p.programs.size();
  const int nq = order == Order::Sequential ? 1 : kStreams;
  queues_.assign(G, std::vector<std::vector<int>>(nq));
  head_.assign(G, std::vector<size_t>(nq, 0));
  running_.assign(G, std::vector<int>(nq, -1));
  state_.resize(G);
  for (int g = 0; g < G; ++g) {
    const auto& prog = p.programs[g].instrs;
    state_[g].assign(prog.size(), 0);
    for (int i = 0; i < (int)prog.size(); ++i) {
      queues_[g][queue_of(g, i)].push_back(i);
    }
    remaining_ += prog.size();
  }
  partner_ = pair_partners(p);
}

std::vector<std::vector<std::pair<int, int>>> pair_partners(const Plan& p) {
  const int G = (int)p.programs.size();
  std::vector<std::vector<std::pair<int, int>>> partner(G);
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < (int)p.programs[g].instrs.size(); ++i)
      partner[g].push_back(op_info(p.programs[g].instrs[i].op).sync == Sync::None ? std::make_pair(g, i)
                                                                                    : std::make_pair(-1, -1));
  // (source gpu, sink gpu, key) -> the sources in program order; the k-th sink with that key takes the k-th.
  std::map<std::tuple<int, int, std::string>, std::vector<int>> sources;
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < (int)p.programs[g].instrs.size(); ++i) {
      const Instr& in = p.programs[g].instrs[i];
      if (op_info(in.op).sync == Sync::PairSource) sources[{g, in.peer, pair_key(in)}].push_back(i);
    }
  std::map<std::tuple<int, int, std::string>, size_t> used;
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < (int)p.programs[g].instrs.size(); ++i) {
      const Instr& in = p.programs[g].instrs[i];
      if (op_info(in.op).sync != Sync::PairSink || in.peer < 0 || in.peer >= G) continue;
      auto key = std::make_tuple(in.peer, g, pair_key(in));
      auto it = sources.find(key);
      if (it == sources.end()) continue;
      size_t& u = used[key];
      if (u >= it->second.size()) continue;
      const int s = it->second[u++];
      partner[g][i] = {in.peer, s};
      partner[in.peer][s] = {g, i};
    }
  return partner;
}

int Dispatch::head(int g, int q) const {
  const auto& qu = queues_[g][q];
  const size_t h = head_[g][q];
  return h < qu.size() ? qu[h] : -1;
}

bool Dispatch::deps_done(int g, int i) const {
  for (int a : p_.programs[g].instrs[i].after)
    if (a < 0 || a >= (int)state_[g].size() || a == i || state_[g][a] != 2) return false;
  return true;
}

bool Dispatch::ready(int g, int i) const {
  const int q = queue_of(g, i);
  return head(g, q) == i && !busy(g, q) && deps_done(g, i);
}

bool Dispatch::startable(int g, int i) const {
  if (!ready(g, i)) return false;
  if (!paired(g, i)) return true;
  auto [pg, pi] = partner_[g][i];
  return pg >= 0 && ready(pg, pi);
}

void Dispatch::start(int g, int i) {
  state_[g][i] = 1;
  running_[g][queue_of(g, i)] = i;
}

void Dispatch::finish(int g, int i) {
  const int q = queue_of(g, i);
  state_[g][i] = 2;
  running_[g][q] = -1;
  head_[g][q]++;
  --remaining_;
}

std::vector<int> Dispatch::waiting_deps(int g, int i) const {
  std::vector<int> w;
  for (int a : p_.programs[g].instrs[i].after)
    if (a < 0 || a >= (int)state_[g].size() || state_[g][a] != 2) w.push_back(a);
  return w;
}

Execution execute(const Plan& p, Order order, const std::function<void(int, int)>& on_run) {
  Dispatch d(p, order);
  auto run = [&](int g, int i) {
    d.start(g, i);
    d.finish(g, i);
    if (on_run) on_run(g, i);
  };
  bool progress = true;
  while (d.remaining() > 0 && progress) {
    progress = false;
    for (int g = 0; g < d.gpus(); ++g)
      for (int q = 0; q < d.queues(g); ++q)
        for (int i = d.head(g, q); i >= 0 && d.startable(g, i); i = d.head(g, q)) {
          run(g, i);
          if (d.paired(g, i)) {
            auto [pg, pi] = d.partner(g, i);
            run(pg, pi);
          }
          progress = true;
        }
  }
  Execution r;
  r.remaining = d.remaining();
  r.complete = r.remaining == 0;
  if (r.complete) return r;
  r.report = std::string("deadlock (") + (order == Order::Sequential ? "sequential" : "streams") + "): " +
             std::to_string(r.remaining) + " instructions cannot run; stuck heads:";
  for (int g = 0; g < d.gpus(); ++g)
    for (int q = 0; q < d.queues(g); ++q) {
      const int i = d.head(g, q);
      if (i < 0) continue;
      const Instr& in = p.programs[g].instrs[i];
      r.report += "\n  g" + std::to_string(g) + " " + print_instr(in, i);
      std::string waits;
      for (int a : d.waiting_deps(g, i)) waits += " %" + std::to_string(a);
      if (!waits.empty()) r.report += "   waits for" + waits;
      else if (d.paired(g, i)) r.report += "   waits for its partner (tag " + in.tag + ")";
    }
  return r;
}

Replay replay_program(const Plan& p, int gpu) {
  Replay r;
  std::set<BufRef> live;
  for (const BufRef& b : persistent_buffers(p, gpu)) live.insert(b);
  const auto& prog = p.programs.at(gpu).instrs;
  for (int i = 0; i < (int)prog.size(); ++i) {
    const std::string at = "g" + std::to_string(gpu) + " %" + std::to_string(i) + ": ";
    const Effects e = effects(p, prog[i]);
    for (const BufEffect& x : e) {
      const bool present = live.count(x.buf) > 0;
      switch (x.access) {
        case Access::Require:
          if (!present) r.problems.push_back(at + "needs " + x.buf.str() + " on the GPU, but it is not present");
          break;
        case Access::Alloc:
          if (present) r.problems.push_back(at + x.buf.str() + " allocated while already present");
          live.insert(x.buf);
          break;
        case Access::AllocIfAbsent: live.insert(x.buf); break;
        case Access::Free:
          if (!present) r.problems.push_back(at + x.buf.str() + " freed but not present");
          live.erase(x.buf);
          break;
        case Access::FreeIfPresent: live.erase(x.buf); break;
      }
    }
  }
  for (const BufRef& b : live)
    if (!is_persistent(p, b)) r.leaked.push_back(b);
  return r;
}

}  // namespace mmoc::ir
