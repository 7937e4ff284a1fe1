"""torch.library custom ops (schemas + fake impls), so torch.compile and
FakeTensor tracing see opaque, correct ops. Eager code calls the kernels
directly; these wrappers dispatch to the same backends."""
from __future__ import annotations

import torch
from typing import Optional

from torch import Tensor


@torch.library.custom_op("pyopt::adam_step_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                                       "state_steps"))
def adam_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
               state_steps: list[Tensor], lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, amsgrad: bool, maximize: bool, decoupled: bool) -> None:
    """In-place fused Adam/AdamW step (see pyopt.optim.functional.adam)."""
    from .optim.functional import adam
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr,
         beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
         maximize=maximize, decoupled=decoupled)


@adam_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
      eps, weight_decay, amsgrad, maximize, decoupled) -> None:
    return None


@torch.library.custom_op("pyopt::sgd_step_", mutates_args=("params", "momentum_buffers"))
def sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
              lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
              maximize: bool, first_step: bool) -> None:
    """In-place fused SGD step (see pyopt.optim.functional.sgd)."""
    from .optim.functional import sgd
    sgd(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step)


@sgd_step_.register_fake
def _(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
      maximize, first_step) -> None:
    return None


@torch.library.custom_op("pyopt::rmsprop_step_",
                         mutates_args=("params", "square_avgs", "momentum_buffers", "grad_avgs",
                                       "state_steps"))
def rmsprop_step_(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                  momentum_buffers: list[Tensor], grad_avgs: list[Tensor],
                  state_steps: list[Tensor], lr: float, alpha: float, eps: float,
                  weight_decay: float, momentum: float, centered: bool, maximize: bool) -> None:
    """In-place fused RMSprop step (see pyopt.optim.functional.rmsprop)."""
    from .optim.functional import rmsprop
    rmsprop(params, grads, square_avgs, momentum_buffers, grad_avgs, state_steps, lr=lr,
            alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, maximize=maximize)


@rmsprop_step_.register_fake
def _(params, grads, square_avgs, momentum_buffers, grad_avgs, state_steps, lr, alpha, eps,
      weight_decay, momentum, centered, maximize) -> None:
    return None


# -- sparse linear ------------------------------------------------------------
@torch.library.custom_op("pyopt::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, values: Tensor, ptr: Tensor, idx: Tensor, bias: Optional[Tensor],
                  fmt: str, n: int, backend: Optional[str] = None) -> Tensor:
    """x [..., K] @ W.T + bias with W in a pyopt.sparse.formats layout."""
    from .sparse import _kernels
    return _kernels.linear_nd(x, values, ptr, idx, bias, fmt, n, backend)


@sparse_linear.register_fake
def _(x, values, ptr, idx, bias, fmt, n, backend=None):
    return x.new_empty(*x.shape[:-1], n)


def _sparse_setup(ctx, inputs, output):
    x, values, ptr, idx, bias, fmt, n, _ = inputs
    ctx.save_for_backward(x, values, ptr, idx)
    ctx.fmt, ctx.n, ctx.has_bias = fmt, n, bias is not None


def _sparse_backward(ctx, grad):
    # Dense GEMMs: the input grad needs W (rebuilt from the layout) and the
    # kept weights' grads are entries of grad.T @ x.
    from .sparse import formats
    x, values, ptr, idx = ctx.saved_tensors
    fmt, n = ctx.fmt, ctx.n
    k = x.shape[-1]
    g2, x2 = grad.reshape(-1, n), x.reshape(-1, k)
    t = dict(zip(formats.FIELDS[fmt], (values, ptr, idx)))
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = (g2 @ formats.to_dense(fmt, t, (n, k))).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        gv = formats.take(fmt, t, g2.t() @ x2)
        if fmt in ("bsr", "nm"):
            # stored zeros (pruned positions inside a kept block, or N:M
            # padding) get no gradient, so a fine-tune keeps them pruned
            gv = gv * (values != 0)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = g2.sum(0)
    return gx, gv, None, None, gb, None, None, None


sparse_linear.register_autograd(_sparse_backward, setup_context=_sparse_setup)


# -- quantized linear ---------------------------------------------------------
@torch.library.custom_op("pyopt::quant_linear", mutates_args=())
def quant_linear(x: Tensor, qweight: Tensor, scale: Tensor, offset: Optional[Tensor],
                 bias: Optional[Tensor], bits: int, act: str,
                 backend: Optional[str] = None) -> Tensor:
    """x [..., K] @ dequant(W).T + bias with W in a pyopt.quant.formats layout."""
    from .quant import _kernels
    return _kernels.linear_nd(x, qweight, scale, offset, bias, bits, act, backend)


@quant_linear.register_fake
def _(x, qweight, scale, offset, bias, bits, act, backend=None):
    return x.new_empty(*x.shape[:-1], scale.shape[0])


def _quant_setup(ctx, inputs, output):
    x, qweight, scale, offset, _, bits, _, _ = inputs
    ctx.save_for_backward(qweight, scale, offset)
    ctx.bits, ctx.k = bits, x.shape[-1]


def _quant_backward(ctx, grad):
    # The input gradient through the dequantized weight (straight-through for
    # the activation quantization of act="int8"); the quantized weight and
    # its scales get none.
    from .quant.formats import dequantize
    qweight, scale, offset = ctx.saved_tensors
    w = dequantize({"qweight": qweight, "scale": scale, "offset": offset}, ctx.bits, ctx.k)
    gx = (grad.float() @ w).to(grad.dtype) if ctx.needs_input_grad[0] else None
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[4] else None
    return gx, None, None, None, gb, None, None, None


quant_linear.register_autograd(_quant_backward, setup_context=_quant_setup)
