// Tensor parallelism at the model level (tp.hpp): the operators f and g, the vocabulary-parallel embedding and
// cross-entropy, the logits gather, and the maps between shards and whole tensors.
#include "engine/model/tp.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "engine/model/tp_detail.hpp"

namespace mmoc::engine {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// The group travels through autograd as an integer (saved_data holds IValues); it must outlive the backward.
int64_t comm_key(TpComm* c) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(c)); }
TpComm& comm_of(AutogradContext* ctx) {
  return *reinterpret_cast<TpComm*>(static_cast<intptr_t>(ctx->saved_data["comm"].toInt()));
}

// The incoming gradient may be shared with another branch of the graph (an add passes one tensor to both of its
// inputs): reduce a copy, never the tensor itself.
// planned: one of the all-reduces a plan names as an instruction (TpComm::allreduce_sum_planned).
at::Tensor summed(const at::Tensor& t, TpComm& comm, bool planned) {
  at::Tensor y = t.clone(at::MemoryFormat::Contiguous);
  if (planned) comm.allreduce_sum_planned(y);
  else comm.allreduce_sum(y);
  return y;
}

// f: identity forward, all-reduce sum of the gradient backward.
struct CopyToTp : torch::autograd::Function<CopyToTp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, TpComm* comm, bool planned) {
    ctx->saved_data["comm"] = comm_key(comm);
    ctx->saved_data["planned"] = planned;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    return {summed(grads[0], comm_of(ctx), ctx->saved_data["planned"].toBool()), at::Tensor(), at::Tensor()};
  }
};

// g: all-reduce sum forward, identity backward.
struct ReduceFromTp : torch::autograd::Function<ReduceFromTp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, TpComm* comm) {
    (void)ctx;
    return summed(x, *comm, /*planned=*/true);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    (void)ctx;
    return {grads[0], at::Tensor()};
  }
};

// All-gather of the vocabulary shards of the logits along the last dimension (padding dropped); backward: the rank's
// own columns of the gradient.
struct GatherLogits : torch::autograd::Function<GatherLogits> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& local, int64_t vocab, TpComm* comm) {
    const int64_t tp = comm->size(), rows = local.size(-1);
    ctx->saved_data["comm"] = comm_key(comm);
    ctx->saved_data["rows"] = rows;
    at::Tensor all = comm->allgather(local.contiguous());  // [tp, ..., rows]
    std::vector<int64_t> perm;
    for (int64_t d = 1; d < all.dim() - 1; ++d) perm.push_back(d);
    perm.push_back(0);
    perm.push_back(all.dim() - 1);
    std::vector<int64_t> shape(local.sizes().begin(), local.sizes().end() - 1);
    shape.push_back(tp * rows);
    return all.permute(perm).reshape(shape).narrow(-1, 0, vocab).contiguous();
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TpComm& comm = comm_of(ctx);
    const int64_t rows = ctx->saved_data["rows"].toInt(), begin = rows * comm.rank();
    const at::Tensor& g = grads[0];
    std::vector<int64_t> shape(g.sizes().begin(), g.sizes().end());
    shape.back() = rows;
    at::Tensor out = at::zeros(shape, g.options());
    const int64_t n = std::max<int64_t>(0, std::min(rows, g.size(-1) - begin));
    if (n > 0) out.narrow(-1, 0, n).copy_(g.narrow(-1, begin, n));
    return {out, at::Tensor(), at::Tensor()};
  }
};

