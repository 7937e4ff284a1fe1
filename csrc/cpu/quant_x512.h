// Per-token int8 quantization of one activation row in 16 float lanes,
// shared by the AVX-512 integer path (quant_kernels.h) and the AMX kernels
// (quant_amx.cpp), so both give formats.quantize_per_token's integers bit for
// bit: scale amax / 127, q = round-half-even(x * (127 / amax)) clamped to
// +-127. Include inside the including file's ISA namespace, compiled with
// AVX-512F/BW/VL/DQ.
#pragma once

static inline __mmask16 lanes16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n > 0 ? n : 0)) - 1u);
}

// q[0, K) in k order; returns the row's scale, NaN for a row holding NaN or
// inf (then q is all zero).
static inline float quantize_row512(const float* xr, int64_t K, int8_t* q) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512 big = _mm512_set1_ps(3.4028234663852886e38f);
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes16(K - k), xr + k));
    bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);  // NaN or inf
    mx = _mm512_max_ps(mx, a);
  }
  if (bad) {
    std::memset(q, 0, static_cast<size_t>(K));
    return std::nanf("");
  }
  const float amax = _mm512_reduce_max_ps(mx);
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m512 vi = _mm512_set1_ps(inv), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = lanes16(K - k);
    // round to nearest even, as nearbyint in the default mode
    __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + k), vi),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  return amax / 127.f;
}
