// Enums, buffer names, and both plan forms on a hand-built plan with known expected output.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>

#include "plan_fixtures.hpp"

using namespace mmoc::ir;
using namespace mmoc::ir::test;

TEST_CASE("enum names match docs/plan-format.md and parse back") {
  const char* ops[] = {"load_batch", "prefetch", "forward", "backward", "send", "recv",
                       "evict",      "free",     "allreduce", "gradnorm", "optim", "addgrad", "read", "write",
                       "reduce_scatter", "allgather"};
  static_assert(sizeof(ops) / sizeof(ops[0]) == kNumOps);
  for (int i = 0; i < kNumOps; ++i) {
    CHECK(std::string(to_string(static_cast<Op>(i))) == ops[i]);
    CHECK(parse_op(ops[i]) == static_cast<Op>(i));
  }
  const char* streams[] = {"comp", "h2d", "d2h", "p2p", "cpu", "io", "opt"};
  static_assert(sizeof(streams) / sizeof(streams[0]) == kNumStreams);
  for (int i = 0; i < kNumStreams; ++i) {
    CHECK(std::string(to_string(static_cast<Stream>(i))) == streams[i]);
    CHECK(parse_stream(streams[i]) == static_cast<Stream>(i));
  }
  const char* tiers[] = {"gpu", "host", "nvme"};
  for (int i = 0; i < 3; ++i) {
    CHECK(std::string(to_string(static_cast<Tier>(i))) == tiers[i]);
    CHECK(parse_tier(tiers[i]) == static_cast<Tier>(i));
  }
  const char* kinds[] = {"w", "wgrad", "act", "grad", "stash", "batch", "opt"};
  for (int i = 0; i < 7; ++i) {
    CHECK(std::string(to_string(static_cast<BufKind>(i))) == kinds[i]);
    CHECK(parse_buf_kind(kinds[i]) == static_cast<BufKind>(i));
  }
  CHECK(std::string(to_string(Residency::Offload)) == "offload");
  CHECK(std::string(to_string(Residency::Resident)) == "resident");
  CHECK(parse_residency("resident") == Residency::Resident);
  CHECK(std::string(to_string(OptimPlace::Cpu)) == "cpu");
  CHECK(std::string(to_string(OptimPlace::Gpu)) == "gpu");
  CHECK(parse_optim_place("gpu") == OptimPlace::Gpu);
  CHECK_THROWS_AS(parse_op("fwd"), ParseError);
  CHECK_THROWS_AS(parse_op("Forward"), ParseError);
  CHECK_THROWS_AS(parse_stream("gpu"), ParseError);
  CHECK_THROWS_AS(parse_tier("disk"), ParseError);
  CHECK_THROWS_AS(parse_buf_kind("W"), ParseError);
  CHECK_THROWS_AS(parse_residency("offloaded"), ParseError);
  CHECK_THROWS_AS(parse_optim_place("comp"), ParseError);
}

TEST_CASE("BufRef str/parse") {
  CHECK(BufRef{BufKind::W, 3, -1}.str() == "w(S3)");
  CHECK(BufRef{BufKind::WGrad, 0, -1}.str() == "wgrad(S0)");
  CHECK(BufRef{BufKind::Opt, 12, -1}.str() == "opt(S12)");
  CHECK(BufRef{BufKind::Act, 2, 5}.str() == "act(S2,m5)");
  CHECK(BufRef{BufKind::Grad, 2, 5}.str() == "grad(S2,m5)");
  CHECK(BufRef{BufKind::Stash, 10, 31}.str() == "stash(S10,m31)");
  CHECK(BufRef{BufKind::Batch, -1, 0}.str() == "batch(m0)");
  for (const char* s : {"w(S3)", "wgrad(S0)", "opt(S7)", "act(S2,m5)", "grad(S0,m0)", "stash(S1,m100)", "batch(m0)",
                        "batch(m17)"})
    CHECK(BufRef::parse(s).str() == s);
  CHECK(BufRef::parse("act(S2,m5)") == BufRef{BufKind::Act, 2, 5});
  CHECK(BufRef::parse("batch(m3)") == BufRef{BufKind::Batch, -1, 3});
  CHECK(BufRef::parse("w(S3)") == BufRef{BufKind::W, 3, -1});
  for (const char* bad : {"", "w", "w()", "w(S)", "w(S1", "w(S1,m0)", "act(S1)", "act(S1,*)", "act(S1,m)", "batch(S0,m1)",
                          "batch(S0)", "foo(S1)", "w(s1)", "w(S-1)", "act(S1,m-1)", "w(S1x)", "act(S1,m2,m3)", "W(S1)",
                          "w(S1) ", " w(S1)", "w(S+1)", "act(S1, m2)"}) {
    CAPTURE(bad);
    CHECK_THROWS_AS(BufRef::parse(bad), ParseError);
  }
  try {
    BufRef::parse("act(S1)");
    FAIL("no throw");
  } catch (const ParseError& e) {
    CHECK(std::string(e.what()).find("act(S1)") != std::string::npos);
  }
}

