// Rendezvous (c10d::TCPStore), the Transport's blocking wrappers and tag_to_int.
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "engine/comm/rendezvous_impl.hpp"
#include "engine/comm/transport.hpp"

namespace mmoc::comm {

std::string who(const WorldInfo& w) {
  return "rank " + std::to_string(w.rank) + " of " + std::to_string(w.world_size);
}

Rendezvous::Rendezvous(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Rendezvous::~Rendezvous() = default;

std::shared_ptr<Rendezvous> Rendezvous::connect(const WorldInfo& world, std::chrono::milliseconds timeout) {
  auto impl = std::make_unique<Impl>();
  impl->world = world;
  impl->timeout = timeout;
  ::c10d::TCPStoreOptions o;
  o.port = static_cast<std::uint16_t>(world.master_port);
  o.isServer = world.rank == 0;
  o.numWorkers = static_cast<std::size_t>(world.world_size);
  o.waitWorkers = true;
  o.timeout = timeout;
  try {
    impl->store = c10::make_intrusive<::c10d::TCPStore>(world.master_addr, o);
  } catch (const std::exception& e) {
    throw CommError("rendezvous failed (" + who(world) + ", " + (o.isServer ? "hosting" : "joining") +
                    " the TCPStore at " + world.master_addr + ":" + std::to_string(world.master_port) +
                    ", timeout " + std::to_string(timeout.count()) + " ms): " + e.what());
  }
  return std::shared_ptr<Rendezvous>(new Rendezvous(std::move(impl)));
}

const WorldInfo& Rendezvous::world() const { return impl_->world; }
std::chrono::milliseconds Rendezvous::timeout() const { return impl_->timeout; }

void Rendezvous::set(const std::string& key, const std::string& value) {
  impl_->store->set(key, std::vector<uint8_t>(value.begin(), value.end()));
}

std::string Rendezvous::get(const std::string& key) {
  try {
    auto v = impl_->store->get(key);
    return std::string(v.begin(), v.end());
  } catch (const std::exception& e) {
    throw CommError("rendezvous: waiting for key '" + key + "' (" + who(impl_->world) + ", timeout " +
                    std::to_string(impl_->timeout.count()) + " ms): " + e.what());
  }
}

int64_t Rendezvous::add(const std::string& key, int64_t delta) { return impl_->store->add(key, delta); }

std::string Rendezvous::next_prefix(const std::string& what) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  int n = impl_->prefix_counters[what]++;
  return "mmoc/" + what + "/" + std::to_string(n) + "/";
}

void Transport::send(const at::Tensor& t, int peer, const std::string& tag) { isend(t, peer, tag)->wait(); }
void Transport::recv(at::Tensor& out, int peer, const std::string& tag) { irecv(out, peer, tag)->wait(); }
void Transport::allreduce_sum(at::Tensor& t, const std::string& group) { iallreduce_sum(t, group)->wait(); }

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
