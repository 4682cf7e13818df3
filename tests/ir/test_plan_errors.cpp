// Malformed inputs give ParseError with useful messages.
#include <doctest/doctest.h>

#include <algorithm>
#include <tuple>

#include <nlohmann/json.hpp>

#include "plan_fixtures.hpp"

using namespace mmoc::ir;
using namespace mmoc::ir::test;
using ojson = nlohmann::ordered_json;

namespace {
std::string replace_once(std::string s, const std::string& from, const std::string& to) {
  auto pos = s.find(from);
  REQUIRE(pos != std::string::npos);
  return s.replace(pos, from.size(), to);
}

std::string text_error(const std::string& text) {
  try {
    parse_text(text);
  } catch (const ParseError& e) {
    return e.what();
  }
  return "<no error>";
}

std::string json_error(const std::string& text) {
  try {
    from_json_string(text);
  } catch (const ParseError& e) {
    return e.what();
  }
  return "<no error>";
}

std::string json_error_j(const ojson& j) { return json_error(j.dump()); }

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Line number (1-based) of the first line of `text` containing `part`.
int line_of(const std::string& text, const std::string& part) {
  auto pos = text.find(part);
  REQUIRE(pos != std::string::npos);
  return 1 + (int)std::count(text.begin(), text.begin() + (long)pos, '\n');
}
}  // namespace

TEST_CASE("text: unknown op names the line and the text") {
  std::string t = replace_once(hand_plan_text(), "%6 = forward S0 m1", "%6 = fwd S0 m1");
  std::string e = text_error(t);
  CAPTURE(e);
  int line = line_of(t, "%6 = fwd");
  CHECK(contains(e, "line " + std::to_string(line) + ":"));
  CHECK(contains(e, "unknown op 'fwd'"));
  CHECK(contains(e, "%6 = fwd S0 m1 @comp"));
}

TEST_CASE("text: bad buffer names") {
  for (auto [from, to, expect] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"send act(S0,m0) -> g1", "send act(S0) -> g1", "bad buffer name 'act(S0)'"},
           {"free batch(m0)", "free batch(S0,m0)", "bad buffer name 'batch(S0,m0)'"},
           {"prefetch w(S0)", "prefetch weights(S0)", "unknown buffer kind 'weights'"},
           {"evict w(S0)", "evict w(S0,m1)", "bad buffer name 'w(S0,m1)'"},
           {"buffer act(S0,*)", "buffer act(S0,m0)", "'*' for the micro-batch"},
           {"buffer w(S1)", "buffer w(S1,*)", "bad buffer name 'w(S1,*)'"},
       }) {
    std::string t = replace_once(hand_plan_text(), from, to);
    std::string e = text_error(t);
    CAPTURE(e);
    CHECK(contains(e, "line " + std::to_string(line_of(t, to)) + ":"));
    CHECK(contains(e, expect));
  }
}

