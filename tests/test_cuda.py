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


# ---------------------------------------------------------------- capturable
# capturable=True: step counts on the device, lr / grad_scale / found_inf read
# by the kernels, so the step can be captured in a CUDA graph.

CAPTURABLE = {
    "default": {},
    "amsgrad-maximize-wd": dict(amsgrad=True, maximize=True, weight_decay=0.1),
    "cuda-tensor-lr": dict(lr="cuda-tensor"),
}


def _capturable_kw(kw):
    kw = dict(kw)
    if kw.get("lr") == "cuda-tensor":
        kw["lr"] = torch.tensor(3e-3, device="cuda")
    return kw


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("option", list(CAPTURABLE))
def test_capturable_matches_torch_fused_capturable(cls, dtype, option):
    dt = DTYPES[dtype]
    params = _params(dt, "cuda")
    grads = _grads(params, 20)
    ours, opt = _run(getattr(pyopt.optim, cls), params, grads, backend="native", capturable=True,
                     **_capturable_kw(CAPTURABLE[option]))
    theirs, topt = _run(getattr(torch.optim, cls), params, grads, fused=True, capturable=True,
                        **_capturable_kw(CAPTURABLE[option]))
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}[dt]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert st["step"].device.type == "cuda" and st["step"].item() == 20
    # The checkpoint loads into torch's capturable optimizer and back.
    back = getattr(torch.optim, cls)(opt.param_groups[0]["params"], capturable=True)
    back.load_state_dict(opt.state_dict())
    assert back.state_dict()["state"][0]["step"].item() == 20


def test_capturable_step_in_a_cuda_graph_matches_eager():
    params = _params(torch.float32, "cuda", sizes=(4097, (33, 65)))
    grads = _grads(params, 8)
    lr = torch.tensor(1e-2, device="cuda")
    expect, _ = _run(pyopt.optim.AdamW, params, grads, backend="native", capturable=True, lr=lr,
                     weight_decay=0.1)
    ps = [p.detach().clone().requires_grad_() for p in params]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = pyopt.optim.AdamW(ps, backend="native", capturable=True, lr=lr, weight_decay=0.1)
    # Warm up on a side stream (state and plans are built outside the graph),
    # as torch's CUDA-graph recipe does, then undo the warm-up steps.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for p, g in zip(ps, grads[0]):
            p.grad.copy_(g)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for p, p0 in zip(ps, params):
        p.data.copy_(p0)
    for st in opt.state.values():
        for k, v in st.items():
            v.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(ps, expect):
        assert torch.equal(a.detach(), b)
    lr.fill_(0.0)   # lr is read from device memory at every replay
    before = [p.detach().clone() for p in ps]
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(ps, before):   # lr 0: no update and no decay
        assert torch.equal(a.detach(), b)


def test_capture_without_capturable_raises():
    p = torch.zeros(8, device="cuda", requires_grad=True)
    p.grad = torch.ones(8, device="cuda")
    opt = pyopt.optim.Adam([p], backend="native")
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"):
        with torch.cuda.graph(graph):
            opt.step()


def test_capturable_many_tensors_masks_and_master_weights_equal_cpu():
    # 500 params: more step counts than one increment launch holds (480).
    params = _params(torch.bfloat16, "cpu", sizes=[7] * 498 + [4097, (33, 65)])
    grads = _grads(params, 4)
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) > 0.5
             for p in params]

    def train(device):
        ps = [p.detach().to(device).requires_grad_() for p in params]
        opt = pyopt.optim.AdamW(ps, backend="native", capturable=True, master_weights=True,
                                weight_decay=0.1)
        for p, m in zip(ps[-2:], masks[-2:]):
            with torch.no_grad():
                p.mul_(m.to(device))
            opt.set_mask(p, m.to(device))
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(device)
            opt.step()
        steps = {st["step"].item() for st in opt.state.values()}
        return [p.detach().cpu() for p in ps], steps

    cpu, cpu_steps = train("cpu")
    gpu, gpu_steps = train("cuda")
    assert cpu_steps == gpu_steps == {4.0}
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, m in zip(gpu[-2:], masks[-2:]):
        assert torch.all(p[~m] == 0)