TEST_CASE("find_buffer / buffer_bytes") {
  Plan p = hand_plan();
  REQUIRE(p.find_buffer(BufKind::W, 1) != nullptr);
  CHECK(p.find_buffer(BufKind::W, 1)->bytes == 1308642);
  CHECK(p.find_buffer(BufKind::Opt, 1)->home == Tier::Nvme);
  CHECK(p.find_buffer(BufKind::Act, 1) == nullptr);
  CHECK(p.buffer_bytes(BufRef::parse("act(S0,m1)")) == 16384);
  CHECK(p.buffer_bytes(BufRef::parse("stash(S1,m0)")) == 65536);
  CHECK(p.buffer_bytes(BufRef::parse("batch(m1)")) == 2048);
  CHECK(p.buffer_bytes(BufRef::parse("grad(S1,m0)")) == 0);  // undeclared
  CHECK(p.buffer_bytes(BufRef::parse("w(S5)")) == 0);
}

TEST_CASE("format_double prints the shortest exact form") {
  CHECK(format_double(0.0) == "0");
  CHECK(format_double(1.0) == "1");
  CHECK(format_double(10000.0) == "10000");
  CHECK(format_double(1e-5) == "1e-05");
  CHECK(format_double(0.1) == "0.1");
  CHECK(format_double(0.1 + 0.2) == "0.30000000000000004");
  CHECK(format_double(1.0 / 3) == "0.3333333333333333");
  CHECK(format_double(1e-300) == "1e-300");
  CHECK(format_double(51539607552.0) == "51539607552");
  CHECK(format_double(9007199254740993.0) == "9007199254740992");
  CHECK(format_double(std::numeric_limits<double>::infinity()) == "inf");
}

TEST_CASE("print_instr matches the doc example") {
  Instr s = send("act(S0,m0)", 1, "F.S0.m0");
  s.after = {2};
  CHECK(print_instr(s, 3) == "%3 = send act(S0,m0) -> g1 @p2p after(%2) tag=F.S0.m0");
  CHECK(print_instr(with_after(evict("wgrad(S0)", true, Stream::D2H), {4}), 5) ==
        "%5 = evict wgrad(S0) -> host @d2h after(%4)");
  CHECK(print_instr(with_after(optim(0, Stream::Cpu), {5}), 6) == "%6 = optim S0 @cpu after(%5)");
  CHECK(print_instr(with_after(forward(0, 0), {0, 1}), 2) == "%2 = forward S0 m0 @comp after(%0,%1)");
  CHECK(print_instr(allreduce("wgrad(S1)", "dp"), 0) == "%0 = allreduce wgrad(S1) @comp group=dp");
}

TEST_CASE("hand plan: text form is the expected text and round-trips") {
  Plan p = hand_plan();
  CHECK(verify_structure(p).empty());
  const std::string text = print_text(p);
  CHECK(text == hand_plan_text());
  Plan back = parse_text(text);
  CHECK(back == p);
  CHECK(print_text(back) == text);
  // Parsing the hand-written text gives the hand-built plan.
  CHECK(parse_text(hand_plan_text()) == p);
}

