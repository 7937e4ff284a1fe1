// Multi-tensor apply: one kernel launch updates many tensors.
//
// Follows apex/ATen multi_tensor_apply: the host packs, for up to kMaxTensors
// tensors, DEPTH device pointers each (param, grad, state...) plus a
// per-tensor scalar struct into one kernel-argument struct (< 4 KB), and every
// tensor is cut into fixed chunks of kChunkSize elements.
//
// One difference from ATen: instead of a block -> (tensor, chunk) map (5 bytes
// per block, capping a launch at 320 blocks = 21M elements), the struct holds
// each tensor's cumulative chunk count and the grid strides over all chunks of
// the launch. So a launch is only split when the tensor slots fill up (about
// 60-70 tensors), never because a tensor is large, and the grid is sized to
// what the GPU keeps resident, which avoids the partial last wave that a
// 320-block launch leaves on a 132-SM H100.
//
// Everything here is generic. An optimizer supplies an Op:
//
//   struct MyOp : OpDefaults {
//     using Lists = TypeList<P, P, S>;   // storage type of each pointer list
//     using PerTensor = MyScalars;       // per-tensor scalars (trivially copyable)
//     static constexpr unsigned kWriteMask = 0b101;  // lists stored back
//     // x[d] is one element of list d, loaded as float; update it in place.
//     // `s` is what chunk_scalars(per_tensor) returns (OpDefaults: the
//     // per-tensor scalars themselves).
//     __device__ void operator()(float (&x)[Lists::size],
//                                const PerTensor& s) const;
//   };
//
// OpDefaults also supplies skip() (true: the whole launch writes nothing,
// read once per block from device memory, e.g. GradScaler's found_inf) and a
// second write mask, kCondWriteMask, for lists stored only when
// cond_write() is true (the grad, when it is unscaled in place).
//
// Masks (pruned weights) are generic: a tensor may come with a uint8/bool
// mask of its shape; where the mask is 0, every list in kWriteMask is stored
// as an exact 0 after the update (param, states, a master's 16-bit copy), by
// the same block right after it updates the chunk (zero_masked).
//
// and the machinery does loading (16-byte vectors when aligned), fp32
// conversion, round-to-nearest-even stores, tails and unaligned tensors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/common.cuh"

#include <cstddef>
#include <cstdint>
#include <atomic>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

