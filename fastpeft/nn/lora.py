"""LoRALinear: a frozen linear layer plus a trainable low-rank update, on the fused op."""
from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..ops.int8 import quantize_weight
from ..ops.lora import lora_linear, lora_update
from .int8 import Int8Linear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilized LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T with W and b frozen.

    ``weight`` [out, in] and ``bias`` [out] are frozen; ``lora_A`` [r, in]
    (kaiming-uniform, a=sqrt(5)) and ``lora_B`` [out, r] (zeros) train, so a new
    layer computes exactly its base linear. ``scaling`` is lora_alpha / r
    (lora_alpha / sqrt(r) with ``use_rslora``). ``merge()`` folds the update into
    ``weight`` and keeps the original, so ``unmerge()`` restores it bit for bit.

    On an int8 base (``from_linear(Int8Linear)``) the frozen layer is ``base_layer`` and
    y = base_layer(x) + scaling * (dropout(x) A^T) B^T; the adapters are float32; merge
    re-quantizes the base and unmerge restores its int8 codes and scales exactly.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        _checks.positive_int("in_features", in_features)
        _checks.positive_int("out_features", out_features)
        self._set_config(r, lora_alpha, lora_dropout, use_rslora)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_adapter(self.weight.device, self.weight.dtype)

    def _set_config(self, r, lora_alpha, lora_dropout, use_rslora) -> None:
        self.r = _checks.positive_int("r", r)
        self.lora_alpha = _checks.finite_float("lora_alpha", lora_alpha)
        self.lora_dropout = _checks.probability("lora_dropout", lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.r, self.lora_alpha, self.use_rslora)
        self.merged = False
        self.base_layer: Int8Linear | None = None  # set by from_linear(Int8Linear)

    def _init_adapter(self, device, dtype) -> None:
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=dtype))
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.register_buffer("_unmerged_codes", None, persistent=False)
        self.register_buffer("_unmerged_scale", None, persistent=False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: kaiming-uniform (a=sqrt(5)), as nn.Linear and PEFT do; B: zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear | Int8Linear, r: int = 8, lora_alpha: float = 8,
                    lora_dropout: float = 0.0, use_rslora: bool = False) -> "LoRALinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen.

        An ``Int8Linear`` becomes ``base_layer`` (LoRA on an int8 base, float32 adapters).
        """
        if not isinstance(linear, (nn.Linear, Int8Linear)):
            raise TypeError(f"from_linear expects an nn.Linear or Int8Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_config(r, lora_alpha, lora_dropout, use_rslora)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if isinstance(linear, Int8Linear):
            self.base_layer = linear
            self.base_layer.requires_grad_(False)
            self._init_adapter(linear.weight_int8.device, torch.float32)
            return self
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._init_adapter(linear.weight.device, linear.weight.dtype)
        return self

    @property
    def base_bias_name(self) -> str:
        """Name of the frozen bias within this module ("bias", or "base_layer.bias" on int8)."""
        return "bias" if self.base_layer is None else "base_layer.bias"

    @property
    def base_bias(self) -> nn.Parameter | None:
        return (self if self.base_layer is None else self.base_layer).bias

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32, shape [out, in]."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_layer is not None:
            y = self.base_layer(x)
            if self.merged:
                return y
            return y + lora_update(x, self.lora_A, self.lora_B, self.scaling,
                                   dropout_p=self.lora_dropout, training=self.training)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training)

    def _merged_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_weight(self.base_layer.dequantized_weight() + self.delta_weight())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (rounded once from fp32, or re-quantized for an
        int8 base); keep the original for unmerge."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing done", stacklevel=2)
            return
        if self.base_layer is not None:
            base = self.base_layer
            self._unmerged_codes, self._unmerged_scale = base.weight_int8.clone(), base.weight_scale.clone()
            q, scale = self._merged_int8()
            base.weight_int8.copy_(q)
            base.weight_scale.copy_(scale)
        else:
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight bit for bit (int8 codes and scales for an int8 base)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing done", stacklevel=2)
            return
        if self.base_layer is not None:
            self.base_layer.weight_int8.copy_(self._unmerged_codes)
            self.base_layer.weight_scale.copy_(self._unmerged_scale)
            self._unmerged_codes = self._unmerged_scale = None
        else:
            self.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear | Int8Linear:
        """A new layer holding the merged weight (this layer is left as it is): an nn.Linear,
        or for an int8 base an Int8Linear with the re-quantized merged weight."""
        if self.base_layer is not None:
            out = copy.deepcopy(self.base_layer)
            if not self.merged:
                q, scale = self._merged_int8()
                out.weight_int8.copy_(q)
                out.weight_scale.copy_(scale)
            return out
        w = self.weight.detach().clone() if self.merged else \
            (self.weight.float() + self.delta_weight()).to(self.weight.dtype)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        has_bias = self.base_bias is not None
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}, "
                f"bias={has_bias}, use_rslora={self.use_rslora}, merged={self.merged}")
