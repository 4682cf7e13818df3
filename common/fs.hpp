// Files and folders, POSIX only. Code linked with LibTorch must not call std::filesystem operations: libtorch.so
// exports its own (older) copies of the std::filesystem symbols, which the dynamic linker may bind instead of
// libstdc++'s (fs::remove_all crashes that way). So every part of mmoc uses these. Torch-free, depends on nothing.
#pragma once
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace mmoc {

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
std::string exe_dir();                             // folder of the running executable ("" when unknown)

// The whole file. Throws std::runtime_error "cannot read <what> file '<path>': <reason>" (a folder, a missing or
// unreadable file).
std::string read_file(const std::string& path, const std::string& what = "");

// Writes `path` atomically: the content goes to "<path>.tmp.<pid>", is fsynced and renamed over `path`, then the
// folder is fsynced (best effort). On any failure the temporary is removed, `path` is untouched, and
// std::runtime_error names the path, the step and the reason.
void write_file_atomic(const std::string& path, const std::string& content);
// The same for content in pieces (pointer, bytes), written one after the other without joining them first.
void write_file_atomic(const std::string& path, const std::vector<std::pair<const void*, std::size_t>>& pieces);
void fsync_dir(const std::string& dir);  // best effort

}  // namespace mmoc
