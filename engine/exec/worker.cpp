#include "engine/exec/worker.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "engine/comm/transport.hpp"
#include "engine/data/data.hpp"
#include "engine/io/safetensors.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "engine/optim/adamw.hpp"
#include "engine/optim/lr_schedule.hpp"
#include "engine/optim/thread_pool.hpp"

namespace fs = std::filesystem;

namespace mmoc::engine {

using ir::BufKind;
using ir::BufRef;
using ir::Op;

namespace {
struct ExecError : std::runtime_error { using std::runtime_error::runtime_error; };

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

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
  comm::Transport* tr = nullptr;
  WorkerOptions opts;
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
  std::map<int, at::Tensor> ids, labels;   // batch(m)
  const data::StepBatch* batch = nullptr;
  int64_t count = 0;
  double loss_sum = 0;
  float clip = 1.0f;
  double grad_norm = -1;
  double lr = 0;
  int64_t cur_bytes = 0, peak_bytes = 0;
  std::vector<TraceEvent> trace;

  int64_t bytes_of(const at::Tensor& t) const { return t.defined() ? (int64_t)t.numel() * (int64_t)t.element_size() : 0; }
  void put(BufRef b, at::Tensor t) {
    cur_bytes += bytes_of(t);
    peak_bytes = std::max(peak_bytes, cur_bytes);
    bufs[b] = std::move(t);
  }
  at::Tensor take(BufRef b) {
    auto it = bufs.find(b);
    if (it == bufs.end()) throw ExecError(b.str() + " is not on the device");
    at::Tensor t = std::move(it->second);
    bufs.erase(it);
    cur_bytes -= bytes_of(t);
    return t;
  }
  const at::Tensor& need(BufRef b, const char* why) const {
    auto it = bufs.find(b);
    if (it == bufs.end()) throw ExecError(std::string(why) + ": " + b.str() + " is not on the device");
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
    auto opt = at::TensorOptions().dtype(at::kLong);
    ids[m] = at::from_blob(const_cast<int64_t*>(batch->input_ids[m].data()), {mbs, T}, opt).to(dev, /*non_blocking=*/false, /*copy=*/true);
    labels[m] = at::from_blob(const_cast<int64_t*>(batch->labels[m].data()), {mbs, T}, opt).to(dev, false, true);
    cur_bytes += 2 * mbs * T * 8;
    peak_bytes = std::max(peak_bytes, cur_bytes);
  }
  void free_batch(int m) {
    if (!ids.count(m)) throw ExecError("free of batch(m" + std::to_string(m) + ") that is not loaded");
    ids.erase(m);
    labels.erase(m);
    cur_bytes -= 2 * (int64_t)plan.micro_batch_size * plan.seq_len * 8;
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
      loss_sum += l.detach().item<double>();
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
    put(b, st.host_lowp.to(dev, /*non_blocking=*/false, /*copy=*/true));
  }

  void evict(const ir::Instr& in) {
    const BufRef& b = *in.buf;
    at::Tensor t = take(b);
    if (!in.to_host) return;
    if (b.kind != BufKind::WGrad) throw ExecError("evict " + b.str() + " -> host: only gradients are copied out");
    stages.at(b.stage).host_grad.copy_(t);
  }

