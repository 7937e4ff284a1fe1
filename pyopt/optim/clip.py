"""clip_grad_norm_: torch.nn.utils.clip_grad_norm_ in two multi-tensor native
passes (the norm, then the scaling only when it clips)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import _backends, _checks

_NATIVE_NORMS = {1.0: 1, 2.0: 2, math.inf: 0}


def _native_reason(grads, norm_type):
    """None when the native CPU path can run, else why not (it falls back to torch)."""
    if float(norm_type) not in _NATIVE_NORMS:
        return f"norm_type={norm_type} (native: 1, 2, inf)"
    if not _backends.availability("native", "cpu")[0]:
        return _backends.availability("native", "cpu")[1]
    for g in grads:
        if g.device.type != "cpu":
            return "grads on a non-CPU device"
        if g.layout is not torch.strided or g.dtype not in _checks.DTYPE_CODES:
            return f"{g.layout} / {g.dtype} grads"
        if not _checks.is_dense(g):
            return "a grad with gaps in memory"
    return None


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    """Drop-in for ``torch.nn.utils.clip_grad_norm_``: same arguments, same
    return value (the total norm as a tensor) and the same errors.

    On CPU with norm_type 1, 2 or inf, the norm is one native pass over all
    grads (float accumulation per block, double across blocks) and the grads
    are scaled in a second pass, skipped when the clip coefficient is 1 (x * 1
    changes nothing). Other devices and norm types call torch's own function
    (``foreach`` is passed to it).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    if _native_reason(grads, norm_type) is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type,
                                              error_if_nonfinite=error_if_nonfinite,
                                              foreach=foreach)
    if norm_type == math.inf and any(g.numel() == 0 for g in grads):
        raise RuntimeError("clip_grad_norm_: cannot compute the infinity norm of an empty "
                           "gradient because the operation does not have an identity "
                           "(as torch's _foreach_norm)")
    mod = _backends.cpu_module()
    nthreads = torch.get_num_threads()
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    tables, partials = {}, []
    for dt, gs in by_dtype.items():
        table = np.array([(g.data_ptr(), g.numel()) for g in gs], dtype=np.int64).reshape(-1, 2)
        tables[dt] = table
        partials.append(mod.grad_norm(table.ctypes.data, len(gs), _checks.DTYPE_CODES[dt],
                                      _NATIVE_NORMS[norm_type], 1.0, nthreads))
    if norm_type == math.inf:
        total = math.nan if any(r != r for r in partials) else max(partials)
    else:
        total = sum(partials)
    if norm_type == 2.0:
        total = math.sqrt(total)
    # torch returns the norm in the grads' dtype (the first grad's, for a mix)
    total_norm = torch.tensor(total, dtype=grads[0].dtype)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`")
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    coef = float(clip_coef)
    if coef != 1.0:
        for dt, gs in by_dtype.items():
            mod.scale_grads(tables[dt].ctypes.data, len(gs), _checks.DTYPE_CODES[dt], coef,
                            nthreads)
    return total_norm
