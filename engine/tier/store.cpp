#include "engine/tier/store.hpp"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <stdexcept>
#include <thread>

#include "engine/tier/token.hpp"

namespace mmoc::tier {

double TierStore::now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

namespace detail {

struct TicketState {
  std::mutex mu;
  std::condition_variable cv;
  int parts_left = 0;
  bool done = false;
  std::string error;
  int64_t bytes = 0;
  double t_submit = 0, t_done = 0;

  void part_done(const std::string& err) {
    std::lock_guard<std::mutex> lk(mu);
    if (!err.empty() && error.empty()) error = err;
    if (--parts_left == 0) {
      done = true;
      t_done = TierStore::now_seconds();
      cv.notify_all();
    }
  }
};

struct Object {
  ObjectSpec spec;
  std::vector<Extent> extents;
  std::vector<int64_t> file_offset;  // per extent
  bool written = false;              // a write was submitted (and has not failed)
  std::string label() const {
    return spec.name.empty() ? "object " + std::to_string(spec.id)
                             : "object '" + spec.name + "' (id " + std::to_string(spec.id) + ")";
  }
};

// One object's share on one path, in one read or write.
struct Part {
  std::shared_ptr<TicketState> ticket;
  bool write = false;
  uint64_t id = 0;
  std::string label;
  char* user = nullptr;     // user memory of this share
  int64_t bytes = 0;        // share bytes
  int64_t file_off = 0;
  int64_t object_off = 0;
  int64_t issued = 0;       // bytes handed to requests
  int64_t completed = 0;    // bytes of completed requests
  int inflight = 0;
  int err = 0;
  int64_t err_off = 0;
  double t_first = -1;
};

struct Slot {
  IoRequest req;
  std::shared_ptr<Part> part;
  int64_t part_off = 0;
  int64_t len = 0;           // user bytes
  char* bounce = nullptr;    // aligned buffer of request_bytes (lazy)
  bool bounced = false;
  ~Slot() { ::free(bounce); }
};

struct PathWorker {
  TierStore* store = nullptr;
  int index = 0;
  PathInfo info;
  bool direct = false;
  int fd = -1;
  int64_t file_size = 0;
  double weight = 0;
  int64_t request_bytes = 0, batch_bytes = 0;
  std::shared_ptr<DeviceToken> token;
  std::unique_ptr<PathQueue> queue;
  std::vector<std::unique_ptr<Slot>> slots;
  std::vector<Slot*> free_slots;

  std::mutex mu;
  std::condition_variable cv, idle_cv;
  std::deque<std::shared_ptr<Part>> parts;  // submission order; removed when complete
  bool stop = false;
  int inflight = 0, inflight_read = 0, inflight_write = 0;
  double busy_t0 = 0, read_t0 = 0, write_t0 = 0;
  PathStats st;
  std::thread thread;

  ~PathWorker() {
    if (fd >= 0) ::close(fd);
  }

  // The next part with bytes left to issue, unless an earlier, unfinished part of the same object conflicts
  // with it (either is a write): then nothing, to keep per-object order.
  std::shared_ptr<Part> next_part_locked() {
    for (size_t i = 0; i < parts.size(); ++i) {
      const auto& p = parts[i];
      if (p->issued >= p->bytes) continue;
      for (size_t j = 0; j < i; ++j)
        if (parts[j]->id == p->id && (parts[j]->write || p->write)) return nullptr;
      return p;
    }
    return nullptr;
  }

