"""Pure-torch Adam/AdamW step: the readable spec of csrc/common/optim_math.h.

Every tensor is upcast to float32, the per-element math runs with plain torch
ops in exactly the order of ``pyopt::adam_math`` (no torch.lerp/addcdiv, whose
fused rounding differs), and the result is copied back to the storage dtype
(``copy_`` rounds to nearest even). Works on any device; the step counters are
0-d float32 CPU tensors and the bias corrections are computed on the host in
float64, once per tensor, as torch.optim does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["adam_hyper", "adam_tensor_scalars", "adam_step"]

f32 = np.float32


def adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled):
    """Per-call scalars of ``pyopt::AdamHyper`` as float32 (numpy) values.

    Returns (one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    decay_factor, wd_mode) with wd_mode 0 = none, 1 = L2, 2 = decoupled.
    """
    wd_mode = 0 if weight_decay == 0 else (2 if decoupled else 1)
    return (
        f32(1.0 - beta1),                 # computed in float64, rounded once
        f32(beta2),
        f32(1.0 - beta2),
        f32(eps),
        f32(weight_decay),
        f32(1.0 - float(lr) * weight_decay),
        wd_mode,
    )


def adam_tensor_scalars(step, lr, beta1, beta2):
    """(neg_step_size, bc2_sqrt) of ``pyopt::AdamTensorScalars`` for step count ``step``."""
    step = float(step)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return f32(-(float(lr) / bc1)), f32(math.sqrt(bc2))


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *,
              lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled):
    """One Adam (decoupled=False) or AdamW (decoupled=True) step, in place."""
    lr = float(lr)
    w, b2, omb2, eps_, wd, decay, wd_mode = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled)
    one_minus_w = f32(1) - w
    # Python floats that are exactly the float32 constants; torch applies them as float32.
    w, b2, omb2, eps_, wd, decay, one_minus_w = map(float, (w, b2, omb2, eps_, wd, decay, one_minus_w))
    lerp_low = w < 0.5

    for i, param in enumerate(params):
        steps[i].add_(1)
        neg_step_size, bc2_sqrt = map(float, adam_tensor_scalars(steps[i].item(), lr, beta1, beta2))

        p = param.float()
        g = grads[i].float()
        m = exp_avgs[i].float()
        v = exp_avg_sqs[i].float()

        if maximize:
            g = -g
        if wd_mode == 1:
            g = g + wd * p
        elif wd_mode == 2:
            p = p * decay
        # torch.lerp's two-sided formula, written out
        m = m + w * (g - m) if lerp_low else g - (g - m) * one_minus_w
        v = v * b2 + (omb2 * g) * g
        vv = v
        if amsgrad:
            vmax = max_exp_avg_sqs[i].float()
            vmax = torch.where((vmax < v) | (v != v), v, vmax)  # torch.maximum: NaN wins
            max_exp_avg_sqs[i].copy_(vmax)
            vv = vmax
        # torch's vectorised float32 sqrt on CPU can be 1 ulp off; the float64
        # sqrt rounded once to float32 is the correctly rounded sqrtf that the
        # kernels use (sqrt is safe from double rounding at 53 -> 24 bits).
        denom = vv.double().sqrt().float() / bc2_sqrt + eps_
        p = p + neg_step_size * (m / denom)

        param.copy_(p)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)


def _float_param_and_grad(param, grad, maximize, weight_decay):
    """float32 copies of param and the gradient as SGD and RMSprop use it:
    negated for maximize, plus weight_decay * param (L2) when nonzero."""
    p, g = param.float(), grad.float()
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    return p, g


def sgd_step(params, grads, momentum_buffers, firsts, *, lr, momentum, dampening,
             weight_decay, nesterov, maximize):
    """One SGD step in the order of ``pyopt::sgd_math``. ``firsts[i]``: the
    buffer is new and starts as a copy of the (decayed) gradient."""
    neg_lr, wd, mom, omd = map(float, (f32(-float(lr)), f32(weight_decay), f32(momentum),
                                       f32(1.0 - dampening)))
    for i, param in enumerate(params):
        p, g = _float_param_and_grad(param, grads[i], maximize, wd)
        if momentum != 0:
            buf = g if firsts[i] else momentum_buffers[i].float() * mom + omd * g
            momentum_buffers[i].copy_(buf)
            g = g + mom * buf if nesterov else buf
        param.copy_(p + neg_lr * g)


def rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, steps, *, lr, alpha,
                 eps, weight_decay, momentum, centered, maximize):
    """One RMSprop step in the order of ``pyopt::rmsprop_math``."""
    neg_lr, a, oma, eps_, wd, mom = map(float, (f32(-float(lr)), f32(alpha), f32(1.0 - alpha),
                                                f32(eps), f32(weight_decay), f32(momentum)))
    lerp_low = oma < 0.5
    one_minus_w = float(f32(1) - f32(oma))
    for i, param in enumerate(params):
        steps[i].add_(1)
        p, g = _float_param_and_grad(param, grads[i], maximize, wd)
        sq = square_avgs[i].float() * a + (oma * g) * g
        square_avgs[i].copy_(sq)
        if centered:
            ga = grad_avgs[i].float()
            ga = ga + oma * (g - ga) if lerp_low else g - (g - ga) * one_minus_w
            grad_avgs[i].copy_(ga)
            avg = (sq + (-1.0 * ga) * ga).double().sqrt().float()
        else:
            avg = sq.double().sqrt().float()
        avg = avg + eps_
        if momentum > 0:
            buf = momentum_buffers[i].float() * mom + g / avg
            momentum_buffers[i].copy_(buf)
            param.copy_(p + neg_lr * buf)
        else:
            param.copy_(p + neg_lr * (g / avg))
