"""One quantized linear call on a chosen backend: ``linear(x2d, t, bias, bits, act)``.

The caller (QuantLinear, or the ``pyopt::quant_linear`` op) has validated the
layout tensors once (``formats.validate``) and the input on this call
(``check_input``); this module only routes addresses to a backend.
"""
from __future__ import annotations

import torch

from .. import _backends
from .._checks import DTYPE_CODES

ACTS = ("float", "int8")
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def qtype_code(qweight: torch.Tensor, bits: int) -> int:
    """0 int8, 1 uint8, 2 packed uint4 (csrc/cpu/quant_cpu.h QuantType)."""
    if bits == 4:
        return 2
    return 0 if qweight.dtype is torch.int8 else 1


def check_input(x, in_features: int, dtype, device, where: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: input must be a Tensor, got {type(x).__name__}")
    if x.layout is not torch.strided or x.is_quantized:
        raise TypeError(f"{where}: {x.layout if x.layout is not torch.strided else x.dtype} "
                        "input is not supported; pass a dense float tensor")
    if x.dtype not in _FLOAT:
        raise TypeError(f"{where}: input dtype {x.dtype} is not supported; expected float32, "
                        "bfloat16 or float16")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{where}: input dtype {x.dtype} does not match the layer dtype {dtype} "
                        "(cast the input or the layer, as F.linear requires)")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{where}: input's last dimension must be in_features={in_features}, "
                         f"got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{where}: input on {x.device} but the weight is on {device}")


def linear(x: torch.Tensor, t: dict, bias, bits: int, act: str = "float",
           backend: str | None = None) -> torch.Tensor:
    """out [B, N] = x [B, K] @ dequant(W).T + bias, W held by the layout ``t``."""
    name = _backends.resolve(_backends.requested(backend), x.device.type)
    x = x.contiguous()
    qw, scale, offset = t["qweight"], t["scale"], t.get("offset")
    if name == "torch":
        from .._reference.quant import linear as ref
        return ref(x, qw, scale, offset, bias, bits, act)
    if name == "numba":
        from .._numba.quant import linear as nb
        return nb(x, qw, scale, offset, bias, bits, act)
    B, K = x.shape
    N, G = scale.shape
    out = torch.empty(B, N, dtype=x.dtype, device=x.device)
    if B == 0 or N == 0:
        return out
    args = (out.data_ptr(), x.data_ptr(), qw.data_ptr(), qtype_code(qw, bits), scale.data_ptr(),
            offset.data_ptr() if offset is not None else 0,
            bias.data_ptr() if bias is not None else 0, B, N, K, G, ACTS.index(act),
            DTYPE_CODES[x.dtype])
    if x.device.type == "cpu":
        _backends.cpu_module().quant_linear(*args, torch.get_num_threads())
        return out
    mod = _backends.cuda_module()
    ws = (torch.empty(B, K, dtype=torch.int8, device=x.device),
          torch.empty(B, dtype=torch.float32, device=x.device),
          torch.empty(B, G, dtype=torch.int32, device=x.device)) if act == "int8" else ()
    with torch.cuda.device(x.device):
        mod.quant_linear(*args, *(w.data_ptr() for w in ws) if ws else (0, 0, 0),
                         torch.cuda.current_stream(x.device).cuda_stream)
    return out


def linear_nd(x, qweight, scale, offset, bias, bits: int, act: str, backend=None):
    """x [..., K] -> [..., N]: the body of the ``pyopt::quant_linear`` op."""
    t = {"qweight": qweight, "scale": scale, "offset": offset}
    if x.dim() == 2:
        return linear(x, t, bias, bits, act, backend)
    out = linear(x.reshape(-1, x.shape[-1]), t, bias, bits, act, backend)
    return out.reshape(*x.shape[:-1], scale.shape[0])
