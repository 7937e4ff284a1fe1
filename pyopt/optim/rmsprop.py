"""Fused RMSprop: a drop-in replacement for torch.optim.RMSprop, including
centered and momentum together in one call per group."""
from __future__ import annotations

import torch

from .. import _checks
from ._base import FusedOptimizer, launch


def _check_hyper(lr, alpha, eps, weight_decay, momentum, read_device=True):
    lr_f = _checks.lr_value(lr, read_device)
    if not 0.0 <= lr_f:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= momentum:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= alpha:
        raise ValueError(f"Invalid alpha value: {alpha}")


def run_rmsprop(backend, params, grads, lists, steps, table, *, lr, alpha, eps, weight_decay,
                momentum, centered, maximize, grad_inv_scale=1.0, device_inputs=None):
    args = (lr, alpha, eps, weight_decay, momentum, centered, maximize,
            _checks.DTYPE_CODES[params[0].dtype])
    if not launch("rmsprop", backend, params, grads, table, args, grad_inv_scale, device_inputs):
        from .._reference.optim import rmsprop_step
        rmsprop_step(params, grads, *lists, steps, lr=lr, alpha=alpha, eps=eps,
                     weight_decay=weight_decay, momentum=momentum, centered=centered,
                     maximize=maximize)


class RMSprop(FusedOptimizer):
    """Fused RMSprop with torch.optim.RMSprop's arguments, defaults and
    state_dict. ``foreach`` is accepted and ignored; ``differentiable=True``
    raises. ``capturable=True`` needs CUDA params, as in torch: the step
    counts stay on the device and lr/grad_scale/found_inf are read by the
    kernel (see :class:`pyopt.optim.Adam`). Extra keyword-only argument
    ``backend``."""

    STATE_KEYS = ("square_avg", "momentum_buffer", "grad_avg")
    _NAME = "RMSprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, master_weights=False, backend=None):
        _check_hyper(lr, alpha, eps, weight_decay, momentum)
        if differentiable:
            raise ValueError("differentiable=True is not supported by pyopt's fused kernels; "
                             "use torch.optim for differentiable optimizer steps")
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable)
        super().__init__(params, defaults, backend, master_weights)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in (("momentum", 0), ("centered", False), ("foreach", None),
                         ("maximize", False), ("differentiable", False), ("capturable", False)):
                group.setdefault(k, v)

    def _plan_flags(self, group):
        return group["momentum"] > 0, bool(group["centered"]), bool(group.get("capturable"))

    def _check_group(self, group):
        _check_hyper(group["lr"], group["alpha"], group["eps"], group["weight_decay"],
                     group["momentum"], read_device=False)
        if group.get("differentiable"):
            raise ValueError("differentiable RMSprop is not supported by pyopt")

    def _init_state(self, p, st, group):
        st["step"] = self._new_step(p, group)
        st["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _normalize_state(self, p, st, group):
        # torch creates these at the first step only; switching momentum or
        # centered on later starts them at zero here instead of failing.
        if group["momentum"] > 0 and "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"] and "grad_avg" not in st:
            st["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        super()._normalize_state(p, st, group)

    def _run(self, b, ps, gs, group, grad_inv_scale, table, amp=None):
        momentum, centered = float(group["momentum"]), bool(group["centered"])
        lists = ([], [], [])
        if b.backend == "torch":
            lists = ([s["square_avg"] for s in b.states],
                     [s["momentum_buffer"] for s in b.states] if momentum > 0 else [],
                     [s["grad_avg"] for s in b.states] if centered else [])
        lr, dev = self._device_inputs(b, group, amp)
        run_rmsprop(b.backend, ps, gs, lists, b.steps, table,
                    lr=lr, alpha=float(group["alpha"]),
                    eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    momentum=momentum, centered=centered, maximize=bool(group["maximize"]),
                    grad_inv_scale=grad_inv_scale, device_inputs=dev)

    def _run_op(self, group, ps, gs):
        from .. import _ops  # noqa: F401  (registers torch.ops.pyopt)
        sts = [self.state[p] for p in ps]
        for p, st in zip(ps, sts):
            self._normalize_state(p, st, group)
        momentum, centered = float(group["momentum"]), bool(group["centered"])
        torch.ops.pyopt.rmsprop_step_(
            ps, gs, [s["square_avg"] for s in sts],
            [s["momentum_buffer"] for s in sts] if momentum > 0 else [],
            [s["grad_avg"] for s in sts] if centered else [], [s["step"] for s in sts],
            float(group["lr"]), float(group["alpha"]), float(group["eps"]),
            float(group["weight_decay"]), momentum, centered, bool(group["maximize"]))
