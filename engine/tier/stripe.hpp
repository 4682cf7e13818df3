// Stripe maps of the NVMe tier (torch-free, no I/O): how an object of N bytes is split over the tier's paths.
//
// An object is cut into blocks of kAlign bytes (the last one may be partial); the blocks are shared out to the
// paths in proportion to their weights by the largest-remainder method (ties: the lower path index), and each
// path gets one contiguous run of blocks, in path order. The map depends only on (object bytes, weights), so the
// compiler can compute the bytes each path moves without creating a store, and two runs agree on it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mmoc::tier {

// Alignment of direct I/O: buffer addresses, file offsets and request lengths (the largest logical block size of
// common NVMe/SSD devices; 512-byte devices accept it too).
constexpr int64_t kAlign = 4096;

inline int64_t align_up(int64_t x, int64_t a = kAlign) { return (x + a - 1) / a * a; }

// One path's share of an object: bytes [object_offset, object_offset + bytes) of the object. The path stores it
// in align_up(bytes) bytes of its scratch file (the object's last block is padded with zeros on disk).
struct Extent {
  int path = 0;
  int64_t object_offset = 0;
  int64_t bytes = 0;
};

// The extents of an object of `bytes` bytes over paths with these weights (>= 0, finite, at least one > 0).
// Paths that get nothing have no extent; the extents are in path order and cover the object exactly.
// Throws std::invalid_argument for bad weights or bytes < 0 (0 bytes: no extents).
std::vector<Extent> stripe_map(int64_t bytes, const std::vector<double>& weights);

// Per path: the file bytes (aligned) the objects take, summed over the objects. The NVMe tier's space need.
std::vector<int64_t> path_bytes(const std::vector<int64_t>& object_bytes, const std::vector<double>& weights);

// The weight of a path whose measured bandwidths are these (GB/s): each object is written once and read once per
// step, so a path with share s takes s / read + s / write; equal times for all paths need s proportional to
// 1 / (1 / read + 1 / write). 0 if either is <= 0.
double path_weight(double read_gbps, double write_gbps);

}  // namespace mmoc::tier
