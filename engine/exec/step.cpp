// The step loop of a worker (Worker::step), for both devices.
#include "engine/exec/worker_impl.hpp"

namespace mmoc::engine {

// ---- the step -----------------------------------------------------------------------------------
// One loop for both devices: on the CPU every instruction runs on the calling thread in program order; on CUDA,
// gpu-stream instructions are issued to their stream after their cross-stream events, cpu-stream ones are queued on
// the cpu thread (which waits for their events and futures itself).

void Worker::Impl::begin_step(const data::StepBatch& b, int64_t step_index) {
  // the global batch: replica d runs its micro-batches d*M .. d*M+M-1 (M = plan.microbatches, per replica)
  if ((int)b.input_ids.size() != plan.microbatches * plan.dp || b.micro_batch_size != plan.micro_batch_size || b.seq_len != plan.seq_len)
    throw std::runtime_error("batch shape does not match the plan (microbatches x dp, micro-batch size, sequence length)");
  batch = &b;
  count = 0;
  for (const auto& lab : b.labels) {
    const int64_t T = b.seq_len;
    for (size_t r = 0; r < lab.size() / T; ++r)
      for (int64_t t = 1; t < T; ++t) count += lab[r * T + t] != data::kIgnoreIndex;
  }
  if (count == 0) throw std::runtime_error("step " + std::to_string(step_index) + ": no token in the batch counts towards the loss (all labels are -100)");
  loss_sum = 0;
  clip = 1.0f;
  grad_norm = -1;
  this->step_index = step_index;
  skip_updates = false;
  gsq_host = 0;
  tier_read_bytes = tier_write_bytes = 0;
  tier_read_s = tier_write_s = 0;
  auto sched = parse_lr_schedule(plan.train.lr_schedule);
  lr = lr_at(plan.train.lr, sched ? *sched : LrSchedule::kConstant, plan.train.warmup_steps, std::max<int64_t>(plan.train.total_steps, 1),
             step_index);
  peak_bytes = cur_bytes;
  const auto& prog = plan.programs[rank].instrs;
  {
    const int64_t M = plan.microbatches, n = (int64_t)b.micro_batch_size * b.seq_len;
    auto o = at::TensorOptions().dtype(at::kLong).pinned_memory(cuda);
    pinned_ids = at::empty({M, n}, o);
    pinned_labels = at::empty({M, n}, o);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t gm = (int64_t)replica * M + m;
      std::memcpy(pinned_ids[m].data_ptr<int64_t>(), b.input_ids[gm].data(), n * 8);
      std::memcpy(pinned_labels[m].data_ptr<int64_t>(), b.labels[gm].data(), n * 8);
    }
  }
  if (!cuda) {
    loss_acc.zero_();
    gsq_dev.zero_();
    return;
  }
  c10::cuda::CUDACachingAllocator::resetPeakStats((c10::DeviceIndex)cuda_index);
  alloc_retries_at_start = c10::cuda::CUDACachingAllocator::getDeviceStats((c10::DeviceIndex)cuda_index).num_alloc_retries;
  {
    c10::cuda::CUDAStreamGuard g(*streams[0]);
    loss_acc.zero_();
    gsq_dev.zero_();
  }
  {
    std::lock_guard<std::mutex> g(ev_mu);
    ev.clear();
    ev.resize(prog.size());
  }
  comp_ahead.clear();
  fut.assign(prog.size(), {});
  if (opts.trace) {
    t0_event.emplace(cudaEventDefault);
    t0_event->record(*streams[0]);
    t0_event->synchronize();
    t0_host_us = now_us();
  }
  ev_start.clear();
  ev_start.resize(opts.trace ? prog.size() : 0);
  cpu_times.assign(prog.size(), {0, 0});
}

