"""Pruning masks for ``nn.Linear`` weights: compute, record, apply, keep.

Every mask function selects layers (every ``nn.Linear`` unless ``filter_fn``
says otherwise), scores each weight, and returns ``{module name: mask}``:
one bool tensor per layer with the weight's shape and memory layout, True
where the weight is kept. Names are those of ``model.named_modules()``
(``""`` when ``model`` is a single Linear).

The mask is also recorded on its module as a plain attribute
(``module._pyopt_mask``), not as a buffer, so ``state_dict()`` keys stay the
model's own and checkpoints load into an unpruned model. ``masks_of`` reads
the recorded masks back, and ``attach`` hands them to a pyopt optimizer so
fine-tuning cannot revive pruned weights.

Methods:
  magnitude     smallest |w| (per layer or globally), as torch.nn.utils.prune
  threshold     |w| < t
  n_m           n largest |w| in every group of m inputs (2:4 for sparse tensor cores)
  block         blocks with the smallest L2 norm
  contribution  Wanda: |w_ij| * ||x_j||, with ||x_j|| measured on calibration data
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["magnitude", "threshold", "n_m", "block", "contribution",
           "apply_", "masks_of", "attach"]

_ATTR = "_pyopt_mask"


# -- shared helpers -------------------------------------------------------

def _layers(model, filter_fn, where):
    """The selected ``(name, Linear)`` pairs, checked once for every method."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    keep = filter_fn or (lambda module, name: True)
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and keep(m, name)]
    if not layers:
        raise ValueError(f"{where}: no nn.Linear layer selected"
                         + (" (filter_fn rejected all of them)" if filter_fn else ""))
    for name, m in layers:
        if not m.weight.is_floating_point():
            raise TypeError(f"{where}: layer {name!r} has a {m.weight.dtype} weight; "
                            "only floating-point weights can be pruned")
    return layers


def _sparsity(sparsity, where):
    # 1.0 would delete whole layers, which is never what pruning means here.
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{where}: sparsity must be a number in [0, 1), "
                        f"got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{where}: sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _count(sparsity, n):
    """How many of ``n`` entries to prune: torch.nn.utils.prune's rule, round()."""
    return round(sparsity * n)


def _prune_smallest(scores, k, dim=None):
    """A keep-mask of ``scores``' shape with the ``k`` smallest entries False,
    over the whole tensor or along ``dim``. topk, like torch.nn.utils.prune,
    so both agree wherever there are no ties."""
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k and dim is None:
        mask.view(-1)[torch.topk(scores.reshape(-1), k, largest=False).indices] = False
    elif k:
        mask.scatter_(dim, torch.topk(scores, k, dim=dim, largest=False).indices, False)
    return mask


def _check_m(layers, m, where):
    for name, mod in layers:
        if mod.in_features % m:
            raise ValueError(f"{where}: layer {name!r} has in_features={mod.in_features}, not a "
                             f"multiple of m={m}; exclude it with filter_fn or choose another m")


