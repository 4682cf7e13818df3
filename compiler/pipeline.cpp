#include "compiler/pipeline.hpp"

#include <chrono>
#include <cmath>
#include <optional>
#include <cstdio>
#include <ostream>
#include <sstream>

#include "common/format.hpp"
#include "cost/host_memory.hpp"
#include "ir/ops.hpp"
#include "passes/pass.hpp"

namespace mmoc {

void validate_job(const JobConfig& j, const ModelSpec& m, const HardwareSpec& hw) {
  if (j.gpus < 1) throw InputError("--gpus must be >= 1 (got " + std::to_string(j.gpus) + ")");
  if (j.gpus > hw.gpus)
    throw InputError("--gpus " + std::to_string(j.gpus) + " but hardware '" + hw.name + "' has " + std::to_string(hw.gpus) + " GPU(s)");
  if (j.micro_batch_size < 1) throw InputError("--micro-batch-size must be >= 1");
  if (j.microbatches < 1) throw InputError("--microbatches must be >= 1");
  // data parallelism: dp replicas of the pipeline, each on 1/dp of the step's micro-batches; tensor parallelism: tp
  // shards of every pipeline rank
  if (j.dp < 1) throw InputError("--dp must be >= 1 (got " + std::to_string(j.dp) + ")");
  if (j.tp < 1) throw InputError("--tp must be >= 1 (got " + std::to_string(j.tp) + ")");
  if (j.layout != "" && j.layout != "auto") throw InputError("--layout must be auto (got '" + j.layout + "')");
  if (j.layout.empty() && (j.dp > 1 || j.tp > 1) && (int64_t)j.gpus * j.dp * j.tp > hw.gpus)
    throw InputError("layout pp x dp x tp = " + std::to_string(j.gpus) + " x " + std::to_string(j.dp) + " x " + std::to_string(j.tp) +
                     " = " + std::to_string(j.gpus * j.dp * j.tp) + " ranks, but hardware '" + hw.name + "' has " +
                     std::to_string(hw.gpus) + " GPU(s)");
  if (!j.nvme.empty() && (j.dp > 1 || j.tp > 1))
    throw InputError("--nvme (the NVMe tier) with --dp " + std::to_string(j.dp) + " --tp " + std::to_string(j.tp) +
                     " is not supported: the tier holds whole stages of one pipeline (use --dp 1 --tp 1, or leave out --nvme)");
  if (j.tp > 1) (void)with_tp(m, j.tp);  // tp divides heads, kv heads and ffn (InputError naming the HF key)
  if (j.microbatches % j.dp != 0)
    throw InputError("--dp " + std::to_string(j.dp) + " does not divide the batch: " + std::to_string(j.microbatches) +
                     " micro-batches per step cannot be split evenly over " + std::to_string(j.dp) +
                     " data-parallel replicas (use a multiple of " + std::to_string(j.dp) + ")");
  if (j.seq_len < 2) throw InputError("--seq-len must be >= 2");
  if (j.seq_len > m.max_seq)
    throw InputError("--seq-len " + std::to_string(j.seq_len) + " exceeds " + m.name + "'s maximum " + std::to_string(m.max_seq));
  if (j.budget_gib < 0) throw InputError("--budget must be positive");
  if (j.budget_gib > hw.gpu_mem_gib + 1e-9)
    throw InputError("--budget " + gib(j.budget_gib * GiB) + " exceeds the " + gib(hw.gpu_mem_gib * GiB) + " of a GPU of '" + hw.name + "'");
  if (j.v != "auto") {
    int v = 0;
    try { size_t k; v = std::stoi(j.v, &k); if (k != j.v.size()) v = 0; } catch (...) { v = 0; }
    if (v < 1) throw InputError("--v must be a positive integer or 'auto' (got '" + j.v + "')");
  }
  if (j.recompute != "auto" && j.recompute != "on" && j.recompute != "off")
    throw InputError("recompute must be auto, on or off (got '" + j.recompute + "')");
  if (j.selective != "auto" && j.selective != "on" && j.selective != "off")
    throw InputError("selective must be auto, on or off (got '" + j.selective + "')");
  if (j.offload != "auto" && j.offload != "all" && j.offload != "none")
    throw InputError("offload must be auto, all or none (got '" + j.offload + "')");
  if (j.cross_map != "auto" && j.cross_map != "off") throw InputError("cross_map must be auto or off (got '" + j.cross_map + "')");
  if (j.train.precision != "bf16" && j.train.precision != "fp32")
    throw InputError("precision must be bf16 or fp32 (got '" + j.train.precision + "')");
  if (j.train.lr_schedule != "constant" && j.train.lr_schedule != "linear" && j.train.lr_schedule != "cosine")
    throw InputError("lr_schedule must be constant, linear or cosine (got '" + j.train.lr_schedule + "')");
}

ir::Plan initial_plan(const JobConfig& j, const ModelSpec& m, const HardwareSpec& hw, int v, const std::string& schedule) {
  ir::Plan p;
  p.hardware = hw.name;
  p.schedule = schedule;
  p.gpus = j.gpus;
  p.v = v;
  p.dp = j.dp;
  p.tp = j.tp;
  p.microbatches = j.microbatches / std::max(1, j.dp);  // per replica
  p.micro_batch_size = j.micro_batch_size;
  p.seq_len = j.seq_len;
  double budget = j.budget_gib > 0 ? j.budget_gib : hw.gpu_mem_gib;
  p.budget_bytes = (int64_t)(budget * GiB);
  // NVMe tier: each path's share of an object is 1 / (1/read + 1/write) of its measured bandwidths
  // (engine/tier/stripe.hpp's path_weight); a path the hardware file has not measured gets weight 1
  p.host_budget_bytes = (int64_t)(j.host_budget_gib * GiB);
  p.nvme = j.nvme;
  if (!j.nvme.empty()) {
    for (const auto& path : j.nvme) {
      double w = 1.0;
      for (const auto& sp : hw.storage)
        if (sp.path == path && sp.read_gbps > 0 && sp.write_gbps > 0) w = 1.0 / (1.0 / sp.read_gbps + 1.0 / sp.write_gbps);
      p.nvme_weights.push_back(w);
    }
  }
  p.model = m.arch();
  p.train = j.train;
  return p;
}

namespace {
// Runs the default pipeline's passes after `start_after` ("" = from the first) up to and including `stop_after`
// ("" = to the end) on c, then, when the pipeline ran to its end, times the plan and fills its predicted section.
CompileResult run_pipeline(PassContext& c, const std::string& start_after, const CompileOptions& o,
                           std::chrono::steady_clock::time_point t0) {
  const auto all = default_pipeline();
  const int first = start_after.empty() ? 0 : pass_index(start_after, "--start-after") + 1;
  const int last = o.stop_after.empty() ? (int)all.size() - 1 : pass_index(o.stop_after, "--stop-after");
  if (last < first - 1)
    throw InputError("--stop-after=" + o.stop_after + " comes before --start-after=" + start_after);
  PassManagerOptions pm;
  pm.print_after = o.print_after;
  pm.print_stream = o.print_stream;
  run_passes(c, std::vector<Pass>(all.begin() + first, all.begin() + last + 1), pm);
  CompileResult r;
  r.stopped = last < (int)all.size() - 1;
  if (!r.stopped) {
    r.sim = simulate(c.plan, c.hw, c.model);
    if (r.sim.deadlock) throw std::logic_error("internal error: simulated deadlock after verification:\n" + r.sim.deadlock_report);
    MemoryBound mb = memory_bound(c.plan);
    annotate_prediction(c.plan, r.sim);
    if (c.plan.predicted) c.plan.predicted->bound_bytes = mb.bound;
    r.bound = mb.bound;
  }
  c.plan.host_bytes.clear();
  if (c.memory_complete)  // the plan records each rank's predicted host memory (verify-memory checked it)
    for (const auto& h : predict_host_memory(c.plan, host_memory_options(c.hw, c.plan))) c.plan.host_bytes.push_back(h.total());
  r.plan = std::move(c.plan);
  r.notes = std::move(c.notes);
  r.compile_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace

CompileResult compile_one(const JobConfig& j, const ModelSpec& m, const HardwareSpec& hw, int v, const std::string& schedule,
                          const CompileOptions& o) {
  auto t0 = std::chrono::steady_clock::now();
  PassContext c(j, m, hw);
  c.plan = initial_plan(j, m, hw, v, schedule);
  return run_pipeline(c, "", o, t0);
}

JobConfig job_of_plan(const JobConfig& knobs, const ir::Plan& p) {
  JobConfig j = knobs;
  j.gpus = p.gpus;
  j.v = std::to_string(p.v);
  j.schedule = p.schedule;
  j.dp = p.dp;
  j.tp = p.tp;
  j.layout.clear();
  j.microbatches = p.microbatches * std::max(1, p.dp);
  j.micro_batch_size = p.micro_batch_size;
  j.seq_len = p.seq_len;
  j.budget_gib = (double)p.budget_bytes / GiB;
  j.host_budget_gib = (double)p.host_budget_bytes / GiB;
  j.nvme = p.nvme;
  j.train = p.train;
  return j;
}

CompileResult compile_from(const JobConfig& j, const ModelSpec& m, const HardwareSpec& hw, ir::Plan plan,
                           const std::string& start_after, const CompileOptions& o) {
  auto t0 = std::chrono::steady_clock::now();
  pass_index(start_after, "--start-after");
  if (plan.hardware != hw.name)
    throw InputError("the plan was made for hardware '" + plan.hardware + "', not '" + hw.name + "'");
  if (!(plan.model == m.arch()))
    throw InputError("the plan's model '" + plan.model.name + "' is not the model '" + m.name + "' (its architecture differs)");
  // the passes up to start_after have made the stages (partition) and, from schedule on, the programs
  const bool with_programs = pass_index(start_after, "--start-after") >= pass_index("schedule", "");
  auto problems = ir::verify_structure(plan, with_programs);
  if (!with_programs && !plan.programs.empty()) problems.push_back("plan: programs before the schedule pass");
  if (!problems.empty()) {
    std::string msg = "the plan is malformed (" + std::to_string(problems.size()) + " problem(s)):";
    for (size_t i = 0; i < problems.size() && i < 10; ++i) msg += "\n  " + problems[i];
    throw InputError(msg);
  }
  validate_job(j, m, hw);
  PassContext c(j, m, hw);
  c.plan = std::move(plan);
  c.plan.predicted.reset();
  recover_context(c, start_after);
  // the plan must hold what the passes up to start_after guarantee: the checkers that apply to it pass
  for (const auto& chk : default_invariant_checkers())
    if (chk.applies(c)) {
      try {
        chk.check(c, start_after);
      } catch (const std::exception& e) {
        throw InputError("the plan is not one that --start-after=" + start_after + " can continue (" + chk.name +
                         " check): " + e.what());
      }
    }
  return run_pipeline(c, start_after, o, t0);
}

namespace {
// What the search chose from: "v auto, schedule auto, recompute auto, offload auto" (fixed knobs named as given).
std::string describe_search(const JobConfig& j) {
  return "v " + j.v + ", schedule " + j.schedule + ", recompute " + j.recompute + ", selective " + j.selective +
         ", offload " + j.offload;
}
}  // namespace

namespace {
// --layout auto: every pp x dp x tp over the job's `gpus` GPUs that the model and the batch allow (tp dividing heads,
// kv heads and ffn; dp dividing the micro-batches; pp at most the model's layers), each compiled with the job's own
// search (v, schedule, recompute, offload); the fastest simulated step that fits the budget and the host wins.
CompileResult compile_layout_auto(const JobConfig& j, const ModelSpec& m, const HardwareSpec& hw, const CompileOptions& o) {
  if (j.dp != 1 || j.tp != 1)
    throw InputError("--layout auto chooses dp and tp itself: leave out --dp " + std::to_string(j.dp) + " / --tp " + std::to_string(j.tp));
  JobConfig base = j;
  base.layout.clear();
  validate_job(base, m, hw);  // gpus within the hardware, the other knobs
  const auto t0 = std::chrono::steady_clock::now();
  const int N = j.gpus;
  CompileResult best;
  bool have = false;
  int tried = 0, layouts = 0;
  std::string reasons;
  std::optional<BudgetError> budget_refusal;
  std::optional<HostMemoryError> host_refusal;
  for (int tp = 1; tp <= N; ++tp) {
    if (N % tp) continue;
    for (int dp = 1; dp <= N / tp; ++dp) {
      if ((N / tp) % dp) continue;
      const int pp = N / tp / dp;
      const std::string name = "pp " + std::to_string(pp) + " x dp " + std::to_string(dp) + " x tp " + std::to_string(tp);
      JobConfig c = base;
      c.gpus = pp;
      c.dp = dp;
      c.tp = tp;
      if (j.microbatches % dp || pp > m.num_model_layers()) continue;
      try {
        if (tp > 1) (void)with_tp(m, tp);
      } catch (const InputError&) { continue; }
      ++layouts;
      try {
        CompileResult r = compile_job(c, m, hw, CompileOptions{});
        tried += r.candidates;
        if (o.progress) *o.progress << "  layout " << name << ": " << r.sim.step_ms / 1000.0 << " s/step (v=" << r.plan.v << ", " << r.plan.schedule << ")\n";
        if (!have || r.sim.step_ms < best.sim.step_ms) { best = std::move(r); have = true; }
      } catch (const BudgetError& e) {
        if (!budget_refusal || e.smallest_budget < budget_refusal->smallest_budget) budget_refusal = e;
        reasons += "\n  " + name + ": " + e.what();
        if (o.progress) *o.progress << "  layout " << name << ": does not fit the budget\n";
      } catch (const HostMemoryError& e) {
        if (!host_refusal || e.needed < host_refusal->needed) host_refusal = e;
        reasons += "\n  " + name + ": " + e.what();
        if (o.progress) *o.progress << "  layout " << name << ": host memory " << gib_at_least(e.needed) << "\n";
      } catch (const InputError& e) {
        reasons += "\n  " + name + ": " + e.what();
        if (o.progress) *o.progress << "  layout " << name << ": infeasible\n";
      }
    }
  }
  if (!have) {
    const std::string among = "--layout auto: no feasible layout of " + std::to_string(N) + " GPU(s) among " + std::to_string(layouts) +
                              " (pp x dp x tp with tp dividing heads, kv heads and ffn and dp dividing " + std::to_string(j.microbatches) +
                              " micro-batches)";
    if (layouts == 0) throw InputError(among);
    if (budget_refusal && !host_refusal) throw BudgetError(among + ":" + reasons, budget_refusal->smallest_budget);
    if (host_refusal && !budget_refusal) throw HostMemoryError(among + ":" + reasons, host_refusal->needed, host_refusal->available);
    throw InputError(among + ":" + reasons);
  }
  if (!o.print_after.empty() || !o.stop_after.empty()) {  // the winner again, printing / stopping where asked
    JobConfig w = job_of_plan(base, best.plan);
    best = compile_one(w, m, hw, best.plan.v, best.plan.schedule, o);
  }
  best.candidates = tried;
  best.compile_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return best;
}
}  // namespace

CompileResult compile_job(const JobConfig& j, const ModelSpec& m, const HardwareSpec& hw, const CompileOptions& o) {
  if (j.layout == "auto") return compile_layout_auto(j, m, hw, o);
  validate_job(j, m, hw);
  auto t0 = std::chrono::steady_clock::now();
  const int maxv = m.num_model_layers() / j.gpus;
  std::vector<int> vs;
  if (j.v == "auto") {
    for (int v : {1, 2, 3, 4, 6, 8, 12, 16}) if (v <= maxv) vs.push_back(v);
    if (maxv >= 1 && (vs.empty() || vs.back() != maxv)) vs.push_back(maxv);
  } else {
    vs.push_back(std::stoi(j.v));
  }
  std::vector<std::string> scheds;
  if (j.schedule == "auto") scheds = schedule_names();
  else scheds.push_back(j.schedule);
  if (vs.size() == 1 && scheds.size() == 1) return compile_one(j, m, hw, vs[0], scheds[0], o);

  CompileResult best;
  bool have = false;
  int tried = 0;
  // Why candidates were refused: the smallest GPU budget any of them would fit (with its candidate), and the
  // smallest host memory any needed (GPU fits, host does not). Other refusals: the last one's message.
  struct Refusal { int64_t budget = -1; int v = 0; std::string schedule, why; };
  Refusal gpu;
  std::optional<HostMemoryError> host;
  std::optional<NvmeSpaceError> nvme;  // the smallest lack of NVMe space (the tier's paths) any candidate had
  std::string last_error;
  for (int v : vs)
    for (const auto& s : scheds) {
      try {
        check_schedule(s, j.gpus, v, j.microbatches / std::max(1, j.dp));
        if (v * j.gpus > m.num_model_layers()) continue;
      } catch (const InputError&) { continue; }
      ++tried;
      try {
        CompileOptions quiet;  // no printing during search
        CompileResult r = compile_one(j, m, hw, v, s, quiet);
        if (o.progress)
          *o.progress << "  candidate v=" << v << " schedule=" << s << ": " << r.sim.step_ms / 1000.0 << " s/step\n";
        if (!have || r.sim.step_ms < best.sim.step_ms) { best = std::move(r); have = true; }
      } catch (const BudgetError& e) {
        if (gpu.budget < 0 || e.smallest_budget < gpu.budget) gpu = {e.smallest_budget, v, s, e.what()};
        if (o.progress)
          *o.progress << "  candidate v=" << v << " schedule=" << s << ": needs a budget of " << gib_at_least(e.smallest_budget) << "\n";
      } catch (const HostMemoryError& e) {
        if (!host || e.needed < host->needed) host = e;
        if (o.progress) *o.progress << "  candidate v=" << v << " schedule=" << s << ": host memory " << gib_at_least(e.needed) << "\n";
      } catch (const NvmeSpaceError& e) {
        if (!nvme || e.missing < nvme->missing) nvme = e;
        if (o.progress) *o.progress << "  candidate v=" << v << " schedule=" << s << ": NVMe space " << gib_at_least(e.missing) << " short\n";
      } catch (const InputError& e) {
        last_error = e.what();
        if (o.progress) *o.progress << "  candidate v=" << v << " schedule=" << s << ": infeasible (" << e.what() << ")\n";
      }
    }
  // no (v, schedule) the schedules and the model allow: compile the first as given, for its own error
  if (tried == 0) return compile_one(j, m, hw, vs[0], scheds[0], o);
  if (!have) {
    const std::string among = "no feasible plan among " + std::to_string(tried) + " candidates (" + describe_search(j) + ")";
    if (gpu.budget > 0) {
      // the smallest budget over every candidate; at it, that candidate must also fit the host
      const std::string at = "v=" + std::to_string(gpu.v) + ", schedule " + gpu.schedule;
      if (gpu.budget > (int64_t)std::floor(hw.gpu_mem_gib * GiB) && !host)
        throw BudgetError(among + ": the smallest budget over all of them is " + gib_at_least(gpu.budget) + " (" + at + "), more than the " +
                          gib(hw.gpu_mem_gib * GiB) + " of a GPU of '" + hw.name + "'; use more GPUs, a smaller --micro-batch-size or --seq-len",
                          gpu.budget);
      if (gpu.budget <= (int64_t)std::floor(hw.gpu_mem_gib * GiB)) {
        JobConfig at_budget = j;
        at_budget.budget_gib = std::ceil(double(gpu.budget) / GiB * 100.0) / 100.0;  // as the message names it
        std::optional<HostMemoryError> host_there;
        bool fits = false;
        try {
          (void)compile_one(at_budget, m, hw, gpu.v, gpu.schedule, CompileOptions{});
          fits = true;
        } catch (const HostMemoryError& e) {
          host_there = e;
        } catch (const InputError&) {
        }
        if (fits || !host_there)
          throw BudgetError(among + ": the smallest budget that fits is " + gib_at_least(gpu.budget) + " per GPU (" + at +
                            "); raise --budget, lower --micro-batch-size or --seq-len, or add GPUs",
                            gpu.budget);
        if (host_there && (!host || host_there->needed < host->needed)) host = host_there;
      }
    }
    // a candidate that fits the host but not the tier's disks is the nearer miss: more disk space makes it run
    if (nvme)
      throw NvmeSpaceError(among + ": the NVMe tier is too small: " + std::string(nvme->what()) +
                               (host ? std::string("; the other candidates need more host memory: ") + host->what() : std::string()),
                           nvme->missing);
    if (host)
      throw HostMemoryError(among + ": the host is too small: " + std::string(host->what()) +
                                "; use a host with more memory, more GPUs (more state on them), or a larger --budget",
                            host->needed, host->available);
    throw InputError(among + "; last reason: " + last_error);
  }
  if (!o.print_after.empty() || !o.stop_after.empty()) {
    // re-run the winner with printing on / stopping where asked
    best = compile_one(j, m, hw, best.plan.v, best.plan.schedule, o);
  }
  best.candidates = tried;
  best.compile_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return best;
}

std::string summary(const CompileResult& r, const ModelSpec& m, const HardwareSpec& hw) {
  const auto& p = r.plan;
  std::ostringstream os;
  char buf[512];
  std::string order;
  for (int x : p.gpu_order) order += (order.empty() ? "" : ",") + std::to_string(x);
  std::snprintf(buf, sizeof buf, "plan: %s on %s, %d GPU(s) (physical order %s), schedule %s, v=%d, %d micro-batches of %dx%d tokens\n",
                m.name.c_str(), hw.name.c_str(), p.gpus, order.c_str(), p.schedule.c_str(), p.v, p.microbatches,
                p.micro_batch_size, p.seq_len);
  os << buf;
  if (ir::world_size(p) > 1) {  // the links of the mapping (cross-map): each group's GPUs and its slowest link
    const std::string links = describe_layout_links(hw, p);
    if (!links.empty()) os << "links (slowest per group): " << links << "\n";
  }
  if (p.dp > 1 || p.tp > 1) {
    std::snprintf(buf, sizeof buf, "layout: pp %d x dp %d x tp %d = %d ranks (each replica runs the programs below on %d of the step's %d micro-batches",
                  p.gpus, p.dp, p.tp, ir::world_size(p), p.microbatches, p.microbatches * p.dp);
    os << buf;
    if (p.tp > 1) os << "; each of a pipeline rank's " << p.tp << " tensor-parallel shards holds 1/" << p.tp << " of its stages (params below are per shard)";
    os << ")\n";
  }
  if (p.dp > 1) {  // the data-parallel gradient reduction: collectives per step, stages in buckets (data-parallel pass)
    int colls = 0, bucketed = 0, most = 0;
    int64_t largest = 0;
    for (const auto& prog : p.programs)
      for (const auto& in : prog.instrs)
        if ((in.op == ir::Op::AllReduce || in.op == ir::Op::ReduceScatter) && in.buf && in.buf->kind == ir::BufKind::WGrad) {
          ++colls;
          bucketed += in.buckets > 1 && in.bucket == 0;
          most = std::max(most, in.buckets);
          largest = std::max(largest, ir::transfer_bytes(p, in));
        }
    std::snprintf(buf, sizeof buf, "gradient reduction: %d collective(s) per step on the dp groups; %d of %d stage(s) in buckets (at most %d, the largest %.1f MiB)\n",
                  colls, bucketed, p.num_stages(), std::max(most, 1), (double)largest / (1 << 20));
    os << buf;
  }
  os << "stages:\n";
  for (const auto& s : p.stages) {
    // partial recompute: "rc k/n" (the first k of its n layers recompute)
    // selective recompute inside the kept layers: "+sel"
    const std::string rc = (!s.recompute ? std::string() : s.keep_layers == 0 ? std::string("recompute")
                            : "rc " + std::to_string(s.recompute_layers()) + "/" + std::to_string(s.layers())) +
                           (s.selective ? (s.recompute ? "+sel" : "sel") : "");
    std::snprintf(buf, sizeof buf, "  S%-3d rank g%d (GPU %d)  layers %3d-%-3d %7.3fB params  %-8s %-9s  fwd %8.2f ms  bwd %8.2f ms\n",
                  s.id, s.gpu, ir::physical_gpu(p, ir::world_rank(p, s.gpu, 0, 0)), s.layer_begin, s.layer_end - 1,
                  s.params / 1e9, s.weights == ir::Residency::Resident ? "resident" : "offload",
                  rc.c_str(), s.fwd_ms, s.bwd_ms);
    os << buf;
  }
  std::snprintf(buf, sizeof buf, "predicted: step %.3f s, %.0f tokens/s, bubble %.1f%%\n", r.sim.step_ms / 1000.0,
                r.sim.tokens_per_s, 100.0 * r.sim.bubble);
  os << buf;
  if (!p.nvme.empty()) {  // NVMe tier (docs/nvme-tier.md)
    int on = 0;
    int64_t bytes = 0;
    for (const auto& d : p.buffers)
      if (d.kind == ir::BufKind::Opt && d.home == ir::Tier::Nvme) { ++on; bytes += d.bytes; }
    std::snprintf(buf, sizeof buf, "nvme tier: optimizer state of %d stage(s) on %zu path(s) (%s), %.2f GB read + %.2f GB written per step\n",
                  on, p.nvme.size(), gib((double)bytes).c_str(), r.sim.tier_read_bytes / 1e9, r.sim.tier_write_bytes / 1e9);
    os << buf;
    if (ir::num_bodies(p) == 2) {  // the alternating update order (passes/update_order.cpp)
      std::snprintf(buf, sizeof buf,
                    "update order: alternate (even steps %.3f s, %lld bytes of tier I/O; odd steps %.3f s, %lld bytes; kept in host "
                    "memory between steps: opt of %zu + %zu stages)\n",
                    r.sim.even_step_ms / 1000.0, (long long)r.sim.even_tier_bytes, r.sim.odd_step_ms / 1000.0,
                    (long long)r.sim.odd_tier_bytes, p.carry_odd.size(), p.carry_even.size());
      os << buf;
    }
  }
  os << "memory per GPU (budget " << gib((double)p.budget_bytes) << "):\n";
  for (int g = 0; g < p.gpus; ++g) {
    std::snprintf(buf, sizeof buf, "  g%d  simulated peak %s  bound %s  (%.0f%% of budget)\n", g,
                  gib((double)(g < (int)r.sim.peak_bytes.size() ? r.sim.peak_bytes[g] : 0)).c_str(),
                  gib((double)(g < (int)r.bound.size() ? r.bound[g] : 0)).c_str(),
                  p.budget_bytes > 0 && g < (int)r.bound.size() ? 100.0 * r.bound[g] / p.budget_bytes : 0.0);
    os << buf;
  }
  if (!p.host_bytes.empty()) {  // the one host-memory model (cost/host_memory.hpp), with the NVMe tier's staging
    const auto host = predict_host_memory(p, host_memory_options(hw, p));
    os << "host memory per rank (node has " << gib(hw.host_mem_gib * GiB)
       << (p.host_budget_bytes > 0 ? ", --host-budget " + gib((double)p.host_budget_bytes) : std::string())
       << (p.dp > 1 ? "; each of the " + std::to_string(p.dp) + " replicas of a pipeline rank, with 1/" + std::to_string(p.dp) +
                          " of the offloaded stages' optimizer state" : std::string())
       << "):\n";
    for (const auto& h : host) os << "  g" << h.rank << "  predicted " << gib((double)h.total()) << "  (" << h.describe() << ")\n";
    if (p.host_budget_bytes > 0 || !p.nvme.empty()) {
      const HostMemoryCheck hc = check_host_memory(host, hw, &p);
      os << "host memory: at most " << gib((double)hc.needed) << " per node, within " << gib((double)hc.available)
         << (hc.by_budget ? " (--host-budget)" : " (host_mem_gib)") << "\n";
    }
  }
  std::snprintf(buf, sizeof buf, "compile time: %.1f ms (%d candidate%s)\n", r.compile_ms, r.candidates, r.candidates == 1 ? "" : "s");
  os << buf;
  return os.str();
}

}  // namespace mmoc
