"""LoRA (Hu et al. 2021) as registered ops: input checks, every backend's kernels, autograd.

    y = x W^T + b + scaling * (dropout(x) A^T) B^T

Ops (registered by fastpeft/ops/_library.py):
  fastpeft::lora_linear      y; the public op, with autograd and an autocast rule
  fastpeft::lora_linear_fwd  (y, U): U = dropout(x) A^T, float32 [M, r], kept for dB
  fastpeft::lora_linear_dx   (dx, V): dx = dy W + s * mask / (1 - p) * ((dy B) A),
                             V = dy B, float32 [M, r], kept for dA
  fastpeft::lora_linear_da   dA = s * V^T dropout(x), float32 [r, in]
dB = s * dy^T U and db = sum(dy) are plain torch ops in the backward. The weight is frozen:
it never gets a gradient.

Dropout never stores dropout(x): the mask is the counter-based hash of
fastpeft.reference.dropout of (seed, row, col), and the backward regenerates it. The seed is a
one-element int64 tensor on x's device, drawn by ``torch.randint`` from the device's generator
(as PyTorch's own dropout draws its philox seed and offset), so nothing is read on the host and
a CUDA graph that captured the draw draws a new seed at every replay. No host sync in the
forward or the backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backend, _checks
from ..reference import lora as ref
from ..reference.dropout import dropout_threshold, mix32
from ._common import building_graph, dense, on_device, rows, vjp_with_graph
from ._library import _NUMBERS, _PLAIN, below_autograd, call, define, eager, needs_grad, register_autograd, still_eager

OP = "lora_linear"
KERNELS = ("triton", "cuda", "torch")  # in the order preferred on CUDA tensors
# Accumulate U = x A^T inside the base GEMM's K loop (one launch, x read once) up to
# this many rows; above it a separate shrink kernel avoids recomputing U per N tile.
FUSE_SHRINK_MAX_M = 64
SEED_MAX = 2**31 - 1  # the kernels' masks take 31-bit seeds


def new_seed(device: torch.device, seed: int | None = None) -> torch.Tensor:
    """The dropout seed as the ops take it: an int64 [1] tensor on ``device``, drawn from torch's
    generator for that device (no host sync), or holding the given ``seed`` (31 bits of it)."""
    if seed is None:
        return torch.randint(0, SEED_MAX, (1,), device=device)
    return torch.full((1,), int(seed) & SEED_MAX, dtype=torch.int64, device=device)


def _fuse_shrink(M: int, R: int, fuse_shrink: bool | None) -> bool:
    from ..kernels.lora import FUSE_SHRINK_MAX_R
    if R > FUSE_SHRINK_MAX_R:
        return False
    return M <= FUSE_SHRINK_MAX_M if fuse_shrink is None else bool(fuse_shrink)


# ---------------------------------------------------------------------------------------------
# the torch backend's dropout mask: fastpeft.reference.dropout's, bit for bit, in fewer tensor ops
#
# keep(i, j) = (h >> 1) >= thr with h = mix32(mix32(seed ^ mix32(i)) ^ j) (the reference). Per call
# only the seed changes: mix32(i) and the columns are tables, kept per shape for CPU tensors. The
# xor-shift x ^ (x >> 16) (xs16 below) is linear over xor and its own inverse on 32-bit values, so
# xs16(k ^ j) = xs16(k) ^ xs16(j): the row key's last xs16 and the outer hash's first cancel (the
# table holds xs16(j)); and (h >> 1) >= thr is h >= 2 thr. 19 small ops instead of ~40: what a
# LoRA layer with dropout pays per training step on the CPU, where each op's fixed cost dominates.

_M32, _C1, _C2 = 0xFFFFFFFF, 0x7FEB352D, 0x846CA68B
# 0-d int64 operands: cheaper per op than Python ints (no scalar wrapping); CPU tensors only
_CPU_CONST = tuple(torch.tensor(v, dtype=torch.int64) for v in (_M32, _C1, _C2, 15, 16))
_CPU_ZERO = torch.zeros(())
_MASK_TABLES: dict = {}  # (rows, cols) -> (mix32(arange(rows)), xs16(arange(cols))), plain CPU tensors
_MASK_TABLES_MAX = 64


def _plain_cpu(t: torch.Tensor) -> bool:
    """``t`` is a plain CPU tensor in an eager call (no tracing, no mode): the tables may be cached
    and the 0-d constants used."""
    return (t.device.type == "cpu" and type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack())


def _mask_tables(rows: int, cols: int, device: torch.device, cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if cache:
        t = _MASK_TABLES.get((rows, cols))
        if t is not None:
            return t
    j = torch.arange(cols, dtype=torch.int64, device=device)
    t = (mix32(torch.arange(rows, dtype=torch.int64, device=device)), j ^ (j >> 16))
    if cache and not t[0].is_inference():
        if len(_MASK_TABLES) >= _MASK_TABLES_MAX:
            _MASK_TABLES.clear()
        _MASK_TABLES[(rows, cols)] = t
    return t


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device: torch.device,
              seed_is_31_bit: bool = False) -> torch.Tensor:
    """fastpeft.reference.dropout.dropout_keep_mask(seed, rows, cols, p) on ``device``, bit for bit:
    bool [rows, cols]. ``seed``: a one-element int64 tensor (its first element is the seed);
    ``seed_is_31_bit``: it is one ``new_seed`` drew, in [0, 2**31) (skips masking it)."""
    thr2 = 2 * dropout_threshold(p)
    plain = _plain_cpu(seed)
    mi, xj = _mask_tables(rows, cols, device, plain)
    M, C1, C2, S15, S16 = _CPU_CONST if plain else (_M32, _C1, _C2, 15, 16)
    with below_autograd():  # integer tensors: nothing to record (skips autograd's dispatch per op)
        if not seed_is_31_bit:
            seed = seed.reshape(-1)[:1].to(device=device, dtype=torch.int64) & M
        v = seed ^ mi  # the row key: mix32(seed ^ mix32(i)) without its last xs16
        v ^= v >> S16
        v *= C1
        v &= M
        v ^= v >> S15
        v *= C2
        v &= M
        h = v.unsqueeze(1) ^ xj  # mix32(row key ^ j), its first xs16 folded in
        h *= C1
        h &= M
        h ^= h >> S15
        h *= C2
        h &= M
        h ^= h >> S16
        return h >= thr2


def dropout_rows(x2: torch.Tensor, p: float, seed) -> torch.Tensor:
    """fastpeft.reference.dropout.dropout_2d (x * keep / (1 - p) on 2-D x), same values; ``seed``
    an int or a one-element int64 tensor."""
    if p == 0.0:
        return x2
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor([seed], dtype=torch.int64)
    keep = keep_mask(seed, x2.shape[0], x2.shape[1], p, x2.device)
    return torch.where(keep, x2 * (1.0 / (1.0 - p)), torch.zeros((), dtype=x2.dtype, device=x2.device))


# ---------------------------------------------------------------------------------------------
# each backend on 2-D tensors: forward -> (y, u); backward -> (dx, v); dA


def _torch_lora(x, w, b, A, B, s, p, seed):
    """(y, U) of x [..., K] in x's dtype: the torch backend's arithmetic, differentiable by autograd
    (dropout's mask is over the 2-D view [M, K] of x)."""
    xd = x if p == 0.0 else dropout_rows(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), p, seed).view(x.shape)
    u = F.linear(xd, A)
    return F.linear(x, w, b).add_(F.linear(u, B), alpha=s), u


