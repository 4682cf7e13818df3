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
#include <torch/csrc/autograd/grad_mode.h>

#include "engine/exec/cpu_stream.hpp"
#include "engine/exec/device_adamw.hpp"
#include "engine/exec/tp_segments.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "engine/model/normal_fill.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/train_checkpoint.hpp"
#include "engine/exec/host_memory.hpp"
#include "engine/io/fsutil.hpp"
#include "engine/io/safetensors.hpp"
#include <unistd.h>

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
  MESSAGE("normal fill: " << isas << " ISA(s) compared, running on " << std::string(normal_fill_isa()));
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

namespace {
ir::ModelArch small_arch() {
  ir::ModelArch a;
  a.name = "t";
  a.layers = 2;
  a.hidden = 72;
  a.ffn = 100;
  a.heads = 4;
  a.kv_heads = 2;
  a.vocab = 101;
  return a;
}
std::string scratch_dir(const std::string& name) {
  const char* t = std::getenv("TMPDIR");
  std::string d = std::string(t ? t : "/tmp") + "/mmoc-units-" + std::to_string(::getpid()) + "/" + name;
  io::remove_tree(d);
  io::make_dirs(d);
  return d;
}
}  // namespace

TEST_CASE("checkpoint writer: exact round trip through small chunks, and no non-finite value is ever written") {
  ir::Plan plan;
  plan.model = small_arch();
  ir::Stage s0;
  s0.id = 0;
  s0.layer_begin = 0;
  s0.layer_end = plan.model.layers + 2;
  plan.stages = {s0};
  const StageLayout L = full_layout(plan.model);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  StageTensors st{0, L, at::empty({L.numel}, at::kFloat), at::empty({L.numel}, at::kFloat).normal_(0, 1, gen),
                  at::empty({L.numel}, at::kFloat).uniform_(0, 1, gen), 12};
  init_weights(plan.model, L, st.master, 3);
  IoOptions o;
  o.chunk_bytes = 4096;  // many chunks, a tail in each file, more chunks than threads
  o.threads = 3;
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    CAPTURE(c10::toString(dt));
    const std::string dir = scratch_dir(dt == at::kFloat ? "fp32" : "bf16");
    const std::string staging = staging_dir(dir);
    io::make_dirs(staging + "/mmoc_state");
    CheckpointWriter w(plan, o);
    w.start(staging, {st}, dt, /*background=*/true);
    w.wait_stage(0);
    const IoStats io = w.wait();
    CHECK(io.bytes > (int64_t)(L.numel * 8));
    finalize_checkpoint(plan, staging, dir, dt, "{\"step\": 12}");
    CHECK_FALSE(io::path_exists(staging));
    // the files were reserved past their end (whole blocks): each is cut back to its last tensor's last byte
    for (const char* name : {"model.safetensors", "mmoc_state/S0.safetensors"}) {
      const auto f = io::SafetensorsFile::open(dir + "/" + name);
      CHECK(f.file_size() == f.data_begin() + f.tensors().back().end);
    }
    // the HF weights load with the generic reader, in the save dtype
    at::Tensor hf = load_hf_weights(dir, plan.model, {L})[0];
    CHECK(at::equal(hf, dt == at::kFloat ? st.master : st.master.to(at::kBFloat16).to(at::kFloat)));
    // and the training state comes back bit for bit
    StageTensors back{0, L, at::full({L.numel}, 5.0f), at::zeros({L.numel}), at::zeros({L.numel}), 0};
    std::vector<StageTensors> v{back};
    IoOptions ro = o;
    ro.threads = 2;
    load_training_state(dir, plan, v, ro);
    CHECK(at::equal(v[0].master, st.master));
    CHECK(at::equal(v[0].exp_avg, st.exp_avg));
    CHECK(at::equal(v[0].exp_avg_sq, st.exp_avg_sq));
    CHECK(v[0].step == 12);
    // load_hf_parallel reads the same as load_hf_weights
    std::vector<at::Tensor> flats{at::full({L.numel}, 9.0f)};
    load_hf_parallel(dir, plan.model, {L}, flats, ro);
    CHECK(at::equal(flats[0], hf));
    // a second save replaces it: the previous one is set aside and removed in the background
    io::make_dirs(staging + "/mmoc_state");
    w.start(staging, {st}, dt, /*background=*/false);
    w.wait();
    finalize_checkpoint(plan, staging, dir, dt, "{\"step\": 13}");
    wait_checkpoint_cleanup();
    CHECK_FALSE(io::path_exists(old_checkpoint_dir(dir)));
    CHECK_FALSE(io::path_exists(staging));
    CHECK(mmoc::read_file(dir + "/mmoc_state/trainer_state.json") == "{\"step\": 13}");
  }
  // a NaN in the state: the save fails naming the tensor, and the checkpoint in place stays as it was
  const std::string dir = scratch_dir("fp32-nan");
  {
    const std::string staging = staging_dir(dir);
    io::make_dirs(staging + "/mmoc_state");
    CheckpointWriter w(plan, o);
    w.start(staging, {st}, at::kFloat, false);
    w.wait();
    finalize_checkpoint(plan, staging, dir, at::kFloat, "{}");
  }
  const std::string before = io::SafetensorsFile::open(dir + "/model.safetensors").path();
  const auto bytes_before = io::SafetensorsFile::open(dir + "/mmoc_state/S0.safetensors").file_size();
  StageTensors bad = st;
  bad.exp_avg = st.exp_avg.clone();
  bad.exp_avg[L.numel - 3] = std::nanf("");
  const std::string staging = staging_dir(dir);
  io::make_dirs(staging + "/mmoc_state");
  CheckpointWriter w(plan, o);
  w.start(staging, {bad}, at::kFloat, true);
  CHECK_THROWS_WITH_AS(w.wait_stage(0), doctest::Contains("refusing to write non-finite values of exp_avg"), std::runtime_error);
  CHECK_THROWS_AS(w.wait(), std::runtime_error);
  CHECK(io::SafetensorsFile::open(dir + "/mmoc_state/S0.safetensors").file_size() == bytes_before);
  StageTensors back{0, L, at::zeros({L.numel}), at::zeros({L.numel}), at::zeros({L.numel}), 0};
  std::vector<StageTensors> v{back};
  load_training_state(dir, plan, v, o);
  CHECK(at::equal(v[0].exp_avg, st.exp_avg));  // the previous checkpoint, intact
  (void)before;
}

