// Private to engine/comm: what a Rendezvous holds. Includes c10d headers.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>

#include "engine/comm/transport.hpp"

namespace mmoc::comm {

struct Rendezvous::Impl {
  WorldInfo world;
  std::chrono::milliseconds timeout{};
  c10::intrusive_ptr<::c10d::Store> store;
  std::mutex mu;
  std::map<std::string, int> prefix_counters;
};

// "rank 2 of 4" style context for messages.
std::string who(const WorldInfo& w);

}  // namespace mmoc::comm
