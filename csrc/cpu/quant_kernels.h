// Quantized linear CPU kernels, out = x @ dequant(W)^T + bias, W quantized as
// in pyopt/quant/formats.py. Compiled once per ISA like sparse_kernels.h:
// everything lives in namespace pyopt::PYOPT_ISA. The avx2 variant runs the
// 256-bit code below; the avx512 variant (built with AVX512_VNNI) replaces the
// float gemv and the whole integer path with the 512-bit code near the end of
// this file ("512-bit small-batch paths") and runs the 256-bit float panel
// for larger float batches. In the avx512 variant, 4-bit rows with K % 128 ==
// 0 at batch 1-4 take the chunk gemv (q4dot512), which reads the nibbles of a
// 64-byte load in place against x permuted to their order.
//
// Paths:
//  * float activations (weight-only), batch <= kGemvBatch: one pass over the
//    weights, dequantized in registers (q * scale + offset, as the reference
//    does), up to 4 batch rows x 4 weight rows per step.
//  * float activations, larger batch: a panel of kPanel weight rows is
//    dequantized once per kKBlock columns into a float buffer that stays in
//    L1/L2, then a 4x3 register tile of dot products runs over it. The
//    dequantization is amortised over the batch.
//  * int8 activations (W8A8, W4A8): x is quantized per token once, then exact
//    integer dot products: 8-bit weights widen to int16 and use vpmaddwd
//    (no saturation, unlike vpmaddubsw with signed 8-bit weights on AVX2);
//    4-bit weights are unsigned nibbles, so vpmaddubsw(nibble, int8 x) cannot
//    saturate (15 * 127 * 2 < 2^15) and 8 of them can be summed in int16
//    before widening.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif
// 512-bit float gemv; with AVX512_VNNI also the 512-bit integer path
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define PYOPT_QF512 1
#if defined(__AVX512VNNI__)
#define PYOPT_QI512 1
#endif
#endif

#include "cpu/convert.h"
#include "cpu/quant_cpu.h"

namespace pyopt {
namespace PYOPT_ISA {

#if defined(PYOPT_QF512)
constexpr int64_t kGemvBatch = 8;
#else
constexpr int64_t kGemvBatch = 4;
#endif
constexpr int64_t kPanel = 32;        // weight rows per work item (panel paths)
constexpr int64_t kKBlock = 512;      // columns dequantized per panel step
constexpr int64_t kIntKBlock = 1024;  // columns per step of the integer path (a multiple of every group)
constexpr int64_t kGemvRows = 16;     // weight rows per work item (gemv path)
constexpr int64_t kMinWorkPerThread = 1 << 16;

static void* qalloc(int64_t bytes) { return std::malloc(static_cast<size_t>(bytes > 0 ? bytes : 1) + 64); }

static int threads_for(const QuantCall& c, int64_t work, int64_t items) {
  int64_t t = work / kMinWorkPerThread;
  if (t > c.nthreads) t = c.nthreads;
  if (t > items) t = items;
  return t < 1 ? 1 : static_cast<int>(t);
}

// ---------------------------------------------------------------- weights
// Byte and nibble of element k in a packed 4-bit row (formats.py block layout).
static inline int nibble_at(const uint8_t* row, int64_t K, int64_t k) {
  const int64_t b0 = k - k % 64;
  const int64_t t = K - b0 < 64 ? K - b0 : 64;
  const int64_t i = k - b0, h = t / 2;
  const uint8_t byte = row[b0 / 2 + (i < h ? i : i - h)];
  return i < h ? (byte & 0xF) : (byte >> 4);
}

static inline int q_at(const QuantCall& c, int64_t n, int64_t k) {
  if (c.qtype == kQInt8) return static_cast<const int8_t*>(c.qw)[n * c.K + k];
  if (c.qtype == kQUInt8) return static_cast<const uint8_t*>(c.qw)[n * c.K + k];
  return nibble_at(static_cast<const uint8_t*>(c.qw) + n * (c.K / 2), c.K, k);
}

// Dequantized weight, exactly the reference's float32 q * scale + offset.
static inline float w_at(const QuantCall& c, int64_t n, int64_t k) {
  const int64_t g = n * c.G + k / (c.K / c.G);
  const float w = static_cast<float>(q_at(c, n, k)) * c.scale[g];
  return c.offset ? w + c.offset[g] : w;
}

// End of the range whose weights the vector loaders may read 8 at a time
// (full 64-element blocks for packed 4-bit).
static inline int64_t vec_end(const QuantCall& c) {
  return c.qtype == kQUInt4 ? c.K - c.K % 64 : c.K - c.K % 8;
}

// ---------------------------------------------------------------- activations
template <typename T>
static void x_to_float(const T* x, float* xf, int64_t n) { load_block(x, xf, n); }

static const float* float_x(const QuantCall& c, float** owned) {
  *owned = nullptr;
  if (c.dtype == 0) return static_cast<const float*>(c.x);
  float* xf = static_cast<float*>(qalloc(c.B * c.K * 4));
  if (c.dtype == 1) x_to_float(static_cast<const bf16*>(c.x), xf, c.B * c.K);
  else x_to_float(static_cast<const f16*>(c.x), xf, c.B * c.K);
  *owned = xf;
  return xf;
}

template <typename T>
static inline void store_row_t(const QuantCall& c, int64_t b, int64_t n0, int64_t cnt,
                               const float* acc) {
  T* out = static_cast<T*>(c.out) + b * c.N + n0;
  const T* bias = c.bias ? static_cast<const T*>(c.bias) + n0 : nullptr;
  for (int64_t j = 0; j < cnt; ++j) from_float(bias ? acc[j] + to_float(bias[j]) : acc[j], &out[j]);
}

// out[b, n0:n0+cnt] = acc + bias, rounded once to the output dtype.
static inline void store_row(const QuantCall& c, int64_t b, int64_t n0, int64_t cnt,
                             const float* acc) {
  if (c.dtype == 0) store_row_t<float>(c, b, n0, cnt, acc);
  else if (c.dtype == 1) store_row_t<bf16>(c, b, n0, cnt, acc);
  else store_row_t<f16>(c, b, n0, cnt, acc);
}

// ---------------------------------------------------------------- float path
#if defined(__AVX2__)
static inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

#endif

// Weights dequantized on the fly from the quantized rows (exactly the
// reference's q * scale + offset). span() is the end of the group holding k;
// set(n0, k) loads that group's scales once per span. A step is kStep
// weights of one row: prep() loads them, sub<S>() gives the S-th 8 as float.
template <int QT, bool OFF>
struct DQ {
  template <int C>
  struct Rows {
    static constexpr int kStep = QT == kQUInt4 ? 32 : 8;
    const QuantCall* c;
    int64_t gs;
    float s[C], o[C];
#if defined(__AVX2__)
    __m256 vs[C], vo[C];
#endif
    int64_t span(int64_t k) const { return (k / gs + 1) * gs; }
    void set(int64_t n0, int64_t k) {
      const int64_t g = k / gs;
      for (int j = 0; j < C; ++j) {
        s[j] = c->scale[(n0 + j) * c->G + g];
        o[j] = OFF ? c->offset[(n0 + j) * c->G + g] : 0.f;
#if defined(__AVX2__)
        vs[j] = _mm256_set1_ps(s[j]);
        vo[j] = _mm256_set1_ps(o[j]);
#endif
      }
    }
#if defined(__AVX2__)
    // 4-bit: the 32 nibbles of row n at k (k % 32 == 0) as bytes; one 32-byte
    // block load serves both halves, the shift picks the nibble.
    __m256i prep(int64_t n, int64_t k) const {
      if constexpr (QT == kQUInt4) {
        const int64_t i = k % 64;
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
            static_cast<const uint8_t*>(c->qw) + n * (c->K / 2) + (k - i) / 2));
        return _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(i ? 4 : 0)),
                                _mm256_set1_epi8(0x0F));
      } else {
        (void)n, (void)k;
        return _mm256_setzero_si256();
      }
    }
    template <int S>
    __m256 sub(int j, int64_t n, int64_t k, __m256i p) const {
      __m256i q;
      if constexpr (QT == kQUInt4) {
        __m128i h = S < 2 ? _mm256_castsi256_si128(p) : _mm256_extracti128_si256(p, 1);
        if (S & 1) h = _mm_srli_si128(h, 8);
        q = _mm256_cvtepu8_epi32(h);
      } else if constexpr (QT == kQInt8) {
        q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(
            static_cast<const int8_t*>(c->qw) + n * c->K + k)));
      } else {
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(
            static_cast<const uint8_t*>(c->qw) + n * c->K + k)));
      }
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(q), vs[j]);
      return OFF ? _mm256_add_ps(w, vo[j]) : w;
    }
#endif
    float load1(int j, int64_t n, int64_t k) const {
      const float w = static_cast<float>(q_at(*c, n, k)) * s[j];
      return OFF ? w + o[j] : w;
    }
  };
};

