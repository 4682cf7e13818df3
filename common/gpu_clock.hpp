// The GPU's SM clock, power draw and clock-limit reasons, read through NVML when the driver provides it
// (libnvidia-ml.so.1, opened at run time: nothing links against it, and everything runs without a GPU or a driver).
// A layer's time depends on the clock it runs at, and a GPU at its power limit runs slower under sustained load than
// in a short burst: mmoc-profile measures layers at that steady state (docs/profile.md), and mmoc-run --trace records
// the clock through the step, so a layer in the step can be compared with the layer alone at the same clock.
#pragma once

#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace mmoc {

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
  bool on() const { return dev_ != nullptr; }
  ClockSample sample() const;  // ok = false when the probe is off
  unsigned sm_mhz() const;     // the SM clock alone (the cheapest read); 0 when the probe is off
  // "power cap", "thermal", ... : what NVML says limits the clock (empty: nothing, or only idle)
  static std::string reasons_text(unsigned long long reasons);

 private:
  void* lib_ = nullptr;
  void* dev_ = nullptr;
  struct Fns;
  Fns* fns_ = nullptr;
};

struct ClockPoint {
  double t_us = 0;  // steady_us() (engine::now_us, the trace's clock)
  unsigned sm_mhz = 0;
};

// A thread that reads the SM clock every period_us while it lives and keeps the last max_points readings (a trace
// needs the last step's). Off (no thread) when the probe is.
class ClockSampler {
 public:
  ClockSampler(const std::string& pci_bus_id, double period_us, size_t max_points = 1u << 20);
  ~ClockSampler();
  ClockSampler(const ClockSampler&) = delete;
  ClockSampler& operator=(const ClockSampler&) = delete;
  bool on() const { return clock_.on(); }
  const GpuClock& clock() const { return clock_; }  // for power and clock-limit reasons beside the sampled clock
  // the readings in [from_us, to_us] and the last one before from_us (the clock at from_us)
  std::vector<ClockPoint> points(double from_us, double to_us) const;

 private:
  void loop();
  GpuClock clock_;
  const double period_us_;
  const size_t max_points_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::deque<ClockPoint> pts_;
  std::thread th_;
};

// The time-weighted mean SM clock over [t0_us, t1_us] of readings in time order, each holding until the next; from the
// first reading when none precedes t0_us; 0 when none is at or before t1_us.
double mean_mhz(const std::vector<ClockPoint>& pts, double t0_us, double t1_us);

// Steady clock in microseconds since its epoch (engine::now_us is this).
double steady_us();

}  // namespace mmoc