// Cross-entropy summed over rows of fp32 logits [N, rows] holding the rank's vocabulary columns [begin, begin + valid)
// (then padding), against labels [N] (-100 ignored). Forward: the global max (for stability), then the sum of
// exponentials and the target's shifted logit summed over the group; loss_n = log(sum exp) - target. Backward, for
// the rank's columns only: (softmax - one_hot(target)) * grad on the counted rows, zero on the padding columns.
struct VocabParallelCE : torch::autograd::Function<VocabParallelCE> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& labels, int64_t begin,
                            int64_t valid, TpComm* comm) {
    const int64_t N = logits.size(0);
    at::Tensor lg = logits.narrow(1, 0, valid);  // the padding columns take no part
    at::Tensor mx;
    if (valid > 0) mx = std::get<0>(lg.max(1));
    else mx = at::full({N}, -std::numeric_limits<float>::infinity(), logits.options());
    mx = mx.contiguous();
    comm->allreduce_max(mx);
    // one [N, valid] temporary: exp(logits - max), turned into the softmax in place below
    at::Tensor ex = (lg - mx.unsqueeze(1)).exp_();
    at::Tensor counted = labels.ne(-100);
    at::Tensor local = labels - begin;
    at::Tensor mine = at::logical_and(local.ge(0), local.lt(valid));
    at::Tensor idx = at::where(mine, local, at::zeros_like(local));
    at::Tensor zero = at::zeros({N}, logits.options());
    at::Tensor target =
        valid > 0 ? at::where(mine, lg.gather(1, idx.unsqueeze(1)).squeeze(1) - mx, zero) : zero;
    at::Tensor both = at::stack({ex.sum(1), target}).contiguous();  // one all-reduce for the two sums
    comm->allreduce_sum(both);
    at::Tensor sum_exp = both[0], tgt = both[1];
    at::Tensor loss = at::where(counted, sum_exp.log() - tgt, at::zeros_like(tgt)).sum();
    ex.div_(sum_exp.unsqueeze(1));  // softmax over the whole vocabulary, this rank's columns
    ctx->save_for_backward({ex, idx, at::logical_and(mine, counted), counted});
    ctx->saved_data["cols"] = logits.size(1);
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor softmax = saved[0], idx = saved[1], hit = saved[2], counted = saved[3];
    const int64_t cols = ctx->saved_data["cols"].toInt(), valid = softmax.size(1);
    at::Tensor g = at::zeros({softmax.size(0), cols}, softmax.options());
    if (valid > 0) {
      at::Tensor gv = g.narrow(1, 0, valid);
      gv.copy_(softmax);
      gv.scatter_add_(1, idx.unsqueeze(1), -hit.to(softmax.scalar_type()).unsqueeze(1));
      gv.mul_(counted.to(softmax.scalar_type()).unsqueeze(1) * grads[0]);
    }
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check_group(const StageLayout& layout, TpComm& comm, const char* what) {
  if (comm.size() != layout.tp_size || comm.rank() != layout.tp_rank)
    throw std::invalid_argument(std::string(what) + ": the layout is tensor-parallel shard " +
                                std::to_string(layout.tp_rank) + " of " + std::to_string(layout.tp_size) +
                                " but the group is rank " + std::to_string(comm.rank()) + " of " +
                                std::to_string(comm.size()));
}

}  // namespace

at::Tensor detail::copy_to_tp(const at::Tensor& x, TpComm& comm, bool planned) { return CopyToTp::apply(x, &comm, planned); }
at::Tensor detail::reduce_from_tp(const at::Tensor& x, TpComm& comm) { return ReduceFromTp::apply(x, &comm); }

at::Tensor detail::vocab_parallel_embedding(const at::Tensor& weight, const at::Tensor& ids, int64_t begin,
                                            int64_t valid, TpComm& comm) {
  at::Tensor local = ids - begin;
  at::Tensor mine = at::logical_and(local.ge(0), local.lt(valid));
  at::Tensor e = at::embedding(weight, at::where(mine, local, at::zeros_like(local)));
  return reduce_from_tp(e.masked_fill(mine.logical_not().unsqueeze(-1), 0), comm);
}

