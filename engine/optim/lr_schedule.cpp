#include "engine/optim/lr_schedule.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace mmoc::engine::optim {

double lr_lambda(LrSchedule schedule, int64_t warmup, int64_t total, int64_t step) {
  if (step < warmup) {
    return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup));
  }
  switch (schedule) {
    case LrSchedule::kConstant:
      return 1.0;
    case LrSchedule::kLinear:
      return std::max(0.0, static_cast<double>(total - step) /
                               static_cast<double>(std::max<int64_t>(1, total - warmup)));
    case LrSchedule::kCosine: {
      const double progress =
          static_cast<double>(step - warmup) / static_cast<double>(std::max<int64_t>(1, total - warmup));
      // HF: math.cos(math.pi * float(num_cycles) * 2.0 * progress) with num_cycles = 0.5.
      return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * 0.5 * 2.0 * progress)));
    }
  }
  return 1.0;
}

double lr_at(double base_lr, LrSchedule schedule, int64_t warmup, int64_t total, int64_t step) {
  return base_lr * lr_lambda(schedule, warmup, total, step);
}

std::optional<LrSchedule> parse_lr_schedule(std::string_view name) {
  if (name == "constant" || name == "constant_with_warmup") return LrSchedule::kConstant;
  if (name == "linear") return LrSchedule::kLinear;
  if (name == "cosine") return LrSchedule::kCosine;
  return std::nullopt;
}

const char* lr_schedule_name(LrSchedule schedule) {
  switch (schedule) {
    case LrSchedule::kConstant: return "constant";
    case LrSchedule::kLinear: return "linear";
    case LrSchedule::kCosine: return "cosine";
  }
  return "?";
}

}  // namespace mmoc::engine::optim
