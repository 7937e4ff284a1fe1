// CUDA sparse linear: out[b, i] = bias[i] + sum_j W[i, j] * x[b, j] with W in
// one of the sparse layouts of pyopt/sparse/formats.py (csr, bitmask / nm, bsr).
//
// x is [B, K] and out is [B, N], both row-major and contiguous; x, the
// weight values, bias and out share one dtype (float32, bfloat16, float16).
// Products are accumulated in float32 and rounded once (round to nearest
// even) to the output dtype, as pyopt/_reference/sparse.py does. The order
// of the float32 additions differs from the reference, so results agree to
// rounding, not bitwise.
//
// Common shape of the kernels: blocks of kThreads = 256 threads (8 warps);
// a warp owns one output row (bsr: up to 4 rows) for a tile of BT batch rows
// (BT in {1, 2, 4, 8}, picked from B so that decode-sized batches do not
// waste accumulators), keeps BT float32 accumulators per lane, and reduces
// them across the warp with shuffles at the end. Batch tiles beyond gridDim.y
// are walked by a loop inside the kernel, so any B works; every offset into
// a tensor is 64-bit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace pyopt {
namespace cuda {
namespace {

constexpr int kThreads = 256;           // threads per block
constexpr int kWarps = kThreads / 32;   // warps per block
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxBatchTile = 8;        // accumulators per lane and row


// ---------------------------------------------------------------------------
// Device helpers.

// Sum over the 32 lanes of a warp; every lane gets the total. All 32 lanes
// must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Reduces acc[t] over the warp and stores out[(b0 + t) * N + row] for t < nb:
// lane t writes batch row t. All 32 lanes must call it.
template <typename T, int BT>
__device__ __forceinline__ void warp_store(T* __restrict__ out, const float (&acc)[BT],
                                           float bias_v, int64_t b0, int nb, int64_t N,
                                           int64_t row, int lane) {
#pragma unroll
  for (int t = 0; t < BT; ++t) {
    const float s = warp_sum(acc[t]);
    if (lane == t && t < nb) out[(b0 + t) * N + row] = from_float<T>(s + bias_v);
  }
}

// ---------------------------------------------------------------------------
// csr: one warp per (output row, batch tile). Lane l takes the row's
// nonzeros l, l + 32, ...: values and col_idx are read coalesced, x is
// gathered (columns ascend across the lanes, so dense-ish rows touch few
// sectors). I is uint16_t (the int16 storage read as unsigned) or int32_t.
template <typename T, typename I, int BT>
__global__ void __launch_bounds__(kThreads)
    csr_linear_kernel(T* __restrict__ out, const T* __restrict__ x,
                      const T* __restrict__ values, const int64_t* __restrict__ row_ptr,
                      const I* __restrict__ col_idx, const T* __restrict__ bias, int64_t B,
                      int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;  // the whole warp leaves: no shuffle below misses a lane

  const int64_t start = row_ptr[row];
  const int64_t end = row_ptr[row + 1];
  const float bias_v = bias != nullptr ? to_float(bias[row]) : 0.0f;
  const int64_t tiles = (B + BT - 1) / BT;

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t b0 = tile * BT;
    const int nb = static_cast<int>(B - b0 < BT ? B - b0 : BT);
    const T* __restrict__ xb = x + b0 * K;
    float acc[BT];
#pragma unroll
    for (int t = 0; t < BT; ++t) acc[t] = 0.0f;

    for (int64_t p = start + lane; p < end; p += 32) {
      const float v = to_float(values[p]);
      const int64_t c = static_cast<int64_t>(col_idx[p]);
#pragma unroll
      for (int t = 0; t < BT; ++t) {
        if (t < nb) acc[t] = __fmaf_rn(v, to_float(xb[t * K + c]), acc[t]);
      }
    }
    warp_store<T, BT>(out, acc, bias_v, b0, nb, N, row, lane);
  }
}

// ---------------------------------------------------------------------------
// bitmask (and nm): one warp per (output row, batch tile). The warp walks the
// row's 64-bit mask words in order; for word w, lane l owns columns
// 64w + l (low half) and 64w + 32 + l (high half). A lane whose bit is set
// finds its value at
//   offset of the word + popc(bits of the half below its lane)
// (the low half's count first for the high half), so the set lanes read
// consecutive values and consecutive x columns: both coalesced, no scan
// needed since every lane sees the whole word. The words are fetched 32 at
// a time, one per lane, and broadcast with a shuffle.
//
// Bits at columns >= K are masked off before counting, so the kernel reads
// the same (row, column) -> value pairing as the reference even if a mask
// had stray bits there, and never reads x past the row.
template <typename T, int BT>
__global__ void __launch_bounds__(kThreads)
    bitmask_linear_kernel(T* __restrict__ out, const T* __restrict__ x,
                          const T* __restrict__ values, const int64_t* __restrict__ row_ptr,
                          const uint64_t* __restrict__ bitmask, const T* __restrict__ bias,
                          int64_t B, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;  // warp-uniform

  const int64_t words = (K + 63) / 64;
  const uint64_t* __restrict__ mrow = bitmask + row * words;
  const int64_t vstart = row_ptr[row];
  const float bias_v = bias != nullptr ? to_float(bias[row]) : 0.0f;
  const unsigned below = (1u << lane) - 1u;  // lanes < lane
  const int tail_bits = static_cast<int>(K & 63);  // valid bits of the last word; 0 = all
  const int64_t tiles = (B + BT - 1) / BT;

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t b0 = tile * BT;
    const int nb = static_cast<int>(B - b0 < BT ? B - b0 : BT);
    const T* __restrict__ xb = x + b0 * K;
    float acc[BT];
#pragma unroll
    for (int t = 0; t < BT; ++t) acc[t] = 0.0f;

    int64_t off = vstart;  // value index of the current word's first set bit
    for (int64_t w0 = 0; w0 < words; w0 += 32) {
      const int64_t my_w = w0 + lane;
      uint64_t mine = 0;
      if (my_w < words) {
        mine = mrow[my_w];
        if (my_w == words - 1 && tail_bits != 0) mine &= (uint64_t{1} << tail_bits) - 1u;
      }
      const int nw = static_cast<int>(words - w0 < 32 ? words - w0 : 32);
      for (int k = 0; k < nw; ++k) {  // nw is warp-uniform: every lane shuffles
        const uint64_t m = __shfl_sync(kFullMask, mine, k);
        if (m == 0) continue;  // warp-uniform
        const unsigned lo = static_cast<unsigned>(m);
        const unsigned hi = static_cast<unsigned>(m >> 32);
        const int64_t col = (w0 + k) * 64 + lane;
        if ((lo >> lane) & 1u) {
          const float v = to_float(values[off + __popc(lo & below)]);
#pragma unroll
          for (int t = 0; t < BT; ++t) {
            if (t < nb) acc[t] = __fmaf_rn(v, to_float(xb[t * K + col]), acc[t]);
          }
        }
        off += __popc(lo);
        if ((hi >> lane) & 1u) {
          const float v = to_float(values[off + __popc(hi & below)]);
#pragma unroll
          for (int t = 0; t < BT; ++t) {
            if (t < nb) acc[t] = __fmaf_rn(v, to_float(xb[t * K + col + 32]), acc[t]);
          }
        }
        off += __popc(hi);
      }
    }
    warp_store<T, BT>(out, acc, bias_v, b0, nb, N, row, lane);
  }
}