TEST_CASE("hand plan: JSON form has the documented key order and round-trips") {
  Plan p = hand_plan();
  const std::string js = to_json_string(p, -1);
  CHECK(js.rfind(R"J({"format":"mmoc-plan","version":1,"plan":{"hardware":"l20x2","schedule":"1f1b","gpus":2,"v":1,"dp":1,)J"
                 R"J("microbatches":2,"mbs":4,"seq":64,"budget":25769803776,"order":[1,0]},"model":{"name":"tiny llama",)J"
                 R"J("layers":2,"hidden":64,"ffn":172,"heads":4,"kv_heads":2,"vocab":1000,"rope_theta":500000.0,)J"
                 R"J("norm_eps":1e-06,"tied":false},"train":{"precision":"bf16","lr":0.0003,"beta1":0.9,"beta2":0.95,)J"
                 R"J("eps":1e-08,"wd":0.1,"clip":1.0,"lr_schedule":"cosine","warmup":10,"total":1000,"seed":42},)J"
                 R"J("stages":[{"id":0,"gpu":0,"layers":[0,2],"recompute":true,"weights":"offload","optim":"cpu",)J"
                 R"J("params":123456,"fwd_ws":1024,"bwd_ws":2048,"fwd_ms":1.5,"bwd_ms":3.25},)J",
                 0) == 0);
  CHECK(js.find(R"J("buffers":[{"buf":"w(S0)","bytes":246912,"home":"host"},)J") != std::string::npos);
  CHECK(js.find(R"J({"buf":"act(S0,*)","bytes":16384,"home":"gpu"})J") != std::string::npos);
  CHECK(js.find(R"J({"buf":"batch(*)","bytes":2048,"home":"gpu"}])J") != std::string::npos);
  CHECK(js.find(R"J("predicted":{"step_s":0.125,"tokens_per_s":4096.0,"bubble":0.25,"peak":[1000,2000],"bound":[3000,4000]},)J"
                R"J("programs":[{"gpu":0,"instrs":[{"op":"prefetch","stream":"h2d","buf":"w(S0)"},)J") != std::string::npos);
  CHECK(js.find(R"J({"op":"forward","stream":"comp","stage":0,"mb":0,"after":[0]})J") != std::string::npos);
  CHECK(js.find(R"J({"op":"send","stream":"p2p","buf":"act(S0,m0)","peer":1,"tag":"F.S0.m0","after":[2]})J") !=
        std::string::npos);
  CHECK(js.find(R"J({"op":"evict","stream":"d2h","buf":"wgrad(S0)","to_host":true,"after":[17]})J") != std::string::npos);
  CHECK(js.find(R"J({"op":"allreduce","stream":"comp","buf":"wgrad(S0)","group":"dp.g0"})J") != std::string::npos);
  CHECK(js.find(R"J({"op":"gradnorm","stream":"comp"})J") != std::string::npos);
  CHECK(js.find(R"J({"op":"load_batch","stream":"comp","mb":1})J") != std::string::npos);

  for (int indent : {-1, 0, 1, 2}) {
    const std::string s = to_json_string(p, indent);
    Plan back = from_json_string(s);
    CHECK(back == p);
    CHECK(to_json_string(back, indent) == s);
  }
  CHECK(to_json_string(p) == to_json_string(p));  // deterministic
  // Cross-form: JSON -> text and text -> JSON agree.
  CHECK(print_text(from_json_string(to_json_string(p))) == hand_plan_text());
  CHECK(to_json_string(parse_text(hand_plan_text())) == to_json_string(p));
}

TEST_CASE("plan without predicted omits it in both forms") {
  Plan p = hand_plan();
  p.predicted.reset();
  CHECK(to_json_string(p).find("predicted") == std::string::npos);
  CHECK(print_text(p).find("predicted") == std::string::npos);
  CHECK(from_json_string(to_json_string(p)) == p);
  CHECK(parse_text(print_text(p)) == p);
}

TEST_CASE("train.on_nonfinite: absent when 'stop', written and read back in both forms when 'skip'") {
  Plan p = hand_plan();
  CHECK(to_json_string(p).find("on_nonfinite") == std::string::npos);
  CHECK(print_text(p).find("on_nonfinite") == std::string::npos);
  p.train.on_nonfinite = "skip";
  CHECK(to_json_string(p).find("\"on_nonfinite\": \"skip\"") != std::string::npos);
  CHECK(print_text(p).find(" on_nonfinite=skip\n") != std::string::npos);
  CHECK(from_json_string(to_json_string(p)) == p);
  CHECK(parse_text(print_text(p)) == p);
  CHECK(parse_text(print_text(p)) != hand_plan());
}

