// TierStore: the NVMe tier's objects (e.g. one stage's fp32 master weights and AdamW moments), striped over one or
// more directories ("paths", usually on different devices) and moved by asynchronous direct I/O. Torch-free.
//
//   mmoc::tier::TierStore store({{"/nvme0/mmoc", w0}, {"/nvme1/mmoc", w1}}, opts);   // probes and opens the paths
//   store.reserve_all({{7, bytes, "opt(S3)"}, ...});     // space check + allocation, before training starts
//   Ticket t = store.write_async(7, pinned_src);         // returns at once; src must stay untouched until done
//   ...                                                  // compute overlaps the I/O
//   t.wait();                                            // throws IoError if the write failed
//   store.read_async(7, pinned_dst).wait();
//
// Per path there is one scratch file (unnamed, gone when the store closes or the process dies) and one dispatcher
// thread that keeps queue_depth requests of request_bytes in flight through the backend (io_uring or a thread
// pool, see backend.hpp). An object's share on each path is given by stripe_map(bytes, weights); a read or write
// of the object runs on all its paths at once. Each path executes its requests in submission order per object:
// a read submitted after a write of the same object sees that write.
//
// Direct I/O (O_DIRECT) on paths that support it; tmpfs/ramfs paths ("virtual tiers": host memory) use buffered
// I/O in the same mechanism. Buffers should be aligned to kAlign (4096) bytes, as pinned host allocations are; an
// unaligned buffer, and the odd tail of an object, go through small aligned bounce buffers (slower; counted in
// PathStats::bounce_bytes).
//
// Paths on one device share a DeviceToken (token.hpp): the holder gives it back after batch_bytes when another
// process or path waits, so ranks sharing a disk take turns instead of thrashing it.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/tier/backend.hpp"
#include "engine/tier/path.hpp"
#include "engine/tier/stripe.hpp"

namespace mmoc::tier {

struct PathSpec {
  std::string dir;
  double weight = 1.0;  // relative share of every object (e.g. path_weight(read_gbps, write_gbps)); >= 0
};

// What happened on a path, for traces (times: steady_clock seconds, as now_seconds()).
struct TierEvent {
  enum Kind { kPartDone, kTokenHold } kind = kPartDone;
  int path = 0;
  uint64_t object = 0;   // kPartDone
  bool write = false;    // kPartDone
  bool ok = true;        // kPartDone
  int64_t bytes = 0;     // kPartDone: this path's share; kTokenHold: bytes completed while held
  double t_begin = 0;    // kPartDone: first request submitted; kTokenHold: token acquired
  double t_end = 0;      // kPartDone: last request done; kTokenHold: token released
  double wait_s = 0;     // kTokenHold: time spent waiting for the token
};

struct TierOptions {
  int64_t request_bytes = 1 << 20;  // largest request (a multiple of kAlign)
  int queue_depth = 8;              // requests in flight per path
  int64_t batch_bytes = 64LL << 20; // the device token is offered to waiters after this many bytes
  bool device_token = true;         // take turns with other processes / paths on the same device
  std::string lock_dir;             // "" = default_lock_dir() ($MMOC_TIER_LOCK_DIR or /tmp)
  Backend backend = Backend::kAuto; // $MMOC_TIER_BACKEND (auto|threads|uring) overrides
  bool allow_buffered = true;       // a non-tmpfs path without O_DIRECT support: buffered (true) or SetupError
  std::string what = "nvme path";   // how messages name a path
  // Called on a path's dispatcher thread (keep it short; do not call the store from it).
  std::function<void(const TierEvent&)> on_event;
};

struct ObjectSpec {
  uint64_t id = 0;
  int64_t bytes = 0;
  std::string name;  // for messages, e.g. "opt(S3)"; "" = "object <id>"
};

struct PathStats {
  std::string dir, device, fs_type;
  bool virtual_tier = false, direct = false, token = false;
  double weight = 0;
  int64_t reserved_bytes = 0;  // scratch file size
  int64_t read_bytes = 0, write_bytes = 0, bounce_bytes = 0, requests = 0, token_holds = 0;
  double busy_s = 0;        // time with at least one request in flight
  double read_busy_s = 0;   // ... at least one read in flight
  double write_busy_s = 0;  // ... at least one write in flight
  double token_wait_s = 0;  // time spent waiting for the device token
};

namespace detail {
struct TicketState;
struct PathWorker;
struct Object;
}  // namespace detail

// The completion of one read_async / write_async. Copyable; an empty Ticket is done.
class Ticket {
 public:
  Ticket() = default;
  bool valid() const { return (bool)s_; }
  bool done() const;          // non-blocking
  void wait() const;          // blocks; throws IoError when any part failed
  bool ok() const;            // done and no error
  std::string error() const;  // "" unless failed
  int64_t bytes() const;
  double seconds() const;     // submission to completion (0 until done)

 private:
  friend class TierStore;
  explicit Ticket(std::shared_ptr<detail::TicketState> s) : s_(std::move(s)) {}
  std::shared_ptr<detail::TicketState> s_;
};

class TierStore {
 public:
  // Probes every path (exists, directory, writable, direct I/O), opens the scratch files, picks the backend.
  // Throws SetupError naming the path on any problem, and for bad options.
  TierStore(std::vector<PathSpec> paths, TierOptions opts = {});
  // Waits for all I/O in flight, then closes; the scratch files disappear.
  ~TierStore();
  TierStore(const TierStore&) = delete;
  TierStore& operator=(const TierStore&) = delete;

  // Adds objects and allocates their space on every path at once (posix_fallocate). Before that, for every file
  // system: the bytes needed against statvfs's free bytes; a shortfall is a SetupError naming the path(s), the
  // bytes needed, free and missing. Ids must be new. Nothing is added when it throws.
  void reserve_all(const std::vector<ObjectSpec>& objects);
  void reserve(uint64_t id, int64_t bytes, const std::string& name = "") { reserve_all({{id, bytes, name}}); }

  // Asynchronous write of the object's `bytes` bytes from src / read into dst. The memory must stay valid (and,
  // for a write, unchanged) until the ticket is done. Throws std::invalid_argument for an unknown id, and
  // std::logic_error for a read of an object never written (or whose last write failed).
  Ticket write_async(uint64_t id, const void* src);
  Ticket read_async(uint64_t id, void* dst);

  void wait_all();                    // until every path is idle
  int64_t bytes_in_flight() const;    // bytes of submitted reads and writes not yet completed
  std::vector<PathStats> stats() const;
  std::vector<PathInfo> paths() const;
  int num_paths() const { return (int)workers_.size(); }
  std::vector<double> weights() const;
  // The extents of an object (throws std::invalid_argument for an unknown id).
  std::vector<Extent> extents(uint64_t id) const;
  int64_t object_bytes(uint64_t id) const;
  Backend backend() const { return backend_; }
  const char* backend_name() const { return mmoc::tier::backend_name(backend_); }
  const std::string& backend_reason() const { return backend_why_; }
  const TierOptions& options() const { return opts_; }

  static double now_seconds();

 private:
  friend struct detail::PathWorker;
  Ticket submit(uint64_t id, char* buf, bool write);
  void part_failed(uint64_t id, bool write);

  TierOptions opts_;
  Backend backend_ = Backend::kThreads;
  std::string backend_why_;
  std::vector<std::unique_ptr<detail::PathWorker>> workers_;
  std::vector<double> weights_;
  mutable std::mutex mu_;  // objects_
  std::unordered_map<uint64_t, std::unique_ptr<detail::Object>> objects_;
  std::atomic<int64_t> in_flight_{0};
};

}  // namespace mmoc::tier