at::Tensor tp_stage_forward(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat,
                            const at::Tensor& input, const Rope& rope, TpComm& comm, const at::Tensor& tied_embedding,
                            bool fused_norm_on_cpu) {
  check_group(layout, comm, "tp_stage_forward");
  if (layout.tp_size == 1)
    return detail::forward_stage(a, layout, flat, input, rope, tied_embedding, fused_norm_on_cpu, nullptr);
  if (layout.has_embedding() && input.defined() && input.device().is_cpu() && input.scalar_type() == at::kLong &&
      input.numel() > 0) {
    // On one rank an id outside the vocabulary would simply match no shard (a zero embedding); at::embedding of the
    // unsharded model refuses it. Checked where it costs no device synchronisation.
    const int64_t lo = input.min().item<int64_t>(), hi = input.max().item<int64_t>();
    if (lo < 0 || hi >= a.vocab)
      throw std::invalid_argument("tp_stage_forward: token id " + std::to_string(lo < 0 ? lo : hi) +
                                  " outside the vocabulary [0," + std::to_string(a.vocab) + ")");
  }
  return detail::forward_stage(a, layout, flat, input, rope, tied_embedding, fused_norm_on_cpu, &comm);
}

at::Tensor tp_stage_forward_layers(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat,
                                   const at::Tensor& input, const Rope& rope, TpComm& comm, int layer_from, int layer_to,
                                   const at::Tensor& tied_embedding, bool fused_norm_on_cpu,
                                   c10::intrusive_ptr<FlatGradTarget> grad_target) {
  check_group(layout, comm, "tp_stage_forward_layers");
  if (layout.tp_size == 1)
    return stage_forward_layers(a, layout, flat, input, rope, layer_from, layer_to, tied_embedding, fused_norm_on_cpu,
                                std::move(grad_target));
  if (layer_from < layout.layer_begin || layer_from >= layer_to || layer_to > layout.layer_end)
    throw std::invalid_argument("tp_stage_forward_layers: layers [" + std::to_string(layer_from) + ", " + std::to_string(layer_to) +
                                ") are not a non-empty part of the stage's [" + std::to_string(layout.layer_begin) + ", " +
                                std::to_string(layout.layer_end) + ")");
  if (layer_from == 0 && input.defined() && input.device().is_cpu() && input.scalar_type() == at::kLong && input.numel() > 0) {
    const int64_t lo = input.min().item<int64_t>(), hi = input.max().item<int64_t>();  // as tp_stage_forward
    if (lo < 0 || hi >= a.vocab)
      throw std::invalid_argument("tp_stage_forward_layers: token id " + std::to_string(lo < 0 ? lo : hi) +
                                  " outside the vocabulary [0," + std::to_string(a.vocab) + ")");
  }
  return detail::forward_stage(a, layout, flat, input, rope, tied_embedding, fused_norm_on_cpu, &comm, layer_from, layer_to,
                               std::move(grad_target));
}

at::Tensor tp_lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab, TpComm& comm) {
  if (comm.size() == 1) return lm_loss_sum(logits, labels);
  const arch::TpVocab voc = arch::tp_vocab(vocab, comm.rank(), comm.size());
  if (logits.dim() != 3 || labels.dim() != 2 || logits.size(0) != labels.size(0) || logits.size(1) != labels.size(1) ||
      logits.size(2) != voc.rows)
    throw std::invalid_argument("tp_lm_loss_sum: logits [B,T," + std::to_string(voc.rows) +
                                "] (the rank's vocabulary shard) and labels [B,T] expected");
  const int64_t T = logits.size(1);
  if (T < 2) return (logits.sum() * 0).to(at::kFloat);
  auto lg = logits.narrow(1, 0, T - 1).to(at::kFloat).reshape({-1, voc.rows});
  auto lb = labels.narrow(1, 1, T - 1).to(logits.device(), at::kLong).reshape({-1});
  if (lb.device().is_cpu() && lb.numel() > 0) {  // what cross_entropy refuses on one rank
    at::Tensor bad = at::logical_and(lb.ne(-100), at::logical_or(lb.lt(0), lb.ge(vocab)));
    if (bad.any().item<bool>())
      throw std::invalid_argument("tp_lm_loss_sum: label " + std::to_string(lb.masked_select(bad)[0].item<int64_t>()) +
                                  " outside the vocabulary [0," + std::to_string(vocab) + ") (and not -100)");
  }
  return VocabParallelCE::apply(lg, lb, voc.begin, voc.valid, &comm);
}

