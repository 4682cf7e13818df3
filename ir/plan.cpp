// mmoc Plan IR: enums, buffer names, JSON and text forms, file I/O and the structural verifier.
// The format is specified in docs/plan-format.md.
#include "ir/plan.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <nlohmann/json.hpp>

namespace mmoc::ir {

// ============================================================================================
// enums
// ============================================================================================
namespace {
constexpr const char* kOpNames[] = {"load_batch", "prefetch", "forward", "backward", "send",  "recv",
                                    "evict",      "free",     "allreduce", "gradnorm", "optim"};
constexpr const char* kStreamNames[] = {"comp", "h2d", "d2h", "p2p", "cpu"};
constexpr const char* kTierNames[] = {"gpu", "host", "nvme"};
constexpr const char* kKindNames[] = {"w", "wgrad", "act", "grad", "stash", "batch", "opt"};
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
}  // namespace

const char* to_string(Op e) { return enum_name(e, kOpNames); }
const char* to_string(Stream e) { return enum_name(e, kStreamNames); }
const char* to_string(Tier e) { return enum_name(e, kTierNames); }
const char* to_string(BufKind e) { return enum_name(e, kKindNames); }
const char* to_string(Residency e) { return enum_name(e, kResidencyNames); }
const char* to_string(OptimPlace e) { return enum_name(e, kOptimPlaceNames); }
Op parse_op(const std::string& s) { return enum_parse<Op>(s, kOpNames, "op"); }
Stream parse_stream(const std::string& s) { return enum_parse<Stream>(s, kStreamNames, "stream"); }
Tier parse_tier(const std::string& s) { return enum_parse<Tier>(s, kTierNames, "tier"); }
BufKind parse_buf_kind(const std::string& s) { return enum_parse<BufKind>(s, kKindNames, "buffer kind"); }
Residency parse_residency(const std::string& s) { return enum_parse<Residency>(s, kResidencyNames, "weights residency"); }
OptimPlace parse_optim_place(const std::string& s) { return enum_parse<OptimPlace>(s, kOptimPlaceNames, "optim place"); }

// ============================================================================================
// numbers
// ============================================================================================
namespace {
template <class T>
bool parse_int_exact(std::string_view s, T& out) {
  if (s.empty()) return false;
  auto r = std::from_chars(s.data(), s.data() + s.size(), out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

bool parse_double_exact(std::string_view s, double& out) {
  if (s.empty()) return false;
  auto r = std::from_chars(s.data(), s.data() + s.size(), out, std::chars_format::general);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

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
std::string BufRef::str() const {
  std::string s = to_string(kind);
  if (kind == BufKind::Batch) return s + "(m" + std::to_string(mb) + ")";
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
  if (r.kind == BufKind::Batch) {
    if (parts.size() != 1) throw fail("batch takes only a micro-batch");
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

std::string decl_str(const BufferDecl& d) {
  std::string s = to_string(d.kind);
  if (d.kind == BufKind::Batch) return s + "(*)";
  s += "(S" + std::to_string(d.stage);
  if (BufRef{d.kind, d.stage, -1}.per_microbatch()) s += ",*";
  return s + ")";
}

void parse_decl_name(const std::string& s, BufferDecl& d) {
  bool star = false;
  BufRef r = parse_buf_impl(s, true, &star);
  d.kind = r.kind;
  d.stage = r.stage;
}
}  // namespace

BufRef BufRef::parse(const std::string& s) { return parse_buf_impl(s, false, nullptr); }

const BufferDecl* Plan::find_buffer(BufKind k, int stage) const {
  if (k == BufKind::Batch) stage = -1;
  for (const auto& b : buffers)
    if (b.kind == k && b.stage == stage) return &b;
  return nullptr;
}

int64_t Plan::buffer_bytes(const BufRef& r) const {
  const BufferDecl* d = find_buffer(r.kind, r.stage);
  return d ? d->bytes : 0;
}

// ============================================================================================
// JSON form
// ============================================================================================
namespace {
using ojson = nlohmann::ordered_json;

ojson jdouble(double d) {
  if (std::isfinite(d)) return ojson(d);
  if (std::isnan(d)) return ojson("nan");
  return ojson(d > 0 ? "inf" : "-inf");
}

ojson instr_to_json(const Instr& in) {
  ojson j;
  j["op"] = to_string(in.op);
  j["stream"] = to_string(in.stream);
  if (in.stage != -1) j["stage"] = in.stage;
  if (in.mb != -1) j["mb"] = in.mb;
  if (in.buf) j["buf"] = in.buf->str();
  if (in.peer != -1) j["peer"] = in.peer;
  if (!in.tag.empty()) j["tag"] = in.tag;
  if (!in.group.empty()) j["group"] = in.group;
  if (in.to_host) j["to_host"] = true;
  if (!in.after.empty()) j["after"] = in.after;
  return j;
}

ojson plan_to_json(const Plan& p) {
  ojson j;
  j["format"] = "mmoc-plan";
  j["version"] = p.format_version;
  ojson& pl = j["plan"];
  pl["hardware"] = p.hardware;
  pl["schedule"] = p.schedule;
  pl["gpus"] = p.gpus;
  pl["v"] = p.v;
  pl["dp"] = p.dp;
  pl["microbatches"] = p.microbatches;
  pl["mbs"] = p.micro_batch_size;
  pl["seq"] = p.seq_len;
  pl["budget"] = p.budget_bytes;
  pl["order"] = p.gpu_order;
  ojson& m = j["model"];
  m["name"] = p.model.name;
  m["layers"] = p.model.layers;
  m["hidden"] = p.model.hidden;
  m["ffn"] = p.model.ffn;
  m["heads"] = p.model.heads;
  m["kv_heads"] = p.model.kv_heads;
  m["vocab"] = p.model.vocab;
  m["rope_theta"] = jdouble(p.model.rope_theta);
  m["norm_eps"] = jdouble(p.model.norm_eps);
  m["tied"] = p.model.tied_embeddings;
  ojson& t = j["train"];
  t["precision"] = p.train.precision;
  t["lr"] = jdouble(p.train.lr);
  t["beta1"] = jdouble(p.train.beta1);
  t["beta2"] = jdouble(p.train.beta2);
  t["eps"] = jdouble(p.train.eps);
  t["wd"] = jdouble(p.train.weight_decay);
  t["clip"] = jdouble(p.train.max_grad_norm);
  t["lr_schedule"] = p.train.lr_schedule;
  t["warmup"] = p.train.warmup_steps;
  t["total"] = p.train.total_steps;
  t["seed"] = p.train.seed;
  if (p.train.on_nonfinite != "stop") t["on_nonfinite"] = p.train.on_nonfinite;
  ojson stages = ojson::array();
  for (const auto& s : p.stages) {
    ojson o;
    o["id"] = s.id;
    o["gpu"] = s.gpu;
    o["layers"] = {s.layer_begin, s.layer_end};
    o["recompute"] = s.recompute;
    o["weights"] = to_string(s.weights);
    o["optim"] = to_string(s.optim);
    o["params"] = s.params;
    o["fwd_ws"] = s.fwd_ws;
    o["bwd_ws"] = s.bwd_ws;
    o["fwd_ms"] = jdouble(s.fwd_ms);
    o["bwd_ms"] = jdouble(s.bwd_ms);
    stages.push_back(std::move(o));
  }
  j["stages"] = std::move(stages);
  ojson bufs = ojson::array();
  for (const auto& b : p.buffers) {
    ojson o;
    o["buf"] = decl_str(b);
    o["bytes"] = b.bytes;
    o["home"] = to_string(b.home);
    bufs.push_back(std::move(o));
  }
  j["buffers"] = std::move(bufs);
  if (p.predicted) {
    ojson o;
    o["step_s"] = jdouble(p.predicted->step_s);
    o["tokens_per_s"] = jdouble(p.predicted->tokens_per_s);
    o["bubble"] = jdouble(p.predicted->bubble);
    o["peak"] = p.predicted->peak_bytes;
    o["bound"] = p.predicted->bound_bytes;
    j["predicted"] = std::move(o);
  }
  ojson progs = ojson::array();
  for (const auto& pr : p.programs) {
    ojson o;
    o["gpu"] = pr.gpu;
    ojson ins = ojson::array();
    for (const auto& in : pr.instrs) ins.push_back(instr_to_json(in));
    o["instrs"] = std::move(ins);
    progs.push_back(std::move(o));
  }
  j["programs"] = std::move(progs);
  return j;
}

// ---- reading ----
std::string jtype(const ojson& v) {
  if (v.is_number_integer()) return "integer " + v.dump();
  if (v.is_number_float()) return "number " + v.dump();
  if (v.is_string()) return "string " + v.dump();
  return v.type_name();
}

[[noreturn]] void jfail(const std::string& path, const std::string& msg) {
  throw ParseError((path.empty() ? std::string("(top level)") : path) + ": " + msg);
}

int64_t jint(const ojson& v, const std::string& path, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) jfail(path, "expected integer, got " + jtype(v));
  if (v.is_number_unsigned() && v.get<uint64_t>() > (uint64_t)std::numeric_limits<int64_t>::max())
    jfail(path, "integer " + v.dump() + " out of range");
  int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) jfail(path, "integer " + v.dump() + " out of range");
  return x;
}
int jint32(const ojson& v, const std::string& path) { return (int)jint(v, path, INT_MIN, INT_MAX); }
int64_t jint64(const ojson& v, const std::string& path) {
  return jint(v, path, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
}
double jdbl(const ojson& v, const std::string& path) {
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) {
    const auto& s = v.get_ref<const std::string&>();
    if (s == "inf") return std::numeric_limits<double>::infinity();
    if (s == "-inf") return -std::numeric_limits<double>::infinity();
    if (s == "nan") return std::numeric_limits<double>::quiet_NaN();
  }
  jfail(path, "expected number, got " + jtype(v));
}
bool jbool(const ojson& v, const std::string& path) {
  if (!v.is_boolean()) jfail(path, "expected true/false, got " + jtype(v));
  return v.get<bool>();
}
std::string jstr(const ojson& v, const std::string& path) {
  if (!v.is_string()) jfail(path, "expected string, got " + jtype(v));
  return v.get<std::string>();
}
template <class F>
auto jenum(const ojson& v, const std::string& path, F parse) {
  std::string s = jstr(v, path);
  try {
    return parse(s);
  } catch (const ParseError& e) {
    jfail(path, e.what());
  }
}
template <class T, class F>
std::vector<T> jarray(const ojson& v, const std::string& path, F elem) {
  if (!v.is_array()) jfail(path, "expected array, got " + jtype(v));
  std::vector<T> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) out.push_back(elem(v[i], path + "[" + std::to_string(i) + "]"));
  return out;
}

// An object being read: records which keys were consumed; done() rejects the rest.
class JObj {
 public:
  JObj(const ojson& j, std::string path) : j_(j), path_(std::move(path)) {
    if (!j.is_object()) jfail(path_, "expected object, got " + jtype(j));
  }
  std::string sub(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  const ojson& req(const char* key) {
    used_.insert(key);
    auto it = j_.find(key);
    if (it == j_.end()) jfail(path_, std::string("missing key '") + key + "'");
    return *it;
  }
  const ojson* opt(const char* key) {
    used_.insert(key);
    auto it = j_.find(key);
    return it == j_.end() ? nullptr : &*it;
  }
  void done() const {
    for (auto it = j_.begin(); it != j_.end(); ++it)
      if (!used_.count(it.key())) jfail(sub(it.key()), "unknown key");
  }

 private:
  const ojson& j_;
  std::string path_;
  std::set<std::string> used_;
};

Instr instr_from_json(const ojson& j, const std::string& path) {
  JObj o(j, path);
  Instr in;
  in.op = jenum(o.req("op"), o.sub("op"), parse_op);
  in.stream = jenum(o.req("stream"), o.sub("stream"), parse_stream);
  if (auto* v = o.opt("stage")) in.stage = jint32(*v, o.sub("stage"));
  if (auto* v = o.opt("mb")) in.mb = jint32(*v, o.sub("mb"));
  if (auto* v = o.opt("buf")) in.buf = jenum(*v, o.sub("buf"), BufRef::parse);
  if (auto* v = o.opt("peer")) in.peer = jint32(*v, o.sub("peer"));
  if (auto* v = o.opt("tag")) in.tag = jstr(*v, o.sub("tag"));
  if (auto* v = o.opt("group")) in.group = jstr(*v, o.sub("group"));
  if (auto* v = o.opt("to_host")) in.to_host = jbool(*v, o.sub("to_host"));
  if (auto* v = o.opt("after")) in.after = jarray<int>(*v, o.sub("after"), jint32);
  o.done();
  return in;
}

Plan plan_from_json(const ojson& root) {
  JObj r(root, "");
  Plan p;
  {
    std::string f = jstr(r.req("format"), "format");
    if (f != "mmoc-plan") jfail("format", "expected \"mmoc-plan\", got \"" + f + "\"");
    int v = jint32(r.req("version"), "version");
    if (v != 1) jfail("version", "unsupported plan format version " + std::to_string(v) + " (this build reads 1)");
    p.format_version = v;
  }
  {
    JObj o(r.req("plan"), "plan");
    p.hardware = jstr(o.req("hardware"), o.sub("hardware"));
    p.schedule = jstr(o.req("schedule"), o.sub("schedule"));
    p.gpus = jint32(o.req("gpus"), o.sub("gpus"));
    p.v = jint32(o.req("v"), o.sub("v"));
    p.dp = jint32(o.req("dp"), o.sub("dp"));
    p.microbatches = jint32(o.req("microbatches"), o.sub("microbatches"));
    p.micro_batch_size = jint32(o.req("mbs"), o.sub("mbs"));
    p.seq_len = jint32(o.req("seq"), o.sub("seq"));
    p.budget_bytes = jint64(o.req("budget"), o.sub("budget"));
    p.gpu_order = jarray<int>(o.req("order"), o.sub("order"), jint32);
    o.done();
  }
  {
    JObj o(r.req("model"), "model");
    p.model.name = jstr(o.req("name"), o.sub("name"));
    p.model.layers = jint32(o.req("layers"), o.sub("layers"));
    p.model.hidden = jint32(o.req("hidden"), o.sub("hidden"));
    p.model.ffn = jint32(o.req("ffn"), o.sub("ffn"));
    p.model.heads = jint32(o.req("heads"), o.sub("heads"));
    p.model.kv_heads = jint32(o.req("kv_heads"), o.sub("kv_heads"));
    p.model.vocab = jint32(o.req("vocab"), o.sub("vocab"));
    p.model.rope_theta = jdbl(o.req("rope_theta"), o.sub("rope_theta"));
    p.model.norm_eps = jdbl(o.req("norm_eps"), o.sub("norm_eps"));
    p.model.tied_embeddings = jbool(o.req("tied"), o.sub("tied"));
    o.done();
  }
  {
    JObj o(r.req("train"), "train");
    p.train.precision = jstr(o.req("precision"), o.sub("precision"));
    p.train.lr = jdbl(o.req("lr"), o.sub("lr"));
    p.train.beta1 = jdbl(o.req("beta1"), o.sub("beta1"));
    p.train.beta2 = jdbl(o.req("beta2"), o.sub("beta2"));
    p.train.eps = jdbl(o.req("eps"), o.sub("eps"));
    p.train.weight_decay = jdbl(o.req("wd"), o.sub("wd"));
    p.train.max_grad_norm = jdbl(o.req("clip"), o.sub("clip"));
    p.train.lr_schedule = jstr(o.req("lr_schedule"), o.sub("lr_schedule"));
    p.train.warmup_steps = jint32(o.req("warmup"), o.sub("warmup"));
    p.train.total_steps = jint32(o.req("total"), o.sub("total"));
    p.train.seed = jint32(o.req("seed"), o.sub("seed"));
    if (auto* v = o.opt("on_nonfinite")) p.train.on_nonfinite = jstr(*v, o.sub("on_nonfinite"));
    o.done();
  }
  p.stages = jarray<Stage>(r.req("stages"), "stages", [](const ojson& v, const std::string& path) {
    JObj o(v, path);
    Stage s;
    s.id = jint32(o.req("id"), o.sub("id"));
    s.gpu = jint32(o.req("gpu"), o.sub("gpu"));
    auto layers = jarray<int>(o.req("layers"), o.sub("layers"), jint32);
    if (layers.size() != 2) jfail(o.sub("layers"), "expected [begin, end], got " + std::to_string(layers.size()) + " values");
    s.layer_begin = layers[0];
    s.layer_end = layers[1];
    s.recompute = jbool(o.req("recompute"), o.sub("recompute"));
    s.weights = jenum(o.req("weights"), o.sub("weights"), parse_residency);
    s.optim = jenum(o.req("optim"), o.sub("optim"), parse_optim_place);
    s.params = jint64(o.req("params"), o.sub("params"));
    s.fwd_ws = jint64(o.req("fwd_ws"), o.sub("fwd_ws"));
    s.bwd_ws = jint64(o.req("bwd_ws"), o.sub("bwd_ws"));
    s.fwd_ms = jdbl(o.req("fwd_ms"), o.sub("fwd_ms"));
    s.bwd_ms = jdbl(o.req("bwd_ms"), o.sub("bwd_ms"));
    o.done();
    return s;
  });
  p.buffers = jarray<BufferDecl>(r.req("buffers"), "buffers", [](const ojson& v, const std::string& path) {
    JObj o(v, path);
    BufferDecl d;
    std::string name = jstr(o.req("buf"), o.sub("buf"));
    try {
      parse_decl_name(name, d);
    } catch (const ParseError& e) {
      jfail(o.sub("buf"), e.what());
    }
    d.bytes = jint64(o.req("bytes"), o.sub("bytes"));
    d.home = jenum(o.req("home"), o.sub("home"), parse_tier);
    o.done();
    return d;
  });
  if (auto* v = r.opt("predicted")) {
    JObj o(*v, "predicted");
    Predicted pr;
    pr.step_s = jdbl(o.req("step_s"), o.sub("step_s"));
    pr.tokens_per_s = jdbl(o.req("tokens_per_s"), o.sub("tokens_per_s"));
    pr.bubble = jdbl(o.req("bubble"), o.sub("bubble"));
    pr.peak_bytes = jarray<int64_t>(o.req("peak"), o.sub("peak"), jint64);
    pr.bound_bytes = jarray<int64_t>(o.req("bound"), o.sub("bound"), jint64);
    o.done();
    p.predicted = std::move(pr);
  }
  p.programs = jarray<Program>(r.req("programs"), "programs", [](const ojson& v, const std::string& path) {
    JObj o(v, path);
    Program pr;
    pr.gpu = jint32(o.req("gpu"), o.sub("gpu"));
    pr.instrs = jarray<Instr>(o.req("instrs"), o.sub("instrs"), instr_from_json);
    o.done();
    return pr;
  });
  r.done();
  return p;
}
}  // namespace

std::string to_json_string(const Plan& p, int indent) { return plan_to_json(p).dump(indent); }

Plan from_json_string(const std::string& s) {
  ojson j;
  try {
    j = ojson::parse(s);
  } catch (const nlohmann::json::parse_error& e) {
    throw ParseError(std::string("JSON syntax error: ") + e.what());
  }
  return plan_from_json(j);
}

// ============================================================================================
// text form
// ============================================================================================
namespace {
// Strings print bare when they consist of printable ASCII without '"' and '\\'; otherwise (spaces,
// quotes, control or non-ASCII bytes) as a JSON string literal.
std::string text_str(const std::string& s) {
  bool bare = true;
  for (unsigned char c : s)
    if (c <= 0x20 || c >= 0x7f || c == '"' || c == '\\') bare = false;
  return bare ? s : ojson(s).dump();
}

template <class T>
std::string join_ints(const std::vector<T>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

const char* b01(bool b) { return b ? "1" : "0"; }

bool op_has_buf(Op op) {
  switch (op) {
    case Op::Prefetch: case Op::Send: case Op::Recv: case Op::Evict: case Op::Free: case Op::AllReduce: return true;
    default: return false;
  }
}
bool op_has_stage(Op op) { return op == Op::Forward || op == Op::Backward || op == Op::Optim; }
bool op_has_mb(Op op) { return op == Op::Forward || op == Op::Backward || op == Op::LoadBatch; }
bool op_has_peer(Op op) { return op == Op::Send || op == Op::Recv; }
}  // namespace

std::string print_instr(const Instr& in, int index) {
  std::string s = "%" + std::to_string(index) + " = " + to_string(in.op);
  auto buf = [&] { return in.buf ? in.buf->str() : std::string("?"); };
  switch (in.op) {
    case Op::LoadBatch: s += " m" + std::to_string(in.mb); break;
    case Op::Prefetch: s += " " + buf() + " <- host"; break;
    case Op::Forward:
    case Op::Backward: s += " S" + std::to_string(in.stage) + " m" + std::to_string(in.mb); break;
    case Op::Send: s += " " + buf() + " -> g" + std::to_string(in.peer); break;
    case Op::Recv: s += " " + buf() + " <- g" + std::to_string(in.peer); break;
    case Op::Evict: s += " " + buf() + (in.to_host ? " -> host" : ""); break;
    case Op::Free:
    case Op::AllReduce: s += " " + buf(); break;
    case Op::GradNorm: break;
    case Op::Optim: s += " S" + std::to_string(in.stage); break;
  }
  s += " @";
  s += to_string(in.stream);
  if (!in.after.empty()) {
    s += " after(";
    for (size_t i = 0; i < in.after.size(); ++i) s += (i ? ",%" : "%") + std::to_string(in.after[i]);
    s += ")";
  }
  if (!in.tag.empty()) s += " tag=" + text_str(in.tag);
  if (!in.group.empty()) s += " group=" + text_str(in.group);
  // Fields that this op's syntax does not carry (normally unset; kept so the text form is lossless).
  if (!op_has_stage(in.op) && in.stage != -1) s += " stage=" + std::to_string(in.stage);
  if (!op_has_mb(in.op) && in.mb != -1) s += " mb=" + std::to_string(in.mb);
  if (!op_has_buf(in.op) && in.buf) s += " buf=" + in.buf->str();
  if (!op_has_peer(in.op) && in.peer != -1) s += " peer=" + std::to_string(in.peer);
  if (in.op != Op::Evict && in.to_host) s += " to_host=1";
  return s;
}

std::string print_text(const Plan& p) {
  std::string o;
  o += "plan hardware=" + text_str(p.hardware) + " schedule=" + text_str(p.schedule) + " gpus=" + std::to_string(p.gpus) +
       " v=" + std::to_string(p.v) + " dp=" + std::to_string(p.dp) + " microbatches=" + std::to_string(p.microbatches) +
       " mbs=" + std::to_string(p.micro_batch_size) + " seq=" + std::to_string(p.seq_len) +
       " budget=" + std::to_string(p.budget_bytes) + " order=" + join_ints(p.gpu_order) + "\n";
  const auto& m = p.model;
  o += "model name=" + text_str(m.name) + " layers=" + std::to_string(m.layers) + " hidden=" + std::to_string(m.hidden) +
       " ffn=" + std::to_string(m.ffn) + " heads=" + std::to_string(m.heads) + " kv_heads=" + std::to_string(m.kv_heads) +
       " vocab=" + std::to_string(m.vocab) + " rope_theta=" + format_double(m.rope_theta) +
       " norm_eps=" + format_double(m.norm_eps) + " tied=" + b01(m.tied_embeddings) + "\n";
  const auto& t = p.train;
  o += "train precision=" + text_str(t.precision) + " lr=" + format_double(t.lr) + " beta1=" + format_double(t.beta1) +
       " beta2=" + format_double(t.beta2) + " eps=" + format_double(t.eps) + " wd=" + format_double(t.weight_decay) +
       " clip=" + format_double(t.max_grad_norm) + " lr_schedule=" + text_str(t.lr_schedule) +
       " warmup=" + std::to_string(t.warmup_steps) + " total=" + std::to_string(t.total_steps) +
       " seed=" + std::to_string(t.seed) + (t.on_nonfinite != "stop" ? " on_nonfinite=" + text_str(t.on_nonfinite) : std::string()) + "\n";
  for (const auto& s : p.stages)
    o += "stage S" + std::to_string(s.id) + " gpu=" + std::to_string(s.gpu) + " layers=" + std::to_string(s.layer_begin) +
         "-" + std::to_string(s.layer_end) + " recompute=" + b01(s.recompute) + " weights=" + to_string(s.weights) +
         " optim=" + to_string(s.optim) + " params=" + std::to_string(s.params) + " fwd_ws=" + std::to_string(s.fwd_ws) +
         " bwd_ws=" + std::to_string(s.bwd_ws) + " fwd_ms=" + format_double(s.fwd_ms) +
         " bwd_ms=" + format_double(s.bwd_ms) + "\n";
  for (const auto& b : p.buffers)
    o += "buffer " + decl_str(b) + " bytes=" + std::to_string(b.bytes) + " home=" + to_string(b.home) + "\n";
  if (p.predicted) {
    const auto& pr = *p.predicted;
    o += "predicted step_s=" + format_double(pr.step_s) + " tokens_per_s=" + format_double(pr.tokens_per_s) +
         " bubble=" + format_double(pr.bubble) + " peak=" + join_ints(pr.peak_bytes) +
         " bound=" + join_ints(pr.bound_bytes) + "\n";
  }
  for (const auto& pg : p.programs) {
    o += "gpu g" + std::to_string(pg.gpu) + " {\n";
    for (size_t i = 0; i < pg.instrs.size(); ++i) o += "  " + print_instr(pg.instrs[i], (int)i) + "\n";
    o += "}\n";
  }
  return o;
}

namespace {
// Error inside one line; the caller adds the line number and the line text.
struct LineError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Splits on blanks; a '"' starts a JSON string literal that runs to the matching unescaped '"'.
std::vector<std::string> tokenize(const std::string& line) {
  std::vector<std::string> toks;
  size_t i = 0, n = line.size();
  while (i < n) {
    while (i < n && (line[i] == ' ' || line[i] == '\t')) ++i;
    if (i >= n) break;
    std::string tok;
    while (i < n && line[i] != ' ' && line[i] != '\t') {
      if (line[i] == '"') {
        tok += line[i++];
        bool closed = false;
        while (i < n) {
          char c = line[i++];
          tok += c;
          if (c == '\\' && i < n) {
            tok += line[i++];
          } else if (c == '"') {
            closed = true;
            break;
          }
        }
        if (!closed) throw LineError("unterminated string");
      } else {
        tok += line[i++];
      }
    }
    toks.push_back(std::move(tok));
  }
  return toks;
}

std::string decode_str(const std::string& v, const std::string& key) {
  if (v.empty() || v[0] != '"') return v;
  try {
    auto j = ojson::parse(v);
    if (j.is_string()) return j.get<std::string>();
  } catch (const nlohmann::json::exception&) {
  }
  throw LineError("bad quoted string for '" + key + "': " + v);
}

int to_int(const std::string& v, const std::string& key) {
  int x = 0;
  if (!parse_int_exact(v, x)) throw LineError("'" + key + "': expected integer, got '" + v + "'");
  return x;
}
int64_t to_int64(const std::string& v, const std::string& key) {
  int64_t x = 0;
  if (!parse_int_exact(v, x)) throw LineError("'" + key + "': expected integer, got '" + v + "'");
  return x;
}
double to_dbl(const std::string& v, const std::string& key) {
  double x = 0;
  if (!parse_double_exact(v, x)) throw LineError("'" + key + "': expected number, got '" + v + "'");
  return x;
}
bool to_bool(const std::string& v, const std::string& key) {
  if (v == "1") return true;
  if (v == "0") return false;
  throw LineError("'" + key + "': expected 0 or 1, got '" + v + "'");
}
template <class T>
std::vector<T> to_ints(const std::string& v, const std::string& key) {
  std::vector<T> out;
  if (v.empty()) return out;
  size_t b = 0;
  for (;;) {
    auto c = v.find(',', b);
    std::string part = v.substr(b, c == std::string::npos ? std::string::npos : c - b);
    T x{};
    if (!parse_int_exact(part, x)) throw LineError("'" + key + "': expected comma-separated integers, got '" + v + "'");
    out.push_back(x);
    if (c == std::string::npos) break;
    b = c + 1;
  }
  return out;
}
template <class F>
auto to_enum(const std::string& v, const std::string& key, F parse) {
  try {
    return parse(v);
  } catch (const ParseError& e) {
    throw LineError("'" + key + "': " + e.what());
  }
}

// Parses "<prefix><int>" (the int may be negative).
int prefixed_int(const std::string& tok, const char* prefix, const char* what) {
  size_t n = std::strlen(prefix);
  int x = 0;
  if (tok.compare(0, n, prefix) != 0 || !parse_int_exact(std::string_view(tok).substr(n), x))
    throw LineError(std::string("expected ") + what + " (" + prefix + "<n>), got '" + tok + "'");
  return x;
}

// key=value fields of a header line: all of `keys` required, no others, no repeats.
class KV {
 public:
  // keys: required; optional: may be absent (has() tells)
  KV(const std::vector<std::string>& toks, size_t first, std::initializer_list<const char*> keys, const char* line_kind,
     std::initializer_list<const char*> optional = {}) {
    std::set<std::string> allowed(keys.begin(), keys.end());
    allowed.insert(optional.begin(), optional.end());
    for (size_t i = first; i < toks.size(); ++i) {
      auto eq = toks[i].find('=');
      if (eq == std::string::npos || eq == 0) throw LineError("expected key=value, got '" + toks[i] + "'");
      std::string k = toks[i].substr(0, eq);
      if (!allowed.count(k)) throw LineError(std::string("unknown key '") + k + "' in " + line_kind + " line");
      if (!map_.emplace(k, toks[i].substr(eq + 1)).second) throw LineError("key '" + k + "' given twice");
    }
    for (const char* k : keys)
      if (!map_.count(k)) throw LineError(std::string("missing key '") + k + "' in " + line_kind + " line");
  }
  bool has(const char* k) const { return map_.count(k) != 0; }
  const std::string& raw(const char* k) const { return map_.at(k); }
  std::string str(const char* k) const { return decode_str(raw(k), k); }
  int i32(const char* k) const { return to_int(raw(k), k); }
  int64_t i64(const char* k) const { return to_int64(raw(k), k); }
  double dbl(const char* k) const { return to_dbl(raw(k), k); }
  bool b(const char* k) const { return to_bool(raw(k), k); }

 private:
  std::map<std::string, std::string> map_;
};

BufRef to_buf(const std::string& tok) {
  try {
    return BufRef::parse(tok);
  } catch (const ParseError& e) {
    throw LineError(e.what());
  }
}

Instr parse_instr_tokens(const std::vector<std::string>& t, int expect_index) {
  if (t.size() < 3 || t[1] != "=") throw LineError("expected '%<i> = <op> ...'");
  int idx = prefixed_int(t[0], "%", "instruction index");
  if (idx != expect_index)
    throw LineError("instruction index %" + std::to_string(idx) + " out of sequence (expected %" +
                    std::to_string(expect_index) + ")");
  Instr in;
  try {
    in.op = parse_op(t[2]);
  } catch (const ParseError& e) {
    throw LineError(e.what());
  }
  size_t k = 3;
  auto next = [&](const char* what) -> const std::string& {
    if (k >= t.size()) throw LineError(std::string("missing ") + what + " for " + to_string(in.op));
    return t[k++];
  };
  auto expect = [&](const char* word) {
    const std::string& w = next(word);
    if (w != word) throw LineError(std::string("expected '") + word + "', got '" + w + "'");
  };
  auto buf = [&] {
    const std::string& b = next("buffer");
    if (b == "?") return;
    in.buf = to_buf(b);
  };
  switch (in.op) {
    case Op::LoadBatch: in.mb = prefixed_int(next("micro-batch"), "m", "micro-batch"); break;
    case Op::Prefetch:
      buf();
      expect("<-");
      to_enum(next("source tier"), "prefetch source", parse_tier);  // informational: the buffer table's home decides
      break;
    case Op::Forward:
    case Op::Backward:
      in.stage = prefixed_int(next("stage"), "S", "stage");
      in.mb = prefixed_int(next("micro-batch"), "m", "micro-batch");
      break;
    case Op::Send:
      buf();
      expect("->");
      in.peer = prefixed_int(next("peer"), "g", "peer gpu");
      break;
    case Op::Recv:
      buf();
      expect("<-");
      in.peer = prefixed_int(next("peer"), "g", "peer gpu");
      break;
    case Op::Evict:
      buf();
      if (k < t.size() && t[k] == "->") {
        ++k;
        expect("host");
        in.to_host = true;
      }
      break;
    case Op::Free:
    case Op::AllReduce: buf(); break;
    case Op::GradNorm: break;
    case Op::Optim: in.stage = prefixed_int(next("stage"), "S", "stage"); break;
  }
  bool have_stream = false, have_after = false;
  std::set<std::string> seen;
  for (; k < t.size(); ++k) {
    const std::string& w = t[k];
    if (w.size() > 1 && w[0] == '@') {
      if (have_stream) throw LineError("stream given twice");
      in.stream = to_enum(w.substr(1), "stream", parse_stream);
      have_stream = true;
    } else if (w.rfind("after(", 0) == 0) {
      if (have_after) throw LineError("after(...) given twice");
      if (w.back() != ')') throw LineError("bad dependency list '" + w + "'");
      std::string inner = w.substr(6, w.size() - 7);
      size_t b = 0;
      while (b <= inner.size() && !inner.empty()) {
        auto c = inner.find(',', b);
        std::string part = inner.substr(b, c == std::string::npos ? std::string::npos : c - b);
        in.after.push_back(prefixed_int(part, "%", "instruction reference"));
        if (c == std::string::npos) break;
        b = c + 1;
      }
      have_after = true;
    } else if (auto eq = w.find('='); eq != std::string::npos && eq > 0) {
      std::string key = w.substr(0, eq), val = w.substr(eq + 1);
      if (!seen.insert(key).second) throw LineError("'" + key + "' given twice");
      if (key == "tag") {
        in.tag = decode_str(val, key);
      } else if (key == "group") {
        in.group = decode_str(val, key);
      } else if (key == "stage" && !op_has_stage(in.op)) {
        in.stage = to_int(val, key);
      } else if (key == "mb" && !op_has_mb(in.op)) {
        in.mb = to_int(val, key);
      } else if (key == "buf" && !op_has_buf(in.op)) {
        in.buf = to_buf(val);
      } else if (key == "peer" && !op_has_peer(in.op)) {
        in.peer = to_int(val, key);
      } else if (key == "to_host" && in.op != Op::Evict) {
        in.to_host = to_bool(val, key);
      } else {
        throw LineError("unexpected '" + w + "' for " + to_string(in.op));
      }
    } else {
      throw LineError("unexpected '" + w + "'");
    }
  }
  if (!have_stream) throw LineError("missing @<stream>");
  return in;
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}
}  // namespace

Plan parse_text(const std::string& text) {
  Plan p;
  bool have_plan = false, have_model = false, have_train = false;
  Program* cur = nullptr;
  int cur_open_line = 0;
  int lineno = 0;
  size_t pos = 0;
  std::string line;
  auto fail = [&](const std::string& msg) -> ParseError {
    std::string hint;
    if (pos >= text.size() && !text.empty() && text.back() != '\n') hint = " (the text ends inside this line: truncated?)";
    return ParseError("line " + std::to_string(lineno) + ": " + msg + " (in: `" + line + "`)" + hint);
  };
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    std::string raw = text.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
    pos = nl == std::string::npos ? text.size() : nl + 1;
    ++lineno;
    line = trim(raw);
    if (line.empty() || line[0] == ';') continue;
    try {
      auto t = tokenize(line);
      const std::string& head = t[0];
      if (cur) {
        if (t.size() == 1 && head == "}") {
          cur = nullptr;
          continue;
        }
        if (head.empty() || head[0] != '%')
          throw LineError("expected an instruction or '}' closing gpu g" + std::to_string(cur->gpu) + " (opened on line " +
                          std::to_string(cur_open_line) + ")");
        cur->instrs.push_back(parse_instr_tokens(t, (int)cur->instrs.size()));
        continue;
      }
      if (head == "plan") {
        if (have_plan) throw LineError("second 'plan' line");
        KV kv(t, 1, {"hardware", "schedule", "gpus", "v", "dp", "microbatches", "mbs", "seq", "budget", "order"}, "plan");
        p.hardware = kv.str("hardware");
        p.schedule = kv.str("schedule");
        p.gpus = kv.i32("gpus");
        p.v = kv.i32("v");
        p.dp = kv.i32("dp");
        p.microbatches = kv.i32("microbatches");
        p.micro_batch_size = kv.i32("mbs");
        p.seq_len = kv.i32("seq");
        p.budget_bytes = kv.i64("budget");
        p.gpu_order = to_ints<int>(kv.raw("order"), "order");
        have_plan = true;
      } else if (head == "model") {
        if (have_model) throw LineError("second 'model' line");
        KV kv(t, 1, {"name", "layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "rope_theta", "norm_eps", "tied"},
              "model");
        auto& m = p.model;
        m.name = kv.str("name");
        m.layers = kv.i32("layers");
        m.hidden = kv.i32("hidden");
        m.ffn = kv.i32("ffn");
        m.heads = kv.i32("heads");
        m.kv_heads = kv.i32("kv_heads");
        m.vocab = kv.i32("vocab");
        m.rope_theta = kv.dbl("rope_theta");
        m.norm_eps = kv.dbl("norm_eps");
        m.tied_embeddings = kv.b("tied");
        have_model = true;
      } else if (head == "train") {
        if (have_train) throw LineError("second 'train' line");
        KV kv(t, 1,
              {"precision", "lr", "beta1", "beta2", "eps", "wd", "clip", "lr_schedule", "warmup", "total", "seed"},
              "train", {"on_nonfinite"});
        auto& tr = p.train;
        tr.precision = kv.str("precision");
        tr.lr = kv.dbl("lr");
        tr.beta1 = kv.dbl("beta1");
        tr.beta2 = kv.dbl("beta2");
        tr.eps = kv.dbl("eps");
        tr.weight_decay = kv.dbl("wd");
        tr.max_grad_norm = kv.dbl("clip");
        tr.lr_schedule = kv.str("lr_schedule");
        tr.warmup_steps = kv.i32("warmup");
        tr.total_steps = kv.i32("total");
        tr.seed = kv.i32("seed");
        if (kv.has("on_nonfinite")) tr.on_nonfinite = kv.str("on_nonfinite");
        have_train = true;
      } else if (head == "stage") {
        if (t.size() < 2) throw LineError("expected 'stage S<i> ...'");
        Stage s;
        s.id = prefixed_int(t[1], "S", "stage id");
        KV kv(t, 2,
              {"gpu", "layers", "recompute", "weights", "optim", "params", "fwd_ws", "bwd_ws", "fwd_ms", "bwd_ms"},
              "stage");
        s.gpu = kv.i32("gpu");
        const std::string& lr = kv.raw("layers");
        auto dash = lr.find('-', 1);
        if (dash == std::string::npos) throw LineError("'layers': expected <begin>-<end>, got '" + lr + "'");
        s.layer_begin = to_int(lr.substr(0, dash), "layers");
        s.layer_end = to_int(lr.substr(dash + 1), "layers");
        s.recompute = kv.b("recompute");
        s.weights = to_enum(kv.raw("weights"), "weights", parse_residency);
        s.optim = to_enum(kv.raw("optim"), "optim", parse_optim_place);
        s.params = kv.i64("params");
        s.fwd_ws = kv.i64("fwd_ws");
        s.bwd_ws = kv.i64("bwd_ws");
        s.fwd_ms = kv.dbl("fwd_ms");
        s.bwd_ms = kv.dbl("bwd_ms");
        p.stages.push_back(s);
      } else if (head == "buffer") {
        if (t.size() < 2) throw LineError("expected 'buffer <name> bytes=... home=...'");
        BufferDecl d;
        try {
          parse_decl_name(t[1], d);
        } catch (const ParseError& e) {
          throw LineError(e.what());
        }
        KV kv(t, 2, {"bytes", "home"}, "buffer");
        d.bytes = kv.i64("bytes");
        d.home = to_enum(kv.raw("home"), "home", parse_tier);
        p.buffers.push_back(d);
      } else if (head == "predicted") {
        if (p.predicted) throw LineError("second 'predicted' line");
        KV kv(t, 1, {"step_s", "tokens_per_s", "bubble", "peak", "bound"}, "predicted");
        Predicted pr;
        pr.step_s = kv.dbl("step_s");
        pr.tokens_per_s = kv.dbl("tokens_per_s");
        pr.bubble = kv.dbl("bubble");
        pr.peak_bytes = to_ints<int64_t>(kv.raw("peak"), "peak");
        pr.bound_bytes = to_ints<int64_t>(kv.raw("bound"), "bound");
        p.predicted = std::move(pr);
      } else if (head == "gpu") {
        if (t.size() != 3 || t[2] != "{") throw LineError("expected 'gpu g<k> {'");
        Program pg;
        pg.gpu = prefixed_int(t[1], "g", "gpu");
        p.programs.push_back(std::move(pg));
        cur = &p.programs.back();
        cur_open_line = lineno;
      } else {
        throw LineError("unknown line kind '" + head + "'");
      }
    } catch (const LineError& e) {
      throw fail(e.what());
    } catch (const ParseError& e) {
      throw fail(e.what());
    }
  }
  line.clear();
  if (cur)
    throw ParseError("line " + std::to_string(lineno) + ": unexpected end of text: gpu g" + std::to_string(cur->gpu) +
                     " opened on line " + std::to_string(cur_open_line) + " is not closed with '}' (truncated?)");
  if (!have_plan) throw ParseError("missing 'plan' line");
  if (!have_model) throw ParseError("missing 'model' line");
  if (!have_train) throw ParseError("missing 'train' line");
  if ((int)p.programs.size() != p.gpus)
    throw ParseError("line " + std::to_string(lineno) + ": expected " + std::to_string(p.gpus) +
                     " 'gpu' blocks (gpus=" + std::to_string(p.gpus) + "), found " + std::to_string(p.programs.size()) +
                     " (truncated?)");
  return p;
}

// ============================================================================================
// files
// ============================================================================================
Plan load_plan_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw ParseError("cannot read plan file '" + path + "': " + std::strerror(errno));
  if (S_ISDIR(st.st_mode)) throw ParseError("cannot read plan file '" + path + "': is a directory");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw ParseError("cannot read plan file '" + path + "': " + std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw ParseError("cannot read plan file '" + path + "': read error");
  std::string s = ss.str();
  auto first = s.find_first_not_of(" \t\r\n");
  try {
    if (first != std::string::npos && s[first] == '{') return from_json_string(s);
    return parse_text(s);
  } catch (const ParseError& e) {
    throw ParseError(path + ": " + e.what());
  }
}

void save_file_atomic(const std::string& path, const std::string& content) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  auto fail = [&](const std::string& what, int err) {
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot write '" + path + "': " + what + ": " + std::strerror(err));
  };
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    int err = errno;
    throw std::runtime_error("cannot write '" + path + "': create " + tmp + ": " + std::strerror(err));
  }
  const char* p = content.data();
  size_t left = content.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      fail("write", err);
    }
    p += n;
    left -= (size_t)n;
  }
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    fail("fsync", err);
  }
  if (::close(fd) != 0) fail("close", errno);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename", errno);
  // Best effort: make the rename durable.
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

// ============================================================================================
// structural verifier
// ============================================================================================
std::vector<std::string> verify_structure(const Plan& p) {
  std::vector<std::string> out;
  const int S = p.num_stages(), M = p.microbatches, G = p.gpus;
  auto add = [&](std::string s) { out.push_back(std::move(s)); };
  auto at = [](int g, int i) { return "g" + std::to_string(g) + " %" + std::to_string(i) + ": "; };

  // ---- plan header ----
  if (G < 1) add("plan: gpus=" + std::to_string(G) + " (must be >= 1)");
  if (M < 1) add("plan: microbatches=" + std::to_string(M) + " (must be >= 1)");
  if (!p.gpu_order.empty()) {
    if ((int)p.gpu_order.size() != G)
      add("plan: order has " + std::to_string(p.gpu_order.size()) + " entries, gpus=" + std::to_string(G));
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
  }
  if (S > 0 && p.stages.back().layer_end != p.model.layers + 2)
    add("stage " + std::to_string(S - 1) + ": last stage ends at layer " + std::to_string(p.stages.back().layer_end) +
        ", expected " + std::to_string(p.model.layers + 2) + " (model.layers + 2)");

  // ---- buffer table ----
  {
    std::set<std::pair<int, int>> seen;
    for (const auto& b : p.buffers) {
      std::string name = decl_str(b);
      if (b.kind == BufKind::Batch ? b.stage != -1 : (b.stage < 0 || b.stage >= S))
        add("buffer " + name + ": stage out of range");
      if (b.bytes < 0) add("buffer " + name + ": negative bytes");
      if (!seen.insert({(int)b.kind, b.stage}).second) add("buffer " + name + ": declared twice");
    }
  }

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

  auto check_buf = [&](const std::string& pre, const BufRef& b) {
    bool ok = true;
    if (b.kind == BufKind::Batch) {
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
    for (size_t ii = 0; ii < pg.instrs.size(); ++ii) {
      const Instr& in = pg.instrs[ii];
      const int i = (int)ii;
      const std::string pre = at(g, i) + to_string(in.op) + ": ";
      for (int a : in.after)
        if (a < 0 || a >= i)
          add(pre + "after(%" + std::to_string(a) + ") does not point to an earlier instruction");
      const bool need_stage = op_has_stage(in.op), need_mb = op_has_mb(in.op), need_buf = op_has_buf(in.op);
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
      if (in.op == Op::AllReduce && in.group.empty()) add(pre + "missing group");
      if (op_has_peer(in.op)) {
        if (in.peer < 0 || in.peer >= G)
          add(pre + "peer g" + std::to_string(in.peer) + " out of range 0.." + std::to_string(G - 1));
        else if (in.peer == g)
          add(pre + "peer is its own gpu");
        if (in.tag.empty())
          add(pre + "missing tag");
        else
          (in.op == Op::Send ? sends : recvs)[in.tag].push_back({g, i, &in});
      }
      if ((in.op == Op::Forward || in.op == Op::Backward) && in.stage >= 0 && in.stage < S && in.mb >= 0 && in.mb < M) {
        const int owner = p.stages[in.stage].gpu;
        if (owner != g)
          add(pre + "S" + std::to_string(in.stage) + " belongs to g" + std::to_string(owner) + ", not g" +
              std::to_string(g));
        (in.op == Op::Forward ? fwd : bwd)[{in.stage, in.mb}].push_back({g, i});
      }
      if (in.op == Op::Optim && in.stage >= 0 && in.stage < S && p.stages[in.stage].gpu != g)
        add(pre + "S" + std::to_string(in.stage) + " belongs to g" + std::to_string(p.stages[in.stage].gpu) +
            ", not g" + std::to_string(g));
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
