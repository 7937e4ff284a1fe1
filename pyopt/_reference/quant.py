"""Pure-torch quantized linear: the readable spec of every backend's kernel
(layout and math in pyopt/quant/formats.py) and the ``torch`` backend.

``act="float"`` (weight-only): W is dequantized to float32 and multiplied with
x in float32; the result is rounded once to x's dtype, as the native kernels do.
``act="int8"`` (W8A8, W4A8): x is quantized per token and the group dot products
are exact integer sums (computed here in float64, exact below 2**53).
"""
from __future__ import annotations

import torch

from ..quant.formats import dequantize, quantize_per_token, unpack_int4


def _finish(acc, bias, dtype):
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(dtype)


def linear(x, qweight, scale, offset, bias, bits: int, act: str = "float") -> torch.Tensor:
    """x [B, K] -> [B, N]."""
    b, k = x.shape
    t = {"qweight": qweight, "scale": scale, "offset": offset}
    if act == "float":
        w = dequantize(t, bits, k)
        return _finish(x.float() @ w.t(), bias, x.dtype)
    qx, sx = quantize_per_token(x)
    q = unpack_int4(qweight, k) if bits == 4 else qweight
    n, g = scale.shape
    gs = k // g
    qxd = qx.double().reshape(b, g, gs)
    dots = torch.einsum("bgk,ngk->bng", qxd, q.double().reshape(n, g, gs))
    acc = (dots * scale.double()).sum(-1)
    if offset is not None:
        acc = acc + qxd.sum(-1) @ offset.double().t()        # xs [B, G] @ offset.T
    return _finish((acc * sx.double()[:, None]).float(), bias, x.dtype)
