"""Which implementations exist, which one serves a call, and why not the others.

Backends:
  native  C++ CPU kernels (pyopt._C) and CUDA kernels (pyopt._C_cuda)
  numba   Numba CPU kernels (pyopt._numba)
  torch   the pure-torch reference (pyopt._reference)

``auto`` picks the first available one for the tensor's device. ``PYOPT_BACKEND``
sets the default; a ``backend=`` argument overrides it. Forcing an unavailable
backend raises :class:`BackendUnavailable` with the reason; ``auto`` falling back
warns once and ``pyopt info`` says why.
"""
from __future__ import annotations

import functools
import os
import warnings

BACKENDS = ("auto", "native", "numba", "torch")
ISAS = ("avx512", "avx2", "baseline")


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot run here; the message says why."""


class _Missing:
    """Stands in for a native module that failed to load.

    Import of pyopt never fails; calling into the missing module raises the
    full diagnostic instead (the bitsandbytes approach).
    """

    def __init__(self, name: str, reason: str):
        self._name, self._reason = name, reason

    def __getattr__(self, attr):
        raise BackendUnavailable(f"pyopt.{self._name} is unavailable: {self._reason}")

    def __bool__(self):
        return False


@functools.lru_cache(maxsize=None)
def _load_cpu():
    """(module or _Missing, reason). Applies PYOPT_CPU_ISA on first load."""
    try:
        from . import _C
    except ImportError as e:  # not built, or built for another platform
        return _Missing("_C", f"the native CPU module did not import ({e}); "
                        "reinstall pyopt from a wheel for this platform or build it "
                        "from source (pip install .)"), str(e)
    isa = os.environ.get("PYOPT_CPU_ISA", "").strip().lower()
    if isa:
        if isa not in ISAS:
            reason = f"PYOPT_CPU_ISA={isa!r} is not one of {', '.join(ISAS)}"
            return _Missing("_C", reason), reason
        try:
            _C.set_isa(isa)
        except ValueError as e:
            reason = f"PYOPT_CPU_ISA={isa!r}: {e}"
            return _Missing("_C", reason), reason
    return _C, ""


@functools.lru_cache(maxsize=None)
def _load_cuda():
    try:
        from . import _C_cuda
    except ImportError as e:
        return _Missing("_C_cuda", f"the CUDA module was not built or did not import ({e})"), \
            "CUDA module not built (build with nvcc present, or PYOPT_CUDA=ON)"
    return _C_cuda, ""


def cpu_module():
    """pyopt._C, or a placeholder that raises the import diagnostic when used."""
    return _load_cpu()[0]


def cuda_module():
    return _load_cuda()[0]


def cuda_status() -> tuple[bool, str]:
    """Whether the CUDA module can run kernels here, and why not."""
    mod, reason = _load_cuda()
    if not mod:
        return False, reason
    err = mod.runtime_error()
    if err or mod.device_count() == 0:
        return False, f"CUDA module present, no device ({err or 'no CUDA device'})"
    return True, ""


def availability(backend: str, device_type: str) -> tuple[bool, str]:
    """(available, reason) for one backend on one device type."""
    if backend == "torch":
        return True, ""
    if backend == "native":
        if device_type == "cpu":
            mod, reason = _load_cpu()
            return bool(mod), reason
        if device_type == "cuda":
            return cuda_status()
        return False, f"no native kernels for device type {device_type!r}"
    if backend == "numba":
        if device_type != "cpu":
            return False, "numba kernels run on the CPU only"
        from ._numba import available
        return available()
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def requested(backend: str | None) -> str:
    """The backend asked for by argument, else PYOPT_BACKEND, else auto."""
    name = backend if backend is not None else os.environ.get("PYOPT_BACKEND", "auto")
    name = str(name).strip().lower() or "auto"
    if name not in BACKENDS:
        src = "backend=" if backend is not None else "PYOPT_BACKEND="
        raise ValueError(f"{src}{name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


_warned: set = set()


@functools.lru_cache(maxsize=None)
def choose(backend: str, device_type: str) -> tuple[str, str]:
    """(backend that serves the request on device_type, why the ones before
    it in the auto order cannot). Raises BackendUnavailable for a forced
    backend that cannot run."""
    if backend != "auto":
        ok, reason = availability(backend, device_type)
        if not ok:
            raise BackendUnavailable(f"backend {backend!r} is unavailable on {device_type}: {reason}")
        return backend, ""
    if device_type == "cpu" and os.environ.get("PYOPT_CPU_ISA", "").strip():
        ok, reason = availability("native", "cpu")
        if not ok:  # a forced ISA is a test setting: never hide it behind a fallback
            raise BackendUnavailable(f"native CPU kernels unavailable: {reason}")
    order = ("native", "numba", "torch") if device_type == "cpu" else ("native", "torch")
    reasons = []
    for name in order:
        ok, reason = availability(name, device_type)
        if ok:
            return name, "; ".join(reasons)
        reasons.append(f"{name}: {reason}")
    raise AssertionError("the torch backend is always available")


def resolve(backend: str, device_type: str) -> str:
    """The concrete backend for a kernel call; the first fallback from native
    per device warns once (``pyopt info`` shows the same reasons)."""
    name, why = choose(backend, device_type)
    if why and device_type not in _warned:
        _warned.add(device_type)
        warnings.warn(f"pyopt: using the {name!r} backend on {device_type} because {why} "
                      "(see `pyopt info`)", RuntimeWarning, stacklevel=3)
    return name


def clear_cache():
    """Forget resolved choices (tests change PYOPT_* variables)."""
    for f in (_load_cpu, _load_cuda, choose):
        f.cache_clear()
    _warned.clear()
