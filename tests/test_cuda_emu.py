"""The CUDA optimizer kernels, run on the host.

tests/cuda_emu compiles the real csrc/cuda/optim.cu, multi_tensor_apply.cuh
and bind_cuda.cpp with the host compiler against an emulated CUDA runtime
(each block as 256 fibers switched at __syncthreads, so the barrier is real,
and a divergent one is an error). The
optimizers then step through that module exactly as they do on a GPU (the
same address tables, through ``_base.cuda_launch``), and every param, grad
and state tensor must equal the native CPU kernels' bit for bit (NaN
payloads aside: CUDA's bf16 NaN is 0x7fff). That covers the CUDA side's
multi-tensor chunking, tails and unaligned tensors, masks, master weights,
in-kernel unscaling, capturable step counts and found_inf, on machines
without a GPU. It cannot cover nvcc's code generation, the device memory
model, streams or CUDA graphs: tests/test_cuda.py does, where a GPU exists.
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyopt
from pyopt import _backends
from pyopt.optim import _base, adam, rmsprop, sgd

sys.path.insert(0, str(Path(__file__).parent / "cuda_emu"))
import emu_build  # noqa: E402


@pytest.fixture(scope="session")
def emu():
    so = emu_build.build()
    spec = importlib.util.spec_from_file_location("_C_cuda", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def on_emulated_cuda(emu, monkeypatch):
    """Native CPU buckets step through the emulated CUDA module instead,
    GradScaler's factor passed as the device grad_scale the kernel reads."""
    real = _base.launch

    def launch(op, backend, params, grads, table, args, grad_inv_scale=1.0, device_inputs=None):
        if backend != "native":
            return real(op, backend, params, grads, table, args, grad_inv_scale, device_inputs)
        kw, scale = {}, None
        if grad_inv_scale != 1.0:
            scale = torch.tensor([1.0 / grad_inv_scale], dtype=torch.float32)
            # the kernel computes 1/scale in double, rounded to float, as the host does
            assert np.float32(1.0 / np.float64(scale.item())) == np.float32(grad_inv_scale)
            kw = dict(grad_scale_addr=scale.data_ptr())
        _base.cuda_launch(emu, op, params, grads, table, args, 0, kw)
        return True

    for mod in (adam, sgd, rmsprop):
        monkeypatch.setattr(mod, "launch", launch)


def assert_same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), f"{what}: NaN positions differ"
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    ai, bi = a[~nan].view(ints[a.dtype]), b[~nan].view(ints[a.dtype])
    bad = (ai != bi).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {a.numel()} differ, first at "
                              f"{bad[0].item()}: {a[~nan][bad[0]].item()!r} vs "
                              f"{b[~nan][bad[0]].item()!r}")


LR = "tensor"
CONFIGS = {
    "Adam-default": ("Adam", {}),
    "Adam-wd": ("Adam", {"weight_decay": 0.1}),
    "Adam-amsgrad-maximize-wd": ("Adam", {"amsgrad": True, "maximize": True, "weight_decay": 0.1}),
    "Adam-tensor-lr": ("Adam", {"lr": LR}),
    "AdamW-wd": ("AdamW", {"weight_decay": 0.1}),
    "AdamW-amsgrad": ("AdamW", {"amsgrad": True}),
    "AdamW-betas-eps": ("AdamW", {"betas": (0.8, 0.99), "eps": 1e-6}),
    "AdamW-low-beta1": ("AdamW", {"betas": (0.2, 0.999)}),   # lerp's other side
    "SGD-plain": ("SGD", {"lr": 0.05}),
    "SGD-momentum": ("SGD", {"lr": 0.05, "momentum": 0.9}),
    "SGD-dampening": ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    "SGD-nesterov-wd": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                "weight_decay": 0.1}),
    "SGD-maximize-wd-momentum": ("SGD", {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1,
                                         "maximize": True}),
    "SGD-tensor-lr": ("SGD", {"lr": LR, "momentum": 0.9}),
    "RMSprop-default": ("RMSprop", {}),
    "RMSprop-centered": ("RMSprop", {"centered": True}),
    "RMSprop-momentum": ("RMSprop", {"momentum": 0.9}),
    "RMSprop-wd-maximize": ("RMSprop", {"weight_decay": 0.1, "maximize": True}),
    "RMSprop-centered-momentum-wd-maximize": ("RMSprop", {"centered": True, "momentum": 0.8,
                                                          "weight_decay": 0.1, "maximize": True}),
    "RMSprop-alpha-eps-tensor-lr": ("RMSprop", {"alpha": 0.9, "eps": 1e-4, "lr": LR}),
    "RMSprop-low-alpha-centered": ("RMSprop", {"alpha": 0.3, "centered": True}),
}
LAYOUTS = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
           "fp16": (torch.float16, False), "bf16-master": (torch.bfloat16, True),
           "fp16-master": (torch.float16, True)}
