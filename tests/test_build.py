"""The build as installed: `pyopt info`, the native modules, forced ISA
variants and the numba cache fallback."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import pyopt
from conftest import run_python


def _info_json(env=None):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "pyopt", "info", "--json"], capture_output=True,
                       text=True, env=e, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_info_reports_native_cpu_module():
    d = _info_json()
    assert d["version"] == pyopt.__version__
    cpu = d["cpu_module"]
    assert cpu["built"], f"native CPU module missing: {cpu.get('reason')}"
    assert set(cpu["isa_variants"]) >= {"baseline"}
    assert d["cpu_isa"]["in_use"] in cpu["isa_variants"]
    assert d["backends"]["cpu"]["native"]["available"]
    assert d["backends"]["cpu"]["auto"] == "native"
    assert d["threads"]["torch"] >= 1
    # portable wheels: no flag tunes the build to the machine that built it
    flags = " ".join([cpu["flags"], *cpu["isa_flags"].values()])
    assert "-march" not in flags and "-mtune" not in flags and "/arch:native" not in flags


def test_cli_text_output_names_every_backend():
    r = subprocess.run([sys.executable, "-m", "pyopt", "info"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("CPU module", "CPU ISA", "CUDA module", "native", "numba", "torch"):
        assert word in r.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: _C_cuda is not built")
def test_info_reports_cuda_module_when_nvcc_is_present():
    d = _info_json()
    if d["cpu_module"].get("cuda_option") == "OFF":
        pytest.skip("this build was made with PYOPT_CUDA=OFF (a CPU wheel)")
    g = d["cuda_module"]
    assert g["built"], g
    assert g["cuda_version"] and "80" in g["archs"] and "90" in g["archs"]
    if g["device_count"] == 0:
        assert g["status"].startswith("CUDA module present, no device")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: _C_cuda is not built")
def test_cuda_module_without_device_raises_instead_of_crashing():
    from pyopt import _backends
    mod = _backends.cuda_module()
    if not mod or mod.device_count() > 0:
        pytest.skip("needs the CUDA module on a machine without a usable device")
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.adam_step(0, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, 0, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        mod.adam_step(0, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, 7, 0, 0)


# Runs a few AdamW steps on the native backend in every dtype and prints a
# digest of the results next to the ISA that ran them.
_ISA_RUN = """
import hashlib, torch, pyopt
from pyopt import _backends
digest = hashlib.sha256()
for dt in (torch.float32, torch.bfloat16, torch.float16):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=g).to(dt).requires_grad_() for n in (1, 17, 4097, 70000)]
    opt = pyopt.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, backend={backend!r})
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dt)
        opt.step()
    for p in ps:
        digest.update(p.detach().float().numpy().tobytes())