// ---------------------------------------------------------------------------
// bsr: one block per (block row, chunk of 8 * RPW rows inside it, batch
// tile). A block row is a list of nblk blocks of bh x bw; flatten its
// columns as e = p * bw + j (block p of the row, column j inside it), so the
// row's inputs are x[b, block_col[p] * bw + j] for e in [0, nblk * bw).
// That flat range is walked in chunks of kThreads: thread e stages
// x[b0 .. b0 + BT, column of e] into shared memory, with the offset of
// values[p, 0, j]; then warp w computes rows w, w + 8, ... (RPW of them) of
// the chunk, lanes striding over e: value (p, i, j) sits at
// voff[e] + i * bw, contiguous in e inside a block, so the loads coalesce,
// and each staged x is reused by every row of the block row in this block.
// Nothing is divided in the loop: a thread's (p, j) advances by kThreads
// incrementally.
template <typename T, int BT, int RPW>
__global__ void __launch_bounds__(kThreads)
    bsr_linear_kernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ values,
                      const int64_t* __restrict__ block_row_ptr,
                      const int32_t* __restrict__ block_col, const T* __restrict__ bias,
                      int64_t B, int64_t N, int64_t K, int bh, int bw, int row_chunks) {
  __shared__ float xs[BT][kThreads];
  __shared__ int64_t voff[kThreads];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t br = blockIdx.x / row_chunks;
  const int first_i = static_cast<int>(blockIdx.x % row_chunks) * (kWarps * RPW) + warp;

  const int64_t pbase = block_row_ptr[br];
  const int64_t nblk = block_row_ptr[br + 1] - pbase;
  const int64_t total = nblk * bw;       // flat columns of this block row
  const int64_t blk_elems = static_cast<int64_t>(bh) * bw;
  const int step_p = kThreads / bw;      // (p, j) advance per chunk: kThreads = step_p * bw + step_j
  const int step_j = kThreads % bw;
  const int64_t tiles = (B + BT - 1) / BT;

  float bias_v[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int i = first_i + r * kWarps;
    bias_v[r] = (bias != nullptr && i < bh) ? to_float(bias[br * bh + i]) : 0.0f;
  }

  // Every loop bound below depends on blockIdx only, so all threads reach
  // each __syncthreads.
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t b0 = tile * BT;
    const int nb = static_cast<int>(B - b0 < BT ? B - b0 : BT);
    const T* __restrict__ xb = x + b0 * K;
    float acc[RPW][BT];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
#pragma unroll
      for (int t = 0; t < BT; ++t) acc[r][t] = 0.0f;
    }

    int64_t p = tid / bw;  // flat index e0 + tid == p * bw + j
    int j = tid % bw;
    for (int64_t e0 = 0; e0 < total; e0 += kThreads) {
      if (p < nblk) {  // <=> e0 + tid < total
        const int64_t pg = pbase + p;
        const int64_t col = static_cast<int64_t>(block_col[pg]) * bw + j;
        voff[tid] = pg * blk_elems + j;
#pragma unroll
        for (int t = 0; t < BT; ++t) xs[t][tid] = t < nb ? to_float(xb[t * K + col]) : 0.0f;
      }
      __syncthreads();
      const int len = static_cast<int>(total - e0 < kThreads ? total - e0 : kThreads);
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const int i = first_i + r * kWarps;
        if (i < bh) {  // warp-uniform
          const T* __restrict__ vrow = values + static_cast<int64_t>(i) * bw;
          for (int e = lane; e < len; e += 32) {
            const float v = to_float(vrow[voff[e]]);
#pragma unroll
            for (int t = 0; t < BT; ++t) acc[r][t] = __fmaf_rn(v, xs[t][e], acc[r][t]);
          }
        }
      }
      __syncthreads();  // the next chunk overwrites xs and voff
      p += step_p;
      j += step_j;
      if (j >= bw) {  // j + step_j < 2 * bw: one wrap at most
        j -= bw;
        ++p;
      }
    }

