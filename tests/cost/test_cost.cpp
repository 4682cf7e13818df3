// Cost model against the numbers measured on the lent H100 machine (2026-11-22).
#include <doctest/doctest.h>

#include "cost/spec.hpp"

using namespace mmoc;
static const std::string kConfigs = MMOC_TEST_CONFIGS;

TEST_CASE("H100 layer times close to measured") {
  auto m = load_model("llama2-7b", kConfigs);
  auto hw = load_hardware("h100x1", kConfigs);
  hw.engine_kernels = false;  // measured when the engine ran ATen's elementwise ops
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

// ---- the shape-aware layer model (issue 11) ---------------------------------------------------------------------
namespace {
double achieved_tflops(const CostModel& c, int layer, int mbs, int seq) {
  const double flops = c.m.layer_fwd_flops(layer, mbs, seq) + c.m.layer_bwd_flops(layer, mbs, seq);
  return flops / ((c.layer_fwd_ms(layer, mbs, seq) + c.layer_bwd_ms(layer, mbs, seq)) * 1e9);
}
}  // namespace

TEST_CASE("a narrower decoder layer reaches a lower fraction of the GEMM rate") {
  auto hw = load_hardware("h200x1", kConfigs);
  auto m7 = load_model("llama2-7b", kConfigs), m13 = load_model("llama2-13b", kConfigs);
  auto m3 = load_model("llama3.2-3b", kConfigs), q3 = load_model("qwen2.5-3b", kConfigs);
  CostModel c7{m7, hw}, c13{m13, hw}, c3{m3, hw}, cq{q3, hw};
  const double t7 = achieved_tflops(c7, 1, 8, 1024), t13 = achieved_tflops(c13, 1, 8, 1024);
  const double t3 = achieved_tflops(c3, 1, 8, 1024), tq = achieved_tflops(cq, 1, 8, 1024);
  // hidden 5120 > 4096 > 3072 (GQA) > 2048 (GQA 16/2): the GEMMs' inner dimensions and the memory-bound passes per FLOP
  CHECK(t13 > t7);
  CHECK(t7 > 1.05 * t3);
  CHECK(t3 > tq);
  // the 7B layer stays what it measured inside the step on the H200 with the engine's own kernels (forward 5.49 ms,
  // backward with the stash 11.48 ms: bench/layer_overhead.py on the 48 GiB limit trace of
  // bench/results/2026-12-02-h200-s9); the model's forward is high (its GEMMs ran at 710-795 TFLOP/s, above what
  // gemm_k0 gives them), the sum and the backward are close
  CHECK(c7.layer_fwd_ms(1, 8, 1024) + c7.layer_bwd_ms(1, 8, 1024) == doctest::Approx(5.49 + 11.48).epsilon(0.03));
  CHECK(c7.layer_fwd_ms(1, 8, 1024) == doctest::Approx(5.49).epsilon(0.15));
  CHECK(c7.layer_bwd_ms(1, 8, 1024) == doctest::Approx(11.48).epsilon(0.05));
  // with ATen's elementwise ops (engine_kernels false), what the engine measured before its kernels: 7B inside the
  // step on one H200 (6.68 / 6.39 ms forward, 14.20 / 13.64 ms backward with the stash, 2026-12-01), 13B inside the
  // step on 2 H200s (docs/results.md, 2026-11-27): forward 9.73 ms, backward with recompute 30.1 ms
  auto aten = hw;
  aten.engine_kernels = false;
  CostModel a7{m7, aten}, a13{m13, aten};
  CHECK(a7.layer_fwd_ms(1, 8, 1024) + a7.layer_bwd_ms(1, 8, 1024) == doctest::Approx(6.54 + 13.92).epsilon(0.06));
  CHECK(a7.layer_bwd_ms(1, 8, 1024) == doctest::Approx(13.92).epsilon(0.08));
  CHECK(a13.layer_fwd_ms(1, 8, 1024) == doctest::Approx(9.73).epsilon(0.06));
  CHECK(a13.layer_fwd_ms(1, 8, 1024) + a13.layer_bwd_ms(1, 8, 1024) == doctest::Approx(30.1).epsilon(0.06));
  // the kernels take the rotary's and the SwiGLU's strided passes out of both directions
  CHECK(c7.layer_fwd_ms(1, 8, 1024) < a7.layer_fwd_ms(1, 8, 1024));
  CHECK(c7.layer_bwd_ms(1, 8, 1024) < a7.layer_bwd_ms(1, 8, 1024) - 1.0);
  // the shape terms are what slow the 3B layer: without gemm_k0 and the memory-bound passes it would run at the 7B's
  // rate (the old model: one rate for every shape)
  auto flat = hw;
  flat.gemm_k0 = 0;
  flat.gpu_mem_gbps = 1e9;
  CostModel f7{m7, flat}, f3{m3, flat};
  CHECK(achieved_tflops(f3, 1, 8, 1024) == doctest::Approx(achieved_tflops(f7, 1, 8, 1024)).epsilon(0.03));
  // a larger gemm_k0 costs a short inner dimension more
  auto k0 = hw;
  k0.gemm_k0 = 2 * hw.gemm_k0;
  CostModel k7{m7, k0}, k3{m3, k0};
  CHECK(k3.layer_fwd_ms(1, 8, 1024) / c3.layer_fwd_ms(1, 8, 1024) > k7.layer_fwd_ms(1, 8, 1024) / c7.layer_fwd_ms(1, 8, 1024));
}

TEST_CASE("the head's time grows with the vocabulary: the fp32 logits' passes") {
  auto hw = load_hardware("h200x1", kConfigs);
  auto m = load_model("llama3.2-3b", kConfigs);
  const int H = m.layers + 1;
  CostModel c{m, hw};
  // 128,256 x 8192 fp32 logits (4.2 GB): far from its GEMM time alone, and above the old FLOP-only estimate (12.5 /
  // 24.9 ms); the tied head stage's backward with recompute measured 84-114 ms for its first micro-batches and below
  // ~51 ms for the others (bench/results/2026-12-01-h200-s3/s3b.log)
  const auto pf = c.layer_parts(H, 8, 1024, true), pb = c.layer_parts(H, 8, 1024, false);
  CHECK(pf.memory_ms > 0.5 * pf.compute_ms);
  CHECK(pb.memory_ms > 0.4 * pb.compute_ms);
  const double rc = c.layer_fwd_ms(H, 8, 1024) + c.layer_bwd_ms(H, 8, 1024);
  CHECK(rc > 42);
  CHECK(rc < 51);
  // doubling the vocabulary doubles the head's time (matmuls and logits alike), more than doubling hidden does
  auto m2 = m;
  m2.vocab *= 2;
  CostModel c2{m2, hw};
  CHECK(c2.layer_fwd_ms(H, 8, 1024) == doctest::Approx(2 * c.layer_fwd_ms(H, 8, 1024)).epsilon(0.02));
  CHECK(c2.layer_bwd_ms(H, 8, 1024) > 1.9 * c.layer_bwd_ms(H, 8, 1024));
  auto mh = m;
  mh.hidden *= 2;
  CostModel ch{mh, hw};
  CHECK(ch.layer_fwd_ms(H, 8, 1024) < c2.layer_fwd_ms(H, 8, 1024));
  // the LLaMA-2-7B head (32,000 x 4096) inside the step on the H200: 5.37 ms forward, 8.58 ms backward (limit48 trace);
  // 13B alone: 6.00 / 9.80 ms (mmoc-profile, 2026-11-27)
  auto m7 = load_model("llama2-7b", kConfigs), m13 = load_model("llama2-13b", kConfigs);
  CostModel c7{m7, hw}, c13{m13, hw};
  CHECK(c7.layer_fwd_ms(m7.layers + 1, 8, 1024) == doctest::Approx(5.37).epsilon(0.08));
  CHECK(c7.layer_bwd_ms(m7.layers + 1, 8, 1024) == doctest::Approx(8.58).epsilon(0.10));
  CHECK(c13.layer_fwd_ms(m13.layers + 1, 8, 1024) == doctest::Approx(6.00).epsilon(0.08));
  CHECK(c13.layer_bwd_ms(m13.layers + 1, 8, 1024) == doctest::Approx(9.80).epsilon(0.10));
}

TEST_CASE("tflops_reproducing inverts the layer formula; the GPU AdamW counts the engine's passes") {
  auto hw = load_hardware("h200x1", kConfigs);
  auto m = load_model("llama3.2-3b", kConfigs);
  CostModel c{m, hw};
  for (int mbs : {1, 8}) {
    const double t = c.layer_fwd_ms(1, mbs, 1024) + c.layer_bwd_ms(1, mbs, 1024);
    CHECK(c.tflops_reproducing(1, mbs, 1024, t) == doctest::Approx(hw.gpu_tflops).epsilon(1e-9));
    CHECK(c.tflops_reproducing(1, mbs, 1024, 1.1 * t) < hw.gpu_tflops);
  }
  CHECK(c.tflops_reproducing(1, 8, 1024, 1e-3) == 0);  // below the memory-bound part alone
  // bf16: 28 (fused kernel) + 6 (gradient to fp32) + 4 (sum of squares, one fp32 read) + 6 (weights) bytes per
  // parameter; measured on the H200 (bench/results/2026-12-01-h200-s4): Llama-3.2-3B's 0.80B resident parameters in
  // 11.9 ms (small-3b-prediction.log), a 202M-parameter LLaMA-2-7B stage in 3.0 ms (78.7 ms for 26 in measured-7b-130)
  CHECK(c.gpu_adam_bytes_per_param() == 44);
  CHECK(c.gpu_adam_ms(797000000) == doctest::Approx(11.9).epsilon(0.15));
  CHECK(c.gpu_adam_ms(202383360) == doctest::Approx(3.0).epsilon(0.15));
  CostModel c32{m, hw, 4};
  CHECK(c32.gpu_adam_bytes_per_param() == 28 + 4 + 8);
}

TEST_CASE("hardware keys of the layer model") {
  auto hw = parse_hardware(R"({"gpus": 1, "gemm_k0": 512, "attn_efficiency": 0.3})", "t.json");
  CHECK(hw.gemm_k0 == 512);
  CHECK(hw.attn_efficiency == 0.3);
  CHECK(parse_hardware(R"({"gpus": 1})", "t.json").gemm_k0 == 1000);
  CHECK_THROWS_AS(parse_hardware(R"({"gpus": 1, "attn_efficiency": 1.5})", "t.json"), InputError);
  CHECK_THROWS_AS(parse_hardware(R"({"gpus": 1, "gemm_k0": -1})", "t.json"), InputError);
}

// Recompute inside backward: the last recomputed layer's output value is never read, so a LLaMA-style decoder layer at
// tp 1 skips its down projection there (model.cpp's output_unused). The cost model prices that GEMM out of the
// forward it repeats, and the hardware FLOPs of a step leave it out.
TEST_CASE("recompute without the last layer's down projection: cost and hardware FLOPs") {
  auto m = load_model("llama2-7b", kConfigs);
  auto hw = load_hardware("h200x1", kConfigs);
  CostModel c{m, hw};
  const double f = c.layer_fwd_ms(1, 8, 1024), r = c.layer_recompute_ms(1, 8, 1024, false);
  CHECK(c.layer_recompute_ms(1, 8, 1024, true) == f);
  // the down GEMM is 1/3 of the MLP's and ~22% of the layer's matmul FLOPs; the rest of the forward is unchanged
  CHECK(f - r > 0.12 * f);
  CHECK(f - r < 0.25 * f);
  CHECK(c.layer_recompute_ms(0, 8, 1024, false) == c.layer_fwd_ms(0, 8, 1024));    // embedding
  CHECK(c.layer_recompute_ms(33, 8, 1024, false) == c.layer_fwd_ms(33, 8, 1024));  // head
  const ModelSpec m2 = with_tp(m, 2);
  CostModel c2{m2, hw};
  CHECK(c2.layer_recompute_ms(1, 8, 1024, false) == c2.layer_fwd_ms(1, 8, 1024));  // tp: separate sharded ops
  CHECK(load_model("gpt2-xl", kConfigs).layer_can_select(1) == false);

  // step_flops: a stage of two decoder layers recomputing both adds one whole forward and one without the down GEMM
  ir::Plan p;
  p.model = m.arch();
  p.micro_batch_size = 8; p.seq_len = 1024; p.microbatches = 4;
  ir::Stage st;
  st.layer_begin = 1; st.layer_end = 3; st.recompute = true;
  p.stages.push_back(st);
  const StepFlops sf = step_flops(p);
  const double fwd = m.layer_fwd_flops(1, 8, 1024), down = 2.0 * 8 * 1024 * m.hidden * m.ffn;
  CHECK(sf.model == doctest::Approx(4 * 2 * 3 * fwd));
  CHECK(sf.hardware - sf.model == doctest::Approx(4 * (2 * fwd - down)));
  p.tp = 2;  // under tensor parallelism nothing is skipped
  CHECK(step_flops(p).hardware - step_flops(p).model == doctest::Approx(4 * 2 * fwd));
}
