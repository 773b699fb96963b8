"""QATLinear: a linear layer trained with fake-quantized weights and activations (QAT)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..ops.fakequant import BITS
from ..ops.quant import QuantizedTensor
from ..reference.fakequant import zero_point_int
from ..reference.quant import SCHEMES, pack4, quantize_codes
from ._common import new_module
from .fakequant import FakeQuantize
from .qlinear import QuantLinear


def check_config(bits, scheme, activations):
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(activations, bool):
        raise TypeError(f"activations must be True (fake-quantize the input to int8) or False (weights "
                        f"only), got {activations!r}")


class QATLinear(nn.Module):
    """y = F.linear(input_fake_quant(x), weight_fake_quant(weight), bias): quantization-aware training.

    ``weight`` [out, in] and ``bias`` [out] are the float Parameters being trained.
    ``weight_fake_quant`` is a learnable ``fastpeft.FakeQuantize(bits, scheme, axis=0)``: one
    scale (and zero point) per output row, LSQ / LSQ+ gradients. It is initialized at
    construction from the weight's per-row min / max (fastpeft.quantize's rule), so training
    starts from exactly the post-training quantizer.

    ``input_fake_quant`` (activations=True) is a learnable ``FakeQuantize(8, "absmax",
    axis=None)``: the input quantized symmetrically to int8 with one step for the whole tensor,
    codes clamp(round(x / s), -127, 127), whatever ``bits`` and ``scheme`` the weight uses. That
    is the form fastpeft's static int8-activation kernel runs (QuantLinear with
    activations="static"), so the converted layer computes the same thing. Its step is set from
    the first non-empty input seen (absmax / 127), then learned. activations=False leaves the
    input in floating point (weight-only quantization; ``input_fake_quant`` is None).

    ``to_quant_linear()`` gives the real quantized layer (fastpeft.convert_qat calls it).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 scheme: str = "zeropoint", activations: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        in_features = _checks.positive_int("in_features", in_features)
        out_features = _checks.positive_int("out_features", out_features)
        check_config(bits, scheme, activations)
        w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's init
        b = None
        if bias:
            b = torch.empty(out_features, device=device, dtype=dtype)
            nn.init.uniform_(b, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
        self._build(nn.Parameter(w), None if b is None else nn.Parameter(b), bits, scheme, activations)

    def _build(self, weight, bias, bits, scheme, activations):
        """The one constructor path: the layer over these weight and bias Parameters (shared)."""
        self.out_features, self.in_features = (int(v) for v in weight.shape)
        self.bits, self.scheme = bits, scheme
        self.weight = weight
        self.register_parameter("bias", bias)
        device = weight.device
        self.weight_fake_quant = FakeQuantize(bits, scheme, axis=0, learnable=True,
                                              num_channels=self.out_features).to(device)
        self.input_fake_quant = FakeQuantize(8, "absmax", axis=None, learnable=True).to(device) \
            if activations else None
        self.reset_weight_quantizer()

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, scheme: str = "zeropoint",
                    activations: bool = True) -> "QATLinear":
        """A QATLinear over ``linear``'s weight and bias Parameters (shared, not copied: training
        the QATLinear trains them)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QATLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        check_config(bits, scheme, activations)
        _checks.positive_int("in_features", linear.in_features)
        _checks.positive_int("out_features", linear.out_features)
        if not linear.weight.is_floating_point():
            raise TypeError(f"QATLinear needs a floating weight, got {linear.weight.dtype}")
        self = new_module(cls)
        self._build(linear.weight, linear.bias, bits, scheme, activations)
        return self

    @torch.no_grad()
    def reset_weight_quantizer(self) -> None:
        """Set the weight quantizer's scales and zero points from the weight's per-row min / max
        (fastpeft.quantize(weight, bits, scheme, axis=0)'s parameters)."""
        fq = self.weight_fake_quant
        w = self.weight.detach()
        _checks.tensor("weight", w, dtypes=_checks.FLOAT_DTYPES)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weight contains NaN or inf: its rows' scales would be meaningless")
        fq._set_qparams(*fq._minmax(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"QATLinear expects input [..., {self.in_features}], got {shape}")
        if self.input_fake_quant is not None:
            x = self.input_fake_quant(x)
        return F.linear(x, self.weight_fake_quant(self.weight), self.bias)

    def _check_ready(self) -> None:
        fqs = {"weight_fake_quant": self.weight_fake_quant, "input_fake_quant": self.input_fake_quant}
        for name, fq in fqs.items():
            if fq is None:
                continue
            if not fq._initialized:
                raise RuntimeError(f"{name} has not seen any data, so it has no scale yet: run the model "
                                   f"on representative inputs (calibration / QAT training) before converting")
            s = fq.scale.detach()
            if not bool((torch.isfinite(s) & (s > 0)).all()):
                raise ValueError(f"{name}.scale must be finite and > 0 to convert, got "
                                 f"{s.flatten()[:8].tolist()}")

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedTensor:
        """The weight's codes under the learned quantizer: quantize_codes(weight, scale, z_int)
        with z_int = clamp(round(zero_point), qmin, qmax), per output row (axis=0), packed two per
        byte at 4 bits. dequantize() of it equals weight_fake_quant(weight) bit for bit."""
        self._check_ready()
        fq = self.weight_fake_quant
        scale = fq.scale.detach().float().clone()
        zp = fq.zero_point.detach() if self.scheme == "zeropoint" else None
        z = zero_point_int(zp, scale, self.bits, self.scheme).to(torch.int32)
        codes = quantize_codes(self.weight.detach(), scale, z, self.bits, self.scheme, axis=0)
        if self.bits == 4:
            data = pack4(codes)
        else:
            data = codes.to(torch.int8 if self.scheme == "absmax" else torch.uint8)
        return QuantizedTensor(data, scale, z, self.bits, self.scheme, 0, None, self.weight.shape, self.weight.dtype)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The real quantized layer: ``QuantLinear.from_quantized`` over ``quantized_weight()``,
        with activations="static" and input_scale = the learned input step (or weight-only when
        this layer does not fake-quantize its input). Raises RuntimeError when a quantizer has not
        seen data yet."""
        self._check_ready()
        fq = self.input_fake_quant
        return QuantLinear.from_quantized(self.quantized_weight(), self.bias,
                                          activations=None if fq is None else "static",
                                          input_scale=None if fq is None else fq.scale.detach())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, scheme={self.scheme!r}, "
                f"activations={self.input_fake_quant is not None}")
