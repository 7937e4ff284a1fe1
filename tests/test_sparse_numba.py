"""Numba sparse linear kernels (pyopt._numba.sparse) against the pure-torch spec
(pyopt._reference.sparse), for every weight format of pyopt.sparse.formats.

Both are compared with a float64 product of the dense weight the format holds:
the numba result may sum in another order than the reference, so its error may
be at most twice the reference's own (plus a tiny absolute slack), per case.
"""
import pytest
import torch

from pyopt._numba import available
from pyopt.sparse import formats as F

numba_ok, why = available()
pytestmark = pytest.mark.skipif(not numba_ok, reason=f"numba backend unavailable: {why}")

if numba_ok:
    from pyopt._numba import sparse as NS
    from pyopt._reference import sparse as RS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (format name in LINEAR, build kwargs); bsr runs with two block shapes
FORMATS = {
    "csr": ("csr", {}),
    "bitmask": ("bitmask", {}),
    "nm": ("nm", {"nm": (2, 4)}),
    "bsr4x8": ("bsr", {"block": (4, 8)}),
    "bsr16x16": ("bsr", {"block": (16, 16)}),
}
# density of the random keep-masks; "empty" keeps nothing (nnz = 0), "full" everything
PATTERNS = ("sparse", "dense", "empty", "full")


