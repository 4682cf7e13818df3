#include "tests/engine/reference.hpp"

#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include "engine/data/data.hpp"
#include "engine/model/checkpoint.hpp"
#include "engine/model/layout.hpp"
#include "engine/model/model.hpp"
#include "engine/optim/lr_schedule.hpp"
using namespace mmoc::engine::optim;

namespace mmoc::test {

using namespace mmoc::engine;

RefResult reference_train(const ir::Plan& plan, const std::string& data_path, int steps, uint64_t seed, const std::string& init) {
  const auto& arch = plan.model;
  StageLayout full = full_layout(arch);
  at::Tensor flat = new_flat(full, at::TensorOptions().dtype(at::kFloat));
  if (init == "random") init_weights(arch, full, flat, seed);
  else { std::vector<at::Tensor> f{flat}; load_hf_weights(init, arch, {full}, f); }
  flat.requires_grad_(true);
  torch::optim::AdamW opt({flat}, torch::optim::AdamWOptions(plan.train.lr)
                                      .betas({plan.train.beta1, plan.train.beta2})
                                      .eps(plan.train.eps)
                                      .weight_decay(plan.train.weight_decay));
  Rope rope = make_rope(arch, plan.seq_len);
  data::DataConfig dc;
  dc.path = data_path;
  dc.vocab_size = arch.vocab;
  dc.fit.seq_len = plan.seq_len;
  dc.seed = 0;
  data::BatchIterator it(data::load_rows(dc), 0);
  RefResult r;
  const int M = plan.microbatches * plan.dp;  // the global batch (data-parallel replicas split it)
  for (int s = 0; s < steps; ++s) {
    data::StepBatch b = it.next_step(M, plan.micro_batch_size);
    int64_t count = 0;
    std::vector<at::Tensor> ids, labels;
    for (int m = 0; m < M; ++m) {
      auto o = at::TensorOptions().dtype(at::kLong);
      ids.push_back(at::from_blob(b.input_ids[m].data(), {plan.micro_batch_size, plan.seq_len}, o).clone());
      labels.push_back(at::from_blob(b.labels[m].data(), {plan.micro_batch_size, plan.seq_len}, o).clone());
      count += count_tokens(labels.back());
    }
    opt.zero_grad();
    double total = 0;
    for (int m = 0; m < M; ++m) {
      at::Tensor l = lm_loss_sum(stage_forward(arch, full, flat, ids[m], rope), labels[m]);
      total += l.item<double>();
      (l / double(count)).backward();
    }
    r.losses.push_back(total / double(count));
    if (plan.train.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(std::vector<at::Tensor>{flat}, plan.train.max_grad_norm);
    auto sch = parse_lr_schedule(plan.train.lr_schedule);
    double lr = lr_at(plan.train.lr, sch ? *sch : LrSchedule::kConstant, plan.train.warmup_steps,
                      std::max<int64_t>(plan.train.total_steps, 1), s);
    for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    opt.step();
  }
  r.weights = flat.detach().clone();
  return r;
}

}  // namespace mmoc::test
