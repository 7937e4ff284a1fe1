// CUDA optimizer kernels: multi-tensor fused Adam / AdamW.
//
// The per-element math is pyopt::adam_math from csrc/common/optim_math.h, the
// same inline function the CPU kernels run; this file only moves data
// (multi_tensor_apply.cuh) and computes per-tensor scalars on the host.
//
// Compile without fast-math flags (--use_fast_math, -ftz, -prec-div=false,
// -prec-sqrt=false): NaN/inf must propagate and sqrt/div must be IEEE, as on
// the CPU.

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/optim_math.h"
#include "common/optim_table.h"
#include "cuda/launchers.h"
#include "cuda/multi_tensor_apply.cuh"

namespace pyopt {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// Device side.

// Lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, [4 max_exp_avg_sq].
template <typename P, typename S, bool AMSGRAD, bool MAXIMIZE, int WD>
struct AdamOp {
  using Lists = std::conditional_t<AMSGRAD, TypeList<P, P, S, S, S>, TypeList<P, P, S, S>>;
  using PerTensor = AdamTensorScalars;
  // Everything but the grad is written back.
  static constexpr unsigned kWriteMask = AMSGRAD ? 0b11101u : 0b01101u;

  AdamHyper h;

  __device__ __forceinline__ void operator()(float (&x)[Lists::size],
                                             const AdamTensorScalars& s) const {
    if constexpr (AMSGRAD) {
      adam_math<true, MAXIMIZE, WD>(x[0], x[1], x[2], x[3], x[4], h, s);
    } else {
      float unused = 0.0f;
      adam_math<false, MAXIMIZE, WD>(x[0], x[1], x[2], x[3], unused, h, s);
    }
  }
};

// SGD lists: 0 param, 1 grad, [2 momentum_buffer].
struct SgdTensor {
  int32_t first;  // the buffer is new: it becomes a copy of the gradient
};

template <typename T, bool MAXIMIZE, bool WD, int MOM>
struct SgdOp {
  using Lists = std::conditional_t<MOM != kNoMomentum, TypeList<T, T, T>, TypeList<T, T>>;
  using PerTensor = SgdTensor;
  static constexpr unsigned kWriteMask = MOM != kNoMomentum ? 0b101u : 0b01u;

  SgdHyper h;

  __device__ __forceinline__ void operator()(float (&x)[Lists::size], const SgdTensor& s) const {
    if constexpr (MOM != kNoMomentum) {
      sgd_math<MAXIMIZE, WD, MOM>(x[0], x[1], x[2], s.first != 0, h);
    } else {
      float unused = 0.0f;
      sgd_math<MAXIMIZE, WD, MOM>(x[0], x[1], unused, false, h);
    }
  }
};

// RMSprop lists: 0 param, 1 grad, 2 square_avg, then momentum_buffer if MOM,
// then grad_avg if CENTERED.
struct NoTensorScalars {
  int32_t unused;
};

template <typename T, bool MOM, bool CEN>
struct RmspropLists;
template <typename T>
struct RmspropLists<T, false, false> { using type = TypeList<T, T, T>; };
template <typename T>
struct RmspropLists<T, true, false> { using type = TypeList<T, T, T, T>; };
template <typename T>
struct RmspropLists<T, false, true> { using type = TypeList<T, T, T, T>; };
template <typename T>
struct RmspropLists<T, true, true> { using type = TypeList<T, T, T, T, T>; };

template <typename T, bool MAXIMIZE, bool WD, bool CEN, bool MOM>
struct RmspropOp {
  using Lists = typename RmspropLists<T, MOM, CEN>::type;
  using PerTensor = NoTensorScalars;
  static constexpr unsigned kWriteMask = (1u << Lists::size) - 1u - 0b10u;  // all but the grad

  RmspropHyper h;

  __device__ __forceinline__ void operator()(float (&x)[Lists::size],
                                             const NoTensorScalars&) const {
    float unused_b = 0.0f, unused_a = 0.0f;
    float& buf = MOM ? x[3] : unused_b;
    float& gavg = CEN ? x[3 + (MOM ? 1 : 0)] : unused_a;
    rmsprop_math<MAXIMIZE, WD, CEN, MOM>(x[0], x[1], x[2], gavg, buf, h);
  }
};

// ---------------------------------------------------------------------------
// Host side.

template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename F>
void dispatch_weight_decay(int wd, F&& f) {
  switch (wd) {
    case kNoDecay: return f(std::integral_constant<int, kNoDecay>{});
    case kL2: return f(std::integral_constant<int, kL2>{});
    default: return f(std::integral_constant<int, kDecoupled>{});
  }
}

// (param/grad dtype, state dtype) pairs compiled in. torch.optim keeps the
// state in the param dtype; fp32 state for 16-bit params is the usual
// mixed-precision layout.
template <typename P, typename S>
constexpr bool kAdamPairSupported =
    std::is_same_v<P, S> || (!std::is_same_v<P, float> && std::is_same_v<S, float>);

const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
    default: return "unknown";
  }
}


