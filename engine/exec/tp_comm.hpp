// The collectives of one tensor-parallel group (engine/model/tp.hpp's TpComm) over the job's transport: gloo on the
// CPU, NCCL on CUDA, on the concrete group "tp.g<p>.r<d>" (ir::rank_group) of this rank's pipeline rank and replica.
// Every shard runs the same program, so the forward and backward of a stage issue the same collectives in the same
// order on every member (what the transports match by).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <string>
#include <vector>

#include "engine/comm/transport.hpp"
#include "engine/model/tp.hpp"

namespace mmoc::engine {

class TransportTpComm final : public TpComm {
 public:
  // inflight: where CUDA works are kept until the step ends (the worker's; it waits for them)
  TransportTpComm(comm::Transport* tr, std::string group, int rank, int size, bool cuda, std::vector<comm::WorkPtr>* inflight)
      : tr_(tr), group_(std::move(group)), rank_(rank), size_(size), cuda_(cuda), inflight_(inflight) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(at::Tensor& t) override { reduce(t, false); }
  void allreduce_max(at::Tensor& t) override { reduce(t, true); }
  // A zero-padded sum: rank i's t in row i, zeros elsewhere, summed over the group (exact: x + 0 = x).
  at::Tensor allgather(const at::Tensor& t) override {
    std::vector<int64_t> shape{size_};
    for (auto d : t.sizes()) shape.push_back(d);
    at::Tensor out = at::zeros(shape, t.options().requires_grad(false));
    out[rank_].copy_(t.detach());
    reduce(out, false);
    return out;
  }
  const std::string& group() const { return group_; }

 private:
  void reduce(at::Tensor& t, bool max) {
    if (!tr_) throw std::runtime_error("tensor parallelism over '" + group_ + "' without a transport");
    if (!t.is_contiguous()) {  // the transports reduce contiguous memory in place
      at::Tensor c = t.contiguous();
      reduce(c, max);
      t.copy_(c);
      return;
    }
    if (!cuda_) {
      if (max) tr_->allreduce_max(t, group_);
      else tr_->allreduce_sum(t, group_);
      return;
    }
    // NCCL runs it on the transport's collective stream: the tensor must be complete there first (its producer ran
    // on the current stream), and the current stream's later work waits for the result
    const c10::cuda::CUDAStream cur = c10::cuda::getCurrentCUDAStream();
    at::cuda::CUDAEvent ready(cudaEventDisableTiming);
    ready.record(cur);
    ready.synchronize();
    comm::WorkPtr w = max ? tr_->iallreduce_max(t, group_) : tr_->iallreduce_sum(t, group_);
    w->wait_on_stream(cur.stream());
    std::lock_guard<std::mutex> lk(mu_);  // autograd's device thread runs the backward's collectives
    inflight_->push_back(std::move(w));
  }

  comm::Transport* tr_;
  std::string group_;
  int rank_, size_;
  bool cuda_;
  std::vector<comm::WorkPtr>* inflight_;
  std::mutex mu_;
};

}  // namespace mmoc::engine
