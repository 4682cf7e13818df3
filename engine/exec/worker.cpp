#include "engine/exec/worker_impl.hpp"
#include "engine/optim/convert.hpp"

namespace mmoc::engine {

bool updates_wait_for_gradnorm(const ir::Plan& plan) {
  for (const auto& prog : plan.programs) {
    int g = -1;
    for (int i = 0; i < (int)prog.instrs.size(); ++i)
      if (prog.instrs[i].op == Op::GradNorm) g = i;
    for (int i = 0; i < (int)prog.instrs.size(); ++i) {
      const auto& in = prog.instrs[i];
      if (in.op != Op::Optim) continue;
      if (g < 0) return false;
      const bool ordered = in.stream == ir::Stream::Cpu ? i > g : std::find(in.after.begin(), in.after.end(), g) != in.after.end();
      if (!ordered) return false;
    }
  }
  return true;
}

Worker::Worker(const ir::Plan& plan, int rank, comm::Transport* transport, const WorkerOptions& opts) : impl_(new Impl) {
  auto& I = *impl_;
  I.plan = plan;
  I.bodies[0] = plan.programs;  // the alternating update order: the odd steps' body (select_body swaps them in)
  I.bodies[1] = plan.odd_programs.empty() ? plan.programs : plan.odd_programs;
  I.rank = rank;
  I.tr = transport;
  I.htr = transport;
  I.opts = opts;
  const int world = ir::world_size(plan);
  if (rank < 0 || rank >= world) throw std::runtime_error("rank " + std::to_string(rank) + " outside the plan's " + std::to_string(world) + " ranks");
  const ir::RankCoord coord = ir::rank_coord(plan, rank);
  I.rank = coord.pipe;
  I.world_rank = rank;
  I.replica = coord.replica;
  I.shard = coord.shard;
  const int tp = std::max(1, plan.tp);
  if (opts.device == "cuda") {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) throw std::runtime_error("--device cuda: no CUDA GPU is visible");
    I.cuda = true;
    I.cuda_index = opts.cuda_device >= 0 ? opts.cuda_device : rank % n;
    if (I.cuda_index >= n)
      throw std::runtime_error("rank " + std::to_string(rank) + " needs CUDA device " + std::to_string(I.cuda_index) + " but only " +
                               std::to_string(n) + " are visible");
    I.dev = at::Device(at::kCUDA, (c10::DeviceIndex)I.cuda_index);
    c10::cuda::set_device((c10::DeviceIndex)I.cuda_index);
    for (int k = 0; k < (int)std::size(I.streams); ++k)
      I.streams[k] = c10::cuda::getStreamFromPool(/*isHighPriority=*/k == 3, (c10::DeviceIndex)I.cuda_index);
    I.cpu = std::make_unique<CpuStream>();
    // the plan's budget is the ceiling of everything this process holds on the GPU (refined by apply_budget() once
    // NCCL is up)
    (void)at::empty({1}, at::TensorOptions().device(I.dev));  // initialises the caching allocator for this device
    const char* ma = std::getenv("MMOC_MAX_AHEAD");
    I.max_ahead = opts.max_ahead >= 0 ? opts.max_ahead : ma ? std::max(0, std::atoi(ma)) : 2;
  } else if (opts.device != "cpu") {
    throw std::runtime_error("unknown device '" + opts.device + "' (cpu or cuda)");
  }
  I.cdtype = plan.train.precision == "bf16" ? at::kBFloat16 : at::kFloat;
  I.last = plan.num_stages() - 1;
  if (const char* gc = std::getenv("MMOC_GATHER_CHUNK")) I.gather_chunk = std::max<int64_t>(1, std::atoll(gc));
  I.rope = make_rope(plan.model, plan.seq_len, I.dev);
  int threads = opts.optim_threads > 0 ? opts.optim_threads
                                       : std::max(1, (int)std::thread::hardware_concurrency() / std::max(1, world));
  std::vector<int> pin;
  if (I.cuda) {  // each rank's optimizer threads on their own cores
    for (int k = 0; k < threads; ++k) pin.push_back(rank * threads + k);
  }
  I.pool = std::make_unique<ThreadPool>(threads, pin);
  if (plan.model.tied_embeddings && plan.num_stages() > 1) {  // tied-embeddings' plumbing (older plans lack it)
    bool adds = false;
    for (const auto& prog : plan.programs)
      for (const auto& in : prog.instrs) adds = adds || in.op == Op::AddGrad;
    if (!adds || !plan.find_buffer(BufKind::Tie, I.last))
      throw std::runtime_error("the plan splits a tied model over " + std::to_string(plan.num_stages()) +
                               " stages but does not carry the tied embedding (tie/tiegrad, addgrad): compile it again");
  }
  // host state: exactly sized, faulted in by all of this rank's cores, page-locked on CUDA where copies need it
  const int fault_threads = std::max(1, (int)std::thread::hardware_concurrency() / std::max(1, world));
  auto host = [&](at::ScalarType t, int64_t n, bool pinned) { return host_tensor(n, t, pinned && I.cuda, I.cuda_index, fault_threads); };
  for (const auto& s : plan.stages) {
    if (s.gpu != coord.pipe) continue;
    StageState st;
    st.id = s.id;
    st.layout = stage_layout(plan.model, s.layer_begin, s.layer_end, coord.shard, tp);  // this rank's tp shard
    if (tp > 1) st.norm_ranges = arch::grad_norm_ranges(st.layout);
    st.resident = s.weights == ir::Residency::Resident;
    if (st.resident != (s.optim == ir::OptimPlace::Gpu))
      throw std::runtime_error("stage S" + std::to_string(s.id) + ": resident weights need the optimizer on the GPU (and offloaded on the CPU)");
    if (st.resident && I.cuda) {
      auto f32 = at::TensorOptions().dtype(at::kFloat).device(I.dev);
      st.master = at::zeros({st.layout.numel}, f32);
      st.exp_avg = at::zeros({st.layout.numel}, f32);
      st.exp_avg_sq = at::zeros({st.layout.numel}, f32);
    } else if (st.resident) {  // the CPU device: "device" memory is host memory
      st.master = host(at::kFloat, st.layout.numel, false);
      st.exp_avg = host(at::kFloat, st.layout.numel, false);
      st.exp_avg_sq = host(at::kFloat, st.layout.numel, false);
    } else if (plan.dp > 1 && [&] {
                 for (const auto& in : plan.programs[coord.pipe].instrs)
                   if (in.op == Op::ReduceScatter && in.buf && in.buf->stage == s.id) return true;
                 return false;
               }()) {
      // ZeRO: this replica's 1/dp of the fp32 master and moments and of the gradient landing zone; the whole stage in
      // compute precision (what prefetches read, gathered after every update)
      const int64_t N = st.layout.numel;
      const auto [lo, hi] = ir::zero_shard(N, coord.replica, plan.dp);  // the split gradient buckets align to
      st.sharded = true;
      st.lo = lo;
      st.n = hi - lo;
      st.group = ir::rank_group(plan, ir::dp_group_name(plan, coord.pipe), rank);  // this tp shard's replicas
      st.host_lowp = host(I.cdtype, N, true);
      st.master = I.cdtype == at::kFloat ? st.host_lowp.narrow(0, st.lo, st.n) : host(at::kFloat, st.n, false);
      st.exp_avg = host(at::kFloat, st.n, false);
      st.exp_avg_sq = host(at::kFloat, st.n, false);
      st.host_grad = host(I.cdtype, st.n, true);
    } else if (const ir::BufferDecl* od = plan.find_buffer(BufKind::Opt, s.id); od && od->home == ir::Tier::Nvme) {
      // NVMe tier: master and moments on the tier (tier.cpp); the compute-dtype copy the prefetches read is its own
      // buffer also in fp32 runs (the optimizer writes it), and the gradient landing zone as usual
      st.on_tier = true;
      st.host_lowp = host(I.cdtype, st.layout.numel, true);
      st.host_grad = host(I.cdtype, st.layout.numel, true);
    } else {
      // fp32 master and moments in host memory; the low-precision copy and the gradient landing zone pinned
      st.master = host(at::kFloat, st.layout.numel, /*pinned=*/I.cdtype == at::kFloat);
      st.exp_avg = host(at::kFloat, st.layout.numel, false);
      st.exp_avg_sq = host(at::kFloat, st.layout.numel, false);
      st.host_lowp = I.cdtype == at::kFloat ? st.master : host(I.cdtype, st.layout.numel, true);
      st.host_grad = host(I.cdtype, st.layout.numel, true);
    }
    if (!st.sharded) st.n = st.layout.numel;
    I.stages[s.id] = std::move(st);
  }
  I.open_tier(opts.nvme);  // NVMe tier: paths, space for every object (errors before training)
  I.loss_acc = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(I.dev));
  I.gsq_dev = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(I.dev));
  ir::Plan mine = plan;  // does this rank's every update wait for the global norm?
  for (int g = 0; g < plan.gpus; ++g)
    if (g != coord.pipe) mine.programs[g].instrs.clear();
  I.has_gradnorm = updates_wait_for_gradnorm(mine);
  I.fault = io::test_fault("nonfinite", rank);
  I.io.cuda_device = I.cuda ? I.cuda_index : -1;
  I.io.rank = rank;
  I.writer = std::make_unique<CheckpointWriter>(plan, I.io);
  apply_budget();
  I.watchdog = std::make_unique<Watchdog>(Watchdog::limit_from_env(), "rank " + std::to_string(rank),
                                          [ip = &I](int i) { return ip->context(i) + ip->gpu_progress(i); });
}

