// The kernels of kernels.hpp. Rotary: one thread handles V consecutive elements of a head's first half and the V
// elements half a head further on (the pairs rotate_half mixes); heads past q and k (v) are copied. SwiGLU: one thread
// handles V consecutive elements of a row's gate and the matching ones of its up. V: 16-byte loads where the sizes and
// addresses allow, else 1.
#include "engine/model/kernels.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace mmoc::engine::kernels {
namespace {

template <class T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// a*b rounded to T and back: what ATen's mul kernel stores (opmath float, one rounding; __fmul_rn is never fused)
template <class T> __device__ __forceinline__ float mul_r(float a, float b) { return to_f<T>(from_f<T>(__fmul_rn(a, b))); }

template <class T, int V> struct alignas(sizeof(T) * V) Vec { T x[V]; };

// A head's V-element chunk in the fused [rows, (nh + 2 nkv) * hd] tensor or in the split q / k / v [rows, heads * hd]
template <class T>
__device__ __forceinline__ T* split_head(const RopeShape& s, T* q, T* k, T* v, int64_t n, int j) {
  if (j < s.nh) return q + (n * s.nh + j) * s.hd;
  if (j < s.nh + s.nkv) return k + (n * s.nkv + (j - s.nh)) * s.hd;
  return v + (n * s.nkv + (j - s.nh - s.nkv)) * s.hd;
}

// Fwd: in = qkv (fused), out = q, k, v. Backward: in = the gradients of q, k, v, out = qkv's gradient (fused).
template <class T, int V, bool Fwd>
__global__ void rope(RopeShape s, const T* __restrict__ in0, const T* __restrict__ in1, const T* __restrict__ in2,
                     const T* __restrict__ cos, const T* __restrict__ sin, T* __restrict__ out0, T* __restrict__ out1,
                     T* __restrict__ out2) {
  const int half = s.hd / 2, chunks = half / V, heads = s.nh + 2 * s.nkv;
  const int64_t ld = (int64_t)heads * s.hd, total = s.rows * heads * chunks;
  for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < total; u += (int64_t)gridDim.x * blockDim.x) {
    const int i = (int)(u % chunks) * V;
    const int64_t rh = u / chunks, n = rh / heads;
    const int j = (int)(rh % heads);
    const T* src = Fwd ? in0 + n * ld + (int64_t)j * s.hd : split_head(s, in0, in1, in2, n, j);
    T* dst = Fwd ? split_head(s, out0, out1, out2, n, j) : out0 + n * ld + (int64_t)j * s.hd;
    const Vec<T, V> x1 = *reinterpret_cast<const Vec<T, V>*>(src + i);
    const Vec<T, V> x2 = *reinterpret_cast<const Vec<T, V>*>(src + i + half);
    if (j >= s.nh + s.nkv) {  // v (or its gradient): copied
      *reinterpret_cast<Vec<T, V>*>(dst + i) = x1;
      *reinterpret_cast<Vec<T, V>*>(dst + i + half) = x2;
      continue;
    }
    const int64_t t = n % s.seq;
    const Vec<T, V> c1 = *reinterpret_cast<const Vec<T, V>*>(cos + t * s.hd + i);
    const Vec<T, V> c2 = *reinterpret_cast<const Vec<T, V>*>(cos + t * s.hd + i + half);
    const Vec<T, V> s1 = *reinterpret_cast<const Vec<T, V>*>(sin + t * s.hd + i);
    const Vec<T, V> s2 = *reinterpret_cast<const Vec<T, V>*>(sin + t * s.hd + i + half);
    Vec<T, V> o1, o2;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float a1 = to_f(x1.x[e]), a2 = to_f(x2.x[e]);
      if constexpr (Fwd) {
        // out = x*cos + rotate_half(x)*sin, rotate_half(x) = (-x2, x1)
        o1.x[e] = from_f<T>(__fadd_rn(mul_r<T>(a1, to_f(c1.x[e])), mul_r<T>(-a2, to_f(s1.x[e]))));
        o2.x[e] = from_f<T>(__fadd_rn(mul_r<T>(a2, to_f(c2.x[e])), mul_r<T>(a1, to_f(s2.x[e]))));
      } else {
        // autograd of the forward: g*cos, plus g*sin moved back through rotate_half (x1 gets (g*sin)[half:], x2
        // gets -(g*sin)[:half]); each term rounded as its own kernel stores it, then one rounded sum
        o1.x[e] = from_f<T>(__fadd_rn(mul_r<T>(a1, to_f(c1.x[e])), mul_r<T>(a2, to_f(s2.x[e]))));
        o2.x[e] = from_f<T>(__fadd_rn(mul_r<T>(a2, to_f(c2.x[e])), -mul_r<T>(a1, to_f(s1.x[e]))));
      }
    }
    *reinterpret_cast<Vec<T, V>*>(dst + i) = o1;
    *reinterpret_cast<Vec<T, V>*>(dst + i + half) = o2;
  }
}