// Weights already dequantized into a float panel: row n - n0 of buf.
template <int C>
struct FloatPanel {
  static constexpr int kStep = 8;
  const float* buf;
  int64_t ld, n0, k0;
  int64_t span(int64_t) const { return INT64_MAX; }
  void set(int64_t, int64_t) {}
#if defined(__AVX2__)
  __m256i prep(int64_t, int64_t) const { return _mm256_setzero_si256(); }
  template <int S>
  __m256 sub(int, int64_t n, int64_t k, __m256i) const {
    return _mm256_loadu_ps(buf + (n - n0) * ld + (k - k0));
  }
#endif
  float load1(int, int64_t n, int64_t k) const { return buf[(n - n0) * ld + (k - k0)]; }
};

#if defined(__AVX2__)
template <int S, int R, int C, class W>
static inline void fsub(const W& w, const __m256i* p, const float* const* x, int64_t n0, int64_t k,
                        __m256 (*a)[C]) {
  __m256 wv[C];
  for (int j = 0; j < C; ++j) wv[j] = w.template sub<S>(j, n0 + j, k + 8 * S, p[j]);
  for (int r = 0; r < R; ++r) {
    const __m256 xv = _mm256_loadu_ps(x[r] + k + 8 * S);
    for (int j = 0; j < C; ++j) a[r][j] = _mm256_fmadd_ps(xv, wv[j], a[r][j]);
  }
}
#endif

// acc[r][j] += sum_{k in [k0, k1)} x[r][k] * W[n0 + j, k]; [k0, kv) goes a step at a time.
template <int R, int C, class W>
static inline void fdot(const float* const* x, W w, int64_t n0, int64_t k0, int64_t kv,
                        int64_t k1, float (*acc)[4]) {
  int64_t k = k0;
#if defined(__AVX2__)
  constexpr int kStep = W::kStep;
  __m256 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) a[r][j] = _mm256_setzero_ps();
  while (k + kStep <= kv) {
    w.set(n0, k);
    int64_t ke = w.span(k);
    ke = ke < kv ? ke : kv;
    for (; k + kStep <= ke; k += kStep) {
      __m256i p[C];
      for (int j = 0; j < C; ++j) p[j] = w.prep(n0 + j, k);
      fsub<0, R, C>(w, p, x, n0, k, a);
      if constexpr (kStep == 32) {
        fsub<1, R, C>(w, p, x, n0, k, a);
        fsub<2, R, C>(w, p, x, n0, k, a);
        fsub<3, R, C>(w, p, x, n0, k, a);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] += hsum(a[r][j]);
#else
  (void)kv;
#endif
  while (k < k1) {
    w.set(n0, k);
    int64_t ke = w.span(k);
    ke = ke < k1 ? ke : k1;
    for (; k < ke; ++k)
      for (int j = 0; j < C; ++j) {
        const float wk = w.load1(j, n0 + j, k);
        for (int r = 0; r < R; ++r) acc[r][j] += x[r][k] * wk;
      }
  }
}

template <template <int> class L, class... A>
static void fdot_any(int R, int C, const float* const* x, int64_t n0, int64_t k0, int64_t kv,
                     int64_t k1, float (*acc)[4], A... a) {
#define PYOPT_FDOT(r, cc) case (r) * 8 + (cc): return fdot<r, cc>(x, L<cc>{a...}, n0, k0, kv, k1, acc);
  switch (R * 8 + C) {
    PYOPT_FDOT(1, 1) PYOPT_FDOT(1, 2) PYOPT_FDOT(1, 3) PYOPT_FDOT(1, 4)
    PYOPT_FDOT(2, 1) PYOPT_FDOT(2, 2) PYOPT_FDOT(2, 3) PYOPT_FDOT(2, 4)
    PYOPT_FDOT(3, 1) PYOPT_FDOT(3, 2) PYOPT_FDOT(3, 3)
    PYOPT_FDOT(4, 1) PYOPT_FDOT(4, 2) PYOPT_FDOT(4, 3)
    default: return;
  }
#undef PYOPT_FDOT
}

// Small batch in factored form: W = (q - z) * s + (o + z * s), z the centre
// of the code range (0 for int8, 128 for uint8, 8 for 4-bit), so a group adds
// s * sum((q - z) x) + o' * sum(x). Both sums run over small centred terms,
// so rounding stays at the size of |W| |x| as in dequantize-then-matmul, and
// a weight costs a widen, a convert and an FMA. xsum [R][G] holds sum(x) per group.
template <int QT> constexpr int kCentre = QT == kQInt8 ? 0 : (QT == kQUInt8 ? 128 : 8);

template <int QT, bool OFF, int R, int C>
static inline void gdot(const QuantCall& c, const float* const* x, const float* xsum, int64_t n0,
                        float (*acc)[4]) {
  constexpr int Z = kCentre<QT>;
  const int64_t gs = c.K / c.G, kv = vec_end(c);
  const uint8_t* base = static_cast<const uint8_t*>(c.qw);
#if defined(__AVX2__)
  __m256 fa[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) fa[r][j] = _mm256_setzero_ps();
#endif
  for (int64_t g = 0; g < c.G; ++g) {
    const int64_t ks = g * gs, ke = ks + gs;
    int64_t k = ks;
    float sc[C], tail[R][C];
    for (int j = 0; j < C; ++j) sc[j] = c.scale[(n0 + j) * c.G + g];
#if defined(__AVX2__)
    __m256 ag[R][C];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) ag[r][j] = _mm256_setzero_ps();
    if constexpr (QT == kQUInt4) {
      const __m256i nib = _mm256_set1_epi8(0x0F), z8 = _mm256_set1_epi8(8);
      for (; k + 32 <= ke && k + 32 <= kv; k += 32) {
        const int64_t i = k % 64;
        const __m128i shift = _mm_cvtsi32_si128(i ? 4 : 0);
        __m256i p[C];
        for (int j = 0; j < C; ++j) {
          const __m256i raw = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(base + (n0 + j) * (c.K / 2) + (k - i) / 2));
          p[j] = _mm256_sub_epi8(_mm256_and_si256(_mm256_srl_epi16(raw, shift), nib), z8);
        }
        for (int h = 0; h < 2; ++h) {
          __m128i lo[C];
          for (int j = 0; j < C; ++j)
            lo[j] = h ? _mm256_extracti128_si256(p[j], 1) : _mm256_castsi256_si128(p[j]);
          for (int e = 0; e < 2; ++e) {
            __m256 wv[C];
            for (int j = 0; j < C; ++j)
              wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e ? _mm_srli_si128(lo[j], 8) : lo[j]));
            for (int r = 0; r < R; ++r) {
              const __m256 xv = _mm256_loadu_ps(x[r] + k + 16 * h + 8 * e);
              for (int j = 0; j < C; ++j) ag[r][j] = _mm256_fmadd_ps(xv, wv[j], ag[r][j]);
            }
          }
        }
      }
    } else {
      for (; k + 8 <= ke && k + 8 <= kv; k += 8) {
        __m256 wv[C];
        for (int j = 0; j < C; ++j) {
          const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(base + (n0 + j) * c.K + k));
          const __m256i q = QT == kQInt8 ? _mm256_cvtepi8_epi32(raw)
                                         : _mm256_sub_epi32(_mm256_cvtepu8_epi32(raw), _mm256_set1_epi32(Z));
          wv[j] = _mm256_cvtepi32_ps(q);
        }
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_loadu_ps(x[r] + k);
          for (int j = 0; j < C; ++j) ag[r][j] = _mm256_fmadd_ps(xv, wv[j], ag[r][j]);
        }
      }
    }
    for (int j = 0; j < C; ++j) {
      const __m256 sv = _mm256_set1_ps(sc[j]);
      for (int r = 0; r < R; ++r) fa[r][j] = _mm256_fmadd_ps(ag[r][j], sv, fa[r][j]);
    }
#else
    (void)kv;
    (void)base;
#endif
    // 8 interleaved partial sums, as the vector path has: in the baseline
    // variant this loop is the whole group, and one running sum over K
    // terms rounds several times worse than F.linear's blocked sums
    float lane[R][C][8] = {};
    for (; k < ke; ++k)
      for (int j = 0; j < C; ++j) {
        const float q = static_cast<float>(q_at(c, n0 + j, k) - Z);
        for (int r = 0; r < R; ++r) lane[r][j][k & 7] += q * x[r][k];
      }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) {
        const float* l = lane[r][j];
        tail[r][j] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
      }
    for (int j = 0; j < C; ++j) {
      const float o = (OFF ? c.offset[(n0 + j) * c.G + g] : 0.f) + static_cast<float>(Z) * sc[j];
      for (int r = 0; r < R; ++r) acc[r][j] += tail[r][j] * sc[j] + o * xsum[r * c.G + g];
    }
  }
#if defined(__AVX2__)
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] += hsum(fa[r][j]);
#endif
}

template <int QT, bool OFF>
static void gdot_any(const QuantCall& c, int R, int C, const float* const* x, const float* xsum,
                     int64_t n0, float (*acc)[4]) {
#define PYOPT_GDOT(r, cc) case (r) * 8 + (cc): return gdot<QT, OFF, r, cc>(c, x, xsum, n0, acc);
  switch (R * 8 + C) {
    PYOPT_GDOT(1, 1) PYOPT_GDOT(1, 2) PYOPT_GDOT(1, 3) PYOPT_GDOT(1, 4)
    PYOPT_GDOT(2, 1) PYOPT_GDOT(2, 2) PYOPT_GDOT(2, 3)
    PYOPT_GDOT(3, 1) PYOPT_GDOT(3, 2)
    PYOPT_GDOT(4, 1) PYOPT_GDOT(4, 2)
    default: return;
  }
#undef PYOPT_GDOT
}

