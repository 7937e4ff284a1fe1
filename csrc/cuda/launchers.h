// Host entry points of the CUDA kernels, implemented in csrc/cuda/*.cu.
//
// Plain C++: no CUDA header is needed to include this, so bind_cuda.cpp
// compiles with the host compiler alone. Addresses and the stream handle are
// integers; Python (pyopt/_checks.py) validates every tensor before its
// address gets here.
#pragma once

#include <cstdint>
#include <string>

namespace pyopt {
namespace cuda {

// Fused Adam/AdamW step over n tensors (one row each in the int64 table at
// host address table_addr, columns per csrc/common/optim_table.h).
// Increments each tensor's host float32 step counter, then launches the
// multi-tensor kernel on `stream` (a cudaStream_t as an integer). Does not
// synchronize.
//
// capturable: the step column holds device float32 addresses instead; a
// small kernel increments them and the update kernel computes the bias
// corrections from them, so the host reads no device memory and the launches
// can be captured in a CUDA graph. lr_addr (device float32, 0: use lr),
// grad_scale_addr and found_inf_addr (device float32, 0: none) are read by
// the kernels: found_inf != 0 skips the whole step including the counts;
// grad_scale unscales the grads, which are stored back unscaled.
//
// Every row's mask column (uint8/bool, 0 = pruned) is applied in the kernel:
// masked positions of the param and of every state list are stored as 0.
// grad_dtype (-1: the param dtype) differing from param_dtype means fp32
// master weights: the param column is the float32 master, the grad is 16-bit
// grad_dtype, and the row's out column, the 16-bit param, receives the
// updated master rounded to nearest even, in the same kernel. (The CPU
// kernels decide this per row from the out column; here it is per call, and
// pyopt always passes both consistently.)
// Throws std::invalid_argument for an unsupported dtype pair and
// std::runtime_error when no device is usable or a launch fails.
void adam_step(int64_t table_addr, int64_t n, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled,
               int param_dtype, int state_dtype, int64_t stream, bool capturable,
               int64_t lr_addr, int64_t grad_scale_addr, int64_t found_inf_addr,
               int grad_dtype);

// Fused SGD over n rows of an int64 [n, kSgdCols] table; launches on `stream`.
// grad_scale_addr / found_inf_addr and grad_dtype as for adam_step (SGD keeps
// no step count).
void sgd_step(int64_t table_addr, int64_t n, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, int dtype, int64_t stream,
              int64_t grad_scale_addr, int64_t found_inf_addr, int grad_dtype);

// Fused RMSprop over n rows of an int64 [n, kRmsCols] table. Increments each
// host float32 step counter, launches on `stream`. capturable and the device
// addresses as for adam_step.
void rmsprop_step(int64_t table_addr, int64_t n, double lr, double alpha, double eps,
                  double weight_decay, double momentum, bool centered, bool maximize, int dtype,
                  int64_t stream, bool capturable, int64_t lr_addr, int64_t grad_scale_addr,
                  int64_t found_inf_addr, int grad_dtype);

// Sparse linear out[b, i] = bias[i] + sum_j W[i, j] * x[b, j] with W [N, K] in
// one of the layouts of pyopt/sparse/formats.py. Every tensor argument is a
// device address; x [B, K] and out [B, N] are row-major and contiguous; x,
// the weight values, bias and out share `dtype` (0 float32, 1 bfloat16,
// 2 float16). bias == 0 means no bias. Accumulates in float32 and rounds
// once to dtype. Launches on `stream`, does not synchronize. B == 0 or
// N == 0 launches nothing. Throws std::invalid_argument for bad sizes or
// codes and std::runtime_error when no device is usable or a launch fails.
//
// csr: row_ptr int64 [N+1]; col_idx uint16 (idx_bits 16, stored as int16)
// or int32 (idx_bits 32) [nnz]; values [nnz].
void sparse_csr_linear(int64_t out, int64_t x, int64_t values, int64_t row_ptr, int64_t col_idx,
                       int idx_bits, int64_t bias, int64_t B, int64_t N, int64_t K, int dtype,
                       int64_t stream);

// bitmask and nm: bitmask int64 [N, ceil(K/64)] (bit j%64 of word j/64),
// row_ptr int64 [N+1] value offset of each row, values [nnz] in row-major
// order of the set bits. Bits at columns >= K are ignored.
void sparse_bitmask_linear(int64_t out, int64_t x, int64_t values, int64_t row_ptr,
                           int64_t bitmask, int64_t bias, int64_t B, int64_t N, int64_t K,
                           int dtype, int64_t stream);

// bsr: blocks of bh x bw (N % bh == 0, K % bw == 0); block_row_ptr int64
// [N/bh + 1], block_col int32 [nblocks], values [nblocks, bh, bw].
void sparse_bsr_linear(int64_t out, int64_t x, int64_t values, int64_t block_row_ptr,
                       int64_t block_col, int64_t bias, int64_t B, int64_t N, int64_t K,
                       int64_t bh, int64_t bw, int dtype, int64_t stream);

// Quantized linear out[b, n] = bias[n] + sum_k x[b, k] * W[n, k] with W [N, K]
// in one of the layouts of pyopt/quant/formats.py: qtype 0 int8 [N, K], 1
// uint8 [N, K], 2 packed 4-bit uint8 [N, K/2]; scale float32 [N, G], offset
// float32 [N, G] or 0 (none), W = q * scale + offset. G groups of K / G
// elements per row (a multiple of 32 when G > 1). x [B, K], out [B, N] and
// bias [N] (0: none) share `dtype` (0 float32, 1 bfloat16, 2 float16), all
// row-major and contiguous device addresses.
//
// act 0: weight-only; W is dequantized to float32 in registers, products are
// accumulated in float32 and rounded once to dtype.
// act 1: x is first quantized per token into the caller's workspaces ws_qx
// int8 [B, K], ws_sx float32 [B] and ws_xs int32 [B, G] (per-group sums of
// qx), as formats.quantize_per_token; then an int8 tensor-core GEMM with
// exact int32 group sums gives out = bias + sx[b] * sum_g (scale[n, g] *
// dot_g + offset[n, g] * xs[b, g]).
//
// Launches on `stream`, does not synchronize. B == 0 or N == 0 launches
// nothing. Throws std::invalid_argument for bad codes or sizes and
// std::runtime_error when no device is usable or a launch fails.
void quant_linear(int64_t out, int64_t x, int64_t qweight, int qtype, int64_t scale,
                  int64_t offset, int64_t bias, int64_t B, int64_t N, int64_t K, int64_t G,
                  int act, int dtype, int64_t ws_qx, int64_t ws_sx, int64_t ws_xs,
                  int64_t stream);

// Number of visible CUDA devices; 0 when there is no driver or device.
// Never throws.
int device_count() noexcept;

// "" when the CUDA runtime initializes and sees a device, otherwise the
// runtime's error string (e.g. "no CUDA-capable device is detected").
std::string runtime_error();

// CUDART_VERSION of the toolkit that built the module, as "13.0".
std::string cuda_version();

// The architectures the kernels were compiled for (macro PYOPT_CUDA_ARCHS).
std::string cuda_archs();

}  // namespace cuda
}  // namespace pyopt
