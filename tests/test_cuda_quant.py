"""CUDA quantized linear (csrc/cuda/quant.cu): _C_cuda.quant_linear called
directly with raw addresses, as pyopt/_checks.py would pass them, and compared
with pyopt._reference.quant.linear on the same tensors. Layouts are built on
the CPU by pyopt.quant.formats.quantize and moved to the GPU. Skipped with the
reason when no usable GPU is present."""
import math

import pytest
import torch

from conftest import DTYPES, requires_cuda
from pyopt import _backends
from pyopt._reference import quant as quant_ref
from pyopt.quant import formats

pytestmark = [pytest.mark.cuda, requires_cuda]

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACTS = {0: "float", 1: "int8"}
# (K, granularity, group_size): per-channel with K not a multiple of 16 or 64
# (K = 130: a final 4-bit block of 2 elements; K = 96: of 32), groups of 32
# and 128, and a long row.
_LAYOUTS = [(96, "channel", None), (130, "channel", None), (4096, "channel", None),
            (96, "group", 32), (4096, "group", 32), (4096, "group", 128)]
_NS = (1, 33)
# 1, 5: gemv / batch tile 8; 12: two gemv tiles, mma tile 16; 17: tiled / mma
# tile 32; 40, 128: partial and full 64-row tiles.
_BATCHES = (1, 5, 12, 17, 40, 128)


def _cuda_fn():
    return _backends.cuda_module().quant_linear


def qtype_of(bits, qweight):
    return 2 if bits == 4 else (0 if qweight.dtype == torch.int8 else 1)


def quant_linear(x, t, bias, bits, act, *, fn=None, stream=None):
    """(out, (qx, sx, xs)) from one quant_linear call; out and the workspaces
    start as garbage (NaN / 0x55) so unwritten elements show."""
    fn = fn or _cuda_fn()
    if stream is None:
        stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
    b, k = x.shape
    qw, scale, offset = t["qweight"], t["scale"], t["offset"]
    n, g = scale.shape
    dev = x.device
    out = torch.full((b, n), float("nan"), dtype=x.dtype, device=dev)
    qx = torch.full((b, k), 0x55, dtype=torch.int8, device=dev)
    sx = torch.full((b,), float("nan"), dtype=torch.float32, device=dev)
    xs = torch.full((b, g), 0x55555555, dtype=torch.int32, device=dev)
    fn(out.data_ptr(), x.data_ptr(), qw.data_ptr(), qtype_of(bits, qw), scale.data_ptr(),
       offset.data_ptr() if offset is not None else 0,
       bias.data_ptr() if bias is not None else 0, b, n, k, g, act, _CODES[x.dtype],
       qx.data_ptr(), sx.data_ptr(), xs.data_ptr(), stream)
    return out, (qx, sx, xs)


