// schedule and comm-lowering on small inputs: one F and one B per local (stage, mb), F before B, the
// schedules' orders against independent references (1F1B warm-up, Megatron's interleaved chunk order, grouped
// contiguity), the schedules' input errors; send/recv pairs only across GPUs, matched, each send freed on p2p.
#include "passes_common.hpp"

using namespace mmoc;
using namespace mmoc::test;

namespace {
struct S { char op; int stage, mb; bool operator==(const S&) const = default; };
std::vector<S> seq(const ir::Program& p) {
  std::vector<S> out;
  for (const auto& in : p.instrs)
    if (is_compute(in)) out.push_back({in.op == ir::Op::Forward ? 'F' : 'B', in.stage, in.mb});
  return out;
}
std::string str(const std::vector<S>& s) {
  std::string o;
  for (const auto& x : s) o += std::string(1, x.op) + std::to_string(x.stage) + "." + std::to_string(x.mb) + " ";
  return o;
}
// 1F1B (PipeDream-flush / Megatron non-interleaved): min(N-r-1, M) warm-up forwards, then F/B pairs, then the rest.
std::vector<S> ref_1f1b(int r, int N, int M) {
  std::vector<S> o;
  int w = std::min(N - r - 1, M), f = 0, b = 0;
  for (; f < w; ++f) o.push_back({'F', r, f});
  for (; f < M; ++f, ++b) { o.push_back({'F', r, f}); o.push_back({'B', r, b}); }
  for (; b < M; ++b) o.push_back({'B', r, b});
  return o;
}
// Megatron-LM's interleaved schedule (schedules.py: get_model_chunk_id, num_warmup_microbatches).
std::vector<S> ref_interleaved(int r, int N, int v, int M) {
  const int total = M * v;
  int warm = std::min((N - r - 1) * 2 + (v - 1) * N, total);
  auto chunk = [&](int k, bool fwd) { int c = (k % (N * v)) / N; return fwd ? c : v - 1 - c; };
  auto mb = [&](int k) { return (k / (N * v)) * N + k % N; };
  std::vector<S> o;
  int f = 0, b = 0;
  for (; f < warm; ++f) o.push_back({'F', chunk(f, true) * N + r, mb(f)});
  for (; f < total; ++f, ++b) {
    o.push_back({'F', chunk(f, true) * N + r, mb(f)});
    o.push_back({'B', chunk(b, false) * N + r, mb(b)});
  }
  for (; b < total; ++b) o.push_back({'B', chunk(b, false) * N + r, mb(b)});
  return o;
}
}  // namespace

TEST_CASE("schedule: every schedule has one F and one B per local (stage, mb), F first, only compute on comp") {
  for (const auto& sched : schedule_names())
    for (int N : {1, 2})
      for (int v : {1, 2, 3})
        for (int M : {1, 2, 4, 5}) {
          try { check_schedule(sched, N, v, M); } catch (const InputError&) { continue; }
          CAPTURE(sched); CAPTURE(N); CAPTURE(v); CAPTURE(M);
          auto f = tiny(N, v, M, sched, N == 1 ? "h200x1" : "h200x2");
          f->run_until("schedule");
          const auto& p = f->plan();
          REQUIRE(p.programs.size() == (size_t)N);
          CHECK(check_fwd_bwd(p) == "");
          for (const auto& prog : p.programs) {
            CHECK(prog.instrs.size() == (size_t)(2 * v * M));
            for (const auto& in : prog.instrs) {
              CHECK(is_compute(in));
              CHECK(in.stream == ir::Stream::Comp);
              CHECK(in.after.empty());
            }
          }
        }
}

TEST_CASE("schedule: gpipe runs all forwards, then all backwards") {
  auto f = tiny(2, 2, 4, "gpipe");
  f->run_until("schedule");
  for (const auto& prog : f->plan().programs) {
    auto s = seq(prog);
    for (size_t i = 0; i < s.size(); ++i) CHECK(s[i].op == (i < s.size() / 2 ? 'F' : 'B'));
    // micro-batch major forwards
    for (size_t i = 1; i < s.size() / 2; ++i) CHECK(s[i].mb >= s[i - 1].mb);
  }
}

