// The op table: one entry per instruction kind (as XLA's opcode list and MLIR's op definitions do) saying
//   - which operand fields of Instr it carries, and its text syntax after the op name;
//   - the streams it may run on and the one the compiler puts it on;
//   - how the executors pair it (send/recv rendezvous) and time it (which cost-model class);
//   - its memory effect on its GPU: the buffers it requires, allocates (at its start) and frees (at its end), and
//     the transient workspace it holds while it runs.
// The same table drives the text form (print/parse), the structural verifier, the memory analyses (verify-memory,
// offload-insertion's bound), the executors (verify-deadlock, the simulator) and the engine's leak check, so adding
// an op is one entry here plus its handler in the engine. Also the buffer-kind table. docs/plan-format.md's tables
// describe the same rows (a test checks that every op and kind is documented there).
#pragma once
#include <boost/container/small_vector.hpp>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ir/plan.hpp"

namespace mmoc::ir {

// ---- buffer kinds ------------------------------------------------------------------------------
struct BufKindInfo {
  BufKind kind;
  const char* name;       // "w", "act", ... (to_string / parse_buf_kind)
  bool per_stage;         // named with a stage: w(S3); false: batch(m0)
  bool per_mb;            // one instance per micro-batch: act(S2,m5)
  bool persistent_on_gpu; // with home=gpu in the buffer table it is on the GPU all step (not allocated by an op)
  const char* doc;
};
const BufKindInfo& buf_kind_info(BufKind);
const std::vector<BufKindInfo>& buf_kind_table();  // in enum order

// ---- ops -----------------------------------------------------------------------------------------
// Operand fields an op carries (bit set). Fields an op does not carry are normally unset; the text form prints
// them after the rest (stage=.. mb=.. buf=.. peer=.. to_host=1) so that it is lossless.
enum Operand : uint32_t {
  kOpStage = 1u << 0,   // S<s>
  kOpMb = 1u << 1,      // m<k>
  kOpBuf = 1u << 2,     // a buffer
  kOpPeer = 1u << 3,    // g<k>
  kOpTag = 1u << 4,     // tag=<T> (required)
  kOpGroup = 1u << 5,   // group=<G> (required)
  kOpToHost = 1u << 6,  // the optional "-> host"
};

constexpr uint32_t stream_bit(Stream s) { return 1u << (unsigned)s; }

// How the timed executor (cost/simulator) times an op; the cost model gives the numbers.
enum class Timing : uint8_t {
  Instant,        // no time (load_batch, free)
  StageForward,   // the stage's fwd_ms
  StageBackward,  // the stage's bwd_ms
  HostToDevice,   // the buffer's bytes over the host link (bandwidth shared with the other transfers)
  DeviceToHost,   // the buffer's bytes back over the host link when the op copies it (evict -> host), else none
  PeerToPeer,     // the buffer's bytes GPU to GPU (a rendezvous: both ends take the time together)
  Collective,     // a collective over the buffer (allreduce)
  Optimizer,      // AdamW of the stage: on the cpu stream host-memory bound, on a GPU stream device-memory bound
  GradNorm,       // the global gradient norm
  TierRead,       // the buffer's bytes from the NVMe tier (each path's read bandwidth, shared by the node)
  TierWrite,      // the buffer's bytes to the NVMe tier (each path's write bandwidth, shared by the node)
};

// How the executors pair an op with ops of other programs.
enum class Sync : uint8_t {
  None,
  PairSource,  // starts together with its sink on GPU `peer` (same tag): send
  PairSink,    // starts together with its source on GPU `peer` (same tag): recv
};

// One memory effect, named relative to the instruction.
enum class Access : uint8_t {
  Require,        // must be on the GPU at the start
  Alloc,          // allocated at the start (must be absent)
  AllocIfAbsent,  // allocated at the start unless present (a gradient accumulated over micro-batches)
  Free,           // freed at the end (must be present)
  FreeIfPresent,  // freed at the end when present
};
enum class Ref : uint8_t {
  Operand,  // the instruction's buffer operand
  W,        // w(S)
  WGrad,    // wgrad(S)
  ActOut,   // act(S,m): this stage's output
  ActIn,    // act(S-1,m): this stage's input
  GradIn,   // grad(S,m): the gradient arriving from stage S+1
  GradOut,  // grad(S-1,m): the gradient this stage passes back
  Stash,    // stash(S,m)
  Batch,    // batch(m)
  Tie,      // tie(S): the tied embedding matrix of the head stage S
  TieGrad,  // tiegrad(S): its gradient
};
enum class When : uint8_t {
  Always,
  NotFirstStage,     // S > 0
  NotLastStage,      // S < last
  FirstOrLastStage,  // S == 0 or S == last (the ids; the labels)
  OffCpu,            // the instruction is not on the cpu stream
  TiedHead,          // S == last > 0 and the model's lm_head is tied to the embedding (stage 0's)
  LastBucket,        // the instruction works on its whole buffer or on its last bucket (Instr::buckets)
  NotLastBucket,     // the instruction works on a bucket of its buffer other than the last
  Host,              // the effect is on the node's host memory, not on the GPU (host_effects; effects skips it)
};
struct EffectRule {
  Access access;
  Ref ref;
  When when = When::Always;
};
enum class Workspace : uint8_t { None, Forward, Backward };  // the stage's fwd_ws / bwd_ws while it runs

struct OpInfo {
  Op op;
  const char* name;
  uint32_t operands;     // Operand bits
  const char* syntax;    // after the name: {stage} {mb} {buf} {peer} {tier}, literal words, [-> host] (kOpToHost)
  uint32_t streams;      // allowed streams (stream_bit)
  Stream natural;        // the stream the compiler puts it on (overlap pass) ...
  uint32_t keeps;        // ... unless it already is on one of these
  bool to_host_d2h;      // ... and with to_host set: d2h
  Sync sync;
  Timing timing;
  std::vector<EffectRule> effects;  // in the order they apply
  Workspace workspace;
  const char* doc;       // what it does (docs/plan-format.md)
};
const OpInfo& op_info(Op);
const std::vector<OpInfo>& op_table();  // in enum order: op_table()[i].op == Op(i)

// An op's syntax split into parts (what follows the op name in the text form):
//   {stage} S<s>   {mb} m<k>   {buf} a buffer name, or ? when unset   {peer} g<k>
//   {tier} a tier name (printed "host"; informational on input)   a literal word   [-> host] sets to_host
enum class SyntaxPart : uint8_t { Stage, Mb, Buf, Peer, SourceTier, Word, ToHost };
struct SyntaxToken {
  SyntaxPart part;
  std::string word;  // Word: the literal
};
const std::vector<SyntaxToken>& syntax_tokens(Op);

// The stream the compiler runs `in` on (the overlap pass assigns it).
Stream natural_stream(const Instr& in);

// ---- memory effects of one instruction --------------------------------------------------------
struct BufEffect {
  Access access;
  BufRef buf;
};
struct Effects {
  boost::container::small_vector<BufEffect, 8> list;  // in the order they apply (no allocation for up to 8)
  int64_t transient = 0;  // workspace bytes held while the instruction runs
  auto begin() const { return list.begin(); }
  auto end() const { return list.end(); }
};
// The effects of `in` on its GPU, from the op table, the stage table (first/last stage, workspaces) and the
// instruction's stream. Operands are taken as they are (the structural verifier checks their ranges first).
Effects effects(const Plan&, const Instr& in);

// The instruction's effects on host memory (the rules marked When::Host): the NVMe tier's staging of opt(S).
Effects host_effects(const Plan&, const Instr& in);

// Buffers on the GPU all step (not allocated by any op): the buffer-table entries with home=gpu of the kinds that
// are persistent there (w, opt), on the GPU of their stage.
std::vector<BufRef> persistent_buffers(const Plan&, int gpu);
bool is_persistent(const Plan&, const BufRef&);

// Bytes an instruction moves (its buffer's size, or its bucket's) when it transfers: prefetch, send, recv,
// allreduce, reduce_scatter, and evict with -> host; else 0.
int64_t transfer_bytes(const Plan&, const Instr& in);

// ---- gradient buckets (Instr::bucket / buckets) -----------------------------------------------
// Bucket boundaries are multiples of kBucketAlign elements from the flat's start (128 bytes in bf16), except where a
// bucket ends at the flat's end or at a ZeRO shard's end.
constexpr int64_t kBucketAlign = 64;
// Elements [begin, end) of bucket k (0-based) of n of a flat of `elems` elements. `shards`: how the flat is split
// over the data-parallel replicas for the sharded CPU optimizer (ZeRO; 1 = not sharded): replica d owns elements
// [d c, (d+1) c) with c = ceil(elems / shards) (zero_shard), and when n is a multiple of shards every bucket lies
// inside one shard, n / shards per shard, interleaved: bucket k is piece k / shards (in order) of shard k % shards, so
// that buckets taken in order reach every replica's shard at the same pace (each replica's CPU update of its part of
// bucket k can start as soon as bucket k is reduced and copied) and a bucket's copy to the host is all or nothing per
// replica. Otherwise the flat is cut into n near-equal aligned pieces, in order. The buckets cover the flat exactly;
// n = 0 or 1 is the whole flat. Throws std::invalid_argument for k out of range or a non-positive shard count.
std::pair<int64_t, int64_t> bucket_range(int64_t elems, int k, int n, int shards);
// Replica d's ZeRO shard of a flat of `elems` elements over `shards` replicas: [begin, end) (maybe empty at the end).
std::pair<int64_t, int64_t> zero_shard(int64_t elems, int d, int shards);
// The shard count a stage's gradient buckets are aligned to: the plan's dp when some program reduce-scatters
// wgrad(S) (the sharded CPU optimizer), else 1.
int bucket_shards(const Plan&, int stage);
// Element size of wgrad(S) in the plan's compute precision (bf16: 2, fp32: 4).
int grad_element_bytes(const Plan&);
// The buffer's bytes that `in` works on: its bucket's when it has one (bucket_range of the buffer's elements), else
// the whole buffer's.
int64_t operand_bytes(const Plan&, const Instr& in);

// ---- sizes fixed by the format -------------------------------------------------------------------
// batch(m): the input ids and the labels of one micro-batch, int64 each.
constexpr int64_t batch_buffer_bytes(int64_t micro_batch_size, int64_t seq_len) { return 2 * 8 * micro_batch_size * seq_len; }

}  // namespace mmoc::ir
