// The NVMe tier's I/O layer (engine/tier): stripe maps, bit-exact round trips of many odd-sized objects over 1, 2
// and 3 paths (one on /dev/shm) with both backends, striping proportions, errors before training, the device token
// between two processes, and a crash that leaves nothing behind.
//
// The disk directories are made under the working directory (ctest runs in the build tree, on disk), or under
// $MMOC_TEST_DISK_DIR; /dev/shm is the virtual tier.
#include <doctest/doctest.h>

#include <dirent.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/tier/measure.hpp"
#include "engine/tier/store.hpp"
#include "engine/tier/stripe.hpp"
#include "engine/tier/token.hpp"

using namespace mmoc::tier;

namespace {

struct TempDir {
  std::string path;
  explicit TempDir(const std::string& parent, const std::string& tag = "tier") {
    std::string t = parent + "/mmoc_" + tag + "_test.XXXXXX";
    std::vector<char> buf(t.begin(), t.end());
    buf.push_back(0);
    const char* d = ::mkdtemp(buf.data());
    REQUIRE_MESSAGE(d != nullptr, "mkdtemp in " << parent);
    path = d;
  }
  ~TempDir() {
    // Only what the tests put there (nothing, if the store behaves): files and the directory itself.
    if (DIR* d = ::opendir(path.c_str())) {
      while (auto* e = ::readdir(d))
        if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) ::unlink((path + "/" + e->d_name).c_str());
      ::closedir(d);
    }
    ::rmdir(path.c_str());
  }
};

std::string disk_parent() {
  if (const char* e = std::getenv("MMOC_TEST_DISK_DIR"); e && *e) return e;
  char buf[4096];
  return ::getcwd(buf, sizeof buf) ? std::string(buf) : std::string("/tmp");
}

bool have_shm() {
  struct stat st {};
  return ::stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && ::access("/dev/shm", W_OK) == 0;
}

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> v;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (auto* e = ::readdir(d))
      if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) v.push_back(e->d_name);
    ::closedir(d);
  }
  return v;
}

// An aligned allocation with the user pointer at `offset` bytes past a 4 KiB boundary.
struct Buf {
  void* base = nullptr;
  char* p = nullptr;
  Buf(int64_t n, int64_t offset = 0) {
    REQUIRE(::posix_memalign(&base, 4096, (size_t)align_up(n + offset + 1)) == 0);
    p = static_cast<char*>(base) + offset;
  }
  ~Buf() { ::free(base); }
  Buf(const Buf&) = delete;
};

std::vector<Backend> backends() {
  std::vector<Backend> v{Backend::kThreads};
  const std::string why = uring_unavailable_reason();
  if (why.empty())
    v.push_back(Backend::kUring);
  else
    MESSAGE("io_uring backend not tested here: " << why);
  return v;
}

// Tests choose backends explicitly; an override from the environment would defeat that.
struct NoBackendEnv {
  NoBackendEnv() { ::unsetenv("MMOC_TIER_BACKEND"); }
} g_no_backend_env;

TierOptions test_options(Backend b, const std::string& lock_dir) {
  TierOptions o;
  o.backend = b;
  o.request_bytes = 64 << 10;  // many requests per object
  o.queue_depth = 4;
  o.batch_bytes = 1 << 20;
  o.lock_dir = lock_dir;
  return o;
}

}  // namespace

