// The NVMe tier's host staging per rank (pass.hpp: tier_staging_bytes), the one input of the host-memory model
// (cost/host_memory.hpp) that needs the plan's happens-before order, and host_memory_options(hw, plan), which puts it
// into that model's options. The rule is verify-memory's GPU bound applied to the op table's host effects
// (ir::host_effects): at every `read opt(S) <- nvme`, every tier buffer of the rank that may be in host memory then
// under SOME execution the dependencies allow (read by an instruction that does not happen after this one, and not
// written back by one that happens before it); a rank's staging is its worst such set. Ranks run independently, so
// the node's total (cost/host_memory.hpp's check) adds their worst sets up.
#include <algorithm>
#include <map>

#include "ir/ops.hpp"
#include "passes/analysis.hpp"
#include "passes/pass.hpp"

namespace mmoc {

using ir::BufRef;

namespace {
// One step body (a one-body plan) entered with the opt(S) of `carry_in` in host memory, which must leave exactly those
// of `carry_out` there (both empty for a plan of one body). A carried buffer is read before the step (read = -1: in
// host memory at every point until its write).
std::vector<int64_t> staging_of_body(const ir::Plan& p, const std::vector<int>& carry_in, const std::vector<int>& carry_out,
                                     const std::string& what) {
  std::vector<int64_t> worst(std::max(1, p.gpus), 0);
  struct Life { int gpu, read, write; int64_t bytes; };
  std::vector<Life> lives;
  auto opt = [](int s) { return BufRef{ir::BufKind::Opt, s, -1}; };
  for (const auto& prog : p.programs) {
    std::map<BufRef, size_t> open;
    for (int s : carry_in)
      if (s >= 0 && s < p.num_stages() && p.stages[s].gpu == prog.gpu) {
        open[opt(s)] = lives.size();
        lives.push_back({prog.gpu, -1, -1, p.buffer_bytes(opt(s))});
      }
    for (int i = 0; i < (int)prog.instrs.size(); ++i)
      for (const ir::BufEffect& e : ir::host_effects(p, prog.instrs[i])) {
        const std::string at = what + "g" + std::to_string(prog.gpu) + " %" + std::to_string(i) + ": ";
        if (e.access == ir::Access::Alloc) {
          if (open.count(e.buf)) throw ir::VerifyError(at + e.buf.str() + " read from nvme while already in host memory");
          open[e.buf] = lives.size();
          lives.push_back({prog.gpu, i, -1, p.buffer_bytes(e.buf)});
        } else if (e.access == ir::Access::Free) {
          auto it = open.find(e.buf);
          if (it == open.end()) throw ir::VerifyError(at + e.buf.str() + " written to nvme but not in host memory");
          lives[it->second].write = i;
          open.erase(it);
        }
      }
    for (int s : carry_out)
      if (s >= 0 && s < p.num_stages() && p.stages[s].gpu == prog.gpu) {
        if (!open.count(opt(s)))
          throw ir::VerifyError(what + "g" + std::to_string(prog.gpu) + ": " + opt(s).str() +
                                " should stay in host memory for the next step (carry) but is not there at the end of the step");
        open.erase(opt(s));
      }
    if (!open.empty())
      throw ir::VerifyError(what + "g" + std::to_string(prog.gpu) + ": " + open.begin()->first.str() + " read from nvme and never written back in the step");
  }
  if (lives.empty()) return worst;
  HappensBefore hb = happens_before(p);
  if (hb.cyclic) throw ir::VerifyError("dependency cycle between instructions (the plan cannot run)");
  // the points: every read, and the step's start (the carried buffers, read = -1, happen before everything)
  for (const Life& a : lives) {
    int64_t sum = 0;
    for (const Life& l : lives) {
      if (l.gpu != a.gpu) continue;
      if (&l == &a) { sum += l.bytes; continue; }
      if (a.read < 0) { sum += l.read < 0 ? l.bytes : 0; continue; }  // at the start: the other carried ones
      const bool read_not_after = l.read < 0 || !hb.hb(a.gpu, a.read, l.gpu, l.read);
      const bool not_written_before = l.write < 0 || !hb.hb(l.gpu, l.write, a.gpu, a.read);
      if (read_not_after && not_written_before) sum += l.bytes;
    }
    if (a.gpu >= 0 && a.gpu < (int)worst.size()) worst[a.gpu] = std::max(worst[a.gpu], sum);
  }
  return worst;
}
}  // namespace

std::vector<int64_t> tier_staging_bytes(const ir::Plan& p) {
  if (ir::num_bodies(p) == 1) return staging_of_body(p, p.carry_even, p.carry_odd, "");
  // alternating update order: the worse of the two bodies, each entered with its carry and leaving the other's
  std::vector<int64_t> a = staging_of_body(ir::step_body(p, 0), p.carry_even, p.carry_odd, "even step: ");
  const std::vector<int64_t> b = staging_of_body(ir::step_body(p, 1), p.carry_odd, p.carry_even, "odd step: ");
  for (size_t g = 0; g < a.size() && g < b.size(); ++g) a[g] = std::max(a[g], b[g]);
  return a;
}

HostMemoryOptions host_memory_options(const HardwareSpec& hw, const ir::Plan& p) {
  HostMemoryOptions o = host_memory_options(hw);
  o.nvme_staging_bytes = tier_staging_bytes(p);
  return o;
}

}  // namespace mmoc
