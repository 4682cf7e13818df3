// Tensor parallelism (Megatron-LM) at the model level, for every family: the forward of a stage's shard, the
// vocabulary-parallel cross-entropy, and the maps between a rank's shard and the whole tensors (gather, shard,
// initialise). The sharded layout (which part of which tensor a rank holds) is arch/layout.hpp's
// stage_layout(arch, begin, end, tp_rank, tp_size); docs/design.md ("Tensor parallelism") says what the executor
// provides and calls.
//
// Per decoder layer, with x replicated on every rank of the tensor-parallel group:
//   attention: x -> norm -> f -> column-parallel q/k/v (the rank's heads and kv heads) -> attention over those heads
//              -> row-parallel o_proj -> g -> + o bias (GPT-2) -> + residual
//   MLP:       x -> norm -> f -> column-parallel gate/up (c_fc) -> activation -> row-parallel down (c_proj) -> g
//              -> + down bias (GPT-2) -> + residual
//   f: identity forward, sum over ranks backward; g: sum over ranks forward, identity backward.
// Embedding: each rank looks up the ids in its vocabulary rows (others give zeros), then g. Head: norm -> f ->
// the rank's vocabulary rows of lm_head (or of the tied embedding) -> fp32 logits of its vocabulary shard, which
// tp_lm_loss_sum turns into the loss without gathering the whole vocabulary.
//
// Replicated parameters (norms, Qwen3's q_norm/k_norm, GPT-2's position embeddings and row-parallel biases) get the
// same gradient, bit for bit, on every rank: they act on replicated activations whose gradients are summed over
// ranks by f (so every rank runs the same operations on the same values), except q_norm/k_norm, which act on the
// rank's own heads only: their weight passes through f, so their partial gradients are summed inside backward.
// The executor therefore must NOT reduce replicated gradients over the tensor-parallel group; the same AdamW step on
// the same gradient keeps the replicas identical (tp_replica_divergence checks it). For the global gradient norm each
// element counts once: arch::grad_norm_ranges.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"