void Worker::Impl::issue(int i) {
  const auto& prog = plan.programs[rank].instrs;
  const auto& in = prog[i];
  if (!cuda) {  // every stream is this thread
    watchdog->at(i);
    const double ts = opts.trace ? now_us() : 0;
    check_effects(i, false);
    exec(i);
    check_effects(i, true);
    if (opts.trace) trace.push_back({i, (int)in.stream, ts, now_us() - ts, in.buf ? plan.buffer_bytes(*in.buf) : 0});
    return;
  }
  if (in.stream == ir::Stream::Cpu || in.stream == ir::Stream::Io) {  // host threads: cpu (optimizer), io (NVMe tier)
    std::vector<at::cuda::CUDAEvent*> evs;
    std::vector<std::shared_future<void>> fs;
    for (int a : in.after) {
      if (prog[a].stream == ir::Stream::Cpu || prog[a].stream == ir::Stream::Io) fs.push_back(fut[a]);
      else if (ev[a]) evs.push_back(&*ev[a]);
    }
    std::vector<at::Tensor> rg;
    if (in.op == Op::GradNorm) rg = resident_grads();
    Impl* ip = this;
    const bool tr = opts.trace;
    fut[i] = (in.stream == ir::Stream::Io ? io_thread : cpu)->submit([ip, i, evs, fs, rg, tr] {
      c10::cuda::CUDAGuard dg((c10::DeviceIndex)ip->cuda_index);
      for (auto* e : evs) e->synchronize();
      for (const auto& f : fs) f.get();
      double ts = tr ? now_us() : 0;
      if (ip->plan.programs[ip->rank].instrs[i].op == Op::GradNorm) ip->gradnorm(rg);
      else ip->exec(i);
      if (tr) ip->cpu_times[i] = {ts, now_us() - ts};
    });
    if (in.op == Op::Optim) pending_optim[in.stage] = fut[i];
    if (in.op == Op::AllGather && in.buf) pending_optim[in.buf->stage] = fut[i];  // prefetches read the gathered copy
    return;
  }
  const int sidx = cuda_slot(in.stream);
  auto& stream = *streams[sidx];
  watchdog->at(i);
  // bounded run-ahead: the host issues (and allocates for) at most max_ahead compute instructions ahead of the
  // GPU, so the allocator's live set follows the plan's timeline instead of the whole step being queued at once
  while (max_ahead > 0 && (int)comp_ahead.size() > max_ahead) {
    ev[comp_ahead.front()]->synchronize();
    comp_ahead.pop_front();
  }
  for (int a : in.after) {
    if (prog[a].stream == ir::Stream::Cpu || prog[a].stream == ir::Stream::Io) fut[a].get();
    else if (prog[a].stream != in.stream && ev[a]) ev[a]->block(stream);
  }
  c10::cuda::CUDAStreamGuard g(stream);
  if (opts.trace) {
    ev_start[i].emplace(cudaEventDefault);
    ev_start[i]->record(stream);
  }
  cur_stream = sidx;
  watchdog->at(i);
  check_effects(i, false);
  exec(i);
  check_effects(i, true);
  ev[i].emplace(opts.trace ? cudaEventDefault : cudaEventDisableTiming);
  ev[i]->record(stream);
  if (in.stream == ir::Stream::Comp) comp_ahead.push_back(i);
}

// The alternating update order (plan.odd_programs): the step's body by its parity, and the opt(S) that body expects in
// host memory (after init, a load or a resume they are read now: tier_carry_in).
void Worker::Impl::select_body(int64_t step_index) {
  if (plan.odd_programs.empty()) return;
  const int parity = (int)(step_index % 2);
  plan.programs = bodies[parity];
}

// The step ends when every stream and the cpu thread have finished and every send has been delivered.
void Worker::Impl::finish_step() {
  const auto& prog = plan.programs[rank].instrs;
  watchdog->at((int)prog.size() - 1);
  if (!cuda) {
    for (auto& [b, w] : sends) w->wait();
    sends.clear();
    loss_sum = loss_acc.item<double>();
    return;
  }
  for (int i = 0; i < (int)prog.size(); ++i)
    if (prog[i].stream == ir::Stream::Cpu || prog[i].stream == ir::Stream::Io) guarded(i, [&] { fut[i].get(); });
  for (int k = 0; k < kCudaStreams; ++k) streams[k]->synchronize();
  for (auto& w : inflight) w->wait();
  inflight.clear();
  pending_optim.clear();
  loss_sum = loss_acc.item<double>();
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats((c10::DeviceIndex)cuda_index);
  peak_bytes = stats.reserved_bytes[0].peak;
  peak_alloc = stats.allocated_bytes[0].peak;
  alloc_retries_step = stats.num_alloc_retries - alloc_retries_at_start;
  if (opts.trace) {
    for (int i = 0; i < (int)prog.size(); ++i) {
      const auto& in = prog[i];
      int64_t bytes = in.buf ? plan.buffer_bytes(*in.buf) : 0;
      if (in.stream == ir::Stream::Cpu || in.stream == ir::Stream::Io) {
        trace.push_back({i, (int)in.stream, cpu_times[i].first, cpu_times[i].second, bytes});
      } else if (ev_start[i] && ev[i]) {
        double s0 = t0_event->elapsed_time(*ev_start[i]) * 1000.0, s1 = t0_event->elapsed_time(*ev[i]) * 1000.0;
        trace.push_back({i, (int)in.stream, t0_host_us + s0, s1 - s0, bytes});
      }
    }
  }
}

