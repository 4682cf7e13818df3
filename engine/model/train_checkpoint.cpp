#include "engine/model/train_checkpoint.hpp"

#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <atomic>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "engine/io/bulk_io.hpp"
#include "engine/io/fsutil.hpp"
#include "engine/io/hf_config.hpp"
#include "engine/io/safetensors.hpp"
#include "engine/io/test_fault.hpp"
#include "engine/model/checkpoint.hpp"

namespace mmoc::engine {

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

int env_int(const char* name, int dflt) {
  const char* e = std::getenv(name);
  return e && *e ? std::max(1, std::atoi(e)) : dflt;
}

void cuda_ok(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) throw std::runtime_error(what + ": " + cudaGetErrorString(e));
}

// One I/O thread's memory: page-aligned (O_DIRECT), pinned when a GPU is involved (asynchronous copies), with a
// stream of its own on that GPU.
class Staging {
 public:
  Staging(std::size_t n, int cuda_device) : n_(n), dev_(cuda_device) {
    if (dev_ >= 0) {
      cuda_ok(cudaSetDevice(dev_), "cudaSetDevice");
      void* p = nullptr;
      cuda_ok(cudaHostAlloc(&p, n, cudaHostAllocDefault), "pinned staging buffer of " + std::to_string(n) + " bytes");
      p_ = static_cast<std::byte*>(p);
      cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    } else {
      buf_ = io::AlignedBuffer(n);
      p_ = buf_.data();
    }
  }
  ~Staging() {
    if (dev_ >= 0) {
      if (stream_) cudaStreamDestroy(stream_);
      cudaFreeHost(p_);
    }
  }
  std::byte* data() const { return p_; }
  std::size_t size() const { return n_; }
  // a device <-> host copy on this thread's stream, finished when it returns
  void copy(void* dst, const void* src, std::size_t n, cudaMemcpyKind kind) {
    cuda_ok(cudaSetDevice(dev_), "cudaSetDevice");
    cuda_ok(cudaMemcpyAsync(dst, src, n, kind, stream_), "cudaMemcpyAsync");
    cuda_ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

 private:
  std::size_t n_;
  int dev_;
  io::AlignedBuffer buf_;
  std::byte* p_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

// fp32 -> the file's dtype, with a finiteness check (a non-finite value is never written). False when one is not
// finite. bf16: round to nearest even, as at::Tensor::to(kBFloat16) does.
bool convert_out(const float* src, std::byte* dst, int64_t n, c10::ScalarType out) {
  uint32_t bad = 0;
  if (out == at::kFloat) {
    if ((const void*)src != (const void*)dst) std::memcpy(dst, src, (std::size_t)n * 4);
    const uint32_t* u = reinterpret_cast<const uint32_t*>(dst);
    for (int64_t i = 0; i < n; ++i) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
  } else {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, src + i, 4);
      bad |= (u & 0x7f800000u) == 0x7f800000u;
      d[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  return bad == 0;
}

// The file's dtype -> fp32.
void convert_in(const std::byte* src, io::DType dt, float* dst, int64_t n) {
  switch (dt) {
    case io::DType::F32: std::memcpy(dst, src, (std::size_t)n * 4); return;
    case io::DType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        const uint32_t u = (uint32_t)h << 16;
        std::memcpy(dst + i, &u, 4);
      }
      return;
    case io::DType::F16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = c10::detail::fp16_ieee_to_fp32_value(h);
      }
      return;
    case io::DType::F64:
      for (int64_t i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, src + 8 * i, 8);
        dst[i] = (float)v;
      }
      return;
    default: throw std::invalid_argument(std::string("not a float dtype: ") + io::dtype_name(dt));
  }
}

void check_flat(const at::Tensor& t, int64_t n, const std::string& what) {
  if (!t.defined() || t.dim() != 1 || t.numel() != n || !t.is_contiguous() || t.scalar_type() != at::kFloat)
    throw std::invalid_argument(what + ": expected a contiguous 1-D fp32 tensor of " + std::to_string(n) + " elements");
}

// GPT-2's Conv1D weights: HF's files hold the transpose of the flat orientation. After a raw read into a flat, turn
// each transposed parameter's bytes (read as hf_shape) into the flat's [out, in].
void untranspose_read(at::Tensor& flat, const StageLayout& L) {
  for (const auto& p : L.params) {
    if (!p.transposed) continue;
    auto v = flat.narrow(0, p.offset, p.numel);
    v.copy_(v.view(p.hf_shape()).t().contiguous().view({-1}));
  }
}

