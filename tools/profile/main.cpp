// mmoc-profile: measures this machine into a hardware JSON that mmoc-compile reads (docs/profile.md).
//
//   mmoc-profile --base configs/hardware/h100x1.json --model llama2-7b --mbs 8 --seq 1024 -o hw.json
//                [--recompute] [--device cuda|cpu] [--quick] [--name NAME]
//
// Starts from the base hardware file and overwrites the fields it measures:
//   h2d_gbps, d2h_gbps, duplex_gbps   pinned copies of one large buffer (CUDA events; median after warm-up)
//   group_link_gbps                   = max(h2d, d2h) when every host group holds one GPU (else kept)
//   calibrated_ms                     embedding / decoder / head forward and backward at the job's shapes,
//                                     keys from calibration_key() exactly as compiler/cost.cpp looks them up
//   gpu_tflops                        decoder layer fwd+bwd FLOP rate / efficiency(tokens) (--tflops-from layer,
//                                     the default: the README's "achievable for large layers") or the bf16 matmul
//                                     rate (--tflops-from matmul) or kept (--tflops-from keep)
//   gpu_mem_gbps                      device-to-device copy, read+write (CPU mode: host memcpy)
//   gpu_mem_gib                       the device's total memory (CUDA only)
//   host_mem_gbps                     chosen so that CostModel::adam_ms(P, threads) equals the measured fused
//                                     CPU AdamW time (adam_bytes_per_param stays as in the base, 28)
//   cpu_cores, host_mem_gib           of this host
//   p2p_links                         on more than one GPU: each pair's cudaMemcpyPeerAsync bandwidth (the slower
//                                     direction), {"gpus": [a, b], "gbps", "kind": "peer" | "via-host"}
//   storage                           with --nvme PATH[,PATH...]: each path's direct-I/O write and read GB/s through
//                                     engine/tier (docs/nvme-tier.md); --storage-only measures only that (no --model)
// Exit codes: 0 done, 2 bad input (message on stderr), 3 anything else (e.g. out of memory).
//
// Configs are found and read by cost/spec.hpp, as mmoc-compile does (POSIX file helpers: no std::filesystem, which
// must not run in a binary linked with LibTorch).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sched.h>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "cost/spec.hpp"
#include "common/fs.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "engine/optim/adamw.hpp"
#include "engine/optim/thread_pool.hpp"
#include "engine/tier/measure.hpp"
#include "common/gpu_clock.hpp"
#include "ir/plan.hpp"

namespace {

using mmoc::InputError;
using ojson = nlohmann::ordered_json;
namespace eng = mmoc::engine;
namespace opt = mmoc::engine::optim;

constexpr double kMiB = 1024.0 * 1024.0;

// ---- host facts ----------------------------------------------------------------------------
int host_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}
double host_mem_gib() {
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? (double)pages * page / mmoc::GiB : 0;
}

// ---- timing -------------------------------------------------------------------------------
double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double round_sig(double x, int digits = 5) {
  if (x == 0 || !std::isfinite(x)) return x;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", digits, x);
  return std::strtod(buf, nullptr);
}

struct Ctx {
  bool cuda = false;
  bool quick = false;
  int warmup = 2, repeats = 5;
  double warm_s = 0;  // layers: untimed sustained run first, seconds (CUDA: the GPU's clock settles; measure_layer)
  int kernels = 0;  // --kernels N: the decoder layer's top N CUDA kernels (CUDA only)
  c10::Device dev = c10::Device(c10::kCPU);
  at::ScalarType dtype = at::kFloat;
};

// Wall time of fn on the host (CPU mode) or of the work fn queues on the current stream (CUDA).
class Stopwatch {
 public:
  explicit Stopwatch(bool cuda) : cuda_(cuda) {
    if (cuda_) { a_.emplace(cudaEventDefault); b_.emplace(cudaEventDefault); }
  }
  void start() {
    if (cuda_) a_->record(c10::cuda::getCurrentCUDAStream());
    else t0_ = std::chrono::steady_clock::now();
  }
  double stop_ms() {
    if (cuda_) {
      b_->record(c10::cuda::getCurrentCUDAStream());
      b_->synchronize();
      return a_->elapsed_time(*b_);
    }
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  bool cuda_;
  std::optional<at::cuda::CUDAEvent> a_, b_;
  std::chrono::steady_clock::time_point t0_;
};

double time_median(const Ctx& c, const std::function<void()>& fn, int warmup, int repeats) {
  Stopwatch sw(c.cuda);
  for (int i = 0; i < warmup; ++i) { fn(); }
  if (c.cuda) c10::cuda::device_synchronize();
  std::vector<double> ts;
  for (int i = 0; i < repeats; ++i) {
    sw.start();
    fn();
    ts.push_back(sw.stop_ms());
  }
  return median(ts);
}

// ---- (1) transfers ------------------------------------------------------------------------
struct Transfers { double h2d = 0, d2h = 0, duplex = 0, dev_copy = 0; int64_t bytes = 0; };

// ---- GPU-to-GPU links (more than one GPU) ----------------------------------------------------------
// One pair's bandwidth: cudaMemcpyPeerAsync of `n` bytes each way on a stream of the sending GPU, timed by CUDA events
// (median after warm-up); the pair's figure is the slower direction (p2p_links' gbps is per direction). "peer" when the
// two GPUs can address each other (NVLink or a PCIe peer path), "via-host" when the copy is staged through host memory.
struct PairLink { int a = 0, b = 0; double gbps = 0, ab = 0, ba = 0; std::string kind; };

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("GPU-to-GPU measurement: ") + what + ": " + cudaGetErrorString(e));
}

