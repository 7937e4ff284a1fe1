"""GradScaler's fused-optimizer protocol and masked (pruned) steps."""
import copy

import pytest
import torch

import pyopt
from conftest import DTYPES, cpu_backends, run_python

CONFIGS = {
    "Adam-amsgrad": ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    "AdamW": ("AdamW", dict(lr=1e-2)),
    "SGD-nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "RMSprop-centered-momentum": ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True,
                                                  weight_decay=0.1)),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() for k, v in s.items()} for s in opt.state.values()])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("config", list(CONFIGS))
def test_grad_scaler_loop_with_forced_inf_steps(config, backend):
    name, kw = CONFIGS[config]
    m1, m2 = _model(), _model()
    o1 = getattr(pyopt.optim, name)(m1.parameters(), backend=backend, **kw)
    o2 = getattr(torch.optim, name)(m2.parameters(), **kw)
    s1, s2 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if step in (3, 7):  # an overflow: the step must change nothing
                next(m.parameters()).grad[0, 0] = float("inf")
            before = _snapshot(m, o)
            s.step(o)
            s.update()
            if step in (3, 7):
                after = _snapshot(m, o)
                assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
                assert all(torch.equal(a[k], b[k]) for a, b in zip(before[1], after[1]) for k in a)
        assert s1.get_scale() == s2.get_scale()
    torch.testing.assert_close(list(m1.parameters()), list(m2.parameters()), rtol=1e-5, atol=1e-6)
    # grads are left unscaled, as torch's fused optimizers leave them
    torch.testing.assert_close([p.grad for p in m1.parameters()],
                               [p.grad for p in m2.parameters()], rtol=1e-5, atol=1e-7)


def test_grad_scale_on_the_wrong_device_is_a_clear_error():
    r = run_python("""
    import torch, pyopt
    p = torch.ones(3, requires_grad=True); p.grad = torch.ones(3)
    opt = pyopt.optim.AdamW([p])
    opt.grad_scale = torch.tensor(4.0, device='meta')
    opt.found_inf = torch.tensor(0.0)
    try:
        opt.step()
    except ValueError as e:
        assert 'grad_scale is on meta' in str(e), e
        assert torch.equal(p.detach(), torch.ones(3)) and len(opt.state) == 0
        print('RAISED-OK')
    """)
    assert r.returncode == 0 and "RAISED-OK" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("config", list(CONFIGS))
def test_masked_positions_stay_exactly_zero(config, backend, dtype):
    name, kw = CONFIGS[config]
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(2)
    shapes = [(33, 65), (4097,), (7,)]
    masks = [torch.rand(s, generator=gen) > 0.5 for s in shapes]
    masks[1] = masks[1].to(torch.uint8)          # uint8 masks work too
    p0 = [torch.randn(s, generator=gen).to(dt) * m for s, m in zip(shapes, masks)]
    ps = [p.clone().requires_grad_() for p in p0]
    ref = [p.clone().requires_grad_() for p in p0]
    opt = getattr(pyopt.optim, name)(ps, backend=backend, **kw)
    ropt = getattr(pyopt.optim, name)(ref, backend=backend, **kw)
    for p, m in zip(ps, masks):
        opt.set_mask(p, m)
    for step in range(100):
        for p, q in zip(ps, ref):
            g = torch.randn(p.shape, generator=gen).to(dt)   # dense grads, pruned spots too
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ropt.step()
        for p, m in zip(ps, masks):
            drop = m == 0
            assert torch.all(p.detach()[drop] == 0)
            for v in opt.state[p].values():
                if v.shape == p.shape:
                    assert torch.all(v[drop] == 0)
    # kept positions evolve exactly as without a mask (the update is elementwise)
    for p, q, m in zip(ps, ref, masks):
        keep = m != 0
        assert torch.equal(p.detach()[keep], q.detach()[keep])


@pytest.mark.parametrize("bad,exc,frag", [
    ("torch.ones(4, dtype=torch.bool)", "ValueError", "mask shape (4,) differs"),
    ("torch.ones(3, 5)", "TypeError", "mask dtype must be torch.bool or torch.uint8"),
    ("torch.ones(3, 5, dtype=torch.bool, device='meta')", "ValueError", "mask on meta"),
    ("torch.ones(5, 3, dtype=torch.bool).t()", "ValueError", "mask strides"),
])
def test_bad_masks_are_clear_errors(bad, exc, frag):
    r = run_python(f"""
    import torch, pyopt
    p = torch.ones(3, 5, requires_grad=True)
    opt = pyopt.optim.SGD([p], lr=0.1, momentum=0.9)
    try:
        opt.set_mask(p, {bad})
    except {exc} as e:
        assert {frag!r} in str(e), str(e)
        print('RAISED-OK')
    """)
    assert r.returncode == 0 and "RAISED-OK" in r.stdout, r.stderr[-2000:]


def test_mask_survives_deepcopy_and_can_be_removed():
    p = torch.ones(4, requires_grad=True)
    opt = pyopt.optim.SGD([p], lr=0.1)
    opt.set_mask(p, torch.tensor([True, False, True, False]))
    c = copy.deepcopy({"p": p, "o": opt})
    for pp, oo in ((p, opt), (c["p"], c["o"])):
        pp.grad = torch.ones(4)
        oo.step()
        torch.testing.assert_close(pp.detach(), torch.tensor([0.9, 0.0, 0.9, 0.0]))
    opt.set_mask(p, None)
    p.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.8, -0.1, 0.8, -0.1]))


@pytest.mark.parametrize("opt_kind", ["pyopt", "torch"])
@pytest.mark.parametrize("explicit_unscale", [False, True])
def test_pyopt_grad_scaler_matches_torch_grad_scaler(opt_kind, explicit_unscale):
    """pyopt.amp.GradScaler (native check-and-unscale) against torch's, with a
    pyopt optimizer (fused protocol) or a torch one (unscale_ path), forced infs
    and NaNs included."""
    m1, m2 = _model(), _model()
    lib = pyopt.optim if opt_kind == "pyopt" else torch.optim
    o1, o2 = lib.AdamW(m1.parameters(), lr=1e-2), lib.AdamW(m2.parameters(), lr=1e-2)
    s1 = pyopt.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if step in (2, 6):
                next(m.parameters()).grad[0, 0] = float("inf") if step == 2 else float("nan")
            if explicit_unscale:
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 10.0)
            s.step(o)
            s.update()
        assert s1.get_scale() == s2.get_scale(), step
    torch.testing.assert_close(list(m1.parameters()), list(m2.parameters()), rtol=1e-5, atol=1e-6)
