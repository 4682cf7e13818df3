// Executing a plan's programs together, the part every executor shares: the queues (each stream of each GPU in
// order, or each program as one queue), the `after` dependencies, and the pairing of ops that start together (the
// op table's Sync: send <-> recv). Two executors are built on it:
//   - the untimed one here (execute): runs every instruction that can run until none can; verify-deadlock;
//   - the timed one in cost/simulator.hpp: the same rules with durations from the cost model.
// Torch-free, depends on ir/ only.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "ir/ops.hpp"
#include "ir/plan.hpp"

namespace mmoc::ir {

// How a program's instructions are ordered: each (gpu, stream) an in-order queue (the GPU engine), or each program
// one in-order queue (the CPU engine runs it so).
enum class Order { Streams, Sequential };

// The partner of every paired instruction (Sync::PairSource <-> Sync::PairSink on the GPUs they name, matched by
// tag, or by buffer name when untagged, in program order): [gpu][instr] -> (gpu, instr); {-1, -1} when unmatched,
// the instruction itself when it is not a paired op.
std::vector<std::vector<std::pair<int, int>>> pair_partners(const Plan&);

class Dispatch {
 public:
  Dispatch(const Plan&, Order);

  const Plan& plan() const { return p_; }
  Order order() const { return order_; }
  int gpus() const { return (int)queues_.size(); }
  int queues(int g) const { return (int)queues_[g].size(); }  // Streams: one per stream; Sequential: 1
  int queue_of(int g, int i) const { return order_ == Order::Sequential ? 0 : (int)p_.programs[g].instrs[i].stream; }
  int head(int g, int q) const;         // the instruction at the head of queue q, -1 when the queue is drained
  bool busy(int g, int q) const { return running_[g][q] >= 0; }  // started and not finished
  int running(int g, int q) const { return running_[g][q]; }
  bool deps_done(int g, int i) const;   // every `after` of the instruction has finished
  bool ready(int g, int i) const;       // at the head of an idle queue and its deps done
  // The instruction it starts together with (Sync::Pair), {-1, -1} when unmatched, {g, i}'s own when unpaired.
  std::pair<int, int> partner(int g, int i) const { return partner_[g][i]; }
  bool paired(int g, int i) const { return op_info(p_.programs[g].instrs[i].op).sync != Sync::None; }
  // Ready, and when paired, matched with a ready partner.
  bool startable(int g, int i) const;
  void start(int g, int i);
  void finish(int g, int i);
  bool started(int g, int i) const { return state_[g][i] >= 1; }
  bool finished(int g, int i) const { return state_[g][i] == 2; }
  size_t remaining() const { return remaining_; }
  // Why (g, i) cannot start, for reports: unfinished deps, an unmatched or unready partner.
  std::vector<int> waiting_deps(int g, int i) const;

 private:
  const Plan& p_;
  Order order_;
  std::vector<std::vector<std::vector<int>>> queues_;  // [gpu][queue] instruction indices in order
  std::vector<std::vector<size_t>> head_;              // [gpu][queue] position of the head
  std::vector<std::vector<int>> running_;              // [gpu][queue] started and unfinished, -1 none
  std::vector<std::vector<char>> state_;               // [gpu][instr] 0 waiting, 1 running, 2 finished
  std::vector<std::vector<std::pair<int, int>>> partner_;
  size_t remaining_ = 0;
};

// The untimed executor: starts and finishes everything that can run, until nothing can. `on_run` (optional) is
// called for each instruction in the order they run (a rendezvous pair one after the other).
struct Execution {
  bool complete = false;
  size_t remaining = 0;     // instructions that could not run
  std::string report;       // "" when complete, else what is stuck (each blocked queue head and what it waits for)
};
Execution execute(const Plan&, Order, const std::function<void(int gpu, int instr)>& on_run = {});

// Replays one program in its order, applying each instruction's effects (ops.hpp) to the set of buffers on its GPU
// (starting from the persistent ones): the problems met ("g<k> %<i>: needs B ...", "... allocated while already
// present", "... freed but not present") and the buffers left at the end that are not persistent (leaks; the
// engine's end-of-step check is the same rule).
struct Replay {
  std::vector<std::string> problems;
  std::vector<BufRef> leaked;
};
Replay replay_program(const Plan&, int gpu);

}  // namespace mmoc::ir
