// mmoc Plan IR: one instruction list per GPU, named buffers with sizes and tiers, streams,
// explicit cross-stream dependencies, send/recv tags. The format (JSON and text) is specified in
// docs/plan-format.md; this header is its in-memory form. Depends on nothing else of the project.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mmoc::ir {

// ---- enums ---------------------------------------------------------------------------------
enum class Op {
  LoadBatch,  // load_batch m            : allocate batch(m) (input ids + labels of micro-batch m) on this GPU
  Prefetch,   // prefetch B <- host      : allocate B on the GPU and copy it from its home tier
  Forward,    // forward S m             : run stage S on micro-batch m (see docs for what it allocates)
  Backward,   // backward S m            : backward of stage S on m; consumes stash/input/output-grad
  Send,       // send B -> gK tag=T      : send B to GPU K (B stays allocated until a free)
  Recv,       // recv B <- gK tag=T      : allocate B and receive it from GPU K
  Evict,      // evict B [-> host]       : B leaves the GPU; with -> host it is first copied to its home
  Free,       // free B                  : drop a transient buffer (activation, gradient, batch)
  AllReduce,  // allreduce B group=G     : sum B in place over the named group G (dp: wgrad over the replicas)
  GradNorm,   // gradnorm                : global gradient norm over all stages and ranks (clipping)
  Optim,      // optim S                 : AdamW step of stage S (on cpu: host master; on comp: GPU state)
  AddGrad,    // addgrad B -> S          : add gradient B into wgrad(S) (a tied lm_head's into the embedding's rows)
  TierRead,   // read opt(S) <- nvme     : allocate opt(S) in host memory and read it from the NVMe tier (io stream)
  TierWrite,  // write opt(S) -> nvme    : write opt(S) to the NVMe tier, then drop its host copy (io stream)
  ReduceScatter,  // reduce_scatter B group=G : sum B over G; this rank keeps its 1/|G| shard (ZeRO gradients)
  AllGather,      // allgather B group=G      : the ranks' shards of B's host copy gathered on all of G (ZeRO weights)
};
// Adding an op: append it above, count it here, and give it its entry in ir/ops.cpp's op table (the syntax, streams,
// timing class and memory effects), then its handler in the engine. The table's test checks the count.
constexpr int kNumOps = (int)Op::AllGather + 1;
// io: the NVMe tier's I/O threads (host side); opt: the GPU optimizer's own CUDA stream (resident stages' AdamW beside
// the compute stream's backward, docs/plan-format.md)
enum class Stream { Comp, H2D, D2H, P2P, Cpu, Io, Opt };
constexpr int kNumStreams = (int)Stream::Opt + 1;
enum class Tier { Gpu, Host, Nvme };
enum class BufKind { W, WGrad, Act, Grad, Stash, Batch, Opt, Tie, TieGrad, Part, PartGrad };
constexpr int kNumBufKinds = (int)BufKind::PartGrad + 1;  // each has an entry in ir/ops.cpp's buffer-kind table
// W      weights of stage S in compute precision (bf16 on GPU runs)
// WGrad  weight gradient of stage S, accumulated over the step's micro-batches
// Act    output activation of stage S for micro-batch m (= input of stage S+1)
// Grad   gradient w.r.t. Act(S,m), produced by backward S+1, consumed by backward S
// Stash  what forward S m saves for backward S m (activations; with recompute nothing beyond the input)
// Batch  input ids and labels of micro-batch m (stage = -1)
// Opt    fp32 master weights and AdamW moments of stage S
// Tie    tied embeddings split over stages: the token-embedding matrix [vocab, hidden] (compute precision) that the
//        head stage S uses as its lm_head, copied from stage 0's weights each step (the one master copy)
// TieGrad  the head stage S's gradient of tie(S), accumulated over the step's micro-batches, added into wgrad(S0)
// Part     tensor parallelism: the partial sum a forward segment of stage S on m ends with (a row-parallel output, or
//          the vocabulary-parallel embedding), [B,T,hidden] in compute precision, summed over the tp group by
//          `allreduce part(S,m) seg=k group=tp.g<p>` before the next segment reads it
// PartGrad the same for a backward segment: the partial gradient of a column-parallel input (f's backward)

