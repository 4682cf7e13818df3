// The device token: processes (ranks) and paths that share one storage device take turns on it, one batch of
// requests at a time, so that their streams do not interleave on the device.
//
// Across processes: open-file-description locks (F_OFD_SETLKW) on a lock file per device,
// <lock_dir>/mmoc-tier-<major>-<minor>.lock. Byte 0 is the token; a process about to wait for it first takes a
// shared lock on byte 1, so the holder can see (F_OFD_GETLK) that someone is waiting. A process that gives the
// token back while another waits lets the waiter take it before it queues again (turns alternate; the kernel's
// wake-up order alone would let the releaser win again at once). The kernel drops the locks of a process that
// dies, so a crash never leaves the device locked. The lock file is empty; it stays for the next run.
// Within a process: a FIFO ticket lock in front of the file lock (the paths of one process on the same device).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace mmoc::tier {

class DeviceToken {
 public:
  // The process-wide token of `device` ("major:minor") with its lock file in lock_dir. Throws SetupError when the
  // lock file cannot be created.
  static std::shared_ptr<DeviceToken> get(const std::string& lock_dir, const std::string& device);
  ~DeviceToken();
  DeviceToken(const DeviceToken&) = delete;
  DeviceToken& operator=(const DeviceToken&) = delete;

  // Blocks until this caller holds the token; returns the seconds it waited. Call release() from the same thread.
  double acquire();
  void release();
  // Whether another process, or another thread of this one, waits for the token (the holder then gives it back
  // at its next batch boundary).
  bool others_waiting();
  const std::string& lock_path() const { return path_; }

  explicit DeviceToken(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}

 private:
  bool lock_held_by_other(int64_t byte);  // F_OFD_GETLK: another open file description holds a lock there

  std::string path_;
  int fd_ = -1;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t next_ticket_ = 0, serving_ = 0;
  int local_waiters_ = 0;
  bool released_once_ = false;  // the handoff rule applies after this process held the token
};

// The lock folder: $MMOC_TIER_LOCK_DIR, else /tmp. Every rank of a node must use the same one.
std::string default_lock_dir();

}  // namespace mmoc::tier
