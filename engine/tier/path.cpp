#include "engine/tier/path.hpp"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>

namespace mmoc::tier {

namespace {

std::string fs_name(unsigned long magic) {
  switch (magic) {
    case 0x01021994: return "tmpfs";
    case 0x858458f6: return "ramfs";
    case 0xEF53: return "ext4";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0xF2F52010: return "f2fs";
    case 0x2fc12fc1: return "zfs";
    case 0x6969: return "nfs";
    case 0x794c7630: return "overlayfs";
    case 0x65735546: return "fuse";
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "0x%lx", magic);
      return buf;
    }
  }
}

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

// The whole disk of a block device: /sys/dev/block/M:m is a link into /sys/devices/...; a partition's directory
// has a "partition" file and sits inside its disk's directory, whose "dev" names the disk.
std::string disk_of(unsigned maj, unsigned min) {
  const std::string key = std::to_string(maj) + ":" + std::to_string(min);
  const std::string sys = "/sys/dev/block/" + key;
  char buf[PATH_MAX];
  if (!::realpath(sys.c_str(), buf)) return key;
  std::string dir = buf;
  struct stat st {};
  if (::stat((dir + "/partition").c_str(), &st) != 0) return key;
  auto slash = dir.rfind('/');
  if (slash == std::string::npos) return key;
  std::string parent = read_line(dir.substr(0, slash) + "/dev");
  return parent.empty() ? key : parent;
}

std::atomic<unsigned> g_scratch_counter{0};

}  // namespace

std::string format_bytes(int64_t bytes) {
  char buf[96];
  const double gib = (double)bytes / (1024.0 * 1024.0 * 1024.0);
  if (gib >= 0.1)
    std::snprintf(buf, sizeof buf, "%.2f GiB (%lld bytes)", gib, (long long)bytes);
  else
    std::snprintf(buf, sizeof buf, "%.2f MiB (%lld bytes)", (double)bytes / (1024.0 * 1024.0), (long long)bytes);
  return buf;
}

int64_t free_bytes(const std::string& dir) {
  struct statvfs sv {};
  if (::statvfs(dir.c_str(), &sv) != 0) return -1;
  return (int64_t)sv.f_bavail * (int64_t)sv.f_frsize;
}

PathInfo probe_path(const std::string& dir, const std::string& what) {
  PathInfo p;
  p.dir = dir;
  if (dir.empty()) throw SetupError(what + ": empty path");
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    const int e = errno;
    if (e == ENOENT) throw SetupError(what + " '" + dir + "': no such directory");
    throw SetupError(what + " '" + dir + "': cannot stat: " + std::strerror(e));
  }
  if (!S_ISDIR(st.st_mode)) throw SetupError(what + " '" + dir + "': not a directory");
  char buf[PATH_MAX];
  p.real_dir = ::realpath(dir.c_str(), buf) ? std::string(buf) : dir;
  p.fs_dev = (uint64_t)st.st_dev;
  struct statfs sf {};
  if (::statfs(dir.c_str(), &sf) == 0) {
    p.fs_type = fs_name((unsigned long)sf.f_type);
    p.virtual_tier = p.fs_type == "tmpfs" || p.fs_type == "ramfs";
  } else {
    p.fs_type = "unknown";
  }
  const unsigned maj = major(st.st_dev), min = minor(st.st_dev);
  p.device = maj == 0 ? std::to_string(maj) + ":" + std::to_string(min) : disk_of(maj, min);
  p.free_bytes = free_bytes(dir);
  return p;
}

int open_scratch(const std::string& dir, bool* direct, const std::string& what) {
  auto fail = [&](int e) -> SetupError {
    if (e == EACCES || e == EPERM || e == EROFS || e == ENOENT)  // ENOENT: exists (probed) but refuses new files
      return SetupError(what + " '" + dir + "': not writable (cannot create a file: " + std::strerror(e) + ")");
    if (e == ENOSPC || e == EDQUOT) return SetupError(what + " '" + dir + "': no space left for a scratch file");
    return SetupError(what + " '" + dir + "': cannot create a scratch file: " + std::strerror(e));
  };
  const bool want_direct = *direct;
  for (int attempt = 0; attempt < 2; ++attempt) {
    const int dflag = *direct ? O_DIRECT : 0;
    int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC | dflag, 0600);
    if (fd >= 0) return fd;
    int e = errno;
    if (e == EINVAL && *direct) {  // O_DIRECT refused (or O_TMPFILE on some kernels): try without O_DIRECT first
      *direct = false;
      continue;
    }
    if (e == EOPNOTSUPP || e == EISDIR || e == EINVAL) {
      // No O_TMPFILE here: create a named file exclusively and unlink it at once.
      *direct = want_direct;
      for (int k = 0; k < 100; ++k) {
        const std::string name = dir + "/.mmoc-tier-scratch-" + std::to_string(::getpid()) + "-" +
                                 std::to_string(g_scratch_counter.fetch_add(1));
        fd = ::open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | (*direct ? O_DIRECT : 0), 0600);
        if (fd < 0 && errno == EINVAL && *direct) {
          *direct = false;
          fd = ::open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
        }
        if (fd >= 0) {
          ::unlink(name.c_str());
          return fd;
        }
        if (errno != EEXIST) throw fail(errno);
      }
      throw fail(EEXIST);
    }
    throw fail(e);
  }
  throw fail(EINVAL);
}

}  // namespace mmoc::tier
