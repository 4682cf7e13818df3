// HF config.json files for the engine: reading a checkpoint folder's config.json and writing one. The text is read
// and written by the one reader in arch/hf_config.hpp (shared with the compiler); its errors become io::FormatError
// here (mmoc-run and mmoc-eval report them as bad input, exit code 2).
#pragma once
#include <string>

#include "arch/hf_config.hpp"
#include "engine/io/safetensors.hpp"  // FormatError

namespace mmoc::io {

using arch::HfConfig;
using arch::hf_config_json;
using arch::hf_generation_config_json;

// arch::parse_hf_config with its ConfigError as FormatError.
HfConfig parse_hf_config(const std::string& json_text, const std::string& source = "config.json");
// `path`: a config.json file or a folder holding one; arch.name = the folder's name.
HfConfig read_hf_config(const std::string& path);
// Atomically writes <dir>/config.json (and generation_config.json when `generation_config`).
void write_hf_config(const std::string& dir, const HfConfig& cfg, bool generation_config = true);

}  // namespace mmoc::io
