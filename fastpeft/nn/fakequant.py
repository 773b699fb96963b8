"""FakeQuantize: quantize-dequantize with a learned (LSQ / LSQ+) or observed scale and zero point."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from ..ops.fakequant import BITS, fake_quantize
from ..reference.quant import SCHEMES, compute_qparams


def _nonfinite_batch() -> str:
    return "x contains NaN or inf: the quantizer's range was not updated from this batch"


class FakeQuantize(nn.Module):
    """y = fastpeft.fake_quantize(x, scale, zero_point, bits, scheme, axis).

    ``scale`` (float32, 0-d or [num_channels] when ``axis`` is given) and, for the zeropoint
    scheme, ``zero_point`` (float32, rounded in the forward) are initialized from the first batch
    seen in training mode (or the first batch at all, if the module was never trained) by the
    min/max rule of ``fastpeft.quantize`` (fastpeft.reference.quant.compute_qparams), so QAT starts
    from exactly the post-training quantizer; ``initialized`` (a bool buffer, in the state_dict)
    records that it happened. forward reads a Python mirror of it, kept in step by the module
    (initialization, ``load_state_dict``), so no step reads a device value on the host.

    learnable=True: scale and zero_point are Parameters trained with the LSQ / LSQ+ gradients
    (the scale must stay > 0: fake_quantize raises otherwise). learnable=False: they are buffers
    recomputed in training mode from the running min / max of every batch seen (a min/max
    observer); in eval mode they are frozen. absmax: zero_point is a zero buffer, never trained.
    """

    def __init__(self, bits: int = 8, scheme: str = "zeropoint", axis: int | None = None, learnable: bool = True,
                 num_channels: int | None = None) -> None:
        super().__init__()
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if axis is not None:
            if isinstance(axis, bool) or not isinstance(axis, int):
                raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
            if num_channels is None:
                raise ValueError(f"axis={axis} needs num_channels (the size of that dim) to create the scales")
            _checks.positive_int("num_channels", num_channels)
        elif num_channels is not None:
            raise ValueError("num_channels is only meaningful with an axis (per-channel scales)")
        self.bits, self.scheme, self.axis = bits, scheme, axis
        self.learnable, self.num_channels = learnable, num_channels
        shape = () if axis is None else (num_channels,)
        scale = torch.ones(shape)
        zero_point = torch.zeros(shape)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        if learnable and scheme == "zeropoint":
            self.zero_point = nn.Parameter(zero_point)
        else:
            self.register_buffer("zero_point", zero_point)
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False  # the buffer's value, on the host
        if not learnable:
            self.register_buffer("min_val", torch.full(shape, float("inf")))
            self.register_buffer("max_val", torch.full(shape, float("-inf")))

    def _check_channels(self, x: torch.Tensor) -> None:
        if self.axis is not None:
            if not -x.dim() <= self.axis < x.dim():
                raise ValueError(f"axis {self.axis} out of range for a {x.dim()}-D input")
            if x.shape[self.axis] != self.num_channels:
                raise ValueError(f"input has {x.shape[self.axis]} channels along axis {self.axis}, "
                                 f"FakeQuantize was built for num_channels={self.num_channels}")

    @torch.no_grad()
    def _set_qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """scale, zero_point from per-slot min / max, as fastpeft.quantize computes them."""
        pair = torch.stack([lo, hi], dim=-1).float()  # [2] or [C, 2]: the same min / max per slot
        scale, zp = compute_qparams(pair, self.bits, self.scheme, None if self.axis is None else 0)
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zp.float().reshape(self.zero_point.shape))
        self.initialized.fill_(True)
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)  # loading is not a training step: read it once

    @torch.no_grad()
    def _minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if self.axis is None:
            return x.amin(), x.amax()
        dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
        if not dims:  # 1-D: one element per channel (amin(dim=[]) would reduce everything)
            return x, x
        return x.amin(dim=dims), x.amax(dim=dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_channels(x)
        observe = not self.learnable and self.training
        if x.numel() and (observe or not self._initialized):
            lo, hi = self._minmax(x)
            # the state changes only after the batch passed: a NaN or inf batch raises here and leaves
            # the observed range (or the uninitialized scale) as it was
            _checks.check_values(torch.isfinite(lo) & torch.isfinite(hi), _nonfinite_batch)
            if observe:
                lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
                self.min_val.copy_(lo)
                self.max_val.copy_(hi)
            self._set_qparams(lo, hi)
        zp = self.zero_point if self.scheme == "zeropoint" else None
        return fake_quantize(x, self.scale, zp, self.bits, self.scheme, self.axis)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, scheme={self.scheme!r}, axis={self.axis}, learnable={self.learnable}"
                + (f", num_channels={self.num_channels}" if self.axis is not None else ""))
