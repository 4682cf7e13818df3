// The JSON form of a Plan (docs/plan-format.md, "JSON form"). Header objects follow the field tables of
// plan_fields.hpp; instructions carry only the keys that are set.
#include <nlohmann/json.hpp>

#include "common/json.hpp"
#include "ir/plan.hpp"
#include "ir/plan_detail.hpp"
#include "ir/plan_fields.hpp"

namespace mmoc::ir {
using namespace detail;

namespace {
using JObj = JsonObject<ojson>;

// ---- writing ----
template <class S>
void write_fields(ojson& o, const S& s, const std::vector<Field<S>>& fields) {
  for (const auto& f : fields)
    if (!f.is_default || !f.is_default(s)) f.write_json(s, o, f.key);
}

ojson instr_to_json(const Instr& in) {
  ojson j;
  j["op"] = to_string(in.op);
  j["stream"] = to_string(in.stream);
  if (in.stage != -1) j["stage"] = in.stage;
  if (in.mb != -1) j["mb"] = in.mb;
  if (in.buf) j["buf"] = in.buf->str();
  if (in.buckets != 0 || in.bucket != 0) j["bucket"] = {in.bucket + 1, in.buckets};  // 1-based, as the text form
  if (in.peer != -1) j["peer"] = in.peer;
  if (!in.tag.empty()) j["tag"] = in.tag;
  if (!in.group.empty()) j["group"] = in.group;
  if (in.seg != -1) j["seg"] = in.seg;
  if (in.to_host) j["to_host"] = true;
  if (!in.after.empty()) j["after"] = in.after;
  return j;
}

ojson plan_to_json(const Plan& p) {
  ojson j;
  j["format"] = "mmoc-plan";
  j["version"] = p.format_version;
  write_fields(j["plan"], p, plan_fields());
  write_fields(j["model"], p.model, model_fields());
  write_fields(j["train"], p.train, train_fields());
  ojson stages = ojson::array();
  for (const auto& s : p.stages) {
    ojson o;
    o["id"] = s.id;
    write_fields(o, s, stage_fields());
    stages.push_back(std::move(o));
  }
  j["stages"] = std::move(stages);
  ojson bufs = ojson::array();
  for (const auto& b : p.buffers) {
    ojson o;
    o["buf"] = decl_str(b);
    write_fields(o, b, buffer_fields());
    bufs.push_back(std::move(o));
  }
  j["buffers"] = std::move(bufs);
  if (p.predicted) write_fields(j["predicted"], *p.predicted, predicted_fields());
  auto progs_json = [](const std::vector<Program>& list) {
    ojson progs = ojson::array();
    for (const auto& pr : list) {
      ojson o;
      o["gpu"] = pr.gpu;
      ojson ins = ojson::array();
      for (const auto& in : pr.instrs) ins.push_back(instr_to_json(in));
      o["instrs"] = std::move(ins);
      progs.push_back(std::move(o));
    }
    return progs;
  };
  j["programs"] = progs_json(p.programs);
  if (!p.odd_programs.empty()) j["odd_programs"] = progs_json(p.odd_programs);  // the alternating update order
  return j;
}

// ---- reading (common/json.hpp: errors name the JSON path) ----
// Every key of the table is required; other keys are errors.
template <class S>
void read_fields(JObj& o, S& s, const std::vector<Field<S>>& fields) {
  for (const auto& f : fields) {
    if (!f.is_default) f.read_json(s, o.req(f.key), o.at(f.key));
    else if (auto* v = o.get(f.key)) f.read_json(s, *v, o.at(f.key));  // optional: absent keeps the default
  }
  o.done();
}

template <class F>
auto by_name(const ojson& v, const std::string& path, F parse) {
  std::string s = json_string(v, path);
  try {
    return parse(s);
  } catch (const ParseError& e) {
    json_fail(path, e.what());
  }
}
int int32_at(const ojson& v, const std::string& path) { return json_int32(v, path); }

Instr instr_from_json(const ojson& j, const std::string& path) {
  JObj o(j, path);
  Instr in;
  in.op = by_name(o.req("op"), o.at("op"), parse_op);
  in.stream = by_name(o.req("stream"), o.at("stream"), parse_stream);
  if (auto* v = o.get("stage")) in.stage = json_int32(*v, o.at("stage"));
  if (auto* v = o.get("mb")) in.mb = json_int32(*v, o.at("mb"));
  if (auto* v = o.get("buf")) in.buf = by_name(*v, o.at("buf"), BufRef::parse);
  if (auto* v = o.get("bucket")) {  // [k, n], k 1-based
    auto kn = json_array<int>(*v, o.at("bucket"), int32_at);
    if (kn.size() != 2) json_fail(o.at("bucket"), "expected [k, n] (bucket k of n, k from 1), got " + std::to_string(kn.size()) + " values");
    in.bucket = kn[0] - 1;
    in.buckets = kn[1];
  }
  if (auto* v = o.get("peer")) in.peer = json_int32(*v, o.at("peer"));
  if (auto* v = o.get("tag")) in.tag = json_string(*v, o.at("tag"));
  if (auto* v = o.get("group")) in.group = json_string(*v, o.at("group"));
  if (auto* v = o.get("seg")) in.seg = json_int32(*v, o.at("seg"));
  if (auto* v = o.get("to_host")) in.to_host = json_bool(*v, o.at("to_host"));
  if (auto* v = o.get("after")) in.after = json_array<int>(*v, o.at("after"), int32_at);
  o.done();
  return in;
}

Plan plan_from_json(const ojson& root) {
  JObj r(root, "");
  Plan p;
  {
    std::string f = json_string(r.req("format"), "format");
    if (f != "mmoc-plan") json_fail("format", "expected \"mmoc-plan\", got \"" + f + "\"");
    int v = json_int32(r.req("version"), "version");
    if (v != 1) json_fail("version", "unsupported plan format version " + std::to_string(v) + " (this build reads 1)");
    p.format_version = v;
  }
  {
    JObj o(r.req("plan"), "plan");
    read_fields(o, p, plan_fields());
  }
  {
    JObj o(r.req("model"), "model");
    read_fields(o, p.model, model_fields());
  }
  {
    JObj o(r.req("train"), "train");
    read_fields(o, p.train, train_fields());
  }
  p.stages = json_array<Stage>(r.req("stages"), "stages", [](const ojson& v, const std::string& path) {
    JObj o(v, path);
    Stage s;
    s.id = json_int32(o.req("id"), o.at("id"));
    read_fields(o, s, stage_fields());
    return s;
  });
  p.buffers = json_array<BufferDecl>(r.req("buffers"), "buffers", [](const ojson& v, const std::string& path) {
    JObj o(v, path);
    BufferDecl d;
    std::string name = json_string(o.req("buf"), o.at("buf"));
    try {
      parse_decl_name(name, d);
    } catch (const ParseError& e) {
      json_fail(o.at("buf"), e.what());
    }
    read_fields(o, d, buffer_fields());
    return d;
  });
  if (auto* v = r.get("predicted")) {
    JObj o(*v, "predicted");
    Predicted pr;
    read_fields(o, pr, predicted_fields());
    p.predicted = std::move(pr);
  }
  auto program_of = [](const ojson& v, const std::string& path) {
    JObj o(v, path);
    Program pr;
    pr.gpu = json_int32(o.req("gpu"), o.at("gpu"));
    pr.instrs = json_array<Instr>(o.req("instrs"), o.at("instrs"), instr_from_json);
    o.done();
    return pr;
  };
  p.programs = json_array<Program>(r.req("programs"), "programs", program_of);
  if (auto* v = r.get("odd_programs")) p.odd_programs = json_array<Program>(*v, "odd_programs", program_of);
  r.done();
  return p;
}
}  // namespace

std::string to_json_string(const Plan& p, int indent) { return plan_to_json(p).dump(indent); }

Plan from_json_string(const std::string& s) {
  try {
    return plan_from_json(json_parse<ojson>(s, "", "JSON syntax error: "));
  } catch (const JsonError& e) {
    throw ParseError(e.what());
  }
}

}  // namespace mmoc::ir
