// Torch-free tests of engine/optim: LR schedules vs hand-computed HF formulas, the thread pool's static
// partition, sum_of_squares vs a plain double loop, clip_scale, conversion round trips, and AdamW
// determinism over thread counts.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <chrono>
#include <thread>
#include <mutex>
#include <map>
#include <cmath>
#include <cstring>
#include <string>
#include <random>
#include <stdexcept>
#include <vector>

#include "engine/optim/adamw.hpp"
#include "engine/optim/convert.hpp"
#include "engine/optim/lr_schedule.hpp"
#include "engine/optim/thread_pool.hpp"

using namespace mmoc::engine::optim;

TEST_CASE("lr_at matches HF schedules (hand-computed values)") {
  const double base = 2e-5;
  // warmup 10, total 110.
  // constant_with_warmup: step/10 during warmup, then 1.
  CHECK(lr_at(base, LrSchedule::kConstant, 10, 110, 0) == 0.0);
  CHECK(lr_at(base, LrSchedule::kConstant, 10, 110, 3) == doctest::Approx(base * 0.3).epsilon(1e-15));
  CHECK(lr_at(base, LrSchedule::kConstant, 10, 110, 10) == base);
  CHECK(lr_at(base, LrSchedule::kConstant, 10, 110, 500) == base);
  CHECK(lr_at(base, LrSchedule::kConstant, 0, 110, 0) == base);
  // linear: (110 - step) / 100 after warmup.
  CHECK(lr_at(base, LrSchedule::kLinear, 10, 110, 5) == doctest::Approx(base * 0.5).epsilon(1e-15));
  CHECK(lr_at(base, LrSchedule::kLinear, 10, 110, 10) == base);
  CHECK(lr_at(base, LrSchedule::kLinear, 10, 110, 35) == doctest::Approx(base * 0.75).epsilon(1e-15));
  CHECK(lr_at(base, LrSchedule::kLinear, 10, 110, 60) == doctest::Approx(base * 0.5).epsilon(1e-15));
  CHECK(lr_at(base, LrSchedule::kLinear, 10, 110, 109) == doctest::Approx(base * 0.01).epsilon(1e-15));
  CHECK(lr_at(base, LrSchedule::kLinear, 10, 110, 110) == 0.0);
  CHECK(lr_at(base, LrSchedule::kLinear, 10, 110, 200) == 0.0);
  // cosine: 0.5 * (1 + cos(pi * (step - 10) / 100)).
  CHECK(lr_at(base, LrSchedule::kCosine, 10, 110, 10) == base);
  CHECK(lr_at(base, LrSchedule::kCosine, 10, 110, 60) == doctest::Approx(base * 0.5).epsilon(1e-15));
  CHECK(lr_at(base, LrSchedule::kCosine, 10, 110, 35) ==
        doctest::Approx(base * 0.5 * (1.0 + std::sqrt(0.5))).epsilon(1e-15));
  CHECK(lr_at(base, LrSchedule::kCosine, 10, 110, 85) ==
        doctest::Approx(base * 0.5 * (1.0 - std::sqrt(0.5))).epsilon(1e-15));
  CHECK(lr_at(base, LrSchedule::kCosine, 10, 110, 110) == doctest::Approx(0.0).epsilon(1e-30));
  CHECK(lr_at(base, LrSchedule::kCosine, 10, 110, 300) >= 0.0);
  CHECK(lr_at(base, LrSchedule::kCosine, 10, 110, 7) == doctest::Approx(base * 0.7).epsilon(1e-15));
  // Warmup 0 and total == warmup use max(1, ...) denominators like HF.
  CHECK(lr_at(1.0, LrSchedule::kLinear, 0, 4, 0) == 1.0);
  CHECK(lr_at(1.0, LrSchedule::kLinear, 0, 4, 1) == 0.75);
  CHECK(lr_at(1.0, LrSchedule::kLinear, 5, 5, 5) == 0.0);
  CHECK(parse_lr_schedule("cosine") == LrSchedule::kCosine);
  CHECK(parse_lr_schedule("linear") == LrSchedule::kLinear);
  CHECK(parse_lr_schedule("constant") == LrSchedule::kConstant);
  CHECK_FALSE(parse_lr_schedule("exp").has_value());
}

