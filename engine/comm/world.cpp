#include "engine/comm/world.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>

extern char** environ;

namespace mmoc::comm {

namespace {

using Env = std::map<std::string, std::string>;

std::optional<std::string> lookup(const Env& env, const char* name) {
  auto it = env.find(name);
  if (it == env.end()) return std::nullopt;
  return it->second;
}

// Strict decimal integer: the whole value, no sign games, no trailing junk.
long long parse_ll(const std::string& name, const std::string& value) {
  long long out = 0;
  const char* b = value.data();
  const char* e = b + value.size();
  auto [p, ec] = std::from_chars(b, e, out);
  if (value.empty() || ec != std::errc() || p != e)
    throw ConfigError("environment variable " + name + "='" + value + "' is not an integer");
  return out;
}
int parse_int(const std::string& name, const std::string& value) {
  long long v = parse_ll(name, value);
  if (v < INT32_MIN || v > INT32_MAX)
    throw ConfigError("environment variable " + name + "='" + value + "' is not an integer");
  return static_cast<int>(v);
}
double parse_seconds(const std::string& name, const std::string& value) {
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(value.c_str(), &end);
  if (value.empty() || errno != 0 || end != value.c_str() + value.size() || !(v > 0) || v > 1e7)
    throw ConfigError(name + "='" + value + "' is not a positive number of seconds");
  return v;
}

// First of `names` that is set: (name, value).
std::optional<std::pair<std::string, std::string>> first_of(const Env& env, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (auto v = lookup(env, n)) return std::make_pair(std::string(n), *v);
  return std::nullopt;
}

const char* const kEnvNames[] = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "MASTER_ADDR",
    "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID",
    "MMOC_LAUNCHER", "MMOC_RDZV_TIMEOUT", "MMOC_FAIL_TIMEOUT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NPROCS",
    "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NNODES", "SLURM_STEP_NUM_NODES",
    "SLURM_JOB_NUM_NODES", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE", "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_DISTRIBUTION"};

bool in_slurm_step(const Env& env) { return lookup(env, "SLURM_STEP_ID") || lookup(env, "SLURM_STEPID"); }

// The Slurm step's node list (expanded), or empty.
std::vector<std::string> slurm_nodes(const Env& env, std::string* var = nullptr) {
  auto v = first_of(env, {"SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"});
  if (!v) return {};
  if (var) *var = v->first;
  try {
    return expand_hostlist(v->second);
  } catch (const ConfigError& e) {
    throw ConfigError(v->first + "='" + v->second + "': " + e.what());
  }
}

std::optional<int> slurm_ntasks(const Env& env) {
  if (auto v = first_of(env, {"SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"})) return parse_int(v->first, v->second);
  return std::nullopt;
}
std::optional<int> slurm_nnodes(const Env& env) {
  if (auto v = first_of(env, {"SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"}))
    return parse_int(v->first, v->second);
  return std::nullopt;
}
std::optional<int> slurm_port(const Env& env) {
  if (auto v = first_of(env, {"SLURM_JOB_ID", "SLURM_JOBID"})) return slurm_master_port(parse_ll(v->first, v->second));
  return std::nullopt;
}

std::string ranges(const std::vector<int>& v) {  // {2,3,4,7} -> "2-4, 7"
  std::string s;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(v[i]);
    if (j > i) s += "-" + std::to_string(v[j]);
    i = j + 1;
  }
  return s;
}

}  // namespace

std::string rank_ranges(const std::vector<int>& ranks) { return ranges(ranks); }

int WorldInfo::expected_node(int r) const {
  if (r < 0 || r >= world_size) return -1;
  int first = 0;
  for (size_t n = 0; n < ranks_per_node.size(); ++n) {
    if (r < first + ranks_per_node[n]) return static_cast<int>(n);
    first += ranks_per_node[n];
  }
  return -1;
}

