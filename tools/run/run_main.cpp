// mmoc-run plan.json --data <file> --steps N [--init random|<hf dir>] [--save <dir>] [--resume <dir>] ...
// Without RANK in the environment it starts one worker process per pipeline rank of the plan itself (on the CPU
// when there is no GPU); under torchrun or Slurm it is one of those workers.
#include <CLI/CLI.hpp>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cuda_runtime_api.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <future>
#include <iostream>
#include <nlohmann/json.hpp>
#include <iomanip>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "common/format.hpp"
#include "common/fs.hpp"
#include "common/gpu_clock.hpp"
#include "cost/spec.hpp"
#include "engine/comm/job.hpp"
#include "engine/comm/transport.hpp"
#include "engine/comm/world.hpp"
#include "engine/data/data.hpp"
#include "engine/exec/worker.hpp"
#include "engine/io/fsutil.hpp"
#include "engine/io/hf_config.hpp"
#include "engine/io/safetensors.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/train_checkpoint.hpp"
#include "engine/tier/path.hpp"
#include "ir/plan.hpp"

using json = nlohmann::json;

namespace mmoc::engine {

namespace {
struct UsageError : std::runtime_error { using std::runtime_error::runtime_error; };
// Training diverged (a non-finite loss or gradient norm): every rank throws it at the same step; rank 0 prints it.
struct Diverged : std::runtime_error { using std::runtime_error::runtime_error; };
constexpr int kExitDiverged = 4;

struct Args {
  std::string plan, data, tokenizer, init = "random", save, resume, metrics, trace, device = "auto", fit, save_dtype = "fp32";
  std::string on_nonfinite;  // stop | skip; empty: the plan's train.on_nonfinite
  std::string hardware;      // the hardware file whose peak_bf16_tflops MFU/HFU use; empty: the plan's hardware by name
  std::string nvme;          // NVMe tier directories instead of the plan's (comma-separated, the same count)
  std::string prefetch_pool = "h2d";  // CUDA: the allocator pool of prefetched weights (WorkerOptions::prefetch_pool)
  int steps = 1, save_every = 0, optim_threads = 0, max_skips = 10;
  uint64_t seed = 0, data_seed = 0;
  bool quiet = false;
  comm::LauncherRequest launch;  // --nnodes, --node-rank, --nproc-per-node, --master-addr/port, timeouts
};

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
int64_t wall_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}
// Seconds since mmoc-run was started (MMOC_LAUNCH_T0_US, set by the launcher), or -1 under another launcher.
double since_launch() {
  const char* e = std::getenv("MMOC_LAUNCH_T0_US");
  return e && *e ? (double)(wall_us() - std::atoll(e)) * 1e-6 : -1.0;
}
std::string fmt1(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

data::DataConfig data_config(const Args& a, const ir::Plan& p) {
  data::DataConfig dc;
  dc.path = a.data;
  if (!a.tokenizer.empty()) dc.tokenizer = a.tokenizer;
  dc.vocab_size = p.model.vocab;
  dc.fit.mode = data::parse_fit_mode(a.fit.empty() ? "pad" : a.fit);
  dc.fit_from_file = a.fit.empty();  // a prepared token file: its own fit mode unless --fit is given
  dc.fit.seq_len = p.seq_len;
  dc.seed = a.data_seed;
  return dc;
}

std::string nonfinite_mode(const Args& a, const ir::Plan& p) { return a.on_nonfinite.empty() ? p.train.on_nonfinite : a.on_nonfinite; }

// The peak bf16 TFLOP/s per GPU that MFU and HFU divide by: --hardware's peak_bf16_tflops, else that of the plan's
// hardware (by name, in the configs folder); when that file is not there, HardwareSpec's default (`note` says so).
double peak_bf16_tflops(const Args& a, const ir::Plan& p, std::string* note = nullptr) {
  if (!a.hardware.empty()) {
    try {
      return load_hardware(a.hardware, default_configs_dir()).peak_bf16_tflops;
    } catch (const std::exception& e) {
      throw UsageError(std::string("--hardware: ") + e.what());
    }
  }
  try {
    return load_hardware(p.hardware, default_configs_dir()).peak_bf16_tflops;
  } catch (const std::exception&) {
    const double d = HardwareSpec{}.peak_bf16_tflops;
    if (note) *note = "hardware '" + p.hardware + "' not found in the configs folder: MFU/HFU against " + fmt1(d) + " TFLOP/s (--hardware sets it)";
    return d;
  }
}

// Checks done once, before any worker starts, so bad input fails fast with one message.
ir::Plan validate(const Args& a) {
  ir::Plan p = ir::load_plan_file(a.plan);
  auto problems = ir::verify_structure(p);
  if (!problems.empty()) throw UsageError(a.plan + ": not a valid plan: " + problems[0]);
  try {
    arch::validate(p.model, a.plan + ": model");
  } catch (const arch::ConfigError& e) {
    throw UsageError(e.what());
  }
  if (!a.hardware.empty()) peak_bf16_tflops(a, p);
  if (p.model.tied_embeddings && p.num_stages() > 1) {  // the tied-embeddings pass's plumbing (older plans lack it)
    bool adds = false;
    for (const auto& prog : p.programs)
      for (const auto& in : prog.instrs) adds = adds || in.op == ir::Op::AddGrad;
    if (!adds || !p.find_buffer(ir::BufKind::Tie, p.num_stages() - 1))
      throw UsageError(a.plan + ": " + p.model.name + " has tied embeddings in " + std::to_string(p.num_stages()) +
                       " stages, but the plan does not carry the tied embedding (tie/tiegrad, addgrad): compile it again");
  }
  if (a.steps < 0) throw UsageError("--steps must be >= 0");
  if (a.data.empty()) throw UsageError("--data is required");
  if (!io::path_exists(a.data)) throw UsageError("--data " + a.data + ": no such file");
  if (!a.tokenizer.empty() && !io::path_exists(a.tokenizer)) throw UsageError("--tokenizer " + a.tokenizer + ": no such file");
  if (a.init != "random" && !io::is_directory(a.init)) throw UsageError("--init " + a.init + ": not 'random' and not a checkpoint folder");
  if (!a.resume.empty() && !io::path_exists(a.resume + "/mmoc_state/trainer_state.json"))
    throw UsageError("--resume " + a.resume + ": no mmoc checkpoint there (mmoc_state/trainer_state.json missing)");
  if (a.save_dtype != "fp32" && a.save_dtype != "bf16") throw UsageError("--save-dtype must be fp32 or bf16");
  if (!a.on_nonfinite.empty() && a.on_nonfinite != "stop" && a.on_nonfinite != "skip")
    throw UsageError("--on-nonfinite must be stop or skip (got '" + a.on_nonfinite + "')");
  if (a.max_skips < 1) throw UsageError("--max-skips must be >= 1");
  if (nonfinite_mode(a, p) == "skip" && !updates_wait_for_gradnorm(p))
    throw UsageError("--on-nonfinite skip: in " + a.plan + " the optimizer steps do not wait for the gradient norm, so a " +
                     "non-finite step cannot be skipped before it updates; compile it with --on-nonfinite skip (or clipping)");
  // Checkpoints are checked here too (headers, names, shapes; no tensor data is read), so a corrupt or mismatched
  // one fails with one message and exit code 2 instead of a worker failure.
  if (a.resume.empty() && a.init != "random") {
    // config.json, when present, must describe the plan's model: head counts, rope theta and norm eps do not show
    // in the tensor shapes (heads 8 / kv_heads 4 has the shapes of heads 4 / kv_heads 2 at hidden 64).
    if (io::path_exists(a.init + "/config.json")) {
      const ir::ModelArch c = io::read_hf_config(a.init).arch, &m = p.model;
      const std::string diff = arch::differences(c, m);
      if (!diff.empty())
        throw UsageError("--init " + a.init + ": config.json is not the plan's model " + m.name + ": " + diff);
    }
    std::vector<at::Tensor> none;
    try {
      load_hf_weights(a.init, p.model, {}, none);  // throws io::FormatError naming the file/tensor
    } catch (const io::FormatError&) {
      throw;
    } catch (const std::exception& e) {  // I/O: no model.safetensors, unreadable, ...
      throw UsageError("--init " + a.init + ": " + e.what());
    }
  }
  if (!a.resume.empty()) {
    // the checkpoint's own stages (any partition: the plan's stages are gathered from them), each checked against
    // its layers' layout in this plan's model
    std::vector<SavedStage> saved;
    try {
      saved = saved_stages(a.resume);
    } catch (const io::FormatError& e) {
      throw UsageError("--resume " + a.resume + ": " + e.what());
    } catch (const std::exception& e) {
      throw UsageError("--resume " + a.resume + ": " + e.what());
    }
    const int layers = p.model.layers + 2;
    if (saved.empty() || saved.back().layer_end != layers)
      throw UsageError("--resume " + a.resume + ": its stages hold layers 0-" + std::to_string(saved.empty() ? 0 : saved.back().layer_end) +
                       ", " + p.model.name + " has " + std::to_string(layers) + " (a checkpoint of another model?)");
    std::optional<io::Checkpoint> hf;  // the weights, for stages whose master is the fp32 HF shard
    for (const auto& s : saved) {
      const std::string& path = s.path;
      io::SafetensorsFile f;
      try {
        f = io::SafetensorsFile::open(path);
      } catch (const io::FormatError&) {
        throw;
      } catch (const std::exception& e) {
        throw UsageError("--resume " + a.resume + ": " + e.what());
      }
      const StageLayout L = stage_layout(p.model, s.layer_begin, s.layer_end);
      for (const char* name : {"master", "exp_avg", "exp_avg_sq"}) {
        const auto* t = f.find(name);
        if (!t && std::string(name) == "master") continue;  // fp32 weights: the master is the HF shard (checked below)
        if (!t) throw UsageError(path + ": no tensor '" + name + "'");
        if (t->numel() != L.numel || t->dtype != io::DType::F32)
          throw UsageError(path + ": " + name + " has " + std::to_string(t->numel()) + " " + io::dtype_name(t->dtype) +
                           " elements, layers " + std::to_string(s.layer_begin) + "-" + std::to_string(s.layer_end - 1) + " of " +
                           p.model.name + " have " + std::to_string(L.numel) + " F32 (a checkpoint of another model?)");
      }
      if (f.find("master")) continue;
      try {
        if (!hf) hf = io::Checkpoint::open(a.resume);
      } catch (const io::FormatError&) {
        throw;
      } catch (const std::exception& e) {
        throw UsageError("--resume " + a.resume + ": " + e.what());
      }
      for (const auto& prm : L.params) {
        const io::TensorInfo* t = hf->contains(prm.name) ? &hf->info(prm.name) : nullptr;
        if (!t || t->dtype != io::DType::F32 || t->shape != prm.hf_shape())  // HF orientation (GPT-2 Conv1D: transposed)
          throw UsageError("--resume " + a.resume + ": layers " + std::to_string(s.layer_begin) + "-" + std::to_string(s.layer_end - 1) +
                           " have no fp32 master (" + prm.name + (t ? " is not an fp32 tensor of the model's shape" : " is missing") +
                           "; a checkpoint of another model?)");
      }
    }
  }
  return p;
}

// The data position of a --resume checkpoint, checked against the data (DataError when it belongs to other data).
void check_resume_data(const Args& a, std::shared_ptr<const data::RowSource> rows) {
  if (a.resume.empty()) return;
  json st;
  try {
    std::ifstream f(a.resume + "/mmoc_state/trainer_state.json");
    st = json::parse(f);
    (void)st.at("step").get<int64_t>();
    data::BatchIterator it(rows, a.data_seed);
    it.restore(data::iterator_state_from_json(st.at("data")));
  } catch (const json::exception& e) {
    throw UsageError("--resume " + a.resume + ": bad mmoc_state/trainer_state.json (" + e.what() + ")");
  } catch (const data::DataError& e) {
    throw UsageError("--resume " + a.resume + ": " + e.what());
  }
}

int cuda_devices() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }
  return n;
}

