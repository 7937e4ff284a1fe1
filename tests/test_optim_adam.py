"""Adam/AdamW parity with torch.optim, per backend, dtype, shape and option."""
import copy
import io

import pytest
import torch

import pyopt
from conftest import DTYPES, cpu_backends, step_with_scale, with_specials

SHAPES = {"0": (0,), "1": (1,), "4097": (4097,), "33x65": (33, 65)}
OPTIONS = {
    "default": {},
    "lr": {"lr": 3e-2},
    "wd": {"weight_decay": 0.1},
    "maximize-wd": {"maximize": True, "weight_decay": 0.1},
    "amsgrad-wd": {"amsgrad": True, "weight_decay": 0.1},
    "tensor-lr": {"lr": "tensor"},
    "betas-eps": {"betas": (0.8, 0.99), "eps": 1e-6},
}
CLASSES = {"Adam": (pyopt.optim.Adam, torch.optim.Adam),
           "AdamW": (pyopt.optim.AdamW, torch.optim.AdamW)}


def _opts(name):
    o = dict(OPTIONS[name])
    if o.get("lr") == "tensor":
        o["lr"] = torch.tensor(1e-2)
    return o


def _run(cls, params, grads, steps=20, **kw):
    ps = [p.clone().requires_grad_() for p in params]
    opt = cls(ps, **kw)
    for s in range(steps):
        for p, g in zip(ps, grads[s]):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def _data(shape, dtype, steps=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(dtype)
    grads = [[torch.randn(shape, generator=gen).to(dtype)] for _ in range(steps)]
    return [p], grads


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cls", list(CLASSES))
def test_adam_matches_torch(cls, dtype, shape, option, backend):
    ours_cls, torch_cls = CLASSES[cls]
    dt = DTYPES[dtype]
    params, grads = _data(SHAPES[shape], dt)
    ours, _ = _run(ours_cls, params, grads, backend=backend, **_opts(option))
    if dt == torch.float32:
        ref, _ = _run(torch_cls, params, grads, **_opts(option))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        return
    # Low precision: error against an fp32 trajectory must stay within 2x of
    # the error of torch's best implementation at this dtype (default or
    # fused; torch's default fp16 Adam can go NaN where eps underflows), plus
    # one ulp of slack for tiny cases.
    ref32, _ = _run(torch_cls, [p.float() for p in params],
                    [[g.float() for g in gs] for gs in grads], **_opts(option))
    fused, _ = _run(torch_cls, params, grads, fused=True, **_opts(option))
    default, _ = _run(torch_cls, params, grads, **_opts(option))
    if not ref32[0].numel():
        return
    err = lambda ps: (ps[0].float() - ref32[0]).abs().max().item()  # noqa: E731
    err_torch = min(e for e in (err(fused), err(default)) if e == e)
    ulp = torch.finfo(dt).eps * ref32[0].abs().max().item()
    assert err(ours) <= 2 * err_torch + ulp, (err(ours), err_torch)
    # and it agrees with torch's fp32-opmath fused kernel to rounding
    torch.testing.assert_close(ours, fused, rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backends_agree_bitwise(dtype):
    """native, numba and the torch reference compute the same float32 math."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen).to(dt) for s in [(5,), (4097,), (33, 65), (1,)]]
    grads = [[torch.randn(p.shape, generator=gen).to(dt) for p in params] for _ in range(10)]
    out = {}
    for b in cpu_backends():
        out[b], _ = _run(pyopt.optim.AdamW, params, grads, steps=10, backend=b,
                         amsgrad=True, weight_decay=0.05, lr=1e-2)
    base = out.pop("torch")
    for b, ps in out.items():
        for x, y in zip(ps, base):
            assert torch.equal(x, y), f"{b} differs from the torch reference"


def _step_from_state(backend, t, beta2, amsgrad):
    """One Adam step from an exp_avg_sq spread over every float exponent (and
    0 and subnormals), at step count t: the denominator sqrt(v) / bc2_sqrt is
    where the FMA-built CPU variants divide differently (div_by_const)."""
    gen = torch.Generator().manual_seed(t)
    per = 32
    e = torch.arange(-126, 128).repeat_interleave(per).float()
    v = torch.ldexp(1 + torch.rand(e.numel(), generator=gen), e)
    v[:per] = 0
    v[per:2 * per] = torch.rand(per, generator=gen) * 1e-39
    p = torch.randn(v.numel(), generator=gen).requires_grad_()
    opt = pyopt.optim.Adam([p], lr=1e-2, betas=(0.9, beta2), amsgrad=amsgrad, backend=backend)
    st = {"step": torch.tensor(float(t - 1)), "exp_avg": torch.randn(v.numel(), generator=gen),
          "exp_avg_sq": v}
    if amsgrad:
        st["max_exp_avg_sq"] = v.flip(0)
    sd = opt.state_dict()
    sd["state"] = {0: st}
    opt.load_state_dict(sd)
    p.grad = torch.randn(v.numel(), generator=gen) * 1e-3
    opt.step()
    return p.detach()


def test_denominator_bitwise_over_exponents_steps_and_isas():
    from pyopt import _backends
    cpu = _backends._load_cpu()[0]
    isas = [i for i in ("baseline", "avx2", "avx512") if cpu.isa_compiled(i) and cpu.isa_supported(i)]
    before = cpu.current_isa()
    try:
        for t in (1, 2, 3, 10, 1000, 10 ** 6):
            for beta2 in (0.5, 0.95, 0.999, 0.99999):
                for amsgrad in (False, True):
                    ref = _step_from_state("torch", t, beta2, amsgrad)
                    if "numba" in cpu_backends():
                        assert torch.equal(_step_from_state("numba", t, beta2, amsgrad), ref)
                    for isa in isas:
                        cpu.set_isa(isa)
                        got = _step_from_state("native", t, beta2, amsgrad)
                        assert torch.equal(got, ref), (isa, t, beta2, amsgrad)
    finally:
        cpu.set_isa(before)


def _bf16_case(n, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)

    def t(scale=1.0):
        return with_specials(n, dtype, gen, scale)
    p = t()
    grads = [t() for _ in range(4)]
    state = {"step": torch.tensor(3.0), "exp_avg": t(0.1), "exp_avg_sq": t(0.01).abs()}
    # a +0 grad on a -0 exp_avg: with maximize, -g and 0 - g differ in sign
    p[0], state["exp_avg"][0] = -0.0, -0.0
    for g in grads:
        g[0] = 0.0
    return p, grads, state


def _bf16_run(p, grads, state, scale, l2=False, **kw):
    ps = [p.clone().requires_grad_()]
    opt = (pyopt.optim.Adam if l2 else pyopt.optim.AdamW)(ps, **kw)
    sd = opt.state_dict()
    st = {k: v.clone() for k, v in state.items()}
    if kw.get("amsgrad"):
        st["max_exp_avg_sq"] = state["exp_avg_sq"].flip(0).clone()
    sd["state"] = {0: st}
    opt.load_state_dict(sd)
    seen = step_with_scale(opt, ps[0], grads, scale)
    return [ps[0].detach()] + [opt.state[ps[0]][k] for k in sorted(st) if k != "step"] + seen


BF16_OPTIONS = {
    "default": {},
    "amsgrad-l2": {"amsgrad": True, "weight_decay": 0.1, "l2": True},
    "maximize-wd": {"maximize": True, "weight_decay": 0.1},
    "lerp-high-side": {"betas": (0.3, 0.5), "eps": 1e-3, "amsgrad": True},
    "maximize-high-side": {"maximize": True, "betas": (0.3, 0.5)},  # -g keeps a zero's sign
    "eps0": {"eps": 0.0},
}


@pytest.mark.parametrize("scale", [None, 8.0, 3.0], ids=["unscaled", "scale8", "scale3"])
@pytest.mark.parametrize("option", list(BF16_OPTIONS))
def test_bf16_one_pass_step_is_bitwise_the_blocked_step(option, scale):
    """The avx512 variant's one-pass bf16 step (vcvtne2ps2bf16 rounding) against
    the blocked step and the torch reference: every length up to 40, 4099
    (masked tails) and 70001 (two threads), NaN of both signs, infinities, bf16 subnormals, values that
    round to inf, a grad scale."""
    from pyopt import _backends
    cpu = _backends._load_cpu()[0]
    one_pass, why = cpu.bf16_convert_status()
    kw = dict(BF16_OPTIONS[option], lr=1e-2)
    try:
        for n in list(range(1, 41)) + [4099, 70001]:
            case = _bf16_case(n, seed=n)
            ref = _bf16_run(*case, scale, backend="torch", **kw)
            out = {}
            for on in (True, False):
                cpu.set_bf16_convert(on)
                out[on] = _bf16_run(*case, scale, backend="native", **kw)
                if scale == 3.0:
                    continue  # the reference unscales with torch's bf16 mul, a last-bit
                    # apart from g * fp32(1/3); GradScaler's scales are powers of two
                # torch rounds a NaN to 0x7fc0 or 0xffff depending on the path
                # (c10 scalar or ATen vectorised); native always to 0x7fc0
                for a, b in zip(out[on], ref):
                    assert a.isnan().equal(b.isnan()), (n, on)
                    keep = ~a.isnan()
                    assert a[keep].view(torch.int16).equal(b[keep].view(torch.int16)), (n, on)
            for a, b in zip(out[True], out[False]):
                assert a.view(torch.int16).equal(b.view(torch.int16)), n
    finally:
        cpu.set_bf16_convert(True)
    if not one_pass:
        pytest.skip(f"only the blocked step ran here: {why}")


def test_bf16_one_pass_step_under_flush_denormal():
    """torch.set_flush_denormal sets MXCSR.DAZ, under which the SDM has
    vfpclassps read subnormals as zero: the thread must say so and take the
    blocked step, which rounds them as without DAZ (a max_exp_avg_sq of
    subnormals is kept as is by amsgrad)."""
    from pyopt import _backends
    cpu = _backends._load_cpu()[0]
    had_one_pass = cpu.bf16_convert_status()[0]
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        ok, why = cpu.bf16_convert_status()
        if had_one_pass:
            assert not ok and "DAZ" in why
        for n in (1, 16, 37):
            p = torch.randn(n).bfloat16()
            grads = [torch.zeros(n).bfloat16() for _ in range(3)]
            # a bf16 subnormal, made from its bits (a conversion would flush it now)
            tiny = torch.full((n,), 0x0040, dtype=torch.int16).view(torch.bfloat16)
            state = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(n).bfloat16(),
                     "exp_avg_sq": torch.zeros(n).bfloat16()}
            out = {}
            for on in (True, False):
                cpu.set_bf16_convert(on)
                ps = [p.clone().requires_grad_()]
                opt = pyopt.optim.AdamW(ps, lr=1e-2, amsgrad=True)
                sd = opt.state_dict()
                sd["state"] = {0: dict({k: v.clone() for k, v in state.items()},
                                       max_exp_avg_sq=tiny.clone())}
                opt.load_state_dict(sd)
                for g in grads:
                    ps[0].grad = g.clone()
                    opt.step()
                out[on] = opt.state[ps[0]]["max_exp_avg_sq"].view(torch.int16)
            assert out[True].equal(out[False]), n
            assert out[False].eq(tiny.view(torch.int16)).all(), n
    finally:
        torch.set_flush_denormal(False)
        cpu.set_bf16_convert(True)
    assert cpu.bf16_convert_status()[0] == had_one_pass


@pytest.mark.parametrize("scale", [None, 8.0], ids=["unscaled", "scale8"])
@pytest.mark.parametrize("option", list(BF16_OPTIONS))
def test_fp16_one_pass_step_is_bitwise_every_variant(option, scale):
    """fp16 params and state: the avx512 variant's one-pass step (vcvtps2ph)
    against the avx2 variant's blocked step (scalar F16C), the baseline
    variant's (portable rounding) and the torch reference, bit for bit: every
    length up to 20, 4099 and 70001 (two threads), fp16 subnormals, overflow
    to inf, a grad scale. NaN payloads differ by path (F16C keeps them, the
    portable rounding and torch do not), so NaN is compared by position."""
    from pyopt import _backends
    cpu = _backends._load_cpu()[0]
    isas = [i for i in ("baseline", "avx2", "avx512") if cpu.isa_compiled(i) and cpu.isa_supported(i)]
    before = cpu.current_isa()
    kw = dict(BF16_OPTIONS[option], lr=1e-2)
    try:
        for n in list(range(1, 21)) + [4099, 70001]:
            case = _bf16_case(n, seed=n, dtype=torch.float16)
            ref = _bf16_run(*case, scale, backend="torch", **kw)
            for isa in isas:
                cpu.set_isa(isa)
                got = _bf16_run(*case, scale, backend="native", **kw)
                for a, b in zip(got, ref):
                    assert a.isnan().equal(b.isnan()), (isa, n)
                    keep = ~a.isnan()
                    assert a[keep].view(torch.int16).equal(b[keep].view(torch.int16)), (isa, n)
    finally:
        cpu.set_isa(before)
    if "avx512" not in isas:
        pytest.skip(f"the one-pass fp16 step did not run: avx512 variant not usable here ({isas})")


def test_info_names_the_fp16_adam_path():
    from pyopt import _backends, _info
    cpu = _backends._load_cpu()[0]
    before = cpu.current_isa()
    try:
        for isa in ("baseline", "avx2", "avx512"):
            if not (cpu.isa_compiled(isa) and cpu.isa_supported(isa)):
                continue
            cpu.set_isa(isa)
            d = _info.info()["fp16_adam"]
            assert d["one_pass"] == (isa == "avx512")
            assert d["one_pass"] or isa in d["reason"]
            assert "fp16 optim:" in _info.format_info(_info.info())
    finally:
        cpu.set_isa(before)


def test_info_names_the_bf16_adam_path():
    from pyopt import _backends, _info
    cpu = _backends._load_cpu()[0]
    ok, why = cpu.bf16_convert_status()
    d = _info.info()["bf16_adam"]
    assert d["one_pass"] == (ok and cpu.current_isa() == "avx512")
    assert d["one_pass"] or d["reason"]
    try:
        cpu.set_bf16_convert(False)
        d = _info.info()["bf16_adam"]
        assert d["one_pass"] is False and d["reason"]
        if ok:  # the CPU has it: the reason is the switch
            assert "disabled" in d["reason"]
    finally:
        cpu.set_bf16_convert(True)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 10), torch.nn.LayerNorm(10),
                               torch.nn.Linear(10, 1))


def _train(model, opt, steps=30, sched=None):
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8), torch.randn(16, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls", list(CLASSES))
def test_real_model_loss_curve_matches(cls, backend):
    ours_cls, torch_cls = CLASSES[cls]
    m1, m2 = _model(), _model()
    l1 = _train(m1, ours_cls(m1.parameters(), lr=1e-2, weight_decay=0.01, backend=backend))
    l2 = _train(m2, torch_cls(m2.parameters(), lr=1e-2, weight_decay=0.01))
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(list(m1.parameters()), list(m2.parameters()), rtol=1e-4, atol=1e-5)


def test_param_groups_add_group_zero_grad_closure_and_changes():
    m1, m2 = _model(), _model()
    def groups(m):
        ps = list(m.parameters())
        return [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:4], "weight_decay": 0.1}]
    o1, o2 = pyopt.optim.Adam(groups(m1), lr=3e-3), torch.optim.Adam(groups(m2), lr=3e-3)
    rest1, rest2 = list(m1.parameters())[4:], list(m2.parameters())[4:]
    for step in range(12):
        if step == 3:
            o1.add_param_group({"params": rest1, "amsgrad": True})
            o2.add_param_group({"params": rest2, "amsgrad": True})
        if step == 6:  # change hyperparameters between steps
            for o in (o1, o2):
                o.param_groups[0]["lr"] = 5e-3
                o.param_groups[0]["betas"] = (0.5, 0.9)
                o.param_groups[1]["weight_decay"] = 0.0
        torch.manual_seed(step)
        x = torch.randn(4, 3, 8, 8)
        def closure(m, o):
            def f():
                o.zero_grad()
                loss = m(x).square().mean()
                loss.backward()
                return loss
            return f
        l1, l2 = o1.step(closure(m1, o1)), o2.step(closure(m2, o2))
        assert l1.item() == pytest.approx(l2.item(), rel=1e-5)
    torch.testing.assert_close(list(m1.parameters()), list(m2.parameters()), rtol=1e-5, atol=1e-6)
    # zero_grad(set_to_none=False) keeps zero tensors, which still step (as torch does)
    o1.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in m1.parameters())


def test_param_without_grad_is_skipped_like_torch():
    a = [torch.randn(10, requires_grad=True) for _ in range(3)]
    b = [p.detach().clone().requires_grad_() for p in a]
    o1, o2 = pyopt.optim.AdamW(a, lr=0.1), torch.optim.AdamW(b, lr=0.1)
    for step in range(6):
        for ps in (a, b):
            for i, p in enumerate(ps):
                # param 1 gets a grad only on even steps, param 2 never
                p.grad = None if (i == 2 or (i == 1 and step % 2)) else torch.full_like(p, 0.5 + step)
        o1.step()
        o2.step()
    torch.testing.assert_close(a, b)
    assert len(o1.state[a[2]]) == 0 and len(o2.state[b[2]]) == 0
    assert o1.state[a[1]]["step"].item() == o2.state[b[1]]["step"].item() == 3


def _state_dict_equal_structure(sd1, sd2):
    assert sd1["param_groups"][0].keys() - {"backend"} == sd2["param_groups"][0].keys()
    for k, st in sd2["state"].items():
        mine = sd1["state"][k]
        assert mine.keys() == st.keys()
        for key, v in st.items():
            assert mine[key].shape == v.shape and mine[key].dtype == v.dtype, key
            assert mine[key].device == v.device, key


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("direction", ["torch_to_pyopt", "pyopt_to_torch"])
def test_state_dict_switch_mid_training(direction, amsgrad):
    ref, m1 = _model(), _model()
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, amsgrad=amsgrad)
    first, second = ((torch.optim.AdamW, pyopt.optim.AdamW) if direction == "torch_to_pyopt"
                     else (pyopt.optim.AdamW, torch.optim.AdamW))
    o1 = first(m1.parameters(), lr=1e-2, amsgrad=amsgrad)
    _train(ref, o_ref, steps=5)
    _train(m1, o1, steps=5)
    # same keys, shapes, dtypes and devices as torch's own state_dict
    _state_dict_equal_structure(o1.state_dict(), o_ref.state_dict())
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, map_location="cpu")
    m2 = _model()
    m2.load_state_dict(ck["model"])
    o2 = second(m2.parameters(), lr=1e-2, amsgrad=amsgrad)
    o2.load_state_dict(ck["opt"])
    for st in o2.state.values():  # the step stays where torch keeps it
        assert st["step"].device.type == "cpu" and st["step"].dtype == torch.float32
    _train(ref, o_ref, steps=5)
    _train(m2, o2, steps=5)
    torch.testing.assert_close(list(m2.parameters()), list(ref.parameters()), rtol=1e-5, atol=1e-6)
    assert all(st["step"].item() == 10 for st in o2.state.values())


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5]),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 4),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda s: 0.95),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=5),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=4),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, 10),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-3, 1e-2, step_size_up=3,
                                                            cycle_momentum=True),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 1e-2, total_steps=30,
                                                                cycle_momentum=True),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[3]),
    "ReduceLROnPlateau": None,
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_lr_scheduler_works(name):
    m1, m2 = _model(), _model()
    o1, o2 = pyopt.optim.AdamW(m1.parameters(), lr=1e-2), torch.optim.AdamW(m2.parameters(), lr=1e-2)
    if name == "ReduceLROnPlateau":
        s1, s2 = (torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1) for o in (o1, o2))
        for _ in range(6):
            _train(m1, o1, steps=2)
            _train(m2, o2, steps=2)
            s1.step(1.0)
            s2.step(1.0)
    else:
        l1 = _train(m1, o1, sched=SCHEDULERS[name](o1))
        l2 = _train(m2, o2, sched=SCHEDULERS[name](o2))
        assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-6)
    assert o1.param_groups[0]["lr"] == pytest.approx(o2.param_groups[0]["lr"])
    assert o1.param_groups[0]["betas"] == pytest.approx(o2.param_groups[0]["betas"])
    torch.testing.assert_close(list(m1.parameters()), list(m2.parameters()), rtol=1e-4, atol=1e-5)


def test_one_native_call_per_group_and_dtype(monkeypatch):
    from pyopt.optim import adam as adam_mod
    calls = []
    real = adam_mod.run_adam
    monkeypatch.setattr(adam_mod, "run_adam", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k)))
    ps = [torch.randn(7, requires_grad=True) for _ in range(50)]
    ps += [torch.randn(3, dtype=torch.bfloat16, requires_grad=True) for _ in range(20)]
    opt = pyopt.optim.Adam([{"params": ps[:30]}, {"params": ps[30:]}], backend="native")
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    # group 0: 30 fp32; group 1: 20 fp32 + 20 bf16 -> three calls
    assert sorted(calls) == [20, 20, 30]


def test_warm_step_reuses_plan_and_state_memory():
    ps = [torch.randn(100, requires_grad=True) for _ in range(5)]
    opt = pyopt.optim.AdamW(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    plan = opt._plans[0]
    ptrs = [(st["exp_avg"].data_ptr(), st["exp_avg_sq"].data_ptr()) for st in opt.state.values()]
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)  # new grads every step (zero_grad default)
        opt.step()
    assert opt._plans[0] is plan
    assert ptrs == [(st["exp_avg"].data_ptr(), st["exp_avg_sq"].data_ptr())
                    for st in opt.state.values()]


def test_param_moved_or_replaced_is_picked_up():
    p = torch.randn(10, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    o1, o2 = pyopt.optim.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    for step in range(4):
        if step == 2:  # like model.to(): same Parameter object, new storage
            p.data = p.data.clone()
            q.data = q.data.clone()
        p.grad = torch.ones(10)
        q.grad = torch.ones(10)
        o1.step()
        o2.step()
    torch.testing.assert_close(p, q)


def test_state_tensor_swapped_by_user_is_picked_up():
    """e.g. an "optimizer_to(device)" helper that reassigns state[k] = v.to(...)."""
    p = torch.randn(10, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    o1, o2 = pyopt.optim.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    for step in range(4):
        if step == 2:
            for o in (o1, o2):
                for st in o.state.values():
                    for k, v in st.items():
                        st[k] = v.clone()
        p.grad = torch.ones(10)
        q.grad = torch.ones(10)
        o1.step()
        o2.step()
    torch.testing.assert_close(p, q)
    torch.testing.assert_close(o1.state[p]["exp_avg"], o2.state[q]["exp_avg"])
    assert o1.state[p]["step"].item() == 4


def test_state_replaced_with_plain_dict_and_optimizer_copies():
    p = torch.randn(10, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    o1, o2 = pyopt.optim.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    for step in range(3):
        p.grad, q.grad = torch.ones(10), torch.ones(10)
        o1.step()
        o2.step()
    # a plain dict assigned as a param's state is used as given
    o1.state[p] = {k: v.clone() for k, v in o1.state[p].items()}
    o2.state[q] = {k: v.clone() for k, v in o2.state[q].items()}
    held = o1.state[p]
    p.grad, q.grad = torch.ones(10), torch.ones(10)
    o1.step()
    o2.step()
    assert held["step"].item() == 4
    torch.testing.assert_close(p, q)
    # deepcopy and pickle give independent optimizers that keep stepping alike
    c = copy.deepcopy({"p": p, "o": o1})
    buf = io.BytesIO()
    torch.save({"p": p, "o": o1}, buf)
    buf.seek(0)
    d = torch.load(buf, weights_only=False)
    for pp, oo in ((p, o1), (c["p"], c["o"]), (d["p"], d["o"])):
        pp.grad = torch.ones(10)
        oo.step()
    torch.testing.assert_close(c["p"], p)
    torch.testing.assert_close(d["p"], p)
    assert o1.state[p]["step"].item() == c["o"].state[c["p"]]["step"].item() == 5


def test_channels_last_plan_is_reused():
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    opt = pyopt.optim.AdamW(conv.parameters())
    for _ in range(2):
        opt.zero_grad()
        conv(torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)).sum().backward()
        opt.step()
        plan = opt._plans[0]
    opt.zero_grad()
    conv(torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)).sum().backward()
    opt.step()
    assert opt._plans[0] is plan


def test_channels_last_param():
    conv1 = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    conv2 = copy.deepcopy(conv1)
    o1 = pyopt.optim.AdamW(conv1.parameters(), lr=1e-2)
    o2 = torch.optim.AdamW(conv2.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
        for m, o in ((conv1, o1), (conv2, o2)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    torch.testing.assert_close(list(conv1.parameters()), list(conv2.parameters()))


def test_nan_and_inf_grads_follow_torch():
    vals = [float("nan"), float("inf"), -float("inf"), 1.0]
    for backend in cpu_backends():
        a = torch.zeros(4, requires_grad=True)
        b = torch.zeros(4, requires_grad=True)
        o1 = pyopt.optim.Adam([a], backend=backend, weight_decay=0.1, amsgrad=True)
        o2 = torch.optim.Adam([b], weight_decay=0.1, amsgrad=True)
        for _ in range(2):
            a.grad = torch.tensor(vals)
            b.grad = torch.tensor(vals)
            o1.step()
            o2.step()
        torch.testing.assert_close(a, b, equal_nan=True)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(o1.state[a][k], o2.state[b][k], equal_nan=True)


def test_torch_flags_accepted_or_rejected():
    p = [torch.zeros(2, requires_grad=True)]
    for kw in ({"foreach": True}, {"foreach": False}, {"fused": True}, {"fused": False}):
        pyopt.optim.Adam(p, **kw)
    pyopt.optim.Adam(p, capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        pyopt.optim.AdamW(p, differentiable=True)


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("lr", [1e-2, "tensor"])
def test_capturable_on_cpu_matches_torch_fused_capturable(cls, lr):
    # torch's fused CPU Adam accepts capturable=True and keeps the step on the
    # CPU; pyopt does the same, and the checkpoints interchange.
    lr_of = (lambda: torch.tensor(1e-2)) if lr == "tensor" else (lambda: lr)
    g = torch.Generator().manual_seed(0)
    p0 = [torch.randn(33, generator=g), torch.randn(4, 5, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in p0] for _ in range(20)]
    out = {}
    for name, make in (("pyopt", getattr(pyopt.optim, cls)),
                       ("torch", lambda ps, **kw: getattr(torch.optim, cls)(ps, fused=True, **kw))):
        ps = [p.clone().requires_grad_() for p in p0]
        opt = make(ps, lr=lr_of(), capturable=True, weight_decay=0.1, amsgrad=True)
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        out[name] = (ps, opt)
    for a, b in zip(out["pyopt"][0], out["torch"][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ours = out["pyopt"][1]
    step = ours.state[out["pyopt"][0][0]]["step"]
    assert step.device.type == "cpu" and step.dtype == torch.float32 and step.item() == 20
    back = getattr(torch.optim, cls)(out["torch"][0], fused=True, capturable=True)
    back.load_state_dict(ours.state_dict())
    ours.load_state_dict(out["torch"][1].state_dict())
    assert ours.state_dict()["state"][0]["step"].item() == 20


def test_per_step_checks_do_not_read_a_device_lr():
    # A tensor lr on an accelerator is range-checked at construction only, so
    # a step never synchronizes on it (a CUDA graph could not capture that).
    # The meta device stands in: reading its value raises.
    lr = torch.tensor(1e-3, device="meta")
    assert pyopt._checks.lr_value(lr, read_device=False) == 0.0
    with pytest.raises((RuntimeError, NotImplementedError)):
        pyopt._checks.lr_value(lr)
    with pytest.raises(ValueError, match="1-element"):
        pyopt._checks.lr_value(torch.zeros(2, device="meta"), read_device=False)


def test_functional_op_opcheck_and_compile_matches_eager():
    from pyopt import _ops  # noqa: F401
    ps = [torch.randn(5), torch.randn(3, 4)]
    args = (ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps], [], [torch.tensor(0.0) for _ in ps],
            1e-3, 0.9, 0.999, 1e-8, 0.01, False, False, True)
    torch.library.opcheck(torch.ops.pyopt.adam_step_.default, args)

    m1 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    m2 = copy.deepcopy(m1)
    o1, o2 = pyopt.optim.AdamW(m1.parameters(), lr=1e-2), pyopt.optim.AdamW(m2.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def train(m, o):
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        o.step()
        o.zero_grad()
        return loss

    compiled = torch.compile(train)
    for _ in range(5):
        a, b = train(m1, o1), compiled(m2, o2)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    torch.testing.assert_close(list(m1.parameters()), list(m2.parameters()), rtol=1e-5, atol=1e-6)