at::Tensor tp_gather_logits(const at::Tensor& local, int64_t vocab, TpComm& comm) {
  if (comm.size() == 1) return local;
  if (local.dim() < 1 || local.size(-1) != arch::tp_vocab(vocab, comm.rank(), comm.size()).rows)
    throw std::invalid_argument("tp_gather_logits: the last dimension must be the rank's vocabulary rows");
  return GatherLogits::apply(local, vocab, &comm);
}

// ---- shard <-> whole --------------------------------------------------------------------------------------------

namespace {
void check_shapes(const ParamInfo& p, const at::Tensor& full, const at::Tensor& shard, const char* what) {
  const auto& fs = p.shard.full_shape.empty() ? p.shape : p.shard.full_shape;
  if (full.sizes() != at::IntArrayRef(fs) || shard.sizes() != at::IntArrayRef(p.shape))
    throw std::invalid_argument(std::string(what) + ": tensor shapes do not match parameter '" + p.name + "'");
}
}  // namespace

void copy_full_to_shard(const ParamInfo& p, const at::Tensor& full, const at::Tensor& shard) {
  check_shapes(p, full, shard, "copy_full_to_shard");
  at::NoGradGuard ng;
  if (!p.shard.sharded()) {
    shard.copy_(full);
    return;
  }
  int64_t pos = 0;
  for (const auto& pc : p.shard.pieces) {
    shard.narrow(p.shard.dim, pos, pc.length).copy_(full.narrow(p.shard.dim, pc.start, pc.length));
    pos += pc.length;
  }
  if (pos < shard.size(p.shard.dim)) shard.narrow(p.shard.dim, pos, shard.size(p.shard.dim) - pos).zero_();
}

void copy_shard_to_full(const ParamInfo& p, const at::Tensor& shard, const at::Tensor& full) {
  check_shapes(p, full, shard, "copy_shard_to_full");
  at::NoGradGuard ng;
  if (!p.shard.sharded()) {
    full.copy_(shard);
    return;
  }
  int64_t pos = 0;
  for (const auto& pc : p.shard.pieces) {
    full.narrow(p.shard.dim, pc.start, pc.length).copy_(shard.narrow(p.shard.dim, pos, pc.length));
    pos += pc.length;
  }
}

at::Tensor shard_flat(const ir::ModelArch& a, const StageLayout& shard, const at::Tensor& full_flat) {
  const StageLayout full = stage_layout(a, shard.layer_begin, shard.layer_end);
  if (!full_flat.defined() || full_flat.dim() != 1 || full_flat.numel() != full.numel)
    throw std::invalid_argument("shard_flat: the flat tensor does not match the unsharded stage layout (" +
                                std::to_string(full.numel) + " elements)");
  at::Tensor out = at::zeros({shard.numel}, full_flat.options().requires_grad(false));
  for (size_t i = 0; i < shard.params.size(); ++i) {
    const auto &p = shard.params[i], &f = full.params[i];
    copy_full_to_shard(p, full_flat.detach().narrow(0, f.offset, f.numel).view(f.shape),
                       out.narrow(0, p.offset, p.numel).view(p.shape));
  }
  return out;
}

