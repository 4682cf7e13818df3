// mmoc::comm — who am I in the job, where do the ranks run, and how to start a node's share of them. Torch-free.
//
// world_from_env(): reads torchrun, mmoc-run-launcher or Slurm variables (see world_from_env below).
// expand_hostlist() / expand_tasks_per_node(): Slurm's compressed forms ("node[01-03,07]", "2(x3),1").
// resolve_node_launch(): mmoc-run's own multi-node launcher options (--nnodes, --node-rank, ...) -> NodeLaunch.
// launch_local_workers(): the parent side of one node: starts that node's workers (fork + exec of the running
//   executable) with those variables set, forwards SIGINT/SIGTERM, waits, and stops the others as soon as one fails.
//
// Placement (every launcher): global ranks run in contiguous blocks per node, like torchrun: node n of N with K
// ranks per node runs ranks [n*K, (n+1)*K), and its local rank i (= global rank - n*K) uses CUDA device i.
#pragma once

#include <functional>
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

// A user's configuration error (bad launcher options or variables): mmoc-run exits with code 2.
struct ConfigError : CommError {
  using CommError::CommError;
};

struct WorldInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;  // ranks on this node
  int node_rank = 0;         // this node's index in [0, nnodes)
  int nnodes = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;
  // true: the job's store at MASTER_ADDR:MASTER_PORT is hosted by a launcher (mmoc-run's node 0, torchrun's agent)
  // and every rank joins it as a client; false: rank 0 hosts it (plain environment variables, Slurm srun).
  bool agent_store = false;
  std::string store_prefix = "mmoc";  // the job's key namespace in the store
  // Where ranks run, when the launcher says: ranks_per_node[n] ranks on node n in contiguous blocks (empty: not
  // known), node_hosts[n] the host name of node n (Slurm's node list; empty: not known).
  std::vector<int> ranks_per_node;
  std::vector<std::string> node_hosts;
  std::string launcher = "env";  // "mmoc-run", "torchrun", "slurm" or "env" (plain variables)
  double rdzv_timeout_s = 300;   // MMOC_RDZV_TIMEOUT: how long the ranks wait for each other at the start
  double fail_timeout_s = 30;    // MMOC_FAIL_TIMEOUT: how long a silent rank or a lost store is tolerated

  // The node that runs `rank` per the placement (-1: unknown) and "rank 3 (node 1, host gpu02)" from it.
  int expected_node(int rank) const;
  std::string describe_expected(int rank) const;
};

// Reads the process environment. Throws ConfigError naming the variable for a missing or invalid value
// (not an integer, rank outside [0, WORLD_SIZE), port outside [1, 65535], a malformed Slurm node list, ...).
//   rank        RANK, else SLURM_PROCID
//   world size  WORLD_SIZE, else SLURM_NTASKS (SLURM_NPROCS)
//   local rank  LOCAL_RANK, else SLURM_LOCALID, else RANK modulo the local world size (RANK on one node)
//   local size  LOCAL_WORLD_SIZE, else this node's entry of SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE
//   node        GROUP_RANK (torchrun, mmoc-run), else SLURM_NODEID; nodes: GROUP_WORLD_SIZE, else
//               SLURM_STEP_NUM_NODES / SLURM_NNODES / SLURM_JOB_NUM_NODES
//   master      MASTER_ADDR, else the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / SLURM_NODELIST
//   port        MASTER_PORT, else slurm_master_port(SLURM_JOB_ID)
//   store       TORCHELASTIC_USE_AGENT_STORE=True (torchrun) or MMOC_LAUNCHER=1 (mmoc-run): the launcher hosts it
//   timeouts    MMOC_RDZV_TIMEOUT, MMOC_FAIL_TIMEOUT (seconds)
WorldInfo world_from_env();
// Same, from an explicit variable map (what the process environment would hold); for tests and tools.
WorldInfo world_from_env(const std::map<std::string, std::string>& env);
// The process environment as a map (only the variables world_from_env and resolve_node_launch read).
std::map<std::string, std::string> comm_env();

// Is this process one rank of a job (true) or a launcher that starts ranks (false)? True when RANK is set
// (torchrun, mmoc-run's launcher) or inside a Slurm step (SLURM_STEP_ID set) with more tasks than nodes (srun
// with one task per rank). A Slurm step with one task per node runs one mmoc-run launcher per node.
bool is_rank_process(const std::map<std::string, std::string>& env);

// Slurm's compressed host lists: "node[01-03,07],gpu5,rack[1-2]-n[1-2]" -> node01 node02 node03 node07 gpu5
// rack1-n1 rack1-n2 rack2-n1 rack2-n2. A range keeps the zero padding of its lower bound (width of "01" = 2);
// several bracket groups in one name expand as a product. Throws ConfigError on malformed input (unbalanced
// or nested brackets, an empty name or range, lo > hi, non-digits, more than 1,000,000 names).
std::vector<std::string> expand_hostlist(const std::string& list);
// SLURM_TASKS_PER_NODE's form: "2(x3),1" -> {2, 2, 2, 1}. Throws ConfigError on malformed input.
std::vector<int> expand_tasks_per_node(const std::string& spec);
// The rendezvous port under Slurm without MASTER_PORT: 20000 + SLURM_JOB_ID mod 40000 (the same on every task).
int slurm_master_port(long long job_id);

