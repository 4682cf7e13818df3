// The one HF transformers config.json reader and writer: config.json text <-> ir::ModelArch, for every family in
// arch/arch.hpp. Torch-free; the compiler (parse_model) and the engine (engine/io/hf_config.hpp: files) both use it.
//
// The family comes from `model_type` (llama, mistral, qwen2, qwen3, gpt2) and `architectures` (LlamaForCausalLM,
// MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel); a config with neither is read as llama.
// Keys a config leaves out take the defaults of that family's HF config class (arch::defaults): e.g. rms_norm_eps is
// 1e-6 for the LLaMA-style families and layer_norm_epsilon 1e-5 for gpt2. Both transformers 4 (top-level rope_theta,
// rope_scaling, torch_dtype) and 5 (rope_parameters, dtype) spellings are read, with transformers 5's precedence.
// What the engine cannot compute is refused with a ConfigError naming the file and the key: another model_type or
// architecture, another activation, attention/MLP biases where the family has none, rope types other than default and
// llama3, partial rotary factors, per-layer mixtures of sliding and full attention.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "arch/arch.hpp"
#include "ir/plan.hpp"

namespace mmoc::arch {

struct HfConfig {
  ir::ModelArch arch;                     // name = "" (the reader of a folder sets it)
  std::string dtype;                      // "float32" | "bfloat16" | "float16" | "" (absent)
  int64_t max_position_embeddings = 2048; // gpt2: n_positions (= arch.max_positions)
  std::optional<int64_t> bos_token_id = 1, eos_token_id = 2, pad_token_id;  // eos: first entry when a list
};

// `source` names the text in error messages. Throws ConfigError.
HfConfig parse_hf_config(const std::string& json_text, const std::string& source = "config.json");

// A config.json that transformers (4.x and 5.x) loads as the family's causal LM (LlamaForCausalLM, ...,
// GPT2LMHeadModel). Writes both spellings of rope theta/scaling and of the dtype.
std::string hf_config_json(const HfConfig& cfg);
std::string hf_generation_config_json(const HfConfig& cfg);
// The HF class name of the family's causal LM ("LlamaForCausalLM", ..., "GPT2LMHeadModel").
const char* hf_architecture(Family);

}  // namespace mmoc::arch
