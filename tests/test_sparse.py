"""Sparse linear: every format on every CPU backend against the float64 truth,
SparseLinear (autograd, state_dict, pickle, sparsify_), the custom op under
opcheck and torch.compile, and bad input."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyopt
from pyopt import prune
from pyopt.sparse import SparseLinear, formats, sparsify_
from pyopt.sparse import _kernels

from conftest import DTYPES, cpu_backends

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _mask(n, k, fmt, density, block=(8, 8), gen=None):
    if fmt == "nm":
        keep = torch.zeros(n, k, dtype=torch.bool)
        order = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
        keep.view(n, k // 4, 4).scatter_(-1, order, True)
        return keep
    if fmt == "bsr":
        bh, bw = block
        kb = torch.rand(n // bh, k // bw, generator=gen) < density
        return kb.repeat_interleave(bh, 0).repeat_interleave(bw, 1) & \
            (torch.rand(n, k, generator=gen) < 0.8)
    return torch.rand(n, k, generator=gen) < density


def _check(fmt, n, k, b, dtype, backend, density=0.4, bias=True, block=(8, 8), keep=None):
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + b)
    w = torch.randn(n, k, generator=g).to(dtype)
    keep = _mask(n, k, fmt, density, block, g) if keep is None else keep
    x = torch.randn(b, k, generator=g).to(dtype)
    bb = torch.randn(n, generator=g).to(dtype) if bias else None
    t = formats.build(fmt, w, keep, block=block)
    formats.validate(fmt, t, (n, k), where="test")
    got = _kernels.linear(fmt, x, t, bb, n, backend)
    wd = formats.to_dense(fmt, t, (n, k))
    exact = x.double() @ wd.double().t() + (bb.double() if bias else 0)
    assert got.dtype == dtype and got.shape == (b, n)
    # one rounding of the fp32 sum, plus fp32 accumulation over k terms
    scale = (x.double().abs() @ wd.double().abs().t()).max().item() + 1
    err = (got.double() - exact).abs().max().item() if got.numel() else 0.0
    assert err <= TOL[dtype] * scale + 1e-6, f"{fmt} {backend} {dtype}: err {err} scale {scale}"
    return got


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("fmt", ["csr", "bitmask", "nm", "bsr"])
@pytest.mark.parametrize("n,k,b", [(8, 8, 1), (16, 64, 3), (24, 136, 4), (64, 520, 5),
                                   (40, 64, 17), (64, 1000, 70), (8, 16, 130)])
def test_formats_match_truth(backend, dtype, fmt, n, k, b):
    _check(fmt, n, k, b, dtype, backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("fmt", ["csr", "bitmask"])
@pytest.mark.parametrize("n,k,b", [(1, 1, 1), (5, 7, 2), (3, 65, 9), (2, 130, 33)])
def test_odd_shapes(backend, fmt, n, k, b):
    _check(fmt, n, k, b, torch.float32, backend, bias=b % 2 == 0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("fmt", ["csr", "bitmask"])
def test_wide_columns(backend, fmt):
    # past 32767 the int16 column holds an unsigned value; past 65536 csr uses int32
    for k in (40000, 70000):
        keep = torch.rand(3, k) < 0.01
        keep[:, -1] = True
        _check(fmt, 3, k, 2, torch.float32, backend, keep=keep)
        _check(fmt, 3, k, 20, torch.float32, backend, keep=keep)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("fmt", ["csr", "bitmask", "bsr"])
@pytest.mark.parametrize("b", [1, 4, 40])
def test_empty_rows_and_layers(backend, fmt, b):
    n, k = 16, 32
    keep = torch.rand(n, k) < 0.5
    keep[3] = False                                             # a fully pruned row
    if fmt == "bsr":
        keep[:8] = False
    _check(fmt, n, k, b, torch.float32, backend, keep=keep)
    out = _check(fmt, n, k, b, torch.float32, backend, keep=torch.zeros(n, k, dtype=torch.bool))
    full = _check(fmt, n, k, b, torch.float32, backend, keep=torch.ones(n, k, dtype=torch.bool),
                  bias=False)
    assert out.shape == (b, n) and full.shape == (b, n)


def test_backends_agree():
    backends = cpu_backends()
    for fmt in ("csr", "bitmask", "nm", "bsr"):
        for b in (1, 3, 20):
            outs = [_check(fmt, 32, 64, b, torch.float32, be) for be in backends]
            for o in outs[1:]:
                torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_isa_variants_agree(isa):
    """Every compiled ISA variant gives the avx512/default result."""
    from conftest import run_python
    if not pyopt._backends.cpu_module().isa_supported(isa):
        pytest.skip(f"this CPU lacks {isa}")
    code = """
        import torch, sys
        from pyopt.sparse import formats, _kernels
        torch.manual_seed(0)
        outs = []
        for fmt in ("csr", "bitmask", "bsr"):
            for b in (1, 3, 21, 70):
                w = torch.randn(32, 96); keep = torch.rand(32, 96) < 0.3
                x = torch.randn(b, 96)
                t = formats.build(fmt, w, keep, block=(8, 8))
                outs.append(_kernels.linear(fmt, x, t, None, 32, "native"))
        torch.save(outs, sys.argv[1] if len(sys.argv) > 1 else "/dev/null")
        print(sum(o.double().sum().item() for o in outs))
    """
    ref = run_python(code, env={"PYOPT_CPU_ISA": ""})
    got = run_python(code, env={"PYOPT_CPU_ISA": isa})
    assert ref.returncode == 0 and got.returncode == 0, ref.stderr + got.stderr
    assert abs(float(ref.stdout) - float(got.stdout)) < 1e-3


# -- SparseLinear ------------------------------------------------------------
def _pruned_linear(k=96, n=48, density=0.3, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    prune.magnitude(lin, 1 - density)
    return lin


FORMATS = ["dense", "csr", "bitmask", "bsr", "auto"]


@pytest.mark.parametrize("fmt", FORMATS + ["nm"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_sparse_linear_matches_pruned_dense(fmt, dtype):
    lin = _pruned_linear(dtype=dtype)
    if fmt == "nm":
        prune.n_m(lin, 2, 4)
    s = SparseLinear.from_dense(lin, format=fmt, block=(16, 16), batch_sizes=(1, 4))
    assert s.format != "auto"
    for shape in [(96,), (1, 96), (7, 96), (2, 3, 96), (0, 96)]:
        x = torch.randn(shape).to(dtype)
        torch.testing.assert_close(s(x), lin(x), rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("fmt", FORMATS[:-1] + ["nm"])
def test_autograd_matches_dense(fmt):
    lin = _pruned_linear()
    if fmt == "nm":
        prune.n_m(lin, 2, 4)
    keep = lin.weight != 0
    s = SparseLinear.from_dense(lin, format=fmt, block=(16, 16))
    x1 = torch.randn(2, 5, 96, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    s(x1).pow(2).sum().backward()
    lin(x2).pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.bias.grad, lin.bias.grad, rtol=1e-5, atol=1e-5)
    # the kept weights' grads are the dense grads at kept positions; pruned
    # positions get none (they are not parameters, or are masked for dense)
    dense_grad = SparseLinear.from_dense(lin, format=fmt, block=(16, 16))
    if fmt == "dense":
        torch.testing.assert_close(s.values.grad, lin.weight.grad * keep)
    else:
        sl = copy.deepcopy(s)
        with torch.no_grad():
            sl.values.copy_(s.values.grad)
        got = sl.to_dense()
        torch.testing.assert_close(got[keep], lin.weight.grad[keep], rtol=1e-5, atol=1e-5)
        assert (got[~keep] == 0).all()
    del dense_grad


def test_sparse_finetune_keeps_zeros():
    lin = _pruned_linear()
    s = SparseLinear.from_dense(lin, format="csr")
    opt = pyopt.optim.AdamW(s.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        s(torch.randn(8, 96)).pow(2).mean().backward()
        opt.step()
    w = s.to_dense()
    assert (w[lin.weight == 0] == 0).all()
    assert not torch.equal(w, lin.weight.detach())


@pytest.mark.parametrize("src", ["csr", "bitmask", "bsr", "dense"])
@pytest.mark.parametrize("dst", ["csr", "dense"])
def test_state_dict_roundtrip(src, dst):
    lin = _pruned_linear()
    s = SparseLinear.from_dense(lin, format=src, block=(16, 16))
    x = torch.randn(4, 96)
    y = s(x)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = SparseLinear(96, 48, format=dst)
    t.load_state_dict(torch.load(buf))
    assert t.format == src
    torch.testing.assert_close(t(x), y)
    torch.testing.assert_close(copy.deepcopy(s)(x), y)
    torch.testing.assert_close(pickle.loads(pickle.dumps(s))(x), y)
    buf.seek(0)
    torch.save(s, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), y)


def test_state_dict_rejects_bad_layouts():
    s = SparseLinear.from_dense(_pruned_linear(), format="csr")
    sd = s.state_dict()
    bad = dict(sd, col_idx=sd["col_idx"].clone())
    bad["col_idx"][0] = 500
    with pytest.raises(ValueError, match="col_idx out of range"):
        SparseLinear(96, 48).load_state_dict(bad)
    bad = dict(sd, row_ptr=sd["row_ptr"].flip(0))
    with pytest.raises(ValueError, match="row_ptr"):
        SparseLinear(96, 48).load_state_dict(bad)
    with pytest.raises(ValueError, match="shape"):
        SparseLinear(96, 40).load_state_dict(sd)
    t = SparseLinear(96, 48, format="bitmask")
    before = {k: v.clone() for k, v in t.state_dict().items() if isinstance(v, torch.Tensor)}
    bad = dict(sd, values=sd["values"][:-1])
    with pytest.raises(ValueError):
        t.load_state_dict(bad)
    assert t.format == "bitmask"
    for k, v in t.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k])


def test_sparsify_model_and_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(),
                          nn.Linear(32, 8))
    masks = prune.magnitude(model, 0.9, scope="global")
    x = torch.randn(5, 64)
    ref = model(x)
    sparsify_(model, filter_fn=lambda m, name: name != "4", format="auto", batch_sizes=(1, 8))
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    assert type(model[4]) is nn.Linear
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert set(masks) == {"0", "2", "4"}
    sd = model.state_dict()
    again = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(),
                          nn.Linear(32, 8))
    sparsify_(again, filter_fn=lambda m, name: name != "4", format="csr")
    again.load_state_dict(sd)
    torch.testing.assert_close(again(x), ref, rtol=1e-5, atol=1e-5)


def test_zero_and_full_layers():
    for density in (0.0, 1.0):
        lin = nn.Linear(32, 16)
        keep = torch.rand(16, 32) < density
        for fmt in ("csr", "bitmask", "bsr", "dense", "auto"):
            s = SparseLinear.from_dense(lin, mask=keep, format=fmt, block=(8, 8),
                                        batch_sizes=(1,))
            x = torch.randn(3, 32)
            torch.testing.assert_close(s(x), F.linear(x, lin.weight * keep, lin.bias))


# -- torch.library -----------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csr", "bitmask", "bsr"])
def test_opcheck(fmt):
    s = SparseLinear.from_dense(_pruned_linear(), format=fmt, block=(16, 16))
    _, ptr, idx = formats.FIELDS[fmt]
    x = torch.randn(3, 96, requires_grad=True)
    torch.library.opcheck(torch.ops.pyopt.sparse_linear.default,
                          (x, s.values, getattr(s, ptr), getattr(s, idx), s.bias, fmt, 48, None))


def test_compile_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    prune.magnitude(model, 0.7)
    sparsify_(model, format="csr")
    x = torch.randn(4, 64)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    xg = x.clone().requires_grad_()
    compiled(xg).sum().backward()
    xe = x.clone().requires_grad_()
    model(xe).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad)


# -- bad input ---------------------------------------------------------------
def test_bad_input():
    lin = _pruned_linear()
    s = SparseLinear.from_dense(lin, format="csr")
    with pytest.raises(ValueError, match="last dimension"):
        s(torch.randn(2, 95))
    with pytest.raises(TypeError, match="dtype"):
        s(torch.randn(2, 96, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        s(torch.randn(2, 96).bfloat16())
    with pytest.raises(ValueError, match="input on meta"):
        s(torch.randn(2, 96, device="meta"))
    with pytest.raises(ValueError, match="mask shape"):
        SparseLinear.from_dense(lin, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="in_features divisible"):
        SparseLinear.from_dense(nn.Linear(10, 4), format="nm")
    with pytest.raises(ValueError, match="block"):
        SparseLinear.from_dense(nn.Linear(10, 4), format="bsr")
    ilin = nn.Linear(4, 4)
    ilin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="weight"):
        SparseLinear.from_dense(ilin)
    with pytest.raises(TypeError):
        SparseLinear.from_dense(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="format"):
        SparseLinear.from_dense(lin, format="coo")
    # non-contiguous input is fine (copied), NaN propagates as in F.linear
    x = torch.randn(96, 4).t()
    torch.testing.assert_close(s(x), lin(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 96)
    x[0, :] = float("nan")
    y = s(x)
    assert y[0].isnan().all() and not y[1].isnan().any()
