"""Quantized modules keep their scales in float32 when the model is cast to 16-bit."""
from __future__ import annotations

import torch
from torch import nn


class Float32Buffers(nn.Module):
    """``model.to(torch.bfloat16)`` casts every floating buffer; the buffers named in
    ``_float32_buffers`` (quantization scales) follow device moves but stay float32."""

    _float32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, *args, **kwargs):
        saved = {name: getattr(self, name) for name in self._float32_buffers}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in saved.items():
            new = getattr(self, name)
            if old is not None and new is not None and new.dtype != torch.float32:
                setattr(self, name, old.to(device=new.device, dtype=torch.float32))
        return out