const char* to_string(Op);
const char* to_string(Stream);
const char* to_string(Tier);
const char* to_string(BufKind);
Op parse_op(const std::string&);
Stream parse_stream(const std::string&);
Tier parse_tier(const std::string&);
BufKind parse_buf_kind(const std::string&);

// ---- buffers -------------------------------------------------------------------------------
struct BufRef {
  BufKind kind = BufKind::W;
  int stage = -1;  // -1 for Batch
  int mb = -1;     // -1 for per-stage buffers (W, WGrad, Opt)
  bool operator==(const BufRef&) const = default;
  auto operator<=>(const BufRef&) const = default;
  std::string str() const;                   // "w(S3)", "act(S2,m5)", "batch(m0)"
  static BufRef parse(const std::string&);   // inverse of str(); throws ParseError
  bool per_microbatch() const;  // one instance per micro-batch (act, grad, stash, batch): ops.hpp's kind table
  bool per_stage() const;       // named with a stage (all but batch)
};

// Declares the size of one buffer kind of one stage (per micro-batch instance for per-mb kinds)
// and its home tier: where the master copy lives (Gpu = resident for the whole step).
struct BufferDecl {
  BufKind kind = BufKind::W;
  int stage = -1;
  int64_t bytes = 0;
  Tier home = Tier::Gpu;
  bool operator==(const BufferDecl&) const = default;
};

// ---- stages --------------------------------------------------------------------------------
enum class Residency { Offload, Resident };  // weights: prefetched/evicted, or kept on the GPU all step
enum class OptimPlace { Cpu, Gpu };
const char* to_string(Residency);   // offload | resident
const char* to_string(OptimPlace);  // cpu | gpu
Residency parse_residency(const std::string&);
OptimPlace parse_optim_place(const std::string&);

// A stage is a contiguous range of model "layers": layer 0 is the token embedding, layers 1..L the
// decoder layers, layer L+1 the final norm + lm_head + loss.
struct Stage {
  int id = 0;
  int gpu = 0;
  int layer_begin = 0;  // inclusive
  int layer_end = 0;    // exclusive
  bool recompute = false;
  Residency weights = Residency::Offload;
  OptimPlace optim = OptimPlace::Cpu;
  int64_t params = 0;        // parameter count
  int64_t fwd_ws = 0;        // transient GPU workspace bytes while forward runs
  int64_t bwd_ws = 0;        // transient GPU workspace bytes while backward runs
  double fwd_ms = 0, bwd_ms = 0;  // modelled times per micro-batch (bwd includes recompute)
  // Partial recompute: with `recompute` set, the stage's last keep_layers layers keep their forward's stash anyway and
  // only its first layers() - keep_layers recompute in backward (0: the whole stage recomputes). 0 without recompute.
  // Text: recompute=<recomputed>/<layers> when partial; JSON: "recompute": <recomputed layers> (docs/plan-format.md).
  int keep_layers = 0;
  // Selective recompute inside the layer: the stage's decoder layers that keep their stash (all without recompute,
  // the last keep_layers with partial recompute) keep only part of it: the SwiGLU's fused gate|up output, not
  // silu(gate) and silu(gate)*up, which their backward recomputes (engine/model/model.cpp SwiGluDown; LLaMA-style
  // layers at tp 1, ModelSpec::layer_can_select). Text and JSON: selective=1 / "selective": true, written only when set.
  bool selective = false;
  bool operator==(const Stage&) const = default;
  int layers() const { return layer_end - layer_begin; }
  // How many of its first layers recompute their forward in backward: 0 (none) .. layers() (all).
  int recompute_layers() const { return recompute ? layers() - keep_layers : 0; }
};