namespace pyopt {
namespace cuda {

// ---------------------------------------------------------------------------
// Launch geometry.

// 256 rather than ATen's 512: the 16-bit AMSGRAD kernels need ~70-86
// registers, which fits 3 blocks of 256 per SM but only 1 block of 512.
constexpr int kBlockSize = 256;
constexpr int64_t kChunkSize = 65536;  // elements per block iteration; a multiple of every ILP

// The classic kernel-parameter limit. CUDA >= 12.1 on sm_70+ allows 32764
// bytes, but staying under 4 KB keeps the launch cheap and portable.
constexpr size_t kMaxParamBytes = 4096;
// Bytes kept free for the Op (its per-call hyper-parameters).
constexpr size_t kOpParamBytes = 256;

// Defaults for the optional parts of an Op (see the top of this file).
struct OpDefaults {
  static constexpr unsigned kCondWriteMask = 0u;
  __device__ __forceinline__ bool skip() const { return false; }
  __device__ __forceinline__ bool cond_write() const { return false; }
  template <typename PerTensor>
  __device__ __forceinline__ const PerTensor& chunk_scalars(const PerTensor& s) const {
    return s;
  }
};

template <typename... Ts>
struct TypeList {
  static constexpr int size = sizeof...(Ts);
};

// Largest tensor count whose tables fit the budget. 32 bytes of slack cover
// the two counters and alignment padding; a static_assert checks the real
// sizeof in MultiTensorLauncher.
constexpr int max_tensors_for(int depth, size_t per_tensor_bytes) {
  const size_t per_tensor = (depth + 1) * sizeof(void*) + sizeof(int64_t) + sizeof(int32_t) +
                            per_tensor_bytes;
  return static_cast<int>((kMaxParamBytes - kOpParamBytes - 32) / per_tensor);
}

// Kernel argument: passed by value, lives in the constant parameter bank.
template <int DEPTH, typename PerTensor>
struct TensorListMeta {
  static constexpr int kDepth = DEPTH;
  static constexpr int kMaxTensors = max_tensors_for(DEPTH, sizeof(PerTensor));
  void* ptrs[DEPTH][kMaxTensors];
  const uint8_t* mask[kMaxTensors];    // nullptr: no mask
  int64_t numel[kMaxTensors];          // > 0 for every used slot
  PerTensor per_tensor[kMaxTensors];
  int32_t chunk_end[kMaxTensors];      // chunks of slots 0..t together (inclusive prefix sum)
  int32_t n_tensors;
  int32_t n_chunks;                    // == chunk_end[n_tensors - 1]
};

// N elements of T that are read and written with 16-byte accesses.
// N * sizeof(T) is a multiple of 16 (16 or 32 bytes here).
template <typename T, int N>
struct alignas(16) Pack {
  T val[N];
};

// ---------------------------------------------------------------------------
// Compile-time helpers over the list types.

template <typename... Ts>
constexpr size_t min_size_of() {
  size_t m = 16;
  ((m = sizeof(Ts) < m ? sizeof(Ts) : m), ...);
  return m;
}

template <typename List>
struct ListTraits;

template <typename... Ts>
struct ListTraits<TypeList<Ts...>> {
  // Elements per thread per iteration: one 16-byte access of the narrowest
  // type (4 floats, or 8 halves with the float lists read as 2 x 16 bytes).
  static constexpr int kILP = static_cast<int>(16 / min_size_of<Ts...>());
};

// ---------------------------------------------------------------------------
// One block processes elements [0, n) of its chunk. `base[d]` points at the
// chunk's first element of list d.

template <typename Op, typename S, typename... Ts, size_t... D>
__device__ __forceinline__ void process_chunk(const Op& op, void* const (&base)[sizeof...(Ts)],
                                              int n, const S& s, TypeList<Ts...>,
                                              std::index_sequence<D...>) {
  constexpr int kDepth = sizeof...(Ts);
  constexpr int kILP = ListTraits<TypeList<Ts...>>::kILP;
  constexpr unsigned kWrite = Op::kWriteMask;
  constexpr unsigned kCond = Op::kCondWriteMask;
  const bool cond = op.cond_write();  // uniform across the launch
  static_assert(kChunkSize % kILP == 0, "chunk starts must keep 16-byte alignment");

  // The vector path needs every pointer 16-byte aligned. A chunk starts at a
  // multiple of kChunkSize elements, so the chunk base is aligned iff the
  // tensor base is.
  uintptr_t addr_bits = 0;
  ((addr_bits |= reinterpret_cast<uintptr_t>(base[D])), ...);
  const bool aligned = (addr_bits % 16) == 0;

  int first_unvectorized = 0;
  if (aligned) {
    const int n_vec = n - n % kILP;
    for (int i = threadIdx.x * kILP; i < n_vec; i += blockDim.x * kILP) {
      float x[kILP][kDepth];
      // Load list D: one Pack per list, converted to fp32.
      (
          [&] {
            using T = Ts;
            const Pack<T, kILP> v =
                *reinterpret_cast<const Pack<T, kILP>*>(static_cast<const T*>(base[D]) + i);
#pragma unroll
            for (int k = 0; k < kILP; ++k) x[k][D] = to_float<T>(v.val[k]);
          }(),
          ...);
#pragma unroll
      for (int k = 0; k < kILP; ++k) op(x[k], s);
      (
          [&] {
            if constexpr (((kWrite | kCond) >> D) & 1u) {
              if (!((kWrite >> D) & 1u) && !cond) return;
              using T = Ts;
              Pack<T, kILP> v;
#pragma unroll
              for (int k = 0; k < kILP; ++k) v.val[k] = from_float<T>(x[k][D]);
              *reinterpret_cast<Pack<T, kILP>*>(static_cast<T*>(base[D]) + i) = v;
            }
          }(),
          ...);
    }
    first_unvectorized = n_vec;
  }

  // Scalar path: the tail after the vectors, or the whole chunk when some
  // pointer is misaligned. Each thread still keeps kScalarILP independent
  // elements in flight (strided by blockDim so accesses stay coalesced).
  // 4 rather than kILP: 8 x DEPTH guarded loads made ptxas spill at 128
  // registers for the 16-bit AMSGRAD kernels.
  constexpr int kScalarILP = 4;
  for (int i0 = first_unvectorized; i0 < n; i0 += blockDim.x * kScalarILP) {
    float x[kScalarILP][kDepth];
#pragma unroll
    for (int k = 0; k < kScalarILP; ++k) {
      const int i = i0 + threadIdx.x + k * blockDim.x;
      (
          [&] {
            using T = Ts;
            x[k][D] = i < n ? to_float<T>(static_cast<const T*>(base[D])[i]) : 0.0f;
          }(),
          ...);
    }
#pragma unroll
    for (int k = 0; k < kScalarILP; ++k) op(x[k], s);  // out-of-range lanes are computed, never stored
#pragma unroll
    for (int k = 0; k < kScalarILP; ++k) {
      const int i = i0 + threadIdx.x + k * blockDim.x;
      if (i < n) {
        (
            [&] {
              if constexpr (((kWrite | kCond) >> D) & 1u) {
                if (!((kWrite >> D) & 1u) && !cond) return;
                using T = Ts;
                static_cast<T*>(base[D])[i] = from_float<T>(x[k][D]);
              }
            }(),
            ...);
      }
    }
  }
}

// Masked positions of a chunk that process_chunk has just updated: every
// list in kWriteMask gets an exact 0 there. A second loop rather than a
// select inside the update: that select pushed most kernels past their
// 64-register budget into spills, while this loop re-touches only lines the
// block wrote a moment ago (still in L2) and reads each mask byte once.
template <typename Op, typename... Ts, size_t... D>
__device__ __forceinline__ void zero_masked(void* const (&base)[sizeof...(Ts)],
                                            const uint8_t* __restrict__ mask, int n,
                                            TypeList<Ts...>, std::index_sequence<D...>) {
  constexpr unsigned kWrite = Op::kWriteMask;
  __syncthreads();  // other threads of the block wrote these elements
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (mask[i] != 0) continue;
    (
        [&] {
          if constexpr ((kWrite >> D) & 1u) static_cast<Ts*>(base[D])[i] = from_float<Ts>(0.0f);
        }(),
        ...);
  }
}

// base[D] = start-th element of list D in tensor `slot` (typed, so the byte
// offset follows each list's element size).
template <typename Meta, typename... Ts, size_t... D>
__device__ __forceinline__ void chunk_bases(void* (&base)[sizeof...(Ts)], const Meta& meta,
                                            int slot, int64_t start, TypeList<Ts...>,
                                            std::index_sequence<D...>) {
  ((base[D] = static_cast<Ts*>(meta.ptrs[D][slot]) + start), ...);
}

template <typename Op>
using MetaFor = TensorListMeta<Op::Lists::size, typename Op::PerTensor>;

// Each block walks the launch's chunks blockIdx.x, blockIdx.x + gridDim.x, ...
// The only __syncthreads is in zero_masked, for masked chunks, and the whole
// block reaches it (every thread works on the same chunk); otherwise warps
// drift freely across chunk boundaries.
//
// __grid_constant__ lets the kernel index the (large) argument struct with a
// run-time tensor slot straight from the parameter bank instead of first
// copying all of it to local memory (sm_70+, CUDA >= 11.7).
template <typename Op>
__global__ void __launch_bounds__(kBlockSize, 4)
    multi_tensor_kernel(const __grid_constant__ MetaFor<Op> meta, const __grid_constant__ Op op) {
  constexpr int kDepth = Op::Lists::size;
  if (op.skip()) return;
  int slot = 0;
  for (int c = blockIdx.x; c < meta.n_chunks; c += gridDim.x) {
    // Chunks are visited in increasing order, so the slot only moves forward.
    while (c >= meta.chunk_end[slot]) ++slot;
    const int first_chunk = slot == 0 ? 0 : meta.chunk_end[slot - 1];
    const int64_t start = static_cast<int64_t>(c - first_chunk) * kChunkSize;
    const int64_t remaining = meta.numel[slot] - start;
    const int n = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);

    void* base[kDepth];
    chunk_bases(base, meta, slot, start, typename Op::Lists{}, std::make_index_sequence<kDepth>{});
    process_chunk(op, base, n, op.chunk_scalars(meta.per_tensor[slot]), typename Op::Lists{},
                  std::make_index_sequence<kDepth>{});
    // Uniform across the block: every thread works on this chunk.
    if (meta.mask[slot] != nullptr) {
      zero_masked<Op>(base, meta.mask[slot] + start, n, typename Op::Lists{},
                      std::make_index_sequence<kDepth>{});
    }
  }
}

