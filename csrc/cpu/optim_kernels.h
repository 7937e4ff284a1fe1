// Optimizer CPU kernels. This header is compiled once per ISA variant: the
// build generates <family>_<isa>.cpp files that define PYOPT_ISA and include
// it with that ISA's flags. Code lives in namespace pyopt::PYOPT_ISA so that no
// two variants share a symbol. Avoid std templates here for the same reason.
#include <cstdint>
#include <type_traits>

#include "cpu/convert.h"
#include "cpu/isa.h"
#include "cpu/optim_cpu.h"

namespace pyopt {
namespace PYOPT_ISA {

// Elements per conversion block for 16-bit storage: 5 float buffers of 1 KiB
// stay in L1 while the math runs over them.
constexpr int64_t kBlock = 256;

// A 16-bit block's conversion loops and its math run one after the other, so
// without help the block's loads wait on memory while the divider idles (1.5x
// slower than torch's single loop). Prefetching two blocks ahead overlaps them.
constexpr int64_t kPrefetch = 2 * kBlock;

template <typename T>
static inline void prefetch_block(const T* x) {
  const char* c = reinterpret_cast<const char*>(x);
  for (int64_t b = 0; b < kBlock * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b, 1);
}

template <typename T>
constexpr bool is_f32 = std::is_same<T, float>::value;

// A run-time flag as a template one, so that each side is its own loop
// without a branch inside: f gets std::true_type or std::false_type.
template <typename F>
static void with_flag(bool b, const F& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// GradScaler's unscaling happens in the update loop itself, under a template
// flag, so that an unscaled step keeps its loop free of the extra store.
template <typename F>
static void with_scale(float inv_scale, const F& f) {
  with_flag(inv_scale != 1.0f, f);
}

// A 16-bit grad block in a float buffer: unscale it, store it back (grads end
// up unscaled, as in torch) and continue with the rounded stored value.
template <typename T>
static void unscale_block(float* buf, T* g, int64_t k, float inv_scale) {
  for (int64_t i = 0; i < k; ++i) buf[i] *= inv_scale;
  store_block(buf, g, k);
  load_block(g, buf, k);
}

// fp32 params and state: the math runs directly on memory, one pass, which the
// compiler vectorises (check with -fopt-info-vec).
template <bool AMS, bool MAX, int WD, bool SC>
static void adam_loop(float* __restrict p, float* __restrict g, float* __restrict m,
                      float* __restrict v, float* __restrict vm, int64_t n,
                      const AdamHyper& h, const AdamTensorScalars& s, float inv_scale) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = p[i], gi = g[i], mi = m[i], vi = v[i], vmi = AMS ? vm[i] : 0.0f;
    if (SC) {
      gi = gi * inv_scale;
      g[i] = gi;
    }
    adam_math<AMS, MAX, WD>(pi, gi, mi, vi, vmi, h, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (AMS) vm[i] = vmi;
  }
}

template <bool AMS, bool MAX, int WD>
static void adam_f32(float* p, float* g, float* m, float* v, float* vm, int64_t n,
                     const AdamHyper& h, const AdamTensorScalars& s, float inv_scale) {
  with_scale(inv_scale, [&](auto sc) {
    adam_loop<AMS, MAX, WD, decltype(sc)::value>(p, g, m, v, vm, n, h, s, inv_scale);
  });
}

// 16-bit params and/or state: convert a block to float, run the fp32 kernel
// on the buffers, round back. State that is already float is used in place.
template <typename P, typename S, bool AMS, bool MAX, int WD>
static void adam_blocked(P* p, P* g, S* m, S* v, S* vm, int64_t n, const AdamHyper& h,
                         const AdamTensorScalars& s, float inv_scale) {
  alignas(64) float pb[kBlock], gb[kBlock], mb[kBlock], vb[kBlock], vmb[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t k = n - i0 < kBlock ? n - i0 : kBlock;
    if (i0 + kPrefetch < n) {
      prefetch_block(p + i0 + kPrefetch);
      prefetch_block(g + i0 + kPrefetch);
      prefetch_block(m + i0 + kPrefetch);
      prefetch_block(v + i0 + kPrefetch);
      if (AMS) prefetch_block(vm + i0 + kPrefetch);
    }
    float *mp, *vp, *vmp = vmb;
    load_block(p + i0, pb, k);
    load_block(g + i0, gb, k);
    if (inv_scale != 1.0f) unscale_block(gb, g + i0, k, inv_scale);
    if constexpr (is_f32<S>) {
      mp = m + i0;
      vp = v + i0;
      if (AMS) vmp = vm + i0;
    } else {
      mp = mb;
      vp = vb;
      load_block(m + i0, mb, k);
      load_block(v + i0, vb, k);
      if (AMS) load_block(vm + i0, vmb, k);
    }
    adam_f32<AMS, MAX, WD>(pb, gb, mp, vp, vmp, k, h, s, 1.0f);
    store_block(pb, p + i0, k);
    if constexpr (!is_f32<S>) {
      store_block(mb, m + i0, k);
      store_block(vb, v + i0, k);
      if (AMS) store_block(vmb, vm + i0, k);
    }
  }
}

#if defined(__AVX512F__)
struct AdamZmmConsts {
  __m512 w, omw, b2, omb2, eps, wd, decay, nss, c, rc;
  AdamZmmConsts(const AdamHyper& h, const AdamTensorScalars& s)
      : w(_mm512_set1_ps(h.one_minus_beta1)), omw(_mm512_set1_ps(1.0f - h.one_minus_beta1)),
        b2(_mm512_set1_ps(h.beta2)), omb2(_mm512_set1_ps(h.one_minus_beta2)),
        eps(_mm512_set1_ps(h.eps)), wd(_mm512_set1_ps(h.weight_decay)),
        decay(_mm512_set1_ps(h.decay_factor)), nss(_mm512_set1_ps(s.neg_step_size)),
        c(_mm512_set1_ps(s.bc2_sqrt)), rc(_mm512_set1_ps(s.inv_bc2_sqrt)) {}
};

// adam_math on 16 lanes, op for op with no contraction (tests check the bits
// against the blocked path and the torch reference); VM is max_exp_avg_sq in
// and out (AMS only).
template <bool AMS, bool MAX, int WD, bool LOW>
static inline void adam_math_zmm(__m512& P, __m512 G, __m512& M, __m512& V, __m512& VM,
                                  const AdamZmmConsts& k) {
  if (MAX) G = _mm512_xor_ps(G, _mm512_set1_ps(-0.0f));  // -g, not 0 - g: the sign of a zero
  if (WD == kL2) G = _mm512_add_ps(G, _mm512_mul_ps(k.wd, P));
  if (WD == kDecoupled) P = _mm512_mul_ps(P, k.decay);
  const __m512 d = _mm512_sub_ps(G, M);
  M = LOW ? _mm512_add_ps(M, _mm512_mul_ps(k.w, d)) : _mm512_sub_ps(G, _mm512_mul_ps(d, k.omw));
  V = _mm512_add_ps(_mm512_mul_ps(V, k.b2), _mm512_mul_ps(_mm512_mul_ps(k.omb2, G), G));
  __m512 VV = V;
  if (AMS) {
    const __mmask16 take = _mm512_cmp_ps_mask(VM, V, _CMP_LT_OQ) | _mm512_cmp_ps_mask(V, V, _CMP_UNORD_Q);
    VM = _mm512_mask_mov_ps(VM, take, V);
    VV = VM;
  }
  // div_by_const, then the update
  const __m512 x = _mm512_sqrt_ps(VV);
  const __m512 q = _mm512_mul_ps(x, k.rc);
  __m512 r = _mm512_fnmadd_ps(q, k.c, x);
  r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);
  const __m512 denom = _mm512_add_ps(_mm512_fmadd_ps(r, k.rc, q), k.eps);
  P = _mm512_add_ps(P, _mm512_mul_ps(k.nss, _mm512_div_ps(M, denom)));
}

#if defined(__AVX512BF16__)
// Steps whose params and state are all bf16 (torch's default for a bf16
// model), one pass in registers: the blocked path spends about a third of the
// Adam step on float buffers and integer rounding.
//
// The two 512-bit ALU ports and the divider (sqrt + div: 18 cycles per 16
// elements) each need nearly as long as the memory traffic (a sqrt from
// rsqrt14 with an exact correction, equal to vsqrtps on all 2^32 inputs, made
// Adam 4-10% slower: its ops take the same ports), so the loop saves ops
// where it can (Adam in a harness, 16M elements on 2 threads: 11.5 ms for
// 16 elements a step with integer checks, 9.1 ms as below, 8.1 ms for the same
// loads and stores with no math at all):
// - 32 elements a step. A 512-bit load splits into the even elements (x << 16)
//   and the odd ones (x & 0xffff0000), two ops where widening 16 at a time
//   takes four. The math is elementwise, so the lane order does not matter;
//   vcvtne2ps2bf16 rounds both halves and one permute interleaves them back.
// - vcvtne2ps2bf16 rounds to nearest even like from_float, but it flushes
//   float subnormals and keeps NaN payloads, so a step whose results hold
//   either rounds with from_float's integer ops, still 32 lanes at a time
//   (scalar from_float here made one-pass 1.5-2x slower than the blocked
//   path once 1% of the elements held a subnormal exp_avg, which zero grads
//   leave behind: m + 0.1 * (0 - m) stays at 0x0004). One vfpclassps per
//   vector finds them. vfpclassps reads a subnormal as zero under MXCSR.DAZ
//   (torch.set_flush_denormal), so a thread with DAZ set takes the blocked
//   path (bf16_convert_available).
namespace bf16x32 {
struct Pair {
  __m512 e, o;
};
// bf16 words in memory order back to even and odd floats.
static inline Pair widen(__m512i w) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))))};
}
static inline Pair load(const bf16* x, __mmask32 k) { return widen(_mm512_maskz_loadu_epi16(k, x)); }
// Lanes of k that hold a NaN (quiet 0x01, signalling 0x80) or a subnormal (0x20).
static inline __mmask16 special(__m512 x, __mmask16 k) {
  return _mm512_mask_fpclass_ps_mask(k, x, 0xa1);
}
static inline __mmask16 special(Pair x, __mmask16 ke, __mmask16 ko) {
  return special(x.e, ke) | special(x.o, ko);
}
alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21,
                                                     6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27,
                                                     12, 28, 13, 29, 14, 30, 15, 31};
