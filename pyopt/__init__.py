"""pyopt: fused optimizers and fast kernels for PyTorch.

Importing pyopt never fails because a native module or a GPU is missing;
``pyopt.info()`` (or ``pyopt info`` on the command line) says what is usable.
"""
from ._version import __version__
from . import amp, optim, prune, quant, sparse
from .optim.clip import clip_grad_norm_
from ._backends import BackendUnavailable
from ._info import info

__all__ = ["__version__", "amp", "optim", "prune", "sparse", "quant", "clip_grad_norm_", "info", "BackendUnavailable"]