// ATen's silu and silu_backward (ActivationSiluKernel.cu), the same float expressions: nvcc contracts them as it did
// ATen's
__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + ::expf(-x)); }
__device__ __forceinline__ float silu_backward_f(float dy, float x) {
  const float s = 1.0f / (1.0f + ::expf(-x));
  return dy * s * (1.0f + x * (1.0f - s));
}

template <class T, int V>
__global__ void swiglu_fwd(int64_t rows, int64_t F, const T* __restrict__ gu, T* __restrict__ act) {
  const int64_t chunks = F / V, total = rows * chunks;
  for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < total; u += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = u / chunks, i = (u % chunks) * V;
    const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(gu + n * 2 * F + i);
    const Vec<T, V> up = *reinterpret_cast<const Vec<T, V>*>(gu + n * 2 * F + F + i);
    Vec<T, V> o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const T sg = from_f<T>(silu_f(to_f(g.x[e])));  // silu(gate), stored by ATen in T
      o.x[e] = from_f<T>(__fmul_rn(to_f(sg), to_f(up.x[e])));
    }
    *reinterpret_cast<Vec<T, V>*>(act + n * F + i) = o;
  }
}

template <class T, int V>
__global__ void swiglu_bwd(int64_t rows, int64_t F, const T* __restrict__ gu, const T* __restrict__ dact,
                           T* __restrict__ dgu) {
  const int64_t chunks = F / V, total = rows * chunks;
  for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < total; u += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = u / chunks, i = (u % chunks) * V;
    const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(gu + n * 2 * F + i);
    const Vec<T, V> up = *reinterpret_cast<const Vec<T, V>*>(gu + n * 2 * F + F + i);
    const Vec<T, V> d = *reinterpret_cast<const Vec<T, V>*>(dact + n * F + i);
    Vec<T, V> dg, du;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float x = to_f(g.x[e]), dy = to_f(d.x[e]);
      const T sg = from_f<T>(silu_f(x));
      const T t = from_f<T>(__fmul_rn(dy, to_f(up.x[e])));  // d(act) * up
      dg.x[e] = from_f<T>(silu_backward_f(to_f(t), x));
      du.x[e] = from_f<T>(__fmul_rn(dy, to_f(sg)));         // d(act) * silu(gate)
    }
    *reinterpret_cast<Vec<T, V>*>(dgu + n * 2 * F + i) = dg;
    *reinterpret_cast<Vec<T, V>*>(dgu + n * 2 * F + F + i) = du;
  }
}

std::atomic<int64_t> n_rope_fwd{0}, n_rope_bwd{0}, n_swiglu_fwd{0}, n_swiglu_bwd{0};

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <class T>
int launch_rope(bool fwd, const RopeShape& s, const void* a, const void* b, const void* c, const void* cos, const void* sin,
           void* x, void* y, void* z, cudaStream_t st) {
  if (s.rows <= 0 || s.seq <= 0 || s.hd <= 0 || s.hd % 2 || s.nh <= 0 || s.nkv <= 0) return (int)cudaErrorInvalidValue;
  constexpr int VW = 16 / sizeof(T);  // 16-byte loads
  const int half = s.hd / 2;
  bool wide = half % VW == 0;
  for (const void* p : {a, b, c, cos, sin, (const void*)x, (const void*)y, (const void*)z})
    if (p && !aligned(p, 16)) wide = false;
  const int chunks = wide ? half / VW : half;
  const int64_t total = s.rows * (s.nh + 2 * s.nkv) * chunks;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65536);
  auto P = [](const void* p) { return static_cast<const T*>(p); };
  auto M = [](void* p) { return static_cast<T*>(p); };
  (fwd ? n_rope_fwd : n_rope_bwd)++;
  if (fwd) {
    if (wide) rope<T, VW, true><<<blocks, threads, 0, st>>>(s, P(a), nullptr, nullptr, P(cos), P(sin), M(x), M(y), M(z));
    else rope<T, 1, true><<<blocks, threads, 0, st>>>(s, P(a), nullptr, nullptr, P(cos), P(sin), M(x), M(y), M(z));
  } else {
    if (wide) rope<T, VW, false><<<blocks, threads, 0, st>>>(s, P(a), P(b), P(c), P(cos), P(sin), M(x), nullptr, nullptr);
    else rope<T, 1, false><<<blocks, threads, 0, st>>>(s, P(a), P(b), P(c), P(cos), P(sin), M(x), nullptr, nullptr);
  }
  return (int)cudaGetLastError();
}

