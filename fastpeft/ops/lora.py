"""LoRA as an autograd op: input checks, backend choice, and the Function.

    y = x W^T + b + scaling * (dropout(x) A^T) B^T

Forward keeps U = dropout(x) A^T ([M, r], fp32) for dB; dropout(x) is never
stored: backward regenerates the counter-based mask from the seed. The base
weight never gets a gradient (it is frozen); the bias gets one when it requires it.
"""
from __future__ import annotations

import contextlib

import torch

from .. import _backend, _checks
from ..reference import lora as ref

OP = "lora_linear"
SUPPORTED = ("triton", "cuda", "torch")
# Preference on CUDA tensors; benchmarks/results records the measurement behind it.
PREFERRED_CUDA = ("triton", "cuda", "torch")
# Accumulate U = x A^T inside the base GEMM's K loop (one launch, x read once) up to
# this many rows; above it a separate shrink kernel avoids recomputing U per N tile.
FUSE_SHRINK_MAX_M = 64


def _new_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), device="cpu").item())


def _fuse_shrink(M: int, R: int, fuse_shrink: bool | None) -> bool:
    from ..kernels.lora import FUSE_SHRINK_MAX_R
    if R > FUSE_SHRINK_MAX_R:
        return False
    return M <= FUSE_SHRINK_MAX_M if fuse_shrink is None else bool(fuse_shrink)


# ---------------------------------------------------------------------------------------------
# backend implementations on 2-D tensors: forward -> (y, u); backward -> (dx, v)


def _triton_forward(x, w, b, A, B, s, p, seed, fuse, need_u):
    from ..kernels import lora as k
    N, R = w.shape[0], A.shape[0]
    if fuse:
        return k.lora_gemm(x, w, N, (w.stride(0), w.stride(1)), b, B, (B.stride(0), B.stride(1)), R, s,
                           a=A, a_strides=(A.stride(0), A.stride(1)), store_u=need_u,
                           dropout_p=p, seed=seed, shrink_dropout=True)
    u = k.shrink(x, A, (A.stride(0), A.stride(1)), R, dropout_p=p, seed=seed)
    y, _ = k.lora_gemm(x, w, N, (w.stride(0), w.stride(1)), b, B, (B.stride(0), B.stride(1)), R, s, u=u)
    return y, u


def _triton_backward_dx(dy, w, A, B, s, p, seed, fuse):
    # dx = dy W + s * mask/(1-p) * ((dy B) A): W read as [K, N], A as its transpose [K, R]
    from ..kernels import lora as k
    Kin, R = w.shape[1], A.shape[0]
    w_t, a_t = (w.stride(1), w.stride(0)), (A.stride(1), A.stride(0))
    b_t = (B.stride(1), B.stride(0))  # v = dy B: the shrink operand is B^T [R, N]
    if fuse:
        return k.lora_gemm(dy, w, Kin, w_t, None, A, a_t, R, s, a=B, a_strides=b_t, store_u=True,
                           dropout_p=p, seed=seed, epilogue_dropout=True)
    v = k.shrink(dy, B, b_t, R)
    dx, _ = k.lora_gemm(dy, w, Kin, w_t, None, A, a_t, R, s, u=v, dropout_p=p, seed=seed,
                        epilogue_dropout=True)
    return dx, v


def _triton_grad_a(v, x, s, p, seed):
    from ..kernels import lora as k
    return k.grad_a(v, x, s, dropout_p=p, seed=seed)


def _cuda_forward(x, w, b, A, B, s, p, seed, fuse, need_u):
    from . import _cext
    R = A.shape[0]
    y = torch.nn.functional.linear(x, w, b)
    u = _cext.lora_shrink(x, A, (A.stride(0), A.stride(1)), R, dropout_p=p, seed=seed)
    _cext.lora_expand_(y, u, B, (B.stride(0), B.stride(1)), R, s)
    return y, u


def _cuda_backward_dx(dy, w, A, B, s, p, seed, fuse):
    from . import _cext
    R = A.shape[0]
    v = _cext.lora_shrink(dy, B, (B.stride(1), B.stride(0)), R)
    dx = dy @ w
    _cext.lora_expand_(dx, v, A, (A.stride(1), A.stride(0)), R, s, dropout_p=p, seed=seed,
                       epilogue_dropout=True)
    return dx, v


def _torch_grad_a(v, x, s, p, seed):
    from ..reference.dropout import dropout_2d
    return s * (v.to(x.dtype).t() @ dropout_2d(x, p, seed))


_IMPL = {
    "triton": (_triton_forward, _triton_backward_dx, _triton_grad_a),
    "cuda": (_cuda_forward, _cuda_backward_dx, _torch_grad_a),
}


