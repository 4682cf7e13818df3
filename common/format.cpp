#include "common/format.hpp"

#include <cmath>
#include <cstdio>

namespace mmoc {

std::string gib(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / GiB);
  return buf;
}

std::string gib_at_least(int64_t bytes) {
  char buf[64];
  const double g = double(bytes) / GiB;
  if (g >= 1.0) std::snprintf(buf, sizeof buf, "%.2f GiB", std::ceil(g * 100.0) / 100.0);
  else std::snprintf(buf, sizeof buf, "%.4f GiB", std::ceil(g * 10000.0) / 10000.0);
  return buf;
}

}  // namespace mmoc
