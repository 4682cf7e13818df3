// partition: model layers -> v*N contiguous stages, balanced by modelled compute time. The contract
// below is the pass's documentation (docs/passes.md is generated from it).
#include <algorithm>
#include <limits>

#include "passes/pass.hpp"

namespace mmoc {

extern const char* const kPartitionContract = R"md(Model layers -> v*N contiguous stages, balanced by modelled compute time.

- **Requires**: the plan header (gpus, v, microbatches, mbs, seq, budget).
- **Guarantees**: `plan.stages` holds v*N stages covering layers [0, L+2) in order, stage s on pipeline rank s % N,
  each with its parameter count, modelled forward/backward times per micro-batch (backward includes the recompute
  forward when recompute is on, less the last recomputed layer's down projection, whose output value is never read)
  and transient workspaces. The split minimises the slowest stage (an exact dynamic
  programme over the contiguous splits), then the largest stage's weight bytes among equally fast splits.
- **Decides**: recompute as the job says (on/off); `auto` starts on (offload-insertion may turn it off).
- **Recovers from the plan**: nothing beyond the stage table.
)md";

namespace {
struct Cell { double cost = std::numeric_limits<double>::infinity(); int64_t bytes = 0; int split = -1; };
bool better(double c1, int64_t b1, double c2, int64_t b2) {
  const double tol = 1e-9 * std::max(1.0, std::max(c1, c2));
  if (c1 < c2 - tol) return true;
  if (c1 > c2 + tol) return false;
  return b1 < b2;
}
}  // namespace

void fill_stage_costs(const PassContext& c, ir::Stage& st) {
  const auto& m = c.model;
  const int mbs = c.plan.micro_batch_size, seq = c.plan.seq_len, ab = c.act_bytes();
  st.params = 0; st.fwd_ms = 0; st.bwd_ms = 0; st.fwd_ws = 0; st.bwd_ws = 0;
  // partial recompute: layers [begin, rc_end) recompute, [rc_end, end) keep their stash (Stage::keep_layers)
  const int rc_end = st.layer_begin + st.recompute_layers();
  double rc_fwd_ms = 0;
  int64_t stash_rc = 0, bwd_ws_max = 0;
  for (int l = st.layer_begin; l < st.layer_end; ++l) {
    st.params += m.layer_params(l);
    const double f = c.cost.layer_fwd_ms(l, mbs, seq);
    st.fwd_ms += f;
    st.bwd_ms += c.cost.layer_bwd_ms(l, mbs, seq);
    st.fwd_ws = std::max(st.fwd_ws, m.layer_fwd_workspace(l, mbs, seq, ab));
    bwd_ws_max = std::max(bwd_ws_max, m.layer_bwd_workspace(l, mbs, seq, ab));
    if (l < rc_end) {
      // the last recomputed layer's output is not needed (only its gradient path): SwiGluDown skips its down GEMM
      rc_fwd_ms += l + 1 == rc_end ? c.cost.layer_recompute_ms(l, mbs, seq, false) : f;
      stash_rc += m.layer_stash_bytes(l, mbs, seq, false, ab);
    }
  }
  // The weight gradient: autograd holds the gradient of every parameter of the stage until they are gathered into one
  // flat gradient (params x act_bytes each), which is then added into wgrad(S).
  st.bwd_ws = bwd_ws_max + 2 * st.params * ab;
  if (st.selective)  // the kept layers' backward recomputes their SwiGLU (ModelSpec::layer_can_select)
    for (int l = rc_end; l < st.layer_end; ++l) st.bwd_ms += c.cost.layer_selective_ms(l, mbs, seq);
  if (st.recompute) {
    st.bwd_ms += rc_fwd_ms;  // the recomputed layers' forward runs again inside backward
    st.bwd_ws += stash_rc;   // and materialises their stash while it runs
  }
}

int64_t stage_stash_bytes(const PassContext& c, const ir::Stage& st) {
  int64_t s = 0;
  for (int l = st.layer_begin + st.recompute_layers(); l < st.layer_end; ++l)
    s += c.model.layer_stash_bytes(l, c.plan.micro_batch_size, c.plan.seq_len, false, c.act_bytes(), st.selective);
  return s;
}

int64_t boundary_bytes(const PassContext& c) {
  return (int64_t)c.plan.micro_batch_size * c.plan.seq_len * c.model.hidden * c.act_bytes();
}

void partition_pass(PassContext& c) {
  auto& p = c.plan;
  const int n = c.model.num_model_layers();
  const int P = p.gpus * p.v;
  if (P > n)
    throw InputError("v x gpus = " + std::to_string(p.v) + " x " + std::to_string(p.gpus) + " = " + std::to_string(P) +
                     " stages, but " + c.model.name + " has only " + std::to_string(n) +
                     " partitionable layers (embedding, " + std::to_string(c.model.layers) +
                     " decoder layers, head): lower --v or --gpus");
  const bool rc = c.job.recompute != "off";
  const int mbs = p.micro_batch_size, seq = p.seq_len;
  std::vector<double> w(n);
  std::vector<int64_t> bytes(n);
  for (int l = 0; l < n; ++l) {
    // with the layer's tensor-parallel collectives: they run between its segments on comp
    double f = c.cost.layer_fwd_total_ms(l, mbs, seq);
    w[l] = f + c.cost.layer_bwd_total_ms(l, mbs, seq) + (rc ? f : 0.0);
    bytes[l] = c.model.layer_params(l);
  }
  // a recomputing stage does not rerun its last layer's down projection (CostModel::layer_recompute_ms): what a stage
  // ending at layer l takes off its summed cost
  std::vector<double> skip(n, 0.0);
  if (rc)
    for (int l = 0; l < n; ++l) skip[l] = c.cost.layer_fwd_ms(l, mbs, seq) - c.cost.layer_recompute_ms(l, mbs, seq, false);
  std::vector<double> pre(n + 1, 0);
  std::vector<int64_t> preb(n + 1, 0);
  for (int l = 0; l < n; ++l) { pre[l + 1] = pre[l] + w[l]; preb[l + 1] = preb[l] + bytes[l]; }
  // dp[k][j]: best split of layers [0,j) into k stages.
  std::vector<std::vector<Cell>> dp(P + 1, std::vector<Cell>(n + 1));
  dp[0][0] = {0.0, 0, -1};
  for (int k = 1; k <= P; ++k)
    for (int j = k; j <= n - (P - k); ++j)
      for (int i = k - 1; i < j; ++i) {
        const Cell& prev = dp[k - 1][i];
        if (prev.split == -1 && !(k - 1 == 0 && i == 0)) continue;
        double cst = std::max(prev.cost, pre[j] - pre[i] - skip[j - 1]);
        int64_t b = std::max(prev.bytes, preb[j] - preb[i]);
        if (dp[k][j].split == -1 || better(cst, b, dp[k][j].cost, dp[k][j].bytes)) dp[k][j] = {cst, b, i};
      }
  std::vector<int> cuts(P + 1);
  cuts[P] = n;
  for (int k = P; k >= 1; --k) cuts[k - 1] = dp[k][cuts[k]].split;
  p.stages.clear();
  for (int s = 0; s < P; ++s) {
    ir::Stage st;
    st.id = s;
    st.gpu = s % p.gpus;
    st.layer_begin = cuts[s];
    st.layer_end = cuts[s + 1];
    st.recompute = rc;
    fill_stage_costs(c, st);
    p.stages.push_back(st);
  }
  c.notes.push_back("partition: slowest stage " + std::to_string(dp[P][n].cost) + " ms per micro-batch (fwd+bwd)");
}

}  // namespace mmoc
