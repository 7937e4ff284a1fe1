// CUDA quantized linear: out[b, n] = bias[n] + sum_k x[b, k] * W[n, k] with W
// in one of the quantized layouts of pyopt/quant/formats.py:
//
//   qtype 0: int8  [N, K]     q signed, W = q * scale (+ offset)
//   qtype 1: uint8 [N, K]     q unsigned, W = q * scale + offset
//   qtype 2: uint8 [N, K/2]   4-bit nibbles in 64-element blocks: byte i of a
//                             32-byte block holds element i (low nibble) and
//                             i + 32 (high); a final block of t < 64 elements
//                             holds i and i + t/2
//
// scale and offset are float32 [N, G] (offset optional), G groups of K / G
// elements per row (a multiple of 32, or G == 1 with any K). x [B, K], out
// [B, N] and bias [N] share one dtype (float32, bfloat16, float16).
//
// act 0 (weight-only): W is dequantized in float32 exactly as the reference
// does (q * scale rounded, then + offset rounded), multiplied with x in
// float32 and rounded once to the dtype. Two kernels:
//   * wo_gemv_kernel (B <= kGemvMaxBatch): a warp per output row and batch
//     tile of up to 8 rows; lanes stride over the row in 16-byte weight
//     chunks (16 int8 or 32 int4 weights per load) when the rows are 16-byte
//     aligned, element by element otherwise.
//   * wo_tiled_kernel: 64 x 64 output tiles, K in steps of 32; x and the
//     dequantized weights are staged in shared memory as float32 (two
//     buffers, the next step is fetched into registers while the current
//     one is multiplied), 4 x 4 outputs per thread.
//
// act 1 (W8A8 / W4A8, pyopt/_reference/quant.py with act="int8"):
//   * quantize_rows_kernel quantizes x per token into the caller's
//     workspaces, exactly as formats.quantize_per_token: qx int8 [B, K],
//     sx float32 [B], xs int32 [B, G] (the per-group sums of qx).
//   * w8a8_gemm_kernel multiplies with mma.sync m16n8k32 (int8 inputs, int32
//     accumulation): the weight tile is operand A (16 weight rows per mma,
//     u8 for qtypes 1 and 2, s8 for qtype 0), qx is operand B (8 batch rows
//     per mma, s8). K is walked in stages of 64 through a 3-stage cp.async
//     pipeline; 4-bit weights stay packed in shared memory and are unpacked
//     to u8 in registers (one 32-bit load gives the low nibbles of k-step 0
//     and the high nibbles of k-step 1). After each group's last k-step the
//     int32 sums are folded into float32:
//       acc += scale[n, g] * dot + offset[n, g] * xs[b, g]
//     and at the end out = bias + sx[b] * acc. Long groups are also folded
//     every kFlushSteps k-steps so that the int32 sums cannot overflow.
//
// Every offset into a tensor is 64-bit. Batch tiles beyond gridDim.y are
// walked by a loop inside each kernel, so any B works. Launches go on the
// caller's stream and nothing synchronizes.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cfloat>
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

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kQ4 = 2;                 // qtype of the packed 4-bit layout

constexpr int kThreads = 256;          // quantize, gemv and tiled kernels
constexpr int kWarps = kThreads / 32;
constexpr int kGemvMaxBatch = 16;      // act 0: larger batches take the tiled kernel

// w8a8 GEMM
constexpr int kStages = 3;             // cp.async pipeline depth
constexpr int kStageK = 64;            // K elements per stage (two mma k-steps)
constexpr int kStepK = 32;             // K of one mma
constexpr int kRowPad = 16;            // bytes after each shared row: no bank conflicts
constexpr int kFlushSteps = 1024;      // 127 * 255 * 32 * 1024 < 2^31

// wo_tiled_kernel
constexpr int kTileB = 64;             // batch rows per tile
constexpr int kTileN = 64;             // output columns per tile
constexpr int kTileK = 32;             // K per step

// ---------------------------------------------------------------------------
// PTX primitives (sm_80 and newer): cp.async and the int8 mma. The only
// inline assembly in the file.

