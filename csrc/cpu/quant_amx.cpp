// AMX tile kernels for the quantized linear at larger batch (Sapphire Rapids
// and later). Compiled only where the compiler takes -mamx-* (see
// CMakeLists.txt); used only when the CPU has AMX-TILE/INT8/BF16, Linux grants
// the tile state, the avx512 variant is current and the shape qualifies
// (quant_amx_applies); everything else runs the per-ISA kernels.
//
// One scheme serves both paths. The weight rows are the A operand (16 rows x
// 64 bytes a tile, straight from int8/uint8 weights or unpacked into a panel
// buffer), x is the B operand, packed per call into the tile-pair layout, so
// a C tile holds out^T for 16 weight rows x 16 tokens. A 2x2 block of C
// tiles (32 weight rows x 32 tokens) runs over one group at a time; each
// group's C tiles are folded into float accumulators with the group's scale.
//  * act=int8: per-token int8 x (bitwise the quantization of quant_kernels.h),
//    TDPBSSD for int8 weights, TDPBUSD for unsigned uint8 codes and nibbles;
//    integer dots are exact, offsets come from the per-group x sums.
//  * float activations: the factored form of quant_kernels.h's gdot, W =
//    s (q - z) + (o + z s). (q - z) is a small integer, exact in bf16; x is
//    split into bf16 parts that sum to it exactly (3 for fp32, 2 for fp16,
//    1 for bf16), so every TDPBF16PS product is exact and only the fp32
//    accumulation rounds, as in an fp32 GEMM.
#include "cpu/quant_cpu.h"

#if defined(PYOPT_HAVE_AMX)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#define PYOPT_ISA amx
#include "cpu/convert.h"

namespace pyopt {
namespace amx {

#include "cpu/quant_x512.h"

constexpr int64_t kMinBatch = 16;  // below this the per-ISA gemv/int kernels win (measured)
constexpr int64_t kPanel = 32;     // weight rows per work item: two A tiles
constexpr int64_t kSeg = 1024;     // columns per fold when there is one group per row
constexpr int64_t kChunk = 8;      // panels per work item (their accumulators stay in L2)
constexpr int64_t kL2X = 1 << 20;  // packed x bytes above which panels go in chunks

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Scratch, 64-byte aligned; every allocation happens outside the parallel
// regions, so a failure reaches Python as MemoryError (std::bad_alloc).
struct Scratch {
  void* p;
  explicit Scratch(int64_t bytes)
      : p(std::aligned_alloc(64, static_cast<size_t>((bytes + 63) / 64 * 64 + 64))) {
    if (!p) throw std::bad_alloc();
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as(int64_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<uint8_t*>(p) + byte_offset);
  }
};

static inline int64_t round64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// ---------------------------------------------------------------- detection
static const char* detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return "CPUID leaf 7 missing";
  const bool bf16 = (d >> 22) & 1, tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
  if (!(tile && int8 && bf16)) return "CPU has no AMX-TILE/AMX-INT8/AMX-BF16";
#if defined(__linux__)
  // Linux hands out the 8 KB tile state only on request (ARCH_REQ_XCOMP_PERM).
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return "the kernel refused the AMX tile state";
  unsigned lo, hi;
  __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3) != 3) return "the OS does not enable the AMX tile state (XCR0)";
  return nullptr;
#else
  return "AMX is enabled only on Linux";
#endif
}

static std::atomic<bool> g_on{[] {
  const char* env = std::getenv("PYOPT_CPU_AMX");
  return !(env && std::strcmp(env, "0") == 0);
}()};

// nullptr when usable, else the reason; detected once (thread-safe static)
static const char* unsupported() {
  static const char* why = detect();
  return why;
}

// ---------------------------------------------------------------- x packing
// Tile-pair layout of B: 1 KB blocks of 16 rows x 64 bytes, ordered by
// column chunk, then part, then 16-token block, so the x of a group (every
// part and token) is one contiguous run that L2 keeps without set conflicts.
// Row r of block (kc, part, mb) holds, for each of its 16 tokens, the E
// elements k = kc*KC + E*r + [0, E) (E = 4 int8 or 2 bf16, KC = 16 E).
// Padding tokens are zero.
static inline int64_t xblock(int64_t kc, int64_t part, int64_t nparts, int64_t mb, int64_t mbs) {
  return ((kc * nparts + part) * mbs + mb) * 1024;  // bytes
}

