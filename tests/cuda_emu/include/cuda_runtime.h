// Host emulation of the CUDA runtime subset that csrc/cuda/optim.cu uses, so
// the optimizer kernels' own source runs on the CPU in tests (tests/cuda_emu).
//
// A launch runs synchronously: block after block, each block as blockDim
// fibers (ucontext) on the calling thread, switched only at __syncthreads, so
// the barrier is real and every run is deterministic. Device memory is host
// memory. What this cannot show: nvcc's code generation, the device memory
// model, races between threads or blocks, register limits, streams and CUDA
// graphs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorNoDevice = 100 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace emu {

// The current device is PYOPT_EMU_DEVICE (default 0); device d has d + 1
// SMs of one resident block each, so tests pick the grid of a launch by
// device (the launcher caches the geometry per device).
inline int current_device() {
  const char* s = std::getenv("PYOPT_EMU_DEVICE");
  return s != nullptr ? std::atoi(s) : 0;
}

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  bool done = false;
};

inline thread_local ucontext_t scheduler;
inline thread_local Fiber* running = nullptr;
inline thread_local const std::function<void()>* body = nullptr;
inline thread_local std::exception_ptr error;

inline void fiber_main() {
  try {
    (*body)();
  } catch (...) {
    if (!error) error = std::current_exception();
  }
  running->done = true;
  swapcontext(&running->ctx, &scheduler);  // never resumed
}

// kernel() runs as every thread of every block, in order of blocks. Within a
// block every fiber runs to its next __syncthreads (or its end) in turn; a
// block in which some threads end while others wait at a barrier is an error
// (a divergent __syncthreads: undefined on a GPU).
template <typename F>
void launch(dim3 grid, dim3 block, size_t, cudaStream_t, const F& kernel) {
  constexpr size_t kStack = 256 * 1024;
  const unsigned n = block.x * block.y * block.z;
  const std::function<void()> fn = kernel;
  std::vector<Fiber> fibers(n);
  for (auto& f : fibers) f.stack.reset(new char[kStack]);
  body = &fn;
  error = nullptr;
  for (unsigned b = 0; b < grid.x; ++b) {
    for (auto& f : fibers) {
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
    }
    blockIdx = dim3(b);
    blockDim = block;
    gridDim = grid;
    unsigned live = n;  // fibers not yet at their end: all of them, or none
    while (live != 0) {
      live = 0;
      for (unsigned t = 0; t < n; ++t) {
        if (fibers[t].done) continue;
        threadIdx = dim3(t);
        running = &fibers[t];
        swapcontext(&scheduler, &fibers[t].ctx);
        live += fibers[t].done ? 0 : 1;
      }
      if (error) std::rethrow_exception(error);
      if (live != 0 && live != n) throw std::logic_error("cuda_emu: divergent __syncthreads");
    }
  }
}

}  // namespace emu

inline void __syncthreads() { swapcontext(&emu::running->ctx, &emu::scheduler); }

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaErrorNoDevice ? "no CUDA-capable device is detected" : "emulated error";
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::current_device();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int dev) {
  *v = dev + 1;
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = 1;
  return cudaSuccess;
}
