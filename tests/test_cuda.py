"""CUDA kernels: skipped with the reason when no usable GPU is present."""
import pytest
import torch

import pyopt
from conftest import DTYPES, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

OPTIONS = {
    "default": {},
    "lr-wd": dict(lr=3e-2, weight_decay=0.1),
    "maximize-wd": dict(maximize=True, weight_decay=0.1),
    "amsgrad-wd": dict(amsgrad=True, weight_decay=0.1),
    "tensor-lr": dict(lr=torch.tensor(2e-3)),
}


def _params(dt, device, sizes=(1, 4097, (33, 65), 3 * 65536 + 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, dt).requires_grad_() for s in sizes]


def _grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in params]
            for _ in range(steps)]


def _run(cls, params, grads, **kw):
    ps = [p.detach().clone().requires_grad_() for p in params]
    opt = cls(ps, **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    torch.cuda.synchronize()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_cuda_matches_torch_fused(cls, dtype, option):
    dt = DTYPES[dtype]
    params = _params(dt, "cuda")
    grads = _grads(params, 20)
    ours, opt = _run(getattr(pyopt.optim, cls), params, grads, backend="native", **OPTIONS[option])
    assert opt.backends_in_use() == {("cuda:0", dtype_name(dt)): "native"}
    theirs, _ = _run(getattr(torch.optim, cls), params, grads, fused=True, **OPTIONS[option])
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}[dt]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def dtype_name(dt):
    return str(dt).replace("torch.", "")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cuda_kernel_is_bitwise_equal_to_cpu_kernel(dtype):
    """The shared host+device math, compiled without FMA contraction on both sides."""
    dt = DTYPES[dtype]
    params = _params(dt, "cpu")
    grads = _grads(params, 5)
    kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=True, backend="native")
    cpu, _ = _run(pyopt.optim.AdamW, params, grads, **kw)
    gpu, _ = _run(pyopt.optim.AdamW, [p.cuda() for p in params],
                  [[g.cuda() for g in gs] for gs in grads], **kw)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_many_tensors_and_misaligned_views():
    """More tensors than one launch holds, and views whose data pointer is
    not 16-byte aligned (the scalar path)."""
    g = torch.Generator().manual_seed(0)
    sizes = [(i * 37) % 1000 + 1 for i in range(300)]
    flat = torch.randn(sum(sizes) + 1, generator=g)
    views, off = [], 1   # offset 1 float: every view is misaligned for 16-byte loads
    for n in sizes:
        views.append(flat[off:off + n])
        off += n
    grads = _grads(views, 3)
    cpu, _ = _run(pyopt.optim.AdamW, views, grads, backend="native")
    flat_gpu = flat.cuda()
    gviews, off = [], 1
    for n in sizes:
        gviews.append(flat_gpu[off:off + n])
        off += n
    assert any(v.data_ptr() % 16 for v in gviews)
    gpu, _ = _run(pyopt.optim.AdamW, gviews, [[x.cuda() for x in gs] for gs in grads],
                  backend="native")
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_step_runs_on_the_current_stream():
    params = _params(torch.float32, "cuda", sizes=(1 << 20,))
    grads = _grads(params, 1)
    expect, _ = _run(pyopt.optim.Adam, params, grads, backend="native")
    p = params[0].detach().clone().requires_grad_()
    opt = pyopt.optim.Adam([p], backend="native")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        p.grad = grads[0][0].clone()
        opt.step()
    s.synchronize()
    assert torch.equal(p.detach(), expect[0])


def test_state_dict_interchange_with_torch_on_cuda():
    params = _params(torch.float32, "cuda")
    grads = _grads(params, 6)
    ref, _ = _run(torch.optim.AdamW, params, grads)
    ps = [p.detach().clone().requires_grad_() for p in params]
    t = torch.optim.AdamW(ps)
    for gs in grads[:3]:
        for p, g in zip(ps, gs):
            p.grad = g
        t.step()
    ours = pyopt.optim.AdamW(ps, backend="native")
    ours.load_state_dict(t.state_dict())
    for gs in grads[3:]:
        for p, g in zip(ps, gs):
            p.grad = g
        ours.step()
    back = torch.optim.AdamW(ps)
    back.load_state_dict(ours.state_dict())
    assert back.state_dict()["state"][0]["step"].item() == 6
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-6)


def test_numba_backend_on_cuda_is_refused():
    p = torch.zeros(4, device="cuda", requires_grad=True)
    p.grad = torch.ones(4, device="cuda")
    with pytest.raises(pyopt.BackendUnavailable, match="CPU only"):
        pyopt.optim.Adam([p], backend="numba").step()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cls,kw", [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, maximize=True)),
    ("RMSprop", dict(centered=True, momentum=0.8, weight_decay=0.1)),
    ("RMSprop", dict()),
])
def test_sgd_rmsprop_cuda_bitwise_equal_to_cpu(cls, kw, dtype):
    dt = DTYPES[dtype]
    params = _params(dt, "cpu")
    grads = _grads(params, 5)
    opt_cls = getattr(pyopt.optim, cls)
    cpu, _ = _run(opt_cls, params, grads, backend="native", **kw)
    gpu, _ = _run(opt_cls, [p.cuda() for p in params], [[g.cuda() for g in gs] for gs in grads],
                  backend="native", **kw)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
