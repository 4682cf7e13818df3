// partition and cross-map on small inputs: stage count and cover, optimal balance (brute force over all
// contiguous splits), the v*N > L+2 error; Mobius cross mapping on l20x4 / h200x2 and the "off" switch.
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "passes_common.hpp"

using namespace mmoc;
using namespace mmoc::test;

namespace {
// Smallest possible "slowest stage" over all splits of weights w into P contiguous non-empty parts.
// skip[l]: what a stage ending at layer l takes off (recompute: its last layer's down projection is not rerun)
double brute_force_best(const std::vector<double>& w, int P, const std::vector<double>& skip = {}) {
  const int n = (int)w.size();
  auto off = [&](int last) { return skip.empty() ? 0.0 : skip[last]; };
  double best = std::numeric_limits<double>::infinity();
  std::function<void(int, int, double)> rec = [&](int start, int left, double worst) {
    if (left == 1) {
      double s = 0;
      for (int l = start; l < n; ++l) s += w[l];
      best = std::min(best, std::max(worst, s - off(n - 1)));
      return;
    }
    double s = 0;
    for (int e = start + 1; e <= n - (left - 1); ++e) {
      s += w[e - 1];
      rec(e, left - 1, std::max(worst, s - off(e - 1)));
    }
  };
  rec(0, P, 0.0);
  return best;
}
std::vector<double> recompute_skips(const Fixture& f) {
  const auto& c = *f.c;
  std::vector<double> k;
  for (int l = 0; l < f.m.num_model_layers(); ++l)
    k.push_back(c.cost.layer_fwd_ms(l, c.plan.micro_batch_size, c.plan.seq_len) -
                c.cost.layer_recompute_ms(l, c.plan.micro_batch_size, c.plan.seq_len, false));
  return k;
}
std::vector<double> layer_weights(const Fixture& f, bool rc) {
  const auto& c = *f.c;
  std::vector<double> w;
  for (int l = 0; l < f.m.num_model_layers(); ++l) {
    double fw = c.cost.layer_fwd_ms(l, c.plan.micro_batch_size, c.plan.seq_len);
    w.push_back(fw + c.cost.layer_bwd_ms(l, c.plan.micro_batch_size, c.plan.seq_len) + (rc ? fw : 0));
  }
  return w;
}
void check_cover(const ir::Plan& p, int L) {
  REQUIRE(p.num_stages() == p.v * p.gpus);
  int at = 0;
  for (int s = 0; s < p.num_stages(); ++s) {
    const auto& st = p.stages[s];
    CHECK(st.id == s);
    CHECK(st.gpu == s % p.gpus);
    CHECK(st.layer_begin == at);
    CHECK(st.layer_end > st.layer_begin);
    at = st.layer_end;
  }
  CHECK(at == L + 2);
}
}  // namespace

TEST_CASE("partition: v*N stages covering [0, L+2) contiguously, stage s on rank s % N") {
  for (int gpus : {1, 2})
    for (int v : {1, 2, 3, 5}) {
      if (v * gpus > 10) continue;
      CAPTURE(gpus); CAPTURE(v);
      auto f = tiny(gpus, v, 2, "grouped");
      f->run_until("partition");
      check_cover(f->plan(), 8);
      int64_t params = 0;
      for (const auto& s : f->plan().stages) params += s.params;
      CHECK(params == f->m.total_params());
    }
}

