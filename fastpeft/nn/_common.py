"""What fastpeft's modules share: the one way a ``from_linear`` / ``from_quantized`` starts
(``new_module``), nn.Linear's initialization for a new layer (``fresh_linear``), and float32
scales that stay float32 when a model is cast to 16-bit (``Float32Buffers``)."""
from __future__ import annotations

import math

import torch
from torch import nn


def new_module(cls):
    """An instance of ``cls`` whose nn.Module state is set up and nothing else: what every
    ``from_linear`` / ``from_quantized`` starts from before the class's one ``_build`` fills it
    from existing tensors (calling ``__init__`` would allocate and initialize a weight only to
    throw it away)."""
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    return obj


def fresh_linear(in_features: int, out_features: int, bias: bool, device, dtype
                 ) -> tuple[torch.Tensor, nn.Parameter | None]:
    """nn.Linear's init for a new quantized layer: the float32 weight [out, in] to quantize, and
    the frozen bias Parameter [out] in ``dtype`` (None without bias)."""
    w = torch.empty(out_features, in_features, device=device, dtype=torch.float32)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    if not bias:
        return w, None
    b = torch.empty(out_features, device=device, dtype=dtype)
    nn.init.uniform_(b, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
    return w, nn.Parameter(b, requires_grad=False)


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
