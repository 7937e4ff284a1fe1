// CPU optimizer entry points: ISA-neutral declarations shared by the
// dispatcher (optim.cpp) and the per-ISA kernel translation units.
#pragma once
#include <cstdint>

#include "common/optim_math.h"
#include "common/optim_table.h"
#include "cpu/isa.h"

namespace pyopt {

// One Adam call over all tensors of a (group, device, dtype). Plain data only:
// the per-ISA translation units must not share any inline code.
struct AdamCall {
  const int64_t* table;                // n x kAdamCols, see optim_table.h
  int64_t n;
  const int64_t* offsets;              // n + 1 prefix sums of numel
  const AdamTensorScalars* scalars;    // n per-tensor scalars
  AdamHyper hyper;
  bool amsgrad, maximize;
  int wd_mode;                         // WeightDecay
  int param_dtype, state_dtype;        // DType
  int grad_dtype;                      // param_dtype, or the 16-bit dtype with a master
  float grad_inv_scale;                // 1: none; else grads are unscaled in place first
};

struct SgdCall {
  const int64_t* table;                // n x kSgdCols
  int64_t n;
  const int64_t* offsets;
  SgdHyper hyper;
  bool maximize, weight_decay;
  int momentum;                        // Momentum
  int dtype;                           // DType of params and buffers
  int grad_dtype;
  float grad_inv_scale;
};

struct RmspropCall {
  const int64_t* table;                // n x kRmsCols
  int64_t n;
  const int64_t* offsets;
  RmspropHyper hyper;
  bool maximize, weight_decay, centered, momentum;
  int dtype;
  int grad_dtype;
  float grad_inv_scale;
};

// Gradient norm and scaling over a [n, kNormCols] table of grads.
struct NormCall {
  const int64_t* table;
  int64_t n;
  const int64_t* offsets;
  int dtype;
  int norm;                            // 1, 2, 0 for max-abs (inf), 3: NaN iff any non-finite
  float coef;                          // scale_grads: the multiplier
};

// Processes elements [begin, end) of the concatenation of all tensors.
void adam_range_baseline(const AdamCall& call, int64_t begin, int64_t end);
void adam_range_avx2(const AdamCall& call, int64_t begin, int64_t end);
void adam_range_avx512(const AdamCall& call, int64_t begin, int64_t end);

void sgd_range_baseline(const SgdCall& call, int64_t begin, int64_t end);
void sgd_range_avx2(const SgdCall& call, int64_t begin, int64_t end);
void sgd_range_avx512(const SgdCall& call, int64_t begin, int64_t end);
void rmsprop_range_baseline(const RmspropCall& call, int64_t begin, int64_t end);
void rmsprop_range_avx2(const RmspropCall& call, int64_t begin, int64_t end);
void rmsprop_range_avx512(const RmspropCall& call, int64_t begin, int64_t end);

// grad_inv_scale (GradScaler's 1 / scale, 1 for none) multiplies every grad
// in place before the update, as torch's fused optimizers do. grad_dtype is
// the param dtype, except with fp32 master weights (see optim_table.h).
double norm_range_baseline(const NormCall& call, int64_t begin, int64_t end);
double norm_range_avx2(const NormCall& call, int64_t begin, int64_t end);
double norm_range_avx512(const NormCall& call, int64_t begin, int64_t end);
void scale_range_baseline(const NormCall& call, int64_t begin, int64_t end);
void scale_range_avx2(const NormCall& call, int64_t begin, int64_t end);
void scale_range_avx512(const NormCall& call, int64_t begin, int64_t end);

// sum |g|^p over all grads for norm p = 1 or 2, max |g| for norm 0 (inf), or
// for norm 3 a value that is NaN exactly when some grad is inf or NaN (0
// otherwise); NaN propagates. Accumulates in float lanes per block, then in double.
// coef != 1 also multiplies every grad by coef in the same pass, after reading
// it (GradScaler's check-and-unscale).
double grad_norm_cpu(int64_t table_addr, int64_t n, int dtype, int norm, double coef,
                     int nthreads);
// g *= coef for every grad, in place.
void scale_grads_cpu(int64_t table_addr, int64_t n, int dtype, double coef, int nthreads);

void sgd_step_cpu(int64_t table_addr, int64_t n, double lr, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, int dtype, int grad_dtype,
                  double grad_inv_scale, int nthreads);
void rmsprop_step_cpu(int64_t table_addr, int64_t n, double lr, double alpha, double eps,
                      double weight_decay, double momentum, bool centered, bool maximize,
                      int dtype, int grad_dtype, double grad_inv_scale, int nthreads);

void adam_step_cpu(int64_t table_addr, int64_t n, double lr, double beta1, double beta2,
                   double eps, double weight_decay, bool amsgrad, bool maximize,
                   bool decoupled, int param_dtype, int state_dtype, int grad_dtype,
                   double grad_inv_scale, int nthreads);

}  // namespace pyopt