void rename_or_throw(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    throw std::runtime_error("cannot rename " + from + " to " + to + ": " + std::strerror(errno));
}

// The previous checkpoint, moved aside to "<dir>.old" by finalize_checkpoint and removed by a background thread
// (unlinking tens of GB takes seconds, with discards on some disks); at most one removal runs at a time.
struct OldRemoval {
  std::mutex mu;
  std::thread th;
  ~OldRemoval() { wait(); }
  void wait() {
    std::lock_guard<std::mutex> g(mu);
    if (th.joinable()) th.join();
  }
  void start(const std::string& path) {
    std::lock_guard<std::mutex> g(mu);
    if (th.joinable()) th.join();
    th = std::thread([path] {
      if (!io::remove_tree(path))
        std::fprintf(stderr, "mmoc-run: warning: cannot remove the previous checkpoint %s (remove it by hand)\n", path.c_str());
    });
  }
};
OldRemoval& old_removal() {
  static OldRemoval r;
  return r;
}

// `fresh` replaces `target`: one atomic exchange where the file system has it, else two renames (the old one moved
// aside first). Returns where the previous checkpoint now is ("" when there was none), for the caller to remove.
std::string swap_in(const std::string& fresh, const std::string& target) {
  if (!io::path_exists(target)) {
    rename_or_throw(fresh, target);
    return "";
  }
  const std::string old = old_checkpoint_dir(target);
  old_removal().wait();
  io::remove_tree(old);  // what a crash after an earlier swap left
  if (::renameat2(AT_FDCWD, fresh.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
    rename_or_throw(fresh, old);  // a crash before this leaves it at `fresh`, the staging folder the next save clears
    return old;
  }
  rename_or_throw(target, old);
  rename_or_throw(fresh, target);
  return old;
}

// ---- reading ---------------------------------------------------------------------------------------------------
struct ReadItem {
  io::BulkFile* file = nullptr;
  uint64_t off = 0, bytes = 0;  // in the file
  io::DType dtype = io::DType::F32;
  at::Tensor dst;               // fp32 flat, host or device
  int64_t dst_off = 0;          // element
};

IoStats read_items(const std::vector<ReadItem>& items, const IoOptions& o) {
  const auto t0 = Clock::now();
  const int64_t C = o.resolved_chunk();
  struct Task { std::size_t item; uint64_t lo, hi; };
  std::vector<Task> tasks;
  IoStats st;
  for (std::size_t i = 0; i < items.size(); ++i) {
    st.bytes += (int64_t)items[i].bytes;
    for (uint64_t lo = 0; lo < items[i].bytes; lo += (uint64_t)C) tasks.push_back({i, lo, std::min<uint64_t>(lo + C, items[i].bytes)});
  }
  const int threads = o.resolved_threads(false);
  std::vector<std::unique_ptr<Staging>> staging(threads);
  std::mutex mu;
  io::run_parallel(tasks.size(), threads, [&](std::size_t t, int w) {
    const Task& k = tasks[t];
    const ReadItem& it = items[k.item];
    const bool dev = it.dst.is_cuda();
    if (!staging[w]) staging[w] = std::make_unique<Staging>(2 * (std::size_t)C + 2 * io::kIoAlign, dev ? it.dst.get_device() : -1);
    Staging& s = *staging[w];
    const std::byte* p = it.file->read_at(it.off + k.lo, k.hi - k.lo, s.data(), (std::size_t)C + 2 * io::kIoAlign);
    const std::size_t esz = io::dtype_size(it.dtype);
    const int64_t e0 = it.dst_off + (int64_t)(k.lo / esz), n = (int64_t)((k.hi - k.lo) / esz);
    if (!dev) {
      convert_in(p, it.dtype, it.dst.data_ptr<float>() + e0, n);
      return;
    }
    float* conv = reinterpret_cast<float*>(s.data() + (std::size_t)C + 2 * io::kIoAlign);
    const int64_t step = C / 4;  // fp32 elements that fit the conversion area
    for (int64_t a = 0; a < n; a += step) {
      const int64_t m = std::min(step, n - a);
      convert_in(p + a * esz, it.dtype, conv, m);
      s.copy(it.dst.data_ptr<float>() + e0 + a, conv, (std::size_t)m * 4, cudaMemcpyHostToDevice);
    }
  });
  st.seconds = since(t0);
  return st;
}
}  // namespace

