// pybind11 module pyopt._C: raw addresses and sizes in, nothing torch.
// Python (pyopt/_checks.py) validates every tensor before its address
// arrives here; this layer only checks what it cannot get wrong cheaply.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "build_info.h"
#include "cpu/isa.h"
#include "cpu/optim_cpu.h"
#include "cpu/quant_cpu.h"
#include "cpu/sparse_cpu.h"

namespace py = pybind11;

namespace {

pyopt::Isa parse_isa(const std::string& name) {
  pyopt::Isa isa;
  if (!pyopt::isa_from_name(name, &isa))
    throw std::invalid_argument("unknown ISA '" + name + "' (expected avx512, avx2 or baseline)");
  return isa;
}

// (usable, reason) of an optional fast path: available(&why) fills why when not.
py::tuple status(bool (*available)(const char**)) {
  const char* why = nullptr;
  const bool ok = available(&why);
  return py::make_tuple(ok, why ? py::cast(std::string(why)) : py::none());
}

py::dict build_info() {
  py::dict d;
  d["version"] = PYOPT_VERSION_INFO;
  d["compiler"] = PYOPT_COMPILER;
  d["flags"] = PYOPT_BUILD_FLAGS;
  d["isa_variants"] = PYOPT_ISA_LIST;
  d["avx2_flags"] = PYOPT_AVX2_FLAGS;
  d["avx512_flags"] = PYOPT_AVX512_FLAGS;
  d["cuda_option"] = PYOPT_CUDA_OPTION;  // PYOPT_CUDA at build time: AUTO, ON or OFF
#if defined(_OPENMP)
  d["openmp"] = true;
  d["openmp_version"] = _OPENMP;
#else
  d["openmp"] = false;
  d["openmp_version"] = 0;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyopt CPU kernels (addresses in, no torch)";

  m.def("adam_step", &pyopt::adam_step_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("table"), py::arg("n"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("decoupled"), py::arg("param_dtype"), py::arg("state_dtype"),
        py::arg("grad_dtype"), py::arg("grad_inv_scale"), py::arg("nthreads"),
        "Fused Adam/AdamW over an address table (see csrc/common/optim_table.h).");

  m.def("sgd_step", &pyopt::sgd_step_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("table"), py::arg("n"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"),
        py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("dtype"),
        py::arg("grad_dtype"), py::arg("grad_inv_scale"), py::arg("nthreads"), "Fused SGD over an address table (csrc/common/optim_table.h).");

  m.def("rmsprop_step", &pyopt::rmsprop_step_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("table"), py::arg("n"), py::arg("lr"), py::arg("alpha"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("momentum"), py::arg("centered"), py::arg("maximize"),
        py::arg("dtype"), py::arg("grad_dtype"), py::arg("grad_inv_scale"), py::arg("nthreads"),
        "Fused RMSprop over an address table (csrc/common/optim_table.h).");

  m.def("grad_norm", &pyopt::grad_norm_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("table"), py::arg("n"), py::arg("dtype"), py::arg("norm"), py::arg("coef"),
        py::arg("nthreads"),
        "sum |g|^p (p = 1, 2) or max |g| (norm = 0) over an int64 [n, 2] (address, numel) "
        "table; coef != 1 also scales the grads in place in the same pass.");
  m.def("scale_grads", &pyopt::scale_grads_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("table"), py::arg("n"), py::arg("dtype"), py::arg("coef"), py::arg("nthreads"),
        "g *= coef in place over an int64 [n, 2] (address, numel) table.");

  m.def("sparse_linear", &pyopt::sparse_linear_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("format"), py::arg("out"), py::arg("x"), py::arg("values"), py::arg("ptr"),
        py::arg("idx"), py::arg("idx_bits"), py::arg("bias"), py::arg("B"), py::arg("N"),
        py::arg("K"), py::arg("bh"), py::arg("bw"), py::arg("dtype"), py::arg("nthreads"),
        "out[B, N] = x[B, K] @ W^T + bias with W in a sparse layout (format 0 csr, 1 bitmask/nm, "
        "2 bsr; pyopt/sparse/formats.py). bias == 0: none.");

  m.def("quant_linear", &pyopt::quant_linear_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("out"), py::arg("x"), py::arg("qweight"), py::arg("qtype"), py::arg("scale"),
        py::arg("offset"), py::arg("bias"), py::arg("B"), py::arg("N"), py::arg("K"), py::arg("G"),
        py::arg("act"), py::arg("dtype"), py::arg("nthreads"),
        "out[B, N] = x[B, K] @ dequant(W)^T + bias with W quantized (qtype 0 int8, 1 uint8, "
        "2 packed uint4; G groups per row; pyopt/quant/formats.py). act 0: float activations, "
        "1: per-token int8 activations and integer dot products. offset/bias == 0: none.");

  m.def("amx_status", [] { return status(pyopt::quant_amx_available); }, "(usable, reason): whether the quant kernels take AMX tiles at batch >= 16, "
     "on the avx512 variant, for K a multiple of 64; reason says why not.");
  m.def("set_amx", &pyopt::quant_amx_enable, py::arg("enabled"),
        "Turn the AMX quant kernels on or off for this process (tests, comparisons).");
  m.def("bf16_convert_status", [] { return status(pyopt::bf16_convert_available); }, "(usable, reason): whether the avx512 variant's bf16 Adam step runs in one pass with "
     "vcvtne2ps2bf16 (AVX512_BF16) in the calling thread; reason says why not.");
  m.def("set_bf16_convert", &pyopt::bf16_convert_enable, py::arg("enabled"),
        "Turn the one-pass AVX512_BF16 Adam step on or off for this process (tests, comparisons).");
  m.def("build_info", &build_info);
  m.def("isa_compiled", [](const std::string& s) { return pyopt::isa_compiled(parse_isa(s)); });
  m.def("isa_supported", [](const std::string& s) { return pyopt::isa_supported(parse_isa(s)); });
  m.def("best_isa", [] { return std::string(pyopt::isa_name(pyopt::best_isa())); });
  m.def("current_isa", [] { return std::string(pyopt::isa_name(pyopt::current_isa())); });
  m.def("set_isa", [](const std::string& s) {
    const pyopt::Isa isa = parse_isa(s);
    if (!pyopt::isa_compiled(isa))
      throw std::invalid_argument("ISA '" + s + "' is not compiled into this build");
    if (!pyopt::isa_supported(isa))
      throw std::invalid_argument("this CPU does not support ISA '" + s + "'");
    pyopt::set_isa(isa);
  });
}
