"""Half precision for a whole model, done carefully: ``model.half()`` with the numerically
sensitive layers (normalizations) kept in float32, as mixed-precision training does
(Micikevicius et al., 2018, "Mixed Precision Training")."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn



def _cast(obj, dtype: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _keeps(name: str, module: nn.Module, keep_fp32: Sequence[str]) -> bool:
    text = (name.rsplit(".", 1)[-1] + " " + type(module).__name__).lower()
    return any(k.lower() in text for k in keep_fp32)


def to_half(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
            keep_fp32: Sequence[str] = ("norm",)) -> nn.Module:
    """Cast ``model``'s floating parameters and buffers to ``dtype`` (bf16 or fp16), except the
    modules whose own name or class name contains an entry of ``keep_fp32`` (case-insensitive;
    by default every LayerNorm / RMSNorm): those stay float32, receive their floating inputs
    in float32 and hand their floating outputs back in ``dtype``, so the rest of the model
    computes in ``dtype`` and the normalizations in float32. Returns ``model`` (in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_half expects an nn.Module, got {type(model).__name__}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    if isinstance(keep_fp32, str):
        keep_fp32 = (keep_fp32,)
    if not all(isinstance(k, str) and k for k in keep_fp32):
        raise ValueError(f"keep_fp32 must be non-empty names, got {keep_fp32!r}")
    model.to(dtype)
    kept: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(k + ".") for k in kept) or not _keeps(name, module, keep_fp32):
            continue
        kept.append(name)
        module.float()
        module.register_forward_pre_hook(lambda m, args, kwargs: (_cast(args, torch.float32),
                                                                  _cast(kwargs, torch.float32)),
                                          with_kwargs=True)
        module.register_forward_hook(lambda m, args, out: _cast(out, dtype))
    return model