std::string WorldInfo::describe_expected(int r) const {
  std::string s = "rank " + std::to_string(r);
  int n = expected_node(r);
  if (n < 0) return s;
  s += " (node " + std::to_string(n);
  if (n < static_cast<int>(node_hosts.size())) s += ", host " + node_hosts[n];
  return s + ")";
}

WorldInfo world_from_env(const Env& env) {
  WorldInfo w;
  auto rank = first_of(env, {"RANK", "SLURM_PROCID"});
  if (!rank)
    throw ConfigError("RANK is not set (nor SLURM_PROCID): launch with torchrun, srun or mmoc-run's launcher, "
                      "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT");
  const bool slurm = rank->first == "SLURM_PROCID";
  auto size = slurm ? first_of(env, {"WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"})
                    : first_of(env, {"WORLD_SIZE", "SLURM_NTASKS"});
  if (!size) throw ConfigError("WORLD_SIZE is not set (nor SLURM_NTASKS)");
  w.rank = parse_int(rank->first, rank->second);
  w.world_size = parse_int(size->first, size->second);
  if (w.world_size < 1)
    throw ConfigError(size->first + "=" + size->second + " is invalid: the world size must be >= 1");
  if (w.rank < 0 || w.rank >= w.world_size)
    throw ConfigError(rank->first + "=" + rank->second + " is outside [0, " + std::to_string(w.world_size) +
                      ") given " + size->first + "=" + size->second);
  if (lookup(env, "MMOC_LAUNCHER") == std::optional<std::string>("1")) w.launcher = "mmoc-run";
  else if (lookup(env, "TORCHELASTIC_RUN_ID") || lookup(env, "TORCHELASTIC_USE_AGENT_STORE")) w.launcher = "torchrun";
  else if (slurm || (lookup(env, "SLURM_PROCID") && in_slurm_step(env))) w.launcher = "slurm";

  // nodes
  if (auto g = first_of(env, {"GROUP_WORLD_SIZE", "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"})) {
    w.nnodes = parse_int(g->first, g->second);
    if (w.nnodes < 1 || w.nnodes > w.world_size)
      throw ConfigError(g->first + "=" + g->second + " is invalid: the node count must be in [1, world size " +
                        std::to_string(w.world_size) + "]");
  }
  if (auto g = first_of(env, {"GROUP_RANK", "SLURM_NODEID"})) {
    w.node_rank = parse_int(g->first, g->second);
    if (w.node_rank < 0 || w.node_rank >= w.nnodes)
      throw ConfigError(g->first + "=" + g->second + " is outside [0, " + std::to_string(w.nnodes) + ") nodes");
  }
  // ranks per node: torchrun and mmoc-run run LOCAL_WORLD_SIZE on every node; Slurm says per node
  if (auto l = lookup(env, "LOCAL_WORLD_SIZE")) {
    w.local_world_size = parse_int("LOCAL_WORLD_SIZE", *l);
    if (w.local_world_size < 1 || w.local_world_size > w.world_size)
      throw ConfigError("LOCAL_WORLD_SIZE=" + *l + " is outside [1, " + std::to_string(w.world_size) + "]");
    if (w.local_world_size * w.nnodes == w.world_size) w.ranks_per_node.assign(w.nnodes, w.local_world_size);
  } else if (auto t = first_of(env, {"SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"}); t && slurm) {
    std::vector<int> per;
    try {
      per = expand_tasks_per_node(t->second);
    } catch (const ConfigError& e) {
      throw ConfigError(t->first + "='" + t->second + "': " + e.what());
    }
    int sum = 0;
    for (int k : per) sum += k;
    if (static_cast<int>(per.size()) == w.nnodes && sum == w.world_size) {
      w.local_world_size = per[w.node_rank];
      auto dist = lookup(env, "SLURM_DISTRIBUTION");
      if (!dist || dist->rfind("block", 0) == 0) w.ranks_per_node = per;  // block: contiguous ranks per node
    } else {
      w.local_world_size = w.nnodes == 1 ? w.world_size : 1;
    }
  } else {
    w.local_world_size = w.nnodes == 1 ? w.world_size : std::max(1, w.world_size / w.nnodes);
    if (w.nnodes == 1) w.ranks_per_node = {w.world_size};
  }
  if (auto local = first_of(env, {"LOCAL_RANK", "SLURM_LOCALID"})) {
    w.local_rank = parse_int(local->first, local->second);
    if (w.local_rank < 0 || w.local_rank > w.rank)
      throw ConfigError(local->first + "=" + local->second + " is invalid: a local rank is in [0, RANK]");
    if (lookup(env, "LOCAL_WORLD_SIZE") && w.local_rank >= w.local_world_size)
      throw ConfigError(local->first + "=" + local->second + " is invalid: a local rank is in [0, LOCAL_WORLD_SIZE=" +
                        std::to_string(w.local_world_size) + ")");
  } else {
    w.local_rank = w.nnodes == 1 ? w.rank : w.rank % w.local_world_size;
  }
  if (slurm || w.launcher == "slurm") {
    std::vector<std::string> hosts = slurm_nodes(env);
    if (static_cast<int>(hosts.size()) == w.nnodes) w.node_hosts = hosts;
  }

  // the rendezvous
  auto addr = lookup(env, "MASTER_ADDR");
  auto port = lookup(env, "MASTER_PORT");
  std::optional<std::string> slurm_addr;
  std::optional<int> derived_port;
  if (slurm) {
    std::string var;
    auto hosts = slurm_nodes(env, &var);
    if (!hosts.empty()) slurm_addr = hosts[0];
    derived_port = slurm_port(env);
  }
  if (w.world_size > 1 || addr || port) {
    if ((!addr || addr->empty()) && !slurm_addr)
      throw ConfigError(std::string("MASTER_ADDR is not set: the address of rank 0's host is needed for the rendezvous") +
                        (slurm ? " (under Slurm: or SLURM_STEP_NODELIST / SLURM_JOB_NODELIST)" : ""));
    if (!port && !derived_port)
      throw ConfigError(std::string("MASTER_PORT is not set: a free TCP port on MASTER_ADDR is needed") +
                        (slurm ? " (under Slurm: or SLURM_JOB_ID, from which the port is derived)" : ""));
    w.master_addr = addr && !addr->empty() ? *addr : *slurm_addr;
    if (port) {
      w.master_port = parse_int("MASTER_PORT", *port);
      if (w.master_port < 1 || w.master_port > 65535)
        throw ConfigError("MASTER_PORT=" + *port + " is outside [1, 65535]");
    } else {
      w.master_port = *derived_port;
    }
  }
  if (auto a = lookup(env, "TORCHELASTIC_USE_AGENT_STORE"); a && *a == "True") {
    w.agent_store = true;
    w.store_prefix = "mmoc/attempt_" + lookup(env, "TORCHELASTIC_RESTART_COUNT").value_or("0");
  }
  if (w.launcher == "mmoc-run") w.agent_store = true;
  if (auto t = lookup(env, "MMOC_RDZV_TIMEOUT")) w.rdzv_timeout_s = parse_seconds("MMOC_RDZV_TIMEOUT", *t);
  if (auto t = lookup(env, "MMOC_FAIL_TIMEOUT")) w.fail_timeout_s = parse_seconds("MMOC_FAIL_TIMEOUT", *t);
  return w;
}

