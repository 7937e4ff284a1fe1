// Per-element optimizer math shared by the CPU and CUDA kernels.
//
// Everything here is plain float arithmetic in inline host+device functions,
// so the CPU tests also exercise the exact expression the GPU runs. The
// operation order mirrors torch.optim's single-tensor implementation
// (lerp for the first moment, mul+addcmul for the second, addcdiv for the
// update) so that fp32 results agree with torch to rounding.
#pragma once

#if defined(__CUDACC__)
#define PYOPT_HD __host__ __device__ __forceinline__
#else
// static: the CPU build compiles this header into one translation unit per
// ISA (AVX-512, AVX2, baseline). Internal linkage stops the linker from
// merging an AVX-512 copy into the baseline path.
#define PYOPT_HD static inline
#endif

#include <cmath>
#include <cstdint>

// CPU variants built with FMA (GCC/Clang -mfma) divide by the per-tensor
// constant sqrt(1 - beta2^t) with a multiply and two FMAs, see div_by_const.
// Elsewhere (baseline, MSVC, CUDA) the plain division runs; both round alike.
#if !defined(__CUDACC__) && defined(__GNUC__) && defined(__FMA__)
#define PYOPT_FMA_DIV 1
#endif

namespace pyopt {

// dtype codes shared by Python (_checks.py DTYPE_CODES) and native code.
enum DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Weight-decay flavour, a template parameter so the inner loop has no branch.
enum WeightDecay : int { kNoDecay = 0, kL2 = 1, kDecoupled = 2 };

// Scalars that are the same for every tensor of one call.
struct AdamHyper {
  float beta2;
  float one_minus_beta1;   // lerp weight of the first moment
  float one_minus_beta2;
  float eps;
  float weight_decay;      // L2: g += weight_decay * p
  float decay_factor;      // decoupled: p *= 1 - lr * weight_decay (computed in double)
};

// Scalars that depend on the tensor's own step count, computed on the host
// in double precision exactly as torch does, then rounded to float once.
struct AdamTensorScalars {
  float neg_step_size;     // -lr / (1 - beta1^t)
  float bc2_sqrt;          // sqrt(1 - beta2^t)
  float inv_bc2_sqrt;      // 1 / bc2_sqrt rounded to float, for div_by_const
};

// The scalars of a tensor at step count t, in double as torch's Python code
// (and its fused kernels) compute them, rounded to float once. The host runs
// it per tensor; with capturable=True the CUDA kernel runs it per chunk from
// the step count in device memory.
PYOPT_HD AdamTensorScalars adam_tensor_scalars(double lr, double beta1, double beta2,
                                               double t) {
  AdamTensorScalars s;
  s.neg_step_size = static_cast<float>(-(lr / (1.0 - ::pow(beta1, t))));
  s.bc2_sqrt = static_cast<float>(::sqrt(1.0 - ::pow(beta2, t)));
  s.inv_bc2_sqrt = 1.0f / s.bc2_sqrt;
  return s;
}

// torch.lerp's two-sided formula (keeps precision for weights near 1).
PYOPT_HD float lerp_torch(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

// torch.maximum propagates NaN from either side.
PYOPT_HD float maximum_nan(float a, float b) {
  return (a < b || b != b) ? b : a;
}

// x / c, correctly rounded, from rc = RN(1/c): q = RN(x * rc) is within an ulp
// of x / c, the residual x - q * c is exact in an FMA, and one correction
// q + residual * rc rounds to x / c (Markstein's theorem). It needs no
// underflow in the residual and no overflow: it is used for x = sqrt(v), which
// is 0, at least 2^-75, or inf, and c = sqrt(1 - beta2^t) in (0, 1]. An inf x
// gives a NaN residual, which is dropped so that inf / c stays inf. The divider
// is the CPU kernels' bottleneck once data is in cache, and this takes one of
// the three divider ops per element off it. tests/test_optim_adam.py checks
// the result against torch bit for bit over exponents and step counts.
#if defined(PYOPT_FMA_DIV)
static inline float div_by_const(float x, float c, float rc) {
  const float q = x * rc;
  float r = fmaf(-q, c, x);
  r = r == r ? r : 0.0f;
  return fmaf(r, rc, q);
}
#endif

template <bool AMSGRAD, bool MAXIMIZE, int WD>
PYOPT_HD void adam_math(float& p, float g, float& m, float& v, float& vmax,
                        const AdamHyper& h, const AdamTensorScalars& s) {
  if (MAXIMIZE) g = -g;
  if (WD == kL2) g = g + h.weight_decay * p;
  if (WD == kDecoupled) p = p * h.decay_factor;
  m = lerp_torch(m, g, h.one_minus_beta1);
  v = v * h.beta2 + (h.one_minus_beta2 * g) * g;
  float vv = v;
  if (AMSGRAD) {
    vmax = maximum_nan(vmax, v);
    vv = vmax;
  }
  // sqrtf is correctly rounded on both sides (nvcc's default -prec-sqrt=true).
#if defined(PYOPT_FMA_DIV)
  const float denom = div_by_const(sqrtf(vv), s.bc2_sqrt, s.inv_bc2_sqrt) + h.eps;
#else
  const float denom = sqrtf(vv) / s.bc2_sqrt + h.eps;
#endif
  p = p + s.neg_step_size * (m / denom);
}

// ---------------------------------------------------------------- SGD

// Momentum flavour, a template parameter like WeightDecay.
enum Momentum : int { kNoMomentum = 0, kHeavyBall = 1, kNesterov = 2 };

struct SgdHyper {
  float neg_lr;
  float weight_decay;
  float momentum;
  float one_minus_dampening;
};

// torch.optim.SGD (single-tensor order). `first`: the momentum buffer does
// not exist yet and becomes a copy of the (decayed) gradient, as in torch.
template <bool MAXIMIZE, bool WD, int MOM>
PYOPT_HD void sgd_math(float& p, float g, float& buf, bool first, const SgdHyper& h) {
  if (MAXIMIZE) g = -g;
  if (WD) g = g + h.weight_decay * p;
  if (MOM != kNoMomentum) {
    buf = first ? g : buf * h.momentum + h.one_minus_dampening * g;
    g = MOM == kNesterov ? g + h.momentum * buf : buf;
  }
  p = p + h.neg_lr * g;
}

// ------------------------------------------------------------ RMSprop

struct RmspropHyper {
  float neg_lr;
  float alpha;
  float one_minus_alpha;
  float eps;
  float weight_decay;
  float momentum;
};

// torch.optim.RMSprop (single-tensor order): square_avg.mul_(alpha)
// .addcmul_(g, g, 1 - alpha); centered: grad_avg.lerp_(g, 1 - alpha) and
// avg = sqrt(square_avg - grad_avg^2); then avg + eps, and either
// buf = buf * momentum + g / avg; p -= lr * buf, or p -= lr * (g / avg).
template <bool MAXIMIZE, bool WD, bool CENTERED, bool MOM>
PYOPT_HD void rmsprop_math(float& p, float g, float& sq, float& gavg, float& buf,
                           const RmspropHyper& h) {
  if (MAXIMIZE) g = -g;
  if (WD) g = g + h.weight_decay * p;
  sq = sq * h.alpha + (h.one_minus_alpha * g) * g;
  float avg;
  if (CENTERED) {
    gavg = lerp_torch(gavg, g, h.one_minus_alpha);
    avg = sqrtf(sq + (-1.0f * gavg) * gavg);
  } else {
    avg = sqrtf(sq);
  }
  avg = avg + h.eps;
  if (MOM) {
    buf = buf * h.momentum + g / avg;
    p = p + h.neg_lr * buf;
  } else {
    p = p + h.neg_lr * (g / avg);
  }
}

}  // namespace pyopt
