// Unit tests of engine pieces that the equivalence runs exercise only as a whole: the device AdamW (fused kernel
// against torch.optim.AdamW's op sequence), the sum of squares, the cpu stream and the watchdog.
#include <ATen/ATen.h>
#include "tests/torch_doctest.hpp"

#include <atomic>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <thread>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

#include "engine/exec/cpu_stream.hpp"
#include "engine/exec/device_adamw.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "engine/model/normal_fill.hpp"

using namespace mmoc;
using namespace mmoc::engine;

namespace {
struct State {
  at::Tensor p, m, v, g;
};
State random_state(int64_t n, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  State s;
  s.p = at::empty({n}, at::kFloat).normal_(0, 0.02, gen);
  s.m = at::empty({n}, at::kFloat).normal_(0, 1e-3, gen);
  s.v = at::empty({n}, at::kFloat).uniform_(0, 1e-5, gen);
  s.g = at::empty({n}, at::kFloat).normal_(0, 1e-2, gen);
  return s;
}
State clone(const State& s) { return {s.p.clone(), s.m.clone(), s.v.clone(), s.g.clone()}; }
}  // namespace

TEST_CASE("device AdamW: the formula is torch.optim.AdamW's op sequence, bit for bit") {
  optim::AdamWHyper h;
  h.lr = 3e-3;
  h.weight_decay = 0.01;
  State a = random_state(100003, 1), b = clone(a);
  const float clip = 0.37f;
  for (int64_t step = 1; step <= 3; ++step) {
    adamw_step_tensors(a.p, a.m, a.v, a.g.clone(), at::Tensor(), h, step, clip, DeviceAdamWKernel::kFormula);
    // torch.optim.AdamW (single tensor, Python) as written out by hand
    at::Tensor g = b.g.clone().mul_(clip);
    const double bc1 = 1 - std::pow(h.beta1, (double)step), bc2 = 1 - std::pow(h.beta2, (double)step);
    b.p.mul_(1 - h.lr * h.weight_decay);
    b.m.lerp_(g, 1 - h.beta1);
    b.v.mul_(h.beta2).addcmul_(g, g, 1 - h.beta2);
    at::Tensor d = b.v.sqrt().div_(std::sqrt(bc2)).add_(h.eps);
    b.p.addcdiv_(b.m, d, -h.lr / bc1);
  }
  CHECK(at::equal(a.p, b.p));
  CHECK(at::equal(a.m, b.m));
  CHECK(at::equal(a.v, b.v));
}

TEST_CASE("device AdamW: the fused kernel (what CUDA runs) agrees with the formula to rounding, chunked, with bf16 out") {
  optim::AdamWHyper h;
  h.lr = 1e-2;
  h.weight_decay = 0.1;
  h.beta1 = 0.8;
  h.beta2 = 0.99;
  h.eps = 1e-6;
  // more than one 32M-element chunk would be slow here: the chunking is the same loop for both kernels
  State a = random_state(70001, 2), b = clone(a);
  at::Tensor wa = at::zeros({70001}, at::kBFloat16), wb = at::zeros({70001}, at::kBFloat16);
  at::Tensor sa = at::zeros({}, at::kDouble), sb = at::zeros({}, at::kDouble);
  for (int64_t step = 1; step <= 4; ++step) {
    at::Tensor g = a.g.to(at::kBFloat16);  // the GPU path gets the compute-dtype gradient
    adamw_step_tensors(a.p, a.m, a.v, g, wa, h, step, 0.5f, DeviceAdamWKernel::kFused, &sa);
    adamw_step_tensors(b.p, b.m, b.v, g, wb, h, step, 0.5f, DeviceAdamWKernel::kFormula, &sb);
  }
  const double scale = b.p.abs().max().item<double>();
  CHECK((a.p - b.p).abs().max().item<double>() <= 1e-6 * scale);
  CHECK((a.m - b.m).abs().max().item<double>() <= 1e-6 * b.m.abs().max().item<double>());
  CHECK((a.v - b.v).abs().max().item<double>() <= 1e-6 * b.v.abs().max().item<double>());
  CHECK(at::equal(wa, a.p.to(at::kBFloat16)));  // the weights copy is the updated master, rounded
  CHECK(sa.item<double>() == sb.item<double>());
  CHECK(sa.item<double>() == doctest::Approx(4 * a.g.to(at::kBFloat16).to(at::kDouble).pow(2).sum().item<double>()).epsilon(1e-12));
  // the update moved the weights (not vacuous) and a wrong hyper-parameter would show: lr x 1.001
  State c = random_state(70001, 2);
  optim::AdamWHyper h2 = h;
  h2.lr *= 1.001;
  for (int64_t step = 1; step <= 4; ++step)
    adamw_step_tensors(c.p, c.m, c.v, c.g.to(at::kBFloat16), at::Tensor(), h2, step, 0.5f, DeviceAdamWKernel::kFused);
  CHECK((c.p - b.p).abs().max().item<double>() > 1e-5 * scale);
}

TEST_CASE("device AdamW rejects mismatched tensors") {
  optim::AdamWHyper h;
  State a = random_state(64, 3);
  CHECK_THROWS_AS(adamw_step_tensors(a.p, a.m, a.v.narrow(0, 0, 32), a.g, at::Tensor(), h, 1, 1.0f), std::invalid_argument);
  CHECK_THROWS_AS(adamw_step_tensors(a.p, a.m, a.v, a.g, at::Tensor(), h, 0, 1.0f), std::invalid_argument);
}

