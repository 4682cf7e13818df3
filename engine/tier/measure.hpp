// Bandwidth of the NVMe tier's paths, measured through TierStore itself (the same requests, queue depth and
// backend the engine will use). mmoc-profile --nvme and mmoc_tier_bench call these.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "engine/tier/store.hpp"

namespace mmoc::tier {

struct MeasureOptions {
  int64_t bytes = 1LL << 30;        // object size per measurement (host buffer of the same size)
  int64_t request_bytes = 1 << 20;
  int queue_depth = 8;
  int repeats = 3;                  // timed writes and reads each (median); one untimed write first
  Backend backend = Backend::kAuto;
  bool device_token = true;
};

struct PathBandwidth {
  std::string path, device, fs_type, backend;
  bool virtual_tier = false, direct = false;
  double write_gbps = 0, read_gbps = 0;  // 1e9 bytes per second, median of the repeats
};

// One path alone. Throws SetupError (path problems, not enough space) or IoError; std::runtime_error when the data
// read back differs from what was written.
PathBandwidth measure_path(const std::string& dir, const MeasureOptions& o);

// Several paths at once: one object striped by the weights; aggregate GB/s (write_gbps, read_gbps; path = "all").
PathBandwidth measure_striped(const std::vector<PathSpec>& paths, const MeasureOptions& o);

// Fills n bytes with a reproducible incompressible pattern (seeded).
void fill_pattern(void* dst, int64_t n, uint64_t seed);

}  // namespace mmoc::tier
