// offload-insertion: where every stage's weights, gradients and optimizer state live, and the instructions that
// move them. The contract
// below is the pass's documentation (docs/passes.md is generated from it).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <optional>

#include "common/format.hpp"
#include "ir/ops.hpp"
#include "cost/host_memory.hpp"
#include "cost/simulator.hpp"
#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kOffloadInsertionContract = R"md(Where every stage's weights, gradients and optimizer state live, and the instructions that move them.

- **Requires**: comm-lowering done.
- **Guarantees** (the plan's memory is explicit from here on: the memory checker runs):
  - the buffer table (weights, gradients, optimizer state, activations, stashes, batches) with home tiers;
  - offloaded stages: `prefetch w(S) <- host` @h2d before each run of uses and `evict w(S)` @comp after it, a prefetch
    waiting (after) on the evict of the run that ended window+1 runs earlier, so at most window+1 runs' weights are
    on the GPU; gradients `evict wgrad(S) -> host` @d2h after the stage's last backward, then `optim S` @cpu, so the
    CPU optimizer of a stage overlaps the backward of the stages after it;
  - resident stages: weights and AdamW state on the GPU all step, `optim S` @comp after its last backward (job
    `gpu_optim_stream` opt: on the GPU optimizer's own stream @opt, `after` its last backward, beside the backward of
    the stages below);
  - with gradient clipping: `gradnorm` @cpu after every gradient is complete, and every optim after it;
  - grouped schedules: offloaded stages whose weights leave the GPU between forward and backward recompute, and so
    does the head;
  - `load_batch m` before the first use of micro-batch m's ids/labels, `free batch(m)` after the last.
  - NVMe tier (with `--nvme`): stages whose `opt(S)` has home `nvme` get `read opt(S) <- nvme` @io before their
    `optim S` (which waits for it) and `write opt(S) -> nvme` @io right after it; the first two reads at the start,
    each later one after the write two optimizer steps earlier, so at most two stages' state is in host memory.
- **Decides** (against the budget, with the timing-independent memory bound of verify-memory): recompute: the job's
  on/off, or auto = per stage and partial: a stage recomputes its first k layers and keeps the stash of the others
  (`recompute=k/n`). Greedy: keep one more layer's stash at a time (a stage's last recomputed layer), always the one
  whose recompute costs the most time per byte of stash, while its GPU's bound stays within the budget; the plans with
  that choice made after the residency, before it, and with recompute off or whole compete by simulated step time;
  selective recompute inside the layer (job `selective`, `selective=1` on a stage): its kept LLaMA-style layers keep
  the SwiGLU's gate|up output only and recompute the rest in backward; with auto every candidate above is made once
  without it and once with every stage starting selective, where the greedy also un-selects a stage (its kept layers'
  SwiGLU recompute bought back with the bytes of its two tensors) by the same time-per-byte ratio; on: never un-selects;
  residency (offload=auto): per GPU, the largest number of its stages (lowest stage ids first: their gradients
  complete last, so their CPU optimizer step would be the step's tail) that keeps the bound within the budget.
  with partial recompute, residency is also bought with recompute: from the most resident choice, one stage fewer
  resident per GPU at a time, each with the stashes the budget then allows, until two in a row simulate no faster
  (offloaded stages' CPU optimizer steps trail the backward; recomputing a layer costs its forward per micro-batch).
  offload=all keeps everything on the host; offload=none keeps everything on the GPU. Host memory
  (cost/host_memory.hpp, per node against host_mem_gib and `--host-budget`) with the NVMe tier's placement
  (passes/tier_placement.cpp), for each choice: when the choice does not fit and `--nvme` paths are given, the fewest
  offloaded stages whose `opt(S)` moves to the tier so that it fits, taken lowest ids first or highest first,
  whichever simulates faster (`--nvme-place all`: every offloaded stage); a choice that does not fit even so (or
  without paths) is refused. Nothing fits the GPU: BudgetError naming (and carrying) the smallest budget that would;
  the GPU fits but not the host: HostMemoryError naming the host memory needed and available; a path without the
  space the tier needs there: InputError naming it and the missing bytes. The choice (residency, recompute, kept
  layers per stage, selective stages, window 1, the tier's stages) is the context's `offload`.
- **Recovers from the plan**: the choice (residency from the stages' `weights`, recompute and the kept layers from the
  stages the schedule does not force, selective from the stages' `selective`, the window from the prefetches' dependencies, the tier's stages from the buffer
  table's `opt` homes) and the plan as comm-lowering left it (the lowered plan without the instructions this pass
  adds: its inverse, `strip_offload`; from a linearized plan, in linearize's order).
)md";

using ir::BufKind;
using ir::BufRef;
using ir::Op;
using ir::Stream;

namespace {
bool is_tie_kind(BufKind k) { return k == BufKind::Tie || k == BufKind::TieGrad; }

struct NewOp {
  ir::Instr in;
  std::vector<int> after_old, after_new;
};

struct Builder {
  const std::vector<ir::Instr>& old;
  std::vector<NewOp> ops;
  std::vector<std::vector<int>> before, behind;   // per old index: new op ids
  std::vector<std::vector<int>> old_after_new;    // per old index: extra deps on new ops
  std::vector<int> tail;                          // new ops at the end of the program
  explicit Builder(const std::vector<ir::Instr>& o) : old(o), before(o.size()), behind(o.size()), old_after_new(o.size()) {}
  int add(ir::Instr in, std::vector<int> ao = {}, std::vector<int> an = {}) {
    ops.push_back({std::move(in), std::move(ao), std::move(an)});
    return (int)ops.size() - 1;
  }
  std::vector<ir::Instr> build() {
    std::vector<int> old_pos(old.size()), new_pos(ops.size(), -1);
    std::vector<ir::Instr> out;
    std::vector<std::pair<int, int>> fix;  // (out index, new op id) for new ops
    auto put_new = [&](int id) { new_pos[id] = (int)out.size(); out.push_back(ops[id].in); fix.push_back({new_pos[id], id}); };
    for (size_t i = 0; i < old.size(); ++i) {
      for (int id : before[i]) put_new(id);
      old_pos[i] = (int)out.size();
      out.push_back(old[i]);
      for (int id : behind[i]) put_new(id);
    }
    for (int id : tail) put_new(id);
    // remap old instructions' after lists and add their new deps
    for (size_t i = 0; i < old.size(); ++i) {
      auto& in = out[old_pos[i]];
      for (auto& a : in.after) a = old_pos[a];
      for (int id : old_after_new[i]) in.after.push_back(new_pos[id]);
      std::sort(in.after.begin(), in.after.end());
      in.after.erase(std::unique(in.after.begin(), in.after.end()), in.after.end());
    }
    for (auto [pos, id] : fix) {
      auto& in = out[pos];
      in.after.clear();
      for (int a : ops[id].after_old) in.after.push_back(old_pos[a]);
      for (int a : ops[id].after_new) in.after.push_back(new_pos[a]);
      std::sort(in.after.begin(), in.after.end());
      in.after.erase(std::unique(in.after.begin(), in.after.end()), in.after.end());
    }
    return out;
  }
};

// ---- NVMe tier (issue 13, docs/nvme-tier.md) ------------------------------------------------------------------
// The CPU optimizer steps of stages whose opt(S) is on the tier, in program order o_1..o_n, get
//   read opt(o_k) <- nvme @io                      (k <= kTierSlots: at the start of the program, no dependency)
//   optim o_k @cpu after(read o_k)
//   write opt(o_k) -> nvme @io after(optim o_k)    (right behind the optim)
//   read opt(o_{k+kTierSlots}) <- nvme @io after(write o_k)
// so at most kTierSlots stages' state is in host memory at once, and the reads of the next stages overlap the
// optimizer steps and the backward passes before them.

void add_tier_io(Builder& b, const OffloadConfig& cfg) {
  if (cfg.nvme.empty() || b.old.empty()) return;
  auto on_tier = [&](int s) { return s >= 0 && s < (int)cfg.nvme.size() && cfg.nvme[s] && !cfg.resident[s]; };
  // where each new op was placed: (list, position) in program order
  std::vector<std::vector<int>*> lists;
  for (size_t i = 0; i < b.old.size(); ++i) { lists.push_back(&b.before[i]); lists.push_back(&b.behind[i]); }
  lists.push_back(&b.tail);
  struct At { std::vector<int>* list; int id; };
  std::vector<At> optims;
  for (auto* l : lists)
    for (int id : *l) {
      const ir::Instr& in = b.ops[id].in;
      if (in.op == Op::Optim && in.stream == Stream::Cpu && on_tier(in.stage)) optims.push_back({l, id});
    }
  const int n = (int)optims.size();
  auto io_op = [](Op op, int s) {
    ir::Instr in;
    in.op = op;
    in.stream = Stream::Io;
    in.buf = BufRef{BufKind::Opt, s, -1};
    return in;
  };
  auto insert_behind = [](std::vector<int>& l, int after_id, int id) {
    auto it = std::find(l.begin(), l.end(), after_id);
    l.insert(it + 1, id);
  };
  std::vector<int> reads(n, -1), writes(n, -1);
  for (int k = 0; k < n && k < kTierSlots; ++k) {
    reads[k] = b.add(io_op(Op::TierRead, b.ops[optims[k].id].in.stage));
    b.before[0].push_back(reads[k]);
  }
  for (int k = 0; k < n; ++k) {
    const int oid = optims[k].id, s = b.ops[oid].in.stage;
    b.ops[oid].after_new.push_back(reads[k]);
    writes[k] = b.add(io_op(Op::TierWrite, s), {}, {oid});
    insert_behind(*optims[k].list, oid, writes[k]);
    if (k + kTierSlots < n) {
      reads[k + kTierSlots] = b.add(io_op(Op::TierRead, b.ops[optims[k + kTierSlots].id].in.stage), {}, {writes[k]});
      insert_behind(*optims[k].list, writes[k], reads[k + kTierSlots]);
    }
  }
}

}  // namespace

bool recompute_forced(const ir::Plan& p, const OffloadConfig& cfg, int s) {
  const int P = p.num_stages();
  if (p.schedule != "grouped") return false;
  // grouped: an offloaded stage's weights leave the GPU between its forward and backward runs (all but each rank's
  // last stage), and a saved autograd graph would keep them alive: such stages recompute.
  if (!cfg.resident[s] && s + p.gpus < P) return true;
  // the head's saved logits (fp32, vocab-wide) for all micro-batches cost far more than its recompute
  return s == P - 1;
}

namespace {
// The first layer of stage s that keeps its forward's stash under cfg (the stage's layer_end: none).
int kept_from(const ir::Plan& base, const OffloadConfig& cfg, int s) {
  const ir::Stage& st = base.stages[s];
  if (recompute_forced(base, cfg, s)) return st.layer_end;
  if (!cfg.recompute) return st.layer_begin;
  const int k = s < (int)cfg.keep.size() ? std::clamp(cfg.keep[s], 0, st.layers()) : 0;
  return st.layer_end - k;
}
bool selects(const OffloadConfig& cfg, int s) { return s < (int)cfg.selective.size() && cfg.selective[s]; }
}  // namespace

bool stage_can_select(const PassContext& c, const ir::Plan& base, const OffloadConfig& cfg, int s) {
  for (int l = kept_from(base, cfg, s); l < base.stages[s].layer_end; ++l)
    if (c.model.layer_can_select(l)) return true;
  return false;
}

// Normal form of cfg.selective: set only where it has an effect (stage_can_select); none set: empty.
void normalize_selective(const PassContext& c, const ir::Plan& base, OffloadConfig& cfg) {
  if (cfg.selective.empty()) return;
  const int P = base.num_stages();
  cfg.selective.resize(P, 0);
  bool any = false;
  for (int s = 0; s < P; ++s) {
    cfg.selective[s] = cfg.selective[s] && stage_can_select(c, base, cfg, s);
    any |= cfg.selective[s] != 0;
  }
  if (!any) cfg.selective.clear();
}

ir::Plan lower_offload(const PassContext& c, const ir::Plan& base, const OffloadConfig& cfg) {
  ir::Plan p = base;
  const int P = p.num_stages(), last = P - 1;
  const int64_t wb = c.act_bytes();  // weight element bytes follow the compute precision
  for (int s = 0; s < P; ++s) {
    auto& st = p.stages[s];
    st.recompute = cfg.recompute;
    st.keep_layers = 0;
    if (recompute_forced(p, cfg, s)) {
      st.recompute = true;
    } else if (st.recompute && s < (int)cfg.keep.size() && cfg.keep[s] > 0) {
      // partial recompute: the stage's last keep[s] layers keep their stash; all of them: no recompute
      if (cfg.keep[s] >= st.layers()) st.recompute = false;
      else st.keep_layers = cfg.keep[s];
    }
    st.selective = selects(cfg, s) && stage_can_select(c, base, cfg, s);
    st.weights = cfg.resident[s] ? ir::Residency::Resident : ir::Residency::Offload;
    st.optim = cfg.resident[s] ? ir::OptimPlace::Gpu : ir::OptimPlace::Cpu;
    fill_stage_costs(c, st);
  }
  std::erase_if(p.buffers, [](const ir::BufferDecl& d) { return !is_tie_kind(d.kind); });  // tied-embeddings' stay
  for (int s = 0; s < P; ++s) {
    const auto& st = p.stages[s];
    ir::Tier home = cfg.resident[s] ? ir::Tier::Gpu : ir::Tier::Host;
    p.buffers.push_back({BufKind::W, s, st.params * wb, home});
    p.buffers.push_back({BufKind::WGrad, s, st.params * wb, home});
    const bool opt_on_nvme = s < (int)cfg.nvme.size() && cfg.nvme[s] && !cfg.resident[s];  // NVMe tier
    p.buffers.push_back({BufKind::Opt, s, st.params * 12, opt_on_nvme ? ir::Tier::Nvme : home});
    if (s < last) {
      p.buffers.push_back({BufKind::Act, s, boundary_bytes(c), ir::Tier::Gpu});
      p.buffers.push_back({BufKind::Grad, s, boundary_bytes(c), ir::Tier::Gpu});
    }
    p.buffers.push_back({BufKind::Stash, s, stage_stash_bytes(c, st), ir::Tier::Gpu});
  }
  p.buffers.push_back({BufKind::Batch, -1, ir::batch_buffer_bytes(p.micro_batch_size, p.seq_len), ir::Tier::Gpu});
  // the global gradient norm before any optimizer step: for clipping, and to skip a non-finite step
  const bool clip = p.train.max_grad_norm > 0 || p.train.on_nonfinite == "skip";

  for (auto& prog : p.programs) {
    const auto& old = prog.instrs;
    Builder b(old);
    // compute ops of this rank
    std::vector<int> comp;
    for (int i = 0; i < (int)old.size(); ++i)
      if (old[i].op == Op::Forward || old[i].op == Op::Backward) comp.push_back(i);
    // ---- weight runs of offloaded stages
    struct Run { int stage, first, last; };
    std::vector<Run> runs;
    if (p.schedule == "grouped") {
      for (int i : comp) {
        int s = old[i].stage;
        if (!runs.empty() && runs.back().stage == s) runs.back().last = i;
        else runs.push_back({s, i, i});
      }
    } else {
      std::map<int, size_t> at;
      for (int i : comp) {
        int s = old[i].stage;
        auto it = at.find(s);
        if (it == at.end()) { at[s] = runs.size(); runs.push_back({s, i, i}); }
        else runs[it->second].last = i;
      }
    }
    runs.erase(std::remove_if(runs.begin(), runs.end(), [&](const Run& r) { return cfg.resident[r.stage]; }), runs.end());
    std::vector<int> evict_id(runs.size(), -1);
    for (size_t k = 0; k < runs.size(); ++k)
      evict_id[k] = b.add(make_buf_op(Op::Evict, Stream::Comp, {BufKind::W, runs[k].stage, -1}));
    for (size_t k = 0; k < runs.size(); ++k) {
      // memory dependency: the (window+1)-th most recently ended run before this one starts
      std::vector<size_t> ended;
      for (size_t j = 0; j < runs.size(); ++j)
        if (runs[j].last < runs[k].first) ended.push_back(j);
      std::sort(ended.begin(), ended.end(), [&](size_t x, size_t y) { return runs[x].last > runs[y].last; });
      std::vector<int> an;
      if ((int)ended.size() > cfg.window) an.push_back(evict_id[ended[cfg.window]]);
      // and the previous run of the same stage must have dropped its copy (a stage's weights are on the GPU once)
      int prev_same = -1;
      for (size_t j = 0; j < runs.size(); ++j)
        if (runs[j].stage == runs[k].stage && runs[j].last < runs[k].first && (prev_same < 0 || runs[j].last > runs[prev_same].last))
          prev_same = (int)j;
      if (prev_same >= 0) an.push_back(evict_id[prev_same]);
      ir::Instr pf = make_buf_op(Op::Prefetch, Stream::H2D, {BufKind::W, runs[k].stage, -1});
      int id = b.add(pf, {}, an);
      b.before[runs[k].first].push_back(id);
      b.old_after_new[runs[k].first].push_back(id);
      b.behind[runs[k].last].push_back(evict_id[k]);
    }
    // ---- gradients and optimizer
    std::map<int, int> last_bwd;
    for (int i : comp) if (old[i].op == Op::Backward) last_bwd[old[i].stage] = i;
    for (int i = 0; i < (int)old.size(); ++i)  // tied-embeddings' addgrad completes stage 0's gradient
      if (old[i].op == Op::AddGrad && last_bwd.count(old[i].stage) && i > last_bwd[old[i].stage]) last_bwd[old[i].stage] = i;
    std::vector<int> grad_ready_new, grad_ready_old;
    std::vector<std::pair<int, int>> cpu_optims;  // (stage, evict id)
    std::vector<int> gpu_optim_stages;
    // a resident stage's AdamW: on the optimizer's own stream (after its last backward, explicitly), so the backward of
    // the stages below does not wait for it; or in line on the compute stream (job gpu_optim_stream)
    const Stream gpu_opt = c.job.gpu_optim_stream == "comp" ? Stream::Comp : Stream::Opt;
    for (auto [s, lb] : last_bwd) {
      if (cfg.resident[s]) {
        grad_ready_old.push_back(lb);
        if (!clip) {
          ir::Instr o; o.op = Op::Optim; o.stream = gpu_opt; o.stage = s;
          b.behind[lb].push_back(gpu_opt == Stream::Comp ? b.add(o) : b.add(o, {lb}));
        } else gpu_optim_stages.push_back(s);
      } else {
        int ev = b.add(make_buf_op(Op::Evict, Stream::D2H, {BufKind::WGrad, s, -1}), {lb});
        b.ops[ev].in.to_host = true;
        b.behind[lb].push_back(ev);
        grad_ready_new.push_back(ev);
        if (!clip) {
          ir::Instr o; o.op = Op::Optim; o.stream = Stream::Cpu; o.stage = s;
          b.behind[lb].push_back(b.add(o, {}, {ev}));
        } else cpu_optims.push_back({s, ev});
      }
    }
    if (clip) {
      ir::Instr gn; gn.op = Op::GradNorm; gn.stream = Stream::Cpu;
      int gid = b.add(gn, grad_ready_old, grad_ready_new);
      b.tail.push_back(gid);
      for (auto [s, ev] : cpu_optims) {
        ir::Instr o; o.op = Op::Optim; o.stream = Stream::Cpu; o.stage = s;
        b.tail.push_back(b.add(o, {}, {}));
      }
      for (int s : gpu_optim_stages) {
        ir::Instr o; o.op = Op::Optim; o.stream = gpu_opt; o.stage = s;
        b.tail.push_back(b.add(o, {}, {gid}));
      }
    }
    // ---- batches
    std::map<int, std::pair<int, int>> use;  // mb -> (first, last)
    for (int i : comp) {
      int s = old[i].stage;
      if (s != 0 && s != last) continue;
      auto it = use.find(old[i].mb);
      if (it == use.end()) use[old[i].mb] = {i, i};
      else it->second.second = i;
    }
    for (auto [m, fl] : use) {
      ir::Instr lb; lb.op = Op::LoadBatch; lb.stream = Stream::Comp; lb.mb = m;
      b.before[fl.first].push_back(b.add(lb));
      b.behind[fl.second].push_back(b.add(make_buf_op(Op::Free, Stream::Comp, {BufKind::Batch, -1, m})));
    }
    add_tier_io(b, cfg);  // NVMe tier: reads and writes of opt(S) around the CPU optimizer steps
    prog.instrs = b.build();
  }
  return p;
}

// Normal form of a configuration (what offload_config_of recovers from the lowered plan): keep only with recompute,
// 0 for forced stages, at most the stage's layers; all zero: empty; every free stage keeping all: recompute off.
void normalize_keep(const ir::Plan& base, OffloadConfig& cfg) {
  const int P = base.num_stages();
  if (!cfg.recompute) cfg.keep.clear();
  if (cfg.keep.empty()) return;
  cfg.keep.resize(P, 0);
  bool any = false, all = true, free_any = false;
  for (int s = 0; s < P; ++s) {
    if (recompute_forced(base, cfg, s)) { cfg.keep[s] = 0; continue; }
    free_any = true;
    cfg.keep[s] = std::clamp(cfg.keep[s], 0, base.stages[s].layers());
    any |= cfg.keep[s] > 0;
    all &= cfg.keep[s] == base.stages[s].layers();
  }
  if (!any) cfg.keep.clear();
  else if (all && free_any) { cfg.recompute = false; cfg.keep.clear(); }
}

void offload_insertion_pass(PassContext& c) {
  const ir::Plan base = c.plan;
  c.pre_offload = base;
  const int P = base.num_stages(), N = base.gpus;
  const int64_t budget = c.hw.usable_bytes(base.budget_bytes);  // what the plan may use of the budget
  auto fits = [&](const MemoryBound& mb, int g) { return budget == 0 || mb.bound[g] <= budget; };
  std::vector<bool> rc_options;
  if (c.job.recompute == "on") rc_options = {true};
  else if (c.job.recompute == "off") rc_options = {false};
  else rc_options = {false, true};

  // Residency (offload=auto): per GPU, the largest k such that its k lowest-id stages resident keeps its bound within
  // the budget, with everything else of cfg as it is.
  auto residency_search = [&](OffloadConfig cfg) {
    std::vector<std::vector<int>> local(N);
    for (int s = 0; s < P; ++s) local[base.stages[s].gpu].push_back(s);
    std::vector<int> lo(N, 0), hi(N);
    for (int g = 0; g < N; ++g) hi[g] = (int)local[g].size();
    auto apply = [&](const std::vector<int>& k) {
      OffloadConfig t = cfg;
      for (int g = 0; g < N; ++g)
        for (int j = 0; j < (int)local[g].size(); ++j) t.resident[local[g][j]] = j < k[g];
      return t;
    };
    bool any = true;
    while (any) {
      any = false;
      std::vector<int> mid(N);
      for (int g = 0; g < N; ++g) { mid[g] = lo[g] < hi[g] ? (lo[g] + hi[g] + 1) / 2 : lo[g]; any |= lo[g] < hi[g]; }
      if (!any) break;
      OffloadConfig t = apply(mid);
      MemoryBound b2 = memory_bound(lower_offload(c, base, t));
      for (int g = 0; g < N; ++g) {
        if (lo[g] >= hi[g]) continue;
        if (fits(b2, g)) lo[g] = mid[g]; else hi[g] = mid[g] - 1;
      }
    }
    cfg = apply(lo);
    // the per-GPU searches interact only weakly; back off any GPU that ended over budget
    for (int guard = 0; guard < 4 * P; ++guard) {
      MemoryBound b3 = memory_bound(lower_offload(c, base, cfg));
      bool over = false;
      for (int g = 0; g < N; ++g)
        if (!fits(b3, g) && lo[g] > 0) { lo[g]--; over = true; }
      if (!over) break;
      cfg = apply(lo);
    }
    return cfg;
  };
  // Partial recompute (recompute=auto): with the residency of cfg fixed, keep the stash of one more layer at a time
  // (a stage's last recomputed layer), always the one whose recompute costs the most time per byte of stash, while
  // its GPU's bound stays within the budget. Selective recompute inside the layer (cfg.selective set: every stage
  // starts selective): a kept layer of a selective stage costs its selective stash and saves its forward less the
  // SwiGLU's recompute; with selective=auto a further move un-selects a stage (its kept layers keep their whole stash:
  // the bytes of the SwiGLU's two tensors buy back its recompute), competing by the same ratio. keep_moves=false: only
  // those (recompute off or whole: no layer to keep).
  const int mbs = base.micro_batch_size, seq = base.seq_len;
  const bool unselect_moves = c.job.selective == "auto";
  auto keep_search = [&](OffloadConfig cfg, const std::vector<int>& start = {}, bool keep_moves = true) {
    cfg.keep = start;  // a choice known to fit (residency_scan's previous one), or none
    cfg.keep.resize(P, 0);
    std::vector<char> open(P, 0), sel_open(P, 0);
    for (int s = 0; s < P; ++s) {
      open[s] = keep_moves && cfg.recompute && !recompute_forced(base, cfg, s);
      sel_open[s] = unselect_moves && selects(cfg, s);
    }
    const int ab = c.act_bytes();
    for (;;) {
      int best = -1;
      bool best_unselect = false;
      double best_ratio = -1;
      for (int s = 0; s < P; ++s) {
        if (!open[s] || cfg.keep[s] >= base.stages[s].layers()) continue;
        const int l = base.stages[s].layer_end - 1 - cfg.keep[s];
        const bool sel = selects(cfg, s) && c.model.layer_can_select(l);
        // with its tp collectives (replayed); a selective layer still recomputes its SwiGLU
        const double saved = c.cost.layer_fwd_total_ms(l, mbs, seq) - (sel ? c.cost.layer_selective_ms(l, mbs, seq) : 0.0);
        const int64_t bytes = c.model.layer_stash_bytes(l, mbs, seq, false, ab, sel);
        const double ratio = bytes > 0 ? saved / (double)bytes : 1e300;
        if (ratio > best_ratio) { best_ratio = ratio; best = s; best_unselect = false; }
      }
      for (int s = 0; s < P; ++s) {
        if (!sel_open[s] || !selects(cfg, s)) continue;
        double saved = 0;
        int64_t bytes = 0;
        for (int l = kept_from(base, cfg, s); l < base.stages[s].layer_end; ++l) {
          if (!c.model.layer_can_select(l)) continue;
          saved += c.cost.layer_selective_ms(l, mbs, seq);
          bytes += c.model.layer_stash_bytes(l, mbs, seq, false, ab) - c.model.layer_stash_bytes(l, mbs, seq, false, ab, true);
        }
        if (bytes <= 0) continue;  // no kept layer (yet)
        const double ratio = saved / (double)bytes;
        if (ratio > best_ratio) { best_ratio = ratio; best = s; best_unselect = true; }
      }
      if (best < 0) break;
      const int g = base.stages[best].gpu;
      if (best_unselect) {
        cfg.selective[best] = 0;
        if (!fits(memory_bound(lower_offload(c, base, cfg), g), g)) cfg.selective[best] = 1;
        sel_open[best] = 0;  // either way: its stage is decided
        continue;
      }
      cfg.keep[best]++;
      if (!fits(memory_bound(lower_offload(c, base, cfg), g), g)) {
        cfg.keep[best]--;
        open[best] = 0;
      }
    }
    normalize_keep(base, cfg);
    normalize_selective(c, base, cfg);
    return cfg;
  };

  struct Cand { OffloadConfig cfg; ir::Plan plan; double step_ms; std::string tier_note; };
  std::vector<Cand> cands;
  std::optional<HostMemoryError> host_refusal;  // a choice that fits the GPU but not the host (the smallest need)
  std::optional<NvmeSpaceError> nvme_refusal;   // a choice whose tier placement lacks disk space (the smallest lack)
  std::vector<OffloadConfig> seen;               // the choices tried (before tier placement)
  auto add_cand = [&](OffloadConfig choice) -> double {
    normalize_selective(c, base, choice);
    for (const auto& k : seen) if (k == choice) return -1;
    seen.push_back(choice);
    OffloadConfig cfg = choice;
    ir::Plan pl = lower_offload(c, base, cfg);
    // host memory (cost/host_memory.hpp): the most resident choice on the GPU is the least on the host. With --nvme
    // paths the tier placement moves optimizer state to the tier until it fits (passes/tier_placement.cpp); the
    // choice is refused only when even that cannot make it fit (or without paths, when it does not fit as it is).
    std::string tier_note;
    try {
      tier_note = place_on_tier(c, base, cfg, pl);
    } catch (const HostMemoryError& e) {
      if (!host_refusal || e.needed < host_refusal->needed) host_refusal = e;
      return -1;
    } catch (const NvmeSpaceError& e) {
      if (!nvme_refusal || e.missing < nvme_refusal->missing) nvme_refusal = e;
      return -1;
    }
    double step = simulate(pl, c.hw, c.model).step_ms;
    cands.push_back({cfg, std::move(pl), step, std::move(tier_note)});
    return step;
  };
  // Residency bought with recompute: from the most resident choice (res), one stage fewer resident per GPU at a time
  // (its highest-id resident stage), the stash kept where the budget then allows (keep_search); the offloaded stages'
  // CPU optimizer steps trail the backward, while recompute costs a forward per layer and micro-batch, so the best
  // trade is often in between. Stops after two candidates in a row that simulate no faster than the best so far.
  auto residency_scan = [&](OffloadConfig res, std::vector<int> keep) {
    double best = 1e300;
    int worse = 0;
    // keep: the previous choice's kept layers: they still fit with one stage fewer resident
    for (;;) {
      bool any = false;
      std::vector<int> top(N, -1);
      for (int s = 0; s < P; ++s)
        if (res.resident[s]) top[base.stages[s].gpu] = s;
      for (int g = 0; g < N; ++g)
        if (top[g] >= 0) { res.resident[top[g]] = 0; any = true; }
      if (!any) break;
      res.recompute = true;
      const OffloadConfig k = keep_search(res, keep);
      keep = k.keep;
      if (!k.recompute) keep.clear();  // everything kept: nothing to buy any more
      const double t = add_cand(k);
      if (!k.recompute) break;
      if (t < 0) continue;
      if (t < best) { best = t; worse = 0; }
      else if (++worse >= 2) break;
    }
  };
  int64_t smallest = -1;
  std::string smallest_desc;
  // selective recompute inside the layer: every candidate below without it and (selective=auto) again with every
  // stage starting selective, keep_search un-selecting stages where the budget allows; selective=on: only the latter
  // (no un-selecting). The candidates without it are exactly those of a job with selective=off.
  std::vector<bool> sel_options;
  if (c.job.selective == "off") sel_options = {false};
  else if (c.job.selective == "on") sel_options = {true};
  else sel_options = {false, true};
  for (bool sel : sel_options)
  for (bool rc : rc_options) {
    OffloadConfig cfg;
    cfg.recompute = rc;
    cfg.window = 1;
    cfg.resident.assign(P, c.job.offload == "none" ? 1 : 0);
    if (sel) cfg.selective.assign(P, 1);
    ir::Plan pl = lower_offload(c, base, cfg);
    MemoryBound mb = memory_bound(pl);
    int64_t worst = *std::max_element(mb.bound.begin(), mb.bound.end());
    if (smallest < 0 || worst < smallest) {
      smallest = worst;
      smallest_desc = std::string("recompute ") + (rc ? "on" : "off") + (sel && !rc ? ", selective" : "") +
                      (c.job.offload == "none" ? ", everything resident on the GPU" : ", all weights and optimizer state offloaded");
    }
    if (budget > 0 && worst > budget) continue;
    const bool partial = rc && c.job.recompute == "auto";
    // the choice as it is; with selective, after un-selecting what the budget allows
    auto as_is = [&](const OffloadConfig& k) { return sel ? keep_search(k, {}, false) : k; };
    if (c.job.offload == "auto") {
      OffloadConfig res = residency_search(cfg);
      // the budget left over after residency goes to stashes; or stashes first, then residency: the faster one wins
      if (partial) {
        const OffloadConfig most_resident = keep_search(res);
        add_cand(most_resident);
        add_cand(residency_search(keep_search(cfg)));
        if (most_resident.recompute) residency_scan(res, most_resident.keep);
      }
      add_cand(as_is(res));
    } else {
      if (partial) add_cand(keep_search(cfg));
      add_cand(as_is(cfg));
    }
  }
  // the host refusal is the one to fix first (more host memory puts less on the tier); a disk that is too small for
  // every choice that fits the host says so
  if (cands.empty() && host_refusal)
    throw HostMemoryError("offload-insertion: " + std::string(host_refusal->what()) +
                              (nvme_refusal ? std::string("; the choices that fit the host lack NVMe space: ") + nvme_refusal->what() : std::string()),
                          host_refusal->needed, host_refusal->available);
  if (cands.empty() && nvme_refusal)
    throw NvmeSpaceError("offload-insertion: " + std::string(nvme_refusal->what()), nvme_refusal->missing);
  if (cands.empty()) {
    throw BudgetError("budget " + gib_at_least(base.budget_bytes) + " per GPU is too small for " + c.model.name + " with micro-batch size " +
                     std::to_string(base.micro_batch_size) + " x seq " + std::to_string(base.seq_len) + " on " +
                     std::to_string(N) + " GPU(s): the smallest budget that fits is " + gib_at_least(c.hw.budget_for(smallest)) + " (" + smallest_desc +
                     "); raise --budget, lower --micro-batch-size or --seq-len, or add GPUs",
                      c.hw.budget_for(smallest));
  }
  size_t best = 0;
  for (size_t i = 1; i < cands.size(); ++i) if (cands[i].step_ms < cands[best].step_ms) best = i;
  if (!cands[best].tier_note.empty()) c.notes.push_back(cands[best].tier_note);
  c.plan = std::move(cands[best].plan);
  c.offload = cands[best].cfg;
  c.memory_complete = true;
  int nres = 0;
  for (char r : c.offload->resident) nres += r;
  std::string rc = c.offload->recompute ? "on" : "off";
  if (!c.offload->keep.empty()) {
    int kept = 0, total = 0;
    for (const auto& st : c.plan.stages) { kept += st.recompute ? st.keep_layers : st.layers(); total += st.layers(); }
    rc = "partial (" + std::to_string(kept) + " of " + std::to_string(total) + " layers keep their stash)";
  }
  int nsel = 0;
  for (const auto& st : c.plan.stages) nsel += st.selective;
  c.notes.push_back("offload-insertion: recompute " + rc + ", " + std::to_string(nres) + " of " + std::to_string(P) +
                    " stages resident on their GPU" +
                    (nsel ? ", " + std::to_string(nsel) + " selective (their kept layers recompute the SwiGLU)" : ""));
}

}  // namespace mmoc

namespace mmoc {

namespace {
// The instructions lower_offload adds (comm-lowering's own `free`s of sent activations and gradients stay).
bool added_by_offload(const ir::Instr& in) {
  switch (in.op) {
    case Op::Prefetch: return !in.buf || !is_tie_kind(in.buf->kind);  // tied-embeddings' prefetch stays
    case Op::Evict: case Op::LoadBatch: case Op::Optim: case Op::GradNorm: return true;
    case Op::AllReduce: case Op::ReduceScatter: case Op::AllGather: return true;  // data-parallel's (a later pass)
    case Op::TierRead: case Op::TierWrite: return true;
    case Op::Free: return in.buf && in.buf->kind == BufKind::Batch;
    default: return false;
  }
}

// The smallest window consistent with the prefetches' dependencies (a wider one that makes the same plan would not
// have been chosen: overlap takes a wider window only when it simulates strictly faster).
int window_of(const ir::Plan& p) {
  // per run of an offloaded stage's weights: where it starts and ends on the comp stream, and which runs' evicts its
  // prefetch waits for; each gives the windows it is consistent with
  struct Run { int stage, first, end; std::vector<int> waits_for; };
  struct Constraint { int eq, at_least; };  // the window w satisfies: w == eq, or w >= at_least
  std::vector<Constraint> cons;
  const int kNever = 1 << 20;
  for (const auto& prog : p.programs) {
    const auto& ins = prog.instrs;
    std::vector<int> comp_pos(ins.size(), -1);
    int n = 0;
    for (size_t i = 0; i < ins.size(); ++i)
      if (ins[i].stream == Stream::Comp) comp_pos[i] = n++;
    std::vector<Run> runs;
    std::map<int, int> run_of_prefetch;  // prefetch index -> run
    for (size_t i = 0; i < ins.size(); ++i) {
      const auto& in = ins[i];
      if ((in.op != Op::Forward && in.op != Op::Backward) || comp_pos[i] < 0) continue;
      for (int a : in.after)
        if (a >= 0 && a < (int)ins.size() && ins[a].op == Op::Prefetch && ins[a].buf && ins[a].buf->kind == BufKind::W &&
            ins[a].buf->stage == in.stage && !run_of_prefetch.count(a)) {
          run_of_prefetch[a] = (int)runs.size();
          runs.push_back({in.stage, comp_pos[i], -1, {}});
        }
    }
    std::map<int, int> run_of_evict;  // evict index -> run
    for (auto& [pf, k] : run_of_prefetch) {
      Run& r = runs[k];
      for (size_t i = 0; i < ins.size(); ++i)
        if (ins[i].op == Op::Evict && !ins[i].to_host && ins[i].buf && *ins[i].buf == BufRef{BufKind::W, r.stage, -1} &&
            comp_pos[i] > r.first && (r.end < 0 || comp_pos[i] < r.end)) {
          r.end = comp_pos[i];
          run_of_evict[(int)i] = k;
        }
    }
    for (auto& [pf, k] : run_of_prefetch)
      for (int a : ins[pf].after) {
        auto it = run_of_evict.find(a);
        if (it != run_of_evict.end()) runs[k].waits_for.push_back(it->second);
      }
    for (const Run& r : runs) {
      std::vector<int> ended;  // runs that ended before this one starts, latest first
      for (int j = 0; j < (int)runs.size(); ++j)
        if (runs[j].end >= 0 && runs[j].end < r.first) ended.push_back(j);
      std::sort(ended.begin(), ended.end(), [&](int x, int y) { return runs[x].end > runs[y].end; });
      auto rank = [&](int j) { return (int)(std::find(ended.begin(), ended.end(), j) - ended.begin()); };
      int prev_same = -1;
      for (int j : ended)
        if (runs[j].stage == r.stage) { prev_same = j; break; }
      const int L = (int)ended.size();
      int other = -1;
      bool waits_prev = false;
      for (int j : r.waits_for) {
        if (j == prev_same) waits_prev = true;
        else other = j;
      }
      if (other >= 0) cons.push_back({rank(other), kNever});             // the window's own dependency
      else if (waits_prev) cons.push_back({rank(prev_same), L});         // it coincides with prev_same, or none
      else cons.push_back({-1, L});                                     // no window dependency: w >= L
    }
  }
  int upper = 1;  // beyond it every constraint is decided
  for (const Constraint& k : cons) upper = std::max({upper, k.eq, k.at_least < kNever ? k.at_least : 0});
  for (int w = 1; w <= upper; ++w) {
    bool ok = true;
    for (const Constraint& k : cons) ok = ok && (w == k.eq || w >= k.at_least);
    if (ok) return w;
  }
  return 1;
}
}  // namespace

ir::Plan strip_offload(const PassContext& c, const ir::Plan& lowered) {
  ir::Plan p = lowered;
  unlower_tp(p);  // a plan after tp-lowering: its segments as whole instructions (tp-lowering's inverse)
  std::erase_if(p.buffers, [](const ir::BufferDecl& d) { return !is_tie_kind(d.kind); });
  p.predicted.reset();
  for (auto& st : p.stages) {  // as partition left them
    st.recompute = c.job.recompute != "off";
    st.keep_layers = 0;
    st.selective = false;
    st.weights = ir::Residency::Offload;
    st.optim = ir::OptimPlace::Cpu;
    fill_stage_costs(c, st);
  }
  for (auto& prog : p.programs) {
    std::vector<int> pos(prog.instrs.size(), -1);
    std::vector<ir::Instr> out;
    for (size_t i = 0; i < prog.instrs.size(); ++i)
      if (!added_by_offload(prog.instrs[i])) {
        pos[i] = (int)out.size();
        out.push_back(prog.instrs[i]);
      }
    for (auto& in : out) {
      std::vector<int> after;
      for (int a : in.after)
        if (a >= 0 && a < (int)pos.size() && pos[a] >= 0) after.push_back(pos[a]);
      in.after = std::move(after);
    }
    prog.instrs = std::move(out);
  }
  return p;
}

OffloadConfig offload_config_of(const PassContext& c, const ir::Plan& p) {
  if (p.tp > 1 && std::any_of(p.programs.begin(), p.programs.end(), [](const ir::Program& g) {
        return std::any_of(g.instrs.begin(), g.instrs.end(), [](const ir::Instr& in) { return in.seg >= 0; });
      })) {  // after tp-lowering: read the configuration from the plan before it
    ir::Plan whole = p;
    unlower_tp(whole);
    return offload_config_of(c, whole);
  }
  OffloadConfig cfg;
  const int P = p.num_stages();
  cfg.resident.assign(P, 0);
  for (int s = 0; s < P; ++s) cfg.resident[s] = p.stages[s].weights == ir::Residency::Resident;
  // recompute: any stage the schedule does not force (lower_offload); when all are forced either choice makes the
  // same plan, and offload-insertion keeps its first candidate. Partial recompute: each free stage's kept layers
  // (all of them for one that does not recompute), in offload-insertion's normal form.
  cfg.recompute = c.job.recompute == "on";
  // per stage (some free stages recompute, others not) or partial (a stage keeps some of its layers)
  bool partial = false;
  int first_free = -1;
  for (int s = 0; s < P; ++s) {
    partial |= p.stages[s].keep_layers > 0;
    if (recompute_forced(p, cfg, s)) continue;
    if (first_free < 0) first_free = s;
    else partial |= p.stages[s].recompute != p.stages[first_free].recompute;
  }
  if (partial) {
    cfg.recompute = true;
    cfg.keep.assign(P, 0);
    for (int s = 0; s < P; ++s)
      if (!recompute_forced(p, cfg, s)) cfg.keep[s] = p.stages[s].recompute ? p.stages[s].keep_layers : p.stages[s].layers();
    normalize_keep(p, cfg);
  } else {
    for (int s = 0; s < P; ++s)
      if (!recompute_forced(p, cfg, s)) {
        cfg.recompute = p.stages[s].recompute;
        break;
      }
  }
  for (int s = 0; s < P; ++s)  // selective recompute inside the layer: from the stages (normal form by construction)
    if (p.stages[s].selective) {
      cfg.selective.resize(P, 0);
      cfg.selective[s] = 1;
    }
  cfg.window = window_of(p);
  for (int s = 0; s < P; ++s) {  // NVMe tier: from the buffer table
    const ir::BufferDecl* d = p.find_buffer(BufKind::Opt, s);
    if (d && d->home == ir::Tier::Nvme) {
      cfg.nvme.resize(P, 0);
      cfg.nvme[s] = 1;
    }
  }
  return cfg;
}

void recover_offload_insertion(PassContext& c) {
  c.memory_complete = true;
  c.offload = offload_config_of(c, c.plan);
  c.pre_offload = strip_offload(c, c.plan);
}

}  // namespace mmoc