// from_float's integer rounding on 16 lanes; the bf16 is the high word.
static inline __m512i round_high(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7fc00000));
}
// Both halves rounded to bf16, as words in memory order. fast: no lane holds a
// NaN or a subnormal, so vcvtne2ps2bf16 gives from_float's bits; otherwise
// from_float's integer rounding, which needs no permute (even lanes are the
// low words).
static inline __m512i round(Pair v, bool fast) {
  if (fast) {
    const __m512i r = (__m512i)_mm512_cvtne2ps_pbh(v.o, v.e);  // words 0-15: e, 16-31: o
    return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), r);
  }
  return _mm512_or_si512(_mm512_srli_epi32(round_high(v.e), 16),
                         _mm512_and_si512(round_high(v.o), _mm512_set1_epi32(int(0xffff0000u))));
}
static inline void store(bf16* x, __m512i w, __mmask32 k) { _mm512_mask_storeu_epi16(x, k, w); }
}  // namespace bf16x32

// The lists a one-pass step reads: those it writes, and the grad (list 1).
constexpr unsigned live_lists(unsigned write) { return write | 0b10u; }

// One line of list l, for writing if the step writes it (the grad: if it
// unscales it).
template <unsigned WRITE, bool SC, typename T>
static inline void prefetch_list(const T* x, int l) {
  if (!((live_lists(WRITE) >> l) & 1u)) return;
  if (((WRITE >> l) & 1u) || (SC && l == 1)) __builtin_prefetch(x, 1);
  else __builtin_prefetch(x, 0);
}