// auto: the GPUs when there are enough for the plan's ranks on this node, else the CPU.
// local_ranks: the ranks this node runs (0: all the plan's).
std::string resolve_device(const std::string& d, const ir::Plan& p, bool worker, int local_ranks = 0) {
  if (d != "auto" && d != "cpu" && d != "cuda") throw UsageError("--device must be auto, cpu or cuda (got '" + d + "')");
  const int n = cuda_devices();
  int need = local_ranks > 0 ? local_ranks : ir::world_size(p);
  if (local_ranks <= 0)  // one node: the GPUs the plan's mapping names (cross-map may pick a subset of the machine's)
    for (int r = 0; r < ir::world_size(p); ++r) need = std::max(need, ir::physical_gpu(p, r) + 1);
  if (d == "auto") return n > 0 && (worker || n >= need) ? "cuda" : "cpu";
  if (d == "cuda") {
    if (n == 0) throw UsageError("--device cuda: no CUDA GPU is visible");
    if (!worker && n < need)
      throw UsageError((local_ranks <= 0 ? "the plan runs on " : "this node runs ") + std::to_string(need) + " GPU ranks but this machine has " +
                       std::to_string(n) + " GPU(s); compile for --gpus " + std::to_string(n) + " or run across nodes (--nnodes, torchrun, Slurm)");
  }
  return d;
}

