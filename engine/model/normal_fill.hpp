// Counter-based normal random numbers for weight initialisation (torch-free).
//
// Element i of the stream `key` is a function of (key, i) only: Philox4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC'11) of the counter i/4 under the key gives four 32-bit words, and two Box-Muller
// transforms turn them into the normals of elements 4*(i/4) .. 4*(i/4)+3. So any split of a tensor over threads,
// stages or calls gives the same values, and filling is embarrassingly parallel.
//
// The transforms use this file's own log and sin/cos polynomials in fp64 (no libm calls): the loop vectorises, and
// the result is the same bit for bit on every x86-64 ISA and compiler flag set (built with -ffp-contract=off).
#pragma once
#include <cstdint>
#include <string>

namespace mmoc::engine {

// out[j] = float(mean + std * N(key, first + j)) for j in [0, n).
void fill_normal(float* out, int64_t n, uint64_t key, uint64_t first, double mean, double std);

// The instruction set fill_normal runs on: avx512, avx2 or baseline (MMOC_INIT_ISA caps it); the values are the same.
const char* normal_fill_isa();
// fill_normal on the named ISA (tests); false when this CPU does not have it.
bool fill_normal_with_isa(const std::string& isa, float* out, int64_t n, uint64_t key, uint64_t first, double mean, double std);

// The four 32-bit words of Philox4x32-10 for one counter (exposed for tests: known-answer vectors).
void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

}  // namespace mmoc::engine