// The one-pass driver for bf16 lists: ptr[l] for list l (1 is the grad),
// WRITE the lists stored back (read: live_lists). f(x) runs the fp32 math on
// 16 lanes, x[l] for list l; it is called for the even and the odd halves.
template <int NL, unsigned WRITE, bool SC, typename F>
static void one_pass_bf16(bf16* const (&ptr)[NL], int64_t n, float inv_scale, const F& f) {
  using namespace bf16x32;
  const __m512 inv = _mm512_set1_ps(inv_scale);
  for (int64_t i = 0; i < n; i += 32) {
    const bool full = n - i >= 32;
    const __mmask32 k = full ? __mmask32(0xffffffffu) : __mmask32((1u << (n - i)) - 1u);
    // the live lanes of the even and the odd half
    const __mmask16 ke = full ? __mmask16(0xffff) : __mmask16(_pext_u32(k, 0x55555555u));
    const __mmask16 ko = full ? __mmask16(0xffff) : __mmask16(_pext_u32(k, 0xaaaaaaaau));
    if (i + kPrefetch < n) {  // one line of each list per 32 elements
      for (int l = 0; l < NL; ++l) prefetch_list<WRITE, SC>(ptr[l] + i + kPrefetch, l);
    }
    __m512 e[NL], o[NL];
    for (int l = 0; l < NL; ++l) {
      const Pair x = (live_lists(WRITE) >> l) & 1u ? load(ptr[l] + i, k) : Pair{_mm512_setzero_ps(), _mm512_setzero_ps()};
      e[l] = x.e;
      o[l] = x.o;
    }
    if (SC) {  // unscale, store the grad, and go on with its rounded value
      const Pair G{_mm512_mul_ps(e[1], inv), _mm512_mul_ps(o[1], inv)};
      const __m512i w = round(G, special(G, ke, ko) == 0);
      store(ptr[1] + i, w, k);
      const Pair R = widen(w);
      e[1] = R.e;
      o[1] = R.o;
    }
    f(e);
    f(o);
    __mmask16 bad = 0;
    for (int l = 0; l < NL; ++l)
      if ((WRITE >> l) & 1u) bad |= special(e[l], ke) | special(o[l], ko);
    const bool fast = bad == 0;
    for (int l = 0; l < NL; ++l)
      if ((WRITE >> l) & 1u) store(ptr[l] + i, round(Pair{e[l], o[l]}, fast), k);
  }
}

#endif  // __AVX512BF16__

#if defined(__F16C__)
// Steps whose params and state are all fp16 (torch's default for an fp16
// model), one pass in registers, 16 elements a step (the blocked path's float
// buffers cost it most of its lead over torch). vcvtps2ph is the instruction
// from_float(f16) uses on this variant and vcvtph2ps to_float's, so the bits
// are the blocked path's with no check for special values.
namespace f16x16 {
static inline __m512 load(const f16* x, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, x));
}
static inline __m256i round(__m512 x) { return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT); }
static inline void store(f16* x, __m256i w, __mmask16 k) { _mm256_mask_storeu_epi16(x, k, w); }
}  // namespace f16x16

// one_pass_bf16's contract for fp16 lists, 16 elements a step.
template <int NL, unsigned WRITE, bool SC, typename F>
static void one_pass_f16(f16* const (&ptr)[NL], int64_t n, float inv_scale, const F& f) {
  using namespace f16x16;
  const __m512 inv = _mm512_set1_ps(inv_scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    if ((i & 31) == 0 && i + kPrefetch < n) {  // one line of each list per 32 elements
      for (int l = 0; l < NL; ++l) prefetch_list<WRITE, SC>(ptr[l] + i + kPrefetch, l);
    }
    __m512 x[NL];
    for (int l = 0; l < NL; ++l) x[l] = (live_lists(WRITE) >> l) & 1u ? load(ptr[l] + i, k) : _mm512_setzero_ps();
    if (SC) {  // unscale, store the grad, and go on with its rounded value
      const __m256i w = round(_mm512_mul_ps(x[1], inv));
      store(ptr[1] + i, w, k);
      x[1] = _mm512_cvtph_ps(w);
    }
    f(x);
    for (int l = 0; l < NL; ++l)
      if ((WRITE >> l) & 1u) store(ptr[l] + i, round(x[l]), k);
  }
}
#endif  // __F16C__

// T's one-pass driver (bf16 or fp16).
template <typename T, int NL, unsigned WRITE, bool SC, typename F>
static void one_pass(T* const (&ptr)[NL], int64_t n, float inv_scale, const F& f) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<T, bf16>::value) one_pass_bf16<NL, WRITE, SC>(ptr, n, inv_scale, f);
#endif
#if defined(__F16C__)
  if constexpr (std::is_same<T, f16>::value) one_pass_f16<NL, WRITE, SC>(ptr, n, inv_scale, f);
#endif
}

// Whether T's one-pass driver is compiled in and usable on this thread.
template <typename T>
static inline bool one_pass_usable() {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<T, bf16>::value) return bf16_convert_available(nullptr);
#endif
#if defined(__F16C__)
  if constexpr (std::is_same<T, f16>::value) return true;
#endif
  return false;
}

