// CUDA optimizer kernels: multi-tensor fused Adam / AdamW, SGD and RMSprop.
//
// The per-element math is pyopt::adam_math & co. from csrc/common/optim_math.h,
// the same inline functions the CPU kernels run; this file only moves data
// (multi_tensor_apply.cuh) and computes per-tensor scalars: on the host, or
// with capturable=True in the kernel from device-resident step counts.
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

// capturable=True: GradScaler's tensors and the learning rate stay in device
// memory, so a step needs no host read and can be captured in a CUDA graph.
// found_inf set: the launch writes nothing (the step counters were not
// incremented either, see increment_steps). grad_scale set: each grad is
// multiplied by 1/scale (computed in double, as the host path does) and
// stored back unscaled, as torch's fused kernels leave it.
struct DeviceAmp {
  const float* found_inf = nullptr;
  const float* grad_scale = nullptr;

  __device__ __forceinline__ bool skip() const {
    return found_inf != nullptr && *found_inf != 0.0f;
  }
  __device__ __forceinline__ float inv_scale() const {
    return grad_scale != nullptr ? static_cast<float>(1.0 / static_cast<double>(*grad_scale))
                                 : 1.0f;
  }
};

// The learning rate: a device float32 (capturable, a tensor lr) or a host value.
struct DeviceLr {
  const float* ptr = nullptr;
  double value = 0.0;

  __device__ __forceinline__ double get() const {
    return ptr != nullptr ? static_cast<double>(*ptr) : value;
  }
};

// grad * (1/scale). A 16-bit grad without a master is used as the rounded
// value stored back, as the CPU kernels read it; a master's grad (and fp32)
// stays unrounded, as on the CPU. Exact (a no-op) when inv_scale is 1.
template <typename G, bool MASTER>
__device__ __forceinline__ float unscaled(float g, float inv_scale) {
  g *= inv_scale;
  if constexpr (!MASTER && !std::is_same_v<G, float>) g = to_float<G>(from_float<G>(g));
  return g;
}

// Per-tensor argument: host-computed scalars, or (capturable) the address of
// the device step count, already incremented for this step.
struct AdamTensor {
  AdamTensorScalars s;
  const float* step;
};

struct AdamChunk {
  AdamHyper h;
  AdamTensorScalars s;
  float inv_scale;
};

template <typename List, typename T>
struct Append;
template <typename... Ts, typename T>
struct Append<TypeList<Ts...>, T> {
  using type = TypeList<Ts..., T>;
};
template <bool C, typename List, typename T>
using AppendIf = std::conditional_t<C, typename Append<List, T>::type, List>;

// fp32 master weights (MASTER): list 0 is the fp32 master, the grad G is the
// 16-bit param dtype, and a last list, the 16-bit param, receives the updated
// master rounded to nearest even. Without a master, G is the param dtype.
template <bool MASTER, typename Lists>
constexpr unsigned out_bit() {
  return MASTER ? 1u << (Lists::size - 1) : 0u;
}

// Lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, [max_exp_avg_sq], [out].
template <typename P, typename G, typename S, bool AMSGRAD, bool MAXIMIZE, int WD, bool MASTER>
struct AdamOp : OpDefaults {
  using Lists = AppendIf<MASTER, AppendIf<AMSGRAD, TypeList<P, G, S, S>, S>, G>;
  using PerTensor = AdamTensor;
  // Everything but the grad is written back; the grad only when unscaled.
  static constexpr unsigned kWriteMask = (AMSGRAD ? 0b11101u : 0b01101u) | out_bit<MASTER, Lists>();
  static constexpr unsigned kCondWriteMask = 0b10u;

  AdamHyper h;
  DeviceAmp amp;
  DeviceLr lr;
  double beta1, beta2, weight_decay;

  __device__ __forceinline__ bool skip() const { return amp.skip(); }
  __device__ __forceinline__ bool cond_write() const { return amp.grad_scale != nullptr; }

