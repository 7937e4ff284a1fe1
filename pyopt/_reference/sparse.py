"""Pure-torch sparse linear: the readable spec of every format's kernel
(layouts in pyopt/sparse/formats.py) and the ``torch`` backend.

All formats compute ``out[b, i] = bias[i] + sum_j W[i, j] x[b, j]`` over the kept
(i, j) in float32 and round once to the input dtype, as the native kernels do.
"""
from __future__ import annotations

import torch

from ..sparse.formats import columns, rows_of, unpack_bits


def _finish(acc: torch.Tensor, bias, dtype) -> torch.Tensor:
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(dtype)


def csr_linear(x, values, row_ptr, col_idx, bias, n: int) -> torch.Tensor:
    """x [B, K] -> [B, n] with W in csr."""
    rows, cols = rows_of(row_ptr), columns(col_idx)
    acc = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    # each kept weight adds w * x[:, col] to out[:, row]
    acc.index_add_(1, rows, x.float()[:, cols] * values.float())
    return _finish(acc, bias, x.dtype)


def bitmask_linear(x, values, row_ptr, bitmask, bias, n: int) -> torch.Tensor:
    """x [B, K] -> [B, n] with W in bitmask (or nm) layout."""
    rows, cols = unpack_bits(bitmask, x.shape[1]).nonzero(as_tuple=True)
    acc = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    acc.index_add_(1, rows, x.float()[:, cols] * values.float())
    return _finish(acc, bias, x.dtype)


def bsr_linear(x, values, block_row_ptr, block_col, bias, n: int) -> torch.Tensor:
    """x [B, K] -> [B, n] with W in bsr, blocks values.shape[1:]."""
    bh, bw = values.shape[1], values.shape[2]
    b = x.shape[0]
    r = rows_of(block_row_ptr)
    xb = x.float().view(b, -1, bw)[:, block_col.to(torch.int64)]        # [B, nblocks, bw]
    part = torch.einsum("bnc,nrc->bnr", xb, values.float())             # [B, nblocks, bh]
    acc = torch.zeros(b, n // bh, bh, dtype=torch.float32, device=x.device)
    acc.index_add_(1, r, part)
    return _finish(acc.view(b, n), bias, x.dtype)


LINEAR = {"csr": csr_linear, "bitmask": bitmask_linear, "nm": bitmask_linear, "bsr": bsr_linear}
