"""Thin wrappers over the CUDA C++ extension ``fastpeft._C`` (the ``cuda`` backend).

``fastpeft._C`` links no libtorch: it takes raw device pointers, element strides, a dtype
code and a stream. These wrappers check the tensors, pass their pointers and strides and
torch's current stream, and fold the dropout rescale ``1 / (1 - p)`` into the scalars.
"""
from __future__ import annotations

import operator

import torch

from .. import _checks
from .._backend import BackendUnavailableError, cuda_ext_status
from ..reference.dropout import dropout_threshold

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _extension():
    ok, why = cuda_ext_status()
    if not ok:
        raise BackendUnavailableError(f"the CUDA C++ kernels are not available: {why}")
    from .. import _C
    return _C


def _cuda_device(**tensors: torch.Tensor) -> torch.device:
    desc = ", ".join(f"{k} on {v.device}" for k, v in tensors.items())
    if any(t.device.type != "cuda" for t in tensors.values()):
        raise ValueError(f"the CUDA C++ kernels need CUDA tensors; got {desc}")
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(f"the CUDA C++ kernels need all tensors on one device; got {desc}")
    return next(iter(tensors.values())).device


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _strides(name: str, strides) -> tuple[int, int]:
    try:
        s0, s1 = (operator.index(s) for s in strides)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be two ints (element strides), got {strides!r}") from None
    return s0, s1


def _check_span(name: str, t: torch.Tensor, rows: int, cols: int, strides: tuple[int, int]) -> None:
    """The [rows, cols] operand at t.data_ptr() with these strides must lie inside t's storage."""
    if rows == 0 or cols == 0:
        return
    ends = [(rows - 1) * strides[0], (cols - 1) * strides[1]]
    lo = t.storage_offset() + sum(min(0, e) for e in ends)
    hi = t.storage_offset() + sum(max(0, e) for e in ends)
    size = t.untyped_storage().nbytes() // t.element_size()
    if lo < 0 or hi >= size:
        raise ValueError(f"{name}: a [{rows}, {cols}] operand with strides {strides} reaches elements "
                         f"{lo}..{hi}, outside its storage of {size} elements")


def lora_shrink(x: torch.Tensor, a: torch.Tensor, a_strides: tuple[int, int], R: int,
                out_scale: float = 1.0, *, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """U = out_scale * dropout(x) A^T, a new float32 [M, R] tensor.

    x: [M, K] (any strides); A: the [R, K] operand whose element (r, k) is at
    ``a.data_ptr() + r * a_strides[0] + k * a_strides[1]`` elements (a transposed view of
    another matrix works too), same dtype as x (fp32, fp16 or bf16). dropout_p > 0 drops
    element (m, k) of x by the counter-based mask of ``fastpeft.reference.dropout`` for
    ``seed`` and scales the kept ones by 1 / (1 - p). Accumulates in fp32.
    """
    _checks.tensor("x", x, ndim=2)
    _checks.tensor("a", a)
    device = _cuda_device(x=x, a=a)
    _checks.tensor("x", x, dtypes=_DTYPE_CODES)
    _checks.same_dtype(x=x, a=a)
    R = _checks.positive_int("R", R)
    s_ar, s_ak = _strides("a_strides", a_strides)
    M, K = x.shape
    _check_span("a", a, R, K, (s_ar, s_ak))
    p = _checks.probability("dropout_p", dropout_p)
    scale = _checks.finite_float("out_scale", out_scale) * (1.0 / (1.0 - p) if p > 0.0 else 1.0)
    ext = _extension()
    u = torch.empty((M, R), dtype=torch.float32, device=device)
    ext.lora_shrink(x.data_ptr(), x.stride(0), x.stride(1), a.data_ptr(), s_ar, s_ak,
                    u.data_ptr(), u.stride(0), u.stride(1), M, K, R, _DTYPE_CODES[x.dtype],
                    out_scale=scale, dropout=p > 0.0, seed=int(seed) & 0xFFFFFFFF,
                    thr31=dropout_threshold(p), split_k=0, device=device.index or 0,
                    stream=_stream(device))
    return u


def lora_expand_(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, b_strides: tuple[int, int], R: int,
                 scaling: float, *, dropout_p: float = 0.0, seed: int = 0,
                 epilogue_dropout: bool = False) -> torch.Tensor:
    """y += scaling * drop(U B^T) in place; returns y.

    y: [M, N] (any strides, no overlapping elements); u: float32 [M, R]; B: the [N, R]
    operand whose element (n, r) is at ``b.data_ptr() + n * b_strides[0] + r * b_strides[1]``
    elements, same dtype as y. With ``epilogue_dropout`` and dropout_p > 0 the update of
    y[m, n] is multiplied by keep(m, n) / (1 - p), the mask of ``fastpeft.reference.dropout``
    on (row, col) of y for ``seed`` (the backward of dropout on the LoRA input). Accumulates
    in fp32 and rounds once into y.
    """
    _checks.tensor("y", y, ndim=2)
    _checks.tensor("u", u, ndim=2)
    _checks.tensor("b", b)
    device = _cuda_device(y=y, u=u, b=b)
    _checks.tensor("y", y, dtypes=_DTYPE_CODES)
    _checks.tensor("u", u, dtypes=(torch.float32,))
    _checks.same_dtype(y=y, b=b)
    R = _checks.positive_int("R", R)
    M, N = y.shape
    if tuple(u.shape) != (M, R):
        raise ValueError(f"u has shape {tuple(u.shape)}; expected [{M}, {R}] for y {tuple(y.shape)} and R={R}")
    if any(st == 0 and n > 1 for st, n in zip(y.stride(), y.shape)):
        raise ValueError(f"y (shape {tuple(y.shape)}, strides {y.stride()}) has overlapping elements; "
                         f"it is updated in place")
    s_bn, s_br = _strides("b_strides", b_strides)
    _check_span("b", b, N, R, (s_bn, s_br))
    p = _checks.probability("dropout_p", dropout_p)
    if p > 0.0 and not epilogue_dropout:
        raise ValueError("dropout_p > 0 applies only with epilogue_dropout=True in lora_expand_")
    scaling = _checks.finite_float("scaling", scaling)
    ext = _extension()
    ext.lora_expand(y.data_ptr(), y.stride(0), y.stride(1), u.data_ptr(), u.stride(0), u.stride(1),
                    b.data_ptr(), s_bn, s_br, M, N, R, _DTYPE_CODES[y.dtype], scaling=scaling,
                    dropout=p > 0.0, seed=int(seed) & 0xFFFFFFFF, thr31=dropout_threshold(p),
                    drop_scale=1.0 / (1.0 - p), device=device.index or 0, stream=_stream(device))
    return y