// Per-token int8 quantization (quant_x512.h, as on every backend), written
// packed: 64 codes of a chunk are 16 groups of 4, one to each row of the block.
template <typename T>
static inline __m512 load16(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, bf16>) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

static inline void scatter_rows(const void* chunk64, uint8_t* dst) {
  // 16 four-byte pieces to 16 rows 64 bytes apart
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(64));
  _mm512_i32scatter_epi32(dst, idx, _mm512_loadu_si512(chunk64), 1);
}

template <typename T>
static void pack_int8(const QuantCall& c, const T* x, int8_t* xp, float* sx, int32_t* xs,
                      int64_t mbs, int64_t ldx, int nt) {
  const int64_t gs = c.K / c.G, row_bytes = round64(c.K * 4) + round64(c.K);
  Scratch rows(nt * row_bytes);  // per thread: the row as float, then its codes
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < c.B; ++b) {
#if defined(_OPENMP)
    const int64_t me = omp_get_thread_num();
#else
    const int64_t me = 0;
#endif
    float* xf_buf = rows.as<float>(me * row_bytes);
    const float* xf = xf_buf;
    int8_t* q = rows.as<int8_t>(me * row_bytes + round64(c.K * 4));
    const T* xr = x + b * c.K;
    if constexpr (std::is_same_v<T, float>) {
      xf = xr;  // fp32 rows are read in place
    } else {
      for (int64_t k = 0; k < c.K; k += 16) _mm512_storeu_ps(xf_buf + k, load16(xr + k));
    }
    sx[b] = quantize_row512(xf, c.K, q);
    uint8_t* base = reinterpret_cast<uint8_t*>(xp) + xblock(0, 0, 1, b / 16, mbs) + (b % 16) * 4;
    for (int64_t g = 0; g < c.G; ++g) {
      __m512i s = _mm512_setzero_si512();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 64) {
        const __m512i v = _mm512_loadu_si512(q + k);
        s = _mm512_add_epi32(s, _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), v));
        scatter_rows(q + k, base + xblock(k / 64, 0, 1, 0, mbs));
      }
      xs[g * ldx + b] = _mm512_reduce_add_epi32(s);  // zero for a NaN row (its codes are zero)
    }
  }
}

// x as nsplit bf16 parts summing exactly to it, part-major; xsum [G, ldx]
// holds the float group sums for the offset term.
static inline __m512i bf16_rne(__m512 f) {
  // as from_float: round to nearest even, NaN to the canonical quiet NaN
  const __m512i u = _mm512_castps_si512(f);
  const __m512i r = _mm512_add_epi32(
      u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(r, 16), _mm512_set1_epi32(0x7fc0));
}

template <typename T>
static void pack_bf16(const QuantCall& c, const T* x, uint16_t* xp, float* xsum, int64_t mbs,
                      int64_t ldx, int nsplit, int nt) {
  const int64_t gs = c.K / c.G;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < c.B; ++b) {
    const T* xr = x + b * c.K;
    uint8_t* base = reinterpret_cast<uint8_t*>(xp) + xblock(0, 0, nsplit, b / 16, mbs) + (b % 16) * 4;
    alignas(64) uint16_t h[32];
    for (int64_t g = 0; g < c.G; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
        __m512 r[2] = {load16(xr + k), load16(xr + k + 16)};
        s = _mm512_add_ps(s, _mm512_add_ps(r[0], r[1]));
        for (int p = 0; p < nsplit; ++p) {
          for (int e = 0; e < 2; ++e) {
            const __m512i hb = bf16_rne(r[e]);
            _mm256_store_si256(reinterpret_cast<__m256i*>(h + 16 * e), _mm512_cvtepi32_epi16(hb));
            // inf or NaN goes in the first part only, so it reaches the output
            // as F.linear's would rather than as inf - inf
            const __m512 rest = _mm512_sub_ps(r[e], _mm512_castsi512_ps(_mm512_slli_epi32(hb, 16)));
            const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_abs_ps(r[e]), _mm512_set1_ps(3.4028234663852886e38f), _CMP_LE_OQ);
            r[e] = _mm512_maskz_mov_ps(fin, rest);
          }
          scatter_rows(h, base + xblock(k / 32, p, nsplit, 0, mbs));
        }
      }
      xsum[g * ldx + b] = _mm512_reduce_add_ps(s);
    }
  }
}