TEST_CASE("partition: the slowest stage is the best any contiguous split can do (brute force)") {
  for (const char* rc : {"on", "off"})
    for (int gpus : {1, 2})
      for (int v : {1, 2, 3, 4, 5}) {
        if (v * gpus > 10) continue;
        CAPTURE(rc); CAPTURE(gpus); CAPTURE(v);
        JobConfig j = tiny_job(gpus, v, 2, "grouped");
        j.recompute = rc;
        j.seq_len = 64;
        auto f = fixture(j, v, "grouped");
        f->run_until("partition");
        const auto& p = f->plan();
        double worst = 0, total = 0;
        for (const auto& s : p.stages) { worst = std::max(worst, s.fwd_ms + s.bwd_ms); total += s.fwd_ms + s.bwd_ms; }
        const bool on = std::string(rc) == "on";
        auto w = layer_weights(*f, on);
        const std::vector<double> skip = on ? recompute_skips(*f) : std::vector<double>{};
        double ref = brute_force_best(w, v * gpus, skip);
        CHECK(worst == doctest::Approx(ref).epsilon(1e-9));
        double expect = std::accumulate(w.begin(), w.end(), 0.0);
        for (const auto& s : p.stages) expect -= on ? skip[s.layer_end - 1] : 0.0;
        if (on) CHECK(std::accumulate(skip.begin(), skip.end(), 0.0) > 0);  // the decoder layers skip something
        CHECK(total == doctest::Approx(expect).epsilon(1e-9));
        for (const auto& s : p.stages) CHECK(s.recompute == (std::string(rc) == "on"));
      }
}

TEST_CASE("partition: uniform decoder layers balance to total/P (llama2-7b, 8 stages)") {
  auto j = load_job(std::string(MMOC_CONFIGS_DIR) + "/jobs/seed-llama2-7b-l20x4.json");
  auto f = fixture(j, 2, "grouped");
  f->run_until("partition");
  const auto& p = f->plan();
  check_cover(p, 32);
  auto w = layer_weights(*f, true);
  double total = std::accumulate(w.begin(), w.end(), 0.0), maxw = *std::max_element(w.begin(), w.end());
  double worst = 0;
  for (const auto& s : p.stages) worst = std::max(worst, s.fwd_ms + s.bwd_ms);
  CHECK(worst <= total / 8 + maxw);
  CHECK(worst <= 1.2 * total / 8);
  // decoder layers are identical: the middle stages differ by at most one layer
  int lo = 1000, hi = 0;
  for (int s = 1; s + 1 < p.num_stages(); ++s) {
    lo = std::min(lo, p.stages[s].layer_end - p.stages[s].layer_begin);
    hi = std::max(hi, p.stages[s].layer_end - p.stages[s].layer_begin);
  }
  CHECK(hi - lo <= 1);
}

TEST_CASE("partition: v*N = L+2 gives one layer per stage; v*N > L+2 is an InputError") {
  {
    auto f = tiny(2, 5, 2, "grouped");
    f->run_until("partition");
    for (const auto& s : f->plan().stages) CHECK(s.layer_end - s.layer_begin == 1);
  }
  auto f = tiny(2, 6, 2, "grouped");
  CHECK_THROWS_WITH_AS(f->run_until("partition"), doctest::Contains("partitionable layers"), InputError);
  auto g = tiny(1, 11, 2, "grouped", "h200x1");
  CHECK_THROWS_AS(g->run_until("partition"), InputError);
}

TEST_CASE("cross-map: l20x4 puts consecutive ranks under different host links") {
  HardwareSpec hw = hardware("l20x4");
  CHECK(cross_map_order(hw, 4) == std::vector<int>{0, 2, 1, 3});
  CHECK(cross_map_cost(hw, {0, 2, 1, 3}) < cross_map_cost(hw, {0, 1, 2, 3}));
  // exhaustive: no order of the 4 GPUs costs less than the chosen one
  std::vector<int> a{0, 1, 2, 3};
  double chosen = cross_map_cost(hw, {0, 2, 1, 3});
  do CHECK(cross_map_cost(hw, a) >= chosen - 1e-12); while (std::next_permutation(a.begin(), a.end()));
  // by hand: sum_{i<j} shared/(j-i); shared = 2 within a link, 1 across
  CHECK(cross_map_cost(hw, {0, 1, 2, 3}) == doctest::Approx(2 + 1 + 2 + 0.5 + 0.5 + 1.0 / 3));
  CHECK(chosen == doctest::Approx(1 + 1 + 1 + 2.0 / 2 + 2.0 / 2 + 1.0 / 3));
  auto two = cross_map_order(hw, 2);
  REQUIRE(two.size() == 2);
  CHECK(hw.group_of(two[0]) != hw.group_of(two[1]));
  CHECK(two == std::vector<int>{0, 2});
  auto three = cross_map_order(hw, 3);
  CHECK(hw.group_of(three[0]) != hw.group_of(three[1]));
  CHECK(hw.group_of(three[1]) != hw.group_of(three[2]));
  CHECK_THROWS_AS(cross_map_order(hw, 5), InputError);
}