std::string hf_weights_file(const ir::Plan& plan, int stage) {
  const int n = plan.num_stages();
  if (n == 1) return "model.safetensors";
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", stage + 1, n);
  return buf;
}
std::string state_file(int stage) { return "mmoc_state/S" + std::to_string(stage) + ".safetensors"; }
std::string staging_dir(const std::string& dir) { return io::strip_trailing_slashes(dir) + ".staging"; }
std::string old_checkpoint_dir(const std::string& dir) { return io::strip_trailing_slashes(dir) + ".old"; }

void wait_checkpoint_cleanup() { old_removal().wait(); }

void clear_save_leftovers(const std::string& dir) {
  wait_checkpoint_cleanup();
  io::remove_tree(staging_dir(dir));
  io::remove_tree(old_checkpoint_dir(dir));
}

int IoOptions::resolved_threads(bool write) const { return threads > 0 ? threads : env_int("MMOC_IO_THREADS", write ? 4 : 8); }
int64_t IoOptions::resolved_chunk() const {
  const int64_t c = chunk_bytes > 0 ? chunk_bytes : (int64_t)env_int("MMOC_IO_CHUNK_MIB", 32) << 20;
  return (int64_t)io::align_up((uint64_t)c);
}
int64_t save_staging_bytes(const IoOptions& o) { return (int64_t)o.resolved_threads(true) * 2 * o.resolved_chunk(); }

// ---- writing ---------------------------------------------------------------------------------------------------
namespace {
struct OutFile {
  std::string path, what;
  c10::ScalarType dtype = at::kFloat;  // of every tensor in the file
  std::string prefix;                  // header, a multiple of kIoAlign long
  struct Piece {
    at::Tensor src;                    // fp32 flat (host or device)
    int64_t off = 0, n = 0;            // elements
    uint64_t begin = 0;                // byte offset in the data section
    std::string name;
  };
  std::vector<Piece> pieces;
  uint64_t data_bytes = 0;
  std::unique_ptr<io::BulkFile> file;
};

OutFile make_file(const std::string& path, const std::string& what, c10::ScalarType dt, std::vector<OutFile::Piece> pieces,
                  const std::vector<std::vector<int64_t>>& shapes, const std::map<std::string, std::string>& meta) {
  OutFile f;
  f.path = path;
  f.what = what;
  f.dtype = dt;
  std::vector<io::TensorEntry> entries;
  const uint64_t esz = c10::elementSize(dt);
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    entries.push_back({pieces[i].name, to_io_dtype(dt), shapes[i]});
    pieces[i].begin = f.data_bytes;
    f.data_bytes += (uint64_t)pieces[i].n * esz;
  }
  f.prefix = io::safetensors_prefix(entries, meta, io::kIoAlign);
  f.pieces = std::move(pieces);
  return f;
}
}  // namespace

struct CheckpointWriter::Impl {
  ir::Plan plan;
  IoOptions o;
  struct Job {
    int id = 0;
    std::vector<OutFile> files;
    std::promise<void> done;
    std::shared_future<void> fut;
    std::atomic<int> files_left{0};
    std::atomic<bool> finished{false};
  };
  std::vector<std::unique_ptr<Job>> jobs;
  std::map<int, Job*> by_id;
  std::vector<std::unique_ptr<Staging>> staging;
  std::thread th;
  Clock::time_point t0;
  IoStats stats;
  std::atomic<int64_t> bytes{0};
  std::exception_ptr error;
  bool crash = false;
  int slow_ms = 0;
  std::atomic<bool> crashed_once{false};

  void run();
  void write_chunk(OutFile& f, int64_t chunk, int worker);
};

