#include "engine/model/checkpoint.hpp"

#include "engine/io/fsutil.hpp"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <stdio.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace mmoc::engine {

io::DType to_io_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kDouble: return io::DType::F64;
    case at::kFloat: return io::DType::F32;
    case at::kHalf: return io::DType::F16;
    case at::kBFloat16: return io::DType::BF16;
    case at::kLong: return io::DType::I64;
    case at::kInt: return io::DType::I32;
    case at::kShort: return io::DType::I16;
    case at::kChar: return io::DType::I8;
    case at::kByte: return io::DType::U8;
    case at::kBool: return io::DType::BOOL;
    default: throw std::invalid_argument(std::string("no safetensors dtype for ") + c10::toString(t));
  }
}
c10::ScalarType to_scalar_type(io::DType d) {
  switch (d) {
    case io::DType::F64: return at::kDouble;
    case io::DType::F32: return at::kFloat;
    case io::DType::F16: return at::kHalf;
    case io::DType::BF16: return at::kBFloat16;
    case io::DType::I64: return at::kLong;
    case io::DType::I32: return at::kInt;
    case io::DType::I16: return at::kShort;
    case io::DType::I8: return at::kChar;
    case io::DType::U8: return at::kByte;
    case io::DType::BOOL: return at::kBool;
  }
  return at::kFloat;
}

namespace {
std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? "," : "") << s[i];
  o << "]";
  return o.str();
}
at::Tensor copy_out(const io::TensorInfo& t, std::span<const std::byte> bytes) {
  auto out = at::empty(t.shape, at::TensorOptions().dtype(to_scalar_type(t.dtype)));
  if (!bytes.empty()) std::memcpy(out.data_ptr(), bytes.data(), bytes.size());  // data may be unaligned in the file
  return out;
}
bool is_float(io::DType d) { return d == io::DType::F32 || d == io::DType::F16 || d == io::DType::BF16 || d == io::DType::F64; }
}  // namespace

at::Tensor read_tensor(const io::SafetensorsFile& f, const std::string& name) {
  const auto& t = f.at(name);
  return copy_out(t, f.data(t));
}
at::Tensor read_tensor(const io::Checkpoint& c, const std::string& name) { return copy_out(c.info(name), c.data(name)); }

at::Tensor read_tensor_slice(const io::Checkpoint& c, const std::string& name, int dim, int64_t start, int64_t length) {
  const auto& t = c.info(name);
  const int nd = static_cast<int>(t.shape.size());
  if (dim < 0 || dim >= nd || start < 0 || length < 0 || start + length > t.shape[dim])
    throw std::invalid_argument("read_tensor_slice: rows [" + std::to_string(start) + "," + std::to_string(start + length) +
                                ") of dimension " + std::to_string(dim) + " are not inside tensor '" + name + "' " +
                                shape_str(t.shape));
  int64_t outer = 1, inner = static_cast<int64_t>(io::dtype_size(t.dtype));
  for (int d = 0; d < dim; ++d) outer *= t.shape[d];
  for (int d = dim + 1; d < nd; ++d) inner *= t.shape[d];
  std::vector<int64_t> shape = t.shape;
  shape[dim] = length;
  auto out = at::empty(shape, at::TensorOptions().dtype(to_scalar_type(t.dtype)));
  const auto bytes = c.data(name);
  auto* dst = static_cast<std::byte*>(out.data_ptr());
  const int64_t run = length * inner;  // bytes of one contiguous run in the file
  for (int64_t o = 0; o < outer && run > 0; ++o)
    std::memcpy(dst + o * run, bytes.data() + (o * t.shape[dim] + start) * inner, static_cast<size_t>(run));
  return out;
}

void read_shard(const io::Checkpoint& c, const std::string& name, const ParamInfo& p, const at::Tensor& dst) {
  at::NoGradGuard ng;
  if (!p.shard.sharded()) {
    at::Tensor t = read_tensor(c, name);
    dst.copy_(p.transposed ? t.t() : t);
    return;
  }
  int64_t pos = 0;
  for (const auto& pc : p.shard.pieces) {
    at::Tensor t = read_tensor_slice(c, name, p.hf_dim(), pc.start, pc.length);
    dst.narrow(p.shard.dim, pos, pc.length).copy_(p.transposed ? t.t() : t);
    pos += pc.length;
  }
  if (pos < dst.size(p.shard.dim)) dst.narrow(p.shard.dim, pos, dst.size(p.shard.dim) - pos).zero_();  // vocab padding
}