TEST_CASE("schedule: 1f1b warm-up: rank r runs N-r-1 warm-up forwards, then alternates, then drains") {
  for (int N : {2}) for (int M : {1, 2, 3, 4, 8}) {
    auto f = tiny(N, 1, M, "1f1b");
    f->run_until("schedule");
    for (int r = 0; r < N; ++r) {
      CAPTURE(M); CAPTURE(r);
      auto s = seq(f->plan().programs[r]);
      CHECK(str(s) == str(ref_1f1b(r, N, M)));
      int before = 0;
      while (before < (int)s.size() && s[before].op == 'F') ++before;
      CHECK(before == std::min(N - r - 1, M) + (M > N - r - 1 ? 1 : 0));  // warm-up + the first steady forward
    }
  }
  // 4 ranks (on the 8-GPU spec)
  HardwareSpec hw = hw8();
  for (int M : {4, 8}) {
    auto f = fixture(tiny_job(4, 1, M, "1f1b", "l20x4"), 1, "1f1b", &hw);
    f->run_until("schedule");
    for (int r = 0; r < 4; ++r) {
      auto s = seq(f->plan().programs[r]);
      CHECK(str(s) == str(ref_1f1b(r, 4, M)));
      int before = 0;
      while (s[before].op == 'F') ++before;
      CHECK(before - 1 == 4 - r - 1);
    }
  }
}

TEST_CASE("schedule: interleaved-1f1b follows Megatron's chunk order") {
  HardwareSpec hw = hw8();
  for (int N : {1, 2, 4})
    for (int v : {2, 3})
      for (int M : {N, 2 * N, 4 * N}) {
        if (N * v > 10) continue;
        CAPTURE(N); CAPTURE(v); CAPTURE(M);
        auto f = fixture(tiny_job(N, v, M, "interleaved-1f1b"), v, "interleaved-1f1b", &hw);
        f->run_until("schedule");
        for (int r = 0; r < N; ++r) CHECK(str(seq(f->plan().programs[r])) == str(ref_interleaved(r, N, v, M)));
      }
}

TEST_CASE("schedule: grouped keeps all micro-batches of a stage contiguous") {
  for (int v : {1, 2, 3})
    for (int M : {1, 3, 4}) {
      CAPTURE(v); CAPTURE(M);
      auto f = tiny(2, v, M, "grouped");
      f->run_until("schedule");
      for (const auto& prog : f->plan().programs) {
        auto s = seq(prog);
        // blocks of (op, stage): 2v blocks, each of M ops; forward stages ascending, backward descending
        REQUIRE(s.size() == (size_t)(2 * v * M));
        for (int blk = 0; blk < 2 * v; ++blk) {
          const S& first = s[blk * M];
          for (int k = 0; k < M; ++k) {
            CHECK(s[blk * M + k].op == first.op);
            CHECK(s[blk * M + k].stage == first.stage);
          }
          CHECK(first.op == (blk < v ? 'F' : 'B'));
          int c = blk < v ? blk : 2 * v - 1 - blk;
          CHECK(first.stage == c * 2 + prog.gpu);
        }
      }
    }
}

TEST_CASE("schedule: input errors") {
  CHECK_THROWS_WITH_AS(check_schedule("1f1b", 2, 2, 4), doctest::Contains("v=1"), InputError);
  CHECK_THROWS_WITH_AS(check_schedule("interleaved-1f1b", 2, 1, 4), doctest::Contains("v>=2"), InputError);
  CHECK_THROWS_WITH_AS(check_schedule("interleaved-1f1b", 2, 2, 3), doctest::Contains("divisible"), InputError);
  CHECK_THROWS_WITH_AS(check_schedule("zigzag", 2, 1, 4), doctest::Contains("unknown schedule 'zigzag'"), InputError);
  CHECK_THROWS_AS(check_schedule("gpipe", 2, 1, 0), InputError);
  CHECK_NOTHROW(check_schedule("interleaved-1f1b", 2, 2, 4));
  CHECK_NOTHROW(check_schedule("1f1b", 2, 1, 3));
  CHECK_NOTHROW(check_schedule("grouped", 2, 3, 3));
  CHECK_NOTHROW(check_schedule("gpipe", 2, 3, 3));
  // the pass itself rejects them too
  auto a = tiny(2, 2, 4, "1f1b");
  CHECK_THROWS_AS(a->run_until("schedule"), InputError);
  auto b = tiny(2, 2, 3, "interleaved-1f1b");
  CHECK_THROWS_AS(b->run_until("schedule"), InputError);
  auto c = tiny(2, 1, 4, "interleaved-1f1b");
  CHECK_THROWS_AS(c->run_until("schedule"), InputError);
  auto d = tiny(2, 1, 4, "zigzag");
  CHECK_THROWS_AS(d->run_until("schedule"), InputError);
}

