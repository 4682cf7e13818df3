// The structural verifier (docs/plan-format.md, "Dependencies and matching").
#include <algorithm>
#include <map>
#include <set>
#include <tuple>

#include "ir/plan.hpp"
#include "ir/ops.hpp"
#include "ir/plan_detail.hpp"

namespace mmoc::ir {
using namespace detail;

// ============================================================================================
// structural verifier
// ============================================================================================
std::vector<std::string> verify_structure(const Plan& p) { return verify_structure(p, true); }

namespace {
std::vector<std::string> verify_one_body(const Plan& p, bool with_programs);
}

// A two-step plan (odd_programs, the alternating update order): each body as a one-body plan (the odd one's problems
// prefixed "odd step: "), and the carries: stages with opt(S) on the NVMe tier, each listed once, only with
// odd_programs.
std::vector<std::string> verify_structure(const Plan& p, bool with_programs) {
  std::vector<std::string> out = verify_one_body(num_bodies(p) == 2 ? step_body(p, 0) : p, with_programs);
  if (num_bodies(p) == 2) {
    if (!with_programs) out.push_back("plan: odd-step programs before the schedule pass");
    for (auto& m : verify_one_body(step_body(p, 1), with_programs)) out.push_back("odd step: " + m);
  } else if (!p.carry_even.empty() || !p.carry_odd.empty()) {
    out.push_back("plan: carry_even / carry_odd without odd-step programs");
  }
  for (int parity = 0; parity < 2; ++parity) {
    const char* key = parity ? "carry_odd" : "carry_even";
    std::set<int> seen;
    for (int s : carry_in(p, parity)) {
      const BufferDecl* d = s >= 0 && s < p.num_stages() ? p.find_buffer(BufKind::Opt, s) : nullptr;
      if (!d || d->home != Tier::Nvme)
        out.push_back(std::string("plan: ") + key + " names S" + std::to_string(s) + ", which has no opt(S) on the NVMe tier");
      if (!seen.insert(s).second) out.push_back(std::string("plan: ") + key + " names S" + std::to_string(s) + " twice");
    }
  }
  return out;
}

namespace {
std::vector<std::string> verify_one_body(const Plan& p, bool with_programs) {
  std::vector<std::string> out;
  const int S = p.num_stages(), M = p.microbatches, G = p.gpus;
  auto add = [&](std::string s) { out.push_back(std::move(s)); };
  auto at = [](int g, int i) { return "g" + std::to_string(g) + " %" + std::to_string(i) + ": "; };

  // ---- plan header ----
  if (G < 1) add("plan: gpus=" + std::to_string(G) + " (must be >= 1)");
  if (M < 1) add("plan: microbatches=" + std::to_string(M) + " (must be >= 1)");
  if (p.dp < 1) add("plan: dp=" + std::to_string(p.dp) + " (must be >= 1)");
  if (p.tp < 1) add("plan: tp=" + std::to_string(p.tp) + " (must be >= 1)");
  // the NVMe tier's state files, staging and host-memory model are per pipeline rank with whole stages: not with
  // data-parallel replicas (ZeRO shards) or tensor-parallel shards
  if (!p.nvme.empty() && (p.dp > 1 || p.tp > 1))
    add("plan: the NVMe tier (nvme=) with dp=" + std::to_string(p.dp) + " tp=" + std::to_string(p.tp) +
        " is not supported (the tier needs dp=1 and tp=1)");
  if (p.tp > 1) {  // every tensor-parallel rank holds whole heads, kv heads and an equal part of the MLP
    const int t = p.tp;
    if (p.model.heads % t || p.model.kv_heads % t || p.model.ffn % t)
      add("plan: tp=" + std::to_string(t) + " does not divide the model's heads (" + std::to_string(p.model.heads) +
          "), kv heads (" + std::to_string(p.model.kv_heads) + ") and ffn (" + std::to_string(p.model.ffn) + ")");
  }
  if (!p.gpu_order.empty()) {
    const int W = world_size(p);  // one physical GPU per world rank (one per pipeline rank: older dp/tp plans)
    if ((int)p.gpu_order.size() != W && (int)p.gpu_order.size() != G)
      add("plan: order has " + std::to_string(p.gpu_order.size()) + " entries, the layout has " + std::to_string(W) +
          " ranks (gpus=" + std::to_string(G) + ")");
    std::set<int> seen;
    for (int d : p.gpu_order)
      if (d < 0 || !seen.insert(d).second) add("plan: order entry " + std::to_string(d) + " is negative or repeated");
  }

  // ---- stages ----
  if (S == 0) add("plan: no stages");
  for (int i = 0; i < S; ++i) {
    const Stage& s = p.stages[i];
    std::string pre = "stage " + std::to_string(i) + ": ";
    if (s.id != i) add(pre + "id is S" + std::to_string(s.id) + ", expected S" + std::to_string(i));
    if (s.gpu < 0 || s.gpu >= G) add(pre + "gpu " + std::to_string(s.gpu) + " out of range 0.." + std::to_string(G - 1));
    if (s.layer_begin >= s.layer_end)
      add(pre + "empty layer range " + std::to_string(s.layer_begin) + "-" + std::to_string(s.layer_end));
    int expect_begin = i == 0 ? 0 : p.stages[i - 1].layer_end;
    if (s.layer_begin != expect_begin)
      add(pre + "layers start at " + std::to_string(s.layer_begin) + ", expected " + std::to_string(expect_begin) +
          (i == 0 ? "" : " (end of the previous stage)"));
    if (s.keep_layers < 0 || (s.keep_layers > 0 && (!s.recompute || s.keep_layers >= s.layers())))
      add(pre + "keeps the stash of " + std::to_string(s.keep_layers) + " of its " + std::to_string(s.layers()) +
          " layers, which needs recompute and 0 <= kept < layers");
    if (s.selective) {
      const int kept_from = s.layer_begin + s.recompute_layers();
      const bool decoder_kept = std::max(kept_from, 1) < std::min(s.layer_end, p.model.layers + 1);
      if (p.tp > 1) add(pre + "selective recompute inside the layer needs tp 1 (the plan has tp " + std::to_string(p.tp) + ")");
      else if (!decoder_kept) add(pre + "selective, but none of its decoder layers keeps its stash");
    }
  }
  if (S > 0 && p.stages.back().layer_end != p.model.layers + 2)
    add("stage " + std::to_string(S - 1) + ": last stage ends at layer " + std::to_string(p.stages.back().layer_end) +
        ", expected " + std::to_string(p.model.layers + 2) + " (model.layers + 2)");

  // ---- buffer table ----
  {
    std::set<std::pair<int, int>> seen;
    for (const auto& b : p.buffers) {
      std::string name = decl_str(b);
      if (!buf_kind_info(b.kind).per_stage ? b.stage != -1 : (b.stage < 0 || b.stage >= S))
        add("buffer " + name + ": stage out of range");
      if (b.bytes < 0) add("buffer " + name + ": negative bytes");
      if (!seen.insert({(int)b.kind, b.stage}).second) add("buffer " + name + ": declared twice");
    }
  }

  if (!with_programs) return out;

  // ---- programs ----
  if ((int)p.programs.size() != G)
    add("plan: " + std::to_string(p.programs.size()) + " programs for gpus=" + std::to_string(G));
  for (size_t g = 0; g < p.programs.size(); ++g)
    if (p.programs[g].gpu != (int)g)
      add("programs[" + std::to_string(g) + "]: gpu is g" + std::to_string(p.programs[g].gpu) + ", expected g" +
          std::to_string(g));

  struct Loc {
    int gpu, idx;
  };
  struct Comm {
    int gpu, idx;
    const Instr* in;
  };
  std::map<std::string, std::vector<Comm>> sends, recvs;
  std::map<std::pair<int, int>, std::vector<Loc>> fwd, bwd;  // (stage, mb) -> occurrences
  const auto groups = program_groups(p);  // the names programs use, each with every rank that runs it
  std::string group_names;
  for (const auto& [n, rs] : groups) group_names += (group_names.empty() ? "" : ", ") + n;
  struct Coll {
    int idx;
    const Instr* in;
  };
  std::map<std::string, std::map<int, std::vector<Coll>>> coll_seq;  // group -> program -> its collectives in order
  // tensor-parallel segments: (op, stage, mb) -> (seg, gpu, index) of its segments, and of its collectives
  struct Seg {
    int seg, gpu, idx;
  };
  std::map<std::tuple<int, int, int>, std::vector<Seg>> seg_of, coll_of;
  std::map<std::tuple<int, int, int>, int> whole;  // (op, stage, mb) -> instructions without seg

  auto check_buf = [&](const std::string& pre, const BufRef& b) {
    bool ok = true;
    if (!b.per_stage()) {
      if (b.stage != -1) ok = false;
    } else if (b.stage < 0 || b.stage >= S) {
      add(pre + "buffer " + b.str() + ": stage out of range 0.." + std::to_string(S - 1));
      return;
    }
    if (b.per_microbatch()) {
      if (b.mb < 0 || b.mb >= M) {
        add(pre + "buffer " + b.str() + ": micro-batch out of range 0.." + std::to_string(M - 1));
        return;
      }
    } else if (b.mb != -1) {
      ok = false;
    }
    if (!ok) add(pre + "malformed buffer reference " + b.str());
  };

  for (size_t gi = 0; gi < p.programs.size(); ++gi) {
    const Program& pg = p.programs[gi];
    const int g = pg.gpu;
    // (op, wgrad(S)) -> its reductions / copies to the host in program order: the whole buffer once, or its buckets
    // 1..n in order, each once
    std::map<std::pair<Op, BufRef>, std::vector<Coll>> bucket_seq;
    for (size_t ii = 0; ii < pg.instrs.size(); ++ii) {
      const Instr& in = pg.instrs[ii];
      const int i = (int)ii;
      const std::string pre = at(g, i) + to_string(in.op) + ": ";
      for (int a : in.after)
        if (a < 0 || a >= i)
          add(pre + "after(%" + std::to_string(a) + ") does not point to an earlier instruction");
      const OpInfo& op = op_info(in.op);
      const bool need_stage = op.operands & kOpStage, need_mb = op.operands & kOpMb, need_buf = op.operands & kOpBuf;
      if (!(op.streams & stream_bit(in.stream))) {
        std::string allowed;
        for (int k = 0; k < kNumStreams; ++k)
          if (op.streams & stream_bit((Stream)k)) allowed += std::string(allowed.empty() ? "@" : " or @") + to_string((Stream)k);
        add(pre + "runs on @" + to_string(in.stream) + ", not on " + allowed);
      }
      if (need_stage && (in.stage < 0 || in.stage >= S))
        add(pre + "stage " + std::to_string(in.stage) + " out of range 0.." + std::to_string(S - 1));
      if (need_mb && (in.mb < 0 || in.mb >= M))
        add(pre + "micro-batch " + std::to_string(in.mb) + " out of range 0.." + std::to_string(M - 1));
      if (need_buf) {
        if (!in.buf)
          add(pre + "missing buffer operand");
        else
          check_buf(pre, *in.buf);
      }
      if ((op.operands & kOpGroup) && in.group.empty()) add(pre + "missing group");
      if ((op.operands & kOpGroup) && !in.group.empty()) {
        // a named group of the layout, with this program's ranks in it (ir::program_groups)
        auto it = groups.find(in.group);
        if (it == groups.end()) {
          add(pre + "unknown group '" + in.group + "' (the layout's groups: " + group_names + ")");
        } else {
          bool member = false;
          for (int r : it->second) member = member || (r < world_size(p) && rank_coord(p, r).pipe == g);
          if (!member) add(pre + "group '" + in.group + "' has no rank that runs g" + std::to_string(g));
          else coll_seq[in.group][g].push_back({i, &in});
        }
      }
      // a bucket of a stage's gradient: its reduction (allreduce, reduce_scatter) or its copy to the host
      // (an optim on the cpu: of the stage's gradient on the host, keyed by wgrad(S) too)
      const bool cpu_optim = in.op == Op::Optim && in.stream == Stream::Cpu && in.stage >= 0 && in.stage < S;
      const std::optional<BufRef> bucketable =
          cpu_optim ? std::optional<BufRef>(BufRef{BufKind::WGrad, in.stage, -1})
          : in.buf && in.buf->kind == BufKind::WGrad && (in.op == Op::AllReduce || in.op == Op::ReduceScatter || (in.op == Op::Evict && in.to_host))
              ? in.buf : std::nullopt;
      if (in.buckets != 0 || in.bucket != 0) {
        if (!bucketable)
          add(pre + "a bucket [" + std::to_string(in.bucket + 1) + "/" + std::to_string(in.buckets) +
              "] is only for the reduction (allreduce, reduce_scatter), the copy to the host (evict -> host) or the cpu "
              "update (optim @cpu) of a stage's gradient wgrad(S)");
        else if (in.buckets < 2 || in.bucket < 0 || in.bucket >= in.buckets)
          add(pre + "bucket [" + std::to_string(in.bucket + 1) + "/" + std::to_string(in.buckets) +
              "] out of range (k from 1 to n, n >= 2; a whole buffer has no bucket)");
        else
          bucket_seq[{in.op, *bucketable}].push_back({i, &in});
      } else if (bucketable) {
        bucket_seq[{in.op, *bucketable}].push_back({i, &in});
      }
      // the NVMe tier's reads and writes move opt(S) of a stage whose home is nvme, in a plan that names the tier
      if ((in.op == Op::TierRead || in.op == Op::TierWrite) && in.buf) {
        const BufferDecl* d = in.buf->kind == BufKind::Opt ? p.find_buffer(BufKind::Opt, in.buf->stage) : nullptr;
        if (!d || d->home != Tier::Nvme) add(pre + in.buf->str() + " is not optimizer state whose home is nvme");
        if (p.nvme.empty()) add(pre + "the plan names no nvme path");
      }
      if (op.operands & kOpPeer) {
        if (in.peer < 0 || in.peer >= G)
          add(pre + "peer g" + std::to_string(in.peer) + " out of range 0.." + std::to_string(G - 1));
        else if (in.peer == g)
          add(pre + "peer is its own gpu");
      }
      if (op.operands & kOpTag) {
        if (in.tag.empty())
          add(pre + "missing tag");
        else if (op.sync != Sync::None)
          (op.sync == Sync::PairSource ? sends : recvs)[in.tag].push_back({g, i, &in});
      }
      // addgrad: the one use, a tied head's gradient into stage 0 (tied-embeddings)
      if (in.op == Op::AddGrad && in.buf &&
          (in.buf->kind != BufKind::TieGrad || in.buf->stage != S - 1 || in.stage != 0 || !p.model.tied_embeddings || S < 2))
        add(pre + "adds " + in.buf->str() + " into S" + std::to_string(in.stage) + "; a plan adds only tiegrad(S" +
            std::to_string(S - 1) + ") of a tied model with several stages, into S0");
      // an op of a stage runs on the stage's GPU
      if (need_stage && in.stage >= 0 && in.stage < S && (!need_mb || (in.mb >= 0 && in.mb < M))) {
        const int owner = p.stages[in.stage].gpu;
        if (owner != g)
          add(pre + "S" + std::to_string(in.stage) + " belongs to g" + std::to_string(owner) + ", not g" +
              std::to_string(g));
        if ((in.op == Op::Forward || in.op == Op::Backward) && in.seg <= 0)  // a whole one, or its first segment
          (in.op == Op::Forward ? fwd : bwd)[{in.stage, in.mb}].push_back({g, i});
        if (in.op == Op::Forward || in.op == Op::Backward) {
          if (in.seg >= 0) seg_of[{(int)in.op, in.stage, in.mb}].push_back({in.seg, g, i});
          else ++whole[{(int)in.op, in.stage, in.mb}];
        }
      }
      // ---- tensor-parallel segments and their collectives (docs/plan-format.md "Tensor-parallel segments") ----
      const bool part = in.buf && (in.buf->kind == BufKind::Part || in.buf->kind == BufKind::PartGrad);
      if (in.seg < -1) add(pre + "seg=" + std::to_string(in.seg) + " (must be >= 0)");
      if (in.seg >= 0 && !(in.op == Op::Forward || in.op == Op::Backward || (in.op == Op::AllReduce && part)))
        add(pre + "seg= only marks a tensor-parallel segment (forward, backward) or its allreduce of part/partgrad");
      else if (in.seg >= 0 && p.tp <= 1)
        add(pre + "seg=" + std::to_string(in.seg) + " in a plan with tp=" + std::to_string(p.tp) + " (segments are tensor-parallel)");
      if ((in.op == Op::Forward || in.op == Op::Backward) && in.seg >= 0 && p.tp > 1 && in.stage >= 0 && in.stage < S) {
        const int n = tp_collectives(p, in.stage, in.op);
        if (in.seg > n)
          add(pre + "segment " + std::to_string(in.seg) + " of S" + std::to_string(in.stage) + ", which has " +
              std::to_string(n + 1) + " (" + std::to_string(n) + " tp collective(s) between them)");
      }
      if (part && in.op != Op::AllReduce)
        add(pre + in.buf->str() + " is only named by the allreduce that sums it over the tp group");
      if (part && in.op == Op::AllReduce && in.buf->stage >= 0 && in.buf->stage < S) {
        const Op of = in.buf->kind == BufKind::Part ? Op::Forward : Op::Backward;
        const int n = tp_collectives(p, in.buf->stage, of);
        if (p.tp > 1 && in.seg >= 0 && in.seg >= n)
          add(pre + "collective seg=" + std::to_string(in.seg) + " of " + to_string(of) + " S" + std::to_string(in.buf->stage) +
              ", which has " + std::to_string(n));
        if (in.seg < 0) add(pre + in.buf->str() + " without seg= (which segment's partial sum it is)");
        if (in.group != tp_group_name(p, g)) add(pre + in.buf->str() + " is summed over group '" + in.group + "', not '" + tp_group_name(p, g) + "'");
        if (in.stream != Stream::Comp) add(pre + in.buf->str() + " is summed on @" + to_string(in.stream) + ", not @comp (its segments' stream)");
        if (p.stages[in.buf->stage].gpu != g) add(pre + in.buf->str() + ": S" + std::to_string(in.buf->stage) + " is not on g" + std::to_string(g));
        if (in.seg >= 0) coll_of[{(int)of, in.buf->stage, in.buf->mb}].push_back({in.seg, g, i});
      }
    }
    for (const auto& [key, seq] : bucket_seq) {
      if (std::none_of(seq.begin(), seq.end(), [](const Coll& c) { return c.in->buckets != 0; })) continue;  // whole only
      const int n = seq.front().in->buckets;
      const std::string what = std::string(to_string(key.first)) + " " + key.second.str();
      bool ok = (int)seq.size() == std::max(1, n);
      for (size_t k = 0; k < seq.size() && ok; ++k) ok = seq[k].in->buckets == n && seq[k].in->bucket == (int)k;
      if (!ok) {
        std::string got;
        for (const auto& c : seq) got += (got.empty() ? "%" : ", %") + std::to_string(c.idx) + (c.in->buckets ? "[" + std::to_string(c.in->bucket + 1) + "/" + std::to_string(c.in->buckets) + "]" : std::string(" whole"));
        add(at(g, seq.front().idx) + what + ": a bucketed buffer is worked on in its buckets 1..n in order, each once; got " + got);
      }
    }
  }

  // ---- send/recv matching ----
  for (const auto& [tag, ss] : sends) {
    for (size_t k = 1; k < ss.size(); ++k)
      add(at(ss[k].gpu, ss[k].idx) + "send: duplicate tag '" + tag + "' (first used by g" + std::to_string(ss[0].gpu) +
          " %" + std::to_string(ss[0].idx) + ")");
    const Comm& s = ss[0];
    auto it = recvs.find(tag);
    if (it == recvs.end()) {
      add(at(s.gpu, s.idx) + "send: no recv with tag '" + tag + "'");
      continue;
    }
    const Comm& r = it->second[0];
    std::string pre = at(s.gpu, s.idx) + "send tag '" + tag + "': ";
    if (r.gpu != s.in->peer)
      add(pre + "sent to g" + std::to_string(s.in->peer) + " but the recv is on g" + std::to_string(r.gpu) + " %" +
          std::to_string(r.idx));
    if (r.in->peer != s.gpu)
      add(pre + "the recv (g" + std::to_string(r.gpu) + " %" + std::to_string(r.idx) + ") expects it from g" +
          std::to_string(r.in->peer));
    if (r.in->buf != s.in->buf)
      add(pre + "buffer " + (s.in->buf ? s.in->buf->str() : "?") + " but the recv (g" + std::to_string(r.gpu) + " %" +
          std::to_string(r.idx) + ") receives " + (r.in->buf ? r.in->buf->str() : "?"));
  }
  for (const auto& [tag, rs] : recvs) {
    for (size_t k = 1; k < rs.size(); ++k)
      add(at(rs[k].gpu, rs[k].idx) + "recv: duplicate tag '" + tag + "' (first used by g" + std::to_string(rs[0].gpu) +
          " %" + std::to_string(rs[0].idx) + ")");
    if (!sends.count(tag)) add(at(rs[0].gpu, rs[0].idx) + "recv: no send with tag '" + tag + "'");
  }

  // ---- collective matching: every program whose ranks are in a group issues the group's collectives in the same
  // order with the same op and buffer (the transports match collectives by issue order) ----
  for (const auto& [name, members] : groups) {
    auto cit = coll_seq.find(name);
    std::set<int> progs;
    for (int r : members) progs.insert(rank_coord(p, r).pipe);
    if (progs.size() < 2 && (cit == coll_seq.end() || cit->second.size() <= 1)) continue;
    int ref_g = -1;
    const std::vector<Coll>* ref = nullptr;
    static const std::vector<Coll> none;
    for (int g : progs) {
      const std::vector<Coll>* mine = &none;
      if (cit != coll_seq.end() && cit->second.count(g)) mine = &cit->second.at(g);
      if (!ref) { ref = mine; ref_g = g; continue; }
      const size_t n = std::min(ref->size(), mine->size());
      for (size_t k = 0; k < n; ++k) {
        const Instr& a = *(*ref)[k].in;
        const Instr& b = *(*mine)[k].in;
        if (a.op != b.op || a.buf != b.buf || a.bucket != b.bucket || a.buckets != b.buckets)
          add(at(g, (*mine)[k].idx) + to_string(b.op) + ": collective #" + std::to_string(k) + " on group '" + name + "' is " +
              print_op(b) + ", but g" + std::to_string(ref_g) + "'s (%" + std::to_string((*ref)[k].idx) + ") is " + print_op(a));
      }
      if (ref->size() != mine->size())
        add("group '" + name + "': g" + std::to_string(ref_g) + " issues " + std::to_string(ref->size()) + " collective(s), g" +
            std::to_string(g) + " issues " + std::to_string(mine->size()));
    }
  }

  // ---- tensor-parallel segments: all of them or none, in order, each collective between its segments ----
  for (const auto& [key, list] : seg_of) {
    const auto [opi, s, m] = key;
    const Op op = (Op)opi;
    const int n = tp_collectives(p, s, op);
    const std::string what = std::string(to_string(op)) + " S" + std::to_string(s) + " m" + std::to_string(m);
    const std::string pbuf = BufRef{op == Op::Forward ? BufKind::Part : BufKind::PartGrad, s, m}.str();
    const int g = list[0].gpu;
    if (whole.count(key)) add("g" + std::to_string(g) + ": " + what + " is both whole and in segments");
    std::vector<int> at_seg(n + 1, -1), at_coll(std::max(n, 0), -1);
    for (const auto& x : list) {
      if (x.seg > n) continue;  // reported above
      if (at_seg[x.seg] >= 0) add(at(x.gpu, x.idx) + what + ": segment " + std::to_string(x.seg) + " again (first %" + std::to_string(at_seg[x.seg]) + ")");
      else at_seg[x.seg] = x.idx;
    }
    auto cit = coll_of.find(key);
    if (cit != coll_of.end())
      for (const auto& x : cit->second) {
        if (x.seg >= n) continue;  // reported above
        if (at_coll[x.seg] >= 0) add(at(x.gpu, x.idx) + "allreduce " + pbuf + " seg=" + std::to_string(x.seg) + " again");
        else at_coll[x.seg] = x.idx;
      }
    for (int k = 0; k <= n; ++k)
      if (at_seg[k] < 0) add("g" + std::to_string(g) + ": " + what + ": no segment seg=" + std::to_string(k) + " (it has " + std::to_string(n + 1) + ")");
    // one segmented computation at a time (the engine parks one body between its segments; on CUDA a backward's body
    // holds autograd's device thread): no other forward/backward between its first and last segment
    if (at_seg[0] >= 0 && at_seg[n] > at_seg[0] && g >= 0 && g < (int)p.programs.size())
      for (int i = at_seg[0] + 1; i < at_seg[n] && i < (int)p.programs[g].instrs.size(); ++i) {
        const Instr& o = p.programs[g].instrs[i];
        if ((o.op == Op::Forward || o.op == Op::Backward) && !(o.op == op && o.stage == s && o.mb == m)) {
          add(at(g, i) + to_string(o.op) + ": runs between the segments of " + what + " (%" + std::to_string(at_seg[0]) + "..%" +
              std::to_string(at_seg[n]) + "); segmented computations do not interleave");
          break;
        }
      }
    for (int k = 0; k < n; ++k) {
      if (at_coll[k] < 0) {
        add("g" + std::to_string(g) + ": " + what + ": no `allreduce " + pbuf + " seg=" + std::to_string(k) + "` after its segment " + std::to_string(k));
        continue;
      }
      if (at_seg[k] >= 0 && at_coll[k] < at_seg[k])
        add(at(g, at_coll[k]) + "allreduce " + pbuf + " seg=" + std::to_string(k) + " comes before the segment it sums (%" + std::to_string(at_seg[k]) + ")");
      if (at_seg[k + 1] >= 0 && at_coll[k] > at_seg[k + 1])
        add(at(g, at_seg[k + 1]) + what + " seg=" + std::to_string(k + 1) + " comes before the allreduce of the partial sum it reads (%" +
            std::to_string(at_coll[k]) + ")");
    }
  }
  for (const auto& [key, list] : coll_of)
    if (!seg_of.count(key))
      add(at(list[0].gpu, list[0].idx) + "allreduce of a partial sum of " + to_string((Op)std::get<0>(key)) + " S" +
          std::to_string(std::get<1>(key)) + " m" + std::to_string(std::get<2>(key)) + ", which is not in segments");

  // ---- forward/backward: exactly one each per (stage, mb), forward first ----
  for (int s = 0; s < S; ++s) {
    for (int m = 0; m < M; ++m) {
      const auto fi = fwd.find({s, m});
      const auto bi = bwd.find({s, m});
      const int owner = p.stages[s].gpu;
      const std::string sm = "S" + std::to_string(s) + " m" + std::to_string(m);
      const size_t nf = fi == fwd.end() ? 0 : fi->second.size();
      const size_t nb = bi == bwd.end() ? 0 : bi->second.size();
      if (nf == 0) add("g" + std::to_string(owner) + ": no forward " + sm);
      for (size_t k = 1; k < nf; ++k)
        add(at(fi->second[k].gpu, fi->second[k].idx) + "forward: second forward " + sm);
      if (nb == 0) add("g" + std::to_string(owner) + ": no backward " + sm);
      for (size_t k = 1; k < nb; ++k)
        add(at(bi->second[k].gpu, bi->second[k].idx) + "backward: second backward " + sm);
      if (nf >= 1 && nb >= 1) {
        const Loc f = fi->second[0], b = bi->second[0];
        if (f.gpu == b.gpu && b.idx < f.idx)
          add(at(b.gpu, b.idx) + "backward: backward " + sm + " comes before its forward (%" + std::to_string(f.idx) + ")");
      }
    }
  }
  return out;
}

}  // namespace

void verify_structure_or_throw(const Plan& p) {
  auto problems = verify_structure(p);
  if (problems.empty()) return;
  std::string msg = "plan structure: " + std::to_string(problems.size()) + " problem(s):";
  const size_t shown = std::min<size_t>(problems.size(), 50);
  for (size_t i = 0; i < shown; ++i) msg += "\n  " + problems[i];
  if (shown < problems.size()) msg += "\n  ... and " + std::to_string(problems.size() - shown) + " more";
  throw VerifyError(msg);
}


}  // namespace mmoc::ir
