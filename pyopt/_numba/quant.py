"""Numba CPU quantized linear: ``x @ W.T + bias`` with W in the stored layout of
``pyopt.quant.formats`` (int8/uint8 [N, K], or packed 4-bit [N, K//2] in
64-element blocks, float32 scale/offset [N, G]). It is the numba backend of
``pyopt._reference.quant.linear``, with the same signature and math.

Why a kernel of its own: the reference dequantizes (or unpacks) the whole
matrix on every call; here each thread decodes one weight row at a time into a
K-long scratch row that stays in L1, uses it for every batch row, and drops it.
Nothing of size N*K is allocated.

``act="float"``: the row is dequantized exactly as formats.dequantize does
(``q * scale`` rounded to float32, then ``+ offset`` rounded), multiplied with
x in float32 (x converted to float32 once per call) in ``_LANES`` partial sums
(an elementwise update that LLVM vectorises without fastmath), summed, the
bias added in float32, and rounded once to x's dtype. The summation order is
not the reference's (BLAS), so results agree to float32 rounding, not bitwise.

``act="int8"``: x is quantized per token exactly as formats.quantize_per_token
(float32 ``x * (127 / amax)``, round half to even, clamp to [-127, 127]), the
group dots ``sum qx * q`` are exact integer sums (int32 per chunk of at most
65536 products, which cannot overflow, added in int64), and each output is
``float32(sx * (sum_g scale * dot_g + sum_g offset * xs_g))`` in float64 as
the reference computes it, plus the bias in float32. Only float64 summation
order can differ from the reference.

x (bf16 viewed as uint16, fp16 as int16) is converted to float32 once per call
with the bit-exact loads of ``pyopt._numba.optim``; the kernels write float32
(bias added in float32) and torch rounds that once to x's dtype (round to
nearest even, as ``_store`` would). int8 qweight is passed as its uint8 view
with a ``signed`` flag. So each kernel compiles once, not once per
(x dtype, qweight dtype): cold compile of the whole module is ~15 s, not ~60.
No fastmath; a row's arithmetic never depends on the thread split, so results
are the same for any thread count. Work split: ``prange`` over runs of output
rows (N), one scratch row per run.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from .optim import _load, _njit

__all__ = ["linear", "dequantize"]

BLOCK = 64              # packed 4-bit block, elements (formats.BLOCK)
_LANES = 128            # float32 partial sums per dot product
_ICHUNK = 65536         # products per int32 partial sum: 65536 * 127 * 255 < 2**31
_TASKS_PER_THREAD = 8   # prange tasks per thread (runs of rows sharing scratch)


# ------------------------------------------------------------ x to float32

@_njit(parallel=True)
def _to_f32(x):
    """Flat x (float32 / bf16-as-uint16 / fp16-as-int16) -> float32 copy."""
    out = np.empty(x.size, np.float32)
    for j in prange(x.size):
        out[j] = _load(x, j, 0)
    return out


# ------------------------------------------------------------- indexing
#
# The kernels index flat arrays with unsigned offsets instead of slicing in
# their inner loops: each slice is a new array view (a reference-count update
# on its parent, shared by all threads), and signed indices make numba add
# negative-index fixups that can keep LLVM from vectorising. Mixing uint64 with
# int64 gives float64 in numba, so every index below is uint64.

_U0 = np.uint64(0)


@_njit(inline="always")
def _u(v):
    return np.uint64(v)


# ----------------------------------------------------------- weight rows

@_njit()
def _decode_row(qw, i, k, bits, signed, q):
    """q[0:k] = the integer weights of row i. qw is the flat uint8 view of
    qweight: 8-bit bytes are the values (signed: int8 bit patterns); 4-bit
    bytes hold the nibbles of the 64-element block layout, byte j of a block
    of t elements holding element j low and element j + t/2 high."""
    if bits == 8:
        base = _u(i) * _u(k)
        if signed:
            for j in range(_u(k)):
                q[j] = np.int8(qw[base + j])
        else:
            for j in range(_u(k)):
                q[j] = qw[base + j]
        return
    m = np.uint8(15)
    four = np.uint8(4)
    row = _u(i) * _u(k // 2)
    for b0 in range(0, k, BLOCK):
        h = _u(min(BLOCK, k - b0) // 2)
        src = row + _u(b0 // 2)
        lo = _u(b0)
        hi = lo + h
        for j in range(h):
            v = qw[src + j]
            q[lo + j] = v & m
            q[hi + j] = v >> four


@_njit()
def _dequant_row(qw, i, k, bits, signed, scale, offset, has_offset, ng, w):
    """w[0:k] = q * scale + offset of row i in float32 (multiply rounded, then
    add); scale and offset flat [N*G]."""
    _decode_row(qw, i, k, bits, signed, w)
    gs = _u(k // ng)
    for g in range(_u(ng)):
        s = scale[_u(i) * _u(ng) + g]
        o = g * gs
        if has_offset:
            c = offset[_u(i) * _u(ng) + g]
            for j in range(gs):
                w[o + j] = w[o + j] * s + c
        else:
            for j in range(gs):
                w[o + j] = w[o + j] * s


@_njit()
def _dot(w, x, xo, k, lanes, nl):
    """sum_{j<k} w[j] * x[xo + j] in float32: nl partial sums (an elementwise
    update, which vectorises), added up, then the tail. nl is a run-time
    argument: with a compile-time trip count LLVM unrolls the lane loop fully
    and, unable to prove that lanes aliases neither w nor x, leaves it scalar."""
    nlu = _u(nl)
    for e in range(nlu):
        lanes[e] = np.float32(0.0)
    nb = _u(k // nl)
    for c in range(nb):
        wo = c * nlu
        xc = xo + wo
        for e in range(nlu):
            lanes[e] += w[wo + e] * x[xc + e]
    acc = np.float32(0.0)
    for e in range(nlu):
        acc += lanes[e]
    for j in range(nb * nlu, _u(k)):
        acc += w[j] * x[xo + j]
    return acc


# -------------------------------------------------------------- act=float

@_njit(parallel=True)
def _float_kernel(x32, b, k, qw, bits, signed, scale, offset, has_offset, ng, bias, has_bias,
                  out, n, chunk, nl):
    """out[r*n + i] = bias[i] + sum_j x32[r*k + j] * W[i, j] in float32 (all flat)."""
    for t in prange((n + chunk - 1) // chunk):
        w = np.empty(k, np.float32)
        lanes = np.empty(nl, np.float32)
        for i in range(t * chunk, min(n, (t + 1) * chunk)):
            _dequant_row(qw, i, k, bits, signed, scale, offset, has_offset, ng, w)
            bi = bias[_u(i)] if has_bias else np.float32(0.0)
            for r in range(_u(b)):
                out[r * _u(n) + _u(i)] = _dot(w, x32, r * _u(k), k, lanes, nl) + bi


@_njit()
def _dequant_kernel(qw, k, bits, signed, scale, offset, has_offset, ng, out):
    """out [N, K] float32 = the dequantized weight (the kernels' own row decode).
    Serial: it is a check of the decode, and a parallel kernel compiles 3x slower."""
    for i in range(out.shape[0]):
        _dequant_row(qw, i, k, bits, signed, scale, offset, has_offset, ng, out[i])


# --------------------------------------------------------------- act=int8

@_njit(parallel=True)
def _quant_x(x32, b, k, ng, qx, sx, xs):
    """Per-token int8 activations of float32 x32 (flat [B*K]), as
    formats.quantize_per_token computes them: qx int8 [B*K], sx float64 [B]
    (the float32 amax / 127; NaN for a row with NaN or inf) and the group sums
    xs int64 [B*G]. inv = 127 / amax is the correctly rounded float32 quotient."""
    gs = _u(k // ng)
    c127 = np.float32(127.0)
    for r in prange(b):
        xo = _u(r) * _u(k)
        amax = np.float32(0.0)
        bad = np.float32(0.0)               # v - v is NaN exactly for NaN and inf
        for j in range(_u(k)):
            v = x32[xo + j]
            bad += v - v
            a = abs(v)
            if a > amax:
                amax = a
        if bad != bad:
            for j in range(_u(k)):
                qx[xo + j] = 0
            for g in range(_u(ng)):
                xs[_u(r) * _u(ng) + g] = 0
            sx[r] = np.nan
            continue
        inv = c127 / amax if amax > np.float32(0.0) else np.float32(0.0)
        sx[r] = np.float64(amax / c127)
        for j in range(_u(k)):
            v = np.rint(x32[xo + j] * inv)
            if v > c127:
                v = c127
            elif v < -c127:
                v = -c127
            elif v != v:                    # 0 * inf where 127 / amax overflows (torch gives 0)
                v = np.float32(0.0)
            qx[xo + j] = np.int8(v)
        for g in range(_u(ng)):
            s = 0
            o = xo + g * gs
            for j in range(gs):
                s += np.int64(qx[o + j])
            xs[_u(r) * _u(ng) + g] = s


@_njit(inline="always")
def _idot(a, ao, q, qo, m):
    """Exact sum_{j<m} a[ao + j] * q[qo + j] (int8 activations, int16 weights)
    in int64: int32 sums over runs of at most _ICHUNK products, which cannot
    overflow. One run covers every group of a valid layout with K <= 65536;
    that case gets its own loop (the run loop costs 3x on 32-element groups)."""
    if m <= _u(_ICHUNK):
        s = np.int32(0)
        for j in range(m):
            s = np.int32(s + np.int32(a[ao + j]) * np.int32(q[qo + j]))
        return np.int64(s)
    tot = np.int64(0)
    for c0 in range(_U0, m, _u(_ICHUNK)):
        e = min(m - c0, _u(_ICHUNK))
        s = np.int32(0)
        for j in range(e):
            s = np.int32(s + np.int32(a[ao + c0 + j]) * np.int32(q[qo + c0 + j]))
        tot += s
    return tot


@_njit(parallel=True)
def _int8_kernel(qx, sx, xs, b, k, qw, bits, signed, scale, offset, has_offset, ng, bias,
                 has_bias, out, n, chunk):
    """out[r*n + i] = bias[i] + float32(sx[r] * (sum_g scale[i, g] * dot_g
    + sum_g offset[i, g] * xs[r, g])), the sums in float64 (all flat)."""
    gs = _u(k // ng)
    ngu = _u(ng)
    for t in prange((n + chunk - 1) // chunk):
        q = np.empty(k, np.int16)
        dots = np.empty(ng, np.float64)
        for i in range(t * chunk, min(n, (t + 1) * chunk)):
            _decode_row(qw, i, k, bits, signed, q)
            bi = bias[_u(i)] if has_bias else np.float32(0.0)
            so = _u(i) * ngu
            for r in range(_u(b)):
                xo = r * _u(k)
                for g in range(ngu):            # the exact integer part
                    dots[g] = np.float64(_idot(qx, xo + g * gs, q, g * gs, gs))
                a_s = 0.0                       # then the float64 combination
                for g in range(ngu):
                    a_s += dots[g] * np.float64(scale[so + g])
                a_o = 0.0
                if has_offset:
                    xo_g = r * ngu
                    for g in range(ngu):
                        a_o += np.float64(xs[xo_g + g]) * np.float64(offset[so + g])
                out[r * _u(n) + _u(i)] = np.float32((a_s + a_o) * sx[r]) + bi


# ------------------------------------------------------------------ entry

def _np(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous float32/bf16/fp16 tensor (bf16 as uint16, fp16 as int16)."""
    t = t.contiguous().reshape(-1)
    if t.dtype is torch.float32:
        return t.numpy()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype is torch.float16:
        return t.view(torch.int16).numpy()
    raise TypeError(f"pyopt numba quant: unsupported dtype {t.dtype} "
                    "(expected float32, bfloat16 or float16)")


def _f32(t: torch.Tensor) -> np.ndarray:
    """Flat float32 numpy array of t (a view for float32, else one conversion pass)."""
    a = _np(t)
    return a if a.dtype == np.float32 else _to_f32(a)


def _chunk(n):
    return max(1, -(-n // (numba.get_num_threads() * _TASKS_PER_THREAD)))


def _weight(qweight, scale, offset, bits, k, where):
    """Checked numpy views: (qw uint8 [N, K or K/2], signed, scale [N, G],
    offset [N, G] (scale when absent), has_offset)."""
    if bits not in (4, 8):
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    for name, tt in (("qweight", qweight), ("scale", scale), ("offset", offset)):
        if (tt is not None or name != "offset") and \
                (not isinstance(tt, torch.Tensor) or tt.device.type != "cpu"):
            raise TypeError(f"{where}: {name} must be a CPU tensor")
    exp = (torch.int8, torch.uint8) if bits == 8 else (torch.uint8,)
    if qweight.dtype not in exp or qweight.dim() != 2:
        raise TypeError(f"{where}: {bits}-bit qweight must be a 2-D "
                        f"{'/'.join(map(str, exp))} tensor, got {qweight.dtype} "
                        f"{tuple(qweight.shape)}")
    n = qweight.shape[0]
    kq = k if bits == 8 else k // 2
    if (bits == 4 and k % 2) or qweight.shape[1] != kq:
        raise ValueError(f"{where}: qweight has shape {tuple(qweight.shape)}, expected "
                         f"({n}, {kq}) for in_features={k}")
    if scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[0] != n \
            or scale.shape[1] < 1 or k % scale.shape[1]:
        raise ValueError(f"{where}: scale must be float32 [{n}, G] with G dividing {k}, got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if offset is not None and (offset.dtype != torch.float32 or offset.shape != scale.shape):
        raise ValueError(f"{where}: offset must be float32 of scale's shape "
                         f"{tuple(scale.shape)}, got {offset.dtype} {tuple(offset.shape)}")
    qw = qweight.contiguous().numpy().view(np.uint8).reshape(-1)
    sc = scale.contiguous().numpy().reshape(-1)
    of = offset.contiguous().numpy().reshape(-1) if offset is not None else sc
    return qw, qweight.dtype is torch.int8, sc, of, offset is not None, int(scale.shape[1])


def dequantize(qweight, scale, offset, bits: int, k: int) -> torch.Tensor:
    """float32 [N, k] through the kernels' own row decode (equals formats.dequantize)."""
    qw, signed, sc, of, has_offset, ng = _weight(qweight, scale, offset, bits, k, "dequantize")
    out = torch.empty(qweight.shape[0], k, dtype=torch.float32)
    if out.numel():
        _dequant_kernel(qw, k, bits, signed, sc, of, has_offset, ng, out.numpy())
    return out


def linear(x, qweight, scale, offset, bias, bits: int, act: str = "float") -> torch.Tensor:
    """x [B, K] -> [B, N] in x's dtype, as pyopt._reference.quant.linear.

    The kernels write float32 (bias already added in float32); the one rounding
    to x's dtype is torch's round-to-nearest-even conversion of that result.
    """
    if act not in ("float", "int8"):
        raise ValueError(f"linear: act must be 'float' or 'int8', got {act!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.device.type != "cpu":
        raise ValueError("linear: x must be a 2-D [B, K] CPU tensor")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"linear: unsupported dtype {x.dtype} "
                        "(expected float32, bfloat16 or float16)")
    b, k = x.shape
    qw, signed, sc, of, has_offset, ng = _weight(qweight, scale, offset, bits, k, "linear")
    n = qweight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != x.dtype
                             or bias.device.type != "cpu" or bias.numel() != n):
        raise ValueError(f"linear: bias must be a CPU [{n}] tensor of x's dtype {x.dtype}")
    out = torch.empty(b, n, dtype=torch.float32)
    if out.numel() == 0:
        return out.to(x.dtype)
    bn = _f32(bias) if bias is not None else np.empty(0, np.float32)
    if k == 0:                                          # empty sums: 0 (+ bias)
        out.zero_()
        if bias is not None:
            out += torch.from_numpy(bn)
        return out.to(x.dtype)
    x32 = _f32(x)
    on = out.numpy().reshape(-1)
    if act == "float":
        _float_kernel(x32, b, k, qw, bits, signed, sc, of, has_offset, ng, bn, bias is not None,
                      on, n, _chunk(n), _LANES)
    else:
        qx = np.empty(b * k, np.int8)
        sx = np.empty(b, np.float64)
        xs = np.empty(b * ng, np.int64)
        _quant_x(x32, b, k, ng, qx, sx, xs)
        _int8_kernel(qx, sx, xs, b, k, qw, bits, signed, sc, of, has_offset, ng, bn,
                     bias is not None, on, n, _chunk(n))
    return out if x.dtype is torch.float32 else out.to(x.dtype)
