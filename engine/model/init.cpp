// Random initialisation of stage weights (declared in model.hpp). Each element is a function of (seed, parameter
// name, element index) only (normal_fill.hpp), so the values do not depend on the stage split, the thread count,
// the dtype or the device: they are computed on the host, in parallel over chunks, and copied where the flat lives.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <stdexcept>

#include "engine/model/model.hpp"
#include "engine/model/normal_fill.hpp"

namespace mmoc::engine {

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
uint64_t name_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ULL;
  return splitmix64(seed ^ splitmix64(h));
}
constexpr int64_t kGrain = int64_t(1) << 18;        // elements per parallel task
constexpr int64_t kStaging = int64_t(1) << 26;      // elements per host chunk for a flat that is not host fp32

// Fills out[0, n) with the values of elements [first, first + n) of parameter p, in parallel.
void fill_param(const ParamInfo& p, uint64_t seed, double std, float* out, int64_t first, int64_t n, const ParallelFor& pfor) {
  const uint64_t key = name_seed(seed, p.name);
  auto body = [&](int64_t b, int64_t e) {
    if (p.kind == ParamKind::Norm) std::fill(out + b, out + e, 1.0f);
    else if (p.kind == ParamKind::Bias) std::fill(out + b, out + e, 0.0f);
    else fill_normal(out + b, e - b, key, (uint64_t)(first + b), 0.0, std);
  };
  if (pfor) pfor(n, kGrain, body);
  else at::parallel_for(0, n, kGrain, body);
}
}  // namespace

void init_weights(const ir::ModelArch& a, const StageLayout& layout, const at::Tensor& flat, uint64_t seed, double std,
                  const ParallelFor& pfor) {
  (void)a;
  if (!flat.defined() || flat.dim() != 1 || flat.numel() != layout.numel || !flat.is_contiguous())
    throw std::invalid_argument("init_weights: flat tensor does not match the layout");
  if (layout.tp_size != 1)  // a shard's element i is not element i of the parameter
    throw std::invalid_argument("init_weights: a tensor-parallel shard layout (use tp_init_weights)");
  at::NoGradGuard ng;
  const bool direct = flat.device().is_cpu() && flat.scalar_type() == at::kFloat;
  int64_t pos = 0;  // padding between parameters (and after the last) is zero
  for (const auto& p : layout.params) {
    if (p.offset > pos) flat.narrow(0, pos, p.offset - pos).zero_();
    pos = p.offset + p.numel;
    if (direct) {
      fill_param(p, seed, std, flat.data_ptr<float>() + p.offset, 0, p.numel, pfor);
      continue;
    }
    // another dtype or device: through a host fp32 chunk (bounded memory)
    at::Tensor host = at::empty({std::min(p.numel, kStaging)}, at::TensorOptions().dtype(at::kFloat).pinned_memory(flat.is_cuda()));
    for (int64_t off = 0; off < p.numel; off += kStaging) {
      const int64_t len = std::min(kStaging, p.numel - off);
      fill_param(p, seed, std, host.data_ptr<float>(), off, len, pfor);
      flat.narrow(0, p.offset + off, len).copy_(host.narrow(0, 0, len));
    }
  }
  if (layout.numel > pos) flat.narrow(0, pos, layout.numel - pos).zero_();
}

}  // namespace mmoc::engine
