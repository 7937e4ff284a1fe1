"""Quant suite: quantized Linear layers (out x in 4096x4096 and 11008x4096) at
batch 1, 16 and 128, fp32 activations, and bf16 activations for the
weight-only layers.

Every implementation computes ``x @ W.T`` for the same float weight W (no
bias), each with its own quantization of W, and all of a case's
implementations are timed round-robin in one run (with the in-place RMW and a
copy as same-run bandwidth references). The baseline is fp32 ``F.linear`` on
the float weight, also in the bf16 cases (on the bf16 input's exact fp32
value), so ``speedup`` always compares with what an fp32 model does today.

``error`` = max |y - y_fp32| / max |y_fp32|, against the baseline's output.
Correctness is checked before timing with a bound per kind of quantization
(bf16 rounding 0.02, int8 0.05, int4 0.3); above it the row is ``failed``
and not timed. ``bytes_per_weight`` is the weight storage with its scales
over out*in; ``gbps`` counts that storage plus x and the output once, the
traffic that sets the pace at batch 1 (``of_copy``: over the copy bandwidth
timed in alternation with the case).

Int4 layouts differ in their rounding: pyopt's ``int4_weight_only`` is
symmetric (absmax / 7); torch's ``_weight_int4pack_mm_for_cpu`` row uses the
min-max (asymmetric) quantization that torch's tests and torchao's tinygemm
path use. Both use groups of 128 along ``in``.
"""
from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .timing import interleaved

BASELINE = "torch F.linear fp32"
GROUP = 128
AO_ENGINES = ("x86", "fbgemm", "onednn")
NUMBA_MAX_BATCH = 16          # the numba rows stop here (batch 128 takes seconds a call)
# relative error bound of the correctness check, by kind of quantization
BOUNDS = {"fp32": 1e-4, "bf16": 0.02, "int8": 0.05, "int4": 0.3}

_PYOPT = [  # (row label, config, act override, kind)
    ("int8 W8A8", "int8", None, "int8"),
    ("int8_weight_only W8", "int8_weight_only", None, "int8"),
    ("int4_weight_only W4", "int4_weight_only", None, "int4"),
    ("int4 act=int8 W4A8", "int4_weight_only", "int8", "int4"),
]


@dataclass
class Case:
    name: str
    n: int                # out_features
    k: int                # in_features
    batch: int
    act: torch.dtype = torch.float32    # activation dtype of the non-baseline rows

    @property
    def layer(self):
        return (self.n, self.k)


def _tiny() -> bool:
    return bool(os.environ.get("PYOPT_BENCH_TINY"))


def _dt(dtype) -> str:
    return str(dtype)[6:].replace("float32", "fp32").replace("bfloat16", "bf16")


def cases(device: str, quick: bool) -> list[Case]:
    if _tiny():
        return [Case("tiny 64x256 fp32 B=1", 64, 256, 1),
                Case("tiny 64x256 bf16 B=1", 64, 256, 1, torch.bfloat16),
                Case("tiny 64x256 fp32 B=8", 64, 256, 8)]
    if quick:
        return [Case("4096x4096 fp32 B=1", 4096, 4096, 1),
                Case("4096x4096 bf16 B=1", 4096, 4096, 1, torch.bfloat16),
                Case("4096x4096 fp32 B=16", 4096, 4096, 16)]
    return [Case(f"{n}x{k} {_dt(act)} B={b}", n, k, b, act)
            for n, k in ((4096, 4096), (11008, 4096))
            for act in (torch.float32, torch.bfloat16) for b in (1, 16, 128)]


class _Layer:
    """One float weight (and its nn.Linear) and everything quantized from it,
    each built on first use and kept for the layer's other cases."""

    def __init__(self, n, k, device):
        gen = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(n, k, generator=gen) * k ** -0.5)
        self.lin = self.lin.to(device)
        self.w = self.lin.weight.detach()
        self.n, self.k, self.device = n, k, device
        self._built = {}

    def get(self, key, build):
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ------------------------------------------------------------------ factories
# factory(layer, x) -> (fn, weight storage bytes); fn() returns y [B, N].

