"""The AMX tile kernels of the quantized linear (csrc/cpu/quant_amx.cpp):
the accuracy rule on the shapes that take them (partial panels and token
blocks, every scheme whose groups are a multiple of 64, all dtypes, both act
modes, the chunked order for large x), agreement with the AVX-512 kernels,
NaN/inf rows, and what `pyopt info` says. Skips where the CPU or OS has no
AMX, with the reason."""
import pytest
import torch
import torch.nn.functional as F

import pyopt
from pyopt.quant import formats, _kernels

from conftest import DTYPES

C = pyopt._backends.cpu_module()
OK, WHY = C.amx_status() if C is not None else (False, "no native module")
pytestmark = pytest.mark.skipif(not OK, reason=f"AMX quant kernels unavailable: {WHY}")

SCHEMES = {
    "w8-sym-channel": (8, "symmetric", "channel", None),
    "w8-asym-group64": (8, "asymmetric", "group", 64),
    "w8-sym-tensor": (8, "symmetric", "tensor", None),
    "w4-sym-group128": (4, "symmetric", "group", 128),
    "w4-asym-group64": (4, "asymmetric", "group", 64),
    "w4-asym-channel": (4, "asymmetric", "channel", None),
}
# (N, K, B): one partial A tile (17), a partial second tile (40), N past a
# chunk of panels (300), an odd count of 16-token blocks (17, 33, 48), K of
# 3 and 20 tile steps, and K=4096 at B=48, whose packed fp32 x overflows the
# 1 MB bound and takes the chunked panel order
SHAPES = [(17, 192, 16), (40, 256, 17), (70, 640, 33), (300, 1280, 48), (100, 4096, 48)]


@pytest.fixture
def amx_toggle():
    yield C.set_amx
    C.set_amx(True)


def _case(n, k, scheme, seed):
    g = torch.Generator().manual_seed(seed)
    bits, sch, gran, gs = SCHEMES[scheme]
    t = formats.quantize(torch.randn(n, k, generator=g), bits, sch, gran, gs)
    return bits, t, g


CASES = [pytest.param(n, k, b, sch, id=f"{n}x{k}-b{b}-{sch}") for n, k, b in SHAPES
         for sch, (_, _, _, gs) in SCHEMES.items() if gs is None or k % gs == 0]


@pytest.mark.parametrize("act", ["float", "int8"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n,k,b,scheme", CASES)
def test_amx_meets_the_accuracy_rule_and_agrees(n, k, b, scheme, dtype, act, amx_toggle):
    bits, t, g = _case(n, k, scheme, n + k + b)
    x = torch.randn(b, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    got = _kernels.linear(x, t, bias, bits, act, "native")
    amx_toggle(False)
    avx = _kernels.linear(x, t, bias, bits, act, "native")
    w = formats.dequantize(t, bits, k)
    if act == "int8":
        qx, sx = formats.quantize_per_token(x)
        xin = (qx.float() * sx[:, None]).to(dtype)
    else:
        xin = x
    truth = xin.double() @ w.double().t() + bias.double()
    torch_err = (F.linear(xin, w.to(dtype), bias).double() - truth).abs().max().item()
    err = (got.double() - truth).abs().max().item()
    floor = torch.finfo(dtype).eps * ((xin.double().abs() @ w.double().abs().t()).max().item() + 1)
    assert err <= 2 * torch_err + floor, f"err {err} torch {torch_err}"
    # both kernels are within the rule, so within twice the bound of each other
    assert (got.double() - avx.double()).abs().max().item() <= 2 * (2 * torch_err + floor)


def test_amx_int_path_is_exact_before_scaling():
    # per-channel int8 weights, one fold (K <= 1024): each output is
    # float(integer dot) * s * sx, so it is within 2 roundings of the exact value
    bits, t, g = _case(64, 512, "w8-sym-channel", 3)
    x = torch.randn(32, 512, generator=g)
    got = _kernels.linear(x, t, None, bits, "int8", "native").double()
    qx, sx = formats.quantize_per_token(x)
    dot = qx.double() @ t["qweight"].double().t()        # exact: integers below 2^53
    exact = dot * t["scale"].double().t() * sx.double()[:, None]
    assert ((got - exact).abs() <= 3 * torch.finfo(torch.float32).eps * exact.abs()).all()


@pytest.mark.parametrize("act", ["float", "int8"])
def test_amx_nan_and_inf_rows(act):
    t = formats.quantize(torch.randn(48, 256), 4, "symmetric", "group", 128)
    x = torch.randn(20, 256)
    x[3, 7] = float("nan")
    x[5, 9] = float("inf")
    y = _kernels.linear(x, t, None, 4, act, "native")
    assert torch.isnan(y[3]).all()
    # an inf input leaves no output of its row finite, as in F.linear (inf
    # times a weight, or inf * 0 = NaN)
    assert not torch.isfinite(y[5]).any()
    assert not torch.isfinite(F.linear(x[5:6], formats.dequantize(t, 4, 256))).any()
    rest = [i for i in range(20) if i not in (3, 5)]
    assert torch.isfinite(y[rest]).all()


def test_amx_not_taken_when_forced_to_lower_isa():
    from conftest import run_python
    code = """
        import torch, pyopt
        from pyopt.quant import formats, _kernels
        torch.manual_seed(0)
        t = formats.quantize(torch.randn(64, 256), 8, "symmetric", "channel")
        x = torch.randn(32, 256)
        print(_kernels.linear(x, t, None, 8, "float", "native").double().sum().item())
    """
    a = run_python(code, env={"PYOPT_CPU_ISA": "avx2"})
    b = run_python(code, env={"PYOPT_CPU_AMX": "0"})
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert abs(float(a.stdout) - float(b.stdout)) < 1e-3


def test_info_reports_amx():
    from pyopt import _info
    d = _info.info()
    assert d["quant_amx"] == {"used": True, "reason": None}
    assert "Quant AMX:    int8 and bf16 tiles" in _info.format_info(d)


def test_info_says_why_amx_is_off(amx_toggle):
    from pyopt import _info
    amx_toggle(False)
    d = _info.info()
    assert d["quant_amx"]["used"] is False and "disabled" in d["quant_amx"]["reason"]
    assert "Quant AMX:    not used (disabled" in _info.format_info(d)
