// CPU quantized linear dispatcher: argument sanity and ISA choice. Threading
// and scratch buffers live in the kernels (quant_kernels.h).
#include <stdexcept>
#include <string>

#include "cpu/quant_cpu.h"

namespace pyopt {

void quant_linear_cpu(int64_t out, int64_t x, int64_t qweight, int qtype, int64_t scale,
                      int64_t offset, int64_t bias, int64_t B, int64_t N, int64_t K, int64_t G,
                      int act, int dtype, int nthreads) {
  if (qtype < kQInt8 || qtype > kQUInt4)
    throw std::invalid_argument("quant_linear: unknown qtype code " + std::to_string(qtype));
  if (act != kActFloat && act != kActInt8)
    throw std::invalid_argument("quant_linear: unknown act code " + std::to_string(act));
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("quant_linear: unknown dtype code " + std::to_string(dtype));
  if (B < 0 || N < 0 || K < 0 || G < 1)
    throw std::invalid_argument("quant_linear: negative size or G < 1");
  if (K % G || (G > 1 && (K / G) % 32))
    throw std::invalid_argument("quant_linear: groups must be a multiple of 32 that divides K");
  if (qtype == kQUInt4 && K % 2)
    throw std::invalid_argument("quant_linear: packed 4-bit weights need an even K");
  if (B == 0 || N == 0) return;
  QuantCall c{reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x),
              reinterpret_cast<const void*>(qweight), reinterpret_cast<const float*>(scale),
              reinterpret_cast<const float*>(offset), reinterpret_cast<const void*>(bias),
              B, N, K, G, qtype, act, dtype, nthreads < 1 ? 1 : nthreads};
  const Isa isa = current_isa();
#if defined(PYOPT_HAVE_X86_VARIANTS)
  // AMX rides on the avx512 variant, so forcing a lower ISA turns it off too
  if (isa == Isa::kAVX512 && quant_amx_applies(c)) return quant_linear_amx(c);
  if (isa == Isa::kAVX512) return quant_linear_avx512(c);
  if (isa == Isa::kAVX2) return quant_linear_avx2(c);
#endif
  (void)isa;
  quant_linear_baseline(c);
}

}  // namespace pyopt
