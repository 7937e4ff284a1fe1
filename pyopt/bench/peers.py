"""Peer libraries the benchmark compares against when they are installed.

They are detected, never required: ``detect()`` says for each one whether it
can run here and, if not, why.
"""
from __future__ import annotations

import importlib

import torch

# name -> (module to import, what it provides, devices it runs on)
PEERS = {
    "deepspeed": ("deepspeed.ops.adam", "DeepSpeedCPUAdam (fused CPU Adam/AdamW)", ("cpu",)),
    "apex": ("apex.optimizers", "FusedAdam / FusedSGD (CUDA multi-tensor)", ("cuda",)),
    "bitsandbytes": ("bitsandbytes", "8-bit optimizers, int8/4-bit matmul", ("cpu", "cuda")),
    "torchao": ("torchao", "low-bit optimizers, quantize_/sparsify_", ("cpu", "cuda")),
    "cupy": ("cupy", "cuBLAS / cuSPARSE baselines without torch", ("cuda",)),
}


def detect(device: str = "cpu") -> dict:
    """{peer: {"available": bool, "reason": str, "provides": str}}."""
    out = {}
    for name, (module, provides, devices) in PEERS.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure means unavailable
            reason = ("not installed" if isinstance(e, ModuleNotFoundError)
                      else f"import failed: {type(e).__name__}: {e}")
            out[name] = {"available": False, "reason": reason, "provides": provides}
            continue
        if device not in devices:
            out[name] = {"available": False, "provides": provides,
                         "reason": f"runs on {', '.join(devices)} only"}
        elif device == "cuda" and not torch.cuda.is_available():
            out[name] = {"available": False, "provides": provides, "reason": "no CUDA device"}
        else:
            out[name] = {"available": True, "reason": "", "provides": provides}
    return out


def optimizer_impls(device: str, case) -> dict:
    """Peer implementations of the case's optimizer step, when installed:
    {name: (factory or None, reason)} in the shape of optim.impls()."""
    found = detect(device)
    out = {}
    if case.optimizer in ("Adam", "AdamW") and case.kind == "step" and device == "cpu":
        d = found["deepspeed"]
        if d["available"]:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            kw = dict(lr=case.kwargs.get("lr", 1e-3), adamw_mode=case.optimizer == "AdamW",
                      weight_decay=1e-2 if case.optimizer == "AdamW" else 0.0)
            out["deepspeed DeepSpeedCPUAdam"] = (
                lambda ps: (lambda o: o.step)(DeepSpeedCPUAdam(ps, **kw)), "")
        else:
            out["deepspeed DeepSpeedCPUAdam"] = (None, d["reason"])
    if case.optimizer in ("Adam", "AdamW") and case.kind == "step" and device == "cuda":
        d = found["apex"]
        if d["available"]:
            from apex.optimizers import FusedAdam
            adam_w = case.optimizer == "AdamW"
            out["apex FusedAdam"] = (lambda ps: FusedAdam(
                ps, adam_w_mode=adam_w, weight_decay=1e-2 if adam_w else 0.0).step, "")
        else:
            out["apex FusedAdam"] = (None, d["reason"])
    return out
