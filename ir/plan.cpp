// mmoc Plan IR: enums, numbers, buffer names. The forms are in plan_json.cpp and plan_text.cpp, the structural
// verifier in verify_structure.cpp, file I/O in plan_files.cpp. The format is specified in docs/plan-format.md.
#include <algorithm>
#include "ir/plan.hpp"

#include <charconv>
#include <cmath>
#include <string>
#include <vector>

#include "ir/ops.hpp"
#include "ir/plan_detail.hpp"

namespace mmoc::ir {
using namespace detail;

// ============================================================================================
// enums
// ============================================================================================
namespace {
constexpr const char* kStreamNames[] = {"comp", "h2d", "d2h", "p2p", "cpu", "io", "opt"};
constexpr const char* kTierNames[] = {"gpu", "host", "nvme"};
constexpr const char* kResidencyNames[] = {"offload", "resident"};
constexpr const char* kOptimPlaceNames[] = {"cpu", "gpu"};

template <class E, size_t N>
const char* enum_name(E e, const char* const (&names)[N]) {
  auto i = static_cast<size_t>(e);
  return i < N ? names[i] : "?";
}
template <class E, size_t N>
E enum_parse(const std::string& s, const char* const (&names)[N], const char* what) {
  for (size_t i = 0; i < N; ++i)
    if (s == names[i]) return static_cast<E>(i);
  throw ParseError(std::string("unknown ") + what + " '" + s + "'");
}
// Ops and buffer kinds are named by their tables (ops.hpp).
template <class E, class Table>
const char* table_name(E e, const Table& t) {
  auto i = static_cast<size_t>(e);
  return i < t.size() ? t[i].name : "?";
}
}  // namespace

const char* to_string(Op e) { return table_name(e, op_table()); }
const char* to_string(Stream e) { return enum_name(e, kStreamNames); }
const char* to_string(Tier e) { return enum_name(e, kTierNames); }
const char* to_string(BufKind e) { return table_name(e, buf_kind_table()); }
const char* to_string(Residency e) { return enum_name(e, kResidencyNames); }
const char* to_string(OptimPlace e) { return enum_name(e, kOptimPlaceNames); }
Op parse_op(const std::string& s) {
  for (const auto& o : op_table())
    if (s == o.name) return o.op;
  throw ParseError("unknown op '" + s + "'");
}
Stream parse_stream(const std::string& s) { return enum_parse<Stream>(s, kStreamNames, "stream"); }
Tier parse_tier(const std::string& s) { return enum_parse<Tier>(s, kTierNames, "tier"); }
BufKind parse_buf_kind(const std::string& s) {
  for (const auto& k : buf_kind_table())
    if (s == k.name) return k.kind;
  throw ParseError("unknown buffer kind '" + s + "'");
}
Residency parse_residency(const std::string& s) { return enum_parse<Residency>(s, kResidencyNames, "weights residency"); }
OptimPlace parse_optim_place(const std::string& s) { return enum_parse<OptimPlace>(s, kOptimPlaceNames, "optim place"); }

// ============================================================================================
// numbers
// ============================================================================================
bool detail::parse_double_exact(std::string_view s, double& out) {
  if (s.empty()) return false;
  auto r = std::from_chars(s.data(), s.data() + s.size(), out, std::chars_format::general);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

namespace {
bool same_double(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}
}  // namespace

// Shortest of %.15g / %.16g / %.17g that reads back to the same double (locale-independent).
std::string format_double(double d) {
  char buf[64];
  std::string last;
  for (int prec : {15, 16, 17}) {
    auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::general, prec);
    last.assign(buf, r.ptr);
    double back = 0;
    if (parse_double_exact(last, back) && same_double(back, d)) return last;
  }
  return last;
}

// ============================================================================================
// buffers
// ============================================================================================
bool BufRef::per_microbatch() const { return buf_kind_info(kind).per_mb; }
bool BufRef::per_stage() const { return buf_kind_info(kind).per_stage; }

std::string BufRef::str() const {
  std::string s = to_string(kind);
  if (!per_stage()) return s + "(m" + std::to_string(mb) + ")";
  s += "(S" + std::to_string(stage);
  if (per_microbatch()) s += ",m" + std::to_string(mb);
  return s + ")";
}

namespace {
// Parses "S<n>" / "m<n>" with non-negative n.
bool parse_prefixed_nonneg(std::string_view tok, char prefix, int& out) {
  if (tok.size() < 2 || tok[0] != prefix) return false;
  tok.remove_prefix(1);
  if (tok[0] < '0' || tok[0] > '9') return false;
  return parse_int_exact(tok, out);
}

// Parses "kind(...)" where the micro-batch may be "*" (allow_star, buffer-table form) or m<k>.
// Returns the ref; for the star form mb is -1 and *star is set.
BufRef parse_buf_impl(const std::string& s, bool allow_star, bool* star) {
  auto fail = [&](const std::string& why) -> ParseError {
    return ParseError("bad buffer name '" + s + "': " + why);
  };
  auto open = s.find('(');
  if (open == std::string::npos || s.empty() || s.back() != ')')
    throw fail(allow_star ? "expected kind(S<s>), kind(S<s>,*) or batch(*)"
                          : "expected kind(S<s>), kind(S<s>,m<k>) or batch(m<k>)");
  BufRef r;
  try {
    r.kind = parse_buf_kind(s.substr(0, open));
  } catch (const ParseError& e) {
    throw fail(e.what());
  }
  std::string inner = s.substr(open + 1, s.size() - open - 2);
  std::vector<std::string> parts;
  {
    size_t b = 0;
    for (;;) {
      auto c = inner.find(',', b);
      parts.push_back(inner.substr(b, c == std::string::npos ? std::string::npos : c - b));
      if (c == std::string::npos) break;
      b = c + 1;
    }
  }
  auto parse_mb = [&](const std::string& t) {
    if (allow_star) {
      if (t != "*") throw fail("the buffer table uses '*' for the micro-batch");
      if (star) *star = true;
      return -1;
    }
    int v = -1;
    if (!parse_prefixed_nonneg(t, 'm', v)) throw fail("expected micro-batch m<k>, got '" + t + "'");
    return v;
  };
  if (!r.per_stage()) {
    if (parts.size() != 1) throw fail(std::string(to_string(r.kind)) + " takes only a micro-batch");
    r.stage = -1;
    r.mb = parse_mb(parts[0]);
    return r;
  }
  if (!parse_prefixed_nonneg(parts[0], 'S', r.stage)) throw fail("expected stage S<s>, got '" + parts[0] + "'");
  if (r.per_microbatch()) {
    if (parts.size() != 2) throw fail(std::string(to_string(r.kind)) + " needs a stage and a micro-batch");
    r.mb = parse_mb(parts[1]);
  } else {
    if (parts.size() != 1) throw fail(std::string(to_string(r.kind)) + " is per stage (no micro-batch)");
    r.mb = -1;
  }
  return r;
}

}  // namespace

std::string detail::decl_str(const BufferDecl& d) {
  std::string s = to_string(d.kind);
  if (!buf_kind_info(d.kind).per_stage) return s + "(*)";
  s += "(S" + std::to_string(d.stage);
  if (BufRef{d.kind, d.stage, -1}.per_microbatch()) s += ",*";
  return s + ")";
}

void detail::parse_decl_name(const std::string& s, BufferDecl& d) {
  bool star = false;
  BufRef r = parse_buf_impl(s, true, &star);
  d.kind = r.kind;
  d.stage = r.stage;
}

BufRef BufRef::parse(const std::string& s) { return parse_buf_impl(s, false, nullptr); }

const BufferDecl* Plan::find_buffer(BufKind k, int stage) const {
  if (!buf_kind_info(k).per_stage) stage = -1;
  for (const auto& b : buffers)
    if (b.kind == k && b.stage == stage) return &b;
  return nullptr;
}

int64_t Plan::buffer_bytes(const BufRef& r) const {
  const BufferDecl* d = find_buffer(r.kind, r.stage);
  return d ? d->bytes : 0;
}

// ============================================================================================
// layout (pp x dp x tp)
// ============================================================================================
Plan step_body(const Plan& p, int parity) {
  Plan b;
  // copy everything but the bodies (a plan's programs are most of its size)
  b.format_version = p.format_version;
  b.hardware = p.hardware;
  b.schedule = p.schedule;
  b.gpus = p.gpus, b.v = p.v, b.dp = p.dp, b.tp = p.tp;
  b.microbatches = p.microbatches, b.micro_batch_size = p.micro_batch_size, b.seq_len = p.seq_len;
  b.budget_bytes = p.budget_bytes;
  b.gpu_order = p.gpu_order;
  b.host_bytes = p.host_bytes;
  b.host_budget_bytes = p.host_budget_bytes;
  b.nvme = p.nvme;
  b.nvme_weights = p.nvme_weights;
  b.model = p.model;
  b.train = p.train;
  b.stages = p.stages;
  b.buffers = p.buffers;
  b.programs = parity % 2 == 1 && !p.odd_programs.empty() ? p.odd_programs : p.programs;
  b.predicted = p.predicted;
  return b;
}

const std::vector<int>& carry_in(const Plan& p, int parity) { return parity % 2 ? p.carry_odd : p.carry_even; }

int world_size(const Plan& p) { return std::max(1, p.gpus) * std::max(1, p.dp) * std::max(1, p.tp); }

RankCoord rank_coord(const Plan& p, int r) {
  if (r < 0 || r >= world_size(p))
    throw std::out_of_range("rank " + std::to_string(r) + " outside the layout's " + std::to_string(world_size(p)) + " ranks");
  const int tp = std::max(1, p.tp), pp = std::max(1, p.gpus);
  RankCoord c;
  c.shard = r % tp;
  c.pipe = (r / tp) % pp;
  c.replica = r / (tp * pp);
  return c;
}

int world_rank(const Plan& p, int pipe, int replica, int shard) {
  return (replica * std::max(1, p.gpus) + pipe) * std::max(1, p.tp) + shard;
}

int physical_gpu(const Plan& p, int r) {
  return (int)p.gpu_order.size() == world_size(p) && r >= 0 && r < (int)p.gpu_order.size() ? p.gpu_order[r] : r;
}

std::string dp_group_name(const Plan&, int pipe) { return "dp.g" + std::to_string(pipe); }
std::string tp_group_name(const Plan&, int pipe) { return "tp.g" + std::to_string(pipe); }

int tp_collectives(const Plan& p, int stage, Op op) {
  if (p.tp <= 1 || stage < 0 || stage >= p.num_stages() || (op != Op::Forward && op != Op::Backward)) return 0;
  const Stage& st = p.stages[stage];
  const int L = p.model.layers;
  auto decoder = [&](int a, int b) { return std::max(0, std::min(b, L + 1) - std::max(a, 1)); };  // layers 1..L in [a,b)
  auto fwd = [&](int a, int b) { return (a == 0 && b > 0 ? 1 : 0) + 2 * decoder(a, b); };        // g's
  auto bwd = [&](int a, int b) { return 2 * decoder(a, b) + (a <= L + 1 && L + 1 < b ? 1 : 0); }; // f's
  if (op == Op::Forward) return fwd(st.layer_begin, st.layer_end);
  return bwd(st.layer_begin, st.layer_end) + fwd(st.layer_begin, st.layer_begin + st.recompute_layers());
}

std::string rank_group(const Plan& p, const std::string& name, int r) {
  if (p.tp <= 1 || name == "world" || r < 0 || r >= world_size(p)) return name;
  const RankCoord c = rank_coord(p, r);
  if (name == dp_group_name(p, c.pipe)) return name + ".t" + std::to_string(c.shard);
  if (name == tp_group_name(p, c.pipe)) return name + ".r" + std::to_string(c.replica);
  return name;
}

std::map<std::string, std::vector<int>> process_groups(const Plan& p) {
  std::map<std::string, std::vector<int>> g;
  const int W = world_size(p), pp = std::max(1, p.gpus), dp = std::max(1, p.dp), tp = std::max(1, p.tp);
  for (int r = 0; r < W; ++r) g["world"].push_back(r);
  for (int pi = 0; pi < pp; ++pi)
    for (int d = 0; d < dp; ++d)
      for (int t = 0; t < tp; ++t) {
        const int r = world_rank(p, pi, d, t);
        g[rank_group(p, dp_group_name(p, pi), r)].push_back(r);
        if (tp > 1) g[rank_group(p, tp_group_name(p, pi), r)].push_back(r);
      }
  for (int d = 0; d < dp; ++d)
    for (int pi = 0; pi < pp; ++pi) g["pp.r" + std::to_string(d)].push_back(world_rank(p, pi, d, 0));
  for (auto& [n, rs] : g) std::sort(rs.begin(), rs.end());
  return g;
}

std::map<std::string, std::vector<int>> program_groups(const Plan& p) {
  std::map<std::string, std::vector<int>> g;
  const int W = world_size(p);
  for (int r = 0; r < W; ++r) {
    const int pi = rank_coord(p, r).pipe;
    g["world"].push_back(r);
    g[dp_group_name(p, pi)].push_back(r);
    if (p.tp > 1) g[tp_group_name(p, pi)].push_back(r);
  }
  return g;
}

// ============================================================================================
// operands per op
// ============================================================================================
namespace detail {
bool op_has_buf(Op op) { return op_info(op).operands & kOpBuf; }
bool op_has_stage(Op op) { return op_info(op).operands & kOpStage; }
bool op_has_mb(Op op) { return op_info(op).operands & kOpMb; }
bool op_has_peer(Op op) { return op_info(op).operands & kOpPeer; }
}  // namespace detail

}  // namespace mmoc::ir
