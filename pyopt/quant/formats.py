"""Quantized weight layouts and the quantization math, for ``x @ W.T + bias``
with W of shape [N, K] = [out, in].

A quantized weight is a dict of plain tensors (so it lives in a module's
buffers and state_dict). Every backend (``pyopt._C``, ``pyopt._C_cuda``,
``pyopt._numba.quant``, ``pyopt._reference.quant``) reads exactly this layout:

    qweight  int8  [N, K]     8-bit symmetric: signed q in [-128, 127]
             uint8 [N, K]     8-bit asymmetric: unsigned q in [0, 255]
             uint8 [N, K//2]  4-bit: unsigned nibbles q in [0, 15], packed (below)
    scale    float32 [N, G]   G = K // group_size groups along K (G = 1: per channel)
    offset   float32 [N, G]   or absent (8-bit symmetric only)

and dequantizes as ``W[n, k] = q[n, k] * scale[n, g] + offset[n, g]`` with
``g = k // group_size``, computed in float32 exactly in that order (a multiply
rounded, then an add rounded). Per-tensor quantization stores its one scale
repeated in every row, so kernels only ever see per-group scales.

Schemes (``quantize``):

* symmetric (absmax), as ``torch.ao``'s per-channel symmetric observer:
  ``qmin, qmax = -2**(b-1), 2**(b-1) - 1``, ``scale = max(absmax / ((qmax - qmin) / 2), eps)``
  (eps = float32 epsilon), ``q = clamp(round(w * (1 / scale)), qmin, qmax)``, round half to even.
  8-bit q is stored signed with no offset, so the integers are exactly
  ``torch.quantize_per_channel(w, scale, 0, 0, torch.qint8).int_repr()``. 4-bit q is
  stored as the unsigned nibble ``q + 8`` with ``offset = -8 * scale``.
* asymmetric (min-max): ``scale = (max - min) / (2**b - 1)`` (1 where max == min),
  ``q = clamp(round((w - min) * (1 / scale)), 0, 2**b - 1)``, ``offset = min``.

Packed 4-bit layout (``pack_int4``): K must be even. Along each row, every block
of 64 consecutive elements is 32 bytes; byte i of a block holds element i in
bits 0-3 and element i + 32 in bits 4-7, so one 32-byte load gives 32
consecutive weights from the low nibbles and the next 32 from the high ones.
A final block of t < 64 elements (t even) is t/2 bytes: byte i holds element i
(low) and element i + t/2 (high).

Activations for integer GEMMs (W8A8, W4A8; ``quantize_per_token``): per row b of
x, ``amax = max |x[b, :]|`` in float32, ``sx = amax / 127``, ``inv = 127 / amax``
(0 when amax is 0) and ``qx = clamp(round(x * inv), -127, 127)`` (a float32 multiply, then
round half to even), so every backend produces the same integers. A row with a
NaN or inf gets ``sx = NaN`` and an all-NaN output row, as F.linear would.
Then ``out[b, n] = bias[n] + sx[b] * sum_g (scale[n, g] * dot_g + offset[n, g] * xs_g)``
with the exact integer sums ``dot_g = sum_{k in g} qx[b, k] * q[n, k]`` and
``xs_g = sum_{k in g} qx[b, k]``.
"""
from __future__ import annotations

import torch

BITS = (4, 8)
SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("tensor", "channel", "group")
GROUP_SIZES = (32, 64, 128, 256)
FIELDS = ("qweight", "scale", "offset")
BLOCK = 64          # packed 4-bit block, elements
_EPS = torch.finfo(torch.float32).eps


def qrange(bits: int, scheme: str) -> tuple[int, int]:
    if scheme == "symmetric":
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def check_config(bits, scheme, granularity, group_size, k: int, where: str = "quantize") -> int:
    """Validate the quantization settings for rows of length k; returns the
    effective group size (k for per-channel and per-tensor)."""
    if bits not in BITS:
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"{where}: scheme must be 'symmetric' or 'asymmetric', got {scheme!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{where}: granularity must be one of {', '.join(GRANULARITIES)}, "
                         f"got {granularity!r}")
    if bits == 4 and k % 2:
        raise ValueError(f"{where}: 4-bit packing needs an even in_features, got {k}")
    if granularity != "group":
        return k
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{where}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{where}: group_size={group_size} does not divide in_features={k}")
    return group_size


