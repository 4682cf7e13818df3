// One directory of the NVMe tier: what it is (device, file system, direct I/O or not) and its scratch file.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace mmoc::tier {

// Raised before any training data moves: a missing or unwritable path, not enough free space, bad options.
// The message names the path (and the missing bytes); CLIs print it and exit with code 2.
struct SetupError : std::runtime_error { using std::runtime_error::runtime_error; };

// Raised by Ticket::wait when an asynchronous read or write failed (message: path, object, offset, errno text).
struct IoError : std::runtime_error { using std::runtime_error::runtime_error; };

struct PathInfo {
  std::string dir;         // as given
  std::string real_dir;    // realpath
  uint64_t fs_dev = 0;     // st_dev of the directory (the file system)
  std::string device;      // "major:minor" of the whole disk holding it (partitions map to their disk), the key
                           // of the device token; file systems without a block device keep their st_dev
  std::string fs_type;     // "tmpfs", "ramfs", "ext4", ... or "0x<magic>"
  bool virtual_tier = false;  // tmpfs / ramfs: host memory, buffered I/O, no device token
  int64_t free_bytes = 0;  // statvfs f_bavail * f_frsize at probe time
};

// stat/statfs/statvfs of a directory. Throws SetupError naming the path when it does not exist or is not a
// directory (`what` prefixes the message, e.g. "nvme path").
PathInfo probe_path(const std::string& dir, const std::string& what = "nvme path");

// Free bytes for an unprivileged writer (statvfs f_bavail * f_frsize); -1 if statvfs fails.
int64_t free_bytes(const std::string& dir);

// A scratch file in `dir`, open for reading and writing: an unnamed O_TMPFILE when the file system supports it,
// else a file created exclusively (".mmoc-tier-scratch-<pid>-<n>") and unlinked at once. Either way nothing of it
// outlives the process, a crash included, and nothing in the directory can be mistaken for a checkpoint.
// direct: O_DIRECT; when the file system refuses O_DIRECT (EINVAL), *direct is set to false and the file is
// buffered. Throws SetupError naming the path (not writable, read-only file system, ...).
int open_scratch(const std::string& dir, bool* direct, const std::string& what = "nvme path");

// "1.50 GiB (1610612736 bytes)"
std::string format_bytes(int64_t bytes);

}  // namespace mmoc::tier
