"""Input validation shared by every public function: clear ValueError / TypeError messages."""
from __future__ import annotations

import math
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fmt(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, t: object, *, ndim: int | None = None, min_ndim: int | None = None,
           dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given rank and dtype; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; "
                            f"supported: {_fmt(dtypes)}")
    return t


def same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    present = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {v.dtype for v in present.values()}
    if len(dtypes) > 1:
        desc = ", ".join(f"{k}={str(v.dtype).replace('torch.', '')}" for k, v in present.items())
        raise TypeError(f"dtypes must match: {desc}")
    return next(iter(dtypes))


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        desc = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device: {desc}")
    return next(iter(devices))


def positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def finite_float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def probability(name: str, v: object) -> float:
    v = finite_float(name, v)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {v}")
    return v


def step_tensor(name: str, v: object) -> torch.Tensor:
    """A quantization step given as a number or a one-element tensor: finite and > 0; returned
    as a 0-d float32 tensor (on the tensor's device). Read on the host: for module set-up only."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {v.dtype}")
        t = v.detach().reshape(()).to(torch.float32).clone()
    else:
        t = torch.tensor(finite_float(name, v), dtype=torch.float32)
    val = float(t)
    if not math.isfinite(val) or val <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {val}")
    return t


def input_step(input_scale: object, device: torch.device) -> None:
    """A static activation step passed to an op: a float32 tensor of one element on ``device``
    (its value is not read: no host sync on the hot path)."""
    tensor("input_scale", input_scale, dtypes=(torch.float32,))
    if input_scale.numel() != 1:
        raise ValueError(f"input_scale must hold one value (a per-tensor step), got shape "
                         f"{tuple(input_scale.shape)}")
    if input_scale.device != device:
        raise ValueError(f"input_scale is on {input_scale.device} but x is on {device}")


def check_values(ok: torch.Tensor, message, exc: type = ValueError) -> None:
    """A check of tensor *values* that never stalls a GPU: every element of the boolean tensor
    ``ok`` must be True; ``message()`` builds the error text (only when it fails).

    CPU tensors: read at once; raises ``exc(message())``. CUDA tensors: an asynchronous
    device-side assertion (``torch._assert_async``): no host sync, allowed in CUDA-graph capture;
    a failure surfaces as a CUDA error ("device-side assert triggered") at the next
    synchronization, as PyTorch's own index checks do. In code torch.compile traces, the same
    assertion is a graph node on every device (a value read would break the graph): a failure
    raises a RuntimeError when the graph runs."""
    if ok.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(ok.all(), "fastpeft: an input value check failed (run eagerly on the CPU for the message)")
    elif not bool(ok.all()):  # host memory: no device to wait for
        raise exc(message())