// Adam with T params and T state (torch's default for a 16-bit model).
template <typename T, bool AMS, bool MAX, int WD>
static void adam_one_pass(T* p, T* g, T* m, T* v, T* vm, int64_t n, const AdamHyper& h,
                          const AdamTensorScalars& s, float inv_scale) {
  const AdamZmmConsts kc(h, s);
  T* const ptr[5] = {p, g, m, v, vm};
  constexpr unsigned write = AMS ? 0b11101u : 0b01101u;
  with_scale(inv_scale, [&](auto sc) {
    with_flag(h.one_minus_beta1 < 0.5f, [&](auto low) {  // lerp_torch's two sides
      one_pass<T, 5, write, decltype(sc)::value>(ptr, n, inv_scale, [&](__m512 (&x)[5]) {
        adam_math_zmm<AMS, MAX, WD, decltype(low)::value>(x[0], x[1], x[2], x[3], x[4], kc);
      });
    });
  });
}
#endif  // __AVX512F__

// One table row, elements [off, off + len).
template <typename P, typename S, bool AMS, bool MAX, int WD>
static void adam_row(const int64_t* row, int64_t off, int64_t len, const AdamHyper& h,
                     const AdamTensorScalars& s, float inv_scale) {
  P* p = reinterpret_cast<P*>(row[kAdamParam]) + off;
  P* g = reinterpret_cast<P*>(row[kAdamGrad]) + off;
  S* m = reinterpret_cast<S*>(row[kAdamExpAvg]) + off;
  S* v = reinterpret_cast<S*>(row[kAdamExpAvgSq]) + off;
  S* vm = AMS ? reinterpret_cast<S*>(row[kAdamMaxExpAvgSq]) + off : nullptr;
  if constexpr (is_f32<P> && is_f32<S>) {
    adam_f32<AMS, MAX, WD>(p, g, m, v, vm, len, h, s, inv_scale);
    return;
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same<P, S>::value && !is_f32<P>) {
    if (one_pass_usable<P>()) return adam_one_pass<P, AMS, MAX, WD>(p, g, m, v, vm, len, h, s, inv_scale);
  }
#endif
  if constexpr (!(is_f32<P> && is_f32<S>))
    adam_blocked<P, S, AMS, MAX, WD>(p, g, m, v, vm, len, h, s, inv_scale);
}

using AdamRowFn = void (*)(const int64_t*, int64_t, int64_t, const AdamHyper&,
                           const AdamTensorScalars&, float);

template <typename P, typename S, bool AMS, bool MAX>
static AdamRowFn pick_wd(int wd) {
  if (wd == kL2) return adam_row<P, S, AMS, MAX, kL2>;
  if (wd == kDecoupled) return adam_row<P, S, AMS, MAX, kDecoupled>;
  return adam_row<P, S, AMS, MAX, kNoDecay>;
}

template <typename P, typename S>
static AdamRowFn pick_flags(const AdamCall& c) {
  if (c.amsgrad)
    return c.maximize ? pick_wd<P, S, true, true>(c.wd_mode) : pick_wd<P, S, true, false>(c.wd_mode);
  return c.maximize ? pick_wd<P, S, false, true>(c.wd_mode) : pick_wd<P, S, false, false>(c.wd_mode);
}

// Supported (param, state) dtypes: state equal to param, or fp32 state.
static AdamRowFn pick(const AdamCall& c) {
  const int pd = c.param_dtype, sd = c.state_dtype;
  if (pd == kFloat32 && sd == kFloat32) return pick_flags<float, float>(c);
  if (pd == kBFloat16 && sd == kBFloat16) return pick_flags<bf16, bf16>(c);
  if (pd == kFloat16 && sd == kFloat16) return pick_flags<f16, f16>(c);
  if (pd == kBFloat16 && sd == kFloat32) return pick_flags<bf16, float>(c);
  if (pd == kFloat16 && sd == kFloat32) return pick_flags<f16, float>(c);
  return nullptr;
}

// ------------------------------------------------------ SGD and RMSprop
// All lists share the param's storage type T; list 1 is the grad. fp32 runs
// the math on memory, unscaling in the loop (f gets std::true_type); 16-bit
// storage goes through float blocks, unscaled per block. Null lists (no
// momentum, not centered) are neither read nor written.
template <typename T, int NL, unsigned WRITE, typename F>
static void run_blocked(T* const (&ptr)[NL], int64_t n, float inv_scale, const F& f) {
  if constexpr (is_f32<T>) {
    float* x[NL];
    for (int l = 0; l < NL; ++l) x[l] = ptr[l];
    with_scale(inv_scale, [&](auto sc) { f(x, n, sc); });
  } else {
    alignas(64) float buf[NL][kBlock];
    float* x[NL];
    for (int l = 0; l < NL; ++l) x[l] = buf[l];
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t k = n - i0 < kBlock ? n - i0 : kBlock;
      if (i0 + kPrefetch < n)
        for (int l = 0; l < NL; ++l)
          if (ptr[l] != nullptr) prefetch_block(ptr[l] + i0 + kPrefetch);
      for (int l = 0; l < NL; ++l)
        if (ptr[l] != nullptr) load_block(ptr[l] + i0, buf[l], k);
      if (inv_scale != 1.0f) unscale_block(buf[1], ptr[1] + i0, k, inv_scale);
      f(x, k, std::false_type{});
      for (int l = 0; l < NL; ++l)
        if (((WRITE >> l) & 1u) && ptr[l] != nullptr) store_block(buf[l], ptr[l] + i0, k);
    }
  }
}

template <typename T>
static T* list_at(const int64_t* row, int col, int64_t off) {
  return row[col] == 0 ? nullptr : reinterpret_cast<T*>(row[col]) + off;
}