TEST_CASE("comm-lowering: matched send/recv only across GPUs, each send freed on p2p") {
  for (const auto& sched : schedule_names())
    for (int N : {1, 2})
      for (int v : {1, 2, 3})
        for (int M : {2, 4}) {
          try { check_schedule(sched, N, v, M); } catch (const InputError&) { continue; }
          CAPTURE(sched); CAPTURE(N); CAPTURE(v); CAPTURE(M);
          auto f = tiny(N, v, M, sched, N == 1 ? "h200x1" : "h200x2");
          f->run_until("comm-lowering");
          const auto& p = f->plan();
          CHECK(ir::verify_structure(p).empty());
          CHECK(check_fwd_bwd(p) == "");
          int boundaries = 0;
          for (int s = 0; s + 1 < p.num_stages(); ++s) boundaries += p.stages[s].gpu != p.stages[s + 1].gpu;
          CHECK(count_op(p, ir::Op::Send) == 2 * M * boundaries);
          CHECK(count_op(p, ir::Op::Recv) == 2 * M * boundaries);
          if (N == 1) CHECK(count_op(p, ir::Op::Send) + count_op(p, ir::Op::Recv) + count_op(p, ir::Op::Free) == 0);
          std::map<std::string, std::pair<int, int>> sends, recvs;
          for (const auto& prog : p.programs) {
            const auto& ins = prog.instrs;
            for (int i = 0; i < (int)ins.size(); ++i) {
              const auto& in = ins[i];
              if (in.op != ir::Op::Send && in.op != ir::Op::Recv) continue;
              CHECK(in.stream == ir::Stream::P2P);
              CHECK(in.peer != prog.gpu);
              REQUIRE(in.buf);
              const int s = in.buf->stage, m = in.buf->mb;
              const bool act = in.buf->kind == ir::BufKind::Act;
              CHECK((act || in.buf->kind == ir::BufKind::Grad));
              CHECK(in.tag == std::string(act ? "F" : "B") + ".S" + std::to_string(s) + ".m" + std::to_string(m));
              // the producer side is stage s (act) or s+1 (grad); the peer holds the other
              int from_stage = act ? s : s + 1, to_stage = act ? s + 1 : s;
              if (in.op == ir::Op::Send) {
                sends[in.tag] = {prog.gpu, i};
                CHECK(p.stages[from_stage].gpu == prog.gpu);
                CHECK(p.stages[to_stage].gpu == in.peer);
                int prod = find_compute(prog, act ? ir::Op::Forward : ir::Op::Backward, from_stage, m);
                REQUIRE(prod >= 0);
                CHECK(std::count(in.after.begin(), in.after.end(), prod) == 1);
                CHECK(prod < i);
                // followed by a free of the sent buffer on p2p
                int fr = -1;
                for (int k = i + 1; k < (int)ins.size() && fr < 0; ++k)
                  if (ins[k].op == ir::Op::Free && ins[k].buf == in.buf) fr = k;
                REQUIRE(fr > i);
                CHECK(ins[fr].stream == ir::Stream::P2P);
              } else {
                recvs[in.tag] = {prog.gpu, i};
                CHECK(p.stages[to_stage].gpu == prog.gpu);
                CHECK(p.stages[from_stage].gpu == in.peer);
                int cons = find_compute(prog, act ? ir::Op::Forward : ir::Op::Backward, to_stage, m);
                REQUIRE(cons > i);
                CHECK(std::count(ins[cons].after.begin(), ins[cons].after.end(), i) == 1);
              }
            }
          }
          CHECK(sends.size() == recvs.size());
          for (auto& [tag, at] : sends) CHECK(recvs.count(tag) == 1);
          CHECK(verify_deadlock(p, false) == "");
        }
}