def _torch_forward(x, w, b, A, B, s, p, seed):
    y, u = _torch_lora(x, w, b, A, B, s, p, seed)
    return y, u.float()


def _torch_backward_dx(dy, w, A, B, s, p, seed):
    v = dy @ B
    dx = dy @ w
    dx.add_(dropout_rows(v @ A, p, seed), alpha=s)
    return dx, v.float()


def _torch_grad_a(v, x, s, p, seed):
    return (v.to(x.dtype).t() @ dropout_rows(x, p, seed)).float().mul_(s)


def _triton_forward(x, w, b, A, B, s, p, seed, fuse):
    from ..kernels import lora as k
    N, R = w.shape[0], A.shape[0]
    if fuse:
        return k.lora_gemm(x, w, N, (w.stride(0), w.stride(1)), b, B, (B.stride(0), B.stride(1)), R, s,
                           a=A, a_strides=(A.stride(0), A.stride(1)), store_u=True,
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


def _cuda_forward(x, w, b, A, B, s, p, seed, fuse):
    from . import _cext
    R = A.shape[0]
    y = F.linear(x, w, b)
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


_KERNEL_IMPL = {  # forward, backward dx, dA of the kernel backends
    "triton": (_triton_forward, _triton_backward_dx, _triton_grad_a),
    "cuda": (_cuda_forward, _cuda_backward_dx, _torch_grad_a),
}


# ---------------------------------------------------------------------------------------------
# the op kernels (CPU and CUDA): the backend is chosen here, when they run


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, fuse_shrink):
    """(y [..., out] in x's dtype, U float32 [M, r])."""
    N, K = weight.shape
    x2 = rows(x)
    M = x2.shape[0]
    name = _backend.choose(OP, x.device, KERNELS, backend)
    if name == "torch" or M == 0 or N == 0 or K == 0:
        y, u = _torch_forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    else:
        fuse = name == "triton" and _fuse_shrink(M, lora_A.shape[0], fuse_shrink)
        with on_device(x2):
            y, u = _KERNEL_IMPL[name][0](x2, weight, dense(bias), lora_A, lora_B, scaling, dropout_p, seed, fuse)
    return y.reshape(*x.shape[:-1], N), u


