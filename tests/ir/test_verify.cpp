// verify_structure: passes the correct hand plan and catches each planted defect.
#include <doctest/doctest.h>

#include <regex>

#include "plan_fixtures.hpp"

using namespace mmoc::ir;
using namespace mmoc::ir::test;

namespace {
std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += x + "\n";
  return s;
}
// True when some problem contains all the given parts.
bool has_problem(const std::vector<std::string>& problems, std::initializer_list<std::string> parts) {
  for (const auto& p : problems) {
    bool all = true;
    for (const auto& part : parts) all = all && p.find(part) != std::string::npos;
    if (all) return true;
  }
  return false;
}
}  // namespace

TEST_CASE("verify: the hand plan is correct") {
  Plan p = hand_plan();
  auto problems = verify_structure(p);
  CAPTURE(joined(problems));
  CHECK(problems.empty());
  CHECK_NOTHROW(verify_structure_or_throw(p));
  // Also after a trip through both forms.
  CHECK(verify_structure(parse_text(print_text(p))).empty());
  CHECK(verify_structure(from_json_string(to_json_string(p))).empty());
}

TEST_CASE("verify: unmatched send") {
  Plan p = hand_plan();
  p.programs[1].instrs[1].tag = "F.S0.m0.x";  // the recv of F.S0.m0 now carries another tag
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g0 %3:", "send", "no recv", "F.S0.m0"}));
  CHECK(has_problem(pr, {"g1 %1:", "recv", "no send", "F.S0.m0.x"}));
  CHECK_THROWS_AS(verify_structure_or_throw(p), VerifyError);
}

TEST_CASE("verify: duplicate recv") {
  Plan p = hand_plan();
  p.programs[1].instrs.push_back(recv("act(S0,m0)", 0, "F.S0.m0"));  // %16
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(pr.size() == 1);
  CHECK(has_problem(pr, {"g1 %16:", "duplicate tag 'F.S0.m0'", "g1 %1"}));
}

TEST_CASE("verify: duplicate send tag") {
  Plan p = hand_plan();
  p.programs[0].instrs[7].tag = "F.S0.m0";
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g0 %7:", "send: duplicate tag 'F.S0.m0'"}));
  CHECK(has_problem(pr, {"g1 %6:", "no send", "F.S0.m1"}));
}

TEST_CASE("verify: send/recv disagree on peer or buffer") {
  Plan p = hand_plan();
  p.programs[1].instrs[1].buf = BufRef::parse("act(S0,m1)");
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g0 %3:", "act(S0,m0)", "receives act(S0,m1)"}));

  p = hand_plan();
  Plan three = p;  // a third GPU so that a wrong-but-valid peer exists
  three.gpus = 3;
  three.programs.push_back(Program{2, {}});
  three.programs[1].instrs[1].peer = 2;  // recv expects it from g2
  pr = verify_structure(three);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g0 %3:", "expects it from g2"}));

  three = p;
  three.gpus = 3;
  three.programs.push_back(Program{2, {}});
  three.programs[0].instrs[3].peer = 2;  // sent to g2, but the recv is on g1
  pr = verify_structure(three);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g0 %3:", "sent to g2 but the recv is on g1 %1"}));
}

TEST_CASE("verify: send/recv operands") {
  Plan p = hand_plan();
  p.programs[0].instrs[3].peer = 0;
  p.programs[0].instrs[7].peer = 5;
  p.programs[1].instrs[4].tag = "";
  p.programs[1].instrs[9].buf.reset();
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g0 %3:", "peer is its own gpu"}));
  CHECK(has_problem(pr, {"g0 %7:", "peer g5 out of range"}));
  CHECK(has_problem(pr, {"g1 %4:", "missing tag"}));
  CHECK(has_problem(pr, {"g1 %9:", "missing buffer"}));
}

TEST_CASE("verify: backward before forward") {
  Plan p = hand_plan();
  std::swap(p.programs[1].instrs[2].op, p.programs[1].instrs[3].op);  // %2 backward S1 m0, %3 forward S1 m0
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(pr.size() == 1);
  CHECK(has_problem(pr, {"g1 %2:", "backward S1 m0 comes before its forward (%3)"}));
}

TEST_CASE("verify: after pointing forward") {
  Plan p = hand_plan();
  p.programs[0].instrs[2].after = {5};
  p.programs[1].instrs[4].after = {4};  // itself
  p.programs[1].instrs[5].after = {-1};
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(pr.size() == 3);
  CHECK(has_problem(pr, {"g0 %2:", "after(%5)"}));
  CHECK(has_problem(pr, {"g1 %4:", "after(%4)"}));
  CHECK(has_problem(pr, {"g1 %5:", "after(%-1)"}));
}

TEST_CASE("verify: forward on the wrong GPU") {
  Plan p = hand_plan();
  p.programs[1].instrs[7].stage = 0;  // g1 runs forward S0 m1, which belongs to g0
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g1 %7:", "S0 belongs to g0, not g1"}));
  CHECK(has_problem(pr, {"g1 %7:", "second forward S0 m1"}));
  CHECK(has_problem(pr, {"no forward S1 m1"}));
}