// Small batch: every weight is read once, widened in registers.
template <int QT, bool OFF>
static void float_gemv(const QuantCall& c, const float* xf) {
  const int64_t tiles = (c.N + kGemvRows - 1) / kGemvRows;
  const int nt = threads_for(c, c.B * c.N * c.K, tiles);
  const int64_t gs = c.K / c.G;
  float* xsum = static_cast<float*>(qalloc(c.B * c.G * 4));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t g = 0; g < c.G; ++g) {
      float t = 0.f;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) t += xf[b * c.K + k];
      xsum[b * c.G + g] = t;
    }
  // weight rows per step: the accumulators of R x C dot products stay in registers
  const int64_t cw = c.B == 1 ? 4 : (c.B == 2 ? 3 : 2);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t nend = (t + 1) * kGemvRows < c.N ? (t + 1) * kGemvRows : c.N;
    for (int64_t n0 = t * kGemvRows; n0 < nend; n0 += cw) {
      const int C = static_cast<int>(nend - n0 < cw ? nend - n0 : cw);
      const int R = static_cast<int>(c.B);
      const float* x[4];
      float acc[4][4] = {};
      for (int r = 0; r < R; ++r) x[r] = xf + r * c.K;
      gdot_any<QT, OFF>(c, R, C, x, xsum, n0, acc);
      for (int r = 0; r < R; ++r) store_row(c, r, n0, C, acc[r]);
    }
  }
  std::free(xsum);
}

// Larger batch: dequantize a panel once per column block, reuse it for every row of x.
template <int QT, bool OFF>
static void float_panel(const QuantCall& c, const float* xf) {
  const int64_t panels = (c.N + kPanel - 1) / kPanel;
  const int nt = threads_for(c, c.B * c.N * c.K, panels);
  const int64_t kvq = vec_end(c);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* buf = static_cast<float*>(qalloc(kPanel * kKBlock * 4));
    float* acc = static_cast<float*>(qalloc(c.B * kPanel * 4));
    typename DQ<QT, OFF>::template Rows<1> dq{&c, c.K / c.G};
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kPanel, rows = c.N - n0 < kPanel ? c.N - n0 : kPanel;
      std::memset(acc, 0, static_cast<size_t>(c.B * kPanel) * 4);
      for (int64_t k0 = 0; k0 < c.K; k0 += kKBlock) {
        const int64_t k1 = k0 + kKBlock < c.K ? k0 + kKBlock : c.K;
        for (int64_t j = 0; j < rows; ++j) {
          float* dst = buf + j * kKBlock;
          for (int64_t k = k0; k < k1;) {
            dq.set(n0 + j, k);
            const int64_t ke = dq.span(k) < k1 ? dq.span(k) : k1;
#if defined(__AVX2__)
            for (; k + 32 <= ke && k + 32 <= kvq; k += 32) {
              const __m256i p = dq.prep(n0 + j, k);
              if constexpr (QT == kQUInt4) {
                _mm256_storeu_ps(dst + (k - k0), dq.template sub<0>(0, n0 + j, k, p));
                _mm256_storeu_ps(dst + (k - k0) + 8, dq.template sub<1>(0, n0 + j, k + 8, p));
                _mm256_storeu_ps(dst + (k - k0) + 16, dq.template sub<2>(0, n0 + j, k + 16, p));
                _mm256_storeu_ps(dst + (k - k0) + 24, dq.template sub<3>(0, n0 + j, k + 24, p));
              } else {
                for (int64_t e = 0; e < 32; e += 8)
                  _mm256_storeu_ps(dst + (k - k0) + e, dq.template sub<0>(0, n0 + j, k + e, p));
              }
            }
#endif
            for (; k < ke; ++k) dst[k - k0] = dq.load1(0, n0 + j, k);
          }
        }
        const int64_t kv = k0 + (k1 - k0) / 8 * 8;
        for (int64_t b0 = 0; b0 < c.B; b0 += 4) {
          const int R = static_cast<int>(c.B - b0 < 4 ? c.B - b0 : 4);
          const float* x[4];
          for (int r = 0; r < R; ++r) x[r] = xf + (b0 + r) * c.K;
          for (int64_t j0 = 0; j0 < rows; j0 += 3) {
            const int C = static_cast<int>(rows - j0 < 3 ? rows - j0 : 3);
            float t[4][4] = {};
            fdot_any<FloatPanel>(R, C, x, n0 + j0, k0, kv, k1, t, buf + j0 * kKBlock,
                                 kKBlock, n0 + j0, k0);
            for (int r = 0; r < R; ++r)
              for (int j = 0; j < C; ++j) acc[(b0 + r) * kPanel + j0 + j] += t[r][j];
          }
        }
      }
      for (int64_t b = 0; b < c.B; ++b) store_row(c, b, n0, rows, acc + b * kPanel);
    }
    std::free(buf);
    std::free(acc);
  }
}

// ---------------------------------------------------------------- int path
// Per-token int8 quantization (formats.quantize_per_token): qx as int8 (for
// 4-bit weights) or int16 (for 8-bit weights), sx [B], xs [B, G] group sums.
struct QuantX {
  void* qx;
  float* sx;
  int32_t* xs;
  bool wide;
};

template <typename Q>
static void quantize_rows(const QuantCall& c, const float* xf, Q* qx, float* sx, int32_t* xs) {
  const int nt = threads_for(c, c.B * c.K * 64, c.B);
  const int64_t gs = c.K / c.G;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < c.B; ++b) {
    const float* xr = xf + b * c.K;
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < c.K; ++k) {
      const float a = std::fabs(xr[k]);
      if (!(a <= 3.4028234663852886e38f)) finite = false;  // NaN or inf
      amax = a > amax ? a : amax;
    }
    Q* q = qx + b * c.K;
    if (!finite) {
      sx[b] = std::nanf("");
      for (int64_t k = 0; k < c.K; ++k) q[k] = 0;
      for (int64_t g = 0; g < c.G; ++g) xs[b * c.G + g] = 0;
      continue;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    sx[b] = amax / 127.f;
    for (int64_t g = 0; g < c.G; ++g) {
      int32_t s = 0;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        float v = std::nearbyint(xr[k] * inv);
        v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
        q[k] = static_cast<Q>(v);
        s += static_cast<int32_t>(v);
      }
      xs[b * c.G + g] = s;
    }
  }
}

// facc[r][j] += sum_g scale[n0+j, g] * dot_g (r, j), the exact integer group dots.
// Integer lane sums become float once per group: one fmadd per lane vector
// instead of a horizontal sum per group.
template <int QT, int R, int C>
static inline void idot8(const QuantCall& c, const int16_t* const* x, int64_t n0, int64_t k0,
                         int64_t k1, float (*facc)[4]) {
  const int64_t gs = c.K / c.G;
#if defined(__AVX2__)
  __m256 fa[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) fa[r][j] = _mm256_setzero_ps();
#endif
  // the part of each group inside [k0, k1): whole groups, or for per-channel
  // scales the column block itself
  for (int64_t g = k0 / gs; g * gs < k1; ++g) {
    const int64_t ks = g * gs > k0 ? g * gs : k0;
    const int64_t ke = (g + 1) * gs < k1 ? (g + 1) * gs : k1;
    int64_t k = ks;
    int32_t dot[R][C] = {};
#if defined(__AVX2__)
    __m256i a[R][C];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) a[r][j] = _mm256_setzero_si256();
    for (; k + 16 <= ke; k += 16) {
      __m256i wv[C];
      for (int j = 0; j < C; ++j) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
            static_cast<const uint8_t*>(c.qw) + (n0 + j) * c.K + k));
        if constexpr (QT == kQInt8) wv[j] = _mm256_cvtepi8_epi16(raw);
        else wv[j] = _mm256_cvtepu8_epi16(raw);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r] + k));
        for (int j = 0; j < C; ++j) a[r][j] = _mm256_add_epi32(a[r][j], _mm256_madd_epi16(xv, wv[j]));
      }
    }
    for (int j = 0; j < C; ++j) {
      const __m256 s = _mm256_set1_ps(c.scale[(n0 + j) * c.G + g]);
      for (int r = 0; r < R; ++r) fa[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][j]), s, fa[r][j]);
    }
#endif
    for (; k < ke; ++k)
      for (int j = 0; j < C; ++j) {
        const int q = q_at(c, n0 + j, k);
        for (int r = 0; r < R; ++r) dot[r][j] += x[r][k] * q;
      }
    for (int j = 0; j < C; ++j) {
      const float s = c.scale[(n0 + j) * c.G + g];
      for (int r = 0; r < R; ++r) facc[r][j] += s * static_cast<float>(dot[r][j]);
    }
  }
#if defined(__AVX2__)
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) facc[r][j] += hsum(fa[r][j]);
#endif
}