def _keep_n_of_m(scores, n, m):
    """Keep the n largest scores in every group of m consecutive inputs."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return mask.reshape(rows, cols)


def _n_m_args(n, m, where):
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)):
        raise TypeError(f"{where}: n and m must be ints, got {n!r} and {m!r}")
    if not 0 < n <= m:
        raise ValueError(f"{where}: need 0 < n <= m, got n={n}, m={m}")


def _abs(w):
    # At least float32 (exact for 16-bit values), so the global ranking can
    # concatenate layers of different dtypes.
    return w.detach().abs().to(torch.promote_types(w.dtype, torch.float32))


def _like(weight, mask):
    """``mask`` with the weight's device and memory layout, which
    optimizer.set_mask requires."""
    if mask.device == weight.device and mask.stride() == weight.stride():
        return mask
    return torch.empty_like(weight, dtype=torch.bool).copy_(mask)


def _finish(layers, masks, apply):
    """Record a copy of each mask, in the weight's layout, on its module and,
    with ``apply``, zero the pruned weights."""
    out = {}
    for name, m in layers:
        mask = torch.empty_like(m.weight.detach(), dtype=torch.bool).copy_(masks[name])
        setattr(m, _ATTR, mask)
        if apply:
            with torch.no_grad():
                m.weight.masked_fill_(~mask, 0)
        out[name] = mask
    return out


# -- mask methods -----------------------------------------------------------

def magnitude(model, sparsity, *, scope="layer", filter_fn=None, apply=True) -> dict:
    """Prune the ``sparsity`` fraction of weights with the smallest |w|.

    ``scope="layer"`` prunes that fraction of every layer, like
    ``torch.nn.utils.prune.l1_unstructured``; ``scope="global"`` ranks all
    selected weights together, like ``global_unstructured(...,
    pruning_method=L1Unstructured)``, so layers with many small weights lose
    more. Both prune exactly ``round(sparsity * count)`` weights, as torch does.
    """
    where = "prune.magnitude"
    sparsity = _sparsity(sparsity, where)
    if scope not in ("layer", "global"):
        raise ValueError(f"{where}: scope must be 'layer' or 'global', got {scope!r}")
    layers = _layers(model, filter_fn, where)
    if scope == "layer":
        masks = {name: _prune_smallest(_abs(m.weight), _count(sparsity, m.weight.numel()))
                 for name, m in layers}
    else:
        dtype = torch.float32
        for _, m in layers:
            dtype = torch.promote_types(dtype, m.weight.dtype)
        flat = torch.cat([_abs(m.weight).reshape(-1).to(dtype) for _, m in layers])
        keep = _prune_smallest(flat, _count(sparsity, flat.numel()))
        masks, start = {}, 0
        for name, m in layers:
            masks[name] = keep[start:start + m.weight.numel()].view(m.weight.shape)
            start += m.weight.numel()
    return _finish(layers, masks, apply)


def threshold(model, t, *, filter_fn=None, apply=True) -> dict:
    """Prune every weight with |w| < t: a fixed cut-off, so each layer ends up
    with whatever sparsity its weight distribution gives."""
    where = "prune.threshold"
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"{where}: t must be a real number, got {type(t).__name__}")
    if not t >= 0:   # also rejects NaN
        raise ValueError(f"{where}: t must be >= 0, got {t}")
    layers = _layers(model, filter_fn, where)
    return _finish(layers, {name: _abs(m.weight) >= t for name, m in layers}, apply)


def n_m(model, n=2, m=4, *, filter_fn=None, apply=True) -> dict:
    """Keep the ``n`` largest |w| in every group of ``m`` consecutive inputs
    (along in_features): the N:M pattern that sparse matmul hardware and
    kernels (2:4 on NVIDIA tensor cores) can skip."""
    where = "prune.n_m"
    _n_m_args(n, m, where)
    layers = _layers(model, filter_fn, where)
    _check_m(layers, m, where)
    return _finish(layers, {name: _keep_n_of_m(_abs(mod.weight), n, m)
                            for name, mod in layers}, apply)


def block(model, sparsity, block=(32, 32), *, filter_fn=None, apply=True) -> dict:
    """Prune whole ``block = (rows, cols)`` tiles: the ``sparsity`` fraction of
    tiles with the smallest L2 norm in each layer. Whole zero tiles are what
    block-sparse kernels skip without per-element bookkeeping."""
    where = "prune.block"
    sparsity = _sparsity(sparsity, where)
    if (len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                   for b in block)):
        raise ValueError(f"{where}: block must be two positive ints (rows, cols), got {block!r}")
    br, bc = block
    layers = _layers(model, filter_fn, where)
    masks = {}
    for name, mod in layers:
        rows, cols = mod.weight.shape
        if rows % br or cols % bc:
            raise ValueError(f"{where}: layer {name!r} weight shape {(rows, cols)} is not "
                             f"divisible by block {(br, bc)}")
        tiles = _abs(mod.weight).reshape(rows // br, br, cols // bc, bc)
        norms = torch.linalg.vector_norm(tiles, dim=(1, 3))
        keep = _prune_smallest(norms, _count(sparsity, norms.numel()))
        masks[name] = keep[:, None, :, None].expand(-1, br, -1, bc).reshape(rows, cols)
    return _finish(layers, masks, apply)


def _run_calib(model, calib):
    if callable(calib):
        calib(model)
        return
    for batch in calib:
        if isinstance(batch, torch.Tensor):
            model(batch)
        elif isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            raise TypeError("prune.contribution: each calibration batch must be a Tensor, "
                            f"dict or tuple/list, got {type(batch).__name__}")


def _input_norms(model, calib, layers):
    """||x_j||_2 of every input feature j of every layer, over all calibration
    tokens (all leading dims flattened), summed in float64 so that long
    calibration sets do not lose precision. The hooks are removed even when
    the model raises."""
    sums = {name: None for name, _ in layers}

    def hook_for(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            sq = x.detach().reshape(-1, x.shape[-1]).to(torch.float64).square().sum(0)
            sums[name] = sq if sums[name] is None else sums[name] + sq
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, m in layers]
    try:
        with torch.no_grad():
            _run_calib(model, calib)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, s in sums.items() if s is None]
    if missing:
        raise ValueError(f"prune.contribution: {len(missing)} selected layer(s) saw no calibration "
                         f"input ({', '.join(map(repr, missing[:5]))}); check calib or exclude "
                         "them with filter_fn")
    return {name: s.sqrt() for name, s in sums.items()}


def contribution(model, calib, sparsity=None, *, n_m=None, filter_fn=None, apply=True) -> dict:
    """Wanda (Sun et al., 2023): score w_ij by |w_ij| * ||x_j||_2, the size of
    its contribution to the output on real inputs, so a small weight on a
    high-energy input feature is kept while magnitude pruning would drop it.

    ``calib`` is an iterable of batches, each run as ``model(batch)`` (Tensor),
    ``model(**batch)`` (dict) or ``model(*batch)`` (tuple/list), or a callable
    ``calib(model)`` that runs the forward passes itself. The model runs as it
    is under no_grad: call ``model.eval()`` first so dropout does not perturb
    the statistics.

    Give exactly one of ``sparsity`` (each output row prunes that fraction of
    its weights, as Wanda does) and ``n_m=(n, m)`` (the n best scores of every
    m consecutive inputs).
    """
    where = "prune.contribution"
    if (sparsity is None) == (n_m is None):
        raise ValueError(f"{where}: give exactly one of sparsity and n_m")
    if sparsity is not None:
        sparsity = _sparsity(sparsity, where)
    else:
        if not isinstance(n_m, (tuple, list)) or len(n_m) != 2:
            raise ValueError(f"{where}: n_m must be a pair (n, m), got {n_m!r}")
        _n_m_args(*n_m, where)
    layers = _layers(model, filter_fn, where)
    if n_m is not None:   # fail on a bad shape before the calibration runs
        _check_m(layers, n_m[1], where)
    norms = _input_norms(model, calib, layers)
    masks = {}
    for name, m in layers:
        scores = m.weight.detach().abs().to(torch.float64) * norms[name].to(m.weight.device)
        if n_m is not None:
            masks[name] = _keep_n_of_m(scores, *n_m)
            continue
        masks[name] = _prune_smallest(scores, _count(sparsity, m.in_features), dim=1)
    return _finish(layers, masks, apply)


# -- applying and keeping masks --------------------------------------------------

def apply_(model, masks) -> dict:
    """Zero the weights where ``masks`` ({module name: bool mask}) is False, in
    place, and record the masks on the modules. For masks computed elsewhere,
    e.g. loaded from a file."""
    where = "prune.apply_"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    layers = []
    for name, mask in masks.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{where}: {name!r} is not an nn.Linear of the model")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{where}: mask for {name!r} must be a Tensor, got {type(mask).__name__}")
        if mask.shape != m.weight.shape:
            raise ValueError(f"{where}: mask for {name!r} has shape {tuple(mask.shape)}, "
                             f"weight has {tuple(m.weight.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{where}: mask for {name!r} must be torch.bool, got {mask.dtype}")
        if not m.weight.is_floating_point():
            raise TypeError(f"{where}: layer {name!r} has a {m.weight.dtype} weight")
        layers.append((name, m))
    return _finish(layers, masks, True)


def masks_of(model) -> dict:
    """The masks recorded on ``model``'s layers by the functions above."""
    return {name: getattr(m, _ATTR) for name, m in model.named_modules()
            if isinstance(getattr(m, _ATTR, None), torch.Tensor)}


def attach(optimizer, model, masks=None) -> dict:
    """Register masks with a pyopt optimizer (``optimizer.set_mask(module.weight,
    mask)``): after each step the pruned weights and their optimizer state are
    exact zeros again, so fine-tuning keeps the sparsity. ``masks`` defaults to
    the masks recorded on ``model``; the model is needed either way because
    masks are keyed by module name. Each mask is moved to its weight's device
    and layout if needed and recorded on the module. Returns the masks attached."""
    where = "prune.attach"
    if not hasattr(optimizer, "set_mask"):
        raise TypeError(f"{where}: {type(optimizer).__name__} has no set_mask; "
                        "use a pyopt.optim optimizer")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    masks = masks_of(model) if masks is None else masks
    if not masks:
        raise ValueError(f"{where}: no masks; prune the model first "
                         "(or record masks with prune.apply_)")
    modules = dict(model.named_modules())
    for name in masks:
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"{where}: {name!r} is not an nn.Linear of the model")
    out = {}
    for name, mask in masks.items():
        # a model moved to another device after pruning left its masks behind
        mod = modules[name]
        mask = out[name] = _like(mod.weight.detach(), mask)
        setattr(mod, _ATTR, mask)
        optimizer.set_mask(mod.weight, mask)
    return out