void Worker::set_transports(comm::Transport* p2p, comm::Transport* host) {
  impl_->tr = p2p;
  impl_->htr = host ? host : p2p;
  auto& I = *impl_;
  const ir::Plan& plan = I.plan;
  // the concrete process groups of the names the plan's collectives use (each rank uses its own: ir::rank_group),
  // created by every rank, in the same order
  std::set<std::string> used;
  for (const auto& prog : plan.programs)
    for (const auto& in : prog.instrs)
      if (!in.group.empty() && in.group != "world" && in.group != ir::tp_group_name(plan, prog.gpu))  // tp: below
        for (int r = 0; r < ir::world_size(plan); ++r)
          if (ir::rank_coord(plan, r).pipe == prog.gpu) used.insert(ir::rank_group(plan, in.group, r));
  const auto groups = ir::process_groups(plan);
  if (p2p && !used.empty()) {
    for (const auto& name : used) p2p->create_group(name, groups.at(name));
    // the host-side gathers of the sharded optimizer (cpu thread, checkpoints) on communicators of their own: one
    // issuing thread per communicator, so every replica issues each one's collectives in the same order
    bool zero = false;
    for (const auto& prog : plan.programs)
      for (const auto& in : prog.instrs) zero = zero || in.op == Op::AllGather;
    if (zero)
      for (const auto& name : used) p2p->create_group(name + ".host", groups.at(name));
  }
  // tensor parallelism: every tp group (its forward/backward collectives) and a twin for host-side gathers
  if (plan.tp > 1) {
    if (!p2p) throw std::runtime_error("a tensor-parallel plan (tp=" + std::to_string(plan.tp) + ") needs a transport");
    std::vector<std::string> tps;
    for (const auto& [name, ranks] : groups)
      if (name.rfind("tp.", 0) == 0) tps.push_back(name);
    for (const auto& name : tps) p2p->create_group(name, groups.at(name));
    for (const auto& name : tps) p2p->create_group(name + ".host", groups.at(name));
    const std::string mine = ir::rank_group(plan, ir::tp_group_name(plan, I.rank), I.world_rank);
    I.tpc = std::make_unique<TransportTpComm>(p2p, mine, I.shard, plan.tp, I.cuda, &I.inflight);
    I.stc = std::make_unique<SegmentTpComm>(I.tpc.get());
    I.tp_host_group = mine + ".host";
  }
}
int64_t Worker::apply_budget() {
  auto& I = *impl_;
  if (!I.cuda) return 0;
  c10::cuda::CUDAGuard dg((c10::DeviceIndex)I.cuda_index);
  cudaDeviceSynchronize();
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess || total_b == 0) { cudaGetLastError(); return 0; }
  const auto st = c10::cuda::CUDACachingAllocator::getDeviceStats((c10::DeviceIndex)I.cuda_index);
  // what the GPU has in use that the allocator does not own: the CUDA context, NCCL's buffers, library handles
  // (this process is alone on its GPU, so the device's used memory is ours)
  I.outside_bytes = std::max<int64_t>(0, (int64_t)(total_b - free_b) - st.reserved_bytes[0].current);
  if (I.plan.budget_bytes > 0) {
    const int64_t cap = I.plan.budget_bytes - I.outside_bytes;
    if (cap <= 0)
      throw std::runtime_error("rank " + std::to_string(I.rank) + ": the plan's budget of " + std::to_string(I.plan.budget_bytes >> 20) +
                               " MiB is below what CUDA and NCCL already hold on the GPU (" + std::to_string(I.outside_bytes >> 20) + " MiB)");
    c10::cuda::CUDACachingAllocator::setMemoryFraction(std::min(1.0, double(cap) / double(total_b)), (c10::DeviceIndex)I.cuda_index);
  }
  return I.outside_bytes;
}

