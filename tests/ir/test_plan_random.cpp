// Randomly generated plans (fixed seeds) round-trip through both forms.
#include <doctest/doctest.h>

#include <climits>
#include <cstring>
#include <limits>
#include <random>

#include "plan_fixtures.hpp"

using namespace mmoc::ir;

namespace {
struct Gen {
  std::mt19937_64 rng;
  explicit Gen(uint64_t seed) : rng(seed) {}

  int uni(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }
  bool coin(double p = 0.5) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; }

  int i32() {
    switch (uni(0, 4)) {
      case 0: return uni(-1, 10);
      case 1: return uni(0, 100000);
      case 2: return coin() ? INT_MAX : INT_MIN;
      case 3: return 0;
      default: return (int)(uint32_t)rng();
    }
  }
  int64_t i64() {
    switch (uni(0, 4)) {
      case 0: return uni(-1, 1000);
      case 1: return (int64_t)rng();
      case 2: return coin() ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::min();
      case 3: return int64_t(1) << uni(0, 62);
      default: return 0;
    }
  }
  double dbl() {
    static const double pool[] = {0.0,  -0.0,       1e-300,  -1e-300, 0.1,    0.2,       0.1 + 0.2, 1.0 / 3,
                                  2.0 / 3, 1e-5,    1e-8,    0.9,     0.999,  10000.0,   500000.0,  1e22,
                                  1e300, 9007199254740993.0, 4503599627370497.5, 123456789012345678.0,
                                  std::numeric_limits<double>::denorm_min(), std::numeric_limits<double>::min(),
                                  std::numeric_limits<double>::max(), std::numeric_limits<double>::lowest(),
                                  std::numeric_limits<double>::epsilon(), std::numeric_limits<double>::infinity(),
                                  -std::numeric_limits<double>::infinity(), 5e-324, 1.7976931348623157e308};
    switch (uni(0, 3)) {
      case 0: return pool[uni(0, (int)(sizeof pool / sizeof pool[0]) - 1)];
      case 1: return std::uniform_real_distribution<double>(-1e6, 1e6)(rng);
      case 2: return (double)(int64_t)rng();
      default: {  // random finite bit pattern
        for (;;) {
          uint64_t bits = rng();
          double d;
          std::memcpy(&d, &bits, sizeof d);
          if (std::isfinite(d)) return d;
        }
      }
    }
  }
  std::string str(bool allow_empty = true) {
    static const char* pool[] = {"bf16",   "l20x4",   "llama2-7b", "a b",       "quote\"d", "back\\slash", "tab\there",
                                 "ünï",    "x=y",     ";semi",     "{brace}",   "%1",       "after(%1)",   "@comp",
                                 "->",     "<-",      "}",         "w(S0)",     "new\nline", "\"",         "F.S0.m0",
                                 "B.S12.m3", "dp,0",  "g0",        "  lead",    "trail  "};
    if (allow_empty && coin(0.1)) return "";
    if (coin(0.6)) return pool[uni(0, (int)(sizeof pool / sizeof pool[0]) - 1)];
    std::string s;
    int n = uni(1, 12);
    for (int i = 0; i < n; ++i) s += (char)uni(1, 126);  // any ASCII except NUL
    return s;
  }
  BufRef buf() {
    BufRef b;
    b.kind = static_cast<BufKind>(uni(0, kNumBufKinds - 1));
    if (b.kind == BufKind::Batch) {
      b.stage = -1;
      b.mb = uni(0, 300);
    } else {
      b.stage = uni(0, 300);
      b.mb = b.per_microbatch() ? uni(0, 300) : -1;
    }
    return b;
  }
  // Either -1 (unset) or a value; the text form prints S-1 / m-1 / g-1 for unset positional operands.
  int maybe(int hi) { return coin(0.15) ? -1 : (coin(0.05) ? i32() : uni(0, hi)); }

  Instr instr(int index) {
    Instr in;
    in.op = static_cast<Op>(uni(0, kNumOps - 1));
    in.stream = static_cast<Stream>(uni(0, kNumStreams - 1));
    bool extra = coin(0.1);  // also set fields that the op does not use
    switch (in.op) {
      case Op::LoadBatch: in.mb = maybe(64); break;
      case Op::Forward:
      case Op::Backward:
        in.stage = maybe(64);
        in.mb = maybe(64);
        break;
      case Op::Optim: in.stage = maybe(64); break;
      case Op::Send:
      case Op::Recv:
        if (!coin(0.05)) in.buf = buf();
        in.peer = maybe(8);
        in.tag = str();
        break;
      case Op::Evict:
        if (!coin(0.05)) in.buf = buf();
        in.to_host = coin();
        break;
      case Op::AllReduce:
        if (!coin(0.05)) in.buf = buf();
        in.group = str();
        break;
      case Op::Prefetch:
      case Op::Free:
        if (!coin(0.05)) in.buf = buf();
        break;
      case Op::GradNorm: break;
      case Op::AddGrad:
        if (!coin(0.05)) in.buf = buf();
        in.stage = maybe(64);
        break;
      case Op::TierRead:
      case Op::TierWrite:
        if (!coin(0.05)) in.buf = buf();
        break;
    }
    if (extra) {
      if (coin()) in.stage = maybe(64);
      if (coin()) in.mb = maybe(64);
      if (coin()) in.buf = buf();
      if (coin()) in.peer = maybe(8);
      if (coin()) in.to_host = coin();
      if (coin()) in.tag = str();
      if (coin()) in.group = str();
    }
    int na = coin(0.6) ? 0 : uni(1, 4);
    for (int k = 0; k < na; ++k) in.after.push_back(coin(0.95) && index > 0 ? uni(0, index - 1) : i32());
    return in;
  }