// 16-byte global -> shared copy that bypasses L1 (cp.async.cg).
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// d += A * B for one m16n8k32 tile: A 16 x 32 row-major (u8 when kUnsignedA,
// else s8), B 32 x 8 column-major s8, d 16 x 8 s32. With groupID g = lane / 4
// and t = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k32"): a[0] holds
// A[g][4t .. 4t+3], a[1] A[g+8][4t ..], a[2] A[g][16+4t ..], a[3]
// A[g+8][16+4t ..]; b[0] holds B[4t .. 4t+3][g], b[1] B[16+4t ..][g]; d[i] is
// D[g + 8 * (i / 2)][2t + i % 2]. The lowest byte of a register is the
// lowest k.
template <bool kUnsignedA>
__device__ __forceinline__ void mma_m16n8k32(int (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  if constexpr (kUnsignedA) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// ---------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ int warp_or(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The weight dequantization of formats.dequantize: q * scale rounded, then
// + offset rounded (offset 0 when the layout has none).
__device__ __forceinline__ float dequant(int q, float s, float o) {
  return __fadd_rn(__fmul_rn(static_cast<float>(q), s), o);
}

// q of element k of a weight row (row points at the row's first byte; for
// the 4-bit layout K is the row's element count).
template <int QT>
__device__ __forceinline__ int weight_at(const uint8_t* __restrict__ row, int k, int K) {
  if constexpr (QT == 0) {
    return static_cast<int8_t>(row[k]);
  } else if constexpr (QT == 1) {
    return row[k];
  } else {
    const int base = k & ~63;                            // block start
    const int h = (K - base < 64 ? K - base : 64) >> 1;  // bytes in the block
    const int e = k - base;
    const unsigned v = row[(base >> 1) + (e < h ? e : e - h)];
    return static_cast<int>(e < h ? v & 15u : v >> 4);
  }
}

__device__ __forceinline__ uint32_t byte_of(uint4 v, int i) {
  const uint32_t w = i < 4 ? v.x : i < 8 ? v.y : i < 12 ? v.z : v.w;
  return (w >> (8 * (i & 3))) & 0xffu;
}

// 16 consecutive elements of x (16-byte aligned) as float32.
template <typename T>
__device__ __forceinline__ void load16(const T* __restrict__ p, float (&f)[16]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
#pragma unroll
  for (int v = 0; v < 16 / kPer; ++v) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + v);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < kPer; ++i) f[v * kPer + i] = to_float<T>(e[i]);
  }
}

// ---------------------------------------------------------------------------
// act 1, step 1: per-token quantization of x, one block per row of x (rows
// beyond gridDim.x looped). Pass 1 finds amax = max |x| over the row and
// whether any value is NaN or inf; pass 2 writes qx and the per-group sums
// xs: with G == 1 the whole block reduces the one sum, otherwise warp w
// takes groups w, w + 8, ... (each group is a multiple of 32 elements).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ qx,
                         float* __restrict__ sx, int32_t* __restrict__ xs, int64_t B, int K,
                         int G, int gs) {
  __shared__ float red_max[kWarps];
  __shared__ int red_bad[kWarps];
  __shared__ int red_sum[kWarps];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const T* __restrict__ xr = x + b * K;
    int8_t* __restrict__ qr = qx + b * K;

    float m = 0.0f;
    int bad = 0;
    for (int k = tid; k < K; k += kThreads) {
      const float v = fabsf(to_float<T>(xr[k]));
      if (v <= FLT_MAX) m = fmaxf(m, v);
      else bad = 1;  // NaN or inf
    }
    m = warp_max(m);
    bad = warp_or(bad);
    if (lane == 0) {
      red_max[warp] = m;
      red_bad[warp] = bad;
    }
    __syncthreads();
    float amax = red_max[0];
    int any_bad = red_bad[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      amax = fmaxf(amax, red_max[w]);
      any_bad |= red_bad[w];
    }
    // formats.quantize_per_token: inv = 127 / amax (0 when amax is 0),
    // sx = amax / 127; a non-finite row gets sx = NaN and qx = 0.
    const float inv = (any_bad || !(amax > 0.0f)) ? 0.0f : __fdiv_rn(127.0f, amax);
    if (tid == 0) sx[b] = any_bad ? __int_as_float(0x7fc00000) : __fdiv_rn(amax, 127.0f);

    const auto quant = [&](int k) {
      int q = __float2int_rn(__fmul_rn(to_float<T>(xr[k]), inv));  // half to even
      q = q < -127 ? -127 : (q > 127 ? 127 : q);
      if (any_bad) q = 0;
      qr[k] = static_cast<int8_t>(q);
      return q;
    };
    if (G == 1) {
      int s = 0;
      for (int k = tid; k < K; k += kThreads) s += quant(k);
      s = warp_sum_int(s);
      if (lane == 0) red_sum[warp] = s;
      __syncthreads();
      if (tid == 0) {
        int total = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) total += red_sum[w];
        xs[b] = total;
      }
    } else {
      for (int g = warp; g < G; g += kWarps) {
        int s = 0;
        const int end = (g + 1) * gs;
        for (int k = g * gs + lane; k < end; k += 32) s += quant(k);
        s = warp_sum_int(s);
        if (lane == 0) xs[b * G + g] = s;
      }
    }
    __syncthreads();  // the next row reuses red_*
  }
}

