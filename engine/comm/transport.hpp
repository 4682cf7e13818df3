// mmoc::comm — rendezvous and the Transport the engine's interpreter uses for send/recv/allreduce/gradnorm.
//
// Light header: at::Tensor and cudaStream_t are forward-declared; include <ATen/core/Tensor.h> (or
// torch) where tensors are used. Backends:
//   gloo  (CPU tensors)  c10d::ProcessGroupGloo over the TCPStore rendezvous.
//   nccl  (CUDA tensors) raw NCCL, unique ids exchanged through the TCPStore; only when built with
//                        MMOC_WITH_NCCL (nccl_available() says).
//
// Tags. A plan's send and its recv carry the same string tag (F.S<s>.m<k>, B.S<s>.m<k>).
//   gloo: the tag maps to a 31-bit integer, tag_to_int(tag) = FNV-1a-64(tag) folded to 31 bits (stable
//     across processes, builds and platforms), and gloo matches a recv to the send of the same peer with the
//     same integer, whatever the order of issue. So several sends to one peer may be in flight and be
//     received in any order. Two different tags used with the same peer that map to the same integer are an
//     error (CommError naming both) instead of a silent mismatch; reusing one tag (the same tag every step)
//     is fine: uses of one tag are matched in issue order. Collective slots are disjoint from these.
//   nccl: NCCL matches point-to-point operations between a pair in issue order only: the n-th send r->p
//     meets the n-th recv at p from r. The tag is not transmitted; the plan must issue each pair's sends
//     and recvs in the same order (the p2p stream runs in program order). With check_tags
//     (NcclOptions or MMOC_COMM_CHECK_TAGS=1) every send also publishes its tag in the store under
//     "<pair>/<n>" and the receiver compares: an order mismatch becomes a CommError naming both tags.
//
// Collectives (allreduce_sum*, barrier, create_group) must be issued in the same order on all ranks
// concerned, from one thread. Point-to-point calls may come from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/comm/world.hpp"

namespace at {
class Tensor;
}
struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace mmoc::comm {

// Completion of an asynchronous operation. Owns whatever must stay alive until completion (the tensors).
// Dropping a Work without wait() is allowed (the operation still completes), but then nothing tells you when.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks the calling thread until the operation completed; throws CommError on failure or timeout.
  virtual void wait() = 0;
  // Non-blocking completion check (throws CommError when the operation failed).
  virtual bool is_completed() = 0;
  // GPU backends: make `stream` wait for completion without blocking the host. CPU backends: wait().
  virtual void wait_on_stream(CUstream_st* /*stream*/) { wait(); }
};
using WorkPtr = std::unique_ptr<Work>;

// The rendezvous: the job's c10d::TCPStore at MASTER_ADDR:MASTER_PORT. A launcher hosts it (mmoc-run's node 0,
// torchrun's agent: WorldInfo::agent_store) or else rank 0 does; every rank's keys live under
// WorldInfo::store_prefix. connect() is also the start barrier: each rank registers (node, host, pid) and waits
// for all world_size ranks.
class Rendezvous {
 public:
  // Connects (or hosts), registers and waits until all world_size ranks joined. Throws CommError after
  // `timeout`: naming the address when the store cannot be reached, or naming the ranks that did not join and
  // their node per the placement ("ranks 2-3 (node 1) did not join"). A rank that reports another world size
  // is an error too. The rendezvous becomes the process's current job (current_job()).
  static std::shared_ptr<Rendezvous> connect(const WorldInfo& world,
                                             std::chrono::milliseconds timeout = std::chrono::seconds(300));
  ~Rendezvous();
  const WorldInfo& world() const;
  std::chrono::milliseconds timeout() const;
  void set(const std::string& key, const std::string& value);
  // Waits for the key up to timeout(); throws CommError naming the key on timeout.
  std::string get(const std::string& key);
  int64_t add(const std::string& key, int64_t delta);
  // A fresh key prefix "mmoc/<what>/<n>/" — deterministic when all ranks call in the same order.
  std::string next_prefix(const std::string& what);

