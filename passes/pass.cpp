#include "passes/pass.hpp"

#include <algorithm>
#include <ostream>

#include "passes/analysis.hpp"

namespace mmoc {

int last_stage(const ir::Plan& p) { return p.num_stages() - 1; }

int insert_instr(ir::Program& p, int pos, ir::Instr in) {
  for (auto& x : p.instrs)
    for (auto& a : x.after) if (a >= pos) ++a;
  p.instrs.insert(p.instrs.begin() + pos, std::move(in));
  return pos;
}

void move_instr(ir::Program& p, int from, int to) {
  if (to == from) return;
  if (to > from) throw std::logic_error("move_instr moves instructions earlier only");
  // indices in [to, from) shift by +1; `from` becomes `to`
  auto remap = [&](int a) { return a == from ? to : (a >= to && a < from ? a + 1 : a); };
  for (auto& x : p.instrs)
    for (auto& a : x.after) a = remap(a);
  ir::Instr in = std::move(p.instrs[from]);
  p.instrs.erase(p.instrs.begin() + from);
  p.instrs.insert(p.instrs.begin() + to, std::move(in));
  for (auto& x : p.instrs) std::sort(x.after.begin(), x.after.end());
}

int find_compute(const ir::Program& p, ir::Op op, int stage, int mb) {
  for (int i = 0; i < (int)p.instrs.size(); ++i)
    if (p.instrs[i].op == op && p.instrs[i].stage == stage && p.instrs[i].mb == mb) return i;
  return -1;
}

ir::Instr make_compute(ir::Op op, int stage, int mb) {
  ir::Instr in;
  in.op = op;
  in.stream = ir::Stream::Comp;
  in.stage = stage;
  in.mb = mb;
  return in;
}

ir::Instr make_buf_op(ir::Op op, ir::Stream s, ir::BufRef b) {
  ir::Instr in;
  in.op = op;
  in.stream = s;
  in.buf = b;
  return in;
}

std::vector<Pass> default_pipeline() {
  return {{"partition", partition_pass},           {"cross-map", cross_map_pass},
          {"schedule", schedule_pass},             {"comm-lowering", comm_lowering_pass},
          {"offload-insertion", offload_insertion_pass}, {"overlap", overlap_pass},
          {"linearize", linearize_pass}};
}

std::vector<std::string> pass_names() {
  std::vector<std::string> n;
  for (const auto& p : default_pipeline()) n.push_back(p.name);
  return n;
}

void run_passes(PassContext& c, const std::vector<Pass>& passes, const PassManagerOptions& o) {
  for (const auto& pass : passes) {
    pass.run(c);
    if (o.verify) {
      // Structure: before schedule there are no programs yet; check what exists.
      if (!c.plan.programs.empty()) {
        auto problems = ir::verify_structure(c.plan);
        if (!problems.empty()) {
          std::string msg = "internal error: plan after pass '" + pass.name + "' is malformed:";
          for (size_t i = 0; i < problems.size() && i < 10; ++i) msg += "\n  " + problems[i];
          throw std::logic_error(msg);
        }
        std::string dl = verify_deadlock(c.plan, false);
        if (!dl.empty()) throw std::logic_error("internal error: after pass '" + pass.name + "': " + dl);
        if (pass.name == "linearize") {
          dl = verify_deadlock(c.plan, true);
          if (!dl.empty()) throw std::logic_error("internal error: after pass '" + pass.name + "': " + dl);
        }
      }
      if (c.memory_complete) verify_memory(c);
    }
    bool print = std::find(o.print_after.begin(), o.print_after.end(), pass.name) != o.print_after.end() ||
                 std::find(o.print_after.begin(), o.print_after.end(), "all") != o.print_after.end();
    if (print && o.print_stream) {
      *o.print_stream << "; ---- plan after " << pass.name << " ----\n";
      if (!c.plan.programs.empty() || !c.plan.stages.empty()) *o.print_stream << ir::print_text(c.plan);
    }
  }
}

}  // namespace mmoc