// Calls fn(row, off, len, t) for every tensor t overlapping [begin, end) of
// the concatenation described by offsets.
template <typename Fn>
static void for_each_row(const int64_t* table, int cols, int64_t n, const int64_t* offsets,
                         int64_t begin, int64_t end, const Fn& fn) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid + 1] <= begin) lo = mid + 1; else hi = mid;
  }
  for (int64_t t = lo; t < n && offsets[t] < end; ++t) {
    const int64_t a = begin > offsets[t] ? begin : offsets[t];
    const int64_t b = end < offsets[t + 1] ? end : offsets[t + 1];
    if (b > a) fn(table + t * cols, a - offsets[t], b - a, t);
  }
}

// What happens around the update of each row, for every optimizer, on chunks
// that stay in L1/L2 between passes (so none costs a trip to memory):
//  - GradScaler: the update kernels unscale the grads as they read them
//    (fn's last argument, 1/scale); with a master, here, as the grad is widened;
//  - fp32 master weights (the row's out column is set): list 0 is the fp32
//    master, the 16-bit grad is widened into a buffer, and the update's
//    result is rounded into the 16-bit param;
//  - masks: masked positions of the param and every state list become 0.
struct RowExtras {
  int cols;
  int mask_col;
  int out_col;         // 16-bit param written from the fp32 master, 0 without
  int nlists;          // list columns 0..nlists-1; column 1 is the grad
  int elem[5];         // bytes per element of each list column
  int grad_dtype;      // dtype of the grad (and of the 16-bit param with a master)
  float inv_scale;     // 1: no unscaling
};

constexpr int kMaxCols = 16;
constexpr int64_t kChunk = 2048;

template <typename T>
static void widen(int64_t addr, int64_t off, int64_t k, float* dst) {
  const T* src = reinterpret_cast<const T*>(addr) + off;
  for (int64_t i0 = 0; i0 < k; i0 += kBlock) load_block(src + i0, dst + i0, k - i0 < kBlock ? k - i0 : kBlock);
}

template <typename T>
static void narrow(const float* src, int64_t addr, int64_t off, int64_t k) {
  T* dst = reinterpret_cast<T*>(addr) + off;
  for (int64_t i0 = 0; i0 < k; i0 += kBlock) store_block(src + i0, dst + i0, k - i0 < kBlock ? k - i0 : kBlock);
}

static void widen_any(int dtype, int64_t addr, int64_t off, int64_t k, float* dst) {
  if (dtype == kBFloat16) widen<bf16>(addr, off, k, dst);
  else if (dtype == kFloat16) widen<f16>(addr, off, k, dst);
  else widen<float>(addr, off, k, dst);
}

static void narrow_any(int dtype, const float* src, int64_t addr, int64_t off, int64_t k) {
  if (dtype == kBFloat16) narrow<bf16>(src, addr, off, k);
  else if (dtype == kFloat16) narrow<f16>(src, addr, off, k);
  else narrow<float>(src, addr, off, k);
}

template <typename U>
static void zero_masked(int64_t addr, const uint8_t* __restrict mask, int64_t off, int64_t k) {
  U* __restrict d = reinterpret_cast<U*>(addr) + off;
  for (int64_t i = 0; i < k; ++i) d[i] = mask[i] ? d[i] : U(0);
}

template <typename Fn>
static void run_rows(const int64_t* table, int64_t n, const int64_t* offsets, int64_t begin,
                     int64_t end, const RowExtras& x, const Fn& fn) {
  for_each_row(table, x.cols, n, offsets, begin, end,
               [&](const int64_t* row, int64_t off, int64_t len, int64_t t) {
    const uint8_t* mask = reinterpret_cast<const uint8_t*>(row[x.mask_col]);
    const bool scale = x.inv_scale != 1.0f;
    const bool master = row[x.out_col] != 0;
    if (mask == nullptr && !master) return fn(row, off, len, t, x.inv_scale);
    alignas(64) float gbuf[kChunk];
    int64_t r[kMaxCols];
    for (int64_t c = off; c < off + len; c += kChunk) {
      const int64_t k = off + len - c < kChunk ? off + len - c : kChunk;
      const int64_t* use = row;
      int64_t at = c;
      if (master) {
        // The update runs on fp32 lists rebased to this chunk and a widened grad.
        for (int l = 0; l < x.cols; ++l) r[l] = row[l];
        for (int l = 0; l < x.nlists; ++l)
          if (l != 1 && row[l] != 0) r[l] = row[l] + c * x.elem[l];
        widen_any(x.grad_dtype, row[1], c, k, gbuf);
        if (scale) {
          for (int64_t i = 0; i < k; ++i) gbuf[i] *= x.inv_scale;
          narrow_any(x.grad_dtype, gbuf, row[1], c, k);  // grads end up unscaled, as in torch
        }
        r[1] = reinterpret_cast<int64_t>(gbuf);
        use = r;
        at = 0;
      }
      fn(use, at, k, t, master ? 1.0f : x.inv_scale);
      if (master) narrow_any(x.grad_dtype, reinterpret_cast<const float*>(row[0]) + c,
                             row[x.out_col], c, k);
      if (mask == nullptr) continue;
      for (int l = 0; l < x.nlists; ++l) {
        if (l == 1 || row[l] == 0) continue;
        if (x.elem[l] == 4) zero_masked<uint32_t>(row[l], mask + c, c, k);
        else zero_masked<uint16_t>(row[l], mask + c, c, k);
      }
      if (master) zero_masked<uint16_t>(row[x.out_col], mask + c, c, k);
    }
  });
}

