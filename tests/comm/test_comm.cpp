// engine/comm tests. The executable is its own worker: the doctest cases call launch_local_workers on
// /proc/self/exe with "--worker <scenario>", and main() runs that scenario instead of doctest.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <ATen/ATen.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "engine/comm/job.hpp"
#include "engine/comm/transport.hpp"
#include "engine/comm/world.hpp"

using namespace mmoc::comm;

namespace {

std::string g_argv0 = "test_comm";

// ----------------------------------------------------------------------------------------------------------
// Worker side

#define WCHECK(cond)                                                                                   \
  do {                                                                                                 \
    if (!(cond)) {                                                                                     \
      std::ostringstream os_;                                                                          \
      os_ << "check failed at " << __FILE__ << ":" << __LINE__ << ": " #cond;                          \
      throw std::runtime_error(os_.str());                                                             \
    }                                                                                                  \
  } while (0)

// Content every rank can recompute: what `src` sends for `tag` in `step`.
at::Tensor payload(int src, int dst, int mb, int step) {
  // Different sizes per micro-batch, so a mismatched match would also fail on size.
  int64_t n = 8 + 3 * mb;
  return at::arange(n, at::kFloat) + (src * 10000 + dst * 1000 + mb * 100 + step * 10);
}

// Two distinct tags with the same tag_to_int (birthday search; deterministic).
std::pair<std::string, std::string> colliding_tags() {
  std::map<uint32_t, std::string> seen;
  for (long i = 0;; ++i) {
    std::string t = "X." + std::to_string(i);
    auto [it, ok] = seen.emplace(tag_to_int(t), t);
    if (!ok) return {it->second, t};
  }
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::equal(a, b);
}

int worker_exchange(const WorldInfo& w) {
  auto rdzv = Rendezvous::connect(w, std::chrono::seconds(20));
  GlooOptions go;
  go.timeout = std::chrono::seconds(20);
  auto tr = make_gloo_transport(rdzv, go);
  const int r = w.rank, n = w.world_size, next = (r + 1) % n, prev = (r + n - 1) % n;
  WCHECK(tr->rank() == r && tr->world_size() == n);
  WCHECK(std::string(tr->backend()) == "gloo");

  // 1. Ring, blocking API on even ranks first to also exercise send()/recv() (odd ranks receive first).
  {
    at::Tensor mine = at::full({4, 3}, static_cast<double>(r), at::kDouble) + at::arange(12, at::kDouble).view({4, 3});
    at::Tensor got = at::empty({4, 3}, at::kDouble);
    if (r % 2 == 0) {
      tr->send(mine, next, "ring");
      tr->recv(got, prev, "ring");
    } else {
      tr->recv(got, prev, "ring");
      tr->send(mine, next, "ring");
    }
    at::Tensor expect = at::full({4, 3}, static_cast<double>(prev), at::kDouble) + at::arange(12, at::kDouble).view({4, 3});
    WCHECK(same(got, expect));
  }
  // 2. Ring with the async batch API.
  {
    at::Tensor mine = at::arange(5, at::kLong) * (r + 1);
    at::Tensor got = at::zeros({5}, at::kLong);
    auto work = tr->batch_isend_irecv({P2POp{P2POp::kSend, &mine, next, "ring2"}, P2POp{P2POp::kRecv, &got, prev, "ring2"}});
    work->wait();
    WCHECK(same(got, at::arange(5, at::kLong) * (prev + 1)));
  }
  // 3. Several tags in flight to the same peer, received in reverse order and waited in a scrambled
  //    order; two steps reuse the same tags; one destination is a non-contiguous view.
  const int kMb = 5;
  for (int step = 0; step < 2; ++step) {
    std::vector<at::Tensor> outgoing;
    std::vector<WorkPtr> sends;
    for (int mb = 0; mb < kMb; ++mb) {
      outgoing.push_back(payload(r, next, mb, step));
      sends.push_back(tr->isend(outgoing.back(), next, "F.S0.m" + std::to_string(mb)));
    }
    std::vector<at::Tensor> incoming(kMb);
    std::vector<WorkPtr> recvs(kMb);
    at::Tensor backing;  // for the non-contiguous destination of mb 3
    for (int mb = kMb - 1; mb >= 0; --mb) {
      int64_t len = 8 + 3 * mb;
      if (mb == 3) {
        backing = at::full({len, 2}, -1.0f);
        incoming[mb] = backing.select(1, 0);  // stride 2: not contiguous
        WCHECK(!incoming[mb].is_contiguous());
      } else {
        incoming[mb] = at::empty({len}, at::kFloat);
      }
      recvs[mb] = tr->irecv(incoming[mb], prev, "F.S0.m" + std::to_string(mb));
    }
    for (int mb : {2, 4, 0, 3, 1}) recvs[mb]->wait();
    for (int mb = 0; mb < kMb; ++mb) WCHECK(same(incoming[mb], payload(prev, r, mb, step)));
    WCHECK(same(backing.select(1, 1), at::full({8 + 3 * 3}, -1.0f)));  // the other column untouched
    for (auto& s : sends) s->wait();
  }
  // 4. All-to-all style: every rank sends to every other with its own tag, all in flight at once.
  {
    std::vector<at::Tensor> out, in(n);
    std::vector<WorkPtr> works;
    for (int p = 0; p < n; ++p) {
      if (p == r) continue;
      out.push_back(at::full({7}, static_cast<float>(r * n + p)));
      works.push_back(tr->isend(out.back(), p, "B.S" + std::to_string(r) + ".m" + std::to_string(p)));
    }
    for (int p = n - 1; p >= 0; --p) {
      if (p == r) continue;
      in[p] = at::empty({7}, at::kFloat);
      works.push_back(tr->irecv(in[p], p, "B.S" + std::to_string(p) + ".m" + std::to_string(r)));
    }
    for (auto& wk : works) wk->wait();
    for (int p = 0; p < n; ++p)
      if (p != r) WCHECK(same(in[p], at::full({7}, static_cast<float>(p * n + r))));
  }
  // 5. Allreduce (float, non-contiguous double) and the double allreduce of the grad norm.
  {
    at::Tensor t = at::full({3, 5}, static_cast<float>(r + 1)) * at::arange(15, at::kFloat).view({3, 5});
    tr->allreduce_sum(t);
    float tri = n * (n + 1) / 2.0f;
    WCHECK(same(t, at::arange(15, at::kFloat).view({3, 5}) * tri));
    at::Tensor d = at::full({4, 2}, 0.25 * (r + 1), at::kDouble).t();
    WCHECK(!d.is_contiguous());
    auto wk = tr->iallreduce_sum(d);
    wk->wait();
    WCHECK(same(d, at::full({2, 4}, 0.25 * tri, at::kDouble)));
    double s = tr->allreduce_sum_double(r + 0.5);
    WCHECK(s == n * n / 2.0);
    // the element-wise maximum (tensor parallelism's cross-entropy): rank r holds r at even and -r at odd positions
    at::Tensor m = at::arange(6, at::kFloat).remainder(2).mul(-2).add(1).mul(static_cast<float>(r));
    tr->allreduce_max(m);
    WCHECK(same(m, at::tensor({float(n - 1), 0.f, float(n - 1), 0.f, float(n - 1), 0.f})));
  }
  // 6. A group of the even ranks (collective call on every rank).
  {
    std::vector<int> even;
    for (int q = 0; q < n; q += 2) even.push_back(q);
    tr->create_group("even", even);
    if (r % 2 == 0) {
      at::Tensor t = at::full({2}, static_cast<float>(r));
      tr->allreduce_sum(t, "even");
      float sum = 0;
      for (int q : even) sum += q;
      WCHECK(same(t, at::full({2}, sum)));
      WCHECK(tr->allreduce_sum_double(1.0, "even") == static_cast<double>(even.size()));
      tr->barrier("even");
    } else {
      bool threw = false;
      try {
        at::Tensor t = at::zeros({1});
        tr->allreduce_sum(t, "even");
      } catch (const CommError& e) {
        threw = std::string(e.what()).find("not a member") != std::string::npos;
      }
      WCHECK(threw);
    }
  }
  // 7. Errors that must be clear, not hangs.
  {
    bool threw = false;
    try {
      at::Tensor t = at::zeros({1});
      tr->send(t, r, "self");
    } catch (const CommError& e) {
      threw = std::string(e.what()).find("invalid peer") != std::string::npos;
    }
    WCHECK(threw);
  }
  // 8. Two different tags that map to the same integer, used with the same peer: an error, not a mismatch.
  {
    auto [a, b] = colliding_tags();
    WCHECK(a != b && tag_to_int(a) == tag_to_int(b));
    if (r == 0) {
      at::Tensor t = at::full({3}, 42.0f);
      tr->send(t, 1, a);
      bool threw = false;
      try {
        tr->isend(t, 1, b);
      } catch (const CommError& e) {
        std::string m = e.what();
        threw = m.find("'" + a + "' and '" + b + "'") != std::string::npos && m.find("same integer") != std::string::npos;
      }
      WCHECK(threw);
    } else if (r == 1) {
      at::Tensor t = at::empty({3});
      tr->recv(t, 0, a);
      WCHECK(same(t, at::full({3}, 42.0f)));
    }
  }
  tr->barrier();
  // The rendezvous store as a side channel.
  rdzv->set("done/" + std::to_string(r), "ok");
  for (int q = 0; q < n; ++q) WCHECK(rdzv->get("done/" + std::to_string(q)) == "ok");
  tr->barrier();
  return 0;
}

// Rank 1 exits with code 3 after joining; the others block in a recv from it that would take the full
// (long) gloo timeout: only the launcher's kill ends them quickly.
int worker_fail(const WorldInfo& w) {
  auto rdzv = Rendezvous::connect(w, std::chrono::seconds(20));
  GlooOptions go;
  go.timeout = std::chrono::seconds(600);
  auto tr = make_gloo_transport(rdzv, go);
  if (w.rank == 1) {
    std::fflush(nullptr);
    ::_exit(3);
  }
  at::Tensor t = at::empty({4});
  tr->recv(t, 1, "never");
  return 0;
}

int worker_signal(const WorldInfo& w) {
  if (w.rank == 0) ::raise(SIGKILL);
  ::sleep(600);
  return 0;
}

int worker_env(const WorldInfo& w) {
  // Launcher contract: variables present and consistent.
  const char* lws = std::getenv("LOCAL_WORLD_SIZE");
  const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
  const char* extra = std::getenv("MMOC_TEST_EXTRA");
  WCHECK(lws && std::atoi(lws) == w.world_size);
  WCHECK(nvls && std::string(nvls) == "0");
  WCHECK(extra && std::string(extra) == "hello");
  WCHECK(w.local_rank == w.rank && w.master_addr == "127.0.0.1" && w.master_port > 0);
  return 0;
}

// Scenarios under launch_node (mmoc-run's launcher, possibly two "nodes"): the job's store is the launcher's,
// the JobMonitor runs, and failures go through exit_rank as in mmoc-run.
int worker_node(const WorldInfo& w, const std::string& what) {
  std::unique_ptr<JobMonitor> mon;  // alive in the handler too, as in mmoc-run
  try {
    auto rdzv = Rendezvous::connect(w, std::chrono::milliseconds(static_cast<int64_t>(w.rdzv_timeout_s * 1000)));
    MonitorOptions mo;
    mo.program = "test_comm";
    mon = JobMonitor::start(rdzv, mo);
    GlooOptions go;
    go.timeout = std::chrono::seconds(600);  // only the monitor can end a wait for a peer that is gone
    auto tr = make_gloo_transport(rdzv, go);
    const int last = w.world_size - 1;
    if (what == "node-exchange") {
      // the launcher's placement: contiguous blocks per node, local rank = device index
      const char* lws = std::getenv("LOCAL_WORLD_SIZE");
      WCHECK(w.launcher == "mmoc-run" && w.agent_store);
      WCHECK(lws && std::atoi(lws) == w.local_world_size);
      WCHECK(w.rank == w.node_rank * w.local_world_size + w.local_rank);
      WCHECK(w.nnodes * w.local_world_size == w.world_size);
      for (int q = 0; q < w.world_size; ++q) {
        WCHECK(rdzv->node_of(q) == q / w.local_world_size);
        if (w.nnodes > 1)
          WCHECK(rdzv->describe_rank(q).find("rank " + std::to_string(q) + " (node " + std::to_string(q / w.local_world_size) +
                                             ", host ") == 0);
      }
      at::Tensor mine = at::full({3}, static_cast<float>(w.rank)), got = at::empty({3});
      const int next = (w.rank + 1) % w.world_size, prev = (w.rank + w.world_size - 1) % w.world_size;
      tr->batch_isend_irecv({P2POp{P2POp::kSend, &mine, next, "ring"}, P2POp{P2POp::kRecv, &got, prev, "ring"}})->wait();
      WCHECK(same(got, at::full({3}, static_cast<float>(prev))));
      WCHECK(tr->allreduce_sum_double(1.0) == w.world_size);
      mon->finish();
      return 0;
    }
    tr->barrier();
    if (what == "kill-last" && w.rank == last) ::raise(SIGKILL);
    if (what == "stop-last" && w.rank == last) ::raise(SIGSTOP);
    if (what == "error-1" && w.rank == 1) exit_rank("test_comm", 3, "deliberate failure of rank 1\nsecond line");
    at::Tensor t = at::empty({4});
    tr->recv(t, w.rank == last ? 0 : last, "never");  // never sent
    return 0;
  } catch (const std::exception& e) {
    exit_rank("test_comm", 3, e.what());
  }
}

int run_worker(const std::string& scenario) {
  if (const char* dir = std::getenv("MMOC_TEST_ERR_DIR")) {  // this worker's stderr into <dir>/<rank>.err
    std::string path = std::string(dir) + "/" + (std::getenv("RANK") ? std::getenv("RANK") : "x") + ".err";
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) ::dup2(fd, 2);
  }
  try {
    WorldInfo w = world_from_env();
    if (scenario.rfind("node-", 0) == 0 || scenario == "kill-last" || scenario == "stop-last" || scenario == "error-1")
      return worker_node(w, scenario);
    if (scenario == "exchange") return worker_exchange(w);
    if (scenario == "fail") return worker_fail(w);
    if (scenario == "signal") return worker_signal(w);
    if (scenario == "env") return worker_env(w);
    std::fprintf(stderr, "unknown worker scenario '%s'\n", scenario.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[worker %s rank %s] %s\n", scenario.c_str(), std::getenv("RANK") ? std::getenv("RANK") : "?",
                 e.what());
    return 1;
  }
}