// ---- instructions --------------------------------------------------------------------------
struct Instr {
  Op op = Op::Forward;
  Stream stream = Stream::Comp;
  int stage = -1;            // Forward, Backward, Optim
  int mb = -1;               // Forward, Backward, LoadBatch
  std::optional<BufRef> buf; // Prefetch, Send, Recv, Evict, Free, AllReduce
  int peer = -1;             // Send (destination gpu), Recv (source gpu)
  std::string tag;           // Send, Recv: the matching key ("F.S0.m0", "B.S1.m0")
  bool to_host = false;      // Evict: copy to the home tier before dropping
  std::string group;         // AllReduce, ReduceScatter, AllGather: group name (ir::process_groups)
  // Tensor parallelism (docs/plan-format.md "Tensor-parallel segments"): -1, or on forward/backward of a tp > 1 stage
  // the segment k of tp_collectives(..) + 1, and on `allreduce part(S,m)` / `allreduce partgrad(S,m)` the collective
  // k that follows segment k. Text: seg=<k>.
  int seg = -1;
  // A bucket of a stage's gradient (data-parallel gradient bucketing): AllReduce, ReduceScatter and Evict -> host of
  // wgrad(S), and a cpu Optim of S, may work on bucket `bucket` (0-based) of `buckets` slices of the stage's flat
  // (ir::bucket_range); buckets = 0: the whole. Text: wgrad(S8)[2/4], optim S8[2/4] (1-based: the 2nd of 4); JSON
  // "bucket": [2, 4].
  int bucket = 0, buckets = 0;
  std::vector<int> after;    // cross-stream dependencies: indices of earlier instructions, same program
  bool operator==(const Instr&) const = default;
};

struct Program {
  int gpu = 0;
  std::vector<Instr> instrs;
  bool operator==(const Program&) const = default;
};

// ---- the plan ------------------------------------------------------------------------------
struct ModelArch {  // enough for the engine to build the model; arch/arch.hpp says what the family and features mean
  std::string name;
  int layers = 0, hidden = 0, ffn = 0, heads = 0, kv_heads = 0, vocab = 0;
  double rope_theta = 10000.0, norm_eps = 1e-5;
  bool tied_embeddings = false;
  // Family and features. The text and JSON forms write them only where they differ from these defaults.
  std::string family = "llama";  // llama | mistral | qwen2 | qwen3 | gpt2: the layer kind and the HF tensor names
  int head_dim = 0;              // 0: hidden / heads
  int max_positions = 0;         // gpt2: rows of the learned position embedding; 0 for rotary families
  int sliding_window = 0;        // attention sees only the last `sliding_window` positions; 0: all (mistral)
  bool qkv_bias = false;         // bias on the q/k/v projections (qwen2)
  bool qk_norm = false;          // per-head RMSNorm of q and k before the rotation (qwen3)
  std::string rope_type = "default";  // default | llama3 (Llama-3.1 frequency scaling with the three values below)
  double rope_factor = 0, rope_low_freq_factor = 0, rope_high_freq_factor = 0;
  int rope_original_max_positions = 0;
  bool operator==(const ModelArch&) const = default;
};

struct TrainConfig {
  std::string precision = "bf16";   // bf16 | fp32 (compute precision of weights on the device)
  double lr = 1e-5, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  double max_grad_norm = 0.0;       // 0 = no clipping
  std::string lr_schedule = "constant";  // constant | linear | cosine
  int warmup_steps = 0, total_steps = 0;
  int seed = 0;
  // stop | skip: what a step with a non-finite loss or gradient norm does (mmoc-run --on-nonfinite overrides it).
  // "skip" needs the global gradient norm before any optimizer step, so offload-insertion then adds gradnorm even
  // without clipping. Printed only when not "stop".
  std::string on_nonfinite = "stop";
  bool operator==(const TrainConfig&) const = default;
};

struct Predicted {  // filled by the simulator; absent before
  double step_s = 0, tokens_per_s = 0, bubble = 0;
  std::vector<int64_t> peak_bytes;  // per GPU, simulated timeline
  std::vector<int64_t> bound_bytes; // per GPU, timing-independent upper bound (verify-memory)
  bool operator==(const Predicted&) const = default;
};

