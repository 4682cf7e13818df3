// The NVMe tier in the worker (docs/nvme-tier.md): opening the store before training, the `read opt(S) <- nvme` and
// `write opt(S) -> nvme` handlers, and whole-state access for init, loads and checkpoints.
#include "engine/exec/worker_impl.hpp"

namespace mmoc::engine {

namespace {
int64_t opt_bytes(const StageState& st) { return 3 * st.layout.numel * (int64_t)sizeof(float); }
}  // namespace

void Worker::Impl::open_tier(const std::vector<std::string>& paths_override) {
  if (cuda) io_thread = std::make_unique<CpuStream>();  // the io stream (idle without the tier)
  std::vector<tier::ObjectSpec> objects;
  for (auto& [s, st] : stages)
    if (st.on_tier) {
      objects.push_back({(uint64_t)s, opt_bytes(st), "opt(S" + std::to_string(s) + ")"});
      tier_buffer_numel = std::max(tier_buffer_numel, 3 * st.layout.numel);
    }
  if (objects.empty()) return;
  std::vector<std::string> paths = plan.nvme;
  if (!paths_override.empty()) {
    if (paths_override.size() != plan.nvme.size())
      throw tier::SetupError("--nvme: the plan's NVMe tier has " + std::to_string(plan.nvme.size()) + " path(s), " +
                               std::to_string(paths_override.size()) + " given instead");
    paths = paths_override;
  }
  if (paths.empty()) throw tier::SetupError("the plan puts optimizer state on the NVMe tier but names no nvme path");
  std::vector<tier::PathSpec> specs;
  for (size_t i = 0; i < paths.size(); ++i) specs.push_back({paths[i], i < plan.nvme_weights.size() ? plan.nvme_weights[i] : 1.0});
  try {
    tier = std::make_unique<tier::TierStore>(specs);
    tier->reserve_all(objects);  // the space of every object, allocated now: a full disk fails here
  } catch (const tier::SetupError& e) {
    throw tier::SetupError(std::string("NVMe tier (rank ") + std::to_string(rank) + "): " + e.what());
  }
}

at::Tensor Worker::Impl::tier_new_buffer(int stage) const {
  const StageState& st = stages.at(stage);
  // host_tensor: an exact page-aligned mapping of zeros, unmapped when the last reference goes (no allocator cache)
  return host_tensor(3 * st.layout.numel, at::kFloat, /*pinned=*/false, -1, 1);
}

at::Tensor Worker::Impl::tier_get(int stage, const char* why) {
  std::lock_guard<std::mutex> g(tier_mu);
  auto it = tier_staged.find(stage);
  if (it == tier_staged.end()) throw ExecError(std::string(why) + ": opt(S" + std::to_string(stage) + ") is not in host memory (no read from nvme)");
  return it->second;
}

void Worker::Impl::tier_read(const BufRef& b) {
  if (b.kind != BufKind::Opt || !stages.count(b.stage) || !stages.at(b.stage).on_tier || !tier)
    throw ExecError("read " + b.str() + " <- nvme: not optimizer state of a local stage on the NVMe tier");
  {
    std::lock_guard<std::mutex> g(tier_mu);
    if (tier_staged.count(b.stage)) throw ExecError("read " + b.str() + " <- nvme: already in host memory");
  }
  tier_stage_in(b.stage);
}

// opt(S) from the tier into a staging buffer: one a write gave back (its pages already in place), else a new one of
// the largest size; counted in this step's tier traffic. tier_mu must not be held.
void Worker::Impl::tier_stage_in(int stage) {
  at::Tensor buf;
  {
    std::lock_guard<std::mutex> g(tier_mu);
    if (!tier_pool.empty()) {
      buf = std::move(tier_pool.back());
      tier_pool.pop_back();
    }
  }
  if (!buf.defined()) {
    buf = host_tensor(tier_buffer_numel, at::kFloat, /*pinned=*/false, -1, 1);
    buf.fill_(0.0f);  // fault its pages in here, in parallel, not one by one inside the read's requests
  }
  tier::Ticket t = tier->read_async((uint64_t)stage, buf.data_ptr());
  t.wait();  // on the io thread on CUDA: the optimizer step waits for this instruction
  std::lock_guard<std::mutex> g(tier_mu);
  tier_staged[stage] = buf;
  tier_read_bytes += t.bytes();
  tier_read_s += t.seconds();
}

void Worker::Impl::tier_write(const BufRef& b) {
  at::Tensor buf = tier_get(b.stage, "write -> nvme");
  tier::Ticket t = tier->write_async((uint64_t)b.stage, buf.data_ptr());
  t.wait();  // the buffer is dropped only when the disk has it
  std::lock_guard<std::mutex> g(tier_mu);
  tier_staged.erase(b.stage);
  if (buf.numel() == tier_buffer_numel) tier_pool.push_back(std::move(buf));  // for the next read
  tier_write_bytes += t.bytes();
  tier_write_s += t.seconds();
}

void Worker::Impl::tier_carry_in(int parity) {
  const std::vector<int>& want = ir::carry_in(plan, parity);
  std::vector<int> missing;
  {
    std::lock_guard<std::mutex> g(tier_mu);
    for (const auto& [s, buf] : tier_staged)
      if (std::find(want.begin(), want.end(), s) == want.end())
        throw ExecError("opt(S" + std::to_string(s) + ") is in host memory at the start of a step that does not expect it there");
    for (int s : want) {
      if (!stages.count(s) || tier_staged.count(s)) continue;  // another rank's stage, or kept by the step before
      if (!stages.at(s).on_tier || !tier) throw ExecError("the plan keeps opt(S" + std::to_string(s) + ") in host memory but it is not on the tier");
      missing.push_back(s);
    }
  }
  for (int s : missing) tier_stage_in(s);  // before the step: no io instruction runs yet
}

void Worker::Impl::tier_drop_cache() {
  std::lock_guard<std::mutex> g(tier_mu);
  tier_staged.clear();
}

at::Tensor Worker::Impl::tier_fetch(int stage) {
  {
    std::lock_guard<std::mutex> g(tier_mu);
    tier_pool.clear();  // checkpoints and loads: one stage's buffer at a time, as the host prediction counts them
    auto it = tier_staged.find(stage);
    if (it != tier_staged.end()) return it->second;  // kept in host memory by the alternating order: newer than the tier's
  }
  at::Tensor buf = tier_new_buffer(stage);
  tier->read_async((uint64_t)stage, buf.data_ptr()).wait();
  return buf;
}

void Worker::Impl::tier_store(int stage, const at::Tensor& buf) { tier->write_async((uint64_t)stage, buf.data_ptr()).wait(); }

}  // namespace mmoc::engine
