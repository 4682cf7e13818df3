// mmoc's own CUDA kernels for the decoder layer (issue 14): the elementwise work around the GEMMs that ATen runs as
// many strided passes. Torch-free: raw device pointers and a cudaStream_t passed as void*; model.cpp wraps them in
// autograd nodes (RopeQKV, SwiGluDown). Every product, quotient and sum is rounded to the storage dtype exactly where
// ATen's separate kernels round it, with ATen's float expressions, so each kernel is bit-identical to the ATen ops it
// replaces (test_model.cpp checks both directions in fp32, fp16 and bf16 on a GPU).
//
// rope_forward:   qkv [N, nh*hd + 2*nkv*hd] (row n is token n % T of its sequence) -> q [N, nh*hd] and k [N, nkv*hd]
//                 rotated (HF's x*cos + rotate_half(x)*sin), v [N, nkv*hd] copied; cos/sin [T, hd] in the same dtype.
// rope_backward:  the gradients of q, k, v -> the gradient of qkv.
// swiglu_forward: gu [N, 2F] (gate | up) -> act [N, F] = silu(gate) * up.
// swiglu_backward: gu and d(act) [N, F] -> d(gu) [N, 2F]: d(gate) = silu_backward(d(act) * up, gate),
//                 d(up) = d(act) * silu(gate).
#pragma once
#include <cstdint>

namespace mmoc::engine::kernels {

enum class DType { F32, F16, BF16 };

struct RopeShape {
  int64_t rows = 0;  // N = batch x sequence
  int64_t seq = 0;   // T: row n is position n % T
  int nh = 0, nkv = 0, hd = 0;
};

// True when this build has the kernels (CMake found a CUDA compiler); otherwise the callers use ATen's ops.
bool available();

// Each returns 0 or a CUDA error code (error_string names it).
int rope_forward(DType dt, const RopeShape& s, const void* qkv, const void* cos, const void* sin, void* q, void* k,
                 void* v, void* stream);
int rope_backward(DType dt, const RopeShape& s, const void* gq, const void* gk, const void* gv, const void* cos,
                  const void* sin, void* gqkv, void* stream);
int swiglu_forward(DType dt, int64_t rows, int64_t F, const void* gu, void* act, void* stream);
int swiglu_backward(DType dt, int64_t rows, int64_t F, const void* gu, const void* dact, void* dgu, void* stream);
const char* error_string(int code);

// Kernel launches so far in this process, by kernel (tests check that a path really ran the kernels).
struct Launches {
  int64_t rope_forward = 0, rope_backward = 0, swiglu_forward = 0, swiglu_backward = 0;
};
Launches launches();

}  // namespace mmoc::engine::kernels
