"""pyopt.prune: masks against torch.nn.utils.prune and hand-computed ones,
recording/applying, fine-tuning with attached masks, and bad input."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import pyopt
from pyopt import prune


def _mlp(seed=0, sizes=(16, 24, 32, 8)):
    """Random weights: continuous values, so |w| has no ties."""
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _torch_mask(module):
    return module.weight_mask.bool()


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_magnitude_layer_matches_l1_unstructured(sparsity):
    model = _mlp()
    ref = copy.deepcopy(model)
    masks = prune.magnitude(model, sparsity)
    assert set(masks) == {n for n, _ in _linears(model)}
    for (name, m), (_, r) in zip(_linears(model), _linears(ref)):
        tprune.l1_unstructured(r, "weight", amount=sparsity)
        assert torch.equal(masks[name], _torch_mask(r)), name
        assert torch.equal(m.weight, r.weight)          # pruned weights are zeros
        assert (~masks[name]).sum() == round(sparsity * m.weight.numel())


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.73])
def test_magnitude_global_matches_global_unstructured(sparsity):
    model = _mlp(1)
    ref = copy.deepcopy(model)
    masks = prune.magnitude(model, sparsity, scope="global")
    params = [(m, "weight") for _, m in _linears(ref)]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    for (name, m), (_, r) in zip(_linears(model), _linears(ref)):
        assert torch.equal(masks[name], _torch_mask(r)), name
    total = sum(m.weight.numel() for _, m in _linears(model))
    assert sum((~k).sum().item() for k in masks.values()) == round(sparsity * total)
    # global: layers lose different fractions
    fractions = {round((~k).float().mean().item(), 3) for k in masks.values()}
    assert sparsity == 0 or len(fractions) > 1


def test_magnitude_half_precision_and_single_linear():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8).to(torch.bfloat16)
    ref = copy.deepcopy(lin).float()
    masks = prune.magnitude(lin, 0.5)
    assert list(masks) == [""]
    tprune.l1_unstructured(ref, "weight", amount=0.5)
    # bf16 values converted to fp32 exactly: same ranking, barring bf16 ties
    assert (masks[""] != _torch_mask(ref)).sum() <= 4
    assert (~masks[""]).sum() == 256


def test_threshold():
    model = _mlp()
    before = [m.weight.detach().clone() for _, m in _linears(model)]
    masks = prune.threshold(model, 0.1)
    for (name, m), w in zip(_linears(model), before):
        assert torch.equal(masks[name], w.abs() >= 0.1)
        assert torch.equal(m.weight, torch.where(w.abs() >= 0.1, w, torch.zeros_like(w)))
    assert all(k.all() for k in prune.threshold(model, 0.0).values())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4), (4, 4)])
def test_n_m_keeps_exactly_n_largest_per_group(n, m):
    model = _mlp(sizes=(16, 32, 8))
    before = {name: mod.weight.detach().clone() for name, mod in _linears(model)}
    masks = prune.n_m(model, n, m)
    for name, w in before.items():
        groups = masks[name].reshape(w.shape[0], -1, m)
        assert (groups.sum(-1) == n).all()
        a = w.abs().reshape(w.shape[0], -1, m)
        kept_min = torch.where(groups, a, torch.inf).amin(-1)
        dropped_max = torch.where(groups, -torch.inf, a).amax(-1)
        assert (kept_min > dropped_max).all()


def test_block_pattern():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 8) * 0.01)
        lin.weight[0:2, 4:8] += 1.0    # strongest block
        lin.weight[4:6, 0:4] += 0.5    # second strongest
        lin.weight[2:4, 4:8] += 0.25   # third
    masks = prune.block(lin, 0.5, block=(2, 4))   # 6 blocks, prune 3
    expect = torch.zeros(6, 8, dtype=torch.bool)
    expect[0:2, 4:8] = expect[4:6, 0:4] = expect[2:4, 4:8] = True
    assert torch.equal(masks[""], expect)
    assert (lin.weight[~expect] == 0).all() and (lin.weight[expect] != 0).all()


def test_block_counts_on_random_weights():
    model = _mlp(sizes=(64, 32, 64))
    masks = prune.block(model, 0.25, block=(8, 16))
    for name, mod in _linears(model):
        k = masks[name].reshape(mod.out_features // 8, 8, mod.in_features // 16, 16)
        per_block = k.sum((1, 3))
        assert set(per_block.unique().tolist()) == {0, 128}      # whole blocks only
        assert (per_block == 0).sum() == round(0.25 * per_block.numel())


def _tiny():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.4],
                                       [-4.0, 1.0, 0.25, 2.0]]))
    return lin


# Per input feature, the sum of squares over all 4 tokens is 6, 100, 1, 36.
CALIB = [torch.tensor([[1.0, 10.0, 0.0, 4.0], [1.0, 0.0, 1.0, 4.0]]),
         torch.tensor([[[2.0, 0.0, 0.0, 2.0]], [[0.0, 0.0, 0.0, 0.0]]])]  # 3-d: dims flattened


def test_contribution_matches_hand_computed_wanda():
    # |w| * ||x||: row 0: 1*2.449=2.449, 2*10=20, 3*1=3,    0.4*6=2.4
    #              row 1: 4*2.449=9.798, 1*10=10, 0.25*1=0.25, 2*6=12
    lin = _tiny()
    w = lin.weight.detach().clone()
    masks = prune.contribution(lin, CALIB, 0.5)      # per row: drop the 2 lowest
    expect = torch.tensor([[False, True, True, False],
                           [False, True, False, True]])
    assert torch.equal(masks[""], expect)
    assert torch.equal(lin.weight, w * expect)
    # magnitude keeps w[1, 0] = -4, the largest weight; its input is too weak for Wanda
    assert prune.magnitude(_tiny(), 0.5, apply=False)[""][1, 0]
    # 1:2 groups: (2.449 | 20), (3 | 2.4), (9.798 | 10), (0.25 | 12)
    masks = prune.contribution(_tiny(), CALIB, n_m=(1, 2))
    assert torch.equal(masks[""], expect)
    # 0.25 of 4 inputs: one per row, the lowest score
    masks = prune.contribution(_tiny(), CALIB, 0.25)
    assert torch.equal(~masks[""], torch.tensor([[False, False, False, True],
                                                 [False, False, True, False]]))


def test_contribution_calib_forms_and_hooks_removed():
    model = _mlp()
    x = torch.randn(3, 5, 16)
    ref = prune.contribution(copy.deepcopy(model), [x], 0.5)
    for calib in ([(x,)], [[x]], lambda m: m(x)):
        assert all(torch.equal(ref[k], v)
                   for k, v in prune.contribution(copy.deepcopy(model), calib, 0.5).items())

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(model)

        def forward(self, inputs):
            return self.net(inputs)

    kw = Kw()
    got = prune.contribution(kw, [{"inputs": x}], 0.5)
    assert all(torch.equal(ref[k], got["net." + k]) for k in ref)
    assert all(not m._forward_pre_hooks for m in kw.modules())

    def boom(m):
        m(x)
        raise RuntimeError("calibration failed")
    with pytest.raises(RuntimeError, match="calibration failed"):
        prune.contribution(model, boom, 0.5)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_contribution_per_row_fraction_and_sparsity_zero():
    model = _mlp()
    masks = prune.contribution(model, [torch.randn(32, 16)], 0.25)
    for name, mod in _linears(model):
        assert ((~masks[name]).sum(1) == round(0.25 * mod.in_features)).all()
    masks = prune.contribution(model, [torch.randn(32, 16)], 0.0)
    assert all(k.all() for k in masks.values())


def test_apply_false_records_without_touching_weights():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    for fn in (lambda: prune.magnitude(model, 0.5, apply=False),
               lambda: prune.threshold(model, 0.1, apply=False),
               lambda: prune.n_m(model, 2, 4, apply=False),
               lambda: prune.block(model, 0.5, block=(8, 8), apply=False),
               lambda: prune.contribution(model, [torch.randn(4, 16)], 0.5, apply=False)):
        masks = fn()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        rec = prune.masks_of(model)
        assert rec.keys() == masks.keys() and all(torch.equal(rec[k], masks[k]) for k in rec)
    prune.apply_(model, masks)
    for name, mod in _linears(model):
        assert torch.equal(mod.weight, before[name + ".weight"] * masks[name])


def test_state_dict_keys_unchanged_and_filter_fn():
    model = _mlp()
    keys = list(model.state_dict())
    masks = prune.magnitude(model, 0.5, filter_fn=lambda m, name: name != "4")
    assert list(model.state_dict()) == keys
    assert set(masks) == {"0", "2"} and set(prune.masks_of(model)) == {"0", "2"}
    assert (model[4].weight != 0).all()
    fresh = _mlp(3)
    fresh.load_state_dict(model.state_dict())      # a plain model loads a pruned checkpoint
    assert prune.masks_of(fresh) == {}


def test_attach_keeps_pruned_weights_zero_during_finetune():
    model = _mlp()
    masks = prune.n_m(model, 2, 4, filter_fn=lambda m, name: m.in_features % 4 == 0)
    opt = pyopt.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert prune.attach(opt, model).keys() == masks.keys()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for name, mod in _linears(model):
        assert (mod.weight[~masks[name]] == 0).all()
        assert (mod.weight[masks[name]] != 0).all()
        st = opt.state[mod.weight]
        assert (st["exp_avg"][~masks[name]] == 0).all()


def _int_linear():
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    return lin


CALLS = {
    "magnitude": lambda m, **kw: prune.magnitude(m, 0.5, **kw),
    "threshold": lambda m, **kw: prune.threshold(m, 0.1, **kw),
    "n_m": lambda m, **kw: prune.n_m(m, 2, 4, **kw),
    "block": lambda m, **kw: prune.block(m, 0.5, block=(2, 2), **kw),
    "contribution": lambda m, **kw: prune.contribution(m, [torch.randn(2, 4)], 0.5, **kw),
}


@pytest.mark.parametrize("method", list(CALLS))
def test_common_bad_input(method):
    call = CALLS[method]
    with pytest.raises(TypeError, match="int32"):
        call(_int_linear())
    with pytest.raises(ValueError, match="no nn.Linear"):
        call(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no nn.Linear"):
        call(nn.Linear(4, 4), filter_fn=lambda m, name: False)
    with pytest.raises(TypeError, match="nn.Module"):
        call(torch.ones(4, 4))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(bad):
    lin = nn.Linear(8, 8)
    for call in (lambda: prune.magnitude(lin, bad), lambda: prune.block(lin, bad, block=(2, 2)),
                 lambda: prune.contribution(lin, [torch.randn(2, 8)], bad)):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            call()
    with pytest.raises(TypeError, match="sparsity"):
        prune.magnitude(lin, "0.5")


def test_other_bad_input():
    lin = nn.Linear(6, 4)
    w = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="in_features=6, not a multiple of m=4"):
        prune.n_m(lin, 2, 4)
    with pytest.raises(ValueError, match="in_features=6"):      # before any calibration runs
        prune.contribution(lin, lambda m: pytest.fail("calibration ran"), n_m=(2, 4))
    with pytest.raises(ValueError, match="0 < n <= m"):
        prune.n_m(lin, 3, 2)
    with pytest.raises(ValueError, match=r"\(4, 6\) is not divisible by block \(4, 4\)"):
        prune.block(lin, 0.5, block=(4, 4))
    with pytest.raises(ValueError, match="block must be"):
        prune.block(lin, 0.5, block=(2, 0))
    with pytest.raises(ValueError, match="scope"):
        prune.magnitude(lin, 0.5, scope="model")
    with pytest.raises(ValueError, match="t must be >= 0"):
        prune.threshold(lin, -1.0)
    with pytest.raises(ValueError, match="exactly one of sparsity and n_m"):
        prune.contribution(lin, [torch.randn(2, 6)])
    with pytest.raises(ValueError, match="exactly one of sparsity and n_m"):
        prune.contribution(lin, [torch.randn(2, 6)], 0.5, n_m=(1, 2))
    with pytest.raises(ValueError, match="saw no calibration input"):
        prune.contribution(lin, [], 0.5)
    with pytest.raises(TypeError, match="calibration batch"):
        prune.contribution(lin, [3], 0.5)
    with pytest.raises(ValueError, match=r"has shape \(6, 4\), weight has \(4, 6\)"):
        prune.apply_(lin, {"": torch.ones(6, 4, dtype=torch.bool)})
    with pytest.raises(TypeError, match="torch.bool"):
        prune.apply_(lin, {"": torch.ones(4, 6)})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        prune.apply_(lin, {"fc": torch.ones(4, 6, dtype=torch.bool)})
    assert torch.equal(lin.weight, w) and prune.masks_of(lin) == {}   # nothing half-done
    opt = pyopt.optim.AdamW(lin.parameters())
    with pytest.raises(ValueError, match="no masks"):
        prune.attach(opt, lin)
    with pytest.raises(TypeError, match="set_mask"):
        prune.attach(torch.optim.AdamW(lin.parameters()), lin)


def test_attach_explicit_masks_in_another_layout():
    model = _mlp()
    masks = prune.magnitude(model, 0.5, apply=False)
    odd = {k: v.t().contiguous().t() for k, v in masks.items()}   # column-major copies
    opt = pyopt.optim.SGD(model.parameters(), lr=0.1)
    got = prune.attach(opt, model, odd)
    assert all(torch.equal(got[k], masks[k]) and got[k].is_contiguous() for k in masks)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert all((m.weight[~masks[n]] == 0).all() for n, m in _linears(model))