TEST_CASE("cross-map: 8 GPUs in four links alternate links; no shared link keeps identity") {
  HardwareSpec hw = hw8();
  auto o = cross_map_order(hw, 8);
  std::set<int> distinct(o.begin(), o.end());
  CHECK(distinct.size() == 8);
  for (size_t i = 0; i + 1 < o.size(); ++i) CHECK(hw.group_of(o[i]) != hw.group_of(o[i + 1]));
  std::vector<int> id(8);
  std::iota(id.begin(), id.end(), 0);
  CHECK(cross_map_cost(hw, o) < cross_map_cost(hw, id));
  HardwareSpec h2 = hardware("h200x2");
  CHECK(cross_map_order(h2, 2) == std::vector<int>{0, 1});
  CHECK(cross_map_order(h2, 1) == std::vector<int>{0});
}

TEST_CASE("cross-map pass: gpu_order per job; cross_map=off keeps 0..N-1") {
  auto j = load_job(std::string(MMOC_CONFIGS_DIR) + "/jobs/seed-llama2-7b-l20x4.json");
  {
    auto f = fixture(j, 2, "grouped");
    f->run_until("cross-map");
    CHECK(f->plan().gpu_order == std::vector<int>{0, 2, 1, 3});
  }
  j.cross_map = "off";
  {
    auto f = fixture(j, 2, "grouped");
    f->run_until("cross-map");
    CHECK(f->plan().gpu_order == std::vector<int>{0, 1, 2, 3});
  }
  j.cross_map = "auto";
  j.gpus = 2;
  {
    auto f = fixture(j, 2, "grouped");
    f->run_until("cross-map");
    CHECK(f->plan().gpu_order == std::vector<int>{0, 2});
  }
  auto t = tiny(2, 1, 2, "gpipe");
  t->run_until("cross-map");
  CHECK(t->plan().gpu_order == std::vector<int>{0, 1});
}

TEST_CASE("cross-map: on l20x4 the simulated step is shorter with cross mapping; without shared links nothing changes") {
  auto step = [](const std::string& hw_name, const std::string& cross) {
    JobConfig j = load_job(std::string(MMOC_CONFIGS_DIR) + "/jobs/seed-llama2-7b-l20x4.json");
    j.hardware = hw_name;
    j.offload = "all";  // weights cross PCIe every pass: host links are what cross mapping relieves
    j.cross_map = cross;
    return compile_job(j, model(j.model), hardware(hw_name), {});
  };
  CompileResult with = step("l20x4", "auto"), naive = step("l20x4", "off");
  CHECK(with.plan.gpu_order == std::vector<int>{0, 2, 1, 3});
  CHECK(naive.plan.gpu_order == std::vector<int>{0, 1, 2, 3});
  CHECK(with.sim.step_ms < naive.sim.step_ms);
  MESSAGE("l20x4 7B offload all: " << with.sim.step_ms << " ms with cross mapping, " << naive.sim.step_ms << " ms naive");
  // h200x2 has no shared host link: the pass is a no-op (2 of its GPUs, same plan either way)
  JobConfig j2 = tiny_job(2, 2, 4, "grouped", "h200x2");
  j2.cross_map = "auto";
  CompileResult a = compile_job(j2, model(j2.model), hardware("h200x2"), {});
  j2.cross_map = "off";
  CompileResult b = compile_job(j2, model(j2.model), hardware("h200x2"), {});
  CHECK(a.plan.gpu_order == b.plan.gpu_order);
  CHECK(a.sim.step_ms == b.sim.step_ms);
}

