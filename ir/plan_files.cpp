// Plan files: either form, chosen by content; atomic writes.
#include <stdexcept>

#include "common/fs.hpp"
#include "ir/plan.hpp"

namespace mmoc::ir {

// ============================================================================================
// files
// ============================================================================================
Plan load_plan_file(const std::string& path) {
  std::string s;
  try {
    s = mmoc::read_file(path, "plan");
  } catch (const std::runtime_error& e) {
    throw ParseError(e.what());
  }
  auto first = s.find_first_not_of(" \t\r\n");
  try {
    if (first != std::string::npos && s[first] == '{') return from_json_string(s);
    return parse_text(s);
  } catch (const ParseError& e) {
    throw ParseError(path + ": " + e.what());
  }
}

void save_file_atomic(const std::string& path, const std::string& content) { mmoc::write_file_atomic(path, content); }


}  // namespace mmoc::ir