  // "rank 3 (node 1, host gpu02)" (just "rank 3" on one node), from what each rank reported when it joined.
  std::string describe_rank(int rank) const;
  int node_of(int rank) const;  // -1: unknown
  bool hosts_store() const;     // this process hosts the job's store (rank 0 without an agent store)
  std::string store_address() const;  // "host:port"
  // Who hosts the store, for messages: "rank 0 (node 0, host a)", "node 0's mmoc-run", "torchrun's agent on node 0".
  std::string store_host() const;

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  explicit Rendezvous(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// The rendezvous of the last connect() in this process (also when its barrier failed), else null.
std::shared_ptr<Rendezvous> current_job();

// One point-to-point operation of a batch.
struct P2POp {
  enum Kind { kSend, kRecv } kind;
  at::Tensor* tensor;  // send: the data; recv: the pre-allocated destination. Must outlive the call.
  int peer;
  std::string tag;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* backend() const = 0;  // "gloo" | "nccl"
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }

  // Blocking send/recv. `out` must be pre-allocated with the sender's numel and element size, on the
  // backend's device kind; contiguous tensors are sent/received in place.
  void send(const at::Tensor& t, int peer, const std::string& tag);
  void recv(at::Tensor& out, int peer, const std::string& tag);
  virtual WorkPtr isend(const at::Tensor& t, int peer, const std::string& tag) = 0;
  virtual WorkPtr irecv(at::Tensor& out, int peer, const std::string& tag) = 0;
  // Issue several sends/recvs at once (NCCL: one ncclGroupStart/End, needed for exchanges in a ring).
  virtual WorkPtr batch_isend_irecv(const std::vector<P2POp>& ops) = 0;

  // Creates the named group of `ranks` (sorted, distinct, world ranks). Collective over ALL world ranks
  // (non-members too), like torch.distributed.new_group. "" and "world" name the whole world.
  virtual void create_group(const std::string& name, const std::vector<int>& ranks) = 0;
  // In-place sum over the group's ranks (this rank must be a member).
  void allreduce_sum(at::Tensor& t, const std::string& group = "");
  virtual WorkPtr iallreduce_sum(at::Tensor& t, const std::string& group = "") = 0;
  // In-place element-wise maximum over the group's ranks (tensor parallelism's cross-entropy).
  void allreduce_max(at::Tensor& t, const std::string& group = "");
  virtual WorkPtr iallreduce_max(at::Tensor& t, const std::string& group = "") = 0;
  // Sum of one double over the group (global gradient norm²); blocking.
  virtual double allreduce_sum_double(double v, const std::string& group = "") = 0;
  virtual void barrier(const std::string& group = "") = 0;

 protected:
  int rank_ = 0;
  int world_size_ = 1;
};

// Stable tag -> integer map used by the gloo backend (see the header comment). Result in [0, 2^31).
uint32_t tag_to_int(const std::string& tag);

struct GlooOptions {
  // Timeout of every gloo operation (a recv whose send never comes fails after it).
  std::chrono::milliseconds timeout = std::chrono::seconds(300);
  // Host/interface for gloo's sockets. Empty: 127.0.0.1 when MASTER_ADDR is a loopback address, else
  // $GLOO_SOCKET_IFNAME if set, else gloo's default (this host's name).
  std::string hostname;
  int threads = 2;  // gloo worker threads for collectives
};
// Throws CommError when built without gloo headers (see gloo_available()).
std::unique_ptr<Transport> make_gloo_transport(std::shared_ptr<Rendezvous> rdzv, const GlooOptions& options = {});
bool gloo_available();

struct NcclOptions {
  int device = -1;                  // CUDA device; -1: the world's local_rank
  CUstream_st* p2p_stream = nullptr;   // send/recv run here; null: a non-blocking stream owned by the transport
  CUstream_st* coll_stream = nullptr;  // allreduce/barrier run here; null: an owned non-blocking stream
  std::chrono::milliseconds timeout = std::chrono::seconds(300);  // wait() gives up (and aborts NCCL) after it
  bool check_tags = false;          // also enabled by MMOC_COMM_CHECK_TAGS=1
};
// Throws CommError when built without NCCL (see nccl_available()).
std::unique_ptr<Transport> make_nccl_transport(std::shared_ptr<Rendezvous> rdzv, const NcclOptions& options = {});
bool nccl_available();

}  // namespace mmoc::comm
