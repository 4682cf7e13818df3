// Private to engine/comm: error checks for the NCCL/CUDA code, in the manner of NCCL's checks.h, but throwing
// mmoc::comm::CommError carrying file, line, the failed call and ncclGetErrorString / cudaGetErrorString.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <string>

#include "engine/comm/world.hpp"

namespace mmoc::comm::detail {

[[noreturn]] inline void throw_nccl(ncclResult_t r, ncclComm_t comm, const char* call, const char* file, int line) {
  std::string msg = std::string("NCCL failure ") + file + ":" + std::to_string(line) + " '" + call +
                    "': " + ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last && *last) msg += std::string(" (") + last + ")";
  throw CommError(msg);
}

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  throw CommError(std::string("CUDA failure ") + file + ":" + std::to_string(line) + " '" + call +
                  "': " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

}  // namespace mmoc::comm::detail

// MMOC_NCCL_CHECK(call): throws CommError unless call returns ncclSuccess (or ncclInProgress for
// non-blocking communicators). MMOC_NCCL_CHECK_COMM(call, comm) also appends ncclGetLastError(comm).
#define MMOC_NCCL_CHECK_COMM(cmd, nccl_comm)                                              \
  do {                                                                               \
    ncclResult_t mmoc_r_ = (cmd);                                                    \
    if (mmoc_r_ != ncclSuccess && mmoc_r_ != ncclInProgress)                         \
      ::mmoc::comm::detail::throw_nccl(mmoc_r_, (nccl_comm), #cmd, __FILE__, __LINE__);   \
  } while (0)
#define MMOC_NCCL_CHECK(cmd) MMOC_NCCL_CHECK_COMM(cmd, nullptr)

#define MMOC_CUDA_CHECK(cmd)                                                  \
  do {                                                                        \
    cudaError_t mmoc_e_ = (cmd);                                              \
    if (mmoc_e_ != cudaSuccess)                                               \
      ::mmoc::comm::detail::throw_cuda(mmoc_e_, #cmd, __FILE__, __LINE__);    \
  } while (0)