TEST_CASE("stripe_map: proportions, exact cover, determinism") {
  // Equal weights: halves (in 4 KiB blocks).
  auto e = stripe_map(8 * kAlign, {1, 1});
  REQUIRE(e.size() == 2);
  CHECK(e[0].path == 0);
  CHECK(e[0].object_offset == 0);
  CHECK(e[0].bytes == 4 * kAlign);
  CHECK(e[1].object_offset == 4 * kAlign);
  CHECK(e[1].bytes == 4 * kAlign);
  // 2:1 of 300 blocks: 200 and 100.
  e = stripe_map(300 * kAlign, {2, 1});
  REQUIRE(e.size() == 2);
  CHECK(e[0].bytes == 200 * kAlign);
  CHECK(e[1].bytes == 100 * kAlign);
  // A zero weight gets nothing; the odd tail goes with the last extent.
  e = stripe_map(10 * kAlign + 7, {1, 0, 1});
  REQUIRE(e.size() == 2);
  CHECK(e[0].path == 0);
  CHECK(e[1].path == 2);
  CHECK(e[0].bytes + e[1].bytes == 10 * kAlign + 7);
  CHECK(e[0].bytes == 6 * kAlign);  // 11 blocks, 5.5 each: the remainder block to the lower index
  // One small object goes to the heaviest path.
  e = stripe_map(100, {1, 3, 2});
  REQUIRE(e.size() == 1);
  CHECK(e[0].path == 1);
  CHECK(e[0].bytes == 100);
  CHECK(stripe_map(0, {1, 2}).empty());
  // Exact cover and proportions within one block, over many sizes and weights; deterministic.
  std::mt19937_64 rng(7);
  for (int k = 0; k < 2000; ++k) {
    const int n = 1 + (int)(rng() % 4);
    std::vector<double> w(n);
    for (auto& x : w) x = (rng() % 5) * 0.75;
    if (std::all_of(w.begin(), w.end(), [](double x) { return x == 0; })) w[0] = 1;
    const int64_t bytes = (int64_t)(rng() % (64ull << 20));
    const auto a = stripe_map(bytes, w), b = stripe_map(bytes, w);
    REQUIRE(a.size() == b.size());
    int64_t off = 0;
    double wsum = 0;
    for (double x : w) wsum += x;
    const int64_t blocks = (bytes + kAlign - 1) / kAlign;
    for (size_t i = 0; i < a.size(); ++i) {
      CHECK(a[i].path == b[i].path);
      CHECK(a[i].bytes == b[i].bytes);
      CHECK(a[i].object_offset == off);
      CHECK(a[i].bytes > 0);
      CHECK(w[a[i].path] > 0);
      if (i > 0) CHECK(a[i].path > a[i - 1].path);
      off += a[i].bytes;
      const double want = blocks * w[a[i].path] / wsum;
      const double got = (double)align_up(a[i].bytes) / kAlign;
      CHECK(std::abs(got - want) < 1.0 + 1e-9);
    }
    CHECK(off == bytes);
  }
  CHECK_THROWS_AS(stripe_map(10, {0, 0}), std::invalid_argument);
  CHECK_THROWS_AS(stripe_map(10, {1, -1}), std::invalid_argument);
  CHECK_THROWS_AS(stripe_map(-1, {1}), std::invalid_argument);
  CHECK_THROWS_AS(stripe_map(10, {}), std::invalid_argument);
  // path_bytes sums the aligned extents; path_weight = 1 / (1/r + 1/w).
  const auto need = path_bytes({kAlign * 3 + 1, 10}, {1, 1});
  CHECK(need[0] == 2 * kAlign + kAlign);  // 4 blocks: 2 + 2, and the 10-byte object's block to path 0
  CHECK(need[1] == 2 * kAlign);
  CHECK(path_weight(2.0, 2.0) == doctest::Approx(1.0));
  CHECK(path_weight(3.0, 1.5) == doctest::Approx(1.0));
  CHECK(path_weight(0, 1) == 0);
}

