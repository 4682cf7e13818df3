// Learning-rate schedules matching HF transformers' get_constant_schedule_with_warmup,
// get_linear_schedule_with_warmup and get_cosine_schedule_with_warmup (num_cycles = 0.5) driven by
// torch.optim.lr_scheduler.LambdaLR: the update with index `step` (0 for the first optimizer step) uses
// base_lr * lambda(step). Torch-free.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace mmoc::engine::optim {

enum class LrSchedule : uint8_t { kConstant, kLinear, kCosine };

// warmup: number of warmup steps (lambda = step / max(1, warmup) while step < warmup).
// total: num_training_steps (ignored by kConstant).
//   kConstant: 1 after warmup.
//   kLinear:   max(0, (total - step) / max(1, total - warmup)).
//   kCosine:   max(0, 0.5 * (1 + cos(pi * progress))), progress = (step - warmup) / max(1, total - warmup).
double lr_lambda(LrSchedule schedule, int64_t warmup, int64_t total, int64_t step);
double lr_at(double base_lr, LrSchedule schedule, int64_t warmup, int64_t total, int64_t step);

// "constant", "linear", "cosine" (HF's names; also "constant_with_warmup"); nullopt otherwise.
std::optional<LrSchedule> parse_lr_schedule(std::string_view name);
const char* lr_schedule_name(LrSchedule schedule);

}  // namespace mmoc::engine::optim
