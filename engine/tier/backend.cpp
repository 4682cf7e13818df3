#include "engine/tier/backend.hpp"

#include <errno.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#ifdef MMOC_HAVE_LIBURING
#include <liburing.h>
#endif

#include "engine/tier/path.hpp"

namespace mmoc::tier {

namespace {

// pread/pwrite the whole request (short transfers and EINTR continue; 0 bytes read = unexpected end of file).
void do_io(IoRequest* r) {
  int64_t done = 0;
  while (done < r->len) {
    const ssize_t n = r->write ? ::pwrite(r->fd, r->buf + done, (size_t)(r->len - done), (off_t)(r->offset + done))
                               : ::pread(r->fd, r->buf + done, (size_t)(r->len - done), (off_t)(r->offset + done));
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      r->err = errno;
      return;
    }
    if (n == 0) {
      r->err = r->write ? ENOSPC : EIO;
      return;
    }
    done += n;
  }
  r->err = 0;
}

class ThreadsQueue final : public PathQueue {
 public:
  explicit ThreadsQueue(int qd) : qd_(qd) {
    for (int i = 0; i < qd; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~ThreadsQueue() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    todo_cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void submit(IoRequest* r) override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      todo_.push_back(r);
    }
    todo_cv_.notify_one();
  }
  IoRequest* wait_one() override {
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return !done_.empty(); });
    IoRequest* r = done_.front();
    done_.pop_front();
    return r;
  }
  int queue_depth() const override { return qd_; }

 private:
  void loop() {
    for (;;) {
      IoRequest* r = nullptr;
      {
        std::unique_lock<std::mutex> lk(mu_);
        todo_cv_.wait(lk, [&] { return stop_ || !todo_.empty(); });
        if (todo_.empty()) return;  // stop_ and nothing left
        r = todo_.front();
        todo_.pop_front();
      }
      do_io(r);
      {
        std::lock_guard<std::mutex> lk(mu_);
        done_.push_back(r);
      }
      done_cv_.notify_one();
    }
  }

  int qd_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable todo_cv_, done_cv_;
  std::deque<IoRequest*> todo_, done_;
  bool stop_ = false;
};

#ifdef MMOC_HAVE_LIBURING
class UringQueue final : public PathQueue {
 public:
  explicit UringQueue(int qd) : qd_(qd) {
    const int e = io_uring_queue_init((unsigned)qd, &ring_, 0);
    if (e < 0) throw SetupError(std::string("io_uring_queue_init: ") + std::strerror(-e));
    slots_.resize((size_t)qd);
    for (auto& s : slots_) free_.push_back(&s);
  }
  ~UringQueue() override {
    // The owner drains before destroying; wait for anything left so the kernel stops touching its buffers.
    while (inflight_ > 0) (void)wait_one();
    io_uring_queue_exit(&ring_);
  }
  void submit(IoRequest* r) override {
    Slot* s = free_.back();
    free_.pop_back();
    s->req = r;
    s->done = 0;
    r->err = 0;
    ++inflight_;
    prep(s);
  }
  IoRequest* wait_one() override {
    for (;;) {
      if (unsubmitted_ > 0) {
        int e;
        while ((e = io_uring_submit(&ring_)) < 0) {
          if (e != -EINTR && e != -EAGAIN && e != -EBUSY) fatal("io_uring_submit", -e);
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
        unsubmitted_ = 0;
      }
      struct io_uring_cqe* cqe = nullptr;
      int e;
      while ((e = io_uring_wait_cqe(&ring_, &cqe)) < 0)
        if (e != -EINTR && e != -EAGAIN) fatal("io_uring_wait_cqe", -e);
      Slot* s = static_cast<Slot*>(io_uring_cqe_get_data(cqe));
      const int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      IoRequest* r = s->req;
      if (res < 0) {
        if (res == -EINTR || res == -EAGAIN) {
          prep(s);
          continue;
        }
        r->err = -res;
      } else if (res == 0) {
        r->err = r->write ? ENOSPC : EIO;
      } else {
        s->done += res;
        if (s->done < r->len) {  // short transfer: the rest as a new request
          prep(s);
          continue;
        }
      }
      --inflight_;
      free_.push_back(s);
      return r;
    }
  }
  int queue_depth() const override { return qd_; }

 private:
  struct Slot {
    IoRequest* req = nullptr;
    int64_t done = 0;
  };
  void prep(Slot* s) {
    struct io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) fatal("io_uring_get_sqe (more requests than the queue depth)", EBUSY);
    IoRequest* r = s->req;
    if (r->write)
      io_uring_prep_write(sqe, r->fd, r->buf + s->done, (unsigned)(r->len - s->done), (uint64_t)(r->offset + s->done));
    else
      io_uring_prep_read(sqe, r->fd, r->buf + s->done, (unsigned)(r->len - s->done), (uint64_t)(r->offset + s->done));
    io_uring_sqe_set_data(sqe, s);
    ++unsubmitted_;
  }
  [[noreturn]] static void fatal(const char* what, int err) {
    // io_uring_submit / io_uring_wait_cqe only fail this way on a broken ring (EBADF, EFAULT, ...): never with
    // the bounded queue this class keeps. Nothing can be recovered; say so instead of hanging.
    std::fprintf(stderr, "mmoc tier: fatal: %s failed: %s\n", what, std::strerror(err));
    std::abort();
  }

