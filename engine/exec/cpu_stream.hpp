// Host threads of a worker: the `cpu` stream and the watchdog. Torch-free.
//
// CpuStream: on GPU machines, the host side of the plan's `cpu` stream: one thread that runs the submitted tasks
// in order (each task waits for its own dependencies first); the optimizer's parallelism is its thread pool.
//
// Watchdog: a thread that prints where the worker's host thread is when it has made no progress for a while
// (a hung collective, a GPU that stopped). The host thread reports its position with at(i); at(-1) means it is
// outside a step (no timer runs).
#pragma once
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <thread>

namespace mmoc::engine {

double now_us();  // steady clock, microseconds

class CpuStream {
 public:
  CpuStream();
  ~CpuStream();  // runs what is queued, then joins
  CpuStream(const CpuStream&) = delete;
  CpuStream& operator=(const CpuStream&) = delete;
  // Queues fn; the future rethrows what fn threw.
  std::shared_future<void> submit(std::function<void()> fn);

 private:
  void loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<void()>> q_;
  bool stop_ = false;
  std::thread th_;
};

class Watchdog {
 public:
  // limit_s <= 0: no thread, at() only records. describe(i) explains instruction i (called on the watchdog's
  // thread). The report is printed once per stall to stderr, prefixed "mmoc watchdog: <who> ...".
  Watchdog(double limit_s, std::string who, std::function<std::string(int)> describe);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  // MMOC_WATCHDOG_S (default 120 s; 0 turns it off).
  static double limit_from_env();
  void at(int instr) {
    at_instr_.store(instr);
    last_progress_us_.store(now_us());
  }
  int position() const { return at_instr_.load(); }

 private:
  std::atomic<int> at_instr_{-1};
  std::atomic<double> last_progress_us_{0};
  std::atomic<bool> stop_{false};
  std::thread th_;
};

}  // namespace mmoc::engine