// All stages' chunks go through one pool, stage by stage in the order given, so the disk stays busy across stage
// boundaries; whoever writes a file's last chunk finishes it (size, fsync), and whoever finishes a stage's last
// file releases that stage (its next optimizer update may go on).
void CheckpointWriter::Impl::run() {
  struct Task {
    Job* job;
    OutFile* file;
    int64_t chunk;  // -1: the header
    std::atomic<int>* left;
  };
  std::vector<Task> tasks;
  std::vector<std::unique_ptr<std::atomic<int>>> left;  // chunks (and the header) per file still to write
  try {
    const int64_t C = o.resolved_chunk();
    // every file's blocks reserved at once (MMOC_IO_FALLOCATE=0: allocated by the writes as they come): one
    // allocation per file, and a full disk fails here, before any data is written
    const char* fa = std::getenv("MMOC_IO_FALLOCATE");
    const bool prealloc = !(fa && std::string(fa) == "0");
    for (auto& j : jobs) {
      j->files_left = (int)j->files.size();
      for (auto& f : j->files) {
        f.file = io::BulkFile::create(f.path);
        if (prealloc) f.file->preallocate(f.prefix.size() + io::align_up(f.data_bytes));
        const int64_t chunks = (int64_t)((f.data_bytes + C - 1) / C);
        left.push_back(std::make_unique<std::atomic<int>>((int)chunks + 1));
        for (int64_t k = -1; k < chunks; ++k) tasks.push_back({j.get(), &f, k, left.back().get()});
      }
    }
    const int threads = o.resolved_threads(true);
    staging.resize(std::max<std::size_t>(staging.size(), (std::size_t)threads));
    io::run_parallel(tasks.size(), threads, [&](std::size_t t, int w) {
      Task& k = tasks[t];
      write_chunk(*k.file, k.chunk, w);
      if (k.left->fetch_sub(1) != 1) return;
      k.file->file->finish(k.file->prefix.size() + k.file->data_bytes);
      k.file->file.reset();
      bytes += (int64_t)(k.file->prefix.size() + k.file->data_bytes);
      if (k.job->files_left.fetch_sub(1) == 1) {
        k.job->finished = true;
        k.job->done.set_value();
      }
    });
  } catch (...) {
    error = std::current_exception();
    for (auto& j : jobs)  // an update waiting on an unfinished stage fails too
      if (!j->finished.exchange(true)) j->done.set_exception(error);
  }
  stats.bytes = bytes.load();
  stats.seconds = since(t0);
}

void CheckpointWriter::Impl::write_chunk(OutFile& f, int64_t chunk, int w) {
  const int64_t C = o.resolved_chunk();
  if (!staging[w]) staging[w] = std::make_unique<Staging>(std::max<std::size_t>(2 * (std::size_t)C, f.prefix.size()), o.cuda_device);
  Staging& s = *staging[w];
  std::byte* out = s.data();
  if (chunk < 0) {
    if (f.prefix.size() > s.size()) staging[w] = std::make_unique<Staging>(f.prefix.size(), o.cuda_device);
    std::memcpy(staging[w]->data(), f.prefix.data(), f.prefix.size());
    f.file->write_at(staging[w]->data(), f.prefix.size(), 0);
    return;
  }
  const uint64_t lo = (uint64_t)chunk * C, hi = std::min<uint64_t>(lo + C, f.data_bytes);
  const uint64_t esz = c10::elementSize(f.dtype);
  // the pieces overlapping [lo, hi), converted into `out`
  auto it = std::upper_bound(f.pieces.begin(), f.pieces.end(), lo, [](uint64_t v, const OutFile::Piece& p) { return v < p.begin; });
  for (--it; it != f.pieces.end() && it->begin < hi; ++it) {
    const uint64_t pb = std::max(lo, it->begin), pe = std::min(hi, it->begin + (uint64_t)it->n * esz);
    if (pb >= pe) continue;
    const int64_t e0 = it->off + (int64_t)((pb - it->begin) / esz), n = (int64_t)((pe - pb) / esz);
    std::byte* dst = out + (pb - lo);
    bool ok = true;
    if (!it->src.is_cuda()) {
      ok = convert_out(it->src.data_ptr<float>() + e0, dst, n, f.dtype);
    } else {
      float* scratch = reinterpret_cast<float*>(s.data() + C);  // C bytes: C/4 fp32 values at a time
      for (int64_t a = 0; a < n && ok; a += C / 4) {
        const int64_t m = std::min<int64_t>(C / 4, n - a);
        s.copy(scratch, it->src.data_ptr<float>() + e0 + a, (std::size_t)m * 4, cudaMemcpyDeviceToHost);
        ok = convert_out(scratch, dst + a * esz, m, f.dtype);
      }
    }
    if (!ok)
      throw std::runtime_error(f.path + ": refusing to write non-finite values of " + it->name + " (" + f.what +
                               "); the previous checkpoint is kept");
  }
  const uint64_t len = hi - lo;
  std::memset(out + len, 0, io::align_up(len) - len);  // O_DIRECT writes whole blocks; finish() cuts the tail
  f.file->write_at(out, len, f.prefix.size() + lo);
  if (slow_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(slow_ms));
  if (crash && !crashed_once.exchange(true)) {
    std::fprintf(stderr, "mmoc-run: MMOC_TEST_FAULT: rank %d ends in the middle of a save\n", o.rank);
    std::fflush(stderr);
    std::_Exit(9);
  }
}

