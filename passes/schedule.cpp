// schedule: the order of forward and backward computations on each pipeline rank. The contract
// below is the pass's documentation (docs/passes.md is generated from it).
#include <algorithm>

#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kScheduleContract = R"md(The order of forward and backward computations on each pipeline rank.

- **Requires**: `plan.stages` (stage s on rank s % N).
- **Guarantees**: `programs[r]` holds exactly one forward and one backward per (local stage, micro-batch) on the comp
  stream, in the schedule's order; nothing else.
  - `gpipe`: all forwards (micro-batch major), then all backwards.
  - `1f1b`: v = 1: N-r-1 warm-up forwards, then one forward one backward, then the remaining backwards.
  - `interleaved-1f1b`: v > 1, M % N == 0: Megatron's interleaved order (forward chunks 0..v-1, backward v-1..0,
    micro-batches in groups of N).
  - `grouped`: the offload-friendly order: all micro-batches of a stage back to back (forward: local stages
    ascending; backward: descending), so each stage's weights cross PCIe once per pass.
- **Recovers from the plan**: nothing beyond the programs.
)md";

namespace {
struct Step { ir::Op op; int stage; int mb; };

std::vector<Step> order_for_rank(const std::string& sched, int r, int N, int v, int M) {
  std::vector<Step> out;
  auto F = [&](int s, int m) { out.push_back({ir::Op::Forward, s, m}); };
  auto B = [&](int s, int m) { out.push_back({ir::Op::Backward, s, m}); };
  if (sched == "gpipe") {
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < v; ++c) F(c * N + r, m);
    for (int m = 0; m < M; ++m)
      for (int c = v - 1; c >= 0; --c) B(c * N + r, m);
  } else if (sched == "grouped") {
    for (int c = 0; c < v; ++c)
      for (int m = 0; m < M; ++m) F(c * N + r, m);
    for (int c = v - 1; c >= 0; --c)
      for (int m = 0; m < M; ++m) B(c * N + r, m);
  } else if (sched == "1f1b") {
    int warm = std::min(N - r - 1, M);
    int f = 0, b = 0;
    for (; f < warm; ++f) F(r, f);
    while (f < M) { F(r, f++); B(r, b++); }
    while (b < M) B(r, b++);
  } else if (sched == "interleaved-1f1b") {
    const int total = M * v;
    int warm = std::min((N - r - 1) * 2 + (v - 1) * N, total);
    auto mb_of = [&](int k) { return (k / (N * v)) * N + (k % N); };
    auto fchunk = [&](int k) { return (k / N) % v; };
    auto bchunk = [&](int k) { return v - 1 - (k / N) % v; };
    int f = 0, b = 0;
    for (; f < warm; ++f) F(fchunk(f) * N + r, mb_of(f));
    while (f < total) {
      F(fchunk(f) * N + r, mb_of(f)); ++f;
      B(bchunk(b) * N + r, mb_of(b)); ++b;
    }
    while (b < total) { B(bchunk(b) * N + r, mb_of(b)); ++b; }
  }
  return out;
}
}  // namespace

const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> n = {"gpipe", "1f1b", "interleaved-1f1b", "grouped"};
  return n;
}

// Throws InputError when the schedule cannot take these knobs.
void check_schedule(const std::string& s, int N, int v, int M) {
  const auto& names = schedule_names();
  if (std::find(names.begin(), names.end(), s) == names.end())
    throw InputError("unknown schedule '" + s + "' (known: gpipe, 1f1b, interleaved-1f1b, grouped, auto)");
  if (M < 1) throw InputError("microbatches must be >= 1 (got " + std::to_string(M) + ")");
  if (s == "1f1b" && v != 1)
    throw InputError("schedule 1f1b takes v=1 (got v=" + std::to_string(v) + "); use interleaved-1f1b or grouped for v>1");
  if (s == "interleaved-1f1b") {
    if (v < 2) throw InputError("schedule interleaved-1f1b needs v>=2 (got v=1); use 1f1b");
    if (M % N != 0)
      throw InputError("schedule interleaved-1f1b needs microbatches divisible by gpus: " + std::to_string(M) + " % " +
                       std::to_string(N) + " != 0; use --microbatches " + std::to_string((M / N + 1) * N) + " or grouped");
  }
}

void schedule_pass(PassContext& c) {
  auto& p = c.plan;
  check_schedule(p.schedule, p.gpus, p.v, p.microbatches);
  p.programs.assign(p.gpus, {});
  for (int r = 0; r < p.gpus; ++r) {
    p.programs[r].gpu = r;
    for (const Step& s : order_for_rank(p.schedule, r, p.gpus, p.v, p.microbatches))
      p.programs[r].instrs.push_back(make_compute(s.op, s.stage, s.mb));
  }
}

}  // namespace mmoc