void load_hf_weights(const std::string& dir, const ir::ModelArch& arch, const std::vector<StageLayout>& layouts,
                     std::vector<at::Tensor>& flats) {
  auto ck = io::Checkpoint::open(dir);
  auto fail = [&](const std::string& what) -> void { throw io::FormatError(dir + ": " + what); };
  // The checkpoint must be exactly this model (whatever subset of stages we fill).
  const StageLayout full = full_layout(arch);
  // Older GPT-2 files (written from GPT2Model) name the tensors without "transformer.": use that spelling if the
  // checkpoint does.
  const std::string first = full.params.front().name, legacy_first = arch::legacy_hf_name(arch, first);
  const bool legacy = !ck.contains(first) && !legacy_first.empty() && ck.contains(legacy_first);
  auto disk_name = [&](const std::string& n) { return legacy ? arch::legacy_hf_name(arch, n) : n; };
  std::set<std::string> expected;
  for (const auto& p : full.params) {
    const std::string n = disk_name(p.name);
    expected.insert(n);
    if (!ck.contains(n)) fail("missing tensor '" + n + "' (expected shape " + shape_str(p.hf_shape()) + ")");
    const auto& ti = ck.info(n);
    if (ti.shape != p.hf_shape())
      fail("tensor '" + n + "' has shape " + shape_str(ti.shape) + ", expected " + shape_str(p.hf_shape()));
    if (!is_float(ti.dtype)) fail("tensor '" + n + "' has dtype " + io::dtype_name(ti.dtype) + ", expected a float type");
  }
  std::vector<std::string> unexpected;
  for (const auto& n : ck.names()) {
    if (expected.count(n) || arch::ignorable_hf_tensor(arch, n)) continue;
    if (arch.tied_embeddings && n == "lm_head.weight") {
      const auto& ti = ck.info(n);
      if (ti.shape != std::vector<int64_t>{arch.vocab, arch.hidden})
        fail("tensor 'lm_head.weight' has shape " + shape_str(ti.shape) + ", expected " +
             shape_str({arch.vocab, arch.hidden}) + " (tied to the embedding; ignored)");
      continue;
    }
    unexpected.push_back(n);
  }
  if (!unexpected.empty()) {
    std::string list;
    for (size_t i = 0; i < unexpected.size() && i < 5; ++i) list += (i ? ", '" : "'") + unexpected[i] + "'";
    if (unexpected.size() > 5) list += ", ... (" + std::to_string(unexpected.size()) + " in all)";
    fail("unexpected tensor(s) not part of the model: " + list);
  }
  if (flats.size() < layouts.size()) flats.resize(layouts.size());
  at::NoGradGuard ng;
  for (size_t s = 0; s < layouts.size(); ++s) {
    const auto& L = layouts[s];
    auto& flat = flats[s];
    if (!flat.defined()) flat = at::zeros({L.numel}, at::kFloat);
    if (flat.dim() != 1 || flat.numel() != L.numel || !flat.is_contiguous() || !at::isFloatingType(flat.scalar_type()))
      throw std::invalid_argument("load_hf_weights: flat tensor " + std::to_string(s) + " must be a contiguous 1-D float tensor of " +
                                  std::to_string(L.numel) + " elements");
    flat.zero_();
    for (const auto& p : L.params) {
      if (p.shard.sharded()) {  // a tensor-parallel shard: only its slices of the file's tensor
        read_shard(ck, disk_name(p.name), p, flat.narrow(0, p.offset, p.numel).view(p.shape));
        continue;
      }
      at::Tensor t = read_tensor(ck, disk_name(p.name));
      if (p.transposed) t = t.t();  // GPT-2 Conv1D [in, out] -> [out, in]
      flat.narrow(0, p.offset, p.numel).view(p.shape).copy_(t);
    }
  }
}

std::vector<at::Tensor> load_hf_weights(const std::string& dir, const ir::ModelArch& arch, const std::vector<StageLayout>& layouts) {
  std::vector<at::Tensor> flats(layouts.size());
  load_hf_weights(dir, arch, layouts, flats);
  return flats;
}

namespace {
std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

void swap_in(const std::string& tmp, const std::string& target) {
  if (!io::path_exists(target)) {
    if (::rename(tmp.c_str(), target.c_str()) != 0)
      throw std::runtime_error(target + ": rename from " + tmp + " failed: " + std::strerror(errno));
    return;
  }
  if (!io::is_directory(target)) throw std::runtime_error(target + ": exists and is not a directory");
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
    io::remove_tree(tmp);  // tmp now holds the old checkpoint
    return;
  }
  // No atomic exchange on this file system: move the old one aside, then the new one in.
  std::string old = target + ".old." + std::to_string(::getpid());
  io::remove_tree(old);
  if (::rename(target.c_str(), old.c_str()) != 0)
    throw std::runtime_error(target + ": cannot move the old checkpoint aside: " + std::strerror(errno));
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    std::string e = std::strerror(errno);
    (void)::rename(old.c_str(), target.c_str());
    throw std::runtime_error(target + ": rename from " + tmp + " failed: " + e);
  }
  io::remove_tree(old);
}
}  // namespace

