"""Model-level quantization-aware training: ``prepare_qat`` puts fake quantization into a model's
linear layers, ``convert_qat`` turns the trained result into real quantized layers."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .model import _replace, plain_linear_names
from .nn.qat import QATLinear, _check_config


def prepare_qat(model: nn.Module, bits: int = 8, scheme: str = "zeropoint", activations: bool = True,
                skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of ``model`` (but those matching ``skip``: equal to an entry or
    ending with "." + entry) in place by ``QATLinear.from_linear(linear, bits, scheme,
    activations)``; returns ``model``.

    Each layer then trains its float weight through a learnable per-output-row fake quantizer
    (``bits`` 8 or 4, ``scheme`` "zeropoint" or "absmax"), initialized from the weight's min /
    max, i.e. the post-training quantizer. activations=True also fake-quantizes each layer's
    input to int8 (symmetric, one learnable step per tensor, initialized from the first batch
    the layer sees): the form of fastpeft's static int8-activation kernel. The weight and bias
    Parameters are the nn.Linear's own (not copied); nothing is frozen or unfrozen. Train as
    usual (the scales and zero points are Parameters too), then call ``convert_qat``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat expects an nn.Module, got {type(model).__name__}")
    _check_config(bits, scheme, activations)
    names = plain_linear_names(model, skip)
    if not names:
        done = sum(isinstance(m, QATLinear) for m in model.modules())
        hint = f" (it already holds {done} QATLinear layers)" if done else ""
        raise ValueError(f"prepare_qat: {type(model).__name__} has no nn.Linear submodule outside "
                         f"skip={tuple(skip) if not isinstance(skip, str) else skip!r}{hint}")
    new = {n: QATLinear.from_linear(model.get_submodule(n), bits, scheme, activations) for n in names}
    for name, module in new.items():
        _replace(model, name, module)
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every QATLinear of ``model`` in place by its real quantized layer; returns ``model``.

    Each becomes ``fastpeft.QuantLinear.from_quantized`` over the weight's codes under the
    learned quantizer (per output row; dequantized, they equal the fake-quantized weight bit for
    bit), with activations="static" and the learned input step when the layer fake-quantized its
    input (W8A8 / W4A8 on the int8 kernel), weight-only otherwise. Every layer must have seen
    data first (RuntimeError otherwise; the model is then left unchanged).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_qat expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, QATLinear):
        raise ValueError("convert_qat converts the QATLinear submodules of a model; for a single layer "
                         "call its .to_quant_linear()")
    names = [n for n, m in model.named_modules() if isinstance(m, QATLinear)]
    if not names:
        raise ValueError(f"convert_qat: {type(model).__name__} has no QATLinear layer; "
                         f"call fastpeft.prepare_qat(model, ...) and train it first")
    new = {}
    for n in names:
        try:
            new[n] = model.get_submodule(n).to_quant_linear()
        except (RuntimeError, ValueError) as e:
            raise type(e)(f"convert_qat: layer {n!r}: {e}") from None
    for name, module in new.items():
        _replace(model, name, module)
    return model