  void send(const ir::Instr& in) {
    const at::Tensor& t = need(*in.buf, "send");
    if (sends.count(*in.buf)) throw ExecError("second send of " + in.buf->str());
    sends[*in.buf] = tr->isend(t, in.peer, in.tag);
  }
  void recv(const ir::Instr& in) {
    if (bufs.count(*in.buf)) throw ExecError("second recv of " + in.buf->str() + " (it is already on the device)");
    at::Tensor t = at::empty(act_shape(), at::TensorOptions().dtype(cdtype).device(dev));
    tr->recv(t, in.peer, in.tag);
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

  void optim(const ir::Instr& in) {
    StageState& st = stages.at(in.stage);
    st.step += 1;
    if (in.stream == ir::Stream::Cpu) {
      if (st.resident) throw ExecError("optim S" + std::to_string(in.stage) + " on the cpu for a GPU-resident stage");
      AdamWBuffers b;
      b.param = st.master.data_ptr<float>();
      b.exp_avg = st.exp_avg.data_ptr<float>();
      b.exp_avg_sq = st.exp_avg_sq.data_ptr<float>();
      b.grad = st.host_grad.data_ptr();
      b.grad_type = cdtype == at::kBFloat16 ? GradType::kBFloat16 : GradType::kFloat32;
      if (cdtype == at::kBFloat16) { b.out = st.host_lowp.data_ptr(); b.out_type = OutType::kBFloat16; }
      b.n = st.layout.numel;
      adamw_step(b, hyper(), st.step, clip, pool.get());
    } else {
      if (!st.resident) throw ExecError("optim S" + std::to_string(in.stage) + " on the GPU for an offloaded stage");
      at::Tensor g = take({BufKind::WGrad, in.stage, -1}).to(at::kFloat);
      if (clip != 1.0f) g.mul_(clip);
      const auto h = hyper();
      // torch.optim.AdamW's update, on the device
      st.master.mul_(1.0 - h.lr * h.weight_decay);
      st.exp_avg.lerp_(g, 1.0 - h.beta1);
      st.exp_avg_sq.mul_(h.beta2).addcmul_(g, g, 1.0 - h.beta2);
      const double bc1 = 1.0 - std::pow(h.beta1, (double)st.step);
      const double bc2 = 1.0 - std::pow(h.beta2, (double)st.step);
      at::Tensor denom = (st.exp_avg_sq.sqrt() / std::sqrt(bc2)).add_(h.eps);
      st.master.addcdiv_(st.exp_avg, denom, -h.lr / bc1);
      need({BufKind::W, in.stage, -1}, "optim").copy_(st.master);
    }
  }

  void gradnorm() {
    double local = 0;
    for (auto& [s, st] : stages) {
      if (st.resident) {
        auto it = bufs.find({BufKind::WGrad, s, -1});
        if (it == bufs.end()) throw ExecError("gradnorm: gradient of resident S" + std::to_string(s) + " missing");
        local += it->second.to(at::kDouble).pow(2).sum().item<double>();
      } else {
        local += sum_of_squares(st.host_grad.data_ptr(), cdtype == at::kBFloat16 ? GradType::kBFloat16 : GradType::kFloat32,
                                st.layout.numel, pool.get());
      }
    }
    double total = tr ? tr->allreduce_sum_double(local) : local;
    grad_norm = std::sqrt(total);
    clip = clip_scale(grad_norm, plan.train.max_grad_norm);
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
      case Op::GradNorm: gradnorm(); break;
      case Op::AllReduce: {
        at::Tensor& t = bufs.at(*in.buf);
        tr->allreduce_sum(t, in.group);
        break;
      }
    }
  }

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
  I.opts = opts;
  if (rank < 0 || rank >= plan.gpus) throw std::runtime_error("rank " + std::to_string(rank) + " outside the plan's " + std::to_string(plan.gpus) + " GPUs");
  if (opts.device == "cuda") {
    throw std::runtime_error("this build's worker runs the CPU device only; pass --device cpu");
  }
  I.cdtype = plan.train.precision == "bf16" ? at::kBFloat16 : at::kFloat;
  I.last = plan.num_stages() - 1;
  I.rope = make_rope(plan.model, plan.seq_len, I.dev);
  int threads = opts.optim_threads > 0 ? opts.optim_threads
                                       : std::max(1, (int)std::thread::hardware_concurrency() / std::max(1, plan.gpus));
  I.pool = std::make_unique<ThreadPool>(threads);
  if (plan.model.tied_embeddings && plan.num_stages() > 1)
    throw std::runtime_error("tied embeddings across pipeline stages are not supported (use one stage, or an untied model)");
  for (const auto& s : plan.stages) {
    if (s.gpu != rank) continue;
    StageState st;
    st.id = s.id;
    st.layout = stage_layout(plan.model, s.layer_begin, s.layer_end);
    st.resident = s.weights == ir::Residency::Resident;
    if (st.resident != (s.optim == ir::OptimPlace::Gpu))
      throw std::runtime_error("stage S" + std::to_string(s.id) + ": resident weights need the optimizer on the GPU (and offloaded on the CPU)");
    auto f32 = at::TensorOptions().dtype(at::kFloat).device(st.resident ? I.dev : at::Device(at::kCPU));
    st.master = at::zeros({st.layout.numel}, f32);
    st.exp_avg = at::zeros({st.layout.numel}, f32);
    st.exp_avg_sq = at::zeros({st.layout.numel}, f32);
    if (!st.resident) {
      st.host_lowp = I.cdtype == at::kFloat ? st.master : at::zeros({st.layout.numel}, at::TensorOptions().dtype(I.cdtype));
      st.host_grad = at::zeros({st.layout.numel}, at::TensorOptions().dtype(I.cdtype));
    }
    I.stages[s.id] = std::move(st);
  }
}

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

void Worker::init_random(uint64_t seed) {
  auto& I = *impl_;
  for (auto& [s, st] : I.stages) init_weights(I.plan.model, st.layout, st.master, seed);
  refresh_device_copies(I);
}

void Worker::load_hf(const std::string& dir) {
  auto& I = *impl_;
  std::vector<StageLayout> layouts;
  std::vector<at::Tensor> flats;
  for (auto& [s, st] : I.stages) { layouts.push_back(st.layout); flats.push_back(st.master); }
  load_hf_weights(dir, I.plan.model, layouts, flats);
  size_t k = 0;
  for (auto& [s, st] : I.stages) {
    if (flats[k].data_ptr() != st.master.data_ptr()) st.master.copy_(flats[k]);
    ++k;
  }
  refresh_device_copies(I);
}

StepResult Worker::step(const data::StepBatch& batch, int64_t step_index) {
  auto& I = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  if ((int)batch.input_ids.size() != I.plan.microbatches || batch.micro_batch_size != I.plan.micro_batch_size ||
      batch.seq_len != I.plan.seq_len)
    throw std::runtime_error("batch shape does not match the plan (microbatches, micro-batch size, sequence length)");
  I.batch = &batch;
  I.count = 0;
  for (const auto& lab : batch.labels) {
    const int64_t T = batch.seq_len;
    for (size_t r = 0; r < lab.size() / T; ++r)
      for (int64_t t = 1; t < T; ++t) I.count += lab[r * T + t] != data::kIgnoreIndex;
  }
  if (I.count == 0) throw std::runtime_error("step " + std::to_string(step_index) + ": no token in the batch counts towards the loss (all labels are -100)");
  I.loss_sum = 0;
  I.clip = 1.0f;
  I.grad_norm = -1;
  auto sched = parse_lr_schedule(I.plan.train.lr_schedule);
  I.lr = lr_at(I.plan.train.lr, sched ? *sched : LrSchedule::kConstant, I.plan.train.warmup_steps,
               std::max<int64_t>(I.plan.train.total_steps, 1), step_index);
  I.peak_bytes = I.cur_bytes;
  const auto& prog = I.plan.programs[I.rank].instrs;
  for (int i = 0; i < (int)prog.size(); ++i) {
    double ts = I.opts.trace ? now_us() : 0;
    try {
      I.exec(i);
    } catch (const std::exception& e) {
      throw std::runtime_error("rank " + std::to_string(I.rank) + " failed at instruction %" + std::to_string(i) + ": " +
                               e.what() + "\n" + I.context(i));
    }
    if (I.opts.trace) {
      const auto& in = prog[i];
      int lane = (int)in.stream;
      I.trace.push_back({i, lane, ts, now_us() - ts, in.buf ? I.plan.buffer_bytes(*in.buf) : 0});
    }
  }
  for (auto& [b, w] : I.sends) w->wait();
  I.sends.clear();
  // everything transient must be gone: a leak is a plan/engine disagreement
  for (const auto& [b, t] : I.bufs) {
    bool persistent = b.kind == BufKind::W && I.stages.count(b.stage) && I.stages.at(b.stage).resident;
    if (!persistent) throw std::runtime_error("rank " + std::to_string(I.rank) + ": " + b.str() + " still on the device at the end of the step");
  }
  if (!I.rec.empty() || !I.ids.empty()) throw std::runtime_error("rank " + std::to_string(I.rank) + ": forward records or batches left at the end of the step");
  StepResult r;
  double total = I.tr ? I.tr->allreduce_sum_double(I.loss_sum) : I.loss_sum;
  r.loss = total / double(I.count);
  r.tokens = I.count;
  r.grad_norm = I.grad_norm;
  r.peak_bytes = I.peak_bytes;
  r.lr = I.lr;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

// ---- checkpoints -------------------------------------------------------------------------------
void Worker::save_parts(const std::string& parts_dir) {
  auto& I = *impl_;
  std::vector<io::TensorToWrite> ts;
  std::vector<at::Tensor> keep;
  std::map<std::string, std::string> meta{{"format", "mmoc-parts"}, {"rank", std::to_string(I.rank)}};
  for (auto& [s, st] : I.stages) {
    for (auto [name, t] : {std::pair<const char*, at::Tensor>{"master", st.master}, {"exp_avg", st.exp_avg}, {"exp_avg_sq", st.exp_avg_sq}}) {
      at::Tensor c = t.to(at::kCPU).contiguous();
      keep.push_back(c);
      ts.push_back({"S" + std::to_string(s) + "." + name, io::DType::F32, {c.numel()}, c.data_ptr(), (size_t)c.numel() * 4});
    }
    meta["S" + std::to_string(s) + ".step"] = std::to_string(st.step);
  }
  io::write_safetensors(parts_dir + "/rank" + std::to_string(I.rank) + ".safetensors", ts, meta);
}

void Worker::load_parts(const std::string& parts_dir) {
  auto& I = *impl_;
  for (auto& [s, st] : I.stages) {
    std::string path = parts_dir + "/S" + std::to_string(s) + ".safetensors";
    auto f = io::SafetensorsFile::open(path);
    for (auto [name, t] : {std::pair<const char*, at::Tensor*>{"master", &st.master}, {"exp_avg", &st.exp_avg}, {"exp_avg_sq", &st.exp_avg_sq}}) {
      at::Tensor src = read_tensor(f, name);
      if (src.numel() != t->numel())
        throw std::runtime_error(path + ": " + name + " has " + std::to_string(src.numel()) + " elements, the plan's stage S" +
                                 std::to_string(s) + " has " + std::to_string(t->numel()) + " (checkpoint from another plan?)");
      t->copy_(src.view_as(*t));
    }
    auto it = f.metadata().find("step");
    st.step = it == f.metadata().end() ? 0 : std::stoll(it->second);
  }
  refresh_device_copies(I);
}

void assemble_checkpoint(const ir::Plan& plan, const std::string& parts_dir, const std::string& dir,
                         const std::string& dtype, const std::string& extra_json) {
  // Gather the stage masters of all ranks, write the HF checkpoint into a staging folder, add the optimizer state
  // (one file per stage, so a resume under another rank count still finds them), then swap it in.
  std::vector<StageLayout> layouts;
  std::vector<at::Tensor> flats;
  std::map<int, std::string> stage_file;
  const std::string staging = dir + ".staging";
  fs::remove_all(staging);
  fs::create_directories(staging);
  const std::string hf_dir = staging + "/hf";
  fs::create_directories(staging + "/mmoc_state");
  for (int r = 0; r < plan.gpus; ++r) {
    auto f = io::SafetensorsFile::open(parts_dir + "/rank" + std::to_string(r) + ".safetensors");
    for (const auto& s : plan.stages) {
      if (s.gpu != r) continue;
      std::string p = "S" + std::to_string(s.id) + ".";
      layouts.push_back(stage_layout(plan.model, s.layer_begin, s.layer_end));
      flats.push_back(read_tensor(f, p + "master"));
      at::Tensor m = read_tensor(f, p + "exp_avg"), v = read_tensor(f, p + "exp_avg_sq");
      auto it = f.metadata().find(p + "step");
      std::map<std::string, std::string> meta{{"format", "mmoc-optim"}, {"step", it == f.metadata().end() ? "0" : it->second},
                                              {"layers", std::to_string(s.layer_begin) + "-" + std::to_string(s.layer_end)}};
      at::Tensor mm = flats.back();
      io::write_safetensors(staging + "/mmoc_state/S" + std::to_string(s.id) + ".safetensors",
                            {{"master", io::DType::F32, {mm.numel()}, mm.data_ptr(), (size_t)mm.numel() * 4},
                             {"exp_avg", io::DType::F32, {m.numel()}, m.data_ptr(), (size_t)m.numel() * 4},
                             {"exp_avg_sq", io::DType::F32, {v.numel()}, v.data_ptr(), (size_t)v.numel() * 4}},
                            meta);
    }
  }
  save_hf_checkpoint(hf_dir, plan.model, layouts, flats, dtype == "bf16" ? at::kBFloat16 : at::kFloat);
  // HF files at the top level of the checkpoint folder
  for (const auto& e : fs::directory_iterator(hf_dir)) fs::rename(e.path(), staging + "/" + e.path().filename().string());
  fs::remove_all(hf_dir);
  io::write_file_atomic(staging + "/mmoc_state/trainer_state.json", extra_json);
  io::write_file_atomic(staging + "/mmoc_state/plan.json", ir::to_json_string(plan));
  io::fsync_dir(staging);
  // swap: the previous checkpoint survives until the new one is complete
  const std::string old = dir + ".old";
  fs::remove_all(old);
  if (fs::exists(dir)) fs::rename(dir, old);
  fs::rename(staging, dir);
  fs::remove_all(old);
  fs::remove_all(parts_dir);
}

}  // namespace mmoc::engine
