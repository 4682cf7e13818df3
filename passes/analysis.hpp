// Analyses shared by the verifiers, offload-insertion and the engine's bookkeeping tests:
// what each instruction allocates and frees on its GPU (the op table's effects, ir/ops.hpp), and the
// happens-before order of all instructions of all programs.
#pragma once
#include <cstdint>
#include <vector>

#include "ir/ops.hpp"
#include "ir/plan.hpp"

namespace mmoc {

struct Lifetime {
  int gpu = 0;
  ir::BufRef buf;
  int64_t bytes = 0;
  int alloc = -1;  // instruction index that allocates (at its start); -1 = persistent (whole step)
  int free = -1;   // instruction index that frees (at its end); -1 = never within the step
};
struct MemoryEvents {
  std::vector<Lifetime> lifetimes;
  std::vector<std::vector<int64_t>> transient;  // [gpu][instr] workspace bytes while it runs
};
// Walks each program in order; throws ir::VerifyError on a use of an absent buffer, a second allocation
// of a present one, or a free of an absent one (naming gpu and instruction).
MemoryEvents memory_events(const ir::Plan&);

// Happens-before over all instructions: node id = offset[gpu] + index. A send and its recv start and end
// together (rendezvous), so they share one node. hb(a, b): a ends before b starts in every execution.
struct HappensBefore {
  std::vector<int> offset;          // per gpu
  std::vector<int> node;            // global instr id -> node
  int nodes = 0;
  std::vector<std::vector<uint64_t>> anc;   // node -> bitset of strict ancestors
  std::vector<std::vector<uint64_t>> desc;  // node -> bitset of strict descendants (with_descendants only)
  bool cyclic = false;
  bool hb(int gpu_a, int a, int gpu_b, int b) const;
  int node_of(int gpu, int i) const { return node[offset[gpu] + i]; }
  static bool has(const std::vector<uint64_t>& set, int n) { return (set[n >> 6] >> (n & 63)) & 1ULL; }
};
// with_descendants: also fill desc, so that "does x happen after a" reads a's row (memory_bound asks it of every
// buffer at every allocation point)
HappensBefore happens_before(const ir::Plan&, bool with_descendants = false);

}  // namespace mmoc
