"""Build ``_C_cuda`` from the real csrc/cuda/optim.cu and csrc/bind_cuda.cpp
with the host compiler, against the emulated runtime in include/.

The only change to the sources is mechanical: each ``kernel<<<grid, block,
smem, stream>>>(args);`` becomes ``::emu::launch(grid, block, smem, stream,
[=] { kernel(args); });``. The module is cached by a hash of its inputs.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
# The CPU build's math flags: no FMA contraction, no errno. No -mfma either,
# so optim_math.h takes the plain division, as nvcc does.
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=off",
         "-fno-math-errno", "-fvisibility=hidden", "-w"]
LAUNCH = re.compile(r"(\w+(?:<\w+>)?)<<<(.+?)>>>\((.*?)\);")
TRANSFORMED = ("cuda/optim.cu", "cuda/multi_tensor_apply.cuh")


def host_source(text: str, name: str) -> str:
    out, n = LAUNCH.subn(lambda m: f"::emu::launch({m[2]}, [=] {{ {m[1]}({m[3]}); }});", text)
    if n != text.count("<<<"):
        raise RuntimeError(f"cuda_emu: {name} has a launch the rewrite does not understand")
    return out


def inputs() -> list[Path]:
    deps = sorted((CSRC / "cuda").glob("*")) + sorted((CSRC / "common").glob("*"))
    return deps + [CSRC / "bind_cuda.cpp", *sorted(HERE.glob("include/*")), HERE / "stubs.cpp",
                   Path(__file__)]


def build(cache_root: Path | None = None) -> Path:
    """Path of the built extension module (built if not cached)."""
    import pybind11

    flags = FLAGS + os.environ.get("PYOPT_EMU_CXXFLAGS", "").split()   # e.g. -g -fsanitize=address
    h = hashlib.sha256(" ".join(flags).encode())
    for p in inputs():
        h.update(p.name.encode() + p.read_bytes())
    cache = (cache_root or ROOT / "build" / "cuda_emu") / h.hexdigest()[:16]
    so = cache / ("_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    if so.exists():
        return so
    src = cache / "src"
    (src / "cuda").mkdir(parents=True, exist_ok=True)
    for rel in TRANSFORMED:
        (src / rel).write_text(host_source((CSRC / rel).read_text(), rel))
    cmd = [os.environ.get("CXX", "g++"), *flags,
           f"-I{HERE / 'include'}", f"-I{src}", f"-I{CSRC}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           # optim.cu is C++ here: -x c++ for it alone, then back to automatic
           "-x", "c++", str(src / "cuda" / "optim.cu"), "-x", "none",
           str(CSRC / "bind_cuda.cpp"), str(HERE / "stubs.cpp"), "-o", str(so) + ".tmp"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuda_emu: the host build failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
    os.replace(str(so) + ".tmp", so)
    return so


if __name__ == "__main__":
    print(build())