// ----------------------------------------------------------------------------------------------------------
// Parent side

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int launch(int n, const std::string& scenario, LaunchReport* rep,
           std::vector<std::pair<std::string, std::string>> extra = {}) {
  return launch_local_workers(n, {g_argv0, "--worker", scenario}, extra, rep);
}

// One "node" of a multi-node job, run in this process.
int run_node(int nnodes, int node_rank, int nproc, const std::string& addr, int port, double rdzv_s, double fail_s,
             const std::string& scenario, LaunchReport* rep) {
  NodeLaunch nl;
  nl.nnodes = nnodes;
  nl.node_rank = node_rank;
  nl.nproc_per_node = nproc;
  nl.master_addr = addr;
  nl.master_port = port;
  nl.rdzv_timeout_s = rdzv_s;
  nl.fail_timeout_s = fail_s;
  return launch_node(nl, {g_argv0, "--worker", scenario}, {}, rep, {}, "test_comm");
}

// Another "node": this executable in --launch-node mode, its stderr into `err` (read with slurp()).
pid_t spawn_node(int nnodes, int node_rank, int nproc, const std::string& addr, int port, double rdzv_s, double fail_s,
                 const std::string& scenario, const std::string& err) {
  std::vector<std::string> args{g_argv0, "--launch-node", std::to_string(nnodes), std::to_string(node_rank), std::to_string(nproc),
                                addr, std::to_string(port), std::to_string(rdzv_s), std::to_string(fail_s), scenario};
  pid_t pid = ::fork();
  if (pid == 0) {
    int fd = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) ::dup2(fd, 2);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv("/proc/self/exe", argv.data());
    ::_exit(127);
  }
  return pid;
}

