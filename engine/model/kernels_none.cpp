// kernels.hpp without a CUDA compiler at build time: available() is false and the model uses ATen's ops.
#include "engine/model/kernels.hpp"

namespace mmoc::engine::kernels {
bool available() { return false; }
int rope_forward(DType, const RopeShape&, const void*, const void*, const void*, void*, void*, void*, void*) { return -1; }
int rope_backward(DType, const RopeShape&, const void*, const void*, const void*, const void*, const void*, void*, void*) {
  return -1;
}
int swiglu_forward(DType, int64_t, int64_t, const void*, void*, void*) { return -1; }
int swiglu_backward(DType, int64_t, int64_t, const void*, const void*, void*, void*) { return -1; }
Launches launches() { return {}; }
const char* error_string(int) { return "mmoc was built without a CUDA compiler (no kernels of its own)"; }
}  // namespace mmoc::engine::kernels
