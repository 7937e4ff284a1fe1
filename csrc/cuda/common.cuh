// Pieces every CUDA kernel family shares: storage <-> fp32 conversion on the
// device, and on the host the dtype dispatch, address casts and the device
// check that turns "no GPU" into a Python RuntimeError.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/optim_math.h"

namespace pyopt {
namespace cuda {

// ---------------------------------------------------------------- device
// Stores round to nearest even.
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// ---------------------------------------------------------------- host
template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<storage type>) for a pyopt::DType code.
template <typename F>
void dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kFloat32: return f(Tag<float>{});
    case kBFloat16: return f(Tag<__nv_bfloat16>{});
    case kFloat16: return f(Tag<__half>{});
    default: throw std::invalid_argument("pyopt CUDA: unknown dtype code " + std::to_string(code));
  }
}

template <typename T>
T* from_addr(int64_t addr) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(addr));
}

inline cudaStream_t to_stream(int64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
}

// Throws unless the runtime initializes and sees at least one device.
inline void require_device() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it so later calls do not report it again
    throw std::runtime_error(std::string("pyopt CUDA: no usable CUDA device: ") +
                             cudaGetErrorString(err));
  }
  if (count == 0) {
    throw std::runtime_error(std::string("pyopt CUDA: no usable CUDA device: ") +
                             cudaGetErrorString(cudaErrorNoDevice));
  }
}

}  // namespace cuda
}  // namespace pyopt
