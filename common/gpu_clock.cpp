#include "common/gpu_clock.hpp"

#include <dlfcn.h>

#include <chrono>
#include <type_traits>

namespace mmoc {

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

unsigned GpuClock::sm_mhz() const {
  unsigned mhz = 0;
  if (!dev_ || fns_->clock(dev_, kClockSm, &mhz) != 0) return 0;
  return mhz;
}

double steady_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

ClockSampler::ClockSampler(const std::string& pci_bus_id, double period_us, size_t max_points)
    : clock_(pci_bus_id), period_us_(period_us), max_points_(max_points) {
  if (clock_.on()) th_ = std::thread([this] { loop(); });
}

ClockSampler::~ClockSampler() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (th_.joinable()) th_.join();
}

void ClockSampler::loop() {
  std::unique_lock<std::mutex> lk(mu_);
  while (!stop_) {
    lk.unlock();
    const ClockPoint p{steady_us(), clock_.sm_mhz()};
    lk.lock();
    if (p.sm_mhz > 0) {
      pts_.push_back(p);
      if (pts_.size() > max_points_) pts_.pop_front();
    }
    cv_.wait_for(lk, std::chrono::duration<double, std::micro>(period_us_), [this] { return stop_; });
  }
}

std::vector<ClockPoint> ClockSampler::points(double from_us, double to_us) const {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<ClockPoint> out;
  for (const auto& p : pts_) {
    if (p.t_us < from_us) out.assign(1, p);  // the last one before
    else if (p.t_us <= to_us) out.push_back(p);
  }
  return out;
}

double mean_mhz(const std::vector<ClockPoint>& pts, double t0, double t1) {
  double acc = 0, t = t0, cur = -1;
  for (const auto& p : pts) {
    if (p.t_us <= t0) { cur = p.sm_mhz; continue; }
    if (p.t_us >= t1) break;
    if (cur >= 0) acc += cur * (p.t_us - t);
    else t0 = p.t_us;  // nothing before t0: from the first reading
    cur = p.sm_mhz;
    t = p.t_us;
  }
  if (cur < 0) return 0;
  acc += cur * (t1 - t);
  return t1 > t0 ? acc / (t1 - t0) : cur;
}

}  // namespace mmoc
