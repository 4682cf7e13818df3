#include "engine/io/safetensors.hpp"

#include "engine/io/fsutil.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace mmoc::io {
using json = nlohmann::json;

namespace {
constexpr uint64_t kMaxHeader = 100'000'000;  // same cap as the reference implementation

std::string errno_str() { return std::strerror(errno); }

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw FormatError(source + ": " + what);
}
}  // namespace

// ---- dtypes ---------------------------------------------------------------------------------
std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  return 0;
}
const char* dtype_name(DType d) {
  switch (d) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}
bool parse_dtype(const std::string& s, DType& out) {
  static const std::pair<const char*, DType> table[] = {
      {"F64", DType::F64}, {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16}, {"I64", DType::I64},
      {"I32", DType::I32}, {"I16", DType::I16}, {"I8", DType::I8},   {"U8", DType::U8},     {"BOOL", DType::BOOL}};
  for (auto& [n, d] : table)
    if (s == n) { out = d; return true; }
  return false;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated not to overflow when read
  return n;
}

// ---- mapping --------------------------------------------------------------------------------
struct SafetensorsFile::Mapping {
  const std::byte* ptr = nullptr;
  uint64_t size = 0;
  void* mm = nullptr;
  std::vector<std::byte> owned;
  ~Mapping() {
    if (mm) munmap(mm, size);
  }
};

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(path + ": cannot open: " + errno_str());
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    std::string e = errno_str();
    ::close(fd);
    throw std::runtime_error(path + ": cannot stat: " + e);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  auto m = std::make_shared<Mapping>();
  m->size = static_cast<uint64_t>(st.st_size);
  if (m->size > 0) {
    void* p = mmap(nullptr, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      std::string e = errno_str();
      ::close(fd);
      throw std::runtime_error(path + ": mmap failed: " + e);
    }
    m->mm = p;
    m->ptr = static_cast<const std::byte*>(p);
  }
  ::close(fd);
  SafetensorsFile f;
  f.map_ = std::move(m);
  f.path_ = path;
  f.parse();
  return f;
}

SafetensorsFile SafetensorsFile::from_bytes(std::vector<std::byte> bytes, const std::string& source) {
  auto m = std::make_shared<Mapping>();
  m->owned = std::move(bytes);
  m->ptr = m->owned.data();
  m->size = m->owned.size();
  SafetensorsFile f;
  f.map_ = std::move(m);
  f.path_ = source;
  f.parse();
  return f;
}

uint64_t SafetensorsFile::file_size() const { return map_ ? map_->size : 0; }

namespace {
// Reads a non-negative JSON integer into out; false when it is not one (floats, negatives, strings...).
bool get_u64(const json& j, uint64_t& out) {
  if (j.is_number_unsigned()) { out = j.get<uint64_t>(); return true; }
  if (j.is_number_integer()) {
    int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    out = static_cast<uint64_t>(v);
    return true;
  }
  return false;
}
}  // namespace