template <int R, int C>
static inline void idot4(const QuantCall& c, const int8_t* const* x, int64_t n0, int64_t k0,
                         int64_t k1, float (*facc)[4]) {
  const int64_t gs = c.K / c.G;
  const int64_t kv = vec_end(c);
  const uint8_t* base = static_cast<const uint8_t*>(c.qw);
#if defined(__AVX2__)
  __m256 fa[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) fa[r][j] = _mm256_setzero_ps();
#endif
  // the part of each group inside [k0, k1): whole groups, or for per-channel
  // scales the column block itself
  for (int64_t g = k0 / gs; g * gs < k1; ++g) {
    const int64_t ks = g * gs > k0 ? g * gs : k0;
    const int64_t ke = (g + 1) * gs < k1 ? (g + 1) * gs : k1;
    int64_t k = ks;
    int32_t dot[R][C] = {};
#if defined(__AVX2__)
    const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    while (k + 32 <= ke && k + 32 <= kv) {
      // at most 8 nibble products per int16 lane before widening; the
      // group's scale is the same for every such chunk
      const int64_t kend = k + 256 < ke ? k + 256 : ke;
      __m256i a16[R][C];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < C; ++j) a16[r][j] = _mm256_setzero_si256();
      for (; k + 32 <= kend && k + 32 <= kv; k += 32) {
        const int64_t i = k % 64;
        const __m128i shift = _mm_cvtsi32_si128(i ? 4 : 0);
        __m256i wv[C];
        for (int j = 0; j < C; ++j) {
          const __m256i raw = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(base + (n0 + j) * (c.K / 2) + (k - i) / 2));
          wv[j] = _mm256_and_si256(_mm256_srl_epi16(raw, shift), nib);
        }
        for (int r = 0; r < R; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r] + k));
          for (int j = 0; j < C; ++j)
            a16[r][j] = _mm256_add_epi16(a16[r][j], _mm256_maddubs_epi16(wv[j], xv));
        }
      }
      for (int j = 0; j < C; ++j) {
        const __m256 s = _mm256_set1_ps(c.scale[(n0 + j) * c.G + g]);
        for (int r = 0; r < R; ++r)
          fa[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a16[r][j], ones)), s,
                                     fa[r][j]);
      }
    }
#else
    (void)kv;
    (void)base;
#endif
    for (; k < ke; ++k)
      for (int j = 0; j < C; ++j) {
        const int q = q_at(c, n0 + j, k);
        for (int r = 0; r < R; ++r) dot[r][j] += x[r][k] * q;
      }
    for (int j = 0; j < C; ++j) {
      const float s = c.scale[(n0 + j) * c.G + g];
      for (int r = 0; r < R; ++r) facc[r][j] += s * static_cast<float>(dot[r][j]);
    }
  }
#if defined(__AVX2__)
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) facc[r][j] += hsum(fa[r][j]);
#endif
}

template <int QT, typename Q>
static void idot_any(const QuantCall& c, int R, int C, const Q* const* x, int64_t n0, int64_t k0,
                     int64_t k1, float (*facc)[4]) {
#define PYOPT_IDOT(r, cc)                                                              \
  case (r) * 8 + (cc):                                                                 \
    if constexpr (QT == kQUInt4) return idot4<r, cc>(c, reinterpret_cast<const int8_t* const*>(x), n0, k0, k1, facc); \
    else return idot8<QT, r, cc>(c, reinterpret_cast<const int16_t* const*>(x), n0, k0, k1, facc);
  switch (R * 8 + C) {
    PYOPT_IDOT(1, 1) PYOPT_IDOT(1, 2) PYOPT_IDOT(1, 3)
    PYOPT_IDOT(2, 1) PYOPT_IDOT(2, 2) PYOPT_IDOT(2, 3)
    PYOPT_IDOT(3, 1) PYOPT_IDOT(3, 2) PYOPT_IDOT(3, 3)
    PYOPT_IDOT(4, 1) PYOPT_IDOT(4, 2) PYOPT_IDOT(4, 3)
    default: return;
  }
#undef PYOPT_IDOT
}

template <int QT, typename Q>
static void int_gemm(const QuantCall& c, const Q* qx, const float* sx, const int32_t* xs) {
  // register tiles: R x rows by C weight rows of accumulators, plus the
  // weights and one x vector, within the 16 ymm registers
  constexpr int RT = QT == kQUInt4 ? 2 : 4, CT = QT == kQUInt4 ? 3 : 2;
  const int64_t panels = (c.N + kPanel - 1) / kPanel;
  const int nt = threads_for(c, c.B * c.N * c.K / 4, panels);
  // Column blocks keep a tile of x rows in L1 while the panel's weight rows
  // stream past it; when the whole tile fits, one block reads each weight row
  // front to back, which the prefetchers follow best.
  const int64_t tile_bytes = (c.B < RT ? c.B : RT) * c.K * static_cast<int64_t>(sizeof(Q));
  const int64_t kb = tile_bytes <= (16 << 10) ? c.K : kIntKBlock;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* acc = static_cast<float*>(qalloc(c.B * kPanel * 4));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kPanel, rows = c.N - n0 < kPanel ? c.N - n0 : kPanel;
      std::memset(acc, 0, static_cast<size_t>(c.B * kPanel) * 4);
      for (int64_t k0 = 0; k0 < c.K; k0 += kb) {
        const int64_t k1 = k0 + kb < c.K ? k0 + kb : c.K;
        for (int64_t b0 = 0; b0 < c.B; b0 += RT) {
          const int R = static_cast<int>(c.B - b0 < RT ? c.B - b0 : RT);
          const Q* x[4];
          for (int r = 0; r < R; ++r) x[r] = qx + (b0 + r) * c.K;
          for (int64_t j0 = 0; j0 < rows; j0 += CT) {
            const int C = static_cast<int>(rows - j0 < CT ? rows - j0 : CT);
            float t[4][4] = {};
            idot_any<QT>(c, R, C, x, n0 + j0, k0, k1, t);
            for (int r = 0; r < R; ++r)
              for (int j = 0; j < C; ++j) acc[(b0 + r) * kPanel + j0 + j] += t[r][j];
          }
        }
      }
      for (int64_t b = 0; b < c.B; ++b) {
        float* v = acc + b * kPanel;
        for (int64_t j = 0; j < rows; ++j) {
          if (c.offset) {
            const float* o = c.offset + (n0 + j) * c.G;
            const int32_t* s = xs + b * c.G;
            for (int64_t g = 0; g < c.G; ++g) v[j] += o[g] * static_cast<float>(s[g]);
          }
          v[j] *= sx[b];
        }
        store_row(c, b, n0, rows, v);
      }
    }
    std::free(acc);
  }
}

// ---------------------------------------------------------------- 512-bit small-batch paths
// The avx512 variant replaces the float gemv (batch <= kGemvBatch) with
// 16-lane code, and, when built with AVX512_VNNI, the whole integer path
// with vpdpbusd. Rows past N in a register tile repeat row N - 1 (valid
// memory; their results are dropped), so each tile shape is one instantiation.
#if defined(PYOPT_QF512)
#include "cpu/quant_x512.h"