def _lora_linear_kernel(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, fuse_shrink):
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, fuse_shrink)[0]


def _dx_kernel(dy, weight, lora_A, lora_B, scaling, dropout_p, seed, backend, fuse_shrink):
    N, K = weight.shape
    dy2 = rows(dy)
    M = dy2.shape[0]
    name = _backend.choose(OP, dy.device, KERNELS, backend)
    if name == "torch" or M == 0 or N == 0 or K == 0:
        dx, v = _torch_backward_dx(dy2, weight, lora_A, lora_B, scaling, dropout_p, seed)
    else:
        fuse = name == "triton" and _fuse_shrink(M, lora_A.shape[0], fuse_shrink)
        with on_device(dy2):
            dx, v = _KERNEL_IMPL[name][1](dy2, weight, lora_A, lora_B, scaling, dropout_p, seed, fuse)
    return dx.reshape(*dy.shape[:-1], K), v


def _da_kernel(v, x, scaling, dropout_p, seed, backend):
    x2 = rows(x)
    M = x2.shape[0]
    name = _backend.choose(OP, x.device, KERNELS, backend)
    if name == "torch" or M == 0 or x2.shape[1] == 0:
        return _torch_grad_a(v, x2, scaling, dropout_p, seed)
    with on_device(x2):
        return _KERNEL_IMPL[name][2](v, x2, scaling, dropout_p, seed)


def _fake_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, fuse_shrink):
    M = math.prod(x.shape[:-1])
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((M, lora_A.shape[0]), dtype=torch.float32))


_ARGS = ("Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
         "float dropout_p, Tensor? seed, str? backend, bool? fuse_shrink")
lora_linear_op = define(f"lora_linear({_ARGS}) -> Tensor", _lora_linear_kernel,
                        lambda *a: _fake_forward(*a)[0], autocast=(0, 1, 2, 3, 4))  # as F.linear's inputs
lora_linear_fwd_op = define(f"lora_linear_fwd({_ARGS}) -> (Tensor, Tensor)", _forward, _fake_forward)
lora_linear_dx_op = define(
    "lora_linear_dx(Tensor dy, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
    "Tensor? seed, str? backend, bool? fuse_shrink) -> (Tensor, Tensor)", _dx_kernel,
    lambda dy, weight, A, *rest: (dy.new_empty((*dy.shape[:-1], weight.shape[1])),
                                  dy.new_empty((math.prod(dy.shape[:-1]), A.shape[0]), dtype=torch.float32)))
lora_linear_da_op = define(
    "lora_linear_da(Tensor v, Tensor x, float scaling, float dropout_p, Tensor? seed, str? backend) -> Tensor",
    _da_kernel, lambda v, x, *rest: x.new_empty((v.shape[1], x.shape[-1]), dtype=torch.float32))


