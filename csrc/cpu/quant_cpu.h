// CPU quantized linear entry points: ISA-neutral declarations shared by the
// dispatcher (quant.cpp) and the per-ISA kernel translation units.
// Layout and math: pyopt/quant/formats.py.
#pragma once
#include <cstdint>

#include "cpu/isa.h"

namespace pyopt {

enum QuantType : int { kQInt8 = 0, kQUInt8 = 1, kQUInt4 = 2 };
enum QuantAct : int { kActFloat = 0, kActInt8 = 1 };

// out[b, n] = bias[n] + sum_k x[b, k] * (q[n, k] * scale[n, k / gs] + offset[n, k / gs])
// with gs = K / G; x [B, K], out [B, N] row-major in dtype. act == kActInt8
// quantizes x per token first and sums the products as integers.
struct QuantCall {
  void* out;
  const void* x;
  const void* qw;        // int8/uint8 [N, K] or packed uint4 [N, K/2]
  const float* scale;    // [N, G]
  const float* offset;   // [N, G] or nullptr
  const void* bias;      // [N] in dtype, or nullptr
  int64_t B, N, K, G;
  int qtype;             // QuantType
  int act;               // QuantAct
  int dtype;             // DType (optim_math.h) of x, bias and out
  int nthreads;
};

#define PYOPT_DECLARE_QUANT(isa) void PYOPT_CAT(quant_linear, isa)(const QuantCall& c);
PYOPT_DECLARE_QUANT(baseline)
#if defined(PYOPT_HAVE_X86_VARIANTS)
PYOPT_DECLARE_QUANT(avx2)
PYOPT_DECLARE_QUANT(avx512)
#endif
#undef PYOPT_DECLARE_QUANT

// AMX tile kernels (quant_amx.cpp): available() says whether this build, CPU
// and OS can run them and they are enabled (else *why says why not);
// applies() whether a call takes them.
bool quant_amx_available(const char** why);
void quant_amx_enable(bool on);
bool quant_amx_applies(const QuantCall& c);
void quant_linear_amx(const QuantCall& c);

void quant_linear_cpu(int64_t out, int64_t x, int64_t qweight, int qtype, int64_t scale,
                      int64_t offset, int64_t bias, int64_t B, int64_t N, int64_t K, int64_t G,
                      int act, int dtype, int nthreads);

}  // namespace pyopt
