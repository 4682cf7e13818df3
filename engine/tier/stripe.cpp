#include "engine/tier/stripe.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace mmoc::tier {

std::vector<Extent> stripe_map(int64_t bytes, const std::vector<double>& weights) {
  if (bytes < 0) throw std::invalid_argument("stripe_map: negative object size");
  if (weights.empty()) throw std::invalid_argument("stripe_map: no paths");
  long double total = 0;
  for (double w : weights) {
    if (!std::isfinite(w) || w < 0) throw std::invalid_argument("stripe_map: path weights must be finite and >= 0");
    total += w;
  }
  if (!(total > 0)) throw std::invalid_argument("stripe_map: at least one path weight must be > 0");
  std::vector<Extent> out;
  if (bytes == 0) return out;
  const int64_t blocks = (bytes + kAlign - 1) / kAlign;
  const size_t n = weights.size();
  std::vector<int64_t> count(n, 0);
  std::vector<long double> frac(n, 0);
  int64_t given = 0;
  for (size_t i = 0; i < n; ++i) {
    const long double q = (long double)blocks * weights[i] / total;
    count[i] = (int64_t)std::floor(q);
    frac[i] = q - (long double)count[i];
    given += count[i];
  }
  // The remaining blocks (fewer than n) to the largest remainders; ties to the lower index. Zero-weight paths
  // have remainder 0 and come last, so they only get blocks if every other path had remainder 0 too, which
  // cannot leave blocks over (the quotas of the positive paths then sum to `blocks` exactly).
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (frac[a] != frac[b]) return frac[a] > frac[b];
    return a < b;
  });
  for (size_t k = 0; given < blocks; k = (k + 1) % n) {
    if (weights[order[k]] > 0) {
      ++count[order[k]];
      ++given;
    }
  }
  int64_t off = 0;
  for (size_t i = 0; i < n; ++i) {
    if (count[i] == 0) continue;
    const int64_t len = std::min(bytes - off, count[i] * kAlign);
    out.push_back(Extent{(int)i, off, len});
    off += len;
  }
  return out;
}

std::vector<int64_t> path_bytes(const std::vector<int64_t>& object_bytes, const std::vector<double>& weights) {
  std::vector<int64_t> need(weights.size(), 0);
  for (int64_t b : object_bytes)
    for (const Extent& e : stripe_map(b, weights)) need[e.path] += align_up(e.bytes);
  return need;
}

double path_weight(double read_gbps, double write_gbps) {
  if (!(read_gbps > 0) || !(write_gbps > 0)) return 0;
  return 1.0 / (1.0 / read_gbps + 1.0 / write_gbps);
}

}  // namespace mmoc::tier
