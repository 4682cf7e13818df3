// Pass framework: a named transformation of the Plan held in a PassContext, with its contract (what it requires
// and guarantees: docs/passes.md is generated from these strings) and a way to rebuild the context state it leaves
// from the plan it produced (so a run can start after any pass from a text plan: mmoc-compile --start-after). The
// pass manager runs the passes and, after each, the invariant checkers registered with it (as XLA's
// AddInvariantChecker); it can print the plan after any pass.
//
// Pipeline (compiler/pipeline.cpp, top to bottom):
//   partition -> cross-map -> schedule -> comm-lowering -> tied-embeddings -> offload-insertion -> overlap ->
//   data-parallel -> tp-lowering -> linearize
// Default checkers: structure (ir::verify_structure) and deadlock in stream semantics (verify_deadlock) whenever the
// plan has programs; deadlock in sequential semantics once the programs are linearized; memory (verify_memory) once
// offload-insertion has made the plan's memory explicit.
#pragma once
#include <functional>
#include <iosfwd>
#include <optional>
#include <string>
#include <vector>

#include "cost/host_memory.hpp"
#include "cost/spec.hpp"
#include "ir/plan.hpp"

namespace mmoc {

// What offload-insertion chose and overlap refines: which stages keep weights and optimizer state on the GPU, whether
// stages recompute their forward in backward (grouped schedules force it on where weights leave between forward and
// backward, and for the head), and how many weight runs a prefetch may run ahead of use.
struct OffloadConfig {
  std::vector<char> resident;  // per stage
  bool recompute = true;
  int window = 1;
  // With recompute, per stage: how many of its last layers keep their stash (partial recompute; >= its layers: no
  // recompute at all). Ignored for stages the schedule forces to recompute. Empty: 0 everywhere (whole stages).
  std::vector<int> keep;
  std::vector<char> nvme;      // per stage (empty = none): its opt(S) lives on the NVMe tier (docs/nvme-tier.md)
  // per stage (empty = none): its layers that keep their stash keep only part of it (Stage::selective); set only where
  // it applies (stage_selects), in offload-insertion's normal form
  std::vector<char> selective;
  bool operator==(const OffloadConfig&) const = default;
};

struct PassContext {
  const JobConfig& job;
  const ModelSpec model;  // as one tensor-parallel rank of the job's tp sees it (with_tp): per-shard sizes and times
  const HardwareSpec& hw;
  CostModel cost;         // refers to `model`: the context is neither copied nor moved
  ir::Plan plan;
  // State the passes leave for later passes and the checkers. Each is recoverable from the plan (Pass::recover).
  bool memory_complete = false;          // offload-insertion on: buffers and frees are explicit
  bool linearized = false;               // linearize: each program's order is an execution order
  std::optional<OffloadConfig> offload;  // offload-insertion's choice; overlap widens the window
  ir::Plan pre_offload;                  // the plan as comm-lowering left it (overlap re-lowers it)
  std::vector<std::string> notes;        // decisions, printed by --verbose
  PassContext(const JobConfig& j, const ModelSpec& m, const HardwareSpec& h)
      : job(j), model(with_tp(m, j.tp)), hw(h), cost{model, h, j.train.precision == "fp32" ? 4 : 2} {}
  PassContext(const PassContext&) = delete;
  PassContext& operator=(const PassContext&) = delete;
  int64_t budget() const { return plan.budget_bytes; }
  int act_bytes() const { return cost.act_bytes; }
};

struct Pass {
  std::string name;
  std::function<void(PassContext&)> run;
  std::string contract;                        // requires / guarantees (docs/passes.md)
  std::function<void(PassContext&)> recover;   // sets the context state this pass leaves, from c.plan (may be empty)
};

// Checked after every pass (when it applies); throws: std::logic_error for an internal error of the compiler,
// InputError for a plan that cannot meet the user's constraints (the memory budget).
struct InvariantChecker {
  std::string name;
  std::function<bool(const PassContext&)> applies;
  std::function<void(const PassContext&, const std::string& after_pass)> check;
  std::string doc;  // what it checks and when (docs/passes.md)
};

// The passes (one per file in passes/), their contracts and recover hooks.
extern const char* const kPartitionContract;
extern const char* const kCrossMapContract;
extern const char* const kScheduleContract;
extern const char* const kCommLoweringContract;
extern const char* const kTiedEmbeddingsContract;
extern const char* const kOffloadInsertionContract;
extern const char* const kOverlapContract;
extern const char* const kDataParallelContract;
extern const char* const kTpLoweringContract;
extern const char* const kLinearizeContract;
void recover_offload_insertion(PassContext&);
void recover_overlap(PassContext&);
void recover_linearize(PassContext&);
void partition_pass(PassContext&);
void cross_map_pass(PassContext&);
void schedule_pass(PassContext&);
void comm_lowering_pass(PassContext&);
void tied_embeddings_pass(PassContext&);
// A tied model (lm_head = the token embedding) with more than one stage: tied-embeddings plumbs the shared matrix.
bool tied_over_stages(const ir::Plan&);
void offload_insertion_pass(PassContext&);
void overlap_pass(PassContext&);
void data_parallel_pass(PassContext&);  // dp > 1: gradient allreduce per stage (data_parallel.cpp)
void tp_lowering_pass(PassContext&);  // tp > 1: the tensor-parallel collectives as instructions (tp_lowering.cpp)
void linearize_pass(PassContext&);
// tp-lowering's rewrite of a plan (and its inverse: each segmented forward/backward as one whole instruction, the
// part/partgrad collectives and buffers gone). lower_tp leaves a plan with tp 1, or already in segments, unchanged.
void lower_tp(ir::Plan&);
void unlower_tp(ir::Plan&);

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
// only_gpu >= 0: that GPU's bound alone (the others' stay 0), for searches that change one GPU's stages
MemoryBound memory_bound(const ir::Plan&, int only_gpu = -1);
// The NVMe tier's host staging per rank (passes/tier_staging.cpp): the worst set of opt(S) buffers between their
// `read` and `write` that may be in host memory at once under the dependencies (ir::VerifyError when a read and a
// write do not pair up). host_memory_options(hw, plan): cost/host_memory.hpp's options with it filled in, for
// predict_host_memory of a plan that may have state on the tier (the one host-memory model).
std::vector<int64_t> tier_staging_bytes(const ir::Plan&);
HostMemoryOptions host_memory_options(const HardwareSpec&, const ir::Plan&);
// Throws InputError naming the smallest budget or the knob to change when a GPU's bound exceeds the budget.
void verify_memory(const PassContext&);

// Pass manager: runs its passes in order, after each one every registered checker that applies, and prints the plan
// after the passes named in print_after ("all" = every pass).
struct PassManagerOptions {
  std::vector<std::string> print_after;  // pass names; "all" = every pass
  std::ostream* print_stream = nullptr;
  bool verify = true;                    // run_passes: register the default checkers
};
class PassManager {
 public:
  PassManager() = default;
  explicit PassManager(std::vector<Pass> passes) : passes_(std::move(passes)) {}
  void add_pass(Pass p) { passes_.push_back(std::move(p)); }
  void add_invariant_checker(InvariantChecker c) { checkers_.push_back(std::move(c)); }
  const std::vector<Pass>& passes() const { return passes_; }
  const std::vector<InvariantChecker>& checkers() const { return checkers_; }
  void run(PassContext&, const PassManagerOptions&) const;