  Slot* make_request_locked(const std::shared_ptr<Part>& p, double now) {
    Slot* s = free_slots.back();
    free_slots.pop_back();
    s->part = p;
    s->part_off = p->issued;
    s->len = std::min(request_bytes, p->bytes - p->issued);
    p->issued += s->len;
    ++p->inflight;
    if (p->t_first < 0) p->t_first = now;
    char* user = p->user + s->part_off;
    s->bounced = direct && ((reinterpret_cast<uintptr_t>(user) % kAlign) != 0 || s->len % kAlign != 0);
    s->req.write = p->write;
    s->req.fd = fd;
    s->req.offset = p->file_off + s->part_off;
    s->req.len = s->bounced ? align_up(s->len) : s->len;
    s->req.buf = s->bounced ? nullptr : user;  // the bounce buffer is set outside the lock
    s->req.err = 0;
    s->req.owner = s;
    // busy accounting
    if (inflight++ == 0) busy_t0 = now;
    if (p->write) {
      if (inflight_write++ == 0) write_t0 = now;
    } else if (inflight_read++ == 0) {
      read_t0 = now;
    }
    ++st.requests;
    if (s->bounced) st.bounce_bytes += s->len;
    return s;
  }

  void prepare_bounce(Slot* s) {
    if (!s->bounced) return;
    if (!s->bounce) {
      void* m = nullptr;
      if (::posix_memalign(&m, (size_t)kAlign, (size_t)request_bytes) != 0) throw std::bad_alloc();
      s->bounce = static_cast<char*>(m);
    }
    s->req.buf = s->bounce;
    if (s->req.write) {
      std::memcpy(s->bounce, s->part->user + s->part_off, (size_t)s->len);
      std::memset(s->bounce + s->len, 0, (size_t)(s->req.len - s->len));
    }
  }

  // After the backend returned the slot: copy a bounced read out (outside the lock), then the bookkeeping.
  // Returns the bytes completed (for the token-hold event).
  int64_t complete(Slot* s, std::vector<TierEvent>* events) {
    if (s->bounced && !s->req.write && s->req.err == 0)
      std::memcpy(s->part->user + s->part_off, s->bounce, (size_t)s->len);
    const double now = TierStore::now_seconds();
    std::shared_ptr<Part> p = std::move(s->part);
    bool finished = false;
    {
      std::lock_guard<std::mutex> lk(mu);
      --p->inflight;
      if (s->req.err != 0 && p->err == 0) {
        p->err = s->req.err;
        p->err_off = s->req.offset;
        p->issued = p->bytes;  // stop issuing the rest of a failed share
      }
      if (s->req.err == 0) p->completed += s->len;
      if (--inflight == 0) st.busy_s += now - busy_t0;
      if (p->write) {
        if (--inflight_write == 0) st.write_busy_s += now - write_t0;
        if (s->req.err == 0) st.write_bytes += s->len;
      } else {
        if (--inflight_read == 0) st.read_busy_s += now - read_t0;
        if (s->req.err == 0) st.read_bytes += s->len;
      }
      free_slots.push_back(s);
      finished = p->inflight == 0 && p->issued >= p->bytes;
      if (finished) {
        auto it = std::find(parts.begin(), parts.end(), p);
        if (it != parts.end()) parts.erase(it);
        if (parts.empty() && inflight == 0) idle_cv.notify_all();
      }
    }
    if (finished) {
      std::string err;
      if (p->err != 0) {
        char buf[160];
        std::snprintf(buf, sizeof buf, " at file offset %lld (object bytes %lld..%lld)", (long long)p->err_off,
                      (long long)p->object_off, (long long)(p->object_off + p->bytes));
        err = store->options().what + " '" + info.dir + "' (device " + info.device + "): " +
              (p->write ? "write of " : "read of ") + p->label + " failed" + buf + ": " + std::strerror(p->err);
        store->part_failed(p->id, p->write);
      }
      if (events)
        events->push_back(TierEvent{TierEvent::kPartDone, index, p->id, p->write, p->err == 0, p->bytes, p->t_first, now, 0});
      store->in_flight_.fetch_sub(p->bytes);
      p->ticket->part_done(err);
    }
    return s->req.err == 0 ? s->len : 0;
  }

