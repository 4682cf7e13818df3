// engine/optim against LibTorch (linked into this test only): fused AdamW vs torch::optim::AdamW and vs
// a plain LibTorch replay of torch.optim.AdamW's _single_tensor_adam, bit for bit; conversions vs
// Tensor.to(); sum_of_squares vs a double reduction. Run with MMOC_OPTIM_ISA=avx512|avx2|baseline.
// LibTorch first: c10's logging defines CHECK* macros that must not shadow doctest's.
#include <torch/torch.h>
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LE
#undef CHECK_LT
#undef CHECK_GE
#undef CHECK_GT
#undef CHECK_NOTNULL
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>

#include "engine/optim/adamw.hpp"
#include "engine/optim/convert.hpp"
#include "engine/optim/lr_schedule.hpp"
#include "engine/optim/thread_pool.hpp"

using namespace mmoc::engine::optim;

namespace {

// Number of elements whose bits differ; reports the first one.
int64_t bit_mismatches(const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
  REQUIRE(a.numel() == b.numel());
  REQUIRE(a.element_size() == b.element_size());
  auto ac = a.contiguous();
  auto bc = b.contiguous();
  const int64_t n = a.numel();
  const int64_t es = a.element_size();
  const auto* pa = static_cast<const unsigned char*>(ac.data_ptr());
  const auto* pb = static_cast<const unsigned char*>(bc.data_ptr());
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(pa + i * es, pb + i * es, static_cast<size_t>(es)) != 0) {
      if (bad == 0) {
        uint32_t ua = 0, ub = 0;
        std::memcpy(&ua, pa + i * es, static_cast<size_t>(es));
        std::memcpy(&ub, pb + i * es, static_cast<size_t>(es));
        MESSAGE(what << ": first mismatch at " << i << ": 0x" << std::hex << ua << " vs 0x" << ub);
      }
      ++bad;
    }
  }
  return bad;
}

torch::Tensor random_bits_f32(int64_t n, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto bits = torch::randint(0, int64_t{1} << 32, {n}, gen, torch::kInt64);
  return bits.to(torch::kInt32).view(torch::kFloat32);  // wraps to all 2^32 patterns
}

torch::Tensor special_f32() {
  std::vector<uint32_t> u = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00000u,
                             0x7F800001u, 0xFF800001u, 0x7FFFFFFFu, 0x7FA00000u, 0x00000001u, 0x807FFFFFu,
                             0x00400000u, 0x3F808000u, 0x3F818000u, 0x3F80FFFFu, 0x7F7FFFFFu, 0xFF7FFFFFu,
                             0x7F7F8000u, 0x477FE000u, 0x477FF000u, 0x477FEFFFu, 0x33000000u, 0x33000001u,
                             0x33C00000u, 0x38800000u, 0x387FFFFFu, 0x387FE000u, 0x387FF000u, 0x00800000u};
  auto t = torch::empty({static_cast<int64_t>(u.size())}, torch::kInt32);
  std::memcpy(t.data_ptr(), u.data(), u.size() * 4);
  return t.view(torch::kFloat32);
}

}  // namespace

TEST_CASE("conversions are bit-exact vs torch (random bits, NaN, Inf, denormals, ties)") {
  // Random bit patterns: all exponent classes incl. NaN/Inf/denormal; plus log-uniform values that
  // exercise fp16's subnormal and overflow range; plus hand-picked ties and specials.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  auto logu = torch::exp2(torch::rand({1 << 20}, gen) * 48 - 30) *
              torch::where(torch::rand({1 << 20}, gen) < 0.5, -1.0, 1.0);
  auto x = torch::cat({random_bits_f32(1 << 21, 5), logu.to(torch::kFloat32), special_f32()});
  const int64_t n = x.numel();
  const float* xp = x.data_ptr<float>();

  // fp32 -> bf16: exact bits, NaNs included (torch's vectorised cast writes 0xFFFF for NaN).
  auto ours_b = torch::empty({n}, torch::kBFloat16);
  f32_to_bf16(xp, static_cast<uint16_t*>(ours_b.data_ptr()), n);
  CHECK(bit_mismatches(ours_b, x.to(torch::kBFloat16), "f32->bf16") == 0);

  // fp32 -> fp16: exact bits, NaNs included (sign, quiet bit and top payload kept, as F16C).
  auto ours_h = torch::empty({n}, torch::kFloat16);
  f32_to_f16(xp, static_cast<uint16_t*>(ours_h.data_ptr()), n);
  CHECK(bit_mismatches(ours_h, x.to(torch::kFloat16), "f32->f16") == 0);

  // All 65536 16-bit patterns upward.
  auto all16 = torch::arange(0, 65536, torch::kInt32).to(torch::kInt16);
  auto all_b = all16.view(torch::kBFloat16);
  auto all_h = all16.view(torch::kFloat16);
  auto up_b = torch::empty({65536}, torch::kFloat32);
  auto up_h = torch::empty({65536}, torch::kFloat32);
  bf16_to_f32(static_cast<const uint16_t*>(all_b.data_ptr()), up_b.data_ptr<float>(), 65536);
  f16_to_f32(static_cast<const uint16_t*>(all_h.data_ptr()), up_h.data_ptr<float>(), 65536);
  CHECK(bit_mismatches(up_b, all_b.to(torch::kFloat32), "bf16->f32") == 0);
  // fp16 -> fp32: torch's own vector and scalar paths disagree on NaN payloads, so NaNs are compared by
  // NaN-ness only; all other values bit for bit.
  auto ref_h = all_h.to(torch::kFloat32);
  auto nan_ours = torch::isnan(up_h);
  auto nan_ref = torch::isnan(ref_h);
  CHECK(torch::equal(nan_ours, nan_ref));
  CHECK(bit_mismatches(torch::where(nan_ours, 0.0f, up_h), torch::where(nan_ref, 0.0f, ref_h), "f16->f32") == 0);
  CHECK(nan_ours.sum().item<int64_t>() == 2 * 1023);  // 2 signs x 1023 non-zero mantissas
}

