// mmoc_tier_bench: the NVMe tier's bandwidth against `dd` with direct I/O, in the same run.
//
//   mmoc_tier_bench --paths /nvme0/tmp[,/nvme1/tmp] [--size-mib 2048] [--request-kib 1024] [--qd 8]
//                   [--repeats 3] [--backends threads,uring] [--no-dd] [--no-contention] [--sweep]
//
// For every path: dd write (if=/dev/zero oflag=direct bs=1M) and dd read (iflag=direct), then TierStore writes and
// reads of one object of --size-mib with each backend (median of --repeats), and with several paths all of them at
// once (striped by their measured bandwidth). Contention: two processes on the first path, each moving the same
// amount as the single run, with the device token and without; their aggregate GB/s against one process alone.
// --sweep: request size x queue depth on the first path (at most 1 GiB per point). Lines starting with RESULT summarise.
#include <CLI/CLI.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "engine/tier/measure.hpp"
#include "engine/tier/store.hpp"

extern char** environ;

namespace {

using namespace mmoc::tier;

double now() { return TierStore::now_seconds(); }

// Runs argv; returns wall seconds, or -1 when it failed.
double run_timed(const std::vector<std::string>& args) {
  std::vector<char*> av;
  for (const auto& a : args) av.push_back(const_cast<char*>(a.c_str()));
  av.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid;
  const double t0 = now();
  const int e = posix_spawnp(&pid, av[0], &fa, nullptr, av.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (e != 0) return -1;
  int st = 0;
  if (::waitpid(pid, &st, 0) != pid) return -1;
  const double t = now() - t0;
  return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? t : -1;
}

struct DdResult { double write_gbps = 0, read_gbps = 0; };  // 0: not run, -1: failed

DdResult dd(const std::string& dir, int64_t mib, bool direct) {
  DdResult r;
  const std::string f = dir + "/.mmoc-tier-bench-dd." + std::to_string(::getpid());
  const std::string count = "count=" + std::to_string(mib);
  std::vector<std::string> w = {"dd", "if=/dev/zero", "of=" + f, "bs=1M", count};
  if (direct) w.push_back("oflag=direct");
  double t = run_timed(w);
  r.write_gbps = t > 0 ? (double)mib * (1 << 20) / t / 1e9 : -1;
  std::vector<std::string> rd = {"dd", "if=" + f, "of=/dev/null", "bs=1M", count};
  if (direct) rd.push_back("iflag=direct");
  t = run_timed(rd);
  r.read_gbps = t > 0 ? (double)mib * (1 << 20) / t / 1e9 : -1;
  ::unlink(f.c_str());
  return r;
}

// Aggregate GB/s of `procs` processes, each writing then reading `bytes` `rounds` times on dir.
struct Agg { double write_gbps = 0, read_gbps = 0; bool ok = true; };
Agg contention(const std::string& dir, int procs, int64_t bytes, int rounds, const MeasureOptions& mo, bool token) {
  // Phases are separated by pipes so that all processes write together, then read together.
  int go_w[2], go_r[2], done_w[2], done_r[2];
  if (::pipe(go_w) || ::pipe(go_r) || ::pipe(done_w) || ::pipe(done_r)) return {0, 0, false};
  std::vector<pid_t> pids;
  for (int k = 0; k < procs; ++k) {
    pid_t p = ::fork();
    if (p == 0) {
      int rc = 0;
      try {
        TierOptions o;
        o.request_bytes = mo.request_bytes;
        o.queue_depth = mo.queue_depth;
        o.backend = mo.backend;
        o.device_token = token;
        TierStore s({{dir, 1}}, o);
        s.reserve(1, bytes);
        void *a = nullptr, *b = nullptr;
        if (::posix_memalign(&a, 4096, (size_t)bytes) || ::posix_memalign(&b, 4096, (size_t)bytes)) ::_exit(3);
        fill_pattern(a, bytes, ::getpid());
        std::memset(b, 0, (size_t)bytes);
        s.write_async(1, a).wait();  // untimed: allocation
        char c;
        (void)!::write(done_w[1], "s", 1);  // set up
        if (::read(go_w[0], &c, 1) != 1) ::_exit(4);
        for (int r = 0; r < rounds; ++r) s.write_async(1, a).wait();
        (void)!::write(done_w[1], "w", 1);
        if (::read(go_r[0], &c, 1) != 1) ::_exit(4);
        for (int r = 0; r < rounds; ++r) s.read_async(1, b).wait();
        (void)!::write(done_r[1], "r", 1);
        if (std::memcmp(a, b, (size_t)bytes) != 0) rc = 1;
      } catch (const std::exception& e) {
        std::fprintf(stderr, "contention child: %s\n", e.what());
        rc = 2;
      }
      ::_exit(rc);
    }
    pids.push_back(p);
  }
  Agg agg;
  char c;
  for (int k = 0; k < procs; ++k) agg.ok = agg.ok && ::read(done_w[0], &c, 1) == 1;  // all set up
  double t0 = now();
  for (int k = 0; k < procs; ++k) (void)!::write(go_w[1], "g", 1);
  for (int k = 0; k < procs; ++k) agg.ok = agg.ok && ::read(done_w[0], &c, 1) == 1;
  const double tw = now() - t0;
  t0 = now();
  for (int k = 0; k < procs; ++k) (void)!::write(go_r[1], "g", 1);
  for (int k = 0; k < procs; ++k) agg.ok = agg.ok && ::read(done_r[0], &c, 1) == 1;
  const double tr = now() - t0;
  for (pid_t p : pids) {
    int st = 0;
    ::waitpid(p, &st, 0);
    agg.ok = agg.ok && WIFEXITED(st) && WEXITSTATUS(st) == 0;
  }
  for (int* fds : {go_w, go_r, done_w, done_r}) {
    ::close(fds[0]);
    ::close(fds[1]);
  }
  const double total = (double)procs * rounds * bytes;
  agg.write_gbps = total / tw / 1e9;
  agg.read_gbps = total / tr / 1e9;
  return agg;
}

std::string f2(double x) {
  if (x < 0) return "failed";
  if (x == 0) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", x);
  return b;
}
std::string pct(double a, double b) {
  if (a <= 0 || b <= 0) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f%%", 100.0 * a / b);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mmoc_tier_bench: NVMe tier bandwidth against dd with direct I/O (docs/nvme-tier.md)"};
  std::vector<std::string> paths, backends_s;
  int64_t size_mib = 2048, request_kib = 1024;
  int qd = 8, repeats = 3, procs = 2;
  bool no_dd = false, no_contention = false, sweep = false;
  app.add_option("--paths", paths, "directories, comma-separated (each a separate I/O path)")->required()->delimiter(',');
  app.add_option("--size-mib", size_mib, "object size per path measurement (MiB)")->check(CLI::PositiveNumber);
  app.add_option("--request-kib", request_kib, "request size (KiB, a multiple of 4)")->check(CLI::PositiveNumber);
  app.add_option("--qd", qd, "requests in flight per path")->check(CLI::PositiveNumber);
  app.add_option("--repeats", repeats, "timed writes and reads (median)")->check(CLI::PositiveNumber);
  app.add_option("--backends", backends_s, "threads,uring (default: both where uring works)")->delimiter(',');
  app.add_option("--procs", procs, "processes in the contention test")->check(CLI::PositiveNumber);
  app.add_flag("--no-dd", no_dd, "skip the dd reference");
  app.add_flag("--no-contention", no_contention, "skip the two-process test");
  app.add_flag("--sweep", sweep, "request size x queue depth on the first path");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "mmoc_tier_bench: error: " << e.what() << "\n";
    return 2;
  }
  try {
    std::vector<Backend> bes;
    if (backends_s.empty()) {
      bes.push_back(Backend::kThreads);
      if (uring_unavailable_reason().empty()) bes.push_back(Backend::kUring);
      else std::cout << "io_uring: " << uring_unavailable_reason() << "\n";
    } else {
      for (const auto& s : backends_s) bes.push_back(parse_backend(s, "--backends"));
    }
    if (const char* e = std::getenv("MMOC_TIER_BACKEND"); e && *e)
      std::cout << "note: MMOC_TIER_BACKEND=" << e << " overrides the backends asked for\n";
    MeasureOptions mo;
    mo.bytes = size_mib << 20;
    mo.request_bytes = request_kib << 10;
    mo.queue_depth = qd;
    mo.repeats = repeats;
    std::cout << "mmoc_tier_bench: " << size_mib << " MiB per measurement, requests " << request_kib << " KiB, queue depth "
              << qd << ", median of " << repeats << "\n";

    std::vector<PathInfo> infos;
    for (const auto& p : paths) infos.push_back(probe_path(p));
    std::vector<DdResult> ddr(paths.size());
    if (!no_dd)
      for (size_t i = 0; i < paths.size(); ++i) {
        ddr[i] = dd(paths[i], size_mib, !infos[i].virtual_tier);
        std::cout << "dd " << paths[i] << " (" << infos[i].fs_type << ", device " << infos[i].device << "): write "
                  << f2(ddr[i].write_gbps) << " GB/s, read " << f2(ddr[i].read_gbps) << " GB/s"
                  << (infos[i].virtual_tier ? " (buffered: tmpfs)" : " (oflag/iflag=direct, bs=1M)") << "\n";
      }
    std::vector<std::vector<PathBandwidth>> res(bes.size());
    for (size_t b = 0; b < bes.size(); ++b) {
      mo.backend = bes[b];
      for (size_t i = 0; i < paths.size(); ++i) {
        res[b].push_back(measure_path(paths[i], mo));
        const auto& r = res[b].back();
        std::cout << "tier " << backend_name(bes[b]) << " " << paths[i] << (r.direct ? " (O_DIRECT)" : " (buffered)")
                  << ": write " << f2(r.write_gbps) << " GB/s, read " << f2(r.read_gbps) << " GB/s\n";
        std::cout << "RESULT path=" << paths[i] << " backend=" << backend_name(bes[b]) << " write_gbps=" << f2(r.write_gbps)
                  << " read_gbps=" << f2(r.read_gbps) << " dd_write_gbps=" << f2(ddr[i].write_gbps)
                  << " dd_read_gbps=" << f2(ddr[i].read_gbps) << " write_vs_dd=" << pct(r.write_gbps, ddr[i].write_gbps)
                  << " read_vs_dd=" << pct(r.read_gbps, ddr[i].read_gbps) << "\n";
      }
      if (paths.size() > 1) {
        std::vector<PathSpec> ps;
        double sum_w = 0, sum_r = 0;
        for (size_t i = 0; i < paths.size(); ++i) {
          ps.push_back({paths[i], path_weight(res[b][i].read_gbps, res[b][i].write_gbps)});
          sum_w += res[b][i].write_gbps;
          sum_r += res[b][i].read_gbps;
        }
        MeasureOptions all = mo;
        all.bytes = mo.bytes * (int64_t)paths.size();
        const PathBandwidth a = measure_striped(ps, all);
        std::cout << "RESULT striped backend=" << backend_name(bes[b]) << " paths=" << paths.size()
                  << " write_gbps=" << f2(a.write_gbps) << " read_gbps=" << f2(a.read_gbps) << " (sum of the paths alone: "
                  << f2(sum_w) << " / " << f2(sum_r) << ", " << pct(a.write_gbps, sum_w) << " / " << pct(a.read_gbps, sum_r)
                  << ")\n";
      }
    }
    if (!no_contention && procs > 1) {
      mo.backend = bes.back();
      const int64_t each = std::max<int64_t>(mo.bytes / procs, 64 << 20);
      const int rounds = std::max(1, repeats);
      const Agg one = contention(paths[0], 1, each * procs, rounds, mo, true);
      const Agg with = contention(paths[0], procs, each, rounds, mo, true);
      const Agg without = contention(paths[0], procs, each, rounds, mo, false);
      std::cout << "contention on " << paths[0] << " (" << backend_name(mo.backend) << ", " << procs << " processes x "
                << (each >> 20) << " MiB x " << rounds << " vs 1 process x " << ((each * procs) >> 20) << " MiB):\n";
      std::cout << "  1 process:             write " << f2(one.write_gbps) << " GB/s, read " << f2(one.read_gbps) << " GB/s\n";
      std::cout << "  " << procs << " processes, token:    write " << f2(with.write_gbps) << " GB/s, read " << f2(with.read_gbps)
                << " GB/s" << (with.ok ? "" : " (A PROCESS FAILED)") << "\n";
      std::cout << "  " << procs << " processes, no token: write " << f2(without.write_gbps) << " GB/s, read "
                << f2(without.read_gbps) << " GB/s" << (without.ok ? "" : " (A PROCESS FAILED)") << "\n";
      std::cout << "RESULT contention procs=" << procs << " token_write_vs_one=" << pct(with.write_gbps, one.write_gbps)
                << " token_read_vs_one=" << pct(with.read_gbps, one.read_gbps)
                << " notoken_write_vs_one=" << pct(without.write_gbps, one.write_gbps)
                << " notoken_read_vs_one=" << pct(without.read_gbps, one.read_gbps) << "\n";
      if (!with.ok || !without.ok) return 1;
    }
    if (sweep) {
      for (Backend be : bes) {
        std::cout << "sweep " << paths[0] << " " << backend_name(be) << " (write / read GB/s):\n          ";
        const std::vector<int> qds = {1, 2, 4, 8, 16, 32};
        for (int q : qds) std::printf("   qd %-8d", q);
        std::printf("\n");
        for (int64_t req_kib : {128, 256, 1024, 4096, 8192}) {
          std::printf("  %5lld KiB", (long long)req_kib);
          for (int q : qds) {
            MeasureOptions s = mo;
            s.bytes = std::min<int64_t>(mo.bytes, 1LL << 30);  // 60 points per backend
            s.backend = be;
            s.request_bytes = req_kib << 10;
            s.queue_depth = q;
            s.repeats = 1;
            const PathBandwidth r = measure_path(paths[0], s);
            std::printf("  %5.2f/%5.2f", r.write_gbps, r.read_gbps);
            std::fflush(stdout);
          }
          std::printf("\n");
        }
      }
    }
    return 0;
  } catch (const SetupError& e) {
    std::cerr << "mmoc_tier_bench: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "mmoc_tier_bench: failed: " << e.what() << "\n";
    return 3;
  }
}