  void run() {
    const auto& on_event = store->options().on_event;
    std::vector<TierEvent> events;
    bool held = false;
    double hold_t0 = 0, hold_wait = 0;
    int64_t hold_bytes = 0, since_offer = 0;
    auto flush_events = [&] {
      if (on_event)
        for (const auto& e : events) on_event(e);
      events.clear();
    };
    auto release = [&] {
      const double now = TierStore::now_seconds();  // before the release: holds of two processes never overlap
      token->release();
      held = false;
      events.push_back(TierEvent{TierEvent::kTokenHold, index, 0, false, true, hold_bytes, hold_t0, now, hold_wait});
      std::lock_guard<std::mutex> lk(mu);
      ++st.token_holds;
      st.token_wait_s += hold_wait;
    };
    std::vector<Slot*> to_submit;
    for (;;) {
      std::unique_lock<std::mutex> lk(mu);
      std::shared_ptr<Part> next = next_part_locked();
      if (!next && inflight == 0) {
        if (held) {
          lk.unlock();
          release();
          flush_events();
          continue;
        }
        if (stop && parts.empty()) break;
        cv.wait(lk, [&] { return stop || next_part_locked() != nullptr; });
        continue;
      }
      if (next && !held && token) {
        lk.unlock();
        hold_wait = token->acquire();
        held = true;
        hold_t0 = TierStore::now_seconds();
        hold_bytes = 0;
        since_offer = 0;
        continue;
      }
      // Fill the queue.
      const double now = TierStore::now_seconds();
      while (inflight < queue->queue_depth() && (!token || since_offer < batch_bytes)) {
        std::shared_ptr<Part> p = next_part_locked();
        if (!p) break;
        Slot* s = make_request_locked(p, now);
        since_offer += s->len;
        to_submit.push_back(s);
      }
      lk.unlock();
      for (Slot* s : to_submit) {
        prepare_bounce(s);
        queue->submit(&s->req);
      }
      to_submit.clear();
      // One completion.
      if (inflight_unlocked() > 0) {
        IoRequest* r = queue->wait_one();
        hold_bytes += complete(static_cast<Slot*>(r->owner), &events);
      }
      // Batch boundary: offer the token to waiters (drain first: the device is theirs while they hold it).
      if (held && since_offer >= batch_bytes) {
        if (token->others_waiting()) {
          while (inflight_unlocked() > 0) {
            IoRequest* r = queue->wait_one();
            hold_bytes += complete(static_cast<Slot*>(r->owner), &events);
          }
          release();
        }
        since_offer = 0;
      }
      flush_events();
    }
    flush_events();
  }