TEST_CASE("thread pool: both schedules cover [0, n) exactly once with runs of whole chunks") {
  for (auto sched : {ThreadPool::Schedule::kStatic, ThreadPool::Schedule::kDynamic}) {
    for (int threads : {1, 2, 3, 4, 7}) {
      ThreadPool pool(threads, {}, sched);
      CHECK(pool.num_threads() == threads);
      for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{4096}, int64_t{100003}}) {
        for (int64_t chunk : {int64_t{1}, int64_t{64}, int64_t{4096}}) {
          std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
          std::atomic<int> calls{0};
          pool.parallel_for(n, chunk, [&](int64_t b, int64_t e) {
            CHECK(b % chunk == 0);
            CHECK(b < e);
            calls.fetch_add(1);
            for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
          });
          int bad = 0;
          for (auto& h : hits) bad += h.load() != 1;
          CHECK(bad == 0);
          if (pool.schedule() == ThreadPool::Schedule::kStatic) CHECK(calls.load() <= threads);
        }
      }
    }
  }
  int64_t b = 0, e = 0;
  ThreadPool::static_range(10, 2, 1, 2, &b, &e);  // 5 chunks over 2 threads: [0,2) chunks, [2,5) chunks
  CHECK(b == 4);
  CHECK(e == 10);
}

// The dynamic schedule's point: a thread held up (in mmoc-run, by the issuing thread spinning on its core) takes fewer
// runs, and the others take the rest, instead of every thread waiting for its fixed share.
TEST_CASE("thread pool: under the dynamic schedule a slow thread takes fewer runs") {
  if (const char* e = std::getenv("MMOC_POOL_SCHEDULE"); e && std::string(e) == "static") return;
  ThreadPool pool(4);
  REQUIRE(pool.schedule() == ThreadPool::Schedule::kDynamic);
  std::mutex mu;
  std::map<std::thread::id, int> runs;
  std::thread::id slow;
  pool.parallel_for(int64_t{1} << 20, 64, [&](int64_t b, int64_t) {
    {
      std::lock_guard<std::mutex> g(mu);
      ++runs[std::this_thread::get_id()];
      if (b == 0) slow = std::this_thread::get_id();
    }
    if (b == 0) std::this_thread::sleep_for(std::chrono::milliseconds(500));
  });
  int total = 0;
  for (const auto& [id, k] : runs) total += k;
  CHECK(total == 32);  // 16384 chunks, runs of 16384 / (8 x 4) = 512 chunks
  CHECK(runs[slow] == 1);
  // the static schedule gives the same thread all of its share: one run per thread
  ThreadPool st(4, {}, ThreadPool::Schedule::kStatic);
  std::atomic<int> calls{0};
  st.parallel_for(int64_t{1} << 20, 64, [&](int64_t, int64_t) { calls.fetch_add(1); });
  CHECK(calls.load() == 4);
}

TEST_CASE("thread pool: exceptions propagate; pinning to a bad CPU only warns") {
  ThreadPool pool(3);
  CHECK_THROWS_AS(pool.parallel_for(1000, 10,
                                    [](int64_t b, int64_t) {
                                      if (b > 0) throw std::runtime_error("boom");
                                    }),
                  std::runtime_error);
  // Still usable afterwards.
  std::atomic<int64_t> sum{0};
  pool.parallel_for(1000, 10, [&](int64_t b, int64_t e) { sum += e - b; });
  CHECK(sum.load() == 1000);
  ThreadPool bad(2, {100000});
  CHECK_FALSE(bad.pinned());
  sum = 0;
  bad.parallel_for(77, 1, [&](int64_t b, int64_t e) { sum += e - b; });
  CHECK(sum.load() == 77);
  ThreadPool good(2, {0});
  CHECK(good.pinned());
}

TEST_CASE("sum_of_squares: double reference, identical for any thread count and schedule") {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t n = 3 * kReduceBlock + 12345;
  std::vector<float> f(static_cast<size_t>(n));
  std::vector<uint16_t> h(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    f[static_cast<size_t>(i)] = nd(rng) * std::exp(nd(rng));
    h[static_cast<size_t>(i)] = f32_to_bf16(f[static_cast<size_t>(i)]);
  }
  double ref_f = 0.0, ref_h = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = f[static_cast<size_t>(i)];
    const double y = bf16_to_f32(h[static_cast<size_t>(i)]);
    ref_f += x * x;
    ref_h += y * y;
  }
  const double s_f = sum_of_squares(f.data(), GradType::kFloat32, n, nullptr);
  const double s_h = sum_of_squares(h.data(), GradType::kBFloat16, n, nullptr);
  CHECK(s_f == doctest::Approx(ref_f).epsilon(1e-12));
  CHECK(s_h == doctest::Approx(ref_h).epsilon(1e-12));
  for (auto sched : {ThreadPool::Schedule::kStatic, ThreadPool::Schedule::kDynamic}) {
    for (int threads : {1, 2, 3, 4}) {
      ThreadPool pool(threads, {}, sched);
      CHECK(sum_of_squares(f.data(), GradType::kFloat32, n, &pool) == s_f);
      CHECK(sum_of_squares(h.data(), GradType::kBFloat16, n, &pool) == s_h);
    }
  }
  CHECK(sum_of_squares(f.data(), GradType::kFloat32, 0, nullptr) == 0.0);
  CHECK(sum_of_squares(f.data(), GradType::kFloat32, 3, nullptr) ==
        double(f[0]) * f[0] + double(f[1]) * f[1] + double(f[2]) * f[2]);
}