def _baseline(layer, x):
    xf = x.float()
    return (lambda: F.linear(xf, layer.w)), _nbytes(layer.w)


def _bf16_linear(layer, x):
    wb = layer.get("bf16", lambda: layer.w.bfloat16())
    return (lambda: F.linear(x, wb)), _nbytes(wb)


def _ao_dynamic(engine):
    def make(layer, x):
        def build():
            torch.backends.quantized.engine = engine
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # torch.ao deprecation notices
                return torch.ao.quantization.quantize_dynamic(
                    nn.Sequential(layer.lin), {nn.Linear}, dtype=torch.qint8)
        m = layer.get(("ao", engine), build)

        def call():
            torch.backends.quantized.engine = engine
            return m(x)
        # int8 weight with a per-tensor scale and zero point (the default qconfig)
        return call, layer.n * layer.k + 8
    return make


def _int8pack(layer, x):
    def build():
        w = layer.w.float()
        s = w.abs().amax(1).clamp(min=1e-12) / 127
        return (w / s[:, None]).round().clamp(-127, 127).to(torch.int8), s
    q, s = layer.get("int8pack", build)
    s = layer.get(("int8pack scale", x.dtype), lambda: s.to(x.dtype))
    return (lambda: torch._weight_int8pack_mm(x, q, s)), _nbytes(q, s)


def _int4pack(layer, x):
    """torch's CPU tinygemm int4: q in [0, 15] (int32 [N, K]) packed by
    _convert_weight_to_int4pack_for_cpu(q, inner_k_tiles=1) to uint8 [N, K/2];
    qScaleAndZeros [K/G, N, 2] in x's dtype with w = (q - 8) * scale + zero."""
    def build():
        n, k = layer.n, layer.k
        wg = layer.w.float().reshape(n, k // GROUP, GROUP)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).contiguous(), 1)
        sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous()
        return packed, sz
    packed, sz = layer.get("int4pack", build)
    sz = layer.get(("int4pack sz", x.dtype), lambda: sz.to(x.dtype))
    return (lambda: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)), _nbytes(packed, sz)


def _pyopt(cfg, act, backend):
    def make(layer, x):
        from ..quant import QuantLinear

        def build():
            ql = QuantLinear.from_float(layer.lin, cfg, **({"act": act} if act else {}))
            ql.backend = backend
            return ql
        ql = layer.get(("pyopt", cfg, act, backend), build)
        if backend == "numba":
            import numba
            numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        return (lambda: ql(x)), _nbytes(*ql.layout().values())
    return make


def _torchao(kind):
    def make(layer, x):
        import torchao.quantization as tq

        def config():
            if kind == "int8 W8A8":
                return tq.Int8DynamicActivationInt8WeightConfig()
            if kind == "int8_weight_only W8":
                return tq.Int8WeightOnlyConfig()
            try:                                    # torchao >= 0.14: CPU int4 is "opaque"
                return tq.Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="opaque")
            except TypeError:
                from torchao.dtypes import Int4CPULayout
                return tq.Int4WeightOnlyConfig(group_size=GROUP, layout=Int4CPULayout())

        def build():
            m = nn.Sequential(nn.Linear(layer.k, layer.n, bias=False)).to(layer.device, x.dtype)
            with torch.no_grad():
                m[0].weight.copy_(layer.w)
            tq.quantize_(m, config())
            return m
        m = layer.get(("torchao", kind, x.dtype), build)
        bits = 4 if "int4" in kind else 8
        return (lambda: m(x)), layer.n * layer.k * bits // 8      # nominal: scales not counted
    return make


