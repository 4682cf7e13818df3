// CPU Transport over c10d::ProcessGroupGloo. Compiled only with MMOC_WITH_GLOO (gloo headers found).
#include "engine/comm/transport.hpp"

#ifndef MMOC_WITH_GLOO

namespace mmoc::comm {
bool gloo_available() { return false; }
std::unique_ptr<Transport> make_gloo_transport(std::shared_ptr<Rendezvous>, const GlooOptions&) {
  throw CommError("make_gloo_transport: this build has no gloo transport (gloo headers were not found at "
                  "configure time: apt-get install libgloo-dev and reconfigure)");
}
}  // namespace mmoc::comm

#else

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <cstdlib>
#include <map>
#include <mutex>

#include "engine/comm/rendezvous_impl.hpp"
#include "engine/comm/transport.hpp"

namespace mmoc::comm {
namespace {

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

// Wraps c10d work: keeps the tensors alive, copies a staged recv back, adds context to errors.
class GlooWork : public Work {
 public:
  GlooWork(std::vector<c10::intrusive_ptr<::c10d::Work>> works, std::string what, std::vector<at::Tensor> keep,
           std::vector<std::pair<at::Tensor, at::Tensor>> copy_back)
      : works_(std::move(works)), what_(std::move(what)), keep_(std::move(keep)), copy_back_(std::move(copy_back)) {}
  void wait() override {
    if (done_) return;
    try {
      for (auto& w : works_) w->wait();
    } catch (const std::exception& e) {
      throw CommError(what_ + " failed: " + first_line(e.what()));
    }
    for (auto& [dst, staged] : copy_back_) dst.copy_(staged);
    done_ = true;
  }
  bool is_completed() override {
    if (done_) return true;
    for (auto& w : works_)
      if (!w->isCompleted()) return false;
    wait();  // rethrows a failure, copies back
    return true;
  }