// ---------------------------------------------------------------------------
// Host side: packs tensors into as few launches as the tables allow.
//
//   MultiTensorLauncher<Op> launcher(op, stream);
//   for (each tensor) launcher.add(ptrs, numel, per_tensor_scalars);
//   launcher.flush();
//
// Launches go to `stream` on the current device and are asynchronous; the
// argument struct is copied at launch, so it is refilled right away. Errors
// throw std::runtime_error (CUDA) or std::invalid_argument (sizes).
template <typename Op>
class MultiTensorLauncher {
 public:
  using Meta = MetaFor<Op>;
  static constexpr int kDepth = Op::Lists::size;
  static_assert(sizeof(Op) <= kOpParamBytes, "Op hyper-parameters exceed their budget");
  static_assert(sizeof(Meta) + sizeof(Op) <= kMaxParamBytes,
                "kernel arguments exceed the 4 KB parameter limit");
  static_assert(Meta::kMaxTensors >= 8, "too few tensors per launch for this depth");

  MultiTensorLauncher(const Op& op, cudaStream_t stream) : op_(op), stream_(stream) {
    std::memset(&meta_, 0, sizeof(meta_));  // unused slots are never read; zero them anyway
  }

  // numel <= 0 adds nothing. mask: uint8 [numel] (0 = pruned) or nullptr.
  void add(void* const (&ptrs)[kDepth], int64_t numel, const typename Op::PerTensor& s,
           const uint8_t* mask = nullptr) {
    if (numel <= 0) return;
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    if (chunks > INT32_MAX - meta_.n_chunks) {  // the int32 chunk counter would overflow
      if (chunks > INT32_MAX) throw std::invalid_argument("pyopt CUDA: tensor too large");
      flush();
    }
    const int slot = meta_.n_tensors++;
    for (int d = 0; d < kDepth; ++d) meta_.ptrs[d][slot] = ptrs[d];
    meta_.mask[slot] = mask;
    meta_.numel[slot] = numel;
    meta_.per_tensor[slot] = s;
    meta_.n_chunks += static_cast<int32_t>(chunks);
    meta_.chunk_end[slot] = meta_.n_chunks;
    if (meta_.n_tensors == Meta::kMaxTensors) flush();
  }

