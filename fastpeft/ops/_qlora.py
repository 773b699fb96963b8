"""LoRA on a quantized base (QLoRA, Dettmers et al. 2023), the part every weight format shares:
y = x @ W_deq^T + bias + scaling * (dropout(x) A^T) B^T with the base frozen.

A weight format (fastpeft/ops/nf4.py: NF4 / FP4; fastpeft/ops/qlinear.py: int4 / int8 absmax and
zero point) supplies its fused GEMMs and its dense weight; this module holds what is the same
for all of them:

* ``forward``: U = dropout(x) A^T (float32 [M, r]) by the LoRA shrink (kernels/lora.py
  ``shrink``, as fastpeft::lora_linear's split path), then the format's dequantize-GEMM with
  scaling * U B^T in its fp32 accumulator (kernels/lora.py ``update_start``): two launches
  instead of the GEMM, the shrink, the expand and an add over y. The torch backend computes the
  unfused layer.
* ``grad_input``: V = dy B (float32 [M, r]) by the shrink, then the format's transposed
  dequantize-GEMM starting from scaling * dropout'(V A), the forward's mask
  (``update_dx_start``).
* ``lora_function``: the autograd Function of a format's fused op: dx and V by its grad-input op,
  dA by fastpeft::lora_linear_da from the same V, dB = scaling * dy^T U, db = sum(dy); the codes
  are frozen. Under create_graph the backward is the torch composition, recorded.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .. import _checks
from ._common import building_graph, on_device, rows, vjp_with_graph
from ._library import below_autograd, call, still_eager


def check_shapes(lora_A, lora_B, in_features, out_features) -> None:
    """lora_A [r, in] and lora_B [out, r], r > 0: the registered ops are public too
    (torch.ops.fastpeft.*), and the kernels index the adapters by these shapes."""
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        _checks.tensor(name, t, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    r = lora_A.shape[0]
    if r == 0 or lora_A.shape[1] != in_features or tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} must be [r, "
                         f"{in_features}] and [{out_features}, r] with r > 0")


def forward(x, lora_A, lora_B, scaling, dropout_p, seed, out_features, base: Callable, fused: Callable | None):
    """(y [..., out] in x's dtype, U = dropout(x) A^T float32 [M, r]). ``base(x2)``: the torch
    layer's x2 @ W_deq^T + bias [M, out]; ``fused(x2, (U, B, scaling))``: the format's kernel with
    the update in its accumulator, or None (the torch backend)."""
    from . import lora as lora_ops
    check_shapes(lora_A, lora_B, x.shape[-1], out_features)
    x2 = rows(x)
    if fused is None or x2.shape[0] == 0 or x2.shape[1] == 0 or out_features == 0:
        u = F.linear(lora_ops.dropout_rows(x2, dropout_p, seed), lora_A)
        y = base(x2).add_(F.linear(u, lora_B), alpha=scaling)
        u = u.float()
    else:
        from ..kernels import lora as klora
        with on_device(x2):
            u = klora.shrink(x2, lora_A, (lora_A.stride(0), lora_A.stride(1)), lora_A.shape[0],
                             dropout_p=dropout_p, seed=seed)
            y = fused(x2, (u, lora_B, float(scaling)))
    return y.reshape(*x.shape[:-1], out_features), u


def forward_fake(x, lora_A, lora_B, out_features):
    check_shapes(lora_A, lora_B, x.shape[-1], out_features)
    return (x.new_empty((*x.shape[:-1], out_features)),
            x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]), dtype=torch.float32))


def grad_input(dy, lora_A, lora_B, scaling, dropout_p, seed, in_features, weight: Callable, fused: Callable | None):
    """(dx = dy W_deq + scaling * dropout'((dy B) A) [..., in] in dy's dtype, V = dy B float32
    [M, r]). ``weight(dtype)``: W_deq [out, in] rounded once to dtype (the torch backend's
    arithmetic, the unfused layer's: V and V A in dy's dtype); ``fused(dy2, (V, A, scaling, p,
    seed))``: the format's transposed kernel with the update in its accumulator, or None."""
    from . import lora as lora_ops
    N = dy.shape[-1]
    check_shapes(lora_A, lora_B, in_features, N)
    dy2 = rows(dy)
    A, B = lora_A.to(dy.dtype), lora_B.to(dy.dtype)
    if fused is None or dy2.shape[0] == 0 or N == 0 or in_features == 0:
        v = dy2 @ B
        dx = (dy2 @ weight(dy2.dtype)).add_(lora_ops.dropout_rows(v @ A, dropout_p, seed), alpha=scaling)
        v = v.float()
    else:
        from ..kernels import lora as klora
        with on_device(dy2):
            v = klora.shrink(dy2, B, (B.stride(1), B.stride(0)), B.shape[1])  # the operand is B^T [r, N]
            dx = fused(dy2, (v, A, float(scaling), dropout_p, seed))
    return dx.reshape(*dy.shape[:-1], in_features), v


def grad_input_fake(dy, lora_A, lora_B, in_features):
    check_shapes(lora_A, lora_B, in_features, dy.shape[-1])
    return (dy.new_empty((*dy.shape[:-1], in_features)),
            dy.new_empty((math.prod(dy.shape[:-1]), lora_A.shape[0]), dtype=torch.float32))


def torch_layer(x, bias, lora_A, lora_B, w, scaling, dropout_p, seed):
    """y by differentiable torch arithmetic (the unfused layer's), W_deq ``w`` [out, in] given:
    for a recorded backward."""
    from . import lora as lora_ops
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    u = F.linear(lora_ops.dropout_rows(x2, dropout_p, seed), lora_A)
    y = F.linear(x2, w, bias) + scaling * F.linear(u, lora_B)
    return y.reshape(*x.shape[:-1], w.shape[0])


def lora_function(name: str, fwd_op, grad_input_op, n_tensors: int, n_static: int,
                  grad_weight_args: Callable, dense_weight: Callable) -> type[torch.autograd.Function]:
    """The autograd Function of a fused LoRA-on-quantized-base op whose arguments are (x, the
    weight's ``n_tensors`` tensors (None allowed) and ``n_static`` other fields, bias, lora_A,
    lora_B, scaling, dropout_p, seed, backend[, direct]); ``fwd_op`` takes the same and returns
    (y, U). ``grad_weight_args(weight fields, in_features)``: the weight's arguments of
    ``grad_input_op`` (dy, those, lora_A, lora_B, scaling, dropout_p, seed, backend) -> (dx, V);
    ``dense_weight(weight fields, in_features, dtype)``: W_deq [out, in] by torch, for create_graph."""
    n_w = n_tensors + n_static

    def forward(ctx, x, *args):
        w, (bias, A, B, s, p, seed, backend), extra = args[:n_w], args[n_w:n_w + 7], args[n_w + 7:]
        direct = len(extra) > 0 and extra[0] is True  # apply(..., True): an eager call
        with below_autograd():
            y, u = call(fwd_op, direct, x, *w, bias, A, B, s, p, seed, backend)
        ctx.save_for_backward(x, *w[:n_tensors], bias, A, B, u if ctx.needs_input_grad[n_w + 3] else None, seed)
        ctx.cfg = (w[n_tensors:], s, p, backend, direct)
        return y

    def backward(ctx, dy):
        from . import lora as lora_ops
        x, *saved = ctx.saved_tensors
        tensors, (bias, A, B, u, seed) = tuple(saved[:n_tensors]), saved[n_tensors:]
        static, s, p, backend, direct = ctx.cfg
        w = tensors + tuple(static)
        direct = direct and still_eager()
        need_x, need_b, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, n_w + 1, n_w + 2, n_w + 3))
        nones = (None,) * n_w
        tail = (None,) * (len(ctx.needs_input_grad) - n_w - 4)  # scaling, dropout_p, seed, backend[, direct]
        K = x.shape[-1]
        if building_graph():
            grads = vjp_with_graph(
                lambda x_, b_, A_, B_: torch_layer(x_, b_, A_, B_, dense_weight(w, K, x_.dtype), s, p, seed),
                (x, bias, A, B), (need_x, need_b, need_A, need_B), dy)
            return (grads[0], *nones, grads[1], grads[2], grads[3], *tail)
        dy2 = dy.reshape(math.prod(dy.shape[:-1]), dy.shape[-1])
        dx = db = dA = dB = None
        with below_autograd():
            if need_x:  # dx and V = dy B (kept for dA) by one op: the update fused into the base's GEMM
                dx, v = call(grad_input_op, direct, dy, *grad_weight_args(w, K), A, B, s, p, seed, backend)
            elif need_A:
                v = (dy2 @ B).float()  # [M, r]
            if need_A:
                dA = call(lora_ops.lora_linear_da_op, direct, v, x, s, p, seed, backend).to(A.dtype)
            if need_B:
                dB = (s * (dy2.t() @ u.to(dy.dtype))).to(B.dtype)
            if need_b:
                db = dy2.sum(0)
        return (dx, *nones, db, dA, dB, *tail)

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"Autograd of {fwd_op} (fastpeft/ops/_qlora.py ``lora_function``).",
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


def check_adapter(x, lora_A, lora_B, out_features, scaling, dropout_p, training, device):
    """The public fused functions' adapter checks: (A, B cast as the layer computes, scaling, p).
    A [r, in] and B [out, r] float, r > 0, on x's device; outside autocast they compute in x's
    dtype (the gradients come back in theirs)."""
    check_shapes(lora_A, lora_B, x.shape[-1], out_features)
    _checks.same_device(x=x, lora_A=lora_A, lora_B=lora_B)
    scaling = _checks.finite_float("scaling", scaling)
    p = _checks.probability("dropout_p", dropout_p)
    p = p if training else 0.0
    A, B = lora_A, lora_B
    if A.dtype != x.dtype and not torch.is_autocast_enabled(device.type):
        A, B = A.to(x.dtype), B.to(x.dtype)
    elif B.dtype != A.dtype:
        B = B.to(A.dtype)
    return A, B, scaling, p