TEST_CASE("round trips of odd-sized objects over 1, 2 and 3 paths, both backends") {
  TempDir d1(disk_parent(), "tier_a"), d2(disk_parent(), "tier_b"), locks(disk_parent(), "tier_locks");
  const bool shm = have_shm();
  std::unique_ptr<TempDir> s1;
  if (shm) s1 = std::make_unique<TempDir>("/dev/shm", "tier_shm");
  else MESSAGE("no writable /dev/shm: the virtual tier is not tested here");
  const std::string shm_dir = shm ? s1->path : d2.path;

  struct Layout { const char* name; std::vector<PathSpec> paths; };
  const std::vector<Layout> layouts = {
      {"1 path (disk)", {{d1.path, 1.0}}},
      {"2 paths (disk + shm), 2:1", {{d1.path, 2.0}, {shm_dir, 1.0}}},
      {"3 paths (disk, disk, shm), 1:3:0.5", {{d1.path, 1.0}, {d2.path, 3.0}, {shm_dir, 0.5}}},
  };
  const std::vector<int64_t> sizes = {0,        1,       7,          4095,        4096,          4097,
                                      65535,    65536,   65537,      200001,      (1 << 20) + 13, 3 * (1 << 20) + 1,
                                      12288,    8191,    5 * 4096 - 1, 777777,    2 * (1 << 20), 123};
  for (Backend be : backends()) {
    for (const auto& lay : layouts) {
      const std::string be_name = backend_name(be);
    CAPTURE(be_name);
      CAPTURE(lay.name);
      TierStore store(lay.paths, test_options(be, locks.path));
      CHECK(std::string(store.backend_name()) == backend_name(be));
      std::vector<ObjectSpec> objs;
      for (size_t i = 0; i < sizes.size(); ++i) objs.push_back({100 + i, sizes[i], "obj" + std::to_string(i)});
      store.reserve_all(objs);
      // Scratch files are invisible in the directories.
      for (const auto& p : lay.paths) CHECK(entries(p.dir).empty());
      const auto infos = store.paths();
      for (size_t p = 0; p < infos.size(); ++p)
        if (lay.paths[p].dir == shm_dir && shm) {
          CHECK(infos[p].virtual_tier);
          CHECK_FALSE(store.stats()[p].direct);
          CHECK_FALSE(store.stats()[p].token);
        }

      // Two rounds: all writes in flight at once, then all reads; the second round overwrites with new data and
      // uses unaligned buffers for every other object (bounce path). Reads are queued right behind their writes
      // without waiting in round 2 (per-object order).
      for (int round = 0; round < 2; ++round) {
        std::vector<std::unique_ptr<Buf>> src, dst;
        std::vector<Ticket> wt, rt;
        for (size_t i = 0; i < sizes.size(); ++i) {
          const int64_t off = round == 1 && i % 2 ? 1 + (int64_t)i : 0;
          src.push_back(std::make_unique<Buf>(sizes[i], off));
          dst.push_back(std::make_unique<Buf>(sizes[i], off ? off + 3 : 0));
          fill_pattern(src.back()->p, sizes[i], 1000 * round + i);
          std::memset(dst.back()->p, 0xEE, (size_t)sizes[i]);
          wt.push_back(store.write_async(objs[i].id, src.back()->p));
          if (round == 1) rt.push_back(store.read_async(objs[i].id, dst.back()->p));
        }
        CHECK(store.bytes_in_flight() >= 0);
        for (auto& t : wt) t.wait();
        if (round == 0)
          for (size_t i = 0; i < sizes.size(); ++i) rt.push_back(store.read_async(objs[i].id, dst[i]->p));
        for (auto& t : rt) t.wait();
        for (size_t i = 0; i < sizes.size(); ++i) {
          CAPTURE(sizes[i]);
          CAPTURE(round);
          CHECK(rt[i].ok());
          CHECK(rt[i].bytes() == sizes[i]);
          CHECK(std::memcmp(src[i]->p, dst[i]->p, (size_t)sizes[i]) == 0);
        }
      }
      store.wait_all();
      CHECK(store.bytes_in_flight() == 0);
      // Bytes per path: each write and read of an object moves exactly its extent on each path.
      std::vector<int64_t> want(lay.paths.size(), 0);
      for (const auto& o : objs)
        for (const auto& e : store.extents(o.id)) want[e.path] += e.bytes;
      const auto st = store.stats();
      for (size_t p = 0; p < st.size(); ++p) {
        CHECK(st[p].write_bytes == 2 * want[p]);
        CHECK(st[p].read_bytes == 2 * want[p]);
        CHECK(st[p].reserved_bytes == path_bytes(sizes, store.weights())[p]);
      }
      for (const auto& p : lay.paths) CHECK(entries(p.dir).empty());
    }
  }
}