// Float activations, R batch rows x C weight rows, in gdot's centred
// factored form: W = (q - z) s + o' with o' = o + z s, so a group adds
// s * sum((q - z) x) over small centred terms (in 16 float lanes here) and
// o' * sum(x), which the caller adds in scalar. Columns [kb0, kb1) (whole
// groups, or multiples of 64 for per-channel scales) are added into the lane
// sums st[r * C + j].
//  * 4-bit: (q - 8) * s comes straight from the nibble through a 16-entry
//    float table per row and group (vpermps reads only the low 4 index
//    bits), i.e. the weight rounded once as dequantization does. A block (64
//    elements, 32 bytes) gives its low nibbles (elements 0-31) and high
//    nibbles (32-63) separately, so with groups of 32 each half takes its own
//    group's table.
//  * 8-bit, R <= 2: per group, sum((q - z) x) in two lane sets, then times s.
//  * 8-bit, R > 2: the weight as (q - z) * s (per-channel: s applied per
//    pass), one accumulator set, so wider tiles fit the registers.
// pf[j] is the row the next step reads, prefetched at the same columns.
template <int QT, bool OFF, int R, int C>
static inline void gdot512(const QuantCall& c, const float* const* x, const int64_t* rows,
                           const int64_t* pf, int64_t kb0, int64_t kb1, __m512* st) {
  constexpr int Z = kCentre<QT>;
  constexpr bool kTwo = R <= 2;  // two accumulator sets
  const int64_t K = c.K, G = c.G, gs = K / G;
  const int64_t rb = QT == kQUInt4 ? K / 2 : K;
  const uint8_t* w[C];
  const uint8_t* wn[C];
  const float* sc[C];
  for (int j = 0; j < C; ++j) {
    w[j] = static_cast<const uint8_t*>(c.qw) + rows[j] * rb;
    wn[j] = static_cast<const uint8_t*>(c.qw) + pf[j] * rb;
    sc[j] = c.scale + rows[j] * G;
  }
  __m512 a0[R][C], a1[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) a0[r][j] = a1[r][j] = _mm512_setzero_ps();
  if constexpr (QT == kQUInt4) {
    const __m512 tab = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    __m512 tl[C], th[C];
    auto tables = [&](int64_t gl, int64_t gh) {
      for (int j = 0; j < C; ++j) {
        tl[j] = _mm512_mul_ps(tab, _mm512_set1_ps(sc[j][gl]));
        th[j] = gh == gl ? tl[j] : _mm512_mul_ps(tab, _mm512_set1_ps(sc[j][gh]));
      }
    };
    // one block at k of h bytes (h = 32 for a full block): the low nibble of
    // byte i is element k + i, the high nibble element k + h + i
    auto block = [&](auto full_t, int64_t k, int64_t h, __mmask16 m0, __mmask16 m1) {
      constexpr bool full = decltype(full_t)::value;
      __m512 wl0[C], wl1[C], wh0[C], wh1[C];
      for (int j = 0; j < C; ++j) {
        const uint8_t* p = w[j] + k / 2;
        if (full) _mm_prefetch(reinterpret_cast<const char*>(wn[j] + k / 2), _MM_HINT_T0);
        const __m128i b0 = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                : _mm_maskz_loadu_epi8(m0, p);
        const __m128i b1 = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))
                                : _mm_maskz_loadu_epi8(m1, p + 16);
        const __m512i v0 = _mm512_cvtepu8_epi32(b0), v1 = _mm512_cvtepu8_epi32(b1);
        wl0[j] = _mm512_permutexvar_ps(v0, tl[j]);
        wl1[j] = _mm512_permutexvar_ps(v1, tl[j]);
        wh0[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), th[j]);
        wh1[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), th[j]);
      }
      for (int r = 0; r < R; ++r) {
        const float* xr = x[r] + k;
        const __m512 xl0 = full ? _mm512_loadu_ps(xr) : _mm512_maskz_loadu_ps(m0, xr);
        const __m512 xl1 = full ? _mm512_loadu_ps(xr + 16) : _mm512_maskz_loadu_ps(m1, xr + 16);
        const __m512 xh0 = full ? _mm512_loadu_ps(xr + h) : _mm512_maskz_loadu_ps(m0, xr + h);
        const __m512 xh1 = full ? _mm512_loadu_ps(xr + h + 16) : _mm512_maskz_loadu_ps(m1, xr + h + 16);
        for (int j = 0; j < C; ++j) {
          if constexpr (kTwo) {
            a0[r][j] = _mm512_fmadd_ps(xl0, wl0[j], a0[r][j]);
            a1[r][j] = _mm512_fmadd_ps(xh0, wh0[j], a1[r][j]);
            a0[r][j] = _mm512_fmadd_ps(xl1, wl1[j], a0[r][j]);
            a1[r][j] = _mm512_fmadd_ps(xh1, wh1[j], a1[r][j]);
          } else {
            a0[r][j] = _mm512_fmadd_ps(xl0, wl0[j], a0[r][j]);
            a0[r][j] = _mm512_fmadd_ps(xh0, wh0[j], a0[r][j]);
            a0[r][j] = _mm512_fmadd_ps(xl1, wl1[j], a0[r][j]);
            a0[r][j] = _mm512_fmadd_ps(xh1, wh1[j], a0[r][j]);
          }
        }
      }
    };
    const int64_t kfull = K - K % 64;
    const int64_t ht = (K - kfull) / 2;  // bytes of the partial block
    if (G == 1 || gs % 64 == 0) {
      for (int64_t g = kb0 / gs; g * gs < kb1; ++g) {
        const int64_t ks = g * gs > kb0 ? g * gs : kb0, ke = (g + 1) * gs < kb1 ? (g + 1) * gs : kb1;
        const int64_t kf = ke < kfull ? ke : kfull;
        tables(g, g);
        for (int64_t k = ks; k < kf; k += 64) block(std::true_type{}, k, 32, 0xFFFF, 0xFFFF);
        if (ke > kfull) block(std::false_type{}, kfull, ht, lanes16(ht), lanes16(ht - 16));
      }
    } else {  // G > 1, gs % 64 == 32: a block's halves may lie in different groups
      const int64_t kf = kb1 < kfull ? kb1 : kfull;
      for (int64_t k = kb0; k < kf; k += 64) {
        tables(k / gs, (k + 32) / gs);
        block(std::true_type{}, k, 32, 0xFFFF, 0xFFFF);
      }
      if (kb1 > kfull) {
        tables(kfull / gs, kfull / gs);
        block(std::false_type{}, kfull, ht, lanes16(ht), lanes16(ht - 16));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) st[r * C + j] = _mm512_add_ps(st[r * C + j], _mm512_add_ps(a0[r][j], a1[r][j]));
  } else {
    // 16 weights of row j at k as centred floats (masked lanes read as 0 and
    // meet x lanes masked to 0 too)
    auto wv = [&](auto full_t, int j, int64_t k, __mmask16 m) {
      constexpr bool full = decltype(full_t)::value;
      const __m128i raw = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j] + k))
                               : _mm_maskz_loadu_epi8(m, w[j] + k);
      const __m512i q = QT == kQInt8 ? _mm512_cvtepi8_epi32(raw)
                                     : _mm512_sub_epi32(_mm512_cvtepu8_epi32(raw), _mm512_set1_epi32(Z));
      return _mm512_cvtepi32_ps(q);
    };
    if constexpr (kTwo) {
      __m512 fa[R][C];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < C; ++j) fa[r][j] = st[r * C + j];
      for (int64_t g = kb0 / gs; g * gs < kb1; ++g) {
        const int64_t ks = g * gs > kb0 ? g * gs : kb0, ke = (g + 1) * gs < kb1 ? (g + 1) * gs : kb1;
        int64_t k = ks;
        for (; k + 32 <= ke; k += 32) {
          __m512 w0[C], w1[C];
          for (int j = 0; j < C; ++j) {
            _mm_prefetch(reinterpret_cast<const char*>(wn[j] + k), _MM_HINT_T0);
            w0[j] = wv(std::true_type{}, j, k, 0xFFFF);
            w1[j] = wv(std::true_type{}, j, k + 16, 0xFFFF);
          }
          for (int r = 0; r < R; ++r) {
            const __m512 x0 = _mm512_loadu_ps(x[r] + k), x1 = _mm512_loadu_ps(x[r] + k + 16);
            for (int j = 0; j < C; ++j) {
              a0[r][j] = _mm512_fmadd_ps(x0, w0[j], a0[r][j]);
              a1[r][j] = _mm512_fmadd_ps(x1, w1[j], a1[r][j]);
            }
          }
        }
        if (k < ke) {  // only at K when G == 1 and K % 32 != 0
          const __mmask16 m0 = lanes16(ke - k), m1 = lanes16(ke - k - 16);
          __m512 w0[C], w1[C];
          for (int j = 0; j < C; ++j) {
            w0[j] = wv(std::false_type{}, j, k, m0);
            w1[j] = wv(std::false_type{}, j, k + 16, m1);
          }
          for (int r = 0; r < R; ++r) {
            const __m512 x0 = _mm512_maskz_loadu_ps(m0, x[r] + k);
            const __m512 x1 = _mm512_maskz_loadu_ps(m1, x[r] + k + 16);
            for (int j = 0; j < C; ++j) {
              a0[r][j] = _mm512_fmadd_ps(x0, w0[j], a0[r][j]);
              a1[r][j] = _mm512_fmadd_ps(x1, w1[j], a1[r][j]);
            }
          }
        }
        for (int j = 0; j < C; ++j) {
          const __m512 s = _mm512_set1_ps(sc[j][g]);
          for (int r = 0; r < R; ++r) {
            fa[r][j] = _mm512_fmadd_ps(_mm512_add_ps(a0[r][j], a1[r][j]), s, fa[r][j]);
            a0[r][j] = a1[r][j] = _mm512_setzero_ps();
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < C; ++j) st[r * C + j] = fa[r][j];
    } else {
      const bool scaled = G > 1;  // else s is applied once per pass
      for (int64_t g = kb0 / gs; g * gs < kb1; ++g) {
        const int64_t ks = g * gs > kb0 ? g * gs : kb0, ke = (g + 1) * gs < kb1 ? (g + 1) * gs : kb1;
        __m512 sv[C];
        for (int j = 0; j < C; ++j) sv[j] = _mm512_set1_ps(sc[j][g]);
        int64_t k = ks;
        for (; k + 16 <= ke; k += 16) {
          __m512 w0[C];
          for (int j = 0; j < C; ++j) {
            if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wn[j] + k), _MM_HINT_T0);
            w0[j] = wv(std::true_type{}, j, k, 0xFFFF);
            if (scaled) w0[j] = _mm512_mul_ps(w0[j], sv[j]);
          }
          for (int r = 0; r < R; ++r) {
            const __m512 x0 = _mm512_loadu_ps(x[r] + k);
            for (int j = 0; j < C; ++j) a0[r][j] = _mm512_fmadd_ps(x0, w0[j], a0[r][j]);
          }
        }
        if (k < ke) {  // only at K when G == 1 and K % 16 != 0
          const __mmask16 m0 = lanes16(ke - k);
          __m512 w0[C];
          for (int j = 0; j < C; ++j) {
            w0[j] = wv(std::false_type{}, j, k, m0);
            if (scaled) w0[j] = _mm512_mul_ps(w0[j], sv[j]);
          }
          for (int r = 0; r < R; ++r) {
            const __m512 x0 = _mm512_maskz_loadu_ps(m0, x[r] + k);
            for (int j = 0; j < C; ++j) a0[r][j] = _mm512_fmadd_ps(x0, w0[j], a0[r][j]);
          }
        }
      }
      for (int j = 0; j < C; ++j) {
        const __m512 s = _mm512_set1_ps(sc[j][0]);
        for (int r = 0; r < R; ++r)
          st[r * C + j] = scaled ? _mm512_add_ps(st[r * C + j], a0[r][j])
                                 : _mm512_fmadd_ps(a0[r][j], s, st[r * C + j]);
      }
    }
  }
}

