#include "engine/model/normal_fill.hpp"

#include <cstdlib>
#include <string>

#include "engine/model/normal_fill_kernels.hpp"

namespace mmoc::engine {

namespace {
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  *lo = (uint32_t)p;
}

using FillFn = void (*)(float*, int64_t, uint64_t, uint64_t, double, double);
struct Isa {
  const char* name;
  FillFn fill;
};

Isa pick(const char* want_env) {
  Isa baseline{"baseline", &isa_baseline::fill_normal_kernel};
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  std::string want = want_env && *want_env ? want_env : "avx512";
  if (want == "avx512" && has_avx512) return {"avx512", &isa_avx512::fill_normal_kernel};
  if ((want == "avx512" || want == "avx2") && has_avx2) return {"avx2", &isa_avx2::fill_normal_kernel};
#else
  (void)want_env;
#endif
  return baseline;
}

const Isa& isa() {
  static const Isa chosen = pick(std::getenv("MMOC_INIT_ISA"));
  return chosen;
}
}  // namespace

const char* normal_fill_isa() { return isa().name; }

void fill_normal(float* out, int64_t n, uint64_t key, uint64_t first, double mean, double std) {
  isa().fill(out, n, key, first, mean, std);
}

bool fill_normal_with_isa(const std::string& want, float* out, int64_t n, uint64_t key, uint64_t first, double mean, double std) {
  const Isa i = pick(want.c_str());
  if (want != i.name) return false;
  i.fill(out, n, key, first, mean, std);
  return true;
}

void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, &hi0, &lo0);
    mulhilo(kM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

}  // namespace mmoc::engine
