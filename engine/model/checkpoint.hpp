// HF checkpoints (safetensors, single file or sharded) <-> per-stage flat weight tensors (LibTorch).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/io/hf_config.hpp"
#include "engine/io/safetensors.hpp"
#include "engine/model/layout.hpp"

namespace mmoc::engine {

// Fills `flats[i]` (1-D, numel == layouts[i].numel, any floating dtype, any device; allocated as fp32 CPU zeros
// when undefined) from the checkpoint in `dir`. On-disk F32/F16/BF16 are converted to each flat's dtype (exact
// widening, round-to-nearest-even narrowing). A layout that is a tensor-parallel shard (stage_layout(..., tp_rank,
// tp_size)) gets its slices of the file's tensors, reading only them (read_shard); vocabulary padding rows are zero.
// Checks the checkpoint holds every parameter of the WHOLE model (model_param_names) with HF's shape, and nothing else
// except rotary inv_freq buffers (and lm_head.weight of a tied model, which is ignored). Errors (io::FormatError) name the tensor: missing, shape [expected] vs [found],
// unexpected, non-float dtype. Padding is zeroed. `layouts` may be any subset of the model's stages.
void load_hf_weights(const std::string& dir, const ir::ModelArch& arch, const std::vector<StageLayout>& layouts,
                     std::vector<at::Tensor>& flats);
std::vector<at::Tensor> load_hf_weights(const std::string& dir, const ir::ModelArch& arch,
                                        const std::vector<StageLayout>& layouts);

struct SaveOptions {
  int64_t max_shard_bytes = 5'000'000'000;  // above this, model-0000k-of-0000n.safetensors + index
  bool generation_config = true;            // also write generation_config.json
  io::HfConfig config;                      // bos/eos/pad, max_position_embeddings (arch and dtype are set)
};

// Writes an HF checkpoint of the whole model to `dir`: model.safetensors (or shards + model.safetensors.index.json)
// in `dtype` (kFloat / kBFloat16 / kHalf) and config.json (+ generation_config.json). `layouts` with `flats` must
// cover every parameter exactly once (e.g. all stages of a plan), unsharded: a tensor-parallel shard is gathered first
// (tp_gather_flat, engine/model/tp.hpp), so the checkpoint is HF's layout whatever the tensor parallelism. Atomic: everything is written into
// "<dir>.tmp.<pid>" and then swapped in (renameat2 RENAME_EXCHANGE, else two renames); an existing `dir` is
// replaced only after the new one is complete. Flats may live on any device (copied to the host per shard).
void save_hf_checkpoint(const std::string& dir, const ir::ModelArch& arch, const std::vector<StageLayout>& layouts,
                        const std::vector<at::Tensor>& flats, c10::ScalarType dtype, const SaveOptions& opts = {});

// Helpers (also for tests): tensor <-> safetensors dtype, and a CPU tensor copied out of a safetensors entry.
io::DType to_io_dtype(c10::ScalarType);
c10::ScalarType to_scalar_type(io::DType);
at::Tensor read_tensor(const io::SafetensorsFile& f, const std::string& name);
at::Tensor read_tensor(const io::Checkpoint& c, const std::string& name);
// Rows [start, start + length) along dimension `dim` of a checkpoint tensor (as stored: HF's orientation), copying
// only those bytes out of the file.
at::Tensor read_tensor_slice(const io::Checkpoint& c, const std::string& name, int dim, int64_t start, int64_t length);
// The part of the checkpoint tensor `name` that parameter `p` of a (possibly sharded) layout holds, into `dst`
// (p.shape, flat orientation; GPT-2's Conv1D transposed), padding rows zeroed.
void read_shard(const io::Checkpoint& c, const std::string& name, const ParamInfo& p, const at::Tensor& dst);

}  // namespace mmoc::engine
