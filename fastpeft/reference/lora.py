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
    return F.linear(x, weight, bias) + lora_update(x, lora_A, lora_B, scaling, dropout_p, seed)


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The low-rank term alone: scaling * (dropout(x) A^T) B^T, x: [..., in] -> [..., out]."""
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])  # (-1 is ambiguous when x is empty)
    u = F.linear(dropout_2d(x2, dropout_p, seed), lora_A)
    return (scaling * F.linear(u, lora_B)).reshape(*lead, lora_B.shape[0])


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The merged update scaling * B A, shape [out, in]."""
    return scaling * (lora_B @ lora_A)
