// The POSIX file helpers live in common/fs.hpp (namespace mmoc); engine code names them io::... as before.
#pragma once
#include "common/fs.hpp"

namespace mmoc::io {
using mmoc::base_name;
using mmoc::is_directory;
using mmoc::is_regular_file;
using mmoc::join_path;
using mmoc::list_dir;
using mmoc::make_dirs;
using mmoc::parent_dir;
using mmoc::path_exists;
using mmoc::real_path;
using mmoc::remove_tree;
using mmoc::strip_trailing_slashes;
}  // namespace mmoc::io
