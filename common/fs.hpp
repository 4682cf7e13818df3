// Small POSIX file-system helpers. Code linked with LibTorch must not call std::filesystem operations:
// libtorch.so exports its own (older) copies of the std::filesystem symbols, which the dynamic linker may bind
// instead of libstdc++'s (fs::remove_all crashes that way). These use plain POSIX calls.
#pragma once
#include <string>
#include <vector>

namespace mmoc::io {

bool path_exists(const std::string& p);           // anything (follows symlinks)
bool is_directory(const std::string& p);
bool is_regular_file(const std::string& p);
void make_dirs(const std::string& p);              // mkdir -p; throws std::runtime_error
bool remove_tree(const std::string& p);            // rm -rf (does not follow symlinks); false if something stayed
std::vector<std::string> list_dir(const std::string& p);  // entry names (no . and ..), sorted; throws
std::string join_path(const std::string& a, const std::string& b);
std::string parent_dir(const std::string& p);      // "" for a bare name; trailing slashes ignored
std::string base_name(const std::string& p);       // last component; trailing slashes ignored
std::string strip_trailing_slashes(const std::string& p);
std::string real_path(const std::string& p);       // realpath(3), or p when that fails

}  // namespace mmoc::io
