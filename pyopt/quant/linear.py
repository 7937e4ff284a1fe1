"""QuantLinear: an nn.Linear whose weight is stored in 8 or 4 bits and whose
matmul reads the packed weight directly (layouts in pyopt.quant.formats).

    pyopt.quant.quantize_(model, "int8")                   # W8A8
    pyopt.quant.quantize_(model, "int8_weight_only")       # W8, float activations
    pyopt.quant.quantize_(model, "int4_weight_only", group_size=128)
    pyopt.quant.quantize_(model, "int4_weight_only", calib=batches)  # AWQ-style scaling
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from . import formats
from ._kernels import ACTS, check_input, linear_nd

__all__ = ["QuantConfig", "QuantLinear", "quantize_", "CONFIGS"]

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class QuantConfig:
    """How a Linear is quantized.

    bits         8 or 4
    scheme       "symmetric" (absmax) or "asymmetric" (min-max with an offset)
    granularity  "tensor", "channel" (per output row) or "group" (along in_features)
    group_size   32, 64, 128 or 256 when granularity == "group"
    act          "float": weight-only, activations stay float (W8, W4);
                 "int8": activations quantized per token to int8 on every call and
                 integer dot products (W8A8, W4A8)
    """
    bits: int = 8
    scheme: str = "symmetric"
    granularity: str = "channel"
    group_size: int | None = None
    act: str = "float"

    def check(self, in_features: int, where: str) -> int:
        if self.act not in ACTS:
            raise ValueError(f"{where}: act must be one of {', '.join(ACTS)}, got {self.act!r}")
        return formats.check_config(self.bits, self.scheme, self.granularity, self.group_size,
                                    in_features, where)


CONFIGS = {
    "int8": QuantConfig(8, "symmetric", "channel", None, "int8"),
    "int8_weight_only": QuantConfig(8, "symmetric", "channel", None, "float"),
    "int4_weight_only": QuantConfig(4, "symmetric", "group", 128, "float"),
}


def make_config(config, **overrides) -> QuantConfig:
    """A QuantConfig from a name in CONFIGS, a QuantConfig or a dict, with
    keyword overrides (e.g. group_size=64, scheme="symmetric")."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown quantization config {config!r}; expected one of "
                             f"{', '.join(CONFIGS)} or a QuantConfig")
        config = CONFIGS[config]
    elif isinstance(config, dict):
        config = QuantConfig(**config)
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a name, a QuantConfig or a dict, got {type(config).__name__}")
    if "group_size" in overrides and overrides["group_size"] is not None \
            and "granularity" not in overrides:
        overrides["granularity"] = "group"
    return replace(config, **overrides) if overrides else config


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + bias`` with W held quantized; same call contract
    as nn.Linear for float32, bfloat16 and float16 input (the output has the
    input's dtype). Build one with :meth:`from_float` or :func:`quantize_`.

    Buffers: ``qweight``, ``scale``, ``offset`` (see pyopt.quant.formats) and,
    after activation-aware calibration, ``input_scale`` (the input is divided
    by it, since the weight's columns were multiplied by it before quantizing).
    Inference only: the quantized weight gets no gradient (the input does).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config="int8_weight_only", *, device=None, dtype=None, **overrides):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.config = make_config(config, **overrides)
        self.group_size = self.config.check(self.in_features, "QuantLinear")
        self.backend = None             # None: PYOPT_BACKEND or auto
        dtype = dtype or torch.get_default_dtype()
        if dtype not in _FLOAT:
            raise TypeError(f"QuantLinear dtype must be float32, bfloat16 or float16, got {dtype}")
        t = formats.quantize(torch.zeros(self.out_features, self.in_features, device=device),
                             **self._qargs())
        self._set_layout(t)
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None
        self.register_buffer("input_scale", None)

    def _qargs(self) -> dict:
        c = self.config
        return {"bits": c.bits, "scheme": c.scheme, "granularity": c.granularity,
                "group_size": c.group_size}

    def _set_layout(self, t: dict) -> None:
        for name in formats.FIELDS:
            self._buffers.pop(name, None)
            self.register_buffer(name, t.get(name))

    def layout(self) -> dict:
        return {f: getattr(self, f) for f in formats.FIELDS}

    # -- construction --------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, config="int8_weight_only", *, input_scale=None,
                   backend=None, **overrides) -> "QuantLinear":
        """Quantize an nn.Linear. ``input_scale`` (float [in_features], from
        :func:`pyopt.quant.calibrate`) multiplies the weight's columns before
        quantizing and divides the input on every call (AWQ)."""
        if isinstance(linear, QuantLinear):
            raise TypeError("from_float: the layer is already a QuantLinear")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.is_quantized or not w.is_floating_point() or w.dtype not in _FLOAT:
            raise TypeError(f"cannot quantize a {w.dtype} weight: QuantLinear needs a float32, "
                            "bfloat16 or float16 nn.Linear (integer or already-quantized "
                            "layers are not supported)")
        out_f, in_f = w.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_f, out_f
        layer.config = make_config(config, **overrides)
        layer.group_size = layer.config.check(in_f, "QuantLinear.from_float")
        layer.backend = backend
        wf = w.detach().float()
        if input_scale is not None:
            input_scale = input_scale.detach().to(torch.float32, copy=True).to(w.device)
            if input_scale.shape != (in_f,) or not bool((input_scale > 0).all()):
                raise ValueError(f"input_scale must be positive with shape ({in_f},)")
            wf = wf * input_scale
        layer._set_layout(formats.quantize(wf, **layer._qargs()))
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False) \
            if linear.bias is not None else None
        layer.register_buffer("input_scale", input_scale)
        return layer

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] weight this layer computes with."""
        w = formats.dequantize(self.layout(), self.config.bits, self.in_features)
        return w / self.input_scale if self.input_scale is not None else w

    # -- forward -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # buffers straight from the dict: Module.__getattr__ costs about 1 us
        # each, a tenth of a small layer's call
        buf = self._buffers
        qweight, input_scale = buf["qweight"], buf.get("input_scale")
        check_input(x, self.in_features, None, qweight.device, "QuantLinear")
        params = self._parameters
        bias = params["bias"] if "bias" in params else self.__dict__.get("bias")
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if input_scale is not None:
            x = (x.float() / input_scale).to(x.dtype)
        cfg = self.config
        args = (x, qweight, buf["scale"], buf.get("offset"), bias, cfg.bits, cfg.act, self.backend)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.ops.pyopt.quant_linear(*args)
        return linear_nd(*args)

    def extra_repr(self) -> str:
        c = self.config
        g = f"group_size={c.group_size}" if c.granularity == "group" else f"per_{c.granularity}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={c.bits}, {g}, scheme={c.scheme}, "
                f"act={c.act}" + (", awq" if self.input_scale is not None else ""))

    # -- dtype / device moves --------------------------------------------------
    def _apply(self, fn, recurse=True):
        # Scales stay float32 under model.half() / .to(bfloat16): the kernels
        # read float32, and rounding them would change every weight. Integer
        # views are moved between devices but never cast.
        keep = [n for n in ("scale", "offset", "input_scale") if self._buffers.get(n) is not None]
        for n in keep:
            self._buffers[n] = self._buffers[n].view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            for n in keep:
                self._buffers[n] = self._buffers[n].view(torch.float32)

    # -- state_dict ----------------------------------------------------------
    def get_extra_state(self):
        return {"config": asdict(self.config), "shape": (self.out_features, self.in_features),
                "awq": self.input_scale is not None, "version": 1}

    def set_extra_state(self, state):
        pass  # checked in _load_from_state_dict, before the tensors are copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        where = f"QuantLinear ({prefix.rstrip('.') or 'root'})"
        extra = state_dict.get(prefix + "_extra_state")
        if not isinstance(extra, dict) or "config" not in extra:
            raise ValueError(f"{where}: the state_dict is not from a QuantLinear (no quantization "
                             "config in it); quantize the model first, then load")
        cfg = QuantConfig(**extra["config"])
        if cfg != self.config or tuple(extra.get("shape", ())) != (self.out_features,
                                                                   self.in_features):
            raise ValueError(f"{where}: checkpoint config {cfg} with shape {tuple(extra.get('shape', ()))} "
                             f"does not match this layer's {self.config} with shape "
                             f"{(self.out_features, self.in_features)}")
        new = {f: state_dict.get(prefix + f) for f in formats.FIELDS}
        formats.validate(new, cfg.bits, (self.out_features, self.in_features),
                         self.group_size if cfg.granularity == "group" else 0, where)
        if (new["offset"] is None) != (self.offset is None):
            raise ValueError(f"{where}: checkpoint offset presence does not match the layout")
        dev = self.qweight.device
        self._set_layout({f: (torch.empty_like(v, device=dev) if v is not None else None)
                          for f, v in new.items()})
        s = state_dict.get(prefix + "input_scale")
        if s is not None and (s.dtype != torch.float32 or tuple(s.shape) != (self.in_features,)):
            raise ValueError(f"{where}: input_scale must be float32 of shape ({self.in_features},)")
        self._buffers["input_scale"] = torch.empty_like(s, device=dev) if s is not None else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def quantize_(model: nn.Module, config="int8_weight_only", filter_fn=None, *, calib=None,
              backend=None, **overrides) -> nn.Module:
    """Replace the nn.Linear layers of ``model`` by QuantLinear, in place (the
    shape of torchao's ``quantize_``).

    ``config``: "int8" (W8A8), "int8_weight_only", "int4_weight_only", a
    QuantConfig or a dict; keyword overrides such as ``group_size=64``.
    ``filter_fn(module, fqn) -> bool`` picks layers (default: every nn.Linear).
    ``calib``: calibration batches (an iterable of inputs, or a callable that
    runs the model) for activation-aware scaling (AWQ); see
    :func:`pyopt.quant.calibrate`. Returns ``model`` (or the replacement when
    ``model`` itself is a Linear).
    """
    from .calibrate import awq_scales
    cfg = make_config(config, **overrides)
    if isinstance(model, QuantLinear):
        raise TypeError("quantize_: the model is already a QuantLinear")
    if isinstance(model, nn.Linear):
        if filter_fn is not None and not filter_fn(model, ""):
            return model
        scales = awq_scales(model, calib, cfg, lambda m, n: n == "") if calib is not None else {}
        return QuantLinear.from_float(model, cfg, input_scale=scales.get(""), backend=backend)
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and (filter_fn is None or filter_fn(mod, name))]
    if any(isinstance(mod, QuantLinear) for mod in model.modules()) and not targets:
        raise TypeError("quantize_: the model is already quantized (no nn.Linear left to convert)")
    for name, mod in targets:
        cfg.check(mod.in_features, f"quantize_ ({name})")
    names = {name for name, _ in targets}
    scales = awq_scales(model, calib, cfg, lambda m, n: n in names) if calib is not None else {}
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_float(mod, cfg, input_scale=scales.get(name),
                                                      backend=backend))
    return model
