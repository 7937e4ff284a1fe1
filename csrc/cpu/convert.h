// Storage <-> float conversion for the CPU kernels, compiled per ISA.
// Everything is static so each ISA translation unit keeps its own copy.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pyopt {
namespace PYOPT_ISA {

struct bf16 { uint16_t x; };
struct f16 { uint16_t x; };

static inline float to_float(float v) { return v; }
static inline float to_float(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline void from_float(float f, float* out) { *out = f; }
// Round to nearest even; NaN becomes the canonical quiet NaN, as c10 does.
static inline void from_float(float f, bf16* out) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out->x = 0x7fc0;
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  out->x = static_cast<uint16_t>(u >> 16);
}

#if defined(__F16C__)
static inline float to_float(f16 v) { return _cvtsh_ss(v.x); }
static inline void from_float(float f, f16* out) {
  out->x = static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
#else
// Portable IEEE binary16 conversions (round to nearest even, subnormals, inf, NaN).
static inline float to_float(f16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.x & 0x8000u) << 16;
  uint32_t exp = (v.x >> 10) & 0x1fu, man = v.x & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
    u = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline void from_float(float f, f16* out) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  uint16_t h;
  if (a > 0x7f800000u) {
    h = 0x7e00;                                   // NaN
  } else if (a >= 0x477ff000u) {
    h = 0x7c00;                                   // rounds to inf
  } else if (a >= 0x38800000u) {                  // normal half
    const uint32_t r = a + 0x0fffu + ((a >> 13) & 1u) - (112u << 23);
    h = static_cast<uint16_t>(r >> 13);
  } else if (a > 0x33000000u) {                   // subnormal half
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;              // 14..24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    h = static_cast<uint16_t>(q);
  } else {
    h = 0;                                        // underflows to zero (0x33000000 is a tie to even 0)
  }
  out->x = sign | h;
}
#endif

// Block conversions: float stays in place, 16-bit types go through buffers.
template <typename T>
static inline void load_block(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
template <typename T>
static inline void store_block(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) from_float(src[i], &dst[i]);
}

#if defined(__F16C__)
// Scalar _cvtsh_ss does not vectorise; use the 8-wide forms.
template <>
inline void load_block<f16>(const f16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}
template <>
inline void store_block<f16>(const float* src, f16* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) from_float(src[i], &dst[i]);
}
#endif

}  // namespace PYOPT_ISA
}  // namespace pyopt
