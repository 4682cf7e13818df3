// The node's host-memory bound (pass.hpp: host_memory_bound) and its check (verify_host_memory), for the NVMe tier
// (docs/nvme-tier.md). The same rule as verify-memory's GPU bound, applied to the op table's host effects
// (ir::host_effects): at every `read opt(S) <- nvme`, every NVMe-tier buffer that may be in host memory then under
// SOME execution the dependencies allow (read by an instruction that does not happen after this one, and not
// written back by one that happens before it), per rank; ranks of a node run independently, so the ranks' worst sets
// add up.
#include <algorithm>
#include <cstdio>
#include <map>

#include "common/format.hpp"
#include "ir/ops.hpp"
#include "passes/analysis.hpp"
#include "passes/pass.hpp"

namespace mmoc {

using ir::BufKind;
using ir::BufRef;

namespace {
// The fraction of every NVMe-tier object on virtual (tmpfs) paths is host memory. The plan does not say which
// paths are virtual; the engine does (it probes them). The bound counts none here: a virtual path's space is
// reported by the engine at start (docs/nvme-tier.md).
int64_t stage_host_state(const ir::Plan& p, int s) {
  const ir::Stage& st = p.stages[s];
  if (st.optim != ir::OptimPlace::Cpu) return 0;
  const ir::BufferDecl* opt = p.find_buffer(BufKind::Opt, s);
  const bool on_nvme = opt && opt->home == ir::Tier::Nvme;
  int64_t b = p.buffer_bytes({BufKind::WGrad, s, -1});  // the host gradient buffer
  // the compute-precision weights the prefetches read: the fp32 master itself when it is on the host in fp32 runs
  if (on_nvme || p.train.precision != "fp32") b += p.buffer_bytes({BufKind::W, s, -1});
  if (!on_nvme && opt) b += opt->bytes;
  return b;
}
}  // namespace

HostBound host_memory_bound(const ir::Plan& p) {
  HostBound h;
  for (int s = 0; s < p.num_stages(); ++s) {
    h.state += stage_host_state(p, s);
    const ir::BufferDecl* opt = p.find_buffer(BufKind::Opt, s);
    if (opt && opt->home == ir::Tier::Nvme) h.nvme_bytes += opt->bytes;
  }
  h.runtime = kHostRuntimeBytes * (int64_t)std::max<size_t>(1, p.programs.size());
  struct Life { int gpu, read, write; int64_t bytes; };
  std::vector<Life> lives;
  for (const auto& prog : p.programs) {
    std::map<BufRef, size_t> open;
    for (int i = 0; i < (int)prog.instrs.size(); ++i)
      for (const ir::BufEffect& e : ir::host_effects(p, prog.instrs[i])) {
        if (e.access == ir::Access::Alloc) {
          if (open.count(e.buf)) throw ir::VerifyError("g" + std::to_string(prog.gpu) + " %" + std::to_string(i) + ": " + e.buf.str() + " read from nvme while already in host memory");
          open[e.buf] = lives.size();
          lives.push_back({prog.gpu, i, -1, p.buffer_bytes(e.buf)});
        } else if (e.access == ir::Access::Free) {
          auto it = open.find(e.buf);
          if (it == open.end()) throw ir::VerifyError("g" + std::to_string(prog.gpu) + " %" + std::to_string(i) + ": " + e.buf.str() + " written to nvme but not in host memory");
          lives[it->second].write = i;
          open.erase(it);
        }
      }
    if (!open.empty())
      throw ir::VerifyError("g" + std::to_string(prog.gpu) + ": " + open.begin()->first.str() + " read from nvme and never written back in the step");
  }
  if (!lives.empty()) {
    HappensBefore hb = happens_before(p);
    if (hb.cyclic) throw ir::VerifyError("dependency cycle between instructions (the plan cannot run)");
    // per rank its worst set; ranks run independently, so their worst sets may coincide: the sum
    std::map<int, int64_t> worst;
    for (const Life& a : lives) {
      int64_t sum = 0;
      for (const Life& l : lives) {
        if (l.gpu != a.gpu) continue;
        if (&l == &a) { sum += l.bytes; continue; }
        const bool read_not_after = !hb.hb(a.gpu, a.read, l.gpu, l.read);
        const bool not_written_before = l.write < 0 || !hb.hb(l.gpu, l.write, a.gpu, a.read);
        if (read_not_after && not_written_before) sum += l.bytes;
      }
      worst[a.gpu] = std::max(worst[a.gpu], sum);
    }
    for (const auto& [g, b] : worst) h.staging += b;
  }
  h.total = h.state + h.staging + h.runtime;
  return h;
}

}  // namespace mmoc
