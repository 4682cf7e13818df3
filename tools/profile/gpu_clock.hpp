// The GPU's SM clock, power draw and clock-limit reasons, read through NVML when the driver provides it
// (libnvidia-ml.so.1, opened at run time: mmoc-profile has no link dependency on it and runs without a GPU).
// A layer's time depends on the clock it runs at, and a GPU at its power limit runs slower under sustained load than
// in a short burst (mmoc-profile measures layers at that steady state; docs/profile.md).
#pragma once

#include <string>

namespace mmoc::profile {

struct ClockSample {
  bool ok = false;          // false: no NVML here, or the device was not found
  unsigned sm_mhz = 0, max_sm_mhz = 0;
  double power_w = 0, power_limit_w = 0;
  unsigned long long reasons = 0;  // NVML clock event reasons (bit mask)
};

class GpuClock {
 public:
  // pci_bus_id: as cudaDeviceGetPCIBusId writes it ("0000:1B:00.0"); an empty id or no NVML leaves the probe off.
  explicit GpuClock(const std::string& pci_bus_id);
  ~GpuClock();
  GpuClock(const GpuClock&) = delete;
  GpuClock& operator=(const GpuClock&) = delete;
  ClockSample sample() const;  // ok = false when the probe is off
  // "power cap", "thermal", ... : what NVML says limits the clock (empty: nothing, or only idle)
  static std::string reasons_text(unsigned long long reasons);

 private:
  void* lib_ = nullptr;
  void* dev_ = nullptr;
  struct Fns;
  Fns* fns_ = nullptr;
};

}  // namespace mmoc::profile