template <typename P, typename S, bool AMSGRAD, bool MAXIMIZE, int WD>
void run_adam(const int64_t* table, int64_t n, double lr, double beta1, double beta2,
              const AdamHyper& hyper, cudaStream_t stream) {
  using Op = AdamOp<P, S, AMSGRAD, MAXIMIZE, WD>;
  constexpr int kDepth = Op::Lists::size;
  MultiTensorLauncher<Op> launcher(Op{hyper}, stream);

  float last_t = -1.0f;
  AdamTensorScalars scalars{};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = table + i * kAdamCols;

    // torch: step_t += 1 on the float32 CPU tensor, then the bias
    // corrections in Python floats (double) from its value. Tensors of a
    // group usually share the count, so the pow() calls are reused.
    float* step = from_addr<float>(row[kAdamStep]);
    *step += 1.0f;
    if (*step != last_t) {
      last_t = *step;
      scalars = adam_tensor_scalars(lr, beta1, beta2, last_t);
    }

    void* ptrs[kDepth];
    ptrs[0] = from_addr<void>(row[kAdamParam]);
    ptrs[1] = from_addr<void>(row[kAdamGrad]);
    ptrs[2] = from_addr<void>(row[kAdamExpAvg]);
    ptrs[3] = from_addr<void>(row[kAdamExpAvgSq]);
    if constexpr (AMSGRAD) ptrs[4] = from_addr<void>(row[kAdamMaxExpAvgSq]);

    launcher.add(ptrs, row[kAdamNumel], scalars);  // numel == 0: step counted, nothing launched
  }
  launcher.flush();
}

template <typename T, bool MAXIMIZE, bool WD, int MOM>
void run_sgd(const int64_t* table, int64_t n, const SgdHyper& h, cudaStream_t stream) {
  using Op = SgdOp<T, MAXIMIZE, WD, MOM>;
  MultiTensorLauncher<Op> launcher(Op{h}, stream);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = table + i * kSgdCols;
    void* ptrs[Op::Lists::size];
    ptrs[0] = from_addr<void>(row[kSgdParam]);
    ptrs[1] = from_addr<void>(row[kSgdGrad]);
    if constexpr (MOM != kNoMomentum) ptrs[2] = from_addr<void>(row[kSgdMomentum]);
    launcher.add(ptrs, row[kSgdNumel], SgdTensor{static_cast<int32_t>(row[kSgdFirst] != 0)});
  }
  launcher.flush();
}

template <typename T, bool MAXIMIZE, bool WD, bool CEN, bool MOM>
void run_rmsprop(const int64_t* table, int64_t n, const RmspropHyper& h, cudaStream_t stream) {
  using Op = RmspropOp<T, MAXIMIZE, WD, CEN, MOM>;
  MultiTensorLauncher<Op> launcher(Op{h}, stream);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = table + i * kRmsCols;
    *from_addr<float>(row[kRmsStep]) += 1.0f;
    void* ptrs[Op::Lists::size];
    ptrs[0] = from_addr<void>(row[kRmsParam]);
    ptrs[1] = from_addr<void>(row[kRmsGrad]);
    ptrs[2] = from_addr<void>(row[kRmsSquareAvg]);
    if constexpr (MOM) ptrs[3] = from_addr<void>(row[kRmsMomentum]);
    if constexpr (CEN) ptrs[3 + (MOM ? 1 : 0)] = from_addr<void>(row[kRmsGradAvg]);
    launcher.add(ptrs, row[kRmsNumel], NoTensorScalars{0});
  }
  launcher.flush();
}

// Argument checks shared by the steps with one dtype; false: nothing to launch.
bool begin_step(const char* name, int64_t n, int dtype) {
  if (n < 0) throw std::invalid_argument(std::string("pyopt CUDA ") + name + ": n must be >= 0");
  if (dtype < kFloat32 || dtype > kFloat16)
    throw std::invalid_argument(std::string("pyopt CUDA ") + name + ": unknown dtype code");
  if (n == 0) return false;
  require_device();
  return true;
}

}  // namespace

