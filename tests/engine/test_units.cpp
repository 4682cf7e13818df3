// Unit tests of engine pieces that the equivalence runs exercise only as a whole: the device AdamW (fused kernel
// against torch.optim.AdamW's op sequence), the sum of squares, the cpu stream and the watchdog.
#include <ATen/ATen.h>
#include "tests/torch_doctest.hpp"

#include <atomic>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <thread>

#include "engine/exec/cpu_stream.hpp"
#include "engine/exec/device_adamw.hpp"

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