void SafetensorsFile::parse() {
  const std::string& src = path_;
  const uint64_t size = map_->size;
  if (size < 8) fail(src, "truncated: file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  std::memcpy(&n, map_->ptr, 8);
  if (n == 0) fail(src, "header length is 0 (expected a JSON object)");
  if (n > size - 8)
    fail(src, "header length " + std::to_string(n) + " extends past the end of the file (file size " + std::to_string(size) +
                  " bytes); the file is truncated or not a safetensors file");
  if (n > kMaxHeader) fail(src, "header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeader));
  const char* hb = reinterpret_cast<const char*>(map_->ptr + 8);
  if (hb[0] != '{') fail(src, "header does not start with '{' (not a safetensors file?)");

  // Parse, detecting duplicate top-level keys (nlohmann silently keeps the last one).
  std::set<std::string> seen;
  std::string dup;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::key && depth == 1) {
      std::string k = parsed.get<std::string>();
      if (!seen.insert(k).second && dup.empty()) dup = k;
    }
    return true;
  };
  json h;
  try {
    h = json::parse(hb, hb + n, cb, /*allow_exceptions=*/true);
  } catch (const json::exception& e) {
    fail(src, std::string("header is not valid JSON: ") + e.what());
  }
  if (!dup.empty()) fail(src, "header lists '" + dup + "' twice");
  if (!h.is_object()) fail(src, "header is not a JSON object");

  data_begin_ = 8 + n;
  const uint64_t data_size = size - data_begin_;
  tensors_.clear();
  index_.clear();
  metadata_.clear();
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(src, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail(src, "__metadata__ value of '" + m.key() + "' is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string t = "tensor '" + name + "': ";
    if (!v.is_object()) fail(src, t + "entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) fail(src, t + "missing or non-string 'dtype'");
    if (!v.contains("shape") || !v["shape"].is_array()) fail(src, t + "missing or non-array 'shape'");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array()) fail(src, t + "missing or non-array 'data_offsets'");
    TensorInfo ti;
    ti.name = name;
    std::string ds = v["dtype"].get<std::string>();
    if (!parse_dtype(ds, ti.dtype)) fail(src, t + "unsupported dtype '" + ds + "'");
    uint64_t numel = 1;
    for (const json& d : v["shape"]) {
      uint64_t x = 0;
      if (!get_u64(d, x)) fail(src, t + "shape " + v["shape"].dump() + " has an entry that is not a non-negative integer");
      if (__builtin_mul_overflow(numel, x, &numel) || numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(src, t + "shape " + v["shape"].dump() + " overflows the element count");
      ti.shape.push_back(static_cast<int64_t>(x));
    }
    const json& off = v["data_offsets"];
    if (off.size() != 2 || !get_u64(off[0], ti.begin) || !get_u64(off[1], ti.end))
      fail(src, t + "data_offsets " + off.dump() + " is not a pair of non-negative integers");
    if (ti.begin > ti.end) fail(src, t + "data_offsets " + off.dump() + " are not ordered (begin > end)");
    if (ti.end > data_size)
      fail(src, t + "data_offsets " + off.dump() + " extend past the data section (" + std::to_string(data_size) +
                    " bytes); the file is truncated or corrupt");
    uint64_t want = 0;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(ti.dtype)), &want))
      fail(src, t + "byte size overflows");
    if (ti.end - ti.begin != want)
      fail(src, t + "data_offsets " + off.dump() + " span " + std::to_string(ti.end - ti.begin) + " bytes but shape " +
                    v["shape"].dump() + " of " + ds + " needs " + std::to_string(want));
    tensors_.push_back(std::move(ti));
  }
  std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (std::size_t i = 1; i < tensors_.size(); ++i) {
    const auto& p = tensors_[i - 1];
    const auto& c = tensors_[i];
    if (c.begin < p.end)
      fail(src, "tensors '" + p.name + "' [" + std::to_string(p.begin) + "," + std::to_string(p.end) + ") and '" + c.name +
                    "' [" + std::to_string(c.begin) + "," + std::to_string(c.end) + ") overlap");
  }
  for (std::size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}
const TensorInfo& SafetensorsFile::at(const std::string& name) const {
  if (auto* t = find(name)) return *t;
  fail(path_, "no tensor named '" + name + "'");
}
std::span<const std::byte> SafetensorsFile::data(const TensorInfo& t) const {
  // t was validated against this file; re-check cheaply in case it came from another file.
  if (t.end < t.begin || t.end > map_->size - data_begin_) fail(path_, "tensor '" + t.name + "' is not inside this file");
  return {map_->ptr + data_begin_ + t.begin, static_cast<std::size_t>(t.end - t.begin)};
}

// ---- writer ---------------------------------------------------------------------------------
namespace {
std::string make_header(const std::vector<TensorToWrite>& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = m;
  }
  std::set<std::string> names;
  uint64_t off = 0;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__") throw std::invalid_argument("safetensors: a tensor may not be named __metadata__");
    if (!names.insert(t.name).second) throw std::invalid_argument("safetensors: tensor '" + t.name + "' given twice");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) throw std::invalid_argument("safetensors: tensor '" + t.name + "' has a negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * dtype_size(t.dtype) != t.nbytes)
      throw std::invalid_argument("safetensors: tensor '" + t.name + "' has " + std::to_string(t.nbytes) +
                                  " bytes, shape needs " + std::to_string(numel * dtype_size(t.dtype)));
    if (t.nbytes > 0 && t.data == nullptr) throw std::invalid_argument("safetensors: tensor '" + t.name + "' has no data");
    nlohmann::ordered_json e;
    e["dtype"] = dtype_name(t.dtype);
    e["shape"] = t.shape;
    e["data_offsets"] = {off, off + t.nbytes};
    h[t.name] = e;
    off += t.nbytes;
  }
  std::string s = h.dump();
  while (s.size() % 8 != 0) s.push_back(' ');
  return s;
}

}  // namespace

std::vector<std::byte> serialize_safetensors(const std::vector<TensorToWrite>& tensors,
                                             const std::map<std::string, std::string>& metadata) {
  std::string h = make_header(tensors, metadata);
  std::vector<std::byte> out(8 + h.size());
  uint64_t n = h.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, h.data(), h.size());
  for (auto& t : tensors) {
    auto* p = static_cast<const std::byte*>(t.data);
    out.insert(out.end(), p, p + t.nbytes);
  }
  return out;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::string h = make_header(tensors, metadata);
  uint64_t n = h.size();
  std::vector<std::pair<const void*, std::size_t>> pieces;
  pieces.emplace_back(&n, 8);
  pieces.emplace_back(h.data(), h.size());
  for (auto& t : tensors)
    if (t.nbytes) pieces.emplace_back(t.data, t.nbytes);
  mmoc::write_file_atomic(path, pieces);
}

