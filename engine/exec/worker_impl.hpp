// Internal to engine/exec: the state of one worker (Worker::Impl), shared by worker.cpp (set-up, weights,
// checkpoints), handlers.cpp (one handler per op, the op-table check) and step.cpp (the step loop).
#pragma once
#include "engine/exec/worker.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <tuple>

#include "engine/comm/transport.hpp"
#include "engine/exec/cpu_stream.hpp"
#include "engine/exec/device_adamw.hpp"
#include "engine/exec/host_memory.hpp"
#include "engine/exec/tp_comm.hpp"
#include "engine/exec/tp_segments.hpp"
#include "engine/io/test_fault.hpp"
#include "engine/data/data.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "engine/model/train_checkpoint.hpp"
#include "engine/optim/adamw.hpp"
#include "engine/optim/lr_schedule.hpp"
#include "engine/optim/thread_pool.hpp"
#include "engine/tier/store.hpp"
#include "ir/ops.hpp"

namespace mmoc::engine {

using ir::BufKind;
using ir::BufRef;
using ir::Op;
using namespace mmoc::engine::optim;

struct ExecError : std::runtime_error {  // an instruction cannot run as the plan says
  using std::runtime_error::runtime_error;
};

struct StageState {
  int id = 0;
  StageLayout layout;
  bool resident = false;
  at::Tensor master, exp_avg, exp_avg_sq;  // fp32: host (offloaded) or device (resident)
  at::Tensor host_lowp;                    // compute-dtype host copy that prefetches read (== master for fp32)
  at::Tensor host_grad;                    // compute-dtype host buffer that gradients land in
  int64_t step = 0;
  // ZeRO (offloaded stage of a dp plan with reduce_scatter/allgather): this replica owns elements [lo, lo+n) of the
  // stage's flat; master, exp_avg, exp_avg_sq and host_grad hold only those, host_lowp the whole stage (prefetched).
  bool sharded = false;
  int64_t lo = 0, n = 0;  // not sharded: 0, layout.numel
  std::string group;      // the data-parallel group the shards are spread over
  // Tensor parallelism (tp > 1): layout is this rank's tp shard of the stage; the gradient norm counts the elements of
  // norm_ranges (arch::grad_norm_ranges: replicated parameters on tp rank 0 only). Empty: the whole flat.
  std::vector<std::pair<int64_t, int64_t>> norm_ranges;
  bool on_tier = false;  // opt(S) on the NVMe tier: master and moments undefined outside read..write (host_lowp separate)
};

struct FwdRecord {
  at::Tensor input;                  // stage input (ids for stage 0)
  at::Tensor w_leaf, in_leaf, out;   // autograd graph of the layers that keep their stash (in_leaf: their input)
  at::Tensor loss;                   // last stage: loss sum (graph)
  at::Tensor tie_leaf;               // tied head over stages: the embedding matrix tie(S) (graph)
  c10::intrusive_ptr<FlatGradTarget> target;  // where that graph's weight gradient is added (the stage's wgrad)
};

struct Worker::Impl {
  ir::Plan plan;
  int rank = 0;        // the program this process runs: its pipeline rank (plan.programs[rank], stages[s].gpu)
  int world_rank = 0;  // its rank in the job (ir::rank_coord: pipeline rank, data-parallel replica, tp shard)
  int replica = 0;     // its data-parallel replica: runs the replica's micro-batches, peers in the same replica
  int shard = 0;       // its tensor-parallel shard (of plan.tp): holds that shard of its stages, peers of the same shard
  std::unique_ptr<TransportTpComm> tpc;  // tp > 1: the collectives of its tp group (forward and backward)
  std::unique_ptr<SegmentTpComm> stc;    // tp > 1: tpc as the model code calls it (planned all-reduces to segments)
  std::string tp_host_group;             // tp > 1: the same ranks, for host-side gathers (checkpoints)
  comm::Transport* tr = nullptr;   // send/recv
  comm::Transport* htr = nullptr;  // host collectives
  bool cuda = false;
  int cuda_index = -1;
  // the CUDA streams, by slot: the plan's GPU streams (cpu and io are host threads and have no slot: -1)
  static constexpr ir::Stream kSlotStream[] = {ir::Stream::Comp, ir::Stream::H2D, ir::Stream::D2H, ir::Stream::P2P, ir::Stream::Opt};
  static constexpr int kCudaStreams = (int)std::size(kSlotStream);
  std::optional<c10::cuda::CUDAStream> streams[kCudaStreams];
  static int cuda_slot(ir::Stream s) {
    for (int k = 0; k < kCudaStreams; ++k)
      if (kSlotStream[k] == s) return k;
    return -1;
  }
  std::unique_ptr<CpuStream> cpu;
  std::vector<std::optional<at::cuda::CUDAEvent>> ev;  // per instruction (GPU streams)
  std::vector<std::shared_future<void>> fut;           // per instruction (cpu stream)
  std::vector<comm::WorkPtr> inflight;                 // NCCL works of this step
  std::map<BufRef, std::set<int>> users;               // streams that touched a buffer (record_stream on drop)
  int cur_stream = 0;
  at::Tensor loss_acc;
  at::Tensor pinned_ids, pinned_labels;                // the step's batch, pinned
  std::optional<at::cuda::CUDAEvent> t0_event;
  double t0_host_us = 0;
  std::vector<std::pair<double, double>> cpu_times;
  std::unique_ptr<Watchdog> watchdog;  // where the host thread is, printed when it stalls
  // Per GPU stream: the last instruction up to `upto` whose completion event has fired, and the first that has not.
  std::string gpu_progress(int upto) {
    if (!cuda) return "";
    std::lock_guard<std::mutex> g(ev_mu);
    const auto& prog = plan.programs[rank].instrs;
    std::string s;
    for (int k = 0; k < kCudaStreams; ++k) {
      int done = -1, pending = -1;
      for (int j = 0; j <= upto && j < (int)ev.size() && j < (int)prog.size(); ++j) {
        if (cuda_slot(prog[j].stream) != k || !ev[j]) continue;
        if (ev[j]->query()) done = j;
        else if (pending < 0) pending = j;
      }
      s += std::string("  gpu stream ") + ir::to_string(kSlotStream[k]) + ": last done " + (done >= 0 ? ir::print_instr(prog[done], done) : std::string("none")) +
           "; first pending " + (pending >= 0 ? ir::print_instr(prog[pending], pending) : std::string("none")) + "\n";
    }
    return s;
  }
  WorkerOptions opts;
  int max_ahead = 2;          // CUDA: compute instructions issued ahead of the GPU
  int64_t outside_bytes = 0;  // CUDA: device bytes outside the caching allocator (context, NCCL)
  std::mutex ev_mu;           // guards ev against the watchdog while a step (re)sizes it
  at::Device dev{at::kCPU};
  at::ScalarType cdtype = at::kFloat;
  std::map<int, StageState> stages;  // local stages
  Rope rope;
  std::unique_ptr<ThreadPool> pool;
  int last = 0;

