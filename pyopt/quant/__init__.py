"""Quantized Linear layers: int8 (weight-only and dynamic W8A8) and 4-bit
weight-only (packed nibbles, group-wise scales), with AWQ-style calibration.

    pyopt.quant.quantize_(model, "int8")                             # W8A8
    pyopt.quant.quantize_(model, "int8_weight_only")
    pyopt.quant.quantize_(model, "int4_weight_only", group_size=128)

Layouts and math: :mod:`pyopt.quant.formats`.
"""
from .. import _ops  # noqa: F401  (registers pyopt::quant_linear)
from . import formats
from .formats import dequantize, pack_int4, quantize, quantize_per_token, unpack_int4
from .linear import CONFIGS, QuantConfig, QuantLinear, quantize_

__all__ = ["CONFIGS", "QuantConfig", "QuantLinear", "quantize_", "formats", "quantize",
           "dequantize", "pack_int4", "unpack_int4", "quantize_per_token"]
