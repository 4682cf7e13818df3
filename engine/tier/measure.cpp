#include "engine/tier/measure.hpp"

#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>

namespace mmoc::tier {

void fill_pattern(void* dst, int64_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  auto* p = static_cast<unsigned char*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
  for (; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = (unsigned char)x;
  }
}

namespace {

struct Aligned {
  void* p = nullptr;
  explicit Aligned(int64_t n) {
    if (::posix_memalign(&p, (size_t)kAlign, (size_t)align_up(std::max<int64_t>(n, 1))) != 0) throw std::bad_alloc();
  }
  ~Aligned() { ::free(p); }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

PathBandwidth run(const std::vector<PathSpec>& paths, const MeasureOptions& o) {
  TierOptions to;
  to.request_bytes = o.request_bytes;
  to.queue_depth = o.queue_depth;
  to.backend = o.backend;
  to.device_token = o.device_token;
  TierStore store(paths, to);
  store.reserve(1, o.bytes, "bandwidth probe");
  Aligned src(o.bytes), dst(o.bytes);
  fill_pattern(src.p, o.bytes, 12345);
  std::memset(dst.p, 0, (size_t)o.bytes);  // first touch outside the timed reads
  store.write_async(1, src.p).wait();      // untimed: allocates the extents on the device
  std::vector<double> w, r;
  for (int k = 0; k < std::max(1, o.repeats); ++k) {
    double t0 = TierStore::now_seconds();
    store.write_async(1, src.p).wait();
    w.push_back(TierStore::now_seconds() - t0);
    t0 = TierStore::now_seconds();
    store.read_async(1, dst.p).wait();
    r.push_back(TierStore::now_seconds() - t0);
  }
  if (std::memcmp(src.p, dst.p, (size_t)o.bytes) != 0)
    throw std::runtime_error("tier bandwidth probe on '" + paths[0].dir + "': the data read back differs from the data written");
  PathBandwidth b;
  const auto info = store.paths();
  b.path = paths.size() == 1 ? paths[0].dir : "all";
  b.device = info[0].device;
  b.fs_type = info[0].fs_type;
  b.virtual_tier = info[0].virtual_tier;
  b.direct = store.stats()[0].direct;
  b.backend = store.backend_name();
  b.write_gbps = (double)o.bytes / median(w) / 1e9;
  b.read_gbps = (double)o.bytes / median(r) / 1e9;
  return b;
}

}  // namespace

PathBandwidth measure_path(const std::string& dir, const MeasureOptions& o) { return run({PathSpec{dir, 1.0}}, o); }

PathBandwidth measure_striped(const std::vector<PathSpec>& paths, const MeasureOptions& o) { return run(paths, o); }

}  // namespace mmoc::tier