TEST_CASE("clip_scale follows clip_grad_norm_") {
  CHECK(clip_scale(0.5, 1.0) == 1.0f);
  CHECK(clip_scale(2.0, 1.0) == (1.0f / (2.0f + 1e-6f)) * 1.0f);
  CHECK(clip_scale(10.0, 1.0) == doctest::Approx(0.1).epsilon(1e-6));
  CHECK(clip_scale(0.0, 1.0) == 1.0f);
  CHECK(std::isnan(clip_scale(std::nan(""), 1.0)));
}

TEST_CASE("conversions: exhaustive round trips and known values") {
  for (uint32_t x = 0; x < 65536; ++x) {
    const auto b = static_cast<uint16_t>(x);
    const float f = bf16_to_f32(b);
    if (std::isnan(f)) {
      CHECK(std::isnan(bf16_to_f32(f32_to_bf16(f))));
    } else {
      REQUIRE(f32_to_bf16(f) == b);
    }
    const float g = f16_to_f32(b);
    if (std::isnan(g)) {
      CHECK(std::isnan(f16_to_f32(f32_to_f16(g))));
    } else {
      REQUIRE(f32_to_f16(g) == b);
    }
  }
  CHECK(f32_to_bf16(1.0f) == 0x3F80);
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3F808000u)) == 0x3F80);  // tie, even stays
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3F818000u)) == 0x3F82);  // tie, odd rounds up
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3F808001u)) == 0x3F81);
  CHECK(f32_to_f16(65504.0f) == 0x7BFF);
  CHECK(f32_to_f16(65520.0f) == 0x7C00);
  CHECK(f32_to_f16(65519.99f) == 0x7BFF);
  CHECK(f32_to_f16(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000);                      // tie to even (0)
  CHECK(f32_to_f16(std::ldexp(1.5f, -25)) == 0x0001);
  CHECK(f32_to_f16(-0.0f) == 0x8000);
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
  CHECK(f16_to_f32(0x3C00) == 1.0f);
  std::vector<float> src = {1.0f, -2.5f, 3.14159f, 1e-30f};
  std::vector<uint16_t> mid(src.size());
  std::vector<float> back(src.size());
  f32_to_bf16(src.data(), mid.data(), 4);
  bf16_to_f32(mid.data(), back.data(), 4);
  for (size_t i = 0; i < src.size(); ++i) CHECK(back[i] == bf16_to_f32(f32_to_bf16(src[i])));
}

TEST_CASE("adamw: identical results for 1 and 4 threads, all output kinds") {
  const int64_t n = 100003;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> p0(n), g(n);
  std::vector<uint16_t> gb(n);
  for (int64_t i = 0; i < n; ++i) {
    p0[i] = nd(rng);
    g[i] = nd(rng) * 1e-2f;
    gb[i] = f32_to_bf16(g[i]);
  }
  for (GradType gt : {GradType::kFloat32, GradType::kBFloat16}) {
    std::vector<float> res[2];
    std::vector<uint16_t> outs[2];
    int k = 0;
    for (int threads : {1, 4}) {
      ThreadPool pool(threads);
      std::vector<float> p = p0, m(n, 0.0f), v(n, 0.0f);
      std::vector<uint16_t> out(n);
      AdamWBuffers b;
      b.param = p.data();
      b.exp_avg = m.data();
      b.exp_avg_sq = v.data();
      b.grad = gt == GradType::kFloat32 ? static_cast<const void*>(g.data()) : gb.data();
      b.grad_type = gt;
      b.out = out.data();
      b.out_type = OutType::kBFloat16;
      b.n = n;
      AdamWHyper h;
      h.lr = 1e-3;
      h.weight_decay = 0.1;
      for (int step = 1; step <= 3; ++step) adamw_step(b, h, step, 0.7f, &pool);
      int64_t bad = 0;
      for (int64_t i = 0; i < n; ++i) bad += out[i] != f32_to_bf16(p[i]);
      CHECK(bad == 0);
      res[k] = p;
      outs[k] = out;
      ++k;
    }
    CHECK(std::memcmp(res[0].data(), res[1].data(), n * sizeof(float)) == 0);
    CHECK(outs[0] == outs[1]);
  }
  CHECK_THROWS_AS(adamw_coeffs(AdamWHyper{}, 0, 1.0f), std::invalid_argument);
  MESSAGE("adamw kernels: " << std::string(adamw_isa()));
}
