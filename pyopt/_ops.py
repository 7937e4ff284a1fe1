"""torch.library custom ops (schemas + fake impls), so torch.compile and
FakeTensor tracing see opaque, correct ops. Eager code calls the kernels
directly; these wrappers dispatch to the same backends."""
from __future__ import annotations

import torch
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
