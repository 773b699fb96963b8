"""FusedLinearDistillationLoss: the distillation loss from hidden states and LM heads, chunked so
the [tokens, vocab] logits never exist whole (fastpeft.ops.distill)."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from ..ops import distill as ops


class FusedLinearDistillationLoss(nn.Module):
    """loss = distillation_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, labels, temperature, alpha, ...)

    computed a chunk of ``chunk_size`` rows at a time (default: about 2**26 / vocab rows): the
    chunk's logits, the fused loss kernel, and at once the chunk's share of the gradients for the
    student's hidden states, head weight and bias (see fastpeft.fused_linear_distillation_loss).
    The teacher gets no gradient. reduction "mean" (over the rows whose label is not
    ignore_index; all rows without labels) or "sum". No parameters.
    """

    def __init__(self, temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100,
                 divergence: str = "forward_kl", reduction: str = "mean", chunk_size: int | None = None) -> None:
        super().__init__()
        self.temperature, self.alpha = ops.check_options(temperature, alpha, ignore_index, divergence, reduction,
                                                         ops.FUSED_REDUCTIONS)
        if chunk_size is not None:
            _checks.positive_int("chunk_size", chunk_size)
        self.ignore_index = int(ignore_index)
        self.divergence = divergence
        self.reduction = reduction
        self.chunk_size = chunk_size

    def forward(self, student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor,
                labels: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.fused_linear_distillation_loss(
            student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, labels, student_bias,
            teacher_bias, self.temperature, self.alpha, self.ignore_index, self.divergence, self.reduction,
            self.chunk_size)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}, "
                f"reduction={self.reduction!r}, chunk_size={self.chunk_size}")