TEST_CASE("striping follows the weights and uses all paths at once") {
  TempDir d1(disk_parent(), "tier_a"), d2(disk_parent(), "tier_b"), locks(disk_parent(), "tier_locks");
  TierOptions o = test_options(Backend::kThreads, locks.path);
  std::vector<TierEvent> ev;
  std::mutex mu;
  o.on_event = [&](const TierEvent& e) {
    std::lock_guard<std::mutex> lk(mu);
    ev.push_back(e);
  };
  const int64_t n = 24 << 20;
  {
    TierStore store({{d1.path, 3.0}, {d2.path, 1.0}}, o);
    store.reserve(1, n, "big");
    const auto ext = store.extents(1);
    REQUIRE(ext.size() == 2);
    CHECK(ext[0].bytes == n / 4 * 3);
    CHECK(ext[1].bytes == n / 4);
    Buf a(n), b(n);
    fill_pattern(a.p, n, 3);
    Ticket t = store.write_async(1, a.p);
    // counted per part until that part completes: all of it just after the submission, unless a part (the 6 MiB one,
    // a few ms) finished before this line ran on a loaded machine
    const int64_t inflight = store.bytes_in_flight();
    CHECK((inflight == n || inflight == n - ext[0].bytes || inflight == n - ext[1].bytes || inflight == 0));
    t.wait();
    CHECK(store.bytes_in_flight() == 0);
    CHECK(t.seconds() > 0);
    store.read_async(1, b.p).wait();
    CHECK(std::memcmp(a.p, b.p, (size_t)n) == 0);
    const auto st = store.stats();
    CHECK(st[0].write_bytes == n / 4 * 3);
    CHECK(st[1].write_bytes == n / 4);
    CHECK(st[0].busy_s > 0);
    CHECK(st[1].busy_s > 0);
  }
  // One part per path per transfer; the parts of one transfer overlap in time (both paths at once).
  std::vector<TierEvent> parts;
  for (const auto& e : ev)
    if (e.kind == TierEvent::kPartDone) parts.push_back(e);
  REQUIRE(parts.size() == 4);
  for (bool w : {true, false}) {
    std::vector<TierEvent> p;
    for (const auto& e : parts)
      if (e.write == w) p.push_back(e);
    REQUIRE(p.size() == 2);
    CHECK(p[0].path != p[1].path);
    CHECK(p[0].ok);
    CHECK(std::max(p[0].t_begin, p[1].t_begin) < std::min(p[0].t_end, p[1].t_end));
  }
}

