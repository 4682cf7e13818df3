// The job's failure record, the per-rank watchdog (JobMonitor), exit_rank and mmoc-run's node launcher.
#include "engine/comm/job.hpp"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "engine/comm/rendezvous_impl.hpp"

namespace mmoc::comm {

namespace {

using Clock = std::chrono::steady_clock;
using ms = std::chrono::milliseconds;

std::vector<uint8_t> to_v(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
std::string to_s(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

std::string one_line(std::string s) {
  s = first_line(s);
  for (char& c : s)
    if (c == '\t' || c == '\r') c = ' ';
  return s;
}

JobFailure post(::c10d::Store& st, const JobFailure& f) {
  return decode_failure(to_s(st.compareSet("failure", {}, to_v(encode_failure(f)))));
}
std::optional<JobFailure> peek(::c10d::Store& st) {
  if (!st.check({"failure"})) return std::nullopt;
  return decode_failure(to_s(st.get("failure")));
}

void print_line(const std::string& line) {
  std::fflush(stdout);
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

[[noreturn]] void die(int code) {
  std::fflush(nullptr);
  std::_Exit(code);
}

// "worker 3 (node 1, host b)" / "worker 3"
std::string worker_name(const Rendezvous& r) {
  std::string d = r.describe_rank(r.world().rank);
  return "worker" + d.substr(4);  // "rank ..." -> "worker ..."
}

// Waits until counter `key` reaches `n` or `limit` passed (store errors end the wait).
void wait_counter(::c10d::Store& st, const std::string& key, int64_t n, ms limit) {
  auto until = Clock::now() + limit;
  try {
    while (st.add(key, 0) < n && Clock::now() < until) std::this_thread::sleep_for(ms(20));
  } catch (const std::exception&) {
  }
}

// Ends the process after a failure (`ack`: this rank read the job's failure). The rank that hosts the store
// (rank 0 without a launcher's store) first waits until the others acknowledged it (at most 5 s), so that they read
// the failure instead of seeing the store vanish.
[[noreturn]] void leave(Rendezvous& r, ::c10d::Store& st, int code, bool ack) {
  const WorldInfo& w = r.world();
  if (ack) {
    try {
      st.add("acks", 1);
    } catch (const std::exception&) {
    }
  }
  if (r.hosts_store())
    wait_counter(st, "acks", w.world_size - 1, std::min<ms>(ms(5000), ms(static_cast<int64_t>(w.fail_timeout_s * 1000))));
  die(code);
}

ms interval_for(ms fail_timeout) { return std::clamp<ms>(fail_timeout / 10, ms(100), ms(1000)); }

// Is process `pid` of this pid namespace gone (no such process, or a zombie its parent has not reaped yet)?
bool process_gone(long pid) {
  if (pid <= 0) return false;
  if (::kill(static_cast<pid_t>(pid), 0) != 0) return errno == ESRCH;
  std::FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
  if (!f) return false;
  char buf[512] = {0};
  size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  const char* close = std::strrchr(buf, ')');  // "pid (comm) S ..."
  return n > 0 && close && close[1] == ' ' && close[2] == 'Z';
}

}  // namespace

std::string encode_failure(const JobFailure& f) {
  return std::to_string(f.code) + "\t" + std::to_string(f.rank) + "\t" + one_line(f.message);
}

JobFailure decode_failure(const std::string& s) {
  JobFailure f;
  size_t a = s.find('\t'), b = a == std::string::npos ? a : s.find('\t', a + 1);
  if (a == std::string::npos || b == std::string::npos) {
    f.message = s;
    return f;
  }
  f.code = std::atoi(s.substr(0, a).c_str());
  f.rank = std::atoi(s.substr(a + 1, b - a - 1).c_str());
  f.message = s.substr(b + 1);
  return f;
}

JobFailure post_failure(Rendezvous& r, const JobFailure& f) { return post(*r.impl().store, f); }
std::optional<JobFailure> job_failure(Rendezvous& r) { return peek(*r.impl().store); }

// Ranks of this host and pid namespace whose process is gone. A rank counts once it has been seen gone for
// 500 ms: its launcher (mmoc-run's) reports how it ended within milliseconds, and that says more.
struct GoneRanks {
  std::map<int, Clock::time_point> first_seen;
  std::optional<JobFailure> check(Rendezvous& r) {
    const Rendezvous::Impl& I = r.impl();
    const auto now = Clock::now();
    for (int q = 0; q < static_cast<int>(I.ranks.size()); ++q) {
      const RankInfo& k = I.ranks[q];
      if (q == r.world().rank || k.host != I.host || k.pidns.empty() || k.pidns != I.pidns || !process_gone(k.pid)) continue;
      auto [it, fresh] = first_seen.emplace(q, now);
      if (now - it->second >= ms(500))
        return JobFailure{1, q, r.describe_rank(q) + " (pid " + std::to_string(k.pid) + ") ended without reporting an error (killed, or crashed)"};
    }
    return std::nullopt;
  }
};

// ---------------------------------------------------------------------------------------------------------
// JobMonitor

struct JobMonitor::Impl {
  std::shared_ptr<Rendezvous> rdzv;
  MonitorOptions opts;
  ms fail_timeout{30000}, interval{1000};
  c10::intrusive_ptr<::c10d::Store> st;  // own connection
  std::thread thread;
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  std::atomic<bool> all_done{false};  // every rank entered finish(): ranks may leave, the store's host too

  void job_failed(const JobFailure& f) {
    const WorldInfo& w = rdzv->world();
    if (opts.on_job_failed) {
      opts.on_job_failed(f);
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
      return;
    }
    if (f.rank == w.rank) {  // declared failed by another rank (this process was stopped or starved)
      print_line(opts.program + ": " + worker_name(*rdzv) + ": error: the job declared this rank failed: " + f.message);
      leave(*rdzv, *st, f.code, false);
    }
    if (w.launcher != "mmoc-run")
      print_line(opts.program + ": " + worker_name(*rdzv) + ": stopped: the job failed: " + f.message);
    leave(*rdzv, *st, kExitJobFailed, true);
  }

  void run() {
    const WorldInfo& w = rdzv->world();
    const int n = w.world_size, me = w.rank;
    std::vector<std::string> keys;
    for (int q = 0; q < n; ++q) keys.push_back("hb/" + std::to_string(q));
    std::vector<std::string> last(n);
    std::vector<Clock::time_point> moved(n, Clock::now());
    GoneRanks gone;
    auto store_ok = Clock::now();
    std::string store_error;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait_for(lk, interval, [&] { return stop; });
        if (stop) return;
      }
      try {
        st->add(keys[me], 1);
        if (auto f = peek(*st)) return job_failed(*f);
        auto vals = st->multiGet(keys);
        const auto now = Clock::now();
        for (int q = 0; q < n; ++q) {
          if (q == me) continue;
          std::optional<JobFailure> f;
          std::string v = to_s(vals[q]);
          if (v != last[q]) {
            last[q] = v;
            moved[q] = now;
          } else if (now - moved[q] > fail_timeout) {
            char buf[64];
            std::snprintf(buf, sizeof buf, "%.1f s", std::chrono::duration<double>(now - moved[q]).count());
            f = JobFailure{1, q, rdzv->describe_rank(q) + ": no heartbeat for " + buf +
                                     " (the process was killed or stopped, or its node is unreachable)"};
          }
          // a rank leaves normally once every rank entered finish(): not a failure then
          if (f && !all_done && st->add("done", 0) < n) return job_failed(post(*st, *f));
        }
        // a rank of this host (same pid namespace) that is gone is known at once, without its launcher's word
        if (auto f = gone.check(*rdzv); f && !all_done && st->add("done", 0) < n) return job_failed(post(*st, *f));
        store_ok = now;
      } catch (const std::exception& e) {
        if (all_done) return;  // after the end barrier the store's host may leave first
        store_error = one_line(e.what());
        // c10d fails fast when the server is gone (connection closed) and after its timeout when it is unreachable:
        // either way the job cannot continue
        JobFailure f{1, w.agent_store ? -1 : 0,
                     "lost the job's store at " + rdzv->store_address() + ", hosted by " + rdzv->store_host() +
                         " (it ended, or its node is unreachable): " + store_error};
        return job_failed(f);
      }
    }
  }
};

JobMonitor::JobMonitor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<JobMonitor> JobMonitor::start(std::shared_ptr<Rendezvous> r, const MonitorOptions& o) {
  auto impl = std::make_unique<Impl>();
  impl->rdzv = r;
  impl->opts = o;
  const WorldInfo& w = r->world();
  impl->fail_timeout = o.fail_timeout.count() > 0 ? o.fail_timeout : ms(static_cast<int64_t>(w.fail_timeout_s * 1000));
  impl->interval = o.interval.count() > 0 ? o.interval : interval_for(impl->fail_timeout);
  std::unique_ptr<JobMonitor> m(new JobMonitor(std::move(impl)));
  if (w.world_size <= 1) return m;
  auto& I = *m->impl_;
  try {
    I.st = connect_store(w.master_addr, r->impl().port, w.store_prefix, I.fail_timeout);
  } catch (const std::exception& e) {
    throw CommError("job monitor (" + who(w) + "): cannot open a second connection to the job's store at " +
                    r->store_address() + ": " + first_line(e.what()));
  }
  I.thread = std::thread([&I] { I.run(); });
  return m;
}

JobMonitor::~JobMonitor() {
  if (!impl_) return;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

void JobMonitor::finish() {
  auto& I = *impl_;
  if (!I.st) return;
  const WorldInfo& w = I.rdzv->world();
  auto& st = *I.rdzv->impl().store;  // the main connection: the watchdog uses its own
  try {
    st.add("done", 1);
    // a rank that fails meanwhile is caught by the watchdog, which ends this process
    while (st.add("done", 0) < w.world_size) std::this_thread::sleep_for(ms(20));
    I.all_done = true;
    st.add("exited", 1);
  } catch (const std::exception& e) {
    // the store went away before every rank was done: the job did not end cleanly
    if (w.launcher != "mmoc-run")
      print_line(I.opts.program + ": " + worker_name(*I.rdzv) + ": stopped: lost the job's store at " +
                 I.rdzv->store_address() + " while waiting for the other ranks to finish: " + one_line(e.what()));
    die(kExitJobFailed);
  }
  {
    std::lock_guard<std::mutex> lk(I.mu);
    I.stop = true;
  }
  I.cv.notify_all();
  if (I.thread.joinable()) I.thread.join();
  if (I.rdzv->hosts_store()) wait_counter(st, "exited", w.world_size, I.fail_timeout);
}

// ---------------------------------------------------------------------------------------------------------
// exit_rank

void exit_rank(const std::string& program, int code, const std::string& what) {
  const std::string line = one_line(what);
  std::shared_ptr<Rendezvous> job = current_job();
  if (!job || !job->impl().store || job->world().world_size <= 1) {
    const char* r = std::getenv("RANK");
    if (!r) r = std::getenv("SLURM_PROCID");
    print_line(program + ": worker " + (r ? r : "?") + ": error: " + line);
    die(code);
  }
  const WorldInfo& w = job->world();
  auto& st = *job->impl().store;
  const ms fail_timeout(static_cast<int64_t>(w.fail_timeout_s * 1000));
  JobFailure mine{code, w.rank, job->describe_rank(w.rank) + ": " + line};
  std::optional<JobFailure> first;
  try {
    // A failure elsewhere may have caused this one (a killed peer closes its sockets at once; its launcher
    // reports it within milliseconds): give it a moment to be the one reported.
    const auto until = Clock::now() + std::clamp<ms>(2 * interval_for(fail_timeout), ms(500), ms(2000));
    GoneRanks gone;
    while (!(first = peek(st)) && Clock::now() < until) {
      if (auto g = gone.check(*job)) first = post(st, *g);  // a dead peer of this host
      else std::this_thread::sleep_for(ms(50));
    }
    if (!first) first = post(st, mine);
  } catch (const std::exception&) {
    first = mine;  // the store is gone: report this rank's own error
  }
  if (first->rank == w.rank) {
    print_line(program + ": " + worker_name(*job) + ": error: " + line);
    leave(*job, st, code, false);
  }
  if (w.launcher != "mmoc-run") print_line(program + ": " + worker_name(*job) + ": stopped: the job failed: " + first->message);
  leave(*job, st, kExitJobFailed, true);
}

// ---------------------------------------------------------------------------------------------------------
// launch_node

int launch_node(const NodeLaunch& nl, const std::vector<std::string>& argv,
                std::vector<std::pair<std::string, std::string>> extra_env, LaunchReport* report,
                const LaunchOptions& options, const std::string& program) {
  quiet_c10_logging();
  const std::string prefix = "mmoc";
  const ms fail_timeout(static_cast<int64_t>(nl.fail_timeout_s * 1000));
  const ms rdzv_timeout(static_cast<int64_t>(nl.rdzv_timeout_s * 1000));
  int port = nl.master_port;
  c10::intrusive_ptr<::c10d::Store> server;  // node 0: the job's store (server + own client)
  if (nl.node_rank == 0) {
    ::c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = true;
    o.waitWorkers = false;
    o.timeout = rdzv_timeout;
    try {
      auto tcp = c10::make_intrusive<::c10d::TCPStore>(nl.master_addr, o);
      port = tcp->getPort();
      server = c10::make_intrusive<::c10d::PrefixStore>(prefix, tcp);
    } catch (const std::exception& e) {
      throw CommError("node 0 cannot host the job's store on port " + std::to_string(nl.master_port) + " and reach it at " +
                      nl.master_addr + " (is --master-addr this machine's address, and is the port free?): " +
                      first_line(e.what()));
    }
  }
  const std::string addr = nl.master_addr + ":" + std::to_string(port);
  char buf[32];
  auto secs = [&](double s) {
    std::snprintf(buf, sizeof buf, "%g", s);
    return std::string(buf);
  };
  extra_env.emplace_back("MASTER_ADDR", nl.master_addr);
  extra_env.emplace_back("MASTER_PORT", std::to_string(port));
  extra_env.emplace_back("MMOC_LAUNCHER", "1");
  extra_env.emplace_back("MMOC_RDZV_TIMEOUT", secs(nl.rdzv_timeout_s));
  extra_env.emplace_back("MMOC_FAIL_TIMEOUT", secs(nl.fail_timeout_s));

  c10::intrusive_ptr<::c10d::Store> client;  // other nodes: connected when needed
  auto store = [&]() -> ::c10d::Store& {
    if (server) return *server;
    if (!client) client = connect_store(nl.master_addr, port, prefix, std::min<ms>(ms(1000), fail_timeout));
    return *client;
  };
  const std::string node = nl.nnodes > 1 ? "node " + std::to_string(nl.node_rank) : "";
  auto rank_name = [&](int r) {
    if (nl.nnodes <= 1) return "rank " + std::to_string(r);
    char host[256] = {0};
    ::gethostname(host, sizeof(host) - 1);
    return "rank " + std::to_string(r) + " (" + node + ", host " + host + ")";
  };
  std::optional<JobFailure> first;
  LaunchOptions lo = options;
  lo.first_rank = nl.first_rank();
  lo.world_size = nl.world_size();
  lo.node_rank = nl.node_rank;
  lo.nnodes = nl.nnodes;
  lo.print_prefix = program + ": ";
  lo.on_failure = [&](const LaunchReport& r) -> std::string {
    std::optional<JobFailure> local;
    if (r.forwarded_signal) {
      const char* name = ::strsignal(r.forwarded_signal);
      local = JobFailure{1, -1, (node.empty() ? std::string("mmoc-run") : node + "'s mmoc-run") + " received signal " +
                                    std::to_string(r.forwarded_signal) + " (" + (name ? name : "?") +
                                    ") and stopped its workers"};
    } else if (!(r.signal == 0 && r.exit_code == kExitJobFailed)) {
      local = JobFailure{r.signal == 0 && r.exit_code > 0 ? r.exit_code : 1, r.failed_rank,
                         rank_name(r.failed_rank) + " (pid " + std::to_string(r.failed_pid) + ") " + r.how};
    }
    bool reachable = true;
    try {
      auto& st = store();
      if (local) {
        first = post(st, *local);
      } else {  // the worker stopped because the job failed: the failure is there already
        auto until = Clock::now() + ms(1000);
        while (!(first = peek(st)) && Clock::now() < until) std::this_thread::sleep_for(ms(20));
      }
      if (!server) st.add("launcher_acks", 1);
    } catch (const std::exception&) {
      reachable = false;
    }
    std::string m;
    if (first) {
      m = "the job failed: " + first->message;
    } else {
      m = local ? local->message : "worker " + rank_name(r.failed_rank).substr(5) + " stopped because the job failed";
      if (!reachable) m += "; the job's store at " + addr + " is unreachable (node 0's mmoc-run ended, or its node is unreachable)";
    }
    return node.empty() ? m : node + ": " + m;
  };
  int rc = launch_local_workers(nl.nproc_per_node, argv, extra_env, report, lo);
  if (server) {
    if (rc == 0) wait_counter(*server, "exited", nl.world_size(), fail_timeout);
    else if (nl.nnodes > 1) {
      // the other nodes whose ranks joined may still have to read the failure (their launchers acknowledge it)
      std::set<int> nodes;
      try {
        for (int q = nl.nproc_per_node; q < nl.world_size(); ++q)
          if (server->check({"rank/" + std::to_string(q)})) nodes.insert(std::atoi(to_s(server->get("rank/" + std::to_string(q))).c_str()));
      } catch (const std::exception&) {
      }
      nodes.erase(0);
      if (!nodes.empty())
        wait_counter(*server, "launcher_acks", static_cast<int64_t>(nodes.size()), std::min<ms>(ms(10000), fail_timeout));
    }
  }
  if (rc == 0) return 0;
  if (first) return first->code;
  return rc;
}

}  // namespace mmoc::comm
