"""Numba CPU sparse linear: ``out[b, i] = bias[i] + sum_j W[i, j] x[b, j]``.

One kernel per weight format of pyopt/sparse/formats.py, with the signatures of
``pyopt._reference.sparse`` (the spec). Sums run in float32 and are rounded once
to x's dtype at the end; bf16 (viewed as uint16) and fp16 (viewed as int16) are
read and written with the bit-exact conversions of ``pyopt._numba.optim``. No
fastmath, so results are deterministic, and the same for any thread count (a
row's summation order never depends on the work split); the order differs from
the reference (several partial sums per row).

Work split: ``prange`` over output rows (csr, bitmask, nm) or block rows (bsr).
x is converted once into a float32 buffer: for batch 1 a vector [K], else the
transpose xT [K, B], so that each kept weight W[i, j] updates a float32 row
accumulator acc[0:B] += W[i, j] * xT[j, 0:B] in one contiguous, vectorised loop.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .optim import _load, _njit, _store

__all__ = ["csr_linear", "bitmask_linear", "bsr_linear", "LINEAR"]

# prange tasks per thread where a task is a run of rows sharing one scratch
# allocation (acc, column list): enough tasks to even out uneven rows.
_TASKS_PER_THREAD = 8


@intrinsic
def _ctz(typingctx, w):
    """uint64 (nonzero) -> index of its lowest set bit, as uint64."""
    if w != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(types.uint64), codegen


@intrinsic
def _popcnt(typingctx, w):
    """uint64 -> number of set bits, as int64."""
    if w != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(types.uint64), codegen


_ONE = np.uint64(1)
_ZERO = np.uint64(0)
_FULL = np.uint64(0xFFFFFFFFFFFFFFFF)
_SIXTY_FOUR = np.uint64(64)
_BYTE = np.uint64(0xFF)
# _BYTE_POS[b, :popcount(b)] = positions of the set bits of byte b, ascending.
_BYTE_POS = np.zeros((256, 8), np.int32)
for _b in range(256):
    _p = [k for k in range(8) if _b >> k & 1]
    _BYTE_POS[_b, :len(_p)] = _p
del _b, _p
# Words with more set bits than this are decoded a byte at a time through
# _BYTE_POS (no branches) instead of one set bit at a time.
_LUT_MIN_BITS = 12


# ------------------------------------------------------------ x to float32

@_njit(parallel=True)
def _x_f32(x):
    """Flat 16-bit x [K] -> float32 [K] (batch 1)."""
    k = x.size
    out = np.empty(k, np.float32)
    for j in prange(k):
        out[j] = _load(x, j, 0)
    return out


@_njit(parallel=True)
def _xT_f32(x, b, k):
    """Flat x [B*K] (any storage dtype) -> float32 xT [K, B]."""
    out = np.empty((k, b), np.float32)
    for j in prange(k):
        row = out[j]
        for r in range(b):
            row[r] = _load(x, r * k + j, 0)
    return out


# ------------------------------------------------------ shared row helpers

@_njit()
def _row_mat(acc, xT, values, p, cols, q, cnt):
    """acc[0:B] += sum over e < cnt of values[p + e] * xT[cols[q + e], 0:B].

    Kept weights go in groups of 8 whose products are added pairwise before
    touching acc: one load/store of acc per group, and the loop over the batch
    (from 0 to B, along contiguous rows of xT) vectorises. Indexing slices from
    loop counters that start at 0 spares numba's negative-index fixups.
    """
    vs = values[p:p + cnt]
    cs = cols[q:q + cnt]
    for g in range(cnt // 8):
        e = g * 8
        v0, v1 = _load(vs, e, 0), _load(vs, e + 1, 0)
        v2, v3 = _load(vs, e + 2, 0), _load(vs, e + 3, 0)
        v4, v5 = _load(vs, e + 4, 0), _load(vs, e + 5, 0)
        v6, v7 = _load(vs, e + 6, 0), _load(vs, e + 7, 0)
        x0, x1, x2, x3 = xT[cs[e]], xT[cs[e + 1]], xT[cs[e + 2]], xT[cs[e + 3]]
        x4, x5, x6, x7 = xT[cs[e + 4]], xT[cs[e + 5]], xT[cs[e + 6]], xT[cs[e + 7]]
        for r in range(acc.size):
            acc[r] += (((v0 * x0[r] + v1 * x1[r]) + (v2 * x2[r] + v3 * x3[r]))
                       + ((v4 * x4[r] + v5 * x5[r]) + (v6 * x6[r] + v7 * x7[r])))
    for e in range(cnt - cnt % 8, cnt):
        v0 = _load(vs, e, 0)
        x0 = xT[cs[e]]
        for r in range(acc.size):
            acc[r] += v0 * x0[r]


@_njit()
def _finish_row(acc, bias, has_bias, i, out, n):
    """out[r, i] = round(acc[r] + bias[i]) for every batch row r (out is flat [B*n])."""
    bi = _load(bias, i, 0) if has_bias else np.float32(0.0)
    for r in range(acc.size):
        _store(out, r * n + i, acc[r] + bi, 0)


@_njit(inline="always")
def _finish_one(acc, bias, has_bias, i, out):
    if has_bias:
        acc += _load(bias, i, 0)
    _store(out, i, acc, 0)


# ---------------------------------------------------------------------- csr

@_njit(parallel=True)
def _csr_vec(x, values, row_ptr, col, bias, has_bias, out):
    """Batch 1: out[i] = bias[i] + sum_p values[p] x[col[p]] over row i's p,
    in four partial sums (p % 4) to overlap the gathers."""
    for i in prange(out.size):
        lo, hi = row_ptr[i], row_ptr[i + 1]
        vs = values[lo:hi]
        cs = col[lo:hi]
        cnt = hi - lo
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for g in range(cnt // 4):
            e = g * 4
            a0 += _load(vs, e, 0) * x[cs[e]]
            a1 += _load(vs, e + 1, 0) * x[cs[e + 1]]
            a2 += _load(vs, e + 2, 0) * x[cs[e + 2]]
            a3 += _load(vs, e + 3, 0) * x[cs[e + 3]]
        for e in range(cnt - cnt % 4, cnt):
            a0 += _load(vs, e, 0) * x[cs[e]]
        _finish_one((a0 + a1) + (a2 + a3), bias, has_bias, i, out)


@_njit(parallel=True)
def _csr_mat(xT, values, row_ptr, col, bias, has_bias, out, n, chunk):
    for t in prange((n + chunk - 1) // chunk):
        acc = np.empty(xT.shape[1], np.float32)
        for i in range(t * chunk, min(n, (t + 1) * chunk)):
            acc[:] = np.float32(0.0)
            _row_mat(acc, xT, values, row_ptr[i], col, row_ptr[i], row_ptr[i + 1] - row_ptr[i])
            _finish_row(acc, bias, has_bias, i, out, n)


# ------------------------------------------------------------ bitmask / nm

@_njit(parallel=True)
def _bitmask_vec(x, values, row_ptr, bits, bias, has_bias, out, chunk):
    """Batch 1. bits: uint64 [N, W]; the values of row i start at row_ptr[i] in
    bit order, so a running pointer p follows the set bits (two partial sums).
    A full word is a contiguous run of 64: it goes into 64 lane sums instead
    (an elementwise update, which vectorises), added up at the end of the row.
    Unsigned indices (p, bit positions) spare numba's negative-index fixups."""
    n, nw = bits.shape
    for t in prange((n + chunk - 1) // chunk):
        lanes = np.zeros(64, np.float32)
        for i in range(t * chunk, min(n, (t + 1) * chunk)):
            vs = values[row_ptr[i]:row_ptr[i + 1]]
            p = _ZERO
            a0 = a1 = np.float32(0.0)
            full = False
            for wi in range(nw):
                w = bits[i, wi]
                xs = x[wi * 64:wi * 64 + 64]
                if w == _FULL:
                    vw = vs[p:p + _SIXTY_FOUR]
                    for e in range(lanes.size):
                        lanes[e] += _load(vw, e, 0) * xs[e]
                    full = True
                    p += _SIXTY_FOUR
                    continue
                while w != _ZERO:
                    # two partial sums that trade places every step (no branch)
                    a0, a1 = a1, a0 + _load(vs, p, 0) * xs[_ctz(w)]
                    w &= w - _ONE
                    p += _ONE
            acc = a0 + a1
            if full:
                for e in range(64):
                    acc += lanes[e]
                lanes[:] = np.float32(0.0)
            _finish_one(acc, bias, has_bias, i, out)


@_njit()
def _decode_row(bits_row, cols):
    """Columns of the set bits of one bitmask row, ascending, into cols; returns
    their count. cols needs 8 slack entries past the row's count."""
    cnt = 0
    for wi in range(bits_row.size):
        w = bits_row[wi]
        base = wi * 64
        if _popcnt(w) > _LUT_MIN_BITS:
            for by in range(8):
                b = (w >> np.uint64(8 * by)) & _BYTE
                pos = _BYTE_POS[b]
                c = cols[cnt:cnt + 8]
                o = base + 8 * by
                for k in range(8):
                    c[k] = o + pos[k]
                cnt += _popcnt(b)
        else:
            while w != _ZERO:
                cols[cnt] = base + np.int64(_ctz(w))
                w &= w - _ONE
                cnt += 1
    return cnt


@_njit(parallel=True)
def _bitmask_mat(xT, values, row_ptr, bits, bias, has_bias, out, chunk):
    """Batch > 1: each row's set bits are decoded into a column list first."""
    n, nw = bits.shape
    for t in prange((n + chunk - 1) // chunk):
        acc = np.empty(xT.shape[1], np.float32)
        cols = np.empty(nw * 64 + 8, np.int32)
        for i in range(t * chunk, min(n, (t + 1) * chunk)):
            cnt = _decode_row(bits[i], cols)
            acc[:] = np.float32(0.0)
            _row_mat(acc, xT, values, row_ptr[i], cols, 0, cnt)
            _finish_row(acc, bias, has_bias, i, out, n)


# ---------------------------------------------------------------------- bsr

@_njit(parallel=True)
def _bsr_vec(x, values, block_row_ptr, block_col, bias, has_bias, out, bh, bw):
    """Batch 1: part[ii, jj] += V[blk, ii, jj] * x[c*bw + jj] keeps bw partial sums
    per output row (an elementwise update over slices, which vectorises); they
    are added up at the end of the block row."""
    bsz = bh * bw
    for r in prange(block_row_ptr.size - 1):
        part = np.zeros((bh, bw), np.float32)
        for blk in range(block_row_ptr[r], block_row_ptr[r + 1]):
            j0 = block_col[blk] * bw
            xs = x[j0:j0 + bw]
            vb = values[blk * bsz:(blk + 1) * bsz]
            for ii in range(bh):
                vr = vb[ii * bw:(ii + 1) * bw]
                pr = part[ii]
                for jj in range(bw):
                    pr[jj] += _load(vr, jj, 0) * xs[jj]
        for ii in range(bh):
            acc = np.float32(0.0)
            for jj in range(bw):
                acc += part[ii, jj]
            _finish_one(acc, bias, has_bias, r * bh + ii, out)


@_njit(parallel=True)
def _bsr_mat(xT, values, block_row_ptr, block_col, bias, has_bias, out, bh, bw):
    """Batch > 1: acc[ii, 0:B] for the bh rows of a block row; each block adds
    V[blk, ii, :] against the bw contiguous rows xT[j0:j0+bw] (columns j0 + e,
    read through the identity list iota)."""
    nbr = block_row_ptr.size - 1
    n = nbr * bh
    bsz = bh * bw
    iota = np.arange(xT.shape[0]).astype(np.int32)
    for r in prange(nbr):
        acc = np.zeros((bh, xT.shape[1]), np.float32)
        for blk in range(block_row_ptr[r], block_row_ptr[r + 1]):
            j0 = block_col[blk] * bw
            for ii in range(bh):
                _row_mat(acc[ii], xT, values, blk * bsz + ii * bw, iota, j0, bw)
        for ii in range(bh):
            _finish_row(acc[ii], bias, has_bias, r * bh + ii, out, n)


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
    raise TypeError(f"pyopt numba sparse: unsupported dtype {t.dtype} "
                    "(expected float32, bfloat16 or float16)")


def _prepare(x, values, bias, n):
    """Common checks and views: (x np flat, values np flat, bias np, has_bias, out tensor, out np)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, K], got shape {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"the numba backend runs on CPU tensors, got x on {x.device}")
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"values and bias must have x's dtype {x.dtype}")
    n = int(n)
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias has {bias.numel()} elements, expected {n}")
    xn, vn = _np(x), _np(values)
    bn = _np(bias) if bias is not None else vn[:0]
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    return xn, vn, bn, bias is not None, out, _np(out)


def _x32(xn, b, k):
    """float32 x for the kernels: [K] when b == 1, else xT [K, B]."""
    if b == 1:
        return xn if xn.dtype == np.float32 else _x_f32(xn)
    return _xT_f32(xn, b, k)


def _chunk(n):
    return max(1, -(-n // (numba.get_num_threads() * _TASKS_PER_THREAD)))


def _i64(t):
    return t.contiguous().to(torch.int64).numpy() if t.dtype is not torch.int64 else \
        t.contiguous().numpy()


def csr_linear(x, values, row_ptr, col_idx, bias, n: int) -> torch.Tensor:
    """x [B, K] -> [B, n] with W in csr (col_idx: unsigned 16-bit in int16, or int32)."""
    xn, vn, bn, has_bias, out, on = _prepare(x, values, bias, n)
    b, k = x.shape
    if out.numel() == 0:
        return out
    if col_idx.dtype is torch.int16:
        col = col_idx.contiguous().numpy().view(np.uint16)
    elif col_idx.dtype is torch.int32:
        col = col_idx.contiguous().numpy()
    else:
        col = col_idx.contiguous().to(torch.int64).numpy()
    rp = _i64(row_ptr)
    x32 = _x32(xn, b, k)
    if b == 1:
        _csr_vec(x32, vn, rp, col, bn, has_bias, on)
    else:
        _csr_mat(x32, vn, rp, col, bn, has_bias, on, out.shape[1], _chunk(out.shape[1]))
    return out


def bitmask_linear(x, values, row_ptr, bitmask, bias, n: int) -> torch.Tensor:
    """x [B, K] -> [B, n] with W in bitmask or nm layout."""
    xn, vn, bn, has_bias, out, on = _prepare(x, values, bias, n)
    b, k = x.shape
    if out.numel() == 0:
        return out
    bits = bitmask.contiguous().numpy().view(np.uint64)
    rp = _i64(row_ptr)
    x32 = _x32(xn, b, k)
    if b == 1:
        _bitmask_vec(x32, vn, rp, bits, bn, has_bias, on, _chunk(out.shape[1]))
    else:
        _bitmask_mat(x32, vn, rp, bits, bn, has_bias, on, _chunk(out.shape[1]))
    return out


def bsr_linear(x, values, block_row_ptr, block_col, bias, n: int) -> torch.Tensor:
    """x [B, K] -> [B, n] with W in bsr, blocks values.shape[1:]."""
    xn, vn, bn, has_bias, out, on = _prepare(x, values, bias, n)
    b, k = x.shape
    if out.numel() == 0:
        return out
    bh, bw = int(values.shape[1]), int(values.shape[2])
    brp = _i64(block_row_ptr)
    bc = block_col.contiguous().to(torch.int32).numpy() if block_col.dtype is not torch.int32 \
        else block_col.contiguous().numpy()
    x32 = _x32(xn, b, k)
    if b == 1:
        _bsr_vec(x32, vn, brp, bc, bn, has_bias, on, bh, bw)
    else:
        _bsr_mat(x32, vn, brp, bc, bn, has_bias, on, bh, bw)
    return out


LINEAR = {"csr": csr_linear, "bitmask": bitmask_linear, "nm": bitmask_linear, "bsr": bsr_linear}