// ---------------------------------------------------------------- weights
// Columns [ks, ke) of weight rows n0..n0+rows into buf (ld bytes a row),
// zero-padded to kPanel rows. Int path: the codes as bytes (4-bit unpacked to
// one code a byte, k order). Float path: bf16 (q - z).
static void prep_panel(const QuantCall& c, bool as_bf16, int64_t n0, int64_t rows, int64_t ks,
                       int64_t ke, uint8_t* buf, int64_t ld) {
  const uint8_t* qw = static_cast<const uint8_t*>(c.qw);
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const int z = c.qtype == kQInt8 ? 0 : (c.qtype == kQUInt8 ? 128 : 8);
  // bf16 bits of q - 8 for each nibble q, for one vpermw per 32 codes
  const __m512i lut = _mm512_setr_epi32(
      0xC0E0C100, 0xC0A0C0C0, 0xC040C080, 0xBF80C000, 0x3F800000, 0x40404000,
      0x40A04080, 0x40E040C0, 0, 0, 0, 0, 0, 0, 0, 0);
  alignas(64) uint8_t codes[64];
  for (int64_t j = 0; j < kPanel; ++j) {
    uint8_t* dst = buf + j * ld;
    if (j >= rows) {
      std::memset(dst, 0, static_cast<size_t>(ld));
      continue;
    }
    // a chunk visits many rows a segment at a time, more streams than the
    // hardware prefetcher follows: fetch this row's next segment now
    const int64_t rb = c.qtype == kQUInt4 ? c.K / 2 : c.K, w = c.qtype == kQUInt4 ? 2 : 1;
    if (ke < c.K)
      for (int64_t o = ke / w; o < (2 * ke - ks) / w && o < rb; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(qw + (n0 + j) * rb + o), _MM_HINT_T0);
    for (int64_t k = ks; k < ke; k += 64) {
      uint8_t* d = dst + (k - ks) * (as_bf16 ? 2 : 1);
      const uint8_t* src;
      if (c.qtype == kQUInt4) {
        // a 64-element block: byte i holds element i (low) and i + 32 (high)
        const __m256i raw = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(qw + (n0 + j) * (c.K / 2) + k / 2));
        const __m256i lo = _mm256_and_si256(raw, nib);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
        if (as_bf16) {
          _mm512_storeu_si512(d, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(lo), lut));
          _mm512_storeu_si512(d + 64, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(hi), lut));
          continue;
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes), lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes + 32), hi);
        src = codes;
      } else {
        src = qw + (n0 + j) * c.K + k;
      }
      if (!as_bf16) {
        std::memcpy(d, src, 64);
        continue;
      }
      for (int e = 0; e < 64; e += 16) {
        const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e));
        const __m512i q32 = c.qtype == kQInt8 ? _mm512_cvtepi8_epi32(q8) : _mm512_cvtepu8_epi32(q8);
        const __m512 w = _mm512_cvtepi32_ps(_mm512_sub_epi32(q32, _mm512_set1_epi32(z)));
        // a small integer as float has a zero low half: its bf16 is the top half
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 2 * e),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16)));
      }
    }
  }
}

// ---------------------------------------------------------------- tiles
enum Op { kSS, kUS, kBF };

template <int OP>
static inline void dp(int which) {
  // tile numbers are immediates: C(i, j) = 2 i + j, A(i) = 4 + i, B(j) = 6 + j
  if constexpr (OP == kSS) {
    if (which == 0) _tile_dpbssd(0, 4, 6);
    else if (which == 1) _tile_dpbssd(1, 4, 7);
    else if (which == 2) _tile_dpbssd(2, 5, 6);
    else _tile_dpbssd(3, 5, 7);
  } else if constexpr (OP == kUS) {
    if (which == 0) _tile_dpbusd(0, 4, 6);
    else if (which == 1) _tile_dpbusd(1, 4, 7);
    else if (which == 2) _tile_dpbusd(2, 5, 6);
    else _tile_dpbusd(3, 5, 7);
  } else {
    if (which == 0) _tile_dpbf16ps(0, 4, 6);
    else if (which == 1) _tile_dpbf16ps(1, 4, 7);
    else if (which == 2) _tile_dpbf16ps(2, 5, 6);
    else _tile_dpbf16ps(3, 5, 7);
  }
}

