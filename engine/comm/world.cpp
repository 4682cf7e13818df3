#include "engine/comm/world.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>

extern char** environ;

namespace mmoc::comm {

namespace {

std::optional<std::string> lookup(const std::map<std::string, std::string>& env, const char* name) {
  auto it = env.find(name);
  if (it == env.end()) return std::nullopt;
  return it->second;
}

// Strict decimal integer: the whole value, no sign games, no trailing junk.
int parse_int(const std::string& name, const std::string& value) {
  int out = 0;
  const char* b = value.data();
  const char* e = b + value.size();
  auto [p, ec] = std::from_chars(b, e, out);
  if (value.empty() || ec != std::errc() || p != e)
    throw CommError("environment variable " + name + "='" + value + "' is not an integer");
  return out;
}

// First of `names` that is set: (name, value).
std::optional<std::pair<std::string, std::string>> first_of(const std::map<std::string, std::string>& env,
                                                            std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (auto v = lookup(env, n)) return std::make_pair(std::string(n), *v);
  return std::nullopt;
}

}  // namespace

WorldInfo world_from_env(const std::map<std::string, std::string>& env) {
  WorldInfo w;
  auto rank = first_of(env, {"RANK", "SLURM_PROCID"});
  if (!rank)
    throw CommError("RANK is not set (nor SLURM_PROCID): launch with torchrun, srun or launch_local_workers, "
                    "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT");
  auto size = first_of(env, {"WORLD_SIZE", "SLURM_NTASKS"});
  if (!size) throw CommError("WORLD_SIZE is not set (nor SLURM_NTASKS)");
  w.rank = parse_int(rank->first, rank->second);
  w.world_size = parse_int(size->first, size->second);
  if (w.world_size < 1)
    throw CommError(size->first + "=" + size->second + " is invalid: the world size must be >= 1");
  if (w.rank < 0 || w.rank >= w.world_size)
    throw CommError(rank->first + "=" + rank->second + " is outside [0, " + std::to_string(w.world_size) +
                    ") given " + size->first + "=" + size->second);
  if (auto local = first_of(env, {"LOCAL_RANK", "SLURM_LOCALID"})) {
    w.local_rank = parse_int(local->first, local->second);
    if (w.local_rank < 0 || w.local_rank > w.rank)
      throw CommError(local->first + "=" + local->second + " is invalid: a local rank is in [0, RANK]");
  } else {
    w.local_rank = w.rank;  // single node
  }
  auto addr = lookup(env, "MASTER_ADDR");
  auto port = lookup(env, "MASTER_PORT");
  if (w.world_size > 1 || addr || port) {
    if (!addr || addr->empty())
      throw CommError("MASTER_ADDR is not set: the address of rank 0's host is needed for the rendezvous "
                      "(under Slurm: the first host of $SLURM_JOB_NODELIST)");
    if (!port) throw CommError("MASTER_PORT is not set: a free TCP port on MASTER_ADDR is needed");
    w.master_addr = *addr;
    w.master_port = parse_int("MASTER_PORT", *port);
    if (w.master_port < 1 || w.master_port > 65535)
      throw CommError("MASTER_PORT=" + *port + " is outside [1, 65535]");
  }
  return w;
}

WorldInfo world_from_env() {
  std::map<std::string, std::string> env;
  for (const char* n : {"RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS", "LOCAL_RANK", "SLURM_LOCALID",
                        "MASTER_ADDR", "MASTER_PORT"})
    if (const char* v = std::getenv(n)) env[n] = v;
  return world_from_env(env);
}

int pick_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw CommError(std::string("pick_free_port: socket: ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    int e = errno;
    ::close(fd);
    throw CommError(std::string("pick_free_port: bind: ") + std::strerror(e));
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

// ---------------------------------------------------------------------------------------------------------
// launch_local_workers

namespace {

std::atomic<int> g_pending_signal{0};
extern "C" void on_forwardable_signal(int sig) { g_pending_signal.store(sig); }

std::string describe(int rank, pid_t pid, int status) {
  std::string s = "worker rank " + std::to_string(rank) + " (pid " + std::to_string(pid) + ")";
  if (WIFEXITED(status)) return s + " exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* name = ::strsignal(sig);
    return s + " was killed by signal " + std::to_string(sig) + " (" + (name ? name : "?") + ")";
  }
  return s + " stopped with status " + std::to_string(status);
}

void sleep_ms(int ms) {
  timespec ts{ms / 1000, (ms % 1000) * 1000000L};
  ::nanosleep(&ts, nullptr);  // a signal may cut it short: fine, the loop re-checks
}

}  // namespace

int launch_local_workers(int n, const std::vector<std::string>& argv,
                         const std::vector<std::pair<std::string, std::string>>& extra_env, LaunchReport* report,
                         const LaunchOptions& options) {
  if (n < 1) throw CommError("launch_local_workers: n=" + std::to_string(n) + " must be >= 1");
  LaunchReport local_report;
  LaunchReport& rep = report ? *report : local_report;
  rep = LaunchReport{};

  // The binary: resolve /proc/self/exe now (for messages); exec the link itself (works if the file was
  // replaced on disk since).
  char exe_buf[4096];
  ssize_t exe_len = ::readlink("/proc/self/exe", exe_buf, sizeof(exe_buf) - 1);
  std::string exe = exe_len > 0 ? std::string(exe_buf, static_cast<size_t>(exe_len)) : "/proc/self/exe";

  // Environment: this process's, then extra_env, then the per-rank variables (built fully before fork:
  // between fork and exec only async-signal-safe calls).
  std::vector<std::pair<std::string, std::string>> base;
  auto set = [&](const std::string& k, const std::string& v) {
    for (auto& kv : base)
      if (kv.first == k) {
        kv.second = v;
        return;
      }
    base.emplace_back(k, v);
  };
  for (char** e = environ; e && *e; ++e) {
    std::string s(*e);
    auto eq = s.find('=');
    if (eq == std::string::npos) continue;
    base.emplace_back(s.substr(0, eq), s.substr(eq + 1));
  }
  set("MASTER_ADDR", "127.0.0.1");
  set("MASTER_PORT", std::to_string(pick_free_port()));
  if (!std::getenv("NCCL_NVLS_ENABLE")) set("NCCL_NVLS_ENABLE", "0");
  for (const auto& kv : extra_env) set(kv.first, kv.second);
  set("WORLD_SIZE", std::to_string(n));
  set("LOCAL_WORLD_SIZE", std::to_string(n));

  std::vector<std::vector<std::string>> envs(n);
  std::vector<std::vector<char*>> envps(n);
  for (int r = 0; r < n; ++r) {
    auto env = base;
    for (auto& kv : env)
      if (kv.first == "RANK" || kv.first == "LOCAL_RANK") kv.second = std::to_string(r);
    bool has_rank = false, has_local = false;
    for (auto& kv : env) {
      has_rank |= kv.first == "RANK";
      has_local |= kv.first == "LOCAL_RANK";
    }
    if (!has_rank) env.emplace_back("RANK", std::to_string(r));
    if (!has_local) env.emplace_back("LOCAL_RANK", std::to_string(r));
    for (auto& kv : env) envs[r].push_back(kv.first + "=" + kv.second);
    for (auto& s : envs[r]) envps[r].push_back(s.data());
    envps[r].push_back(nullptr);
  }
  std::vector<std::string> args = argv.empty() ? std::vector<std::string>{exe} : argv;
  std::vector<char*> argp;
  for (auto& a : args) argp.push_back(a.data());
  argp.push_back(nullptr);

  // Forward SIGINT/SIGTERM: handlers only record the signal; the wait loop forwards it.
  struct sigaction sa {}, old_int{}, old_term{};
  sa.sa_handler = on_forwardable_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;
  g_pending_signal.store(0);
  ::sigaction(SIGINT, &sa, &old_int);
  ::sigaction(SIGTERM, &sa, &old_term);
  auto restore_handlers = [&] {
    ::sigaction(SIGINT, &old_int, nullptr);
    ::sigaction(SIGTERM, &old_term, nullptr);
  };

  const pid_t parent = ::getpid();
  std::vector<pid_t> pids(n, -1);
  std::vector<bool> alive(n, false);
  auto signal_alive = [&](int sig) {
    for (int r = 0; r < n; ++r)
      if (alive[r]) ::kill(pids[r], sig);
  };
  auto reap_all_blocking = [&] {
    for (int r = 0; r < n; ++r)
      if (alive[r]) {
        int st = 0;
        while (::waitpid(pids[r], &st, 0) < 0 && errno == EINTR) {
        }
        alive[r] = false;
      }
  };

  for (int r = 0; r < n; ++r) {
    pid_t pid = ::fork();
    if (pid < 0) {
      int e = errno;
      signal_alive(SIGKILL);
      reap_all_blocking();
      restore_handlers();
      throw CommError("launch_local_workers: fork for rank " + std::to_string(r) + ": " + std::strerror(e));
    }
    if (pid == 0) {
      // Child: default signal dispositions and mask, die with the parent, exec.
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(126);  // the parent died before prctl
      ::execve("/proc/self/exe", argp.data(), envps[r].data());
      const char msg[] = "mmoc: launch_local_workers: execve(/proc/self/exe) failed\n";
      ssize_t ignored = ::write(2, msg, sizeof(msg) - 1);
      (void)ignored;
      ::_exit(127);
    }
    pids[r] = pid;
    alive[r] = true;
  }

  // Wait loop: reap whoever finished; on the first failure (or a forwarded signal) terminate the rest.
  int n_alive = n;
  bool terminating = false;
  auto term_started = std::chrono::steady_clock::now();
  bool killed_hard = false;
  int result = 0;
  int others_alive = 0;
  while (n_alive > 0) {
    bool progressed = false;
    for (int r = 0; r < n; ++r) {
      if (!alive[r]) continue;
      int st = 0;
      pid_t got = ::waitpid(pids[r], &st, WNOHANG);
      if (got == 0) continue;
      if (got < 0 && errno == EINTR) continue;
      alive[r] = false;
      --n_alive;
      progressed = true;
      if (got < 0) st = 0;  // not our child any more (someone else reaped it): count as success
      bool failed = !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
      if (failed && !terminating && rep.failed_rank < 0) {
        rep.failed_rank = r;
        if (WIFEXITED(st)) {
          rep.exit_code = WEXITSTATUS(st);
          result = rep.exit_code;
        } else if (WIFSIGNALED(st)) {
          rep.signal = WTERMSIG(st);
          result = 128 + rep.signal;
        } else {
          result = 1;
        }
        rep.message = describe(r, pids[r], st);
        others_alive = n_alive;
        terminating = true;
        term_started = std::chrono::steady_clock::now();
        signal_alive(SIGTERM);
      }
    }
    if (int sig = g_pending_signal.exchange(0)) {
      rep.forwarded_signal = sig;
      signal_alive(sig);
      if (!terminating) {
        terminating = true;
        term_started = std::chrono::steady_clock::now();
      }
    }
    if (terminating && !killed_hard && n_alive > 0 &&
        std::chrono::steady_clock::now() - term_started > std::chrono::milliseconds(options.kill_grace_ms)) {
      signal_alive(SIGKILL);
      killed_hard = true;
    }
    if (n_alive > 0 && !progressed) sleep_ms(10);
  }
  restore_handlers();

  if (rep.failed_rank >= 0) {
    rep.message += "; terminated the " + std::to_string(others_alive) + " other worker" +
                   (others_alive == 1 ? "" : "s") + " still running";
  } else if (rep.forwarded_signal) {
    result = 128 + rep.forwarded_signal;
    rep.message = "received signal " + std::to_string(rep.forwarded_signal) + " and forwarded it to the " +
                  std::to_string(n) + " workers";
  }
  if (result != 0 && options.print_failure) std::fprintf(stderr, "mmoc: %s\n", rep.message.c_str());
  return result;
}

}  // namespace mmoc::comm