  // step state
  std::map<BufRef, at::Tensor> bufs;       // what the plan says is on the GPU
  std::map<std::pair<int, int>, FwdRecord> rec;  // stash(s,m)
  std::map<BufRef, comm::WorkPtr> sends;   // in-flight sends (their buffer stays alive)
  std::map<int, std::shared_future<void>> pending_optim;  // CUDA: stage -> its last CPU update
  std::map<int, at::Tensor> ids, labels;   // batch(m)
  const data::StepBatch* batch = nullptr;
  int64_t count = 0;
  double loss_sum = 0;
  float clip = 1.0f;
  double grad_norm = -1;
  double lr = 0;
  int64_t step_index = 0;
  // non-finite steps
  bool has_gradnorm = false;   // this rank's optimizer steps wait for gradnorm: the global norm is known before any update
  bool skip_updates = false;   // this step's global norm (or loss) is non-finite: no optimizer step updates anything
  // ZeRO allgather: elements per piece of its temporary (16 Mi: 32 MiB in bf16; MMOC_GATHER_CHUNK overrides, tests)
  int64_t gather_chunk = int64_t(1) << 24;
  double gsq_host = 0;         // no gradnorm: sum of squares of the gradients updated on the host (cpu stream)
  at::Tensor gsq_dev;          // ... and of those updated on the device (0-dim fp64)
  const io::TestFault* fault = nullptr;  // MMOC_TEST_FAULT=nonfinite:<this rank>:...
  // checkpoints
  IoOptions io;
  std::unique_ptr<CheckpointWriter> writer;
  double save_wait_s = 0;  // time optimizer steps waited for a background save
  IoStats tier_save{};     // NVMe tier stages of the save in progress (written in begin_save)
  int64_t cur_bytes = 0, peak_bytes = 0, peak_alloc = 0;
  int64_t alloc_retries_at_start = 0, alloc_retries_step = 0;  // the caching allocator's num_alloc_retries: at the step's start, in it
  std::vector<TraceEvent> trace;

