// Rendezvous (c10d::TCPStore + the start barrier), the Transport's blocking wrappers and tag_to_int.
#include <ATen/core/Tensor.h>
#include <c10/util/Logging.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <unistd.h>

#include <cstdlib>
#include <thread>

#include "engine/comm/rendezvous_impl.hpp"
#include "engine/comm/transport.hpp"

namespace mmoc::comm {

namespace {
std::mutex g_job_mu;
std::shared_ptr<Rendezvous>* g_job = new std::shared_ptr<Rendezvous>();  // never destroyed: used until _exit

std::string seconds(std::chrono::milliseconds ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g s", ms.count() / 1000.0);
  return buf;
}
std::string to_s(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
std::vector<uint8_t> to_v(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

std::string this_host() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "?";
  return buf;
}
}  // namespace

std::string who(const WorldInfo& w) {
  std::string s = "rank " + std::to_string(w.rank) + " of " + std::to_string(w.world_size);
  if (w.nnodes > 1) s += ", node " + std::to_string(w.node_rank);
  return s;
}

std::string pid_namespace() {
  char buf[128] = {0};
  ssize_t n = ::readlink("/proc/self/ns/pid", buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

std::string first_line(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  size_t e = s.find('\n', b);
  std::string l = s.substr(b, e == std::string::npos ? std::string::npos : e - b);
  while (!l.empty() && std::isspace(static_cast<unsigned char>(l.back()))) l.pop_back();
  return l;
}

void quiet_c10_logging() {
  if (!std::getenv("TORCH_CPP_LOG_LEVEL")) FLAGS_caffe2_log_level = c10::GLOG_FATAL;
}

c10::intrusive_ptr<::c10d::Store> connect_store(const std::string& addr, int port, const std::string& prefix,
                                                std::chrono::milliseconds timeout) {
  ::c10d::TCPStoreOptions o;
  o.port = static_cast<std::uint16_t>(port);
  o.isServer = false;
  o.waitWorkers = false;
  o.timeout = timeout;
  auto tcp = c10::make_intrusive<::c10d::TCPStore>(addr, o);
  return c10::make_intrusive<::c10d::PrefixStore>(prefix, tcp);
}

std::shared_ptr<Rendezvous> current_job() {
  std::lock_guard<std::mutex> lk(g_job_mu);
  return *g_job;
}

Rendezvous::Rendezvous(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
Rendezvous::~Rendezvous() = default;

std::shared_ptr<Rendezvous> Rendezvous::connect(const WorldInfo& world, std::chrono::milliseconds timeout) {
  quiet_c10_logging();
  const auto t0 = std::chrono::steady_clock::now();
  auto impl = std::make_shared<Impl>();
  impl->world = world;
  impl->timeout = timeout;
  impl->host = this_host();
  impl->pidns = pid_namespace();
  impl->hosts = !world.agent_store && world.rank == 0;
  ::c10d::TCPStoreOptions o;
  o.port = static_cast<std::uint16_t>(world.master_port);
  o.isServer = impl->hosts;
  o.waitWorkers = false;  // the barrier below names who is missing
  o.timeout = timeout;
  const std::string addr = world.master_addr + ":" + std::to_string(world.master_port);
  try {
    auto tcp = c10::make_intrusive<::c10d::TCPStore>(world.master_addr, o);
    impl->port = tcp->getPort();
    impl->tcp = tcp;
  } catch (const std::exception& e) {
    if (impl->hosts)
      throw CommError("rendezvous failed (" + who(world) + ", hosting the job's store on port " +
                      std::to_string(world.master_port) + " and joining it at " + addr + "): " + first_line(e.what()));
    std::string host = world.agent_store ? (world.launcher == "torchrun" ? "torchrun's agent on node 0" : "node 0's mmoc-run")
                                         : "rank 0";
    throw CommError("rendezvous failed (" + who(world) + "): cannot reach the job's store at " + addr + " within " +
                    seconds(timeout) + ", hosted by " + host + " (not started, or a wrong address or port?): " +
                    first_line(e.what()));
  }
  impl->store = c10::make_intrusive<::c10d::PrefixStore>(world.store_prefix, impl->tcp);
  std::shared_ptr<Rendezvous> r(new Rendezvous(impl));
  {
    std::lock_guard<std::mutex> lk(g_job_mu);
    *g_job = r;
  }
  auto& st = *impl->store;
  const int me = world.rank, n = world.world_size;
  try {
    // the same world everywhere
    std::string mine = std::to_string(n);
    std::string first = to_s(st.compareSet("world_size", {}, to_v(mine)));
    if (first != mine)
      throw CommError("rendezvous failed (" + who(world) + "): this rank has world size " + mine +
                      " but the job's first rank registered " + first + " (WORLD_SIZE differs between launches)");
    st.set("rank/" + std::to_string(me),
           to_v(std::to_string(world.node_rank) + "\t" + impl->host + "\t" + std::to_string(::getpid()) + "\t" + impl->pidns));
    st.add("hb/" + std::to_string(me), 1);
    st.add("joined", 1);
    for (int spins = 0;; ++spins) {
      int64_t joined = st.add("joined", 0);
      if (joined >= n) break;
      if (st.check({"failure"})) {
        std::string f = to_s(st.get("failure"));
        size_t t = f.find('\t', f.find('\t') + 1);
        throw CommError("rendezvous stopped (" + who(world) + "): the job failed: " +
                        (t == std::string::npos ? f : f.substr(t + 1)));
      }
      if (std::chrono::steady_clock::now() - t0 > timeout) {
        std::map<int, std::vector<int>> by_node;  // expected node (-1 unknown) -> missing ranks
        int missing = 0;
        for (int q = 0; q < n; ++q)
          if (!st.check({"rank/" + std::to_string(q)})) {
            by_node[world.expected_node(q)].push_back(q);
            ++missing;
          }
        std::string list;
        for (auto& [node, qs] : by_node) {
          if (!list.empty()) list += ", ";
          list += std::string(qs.size() > 1 ? "ranks " : "rank ") + rank_ranges(qs);
          if (node >= 0) {
            list += " (node " + std::to_string(node);
            if (node < static_cast<int>(world.node_hosts.size())) list += ", host " + world.node_hosts[node];
            list += ")";
          }
        }
        throw CommError("rendezvous timed out after " + seconds(timeout) + ": " + std::to_string(n - missing) + " of " +
                        std::to_string(n) + " ranks joined the store at " + addr + "; " +
                        (list.empty() ? std::string("the others") : list) + " did not");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(spins < 20 ? 25 : 100));
    }
    std::vector<std::string> keys;
    for (int q = 0; q < n; ++q) keys.push_back("rank/" + std::to_string(q));
    auto vals = st.multiGet(keys);
    impl->ranks.resize(n);
    for (int q = 0; q < n; ++q) {
      std::vector<std::string> f;
      std::string v = to_s(vals[q]);
      for (size_t i = 0;;) {
        size_t t = v.find('\t', i);
        f.push_back(v.substr(i, t == std::string::npos ? std::string::npos : t - i));
        if (t == std::string::npos) break;
        i = t + 1;
      }
      if (f.size() < 4) continue;
      impl->ranks[q].node = std::atoi(f[0].c_str());
      impl->ranks[q].host = f[1];
      impl->ranks[q].pid = std::atol(f[2].c_str());
      impl->ranks[q].pidns = f[3];
    }
  } catch (const CommError&) {
    throw;
  } catch (const std::exception& e) {
    throw CommError("rendezvous failed (" + who(world) + ", store at " + addr + "): " + first_line(e.what()));
  }
  return r;
}

const WorldInfo& Rendezvous::world() const { return impl_->world; }
std::chrono::milliseconds Rendezvous::timeout() const { return impl_->timeout; }

void Rendezvous::set(const std::string& key, const std::string& value) { impl_->store->set(key, to_v(value)); }

std::string Rendezvous::get(const std::string& key) {
  try {
    return to_s(impl_->store->get(key));
  } catch (const std::exception& e) {
    throw CommError("rendezvous: waiting for key '" + key + "' (" + who(impl_->world) + ", timeout " +
                    std::to_string(impl_->timeout.count()) + " ms): " + first_line(e.what()));
  }
}

int64_t Rendezvous::add(const std::string& key, int64_t delta) { return impl_->store->add(key, delta); }

std::string Rendezvous::next_prefix(const std::string& what) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  int n = impl_->prefix_counters[what]++;
  return "mmoc/" + what + "/" + std::to_string(n) + "/";
}

int Rendezvous::node_of(int rank) const {
  if (rank >= 0 && rank < static_cast<int>(impl_->ranks.size()) && impl_->ranks[rank].node >= 0)
    return impl_->ranks[rank].node;
  return impl_->world.expected_node(rank);
}

std::string Rendezvous::describe_rank(int rank) const {
  const WorldInfo& w = impl_->world;
  if (w.nnodes <= 1) return "rank " + std::to_string(rank);
  if (rank >= 0 && rank < static_cast<int>(impl_->ranks.size()) && impl_->ranks[rank].node >= 0)
    return "rank " + std::to_string(rank) + " (node " + std::to_string(impl_->ranks[rank].node) + ", host " +
           impl_->ranks[rank].host + ")";
  return w.describe_expected(rank);
}

bool Rendezvous::hosts_store() const { return impl_->hosts; }

std::string Rendezvous::store_address() const {
  return impl_->world.master_addr + ":" + std::to_string(impl_->port ? impl_->port : impl_->world.master_port);
}

std::string Rendezvous::store_host() const {
  const WorldInfo& w = impl_->world;
  if (!w.agent_store) return describe_rank(0);
  return w.launcher == "torchrun" ? "torchrun's agent on node 0" : "node 0's mmoc-run";
}

void Transport::send(const at::Tensor& t, int peer, const std::string& tag) { isend(t, peer, tag)->wait(); }
void Transport::recv(at::Tensor& out, int peer, const std::string& tag) { irecv(out, peer, tag)->wait(); }
void Transport::allreduce_sum(at::Tensor& t, const std::string& group) { iallreduce_sum(t, group)->wait(); }
void Transport::allreduce_max(at::Tensor& t, const std::string& group) { iallreduce_max(t, group)->wait(); }

uint32_t tag_to_int(const std::string& tag) {
  // FNV-1a 64-bit, then xor-fold the halves and keep 31 bits (gloo/c10d take a non-negative int tag).
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : tag) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return static_cast<uint32_t>((h ^ (h >> 32)) & 0x7fffffffu);
}

}  // namespace mmoc::comm