Env comm_env() {
  Env env;
  for (const char* n : kEnvNames)
    if (const char* v = std::getenv(n)) env[n] = v;
  return env;
}

WorldInfo world_from_env() { return world_from_env(comm_env()); }

bool is_rank_process(const Env& env) {
  if (lookup(env, "RANK")) return true;
  if (!lookup(env, "SLURM_PROCID") || !in_slurm_step(env)) return false;
  auto tasks = slurm_ntasks(env);
  auto nodes = slurm_nnodes(env);
  return tasks && *tasks > nodes.value_or(1);
}

// ---------------------------------------------------------------------------------------------------------
// Slurm's compressed forms

namespace {

// "01-03,07" -> the numbers as strings, padded to their lower bound's width.
void expand_ranges(const std::string& body, std::vector<std::string>& out, size_t limit) {
  if (body.empty()) throw ConfigError("empty brackets");
  size_t i = 0;
  while (i <= body.size()) {
    size_t comma = body.find(',', i);
    if (comma == std::string::npos) comma = body.size();
    std::string r = body.substr(i, comma - i);
    if (r.empty()) throw ConfigError("empty range in [" + body + "]");
    size_t dash = r.find('-');
    std::string lo_s = r.substr(0, dash), hi_s = dash == std::string::npos ? lo_s : r.substr(dash + 1);
    auto digits = [&](const std::string& x) {
      if (x.empty() || x.size() > 18 || x.find_first_not_of("0123456789") != std::string::npos)
        throw ConfigError("'" + r + "' in [" + body + "] is not a number or a range lo-hi");
    };
    digits(lo_s);
    digits(hi_s);
    long long lo = std::stoll(lo_s), hi = std::stoll(hi_s);
    if (lo > hi) throw ConfigError("range '" + r + "' in [" + body + "] runs backwards");
    if (hi - lo + 1 + static_cast<long long>(out.size()) > static_cast<long long>(limit))
      throw ConfigError("more than " + std::to_string(limit) + " host names");
    const int width = static_cast<int>(lo_s.size());
    for (long long v = lo; v <= hi; ++v) {
      std::string d = std::to_string(v);
      if (static_cast<int>(d.size()) < width) d.insert(0, width - d.size(), '0');
      out.push_back(d);
    }
    i = comma + 1;
  }
}

}  // namespace

