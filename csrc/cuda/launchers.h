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
// Throws std::invalid_argument for an unsupported dtype pair and
// std::runtime_error when no device is usable or a launch fails.
void adam_step(int64_t table_addr, int64_t n, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled,
               int param_dtype, int state_dtype, int64_t stream);

// Fused SGD over n rows of an int64 [n, kSgdCols] table; launches on `stream`.
void sgd_step(int64_t table_addr, int64_t n, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, int dtype, int64_t stream);

// Fused RMSprop over n rows of an int64 [n, kRmsCols] table. Increments each
// host float32 step counter, launches on `stream`.
void rmsprop_step(int64_t table_addr, int64_t n, double lr, double alpha, double eps,
                  double weight_decay, double momentum, bool centered, bool maximize, int dtype,
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
