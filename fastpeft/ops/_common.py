"""Tensor helpers the op modules share."""
from __future__ import annotations

import contextlib
import math

import torch


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., K] as [M, K] (M the product of the leading dims, 0 included) with unit stride along K:
    a view where one exists, else a copy. The kernels take such 2-D operands."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def on_device(t: torch.Tensor):
    """Kernels launch on the current CUDA device: make it ``t``'s device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