std::vector<std::string> expand_hostlist(const std::string& list) {
  constexpr size_t kLimit = 1000000;
  std::vector<std::string> out;
  if (list.empty()) throw ConfigError("empty host list");
  // split at top-level commas
  std::vector<std::string> items;
  int depth = 0;
  std::string cur;
  for (char c : list) {
    if (c == '[') {
      if (depth++ > 0) throw ConfigError("nested '[' in host list '" + list + "'");
    } else if (c == ']') {
      if (--depth < 0) throw ConfigError("unbalanced ']' in host list '" + list + "'");
    } else if (c == ',' && depth == 0) {
      items.push_back(cur);
      cur.clear();
      continue;
    } else if (std::isspace(static_cast<unsigned char>(c))) {
      throw ConfigError("white space in host list '" + list + "'");
    }
    cur += c;
  }
  if (depth != 0) throw ConfigError("unbalanced '[' in host list '" + list + "'");
  items.push_back(cur);
  for (const std::string& item : items) {
    if (item.empty()) throw ConfigError("empty host name in host list '" + list + "'");
    // product over the bracket groups, left to right
    std::vector<std::string> names{""};
    size_t i = 0;
    while (i < item.size()) {
      size_t open = item.find('[', i);
      std::string lit = item.substr(i, open == std::string::npos ? std::string::npos : open - i);
      for (auto& n : names) n += lit;
      if (open == std::string::npos) break;
      size_t close = item.find(']', open);
      std::vector<std::string> nums;
      try {
        expand_ranges(item.substr(open + 1, close - open - 1), nums, kLimit);
      } catch (const ConfigError& e) {
        throw ConfigError(std::string(e.what()) + " in host list '" + list + "'");
      }
      if (names.size() * nums.size() + out.size() > kLimit)
        throw ConfigError("host list '" + list + "' names more than " + std::to_string(kLimit) + " hosts");
      std::vector<std::string> next;
      next.reserve(names.size() * nums.size());
      for (const auto& n : names)
        for (const auto& d : nums) next.push_back(n + d);
      names.swap(next);
      i = close + 1;
    }
    out.insert(out.end(), names.begin(), names.end());
  }
  return out;
}

