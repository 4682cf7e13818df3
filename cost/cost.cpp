// Cost model: per-layer compute times, transfer times, optimizer step times. Formulas:
//
//  compute(layer) = max(compute_ms / efficiency(T), weight_ms) + memory_ms + launch_overhead_ms   (layer_parts)
//     T = mbs*seq tokens per micro-batch. efficiency(T) = mfu_small for T <= mfu_small_tokens, 1 for T >= mfu_full_tokens,
//     linear in log2(T) between (continuous): the small-micro-batch ramp.
//     compute_ms, from the layer's shapes: every GEMM [M x K] x [K x N] at 2*M*N*(K + gemm_k0) / gpu_tflops (a fixed
//     cost per output element: a 3072-wide layer's projections run at a lower fraction of the rate than a 4096- or
//     5120-wide one's; gemm_k0 = 1000 fits the bf16 matmuls measured on H100/H200, 8192^3 at ~770 and 4096^3 at 696
//     TFLOP/s), forward the layer's matmuls, backward each one's input gradient (inner dimension N) and weight
//     gradient (inner dimension T: k0 = 0, its short lengths are the efficiency curve's); attention (flash, causal blocks skipped) at
//     gpu_tflops * attn_efficiency, its backward 2.5x its forward FLOPs.
//     memory_ms: the memory-bound passes at gpu_mem_gbps (a streaming kernel's read+write rate, as mmoc-profile
//     measures it), counted from the engine's op sequence (engine/model/model.cpp) per token in act_bytes elements:
//       decoder forward  10*hidden (two norms, two residual adds) + 10*(q_dim + kv_dim) (rotary on q and k) +
//                        5*ffn (silu(gate) * up) [+ 2*(q_dim + kv_dim) repeating k and v with GQA, + 2*(q_dim + kv_dim)
//                        for q/k norms; GPT-2: 10*hidden + 2*ffn (GELU)];
//       decoder backward 16*hidden + 2*q_dim + 15*(q_dim + kv_dim) + 8*(q_dim + 2*kv_dim) (the q/k/v slices' gradients
//                        assembled into the fused projection's) + 21*ffn (the gate/up slices likewise) [GQA + 2*(q_dim +
//                        kv_dim), q/k norms + 5*(q_dim + kv_dim); GPT-2: 16*hidden + 8*q_dim + 3*ffn], plus the weight
//                        gradient added into the flat one (3 x params x act_bytes);
//       (tp 1 with the engine's own kernels, hw.engine_kernels: SwiGLU 3*ffn forward and 5*ffn backward, one pass each
//       way; without q/k norms the rotary and split terms are 2*(q_dim + 2*kv_dim) each way, one read and one write of
//       q, k and v)
//       head             per fp32 logit (T x vocab): forward 16 bytes + the cast from act_bytes (the shifted view's copy,
//                        log-softmax: its row reductions hit L2), backward 24 + the cast back (nll's and the shift's
//                        zero-filled gradients as write-only fills, log-softmax backward, the slice copy), plus the
//                        lm_head weight gradient accumulated (tied or not); the LLaMA-2 heads (32K vocabulary) measured
//                        5.4 / 8.6 ms in the step on an H200 and 6.0 / 9.8 ms alone for 13B: within 3-6%;
//       embedding        a gather forward (3*hidden), backward the dense [vocab, hidden] gradient (3 x params).
//     weight_ms: the weights read once forward, twice backward: the bound for tiny micro-batches.
//     The stock files' gpu_tflops is chosen so that the LLaMA-2-7B layer at 8x1024 takes what it measured (inside the
//     step on the H200: 6.68 / 6.39 ms forward, 14.20 / 13.64 ms backward, 20.4 ms together); the 3B presets' layers
//     and heads follow from their shapes.
//     If hw.calibrated_ms holds calibration_key(model, kind, fwd, mbs, seq), that measured value is used instead.
//  h2d/d2h/p2p = latency + bytes / bandwidth  (one transfer alone; the simulator models contention).
//  CPU AdamW   = params * adam_bytes_per_param / (host_mem_gbps * min(1, threads / adam_threads_to_saturate()))
//     (memory-bandwidth bound: ~28 bytes/param: fp32 master r+w 8, m r+w 8, v r+w 8, bf16 grad read 2, bf16 weight
//     write 2; threads_to_saturate defaults to cpu_cores/2: half the cores already saturate host memory bandwidth).
//     FACTS check: 202M params, 16 threads on the H100 host: 202e6*28/80e9 = 71 ms (measured 65 ms).
//  GPU AdamW   = params * gpu_adam_bytes_per_param() / gpu_mem_gbps + launch overhead: the fused kernel's
//     adam_bytes_per_param plus the engine's other passes (engine/exec/device_adamw.cpp): the gradient to fp32
//     (act_bytes + 4), its sum of squares for the global norm (4: one fp32 read), the weights' copy (4 + act_bytes):
//     44 bytes per parameter in bf16 (measured on the H200 at 130 GiB: 3.0 ms per 202M-parameter stage; 4.2 ms when the
//     sum of squares went through an fp64 copy, 20 bytes).
//  allreduce   = 2 x p2p of the buffer (reduce-scatter + all-gather on two GPUs); gradnorm = kGradNormMs.
//  tensor parallelism (m.tp > 1): the layer's FLOPs and bytes are one shard's (ModelSpec), calibrated times / tp, and
//     layer_fwd_ms / layer_bwd_ms add tp_inline_comm_ms, the collectives that stay inside forward/backward (the loss's,
//     Qwen3's q/k-norm gradients); the [mbs, seq, hidden] ones are instructions (tp-lowering), timed by the simulator
//     as ring all-reduces of allreduce_ms x (tp-1)/tp each (tp_comm_ms is their sum with the inline ones).
//  Rates (bytes/ms) of what the simulator shares: the hardware's GB/s x 1e6; a CPU optimizer's pool of t threads
//     host_mem_gbps * min(1, t / adam_threads_to_saturate()).
#include <algorithm>
#include <cmath>
#include <vector>

