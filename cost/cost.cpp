// Cost model: per-layer compute times, transfer times, optimizer step times. Formulas:
//
//  compute(layer) = max(flops / (gpu_tflops * efficiency(T)), bytes_touched / gpu_mem_gbps) + launch_overhead_ms
//     T = mbs*seq tokens per micro-batch. efficiency(T) = mfu_small for T <= mfu_small_tokens, 1 for T >= mfu_full_tokens,
//     linear in log2(T) between (continuous). On the H100 (mfu_small 0.1, 256..4096 tokens) this reproduces the measured
//     LLaMA-2-7B layer: 1x512 tokens ~0.33 of peak, 2048 tokens ~0.78 (measured ~0.85), 8x1024 = 1.0 (~517 TFLOP/s).
//     bytes_touched: the layer's weights once in forward (params*act_bytes), three times in backward (read twice + the
//     weight gradient write), plus the hidden state in and out.
//     If hw.calibrated_ms holds calibration_key(model, kind, fwd, mbs, seq), that measured value is used instead.
//  h2d/d2h/p2p = latency + bytes / bandwidth  (one transfer alone; the simulator models contention).
//  CPU AdamW   = params * adam_bytes_per_param / (host_mem_gbps * min(1, threads / adam_threads_to_saturate()))
//     (memory-bandwidth bound: ~28 bytes/param: fp32 master r+w 8, m r+w 8, v r+w 8, bf16 grad read 2, bf16 weight
//     write 2; threads_to_saturate defaults to cpu_cores/2: half the cores already saturate host memory bandwidth).
//     FACTS check: 202M params, 16 threads on the H100 host: 202e6*28/80e9 = 71 ms (measured 65 ms).
//  GPU AdamW   = params * adam_bytes_per_param / gpu_mem_gbps + launch overhead (same traffic, device memory).
//  allreduce   = 2 x p2p of the buffer (reduce-scatter + all-gather on two GPUs); gradnorm = kGradNormMs.
//  tensor parallelism (m.tp > 1): the layer's FLOPs and bytes are one shard's (ModelSpec), calibrated times / tp, and
//     layer_fwd_ms / layer_bwd_ms add tp_inline_comm_ms, the collectives that stay inside forward/backward (the loss's,
//     Qwen3's q/k-norm gradients); the [mbs, seq, hidden] ones are instructions (tp-lowering), timed by the simulator
//     as ring all-reduces of allreduce_ms x (tp-1)/tp each (tp_comm_ms is their sum with the inline ones).
//  Rates (bytes/ms) of what the simulator shares: the hardware's GB/s x 1e6; a CPU optimizer's pool of t threads
//     host_mem_gbps * min(1, t / adam_threads_to_saturate()).
#include <algorithm>
#include <cmath>

#include "arch/arch.hpp"
#include "cost/spec.hpp"