  void flush() {
    if (meta_.n_tensors == 0) return;
    const int grid = meta_.n_chunks < resident_blocks() ? meta_.n_chunks : resident_blocks();
    multi_tensor_kernel<Op><<<grid, kBlockSize, 0, stream_>>>(meta_, op_);
    check(cudaGetLastError(), "kernel launch");  // also clears the error
    meta_.n_tensors = 0;
    meta_.n_chunks = 0;
  }

 private:
  static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("pyopt CUDA ") + what + " failed: " +
                               cudaGetErrorString(err));
    }
  }

  // Blocks of this kernel the current device runs at once (SMs x blocks per
  // SM), cached per device: a grid of that size streams every chunk with no
  // partially filled last wave.
  int resident_blocks() {
    if (resident_ > 0) return resident_;
    constexpr int kMaxDevices = 64;
    static std::atomic<int> cache[kMaxDevices];  // zero-initialized: 0 = not computed yet
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    int value = dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
    if (value == 0) {
      int sms = 0, per_sm = 0;
      check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
            "cudaDeviceGetAttribute");
      check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, multi_tensor_kernel<Op>,
                                                          kBlockSize, 0),
            "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
      value = sms * (per_sm > 0 ? per_sm : 1);
      if (dev < kMaxDevices) cache[dev].store(value, std::memory_order_relaxed);
    }
    resident_ = value;
    return value;
  }

  Meta meta_;
  Op op_;
  cudaStream_t stream_;
  int resident_ = 0;  // resident_blocks() for this launcher's device
};

}  // namespace cuda
}  // namespace pyopt