CheckpointWriter::CheckpointWriter(const ir::Plan& plan, IoOptions o) : impl_(new Impl) {
  impl_->plan = plan;
  impl_->o = o;
  impl_->crash = io::test_fault("crash-in-save", o.rank) != nullptr;  // engine/io/test_fault.hpp
  const io::TestFault* slow = io::test_fault("slow-save", o.rank);
  impl_->slow_ms = slow ? (int)slow->first : 0;
}

CheckpointWriter::~CheckpointWriter() {
  if (impl_->th.joinable()) impl_->th.join();
}

void CheckpointWriter::start(const std::string& dir, std::vector<StageTensors> stages, c10::ScalarType wdt, bool background) {
  if (active_) throw std::logic_error("CheckpointWriter::start: a save is still running");
  if (wdt != at::kFloat && wdt != at::kBFloat16) throw std::invalid_argument("checkpoint weights must be fp32 or bf16");
  Impl& I = *impl_;
  I.jobs.clear();
  I.by_id.clear();
  I.stats = {};
  I.bytes = 0;
  I.error = nullptr;
  for (auto& st : stages) {
    auto j = std::make_unique<Impl::Job>();
    j->id = st.id;
    const int64_t n = st.layout.numel;
    check_flat(st.master, n, "stage S" + std::to_string(st.id) + " master");
    check_flat(st.exp_avg, n, "stage S" + std::to_string(st.id) + " exp_avg");
    check_flat(st.exp_avg_sq, n, "stage S" + std::to_string(st.id) + " exp_avg_sq");
    const std::string sid = "stage S" + std::to_string(st.id);
    {  // the stage's HF shard: its parameters, back to back, in the weights' dtype
      std::vector<OutFile::Piece> pieces;
      std::vector<std::vector<int64_t>> shapes;
      for (const auto& p : st.layout.params) {
        if (p.transposed)  // GPT-2 Conv1D: HF's [in, out], a snapshot taken now
          pieces.push_back({st.master.narrow(0, p.offset, p.numel).view(p.shape).t().contiguous().view({-1}), 0, p.numel, 0, p.name});
        else
          pieces.push_back({st.master, p.offset, p.numel, 0, p.name});
        shapes.push_back(p.hf_shape());
      }
      j->files.push_back(make_file(io::join_path(dir, hf_weights_file(I.plan, st.id)), sid + " weights", wdt, std::move(pieces),
                                   shapes, {{"format", "pt"}}));
    }
    {  // its optimizer state (and the fp32 master when the weights are not fp32)
      std::vector<OutFile::Piece> pieces;
      if (wdt != at::kFloat) pieces.push_back({st.master, 0, n, 0, "master"});
      pieces.push_back({st.exp_avg, 0, n, 0, "exp_avg"});
      pieces.push_back({st.exp_avg_sq, 0, n, 0, "exp_avg_sq"});
      std::vector<std::vector<int64_t>> shapes(pieces.size(), std::vector<int64_t>{n});
      j->files.push_back(make_file(io::join_path(dir, state_file(st.id)), sid + " optimizer state", at::kFloat, std::move(pieces), shapes,
                                   {{"format", "mmoc-optim"},
                                    {"step", std::to_string(st.step)},
                                    {"layers", std::to_string(st.layout.layer_begin) + "-" + std::to_string(st.layout.layer_end)}}));
    }
    j->fut = j->done.get_future().share();
    I.by_id[st.id] = j.get();
    I.jobs.push_back(std::move(j));
  }
  I.t0 = Clock::now();
  active_ = true;
  if (background) I.th = std::thread([&I] { I.run(); });
  else I.run();
}