namespace {
// tests/golden/hardware/pairs4.json: 4 GPUs, fast links only between {0,2} and {1,3} (100 GB/s), the rest 10 GB/s.
HardwareSpec pairs4() {
  return load_hardware(std::string(MMOC_CONFIGS_DIR) + "/../tests/golden/hardware/pairs4.json", MMOC_CONFIGS_DIR);
}
// The slowest ring link of each tp group (tp.g<p>.r<d>) of a layout's mapping.
std::vector<double> tp_links(const HardwareSpec& hw, int gpus, int dp, int tp, const std::vector<int>& order) {
  ir::Plan p;
  p.gpus = gpus;
  p.dp = dp;
  p.tp = tp;
  p.gpu_order = order;
  std::vector<double> out;
  for (const auto& g : layout_links(hw, p))
    if (g.name.rfind("tp.", 0) == 0) out.push_back(g.gbps);
  return out;
}
}  // namespace

TEST_CASE("cross-map: tensor-parallel groups on the best-connected GPUs, then dp groups, then pipeline neighbours") {
  const HardwareSpec hw = pairs4();
  // pp 2 x tp 2: world ranks 0,1 (pipe 0's shards) and 2,3 (pipe 1's) on the fast pairs {0,2} and {1,3}
  const auto tp2 = cross_map_layout(hw, 2, 1, 2);
  CHECK(tp2 == std::vector<int>{0, 2, 1, 3});
  CHECK(tp_links(hw, 2, 1, 2, tp2) == std::vector<double>{100, 100});
  CHECK(tp_links(hw, 2, 1, 2, {0, 1, 2, 3}) == std::vector<double>{10, 10});  // the identity would put them on slow pairs
  // dp 2 x tp 2 (one pipeline rank): the tp groups first ({r0,r1}, {r2,r3}), the dp groups then get what is left
  CHECK(cross_map_layout(hw, 1, 2, 2) == std::vector<int>{0, 2, 1, 3});
  // dp 2 alone: the replicas on a fast pair; pipeline 2 alone: the neighbours on a fast pair
  CHECK(cross_map_layout(hw, 1, 2, 1) == std::vector<int>{0, 2});
  CHECK(cross_map_layout(hw, 2, 1, 1) == std::vector<int>{0, 2});
  CHECK(cross_map_order(hw, 2) == std::vector<int>{0, 2});
  // 4 pipeline ranks: a path through both fast links (the slowest neighbour link is 10 whatever the order; then the
  // next slowest is maximised)
  CHECK(cross_map_layout(hw, 4, 1, 1) == std::vector<int>{0, 2, 1, 3});
  // tp 4: one ring over all four GPUs; 0-2-?-? closes with a slow link whatever the order: ties keep the identity's
  // Mobius value and the smallest mapping
  CHECK(cross_map_layout(hw, 1, 1, 4).size() == 4);
  // uniform links (every existing hardware file): nothing but the host links decides, as before
  CHECK(cross_map_layout(hardware("h200x4"), 2, 1, 2) == std::vector<int>{0, 1, 2, 3});
  CHECK(cross_map_layout(hardware("h200x4"), 1, 2, 2) == std::vector<int>{0, 1, 2, 3});
  CHECK(cross_map_layout(hardware("l20x4"), 4, 1, 1) == std::vector<int>{0, 2, 1, 3});
  HardwareSpec same = hardware("h200x4");
  same.p2p_links = {{0, 2, same.p2p_gbps, "nvlink"}};  // listed at the default figure: no pair differs
  CHECK(cross_map_layout(same, 2, 1, 2) == std::vector<int>{0, 1, 2, 3});
  // l20x4 with tp 2 and uniform links: the shards of one pipeline rank (whose host copies overlap) under different host
  // links
  const auto l20 = cross_map_layout(hardware("l20x4"), 2, 1, 2);
  const HardwareSpec l20hw = hardware("l20x4");
  CHECK(l20hw.group_of(l20[0]) != l20hw.group_of(l20[1]));
  CHECK(l20hw.group_of(l20[2]) != l20hw.group_of(l20[3]));
  CHECK_THROWS_WITH_AS(cross_map_layout(hw, 2, 2, 2), doctest::Contains("8 ranks but hardware pairs4 has 4 GPUs"), InputError);
}