void save_hf_checkpoint(const std::string& dir, const ir::ModelArch& arch, const std::vector<StageLayout>& layouts,
                        const std::vector<at::Tensor>& flats, c10::ScalarType dtype, const SaveOptions& opts) {
  if (layouts.size() != flats.size()) throw std::invalid_argument("save_hf_checkpoint: one flat tensor per layout expected");
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    throw std::invalid_argument("save_hf_checkpoint: dtype must be float32, bfloat16 or float16");
  // Locate every parameter of the model exactly once.
  struct Src { const ParamInfo* p; const at::Tensor* flat; };
  std::map<std::string, Src> src;
  for (size_t s = 0; s < layouts.size(); ++s) {
    if (layouts[s].tp_size != 1)
      throw std::invalid_argument("save_hf_checkpoint: layout " + std::to_string(s) +
                                  " is a tensor-parallel shard: gather the stage first (tp_gather_flat)");
    if (!flats[s].defined() || flats[s].dim() != 1 || flats[s].numel() != layouts[s].numel)
      throw std::invalid_argument("save_hf_checkpoint: flat tensor " + std::to_string(s) + " does not match its layout");
    for (const auto& p : layouts[s].params)
      if (!src.emplace(p.name, Src{&p, &flats[s]}).second)
        throw std::invalid_argument("save_hf_checkpoint: parameter '" + p.name + "' appears in two stages");
  }
  const auto names = model_param_names(arch);
  for (const auto& n : names)
    if (!src.count(n)) throw std::invalid_argument("save_hf_checkpoint: no stage holds parameter '" + n + "'");
  if (src.size() != names.size()) throw std::invalid_argument("save_hf_checkpoint: stages hold parameters not in the model");

  // Shards: greedy in model order.
  const int64_t esz = static_cast<int64_t>(c10::elementSize(dtype));
  std::vector<std::vector<std::string>> shards(1);
  int64_t cur = 0, total_bytes = 0, total_params = 0;
  for (const auto& n : names) {
    int64_t b = src[n].p->numel * esz;
    if (cur > 0 && cur + b > opts.max_shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(n);
    cur += b;
    total_bytes += b;
    total_params += src[n].p->numel;
  }

  const std::string target = io::strip_trailing_slashes(dir);
  if (target.empty() || target == "/") throw std::invalid_argument("save_hf_checkpoint: bad directory name '" + dir + "'");
  const std::string parent = io::parent_dir(target);
  if (!parent.empty()) io::make_dirs(parent);
  const std::string tmp = target + ".tmp." + std::to_string(::getpid());
  io::remove_tree(tmp);
  io::make_dirs(tmp);
  try {
    at::NoGradGuard ng;
    nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
    std::map<std::string, std::string> wm;
    for (size_t i = 0; i < shards.size(); ++i) {
      const std::string fname = shards.size() == 1 ? std::string("model.safetensors") : shard_name(i, shards.size());
      std::vector<at::Tensor> keep;
      std::vector<io::TensorToWrite> tw;
      for (const auto& n : shards[i]) {
        const auto& s = src[n];
        at::Tensor t = s.flat->detach().narrow(0, s.p->offset, s.p->numel).view(s.p->shape);
        if (s.p->transposed) t = t.t();  // back to GPT-2's Conv1D [in, out]
        t = t.to(at::kCPU, dtype).contiguous();
        keep.push_back(t);
        tw.push_back({n, to_io_dtype(dtype), s.p->hf_shape(), t.data_ptr(), static_cast<size_t>(t.nbytes())});
        wm[n] = fname;
      }
      io::write_safetensors(io::join_path(tmp, fname), tw);
    }
    if (shards.size() > 1) {
      for (auto& [n, f] : wm) weight_map[n] = f;
      nlohmann::ordered_json idx;
      idx["metadata"] = {{"total_parameters", total_params}, {"total_size", total_bytes}};
      idx["weight_map"] = weight_map;
      io::write_file_atomic(io::join_path(tmp, "model.safetensors.index.json"), idx.dump(2) + "\n");
    }
    io::HfConfig cfg = opts.config;
    cfg.arch = arch;
    cfg.dtype = dtype == at::kBFloat16 ? "bfloat16" : dtype == at::kHalf ? "float16" : "float32";
    io::write_hf_config(tmp, cfg, opts.generation_config);
    io::fsync_dir(tmp);
    swap_in(tmp, target);
    io::fsync_dir(parent.empty() ? std::string(".") : parent);
  } catch (...) {
    io::remove_tree(tmp);
    throw;
  }
}

}  // namespace mmoc::engine
