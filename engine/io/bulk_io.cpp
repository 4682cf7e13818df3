#include "engine/io/bulk_io.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace mmoc::io {

namespace {
std::string err() { return std::strerror(errno); }
}  // namespace

AlignedBuffer::AlignedBuffer(std::size_t n) : n_(n) {
  void* p = nullptr;
  if (n > 0 && ::posix_memalign(&p, kIoAlign, align_up(n)) != 0) throw std::bad_alloc();
  p_.reset(static_cast<std::byte*>(p));
}
void AlignedBuffer::Free::operator()(std::byte* p) const { std::free(p); }

bool direct_io_enabled() {
  const char* e = std::getenv("MMOC_DIRECT_IO");
  return !(e && std::string(e) == "0");
}

std::unique_ptr<BulkFile> BulkFile::create(const std::string& path) {
  const int base = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
  int fd = direct_io_enabled() ? ::open(path.c_str(), base | O_DIRECT, 0644) : -1;
  bool direct = fd >= 0;
  if (fd < 0) fd = ::open(path.c_str(), base, 0644);  // tmpfs and some others refuse O_DIRECT
  if (fd < 0) throw std::runtime_error(path + ": cannot create: " + err());
  return std::unique_ptr<BulkFile>(new BulkFile(path, fd, direct));
}

std::unique_ptr<BulkFile> BulkFile::open_read(const std::string& path) {
  int fd = direct_io_enabled() ? ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT) : -1;
  bool direct = fd >= 0;
  if (fd < 0) fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(path + ": cannot open: " + err());
  return std::unique_ptr<BulkFile>(new BulkFile(path, fd, direct));
}

BulkFile::~BulkFile() {
  if (fd_ >= 0) ::close(fd_);
}

uint64_t BulkFile::size() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) throw std::runtime_error(path_ + ": cannot stat: " + err());
  return (uint64_t)st.st_size;
}

void BulkFile::drop_direct() {
  const int fl = ::fcntl(fd_, F_GETFL);
  if (fl >= 0) (void)::fcntl(fd_, F_SETFL, fl & ~O_DIRECT);
  direct_ = false;
}

void BulkFile::write_at(const void* buf, std::size_t n, uint64_t off) {
  const std::size_t len = direct() ? (std::size_t)align_up(n) : n;
  const char* p = static_cast<const char*>(buf);
  std::size_t done = 0;
  while (done < len) {
    ssize_t w = ::pwrite(fd_, p + done, len - done, (off_t)(off + done));
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EINVAL && direct()) {  // the file system takes O_DIRECT at open but not for this transfer
        drop_direct();
        continue;
      }
      throw std::runtime_error(path_ + ": write failed: " + err());
    }
    done += (std::size_t)w;
  }
}

const std::byte* BulkFile::read_at(uint64_t off, std::size_t n, std::byte* scratch, std::size_t scratch_size) {
  for (;;) {
    const bool d = direct();
    const uint64_t start = d ? align_down(off) : off;
    const std::size_t want = (std::size_t)(off + n - start), len = d ? (std::size_t)align_up(want) : want;
    if (len > scratch_size) throw std::logic_error(path_ + ": read_at: scratch buffer too small");
    std::size_t got = 0;
    bool retry = false;
    while (got < want) {
      ssize_t r = ::pread(fd_, scratch + got, len - got, (off_t)(start + got));
      if (r < 0) {
        if (errno == EINTR) continue;
        if (errno == EINVAL && d) {
          drop_direct();
          retry = true;
          break;
        }
        throw std::runtime_error(path_ + ": read failed: " + err());
      }
      if (r == 0) throw std::runtime_error(path_ + ": unexpected end of file at byte " + std::to_string(start + got));
      got += (std::size_t)r;
    }
    if (!retry) return scratch + (off - start);
  }
}

void BulkFile::preallocate(uint64_t size) {
  if (size == 0) return;
  for (;;) {
    if (::fallocate(fd_, 0, 0, (off_t)size) == 0) return;
    if (errno == EINTR) continue;
    if (errno == ENOSPC) throw std::runtime_error(path_ + ": no space left on the device for " + std::to_string(size) + " bytes");
    return;  // EOPNOTSUPP and the like: the writes allocate as they go
  }
}

void BulkFile::finish(uint64_t size) {
  if (::ftruncate(fd_, (off_t)size) != 0) throw std::runtime_error(path_ + ": cannot set the size: " + err());
  if (::fsync(fd_) != 0) throw std::runtime_error(path_ + ": fsync failed: " + err());
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw std::runtime_error(path_ + ": close failed: " + err());
}

void run_parallel(std::size_t n, int threads, const std::function<void(std::size_t, int)>& fn) {
  if (n == 0) return;
  threads = std::max(1, std::min<int>(threads, (int)n));
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first;
  std::mutex mu;
  auto body = [&](int w) {
    for (;;) {
      if (failed) return;
      const std::size_t t = next.fetch_add(1);
      if (t >= n) return;
      try {
        fn(t, w);
      } catch (...) {
        std::lock_guard<std::mutex> g(mu);
        if (!first) first = std::current_exception();
        failed = true;
        return;
      }
    }
  };
  std::vector<std::thread> ts;
  for (int w = 1; w < threads; ++w) ts.emplace_back(body, w);
  body(0);
  for (auto& t : ts) t.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace mmoc::io
