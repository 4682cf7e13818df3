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

#include "engine/comm/transport.hpp"
#include "engine/exec/cpu_stream.hpp"
#include "engine/exec/device_adamw.hpp"
#include "engine/exec/host_memory.hpp"
#include "engine/data/data.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "engine/model/train_checkpoint.hpp"
#include "engine/optim/adamw.hpp"
#include "engine/optim/lr_schedule.hpp"
#include "engine/optim/thread_pool.hpp"
#include "ir/ops.hpp"


namespace mmoc::engine {

using ir::BufKind;
using ir::BufRef;
using ir::Op;
using namespace mmoc::engine::optim;

namespace {
struct ExecError : std::runtime_error { using std::runtime_error::runtime_error; };

// MMOC_TEST_FAULT (tests only): nonfinite:<rank>:<step>[-<last step>] poisons that rank's gradients at those steps
// (1-based); crash-in-save:<rank> and slow-save:<rank>:<ms> act in the checkpoint writer (train_checkpoint.cpp).
struct TestFault {
  std::string kind;
  int rank = -1;
  int64_t first = 0, last = 0;
  static TestFault from_env() {  // a comma-separated list; the nonfinite entry is this one's
    TestFault f;
    const char* e = std::getenv("MMOC_TEST_FAULT");
    if (!e || !*e) return f;
    const std::string all = e;
    for (size_t p = 0; p <= all.size();) {
      size_t q = all.find(',', p);
      if (q == std::string::npos) q = all.size();
      TestFault g = parse(all.substr(p, q - p));
      if (g.kind == "nonfinite") f = g;
      p = q + 1;
    }
    return f;
  }
  static TestFault parse(const std::string& s) {
    TestFault f;
    auto c1 = s.find(':');
    f.kind = s.substr(0, c1);
    if (c1 == std::string::npos) throw std::runtime_error("MMOC_TEST_FAULT=" + s + ": expected <kind>:<rank>[:<step>[-<last>]]");
    auto c2 = s.find(':', c1 + 1);
    f.rank = std::stoi(s.substr(c1 + 1, c2 == std::string::npos ? std::string::npos : c2 - c1 - 1));
    if (c2 != std::string::npos) {
      std::string r = s.substr(c2 + 1);
      auto d = r.find('-');
      f.first = std::stoll(r.substr(0, d));
      f.last = d == std::string::npos ? f.first : std::stoll(r.substr(d + 1));
    }
    if (f.kind != "nonfinite" && f.kind != "crash-in-save" && f.kind != "slow-save") throw std::runtime_error("MMOC_TEST_FAULT=" + s + ": unknown fault '" + f.kind + "'");
    return f;
  }
};
}  // namespace

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

struct StageState {
  int id = 0;
  StageLayout layout;
  bool resident = false;
  at::Tensor master, exp_avg, exp_avg_sq;  // fp32: host (offloaded) or device (resident)
  at::Tensor host_lowp;                    // compute-dtype host copy that prefetches read (== master for fp32)
  at::Tensor host_grad;                    // compute-dtype host buffer that gradients land in
  int64_t step = 0;
};

struct FwdRecord {
  at::Tensor input;                  // stage input (ids for stage 0)
  at::Tensor w_leaf, in_leaf, out;   // autograd graph when not recomputing
  at::Tensor loss;                   // last stage: loss sum (graph)
};

struct Worker::Impl {
  ir::Plan plan;
  int rank = 0;
  comm::Transport* tr = nullptr;   // send/recv
  comm::Transport* htr = nullptr;  // host collectives
  bool cuda = false;
  int cuda_index = -1;
  std::optional<c10::cuda::CUDAStream> streams[4];  // comp, h2d, d2h, p2p
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
    static const char* names[] = {"comp", "h2d", "d2h", "p2p"};
    std::string s;
    for (int k = 0; k < 4; ++k) {
      int done = -1, pending = -1;
      for (int j = 0; j <= upto && j < (int)ev.size() && j < (int)prog.size(); ++j) {
        if ((int)prog[j].stream != k || !ev[j]) continue;
        if (ev[j]->query()) done = j;
        else if (pending < 0) pending = j;
      }
      s += std::string("  gpu stream ") + names[k] + ": last done " + (done >= 0 ? ir::print_instr(prog[done], done) : std::string("none")) +
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
  double gsq_host = 0;         // no gradnorm: sum of squares of the gradients updated on the host (cpu stream)
  at::Tensor gsq_dev;          // ... and of those updated on the device (0-dim fp64)
  TestFault fault;
  // checkpoints
  IoOptions io;
  std::unique_ptr<CheckpointWriter> writer;
  double save_wait_s = 0;  // time optimizer steps waited for a background save
  int64_t cur_bytes = 0, peak_bytes = 0, peak_alloc = 0;
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

  // ---- handlers -------------------------------------------------------------------------------
  void load_batch(int m) {
    if (ids.count(m)) throw ExecError("batch(m" + std::to_string(m) + ") loaded twice");
    const int64_t mbs = plan.micro_batch_size, T = plan.seq_len;
    ids[m] = pinned_ids[m].view({mbs, T}).to(dev, /*non_blocking=*/true, /*copy=*/true);
    labels[m] = pinned_labels[m].view({mbs, T}).to(dev, /*non_blocking=*/true, /*copy=*/true);
    cur_bytes += ir::batch_buffer_bytes(mbs, T);
    peak_bytes = std::max(peak_bytes, cur_bytes);
  }
  void free_batch(int m) {
    if (!ids.count(m)) throw ExecError("free of batch(m" + std::to_string(m) + ") that is not loaded");
    ids.erase(m);
    labels.erase(m);
    cur_bytes -= ir::batch_buffer_bytes(plan.micro_batch_size, plan.seq_len);
  }
  const at::Tensor& batch_ids(int m, const char* why) {
    auto it = ids.find(m);
    if (it == ids.end()) throw ExecError(std::string(why) + ": batch(m" + std::to_string(m) + ") not loaded");
    return it->second;
  }
  const at::Tensor& batch_labels(int m) {
    auto it = labels.find(m);
    if (it == labels.end()) throw ExecError("labels of batch(m" + std::to_string(m) + ") not loaded");
    return it->second;
  }

  at::Tensor run_stage(const StageState& st, const at::Tensor& w, const at::Tensor& in) {
    return stage_forward(plan.model, st.layout, w, in, rope);
  }

  void forward(int s, int m) {
    StageState& st = stages.at(s);
    if (rec.count({s, m})) throw ExecError("forward S" + std::to_string(s) + " m" + std::to_string(m) + " ran twice");
    at::Tensor w = stage_weights(s);
    at::Tensor input = s == 0 ? batch_ids(m, "forward of the first stage") : need({BufKind::Act, s - 1, m}, "stage input missing");
    FwdRecord r;
    r.input = input;
    at::Tensor out;
    if (plan.stages[s].recompute) {
      at::NoGradGuard ng;
      out = run_stage(st, w, input);
    } else {
      r.w_leaf = w.detach().requires_grad_(true);
      r.in_leaf = s > 0 ? input.detach().requires_grad_(true) : input;
      out = run_stage(st, r.w_leaf, r.in_leaf);
      r.out = out;
    }
    if (s == last) {
      at::Tensor l = lm_loss_sum(out, batch_labels(m));
      loss_acc.add_(l.detach().to(at::kDouble));
      if (!plan.stages[s].recompute) r.loss = l;
    } else {
      put({BufKind::Act, s, m}, out.detach());
    }
    rec[{s, m}] = std::move(r);
  }

  void backward(int s, int m) {
    StageState& st = stages.at(s);
    auto it = rec.find({s, m});
    if (it == rec.end()) throw ExecError("backward S" + std::to_string(s) + " m" + std::to_string(m) + " before its forward");
    FwdRecord r = std::move(it->second);
    rec.erase(it);
    at::Tensor w = stage_weights(s);
    at::Tensor out, loss;
    if (plan.stages[s].recompute) {
      r.w_leaf = w.detach().requires_grad_(true);
      r.in_leaf = s > 0 ? r.input.detach().requires_grad_(true) : r.input;
      out = run_stage(st, r.w_leaf, r.in_leaf);
      if (s == last) loss = lm_loss_sum(out, batch_labels(m));
    } else {
      out = r.out;
      loss = r.loss;
    }
    torch::autograd::variable_list outputs, grad_outputs, inputs{r.w_leaf};
    if (s == last) {
      if (s == 0) batch_ids(m, "backward");
      outputs.push_back(loss);
      grad_outputs.push_back(at::full({}, 1.0 / double(count), loss.options()));
    } else {
      outputs.push_back(out);
      grad_outputs.push_back(take({BufKind::Grad, s, m}));
    }
    if (s > 0) inputs.push_back(r.in_leaf);
    auto grads = torch::autograd::grad(outputs, inputs, grad_outputs, /*retain_graph=*/false);
    BufRef wg{BufKind::WGrad, s, -1};
    auto wit = bufs.find(wg);
    if (wit == bufs.end()) put(wg, grads[0]);
    else wit->second.add_(grads[0]);
    if (s > 0) {
      take({BufKind::Act, s - 1, m});  // the input is consumed
      put({BufKind::Grad, s - 1, m}, grads[1]);
    }
  }

  void prefetch(const BufRef& b) {
    if (b.kind != BufKind::W) throw ExecError("prefetch of " + b.str() + ": only weights are prefetched");
    if (bufs.count(b)) throw ExecError("prefetch of " + b.str() + " that is already on the device");
    StageState& st = stages.at(b.stage);
    if (cuda) {
      auto it = pending_optim.find(b.stage);  // the previous step's update of these weights must be done
      if (it != pending_optim.end()) { it->second.get(); pending_optim.erase(it); }
    }
    put(b, st.host_lowp.to(dev, /*non_blocking=*/true, /*copy=*/true));
  }

  void evict(const ir::Instr& in) {
    const BufRef& b = *in.buf;
    at::Tensor t = take(b);
    if (!in.to_host) return;
    if (b.kind != BufKind::WGrad) throw ExecError("evict " + b.str() + " -> host: only gradients are copied out");
    stages.at(b.stage).host_grad.copy_(t, /*non_blocking=*/true);
  }

  void send(const ir::Instr& in) {
    const at::Tensor& t = need(*in.buf, "send");
    if (sends.count(*in.buf)) throw ExecError("second send of " + in.buf->str());
    if (!tr) throw ExecError("send in a plan run without a transport");
    if (cuda) inflight.push_back(tr->isend(t, in.peer, in.tag));  // ordered on the p2p stream
    else sends[*in.buf] = tr->isend(t, in.peer, in.tag);
  }
  void recv(const ir::Instr& in) {
    if (bufs.count(*in.buf)) throw ExecError("second recv of " + in.buf->str() + " (it is already on the device)");
    at::Tensor t = at::empty(act_shape(), at::TensorOptions().dtype(cdtype).device(dev));
    if (!tr) throw ExecError("recv in a plan run without a transport");
    if (cuda) inflight.push_back(tr->irecv(t, in.peer, in.tag));
    else tr->recv(t, in.peer, in.tag);
    put(*in.buf, t);
  }
  void free_buf(const BufRef& b) {
    if (b.kind == BufKind::Batch) { free_batch(b.mb); return; }
    auto s = sends.find(b);
    if (s != sends.end()) { s->second->wait(); sends.erase(s); }
    take(b);
  }

  AdamWHyper hyper() const {
    AdamWHyper h;
    h.lr = lr;
    h.beta1 = plan.train.beta1;
    h.beta2 = plan.train.beta2;
    h.eps = plan.train.eps;
    h.weight_decay = plan.train.weight_decay;
    h.moment_form = MomentForm::kLerp;
    return h;
  }

  // Test-only fault injection (MMOC_TEST_FAULT=nonfinite:<rank>:<step>[-<last step>], steps 1-based): poisons this
  // rank's gradients of `stage` (all local stages for -1) with a NaN, as a diverged backward would.
  void maybe_poison(int stage, const std::vector<at::Tensor>& resident) {
    if (fault.kind != "nonfinite" || fault.rank != rank || step_index + 1 < fault.first || step_index + 1 > fault.last) return;
    for (auto& [s, st] : stages)
      if ((stage < 0 || s == stage) && !st.resident) st.host_grad.narrow(0, 0, 1).fill_(std::nan(""));
    for (const auto& g : resident) g.narrow(0, 0, 1).fill_(std::nan(""));
  }
  GradType grad_type() const { return cdtype == at::kBFloat16 ? GradType::kBFloat16 : GradType::kFloat32; }

  void optim(const ir::Instr& in) {
    StageState& st = stages.at(in.stage);
    const bool on_cpu = in.stream == ir::Stream::Cpu;
    if (on_cpu == st.resident)
      throw ExecError("optim S" + std::to_string(in.stage) + (on_cpu ? " on the cpu for a GPU-resident stage" : " on the GPU for an offloaded stage"));
    at::Tensor grad = on_cpu ? st.host_grad : take({BufKind::WGrad, in.stage, -1});
    if (!has_gradnorm) maybe_poison(in.stage, on_cpu ? std::vector<at::Tensor>{} : std::vector<at::Tensor>{grad});
    if (skip_updates) return;  // the global norm is non-finite: no update, the step count stays
    if (writer->active()) {  // a background save of this stage's state must be done before the state changes
      const double w0 = now_us();
      writer->wait_stage(in.stage);
      save_wait_s += (now_us() - w0) * 1e-6;  // one writer of it at a time: the cpu thread or the host thread
    }
    st.step += 1;
    if (on_cpu) {
      // without a gradnorm instruction the norm is summed here, per stage, before the update (checked at step end)
      if (!has_gradnorm) gsq_host += sum_of_squares(grad.data_ptr(), grad_type(), st.layout.numel, pool.get());
      AdamWBuffers b;
      b.param = st.master.data_ptr<float>();
      b.exp_avg = st.exp_avg.data_ptr<float>();
      b.exp_avg_sq = st.exp_avg_sq.data_ptr<float>();
      b.grad = grad.data_ptr();
      b.grad_type = grad_type();
      if (cdtype == at::kBFloat16) { b.out = st.host_lowp.data_ptr(); b.out_type = OutType::kBFloat16; }
      b.n = st.layout.numel;
      adamw_step(b, hyper(), st.step, clip, pool.get());
    } else {
      at::Tensor w = need({BufKind::W, in.stage, -1}, "optim");
      adamw_step_tensors(st.master, st.exp_avg, st.exp_avg_sq, grad, w, hyper(), st.step, clip, DeviceAdamWKernel::kAuto,
                         has_gradnorm ? nullptr : &gsq_dev);
    }
  }

  std::vector<at::Tensor> resident_grads() {
    std::vector<at::Tensor> g;
    for (auto& [s, st] : stages)
      if (st.resident) {
        auto it = bufs.find({BufKind::WGrad, s, -1});
        if (it == bufs.end()) throw ExecError("gradnorm: gradient of resident S" + std::to_string(s) + " missing");
        g.push_back(it->second);
      }
    return g;
  }
  // The global gradient norm, before any optimizer step of the step. A non-finite norm (or loss) on any rank makes
  // every rank skip its updates: the sum over ranks is then non-finite everywhere.
  void gradnorm(const std::vector<at::Tensor>& rgrads) {
    maybe_poison(-1, rgrads);
    double local = 0;
    for (const auto& g : rgrads) local += sum_of_squares_tensor(g).item<double>();
    for (auto& [s, st] : stages)  // offloaded stages: their gradients are on the host
      if (!st.resident) local += sum_of_squares(st.host_grad.data_ptr(), grad_type(), st.layout.numel, pool.get());
    // the last stage's loss is complete here: its forwards precede the backwards whose gradients this waited for
    if (stages.count(last) && !std::isfinite(loss_acc.item<double>())) local = std::nan("");
    double total = htr ? htr->allreduce_sum_double(local) : local;
    grad_norm = std::sqrt(total);
    skip_updates = !std::isfinite(total);
    clip = !skip_updates && plan.train.max_grad_norm > 0 ? clip_scale(grad_norm, plan.train.max_grad_norm) : 1.0f;
  }

  void exec(int i) {
    const ir::Instr& in = plan.programs[rank].instrs[i];
    switch (in.op) {
      case Op::LoadBatch: load_batch(in.mb); break;
      case Op::Prefetch: prefetch(*in.buf); break;
      case Op::Forward: forward(in.stage, in.mb); break;
      case Op::Backward: backward(in.stage, in.mb); break;
      case Op::Send: send(in); break;
      case Op::Recv: recv(in); break;
      case Op::Evict: evict(in); break;
      case Op::Free: free_buf(*in.buf); break;
      case Op::Optim: optim(in); break;
      case Op::GradNorm: gradnorm(resident_grads()); break;
      case Op::AllReduce: {
        at::Tensor& t = bufs.at(*in.buf);
        tr->allreduce_sum(t, in.group);
        break;
      }
    }
  }

  std::vector<StageTensors> stage_tensors();

  // Is `b` on the device as the engine keeps its books? (batch(m) and stash(S,m) are kept apart from the tensors.)
  bool present(const BufRef& b) const {
    switch (b.kind) {
      case BufKind::Batch: return ids.count(b.mb) != 0;
      case BufKind::Stash: return rec.count({b.stage, b.mb}) != 0;
      default: return bufs.count(b) != 0;
    }
  }
  // Instruction i's memory effects from the op table (ir::effects, the table the compiler's memory analyses use)
  // against the engine's books: before it runs, what it requires is there and what it allocates is not; after it,
  // what it allocated is there and what it freed is gone. A cpu-stream op on CUDA runs later on the cpu thread;
  // the table gives those no effects on the GPU.
  void check_effects(int i, bool after) const {
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

  // the step (below)
  std::deque<int> comp_ahead;  // CUDA: compute instructions issued whose completion the host has not seen
  std::vector<std::optional<at::cuda::CUDAEvent>> ev_start;  // CUDA + trace: start events
  template <class F> void guarded(int i, F&& f);
  void begin_step(const data::StepBatch& b, int64_t step_index);
  void issue(int i);
  void finish_step();
  void check_no_leak() const;

  std::string context(int i) const {
    const auto& prog = plan.programs[rank].instrs;
    std::string s;
    for (int j = std::max(0, i - 3); j <= std::min((int)prog.size() - 1, i + 3); ++j)
      s += std::string(j == i ? "  >> " : "     ") + ir::print_instr(prog[j], j) + "\n";
    return s;
  }
};

Worker::Worker(const ir::Plan& plan, int rank, comm::Transport* transport, const WorkerOptions& opts) : impl_(new Impl) {
  auto& I = *impl_;
  I.plan = plan;
  I.rank = rank;
  I.tr = transport;
  I.htr = transport;
  I.opts = opts;
  if (rank < 0 || rank >= plan.gpus) throw std::runtime_error("rank " + std::to_string(rank) + " outside the plan's " + std::to_string(plan.gpus) + " GPUs");
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
    for (int k = 0; k < 4; ++k) I.streams[k] = c10::cuda::getStreamFromPool(/*isHighPriority=*/k == 3, (c10::DeviceIndex)I.cuda_index);
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
  I.rope = make_rope(plan.model, plan.seq_len, I.dev);
  int threads = opts.optim_threads > 0 ? opts.optim_threads
                                       : std::max(1, (int)std::thread::hardware_concurrency() / std::max(1, plan.gpus));
  std::vector<int> pin;
  if (I.cuda) {  // each rank's optimizer threads on their own cores
    for (int k = 0; k < threads; ++k) pin.push_back(rank * threads + k);
  }
  I.pool = std::make_unique<ThreadPool>(threads, pin);
  if (plan.model.tied_embeddings && plan.num_stages() > 1)
    throw std::runtime_error("tied embeddings across pipeline stages are not supported (use one stage, or an untied model)");
  // host state: exactly sized, faulted in by all of this rank's cores, page-locked on CUDA where copies need it
  const int fault_threads = std::max(1, (int)std::thread::hardware_concurrency() / std::max(1, plan.gpus));
  auto host = [&](at::ScalarType t, int64_t n, bool pinned) { return host_tensor(n, t, pinned && I.cuda, I.cuda_index, fault_threads); };
  for (const auto& s : plan.stages) {
    if (s.gpu != rank) continue;
    StageState st;
    st.id = s.id;
    st.layout = stage_layout(plan.model, s.layer_begin, s.layer_end);
    st.resident = s.weights == ir::Residency::Resident;
    if (st.resident != (s.optim == ir::OptimPlace::Gpu))
      throw std::runtime_error("stage S" + std::to_string(s.id) + ": resident weights need the optimizer on the GPU (and offloaded on the CPU)");
    if (st.resident) {
      auto f32 = at::TensorOptions().dtype(at::kFloat).device(I.dev);
      st.master = at::zeros({st.layout.numel}, f32);
      st.exp_avg = at::zeros({st.layout.numel}, f32);
      st.exp_avg_sq = at::zeros({st.layout.numel}, f32);
    } else {
      // fp32 master and moments in host memory; the low-precision copy and the gradient landing zone pinned
      st.master = host(at::kFloat, st.layout.numel, /*pinned=*/I.cdtype == at::kFloat);
      st.exp_avg = host(at::kFloat, st.layout.numel, false);
      st.exp_avg_sq = host(at::kFloat, st.layout.numel, false);
      st.host_lowp = I.cdtype == at::kFloat ? st.master : host(I.cdtype, st.layout.numel, true);
      st.host_grad = host(I.cdtype, st.layout.numel, true);
    }
    I.stages[s.id] = std::move(st);
  }
  I.loss_acc = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(I.dev));
  I.gsq_dev = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(I.dev));
  ir::Plan mine = plan;  // does this rank's every update wait for the global norm?
  for (int g = 0; g < plan.gpus; ++g)
    if (g != rank) mine.programs[g].instrs.clear();
  I.has_gradnorm = updates_wait_for_gradnorm(mine);
  I.fault = TestFault::from_env();
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

static void refresh_device_copies(Worker::Impl& I) {
  for (auto& [s, st] : I.stages) {
    if (st.resident) {
      I.bufs.erase({BufKind::W, s, -1});
      I.put({BufKind::W, s, -1}, st.master.to(I.cdtype, false, true));
    } else if (I.cdtype != at::kFloat) {
      st.host_lowp.copy_(st.master);
    }
  }
}

LoadReport Worker::init_random(uint64_t seed) {
  auto& I = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto& [s, st] : I.stages) init_weights(I.plan.model, st.layout, st.master, seed);
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
  for (auto& [s, st] : I.stages) { layouts.push_back(st.layout); flats.push_back(st.master); }
  const IoStats io = load_hf_parallel(dir, I.plan.model, layouts, flats, I.io);
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
  const IoStats io = load_training_state(dir, I.plan, v, I.io);
  for (const auto& t : v) I.stages.at(t.id).step = t.step;
  refresh_device_copies(I);
  LoadReport r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.read_seconds = io.seconds;
  r.bytes = io.bytes;
  return r;
}

// ---- the step -----------------------------------------------------------------------------------
// One loop for both devices: on the CPU every instruction runs on the calling thread in program order; on CUDA,
// gpu-stream instructions are issued to their stream after their cross-stream events, cpu-stream ones are queued on
// the cpu thread (which waits for their events and futures itself).

// Runs f for instruction i; an exception becomes one error that names the rank, the instruction and its neighbours.
template <class F>
void Worker::Impl::guarded(int i, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    throw std::runtime_error("rank " + std::to_string(rank) + " failed at instruction %" + std::to_string(i) + ": " + e.what() + "\n" +
                             context(i));
  }
}