TEST_CASE("cross-map: 8 GPUs with fast pairs (g, g+4): every tp group on one, exhaustively") {
  HardwareSpec hw = hw8();
  hw.p2p_gbps = 10;
  for (int g = 0; g < 4; ++g) hw.p2p_links.push_back({g, g + 4, 100, "nvlink"});
  const auto m = cross_map_layout(hw, 4, 1, 2);
  REQUIRE(m.size() == 8);
  CHECK(std::set<int>(m.begin(), m.end()).size() == 8);
  CHECK(tp_links(hw, 4, 1, 2, m) == std::vector<double>{100, 100, 100, 100});
  for (int r = 0; r < 8; r += 2) CHECK(std::abs(m[r] - m[r + 1]) == 4);
  // 2 x dp 2 x tp 2 likewise
  CHECK(tp_links(hw, 2, 2, 2, cross_map_layout(hw, 2, 2, 2)) == std::vector<double>{100, 100, 100, 100});
}

TEST_CASE("cross-map pass: --tp 2 on pairs4 maps the shards to the fast pairs; the simulated step is shorter") {
  const HardwareSpec hw = pairs4();
  auto run = [&](const std::string& cross) {
    JobConfig j = tiny_job(2, 2, 4, "interleaved-1f1b", "pairs4");
    j.tp = 2;
    j.offload = "none";
    j.cross_map = cross;
    return compile_job(j, model(j.model), hw, {});
  };
  CompileResult with = run("auto"), naive = run("off");
  CHECK(with.plan.gpu_order == std::vector<int>{0, 2, 1, 3});
  CHECK(naive.plan.gpu_order == std::vector<int>{0, 1, 2, 3});
  CHECK(with.sim.step_ms < naive.sim.step_ms);
  MESSAGE("tiny-8l pp2 x tp2 on pairs4: " << with.sim.step_ms << " ms mapped, " << naive.sim.step_ms << " ms identity");
  const std::string links = describe_layout_links(hw, with.plan);
  CHECK(links.find("tp.g0.r0 GPUs 0,2 100 GB/s (nvlink)") != std::string::npos);
  CHECK(links.find("tp.g1.r0 GPUs 1,3 100 GB/s (nvlink)") != std::string::npos);
  CHECK(links.find("pp.r0 GPUs 0,1 10 GB/s") != std::string::npos);
  // the summary shows the mapping and the slowest link per group
  const std::string s = summary(with, model("tiny-8l"), hw);
  CHECK(s.find("physical order 0,2,1,3") != std::string::npos);
  CHECK(s.find("links (slowest per group): ") != std::string::npos);
  CHECK(s.find("rank g1 (GPU 1)") != std::string::npos);
}

TEST_CASE("plan forms: the mapping of every world rank round-trips; the verifier checks its size") {
  JobConfig j = tiny_job(2, 2, 4, "interleaved-1f1b", "pairs4");
  j.tp = 2;
  j.dp = 1;
  j.offload = "none";
  CompileResult r = compile_job(j, model(j.model), pairs4(), {});
  const ir::Plan& p = r.plan;
  REQUIRE(p.gpu_order == std::vector<int>{0, 2, 1, 3});
  CHECK(ir::physical_gpu(p, 1) == 2);
  CHECK(ir::physical_gpu(p, 2) == 1);
  const std::string text = ir::print_text(p);
  CHECK(text.find(" order=0,2,1,3 ") != std::string::npos);
  CHECK(ir::parse_text(text) == p);
  CHECK(ir::print_text(ir::parse_text(text)) == text);
  CHECK(ir::from_json_string(ir::to_json_string(p)) == p);
  CHECK(ir::verify_structure(p).empty());
  ir::Plan bad = p;
  bad.gpu_order = {0, 2, 1};
  auto probs = ir::verify_structure(bad);
  REQUIRE_FALSE(probs.empty());
  CHECK(probs[0].find("order has 3 entries, the layout has 4 ranks") != std::string::npos);
  bad.gpu_order = {0, 2, 2, 3};
  CHECK_FALSE(ir::verify_structure(bad).empty());
  // an older plan with one entry per pipeline rank still loads; its ranks then run on GPU = world rank
  ir::Plan old = p;
  old.gpu_order = {0, 1};
  CHECK(ir::verify_structure(old).empty());
  CHECK(ir::physical_gpu(old, 3) == 3);
}
