// Safetensors reader and writer (https://github.com/huggingface/safetensors format), written from scratch.
// Torch-free. File layout: u64 little-endian N, N bytes of JSON header, then the data section.
// The header maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end)} (offsets relative to the
// data section), plus an optional "__metadata__" object of string -> string.
//
// The reader memory-maps the file and validates everything before any tensor is handed out; a corrupt or
// truncated file throws io::FormatError naming the file and the problem. Nothing reads outside the mapping.
#pragma once
#include "common/fs.hpp"
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace mmoc::io {

// A file that is not what it claims to be (corrupt, truncated, inconsistent). what() names the file.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };
std::size_t dtype_size(DType);             // bytes per element
const char* dtype_name(DType);             // "F32", "BF16", ... (the safetensors spelling)
bool parse_dtype(const std::string&, DType& out);  // false for unknown names

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range inside the data section
  int64_t numel() const;        // product of shape (1 for a scalar)
  uint64_t nbytes() const { return end - begin; }
};

// A validated, memory-mapped safetensors file. Cheap to copy (shares the mapping).
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);  // throws FormatError / std::runtime_error (I/O)
  // Parses an in-memory image (tests, or data read elsewhere). `source` names it in errors.
  static SafetensorsFile from_bytes(std::vector<std::byte> bytes, const std::string& source);

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // ordered by data offset
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(const std::string& name) const;  // nullptr when absent
  const TensorInfo& at(const std::string& name) const;    // throws FormatError when absent
  std::span<const std::byte> data(const TensorInfo&) const;  // the tensor's bytes (not necessarily aligned)
  uint64_t file_size() const;
  uint64_t data_begin() const { return data_begin_; }  // file offset of the data section (TensorInfo ranges are relative to it)

 private:
  struct Mapping;
  std::shared_ptr<const Mapping> map_;
  std::string path_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
  uint64_t data_begin_ = 0;
  void parse();
};

// One tensor to write: `data` must hold exactly numel(shape) * dtype_size(dtype) bytes (little-endian).
struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  std::size_t nbytes = 0;
};

// Writes `tensors` in the given order (data contiguous, header padded with spaces to a multiple of 8 as the
// reference implementation does). Atomic: writes "<path>.tmp.<pid>", fsyncs, then renames over `path`.
// `metadata` goes into "__metadata__" (default {"format": "pt"} like HF; pass {} to omit it).
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});
// The exact bytes write_safetensors would write (for tests and in-memory use).
std::vector<std::byte> serialize_safetensors(const std::vector<TensorToWrite>& tensors,
                                             const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// A HF checkpoint directory: either `model.safetensors` or `model.safetensors.index.json` + shards
// (the index's "weight_map": tensor name -> shard file). Every listed tensor is checked to exist in its shard,
// no tensor may appear in two shards, and a shard's tensors that the index does not list are an error.
class Checkpoint {
 public:
  static Checkpoint open(const std::string& dir);
  const std::string& dir() const { return dir_; }
  bool sharded() const { return sharded_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;  // throws FormatError naming the tensor when absent
  std::span<const std::byte> data(const std::string& name) const;
  const SafetensorsFile& file_of(const std::string& name) const;

 private:
  std::string dir_;
  bool sharded_ = false;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t> where_;  // name -> files_ index
};

// A tensor's place in a header (no data): for writers that stream the data themselves.
struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
};
// The bytes in front of the data section of a file holding `tensors` back to back in this order: the 8-byte header
// length and the JSON header, padded with spaces so that the data section starts at a multiple of `data_align`
// (a multiple of 8; 4096 lets the data be written with O_DIRECT). Readers take the padding as JSON whitespace.
std::string safetensors_prefix(const std::vector<TensorEntry>& tensors, const std::map<std::string, std::string>& metadata,
                               std::size_t data_align = 8);
uint64_t safetensors_data_bytes(const std::vector<TensorEntry>& tensors);

// The atomic file write (tmp + fsync + rename) and the folder fsync are common/fs.hpp's.
using mmoc::fsync_dir;
using mmoc::write_file_atomic;

}  // namespace mmoc::io
