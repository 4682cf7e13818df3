// Private to engine/comm: what a Rendezvous holds. Includes c10d headers.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "engine/comm/transport.hpp"

namespace mmoc::comm {

struct RankInfo {
  int node = -1;
  std::string host;
  long pid = 0;
  std::string pidns;  // /proc/self/ns/pid of the process: pids compare only within one namespace
};

struct Rendezvous::Impl {
  WorldInfo world;
  std::chrono::milliseconds timeout{};
  c10::intrusive_ptr<::c10d::Store> tcp;    // the TCPStore connection (or server)
  c10::intrusive_ptr<::c10d::Store> store;  // tcp under world.store_prefix: every key of the job
  int port = 0;                             // the store's actual port
  bool hosts = false;
  std::string host;   // this host's name
  std::string pidns;  // this process's pid namespace
  std::vector<RankInfo> ranks;  // filled when the barrier passed
  std::mutex mu;
  std::map<std::string, int> prefix_counters;
};

// "rank 2 of 4" (", node 1" on several nodes) style context for messages.
std::string who(const WorldInfo& w);
// "pid:[4026531836]": the process's pid namespace ("" when unknown).
std::string pid_namespace();
// The first line of an exception's text (c10 errors append a backtrace), trimmed.
std::string first_line(const std::string& s);
// Silences c10's own logging (c10d prints warnings/errors with backtraces to stderr for conditions mmoc reports
// itself in one line), unless TORCH_CPP_LOG_LEVEL is set.
void quiet_c10_logging();
// A TCPStore client of the job's store (own connection), under the job's prefix.
c10::intrusive_ptr<::c10d::Store> connect_store(const std::string& addr, int port, const std::string& prefix,
                                                std::chrono::milliseconds timeout);

}  // namespace mmoc::comm