void write_trace(const std::string& path, const ir::Plan& plan, const std::vector<std::vector<TraceEvent>>& per_rank,
                 const std::vector<std::vector<ClockPoint>>& clocks, double step_s, double tokens_per_s, const std::vector<double>& peaks, const std::vector<double>& allocs) {
  json ev = json::array();
  double t0 = 1e300;
  for (const auto& r : per_rank) for (const auto& e : r) t0 = std::min(t0, e.start_us);
  for (int g = 0; g < (int)per_rank.size(); ++g) {
    ev.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", g}, {"args", {{"name", "GPU " + std::to_string(g)}}}});
    std::set<int> used;
    for (const auto& e : per_rank[g]) used.insert(e.lane);
    for (int l = 0; l < ir::kNumStreams; ++l)  // a trace lane per stream (ir::Stream's order)
      if (l < 5 || used.count(l)) ev.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", g}, {"tid", l}, {"args", {{"name", ir::to_string((ir::Stream)l)}}}});
    for (const auto& e : per_rank[g]) {
      const auto& in = plan.programs[ir::rank_coord(plan, g).pipe].instrs[e.instr];
      std::string deps;
      for (int a : in.after) deps += (deps.empty() ? "%" : ",%") + std::to_string(a);
      std::string text = ir::print_instr(in, e.instr);  // "%3 = send act(S0,m0) -> g1 @p2p after(%2) tag=..."
      text = text.substr(text.find('=') + 2);
      text = text.substr(0, text.find(" @"));
      ev.push_back({{"ph", "X"}, {"name", text},
                    {"cat", ir::to_string(in.op)}, {"pid", g}, {"tid", e.lane}, {"ts", e.start_us - t0}, {"dur", e.dur_us},
                    {"args", {{"op", ir::to_string(in.op)}, {"stage", in.stage}, {"mb", in.mb}, {"bytes", e.bytes}, {"instr", e.instr}, {"deps", deps},
                              {"buf", in.buf ? in.buf->str() : std::string()}}}});
    }
    // the GPU's SM clock (NVML, every 2 ms; a counter track per GPU); the reading just before the step's first
    // instruction is placed at its start
    if (g < (int)clocks.size())
      for (const ClockPoint& p : clocks[g])
        ev.push_back({{"ph", "C"}, {"name", "clock"}, {"pid", g}, {"ts", std::max(0.0, p.t_us - t0)}, {"args", {{"sm_mhz", p.sm_mhz}}}});
  }
  json out = {{"traceEvents", ev},
              {"metadata", {{"source", "measured"}, {"budget_bytes", plan.budget_bytes}, {"step_s", step_s}, {"tokens_per_s", tokens_per_s},
                            {"gpus", ir::world_size(plan)}, {"peak_bytes", peaks}, {"peak_allocated_bytes", allocs}}}};
  mmoc::write_file_atomic(path, out.dump());
}

int worker_body(const Args& a, const std::string& device_hint);

// A worker on CUDA that fails must not unwind: destroying its streams, NCCL communicators and optimizer thread would
// wait for GPU work that waits for the peers, so it hangs instead of reporting. It prints the error and leaves at
// once; the launcher (or torchrun) ends the other ranks.
int worker_main(const Args& a) {
  const std::string dev = std::getenv("MMOC_DEVICE") ? std::getenv("MMOC_DEVICE") : a.device;
  return worker_body(a, dev);
}

[[noreturn]] void worker_die(const std::exception& e) {
  int code = 3;
  if (dynamic_cast<const UsageError*>(&e) || dynamic_cast<const data::DataError*>(&e) || dynamic_cast<const io::FormatError*>(&e) ||
      dynamic_cast<const ir::ParseError*>(&e) || dynamic_cast<const comm::ConfigError*>(&e) ||
      dynamic_cast<const tier::SetupError*>(&e))
    code = 2;
  comm::exit_rank("mmoc-run", code, e.what());  // publishes the failure to the other ranks, one stderr line, _Exit
}

