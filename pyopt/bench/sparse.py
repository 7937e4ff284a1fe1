"""Sparse suite: a pruned 4096x4096 fp32 Linear at batch 1, 16 and 128.

Every implementation computes the same ``x @ W.T`` for the same pruned W and
is checked against dense F.linear before it is timed; all of a case's
implementations are timed round-robin in one run, and ``speedup`` is dense
F.linear's median over the implementation's. ``gbps`` counts the bytes an
implementation must move at least once (its weight storage, x and the
output); ``of_rmw`` relates that to the in-place RMW bandwidth timed in
alternation, which matters at batch 1, where the weight bytes set the pace.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .timing import interleaved

BASELINE = "dense F.linear"


@dataclass
class Case:
    name: str
    pattern: str          # "unstructured", "2:4" or "block32"
    sparsity: float
    batch: int
    n: int = 4096
    k: int = 4096
    dtype: torch.dtype = torch.float32

    @property
    def layer(self):
        return (self.pattern, self.sparsity, self.n, self.k, self.dtype)


def cases(device: str, quick: bool) -> list[Case]:
    if os.environ.get("PYOPT_BENCH_TINY"):
        return [Case("unstructured 90% tiny B=1", "unstructured", 0.9, 1, 64, 128),
                Case("2:4 tiny B=16", "2:4", 0.5, 16, 64, 128),
                Case("block32 90% tiny B=8", "block32", 0.9, 8, 64, 128)]
    out = []
    for pattern, sp, label in [("unstructured", 0.9, "unstructured 90%"),
                               ("unstructured", 0.7, "unstructured 70%"),
                               ("unstructured", 0.5, "unstructured 50%"),
                               ("2:4", 0.5, "2:4"), ("block32", 0.9, "block 32x32 90%")]:
        for b in (1, 16, 128):
            out.append(Case(f"{label} B={b}", pattern, sp, b))
    return out


def _mask(case: Case, gen) -> torch.Tensor:
    n, k = case.n, case.k
    if case.pattern == "2:4":
        order = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
        keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
        return keep.scatter_(-1, order, True).reshape(n, k)
    if case.pattern == "block32":
        kb = torch.rand(n // 32, k // 32, generator=gen) >= case.sparsity
        return kb.repeat_interleave(32, 0).repeat_interleave(32, 1)
    return torch.rand(n, k, generator=gen) >= case.sparsity


def _layers(case: Case, device: str, cache: dict):
    """(W pruned dense, keep, {format: SparseLinear}, auto layer), built once per layer."""
    if case.layer in cache:
        return cache[case.layer]
    cache.clear()
    gc.collect()
    from ..sparse import SparseLinear
    gen = torch.Generator().manual_seed(0)
    keep = _mask(case, gen)
    w = torch.randn(case.n, case.k, generator=gen) * keep
    lin = torch.nn.Linear(case.k, case.n, bias=False).to(device, case.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    keep = keep.to(device)
    fmts = ["csr", "bitmask"] + (["nm"] if case.pattern == "2:4" else []) + \
        (["bsr"] if case.pattern == "block32" else [])
    layers = {f: SparseLinear.from_dense(lin, keep, f) for f in fmts}
    tiny = bool(os.environ.get("PYOPT_BENCH_TINY"))
    auto = SparseLinear.from_dense(lin, keep, "auto", batch_sizes=(1, 8) if tiny else (1, 16, 128))
    cache[case.layer] = (lin.weight.detach(), keep, layers, auto)
    return cache[case.layer]


def impls(device: str, case: Case | None = None) -> dict:
    """{name: (factory(W, keep, layers, auto, x) -> fn, or None, reason)}."""
    from .. import _backends
    out = {BASELINE: (lambda w, keep, layers, auto, x: lambda: F.linear(x, w), "")}
    ok, why = _backends.availability("native", device)
    formats = ["csr", "bitmask"]
    if case is None or case.pattern == "2:4":
        formats.append("nm")
    if case is None or case.pattern == "block32":
        formats.append("bsr")
    out["pyopt auto"] = ((lambda w, keep, layers, auto, x: lambda: auto(x)) if ok else None, why)
    for f in formats:
        out[f"pyopt {f}"] = ((lambda w, keep, layers, auto, x, f=f: lambda: layers[f](x))
                             if ok else None, why)
    nb_ok, nb_why = _backends.availability("numba", device)

    def numba_csr(w, keep, layers, auto, x):
        from ..sparse import _kernels
        lay = layers["csr"]
        t = {k: v.detach() for k, v in lay.layout().items()}
        return lambda: _kernels.linear("csr", x, t, None, lay.out_features, "numba")
    out["pyopt numba csr"] = (numba_csr if nb_ok else None, nb_why)
    if device == "cpu":
        def torch_csr_mm(w, keep, layers, auto, x):
            wc = w.to_sparse_csr()
            return lambda: (wc @ x.t()).t()
        out["torch CSR W@x.T"] = (torch_csr_mm, "")

        def torch_csr_linear(w, keep, layers, auto, x):
            wc = w.to_sparse_csr()
            return lambda: F.linear(x, wc)
        out["torch F.linear(CSR)"] = (torch_csr_linear, "")
        try:
            import scipy.sparse as sp

            def scipy_csr(w, keep, layers, auto, x):
                ws = sp.csr_matrix(w.numpy())
                xn = x.numpy()
                return lambda: (ws @ xn.T).T
            out["scipy CSR"] = (scipy_csr, "")
        except ImportError as e:
            out["scipy CSR"] = (None, f"scipy is not installed ({e})")
    if case is None or case.pattern == "block32":
        def torch_bsr(w, keep, layers, auto, x):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")      # "BSR support is in beta"
                wb = w.to_sparse_bsr((32, 32) if w.shape[0] % 32 == 0 else (8, 8))
            return lambda: (wb @ x.t()).t()
        out["torch BSR W@x.T"] = (torch_bsr, "")
    return out


def _storage_bytes(name, w, layers, auto):
    if name.startswith("pyopt") and name != "pyopt numba csr":
        lay = auto if name == "pyopt auto" else layers[name.split()[1]]
        return sum(t.numel() * t.element_size() for t in lay.layout().values())
    if name == "pyopt numba csr":
        return sum(t.numel() * t.element_size() for t in layers["csr"].layout().values())
    if name == BASELINE:
        return w.numel() * w.element_size()
    nnz = int((w != 0).sum())
    return nnz * (w.element_size() + 8) + (w.shape[0] + 1) * 8     # int64 indices


def run(device="cpu", quick=False, min_time=None, progress=None, only=None, case_list=None,
        **_) -> list[dict]:
    min_time = min_time if min_time is not None else (0.2 if quick else 0.6)
    sync = torch.cuda.synchronize if device == "cuda" else None
    tiny = bool(os.environ.get("PYOPT_BENCH_TINY"))
    n_rmw = (1 << 16) if tiny else 16 << 20
    a, b = torch.rand(n_rmw, device=device), torch.rand(n_rmw, device=device)
    records, cache = [], {}
    for case in case_list or cases(device, quick):
        if progress:
            progress(f"sparse {case.name}")
        w, keep, layers, auto = _layers(case, device, cache)
        x = torch.randn(case.batch, case.k, generator=torch.Generator().manual_seed(1)).to(
            device, case.dtype)
        expect = F.linear(x, w)
        table = impls(device, case)
        names = [BASELINE] + [k for k in table if k != BASELINE and (not only or k in only)]
        fns, recs = {"rmw": lambda: b.add_(a, alpha=1e-9)}, {}
        for name in names:
            factory, why = table[name]
            rec = {"suite": "sparse", "device": device, "case": case.name, "impl": name,
                   "numel": case.n * case.k, "tensors": 1, "dtype": str(case.dtype)[6:],
                   "optimizer": "", "baseline": BASELINE,
                   "format": auto.format if name == "pyopt auto" else "",
                   "bytes_per_step": _storage_bytes(name, w, layers, auto)
                   + (case.batch * (case.k + case.n)) * w.element_size()}
            records.append(rec)
            if factory is None:
                rec.update(status="unavailable", reason=why)
                continue
            try:
                fn = factory(w, keep, layers, auto, x)
                got = torch.as_tensor(fn()).to(device)
            except (RuntimeError, TypeError, NotImplementedError) as e:
                rec.update(status="unavailable", reason=f"{type(e).__name__}: {e}"[:200])
                continue
            if sync:
                sync()
            try:
                torch.testing.assert_close(got.to(expect.dtype), expect, rtol=1e-3, atol=1e-3)
            except AssertionError as e:
                rec.update(status="failed", reason=f"wrong result: {str(e).splitlines()[0]}")
                continue
            fns[name], recs[name] = fn, rec
        t = interleaved(fns, min_time=min_time, sync=sync, cuda=device == "cuda",
                        max_reps=2000)
        rmw = 12 * n_rmw / t["rmw"].median / 1e9
        base = t[BASELINE].median
        for name, rec in recs.items():
            tm = t[name]
            gbps = rec["bytes_per_step"] / tm.median / 1e9
            rec.update(status="ok", **tm.fields(), gbps=gbps, rmw_gbps=rmw, of_rmw=gbps / rmw,
                       speedup=base / tm.median)
    return records
