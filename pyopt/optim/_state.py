"""Optimizer state containers that count their own mutations.

The address tables cache raw pointers to state tensors. Re-reading every
state tensor on every step to see whether someone swapped one in (an
``optimizer_to(device)`` helper, a checkpoint surgeon) costs about 0.1 us per
tensor and key, a large share of a step over thousands of small tensors.
Instead ``opt.state`` and each per-parameter dict bump a shared counter
whenever an entry is set or removed, and a cached plan is reused only while
the counter is unchanged.

Both containers pickle and deepcopy as a plain ``defaultdict`` / ``dict``,
so checkpoints stay loadable by torch.optim without pyopt.
"""
from __future__ import annotations

from collections import defaultdict


class ParamState(dict):
    """One parameter's state (``opt.state[p]``): a dict that counts mutations."""

    __slots__ = ("_owner",)

    def __init__(self, owner, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        self._owner = owner

    def _touch(self):
        self._owner.version += 1

    def __setitem__(self, k, v):
        self._touch()
        dict.__setitem__(self, k, v)

    def __delitem__(self, k):
        self._touch()
        dict.__delitem__(self, k)

    def __ior__(self, other):
        self._touch()
        dict.update(self, other)
        return self

    def clear(self):
        self._touch()
        dict.clear(self)

    def pop(self, *args):
        self._touch()
        return dict.pop(self, *args)

    def popitem(self):
        self._touch()
        return dict.popitem(self)

    def setdefault(self, k, default=None):
        self._touch()
        return dict.setdefault(self, k, default)

    def update(self, *args, **kwargs):
        self._touch()
        dict.update(self, *args, **kwargs)

    def copy(self):
        return dict(self)

    def __reduce__(self):
        return (dict, (dict(self),))


class OptimizerState(defaultdict):
    """``opt.state``: param -> ParamState; new entries are ParamState."""

    def __init__(self, items=()):
        super().__init__(None)
        self.version = 0
        for k, v in dict(items).items():
            dict.__setitem__(self, k, ParamState(self, v) if type(v) is dict else v)

    def __missing__(self, key):
        v = ParamState(self)
        dict.__setitem__(self, key, v)
        return v

    def __setitem__(self, k, v):
        # Stored as given (a plain dict stays the caller's object); plans
        # holding a plain dict fall back to checking state tensors each step.
        self.version += 1
        dict.__setitem__(self, k, v)

    def __delitem__(self, k):
        self.version += 1
        dict.__delitem__(self, k)

    def clear(self):
        self.version += 1
        dict.clear(self)

    def pop(self, *args):
        self.version += 1
        return dict.pop(self, *args)

    def popitem(self):
        self.version += 1
        return dict.popitem(self)

    def setdefault(self, k, default=None):
        self.version += 1
        return dict.setdefault(self, k, default)

    def update(self, *args, **kwargs):
        self.version += 1
        dict.update(self, *args, **kwargs)

    def __reduce__(self):
        return (defaultdict, (dict,), None, None, iter(self.items()))
