// Multi-node equivalence: a job spread over two "nodes" on this machine trains the tiny LLaMA to the same losses and
// final weights as the plain single-process loop (tests/engine/reference.*), fp32 on the CPU (gloo), whichever way
// it is launched: mmoc-run's own launcher (--nnodes 2 --node-rank 0/1), torchrun-style variables (one process per
// rank), Slurm-style variables (srun with one task per rank, and with one task per node), and the real torchrun
// of the venv when there is one. The failure cases (a killed worker, a missing node, a wrong address) are in
// multinode_fail_test.py and tests/comm.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "compiler/pipeline.hpp"
#include "engine/comm/world.hpp"
#include "engine/io/fsutil.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "tests/engine/reference.hpp"
#include "tests/torch_doctest.hpp"

extern char** environ;

using namespace mmoc;

namespace {
const std::string kConfigs = MMOC_CONFIGS_DIR;
const std::string kRun = MMOC_RUN_BIN;
const std::string kData = MMOC_SOURCE_DIR "/data/sample/tiny_tokens.jsonl";
const std::string kPython = MMOC_PYTHON;  // "" when there is none

std::string scratch(const std::string& name) {
  const char* t = std::getenv("TMPDIR");
  std::string p = std::string(t ? t : "/tmp") + "/mmoc-mn-" + std::to_string(::getpid()) + "/" + name;
  io::remove_tree(p);
  io::make_dirs(p);
  return p;
}

ir::Plan make_plan(int gpus, int v, const std::string& sched, const std::string& offload) {
  JobConfig j;
  j.model = "tiny-8l";
  j.hardware = "cpu8";
  j.gpus = gpus;
  j.v = std::to_string(v);
  j.micro_batch_size = 2;
  j.microbatches = 4;
  j.seq_len = 32;
  j.schedule = sched;
  j.offload = offload;
  j.recompute = "auto";
  j.budget_gib = 1;
  j.train.precision = "fp32";
  j.train.lr = 1e-3;
  j.train.weight_decay = 0.01;
  j.train.max_grad_norm = 0.05;  // clipping by the global norm: a collective across the nodes
  j.train.lr_schedule = "constant";
  j.train.total_steps = 4;
  ModelSpec m = load_model(j.model, kConfigs);
  HardwareSpec hw = load_hardware(j.hardware, kConfigs);
  return compile_job(j, m, hw, {}).plan;
}

// A child process: `args` with this environment minus every launcher variable, plus `env`; output into `log`.
pid_t spawn(const std::vector<std::string>& args, const std::map<std::string, std::string>& env, const std::string& log) {
  std::vector<std::string> e;
  for (char** p = environ; p && *p; ++p) {
    std::string kv(*p);
    std::string k = kv.substr(0, kv.find('='));
    static const char* drop[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                                 "MASTER_ADDR", "MASTER_PORT", "MMOC_DEVICE", "MMOC_LAUNCHER"};
    bool skip = k.rfind("SLURM_", 0) == 0 || k.rfind("TORCHELASTIC_", 0) == 0;
    for (const char* d : drop) skip |= k == d;
    if (!skip && !env.count(k)) e.push_back(kv);
  }
  for (const auto& [k, v] : env) e.push_back(k + "=" + v);
  pid_t pid = ::fork();
  if (pid == 0) {
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::vector<char*> argv, envp;
    for (auto& a : const_cast<std::vector<std::string>&>(args)) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& x : e) envp.push_back(x.data());
    envp.push_back(nullptr);
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  return pid;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Waits for all; after `limit_s` the rest are killed (a hang fails the test instead of blocking it). Exit codes.
std::vector<int> wait_all(const std::vector<pid_t>& pids, double limit_s) {
  std::vector<int> rc(pids.size(), -1000);
  std::vector<bool> done(pids.size(), false);
  auto t0 = std::chrono::steady_clock::now();
  size_t left = pids.size();
  while (left > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int st = 0;
      if (::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        rc[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        done[i] = true;
        --left;
      }
    }
    if (left > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > limit_s) {
      for (size_t i = 0; i < pids.size(); ++i)
        if (!done[i]) {
          ::kill(pids[i], SIGKILL);
          int st = 0;
          ::waitpid(pids[i], &st, 0);
          done[i] = true;
        }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return rc;
}

std::vector<double> read_losses(const std::string& metrics) {
  std::ifstream f(metrics);
  std::vector<double> l;
  std::string line;
  while (std::getline(f, line)) l.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return l;
}

double rel_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(1e-12, b.abs().max().item<double>());
}

struct Job {
  ir::Plan plan;
  std::string dir, plan_path;
  int steps = 3;
  uint64_t seed = 7;
  std::vector<std::string> args() const {  // the training command after the program
    return {plan_path, "--data", kData, "--steps", std::to_string(steps), "--device", "cpu", "--seed", std::to_string(seed), "-q",
            "--optim-threads", "1", "--metrics", dir + "/m.jsonl", "--save", dir + "/ckpt", "--rdzv-timeout", "120",
            "--fail-timeout", "60"};
  }
};

Job make_job(const ir::Plan& p, const std::string& label) {
  Job j{p, scratch(label), "", 3, 7};
  j.plan_path = j.dir + "/plan.json";
  ir::save_file_atomic(j.plan_path, ir::to_json_string(p));
  return j;
}

// Runs the processes of one job, then checks losses and weights against the plain loop.
void run_and_check(const Job& j, const std::string& label, const std::vector<std::pair<std::vector<std::string>, std::map<std::string, std::string>>>& procs) {
  std::vector<pid_t> pids;
  for (size_t i = 0; i < procs.size(); ++i) pids.push_back(spawn(procs[i].first, procs[i].second, j.dir + "/p" + std::to_string(i) + ".log"));
  auto t0 = std::chrono::steady_clock::now();
  std::vector<int> rc = wait_all(pids, 300);
  MESSAGE(label << ": " << procs.size() << " processes, "
                << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s");
  bool ok = true;
  for (size_t i = 0; i < rc.size(); ++i) {
    if (rc[i] != 0) MESSAGE(label << ": process " << i << " exit " << rc[i] << "\n" << slurp(j.dir + "/p" + std::to_string(i) + ".log"));
    ok &= rc[i] == 0;
  }
  REQUIRE_MESSAGE(ok, label);
  auto losses = read_losses(j.dir + "/m.jsonl");
  auto ref = test::reference_train(j.plan, kData, j.steps, j.seed);
  REQUIRE(losses.size() == ref.losses.size());
  for (size_t i = 0; i < losses.size(); ++i)
    CHECK_MESSAGE(std::abs(losses[i] - ref.losses[i]) <= 1e-5 * std::abs(ref.losses[i]),
                  label << " step " << i << ": " << losses[i] << " vs " << ref.losses[i]);
  engine::StageLayout full = engine::full_layout(j.plan.model);
  at::Tensor w = engine::load_hf_weights(j.dir + "/ckpt", j.plan.model, {full})[0];
  double d = rel_diff(w, ref.weights);
  CHECK_MESSAGE(d <= 1e-5, label << ": final weights differ by " << d << " (relative)");
  at::Tensor init = engine::new_flat(full, at::TensorOptions().dtype(at::kFloat));
  engine::init_weights(j.plan.model, full, init, j.seed);
  CHECK(rel_diff(ref.weights, init) > 1e-4);  // training moved the weights: the comparison is not vacuous
  io::remove_tree(j.dir);
}

std::vector<std::string> cmd(const std::string& prog, std::vector<std::string> args, const std::vector<std::string>& extra = {}) {
  args.insert(args.begin(), prog);
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// A free port in [20000, 60000): Slurm's derived port 20000 + job id mod 40000 can then hit it.
int free_slurm_port() {
  for (;;) {
    int p = comm::pick_free_port();
    if (p >= 20000 && p < 60000) return p;
  }
}
}  // namespace

TEST_CASE("two nodes with mmoc-run's launcher (--nnodes 2 --node-rank 0/1) train like the plain loop") {
  struct Case {
    int gpus, v;
    const char* sched;
    const char* offload;
  };
  for (Case c : {Case{4, 2, "grouped", "all"}, Case{2, 1, "1f1b", "none"}}) {
    std::string label = "launcher-N" + std::to_string(c.gpus) + "-v" + std::to_string(c.v) + "-" + c.sched + "-offload-" + c.offload;
    CAPTURE(label);
    Job j = make_job(make_plan(c.gpus, c.v, c.sched, c.offload), label);
    const std::string port = std::to_string(comm::pick_free_port());
    std::vector<std::pair<std::vector<std::string>, std::map<std::string, std::string>>> procs;
    for (int node : {1, 0})  // node 1 first: it waits for node 0's rendezvous
      procs.push_back({cmd(kRun, j.args(), {"--nnodes", "2", "--node-rank", std::to_string(node), "--master-addr", "127.0.0.1",
                                            "--master-port", port}),
                       {}});
    run_and_check(j, label, procs);
  }
}

TEST_CASE("torchrun-style variables: one process per rank over two nodes") {
  Job j = make_job(make_plan(4, 2, "grouped", "all"), "torchrun-env");
  const std::string port = std::to_string(comm::pick_free_port());
  std::vector<std::pair<std::vector<std::string>, std::map<std::string, std::string>>> procs;
  for (int r = 3; r >= 0; --r)  // what torchrun --nnodes 2 --nproc_per_node 2 sets (without its agent's store)
    procs.push_back({cmd(kRun, j.args()),
                     {{"RANK", std::to_string(r)}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", std::to_string(r % 2)}, {"LOCAL_WORLD_SIZE", "2"},
                      {"GROUP_RANK", std::to_string(r / 2)}, {"GROUP_WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", port},
                      {"TORCHELASTIC_RUN_ID", "mmoc-test"}, {"TORCHELASTIC_RESTART_COUNT", "0"}}});
  run_and_check(j, "torchrun-env", procs);
}

TEST_CASE("Slurm-style variables: srun with one task per rank, and with one task per node") {
  {
    Job j = make_job(make_plan(4, 2, "grouped", "none"), "slurm-per-rank");
    const int port = free_slurm_port();
    std::vector<std::pair<std::vector<std::string>, std::map<std::string, std::string>>> procs;
    for (int r = 3; r >= 0; --r)  // srun -N2 -n4: the master is the first host of the node list, the port from the job id
      procs.push_back({cmd(kRun, j.args()),
                       {{"SLURM_PROCID", std::to_string(r)}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", std::to_string(r % 2)},
                        {"SLURM_NODEID", std::to_string(r / 2)}, {"SLURM_NNODES", "2"}, {"SLURM_STEP_ID", "0"},
                        {"SLURM_STEP_NODELIST", "127.0.0.[1-2]"}, {"SLURM_JOB_NODELIST", "127.0.0.[1-2]"},
                        {"SLURM_STEP_TASKS_PER_NODE", "2(x2)"}, {"SLURM_JOB_ID", std::to_string(port - 20000)}}});
    run_and_check(j, "slurm-per-rank", procs);
  }
  {
    Job j = make_job(make_plan(4, 1, "1f1b", "all"), "slurm-per-node");
    const int port = free_slurm_port();
    std::vector<std::pair<std::vector<std::string>, std::map<std::string, std::string>>> procs;
    for (int node : {1, 0})  // srun -N2 --ntasks-per-node=1: each task is its node's launcher
      procs.push_back({cmd(kRun, j.args()),
                       {{"SLURM_PROCID", std::to_string(node)}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"},
                        {"SLURM_NODEID", std::to_string(node)}, {"SLURM_NNODES", "2"}, {"SLURM_STEP_ID", "0"},
                        {"SLURM_STEP_NODELIST", "127.0.0.[1-2]"}, {"SLURM_JOB_ID", std::to_string(port + 40000 - 20000)}}});
    run_and_check(j, "slurm-per-node", procs);
  }
}

TEST_CASE("the venv's torchrun --nnodes 2 --node_rank 0/1 runs mmoc-run as its workers") {
  if (kPython.empty() || ::access(kPython.c_str(), X_OK) != 0 ||
      std::system((kPython + " -c 'import torch.distributed.run' > /dev/null 2>&1").c_str()) != 0) {
    MESSAGE("skipped: no Python with torch.distributed.run (torchrun)");
    return;
  }
  Job j = make_job(make_plan(4, 2, "grouped", "all"), "torchrun");
  const std::string port = std::to_string(comm::pick_free_port());
  std::vector<std::pair<std::vector<std::string>, std::map<std::string, std::string>>> procs;
  for (int node : {1, 0}) {
    std::vector<std::string> a{kPython, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", std::to_string(node),
                               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port, "--no-python", kRun};
    auto rest = j.args();
    a.insert(a.end(), rest.begin(), rest.end());
    procs.push_back({a, {}});
  }
  run_and_check(j, "torchrun", procs);
}
