// mmoc::comm — a job's failure handling across ranks and nodes, and mmoc-run's launcher for one node.
// Light header (no torch).
//
// The job's store (the rendezvous TCPStore) carries, under the job's prefix:
//   rank/<r>   "node<TAB>host<TAB>pid" of each rank (written when it joins)
//   hb/<r>     rank r's heartbeat counter, bumped every interval by its JobMonitor
//   failure    the job's FIRST failure "code<TAB>rank<TAB>message" (compareSet: later ones do not overwrite it)
//   done, exited, acks, launcher_acks   counters of the end barrier and of who has read the failure
// Any process that learns of a failure (a rank's own error, a node launcher that saw a worker die, a monitor that
// saw a rank's heartbeat stop or lost the store) publishes it; every rank's monitor polls it and ends its process,
// so no rank waits forever in a gloo/NCCL receive from a peer that is gone.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/comm/transport.hpp"
#include "engine/comm/world.hpp"

namespace mmoc::comm {

// Exit code of a rank that stops because another rank (or node) failed (mmoc-run: 2 bad input, 3 a worker's
// error, 4 a diverged step).
constexpr int kExitJobFailed = 5;

// The job's first failure: the rank it is about (-1: none, e.g. an interrupted launcher), the exit code the job
// ends with (the failing worker's: 2 bad input, ...; 1 when it was killed or unknown), and one line naming the rank
// and its node and what happened.
struct JobFailure {
  int code = 1;
  int rank = -1;
  std::string message;
};
std::string encode_failure(const JobFailure& f);
JobFailure decode_failure(const std::string& s);
// Publishes `f` unless a failure was published before; returns the job's first failure (f or the earlier one).
JobFailure post_failure(Rendezvous& r, const JobFailure& f);
// The job's failure if one was published (does not wait).
std::optional<JobFailure> job_failure(Rendezvous& r);

struct MonitorOptions {
  // A rank whose heartbeat has not moved for this long, or a store that cannot be reached for this long, ends the
  // job. 0: the world's fail_timeout_s (MMOC_FAIL_TIMEOUT, default 30 s).
  std::chrono::milliseconds fail_timeout{0};
  // Heartbeat and polling period; 0: fail_timeout / 10 within [100 ms, 1 s].
  std::chrono::milliseconds interval{0};
  std::string program = "mmoc-run";  // prefix of the printed line
  // Called instead of printing + _exit(kExitJobFailed) when the job failed elsewhere (tests); the watchdog stops.
  std::function<void(const JobFailure&)> on_job_failed;
};

// The watchdog of one rank (a thread with its own store connection): heartbeats, watches every other rank's
// heartbeat and the job's failure key. When the job failed (published by anyone, or found here: a silent rank,
// a lost store) it prints one line "<program>: worker R (node n, host h): stopped: the job failed: <why>"
// (not under mmoc-run's launcher, which prints the node's summary itself) and ends the process with
// kExitJobFailed at once, whatever the main thread is blocked in.
class JobMonitor {
 public:
  // A no-op monitor when the world has one rank.
  static std::unique_ptr<JobMonitor> start(std::shared_ptr<Rendezvous> r, const MonitorOptions& o = {});
  ~JobMonitor();  // stops the watchdog (no end barrier)
  // The normal end: a barrier over all ranks through the store (the watchdog keeps watching meanwhile), then the
  // watchdog stops. The rank hosting the store then waits until every rank passed, so none loses it early.
  void finish();

  struct Impl;

 private:
  explicit JobMonitor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A rank's fatal error: publishes it as the job's failure (after a short grace in which a failure elsewhere that
// caused this one may show up first) and ends the process (std::_Exit, no unwinding: a GPU worker's streams and
// communicators must not be waited for). Prints one line:
//   this rank's failure is the job's:  "<program>: worker R (node n, host h): error: <first line of what>", exit `code`
//   another failure came first:        "<program>: worker R (...): stopped: the job failed: <that>" (silent under
//                                       mmoc-run's launcher), exit kExitJobFailed
// Without a rendezvous (one rank, or the store was never reached) it prints the first form.
[[noreturn]] void exit_rank(const std::string& program, int code, const std::string& what);

// mmoc-run's launcher for one node of `nl`: node 0 hosts the job's store at master_addr:master_port (port 0: a
// free one), then launch_local_workers starts ranks [first_rank, first_rank + nproc_per_node) with MASTER_ADDR,
// MASTER_PORT, MMOC_LAUNCHER=1, MMOC_RDZV_TIMEOUT and MMOC_FAIL_TIMEOUT set. When a worker fails it publishes
// what happened to it ("rank 3 (node 1, host b) (pid 123) was killed by signal 9 (Killed)") unless the job
// already failed, and prints one summary line "<program>: node N: the job failed: <first failure>; stopped the
// K other workers still running on this node". Node 0 keeps the store up until the other nodes have read the
// failure (at most a few seconds) or, after success, until every rank passed the end barrier.
// `options` supplies print_failure / kill_grace_ms (its placement and hook fields are set here).
// Returns 0, or the job failure's code (the failing worker's exit code, 1 when it was killed) / the worker's code.
int launch_node(const NodeLaunch& nl, const std::vector<std::string>& argv,
                std::vector<std::pair<std::string, std::string>> extra_env = {}, LaunchReport* report = nullptr,
                const LaunchOptions& options = {}, const std::string& program = "mmoc-run");

}  // namespace mmoc::comm
