"""Bad input gets a clear Python exception, params and state stay unchanged,
and the process never crashes: each case runs in its own interpreter."""
import pytest

from conftest import cpu_backends, run_python

# Each case: (setup code, the call expected to raise, exception type, message fragment).
CASES = {
    "sparse-grad": ("p = torch.zeros(4, requires_grad=True); opt = cls([p])\n"
                    "p.grad = torch.ones(4).to_sparse()",
                    "opt.step()", "RuntimeError", "sparse gradients"),
    "complex-param": ("p = torch.zeros(4, dtype=torch.complex64, requires_grad=True); opt = cls([p])\n"
                      "p.grad = torch.ones(4, dtype=torch.complex64)",
                      "opt.step()", "TypeError", "complex"),
    "integer-param": ("p = torch.zeros(4, dtype=torch.int32); opt = cls([p])\n"
                      "p.grad = torch.ones(4, dtype=torch.int32)",
                      "opt.step()", "TypeError", "int32"),
    "float64-param": ("p = torch.zeros(4, dtype=torch.float64, requires_grad=True); opt = cls([p])\n"
                      "p.grad = torch.ones(4, dtype=torch.float64)",
                      "opt.step()", "TypeError", "float64"),
    "grad-wrong-shape": ("p = torch.zeros(4, requires_grad=True); opt = cls([p]); p.grad = torch.ones(4)\n"
                         "opt.step(); p.grad.data = torch.ones(5)",
                         "opt.step()", "ValueError", "shape"),
    "grad-wrong-dtype": ("p = torch.zeros(4, requires_grad=True); opt = cls([p]); p.grad = torch.ones(4)\n"
                         "opt.step(); p.grad.data = torch.ones(4, dtype=torch.float16)",
                         "opt.step()", "TypeError", "dtype"),
    "grad-noncontiguous": ("p = torch.zeros(4, 4, requires_grad=True); opt = cls([p])\n"
                           "p.grad = torch.ones(4, 4).t()",
                           "opt.step()", "ValueError", "strides"),
    "param-with-gaps": ("base = torch.zeros(4, 8); p = base[:, ::2].requires_grad_(); opt = cls([p])\n"
                        "p.grad = torch.ones(4, 4)",
                        "opt.step()", "ValueError", "gaps"),
    "group-on-two-devices": ("p = torch.zeros(4, requires_grad=True); q = torch.zeros(4, device='meta', requires_grad=True)\n"
                             "opt = cls([p, q]); p.grad = torch.ones(4); q.grad = torch.ones(4, device='meta')",
                             "opt.step()", "ValueError", "one device"),
    "tensor-subclass-param": ("class Sub(torch.Tensor): pass\n"
                              "p = torch.zeros(4).as_subclass(Sub).requires_grad_(); opt = cls([p])\n"
                              "p.grad = torch.ones(4)",
                              "opt.step()", "TypeError", "tensor subclass Sub"),
    "negative-lr": ("p = torch.zeros(4, requires_grad=True)", "cls([p], lr=-1.0)",
                    "ValueError", "learning rate"),
    "negative-lr-later": ("p = torch.zeros(4, requires_grad=True); opt = cls([p]); p.grad = torch.ones(4)\n"
                          "opt.param_groups[0]['lr'] = -0.1",
                          "opt.step()", "ValueError", "learning rate"),
    "beta1-is-1": ("p = torch.zeros(4, requires_grad=True)", "cls([p], betas=(1.0, 0.999))",
                   "ValueError", "beta parameter at index 0"),
    "beta2-negative": ("p = torch.zeros(4, requires_grad=True)", "cls([p], betas=(0.9, -0.1))",
                       "ValueError", "beta parameter at index 1"),
    "negative-eps": ("p = torch.zeros(4, requires_grad=True)", "cls([p], eps=-1e-8)",
                     "ValueError", "epsilon"),
    "negative-weight-decay": ("p = torch.zeros(4, requires_grad=True)", "cls([p], weight_decay=-1)",
                              "ValueError", "weight_decay"),
    "unknown-backend": ("p = torch.zeros(4, requires_grad=True)", "cls([p], backend='cuda')",
                        "ValueError", "not a backend"),
    "numba-on-cuda-like-device": ("p = torch.zeros(4, device='meta', requires_grad=True)\n"
                                  "opt = cls([p], backend='numba'); p.grad = torch.ones(4, device='meta')",
                                  "opt.step()", "BackendUnavailable", "unavailable"),
}

TEMPLATE = """
import torch, pyopt
from pyopt import BackendUnavailable
cls = pyopt.optim.{cls}
{setup}
snap = None
if 'opt' in dir():
    snap = ([t.detach().clone() for g in opt.param_groups for t in g['params']],
            {{id(k): {{n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}}
              for k, s in opt.state.items()}})
try:
    {call}
except {exc} as e:
    assert {frag!r} in str(e), f"message does not name the problem: {{e}}"
    if snap is not None:
        after = [t.detach() for g in opt.param_groups for t in g['params']]
        for a, b in zip(snap[0], after):
            assert a.shape == b.shape and (a.is_meta or torch.equal(a, b)), "params changed"
        for k, s in opt.state.items():
            for n, v in s.items():
                old = snap[1][id(k)][n]
                assert (not torch.is_tensor(v)) or v.is_meta or torch.equal(old, v), "state changed"
    print("RAISED-OK")
else:
    raise SystemExit("no exception")
"""


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_cleanly(case, cls):
    setup, call, exc, frag = CASES[case]
    r = run_python(TEMPLATE.format(cls=cls, setup=setup, call=call, exc=exc, frag=frag))
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:{r.stdout}\nstderr:{r.stderr[-2000:]}"
    assert "RAISED-OK" in r.stdout


@pytest.mark.parametrize("backend", cpu_backends())
def test_bad_grad_in_second_group_leaves_first_group_unchanged(backend):
    code = f"""
    import torch, pyopt
    a = torch.ones(4, requires_grad=True); b = torch.ones(4, requires_grad=True)
    opt = pyopt.optim.AdamW([{{'params': [a]}}, {{'params': [b]}}], backend={backend!r})
    a.grad = torch.ones(4); b.grad = torch.ones(4).to_sparse()
    try:
        opt.step()
    except RuntimeError as e:
        assert 'sparse' in str(e)
    else:
        raise SystemExit('no exception')
    assert torch.equal(a.detach(), torch.ones(4)) and len(opt.state) == 0
    print('OK')
    """
    r = run_python(code)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
