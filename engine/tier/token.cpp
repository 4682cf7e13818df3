#include "engine/tier/token.hpp"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <thread>

#include "engine/tier/path.hpp"

namespace mmoc::tier {

namespace {

std::mutex g_registry_mu;
std::map<std::string, std::weak_ptr<DeviceToken>>& registry() {
  static auto* m = new std::map<std::string, std::weak_ptr<DeviceToken>>();
  return *m;
}

int ofd_lock(int fd, short type, int64_t start, bool wait) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = 1;
  fl.l_pid = 0;
  for (;;) {
    if (::fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl) == 0) return 0;
    if (errno == EINTR) continue;
    return errno;
  }
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

std::string default_lock_dir() {
  if (const char* e = std::getenv("MMOC_TIER_LOCK_DIR"); e && *e) return e;
  return "/tmp";
}

std::shared_ptr<DeviceToken> DeviceToken::get(const std::string& lock_dir, const std::string& device) {
  std::string key = device;
  for (char& c : key)
    if (c == ':') c = '-';
  const std::string path = lock_dir + "/mmoc-tier-" + key + ".lock";
  std::lock_guard<std::mutex> lk(g_registry_mu);
  if (auto t = registry()[path].lock()) return t;
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) {
    const int e = errno;
    throw SetupError("device lock file '" + path + "' (device " + device + "): cannot open: " + std::strerror(e) +
                     " (set MMOC_TIER_LOCK_DIR to a folder every rank can write)");
  }
  (void)::fchmod(fd, 0666);  // ranks of other users on the node may share the device (best effort)
  auto t = std::make_shared<DeviceToken>(path, fd);
  registry()[path] = t;
  return t;
}

DeviceToken::~DeviceToken() {
  if (fd_ >= 0) ::close(fd_);
}

bool DeviceToken::lock_held_by_other(int64_t byte) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  fl.l_pid = 0;
  if (::fcntl(fd_, F_OFD_GETLK, &fl) != 0) return false;
  return fl.l_type != F_UNLCK;
}

double DeviceToken::acquire() {
  const double t0 = now_s();
  std::unique_lock<std::mutex> lk(mu_);
  const uint64_t ticket = next_ticket_++;
  ++local_waiters_;
  cv_.wait(lk, [&] { return serving_ == ticket; });
  --local_waiters_;
  const bool handoff = released_once_;
  lk.unlock();
  // Handoff: if another process waits (it holds byte 1 shared), let it take byte 0 first; bounded, so a waiter that
  // is slow to wake (or gone) costs at most 20 ms.
  if (handoff && lock_held_by_other(1)) {
    const double until = now_s() + 0.02;
    while (now_s() < until && lock_held_by_other(1) && !lock_held_by_other(0))
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  int e = ofd_lock(fd_, F_RDLCK, 1, false);  // "waiting"
  int e2 = ofd_lock(fd_, F_WRLCK, 0, true);  // the token
  if (e == 0) ofd_lock(fd_, F_UNLCK, 1, false);
  if (e2 != 0) {
    // Cannot lock (e.g. a file system without locks): go on without the cross-process token rather than stall.
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true))
      std::fprintf(stderr, "mmoc tier: warning: cannot lock %s (%s); ranks sharing the device will not take turns\n",
                   path_.c_str(), std::strerror(e2));
  }
  return now_s() - t0;
}

void DeviceToken::release() {
  ofd_lock(fd_, F_UNLCK, 0, false);
  std::lock_guard<std::mutex> lk(mu_);
  released_once_ = true;
  ++serving_;
  cv_.notify_all();
}

bool DeviceToken::others_waiting() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (local_waiters_ > 0) return true;
  }
  return lock_held_by_other(1);
}

}  // namespace mmoc::tier
