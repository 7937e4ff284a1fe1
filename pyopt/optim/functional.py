"""Functional optimizer steps on explicit tensor lists (no caching).

These validate everything on every call, so they suit one-off use,
``torch.compile`` (through the ``pyopt::`` custom ops) and tests; the optimizer
classes use cached address tables for speed.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _backends, _checks
from .adam import run_adam


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1,
         beta2, eps, weight_decay, amsgrad, maximize, decoupled=False, backend=None) -> None:
    """Fused Adam/AdamW step over lists, updating params and state in place.

    ``state_steps`` are 0-d float32 CPU tensors (torch's default step), one per
    param, incremented by the step. ``max_exp_avg_sqs`` is empty unless amsgrad.
    """
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "state_steps": state_steps}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"adam: {name} has {len(lst)} tensors, params has {n}")
    _checks.adam_hyper(lr, (beta1, beta2), eps, weight_decay)
    if n == 0:
        return
    requested = _backends.requested(backend)
    device = params[0].device
    buckets: dict = {}
    for i, p in enumerate(params):
        where = f"params[{i}]"
        _checks.param(p, where)
        _checks.grad(p, grads[i], where, "Adam")
        if p.device != device:
            raise ValueError(f"adam: all params must be on one device, got {device} and {p.device}")
        states = [exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else [])
        for s in states:
            if s.dtype != p.dtype or s.shape != p.shape or s.device != p.device or \
                    s.stride() != p.stride():
                raise ValueError(f"adam: state for {where} must match the param's dtype, "
                                 "shape, device and strides")
        st = state_steps[i]
        if st.device.type != "cpu" or st.dtype != torch.float32 or st.numel() != 1:
            raise ValueError(f"adam: state_steps[{i}] must be a float32 CPU scalar tensor")
        buckets.setdefault(p.dtype, []).append(i)
    backend_name = _backends.resolve(requested, device.type)
    lr = _checks.scalar(lr, "lr")
    for idx in buckets.values():
        sel = lambda lst: [lst[i] for i in idx]  # noqa: E731
        ps, gs, ms, vs, ss = (sel(params), sel(grads), sel(exp_avgs), sel(exp_avg_sqs),
                              sel(state_steps))
        vms = sel(max_exp_avg_sqs) if amsgrad else []
        table = np.zeros((len(idx), 7), dtype=np.int64)
        for r, (p, g, m, v, s) in enumerate(zip(ps, gs, ms, vs, ss)):
            table[r] = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                        vms[r].data_ptr() if amsgrad else 0, s.data_ptr(), p.numel())
        run_adam(backend_name, None, ps, gs, ms, vs, vms, ss, table, lr=lr, beta1=float(beta1),
                 beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
                 amsgrad=bool(amsgrad), maximize=bool(maximize), decoupled=bool(decoupled))