TEST_CASE("cpu stream runs tasks in order and carries exceptions; the watchdog reports a stall once") {
  CpuStream cs;
  std::vector<int> order;
  std::vector<std::shared_future<void>> fs;
  for (int i = 0; i < 5; ++i) fs.push_back(cs.submit([&order, i] { order.push_back(i); }));
  auto bad = cs.submit([] { throw std::runtime_error("boom"); });
  for (auto& f : fs) f.get();
  CHECK(order == std::vector<int>{0, 1, 2, 3, 4});
  CHECK_THROWS_WITH_AS(bad.get(), "boom", std::runtime_error);

  std::atomic<int> described{0};
  {
    Watchdog w(0.6, "rank 9", [&](int i) { described = i + 100; return std::string(); });
    w.at(7);
    std::this_thread::sleep_for(std::chrono::milliseconds(1700));
    CHECK(described.load() == 107);
    described = 0;
    w.at(-1);  // outside a step: no report however long
    std::this_thread::sleep_for(std::chrono::milliseconds(1200));
    CHECK(described.load() == 0);
  }
}

TEST_CASE("Philox4x32-10 gives the published known-answer vectors") {
  // Random123's kat_vectors for philox4x32_10
  struct Kat { uint32_t ctr[4], key[2], out[4]; };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}, {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}, {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}}};
  for (const auto& k : kats) {
    uint32_t out[4];
    philox4x32_10(k.ctr, k.key, out);
    for (int i = 0; i < 4; ++i) CHECK(out[i] == k.out[i]);
  }
}

TEST_CASE("normal fill: a function of (key, index) only, the same on every ISA, normally distributed") {
  const int64_t n = (1 << 20) + 77;
  std::vector<float> whole(n), parts(n), other(n);
  fill_normal(whole.data(), n, 0x5eedULL, 3, 0.0, 1.0);
  int64_t pos = 0;
  for (int k = 1; pos < n; ++k) {  // pieces of odd lengths at odd offsets
    const int64_t len = std::min<int64_t>(n - pos, 997 * k % 5003 + 1);
    fill_normal(parts.data() + pos, len, 0x5eedULL, 3 + pos, 0.0, 1.0);
    pos += len;
  }
  CHECK(whole == parts);
  int isas = 0;
  for (const char* isa : {"baseline", "avx2", "avx512"}) {
    std::vector<float> v(n);
    if (!fill_normal_with_isa(isa, v.data(), n, 0x5eedULL, 3, 0.0, 1.0)) continue;
    ++isas;
    CAPTURE(isa);
    CHECK(std::memcmp(v.data(), whole.data(), n * sizeof(float)) == 0);
  }
  CHECK(isas >= 1);
  MESSAGE("normal fill: " << isas << " ISA(s) compared, running on " << normal_fill_isa());
  fill_normal(other.data(), n, 0x5eeeULL, 3, 0.0, 1.0);
  CHECK(other != whole);
  double m = 0, m2 = 0, m4 = 0, tail = 0;
  for (float x : whole) {
    m += x;
    m2 += (double)x * x;
    m4 += (double)x * x * x * x;
    tail += std::fabs(x) > 3.0;
  }
  m /= n, m2 /= n, m4 /= n, tail /= n;
  CHECK(std::fabs(m) < 0.005);
  CHECK(std::fabs(m2 - 1.0) < 0.005);
  CHECK(std::fabs(m4 / (m2 * m2) - 3.0) < 0.03);  // kurtosis of a normal
  CHECK(std::fabs(tail - 0.0027) < 0.0004);       // P(|z| > 3)
}

TEST_CASE("random init: the same values for any thread count, through a bf16 flat and in stage pieces") {
  ir::ModelArch a;
  a.name = "t";
  a.layers = 2;
  a.hidden = 72;  // sizes that are not multiples of the 64-element alignment: the flat has padding
  a.ffn = 100;
  a.heads = 4;
  a.kv_heads = 2;
  a.vocab = 101;
  const StageLayout L = full_layout(a);
  at::Tensor one = new_flat(L, at::kFloat), four = new_flat(L, at::kFloat), bf = new_flat(L, at::kBFloat16);
  const int saved = at::get_num_threads();
  at::set_num_threads(1);
  init_weights(a, L, one, 42);
  at::set_num_threads(4);
  init_weights(a, L, four, 42);
  init_weights(a, L, bf, 42);
  at::set_num_threads(saved);
  CHECK(at::equal(one, four));
  CHECK(at::equal(bf, one.to(at::kBFloat16)));
  // padding is zero, norms are one, the rest has std 0.02
  at::Tensor mask = at::ones({L.numel}, at::kBool);
  for (const auto& p : L.params) mask.narrow(0, p.offset, p.numel).fill_(false);
  CHECK(mask.sum().item<int64_t>() > 0);
  CHECK(one.masked_select(mask).abs().sum().item<double>() == 0.0);
  const auto* q = L.find("model.layers.1.mlp.up_proj.weight");
  CHECK(std::fabs(one.narrow(0, q->offset, q->numel).std().item<double>() - 0.02) < 0.001);
  const auto* nw = L.find("model.norm.weight");
  CHECK(at::equal(one.narrow(0, nw->offset, nw->numel), at::ones({nw->numel})));
}
