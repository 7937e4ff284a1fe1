"""Sparse weight formats for ``x @ W.T + bias`` with W of shape [N, K] = [out, in].

Every format is a dict of plain tensors (so it lives in a module's buffers and
state_dict) built from a dense weight and a keep-mask. Kernels on every backend
(``pyopt._C``, ``pyopt._C_cuda``, ``pyopt._numba.sparse``, ``pyopt._reference.sparse``)
read exactly these layouts. ``D`` is the weight dtype (float32, bfloat16, float16).

csr (unstructured, compressed rows)
    row_ptr  int64 [N+1]   values of row i are values[row_ptr[i]:row_ptr[i+1]]
    col_idx  int16 [nnz]   column of each value, ascending within a row. Holds the
                           *unsigned* 16-bit column (0..65535) when K <= 65536,
                           which halves index traffic; int32 when K is larger.
    values   D     [nnz]
    Best at high sparsity (>~80%): 6 bytes per kept fp32 weight.

bitmask (unstructured, bitmap + packed values)
    bitmask  int64 [N, ceil(K/64)]  bit j%64 of word j//64 of row i set <=> W[i, j] kept;
                                    bits at j >= K are 0
    row_ptr  int64 [N+1]   as csr
    values   D     [nnz]   kept weights in row-major order
    1 bit per position plus the values: best at low and medium sparsity
    (4.5 bytes per kept fp32 weight at 50%, against 6 for csr).

nm (N:M structured, n kept in every m consecutive inputs; K % m == 0)
    The bitmask layout above with exactly n set bits per group of m, so
    row_ptr[i] = i * K * n / m. The metadata is the 1-bit-per-position mask
    (4 bits per 2:4 group, the same size as two 2-bit indices), which lets
    2:4 share the bitmask kernels. A group that keeps fewer than n weights
    stores explicit zeros to keep the structure.

bsr (block sparse, blocks of bh x bw; N % bh == 0 and K % bw == 0)
    block_row_ptr int64 [N/bh + 1]
    block_col     int32 [nblocks]   block column, ascending within a block row
    values        D     [nblocks, bh, bw]   masked positions inside a kept block are 0
"""
from __future__ import annotations

import torch

FORMATS = ("csr", "bitmask", "nm", "bsr")
# Tensor names per format, in the order the kernels take them.
FIELDS = {
    "csr": ("values", "row_ptr", "col_idx"),
    "bitmask": ("values", "row_ptr", "bitmask"),
    "nm": ("values", "row_ptr", "bitmask"),
    "bsr": ("values", "block_row_ptr", "block_col"),
}
U16_MAX_K = 65536


