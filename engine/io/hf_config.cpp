#include "engine/io/hf_config.hpp"

#include <fstream>
#include <sstream>

#include "engine/io/fsutil.hpp"

namespace mmoc::io {

HfConfig parse_hf_config(const std::string& text, const std::string& src) {
  try {
    return arch::parse_hf_config(text, src);
  } catch (const arch::ConfigError& e) {
    throw FormatError(e.what());
  }
}

HfConfig read_hf_config(const std::string& path) {
  const bool dir_given = is_directory(path);
  const std::string file = dir_given ? join_path(path, "config.json") : path;
  std::ifstream in(file);
  if (!in) throw std::runtime_error(file + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  HfConfig c = parse_hf_config(ss.str(), file);
  std::string dir = dir_given ? path : parent_dir(path);
  c.arch.name = base_name(real_path(dir.empty() ? std::string(".") : dir));
  return c;
}

void write_hf_config(const std::string& dir, const HfConfig& cfg, bool generation_config) {
  write_file_atomic(join_path(dir, "config.json"), hf_config_json(cfg));
  if (generation_config) write_file_atomic(join_path(dir, "generation_config.json"), hf_generation_config_json(cfg));
}

}  // namespace mmoc::io