std::vector<int> expand_tasks_per_node(const std::string& spec) {
  std::vector<int> out;
  if (spec.empty()) throw ConfigError("empty tasks-per-node list");
  size_t i = 0;
  while (i <= spec.size()) {
    size_t comma = spec.find(',', i);
    if (comma == std::string::npos) comma = spec.size();
    std::string item = spec.substr(i, comma - i);
    int count = 0, reps = 1;
    size_t paren = item.find("(x");
    std::string c = item.substr(0, paren);
    auto num = [&](const std::string& x) {
      if (x.empty() || x.size() > 9 || x.find_first_not_of("0123456789") != std::string::npos)
        throw ConfigError("'" + item + "' is not N or N(xM)");
      return std::stoi(x);
    };
    count = num(c);
    if (paren != std::string::npos) {
      if (item.back() != ')') throw ConfigError("'" + item + "' is not N or N(xM)");
      reps = num(item.substr(paren + 2, item.size() - paren - 3));
    }
    if (count < 1 || reps < 1 || out.size() + reps > 1000000) throw ConfigError("'" + item + "' is not N or N(xM) with N, M >= 1");
    out.insert(out.end(), reps, count);
    i = comma + 1;
  }
  return out;
}

int slurm_master_port(long long job_id) { return 20000 + static_cast<int>(((job_id % 40000) + 40000) % 40000); }

int cuda_device_for(const WorldInfo& w, int visible) {
  if (visible == 1) return 0;
  if (w.local_rank < visible) return w.local_rank;
  throw ConfigError("local rank " + std::to_string(w.local_rank) + " (rank " + std::to_string(w.rank) + ") has no GPU: " +
                    std::to_string(visible) + " visible on this node; run at most that many ranks per node");
}

int cuda_device_for(const WorldInfo& w, int visible, const std::vector<int>& plan_gpus) {
  if (visible == 1 || plan_gpus.empty() || w.nnodes > 1) return cuda_device_for(w, visible);
  if (w.rank < 0 || w.rank >= (int)plan_gpus.size())
    throw ConfigError("rank " + std::to_string(w.rank) + " has no GPU in the plan's mapping (order= lists " +
                      std::to_string(plan_gpus.size()) + " ranks)");
  const int d = plan_gpus[w.rank];
  if (d < 0 || d >= visible)
    throw ConfigError("rank " + std::to_string(w.rank) + " runs on GPU " + std::to_string(d) + " per the plan's mapping (order=), but " +
                      std::to_string(visible) + " GPU(s) are visible on this node; compile for this machine's hardware file or "
                      "with --cross-map off");
  return d;
}

