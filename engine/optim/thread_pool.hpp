// A small fixed-size thread pool for the CPU optimizer (torch-free).
//
// parallel_for(n, chunk, fn) splits [0, n) into ceil(n / chunk) chunks of `chunk` elements and gives
// each of the pool's threads one contiguous run of whole chunks (static partition: thread t gets chunks
// [t*C/T, (t+1)*C/T)). fn(begin, end) is called at most once per thread; begin is a multiple of `chunk`.
// Elementwise work therefore gives bit-identical results for any thread count, and per-chunk partial
// results (see sum_of_squares) can be combined in chunk order, independent of the thread count.
//
// The calling thread takes part as thread 0; the pool owns num_threads - 1 workers. Calls to
// parallel_for from several threads are serialised. The first exception thrown by fn is rethrown to the
// caller after all threads have finished.
#pragma once

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
  explicit ThreadPool(int num_threads = 0, std::vector<int> pin_cpus = {});
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }
  bool pinned() const { return pinned_ok_; }

  void parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

  // The range thread `t` of `num_threads` gets (exposed for tests and for callers that shard by hand).
  static void static_range(int64_t n, int64_t chunk, int t, int num_threads, int64_t* begin, int64_t* end);

 private:
  void worker_loop(int index);
  void run_share(int index);

  int num_threads_;
  bool pinned_ok_ = false;
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
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  std::exception_ptr error_;
};

}  // namespace mmoc::engine::optim