TEST_CASE("errors before training: missing, not a directory, unwritable, no space, bad use") {
  TempDir d(disk_parent(), "tier_err"), locks(disk_parent(), "tier_locks");
  TierOptions o = test_options(Backend::kThreads, locks.path);
  auto setup_error = [&](std::vector<PathSpec> p) -> std::string {
    try {
      TierStore s(p, o);
    } catch (const SetupError& e) {
      return e.what();
    }
    return "";
  };
  std::string m = setup_error({{d.path + "/nope", 1}});
  CHECK(m.find(d.path + "/nope") != std::string::npos);
  CHECK(m.find("no such directory") != std::string::npos);
  {
    std::ofstream(d.path + "/afile") << "x";
    m = setup_error({{d.path + "/afile", 1}});
    CHECK(m.find("not a directory") != std::string::npos);
    ::unlink((d.path + "/afile").c_str());
  }
  // Unwritable: a read-only directory for a normal user; for root (who ignores modes) /sys, which refuses new files.
  std::string ro;
  TempDir rod(disk_parent(), "tier_ro");
  if (::geteuid() != 0) {
    ::chmod(rod.path.c_str(), 0555);
    ro = rod.path;
  } else {
    ro = "/sys";
  }
  m = setup_error({{ro, 1}});
  CHECK(m.find("'" + ro + "'") != std::string::npos);
  CHECK(m.find("not writable") != std::string::npos);
  ::chmod(rod.path.c_str(), 0755);
  m = setup_error({{d.path, 1}, {d.path + "/", 1}});
  CHECK(m.find("given twice") != std::string::npos);
  m = setup_error({{d.path, 0}});
  CHECK(m.find("weight") != std::string::npos);
  o.request_bytes = 1000;
  CHECK(setup_error({{d.path, 1}}).find("multiple of 4096") != std::string::npos);
  o.request_bytes = 64 << 10;

  // Not enough space: statvfs says what is free; asking for 1 GiB more names the path and the missing bytes, and
  // the store stays usable with nothing added.
  TierStore store({{d.path, 1}}, o);
  const int64_t avail = free_bytes(d.path);
  REQUIRE(avail > 0);
  try {
    store.reserve(5, avail + (1LL << 30), "opt(S3)");
    FAIL("reserve beyond the free space did not throw");
  } catch (const SetupError& e) {
    const std::string w = e.what();
    CHECK(w.find("'" + d.path + "'") != std::string::npos);
    CHECK(w.find("not enough free space") != std::string::npos);
    CHECK(w.find("missing") != std::string::npos);
    CHECK(w.find("GiB") != std::string::npos);
  }
  CHECK_THROWS_AS(store.object_bytes(5), std::invalid_argument);
  CHECK(store.stats()[0].reserved_bytes == 0);
  // Two paths on one file system: their needs add up against the same free space.
  {
    TempDir d2(disk_parent(), "tier_err2");
    TierStore two({{d.path, 1}, {d2.path, 1}}, o);
    const int64_t free2 = free_bytes(d.path);
    try {
      two.reserve(1, free2 + free2 / 2, "x");  // each path alone would need 3/4 of the free space: fits; both: not
      FAIL("no error");
    } catch (const SetupError& e) {
      const std::string w = e.what();
      CHECK(w.find("'" + d.path + "', '" + d2.path + "'") != std::string::npos);
    }
  }
  // Misuse: unknown id, read before write, duplicate id.
  store.reserve(1, 100);
  Buf b(100);
  CHECK_THROWS_AS(store.read_async(1, b.p), std::logic_error);
  CHECK_THROWS_AS(store.write_async(2, b.p), std::invalid_argument);
  CHECK_THROWS_AS(store.reserve(1, 10), std::invalid_argument);
  CHECK_THROWS_AS(store.reserve_all({{3, 10, ""}, {3, 10, ""}}), std::invalid_argument);
  store.write_async(1, b.p).wait();
  CHECK_NOTHROW(store.read_async(1, b.p).wait());
}

TEST_CASE("backend choice: visible, and MMOC_TIER_BACKEND overrides it") {
  TempDir d(disk_parent(), "tier_env"), locks(disk_parent(), "tier_locks");
  TierOptions o = test_options(Backend::kAuto, locks.path);
  {
    TierStore s({{d.path, 1}}, o);
    const bool uring = uring_unavailable_reason().empty();
    CHECK(std::string(s.backend_name()) == (uring ? "uring" : "threads"));
    CHECK(s.backend_reason().find("auto") != std::string::npos);
  }
  o.backend = Backend::kUring;
  ::setenv("MMOC_TIER_BACKEND", "threads", 1);
  {
    TierStore s({{d.path, 1}}, o);
    CHECK(std::string(s.backend_name()) == "threads");
    CHECK(s.backend_reason().find("MMOC_TIER_BACKEND") != std::string::npos);
  }
  ::setenv("MMOC_TIER_BACKEND", "aio", 1);
  CHECK_THROWS_WITH_AS(TierStore({{d.path, 1}}, o), doctest::Contains("unknown I/O backend 'aio'"), SetupError);
  if (!uring_unavailable_reason().empty()) {
    ::setenv("MMOC_TIER_BACKEND", "uring", 1);
    CHECK_THROWS_AS(TierStore({{d.path, 1}}, o), SetupError);
  }
  ::unsetenv("MMOC_TIER_BACKEND");
}