// Everything transient must be gone at the end of a step: a leak is a plan/engine disagreement. What may stay is
// what the op table's buffer kinds call persistent on this GPU (resident weights).
void Worker::Impl::check_no_leak() const {
  for (const auto& [b, t] : bufs) {
    const bool persistent = ir::is_persistent(plan, b) && b.stage >= 0 && b.stage < plan.num_stages() && plan.stages[b.stage].gpu == rank;
    if (!persistent) throw std::runtime_error("rank " + std::to_string(world_rank) + ": " + b.str() + " still on the device at the end of the step");
  }
  // the alternating update order: the opt(S) the next step's body expects in host memory stay (carry), nothing else
  const std::vector<int>& keep = ir::carry_in(plan, (int)((step_index + 1) % 2));
  for (const auto& [s, buf] : tier_staged)
    if (std::find(keep.begin(), keep.end(), s) == keep.end())
      throw std::runtime_error("rank " + std::to_string(world_rank) + ": opt(S" + std::to_string(s) + ") read from nvme and not written back at the end of the step");
  for (int s : keep)
    if (stages.count(s) && !tier_staged.count(s))
      throw std::runtime_error("rank " + std::to_string(world_rank) + ": opt(S" + std::to_string(s) + ") should stay in host memory for the next step and is not there");
  if (!seg_runs.empty()) throw std::runtime_error("rank " + std::to_string(world_rank) + ": a tensor-parallel forward/backward left in the middle of its segments at the end of the step");
  if (!rec.empty() || !ids.empty()) throw std::runtime_error("rank " + std::to_string(world_rank) + ": forward records or batches left at the end of the step");
}

StepResult Worker::step(const data::StepBatch& batch, int64_t step_index) {
  auto& I = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  std::optional<c10::cuda::CUDAGuard> dg;
  if (I.cuda) dg.emplace((c10::DeviceIndex)I.cuda_index);
  I.select_body(step_index);  // the body first: begin_step sizes the step's books by it
  I.begin_step(batch, step_index);
  if (!I.plan.odd_programs.empty()) I.tier_carry_in((int)(step_index % 2));  // after begin_step: its reads count in this step
  const int n = (int)I.plan.programs[I.rank].instrs.size();
  for (int i = 0; i < n; ++i) I.guarded(i, [&] { I.issue(i); });
  I.finish_step();
  I.watchdog->at(-1);
  I.check_no_leak();
  StepResult r;
  double total = I.htr ? I.htr->allreduce_sum_double(I.loss_sum) : I.loss_sum;
  if (!I.has_gradnorm) {  // the norm of the gradients the optimizer steps used, summed over stages and ranks
    const double local = I.gsq_host + (I.replica == 0 ? I.gsq_dev.item<double>() : 0.0);  // replicas: counted once
    I.grad_norm = std::sqrt(I.htr ? I.htr->allreduce_sum_double(local) : local);
  }
  // both sums are over all ranks, so every rank reaches the same verdict
  r.finite = std::isfinite(total) && std::isfinite(I.grad_norm);
  r.skipped = I.skip_updates;
  r.loss = total / double(I.count);
  r.tokens = I.count;
  r.grad_norm = I.grad_norm;
  r.peak_bytes = I.peak_bytes;
  r.peak_allocated = I.cuda ? I.peak_alloc : I.peak_bytes;
  r.outside_bytes = I.outside_bytes;
  r.alloc_retries = I.cuda ? I.alloc_retries_step : 0;
  r.lr = I.lr;
  r.tier_read_bytes = I.tier_read_bytes;
  r.tier_write_bytes = I.tier_write_bytes;
  r.tier_read_s = I.tier_read_s;
  r.tier_write_s = I.tier_write_s;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace mmoc::engine