print(_backends.cpu_module().current_isa(), digest.hexdigest())
"""


def test_every_isa_variant_gives_the_same_bits_as_the_reference():
    d = _info_json()
    supported = d["cpu_isa"]["supported"]
    assert "baseline" in supported
    ref = run_python(_ISA_RUN.format(backend="torch"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = ref.stdout.split()[1]
    for isa in supported:
        r = run_python(_ISA_RUN.format(backend="native"), env={"PYOPT_CPU_ISA": isa})
        assert r.returncode == 0, r.stderr[-2000:]
        used, digest = r.stdout.split()
        assert used == isa
        assert digest == want, f"{isa} differs from the torch reference"


def test_unknown_isa_is_a_clear_error_and_pyopt_still_imports():
    r = run_python("""
    import torch, pyopt
    d = pyopt.info()
    assert not d['backends']['cpu']['native']['available']
    print(d['backends']['cpu']['native']['reason'])
    p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3)
    for backend in ('native', 'auto'):   # auto does not fall back from a forced ISA
        try:
            pyopt.optim.Adam([p], backend=backend).step()
        except pyopt.BackendUnavailable as e:
            print('RAISED', backend, e)
    """, env={"PYOPT_CPU_ISA": "avx1024"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PYOPT_CPU_ISA='avx1024' is not one of avx512, avx2, baseline" in r.stdout
    assert "RAISED native" in r.stdout and "RAISED auto" in r.stdout


def test_unknown_backend_env_var_is_a_clear_error():
    r = run_python("""
    import torch, pyopt
    try:
        pyopt.optim.Adam([torch.zeros(2, requires_grad=True)])
    except ValueError as e:
        print('RAISED', e)
    """, env={"PYOPT_BACKEND": "fastest"})
    assert r.returncode == 0 and "PYOPT_BACKEND='fastest' is not a backend" in r.stdout, r.stderr


def test_numba_falls_back_when_no_cache_dir_is_writable():
    pytest.importorskip("numba")
    # numba raises RuntimeError at decoration time when no cache locator can
    # write (read-only install and HOME); simulate exactly that.
    r = run_python("""
    import warnings, numba, torch
    real = numba.njit
    def njit(*a, **k):
        if k.get('cache'):
            raise RuntimeError('cannot cache function: no locator available for file')
        return real(*a, **k)
    numba.njit = njit
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        import pyopt._numba.optim as nb
    assert not nb.CACHE_ENABLED
    assert any('numba cache disabled' in str(x.message) for x in w)
    import pyopt
    p = torch.ones(5, requires_grad=True); p.grad = torch.ones(5)
    q = p.detach().clone().requires_grad_(); q.grad = torch.ones(5)
    pyopt.optim.AdamW([p], backend='numba').step()
    torch.optim.AdamW([q]).step()
    assert torch.allclose(p, q)
    print('OK')
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_numba_with_unwritable_cache_dir_still_runs():
    pytest.importorskip("numba")
    r = run_python("""
    import torch, pyopt
    p = torch.ones(5, requires_grad=True); p.grad = torch.ones(5)
    pyopt.optim.AdamW([p], backend='numba').step()
    print('OK', p.detach()[0].item())
    """, env={"NUMBA_CACHE_DIR": "/dev/null/pyopt-cache"}, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_missing_native_module_still_imports_and_info_explains():
    """As on a platform without a native build: pyopt imports, auto falls back
    with a warning, forcing native raises with the reason, info says why."""
    r = run_python("""
    import sys, warnings, importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in ('pyopt._C', 'pyopt._C_cuda'):
                raise ImportError(f'{name}: simulated missing native build')
            return None

    sys.meta_path.insert(0, Block())
    import torch, pyopt
    d = pyopt.info()
    assert not d['cpu_module']['built'] and 'simulated' in d['cpu_module']['reason']
    assert d['backends']['cpu']['auto'] in ('numba', 'torch')
    p = torch.ones(3, requires_grad=True); p.grad = torch.ones(3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        pyopt.optim.AdamW([p]).step()
    assert any('native' in str(x.message) for x in w), [str(x.message) for x in w]
    try:
        pyopt.optim.AdamW([p], backend='native').step()
    except pyopt.BackendUnavailable as e:
        assert 'simulated' in str(e)
        print('OK')
    """, env={"PYOPT_CPU_ISA": ""})   # a forced ISA would (rightly) refuse the fallback
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "pyopt", "info"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0


def test_forcing_an_isa_the_cpu_lacks_is_a_clear_error():
    # This CPU may have every variant, so the C++ refusal is simulated; the
    # check itself is pyopt::isa_supported (CPUID + XGETBV) behind _C.set_isa.
    r = run_python("""
    import torch, pyopt, pyopt._C as C
    def refuse(name):
        raise ValueError(f"this CPU does not support ISA '{name}'")
    C.set_isa = refuse
    p = torch.ones(3, requires_grad=True); p.grad = torch.ones(3)
    try:
        pyopt.optim.AdamW([p]).step()
    except pyopt.BackendUnavailable as e:
        print('RAISED', e)
    """, env={"PYOPT_CPU_ISA": "avx512"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PYOPT_CPU_ISA='avx512': this CPU does not support ISA 'avx512'" in r.stdout


def test_set_isa_refuses_unknown_and_reports_support():
    from pyopt import _backends
    mod = _backends.cpu_module()
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        mod.set_isa("sse9")
    assert mod.isa_supported("baseline")
    best = mod.best_isa()
    assert mod.isa_supported(best)
    assert mod.current_isa() == (os.environ.get("PYOPT_CPU_ISA") or best)
