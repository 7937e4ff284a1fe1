"""Numba CPU Adam/AdamW: one call per parameter group.

The per-element math is ``pyopt::adam_math`` from csrc/common/optim_math.h,
in float32 and in the same operation order, without fastmath, so the results
are bitwise equal to ``pyopt._reference.optim.adam_step``.

The caller passes the address table of csrc/common/optim_table.h (one int64
row per tensor: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step,
numel), built from ``data_ptr()`` after ``pyopt._checks`` has validated every
tensor. Addresses become typed arrays inside compiled code; bf16 and fp16 are
read and written as uint16 (bf16) or int16 (fp16) with the bit-exact conversions below.

Work split: the per-tensor bookkeeping (step += 1, bias corrections) runs once
per tensor, serially; then the concatenated element range of all tensors is
cut into one contiguous block per thread, so a group of 2000 tiny tensors
uses every core just like one large tensor does.
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["adam_step", "sgd_step", "rmsprop_step", "CACHE_ENABLED"]

# Table columns (csrc/common/optim_table.h, enum AdamCol).
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP, NUMEL, NCOLS = range(8)
# dtype codes (csrc/common/optim_math.h, enum DType).
FLOAT32, BFLOAT16, FLOAT16 = 0, 1, 2
# Below this many elements per thread, fewer threads are used.
MIN_BLOCK = 4096

CACHE_ENABLED = True


def _njit(**options):
    """numba.njit with cache=True, or cache=False where no cache dir is writable.

    numba looks for a writable cache dir when the decorator runs (NUMBA_CACHE_DIR,
    then __pycache__ next to this file, then the user cache dir) and raises
    RuntimeError if there is none, e.g. a read-only install with a read-only HOME.
    """
    def decorate(fn):
        global CACHE_ENABLED
        try:
            return numba.njit(cache=True, error_model="numpy", **options)(fn)
        except RuntimeError as e:
            if CACHE_ENABLED:
                warnings.warn(f"pyopt: numba cache disabled, kernels compile on every run ({e})",
                              RuntimeWarning, stacklevel=2)
            CACHE_ENABLED = False
            return numba.njit(cache=False, error_model="numpy", **options)(fn)
    return decorate


# ---------------------------------------------------------------- intrinsics

@intrinsic
def _as_ptr(typingctx, addr, offset, dtype):
    """(int64 address, element offset, numpy scalar class) -> typed pointer addr + offset."""
    if not (isinstance(addr, types.Integer) and isinstance(offset, types.Integer)
            and isinstance(dtype, types.NumberClass)):
        return None
    ptr_type = types.CPointer(dtype.instance_type)

    def codegen(context, builder, signature, args):
        base = builder.inttoptr(args[0], context.get_value_type(ptr_type))
        return builder.gep(base, [args[1]])

    return ptr_type(addr, offset, dtype), codegen


@intrinsic
def _f32_bits(typingctx, x):
    """float32 -> its uint32 bit pattern."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    """uint32 bit pattern -> float32."""
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


# ------------------------------------------------- bit-exact 16-bit storage

@_njit(inline="always")
def _bf16_to_f32(h):
    return _bits_f32(np.uint32(np.uint32(h) << 16))


@_njit(inline="always")
def _f32_to_bf16(x):
    """Round to nearest even; NaN stays NaN (sign and top payload bits kept, quiet bit set)."""
    u = np.uint32(_f32_bits(x))
    if x != x:
        return np.uint16((u >> 16) | 0x40)
    return np.uint16((u + (0x7FFF + ((u >> 16) & 1))) >> 16)


@_njit(inline="always")
def _f16_to_f32(h):
    h = np.uint32(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if e == 0x1F:                       # inf / NaN (payload kept)
        bits = sign | 0x7F800000 | (mant << 13)
    elif e != 0:                        # normal: rebias 15 -> 127
        bits = sign | ((e + 112) << 23) | (mant << 13)
    else:                               # zero / subnormal: mant * 2^-24, exact in float32
        bits = sign | _f32_bits(np.float32(mant) * np.float32(5.9604644775390625e-08))
    return _bits_f32(np.uint32(bits))


@_njit(inline="always")
def _f32_to_f16(x):
    """Round to nearest even, with overflow to inf, subnormals, and NaN kept (quiet)."""
    u = np.uint32(_f32_bits(x))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:                  # NaN
        r = 0x7E00 | ((a >> 13) & 0x3FF)
    elif a >= 0x477FF000:               # >= 65520 (incl. inf) rounds to inf
        r = 0x7C00
    elif a >= 0x38800000:               # normal half (>= 2^-14): rebias, drop 13 bits
        a = a - 0x38000000
        r = (a + (0xFFF + ((a >> 13) & 1))) >> 13
    elif a <= 0x33000000:               # <= 2^-25 rounds to zero (2^-25 is a tie to even 0)
        r = 0
    else:                               # subnormal half: value / 2^-24, rounded to even
        shift = 126 - (a >> 23)         # 14 .. 24
        mant = (a & 0x7FFFFF) | 0x800000
        r = mant >> shift
        rem = mant & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (r & 1) == 1):
            r += 1
    return np.uint16(sign | r)


def _load(a, j, code):
    pass


def _store(a, j, x, code):
    pass


# bf16 storage is viewed as uint16 and fp16 as int16, so each conversion is
# chosen when the loop is compiled: a run-time dtype branch inside the loop
# keeps LLVM from vectorising it.
@overload(_load)
def _load_ol(a, j, code):
    if a.dtype == types.float32:
        return lambda a, j, code: a[j]
    if a.dtype == types.uint16:
        return lambda a, j, code: _bf16_to_f32(a[j])
    if a.dtype == types.int16:
        return lambda a, j, code: _f16_to_f32(np.uint16(a[j]))
    return None


@overload(_store)
def _store_ol(a, j, x, code):
    if a.dtype == types.float32:
        def impl(a, j, x, code):
            a[j] = x
        return impl
    if a.dtype == types.uint16:
        def impl(a, j, x, code):
            a[j] = _f32_to_bf16(x)
        return impl
    if a.dtype == types.int16:
        def impl(a, j, x, code):
            a[j] = np.int16(_f32_to_f16(x))
        return impl
    return None


# ------------------------------------------------------------------ kernels

@_njit()
def _adam_range(p, g, m, v, vmax, pcode, scode, amsgrad, maximize, wd_mode,
                hyper, neg_step_size, bc2_sqrt):
    """pyopt::adam_math over whole arrays (views of one tensor's block).

    The loop index runs from 0 to size: with range(lo, hi) numba must allow
    negative indices and LLVM no longer vectorises the loop (4x slower).
    """
    w, one_minus_w, beta2, one_minus_beta2, eps, weight_decay, decay_factor = hyper
    lerp_low = w < np.float32(0.5)
    for j in range(p.size):
        pj = _load(p, j, pcode)
        gj = _load(g, j, pcode)
        mj = _load(m, j, scode)
        vj = _load(v, j, scode)
        if maximize:
            gj = -gj
        if wd_mode == 1:
            gj = gj + weight_decay * pj
        elif wd_mode == 2:
            pj = pj * decay_factor
        if lerp_low:
            mj = mj + w * (gj - mj)
        else:
            mj = gj - (gj - mj) * one_minus_w
        vj = vj * beta2 + (one_minus_beta2 * gj) * gj
        vv = vj
        if amsgrad:
            vm = _load(vmax, j, scode)
            if vm < vj or vj != vj:
                vm = vj
            _store(vmax, j, vm, scode)
            vv = vm
        denom = np.sqrt(vv) / bc2_sqrt + eps
        pj = pj + neg_step_size * (mj / denom)
        _store(p, j, pj, pcode)
        _store(m, j, mj, scode)
        _store(v, j, vj, scode)


@_njit()
def _view(table, i, col, lo, hi, dtype):
    """Elements [lo, hi) of table cell (i, col) as a C-contiguous array of dtype."""
    return numba.carray(_as_ptr(table[i, col], lo, dtype), hi - lo)


@_njit()
def _adam_views(table, i, lo, hi, ptype, stype, pcode, scode, amsgrad, maximize, wd_mode,
                hyper, neg_step_size, bc2_sqrt):
    p = _view(table, i, PARAM, lo, hi, ptype)
    g = _view(table, i, GRAD, lo, hi, ptype)
    m = _view(table, i, EXP_AVG, lo, hi, stype)
    v = _view(table, i, EXP_AVG_SQ, lo, hi, stype)
    vmax = _view(table, i, MAX_EXP_AVG_SQ, lo, hi, stype) if amsgrad else m
    _adam_range(p, g, m, v, vmax, pcode, scode, amsgrad, maximize, wd_mode,
                hyper, neg_step_size, bc2_sqrt)


@_njit()
def _adam_tensor(table, i, lo, hi, pcode, scode, amsgrad, maximize, wd_mode,
                 hyper, neg_step_size, bc2_sqrt):
    """Elements [lo, hi) of tensor i: one compiled loop per (param, state) storage pair."""
    if pcode == FLOAT32:
        _adam_views(table, i, lo, hi, np.float32, np.float32, pcode, scode, amsgrad, maximize,
                    wd_mode, hyper, neg_step_size, bc2_sqrt)
    elif pcode == BFLOAT16 and scode == FLOAT32:
        _adam_views(table, i, lo, hi, np.uint16, np.float32, pcode, scode, amsgrad, maximize,
                    wd_mode, hyper, neg_step_size, bc2_sqrt)
    elif pcode == BFLOAT16:
        _adam_views(table, i, lo, hi, np.uint16, np.uint16, pcode, scode, amsgrad, maximize,
                    wd_mode, hyper, neg_step_size, bc2_sqrt)
    elif scode == FLOAT32:
        _adam_views(table, i, lo, hi, np.int16, np.float32, pcode, scode, amsgrad, maximize,
                    wd_mode, hyper, neg_step_size, bc2_sqrt)
    else:
        _adam_views(table, i, lo, hi, np.int16, np.int16, pcode, scode, amsgrad, maximize,
                    wd_mode, hyper, neg_step_size, bc2_sqrt)


@_njit(parallel=True)
def _adam_kernel(table, lr, beta1, beta2, hyper, pcode, scode, amsgrad, maximize, wd_mode,
                 nthreads):
    n = table.shape[0]
    # Per-tensor scalars, in float64 as torch computes them, rounded to float32 once.
    neg_step_size = np.empty(n, np.float32)
    bc2_sqrt = np.empty(n, np.float32)
    start = np.empty(n + 1, np.int64)   # tensor i owns [start[i], start[i+1]) of the concatenation
    start[0] = 0
    for i in range(n):
        step = numba.carray(_as_ptr(table[i, STEP], 0, np.float32), 1)
        step[0] = step[0] + np.float32(1.0)
        t = np.float64(step[0])
        neg_step_size[i] = np.float32(-(lr / (1.0 - beta1 ** t)))
        bc2_sqrt[i] = np.float32(math.sqrt(1.0 - beta2 ** t))
        start[i + 1] = start[i] + table[i, NUMEL]

    total = start[n]
    nblocks = max(1, min(nthreads, total // MIN_BLOCK))
    block = (total + nblocks - 1) // nblocks
    for b in numba.prange(nblocks):
        lo = b * block
        hi = min(lo + block, total)
        # first tensor with start[i] <= lo < start[i+1] (binary search; skips empty tensors)
        i, k = 0, n
        while k - i > 1:
            mid = (i + k) // 2
            if start[mid] <= lo:
                i = mid
            else:
                k = mid
        while i < n and start[i] < hi:
            a = max(lo, start[i]) - start[i]
            e = min(hi, start[i + 1]) - start[i]
            if e > a:
                _adam_tensor(table, i, a, e, pcode, scode, amsgrad, maximize, wd_mode,
                             hyper, neg_step_size[i], bc2_sqrt[i])
            i += 1


# ----------------------------------------------------------- SGD / RMSprop

@_njit()
def _segments(table, numel_col, nthreads):
    """Cut the concatenation of all tensors into at most nthreads blocks;
    block b is segments blk[b]..blk[b+1]-1, each (tensor, lo, hi)."""
    n = table.shape[0]
    start = np.empty(n + 1, np.int64)
    start[0] = 0
    for i in range(n):
        start[i + 1] = start[i] + table[i, numel_col]
    total = start[n]
    nblocks = max(1, min(nthreads, total // MIN_BLOCK))
    block = (total + nblocks - 1) // nblocks
    seg = np.empty((n + nblocks, 3), np.int64)
    blk = np.zeros(nblocks + 1, np.int64)
    s, i = 0, 0
    for b in range(nblocks):
        lo, hi = b * block, min((b + 1) * block, total)
        while i < n and start[i + 1] <= lo:
            i += 1
        k = i
        while k < n and start[k] < hi:
            a, e = max(lo, start[k]) - start[k], min(hi, start[k + 1]) - start[k]
            if e > a:
                seg[s, 0], seg[s, 1], seg[s, 2] = k, a, e
                s += 1
            k += 1
        blk[b + 1] = s
    return seg, blk


@_njit()
def _sgd_range(p, g, b, maximize, wd, mom_mode, first, hyper):
    """pyopt::sgd_math; mom_mode 0 none, 1 heavy ball, 2 nesterov."""
    neg_lr, weight_decay, momentum, one_minus_dampening = hyper
    for j in range(p.size):
        pj = _load(p, j, 0)
        gj = _load(g, j, 0)
        if maximize:
            gj = -gj
        if wd:
            gj = gj + weight_decay * pj
        if mom_mode != 0:
            bj = gj if first else _load(b, j, 0) * momentum + one_minus_dampening * gj
            _store(b, j, bj, 0)
            gj = gj + momentum * bj if mom_mode == 2 else bj
        _store(p, j, pj + neg_lr * gj, 0)


@_njit()
def _sgd_views(table, i, lo, hi, t, maximize, wd, mom_mode, hyper):
    p = _view(table, i, 0, lo, hi, t)
    g = _view(table, i, 1, lo, hi, t)
    b = _view(table, i, 2, lo, hi, t) if mom_mode != 0 else p
    _sgd_range(p, g, b, maximize, wd, mom_mode, table[i, 3] != 0, hyper)


@_njit(parallel=True)
def _sgd_kernel(table, code, maximize, wd, mom_mode, hyper, nthreads):
    seg, blk = _segments(table, 4, nthreads)
    for b in numba.prange(blk.size - 1):
        for s in range(blk[b], blk[b + 1]):
            i, lo, hi = seg[s, 0], seg[s, 1], seg[s, 2]
            if code == FLOAT32:
                _sgd_views(table, i, lo, hi, np.float32, maximize, wd, mom_mode, hyper)
            elif code == BFLOAT16:
                _sgd_views(table, i, lo, hi, np.uint16, maximize, wd, mom_mode, hyper)
            else:
                _sgd_views(table, i, lo, hi, np.int16, maximize, wd, mom_mode, hyper)


@_njit()
def _rmsprop_range(p, g, sq, b, ga, maximize, wd, centered, mom, hyper):
    """pyopt::rmsprop_math."""
    neg_lr, alpha, one_minus_alpha, one_minus_w, eps, weight_decay, momentum = hyper
    lerp_low = one_minus_alpha < np.float32(0.5)
    for j in range(p.size):
        pj = _load(p, j, 0)
        gj = _load(g, j, 0)
        if maximize:
            gj = -gj
        if wd:
            gj = gj + weight_decay * pj
        sj = _load(sq, j, 0) * alpha + (one_minus_alpha * gj) * gj
        _store(sq, j, sj, 0)
        if centered:
            aj = _load(ga, j, 0)
            if lerp_low:
                aj = aj + one_minus_alpha * (gj - aj)
            else:
                aj = gj - (gj - aj) * one_minus_w
            _store(ga, j, aj, 0)
            avg = np.sqrt(sj + (np.float32(-1.0) * aj) * aj)
        else:
            avg = np.sqrt(sj)
        avg = avg + eps
        if mom:
            bj = _load(b, j, 0) * momentum + gj / avg
            _store(b, j, bj, 0)
            _store(p, j, pj + neg_lr * bj, 0)
        else:
            _store(p, j, pj + neg_lr * (gj / avg), 0)


@_njit()
def _rmsprop_views(table, i, lo, hi, t, maximize, wd, centered, mom, hyper):
    p = _view(table, i, 0, lo, hi, t)
    g = _view(table, i, 1, lo, hi, t)
    sq = _view(table, i, 2, lo, hi, t)
    b = _view(table, i, 3, lo, hi, t) if mom else p
    ga = _view(table, i, 4, lo, hi, t) if centered else p
    _rmsprop_range(p, g, sq, b, ga, maximize, wd, centered, mom, hyper)


@_njit(parallel=True)
def _rmsprop_kernel(table, code, maximize, wd, centered, mom, hyper, nthreads):
    for i in range(table.shape[0]):
        step = numba.carray(_as_ptr(table[i, 5], 0, np.float32), 1)
        step[0] = step[0] + np.float32(1.0)
    seg, blk = _segments(table, 6, nthreads)
    for b in numba.prange(blk.size - 1):
        for s in range(blk[b], blk[b + 1]):
            i, lo, hi = seg[s, 0], seg[s, 1], seg[s, 2]
            if code == FLOAT32:
                _rmsprop_views(table, i, lo, hi, np.float32, maximize, wd, centered, mom, hyper)
            elif code == BFLOAT16:
                _rmsprop_views(table, i, lo, hi, np.uint16, maximize, wd, centered, mom, hyper)
            else:
                _rmsprop_views(table, i, lo, hi, np.int16, maximize, wd, centered, mom, hyper)


# ------------------------------------------------------------------ entry

def adam_step(table, n, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
              param_dtype, state_dtype, nthreads):
    """One Adam/AdamW step for the n tensors of ``table`` (int64, shape (n, 7)), in place.

    param_dtype / state_dtype are dtype codes (0 float32, 1 bfloat16, 2 float16);
    float32 params need float32 state. The table is trusted: pyopt._checks validated it.
    """
    if n == 0:
        return
    if param_dtype not in (FLOAT32, BFLOAT16, FLOAT16) or state_dtype not in (FLOAT32, param_dtype):
        raise ValueError(f"unsupported dtype codes: param {param_dtype}, state {state_dtype}")
    table = np.ascontiguousarray(table[:n], dtype=np.int64)
    lr = float(lr)
    f32 = np.float32
    w = f32(1.0 - beta1)
    hyper = (w, f32(1) - w, f32(beta2), f32(1.0 - beta2), f32(eps), f32(weight_decay),
             f32(1.0 - lr * weight_decay))
    wd_mode = 0 if weight_decay == 0 else (2 if decoupled else 1)
    nthreads = max(1, min(int(nthreads), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(nthreads)
    _adam_kernel(table, lr, float(beta1), float(beta2), hyper, int(param_dtype), int(state_dtype),
                 bool(amsgrad), bool(maximize), wd_mode, nthreads)


def _threads(nthreads):
    nthreads = max(1, min(int(nthreads), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(nthreads)
    return nthreads


def sgd_step(table, n, lr, momentum, dampening, weight_decay, nesterov, maximize, dtype,
             nthreads):
    """One SGD step over the n rows of ``table`` (int64, shape (n, 5)), in place."""
    if n == 0:
        return
    if dtype not in (FLOAT32, BFLOAT16, FLOAT16):
        raise ValueError(f"unsupported dtype code {dtype}")
    f32 = np.float32
    hyper = (f32(-float(lr)), f32(weight_decay), f32(momentum), f32(1.0 - dampening))
    mom_mode = 0 if momentum == 0 else (2 if nesterov else 1)
    _sgd_kernel(np.ascontiguousarray(table[:n], dtype=np.int64), int(dtype), bool(maximize),
                weight_decay != 0, mom_mode, hyper, _threads(nthreads))


def rmsprop_step(table, n, lr, alpha, eps, weight_decay, momentum, centered, maximize, dtype,
                 nthreads):
    """One RMSprop step over the n rows of ``table`` (int64, shape (n, 7)), in place."""
    if n == 0:
        return
    if dtype not in (FLOAT32, BFLOAT16, FLOAT16):
        raise ValueError(f"unsupported dtype code {dtype}")
    f32 = np.float32
    oma = f32(1.0 - alpha)
    hyper = (f32(-float(lr)), f32(alpha), oma, f32(1) - oma, f32(eps), f32(weight_decay),
             f32(momentum))
    _rmsprop_kernel(np.ascontiguousarray(table[:n], dtype=np.int64), int(dtype), bool(maximize),
                    weight_decay != 0, bool(centered), momentum > 0, hyper, _threads(nthreads))
