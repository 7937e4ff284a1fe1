// CPU sparse linear dispatcher: argument sanity and ISA choice. Threading
// lives in the kernels (sparse_kernels.h), which own their scratch buffers.
#include <stdexcept>
#include <string>

#include "cpu/sparse_cpu.h"

namespace pyopt {

void sparse_linear_cpu(int format, int64_t out, int64_t x, int64_t values, int64_t ptr,
                       int64_t idx, int idx_bits, int64_t bias, int64_t B, int64_t N, int64_t K,
                       int64_t bh, int64_t bw, int dtype, int nthreads) {
  if (format < kSparseCsr || format > kSparseBsr)
    throw std::invalid_argument("sparse_linear: unknown format code " + std::to_string(format));
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("sparse_linear: unknown dtype code " + std::to_string(dtype));
  if (B < 0 || N < 0 || K < 0)
    throw std::invalid_argument("sparse_linear: negative size");
  if (format == kSparseCsr && idx_bits != 16 && idx_bits != 32)
    throw std::invalid_argument("sparse_linear: csr idx_bits must be 16 or 32");
  if (format == kSparseBsr && (bh <= 0 || bw <= 0 || N % bh || K % bw))
    throw std::invalid_argument("sparse_linear: bsr block must divide the weight shape");
  if (B == 0 || N == 0) return;
  SparseCall c{reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x),
               reinterpret_cast<const void*>(values), reinterpret_cast<const int64_t*>(ptr),
               reinterpret_cast<const void*>(idx), reinterpret_cast<const void*>(bias),
               B, N, K, bh, bw, idx_bits, dtype, format, nthreads < 1 ? 1 : nthreads};
  const Isa isa = current_isa();
#if defined(PYOPT_HAVE_X86_VARIANTS)
  if (isa == Isa::kAVX512) return sparse_linear_avx512(c);
  if (isa == Isa::kAVX2) return sparse_linear_avx2(c);
#endif
  (void)isa;
  sparse_linear_baseline(c);
}

}  // namespace pyopt
