// The per-rank interpreter of a Plan: one handler per instruction kind, each asserting its preconditions
// (weights resident before forward, no second recv of a present buffer, ...). It never decides a schedule:
// it runs programs[rank] as written. On the CPU device every stream is the calling thread, so the program runs
// in its (linearized, deadlock-checked) order; the host state is the same as on a GPU machine: fp32 master
// weights, AdamW moments and gradient landing buffers per offloaded stage, a fused multithreaded AdamW.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ir/plan.hpp"

namespace mmoc::comm { class Transport; }
namespace mmoc::engine::data { struct StepBatch; }

namespace mmoc::engine {

struct WorkerOptions {
  std::string device = "cpu";  // cpu | cuda
  int cuda_device = -1;        // -1: LOCAL_RANK
  int optim_threads = 0;       // 0: hardware threads / local ranks
  bool trace = false;          // record per-instruction timings (measured trace)
  int max_ahead = -1;          // CUDA: compute instructions the host may issue ahead of the GPU (-1: MMOC_MAX_AHEAD or 2; 0: unbounded)
  std::vector<std::string> nvme;  // NVMe tier directories instead of the plan's (same count); empty: the plan's
  // CUDA: the caching allocator's pool of prefetched weights: "h2d" (the copy's own stream) or "comp" (the compute
  // stream's, which holds every other large buffer: memory a stream frees can only serve that stream's allocations
  // until the allocator releases its cache at the cap, a device-wide synchronisation; the copy then waits for the
  // compute stream's work issued before it)
  std::string prefetch_pool = "h2d";
};

struct StepResult {
  double loss = 0;             // mean token loss of the step (all ranks agree)
  int64_t tokens = 0;          // tokens that count in the loss
  double grad_norm = -1;       // global gradient norm (before clipping; over the gradients of this step)
  bool finite = true;          // loss and gradient norm are finite (all ranks agree)
  bool skipped = false;        // non-finite and known before any update (the plan's gradnorm): no weight or optimizer
                               // state changed in this step
  double seconds = 0;
  int64_t peak_bytes = 0;      // this rank's peak device bytes (plan-accounted buffers on CPU; allocator reserved on CUDA)
  int64_t peak_allocated = 0;  // CUDA: the allocator's peak of allocated (live tensor) bytes; CPU: = peak_bytes
  int64_t outside_bytes = 0;   // CUDA: device memory this process holds outside the allocator (context, NCCL)
  // CUDA: allocations in this step that found no cached block under the cap, so the caching allocator released its
  // cached memory (a device-wide synchronisation) and retried: each one stalls the streams (0 on the CPU)
  int64_t alloc_retries = 0;
  double lr = 0;
  // NVMe tier (this rank, this step): bytes read and written, and the time the reads and writes took
  int64_t tier_read_bytes = 0, tier_write_bytes = 0;
  double tier_read_s = 0, tier_write_s = 0;
};

struct LoadReport {  // setting up the weights (and optimizer state)
  double seconds = 0;       // in all: reads, conversions, copies to the device
  double read_seconds = 0;  // the parallel reads alone
  int64_t bytes = 0;        // read from disk by this rank
};

struct SaveReport {  // this rank's part of a checkpoint
  int64_t bytes = 0;
  double seconds = 0;           // writing it (wall time, background or not)
  double optimizer_wait_s = 0;  // background: how long optimizer steps waited for it
};

struct TraceEvent {  // one executed instruction (for the measured trace)
  int instr = 0;
  int lane = 0;
  double start_us = 0, dur_us = 0;
  int64_t bytes = 0;
};

// True when on every rank each optimizer step waits for the global gradient norm (gradnorm), so a non-finite step
// can be skipped before any update. Plans compiled with clipping or train.on_nonfinite = "skip" have this.
bool updates_wait_for_gradnorm(const ir::Plan& plan);

class Worker {
 public:
  // transport: send/recv (gloo on the CPU, NCCL on the GPU; may be null for one rank). host_transport: host-side
  // collectives (gradient norm, loss, barriers); defaults to `transport`. On CUDA, create the NCCL transport on
  // p2p_stream() after construction and pass it with set_transports().
  Worker(const ir::Plan& plan, int rank, comm::Transport* transport, const WorkerOptions& opts);
  void set_transports(comm::Transport* p2p, comm::Transport* host);
  void* p2p_stream() const;  // cudaStream_t of the p2p stream (null on the CPU)
  // CUDA: cap the caching allocator so that it plus what the process already holds outside it (context, NCCL
  // buffers; measured now) stays within the plan's budget. Call after the transport is up. Returns the outside bytes.
  int64_t apply_budget();
  int device_index() const;  // CUDA device of this rank (-1 on the CPU)
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  LoadReport init_random(uint64_t seed);          // multithreaded, deterministic per (seed, parameter, element)
  LoadReport load_hf(const std::string& dir);     // an HF checkpoint, read in parallel
  LoadReport load_checkpoint(const std::string& dir);  // an mmoc checkpoint: weights, AdamW state and steps (--resume)
  // One training step (0-based index: picks the learning rate). All ranks pass the same batch.
  StepResult step(const data::StepBatch& batch, int64_t step_index);

  // Checkpoints (engine/model/train_checkpoint.hpp): this rank writes its stages into `dir` (a staging folder that
  // exists, with mmoc_state/), each byte once. background: on a thread while steps go on; each stage's next
  // optimizer update then waits until that stage's files are written (extra host memory: save_host_bytes()).
  // finish_save() waits for this rank's part (rethrowing its error); rank 0 then calls finalize_checkpoint().
  void begin_save(const std::string& dir, bool bf16_weights, bool background);
  bool save_active() const;
  SaveReport finish_save();
  int64_t save_host_bytes() const;
  const std::vector<TraceEvent>& trace() const;
  int rank() const;

  struct Impl;
 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace mmoc::engine