NodeLaunch resolve_node_launch(const LauncherRequest& req, int total_ranks, const Env& env) {
  NodeLaunch nl;
  if (total_ranks < 1) throw ConfigError("the plan has no ranks");
  // Slurm step with one task per node: one launcher per node, the node's identity from Slurm
  const bool slurm_per_node = req.nnodes == 0 && in_slurm_step(env) && lookup(env, "SLURM_PROCID") &&
                              slurm_nnodes(env).value_or(1) > 1 && slurm_ntasks(env) == slurm_nnodes(env);
  if (req.nnodes < 0) throw ConfigError("--nnodes " + std::to_string(req.nnodes) + " must be >= 1");
  if (req.nnodes == 0 && req.node_rank >= 0 && !slurm_per_node)
    throw ConfigError("--node-rank needs --nnodes (the number of nodes of the job)");
  if (slurm_per_node) {
    nl.from = "Slurm (one task per node)";
    nl.nnodes = *slurm_nnodes(env);
    auto id = first_of(env, {"SLURM_NODEID"});
    if (!id) throw ConfigError("SLURM_NODEID is not set (one mmoc-run task per node needs it)");
    nl.node_rank = parse_int(id->first, id->second);
    auto hosts = slurm_nodes(env);
    if (!hosts.empty()) nl.master_addr = hosts[0];
    if (auto p = slurm_port(env)) nl.master_port = *p;
  } else if (req.nnodes > 0) {
    nl.from = "command line";
    nl.nnodes = req.nnodes;
  }
  if (req.node_rank >= 0) nl.node_rank = req.node_rank;
  if (nl.node_rank < 0 || nl.node_rank >= nl.nnodes)
    throw ConfigError("--node-rank " + std::to_string(nl.node_rank) + " is outside [0, " + std::to_string(nl.nnodes) +
                      ") for --nnodes " + std::to_string(nl.nnodes));
  if (req.nproc_per_node < 0) throw ConfigError("--nproc-per-node must be >= 1");
  if (req.nproc_per_node > 0) {
    nl.nproc_per_node = req.nproc_per_node;
  } else {
    if (total_ranks % nl.nnodes != 0)
      throw ConfigError("the plan's " + std::to_string(total_ranks) + " ranks do not split evenly over " +
                        std::to_string(nl.nnodes) + " nodes: compile for a multiple of the node count");
    nl.nproc_per_node = total_ranks / nl.nnodes;
  }
  if (nl.world_size() != total_ranks)
    throw ConfigError(std::to_string(nl.nnodes) + " node(s) x --nproc-per-node " + std::to_string(nl.nproc_per_node) +
                      " = " + std::to_string(nl.world_size()) + " ranks, but the plan has " + std::to_string(total_ranks));
  if (!req.master_addr.empty()) nl.master_addr = req.master_addr;
  else if (auto a = lookup(env, "MASTER_ADDR"); a && !a->empty() && nl.nnodes > 1) nl.master_addr = *a;
  else if (nl.nnodes > 1 && !slurm_per_node)
    throw ConfigError("--nnodes " + std::to_string(nl.nnodes) + " needs --master-addr: the address of node 0, which hosts "
                      "the rendezvous (the same on every node)");
  if (req.master_port != 0) {
    if (req.master_port < 1 || req.master_port > 65535)
      throw ConfigError("--master-port " + std::to_string(req.master_port) + " is outside [1, 65535]");
    nl.master_port = req.master_port;
  } else if (auto p = lookup(env, "MASTER_PORT"); p && nl.nnodes > 1) {
    nl.master_port = parse_int("MASTER_PORT", *p);
    if (nl.master_port < 1 || nl.master_port > 65535) throw ConfigError("MASTER_PORT=" + *p + " is outside [1, 65535]");
  } else if (nl.nnodes > 1 && nl.master_port == 0) {
    nl.master_port = 29500;  // torchrun's default
  }
  if (req.rdzv_timeout_s < 0 || req.fail_timeout_s < 0) throw ConfigError("--rdzv-timeout and --fail-timeout must be > 0");
  if (req.rdzv_timeout_s > 0) nl.rdzv_timeout_s = req.rdzv_timeout_s;
  else if (auto t = lookup(env, "MMOC_RDZV_TIMEOUT")) nl.rdzv_timeout_s = parse_seconds("MMOC_RDZV_TIMEOUT", *t);
  if (req.fail_timeout_s > 0) nl.fail_timeout_s = req.fail_timeout_s;
  else if (auto t = lookup(env, "MMOC_FAIL_TIMEOUT")) nl.fail_timeout_s = parse_seconds("MMOC_FAIL_TIMEOUT", *t);
  return nl;
}