  Plan plan() {
    Plan p;
    p.hardware = str();
    p.schedule = str();
    p.gpus = uni(1, 5);
    p.v = i32();
    p.dp = i32();
    p.microbatches = i32();
    p.micro_batch_size = i32();
    p.seq_len = i32();
    p.budget_bytes = i64();
    int no = uni(0, 6);
    for (int i = 0; i < no; ++i) p.gpu_order.push_back(i32());
    p.model = {str(), i32(), i32(), i32(), i32(), i32(), i32(), dbl(), dbl(), coin()};
    p.train.precision = str();
    p.train.lr = dbl();
    p.train.beta1 = dbl();
    p.train.beta2 = dbl();
    p.train.eps = dbl();
    p.train.weight_decay = dbl();
    p.train.max_grad_norm = dbl();
    p.train.lr_schedule = str();
    p.train.warmup_steps = i32();
    p.train.total_steps = i32();
    p.train.seed = i32();
    int ns = uni(0, 8);
    for (int i = 0; i < ns; ++i) {
      Stage s;
      s.id = coin(0.9) ? i : i32();
      s.gpu = coin(0.9) ? uni(0, p.gpus - 1) : i32();
      s.layer_begin = coin(0.9) ? uni(0, 80) : i32();
      s.layer_end = coin(0.9) ? uni(0, 80) : i32();
      s.recompute = coin();
      s.weights = static_cast<Residency>(uni(0, 1));
      s.optim = static_cast<OptimPlace>(uni(0, 1));
      s.params = i64();
      s.fwd_ws = i64();
      s.bwd_ws = i64();
      s.fwd_ms = dbl();
      s.bwd_ms = dbl();
      p.stages.push_back(s);
    }
    int nb = uni(0, 10);
    for (int i = 0; i < nb; ++i) {
      BufferDecl d;
      d.kind = static_cast<BufKind>(uni(0, kNumBufKinds - 1));
      d.stage = d.kind == BufKind::Batch ? -1 : uni(0, 300);
      d.bytes = i64();
      d.home = static_cast<Tier>(uni(0, 2));
      p.buffers.push_back(d);
    }
    if (coin(0.7)) {
      Predicted pr;
      pr.step_s = dbl();
      pr.tokens_per_s = dbl();
      pr.bubble = dbl();
      int n1 = uni(0, 5), n2 = uni(0, 5);
      for (int i = 0; i < n1; ++i) pr.peak_bytes.push_back(i64());
      for (int i = 0; i < n2; ++i) pr.bound_bytes.push_back(i64());
      p.predicted = pr;
    }
    for (int g = 0; g < p.gpus; ++g) {
      Program pg;
      pg.gpu = coin(0.95) ? g : i32();
      int n = coin(0.1) ? 0 : uni(1, 40);
      for (int i = 0; i < n; ++i) pg.instrs.push_back(instr(i));
      p.programs.push_back(std::move(pg));
    }
    return p;
  }
};
}  // namespace

TEST_CASE("random plans round-trip through the text form") {
  int count = 0;
  for (uint64_t seed = 1; seed <= 400; ++seed) {
    Gen gen(seed);
    Plan p = gen.plan();
    CAPTURE(seed);
    const std::string t = print_text(p);
    Plan back;
    REQUIRE_NOTHROW(back = parse_text(t));
    CHECK(back == p);
    CHECK(print_text(back) == t);
    ++count;
  }
  CHECK(count == 400);
}

TEST_CASE("random plans round-trip through the JSON form") {
  for (uint64_t seed = 1001; seed <= 1400; ++seed) {
    Gen gen(seed);
    Plan p = gen.plan();
    CAPTURE(seed);
    for (int indent : {-1, 1}) {
      const std::string j = to_json_string(p, indent);
      Plan back;
      REQUIRE_NOTHROW(back = from_json_string(j));
      CHECK(back == p);
      CHECK(to_json_string(back, indent) == j);
    }
  }
}

TEST_CASE("random plans: text and JSON forms carry the same content") {
  for (uint64_t seed = 2001; seed <= 2200; ++seed) {
    Gen gen(seed);
    Plan p = gen.plan();
    CAPTURE(seed);
    CHECK(parse_text(print_text(from_json_string(to_json_string(p)))) == p);
    CHECK(from_json_string(to_json_string(parse_text(print_text(p)))) == p);
  }
}

TEST_CASE("random doubles print in the shortest exact form") {
  Gen gen(77);
  for (int i = 0; i < 20000; ++i) {
    double d = gen.dbl();
    std::string s = format_double(d);
    CAPTURE(s);
    double back = std::strtod(s.c_str(), nullptr);  // independent reader
    CHECK((back == d && std::signbit(back) == std::signbit(d)));
    // Shortest: the %.15g form is used whenever it is exact.
    char b15[64];
    std::snprintf(b15, sizeof b15, "%.15g", d);
    if (std::strtod(b15, nullptr) == d) CHECK(s == b15);
    CHECK(s.size() <= 24);
  }
}