def _float_weight(w, where):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{where}: expected a Tensor, got {type(w).__name__}")
    if w.is_quantized:
        raise TypeError(f"{where}: the weight is already quantized ({w.dtype}); "
                        "quantize the float weight")
    if not w.is_floating_point():
        raise TypeError(f"{where}: cannot quantize a {w.dtype} weight; expected a float weight")
    if w.dim() != 2:
        raise ValueError(f"{where}: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    return w.detach().float()


def _scales(w: torch.Tensor, bits: int, scheme: str, granularity: str, gs: int):
    """(scale, low) of shape [N, G]; low is min for asymmetric, else None."""
    n, k = w.shape
    if granularity == "tensor":
        wg = w.reshape(1, 1, -1)
    else:
        wg = w.reshape(n, k // gs, gs)
    qmin, qmax = qrange(bits, scheme)
    if scheme == "symmetric":
        amax = wg.abs().amax(-1)
        scale = torch.clamp(amax / ((qmax - qmin) / 2), min=_EPS)
        low = None
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        rng = hi - lo
        scale = torch.where(rng > 0, rng / (qmax - qmin), torch.ones_like(rng))
        low = lo
    if granularity == "tensor":
        scale = scale.expand(n, 1).contiguous()
        low = low.expand(n, 1).contiguous() if low is not None else None
    return scale, low


def quantize(w: torch.Tensor, bits: int = 8, scheme: str = "symmetric",
             granularity: str = "channel", group_size: int | None = None) -> dict:
    """Quantize a float [N, K] weight; returns {"qweight", "scale", "offset"}
    in the stored layout above (``offset`` is None for 8-bit symmetric)."""
    wf = _float_weight(w, "quantize")
    n, k = wf.shape
    gs = check_config(bits, scheme, granularity, group_size, k)
    if not torch.isfinite(wf).all():
        raise ValueError("quantize: the weight has NaN or inf values")
    scale, low = _scales(wf, bits, scheme, granularity, gs)
    g = scale.shape[1]
    qmin, qmax = qrange(bits, scheme)
    # times the float32 reciprocal, as torch.quantize_per_channel (fbgemm) rounds
    inv = (1.0 / scale).repeat_interleave(k // g, dim=1)
    if scheme == "symmetric":
        q = torch.clamp(torch.round(wf * inv), qmin, qmax)
    else:
        q = torch.clamp(torch.round((wf - low.repeat_interleave(k // g, dim=1)) * inv), qmin, qmax)
    if bits == 8:
        qw = q.to(torch.int8 if scheme == "symmetric" else torch.uint8)
        offset = low
    else:
        if scheme == "symmetric":
            q = q + 8
            offset = -8.0 * scale
        else:
            offset = low
        qw = pack_int4(q.to(torch.uint8))
    return {"qweight": qw, "scale": scale.contiguous(),
            "offset": offset.contiguous() if offset is not None else None}


def dequantize(t: dict, bits: int, k: int | None = None) -> torch.Tensor:
    """float32 [N, K] from a stored layout: q * scale + offset."""
    qw, scale, offset = t["qweight"], t["scale"], t.get("offset")
    if bits == 4:
        q = unpack_int4(qw, qw.shape[1] * 2 if k is None else k)
    else:
        q = qw
    n, kk = q.shape
    g = scale.shape[1]
    w = q.float() * scale.float().repeat_interleave(kk // g, dim=1)
    if offset is not None:
        w = w + offset.float().repeat_interleave(kk // g, dim=1)
    return w


def _block_perm(k: int, device) -> torch.Tensor:
    """perm[j] = element stored at nibble slot j, where slot 2i is byte i's low
    nibble and slot 2i+1 its high nibble."""
    idx = []
    for b0 in range(0, k, BLOCK):
        t = min(BLOCK, k - b0)
        h = t // 2
        for i in range(h):
            idx += [b0 + i, b0 + i + h]
    return torch.tensor(idx, dtype=torch.int64, device=device)


_PERM_CACHE: dict = {}


def _perm(k, device):
    key = (k, str(device))
    p = _PERM_CACHE.get(key)
    if p is None:
        p = _PERM_CACHE[key] = _block_perm(k, device)
    return p


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] with values 0..15 -> uint8 [N, K//2] in the block layout."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4: expected [N, K] with K even, got {tuple(q.shape)}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError("pack_int4: values must be in 0..15")
    s = q[:, _perm(q.shape[1], q.device)].to(torch.uint8)
    return (s[:, 0::2] | (s[:, 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor, k: int) -> torch.Tensor:
    """Exact inverse of pack_int4: uint8 [N, k//2] -> uint8 [N, k]."""
    if p.dim() != 2 or p.shape[1] * 2 != k:
        raise ValueError(f"unpack_int4: expected [N, {k // 2}] bytes, got {tuple(p.shape)}")
    slots = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], k)
    out = torch.empty_like(slots)
    out[:, _perm(k, p.device)] = slots
    return out


def quantize_per_token(x: torch.Tensor):
    """x [B, K] float -> (qx int8 [B, K], sx float32 [B]) as in the module docstring."""
    xf = x.float()
    amax = xf.abs().amax(-1) if xf.shape[-1] else torch.zeros(xf.shape[:-1], device=x.device)
    finite = torch.isfinite(amax)
    safe = torch.where(finite & (amax > 0), amax, torch.ones_like(amax))
    # tensor / tensor: torch computes ``scalar / tensor`` as a reciprocal times
    # the scalar, which is not the correctly rounded quotient the kernels use
    c127 = torch.full_like(safe, 127.0)
    inv = torch.where(finite & (amax > 0), c127 / safe, torch.zeros_like(amax))
    qx = torch.clamp(torch.round(xf * inv[:, None]), -127, 127)
    qx = torch.where(finite[:, None], qx, torch.zeros_like(qx)).to(torch.int8)
    sx = torch.where(finite, amax / c127, torch.full_like(amax, float("nan")))
    return qx, sx


def validate(t: dict, bits: int, shape: tuple, group_size: int, where: str) -> None:
    """Check a layout read from a checkpoint before any kernel addresses it."""
    n, k = shape
    qw, scale, offset = t.get("qweight"), t.get("scale"), t.get("offset")
    exp_dtype = (torch.int8, torch.uint8) if bits == 8 else (torch.uint8,)
    exp_shape = (n, k) if bits == 8 else (n, k // 2)
    if not isinstance(qw, torch.Tensor) or qw.dtype not in exp_dtype or tuple(qw.shape) != exp_shape:
        raise ValueError(f"{where}: qweight must be {'/'.join(map(str, exp_dtype))} of shape "
                         f"{exp_shape}, got "
                         f"{getattr(qw, 'dtype', type(qw).__name__)} {tuple(getattr(qw, 'shape', ()))}")
    g = k // group_size if group_size else 1
    for name, v in (("scale", scale), ("offset", offset)):
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or tuple(v.shape) != (n, g):
            raise ValueError(f"{where}: {name} must be float32 of shape {(n, g)}, got "
                             f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
    if offset is None and not (bits == 8 and qw.dtype == torch.int8):
        raise ValueError(f"{where}: offset is required for this layout")