namespace {

// A child process: sets up, says so on ready_fd, waits for the go byte, then moves `rounds` x `bytes` through a store on `dir` and writes each
// token hold "t_begin t_end bytes" to `log`. Exit code 0 when every read matched.
[[noreturn]] void token_child(int ready_fd, int go_fd, const std::string& dir, const std::string& lock_dir, const std::string& log,
                              int64_t bytes, int rounds, Backend be) {
  int rc = 0;
  try {
    TierOptions o;
    o.backend = be;
    o.request_bytes = 256 << 10;
    o.queue_depth = 4;
    o.batch_bytes = 2 << 20;
    o.lock_dir = lock_dir;
    std::vector<std::pair<double, double>> holds;
    std::vector<int64_t> hold_bytes;
    std::mutex mu;
    o.on_event = [&](const TierEvent& e) {
      if (e.kind != TierEvent::kTokenHold) return;
      std::lock_guard<std::mutex> lk(mu);
      holds.push_back({e.t_begin, e.t_end});
      hold_bytes.push_back(e.bytes);
    };
    {
      TierStore s({{dir, 1}}, o);
      s.reserve(1, bytes);
      Buf a(bytes), b(bytes);
      fill_pattern(a.p, bytes, ::getpid());
      std::memset(b.p, 0, (size_t)bytes);
      char c = 'r';
      if (::write(ready_fd, &c, 1) != 1 || ::read(go_fd, &c, 1) != 1) ::_exit(3);
      for (int r = 0; r < rounds; ++r) {
        s.write_async(1, a.p).wait();
        s.read_async(1, b.p).wait();
        if (std::memcmp(a.p, b.p, (size_t)bytes) != 0) rc = 1;
      }
    }
    std::ofstream out(log);
    for (size_t i = 0; i < holds.size(); ++i)
      out << std::to_string(holds[i].first) << " " << std::to_string(holds[i].second) << " " << hold_bytes[i] << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "token child: %s\n", e.what());
    rc = 2;
  }
  ::_exit(rc);
}

struct Hold { double t0, t1; int who; };

}  // namespace

TEST_CASE("two processes sharing a device take turns by the token") {
  TempDir d(disk_parent(), "tier_tok"), locks(disk_parent(), "tier_locks");
  for (Backend be : backends()) {
    const std::string be_name = backend_name(be);
    CAPTURE(be_name);
    int go[2], ready[2];
    REQUIRE(::pipe(go) == 0);
    REQUIRE(::pipe(ready) == 0);
    const std::string logs[2] = {locks.path + "/a.log", locks.path + "/b.log"};
    pid_t pid[2];
    for (int k = 0; k < 2; ++k) {
      pid[k] = ::fork();
      REQUIRE(pid[k] >= 0);
      if (pid[k] == 0) {
        ::close(go[1]);
        ::close(ready[0]);
        token_child(ready[1], go[0], d.path, locks.path, logs[k], 16 << 20, 4, be);
      }
    }
    ::close(go[0]);
    ::close(ready[1]);
    char rr[2];
    REQUIRE(::read(ready[0], rr, 1) == 1);
    REQUIRE(::read(ready[0], rr + 1, 1) == 1);
    ::close(ready[0]);
    REQUIRE(::write(go[1], "gg", 2) == 2);
    ::close(go[1]);
    for (int k = 0; k < 2; ++k) {
      int st = 0;
      REQUIRE(::waitpid(pid[k], &st, 0) == pid[k]);
      CHECK(WIFEXITED(st));
      CHECK(WEXITSTATUS(st) == 0);
    }
    std::vector<Hold> all;
    int64_t moved[2] = {0, 0};
    for (int k = 0; k < 2; ++k) {
      std::ifstream in(logs[k]);
      double a, b;
      int64_t n;
      while (in >> a >> b >> n) {
        all.push_back({a, b, k});
        moved[k] += n;
      }
      ::unlink(logs[k].c_str());
    }
    // Each process moved 4 x (16 MiB written + 16 MiB read), all of it under the token.
    CHECK(moved[0] == 4 * 2 * (16 << 20));
    CHECK(moved[1] == 4 * 2 * (16 << 20));
    std::sort(all.begin(), all.end(), [](const Hold& x, const Hold& y) { return x.t0 < y.t0; });
    int overlaps = 0;
    for (size_t i = 1; i < all.size(); ++i)
      if (all[i].t0 < all[i - 1].t1) ++overlaps;
    CHECK(overlaps == 0);
    // While both were active they took turns: a hold followed by another hold of the same process is a missed
    // handoff (the kernel's wake-up order alone misses about half of them here).
    double first[2] = {1e300, 1e300}, last[2] = {0, 0};
    for (const auto& h : all) {
      first[h.who] = std::min(first[h.who], h.t0);
      last[h.who] = std::max(last[h.who], h.t1);
    }
    const double w0 = std::max(first[0], first[1]), w1 = std::min(last[0], last[1]);
    int inside = 0, repeats = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      if (all[i].t0 < w0 || all[i].t1 > w1) continue;
      ++inside;
      if (i > 0 && all[i - 1].t0 >= w0 && all[i].who == all[i - 1].who) ++repeats;
    }
    MESSAGE("token holds: " << all.size() << ", " << inside << " while both ran, " << repeats << " without a handoff");
    CHECK(inside >= 16);
    CHECK(repeats <= std::max(2, inside / 10));
  }
}

