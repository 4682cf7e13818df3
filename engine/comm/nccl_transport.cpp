// CUDA Transport over raw NCCL. Compiled only with MMOC_WITH_NCCL; otherwise make_nccl_transport throws.
#include "engine/comm/transport.hpp"

#ifndef MMOC_WITH_NCCL

namespace mmoc::comm {
bool nccl_available() { return false; }
std::unique_ptr<Transport> make_nccl_transport(std::shared_ptr<Rendezvous>, const NcclOptions&) {
  throw CommError("make_nccl_transport: this build has no NCCL (configure with MMOC_WITH_NCCL=ON where the "
                  "CUDA toolkit and nccl.h are found)");
}
}  // namespace mmoc::comm

#else

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>

#include <chrono>
#include <functional>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "engine/comm/nccl_check.hpp"
#include "engine/comm/rendezvous_impl.hpp"

namespace mmoc::comm {
namespace {

ncclDataType_t nccl_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kDouble: return ncclFloat64;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kChar: return ncclInt8;
    case at::kByte: return ncclUint8;
    default: throw CommError(std::string("nccl: allreduce of dtype ") + c10::toString(t) + " is not supported");
  }
}

// Sets the CUDA device for a scope and restores the previous one.
struct DeviceScope {
  int prev = -1;
  explicit DeviceScope(int dev) {
    MMOC_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != dev) MMOC_CUDA_CHECK(cudaSetDevice(dev));
  }
  ~DeviceScope() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

// State shared by the transport and its outstanding works.
struct NcclState {
  int device = 0;
  std::chrono::milliseconds timeout{};
  ncclComm_t p2p = nullptr;
  ncclComm_t coll = nullptr;
  std::map<std::string, ncclComm_t> groups;  // name -> comm (nullptr on non-members)
  std::mutex mu;
  bool aborted = false;
  std::string abort_reason;

  void abort_all(const std::string& why) {
    std::lock_guard<std::mutex> lk(mu);
    if (aborted) return;
    aborted = true;
    abort_reason = why;
    for (auto& [n, c] : groups)
      if (c) ncclCommAbort(c);
    if (coll) ncclCommAbort(coll);
    if (p2p) ncclCommAbort(p2p);
  }
  void check_alive(const std::string& what) {
    std::lock_guard<std::mutex> lk(mu);
    if (aborted) throw CommError(what + ": the NCCL transport was aborted earlier (" + abort_reason + ")");
  }
};

