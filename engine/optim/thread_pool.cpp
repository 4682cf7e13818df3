#include "engine/optim/thread_pool.hpp"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace mmoc::engine::optim {

namespace {
std::atomic<bool> g_pin_warned{false};

bool pin_to_cpu(std::thread& t, int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (cpu < 0 || cpu >= CPU_SETSIZE) return false;
  CPU_SET(cpu, &set);
  const int rc = pthread_setaffinity_np(t.native_handle(), sizeof(set), &set);
  if (rc != 0 && !g_pin_warned.exchange(true)) {
    std::fprintf(stderr, "mmoc optim: warning: could not pin a worker thread to CPU %d (%s); running unpinned\n",
                 cpu, std::strerror(rc));
  }
  return rc == 0;
}
}  // namespace

ThreadPool::ThreadPool(int num_threads, std::vector<int> pin_cpus, Schedule schedule) : schedule_(schedule) {
  if (const char* e = std::getenv("MMOC_POOL_SCHEDULE")) {
    const std::string v = e;
    if (v == "static") schedule_ = Schedule::kStatic;
    else if (v == "dynamic") schedule_ = Schedule::kDynamic;
    else if (!v.empty()) std::fprintf(stderr, "mmoc optim: warning: MMOC_POOL_SCHEDULE=%s is not static or dynamic; ignored\n", e);
  }
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  if (num_threads <= 0) num_threads = 1;
  num_threads_ = num_threads;
  bool all_ok = !pin_cpus.empty();
  workers_.reserve(num_threads_ - 1);
  for (int i = 1; i < num_threads_; ++i) {
    workers_.emplace_back([this, i] { worker_loop(i); });
    if (!pin_cpus.empty()) {
      const int cpu = pin_cpus[static_cast<size_t>(i) % pin_cpus.size()];
      if (!pin_to_cpu(workers_.back(), cpu)) {
        all_ok = false;
        if (!g_pin_warned.exchange(true)) {
          std::fprintf(stderr, "mmoc optim: warning: invalid CPU %d for pinning; running unpinned\n", cpu);
        }
      }
    }
  }
  pinned_ok_ = all_ok && num_threads_ > 1;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::static_range(int64_t n, int64_t chunk, int t, int num_threads, int64_t* begin, int64_t* end) {
  if (chunk < 1) chunk = 1;
  const int64_t chunks = n <= 0 ? 0 : (n + chunk - 1) / chunk;
  const int64_t c0 = chunks * t / num_threads;
  const int64_t c1 = chunks * (t + 1) / num_threads;
  *begin = std::min(n, c0 * chunk);
  *end = std::min(n, c1 * chunk);
}

void ThreadPool::run_share(int index) {
  try {
    if (schedule_ == Schedule::kStatic) {
      int64_t b = 0, e = 0;
      static_range(n_, chunk_, index, num_threads_, &b, &e);
      if (b < e) (*fn_)(b, e);
      return;
    }
    const int64_t chunks = (n_ + chunk_ - 1) / chunk_;
    for (;;) {
      const int64_t c0 = next_chunk_.fetch_add(run_chunks_, std::memory_order_relaxed);
      if (c0 >= chunks) return;
      const int64_t c1 = std::min(chunks, c0 + run_chunks_);
      (*fn_)(c0 * chunk_, std::min(n_, c1 * chunk_));
    }
  } catch (...) {
    next_chunk_.store(INT64_MAX / 2, std::memory_order_relaxed);  // the others stop claiming
    std::lock_guard<std::mutex> lk(mu_);
    if (!error_) error_ = std::current_exception();
  }
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      start_cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    run_share(index);
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (chunk < 1) chunk = 1;
  std::lock_guard<std::mutex> call_lk(call_mu_);
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (num_threads_ == 1 || chunks == 1) {
    fn(0, n);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    n_ = n;
    chunk_ = chunk;
    // about 8 runs per thread: small enough that a thread slowed to half speed costs the call little, large enough
    // (AdamW: ~1.5M elements per run for a 7B layer on 16 threads) that claiming is free and prefetchers stream
    run_chunks_ = std::max<int64_t>(1, chunks / (8 * static_cast<int64_t>(num_threads_)));
    next_chunk_.store(0, std::memory_order_relaxed);
    fn_ = &fn;
    error_ = nullptr;
    pending_ = num_threads_ - 1;
    ++generation_;
  }
  start_cv_.notify_all();
  run_share(0);
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    fn_ = nullptr;
    err = error_;
    error_ = nullptr;
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace mmoc::engine::optim