#include "arch/arch.hpp"
#include "arch/layout.hpp"
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

namespace {
// One GEMM [M x K] x [K x N] at the hardware's rate: 2*M*N*(K + k0) FLOP-equivalents, k0 = HardwareSpec::gemm_k0 for
// an inner dimension of the weights; a weight gradient's inner dimension is the micro-batch's tokens, whose short
// lengths the efficiency curve covers (k0 = 0 there).
double gemm_ms(const HardwareSpec& hw, double M, double N, double K, bool tokens_inner = false) {
  return 2.0 * M * N * (K + (tokens_inner ? 0.0 : hw.gemm_k0)) / (hw.gpu_tflops * 1e12) * 1e3;
}
}  // namespace

// The layer's work from its shapes (one tensor-parallel rank's share at m.tp > 1: its heads, MLP columns and
// vocabulary rows; the hidden state stays whole). Element counts per token below are in act_bytes elements.
CostModel::LayerParts CostModel::layer_parts(int layer, int mbs, int seq, bool fwd) const {
  LayerParts r;
  const int kind = layer_kind(layer);
  const int tp = std::max(1, m.tp);
  const double T = (double)mbs * seq, e = act_bytes, h = m.hidden;
  const double bw = hw.gpu_mem_gbps * 1e9, params = (double)m.layer_params(layer);
  auto mem_ms = [&](double bytes) { return bytes / bw * 1e3; };
  if (kind == 0) {  // the embedding: a gather forward; backward the dense [vocab, hidden] gradient into the flat one
    r.memory_ms = mem_ms(fwd ? 3.0 * T * h * e : params * e * 3 + 2.0 * T * h * e);
    return r;
  }
  if (kind == 2) {  // final norm + lm_head + cross-entropy over fp32 logits
    const double V = tp > 1 ? (double)arch::tp_vocab(m.vocab, 0, tp).rows : (double)m.vocab;
    const double n = T * V;  // logits of the micro-batch
    const double cast = e == 4 ? 0.0 : e + 4;  // the compute-precision logits to fp32
    if (fwd) {
      r.compute_ms = gemm_ms(hw, T, V, h);
      // cast, the shifted view's contiguous copy (8), log-softmax (its row reductions hit L2: one read, one write)
      r.memory_ms = mem_ms(n * (cast + 8 + 8) + 2 * T * h * e);
      r.weight_ms = mem_ms(V * h * e);
    } else {
      r.compute_ms = gemm_ms(hw, T, h, V) + gemm_ms(hw, V, h, T, true);
      // nll's zero-filled gradient (a write-only fill: 2), log-softmax backward (12), the shift's slice backward
      // (fill 2 + copy 8), the cast back (4 + act_bytes); the lm_head (tied or not) weight gradient accumulated
      r.memory_ms = mem_ms(n * (24 + cast) + 5 * T * h * e + 3 * V * h * e);
      r.weight_ms = mem_ms(2 * V * h * e);
    }
    return r;
  }
  // decoder layer
  const bool gpt2 = arch::is_gpt2(m);
  const double qd = (double)arch::q_dim(m) / tp, kvd = (double)arch::kv_dim(m) / tp, f = (double)m.ffn / tp;
  struct Mat {
    double n, k;  // weight [n out, k in]
  };
  std::vector<Mat> mats;
  if (gpt2) mats = {{3 * qd, h}, {h, qd}, {f, h}, {h, f}};
  else mats = {{qd + 2 * kvd, h}, {h, qd}, {2 * f, h}, {h, f}};
  const double window = m.sliding_window > 0 && m.sliding_window < seq ? 4.0 : 2.0;  // causal blocks skipped
  const double attn_flops = window * mbs * (double)seq * seq * qd * (fwd ? 1.0 : 2.5);  // flash backward: 5 matmuls
  double gemm = 0;
  for (const Mat& w : mats) gemm += fwd ? gemm_ms(hw, T, w.n, w.k) : gemm_ms(hw, T, w.k, w.n) + gemm_ms(hw, w.n, w.k, T, true);
  r.compute_ms = gemm + attn_flops / (hw.gpu_tflops * 1e12 * hw.attn_efficiency) * 1e3;
  const bool gqa = !gpt2 && m.kv_heads < m.heads;
  double el;  // elements per token read or written by the memory-bound passes
  // tp 1 LLaMA-style layers run mmoc's kernels (engine/model/kernels.hpp): SwiGLU one pass each way (SwiGluDown) and,
  // without q/k norms, the rotary and the q/k/v split one pass each way (RopeQKV)
  const bool fused_mlp = hw.engine_kernels && !gpt2 && tp == 1, fused_rope = fused_mlp && !m.qk_norm;
  if (fwd) {
    el = 10 * h;                                     // two norms (read, write) and two residual adds (2 reads, write)
    if (fused_rope) el += 2 * (qd + 2 * kvd);        // qkv read, q/k/v written
    else if (!gpt2) el += 10 * (qd + kvd);           // rotary on q and k (mul, rotate_half, mul, add)
    if (fused_mlp) el += 3 * f;                      // gate and up read, silu(gate) * up written
    else if (!gpt2) el += 5 * f;                     // silu(gate), * up
    else el += 2 * f;                                // GELU
    if (gqa) el += 2 * (qd + kvd);                   // k and v repeated to every head
    if (m.qk_norm) el += 2 * (qd + kvd);
  } else {
    el = 16 * h + 2 * qd;                            // residual gradient sums, norm backward; attention output's copy
    if (fused_rope) el += 2 * (qd + 2 * kvd);        // q/k/v gradients read, qkv's written
    else if (!gpt2) el += 15 * (qd + kvd) + 8 * (qd + 2 * kvd);  // rotary; q/k/v slices into the qkv gradient
    if (fused_mlp) el += 5 * f;                      // gate, up and d(act) read, d(gate | up) written
    else if (!gpt2) el += 21 * f;                    // the SwiGLU's backward passes, the gate/up slices' gradients
    else el += 6 * qd + 3 * f;                       // q/k/v split; GELU backward
    if (gqa) el += 2 * (qd + kvd);                   // the repeated k and v summed back
    if (m.qk_norm) el += 5 * (qd + kvd);
  }
  r.memory_ms = mem_ms(T * el * e + (fwd ? 0.0 : 3 * params * e));  // backward adds the weight gradient into the flat one
  r.weight_ms = mem_ms(params * e * (fwd ? 1 : 2));
  return r;
}

