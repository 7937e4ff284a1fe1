"""Optimizer suite: one optimizer step, pyopt backends against torch.optim.

Byte model per parameter (what a fused step must move at least once): every
tensor the step reads once and every tensor it writes once. AdamW reads
param, grad, exp_avg, exp_avg_sq and writes three of them: 7 x the element
size (28 B fp32, 14 B bf16). SGD with momentum and plain RMSprop read three
and write two: 5 x. Achieved GB/s is that traffic over the median step time;
``of_rmw`` is it as a fraction of the in-place read-modify-write bandwidth
timed in alternation with the case, the wall this kind of op can reach.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch

import pyopt
from pyopt import _backends

from . import peers
from .timing import interleaved


@dataclass
class Case:
    name: str
    sizes: list
    dtype: torch.dtype
    optimizer: str = "AdamW"
    kwargs: dict = field(default_factory=dict)
    lists: int = 7                 # tensors moved per param (byte model above)
    cache_resident: bool = False
    kind: str = "step"             # "step", "amp" (GradScaler step) or "clip"
    bytes_per_param: float | None = None   # overrides lists * element size

    @property
    def numel(self):
        return sum(self.sizes)


def cases(device: str, quick: bool) -> list[Case]:
    if os.environ.get("PYOPT_BENCH_TINY"):   # tests: every case kind, tiny sizes
        return [Case("AdamW tiny", [1000, 17], torch.float32),
                Case("SGD tiny", [999], torch.float32, optimizer="SGD",
                     kwargs={"lr": 1e-3, "momentum": 0.9}, lists=5),
                Case("AdamW+GradScaler tiny", [500], torch.float32, kind="amp", lists=9),
                Case("clip tiny", [300, 20], torch.float32, kind="clip",
                     kwargs={"max_norm": 1e-3}, lists=3)]
    sgd = dict(optimizer="SGD", kwargs={"lr": 1e-3, "momentum": 0.9}, lists=5)
    rms = dict(optimizer="RMSprop", kwargs={"lr": 1e-3}, lists=5)
    if device == "cuda":
        return [Case("AdamW 100M fp32", [100 << 20], torch.float32),
                Case("AdamW 100M bf16", [100 << 20], torch.bfloat16),
                Case("AdamW 2000 x 50K fp32", [50_000] * 2000, torch.float32),
                Case("SGD momentum 100M fp32", [100 << 20], torch.float32, **sgd),
                Case("RMSprop 100M fp32", [100 << 20], torch.float32, **rms)]
    return [Case("AdamW 64M fp32", [64 << 20], torch.float32),
            Case("AdamW 1M fp32", [1 << 20], torch.float32, cache_resident=True),
            Case("AdamW 200 x 80K fp32", [80_000] * 200, torch.float32),
            Case("AdamW 2000 x 1K fp32", [1024] * 2000, torch.float32),
            Case("AdamW 16M bf16", [16 << 20], torch.bfloat16),
            Case("AdamW 16M fp16", [16 << 20], torch.float16),
            Case("SGD momentum 64M fp32", [64 << 20], torch.float32, **sgd),
            Case("RMSprop 64M fp32", [64 << 20], torch.float32, **rms),
            Case("SGD momentum 16M bf16", [16 << 20], torch.bfloat16, **sgd),
            # centered + momentum: square_avg, grad_avg and the buffer
            Case("RMSprop centered momentum 16M bf16", [16 << 20], torch.bfloat16,
                 optimizer="RMSprop", kwargs={"lr": 1e-3, "centered": True, "momentum": 0.9},
                 lists=9),
            # master: read fp32 master, bf16 grad, fp32 m, v; write master, m, v, bf16 param
            Case("AdamW 16M bf16 master", [16 << 20], torch.bfloat16,
                 kwargs={"master_weights": True}, bytes_per_param=28),
            # GradScaler step: the unscale reads and writes the grad once more
            Case("AdamW+GradScaler 16M fp32", [16 << 20], torch.float32, kind="amp", lists=9),
            # clip below max_norm: read every grad for the norm (torch also
            # multiplies by 1; pyopt skips that no-op)
            Case("clip_grad_norm_ 200 x 80K", [80_000] * 200, torch.float32, kind="clip",
                 kwargs={"max_norm": 1e9}, lists=1),
            # clipping: norm pass and scale pass, plus a grads *= 2 pass that
            # undoes the halving so every call clips (timed for all, in the bytes)
            Case("clip_grad_norm_ 200 x 80K clipping", [80_000] * 200, torch.float32,
                 kind="clip", kwargs={"max_norm": 2000.0, "restore": 2.0}, lists=5)]


# torch.optim classes that have a fused CPU/CUDA implementation.
_TORCH_FUSED = {"Adam", "AdamW", "SGD"}


def impls(device: str, case: Case | None = None) -> dict:
    """{name: (factory or None, reason)}; factory(params) -> a callable that
    runs one timed operation on params whose .grad is set."""
    kind = case.kind if case else "step"
    if kind == "clip":
        ok, why = _backends.availability("native", device)
        max_norm = case.kwargs["max_norm"]
        restore = case.kwargs.get("restore")

        def clip(fn, **kw):
            def make(ps):
                grads = [p.grad for p in ps]

                def run():
                    if restore:
                        torch._foreach_mul_(grads, restore)
                    fn(ps, max_norm, **kw)
                return run
            return make
        return {"pyopt native": (clip(pyopt.clip_grad_norm_) if ok else None, why),
                "torch foreach=False": (clip(torch.nn.utils.clip_grad_norm_, foreach=False), ""),
                "torch foreach=True": (clip(torch.nn.utils.clip_grad_norm_, foreach=True), "")}
    if kind == "amp":
        out = {}
        for b in ("native", "numba"):
            ok, why = _backends.availability(b, device)
            out[f"pyopt {b}"] = ((lambda ps, b=b: _amp_step(pyopt.optim.AdamW(ps, backend=b),
                                                             device, unscale_first=False))
                                 if ok else None, why)
            out[f"pyopt {b} + pyopt.amp.GradScaler"] = (
                (lambda ps, b=b: _amp_step(pyopt.optim.AdamW(ps, backend=b), device,
                                           unscale_first=False, scaler_cls=pyopt.amp.GradScaler))
                if ok else None, why)
        out["torch unscale_ + fused=True"] = (lambda ps: _amp_step(
            torch.optim.AdamW(ps, fused=True), device, unscale_first=True), "")
        out["torch fused=True (GradScaler protocol)"] = (lambda ps: _amp_step(
            torch.optim.AdamW(ps, fused=True), device, unscale_first=False), "")
        return out
    out = {name: ((lambda ps, f=f: f(ps).step) if f else None, why)
           for name, (f, why) in optimizers(device, case).items()}
    if case is not None:
        out.update(peers.optimizer_impls(device, case))
    return out


def _amp_step(opt, device, unscale_first, scaler_cls=torch.amp.GradScaler):
    """scaler.step(opt) as a training loop runs it. The scale alternates
    between 2 and 1/2 so that repeated unscaling neither grows nor shrinks
    the grads; growth_interval keeps GradScaler from changing it."""
    scaler = scaler_cls(device, init_scale=2.0, growth_interval=1 << 30)
    scaler.scale(torch.ones((), device=device))   # creates the scale tensor
    flip = [2.0]

    def step():
        flip[0] = 0.5 if flip[0] == 2.0 else 2.0
        scaler._scale.fill_(flip[0])
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    return step


def optimizers(device: str, case: Case | None = None) -> dict:
    """{name: (factory or None, reason)}; factory(params) -> optimizer."""
    opt = case.optimizer if case else "AdamW"
    kw = case.kwargs if case else {}
    pyopt_only = {k: v for k, v in kw.items() if k == "master_weights"}
    kw = {k: v for k, v in kw.items() if k not in pyopt_only}
    ours, theirs = getattr(pyopt.optim, opt), getattr(torch.optim, opt)
    out = {}
    for b in ("native", "numba"):
        ok, why = _backends.availability(b, device)
        out[f"pyopt {b}"] = ((lambda ps, b=b: ours(ps, backend=b, **kw, **pyopt_only))
                             if ok else None, why)
    out["torch foreach=False"] = (lambda ps: theirs(ps, foreach=False, **kw), "")
    out["torch foreach=True"] = (lambda ps: theirs(ps, foreach=True, **kw), "")
    if opt in _TORCH_FUSED:
        out["torch fused=True"] = (lambda ps: theirs(ps, fused=True, **kw), "")
    else:
        out["torch fused=True"] = (None, f"torch.optim.{opt} has no fused implementation")
    return out


def baseline(case: Case) -> str:
    """What pyopt is compared with: torch's fastest implementation of the operation."""
    if case.kind == "clip":
        return "torch foreach=True"
    if case.kind == "amp":
        return "torch unscale_ + fused=True"
    return "torch fused=True" if case.optimizer in _TORCH_FUSED else "torch foreach=True"