at::Tensor assemble_flat(const ir::ModelArch& a, int b, int e, const std::vector<at::Tensor>& shards,
                         bool check_replicas) {
  const int tp = static_cast<int>(shards.size());
  if (tp < 1) throw std::invalid_argument("assemble_flat: no shards");
  const StageLayout full = stage_layout(a, b, e);
  at::Tensor out;
  for (int r = 0; r < tp; ++r) {
    const StageLayout L = stage_layout(a, b, e, r, tp);
    const at::Tensor& s = shards[r];
    if (!s.defined() || s.dim() != 1 || s.numel() != L.numel)
      throw std::invalid_argument("assemble_flat: shard " + std::to_string(r) + " does not match its layout (" +
                                  std::to_string(L.numel) + " elements)");
    if (!out.defined()) out = at::zeros({full.numel}, s.options().requires_grad(false));
    for (size_t i = 0; i < L.params.size(); ++i) {
      const auto &p = L.params[i], &f = full.params[i];
      at::Tensor src = s.detach().narrow(0, p.offset, p.numel).view(p.shape);
      at::Tensor dst = out.narrow(0, f.offset, f.numel).view(f.shape);
      if (L.replicated(p) && r > 0) {
        if (check_replicas && !at::equal(src, dst.to(src.device())))
          throw std::runtime_error("assemble_flat: replicated parameter '" + p.name + "' differs between rank 0 and rank " +
                                   std::to_string(r));
        continue;
      }
      copy_shard_to_full(p, src, dst);
    }
  }
  return out;
}

at::Tensor tp_gather_flat(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat, TpComm& comm) {
  check_group(layout, comm, "tp_gather_flat");
  if (!flat.defined() || flat.dim() != 1 || flat.numel() != layout.numel)
    throw std::invalid_argument("tp_gather_flat: the flat tensor does not match the layout");
  if (layout.tp_size == 1) return flat.detach();
  at::NoGradGuard ng;
  at::Tensor all = comm.allgather(flat.detach().contiguous());  // [tp, numel]
  std::vector<at::Tensor> shards;
  for (int r = 0; r < layout.tp_size; ++r) shards.push_back(all[r]);
  return assemble_flat(a, layout.layer_begin, layout.layer_end, shards);
}

void tp_init_weights(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat, uint64_t seed,
                     double std) {
  if (layout.tp_size == 1) {
    init_weights(a, layout, flat, seed, std);
    return;
  }
  if (!flat.defined() || flat.dim() != 1 || flat.numel() != layout.numel || !flat.is_contiguous())
    throw std::invalid_argument("tp_init_weights: flat tensor does not match the layout");
  at::NoGradGuard ng;
  flat.zero_();
  // Each parameter as init_weights makes it in the unsharded model (a one-parameter layout: its values depend on the
  // seed, the name, the kind and the element only), then the rank's slice of it.
  // TODO(after the counter-based init is merged): fill only the slice's elements (fill_normal at their indices).
  for (const auto& p : layout.params) {
    StageLayout one;
    one.layer_begin = layout.layer_begin;
    one.layer_end = layout.layer_end;
    ParamInfo q = p;
    q.shape = p.shard.full_shape;
    q.numel = 1;
    for (auto d : q.shape) q.numel *= d;
    q.offset = 0;
    q.shard = arch::Shard{-1, {}, q.shape};
    one.numel = one.param_count = q.numel;
    one.params = {q};
    at::Tensor whole = at::empty({q.numel}, at::kFloat);
    init_weights(a, one, whole, seed, std);
    copy_full_to_shard(p, whole.view(q.shape).to(flat.device(), flat.scalar_type()),
                       flat.narrow(0, p.offset, p.numel).view(p.shape));
  }
}

double tp_replica_divergence(const StageLayout& layout, const at::Tensor& flat, TpComm& comm) {
  check_group(layout, comm, "tp_replica_divergence");
  if (layout.tp_size == 1) return 0.0;
  std::vector<at::Tensor> parts;
  for (const auto& p : layout.params)
    if (layout.replicated(p)) parts.push_back(flat.detach().narrow(0, p.offset, p.numel).to(at::kFloat));
  if (parts.empty()) return 0.0;
  at::NoGradGuard ng;
  at::Tensor x = at::cat(parts), hi = x.clone(), neg_lo = x.neg();
  comm.allreduce_max(hi);
  comm.allreduce_max(neg_lo);
  return (hi + neg_lo).abs().max().item<double>();
}

}  // namespace mmoc::engine
