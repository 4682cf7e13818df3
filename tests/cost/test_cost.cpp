// Cost model against the numbers measured on the H100 machine (../shared/design/FACTS.md).
#include <doctest/doctest.h>

#include "cost/spec.hpp"

using namespace mmoc;
static const std::string kConfigs = MMOC_TEST_CONFIGS;

TEST_CASE("H100 layer times close to measured") {
  auto m = load_model("llama2-7b", kConfigs);
  auto hw = load_hardware("h100x1", kConfigs);
  CostModel c{m, hw};
  auto fb = [&](int mbs, int seq) { return c.layer_fwd_ms(1, mbs, seq) + c.layer_bwd_ms(1, mbs, seq); };
  CHECK(fb(8, 1024) == doctest::Approx(19.64).epsilon(0.10));
  CHECK(fb(1, 512) == doctest::Approx(3.65).epsilon(0.20));
  CHECK(fb(4, 512) == doctest::Approx(5.63).epsilon(0.20));
  CHECK(fb(1, 2048) == doctest::Approx(5.80).epsilon(0.20));
  CHECK(c.layer_fwd_ms(1, 8, 1024) == doctest::Approx(6.01).epsilon(0.15));
}

TEST_CASE("efficiency is continuous and monotone") {
  auto m = load_model("llama2-7b", kConfigs);
  auto hw = load_hardware("h100x1", kConfigs);
  CostModel c{m, hw};
  double prev = 0;
  for (double t = 16; t < 20000; t *= 1.01) {
    double e = c.efficiency(t);
    CHECK(e >= prev - 1e-12);
    CHECK(std::abs(e - prev) < 0.02 + (prev == 0 ? 1 : 0));
    prev = e;
  }
  CHECK(c.efficiency(1e6) == 1.0);
  CHECK(c.efficiency(1) == hw.mfu_small);
}

TEST_CASE("calibrated times override the formula") {
  auto m = load_model("llama2-7b", kConfigs);
  auto hw = load_hardware("h100x1", kConfigs);
  hw.calibrated_ms[calibration_key("llama2-7b", 1, true, 8, 1024)] = 42.0;
  CostModel c{m, hw};
  CHECK(c.layer_fwd_ms(3, 8, 1024) == 42.0);
  CHECK(c.layer_bwd_ms(3, 8, 1024) != 42.0);
  CHECK(calibration_key("m", 2, false, 1, 8) == "model=m,layer=head.bwd,mbs=1,seq=8");
}

TEST_CASE("transfers and optimizer") {
  auto m = load_model("llama2-7b", kConfigs);
  auto hw = load_hardware("h100x1", kConfigs);
  CostModel c{m, hw};
  // one 7B layer in bf16 (405 MB) over PCIe at ~50 GB/s: ~8 ms (FACTS)
  CHECK(c.h2d_ms(m.layer_params(1) * 2) == doctest::Approx(8.2).epsilon(0.05));
  // fused CPU AdamW, 202M params, 16 threads: measured 65 ms
  CHECK(c.adam_ms(202000000, 16) == doctest::Approx(65).epsilon(0.15));
  CHECK(c.adam_ms(202000000, 4) > 1.9 * c.adam_ms(202000000, 16));
  // 7B on the H100 host: ~2.1 s per step (FACTS)
  CHECK(c.adam_ms(m.total_params(), 16) / 1e3 == doctest::Approx(2.1).epsilon(0.15));
  CHECK(c.gpu_adam_ms(202000000) < 5);
  auto l20 = load_hardware("l20x4", kConfigs);
  CostModel cl{m, l20};
  CHECK(cl.p2p_ms(20000000) == doctest::Approx(1.02).epsilon(0.01));
}
