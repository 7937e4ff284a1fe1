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
        table = np.zeros((len(idx), 9), dtype=np.int64)   # no mask, no master
        for r, (p, g, m, v, s) in enumerate(zip(ps, gs, ms, vs, ss)):
            table[r, :7] = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                            vms[r].data_ptr() if amsgrad else 0, s.data_ptr(), p.numel())
        run_adam(backend_name, ps, gs, ms, vs, vms, ss, table, lr=lr, beta1=float(beta1),
                 beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
                 amsgrad=bool(amsgrad), maximize=bool(maximize), decoupled=bool(decoupled))


def _validated_buckets(name, params, grads, states, steps=None):
    """Checks params, grads, state lists (each a list like params, or None
    where unused) and steps; returns ({dtype: indices}, device)."""
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"{name}: grads has {len(grads)} tensors, params has {n}")
    for key, lst in states.items():
        if lst is not None and len(lst) != n:
            raise ValueError(f"{name}: {key} has {len(lst)} tensors, params has {n}")
    if steps is not None and len(steps) != n:
        raise ValueError(f"{name}: state_steps has {len(steps)} tensors, params has {n}")
    device = params[0].device if n else None
    buckets: dict = {}
    for i, p in enumerate(params):
        where = f"params[{i}]"
        _checks.param(p, where)
        _checks.grad(p, grads[i], where, name)
        if p.device != device:
            raise ValueError(f"{name}: all params must be on one device, got {device} and {p.device}")
        for key, lst in states.items():
            s = None if lst is None else lst[i]
            if s is not None and (s.dtype != p.dtype or s.shape != p.shape
                                  or s.device != p.device or s.stride() != p.stride()):
                raise ValueError(f"{name}: {key}[{i}] must match the param's dtype, shape, "
                                 "device and strides")
        if steps is not None:
            st = steps[i]
            if st.device.type != "cpu" or st.dtype != torch.float32 or st.numel() != 1:
                raise ValueError(f"{name}: state_steps[{i}] must be a float32 CPU scalar tensor")
        buckets.setdefault(p.dtype, []).append(i)
    return buckets, device


def sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
        maximize, first_step=False, backend=None) -> None:
    """Fused SGD step over lists, in place. ``momentum_buffers`` holds one
    tensor per param when momentum != 0 (else it may be empty);
    ``first_step=True`` makes each buffer a copy of the gradient, as torch
    does when a buffer does not exist yet."""
    from .sgd import _check_hyper, run_sgd
    _check_hyper(lr, momentum, dampening, weight_decay, nesterov)
    if not params:
        return
    bufs = momentum_buffers if momentum != 0 else None
    buckets, device = _validated_buckets("SGD", params, grads, {"momentum_buffers": bufs})
    backend_name = _backends.resolve(_backends.requested(backend), device.type)
    for idx in buckets.values():
        table = np.zeros((len(idx), 7), dtype=np.int64)
        for r, i in enumerate(idx):
            table[r, :5] = (params[i].data_ptr(), grads[i].data_ptr(),
                        bufs[i].data_ptr() if bufs else 0, int(first_step), params[i].numel())
        run_sgd(backend_name, [params[i] for i in idx], [grads[i] for i in idx],
                [bufs[i] for i in idx] if bufs else [], table, lr=_checks.scalar(lr, "lr"),
                momentum=float(momentum), dampening=float(dampening),
                weight_decay=float(weight_decay), nesterov=bool(nesterov),
                maximize=bool(maximize))


def rmsprop(params, grads, square_avgs, momentum_buffers, grad_avgs, state_steps, *, lr, alpha,
            eps, weight_decay, momentum, centered, maximize, backend=None) -> None:
    """Fused RMSprop step over lists, in place. ``momentum_buffers`` is used
    when momentum > 0 and ``grad_avgs`` when centered (else they may be empty)."""
    from .rmsprop import _check_hyper, run_rmsprop
    _check_hyper(lr, alpha, eps, weight_decay, momentum)
    if not params:
        return
    bufs = momentum_buffers if momentum > 0 else None
    gavg = grad_avgs if centered else None
    buckets, device = _validated_buckets(
        "RMSprop", params, grads,
        {"square_avgs": square_avgs, "momentum_buffers": bufs, "grad_avgs": gavg}, state_steps)
    backend_name = _backends.resolve(_backends.requested(backend), device.type)
    for idx in buckets.values():
        table = np.zeros((len(idx), 9), dtype=np.int64)
        for r, i in enumerate(idx):
            table[r, :7] = (params[i].data_ptr(), grads[i].data_ptr(), square_avgs[i].data_ptr(),
                        bufs[i].data_ptr() if bufs else 0, gavg[i].data_ptr() if gavg else 0,
                        state_steps[i].data_ptr(), params[i].numel())
        sel = lambda lst: [lst[i] for i in idx] if lst else []  # noqa: E731
        run_rmsprop(backend_name, sel(params), sel(grads),
                    (sel(square_avgs), sel(bufs), sel(gavg)), sel(state_steps), table,
                    lr=_checks.scalar(lr, "lr"), alpha=float(alpha), eps=float(eps),
                    weight_decay=float(weight_decay), momentum=float(momentum),
                    centered=bool(centered), maximize=bool(maximize))
