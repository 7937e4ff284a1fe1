"""Sparse Linear layers for pruned weights: formats, SparseLinear, sparsify_.

    masks = pyopt.prune.magnitude(model, sparsity=0.9)
    pyopt.sparse.sparsify_(model)        # pruned nn.Linear -> SparseLinear
"""
from .. import _ops  # noqa: F401  (registers pyopt::sparse_linear)
from . import formats
from .linear import SparseLinear, sparsify_

__all__ = ["SparseLinear", "sparsify_", "formats"]
