// Internal: what model.cpp's forward and tp.cpp share (the tensor-parallel operators; the forward with a group).
#pragma once
#include <ATen/core/Tensor.h>

#include "engine/model/model.hpp"
#include "engine/model/tp.hpp"

namespace mmoc::engine::detail {

// stage_forward's body. comm == nullptr: the unsharded model (layout.tp_size 1), exactly as before tensor
// parallelism; else the shard of rank comm->rank() (tp_stage_forward checks the layout against comm).
// layer_from/layer_to (-1: the layout's ends): run only those model layers of the stage (stage_forward_layers).
// selective (comm == nullptr only): the SwiGLU MLPs as one SwiGluDown node each (stage_forward_layers).
at::Tensor forward_stage(const ir::ModelArch& arch, const StageLayout& layout, const at::Tensor& flat,
                         const at::Tensor& input, const Rope& rope, const at::Tensor& tied_embedding,
                         bool fused_norm_on_cpu, TpComm* comm, int layer_from = -1, int layer_to = -1,
                         c10::intrusive_ptr<FlatGradTarget> grad_target = {}, bool selective = false,
                         bool output_unused = false);

// Megatron's f (identity forward, all-reduce sum backward) and g (all-reduce sum forward, identity backward). Their
// all-reduces are the plan's (TpComm::allreduce_sum_planned), except an f with planned = false (Qwen3's q/k-norm
// weights: small gradients summed inside the backward segment).
at::Tensor copy_to_tp(const at::Tensor& x, TpComm& comm, bool planned = true);
at::Tensor reduce_from_tp(const at::Tensor& x, TpComm& comm);
// Embedding of `ids` over the rank's vocabulary rows [begin, begin + valid) of `weight` (the shard, padding rows
// after them): ids outside give zero rows; the sum over ranks (g) is the whole embedding.
at::Tensor vocab_parallel_embedding(const at::Tensor& weight, const at::Tensor& ids, int64_t begin, int64_t valid,
                                    TpComm& comm);

}  // namespace mmoc::engine::detail
