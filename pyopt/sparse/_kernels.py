"""One sparse linear call on a chosen backend: ``linear(fmt, x2d, t, bias, n)``.

The caller (SparseLinear, or the ``pyopt::sparse_linear`` op) has validated
the format tensors once (``formats.validate``) and the input on this call
(``check_input``); this module only routes addresses to a backend.
"""
from __future__ import annotations

import torch

from .. import _backends
from .._checks import DTYPE_CODES
from .formats import FIELDS

_NATIVE_CODE = {"csr": 0, "bitmask": 1, "nm": 1, "bsr": 2}


def check_input(x: torch.Tensor, in_features: int, dtype: torch.dtype, device: torch.device,
                where: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: input must be a Tensor, got {type(x).__name__}")
    if x.layout is not torch.strided:
        raise TypeError(f"{where}: {x.layout} input is not supported; pass a dense tensor")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{where}: input's last dimension must be in_features={in_features}, "
                         f"got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{where}: input dtype {x.dtype} does not match the weight dtype {dtype} "
                        "(F.linear requires them to match; cast the input or the layer)")
    if x.device != device:
        raise ValueError(f"{where}: input on {x.device} but the weight is on {device}")


def linear(fmt: str, x: torch.Tensor, t: dict, bias, n: int, backend: str | None = None):
    """out [B, n] = x [B, K] @ W.T + bias, W held by the format tensors ``t``."""
    name = _backends.resolve(_backends.requested(backend), x.device.type)
    x = x.contiguous()
    if name == "torch":
        from .._reference.sparse import LINEAR
        return LINEAR[fmt](x, *(t[f] for f in FIELDS[fmt]), bias, n)
    if name == "numba":
        from .._numba.sparse import LINEAR
        return LINEAR[fmt](x, *(t[f] for f in FIELDS[fmt]), bias, n)
    B, K = x.shape
    out = torch.empty(B, n, dtype=x.dtype, device=x.device)
    if B == 0 or n == 0:
        return out
    values, ptr, idx = (t[f] for f in FIELDS[fmt])
    bh, bw = (values.shape[1], values.shape[2]) if fmt == "bsr" else (1, 1)
    bits = 16 if idx.dtype is torch.int16 else 32
    b_addr = bias.data_ptr() if bias is not None else 0
    if x.device.type == "cpu":
        _backends.cpu_module().sparse_linear(
            _NATIVE_CODE[fmt], out.data_ptr(), x.data_ptr(), values.data_ptr(), ptr.data_ptr(),
            idx.data_ptr(), bits, b_addr, B, n, K, bh, bw, DTYPE_CODES[x.dtype],
            torch.get_num_threads())
        return out
    mod = _backends.cuda_module()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):
        if fmt == "csr":
            mod.sparse_csr_linear(out.data_ptr(), x.data_ptr(), values.data_ptr(), ptr.data_ptr(),
                                  idx.data_ptr(), bits, b_addr, B, n, K, DTYPE_CODES[x.dtype],
                                  stream)
        elif fmt == "bsr":
            mod.sparse_bsr_linear(out.data_ptr(), x.data_ptr(), values.data_ptr(), ptr.data_ptr(),
                                  idx.data_ptr(), b_addr, B, n, K, bh, bw, DTYPE_CODES[x.dtype],
                                  stream)
        else:
            mod.sparse_bitmask_linear(out.data_ptr(), x.data_ptr(), values.data_ptr(),
                                      ptr.data_ptr(), idx.data_ptr(), b_addr, B, n, K,
                                      DTYPE_CODES[x.dtype], stream)
    return out


def linear_nd(x, values, ptr, idx, bias, fmt: str, n: int, backend=None):
    """x [..., K] -> [..., n]: the body of the ``pyopt::sparse_linear`` op."""
    out = linear(fmt, x.reshape(-1, x.shape[-1]), dict(zip(FIELDS[fmt], (values, ptr, idx))),
                 bias, n, backend)
    return out.reshape(*x.shape[:-1], n)
