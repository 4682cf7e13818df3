// Host memory per rank: what a plan makes the engine (engine/exec) hold in the host's RAM, as a breakdown, and the
// check against the hardware's host_mem_gib (ranks of one node share it). No LibTorch.
//
// The formula follows the engine's allocations (engine/exec/worker.cpp, step.cpp, engine/model/train_checkpoint.*):
//  per offloaded stage of n parameters (weights on the host, optimizer on the CPU), exactly sized (host_tensor):
//    fp32 master 4n, AdamW exp_avg and exp_avg_sq 8n, the compute-precision copy prefetches read (pinned; bf16 2n,
//    fp32: the master itself, 0) and the gradient landing zone (pinned; 2n bf16, 4n fp32)  -> 16n either way;
//    with dp > 1 (ZeRO-sharded CPU optimizer) master, moments and landing zone are ceil(n/dp), the copy stays n;
//  per resident stage: nothing on a GPU (its state is on the device); on the CPU device (no GPU: "device" memory is
//    host memory) master and moments 12n, and the plan's GPU-side buffers (its bound) count as host memory too;
//  the step's batch: pinned ids and labels, microbatches x mbs x seq int64 each, through the caching host allocator
//    (rounded up to a power of two);
//  checkpoint I/O staging: a save (--save, --save-every in the background) holds threads x 2 x chunk (4 x 2 x 32 MiB
//    = 256 MiB); a load (--init, --resume) 8 x (2 x 32 MiB + 2 x 4 KiB): the larger, since state is in place for both;
//  a fixed process base (hardware "host_process_gib": CUDA context, LibTorch, NCCL and cuBLAS on the host).
// NVMe tier (docs/nvme-tier.md), from the plan's buffer table: an offloaded stage whose opt(S) has home `nvme` keeps
// its fp32 master and moments (12n) on the tier, not in host memory; the compute-precision copy the prefetches read
// and the optimizer writes stays (pinned; 2n bf16, 4n fp32: the master is no longer in host memory to serve as it),
// and so does the gradient landing zone: 4n bf16, 8n fp32 in host memory instead of 16n. The tier's staging (opt(S)
// buffers between their `read` and `write`) is per rank the worst set that may be in host memory at once under the
// plan's dependencies, which needs the plan's happens-before order: passes' host_memory_options(hw, plan) computes it
// (passes/tier_staging.cpp) into HostMemoryOptions::nvme_staging_bytes. Each stage's contribution is kept separately.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cost/spec.hpp"
#include "ir/plan.hpp"

namespace mmoc {

// The engine's checkpoint I/O defaults (engine/model/train_checkpoint.hpp IoOptions: 4 write threads, 8 read
// threads, 32 MiB chunks, 4 KiB O_DIRECT alignment).
constexpr int64_t kSaveStagingBytes = 4LL * 2 * (32LL << 20);
constexpr int64_t kLoadStagingBytes = 8LL * (2 * (32LL << 20) + 2 * 4096);

struct HostMemoryOptions {
  bool cuda = true;                // GPUs (else the CPU device: resident state and GPU buffers are host memory too)
  bool save = true;                // a run may save (--save, --save-every): the writer's staging
  int64_t save_staging_bytes = kSaveStagingBytes;
  int64_t load_staging_bytes = kLoadStagingBytes;  // --init / --resume readers (0: the run loads nothing)
  int64_t process_base_bytes = 0;  // per rank; from HardwareSpec::host_process_gib
  // NVMe tier: per rank, the host staging of the tier's buffers in flight (the worst set). Required (one per rank)
  // when the plan has state on the tier: predict_host_memory throws std::logic_error without it.
  std::vector<int64_t> nvme_staging_bytes;
};

// One stage's host state on its rank.
struct StageHostMemory {
  int stage = 0, gpu = 0;
  int64_t master = 0;   // fp32 master weights
  int64_t moments = 0;  // AdamW exp_avg + exp_avg_sq
  int64_t grads = 0;    // pinned gradient landing zone (compute precision)
  int64_t lowp = 0;     // pinned compute-precision weight copy prefetches read (0 for fp32 with the master on the host)
  int64_t nvme = 0;     // opt(S) on the NVMe tier (master + moments; not host memory, not in total())
  int64_t total() const { return master + moments + grads + lowp; }
};

// One rank's predicted host memory.
struct HostMemory {
  int rank = 0;
  int64_t master = 0, moments = 0, grads = 0, lowp = 0;  // sums over the rank's stages
  int64_t batch = 0;        // pinned step batch (ids + labels)
  int64_t io_staging = 0;   // checkpoint save / load staging (the larger)
  int64_t nvme_staging = 0; // NVMe tier buffers
  int64_t device = 0;       // CPU device only: the plan's GPU-side bound, held in host memory
  int64_t base = 0;         // process base
  int64_t nvme = 0;         // state on the NVMe tier (not host memory, not in total())
  std::vector<StageHostMemory> stages;
  int64_t total() const { return master + moments + grads + lowp + batch + io_staging + nvme_staging + device + base; }
  std::string describe() const;  // "fp32 master 25.1 GiB, AdamW moments 50.2 GiB, ..."
};

HostMemoryOptions host_memory_options(const HardwareSpec&);
// Per rank (index = pipeline rank). `device_bound`: per rank GPU bound (verify-memory), used only when !o.cuda.
// Data parallelism (dp > 1): an offloaded stage's CPU optimizer is sharded over the dp replicas (ZeRO), so its fp32
// master, moments and gradient landing zone count 1/dp (replica 0's shard, the largest); its compute-precision copy
// stays whole. Every replica of a pipeline rank holds the same (check_host_memory counts each).
std::vector<HostMemory> predict_host_memory(const ir::Plan&, const HostMemoryOptions&,
                                            const std::vector<int64_t>& device_bound = {});

// Ranks share their node's host memory: rank r is on node r / gpus_per_node. `per_pipe` is predict_host_memory's
// answer; with `layout` (dp, tp > 1) every world rank counts, with its pipeline rank's prediction. The node has
// host_mem_gib, or the plan's host budget (--host-budget, bytes; 0 = none) when one is given and smaller.
struct HostMemoryCheck {
  bool ok = true;
  int node = 0;             // the worst node
  int64_t needed = 0;       // its ranks' total
  int64_t available = 0;    // host_mem_gib, or the host budget
  bool by_budget = false;   // available is the host budget
  std::string message;      // when !ok: head; breakdown
  std::string head;         // "host memory: the plan needs X of host memory but ... has Y (...), Z missing"
  std::string breakdown;    // "rank r: fp32 master ..." (its largest rank)
};
HostMemoryCheck check_host_memory(const std::vector<HostMemory>& per_pipe, const HardwareSpec&,
                                  int64_t host_budget_bytes = 0, const ir::Plan* layout = nullptr);
// The plan's layout and its host budget.
inline HostMemoryCheck check_host_memory(const std::vector<HostMemory>& per_pipe, const HardwareSpec& hw,
                                         const ir::Plan* layout) {
  return check_host_memory(per_pipe, hw, layout ? layout->host_budget_bytes : 0, layout);
}

}  // namespace mmoc