  int qd_;
  struct io_uring ring_ {};
  std::vector<Slot> slots_;
  std::vector<Slot*> free_;
  int inflight_ = 0;
  int unsubmitted_ = 0;
};
#endif

}  // namespace

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::kThreads: return "threads";
    case Backend::kUring: return "uring";
    default: return "auto";
  }
}

Backend parse_backend(const std::string& s, const std::string& origin) {
  if (s == "auto" || s.empty()) return Backend::kAuto;
  if (s == "threads") return Backend::kThreads;
  if (s == "uring") return Backend::kUring;
  throw SetupError(origin + ": unknown I/O backend '" + s + "' (auto, threads, uring)");
}

bool uring_compiled() {
#ifdef MMOC_HAVE_LIBURING
  return true;
#else
  return false;
#endif
}

std::string uring_unavailable_reason() {
#ifdef MMOC_HAVE_LIBURING
  struct io_uring ring {};
  const int e = io_uring_queue_init(4, &ring, 0);
  if (e < 0) return std::string("io_uring_queue_init: ") + std::strerror(-e);
  io_uring_queue_exit(&ring);
  return "";
#else
  return "not compiled in (liburing was not found at build time)";
#endif
}

Backend resolve_backend(Backend requested, std::string* why) {
  std::string src = "requested";
  if (const char* e = std::getenv("MMOC_TIER_BACKEND"); e && *e) {
    requested = parse_backend(e, "MMOC_TIER_BACKEND");
    src = "MMOC_TIER_BACKEND";
  }
  if (requested == Backend::kThreads) {
    if (why) *why = src + " threads";
    return Backend::kThreads;
  }
  const std::string reason = uring_unavailable_reason();
  if (requested == Backend::kUring) {
    if (!reason.empty()) throw SetupError(src + " I/O backend uring is not available here: " + reason);
    if (why) *why = src + " uring";
    return Backend::kUring;
  }
  if (reason.empty()) {
    if (why) *why = "auto: io_uring works here";
    return Backend::kUring;
  }
  if (why) *why = "auto: io_uring " + reason;
  return Backend::kThreads;
}

std::unique_ptr<PathQueue> make_queue(Backend b, int queue_depth) {
#ifdef MMOC_HAVE_LIBURING
  if (b == Backend::kUring) return std::make_unique<UringQueue>(queue_depth);
#endif
  if (b == Backend::kUring) throw SetupError("I/O backend uring: not compiled in");
  return std::make_unique<ThreadsQueue>(queue_depth);
}

}  // namespace mmoc::tier