TEST_CASE("partial recompute: recompute=k/n in text, an integer in JSON, whole choices as before") {
  Plan p = hand_plan();  // S0: layers 0-2, recompute=1
  const std::string whole_text = print_text(p), whole_json = to_json_string(p);
  CHECK(whole_text.find(" recompute=1 ") != std::string::npos);
  p.stages[0].keep_layers = 1;  // the first of its 2 layers recomputes, the second keeps its stash
  CHECK(p.stages[0].recompute_layers() == 1);
  CHECK(p.stages[1].recompute_layers() == 0);
  const std::string text = print_text(p), json = to_json_string(p);
  CHECK(text.find("stage S0 gpu=0 layers=0-2 recompute=1/2 weights=offload") != std::string::npos);
  std::string compact;
  for (char ch : json) if (ch != ' ' && ch != '\n') compact += ch;
  CHECK(compact.find("\"layers\":[0,2],\"recompute\":1,") != std::string::npos);
  CHECK(parse_text(text) == p);
  CHECK(from_json_string(json) == p);
  CHECK(verify_structure(p).empty());
  // k = n reads as whole recompute, k = 0 as none
  auto with = [&](const std::string& v) {
    std::string t = text;
    t.replace(t.find("recompute=1/2"), 13, "recompute=" + v);
    return t;
  };
  CHECK(parse_text(with("2/2")).stages[0] == hand_plan().stages[0]);
  CHECK_FALSE(parse_text(with("0/2")).stages[0].recompute);
  CHECK_THROWS_AS(parse_text(with("3/2")), ParseError);   // more than its layers
  CHECK_THROWS_AS(parse_text(with("1/3")), ParseError);   // not the stage's layer count
  CHECK_THROWS_AS(parse_text(with("x/2")), ParseError);
  std::string bad = compact;
  bad.replace(bad.find("\"recompute\":1,"), 14, "\"recompute\":7,");
  CHECK_THROWS_AS(from_json_string(bad), ParseError);
  // the verifier: a kept stash needs recompute and fewer kept layers than the stage has
  Plan q = hand_plan();
  q.stages[1].keep_layers = 1;  // S1 does not recompute
  CHECK_FALSE(verify_structure(q).empty());
  q = hand_plan();
  q.stages[0].keep_layers = 2;
  CHECK_FALSE(verify_structure(q).empty());
}

TEST_CASE("text form: comments, blank lines, CRLF and quoted strings") {
  std::string text = hand_plan_text();
  std::string with_noise = "; a comment\n\n   ; indented comment\r\n";
  for (char c : text) {
    if (c == '\n') with_noise += "\r\n";
    else with_noise += c;
  }
  CHECK(parse_text(with_noise) == hand_plan());

  Plan p = hand_plan();
  p.hardware = "two words";
  p.schedule = "quote\"and\\back";
  p.model.name = "";
  p.train.precision = "tab\there";
  p.train.lr_schedule = "ünïcode";
  p.programs[0].instrs[3].tag = "tag with space";
  p.programs[1].instrs[1].tag = "tag with space";
  p.programs[0].instrs[16].group = "g=1;x";
  const std::string t = print_text(p);
  CHECK(t.find("hardware=\"two words\"") != std::string::npos);
  CHECK(t.find("name= ") != std::string::npos);
  CHECK(t.find("tag=\"tag with space\"") != std::string::npos);
  CHECK(t.find("group=g=1;x") != std::string::npos);
  CHECK(parse_text(t) == p);
  CHECK(from_json_string(to_json_string(p)) == p);
}

TEST_CASE("non-finite doubles survive both forms") {
  Plan p = hand_plan();
  p.predicted->tokens_per_s = std::numeric_limits<double>::infinity();
  p.predicted->bubble = -std::numeric_limits<double>::infinity();
  p.stages[0].fwd_ms = -0.0;
  CHECK(parse_text(print_text(p)) == p);
  CHECK(from_json_string(to_json_string(p)) == p);
  CHECK(std::signbit(parse_text(print_text(p)).stages[0].fwd_ms));
  CHECK(std::signbit(from_json_string(to_json_string(p)).stages[0].fwd_ms));
  p.predicted->step_s = std::numeric_limits<double>::quiet_NaN();
  CHECK(std::isnan(parse_text(print_text(p)).predicted->step_s));
  CHECK(std::isnan(from_json_string(to_json_string(p)).predicted->step_s));
}

TEST_CASE("text form is lossless for fields an op does not use") {
  Plan p = hand_plan();
  Instr odd = mk(Op::GradNorm, Stream::Cpu);
  odd.stage = 1;
  odd.mb = 0;
  odd.buf = BufRef::parse("w(S1)");
  odd.peer = 0;
  odd.to_host = true;
  odd.tag = "x";
  odd.group = "y";
  p.programs[1].instrs.push_back(odd);
  Instr noop = mk(Op::Free, Stream::Comp);  // missing operand prints as '?'
  p.programs[1].instrs.push_back(noop);
  const std::string t = print_text(p);
  CHECK(t.find("%16 = gradnorm @cpu tag=x group=y stage=1 mb=0 buf=w(S1) peer=0 to_host=1") != std::string::npos);
  CHECK(t.find("%17 = free ? @comp") != std::string::npos);
  CHECK(parse_text(t) == p);
  CHECK(from_json_string(to_json_string(p)) == p);
}
