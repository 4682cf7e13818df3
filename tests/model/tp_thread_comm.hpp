// An in-process tensor-parallel group for tests: one thread per rank, collectives through a shared slot table and a
// barrier. Rank 0 computes every result (sums and maxima in rank order), so all ranks get the same bits, as a real
// all-reduce gives them. A rank that throws aborts the others (their waiting collectives throw) and run() rethrows
// the first error; a collective that waits longer than the timeout throws too, so a mismatched test cannot hang.
#pragma once
#include <ATen/ATen.h>

#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/model/tp.hpp"

namespace mmoc::test {

class ThreadGroup {
 public:
  explicit ThreadGroup(int n, std::chrono::seconds timeout = std::chrono::seconds(120))
      : n_(n), timeout_(timeout), slots_(n) {}

  // Runs fn(comm) for every rank on its own thread; rethrows the first exception a rank threw.
  void run(const std::function<void(engine::TpComm&)>& fn) {
    count_ = 0;
    aborted_ = false;
    error_ = nullptr;
    std::vector<std::thread> threads;
    for (int r = 0; r < n_; ++r)
      threads.emplace_back([this, r, &fn] {
        Comm c(*this, r);
        try {
          fn(c);
        } catch (const Aborted&) {
        } catch (...) {
          std::lock_guard<std::mutex> g(mu_);
          if (!error_) error_ = std::current_exception();
          aborted_ = true;
          cv_.notify_all();
        }
      });
    for (auto& t : threads) t.join();
    if (error_) std::rethrow_exception(error_);
    if (aborted_) throw std::runtime_error("ThreadGroup: a collective timed out");
  }

  int collectives() const { return count_; }  // how many collectives the last run issued (per rank)

 private:
  struct Aborted {};
  enum class Op { Sum, Max, Gather };

  class Comm : public engine::TpComm {
   public:
    Comm(ThreadGroup& g, int r) : g_(g), r_(r) {}
    int rank() const override { return r_; }
    int size() const override { return g_.n_; }
    void allreduce_sum(at::Tensor& t) override { t.copy_(g_.collective(r_, t, Op::Sum)); }
    void allreduce_max(at::Tensor& t) override { t.copy_(g_.collective(r_, t, Op::Max)); }
    at::Tensor allgather(const at::Tensor& t) override { return g_.collective(r_, t, Op::Gather); }

   private:
    ThreadGroup& g_;
    int r_;
  };

  void barrier() {
    std::unique_lock<std::mutex> lk(mu_);
    if (aborted_) throw Aborted{};
    const long gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lk, timeout_, [&] { return generation_ != gen || aborted_; })) {
      aborted_ = true;
      cv_.notify_all();
      throw Aborted{};
    }
    if (aborted_) throw Aborted{};
  }

  at::Tensor collective(int r, const at::Tensor& t, Op op) {
    if (!t.is_contiguous()) throw std::invalid_argument("ThreadGroup: collectives take contiguous tensors");
    slots_[r] = t;
    barrier();
    if (r == 0) {
      for (int i = 1; i < n_; ++i)
        if (slots_[i].sizes() != slots_[0].sizes() || slots_[i].scalar_type() != slots_[0].scalar_type())
          throw std::runtime_error("ThreadGroup: ranks passed different shapes or dtypes to one collective");
      if (op == Op::Gather) {
        result_ = at::stack(slots_);
      } else {
        result_ = slots_[0].clone();
        for (int i = 1; i < n_; ++i) {
          if (op == Op::Sum) result_.add_(slots_[i]);
          else result_ = at::maximum(result_, slots_[i]);
        }
      }
      ++count_;
    }
    barrier();
    at::Tensor out = result_.clone();
    barrier();  // nobody reuses the slots or the result before every rank has its copy
    slots_[r] = at::Tensor();
    return out;
  }

  const int n_;
  const std::chrono::seconds timeout_;
  std::vector<at::Tensor> slots_;
  at::Tensor result_;
  int count_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  long generation_ = 0;
  bool aborted_ = false;
  std::exception_ptr error_;
};

}  // namespace mmoc::test