int dispatch_rope(bool fwd, DType dt, const RopeShape& s, const void* a, const void* b, const void* c, const void* cos,
             const void* sin, void* x, void* y, void* z, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::F32: return launch_rope<float>(fwd, s, a, b, c, cos, sin, x, y, z, st);
    case DType::F16: return launch_rope<__half>(fwd, s, a, b, c, cos, sin, x, y, z, st);
    case DType::BF16: return launch_rope<__nv_bfloat16>(fwd, s, a, b, c, cos, sin, x, y, z, st);
  }
  return (int)cudaErrorInvalidValue;
}

template <class T>
int launch_swiglu(bool fwd, int64_t rows, int64_t F, const void* gu, const void* dact, void* out, cudaStream_t st) {
  if (rows <= 0 || F <= 0) return (int)cudaErrorInvalidValue;
  constexpr int VW = 16 / sizeof(T);
  bool wide = F % VW == 0;
  for (const void* p : {gu, dact, (const void*)out})
    if (p && !aligned(p, 16)) wide = false;
  const int64_t total = rows * (wide ? F / VW : F);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65536);
  const T* g = static_cast<const T*>(gu);
  T* o = static_cast<T*>(out);
  (fwd ? n_swiglu_fwd : n_swiglu_bwd)++;
  if (fwd) {
    if (wide) swiglu_fwd<T, VW><<<blocks, threads, 0, st>>>(rows, F, g, o);
    else swiglu_fwd<T, 1><<<blocks, threads, 0, st>>>(rows, F, g, o);
  } else {
    const T* d = static_cast<const T*>(dact);
    if (wide) swiglu_bwd<T, VW><<<blocks, threads, 0, st>>>(rows, F, g, d, o);
    else swiglu_bwd<T, 1><<<blocks, threads, 0, st>>>(rows, F, g, d, o);
  }
  return (int)cudaGetLastError();
}

int dispatch_swiglu(bool fwd, DType dt, int64_t rows, int64_t F, const void* gu, const void* dact, void* out,
                    void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::F32: return launch_swiglu<float>(fwd, rows, F, gu, dact, out, st);
    case DType::F16: return launch_swiglu<__half>(fwd, rows, F, gu, dact, out, st);
    case DType::BF16: return launch_swiglu<__nv_bfloat16>(fwd, rows, F, gu, dact, out, st);
  }
  return (int)cudaErrorInvalidValue;
}

}  // namespace

bool available() { return true; }

int rope_forward(DType dt, const RopeShape& s, const void* qkv, const void* cos, const void* sin, void* q, void* k,
                 void* v, void* stream) {
  return dispatch_rope(true, dt, s, qkv, nullptr, nullptr, cos, sin, q, k, v, stream);
}

int rope_backward(DType dt, const RopeShape& s, const void* gq, const void* gk, const void* gv, const void* cos,
                  const void* sin, void* gqkv, void* stream) {
  return dispatch_rope(false, dt, s, gq, gk, gv, cos, sin, gqkv, nullptr, nullptr, stream);
}

int swiglu_forward(DType dt, int64_t rows, int64_t F, const void* gu, void* act, void* stream) {
  return dispatch_swiglu(true, dt, rows, F, gu, nullptr, act, stream);
}

int swiglu_backward(DType dt, int64_t rows, int64_t F, const void* gu, const void* dact, void* dgu, void* stream) {
  return dispatch_swiglu(false, dt, rows, F, gu, dact, dgu, stream);
}

Launches launches() { return {n_rope_fwd.load(), n_rope_bwd.load(), n_swiglu_fwd.load(), n_swiglu_bwd.load()}; }

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace mmoc::engine::kernels