// Waits for `pid` up to `limit_s`; kills it after that. Exit code, or -signal, or -1000 on timeout.
int wait_pid(pid_t pid, double limit_s) {
  auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    int st = 0;
    pid_t got = ::waitpid(pid, &st, WNOHANG);
    if (got == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > limit_s) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &st, 0);
      return -1000;
    }
    ::usleep(20000);
  }
}

std::string slurp(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return "";
  std::string s;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  std::fclose(f);
  return s;
}

std::string tmp_path(const std::string& name) {
  const char* t = std::getenv("TMPDIR");
  return std::string(t ? t : "/tmp") + "/mmoc-comm-" + std::to_string(::getpid()) + "-" + name;
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

TEST_CASE("world_from_env: valid torchrun and Slurm environments") {
  WorldInfo w = world_from_env({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"},
                                {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "29500"}});
  DOCTEST_CHECK(w.rank == 3);
  DOCTEST_CHECK(w.world_size == 4);
  DOCTEST_CHECK(w.local_rank == 1);
  DOCTEST_CHECK(w.master_addr == "node7");
  DOCTEST_CHECK(w.master_port == 29500);

  WorldInfo s = world_from_env({{"SLURM_PROCID", "2"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "2"},
                                {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "1234"}});
  DOCTEST_CHECK(s.rank == 2);
  DOCTEST_CHECK(s.world_size == 8);
  DOCTEST_CHECK(s.local_rank == 2);

  // RANK wins over SLURM_PROCID; LOCAL_RANK defaults to RANK; a single process needs no master.
  WorldInfo t = world_from_env({{"RANK", "1"}, {"SLURM_PROCID", "5"}, {"WORLD_SIZE", "2"},
                                {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}});
  DOCTEST_CHECK(t.rank == 1);
  DOCTEST_CHECK(t.local_rank == 1);
  WorldInfo one = world_from_env({{"RANK", "0"}, {"WORLD_SIZE", "1"}});
  DOCTEST_CHECK(one.world_size == 1);
}

TEST_CASE("world_from_env: bad environments give errors naming the variable") {
  auto err = [](std::map<std::string, std::string> env) -> std::string {
    try {
      world_from_env(env);
    } catch (const CommError& e) {
      return e.what();
    }
    return "<no error>";
  };
  const std::map<std::string, std::string> good{
      {"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "29500"}};
  auto with = [&](const std::string& k, const std::string& v) {
    auto e = good;
    e[k] = v;
    return e;
  };
  auto without = [&](const std::string& k) {
    auto e = good;
    e.erase(k);
    return e;
  };
  DOCTEST_CHECK(err(without("RANK")).find("RANK is not set") != std::string::npos);
  DOCTEST_CHECK(err(without("WORLD_SIZE")).find("WORLD_SIZE is not set") != std::string::npos);
  DOCTEST_CHECK(err(without("MASTER_ADDR")).find("MASTER_ADDR is not set") != std::string::npos);
  DOCTEST_CHECK(err(without("MASTER_PORT")).find("MASTER_PORT is not set") != std::string::npos);
  DOCTEST_CHECK(err(with("RANK", "x1")).find("RANK='x1' is not an integer") != std::string::npos);
  DOCTEST_CHECK(err(with("RANK", "1 ")).find("is not an integer") != std::string::npos);
  DOCTEST_CHECK(err(with("RANK", "")).find("is not an integer") != std::string::npos);
  DOCTEST_CHECK(err(with("RANK", "2")).find("outside [0, 2)") != std::string::npos);
  DOCTEST_CHECK(err(with("RANK", "-1")).find("outside [0, 2)") != std::string::npos);
  DOCTEST_CHECK(err(with("WORLD_SIZE", "0")).find("world size must be >= 1") != std::string::npos);
  DOCTEST_CHECK(err(with("WORLD_SIZE", "99999999999")).find("not an integer") != std::string::npos);
  DOCTEST_CHECK(err(with("MASTER_PORT", "70000")).find("outside [1, 65535]") != std::string::npos);
  DOCTEST_CHECK(err(with("MASTER_PORT", "http")).find("MASTER_PORT='http' is not an integer") != std::string::npos);
  DOCTEST_CHECK(err(with("LOCAL_RANK", "-2")).find("LOCAL_RANK=-2 is invalid") != std::string::npos);
  DOCTEST_CHECK(err({{"SLURM_PROCID", "9"}, {"SLURM_NTASKS", "4"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}})
            .find("SLURM_PROCID=9 is outside [0, 4)") != std::string::npos);

  // The process-environment overload reads the same variables.
  ::setenv("RANK", "0", 1);
  ::setenv("WORLD_SIZE", "abc", 1);
  DOCTEST_CHECK_THROWS_WITH_AS(world_from_env(), doctest::Contains("WORLD_SIZE='abc' is not an integer"), CommError);
  ::unsetenv("RANK");
  ::unsetenv("WORLD_SIZE");
}

TEST_CASE("tag_to_int is stable and spreads the plan's tags") {
  // Pinned values: the map must not change between builds (both sides of a send compute it).
  DOCTEST_CHECK(tag_to_int("") == ((0xcbf29ce484222325ull ^ (0xcbf29ce484222325ull >> 32)) & 0x7fffffffu));
  DOCTEST_CHECK(tag_to_int("F.S0.m0") == tag_to_int(std::string("F.S0.m") + "0"));
  std::map<uint32_t, std::string> seen;
  int collisions = 0;
  bool all_31_bit = true;
  for (int s = 0; s < 64; ++s)
    for (int m = 0; m < 256; ++m)
      for (const char* k : {"F", "B"}) {
        std::string tag = std::string(k) + ".S" + std::to_string(s) + ".m" + std::to_string(m);
        uint32_t v = tag_to_int(tag);
        all_31_bit &= v < (1u << 31);
        if (!seen.emplace(v, tag).second) ++collisions;
      }
  DOCTEST_CHECK(all_31_bit);
  DOCTEST_CHECK(collisions == 0);
}

TEST_CASE("rendezvous: a missing rank 0 gives a clear timeout error") {
  WorldInfo w;
  w.rank = 1;
  w.world_size = 2;
  w.master_addr = "127.0.0.1";
  w.master_port = pick_free_port();  // nobody listens there
  auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    Rendezvous::connect(w, std::chrono::milliseconds(1500));
  } catch (const CommError& e) {
    msg = e.what();
  }
  INFO(msg);
  DOCTEST_CHECK(msg.find("rendezvous failed (rank 1 of 2): cannot reach the job's store at 127.0.0.1:") != std::string::npos);
  DOCTEST_CHECK(msg.find("hosted by rank 0") != std::string::npos);
  DOCTEST_CHECK(msg.find('\n') == std::string::npos);
  DOCTEST_CHECK(seconds_since(t0) < 15);
}

TEST_CASE("rendezvous: rank 0 waiting for workers that never come times out") {
  WorldInfo w;
  w.rank = 0;
  w.world_size = 3;
  w.master_addr = "127.0.0.1";
  w.master_port = pick_free_port();
  std::string msg;
  try {
    Rendezvous::connect(w, std::chrono::milliseconds(1500));
  } catch (const CommError& e) {
    msg = e.what();
  }
  INFO(msg);
  DOCTEST_CHECK(msg.find("rendezvous timed out after 1.5 s: 1 of 3 ranks joined") != std::string::npos);
  DOCTEST_CHECK(msg.find("ranks 1-2 did not") != std::string::npos);
}

TEST_CASE("launcher sets the worker environment") {
  LaunchReport rep;
  DOCTEST_CHECK(launch(2, "env", &rep, {{"MMOC_TEST_EXTRA", "hello"}}) == 0);
  DOCTEST_CHECK(rep.failed_rank == -1);
}

TEST_CASE("gloo transport: 2 workers exchange, allreduce, barrier") {
  if (!gloo_available()) {
    MESSAGE("skipped: built without the gloo transport");
    return;
  }
  auto t0 = std::chrono::steady_clock::now();
  LaunchReport rep;
  int rc = launch(2, "exchange", &rep);
  INFO(rep.message);
  DOCTEST_CHECK(rc == 0);
  MESSAGE("2 workers: " << seconds_since(t0) << " s");
}

TEST_CASE("gloo transport: 4 workers exchange, allreduce, barrier") {
  if (!gloo_available()) {
    MESSAGE("skipped: built without the gloo transport");
    return;
  }
  auto t0 = std::chrono::steady_clock::now();
  LaunchReport rep;
  int rc = launch(4, "exchange", &rep);
  INFO(rep.message);
  DOCTEST_CHECK(rc == 0);
  MESSAGE("4 workers: " << seconds_since(t0) << " s");
}

TEST_CASE("launcher: a failing worker fails the job fast and names rank and exit code") {
  if (!gloo_available()) {
    MESSAGE("skipped: built without the gloo transport");
    return;
  }
  auto t0 = std::chrono::steady_clock::now();
  LaunchReport rep;
  LaunchOptions opts;
  opts.print_failure = false;
  int rc = launch_local_workers(4, {g_argv0, "--worker", "fail"}, {}, &rep, opts);
  double dt = seconds_since(t0);
  INFO(rep.message);
  DOCTEST_CHECK(rc == 3);
  DOCTEST_CHECK(rep.failed_rank == 1);
  DOCTEST_CHECK(rep.exit_code == 3);
  DOCTEST_CHECK(rep.signal == 0);
  DOCTEST_CHECK(rep.message.find("worker rank 1 (pid ") != std::string::npos);
  DOCTEST_CHECK(rep.message.find("exited with code 3") != std::string::npos);
  DOCTEST_CHECK(rep.message.find("stopped the 3 other workers still running") != std::string::npos);
  DOCTEST_CHECK(dt < 15);  // the others were blocked in a recv with a 600 s timeout: they were killed
}

TEST_CASE("launcher: a worker killed by a signal is reported as such") {
  LaunchReport rep;
  LaunchOptions opts;
  opts.print_failure = false;
  auto t0 = std::chrono::steady_clock::now();
  int rc = launch_local_workers(2, {g_argv0, "--worker", "signal"}, {}, &rep, opts);
  INFO(rep.message);
  DOCTEST_CHECK(rc == 128 + SIGKILL);
  DOCTEST_CHECK(rep.failed_rank == 0);
  DOCTEST_CHECK(rep.signal == SIGKILL);
  DOCTEST_CHECK(rep.message.find("worker rank 0") != std::string::npos);
  DOCTEST_CHECK(rep.message.find("killed by signal 9") != std::string::npos);
  DOCTEST_CHECK(seconds_since(t0) < 10);
}

TEST_CASE("launcher rejects n < 1; nccl availability is reported") {
  DOCTEST_CHECK_THROWS_AS(launch_local_workers(0, {g_argv0}), CommError);
  MESSAGE("NCCL transport compiled in: " << std::string(nccl_available() ? "yes" : "no"));
}

// ----------------------------------------------------------------------------------------------------------
// Slurm's compressed forms, environments of several nodes, mmoc-run's launcher options

TEST_CASE("slurm: host lists expand like scontrol show hostnames") {
  using V = std::vector<std::string>;
  DOCTEST_CHECK(expand_hostlist("node01") == V{"node01"});
  DOCTEST_CHECK(expand_hostlist("node[01-03,07]") == V{"node01", "node02", "node03", "node07"});
  DOCTEST_CHECK(expand_hostlist("gpu[1-3]") == V{"gpu1", "gpu2", "gpu3"});
  DOCTEST_CHECK(expand_hostlist("gpu[9-11]") == V{"gpu9", "gpu10", "gpu11"});      // width of the lower bound
  DOCTEST_CHECK(expand_hostlist("gpu[098-101]") == V{"gpu098", "gpu099", "gpu100", "gpu101"});
  DOCTEST_CHECK(expand_hostlist("a[1-2],b,c[5]") == V{"a1", "a2", "b", "c5"});
  DOCTEST_CHECK(expand_hostlist("n[1-2]-ib") == V{"n1-ib", "n2-ib"});             // suffix after the brackets
  DOCTEST_CHECK(expand_hostlist("rack[1-2]-n[01-02]") == V{"rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"});
  DOCTEST_CHECK(expand_hostlist("127.0.0.[1-2]") == V{"127.0.0.1", "127.0.0.2"});
  DOCTEST_CHECK(expand_hostlist("x[3,1,2]") == V{"x3", "x1", "x2"});               // order kept, as Slurm
  DOCTEST_CHECK(expand_hostlist("node[00-99]").size() == 100);
  auto err = [](const std::string& l) -> std::string {
    try {
      expand_hostlist(l);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "<no error>";
  };
  DOCTEST_CHECK(err("").find("empty host list") != std::string::npos);
  DOCTEST_CHECK(err("a,,b").find("empty host name") != std::string::npos);
  DOCTEST_CHECK(err("a,").find("empty host name") != std::string::npos);
  DOCTEST_CHECK(err("node[1-3").find("unbalanced '['") != std::string::npos);
  DOCTEST_CHECK(err("node1-3]").find("unbalanced ']'") != std::string::npos);
  DOCTEST_CHECK(err("n[1-[2]]").find("nested") != std::string::npos);
  DOCTEST_CHECK(err("n[]").find("empty brackets") != std::string::npos);
  DOCTEST_CHECK(err("n[1,,2]").find("empty range") != std::string::npos);
  DOCTEST_CHECK(err("n[3-1]").find("runs backwards") != std::string::npos);
  DOCTEST_CHECK(err("n[a-b]").find("not a number") != std::string::npos);
  DOCTEST_CHECK(err("n[1-2-3]").find("not a number") != std::string::npos);
  DOCTEST_CHECK(err("n[0-99999999]").find("more than 1000000") != std::string::npos);
  DOCTEST_CHECK(err("a b").find("white space") != std::string::npos);
  DOCTEST_CHECK(err("node[1-3").find("'node[1-3'") != std::string::npos);  // names the list
}

TEST_CASE("slurm: tasks per node and the port derived from the job id") {
  DOCTEST_CHECK(expand_tasks_per_node("4") == std::vector<int>{4});
  DOCTEST_CHECK(expand_tasks_per_node("2(x3),1") == std::vector<int>{2, 2, 2, 1});
  DOCTEST_CHECK(expand_tasks_per_node("1(x2),3(x1)") == std::vector<int>{1, 1, 3});
  for (const char* bad : {"", "x", "2(x)", "2(x3", "0", "2,,1", "2(x0)", "-1"})
    DOCTEST_CHECK_THROWS_AS(expand_tasks_per_node(bad), ConfigError);
  DOCTEST_CHECK(slurm_master_port(0) == 20000);
  DOCTEST_CHECK(slurm_master_port(123456) == 20000 + 123456 % 40000);
  for (long long id : {1LL, 39999LL, 40000LL, 987654321LL}) {
    int p = slurm_master_port(id);
    DOCTEST_CHECK(p >= 20000);
    DOCTEST_CHECK(p < 60000);
  }
}

TEST_CASE("world_from_env: several nodes under torchrun, Slurm and mmoc-run's launcher") {
  // torchrun --nnodes 2 --nproc_per_node 4, node 1, local rank 2 -> rank 6
  WorldInfo t = world_from_env({{"RANK", "6"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "4"},
                                {"GROUP_RANK", "1"}, {"GROUP_WORLD_SIZE", "2"}, {"MASTER_ADDR", "gpu01"}, {"MASTER_PORT", "29500"},
                                {"TORCHELASTIC_RUN_ID", "none"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                                {"TORCHELASTIC_RESTART_COUNT", "2"}});
  DOCTEST_CHECK(t.launcher == "torchrun");
  DOCTEST_CHECK(t.agent_store);
  DOCTEST_CHECK(t.store_prefix == "mmoc/attempt_2");
  DOCTEST_CHECK(t.node_rank == 1);
  DOCTEST_CHECK(t.nnodes == 2);
  DOCTEST_CHECK(t.local_rank == 2);
  DOCTEST_CHECK(t.local_world_size == 4);
  DOCTEST_CHECK(t.ranks_per_node == std::vector<int>{4, 4});
  DOCTEST_CHECK(t.expected_node(3) == 0);
  DOCTEST_CHECK(t.expected_node(4) == 1);
  DOCTEST_CHECK(t.describe_expected(5) == "rank 5 (node 1)");
  // torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 hosts
  WorldInfo t2 = world_from_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"},
                                 {"TORCHELASTIC_USE_AGENT_STORE", "False"}, {"TORCHELASTIC_RUN_ID", "x"}});
  DOCTEST_CHECK(!t2.agent_store);
  DOCTEST_CHECK(t2.store_prefix == "mmoc");

  // srun -N2 -n8 (one task per rank): rank, size, node and the master all from Slurm, the port from the job id
  std::map<std::string, std::string> slurm{{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                                           {"SLURM_NODEID", "1"}, {"SLURM_NNODES", "2"}, {"SLURM_STEP_ID", "0"},
                                           {"SLURM_STEP_NODELIST", "gpu[07-08]"}, {"SLURM_JOB_NODELIST", "gpu[01-09]"},
                                           {"SLURM_STEP_TASKS_PER_NODE", "4(x2)"}, {"SLURM_JOB_ID", "4242"}};
  WorldInfo s = world_from_env(slurm);
  DOCTEST_CHECK(s.launcher == "slurm");
  DOCTEST_CHECK(!s.agent_store);
  DOCTEST_CHECK(s.rank == 5);
  DOCTEST_CHECK(s.world_size == 8);
  DOCTEST_CHECK(s.local_rank == 1);
  DOCTEST_CHECK(s.node_rank == 1);
  DOCTEST_CHECK(s.nnodes == 2);
  DOCTEST_CHECK(s.local_world_size == 4);
  DOCTEST_CHECK(s.master_addr == "gpu07");  // the step's first node, not the job's
  DOCTEST_CHECK(s.master_port == slurm_master_port(4242));
  DOCTEST_CHECK(s.node_hosts == std::vector<std::string>{"gpu07", "gpu08"});
  DOCTEST_CHECK(s.describe_expected(2) == "rank 2 (node 0, host gpu07)");
  DOCTEST_CHECK(s.describe_expected(7) == "rank 7 (node 1, host gpu08)");
  auto s2 = slurm;
  s2["MASTER_ADDR"] = "10.0.0.5";
  s2["MASTER_PORT"] = "31000";
  s2["SLURM_DISTRIBUTION"] = "cyclic";
  WorldInfo sm = world_from_env(s2);
  DOCTEST_CHECK(sm.master_addr == "10.0.0.5");  // explicit variables win
  DOCTEST_CHECK(sm.master_port == 31000);
  DOCTEST_CHECK(sm.expected_node(2) == -1);  // cyclic placement: not contiguous, not guessed
  auto s3 = slurm;
  s3.erase("SLURM_STEP_NODELIST");
  DOCTEST_CHECK(world_from_env(s3).master_addr == "gpu01");  // the job's list when the step has none
  auto s4 = slurm;
  s4["SLURM_STEP_NODELIST"] = "gpu[07-";
  DOCTEST_CHECK_THROWS_WITH_AS(world_from_env(s4), doctest::Contains("SLURM_STEP_NODELIST='gpu[07-'"), ConfigError);
  auto s5 = slurm;
  s5.erase("SLURM_JOB_ID");
  DOCTEST_CHECK_THROWS_WITH_AS(world_from_env(s5), doctest::Contains("MASTER_PORT is not set"), ConfigError);
  auto s6 = slurm;
  s6["SLURM_NODEID"] = "2";
  DOCTEST_CHECK_THROWS_WITH_AS(world_from_env(s6), doctest::Contains("SLURM_NODEID=2 is outside [0, 2)"), ConfigError);

  // mmoc-run's launcher (node 1 of 2, 2 ranks each)
  WorldInfo m = world_from_env({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"}, {"GROUP_RANK", "1"},
                                {"GROUP_WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "5000"}, {"MMOC_LAUNCHER", "1"},
                                {"MMOC_RDZV_TIMEOUT", "7.5"}, {"MMOC_FAIL_TIMEOUT", "3"}});
  DOCTEST_CHECK(m.launcher == "mmoc-run");
  DOCTEST_CHECK(m.agent_store);
  DOCTEST_CHECK(m.rdzv_timeout_s == 7.5);
  DOCTEST_CHECK(m.fail_timeout_s == 3);
  DOCTEST_CHECK_THROWS_WITH_AS(world_from_env({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MMOC_FAIL_TIMEOUT", "0"}}),
                               doctest::Contains("MMOC_FAIL_TIMEOUT='0' is not a positive number of seconds"), ConfigError);
  DOCTEST_CHECK_THROWS_WITH_AS(world_from_env({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"},
                                               {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}}),
                               doctest::Contains("LOCAL_RANK=2 is invalid"), ConfigError);
  DOCTEST_CHECK_THROWS_WITH_AS(world_from_env({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"GROUP_WORLD_SIZE", "5"},
                                               {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}}),
                               doctest::Contains("GROUP_WORLD_SIZE=5 is invalid"), ConfigError);
}

TEST_CASE("is_rank_process: torchrun and srun with one task per rank are ranks; one task per node launches") {
  DOCTEST_CHECK(is_rank_process({{"RANK", "0"}}));
  DOCTEST_CHECK(!is_rank_process({}));
  std::map<std::string, std::string> step{{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}, {"SLURM_NNODES", "2"}, {"SLURM_STEP_ID", "0"}};
  DOCTEST_CHECK(is_rank_process(step));  // 8 tasks on 2 nodes: one per rank
  auto per_node = step;
  per_node["SLURM_NTASKS"] = "2";
  DOCTEST_CHECK(!is_rank_process(per_node));  // 2 tasks on 2 nodes: one launcher per node
  auto batch = step;
  batch.erase("SLURM_STEP_ID");
  DOCTEST_CHECK(!is_rank_process(batch));  // the batch script itself (no srun step)
}

TEST_CASE("node launch: mmoc-run's --nnodes options and Slurm with one task per node") {
  LauncherRequest r;
  NodeLaunch one = resolve_node_launch(r, 4, {});
  DOCTEST_CHECK(one.nnodes == 1);
  DOCTEST_CHECK(one.nproc_per_node == 4);
  DOCTEST_CHECK(one.master_port == 0);
  DOCTEST_CHECK(one.first_rank() == 0);
  r.nnodes = 2;
  r.node_rank = 1;
  r.master_addr = "10.1.2.3";
  NodeLaunch two = resolve_node_launch(r, 4, {});
  DOCTEST_CHECK(two.nproc_per_node == 2);
  DOCTEST_CHECK(two.first_rank() == 2);  // contiguous blocks: node 1 runs ranks 2-3
  DOCTEST_CHECK(two.world_size() == 4);
  DOCTEST_CHECK(two.master_port == 29500);
  DOCTEST_CHECK(two.from == "command line");
  DOCTEST_CHECK(resolve_node_launch(r, 4, {{"MASTER_PORT", "31111"}}).master_port == 31111);
  r.rdzv_timeout_s = 12;
  DOCTEST_CHECK(resolve_node_launch(r, 4, {{"MMOC_FAIL_TIMEOUT", "9"}}).rdzv_timeout_s == 12);
  DOCTEST_CHECK(resolve_node_launch(r, 4, {{"MMOC_FAIL_TIMEOUT", "9"}}).fail_timeout_s == 9);
  auto err = [](LauncherRequest q, int ranks, std::map<std::string, std::string> env = {}) -> std::string {
    try {
      resolve_node_launch(q, ranks, env);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "<no error>";
  };
  DOCTEST_CHECK(err(r, 3).find("ranks do not split evenly over 2 nodes") != std::string::npos);
  auto q = r;
  q.nproc_per_node = 3;
  DOCTEST_CHECK(err(q, 4).find("2 node(s) x --nproc-per-node 3 = 6 ranks, but the plan has 4") != std::string::npos);
  q = r;
  q.node_rank = 2;
  DOCTEST_CHECK(err(q, 4).find("--node-rank 2 is outside [0, 2)") != std::string::npos);
  q = r;
  q.master_addr.clear();
  DOCTEST_CHECK(err(q, 4).find("needs --master-addr") != std::string::npos);
  q = r;
  q.master_port = 70000;
  DOCTEST_CHECK(err(q, 4).find("--master-port 70000 is outside") != std::string::npos);
  q = LauncherRequest{};
  q.node_rank = 1;
  DOCTEST_CHECK(err(q, 4).find("--node-rank needs --nnodes") != std::string::npos);
  q = LauncherRequest{};
  q.nnodes = -1;
  DOCTEST_CHECK(err(q, 4).find("--nnodes -1") != std::string::npos);

  // srun -N2 --ntasks-per-node=1 mmoc-run plan.json: each task launches its node's share
  std::map<std::string, std::string> s{{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}, {"SLURM_NNODES", "2"}, {"SLURM_NODEID", "1"},
                                       {"SLURM_STEP_ID", "3"}, {"SLURM_STEP_NODELIST", "gpu[11-12]"}, {"SLURM_JOB_ID", "777"}};
  NodeLaunch sl = resolve_node_launch(LauncherRequest{}, 8, s);
  DOCTEST_CHECK(sl.from == "Slurm (one task per node)");
  DOCTEST_CHECK(sl.nnodes == 2);
  DOCTEST_CHECK(sl.node_rank == 1);
  DOCTEST_CHECK(sl.nproc_per_node == 4);
  DOCTEST_CHECK(sl.first_rank() == 4);
  DOCTEST_CHECK(sl.master_addr == "gpu11");
  DOCTEST_CHECK(sl.master_port == slurm_master_port(777));
}

TEST_CASE("node launch: a rank's CUDA device is its local rank; local addresses") {
  WorldInfo w;
  w.rank = 5;
  w.local_rank = 1;
  DOCTEST_CHECK(cuda_device_for(w, 4) == 1);
  DOCTEST_CHECK(cuda_device_for(w, 1) == 0);  // one GPU bound per rank (CUDA_VISIBLE_DEVICES)
  w.local_rank = 4;
  DOCTEST_CHECK_THROWS_WITH_AS(cuda_device_for(w, 4), doctest::Contains("local rank 4 (rank 5) has no GPU: 4 visible"), ConfigError);
  DOCTEST_CHECK(local_address_towards("127.0.0.1") == "127.0.0.1");
  DOCTEST_CHECK(local_address_towards("mmoc-no-such-host.invalid").empty());
  DOCTEST_CHECK(rank_ranges({0, 2, 3, 4, 7}) == "0, 2-4, 7");
}

TEST_CASE("job failure records keep one line") {
  JobFailure f{2, 3, "rank 3 (node 1, host b): bad\tdata\nsecond line"};
  JobFailure g = decode_failure(encode_failure(f));
  DOCTEST_CHECK(g.code == 2);
  DOCTEST_CHECK(g.rank == 3);
  DOCTEST_CHECK(g.message == "rank 3 (node 1, host b): bad data");
}

TEST_CASE("rendezvous: ranks that never join are named with their node") {
  WorldInfo w;
  w.rank = 0;
  w.world_size = 4;
  w.nnodes = 2;
  w.ranks_per_node = {2, 2};
  w.node_hosts = {"alpha", "beta"};
  w.master_addr = "127.0.0.1";
  w.master_port = pick_free_port();
  auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    Rendezvous::connect(w, std::chrono::milliseconds(1200));
  } catch (const CommError& e) {
    msg = e.what();
  }
  INFO(msg);
  DOCTEST_CHECK(msg.find("rendezvous timed out after 1.2 s: 1 of 4 ranks joined") != std::string::npos);
  DOCTEST_CHECK(msg.find("rank 1 (node 0, host alpha), ranks 2-3 (node 1, host beta) did not") != std::string::npos);
  DOCTEST_CHECK(seconds_since(t0) < 10);
}

// ----------------------------------------------------------------------------------------------------------
// Two "nodes" on this machine: node 0 in this process (launch_node), node 1 a child in --launch-node mode.

TEST_CASE("nodes: two launch_node nodes form one job (placement, rendezvous, ring, end barrier)") {
  if (!gloo_available()) return;
  const int port = pick_free_port();
  const std::string err = tmp_path("n1.err");
  pid_t n1 = spawn_node(2, 1, 2, "127.0.0.1", port, 30, 10, "node-exchange", err);
  LaunchReport rep;
  int rc0 = run_node(2, 0, 2, "127.0.0.1", port, 30, 10, "node-exchange", &rep);
  int rc1 = wait_pid(n1, 60);
  INFO(rep.message, " | node 1: ", slurp(err));
  DOCTEST_CHECK(rc0 == 0);
  DOCTEST_CHECK(rc1 == 0);
  ::unlink(err.c_str());
}

TEST_CASE("nodes: a worker killed on node 1 ends both nodes at once, naming rank and node") {
  if (!gloo_available()) return;
  const int port = pick_free_port();
  const std::string err = tmp_path("kill.err");
  auto t0 = std::chrono::steady_clock::now();
  pid_t n1 = spawn_node(2, 1, 2, "127.0.0.1", port, 30, 20, "kill-last", err);
  LaunchReport rep;
  int rc0 = run_node(2, 0, 2, "127.0.0.1", port, 30, 20, "kill-last", &rep);
  int rc1 = wait_pid(n1, 60);
  const double dt = seconds_since(t0);
  const std::string e1 = slurp(err);
  INFO(rep.message, " | node 1: ", e1);
  DOCTEST_CHECK(rc0 == 1);
  DOCTEST_CHECK(rc1 == 1);
  // node 0 learns it from node 1's launcher through the store, well before the 20 s fail timeout
  DOCTEST_CHECK(rep.message.find("node 0: the job failed: rank 3 (node 1, host ") != std::string::npos);
  DOCTEST_CHECK(rep.message.find("was killed by signal 9") != std::string::npos);
  DOCTEST_CHECK(e1.find("test_comm: node 1: the job failed: rank 3 (node 1, host ") != std::string::npos);
  DOCTEST_CHECK(count_lines(e1) == 1);  // the workers that stopped because of it say nothing under the launcher
  DOCTEST_CHECK(dt < 15);
  ::unlink(err.c_str());
}

TEST_CASE("nodes: a stopped (hung) worker is found by its heartbeat within the fail timeout") {
  if (!gloo_available()) return;
  const int port = pick_free_port();
  const std::string err = tmp_path("stop.err");
  auto t0 = std::chrono::steady_clock::now();
  pid_t n1 = spawn_node(2, 1, 2, "127.0.0.1", port, 30, 2, "stop-last", err);
  LaunchReport rep;
  int rc0 = run_node(2, 0, 2, "127.0.0.1", port, 30, 2, "stop-last", &rep);
  int rc1 = wait_pid(n1, 60);
  const double dt = seconds_since(t0);
  const std::string e1 = slurp(err);
  INFO(rep.message, " | node 1: ", e1);
  DOCTEST_CHECK(rc0 == 1);
  DOCTEST_CHECK(rc1 == 1);
  DOCTEST_CHECK(rep.message.find("the job failed: rank 3 (node 1, host ") != std::string::npos);
  DOCTEST_CHECK(rep.message.find("no heartbeat for") != std::string::npos);
  DOCTEST_CHECK(e1.find("no heartbeat for") != std::string::npos);
  DOCTEST_CHECK(dt < 20);  // 2 s of silence + a few intervals + the launchers' kill grace
  ::unlink(err.c_str());
}

TEST_CASE("nodes: a rank's own error ends every node with its message (first line only)") {
  if (!gloo_available()) return;
  const int port = pick_free_port();
  const std::string err = tmp_path("err1.err");
  pid_t n1 = spawn_node(2, 1, 2, "127.0.0.1", port, 30, 20, "error-1", err);
  LaunchReport rep;
  int rc0 = run_node(2, 0, 2, "127.0.0.1", port, 30, 20, "error-1", &rep);
  int rc1 = wait_pid(n1, 60);
  const std::string e1 = slurp(err);
  INFO(rep.message, " | node 1: ", e1);
  DOCTEST_CHECK(rc0 == 3);  // the failing worker's exit code
  DOCTEST_CHECK(rc1 == 3);
  DOCTEST_CHECK(rep.message.find("node 0: the job failed: rank 1 (node 0, host ") != std::string::npos);
  DOCTEST_CHECK(rep.message.find("deliberate failure of rank 1") != std::string::npos);
  DOCTEST_CHECK(rep.message.find("second line") == std::string::npos);
  DOCTEST_CHECK(e1.find("node 1: the job failed: rank 1 (node 0, host ") != std::string::npos);
  ::unlink(err.c_str());
}

TEST_CASE("nodes: node 1 never starts: node 0 ends after the rendezvous timeout naming ranks 2-3 (node 1)") {
  if (!gloo_available()) return;
  auto t0 = std::chrono::steady_clock::now();
  LaunchReport rep;
  int rc0 = run_node(2, 0, 2, "127.0.0.1", pick_free_port(), 2, 10, "node-exchange", &rep);
  INFO(rep.message);
  DOCTEST_CHECK(rc0 == 3);
  DOCTEST_CHECK(rep.message.find("rendezvous timed out after 2 s: 2 of 4 ranks joined") != std::string::npos);
  DOCTEST_CHECK(rep.message.find("ranks 2-3 (node 1) did not") != std::string::npos);
  DOCTEST_CHECK(seconds_since(t0) < 12);
}

TEST_CASE("nodes: a wrong master address ends the node after the rendezvous timeout") {
  if (!gloo_available()) return;
  auto t0 = std::chrono::steady_clock::now();
  const std::string dir = tmp_path("badaddr");
  ::mkdir(dir.c_str(), 0755);
  ::setenv("MMOC_TEST_ERR_DIR", dir.c_str(), 1);
  LaunchReport rep;
  int rc1 = run_node(2, 1, 2, "mmoc-no-such-host.invalid", 29500, 2, 10, "node-exchange", &rep);
  ::unsetenv("MMOC_TEST_ERR_DIR");
  const std::string e2 = slurp(dir + "/2.err") + slurp(dir + "/3.err");
  INFO(rep.message, " | workers: ", e2);
  DOCTEST_CHECK(rc1 != 0);
  DOCTEST_CHECK(rep.message.find("node 1: ") == 0);
  DOCTEST_CHECK(rep.message.find("the job's store at mmoc-no-such-host.invalid:29500 is unreachable") != std::string::npos);
  DOCTEST_CHECK(e2.find("cannot reach the job's store at mmoc-no-such-host.invalid:29500 within 2 s") != std::string::npos);
  DOCTEST_CHECK(seconds_since(t0) < 15);
  for (const char* f : {"/2.err", "/3.err"}) ::unlink((dir + f).c_str());
  ::rmdir(dir.c_str());
}

TEST_CASE("nodes: without mmoc-run's launcher (rank 0 hosts the store, as under srun) a killed rank is named by its peers") {
  if (!gloo_available()) return;
  // plain variables, like srun with one task per rank or torchrun on another node: no mmoc launcher reports the
  // death to the other "node"; its ranks see the process gone (same host) or its heartbeat stop, each prints one line
  const std::string dir = tmp_path("plain");
  ::mkdir(dir.c_str(), 0755);
  const int port = pick_free_port();
  std::vector<std::pair<std::string, std::string>> env{{"MMOC_TEST_ERR_DIR", dir}, {"MMOC_FAIL_TIMEOUT", "20"}, {"MMOC_RDZV_TIMEOUT", "30"},
                                                       {"MASTER_PORT", std::to_string(port)}};
  auto t0 = std::chrono::steady_clock::now();
  pid_t other = ::fork();  // "node 1": rank 2 alone, which kills itself
  if (other == 0) {
    LaunchOptions o;
    o.first_rank = 2;
    o.world_size = 3;
    o.print_failure = false;
    ::_exit(launch_local_workers(1, {g_argv0, "--worker", "kill-last"}, env, nullptr, o) == 128 + SIGKILL ? 0 : 1);
  }
  LaunchReport rep;
  LaunchOptions opts;
  opts.world_size = 3;
  opts.print_failure = false;
  int rc = launch_local_workers(2, {g_argv0, "--worker", "kill-last"}, env, &rep, opts);
  int rc_other = wait_pid(other, 60);
  const double dt = seconds_since(t0);
  for (int r = 0; r < 2; ++r) {
    std::string e = slurp(dir + "/" + std::to_string(r) + ".err");
    INFO("rank ", r, ": ", e);
    // the gloo receive failed at once; within the grace the monitor found rank 2's process gone: named, one line
    DOCTEST_CHECK(e.find("stopped: the job failed: rank 2 (pid ") != std::string::npos);
    DOCTEST_CHECK(e.find("ended without reporting an error (killed, or crashed)") != std::string::npos);
    DOCTEST_CHECK(count_lines(e) == 1);
  }
  for (int r = 0; r < 3; ++r) ::unlink((dir + "/" + std::to_string(r) + ".err").c_str());
  ::rmdir(dir.c_str());
  INFO(rep.message);
  DOCTEST_CHECK(rc == kExitJobFailed);
  DOCTEST_CHECK(rc_other == 0);
  DOCTEST_CHECK(dt < 15);
}

int main(int argc, char** argv) {
  if (argc >= 1) g_argv0 = argv[0];
  if (argc == 10 && std::strcmp(argv[1], "--launch-node") == 0) {
    LaunchReport rep;
    try {
      return run_node(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), argv[5], std::atoi(argv[6]), std::atof(argv[7]),
                      std::atof(argv[8]), argv[9], &rep);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "test_comm --launch-node: %s\n", e.what());
      return 1;
    }
  }
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--worker") == 0) return run_worker(argv[i + 1]);
  doctest::Context ctx(argc, argv);
  return ctx.run();
}

TEST_CASE("node launch: on one node a rank's CUDA device follows the plan's mapping (cross-map)") {
  // pp 2 x tp 2 on a machine whose fast pairs are {0,2} and {1,3}: order=0,2,1,3 (ir::physical_gpu of each rank)
  const std::vector<int> order{0, 2, 1, 3};
  std::vector<int> got;
  for (int r = 0; r < 4; ++r) {
    std::map<std::string, std::string> env{{"RANK", std::to_string(r)}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", std::to_string(r)},
                                           {"LOCAL_WORLD_SIZE", "4"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}};
    WorldInfo w = world_from_env(env);
    got.push_back(cuda_device_for(w, 4, order));
  }
  DOCTEST_CHECK(got == order);
  WorldInfo w;
  w.rank = 1;
  w.local_rank = 1;
  DOCTEST_CHECK(cuda_device_for(w, 4, {}) == 1);            // no mapping: the local rank
  DOCTEST_CHECK(cuda_device_for(w, 1, order) == 0);         // one GPU bound per rank: that one
  DOCTEST_CHECK(cuda_device_for(w, 4, {3, 2, 1, 0}) == 2);
  DOCTEST_CHECK_THROWS_WITH_AS(cuda_device_for(w, 2, order), doctest::Contains("rank 1 runs on GPU 2 per the plan's mapping (order=), but 2 GPU(s) are visible"),
                               ConfigError);
  w.nnodes = 2;  // across nodes the plan's GPU ids are not this node's: the local rank
  DOCTEST_CHECK(cuda_device_for(w, 4, order) == 1);
}