struct Plan {
  int format_version = 1;
  std::string hardware;
  std::string schedule;      // gpipe | 1f1b | interleaved-1f1b | grouped
  // Layout pp x dp x tp (docs/plan-format.md "Layout"): `gpus` pipeline ranks (one program each), `dp` data-parallel
  // replicas of the whole pipeline, `tp` tensor-parallel shards per pipeline rank. World rank r runs programs[pipe]
  // with r = (replica * gpus + pipe) * tp + shard; micro-batches are per replica (replica d's m is the global
  // micro-batch d * microbatches + m).
  int gpus = 1, v = 1, dp = 1, tp = 1;
  int microbatches = 1, micro_batch_size = 1, seq_len = 128;
  int64_t budget_bytes = 0;  // per GPU
  // Physical GPU of each world rank (cross mapping; text/JSON key `order`): world_size entries. With dp = tp = 1 that is
  // one per pipeline rank; plans written before the layouts had their own mapping may hold one per pipeline rank with
  // dp or tp > 1 (physical_gpu then falls back to the world rank). Empty: world rank r on GPU r.
  std::vector<int> gpu_order;
  std::vector<int64_t> host_bytes;  // per rank: predicted host memory (cost/host_memory.hpp); empty in older plans
  // NVMe tier (docs/nvme-tier.md): host memory cap of the node (0 = none given), the tier's directories and the
  // relative share of every object on each (tier::path_weight of the measured bandwidths). Optional in both forms.
  int64_t host_budget_bytes = 0;
  std::vector<std::string> nvme;
  std::vector<double> nvme_weights;
  ModelArch model;
  TrainConfig train;
  std::vector<Stage> stages;
  std::vector<BufferDecl> buffers;
  std::vector<Program> programs;  // one per GPU (pipeline rank), programs[g].gpu == g
  // Alternating (cache-friendly) update order of the NVMe tier (docs/nvme-tier.md): a plan of period two steps.
  // With odd_programs (one per GPU, like programs), even steps (0, 2, ...) run `programs` and odd steps run
  // `odd_programs`; carry_even / carry_odd list the stages whose opt(S) is in host memory when an even / odd step
  // starts (read from the tier and not written back by the step before). All empty: every step runs `programs`.
  std::vector<Program> odd_programs;
  std::vector<int> carry_even, carry_odd;
  std::optional<Predicted> predicted;
  bool operator==(const Plan&) const = default;

  const BufferDecl* find_buffer(BufKind k, int stage) const;
  int64_t buffer_bytes(const BufRef& r) const;  // 0 if undeclared
  int num_stages() const { return (int)stages.size(); }
};

// ---- step bodies (the alternating update order) ------------------------------------------------
// 1, or 2 when the plan has odd_programs.
inline int num_bodies(const Plan& p) { return p.odd_programs.empty() ? 1 : 2; }
// The plan that step parity `parity` runs, as a one-body plan (programs = that body; odd_programs and the carries
// cleared), for the analyses that look at one step (verify-memory, verify-deadlock, the simulator). The tier's host
// staging (passes/tier_staging.cpp) is the one analysis that needs the carries and reads them from the whole plan.
Plan step_body(const Plan&, int parity);
// The stages whose opt(S) is in host memory when a step of this parity starts (carry_even / carry_odd).
const std::vector<int>& carry_in(const Plan&, int parity);