def _row_ptr(counts: torch.Tensor) -> torch.Tensor:
    rp = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.to(torch.int64), 0, out=rp[1:])
    return rp


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[N, K] bool -> int64 [N, ceil(K/64)], bit j%64 of word j//64."""
    n, k = mask.shape
    words = (k + 63) // 64
    m = torch.zeros(n, words * 64, dtype=torch.int64, device=mask.device)
    m[:, :k] = mask.to(torch.int64)
    m = m.view(n, words, 64)
    shifts = torch.arange(64, device=mask.device, dtype=torch.int64)
    # bit 63 lands in the sign bit: two's complement wraps, as wanted
    return (m << shifts).sum(-1)


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_bits: int64 [N, W] -> bool [N, k]."""
    shifts = torch.arange(64, device=bits.device, dtype=torch.int64)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :k]


def to_csr(w: torch.Tensor, keep: torch.Tensor) -> dict:
    n, k = w.shape
    rows, cols = keep.nonzero(as_tuple=True)
    idx_dtype = torch.int16 if k <= U16_MAX_K else torch.int32
    # int32 -> int16 keeps the low 16 bits: columns 32768..65535 read back as uint16
    col_idx = cols.to(torch.int32)
    col_idx = (col_idx - (col_idx >= 32768).to(torch.int32) * 65536).to(idx_dtype) \
        if idx_dtype is torch.int16 else col_idx
    return {"values": w[rows, cols].contiguous(), "row_ptr": _row_ptr(keep.sum(1)),
            "col_idx": col_idx.contiguous()}


def to_bitmask(w: torch.Tensor, keep: torch.Tensor) -> dict:
    return {"values": w[keep].contiguous(), "row_ptr": _row_ptr(keep.sum(1)),
            "bitmask": pack_bits(keep)}


def nm_fill(keep: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """keep with exactly n set per group of m: groups with fewer get the first
    unset positions added (they hold zeros); more than n is an error."""
    rows, k = keep.shape
    g = keep.reshape(rows, k // m, m)
    cnt = g.sum(-1)
    if bool((cnt > n).any()):
        raise ValueError(f"mask keeps more than {n} of {m} in some group; it is not {n}:{m}")
    # rank the positions: kept first, then unset ones left to right; take n
    order = torch.argsort((~g).to(torch.int8) * m + torch.arange(m, device=keep.device),
                          dim=-1, stable=True)
    filled = torch.zeros_like(g)
    filled.scatter_(-1, order[..., :n], True)
    return filled.reshape(rows, k)


def to_nm(w: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> dict:
    filled = nm_fill(keep, n, m)
    vals = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return {"values": vals[filled].contiguous(), "row_ptr": _row_ptr(filled.sum(1)),
            "bitmask": pack_bits(filled)}


def to_bsr(w: torch.Tensor, keep: torch.Tensor, block: tuple[int, int]) -> dict:
    bh, bw = block
    n, k = w.shape
    wz = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
    blocks = wz.reshape(n // bh, bh, k // bw, bw).transpose(1, 2)      # [R, C, bh, bw]
    kept = keep.reshape(n // bh, bh, k // bw, bw).any(3).any(1)        # [R, C]
    r, c = kept.nonzero(as_tuple=True)
    return {"values": blocks[r, c].contiguous(), "block_row_ptr": _row_ptr(kept.sum(1)),
            "block_col": c.to(torch.int32).contiguous()}


def rows_of(ptr: torch.Tensor) -> torch.Tensor:
    """The row (block row for bsr) of every stored entry, from its pointer array."""
    return torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), ptr.diff())


def columns(col_idx: torch.Tensor) -> torch.Tensor:
    """csr column indices as int64 (int16 storage holds unsigned columns)."""
    cols = col_idx.to(torch.int64)
    return cols & 0xFFFF if col_idx.dtype is torch.int16 else cols


def _slots(fmt: str, t: dict, shape: tuple[int, int]):
    """(view, index): ``view(dense)[index]`` are the layout's values' places
    in a dense [N, K] weight, in the layout's order."""
    n, k = shape
    if fmt == "csr":
        return (lambda d: d), (rows_of(t["row_ptr"]), columns(t["col_idx"]))
    if fmt in ("bitmask", "nm"):
        return (lambda d: d), unpack_bits(t["bitmask"], k)
    if fmt == "bsr":
        bh, bw = t["values"].shape[1:]
        return ((lambda d: d.view(n // bh, bh, k // bw, bw).transpose(1, 2)),
                (rows_of(t["block_row_ptr"]), t["block_col"].to(torch.int64)))
    raise ValueError(f"unknown sparse format {fmt!r}")


def to_dense(fmt: str, t: dict, shape: tuple[int, int]) -> torch.Tensor:
    """The dense weight a format holds (zeros at pruned positions)."""
    vals = t["values"]
    out = torch.zeros(shape, dtype=vals.dtype, device=vals.device)
    view, index = _slots(fmt, t, shape)
    view(out)[index] = vals
    return out


def take(fmt: str, t: dict, dense: torch.Tensor) -> torch.Tensor:
    """The entries of a dense [N, K] tensor at the layout's places, shaped
    like its values (the inverse of to_dense)."""
    view, index = _slots(fmt, t, tuple(dense.shape))
    return view(dense.contiguous())[index]


def build(fmt: str, w: torch.Tensor, keep: torch.Tensor, *, nm=(2, 4), block=(32, 32)) -> dict:
    if fmt == "csr":
        return to_csr(w, keep)
    if fmt == "bitmask":
        return to_bitmask(w, keep)
    if fmt == "nm":
        return to_nm(w, keep, *nm)
    if fmt == "bsr":
        return to_bsr(w, keep, block)
    raise ValueError(f"unknown sparse format {fmt!r}; expected one of {', '.join(FORMATS)} or dense")


def validate(fmt: str, t: dict, shape: tuple[int, int], *, nm=(2, 4), where="SparseLinear") -> None:
    """Check that ``t`` is a well-formed ``fmt`` layout for a weight of ``shape``.

    The kernels trust these tensors (they index memory with them), so
    anything loaded from a state_dict goes through here first: a bad layout
    is a ValueError, never an out-of-bounds read.
    """
    n, k = shape
    if fmt not in FORMATS:
        raise ValueError(f"{where}: unknown sparse format {fmt!r}")
    missing = [f for f in FIELDS[fmt] if f not in t]
    if missing:
        raise ValueError(f"{where}: {fmt} layout is missing {', '.join(missing)}")
    vals, ptr, idx = (t[f] for f in FIELDS[fmt])
    dev = vals.device

    def bad(msg):
        raise ValueError(f"{where}: invalid {fmt} layout for a [{n}, {k}] weight: {msg}")

    for name, x in zip(FIELDS[fmt], (vals, ptr, idx)):
        if not isinstance(x, torch.Tensor) or x.layout is not torch.strided:
            bad(f"{name} must be a dense tensor")
        if x.device != dev:
            bad(f"{name} is on {x.device}, values on {dev}")
        if not x.is_contiguous():
            bad(f"{name} must be contiguous")
    if vals.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        bad(f"values dtype {vals.dtype} is not float32, bfloat16 or float16")
    if ptr.dtype is not torch.int64 or ptr.dim() != 1:
        bad(f"{FIELDS[fmt][1]} must be 1-D int64")
    rows = n // vals.shape[1] if fmt == "bsr" and vals.dim() == 3 and vals.shape[1] else n
    if ptr.numel() != rows + 1:
        bad(f"{FIELDS[fmt][1]} has {ptr.numel()} entries, expected {rows + 1}")
    if int(ptr[0]) != 0 or bool((ptr.diff() < 0).any()):
        bad(f"{FIELDS[fmt][1]} must start at 0 and never decrease")
    total = int(ptr[-1])
    if fmt == "bsr":
        if vals.dim() != 3 or vals.shape[1] <= 0 or vals.shape[2] <= 0:
            bad("values must be [nblocks, bh, bw]")
        bh, bw = vals.shape[1], vals.shape[2]
        if n % bh or k % bw:
            bad(f"block {bh}x{bw} does not divide the weight")
        if idx.dtype is not torch.int32 or idx.numel() != total or vals.shape[0] != total:
            bad("block_col must be int32 with one entry per block, as many as values' blocks")
        if total and (int(idx.min()) < 0 or int(idx.max()) >= k // bw):
            bad("block_col out of range")
        return
    if vals.dim() != 1 or vals.numel() != total:
        bad(f"values must be 1-D with row_ptr[-1]={total} entries, got {tuple(vals.shape)}")
    if fmt == "csr":
        if idx.dtype not in (torch.int16, torch.int32) or idx.numel() != total:
            bad("col_idx must be int16 (unsigned columns) or int32, one per value")
        if idx.dtype is torch.int16 and k > U16_MAX_K:
            bad(f"int16 columns cannot address in_features={k} > {U16_MAX_K}")
        if total:
            cols = columns(idx)
            if int(cols.min()) < 0 or int(cols.max()) >= k:
                bad("col_idx out of range")
        return
    words = (k + 63) // 64
    if idx.dtype is not torch.int64 or tuple(idx.shape) != (n, words):
        bad(f"bitmask must be int64 [{n}, {words}]")
    keep = unpack_bits(idx, words * 64)
    if words * 64 > k and bool(keep[:, k:].any()):
        bad("bitmask has bits set past in_features")
    if not torch.equal(keep.sum(1), ptr.diff()):
        bad("bitmask row counts do not match row_ptr")
    if fmt == "nm":
        gn, gm = nm
        if k % gm:
            bad(f"in_features={k} is not a multiple of m={gm}")
        if not bool((keep[:, :k].reshape(n, k // gm, gm).sum(-1) == gn).all()):
            bad(f"not exactly {gn} of every {gm} positions kept")