static double compute_ms(const CostModel& c, int layer, int mbs, int seq, bool fwd) {
  const int kind = c.layer_kind(layer);
  if (!c.hw.calibrated_ms.empty()) {  // measured unsharded: a tp rank's share (its collectives are added by the caller)
    auto it = c.hw.calibrated_ms.find(calibration_key(c.m.name, kind, fwd, mbs, seq));
    if (it != c.hw.calibrated_ms.end()) return it->second / std::max(1, c.m.tp);
  }
  const CostModel::LayerParts p = c.layer_parts(layer, mbs, seq, fwd);
  const double compute = p.compute_ms > 0 ? p.compute_ms / c.efficiency((double)mbs * seq) : 0.0;
  return std::max(compute, p.weight_ms) + p.memory_ms + c.hw.launch_overhead_ms;
}

double CostModel::tflops_reproducing(int layer, int mbs, int seq, double fwd_plus_bwd_ms) const {
  const LayerParts f = layer_parts(layer, mbs, seq, true), b = layer_parts(layer, mbs, seq, false);
  const double left = fwd_plus_bwd_ms - f.memory_ms - b.memory_ms - 2 * hw.launch_overhead_ms;
  const double at_one = (f.compute_ms + b.compute_ms) * hw.gpu_tflops / efficiency((double)mbs * seq);  // ms at 1 TFLOP/s
  return left > 0 && at_one > 0 ? at_one / left : 0.0;
}

