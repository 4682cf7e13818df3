#include "engine/exec/cpu_stream.hpp"

#include <cstdio>
#include <cstdlib>

#include "common/gpu_clock.hpp"

namespace mmoc::engine {

double now_us() { return mmoc::steady_us(); }  // the clock ClockSampler stamps its readings with (the trace's clock)

CpuStream::CpuStream() : th_([this] { loop(); }) {}

CpuStream::~CpuStream() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  th_.join();
}

std::shared_future<void> CpuStream::submit(std::function<void()> fn) {
  std::packaged_task<void()> task(std::move(fn));
  std::shared_future<void> f = task.get_future().share();
  {
    std::lock_guard<std::mutex> g(mu_);
    q_.push_back(std::move(task));
  }
  cv_.notify_one();
  return f;
}

void CpuStream::loop() {
  for (;;) {
    std::packaged_task<void()> t;
    {
      std::unique_lock<std::mutex> g(mu_);
      cv_.wait(g, [&] { return stop_ || !q_.empty(); });
      if (q_.empty()) return;
      t = std::move(q_.front());
      q_.pop_front();
    }
    t();
  }
}

double Watchdog::limit_from_env() {
  const char* e = std::getenv("MMOC_WATCHDOG_S");
  return e ? std::atof(e) : 120.0;
}

Watchdog::Watchdog(double limit_s, std::string who, std::function<std::string(int)> describe) {
  if (limit_s <= 0) return;
  last_progress_us_ = now_us();
  th_ = std::thread([this, limit_s, who = std::move(who), describe = std::move(describe)] {
    bool reported = false;
    while (!stop_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      const int i = at_instr_.load();
      if (i < 0) {
        last_progress_us_ = now_us();
        reported = false;
        continue;
      }
      if (!reported && now_us() - last_progress_us_.load() > limit_s * 1e6) {
        std::fprintf(stderr, "mmoc watchdog: %s made no progress for %.0f s; its host thread is at:\n%s", who.c_str(), limit_s,
                     describe(i).c_str());
        reported = true;
      }
    }
  });
}

Watchdog::~Watchdog() {
  stop_ = true;
  if (th_.joinable()) th_.join();
}

}  // namespace mmoc::engine