void CheckpointWriter::wait_stage(int stage) {
  if (!active_) return;
  auto it = impl_->by_id.find(stage);
  if (it != impl_->by_id.end()) it->second->fut.get();
}

IoStats CheckpointWriter::wait() {
  if (!active_) return {};
  if (impl_->th.joinable()) impl_->th.join();
  active_ = false;
  if (impl_->error) std::rethrow_exception(impl_->error);
  return impl_->stats;
}

void write_checkpoint_meta(const ir::Plan& plan, const std::string& staging, c10::ScalarType wdt, const std::string& trainer_state_json) {
  io::HfConfig cfg;
  cfg.arch = plan.model;
  cfg.dtype = wdt == at::kBFloat16 ? "bfloat16" : "float32";
  io::write_hf_config(staging, cfg, true);
  if (plan.num_stages() > 1) {
    nlohmann::ordered_json wm = nlohmann::ordered_json::object();
    int64_t total_bytes = 0, total_params = 0;
    for (const auto& s : plan.stages) {
      const StageLayout L = stage_layout(plan.model, s.layer_begin, s.layer_end);
      for (const auto& p : L.params) {
        wm[p.name] = hf_weights_file(plan, s.id);
        total_params += p.numel;
        total_bytes += p.numel * (int64_t)c10::elementSize(wdt);
      }
    }
    nlohmann::ordered_json idx;
    idx["metadata"] = {{"total_parameters", total_params}, {"total_size", total_bytes}};
    idx["weight_map"] = wm;
    io::write_file_atomic(io::join_path(staging, "model.safetensors.index.json"), idx.dump(2) + "\n");
  }
  io::write_file_atomic(io::join_path(staging, "mmoc_state/trainer_state.json"), trainer_state_json);
  io::write_file_atomic(io::join_path(staging, "mmoc_state/plan.json"), ir::to_json_string(plan));
}

void finalize_checkpoint(const ir::Plan& plan, const std::string& staging, const std::string& dir, c10::ScalarType wdt,
                         const std::string& trainer_state_json) {
  write_checkpoint_meta(plan, staging, wdt, trainer_state_json);
  commit_checkpoint(staging, dir);
}

void commit_checkpoint(const std::string& staging, const std::string& dir) {
  io::fsync_dir(io::join_path(staging, "mmoc_state"));
  io::fsync_dir(staging);
  const std::string target = io::strip_trailing_slashes(dir);
  const std::string old = swap_in(staging, target);
  const std::string parent = io::parent_dir(target);
  io::fsync_dir(parent.empty() ? std::string(".") : parent);
  if (old.empty()) return;
  if (io::test_fault("crash-after-swap", 0)) {  // engine/io/test_fault.hpp
    std::fprintf(stderr, "mmoc-run: MMOC_TEST_FAULT: rank 0 ends after the swap, before the previous checkpoint is removed\n");
    std::fflush(stderr);
    std::_Exit(9);
  }
  old_removal().start(old);  // off the critical path: training (or the run's end) goes on
}

// ---- loading ---------------------------------------------------------------------------------------------------
std::vector<SavedStage> saved_stages(const std::string& dir) {
  const std::string sdir = io::join_path(dir, "mmoc_state");
  std::vector<SavedStage> v;
  for (const auto& name : io::list_dir(sdir)) {
    if (name.size() < 14 || name[0] != 'S' || name.compare(name.size() - 12, 12, ".safetensors") != 0) continue;
    SavedStage s;
    try {
      s.id = std::stoi(name.substr(1, name.size() - 13));
    } catch (...) {
      continue;
    }
    s.path = io::join_path(sdir, name);
    const auto f = io::SafetensorsFile::open(s.path);
    auto it = f.metadata().find("layers");
    if (it == f.metadata().end() || std::sscanf(it->second.c_str(), "%d-%d", &s.layer_begin, &s.layer_end) != 2)
      throw io::FormatError(s.path + ": no 'layers' metadata (begin-end)");
    v.push_back(s);
  }
  std::sort(v.begin(), v.end(), [](const SavedStage& a, const SavedStage& b) { return a.layer_begin < b.layer_begin; });
  for (size_t k = 0; k < v.size(); ++k)
    if (v[k].layer_begin != (k ? v[k - 1].layer_end : 0) || v[k].layer_end <= v[k].layer_begin)
      throw io::FormatError(sdir + ": the saved stages' layers are not contiguous from 0 (" + v[k].path + ": " +
                            std::to_string(v[k].layer_begin) + "-" + std::to_string(v[k].layer_end) + ")");
  return v;
}

