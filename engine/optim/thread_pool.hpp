// A small fixed-size thread pool for the CPU optimizer (torch-free).
//
// parallel_for(n, chunk, fn) splits [0, n) into ceil(n / chunk) chunks of `chunk` elements and calls fn(begin, end) on
// disjoint runs of whole chunks that cover [0, n) exactly once; begin is a multiple of `chunk`. Two schedules:
//  - dynamic (the default): the threads claim runs of about C / (8 T) chunks from a shared counter until none is
//    left, so a thread that shares its core with another busy thread (mmoc-run's issuing thread spins on CUDA events)
//    takes fewer runs instead of holding every other thread up at the end of the call. fn may run several times on
//    one thread.
//  - static: thread t gets the one run [t*C/T, (t+1)*C/T) (static_range), fn at most once per thread.
// Elementwise work therefore gives bit-identical results under either schedule and any thread count, and per-chunk
// partial results (see sum_of_squares) can be combined in chunk order, independent of both.
// MMOC_POOL_SCHEDULE=static|dynamic (read when a pool is made) overrides the constructor's choice, for A/B runs.
//
// The calling thread takes part as thread 0; the pool owns num_threads - 1 workers. Calls to
// parallel_for from several threads are serialised. The first exception thrown by fn is rethrown to the
// caller after all threads have finished (under the dynamic schedule the others then claim no further runs).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mmoc::engine::optim {

class ThreadPool {
 public:
  // num_threads <= 0: std::thread::hardware_concurrency(). pin_cpus: if non-empty, worker i (1-based;
  // the caller is thread 0 and is never pinned) is pinned to pin_cpus[i % size] with
  // pthread_setaffinity_np. A pinning failure is ignored after one warning on stderr.
  enum class Schedule { kDynamic, kStatic };
  explicit ThreadPool(int num_threads = 0, std::vector<int> pin_cpus = {}, Schedule schedule = Schedule::kDynamic);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }
  bool pinned() const { return pinned_ok_; }
  Schedule schedule() const { return schedule_; }

  void parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

  // The range thread `t` of `num_threads` gets (exposed for tests and for callers that shard by hand).
  static void static_range(int64_t n, int64_t chunk, int t, int num_threads, int64_t* begin, int64_t* end);

 private:
  void worker_loop(int index);
  void run_share(int index);

  int num_threads_;
  bool pinned_ok_ = false;
  Schedule schedule_ = Schedule::kDynamic;
  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // serialises parallel_for callers

  std::mutex mu_;
  std::condition_variable start_cv_;
  std::condition_variable done_cv_;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
  // Current job.
  int64_t n_ = 0;
  int64_t chunk_ = 1;
  int64_t run_chunks_ = 1;             // dynamic: chunks per claimed run
  std::atomic<int64_t> next_chunk_{0};  // dynamic: the first chunk not yet claimed
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  std::exception_ptr error_;
};

}  // namespace mmoc::engine::optim
