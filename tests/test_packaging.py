"""Build configurations that CI cannot see from an installed wheel: the
portable (non-x86) kernels, an aarch64 cross-compile when a cross compiler
is present, and PYOPT_CUDA=ON without nvcc."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmake_configure(build_dir, *defines, env=None):
    pybind11 = pytest.importorskip("pybind11", reason="build tools not installed here "
                                   "(an installed-wheel test environment)")
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed here")
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *defines],
        capture_output=True, text=True, env=e, timeout=300)


def _build_and_check(build_dir, isa_variants, *defines, env=None):
    """Configure and build the CPU module alone, load it in place of the
    installed one and check its AdamW against the torch reference, bitwise."""
    r = _cmake_configure(build_dir, *defines, env={"PYOPT_CUDA": "OFF", **(env or {})})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run(["cmake", "--build", str(build_dir), "-j2"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    so = [f for f in os.listdir(build_dir) if f.startswith("_C.") and f.endswith(".so")]
    assert so, os.listdir(build_dir)
    code = f"""
import importlib.util, sys, torch, pyopt
spec = importlib.util.spec_from_file_location("pyopt._C", {os.path.join(str(build_dir), so[0])!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
assert mod.build_info()["isa_variants"] == {isa_variants!r}, mod.build_info()
print("compiler", mod.build_info()["compiler"], "openmp", mod.build_info()["openmp"])
sys.modules["pyopt._C"] = mod; pyopt._C = mod
from pyopt import _backends; _backends.clear_cache()
for isa in {isa_variants!r}.split(","):
    mod.set_isa(isa)
    outs = []
    for b in ("native", "torch"):
        p = torch.linspace(-1, 1, 70000).requires_grad_()
        o = pyopt.optim.AdamW([p], backend=b, lr=1e-2)
        for i in range(3):
            p.grad = torch.cos(torch.arange(70000.0) * (i + 1))
            o.step()
        outs.append(p.detach())
    assert torch.equal(outs[0], outs[1]), isa
print("BUILD-OK")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "BUILD-OK" in r.stdout, r.stdout + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_portable_build_compiles_and_runs(tmp_path):
    """PYOPT_FORCE_PORTABLE builds only the baseline kernels, with no x86
    intrinsics or CPUID: the code path of aarch64 and other platforms."""
    _build_and_check(tmp_path, "baseline", "-DPYOPT_FORCE_PORTABLE=ON")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed (apt install clang)")
def test_clang_build_compiles_and_runs(tmp_path):
    """The macOS compiler family; without clang's OpenMP runtime (libomp) it
    also checks the single-threaded fallback that macOS wheels use."""
    out = _build_and_check(tmp_path, "baseline,avx2,avx512", env={"CXX": shutil.which("clang++")})
    assert "Clang" in out


CROSS = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (apt install g++-aarch64-linux-gnu)")
def test_kernels_cross_compile_for_aarch64(tmp_path):
    kernels = tmp_path / "optim_baseline.cpp"
    kernels.write_text('#define PYOPT_ISA baseline\n#include "cpu/optim_kernels.h"\n')
    for src in (os.path.join(ROOT, "csrc/cpu/isa.cpp"), os.path.join(ROOT, "csrc/cpu/optim.cpp"),
                str(kernels)):
        r = subprocess.run([CROSS, "-std=c++17", "-O3", "-fopenmp", "-ffp-contract=off",
                            "-I", os.path.join(ROOT, "csrc"), "-c", src, "-o",
                            str(tmp_path / (os.path.basename(src) + ".o"))],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]


def test_cuda_on_without_nvcc_fails_with_instructions(tmp_path):
    env = {"PYOPT_CUDA": "ON", "CUDACXX": "/nonexistent/nvcc",
           "PATH": "/usr/bin:/bin", "CUDA_PATH": "/nonexistent"}
    r = _cmake_configure(tmp_path, env=env)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "PYOPT_CUDA=ON but no CUDA compiler (nvcc) was found" in out, out[-3000:]
    assert "PYOPT_CUDA=OFF" in out