TEST_CASE("a crash leaves no files and no lock; a later run cannot misread") {
  TempDir d(disk_parent(), "tier_crash"), locks(disk_parent(), "tier_locks");
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(ready[0]);
    try {
      TierOptions o = test_options(Backend::kThreads, locks.path);
      TierStore s({{d.path, 1}}, o);
      const int64_t n = 64 << 20;
      s.reserve(1, n, "state");
      Buf a(n);
      fill_pattern(a.p, n, 9);
      s.write_async(1, a.p).wait();
      s.write_async(1, a.p);  // in flight (and holding the device token) when the process dies
      (void)!::write(ready[1], "r", 1);
      ::pause();
    } catch (...) {
    }
    ::_exit(5);
  }
  ::close(ready[1]);
  char c = 0;
  REQUIRE(::read(ready[0], &c, 1) == 1);
  ::close(ready[0]);
  ::kill(pid, SIGKILL);
  int st = 0;
  REQUIRE(::waitpid(pid, &st, 0) == pid);
  CHECK(WIFSIGNALED(st));
  // Nothing left in the directory (the scratch file had no name).
  CHECK(entries(d.path).empty());
  // The token is free: a new store on the device works (this would hang if the dead process still held it), and
  // it never returns data it did not write.
  ::alarm(60);
  TierStore s({{d.path, 1}}, test_options(Backend::kThreads, locks.path));
  s.reserve(1, 1 << 20, "state");
  Buf b(1 << 20);
  CHECK_THROWS_AS(s.read_async(1, b.p), std::logic_error);
  fill_pattern(b.p, 1 << 20, 1);
  s.write_async(1, b.p).wait();
  Buf r(1 << 20);
  s.read_async(1, r.p).wait();
  CHECK(std::memcmp(b.p, r.p, 1 << 20) == 0);
  ::alarm(0);
}

TEST_CASE("measure_path reports plausible bandwidth and checks the data") {
  TempDir d(disk_parent(), "tier_meas");
  MeasureOptions mo;
  mo.bytes = 8 << 20;
  mo.request_bytes = 1 << 20;
  mo.queue_depth = 4;
  mo.repeats = 1;
  mo.backend = Backend::kThreads;
  const PathBandwidth b = measure_path(d.path, mo);
  CHECK(b.write_gbps > 0);
  CHECK(b.read_gbps > 0);
  CHECK(b.backend == "threads");
  CHECK(!b.device.empty());
  CHECK(entries(d.path).empty());
}
