// mmoc::comm — who am I in the job, and how to start a local job. Torch-free.
//
// world_from_env(): reads the torchrun / Slurm style variables
//   RANK (fallback SLURM_PROCID), WORLD_SIZE (fallback SLURM_NTASKS),
//   LOCAL_RANK (fallback SLURM_LOCALID, else RANK), MASTER_ADDR, MASTER_PORT.
// launch_local_workers(): the parent side of a single-node job: starts n copies of the running
//   executable (/proc/self/exe) with those variables set, forwards SIGINT/SIGTERM, waits, and kills the
//   others as soon as one worker fails.
#pragma once

#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mmoc::comm {

// Every error of this library (bad environment, rendezvous timeout, transport failure).
struct CommError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct WorldInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;
};

// Reads the process environment. Throws CommError naming the variable for a missing or invalid value
// (not an integer, rank outside [0, WORLD_SIZE), port outside [1, 65535], ...).
WorldInfo world_from_env();
// Same, from an explicit variable map (what the process environment would hold); for tests and tools.
WorldInfo world_from_env(const std::map<std::string, std::string>& env);

// What happened to a local job (filled by launch_local_workers when asked).
struct LaunchReport {
  int failed_rank = -1;   // first worker that failed, -1 when all exited 0
  int exit_code = 0;      // its exit code (when it exited)
  int signal = 0;         // the signal that killed it (when it was killed), else 0
  int forwarded_signal = 0;  // SIGINT/SIGTERM the parent received and forwarded, else 0
  std::string message;    // human-readable summary, e.g. "worker rank 1 (pid 123) exited with code 3"
};

struct LaunchOptions {
  // After a failure (or a forwarded signal), the others get SIGTERM, then SIGKILL after this grace.
  int kill_grace_ms = 2000;
  // Print the failure summary to stderr (prefixed "mmoc: ").
  bool print_failure = true;
};

// Starts n workers: fork + exec of /proc/self/exe with `argv` (argv[0] is what the workers see as their
// name; the binary is always /proc/self/exe), environment = this process's environment + extra_env +
// RANK, WORLD_SIZE, LOCAL_RANK (= rank), LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT=<a free port
// picked by the parent> (extra_env may override MASTER_ADDR/MASTER_PORT), and NCCL_NVLS_ENABLE=0 unless
// already set. Each worker gets PR_SET_PDEATHSIG=SIGKILL, so workers die with the parent.
// Returns 0 when every worker exited 0. Otherwise the failing rank's exit code, or 128+signal when it was
// killed by a signal (or 128+SIGINT/SIGTERM after forwarding one), and the summary (which rank, how) goes to
// stderr and to `report`. Throws CommError when n < 1 or a worker cannot be started.
int launch_local_workers(int n, const std::vector<std::string>& argv,
                         const std::vector<std::pair<std::string, std::string>>& extra_env = {},
                         LaunchReport* report = nullptr, const LaunchOptions& options = {});

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back, close).
int pick_free_port();

}  // namespace mmoc::comm