  int inflight_unlocked() {
    std::lock_guard<std::mutex> lk(mu);
    return inflight;
  }
};

}  // namespace detail

using detail::Object;
using detail::Part;
using detail::PathWorker;
using detail::TicketState;

// ---- Ticket ------------------------------------------------------------------------------------
bool Ticket::done() const {
  if (!s_) return true;
  std::lock_guard<std::mutex> lk(s_->mu);
  return s_->done;
}
void Ticket::wait() const {
  if (!s_) return;
  std::unique_lock<std::mutex> lk(s_->mu);
  s_->cv.wait(lk, [&] { return s_->done; });
  if (!s_->error.empty()) throw IoError(s_->error);
}
bool Ticket::ok() const {
  if (!s_) return true;
  std::lock_guard<std::mutex> lk(s_->mu);
  return s_->done && s_->error.empty();
}
std::string Ticket::error() const {
  if (!s_) return "";
  std::lock_guard<std::mutex> lk(s_->mu);
  return s_->error;
}
int64_t Ticket::bytes() const { return s_ ? s_->bytes : 0; }
double Ticket::seconds() const {
  if (!s_) return 0;
  std::lock_guard<std::mutex> lk(s_->mu);
  return s_->done ? s_->t_done - s_->t_submit : 0;
}

// ---- TierStore ---------------------------------------------------------------------------------
namespace {

// Writes and reads back one aligned block with O_DIRECT; false when the kernel refuses (EINVAL).
bool direct_io_works(int fd) {
  void* m = nullptr;
  if (::posix_memalign(&m, (size_t)kAlign, (size_t)kAlign) != 0) return false;
  std::memset(m, 0x5a, (size_t)kAlign);
  bool ok = ::pwrite(fd, m, (size_t)kAlign, 0) == kAlign && ::pread(fd, m, (size_t)kAlign, 0) == kAlign;
  ::free(m);
  (void)!::ftruncate(fd, 0);
  return ok;
}

}  // namespace

TierStore::TierStore(std::vector<PathSpec> paths, TierOptions opts) : opts_(std::move(opts)) {
  const std::string& what = opts_.what;
  if (paths.empty()) throw SetupError(what + ": no paths given");
  if (opts_.request_bytes < kAlign || opts_.request_bytes % kAlign != 0 || opts_.request_bytes > (1LL << 30))
    throw SetupError("tier request size " + std::to_string(opts_.request_bytes) +
                     " bytes: must be a multiple of 4096 between 4 KiB and 1 GiB");
  if (opts_.queue_depth < 1 || opts_.queue_depth > 1024)
    throw SetupError("tier queue depth " + std::to_string(opts_.queue_depth) + ": must be in 1..1024");
  if (opts_.batch_bytes < opts_.request_bytes) opts_.batch_bytes = opts_.request_bytes;
  double wsum = 0;
  for (const auto& p : paths) {
    if (!std::isfinite(p.weight) || p.weight < 0)
      throw SetupError(what + " '" + p.dir + "': weight must be finite and >= 0");
    wsum += p.weight;
  }
  if (!(wsum > 0)) throw SetupError(what + ": at least one path needs a weight > 0");
  backend_ = resolve_backend(opts_.backend, &backend_why_);
  const std::string lock_dir = opts_.lock_dir.empty() ? default_lock_dir() : opts_.lock_dir;

  std::set<std::string> seen;
  for (size_t i = 0; i < paths.size(); ++i) {
    auto w = std::make_unique<PathWorker>();
    w->store = this;
    w->index = (int)i;
    w->info = probe_path(paths[i].dir, what);
    if (!seen.insert(w->info.real_dir).second)
      throw SetupError(what + " '" + paths[i].dir + "': given twice (" + w->info.real_dir + ")");
    w->weight = paths[i].weight;
    bool direct = !w->info.virtual_tier;
    w->fd = open_scratch(paths[i].dir, &direct, what);
    if (direct && !direct_io_works(w->fd)) {
      // Refused at I/O time: clear O_DIRECT on the open file.
      const int fl = ::fcntl(w->fd, F_GETFL);
      if (fl >= 0) (void)::fcntl(w->fd, F_SETFL, fl & ~O_DIRECT);
      direct = false;
    }
    if (!direct && !w->info.virtual_tier) {
      if (!opts_.allow_buffered)
        throw SetupError(what + " '" + paths[i].dir + "' (" + w->info.fs_type + "): direct I/O (O_DIRECT) is not supported");
      std::fprintf(stderr, "mmoc tier: warning: %s '%s' (%s) does not support O_DIRECT; using buffered I/O (page cache)\n",
                   what.c_str(), paths[i].dir.c_str(), w->info.fs_type.c_str());
    }
    w->direct = direct;
    w->request_bytes = opts_.request_bytes;
    w->batch_bytes = opts_.batch_bytes;
    if (opts_.device_token && !w->info.virtual_tier) w->token = DeviceToken::get(lock_dir, w->info.device);
    w->queue = make_queue(backend_, opts_.queue_depth);
    for (int k = 0; k < opts_.queue_depth; ++k) {
      w->slots.push_back(std::make_unique<detail::Slot>());
      w->free_slots.push_back(w->slots.back().get());
    }
    auto& st = w->st;
    st.dir = w->info.dir;
    st.device = w->info.device;
    st.fs_type = w->info.fs_type;
    st.virtual_tier = w->info.virtual_tier;
    st.direct = w->direct;
    st.token = (bool)w->token;
    st.weight = w->weight;
    weights_.push_back(w->weight);
    workers_.push_back(std::move(w));
  }
  for (auto& w : workers_) {
    PathWorker* pw = w.get();
    pw->thread = std::thread([pw] { pw->run(); });
  }
}

TierStore::~TierStore() {
  for (auto& w : workers_) {
    {
      std::lock_guard<std::mutex> lk(w->mu);
      w->stop = true;
    }
    w->cv.notify_all();
  }
  for (auto& w : workers_)
    if (w->thread.joinable()) w->thread.join();
}

void TierStore::reserve_all(const std::vector<ObjectSpec>& objects) {
  std::lock_guard<std::mutex> lk(mu_);
  std::set<uint64_t> ids;
  std::vector<int64_t> need(workers_.size(), 0);
  std::vector<std::unique_ptr<Object>> fresh;
  for (const auto& o : objects) {
    if (o.bytes < 0) throw std::invalid_argument("tier: object " + std::to_string(o.id) + " has a negative size");
    if (objects_.count(o.id) || !ids.insert(o.id).second)
      throw std::invalid_argument("tier: object id " + std::to_string(o.id) + " reserved twice");
    auto obj = std::make_unique<Object>();
    obj->spec = o;
    obj->extents = stripe_map(o.bytes, weights_);
    for (const auto& e : obj->extents) need[e.path] += align_up(e.bytes);
    fresh.push_back(std::move(obj));
  }
  // Space: per file system (paths may share one), against what statvfs says is free now.
  std::map<uint64_t, std::vector<size_t>> by_fs;
  for (size_t i = 0; i < workers_.size(); ++i) by_fs[workers_[i]->info.fs_dev].push_back(i);
  std::string errors;
  for (const auto& [dev, idx] : by_fs) {
    int64_t n = 0;
    std::string names;
    for (size_t i : idx) {
      n += need[i];
      names += (names.empty() ? "'" : ", '") + workers_[i]->info.dir + "'";
    }
    if (n == 0) continue;
    const int64_t avail = free_bytes(workers_[idx[0]]->info.dir);
    if (avail >= 0 && n > avail) {
      const PathWorker& w = *workers_[idx[0]];
      errors += "\n  " + opts_.what + (idx.size() > 1 ? "s " : " ") + names + " (" + w.info.fs_type + ", device " +
                w.info.device + "): not enough free space: needs " + format_bytes(n) + ", " + format_bytes(avail) +
                " free, missing " + format_bytes(n - avail);
    }
  }
  if (!errors.empty()) throw SetupError("the NVMe tier does not fit:" + errors);
  // Allocate: grow each scratch file; offsets in object order.
  std::vector<int64_t> old_size(workers_.size());
  for (size_t i = 0; i < workers_.size(); ++i) old_size[i] = workers_[i]->file_size;
  std::vector<int64_t> cursor = old_size;
  for (auto& obj : fresh)
    for (const auto& e : obj->extents) {
      obj->file_offset.push_back(cursor[e.path]);
      cursor[e.path] += align_up(e.bytes);
    }
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (need[i] == 0) continue;
    PathWorker& w = *workers_[i];
    int e = ::posix_fallocate(w.fd, old_size[i], need[i]);
    if (e == EOPNOTSUPP || e == EINVAL) e = ::ftruncate(w.fd, old_size[i] + need[i]) == 0 ? 0 : errno;
    if (e != 0) {
      // Undo what this call grew so far (space back to the file system), then report.
      for (size_t k = 0; k <= i; ++k) (void)!::ftruncate(workers_[k]->fd, old_size[k]);
      const int64_t avail = free_bytes(w.info.dir);
      std::string msg = opts_.what + " '" + w.info.dir + "' (" + w.info.fs_type + ", device " + w.info.device +
                        "): cannot allocate " + format_bytes(need[i]) + ": " + std::strerror(e);
      if (e == ENOSPC && avail >= 0) msg += " (" + format_bytes(avail) + " free, missing " + format_bytes(std::max<int64_t>(0, need[i] - avail)) + ")";
      throw SetupError(msg);
    }
    w.file_size = cursor[i];
    std::lock_guard<std::mutex> wl(w.mu);
    w.st.reserved_bytes = w.file_size;
  }
  for (auto& obj : fresh) {
    const uint64_t id = obj->spec.id;
    objects_[id] = std::move(obj);
  }
}

