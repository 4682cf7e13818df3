// tp-lowering: the tensor-parallel collectives of forward and backward as instructions. The contract below is the
// pass's documentation (docs/passes.md is generated from it).
#include <algorithm>
#include <map>
#include <tuple>

#include "ir/ops.hpp"
#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kTpLoweringContract = R"md(The tensor-parallel collectives of forward and backward as instructions.

- **Requires**: data-parallel done (every other pass keys its work on whole `forward S m` / `backward S m`).
- **Guarantees**: with tp > 1, each `forward S m` and `backward S m` of a stage that issues n = `ir::tp_collectives`
  all-reduces over its tensor-parallel group (n > 0) becomes n + 1 segments on comp, `forward S m seg=k`, each but the
  last followed by `allreduce part(S,m) seg=k group=tp.g<p>` on comp (backward: `partgrad(S,m)`), which the next
  segment reads: forward, the sum after the vocabulary-parallel embedding and after every row-parallel projection
  (o_proj, down); backward, the gradient of every column-parallel input (q/k/v, gate/up, the head) and, for a stage
  that recomputes its first layers in backward, their forward sums again. The first segment takes the instruction's
  `after` deps; whatever depended on it depends on its last segment. `part(S)` and `partgrad(S)` are declared in the
  buffer table (mbs x seq x hidden in compute precision). No overlap reordering: a micro-batch's segments and
  collectives are consecutive. With tp = 1 the plan is unchanged.
- **Recovers from the plan**: nothing (it keeps no state).
)md";

using ir::BufKind;
using ir::Op;

namespace {
int64_t part_bytes(const ir::Plan& p) {
  const int64_t elt = p.train.precision == "fp32" ? 4 : 2;
  return (int64_t)p.micro_batch_size * p.seq_len * p.model.hidden * elt;
}
}  // namespace

void lower_tp(ir::Plan& p) {
  if (p.tp <= 1) return;
  for (auto& prog : p.programs) {
    const auto& old = prog.instrs;
    std::vector<int> last(old.size());  // old index -> new index of its (last) instruction
    std::vector<ir::Instr> out;
    out.reserve(old.size());
    for (size_t i = 0; i < old.size(); ++i) {
      const ir::Instr& in = old[i];
      const int n = (in.op == Op::Forward || in.op == Op::Backward) && in.seg < 0 ? ir::tp_collectives(p, in.stage, in.op) : 0;
      if (n == 0) {
        out.push_back(in);
      } else {
        const BufKind kind = in.op == Op::Forward ? BufKind::Part : BufKind::PartGrad;
        for (int k = 0; k <= n; ++k) {
          ir::Instr sg = in;
          sg.seg = k;
          if (k > 0) sg.after.clear();  // stream order: the collective before it, on comp
          out.push_back(sg);
          if (k == n) break;
          ir::Instr ar = make_buf_op(Op::AllReduce, ir::Stream::Comp, {kind, in.stage, in.mb});
          ar.group = ir::tp_group_name(p, prog.gpu);
          ar.seg = k;
          out.push_back(ar);
        }
      }
      last[i] = (int)out.size() - 1;
    }
    // deps on an expanded instruction wait for its last segment; the first segment keeps the original deps (renumbered)
    for (auto& in : out)
      for (auto& a : in.after) a = last[a];
    prog.instrs = std::move(out);
  }
  for (const auto& st : p.stages)
    for (BufKind k : {BufKind::Part, BufKind::PartGrad}) {
      const Op op = k == BufKind::Part ? Op::Forward : Op::Backward;
      if (ir::tp_collectives(p, st.id, op) == 0 || p.find_buffer(k, st.id)) continue;
      p.buffers.push_back({k, st.id, part_bytes(p), ir::Tier::Gpu});
    }
}

void unlower_tp(ir::Plan& p) {
  for (auto& prog : p.programs) {
    const auto& old = prog.instrs;
    std::vector<int> map(old.size(), -1);
    std::vector<ir::Instr> out;
    // a segmented instruction maps to its one whole instruction (at its first segment's place)
    std::map<std::tuple<int, int, int>, int> whole;
    for (size_t i = 0; i < old.size(); ++i) {
      const ir::Instr& in = old[i];
      const bool part = in.op == Op::AllReduce && in.buf && (in.buf->kind == BufKind::Part || in.buf->kind == BufKind::PartGrad);
      if (part) {
        map[i] = out.empty() ? 0 : (int)out.size() - 1;  // (only segments depend on it)
        continue;
      }
      if ((in.op == Op::Forward || in.op == Op::Backward) && in.seg >= 0) {
        const std::tuple<int, int, int> key{(int)in.op, in.stage, in.mb};
        auto it = whole.find(key);
        if (it != whole.end()) {
          map[i] = it->second;
          continue;
        }
        ir::Instr w = in;
        w.seg = -1;
        whole[key] = map[i] = (int)out.size();
        out.push_back(w);
        continue;
      }
      map[i] = (int)out.size();
      out.push_back(in);
    }
    for (size_t j = 0; j < out.size(); ++j) {
      std::vector<int> a;
      for (int x : out[j].after)
        if (map[x] != (int)j) a.push_back(map[x]);
      std::sort(a.begin(), a.end());
      a.erase(std::unique(a.begin(), a.end()), a.end());
      out[j].after = std::move(a);
    }
    prog.instrs = std::move(out);
  }
  p.buffers.erase(std::remove_if(p.buffers.begin(), p.buffers.end(),
                                 [](const ir::BufferDecl& d) { return d.kind == BufKind::Part || d.kind == BufKind::PartGrad; }),
                  p.buffers.end());
}

void tp_lowering_pass(PassContext& c) {
  if (c.plan.tp <= 1) return;
  lower_tp(c.plan);
  int n = 0;
  for (const auto& prog : c.plan.programs)
    for (const auto& in : prog.instrs) n += in.op == Op::AllReduce && in.seg >= 0;
  c.notes.push_back("tp-lowering: " + std::to_string(n) + " tensor-parallel all-reduces over the tp groups, between the "
                    "segments of forward and backward (per program)");
}

}  // namespace mmoc