  __device__ __forceinline__ AdamChunk chunk_scalars(const AdamTensor& t) const {
    AdamChunk c{h, t.s, amp.inv_scale()};
    if (t.step != nullptr) {
      const double lr_v = lr.get();
      c.s = adam_tensor_scalars(lr_v, beta1, beta2, static_cast<double>(*t.step));
      c.h.decay_factor = static_cast<float>(1.0 - lr_v * weight_decay);
    }
    return c;
  }

  __device__ __forceinline__ void operator()(float (&x)[Lists::size], const AdamChunk& c) const {
    x[1] = unscaled<G, MASTER>(x[1], c.inv_scale);
    if constexpr (AMSGRAD) {
      adam_math<true, MAXIMIZE, WD>(x[0], x[1], x[2], x[3], x[4], c.h, c.s);
    } else {
      float unused = 0.0f;
      adam_math<false, MAXIMIZE, WD>(x[0], x[1], x[2], x[3], unused, c.h, c.s);
    }
    if constexpr (MASTER) x[Lists::size - 1] = x[0];
  }
};

// capturable=True: step += 1 for every tensor in device memory, unless
// found_inf is set. Runs before the update kernel on the same stream.
constexpr int kStepsPerLaunch = 480;  // 3.8 KB of kernel arguments
struct StepList {
  float* step[kStepsPerLaunch];
  int n;
};

__global__ void increment_steps(const __grid_constant__ StepList list, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  for (int i = threadIdx.x; i < list.n; i += blockDim.x) *list.step[i] += 1.0f;
}

// SGD lists: 0 param, 1 grad, [2 momentum_buffer].
struct SgdTensor {
  int32_t first;    // the buffer is new: it becomes a copy of the gradient
  float inv_scale;  // set per chunk from DeviceAmp
};

// SGD lists: 0 param, 1 grad, [momentum_buffer], [out].
template <typename T, typename G, bool MAXIMIZE, bool WD, int MOM, bool MASTER>
struct SgdOp : OpDefaults {
  using Lists = AppendIf<MASTER, AppendIf<MOM != kNoMomentum, TypeList<T, G>, T>, G>;
  using PerTensor = SgdTensor;
  static constexpr unsigned kWriteMask = (MOM != kNoMomentum ? 0b101u : 0b01u) |
                                         out_bit<MASTER, Lists>();
  static constexpr unsigned kCondWriteMask = 0b10u;  // unscaled grad

  SgdHyper h;
  DeviceAmp amp;

  __device__ __forceinline__ bool skip() const { return amp.skip(); }
  __device__ __forceinline__ bool cond_write() const { return amp.grad_scale != nullptr; }
  __device__ __forceinline__ SgdTensor chunk_scalars(const SgdTensor& t) const {
    SgdTensor c = t;
    c.inv_scale = amp.inv_scale();
    return c;
  }

  __device__ __forceinline__ void operator()(float (&x)[Lists::size], const SgdTensor& s) const {
    x[1] = unscaled<G, MASTER>(x[1], s.inv_scale);
    if constexpr (MOM != kNoMomentum) {
      sgd_math<MAXIMIZE, WD, MOM>(x[0], x[1], x[2], s.first != 0, h);
    } else {
      float unused = 0.0f;
      sgd_math<MAXIMIZE, WD, MOM>(x[0], x[1], unused, false, h);
    }
    if constexpr (MASTER) x[Lists::size - 1] = x[0];
  }
};

// RMSprop lists: 0 param, 1 grad, 2 square_avg, then momentum_buffer if MOM,
// then grad_avg if CENTERED, then the 16-bit out list if MASTER.
struct NoTensorScalars {
  int32_t unused;
};

struct RmspropChunk {
  RmspropHyper h;
  float inv_scale;
};

