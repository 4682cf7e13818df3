// NVMe tier placement (issue 13, docs/nvme-tier.md), called by offload-insertion for each candidate once residency
// and recompute are chosen: which offloaded stages keep their fp32 master weights and AdamW moments (opt(S)) in host
// memory and which on the plan's nvme paths, so that every node's predicted host memory (cost/host_memory.hpp, with
// the tier's staging from passes/tier_staging.cpp) fits its host_mem_gib and --host-budget.
//   - --nvme-place all (job nvme_place): every offloaded stage's opt(S) on the tier (host memory still checked).
//   - Fits already: nothing moves (the plan is as without the tier).
//   - Over without nvme paths: HostMemoryError naming the missing host memory.
//   - Else the fewest stages that fit, taken in one of two orders (the stages the CPU optimizer updates last
//     first, or first first), whichever simulates faster; ties to the first. Still over with every offloaded
//     stage on the tier: HostMemoryError naming the missing host memory.
//   - The paths that exist here are checked for free space (statvfs) against the tier's bytes, striped by the
//     plan's nvme_weights (the engine checks again before training): InputError naming path and missing bytes.
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>

#include "common/format.hpp"
#include "cost/simulator.hpp"
#include "passes/pass.hpp"

namespace mmoc {

namespace {
std::string gib2(int64_t bytes) {
  char b[64];
  if (bytes > 0 && bytes < (10LL << 20)) std::snprintf(b, sizeof b, "%.2f MiB", (double)bytes / (double)(1LL << 20));  // tiny models
  else std::snprintf(b, sizeof b, "%.2f GiB", (double)bytes / (double)(1LL << 30));
  return b;
}

// The bytes each path holds for the tier's objects: every object cut into 4 KiB blocks shared by weight (as
// engine/tier/stripe.hpp's stripe_map, rounded up per path).
std::vector<int64_t> tier_path_bytes(const ir::Plan& p) {
  const size_t n = p.nvme.size();
  std::vector<double> w(n, 1.0);
  for (size_t i = 0; i < n && i < p.nvme_weights.size(); ++i) w[i] = p.nvme_weights[i];
  double tot = 0;
  for (double x : w) tot += x;
  std::vector<int64_t> out(n, 0);
  for (const auto& d : p.buffers) {
    if (d.kind != ir::BufKind::Opt || d.home != ir::Tier::Nvme) continue;
    const int64_t blocks = (d.bytes + 4095) / 4096;
    for (size_t i = 0; i < n; ++i) out[i] += ((int64_t)std::ceil(blocks * (tot > 0 ? w[i] / tot : 1.0 / n)) + 1) * 4096;
  }
  return out;
}

void check_tier_space(const ir::Plan& p) {
  const auto need = tier_path_bytes(p);
  std::map<dev_t, std::pair<int64_t, std::vector<std::string>>> per_fs;  // file system -> bytes needed, paths
  std::map<dev_t, int64_t> free_of;
  for (size_t i = 0; i < p.nvme.size(); ++i) {
    struct stat st {};
    struct statvfs vs {};
    if (::stat(p.nvme[i].c_str(), &st) != 0 || ::statvfs(p.nvme[i].c_str(), &vs) != 0) continue;  // checked where it runs
    auto& e = per_fs[st.st_dev];
    e.first += need[i];
    e.second.push_back(p.nvme[i]);
    free_of[st.st_dev] = (int64_t)vs.f_bavail * (int64_t)vs.f_frsize;
  }
  // MMOC_NVME_FREE_GIB: the free space of each path's file system on the machine the plan is for, when the compile
  // runs elsewhere (docs/nvme-tier.md); the engine checks the real space again before training
  if (const char* f = std::getenv("MMOC_NVME_FREE_GIB"); f && *f) {
    char* end = nullptr;
    const double gib = std::strtod(f, &end);
    if (end == f || *end != '\0' || !(gib >= 0)) throw InputError(std::string("MMOC_NVME_FREE_GIB='") + f + "': not a number of GiB >= 0");
    for (auto& [dev, v] : free_of) v = (int64_t)(gib * 1073741824.0);
  }
  for (const auto& [dev, e] : per_fs) {
    const int64_t have = free_of[dev];
    if (e.first <= have) continue;
    std::string names;
    for (const auto& n : e.second) names += (names.empty() ? "'" : ", '") + n + "'";
    throw NvmeSpaceError("nvme path " + names + ": the optimizer state placed on the NVMe tier needs " + gib2(e.first) + " there but only " +
                         gib2(have) + " is free (" + gib2(e.first - have) + " missing); free space, add --nvme paths or raise --host-budget",
                         e.first - have);
  }
}
}  // namespace

namespace {
// The one host-memory model (cost/host_memory.hpp) with the tier's staging, per node against host_mem_gib and the
// plan's host budget.
HostMemoryCheck host_check(const PassContext& c, const ir::Plan& p) {
  return check_host_memory(predict_host_memory(p, host_memory_options(c.hw, p)), c.hw, &p);  // every world rank, the host budget
}
std::string after_prefix(const std::string& m) {  // "host memory: X" -> "X"
  const std::string pre = "host memory: ";
  return m.rfind(pre, 0) == 0 ? m.substr(pre.size()) : m;
}
int64_t tier_bytes(const ir::Plan& p) {
  int64_t b = 0;
  for (const auto& d : p.buffers)
    if (d.kind == ir::BufKind::Opt && d.home == ir::Tier::Nvme) b += d.bytes;
  return b;
}
}  // namespace

std::string place_on_tier(const PassContext& c, const ir::Plan& base, OffloadConfig& cfg, ir::Plan& plan) {
  const int P = plan.num_stages();
  std::vector<int> cand;  // offloaded stages, lowest ids first (the CPU optimizer updates them last)
  for (int s = 0; s < P; ++s)
    if (!cfg.resident[s]) cand.push_back(s);
  const std::string where = std::to_string(plan.nvme.size()) + " path(s)";
  if (c.job.nvme_place == "all") {  // every offloaded stage's opt(S) on the tier
    if (plan.nvme.empty()) throw InputError("--nvme-place all needs --nvme paths");
    cfg.nvme.assign(P, 0);
    for (int s : cand) cfg.nvme[s] = 1;
    plan = lower_offload(c, base, cfg);
    const HostMemoryCheck hc = host_check(c, plan);
    if (!hc.ok)
      throw HostMemoryError("host memory: with the optimizer state of all " + std::to_string(cand.size()) +
                                " offloaded stages on the NVMe tier (--nvme-place all), " + after_prefix(hc.message),
                            hc.needed, hc.available);
    check_tier_space(plan);
    return "nvme tier: --nvme-place all: optimizer state of " + std::to_string(cand.size()) + " stages on " + where + " (" +
           gib2(tier_bytes(plan)) + "); host memory " + gib2(hc.needed) + " of " + gib2(hc.available);
  }
  const HostMemoryCheck hc0 = host_check(c, plan);
  if (hc0.ok)
    return plan.nvme.empty() && plan.host_budget_bytes <= 0
               ? std::string()
               : "nvme tier: host memory " + gib2(hc0.needed) + " within " + gib2(hc0.available) + ", nothing on the tier";
  if (plan.nvme.empty())
    throw HostMemoryError(hc0.head + "; give --nvme DIR[,DIR...] to put optimizer state on disk" +
                              (hc0.by_budget ? ", or raise --host-budget" : "") + "; " + hc0.breakdown,
                          hc0.needed, hc0.available);
  struct Try { OffloadConfig cfg; ir::Plan plan; HostMemoryCheck hc; double step_ms; };
  std::vector<Try> fits;
  HostMemoryCheck all_on = hc0;
  for (int order = 0; order < 2; ++order) {  // lowest ids first, or highest first
    std::vector<int> seq = cand;
    if (order == 1) std::reverse(seq.begin(), seq.end());
    OffloadConfig t = cfg;
    t.nvme.assign(P, 0);
    for (size_t k = 0; k < seq.size(); ++k) {
      t.nvme[seq[k]] = 1;
      ir::Plan pl = lower_offload(c, base, t);
      HostMemoryCheck h = host_check(c, pl);
      if (k + 1 == seq.size()) all_on = h;
      if (h.ok) {
        const double ms = simulate(pl, c.hw, c.model).step_ms;
        fits.push_back({t, std::move(pl), h, ms});
        break;
      }
    }
  }
  if (fits.empty())
    throw HostMemoryError("host memory: even with the optimizer state of all " + std::to_string(cand.size()) +
                              " offloaded stages on the NVMe tier, " + after_prefix(all_on.head) +
                              (all_on.by_budget ? "; raise --host-budget, or use more GPUs" : "; use a host with more memory, or more GPUs") +
                              "; " + all_on.breakdown,
                          all_on.needed, all_on.available);
  size_t best = 0;
  for (size_t i = 1; i < fits.size(); ++i)
    if (fits[i].step_ms < fits[best].step_ms) best = i;
  cfg = fits[best].cfg;
  plan = std::move(fits[best].plan);
  check_tier_space(plan);
  int n = 0;
  for (char x : cfg.nvme) n += x;
  return "nvme tier: optimizer state of " + std::to_string(n) + " of " + std::to_string(cand.size()) + " offloaded stages on " +
         where + " (" + gib2(tier_bytes(plan)) + "); host memory " + gib2(fits[best].hc.needed) + " within " + gib2(fits[best].hc.available);
}

}  // namespace mmoc
