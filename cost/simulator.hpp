// The timed executor: a discrete-event simulation of all GPUs of a Plan at once, per-stream timelines, host-link
// contention per host group (root complex), CPU optimizer threads, send/recv rendezvous. It shares the queue,
// dependency and rendezvous rules with the untimed executor (ir/exec.hpp) and takes each op's memory effects and
// timing class from the op table (ir/ops.hpp), every duration and rate from the cost model. A plan that cannot make
// progress is reported, not hung. No LibTorch.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cost/spec.hpp"
#include "ir/plan.hpp"

namespace mmoc {

struct SimInterval {  // one executed instruction
  int gpu = 0, instr = 0;
  ir::Stream stream = ir::Stream::Comp;
  int lane = 0;          // trace lane: 0 comp, 1 h2d, 2 d2h, 3 p2p, 4+k cpu thread k
  double start_ms = 0, end_ms = 0;
  int64_t bytes = 0;     // bytes moved (transfers) or 0
};

struct SimResult {
  bool deadlock = false;
  std::string deadlock_report;   // which instructions were stuck, per GPU
  double step_ms = 0;
  double tokens_per_s = 0;
  std::vector<int64_t> peak_bytes;      // per GPU over the simulated timeline
  std::vector<double> compute_busy;     // per GPU fraction of step the comp stream is busy
  double bubble = 0;                    // 1 - mean compute busy fraction
  std::vector<double> h2d_util, d2h_util;  // per GPU fraction of link capacity used
  int64_t tier_read_bytes = 0, tier_write_bytes = 0;  // NVMe tier traffic of the step (all GPUs)
  // A plan of two step bodies (ir::Plan::odd_programs): each body's step time and tier traffic; step_ms and the
  // tier bytes above are their mean, the rest of the result is the even step's. 0 for a one-body plan.
  double even_step_ms = 0, odd_step_ms = 0;
  int64_t even_tier_bytes = 0, odd_tier_bytes = 0;  // read + written
  std::vector<SimInterval> intervals;
  // memory timeline per GPU: (time_ms, bytes) after each change
  std::vector<std::vector<std::pair<double, int64_t>>> memory;
};

struct SimOptions {
  int cpu_optim_threads = 0;   // 0 = hw.cpu_cores / gpus (host threads for the CPU optimizer per GPU)
  bool unit_costs = false;     // every op takes 1 time unit (structure-only runs for deadlock checks)
  // Plans whose transfers are not explicit yet (before comm-lowering): an instruction also waits for the buffers it
  // reads (ir::effects) from the instruction that allocates them, plus their p2p time when that runs on another GPU
  // (unbounded buffering, no link contention).
  bool implicit_transfers = false;
};

SimResult simulate(const ir::Plan&, const HardwareSpec&, const ModelSpec&, const SimOptions& = {});

// Chrome/Perfetto trace JSON in the shape of docs/plan-format.md ("predicted").
std::string trace_json(const ir::Plan&, const SimResult&);

// Fills plan.predicted from a simulation.
void annotate_prediction(ir::Plan&, const SimResult&);

}  // namespace mmoc
