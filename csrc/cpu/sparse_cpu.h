// CPU sparse linear entry points: ISA-neutral declarations shared by the
// dispatcher (sparse.cpp) and the per-ISA kernel translation units.
// Layouts: pyopt/sparse/formats.py.
#pragma once
#include <cstdint>

#include "cpu/isa.h"

namespace pyopt {

enum SparseFormat : int { kSparseCsr = 0, kSparseBitmask = 1, kSparseBsr = 2 };

// out[b, i] = bias[i] + sum_j W[i, j] x[b, j]; x [B, K], out [B, N], row-major.
struct SparseCall {
  void* out;
  const void* x;
  const void* values;
  const int64_t* ptr;      // csr/bitmask: row_ptr [N+1]; bsr: block_row_ptr [N/bh+1]
  const void* idx;         // csr: col_idx (uint16 or int32); bitmask: int64 words; bsr: int32 block_col
  const void* bias;        // nullptr: no bias
  int64_t B, N, K;
  int64_t bh, bw;          // bsr block shape
  int idx_bits;            // csr: 16 or 32
  int dtype;               // DType (optim_math.h) of x, values, bias and out
  int format;              // SparseFormat
  int nthreads;
};

#define PYOPT_DECLARE_SPARSE(isa) void PYOPT_CAT(sparse_linear, isa)(const SparseCall& c);
PYOPT_DECLARE_SPARSE(baseline)
#if defined(PYOPT_HAVE_X86_VARIANTS)
PYOPT_DECLARE_SPARSE(avx2)
PYOPT_DECLARE_SPARSE(avx512)
#endif
#undef PYOPT_DECLARE_SPARSE

void sparse_linear_cpu(int format, int64_t out, int64_t x, int64_t values, int64_t ptr,
                       int64_t idx, int idx_bits, int64_t bias, int64_t B, int64_t N, int64_t K,
                       int64_t bh, int64_t bw, int dtype, int nthreads);

}  // namespace pyopt