Ticket TierStore::submit(uint64_t id, char* buf, bool write) {
  auto t = std::make_shared<TicketState>();
  t->t_submit = now_seconds();
  std::vector<std::shared_ptr<Part>> parts;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = objects_.find(id);
    if (it == objects_.end()) throw std::invalid_argument("tier: unknown object id " + std::to_string(id));
    Object& o = *it->second;
    if (!write && !o.written)
      throw std::logic_error("tier: read of " + o.label() + " before any successful write");
    if (buf == nullptr && o.spec.bytes > 0) throw std::invalid_argument("tier: null buffer for " + o.label());
    if (write) o.written = true;
    t->bytes = o.spec.bytes;
    for (size_t k = 0; k < o.extents.size(); ++k) {
      const Extent& e = o.extents[k];
      auto p = std::make_shared<Part>();
      p->ticket = t;
      p->write = write;
      p->id = id;
      p->label = o.label();
      p->user = buf + e.object_offset;
      p->bytes = e.bytes;
      p->object_off = e.object_offset;
      p->file_off = o.file_offset[k];
      parts.push_back(std::move(p));
    }
    t->parts_left = (int)parts.size();
    if (parts.empty()) {
      t->done = true;
      t->t_done = t->t_submit;
      return Ticket(t);
    }
    in_flight_.fetch_add(o.spec.bytes);
    // Queue under mu_ so that two submissions of one object reach every path in the same order.
    for (size_t k = 0; k < parts.size(); ++k) {
      PathWorker& w = *workers_[(size_t)o.extents[k].path];
      {
        std::lock_guard<std::mutex> wl(w.mu);
        w.parts.push_back(std::move(parts[k]));
      }
      w.cv.notify_one();
    }
  }
  return Ticket(t);
}

