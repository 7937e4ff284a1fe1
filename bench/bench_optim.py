#!/usr/bin/env python3
"""Optimizer benchmark of issue 2: pyopt native and numba against
torch.optim.AdamW (foreach=False, foreach=True, fused=True), each case timed
in alternation with the same-run in-place read-modify-write bandwidth.

    python bench/bench_optim.py [--min-time 1.0] [--out results/optim]

Same as `pyopt bench optim`; kept here so the numbers in the README have a
script next to them.
"""
import sys

from pyopt.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["optim", *sys.argv[1:]]))