void sgd_step(int64_t table_addr, int64_t n, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, int dtype, int64_t stream) {
  if (!begin_step("sgd_step", n, dtype)) return;
  SgdHyper h;
  h.neg_lr = static_cast<float>(-lr);
  h.weight_decay = static_cast<float>(weight_decay);
  h.momentum = static_cast<float>(momentum);
  h.one_minus_dampening = static_cast<float>(1.0 - dampening);
  const int mom = momentum == 0.0 ? kNoMomentum : (nesterov ? kNesterov : kHeavyBall);
  const int64_t* table = from_addr<const int64_t>(table_addr);
  const cudaStream_t s = to_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bool(maximize, [&](auto mx) {
      dispatch_bool(weight_decay != 0.0, [&](auto wd) {
        const auto go = [&](auto m) {
          run_sgd<T, decltype(mx)::value, decltype(wd)::value, decltype(m)::value>(table, n, h, s);
        };
        if (mom == kNoMomentum) go(std::integral_constant<int, kNoMomentum>{});
        else if (mom == kHeavyBall) go(std::integral_constant<int, kHeavyBall>{});
        else go(std::integral_constant<int, kNesterov>{});
      });
    });
  });
}

void rmsprop_step(int64_t table_addr, int64_t n, double lr, double alpha, double eps,
                  double weight_decay, double momentum, bool centered, bool maximize, int dtype,
                  int64_t stream) {
  if (!begin_step("rmsprop_step", n, dtype)) return;
  RmspropHyper h;
  h.neg_lr = static_cast<float>(-lr);
  h.alpha = static_cast<float>(alpha);
  h.one_minus_alpha = static_cast<float>(1.0 - alpha);
  h.eps = static_cast<float>(eps);
  h.weight_decay = static_cast<float>(weight_decay);
  h.momentum = static_cast<float>(momentum);
  const int64_t* table = from_addr<const int64_t>(table_addr);
  const cudaStream_t s = to_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bool(maximize, [&](auto mx) {
      dispatch_bool(weight_decay != 0.0, [&](auto wd) {
        dispatch_bool(centered, [&](auto cen) {
          dispatch_bool(momentum > 0.0, [&](auto mom) {
            run_rmsprop<T, decltype(mx)::value, decltype(wd)::value, decltype(cen)::value,
                        decltype(mom)::value>(table, n, h, s);
          });
        });
      });
    });
  });
}

void adam_step(int64_t table_addr, int64_t n, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled,
               int param_dtype, int state_dtype, int64_t stream) {
  if (n < 0) throw std::invalid_argument("pyopt CUDA adam_step: n must be >= 0");
  // Resolve the dtype pair first so a bad pair is reported even for n == 0.
  bool supported = false;
  dispatch_dtype(param_dtype, [&](auto p_tag) {
    dispatch_dtype(state_dtype, [&](auto s_tag) {
      using P = typename decltype(p_tag)::type;
      using S = typename decltype(s_tag)::type;
      supported = kAdamPairSupported<P, S>;
    });
  });
  if (!supported) {
    throw std::invalid_argument(std::string("pyopt CUDA adam_step: unsupported dtypes param=") +
                                dtype_name(param_dtype) + " state=" + dtype_name(state_dtype));
  }
  if (n == 0) return;
  require_device();

  AdamHyper hyper;
  hyper.beta2 = static_cast<float>(beta2);
  hyper.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  hyper.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  hyper.eps = static_cast<float>(eps);
  hyper.weight_decay = static_cast<float>(weight_decay);
  hyper.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  const int wd = weight_decay == 0.0 ? kNoDecay : (decoupled ? kDecoupled : kL2);

  const int64_t* table = from_addr<const int64_t>(table_addr);
  const cudaStream_t cu_stream = to_stream(stream);

  dispatch_dtype(param_dtype, [&](auto p_tag) {
    dispatch_dtype(state_dtype, [&](auto s_tag) {
      using P = typename decltype(p_tag)::type;
      using S = typename decltype(s_tag)::type;
      if constexpr (kAdamPairSupported<P, S>) {
        dispatch_bool(amsgrad, [&](auto ams) {
          dispatch_bool(maximize, [&](auto maxim) {
            dispatch_weight_decay(wd, [&](auto wd_c) {
              run_adam<P, S, decltype(ams)::value, decltype(maxim)::value, decltype(wd_c)::value>(
                  table, n, lr, beta1, beta2, hyper, cu_stream);
            });
          });
        });
      }
    });
  });
}

}  // namespace cuda
}  // namespace pyopt