void TierStore::part_failed(uint64_t id, bool write) {
  if (!write) return;
  std::lock_guard<std::mutex> lk(mu_);
  auto it = objects_.find(id);
  if (it != objects_.end()) it->second->written = false;
}

Ticket TierStore::write_async(uint64_t id, const void* src) {
  return submit(id, const_cast<char*>(static_cast<const char*>(src)), true);
}
Ticket TierStore::read_async(uint64_t id, void* dst) { return submit(id, static_cast<char*>(dst), false); }

void TierStore::wait_all() {
  for (auto& w : workers_) {
    std::unique_lock<std::mutex> lk(w->mu);
    w->idle_cv.wait(lk, [&] { return w->parts.empty() && w->inflight == 0; });
  }
}

int64_t TierStore::bytes_in_flight() const { return in_flight_.load(); }

std::vector<PathStats> TierStore::stats() const {
  std::vector<PathStats> out;
  const double now = now_seconds();
  for (const auto& w : workers_) {
    std::lock_guard<std::mutex> lk(w->mu);
    PathStats s = w->st;
    if (w->inflight > 0) s.busy_s += now - w->busy_t0;
    if (w->inflight_read > 0) s.read_busy_s += now - w->read_t0;
    if (w->inflight_write > 0) s.write_busy_s += now - w->write_t0;
    out.push_back(s);
  }
  return out;
}

std::vector<PathInfo> TierStore::paths() const {
  std::vector<PathInfo> out;
  for (const auto& w : workers_) out.push_back(w->info);
  return out;
}

std::vector<double> TierStore::weights() const { return weights_; }

std::vector<Extent> TierStore::extents(uint64_t id) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = objects_.find(id);
  if (it == objects_.end()) throw std::invalid_argument("tier: unknown object id " + std::to_string(id));
  return it->second->extents;
}

int64_t TierStore::object_bytes(uint64_t id) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = objects_.find(id);
  if (it == objects_.end()) throw std::invalid_argument("tier: unknown object id " + std::to_string(id));
  return it->second->spec.bytes;
}

}  // namespace mmoc::tier