int worker_body(const Args& a, const std::string& device_hint) {
  const auto t_start = Clock::now();
  comm::WorldInfo w = comm::world_from_env();
  ir::Plan plan = ir::load_plan_file(a.plan);
  if (w.world_size != ir::world_size(plan))
    throw UsageError("WORLD_SIZE=" + std::to_string(w.world_size) + " but the plan has " + std::to_string(ir::world_size(plan)) + " ranks");
  std::string device = resolve_device(device_hint, plan, true);
  at::set_num_threads(std::max(1, (int)std::thread::hardware_concurrency() / std::max(1, ir::world_size(plan))));
  WorkerOptions wo;
  wo.device = device;
  // rank r on the plan's GPU for it (cross-map: tensor-parallel groups on the best-connected GPUs)
  std::vector<int> plan_gpus;
  for (int r = 0; r < ir::world_size(plan); ++r) plan_gpus.push_back(ir::physical_gpu(plan, r));
  wo.cuda_device = device == "cuda" ? comm::cuda_device_for(w, cuda_devices(), plan_gpus) : -1;
  if (a.launch.rdzv_timeout_s > 0) w.rdzv_timeout_s = a.launch.rdzv_timeout_s;
  if (a.launch.fail_timeout_s > 0) w.fail_timeout_s = a.launch.fail_timeout_s;
  wo.optim_threads = a.optim_threads;
  wo.prefetch_pool = a.prefetch_pool;
  wo.trace = !a.trace.empty();
  for (size_t b = 0; !a.nvme.empty();) {  // --nvme A,B
    const size_t c = a.nvme.find(',', b);
    wo.nvme.push_back(a.nvme.substr(b, c == std::string::npos ? std::string::npos : c - b));
    if (c == std::string::npos) break;
    b = c + 1;
  }
  const double start_s = since(t_start);  // process start: libraries, plan
  Worker worker(plan, w.rank, nullptr, wo);  // CUDA context, streams, host memory of the training state
  const double worker_s = since(t_start) - start_s;
  std::shared_ptr<comm::Rendezvous> rdzv;
  std::unique_ptr<comm::JobMonitor> monitor;  // ends this process when another rank or node fails
  std::unique_ptr<comm::Transport> tr;
  try {
  if (w.world_size > 1) {
    rdzv = comm::Rendezvous::connect(w, std::chrono::milliseconds((int64_t)(w.rdzv_timeout_s * 1000)));
    monitor = comm::JobMonitor::start(rdzv);
    if (device == "cuda") {
      // NCCL: send/recv on the worker's p2p stream; host-side collectives (gradient norm, loss, barriers) on the
      // transport's separate collective communicator
      comm::NcclOptions no;
      no.device = worker.device_index();
      no.p2p_stream = static_cast<CUstream_st*>(worker.p2p_stream());
      tr = comm::make_nccl_transport(rdzv, no);
    } else {
      tr = comm::make_gloo_transport(rdzv);
    }
    worker.set_transports(tr.get(), tr.get());
    if (device == "cuda") {
      // open every NCCL connection the plan uses now (one tiny exchange with each peer, all in one group), so that
      // its buffers exist before the allocator's cap is set and no connection is made in the middle of a step
      std::set<int> peers;
      const ir::RankCoord me = ir::rank_coord(plan, w.rank);
      for (const auto& in : plan.programs[me.pipe].instrs)
        if (in.op == ir::Op::Send || in.op == ir::Op::Recv) peers.insert(ir::world_rank(plan, in.peer, me.replica, me.shard));
      if (!peers.empty()) {
        auto o = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, worker.device_index());
        std::vector<at::Tensor> out(peers.size()), in(peers.size());
        std::vector<comm::P2POp> ops;
        size_t k = 0;
        for (int p : peers) {
          out[k] = at::full({1}, float(w.rank), o);
          in[k] = at::empty({1}, o);
          ops.push_back({comm::P2POp::kSend, &out[k], p, "warmup"});
          ops.push_back({comm::P2POp::kRecv, &in[k], p, "warmup"});
          ++k;
        }
        tr->batch_isend_irecv(ops)->wait();
        k = 0;
        for (int p : peers)
          if (in[k++].item<float>() != float(p)) throw std::runtime_error("NCCL warm-up exchange with rank " + std::to_string(p) + " returned wrong data");
      }
    }
  }
  const int64_t outside = worker.apply_budget();
  if (w.rank == 0 && !a.quiet && device == "cuda")
    std::cout << "rank 0: " << (outside >> 20) << " MiB of GPU memory held outside the allocator (CUDA context, NCCL); allocator capped at "
              << (plan.budget_bytes > 0 ? std::to_string((plan.budget_bytes - outside) >> 20) + " MiB" : std::string("no limit")) << "\n" << std::flush;
  const double comm_s = since(t_start) - start_s - worker_s;  // rendezvous, transports, NCCL warm-up, budget
  auto rows = data::open_rows(data_config(a, plan));
  data::BatchIterator it(rows, a.data_seed);
  // one value of every rank, on every rank; and reductions of it
  auto per_rank = [&](double v) {
    std::vector<double> out(ir::world_size(plan), 0.0);
    if (!tr) { out[0] = v; return out; }
    for (int g = 0; g < ir::world_size(plan); ++g) out[g] = tr->allreduce_sum_double(g == w.rank ? v : 0.0);
    return out;
  };
  auto max_over_ranks = [&](double v) { auto a = per_rank(v); return *std::max_element(a.begin(), a.end()); };
  auto sum_over_ranks = [&](double v) { return tr ? tr->allreduce_sum_double(v) : v; };
  // this process's peak resident set so far (bytes): the host memory the plan's host_bytes predicts
  auto peak_rss = [] {
    struct rusage ru {};
    return getrusage(RUSAGE_SELF, &ru) == 0 ? double(ru.ru_maxrss) * 1024.0 : 0.0;
  };
  // per world rank: its pipeline rank's prediction (the replicas of a pipeline rank hold the same)
  std::vector<double> host_predicted(ir::world_size(plan), 0.0);
  for (int g = 0; g < ir::world_size(plan); ++g) {
    const int pipe = ir::rank_coord(plan, g).pipe;
    if (pipe < (int)plan.host_bytes.size()) host_predicted[g] = (double)plan.host_bytes[pipe];
  }
  const double setup_s = max_over_ranks(since(t_start));  // process start to here: CUDA, transports, host memory, data
  // ---- weights: random, an HF checkpoint, or an mmoc checkpoint to resume --------------------------------------
  int64_t start = 0;
  const auto t_weights = Clock::now();
  LoadReport load;
  std::string source = a.init;
  if (!a.resume.empty()) {
    std::ifstream f(a.resume + "/mmoc_state/trainer_state.json");
    json st = json::parse(f);
    start = st.at("step").get<int64_t>();
    it.restore(data::iterator_state_from_json(st.at("data")));
    load = worker.load_checkpoint(a.resume);
    source = "from " + a.resume;
  } else if (a.init == "random") {
    load = worker.init_random(a.seed);
  } else {
    load = worker.load_hf(a.init);
  }
  // every rank's figures: the slowest rank decides, bytes add up
  const double weights_s = max_over_ranks(since(t_weights)), read_s = max_over_ranks(load.read_seconds);
  const double load_bytes = sum_over_ranks((double)load.bytes);
  const double ready_s = max_over_ranks(since(t_start)), launch_ready_s = max_over_ranks(since_launch());
  // the parts of the set-up (the slowest rank's)
  const double start_max = max_over_ranks(start_s), worker_max = max_over_ranks(worker_s), comm_max = max_over_ranks(comm_s);
  json ready_fields = {{"ready_s", ready_s}, {"setup_s", setup_s}, {"setup_start_s", start_max}, {"setup_state_s", worker_max},
                       {"setup_comm_s", comm_max}};
  if (launch_ready_s >= 0) ready_fields["launch_ready_s"] = launch_ready_s;
  ready_fields[a.resume.empty() && a.init == "random" ? "init_s" : "load_s"] = weights_s;
  if (load_bytes > 0) {
    ready_fields["load_bytes"] = load_bytes;
    ready_fields["load_read_s"] = read_s;
  }
  if (w.rank == 0 && !a.quiet) {
    char buf[512];
    std::string detail;
    if (load_bytes > 0) {
      std::snprintf(buf, sizeof buf, "; read %.2f GB in %.1f s, %.2f GB/s", load_bytes / 1e9, read_s, load_bytes / 1e9 / std::max(read_s, 1e-9));
      detail = buf;
    }
    std::snprintf(buf, sizeof buf, "rank 0: ready after %.1f s%s (set-up %.1f s: start %.1f, device and host state %.1f, transports %.1f; weights %s: %.1f s%s)\n",
                  ready_s, launch_ready_s >= 0 ? (", " + fmt1(launch_ready_s) + " s after launch").c_str() : "", setup_s, start_max, worker_max,
                  comm_max, source.c_str(), weights_s, detail.c_str());
    std::cout << buf << std::flush;
  }
  std::ofstream metrics;
  if (w.rank == 0 && !a.metrics.empty()) {
    metrics.open(a.metrics, start > 0 ? std::ios::app : std::ios::trunc);
    if (!metrics) throw UsageError("--metrics " + a.metrics + ": cannot write");
  }
  const int64_t tokens_per_step = (int64_t)plan.microbatches * plan.dp * plan.micro_batch_size * plan.seq_len;
  // MFU and HFU: the plan's FLOPs per step (model: no recompute; hardware: with the plan's recompute) per second over
  // the GPUs' peak bf16 rate
  std::string peak_note;
  const double peak_tflops = peak_bf16_tflops(a, plan, &peak_note);
  const StepFlops step_fl = step_flops(plan);
  const int flop_gpus = ir::world_size(plan);  // every rank of pp x dp x tp
  if (w.rank == 0 && !a.quiet && !peak_note.empty()) std::cout << peak_note << "\n" << std::flush;

  // ---- checkpoints: every rank writes its stages into <save>.staging, rank 0 completes and swaps it in ----------
  const bool bf16_weights = a.save_dtype == "bf16";
  struct PendingSave {
    int64_t step = 0;
    std::string trainer_state;
    Clock::time_point t0;
    bool background = false;
    std::future<void> meta;  // rank 0: the small files
  };
  std::optional<PendingSave> pending;
  auto begin_save = [&](int64_t step_done, bool background) {
    const std::string staging = staging_dir(a.save);
    if (w.rank == 0) {
      clear_save_leftovers(a.save);  // what a crashed save left: its staging folder, a previous checkpoint set aside
      io::make_dirs(staging + "/mmoc_state");
    }
    if (tr) tr->barrier();
    json st = {{"step", step_done}, {"data", data::to_json(it.state())}, {"seed", a.seed}, {"plan", io::real_path(a.plan)},
               {"weights_dtype", a.save_dtype}};
    pending = PendingSave{step_done, st.dump(1), Clock::now(), background, {}};
    // rank 0 writes the small files (config, index, trainer state, plan) on a thread while the large ones are written
    if (w.rank == 0)
      pending->meta = std::async(std::launch::async, [&plan, staging, wdt = bf16_weights ? at::kBFloat16 : at::kFloat, ts = pending->trainer_state] {
        write_checkpoint_meta(plan, staging, wdt, ts);
      });
    worker.begin_save(staging, bf16_weights, background);
  };
  // waits for every rank's part, then rank 0 swaps the checkpoint in; returns the save's metrics
  auto finish_save = [&]() {
    const SaveReport r = worker.finish_save();  // this rank's files are written and fsynced (or it throws)
    if (pending->meta.valid()) pending->meta.get();
    const double bytes = sum_over_ranks((double)r.bytes), write_s = max_over_ranks(r.seconds), wait_s = max_over_ranks(r.optimizer_wait_s);
    // rank 0 completes the folder (fsyncs) and swaps it in; the previous one is removed in the background
    const auto tf = Clock::now();
    if (w.rank == 0) commit_checkpoint(staging_dir(a.save), a.save);
    const double finalize_s = since(tf);
    if (tr) tr->barrier();
    const double total_s = since(pending->t0);
    json m = {{"save_step", pending->step}, {"save_s", total_s}, {"save_write_s", write_s}, {"save_bytes", bytes},
              {"save_background", pending->background}};
    if (w.rank == 0) m["save_finalize_s"] = finalize_s;
    if (pending->background) m["save_optimizer_wait_s"] = wait_s;
    if (w.rank == 0 && !a.quiet) {
      char buf[512];
      std::snprintf(buf, sizeof buf, "saved checkpoint %s (step %lld) in %.1f s: %.2f GB written at %.2f GB/s (writing %.1f s, completing %.1f s)%s\n",
                    a.save.c_str(), (long long)pending->step, total_s, bytes / 1e9, bytes / 1e9 / std::max(write_s, 1e-9), write_s, finalize_s,
                    pending->background ? (" in the background; optimizer steps waited " + fmt1(wait_s) + " s for it").c_str() : "");
      std::cout << buf << std::flush;
    }
    pending.reset();
    return m;
  };

  // ---- non-finite steps ------------------------------------------------------------------------------------------
  const std::string on_nonfinite = nonfinite_mode(a, plan);
  int64_t skipped_total = 0, skipped_run = 0;  // skipped steps: in all, and in a row up to now
  // what a non-finite step means: nothing (finite), a skip (skip mode; nothing was updated), or the end of the run
  auto verdict = [&](const StepResult& r, int64_t s) -> std::string {
    if (r.finite) {
      skipped_run = 0;
      return "";
    }
    auto num = [](double v) { return std::isnan(v) ? std::string("nan") : std::to_string(v); };
    std::string what = "step " + std::to_string(s + 1) + ": non-finite ";
    if (!std::isfinite(r.loss)) what += "loss (" + num(r.loss) + ")";
    if (!std::isfinite(r.grad_norm)) what += std::string(std::isfinite(r.loss) ? "" : " and ") + "gradient norm (" + num(r.grad_norm) + ")";
    if (on_nonfinite == "skip" && r.skipped) {
      ++skipped_total;
      if (++skipped_run < a.max_skips) return "";
      return what + "; " + std::to_string(skipped_run) + " steps in a row skipped (--max-skips " + std::to_string(a.max_skips) +
             "): stopping, no checkpoint of these steps written";
    }
    return what + ": stopping, no checkpoint of it written (--on-nonfinite skip skips such steps)";
  };

  // --trace on a GPU: the SM clock every 2 ms through the steps (NVML; none without it), in the trace as a counter, so
  // a layer in the step can be set against the layer alone at the clock each ran at (bench/layer_overhead.py)
  std::unique_ptr<ClockSampler> clock;
  if (!a.trace.empty() && device == "cuda") {
    char bus[32] = {0};
    if (cudaDeviceGetPCIBusId(bus, sizeof bus, wo.cuda_device >= 0 ? wo.cuda_device : 0) == cudaSuccess)
      clock = std::make_unique<ClockSampler>(bus, 2000.0);
  }
  double total_s = 0;
  StepResult last;
  std::vector<double> last_peaks(ir::world_size(plan), 0.0), last_allocs(ir::world_size(plan), 0.0);
  for (int64_t s = start; s < a.steps; ++s) {
    data::StepBatch b = it.next_step(plan.microbatches * plan.dp, plan.micro_batch_size);  // the global batch: every replica's rows
    StepResult r = worker.step(b, s);
    last = r;
    total_s += r.seconds;
    const std::vector<double> peaks = per_rank((double)r.peak_bytes);
    const std::vector<double> allocs = per_rank((double)r.peak_allocated);
    const std::vector<double> outside = per_rank((double)r.outside_bytes);
    const std::vector<double> rss = per_rank(peak_rss());
    std::vector<double> tier_rb, tier_wb, tier_rs, tier_ws;
    if (!plan.nvme.empty()) {
      tier_rb = per_rank((double)r.tier_read_bytes);
      tier_wb = per_rank((double)r.tier_write_bytes);
      tier_rs = per_rank(r.tier_read_s);
      tier_ws = per_rank(r.tier_write_s);
    }
    last_peaks = peaks;
    last_allocs = allocs;
    const bool skipped = !r.finite && r.skipped && on_nonfinite == "skip";
    const std::string stop = verdict(r, s);
    // a background save of an earlier step is complete once every stage's update waited for it: finish it here
    // (also before a stop: it holds a finite step)
    json save_fields;
    if (pending && pending->background) save_fields = finish_save();
    const bool final_save = !a.save.empty() && s + 1 == a.steps && stop.empty();
    json m;
    if (w.rank == 0) {
      const double tps = tokens_per_step / std::max(r.seconds, 1e-9);
      const double mfu = flops_utilization(step_fl.model, r.seconds, flop_gpus, peak_tflops);
      const double hfu = flops_utilization(step_fl.hardware, r.seconds, flop_gpus, peak_tflops);
      const double eta = (a.steps - s - 1) * (total_s / double(s - start + 1));
      if (!a.quiet) {
        std::ostringstream os;
        char buf[256];
        std::snprintf(buf, sizeof buf, "step %lld/%d  loss %.6f  tokens/s %.0f  step %.3f s  lr %.3g  grad-norm %.4f", (long long)s + 1, a.steps,
                      r.loss, tps, r.seconds, r.lr, std::fabs(r.grad_norm));  // fabs: "nan", not "-nan"
        os << buf;
        if (skipped) os << "  SKIPPED (non-finite)";
        if (skipped_total > 0) os << "  skipped " << skipped_total;
        const bool small = *std::max_element(peaks.begin(), peaks.end()) < 1024.0 * 1024 * 1024;
        os << (small ? "  peak MiB" : "  peak GiB");
        for (int g = 0; g < ir::world_size(plan); ++g) {
          if (small) { std::snprintf(buf, sizeof buf, "%.1f", peaks[g] / (1024.0 * 1024)); os << (g ? "," : " ") << buf; }
          else { std::snprintf(buf, sizeof buf, "%.2f", peaks[g] / mmoc::GiB); os << (g ? "," : " ") << buf; }
        }
        if (device == "cuda") {
          os << "  allocated";
          for (int g = 0; g < ir::world_size(plan); ++g) {
            std::snprintf(buf, sizeof buf, "%.2f", allocs[g] / mmoc::GiB);
            os << (g ? "," : " ") << (small ? std::to_string((int64_t)allocs[g] >> 20) : std::string(buf));
          }
        }
        std::snprintf(buf, sizeof buf, "  MFU %.1f%%  HFU %.1f%%  ETA %.0f s", 100 * mfu, 100 * hfu, eta);
        os << buf;
        std::cout << os.str() << "\n" << std::flush;
      }
      m = {{"step", s + 1}, {"loss", r.loss}, {"tokens", r.tokens}, {"tokens_per_s", tps}, {"step_s", r.seconds},
           {"lr", r.lr}, {"peak_bytes", peaks}, {"peak_allocated_bytes", allocs}, {"mfu", mfu}, {"hfu", hfu},
           {"model_flops", step_fl.model}, {"hardware_flops", step_fl.hardware}, {"peak_tflops", peak_tflops}};
      if (device == "cuda") {  // everything the process held on each GPU at its peak: allocator + context + NCCL
        std::vector<double> dev(ir::world_size(plan));
        for (int g = 0; g < ir::world_size(plan); ++g) dev[g] = peaks[g] + outside[g];
        m["device_peak_bytes"] = dev;
        m["alloc_retries"] = per_rank((double)r.alloc_retries);  // the allocator at its cap: released its cache and retried
      }
      m["host_peak_rss_bytes"] = rss;  // per rank, peak so far
      if (!plan.host_bytes.empty()) m["host_predicted_bytes"] = host_predicted;
      m["grad_norm"] = r.grad_norm;  // NaN and inf are written as null
      if (!plan.nvme.empty()) {  // NVMe tier: this step's traffic and time per rank
        m["tier_read_bytes"] = tier_rb;
        m["tier_write_bytes"] = tier_wb;
        m["tier_read_s"] = tier_rs;
        m["tier_write_s"] = tier_ws;
      }
      if (!r.finite) m["nonfinite"] = true;
      if (skipped) m["skipped"] = true;
      if (skipped_total > 0) m["skipped_steps"] = skipped_total;
      if (s == start) m.update(ready_fields);
      if (!save_fields.is_null()) m.update(save_fields);
    }
    if (!final_save && metrics) metrics << m.dump() << "\n" << std::flush;  // the last line waits for the final save
    if (!stop.empty()) throw Diverged(stop);
    if (final_save) {
      begin_save(a.steps, /*background=*/false);
      if (w.rank == 0) m.update(finish_save());
      else finish_save();
      if (metrics) metrics << m.dump() << "\n" << std::flush;
    } else if (!a.save.empty() && a.save_every > 0 && (s + 1) % a.save_every == 0) {
      begin_save(s + 1, /*background=*/true);
    }
  }
  if (pending) finish_save();                                                  // none after the last step, but be sure
  if (!a.save.empty() && start >= a.steps) { begin_save(start, false); finish_save(); }  // nothing to run: save as is
  {  // host memory: each rank's peak resident set against the plan's prediction (cost/host_memory.hpp)
    const std::vector<double> rss = per_rank(peak_rss());
    if (w.rank == 0 && !a.quiet) {
      std::ostringstream os;
      os << "host memory: peak resident set per rank";
      for (int g = 0; g < ir::world_size(plan); ++g) {
        os << (g ? ", " : " ") << "g" << g << " " << mmoc::gib(rss[g]);
        if (host_predicted[g] > 0) {
          char buf[96];
          std::snprintf(buf, sizeof buf, " (plan predicts %s, %+.1f%%)", mmoc::gib(host_predicted[g]).c_str(),
                        100.0 * (rss[g] - host_predicted[g]) / host_predicted[g]);
          os << buf;
        }
      }
      if (plan.host_bytes.empty()) os << " (the plan predicts none: compiled before host-memory predictions)";
      std::cout << os.str() << "\n" << std::flush;
    }
  }
  if (!a.trace.empty()) {
    const std::string part = a.trace + ".rank" + std::to_string(w.rank) + ".json";
    // keep the last step only: that is the steady state; the last step's body (a plan of the alternating update order
    // has two)
    const ir::Plan body = ir::step_body(plan, (int)((std::max<int64_t>(a.steps, 1) - 1) % 2));
    {
      const auto& all = worker.trace();
      const size_t n = body.programs[ir::rank_coord(plan, w.rank).pipe].instrs.size();
      json ev = json::array(), ck = json::array();
      double t_lo = 1e300, t_hi = -1e300;
      for (size_t k = all.size() >= n ? all.size() - n : 0; k < all.size(); ++k) {
        const auto& e = all[k];
        ev.push_back({e.instr, e.lane, e.start_us, e.dur_us, e.bytes});
        t_lo = std::min(t_lo, e.start_us);
        t_hi = std::max(t_hi, e.start_us + e.dur_us);
      }
      if (clock)  // the readings through the last step, and the one before it (the clock its first instruction ran at)
        for (const auto& p : clock->points(t_lo, t_hi)) ck.push_back({p.t_us, p.sm_mhz});
      clock.reset();
      mmoc::write_file_atomic(part, json{{"events", ev}, {"clock", ck}}.dump());
    }
    if (tr) tr->barrier();
    if (w.rank == 0) {
      std::vector<std::vector<TraceEvent>> all(ir::world_size(plan));
      std::vector<std::vector<ClockPoint>> clocks(ir::world_size(plan));
      for (int g = 0; g < ir::world_size(plan); ++g) {
        std::ifstream f(a.trace + ".rank" + std::to_string(g) + ".json");
        const json j = json::parse(f);
        for (const auto& e : j.at("events"))
          all[g].push_back({e[0].get<int>(), e[1].get<int>(), e[2].get<double>(), e[3].get<double>(), e[4].get<int64_t>()});
        for (const auto& p : j.at("clock")) clocks[g].push_back({p[0].get<double>(), p[1].get<unsigned>()});
      }
      write_trace(a.trace, body, all, clocks, last.seconds, tokens_per_step / std::max(last.seconds, 1e-9), last_peaks, last_allocs);
      for (int g = 0; g < ir::world_size(plan); ++g) io::remove_tree(a.trace + ".rank" + std::to_string(g) + ".json");
    }
    if (tr) tr->barrier();
  }
  if (monitor) monitor->finish();
  wait_checkpoint_cleanup();  // the previous checkpoint's removal (rank 0), off the saves' critical path
  return 0;
  } catch (const Diverged& e) {
    // every rank is here at the same step: rank 0 says it once, the others leave after it has
    if (w.rank == 0) {
      std::fprintf(stderr, "mmoc-run: error: %s\n", e.what());
      std::fflush(stderr);
    }
    std::fflush(stdout);
    if (tr) tr->barrier();
    if (monitor) monitor->finish();  // an agreed end: no rank's leaving reads as a failure to the others
    wait_checkpoint_cleanup();
    if (device == "cuda") std::_Exit(kExitDiverged);
    throw;
  } catch (const std::exception& e) {
    if (device == "cuda" || w.world_size > 1) worker_die(e);
    throw;
  }
}
}  // namespace

