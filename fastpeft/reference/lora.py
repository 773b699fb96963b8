"""Reference LoRA: the specification the kernels are tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import dropout_2d


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T.

    x: [..., in]; weight: [out, in]; bias: [out] or None; lora_A: [r, in];
    lora_B: [out, r]. dropout uses the counter-based mask of
    ``fastpeft.reference.dropout`` over the 2-D view [prod(...), in] of x.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight, bias)
    xd = dropout_2d(x2, dropout_p, seed)
    y = y + scaling * F.linear(F.linear(xd, lora_A), lora_B)
    return y.reshape(*lead, weight.shape[0])


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The merged update scaling * B A, shape [out, in]."""
    return scaling * (lora_B @ lora_A)