// Polls an event with the transport's timeout, checking the communicator for asynchronous errors.
void wait_event(NcclState& st, ncclComm_t comm, cudaEvent_t ev, const std::string& what) {
  auto deadline = std::chrono::steady_clock::now() + st.timeout;
  for (int spins = 0;; ++spins) {
    cudaError_t e = cudaEventQuery(ev);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) {
      cudaGetLastError();
      throw CommError(what + ": CUDA error " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
    }
    ncclResult_t async = ncclSuccess;
    if (comm && ncclCommGetAsyncError(comm, &async) == ncclSuccess && async != ncclSuccess &&
        async != ncclInProgress) {
      std::string msg = what + ": NCCL asynchronous error: " + ncclGetErrorString(async);
      if (const char* last = ncclGetLastError(comm); last && *last) msg += std::string(" (") + last + ")";
      st.abort_all(msg);
      throw CommError(msg);
    }
    if (std::chrono::steady_clock::now() > deadline) {
      std::string msg = what + ": timed out after " + std::to_string(st.timeout.count()) +
                        " ms (peer never posted the matching operation?); NCCL communicators aborted";
      st.abort_all(msg);
      throw CommError(msg);
    }
    if (spins < 1000)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

class NcclWork : public Work {
 public:
  NcclWork(std::shared_ptr<NcclState> st, ncclComm_t comm, cudaEvent_t ev, std::string what,
           std::vector<at::Tensor> keep, std::vector<std::function<void()>> checks)
      : st_(std::move(st)), comm_(comm), ev_(ev), what_(std::move(what)), keep_(std::move(keep)),
        checks_(std::move(checks)) {}
  ~NcclWork() override {
    if (ev_) cudaEventDestroy(ev_);
  }
  void wait() override {
    run_checks();
    if (done_) return;
    wait_event(*st_, comm_, ev_, what_);
    done_ = true;
    keep_.clear();
  }
  bool is_completed() override {
    if (done_) return true;
    cudaError_t e = cudaEventQuery(ev_);
    if (e == cudaErrorNotReady) return false;
    wait();
    return true;
  }
  void wait_on_stream(CUstream_st* stream) override {
    run_checks();
    MMOC_CUDA_CHECK(cudaStreamWaitEvent(stream, ev_, 0));
  }

 private:
  void run_checks() {
    for (auto& c : checks_) c();
    checks_.clear();
  }
  std::shared_ptr<NcclState> st_;
  ncclComm_t comm_;
  cudaEvent_t ev_;
  std::string what_;
  std::vector<at::Tensor> keep_;
  std::vector<std::function<void()>> checks_;
  bool done_ = false;
};

class NcclTransport : public Transport {
 public:
  NcclTransport(std::shared_ptr<Rendezvous> rdzv, const NcclOptions& o) : rdzv_(std::move(rdzv)) {
    const WorldInfo& w = rdzv_->world();
    rank_ = w.rank;
    world_size_ = w.world_size;
    st_ = std::make_shared<NcclState>();
    st_->device = o.device >= 0 ? o.device : w.local_rank;
    st_->timeout = o.timeout;
    const char* chk = std::getenv("MMOC_COMM_CHECK_TAGS");
    check_tags_ = o.check_tags || (chk && std::strcmp(chk, "0") != 0 && *chk);
    ::setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
    prefix_ = rdzv_->next_prefix("nccl");

    int ndev = 0;
    MMOC_CUDA_CHECK(cudaGetDeviceCount(&ndev));
    if (st_->device >= ndev)
      throw CommError("nccl: " + who(w) + " wants CUDA device " + std::to_string(st_->device) + " but only " +
                      std::to_string(ndev) + " are visible");
    MMOC_CUDA_CHECK(cudaSetDevice(st_->device));
    p2p_stream_ = o.p2p_stream;
    coll_stream_ = o.coll_stream;
    if (!p2p_stream_) {
      MMOC_CUDA_CHECK(cudaStreamCreateWithFlags(&p2p_stream_, cudaStreamNonBlocking));
      own_p2p_ = true;
    }
    if (!coll_stream_) {
      MMOC_CUDA_CHECK(cudaStreamCreateWithFlags(&coll_stream_, cudaStreamNonBlocking));
      own_coll_ = true;
    }
    MMOC_CUDA_CHECK(cudaMalloc(&d_scratch_, 16));
    MMOC_CUDA_CHECK(cudaMallocHost(&h_scratch_, 16));
    // Two communicators: point-to-point and collectives, so that a collective on the coll stream never
    // queues behind (or in front of) a send/recv of another pair.
    st_->p2p = init_comm("p2p");
    st_->coll = init_comm("coll");
  }

  ~NcclTransport() override {
    {
      std::lock_guard<std::mutex> lk(st_->mu);
      if (!st_->aborted) {
        for (auto& [n, c] : st_->groups)
          if (c) ncclCommDestroy(c);
        if (st_->coll) ncclCommDestroy(st_->coll);
        if (st_->p2p) ncclCommDestroy(st_->p2p);
      }
      st_->groups.clear();
      st_->coll = st_->p2p = nullptr;
    }
    if (d_scratch_) cudaFree(d_scratch_);
    if (h_scratch_) cudaFreeHost(h_scratch_);
    if (own_p2p_) cudaStreamDestroy(p2p_stream_);
    if (own_coll_) cudaStreamDestroy(coll_stream_);
  }

  const char* backend() const override { return "nccl"; }

  WorkPtr isend(const at::Tensor& t, int peer, const std::string& tag) override {
    return batch_isend_irecv({P2POp{P2POp::kSend, const_cast<at::Tensor*>(&t), peer, tag}});
  }
  WorkPtr irecv(at::Tensor& out, int peer, const std::string& tag) override {
    return batch_isend_irecv({P2POp{P2POp::kRecv, &out, peer, tag}});
  }

  WorkPtr batch_isend_irecv(const std::vector<P2POp>& ops) override {
    std::string what;
    std::vector<at::Tensor> keep;
    std::vector<std::function<void()>> checks;
    for (const auto& op : ops) {
      const bool is_send = op.kind == P2POp::kSend;
      std::string desc = std::string(is_send ? "send to " : "recv from ") + rdzv_->describe_rank(op.peer) +
                         " tag '" + op.tag + "' (" + who(rdzv_->world()) + ", nccl)";
      if (!what.empty()) what += "; ";
      what += desc;
      if (op.peer < 0 || op.peer >= world_size_ || op.peer == rank_) throw CommError(desc + ": invalid peer");
      check_tensor(op.tensor, desc);
      keep.push_back(*op.tensor);
    }
    st_->check_alive(what);
    DeviceScope ds(st_->device);
    {
      // Sequence numbers and the NCCL enqueue happen under one lock so that the issue order seen by NCCL
      // is the order of the tag log.
      std::lock_guard<std::mutex> lk(issue_mu_);
      for (const auto& op : ops) {
        if (!check_tags_) break;
        if (op.kind == P2POp::kSend) {
          long n = send_seq_[op.peer]++;
          rdzv_->set(tag_key(rank_, op.peer, n), op.tag);
        } else {
          long n = recv_seq_[op.peer]++;
          std::string key = tag_key(op.peer, rank_, n);
          std::string expect = op.tag;
          int peer = op.peer;
          auto rdzv = rdzv_;
          checks.push_back([rdzv, key, expect, peer, n] {
            std::string got = rdzv->get(key);
            if (got != expect)
              throw CommError("nccl: tag order mismatch with rank " + std::to_string(peer) + ": recv #" +
                              std::to_string(n) + " expects tag '" + expect + "' but the peer's send #" +
                              std::to_string(n) + " has tag '" + got + "' (NCCL matches in issue order)");
          });
        }
      }
      MMOC_NCCL_CHECK_COMM(ncclGroupStart(), st_->p2p);
      for (const auto& op : ops) {
        const at::Tensor& t = *op.tensor;
        size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
        if (op.kind == P2POp::kSend)
          MMOC_NCCL_CHECK_COMM(ncclSend(t.const_data_ptr(), bytes, ncclInt8, op.peer, st_->p2p, p2p_stream_),
                               st_->p2p);
        else
          MMOC_NCCL_CHECK_COMM(ncclRecv(t.data_ptr(), bytes, ncclInt8, op.peer, st_->p2p, p2p_stream_), st_->p2p);
      }
      MMOC_NCCL_CHECK_COMM(ncclGroupEnd(), st_->p2p);
    }
    // The caching allocator now knows the p2p stream uses these tensors, so their memory is not handed out again
    // before the transfer is done: the work need not hold them. (Holding them until wait() kept every activation a
    // pipeline step sends or receives alive until the step's end.)
    for (auto& t : keep) record_stream(t, p2p_stream_);
    keep.clear();
    cudaEvent_t ev = record(p2p_stream_);
    return std::make_unique<NcclWork>(st_, st_->p2p, ev, what, std::move(keep), std::move(checks));
  }

  void create_group(const std::string& name, const std::vector<int>& ranks) override {
    if (name.empty() || name == "world") throw CommError("nccl: group name '" + name + "' is reserved");
    for (size_t i = 0; i < ranks.size(); ++i)
      if (ranks[i] < 0 || ranks[i] >= world_size_ || (i > 0 && ranks[i] <= ranks[i - 1]))
        throw CommError("nccl: group '" + name + "': ranks must be sorted, distinct and in [0, " +
                        std::to_string(world_size_) + ")");
    {
      std::lock_guard<std::mutex> lk(st_->mu);
      if (st_->groups.count(name)) throw CommError("nccl: group '" + name + "' already exists");
    }
    bool member = false;
    for (int r : ranks) member |= r == rank_;
    DeviceScope ds(st_->device);
    std::lock_guard<std::mutex> coll_lk(coll_mu_);
    ncclComm_t c = nullptr;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
    MMOC_NCCL_CHECK_COMM(ncclCommSplit(st_->coll, member ? 0 : NCCL_SPLIT_NOCOLOR, rank_, &c, nullptr), st_->coll);
#else
    throw CommError("nccl: create_group needs NCCL >= 2.18 (ncclCommSplit)");
#endif
    std::lock_guard<std::mutex> lk(st_->mu);
    st_->groups[name] = member ? c : nullptr;
  }

  WorkPtr iallreduce_sum(at::Tensor& t, const std::string& group) override { return iallreduce(t, group, ncclSum, "allreduce"); }
  WorkPtr iallreduce_max(at::Tensor& t, const std::string& group) override {
    return iallreduce(t, group, ncclMax, "allreduce (max)");
  }

  WorkPtr iallreduce(at::Tensor& t, const std::string& group, ncclRedOp_t op, const char* name) {
    std::string what = std::string(name) + " over group '" + group + "' (" + who(rdzv_->world()) + ", nccl)";
    check_tensor(&t, what);
    ncclComm_t c = comm_of(group, what);
    st_->check_alive(what);
    DeviceScope ds(st_->device);
    std::lock_guard<std::mutex> lk(coll_mu_);  // one thread at a time into a communicator
    MMOC_NCCL_CHECK_COMM(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()),
                                       nccl_dtype(t.scalar_type()), op, c, coll_stream_),
                         c);
    record_stream(t, coll_stream_);
    cudaEvent_t ev = record(coll_stream_);
    return std::make_unique<NcclWork>(st_, c, ev, what, std::vector<at::Tensor>{t},
                                      std::vector<std::function<void()>>{});
  }

  double allreduce_sum_double(double v, const std::string& group) override {
    std::string what = "allreduce_sum_double over group '" + group + "' (" + who(rdzv_->world()) + ", nccl)";
    ncclComm_t c = comm_of(group, what);
    st_->check_alive(what);
    DeviceScope ds(st_->device);
    std::lock_guard<std::mutex> lk(coll_mu_);
    std::memcpy(h_scratch_, &v, sizeof(double));
    MMOC_CUDA_CHECK(cudaMemcpyAsync(d_scratch_, h_scratch_, sizeof(double), cudaMemcpyHostToDevice, coll_stream_));
    MMOC_NCCL_CHECK_COMM(ncclAllReduce(d_scratch_, d_scratch_, 1, ncclFloat64, ncclSum, c, coll_stream_), c);
    MMOC_CUDA_CHECK(cudaMemcpyAsync(h_scratch_, d_scratch_, sizeof(double), cudaMemcpyDeviceToHost, coll_stream_));
    cudaEvent_t ev = record(coll_stream_);
    NcclWork w(st_, c, ev, what, {}, {});
    w.wait();  // under coll_mu_: the scratch buffers are reused by the next call
    double out;
    std::memcpy(&out, h_scratch_, sizeof(double));
    return out;
  }

  void barrier(const std::string& group) override {
    std::string what = "barrier over group '" + group + "' (" + who(rdzv_->world()) + ", nccl)";
    ncclComm_t c = comm_of(group, what);
    st_->check_alive(what);
    DeviceScope ds(st_->device);
    std::lock_guard<std::mutex> lk(coll_mu_);
    MMOC_NCCL_CHECK_COMM(ncclAllReduce(static_cast<char*>(d_scratch_) + 8, static_cast<char*>(d_scratch_) + 8, 1,
                                       ncclInt32, ncclSum, c, coll_stream_),
                         c);
    cudaEvent_t ev = record(coll_stream_);
    NcclWork w(st_, c, ev, what, {}, {});
    w.wait();
  }

 private:
  ncclComm_t init_comm(const std::string& name) {
    ncclUniqueId id;
    std::string key = prefix_ + name + "/unique_id";
    if (rank_ == 0) {
      MMOC_NCCL_CHECK(ncclGetUniqueId(&id));
      rdzv_->set(key, std::string(reinterpret_cast<const char*>(&id), sizeof(id)));
    } else {
      std::string v = rdzv_->get(key);
      if (v.size() != sizeof(id))
        throw CommError("nccl: the unique id under '" + key + "' has " + std::to_string(v.size()) +
                        " bytes, expected " + std::to_string(sizeof(id)) + " (mismatched NCCL versions?)");
      std::memcpy(&id, v.data(), sizeof(id));
    }
    ncclComm_t c = nullptr;
    MMOC_NCCL_CHECK(ncclCommInitRank(&c, world_size_, id, rank_));
    return c;
  }

  ncclComm_t comm_of(const std::string& group, const std::string& what) {
    if (group.empty() || group == "world") return st_->coll;
    std::lock_guard<std::mutex> lk(st_->mu);
    auto it = st_->groups.find(group);
    if (it == st_->groups.end()) throw CommError(what + ": unknown group (create_group it first)");
    if (!it->second) throw CommError(what + ": " + who(rdzv_->world()) + " is not a member");
    return it->second;
  }

  void check_tensor(const at::Tensor* t, const std::string& desc) const {
    if (!t || !t->defined()) throw CommError(desc + ": undefined tensor");
    if (!t->is_cuda() || t->get_device() != st_->device)
      throw CommError(desc + ": the nccl transport takes tensors on cuda:" + std::to_string(st_->device) +
                      ", got " + t->device().str());
    if (!t->is_contiguous()) throw CommError(desc + ": the tensor must be contiguous");
  }

  // Tell the caching allocator that `stream` uses t's memory, so freeing t early cannot hand it out again
  // before the communication completed.
  void record_stream(const at::Tensor& t, cudaStream_t stream) {
    if (!t.storage().data_ptr().get()) return;
    c10::cuda::CUDACachingAllocator::recordStream(
        t.storage().data_ptr(),
        c10::cuda::getStreamFromExternal(stream, static_cast<c10::DeviceIndex>(st_->device)));
  }

  cudaEvent_t record(cudaStream_t stream) {
    cudaEvent_t ev = nullptr;
    MMOC_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    MMOC_CUDA_CHECK(cudaEventRecord(ev, stream));
    return ev;
  }

  std::string tag_key(int src, int dst, long n) const {
    return prefix_ + "tags/" + std::to_string(src) + "->" + std::to_string(dst) + "/" + std::to_string(n);
  }

  std::shared_ptr<Rendezvous> rdzv_;
  std::shared_ptr<NcclState> st_;
  std::string prefix_;
  cudaStream_t p2p_stream_ = nullptr;
  cudaStream_t coll_stream_ = nullptr;
  bool own_p2p_ = false, own_coll_ = false;
  void* d_scratch_ = nullptr;
  void* h_scratch_ = nullptr;
  std::mutex coll_mu_;
  std::mutex issue_mu_;
  bool check_tags_ = false;
  std::map<int, long> send_seq_, recv_seq_;
};

}  // namespace

bool nccl_available() { return true; }

std::unique_ptr<Transport> make_nccl_transport(std::shared_ptr<Rendezvous> rdzv, const NcclOptions& options) {
  if (!rdzv) throw CommError("make_nccl_transport: null rendezvous");
  return std::make_unique<NcclTransport>(std::move(rdzv), options);
}

}  // namespace mmoc::comm

#endif  // MMOC_WITH_NCCL