namespace {

struct Case {
  GradType grad_type;
  MomentForm form;
  double beta1;
  double weight_decay;
  float grad_scale;
  LrSchedule schedule;
  int threads;
  int64_t n;
};

std::string describe(const Case& c) {
  std::ostringstream os;
  os << "grad=" << (c.grad_type == GradType::kBFloat16 ? "bf16" : "fp32")
     << " form=" << (c.form == MomentForm::kLerp ? "lerp(python)" : "muladd(c++)") << " beta1=" << c.beta1
     << " wd=" << c.weight_decay << " grad_scale=" << c.grad_scale << " sched=" << lr_schedule_name(c.schedule)
     << " threads=" << c.threads << " n=" << c.n << " isa=" << adamw_isa();
  return os.str();
}

// Correctly rounded fp32 sqrt (what the fused kernel computes). torch's CPU Tensor.sqrt() goes through
// (presumably) MKL VML: measured off by one ulp for ~17% of inputs on an AMD EPYC, CPU dependent; the
// bit-exact references below therefore replay torch's op sequence with this sqrt, and separate checks
// bound the difference to torch's own sqrt.
torch::Tensor ieee_sqrt(const torch::Tensor& t) {
  auto out = torch::empty_like(t);
  const float* src = t.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) dst[i] = std::sqrt(src[i]);
  return out;
}

// Largest distance in units in the last place between two fp32 tensors (finite values).
int64_t max_ulp(const torch::Tensor& a, const torch::Tensor& b) {
  auto ia = a.contiguous().view(torch::kInt32).to(torch::kInt64);
  auto ib = b.contiguous().view(torch::kInt32).to(torch::kInt64);
  // Map sign-magnitude to a monotonic integer line.
  auto ma = torch::where(ia < 0, -(ia & 0x7FFFFFFF), ia);
  auto mb = torch::where(ib < 0, -(ib & 0x7FFFFFFF), ib);
  return (ma - mb).abs().max().item<int64_t>();
}

// Replays torch.optim.AdamW (Python; foreach=False, the CPU default) op by op in LibTorch:
// torch/optim/adam.py _single_tensor_adam with decoupled_weight_decay=True, maximize=False,
// amsgrad=False. (Checked separately against torch.optim.AdamW in Python: bit-identical.)
void python_adamw_replay(torch::Tensor& p, const torch::Tensor& g, torch::Tensor& m, torch::Tensor& v,
                         double lr, double b1, double b2, double eps, double wd, int64_t step, bool exact_sqrt) {
  torch::NoGradGuard ng;
  if (wd != 0) p.mul_(1 - lr * wd);
  m.lerp_(g, 1 - b1);
  v.mul_(b2).addcmul_(g, g, 1 - b2);
  const double s = static_cast<double>(step);  // step is a float in Python
  const double bc1 = 1 - std::pow(b1, s);
  const double bc2 = 1 - std::pow(b2, s);
  const double step_size = lr / bc1;
  const double bc2_sqrt = std::pow(bc2, 0.5);
  auto denom = ((exact_sqrt ? ieee_sqrt(v) : v.sqrt()) / bc2_sqrt).add_(eps);
  p.addcdiv_(m, denom, -step_size);
}

