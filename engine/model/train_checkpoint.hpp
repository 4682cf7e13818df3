// mmoc training checkpoints: the HF weights plus mmoc_state/ (AdamW state per stage, trainer state, plan), written
// by every rank for its own stages, each byte once, in parallel, straight from the training state.
//
// A checkpoint folder:
//   config.json, generation_config.json
//   model.safetensors                         one stage: the whole model
//   model-0000k-of-0000n.safetensors          n stages: stage k-1's parameters, one shard per stage,
//   model.safetensors.index.json                and the index (HF's sharded layout)
//   mmoc_state/S<k>.safetensors               exp_avg, exp_avg_sq (fp32 flats of stage k) and, when the weights
//                                             are not saved in fp32, master; metadata: step, layers
//   mmoc_state/trainer_state.json, plan.json
// With fp32 weights the shard *is* the stage's master (a flat's padding is always zero), so resuming is exact.
//
// Writing: each rank writes its stages' files into "<dir>.staging" (headers padded so the data starts at 4 KiB),
// in chunks of MMOC_IO_CHUNK_MIB (32) MiB by MMOC_IO_THREADS (4) threads with O_DIRECT, every file fsynced. Rank 0
// then adds the small files and swaps the folder in atomically (renameat2 RENAME_EXCHANGE): at every moment the
// target is either the previous complete checkpoint or the new complete one. The previous one is renamed to
// "<dir>.old" and removed in the background (a leftover is cleared by the next save). Nothing non-finite is ever
// written.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <thread>
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

// File names inside a checkpoint folder.
std::string hf_weights_file(const ir::Plan& plan, int stage);
std::string state_file(int stage);  // "mmoc_state/S<k>.safetensors"
std::string staging_dir(const std::string& dir);
std::string old_checkpoint_dir(const std::string& dir);  // "<dir>.old": the previous checkpoint while it is removed

struct IoOptions {
  int threads = 0;            // 0: MMOC_IO_THREADS or 4 (writes), 8 (reads)
  int64_t chunk_bytes = 0;    // 0: MMOC_IO_CHUNK_MIB MiB or 32 MiB
  int cuda_device = -1;       // the device of GPU-resident tensors (pinned staging buffers when >= 0)
  int rank = 0;               // for MMOC_TEST_FAULT=crash-in-save:<rank>
  int resolved_threads(bool write) const;
  int64_t resolved_chunk() const;
};

// Host memory a save holds beyond the training state: threads x 2 x chunk (pinned on CUDA); 256 MiB by default.
int64_t save_staging_bytes(const IoOptions& o);

struct IoStats {
  int64_t bytes = 0;   // bytes written or read by this rank
  double seconds = 0;  // wall time
};

// Writes this rank's stages into a staging folder, synchronously or on a background thread. Stages are written in
// the order given; wait_stage(id) returns once that stage's files are complete (and rethrows a failure), so the
// stage's state may change again after it. Extra host memory: save_staging_bytes().
class CheckpointWriter {
 public:
  CheckpointWriter(const ir::Plan& plan, IoOptions o);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  // `dir` exists with dir/mmoc_state. weights_dtype: kFloat or kBFloat16.
  void start(const std::string& dir, std::vector<StageTensors> stages, c10::ScalarType weights_dtype, bool background);
  bool active() const { return active_; }
  void wait_stage(int stage);
  IoStats wait();  // all stages; rethrows the first failure; idle afterwards

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  bool active_ = false;
};

// Rank 0, once every rank's writer has finished `staging`: config.json, generation_config.json, the shard index,
// trainer_state.json and plan.json, fsync, then `staging` replaces `dir` atomically and the previous checkpoint,
// renamed to old_checkpoint_dir(dir), is removed by a background thread (wait_checkpoint_cleanup() waits for it).
void finalize_checkpoint(const ir::Plan& plan, const std::string& staging, const std::string& dir,
                         c10::ScalarType weights_dtype, const std::string& trainer_state_json);
// finalize_checkpoint in two parts: the small files (rank 0 writes them while the ranks' large files are written),
// then, once every rank's writer has finished, the fsyncs and the swap.
void write_checkpoint_meta(const ir::Plan& plan, const std::string& staging, c10::ScalarType weights_dtype,
                           const std::string& trainer_state_json);
void commit_checkpoint(const std::string& staging, const std::string& dir);
// Waits for the background removal of a previous checkpoint (if any); the process's exit waits for it too.
void wait_checkpoint_cleanup();
// Before a save into `dir`: what an earlier save left behind when its process ended early (the staging folder, a
// previous checkpoint renamed aside but not yet removed).
void clear_save_leftovers(const std::string& dir);

// Reads master, moments and step of `stages` from checkpoint `dir` (the HF shard for masters saved in fp32), in
// parallel. Errors name the file. `stages` have unsharded layouts; a stage whose layers the checkpoint saved as one
// stage reads that stage's files, any other is gathered parameter by parameter from the saved stages that hold its
// layers (a checkpoint resumes under another partition: pp, v or the stage boundaries changed).
IoStats load_training_state(const std::string& dir, const ir::Plan& plan, std::vector<StageTensors>& stages, IoOptions o);

// The stages a checkpoint saved (mmoc_state/S<k>.safetensors with their 'layers' metadata), by first layer; they must
// cover the model's layers contiguously from 0 (io::FormatError otherwise).
struct SavedStage {
  int id = 0, layer_begin = 0, layer_end = 0;
  std::string path;
};
std::vector<SavedStage> saved_stages(const std::string& dir);

// An HF checkpoint (single file or sharded; F32, BF16 or F16) into fp32 flats of `layouts` (host or device), in
// parallel: the same checks and errors as load_hf_weights, then each tensor read once with large aligned reads.
IoStats load_hf_parallel(const std::string& dir, const ir::ModelArch& arch, const std::vector<StageLayout>& layouts,
                         std::vector<at::Tensor>& flats, IoOptions o);

}  // namespace mmoc::engine
