#include "passes/pass.hpp"

#include <algorithm>
#include <ostream>

#include "passes/analysis.hpp"

#include <stdexcept>

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
  return {
      {"partition", partition_pass, kPartitionContract, {}},
      {"cross-map", cross_map_pass, kCrossMapContract, {}},
      {"schedule", schedule_pass, kScheduleContract, {}},
      {"comm-lowering", comm_lowering_pass, kCommLoweringContract, {}},
      {"tied-embeddings", tied_embeddings_pass, kTiedEmbeddingsContract, {}},
      {"offload-insertion", offload_insertion_pass, kOffloadInsertionContract, recover_offload_insertion},
      {"overlap", overlap_pass, kOverlapContract, recover_overlap},
      {"data-parallel", data_parallel_pass, kDataParallelContract, {}},
      {"tp-lowering", tp_lowering_pass, kTpLoweringContract, {}},
      {"linearize", linearize_pass, kLinearizeContract, recover_linearize},
  };
}

std::vector<std::string> pass_names() {
  std::vector<std::string> n;
  for (const auto& p : default_pipeline()) n.push_back(p.name);
  return n;
}

int pass_index(const std::string& name, const std::string& what) {
  const auto names = pass_names();
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return (int)i;
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
  throw InputError(what + ": unknown pass '" + name + "' (passes: " + list + ")");
}

void recover_context(PassContext& c, const std::string& last) {
  const int k = pass_index(last, "recover_context");
  const auto passes = default_pipeline();
  for (int i = 0; i <= k; ++i)
    if (passes[i].recover) passes[i].recover(c);
}

std::vector<InvariantChecker> default_invariant_checkers() {
  auto has_programs = [](const PassContext& c) { return !c.plan.programs.empty(); };
  return {
      {"structure", has_programs,
       [](const PassContext& c, const std::string& after) {
         auto problems = ir::verify_structure(c.plan);
         if (problems.empty()) return;
         std::string msg = "internal error: plan after pass '" + after + "' is malformed:";
         for (size_t i = 0; i < problems.size() && i < 10; ++i) msg += "\n  " + problems[i];
         throw std::logic_error(msg);
       },
       "ir::verify_structure (operands and streams of every op, send/recv matching, one forward and one backward per "
       "(stage, micro-batch), forward first), once the plan has programs"},
      {"deadlock (streams)", has_programs,
       [](const PassContext& c, const std::string& after) {
         std::string dl = verify_deadlock(c.plan, false);
         if (!dl.empty()) throw std::logic_error("internal error: after pass '" + after + "': " + dl);
       },
       "the untimed executor runs every program to the end, each stream in order (`verify_deadlock`), once the plan "
       "has programs"},
      {"deadlock (sequential)", [](const PassContext& c) { return c.linearized && !c.plan.programs.empty(); },
       [](const PassContext& c, const std::string& after) {
         std::string dl = verify_deadlock(c.plan, true);
         if (!dl.empty()) throw std::logic_error("internal error: after pass '" + after + "': " + dl);
       },
       "the same with each program one in-order queue (how the CPU engine runs it), once the programs are linearized"},
      {"memory", [](const PassContext& c) { return c.memory_complete; },
       [](const PassContext& c, const std::string&) { verify_memory(c); },
       "verify-memory: every GPU's timing-independent memory bound within the usable budget (an InputError naming "
       "the budget that would do), and every node's predicted host memory (with the NVMe tier's placement and staging; "
       "the tier's reads and writes paired) within its host_mem_gib and the plan's host budget (naming needed and "
       "available), once the plan's memory is explicit"},
  };
}

void PassManager::run(PassContext& c, const PassManagerOptions& o) const {
  for (const auto& pass : passes_) {
    pass.run(c);
    for (const auto& chk : checkers_)
      if (chk.applies(c)) chk.check(c, pass.name);
    bool print = std::find(o.print_after.begin(), o.print_after.end(), pass.name) != o.print_after.end() ||
                 std::find(o.print_after.begin(), o.print_after.end(), "all") != o.print_after.end();
    if (print && o.print_stream) {
      *o.print_stream << "; ---- plan after " << pass.name << " ----\n";
      if (!c.plan.programs.empty() || !c.plan.stages.empty()) *o.print_stream << ir::print_text(c.plan);
    }
  }
}

void run_passes(PassContext& c, const std::vector<Pass>& passes, const PassManagerOptions& o) {
  PassManager pm(passes);
  if (o.verify)
    for (auto& chk : default_invariant_checkers()) pm.add_invariant_checker(std::move(chk));
  pm.run(c, o);
}

std::string passes_markdown() {
  std::string s =
      "# mmoc compiler passes\n\n"
      "<!-- Generated from the passes' contract strings (passes/*.cpp) by `mmoc-compile --passes-doc`; the test\n"
      "     passes_doc fails when this file is out of date. Regenerate: "
      "`build/tools/compile/mmoc-compile --passes-doc > docs/passes.md`. -->\n\n"
      "`mmoc-compile` runs these passes in order (compiler/pipeline.cpp). After each pass the pass manager runs the\n"
      "invariant checkers registered with it:\n\n";
  for (const auto& chk : default_invariant_checkers()) s += "- **" + chk.name + "**: " + chk.doc + ".\n";
  s += "\n`--print-after=<pass>` prints the plan after a pass, `--stop-after=<pass>` writes it and stops, and\n"
       "`--start-after=<pass> --input <plan>` reads a plan written after that pass and runs the rest (as llc does):\n"
       "the state a later pass needs is rebuilt from the plan (each pass's *recovers from the plan* line).\n";
  int k = 1;
  for (const auto& p : default_pipeline()) {
    s += "\n## " + std::to_string(k++) + ". " + p.name + "\n\n" + p.contract;
    if (s.back() != '\n') s += "\n";
  }
  return s;
}

}  // namespace mmoc
