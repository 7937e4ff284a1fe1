"""Fused optimizers: change ``torch.optim`` to ``pyopt.optim`` in the import."""
from .adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
