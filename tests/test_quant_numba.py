"""Numba quantized linear (pyopt._numba.quant) against the pure-torch spec
(pyopt._reference.quant) and a float64 truth, for every layout of
pyopt.quant.formats: 4- and 8-bit, symmetric and asymmetric, per-tensor,
per-channel and group-wise (32, 128) scales, act "float" and "int8".

act="float": both results are held to the float64 product of x with
formats.dequantize(W) by a forward-error bound (float32 accumulation, then one
rounding to x's dtype); the two sum in different orders, so no bitwise match.
act="int8": the integer group dots are exact and both combine them in float64,
so numba and the reference agree to float32 rounding (and after the one
rounding to bf16/fp16, to one ulp of that dtype); the result is also held to
the float64 truth, within the activation quantization error sx/2 * sum|W|.
"""
import pytest
import torch

pytest.importorskip("numba")

from pyopt._numba import quant as NQ  # noqa: E402
from pyopt._reference import quant as RQ  # noqa: E402
from pyopt.quant import formats as F  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative half-ulp of the output dtype (its one rounding)
HALF_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
ACC_TOL = 1e-5          # float32 accumulation, relative to sum |x| |W| (+ |bias|)

# (bits, scheme, granularity, group_size)
LAYOUTS = {f"w{bits}-{s[:3] if s == 'symmetric' else s[:4]}-{g}": (bits, s, gran, gs)
           for bits in (4, 8)
           for s in ("symmetric", "asymmetric")
           for g, gran, gs in (("tensor", "tensor", None), ("channel", "channel", None),
                               ("g32", "group", 32), ("g128", "group", 128))}
# (N, K, B) per granularity: N in 1/7/33, B in 1/3/17, K with a partial 4-bit block
# where the group size allows (96 = 64 + 32, 130 = 2*64 + 2, 160 = 2*64 + 32)
SHAPES = {
    "tensor": [(7, 130, 3), (33, 96, 1), (1, 64, 17)],
    "channel": [(7, 130, 3), (33, 96, 1), (1, 256, 17)],
    "group32": [(7, 96, 3), (33, 64, 1), (1, 160, 17)],
    "group128": [(7, 256, 3), (33, 128, 1), (1, 384, 17)],
}


def _shapes(gran, gs):
    return SHAPES[gran + (str(gs) if gs else "")]


def _layout(n, k, bits, scheme, gran, gs, gen):
    w = torch.randn(n, k, generator=gen)
    if n and k > 2:                         # outliers: a wide range in some groups
        w[0, 1] = 6.0
        w[-1, -2] = -5.0
    t = F.quantize(w, bits, scheme, gran, gs)
    return t, F.dequantize(t, bits, k)


def _inputs(n, k, b, dtype, with_bias, gen):
    x = torch.randn(b, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    return x, bias


def _call(mod, x, t, bias, bits, act):
    return mod.linear(x, t["qweight"], t["scale"], t["offset"], bias, bits, act)


def _truth(x, w, bias):
    """float64 x @ W.T + bias and its magnitude sum |x| |W| + |bias|."""
    xd, wd = x.double(), w.double()
    exact = xd @ wd.T
    mag = xd.abs() @ wd.abs().T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    return exact, mag


def _assert_within(got, exact, bound, what):
    err = (got.double() - exact).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outside the bound, "
                           f"worst excess {float((err - bound).max()):.3g}")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_float_act(layout, dtype, with_bias):
    bits, scheme, gran, gs = layout
    gen = torch.Generator().manual_seed(1)
    for n, k, b in _shapes(gran, gs):
        t, w = _layout(n, k, bits, scheme, gran, gs, gen)
        x, bias = _inputs(n, k, b, dtype, with_bias, gen)
        got = _call(NQ, x, t, bias, bits, "float")
        ref = _call(RQ, x, t, bias, bits, "float")
        assert got.dtype == dtype and got.shape == (b, n)
        exact, mag = _truth(x, w, bias)
        bound = ACC_TOL * mag + HALF_ULP[dtype] * exact.abs() * 1.01 + 1e-30
        _assert_within(ref, exact, bound, f"reference {n}x{k} b={b}")
        _assert_within(got, exact, bound, f"numba {n}x{k} b={b}")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_int8_act(layout, dtype, with_bias):
    bits, scheme, gran, gs = layout
    gen = torch.Generator().manual_seed(2)
    for n, k, b in _shapes(gran, gs):
        t, w = _layout(n, k, bits, scheme, gran, gs, gen)
        x, bias = _inputs(n, k, b, dtype, with_bias, gen)
        got = _call(NQ, x, t, bias, bits, "int8")
        ref = _call(RQ, x, t, bias, bits, "int8")
        assert got.dtype == dtype and got.shape == (b, n)
        # same exact integers, float64 combination: float32 rounding apart,
        # then at most one ulp of a 16-bit dtype
        rel = 1e-5 if dtype is torch.float32 else 2.01 * HALF_ULP[dtype]
        exact, mag = _truth(x, w, bias)
        torch.testing.assert_close(got, ref, rtol=rel, atol=1e-6 * float(mag.max()),
                                   msg=lambda m: f"numba vs reference {n}x{k} b={b}: {m}")
        # float64 truth: |x - sx*qx| <= sx/2 per element (plus float32 slack)
        _, sx = F.quantize_per_token(x)
        quant_err = 0.501 * sx.double()[:, None] * w.double().abs().sum(1)[None, :]
        bound = quant_err + ACC_TOL * mag + HALF_ULP[dtype] * exact.abs() * 1.01 + 1e-30
        _assert_within(got, exact, bound, f"numba int8 {n}x{k} b={b}")


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_row_decode_matches_dequantize(layout):
    """The kernels' own row decode (4-bit blocks, groups, offsets) is bitwise
    formats.dequantize: q * scale rounded, then + offset rounded."""
    bits, scheme, gran, gs = layout
    gen = torch.Generator().manual_seed(3)
    for n, k, _ in _shapes(gran, gs):
        t, w = _layout(n, k, bits, scheme, gran, gs, gen)
        got = NQ.dequantize(t["qweight"], t["scale"], t["offset"], bits, k)
        assert torch.equal(got, w), f"{n}x{k}"


