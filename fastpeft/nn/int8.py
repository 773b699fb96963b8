"""Int8Linear: LLM.int8() linear layer with int8 weights and 16-bit outlier columns."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from ._common import MergeableQuantized, fresh_linear, new_module
from ..ops.int8 import check_threshold, int8_linear, quantize_weight
from ..reference.int8 import dequantize_weight


class Int8Linear(MergeableQuantized):
    """y = int8_linear(x, weight_int8, weight_scale, bias, threshold) (see fastpeft.int8_linear).

    Buffers ``weight_int8`` [out, in] int8 and ``weight_scale`` [out] float32 (row absmax):
    half the bytes of an fp16 weight. ``bias`` [out] (in ``dtype``) is a frozen Parameter.
    The weight is frozen; the layer passes gradients to its input, so LoRA trains on top
    of it (``LoRALinear.from_linear(int8_layer)``); ``merge_`` / ``unmerge_`` / ``merged_copy``
    (fastpeft.nn._common.MergeableQuantized) re-quantize a merged update row-wise and restore
    the codes and scales exactly. Loading a state_dict that holds a 16-bit ``weight`` (an
    nn.Linear's) quantizes it.

    Activations: dynamic by default (one absmax scale per token, computed at run time). With
    ``input_scale`` (a step > 0, e.g. from fastpeft.quantize_model's calibration) they are
    static: codes clamp(rint(x / input_scale), -127, 127), buffer ``input_scale`` (float32,
    0-d); needs threshold 0.
    """

    _float32_buffers = ("weight_scale", "input_scale")
    _merge_buffers = ("weight_int8", "weight_scale")  # what merge_ re-quantizes (and unmerge_ restores)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 device=None, dtype=None, input_scale=None) -> None:
        super().__init__()
        _checks.positive_int("in_features", in_features)
        _checks.positive_int("out_features", out_features)
        check_threshold(threshold)  # before the weight is made
        w, b = fresh_linear(in_features, out_features, bias, device, dtype)  # quantized below
        self._build(w, b, threshold, input_scale)

    def _build(self, weight: torch.Tensor, bias: nn.Parameter | None, threshold: float, input_scale) -> None:
        """The one constructor path: ``weight`` [out, in] quantized row-wise into the buffers,
        ``bias`` (a frozen Parameter or None) kept as it is."""
        self.out_features, self.in_features = (int(v) for v in weight.shape)
        self.threshold = check_threshold(threshold)
        self._set_input_scale(input_scale, weight.device)
        q, s = quantize_weight(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", s)
        self._no_merge_backup()
        self.bias = bias

    def _set_input_scale(self, input_scale, device) -> None:
        if input_scale is not None:
            if self.threshold != 0:
                raise ValueError(f"static activations (input_scale) need threshold=0 (no outlier columns), "
                                 f"got threshold={self.threshold:g}")
            input_scale = _checks.step_tensor("input_scale", input_scale).to(device)
        self.register_buffer("input_scale", input_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0, input_scale=None) -> "Int8Linear":
        """Quantize ``linear``'s weight row-wise to int8; its bias is copied in its dtype.
        input_scale: the static activation step (then threshold must be 0), or None (dynamic)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        self = new_module(cls)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._build(linear.weight, bias, threshold, input_scale)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]: weight_int8 * weight_scale / 127."""
        return dequantize_weight(self.weight_int8, self.weight_scale)

    def _requantized(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """``weight`` [out, in] quantized row-wise, as the layer's buffers (for merge_)."""
        q, s = quantize_weight(weight)
        return {"weight_int8": q, "weight_scale": s}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.weight_scale, self.bias, self.threshold,
                           input_scale=self.input_scale)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key in state_dict and prefix + "weight_int8" not in state_dict:
            w = state_dict.pop(key)
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{key}: shape {tuple(w.shape)} does not match "
                                  f"({self.out_features}, {self.in_features})")
            else:
                q, s = quantize_weight(w.to(self.weight_scale.device))
                state_dict[prefix + "weight_int8"], state_dict[prefix + "weight_scale"] = q, s
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold:g}"
                + ("" if self.input_scale is None else ", activations=static"))
