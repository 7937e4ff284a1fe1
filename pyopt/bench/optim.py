"""Optimizer suite: one Adam(W) step, pyopt backends against torch.optim.

Byte model per parameter (what a fused step must move at least once):
read param, grad, exp_avg, exp_avg_sq and write param, exp_avg, exp_avg_sq,
i.e. 7 x the element size (28 B fp32, 14 B bf16). Achieved GB/s is that
traffic over the median step time; ``of_rmw`` is it as a fraction of the
same-run in-place read-modify-write bandwidth, the wall this op can reach.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

import pyopt
from pyopt import _backends

from .timing import interleaved


@dataclass
class Case:
    name: str
    sizes: list
    dtype: torch.dtype
    cache_resident: bool = False

    @property
    def numel(self):
        return sum(self.sizes)


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        return [Case("100M fp32", [100 << 20], torch.float32),
                Case("100M bf16", [100 << 20], torch.bfloat16),
                Case("2000 x 50K fp32", [50_000] * 2000, torch.float32)]
    return [Case("64M fp32", [64 << 20], torch.float32),
            Case("1M fp32", [1 << 20], torch.float32, cache_resident=True),
            Case("200 x 80K fp32", [80_000] * 200, torch.float32),
            Case("2000 x 1K fp32", [1024] * 2000, torch.float32),
            Case("16M bf16", [16 << 20], torch.bfloat16)]


def impls(device: str) -> dict:
    """{name: (factory or None, reason)}; factory(params) -> optimizer."""
    out = {}
    for b in ("native", "numba"):
        ok, why = _backends.availability(b, device)
        out[f"pyopt {b}"] = ((lambda ps, b=b: pyopt.optim.AdamW(ps, backend=b)) if ok else None, why)
    out["torch foreach=False"] = (lambda ps: torch.optim.AdamW(ps, foreach=False), "")
    out["torch foreach=True"] = (lambda ps: torch.optim.AdamW(ps, foreach=True), "")
    out["torch fused=True"] = (lambda ps: torch.optim.AdamW(ps, fused=True), "")
    return out


BASELINE = "torch fused=True"


def run(device="cpu", quick=False, min_time=None, progress=None, only=None) -> list[dict]:
    """Measure every (case, implementation), interleaved with the same-run
    in-place RMW reference; returns one record each."""
    min_time = min_time if min_time is not None else (0.3 if quick else 1.0)
    sync = torch.cuda.synchronize if device == "cuda" else None
    table = impls(device)
    names = [BASELINE] + [k for k in table if k != BASELINE and (not only or k in only)]
    records = []
    n_rmw = 64 << 20   # 256 MiB fp32 arrays, 12 B/elem
    x = torch.rand(n_rmw, device=device)
    y = torch.rand(n_rmw, device=device)
    for case in cases(device, quick):
        if progress:
            progress(f"optim {case.name}")
        gen = torch.Generator().manual_seed(0)
        p0 = [torch.randn(n, generator=gen).to(device, case.dtype) for n in case.sizes]
        grads = [torch.randn(n, generator=gen).to(device, case.dtype) for n in case.sizes]
        expect, steps, recs = None, {"rmw": lambda: y.add_(x, alpha=1e-9)}, {}
        for name in names:
            factory, why = table[name]
            rec = {"suite": "optim", "device": device, "case": case.name, "impl": name,
                   "numel": case.numel, "tensors": len(case.sizes),
                   "dtype": str(case.dtype).replace("torch.", ""),
                   "bytes_per_step": 7 * case.numel * case.dtype.itemsize}
            records.append(rec)
            if factory is None:
                rec.update(status="unavailable", reason=why)
                continue
            ps = [p.clone().requires_grad_() for p in p0]
            for p, g in zip(ps, grads):
                p.grad = g
            opt = factory(ps)
            opt.step()          # first step: creates state, compiles, and is checked
            if sync:
                sync()
            got = [p.detach() for p in ps]
            if expect is None:
                expect = [t.clone() for t in got]
            else:
                tol = 1e-5 if case.dtype == torch.float32 else 1e-2
                try:
                    for a, b in zip(got, expect):
                        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
                except AssertionError as e:
                    rec.update(status="failed", reason=f"wrong result: {str(e).splitlines()[0]}")
                    continue
            steps[name] = opt.step
            recs[name] = rec
        timings = interleaved(steps, min_time=min_time, sync=sync, cuda=device == "cuda",
                              burst=20 if case.cache_resident else 1)
        rmw = 12 * n_rmw / timings["rmw"].median / 1e9
        base = timings.get(BASELINE)
        for name, rec in recs.items():
            t = timings[name]
            gbps = rec["bytes_per_step"] / t.median / 1e9
            rec.update(status="ok", median_ms=t.median * 1e3, iqr_ms=t.iqr * 1e3, reps=t.reps,
                       gbps=gbps, rmw_gbps=rmw, of_rmw=gbps / rmw,
                       speedup_vs_fused=base.median / t.median if base else None)
        del p0, grads, expect, steps, recs
        gc.collect()
    return records
