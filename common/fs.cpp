#include "common/fs.hpp"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace mmoc {

bool path_exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}
bool is_directory(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool is_regular_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string strip_trailing_slashes(const std::string& p) {
  std::string s = p;
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}
std::string parent_dir(const std::string& p) {
  std::string s = strip_trailing_slashes(p);
  auto i = s.rfind('/');
  if (i == std::string::npos) return "";
  if (i == 0) return "/";
  return s.substr(0, i);
}
std::string base_name(const std::string& p) {
  std::string s = strip_trailing_slashes(p);
  auto i = s.rfind('/');
  return i == std::string::npos ? s : s.substr(i + 1);
}
std::string join_path(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (!b.empty() && b[0] == '/') return b;
  return a.back() == '/' ? a + b : a + "/" + b;
}
std::string real_path(const std::string& p) {
  char buf[PATH_MAX];
  if (::realpath(p.c_str(), buf)) return buf;
  return p;
}

void make_dirs(const std::string& p) {
  std::string s = strip_trailing_slashes(p);
  if (s.empty() || is_directory(s)) return;
  std::string parent = parent_dir(s);
  if (!parent.empty()) make_dirs(parent);
  if (::mkdir(s.c_str(), 0755) != 0 && errno != EEXIST)
    throw std::runtime_error(s + ": cannot create directory: " + std::strerror(errno));
  if (!is_directory(s)) throw std::runtime_error(s + ": exists and is not a directory");
}

namespace {
int rm_one(const char* path, const struct stat*, int flag, struct FTW*) {
  if (flag == FTW_DP) return ::rmdir(path) == 0 ? 0 : 0;
  (void)::unlink(path);
  return 0;
}
}  // namespace

bool remove_tree(const std::string& p) {
  struct stat st {};
  if (::lstat(p.c_str(), &st) != 0) return true;
  if (!S_ISDIR(st.st_mode)) return ::unlink(p.c_str()) == 0;
  ::nftw(p.c_str(), rm_one, 32, FTW_DEPTH | FTW_PHYS);
  return ::lstat(p.c_str(), &st) != 0;
}

std::vector<std::string> list_dir(const std::string& p) {
  DIR* d = ::opendir(p.c_str());
  if (!d) throw std::runtime_error(p + ": cannot list directory: " + std::strerror(errno));
  std::vector<std::string> v;
  while (auto* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") v.push_back(n);
  }
  ::closedir(d);
  std::sort(v.begin(), v.end());
  return v;
}

std::string exe_dir() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "";
  buf[n] = 0;
  return parent_dir(buf);
}

std::string read_file(const std::string& path, const std::string& what) {
  const std::string head = "cannot read " + (what.empty() ? std::string() : what + " ") + "file '" + path + "': ";
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw std::runtime_error(head + std::strerror(errno));
  if (S_ISDIR(st.st_mode)) throw std::runtime_error(head + "is a directory");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(head + std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw std::runtime_error(head + "read error");
  return ss.str();
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort
  (void)::fsync(fd);
  ::close(fd);
}

void write_file_atomic(const std::string& path, const std::vector<std::pair<const void*, std::size_t>>& pieces) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  auto fail = [&](const std::string& step, int err) {
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot write '" + path + "': " + step + ": " + std::strerror(err));
  };
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    int err = errno;
    throw std::runtime_error("cannot write '" + path + "': create " + tmp + ": " + std::strerror(err));
  }
  for (const auto& [data, size] : pieces) {
    const char* c = static_cast<const char*>(data);
    size_t left = size;
    while (left > 0) {
      ssize_t w = ::write(fd, c, std::min<size_t>(left, size_t(1) << 30));
      if (w < 0) {
        if (errno == EINTR) continue;
        int err = errno;
        ::close(fd);
        fail("write", err);
      }
      c += w;
      left -= (size_t)w;
    }
  }
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    fail("fsync", err);
  }
  if (::close(fd) != 0) fail("close", errno);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename from " + tmp, errno);
  std::string parent = parent_dir(path);
  fsync_dir(parent.empty() ? std::string(".") : parent);
}

void write_file_atomic(const std::string& path, const std::string& content) {
  write_file_atomic(path, {{content.data(), content.size()}});
}

}  // namespace mmoc