def test_capture_before_warm_up_raises():
    p = torch.zeros(8, device="cuda", requires_grad=True)
    p.grad = torch.ones(8, device="cuda")
    opt = pyopt.optim.Adam([p], backend="native", capturable=True)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up"):
        with torch.cuda.graph(graph):
            opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("cls,kw", [("AdamW", dict(weight_decay=0.1)),
                                    ("RMSprop", dict(centered=True, momentum=0.5))])
def test_capturable_grad_scaler_skips_inf_steps_on_the_device(cls, kw):
    params = _params(torch.float32, "cuda", sizes=(4097, 300))
    grads = _grads(params, 8)

    def train(opt_cls, ps, **extra):
        opt = opt_cls(ps, capturable=True, **kw, **extra)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 4, growth_interval=1 << 20)
        snaps = []
        for i, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = scaler.scale(g.clone())
                if i in (2, 5):
                    p.grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            snaps.append([p.detach().clone() for p in ps])
        return opt, snaps

    ps = [p.detach().clone().requires_grad_() for p in params]
    opt, ours = train(getattr(pyopt.optim, cls), ps, backend="native")
    ref_ps = [p.detach().clone().requires_grad_() for p in params]
    ref_kw = dict(fused=True) if cls != "RMSprop" else dict(foreach=False)
    _, theirs = train(getattr(torch.optim, cls), ref_ps, **ref_kw)
    for i in (2, 5):   # skipped: nothing changed
        for a, b in zip(ours[i], ours[i - 1]):
            assert torch.equal(a, b)
    for a, b in zip(ours[-1], theirs[-1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state[ps[0]]["step"].item() == len(grads) - 2


@pytest.mark.parametrize("kw", [dict(), dict(centered=True, momentum=0.8, weight_decay=0.1),
                                dict(lr="cuda-tensor", maximize=True)])
def test_rmsprop_capturable_matches_torch(kw):
    params = _params(torch.float32, "cuda")
    grads = _grads(params, 20)
    ours, opt = _run(pyopt.optim.RMSprop, params, grads, backend="native", capturable=True,
                     **_capturable_kw(kw))
    theirs, _ = _run(torch.optim.RMSprop, params, grads, capturable=True, foreach=False,
                     **_capturable_kw(kw))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].device.type == "cuda"


@pytest.mark.parametrize("cls,kw", [("AdamW", {}), ("Adam", dict(amsgrad=True, weight_decay=0.1)),
                                    ("SGD", dict(lr=0.05, momentum=0.9)),
                                    ("RMSprop", dict(centered=True, momentum=0.5))])
@pytest.mark.parametrize("extra", ["plain", "mask", "master"])
def test_grad_scaler_masks_master_weights_cuda_equal_cpu(cls, kw, extra):
    # Not capturable: the host reads found_inf; the CUDA kernel unscales the
    # grads, applies the masks and rounds the masters, as the CPU kernel does.
    dt = {"plain": torch.float32, "mask": torch.float16, "master": torch.bfloat16}[extra]
    params = _params(dt, "cpu", sizes=(4097, (33, 65)))
    grads = _grads(params, 6)
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) > 0.3
             for p in params]

    def train(device):
        ps = [p.detach().to(device).requires_grad_() for p in params]
        opt = getattr(pyopt.optim, cls)(ps, backend="native", master_weights=extra == "master",
                                        **kw)
        if extra == "mask":
            for p, m in zip(ps, masks):
                with torch.no_grad():
                    p.mul_(m.to(device))
                opt.set_mask(p, m.to(device))
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8, growth_interval=1 << 20)
        for i, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = scaler.scale(g.to(device).float()).to(dt)
                if i == 2:
                    p.grad.view(-1)[1] = float("nan")
            scaler.step(opt)
            scaler.update()
        return [p.detach().cpu() for p in ps], [p.grad.cpu() for p in ps]

    cpu_p, cpu_g = train("cpu")
    gpu_p, gpu_g = train("cuda")
    for a, b in zip(cpu_p + cpu_g, gpu_p + gpu_g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if extra == "mask":
        for p, m in zip(gpu_p, masks):
            assert torch.all(p[~m] == 0)


# ---------------------------------------------------------------- sparse linear
# The _C_cuda sparse kernels called directly (raw addresses, as pyopt/_checks.py
# would pass them) and compared with pyopt._reference.sparse on the same CUDA
# tensors. Formats are built on the CPU by pyopt.sparse.formats.build.

from pyopt._reference import sparse as sparse_ref  # noqa: E402
from pyopt.sparse import formats as sparse_formats  # noqa: E402

_SPARSE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SPARSE_BATCHES = (1, 3, 17, 40)
_SPARSE_DENSITIES = (0.0, 0.1, 0.6, 1.0)
# fmt -> (N, K, block) cases; bsr needs N % bh == K % bw == 0 and nm K % 4 == 0.
_SPARSE_CASES = {
    "csr": [(n, k, None) for n in (1, 5, 64) for k in (7, 65, 130)]
           + [(33, 4097, None), (3, 40000, None), (2, 70000, None)],  # uint16 cols >= 32768; int32
    "bitmask": [(n, k, None) for n in (1, 5, 64) for k in (7, 65, 130)]
               + [(33, 4097, None), (3, 64 * 70 + 13, None)],         # > 32 mask words per row
    "nm": [(n, k, None) for n in (1, 5, 64) for k in (8, 68, 132)] + [(9, 4100, None)],
    "bsr": [(64, 128, (16, 16)), (64, 64, (32, 32)), (5, 7, (5, 7)), (1, 65, (1, 13)),
            (64, 130, (8, 10)), (48, 130, (16, 65)), (64, 1024, (64, 512)), (12, 600, (12, 300)),
            (24, 1024, (12, 16)), (40, 96, (40, 1)), (96, 48, (96, 3)), (6, 510, (3, 255)),
            (4, 514, (2, 257)), (1, 7, (1, 1))],
}


def _sparse_native(fmt, t, x, bias, n, stream=None):
    """out = x @ W.T + bias through _C_cuda; out starts as NaN so unwritten
    elements show."""
    from pyopt import _C_cuda
    b, k = x.shape
    out = torch.full((b, n), float("nan"), dtype=x.dtype, device=x.device)
    code = _SPARSE_CODES[x.dtype]
    s = (stream or torch.cuda.current_stream()).cuda_stream
    bias_addr = bias.data_ptr() if bias is not None else 0
    if fmt == "csr":
        bits = 16 if t["col_idx"].dtype is torch.int16 else 32
        _C_cuda.sparse_csr_linear(out.data_ptr(), x.data_ptr(), t["values"].data_ptr(),
                                  t["row_ptr"].data_ptr(), t["col_idx"].data_ptr(), bits,
                                  bias_addr, b, n, k, code, s)
    elif fmt in ("bitmask", "nm"):
        _C_cuda.sparse_bitmask_linear(out.data_ptr(), x.data_ptr(), t["values"].data_ptr(),
                                      t["row_ptr"].data_ptr(), t["bitmask"].data_ptr(),
                                      bias_addr, b, n, k, code, s)
    else:
        bh, bw = t["values"].shape[1:]
        _C_cuda.sparse_bsr_linear(out.data_ptr(), x.data_ptr(), t["values"].data_ptr(),
                                  t["block_row_ptr"].data_ptr(), t["block_col"].data_ptr(),
                                  bias_addr, b, n, k, bh, bw, code, s)
    return out


def _sparse_keep(fmt, n, k, density, g):
    keep = torch.rand(n, k, generator=g) < density
    if fmt == "nm":   # at most 2 of every 4: the two best of random scores, thinned
        rank = torch.rand(n, k // 4, 4, generator=g).argsort(-1).argsort(-1)
        keep &= (rank < 2).reshape(n, k)
    return keep


def _sparse_problem(fmt, n, k, block, b, density, with_bias, dt, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dt)
    keep = _sparse_keep(fmt, n, k, density, g)
    t = sparse_formats.build(fmt, w, keep, nm=(2, 4), block=block or (32, 32))
    t = {name: v.cuda() for name, v in t.items()}
    x = torch.randn(b, k, generator=g).to("cuda", dt)
    bias = torch.randn(n, generator=g).to("cuda", dt) if with_bias else None
    return t, x, bias, keep


def _sparse_assert_close(fmt, got, t, x, bias, n, block):
    want = sparse_ref.LINEAR[fmt](x, *(t[f] for f in sparse_formats.FIELDS[fmt]), bias, n)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any(), "some outputs were not written"
    # Both sides accumulate in float32 (in different orders) and round once to
    # the dtype: allow one output ulp plus float32 reordering noise, scaled by
    # sum |w| |x| (+ |bias|).
    wd = sparse_formats.to_dense(fmt, t, (n, x.shape[1])).float().abs()
    mag = x.float().abs() @ wd.T
    if bias is not None:
        mag = mag + bias.float().abs()
    rtol = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[x.dtype]
    bound = rtol * want.float().abs() + 2e-5 * mag + 1e-6
    err = (got.float() - want.float()).abs()
    assert bool((err <= bound).all()), \
        f"max err {err.max().item():.3g} at {divmod(int(err.argmax()), n)}, bound there " \
        f"{bound.flatten()[err.argmax()].item():.3g}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt,case", [(f, c) for f, cs in _SPARSE_CASES.items() for c in cs],
                         ids=lambda v: v if isinstance(v, str) else
                         f"{v[0]}x{v[1]}" + (f"-block{v[2][0]}x{v[2][1]}" if v[2] else ""))
def test_sparse_linear_cuda_matches_reference(fmt, case, dtype):
    n, k, block = case
    dt = DTYPES[dtype]
    for i, (b, density) in enumerate((b, d) for b in _SPARSE_BATCHES for d in _SPARSE_DENSITIES):
        for with_bias in (False, True):
            t, x, bias, keep = _sparse_problem(fmt, n, k, block, b, density, with_bias, dt,
                                               seed=1000 * i + with_bias)
            got = _sparse_native(fmt, t, x, bias, n)
            torch.cuda.synchronize()
            if not bool(keep.any()) and fmt != "nm":   # nnz == 0: exactly the bias or zeros
                assert t["values"].numel() == 0
                expect = (bias.expand(b, n) if bias is not None
                          else torch.zeros(b, n, dtype=dt, device="cuda"))
                assert torch.equal(got, expect)
            _sparse_assert_close(fmt, got, t, x, bias, n, block)


@pytest.mark.parametrize("fmt", list(_SPARSE_CASES))
def test_sparse_linear_cuda_empty_rows_and_side_stream(fmt):
    """Rows with no kept weight between full ones, launched on a side stream."""
    n, k = 48, 256
    block = (8, 16) if fmt == "bsr" else None
    g = torch.Generator().manual_seed(7)
    w = torch.randn(n, k, generator=g)
    keep = torch.zeros(n, k, dtype=torch.bool)
    if fmt == "nm":
        keep[::3] = (torch.arange(k) % 4 < 2)
    else:
        keep[::3] = True
        keep[1::3, ::5] = True    # every third row block stays empty
        keep[1::3, 0] = False
    rows_empty = ~keep.any(1)
    t = {name: v.cuda() for name, v in
         sparse_formats.build(fmt, w, keep, nm=(2, 4), block=block or (32, 32)).items()}
    x = torch.randn(19, k, generator=g).cuda()
    bias = torch.randn(n, generator=g).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = _sparse_native(fmt, t, x, bias, n, stream=s)
    s.synchronize()
    _sparse_assert_close(fmt, got, t, x, bias, n, block)
    if fmt != "nm":
        assert torch.equal(got[:, rows_empty.cuda()], bias[rows_empty.cuda()].expand(19, -1))


def test_sparse_linear_cuda_rejects_bad_arguments():
    from pyopt import _C_cuda
    with pytest.raises(ValueError, match="idx_bits"):
        _C_cuda.sparse_csr_linear(0, 0, 0, 0, 0, 8, 0, 1, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C_cuda.sparse_bitmask_linear(0, 0, 0, 0, 0, 0, 1, 1, 1, 3, 0)
    with pytest.raises(ValueError, match="N % bh"):
        _C_cuda.sparse_bsr_linear(0, 0, 0, 0, 0, 0, 1, 6, 8, 4, 4, 0, 0)
    # nothing to compute: no launch, no error
    _C_cuda.sparse_csr_linear(0, 0, 0, 0, 0, 16, 0, 0, 5, 5, 0, 0)