// Columns [ks, ke) of a 2x2 block: A rows from a (column a_k0 first, stride lda bytes, two
// 16-row tiles unless one_a), B from the packed x blocks mb and mb + 1
// (one_b: only mb), for each of nparts x parts.
template <int OP>
static inline void block(const uint8_t* a, int64_t lda, int64_t a_k0, const uint8_t* xp,
                         int64_t mbs, int64_t mb, int64_t ks, int64_t ke, int64_t kc_cols, bool one_a, bool one_b,
                         int nparts) {
  const int64_t esz = OP == kBF ? 2 : 1;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = ks; k < ke; k += kc_cols) {
    const int64_t kc = k / kc_cols;
    _tile_loadd(4, a + (k - a_k0) * esz, lda);
    if (!one_a) _tile_loadd(5, a + 16 * lda + (k - a_k0) * esz, lda);
    for (int p = 0; p < nparts; ++p) {
      const uint8_t* xb = xp + xblock(kc, p, nparts, mb, mbs);
      _tile_loadd(6, xb, 64);
      if (!one_b) _tile_loadd(7, xb + 1024, 64);
      dp<OP>(0);
      if (!one_b) dp<OP>(1);
      if (!one_a) {
        dp<OP>(2);
        if (!one_b) dp<OP>(3);
      }
    }
  }
}

// acc[n][m] (ldacc floats a row) += scale[n] * C(n, m) for the 2x2 block;
// rows at or past `rows` (a partial panel) have no scale and stay zero.
template <int OP>
static inline void fold(float* acc, int64_t ldacc, int64_t m0, const float* scale, int64_t sstride,
                        int64_t rows, bool one_a, bool one_b, int32_t* ct) {
  _tile_stored(0, ct, 64);
  if (!one_b) _tile_stored(1, ct + 256, 64);
  if (!one_a) {
    _tile_stored(2, ct + 512, 64);
    if (!one_b) _tile_stored(3, ct + 768, 64);
  }
  for (int t = 0; t < 4; ++t) {
    const int i = t / 2, j = t % 2;
    if ((i && one_a) || (j && one_b)) continue;
    for (int r = 0; r < 16 && 16 * i + r < rows; ++r) {
      const __m512i raw = _mm512_load_si512(ct + t * 256 + r * 16);
      const __m512 v = OP == kBF ? _mm512_castsi512_ps(raw) : _mm512_cvtepi32_ps(raw);
      float* dst = acc + (16 * i + r) * ldacc + m0 + 16 * j;
      const __m512 s = _mm512_set1_ps(scale[(16 * i + r) * sstride]);
      _mm512_storeu_ps(dst, _mm512_fmadd_ps(v, s, _mm512_loadu_ps(dst)));
    }
  }
}

// out[b, n] for the panel. Per-group terms run over b in vectors: xs and xsum
// are [G, ldacc] (token-minor). Int path: (acc + sum_g o_g xs_g) * sx. Float
// path: acc + sum_g (o_g + z s_g) xsum_g. Then bias, one rounding to dtype.
template <typename T>
static void store(const QuantCall& c, int64_t n0, int64_t rows, float* acc, int64_t ldacc,
                  const float* sx, const int32_t* xs, const float* xsum) {
  const float z = static_cast<float>(c.qtype == kQInt8 ? 0 : (c.qtype == kQUInt8 ? 128 : 8));
  T* out = static_cast<T*>(c.out);
  const T* bias = static_cast<const T*>(c.bias);
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t n = n0 + j;
    const float* o = c.offset ? c.offset + n * c.G : nullptr;
    const float* s = c.scale + n * c.G;
    float* v = acc + j * ldacc;
    for (int64_t b = 0; b < ldacc; b += 16) {
      __m512 a = _mm512_loadu_ps(v + b);
      if (sx) {
        if (o)
          for (int64_t g = 0; g < c.G; ++g)
            a = _mm512_fmadd_ps(_mm512_set1_ps(o[g]),
                                _mm512_cvtepi32_ps(_mm512_loadu_si512(xs + g * ldacc + b)), a);
        a = _mm512_mul_ps(a, _mm512_loadu_ps(sx + b));
      } else if (o || z != 0.f) {
        for (int64_t g = 0; g < c.G; ++g)
          a = _mm512_fmadd_ps(_mm512_set1_ps((o ? o[g] : 0.f) + z * s[g]),
                              _mm512_loadu_ps(xsum + g * ldacc + b), a);
      }
      _mm512_storeu_ps(v + b, a);
    }
  }
  // token-major writes: each output row segment is contiguous
  float bn[kPanel];
  for (int64_t j = 0; j < rows; ++j) bn[j] = bias ? to_float(bias[n0 + j]) : 0.f;
  for (int64_t b = 0; b < c.B; ++b) {
    T* o = out + b * c.N + n0;
    for (int64_t j = 0; j < rows; ++j) {
      const float v = acc[j * ldacc + b];
      from_float(bias ? v + bn[j] : v, &o[j]);
    }
  }
}

