// The op table (ir/ops.hpp): every op and buffer kind has an entry consistent with itself and with
// docs/plan-format.md; the effects of the hand plan's instructions are the ones the format's table lists (written out
// here by hand); the untimed executor and the program replay on the hand plan and on planted faults.
#include <doctest/doctest.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include "ir/exec.hpp"
#include "ir/ops.hpp"
#include "plan_fixtures.hpp"

using namespace mmoc::ir;
using namespace mmoc::ir::test;

#ifndef MMOC_DOCS_DIR
#error "MMOC_DOCS_DIR must be defined (tests/ir/CMakeLists.txt)"
#endif

namespace {
std::string slurp(const std::string& path) {
  std::ifstream f(path);
  REQUIRE(f);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
std::string effects_str(const Effects& e) {
  static const char* names[] = {"require", "alloc", "alloc-if-absent", "free", "free-if-present"};
  std::string s;
  for (const BufEffect& x : e) s += std::string(names[(int)x.access]) + " " + x.buf.str() + "; ";
  if (e.transient) s += "ws " + std::to_string(e.transient);
  return s;
}
}  // namespace

TEST_CASE("op table: one entry per op, in enum order, each consistent with itself") {
  REQUIRE((int)op_table().size() == kNumOps);
  for (int i = 0; i < kNumOps; ++i) {
    const OpInfo& o = op_table()[i];
    CAPTURE(o.name);
    CHECK((int)o.op == i);
    CHECK(&op_info(o.op) == &o);
    CHECK(parse_op(o.name) == o.op);
    CHECK(std::string(to_string(o.op)) == o.name);
    CHECK(std::string(o.doc).size() > 10);
    CHECK(o.streams != 0);
    CHECK((o.streams & stream_bit(o.natural)));  // the compiler's stream is allowed
    CHECK((o.keeps & ~o.streams & ~stream_bit(Stream::Cpu)) == (o.keeps & ~o.streams & ~stream_bit(Stream::Cpu)));
    // the syntax names exactly the operands the op carries
    uint32_t in_syntax = 0;
    for (const SyntaxToken& t : syntax_tokens(o.op)) {
      if (t.part == SyntaxPart::Stage) in_syntax |= kOpStage;
      if (t.part == SyntaxPart::Mb) in_syntax |= kOpMb;
      if (t.part == SyntaxPart::Buf) in_syntax |= kOpBuf;
      if (t.part == SyntaxPart::Peer) in_syntax |= kOpPeer;
      if (t.part == SyntaxPart::ToHost) in_syntax |= kOpToHost;
    }
    CHECK(in_syntax == (o.operands & (kOpStage | kOpMb | kOpBuf | kOpPeer | kOpToHost)));
    // paired ops carry a peer and a tag; their partner kind exists
    if (o.sync != Sync::None) {
      CHECK((o.operands & kOpPeer));
      CHECK((o.operands & kOpTag));
      bool other = false;
      for (const auto& q : op_table()) other = other || (q.sync != Sync::None && q.sync != o.sync);
      CHECK(other);
    }
    // effects name operands the op has: a buffer operand, or a stage (and micro-batch) to name buffers by
    for (const EffectRule& r : o.effects) {
      if (r.ref == Ref::Operand) CHECK((o.operands & kOpBuf));
      else if (r.ref == Ref::W || r.ref == Ref::WGrad) CHECK((o.operands & kOpStage));
      else if (r.ref == Ref::Batch) CHECK((o.operands & kOpMb));
      else CHECK((o.operands & (kOpStage | kOpMb)) == (kOpStage | kOpMb));
    }
    if (o.workspace != Workspace::None) CHECK((o.operands & kOpStage));
  }
  CHECK(std::string(to_string(static_cast<Op>(kNumOps))) == "?");
}

TEST_CASE("buffer-kind table: one entry per kind, in enum order; names parse back") {
  REQUIRE((int)buf_kind_table().size() == kNumBufKinds);
  for (int i = 0; i < kNumBufKinds; ++i) {
    const BufKindInfo& k = buf_kind_table()[i];
    CHECK((int)k.kind == i);
    CHECK(parse_buf_kind(k.name) == k.kind);
    CHECK(std::string(k.doc).size() > 10);
    BufRef b{k.kind, k.per_stage ? 2 : -1, k.per_mb ? 3 : -1};
    CHECK(BufRef::parse(b.str()) == b);
    CHECK(b.per_microbatch() == k.per_mb);
  }
}

TEST_CASE("docs/plan-format.md documents every op and buffer kind of the tables") {
  const std::string doc = slurp(std::string(MMOC_DOCS_DIR) + "/plan-format.md");
  for (const auto& o : op_table()) {
    CAPTURE(o.name);
    // its row of the instruction table: | op | text | streams | ... with the streams the table allows
    const auto row = doc.find("\n| " + std::string(o.name) + " |");
    REQUIRE(row != std::string::npos);
    const std::string line = doc.substr(row + 1, doc.find('\n', row + 1) - row - 1);
    std::vector<std::string> cols;
    for (size_t b = 1, e; (e = line.find(" |", b)) != std::string::npos; b = e + 2) cols.push_back(line.substr(b + 1, e - b - 1));
    REQUIRE(cols.size() >= 3);
    uint32_t documented = 0;
    for (size_t b = 0; b < cols[2].size();) {
      size_t e = cols[2].find(", ", b);
      documented |= stream_bit(parse_stream(cols[2].substr(b, e == std::string::npos ? std::string::npos : e - b)));
      b = e == std::string::npos ? cols[2].size() : e + 2;
    }
    CHECK(documented == o.streams);
  }
  for (const auto& k : buf_kind_table()) {
    CAPTURE(k.name);
    CHECK(doc.find("`" + std::string(k.name) + "(") != std::string::npos);
  }
}

TEST_CASE("effects of the hand plan's instructions are the format's table, written out") {
  const Plan p = hand_plan();  // 2 stages: S0 on g0, S1 (last) on g1; fwd_ws/bwd_ws from the fixture
  auto eff = [&](int g, int i) { return effects_str(effects(p, p.programs[g].instrs[i])); };
  const std::string fws0 = "ws " + std::to_string(p.stages[0].fwd_ws), bws0 = "ws " + std::to_string(p.stages[0].bwd_ws);
  const std::string fws1 = "ws " + std::to_string(p.stages[1].fwd_ws), bws1 = "ws " + std::to_string(p.stages[1].bwd_ws);
  auto ws = [](const std::string& s) { return s == "ws 0" ? std::string() : s; };
  // g0: %0 prefetch w(S0), %1 load_batch m0, %2 forward S0 m0, %3 send act(S0,m0), %4 free act(S0,m0),
  //     %10 backward S0 m0, %15 evict w(S0), %16 allreduce wgrad(S0), %17 gradnorm, %18 evict wgrad(S0) -> host,
  //     %19 optim S0 @cpu
  CHECK(eff(0, 0) == "alloc w(S0); ");
  CHECK(eff(0, 1) == "alloc batch(m0); ");
  CHECK(eff(0, 2) == "require w(S0); require batch(m0); alloc act(S0,m0); alloc stash(S0,m0); " + ws(fws0));
  CHECK(eff(0, 3) == "require act(S0,m0); ");
  CHECK(eff(0, 4) == "free act(S0,m0); ");
  CHECK(eff(0, 10) == "require w(S0); require batch(m0); require grad(S0,m0); alloc-if-absent wgrad(S0); "
                      "free stash(S0,m0); free grad(S0,m0); " + ws(bws0));
  CHECK(eff(0, 15) == "free w(S0); ");
  CHECK(eff(0, 16) == "require wgrad(S0); ");
  CHECK(eff(0, 17) == "");
  CHECK(eff(0, 18) == "free wgrad(S0); ");
  CHECK(eff(0, 19) == "");  // on the cpu stream the optimizer reads the host copy
  // g1 (the last stage): %1 recv act(S0,m0), %2 forward S1 m0, %3 backward S1 m0, %15 optim S1 @comp
  CHECK(eff(1, 1) == "alloc act(S0,m0); ");
  CHECK(eff(1, 2) == "require w(S1); require batch(m0); require act(S0,m0); alloc stash(S1,m0); " + ws(fws1));
  CHECK(eff(1, 3) == "require w(S1); require batch(m0); alloc grad(S0,m0); alloc-if-absent wgrad(S1); "
                     "free stash(S1,m0); free act(S0,m0); " + ws(bws1));
  CHECK(eff(1, 15) == "free wgrad(S1); ");  // on the GPU the step consumes the gradient there
  // persistence: what the buffer table puts on the GPU (w and opt with home=gpu)
  for (const auto& d : p.buffers) {
    BufRef b{d.kind, d.stage, -1};
    if (!b.per_microbatch()) CHECK(is_persistent(p, b) == (d.home == Tier::Gpu && (d.kind == BufKind::W || d.kind == BufKind::Opt)));
  }
  CHECK(transfer_bytes(p, p.programs[0].instrs[0]) == p.buffer_bytes(BufRef::parse("w(S0)")));
  CHECK(transfer_bytes(p, p.programs[0].instrs[15]) == 0);  // a drop copies nothing
  CHECK(transfer_bytes(p, p.programs[0].instrs[18]) == p.buffer_bytes(BufRef::parse("wgrad(S0)")));
  CHECK(batch_buffer_bytes(8, 128) == 2 * 8 * 8 * 128);
}

TEST_CASE("natural streams: the compiler's stream per op") {
  Instr e = mk(Op::Evict, Stream::Comp);
  CHECK(natural_stream(e) == Stream::Comp);
  e.to_host = true;
  CHECK(natural_stream(e) == Stream::D2H);
  CHECK(natural_stream(mk(Op::Prefetch, Stream::Comp)) == Stream::H2D);
  CHECK(natural_stream(mk(Op::Send, Stream::Comp)) == Stream::P2P);
  CHECK(natural_stream(mk(Op::Optim, Stream::Cpu)) == Stream::Cpu);
  CHECK(natural_stream(mk(Op::Optim, Stream::P2P)) == Stream::Comp);
  CHECK(natural_stream(mk(Op::Free, Stream::P2P)) == Stream::P2P);  // stays on its last user's stream
  CHECK(natural_stream(mk(Op::GradNorm, Stream::Comp)) == Stream::Cpu);
}

TEST_CASE("untimed executor and program replay on the hand plan and planted faults") {
  Plan p = hand_plan();
  // the hand plan is a format fixture, not a runnable order: g0 sends act(S0,m1) before it receives grad(S0,m0), and
  // g1 sends grad(S0,m0) before it receives act(S0,m1); with rendezvous both sends wait for each other
  for (Order o : {Order::Streams, Order::Sequential}) {
    Execution x = execute(p, o);
    CHECK_FALSE(x.complete);
    CHECK(x.report.find("g0 " + print_instr(p.programs[0].instrs[7], 7) + "   waits for its partner (tag F.S0.m1)") !=
          std::string::npos);
    CHECK(x.report.find("g1 " + print_instr(p.programs[1].instrs[4], 4) + "   waits for its partner (tag B.S0.m0)") !=
          std::string::npos);
  }
  // g1 receiving act(S0,m1) first (its %6 moved to %4, every `after` following its instruction) runs
  Plan ok = p;
  {
    auto& b = ok.programs[1].instrs;
    Instr r = b[6];
    b.erase(b.begin() + 6);
    b.insert(b.begin() + 4, r);
    auto remap = [](int a) { return a == 6 ? 4 : (a >= 4 && a < 6 ? a + 1 : a); };
    for (auto& in : b)
      for (auto& a : in.after) a = remap(a);
  }
  REQUIRE(verify_structure(ok).empty());
  for (Order o : {Order::Streams, Order::Sequential}) {
    std::vector<std::pair<int, int>> ran;
    Execution x = execute(ok, o, [&](int g, int i) { ran.push_back({g, i}); });
    CAPTURE(x.report);
    CHECK(x.complete);
    CHECK(x.report.empty());
    CHECK(ran.size() == ok.programs[0].instrs.size() + ok.programs[1].instrs.size());
    // every instruction after its deps, and each stream (or, sequential, each program) in order
    std::map<std::pair<int, int>, size_t> when;
    for (size_t k = 0; k < ran.size(); ++k) when[ran[k]] = k;
    for (int g = 0; g < 2; ++g)
      for (int i = 0; i < (int)ok.programs[g].instrs.size(); ++i) {
        for (int a : ok.programs[g].instrs[i].after) CHECK(when.at({g, a}) < when.at({g, i}));
        for (int j = 0; j < i; ++j)
          if (o == Order::Sequential || ok.programs[g].instrs[j].stream == ok.programs[g].instrs[i].stream)
            CHECK(when.at({g, j}) < when.at({g, i}));
      }
  }
  // the partner of each send is the recv with its tag on its peer
  auto partners = pair_partners(p);
  CHECK(partners[0][3] == std::make_pair(1, 1));
  CHECK(partners[1][1] == std::make_pair(0, 3));
  CHECK(partners[0][0] == std::make_pair(0, 0));  // not a paired op
  // a recv waiting for a send that comes after the recv on the same stream: stuck, reported
  Plan q = p;
  std::swap(q.programs[0].instrs[3], q.programs[0].instrs[9]);  // send act(S0,m0) <-> recv grad(S0,m0)
  for (auto& in : q.programs[0].instrs) in.after.clear();
  Execution x = execute(q, Order::Streams);
  CHECK_FALSE(x.complete);
  CHECK(x.report.find("deadlock (streams)") != std::string::npos);
  CHECK(x.report.find("waits for its partner") != std::string::npos);
  // replay: the hand plan needs nothing absent and leaks nothing; dropping a free leaks that buffer, dropping the
  // prefetch leaves the forward without its weights
  for (int g = 0; g < 2; ++g) {
    Replay r = replay_program(p, g);
    CAPTURE(g);
    CHECK(r.problems.empty());
    CHECK(r.leaked.empty());
  }
  Plan leak = p;
  leak.programs[0].instrs.erase(leak.programs[0].instrs.begin() + 4);  // free act(S0,m0)
  Replay r = replay_program(leak, 0);
  CHECK(r.problems.empty());
  REQUIRE(r.leaked.size() == 1);
  CHECK(r.leaked[0] == BufRef::parse("act(S0,m0)"));
  Plan nopf = p;
  nopf.programs[0].instrs.erase(nopf.programs[0].instrs.begin());  // prefetch w(S0)
  r = replay_program(nopf, 0);
  REQUIRE_FALSE(r.problems.empty());
  CHECK(r.problems[0] == "g0 %1: needs w(S0) on the GPU, but it is not present");
  CHECK(r.problems.back().find("w(S0) freed but not present") != std::string::npos);  // its evict
}

TEST_CASE("gradient buckets: bucket_range covers the flat exactly, aligned, each bucket inside one ZeRO shard (interleaved)") {
  for (int64_t elems : {int64_t(1), int64_t(63), int64_t(64), int64_t(1000), int64_t(6464), int64_t(46337), int64_t(1) << 20,
                        int64_t(6738415616)})
    for (int shards : {1, 2, 3, 4, 8})
      for (int n : {1, 2, 3, 4, 5, 8, 12, 64}) {
        CAPTURE(elems);
        CAPTURE(shards);
        CAPTURE(n);
        std::vector<std::pair<int64_t, int64_t>> got;
        for (int k = 0; k < std::max(1, n); ++k) {
          const auto [b, e] = bucket_range(elems, k, n, shards);
          REQUIRE(e >= b);
          got.push_back({b, e});
          // cuts at multiples of kBucketAlign from the flat's start, or at the end of the flat or of a shard
          bool shard_end = false;
          for (int d = 0; d < shards; ++d) shard_end = shard_end || zero_shard(elems, d, shards).second == e;
          CHECK((e % kBucketAlign == 0 || e == elems || (shards > 1 && n % shards == 0 && shard_end)));
          if (shards > 1 && n % shards == 0 && n > 1) {  // inside the shard of replica k % shards, interleaved
            const auto [lo, hi] = zero_shard(elems, k % shards, shards);
            CHECK(b >= lo);
            CHECK(e <= hi);
            if (k >= shards) CHECK(b == bucket_range(elems, k - shards, n, shards).second);  // the shard's next piece
          } else if (k > 0) {
            CHECK(b == bucket_range(elems, k - 1, n, shards).second);  // in order
          }
          // no bucket is empty when the flat has room for n aligned ones per shard
          if (elems / shards >= int64_t(n) * kBucketAlign) CHECK(e > b);
        }
        std::sort(got.begin(), got.end());
        int64_t at = 0;
        for (const auto& [b, e] : got) {
          CHECK(b == at);  // no gap, no overlap
          at = e;
        }
        CHECK(at == elems);  // the whole flat
      }
  // the shards cover the flat; bucket k of a 2-way split of 1000 elements in 4: two per shard, cut aligned
  CHECK(zero_shard(1000, 0, 2) == std::pair<int64_t, int64_t>{0, 500});
  CHECK(zero_shard(1000, 1, 2) == std::pair<int64_t, int64_t>{500, 1000});
  CHECK(zero_shard(10, 3, 4) == std::pair<int64_t, int64_t>{9, 10});
  CHECK(bucket_range(1000, 0, 4, 2) == std::pair<int64_t, int64_t>{0, 192});    // shard 0: 250 rounded down to 64s
  CHECK(bucket_range(1000, 1, 4, 2) == std::pair<int64_t, int64_t>{500, 704});  // shard 1: 750 rounded down
  CHECK(bucket_range(1000, 2, 4, 2) == std::pair<int64_t, int64_t>{192, 500});  // shard 0, up to its end
  CHECK(bucket_range(1000, 3, 4, 2) == std::pair<int64_t, int64_t>{704, 1000});
  CHECK(bucket_range(1000, 1, 3, 2) == std::pair<int64_t, int64_t>{320, 640});  // 3 is not a multiple of 2: even cuts
  CHECK(bucket_range(1000, 0, 0, 2) == std::pair<int64_t, int64_t>{0, 1000});   // no buckets: the whole flat
  CHECK_THROWS_AS(bucket_range(1000, 4, 4, 2), std::invalid_argument);
  CHECK_THROWS_AS(bucket_range(1000, -1, 4, 2), std::invalid_argument);
  CHECK_THROWS_AS(bucket_range(1000, 0, 4, 0), std::invalid_argument);
}

TEST_CASE("gradient buckets: the text and JSON forms, the memory effects of a copy to the host in buckets") {
  Plan p = hand_plan();
  // a 3-bucket copy to the host of an offloaded stage's gradient: the buffer stays until the last bucket
  int ev = -1;
  for (int i = 0; i < (int)p.programs[0].instrs.size(); ++i) {
    const auto& in = p.programs[0].instrs[i];
    if (in.op == Op::Evict && in.to_host && in.buf && in.buf->kind == BufKind::WGrad) ev = i;
  }
  REQUIRE(ev >= 0);
  Instr base = p.programs[0].instrs[ev];
  for (int k = 0; k < 3; ++k) {
    Instr e = base;
    e.bucket = k;
    e.buckets = 3;
    CHECK(print_op(e) == "evict " + base.buf->str() + "[" + std::to_string(k + 1) + "/3] -> host");
    const std::string fx = effects_str(effects(p, e));
    CHECK(fx == (k < 2 ? "require " : "free ") + base.buf->str() + "; ");
  }
  p.programs[0].instrs[ev].bucket = 0;
  p.programs[0].instrs[ev].buckets = 2;
  Instr second = p.programs[0].instrs[ev];
  second.bucket = 1;
  second.after.push_back(ev);
  for (auto& in : p.programs[0].instrs)
    for (auto& a : in.after) if (a > ev) ++a;
  p.programs[0].instrs.insert(p.programs[0].instrs.begin() + ev + 1, second);
  CHECK(verify_structure(p).empty());
  const std::string text = print_text(p);
  CHECK(text.find("[1/2] -> host") != std::string::npos);
  CHECK(text.find("[2/2] -> host") != std::string::npos);
  CHECK(parse_text(text) == p);
  CHECK(from_json_string(to_json_string(p)) == p);
  CHECK(to_json_string(p).find("\"bucket\"") != std::string::npos);
  // malformed buckets in the text
  for (const auto& [bad, expect] : std::vector<std::pair<std::string, std::string>>{
           {"[1/2x]", "bucket"}, {"[1-2]", "expected [<k>/<n>]"}, {"[1/2", "expected [<k>/<n>]"}}) {
    std::string t = text;
    t.replace(t.find("[1/2]"), 5, bad);
    std::string err;
    try {
      parse_text(t);
    } catch (const ParseError& e) {
      err = e.what();
    }
    CAPTURE(bad);
    CHECK(err.find(expect) != std::string::npos);
  }
  // the verifier: a bucket on an op that has none, a bucket of a buffer that is not a gradient, one left out
  Plan q = p;
  for (auto& in : q.programs[0].instrs)
    if (in.op == Op::Forward) { in.buckets = 2; break; }
  auto problems = verify_structure(q);
  REQUIRE(!problems.empty());
  CHECK(problems[0].find("only for the reduction") != std::string::npos);
  q = p;
  q.programs[0].instrs.erase(q.programs[0].instrs.begin() + ev + 1);
  for (auto& in : q.programs[0].instrs)
    for (auto& a : in.after) if (a > ev) --a;
  problems = verify_structure(q);
  REQUIRE(!problems.empty());
  CHECK(problems[0].find("in its buckets 1..n in order") != std::string::npos);
}
