// Sparse linear CPU kernels, out = x @ W^T + bias with W in csr, bitmask
// (and nm, which is a bitmask) or bsr layout (pyopt/sparse/formats.py).
// Compiled once per ISA like optim_kernels.h: everything lives in namespace
// pyopt::PYOPT_ISA, and no std templates are used, so no two variants share
// an inline symbol.
//
// Two paths, chosen by batch size:
//  * small batch (B <= kSmallBatch): one pass over the weight per row, all
//    batch rows at once. Batch 1 is bound by the bytes of the weight, so the
//    formats keep those few: 16-bit columns (csr) or a bitmap (bitmask).
//  * tiles (larger B): x is transposed once into lane groups xt[g][K][L] of
//    L batch columns, so every kept weight is one broadcast and L/W FMAs on a
//    contiguous row of xt. The xt of one group (K * L floats) stays in L2.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(_MSC_VER)
#include <intrin.h>
#endif

#include "cpu/convert.h"
#include "cpu/sparse_cpu.h"

namespace pyopt {
namespace PYOPT_ISA {

constexpr int64_t kSmallBatch = 4;
constexpr int64_t kRowChunk = 16;     // rows per work item in the tile path
constexpr int64_t kSmallChunk = 64;   // rows per work item in the small path
// xt bytes of one column block, all lane groups (well inside a 1 MiB L2)
constexpr int64_t kKBlockBytes = 256 << 10;
// Below this many multiply-adds a second thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = 1 << 16;

// ---------------------------------------------------------------- vectors
#if defined(__AVX512F__)
constexpr int W = 16;
struct VF { __m512 v; };
static inline VF vzero() { return {_mm512_setzero_ps()}; }
static inline VF vload(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline void vstore(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
static inline VF vbcast(float f) { return {_mm512_set1_ps(f)}; }
static inline VF vfma(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline VF vadd(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline float vsum(VF a) { return _mm512_reduce_add_ps(a.v); }
static inline VF vloadv(const float* p) { return vload(p); }
static inline VF vloadv(const bf16* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(u, 16))};
}
static inline VF vloadv(const f16* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
// The first lanes of mask m only; lanes outside m read nothing and are 0.
static inline __m512 mload(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 mload(const bf16* p, __mmask16 m) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline __m512 mload(const f16* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
static inline __m512i mload_idx(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
static inline __m512i mload_idx(const int32_t* p, __mmask16 m) {
  return _mm512_maskz_loadu_epi32(m, p);
}
#elif defined(__AVX2__)
constexpr int W = 8;
struct VF { __m256 v; };
static inline VF vzero() { return {_mm256_setzero_ps()}; }
static inline VF vload(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline void vstore(float* p, VF a) { _mm256_storeu_ps(p, a.v); }
static inline VF vbcast(float f) { return {_mm256_set1_ps(f)}; }
static inline VF vfma(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
static inline VF vadd(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
static inline float vsum(VF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
static inline VF vloadv(const float* p) { return vload(p); }
static inline VF vloadv(const bf16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(u, 16))};
}
static inline VF vloadv(const f16* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
#else
constexpr int W = 4;
struct VF { float v[4]; };
static inline VF vzero() { return {{0.f, 0.f, 0.f, 0.f}}; }
static inline VF vload(const float* p) { return {{p[0], p[1], p[2], p[3]}}; }
static inline void vstore(float* p, VF a) { for (int l = 0; l < 4; ++l) p[l] = a.v[l]; }
static inline VF vbcast(float f) { return {{f, f, f, f}}; }
static inline VF vfma(VF a, VF b, VF c) {
  for (int l = 0; l < 4; ++l) c.v[l] += a.v[l] * b.v[l];
  return c;
}
static inline VF vadd(VF a, VF b) {
  for (int l = 0; l < 4; ++l) a.v[l] += b.v[l];
  return a;
}
static inline float vsum(VF a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
template <typename V>
static inline VF vloadv(const V* p) {
  return {{to_float(p[0]), to_float(p[1]), to_float(p[2]), to_float(p[3])}};
}
#endif
// Lane-group width ceiling: 4 vectors of accumulators per row.
constexpr int kMaxLanes = 4 * W < 16 ? 16 : 4 * W;

static inline int ctz64(uint64_t w) {
#if defined(_MSC_VER)
  unsigned long i;
  _BitScanForward64(&i, w);
  return static_cast<int>(i);
#else
  return __builtin_ctzll(w);
#endif
}

static inline int popcnt32(unsigned m) {
#if defined(_MSC_VER)
  return static_cast<int>(__popcnt(m));
#else
  return __builtin_popcount(m);
#endif
}

static inline int64_t col_of(const uint16_t* c, int64_t p) { return c[p]; }
static inline int64_t col_of(const int32_t* c, int64_t p) { return c[p]; }

static float* alloc_floats(int64_t n) {
  return static_cast<float*>(std::malloc(static_cast<size_t>(n > 0 ? n : 1) * sizeof(float) + 64));
}

template <typename V>
static inline void store_out(float acc, const float* bias, int64_t i, V* dst) {
  from_float(bias ? acc + bias[i] : acc, dst);
}

static int64_t kept_weights(const SparseCall& c) {
  return c.format == kSparseBsr ? c.ptr[c.N / c.bh] * c.bh * c.bw : c.ptr[c.N];
}

static int threads_for(const SparseCall& c, int64_t work, int64_t items) {
  int64_t t = work / kMinWorkPerThread;
  if (t > c.nthreads) t = c.nthreads;
  if (t > items) t = items;
  return t < 1 ? 1 : static_cast<int>(t);
}

// ---------------------------------------------------------------- small batch
// acc[b] = sum over the row's kept weights of v * x[b, col], NB batch rows.
template <typename V, typename I, int NB>
static inline void csr_dot(const V* vals, const I* cols, int64_t p0, int64_t p1, const float* x,
                           int64_t K, float* acc) {
#if defined(__AVX512F__)
  __m512 a[NB];
  for (int b = 0; b < NB; ++b) a[b] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; p += 16) {
    const __mmask16 m = p1 - p >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (p1 - p)) - 1);
    const __m512i j = mload_idx(cols + p, m);
    const __m512 v = mload(vals + p, m);
    for (int b = 0; b < NB; ++b)
      a[b] = _mm512_fmadd_ps(v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, j, x + b * K, 4), a[b]);
  }
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_reduce_add_ps(a[b]);
#else
  float s[NB];
  for (int b = 0; b < NB; ++b) s[b] = 0.f;
  for (int64_t p = p0; p < p1; ++p) {
    const float v = to_float(vals[p]);
    const int64_t j = col_of(cols, p);
    for (int b = 0; b < NB; ++b) s[b] += v * x[b * K + j];
  }
  for (int b = 0; b < NB; ++b) acc[b] = s[b];
#endif
}

// x is compressed to the kept positions (a register permute) rather than the
// values expanded: expand is microcoded and ~4x slower on AMD Zen 4/5.
template <typename V, int NB>
static inline void bitmask_dot(const V* v, const V* vend, const uint64_t* words, int64_t nw,
                               const float* x, int64_t K, float* acc) {
#if defined(__AVX512F__)
  __m512 a[NB][2];
  for (int b = 0; b < NB; ++b) a[b][0] = a[b][1] = _mm512_setzero_ps();
  for (int64_t w = 0; w < nw; ++w) {
    const uint64_t word = words[w];
    if (!word) continue;
    for (int q = 0; q < 4; ++q) {
      const __mmask16 m = static_cast<__mmask16>(word >> (16 * q));
      const int cnt = popcnt32(static_cast<unsigned>(m));
      const int64_t col = w * 64 + q * 16;
      // lanes >= cnt of vv meet zeros of the compressed x; past the end of
      // the values array they must not be read at all
      const __m512 vv = v + 16 <= vend ? vloadv(v).v : mload(v, static_cast<__mmask16>((1u << cnt) - 1));
      for (int b = 0; b < NB; ++b) {
        const float* xb = x + b * K + col;
        const __m512 xv = col + 16 <= K ? _mm512_loadu_ps(xb) : _mm512_maskz_loadu_ps(m, xb);
        a[b][q & 1] = _mm512_fmadd_ps(vv, _mm512_maskz_compress_ps(m, xv), a[b][q & 1]);
      }
      v += cnt;
    }
  }
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_reduce_add_ps(_mm512_add_ps(a[b][0], a[b][1]));
#else
  (void)vend;
  float s[NB];
  for (int b = 0; b < NB; ++b) s[b] = 0.f;
  for (int64_t w = 0; w < nw; ++w) {
    for (uint64_t word = words[w]; word; word &= word - 1) {
      const int64_t j = w * 64 + ctz64(word);
      const float vv = to_float(*v++);
      for (int b = 0; b < NB; ++b) s[b] += vv * x[b * K + j];
    }
  }
  for (int b = 0; b < NB; ++b) acc[b] = s[b];
#endif
}

// One row of one bsr block row: sum over its blocks of W[r, c0:c0+bw] . x[b, c0:c0+bw].
template <typename V, int NB>
static inline void bsr_dot(const V* vals, const int32_t* bcol, int64_t q0, int64_t q1, int64_t r,
                           int64_t bh, int64_t bw, const float* x, int64_t K, float* acc) {
  VF a[NB];
  float tail[NB];
  for (int b = 0; b < NB; ++b) {
    a[b] = vzero();
    tail[b] = 0.f;
  }
  const int64_t vec_end = bw / W * W;
  for (int64_t q = q0; q < q1; ++q) {
    const V* row = vals + (q * bh + r) * bw;
    const float* xc = x + static_cast<int64_t>(bcol[q]) * bw;
    for (int64_t c = 0; c < vec_end; c += W) {
      const VF v = vloadv(row + c);
      for (int b = 0; b < NB; ++b) a[b] = vfma(v, vload(xc + b * K + c), a[b]);
    }
    for (int64_t c = vec_end; c < bw; ++c) {
      const float v = to_float(row[c]);
      for (int b = 0; b < NB; ++b) tail[b] += v * xc[b * K + c];
    }
  }
  for (int b = 0; b < NB; ++b) acc[b] = vsum(a[b]) + tail[b];
}

template <typename V, typename I, int NB>
static void small_rows(const SparseCall& c, const float* xf, const float* bias, int64_t i0,
                       int64_t i1) {
  const V* vals = static_cast<const V*>(c.values);
  V* out = static_cast<V*>(c.out);
  const int64_t K = c.K, N = c.N;
  float acc[NB];
  if (c.format == kSparseBsr) {
    const int64_t bh = c.bh;
    const int32_t* bcol = static_cast<const int32_t*>(c.idx);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t R = i / bh;
      bsr_dot<V, NB>(vals, bcol, c.ptr[R], c.ptr[R + 1], i % bh, bh, c.bw, xf, K, acc);
      for (int b = 0; b < NB; ++b) store_out(acc[b], bias, i, &out[b * N + i]);
    }
    return;
  }
  const int64_t nw = (K + 63) / 64;
  for (int64_t i = i0; i < i1; ++i) {
    if (c.format == kSparseCsr)
      csr_dot<V, I, NB>(vals, static_cast<const I*>(c.idx), c.ptr[i], c.ptr[i + 1], xf, K, acc);
    else
      bitmask_dot<V, NB>(vals + c.ptr[i], vals + c.ptr[c.N],
                         static_cast<const uint64_t*>(c.idx) + i * nw, nw, xf, K, acc);
    for (int b = 0; b < NB; ++b) store_out(acc[b], bias, i, &out[b * N + i]);
  }
}

template <typename V, typename I>
static void run_small(const SparseCall& c, const float* xf, const float* bias) {
  const int64_t chunks = (c.N + kSmallChunk - 1) / kSmallChunk;
  const int64_t nnz_est = kept_weights(c);
  const int nt = threads_for(c, nnz_est * c.B, chunks);
  (void)nt;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t i0 = ch * kSmallChunk, i1 = i0 + kSmallChunk < c.N ? i0 + kSmallChunk : c.N;
    switch (c.B) {
      case 1: small_rows<V, I, 1>(c, xf, bias, i0, i1); break;
      case 2: small_rows<V, I, 2>(c, xf, bias, i0, i1); break;
      case 3: small_rows<V, I, 3>(c, xf, bias, i0, i1); break;
      default: small_rows<V, I, 4>(c, xf, bias, i0, i1); break;
    }
  }
}

// ---------------------------------------------------------------- tiles
// acc[0:L] += sum over kept weights p0..p1 of one row of v * xt[col][0:L], L = NV * W.
// U independent accumulator sets hide the FMA latency when NV is small.
template <typename V, typename I, int NV>
static inline void csr_tile_row(const V* vals, const I* cols, int64_t p0, int64_t p1,
                                const float* xg, float* acc) {
  constexpr int L = NV * W;
  constexpr int U = NV >= 3 ? 2 : 8 / NV;
  VF a[U][NV];
  for (int u = 0; u < U; ++u)
    for (int k = 0; k < NV; ++k) a[u][k] = vzero();
  int64_t p = p0;
  for (; p + U <= p1; p += U) {
    for (int u = 0; u < U; ++u) {
      const VF v = vbcast(to_float(vals[p + u]));
      const float* xr = xg + col_of(cols, p + u) * L;
      for (int k = 0; k < NV; ++k) a[u][k] = vfma(v, vload(xr + k * W), a[u][k]);
    }
  }
  for (; p < p1; ++p) {
    const VF v = vbcast(to_float(vals[p]));
    const float* xr = xg + col_of(cols, p) * L;
    for (int k = 0; k < NV; ++k) a[0][k] = vfma(v, vload(xr + k * W), a[0][k]);
  }
  for (int k = 0; k < NV; ++k) {
    VF s = vload(acc + k * W);
    for (int u = 0; u < U; ++u) s = vadd(s, a[u][k]);
    vstore(acc + k * W, s);
  }
}

// Column indices of words w0..w1 of one bitmask row, so the tile path can
// share csr_tile_row.
static inline int64_t decode_words(const uint64_t* words, int64_t w0, int64_t w1, int32_t* cols) {
  int64_t n = 0;
  for (int64_t w = w0; w < w1; ++w)
    for (uint64_t word = words[w]; word; word &= word - 1)
      cols[n++] = static_cast<int32_t>(w * 64 + ctz64(word));
  return n;
}

// Rows r0..r0+RC of one bsr block row into acc[r][0:L].
template <typename V, int NV, int RC>
static inline void bsr_tile_rows(const V* vals, const int32_t* bcol, int64_t q0, int64_t q1,
                                 int64_t r0, int64_t bh, int64_t bw, const float* xg, float* acc) {
  constexpr int L = NV * W;
  VF a[RC][NV];
  for (int r = 0; r < RC; ++r)
    for (int k = 0; k < NV; ++k) a[r][k] = vzero();
  for (int64_t q = q0; q < q1; ++q) {
    const V* blk = vals + (q * bh + r0) * bw;
    const float* xc = xg + static_cast<int64_t>(bcol[q]) * bw * L;
    for (int64_t col = 0; col < bw; ++col) {
      VF xv[NV];
      for (int k = 0; k < NV; ++k) xv[k] = vload(xc + col * L + k * W);
      for (int r = 0; r < RC; ++r) {
        const VF v = vbcast(to_float(blk[r * bw + col]));
        for (int k = 0; k < NV; ++k) a[r][k] = vfma(v, xv[k], a[r][k]);
      }
    }
  }
  for (int r = 0; r < RC; ++r)
    for (int k = 0; k < NV; ++k) vstore(acc + r * L + k * W, a[r][k]);
}

// x [B, K] -> xt[g][K][L] (float, lanes past B are 0). Blocked so both the
// reads of x and the writes of xt stay within a few cache lines.
template <typename V>
static void transpose_x(const SparseCall& c, int64_t L, int64_t G, float* xt, int nt) {
  const V* x = static_cast<const V*>(c.x);
  const int64_t K = c.K, B = c.B, JB = 16;
  const int64_t jblocks = (K + JB - 1) / JB;
  (void)nt;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
  for (int64_t t = 0; t < G * jblocks; ++t) {
    const int64_t g = t / jblocks, j0 = t % jblocks * JB, j1 = j0 + JB < K ? j0 + JB : K;
    float* dst = xt + g * K * L;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t b = g * L + l;
      if (b < B) {
        for (int64_t j = j0; j < j1; ++j) dst[j * L + l] = to_float(x[b * K + j]);
      } else {
        for (int64_t j = j0; j < j1; ++j) dst[j * L + l] = 0.f;
      }
    }
  }
}

template <typename V, typename I, int NV>
static void run_tiles(const SparseCall& c, const float* bias, int nt_max) {
  constexpr int64_t L = NV * W;
  const int64_t N = c.N, K = c.K, B = c.B, G = (B + L - 1) / L;
  float* xt = alloc_floats(G * K * L);
  if (!xt) throw std::bad_alloc();
  transpose_x<V>(c, L, G, xt, nt_max);
  const bool bsr = c.format == kSparseBsr;
  const int64_t rows_per_item = bsr ? c.bh : kRowChunk;
  const int64_t items = (N + rows_per_item - 1) / rows_per_item;
  const int64_t nnz_est = kept_weights(c);
  const int nt = threads_for(c, nnz_est * B, items);
  const V* vals = static_cast<const V*>(c.values);
  V* out = static_cast<V*>(c.out);
  const int64_t nw = (K + 63) / 64;
  // Column block: all of K while every group's xt fits kKBlockBytes, else
  // kKBlockBytes over all groups, a multiple of 64 columns (bitmask words).
  const int64_t xt_bytes = G * L * static_cast<int64_t>(sizeof(float));  // per column
  int64_t kb = K * xt_bytes <= kKBlockBytes ? K : kKBlockBytes / xt_bytes / 64 * 64;
  if (kb < 64) kb = 64;
  (void)nt;
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
    // csr/bitmask: the columns are walked in blocks of kb, with every row of
    // the item and every lane group inside a block, so the xt rows a block
    // touches (kb * L floats per group) stay in L2 while they are reused.
    // A bitmask row is decoded once per call, one block at a time.
    const int64_t gstride = rows_per_item * L;
    float* acc = alloc_floats(bsr ? gstride : G * gstride);
    int32_t* cols = c.format == kSparseBitmask ? static_cast<int32_t*>(
                                                     std::malloc(static_cast<size_t>(kb + 1) * 4))
                                               : nullptr;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t i0 = it * rows_per_item;
      const int64_t i1 = i0 + rows_per_item < N ? i0 + rows_per_item : N;
      if (!bsr) {
        int64_t cursor[kRowChunk];
        for (int64_t i = i0; i < i1; ++i) cursor[i - i0] = c.ptr[i];
        std::memset(acc, 0, sizeof(float) * G * gstride);
        for (int64_t k0 = 0; k0 < K; k0 += kb) {
          const int64_t k1 = k0 + kb < K ? k0 + kb : K;
          for (int64_t i = i0; i < i1; ++i) {
            float* acc_r = acc + (i - i0) * L;
            const int64_t p0 = cursor[i - i0];
            if (c.format == kSparseCsr) {
              const I* idx = static_cast<const I*>(c.idx);
              int64_t p1 = k1 == K ? c.ptr[i + 1] : p0;
              while (p1 < c.ptr[i + 1] && col_of(idx, p1) < k1) ++p1;
              for (int64_t g = 0; g < G; ++g)
                csr_tile_row<V, I, NV>(vals, idx, p0, p1, xt + g * K * L, acc_r + g * gstride);
              cursor[i - i0] = p1;
            } else {
              const int64_t w1 = (k1 + 63) / 64;
              const int64_t n = decode_words(static_cast<const uint64_t*>(c.idx) + i * nw,
                                             k0 / 64, w1 < nw ? w1 : nw, cols);
              for (int64_t g = 0; g < G; ++g)
                csr_tile_row<V, int32_t, NV>(vals + p0, cols, 0, n, xt + g * K * L,
                                             acc_r + g * gstride);
              cursor[i - i0] = p0 + n;
            }
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float* acc_g = acc + (bsr ? 0 : g * gstride);
        if (bsr) {
          constexpr int RC = W == 16 ? 4 : 2;
          const int64_t q0 = c.ptr[it], q1 = c.ptr[it + 1];
          const int32_t* bcol = static_cast<const int32_t*>(c.idx);
          const float* xg = xt + g * K * L;
          int64_t r = 0;
          for (; r + RC <= c.bh; r += RC)
            bsr_tile_rows<V, NV, RC>(vals, bcol, q0, q1, r, c.bh, c.bw, xg, acc + r * L);
          for (; r < c.bh; ++r)
            bsr_tile_rows<V, NV, 1>(vals, bcol, q0, q1, r, c.bh, c.bw, xg, acc + r * L);
        }
        const int64_t lanes = B - g * L < L ? B - g * L : L;
        for (int64_t l = 0; l < lanes; ++l) {
          V* o = out + (g * L + l) * N;
          for (int64_t i = i0; i < i1; ++i) store_out(acc_g[(i - i0) * L + l], bias, i, &o[i]);
        }
      }
    }
    std::free(acc);
    std::free(cols);
  }
  std::free(xt);
}

template <typename V, typename I>
static void run_typed(const SparseCall& c) {
  float* bias = nullptr;
  if (c.bias) {
    bias = alloc_floats(c.N);
    load_block(static_cast<const V*>(c.bias), bias, c.N);
  }
  if (c.B <= kSmallBatch) {
    const float* xf;
    float* buf = nullptr;
    if (sizeof(V) == 4) {
      xf = static_cast<const float*>(c.x);
    } else {
      buf = alloc_floats(c.B * c.K);
      load_block(static_cast<const V*>(c.x), buf, c.B * c.K);
      xf = buf;
    }
    run_small<V, I>(c, xf, bias);
    std::free(buf);
  } else {
    const int64_t lanes = (c.B + W - 1) / W * W;
    switch (lanes >= kMaxLanes ? kMaxLanes / W : lanes / W) {
      case 1: run_tiles<V, I, 1>(c, bias, c.nthreads); break;
      case 2: run_tiles<V, I, 2>(c, bias, c.nthreads); break;
      case 3: run_tiles<V, I, 3>(c, bias, c.nthreads); break;
      default: run_tiles<V, I, kMaxLanes / W>(c, bias, c.nthreads); break;
    }
  }
  std::free(bias);
}

template <typename V>
static void run_dtype(const SparseCall& c) {
  if (c.format == kSparseCsr && c.idx_bits == 32)
    run_typed<V, int32_t>(c);
  else
    run_typed<V, uint16_t>(c);
}

}  // namespace PYOPT_ISA

void PYOPT_CAT(sparse_linear, PYOPT_ISA)(const SparseCall& c) {
  using namespace PYOPT_ISA;
  if (c.dtype == 1)
    run_dtype<bf16>(c);
  else if (c.dtype == 2)
    run_dtype<f16>(c);
  else
    run_dtype<float>(c);
}

}  // namespace pyopt
