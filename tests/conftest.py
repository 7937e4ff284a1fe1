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


# Special values for the 16-bit step tests, in every list. bf16: float
# subnormals, near-max values. fp16: subnormals, the largest finite, a value
# that flushes to zero; grads of 6e4 overflow exp_avg_sq to inf.
SPECIALS16 = {
    torch.bfloat16: [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                     1e-39, -3e-40, 9e-41, 3.3e38, -3.3e38, 1e-30],
    torch.float16: [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                    6e-8, -3e-6, 1e-4, 65504.0, -6e4, 1e-9],
}


def with_specials(n, dtype, gen, scale=1.0):
    """randn(n) * scale with an eighth of the entries set to SPECIALS16[dtype]."""
    specials = torch.tensor(SPECIALS16[dtype])
    x = torch.randn(n, generator=gen) * scale
    idx = torch.randint(0, n, (max(1, n // 8),), generator=gen)
    x[idx] = specials[torch.randint(0, len(specials), idx.shape, generator=gen)]
    return x.to(dtype)


def step_with_scale(opt, param, grads, scale):
    """One step per grad, through the GradScaler protocol when scale is set;
    returns the grads as each step left them (unscaled in place)."""
    seen = []
    for g in grads:
        param.grad = g.clone()
        if scale is not None:
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        seen.append(param.grad.clone())
    return seen