double CostModel::layer_fwd_ms(int layer, int mbs, int seq) const {
  return compute_ms(*this, layer, mbs, seq, true) + tp_inline_comm_ms(layer, mbs, seq, true);
}
double CostModel::layer_bwd_ms(int layer, int mbs, int seq) const {
  return compute_ms(*this, layer, mbs, seq, false) + tp_inline_comm_ms(layer, mbs, seq, false);
}

double CostModel::layer_selective_ms(int layer, int mbs, int seq) const {
  if (!m.layer_can_select(layer)) return 0.0;
  return (double)mbs * seq * (hw.engine_kernels ? 3.0 : 5.0) * (double)m.ffn * act_bytes / (hw.gpu_mem_gbps * 1e9) * 1e3 + hw.launch_overhead_ms;
}

double CostModel::layer_recompute_ms(int layer, int mbs, int seq, bool output_used) const {
  const double f = layer_fwd_ms(layer, mbs, seq);
  if (output_used || !m.layer_can_select(layer)) return f;
  // the down projection's share of the modelled forward, applied to layer_fwd_ms (which may be a calibrated figure)
  const LayerParts p = layer_parts(layer, mbs, seq, true);
  const double T = (double)mbs * seq, eff = efficiency(T);
  const double modelled = std::max(p.compute_ms / eff, p.weight_ms) + p.memory_ms + hw.launch_overhead_ms;
  const double down = gemm_ms(hw, T, (double)m.hidden, (double)m.ffn / std::max(1, m.tp)) / eff;
  return modelled > 0 ? f * std::max(0.0, 1.0 - down / modelled) : f;
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

double CostModel::gpu_adam_bytes_per_param() const {
  const double e = act_bytes;
  return hw.adam_bytes_per_param + (e == 4 ? 0.0 : e + 4) + 4 + (4 + e);
}

double CostModel::gpu_adam_ms(int64_t params) const {
  if (params <= 0) return 0;
  return (double)params * gpu_adam_bytes_per_param() / (hw.gpu_mem_gbps * 1e9) * 1e3 + hw.launch_overhead_ms;
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
      const int rc_end = st.layer_begin + st.recompute_layers();
      double rc = l < rc_end ? fwd : 0.0;
      // the last recomputed layer skips its down projection (CostModel::layer_recompute_ms; tp 1 LLaMA-style layers)
      if (l + 1 == rc_end && p.tp <= 1 && m.layer_can_select(l))
        rc -= 2.0 * p.micro_batch_size * p.seq_len * (double)m.hidden * m.ffn;
      f.hardware += reps * (train + rc);
    }
  return f;
}

double flops_utilization(double flops, double seconds, int gpus, double peak_tflops) {
  if (!(flops > 0) || !(seconds > 0) || gpus <= 0 || !(peak_tflops > 0)) return 0;
  return flops / seconds / ((double)gpus * peak_tflops * 1e12);
}

int CostModel::optim_threads_per_gpu(int gpus) const { return std::max(1, hw.cpu_cores / std::max(1, gpus)); }

}  // namespace mmoc