TEST_CASE("text: other malformed lines") {
  struct Case {
    std::string from, to, expect;
  };
  for (const auto& c : std::vector<Case>{
           {"%2 = forward S0 m0 @comp", "%2 = forward S0 @comp", "expected micro-batch"},
           {"%2 = forward S0 m0 @comp", "%2 = forward S0 m0", "missing @<stream>"},
           {"%2 = forward S0 m0 @comp", "%2 = forward S0 m0 @gpu", "unknown stream 'gpu'"},
           {"%2 = forward S0 m0 @comp", "%3 = forward S0 m0 @comp", "out of sequence"},
           {"%2 = forward S0 m0 @comp", "%2 = forward S0 m0 @comp colour=red", "unexpected 'colour=red'"},
           {"%2 = forward S0 m0 @comp", "%2 = forward S0 m0 @comp stage=1", "unexpected 'stage=1'"},
           {"%2 = forward S0 m0 @comp after(%0)", "%2 = forward S0 m0 @comp after(%0", "bad dependency list"},
           {"%2 = forward S0 m0 @comp after(%0)", "%2 = forward S0 m0 @comp after(0)", "expected instruction reference"},
           {"%3 = send act(S0,m0) -> g1", "%3 = send act(S0,m0) => g1", "expected '->'"},
           {"%3 = send act(S0,m0) -> g1", "%3 = send act(S0,m0) -> 1", "expected peer gpu"},
           {"gpus=2", "gpus=two", "'gpus': expected integer, got 'two'"},
           {"budget=25769803776", "budget=25769803776 colour=red", "unknown key 'colour' in plan line"},
           {"seq=64 ", "", "missing key 'seq' in plan line"},
           {"lr=0.0003", "lr=0.0003x", "'lr': expected number, got '0.0003x'"},
           {"lr=0.0003", "lr=0.0003 lr=1", "key 'lr' given twice"},
           {"tied=0", "tied=yes", "'tied': expected 0 or 1"},
           {"layers=0-2", "layers=0..2", "'layers'"},
           {"weights=offload", "weights=host", "unknown weights residency 'host'"},
           {"home=host", "home=disk", "unknown tier 'disk'"},
           {"order=1,0", "order=1,,0", "'order': expected comma-separated integers"},
           {"model name=\"tiny llama\"", "model name=\"tiny llama", "unterminated string"},
           {"gpu g1 {", "gpu 1 {", "expected gpu"},
           {"gpu g1 {", "gpu g1", "expected 'gpu g<k> {'"},
           {"plan hardware", "plan\nplan hardware", "missing key"},
           {"stage S1", "stagex S1", "unknown line kind 'stagex'"},
       }) {
    std::string t = replace_once(hand_plan_text(), c.from, c.to);
    std::string e = text_error(t);
    CAPTURE(c.to);
    CAPTURE(e);
    CHECK(contains(e, "line "));
    CHECK(contains(e, c.expect));
  }
  // A duplicated header line.
  std::string dup = std::string(hand_plan_text());
  dup.insert(dup.find("train "), "model name=x layers=1 hidden=1 ffn=1 heads=1 kv_heads=1 vocab=1 rope_theta=1 norm_eps=1 tied=0\n");
  CHECK(contains(text_error(dup), "second 'model' line"));
  // Missing header lines.
  std::string nomodel = hand_plan_text();
  nomodel.erase(nomodel.find("model "), nomodel.find("train ") - nomodel.find("model "));
  CHECK(contains(text_error(nomodel), "missing 'model' line"));
  CHECK(contains(text_error(""), "missing 'plan' line"));
}

TEST_CASE("text: every truncation is an error, except dropping the final newline") {
  const std::string full = hand_plan_text();
  std::string rtrimmed = full;
  while (!rtrimmed.empty() && (rtrimmed.back() == '\n' || rtrimmed.back() == ' ')) rtrimmed.pop_back();
  int errors = 0;
  for (size_t len = 0; len < full.size(); ++len) {
    std::string cut = full.substr(0, len);
    CAPTURE(len);
    if (cut == rtrimmed) {
      CHECK(parse_text(cut) == hand_plan());
      continue;
    }
    CHECK_THROWS_AS(parse_text(cut), ParseError);
    ++errors;
  }
  CHECK(errors == (int)full.size() - 1);
  // The message for a cut inside the last program says what is missing.
  std::string cut = full.substr(0, full.find("%15 = optim S1"));
  std::string e = text_error(cut);
  CAPTURE(e);
  CHECK(contains(e, "gpu g1"));
  CHECK(contains(e, "not closed"));
  cut = full.substr(0, full.find("%15 = optim S1") + 12);
  e = text_error(cut);
  CAPTURE(e);
  CHECK(contains(e, "missing stage for optim"));
  CHECK(contains(e, "truncated?"));
  cut = full.substr(0, full.find("gpu g1 {"));
  e = text_error(cut);
  CAPTURE(e);
  CHECK(contains(e, "expected 2 'gpu' blocks"));
}

TEST_CASE("JSON: unknown op names the JSON path") {
  ojson j = ojson::parse(to_json_string(hand_plan()));
  j["programs"][1]["instrs"][4]["op"] = "fwd";
  CHECK(json_error_j(j) == "programs[1].instrs[4].op: unknown op 'fwd'");
}