 private:
  std::vector<c10::intrusive_ptr<::c10d::Work>> works_;
  std::string what_;
  std::vector<at::Tensor> keep_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back_;
  bool done_ = false;
};

class GlooTransport : public Transport {
 public:
  GlooTransport(std::shared_ptr<Rendezvous> rdzv, const GlooOptions& o) : rdzv_(std::move(rdzv)) {
    const WorldInfo& w = rdzv_->world();
    rank_ = w.rank;
    world_size_ = w.world_size;
    opts_ = ::c10d::ProcessGroupGloo::Options::create(o.timeout);
    opts_->threads = o.threads;
    try {
      if (!o.hostname.empty()) {
        opts_->devices.push_back(::c10d::ProcessGroupGloo::createDeviceForHostname(o.hostname));
      } else if (is_loopback(w.master_addr)) {
        opts_->devices.push_back(::c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
        opts_->devices.push_back(::c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (std::string local = local_address_towards(w.master_addr); !local.empty()) {
        // the address this host uses to reach the store's host: reachable from the other nodes too (a host name
        // may resolve to a loopback address, as Debian's 127.0.1.1, which other nodes cannot reach)
        opts_->devices.push_back(::c10d::ProcessGroupGloo::createDeviceForHostname(local));
      } else {
        opts_->devices.push_back(::c10d::ProcessGroupGloo::createDefaultDevice());
      }
    } catch (const std::exception& e) {
      throw CommError("gloo: cannot create the transport device (" + who(w) + "): " + e.what());
    }
    prefix_ = rdzv_->next_prefix("gloo");
    std::vector<int> all(world_size_);
    for (int r = 0; r < world_size_; ++r) all[r] = r;
    add_group("", all);
  }

  const char* backend() const override { return "gloo"; }

  WorkPtr isend(const at::Tensor& t, int peer, const std::string& tag) override {
    return batch_isend_irecv({P2POp{P2POp::kSend, const_cast<at::Tensor*>(&t), peer, tag}});
  }
  WorkPtr irecv(at::Tensor& out, int peer, const std::string& tag) override {
    return batch_isend_irecv({P2POp{P2POp::kRecv, &out, peer, tag}});
  }

  WorkPtr batch_isend_irecv(const std::vector<P2POp>& ops) override {
    auto& pg = group("").pg;
    std::vector<c10::intrusive_ptr<::c10d::Work>> works;
    std::vector<at::Tensor> keep;
    std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
    std::string what;
    for (const auto& op : ops) {
      const bool is_send = op.kind == P2POp::kSend;
      std::string desc = std::string(is_send ? "send to " : "recv from ") + rdzv_->describe_rank(op.peer) +
                         " tag '" + op.tag + "' (" + who(rdzv_->world()) + ", gloo)";
      if (!what.empty()) what += "; ";
      what += desc;
      if (op.peer < 0 || op.peer >= world_size_ || op.peer == rank_)
        throw CommError(desc + ": invalid peer");
      if (!op.tensor || !op.tensor->defined()) throw CommError(desc + ": undefined tensor");
      if (!op.tensor->device().is_cpu())
        throw CommError(desc + ": the gloo transport takes CPU tensors, got " + op.tensor->device().str());
      int itag = checked_tag(op.peer, op.tag);
      at::Tensor t = *op.tensor;
      at::Tensor staged = t.is_contiguous() ? t : t.contiguous();
      if (!is_send && !t.is_contiguous()) copy_back.emplace_back(t, staged);
      std::vector<at::Tensor> v{staged};
      try {
        std::lock_guard<std::mutex> lk(issue_mu_);  // c10d's per-op bookkeeping is not thread-safe
        works.push_back(is_send ? pg->send(v, op.peer, itag) : pg->recv(v, op.peer, itag));
      } catch (const std::exception& e) {
        throw CommError(desc + " failed: " + first_line(e.what()));
      }
      keep.push_back(staged);
    }
    return std::make_unique<GlooWork>(std::move(works), what, std::move(keep), std::move(copy_back));
  }

  void create_group(const std::string& name, const std::vector<int>& ranks) override {
    if (name.empty() || name == "world") throw CommError("gloo: group name '" + name + "' is reserved");
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (groups_.count(name)) throw CommError("gloo: group '" + name + "' already exists");
    }
    for (size_t i = 0; i < ranks.size(); ++i)
      if (ranks[i] < 0 || ranks[i] >= world_size_ || (i > 0 && ranks[i] <= ranks[i - 1]))
        throw CommError("gloo: group '" + name + "': ranks must be sorted, distinct and in [0, " +
                        std::to_string(world_size_) + ")");
    add_group(name, ranks);
  }

  WorkPtr iallreduce_sum(at::Tensor& t, const std::string& group_name) override {
    return iallreduce(t, group_name, ::c10d::ReduceOp::SUM, "allreduce");
  }
  WorkPtr iallreduce_max(at::Tensor& t, const std::string& group_name) override {
    return iallreduce(t, group_name, ::c10d::ReduceOp::MAX, "allreduce (max)");
  }

  WorkPtr iallreduce(at::Tensor& t, const std::string& group_name, ::c10d::ReduceOp::RedOpType op, const char* name) {
    auto& g = member_group(group_name, "allreduce");
    std::string what = std::string(name) + " over group '" + group_name + "' (" + who(rdzv_->world()) + ", gloo)";
    if (!t.defined() || !t.device().is_cpu()) throw CommError(what + ": needs a defined CPU tensor");
    at::Tensor staged = t.is_contiguous() ? t : t.contiguous();
    std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
    if (!t.is_contiguous()) copy_back.emplace_back(t, staged);
    std::vector<at::Tensor> v{staged};
    ::c10d::AllreduceOptions ao;
    ao.reduceOp = ::c10d::ReduceOp(op);
    c10::intrusive_ptr<::c10d::Work> w;
    try {
      std::lock_guard<std::mutex> lk(issue_mu_);
      w = g.pg->allreduce(v, ao);
    } catch (const std::exception& e) {
      throw CommError(what + " failed: " + first_line(e.what()));
    }
    return std::make_unique<GlooWork>(std::vector<c10::intrusive_ptr<::c10d::Work>>{w}, what,
                                      std::vector<at::Tensor>{staged}, std::move(copy_back));
  }

  double allreduce_sum_double(double v, const std::string& group_name) override {
    at::Tensor t = at::full({1}, v, at::TensorOptions().dtype(at::kDouble));
    allreduce_sum(t, group_name);
    return t.item<double>();
  }

  void barrier(const std::string& group_name) override {
    auto& g = member_group(group_name, "barrier");
    std::string what = "barrier over group '" + group_name + "' (" + who(rdzv_->world()) + ", gloo)";
    try {
      c10::intrusive_ptr<::c10d::Work> w;
      {
        std::lock_guard<std::mutex> lk(issue_mu_);
        w = g.pg->barrier();
      }
      w->wait();
    } catch (const std::exception& e) {
      throw CommError(what + " failed: " + first_line(e.what()));
    }
  }

 private:
  struct Group {
    c10::intrusive_ptr<::c10d::ProcessGroupGloo> pg;  // null on non-members
    std::vector<int> ranks;
  };

  void add_group(const std::string& name, const std::vector<int>& ranks) {
    Group g;
    g.ranks = ranks;
    int idx = -1;
    for (size_t i = 0; i < ranks.size(); ++i)
      if (ranks[i] == rank_) idx = static_cast<int>(i);
    if (idx >= 0) {
      auto store = c10::make_intrusive<::c10d::PrefixStore>(prefix_ + "group/" + name + "/",
                                                            rdzv_->impl().store);
      try {
        g.pg = c10::make_intrusive<::c10d::ProcessGroupGloo>(store, idx, static_cast<int>(ranks.size()), opts_);
      } catch (const std::exception& e) {
        throw CommError("gloo: connecting group '" + name + "' (" + who(rdzv_->world()) + "): " + e.what());
      }
    }
    std::lock_guard<std::mutex> lk(mu_);
    groups_[name] = std::move(g);
  }

  Group& group(const std::string& name) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = groups_.find(name == "world" ? std::string() : name);
    if (it == groups_.end()) throw CommError("gloo: unknown group '" + name + "' (create_group it first)");
    return it->second;
  }
  Group& member_group(const std::string& name, const char* op) {
    Group& g = group(name);
    if (!g.pg)
      throw CommError(std::string("gloo: ") + op + " over group '" + name + "': " + who(rdzv_->world()) +
                      " is not a member");
    return g;
  }

  // tag -> int with a per-peer collision check (see transport.hpp).
  int checked_tag(int peer, const std::string& tag) {
    uint32_t v = tag_to_int(tag);
    std::lock_guard<std::mutex> lk(mu_);
    auto [it, inserted] = tags_[peer].emplace(v, tag);
    if (!inserted && it->second != tag)
      throw CommError("gloo: tags '" + it->second + "' and '" + tag + "' used with rank " + std::to_string(peer) +
                      " map to the same integer " + std::to_string(v) + "; rename one of them");
    return static_cast<int>(v);
  }

  std::shared_ptr<Rendezvous> rdzv_;
  c10::intrusive_ptr<::c10d::ProcessGroupGloo::Options> opts_;
  std::string prefix_;
  std::mutex mu_;        // groups_, tags_
  std::mutex issue_mu_;  // serializes calls into the ProcessGroupGloo
  std::map<std::string, Group> groups_;
  std::map<int, std::map<uint32_t, std::string>> tags_;
};

}  // namespace

bool gloo_available() { return true; }

std::unique_ptr<Transport> make_gloo_transport(std::shared_ptr<Rendezvous> rdzv, const GlooOptions& options) {
  if (!rdzv) throw CommError("make_gloo_transport: null rendezvous");
  return std::make_unique<GlooTransport>(std::move(rdzv), options);
}

}  // namespace mmoc::comm

#endif  // MMOC_WITH_GLOO
