// bf16 / fp16 <-> fp32 conversions (torch-free).
//
// Rounding is round-to-nearest-even and matches torch's CPU `Tensor.to()` bit for bit for every
// non-NaN input (normals, subnormals, +-0, +-Inf, overflow). NaN stays NaN:
//   * fp32 -> bf16: every NaN becomes 0xFFFF, which is what torch's vectorised (AVX2/AVX-512) CPU
//     cast writes (c10::BFloat16's scalar constructor writes 0x7FC0 instead; both are NaN).
//   * fp32 -> fp16: sign kept, quiet bit set, top 9 payload bits kept (x86 F16C `vcvtps2ph`, as torch).
//   * bf16 -> fp32: exact (a 16-bit shift; payload and signalling bit kept, as torch).
//   * fp16 -> fp32: exact for non-NaN; NaN gets the quiet bit, payload kept (F16C `vcvtph2ps`;
//     torch's own scalar tail path differs here, so only NaN-ness is guaranteed to agree).
// These functions assume the default floating-point environment (no FTZ/DAZ).
#pragma once

#include <bit>
#include <cstdint>

namespace mmoc::engine::optim {

inline float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0xFFFF} : static_cast<uint16_t>(rounded);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7FFFu);
  uint32_t o = (em << 13) + (112u << 23);  // rebias exponent 15 -> 127
  const uint32_t exp = em & 0x7C00u;
  if (exp == 0x7C00u) {  // Inf / NaN
    o += 112u << 23;
    if (em & 0x03FFu) o |= 0x00400000u;  // quiet NaN
  } else if (exp == 0) {  // zero / subnormal: renormalise with an exact float subtraction
    o = std::bit_cast<uint32_t>(std::bit_cast<float>(o + (1u << 23)) - std::bit_cast<float>(113u << 23));
  }
  return std::bit_cast<float>(o | sign);
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  uint32_t o;
  if (u >= (143u << 23)) {  // >= 65536: Inf, or NaN
    o = u > 0x7F800000u ? (0x7E00u | ((u >> 13) & 0x03FFu)) : 0x7C00u;
  } else if (u < (113u << 23)) {  // result is subnormal or zero: align with a magic addend (RNE add)
    constexpr uint32_t kMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = std::bit_cast<uint32_t>(std::bit_cast<float>(u) + std::bit_cast<float>(kMagic)) - kMagic;
  } else {  // normal (may round up to Inf)
    o = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
  }
  return static_cast<uint16_t>(o | sign);
}

// Array versions (single-threaded; n elements).
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n);
void f32_to_bf16(const float* src, uint16_t* dst, int64_t n);
void f16_to_f32(const uint16_t* src, float* dst, int64_t n);
void f32_to_f16(const float* src, uint16_t* dst, int64_t n);

}  // namespace mmoc::engine::optim
