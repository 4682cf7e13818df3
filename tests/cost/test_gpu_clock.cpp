// common/gpu_clock: the time-weighted clock over an interval (mmoc-profile's layer clock; the same as
// bench/layer_overhead.py's over a pass in a step), and the probe staying off where it cannot read a GPU.
#include <doctest/doctest.h>

#include "common/gpu_clock.hpp"

using mmoc::ClockPoint;

TEST_CASE("mean_mhz: each reading holds until the next, weighted by time") {
  const std::vector<ClockPoint> tr{{0, 1500}, {6000, 1300}};
  CHECK(mmoc::mean_mhz(tr, 1000, 11000) == doctest::Approx(1400));  // half at 1500, half at 1300
  CHECK(mmoc::mean_mhz(tr, 7000, 8000) == doctest::Approx(1300));   // between two readings
  CHECK(mmoc::mean_mhz(tr, 0, 3000) == doctest::Approx(1500));      // a reading at the start
  CHECK(mmoc::mean_mhz({{2000, 1500}, {3000, 1700}}, 0, 4000) == doctest::Approx(1600));  // none before: from the first
  CHECK(mmoc::mean_mhz({{5000, 1500}}, 0, 4000) == 0);  // none before or in it
  CHECK(mmoc::mean_mhz({}, 0, 4000) == 0);
  CHECK(mmoc::mean_mhz({{0, 1500}}, 10, 10) == doctest::Approx(1500));  // an empty interval: the clock at it
}

TEST_CASE("the probe is off without a device it can find") {
  const mmoc::GpuClock none("");
  CHECK_FALSE(none.on());
  CHECK_FALSE(none.sample().ok);
  CHECK(none.sm_mhz() == 0);
  const mmoc::GpuClock bogus("0000:FF:1F.7");  // no NVML here, or NVML without this device
  CHECK_FALSE(bogus.on());
  const mmoc::ClockSampler s("", 1000.0);
  CHECK_FALSE(s.on());
  CHECK(s.points(0, 1e300).empty());
}