#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int i = first_i + r * kWarps;
      if (i < bh) warp_store<T, BT>(out, acc[r], bias_v[r], b0, nb, N, br * bh + i, lane);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Batch tile: the smallest of 1, 2, 4, 8 that covers min(B, 8).
template <typename F>
void dispatch_batch_tile(int64_t B, F&& f) {
  if (B >= 5) return f(std::integral_constant<int, 8>{});
  if (B >= 3) return f(std::integral_constant<int, 4>{});
  if (B == 2) return f(std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 1>{});
}
static_assert(kMaxBatchTile == 8, "dispatch_batch_tile tops out at 8");

// f(Tag<storage type>, integral_constant<batch tile>): the two template
// parameters every sparse kernel is instantiated over.
template <typename F>
void dispatch_kernel(int dtype, int64_t B, F&& f) {
  dispatch_dtype(dtype, [&](auto tag) { dispatch_batch_tile(B, [&](auto bt) { f(tag, bt); }); });
}

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it so later calls do not report it again
    throw std::runtime_error("pyopt CUDA " + what + " failed: " + cudaGetErrorString(err));
  }
}

// SM count of the current device, cached per device.
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0 = not queried yet
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  int value = dev >= 0 && dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    check(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, dev),
          "cudaDeviceGetAttribute");
    if (value <= 0) value = 1;
    if (dev >= 0 && dev < kMaxDevices) cache[dev].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Grid for grid_x blocks per batch tile and `tiles` batch tiles. gridDim.y