void* Worker::p2p_stream() const { return impl_->cuda ? (void*)impl_->streams[3]->stream() : nullptr; }
int Worker::device_index() const { return impl_->cuda_index; }

Worker::~Worker() = default;
int Worker::rank() const { return impl_->rank; }
const std::vector<TraceEvent>& Worker::trace() const { return impl_->trace; }

// The whole-stage fp32 flat to initialise or load into: the master itself, or for a sharded stage a temporary (fp32
// plans: host_lowp, of which the master is a view) that set_from_full() then slices.
static at::Tensor full_target(StageState& st) {
  if (!st.sharded) return st.master;
  if (st.host_lowp.scalar_type() == at::kFloat) return st.host_lowp;
  return at::empty({st.layout.numel}, at::TensorOptions().dtype(at::kFloat));
}
static void set_from_full(StageState& st, const at::Tensor& full) {
  if (!st.sharded || full.data_ptr() == st.host_lowp.data_ptr()) return;
  st.master.copy_(full.narrow(0, st.lo, st.n));
  st.host_lowp.copy_(full);
}

static void refresh_device_copies(Worker::Impl& I) {
  for (auto& [s, st] : I.stages) {
    if (st.on_tier) continue;  // set by fill_tier_stages
    if (st.sharded) {
      // host_lowp is already the whole stage (set_from_full)
    } else if (st.resident) {
      I.bufs.erase({BufKind::W, s, -1});
      I.put({BufKind::W, s, -1}, st.master.to(I.cdtype, false, true));
    } else if (I.cdtype == at::kBFloat16) {  // on the worker's own threads (ATen's may be one in this process)
      const float* src = st.master.data_ptr<float>();
      auto* dst = reinterpret_cast<uint16_t*>(st.host_lowp.data_ptr<at::BFloat16>());
      I.pool->parallel_for(st.master.numel(), int64_t(1) << 20, [&](int64_t b, int64_t e) {
        optim::f32_to_bf16(src + b, dst + b, e - b);  // as torch's copy_, bit for bit (engine/optim/convert.hpp)
      });
    } else if (I.cdtype != at::kFloat) {
      st.host_lowp.copy_(st.master);
    }
  }
}