NONFINITE_LAYOUTS = {k: LAYOUTS[k] for k in ("w8-sym-channel", "w4-asym-g32", "w8-asym-g128")}


@pytest.mark.parametrize("act", ["float", "int8"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", list(NONFINITE_LAYOUTS.values()), ids=list(NONFINITE_LAYOUTS))
def test_nonfinite_and_zero_rows(layout, dtype, act):
    """Row 1 has a NaN, row 2 an inf, row 3 is all zeros; rows are independent."""
    bits, scheme, gran, gs = layout
    gen = torch.Generator().manual_seed(4)
    n, k, b = 9, 128, 5
    t, _ = _layout(n, k, bits, scheme, gran, gs, gen)
    x, bias = _inputs(n, k, b, dtype, True, gen)
    x[1, 5] = float("nan")
    x[2, 70] = float("inf")
    x[3] = 0
    got = _call(NQ, x, t, bias, bits, act)
    ref = _call(RQ, x, t, bias, bits, act)
    assert got[1].isnan().all()
    if act == "int8":                        # non-finite amax: sx = NaN, whole row NaN
        assert got[2].isnan().all()
    else:                                    # inf * w: same IEEE pattern as the reference
        assert torch.equal(got[2].isnan(), ref[2].isnan())
        assert torch.equal(got[2].isinf(), ref[2].isinf())
        fin = got[2].isfinite()
        torch.testing.assert_close(got[2][fin], ref[2][fin])
    # an all-zero row gives exactly the bias (amax 0: qx = 0, sx = 0)
    assert torch.equal(got[3], bias)
    keep = [0, 4]
    alone = _call(NQ, x[keep].contiguous(), t, bias, bits, act)
    assert torch.equal(got[keep], alone)
    rtol = 1e-5 if dtype is torch.float32 else 2.01 * HALF_ULP[dtype]
    torch.testing.assert_close(got[keep], ref[keep], rtol=rtol, atol=1e-4)


@pytest.mark.parametrize("act", ["float", "int8"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("bits", [4, 8], ids=["w4", "w8"])
@pytest.mark.parametrize("n,b", [(0, 3), (5, 0), (0, 0)], ids=["N0", "B0", "N0-B0"])
def test_empty(n, b, bits, dtype, act):
    gen = torch.Generator().manual_seed(5)
    k = 64
    for gran, gs in (("channel", None), ("group", 32)):
        t, _ = _layout(n, k, bits, "asymmetric", gran, gs, gen)
        x, bias = _inputs(n, k, b, dtype, True, gen)
        for bb in (bias, None):
            got = _call(NQ, x, t, bb, bits, act)
            assert got.shape == (b, n) and got.dtype == dtype


@pytest.mark.parametrize("act", ["float", "int8"])
def test_thread_count_does_not_change_results(act):
    numba = pytest.importorskip("numba")
    gen = torch.Generator().manual_seed(6)
    t, _ = _layout(67, 256, 4, "asymmetric", "group", 32, gen)
    x, bias = _inputs(67, 256, 5, torch.bfloat16, True, gen)
    full = _call(NQ, x, t, bias, 4, act)
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = _call(NQ, x, t, bias, 4, act)
    finally:
        numba.set_num_threads(old)
    assert torch.equal(full, one)


def test_int8_dot_past_int32():
    """A per-channel dot over K = 70000 reaches 127 * 255 * 70000 > 2**31: the
    int32 partial sums must be cut into runs (the reference sums in float64)."""
    k = 70000
    w = torch.ones(2, k)
    w[:, 0] = -1.0                          # asymmetric: q = 255 except one 0
    t = F.quantize(w, 8, "asymmetric", "channel")
    x = torch.ones(1, k)                    # qx = 127 everywhere
    got = _call(NQ, x, t, None, 8, "int8")
    ref = _call(RQ, x, t, None, 8, "int8")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, (x @ w.T), rtol=1e-4, atol=0)


@pytest.mark.parametrize("bad, err", [
    (dict(act="fp8"), ValueError),
    (dict(bits=3), ValueError),
    (dict(x=torch.zeros(2, 64, dtype=torch.float64)), TypeError),
    (dict(bias=torch.zeros(3)), ValueError),
    (dict(scale=torch.ones(4, 3)), ValueError),
    (dict(qweight=torch.zeros(4, 64, dtype=torch.uint8), bits=4), ValueError),
], ids=["act", "bits", "x-dtype", "bias-shape", "scale-groups", "w4-shape"])
def test_bad_arguments(bad, err):
    t = F.quantize(torch.randn(4, 64), 4, "asymmetric", "group", 32)
    a = dict(x=torch.randn(2, 64), qweight=t["qweight"], scale=t["scale"], offset=t["offset"],
             bias=None, bits=4, act="float")
    a.update(bad)
    with pytest.raises(err):
        NQ.linear(a["x"], a["qweight"], a["scale"], a["offset"], a["bias"], a["bits"], a["act"])