def _on_device(t: torch.Tensor):
    """Kernels launch on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class LoRALinearFunction(torch.autograd.Function):
    """Fused LoRA on 2-D x with a kernel backend ('triton' or 'cuda')."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, fuse):
        fwd, _, _ = _IMPL[backend]
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        with _on_device(x):
            y, u = fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fuse, need_B)
        # keep only what backward reads: x for dA, U for dB (fp32 [M, r])
        ctx.save_for_backward(x if need_A else None, weight, lora_A, lora_B, u if need_B else None)
        ctx.cfg = (scaling, dropout_p, seed, backend, fuse, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        scaling, p, seed, backend, fuse, has_bias = ctx.cfg
        _, bwd_dx, grad_a = _IMPL[backend]
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = v = dA = None
        with _on_device(dy):
            if need_x:
                dx, v = bwd_dx(dy, weight, lora_A, lora_B, scaling, p, seed, fuse)
            if need_A:
                if v is None:
                    v = (dy @ lora_B).float()
                dA = grad_a(v, x, scaling, p, seed).to(lora_A.dtype)
        dB = (scaling * (dy.t() @ u.to(dy.dtype))).to(lora_B.dtype) if need_B else None
        db = dy.sum(0) if (need_b and has_bias) else None
        return dx, None, db, dA, dB, None, None, None, None, None


def _torch_path(x2, weight, bias, lora_A, lora_B, scaling, p, seed):
    return ref.lora_linear(x2, weight.detach(), bias, lora_A, lora_B, scaling, p, seed)


def _validate(x, weight, bias, lora_A, lora_B):
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("lora_A", lora_A, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("lora_B", lora_B, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    N, K = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight "
                         f"{tuple(weight.shape)} expects {K}")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight out features {N}")
    if r == 0:
        raise ValueError("LoRA rank r must be > 0 (lora_A has 0 rows)")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A shape {tuple(lora_A.shape)} must be [r, {K}] (in features of weight)")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B shape {tuple(lora_B.shape)} must be [{N}, {r}] ([out, r])")
    _checks.same_dtype(x=x, weight=weight, bias=bias)
    _checks.same_dtype(lora_A=lora_A, lora_B=lora_B)
    return _checks.same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False, *, seed: int | None = None,
                backend: str | None = None, fuse_shrink: bool | None = None) -> torch.Tensor:
    """Fused LoRA linear: y = x W^T + b + scaling * (dropout(x) A^T) B^T.

    x: [..., in] (any leading dims, any strides); weight: [out, in] (never gets a
    gradient); bias: [out] or None; lora_A: [r, in]; lora_B: [out, r]. x, weight and
    bias share one dtype (fp32, fp16, bf16); the adapters may have another float
    dtype, in which case the low-rank path computes in x's dtype and the adapter
    gradients come back in theirs. Dropout (``dropout_p`` when ``training``) uses the
    counter-based mask of ``fastpeft.reference.dropout``; ``seed`` fixes it (drawn
    from torch's CPU generator otherwise), and every backend draws the same mask.
    ``backend`` forces 'triton' | 'cuda' | 'torch' (see fastpeft._backend);
    ``fuse_shrink`` overrides the choice of computing x A^T inside the GEMM.
    """
    device = _validate(x, weight, bias, lora_A, lora_B)
    scaling = _checks.finite_float("scaling", scaling)
    p = _checks.probability("dropout_p", dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = _new_seed()
    seed = 0 if seed is None else int(seed) & 0x7FFFFFFF
    name = _backend.select(OP, device, PREFERRED_CUDA, SUPPORTED, explicit=backend)

    N, K = weight.shape
    x2 = x.reshape(-1, K)
    A, B = lora_A, lora_B
    if A.dtype != x.dtype:  # adapters kept in another precision: compute in x's dtype
        A, B = A.to(x.dtype), B.to(x.dtype)
    if x2.shape[0] == 0 or N == 0 or K == 0 or name == "torch":
        y = _torch_path(x2, weight, bias, A, B, scaling, p, seed)
        return y.reshape(*x.shape[:-1], N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    fuse = _fuse_shrink(x2.shape[0], A.shape[0], fuse_shrink) if name == "triton" else False
    y = LoRALinearFunction.apply(x2, weight.detach(), bias, A, B, scaling, p, seed, name, fuse)
    return y.reshape(*x.shape[:-1], N)


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False, *, seed: int | None = None) -> torch.Tensor:
    """The low-rank term alone, scaling * (dropout(x) A^T) B^T, for bases that are not a
    plain weight (an int8 layer): x [..., in], lora_A [r, in], lora_B [out, r]; output in x's
    dtype. Plain PyTorch (the dropout mask is the shared counter-based one, materialized here).
    """
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("lora_A", lora_A, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("lora_B", lora_B, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    r = lora_A.shape[0]
    if r == 0 or lora_A.shape[1] != x.shape[-1] or lora_B.shape[1] != r:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} must be [r, "
                         f"{x.shape[-1]}] and [out, r] with r > 0")
    _checks.same_device(x=x, lora_A=lora_A, lora_B=lora_B)
    scaling = _checks.finite_float("scaling", scaling)
    p = _checks.probability("dropout_p", dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = _new_seed()
    A, B = (lora_A, lora_B) if lora_A.dtype == x.dtype else (lora_A.to(x.dtype), lora_B.to(x.dtype))
    return ref.lora_update(x, A, B, scaling, p, 0 if seed is None else int(seed) & 0x7FFFFFFF)
