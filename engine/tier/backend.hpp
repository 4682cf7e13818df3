// The asynchronous I/O backends of the NVMe tier: each path owns one queue (PathQueue) that keeps up to
// queue_depth requests in flight on that path's file.
//   threads: queue_depth threads doing pread/pwrite (always available).
//   uring:   one io_uring of queue_depth entries, driven by the path's dispatcher thread (built when liburing was
//            found at build time, used when io_uring_queue_init works at run time).
// Requests reach a backend already aligned for direct I/O (the store bounces unaligned user memory); a backend
// only moves bytes and reports errno.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace mmoc::tier {

enum class Backend { kAuto, kThreads, kUring };

struct IoRequest {
  bool write = false;
  int fd = -1;
  char* buf = nullptr;
  int64_t len = 0;
  int64_t offset = 0;
  int err = 0;          // set by the backend: 0, or an errno (EIO for an unexpected end of file)
  void* owner = nullptr;  // the store's bookkeeping
};

class PathQueue {
 public:
  virtual ~PathQueue() = default;
  // Hands a request to the device; the caller keeps at most queue_depth() of them in flight.
  virtual void submit(IoRequest* r) = 0;
  // Blocks until one submitted request has completed (in full, or with r->err set) and returns it.
  virtual IoRequest* wait_one() = 0;
  virtual int queue_depth() const = 0;
};

// "threads" or "uring".
const char* backend_name(Backend b);
// Parses "auto", "threads", "uring"; throws SetupError otherwise.
Backend parse_backend(const std::string& s, const std::string& origin);
// Whether the uring backend was compiled in (liburing found at build time).
bool uring_compiled();
// "" when an io_uring can be set up here now, else the reason ("not compiled in", "io_uring_queue_init: ...").
std::string uring_unavailable_reason();
// The backend to use: `requested`, with $MMOC_TIER_BACKEND (auto|threads|uring) taking precedence when set; auto
// means uring when it works here, else threads. Throws SetupError when uring is asked for and cannot work
// (the message gives the reason). *why (optional) says how the choice was made.
Backend resolve_backend(Backend requested, std::string* why = nullptr);

std::unique_ptr<PathQueue> make_queue(Backend b, int queue_depth);

}  // namespace mmoc::tier
