// Large-file I/O at the disk's speed (torch-free): positioned reads and writes of large aligned blocks by several
// threads at once, with O_DIRECT where the file system takes it (no page cache: no second copy of a checkpoint in
// memory, and host memory stays bounded by the callers' buffers). MMOC_DIRECT_IO=0 turns O_DIRECT off.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace mmoc::io {

inline constexpr std::size_t kIoAlign = 4096;  // offsets, lengths and buffers of O_DIRECT transfers
inline uint64_t align_up(uint64_t n, uint64_t a = kIoAlign) { return (n + a - 1) / a * a; }
inline uint64_t align_down(uint64_t n, uint64_t a = kIoAlign) { return n / a * a; }

// Heap memory aligned to kIoAlign (move-only).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t n);
  std::byte* data() const { return p_.get(); }
  std::size_t size() const { return n_; }

 private:
  struct Free { void operator()(std::byte* p) const; };
  std::unique_ptr<std::byte, Free> p_;
  std::size_t n_ = 0;
};

bool direct_io_enabled();  // MMOC_DIRECT_IO (default 1)

// A file for positioned transfers from several threads (pread/pwrite are thread-safe). Errors throw
// std::runtime_error naming the file.
class BulkFile {
 public:
  static std::unique_ptr<BulkFile> create(const std::string& path);     // write-only, truncated
  static std::unique_ptr<BulkFile> open_read(const std::string& path);  // read-only
  ~BulkFile();
  BulkFile(const BulkFile&) = delete;
  BulkFile& operator=(const BulkFile&) = delete;
  const std::string& path() const { return path_; }
  bool direct() const { return direct_.load(); }
  uint64_t size() const;  // current size (fstat)

  // Writes buf[0, align_up(n)) at `off` (a multiple of kIoAlign; buf aligned to kIoAlign): the bytes past n are
  // padding the caller provides, cut off by finish(). Falls back to buffered I/O if O_DIRECT is refused.
  void write_at(const void* buf, std::size_t n, uint64_t off);
  // Reads [off, off + n) and returns where it starts inside `scratch` (aligned to kIoAlign, at least
  // align_up(n) + kIoAlign bytes). Throws on a short read.
  const std::byte* read_at(uint64_t off, std::size_t n, std::byte* scratch, std::size_t scratch_size);
  // Writer: reserves the file's blocks up to `size` (one allocation instead of one per write; a full disk fails here,
  // before any data is written). Best effort where the file system has no fallocate.
  void preallocate(uint64_t size);
  // Writer: sets the final size, fsyncs and closes.
  void finish(uint64_t size);

 private:
  BulkFile(std::string path, int fd, bool direct) : path_(std::move(path)), fd_(fd), direct_(direct) {}
  void drop_direct();
  std::string path_;
  int fd_ = -1;
  std::atomic<bool> direct_{false};
};

// Runs fn(task, worker) for every task in [0, n) on `threads` threads (worker in [0, threads)); tasks are handed
// out in order as workers free up. The first exception stops handing out and is rethrown once all have stopped.
void run_parallel(std::size_t n, int threads, const std::function<void(std::size_t task, int worker)>& fn);

}  // namespace mmoc::io