int run_main(int argc, char** argv) {
  const int64_t launch_us = wall_us();
  CLI::App app{"mmoc-run: execute a Plan (train)"};
  Args a;
  app.add_option("plan", a.plan, "plan file (JSON or text) from mmoc-compile")->required();
  app.add_option("--data", a.data, "training data: JSONL of {input_ids,labels}, {document,summary} or {text}, or a token file "
                                   "from tools/prepare/prepare_data.py (memory-mapped)")->required();
  app.add_option("--tokenizer", a.tokenizer, "SentencePiece tokenizer.model for raw-text records");
  app.add_option("--steps", a.steps, "training steps (total, counting resumed ones)");
  app.add_option("--init", a.init, "random, or an HF checkpoint folder to start from");
  app.add_option("--seed", a.seed, "seed of the random init");
  app.add_option("--data-seed", a.data_seed, "seed of the data shuffle");
  app.add_option("--fit", a.fit, "pad or pack examples to the plan's sequence length (default: pad; a token file's own mode)");
  app.add_option("--save", a.save, "write the final checkpoint (HF safetensors + optimizer state) here");
  app.add_option("--save-every", a.save_every, "also save every K steps");
  app.add_option("--save-dtype", a.save_dtype, "fp32 (exact resume) or bf16 weights");
  app.add_option("--resume", a.resume, "continue from an mmoc checkpoint folder");
  app.add_option("--metrics", a.metrics, "write one JSON line of metrics per step");
  app.add_option("--trace", a.trace, "write the measured timeline of the last step (Chrome/Perfetto JSON)");
  app.add_option("--device", a.device, "auto, cpu or cuda");
  app.add_option("--hardware", a.hardware, "hardware name or file whose peak_bf16_tflops MFU/HFU divide by (default: the plan's)");
  app.add_option("--nvme", a.nvme, "NVMe tier directories instead of the plan's (comma-separated, as many as the plan names)");
  app.add_option("--optim-threads", a.optim_threads, "CPU optimizer threads per rank (0: cores / ranks)");
  app.add_option("--prefetch-pool", a.prefetch_pool,
                 "CUDA: the caching allocator's pool of prefetched weights: h2d (the copy stream's; default) or comp (the compute "
                 "stream's, shared with every other large buffer; the copy waits for the compute work queued before it)")
      ->check(CLI::IsMember({"h2d", "comp"}));
  app.add_option("--on-nonfinite", a.on_nonfinite,
                 "stop (exit 4, no checkpoint of the step) or skip (no update; needs a plan compiled with --on-nonfinite skip "
                 "or clipping) when a step's loss or gradient norm is not finite; default: the plan's train.on_nonfinite");
  app.add_option("--max-skips", a.max_skips, "with --on-nonfinite skip: stop (exit 4) after this many skipped steps in a row");
  app.add_flag("-q,--quiet", a.quiet, "no progress lines");
  // several nodes without torchrun: the same command on every node, with its --node-rank (README "Multi-node")
  app.add_option("--nnodes", a.launch.nnodes, "nodes of the job (this node runs its share of the plan's ranks)");
  app.add_option("--node-rank", a.launch.node_rank, "this node's index in [0, nnodes); node 0 hosts the rendezvous");
  app.add_option("--nproc-per-node", a.launch.nproc_per_node, "ranks per node (default: the plan's ranks / nnodes)");
  app.add_option("--master-addr", a.launch.master_addr, "address of node 0, the same on every node");
  app.add_option("--master-port", a.launch.master_port, "TCP port of the rendezvous on node 0 (default 29500)");
  app.add_option("--rdzv-timeout", a.launch.rdzv_timeout_s, "seconds the ranks wait for each other at the start (default 300)")
      ->check(CLI::PositiveNumber);
  app.add_option("--fail-timeout", a.launch.fail_timeout_s, "seconds a silent rank or lost rendezvous is tolerated (default 30)")
      ->check(CLI::PositiveNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "mmoc-run: " << e.what() << "\n";
    return 2;
  }
  const bool is_worker = comm::is_rank_process(comm::comm_env());
  try {
    if (is_worker) return worker_main(a);
    ir::Plan p = validate(a);
    const comm::NodeLaunch node = comm::resolve_node_launch(a.launch, ir::world_size(p), comm::comm_env());
    std::string device = resolve_device(a.device, p, false, node.nproc_per_node);
    // parse the data once up front: a malformed line is reported before any worker starts
    check_resume_data(a, data::open_rows(data_config(a, p)));
    if (!a.quiet)
      std::cout << "mmoc-run: " << p.model.name << ", " << ir::world_size(p) << " rank(s) on " << device << ", schedule " << p.schedule
                << ", v=" << p.v << ", " << p.microbatches * p.dp << " x " << p.micro_batch_size << " x " << p.seq_len << " tokens per step"
                << (node.nnodes > 1 ? "; node " + std::to_string(node.node_rank) + " of " + std::to_string(node.nnodes) + " runs ranks " +
                                          std::to_string(node.first_rank()) + "-" + std::to_string(node.first_rank() + node.nproc_per_node - 1) +
                                          " (rendezvous " + node.master_addr + ":" + std::to_string(node.master_port) + ")"
                                    : std::string())
                << "\n" << std::flush;
    std::vector<std::string> argv_v(argv, argv + argc);
    comm::LaunchReport rep;
    std::vector<std::pair<std::string, std::string>> env{{"MMOC_DEVICE", device}, {"MMOC_LAUNCH_T0_US", std::to_string(launch_us)}};
    // Near the budget, the caching allocator's fixed-size segments fragment (GiBs reserved but unusable); growable
    // segments do not. The user's own PYTORCH_CUDA_ALLOC_CONF wins.
    if (device == "cuda" && !std::getenv("PYTORCH_CUDA_ALLOC_CONF")) env.push_back({"PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"});
    comm::LaunchOptions lo;
    lo.print_failure = false;  // printed below, except for a divergence on one node (the worker said it in one line)
    int rc = comm::launch_node(node, argv_v, env, &rep, lo);
    if (rc != 0 && !(rc == kExitDiverged && node.nnodes == 1) && !rep.message.empty()) std::cerr << "mmoc-run: " << rep.message << "\n";
    // (each rank's peak resident set is printed by rank 0 at the end of the run, next to the plan's prediction)
    return rc == 0 ? 0 : rc == 2 ? 2 : rc == kExitDiverged ? kExitDiverged : 1;  // 2: a worker found bad input
  } catch (const UsageError& e) {
    std::cerr << "mmoc-run: error: " << e.what() << "\n";
    return 2;
  } catch (const Diverged&) {
    return kExitDiverged;  // rank 0 printed it
  } catch (const ir::ParseError& e) {
    std::cerr << "mmoc-run: error: " << e.what() << "\n";
    return 2;
  } catch (const data::DataError& e) {
    std::cerr << "mmoc-run: error: " << e.what() << "\n";
    return 2;
  } catch (const io::FormatError& e) {
    std::cerr << "mmoc-run: error: " << e.what() << "\n";
    return 2;
  } catch (const tier::SetupError& e) {  // the NVMe tier's paths: missing, unwritable, full (before training)
    std::cerr << "mmoc-run: " << (is_worker ? "worker " + std::string(std::getenv("RANK") ? std::getenv("RANK") : "?") + ": " : std::string())
              << "error: " << e.what() << "\n";
    return 2;
  } catch (const comm::ConfigError& e) {
    std::cerr << "mmoc-run: " << (is_worker ? "worker " + std::string(std::getenv("RANK") ? std::getenv("RANK") : "?") + ": " : std::string())
              << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "mmoc-run: " << (is_worker ? "worker " + std::string(std::getenv("RANK") ? std::getenv("RANK") : "?") + ": " : std::string())
              << "error: " << e.what() << "\n";
    return is_worker ? 3 : 1;
  }
}

}  // namespace mmoc::engine
