"""Activation-aware weight scaling (AWQ, Lin et al. 2023) for quantized Linears.

Input channels that carry large activations matter more to the output than
their weights' size says. AWQ multiplies weight column j by s_j = mean|x_j|^a
before quantizing (so those columns lose less to rounding) and divides the
input by s_j at run time, which leaves the float product unchanged. The
exponent a is searched per layer on the calibration activations: the one whose
quantized output is closest to the float output wins. a = 0 is plain
round-to-nearest, so on the calibration data the result is never worse.
"""
from __future__ import annotations

import torch
from torch import nn

from . import formats

__all__ = ["awq_scales"]

ALPHAS = tuple(i / 10 for i in range(11))
MAX_ROWS = 1024     # calibration rows kept per layer for the search


def _collect(model, calib, layers):
    """Per layer: (sum |x_j| over tokens, token count, up to MAX_ROWS rows)."""
    from ..prune import _run_calib
    stats = {name: [None, 0, []] for name, _ in layers}

    def hook_for(name):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()
            x2 = x.reshape(-1, x.shape[-1]).float()
            st = stats[name]
            a = x2.abs().sum(0, dtype=torch.float64)
            st[0] = a if st[0] is None else st[0] + a
            st[1] += x2.shape[0]
            kept = sum(r.shape[0] for r in st[2])
            if kept < MAX_ROWS:
                st[2].append(x2[:MAX_ROWS - kept].clone())
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, m in layers]
    try:
        with torch.no_grad():
            _run_calib(model, calib)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, st in stats.items() if st[0] is None]
    if missing:
        raise ValueError(f"quantize_: {len(missing)} selected layer(s) saw no calibration input "
                         f"({', '.join(map(repr, missing[:5]))}); check calib or exclude them "
                         "with filter_fn")
    return stats


@torch.no_grad()
def _search(linear: nn.Linear, mean_abs: torch.Tensor, x: torch.Tensor, cfg):
    from .._reference.quant import linear as ref_linear
    w = linear.weight.detach().float()
    x = x.to(w.device)
    want = x @ w.t()
    qargs = {"bits": cfg.bits, "scheme": cfg.scheme, "granularity": cfg.granularity,
             "group_size": cfg.group_size}
    best, best_err = None, None
    m = mean_abs.float().to(w.device).clamp(min=1e-8)
    for a in ALPHAS:
        if a == 0:
            s = None
        else:
            s = m.pow(a)
            s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
        t = formats.quantize(w * s if s is not None else w, **qargs)
        xin = x / s if s is not None else x
        got = ref_linear(xin, t["qweight"], t["scale"], t["offset"], None, cfg.bits, cfg.act)
        err = (got - want).square().mean().item()
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


def awq_scales(model: nn.Module, calib, cfg, select) -> dict:
    """{layer name: input_scale or None} for the nn.Linear layers of model
    that ``select(module, name)`` picks, from calibration batches ``calib``
    (an iterable of model inputs, or a callable that runs the model)."""
    layers = [(name, mod) for name, mod in model.named_modules()
              if type(mod) is nn.Linear and select(mod, name)]
    stats = _collect(model, calib, layers)
    out = {}
    for name, mod in layers:
        total, count, rows = stats[name]
        s = _search(mod, total / count, torch.cat(rows), cfg)
        if s is not None:
            out[name] = s
    return out
