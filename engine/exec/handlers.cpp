// The op handlers of a worker: each checks its preconditions and keeps the books of what is on the device, which
// check_effects() compares with the op table (ir::effects) around every instruction.
#include "engine/exec/worker_impl.hpp"

namespace mmoc::engine {

void Worker::Impl::load_batch(int m) {
  if (ids.count(m)) throw ExecError("batch(m" + std::to_string(m) + ") loaded twice");
  const int64_t mbs = plan.micro_batch_size, T = plan.seq_len;
  ids[m] = pinned_ids[m].view({mbs, T}).to(dev, /*non_blocking=*/true, /*copy=*/true);
  labels[m] = pinned_labels[m].view({mbs, T}).to(dev, /*non_blocking=*/true, /*copy=*/true);
  cur_bytes += ir::batch_buffer_bytes(mbs, T);
  peak_bytes = std::max(peak_bytes, cur_bytes);
}

void Worker::Impl::free_batch(int m) {
  if (!ids.count(m)) throw ExecError("free of batch(m" + std::to_string(m) + ") that is not loaded");
  ids.erase(m);
  labels.erase(m);
  cur_bytes -= ir::batch_buffer_bytes(plan.micro_batch_size, plan.seq_len);
}

const at::Tensor& Worker::Impl::batch_ids(int m, const char* why) {
  auto it = ids.find(m);
  if (it == ids.end()) throw ExecError(std::string(why) + ": batch(m" + std::to_string(m) + ") not loaded");
  return it->second;
}

const at::Tensor& Worker::Impl::batch_labels(int m) {
  auto it = labels.find(m);
  if (it == labels.end()) throw ExecError("labels of batch(m" + std::to_string(m) + ") not loaded");
  return it->second;
}

// Partial recompute (Stage::keep_layers): the stage's first recompute_layers() layers run without autograd here and
// again inside backward; the others keep their autograd stash, with the split's hidden state as their input leaf.
void Worker::Impl::forward(int s, int m) {
  StageState& st = stages.at(s);
  if (rec.count({s, m})) throw ExecError("forward S" + std::to_string(s) + " m" + std::to_string(m) + " ran twice");
  at::Tensor w = stage_weights(s);
  at::Tensor input = s == 0 ? batch_ids(m, "forward of the first stage") : need({BufKind::Act, s - 1, m}, "stage input missing");
  const at::Tensor tie = tied_head(s) ? need({BufKind::Tie, s, -1}, "tied lm_head") : at::Tensor();
  const ir::Stage& ps = plan.stages[s];
  const int split = ps.layer_begin + ps.recompute_layers();  // [begin, split) recompute, [split, end) keep
  FwdRecord r;
  r.input = input;
  at::Tensor out, mid = input;
  if (split > ps.layer_begin) {
    at::NoGradGuard ng;
    // the tied head is in this part only when the whole stage recomputes
    mid = run_layers(st, w, input, ps.layer_begin, split, {}, split == ps.layer_end ? tie : at::Tensor());
    out = mid;
  }
  if (split < ps.layer_end) {
    r.target = c10::make_intrusive<FlatGradTarget>();
    r.w_leaf = w.detach().requires_grad_(true);
    r.in_leaf = split > 0 ? mid.detach().requires_grad_(true) : mid;
    if (tie.defined()) r.tie_leaf = tie.detach().requires_grad_(true);
    out = run_layers(st, r.w_leaf, r.in_leaf, split, ps.layer_end, r.target, r.tie_leaf, ps.selective);
    r.out = out;
  }
  if (s == last) {
    at::Tensor l = loss_of(out, batch_labels(m));
    if (shard == 0) loss_acc.add_(l.detach().to(at::kDouble));  // tp shards compute the same loss: counted once
    if (split < ps.layer_end) r.loss = l;
  } else {
    put({BufKind::Act, s, m}, out.detach());
  }
  rec[{s, m}] = std::move(r);
}

void Worker::Impl::backward(int s, int m) {
  StageState& st = stages.at(s);
  auto it = rec.find({s, m});
  if (it == rec.end()) throw ExecError("backward S" + std::to_string(s) + " m" + std::to_string(m) + " before its forward");
  FwdRecord r = std::move(it->second);
  rec.erase(it);
  at::Tensor w = stage_weights(s);
  const ir::Stage& ps = plan.stages[s];
  const int split = ps.layer_begin + ps.recompute_layers();
  // the weight gradient is added in place into wgrad(S) by the backward itself (FlatGradTarget): the first
  // micro-batch's backward allocates it
  BufRef wg{BufKind::WGrad, s, -1};
  auto wit = bufs.find(wg);
  const bool had_wgrad = wit != bufs.end();
  auto target = c10::make_intrusive<FlatGradTarget>();
  if (had_wgrad) target->grad = wit->second;
  at::Tensor grad_out;  // gradient w.r.t. the output of the part run next (undefined: the loss)
  if (s != last) grad_out = take({BufKind::Grad, s, m});
  if (s == 0 && s == last) batch_ids(m, "backward");
  at::Tensor tie_grad;  // tied head over stages: the gradient of tie(S), added into tiegrad(S)
  auto run_backward = [&](const at::Tensor& out, const at::Tensor& loss, const at::Tensor& w_leaf, const at::Tensor& in_leaf,
                          bool want_input_grad, const at::Tensor& tie_leaf) {
    torch::autograd::variable_list outputs, grad_outputs, inputs{w_leaf};
    if (loss.defined()) {
      outputs.push_back(loss);
      grad_outputs.push_back(at::full({}, 1.0 / double(count), loss.options()));
    } else {
      outputs.push_back(out);
      grad_outputs.push_back(grad_out);
    }
    if (want_input_grad) inputs.push_back(in_leaf);
    if (tie_leaf.defined()) inputs.push_back(tie_leaf);
    auto g = torch::autograd::grad(outputs, inputs, grad_outputs, /*retain_graph=*/false, /*create_graph=*/false,
                                   /*allow_unused=*/true);
    if (tie_leaf.defined()) tie_grad = g.back();
    return want_input_grad ? g[1] : at::Tensor();
  };
  if (split < ps.layer_end) {  // the layers that kept their stash
    r.target->grad = target->grad;
    grad_out = run_backward(r.out, r.loss, r.w_leaf, r.in_leaf, split > 0, r.tie_leaf);
    target->grad = r.target->grad;
    FwdRecord rest;  // their saved tensors go now
    rest.input = r.input;
    r = std::move(rest);
  }
  if (split > ps.layer_begin) {  // recompute the first layers, then their backward
    at::Tensor w_leaf = w.detach().requires_grad_(true);
    at::Tensor in_leaf = s > 0 ? r.input.detach().requires_grad_(true) : r.input;
    at::Tensor tie_leaf;  // the tied head is in this part only when the whole stage recomputes
    if (split == ps.layer_end && tied_head(s)) tie_leaf = need({BufKind::Tie, s, -1}, "tied lm_head").detach().requires_grad_(true);
    // the recomputed part's output value is read only when it ends with the head (the loss); else only the gradient
    // through it is wanted, so its last layer skips the down projection (stage_forward_layers' output_unused)
    const bool head = split == ps.layer_end && s == last;
    at::Tensor out = run_layers(st, w_leaf, in_leaf, ps.layer_begin, split, target, tie_leaf, false, !head);
    at::Tensor loss;
    if (head) loss = loss_of(out, batch_labels(m));
    grad_out = run_backward(out, loss, w_leaf, in_leaf, s > 0, tie_leaf);
  }
  if (!target->grad.defined()) throw ExecError("backward S" + std::to_string(s) + " m" + std::to_string(m) + " produced no weight gradient");
  if (!had_wgrad) put(wg, target->grad);
  if (tied_head(s)) {
    if (!tie_grad.defined()) throw ExecError("backward S" + std::to_string(s) + " m" + std::to_string(m) + " produced no tied-embedding gradient");
    BufRef tg{BufKind::TieGrad, s, -1};  // allocated by the first backward of the step
    auto tit = bufs.find(tg);
    if (tit == bufs.end()) put(tg, tie_grad);
    else tit->second.add_(tie_grad);
  }
  if (s > 0) {
    take({BufKind::Act, s - 1, m});  // the input is consumed
    put({BufKind::Grad, s - 1, m}, grad_out);
  }
}

void Worker::Impl::prefetch(const BufRef& b) {
  if (bufs.count(b)) throw ExecError("prefetch of " + b.str() + " that is already on the device");
  if (b.kind == BufKind::Tie) {  // the current embedding rows of stage 0's weights: its GPU copy, or its host copy
    if (!tied_head(b.stage) || !stages.count(0)) throw ExecError("prefetch of " + b.str() + " on a rank without stage 0");
    StageState& s0 = stages.at(0);
    if (s0.resident) {
      put(b, embedding_view(plan.model, s0.layout, need({BufKind::W, 0, -1}, "tied embedding")).clone());
      return;
    }
    if (cuda) {
      auto it = pending_optim.find(0);  // the previous step's update of stage 0 must be done (its prefetch erases it)
      if (it != pending_optim.end()) it->second.get();
    }
    put(b, embedding_view(plan.model, s0.layout, s0.host_lowp).to(dev, /*non_blocking=*/true, /*copy=*/true));
    return;
  }
  if (b.kind != BufKind::W) throw ExecError("prefetch of " + b.str() + ": only weights are prefetched");
  StageState& st = stages.at(b.stage);
  if (cuda) {
    auto it = pending_optim.find(b.stage);  // the previous step's update of these weights must be done
    if (it != pending_optim.end()) { it->second.get(); pending_optim.erase(it); }
  }
  if (cuda && opts.prefetch_pool == "comp" && cur_stream != 0) {
    // allocated from the compute stream's pool: that memory may still be read by compute work already queued (the
    // allocator reuses a block its stream freed at once), so this stream waits for the compute stream first
    at::Tensor dst;
    {
      c10::cuda::CUDAStreamGuard g(*streams[0]);
      dst = at::empty(st.host_lowp.sizes(), st.host_lowp.options().device(dev).pinned_memory(false));
    }
    at::cuda::CUDAEvent queued;
    queued.record(*streams[0]);
    queued.block(*streams[cur_stream]);
    dst.copy_(st.host_lowp, /*non_blocking=*/true);  // on this (the h2d) stream; take() records it for the free
    put(b, std::move(dst));
    return;
  }
  put(b, st.host_lowp.to(dev, /*non_blocking=*/true, /*copy=*/true));
}

// Elements [begin, end) of the instruction's bucket of a stage's flat gradient (the whole flat without one).
std::pair<int64_t, int64_t> Worker::Impl::bucket_of(const ir::Instr& in, const StageState& st, int64_t numel) const {
  if (in.buckets <= 1) return {0, numel};
  return ir::bucket_range(numel, in.bucket, in.buckets, st.sharded ? plan.dp : 1);
}

void Worker::Impl::evict(const ir::Instr& in) {
  const BufRef& b = *in.buf;
  // a bucket of the gradient other than the last: that slice is copied, the buffer stays (the op table's effects)
  const bool last_bucket = in.buckets <= 1 || in.bucket == in.buckets - 1;
  at::Tensor t = last_bucket ? take(b) : need(b, "evict of a bucket");
  if (!in.to_host) return;
  if (b.kind != BufKind::WGrad) throw ExecError("evict " + b.str() + " -> host: only gradients are copied out");
  StageState& st = stages.at(b.stage);
  const auto [a, e] = bucket_of(in, st, t.numel());
  // this replica's shard of the bucket (reduced) when sharded, else the bucket
  const int64_t x = std::max(a, st.lo), y = std::min(e, st.lo + st.n);
  if (x < y) st.host_grad.narrow(0, x - st.lo, y - x).copy_(t.narrow(0, x, y - x), /*non_blocking=*/true);
}

void Worker::Impl::send(const ir::Instr& in) {
  const at::Tensor& t = need(*in.buf, "send");
  if (sends.count(*in.buf)) throw ExecError("second send of " + in.buf->str());
  if (!tr) throw ExecError("send in a plan run without a transport");
  if (cuda) inflight.push_back(tr->isend(t, peer_rank(in.peer), in.tag));  // ordered on the p2p stream
  else sends[*in.buf] = tr->isend(t, peer_rank(in.peer), in.tag);
}

void Worker::Impl::recv(const ir::Instr& in) {
  if (bufs.count(*in.buf)) throw ExecError("second recv of " + in.buf->str() + " (it is already on the device)");
  const bool tie = in.buf->kind == BufKind::Tie || in.buf->kind == BufKind::TieGrad;
  // the tied embedding: this tp shard's vocabulary rows (all of them at tp 1)
  const int64_t rows = tie ? arch::tp_vocab(plan.model.vocab, shard, std::max(1, plan.tp)).rows : 0;
  at::Tensor t = at::empty(tie ? std::vector<int64_t>{rows, plan.model.hidden} : act_shape(),
                           at::TensorOptions().dtype(cdtype).device(dev));
  if (!tr) throw ExecError("recv in a plan run without a transport");
  if (cuda) inflight.push_back(tr->irecv(t, peer_rank(in.peer), in.tag));
  else tr->recv(t, peer_rank(in.peer), in.tag);
  put(*in.buf, t);
}

// ---- tensor-parallel segments (tp_segments.hpp) ---------------------------------------------------------------
void Worker::Impl::segment(const ir::Instr& in) {
  const std::tuple<int, int, int> key{(int)in.op, in.stage, in.mb};
  const int n = ir::tp_collectives(plan, in.stage, in.op);
  const std::string what = ir::print_op(in);
  if (!stc) throw ExecError(what + ": a tensor-parallel segment in a plan run without a tp group");
  if (in.seg > n) throw ExecError(what + ": S" + std::to_string(in.stage) + " has " + std::to_string(n + 1) + " segments");
  SegmentRun* run = nullptr;
  if (in.seg == 0) {
    if (seg_runs.count(key)) throw ExecError(what + ": its segments have started already");
    const ir::Op op = in.op;
    const int s = in.stage, m = in.mb;
    std::function<void()> setup;
    if (cuda) {
      const c10::cuda::CUDAStream cur = c10::cuda::getCurrentCUDAStream();  // the instruction's stream (comp)
      const int dev_index = cuda_index;
      setup = [cur, dev_index] {
        c10::cuda::set_device((c10::DeviceIndex)dev_index);
        c10::cuda::setCurrentCUDAStream(cur);
      };
    }
    auto r = std::make_unique<SegmentRun>([this, op, s, m] { op == Op::Forward ? forward(s, m) : backward(s, m); }, setup);
    run = r.get();
    seg_runs[key] = std::move(r);
    stc->active = run;
    run->start();
  } else {
    auto it = seg_runs.find(key);
    if (it == seg_runs.end()) throw ExecError(what + ": its segment 0 has not run");
    run = it->second.get();
    if (run->done() != in.seg)
      throw ExecError(what + ": follows the all-reduce seg=" + std::to_string(in.seg - 1) + ", but " + std::to_string(run->done()) +
                      " of its all-reduces have run (a missing or misplaced allreduce " +
                      BufRef{in.op == Op::Forward ? BufKind::Part : BufKind::PartGrad, in.stage, in.mb}.str() + ")");
    stc->active = run;
    run->resume();
  }
  stc->active = nullptr;
  if (run->finished()) {
    std::unique_ptr<SegmentRun> r = std::move(seg_runs.at(key));
    seg_runs.erase(key);
    r->finish();  // the body's own error first
    if (in.seg != n)
      throw ExecError(what + ": the computation ended after " + std::to_string(r->done()) + " tensor-parallel all-reduce(s), but the plan has " +
                      std::to_string(n) + " (segments 0.." + std::to_string(n) + ")");
  } else if (in.seg == n) {
    seg_runs.erase(key);  // aborts it
    throw ExecError(what + ": the last segment issues another tensor-parallel all-reduce (the plan has " + std::to_string(n) + ")");
  }
}

void Worker::Impl::tp_allreduce(const ir::Instr& in) {
  const BufRef& b = *in.buf;
  const ir::Op op = b.kind == BufKind::Part ? Op::Forward : Op::Backward;
  const std::string what = ir::print_op(in);
  auto it = seg_runs.find({(int)op, b.stage, b.mb});
  if (it == seg_runs.end() || !it->second->posted())
    throw ExecError(what + ": no partial sum of " + ir::to_string(op) + " S" + std::to_string(b.stage) + " m" + std::to_string(b.mb) +
                    " waits for it (its segment has not run, or its all-reduce has)");
  SegmentRun& run = *it->second;
  if (run.done() != in.seg)
    throw ExecError(what + ": the partial sum waiting is all-reduce seg=" + std::to_string(run.done()));
  if (!tpc || ir::rank_group(plan, in.group, world_rank) != tpc->group())
    throw ExecError(what + ": group '" + in.group + "' is not this rank's tensor-parallel group");
  at::Tensor& t = run.tensor();
  const auto shape = act_shape();
  if (t.dim() != 3 || t.size(0) != shape[0] || t.size(1) != shape[1] || t.size(2) != shape[2])
    throw ExecError(what + ": the partial sum is not [micro-batch size, seq, hidden]");
  tpc->allreduce_sum(t);  // on this thread and the instruction's stream (the transport orders it with the stream)
  run.complete();
}

// Sums the buffer over the named group (data parallelism: a stage's gradient over its replicas), in place.
void Worker::Impl::allreduce(const ir::Instr& in) {
  if (in.buf && (in.buf->kind == BufKind::Part || in.buf->kind == BufKind::PartGrad)) {
    tp_allreduce(in);
    return;
  }
  if (!tr) throw ExecError("allreduce over group '" + in.group + "' in a plan run without a transport");
  at::Tensor t = need(*in.buf, "allreduce");
  if (in.buckets > 1) {  // a bucket of a stage's gradient: its slice of the flat
    const auto [a, e] = bucket_of(in, stages.at(in.buf->stage), t.numel());
    t = t.narrow(0, a, e - a);
  }
  const std::string group = ir::rank_group(plan, in.group, world_rank);  // tp > 1: this shard's group
  if (!cuda) {
    tr->allreduce_sum(t, group);
    return;
  }
  // NCCL runs it on the transport's collective stream: the buffer must be complete there first (its producer ran on
  // another stream this one waits for), and this stream's later work waits for the sum
  at::cuda::CUDAEvent ready(cudaEventDisableTiming);
  ready.record(*streams[cur_stream]);
  ready.synchronize();
  comm::WorkPtr w = tr->iallreduce_sum(t, group);
  w->wait_on_stream(streams[cur_stream]->stream());
  inflight.push_back(std::move(w));
}

void Worker::Impl::host_allreduce(at::Tensor& t, const std::string& group) {
  if (!tr) throw ExecError("a collective over group '" + group + "' in a plan run without a transport");
  if (!cuda) {
    tr->allreduce_sum(t, group);
    return;
  }
  // NCCL sums device memory: through a device copy, on this thread's stream, complete before NCCL's stream reads it
  c10::cuda::CUDAGuard dg((c10::DeviceIndex)cuda_index);
  at::Tensor d = t.to(dev, /*non_blocking=*/false, /*copy=*/true);
  c10::cuda::getCurrentCUDAStream().synchronize();
  tr->allreduce_sum(d, group);  // blocks until done
  t.copy_(d.cpu());
}

// ZeRO: the updated shards of the stage's host weights, gathered on every replica (a zero-padded sum: the transports
// have no all-gather yet), in pieces of at most gather_chunk elements: the temporary (on the GPU with NCCL, in host
// memory with gloo) stays small whatever the stage's size, and host_lowp is written in place.
void Worker::Impl::allgather(const ir::Instr& in) {
  if (!in.buf || in.buf->kind != BufKind::W) throw ExecError("allgather: only weights (w(S)) are gathered");
  StageState& st = stages.at(in.buf->stage);
  if (!st.sharded) throw ExecError("allgather of " + in.buf->str() + ", whose stage is not sharded (no reduce_scatter of its gradient)");
  if (skip_updates) return;  // nothing was updated
  if (!tr) throw ExecError("allgather over group '" + in.group + "' in a plan run without a transport");
  const int64_t N = st.host_lowp.numel(), hi = st.lo + st.n;
  const std::string group = st.group + ".host";
  std::optional<c10::cuda::CUDAGuard> dg;
  if (cuda) dg.emplace((c10::DeviceIndex)cuda_index);
  for (int64_t a = 0; a < N; a += gather_chunk) {  // the same pieces, in the same order, on every replica
    const int64_t b = std::min(N, a + gather_chunk);
    at::Tensor piece = at::zeros({b - a}, at::TensorOptions().dtype(st.host_lowp.scalar_type()).device(cuda ? dev : at::Device(at::kCPU)));
    const int64_t x = std::max(a, st.lo), y = std::min(b, hi);  // this replica's part of the piece
    if (x < y) piece.narrow(0, x - a, y - x).copy_(st.host_lowp.narrow(0, x, y - x));
    if (cuda) c10::cuda::getCurrentCUDAStream().synchronize();  // complete before NCCL's stream reads it
    tr->allreduce_sum(piece, group);                            // blocks until done
    st.host_lowp.narrow(0, a, b - a).copy_(piece);
  }
}

void Worker::Impl::free_buf(const BufRef& b) {
  if (b.kind == BufKind::Batch) { free_batch(b.mb); return; }
  auto s = sends.find(b);
  if (s != sends.end()) { s->second->wait(); sends.erase(s); }
  take(b);
}

void Worker::Impl::add_grad(const ir::Instr& in) {
  if (in.buf->kind != BufKind::TieGrad || !tied_head(in.buf->stage) || in.stage != 0 || !stages.count(0))
    throw ExecError("addgrad " + in.buf->str() + " -> S" + std::to_string(in.stage) + ": only a tied head's gradient goes into S0");
  const at::Tensor g = take(*in.buf);
  add_tied_embedding_grad(plan.model, stages.at(0).layout, need({BufKind::WGrad, 0, -1}, "addgrad"), g);
}

AdamWHyper Worker::Impl::hyper() const {
  AdamWHyper h;
  h.lr = lr;
  h.beta1 = plan.train.beta1;
  h.beta2 = plan.train.beta2;
  h.eps = plan.train.eps;
  h.weight_decay = plan.train.weight_decay;
  h.moment_form = MomentForm::kLerp;
  return h;
}

void Worker::Impl::maybe_poison(int stage, const std::vector<at::Tensor>& resident) {
  if (!fault || step_index + 1 < fault->first || step_index + 1 > fault->last) return;
  for (auto& [s, st] : stages)
    if ((stage < 0 || s == stage) && !st.resident) st.host_grad.narrow(0, 0, 1).fill_(std::nan(""));
  for (const auto& g : resident) g.narrow(0, 0, 1).fill_(std::nan(""));
}

void Worker::Impl::optim(const ir::Instr& in) {
  StageState& st = stages.at(in.stage);
  const bool on_cpu = in.stream == ir::Stream::Cpu;
  if (on_cpu == st.resident)
    throw ExecError("optim S" + std::to_string(in.stage) + (on_cpu ? " on the cpu for a GPU-resident stage" : " on the GPU for an offloaded stage"));
  if (in.buckets > 1 && (!on_cpu || st.on_tier))
    throw ExecError("optim S" + std::to_string(in.stage) + " in buckets: only an offloaded stage's cpu update (not on the NVMe tier) is bucketed");
  // a bucket of the stage's flat: its part in this replica's shard [x, y) (maybe none); the step's first bucket counts
  // the step
  const bool first_bucket = in.buckets <= 1 || in.bucket == 0;
  int64_t x = st.lo, y = st.lo + st.n;
  if (in.buckets > 1) {
    const auto [a, e] = bucket_of(in, st, st.layout.numel);
    x = std::clamp(a, st.lo, st.lo + st.n), y = std::clamp(e, x, st.lo + st.n);
  }
  at::Tensor grad = on_cpu ? st.host_grad.narrow(0, x - st.lo, y - x) : take({BufKind::WGrad, in.stage, -1});
  // (test faults poison the first element of this rank's gradient: in buckets, with the bucket that holds it)
  const bool holds_first = in.buckets <= 1 || (x == st.lo && y > x);
  if (!has_gradnorm && holds_first) maybe_poison(in.stage, on_cpu ? std::vector<at::Tensor>{} : std::vector<at::Tensor>{grad});
  if (skip_updates) return;  // the global norm is non-finite: no update, the step count stays
  if (writer->active()) {  // a background save of this stage's state must be done before the state changes
    const double w0 = now_us();
    writer->wait_stage(in.stage);
    save_wait_s += (now_us() - w0) * 1e-6;  // one writer of it at a time: the cpu thread or the host thread
  }
  if (first_bucket) st.step += 1;
  if (on_cpu) {
    if (y == x) return;  // a bucket outside this replica's shard
    // without a gradnorm instruction the norm is summed here, per stage (or bucket), before the update (checked at step
    // end) (a sharded stage's shard on every replica; a replicated one once, on replica 0)
    if (!has_gradnorm && (st.sharded || replica == 0)) gsq_host += grad_sq(st, grad, x, y - x, /*host=*/true);
    const int64_t off = x - st.lo;  // in this replica's shard (grad, master, moments alike)
    AdamWBuffers b;
    b.param = st.master.defined() ? st.master.data_ptr<float>() + off : nullptr;
    b.exp_avg = st.exp_avg.defined() ? st.exp_avg.data_ptr<float>() + off : nullptr;
    b.exp_avg_sq = st.exp_avg_sq.defined() ? st.exp_avg_sq.data_ptr<float>() + off : nullptr;
    b.grad = grad.data_ptr();
    b.grad_type = grad_type();
    if (cdtype == at::kBFloat16) { b.out = st.host_lowp.narrow(0, x, y - x).data_ptr(); b.out_type = OutType::kBFloat16; }
    if (st.on_tier) {  // NVMe tier: the state read for this step (tier.cpp); the weights out to their own copy (never sharded)
      float* o = tier_get(in.stage, "optim").data_ptr<float>();
      b.param = o;
      b.exp_avg = o + st.layout.numel;
      b.exp_avg_sq = o + 2 * st.layout.numel;
      if (cdtype == at::kFloat) { b.out = st.host_lowp.data_ptr(); b.out_type = OutType::kFloat32; }
    }
    b.n = y - x;
    adamw_step(b, hyper(), st.step, clip, pool.get());
  } else {
    at::Tensor w = need({BufKind::W, in.stage, -1}, "optim");
    // tensor parallelism: the norm counts only this shard's own elements (its ranges), summed here
    const bool ranged = !has_gradnorm && !st.norm_ranges.empty();
    if (ranged && replica == 0)
      for (const auto& [a, b] : st.norm_ranges) gsq_dev.add_(sum_of_squares_tensor(grad.narrow(0, a, b - a)));
    adamw_step_tensors(st.master, st.exp_avg, st.exp_avg_sq, grad, w, hyper(), st.step, clip, DeviceAdamWKernel::kAuto,
                       has_gradnorm || ranged ? nullptr : &gsq_dev);
  }
}

std::vector<at::Tensor> Worker::Impl::resident_grads() {
  std::vector<at::Tensor> g;
  for (auto& [s, st] : stages)
    if (st.resident) {
      auto it = bufs.find({BufKind::WGrad, s, -1});
      if (it == bufs.end()) throw ExecError("gradnorm: gradient of resident S" + std::to_string(s) + " missing");
      g.push_back(it->second);
    }
  return g;
}

double Worker::Impl::grad_sq(const StageState& st, const at::Tensor& g, int64_t lo, int64_t count, bool host) {
  if (st.norm_ranges.empty()) {  // the whole flat
    if (host) return sum_of_squares(g.data_ptr(), grad_type(), count, pool.get());
    return sum_of_squares_tensor(g).item<double>();
  }
  double s = 0;
  const int64_t esize = host ? (grad_type() == GradType::kBFloat16 ? 2 : 4) : 0;
  for (const auto& [a, b] : st.norm_ranges) {  // the ranges inside [lo, lo + count)
    const int64_t x = std::max(a, lo), y = std::min(b, lo + count);
    if (x >= y) continue;
    if (host) s += sum_of_squares(static_cast<const char*>(g.data_ptr()) + (x - lo) * esize, grad_type(), y - x, pool.get());
    else s += sum_of_squares_tensor(g.narrow(0, x - lo, y - x)).item<double>();
  }
  return s;
}

void Worker::Impl::gradnorm(const std::vector<at::Tensor>& rgrads) {
  maybe_poison(-1, rgrads);
  double local = 0;
  // data-parallel replicas hold the same (summed) gradients: a replicated stage counts once (replica 0), a sharded
  // one by its shards (every replica)
  // one (replicated parameters under tensor parallelism: on tp shard 0 only; grad_sq)
  if (replica == 0) {
    size_t k = 0;
    for (auto& [s, st] : stages)
      if (st.resident && k < rgrads.size()) local += grad_sq(st, rgrads[k++], 0, st.layout.numel, /*host=*/false);
  }
  for (auto& [s, st] : stages)  // offloaded stages: their gradients are on the host
    if (!st.resident && (st.sharded || replica == 0)) local += grad_sq(st, st.host_grad, st.lo, st.n, /*host=*/true);
  // the last stage's loss is complete here: its forwards precede the backwards whose gradients this waited for
  if (stages.count(last) && !std::isfinite(loss_acc.item<double>())) local = std::nan("");
  double total = htr ? htr->allreduce_sum_double(local) : local;
  grad_norm = std::sqrt(total);
  skip_updates = !std::isfinite(total);
  clip = !skip_updates && plan.train.max_grad_norm > 0 ? clip_scale(grad_norm, plan.train.max_grad_norm) : 1.0f;
}

void Worker::Impl::exec(int i) {
  const ir::Instr& in = plan.programs[rank].instrs[i];
  switch (in.op) {
    case Op::LoadBatch: load_batch(in.mb); break;
    case Op::Prefetch: prefetch(*in.buf); break;
    case Op::Forward:
      if (in.seg >= 0) segment(in);
      else forward(in.stage, in.mb);
      break;
    case Op::Backward:
      if (in.seg >= 0) segment(in);
      else backward(in.stage, in.mb);
      break;
    case Op::Send: send(in); break;
    case Op::Recv: recv(in); break;
    case Op::Evict: evict(in); break;
    case Op::Free: free_buf(*in.buf); break;
    case Op::Optim: optim(in); break;
    case Op::GradNorm: gradnorm(resident_grads()); break;
    case Op::AddGrad: add_grad(in); break;
    case Op::TierRead: tier_read(*in.buf); break;
    case Op::TierWrite: tier_write(*in.buf); break;
    case Op::AllReduce: allreduce(in); break;
    case Op::ReduceScatter: allreduce(in); break;  // the whole sum (no reduce-scatter in the transports yet); the
                                                   // stage's evict copies only this replica's shard
    case Op::AllGather: allgather(in); break;
  }
}

bool Worker::Impl::present(const BufRef& b) const {
  switch (b.kind) {
    case BufKind::Batch: return ids.count(b.mb) != 0;
    case BufKind::Stash: return rec.count({b.stage, b.mb}) != 0;
    case BufKind::Part:
    case BufKind::PartGrad:  // the partial sums of a segmented forward/backward: between its first and last segment
      return seg_runs.count({(int)(b.kind == BufKind::Part ? Op::Forward : Op::Backward), b.stage, b.mb}) != 0;
    default: return bufs.count(b) != 0;
  }
}

void Worker::Impl::check_effects(int i, bool after) const {
  const ir::Instr& in = plan.programs[rank].instrs[i];
  if (cuda && in.stream == ir::Stream::Cpu) return;
  for (const auto& e : ir::effects(plan, in)) {
    const bool here = present(e.buf);
    const char* wrong = nullptr;
    switch (e.access) {
      case ir::Access::Require: if (!after && !here) wrong = "requires %s, which is not on the device"; break;
      case ir::Access::Alloc:
        if (!after && here) wrong = "allocates %s, which is already on the device";
        else if (after && !here) wrong = "allocates %s, but the engine has not";
        break;
      case ir::Access::AllocIfAbsent: if (after && !here) wrong = "allocates %s, but the engine has not"; break;
      case ir::Access::Free:
      case ir::Access::FreeIfPresent: if (after && here) wrong = "frees %s, but it is still on the device"; break;
    }
    if (wrong) {
      char buf[256];
      std::snprintf(buf, sizeof buf, wrong, e.buf.str().c_str());
      throw ExecError(std::string("the op table says ") + ir::to_string(in.op) + " " + buf);
    }
  }
}

std::string Worker::Impl::context(int i) const {
  const auto& prog = plan.programs[rank].instrs;
  std::string s;
  for (int j = std::max(0, i - 3); j <= std::min((int)prog.size() - 1, i + 3); ++j)
    s += std::string(j == i ? "  >> " : "     ") + ir::print_instr(prog[j], j) + "\n";
  return s;
}

}  // namespace mmoc::engine