# A tail of one element, a partial vector, two chunks of 65536 plus a tail, a
# matrix, and a param whose storage starts one element in (the scalar path).
SIZES = [1, 7, 4097, 2 * 65536 + 5, (33, 65)]


def _params(dt, gen):
    ps = [torch.randn(s, generator=gen).to(dt) for s in SIZES]
    buf = torch.zeros(3001, dtype=dt)
    buf[1:].copy_(torch.randn(3000, generator=gen))
    ps.append(buf[1:])          # data_ptr not 16-byte aligned
    return ps


def _train(cls_name, opts, dt, master, seed, steps=12):
    gen = torch.Generator().manual_seed(seed)
    ps = [p.requires_grad_() for p in _params(dt, gen)]
    kw = {k: (torch.tensor(1e-2) if v is LR else v) for k, v in opts.items()}
    if master:
        kw["master_weights"] = True
    opt = getattr(pyopt.optim, cls_name)(ps, backend="native", **kw)
    masks = {2: torch.rand(SIZES[2], generator=gen) > 0.5,
             4: (torch.rand(SIZES[4], generator=gen) > 0.3).to(torch.uint8)}
    for i, m in masks.items():
        with torch.no_grad():
            ps[i].mul_(m)
        opt.set_mask(ps[i], m)
    for s in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(dt)
            if s == 3:
                p.grad.view(-1)[::97] = float("inf")
        if s % 3 == 1:   # GradScaler's protocol: the kernel unscales the grads
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
            for p in ps:
                p.grad.mul_(8)
        elif s == 5:     # found_inf: skipped, nothing changes
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
        else:
            opt.grad_scale = opt.found_inf = None
        opt.step()
    return ps, opt


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cuda_kernels_equal_the_cpu_kernels(config, layout, request, monkeypatch):
    cls_name, opts = CONFIGS[config]
    dt, master = LAYOUTS[layout]
    if master and dt == torch.float32:
        pytest.skip("not a master-weights layout")
    ref_ps, ref_opt = _train(cls_name, opts, dt, master, seed=1)
    request.getfixturevalue("on_emulated_cuda")
    # grids of 1 and 3 blocks: the grid-stride walk over chunks and tensors
    monkeypatch.setenv("PYOPT_EMU_DEVICE", str(len(config) % 2 * 2))
    ps, opt = _train(cls_name, opts, dt, master, seed=1)
    for i, (p, q) in enumerate(zip(ps, ref_ps)):
        assert_same_bits(p.detach(), q.detach(), f"param {i}")
        assert_same_bits(p.grad, q.grad, f"grad {i}")
        st, rst = opt.state[p], ref_opt.state[q]
        assert sorted(st) == sorted(rst)
        for key in st:
            assert_same_bits(st[key], rst[key], f"{key} {i}")
    for i in (2, 4):   # pruned positions stayed exactly zero
        assert (ps[i].detach()[opt._masks[ps[i]] == 0] == 0).all()


# ---------------------------------------------------------------- capturable
# Tables built by hand (layout: csrc/common/optim_table.h) for the CUDA entry
# points with capturable=True: the step counts, lr, grad_scale and found_inf
# are all read from (emulated) device memory.

def _table(tensors, steps):
    """Adam and RMSprop rows share columns 0-6: the tensors (param, grad, then
    exp_avg, exp_avg_sq[, max_exp_avg_sq] or square_avg, momentum, grad_avg),
    the step count and numel."""
    t = np.zeros((len(tensors), 9), dtype=np.int64)
    for i, row in enumerate(tensors):
        t[i, :len(row)] = [x.data_ptr() for x in row]
        t[i, 5], t[i, 6] = steps[i].data_ptr(), row[0].numel()
    return t


def _lists(n_tensors, depth, dt, gen, sizes=(5, 70001, 300)):
    out = []
    for i in range(n_tensors):
        n = sizes[i % len(sizes)]
        p, g = torch.randn(n, generator=gen).to(dt), torch.randn(n, generator=gen).to(dt)
        states = [torch.zeros(n, dtype=dt) for _ in range(depth - 2)]
        out.append([p, g, *states])
    return out


def _clone(lists):
    return [[t.clone() for t in row] for row in lists]


