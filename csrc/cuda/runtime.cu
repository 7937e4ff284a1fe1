// Runtime queries of the _C_cuda module (declared in cuda/launchers.h).
#include <cuda_runtime.h>

#include <string>

#include "cuda/launchers.h"

// String literal naming the architectures this module was compiled for, set by
// the build (e.g. -DPYOPT_CUDA_ARCHS="\"80-real;90-real;90-virtual\"").
#ifndef PYOPT_CUDA_ARCHS
#define PYOPT_CUDA_ARCHS "unknown"
#endif

namespace pyopt {
namespace cuda {

// ---------------------------------------------------------------------------
// Runtime queries for the whole _C_cuda module.

int device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string runtime_error() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cudaGetErrorString(err);
  }
  return count > 0 ? std::string() : std::string(cudaGetErrorString(cudaErrorNoDevice));
}

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

std::string cuda_archs() { return PYOPT_CUDA_ARCHS; }

}  // namespace cuda
}  // namespace pyopt
