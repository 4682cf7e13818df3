// A plain single-process LibTorch training loop: the whole model as one flat parameter, torch::optim::AdamW,
// gradient accumulation over the micro-batches of a step, clip_grad_norm_. The engine's pipelined, offloaded
// runs must equal it (fp32 on the CPU: to rounding).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "ir/plan.hpp"

namespace mmoc::test {

struct RefResult {
  std::vector<double> losses;
  at::Tensor weights;  // flat fp32, full_layout order
};

// Same data order as mmoc-run (data seed 0, pad), same init (seed) or HF checkpoint (init != "random").
RefResult reference_train(const ir::Plan& plan, const std::string& data, int steps, uint64_t seed, const std::string& init = "random");

}  // namespace mmoc::test