// takes as many tiles as keep about 32 blocks per SM in flight (the rest
// are looped over in the kernel, reusing the weights from cache), capped at
// 65535 and at `tiles`.
dim3 make_grid(int64_t grid_x, int64_t tiles, const char* name) {
  if (grid_x > INT32_MAX) {
    throw std::invalid_argument(std::string("pyopt CUDA ") + name + ": too many output rows");
  }
  const int64_t target = static_cast<int64_t>(sm_count()) * 32;
  int64_t y = (target + grid_x - 1) / grid_x;
  if (y > tiles) y = tiles;
  if (y > 65535) y = 65535;
  if (y < 1) y = 1;
  return dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(y), 1);
}

void check_launch(const char* name) {
  check(cudaGetLastError(), std::string(name) + " kernel launch");
}

void check_sizes(const char* name, int64_t B, int64_t N, int64_t K, int dtype) {
  if (B < 0 || N < 0 || K < 0) {
    throw std::invalid_argument(std::string("pyopt CUDA ") + name +
                                ": B, N and K must be >= 0");
  }
  if (dtype < kFloat32 || dtype > kFloat16) {
    throw std::invalid_argument(std::string("pyopt CUDA ") + name + ": unknown dtype code " +
                                std::to_string(dtype));
  }
}

}  // namespace

void sparse_csr_linear(int64_t out, int64_t x, int64_t values, int64_t row_ptr, int64_t col_idx,
                       int idx_bits, int64_t bias, int64_t B, int64_t N, int64_t K, int dtype,
                       int64_t stream) {
  constexpr const char* kName = "sparse_csr_linear";
  check_sizes(kName, B, N, K, dtype);
  if (idx_bits != 16 && idx_bits != 32) {
    throw std::invalid_argument("pyopt CUDA sparse_csr_linear: idx_bits must be 16 or 32, got " +
                                std::to_string(idx_bits));
  }
  if (B == 0 || N == 0) return;
  require_device();
  const dim3 block(kThreads);
  const cudaStream_t s = to_stream(stream);
  dispatch_kernel(dtype, B, [&](auto tag, auto bt) {
    using T = typename decltype(tag)::type;
    constexpr int BT = decltype(bt)::value;
    const dim3 grid = make_grid((N + kWarps - 1) / kWarps, (B + BT - 1) / BT, kName);
    const auto go = [&](auto idx_tag) {
      using I = typename decltype(idx_tag)::type;
      csr_linear_kernel<T, I, BT><<<grid, block, 0, s>>>(
          from_addr<T>(out), from_addr<const T>(x), from_addr<const T>(values),
          from_addr<const int64_t>(row_ptr), from_addr<const I>(col_idx),
          from_addr<const T>(bias), B, N, K);
    };
    if (idx_bits == 16) go(Tag<uint16_t>{});
    else go(Tag<int32_t>{});
  });
  check_launch(kName);
}

