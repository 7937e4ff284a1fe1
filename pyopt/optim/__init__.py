"""Fused optimizers: change ``torch.optim`` to ``pyopt.optim`` in the import."""
from .adam import Adam, AdamW
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["Adam", "AdamW", "RMSprop", "SGD"]