template <typename T, typename G, bool MAXIMIZE, bool WD, bool CEN, bool MOM, bool MASTER>
struct RmspropOp : OpDefaults {
  using Lists = AppendIf<MASTER, AppendIf<CEN, AppendIf<MOM, TypeList<T, G, T>, T>, T>, G>;
  using PerTensor = NoTensorScalars;
  static constexpr unsigned kWriteMask = (1u << Lists::size) - 1u - 0b10u;  // all but the grad
  static constexpr unsigned kCondWriteMask = 0b10u;                         // unscaled grad

  RmspropHyper h;
  DeviceAmp amp;
  const float* lr_ptr;  // capturable with a tensor lr; else h.neg_lr

  __device__ __forceinline__ bool skip() const { return amp.skip(); }
  __device__ __forceinline__ bool cond_write() const { return amp.grad_scale != nullptr; }

  __device__ __forceinline__ RmspropChunk chunk_scalars(const NoTensorScalars&) const {
    RmspropChunk c{h, amp.inv_scale()};
    if (lr_ptr != nullptr) c.h.neg_lr = -*lr_ptr;
    return c;
  }

  __device__ __forceinline__ void operator()(float (&x)[Lists::size],
                                             const RmspropChunk& c) const {
    float unused_b = 0.0f, unused_a = 0.0f;
    float& buf = MOM ? x[3] : unused_b;
    float& gavg = CEN ? x[3 + (MOM ? 1 : 0)] : unused_a;
    x[1] = unscaled<G, MASTER>(x[1], c.inv_scale);
    rmsprop_math<MAXIMIZE, WD, CEN, MOM>(x[0], x[1], x[2], gavg, buf, c.h);
    if constexpr (MASTER) x[Lists::size - 1] = x[0];
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


// Device-memory inputs of a capturable step (any may be null).
struct DeviceInputs {
  bool capturable;  // the table's step column holds device float32 addresses
  DeviceLr lr;
  DeviceAmp amp;
};

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("pyopt CUDA ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

// capturable: every row's step += 1 on the device (gated by found_inf).
void launch_increment_steps(const int64_t* table, int64_t n, int cols, int step_col,
                            const float* found_inf, cudaStream_t stream) {
  StepList list;
  list.n = 0;
  for (int64_t i = 0; i < n; ++i) {
    list.step[list.n++] = from_addr<float>(table[i * cols + step_col]);
    if (list.n == kStepsPerLaunch || i == n - 1) {
      increment_steps<<<1, 256, 0, stream>>>(list, found_inf);
      check_launch("step-count kernel launch");
      list.n = 0;
    }
  }
}

// The master's 16-bit copy: every row of a MASTER call has one. Checked for
// all rows before any step count moves or any kernel is queued.
inline void check_out_column(const int64_t* table, int64_t n, int cols, int col) {
  for (int64_t i = 0; i < n; ++i) {
    if (table[i * cols + col] == 0)
      throw std::invalid_argument("pyopt CUDA: master weights without an out column");
  }
}

template <typename P, typename G, typename S, bool AMSGRAD, bool MAXIMIZE, int WD, bool MASTER>
void run_adam(const int64_t* table, int64_t n, double lr, double beta1, double beta2,
              double weight_decay, const AdamHyper& hyper, const DeviceInputs& dev,
              cudaStream_t stream) {
  using Op = AdamOp<P, G, S, AMSGRAD, MAXIMIZE, WD, MASTER>;
  if constexpr (MASTER) check_out_column(table, n, kAdamCols, kAdamOut);
  constexpr int kDepth = Op::Lists::size;
  Op op;
  op.h = hyper;
  op.amp = dev.amp;
  op.lr = dev.lr;
  op.beta1 = beta1;
  op.beta2 = beta2;
  op.weight_decay = weight_decay;
  if (dev.capturable) launch_increment_steps(table, n, kAdamCols, kAdamStep, dev.amp.found_inf, stream);
  MultiTensorLauncher<Op> launcher(op, stream);

  float last_t = -1.0f;
  AdamTensor arg{};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = table + i * kAdamCols;

    if (dev.capturable) {
      // The kernel reads the count (incremented above) and computes the
      // scalars itself; the host never touches device memory.
      arg.step = from_addr<const float>(row[kAdamStep]);
    } else {
      // torch: step_t += 1 on the float32 CPU tensor, then the bias
      // corrections in Python floats (double) from its value. Tensors of a
      // group usually share the count, so the pow() calls are reused.
      float* step = from_addr<float>(row[kAdamStep]);
      *step += 1.0f;
      if (*step != last_t) {
        last_t = *step;
        arg.s = adam_tensor_scalars(lr, beta1, beta2, last_t);
      }
      arg.step = nullptr;
    }

    void* ptrs[kDepth];
    ptrs[0] = from_addr<void>(row[kAdamParam]);
    ptrs[1] = from_addr<void>(row[kAdamGrad]);
    ptrs[2] = from_addr<void>(row[kAdamExpAvg]);
    ptrs[3] = from_addr<void>(row[kAdamExpAvgSq]);
    if constexpr (AMSGRAD) ptrs[4] = from_addr<void>(row[kAdamMaxExpAvgSq]);
    if constexpr (MASTER) ptrs[kDepth - 1] = from_addr<void>(row[kAdamOut]);

    // numel == 0: step counted, nothing launched
    launcher.add(ptrs, row[kAdamNumel], arg, from_addr<const uint8_t>(row[kAdamMask]));
  }
  launcher.flush();
}

template <typename T, typename G, bool MAXIMIZE, bool WD, int MOM, bool MASTER>
void run_sgd(const int64_t* table, int64_t n, const SgdHyper& h, const DeviceAmp& amp,
             cudaStream_t stream) {
  using Op = SgdOp<T, G, MAXIMIZE, WD, MOM, MASTER>;
  if constexpr (MASTER) check_out_column(table, n, kSgdCols, kSgdOut);
  Op op;
  op.h = h;
  op.amp = amp;
  MultiTensorLauncher<Op> launcher(op, stream);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = table + i * kSgdCols;
    void* ptrs[Op::Lists::size];
    ptrs[0] = from_addr<void>(row[kSgdParam]);
    ptrs[1] = from_addr<void>(row[kSgdGrad]);
    if constexpr (MOM != kNoMomentum) ptrs[2] = from_addr<void>(row[kSgdMomentum]);
    if constexpr (MASTER) ptrs[Op::Lists::size - 1] = from_addr<void>(row[kSgdOut]);
    launcher.add(ptrs, row[kSgdNumel], SgdTensor{static_cast<int32_t>(row[kSgdFirst] != 0), 1.0f},
                 from_addr<const uint8_t>(row[kSgdMask]));
  }
  launcher.flush();
}

template <typename T, typename G, bool MAXIMIZE, bool WD, bool CEN, bool MOM, bool MASTER>
void run_rmsprop(const int64_t* table, int64_t n, const RmspropHyper& h, const DeviceInputs& dev,
                 cudaStream_t stream) {
  using Op = RmspropOp<T, G, MAXIMIZE, WD, CEN, MOM, MASTER>;
  if constexpr (MASTER) check_out_column(table, n, kRmsCols, kRmsOut);
  Op op;
  op.h = h;
  op.amp = dev.amp;
  op.lr_ptr = dev.lr.ptr;
  // The step count is kept (state_dict) but not used by the update.
  if (dev.capturable) launch_increment_steps(table, n, kRmsCols, kRmsStep, dev.amp.found_inf, stream);
  MultiTensorLauncher<Op> launcher(op, stream);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* row = table + i * kRmsCols;
    if (!dev.capturable) *from_addr<float>(row[kRmsStep]) += 1.0f;
    void* ptrs[Op::Lists::size];
    ptrs[0] = from_addr<void>(row[kRmsParam]);
    ptrs[1] = from_addr<void>(row[kRmsGrad]);
    ptrs[2] = from_addr<void>(row[kRmsSquareAvg]);
    if constexpr (MOM) ptrs[3] = from_addr<void>(row[kRmsMomentum]);
    if constexpr (CEN) ptrs[3 + (MOM ? 1 : 0)] = from_addr<void>(row[kRmsGradAvg]);
    if constexpr (MASTER) ptrs[Op::Lists::size - 1] = from_addr<void>(row[kRmsOut]);
    launcher.add(ptrs, row[kRmsNumel], NoTensorScalars{0}, from_addr<const uint8_t>(row[kRmsMask]));
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

DeviceInputs device_inputs(bool capturable, double lr, int64_t lr_addr, int64_t grad_scale_addr,
                           int64_t found_inf_addr) {
  DeviceInputs d;
  d.capturable = capturable;
  d.lr.ptr = from_addr<const float>(lr_addr);
  d.lr.value = lr;
  d.amp.grad_scale = from_addr<const float>(grad_scale_addr);
  d.amp.found_inf = from_addr<const float>(found_inf_addr);
  return d;
}

// f(Tag<G>) for the 16-bit codes only (master weights compile no fp32 copy).
template <typename F>
void dispatch_16bit(int code, F&& f) {
  if (code == kBFloat16) return f(Tag<__nv_bfloat16>{});
  return f(Tag<__half>{});
}

// Calls f(Tag<G>, bool_constant<MASTER>). grad_dtype < 0 or == dtype: the
// grad has the param dtype. Otherwise fp32 master weights: the param lists
// (dtype) are float32 and the grad and out list are 16-bit grad_dtype.
template <typename F>
void dispatch_grad(const char* name, int dtype, int grad_dtype, F&& f) {
  if (grad_dtype < 0 || grad_dtype == dtype) {
    dispatch_dtype(dtype, [&](auto t) { f(t, std::false_type{}); });
    return;
  }
  if (dtype != kFloat32 || (grad_dtype != kBFloat16 && grad_dtype != kFloat16)) {
    throw std::invalid_argument(std::string("pyopt CUDA ") + name +
                                ": master weights need float32 lists and a 16-bit grad, got " +
                                dtype_name(dtype) + " and " + dtype_name(grad_dtype));
  }
  dispatch_16bit(grad_dtype, [&](auto g) { f(g, std::true_type{}); });
}

}  // namespace

void sgd_step(int64_t table_addr, int64_t n, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, int dtype, int64_t stream,
              int64_t grad_scale_addr, int64_t found_inf_addr, int grad_dtype) {
  if (!begin_step("sgd_step", n, dtype)) return;
  const DeviceAmp amp = device_inputs(false, lr, 0, grad_scale_addr, found_inf_addr).amp;
  SgdHyper h;
  h.neg_lr = static_cast<float>(-lr);
  h.weight_decay = static_cast<float>(weight_decay);
  h.momentum = static_cast<float>(momentum);
  h.one_minus_dampening = static_cast<float>(1.0 - dampening);
  const int mom = momentum == 0.0 ? kNoMomentum : (nesterov ? kNesterov : kHeavyBall);
  const int64_t* table = from_addr<const int64_t>(table_addr);
  const cudaStream_t s = to_stream(stream);
  dispatch_grad("sgd_step", dtype, grad_dtype, [&](auto g_tag, auto master) {
    using G = typename decltype(g_tag)::type;
    using T = std::conditional_t<decltype(master)::value, float, G>;
    dispatch_bool(maximize, [&](auto mx) {
      dispatch_bool(weight_decay != 0.0, [&](auto wd) {
        const auto go = [&](auto m) {
          run_sgd<T, G, decltype(mx)::value, decltype(wd)::value, decltype(m)::value,
                  decltype(master)::value>(table, n, h, amp, s);
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
                  int64_t stream, bool capturable, int64_t lr_addr, int64_t grad_scale_addr,
                  int64_t found_inf_addr, int grad_dtype) {
  if (!begin_step("rmsprop_step", n, dtype)) return;
  const DeviceInputs dev = device_inputs(capturable, lr, lr_addr, grad_scale_addr, found_inf_addr);
  RmspropHyper h;
  h.neg_lr = static_cast<float>(-lr);
  h.alpha = static_cast<float>(alpha);
  h.one_minus_alpha = static_cast<float>(1.0 - alpha);
  h.eps = static_cast<float>(eps);
  h.weight_decay = static_cast<float>(weight_decay);
  h.momentum = static_cast<float>(momentum);
  const int64_t* table = from_addr<const int64_t>(table_addr);
  const cudaStream_t s = to_stream(stream);
  dispatch_grad("rmsprop_step", dtype, grad_dtype, [&](auto g_tag, auto master) {
    using G = typename decltype(g_tag)::type;
    using T = std::conditional_t<decltype(master)::value, float, G>;
    dispatch_bool(maximize, [&](auto mx) {
      dispatch_bool(weight_decay != 0.0, [&](auto wd) {
        dispatch_bool(centered, [&](auto cen) {
          dispatch_bool(momentum > 0.0, [&](auto mom) {
            run_rmsprop<T, G, decltype(mx)::value, decltype(wd)::value, decltype(cen)::value,
                        decltype(mom)::value, decltype(master)::value>(table, n, h, dev, s);
          });
        });
      });
    });
  });
}

void adam_step(int64_t table_addr, int64_t n, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled,
               int param_dtype, int state_dtype, int64_t stream, bool capturable,
               int64_t lr_addr, int64_t grad_scale_addr, int64_t found_inf_addr,
               int grad_dtype) {
  if (n < 0) throw std::invalid_argument("pyopt CUDA adam_step: n must be >= 0");
  const bool master = grad_dtype >= 0 && grad_dtype != param_dtype;
  if (master && state_dtype != kFloat32)
    throw std::invalid_argument("pyopt CUDA adam_step: master weights need float32 state");
  const DeviceInputs dev = device_inputs(capturable, lr, lr_addr, grad_scale_addr, found_inf_addr);
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

  const auto go = [&](auto p_tag, auto g_tag, auto s_tag, auto is_master) {
    using P = typename decltype(p_tag)::type;
    using G = typename decltype(g_tag)::type;
    using S = typename decltype(s_tag)::type;
    dispatch_bool(amsgrad, [&](auto ams) {
      dispatch_bool(maximize, [&](auto maxim) {
        dispatch_weight_decay(wd, [&](auto wd_c) {
          run_adam<P, G, S, decltype(ams)::value, decltype(maxim)::value, decltype(wd_c)::value,
                   decltype(is_master)::value>(table, n, lr, beta1, beta2, weight_decay, hyper,
                                               dev, cu_stream);
        });
      });
    });
  };
  if (master) {
    if (param_dtype != kFloat32 || (grad_dtype != kBFloat16 && grad_dtype != kFloat16))
      throw std::invalid_argument("pyopt CUDA adam_step: master weights need a float32 master "
                                  "and a 16-bit grad");
    dispatch_16bit(grad_dtype, [&](auto g_tag) {
      go(Tag<float>{}, g_tag, Tag<float>{}, std::true_type{});
    });
    return;
  }
  dispatch_dtype(param_dtype, [&](auto p_tag) {
    dispatch_dtype(state_dtype, [&](auto s_tag) {
      using P = typename decltype(p_tag)::type;
      using S = typename decltype(s_tag)::type;
      if constexpr (kAdamPairSupported<P, S>) go(p_tag, p_tag, s_tag, std::false_type{});
    });
  });
}

}  // namespace cuda
}  // namespace pyopt
