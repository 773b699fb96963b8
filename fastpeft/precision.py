"""Half precision for a whole model, done carefully: ``model.half()`` with the numerically
sensitive layers (normalizations) kept in float32, as mixed-precision training does
(Micikevicius et al., 2018, "Mixed Precision Training").

The float32 modules get two forward hooks: their floating inputs are cast to float32, their
floating outputs to the half dtype. The hooks are module-level functions (a ``functools.partial``
for the output's dtype), so a converted model still pickles and ``torch.save``s whole, and
``to_half`` removes its own hooks before it adds new ones: calling it again (with another dtype,
or other ``keep_fp32``) replaces them instead of stacking them.
"""
from __future__ import annotations

import functools
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


def _inputs_to_float32(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a module kept in float32: its floating inputs in float32."""
    return _cast(args, torch.float32), _cast(kwargs, torch.float32)


def _output_to(dtype: torch.dtype, module: nn.Module, args: tuple, output):
    """Forward hook of a module kept in float32 (bound to the model's ``dtype`` with
    functools.partial): its floating outputs back in ``dtype``."""
    return _cast(output, dtype)


def _is_ours(hook) -> bool:
    return hook is _inputs_to_float32 or (isinstance(hook, functools.partial) and hook.func is _output_to)


def _remove_hooks(module: nn.Module) -> None:
    """Remove the hooks an earlier ``to_half`` put on ``module`` (what their handles'
    ``remove()`` does; the handles themselves are not kept, so that nothing but the hooks is
    added to the model)."""
    for hooks, extras in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                          (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                   module._forward_hooks_always_called))):
        for key in [k for k, hook in hooks.items() if _is_ours(hook)]:
            del hooks[key]
            for extra in extras:
                extra.pop(key, None)


def _inside(name: str, kept: list[str]) -> bool:
    """Whether module ``name`` lies inside (strictly) one of the ``kept`` modules ("" is the root)."""
    return any(k == "" or name.startswith(k + ".") for k in kept if k != name)


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

    Each tensor is cast once, straight to its final dtype (a kept module's float32 weights never
    pass through ``dtype``), and the hooks of an earlier call are replaced: calling ``to_half``
    twice with the same arguments changes nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_half expects an nn.Module, got {type(model).__name__}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    if isinstance(keep_fp32, str):
        keep_fp32 = (keep_fp32,)
    if not all(isinstance(k, str) and k for k in keep_fp32):
        raise ValueError(f"keep_fp32 must be non-empty names, got {keep_fp32!r}")
    kept: list[str] = []
    for name, module in model.named_modules():
        _remove_hooks(module)
        if not _inside(name, kept) and _keeps(name, module, keep_fp32):
            kept.append(name)
    for name, module in model.named_modules():
        final = torch.float32 if name in kept or _inside(name, kept) else dtype
        module._apply(functools.partial(_cast, dtype=final), recurse=False)
    for name in kept:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(_inputs_to_float32, with_kwargs=True)
        module.register_forward_hook(functools.partial(_output_to, dtype))
    return model
