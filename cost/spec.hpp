// Model, hardware and job descriptions, and the cost model built from them. No LibTorch.
// Files: configs/models/<name>.json, configs/hardware/<name>.json, configs/jobs/*.json.
#pragma once
#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/error.hpp"   // InputError
#include "common/format.hpp"  // GiB
#include "ir/plan.hpp"

namespace mmoc {

// ---- model ----------------------------------------------------------------------------------
// The model: its architecture (ir::ModelArch: family, shapes, features; arch/arch.hpp) plus what only the compiler needs.
struct ModelSpec : ir::ModelArch {
  int max_seq = 4096;
  // Tensor-parallel degree the per-layer figures below are for: with tp > 1 they are one tp rank's (its shard of the
  // parameters, its share of the FLOPs, stash and workspace; arch/layout.hpp's sharded layout). with_tp() sets it;
  // the compiler's passes see the job's tp this way. Not part of the architecture (arch() leaves it out).
  int tp = 1;
  int64_t tp_layer_params[3] = {0, 0, 0};  // with_tp(): one rank's embedding, decoder layer and head (0: not computed)

  int num_model_layers() const { return layers + 2; }  // embedding, decoder layers, head
  // Per model layer (0 = embedding, 1..L decoder, L+1 = final norm + lm_head), for the family's layer kind:
  int64_t layer_params(int layer) const;  // = arch::layer_param_count (the engine's flat layout)
  // FLOPs of forward for one micro-batch (mbs x seq tokens); matmuls plus attention's seq^2 term.
  double layer_fwd_flops(int layer, int mbs, int seq) const;
  // FLOPs of backward (without recompute): ~2x forward.
  double layer_bwd_flops(int layer, int mbs, int seq) const;
  // Bytes saved by forward for backward of one micro-batch at `act_bytes` per element (2 for bf16).
  // recompute=true: nothing beyond the layer's input (counted separately as the stage input).
  // selective=true: selective recompute inside the layer (Stage::selective) where layer_can_select: the SwiGLU's
  // product silu(gate) * up is recomputed in backward instead of kept (ffn elements per token less; silu(gate) is never
  // kept there: SwiGluDown recomputes it either way).
  int64_t layer_stash_bytes(int layer, int mbs, int seq, bool recompute, int act_bytes, bool selective = false) const;
  // Whether selective recompute inside the layer applies: a LLaMA-style (gated MLP) decoder layer without tensor
  // parallelism (the engine's SwiGluDown node runs on the unsharded MLP only).
  bool layer_can_select(int layer) const;
  // Output activation of a layer (hidden state) for one micro-batch; the head's is 0.
  int64_t layer_output_bytes(int layer, int mbs, int seq, int act_bytes) const;
  // Peak transient bytes while the layer runs forward / backward (logits for the head, MLP intermediates, ...).
  int64_t layer_fwd_workspace(int layer, int mbs, int seq, int act_bytes) const;
  int64_t layer_bwd_workspace(int layer, int mbs, int seq, int act_bytes) const;
  int64_t total_params() const;
  ir::ModelArch arch() const { return static_cast<const ir::ModelArch&>(*this); }
};
ModelSpec load_model(const std::string& name_or_path, const std::string& configs_dir);
// The model as one of `tp` tensor-parallel ranks sees it (ModelSpec::tp); tp must divide heads, kv heads and ffn
// (InputError naming the HF key otherwise).
ModelSpec with_tp(const ModelSpec&, int tp);
// Parses a model description: mmoc's format (configs/README.md) or a HuggingFace config.json of a supported family
// (recognised by "model_type", "architectures", "hidden_size" or "n_embd"; read by arch/hf_config.hpp, the engine's
// reader too). `origin` names the source in error messages. Throws InputError.
ModelSpec parse_model(const std::string& json_text, const std::string& origin);
// The file a model or hardware name stands for: a path (holding '/' or ending in .json) as given, else
// configs_dir/<sub>/<name>.json ("models" or "hardware"). Throws InputError listing the available names.
std::string resolve_config(const std::string& name_or_path, const std::string& configs_dir, const std::string& sub);
// Names (file stems) of configs_dir/<sub>/*.json, sorted ("models" or "hardware").
std::vector<std::string> list_configs(const std::string& configs_dir, const std::string& sub);

// ---- hardware ------------------------------------------------------------------------------
// One directory of the NVMe tier as mmoc-profile --nvme measured it (docs/nvme-tier.md). JSON: "storage":
// [{"path": "/nvme0/mmoc", "read_gbps": 2.3, "write_gbps": 2.2, "device": "259:0", "virtual": false}, ...].
struct StoragePath {
  std::string path;
  double read_gbps = 0, write_gbps = 0;  // direct I/O through engine/tier, this path alone (1e9 bytes/s)
  std::string device;                    // "major:minor" of its disk: paths with the same device share it
  bool virtual_tier = false;             // tmpfs/ramfs ("virtual": true): host memory, not a disk
};

struct HardwareSpec {
  std::string name;
  int gpus = 1;
  double gpu_mem_gib = 80;
  // Achievable dense bf16 TFLOP/s of a matmul whose inner dimension is large (the limit K -> infinity of the GEMM
  // model below; the cost model's compute rate). A GEMM [M x K] x [K x N] takes 2*M*N*(K + gemm_k0) / gpu_tflops:
  // gemm_k0 is a fixed cost per output element (the kernel's prologue/epilogue and tile ramp), so a GEMM with a short
  // inner dimension (a 3072-wide layer's projections) reaches a lower fraction of the rate than a 4096- or 5120-wide
  // one. attn_efficiency: the fraction of gpu_tflops flash attention (SDPA) reaches.
  double gpu_tflops = 100;
  double gemm_k0 = 1000, attn_efficiency = 0.45;
  // The GPU's peak dense bf16 TFLOP/s from its data sheet (no sparsity): the denominator of MFU and HFU. Optional in
  // the file; the default is the H100/H200 SXM figure (989), so set it for any other GPU (L20: 119.5).
  double peak_bf16_tflops = 989;
  double gpu_mem_gbps = 2000;    // achievable device memory traffic of a streaming kernel (read+write), GB/s
  double mfu_small = 0.5;        // efficiency at small micro-batches (see cost model)
  double h2d_gbps = 25, d2h_gbps = 25;   // pinned host<->device per GPU, one direction alone
  double duplex_gbps = 40;       // H2D + D2H at once, one GPU, total
  // GPUs sharing one host link (PCIe switch / root complex), and that link's capacity per direction.
  std::vector<std::vector<int>> host_groups;
  double group_link_gbps = 25;   // per direction, shared by the group's GPUs
  double p2p_gbps = 20;          // GPU<->GPU, every pair that p2p_links does not list
  // Per-pair GPU links overriding p2p_gbps (JSON "p2p_links": [{"gpus": [0, 2], "gbps": 40, "kind": "pcie-switch"}]):
  // one entry per unordered pair, both directions (mmoc-profile measures them on > 1 GPU).
  struct P2PLink {
    int a = 0, b = 0;          // GPU ids, a < b
    double gbps = 0;           // per direction
    std::string kind;          // "nvlink", "pcie-switch", "pcie-host", "measured", ... (documentation only)
  };
  std::vector<P2PLink> p2p_links;
  // The GPU<->GPU bandwidth between physical GPUs a and b (GB/s): their p2p_links entry, else p2p_gbps.
  double link_gbps(int a, int b) const;
  const P2PLink* link(int a, int b) const;  // the p2p_links entry of the pair, or nullptr
  // The bandwidth a ring over `gpus` (in this order, the last back to the first) runs at: its slowest link; p2p_gbps
  // for fewer than two GPUs.
  double ring_gbps(const std::vector<int>& gpus) const;
  double host_mem_gib = 256;     // per node: the ranks on one host share it (cost/host_memory.hpp checks plans against it)
  // Host memory of one worker process beyond its training state: CUDA context, LibTorch, NCCL and cuBLAS on the host.
  // 3.0: LLaMA-2-7B on nvidia-h200 at a 20 GiB budget peaked at 109.4 GiB resident when pinned buffers were still
  // rounded up to powers of two (d1185f8: 12n exact + 4n x 1.33 for 0.2B-parameter stages = 106.5 GiB), leaving
  // 2.9 GiB for the process (docs/design.md, Host memory).
  double host_process_gib = 3.0;
  int cpu_cores = 16;
  double host_mem_gbps = 80;     // host memcpy bandwidth (read+write)
  double adam_bytes_per_param = 28;
  double launch_overhead_ms = 0.02;
  // Whether the engine runs its own CUDA kernels in the decoder layer (engine/model/kernels.hpp: SwiGLU, and RoPE with
  // the q/k/v split), as a build with a CUDA compiler does; false: ATen's elementwise ops (the cost model's
  // memory-bound passes count those). JSON "engine_kernels", default true.
  bool engine_kernels = true;
  // GPU memory the plan must leave free inside the budget: the allocator's rounding and fragmentation, cuBLAS and
  // NCCL workspaces. Planned memory <= budget * (1 - reserve_fraction) - reserve_gib.
  double reserve_gib = 0.0, reserve_fraction = 0.0;
  int64_t usable_bytes(int64_t budget) const;
  int64_t budget_for(int64_t bound) const;  // the smallest budget whose usable part holds `bound`
  // Efficiency curve of compute (see CostModel::efficiency): mfu_small at <= mfu_small_tokens tokens per
  // micro-batch, 1.0 at >= mfu_full_tokens, linear in log2(tokens) between.
  double mfu_small_tokens = 256, mfu_full_tokens = 4096;
  // Host threads that saturate host memory bandwidth in the CPU optimizer (0 = cpu_cores / 2).
  int adam_saturating_threads = 0;
  int adam_threads_to_saturate() const { return adam_saturating_threads > 0 ? adam_saturating_threads : std::max(1, cpu_cores / 2); }
  // Calibrated per-layer times (written by mmoc-profile): key "layer=<kind>,mbs=<b>,seq=<s>" -> ms.
  std::map<std::string, double> calibrated_ms;
  // NVMe tier paths with their measured bandwidth (empty: none measured).
  std::vector<StoragePath> storage;
  // Which host group a GPU is in (-1 = none).
  int group_of(int gpu) const;
};
HardwareSpec load_hardware(const std::string& name_or_path, const std::string& configs_dir);
HardwareSpec parse_hardware(const std::string& json_text, const std::string& origin);
// Key of hw.calibrated_ms: "model=<model name>,layer=<embed|decoder|head>.<fwd|bwd>,mbs=<b>,seq=<s>" (ms per
// micro-batch of one such layer; bwd without recompute). mmoc-profile writes these.
std::string calibration_key(const std::string& model, int layer_kind /*0 embed,1 decoder,2 head*/, bool fwd, int mbs, int seq);

// FLOPs of one training step of a plan (all its GPUs, all data-parallel replicas): `model` counts every layer's
// forward and backward for every micro-batch (ModelSpec::layer_fwd_flops/layer_bwd_flops: ~6 x params x tokens plus
// attention), without recompute; `hardware` adds the forward of the layers the plan recomputes (Stage::recompute_layers),
// less the down projection the last one of each stage skips (CostModel::layer_recompute_ms).
// MFU = model / step time / (GPUs x peak_bf16_tflops), HFU the same with `hardware`.
struct StepFlops {
  double model = 0, hardware = 0;
};
StepFlops step_flops(const ir::Plan&);
// The fraction of peak: flops / seconds / (gpus x peak TFLOP/s); 0 when any of them is not positive.
double flops_utilization(double flops, double seconds, int gpus, double peak_tflops);

// ---- job -----------------------------------------------------------------------------------
struct JobConfig {
  std::string model = "tiny-gqa", hardware = "h100x1";
  int gpus = 1;
  std::string v = "auto";          // integer (the user's override) or "auto": the compiler searches
  double budget_gib = 0;           // 0 = the GPU's memory
  int micro_batch_size = 1, microbatches = 1, seq_len = 128;
  std::string schedule = "auto";     // gpipe | 1f1b | interleaved-1f1b | grouped (overrides) | auto
  std::string recompute = "auto";    // auto | on | off
  // selective recompute inside the layer (Stage::selective): auto (per stage, where the budget limits the stash),
  // on (every stage whose kept layers can), off
  std::string selective = "auto";
  std::string offload = "auto";      // auto | all | none
  std::string cross_map = "auto";    // auto | off
  int dp = 1;
  int tp = 1;                        // tensor-parallel degree (ranks = gpus x dp x tp)
  // data-parallel gradient buckets (passes/data_parallel.cpp): a stage's gradient larger than this many MiB is
  // reduced (and copied to the host) in buckets of about this size; 0 = one bucket per stage
  double bucket_mib = 25;
  // "" (gpus, dp and tp as given) or "auto": the compiler chooses pp x dp x tp over the job's `gpus` GPUs by
  // simulated step time under the budget (compile_job)
  std::string layout;
  // NVMe tier (docs/nvme-tier.md): the node's host memory cap (0 = none) and the tier's directories
  double host_budget_gib = 0;
  std::vector<std::string> nvme;
  std::string nvme_place = "auto";  // auto: only what --host-budget needs | all: every offloaded stage's opt(S)
  std::string update_order = "auto";  // NVMe tier stage update order: auto (by simulated time) | fixed | alternate
  // GPU-resident stages' AdamW: on the compute stream (comp) or on its own CUDA stream (opt, beside the backward: on
  // one H200 it ran 5x slower there and slowed the backward as much as it saved, docs/plan-format.md)
  std::string gpu_optim_stream = "comp";
  ir::TrainConfig train;
};
// Parses a job JSON; unknown keys and wrong types throw InputError naming the key.
JobConfig parse_job(const std::string& json_text, const std::string& origin);
JobConfig load_job(const std::string& path);

// ---- cost model ----------------------------------------------------------------------------
struct CostModel {
  const ModelSpec& m;
  const HardwareSpec& hw;
  int act_bytes = 2;  // bf16
  double layer_fwd_ms(int layer, int mbs, int seq) const;
  double layer_bwd_ms(int layer, int mbs, int seq) const;  // without recompute
  // What selective recompute inside the layer adds to its backward (ModelSpec::layer_can_select; else 0): SwiGluDown
  // recomputes silu(gate) * up, the forward's kernel over 3*ffn elements per token.
  double layer_selective_ms(int layer, int mbs, int seq) const;
  // The layer's forward run again inside backward (recompute). output_used = false: the last layer of a recomputed
  // range, whose output only carries the incoming gradient (its value is never read); a LLaMA-style decoder layer at
  // tp 1 (ModelSpec::layer_can_select) then skips its down projection (SwiGluDown's output_unused), the rest is
  // layer_fwd_ms.
  double layer_recompute_ms(int layer, int mbs, int seq, bool output_used) const;
  double h2d_ms(int64_t bytes) const;
  double d2h_ms(int64_t bytes) const;
  double p2p_ms(int64_t bytes) const;
  double p2p_ms(int64_t bytes, double gbps) const;  // over a link of `gbps` (HardwareSpec::link_gbps / ring_gbps)
  double adam_ms(int64_t params, int threads) const;  // CPU AdamW over params
  double gpu_adam_ms(int64_t params) const;  // the engine's device AdamW: see gpu_adam_bytes_per_param
  // Device memory traffic per parameter of the engine's GPU AdamW step (engine/exec/device_adamw.cpp): the fused
  // kernel's adam_bytes_per_param, the gradient's conversion to fp32, its fp64 sum of squares (the global norm) and the
  // compute-precision weight copy.
  double gpu_adam_bytes_per_param() const;
  double allreduce_ms(int64_t bytes) const;  // a collective over the buffer (2x its p2p time)
  double allreduce_ms(int64_t bytes, double gbps) const;  // the same over a ring whose slowest link has `gbps`
  // A ring all-reduce of `bytes` over the model's m.tp tensor-parallel ranks: 2(n-1)/n of the buffer over the p2p link
  // (NVLink or PCIe: hw.p2p_gbps) plus its latency; 0 at tp 1.
  double tp_allreduce_ms(int64_t bytes) const;
  // The tensor-parallel collectives inside one layer's forward / backward for a micro-batch (ModelSpec::tp > 1):
  // decoder 2 + 2 all-reduces of the hidden state, embedding 1 forward, head 1 backward plus the loss's small ones
  // (engine/model/tp.hpp). The hidden-state ones are plan instructions (tp-lowering: `allreduce part/partgrad`), timed
  // by the simulator; only tp_inline_comm_ms, those that stay inside a segment (the loss's, Qwen3's q/k-norm
  // gradients), is included in layer_fwd_ms / layer_bwd_ms.
  double tp_comm_ms(int layer, int mbs, int seq, bool fwd) const;
  double tp_inline_comm_ms(int layer, int mbs, int seq, bool fwd) const;
  // The layer's time with its planned (instruction) tp collectives: layer_fwd_ms / layer_bwd_ms + tp_comm_ms -
  // tp_inline_comm_ms. What partition balances and recompute saves (the collectives serialise with the segments on
  // comp); the stage table's fwd_ms/bwd_ms hold layer_fwd_ms / layer_bwd_ms.
  double layer_fwd_total_ms(int layer, int mbs, int seq) const;
  double layer_bwd_total_ms(int layer, int mbs, int seq) const;
  double gradnorm_ms() const;                // the global gradient norm
  // Rates of the simulator's shared resources, bytes per ms (cost/simulator.cpp shares them max-min fairly).
  double h2d_rate() const;          // one GPU's host-to-device copies
  double d2h_rate() const;          // one GPU's device-to-host copies
  double duplex_rate() const;       // one GPU's copies in both directions together
  double group_link_rate() const;   // a host group's link, per direction
  double host_mem_rate() const;     // host memory, shared by every CPU optimizer
  double adam_pool_rate(int threads) const;      // one GPU's CPU optimizer thread pool of `threads`
  double adam_traffic_bytes(int64_t params) const;  // host memory traffic of a CPU AdamW step over params
  int optim_threads_per_gpu(int gpus) const;        // the host's cores split among the GPUs' CPU optimizers
  // The parts of a layer's time (cost/cost.cpp): matmul and attention time at gpu_tflops (before the small-batch
  // efficiency), and the memory-bound passes (elementwise ops, norms, the head's fp32 logits, the weight-gradient
  // accumulation) at gpu_mem_gbps. Without calibration, layer time = max(compute_ms / efficiency(T), weight traffic)
  // + memory_ms + launch_overhead_ms.
  struct LayerParts {
    double compute_ms = 0, memory_ms = 0, weight_ms = 0;
  };
  LayerParts layer_parts(int layer, int mbs, int seq, bool fwd) const;
  // The gpu_tflops with which the formula (without calibration) gives `fwd_plus_bwd_ms` for this layer at this shape
  // (mmoc-profile's --tflops-from layer); 0 when the memory-bound part alone exceeds it.
  double tflops_reproducing(int layer, int mbs, int seq, double fwd_plus_bwd_ms) const;
  // Fraction of gpu_tflops reached at `tokens` tokens per micro-batch (continuous, in [mfu_small, 1]).
  double efficiency(double tokens) const;
  // 0 embedding, 1 decoder, 2 head, for a model layer index.
  int layer_kind(int layer) const;
};

// Where the configs folder is: $MMOC_CONFIGS, else <exe dir>/../configs, else the source tree's.
std::string default_configs_dir();

}  // namespace mmoc
