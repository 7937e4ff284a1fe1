"""Fused Adam and AdamW: drop-in replacements for torch.optim.Adam/AdamW."""
from __future__ import annotations

import torch

from .. import _checks
from ._base import FusedOptimizer, launch

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _flag_check(foreach, differentiable, fused):
    # foreach/fused choose an implementation in torch; pyopt always runs its
    # own fused multi-tensor kernel, so both are accepted and stored as given.
    del foreach, fused
    if differentiable:
        raise ValueError("differentiable=True is not supported by pyopt's fused kernels; "
                         "use torch.optim for differentiable optimizer steps")


def run_adam(backend, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
             steps, table, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
             decoupled, grad_inv_scale=1.0, device_inputs=None):
    """Call one backend on already-validated tensors of one (device, dtype)."""
    code = _checks.DTYPE_CODES[params[0].dtype]
    args = (lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, code, code)
    if not launch("adam", backend, params, grads, table, args, grad_inv_scale, device_inputs):
        from .._reference.optim import adam_step
        adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr,
                  beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                  amsgrad=amsgrad, maximize=maximize, decoupled=decoupled)


class Adam(FusedOptimizer):
    """Fused Adam with torch.optim.Adam's arguments, defaults and state_dict.

    One native call per (param group, device, dtype) per step. Extra
    keyword-only arguments: ``backend`` ('auto', 'native', 'numba', 'torch';
    default from ``PYOPT_BACKEND``, else 'auto') and ``master_weights``
    (bf16/fp16 params keep an fp32 copy and fp32 state, updated in fp32 and
    rounded into the param in the same kernel; a no-op for fp32 params).

    torch flags: ``foreach`` and ``fused`` are accepted and ignored (the step
    is always fused); ``differentiable=True`` raises. ``capturable=True``: on
    CUDA the step counts stay on the device, and lr (a float32 CUDA tensor or
    a float), GradScaler's grad_scale and found_inf are read by the kernel, so
    ``optimizer.step()`` can be captured in a CUDA graph (native CUDA backend).
    On the CPU it changes nothing, as with torch's fused CPU Adam.
    """

    STATE_KEYS = _STATE_KEYS
    _NAME = "Adam"
    _DECOUPLED = False
    _CPU_CAPTURABLE = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 master_weights=False, backend=None):
        _checks.adam_hyper(lr, betas, eps, weight_decay)
        _flag_check(foreach, differentiable, fused)
        if isinstance(betas[0], torch.Tensor) or isinstance(betas[1], torch.Tensor):
            betas = (_checks.scalar(betas[0], "betas[0]"), _checks.scalar(betas[1], "betas[1]"))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=bool(decoupled_weight_decay or self._DECOUPLED))
        super().__init__(params, defaults, backend, master_weights)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in (("amsgrad", False), ("maximize", False), ("foreach", None),
                         ("capturable", False), ("differentiable", False), ("fused", None),
                         ("decoupled_weight_decay", self._DECOUPLED)):
                group.setdefault(k, v)
            if self._DECOUPLED:
                group["decoupled_weight_decay"] = True

    def _plan_flags(self, group):
        return bool(group["amsgrad"]), bool(group.get("capturable"))

    def _check_group(self, group):
        _checks.adam_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                           read_device=False)
        _flag_check(None, group.get("differentiable"), None)

    def _init_state(self, p, st, group):
        st["step"] = self._new_step(p, group)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _normalize_state(self, p, st, group):
        if group["amsgrad"] and "max_exp_avg_sq" not in st:
            # amsgrad switched on after state existed: start its max at zero.
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        super()._normalize_state(p, st, group)

    def _run(self, b, ps, gs, group, grad_inv_scale, table, amp=None):
        amsgrad = bool(group["amsgrad"])
        beta1, beta2 = group["betas"]
        lists = ([], [], [])
        if b.backend == "torch":
            lists = ([s["exp_avg"] for s in b.states], [s["exp_avg_sq"] for s in b.states],
                     [s["max_exp_avg_sq"] for s in b.states] if amsgrad else [])
        lr, dev = self._device_inputs(b, group, amp)
        run_adam(b.backend, ps, gs, *lists, b.steps, table,
                 lr=lr, beta1=float(beta1), beta2=float(beta2),
                 eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                 amsgrad=amsgrad, maximize=bool(group["maximize"]),
                 decoupled=bool(group["decoupled_weight_decay"]), grad_inv_scale=grad_inv_scale,
                 device_inputs=dev)


    def _run_op(self, group, ps, gs):
        from .. import _ops  # noqa: F401  (registers torch.ops.pyopt)
        amsgrad = bool(group["amsgrad"])
        sts = [self.state[p] for p in ps]
        if amsgrad:
            for p, st in zip(ps, sts):
                if "max_exp_avg_sq" not in st:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        torch.ops.pyopt.adam_step_(
            ps, gs, [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts],
            [s["max_exp_avg_sq"] for s in sts] if amsgrad else [], [s["step"] for s in sts],
            float(lr), float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]), amsgrad, bool(group["maximize"]),
            bool(group["decoupled_weight_decay"]))


class AdamW(Adam):
    """Fused AdamW with torch.optim.AdamW's arguments, defaults
    (weight_decay=1e-2) and state_dict. See :class:`Adam` for the flags."""

    _NAME = "AdamW"
    _DECOUPLED = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, master_weights=False, backend=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights,
                         backend=backend)