// 4-bit rows in whole 128-element chunks (K % 128 == 0), the small-batch
// hot path: one 64-byte load holds two blocks, and dword lane i holds bytes
// 4i..4i+3. Nibble n of every lane (bits 4n..4n+3) comes to the low bits with
// one shift, and vpermps (which reads only the low 4 index bits) turns the 16
// nibbles into floats: a shift and a permute per 16 weights, where widening
// 16 bytes first costs one more port-5 op, and port 5 bounds this loop. The
// element under nibble n of lane i is q4_elem(i, n); x is permuted to match
// once per call (q4_permute_x), so the dot itself needs no shuffles.
// Scales, by the template parameter S:
//  * kQ4Table (per-channel scales, or groups of 128 and more with R > 2):
//    the 16-entry table is (q - 8) * s, the weight rounded once as
//    dequantization does (like gdot512), built once per group.
//  * kQ4Fold128 (groups of 128 and more, R <= 2): the table is q - 8 for
//    every row, and each chunk's sums are folded in as s * sum((q - 8) x), so
//    no per-row table sits in front of the permutes (about 10% faster at
//    batch 1; with more batch rows the extra sums no longer fit the registers).
//  * kQ4Fold64 / kQ4Fold32: a chunk spans 2 or 4 groups. Lanes 0-7 are block
//    0 and lanes 8-15 block 1, even nibbles a block's low half and odd ones
//    its high half, so the fold takes a per-lane scale vector.
enum { kQ4Table, kQ4Fold128, kQ4Fold64, kQ4Fold32 };

static inline int64_t q4_elem(int i, int n) { return (i / 8) * 64 + (n % 2) * 32 + 4 * (i % 8) + n / 2; }

static void q4_permute_x(const float* xf, int64_t B, int64_t K, float* xp) {
  int32_t idx[128];
  for (int n = 0; n < 8; ++n)
    for (int i = 0; i < 16; ++i) idx[n * 16 + i] = static_cast<int32_t>(q4_elem(i, n));
  for (int64_t r = 0; r < B; ++r)
    for (int64_t k = 0; k < K; k += 128) {
      const float* src = xf + r * K + k;
      float* dst = xp + r * K + k;
      for (int v = 0; v < 8; ++v)
        _mm512_storeu_ps(dst + 16 * v, _mm512_i32gather_ps(_mm512_loadu_si512(idx + 16 * v), src, 4));
    }
}

// The scale scheme for a call, or -1 for gdot512: group boundaries must fall
// on chunk (or half-block) boundaries, so groups of 32, 64 or multiples of 128
// (the native op accepts any multiple of 32); and gdot512 measured faster
// above 4 batch rows (x no longer fits the registers beside the sums) and for
// groups of 32 or 64 above 2 rows (the fold's extra sums leave room for one
// weight row per step). float_gemv512's dispatch instantiates exactly these.
static int q4_scheme(int64_t B, int64_t K, int64_t G) {
  const int64_t gs = K / G;
  if (K % 128 || B > 4 || !(G == 1 || gs % 128 == 0 || gs == 32 || gs == 64)) return -1;
  if (G == 1) return kQ4Table;
  if (gs >= 128) return B == 1 ? kQ4Fold128 : kQ4Table;
  if (B > 2) return -1;
  return gs == 64 ? kQ4Fold64 : kQ4Fold32;
}

// weight rows per step: the sums (and a fold's per-chunk sums) fit the 32 zmm registers
constexpr int q4_cols(int R, int S) {
  if (S == kQ4Fold32) return R == 1 ? 4 : (R == 2 ? 2 : 1);
  return R <= (S == kQ4Table ? 4 : 2) ? 4 : 2;
}

template <int S, int R, int C>
static inline void q4dot512(const QuantCall& c, const float* const* xp, const int64_t* rows,
                            const int64_t* pf, int64_t kb0, int64_t kb1, __m512* st) {
  constexpr bool kFold = S != kQ4Table;
  // sum sets: even / odd nibbles, for their different groups (Fold32) or
  // for two dependency chains over the whole row (Table, R <= 2); a fold's
  // per-chunk sums are short chains, and one set saves a fold FMA
  constexpr int A = (S == kQ4Fold32 || (S == kQ4Table && R <= 2)) ? 2 : 1;
  const int64_t G = c.G, gs = c.K / G;
  const uint8_t* w[C];
  const uint8_t* wn[C];
  const float* sc[C];
  for (int j = 0; j < C; ++j) {
    w[j] = static_cast<const uint8_t*>(c.qw) + rows[j] * (c.K / 2);
    wn[j] = static_cast<const uint8_t*>(c.qw) + pf[j] * (c.K / 2);
    sc[j] = c.scale + rows[j] * G;
  }
  const __m512 tab = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 acc[R][C][A];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j)
      for (int a = 0; a < A; ++a) acc[r][j][a] = _mm512_setzero_ps();
  __m512 tb[C];
  // the group at column k, tracked without a division per chunk: groups of
  // 128 and more change at gend, smaller ones advance 128 / gs per chunk
  int64_t g = kb0 / gs, gend = kb0;
  if (S == kQ4Table || S == kQ4Fold128) --g;
  for (int64_t k = kb0; k < kb1; k += 128) {
    if ((S == kQ4Table || S == kQ4Fold128) && k >= gend) {
      ++g;
      gend += gs;
      if (S == kQ4Table)
        for (int j = 0; j < C; ++j) tb[j] = _mm512_mul_ps(tab, _mm512_set1_ps(sc[j][g]));
    }
    __m512i raw[C];
    for (int j = 0; j < C; ++j) {
      raw[j] = _mm512_loadu_si512(w[j] + k / 2);
      _mm_prefetch(reinterpret_cast<const char*>(wn[j] + k / 2), _MM_HINT_T0);
    }
    __m512 part[R][C][A];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j)
        for (int a = 0; a < A; ++a) part[r][j][a] = _mm512_setzero_ps();
    // unrolled so the shift counts are immediates and the sums stay in registers
#pragma GCC unroll 8
    for (int n = 0; n < 8; ++n) {
      __m512 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(xp[r] + k + 16 * n);
      for (int j = 0; j < C; ++j) {
        const __m512i id = n ? _mm512_srli_epi32(raw[j], 4 * n) : raw[j];
        const __m512 wv = _mm512_permutexvar_ps(id, kFold ? tab : tb[j]);
        for (int r = 0; r < R; ++r) {
          __m512& s = kFold ? part[r][j][n % A] : acc[r][j][n % A];
          s = _mm512_fmadd_ps(xv[r], wv, s);
        }
      }
    }
    if constexpr (kFold) {
      for (int j = 0; j < C; ++j) {
        __m512 se, so;
        if constexpr (S == kQ4Fold128) {
          se = so = _mm512_set1_ps(sc[j][g]);
        } else if constexpr (S == kQ4Fold64) {
          se = so = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc[j][g]), _mm512_set1_ps(sc[j][g + 1]));
        } else {
          se = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc[j][g]), _mm512_set1_ps(sc[j][g + 2]));
          so = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc[j][g + 1]), _mm512_set1_ps(sc[j][g + 3]));
        }
        for (int r = 0; r < R; ++r) {
          acc[r][j][0] = _mm512_fmadd_ps(part[r][j][0], se, acc[r][j][0]);
          if constexpr (A == 2) acc[r][j][A - 1] = _mm512_fmadd_ps(part[r][j][A - 1], so, acc[r][j][A - 1]);
        }
      }
      if (S == kQ4Fold64) g += 2;
      if (S == kQ4Fold32) g += 4;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) {
      __m512 s = acc[r][j][0];
      for (int a = 1; a < A; ++a) s = _mm512_add_ps(s, acc[r][j][a]);
      st[r * C + j] = _mm512_add_ps(st[r * C + j], s);
    }
}

// weight rows per step for R batch rows: the accumulators fit the 32 zmm registers
constexpr int gemv512_cols(int R) { return R <= 4 ? 4 : 2; }
constexpr int64_t kGemvXBytes = 24 << 10;  // x columns per pass stay in L1

