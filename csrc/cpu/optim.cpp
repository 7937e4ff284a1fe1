// CPU optimizer dispatcher: per-tensor host scalars, work split, ISA choice.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "cpu/optim_cpu.h"

namespace pyopt {
namespace {

// Below this many elements per thread, waking a second thread costs more
// than it saves (measured: ~5 us per parallel region on 2 cores).
constexpr int64_t kMinElemsPerThread = 32768;
// Thread ranges start on 64-element boundaries: whole cache lines for every
// dtype, so two threads never write the same line.
constexpr int64_t kAlign = 64;

using RangeFn = void (*)(const AdamCall&, int64_t, int64_t);

RangeFn adam_range_for(Isa isa) {
#if defined(PYOPT_HAVE_X86_VARIANTS)
  if (isa == Isa::kAVX512) return adam_range_avx512;
  if (isa == Isa::kAVX2) return adam_range_avx2;
#endif
  (void)isa;
  return adam_range_baseline;
}

// Splits [0, total) evenly across up to nthreads threads (fewer when there
// is too little work) and runs body(tid, begin, end) on each, so many small
// tensors share the cores just like one large one. Returns the thread count.
template <typename Body>
int64_t parallel_split(int64_t total, int nthreads, const Body& body) {
  int64_t t = total / kMinElemsPerThread;
  if (t > nthreads) t = nthreads;
  if (t <= 1) {
    body(0, 0, total);
    return 1;
  }
#if defined(_OPENMP)
  int64_t used = 1;
#pragma omp parallel num_threads(static_cast<int>(t))
  {
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t begin = total * tid / nt, end = total * (tid + 1) / nt;
    begin = tid == 0 ? 0 : begin / kAlign * kAlign;
    end = tid == nt - 1 ? total : end / kAlign * kAlign;
    if (tid == 0) used = nt;
    body(tid, begin, end);
  }
  return used;
#else
  body(0, 0, total);
  return 1;
#endif
}

template <typename Call>
void parallel_over_elements(void (*fn)(const Call&, int64_t, int64_t), const Call& call,
                            int64_t total, int nthreads) {
  parallel_split(total, nthreads, [&](int64_t, int64_t b, int64_t e) { fn(call, b, e); });
}

template <typename Call>
using RangeOf = void (*)(const Call&, int64_t, int64_t);

template <typename Call>
RangeOf<Call> pick_isa(RangeOf<Call> baseline, RangeOf<Call> avx2, RangeOf<Call> avx512) {
#if defined(PYOPT_HAVE_X86_VARIANTS)
  const Isa isa = current_isa();
  if (isa == Isa::kAVX512) return avx512;
  if (isa == Isa::kAVX2) return avx2;
#endif
  (void)avx2;
  (void)avx512;
  return baseline;
}

// Prefix sums of the numel column, reused between calls.
const int64_t* element_offsets(const int64_t* table, int64_t n, int cols, int numel_col) {
  thread_local std::vector<int64_t> offsets;
  offsets.resize(static_cast<size_t>(n) + 1);
  offsets[0] = 0;
  for (int64_t i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + table[i * cols + numel_col];
  return offsets.data();
}

void check_dtype(int dtype, const char* op) {
  if (dtype < kFloat32 || dtype > kFloat16)
    throw std::invalid_argument(std::string(op) + ": unknown dtype code");
}

}  // namespace

double grad_norm_cpu(int64_t table_addr, int64_t n, int dtype, int norm, double coef,
                     int nthreads) {
  check_dtype(dtype, "grad_norm");
  if (norm < 0 || norm > 3)
    throw std::invalid_argument("grad_norm: norm must be 1, 2, 0 (inf) or 3 (finiteness check)");
  if (n <= 0) return 0.0;
  NormCall call{};
  call.table = reinterpret_cast<const int64_t*>(table_addr);
  call.n = n;
  call.offsets = element_offsets(call.table, n, kNormCols, kNormNumel);
  call.dtype = dtype;
  call.norm = norm;
  call.coef = static_cast<float>(coef);
  using NormFn = double (*)(const NormCall&, int64_t, int64_t);
  NormFn fn = norm_range_baseline;
#if defined(PYOPT_HAVE_X86_VARIANTS)
  if (current_isa() == Isa::kAVX512) fn = norm_range_avx512;
  else if (current_isa() == Isa::kAVX2) fn = norm_range_avx2;
#endif
  double partial[256] = {0.0};
  const int64_t t = parallel_split(call.offsets[n], nthreads < 256 ? nthreads : 256,
                                   [&](int64_t tid, int64_t b, int64_t e) {
                                     partial[tid] = fn(call, b, e);
                                   });
  double r = 0.0;
  for (int64_t i = 0; i < t; ++i) {
    if (norm == 0) r = (partial[i] > r || partial[i] != partial[i]) ? partial[i] : r;
    else r += partial[i];
  }
  return r;
}

void scale_grads_cpu(int64_t table_addr, int64_t n, int dtype, double coef, int nthreads) {
  check_dtype(dtype, "scale_grads");
  if (n <= 0) return;
  NormCall call{};
  call.table = reinterpret_cast<const int64_t*>(table_addr);
  call.n = n;
  call.offsets = element_offsets(call.table, n, kNormCols, kNormNumel);
  call.dtype = dtype;
  call.coef = static_cast<float>(coef);
  parallel_over_elements(
      pick_isa<NormCall>(scale_range_baseline, scale_range_avx2, scale_range_avx512), call,
      call.offsets[n], nthreads);
}

void sgd_step_cpu(int64_t table_addr, int64_t n, double lr, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, int dtype, int grad_dtype,
                  double grad_inv_scale, int nthreads) {
  check_dtype(dtype, "sgd_step");
  check_dtype(grad_dtype, "sgd_step");
  if (n <= 0) return;
  SgdCall call;
  call.table = reinterpret_cast<const int64_t*>(table_addr);
  call.n = n;
  call.offsets = element_offsets(call.table, n, kSgdCols, kSgdNumel);
  call.hyper.neg_lr = static_cast<float>(-lr);
  call.hyper.weight_decay = static_cast<float>(weight_decay);
  call.hyper.momentum = static_cast<float>(momentum);
  call.hyper.one_minus_dampening = static_cast<float>(1.0 - dampening);
  call.maximize = maximize;
  call.weight_decay = weight_decay != 0.0;
  call.momentum = momentum == 0.0 ? kNoMomentum : (nesterov ? kNesterov : kHeavyBall);
  call.dtype = dtype;
  call.grad_dtype = grad_dtype;
  call.grad_inv_scale = static_cast<float>(grad_inv_scale);
  parallel_over_elements(pick_isa<SgdCall>(sgd_range_baseline, sgd_range_avx2, sgd_range_avx512),
                         call, call.offsets[n], nthreads);
}

void rmsprop_step_cpu(int64_t table_addr, int64_t n, double lr, double alpha, double eps,
                      double weight_decay, double momentum, bool centered, bool maximize,
                      int dtype, int grad_dtype, double grad_inv_scale, int nthreads) {
  check_dtype(dtype, "rmsprop_step");
  check_dtype(grad_dtype, "rmsprop_step");
  if (n <= 0) return;
  RmspropCall call;
  call.table = reinterpret_cast<const int64_t*>(table_addr);
  call.n = n;
  for (int64_t i = 0; i < n; ++i) *reinterpret_cast<float*>(call.table[i * kRmsCols + kRmsStep]) += 1.0f;
  call.offsets = element_offsets(call.table, n, kRmsCols, kRmsNumel);
  call.hyper.neg_lr = static_cast<float>(-lr);
  call.hyper.alpha = static_cast<float>(alpha);
  call.hyper.one_minus_alpha = static_cast<float>(1.0 - alpha);
  call.hyper.eps = static_cast<float>(eps);
  call.hyper.weight_decay = static_cast<float>(weight_decay);
  call.hyper.momentum = static_cast<float>(momentum);
  call.maximize = maximize;
  call.weight_decay = weight_decay != 0.0;
  call.centered = centered;
  call.momentum = momentum > 0.0;
  call.dtype = dtype;
  call.grad_dtype = grad_dtype;
  call.grad_inv_scale = static_cast<float>(grad_inv_scale);
  parallel_over_elements(
      pick_isa<RmspropCall>(rmsprop_range_baseline, rmsprop_range_avx2, rmsprop_range_avx512),
      call, call.offsets[n], nthreads);
}

void adam_step_cpu(int64_t table_addr, int64_t n, double lr, double beta1, double beta2,
                   double eps, double weight_decay, bool amsgrad, bool maximize,
                   bool decoupled, int param_dtype, int state_dtype, int grad_dtype,
                   double grad_inv_scale, int nthreads) {
  check_dtype(grad_dtype, "adam_step");
  if (n <= 0) return;
  const bool same = param_dtype == state_dtype;
  const bool ok_p = param_dtype >= kFloat32 && param_dtype <= kFloat16;
  if (!ok_p || !(same || state_dtype == kFloat32))
    throw std::invalid_argument("adam_step: unsupported (param, state) dtype codes");
  const int64_t* table = reinterpret_cast<const int64_t*>(table_addr);

  // Reused between calls so a step allocates nothing once warm.
  thread_local std::vector<int64_t> offsets;
  thread_local std::vector<AdamTensorScalars> scalars;
  offsets.resize(static_cast<size_t>(n) + 1);
  scalars.resize(static_cast<size_t>(n));

  // Host-side per-tensor scalars, in double like torch's Python code, from
  // each tensor's own step counter (a CPU float32 scalar, as torch keeps it).
  // Tensors of a group almost always share one step count: two pow() per
  // tensor would cost more than the update of a small tensor, so reuse them.
  offsets[0] = 0;
  float last_t = -1.0f;
  AdamTensorScalars last{};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = table + i * kAdamCols;
    float* step = reinterpret_cast<float*>(row[kAdamStep]);
    *step += 1.0f;
    if (*step != last_t) {
      last_t = *step;
      last = adam_tensor_scalars(lr, beta1, beta2, last_t);
    }
    scalars[i] = last;
    offsets[i + 1] = offsets[i] + row[kAdamNumel];
  }

  AdamCall call;
  call.table = table;
  call.n = n;
  call.offsets = offsets.data();
  call.scalars = scalars.data();
  call.hyper.beta2 = static_cast<float>(beta2);
  call.hyper.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  call.hyper.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  call.hyper.eps = static_cast<float>(eps);
  call.hyper.weight_decay = static_cast<float>(weight_decay);
  call.hyper.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  call.amsgrad = amsgrad;
  call.maximize = maximize;
  call.wd_mode = weight_decay == 0.0 ? kNoDecay : (decoupled ? kDecoupled : kL2);
  call.param_dtype = param_dtype;
  call.state_dtype = state_dtype;
  call.grad_dtype = grad_dtype;
  call.grad_inv_scale = static_cast<float>(grad_inv_scale);

  parallel_over_elements(adam_range_for(current_isa()), call, offsets[n], nthreads);
}

}  // namespace pyopt
