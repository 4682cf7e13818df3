#include "tools/profile/gpu_clock.hpp"

#include <dlfcn.h>

#include <type_traits>

namespace mmoc::profile {

namespace {
using nvmlReturn = int;  // NVML_SUCCESS = 0
using nvmlDevice = void*;
constexpr int kClockSm = 1;  // NVML_CLOCK_SM
}  // namespace

struct GpuClock::Fns {
  nvmlReturn (*init)() = nullptr;
  nvmlReturn (*shutdown)() = nullptr;
  nvmlReturn (*by_pci)(const char*, nvmlDevice*) = nullptr;
  nvmlReturn (*clock)(nvmlDevice, int, unsigned*) = nullptr;
  nvmlReturn (*max_clock)(nvmlDevice, int, unsigned*) = nullptr;
  nvmlReturn (*power)(nvmlDevice, unsigned*) = nullptr;
  nvmlReturn (*power_limit)(nvmlDevice, unsigned*) = nullptr;
  nvmlReturn (*reasons)(nvmlDevice, unsigned long long*) = nullptr;
};

GpuClock::GpuClock(const std::string& pci_bus_id) {
  if (pci_bus_id.empty()) return;
  lib_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib_) return;
  fns_ = new Fns;
  auto sym = [&](auto& f, const char* name, const char* alt = nullptr) {
    void* p = dlsym(lib_, name);
    if (!p && alt) p = dlsym(lib_, alt);
    f = reinterpret_cast<std::remove_reference_t<decltype(f)>>(p);
  };
  sym(fns_->init, "nvmlInit_v2");
  sym(fns_->shutdown, "nvmlShutdown");
  sym(fns_->by_pci, "nvmlDeviceGetHandleByPciBusId_v2");
  sym(fns_->clock, "nvmlDeviceGetClockInfo");
  sym(fns_->max_clock, "nvmlDeviceGetMaxClockInfo");
  sym(fns_->power, "nvmlDeviceGetPowerUsage");
  sym(fns_->power_limit, "nvmlDeviceGetEnforcedPowerLimit");
  sym(fns_->reasons, "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons");
  if (!fns_->init || !fns_->by_pci || !fns_->clock || fns_->init() != 0) return;
  nvmlDevice d = nullptr;
  if (fns_->by_pci(pci_bus_id.c_str(), &d) == 0) dev_ = d;
  else if (fns_->shutdown) fns_->shutdown();  // initialised, but the device is not NVML's: the destructor skips it
}

GpuClock::~GpuClock() {
  if (dev_ && fns_->shutdown) fns_->shutdown();
  delete fns_;
  if (lib_) dlclose(lib_);
}

ClockSample GpuClock::sample() const {
  ClockSample s;
  if (!dev_) return s;
  s.ok = fns_->clock(dev_, kClockSm, &s.sm_mhz) == 0;
  if (fns_->max_clock) fns_->max_clock(dev_, kClockSm, &s.max_sm_mhz);
  unsigned mw = 0;
  if (fns_->power && fns_->power(dev_, &mw) == 0) s.power_w = mw / 1000.0;
  if (fns_->power_limit && fns_->power_limit(dev_, &mw) == 0) s.power_limit_w = mw / 1000.0;
  if (fns_->reasons) fns_->reasons(dev_, &s.reasons);
  return s;
}

std::string GpuClock::reasons_text(unsigned long long r) {
  // NVML's clock event reason bits (nvml.h): 0x4 SW power cap, 0x8 HW slowdown, 0x20 SW thermal, 0x40 HW thermal,
  // 0x80 HW power brake; 0x1 (idle), 0x2 (application clocks) and 0x10 (sync boost) are not limits of interest here
  std::string out;
  auto add = [&](unsigned long long bit, const char* what) {
    if (r & bit) out += (out.empty() ? "" : ", ") + std::string(what);
  };
  add(0x4, "power cap");
  add(0x8, "hardware slowdown");
  add(0x20, "thermal");
  add(0x40, "hardware thermal");
  add(0x80, "power brake");
  return out;
}

}  // namespace mmoc::profile