TEST_CASE("verify: missing or repeated forward/backward") {
  Plan p = hand_plan();
  p.programs[0].instrs[12].op = Op::Forward;  // backward S0 m1 -> a second forward S0 m1
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g0 %12:", "second forward S0 m1"}));
  CHECK(has_problem(pr, {"g0:", "no backward S0 m1"}));
}

TEST_CASE("verify: operands out of range") {
  Plan p = hand_plan();
  p.programs[0].instrs[1].mb = 2;           // load_batch m2, microbatches=2
  p.programs[0].instrs[19].stage = 7;       // optim S7
  p.programs[0].instrs[15].buf = BufRef{BufKind::W, 2, -1};
  p.programs[0].instrs[13].buf = BufRef{BufKind::Batch, -1, 9};
  p.programs[0].instrs[16].group = "";
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g0 %1:", "micro-batch 2 out of range"}));
  CHECK(has_problem(pr, {"g0 %19:", "stage 7 out of range"}));
  CHECK(has_problem(pr, {"g0 %15:", "w(S2)", "stage out of range"}));
  CHECK(has_problem(pr, {"g0 %13:", "batch(m9)", "micro-batch out of range"}));
  CHECK(has_problem(pr, {"g0 %16:", "missing group"}));
}

TEST_CASE("verify: stage table and programs") {
  Plan p = hand_plan();
  p.stages[1].layer_begin = 3;
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"stage 1:", "layers start at 3, expected 2"}));

  p = hand_plan();
  p.stages[1].layer_end = 3;
  pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"stage 1:", "expected 4 (model.layers + 2)"}));

  p = hand_plan();
  p.stages[1].id = 5;
  p.stages[0].gpu = 2;
  pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"stage 1:", "id is S5"}));
  CHECK(has_problem(pr, {"stage 0:", "gpu 2 out of range"}));

  p = hand_plan();
  p.programs[1].gpu = 0;
  pr = verify_structure(p);
  CHECK(has_problem(pr, {"programs[1]: gpu is g0, expected g1"}));

  p = hand_plan();
  p.programs.pop_back();
  pr = verify_structure(p);
  CHECK(has_problem(pr, {"1 programs for gpus=2"}));

  p = hand_plan();
  p.buffers.push_back({BufKind::W, 0, 1, Tier::Host});
  pr = verify_structure(p);
  CHECK(has_problem(pr, {"buffer w(S0): declared twice"}));
}

TEST_CASE("verify: problems name gpu and instruction") {
  Plan p = hand_plan();
  p.programs[0].instrs[2].after = {9};
  p.programs[1].instrs[6].peer = 1;
  auto pr = verify_structure(p);
  REQUIRE(!pr.empty());
  std::regex re(R"(^g\d+ %\d+: .+)");
  for (const auto& s : pr) {
    CAPTURE(s);
    CHECK(std::regex_match(s, re));
  }
  try {
    verify_structure_or_throw(p);
    FAIL("no throw");
  } catch (const VerifyError& e) {
    CHECK(std::string(e.what()).find("g0 %2:") != std::string::npos);
  }
}

TEST_CASE("verify: addgrad adds only a tied head's gradient into S0") {
  auto addgrad = [](const std::string& b, int stage) {
    Instr i = mk(Op::AddGrad);
    i.buf = BufRef::parse(b);
    i.stage = stage;
    return i;
  };
  Plan p = hand_plan();  // untied, 2 stages: no addgrad belongs in it
  p.programs[0].instrs.push_back(addgrad("tiegrad(S1)", 0));  // %20
  auto pr = verify_structure(p);
  CAPTURE(joined(pr));
  CHECK(has_problem(pr, {"g0 %20:", "adds tiegrad(S1) into S0", "tied model"}));
  p.model.tied_embeddings = true;  // tied: that one is right
  CHECK(verify_structure(p).empty());
  p.programs[0].instrs.back() = addgrad("wgrad(S1)", 0);  // another buffer
  CHECK(has_problem(verify_structure(p), {"g0 %20:", "adds wgrad(S1) into S0"}));
  p.programs[0].instrs.back() = addgrad("tiegrad(S0)", 0);  // not the head's
  CHECK(has_problem(verify_structure(p), {"g0 %20:", "adds tiegrad(S0)"}));
  p.programs[1].instrs.push_back(addgrad("tiegrad(S1)", 1));  // into another stage than S0
  CHECK(has_problem(verify_structure(p), {"g1 %16:", "into S1"}));
  // and the text form carries it
  p.programs[0].instrs.back() = addgrad("tiegrad(S1)", 0);
  p.programs[1].instrs.pop_back();
  CHECK(print_instr(p.programs[0].instrs.back(), 20) == "%20 = addgrad tiegrad(S1) -> S0 @comp");
  CHECK(parse_text(print_text(p)) == p);
}