IoStats load_training_state(const std::string& dir, const ir::Plan& plan, std::vector<StageTensors>& stages, IoOptions o) {
  std::map<std::string, std::unique_ptr<io::BulkFile>> files;
  auto bulk = [&](const std::string& path) {
    auto& f = files[path];
    if (!f) f = io::BulkFile::open_read(path);
    return f.get();
  };
  std::optional<io::Checkpoint> hf;  // opened when a master comes from the HF weights
  std::vector<ReadItem> items;
  std::vector<bool> master_from_hf;
  std::optional<std::vector<SavedStage>> saved;  // the checkpoint's own stages, when they differ from the plan's
  for (auto& st : stages) {
    const int64_t n = st.layout.numel;
    std::string path = io::join_path(dir, state_file(st.id));
    // the plan's stage as the checkpoint saved it (same layers), or else gathered from the saved stages by parameter
    bool restage = true;
    if (io::path_exists(path)) {
      auto f0 = io::SafetensorsFile::open(path);
      auto it = f0.metadata().find("layers");
      restage = it != f0.metadata().end() &&
                it->second != std::to_string(st.layout.layer_begin) + "-" + std::to_string(st.layout.layer_end);
    }
    if (restage) {
      if (!saved) saved = saved_stages(dir);
      bool master_hf = false;
      bool first = true;
      for (at::Tensor* dst : {&st.master, &st.exp_avg, &st.exp_avg_sq}) {
        check_flat(*dst, n, "stage S" + std::to_string(st.id));
        dst->zero_();  // padding
      }
      std::map<int, std::pair<io::SafetensorsFile, StageLayout>> src_of;  // saved stage id -> its file and layout
      for (const auto& p : st.layout.params) {
        const SavedStage* src = nullptr;
        for (const auto& s : *saved)
          if (p.layer >= s.layer_begin && p.layer < s.layer_end) src = &s;
        if (!src) throw io::FormatError(dir + ": no saved stage holds layer " + std::to_string(p.layer) + " (" + p.name + ")");
        auto sit = src_of.find(src->id);
        if (sit == src_of.end())
          sit = src_of.emplace(src->id, std::make_pair(io::SafetensorsFile::open(src->path),
                                                       stage_layout(plan.model, src->layer_begin, src->layer_end))).first;
        const io::SafetensorsFile& f = sit->second.first;
        const StageLayout& L = sit->second.second;
        const ParamInfo* q = L.find(p.name);
        if (!q || q->numel != p.numel) throw io::FormatError(src->path + ": no " + p.name + " of " + std::to_string(p.numel) + " elements");
        if (first) {  // the step count: the same in every stage
          auto it = f.metadata().find("step");
          st.step = it == f.metadata().end() ? 0 : std::stoll(it->second);
          master_hf = !f.find("master");
          first = false;
        }
        const std::pair<const char*, at::Tensor*> parts[] = {{"master", &st.master}, {"exp_avg", &st.exp_avg}, {"exp_avg_sq", &st.exp_avg_sq}};
        for (const auto& [name, dst] : parts) {
          if (master_hf && dst == &st.master) continue;
          const auto& t = f.at(name);
          if (t.dtype != io::DType::F32 || t.numel() != L.numel)
            throw io::FormatError(src->path + ": " + name + " has " + std::to_string(t.numel()) + " " + io::dtype_name(t.dtype) +
                                  " elements, its layers " + std::to_string(L.numel) + " F32");
          items.push_back({bulk(src->path), f.data_begin() + t.begin + (uint64_t)q->offset * 4, (uint64_t)p.numel * 4, t.dtype, *dst, p.offset});
        }
        if (master_hf) {  // fp32 weights: the master is the HF tensor of that name
          if (!hf) hf = io::Checkpoint::open(dir);
          const auto& ti = hf->info(p.name);
          if (ti.dtype != io::DType::F32 || ti.shape != p.hf_shape())
            throw io::FormatError(dir + ": " + p.name + " is not an fp32 master (and mmoc_state has no master): saved with bf16 weights?");
          const auto& file = hf->file_of(p.name);
          items.push_back({bulk(file.path()), file.data_begin() + ti.begin, ti.nbytes(), ti.dtype, st.master, p.offset});
        }
      }
      master_from_hf.push_back(master_hf);
      continue;
    }
    auto f = io::SafetensorsFile::open(path);
    auto tensor = [&](const char* name, at::Tensor& dst) {
      const auto& t = f.at(name);
      if (t.dtype != io::DType::F32 || t.numel() != n)
        throw io::FormatError(path + ": " + name + " has " + std::to_string(t.numel()) + " " + io::dtype_name(t.dtype) + " elements, the plan's stage S" +
                              std::to_string(st.id) + " has " + std::to_string(n) + " F32 (checkpoint from another plan?)");
      check_flat(dst, n, path + ": " + name);
      items.push_back({bulk(path), f.data_begin() + t.begin, t.nbytes(), t.dtype, dst, 0});
    };
    master_from_hf.push_back(!f.find("master"));
    if (f.find("master")) {
      tensor("master", st.master);
    } else {  // fp32 weights: the master is the stage's HF shard (padding zero)
      if (!hf) hf = io::Checkpoint::open(dir);
      check_flat(st.master, n, "stage S" + std::to_string(st.id) + " master");
      int64_t pos = 0;
      for (const auto& p : st.layout.params) {
        if (p.offset > pos) st.master.narrow(0, pos, p.offset - pos).zero_();
        pos = p.offset + p.numel;
        const auto& ti = hf->info(p.name);
        if (ti.dtype != io::DType::F32 || ti.shape != p.hf_shape())
          throw io::FormatError(dir + ": " + p.name + " is not the fp32 master of stage S" + std::to_string(st.id) +
                                " (and mmoc_state has no master): checkpoint from another plan or saved with bf16 weights?");
        const auto& file = hf->file_of(p.name);
        items.push_back({bulk(file.path()), file.data_begin() + ti.begin, ti.nbytes(), ti.dtype, st.master, p.offset});
      }
      if (n > pos) st.master.narrow(0, pos, n - pos).zero_();
    }
    tensor("exp_avg", st.exp_avg);
    tensor("exp_avg_sq", st.exp_avg_sq);
    auto it = f.metadata().find("step");
    st.step = it == f.metadata().end() ? 0 : std::stoll(it->second);
  }
  (void)plan;
  IoStats stats = read_items(items, o);
  for (std::size_t k = 0; k < stages.size(); ++k)
    if (master_from_hf[k]) untranspose_read(stages[k].master, stages[k].layout);
  return stats;
}

