// HF transformers config.json <-> ir::ModelArch (LLaMA family). Torch-free.
// Reads transformers 4 (top-level rope_theta, torch_dtype) and 5 (rope_parameters.rope_theta, dtype) spellings;
// rejects what the engine cannot compute (rope scaling, biases, head_dim != hidden/heads, other activations)
// with an io::FormatError that names the file and the key.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "engine/io/safetensors.hpp"  // FormatError
#include "ir/plan.hpp"

namespace mmoc::io {

struct HfConfig {
  ir::ModelArch arch;                     // name = "" (parse) or the folder's name (read_hf_config)
  std::string dtype;                      // "float32" | "bfloat16" | "float16" | "" (absent)
  int64_t max_position_embeddings = 2048;
  std::optional<int64_t> bos_token_id = 1, eos_token_id = 2, pad_token_id;  // eos: first entry when a list
};

// `source` names the text in error messages.
HfConfig parse_hf_config(const std::string& json_text, const std::string& source = "config.json");
// `path`: a config.json file or a folder holding one.
HfConfig read_hf_config(const std::string& path);

// A config.json that transformers (4.x and 5.x) loads as LlamaForCausalLM. Writes both spellings of rope theta
// (top-level rope_theta for transformers 4, rope_parameters for 5) and of the dtype (torch_dtype, dtype).
std::string hf_config_json(const HfConfig& cfg);
std::string hf_generation_config_json(const HfConfig& cfg);
// Atomically writes <dir>/config.json (and generation_config.json when `generation_config`).
void write_hf_config(const std::string& dir, const HfConfig& cfg, bool generation_config = true);

}  // namespace mmoc::io