def run(device="cpu", quick=False, min_time=None, progress=None, only=None, case_list=None,
        extra_impls=None, rmw_elems=64 << 20) -> list[dict]:
    """Measure every (case, implementation), interleaved with the same-run
    in-place RMW reference; returns one record each. ``case_list`` and
    ``extra_impls`` ({name: factory}) replace the cases and add
    implementations (tests use tiny cases and a deliberately wrong one)."""
    min_time = min_time if min_time is not None else (0.3 if quick else 1.0)
    sync = torch.cuda.synchronize if device == "cuda" else None
    records = []
    n_rmw = (1 << 16) if os.environ.get("PYOPT_BENCH_TINY") else rmw_elems  # 12 B/elem
    x = torch.rand(n_rmw, device=device)
    y = torch.rand(n_rmw, device=device)
    for case in case_list or cases(device, quick):
        if progress:
            progress(f"optim {case.name}")
        gen = torch.Generator().manual_seed(0)
        p0 = [torch.randn(n, generator=gen).to(device, case.dtype) for n in case.sizes]
        grads = [torch.randn(n, generator=gen).to(device, case.dtype) for n in case.sizes]
        table = impls(device, case)
        table.update({k: (f, "") for k, f in (extra_impls or {}).items()})
        base_name = baseline(case)
        names = [base_name] + [k for k in table if k != base_name and (not only or k in only)]
        expect, steps, recs = None, {"rmw": lambda: y.add_(x, alpha=1e-9)}, {}
        for name in names:
            factory, why = table[name]
            rec = {"suite": "optim", "device": device, "case": case.name, "impl": name,
                   "numel": case.numel, "tensors": len(case.sizes),
                   "dtype": str(case.dtype).replace("torch.", ""),
                   "optimizer": case.optimizer, "baseline": base_name,
                   "bytes_per_step": case.numel * (
                       case.bytes_per_param if case.bytes_per_param and name.startswith("pyopt")
                       else case.lists * case.dtype.itemsize)}
            records.append(rec)
            if factory is None:
                rec.update(status="unavailable", reason=why)
                continue
            ps = [p.clone().requires_grad_() for p in p0]
            for p, g in zip(ps, grads):   # amp and clip rewrite the grads: own copies
                p.grad = g if case.kind == "step" else g.clone()
            fn = factory(ps)
            fn()                # first call: creates state, compiles, and is checked
            if sync:
                sync()
            got = [p.grad if case.kind == "clip" else p.detach() for p in ps]
            if expect is None:
                expect = [t.clone() for t in got]
            else:
                tol = 1e-5 if case.dtype == torch.float32 else 1e-2
                try:
                    for a, b in zip(got, expect):
                        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
                except AssertionError as e:
                    # torch's own foreach fp16 AdamW lands here: its fp16 math
                    # flushes eps=1e-8 and small exp_avg_sq to 0 and divides by 0
                    rec.update(status="failed", reason=f"wrong result against {base_name}: "
                               f"{str(e).splitlines()[0]}")
                    continue
            steps[name] = fn
            recs[name] = rec
        timings = interleaved(steps, min_time=min_time, sync=sync, cuda=device == "cuda",
                              burst=20 if case.cache_resident else 1)
        rmw = 12 * n_rmw / timings["rmw"].median / 1e9
        base = timings.get(base_name)
        for name, rec in recs.items():
            t = timings[name]
            gbps = rec["bytes_per_step"] / t.median / 1e9
            rec.update(status="ok", **t.fields(), gbps=gbps, rmw_gbps=rmw, of_rmw=gbps / rmw,
                       speedup=base.median / t.median if base else None)
        del p0, grads, expect, steps, recs
        gc.collect()
    return records
