"""`pyopt info`: what was built, what is usable here, and why not."""
from __future__ import annotations

import os
import platform

import torch

from . import _backends
from ._version import __version__


def info() -> dict:
    """Version, build, CPU ISA in use, threads and every backend's availability."""
    d: dict = {"version": __version__, "torch": torch.__version__,
               "python": platform.python_version(), "platform": platform.platform(),
               "machine": platform.machine()}

    cpu, cpu_reason = _backends._load_cpu()
    if cpu:
        b = cpu.build_info()
        d["cpu_module"] = {"built": True, "compiler": b["compiler"], "flags": b["flags"],
                           "isa_variants": b["isa_variants"].split(","),
                           "isa_flags": {"avx2": b["avx2_flags"], "avx512": b["avx512_flags"]},
                           "openmp": b["openmp"], "cuda_option": b.get("cuda_option")}
        d["cpu_isa"] = {"in_use": cpu.current_isa(), "best": cpu.best_isa(),
                        "forced": os.environ.get("PYOPT_CPU_ISA") or None,
                        "supported": [i for i in _backends.ISAS
                                      if cpu.isa_compiled(i) and cpu.isa_supported(i)]}
        ok, why = cpu.amx_status()
        if ok and cpu.current_isa() != "avx512":
            ok, why = False, f"needs the avx512 variant, {cpu.current_isa()} is in use"
        d["quant_amx"] = {"used": ok, "reason": why}
        ok, why = cpu.bf16_convert_status()
        if ok and cpu.current_isa() != "avx512":
            ok, why = False, f"needs the avx512 variant, {cpu.current_isa()} is in use"
        d["bf16_adam"] = {"one_pass": ok, "reason": why}
        avx512 = cpu.current_isa() == "avx512"
        d["fp16_adam"] = {"one_pass": avx512, "reason": None if avx512 else
                          f"needs the avx512 variant, {cpu.current_isa()} is in use"}
    else:
        d["cpu_module"] = {"built": False, "reason": cpu_reason}
        d["cpu_isa"] = {"in_use": None, "reason": cpu_reason}

    cuda, cuda_reason = _backends._load_cuda()
    if cuda:
        b = cuda.build_info()
        ok, why = _backends.cuda_status()
        d["cuda_module"] = {"built": True, "cuda_version": b["cuda_version"],
                            "archs": b["archs"], "device_count": cuda.device_count(),
                            "status": "ok" if ok else why}
    else:
        d["cuda_module"] = {"built": False, "status": "not built", "reason": cuda_reason}

    d["threads"] = {"torch": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        import numba
        d["threads"]["numba_max"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        pass

    req = os.environ.get("PYOPT_BACKEND") or "auto"
    backends = {}
    for dev in ("cpu", "cuda"):
        row = {}
        for name in ("native", "numba", "torch"):
            ok, why = _backends.availability(name, dev)
            row[name] = {"available": ok, "reason": why}
        try:
            row["auto"] = _backends.choose(req, dev)[0]
        except Exception as e:  # noqa: BLE001 - reported, not raised
            row["auto"] = f"error: {e}"
        backends[dev] = row
    d["backends"] = backends
    d["requested_backend"] = req
    return d


def format_info(d: dict) -> str:
    lines = [f"pyopt {d['version']}  (torch {d['torch']}, python {d['python']}, {d['machine']})"]
    c = d["cpu_module"]
    if c["built"]:
        lines.append(f"CPU module:   built with {c['compiler']}, OpenMP {'on' if c['openmp'] else 'off'}, "
                     f"ISA variants {', '.join(c['isa_variants'])}")
        isa = d["cpu_isa"]
        forced = f" (forced by PYOPT_CPU_ISA)" if isa["forced"] else ""
        lines.append(f"CPU ISA:      {isa['in_use']}{forced}; best on this CPU: {isa['best']}")
        a = d["quant_amx"]
        lines.append("Quant AMX:    " + (
            "int8 and bf16 tiles at batch >= 16 when in_features (and the group) "
            "is a multiple of 64; other shapes run the ISA kernels" if a["used"]
            else f"not used ({a['reason']}); quantized layers run the {isa['in_use']} kernels"))
        b16 = d["bf16_adam"]
        lines.append("bf16 optim:   " + (
            "one pass with AVX512_BF16 rounding (Adam, SGD, RMSprop; bf16 params and state)" if b16["one_pass"]
            else f"blocked path with integer rounding ({b16['reason']}); same results, slower"))
        f16 = d["fp16_adam"]
        lines.append("fp16 optim:   " + (
            "one pass with F16C rounding (Adam, SGD, RMSprop; fp16 params and state)" if f16["one_pass"]
            else f"blocked path ({f16['reason']}); same results, slower"))
    else:
        lines.append(f"CPU module:   unavailable: {c['reason']}")
    g = d["cuda_module"]
    if g["built"]:
        lines.append(f"CUDA module:  built for CUDA {g['cuda_version']}, archs {g['archs']}; "
                     f"{'devices: ' + str(g['device_count']) if g['status'] == 'ok' else g['status']}")
    else:
        lines.append(f"CUDA module:  {g['reason']}")
    t = d["threads"]
    lines.append(f"Threads:      torch {t['torch']} (cpu_count {t['cpu_count']}"
                 + (f", numba max {t['numba_max']})" if "numba_max" in t else ")"))
    lines.append(f"Backends (requested: {d['requested_backend']}):")
    for dev, row in d["backends"].items():
        lines.append(f"  {dev:5s} -> {row['auto']}")
        for name in ("native", "numba", "torch"):
            r = row[name]
            state = "available" if r["available"] else f"unavailable: {r['reason']}"
            lines.append(f"    {name:7s} {state}")
    return "\n".join(lines)
