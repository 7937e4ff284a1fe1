"""SparseLinear: a pruned nn.Linear whose matmul skips the pruned weights.

The kept weights are the trainable parameter ``values``; the structure
(row pointers, column indices, bitmap or block columns) is buffers. Both go
into the state_dict together with the format, so a checkpoint loads back into
any SparseLinear of the same shape, whatever format that one had.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import prune
from . import formats
from ._kernels import check_input, linear, linear_nd

__all__ = ["SparseLinear", "sparsify_"]

LAYOUTS = ("auto", "dense") + formats.FORMATS
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
# every layout's structure tensors, plus the dense layout's mask
_BUFFERS = {name for fields in formats.FIELDS.values() for name in fields[1:]} | {"mask"}


def _keep_mask(linear: nn.Linear, mask) -> torch.Tensor:
    w = linear.weight
    if mask is None:
        mask = prune.masks_of(linear).get("")   # recorded by pyopt.prune
    if mask is None:
        return w.detach() != 0
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight shape "
                         f"{tuple(w.shape)}")
    if mask.dtype is not torch.bool:
        mask = mask != 0
    return mask.to(w.device)


def _is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    rows, k = keep.shape
    return k % m == 0 and bool((keep.reshape(rows, k // m, m).sum(-1) == n).all())


def _block_density(keep: torch.Tensor, block) -> float:
    bh, bw = block
    rows, k = keep.shape
    if rows % bh or k % bw:
        return 1.0
    return keep.reshape(rows // bh, bh, k // bw, bw).any(3).any(1).float().mean().item()


class _KeepPruned(torch.autograd.Function):
    """Identity on the weight whose backward zeroes the pruned positions'
    grads, so they stay exactly zero under any standard optimizer (a zero
    with zero grad and zero state never moves). The forward is free: no copy
    of the weight per call."""

    @staticmethod
    def forward(ctx, w, mask):
        ctx.save_for_backward(mask)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class SparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with W stored sparse; same call contract as nn.Linear.

    Build one with :meth:`from_dense`. ``format`` is ``"csr"``, ``"bitmask"``,
    ``"nm"`` (N:M such as 2:4), ``"bsr"`` (blocks) or ``"dense"`` (the pruned
    weight kept dense, chosen by ``auto`` when no sparse kernel beats
    F.linear). Layouts are documented in :mod:`pyopt.sparse.formats`.

    Autograd gives the input gradient and the gradient of the kept weights
    only, so a fine-tune never revives a pruned weight. The backward pass uses
    dense GEMMs (as fast as nn.Linear's backward, not faster).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 format: str = "csr", block=(32, 32), nm=(2, 4), device=None, dtype=None):
        super().__init__()
        if format not in LAYOUTS or format == "auto":
            raise ValueError(f"format must be one of {', '.join(LAYOUTS[1:])}, got {format!r}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in _FLOAT:
            raise TypeError(f"SparseLinear dtype must be float32, bfloat16 or float16, got {dtype}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.block, self.nm = tuple(block), tuple(nm)
        self.format = format
        self.backend = None          # None: PYOPT_BACKEND or auto
        self.auto_report: dict = {}
        w = torch.zeros(self.out_features, self.in_features, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)) \
            if bias else None
        # start all-pruned (a fully pruned nm layer still keeps n zeros per group)
        keep = torch.zeros_like(w, dtype=torch.bool)
        if format == "nm":
            keep = formats.nm_fill(keep, *self.nm)
        self._set_layout(format, self._build(format, w, keep))

    # -- layout --------------------------------------------------------------
    def _build(self, fmt, w, keep) -> dict:
        if fmt == "dense":
            return {"values": torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)),
                    "mask": keep.clone()}
        if fmt == "nm" and self.in_features % self.nm[1]:
            raise ValueError(f"N:M {self.nm[0]}:{self.nm[1]} needs in_features divisible by "
                             f"{self.nm[1]}, got {self.in_features}")
        if fmt == "bsr" and (self.out_features % self.block[0] or self.in_features % self.block[1]):
            raise ValueError(f"block {self.block} must divide the weight shape "
                             f"({self.out_features}, {self.in_features})")
        return formats.build(fmt, w, keep, nm=self.nm, block=self.block)

    def _fields(self, fmt):
        return ("values", "mask") if fmt == "dense" else formats.FIELDS[fmt]

    def _set_layout(self, fmt: str, t: dict) -> None:
        for name in _BUFFERS:
            self._buffers.pop(name, None)
        self.format = fmt
        self.values = nn.Parameter(t["values"].detach(), requires_grad=True)
        for name in self._fields(fmt)[1:]:
            self.register_buffer(name, t[name])

    def layout(self) -> dict:
        """The format tensors the kernels read (see pyopt.sparse.formats)."""
        return {f: getattr(self, f) for f in self._fields(self.format)}

    @property
    def nnz(self) -> int:
        """Kept weights (the zeros nm and bsr store are pruned ones)."""
        if self.format == "dense":
            return int(self.mask.sum())
        return int((self.values != 0).sum()) if self.format in ("nm", "bsr") else self.values.numel()

    def to_dense(self) -> torch.Tensor:
        """The weight as a dense [out, in] tensor (zeros where pruned)."""
        if self.format == "dense":
            return self.values.detach() * self.mask
        return formats.to_dense(self.format, {k: v.detach() for k, v in self.layout().items()},
                                (self.out_features, self.in_features))

    # -- construction --------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Linear, mask=None, format: str = "auto", *, block=(32, 32),
                   nm=(2, 4), batch_sizes=(1, 16, 128), backend=None) -> "SparseLinear":
        """Convert a (pruned) nn.Linear. ``mask`` (True = keep) defaults to the
        mask pyopt.prune recorded on the layer, else ``weight != 0``.

        ``format="auto"`` times every candidate layout, dense included, on this
        machine at ``batch_sizes``; of those never slower than dense at any of
        them it keeps the one with the lowest geometric mean time, so
        converting does not make the layer slower at those batch sizes.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.dtype not in _FLOAT:
            raise TypeError(f"cannot sparsify a {w.dtype} weight: SparseLinear needs float32, "
                            "bfloat16 or float16 (integer or quantized layers are not supported)")
        if format not in LAYOUTS:
            raise ValueError(f"format must be one of {', '.join(LAYOUTS)}, got {format!r}")
        keep = _keep_mask(linear, mask)
        out_f, in_f = w.shape
        # an empty csr layer (cheapest to build); the real layout replaces it below
        layer = cls(in_f, out_f, linear.bias is not None, format="csr", block=block, nm=nm,
                    device=w.device, dtype=w.dtype)
        layer.backend = backend
        wd = w.detach()
        if format == "auto":
            format, layer.auto_report = layer._choose(wd, keep, linear.bias, batch_sizes)
        layer._set_layout(format, layer._build(format, wd, keep))
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def _candidates(self, keep) -> list:
        c = ["dense", "csr", "bitmask"]
        if _is_nm(keep, *self.nm):
            c.append("nm")
        if _block_density(keep, self.block) <= 0.5:
            c.append("bsr")
        return c

    @torch.no_grad()
    def _choose(self, w, keep, bias, batch_sizes, rounds=5):
        """(format, {format: {batch: seconds}}). The candidates are timed in
        alternation, best of ``rounds`` each, so a drift of the machine's
        speed hits all of them alike."""
        b = bias.detach() if bias is not None else None
        sync = torch.cuda.synchronize if w.device.type == "cuda" else (lambda: None)
        calls = {}
        for fmt in self._candidates(keep):
            t = self._build(fmt, w, keep)
            calls[fmt] = ((lambda x, v=t["values"]: F.linear(x, v, b)) if fmt == "dense" else
                          (lambda x, f=fmt, t=t: linear(f, x, t, b, self.out_features,
                                                        self.backend)))
        report = {f: {} for f in calls}
        for bs in batch_sizes:
            x = torch.randn(bs, self.in_features, dtype=w.dtype, device=w.device)
            best = dict.fromkeys(calls, math.inf)
            for call in calls.values():
                call(x)
            for _ in range(rounds):
                for f, call in calls.items():
                    sync()
                    t0 = time.perf_counter()
                    call(x)
                    sync()
                    best[f] = min(best[f], time.perf_counter() - t0)
            for f in calls:
                report[f][bs] = best[f]
        # Only layouts at least as fast as dense at every measured batch
        # qualify; among those the lowest geometric mean wins.
        ratio = {f: {bs: t / report["dense"][bs] for bs, t in r.items()} for f, r in report.items()}
        ok = [f for f, r in ratio.items() if max(r.values()) <= 1.0]
        return min(ok, key=lambda f: (sum(math.log(v) for v in ratio[f].values()), f != "dense")), \
            report

    # -- forward -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features, self.values.dtype, self.values.device, "SparseLinear")
        if self.format == "dense":
            w = self.values
            if torch.is_grad_enabled() and w.requires_grad:
                w = _KeepPruned.apply(w, self.mask)
            return F.linear(x, w, self.bias)
        _, ptr, idx = self._fields(self.format)
        args = (x, self.values, getattr(self, ptr), getattr(self, idx), self.bias, self.format,
                self.out_features, self.backend)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.ops.pyopt.sparse_linear(*args)
        # inference in eager mode: the op's body without its dispatch (~20 us a call)
        return linear_nd(*args)

    def extra_repr(self) -> str:
        total = self.out_features * self.in_features
        dens = self.nnz / total if total else 0.0
        extra = {"nm": f", n:m={self.nm[0]}:{self.nm[1]}",
                 "bsr": f", block={tuple(self.values.shape[1:])}"}.get(self.format, "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}{extra}, density={dens:.3f}")

    # -- state_dict ----------------------------------------------------------
    def get_extra_state(self):
        return {"format": self.format, "shape": (self.out_features, self.in_features),
                "nm": self.nm, "version": 1}

    def set_extra_state(self, state):
        pass  # applied in _load_from_state_dict, before the tensors are copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict) and "format" in extra:
            fmt, shape = extra["format"], tuple(extra.get("shape", ()))
            if shape != (self.out_features, self.in_features):
                raise ValueError(f"SparseLinear ({prefix or 'root'}): checkpoint weight shape "
                                 f"{shape} != ({self.out_features}, {self.in_features})")
            names = self._fields(fmt) if fmt in LAYOUTS[1:] else ()
            new = {f: state_dict.get(prefix + f) for f in names}
            if fmt not in LAYOUTS[1:] or any(v is None for v in new.values()):
                raise ValueError(f"SparseLinear ({prefix or 'root'}): checkpoint has format "
                                 f"{fmt!r} but not all of its tensors {names}")
            if fmt == "dense":
                if tuple(new["values"].shape) != shape or new["mask"].dtype is not torch.bool:
                    raise ValueError(f"SparseLinear ({prefix or 'root'}): bad dense layout")
            else:
                formats.validate(fmt, new, shape, nm=tuple(extra.get("nm", self.nm)),
                                 where=f"SparseLinear ({prefix or 'root'})")
            self.nm = tuple(extra.get("nm", self.nm))
            dev, dt = self.values.device, self.values.dtype
            self._set_layout(fmt, {f: torch.empty_like(v, device=dev,
                                                       dtype=dt if f == "values" else v.dtype)
                                   for f, v in new.items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def sparsify_(model: nn.Module, filter_fn=None, *, format: str = "auto", masks: dict | None = None,
              **kwargs) -> nn.Module:
    """Replace pruned nn.Linear layers of ``model`` by SparseLinear, in place.

    ``filter_fn(module, fqn) -> bool`` picks layers (default: every nn.Linear).
    ``masks`` maps module names to keep-masks (what pyopt.prune returns);
    without one a layer uses the mask pyopt.prune recorded on it, else its
    nonzeros. Other keyword arguments go to :meth:`SparseLinear.from_dense`.
    Returns ``model`` (or the replacement when ``model`` itself is a Linear).
    """
    if isinstance(model, nn.Linear) and not isinstance(model, SparseLinear):
        if filter_fn is None or filter_fn(model, ""):
            return SparseLinear.from_dense(model, (masks or {}).get(""), format, **kwargs)
        return model
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and (filter_fn is None or filter_fn(mod, name))]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseLinear.from_dense(mod, (masks or {}).get(name), format,
                                                        **kwargs))
    return model