template <int QT, bool OFF>
static void float_gemv512(const QuantCall& c, const float* xf) {
  const int64_t tiles = (c.N + kGemvRows - 1) / kGemvRows;
  const int nt = threads_for(c, c.B * c.N * c.K, tiles);
  const int64_t K = c.K, G = c.G, gs = K / G;
  constexpr bool kSum = OFF || kCentre<QT> != 0;
  float* xsum = static_cast<float*>(qalloc(c.B * G * 4));
  if (kSum) {
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t g = 0; g < G; ++g) {
        const float* xr = xf + b * K + g * gs;
        __m512 s = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= gs; k += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xr + k));
        if (k < gs) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(lanes16(gs - k), xr + k));
        xsum[b * G + g] = _mm512_reduce_add_ps(s);
      }
  }
  // 4-bit rows in whole chunks take q4dot512 with scale scheme `scheme` on x
  // permuted to its order; -1 (also when xp cannot be allocated): gdot512 on xf
  int scheme = QT == kQUInt4 ? q4_scheme(c.B, K, G) : -1;
  float* xp = scheme >= 0 ? static_cast<float*>(qalloc(c.B * K * 4)) : nullptr;
  if (xp) q4_permute_x(xf, c.B, K, xp);
  else scheme = -1;
  // column passes: whole groups (both halves of every 4-bit block in one
  // pass; whole chunks and groups with the chunk gemv), about kGemvXBytes of x each
  const int64_t unit = scheme >= 0 ? (G > 1 && gs > 128 ? gs : 128) : (G == 1 ? 64 : (gs % 64 == 0 ? gs : 2 * gs));
  int64_t kb = kGemvXBytes / (4 * c.B) / unit * unit;
  kb = kb < unit ? unit : kb;
  const int R = static_cast<int>(c.B);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t nbeg = t * kGemvRows, nend = (t + 1) * kGemvRows < c.N ? (t + 1) * kGemvRows : c.N;
    auto run_tile = [&](auto rc, auto sch) {
      constexpr int RR = decltype(rc)::value, S = decltype(sch)::value;
      const float* x[8];
      for (int r = 0; r < R; ++r) x[r] = (S >= 0 ? xp : xf) + r * K;
      constexpr int CC = S >= 0 ? q4_cols(RR, S) : gemv512_cols(RR);
      constexpr int kSteps = (kGemvRows + CC - 1) / CC;
      __m512 st[kSteps * RR * CC];
      for (int i = 0; i < kSteps * RR * CC; ++i) st[i] = _mm512_setzero_ps();
      for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t k1 = k0 + kb < K ? k0 + kb : K;
        for (int64_t n0 = nbeg, i = 0; n0 < nend; n0 += CC, ++i) {
          const int cnt = static_cast<int>(nend - n0 < CC ? nend - n0 : CC);
          int64_t rows[CC], pf[CC];
          for (int j = 0; j < CC; ++j) {
            rows[j] = n0 + (j < cnt ? j : cnt - 1);
            pf[j] = rows[j] + CC < c.N ? rows[j] + CC : c.N - 1;
          }
          if constexpr (S < 0) gdot512<QT, OFF, RR, CC>(c, x, rows, pf, k0, k1, st + i * RR * CC);
          else q4dot512<S, RR, CC>(c, x, rows, pf, k0, k1, st + i * RR * CC);
        }
      }
      for (int64_t n0 = nbeg, i = 0; n0 < nend; n0 += CC, ++i) {
        const int cnt = static_cast<int>(nend - n0 < CC ? nend - n0 : CC);
        for (int r = 0; r < RR; ++r) {
          float acc[CC];
          for (int j = 0; j < cnt; ++j) {
            acc[j] = _mm512_reduce_add_ps(st[(i * RR + r) * CC + j]);
            if (kSum) {
              const float* sc = c.scale + (n0 + j) * G;
              const float* of = OFF ? c.offset + (n0 + j) * G : nullptr;
              for (int64_t g = 0; g < G; ++g) {
                const float o = (OFF ? of[g] : 0.f) + static_cast<float>(kCentre<QT>) * sc[g];
                acc[j] += o * xsum[r * G + g];
              }
            }
          }
          store_row(c, r, n0, cnt, acc);
        }
      }
    };
    // only the (rows, scheme) pairs q4_scheme can return are instantiated
    auto by_scheme = [&](auto rc) {
      constexpr int RV = decltype(rc)::value;
      using I = std::integral_constant<int, -1>;
      if constexpr (QT == kQUInt4 && RV <= 4) {
        if (scheme == kQ4Table) return run_tile(rc, std::integral_constant<int, kQ4Table>{});
        if constexpr (RV == 1)
          if (scheme == kQ4Fold128) return run_tile(rc, std::integral_constant<int, kQ4Fold128>{});
        if constexpr (RV <= 2) {
          if (scheme == kQ4Fold64) return run_tile(rc, std::integral_constant<int, kQ4Fold64>{});
          if (scheme == kQ4Fold32) return run_tile(rc, std::integral_constant<int, kQ4Fold32>{});
        }
      }
      run_tile(rc, I{});
    };
    switch (R) {
      case 1: by_scheme(std::integral_constant<int, 1>{}); break;
      case 2: by_scheme(std::integral_constant<int, 2>{}); break;
      case 3: by_scheme(std::integral_constant<int, 3>{}); break;
      case 4: by_scheme(std::integral_constant<int, 4>{}); break;
      case 5: by_scheme(std::integral_constant<int, 5>{}); break;
      case 6: by_scheme(std::integral_constant<int, 6>{}); break;
      case 7: by_scheme(std::integral_constant<int, 7>{}); break;
      default: by_scheme(std::integral_constant<int, 8>{}); break;
    }
  }
  std::free(xsum);
  std::free(xp);
}
#endif  // PYOPT_QF512

#if defined(PYOPT_QI512)
// Integer path with vpdpbusd (unsigned x signed bytes into int32 lanes, no
// saturation). 8-bit signed weights go in as w ^ 0x80 = w + 128; the excess
// 128 * sum(x) is taken off exactly in integers (below). 4-bit blocks are
// broadcast to both 256-bit halves and the upper half shifted by 4, so one
// 32-byte load gives the 64 nibbles in element order.
//
// x is int8 in rows of Kp = K rounded up to 64, zero padded; for packed
// 4-bit weights a final partial block of t elements is laid out as
// [t/2 low-nibble elements, zeros, t/2 high-nibble elements, zeros] to match
// the broadcast block. Dword lane i of a 64-element block sums elements
// 4i..4i+3, so lanes 0-7 hold elements 0-31 and lanes 8-15 elements 32-63.
//
// Modes: per-channel (G == 1) reduces the int32 lanes exactly (to int64 every
// kISeg columns) and scales once; groups with gs % 64 == 0 turn the lanes of
// each group to float (exact, |lane| < 2^24) times the group scale; groups
// with gs % 64 == 32 do that per block, each half with its own group's scale.
enum IMode : int { kIExact = 0, kIGroup = 1, kIHalf = 2 };
constexpr int64_t kISeg = 8192;  // columns per exact int32 lane segment (no overflow)

struct QX512 {
  const int8_t* q;
  int64_t Kp;
  const int32_t* ncomp;  // int8 weights, grouped: [B, nseg, 16] lanes of -128 * x per segment
  int64_t nseg;
};

template <int QT, int MODE, int R, int C>
static inline void idot512(const QuantCall& c, const QX512& X, int64_t b0, const int64_t* rows,
                           const int32_t* xs, float (*facc)[4]) {
  const int64_t K = c.K, G = c.G, gs = K / G;
  const int64_t kfull = K - K % 64;
  const int64_t rb = QT == kQUInt4 ? K / 2 : K;
  const uint8_t* w[C];
  const uint8_t* wn[C];  // the rows of the next step, prefetched at the same columns
  const float* sc[C];
  for (int j = 0; j < C; ++j) {
    w[j] = static_cast<const uint8_t*>(c.qw) + rows[j] * rb;
    wn[j] = static_cast<const uint8_t*>(c.qw) + (rows[j] + C < c.N ? rows[j] + C : c.N - 1) * rb;
    sc[j] = c.scale + rows[j] * G;
  }
  const int8_t* x[R];
  for (int r = 0; r < R; ++r) x[r] = X.q + (b0 + r) * X.Kp;
  const __m512i nib = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i shv = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  __m512i a[R][C];
  // the block at k (t <= 64 elements; t < 64 only for the last)
  auto block = [&](int64_t k, int64_t t) {
    __m512i wv[C];
    for (int j = 0; j < C; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(wn[j] + (QT == kQUInt4 ? k / 2 : k)), _MM_HINT_T0);
      if constexpr (QT == kQUInt4) {
        const __m256i raw =
            t == 64 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k / 2))
                    : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1ull << (t / 2)) - 1), w[j] + k / 2);
        wv[j] = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(raw), shv), nib);
      } else {
        __m512i raw = t == 64 ? _mm512_loadu_si512(w[j] + k)
                              : _mm512_maskz_loadu_epi8(static_cast<__mmask64>((1ull << t) - 1), w[j] + k);
        wv[j] = QT == kQInt8 ? _mm512_xor_si512(raw, flip) : raw;  // past K: x is 0
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_loadu_si512(x[r] + k);
      for (int j = 0; j < C; ++j) a[r][j] = _mm512_dpbusd_epi32(a[r][j], wv[j], xv);
    }
  };
  auto zero = [&]() {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) a[r][j] = _mm512_setzero_si512();
  };
  // grouped modes start each segment's lanes at -128 * x (int8 weights)
  auto start = [&](int64_t seg) {
    if constexpr (QT == kQInt8) {
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_loadu_si512(X.ncomp + ((b0 + r) * X.nseg + seg) * 16);
        for (int j = 0; j < C; ++j) a[r][j] = v;
      }
    } else {
      (void)seg;
      zero();
    }
  };
  if constexpr (MODE == kIExact) {
    int64_t dot[R][C] = {};
    for (int64_t s0 = 0; s0 < K; s0 += kISeg) {
      const int64_t s1 = s0 + kISeg < K ? s0 + kISeg : K;
      const int64_t e = s1 < kfull ? s1 : kfull;
      zero();
      int64_t k = s0;
      for (; k < e; k += 64) block(k, 64);
      if (k < s1) block(k, s1 - k);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < C; ++j) dot[r][j] += _mm512_reduce_add_epi32(a[r][j]);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t comp = QT == kQInt8 ? 128 * static_cast<int64_t>(xs[b0 + r]) : 0;
      for (int j = 0; j < C; ++j)
        facc[r][j] = static_cast<float>(static_cast<double>(dot[r][j] - comp) * static_cast<double>(sc[j][0]));
    }
  } else {
    __m512 fa[R][C];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) fa[r][j] = _mm512_setzero_ps();
    if constexpr (MODE == kIGroup) {  // G > 1, gs % 64 == 0: K % 64 == 0 too
      for (int64_t g = 0; g < G; ++g) {
        start(g);
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 64) block(k, 64);
        for (int j = 0; j < C; ++j) {
          const __m512 s = _mm512_set1_ps(sc[j][g]);
          for (int r = 0; r < R; ++r) fa[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][j]), s, fa[r][j]);
        }
      }
    } else {  // G > 1, gs % 64 == 32: K % 64 is 0 or 32
      for (int64_t k = 0, seg = 0; k < K; k += 64, ++seg) {
        const int64_t t = K - k < 64 ? K - k : 64;
        start(seg);
        block(k, t);
        const int64_t gl = k / gs, gh = t == 64 ? (k + 32) / gs : gl;
        for (int j = 0; j < C; ++j) {
          const __m512 s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc[j][gl]), _mm512_set1_ps(sc[j][gh]));
          for (int r = 0; r < R; ++r) fa[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][j]), s, fa[r][j]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) facc[r][j] = _mm512_reduce_add_ps(fa[r][j]);
  }
}

