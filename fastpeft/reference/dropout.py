"""Counter-based dropout mask shared by every backend.

The LoRA kernels apply dropout inside the kernel and never store the mask: the
backward pass regenerates it. For that to work, and for every backend (torch,
Triton, CUDA C++) to draw the *same* mask from the same seed, the mask is a pure
function of ``(seed, row, col)``:

    mix32(x):  x ^= x >> 16;  x *= 0x7FEB352D;  x ^= x >> 15;
               x *= 0x846CA68B;  x ^= x >> 16          (all mod 2**32)
    h(seed, i, j) = mix32(mix32(seed ^ mix32(i)) ^ j)
    keep(i, j)    = (h >> 1) >= floor(p * 2**31)

``i`` is the row of the 2-D (flattened) input and ``j`` its column. A kept
element is scaled by ``1 / (1 - p)``. The seed is a 31-bit value: a Python int, or a
one-element int64 tensor (how the ops pass it: drawn on the device, see fastpeft/ops/lora.py). ``mix32`` is Chris Wellons' "lowbias32"
integer hash; its output is close to uniform, so P(keep) = 1 - p up to 2**-31.

This file is the specification; kernels/ and csrc/ implement the same function.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (a new tensor; x is not modified).

    The products of two uint32 values reach 2**64 and wrap around in int64, as integer products
    do in every PyTorch backend (two's complement): their low 32 bits, all that is kept, are
    exact (tests/test_lora_op.py checks against Python's integers). In place after the first op:
    the mask of a LoRA layer's input is about 15 elementwise passes."""
    x = x & _M32
    x ^= x >> 16
    x *= _C1
    x &= _M32
    x ^= x >> 15
    x *= _C2
    x &= _M32
    x ^= x >> 16
    return x


def dropout_threshold(p: float) -> int:
    """The 31-bit threshold below which an element is dropped."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return int(p * 2**31)


def dropout_keep_mask(seed: int | torch.Tensor, rows: int, cols: int, p: float,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean [rows, cols] mask of the kept elements for ``seed`` (an int or a one-element
    int64 tensor) and ``p``."""
    thr = dropout_threshold(p)
    i = torch.arange(rows, dtype=torch.int64, device=device)
    j = torch.arange(cols, dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(-1)[:1].to(device=i.device, dtype=torch.int64)
    row_key = mix32((seed & _M32) ^ mix32(i))
    h = mix32(row_key[:, None] ^ j[None, :])
    return (h >> 1) >= thr


def dropout_2d(x: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """x * keep / (1 - p) on a 2-D tensor, with the mask above (the reference dropout)."""
    if p == 0.0:
        return x
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))
