// Host memory per rank (cost/host_memory.hpp): the formula follows the engine's allocations.
#include "cost/host_memory.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "common/format.hpp"

namespace mmoc {

namespace {
// at::empty(pinned) goes through the caching host allocator, which rounds a block up to a power of two.
int64_t pow2_at_least(int64_t n) {
  if (n <= 0) return 0;
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
}  // namespace

HostMemoryOptions host_memory_options(const HardwareSpec& hw) {
  HostMemoryOptions o;
  o.process_base_bytes = (int64_t)std::llround(hw.host_process_gib * GiB);
  return o;
}

std::vector<HostMemory> predict_host_memory(const ir::Plan& p, const HostMemoryOptions& o,
                                            const std::vector<int64_t>& device_bound) {
  std::vector<HostMemory> out(std::max(1, p.gpus));
  const bool fp32 = p.train.precision == "fp32";
  const int64_t cbytes = fp32 ? 4 : 2;
  for (int r = 0; r < (int)out.size(); ++r) {
    HostMemory& h = out[r];
    h.rank = r;
    h.base = o.process_base_bytes;
    // pinned_ids and pinned_labels: [microbatches, mbs * seq] int64 each
    h.batch = 2 * pow2_at_least((int64_t)p.microbatches * p.micro_batch_size * p.seq_len * 8);
    h.io_staging = std::max(o.save ? o.save_staging_bytes : 0, o.load_staging_bytes);
    if (r < (int)o.nvme_staging_bytes.size()) h.nvme_staging = o.nvme_staging_bytes[r];
    if (!o.cuda && r < (int)device_bound.size()) h.device = device_bound[r];
  }
  for (const auto& s : p.stages) {
    if (s.gpu < 0 || s.gpu >= (int)out.size()) continue;
    StageHostMemory st;
    st.stage = s.id;
    st.gpu = s.gpu;
    const int64_t n = s.params;
    const bool offloaded = s.weights == ir::Residency::Offload;
    const ir::BufferDecl* opt = p.find_buffer(ir::BufKind::Opt, s.id);
    const bool on_tier = offloaded && opt && opt->home == ir::Tier::Nvme;
    if (on_tier) {  // master and moments on the NVMe tier; the compute-precision copy and the gradients stay
      if ((int)o.nvme_staging_bytes.size() < (int)out.size())
        throw std::logic_error("predict_host_memory: stage S" + std::to_string(s.id) +
                               "'s state is on the NVMe tier but the tier's staging per rank was not given (passes' host_memory_options(hw, plan))");
      st.nvme = opt->bytes;
      st.lowp = cbytes * n;
      st.grads = cbytes * n;
    } else if (offloaded && p.dp > 1) {
      // ZeRO (data-parallel pass): each replica keeps 1/dp of the fp32 master, the moments and the gradient landing
      // zone (replica 0 the largest, ceil(n/dp)); the compute-precision copy prefetches read stays whole (fp32: the
      // whole copy, of which the master shard is a part). (The NVMe tier with dp > 1 is refused by the compiler.)
      const int64_t shard = (n + p.dp - 1) / p.dp;
      st.master = 4 * shard;
      st.moments = 8 * shard;
      st.lowp = fp32 ? cbytes * n - 4 * shard : cbytes * n;
      st.grads = cbytes * shard;
    } else if (offloaded) {
      st.master = 4 * n;
      st.moments = 8 * n;
      st.lowp = fp32 ? 0 : cbytes * n;
      st.grads = cbytes * n;
    } else if (!o.cuda) {  // the CPU device: resident state is host memory
      st.master = 4 * n;
      st.moments = 8 * n;
    }
    HostMemory& h = out[s.gpu];
    h.master += st.master;
    h.moments += st.moments;
    h.grads += st.grads;
    h.lowp += st.lowp;
    h.nvme += st.nvme;
    h.stages.push_back(st);
  }
  return out;
}

std::string HostMemory::describe() const {
  std::string s = "fp32 master " + gib((double)master) + ", AdamW moments " + gib((double)moments) + ", gradients " +
                  gib((double)grads);
  if (lowp) s += ", weight staging " + gib((double)lowp);
  s += ", batch and checkpoint staging " + gib((double)(batch + io_staging));
  if (nvme_staging) s += ", NVMe staging " + gib((double)nvme_staging);
  if (device) s += ", device buffers " + gib((double)device);
  s += ", process " + gib((double)base);
  if (nvme) s += "; on the NVMe tier " + gib((double)nvme);
  return s;
}

HostMemoryCheck check_host_memory(const std::vector<HostMemory>& per_pipe, const HardwareSpec& hw, int64_t host_budget_bytes,
                                  const ir::Plan* layout) {
  // every process of the layout: world rank r holds what its pipeline rank's prediction says
  std::vector<HostMemory> ranks;
  if (layout && ir::world_size(*layout) > (int)per_pipe.size()) {
    for (int r = 0; r < ir::world_size(*layout); ++r) {
      const int pipe = ir::rank_coord(*layout, r).pipe;
      if (pipe >= (int)per_pipe.size()) continue;
      ranks.push_back(per_pipe[pipe]);
      ranks.back().rank = r;
    }
  } else {
    ranks = per_pipe;
  }
  HostMemoryCheck c;
  c.available = (int64_t)std::llround(hw.host_mem_gib * GiB);
  if (host_budget_bytes > 0 && (hw.host_mem_gib <= 0 || host_budget_bytes < c.available)) {
    c.available = host_budget_bytes;
    c.by_budget = true;
  }
  const int per_node = std::max(1, hw.gpus);
  std::vector<int64_t> node_total;
  for (const auto& h : ranks) {
    const int node = h.rank / per_node;
    if ((int)node_total.size() <= node) node_total.resize(node + 1, 0);
    node_total[node] += h.total();
  }
  for (int n = 0; n < (int)node_total.size(); ++n)
    if (n == 0 || node_total[n] > c.needed) { c.node = n; c.needed = node_total[n]; }
  c.ok = (hw.host_mem_gib <= 0 && !c.by_budget) || c.needed <= c.available;
  if (!c.ok) {
    const HostMemory* big = nullptr;
    int on_node = 0;
    for (const auto& h : ranks)
      if (h.rank / per_node == c.node) {
        ++on_node;
        if (!big || h.total() > big->total()) big = &h;
      }
    c.head = "host memory: the plan needs " + gib_at_least(c.needed) + " of host memory" +
                (on_node > 1 ? " on node " + std::to_string(c.node) + " (" + std::to_string(on_node) + " ranks)" : "") +
                (c.by_budget ? " but --host-budget is " + gib((double)c.available)
                             : " but '" + hw.name + "' has " + gib((double)c.available) + " (host_mem_gib)") +
                ", " + gib_at_least(c.needed - c.available) + " missing";
    if (big) c.breakdown = "rank " + std::to_string(big->rank) + ": " + big->describe();
    c.message = c.head + (c.breakdown.empty() ? "" : "; " + c.breakdown);
  }
  return c;
}

}  // namespace mmoc