// Work item: a chunk of panels. Columns go a segment (group) at a time over
// every panel of the chunk, so the segment of packed x stays in L2 while the
// chunk's weights stream past it; the chunk's float accumulators live across
// segments.
template <int OP>
static void gemm(const QuantCall& c, const uint8_t* xp, int nparts,
                 const float* sx, const int32_t* xs, const float* xsum) {
  const bool as_bf16 = OP == kBF;
  const int64_t kc_cols = as_bf16 ? 32 : 64, esz = as_bf16 ? 2 : 1;
  // int8/uint8 weights are A tiles as they lie, except in a partial panel
  const bool direct = !as_bf16 && c.qtype != kQUInt4;
  const int64_t gs = c.K / c.G, seg = c.G > 1 ? gs : (c.K < kSeg ? c.K : kSeg);
  const int64_t mbs = (c.B + 15) / 16, ldacc = mbs * 16;
  const int64_t panels = (c.N + kPanel - 1) / kPanel;
  int nt = c.nthreads < panels ? c.nthreads : static_cast<int>(panels);
  if (nt < 1) nt = 1;
  // chunks only when packed x would not stay in L2 across panels anyway
  const bool big_x = nparts * ldacc * c.K * esz > kL2X;
  int64_t per = (panels + nt - 1) / nt;
  per = !big_x ? 1 : (per < kChunk ? per : kChunk);
  // one panel a work item: its weights are prepared front to back once
  const bool whole = per == 1;
  // one spare line a row: a power-of-two row stride would put the 16 rows of
  // an A tile in one L1 set
  const int64_t ldbuf = (whole ? c.K : seg) * esz + 64;
  const int64_t chunks = (panels + per - 1) / per;
  const int64_t buf_bytes = round64(kPanel * ldbuf), acc_bytes = round64(per * kPanel * ldacc * 4);
  const int64_t thread_bytes = buf_bytes + acc_bytes + 4096;
  Scratch scratch(nt * thread_bytes);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#if defined(_OPENMP)
    const int64_t me = omp_get_thread_num();
#else
    const int64_t me = 0;
#endif
    TileConfig cfg{};
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = 16;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    uint8_t* buf = scratch.as<uint8_t>(me * thread_bytes);
    float* acc = scratch.as<float>(me * thread_bytes + buf_bytes);
    int32_t* ct = scratch.as<int32_t>(me * thread_bytes + buf_bytes + acc_bytes);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t p0 = ch * per, p1 = p0 + per < panels ? p0 + per : panels;
      std::memset(acc, 0, static_cast<size_t>(per * kPanel * ldacc) * 4);
      for (int64_t ks = 0; ks < c.K; ks += seg) {
        const int64_t ke = ks + seg < c.K ? ks + seg : c.K;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n0 = p * kPanel, rows = c.N - n0 < kPanel ? c.N - n0 : kPanel;
          const uint8_t* a;
          int64_t lda, a_k0;
          if (direct && rows == kPanel) {
            a = static_cast<const uint8_t*>(c.qw) + n0 * c.K;
            lda = c.K;
            a_k0 = 0;
          } else {
            if (!whole || ks == 0)
              prep_panel(c, as_bf16, n0, rows, whole ? 0 : ks, whole ? c.K : ke, buf, ldbuf);
            a = buf;
            lda = ldbuf;
            a_k0 = whole ? 0 : ks;
          }
          const bool one_a = rows <= 16;
          const float* scale = c.scale + n0 * c.G + ks / gs;
          float* pacc = acc + (p - p0) * kPanel * ldacc;
          for (int64_t mb = 0; mb < mbs; mb += 2) {
            const bool one_b = mb + 1 >= mbs;
            block<OP>(a, lda, a_k0, xp, mbs, mb, ks, ke, kc_cols, one_a, one_b, nparts);
            fold<OP>(pacc, ldacc, mb * 16, scale, c.G, rows, one_a, one_b, ct);
          }
        }
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel, rows = c.N - n0 < kPanel ? c.N - n0 : kPanel;
        float* pacc = acc + (p - p0) * kPanel * ldacc;
        if (c.dtype == 0) store<float>(c, n0, rows, pacc, ldacc, sx, xs, xsum);
        else if (c.dtype == 1) store<bf16>(c, n0, rows, pacc, ldacc, sx, xs, xsum);
        else store<f16>(c, n0, rows, pacc, ldacc, sx, xs, xsum);
      }
    }
    _tile_release();
  }
}