// ---------------------------------------------------------------------------
// act 1, step 2: int8 tensor-core GEMM. Block tile: BW = WN * MT * 16 weight
// rows (output columns n) x BX = WX * NT * 8 batch rows; warp (wn, wx) owns
// MT x NT mma tiles. Per stage of 64 K elements the block stages
//   sw[BW][WB + pad]: weight bytes (WB = 64; 4-bit: 32 packed bytes, always
//                     in the full-block order, the partial block repacked),
//   sq[BX][64 + pad]: qx bytes,
// zero-filled past N, B and K, so padded products add nothing. Rows of 80
// (or 48) bytes put the 8 rows x 4 words a fragment load touches into 32
// distinct banks.
template <typename T, int QT, int WN, int WX, int MT, int NT>
__global__ void __launch_bounds__(WN * WX * 32, 1)  // 1: no register cap, no spills
    w8a8_gemm_kernel(T* __restrict__ out, const int8_t* __restrict__ qx,
                     const float* __restrict__ sx, const int32_t* __restrict__ xs,
                     const uint8_t* __restrict__ qw, const float* __restrict__ scale,
                     const float* __restrict__ offset, const T* __restrict__ bias, int64_t B,
                     int64_t N, int K, int G, int steps_per_group, bool vec_w, bool vec_x) {
  constexpr int kBlockThreads = WN * WX * 32;
  constexpr int BW = WN * MT * 16;
  constexpr int BX = WX * NT * 8;
  constexpr int WB = QT == kQ4 ? kStageK / 2 : kStageK;  // weight bytes per row and stage
  constexpr int WS = WB + kRowPad;
  constexpr int XS = kStageK + kRowPad;
  constexpr int WCH = WB / 16;                           // 16-byte chunks per weight row
  constexpr int XCH = kStageK / 16;
  __shared__ __align__(16) uint8_t sw[kStages][BW][WS];
  __shared__ __align__(16) uint8_t sq[kStages][BX][XS];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int gid = lane >> 2;   // mma groupID
  const int tig = lane & 3;    // mma threadID_in_group
  const int wn = warp % WN;
  const int wx = warp / WN;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BW;
  const int64_t row_bytes = QT == kQ4 ? K / 2 : K;
  const int stages = (K + kStageK - 1) / kStageK;
  const int steps = (K + kStepK - 1) / kStepK;
  const int64_t tiles = (B + BX - 1) / BX;

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t b0 = tile * BX;

    // Global -> shared for stage kt into buffer buf: cp.async where the
    // 16-byte chunk is in bounds and aligned, byte loads otherwise.
    const auto load_stage = [&](int buf, int kt) {
      for (int c = tid; c < BW * WCH; c += kBlockThreads) {
        const int r = c / WCH;
        const int ch = c % WCH;
        const int64_t n = n0 + r;
        uint8_t* dst = &sw[buf][r][ch * 16];
        if (n >= N) {
          *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
          continue;
        }
        const uint8_t* __restrict__ src = qw + n * row_bytes;
        uint32_t w[4] = {0u, 0u, 0u, 0u};
        if constexpr (QT != kQ4) {
          const int k = kt * kStageK + ch * 16;
          if (vec_w) {  // K % 16 == 0: a chunk is all in or all out
            if (k < K) {
              cp_async16(dst, src + k);
              continue;
            }
          } else {
#pragma unroll
            for (int j = 0; j < 16; ++j) {
              if (k + j < K) w[j >> 2] |= static_cast<uint32_t>(src[k + j]) << (8 * (j & 3));
            }
          }
        } else {
          const int base = kt * kStageK;
          const int t = K - base < kStageK ? K - base : kStageK;  // elements in the block
          const uint8_t* __restrict__ blk = src + base / 2;
          if (t == kStageK) {
            if (vec_w) {
              cp_async16(dst, blk + ch * 16);
              continue;
            }
#pragma unroll
            for (int j = 0; j < 16; ++j) {
              w[j >> 2] |= static_cast<uint32_t>(blk[ch * 16 + j]) << (8 * (j & 3));
            }
          } else {
            // Partial block: element e is nibble (e < h ? low of byte e : high
            // of byte e - h); repack to the full-block order (byte j: element
            // j low, j + 32 high).
            const int h = t >> 1;
#pragma unroll
            for (int j = 0; j < 16; ++j) {
              const int lo = ch * 16 + j;
              const int hi = lo + 32;
              uint32_t v = 0;
              if (lo < t) v |= lo < h ? blk[lo] & 15u : blk[lo - h] >> 4;
              if (hi < t) v |= (hi < h ? blk[hi] & 15u : blk[hi - h] >> 4) << 4;
              w[j >> 2] |= v << (8 * (j & 3));
            }
          }
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      }
      for (int c = tid; c < BX * XCH; c += kBlockThreads) {
        const int r = c / XCH;
        const int ch = c % XCH;
        const int64_t b = b0 + r;
        const int k = kt * kStageK + ch * 16;
        uint8_t* dst = &sq[buf][r][ch * 16];
        uint32_t w[4] = {0u, 0u, 0u, 0u};
        if (b < B) {
          const int8_t* __restrict__ src = qx + b * K;
          if (vec_x) {
            if (k < K) {
              cp_async16(dst, src + k);
              continue;
            }
          } else {
#pragma unroll
            for (int j = 0; j < 16; ++j) {
              if (k + j < K) {
                w[j >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(src[k + j]))
                             << (8 * (j & 3));
              }
            }
          }
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    };

    int iacc[MT][NT][4];
    float facc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          iacc[mt][nt][i] = 0;
          facc[mt][nt][i] = 0.0f;
        }
      }
    }

    // Folds the int32 sums into facc with group grp's scales; at the end of
    // the group also adds offset * xs.
    const auto flush = [&](int grp, bool group_end) {
      const bool add_off = group_end && offset != nullptr;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int64_t n = n0 + wn * MT * 16 + mt * 16 + gid + 8 * hf;
          const float s = n < N ? __ldg(scale + n * G + grp) : 0.0f;
          const float o = (add_off && n < N) ? __ldg(offset + n * G + grp) : 0.0f;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int64_t b = b0 + wx * NT * 8 + nt * 8 + 2 * tig + c;
              int& ia = iacc[mt][nt][2 * hf + c];
              float term = __fmul_rn(s, static_cast<float>(ia));
              if (add_off && b < B) {
                term = __fmaf_rn(o, static_cast<float>(__ldg(xs + b * G + grp)), term);
              }
              facc[mt][nt][2 * hf + c] = __fadd_rn(facc[mt][nt][2 * hf + c], term);
              ia = 0;
            }
          }
        }
      }
    };

    // Every loop bound below depends on blockIdx and the arguments only, so
    // all threads reach each __syncthreads.
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < stages) load_stage(s, s);
      cp_async_commit();
    }
    int grp = 0;       // group of the current k-step
    int in_group = 0;  // k-steps of grp done
    int since = 0;     // k-steps since the last flush
    for (int kt = 0; kt < stages; ++kt) {
      cp_async_wait<kStages - 2>();  // this thread's copies of stage kt landed
      __syncthreads();               // everyone's did; stage kt - 1 is consumed
      {
        const int nk = kt + kStages - 1;
        if (nk < stages) load_stage(nk % kStages, nk);
        cp_async_commit();  // possibly empty: keeps the group count per stage
      }
      const int buf = kt % kStages;
#pragma unroll
      for (int ks = 0; ks < kStageK / kStepK; ++ks) {
        const int step = kt * (kStageK / kStepK) + ks;
        if (step >= steps) break;  // block-uniform

        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int r = wn * MT * 16 + mt * 16 + gid;
          if constexpr (QT != kQ4) {
            const uint8_t* p0 = &sw[buf][r][ks * kStepK + 4 * tig];
            const uint8_t* p1 = &sw[buf][r + 8][ks * kStepK + 4 * tig];
            a[mt][0] = *reinterpret_cast<const uint32_t*>(p0);
            a[mt][1] = *reinterpret_cast<const uint32_t*>(p1);
            a[mt][2] = *reinterpret_cast<const uint32_t*>(p0 + 16);
            a[mt][3] = *reinterpret_cast<const uint32_t*>(p1 + 16);
          } else {
            // Byte j of the staged block holds element j (low nibble, k-step
            // 0) and j + 32 (high nibble, k-step 1).
            const uint8_t* p0 = &sw[buf][r][4 * tig];
            const uint8_t* p1 = &sw[buf][r + 8][4 * tig];
            const int sh = 4 * ks;
            a[mt][0] = (*reinterpret_cast<const uint32_t*>(p0) >> sh) & 0x0f0f0f0fu;
            a[mt][1] = (*reinterpret_cast<const uint32_t*>(p1) >> sh) & 0x0f0f0f0fu;
            a[mt][2] = (*reinterpret_cast<const uint32_t*>(p0 + 16) >> sh) & 0x0f0f0f0fu;
            a[mt][3] = (*reinterpret_cast<const uint32_t*>(p1 + 16) >> sh) & 0x0f0f0f0fu;
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint8_t* p = &sq[buf][wx * NT * 8 + nt * 8 + gid][ks * kStepK + 4 * tig];
          const uint32_t bf[2] = {*reinterpret_cast<const uint32_t*>(p),
                                  *reinterpret_cast<const uint32_t*>(p + 16)};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma_m16n8k32<QT != 0>(iacc[mt][nt], a[mt], bf);
        }

        ++in_group;
        ++since;
        const bool group_end = in_group == steps_per_group || step + 1 == steps;
        if (group_end || since == kFlushSteps) {
          flush(grp, group_end);
          since = 0;
          if (group_end) {
            ++grp;
            in_group = 0;
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the next tile's prologue overwrites the buffers

    // out = bias + sx[b] * acc, rounded once to T.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int64_t n = n0 + wn * MT * 16 + mt * 16 + gid + 8 * hf;
        if (n >= N) continue;
        const float bias_v = bias != nullptr ? to_float<T>(bias[n]) : 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int64_t b = b0 + wx * NT * 8 + nt * 8 + 2 * tig + c;
            if (b >= B) continue;
            float v = __fmul_rn(sx[b], facc[mt][nt][2 * hf + c]);
            if (bias != nullptr) v = __fadd_rn(bias_v, v);
            out[b * N + n] = from_float<T>(v);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// act 0, small batches: one warp per (output row n, batch tile of BT rows).
//
// vec (rows 16-byte aligned: K % 16 == 0, 4-bit K % 32 == 0, aligned bases):
// lane l reads the row's 16-byte chunks l, l + 32, ... 8-bit: chunk c is
// elements 16c .. 16c + 15. 4-bit: chunk c is bytes j .. j + 15 (j = 0 or
// 16) of block b = c / 2, whose low nibbles are elements 64b + j + (0..15)
// and high nibbles 64b + hb + j + (0..15), hb = 32 (16 for the final block
// of 32 elements). Each run of 16 lies inside one group, and x is read with
// 16-byte loads. Otherwise lanes stride over the elements one by one.
template <typename T, int QT, int BT>
__global__ void __launch_bounds__(kThreads)
    wo_gemv_kernel(T* __restrict__ out, const T* __restrict__ x, const uint8_t* __restrict__ qw,
                   const float* __restrict__ scale, const float* __restrict__ offset,
                   const T* __restrict__ bias, int64_t B, int64_t N, int K, int G, int gs,
                   bool vec) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;  // the whole warp leaves: no shuffle below misses a lane

  const int64_t row_bytes = QT == kQ4 ? K / 2 : K;
  const uint8_t* __restrict__ wrow = qw + n * row_bytes;
  const float* __restrict__ srow = scale + n * G;
  const float* __restrict__ orow = offset != nullptr ? offset + n * G : nullptr;
  const float bias_v = bias != nullptr ? to_float<T>(bias[n]) : 0.0f;
  const int64_t tiles = (B + BT - 1) / BT;

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t b0 = tile * BT;
    const int nb = static_cast<int>(B - b0 < BT ? B - b0 : BT);
    const T* __restrict__ xb = x + b0 * K;
    float acc[BT];
#pragma unroll
    for (int t = 0; t < BT; ++t) acc[t] = 0.0f;

    // acc[t] += sum_i dequant(q[i]) * x[b0 + t, e0 + i] for a run of 16.
    const auto run16 = [&](const int (&q)[16], int e0) {
      const int g = G == 1 ? 0 : e0 / gs;
      const float s = __ldg(srow + g);
      const float o = orow != nullptr ? __ldg(orow + g) : 0.0f;
      float w[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) w[i] = dequant(q[i], s, o);
#pragma unroll
      for (int t = 0; t < BT; ++t) {
        if (t < nb) {
          float xv[16];
          load16<T>(xb + static_cast<int64_t>(t) * K + e0, xv);
#pragma unroll
          for (int i = 0; i < 16; ++i) acc[t] = __fmaf_rn(w[i], xv[i], acc[t]);
        }
      }
    };

    if (vec) {
      const int chunks = static_cast<int>(row_bytes / 16);
#pragma unroll 2
      for (int c = lane; c < chunks; c += 32) {
        const uint4 wv = __ldg(reinterpret_cast<const uint4*>(wrow) + c);
        int q[16];
        if constexpr (QT != kQ4) {
#pragma unroll
          for (int i = 0; i < 16; ++i) {
            const uint32_t v = byte_of(wv, i);
            q[i] = QT == 0 ? static_cast<int>(static_cast<int8_t>(v)) : static_cast<int>(v);
          }
          run16(q, 16 * c);
        } else {
          const int base = (c >> 1) * 64;
          const int j = (c & 1) * 16;
          const int hb = (K - base < 64 ? K - base : 64) >> 1;
#pragma unroll
          for (int i = 0; i < 16; ++i) q[i] = static_cast<int>(byte_of(wv, i) & 15u);
          run16(q, base + j);
#pragma unroll
          for (int i = 0; i < 16; ++i) q[i] = static_cast<int>(byte_of(wv, i) >> 4);
          run16(q, base + hb + j);
        }
      }
    } else {
      for (int k = lane; k < K; k += 32) {
        const int g = G == 1 ? 0 : k / gs;
        const float o = orow != nullptr ? __ldg(orow + g) : 0.0f;
        const float w = dequant(weight_at<QT>(wrow, k, K), __ldg(srow + g), o);
#pragma unroll
        for (int t = 0; t < BT; ++t) {
          if (t < nb) {
            acc[t] = __fmaf_rn(w, to_float<T>(xb[static_cast<int64_t>(t) * K + k]), acc[t]);
          }
        }
      }
    }

#pragma unroll
    for (int t = 0; t < BT; ++t) {
      const float s = warp_sum(acc[t]);
      if (lane == t && t < nb) {
        out[(b0 + t) * N + n] = from_float<T>(bias != nullptr ? __fadd_rn(s, bias_v) : s);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// act 0, larger batches: a block computes a kTileB x kTileN tile of out; K
// is walked in steps of kTileK. Thread i stages x[b0 + i % 64, k .. k + 7]
// and dequantized W[n0 + i % 64, k .. k + 7] (k = k0 + 8 * (i / 64); the 8
// elements share a group) into xs[k][b] and ws[k][n] as float32, transposed
// so that thread (ty, tx) = (i / 16, i % 16) reads its 4 batch rows and 4
// columns with one float4 each. Two buffers: step kt + 1 is fetched into
// registers before step kt is multiplied and stored after it, so one
// __syncthreads per step suffices.
template <typename T, int QT>
__global__ void __launch_bounds__(kThreads)
    wo_tiled_kernel(T* __restrict__ out, const T* __restrict__ x, const uint8_t* __restrict__ qw,
                    const float* __restrict__ scale, const float* __restrict__ offset,
                    const T* __restrict__ bias, int64_t B, int64_t N, int K, int G, int gs) {
  static_assert(kThreads == 256 && kTileB == 64 && kTileN == 64 && kTileK == 32,
                "the thread mapping below assumes 256 threads on a 64 x 64 x 32 tile");
  __shared__ __align__(16) float xs[2][kTileK][kTileB];
  __shared__ __align__(16) float ws[2][kTileK][kTileN];

  const int tid = threadIdx.x;
  const int lr = tid & 63;        // staged row (batch row / weight row)
  const int kc = (tid >> 6) * 8;  // staged k offset inside the step
  const int tx = tid & 15;
  const int ty = tid >> 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t nl = n0 + lr;
  const bool has_w = nl < N;
  const int64_t row_bytes = QT == kQ4 ? K / 2 : K;
  const uint8_t* __restrict__ wrow = qw + (has_w ? nl : 0) * row_bytes;
  const int steps = (K + kTileK - 1) / kTileK;
  const int64_t tiles = (B + kTileB - 1) / kTileB;

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t b0 = tile * kTileB;
    const bool has_x = b0 + lr < B;
    const T* __restrict__ xrow = x + (has_x ? b0 + lr : 0) * K;
    float xr[8];
    float wr[8];

    const auto fetch = [&](int kt) {
      const int k0 = kt * kTileK + kc;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        xr[j] = (has_x && k0 + j < K) ? to_float<T>(xrow[k0 + j]) : 0.0f;
      }
      if (has_w && k0 < K) {
        const int g = G == 1 ? 0 : k0 / gs;
        const float s = __ldg(scale + nl * G + g);
        const float o = offset != nullptr ? __ldg(offset + nl * G + g) : 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          wr[j] = k0 + j < K ? dequant(weight_at<QT>(wrow, k0 + j, K), s, o) : 0.0f;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) wr[j] = 0.0f;
      }
    };
    const auto put = [&](int buf) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        xs[buf][kc + j][lr] = xr[j];
        ws[buf][kc + j][lr] = wr[j];
      }
    };

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }

    if (steps > 0) {
      fetch(0);
      put(0);
    }
    __syncthreads();
    for (int kt = 0; kt < steps; ++kt) {
      const int cur = kt & 1;
      if (kt + 1 < steps) fetch(kt + 1);
#pragma unroll 8
      for (int k = 0; k < kTileK; ++k) {
        const float4 a = *reinterpret_cast<const float4*>(&xs[cur][k][ty * 4]);
        const float4 w = *reinterpret_cast<const float4*>(&ws[cur][k][tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w};
        const float wv[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = __fmaf_rn(av[i], wv[j], acc[i][j]);
        }
      }
      // Buffer cur ^ 1 was last read in step kt - 1, which every thread
      // finished before the __syncthreads that ended it.
      if (kt + 1 < steps) put(cur ^ 1);
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t b = b0 + ty * 4 + i;
      if (b >= B) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx * 4 + j;
        if (n >= N) continue;
        const float v = bias != nullptr ? __fadd_rn(acc[i][j], to_float<T>(bias[n])) : acc[i][j];
        out[b * N + n] = from_float<T>(v);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

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

// Grid of grid_x blocks per batch tile; gridDim.y takes as many of the
// `tiles` batch tiles as keep about per_sm blocks per SM in flight (the rest
// are looped over in the kernel), capped at 65535.
dim3 make_grid(int64_t grid_x, int64_t tiles, int per_sm) {
  if (grid_x > INT32_MAX) {
    throw std::invalid_argument("pyopt CUDA quant_linear: too many output columns");
  }
  const int64_t target = static_cast<int64_t>(sm_count()) * per_sm;
  int64_t y = (target + grid_x - 1) / grid_x;
  if (y > tiles) y = tiles;
  if (y > 65535) y = 65535;
  if (y < 1) y = 1;
  return dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(y), 1);
}

bool aligned16(int64_t addr) { return (addr & 15) == 0; }

template <typename F>
void dispatch_qtype(int qtype, F&& f) {
  switch (qtype) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    default: return f(std::integral_constant<int, 2>{});
  }
}

// Batch tile of the gemv kernel: the smallest of 1, 2, 4, 8 that covers
// min(B, 8).
template <typename F>
void dispatch_batch_tile(int64_t B, F&& f) {
  if (B >= 5) return f(std::integral_constant<int, 8>{});
  if (B >= 3) return f(std::integral_constant<int, 4>{});
  if (B == 2) return f(std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 1>{});
}

void invalid(const std::string& what) {
  throw std::invalid_argument("pyopt CUDA quant_linear: " + what);
}

template <typename T, int QT>
void launch_weight_only(int64_t out, int64_t x, int64_t qweight, int64_t scale, int64_t offset,
                        int64_t bias, int64_t B, int64_t N, int K, int G, int gs,
                        cudaStream_t s) {
  if (B <= kGemvMaxBatch) {
    const bool vec = (QT == kQ4 ? K % 32 == 0 : K % 16 == 0) && aligned16(x) &&
                     aligned16(qweight);
    dispatch_batch_tile(B, [&](auto bt) {
      constexpr int BT = decltype(bt)::value;
      const dim3 grid = make_grid((N + kWarps - 1) / kWarps, (B + BT - 1) / BT, 32);
      wo_gemv_kernel<T, QT, BT><<<grid, kThreads, 0, s>>>(
          from_addr<T>(out), from_addr<const T>(x), from_addr<const uint8_t>(qweight),
          from_addr<const float>(scale), from_addr<const float>(offset),
          from_addr<const T>(bias), B, N, K, G, gs, vec);
    });
  } else {
    const dim3 grid = make_grid((N + kTileN - 1) / kTileN, (B + kTileB - 1) / kTileB, 8);
    wo_tiled_kernel<T, QT><<<grid, kThreads, 0, s>>>(
        from_addr<T>(out), from_addr<const T>(x), from_addr<const uint8_t>(qweight),
        from_addr<const float>(scale), from_addr<const float>(offset),
        from_addr<const T>(bias), B, N, K, G, gs);
  }
}

// Warp layout of w8a8_gemm_kernel: WN x WX warps of MT x NT mma tiles.
template <int WN, int WX, int MT, int NT>
struct GemmConfig {
  static constexpr int wn = WN, wx = WX, mt = MT, nt = NT;
};

template <typename T, int QT, int WN, int WX, int MT, int NT>
void launch_gemm(int64_t out, int64_t qweight, int64_t scale, int64_t offset, int64_t bias,
                 int64_t B, int64_t N, int K, int G, int gs, int64_t ws_qx, int64_t ws_sx,
                 int64_t ws_xs, cudaStream_t s) {
  constexpr int BW = WN * MT * 16;
  constexpr int BX = WX * NT * 8;
  const bool vec_w = (QT == kQ4 ? K % 32 == 0 : K % 16 == 0) && aligned16(qweight);
  const bool vec_x = K % 16 == 0 && aligned16(ws_qx);
  const int steps = (K + kStepK - 1) / kStepK;
  const int steps_per_group = G == 1 ? steps : gs / kStepK;
  const dim3 grid = make_grid((N + BW - 1) / BW, (B + BX - 1) / BX, 8);
  w8a8_gemm_kernel<T, QT, WN, WX, MT, NT><<<grid, WN * WX * 32, 0, s>>>(
      from_addr<T>(out), from_addr<const int8_t>(ws_qx), from_addr<const float>(ws_sx),
      from_addr<const int32_t>(ws_xs), from_addr<const uint8_t>(qweight),
      from_addr<const float>(scale), from_addr<const float>(offset), from_addr<const T>(bias),
      B, N, K, G, steps_per_group, vec_w, vec_x);
}

}  // namespace

void quant_linear(int64_t out, int64_t x, int64_t qweight, int qtype, int64_t scale,
                  int64_t offset, int64_t bias, int64_t B, int64_t N, int64_t K, int64_t G,
                  int act, int dtype, int64_t ws_qx, int64_t ws_sx, int64_t ws_xs,
                  int64_t stream) {
  if (B < 0 || N < 0 || K < 0) invalid("B, N and K must be >= 0");
  if (K > INT32_MAX) invalid("K must be < 2^31, got " + std::to_string(K));
  if (dtype < kFloat32 || dtype > kFloat16) invalid("unknown dtype code " + std::to_string(dtype));
  if (qtype < 0 || qtype > 2) {
    invalid("qtype must be 0 (int8), 1 (uint8) or 2 (packed 4-bit), got " +
            std::to_string(qtype));
  }
  if (act != 0 && act != 1) {
    invalid("act must be 0 (float activations) or 1 (int8 activations), got " +
            std::to_string(act));
  }
  if (qtype == kQ4 && K % 2 != 0) invalid("4-bit weights need an even K, got " + std::to_string(K));
  if (G < 1 || K % G != 0) {
    invalid("G must be >= 1 and divide K, got G=" + std::to_string(G) + " K=" + std::to_string(K));
  }
  const int64_t gs = K / G;
  if (G > 1 && (gs == 0 || gs % 32 != 0)) {
    invalid("the group size K / G must be a multiple of 32 when G > 1, got " +
            std::to_string(gs));
  }
  if (B == 0 || N == 0) return;
  if (out == 0 || scale == 0 || (K > 0 && (x == 0 || qweight == 0))) {
    invalid("out, x, qweight and scale must be device addresses");
  }
  if (act == 1 && (ws_sx == 0 || ws_xs == 0 || (K > 0 && ws_qx == 0))) {
    invalid("act=1 needs the ws_qx, ws_sx and ws_xs workspaces");
  }
  require_device();
  const cudaStream_t s = to_stream(stream);
  const int k32 = static_cast<int>(K);
  const int g32 = static_cast<int>(G);
  const int gs32 = static_cast<int>(gs);

  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_qtype(qtype, [&](auto qt) {
      constexpr int QT = decltype(qt)::value;
      if (act == 0) {
        launch_weight_only<T, QT>(out, x, qweight, scale, offset, bias, B, N, k32, g32, gs32, s);
        return;
      }
      const int64_t qgrid = B < static_cast<int64_t>(sm_count()) * 8 ? B : sm_count() * 8;
      quantize_rows_kernel<T><<<static_cast<unsigned>(qgrid), kThreads, 0, s>>>(
          from_addr<const T>(x), from_addr<int8_t>(ws_qx), from_addr<float>(ws_sx),
          from_addr<int32_t>(ws_xs), B, k32, g32, gs32);
      check(cudaGetLastError(), "quant_linear quantize kernel launch");
      const auto gemm = [&](auto cfg) {
        using C = decltype(cfg);
        launch_gemm<T, QT, C::wn, C::wx, C::mt, C::nt>(out, qweight, scale, offset, bias, B, N,
                                                       k32, g32, gs32, ws_qx, ws_sx, ws_xs, s);
      };
      // Batch tile 8, 16, 32 (4 warps along N) or 64 (2 x 2 warps, 2 x 4 mma each).
      if (B <= 8) gemm(GemmConfig<4, 1, 1, 1>{});
      else if (B <= 16) gemm(GemmConfig<4, 1, 1, 2>{});
      else if (B <= 32) gemm(GemmConfig<4, 1, 1, 4>{});
      else gemm(GemmConfig<2, 2, 2, 4>{});
    });
  });
  check(cudaGetLastError(), "quant_linear kernel launch");
}

}  // namespace cuda
}  // namespace pyopt
