// mmoc training checkpoints: the HF weights plus mmoc_state/ (AdamW state per stage, trainer state, plan), written
// from the per-stage state the workers hold.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "engine/model/layout.hpp"
#include "ir/plan.hpp"

namespace mmoc::engine {

// One stage's training state as a worker holds it: fp32 flat tensors (host or device; shallow handles, so a load
// writes into the worker's own storage) and its AdamW step count.
struct StageTensors {
  int id = 0;
  StageLayout layout;
  at::Tensor master, exp_avg, exp_avg_sq;
  int64_t step = 0;
};

// Every rank writes its stages' state into `parts_dir`/rank<r>.safetensors.
void save_state_parts(const std::string& parts_dir, int rank, const std::vector<StageTensors>& stages);
// Reads master and moments of `stages` from `state_dir`/S<id>.safetensors (a checkpoint's mmoc_state/), and their steps.
void load_state_parts(const std::string& state_dir, std::vector<StageTensors>& stages);

// Rank 0, after every rank's save_state_parts: writes the HF checkpoint (fp32 or bf16 weights) plus mmoc_state/
// (optimizer state parts, trainer_state.json with `extra_json`) into `dir`, atomically replacing an existing one.
void assemble_checkpoint(const ir::Plan& plan, const std::string& parts_dir, const std::string& dir,
                         const std::string& dtype, const std::string& extra_json);

}  // namespace mmoc::engine
