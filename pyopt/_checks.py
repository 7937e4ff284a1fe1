"""Argument validation. Every tensor is checked here before its address goes
to native code: a wrong argument is a Python exception that names it, never a
crash or a silent wrong answer."""
from __future__ import annotations

import math

import torch

# dtype codes shared with csrc/common/optim_math.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SUPPORTED = "float32, bfloat16 or float16"


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = ()


def local(t):
    """The local shard of a DTensor (what the kernels address), else t itself."""
    return t._local_tensor if _DTensor and isinstance(t, _DTensor) else t


def scalar(x, name: str) -> float:
    """A Python float from a float or a 1-element tensor."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(x.shape)}")
        if x.requires_grad:
            raise ValueError(f"{name} must not require grad (differentiable=True is not supported)")
        return float(x.item())
    return float(x)


def lr_value(lr, read_device: bool = True) -> float:
    """lr as a float for the range checks. A tensor lr on an accelerator is
    only read when ``read_device`` (the constructor, as torch does): the
    per-step checks must not synchronize, or a CUDA graph could not capture
    the step; 0.0 stands in for it."""
    if not read_device and isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if lr.requires_grad:
            raise ValueError("lr must not require grad (differentiable=True is not supported)")
        return 0.0
    return scalar(lr, "lr")


def adam_hyper(lr, betas, eps, weight_decay, read_device: bool = True) -> None:
    """torch.optim.Adam's constructor checks, with the same messages."""
    lr_f = lr_value(lr, read_device)
    if not 0.0 <= lr_f:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {betas!r}")
    b0, b1 = scalar(betas[0], "betas[0]"), scalar(betas[1], "betas[1]")
    if not 0.0 <= b0 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    for name, v in (("lr", lr_f), ("eps", eps), ("weight_decay", weight_decay)):
        if math.isnan(float(v)):
            raise ValueError(f"Invalid {name}: NaN")


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory
    (contiguous, or a permutation of it such as channels_last)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _plain(t, where, what):
    """Tensor subclasses other than Parameter and DTensor may not own their
    data (wrapper subclasses): their data_ptr() is not the elements."""
    if not (type(t) in (torch.Tensor, torch.nn.Parameter)
            or (_DTensor and isinstance(t, _DTensor))):
        raise TypeError(f"{where}: {what} of tensor subclass {type(t).__name__} is not "
                        "supported by pyopt's kernels; use torch.optim for it")


def _same_layout(p: torch.Tensor, t: torch.Tensor) -> bool:
    """t is laid out like p in memory, so one element index addresses both."""
    return t.is_contiguous() if p.is_contiguous() else t.stride() == p.stride()


def param(p: torch.Tensor, where: str) -> None:
    """A parameter the native optimizers can update in place."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: expected a Tensor, got {type(p).__name__}")
    _plain(p, where, "parameter")
    if p.layout is not torch.strided:
        raise ValueError(f"{where}: {p.layout} parameters are not supported")
    if p.is_complex():
        raise TypeError(f"{where}: complex parameters ({p.dtype}) are not supported yet; "
                        "use torch.optim, or view_as_real the parameter")
    if p.dtype not in DTYPE_CODES:
        raise TypeError(f"{where}: parameter dtype {p.dtype} is not supported (expected {SUPPORTED})")
    if not is_dense(p):
        raise ValueError(f"{where}: parameter with shape {tuple(p.shape)} and strides {p.stride()} "
                         "has gaps or overlaps in memory; pass a contiguous parameter")


def grad(p: torch.Tensor, g: torch.Tensor, where: str, optimizer: str) -> None:
    """The gradient of ``p`` as the kernels read it: same dtype, shape, device
    and memory layout as the parameter."""
    _plain(g, where, "gradient")
    if g.is_sparse or g.layout is not torch.strided:
        raise RuntimeError(f"{optimizer} does not support sparse gradients ({where}), "
                           "please consider SparseAdam instead")
    if g.is_complex() and not p.is_complex():
        raise TypeError(f"{where}: complex gradient for a real parameter")
    if g.dtype != p.dtype:
        raise TypeError(f"{where}: gradient dtype {g.dtype} differs from parameter dtype {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"{where}: gradient shape {tuple(g.shape)} differs from parameter "
                         f"shape {tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"{where}: gradient on {g.device} but parameter on {p.device}")
    if not _same_layout(p, g):
        raise ValueError(f"{where}: gradient strides {g.stride()} differ from parameter "
                         f"strides {p.stride()}; make the gradient match the parameter layout")


def mask(p: torch.Tensor, m, where: str) -> None:
    """A pruning mask the kernels can read next to ``p``: one byte per element."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{where}: mask must be a Tensor, got {type(m).__name__}")
    if m.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{where}: mask dtype must be torch.bool or torch.uint8, got {m.dtype}")
    if m.shape != p.shape:
        raise ValueError(f"{where}: mask shape {tuple(m.shape)} differs from parameter shape "
                         f"{tuple(p.shape)}")
    if m.device != p.device:
        raise ValueError(f"{where}: mask on {m.device} but parameter on {p.device}")
    if m.layout is not torch.strided or not _same_layout(p, m):
        raise ValueError(f"{where}: mask strides {m.stride()} differ from parameter strides "
                         f"{p.stride()}; pass a mask with the parameter's memory layout")
