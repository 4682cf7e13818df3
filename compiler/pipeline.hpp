// The compiler's front door: job -> Plan through the pass pipeline (passes/pass.hpp), timed by the
// simulator, and the search over free knobs (`v auto`, `schedule auto`).
#pragma once
#include <iosfwd>
#include <string>
#include <vector>

#include "cost/simulator.hpp"
#include "cost/spec.hpp"
#include "ir/plan.hpp"

namespace mmoc {

struct CompileOptions {
  std::vector<std::string> print_after;  // pass names or "all"
  std::string stop_after;                 // a pass name: stop after it (the plan as it left it, not timed)
  std::ostream* print_stream = nullptr;
  std::ostream* progress = nullptr;       // one line per candidate during auto search
};

struct CompileResult {
  ir::Plan plan;
  SimResult sim;
  std::vector<int64_t> bound;  // verify-memory's per-GPU bound
  std::vector<std::string> notes;
  double compile_ms = 0;
  int candidates = 1;
  bool stopped = false;        // stopped before the end (stop_after): no simulation, no predicted section
};

// Checks the job's knobs against model and hardware; throws InputError with one clear message.
void validate_job(const JobConfig&, const ModelSpec&, const HardwareSpec&);
// The plan header (no stages/programs yet) for a job with concrete v and schedule.
ir::Plan initial_plan(const JobConfig&, const ModelSpec&, const HardwareSpec&, int v, const std::string& schedule);
// Compiles one concrete (v, schedule).
CompileResult compile_one(const JobConfig&, const ModelSpec&, const HardwareSpec&, int v, const std::string& schedule,
                          const CompileOptions&);
// The job a plan was compiled from, as far as the plan says (gpus, v, schedule, micro-batching, budget, training);
// the knobs (recompute, offload, cross_map) and the names of model and hardware stay those of `knobs`.
JobConfig job_of_plan(const JobConfig& knobs, const ir::Plan&);
// Continues a plan written after pass `start_after` (as --stop-after writes it): rebuilds the context the passes
// up to it leave from the plan (their recover hooks), then runs the rest of the pipeline (as llc's -start-after does).
// `j` should be job_of_plan(...). Throws InputError when the plan does not fit the job, model or hardware, or is
// malformed.
CompileResult compile_from(const JobConfig& j, const ModelSpec&, const HardwareSpec&, ir::Plan plan,
                           const std::string& start_after, const CompileOptions&);
// Compiles the job, searching v and/or the schedule when they are "auto": the fastest feasible plan wins.
CompileResult compile_job(const JobConfig&, const ModelSpec&, const HardwareSpec&, const CompileOptions&);
// Human summary: stages and GPUs, predicted step time and tokens/s, per-GPU peak against the budget.
std::string summary(const CompileResult&, const ModelSpec&, const HardwareSpec&);

}  // namespace mmoc