namespace mmoc {

namespace {
constexpr double kTransferLatencyMs = 0.01;  // per copy (driver + DMA setup)
constexpr double kP2PLatencyMs = 0.02;       // per send/recv pair (NCCL)
constexpr double kGradNormMs = 0.05;         // a host allreduce of one double and the norms of the resident gradients
double bytes_per_ms(double gbps) { return gbps * 1e6; }
}  // namespace

int CostModel::layer_kind(int layer) const {
  if (layer == 0) return 0;
  if (layer == m.layers + 1) return 2;
  return 1;
}

double CostModel::efficiency(double tokens) const {
  const double lo = hw.mfu_small_tokens, hi = hw.mfu_full_tokens;
  if (tokens >= hi) return 1.0;
  if (tokens <= lo || hi <= lo) return tokens >= hi ? 1.0 : hw.mfu_small;
  const double f = std::log2(tokens / lo) / std::log2(hi / lo);
  return hw.mfu_small + (1.0 - hw.mfu_small) * f;
}

static double compute_ms(const CostModel& c, int layer, int mbs, int seq, bool fwd) {
  const int kind = c.layer_kind(layer);
  if (!c.hw.calibrated_ms.empty()) {  // measured unsharded: a tp rank's share (its collectives are added by the caller)
    auto it = c.hw.calibrated_ms.find(calibration_key(c.m.name, kind, fwd, mbs, seq));
    if (it != c.hw.calibrated_ms.end()) return it->second / std::max(1, c.m.tp);
  }
  const double T = (double)mbs * seq;
  const double flops = fwd ? c.m.layer_fwd_flops(layer, mbs, seq) : c.m.layer_bwd_flops(layer, mbs, seq);
  const double flop_ms = flops / (c.hw.gpu_tflops * 1e12 * c.efficiency(T)) * 1e3;
  double bytes = (double)c.m.layer_params(layer) * c.act_bytes * (fwd ? 1 : 3);
  if (kind == 0 && fwd) bytes = T * c.m.hidden * c.act_bytes;  // gather touches only the rows used
  bytes += 2.0 * T * c.m.hidden * c.act_bytes;                 // hidden state in and out
  const double mem_ms = bytes / (c.hw.gpu_mem_gbps * 1e9) * 1e3;
  return std::max(flop_ms, mem_ms) + c.hw.launch_overhead_ms;
}

double CostModel::layer_fwd_ms(int layer, int mbs, int seq) const {
  return compute_ms(*this, layer, mbs, seq, true) + tp_inline_comm_ms(layer, mbs, seq, true);
}
double CostModel::layer_bwd_ms(int layer, int mbs, int seq) const {
  return compute_ms(*this, layer, mbs, seq, false) + tp_inline_comm_ms(layer, mbs, seq, false);
}

double CostModel::layer_fwd_total_ms(int layer, int mbs, int seq) const {
  return compute_ms(*this, layer, mbs, seq, true) + tp_comm_ms(layer, mbs, seq, true);
}
double CostModel::layer_bwd_total_ms(int layer, int mbs, int seq) const {
  return compute_ms(*this, layer, mbs, seq, false) + tp_comm_ms(layer, mbs, seq, false);
}

double CostModel::tp_allreduce_ms(int64_t bytes) const {
  const int n = std::max(1, m.tp);
  return n <= 1 ? 0.0 : allreduce_ms(bytes) * (n - 1) / n;
}

// The collectives engine/model/tp.hpp issues per micro-batch (docs/design.md, Tensor parallelism): per decoder layer
// two all-reduces of the hidden state [mbs, seq, hidden] forward (g after o_proj and down) and two backward (f before
// q/k/v and gate/up), Qwen3's q_norm/k_norm gradients two [head_dim] fp32 more backward; the embedding one forward
// (g); the head one backward (f before lm_head) and the loss's two small fp32 ones forward ([N] max, [2, N] sums).
double CostModel::tp_comm_ms(int layer, int mbs, int seq, bool fwd) const {
  if (m.tp <= 1) return 0.0;
  const int64_t hidden_bytes = (int64_t)mbs * seq * m.hidden * act_bytes, tokens = (int64_t)mbs * seq;
  const int kind = layer_kind(layer);
  if (kind == 1) {
    double t = 2 * tp_allreduce_ms(hidden_bytes);
    if (!fwd && m.qk_norm) t += 2 * tp_allreduce_ms((int64_t)arch::head_dim(m) * 4);
    return t;
  }
  if (kind == 0) return fwd ? tp_allreduce_ms(hidden_bytes) : 0.0;
  return fwd ? tp_allreduce_ms(tokens * 4) + tp_allreduce_ms(2 * tokens * 4) : tp_allreduce_ms(hidden_bytes);
}

// The part of tp_comm_ms that runs inside a segment (not an instruction): the loss's two small reductions (head,
// forward) and Qwen3's q_norm/k_norm weight gradients (decoder, backward).
double CostModel::tp_inline_comm_ms(int layer, int mbs, int seq, bool fwd) const {
  if (m.tp <= 1) return 0.0;
  const int64_t tokens = (int64_t)mbs * seq;
  const int kind = layer_kind(layer);
  if (kind == 1) return !fwd && m.qk_norm ? 2 * tp_allreduce_ms((int64_t)arch::head_dim(m) * 4) : 0.0;
  if (kind == 2 && fwd) return tp_allreduce_ms(tokens * 4) + tp_allreduce_ms(2 * tokens * 4);
  return 0.0;
}

double CostModel::h2d_ms(int64_t bytes) const {
  if (bytes <= 0) return 0;
  return kTransferLatencyMs + (double)bytes / (std::min(hw.h2d_gbps, hw.group_link_gbps) * 1e9) * 1e3;
}
double CostModel::d2h_ms(int64_t bytes) const {
  if (bytes <= 0) return 0;
  return kTransferLatencyMs + (double)bytes / (std::min(hw.d2h_gbps, hw.group_link_gbps) * 1e9) * 1e3;
}
double CostModel::p2p_ms(int64_t bytes) const { return p2p_ms(bytes, hw.p2p_gbps); }
double CostModel::p2p_ms(int64_t bytes, double gbps) const {
  if (bytes <= 0) return kP2PLatencyMs;
  return kP2PLatencyMs + (double)bytes / (gbps * 1e9) * 1e3;
}

double CostModel::adam_ms(int64_t params, int threads) const {
  if (params <= 0) return 0;
  const double share = std::min(1.0, (double)std::max(threads, 1) / hw.adam_threads_to_saturate());
  return (double)params * hw.adam_bytes_per_param / (hw.host_mem_gbps * 1e9 * share) * 1e3;
}

double CostModel::gpu_adam_ms(int64_t params) const {
  if (params <= 0) return 0;
  return (double)params * hw.adam_bytes_per_param / (hw.gpu_mem_gbps * 1e9) * 1e3 + hw.launch_overhead_ms;
}

double CostModel::allreduce_ms(int64_t bytes) const { return 2 * p2p_ms(bytes); }
double CostModel::allreduce_ms(int64_t bytes, double gbps) const { return 2 * p2p_ms(bytes, gbps); }
double CostModel::gradnorm_ms() const { return kGradNormMs; }

double CostModel::h2d_rate() const { return bytes_per_ms(hw.h2d_gbps); }
double CostModel::d2h_rate() const { return bytes_per_ms(hw.d2h_gbps); }
double CostModel::duplex_rate() const { return bytes_per_ms(hw.duplex_gbps); }
double CostModel::group_link_rate() const { return bytes_per_ms(hw.group_link_gbps); }
double CostModel::host_mem_rate() const { return bytes_per_ms(hw.host_mem_gbps); }
double CostModel::adam_pool_rate(int threads) const {
  return bytes_per_ms(hw.host_mem_gbps) * std::min(1.0, (double)threads / hw.adam_threads_to_saturate());
}
double CostModel::adam_traffic_bytes(int64_t params) const { return (double)params * hw.adam_bytes_per_param; }
StepFlops step_flops(const ir::Plan& p) {
  ModelSpec m;
  static_cast<ir::ModelArch&>(m) = p.model;
  const double reps = (double)p.microbatches * std::max(1, p.dp);
  StepFlops f;
  for (const auto& st : p.stages)
    for (int l = st.layer_begin; l < st.layer_end; ++l) {
      const double fwd = m.layer_fwd_flops(l, p.micro_batch_size, p.seq_len);
      const double train = fwd + m.layer_bwd_flops(l, p.micro_batch_size, p.seq_len);
      f.model += reps * train;
      f.hardware += reps * (train + (l < st.layer_begin + st.recompute_layers() ? fwd : 0.0));
    }
  return f;
}

double flops_utilization(double flops, double seconds, int gpus, double peak_tflops) {
  if (!(flops > 0) || !(seconds > 0) || gpus <= 0 || !(peak_tflops > 0)) return 0;
  return flops / seconds / ((double)gpus * peak_tflops * 1e12);
}

int CostModel::optim_threads_per_gpu(int gpus) const { return std::max(1, hw.cpu_cores / std::max(1, gpus)); }

}  // namespace mmoc