class LoRALinearFunction(torch.autograd.Function):
    """Autograd of fastpeft::lora_linear: forward keeps U (for dB), x (for dA) and the seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, fuse_shrink,
                direct=False):
        """``direct``: an eager call on plain tensors (fastpeft.ops._library.eager): the kernels are
        called in Python, not through the dispatcher."""
        with below_autograd():
            y, u = call(lora_linear_fwd_op, direct, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                        backend, fuse_shrink)
        need_A, need_B = ctx.needs_input_grad[3:5]
        # x: for dA, and for a differentiated dB (U's x); without them no gradient depends on x
        ctx.save_for_backward(x if need_A or need_B else None, weight, bias, lora_A, lora_B, u if need_B else None,
                              seed)
        ctx.cfg = (scaling, dropout_p, backend, fuse_shrink, bias is not None, direct, x.shape, x.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_A, lora_B, u, seed = ctx.saved_tensors
        scaling, p, backend, fuse_shrink, has_bias, direct, x_shape, x_dtype = ctx.cfg
        direct = direct and still_eager()
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        if building_graph():  # create_graph: the torch path's gradients, recorded (y is affine in x, so
            # without a saved x any x of its shape gives the same derivatives: zeros stand in)
            if x is None:
                x = torch.zeros(x_shape, dtype=x_dtype, device=dy.device, requires_grad=need_x)
            grads = vjp_with_graph(lambda *t: _torch_lora(*t, scaling, p, seed)[0],
                                   (x, weight, bias, lora_A, lora_B), (need_x, False, need_b, need_A, need_B), dy)
            return (*grads, None, None, None, None, None, None)
        dx = v = dA = dB = db = None
        N = weight.shape[0]
        with below_autograd():
            if need_x:
                dx, v = call(lora_linear_dx_op, direct, dy, weight, lora_A, lora_B, scaling, p, seed, backend,
                             fuse_shrink)
            dy2 = dy.reshape(math.prod(dy.shape[:-1]), N) if (need_A or need_B or need_b) else None
            if need_A:
                if v is None:
                    v = (dy2 @ lora_B).float()
                dA = call(lora_linear_da_op, direct, v, x, scaling, p, seed, backend).to(lora_A.dtype)
        if need_B:
            dB = (scaling * (dy2.t() @ u.to(dy.dtype))).to(lora_B.dtype)
        if need_b and has_bias:
            db = dy2.sum(0)
        return dx, None, db, dA, dB, None, None, None, None, None, None


register_autograd(lora_linear_op, LoRALinearFunction)


# ---------------------------------------------------------------------------------------------
# the public functions


def _autocasting(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


def _valid(x, weight, bias, A, B) -> bool:
    """Every check of ``_validate`` in one expression: the per-call fast path (a layer is called
    hundreds of times a step); ``_validate`` runs only to say what is wrong."""
    F_ = _checks.FLOAT_DTYPES
    T = torch.Tensor
    if not (isinstance(x, T) and isinstance(weight, T) and isinstance(A, T) and isinstance(B, T)
            and (bias is None or isinstance(bias, T))):
        return False
    N, K = (weight.shape[0], weight.shape[1]) if weight.dim() == 2 else (-1, -1)
    device, r = x.device, A.shape[0] if A.dim() == 2 else 0
    return (x.dim() >= 1 and x.shape[-1] == K and A.dim() == 2 and B.dim() == 2 and r > 0 and A.shape[1] == K
            and B.shape[0] == N and B.shape[1] == r and x.dtype in F_ and weight.dtype in F_ and A.dtype in F_
            and B.dtype == A.dtype and weight.device == device and A.device == device and B.device == device
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == N and bias.dtype in F_
                                  and bias.device == device))
            and ((weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)) or _autocasting(device)))


def _validate(x, weight, bias, lora_A, lora_B):
    if _valid(x, weight, bias, lora_A, lora_B):
        return x.device
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
    device = _checks.same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    if not _autocasting(device):  # under autocast the op casts them all, as F.linear does
        _checks.same_dtype(x=x, weight=weight, bias=bias)
    _checks.same_dtype(lora_A=lora_A, lora_B=lora_B)
    return device


def _fast_path(x, weight, bias, A, B, scaling, dropout_p, backend) -> bool:
    """Whether ``lora_linear`` can take its per-call fast path: plain tensors (no subclass), every
    check of ``_validate`` passing with one dtype throughout (no cast to make, no autocast),
    ``scaling`` and ``dropout_p`` numbers in range, the weight frozen, the call eager
    (``fastpeft.ops._library.eager``) on the torch backend. The same checks as the general path,
    in one expression (a layer is called hundreds of times a step, and on the CPU its Python is a
    good part of the call); an input that fails one takes the general path, which refuses it with
    its message."""
    if not (type(x) in _PLAIN and type(weight) in _PLAIN and type(A) in _PLAIN and type(B) in _PLAIN
            and (bias is None or type(bias) in _PLAIN) and type(scaling) in _NUMBERS and type(dropout_p) in _NUMBERS
            and (backend is None or backend == "torch") and weight.dim() == 2 and A.dim() == 2 and x.dim() >= 1):
        return False
    N, K = weight.shape
    r = A.shape[0]
    dt, device = x.dtype, x.device
    return (r > 0 and x.shape[-1] == K and A.shape[1] == K and B.shape == (N, r) and dt in _checks.FLOAT_DTYPES
            and weight.dtype == dt and A.dtype == dt and B.dtype == dt and weight.device == device
            and A.device == device and B.device == device and not weight.requires_grad
            and (bias is None or (bias.shape == (N,) and bias.dtype == dt and bias.device == device))
            and math.isfinite(scaling) and 0.0 <= dropout_p < 1.0 and eager(device.type)
            and _backend.torch_chosen(device, backend))


class TorchLoRAFunction(torch.autograd.Function):
    """The torch backend of a large eager call without dropout that needs gradients:
    y = x W^T + b + s (x A^T) B^T with the expand accumulated into y (addmm_), and the backward
    dx = dy W + (s dy B) A as one GEMM into another, dA = (s dy B)^T x, dB = s dy^T U: against
    torch's autograd through the same arithmetic, no [M, out] temporary in the forward, no
    s * dy pass and no sum of x's two gradient terms in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        u = torch.mm(x2, lora_A.t())
        y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        y.addmm_(u, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, x2, weight, bias, lora_A, lora_B, u)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, x2, weight, bias, A, B, u = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        if building_graph():  # create_graph: the torch path's gradients, recorded
            grads = vjp_with_graph(lambda *t: _torch_lora(*t, s, 0.0, None)[0], (x, weight, bias, A, B),
                                   (need_x, False, need_b, need_A, need_B), dy)
            return (*grads, None)
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = db = dA = dB = None
        if need_x or need_A:
            v = torch.mm(dy2, B).mul_(s)  # s dy B, [M, r]
            if need_x:
                dx = torch.mm(dy2, weight).addmm_(v, A).view(x.shape)
            if need_A:
                dA = torch.mm(v.t(), x2)
        if need_B:
            dB = torch.mm(dy2.t(), u).mul_(s)
        if need_b:
            db = dy2.sum(0)
        return dx, None, db, dA, dB, None