// Replays torch::optim::AdamW::step (torch/csrc/api/src/optim/adamw.cpp) op by op, with the exact sqrt.
void cpp_adamw_replay(torch::Tensor& p, const torch::Tensor& g, torch::Tensor& m, torch::Tensor& v, double lr,
                      double b1, double b2, double eps, double wd, int64_t step) {
  torch::NoGradGuard ng;
  if (wd != 0) p.mul_(1 - lr * wd);
  const double bc1 = 1 - std::pow(b1, static_cast<double>(step));
  const double bc2 = 1 - std::pow(b2, static_cast<double>(step));
  m.mul_(b1).add_(g, 1 - b1);
  v.mul_(b2).addcmul_(g, g, 1 - b2);
  auto denom = (ieee_sqrt(v) / std::sqrt(bc2)).add_(eps);
  p.addcdiv_(m, denom, -(lr / bc1));
}

void run_case(const Case& c) {
  INFO(describe(c));
  const int64_t n = c.n;
  const int steps = 6;
  const double base_lr = 3e-3, b2 = 0.95, eps = 1e-8;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  auto p0 = torch::randn({n}, gen);
  // Gradients spanning many magnitudes, with exact zeros, so eps and denormal-ish paths matter.
  std::vector<torch::Tensor> grads;
  for (int s = 0; s < steps; ++s) {
    auto g = torch::randn({n}, gen) * torch::exp(torch::randn({n}, gen) * 3) * 1e-3;
    g = torch::where(torch::rand({n}, gen) < 0.02, torch::zeros_like(g), g);
    if (c.grad_type == GradType::kBFloat16) g = g.to(torch::kBFloat16);
    grads.push_back(g.contiguous());
  }

  // Ours.
  ThreadPool pool(c.threads);
  auto p = p0.clone(), m = torch::zeros({n}), v = torch::zeros({n});
  auto out_b = torch::empty({n}, torch::kBFloat16);
  auto out_f = torch::empty({n}, torch::kFloat32);

  // References: an exact-sqrt replay (bit for bit) and torch itself (torch's sqrt).
  auto ref_p = p0.clone().set_requires_grad(true);
  torch::optim::AdamW opt({ref_p}, torch::optim::AdamWOptions(base_lr)
                                       .betas({c.beta1, b2})
                                       .eps(eps)
                                       .weight_decay(c.weight_decay));
  auto rp = p0.clone(), rm = torch::zeros({n}), rv = torch::zeros({n});     // exact-sqrt replay
  auto tp = p0.clone(), tm = torch::zeros({n}), tv = torch::zeros({n});     // Python form, torch sqrt

  AdamWHyper h;
  h.beta1 = c.beta1;
  h.beta2 = b2;
  h.eps = eps;
  h.weight_decay = c.weight_decay;
  h.moment_form = c.form;
  for (int s = 0; s < steps; ++s) {
    const double lr = lr_at(base_lr, c.schedule, 2, 8, s + 1);  // never 0, varies every step
    h.lr = lr;
    AdamWBuffers b;
    b.param = p.data_ptr<float>();
    b.exp_avg = m.data_ptr<float>();
    b.exp_avg_sq = v.data_ptr<float>();
    b.grad = grads[s].data_ptr();
    b.grad_type = c.grad_type;
    const bool bf16_out = s % 2 == 0;
    b.out = bf16_out ? out_b.data_ptr() : out_f.data_ptr();
    b.out_type = bf16_out ? OutType::kBFloat16 : OutType::kFloat32;
    b.n = n;
    adamw_step(b, h, s + 1, c.grad_scale, &pool);

    // torch sees the same gradient values upcast to fp32, times grad_scale (an fp32 multiply).
    auto g_ref = grads[s].to(torch::kFloat32).mul(c.grad_scale);
    INFO("step " << s + 1);
    torch::Tensor torch_p, torch_m, torch_v;
    if (c.form == MomentForm::kMulAdd) {
      cpp_adamw_replay(rp, g_ref, rm, rv, lr, c.beta1, b2, eps, c.weight_decay, s + 1);
      static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[0].options()).lr(lr);
      ref_p.mutable_grad() = g_ref.clone();
      opt.step();
      auto& st = static_cast<torch::optim::AdamWParamState&>(*opt.state().begin()->second);
      torch_p = ref_p.detach();
      torch_m = st.exp_avg();
      torch_v = st.exp_avg_sq();
    } else {
      python_adamw_replay(rp, g_ref, rm, rv, lr, c.beta1, b2, eps, c.weight_decay, s + 1, true);
      python_adamw_replay(tp, g_ref, tm, tv, lr, c.beta1, b2, eps, c.weight_decay, s + 1, false);
      torch_p = tp;
      torch_m = tm;
      torch_v = tv;
    }
    // Bit for bit against the exact-sqrt replay of torch's op sequence.
    CHECK(bit_mismatches(p, rp, "param vs replay") == 0);
    CHECK(bit_mismatches(m, rm, "exp_avg vs replay") == 0);
    CHECK(bit_mismatches(v, rv, "exp_avg_sq vs replay") == 0);
    // Against torch itself: moments bit for bit (no sqrt involved); params within a few ulps, the
    // difference coming only from torch's non-correctly-rounded sqrt.
    CHECK(bit_mismatches(m, torch_m, "exp_avg vs torch") == 0);
    CHECK(bit_mismatches(v, torch_v, "exp_avg_sq vs torch") == 0);
    // One ulp of sqrt changes an update of size ~lr by ~1e-7 relative, which can flip the rounding of
    // p + update by one ulp of p: allow (steps so far) x (2 ulp(p) + 1e-9).
    const auto absdiff = (p - torch_p).abs();
    const auto tol = (p.abs() * std::ldexp(1.0, -22) + 1e-9) * static_cast<double>(s + 1);
    CHECK((absdiff <= tol).all().item<bool>());
    const int64_t ulp = max_ulp(p, torch_p);
    if (s == steps - 1) {
      const int64_t diff = bit_mismatches(p, torch_p, "param vs torch (sqrt ulps expected)");
      MESSAGE(describe(c) << ": after " << steps << " steps params differ from torch's own in " << diff << " of "
                          << n << " elements, max |diff| " << absdiff.max().item<float>() << ", max "
                          << ulp << " ulp");
    }
    if (bf16_out) {
      CHECK(bit_mismatches(out_b, p.to(torch::kBFloat16), "bf16 out vs master.to(bf16)") == 0);
    } else {
      CHECK(bit_mismatches(out_f, p, "fp32 out vs master") == 0);
    }
  }
}

}  // namespace

