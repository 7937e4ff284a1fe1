"""fp32 master weights for bf16/fp16 params (master_weights=True)."""
import io

import pytest
import torch

import pyopt
from conftest import cpu_backends

CONFIGS = {
    "AdamW": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    "Adam-amsgrad": ("Adam", dict(lr=1e-2, amsgrad=True)),
    "SGD-momentum": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "RMSprop-centered": ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5)),
}
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", list(LOW))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_master_tracks_the_fp32_trajectory(config, dtype, backend):
    """The master is updated exactly as torch.optim updates an fp32 param from
    the same (16-bit) grads; the param is the master rounded once."""
    name, kw = CONFIGS[config]
    dt = LOW[dtype]
    gen = torch.Generator().manual_seed(0)
    p16 = [torch.randn(s, generator=gen).to(dt).requires_grad_() for s in [(33, 65), (4097,), (1,)]]
    p32 = [p.detach().float().requires_grad_() for p in p16]
    opt = getattr(pyopt.optim, name)(p16, backend=backend, master_weights=True, **kw)
    ref = getattr(torch.optim, name)(p32, **kw)
    for _ in range(20):
        for a, b in zip(p16, p32):
            g = torch.randn(a.shape, generator=gen).to(dt)
            a.grad, b.grad = g, g.float()
        opt.step()
        ref.step()
    for a, b in zip(p16, p32):
        st = opt.state[a]
        assert st["master_param"].dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in st.values())
        torch.testing.assert_close(st["master_param"], b.detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(a.detach(), st["master_param"].to(dt))


def test_master_weights_beat_plain_bf16_on_drift():
    """1000 updates of 1e-4 each: bf16 rounds every one of them away at 1.0
    (its spacing there is 2^-7), the master accumulates them."""
    def train(master):
        p = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
        opt = pyopt.optim.SGD([p], lr=1e-4, master_weights=master)
        for _ in range(1000):
            p.grad = torch.full((64,), -1.0, dtype=torch.bfloat16)
            opt.step()
        return p.detach().float()

    exact = 1.0 + 1000 * 1e-4
    plain, master = train(False), train(True)
    assert torch.all(plain == 1.0)                      # plain bf16 never moves
    assert torch.all((master - exact).abs() <= 2 ** -7)  # within one bf16 spacing of exact


def test_fp32_params_ignore_master_weights():
    p = torch.randn(10, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    o1 = pyopt.optim.AdamW([p], master_weights=True)
    o2 = pyopt.optim.AdamW([q])
    for _ in range(3):
        p.grad = torch.ones(10)
        q.grad = torch.ones(10)
        o1.step()
        o2.step()
    assert "master_param" not in o1.state[p] and torch.equal(p, q)


def test_backends_agree_bitwise_with_master_weights():
    gen = torch.Generator().manual_seed(5)
    p0 = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in [(4097,), (7, 9)]]
    grads = [[torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in p0]
             for _ in range(5)]
    out = {}
    for b in cpu_backends():
        ps = [p.clone().requires_grad_() for p in p0]
        opt = pyopt.optim.AdamW(ps, backend=b, master_weights=True, lr=1e-2)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        out[b] = [opt.state[p]["master_param"] for p in ps]
    base = out.pop("torch")
    for b, ms in out.items():
        assert all(torch.equal(x, y) for x, y in zip(ms, base)), b


def test_master_is_saved_and_restored():
    gen = torch.Generator().manual_seed(6)
    p = torch.randn(100, generator=gen).to(torch.bfloat16).requires_grad_()
    opt = pyopt.optim.AdamW([p], master_weights=True)
    for _ in range(3):
        p.grad = torch.randn(100, generator=gen).to(torch.bfloat16)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert sd["state"][0]["master_param"].dtype == torch.float32
    q = p.detach().clone().requires_grad_()
    opt2 = pyopt.optim.AdamW([q], master_weights=True)
    opt2.load_state_dict(sd)
    g = torch.randn(100, generator=gen).to(torch.bfloat16)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])
    assert torch.equal(p, q)


def test_master_weights_with_grad_scaler_and_mask():
    p = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    opt = pyopt.optim.SGD([p], lr=0.5, master_weights=True)
    opt.set_mask(p, torch.tensor([1, 0] * 4, dtype=torch.bool))
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    p.grad = torch.full((8,), 4.0, dtype=torch.bfloat16)
    opt.step()
    assert p.detach().tolist() == [0.5, 0.0] * 4
    assert opt.state[p]["master_param"].tolist() == [0.5, 0.0] * 4
    assert p.grad.tolist() == [1.0] * 8   # unscaled in place