namespace mmoc::engine {

// The collectives of one tensor-parallel group, supplied by the caller (the executor: gloo process groups on the CPU,
// NCCL on CUDA; tests: threads). Every member calls the same operations in the same order, from the thread that runs
// the forward and backward (autograd runs the backward's collectives in the same order on every rank: the graphs are
// the same). Tensors are contiguous, of the same shape and dtype on every rank, on the device the model computes on;
// on CUDA the operations must be ordered with the current stream. Results must be identical, bit for bit, on every
// rank (ring/tree all-reduce and all-gather are; the replicas' equality relies on it).
class TpComm {
 public:
  virtual ~TpComm() = default;
  virtual int rank() const = 0;  // in [0, size())
  virtual int size() const = 0;
  // In place: t = the element-wise sum (max) of t over the group's ranks.
  virtual void allreduce_sum(at::Tensor& t) = 0;
  // The same sum for the all-reduces a plan names as instructions (ir::tp_collectives: g after the embedding and every
  // row-parallel projection forward, f before every column-parallel projection backward; [B,T,H] in the compute
  // dtype). The executor's group hands them to the instruction that runs them (engine/exec/tp_segments.hpp); by
  // default it is allreduce_sum. The loss's and Qwen3's q/k-norm gradients' reductions use allreduce_sum.
  virtual void allreduce_sum_planned(at::Tensor& t) { allreduce_sum(t); }
  virtual void allreduce_max(at::Tensor& t) = 0;
  // [size(), t.sizes()...]: rank i's t at index i, on every rank.
  virtual at::Tensor allgather(const at::Tensor& t) = 0;
};

// The forward of a stage's tensor-parallel shard: `layout` = stage_layout(arch, begin, end, comm.rank(), comm.size())
// and `flat` its flat weights. input: int64 token ids [B,T] when the stage starts at layer 0 (the same on every rank),
// else hidden states [B,T,H] (replicated). Returns hidden states [B,T,H] (replicated: the same on every rank), or,
// when the stage ends with the head, fp32 logits [B,T,tp_vocab(...).rows] of the rank's vocabulary shard (columns
// past `valid` are the padding rows' zeros). tied_embedding: the rank's shard of the token embedding
// (embedding_view of the first stage's shard) when the head's stage lacks the embedding, as in stage_forward.
// tp 1 runs exactly stage_forward. Autograd works through it; `comm` must outlive the backward.
at::Tensor tp_stage_forward(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat,
                            const at::Tensor& input, const Rope& rope, TpComm& comm,
                            const at::Tensor& tied_embedding = at::Tensor(), bool fused_norm_on_cpu = false);

// tp_stage_forward of only the model layers [layer_from, layer_to) of the stage, as stage_forward_layers (model.hpp)
// is to stage_forward: partial recompute splits a tensor-parallel stage's forward in two such calls. grad_target:
// where the shard's flat weight gradient goes (FlatGradTarget). tp 1 runs exactly stage_forward_layers.
at::Tensor tp_stage_forward_layers(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat,
                                   const at::Tensor& input, const Rope& rope, TpComm& comm, int layer_from, int layer_to,
                                   const at::Tensor& tied_embedding = at::Tensor(), bool fused_norm_on_cpu = false,
                                   c10::intrusive_ptr<FlatGradTarget> grad_target = {});

// lm_loss_sum over vocabulary-parallel logits (tp_stage_forward's head output): the sum over tokens of next-token
// cross-entropy in fp32 with HF's shift, labels -100 ignored, the padding columns excluded. The max, the sum of
// exponentials and the target logit are reduced over the group; the whole-vocabulary logits never exist. The same
// value on every rank; differentiable (the gradient of each rank's logits is local). tp 1: lm_loss_sum.
at::Tensor tp_lm_loss_sum(const at::Tensor& local_logits, const at::Tensor& labels, int64_t vocab, TpComm& comm);

// The whole-vocabulary logits [B,T,vocab] from every rank's shard (all-gather; padding dropped), on every rank.
// Differentiable (each rank's gradient is its own columns). For evaluation and tests: training uses tp_lm_loss_sum.
at::Tensor tp_gather_logits(const at::Tensor& local_logits, int64_t vocab, TpComm& comm);

// ---- shard <-> whole tensors ------------------------------------------------------------------------------------
// `p` is a parameter of a (possibly) sharded layout. `full` is the whole tensor (flat orientation, p.shard.full_shape),
// `shard` the rank's part (p.shape). to_shard fills the padding rows with zeros; to_full writes the pieces only.
void copy_full_to_shard(const ParamInfo& p, const at::Tensor& full, const at::Tensor& shard);
void copy_shard_to_full(const ParamInfo& p, const at::Tensor& shard, const at::Tensor& full);

// The flat tensor of `shard` (a sharded layout of stage [b, e)) cut out of `full_flat`, the flat tensor of the same
// stage unsharded (stage_layout(arch, b, e)): for weights, gradients and optimizer states alike.
at::Tensor shard_flat(const ir::ModelArch& arch, const StageLayout& shard, const at::Tensor& full_flat);
// The unsharded flat tensor of the stage from all ranks' shards (shards[r] of layout stage_layout(..., r, tp)).
// Replicated parameters are taken from rank 0; with check_replicas they must be bit-identical on every rank
// (std::runtime_error naming the parameter otherwise).
at::Tensor assemble_flat(const ir::ModelArch& arch, int layer_begin, int layer_end,
                         const std::vector<at::Tensor>& shards, bool check_replicas = false);
// assemble_flat over the group: every rank gets the unsharded flat tensor of the stage (all-gather of the shards).
// What a checkpoint writer calls before save_hf_checkpoint (whose layouts are then the unsharded ones).
at::Tensor tp_gather_flat(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat, TpComm& comm);

// init_weights for a shard: each parameter's slice of what init_weights gives the unsharded model (so any tp gives
// the same model), padding zero. tp 1: init_weights.
void tp_init_weights(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat, uint64_t seed,
                     double std = 0.02);

// The largest |max - min| over the group of every replicated parameter's elements in `flat` (weights or gradients):
// 0 when the replicas are bit-identical (two max all-reduces; 0 at tp 1).
double tp_replica_divergence(const StageLayout& layout, const at::Tensor& flat, TpComm& comm);

}  // namespace mmoc::engine