void Worker::Impl::begin_step(const data::StepBatch& b, int64_t step_index) {
  if ((int)b.input_ids.size() != plan.microbatches || b.micro_batch_size != plan.micro_batch_size || b.seq_len != plan.seq_len)
    throw std::runtime_error("batch shape does not match the plan (microbatches, micro-batch size, sequence length)");
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
      std::memcpy(pinned_ids[m].data_ptr<int64_t>(), b.input_ids[m].data(), n * 8);
      std::memcpy(pinned_labels[m].data_ptr<int64_t>(), b.labels[m].data(), n * 8);
    }
  }
  if (!cuda) {
    loss_acc.zero_();
    gsq_dev.zero_();
    return;
  }
  c10::cuda::CUDACachingAllocator::resetPeakStats((c10::DeviceIndex)cuda_index);
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
  if (in.stream == ir::Stream::Cpu) {
    std::vector<at::cuda::CUDAEvent*> evs;
    std::vector<std::shared_future<void>> fs;
    for (int a : in.after) {
      if (prog[a].stream == ir::Stream::Cpu) fs.push_back(fut[a]);
      else if (ev[a]) evs.push_back(&*ev[a]);
    }
    std::vector<at::Tensor> rg;
    if (in.op == Op::GradNorm) rg = resident_grads();
    Impl* ip = this;
    const bool tr = opts.trace;
    fut[i] = cpu->submit([ip, i, evs, fs, rg, tr] {
      c10::cuda::CUDAGuard dg((c10::DeviceIndex)ip->cuda_index);
      for (auto* e : evs) e->synchronize();
      for (const auto& f : fs) f.get();
      double ts = tr ? now_us() : 0;
      if (ip->plan.programs[ip->rank].instrs[i].op == Op::GradNorm) ip->gradnorm(rg);
      else ip->exec(i);
      if (tr) ip->cpu_times[i] = {ts, now_us() - ts};
    });
    if (in.op == Op::Optim) pending_optim[in.stage] = fut[i];
    return;
  }
  const int sidx = (int)in.stream;
  auto& stream = *streams[sidx];
  watchdog->at(i);
  // bounded run-ahead: the host issues (and allocates for) at most max_ahead compute instructions ahead of the
  // GPU, so the allocator's live set follows the plan's timeline instead of the whole step being queued at once
  while (max_ahead > 0 && (int)comp_ahead.size() > max_ahead) {
    ev[comp_ahead.front()]->synchronize();
    comp_ahead.pop_front();
  }
  for (int a : in.after) {
    if (prog[a].stream == ir::Stream::Cpu) fut[a].get();
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
    if (prog[i].stream == ir::Stream::Cpu) guarded(i, [&] { fut[i].get(); });
  for (int k = 0; k < 4; ++k) streams[k]->synchronize();
  for (auto& w : inflight) w->wait();
  inflight.clear();
  pending_optim.clear();
  loss_sum = loss_acc.item<double>();
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats((c10::DeviceIndex)cuda_index);
  peak_bytes = stats.reserved_bytes[0].peak;
  peak_alloc = stats.allocated_bytes[0].peak;
  if (opts.trace) {
    for (int i = 0; i < (int)prog.size(); ++i) {
      const auto& in = prog[i];
      int64_t bytes = in.buf ? plan.buffer_bytes(*in.buf) : 0;
      if (in.stream == ir::Stream::Cpu) {
        trace.push_back({i, 4, cpu_times[i].first, cpu_times[i].second, bytes});
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
    if (!persistent) throw std::runtime_error("rank " + std::to_string(rank) + ": " + b.str() + " still on the device at the end of the step");
  }
  if (!rec.empty() || !ids.empty()) throw std::runtime_error("rank " + std::to_string(rank) + ": forward records or batches left at the end of the step");
}

StepResult Worker::step(const data::StepBatch& batch, int64_t step_index) {
  auto& I = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  std::optional<c10::cuda::CUDAGuard> dg;
  if (I.cuda) dg.emplace((c10::DeviceIndex)I.cuda_index);
  I.begin_step(batch, step_index);
  const int n = (int)I.plan.programs[I.rank].instrs.size();
  for (int i = 0; i < n; ++i) I.guarded(i, [&] { I.issue(i); });
  I.finish_step();
  I.watchdog->at(-1);
  I.check_no_leak();
  StepResult r;
  double total = I.htr ? I.htr->allreduce_sum_double(I.loss_sum) : I.loss_sum;
  if (!I.has_gradnorm) {  // the norm of the gradients the optimizer steps used, summed over stages and ranks
    const double local = I.gsq_host + I.gsq_dev.item<double>();
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
  r.lr = I.lr;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

// ---- checkpoints -------------------------------------------------------------------------------
std::vector<StageTensors> Worker::Impl::stage_tensors() {
  std::vector<StageTensors> v;
  for (auto& [s, st] : stages) v.push_back({s, st.layout, st.master, st.exp_avg, st.exp_avg_sq, st.step});
  return v;
}

void Worker::begin_save(const std::string& dir, bool bf16_weights, bool background) {
  auto& I = *impl_;
  // in the order this rank's optimizer steps come in its program: the first update waits the least
  std::vector<StageTensors> v = I.stage_tensors();
  const auto& prog = I.plan.programs[I.rank].instrs;
  auto first_optim = [&](int stage) {
    for (int i = 0; i < (int)prog.size(); ++i)
      if (prog[i].op == Op::Optim && prog[i].stage == stage) return i;
    return (int)prog.size();
  };
  std::stable_sort(v.begin(), v.end(), [&](const StageTensors& a, const StageTensors& b) { return first_optim(a.id) < first_optim(b.id); });
  I.save_wait_s = 0;
  I.writer->start(dir, std::move(v), bf16_weights ? at::kBFloat16 : at::kFloat, background);
}

bool Worker::save_active() const { return impl_->writer->active(); }

SaveReport Worker::finish_save() {
  auto& I = *impl_;
  SaveReport r;
  const IoStats io = I.writer->wait();
  r.bytes = io.bytes;
  r.seconds = io.seconds;
  r.optimizer_wait_s = I.save_wait_s;
  return r;
}

int64_t Worker::save_host_bytes() const { return save_staging_bytes(impl_->io); }

}  // namespace mmoc::engine
