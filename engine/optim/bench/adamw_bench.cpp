// mmoc_adamw_bench: host memcpy bandwidth vs fused CPU AdamW throughput, for 1..N threads.
//
//   mmoc_adamw_bench [--params N] [--threads N] [--iters N] [--memcpy-mib N] [--grad fp32|bf16]
//                    [--out none|fp32|bf16] [--pin]
// AdamW traffic is counted as 28 bytes/param (bf16 grad in, fp32 p/m/v read+write, bf16 out);
// memcpy traffic as read + write (2 bytes per byte copied; glibc's large memcpy may pay extra for
// read-for-ownership or be limited per thread, so it is not a hard ceiling). "rmw" is a streaming
// read-modify-write kernel like AdamW's (x = x*a + y over fp32, 12 bytes/element, no RFO), a fairer
// bandwidth reference. Best of --iters runs is reported.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/optim/adamw.hpp"
#include "engine/optim/convert.hpp"
#include "engine/optim/thread_pool.hpp"

using namespace mmoc::engine::optim;

namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], FreeDeleter> alloc(int64_t n) {
  void* p = std::aligned_alloc(64, static_cast<size_t>((n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64));
  if (p == nullptr) {
    std::fprintf(stderr, "mmoc_adamw_bench: out of memory allocating %lld elements\n", static_cast<long long>(n));
    std::exit(1);
  }
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int usage(const char* msg) {
  std::fprintf(stderr,
               "mmoc_adamw_bench: %s\nusage: mmoc_adamw_bench [--params N] [--threads N] [--iters N] "
               "[--memcpy-mib N] [--grad fp32|bf16] [--out none|fp32|bf16] [--pin]\n",
               msg);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t params = 64LL << 20;
  int max_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int iters = 5;
  int64_t memcpy_mib = 1024;
  GradType grad_type = GradType::kBFloat16;
  OutType out_type = OutType::kBFloat16;
  bool pin = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) return nullptr;
      return argv[++i];
    };
    try {
      if (a == "--params") {
        const char* v = next(); if (!v) return usage("--params needs a value"); params = std::stoll(v);
      } else if (a == "--threads") {
        const char* v = next(); if (!v) return usage("--threads needs a value"); max_threads = std::stoi(v);
      } else if (a == "--iters") {
        const char* v = next(); if (!v) return usage("--iters needs a value"); iters = std::stoi(v);
      } else if (a == "--memcpy-mib") {
        const char* v = next(); if (!v) return usage("--memcpy-mib needs a value"); memcpy_mib = std::stoll(v);
      } else if (a == "--grad") {
        const char* v = next(); if (!v) return usage("--grad needs a value");
        std::string s = v;
        if (s == "fp32") grad_type = GradType::kFloat32; else if (s == "bf16") grad_type = GradType::kBFloat16;
        else return usage("--grad must be fp32 or bf16");
      } else if (a == "--out") {
        const char* v = next(); if (!v) return usage("--out needs a value");
        std::string s = v;
        if (s == "none") out_type = OutType::kNone; else if (s == "fp32") out_type = OutType::kFloat32;
        else if (s == "bf16") out_type = OutType::kBFloat16; else return usage("--out must be none, fp32 or bf16");
      } else if (a == "--pin") {
        pin = true;
      } else if (a == "-h" || a == "--help") {
        usage("help");
        return 0;
      } else {
        return usage(("unknown argument " + a).c_str());
      }
    } catch (const std::exception&) {
      return usage(("bad number for " + a).c_str());
    }
  }
  if (params < 1 || max_threads < 1 || iters < 1 || memcpy_mib < 1) return usage("values must be positive");

  const int64_t grad_bytes = grad_type == GradType::kBFloat16 ? 2 : 4;
  const int64_t out_bytes = out_type == OutType::kNone ? 0 : (out_type == OutType::kBFloat16 ? 2 : 4);
  const int64_t bytes_per_param = 24 + grad_bytes + out_bytes;  // 28 with bf16 in and out

  std::printf("mmoc_adamw_bench: isa=%s params=%lld (%.1f MiB of optimizer state) grad=%s out=%s "
              "bytes/param=%lld iters=%d pin=%s hw_threads=%u\n",
              adamw_isa(), static_cast<long long>(params), params * 12.0 / (1 << 20),
              grad_type == GradType::kBFloat16 ? "bf16" : "fp32",
              out_type == OutType::kNone ? "none" : (out_type == OutType::kBFloat16 ? "bf16" : "fp32"),
              static_cast<long long>(bytes_per_param), iters, pin ? "yes" : "no",
              std::thread::hardware_concurrency());

  const int64_t copy_bytes = memcpy_mib << 20;
  auto src = alloc<char>(copy_bytes);
  auto dst = alloc<char>(copy_bytes);
  auto p = alloc<float>(params);
  auto m = alloc<float>(params);
  auto v = alloc<float>(params);
  auto g = alloc<char>(params * grad_bytes);
  auto out = alloc<char>(std::max<int64_t>(1, params * out_bytes));

  std::printf("%7s %12s %10s %14s %11s %9s %12s %10s %12s\n", "threads", "memcpy GB/s", "rmw GB/s",
              "adamw Mparam/s", "adamw GB/s", "ms/step", "adamw/memcpy", "adamw/rmw", "7B step (s)");
  for (int t = 1; t <= max_threads; ++t) {
    std::vector<int> cpus;
    if (pin) {
      for (int c = 0; c < t; ++c) cpus.push_back(c);
    }
    ThreadPool pool(t, cpus);
    // First touch / initialise in parallel with this pool.
    pool.parallel_for(copy_bytes, 1 << 20, [&](int64_t b, int64_t e) {
      std::memset(src.get() + b, 1, static_cast<size_t>(e - b));
      std::memset(dst.get() + b, 0, static_cast<size_t>(e - b));
    });
    pool.parallel_for(params, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float x = static_cast<float>((i * 2654435761u) % 1000003u) * 1e-6f - 0.5f;
        p[i] = x;
        m[i] = 0.1f * x;
        v[i] = 0.01f * x * x;
        if (grad_type == GradType::kBFloat16) {
          reinterpret_cast<uint16_t*>(g.get())[i] = f32_to_bf16(0.01f * x);
        } else {
          reinterpret_cast<float*>(g.get())[i] = 0.01f * x;
        }
      }
    });

    double best_copy = 1e30;
    for (int it = 0; it < iters + 1; ++it) {
      const double t0 = now_s();
      pool.parallel_for(copy_bytes, 1 << 16, [&](int64_t b, int64_t e) {
        std::memcpy(dst.get() + b, src.get() + b, static_cast<size_t>(e - b));
      });
      const double dt = now_s() - t0;
      if (it > 0) best_copy = std::min(best_copy, dt);
    }
    const double copy_gbs = 2.0 * static_cast<double>(copy_bytes) / best_copy / 1e9;

    // Streaming read-modify-write over two fp32 arrays of `params` elements (p += 0.5 * m).
    double best_rmw = 1e30;
    for (int it = 0; it < iters + 1; ++it) {
      const double t0 = now_s();
      pool.parallel_for(params, 4096, [&](int64_t b, int64_t e) {
        float* __restrict x = p.get();
        const float* __restrict y = m.get();
        for (int64_t i = b; i < e; ++i) x[i] = x[i] * 0.999f + y[i];
      });
      const double dt = now_s() - t0;
      if (it > 0) best_rmw = std::min(best_rmw, dt);
    }
    const double rmw_gbs = 12.0 * static_cast<double>(params) / best_rmw / 1e9;
    pool.parallel_for(params, 4096, [&](int64_t b, int64_t e) {  // restore bounded values
      for (int64_t i = b; i < e; ++i) p[i] = static_cast<float>((i * 2654435761u) % 1000003u) * 1e-6f - 0.5f;
    });

    AdamWBuffers buf;
    buf.param = p.get();
    buf.exp_avg = m.get();
    buf.exp_avg_sq = v.get();
    buf.grad = g.get();
    buf.grad_type = grad_type;
    buf.out = out_type == OutType::kNone ? nullptr : out.get();
    buf.out_type = out_type;
    buf.n = params;
    AdamWHyper h;
    h.lr = 1e-5;
    h.weight_decay = 0.0;  // keep the values bounded over many runs
    double best_adam = 1e30;
    for (int it = 0; it < iters + 1; ++it) {
      const double t0 = now_s();
      adamw_step(buf, h, it + 1, 0.5f, &pool);
      const double dt = now_s() - t0;
      if (it > 0) best_adam = std::min(best_adam, dt);
    }
    const double rate = static_cast<double>(params) / best_adam;
    const double adam_gbs = rate * static_cast<double>(bytes_per_param) / 1e9;
    std::printf("%7d %12.2f %10.2f %14.1f %11.2f %9.2f %12.2f %10.2f %12.2f\n", t, copy_gbs, rmw_gbs, rate / 1e6,
                adam_gbs, best_adam * 1e3, adam_gbs / copy_gbs, adam_gbs / rmw_gbs, 6.74e9 / rate);
    std::fflush(stdout);
  }
  return 0;
}