TEST_CASE("JSON: unknown keys, wrong types, missing keys") {
  const ojson base = ojson::parse(to_json_string(hand_plan()));
  auto err = [&](auto mutate) {
    ojson j = base;
    mutate(j);
    return json_error_j(j);
  };
  CHECK(err([](ojson& j) { j["stages"][1]["colour"] = "red"; }) == "stages[1].colour: unknown key");
  CHECK(err([](ojson& j) { j["extra"] = 1; }) == "extra: unknown key");
  CHECK(err([](ojson& j) { j["programs"][0]["instrs"][2]["stage_id"] = 1; }) == "programs[0].instrs[2].stage_id: unknown key");
  CHECK(err([](ojson& j) { j["plan"]["gpus"] = "2"; }) == "plan.gpus: expected integer, got string \"2\"");
  CHECK(err([](ojson& j) { j["plan"]["gpus"] = 2.5; }) == "plan.gpus: expected integer, got number 2.5");
  CHECK(err([](ojson& j) { j["plan"]["gpus"] = 4294967296LL; }) == "plan.gpus: integer 4294967296 out of range");
  CHECK(err([](ojson& j) { j["model"]["tied"] = 1; }) == "model.tied: expected true/false, got integer 1");
  CHECK(err([](ojson& j) { j["train"]["lr"] = "fast"; }) == "train.lr: expected number, got string \"fast\"");
  CHECK(err([](ojson& j) { j["plan"]["order"] = 1; }) == "plan.order: expected array, got integer 1");
  CHECK(err([](ojson& j) { j["plan"]["order"][1] = nullptr; }) == "plan.order[1]: expected integer, got null");
  CHECK(err([](ojson& j) { j["stages"] = ojson::object(); }) == "stages: expected array, got object");
  CHECK(err([](ojson& j) { j["stages"][0]["layers"] = {0, 1, 2}; }) == "stages[0].layers: expected [begin, end], got 3 values");
  CHECK(err([](ojson& j) { j["stages"][0]["weights"] = "host"; }) == "stages[0].weights: unknown weights residency 'host'");
  CHECK(err([](ojson& j) { j["programs"][0]["instrs"][3]["stream"] = "nccl"; }) ==
        "programs[0].instrs[3].stream: unknown stream 'nccl'");
  CHECK(err([](ojson& j) { j["programs"][0]["instrs"][3]["after"] = {"%2"}; }) ==
        "programs[0].instrs[3].after[0]: expected integer, got string \"%2\"");
  CHECK(err([](ojson& j) { j["programs"][0]["instrs"][18]["to_host"] = "yes"; }) ==
        "programs[0].instrs[18].to_host: expected true/false, got string \"yes\"");
  CHECK(err([](ojson& j) { j["train"].erase("lr"); }) == "train: missing key 'lr'");
  CHECK(err([](ojson& j) { j.erase("programs"); }) == "(top level): missing key 'programs'");
  CHECK(err([](ojson& j) { j["programs"][1]["instrs"][0].erase("op"); }) == "programs[1].instrs[0]: missing key 'op'");
  CHECK(err([](ojson& j) { j["programs"][1]["instrs"][0] = 3; }) == "programs[1].instrs[0]: expected object, got integer 3");
  CHECK(err([](ojson& j) { j["format"] = "plan"; }) == "format: expected \"mmoc-plan\", got \"plan\"");
  CHECK(contains(err([](ojson& j) { j["version"] = 2; }), "version: unsupported plan format version 2"));
  CHECK(contains(err([](ojson& j) { j["programs"][0]["instrs"][3]["buf"] = "act(S0)"; }),
                 "programs[0].instrs[3].buf: bad buffer name 'act(S0)'"));
  CHECK(contains(err([](ojson& j) { j["buffers"][0]["buf"] = "w(S0,*)"; }), "buffers[0].buf: bad buffer name 'w(S0,*)'"));
  CHECK(err([](ojson& j) { j["predicted"]["peak"][0] = 1.5; }) == "predicted.peak[0]: expected integer, got number 1.5");
  CHECK(err([](ojson& j) { j["predicted"] = nullptr; }) == "predicted: expected object, got null");
}

TEST_CASE("JSON: syntax errors and truncation") {
  const std::string js = to_json_string(hand_plan());
  CHECK(contains(json_error(js.substr(0, js.size() / 2)), "JSON syntax error"));
  CHECK(contains(json_error(""), "JSON syntax error"));
  CHECK(contains(json_error("[1,2]"), "expected object, got array"));
  for (size_t len = 0; len < js.size(); len += 37) CHECK_THROWS_AS(from_json_string(js.substr(0, len)), ParseError);
}
