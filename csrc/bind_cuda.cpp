// pybind11 module _C_cuda: the CUDA kernels behind plain integers.
//
// No torch and no CUDA header here: addresses, element counts, dtype codes
// and the raw stream handle (torch.cuda.current_stream().cuda_stream) come in
// as Python ints. pyopt/_checks.py validates every tensor before calling;
// this layer only checks what would otherwise be undefined behaviour in the
// dispatch (a negative count, an unknown dtype code).
//
// C++ exceptions map to Python: std::invalid_argument -> ValueError,
// std::runtime_error -> RuntimeError.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/launchers.h"

namespace py = pybind11;

namespace {

void check_dtype_code(int code, const char* name) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument(std::string("_C_cuda: ") + name + " must be 0 (float32), "
                                "1 (bfloat16) or 2 (float16), got " + std::to_string(code));
  }
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyopt CUDA kernels (raw addresses in; see pyopt/_checks.py)";

  m.def(
      "adam_step",
      [](int64_t table_addr, int64_t n, double lr, double beta1, double beta2, double eps,
         double weight_decay, bool amsgrad, bool maximize, bool decoupled, int param_dtype,
         int state_dtype, int64_t stream, bool capturable, int64_t lr_addr,
         int64_t grad_scale_addr, int64_t found_inf_addr, int grad_dtype) {
        if (grad_dtype != -1) check_dtype_code(grad_dtype, "grad_dtype");
        if (n < 0) throw std::invalid_argument("_C_cuda.adam_step: n must be >= 0");
        check_dtype_code(param_dtype, "param_dtype");
        check_dtype_code(state_dtype, "state_dtype");
        // Only host arithmetic and asynchronous launches follow, but a launch
        // can block when the launch queue is full: let other threads run.
        py::gil_scoped_release no_gil;
        pyopt::cuda::adam_step(table_addr, n, lr, beta1, beta2, eps, weight_decay, amsgrad,
                               maximize, decoupled, param_dtype, state_dtype, stream, capturable,
                               lr_addr, grad_scale_addr, found_inf_addr, grad_dtype);
      },
      py::arg("table_addr"), py::arg("n"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
      py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
      py::arg("decoupled"), py::arg("param_dtype"), py::arg("state_dtype"), py::arg("stream"),
      py::arg("capturable") = false, py::arg("lr_addr") = 0, py::arg("grad_scale_addr") = 0,
      py::arg("found_inf_addr") = 0, py::arg("grad_dtype") = -1,
      "Fused Adam/AdamW step over n tensors described by an int64 [n, 9] address table "
      "(csrc/common/optim_table.h). Increments each host float32 step (capturable: each "
      "device float32 step, in a kernel), launches on `stream`, does not synchronize. "
      "lr_addr, grad_scale_addr, found_inf_addr: device float32 scalars or 0. Masks and fp32 "
      "master weights (grad_dtype != param_dtype) are applied in the kernel "
      "(csrc/cuda/launchers.h).");

  m.def(
      "sgd_step",
      [](int64_t table_addr, int64_t n, double lr, double momentum, double dampening,
         double weight_decay, bool nesterov, bool maximize, int dtype, int64_t stream,
         int64_t grad_scale_addr, int64_t found_inf_addr, int grad_dtype) {
        check_dtype_code(dtype, "dtype");
        if (grad_dtype != -1) check_dtype_code(grad_dtype, "grad_dtype");
        py::gil_scoped_release no_gil;
        pyopt::cuda::sgd_step(table_addr, n, lr, momentum, dampening, weight_decay, nesterov,
                              maximize, dtype, stream, grad_scale_addr, found_inf_addr,
                              grad_dtype);
      },
      py::arg("table_addr"), py::arg("n"), py::arg("lr"), py::arg("momentum"),
      py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
      py::arg("dtype"), py::arg("stream"), py::arg("grad_scale_addr") = 0,
      py::arg("found_inf_addr") = 0, py::arg("grad_dtype") = -1,
      "Fused SGD over an int64 [n, 7] address table; launches on `stream`. grad_scale_addr, "
      "found_inf_addr: device float32 scalars or 0, as for adam_step.");

  m.def(
      "rmsprop_step",
      [](int64_t table_addr, int64_t n, double lr, double alpha, double eps, double weight_decay,
         double momentum, bool centered, bool maximize, int dtype, int64_t stream,
         bool capturable, int64_t lr_addr, int64_t grad_scale_addr, int64_t found_inf_addr,
         int grad_dtype) {
        check_dtype_code(dtype, "dtype");
        if (grad_dtype != -1) check_dtype_code(grad_dtype, "grad_dtype");
        py::gil_scoped_release no_gil;
        pyopt::cuda::rmsprop_step(table_addr, n, lr, alpha, eps, weight_decay, momentum,
                                  centered, maximize, dtype, stream, capturable, lr_addr,
                                  grad_scale_addr, found_inf_addr, grad_dtype);
      },
      py::arg("table_addr"), py::arg("n"), py::arg("lr"), py::arg("alpha"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("momentum"), py::arg("centered"), py::arg("maximize"),
      py::arg("dtype"), py::arg("stream"), py::arg("capturable") = false,
      py::arg("lr_addr") = 0, py::arg("grad_scale_addr") = 0, py::arg("found_inf_addr") = 0,
      py::arg("grad_dtype") = -1,
      "Fused RMSprop over an int64 [n, 9] address table; launches on `stream`. capturable "
      "and the device addresses as for adam_step.");

  // sparse_*_linear validate their own sizes and codes (csrc/cuda/sparse.cu).
  m.def("sparse_csr_linear", &pyopt::cuda::sparse_csr_linear,
        py::call_guard<py::gil_scoped_release>(),
      py::arg("out"), py::arg("x"), py::arg("values"), py::arg("row_ptr"), py::arg("col_idx"),
      py::arg("idx_bits"), py::arg("bias"), py::arg("B"), py::arg("N"), py::arg("K"),
      py::arg("dtype"), py::arg("stream"),
      "out[B, N] = x[B, K] @ W.T + bias with W in csr (row_ptr int64 [N+1], col_idx uint16 in "
      "int16 storage when idx_bits == 16, int32 when 32). bias == 0: no bias. Launches on "
      "`stream`, does not synchronize.");

  m.def("sparse_bitmask_linear", &pyopt::cuda::sparse_bitmask_linear,
        py::call_guard<py::gil_scoped_release>(),
      py::arg("out"), py::arg("x"), py::arg("values"), py::arg("row_ptr"), py::arg("bitmask"),
      py::arg("bias"), py::arg("B"), py::arg("N"), py::arg("K"), py::arg("dtype"),
      py::arg("stream"),
      "out[B, N] = x[B, K] @ W.T + bias with W in bitmask or nm layout (bitmask int64 "
      "[N, ceil(K/64)], row_ptr int64 [N+1]). bias == 0: no bias. Launches on `stream`.");

  m.def("sparse_bsr_linear", &pyopt::cuda::sparse_bsr_linear,
        py::call_guard<py::gil_scoped_release>(),
      py::arg("out"), py::arg("x"), py::arg("values"), py::arg("block_row_ptr"),
      py::arg("block_col"), py::arg("bias"), py::arg("B"), py::arg("N"), py::arg("K"),
      py::arg("bh"), py::arg("bw"), py::arg("dtype"), py::arg("stream"),
      "out[B, N] = x[B, K] @ W.T + bias with W in bsr (block_row_ptr int64 [N/bh+1], "
      "block_col int32, values [nblocks, bh, bw]). bias == 0: no bias. Launches on `stream`.");

  // quant_linear validates its own codes and sizes (csrc/cuda/quant.cu).
  m.def("quant_linear", &pyopt::cuda::quant_linear, py::call_guard<py::gil_scoped_release>(),
      py::arg("out"), py::arg("x"), py::arg("qweight"), py::arg("qtype"), py::arg("scale"),
      py::arg("offset"), py::arg("bias"), py::arg("B"), py::arg("N"), py::arg("K"),
      py::arg("G"), py::arg("act"), py::arg("dtype"), py::arg("ws_qx"), py::arg("ws_sx"),
      py::arg("ws_xs"), py::arg("stream"),
      "out[B, N] = x[B, K] @ W.T + bias with W quantized (qtype 0 int8 [N, K], 1 uint8 "
      "[N, K], 2 packed 4-bit uint8 [N, K/2]; scale/offset float32 [N, G], offset == 0: "
      "none). act 0: dequantize in registers, float32 accumulation; act 1: per-token int8 "
      "activations into ws_qx int8 [B, K], ws_sx float32 [B], ws_xs int32 [B, G], then an "
      "int8 tensor-core GEMM. bias == 0: no bias. Launches on `stream`, does not "
      "synchronize.");

  m.def("device_count", &pyopt::cuda::device_count,
        "Visible CUDA devices; 0 when there is no driver or device. Never raises.");

  m.def("runtime_error", &pyopt::cuda::runtime_error,
        "'' when the CUDA runtime sees a device, else the runtime's error string.");

  m.def(
      "build_info",
      [] {
        py::dict d;
        d["cuda_version"] = pyopt::cuda::cuda_version();
        d["archs"] = pyopt::cuda::cuda_archs();
        return d;
      },
      "Toolkit version and target architectures this module was built with.");
}