// NVMe tier: the state of each on_tier stage, one stage at a time in a staging buffer: `fill` sets master (and the
// moments, zeros otherwise) from StageTensors of views into it; then the compute-dtype copy, then the tier.
static void fill_tier_stages(Worker::Impl& I, const std::function<void(StageTensors&)>& fill) {
  I.tier_drop_cache();  // the tier's contents are new: what the alternating order kept in host memory is stale
  for (auto& [s, st] : I.stages) {
    if (!st.on_tier) continue;
    at::Tensor buf = I.tier_new_buffer(s);
    const int64_t n = st.layout.numel;
    StageTensors t{s, st.layout, buf.narrow(0, 0, n), buf.narrow(0, n, n), buf.narrow(0, 2 * n, n), st.step};
    fill(t);
    st.step = t.step;
    st.host_lowp.copy_(t.master);
    I.tier_store(s, buf);
  }
}

LoadReport Worker::init_random(uint64_t seed) {
  auto& I = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  // on the worker's thread pool (this rank's cores): ATen's intra-op pool may be a single thread in a worker process
  const ParallelFor pfor = [&I](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    I.pool->parallel_for(n, grain, fn);
  };
  fill_tier_stages(I, [&](StageTensors& t) { init_weights(I.plan.model, t.layout, t.master, seed, 0.02, pfor); });
  for (auto& [s, st] : I.stages) {
    if (st.on_tier) continue;
    at::Tensor full = full_target(st);
    if (st.layout.tp_size > 1) tp_init_weights(I.plan.model, st.layout, full, seed);  // the slice of the unsharded init
    else init_weights(I.plan.model, st.layout, full, seed, 0.02, pfor);
    set_from_full(st, full);
  }
  refresh_device_copies(I);
  LoadReport r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

LoadReport Worker::load_hf(const std::string& dir) {
  auto& I = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<StageLayout> layouts;
  std::vector<at::Tensor> flats;
  for (auto& [s, st] : I.stages)
    if (!st.on_tier) { layouts.push_back(st.layout); flats.push_back(full_target(st)); }
  IoStats io{};
  if (I.plan.tp > 1) {  // tensor-parallel shards: each rank reads only its slices of the file's tensors
    const auto t1 = std::chrono::steady_clock::now();
    load_hf_weights(dir, I.plan.model, layouts, flats);
    io.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    for (const auto& f : flats) io.bytes += f.numel() * 4;
  } else if (!layouts.empty()) {
    io = load_hf_parallel(dir, I.plan.model, layouts, flats, I.io);
  }
  {
    size_t k = 0;
    for (auto& [s, st] : I.stages)
      if (!st.on_tier) set_from_full(st, flats[k++]);
  }
  fill_tier_stages(I, [&](StageTensors& t) {  // NVMe tier (never sharded: the compiler refuses it with dp or tp > 1)
    std::vector<at::Tensor> f{t.master};
    const IoStats one = load_hf_parallel(dir, I.plan.model, {t.layout}, f, I.io);
    io.bytes += one.bytes;
    io.seconds += one.seconds;
  });
  refresh_device_copies(I);
  LoadReport r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.read_seconds = io.seconds;
  r.bytes = io.bytes;
  return r;
}

LoadReport Worker::load_checkpoint(const std::string& dir) {
  auto& I = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  auto v = I.stage_tensors();
  // sharded stages: the checkpoint holds whole stages (whatever layout wrote it); load them whole, keep the shard
  // (tensor parallelism: the unsharded stage, then this rank's tp shard of it; data parallelism: its ZeRO part)
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (auto& t : v) {
    const StageState& st = I.stages.at(t.id);
    if (st.layout.tp_size > 1) {
      t.layout = stage_layout(I.plan.model, st.layout.layer_begin, st.layout.layer_end);
      t.master = at::empty({t.layout.numel}, f32);
      t.exp_avg = at::empty({t.layout.numel}, f32);
      t.exp_avg_sq = at::empty({t.layout.numel}, f32);
      continue;
    }
    if (!st.sharded) continue;
    t.master = st.host_lowp.scalar_type() == at::kFloat ? st.host_lowp : at::empty({st.layout.numel}, f32);
    t.exp_avg = at::empty({st.layout.numel}, f32);
    t.exp_avg_sq = at::empty({st.layout.numel}, f32);
  }
  IoStats io{};
  if (!v.empty()) io = load_training_state(dir, I.plan, v, I.io);
  for (auto& t : v) {
    StageState& st = I.stages.at(t.id);
    st.step = t.step;
    if (st.layout.tp_size > 1) {  // the tp shard of every state tensor
      t.master = shard_flat(I.plan.model, st.layout, t.master);
      t.exp_avg = shard_flat(I.plan.model, st.layout, t.exp_avg);
      t.exp_avg_sq = shard_flat(I.plan.model, st.layout, t.exp_avg_sq);
      if (!st.sharded) {
        st.master.copy_(t.master);
        st.exp_avg.copy_(t.exp_avg);
        st.exp_avg_sq.copy_(t.exp_avg_sq);
        continue;
      }
      at::Tensor full = full_target(st);
      full.copy_(t.master);
      t.master = full;
    }
    if (!st.sharded) continue;
    set_from_full(st, t.master);
    st.exp_avg.copy_(t.exp_avg.narrow(0, st.lo, st.n));
    st.exp_avg_sq.copy_(t.exp_avg_sq.narrow(0, st.lo, st.n));
  }
  fill_tier_stages(I, [&](StageTensors& t) {  // NVMe tier (never sharded)
    std::vector<StageTensors> one{t};
    const IoStats r = load_training_state(dir, I.plan, one, I.io);
    t.step = one[0].step;
    io.bytes += r.bytes;
    io.seconds += r.seconds;
  });
  refresh_device_copies(I);
  LoadReport r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.read_seconds = io.seconds;
  r.bytes = io.bytes;
  return r;
}

// ---- checkpoints -------------------------------------------------------------------------------
std::vector<StageTensors> Worker::Impl::stage_tensors() {
  std::vector<StageTensors> v;
  for (auto& [s, st] : stages)
    if (!st.on_tier) v.push_back({s, st.layout, st.master, st.exp_avg, st.exp_avg_sq, st.step});  // NVMe tier: apart
  return v;
}

at::Tensor Worker::Impl::tp_full(const StageState& st, const at::Tensor& flat) {
  const int tp = st.layout.tp_size;
  at::Tensor all = at::zeros({tp, st.layout.numel}, at::TensorOptions().dtype(at::kFloat));
  all[shard].copy_(flat);  // a zero-padded sum is a gather
  host_allreduce(all, tp_host_group);
  std::vector<at::Tensor> shards;
  for (int r = 0; r < tp; ++r) shards.push_back(all[r]);
  return assemble_flat(plan.model, st.layout.layer_begin, st.layout.layer_end, shards);
}

at::Tensor Worker::Impl::gather_full(const StageState& st, const at::Tensor& shard) {
  at::Tensor full = at::zeros({st.layout.numel}, at::TensorOptions().dtype(shard.scalar_type()));
  full.narrow(0, st.lo, st.n).copy_(shard);
  host_allreduce(full, st.group + ".host");
  return full;
}

void Worker::begin_save(const std::string& dir, bool bf16_weights, bool background) {
  auto& I = *impl_;
  // in the order this rank's optimizer steps come in its program: the first update waits the least
  std::vector<StageTensors> v = I.stage_tensors();
  // sharded stages: every replica's shards gathered into whole tensors (collective over the stage's replicas; the
  // checkpoint is the same whatever the layout); the previous update of the state must be complete
  for (auto& t : v) {
    StageState& st = I.stages.at(t.id);
    if (!st.sharded && st.layout.tp_size == 1) continue;
    auto it = I.pending_optim.find(t.id);
    if (it != I.pending_optim.end()) it->second.get();
    if (st.sharded) {
      t.master = I.gather_full(st, st.master);
      t.exp_avg = I.gather_full(st, st.exp_avg);
      t.exp_avg_sq = I.gather_full(st, st.exp_avg_sq);
    }
    if (st.layout.tp_size > 1) {  // every tp shard's part: the unsharded stage, in HF layout whatever the tp
      t.master = I.tp_full(st, t.master);
      t.exp_avg = I.tp_full(st, t.exp_avg);
      t.exp_avg_sq = I.tp_full(st, t.exp_avg_sq);
      t.layout = stage_layout(I.plan.model, st.layout.layer_begin, st.layout.layer_end);
    }
  }
  // data-parallel replicas hold the same state (replica 0 writes it), tensor-parallel shards their gathered stage
  // (shard 0 writes it)
  if (I.replica != 0 || I.shard != 0) v.clear();
  const auto& prog = I.plan.programs[I.rank].instrs;
  auto first_optim = [&](int stage) {
    for (int i = 0; i < (int)prog.size(); ++i)
      if (prog[i].op == Op::Optim && prog[i].stage == stage) return i;
    return (int)prog.size();
  };
  std::stable_sort(v.begin(), v.end(), [&](const StageTensors& a, const StageTensors& b) { return first_optim(a.id) < first_optim(b.id); });
  I.save_wait_s = 0;
  // NVMe tier: each on_tier stage read back and written now, one at a time (the checkpoint stays complete; its host
  // memory is one stage's state); the host stages then as asked
  I.tier_save = IoStats{};
  for (auto& [s, st] : I.stages) {
    if (!st.on_tier) continue;
    at::Tensor buf = I.tier_fetch(s);
    const int64_t n = st.layout.numel;
    I.writer->start(dir, {{s, st.layout, buf.narrow(0, 0, n), buf.narrow(0, n, n), buf.narrow(0, 2 * n, n), st.step}},
                    bf16_weights ? at::kBFloat16 : at::kFloat, false);
    const IoStats one = I.writer->wait();
    I.tier_save.bytes += one.bytes;
    I.tier_save.seconds += one.seconds;
  }
  if (!v.empty()) I.writer->start(dir, std::move(v), bf16_weights ? at::kBFloat16 : at::kFloat, background);
}

bool Worker::save_active() const { return impl_->writer->active(); }

SaveReport Worker::finish_save() {
  auto& I = *impl_;
  SaveReport r;
  IoStats io{};
  if (I.writer->active()) io = I.writer->wait();
  r.bytes = io.bytes + I.tier_save.bytes;
  r.seconds = io.seconds + I.tier_save.seconds;
  I.tier_save = IoStats{};
  r.optimizer_wait_s = I.save_wait_s;
  return r;
}

int64_t Worker::save_host_bytes() const { return save_staging_bytes(impl_->io); }

}  // namespace mmoc::engine