def _bnb(kind):
    def make(layer, x):
        import bitsandbytes as bnb

        def build():
            w = layer.w.to(x.dtype).clone()
            if kind == "int8":
                m = bnb.nn.Linear8bitLt(layer.k, layer.n, bias=False, has_fp16_weights=False)
                m.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            else:
                m = bnb.nn.Linear4bit(layer.k, layer.n, bias=False, compute_dtype=x.dtype,
                                      quant_type="nf4")
                m.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            m = m.to(layer.device)
            if m.weight.dtype not in (torch.int8, torch.uint8):
                raise RuntimeError(f"bitsandbytes did not quantize the weight on {layer.device} "
                                   f"(it stayed {m.weight.dtype})")
            return m
        m = layer.get(("bnb", kind, x.dtype), build)
        nominal = layer.n * layer.k // (1 if kind == "int8" else 2)     # scales not counted
        return (lambda: m(x)), nominal
    return make


# ------------------------------------------------------------------ the table

def impls(device: str, case: Case | None = None) -> dict:
    """{name: (factory(layer, x) -> (fn, storage bytes), or None, reason)}."""
    from .. import _backends
    from . import peers
    fp32 = case is None or case.act == torch.float32
    cpu = device == "cpu"
    out = {BASELINE: (_baseline, "")}
    if case is None or case.act == torch.bfloat16:
        out["torch F.linear bf16"] = (_bf16_linear, "")
    if fp32:
        supported = torch.backends.quantized.supported_engines
        for eng in AO_ENGINES:
            name = f"torch.ao dynamic int8 {eng}"
            if not cpu:
                out[name] = (None, "torch.ao dynamic quantization runs on the CPU only")
            elif eng not in supported:
                out[name] = (None, f"engine {eng!r} not in torch.backends.quantized."
                                   f"supported_engines {supported}")
            else:
                out[name] = (_ao_dynamic(eng), "")
    out["torch _weight_int8pack_mm"] = (_int8pack, "")
    out["torch _weight_int4pack_mm_for_cpu g128"] = (
        (_int4pack, "") if cpu else (None, "the _for_cpu int4 kernel runs on the CPU only"))
    found = peers.detect(device)
    for peer, rows in (("torchao", [k for k in ("int8 W8A8", "int8_weight_only W8",
                                                "int4_weight_only W4 g128")
                                    if fp32 or "W8A8" not in k]),
                       ("bitsandbytes", (["int8"] if fp32 else []) + ["nf4"])):
        if not found[peer]["available"]:
            out[peer] = (None, found[peer]["reason"])
            continue
        for kind in rows:
            out[f"{peer} {kind}"] = ((_torchao if peer == "torchao" else _bnb)(kind), "")
    ok, why = _backends.availability("native", device)
    nb_ok, nb_why = _backends.availability("numba", device)
    numba_rows = case is None or case.batch <= NUMBA_MAX_BATCH or _tiny()
    for label, cfg, act, _ in _PYOPT:
        if not fp32 and (act or cfg == "int8"):
            continue                     # bf16 activations: the weight-only layers only
        out[f"pyopt {label}"] = ((_pyopt(cfg, act, None) if ok else None), why)
    for label, cfg, act, _ in _PYOPT:
        if (not fp32 and (act or cfg == "int8")) or not numba_rows:
            continue
        out[f"pyopt numba {label}"] = ((_pyopt(cfg, act, "numba") if nb_ok else None), nb_why)
    return out


def bound(name: str) -> float:
    """Relative error bound of the correctness check for a row of impls()."""
    if name == BASELINE:
        return BOUNDS["fp32"]
    if "int4" in name or "nf4" in name:
        return BOUNDS["int4"]
    if "int8" in name:
        return BOUNDS["int8"]
    return BOUNDS["bf16"]