// ---- layout (pp x dp x tp) ------------------------------------------------------------------
struct RankCoord {
  int pipe = 0, replica = 0, shard = 0;
};
int world_size(const Plan&);                       // gpus * dp * tp: the processes of the job
RankCoord rank_coord(const Plan&, int world_rank);  // throws std::out_of_range outside the world
int world_rank(const Plan&, int pipe, int replica, int shard = 0);
// The physical GPU (on its node) that world rank r runs on: gpu_order[r] when the order has world_size entries, else r.
int physical_gpu(const Plan&, int world_rank);
// Every world rank runs the program of its pipeline rank (replicas on their own micro-batches, tp shards on their
// shard of the weights), so a program's collective names a group relative to the rank that runs it:
//   "dp.g<p>"  pipeline rank p's data-parallel group: its dp replicas (with tp > 1, those of the rank's own tp shard)
//   "tp.g<p>"  pipeline rank p's tensor-parallel group: its tp shards (of the rank's own replica); forward and
//              backward of a tp plan communicate on it (engine/model/tp.hpp), it is not named by an instruction
//   "world"    every rank
// process_groups(): the concrete groups (sorted member ranks), the communicators a job creates: "world"; "dp.g<p>"
// (tp 1) or "dp.g<p>.t<k>" (tp > 1, shard k); "tp.g<p>.r<d>" (tp > 1, replica d); "pp.r<d>" (replica d's pipeline
// ranks, shard 0). program_groups(): the names programs may use, each with every world rank that uses it (the union
// of its concrete groups). rank_group(): the concrete group of a program's name for one world rank.
std::map<std::string, std::vector<int>> process_groups(const Plan&);
std::map<std::string, std::vector<int>> program_groups(const Plan&);
std::string rank_group(const Plan&, const std::string& name, int world_rank);
std::string dp_group_name(const Plan&, int pipe);
std::string tp_group_name(const Plan&, int pipe);
// Tensor parallelism: how many all-reduces over the tp group forward (op Forward) or backward (op Backward) of stage s
// issues per micro-batch as instructions (0 when tp == 1). Forward: one after the vocabulary-parallel embedding and
// one after each row-parallel projection (o_proj, down: two per decoder layer). Backward: the gradients of every
// column-parallel input (f before q/k/v, gate/up and the head: two per decoder layer, one for the head), plus, when
// the stage recomputes its first layers in backward, the forward all-reduces of those layers again (their replay comes
// after the backward of the layers that keep their stash). The loss's two small reductions and Qwen3's q_norm/k_norm
// weight gradients stay inside their segment (engine/model/tp.hpp).
int tp_collectives(const Plan&, int stage, Op op);

struct ParseError : std::runtime_error { using std::runtime_error::runtime_error; };
struct VerifyError : std::runtime_error { using std::runtime_error::runtime_error; };

// JSON form (docs/plan-format.md). to_json_string is deterministic (fixed key order).
std::string to_json_string(const Plan&, int indent = 1);
Plan from_json_string(const std::string&);  // throws ParseError naming the bad field

// Shortest of %.15g/%.16g/%.17g that reads back to the same double (as the text form prints numbers).
std::string format_double(double);

// The `plan` header line's fields as the text form writes them (key, value), in order.
std::vector<std::pair<std::string, std::string>> header_fields(const Plan&);

// Text form: one instruction per line, deterministic; parse_text(print_text(p)) == p.
std::string print_text(const Plan&);
std::string print_instr(const Instr&, int index);
std::string print_op(const Instr&);  // "<op> <operands>" as print_instr writes them ("forward S0 m1", "gradnorm")
Plan parse_text(const std::string&);         // throws ParseError with line number

// Reads/writes either form, chosen by content (JSON starts with '{').
Plan load_plan_file(const std::string& path);
// Writes atomically (temporary file, then rename): a failure leaves no partial file.
void save_file_atomic(const std::string& path, const std::string& content);

// Structural verifier: operands present for each op kind, stages and gpus in range, `after`
// points to earlier instructions, every send has exactly one matching recv (same tag, peers
// agree, same buffer), forward S m before backward S m. Returns list of problems (empty = ok).
std::vector<std::string> verify_structure(const Plan&);
// with_programs=false: the header, stage table and buffer table only (a plan before its programs are made).
std::vector<std::string> verify_structure(const Plan&, bool with_programs);
void verify_structure_or_throw(const Plan&);

}  // namespace mmoc::ir