template <typename T>
static void run_typed(const QuantCall& c, const T* x) {
  const int64_t mbs = (c.B + 15) / 16, ldx = mbs * 16;
  const int nt = c.nthreads < c.B ? c.nthreads : static_cast<int>(c.B);
  // the per-token terms are zero for padding tokens, so their lanes stay finite
  Scratch terms(ldx * (c.G + 1) * 4);
  std::memset(terms.p, 0, static_cast<size_t>(ldx * (c.G + 1)) * 4);
  if (c.act == kActInt8) {
    Scratch xp(ldx * c.K);
    std::memset(xp.p, 0, static_cast<size_t>(ldx * c.K));
    float* sx = terms.as<float>();
    int32_t* xs = terms.as<int32_t>(ldx * 4);
    pack_int8(c, x, xp.as<int8_t>(), sx, xs, mbs, ldx, nt);
    if (c.qtype == kQInt8) gemm<kSS>(c, xp.as<uint8_t>(), 1, sx, xs, nullptr);
    else gemm<kUS>(c, xp.as<uint8_t>(), 1, sx, xs, nullptr);
  } else {
    const int nsplit = c.dtype == 0 ? 3 : (c.dtype == 2 ? 2 : 1);
    Scratch xp(nsplit * ldx * c.K * 2);
    std::memset(xp.p, 0, static_cast<size_t>(nsplit * ldx * c.K * 2));
    pack_bf16(c, x, xp.as<uint16_t>(), terms.as<float>(), mbs, ldx, nsplit, nt);
    gemm<kBF>(c, xp.as<uint8_t>(), nsplit, nullptr, nullptr, terms.as<float>());
  }
}

}  // namespace amx

bool quant_amx_available(const char** why) {
  const char* no = amx::unsupported();
  const bool on = amx::g_on.load(std::memory_order_relaxed);
  if (why) *why = no ? no : (on ? nullptr : "disabled (PYOPT_CPU_AMX=0 or pyopt._C.set_amx(False))");
  return !no && on;
}

void quant_amx_enable(bool on) { amx::g_on.store(on, std::memory_order_relaxed); }

bool quant_amx_applies(const QuantCall& c) {
  if (c.B < amx::kMinBatch || c.K % 64) return false;
  const int64_t gs = c.K / c.G;
  if (c.G > 1 && gs % 64) return false;
  return quant_amx_available(nullptr);
}

void quant_linear_amx(const QuantCall& c) {
  if (c.dtype == 0) amx::run_typed(c, static_cast<const float*>(c.x));
  else if (c.dtype == 1) amx::run_typed(c, static_cast<const amx::bf16*>(c.x));
  else amx::run_typed(c, static_cast<const amx::f16*>(c.x));
}

}  // namespace pyopt

#else  // no AMX in this build

namespace pyopt {
bool quant_amx_available(const char** why) {
  if (why) *why = "not compiled (the compiler lacks -mamx-tile, or not an x86 Linux build)";
  return false;
}
void quant_amx_enable(bool) {}
bool quant_amx_applies(const QuantCall&) { return false; }
void quant_linear_amx(const QuantCall&) {}
}  // namespace pyopt

#endif
