// Pass framework: a named transformation of the Plan held in a PassContext, run by a PassManager
// that verifies the plan after every pass and can print it after any pass.
//
// Pipeline (compiler/pipeline.cpp, top to bottom):
//   partition -> cross-map -> schedule -> comm-lowering -> offload-insertion -> overlap -> linearize
// Verifiers after every pass: structure (ir::verify_structure), deadlock (verify_deadlock), and, once
// offload-insertion has made the plan's memory explicit, memory (verify_memory).
#pragma once
#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

#include "cost/spec.hpp"
#include "ir/plan.hpp"

namespace mmoc {

struct PassContext {
  const JobConfig& job;
  const ModelSpec& model;
  const HardwareSpec& hw;
  CostModel cost;
  ir::Plan plan;
  bool memory_complete = false;  // set by offload-insertion: buffers and frees are explicit from here on
  int prefetch_window = 1;       // weight runs a prefetch may run ahead (overlap pass raises it)
  std::vector<std::string> notes;  // decisions, printed by --verbose
  // Chosen by offload-insertion, re-used by overlap (which re-lowers with a wider prefetch window).
  ir::Plan pre_offload;            // the plan as comm-lowering left it
  std::vector<char> resident;      // per stage: weights and optimizer state stay on the GPU
  bool sim_available = true;       // passes may call the simulator
  PassContext(const JobConfig& j, const ModelSpec& m, const HardwareSpec& h)
      : job(j), model(m), hw(h), cost{m, h, j.train.precision == "fp32" ? 4 : 2} {}
  int64_t budget() const { return plan.budget_bytes; }
  int act_bytes() const { return cost.act_bytes; }
};

struct Pass {
  std::string name;
  std::function<void(PassContext&)> run;
};

// The passes (one per file in passes/).
void partition_pass(PassContext&);
void cross_map_pass(PassContext&);
void schedule_pass(PassContext&);
void comm_lowering_pass(PassContext&);
void offload_insertion_pass(PassContext&);
void overlap_pass(PassContext&);
void linearize_pass(PassContext&);

// Verifiers. verify_deadlock: untimed execution of all programs (in-order streams, `after` deps,
// send/recv rendezvous); `sequential` treats each program as one in-order queue (how the CPU engine runs it).
// Returns "" when the plan completes, else a report of what is stuck.
std::string verify_deadlock(const ir::Plan&, bool sequential);
// Timing-independent upper bound of each GPU's memory (bytes): at every allocation point, the sum of
// all buffers that may be live under some execution order allowed by the dependencies.
struct MemoryBound {
  std::vector<int64_t> bound;       // per GPU
  std::vector<int> worst_instr;     // per GPU: allocation point where the bound is reached
  std::vector<int64_t> persistent;  // per GPU: resident buffers
};
MemoryBound memory_bound(const ir::Plan&);
// Throws InputError naming the smallest budget or the knob to change when a GPU's bound exceeds the budget.
void verify_memory(const PassContext&);

// Pass manager: runs the passes in order with the verifiers after each.
struct PassManagerOptions {
  std::vector<std::string> print_after;  // pass names; "all" = every pass
  std::ostream* print_stream = nullptr;
  bool verify = true;
};
void run_passes(PassContext&, const std::vector<Pass>&, const PassManagerOptions&);
std::vector<Pass> default_pipeline();
std::vector<std::string> pass_names();

// Offload lowering (offload_insertion.cpp): the plan `base` with residency/recompute/window applied.
struct OffloadConfig {
  std::vector<char> resident;  // per stage
  bool recompute = true;
  int window = 1;
};
ir::Plan lower_offload(const PassContext&, const ir::Plan& base, const OffloadConfig&);
// Stage cost fields (partition.cpp) from its layers and recompute flag; stash bytes per micro-batch.
void fill_stage_costs(const PassContext&, ir::Stage&);
int64_t stage_stash_bytes(const PassContext&, const ir::Stage&);
// Bytes of one activation (and of its gradient) handed between stages: mbs x seq x hidden in compute precision.
int64_t boundary_bytes(const PassContext&);
// Cross mapping (cross_map.cpp): best order of physical GPUs for n pipeline ranks, and its Mobius cost.
std::vector<int> cross_map_order(const HardwareSpec&, int n);
double cross_map_cost(const HardwareSpec&, const std::vector<int>& order);
// Schedules (schedule.cpp).
const std::vector<std::string>& schedule_names();
void check_schedule(const std::string& schedule, int gpus, int v, int microbatches);
// Moves instruction `from` to position `to` (to <= from), fixing `after` indices.
void move_instr(ir::Program& p, int from, int to);

// Helpers shared by passes.
int last_stage(const ir::Plan&);
// Inserts `in` at position pos of program p, fixing every `after` index >= pos. Returns pos.
int insert_instr(ir::Program& p, int pos, ir::Instr in);
// Index of the forward/backward of (stage, mb) in program p, or -1.
int find_compute(const ir::Program& p, ir::Op op, int stage, int mb);
ir::Instr make_compute(ir::Op op, int stage, int mb);
ir::Instr make_buf_op(ir::Op op, ir::Stream s, ir::BufRef b);

}  // namespace mmoc