IoStats load_hf_parallel(const std::string& dir, const ir::ModelArch& arch, const std::vector<StageLayout>& layouts,
                         std::vector<at::Tensor>& flats, IoOptions o) {
  {
    std::vector<at::Tensor> none;
    load_hf_weights(dir, arch, {}, none);  // names, shapes and dtypes of the whole model (no data read)
  }
  if (flats.size() != layouts.size()) throw std::invalid_argument("load_hf_parallel: one flat per layout expected");
  auto ck = io::Checkpoint::open(dir);
  std::map<std::string, std::unique_ptr<io::BulkFile>> files;
  std::vector<ReadItem> items;
  for (std::size_t s = 0; s < layouts.size(); ++s) {
    const auto& L = layouts[s];
    check_flat(flats[s], L.numel, "load_hf_parallel: flat " + std::to_string(s));
    int64_t pos = 0;
    for (const auto& p : L.params) {
      if (p.offset > pos) flats[s].narrow(0, pos, p.offset - pos).zero_();
      pos = p.offset + p.numel;
      const auto& ti = ck.info(p.name);
      const auto& file = ck.file_of(p.name);
      auto& bf = files[file.path()];
      if (!bf) bf = io::BulkFile::open_read(file.path());
      items.push_back({bf.get(), file.data_begin() + ti.begin, ti.nbytes(), ti.dtype, flats[s], p.offset});
    }
    if (L.numel > pos) flats[s].narrow(0, pos, L.numel - pos).zero_();
  }
  IoStats stats = read_items(items, o);
  for (std::size_t s = 0; s < layouts.size(); ++s) untranspose_read(flats[s], layouts[s]);
  return stats;
}

}  // namespace mmoc::engine
