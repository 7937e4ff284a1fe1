"""Quantized linear: the quantization math (torch.ao integers, pack/unpack),
every kernel on every CPU backend against the float64 truth under the
accuracy rule, QuantLinear (state_dict, pickle, dtype moves, N-D input),
quantize_, AWQ calibration, the custom op under opcheck and torch.compile,
and bad input."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyopt
from pyopt.quant import QuantConfig, QuantLinear, formats, quantize_
from pyopt.quant import _kernels
from pyopt._reference import quant as ref

from conftest import DTYPES, cpu_backends, run_python

# (bits, scheme, granularity, group_size)
SCHEMES = {
    "w8-sym-channel": (8, "symmetric", "channel", None),
    "w8-asym-group32": (8, "asymmetric", "group", 32),
    "w8-sym-tensor": (8, "symmetric", "tensor", None),
    "w4-sym-group128": (4, "symmetric", "group", 128),
    "w4-asym-group32": (4, "asymmetric", "group", 32),
    "w4-asym-channel": (4, "asymmetric", "channel", None),
    "w4-sym-group64": (4, "symmetric", "group", 64),
    "w4-asym-group256": (4, "asymmetric", "group", 256),
}
# (N, K, B): odd N, K off the vector width, a partial 4-bit block (96, 160),
# batch on both sides of the gemv/panel switch and of the register tiles.
# K % 128 == 0 with B <= 4 is the 4-bit chunk gemv (q4dot512), for each of its
# scale schemes; 8192 at B=1 and 2048 at B=4 split K into several column passes.
SHAPES = [(1, 64, 1), (7, 96, 3), (33, 160, 5), (5, 130, 2), (40, 256, 17), (70, 640, 33),
          (19, 256, 1), (21, 384, 2), (18, 512, 4), (9, 1024, 3), (3, 8192, 1), (5, 2048, 4)]
# every shape the scheme can hold (groups divide K)
CASES = [pytest.param(n, k, b, sch, id=f"{n}x{k}-b{b}-{sch}") for n, k, b in SHAPES
         for sch, (_, _, gran, gs) in SCHEMES.items() if gran != "group" or k % gs == 0]


def _layout(n, k, scheme, gen):
    bits, sch, gran, gs = SCHEMES[scheme]
    w = torch.randn(n, k, generator=gen)
    return bits, formats.quantize(w, bits, sch, gran, gs)


def _truth(x, t, bits, bias, act):
    """float64 result on the same quantized weights (and, for act=int8, the
    same quantized activations)."""
    k = x.shape[1]
    w = formats.dequantize(t, bits, k).double()
    if act == "int8":
        qx, sx = formats.quantize_per_token(x)
        xd = qx.double() * sx.double()[:, None]
    else:
        xd = x.double()
    out = xd @ w.t()
    return out + bias.double() if bias is not None else out


# -- quantization math ---------------------------------------------------------
def test_symmetric_int8_matches_torch_ao_integers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.rand(64, 1, generator=g) * 3
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    obs(w)
    scale, zero = obs.calculate_qparams()
    want = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8).int_repr()
    t = formats.quantize(w, 8, "symmetric", "channel")
    assert torch.equal(t["scale"][:, 0], scale.float())
    assert torch.equal(t["qweight"], want)
    assert t["offset"] is None


@pytest.mark.parametrize("k", [2, 34, 64, 96, 128, 130, 4098])
def test_pack_unpack_int4_are_inverses(k):
    q = torch.randint(0, 16, (5, k), dtype=torch.uint8)
    p = formats.pack_int4(q)
    assert p.shape == (5, k // 2) and p.dtype == torch.uint8
    assert torch.equal(formats.unpack_int4(p, k), q)


def test_pack_layout_is_the_documented_one():
    q = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    p = formats.pack_int4(q)
    for i in range(32):   # byte i: element i low, element i + 32 high
        assert int(p[0, i]) == int(q[0, i]) | (int(q[0, i + 32]) << 4)
    q = torch.arange(96, dtype=torch.uint8).remainder(16).reshape(1, 96)
    p = formats.pack_int4(q)
    for i in range(16):   # partial block of 32: element 64 + i and 80 + i
        assert int(p[0, 32 + i]) == int(q[0, 64 + i]) | (int(q[0, 80 + i]) << 4)


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEMES)
def test_dequantize_is_within_half_a_step(scheme):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    bits, sch, gran, gs = SCHEMES[scheme]
    t = formats.quantize(w, bits, sch, gran, gs)
    d = formats.dequantize(t, bits, 256)
    step = t["scale"].repeat_interleave(256 // t["scale"].shape[1], dim=1)
    # symmetric clips at qmax: the largest positive weight may be off by up to one step
    limit = step * (1.0 if sch == "symmetric" else 0.5) + 1e-6
    assert bool(((d - w).abs() <= limit).all())
    if bits == 4:
        q = formats.unpack_int4(t["qweight"], 256)
        assert int(q.max()) <= 15


def test_per_token_quantization():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, float("nan"), 1.0, 1.0]])
    qx, sx = formats.quantize_per_token(x)
    assert qx.dtype == torch.int8
    assert qx[0].tolist() == [64, -127, 32, 0] and abs(sx[0].item() - 2 / 127) < 1e-9
    assert qx[1].tolist() == [0, 0, 0, 0] and sx[1].item() == 0
    assert torch.isnan(sx[2]) and qx[2].tolist() == [0, 0, 0, 0]


# -- kernels -------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("act", ["float", "int8"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n,k,b,scheme", CASES)
def test_kernel_meets_the_accuracy_rule(n, k, b, scheme, dtype, act, backend):
    """Error against float64 on the same quantized weights within 2x that of
    torch's dequantize-then-F.linear at the same dtype."""
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + b)
    bits, t = _layout(n, k, scheme, g)
    x = torch.randn(b, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    got = _kernels.linear(x, t, bias, bits, act, backend)
    assert got.dtype == dtype and got.shape == (b, n)
    truth = _truth(x, t, bits, bias, act)
    w = formats.dequantize(t, bits, k)
    if act == "int8":
        qx, sx = formats.quantize_per_token(x)
        xin = (qx.float() * sx[:, None]).to(dtype)
    else:
        xin = x
    torch_out = F.linear(xin, w.to(dtype), bias)
    torch_err = (torch_out.double() - truth).abs().max().item()
    err = (got.double() - truth).abs().max().item()
    # floor: one ulp of the dtype at the size of the summed terms (the error
    # bound of any float dot product), so the 2x rule governs only above it
    floor = torch.finfo(dtype).eps * ((xin.double().abs() @ w.double().abs().t()).max().item() + 1)
    assert err <= 2 * torch_err + floor, f"err {err} torch {torch_err}"


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("k,groups", [(384, 4), (384, 2), (384, 3), (640, 2), (640, 5), (1920, 6)])
def test_native_4bit_any_multiple_of_32_group(k, groups, b):
    """The native op takes any group size that is a multiple of 32 dividing K
    (QuantLinear only makes 32-256): groups of 96, 160, 192, 320 must not take
    the chunk gemv, which needs groups of 32, 64 or a multiple of 128."""
    g = torch.Generator().manual_seed(k + groups + b)
    n = 19
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    t = {"qweight": formats.pack_int4(q), "scale": torch.rand(n, groups, generator=g) + 0.1,
         "offset": torch.randn(n, groups, generator=g)}
    x = torch.randn(b, k, generator=g)
    got = _kernels.linear(x, t, None, 4, "float", "native")
    truth = _truth(x, t, 4, None, "float")
    w = formats.dequantize(t, 4, k).double()
    floor = torch.finfo(torch.float32).eps * (x.double().abs() @ w.abs().t()).max().item()
    assert (got.double() - truth).abs().max().item() <= 8 * floor


@pytest.mark.parametrize("act", ["float", "int8"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEMES)
def test_backends_agree(scheme, act):
    g = torch.Generator().manual_seed(7)
    bits, t = _layout(24, 512, scheme, g)
    x = torch.randn(9, 512, generator=g)
    outs = [_kernels.linear(x, t, None, bits, act, be) for be in cpu_backends()]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_batch_and_nan_rows(backend):
    t = formats.quantize(torch.randn(8, 64), 8, "symmetric", "channel")
    assert _kernels.linear(torch.empty(0, 64), t, None, 8, "int8", backend).shape == (0, 8)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    for act in ("float", "int8"):
        y = _kernels.linear(x, t, None, 8, act, backend)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_isa_variants_agree(isa):
    if not pyopt._backends.cpu_module().isa_supported(isa):
        pytest.skip(f"this CPU lacks {isa}")
    code = """
        import torch
        from pyopt.quant import formats, _kernels
        torch.manual_seed(0)
        total = 0.0
        for bits, sch, gran, gs in ((8, "symmetric", "channel", None), (8, "asymmetric", "group", 32),
                                    (4, "symmetric", "group", 128), (4, "asymmetric", "channel", None)):
            t = formats.quantize(torch.randn(37, 384), bits, sch, gran, gs)
            for b in (1, 3, 21):
                for act in ("float", "int8"):
                    total += _kernels.linear(torch.randn(b, 384), t, None, bits, act,
                                             "native").double().sum().item()
        print(total)
    """
    ref_run = run_python(code, env={"PYOPT_CPU_ISA": ""})
    got = run_python(code, env={"PYOPT_CPU_ISA": isa})
    assert ref_run.returncode == 0 and got.returncode == 0, ref_run.stderr + got.stderr
    assert abs(float(ref_run.stdout) - float(got.stdout)) < 1e-2


# -- QuantLinear ---------------------------------------------------------------
CONFIG_IDS = ["int8", "int8_weight_only", "int4_weight_only"]


def _model(k=256, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(k, 128, bias=bias), nn.GELU(), nn.Linear(128, 64, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config", CONFIG_IDS)
def test_quantize_model_close_to_float(config, bias):
    m = _model(bias=bias)
    x = torch.randn(4, 7, 256)
    want = m(x)
    q = quantize_(copy.deepcopy(m), config, group_size=32 if "int4" in config else None)
    assert all(isinstance(q[i], QuantLinear) for i in (0, 2))
    got = q(x)
    assert got.shape == want.shape
    rel = (got - want).norm() / want.norm()
    assert rel < (0.15 if "int4" in config else 0.02)
    # the layer computes its dequantized weight (and quantized activations for int8)
    xin = x
    if config == "int8":
        qx, sx = formats.quantize_per_token(x.reshape(-1, 256))
        xin = (qx.float() * sx[:, None]).reshape(x.shape)
    torch.testing.assert_close(q[0](x), F.linear(xin, q[0].dequantize(), q[0].bias),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", CONFIG_IDS)
def test_serialization_round_trips(config):
    q = quantize_(_model(), config)
    x = torch.randn(5, 256)
    y = q(x)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    q2 = quantize_(_model(), config)
    q2.load_state_dict(torch.load(buf))
    assert torch.equal(q2(x), y)
    assert torch.equal(copy.deepcopy(q)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(q))(x), y)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)


def test_dtype_moves_keep_float32_scales():
    q = quantize_(_model(), "int4_weight_only")
    x = torch.randn(3, 256)
    y16 = q(x.bfloat16())
    q.bfloat16()
    assert q[0].scale.dtype == torch.float32 and q[0].offset.dtype == torch.float32
    assert q[0].bias.dtype == torch.bfloat16
    assert torch.equal(q(x.bfloat16()), y16)
    for dt in (torch.float16, torch.float32):
        assert q(x.to(dt)).dtype == dt


def test_extra_repr_and_filter():
    q = quantize_(_model(), "int4_weight_only", filter_fn=lambda m, name: name == "0")
    assert isinstance(q[0], QuantLinear) and type(q[2]) is nn.Linear
    r = repr(q[0])
    assert "bits=4" in r and "group_size=128" in r and "scheme=symmetric" in r
    assert "bits=8" in repr(QuantLinear.from_float(nn.Linear(64, 8), "int8"))


def test_input_grad_flows():
    q = quantize_(_model(), "int8_weight_only")
    x = torch.randn(3, 256, requires_grad=True)
    q(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    w0, w2 = q[0].dequantize(), q[2].dequantize()
    F.linear(F.gelu(F.linear(x2, w0, q[0].bias)), w2, q[2].bias).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_awq_lowers_error_on_skewed_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(512, 64)
    chan = torch.ones(512)
    chan[::17] = 50.0                    # a few high-energy input channels
    calib = [torch.randn(32, 512) * chan for _ in range(4)]
    test = torch.randn(64, 512) * chan
    want = lin(test)
    rtn = quantize_(copy.deepcopy(lin), "int4_weight_only")
    awq = quantize_(copy.deepcopy(lin), "int4_weight_only", calib=calib)
    assert awq.input_scale is not None
    e_rtn = (rtn(test) - want).pow(2).mean()
    e_awq = (awq(test) - want).pow(2).mean()
    assert e_awq < 0.97 * e_rtn


# -- torch.library --------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIG_IDS)
def test_opcheck(config):
    q = QuantLinear.from_float(nn.Linear(64, 16), config, group_size=32 if "int4" in config else None)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.pyopt.quant_linear.default,
                          (x, q.qweight, q.scale, q.offset, q.bias, q.config.bits, q.config.act))


def test_compile_matches_eager():
    q = quantize_(_model(), "int4_weight_only", group_size=64)
    x = torch.randn(4, 256)
    eager = q(x)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)


# -- bad input ------------------------------------------------------------------
def test_bad_config():
    lin = nn.Linear(96, 8)
    with pytest.raises(ValueError, match="does not divide"):
        QuantLinear.from_float(lin, "int4_weight_only", group_size=64)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantLinear.from_float(lin, QuantConfig(bits=3))
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantLinear.from_float(lin, "int4_weight_only", group_size=48)
    with pytest.raises(ValueError, match="unknown quantization config"):
        quantize_(nn.Sequential(lin), "int3")
    with pytest.raises(ValueError, match="act must be"):
        QuantLinear.from_float(lin, QuantConfig(act="fp8"))
    with pytest.raises(ValueError, match="even in_features"):
        QuantLinear.from_float(nn.Linear(95, 8), "int4_weight_only", granularity="channel")


def test_bad_layers():
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_float(lin, "int8")
    with pytest.raises(TypeError, match="already a QuantLinear"):
        QuantLinear.from_float(q, "int8")
    with pytest.raises(TypeError, match="already quantized"):
        quantize_(nn.Sequential(q), "int8")
    ilin = nn.Linear(64, 8)
    ilin.weight = nn.Parameter(torch.zeros(8, 64, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="cannot quantize"):
        QuantLinear.from_float(ilin, "int8")
    with pytest.raises(TypeError, match="already quantized"):
        formats.quantize(torch.quantize_per_tensor(torch.randn(4, 64), 0.1, 0, torch.qint8))
    nan = nn.Linear(64, 8)
    with torch.no_grad():
        nan.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        QuantLinear.from_float(nan, "int8")


def test_bad_inputs():
    q = QuantLinear.from_float(nn.Linear(64, 8), "int4_weight_only", group_size=32)
    with pytest.raises(ValueError, match="last dimension"):
        q(torch.randn(2, 63))
    with pytest.raises(TypeError, match="dtype"):
        q(torch.randint(0, 4, (2, 64)))
    with pytest.raises(TypeError, match="dtype"):
        q(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="input on meta"):
        q(torch.randn(2, 64, device="meta"))
    with pytest.raises(TypeError, match="input"):
        q(torch.randn(2, 64).to_sparse())


def test_state_dict_from_another_config_is_refused():
    a = quantize_(_model(), "int8")
    b = quantize_(_model(), "int4_weight_only")
    before = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="does not match"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not from a QuantLinear"):
        b.load_state_dict(_model().state_dict())
    after = b.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    sd = b.state_dict()
    sd["0.scale"] = sd["0.scale"][:, :1].contiguous()
    with pytest.raises(ValueError, match="scale must be float32"):
        quantize_(_model(), "int4_weight_only").load_state_dict(sd)


def test_native_rejects_bad_codes():
    mod = pyopt._backends.cpu_module()
    with pytest.raises(ValueError, match="qtype"):
        mod.quant_linear(0, 0, 0, 7, 0, 0, 0, 1, 1, 64, 1, 0, 0, 1)
    with pytest.raises(ValueError, match="groups"):
        mod.quant_linear(0, 0, 0, 0, 0, 0, 0, 1, 1, 64, 3, 0, 0, 1)