#if defined(__AVX512F__)
// sgd_math on 16 lanes, op for op (B is the momentum buffer).
template <bool MAX, bool WD, int MOM>
static inline void sgd_math_zmm(__m512& P, __m512 G, __m512& B, bool first, const SgdHyper& h) {
  if (MAX) G = _mm512_xor_ps(G, _mm512_set1_ps(-0.0f));
  if (WD) G = _mm512_add_ps(G, _mm512_mul_ps(_mm512_set1_ps(h.weight_decay), P));
  if (MOM != kNoMomentum) {
    const __m512 mom = _mm512_set1_ps(h.momentum);
    B = first ? G : _mm512_add_ps(_mm512_mul_ps(B, mom), _mm512_mul_ps(_mm512_set1_ps(h.one_minus_dampening), G));
    G = MOM == kNesterov ? _mm512_add_ps(G, _mm512_mul_ps(mom, B)) : B;
  }
  P = _mm512_add_ps(P, _mm512_mul_ps(_mm512_set1_ps(h.neg_lr), G));
}
#endif

template <typename T, bool MAX, bool WD, int MOM>
static void sgd_row(const int64_t* row, int64_t off, int64_t len, const SgdHyper& h,
                    float inv_scale) {
  T* const ptr[3] = {list_at<T>(row, kSgdParam, off), list_at<T>(row, kSgdGrad, off),
                     MOM != kNoMomentum ? list_at<T>(row, kSgdMomentum, off) : nullptr};
  const bool first = row[kSgdFirst] != 0;
#if defined(__AVX512F__)
  if constexpr (!is_f32<T>) {
    if (one_pass_usable<T>()) {
      constexpr unsigned write = MOM != kNoMomentum ? 0b101u : 0b001u;
      return with_scale(inv_scale, [&](auto sc) {
        one_pass<T, 3, write, decltype(sc)::value>(ptr, len, inv_scale, [&](__m512 (&x)[3]) {
          sgd_math_zmm<MAX, WD, MOM>(x[0], x[1], x[2], first, h);
        });
      });
    }
  }
#endif
  run_blocked<T, 3, 0b101u>(ptr, len, inv_scale, [&](float* const* x, int64_t k, auto sc) {
    float* __restrict p = x[0];
    float* __restrict g = x[1];
    float* __restrict b = x[2];
    for (int64_t i = 0; i < k; ++i) {
      float pi = p[i], gi = g[i], bi = MOM != kNoMomentum ? b[i] : 0.0f;
      if (decltype(sc)::value) {
        gi = gi * inv_scale;
        g[i] = gi;
      }
      sgd_math<MAX, WD, MOM>(pi, gi, bi, first, h);
      p[i] = pi;
      if (MOM != kNoMomentum) b[i] = bi;
    }
  });
}

#if defined(__AVX512F__)
// rmsprop_math on 16 lanes, op for op (-1 * gavg rather than a sign flip: the
// same NaN sign); LOW: lerp_torch's side for one_minus_alpha.
template <bool MAX, bool WD, bool CEN, bool MOM, bool LOW>
static inline void rmsprop_math_zmm(__m512& P, __m512 G, __m512& SQ, __m512& GA, __m512& B,
                                    const RmspropHyper& h) {
  const __m512 oma = _mm512_set1_ps(h.one_minus_alpha);
  if (MAX) G = _mm512_xor_ps(G, _mm512_set1_ps(-0.0f));
  if (WD) G = _mm512_add_ps(G, _mm512_mul_ps(_mm512_set1_ps(h.weight_decay), P));
  SQ = _mm512_add_ps(_mm512_mul_ps(SQ, _mm512_set1_ps(h.alpha)), _mm512_mul_ps(_mm512_mul_ps(oma, G), G));
  __m512 avg;
  if (CEN) {
    const __m512 d = _mm512_sub_ps(G, GA);
    GA = LOW ? _mm512_add_ps(GA, _mm512_mul_ps(oma, d))
             : _mm512_sub_ps(G, _mm512_mul_ps(d, _mm512_set1_ps(1.0f - h.one_minus_alpha)));
    avg = _mm512_sqrt_ps(_mm512_add_ps(SQ, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(-1.0f), GA), GA)));
  } else {
    avg = _mm512_sqrt_ps(SQ);
  }
  avg = _mm512_add_ps(avg, _mm512_set1_ps(h.eps));
  const __m512 nlr = _mm512_set1_ps(h.neg_lr);
  if (MOM) {
    B = _mm512_add_ps(_mm512_mul_ps(B, _mm512_set1_ps(h.momentum)), _mm512_div_ps(G, avg));
    P = _mm512_add_ps(P, _mm512_mul_ps(nlr, B));
  } else {
    P = _mm512_add_ps(P, _mm512_mul_ps(nlr, _mm512_div_ps(G, avg)));
  }
}
#endif

template <typename T, bool MAX, bool WD, bool CEN, bool MOM>
static void rmsprop_row(const int64_t* row, int64_t off, int64_t len, const RmspropHyper& h,
                        float inv_scale) {
  T* const ptr[5] = {list_at<T>(row, kRmsParam, off), list_at<T>(row, kRmsGrad, off),
                     list_at<T>(row, kRmsSquareAvg, off),
                     MOM ? list_at<T>(row, kRmsMomentum, off) : nullptr,
                     CEN ? list_at<T>(row, kRmsGradAvg, off) : nullptr};
#if defined(__AVX512F__)
  if constexpr (!is_f32<T>) {
    if (one_pass_usable<T>()) {
      constexpr unsigned write = 0b00101u | (MOM ? 0b01000u : 0u) | (CEN ? 0b10000u : 0u);
      return with_scale(inv_scale, [&](auto sc) {
        with_flag(h.one_minus_alpha < 0.5f, [&](auto low) {  // lerp_torch's two sides
          one_pass<T, 5, write, decltype(sc)::value>(ptr, len, inv_scale, [&](__m512 (&x)[5]) {
            rmsprop_math_zmm<MAX, WD, CEN, MOM, decltype(low)::value>(x[0], x[1], x[2], x[4], x[3], h);
          });
        });
      });
    }
  }
#endif
  run_blocked<T, 5, 0b11101u>(ptr, len, inv_scale, [&](float* const* x, int64_t k, auto sc) {
    float* __restrict p = x[0];
    float* __restrict g = x[1];
    float* __restrict sq = x[2];
    float* __restrict b = x[3];
    float* __restrict ga = x[4];
    for (int64_t i = 0; i < k; ++i) {
      float pi = p[i], gr = g[i], si = sq[i], bi = MOM ? b[i] : 0.0f, gi = CEN ? ga[i] : 0.0f;
      if (decltype(sc)::value) {
        gr = gr * inv_scale;
        g[i] = gr;
      }
      rmsprop_math<MAX, WD, CEN, MOM>(pi, gr, si, gi, bi, h);
      p[i] = pi;
      sq[i] = si;
      if (MOM) b[i] = bi;
      if (CEN) ga[i] = gi;
    }
  });
}