def _keep(name, n, k, pattern, gen):
    fmt, kw = FORMATS[name]
    if pattern == "empty":
        return torch.zeros(n, k, dtype=torch.bool)
    if pattern == "full" and fmt != "nm":
        return torch.ones(n, k, dtype=torch.bool)
    density = {"sparse": 0.12, "dense": 0.7, "full": 1.0}[pattern]
    if fmt == "bsr":
        bh, bw = kw["block"]
        blocks = torch.rand(n // bh, k // bw, generator=gen) < max(density, 0.3)
        keep = blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        keep &= torch.rand(n, k, generator=gen) < 0.8        # holes inside kept blocks
    elif fmt == "nm":
        nn, m = kw["nm"]
        score = torch.rand(n, k // m, m, generator=gen)
        keep = torch.zeros_like(score, dtype=torch.bool)
        keep.scatter_(-1, score.topk(nn, -1).indices, True)
        keep = keep.reshape(n, k)
        if pattern != "full":                                # groups with fewer than n kept
            keep &= torch.rand(n, k, generator=gen) < density + 0.2
    else:
        keep = torch.rand(n, k, generator=gen) < density
    if n > 1:
        keep[n // 2] = False                                 # a fully pruned row
    return keep


def _case(name, dtype, n, k, b, pattern, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    fmt, kw = FORMATS[name]
    w = torch.randn(n, k, generator=gen).to(dtype)
    keep = _keep(name, n, k, pattern, gen)
    t = F.build(fmt, w, keep, **kw)
    args = [t[f] for f in F.FIELDS[fmt]]
    x = torch.randn(b, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    dense = F.to_dense(fmt, t, (n, k)).double()
    exact = x.double() @ dense.T
    if bias is not None:
        exact = exact + bias.double()
    scale = (x.double().abs() @ dense.abs().T).max().item() if n and k and b else 0.0
    return fmt, args, x, bias, exact, scale


def _check(name, dtype, n, k, b, pattern, with_bias, seed=0):
    fmt, args, x, bias, exact, scale = _case(name, dtype, n, k, b, pattern, with_bias, seed)
    got = NS.LINEAR[fmt](x, *args, bias, n)
    ref = RS.LINEAR[fmt](x, *args, bias, n)
    what = f"{name} {dtype} N={n} K={k} B={b} {pattern} bias={with_bias}"
    assert got.shape == (b, n) and got.dtype == dtype and got.is_contiguous(), what
    err = (got.double() - exact).abs().max().item() if got.numel() else 0.0
    err_ref = (ref.double() - exact).abs().max().item() if ref.numel() else 0.0
    atol = 1e-6 * scale + 1e-30
    assert err <= 2 * err_ref + atol, f"{what}: error {err:.3g} vs reference {err_ref:.3g}"
    return got


def _shapes(name):
    """(N values, K values) a format accepts: bsr needs N % bh == 0 and K % bw == 0,
    nm K % 4 == 0."""
    fmt, kw = FORMATS[name]
    if fmt == "bsr":
        bh, bw = kw["block"]
        return (bh, 4 * bh), (bw, 64, 128 + bw)
    if fmt == "nm":
        return (1, 5, 64), (4, 64, 132)
    return (1, 5, 64), (1, 7, 64, 65, 130)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("name", list(FORMATS))
def test_matches_reference(name, dtype):
    ns, ks = _shapes(name)
    seed = 0
    for k in ks:
        for n in ns:
            for b in (1, 3, 17):
                for pattern in PATTERNS:
                    seed += 1
                    _check(name, DTYPES[dtype], n, k, b, pattern, with_bias=seed % 2 == 0,
                           seed=seed)
    # both bias settings for every pattern at one shape
    for pattern in PATTERNS:
        for with_bias in (False, True):
            _check(name, DTYPES[dtype], ns[-1], ks[-1], 3, pattern, with_bias, seed=99)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["csr", "bitmask"])
def test_wide_k_unsigned_columns(name, dtype):
    """K > 32768: csr columns >= 32768 are negative as int16 and must read as uint16."""
    k = 40000
    for b in (1, 3):
        _check(name, DTYPES[dtype], 3, k, b, "sparse", with_bias=True, seed=b)
        _check(name, DTYPES[dtype], 2, k, b, "full", with_bias=False, seed=b)


def test_csr_int32_columns():
    """K > 65536 stores csr columns as int32."""
    k = 70000
    _, args, *_ = _case("csr", torch.float32, 2, k, 1, "sparse", True, 0)
    assert args[2].dtype is torch.int32
    for b in (1, 3):
        _check("csr", torch.float32, 2, k, b, "sparse", with_bias=True, seed=b)


@pytest.mark.parametrize("name", list(FORMATS))
def test_deterministic_across_threads(name):
    """The sum order of a row does not depend on the thread count."""
    import numba

    fmt, args, x, bias, *_ = _case(name, torch.float32, 64, 128, 5, "dense", True, 7)
    x1 = x[:1].contiguous()
    before = numba.get_num_threads()
    try:
        outs = []
        for nt in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(nt)
            outs.append((NS.LINEAR[fmt](x, *args, bias, 64), NS.LINEAR[fmt](x1, *args, bias, 64)))
    finally:
        numba.set_num_threads(before)
    for a, b in outs[1:]:
        assert torch.equal(a, outs[0][0]) and torch.equal(b, outs[0][1])
    # batch 1 and batch > 1 agree to float32 rounding
    torch.testing.assert_close(outs[0][1], outs[0][0][:1], rtol=1e-5, atol=1e-5)


def test_rounds_once_from_float32():
    """bf16 / fp16 results are the float32 sum rounded once, to nearest even:
    row i sums 1 + i * ulp/4, which hits ties (i = 2, 6, ...) and both sides of them."""
    n, k = 16, 64
    gen = torch.Generator().manual_seed(3)
    keep = torch.ones(n, k, dtype=torch.bool)
    keep[:, 1] = False
    for dtype, ulp in ((torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)):
        w = torch.randn(n, k, generator=gen)
        w[:, 0] = 1.0
        w[:, 2] = torch.arange(n) * (ulp / 4)
        x = torch.zeros(1, k)
        x[0, :3] = 1.0
        wd, xd = w.to(dtype), x.to(dtype)
        want = (1 + torch.arange(n) * (ulp / 4)).to(dtype).unsqueeze(0)
        for fmt in ("csr", "bitmask"):
            t = F.build(fmt, wd, keep)
            got = NS.LINEAR[fmt](xd, *[t[f] for f in F.FIELDS[fmt]], None, n)
            assert torch.equal(got, want), (dtype, fmt, got, want)


def test_rejects_bad_dtype():
    t = F.build("csr", torch.randn(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError):
        NS.csr_linear(torch.randn(1, 3, dtype=torch.float64), *[t[f] for f in F.FIELDS["csr"]],
                      None, 2)
