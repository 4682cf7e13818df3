// The JSON form of a Plan (docs/plan-format.md, "JSON form").
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "common/json.hpp"
#include "ir/plan.hpp"
#include "ir/plan_detail.hpp"

namespace mmoc::ir {
using namespace detail;

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

// ---- reading (common/json.hpp: path-named errors) ----
using mmoc::JsonObject;
using JObj = JsonObject<ojson>;
int jint32(const ojson& v, const std::string& path) { return mmoc::json_int32(v, path); }
int64_t jint64(const ojson& v, const std::string& path) { return mmoc::json_int(v, path); }
double jdbl(const ojson& v, const std::string& path) {
  return mmoc::json_number(v, path, mmoc::JsonNumberRule{.nonfinite_strings = true});
}
bool jbool(const ojson& v, const std::string& path) { return mmoc::json_bool(v, path); }
std::string jstr(const ojson& v, const std::string& path) { return mmoc::json_string(v, path); }
template <class F>
auto jenum(const ojson& v, const std::string& path, F parse) {
  std::string s = jstr(v, path);
  try {
    return parse(s);
  } catch (const ParseError& e) {
    mmoc::json_fail(path, e.what());
  }
}
template <class T, class F>
std::vector<T> jarray(const ojson& v, const std::string& path, F elem) {
  return mmoc::json_array<T>(v, path, elem);
}
[[noreturn]] void jfail(const std::string& path, const std::string& msg) { mmoc::json_fail(path, msg); }

Instr instr_from_json(const ojson& j, const std::string& path) {
  JObj o(j, path);
  Instr in;
  in.op = jenum(o.req("op"), o.at("op"), parse_op);
  in.stream = jenum(o.req("stream"), o.at("stream"), parse_stream);
  if (auto* v = o.get("stage")) in.stage = jint32(*v, o.at("stage"));
  if (auto* v = o.get("mb")) in.mb = jint32(*v, o.at("mb"));
  if (auto* v = o.get("buf")) in.buf = jenum(*v, o.at("buf"), BufRef::parse);
  if (auto* v = o.get("peer")) in.peer = jint32(*v, o.at("peer"));
  if (auto* v = o.get("tag")) in.tag = jstr(*v, o.at("tag"));
  if (auto* v = o.get("group")) in.group = jstr(*v, o.at("group"));
  if (auto* v = o.get("to_host")) in.to_host = jbool(*v, o.at("to_host"));
  if (auto* v = o.get("after")) in.after = jarray<int>(*v, o.at("after"), jint32);
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
    p.hardware = jstr(o.req("hardware"), o.at("hardware"));
    p.schedule = jstr(o.req("schedule"), o.at("schedule"));
    p.gpus = jint32(o.req("gpus"), o.at("gpus"));
    p.v = jint32(o.req("v"), o.at("v"));
    p.dp = jint32(o.req("dp"), o.at("dp"));
    p.microbatches = jint32(o.req("microbatches"), o.at("microbatches"));
    p.micro_batch_size = jint32(o.req("mbs"), o.at("mbs"));
    p.seq_len = jint32(o.req("seq"), o.at("seq"));
    p.budget_bytes = jint64(o.req("budget"), o.at("budget"));
    p.gpu_order = jarray<int>(o.req("order"), o.at("order"), jint32);
    o.done();
  }
  {
    JObj o(r.req("model"), "model");
    p.model.name = jstr(o.req("name"), o.at("name"));
    p.model.layers = jint32(o.req("layers"), o.at("layers"));
    p.model.hidden = jint32(o.req("hidden"), o.at("hidden"));
    p.model.ffn = jint32(o.req("ffn"), o.at("ffn"));
    p.model.heads = jint32(o.req("heads"), o.at("heads"));
    p.model.kv_heads = jint32(o.req("kv_heads"), o.at("kv_heads"));
    p.model.vocab = jint32(o.req("vocab"), o.at("vocab"));
    p.model.rope_theta = jdbl(o.req("rope_theta"), o.at("rope_theta"));
    p.model.norm_eps = jdbl(o.req("norm_eps"), o.at("norm_eps"));
    p.model.tied_embeddings = jbool(o.req("tied"), o.at("tied"));
    o.done();
  }
  {
    JObj o(r.req("train"), "train");
    p.train.precision = jstr(o.req("precision"), o.at("precision"));
    p.train.lr = jdbl(o.req("lr"), o.at("lr"));
    p.train.beta1 = jdbl(o.req("beta1"), o.at("beta1"));
    p.train.beta2 = jdbl(o.req("beta2"), o.at("beta2"));
    p.train.eps = jdbl(o.req("eps"), o.at("eps"));
    p.train.weight_decay = jdbl(o.req("wd"), o.at("wd"));
    p.train.max_grad_norm = jdbl(o.req("clip"), o.at("clip"));
    p.train.lr_schedule = jstr(o.req("lr_schedule"), o.at("lr_schedule"));
    p.train.warmup_steps = jint32(o.req("warmup"), o.at("warmup"));
    p.train.total_steps = jint32(o.req("total"), o.at("total"));
    p.train.seed = jint32(o.req("seed"), o.at("seed"));
    o.done();
  }
  p.stages = jarray<Stage>(r.req("stages"), "stages", [](const ojson& v, const std::string& path) {
    JObj o(v, path);
    Stage s;
    s.id = jint32(o.req("id"), o.at("id"));
    s.gpu = jint32(o.req("gpu"), o.at("gpu"));
    auto layers = jarray<int>(o.req("layers"), o.at("layers"), jint32);
    if (layers.size() != 2) jfail(o.at("layers"), "expected [begin, end], got " + std::to_string(layers.size()) + " values");
    s.layer_begin = layers[0];
    s.layer_end = layers[1];
    s.recompute = jbool(o.req("recompute"), o.at("recompute"));
    s.weights = jenum(o.req("weights"), o.at("weights"), parse_residency);
    s.optim = jenum(o.req("optim"), o.at("optim"), parse_optim_place);
    s.params = jint64(o.req("params"), o.at("params"));
    s.fwd_ws = jint64(o.req("fwd_ws"), o.at("fwd_ws"));
    s.bwd_ws = jint64(o.req("bwd_ws"), o.at("bwd_ws"));
    s.fwd_ms = jdbl(o.req("fwd_ms"), o.at("fwd_ms"));
    s.bwd_ms = jdbl(o.req("bwd_ms"), o.at("bwd_ms"));
    o.done();
    return s;
  });
  p.buffers = jarray<BufferDecl>(r.req("buffers"), "buffers", [](const ojson& v, const std::string& path) {
    JObj o(v, path);
    BufferDecl d;
    std::string name = jstr(o.req("buf"), o.at("buf"));
    try {
      parse_decl_name(name, d);
    } catch (const ParseError& e) {
      jfail(o.at("buf"), e.what());
    }
    d.bytes = jint64(o.req("bytes"), o.at("bytes"));
    d.home = jenum(o.req("home"), o.at("home"), parse_tier);
    o.done();
    return d;
  });
  if (auto* v = r.get("predicted")) {
    JObj o(*v, "predicted");
    Predicted pr;
    pr.step_s = jdbl(o.req("step_s"), o.at("step_s"));
    pr.tokens_per_s = jdbl(o.req("tokens_per_s"), o.at("tokens_per_s"));
    pr.bubble = jdbl(o.req("bubble"), o.at("bubble"));
    pr.peak_bytes = jarray<int64_t>(o.req("peak"), o.at("peak"), jint64);
    pr.bound_bytes = jarray<int64_t>(o.req("bound"), o.at("bound"), jint64);
    o.done();
    p.predicted = std::move(pr);
  }
  p.programs = jarray<Program>(r.req("programs"), "programs", [](const ojson& v, const std::string& path) {
    JObj o(v, path);
    Program pr;
    pr.gpu = jint32(o.req("gpu"), o.at("gpu"));
    pr.instrs = jarray<Instr>(o.req("instrs"), o.at("instrs"), instr_from_json);
    o.done();
    return pr;
  });
  r.done();
  return p;
}
}  // namespace

std::string to_json_string(const Plan& p, int indent) { return plan_to_json(p).dump(indent); }

Plan from_json_string(const std::string& s) {
  try {
    return plan_from_json(mmoc::json_parse<ojson>(s, "", "JSON syntax error: "));
  } catch (const mmoc::JsonError& e) {
    throw ParseError(e.what());
  }
}


}  // namespace mmoc::ir
