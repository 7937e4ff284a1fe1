#include "cpu/isa.h"

#include <atomic>

#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <immintrin.h>
#include <intrin.h>
#elif defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr
#endif

namespace pyopt {
namespace {

#if defined(PYOPT_HAVE_X86_VARIANTS)
#if defined(_MSC_VER)
void cpuid(int leaf, int sub, int out[4]) { __cpuidex(out, leaf, sub); }
unsigned long long xgetbv0() { return _xgetbv(0); }
#else
void cpuid(int leaf, int sub, int out[4]) {
  __asm__ __volatile__("cpuid" : "=a"(out[0]), "=b"(out[1]), "=c"(out[2]), "=d"(out[3])
                       : "a"(leaf), "c"(sub));
}
unsigned long long xgetbv0() {
  unsigned int lo, hi;
  __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
#endif

struct X86Features { bool avx2 = false, avx512 = false, avx512bf16 = false; };

X86Features detect() {
  X86Features f;
  int r[4];
  cpuid(0, 0, r);
  const int max_leaf = r[0];
  cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1;
  const bool fma = (r[2] >> 12) & 1, f16c = (r[2] >> 29) & 1, popcnt = (r[2] >> 23) & 1;
  if (!osxsave || !avx || max_leaf < 7) return f;
  // The OS must save the wider registers on context switch, or using them
  // corrupts state: XCR0 bits 1-2 (SSE/AVX) and 5-7 (opmask, ZMM).
  const unsigned long long xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;
  cpuid(7, 0, r);
  const bool avx2 = (r[1] >> 5) & 1, bmi1 = (r[1] >> 3) & 1, bmi2 = (r[1] >> 8) & 1;
  const bool avx512f = (r[1] >> 16) & 1, avx512dq = (r[1] >> 17) & 1;
  const bool avx512bw = (r[1] >> 30) & 1, avx512vl = (r[1] >> 31) & 1;
  const bool avx512vnni = (r[2] >> 11) & 1;  // the avx512 variant is built with -mavx512vnni
  // the avx2 variant is also built with POPCNT/BMI1/BMI2 (every AVX2 CPU has them)
  f.avx2 = os_avx && avx2 && fma && f16c && popcnt && bmi1 && bmi2;
  f.avx512 = f.avx2 && os_avx512 && avx512f && avx512dq && avx512bw && avx512vl && avx512vnni;
  if (r[0] >= 1) {  // leaf 7's highest subleaf
    cpuid(7, 1, r);
    f.avx512bf16 = f.avx512 && ((r[0] >> 5) & 1);
  }
  return f;
}
const X86Features& features() {
  static const X86Features f = detect();
  return f;
}
#endif

std::atomic<int> g_isa{-1};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAVX512: return "avx512";
    case Isa::kAVX2: return "avx2";
    default: return "baseline";
  }
}

bool isa_from_name(const std::string& name, Isa* out) {
  if (name == "avx512") *out = Isa::kAVX512;
  else if (name == "avx2") *out = Isa::kAVX2;
  else if (name == "baseline") *out = Isa::kBaseline;
  else return false;
  return true;
}

bool isa_compiled(Isa isa) {
#if defined(PYOPT_HAVE_X86_VARIANTS)
  (void)isa;
  return true;
#else
  return isa == Isa::kBaseline;
#endif
}

bool isa_supported(Isa isa) {
  if (isa == Isa::kBaseline) return true;
#if defined(PYOPT_HAVE_X86_VARIANTS)
  return isa == Isa::kAVX512 ? features().avx512 : features().avx2;
#else
  return false;
#endif
}

Isa best_isa() {
  for (Isa isa : {Isa::kAVX512, Isa::kAVX2})
    if (isa_compiled(isa) && isa_supported(isa)) return isa;
  return Isa::kBaseline;
}

Isa current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(best_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) { g_isa.store(static_cast<int>(isa), std::memory_order_relaxed); }

namespace {
std::atomic<bool> g_bf16_on{true};
}

bool bf16_convert_available(const char** why) {
  const char* no = nullptr;
#if defined(PYOPT_HAVE_X86_VARIANTS) && defined(PYOPT_HAVE_AVX512BF16)
  if (!features().avx512bf16) no = "this CPU lacks AVX512_BF16";
  else if (!g_bf16_on.load(std::memory_order_relaxed)) no = "disabled (pyopt._C.set_bf16_convert(False))";
  // The step finds subnormals with vfpclassps, which reads them as zero under
  // DAZ (SDM, and measured here). MXCSR is per thread: each kernel thread asks
  // for itself, and an OpenMP worker keeps the MXCSR it was created with.
  else if (_mm_getcsr() & 0x0040)
    no = "MXCSR.DAZ is set in this thread (torch.set_flush_denormal(True)), under which "
         "vfpclassps reads subnormals as zero; the blocked step runs";
#else
  no = "not compiled (the compiler lacks -mavx512bf16, or not an x86 build)";
#endif
  if (why) *why = no;
  return no == nullptr;
}

void bf16_convert_enable(bool on) { g_bf16_on.store(on, std::memory_order_relaxed); }

}  // namespace pyopt