// Run-time flags to template flags: every combination is one loop without
// branches inside.
template <typename T>
static void sgd_dispatch(const SgdCall& c, int64_t begin, int64_t end) {
  const int e = sizeof(T);
  const RowExtras x{kSgdCols, kSgdMask, kSgdOut, 3, {e, e, e, 0, 0}, c.grad_dtype,
                   c.grad_inv_scale};
  const auto go = [&](auto fn) {
    run_rows(c.table, c.n, c.offsets, begin, end, x,
             [&](const int64_t* row, int64_t off, int64_t len, int64_t, float inv_scale) {
               fn(row, off, len, c.hyper, inv_scale);
             });
  };
#define PYOPT_SGD(MAX, WD, MOM)                                             \
  if (c.maximize == MAX && c.weight_decay == WD && c.momentum == MOM) \
    return go(sgd_row<T, MAX, WD, MOM>);
  PYOPT_SGD(false, false, kNoMomentum) PYOPT_SGD(false, false, kHeavyBall)
  PYOPT_SGD(false, false, kNesterov) PYOPT_SGD(false, true, kNoMomentum)
  PYOPT_SGD(false, true, kHeavyBall) PYOPT_SGD(false, true, kNesterov)
  PYOPT_SGD(true, false, kNoMomentum) PYOPT_SGD(true, false, kHeavyBall)
  PYOPT_SGD(true, false, kNesterov) PYOPT_SGD(true, true, kNoMomentum)
  PYOPT_SGD(true, true, kHeavyBall) PYOPT_SGD(true, true, kNesterov)
#undef PYOPT_SGD
}

template <typename T>
static void rmsprop_dispatch(const RmspropCall& c, int64_t begin, int64_t end) {
  const int e = sizeof(T);
  const RowExtras x{kRmsCols, kRmsMask, kRmsOut, 5, {e, e, e, e, e}, c.grad_dtype,
                   c.grad_inv_scale};
  const auto go = [&](auto fn) {
    run_rows(c.table, c.n, c.offsets, begin, end, x,
             [&](const int64_t* row, int64_t off, int64_t len, int64_t, float inv_scale) {
               fn(row, off, len, c.hyper, inv_scale);
             });
  };
#define PYOPT_RMS(MAX, WD, CEN, MOM)                                                     \
  if (c.maximize == MAX && c.weight_decay == WD && c.centered == CEN && c.momentum == MOM) \
    return go(rmsprop_row<T, MAX, WD, CEN, MOM>);
#define PYOPT_RMS2(MAX, WD) \
  PYOPT_RMS(MAX, WD, false, false) PYOPT_RMS(MAX, WD, false, true) \
  PYOPT_RMS(MAX, WD, true, false) PYOPT_RMS(MAX, WD, true, true)
  PYOPT_RMS2(false, false) PYOPT_RMS2(false, true) PYOPT_RMS2(true, false) PYOPT_RMS2(true, true)
#undef PYOPT_RMS2
#undef PYOPT_RMS
}

// ---------------------------------------------------------- gradient norms
// 16 float accumulators: the compiler vectorises this without reassociating
// (no -ffast-math), and a block of 1024 keeps float error small before the
// partial sum moves to double.
template <int NORM>
static double norm_block(const float* __restrict x, int64_t k) {
  constexpr int L = 16;
  float acc[L] = {0.0f};
  int64_t i = 0;
  // NORM 3 is GradScaler's finiteness check: x * 0 is 0 for every finite x
  // and NaN for inf or NaN, so the sum is NaN exactly when one is present.
  for (; i + L <= k; i += L) {
    for (int j = 0; j < L; ++j) {
      const float a = x[i + j] < 0.0f ? -x[i + j] : x[i + j];
      if (NORM == 3) acc[j] += x[i + j] * 0.0f;
      else if (NORM == 2) acc[j] += a * a;
      else if (NORM == 1) acc[j] += a;
      else acc[j] = (a > acc[j] || a != a) ? a : acc[j];
    }
  }
  for (; i < k; ++i) {
    const float a = x[i] < 0.0f ? -x[i] : x[i];
    if (NORM == 3) acc[0] += x[i] * 0.0f;
    else if (NORM == 2) acc[0] += a * a;
    else if (NORM == 1) acc[0] += a;
    else acc[0] = (a > acc[0] || a != a) ? a : acc[0];
  }
  double r = 0.0;
  for (int j = 0; j < L; ++j) {
    if (NORM == 0) r = (acc[j] > r || acc[j] != acc[j]) ? acc[j] : r;
    else r += acc[j];
  }
  return r;
}

