"""pyopt.amp.GradScaler: torch.amp.GradScaler with a native CPU inf-check.

torch.amp.GradScaler works unchanged with pyopt's optimizers (they implement
torch's fused-optimizer protocol, ``grad_scale``/``found_inf``). Before such
an optimizer steps, GradScaler still scans every grad for inf/NaN with
``torch._amp_foreach_non_finite_check_and_unscale_``, which on CPU writes
every grad back even when it only checks. This subclass does that scan (and
``unscale_``) with one multi-threaded native pass per dtype that reads the
grads, and writes them only when it really unscales. Everything else is
torch's GradScaler.
"""
from __future__ import annotations

import torch

from . import _backends, _checks

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """Drop-in for ``torch.amp.GradScaler`` (same arguments and behaviour)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        native = _backends.availability("native", "cpu")[0]
        ours, rest = {}, False
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if not allow_fp16 and g.dtype == torch.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")
                if (native and g.device.type == "cpu" and g.layout is torch.strided
                        and g.dtype in _checks.DTYPE_CODES and _checks.is_dense(g)):
                    ours.setdefault(g.dtype, []).append(g)
                else:
                    rest = True
        if rest or inv_scale.device.type != "cpu" or found_inf.device.type != "cpu":
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        import numpy as np
        mod = _backends.cpu_module()
        coef = float(inv_scale.item())
        with torch.no_grad():
            for dt, gs in ours.items():
                table = np.array([(g.data_ptr(), g.numel()) for g in gs],
                                 dtype=np.int64).reshape(-1, 2)
                # norm 3: NaN exactly when some grad is inf or NaN
                m = mod.grad_norm(table.ctypes.data, len(gs), _checks.DTYPE_CODES[dt], 3, coef,
                                  torch.get_num_threads())
                if m != m:
                    found_inf.fill_(1.0)
        return {found_inf.device: found_inf}