std::string safetensors_prefix(const std::vector<TensorEntry>& tensors, const std::map<std::string, std::string>& metadata,
                               std::size_t data_align) {
  if (data_align == 0 || data_align % 8 != 0) throw std::invalid_argument("safetensors_prefix: data_align must be a multiple of 8");
  std::vector<TensorToWrite> tw;
  static const std::byte dummy{};
  for (const auto& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= d < 0 ? 0 : static_cast<uint64_t>(d);
    tw.push_back({t.name, t.dtype, t.shape, &dummy, static_cast<std::size_t>(numel * dtype_size(t.dtype))});
  }
  std::string h = make_header(tw, metadata);  // padded to 8
  const std::size_t total = (8 + h.size() + data_align - 1) / data_align * data_align;
  h.append(total - 8 - h.size(), ' ');
  std::string out(8, '\0');
  const uint64_t n = h.size();
  std::memcpy(out.data(), &n, 8);
  return out + h;
}

uint64_t safetensors_data_bytes(const std::vector<TensorEntry>& tensors) {
  uint64_t total = 0;
  for (const auto& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    total += numel * dtype_size(t.dtype);
  }
  return total;
}

// ---- checkpoints ----------------------------------------------------------------------------
Checkpoint Checkpoint::open(const std::string& dir) {
  Checkpoint c;
  c.dir_ = dir;
  if (!is_directory(dir)) throw std::runtime_error(dir + ": not a directory");
  const std::string index = join_path(dir, "model.safetensors.index.json");
  const std::string single = join_path(dir, "model.safetensors");
  if (path_exists(index)) {
    c.sharded_ = true;
    std::string src = index;
    json j;
    try {
      std::ifstream in(index);
      if (!in) throw std::runtime_error(src + ": cannot open");
      j = json::parse(in);
    } catch (const json::exception& e) {
      fail(src, std::string("not valid JSON: ") + e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail(src, "missing or non-object 'weight_map'");
    std::map<std::string, std::size_t> shard_idx;
    std::map<std::string, std::string> wanted;  // tensor -> shard
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) fail(src, "weight_map entry of '" + it.key() + "' is not a string");
      std::string shard = it.value().get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
        fail(src, "weight_map entry of '" + it.key() + "' names '" + shard + "', not a file in the checkpoint folder");
      wanted[it.key()] = shard;
      if (!shard_idx.count(shard)) {
        std::string sp = join_path(dir, shard);
        if (!path_exists(sp)) fail(src, "shard '" + shard + "' (holding '" + it.key() + "') does not exist");
        shard_idx[shard] = c.files_.size();
        c.files_.push_back(SafetensorsFile::open(sp));
      }
    }
    for (auto& [name, shard] : wanted) {
      const auto& f = c.files_[shard_idx[shard]];
      if (!f.find(name)) fail(src, "weight_map puts '" + name + "' in '" + shard + "', which does not contain it");
      c.where_[name] = shard_idx[shard];
    }
    for (auto& f : c.files_)
      for (auto& t : f.tensors()) {
        auto it = wanted.find(t.name);
        if (it == wanted.end()) fail(f.path(), "tensor '" + t.name + "' is not listed in the index's weight_map");
      }
  } else if (path_exists(single)) {
    c.files_.push_back(SafetensorsFile::open(single));
    for (auto& t : c.files_[0].tensors()) c.where_[t.name] = 0;
  } else {
    std::string hint;
    if (path_exists(join_path(dir, "pytorch_model.bin")) || path_exists(join_path(dir, "pytorch_model.bin.index.json")))
      hint = " (found pytorch_model.bin: only safetensors checkpoints are supported; convert with save_pretrained(safe_serialization=True))";
    throw FormatError(dir + ": no model.safetensors or model.safetensors.index.json" + hint);
  }
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> v;
  for (auto& [n, i] : where_) v.push_back(n);
  return v;
}
const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail(dir_, "checkpoint has no tensor '" + name + "'");
  return files_[it->second];
}
const TensorInfo& Checkpoint::info(const std::string& name) const { return file_of(name).at(name); }
std::span<const std::byte> Checkpoint::data(const std::string& name) const {
  const auto& f = file_of(name);
  return f.data(f.at(name));
}

}  // namespace mmoc::io