#ifdef MMOC_FIXTURES_DIR
TEST_CASE("load_hf_parallel equals load_hf_weights on HF's own checkpoints (fp32, bf16, sharded, tied)") {
  const std::string fix = std::string(MMOC_FIXTURES_DIR) + "/hf-tiny-llama/";
  if (!io::path_exists(fix)) {
    MESSAGE("no fixtures at " << fix << ": skipped");
    return;
  }
  int n = 0;
  for (const char* name : {"llama-gqa-fp32", "llama-gqa-bf16", "llama-tied-mha-fp32", "llama-gqa-fp32-sharded"}) {
    const std::string d = fix + name;
    if (!io::path_exists(d)) continue;
    CAPTURE(name);
    const auto arch = io::read_hf_config(d).arch;
    const auto Ls = stage_layouts(arch, {0, 1, arch.layers + 1, arch.layers + 2});
    auto ref = load_hf_weights(d, arch, Ls);
    std::vector<at::Tensor> got;
    for (const auto& L : Ls) got.push_back(at::full({L.numel}, 3.0f));
    IoOptions o;
    o.chunk_bytes = 8192;
    load_hf_parallel(d, arch, Ls, got, o);
    for (size_t s = 0; s < Ls.size(); ++s) CHECK(at::equal(got[s], ref[s]));
    ++n;
  }
  CHECK(n >= 3);
}
#endif

TEST_CASE("host_tensor: zeroed, exactly sized, freed with its last reference") {
  const int64_t before = host_tensor_bytes();
  {
    at::Tensor t = host_tensor(3'000'001, at::kFloat, false, -1, 3);
    CHECK(t.numel() == 3'000'001);
    CHECK(t.abs().sum().item<double>() == 0.0);
    CHECK(host_tensor_bytes() - before >= 3'000'001 * 4);
    CHECK(host_tensor_bytes() - before < 3'000'001 * 4 + (4 << 20));
    t.fill_(2.0f);
    CHECK(t.sum().item<double>() == 6'000'002.0);
  }
  CHECK(host_tensor_bytes() == before);
}

// ---- tensor-parallel segments (engine/exec/tp_segments.hpp) -----------------------------------------------------
TEST_CASE("tp segments: the body parks at each planned all-reduce; the instruction sums it, the next segment resumes it") {
  std::vector<std::string> log;
  SegmentRun* self = nullptr;
  double result = 0;
  SegmentRun run(
      [&] {
        at::Tensor a = at::ones({2});
        log.push_back("seg0");
        self->post(a);
        log.push_back("seg1 reads " + std::to_string((int)a[0].item<float>()));
        at::Tensor b = a * 3;
        self->post(b);
        log.push_back("seg2");
        result = b[1].item<double>();
      },
      {});
  self = &run;
  run.start();  // segment 0: up to the first all-reduce
  REQUIRE(run.posted());
  CHECK(run.done() == 0);
  CHECK(log == std::vector<std::string>{"seg0"});
  run.tensor().add_(10);  // the all-reduce instruction: in place, on this thread
  run.complete();
  CHECK(!run.posted());
  CHECK(log.size() == 1);  // summed, not resumed: the body waits for its next segment
  run.resume();            // segment 1
  REQUIRE(run.posted());
  CHECK(run.done() == 1);
  CHECK(log.back() == "seg1 reads 11");
  run.tensor().mul_(2);
  run.complete();
  run.resume();  // segment 2: to the end
  CHECK(run.finished());
  run.finish();
  CHECK(log.back() == "seg2");
  CHECK(result == 66);  // (1 + 10) * 3 * 2: each sum where the instructions put it
  CHECK_THROWS_AS(run.resume(), std::logic_error);  // nothing to resume
}

TEST_CASE("tp segments: the body's error reaches the segment, and an unfinished run is aborted without a hang") {
  SegmentRun* self = nullptr;
  SegmentRun failing([&] { throw std::runtime_error("boom in segment 0"); }, {});
  failing.start();
  CHECK(failing.finished());
  CHECK_THROWS_WITH(failing.finish(), "boom in segment 0");
  bool unwound = false;
  {
    auto parked = std::make_unique<SegmentRun>(
        [&] {
          at::Tensor a = at::ones({1});
          try {
            self->post(a);
          } catch (const std::runtime_error&) {
            unwound = true;
            throw;
          }
        },
        std::function<void()>{});
    self = parked.get();
    parked->start();
    CHECK(parked->posted());
  }  // destroyed while parked: its post throws, the thread is joined
  CHECK(unwound);
  // the executor's thread-local state goes with the body (grad mode off here: off there)
  bool grad_there = true;
  {
    at::NoGradGuard ng;
    SegmentRun r([&] { grad_there = at::GradMode::is_enabled(); }, {});
    r.start();
    r.finish();
  }
  CHECK(!grad_there);
}
