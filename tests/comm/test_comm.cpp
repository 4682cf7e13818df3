// engine/comm tests. The executable is its own worker: the doctest cases call launch_local_workers on
// /proc/self/exe with "--worker <scenario>", and main() runs that scenario instead of doctest.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <ATen/ATen.h>
#include <signal.h>
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

int run_worker(const std::string& scenario) {
  try {
    WorldInfo w = world_from_env();
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
  DOCTEST_CHECK(msg.find("rendezvous failed (rank 1 of 2, joining the TCPStore at 127.0.0.1:") != std::string::npos);
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
  DOCTEST_CHECK(msg.find("rendezvous failed (rank 0 of 3, hosting") != std::string::npos);
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
  DOCTEST_CHECK(rep.message.find("terminated the 3 other workers still running") != std::string::npos);
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

int main(int argc, char** argv) {
  if (argc >= 1) g_argv0 = argv[0];
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--worker") == 0) return run_worker(argv[i + 1]);
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