void sparse_bitmask_linear(int64_t out, int64_t x, int64_t values, int64_t row_ptr,
                           int64_t bitmask, int64_t bias, int64_t B, int64_t N, int64_t K,
                           int dtype, int64_t stream) {
  constexpr const char* kName = "sparse_bitmask_linear";
  check_sizes(kName, B, N, K, dtype);
  if (B == 0 || N == 0) return;
  require_device();
  const dim3 block(kThreads);
  const cudaStream_t s = to_stream(stream);
  dispatch_kernel(dtype, B, [&](auto tag, auto bt) {
    using T = typename decltype(tag)::type;
    constexpr int BT = decltype(bt)::value;
    const dim3 grid = make_grid((N + kWarps - 1) / kWarps, (B + BT - 1) / BT, kName);
    bitmask_linear_kernel<T, BT><<<grid, block, 0, s>>>(
        from_addr<T>(out), from_addr<const T>(x), from_addr<const T>(values),
        from_addr<const int64_t>(row_ptr), from_addr<const uint64_t>(bitmask),
        from_addr<const T>(bias), B, N, K);
  });
  check_launch(kName);
}

void sparse_bsr_linear(int64_t out, int64_t x, int64_t values, int64_t block_row_ptr,
                       int64_t block_col, int64_t bias, int64_t B, int64_t N, int64_t K,
                       int64_t bh, int64_t bw, int dtype, int64_t stream) {
  constexpr const char* kName = "sparse_bsr_linear";
  check_sizes(kName, B, N, K, dtype);
  if (bh < 1 || bw < 1 || bh > INT32_MAX || bw > INT32_MAX) {
    throw std::invalid_argument("pyopt CUDA sparse_bsr_linear: block sizes must be >= 1, got " +
                                std::to_string(bh) + "x" + std::to_string(bw));
  }
  if (N % bh != 0 || K % bw != 0) {
    throw std::invalid_argument("pyopt CUDA sparse_bsr_linear: N % bh and K % bw must be 0, got "
                                "N=" + std::to_string(N) + " K=" + std::to_string(K) +
                                " block " + std::to_string(bh) + "x" + std::to_string(bw));
  }
  if (B == 0 || N == 0) return;
  require_device();
  const dim3 block(kThreads);
  const cudaStream_t s = to_stream(stream);
  const int64_t block_rows = N / bh;
  // Rows per warp: enough for one block to cover a block row of up to 32 rows.
  const int rpw = bh <= kWarps ? 1 : (bh <= 2 * kWarps ? 2 : 4);
  const int64_t row_chunks = (bh + kWarps * rpw - 1) / (kWarps * rpw);
  if (block_rows > INT32_MAX / row_chunks) {
    throw std::invalid_argument("pyopt CUDA sparse_bsr_linear: too many output rows");
  }
  dispatch_kernel(dtype, B, [&](auto tag, auto bt) {
    using T = typename decltype(tag)::type;
    constexpr int BT = decltype(bt)::value;
    const dim3 grid = make_grid(block_rows * row_chunks, (B + BT - 1) / BT, kName);
    const auto go = [&](auto rpw_c) {
      constexpr int RPW = decltype(rpw_c)::value;
      bsr_linear_kernel<T, BT, RPW><<<grid, block, 0, s>>>(
          from_addr<T>(out), from_addr<const T>(x), from_addr<const T>(values),
          from_addr<const int64_t>(block_row_ptr), from_addr<const int32_t>(block_col),
          from_addr<const T>(bias), B, N, K, static_cast<int>(bh), static_cast<int>(bw),
          static_cast<int>(row_chunks));
    };
    if (rpw == 1) go(std::integral_constant<int, 1>{});
    else if (rpw == 2) go(std::integral_constant<int, 2>{});
    else go(std::integral_constant<int, 4>{});
  });
  check_launch(kName);
}

}  // namespace cuda
}  // namespace pyopt