TEST_CASE("fused AdamW is bit-identical to torch (several steps, wd, fp32/bf16 grads, grad_scale)") {
  const LrSchedule sc = LrSchedule::kCosine;
  const int64_t n = 100003;  // not a multiple of any vector width: tails are exercised
  for (MomentForm form : {MomentForm::kMulAdd, MomentForm::kLerp}) {
    for (GradType gt : {GradType::kFloat32, GradType::kBFloat16}) {
      for (int threads : {1, 4}) {
        run_case({gt, form, 0.9, 0.1, 0.37f, sc, threads, n});
      }
    }
  }
  // grad_scale == 1 (no multiply), no weight decay, linear schedule, tiny sizes.
  run_case({GradType::kBFloat16, MomentForm::kLerp, 0.9, 0.0, 1.0f, LrSchedule::kLinear, 4, 37});
  run_case({GradType::kFloat32, MomentForm::kMulAdd, 0.9, 0.0, 1.0f, LrSchedule::kConstant, 1, 5});
  // beta1 < 0.5: torch's lerp takes its other branch (fma(w - 1, end - self, end)).
  run_case({GradType::kFloat32, MomentForm::kLerp, 0.3, 0.05, 2.5f, sc, 4, 4099});
  run_case({GradType::kBFloat16, MomentForm::kMulAdd, 0.3, 0.05, 2.5f, sc, 4, 4099});
}

TEST_CASE("the lerp and mul/add forms are really different (so both references matter)") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  auto m = torch::randn({100000}, gen), g = torch::randn({100000}, gen);
  auto a = m.clone().lerp_(g, 1 - 0.9);
  auto b = m.clone().mul_(0.9).add_(g, 1 - 0.9);
  CHECK(bit_mismatches(a, b, "lerp vs mul/add (expected to differ)") > 0);
}

TEST_CASE("sum_of_squares vs torch double reduction") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(21);
  const int64_t n = 5 * kReduceBlock + 777;
  auto g = torch::randn({n}, gen) * torch::exp(torch::randn({n}, gen));
  auto gb = g.to(torch::kBFloat16);
  ThreadPool pool(4);
  const double s_f = sum_of_squares(g.data_ptr<float>(), GradType::kFloat32, n, &pool);
  const double s_b = sum_of_squares(gb.data_ptr(), GradType::kBFloat16, n, &pool);
  CHECK(s_f == doctest::Approx(g.to(torch::kDouble).square().sum().item<double>()).epsilon(1e-12));
  CHECK(s_b == doctest::Approx(gb.to(torch::kDouble).square().sum().item<double>()).epsilon(1e-12));
  // Global norm -> clip factor, as torch.nn.utils.clip_grad_norm_ computes it on an fp32 norm.
  const double norm = std::sqrt(s_f);
  auto t = torch::tensor({static_cast<float>(norm)});
  auto coef = torch::clamp(1.5 / (t + 1e-6), c10::nullopt, 1.0);
  CHECK(clip_scale(norm, 1.5) == coef.item<float>());
}