double peer_copy_gbps(const Ctx& c, int src, int dst, void* from, void* to, int64_t n) {
  cuda_ok(cudaSetDevice(src), "cudaSetDevice");
  cudaStream_t s = nullptr;
  cudaEvent_t a = nullptr, b = nullptr;
  cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  cuda_ok(cudaEventCreate(&a), "cudaEventCreate");
  cuda_ok(cudaEventCreate(&b), "cudaEventCreate");
  std::vector<double> ts;
  for (int i = 0; i < c.warmup + c.repeats; ++i) {
    cuda_ok(cudaEventRecord(a, s), "cudaEventRecord");
    cuda_ok(cudaMemcpyPeerAsync(to, dst, from, src, (size_t)n, s), "cudaMemcpyPeerAsync");
    cuda_ok(cudaEventRecord(b, s), "cudaEventRecord");
    cuda_ok(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    cuda_ok(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    if (i >= c.warmup) ts.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaStreamDestroy(s);
  const double t = median(ts);
  return t > 0 ? n / (t * 1e6) : 0;
}

// Every pair of the first `gpus` visible devices.
std::vector<PairLink> measure_p2p_links(const Ctx& c, int gpus, int64_t n) {
  std::vector<void*> buf(gpus, nullptr), buf2(gpus, nullptr);
  for (int d = 0; d < gpus; ++d) {
    cuda_ok(cudaSetDevice(d), "cudaSetDevice");
    cuda_ok(cudaMalloc(&buf[d], (size_t)n), "cudaMalloc");
    cuda_ok(cudaMalloc(&buf2[d], (size_t)n), "cudaMalloc");
    cuda_ok(cudaMemset(buf[d], d + 1, (size_t)n), "cudaMemset");
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  std::vector<PairLink> out;
  for (int a = 0; a < gpus; ++a)
    for (int b = a + 1; b < gpus; ++b) {
      int ab = 0, ba = 0;
      cuda_ok(cudaDeviceCanAccessPeer(&ab, a, b), "cudaDeviceCanAccessPeer");
      cuda_ok(cudaDeviceCanAccessPeer(&ba, b, a), "cudaDeviceCanAccessPeer");
      auto enable = [](int from, int to) {  // peer access for the pair (already enabled is fine)
        cuda_ok(cudaSetDevice(from), "cudaSetDevice");
        const cudaError_t e = cudaDeviceEnablePeerAccess(to, 0);
        if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
        else cuda_ok(e, "cudaDeviceEnablePeerAccess");
      };
      if (ab && ba) { enable(a, b); enable(b, a); }
      PairLink l;
      l.a = a;
      l.b = b;
      l.kind = ab && ba ? "peer" : "via-host";
      l.ab = peer_copy_gbps(c, a, b, buf[a], buf2[b], n);
      l.ba = peer_copy_gbps(c, b, a, buf[b], buf2[a], n);
      l.gbps = std::min(l.ab, l.ba);
      out.push_back(l);
      if (ab && ba) {  // leave the pair as it was found for the measurements after this one
        cudaSetDevice(a); cudaDeviceDisablePeerAccess(b);
        cudaSetDevice(b); cudaDeviceDisablePeerAccess(a);
        cudaGetLastError();
      }
    }
  for (int d = 0; d < gpus; ++d) {
    cudaSetDevice(d);
    cudaFree(buf[d]);
    cudaFree(buf2[d]);
  }
  cuda_ok(cudaSetDevice(0), "cudaSetDevice");
  return out;
}


Transfers measure_transfers_cuda(const Ctx& c, int64_t n) {
  Transfers r;
  r.bytes = n;
  auto pinned = at::TensorOptions().dtype(at::kByte).pinned_memory(true);
  auto devo = at::TensorOptions().dtype(at::kByte).device(c.dev);
  at::Tensor h1 = at::empty({n}, pinned), h2 = at::empty({n}, pinned);
  at::Tensor d1 = at::empty({n}, devo), d2 = at::empty({n}, devo);
  h1.fill_(1); h2.fill_(2); d1.fill_(3); d2.fill_(4);
  c10::cuda::device_synchronize();
  c10::cuda::CUDAStream s1 = c10::cuda::getStreamFromPool(), s2 = c10::cuda::getStreamFromPool();
  auto on_stream = [&](c10::cuda::CUDAStream s, const std::function<void()>& fn) {
    at::cuda::CUDAEvent a(cudaEventDefault), b(cudaEventDefault);
    std::vector<double> ts;
    for (int i = 0; i < c.warmup + c.repeats; ++i) {
      c10::cuda::CUDAStreamGuard g(s);
      a.record(s);
      fn();
      b.record(s);
      b.synchronize();
      if (i >= c.warmup) ts.push_back(a.elapsed_time(b));
    }
    return median(ts);
  };
  double t = on_stream(s1, [&] { d1.copy_(h1, /*non_blocking=*/true); });
  r.h2d = n / (t * 1e6);
  t = on_stream(s1, [&] { h1.copy_(d1, /*non_blocking=*/true); });
  r.d2h = n / (t * 1e6);
  {  // H2D on s1 and D2H on s2 at once; timed from an event both wait on to one that waits on both
    c10::cuda::CUDAStream s0 = c10::cuda::getStreamFromPool();
    at::cuda::CUDAEvent a(cudaEventDefault), b(cudaEventDefault);
    std::vector<double> ts;
    for (int i = 0; i < c.warmup + c.repeats; ++i) {
      at::cuda::CUDAEvent e1, e2;
      a.record(s0);
      a.block(s1);
      a.block(s2);
      { c10::cuda::CUDAStreamGuard g(s1); d1.copy_(h1, true); e1.record(s1); }
      { c10::cuda::CUDAStreamGuard g(s2); h2.copy_(d2, true); e2.record(s2); }
      e1.block(s0);
      e2.block(s0);
      b.record(s0);
      b.synchronize();
      if (i >= c.warmup) ts.push_back(a.elapsed_time(b));
    }
    r.duplex = 2.0 * n / (median(ts) * 1e6);
  }
  t = on_stream(s1, [&] { d2.copy_(d1, /*non_blocking=*/true); });
  r.dev_copy = 2.0 * n / (t * 1e6);  // read + write
  c10::cuda::device_synchronize();
  return r;
}

// CPU mode: one direction = one thread's memcpy (a DMA engine's stand-in), duplex = two threads at once.
Transfers measure_transfers_cpu(const Ctx& c, int64_t n) {
  Transfers r;
  r.bytes = n;
  std::vector<char> a(n, 1), b(n, 2), x(n, 3), y(n, 4);
  auto one = [&](char* dst, const char* src) {
    return time_median(c, [&] { std::memcpy(dst, src, n); }, c.warmup, c.repeats);
  };
  r.h2d = n / (one(b.data(), a.data()) * 1e6);
  r.d2h = n / (one(a.data(), b.data()) * 1e6);
  double t = time_median(c, [&] {
    std::thread t2([&] { std::memcpy(y.data(), x.data(), n); });
    std::memcpy(b.data(), a.data(), n);
    t2.join();
  }, c.warmup, c.repeats);
  r.duplex = 2.0 * n / (t * 1e6);
  return r;
}

// Multi-threaded host memcpy (mmoc's thread pool), GB/s of read+write traffic.
double measure_host_memcpy(const Ctx& c, opt::ThreadPool& pool, int64_t n) {
  std::unique_ptr<char[]> src(new char[n]), dst(new char[n]);
  const int64_t chunk = 1 << 20;
  pool.parallel_for(n, chunk, [&](int64_t b, int64_t e) {  // first touch by the threads that copy
    std::memset(src.get() + b, 1, e - b);
    std::memset(dst.get() + b, 0, e - b);
  });
  double t = time_median(Ctx{}, [&] {
    pool.parallel_for(n, chunk, [&](int64_t b, int64_t e) { std::memcpy(dst.get() + b, src.get() + b, e - b); });
  }, c.warmup, c.repeats);
  return 2.0 * n / (t * 1e6);
}

// ---- (2) layers ---------------------------------------------------------------------------
struct LayerTimes {
  double fwd = 0, bwd = 0;           // bwd: without recompute (what calibrated_ms holds)
  double fwd_nograd = -1, bwd_rc = -1;  // --recompute: forward under no_grad, and backward with recompute
  // NVML over the timed rounds (0: none): the SM clock's time-weighted mean, power's median, the maximum clock, the
  // power limit
  double sm_mhz = 0, power_w = 0, max_mhz = 0, power_limit_w = 0;
  unsigned long long clock_reasons = 0;  // NVML clock event reasons seen in the timed rounds (or-ed)
  double flops_fwd = 0, flops_bwd = 0;
};

void random_weights(const eng::StageLayout& lay, const at::Tensor& flat) {
  at::NoGradGuard ng;
  flat.zero_();
  for (const auto& p : lay.params) {
    auto seg = flat.narrow(0, p.offset, p.numel);
    if (p.kind == eng::ParamKind::Norm) seg.fill_(1.0);
    else seg.normal_(0.0, 0.02);
  }
}

// --kernels: fn run `repeats` times under the Kineto profiler (CUDA activity only); prints the kernels by time per
// call, grouped into GEMM, attention and the rest (elementwise, norms, copies): what a fused op would remove.
void kernel_table(const std::string& what, const std::function<void()>& fn, int repeats, int top) {
  namespace pi = torch::profiler::impl;
  namespace ap = torch::autograd::profiler;
  for (int i = 0; i < 2; ++i) fn();
  c10::cuda::device_synchronize();
  const pi::ProfilerConfig cfg(pi::ProfilerState::KINETO);
  const std::set<pi::ActivityType> acts{pi::ActivityType::CUDA};
  ap::prepareProfiler(cfg, acts);
  ap::enableProfiler(cfg, acts);
  for (int i = 0; i < repeats; ++i) fn();
  c10::cuda::device_synchronize();
  const auto res = ap::disableProfiler();
  std::map<std::string, std::pair<double, int>> per;  // name -> (ms per call, launches)
  for (const auto& e : res->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;
    auto& x = per[e.name()];
    x.first += (double)e.durationNs() / 1e6 / repeats;
    x.second += 1;
  }
  auto kind = [](std::string n) {
    for (auto& ch : n) ch = (char)std::tolower((unsigned char)ch);
    for (const char* g : {"gemm", "cutlass", "nvjet", "xmma", "cublas"})
      if (n.find(g) != std::string::npos) return "gemm";
    for (const char* g : {"flash", "fmha", "sdpa", "attention"})
      if (n.find(g) != std::string::npos) return "attention";
    return "other";
  };
  std::map<std::string, double> tot;
  double all = 0;
  for (const auto& [n, x] : per) { tot[kind(n)] += x.first; all += x.first; }
  std::vector<std::pair<std::string, std::pair<double, int>>> rows(per.begin(), per.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  std::printf("  kernels of the decoder %s: %.3f ms per call:", what.c_str(), all);
  for (const char* k : {"gemm", "attention", "other"}) std::printf(" %s %.3f ms (%.0f%%)", k, tot[k], all > 0 ? 100 * tot[k] / all : 0.0);
  std::printf("\n");
  for (int i = 0; i < (int)rows.size() && i < top; ++i)
    std::printf("    %7.3f ms x%-3d %-9s %.110s\n", rows[i].second.first, rows[i].second.second / repeats,
                kind(rows[i].first), rows[i].first.c_str());
  std::fflush(stdout);
}

// Marks on the current stream (CUDA events) or the host clock (CPU): the times between consecutive marks of one round,
// read after the round without synchronising inside it.
class Marks {
 public:
  Marks(bool cuda, int n) : cuda_(cuda) {
    if (cuda_) for (int i = 0; i < n; ++i) ev_.emplace_back(cudaEventDefault);
    host_.resize(n);
  }
  void mark(int i) {
    if (cuda_) ev_[i].record(c10::cuda::getCurrentCUDAStream());
    else host_[i] = std::chrono::steady_clock::now();
  }
  void wait(int i) { if (cuda_) ev_[i].synchronize(); }
  double ms(int a, int b) {
    if (cuda_) return ev_[a].elapsed_time(ev_[b]);
    return std::chrono::duration<double, std::milli>(host_[b] - host_[a]).count();
  }

 private:
  bool cuda_;
  std::vector<at::cuda::CUDAEvent> ev_;
  std::vector<std::chrono::steady_clock::time_point> host_;
};

// One layer as the engine runs it (engine/exec/handlers.cpp): stage_forward_layers with a FlatGradTarget that adds the
// weight gradient into one flat tensor in place (as a step's micro-batches after the first do), and the recompute in
// backward skipping the output value it never reads (output_unused; not for the head, whose output is the loss).
// Timed at the GPU's steady state: a GPU at its power limit clocks down within about a second of sustained load (one
// H200 at 700 W: 1980 MHz idle, 1400-1560 MHz through a training step; the 7B layer's no-grad forward 5.0 ms cold,
// 6.1 ms after 1.7 s of back-to-back forwards; docs/profile.md), so the layer runs
// untimed for c.warm_s seconds (and at least c.warmup rounds) first, then c.repeats rounds back to back, each timing
// forward and backward (and with --recompute the forward without autograd and the backward with recompute) between
// marks on the stream; the host waits for a round only while the next one is queued, so the GPU never idles between
// rounds (as in a step, where an idle gap also gives the power limit headroom and the clock rises). `sampler` (may be
// null) gives the SM clock over the timed rounds, time-weighted (as bench/layer_overhead.py weighs mmoc-run's clock
// counter over a pass in a step); its probe reads power and clock-limit reasons after each timed round.
LayerTimes measure_layer(const Ctx& c, const mmoc::ModelSpec& m, int kind, int mbs, int seq, bool recompute,
                         const mmoc::ClockSampler* sampler) {
  const mmoc::ir::ModelArch arch = m.arch();
  const int layer = kind == 0 ? 0 : kind == 1 ? 1 : m.layers + 1;
  eng::StageLayout lay = eng::stage_layout(arch, layer, layer + 1);
  auto o = at::TensorOptions().dtype(c.dtype).device(c.dev);
  at::Tensor w = eng::new_flat(lay, o);
  random_weights(lay, w);
  w.requires_grad_(true);
  eng::Rope rope = eng::make_rope(arch, seq, c.dev);
  at::Tensor tied;
  if (kind == 2 && eng::head_needs_embedding(arch)) {
    tied = at::randn({(int64_t)m.vocab, (int64_t)m.hidden}, o).mul_(0.02);
    tied.requires_grad_(true);
  }
  auto lo = at::TensorOptions().dtype(at::kLong).device(c.dev);
  at::Tensor ids = at::randint(0, m.vocab, {mbs, seq}, lo);
  at::Tensor labels = at::randint(0, m.vocab, {mbs, seq}, lo);
  at::Tensor hidden = at::randn({mbs, seq, (int64_t)m.hidden}, o);
  hidden.requires_grad_(true);
  at::Tensor in = kind == 0 ? ids : hidden;
  const double inv_count = 1.0 / std::max<int64_t>(1, (int64_t)mbs * (seq - 1));

  torch::autograd::variable_list inputs{w};
  if (kind > 0) inputs.push_back(hidden);
  if (tied.defined()) inputs.push_back(tied);

  auto target = c10::make_intrusive<eng::FlatGradTarget>();  // the weight gradient, accumulated in place
  auto fwd = [&](bool with_target, bool output_unused) -> at::Tensor {
    at::Tensor out = eng::stage_forward_layers(arch, lay, w, in, rope, layer, layer + 1, tied, false,
                                               with_target ? target : c10::intrusive_ptr<eng::FlatGradTarget>(), false,
                                               output_unused);
    return kind == 2 ? eng::lm_loss_sum(out, labels) : out;
  };
  at::Tensor gout;
  auto bwd = [&](const at::Tensor& y) {
    if (!gout.defined())
      gout = kind == 2 ? at::full({}, inv_count, y.options()) : at::randn(y.sizes(), y.options()).mul_(1e-3);
    auto g = torch::autograd::grad({y}, inputs, {gout}, /*retain_graph=*/false, /*create_graph=*/false,
                                   /*allow_unused=*/true);
    (void)g;
  };
  const bool rc_unused = kind != 2;
  auto fwd_nograd = [&] { at::NoGradGuard ng; return fwd(false, false); };

  LayerTimes r;
  r.flops_fwd = m.layer_fwd_flops(layer, mbs, seq);
  r.flops_bwd = m.layer_bwd_flops(layer, mbs, seq);
  // Rounds run back to back as a step's layers do: round i is issued while round i-1 runs, and read (its marks waited
  // on) only then, so the GPU never waits for the host between rounds. Each round has its own marks (two slots).
  constexpr int kMarks = 5;
  Marks mk(c.cuda, 2 * kMarks);
  std::vector<double> tf, tb, tn, trc;
  std::vector<double> watts;
  unsigned long long reasons = 0;
  auto issue = [&](int i) {
    const int o = (i % 2) * kMarks;
    mk.mark(o + 0);
    at::Tensor y = fwd(true, false);
    mk.mark(o + 1);
    bwd(y);
    y = at::Tensor();
    mk.mark(o + 2);
    if (recompute) {
      (void)fwd_nograd();
      mk.mark(o + 3);
      bwd(fwd(true, rc_unused));
      mk.mark(o + 4);
    }
  };
  auto finish = [&](int i, bool timed) {  // wait for round i; record it if timed
    const int o = (i % 2) * kMarks;
    mk.wait(o + (recompute ? 4 : 2));
    if (!timed) return;
    tf.push_back(mk.ms(o + 0, o + 1));
    tb.push_back(mk.ms(o + 1, o + 2));
    if (recompute) { tn.push_back(mk.ms(o + 2, o + 3)); trc.push_back(mk.ms(o + 3, o + 4)); }
    if (sampler) {
      const auto cs = sampler->clock().sample();
      if (cs.ok) { watts.push_back(cs.power_w); reasons |= cs.reasons; r.max_mhz = cs.max_sm_mhz; r.power_limit_w = cs.power_limit_w; }
    }
  };
  const auto t0 = std::chrono::steady_clock::now();
  int i = 0, first_timed = -1;
  double timed_from = 0;
  for (;; ++i) {
    issue(i);
    if (i > 0) finish(i - 1, first_timed >= 0 && i - 1 >= first_timed);
    if (i == first_timed) timed_from = mmoc::steady_us();  // its predecessor is done: the first timed round runs now
    if (first_timed >= 0 && i + 1 - first_timed >= c.repeats) break;  // the last timed round is issued
    if (first_timed < 0 && i + 1 >= c.warmup &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() >= c.warm_s)
      first_timed = i + 1;
  }
  finish(i, true);
  const double timed_to = mmoc::steady_us();
  r.fwd = median(tf);
  r.bwd = median(tb);
  if (recompute) { r.fwd_nograd = median(tn); r.bwd_rc = median(trc); }
  if (!watts.empty()) {
    r.sm_mhz = mmoc::mean_mhz(sampler->points(timed_from, timed_to), timed_from, timed_to);
    r.power_w = median(watts);
    r.clock_reasons = reasons;
  }
  if (c.kernels > 0 && c.cuda && kind == 1) {
    kernel_table("forward (no grad)", [&] { (void)fwd_nograd(); }, c.repeats, c.kernels);
    kernel_table("forward+backward", [&] { bwd(fwd(true, false)); }, c.repeats, c.kernels);
  }
  return r;
}

// ---- (3) CPU AdamW ------------------------------------------------------------------------
struct AdamResult { double ms = 0; int64_t params = 0; int threads = 0; std::string isa; };

AdamResult measure_adam(const Ctx& c, opt::ThreadPool& pool, int64_t n) {
  AdamResult r;
  r.params = n;
  r.threads = pool.num_threads();
  r.isa = opt::adamw_isa();
  std::unique_ptr<float[]> p(new float[n]), mo(new float[n]), v(new float[n]);
  std::unique_ptr<uint16_t[]> g(new uint16_t[n]), out(new uint16_t[n]);
  pool.parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {  // first touch by the pool's threads
    for (int64_t i = b; i < e; ++i) {
      p[i] = 0.01f;
      mo[i] = 0.f;
      v[i] = 0.f;
      g[i] = (uint16_t)(0x3A83 + (i & 7));  // bf16 ~1e-3
      out[i] = 0;
    }
  });
  opt::AdamWBuffers buf;
  buf.param = p.get();
  buf.exp_avg = mo.get();
  buf.exp_avg_sq = v.get();
  buf.grad = g.get();
  buf.grad_type = opt::GradType::kBFloat16;
  buf.out = out.get();
  buf.out_type = opt::OutType::kBFloat16;
  buf.n = n;
  opt::AdamWHyper h;
  h.lr = 1e-5;
  h.weight_decay = 0.01;
  int64_t step = 0;
  r.ms = time_median(Ctx{}, [&] { opt::adamw_step(buf, h, ++step, 1.0f, &pool); }, c.warmup, c.repeats);
  return r;
}

// ---- (4) matmul ---------------------------------------------------------------------------
double measure_matmul_tflops(const Ctx& c, int64_t n) {
  auto o = at::TensorOptions().dtype(c.dtype).device(c.dev);
  at::Tensor a = at::randn({n, n}, o), b = at::randn({n, n}, o);
  at::NoGradGuard ng;
  double t = time_median(c, [&] { (void)at::mm(a, b); }, c.warmup, c.repeats);
  return 2.0 * n * n * n / (t * 1e9);
}

// ---- output -------------------------------------------------------------------------------
struct Row { std::string what, value, unit, note; };
std::string fmt(double x, int prec = 3) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, x);
  return buf;
}
void print_table(const std::vector<Row>& rows) {
  size_t w0 = 4, w1 = 5, w2 = 4;
  for (auto& r : rows) { w0 = std::max(w0, r.what.size()); w1 = std::max(w1, r.value.size()); w2 = std::max(w2, r.unit.size()); }
  auto line = [&](const std::string& a, const std::string& b, const std::string& u, const std::string& n) {
    std::printf("  %-*s  %*s  %-*s  %s\n", (int)w0, a.c_str(), (int)w1, b.c_str(), (int)w2, u.c_str(), n.c_str());
  };
  line("what", "value", "unit", "");
  line(std::string(w0, '-'), std::string(w1, '-'), std::string(w2, '-'), "");
  for (auto& r : rows) line(r.what, r.value, r.unit, r.note);
}

// One top-level key per line; lists of strings and objects one entry per line, other values compact.
std::string to_text(const ojson& j) {
  std::string s = "{\n";
  size_t i = 0;
  for (auto it = j.begin(); it != j.end(); ++it, ++i) {
    s += "  " + ojson(it.key()).dump() + ": ";
    const ojson& v = it.value();
    const bool lines = (v.is_object() && !v.empty()) || (v.is_array() && !v.empty() && (v[0].is_string() || v[0].is_object()));
    if (lines) {
      s += v.is_object() ? "{\n" : "[\n";
      size_t k = 0;
      for (auto e = v.begin(); e != v.end(); ++e, ++k) {
        s += "    " + (v.is_object() ? ojson(e.key()).dump() + ": " : std::string()) + e.value().dump();
        s += k + 1 < v.size() ? ",\n" : "\n";
      }
      s += v.is_object() ? "  }" : "  ]";
    } else {
      s += v.dump();
    }
    s += i + 1 < j.size() ? ",\n" : "\n";
  }
  return s + "}\n";
}

std::string sig(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4g", x);
  return buf;
}

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[64];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

// ---- (5) NVMe tier paths ------------------------------------------------------------------
struct StorageOpts { std::vector<std::string> dirs; int64_t mib = 0, request_kib = 1024; int qd = 8, repeats = 3; };

// Each path alone (what the hardware file keeps), then all at once striped by their weights (reported only).
ojson measure_storage(const StorageOpts& so, std::vector<Row>& rows, std::string* note) {
  namespace tier = mmoc::tier;
  tier::MeasureOptions mo;
  mo.bytes = so.mib << 20;
  mo.request_bytes = so.request_kib << 10;
  mo.queue_depth = so.qd;
  mo.repeats = so.repeats;
  ojson out = ojson::array();
  std::vector<tier::PathSpec> all;
  std::string backend;
  for (const auto& d : so.dirs) {
    std::cout << "  measuring NVMe tier path " << d << " (" << so.mib << " MiB, " << so.request_kib << " KiB requests, queue depth "
              << so.qd << ")...\n" << std::flush;
    tier::PathBandwidth b;
    try {
      b = tier::measure_path(d, mo);
    } catch (const tier::SetupError& e) {
      throw InputError(std::string("--nvme: ") + e.what());
    }
    backend = b.backend;
    const std::string kind = b.virtual_tier ? "virtual tier (" + b.fs_type + ", buffered)" : b.fs_type + (b.direct ? ", O_DIRECT" : ", buffered");
    rows.push_back({"nvme write " + d, fmt(b.write_gbps, 3), "GB/s", kind + ", device " + b.device + ", " + b.backend});
    rows.push_back({"nvme read " + d, fmt(b.read_gbps, 3), "GB/s", ""});
    ojson e;
    e["path"] = d;
    e["read_gbps"] = round_sig(b.read_gbps, 4);
    e["write_gbps"] = round_sig(b.write_gbps, 4);
    e["device"] = b.device;
    e["virtual"] = b.virtual_tier;
    out.push_back(e);
    all.push_back({d, tier::path_weight(b.read_gbps, b.write_gbps)});
  }
  *note = std::to_string(so.dirs.size()) + " path(s), " + std::to_string(so.mib) + " MiB each, " +
          std::to_string(so.request_kib) + " KiB requests, queue depth " + std::to_string(so.qd) + ", " + backend +
          " backend, median of " + std::to_string(so.repeats);
  if (so.dirs.size() > 1) {
    std::cout << "  measuring all NVMe tier paths at once...\n" << std::flush;
    tier::MeasureOptions m2 = mo;
    m2.bytes = mo.bytes * (int64_t)so.dirs.size();
    const tier::PathBandwidth a = tier::measure_striped(all, m2);
    rows.push_back({"nvme write, all paths striped", fmt(a.write_gbps, 3), "GB/s", "(reported only)"});
    rows.push_back({"nvme read, all paths striped", fmt(a.read_gbps, 3), "GB/s", "(reported only)"});
    *note += "; all paths at once, striped: write " + sig(a.write_gbps) + " GB/s, read " + sig(a.read_gbps) + " GB/s";
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mmoc-profile: measure this machine into a hardware JSON for mmoc-compile (docs/profile.md)"};
  std::string base, model_name, out_path, device = "cuda", name, configs, tflops_from = "layer";
  std::vector<int> mbs_list{8}, seq_list{1024};
  bool recompute = false, quick = false;
  int repeats = 0, warmup = -1, threads = 0;
  double warm_s = -1;
  int64_t adam_params = 0, xfer_mib = 0;
  app.add_option("--base", base, "hardware file (or configs/hardware name) to start from; unmeasured fields are kept")->required();
  app.add_option("--model", model_name, "model name (configs/models) or path to a model JSON (required unless --storage-only)");
  app.add_option("--mbs", mbs_list, "micro-batch size(s), comma-separated")->delimiter(',');
  app.add_option("--seq", seq_list, "sequence length(s), comma-separated (every mbs x seq pair is measured)")->delimiter(',');
  app.add_flag("--recompute", recompute, "also measure forward without grad and backward with recompute (reported only)");
  app.add_option("-o,--output", out_path, "hardware JSON to write")->required();
  app.add_option("--device", device, "cuda (bf16 layers, CUDA events) or cpu (fp32, reduced, for tests)")
      ->check(CLI::IsMember({"cuda", "cpu"}));
  app.add_flag("--quick", quick, "smaller buffers and fewer repeats");
  int kernels = 0;
  app.add_option("--kernels", kernels, "print the decoder layer's N most expensive CUDA kernels (torch profiler), forward and forward+backward")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--name", name, "hardware name to write (default: base name + \"-calibrated\")");
  app.add_option("--configs", configs, "configs folder (default: $MMOC_CONFIGS, the installed or the source configs/)");
  app.add_option("--tflops-from", tflops_from, "gpu_tflops from: layer (decoder fwd+bwd / efficiency), matmul, keep")
      ->check(CLI::IsMember({"layer", "matmul", "keep"}));
  app.add_option("--repeats", repeats, "timed repeats per measurement (median; default 10, --quick 3)")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed runs first (default 3, --quick 1)")->check(CLI::NonNegativeNumber);
  app.add_option("--warm-s", warm_s, "layers: run each one untimed this many seconds before timing it, so a GPU at its power "
                 "limit has settled to its sustained clock (default 3 on CUDA, --quick 2; 0 on the CPU)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--threads", threads, "CPU threads for AdamW and memcpy (default: all cores of this process)")->check(CLI::NonNegativeNumber);
  app.add_option("--adam-params", adam_params, "parameters in the AdamW measurement (default 200M, --quick 48M: beyond the caches either way)")->check(CLI::PositiveNumber);
  app.add_option("--transfer-mib", xfer_mib, "buffer size of the copy measurements in MiB (default 1024 CUDA / 256 CPU; --quick 64 / 16); the host memcpy always uses 1024 MiB (--quick 512)")
      ->check(CLI::PositiveNumber);
  StorageOpts so;
  bool storage_only = false;
  app.add_option("--nvme", so.dirs, "NVMe tier directories, comma-separated: measure each one's direct-I/O bandwidth into \"storage\"")
      ->delimiter(',');
  app.add_flag("--storage-only", storage_only, "measure only --nvme (no GPU, model or CPU measurements); the rest of the base is kept");
  app.add_option("--nvme-mib", so.mib, "bytes written and read per path and repeat, MiB (default 1024, --quick 256)")->check(CLI::PositiveNumber);
  app.add_option("--nvme-request-kib", so.request_kib, "request size of the tier, KiB (multiple of 4; default 1024)")->check(CLI::PositiveNumber);
  app.add_option("--nvme-qd", so.qd, "requests in flight per path (default 8)")->check(CLI::PositiveNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "mmoc-profile: error: " << e.what() << "\n";
    return 2;
  }

  try {
    // ---- inputs ----
    if (configs.empty()) configs = mmoc::default_configs_dir();
    if (storage_only && so.dirs.empty()) throw InputError("--storage-only needs --nvme PATH[,PATH...]");
    if (so.mib == 0) so.mib = quick ? 256 : 1024;
    so.repeats = quick ? 2 : 3;
    if (storage_only) {
      const std::string base_path = mmoc::resolve_config(base, configs, "hardware");
      const std::string base_text = mmoc::read_file(base_path, "hardware");
      const mmoc::HardwareSpec base_hw = mmoc::load_hardware(base_path, configs);
      if (out_path.empty()) throw InputError("-o: no output path");
      std::cout << "mmoc-profile: storage only, base " << base_path << "\n" << std::flush;
      std::vector<Row> rows;
      std::string note;
      ojson storage = measure_storage(so, rows, &note);
      ojson j = ojson::parse(base_text);
      ojson comment = ojson::array();
      if (j.contains("comment")) {
        if (j["comment"].is_string()) comment.push_back(j["comment"]);
        else if (j["comment"].is_array()) comment = j["comment"];
      }
      comment.push_back("Storage measured by mmoc-profile --storage-only " + utc_now() + ": " + note + ".");
      ojson out;
      out["comment"] = comment;
      for (auto it = j.begin(); it != j.end(); ++it)
        if (it.key() != "comment") out[it.key()] = it.value();
      out["storage"] = storage;
      const std::string text = to_text(out);
      mmoc::HardwareSpec check = mmoc::parse_hardware(text, out_path);
      if (check.storage.size() != so.dirs.size()) throw std::runtime_error("self-check: storage entries did not parse back");
      mmoc::write_file_atomic(out_path, text);
      std::cout << "\n";
      print_table(rows);
      std::cout << "\nwrote " << out_path << " (hardware '" << (check.name.empty() ? base_hw.name : check.name) << "', "
                << check.storage.size() << " storage path(s))\n";
      return 0;
    }
    if (model_name.empty()) throw InputError("--model is required (unless --storage-only)");
    mmoc::ModelSpec m = mmoc::load_model(model_name, configs);
    const std::string base_path = mmoc::resolve_config(base, configs, "hardware");
    const std::string base_text = mmoc::read_file(base_path, "hardware");
    const mmoc::HardwareSpec base_hw = mmoc::load_hardware(base_path, configs);
    if (name.empty()) {
      const std::string suffix = "-calibrated";
      const bool has = base_hw.name.size() >= suffix.size() &&
                       base_hw.name.compare(base_hw.name.size() - suffix.size(), suffix.size(), suffix) == 0;
      name = has ? base_hw.name : base_hw.name + suffix;
    }
    for (int b : mbs_list) if (b < 1) throw InputError("--mbs must be >= 1");
    for (int s : seq_list) {
      if (s < 2) throw InputError("--seq must be >= 2 (the loss needs a next token)");
      if (s > m.max_seq) throw InputError("--seq " + std::to_string(s) + " exceeds the model's max_seq " + std::to_string(m.max_seq));
    }
    if (out_path.empty()) throw InputError("-o: no output path");

    Ctx c;
    c.quick = quick;
    c.kernels = kernels;
    c.cuda = device == "cuda";
    c.warmup = warmup >= 0 ? warmup : (quick ? 1 : 3);
    c.repeats = repeats > 0 ? repeats : (quick ? 3 : 10);
    c.warm_s = warm_s >= 0 ? warm_s : device == "cuda" ? (quick ? 2.0 : 3.0) : 0.0;
    if (c.cuda) {
      if (!at::hasCUDA() || c10::cuda::device_count() < 1)
        throw InputError("--device cuda: no CUDA device here (use --device cpu for the reduced CPU mode)");
      c.dev = c10::Device(c10::kCUDA, 0);
      c.dtype = at::kBFloat16;
    }
    const int cores = host_cpus();
    const int nthreads = threads > 0 ? threads : cores;
    const int64_t xfer_bytes = (xfer_mib > 0 ? xfer_mib : (c.cuda ? (quick ? 64 : 1024) : (quick ? 16 : 256))) * (int64_t)kMiB;
    // Host-memory measurements stay beyond the last-level cache even with --quick (server LLCs reach hundreds of MiB):
    // a 64 MiB memcpy and a 4M-parameter AdamW (112 MB of traffic) measured 281.7 and 397.8 GB/s on the 2x H200 host,
    // where the engine's 200M-parameter stage updates run at ~110 GB/s (bench/results/h200x2-2026-11-27).
    const int64_t memcpy_bytes = (quick ? 512 : 1024) * (int64_t)kMiB;
    const int64_t n_adam = adam_params > 0 ? adam_params : (quick ? 48'000'000 : 200'000'000);
    const int64_t mm_n = c.cuda ? (quick ? 4096 : 8192) : (quick ? 256 : 1024);

    std::string dev_desc = "CPU (" + std::to_string(cores) + " cores)";
    double dev_mem_gib = 0;
    if (c.cuda) {
      cudaDeviceProp prop;
      if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) dev_desc = prop.name;
      size_t fr = 0, tot = 0;
      if (cudaMemGetInfo(&fr, &tot) == cudaSuccess) dev_mem_gib = (double)tot / mmoc::GiB;
    }
    std::cout << "mmoc-profile: " << dev_desc << ", model " << m.name << ", base " << base_path << " ("
              << (c.cuda ? "bf16" : "fp32") << ", " << c.warmup << " warm-up + " << c.repeats << " timed, median; layers after "
              << fmt(c.warm_s, 1) << " s of sustained warm-up)\n";
    std::cout.flush();

    opt::ThreadPool pool(nthreads);
    std::string bus_id;  // the measured GPU's PCI bus id, for NVML (the clock it runs the layers at)
    if (c.cuda) {
      char buf[32] = {0};
      if (cudaDeviceGetPCIBusId(buf, sizeof buf, 0) == cudaSuccess) bus_id = buf;
    }
    const mmoc::ClockSampler clock_sampler(bus_id, 2000.0);  // the SM clock every 2 ms (a thread; none without NVML)
    std::vector<Row> rows;

    // (1) transfers
    std::cout << "  measuring copies (" << xfer_bytes / kMiB << " MiB)...\n" << std::flush;
    Transfers tr = c.cuda ? measure_transfers_cuda(c, xfer_bytes) : measure_transfers_cpu(c, xfer_bytes);
    if (c.cuda) c10::cuda::CUDACachingAllocator::emptyCache();
    const char* pin = c.cuda ? "pinned, " : "CPU mode: 1-thread memcpy, ";
    rows.push_back({"H2D", fmt(tr.h2d, 2), "GB/s", std::string(pin) + fmt(tr.bytes / kMiB, 0) + " MiB"});
    rows.push_back({"D2H", fmt(tr.d2h, 2), "GB/s", std::string(pin) + fmt(tr.bytes / kMiB, 0) + " MiB"});
    rows.push_back({"H2D+D2H at once", fmt(tr.duplex, 2), "GB/s", "total of both directions"});
    std::cout << "  measuring host memcpy (" << memcpy_bytes / kMiB << " MiB, " << nthreads << " threads)...\n" << std::flush;
    const double memcpy_gbps = measure_host_memcpy(c, pool, memcpy_bytes);
    rows.push_back({"host memcpy", fmt(memcpy_gbps, 2), "GB/s", "read+write, " + std::to_string(nthreads) + " threads"});
    if (c.cuda) rows.push_back({"device copy", fmt(tr.dev_copy, 1), "GB/s", "read+write"});
    // GPU-to-GPU links: every pair of the base file's GPUs that are visible here (p2p_links)
    std::vector<PairLink> links;
    const int link_gpus = c.cuda ? std::min<int>(base_hw.gpus, (int)c10::cuda::device_count()) : 0;
    const int64_t p2p_bytes = (quick ? 64 : 256) * (int64_t)kMiB;
    if (link_gpus > 1) {
      std::cout << "  measuring GPU-to-GPU links (" << link_gpus << " GPUs, " << p2p_bytes / kMiB << " MiB each way)...\n" << std::flush;
      links = measure_p2p_links(c, link_gpus, p2p_bytes);
      for (const auto& l : links)
        rows.push_back({"GPU " + std::to_string(l.a) + " <-> " + std::to_string(l.b), fmt(l.gbps, 2), "GB/s",
                        l.kind + ", " + fmt(l.ab, 2) + " / " + fmt(l.ba, 2) + " each way"});
    }

    // (4) matmul
    std::cout << "  measuring matmul " << mm_n << "^3...\n" << std::flush;
    const double mm_tflops = measure_matmul_tflops(c, mm_n);
    if (c.cuda) c10::cuda::CUDACachingAllocator::emptyCache();
    rows.push_back({"matmul " + std::to_string(mm_n) + "^3", fmt(mm_tflops, c.cuda ? 1 : 4), "TFLOP/s", c.cuda ? "bf16" : "fp32"});

    // (2) layers
    struct Shape { int mbs, seq; };
    std::vector<Shape> shapes;
    for (int b : mbs_list) for (int s : seq_list) shapes.push_back({b, s});
    std::map<std::string, double> calib;
    double best_layer_tflops = 0, best_tokens = -1, best_ms = 0;
    int best_mbs = 0, best_seq = 0;
    static const char* kinds[] = {"embedding", "decoder", "head+loss"};
    for (const auto& sh : shapes) {
      for (int kind = 0; kind < 3; ++kind) {
        std::cout << "  measuring " << kinds[kind] << " at " << sh.mbs << "x" << sh.seq << "...\n" << std::flush;
        LayerTimes lt = measure_layer(c, m, kind, sh.mbs, sh.seq, recompute, &clock_sampler);
        if (c.cuda) c10::cuda::CUDACachingAllocator::emptyCache();
        const double f = round_sig(lt.fwd), b = round_sig(lt.bwd);
        calib[mmoc::calibration_key(m.name, kind, true, sh.mbs, sh.seq)] = f;
        calib[mmoc::calibration_key(m.name, kind, false, sh.mbs, sh.seq)] = b;
        std::string shape = " " + std::to_string(sh.mbs) + "x" + std::to_string(sh.seq);
        auto rate = [](double flops, double ms) { return ms > 0 && flops > 0 ? fmt(flops / (ms * 1e9), 3) + " TFLOP/s" : std::string(); };
        rows.push_back({std::string(kinds[kind]) + " fwd" + shape, fmt(f, 4), "ms", rate(lt.flops_fwd, f)});
        rows.push_back({std::string(kinds[kind]) + " bwd" + shape, fmt(b, 4), "ms", rate(lt.flops_bwd, b)});
        if (recompute) {
          rows.push_back({std::string(kinds[kind]) + " fwd no-grad" + shape, fmt(lt.fwd_nograd, 4), "ms", "(reported only)"});
          rows.push_back({std::string(kinds[kind]) + " bwd recompute" + shape, fmt(lt.bwd_rc, 4), "ms",
                          "compiler assumes fwd+bwd = " + fmt(f + b, 4)});
        }
        if (kind == 1 && lt.sm_mhz > 0) {
          std::string why = mmoc::GpuClock::reasons_text(lt.clock_reasons);
          rows.push_back({"SM clock (decoder)" + shape, fmt(lt.sm_mhz, 0), "MHz",
                          "mean over the timed rounds (read every 2 ms), max " + fmt(lt.max_mhz, 0) + " MHz; " + fmt(lt.power_w, 0) + " W of " +
                              fmt(lt.power_limit_w, 0) + " W" + (why.empty() ? std::string() : "; limited by " + why)});
        }
        if (kind == 1) {
          const double tokens = (double)sh.mbs * sh.seq;
          const double achieved = (lt.flops_fwd + lt.flops_bwd) / ((lt.fwd + lt.bwd) * 1e9);
          if (tokens > best_tokens) {
            best_tokens = tokens; best_layer_tflops = achieved;
            best_ms = f + b; best_mbs = sh.mbs; best_seq = sh.seq;
          }
        }
      }
    }

    // GPU memory outside the caching allocator (CUDA context, cuBLAS workspaces, kernels loaded), after the layers
    // ran: the reserve a plan must leave inside its budget (one process alone; NCCL adds to it on several GPUs)
    double outside_gib = -1;
    if (c.cuda) {
      cudaDeviceSynchronize();
      size_t fr = 0, tot = 0;
      if (cudaMemGetInfo(&fr, &tot) == cudaSuccess && tot > 0) {
        const auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
        outside_gib = std::max<double>(0.0, (double)(tot - fr) - (double)st.reserved_bytes[0].current) / mmoc::GiB;
        rows.push_back({"GPU memory outside the allocator", fmt(outside_gib, 2), "GiB", "CUDA context, cuBLAS, kernels"});
      } else {
        cudaGetLastError();
      }
    }

    // (3) CPU AdamW
    std::cout << "  measuring CPU AdamW (" << n_adam / 1e6 << "M params, " << nthreads << " threads)...\n" << std::flush;
    AdamResult ar = measure_adam(c, pool, n_adam);
    rows.push_back({"CPU AdamW", fmt(ar.ms, 3), "ms", fmt(n_adam / 1e6, 1) + "M params, bf16 grad + bf16 out, " +
                    std::to_string(ar.threads) + " threads, " + ar.isa});
    rows.push_back({"CPU AdamW traffic", fmt(n_adam * base_hw.adam_bytes_per_param / (ar.ms * 1e6), 2), "GB/s",
                    fmt(base_hw.adam_bytes_per_param, 0) + " bytes/param"});

    // ---- the new hardware spec ----
    mmoc::HardwareSpec hw = base_hw;
    hw.name = name;
    hw.h2d_gbps = round_sig(tr.h2d, 4);
    hw.d2h_gbps = round_sig(tr.d2h, 4);
    hw.duplex_gbps = round_sig(tr.duplex, 4);
    bool singleton_groups = true;
    for (auto& g : hw.host_groups) singleton_groups = singleton_groups && g.size() <= 1;
    if (singleton_groups) hw.group_link_gbps = std::max(hw.h2d_gbps, hw.d2h_gbps);
    hw.gpu_mem_gbps = round_sig(c.cuda ? tr.dev_copy : memcpy_gbps, 4);
    if (c.cuda && dev_mem_gib > 0) hw.gpu_mem_gib = std::floor(dev_mem_gib * 10) / 10;
    hw.cpu_cores = cores;
    if (host_mem_gib() > 0) hw.host_mem_gib = std::floor(host_mem_gib() * 10) / 10;
    std::string tflops_note = "kept from base";
    if (tflops_from == "matmul") {
      hw.gpu_tflops = std::max(1e-6, round_sig(mm_tflops, 4));
      tflops_note = "matmul rate";
    } else if (tflops_from == "layer" && best_layer_tflops > 0) {
      // the GEMM rate with which the cost model's formula (the base's gemm_k0, efficiency curve and attention share,
      // the measured gpu_mem_gbps for its memory-bound passes) gives the measured decoder fwd+bwd at the largest shape
      mmoc::CostModel cm{m, hw};
      const double t = cm.tflops_reproducing(1, best_mbs, best_seq, best_ms);
      hw.gpu_tflops = std::max(1e-6, round_sig(t > 0 ? t : best_layer_tflops / cm.efficiency(best_tokens), 4));  // parser's minimum
      tflops_note = "decoder fwd+bwd " + fmt(best_layer_tflops, 3) + " TFLOP/s at " + fmt(best_tokens, 0) +
                    " tokens: the cost model's GEMM rate that reproduces " + fmt(best_ms, 4) + " ms";
    }
    {  // host_mem_gbps such that CostModel::adam_ms(n_adam, threads) == measured
      const double share = std::min(1.0, (double)std::max(ar.threads, 1) / hw.adam_threads_to_saturate());
      hw.host_mem_gbps = round_sig((double)n_adam * hw.adam_bytes_per_param / (ar.ms * 1e6 * share), 5);
    }
    // the reserve: measured when a plan's process is alone on its GPU (one GPU); with several, NCCL's buffers come on
    // top of what one process alone holds, so the base file's figure stays unless the measurement is larger
    std::string reserve_note = "kept from base (not measured: --device cpu)";
    if (outside_gib >= 0) {
      const double measured = std::ceil(outside_gib * 10) / 10;  // rounded up to 0.1 GiB
      if (hw.gpus <= 1 || measured > hw.reserve_gib) {
        hw.reserve_gib = measured;
        reserve_note = "measured outside the allocator, rounded up";
      } else {
        reserve_note = "kept from base: " + fmt(hw.reserve_gib, 2) + " GiB with NCCL >= " + fmt(measured, 2) + " GiB measured alone";
      }
      hw.reserve_fraction = 0;
    }
    rows.push_back({"-> gpu_tflops", fmt(hw.gpu_tflops, 4), "TFLOP/s", tflops_note});
    rows.push_back({"-> host_mem_gbps", fmt(hw.host_mem_gbps, 2), "GB/s", "reproduces the AdamW time in CostModel::adam_ms"});
    rows.push_back({"-> reserve_gib", fmt(hw.reserve_gib, 2), "GiB", reserve_note});

    // (5) NVMe tier paths
    ojson storage;
    std::string storage_note;
    if (!so.dirs.empty()) storage = measure_storage(so, rows, &storage_note);

    // ---- JSON: the base file with the measured keys replaced ----
    ojson j = ojson::parse(base_text);
    ojson comment = ojson::array();
    comment.push_back("Calibrated by mmoc-profile " + utc_now() + " on " + dev_desc + " from base '" + base_hw.name +
                      "' (" + base_path + "), model " + m.name + (c.quick ? ", --quick" : "") +
                      (c.cuda ? "" : ", --device cpu (reduced CPU mode: the layer times are fp32 on the CPU)") + ".");
    comment.push_back("Measured: h2d/d2h/duplex_gbps, gpu_mem_gbps, gpu_tflops (" + tflops_from + "), host_mem_gbps (from " +
                      fmt(n_adam / 1e6, 0) + "M-param CPU AdamW, " + fmt(ar.ms, 2) + " ms, " + std::to_string(ar.threads) +
                      " threads), cpu_cores, host_mem_gib" + (c.cuda ? ", gpu_mem_gib, reserve_gib (" + reserve_note + ")" : "") +
                      (singleton_groups ? ", group_link_gbps (= max(h2d, d2h))" : "") + ", calibrated_ms. Other keys: from the base.");
    comment.push_back("Also measured (not in the cost model): host memcpy " + sig(memcpy_gbps) + " GB/s (read+write), matmul " +
                      std::to_string(mm_n) + "^3 " + sig(mm_tflops) + " TFLOP/s" + (c.cuda ? " (bf16)" : " (fp32)") + ".");
    ojson out;
    out["comment"] = comment;
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "comment") out[it.key()] = it.value();
    out["name"] = hw.name;
    out["gpu_mem_gib"] = hw.gpu_mem_gib;
    out["gpu_tflops"] = hw.gpu_tflops;
    out["gpu_mem_gbps"] = hw.gpu_mem_gbps;
    out["h2d_gbps"] = hw.h2d_gbps;
    out["d2h_gbps"] = hw.d2h_gbps;
    out["duplex_gbps"] = hw.duplex_gbps;
    out["group_link_gbps"] = hw.group_link_gbps;
    out["host_mem_gib"] = hw.host_mem_gib;
    out["cpu_cores"] = hw.cpu_cores;
    out["host_mem_gbps"] = hw.host_mem_gbps;
    if (outside_gib >= 0) {
      out["reserve_gib"] = hw.reserve_gib;
      out["reserve_fraction"] = hw.reserve_fraction;
    }
    if (!links.empty()) {  // per-pair links replace the base's (mmoc-compile's cross-map places groups by them)
      ojson arr = ojson::array();
      for (const auto& l : links)
        arr.push_back({{"gpus", {l.a, l.b}}, {"gbps", round_sig(l.gbps, 4)}, {"kind", l.kind}});
      out["p2p_links"] = arr;
      out["comment"].push_back("Measured: p2p_links (cudaMemcpyPeerAsync of " + fmt(p2p_bytes / kMiB, 0) +
                               " MiB each way per pair, the slower direction; kind peer = direct access, via-host = staged).");
    }
    if (!storage.is_null()) {
      out["storage"] = storage;
      out["comment"].push_back("Measured by --nvme: storage (" + storage_note + ").");
    }
    ojson cal = out.contains("calibrated_ms") && out["calibrated_ms"].is_object() ? out["calibrated_ms"] : ojson::object();
    for (const auto& [k, v] : calib) cal[k] = v;
    out["calibrated_ms"] = cal;
    const std::string text = to_text(out);

    // Self-check before writing: it parses, and the cost model returns exactly the measured times.
    mmoc::HardwareSpec check = mmoc::parse_hardware(text, out_path);
    mmoc::CostModel cm{m, check};
    for (const auto& sh : shapes)
      for (int layer : {0, 1, m.layers + 1}) {
        const int kind = cm.layer_kind(layer);
        if (cm.layer_fwd_ms(layer, sh.mbs, sh.seq) != calib.at(mmoc::calibration_key(m.name, kind, true, sh.mbs, sh.seq)) ||
            cm.layer_bwd_ms(layer, sh.mbs, sh.seq) != calib.at(mmoc::calibration_key(m.name, kind, false, sh.mbs, sh.seq)))
          throw std::runtime_error("self-check: the cost model does not return the calibrated layer times");
      }
    const double adam_model = cm.adam_ms(n_adam, ar.threads);
    if (std::abs(adam_model - ar.ms) > 1e-3 * ar.ms)
      throw std::runtime_error("self-check: CostModel::adam_ms " + fmt(adam_model) + " ms != measured " + fmt(ar.ms) + " ms");
    mmoc::write_file_atomic(out_path, text);

    std::cout << "\n";
    print_table(rows);
    std::cout << "\nwrote " << out_path << " (hardware '" << hw.name << "', " << calib.size() << " calibrated_ms entries measured, "
              << check.calibrated_ms.size() << " in all)\n";
    return 0;
  } catch (const InputError& e) {
    std::cerr << "mmoc-profile: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "mmoc-profile: failed: " << e.what() << "\n";
    return 3;
  }
}
