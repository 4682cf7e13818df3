// Tensor-parallel segments (docs/plan-format.md "Tensor-parallel segments", docs/design.md "Tensor parallelism"): a
// plan splits a tp stage's `forward S m` / `backward S m` into segments with `allreduce part(S,m) seg=k` (backward:
// partgrad) between them. The executor runs the whole forward (or backward) body on a thread of its own
// (SegmentRun); each all-reduce the plan names (TpComm::allreduce_sum_planned: g forward, f backward) parks that
// thread with its partial sum. So `forward S m seg=k` runs the stage's computation up to its k-th all-reduce, the
// `allreduce` instruction sums the parked tensor over the tp group where and when the plan puts it (on the executor's
// thread and stream), and the next segment resumes the computation with the sum. One autograd graph per stage and
// micro-batch, as without segments; the instruction, not autograd, decides when each collective runs, and a plan
// whose segments and collectives do not match what the computation issues is refused (ExecError) at the instruction
// where they part. The executor and a run's thread never run at the same time (each waits for the other).
#pragma once
#include <ATen/ATen.h>
#include <ATen/ThreadLocalState.h>

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "engine/exec/tp_comm.hpp"

namespace mmoc::engine {

class SegmentRun {
 public:
  // body: the stage's forward or backward; setup: run first on the new thread (the executor's CUDA stream). The
  // executor's thread-local state (grad mode, ...) is carried over.
  SegmentRun(std::function<void()> body, std::function<void()> setup)
      : body_(std::move(body)), setup_(std::move(setup)), tls_() {}
  SegmentRun(const SegmentRun&) = delete;
  SegmentRun& operator=(const SegmentRun&) = delete;
  // An unfinished run (a step that failed) is aborted: its parked all-reduce throws, its thread unwinds and is joined.
  ~SegmentRun() {
    if (!th_.joinable()) return;
    {
      std::lock_guard<std::mutex> lk(mu_);
      abort_ = true;
    }
    cv_.notify_all();
    th_.join();
  }

  // Segment 0: starts the body; returns when it has parked its first planned all-reduce or ended.
  void start() {
    th_ = std::thread([this] {
      at::ThreadLocalStateGuard g(tls_);
      try {
        if (setup_) setup_();
        body_();
      } catch (...) {
        err_ = std::current_exception();
      }
      std::lock_guard<std::mutex> lk(mu_);
      state_ = kFinished;
      cv_.notify_all();
    });
    wait_parked();
  }
  // The next segment: the parked all-reduce has been summed; run to the next one or the end.
  void resume() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (state_ != kSummed) throw std::logic_error("SegmentRun::resume: no summed all-reduce to resume from");
      state_ = kRunning;
    }
    cv_.notify_all();
    wait_parked();
  }
  bool posted() const { std::lock_guard<std::mutex> lk(mu_); return state_ == kPosted; }
  bool finished() const { std::lock_guard<std::mutex> lk(mu_); return state_ == kFinished; }
  int done() const { std::lock_guard<std::mutex> lk(mu_); return done_; }  // all-reduces summed so far
  at::Tensor& tensor() { std::lock_guard<std::mutex> lk(mu_); return *posted_; }
  // The parked all-reduce has been summed (by the allreduce instruction); the run stays parked until resume().
  void complete() {
    std::lock_guard<std::mutex> lk(mu_);
    if (state_ != kPosted) throw std::logic_error("SegmentRun::complete: nothing parked");
    state_ = kSummed;
    ++done_;
  }
  // After the end: the body's exception, if any.
  void finish() {
    if (th_.joinable()) th_.join();
    if (err_) std::rethrow_exception(err_);
  }

  // From the body (its thread, or autograd's device thread that runs its backward): park t until it is summed and
  // the next segment resumes.
  void post(at::Tensor& t) {
    std::unique_lock<std::mutex> lk(mu_);
    posted_ = &t;
    state_ = kPosted;
    cv_.notify_all();
    cv_.wait(lk, [&] { return state_ == kRunning || abort_; });
    posted_ = nullptr;
    if (abort_) throw std::runtime_error("tensor-parallel segment aborted (the step failed)");
  }

 private:
  enum State { kRunning, kPosted, kSummed, kFinished };
  void wait_parked() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return state_ == kPosted || state_ == kFinished; });
  }
  std::function<void()> body_, setup_;
  at::ThreadLocalState tls_;  // the executor's, captured at construction
  std::thread th_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  State state_ = kRunning;
  int done_ = 0;
  at::Tensor* posted_ = nullptr;
  bool abort_ = false;
  std::exception_ptr err_;
};

// The tp group as the model code sees it in a plan run: the planned all-reduces go to the active SegmentRun (the one
// the executor is running a segment of), or, outside segments (a whole forward/backward, evaluation), straight to
// the group; everything else goes straight to the group.
class SegmentTpComm final : public TpComm {
 public:
  explicit SegmentTpComm(TransportTpComm* inner) : inner_(inner) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  void allreduce_sum(at::Tensor& t) override { inner_->allreduce_sum(t); }
  void allreduce_max(at::Tensor& t) override { inner_->allreduce_max(t); }
  at::Tensor allgather(const at::Tensor& t) override { return inner_->allgather(t); }
  void allreduce_sum_planned(at::Tensor& t) override {
    if (active) active->post(t);
    else inner_->allreduce_sum(t);
  }
  SegmentRun* active = nullptr;  // set by the executor while a segment runs

 private:
  TransportTpComm* inner_;
};

}  // namespace mmoc::engine