// weight rows per step for R batch rows (int and float lane sets fit the registers)
constexpr int int512_cols(int mode, int R) { return mode == kIExact ? 4 : (R <= 2 ? 4 : (R == 3 ? 3 : 2)); }

template <int QT>
static void int_gemm512(const QuantCall& c, const float* xf) {
  const int64_t B = c.B, K = c.K, G = c.G, gs = K / G;
  const int64_t Kp = (K + 63) / 64 * 64;
  const int mode = G == 1 ? kIExact : (gs % 64 == 0 ? kIGroup : kIHalf);
  const int64_t nseg = mode == kIGroup ? G : (mode == kIHalf ? Kp / 64 : 0);
  int8_t* qx = static_cast<int8_t*>(qalloc(B * Kp + 64));
  int8_t* qa = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(qx) + 63) & ~uintptr_t(63));
  float* sx = static_cast<float*>(qalloc(B * 4));
  int32_t* xs = static_cast<int32_t*>(qalloc(B * G * 4));
  int32_t* ncomp = static_cast<int32_t*>(qalloc((QT == kQInt8 ? B * nseg * 16 : 0) * 4));
  {
    const int nt = threads_for(c, B * K * 64, B);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t b = 0; b < B; ++b) {
      const float* xr = xf + b * K;
      int8_t* q = qa + b * Kp;
      std::memset(q, 0, static_cast<size_t>(Kp));
      sx[b] = quantize_row512(xr, K, q);
      if (std::isnan(sx[b])) {
        for (int64_t g = 0; g < G; ++g) xs[b * G + g] = 0;
      } else {
        for (int64_t g = 0; g < G; ++g) {
          int32_t s = 0;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += q[k];
          xs[b * G + g] = s;
        }
        if (QT == kQUInt4 && K % 64) {  // re-lay the partial block
          const int64_t k0 = K - K % 64, h = (K - k0) / 2;
          int8_t hi_part[32];
          std::memcpy(hi_part, q + k0 + h, static_cast<size_t>(h));
          std::memset(q + k0 + h, 0, static_cast<size_t>(64 - h));
          std::memcpy(q + k0 + 32, hi_part, static_cast<size_t>(h));
        }
      }
      if (QT == kQInt8 && nseg) {
        const int64_t seglen = mode == kIGroup ? gs : 64;
        const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
        for (int64_t s = 0; s < nseg; ++s) {
          __m512i v = _mm512_setzero_si512();
          for (int64_t k = s * seglen; k < (s + 1) * seglen && k < Kp; k += 64)
            v = _mm512_dpbusd_epi32(v, flip, _mm512_load_si512(q + k));
          _mm512_storeu_si512(ncomp + (b * nseg + s) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), v));
        }
      }
    }
  }
  const QX512 X{qa, Kp, ncomp, nseg};
  const int64_t panels = (c.N + kPanel - 1) / kPanel;
  const int nt = threads_for(c, B * c.N * K / 4, panels);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* acc = static_cast<float*>(qalloc(B * kPanel * 4));
    auto step = [&](auto md, auto rc, int64_t n0, int64_t nend, int64_t b0) {
      constexpr int MD = decltype(md)::value, RR = decltype(rc)::value, CC = int512_cols(MD, RR);
      for (int64_t j0 = n0; j0 < nend; j0 += CC) {
        const int cnt = static_cast<int>(nend - j0 < CC ? nend - j0 : CC);
        int64_t rows[CC];
        for (int j = 0; j < CC; ++j) rows[j] = j0 + (j < cnt ? j : cnt - 1);
        float t[4][4];
        idot512<QT, MD, RR, CC>(c, X, b0, rows, xs, t);
        for (int r = 0; r < RR; ++r)
          for (int j = 0; j < cnt; ++j) acc[(b0 + r) * kPanel + (j0 - n0) + j] = t[r][j];
      }
    };
    auto by_rows = [&](auto md, int64_t n0, int64_t nend) {
      for (int64_t b0 = 0; b0 < B; b0 += 4) {
        switch (B - b0 < 4 ? B - b0 : 4) {
          case 1: step(md, std::integral_constant<int, 1>{}, n0, nend, b0); break;
          case 2: step(md, std::integral_constant<int, 2>{}, n0, nend, b0); break;
          case 3: step(md, std::integral_constant<int, 3>{}, n0, nend, b0); break;
          default: step(md, std::integral_constant<int, 4>{}, n0, nend, b0); break;
        }
      }
    };
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kPanel, rows = c.N - n0 < kPanel ? c.N - n0 : kPanel;
      if (mode == kIExact) by_rows(std::integral_constant<int, kIExact>{}, n0, n0 + rows);
      else if (mode == kIGroup) by_rows(std::integral_constant<int, kIGroup>{}, n0, n0 + rows);
      else by_rows(std::integral_constant<int, kIHalf>{}, n0, n0 + rows);
      for (int64_t b = 0; b < B; ++b) {
        float* v = acc + b * kPanel;
        for (int64_t j = 0; j < rows; ++j) {
          if (c.offset) {
            const float* o = c.offset + (n0 + j) * G;
            const int32_t* s = xs + b * G;
            for (int64_t g = 0; g < G; ++g) v[j] += o[g] * static_cast<float>(s[g]);
          }
          v[j] *= sx[b];
        }
        store_row(c, b, n0, rows, v);
      }
    }
    std::free(acc);
  }
  std::free(qx);
  std::free(sx);
  std::free(xs);
  std::free(ncomp);
}
#endif  // PYOPT_QI512

// ---------------------------------------------------------------- entry
template <int QT, bool OFF>
static void run_spec(const QuantCall& c) {
  float* owned = nullptr;
  const float* xf = float_x(c, &owned);
  if (c.act == kActFloat) {
#if defined(PYOPT_QF512)
    if (c.B <= kGemvBatch) float_gemv512<QT, OFF>(c, xf);
#else
    if (c.B <= kGemvBatch) float_gemv<QT, OFF>(c, xf);
#endif
    else float_panel<QT, OFF>(c, xf);
  } else {
#if defined(PYOPT_QI512)
    int_gemm512<QT>(c, xf);
#else
    float* sx = static_cast<float*>(qalloc(c.B * 4));
    int32_t* xs = static_cast<int32_t*>(qalloc(c.B * c.G * 4));
    if constexpr (QT == kQUInt4) {
      int8_t* qx = static_cast<int8_t*>(qalloc(c.B * c.K + 64));
      quantize_rows(c, xf, qx, sx, xs);
      int_gemm<QT>(c, qx, sx, xs);
      std::free(qx);
    } else {
      int16_t* qx = static_cast<int16_t*>(qalloc(c.B * c.K * 2 + 64));
      quantize_rows(c, xf, qx, sx, xs);
      int_gemm<QT>(c, qx, sx, xs);
      std::free(qx);
    }
    std::free(sx);
    std::free(xs);
#endif
  }
  std::free(owned);
}

// Weight type and offset are template parameters so the inner loops carry no
// branches on them.
static void run(const QuantCall& c) {
  const bool off = c.offset != nullptr;
  if (c.qtype == kQInt8) return off ? run_spec<kQInt8, true>(c) : run_spec<kQInt8, false>(c);
  if (c.qtype == kQUInt8) return off ? run_spec<kQUInt8, true>(c) : run_spec<kQUInt8, false>(c);
  return off ? run_spec<kQUInt4, true>(c) : run_spec<kQUInt4, false>(c);
}

}  // namespace PYOPT_ISA

void PYOPT_CAT(quant_linear, PYOPT_ISA)(const QuantCall& c) { PYOPT_ISA::run(c); }

}  // namespace pyopt