@pytest.mark.parametrize("op", ["adam", "rmsprop"])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_capturable_step_reads_device_scalars(emu, op, dt):
    gen = torch.Generator().manual_seed(0)
    code = {torch.float32: 0, torch.bfloat16: 1}[dt]
    lists = _lists(5, 5, dt, gen)   # Adam with amsgrad, RMSprop centered with momentum
    grads = [[torch.randn(r[0].numel(), generator=gen).to(dt) * 8 for r in lists]
             for _ in range(4)]
    lr, scale = float(np.float32(3e-3)), 8.0   # a float32 value: the kernel reads lr_t
    cpu = _backends.cpu_module()
    runs = {}
    for mode in ("cpu", "capturable"):
        ls, steps = _clone(lists), [torch.zeros(()) for _ in lists]
        table = _table(ls, steps)
        lr_t, scale_t = torch.tensor([lr]), torch.tensor([scale])
        found = torch.zeros(1)
        for s, gs in enumerate(grads):
            for r, g in zip(ls, gs):
                r[1].copy_(g)
            found.fill_(1.0 if s == 2 else 0.0)     # step 2: found_inf, a no-op
            if mode == "cpu":
                if s == 2:
                    continue
                if op == "adam":
                    cpu.adam_step(table.ctypes.data, len(ls), lr, 0.9, 0.999, 1e-8, 0.01,
                                  True, False, True, code, code, code, 1.0 / scale, 1)
                else:
                    cpu.rmsprop_step(table.ctypes.data, len(ls), lr, 0.99, 1e-8, 0.01, 0.9,
                                     True, False, code, code, 1.0 / scale, 1)
            else:
                before = _clone(ls), [t.clone() for t in steps]
                dev = dict(capturable=True, lr_addr=lr_t.data_ptr(),
                           grad_scale_addr=scale_t.data_ptr(), found_inf_addr=found.data_ptr())
                if op == "adam":
                    emu.adam_step(table.ctypes.data, len(ls), 0.0, 0.9, 0.999, 1e-8, 0.01,
                                  True, False, True, code, code, 0, **dev)
                else:
                    emu.rmsprop_step(table.ctypes.data, len(ls), 0.0, 0.99, 1e-8, 0.01, 0.9,
                                     True, False, code, 0, **dev)
                if s == 2:   # nothing written: params, states, grads, step counts
                    for r, rb in zip(ls, before[0]):
                        for t, tb in zip(r, rb):
                            assert_same_bits(t, tb, "found_inf step")
                    assert all(torch.equal(t, tb) for t, tb in zip(steps, before[1]))
        runs[mode] = ls, steps
    (a, sa), (b, sb) = runs["cpu"], runs["capturable"]
    assert [t.item() for t in sa] == [t.item() for t in sb] == [3.0] * len(lists)
    for i, (ra, rb) in enumerate(zip(a, b)):
        for j, (x, y) in enumerate(zip(ra, rb)):
            assert_same_bits(x, y, f"tensor {i} list {j}")


def test_many_tensors_split_into_launches(emu):
    """More tensors than one launch's argument tables hold (Adam's ~60, and
    480 step counters per increment kernel): every tensor is stepped once."""
    gen = torch.Generator().manual_seed(0)
    lists = _lists(500, 4, torch.float32, gen, sizes=(1, 3, 17))
    ref = _clone(lists)
    steps, ref_steps = [torch.zeros(()) for _ in lists], [torch.zeros(()) for _ in lists]
    table, ref_table = _table(lists, steps), _table(ref, ref_steps)  # kept alive
    emu.adam_step(table.ctypes.data, len(lists), 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False,
                  False, 0, 0, 0, capturable=True)
    _backends.cpu_module().adam_step(ref_table.ctypes.data, len(ref), 1e-3, 0.9, 0.999, 1e-8,
                                     0.0, False, False, False, 0, 0, 0, 1.0, 1)
    assert all(t.item() == 1.0 for t in steps)
    for r, rr in zip(lists, ref):
        for x, y in zip(r, rr):
            assert_same_bits(x, y, "tensor")


def test_entry_points_reject_bad_calls(emu):
    p = torch.zeros(4)
    table = np.zeros((1, 9), dtype=np.int64)
    table[0, :4] = p.data_ptr()
    table[0, 6] = 4
    with pytest.raises(ValueError, match="unsupported dtypes param=float32 state=bfloat16"):
        emu.adam_step(table.ctypes.data, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False,
                      0, 1, 0)
    with pytest.raises(ValueError, match="master weights without an out column"):
        emu.sgd_step(np.zeros((1, 7), dtype=np.int64).ctypes.data, 1, 0.1, 0.0, 0.0, 0.0,
                     False, False, 0, 0, grad_dtype=1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        emu.rmsprop_step(table.ctypes.data, -1, 1e-2, 0.99, 1e-8, 0.0, 0.0, False, False, 0, 0)
