import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyopt
from pyopt import _backends

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_backends():
    """Every backend that can run on this CPU (native, numba, torch)."""
    return [b for b in ("native", "numba", "torch") if _backends.availability(b, "cpu")[0]]


def cuda_available():
    ok, why = _backends.cuda_status()
    return ok and torch.cuda.is_available(), why or "torch has no CUDA"


requires_cuda = pytest.mark.skipif(not cuda_available()[0],
                                   reason=f"no usable CUDA device: {cuda_available()[1]}")


def run_python(code: str, env=None, timeout=120):
    """Run code in a fresh interpreter: a crash shows up as a signal exit."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=e, timeout=timeout)


@pytest.fixture(autouse=True)
def _fresh_backend_cache():
    _backends.clear_cache()
    yield
    _backends.clear_cache()


def pytest_report_header(config):
    d = pyopt.info()
    return (f"pyopt {d['version']}: cpu isa {d['cpu_isa'].get('in_use')}, "
            f"cpu backends {cpu_backends()}, cuda module {d['cuda_module']['status']}")