# TorchLoRAFunction from this many elements of y on: below it the Function's own per-call cost
# (apply, ctx, a Python backward) outweighs the passes it saves (measured on the CPU)
FUNCTION_MIN_OUT = 1 << 18


def _torch_eager(x, w, b, A, B, s: float, p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """y of the torch backend for an eager call: torch's autograd (C++) differentiates it, which per
    call is cheaper than the registered op's explicit backward (TorchLoRAFunction, leaner still,
    for large calls without dropout); dropout's mask is computed once. The dropout scale
    1 / (1 - p) rides in the expand's alpha (dropout(x) = keep * x / (1 - p)): one elementwise op
    on x, one in its backward. ``seed``: from ``_dropout_seed`` (31 bits)."""
    if p == 0.0:
        if x.numel() // max(x.shape[-1], 1) * w.shape[0] >= FUNCTION_MIN_OUT:
            if needs_grad(x, b, A, B):
                return TorchLoRAFunction.apply(x, w, b, A, B, s)
            y = F.linear(x, w, b)  # no autograd: the expand accumulates into y, no [M, out] temporary
            y.view(-1, w.shape[0]).addmm_(F.linear(x, A).view(-1, A.shape[0]), B.t(), alpha=s)
            return y
        return F.linear(x, w, b).add_(F.linear(F.linear(x, A), B), alpha=s)
    keep = keep_mask(seed, math.prod(x.shape[:-1]), x.shape[-1], p, x.device, seed_is_31_bit=True)
    zero = _CPU_ZERO if _plain_cpu(x) else 0.0  # a 0-d float32 takes x's dtype in where
    u = F.linear(torch.where(keep.view(x.shape), x, zero), A)
    return F.linear(x, w, b).add_(F.linear(u, B), alpha=s / (1.0 - p))


def _dropout_seed(device, p: float, seed) -> torch.Tensor | None:
    if p == 0.0:
        return None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return new_seed(device, seed)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False, *, seed: int | None = None,
                backend: str | None = None, fuse_shrink: bool | None = None) -> torch.Tensor:
    """Fused LoRA linear: y = x W^T + b + scaling * (dropout(x) A^T) B^T.

    x: [..., in] (any leading dims, any strides); weight: [out, in] (never gets a
    gradient); bias: [out] or None; lora_A: [r, in]; lora_B: [out, r]. x, weight and
    bias share one dtype (fp32, fp16, bf16); the adapters may have another float
    dtype, in which case the low-rank path computes in x's dtype and the adapter
    gradients come back in theirs. Under ``torch.autocast`` every one of them is cast to the
    autocast dtype first, as ``F.linear``'s inputs are, and y has that dtype.

    Dropout (``dropout_p`` when ``training``) uses the counter-based mask of
    ``fastpeft.reference.dropout``; its seed is drawn on x's device from torch's generator
    (``torch.manual_seed`` makes it reproducible; a replayed CUDA graph draws a new one), or
    fixed by ``seed``. Every backend draws the same mask from the same seed.
    ``backend`` forces 'triton' | 'cuda' | 'torch' (see fastpeft._backend);
    ``fuse_shrink`` overrides the choice of computing x A^T inside the GEMM (triton).

    Runs as the registered op ``torch.ops.fastpeft.lora_linear`` (one graph node under
    torch.compile / torch.export). No host sync.
    """
    if _fast_path(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend):
        p = float(dropout_p) if training else 0.0
        return _torch_eager(x, weight, bias, lora_A, lora_B, float(scaling), p, _dropout_seed(x.device, p, seed))
    device = _validate(x, weight, bias, lora_A, lora_B)
    scaling = _checks.finite_float("scaling", scaling)
    p = _checks.probability("dropout_p", dropout_p)  # checked when not training too: wrong either way
    p = p if training else 0.0
    if backend is not None:
        _backend.check_name(backend)
    A, B = lora_A, lora_B
    if A.dtype != x.dtype and not _autocasting(device):  # adapters in another precision: x's dtype
        A, B = A.to(x.dtype), B.to(x.dtype)
    args = (x, weight.detach() if weight.requires_grad else weight, bias, A, B, scaling, p,
            _dropout_seed(device, p, seed), backend, fuse_shrink)
    if eager(device.type, x, weight, bias, A, B):  # the kernels, without the dispatcher's round trips
        if _backend.choose(OP, device, KERNELS, backend) == "torch":
            return _torch_eager(*args[:8])
        if needs_grad(x, bias, A, B):
            return LoRALinearFunction.apply(*args, True)
        return _lora_linear_kernel(*args)
    return lora_linear_op(*args)


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False, *, seed: int | None = None) -> torch.Tensor:
    """The low-rank term alone, scaling * (dropout(x) A^T) B^T, for bases that are not a
    plain weight (an int8 layer): x [..., in], lora_A [r, in], lora_B [out, r]; output in x's
    dtype. Plain PyTorch (the dropout mask is the shared counter-based one, materialized here,
    its seed drawn on x's device as in ``lora_linear``): torch.compile traces through it.
    """
    T = torch.Tensor
    fast = (isinstance(x, T) and isinstance(lora_A, T) and isinstance(lora_B, T) and x.dim() >= 1
            and lora_A.dim() == 2 and lora_B.dim() == 2 and lora_A.shape[0] > 0 and lora_A.shape[1] == x.shape[-1]
            and lora_B.shape[1] == lora_A.shape[0] and x.dtype in _checks.FLOAT_DTYPES
            and lora_A.dtype in _checks.FLOAT_DTYPES and lora_B.dtype in _checks.FLOAT_DTYPES
            and lora_A.device == x.device and lora_B.device == x.device)
    if not fast:  # say what is wrong
        _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
        _checks.tensor("lora_A", lora_A, ndim=2, dtypes=_checks.FLOAT_DTYPES)
        _checks.tensor("lora_B", lora_B, ndim=2, dtypes=_checks.FLOAT_DTYPES)
        r = lora_A.shape[0]
        if r == 0 or lora_A.shape[1] != x.shape[-1] or lora_B.shape[1] != r:
            raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} must be [r, "
                             f"{x.shape[-1]}] and [out, r] with r > 0")
        _checks.same_device(x=x, lora_A=lora_A, lora_B=lora_B)
    device = x.device
    scaling = _checks.finite_float("scaling", scaling)
    p = _checks.probability("dropout_p", dropout_p)  # checked when not training too: wrong either way
    p = p if training else 0.0
    A, B = (lora_A, lora_B) if lora_A.dtype == x.dtype else (lora_A.to(x.dtype), lora_B.to(x.dtype))
    seed_t = _dropout_seed(device, p, seed)
    return ref.lora_update(x, A, B, scaling, p, 0 if seed_t is None else seed_t)