// The CUDA device of a rank: its local rank; with exactly one visible device (a launcher that binds one GPU per
// rank through CUDA_VISIBLE_DEVICES, e.g. srun --gpus-per-task=1) that device. Throws ConfigError when the local
// rank has no device of its own (visible devices > 1 but <= local rank).
int cuda_device_for(const WorldInfo& w, int visible_devices);
// The same following a plan's mapping (ir::physical_gpu of every world rank: the cross-map pass's choice, so that
// tensor-parallel groups sit on the best-connected GPUs): on one node with more than one visible device, rank r runs
// on plan_gpus[r] (a ConfigError when that device is not visible); with one visible device, on it; across nodes, or
// with no mapping (empty), as above.
int cuda_device_for(const WorldInfo& w, int visible_devices, const std::vector<int>& plan_gpus);

// mmoc-run's own launcher: the options as given (0 / -1 / "" = not given) ...
struct LauncherRequest {
  int nnodes = 0;
  int node_rank = -1;
  int nproc_per_node = 0;
  std::string master_addr;
  int master_port = 0;
  double rdzv_timeout_s = 0;
  double fail_timeout_s = 0;
};
// ... and what this node runs.
struct NodeLaunch {
  int nnodes = 1;
  int node_rank = 0;
  int nproc_per_node = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;  // 0: node 0 lets the system pick a free port (single node only)
  double rdzv_timeout_s = 300;
  double fail_timeout_s = 30;
  std::string from = "single node";  // "single node", "command line" or "Slurm (one task per node)"
  int world_size() const { return nnodes * nproc_per_node; }
  int first_rank() const { return node_rank * nproc_per_node; }
};
// Options first, then MASTER_ADDR / MASTER_PORT / MMOC_RDZV_TIMEOUT / MMOC_FAIL_TIMEOUT, then, inside a Slurm step
// with one task per node, SLURM_NNODES / SLURM_NODEID / the node list / SLURM_JOB_ID. Without --nnodes (and outside
// such a step) one node runs all `total_ranks`. nproc_per_node defaults to total_ranks / nnodes. Throws
// ConfigError naming the option: nnodes * nproc_per_node != total_ranks, node rank outside [0, nnodes), no master
// address for several nodes, a port outside [1, 65535], a timeout <= 0, --node-rank without --nnodes, ...
NodeLaunch resolve_node_launch(const LauncherRequest& req, int total_ranks,
                               const std::map<std::string, std::string>& env);

// "2-4, 7" for {2, 3, 4, 7} (sorted input).
std::string rank_ranges(const std::vector<int>& ranks);

// The local address this host uses to reach `host` (a UDP socket connected to it, no packet sent): the interface
// for gloo's sockets across nodes. Empty when `host` does not resolve or has no route.
std::string local_address_towards(const std::string& host);

// What happened to a local job (filled by launch_local_workers when asked).
struct LaunchReport {
  int failed_rank = -1;   // global rank of the first worker that failed, -1 when all exited 0
  int failed_pid = 0;
  int exit_code = 0;      // its exit code (when it exited)
  int signal = 0;         // the signal that killed it (when it was killed), else 0
  int forwarded_signal = 0;  // SIGINT/SIGTERM the parent received and forwarded, else 0
  std::string how;        // "exited with code 3", "was killed by signal 9 (Killed)"
  std::string message;    // human-readable summary, e.g. "worker rank 1 (pid 123) exited with code 3"
};

struct LaunchOptions {
  // After a failure (or a forwarded signal), the others get SIGTERM, then SIGKILL after this grace.
  int kill_grace_ms = 2000;
  // Print the failure summary to stderr (prefixed by print_prefix).
  bool print_failure = true;
  std::string print_prefix = "mmoc: ";
  // This node's share of a larger job: local worker i is global rank first_rank + i of world_size (0: n) ranks,
  // on node node_rank of nnodes (GROUP_RANK / GROUP_WORLD_SIZE for the workers).
  int first_rank = 0;
  int world_size = 0;
  int node_rank = 0;
  int nnodes = 1;
  // Called once, at the first failure (a worker that exited non-zero or was killed: before the others are stopped;
  // a forwarded SIGINT/SIGTERM: after forwarding it). A non-empty result replaces report.message's summary.
  std::function<std::string(const LaunchReport&)> on_failure;
};

// Starts n workers: fork + exec of /proc/self/exe with `argv` (argv[0] is what the workers see as their
// name; the binary is always /proc/self/exe), environment = this process's environment + extra_env +
// RANK (= first_rank + i), WORLD_SIZE, LOCAL_RANK (= i), LOCAL_WORLD_SIZE (= n), GROUP_RANK, GROUP_WORLD_SIZE,
// MASTER_ADDR=127.0.0.1, MASTER_PORT=<a free port picked by the parent> (extra_env may override
// MASTER_ADDR/MASTER_PORT), and NCCL_NVLS_ENABLE=0 unless already set. Each worker gets
// PR_SET_PDEATHSIG=SIGKILL, so workers die with the parent.
// Returns 0 when every worker exited 0. Otherwise the failing rank's exit code, or 128+signal when it was
// killed by a signal (or 128+SIGINT/SIGTERM after forwarding one), and the summary (which rank, how) goes to
// stderr and to `report`. Throws CommError when n < 1 or a worker cannot be started.
int launch_local_workers(int n, const std::vector<std::string>& argv,
                         const std::vector<std::pair<std::string, std::string>>& extra_env = {},
                         LaunchReport* report = nullptr, const LaunchOptions& options = {});

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back, close).
int pick_free_port();

}  // namespace mmoc::comm