template <typename T, int NORM>
static double norm_rows(const NormCall& c, int64_t begin, int64_t end) {
  double total = 0.0;
  for_each_row(c.table, kNormCols, c.n, c.offsets, begin, end,
               [&](const int64_t* row, int64_t off, int64_t len, int64_t) {
    const T* g = reinterpret_cast<const T*>(row[kNormGrad]) + off;
    alignas(64) float buf[1024];
    for (int64_t i0 = 0; i0 < len; i0 += 1024) {
      const int64_t k = len - i0 < 1024 ? len - i0 : 1024;
      const float* x;
      if constexpr (is_f32<T>) {
        x = reinterpret_cast<const float*>(g + i0);
      } else {
        for (int64_t b = 0; b < k; b += kBlock) load_block(g + i0 + b, buf + b, k - b < kBlock ? k - b : kBlock);
        x = buf;
      }
      const double r = norm_block<NORM>(x, k);
      if (NORM == 0) total = (r > total || r != r) ? r : total;
      else total += r;
      if (c.coef != 1.0f) {  // check-and-unscale: scale the block while it is in L1
        if constexpr (is_f32<T>) {
          float* w = const_cast<float*>(x);
          for (int64_t i = 0; i < k; ++i) w[i] = w[i] * c.coef;
        } else {
          for (int64_t i = 0; i < k; ++i) buf[i] *= c.coef;
          T* w = const_cast<T*>(g) + i0;
          for (int64_t b = 0; b < k; b += kBlock) store_block(buf + b, w + b, k - b < kBlock ? k - b : kBlock);
        }
      }
    }
  });
  return total;
}

template <typename T>
static double norm_dispatch(const NormCall& c, int64_t begin, int64_t end) {
  if (c.norm == 3) return norm_rows<T, 3>(c, begin, end);
  if (c.norm == 2) return norm_rows<T, 2>(c, begin, end);
  if (c.norm == 1) return norm_rows<T, 1>(c, begin, end);
  return norm_rows<T, 0>(c, begin, end);
}

template <typename T>
static void scale_rows(const NormCall& c, int64_t begin, int64_t end) {
  for_each_row(c.table, kNormCols, c.n, c.offsets, begin, end,
               [&](const int64_t* row, int64_t off, int64_t len, int64_t) {
    T* g = reinterpret_cast<T*>(row[kNormGrad]) + off;
    if constexpr (is_f32<T>) {
      for (int64_t i = 0; i < len; ++i) g[i] = g[i] * c.coef;
    } else {
      alignas(64) float buf[kBlock];
      for (int64_t i0 = 0; i0 < len; i0 += kBlock) {
        const int64_t k = len - i0 < kBlock ? len - i0 : kBlock;
        load_block(g + i0, buf, k);
        for (int64_t i = 0; i < k; ++i) buf[i] *= c.coef;
        store_block(buf, g + i0, k);
      }
    }
  });
}

}  // namespace PYOPT_ISA

void PYOPT_CAT(adam_range, PYOPT_ISA)(const AdamCall& c, int64_t begin, int64_t end) {
  const PYOPT_ISA::AdamRowFn fn = PYOPT_ISA::pick(c);
  if (fn == nullptr || begin >= end) return;
  const int pe = c.param_dtype == kFloat32 ? 4 : 2, se = c.state_dtype == kFloat32 ? 4 : 2;
  const PYOPT_ISA::RowExtras x{kAdamCols, kAdamMask, kAdamOut, 5, {pe, pe, se, se, se},
                               c.grad_dtype, c.grad_inv_scale};
  PYOPT_ISA::run_rows(c.table, c.n, c.offsets, begin, end, x,
                      [&](const int64_t* row, int64_t off, int64_t len, int64_t t,
                          float inv_scale) {
    fn(row, off, len, c.hyper, c.scalars[t], inv_scale);
  });
}

void PYOPT_CAT(sgd_range, PYOPT_ISA)(const SgdCall& c, int64_t begin, int64_t end) {
  if (c.dtype == kFloat32) return PYOPT_ISA::sgd_dispatch<float>(c, begin, end);
  if (c.dtype == kBFloat16) return PYOPT_ISA::sgd_dispatch<PYOPT_ISA::bf16>(c, begin, end);
  if (c.dtype == kFloat16) return PYOPT_ISA::sgd_dispatch<PYOPT_ISA::f16>(c, begin, end);
}

void PYOPT_CAT(rmsprop_range, PYOPT_ISA)(const RmspropCall& c, int64_t begin, int64_t end) {
  if (c.dtype == kFloat32) return PYOPT_ISA::rmsprop_dispatch<float>(c, begin, end);
  if (c.dtype == kBFloat16) return PYOPT_ISA::rmsprop_dispatch<PYOPT_ISA::bf16>(c, begin, end);
  if (c.dtype == kFloat16) return PYOPT_ISA::rmsprop_dispatch<PYOPT_ISA::f16>(c, begin, end);
}

double PYOPT_CAT(norm_range, PYOPT_ISA)(const NormCall& c, int64_t begin, int64_t end) {
  if (c.dtype == kBFloat16) return PYOPT_ISA::norm_dispatch<PYOPT_ISA::bf16>(c, begin, end);
  if (c.dtype == kFloat16) return PYOPT_ISA::norm_dispatch<PYOPT_ISA::f16>(c, begin, end);
  return PYOPT_ISA::norm_dispatch<float>(c, begin, end);
}

void PYOPT_CAT(scale_range, PYOPT_ISA)(const NormCall& c, int64_t begin, int64_t end) {
  if (c.dtype == kBFloat16) return PYOPT_ISA::scale_rows<PYOPT_ISA::bf16>(c, begin, end);
  if (c.dtype == kFloat16) return PYOPT_ISA::scale_rows<PYOPT_ISA::f16>(c, begin, end);
  return PYOPT_ISA::scale_rows<float>(c, begin, end);
}

}  // namespace pyopt