  int64_t bytes_of(const at::Tensor& t) const { return t.defined() ? (int64_t)t.numel() * (int64_t)t.element_size() : 0; }
  void put(BufRef b, at::Tensor t) {
    cur_bytes += bytes_of(t);
    peak_bytes = std::max(peak_bytes, cur_bytes);
    if (cuda) users[b].insert(cur_stream);
    bufs[b] = std::move(t);
  }
  at::Tensor take(BufRef b) {
    auto it = bufs.find(b);
    if (it == bufs.end()) throw ExecError(b.str() + " is not on the device");
    at::Tensor t = std::move(it->second);
    bufs.erase(it);
    cur_bytes -= bytes_of(t);
    if (cuda) {
      // the caching allocator only knows the allocating stream: tell it every stream that used the buffer, so its
      // memory is not reused before their queued work has passed
      auto& used_by = users[b];
      used_by.insert(cur_stream);
      if (t.defined() && t.is_cuda())
        for (int sidx : used_by) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), *streams[sidx]);
      users.erase(b);
    }
    return t;
  }
  const at::Tensor& need(BufRef b, const char* why) {
    auto it = bufs.find(b);
    if (it == bufs.end()) throw ExecError(std::string(why) + ": " + b.str() + " is not on the device");
    if (cuda) users[b].insert(cur_stream);
    return it->second;
  }

  std::vector<int64_t> act_shape() const {
    return {plan.micro_batch_size, plan.seq_len, plan.model.hidden};
  }

  at::Tensor stage_weights(int s) { return need({BufKind::W, s, -1}, "weights not resident"); }

  // ---- handlers (handlers.cpp) --------------------------------------------------------------------
  void load_batch(int m);
  void free_batch(int m);
  const at::Tensor& batch_ids(int m, const char* why);
  const at::Tensor& batch_labels(int m);
  // Model layers [from, to) of a local stage (stage_forward_layers; tp > 1: tp_stage_forward_layers over this rank's
  // tp group); target: where the weight gradient goes; tie: the embedding matrix (this shard's rows under tp) for a
  // tied head on a stage without the embedding (tie(S)), when [from, to) ends with the head.
  // selective: the plan's Stage::selective for layers that keep their stash (tp 1 only: verify_structure).
  // output_unused: only the gradient through the output is wanted (recompute inside backward; stage_forward_layers).
  at::Tensor run_layers(const StageState& st, const at::Tensor& w, const at::Tensor& in, int from, int to,
                        c10::intrusive_ptr<FlatGradTarget> target = {}, const at::Tensor& tie = at::Tensor(),
                        bool selective = false, bool output_unused = false) {
    if (stc) return tp_stage_forward_layers(plan.model, st.layout, w, in, rope, *stc, from, to, tie, false, std::move(target));
    return stage_forward_layers(plan.model, st.layout, w, in, rope, from, to, tie, false, std::move(target), selective,
                                output_unused);
  }
  // The summed loss of the head's output (tp > 1: vocabulary-parallel, the same value on every shard).
  at::Tensor loss_of(const at::Tensor& out, const at::Tensor& labels) {
    if (stc) return tp_lm_loss_sum(out, labels, plan.model.vocab, *stc);
    return lm_loss_sum(out, labels);
  }
  // Sum of squares of a stage's gradient for the global norm: `g` holds the stage's flat elements [lo, lo + count)
  // (a device tensor, or host memory of grad_type()); only norm_ranges count under tensor parallelism.
  double grad_sq(const StageState& st, const at::Tensor& g, int64_t lo, int64_t count, bool host);
  // A tied lm_head on a stage without the embedding: tie(S<last>) is the matrix, tiegrad(S<last>) its gradient.
  bool tied_head(int s) const { return plan.model.tied_embeddings && s == last && last > 0; }
  void add_grad(const ir::Instr& in);

  void forward(int s, int m);
  void backward(int s, int m);
  // A tensor-parallel segment (in.seg >= 0) of forward/backward S m, and the all-reduce of its partial sum
  // (tp_segments.hpp); allreduce() hands part/partgrad buffers to tp_allreduce.
  void segment(const ir::Instr& in);
  void tp_allreduce(const ir::Instr& in);
  void prefetch(const BufRef& b);
  void evict(const ir::Instr& in);
  std::pair<int64_t, int64_t> bucket_of(const ir::Instr& in, const StageState& st, int64_t numel) const;
  void send(const ir::Instr& in);
  void recv(const ir::Instr& in);
  void free_buf(const BufRef& b);
  void allreduce(const ir::Instr& in);
  void allgather(const ir::Instr& in);
  // Sums `t` (host or device memory) over the group on the host thread that calls it; on CUDA staged through the
  // device (NCCL). Used by the sharded optimizer's gathers (a zero-padded sum is a gather).
  void host_allreduce(at::Tensor& t, const std::string& group);
  // The whole fp32 flat of a sharded state tensor (master or a moment): every replica's shard gathered (collective).
  at::Tensor gather_full(const StageState& st, const at::Tensor& shard);
  int peer_rank(int pipe) const { return ir::world_rank(plan, pipe, replica, shard); }  // a pipeline peer (replica, shard)
  // The unsharded flat of a stage from every tp shard's `flat` (host fp32 result; collective over the tp group).
  at::Tensor tp_full(const StageState& st, const at::Tensor& flat);
  AdamWHyper hyper() const;

  // Test-only fault injection (engine/io/test_fault.hpp: nonfinite): poisons this rank's gradients of `stage` (all
  // local stages for -1) with a NaN at the fault's steps, as a diverged backward would.
  void maybe_poison(int stage, const std::vector<at::Tensor>& resident);
  GradType grad_type() const { return cdtype == at::kBFloat16 ? GradType::kBFloat16 : GradType::kFloat32; }

  void optim(const ir::Instr& in);
  std::vector<at::Tensor> resident_grads();
  // The global gradient norm, before any optimizer step of the step. A non-finite norm (or loss) on any rank makes
  // every rank skip its updates: the sum over ranks is then non-finite everywhere.
  void gradnorm(const std::vector<at::Tensor>& rgrads);
  void exec(int i);
  std::vector<StageTensors> stage_tensors();  // worker.cpp

  // ---- NVMe tier (tier.cpp, docs/nvme-tier.md) ------------------------------------------------------
  // opt(S) of on_tier stages is one object per stage on the store: [master | exp_avg | exp_avg_sq], fp32. Between
  // `read opt(S) <- nvme` and `write opt(S) -> nvme` it is in host memory (tier_staged), in a page-aligned
  // host_tensor that goes straight to the disk (O_DIRECT).
  std::unique_ptr<tier::TierStore> tier;
  std::mutex tier_mu;                    // tier_staged (the io and cpu threads)
  std::map<int, at::Tensor> tier_staged;
  // Staging buffers a `write` gave back, for the next `read` (each holds the largest local stage's state): a read
  // into a fresh mapping faulted in and zeroed its pages inside the read (on the io thread, between requests), and
  // the unmap after each write freed them again. Steady state: as many as the plan stages at once (two).
  std::vector<at::Tensor> tier_pool;
  int64_t tier_buffer_numel = 0;         // the largest local on_tier stage's 3 x numel (open_tier)
  std::unique_ptr<CpuStream> io_thread;  // CUDA: the io stream's thread (reads and writes wait there); joined first
  int64_t tier_read_bytes = 0, tier_write_bytes = 0;  // this step
  double tier_read_s = 0, tier_write_s = 0;           // this step: time the io ops took (submit to done)
  void open_tier(const std::vector<std::string>& paths_override);  // constructor: store, space; throws before training
  at::Tensor tier_new_buffer(int stage) const;       // zeros, page-aligned
  at::Tensor tier_get(int stage, const char* why);   // the staged buffer (throws when absent)
  void tier_read(const BufRef& b);
  void tier_stage_in(int stage);                     // tier_read's and tier_carry_in's read into staging
  void tier_write(const BufRef& b);
  // Alternating update order (plan.odd_programs, docs/nvme-tier.md): both bodies; plan.programs is the running
  // step's. tier_staged then also holds, between steps, the opt(S) the next step's body expects in host memory
  // (plan.carry_even / carry_odd): tier_carry_in reads what is missing (after init, a load or a resume) and checks
  // that nothing else is there; tier_drop_cache forgets the cache when the tier's contents are rewritten.
  std::vector<ir::Program> bodies[2];
  void select_body(int64_t step_index);              // step.cpp
  void tier_carry_in(int parity);                    // tier.cpp
  void tier_drop_cache();
  // Whole-state access outside steps (init, load, checkpoints): one stage at a time (a stage held in host memory
  // across steps by the alternating order: its staged buffer, which is newer than the tier's copy).
  at::Tensor tier_fetch(int stage);                  // a buffer with the stage's state
  void tier_store(int stage, const at::Tensor& buf); // writes it (waits)

  // Is `b` on the device as the engine keeps its books? (batch(m) and stash(S,m) are kept apart from the tensors.)
  bool present(const BufRef& b) const;
  // Instruction i's memory effects from the op table (ir::effects, the table the compiler's memory analyses use)
  // against the engine's books: before it runs, what it requires is there and what it allocates is not; after it,
  // what it allocated is there and what it freed is gone. A cpu-stream op on CUDA runs later on the cpu thread;
  // the table gives those no effects on the GPU.
  void check_effects(int i, bool after) const;

  // ---- the step (step.cpp) ------------------------------------------------------------------------
  std::deque<int> comp_ahead;  // CUDA: compute instructions issued whose completion the host has not seen
  std::vector<std::optional<at::cuda::CUDAEvent>> ev_start;  // CUDA + trace: start events
  template <class F> void guarded(int i, F&& f);
  void begin_step(const data::StepBatch& b, int64_t step_index);
  void issue(int i);
  void finish_step();
  void check_no_leak() const;

  std::string context(int i) const;

  // Tensor-parallel segments in progress: (op, stage, mb) -> the run of its forward/backward body. Declared last:
  // destroyed (aborted and joined) first, while what their bodies touch is still alive.
  std::map<std::tuple<int, int, int>, std::unique_ptr<SegmentRun>> seg_runs;
};

// Runs f for instruction i; an exception becomes one error that names the rank, the instruction and its neighbours.
template <class F>
void Worker::Impl::guarded(int i, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    throw std::runtime_error("rank " + std::to_string(world_rank) + " failed at instruction %" + std::to_string(i) + ": " + e.what() + "\n" +
                             context(i));
  }
}

}  // namespace mmoc::engine
