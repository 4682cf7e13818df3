// The op table's memory effects against the engine: on one-GPU plans (every schedule with v stages, offload on and
// off, clipping) and on each of them with one memory instruction dropped or doubled, the replay of the op table
// (ir::replay_program: a buffer needed but absent, allocated twice, freed while absent, or left at the end) finds a
// problem exactly when the engine's interpreter (engine/exec/worker.cpp, CPU) fails the step. The valid plans also
// train the step to a finite loss.
#include <ATen/ATen.h>
#include "tests/torch_doctest.hpp"

#include <cmath>

#include "compiler/pipeline.hpp"
#include "engine/data/data.hpp"
#include "engine/exec/worker.hpp"
#include "ir/exec.hpp"
#include "ir/ops.hpp"

using namespace mmoc;

namespace {
const std::string kConfigs = MMOC_CONFIGS_DIR;

ir::Plan one_gpu_plan(int v, const std::string& sched, const std::string& offload, double clip) {
  JobConfig j;
  j.model = "tiny-8l";
  j.hardware = "cpu8";
  j.gpus = 1;
  j.v = std::to_string(v);
  j.micro_batch_size = 1;
  j.microbatches = 2;
  j.seq_len = 16;
  j.schedule = sched;
  j.offload = offload;
  j.budget_gib = 1;
  j.train.precision = "fp32";
  j.train.max_grad_norm = clip;
  ModelSpec m = load_model(j.model, kConfigs);
  HardwareSpec hw = load_hardware(j.hardware, kConfigs);
  return compile_job(j, m, hw, {}).plan;
}

engine::data::StepBatch batch_for(const ir::Plan& p) {
  engine::data::StepBatch b;
  b.seq_len = p.seq_len;
  b.micro_batch_size = p.micro_batch_size;
  for (int m = 0; m < p.microbatches; ++m) {
    std::vector<int64_t> ids, labels;
    for (int64_t t = 0; t < (int64_t)p.micro_batch_size * p.seq_len; ++t) {
      ids.push_back((7 * t + 3 * m + 1) % p.model.vocab);
      labels.push_back((7 * t + 3 * m + 8) % p.model.vocab);
    }
    b.input_ids.push_back(ids);
    b.labels.push_back(labels);
    for (int k = 0; k < p.micro_batch_size; ++k) b.rows.push_back(m * p.micro_batch_size + k);
  }
  return b;
}

// "" when the engine runs one step of the plan, else its error.
std::string engine_step(const ir::Plan& p, double* loss = nullptr) {
  try {
    engine::WorkerOptions o;
    o.device = "cpu";
    o.optim_threads = 1;
    engine::Worker w(p, 0, nullptr, o);
    w.init_random(1);
    engine::StepResult r = w.step(batch_for(p), 0);
    if (loss) *loss = r.loss;
    return "";
  } catch (const std::exception& e) {
    std::string s = e.what();
    return s.empty() ? "error" : s;
  }
}

std::string table_verdict(const ir::Plan& p) {
  ir::Replay r = ir::replay_program(p, 0);
  if (!r.problems.empty()) return r.problems[0];
  if (!r.leaked.empty()) return "leaks " + r.leaked[0].str();
  return "";
}

// The plan without instruction i (`after` references to it dropped, later ones shifted).
ir::Plan without(const ir::Plan& p, int i) {
  ir::Plan q = p;
  auto& ins = q.programs[0].instrs;
  ins.erase(ins.begin() + i);
  for (auto& in : ins) {
    std::vector<int> a;
    for (int x : in.after)
      if (x != i) a.push_back(x > i ? x - 1 : x);
    in.after = a;
  }
  return q;
}
// The plan with instruction i doubled (the copy right after it, with the same deps).
ir::Plan doubled(const ir::Plan& p, int i) {
  ir::Plan q = p;
  auto& ins = q.programs[0].instrs;
  ir::Instr copy = ins[i];
  for (auto& in : ins)
    for (auto& a : in.after)
      if (a > i) ++a;
  ins.insert(ins.begin() + i + 1, copy);
  return q;
}
// The instructions that only move memory (and the optimizer step, which on the GPU frees its gradient).
bool memory_op(const ir::Instr& in) {
  switch (in.op) {
    case ir::Op::Prefetch: case ir::Op::Evict: case ir::Op::Free: case ir::Op::LoadBatch: case ir::Op::Optim: return true;
    default: return false;
  }
}
}  // namespace

TEST_CASE("memory effects: the op table's replay fails exactly where the engine's interpreter fails") {
  int plans = 0, mutants = 0, failing = 0;
  struct Case { const char* sched; int v; const char* off; double clip; };
  for (const Case& c : {Case{"grouped", 3, "all", 0.0}, Case{"grouped", 3, "none", 1.0}, Case{"grouped", 3, "auto", 0.0},
                        Case{"gpipe", 1, "all", 1.0}, Case{"gpipe", 2, "none", 0.0}, Case{"grouped", 1, "all", 0.0}}) {
    const ir::Plan p = one_gpu_plan(c.v, c.sched, c.off, c.clip);
    const std::string sched = c.sched, off = c.off;
    CAPTURE(sched); CAPTURE(c.v); CAPTURE(off); CAPTURE(c.clip);
    REQUIRE(ir::verify_structure(p).empty());
    REQUIRE(table_verdict(p) == "");
    double loss = 0;
    REQUIRE(engine_step(p, &loss) == "");
    CHECK(std::isfinite(loss));
    ++plans;
    const auto& ins = p.programs[0].instrs;
    for (int i = 0; i < (int)ins.size(); ++i) {
      if (!memory_op(ins[i])) continue;
      for (int kind = 0; kind < 2; ++kind) {
        const ir::Plan q = kind == 0 ? without(p, i) : doubled(p, i);
        if (!ir::verify_structure(q).empty()) continue;  // not a memory fault
        const std::string mutation = (kind == 0 ? "without " : "doubled ") + ir::print_instr(ins[i], i);
        CAPTURE(mutation);
        const std::string t = table_verdict(q), e = engine_step(q);
        CAPTURE(t); CAPTURE(e);
        CHECK(t.empty() == e.empty());
        ++mutants;
        failing += !t.empty();
      }
    }
  }
  MESSAGE(plans << " plans, " << mutants << " mutants, " << failing << " of them memory faults");
  CHECK(plans == 6);
  CHECK(failing >= 20);
}
