// mmoc-viz: reads Chrome traces (docs/plan-format.md, "Simulator trace") and mmoc plan JSON, computes
// per-GPU statistics and renders one self-contained HTML page (canvas timeline, memory curves, tables),
// and optionally a merged Chrome/Perfetto trace. Plans (JSON or text form) are read by ir::load_plan_file.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ir/plan.hpp"

namespace mmoc::viz {

// Bad user input: the message names the file and the problem. main() maps it to exit code 2.
struct InputError : std::runtime_error { using std::runtime_error::runtime_error; };

// the plan's streams are the trace's lanes (ir::Stream's order): comp, h2d, d2h, p2p, the CPU thread lanes from 4 (cpu,
// io; a measured trace may have more), and kOpt, the GPU optimizer's CUDA stream: a GPU lane, never merged with the CPU's
enum Lane { kComp = 0, kH2D = 1, kD2H = 2, kP2P = 3, kCpu0 = 4, kOpt = 6 };
inline int plan_lane(int stream_or_tid) { return stream_or_tid == kOpt ? kOpt : stream_or_tid < kCpu0 ? stream_or_tid : kCpu0; }

struct Box {
  int gpu = 0, lane = 0;
  double ts = 0, dur = 0;  // microseconds, ts relative to the trace start
  std::string name, op;
  int stage = -1, mb = -1, instr = -1;
  int64_t bytes = 0;
  std::string deps, buf;
};

struct GpuStats {
  int gpu = 0;
  double span_us = 0;   // last end of any box of this GPU (relative to trace start)
  double busy_us = 0;   // union of comp-lane intervals
  double bubble = 0;    // 1 - busy / step
  int64_t h2d_bytes = 0, d2h_bytes = 0, p2p_bytes = 0;
  double h2d_util = -1, d2h_util = -1;  // fraction of link capacity; -1 when no rate is known
  double h2d_gbps = 0, d2h_gbps = 0;    // bytes / step time, GB/s
  int64_t peak_bytes = -1;              // -1 unknown
  std::map<int, int> boxes_per_lane;
};

struct Trace {
  std::string file, role;   // role: "predicted" | "measured" (the command-line slot)
  std::string source;       // metadata.source as written in the file ("" if absent)
  nlohmann::json metadata = nlohmann::json::object();
  nlohmann::json raw_events = nlohmann::json::array();  // as read (for --perfetto)
  double t0 = 0;            // absolute start (us) subtracted from every ts
  double end_us = 0;        // last end relative to t0
  std::vector<Box> boxes;   // sorted by (gpu, lane, ts)
  std::map<int, std::vector<std::pair<double, double>>> mem;  // gpu -> (ts rel, bytes), sorted
  std::map<std::pair<int, int>, std::string> lane_names;      // (gpu, tid) -> name from M events
  std::vector<int> gpus;    // sorted
  // derived
  double step_us = 0;       // metadata.step_s if > 0, else end_us
  double tokens_per_s = -1; // metadata, else derived from the plan, else -1
  int64_t budget = -1;      // metadata.budget_bytes, else plan budget, else -1
  double h2d_rate = 0, d2h_rate = 0;  // link bytes/s from metadata (0 = unknown)
  std::vector<GpuStats> stats;        // per gpu (same order as gpus)
  double bubble = 0;                  // mean over GPUs
};

struct PlanInfo {
  std::string file;
  mmoc::ir::Plan plan;  // as ir::load_plan_file read it
  int gpus = 0, microbatches = 0, mbs = 0, seq = 0, dp = 1;
  int64_t budget = -1;
  bool has_predicted = false;
  // From "programs": per GPU, the trace lane of each instruction's stream (comp 0, h2d 1, d2h 2, p2p 3, cpu 4;
  // -1 for an unknown stream), and the number of instructions per (gpu, lane).
  std::map<int, std::vector<int>> instr_lane;
  std::map<std::pair<int, int>, int> stream_counts;
};

// Loading. Throw InputError naming `path` on a missing/unreadable file, invalid JSON, or a document
// of the wrong kind ("expected a trace, got a plan", ...). role is "predicted" or "measured". A plan is JSON or
// the text form.
Trace load_trace(const std::string& path, const std::string& role);
PlanInfo load_plan(const std::string& path);

// Fills the derived fields of t (plan may be null).
void compute_stats(Trace& t, const PlanInfo* plan);

// Where a trace disagrees with the plan it was given with: boxes per (gpu, lane) vs the plan's instructions per
// (gpu, stream), and boxes whose args.instr is out of range or sits on another stream than in the plan.
// One line per problem (at most a few per kind); empty when consistent. Shown as warnings, not errors.
std::vector<std::string> compare_with_plan(const Trace& t, const PlanInfo& plan);

// Output documents.
std::string render_html(const std::vector<Trace>& traces, const PlanInfo* plan);
std::string perfetto_json(const std::vector<Trace>& traces);

// Operation kind used for colours: forward backward prefetch evict send recv optim other.
std::string kind_of(const std::string& op);

}  // namespace mmoc::viz