def run(device="cpu", quick=False, min_time=None, progress=None, only=None, case_list=None,
        extra_impls=None, ref_elems=None, **_) -> list[dict]:
    """Measure every (case, implementation), interleaved with the same-run RMW
    and copy references; one record each. ``extra_impls``: {name: (factory,
    bound)} added to every case (the tests use it to plant a wrong kernel)."""
    min_time = min_time if min_time is not None else (0.2 if quick else 0.5)
    sync = torch.cuda.synchronize if device == "cuda" else None
    n_ref = ref_elems or ((1 << 16) if _tiny() else 16 << 20)
    a, b = torch.rand(n_ref, device=device), torch.rand(n_ref, device=device)
    c = torch.empty(n_ref, device=device)
    engine = torch.backends.quantized.engine
    records, layer = [], None
    try:
        with torch.no_grad():
            for case in case_list or cases(device, quick):
                if progress:
                    progress(f"quant {case.name}")
                if layer is None or (layer.n, layer.k) != case.layer:
                    layer = None
                    gc.collect()
                    layer = _Layer(case.n, case.k, device)
                records += _run_case(case, layer, device, only, extra_impls, min_time, sync,
                                     a, b, c)
    finally:
        torch.backends.quantized.engine = engine
    return records


def _run_case(case, layer, device, only, extra_impls, min_time, sync, a, b, c) -> list[dict]:
    x = torch.randn(case.batch, case.k, generator=torch.Generator().manual_seed(1)).to(
        device, case.act)
    expect = F.linear(x.float(), layer.w)
    scale = float(expect.abs().max())
    table = {k: (f, why, bound(k)) for k, (f, why) in impls(device, case).items()}
    for k, (f, bnd) in (extra_impls or {}).items():
        table[k] = (f, "", bnd)
    names = [BASELINE] + [k for k in table if k != BASELINE and (not only or k in only)]
    fns, recs, records = {"rmw": lambda: b.add_(a, alpha=1e-9), "copy": lambda: c.copy_(a)}, {}, []
    for name in names:
        factory, why, bnd = table[name]
        x_dtype = torch.float32 if name == BASELINE else case.act
        rec = {"suite": "quant", "device": device, "case": case.name, "impl": name,
               "numel": case.n * case.k, "tensors": 1, "dtype": _dt(x_dtype), "optimizer": "",
               "baseline": BASELINE, "format": "", "batch": case.batch, "bound": bnd}
        records.append(rec)
        if factory is None:
            rec.update(status="unavailable", reason=why)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn, storage = factory(layer, x)
                got = fn()
            if sync:
                sync()
        except Exception as e:  # noqa: BLE001 - a peer or engine that cannot run here
            # pyopt's own layers must run: an exception there is a failure
            rec.update(status="failed" if name.startswith("pyopt") else "unavailable",
                       reason=f"{type(e).__name__}: {e}"[:200])
            continue
        rec.update(bytes_per_weight=storage / (case.n * case.k),
                   bytes_per_step=storage + case.batch * (case.k + case.n) * x.element_size())
        got = torch.as_tensor(got)
        if tuple(got.shape) != tuple(expect.shape):
            rec.update(status="failed", reason=f"wrong result: shape {tuple(got.shape)}, "
                                               f"expected {tuple(expect.shape)}")
            continue
        err = float((got.float() - expect).abs().max()) / scale if scale else 0.0
        rec["error"] = err
        if not err <= bnd:          # NaN fails too
            rec.update(status="failed", reason=f"wrong result: relative error {err:.3g} "
                                               f"> bound {bnd:g}")
            continue
        fns[name], recs[name] = fn, rec
    # the correctness call above was each implementation's warm-up (numba compiles there)
    t = interleaved(fns, min_time=min_time, sync=sync, cuda=device == "cuda", max_reps=2000,
                    warmup=0)
    rmw = 12 * a.numel() / t["rmw"].median / 1e9
    copy = 8 * a.numel() / t["copy"].median / 1e9
    base = t[BASELINE].median
    for name, rec in recs.items():
        tm = t[name]
        gbps = rec["bytes_per_step"] / tm.median / 1e9
        rec.update(status="ok", **tm.fields(), gbps=gbps, rmw_gbps=rmw, of_rmw=gbps / rmw,
                   copy_gbps=copy, of_copy=gbps / copy, speedup=base / tm.median)
    return records
