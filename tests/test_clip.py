"""pyopt.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""
import math

import pytest
import torch

import pyopt
from conftest import DTYPES

NORMS = [2.0, 1.0, math.inf, 3.0]


def _params(dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for s in [(33, 65), (4097,), (1,), (0,), (80000,)]:
        p = torch.zeros(s, dtype=dtype, requires_grad=True)
        p.grad = (torch.randn(s, generator=gen) * scale).to(dtype)
        ps.append(p)
    ps.append(torch.zeros(3, dtype=dtype, requires_grad=True))  # no grad: ignored
    return ps


@pytest.mark.parametrize("max_norm", [0.5, 1e9])   # clipping and not
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matches_torch(dtype, norm_type, max_norm):
    dt = DTYPES[dtype]
    a, b = _params(dt), _params(dt)
    if norm_type == math.inf:  # torch: no infinity norm of an empty tensor
        with pytest.raises(RuntimeError, match="infinity norm"):
            torch.nn.utils.clip_grad_norm_(b, max_norm, norm_type)
        with pytest.raises(RuntimeError, match="infinity norm"):
            pyopt.clip_grad_norm_(a, max_norm, norm_type)
        a, b = [p for p in a if p.numel()], [p for p in b if p.numel()]
    n1 = pyopt.clip_grad_norm_(a, max_norm, norm_type)
    n2 = torch.nn.utils.clip_grad_norm_(b, max_norm, norm_type)
    assert n1.dtype == n2.dtype and n1.shape == n2.shape
    tol = 1e-5 if dt == torch.float32 else 2e-2
    torch.testing.assert_close(n1, n2, rtol=tol, atol=0)
    for p, q in zip(a, b):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=1e-6)


def test_nonfinite_norm_follows_torch():
    for err in (False, True):
        a, b = _params(torch.float32), _params(torch.float32)
        a[0].grad[0, 0] = b[0].grad[0, 0] = float("nan")
        if err:
            with pytest.raises(RuntimeError, match="non-finite"):
                pyopt.clip_grad_norm_(a, 1.0, error_if_nonfinite=True)
            with pytest.raises(RuntimeError, match="non-finite"):
                torch.nn.utils.clip_grad_norm_(b, 1.0, error_if_nonfinite=True)
        else:
            n1, n2 = pyopt.clip_grad_norm_(a, 1.0), torch.nn.utils.clip_grad_norm_(b, 1.0)
            assert math.isnan(n1.item()) and math.isnan(n2.item())
            assert torch.isnan(a[1].grad).all() and torch.isnan(b[1].grad).all()
    a = [p for p in _params(torch.float32) if p.numel()]
    a[1].grad[5] = float("inf")
    assert pyopt.clip_grad_norm_(a, 1.0, norm_type=math.inf).item() == math.inf


def test_single_tensor_no_grads_and_mixed_dtypes():
    p = torch.ones(4, requires_grad=True)
    p.grad = torch.full((4,), 3.0)
    assert pyopt.clip_grad_norm_(p, 1.0).item() == pytest.approx(6.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    assert pyopt.clip_grad_norm_([torch.ones(2, requires_grad=True)], 1.0).item() == 0.0
    a = _params(torch.float32) + _params(torch.bfloat16, seed=1)
    b = _params(torch.float32) + _params(torch.bfloat16, seed=1)
    # torch rounds the bf16 group's partial norm to bf16 before combining; pyopt
    # does not, so they agree to bf16 precision
    torch.testing.assert_close(pyopt.clip_grad_norm_(a, 0.5), torch.nn.utils.clip_grad_norm_(b, 0.5),
                               rtol=2 ** -8, atol=0)