 private:
  std::vector<Pass> passes_;
  std::vector<InvariantChecker> checkers_;
};
std::vector<InvariantChecker> default_invariant_checkers();
// A PassManager with these passes and, when o.verify, the default checkers.
void run_passes(PassContext&, const std::vector<Pass>&, const PassManagerOptions&);
std::vector<Pass> default_pipeline();
std::vector<std::string> pass_names();
// Index of a pass of default_pipeline() by name; throws InputError naming the known passes (`what` names the option).
int pass_index(const std::string& name, const std::string& what);
// Rebuilds the context state the passes up to and including `last` leave, from c.plan (their recover hooks).
void recover_context(PassContext&, const std::string& last);
// docs/passes.md: the pipeline and each pass's contract, generated from default_pipeline().
std::string passes_markdown();

// Offload lowering (offload_insertion.cpp): the plan `base` with residency/recompute/window applied, and its inverse
// (the plan as comm-lowering left it, from a lowered plan) and the configuration a lowered plan was made with.
ir::Plan lower_offload(const PassContext&, const ir::Plan& base, const OffloadConfig&);
// Whether stage s must recompute whole under cfg (grouped: an offloaded stage whose weights leave the GPU between its
// forward and backward runs, and the head); such a stage keeps no stash.
bool recompute_forced(const ir::Plan&, const OffloadConfig&, int s);
// Whether stage s of `base` under cfg has a layer that keeps its stash and can keep it selectively
// (ModelSpec::layer_can_select): where cfg.selective[s] has an effect.
bool stage_can_select(const PassContext&, const ir::Plan& base, const OffloadConfig& cfg, int s);
ir::Plan strip_offload(const PassContext&, const ir::Plan& lowered);
OffloadConfig offload_config_of(const PassContext&, const ir::Plan& lowered);
// NVMe tier (passes/tier_placement.cpp): moves the opt(S) of offloaded stages to the plan's nvme paths until every
// node's predicted host memory (cost/host_memory.hpp) fits its host_mem_gib and the plan's host budget (cfg and plan
// updated; --nvme-place all: every offloaded stage). Returns the decision for --verbose. HostMemoryError naming the
// missing host memory when even every offloaded stage on the tier does not fit (or there are no paths);
// InputError naming the path and the missing bytes when a path that exists here lacks the space.
std::string place_on_tier(const PassContext&, const ir::Plan& base, OffloadConfig& cfg, ir::Plan& plan);
// The NVMe tier's update order (passes/update_order.cpp, docs/nvme-tier.md): the job's update_order (auto | fixed |
// alternate) applied to a finished plan. alternate makes the plan a two-step one (ir::Plan::odd_programs): even steps
// update the tier stages as the fixed plan does (highest first, overlapping the backward) and keep the last
// kTierSlots updated in host memory; odd steps update them after the backward, lowest first, the kept ones first
// without a read, and keep the last kTierSlots for the next even step. auto takes it when the simulated mean step
// is faster. Returns the decision for --verbose ("" when there is nothing to decide).
std::string apply_update_order(const PassContext&, ir::Plan& plan);
// The alternating plan made from a one-body plan with the NVMe tier (nullopt when no rank has more tier stages than
// staging slots, so there is nothing to keep).
std::optional<ir::Plan> alternate_update_order(const ir::Plan& fixed);
constexpr int kTierSlots = 2;  // opt(S) buffers of a rank in host memory at once (offload_insertion.cpp's add_tier_io)
// Stage cost fields (partition.cpp) from its layers and recompute flag; stash bytes per micro-batch.
void fill_stage_costs(const PassContext&, ir::Stage&);
int64_t stage_stash_bytes(const PassContext&, const ir::Stage&);
// Bytes of one activation (and of its gradient) handed between stages: mbs x seq x hidden in compute precision.
int64_t boundary_bytes(const PassContext&);
// Cross mapping (cross_map.cpp): the physical GPU of each world rank of a layout pp x dp x tp (the pass's contract
// says by which keys), the same for n pipeline ranks alone (dp = tp = 1), and an order's Mobius cost (dp = tp = 1).
std::vector<int> cross_map_layout(const HardwareSpec&, int gpus, int dp, int tp);
std::vector<int> cross_map_order(const HardwareSpec&, int n);
double cross_map_cost(const HardwareSpec&, const std::vector<int>& order);
// The links of a plan's process groups (ir::process_groups but "world") on its mapping: each group's physical GPUs in
// rank order, the slowest link of its ring (HardwareSpec::ring_gbps; of a pipeline "pp.r<d>": of its neighbour pairs)
// and that link's kind ("" when p2p_links does not list it). describe_layout_links: one line of them for the summary ("tp.g0.r0 GPUs 0,2 40 GB/s (nvlink); ...").
struct GroupLink {
  std::string name;
  std::vector<int> gpus;
  double gbps = 0;
  std::string kind;
};
std::vector<GroupLink> layout_links(const HardwareSpec&, const ir::Plan&);
std::string describe_layout_links(const HardwareSpec&, const ir::Plan&);
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