std::string local_address_towards(const std::string& host) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  if (::getaddrinfo(host.c_str(), "9", &hints, &res) != 0 || !res) return "";
  std::string out;
  for (addrinfo* a = res; a && out.empty(); a = a->ai_next) {
    int fd = ::socket(a->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    sockaddr_storage local{};
    socklen_t len = sizeof(local);
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0) {
      char buf[INET6_ADDRSTRLEN] = {0};
      const void* src = local.ss_family == AF_INET ? static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&local)->sin_addr)
                                                   : static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr);
      if (::inet_ntop(local.ss_family, src, buf, sizeof(buf))) out = buf;
    }
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return out;
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

std::string describe_how(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* name = ::strsignal(sig);
    return "was killed by signal " + std::to_string(sig) + " (" + (name ? name : "?") + ")";
  }
  return "stopped with status " + std::to_string(status);
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
  const int world = options.world_size > 0 ? options.world_size : n;
  if (options.first_rank < 0 || options.first_rank + n > world)
    throw CommError("launch_local_workers: ranks [" + std::to_string(options.first_rank) + ", " +
                    std::to_string(options.first_rank + n) + ") outside the world of " + std::to_string(world));
  set("WORLD_SIZE", std::to_string(world));
  set("LOCAL_WORLD_SIZE", std::to_string(n));
  set("GROUP_RANK", std::to_string(options.node_rank));
  set("GROUP_WORLD_SIZE", std::to_string(options.nnodes));

  std::vector<std::vector<std::string>> envs(n);
  std::vector<std::vector<char*>> envps(n);
  for (int r = 0; r < n; ++r) {
    auto env = base;
    for (auto& kv : env) {
      if (kv.first == "RANK") kv.second = std::to_string(options.first_rank + r);
      if (kv.first == "LOCAL_RANK") kv.second = std::to_string(r);
    }
    bool has_rank = false, has_local = false;
    for (auto& kv : env) {
      has_rank |= kv.first == "RANK";
      has_local |= kv.first == "LOCAL_RANK";
    }
    if (!has_rank) env.emplace_back("RANK", std::to_string(options.first_rank + r));
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
  auto worker_name = [&](int r) {
    std::string s = "worker rank " + std::to_string(options.first_rank + r) + " (";
    if (options.nnodes > 1) s += "node " + std::to_string(options.node_rank) + ", ";
    return s + "pid " + std::to_string(pids[r]) + ")";
  };
  int n_alive = n;
  bool terminating = false;
  auto term_started = std::chrono::steady_clock::now();
  bool killed_hard = false;
  int result = 0;
  int others_alive = 0;
  std::string hook_message;
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
        rep.failed_rank = options.first_rank + r;
        rep.failed_pid = pids[r];
        if (WIFEXITED(st)) {
          rep.exit_code = WEXITSTATUS(st);
          result = rep.exit_code;
        } else if (WIFSIGNALED(st)) {
          rep.signal = WTERMSIG(st);
          result = 128 + rep.signal;
        } else {
          result = 1;
        }
        rep.how = describe_how(st);
        rep.message = worker_name(r) + " " + rep.how;
        others_alive = n_alive;
        if (options.on_failure) hook_message = options.on_failure(rep);
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
        if (options.on_failure) hook_message = options.on_failure(rep);
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

  if (!hook_message.empty()) rep.message = hook_message;
  const std::string here = options.nnodes > 1 ? " on this node" : "";
  if (rep.failed_rank >= 0 || (result != 0 && !rep.forwarded_signal)) {
    if (others_alive > 0)
      rep.message += "; stopped the " + std::to_string(others_alive) + " other worker" + (others_alive == 1 ? "" : "s") +
                     " still running" + here;
  } else if (rep.forwarded_signal) {
    result = 128 + rep.forwarded_signal;
    if (hook_message.empty())
      rep.message = "received signal " + std::to_string(rep.forwarded_signal) + " and forwarded it to the " +
                    std::to_string(n) + " workers" + here;
  }
  if (result != 0 && options.print_failure) std::fprintf(stderr, "%s%s\n", options.print_prefix.c_str(), rep.message.c_str());
  return result;
}

}  // namespace mmoc::comm
