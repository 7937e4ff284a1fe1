"""Fused SGD: a drop-in replacement for torch.optim.SGD."""
from __future__ import annotations

import torch

from .. import _checks
from ._base import FusedOptimizer, launch


def _check_hyper(lr, momentum, dampening, weight_decay, nesterov):
    lr_f = _checks.scalar(lr, "lr")
    if not 0.0 <= lr_f:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def run_sgd(backend, params, grads, bufs, table, *, lr, momentum, dampening, weight_decay,
            nesterov, maximize, grad_inv_scale=1.0, device_inputs=None):
    """Call one backend on already-validated tensors of one (device, dtype)."""
    args = (lr, momentum, dampening, weight_decay, nesterov, maximize,
            _checks.DTYPE_CODES[params[0].dtype])
    if not launch("sgd", backend, params, grads, table, args, grad_inv_scale, device_inputs):
        from .._reference.optim import sgd_step
        sgd_step(params, grads, bufs, table[:, 3].tolist(), lr=lr, momentum=momentum,
                 dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize)


class SGD(FusedOptimizer):
    """Fused SGD with torch.optim.SGD's arguments, defaults and state_dict.

    The momentum buffer follows torch: none while momentum is 0, and on its
    first step it is a copy of the (decayed) gradient. ``foreach`` and
    ``fused`` are accepted and ignored; ``differentiable=True`` raises.
    Extra keyword-only arguments ``backend`` and ``master_weights`` as for
    :class:`pyopt.optim.Adam`.
    """

    STATE_KEYS = ("momentum_buffer",)
    HAS_STEP = False
    _NAME = "SGD"

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, master_weights=False, backend=None):
        _check_hyper(lr, momentum, dampening, weight_decay, nesterov)
        if differentiable:
            raise ValueError("differentiable=True is not supported by pyopt's fused kernels; "
                             "use torch.optim for differentiable optimizer steps")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=differentiable, fused=fused)
        self._fresh: set = set()
        super().__init__(params, defaults, backend, master_weights)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_fresh", set())
        for group in self.param_groups:
            for k, v in (("nesterov", False), ("maximize", False), ("foreach", None),
                         ("differentiable", False), ("fused", False)):
                group.setdefault(k, v)

    def _plan_flags(self, group):
        return group["momentum"] != 0

    def _check_group(self, group):
        _check_hyper(group["lr"], group["momentum"], group["dampening"],
                     group["weight_decay"], group["nesterov"])

    def _init_state(self, p, st, group):
        pass  # torch keeps no SGD state until momentum creates a buffer

    def _normalize_state(self, p, st, group):
        if group["momentum"] != 0 and st.get("momentum_buffer") is None:
            # zeros, not empty: if the step never ran, the buffer is still sane
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._fresh.add(id(st["momentum_buffer"]))
        super()._normalize_state(p, st, group)

    def _extra_column(self, st) -> int:
        """Column 3: 1 while the buffer is new (it becomes a copy of the gradient)."""
        return int(id(st.get("momentum_buffer")) in self._fresh)

    def _run(self, b, ps, gs, group, grad_inv_scale, table, amp=None):
        self._fresh.clear()
        bufs = [s.get("momentum_buffer") for s in b.states] if b.backend == "torch" else []
        lr, dev = self._device_inputs(b, group, amp)
        run_sgd(b.backend, ps, gs, bufs, table, lr=lr,
                momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]), grad_inv_scale=grad_inv_scale,
                device_inputs=dev)
        b.table[:, 3] = 0

    def _run_op(self, group, ps, gs):
        from .. import _ops  # noqa: F401  (registers torch.ops.pyopt)
        kw = dict(lr=float(group["lr"]), momentum=float(group["momentum"]),
                  dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
                  nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))
        if kw["momentum"] == 0:
            torch.ops.pyopt.sgd_step_(ps, gs, [], first_step=False, **kw)
            return
        new = [i for i, p in enumerate(ps) if self.state[p].get("momentum_buffer") is None]
        for i in new:
            self.state[ps[i]]["momentum_buffer"] = torch.zeros_like(
                ps[i], memory_format=torch.preserve_format)
        old = [i for i in range(len(ps)) if i not in set(new)]
        for idx, first in ((new, True), (old, False)):
            if idx:
                torch.ops.pyopt.sgd_step_(
                    [ps[i] for i in idx], [gs[i] for i in idx],
                    [self.state[ps[i]]["momentum_buffer"] for i in idx], first_step=first, **kw)
