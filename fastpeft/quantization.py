"""Model-level post-training quantization: the seed lecture's PTQ workflows on fastpeft's layers."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .model import _replace, plain_linear_names
from .nn.int8 import Int8Linear
from .nn.qlinear import QuantLinear

WEIGHTS = ("int8", "int4")
ACTIVATIONS = (None, "dynamic", "static")


def quantize_model(model: nn.Module, weights: str = "int8", activations: str | None = None,
                   group_size: int | None = 128, calibration_data=None,
                   skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of ``model`` (but those matching ``skip``: equal to an entry or
    ending with "." + entry) by a quantized layer, in place; returns ``model``.

    weights="int8"/"int4" with activations=None: weight-only ``QuantLinear`` (zero-point codes,
    groups of ``group_size`` input features; None: one scale per output row), activations
    stay 16-bit; a layer whose in_features is not a multiple of group_size gets one scale per
    output row. weights="int8" with activations="dynamic": ``Int8Linear`` with threshold 0,
    i.e. int8 activations with a scale per token computed at run time and an int8 GEMM.
    Not supported yet (a clear error): int4 weights with int8 activations, and static
    activation scales from ``calibration_data``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects an nn.Module, got {type(model).__name__}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "static":
        raise NotImplementedError("activations='static' (calibrated activation scales) is not implemented yet")
    if activations == "dynamic" and weights == "int4":
        raise NotImplementedError("int4 weights with dynamic int8 activations have no kernel yet; "
                                  "use weights='int8' or activations=None")
    if calibration_data is not None:
        raise ValueError("calibration_data is only used with activations='static'")
    for name in plain_linear_names(model, skip):
        linear = model.get_submodule(name)
        if activations == "dynamic":
            new = Int8Linear.from_linear(linear, threshold=0.0)
        else:
            g = group_size if group_size is not None and linear.in_features % group_size == 0 else None
            new = QuantLinear.from_linear(linear, bits=8 if weights == "int8" else 4, group_size=g)
        _replace(model, name, new)
    return model
