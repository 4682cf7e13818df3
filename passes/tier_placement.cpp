// NVMe tier placement (issue 13, docs/nvme-tier.md), called by offload-insertion once it has chosen residency and
// recompute: which offloaded stages keep their fp32 master weights and AdamW moments (opt(S)) in host memory and
// which on the plan's nvme paths, so that the node's host-memory bound (host_memory_bound) stays within
// --host-budget.
//   - --nvme-place all (job nvme_place): every offloaded stage's opt(S) on the tier (the budget still checked).
//   - No host budget: nothing moves (the plan is as without the tier).
//   - Over budget without nvme paths: InputError naming the missing host memory.
//   - Else the fewest stages that fit, taken in one of two orders (the stages the CPU optimizer updates last
//     first, or first first), whichever simulates faster; ties to the first. Still over with every offloaded
//     stage on the tier: InputError naming the missing host memory.
//   - The paths that exist here are checked for free space (statvfs) against the tier's bytes, striped by the
//     plan's nvme_weights (the engine checks again before training): InputError naming path and missing bytes.
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "common/format.hpp"
#include "cost/simulator.hpp"
#include "passes/pass.hpp"

namespace mmoc {

namespace {
std::string gib2(int64_t bytes) {
  char b[64];
  std::snprintf(b, sizeof b, "%.2f GiB", (double)bytes / (double)(1LL << 30));
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
  for (const auto& [dev, e] : per_fs) {
    const int64_t have = free_of[dev];
    if (e.first <= have) continue;
    std::string names;
    for (const auto& n : e.second) names += (names.empty() ? "'" : ", '") + n + "'";
    throw InputError("nvme path " + names + ": the optimizer state placed on the NVMe tier needs " + gib2(e.first) + " there but only " +
                     gib2(have) + " is free (" + gib2(e.first - have) + " missing); free space, add --nvme paths or raise --host-budget");
  }
}
}  // namespace

void place_on_tier(PassContext& c, const ir::Plan& base, OffloadConfig& cfg, ir::Plan& plan) {
  const int64_t budget = plan.host_budget_bytes;
  const int P = plan.num_stages();
  HostBound hb = host_memory_bound(plan);
  if (c.job.nvme_place == "all" && !plan.nvme.empty()) {  // every offloaded stage's opt(S) on the tier
    cfg.nvme.assign(P, 0);
    int n = 0;
    for (int s = 0; s < P; ++s)
      if (!cfg.resident[s]) { cfg.nvme[s] = 1; ++n; }
    plan = lower_offload(c, base, cfg);
    hb = host_memory_bound(plan);
    if (budget > 0 && hb.total > budget)
      throw InputError("host memory: with the optimizer state of all " + std::to_string(n) + " offloaded stages on the NVMe tier (--nvme-place all) the node needs up to " +
                       gib2(hb.total) + " of host memory but --host-budget is " + gib2(budget) + " (" + gib2(hb.total - budget) + " missing)");
    check_tier_space(plan);
    c.notes.push_back("nvme tier: --nvme-place all: optimizer state of " + std::to_string(n) + " stages on " + std::to_string(plan.nvme.size()) + " path(s)");
    return;
  }
  if (c.job.nvme_place == "all") throw InputError("--nvme-place all needs --nvme paths");
  if (budget <= 0 || hb.total <= budget) {
    if (budget > 0) c.notes.push_back("nvme tier: host bound " + gib2(hb.total) + " within --host-budget " + gib2(budget) + ", nothing on the tier");
    return;
  }
  if (plan.nvme.empty())
    throw InputError("host memory: the plan needs up to " + gib2(hb.total) + " of host memory on the node (state " + gib2(hb.state) +
                     ", runtime " + gib2(hb.runtime) + ") but --host-budget is " + gib2(budget) + " (" + gib2(hb.total - budget) +
                     " missing); give --nvme DIR[,DIR...] to put optimizer state on disk, or raise --host-budget");
  std::vector<int> cand;  // offloaded stages, lowest ids first (the CPU optimizer updates them last)
  for (int s = 0; s < P; ++s)
    if (!cfg.resident[s]) cand.push_back(s);
  struct Try { OffloadConfig cfg; ir::Plan plan; HostBound hb; double step_ms; };
  std::vector<Try> fits;
  HostBound all_on{};
  for (int order = 0; order < 2; ++order) {
    std::vector<int> seq = cand;
    if (order == 1) std::reverse(seq.begin(), seq.end());
    OffloadConfig t = cfg;
    t.nvme.assign(P, 0);
    for (size_t k = 0; k < seq.size(); ++k) {
      t.nvme[seq[k]] = 1;
      ir::Plan pl = lower_offload(c, base, t);
      pl.host_budget_bytes = plan.host_budget_bytes;  // (base carries them; kept explicit)
      HostBound h = host_memory_bound(pl);
      if (k + 1 == seq.size()) all_on = h;
      if (h.total <= budget) {
        const double ms = simulate(pl, c.hw, c.model).step_ms;
        fits.push_back({t, std::move(pl), h, ms});
        break;
      }
    }
  }
  if (fits.empty())
    throw InputError("host memory: even with the optimizer state of all " + std::to_string(cand.size()) + " offloaded stages on the NVMe tier the node needs up to " +
                     gib2(all_on.total) + " of host memory (weights and gradients " + gib2(all_on.state) + ", tier staging " + gib2(all_on.staging) +
                     ", runtime " + gib2(all_on.runtime) + ") but --host-budget is " + gib2(budget) + " (" + gib2(all_on.total - budget) +
                     " missing); raise --host-budget, or use more GPUs");
  size_t best = 0;
  for (size_t i = 1; i < fits.size(); ++i)
    if (fits[i].step_ms < fits[best].step_ms) best = i;
  cfg = fits[best].cfg;
  plan = std::move(fits[best].plan);
  check_tier_space(plan);
  int n = 0;
  for (char x : cfg.nvme) n += x;
  c.notes.push_back("nvme tier: optimizer state of " + std::to_string(n) + " of " + std::to_string(cand.size()) +
                    " offloaded stages on " + std::to_string(plan.nvme.size()) + " path(s) (" + gib2(fits[best].hb.nvme_bytes) + "); host bound " +
                    gib2(fits[best].hb.total) + " within --host-budget " + gib2(budget));
}

}  // namespace mmoc