def make_problem(n, k, gran, gsize, bits, scheme, b, dt, with_bias, device, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.5
    t = formats.quantize(w, bits=bits, scheme=scheme, granularity=gran, group_size=gsize)
    t = {name: (v.to(device) if v is not None else None) for name, v in t.items()}
    x = torch.randn(b, k, generator=g).to(device, dt)
    bias = torch.randn(n, generator=g).to(device, dt) if with_bias else None
    return t, x, bias


_OUT_RTOL = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def assert_close(got, x, t, bias, bits, act):
    """got against the reference. act 0: both sides accumulate in float32 in
    different orders and round once: one output ulp plus float32 reordering
    noise scaled by sum |w| |x| (+ |bias|). act 1: the group sums are exact
    integers on both sides; the reference folds them in float64, the kernel in
    float32, so allow (G + 4) float32 roundings of
    sx * sum_g (|scale| sum |qx| |q| + |offset| |xs|), plus one output ulp."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # a float32 reference, whatever ran before
    try:
        want = quant_ref.linear(x, t["qweight"], t["scale"], t["offset"], bias, bits, _ACTS[act])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.numel() == 0:
        return
    b, k = x.shape
    n, g = t["scale"].shape
    q = formats.unpack_int4(t["qweight"], k) if bits == 4 else t["qweight"]
    if act == 0:
        w = formats.dequantize(t, bits, k).double().abs()
        mag = x.double().abs() @ w.T
        slack = 2e-5 * mag + 1e-6
    else:
        qx, sx = formats.quantize_per_token(x)
        gs = k // g
        aq = qx.double().abs().reshape(b, g, gs)
        dots = torch.einsum("bgk,ngk->bng", aq, q.double().abs().reshape(n, g, gs))
        mag = (dots * t["scale"].double().abs()).sum(-1)
        if t["offset"] is not None:
            mag = mag + qx.double().reshape(b, g, gs).sum(-1).abs() @ t["offset"].double().abs().T
        mag = mag * sx.double().abs()[:, None]
        slack = (g + 4) * 2.0 ** -23 * mag + 1e-30
    if bias is not None:
        slack = slack + 2.0 ** -23 * bias.double().abs()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), "NaN/inf pattern differs from the reference"
    bound = _OUT_RTOL[x.dtype] * want.double().abs() + slack
    err = (got.double() - want.double()).abs()
    err = torch.where(finite, err, torch.zeros_like(err))
    ok = (err <= bound) | ~finite    # NaN rows: the pattern was checked above
    assert bool(ok.all()), (
        f"max err {err.max().item():.3g} at {divmod(int(err.argmax()), n)}, bound there "
        f"{bound.flatten()[err.argmax()].item():.3g}, {int((~ok).sum())} of {ok.numel()} off")


def assert_workspaces(ws, x, g):
    """The act=1 workspaces equal formats.quantize_per_token bit for bit."""
    qx, sx, xs = ws
    want_qx, want_sx = formats.quantize_per_token(x)
    assert torch.equal(qx, want_qx)
    assert torch.equal(sx.isnan(), want_sx.isnan())
    assert torch.equal(torch.nan_to_num(sx), torch.nan_to_num(want_sx))
    b, k = x.shape
    assert torch.equal(xs, want_qx.int().reshape(b, g, k // g).sum(-1, dtype=torch.int32))


def check_case(n, k, gran, gsize, bits, scheme, act, dt, *, fn=None, device="cuda",
               batches=_BATCHES, biases=(False, True), seed=0, sync=None):
    for i, b in enumerate(batches):
        for with_bias in biases:
            t, x, bias = make_problem(n, k, gran, gsize, bits, scheme, b, dt, with_bias,
                                      device, seed=seed + 100 * i + with_bias)
            got, ws = quant_linear(x, t, bias, bits, act, fn=fn)
            if sync:
                sync()
            assert not got.isnan().any(), f"B={b}: some outputs were not written"
            assert_close(got, x, t, bias, bits, act)
            if act == 1:
                assert_workspaces(ws, x, t["scale"].shape[1])


def _layout_id(v):
    k, gran, gs = v
    return f"K{k}-{gran}" + (f"{gs}" if gs else "")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("act", [0, 1], ids=["weight_only", "int8_act"])
@pytest.mark.parametrize("layout", _LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("scheme", formats.SCHEMES)
@pytest.mark.parametrize("bits", formats.BITS, ids=lambda b: f"int{b}")
def test_quant_linear_cuda_matches_reference(bits, scheme, layout, act, dtype):
    k, gran, gsize = layout
    for n in _NS:
        check_case(n, k, gran, gsize, bits, scheme, act, DTYPES[dtype],
                   sync=torch.cuda.synchronize)


@pytest.mark.parametrize("act", [0, 1], ids=["weight_only", "int8_act"])
@pytest.mark.parametrize("bits", formats.BITS, ids=lambda b: f"int{b}")
def test_quant_linear_cuda_many_tiles(bits, act):
    """Several tiles along N and B, with partial ones at both ends."""
    check_case(130, 256, "group", 64, bits, "asymmetric", act, torch.bfloat16,
               batches=(3, 16, 200), biases=(True,), sync=torch.cuda.synchronize)


@pytest.mark.parametrize("act", [0, 1], ids=["weight_only", "int8_act"])
@pytest.mark.parametrize("bits", formats.BITS, ids=lambda b: f"int{b}")
def test_quant_linear_cuda_misaligned_addresses(bits, act):
    """x, qweight and the qx workspace at addresses that are not 16-byte
    aligned: the byte-wise load paths, with K a multiple of the vector width."""
    n, k, b = 33, 256, 20
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, k, generator=g)
    t = formats.quantize(w, bits=bits, scheme="symmetric", granularity="group", group_size=32)
    qw = t["qweight"]
    buf = torch.empty(qw.numel() + 1, dtype=qw.dtype)
    buf[1:] = qw.flatten()
    t = {"qweight": buf.cuda()[1:].view(qw.shape), "scale": t["scale"].cuda(),
         "offset": t["offset"].cuda() if t["offset"] is not None else None}
    assert t["qweight"].data_ptr() % 16 != 0
    for bb in (3, b):
        xbuf = torch.randn(bb * k + 1, generator=g).cuda()
        x = xbuf[1:].view(bb, k)
        assert x.data_ptr() % 16 != 0
        got, ws = quant_linear(x, t, None, bits, act)
        torch.cuda.synchronize()
        assert_close(got, x, t, None, bits, act)
        # the workspaces themselves misaligned
        if act == 1:
            out = torch.full((bb, n), float("nan"), device="cuda")
            qbuf = torch.empty(bb * k + 1, dtype=torch.int8, device="cuda")
            sx = torch.empty(bb, device="cuda")
            xs = torch.empty(bb, k // 32, dtype=torch.int32, device="cuda")
            _cuda_fn()(out.data_ptr(), x.data_ptr(), t["qweight"].data_ptr(), qtype_of(bits, qw),
                       t["scale"].data_ptr(), t["offset"].data_ptr() if t["offset"] is not None
                       else 0, 0, bb, n, k, k // 32, 1, 0, qbuf.data_ptr() + 1, sx.data_ptr(),
                       xs.data_ptr(), 0)
            torch.cuda.synchronize()
            assert torch.equal(out, got)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_quant_linear_cuda_nonfinite_and_zero_rows(dtype):
    """act=1: a row with inf or NaN gets sx = NaN and an all-NaN output row; an
    all-zero row gets sx = 0 and exactly the bias."""
    dt = DTYPES[dtype]
    n, k = 33, 128
    g = torch.Generator().manual_seed(5)
    t = formats.quantize(torch.randn(n, k, generator=g), bits=4, scheme="asymmetric",
                         granularity="group", group_size=32)
    t = {name: v.cuda() for name, v in t.items()}
    x = torch.randn(6, k, generator=g).to("cuda", dt)
    x[1, 7] = float("inf")
    x[3, 100] = float("nan")
    x[4] = 0
    bias = torch.randn(n, generator=g).to("cuda", dt)
    got, ws = quant_linear(x, t, bias, 4, 1)
    torch.cuda.synchronize()
    assert got[[1, 3]].isnan().all()
    assert torch.equal(got[4], bias)
    assert ws[1][[1, 3]].isnan().all() and ws[1][4].item() == 0.0
    assert_close(got, x, t, bias, 4, 1)
    assert_workspaces(ws, x, t["scale"].shape[1])


@pytest.mark.parametrize("act", [0, 1], ids=["weight_only", "int8_act"])
def test_quant_linear_cuda_side_stream(act):
    n, k = 64, 512
    g = torch.Generator().manual_seed(7)
    t = formats.quantize(torch.randn(n, k, generator=g), bits=8, scheme="asymmetric",
                         granularity="group", group_size=128)
    t = {name: v.cuda() for name, v in t.items()}
    x = torch.randn(19, k, generator=g).cuda()
    bias = torch.randn(n, generator=g).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got, _ = quant_linear(x, t, bias, 8, act, stream=s.cuda_stream)
    s.synchronize()
    assert_close(got, x, t, bias, 8, act)


def test_quant_linear_cuda_empty_and_zero_k():
    fn = _cuda_fn()
    # nothing to compute: no launch, no error, whatever the addresses
    fn(0, 0, 0, 0, 0, 0, 0, 0, 5, 64, 1, 1, 0, 0, 0, 0, 0)
    fn(0, 0, 0, 2, 0, 0, 0, 3, 0, 64, 2, 0, 1, 0, 0, 0, 0)
    t = formats.quantize(torch.randn(4, 64), bits=8)
    t = {"qweight": t["qweight"].cuda(), "scale": t["scale"].cuda(), "offset": None}
    x = torch.randn(0, 64, device="cuda")
    got, _ = quant_linear(x, t, None, 8, 1)
    assert got.shape == (0, 4)
    # K == 0: out is the bias (or 0)
    for act in (0, 1):
        t0 = {"qweight": torch.zeros(3, 0, dtype=torch.int8, device="cuda"),
              "scale": torch.ones(3, 1, device="cuda"), "offset": None}
        out = torch.full((2, 3), float("nan"), device="cuda")
        bias = torch.randn(3, device="cuda")
        ws = (torch.empty(2, 0, dtype=torch.int8, device="cuda"),
              torch.empty(2, device="cuda"), torch.empty(2, 1, dtype=torch.int32, device="cuda"))
        x0 = torch.empty(2, 0, device="cuda")
        fn(out.data_ptr(), x0.data_ptr() or 1, t0["qweight"].data_ptr() or 1, 0,
           t0["scale"].data_ptr(), 0, bias.data_ptr(), 2, 3, 0, 1, act, 0,
           ws[0].data_ptr() or 1, ws[1].data_ptr(), ws[2].data_ptr(), 0)
        torch.cuda.synchronize()
        assert torch.equal(out, bias.expand(2, 3))


def test_quant_linear_cuda_rejects_bad_arguments():
    fn = _cuda_fn()
    good = dict(out=1, x=1, qweight=1, qtype=0, scale=1, offset=0, bias=0, B=1, N=1, K=64, G=1,
                act=0, dtype=0, ws_qx=1, ws_sx=1, ws_xs=1, stream=0)
    cases = [
        (dict(qtype=3), "qtype"),
        (dict(act=2), "act"),
        (dict(dtype=3), "dtype"),
        (dict(K=-1), ">= 0"),
        (dict(qtype=2, K=63), "even K"),
        (dict(G=3), "divide K"),
        (dict(G=0), "G must be"),
        (dict(G=4), "multiple of 32"),        # group size 16
        (dict(act=1, ws_xs=0), "workspaces"),
        (dict(act=1, ws_qx=0), "workspaces"),
        (dict(scale=0), "device addresses"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(**{**good, **change})


def test_quant_linear_cuda_many_groups_overflow_guard():
    """A per-channel row long enough that one int32 group sum could overflow
    without the periodic fold: q = 255 and qx = 127 everywhere, so the one
    group's dot is 127 * 255 * K > 2^31 (a final partial stage too)."""
    n, k, b = 2, 3 * 32768 + 96, 3
    qw = torch.full((n, k), 255, dtype=torch.uint8, device="cuda")
    t = {"qweight": qw, "scale": torch.full((n, 1), 1e-3, device="cuda"),
         "offset": torch.zeros(n, 1, device="cuda")}
    x = torch.ones(b, k, device="cuda")
    got, _ = quant_linear(x, t, None, 8, 1)
    torch.cuda.synchronize()
    assert_close(got, x, t, None, 8, 1)
    assert math.isclose(got[0, 0].item(), 255e-3 * k, rel_tol=1e-5)
