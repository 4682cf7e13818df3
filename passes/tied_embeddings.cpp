// tied-embeddings: a model whose lm_head is its token embedding (tie_word_embeddings), split over several stages: the
// head stage gets the embedding matrix from stage 0 every step and gives its gradient back. The contract below is the
// pass's documentation (docs/passes.md is generated from it).
#include <algorithm>
#include <stdexcept>

#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kTiedEmbeddingsContract = R"md(Tied embeddings over several stages: one master copy of the shared matrix, in stage 0.

- **Requires**: comm-lowering done (the programs hold compute ops and their send/recv/free).
- **Guarantees**: nothing changes unless the model ties lm_head to the token embedding and has more than one stage.
  Then, with L the last (head) stage, stage 0 on rank a and L on rank b:
  - the buffer table declares `tie(S<L>)` (the embedding matrix, vocab x hidden in compute precision, that the head
    uses as its lm_head weight) and `tiegrad(S<L>)` (its gradient), home gpu; forward and backward of S<L> require
    `tie(S<L>)`, backward accumulates `tiegrad(S<L>)` (the op table's TiedHead effects);
  - weight: rank a starts with `prefetch tie(S<L>)` @h2d, a copy of the current embedding rows of stage 0's weights
    (from its host copy when stage 0 is offloaded, from the GPU copy when resident); when a != b it follows with
    `send tie(S<L>) -> g<b>` (tag `T.S<L>`) and `free tie(S<L>)` @p2p, and rank b starts with the matching `recv`;
    the first forward of S<L> waits for it (after); `free tie(S<L>)` @comp follows the last backward of S<L>;
  - gradient: when a != b, rank b ends with `send tiegrad(S<L>) -> g<a>` (tag `TG.S<L>`, after the last backward of
    S<L>) and its `free` @p2p, rank a ends with the `recv` and `addgrad tiegrad(S<L>) -> S0` @comp (after the recv);
    when a == b, rank a ends with the `addgrad`. `addgrad` adds the gradient into the embedding rows of `wgrad(S0)`
    after the last backward of S0, so the shared weight has one gradient, one optimizer state (stage 0's) and counts
    once in the global gradient norm; offload-insertion treats the `addgrad` as the end of stage 0's gradient;
  - the weight message is the first and the gradient message the last on both ranks' p2p streams, so comm-lowering's
    one global message order still holds: no deadlock.
- **Decides**: nothing.
- **Recovers from the plan**: nothing beyond the programs and the buffer table.
)md";

using ir::BufKind;
using ir::BufRef;
using ir::Op;
using ir::Stream;

bool tied_over_stages(const ir::Plan& p) { return p.model.tied_embeddings && p.num_stages() > 1; }

namespace {
int first_of(const ir::Program& prog, Op op, int stage) {
  for (int i = 0; i < (int)prog.instrs.size(); ++i)
    if (prog.instrs[i].op == op && prog.instrs[i].stage == stage) return i;
  return -1;
}
int last_of(const ir::Program& prog, Op op, int stage) {
  for (int i = (int)prog.instrs.size() - 1; i >= 0; --i)
    if (prog.instrs[i].op == op && prog.instrs[i].stage == stage) return i;
  return -1;
}
ir::Instr p2p(Op op, BufRef b, int peer, const std::string& tag, std::vector<int> after = {}) {
  ir::Instr in = make_buf_op(op, Stream::P2P, b);
  in.peer = peer;
  in.tag = tag;
  in.after = std::move(after);
  return in;
}
}  // namespace

void tied_embeddings_pass(PassContext& c) {
  auto& p = c.plan;
  if (!tied_over_stages(p)) return;
  const int L = p.num_stages() - 1, a = p.stages[0].gpu, b = p.stages[L].gpu;
  const BufRef tie{BufKind::Tie, L, -1}, grad{BufKind::TieGrad, L, -1};
  for (const auto& d : p.buffers)
    if (d.kind == BufKind::Tie || d.kind == BufKind::TieGrad)
      throw std::logic_error(std::string("tied-embeddings: the plan already carries the tied embedding (") + ir::to_string(d.kind) + ")");
  const int64_t bytes = (int64_t)p.model.vocab * p.model.hidden * c.act_bytes();
  p.buffers.push_back({BufKind::Tie, L, bytes, ir::Tier::Gpu});
  p.buffers.push_back({BufKind::TieGrad, L, bytes, ir::Tier::Gpu});
  const std::string wtag = "T.S" + std::to_string(L), gtag = "TG.S" + std::to_string(L);
  auto& A = p.programs[a];
  auto& B = p.programs[b];
  if (first_of(B, Op::Forward, L) < 0 || last_of(A, Op::Backward, 0) < 0)
    throw std::logic_error("tied-embeddings: the head's forward or stage 0's backward is missing");

  // the weight, at the start of the step
  const int pf = insert_instr(A, 0, make_buf_op(Op::Prefetch, Stream::H2D, tie));
  int ready = pf;  // on b: what the head's first forward waits for
  if (a != b) {
    insert_instr(A, 1, p2p(Op::Send, tie, b, wtag, {pf}));
    insert_instr(A, 2, make_buf_op(Op::Free, Stream::P2P, tie));
    ready = insert_instr(B, 0, p2p(Op::Recv, tie, a, wtag));
  }
  auto& f = B.instrs[first_of(B, Op::Forward, L)].after;
  f.push_back(ready);
  std::sort(f.begin(), f.end());
  const int lb = last_of(B, Op::Backward, L);
  insert_instr(B, lb + 1, make_buf_op(Op::Free, Stream::Comp, tie));

  // the gradient, at the end of the step
  ir::Instr add;
  add.op = Op::AddGrad;
  add.stream = Stream::Comp;
  add.stage = 0;
  add.buf = grad;
  if (a != b) {
    B.instrs.push_back(p2p(Op::Send, grad, a, gtag, {last_of(B, Op::Backward, L)}));
    B.instrs.push_back(make_buf_op(Op::Free, Stream::P2P, grad));
    A.instrs.push_back(p2p(Op::Recv, grad, b, gtag));
    add.after = {(int)A.instrs.size() - 1};
  }
  A.instrs.push_back(add);
  c.notes.push_back("tied-embeddings: S" + std::to_string(L) + " on g" + std::to_string(b) + " gets the embedding of S0 on g" +
                    std::to_string(a) + (a == b ? " (same GPU: a copy)" : " (send/recv)") + " and returns its gradient");
}

}  // namespace mmoc
