"""LLM.int8() ops: vector-wise int8 quantization and the int8 linear layer with fp16 outliers.

Semantics: fastpeft/reference/int8.py. The layer's weight is frozen; int8_linear gives
gradients for x (dx = dy W_deq, W_deq = w_int8 * w_scale / 127) and for the bias.
"""
from __future__ import annotations

import contextlib

import torch

from .. import _backend, _checks
from ..reference import int8 as ref
from ..reference import quant as ref_quant

OP = "int8_linear"
SUPPORTED = ("triton", "cuda", "torch")
PREFERRED_CUDA = ("triton", "cuda", "torch")
SUPPORTED_STATIC = ("triton", "torch")  # static activation codes: no CUDA C++ kernel


def _check_threshold(threshold: object) -> float:
    t = _checks.finite_float("threshold", threshold)
    if t < 0:
        raise ValueError(f"threshold must be >= 0 (0 disables the outlier decomposition), got {t}")
    return t


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---------------------------------------------------------------------------------------------
# quantization


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 0.0, *, backend: str | None = None):
    """Row-wise absmax int8 quantization with outlier columns (bitsandbytes' semantics).

    x: [..., K] fp32/fp16/bf16, viewed as rows [M, K]. Returns (q int8 [M, K],
    row_scale float32 [M], outlier_cols): row_scale[i] = max |x[i, :]| over the entries
    with |x| < threshold (all entries when threshold == 0); q = round(x * 127 / row_scale);
    outlier_cols = sorted int64 indices of the columns holding an entry with
    |x| >= threshold (None when threshold == 0), whose codes are all 0 in q. A row of
    zeros gives scale 0 and codes 0.
    """
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    threshold = _check_threshold(threshold)
    x2 = _rows(x)
    name = _backend.select("int8_vectorwise_quant", x.device, PREFERRED_CUDA, SUPPORTED, explicit=backend)
    if name == "torch" or x2.numel() == 0:
        return ref.int8_vectorwise_quant(x2, threshold)
    with _on_device(x2):
        q, scale, flags = _kernels(name)[0](x2, threshold)
        if flags is None:
            return q, scale, None
        cols = torch.nonzero(flags).flatten()  # the index list is the API: one sync
        q[:, cols] = 0
    return q, scale, cols


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_int8 [out, in], weight_scale float32 [out]): per-row absmax, no outliers."""
    _checks.tensor("weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    with torch.no_grad():
        return ref.quantize_weight(weight.detach())


# ---------------------------------------------------------------------------------------------
# the linear layer


def outlier_columns(col_flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols int32 [K], count int32 [1]): the flagged columns, ascending, first; no host sync.

    One small Triton kernel where Triton runs (a sort would be several launches on the
    decode path); torch ops otherwise.
    """
    if _backend.why_cannot_run("triton", col_flags.device, ("triton",)) is None:
        from ..kernels import int8 as k
        return k.outlier_columns(col_flags)
    count = col_flags.sum(dtype=torch.int32).reshape(1)
    cols = torch.argsort(col_flags, descending=True, stable=True).to(torch.int32)
    return cols, count


def _kernels(backend: str):
    """(quant_rows, int8_gemm) of a kernel backend: same signatures in kernels/ and csrc/."""
    if backend == "triton":
        from ..kernels import int8 as k
        return k.quant_rows, k.int8_gemm
    from . import _cext
    return _cext.int8_quant_rows, _cext.int8_gemm


def _static_codes_torch(x2, input_scale):
    """int32 codes of x with the fixed per-tensor step: fastpeft.quantize's 8-bit absmax codes."""
    zero = torch.zeros((), dtype=torch.int32, device=x2.device)
    return ref_quant.quantize_codes(x2, input_scale.float().reshape(()), zero, 8, "absmax")


def _forward_static(x2, w, sw, bias, input_scale):
    """Static activations on the triton kernels: codes with the given step, then the int8 GEMM
    with the step as a per-tensor row scale (row_scale_mul 1)."""
    from ..kernels import int8 as k
    from ..kernels import quant as kquant
    s = input_scale.reshape(1)
    q = kquant.codes_with_scale(x2, s)
    return k.int8_gemm(q, s, w, sw, bias, x2.dtype, row_scale_mul=1.0)


def _forward_kernels(backend, x2, w, sw, bias, threshold):
    quant, gemm = _kernels(backend)
    q, row_scale, flags = quant(x2, threshold)
    if flags is None:
        return gemm(q, row_scale, w, sw, bias, x2.dtype)
    cols, count = outlier_columns(flags)
    return gemm(q, row_scale, w, sw, bias, x2.dtype, x=x2, col_flags=flags, cols=cols, count=count)


def _grad_input(backend, dy, w, sw):
    """dx = dy @ W_deq, W_deq = w_int8 * w_scale / 127."""
    if backend == "triton":
        from ..kernels import int8 as k
        return k.dequant_matmul(dy, w, sw)
    return (dy.float() @ ref.dequantize_weight(w, sw)).to(dy.dtype)


def _torch_linear(x2, w, sw, bias, threshold, input_scale=None):
    """The torch path: the reference, with the int32 GEMM on torch._int_mm where it runs."""
    if input_scale is None:
        q, row_scale, cols = ref.int8_vectorwise_quant(x2, threshold)
        unit = row_scale[:, None] * (sw[None, :] / ref.INT8_MAX**2)
    else:  # the static step is the dequantized value of code 1
        q, cols = _static_codes_torch(x2, input_scale).to(torch.int8), None
        unit = input_scale.float().reshape(1, 1) * (sw[None, :] / ref.INT8_MAX)
    M, K = q.shape
    if x2.device.type == "cpu" or (M > 16 and K % 8 == 0 and w.shape[0] % 8 == 0):
        acc = torch._int_mm(q, w.t())
    else:  # exact in float64: |acc| <= K * 127**2 < 2**53
        acc = q.double() @ w.double().t()
    # fp32 epilogue, as the kernels do: the int32 sums and both scales round once each
    y = acc.float() * unit
    if cols is not None and cols.numel():
        y += x2[:, cols].float() @ ref.dequantize_weight(w[:, cols], sw).t()
    if bias is not None:
        y += bias.float()
    return y.to(x2.dtype)


class Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w, sw, bias, threshold, backend, input_scale=None):
        with _on_device(x2):
            if backend == "torch":
                y = _torch_linear(x2, w, sw, bias, threshold, input_scale)
            elif input_scale is not None:
                y = _forward_static(x2, w, sw, bias, input_scale)
            else:
                y = _forward_kernels(backend, x2, w, sw, bias, threshold)
        ctx.save_for_backward(w, sw)
        ctx.backend = backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        w, sw = ctx.saved_tensors
        need_x, _, _, need_b = ctx.needs_input_grad[:4]
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = db = None
        if need_x:
            with _on_device(dy):
                dx = _grad_input(ctx.backend, dy, w, sw)
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, None, None, db, None, None, None


def _validate(x, weight_int8, weight_scale, bias):
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight_int8", weight_int8, ndim=2, dtypes=(torch.int8,))
    _checks.tensor("weight_scale", weight_scale, ndim=1, dtypes=(torch.float32,))
    N, K = weight_int8.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight_int8 "
                         f"{tuple(weight_int8.shape)} expects {K}")
    if weight_scale.shape[0] != N:
        raise ValueError(f"weight_scale shape {tuple(weight_scale.shape)} must be [{N}] (one per output row)")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        if bias.shape[0] != N:
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match {N} output features")
        _checks.same_dtype(x=x, bias=bias)
    return _checks.same_device(x=x, weight_int8=weight_int8, weight_scale=weight_scale, bias=bias)


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, threshold: float = 6.0, *,
                input_scale: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """LLM.int8() linear: y = dequant(int8(x) @ w_int8^T) + x[:, outliers] @ W_deq[:, outliers]^T + b.

    x: [..., in] fp32/fp16/bf16 (any leading dims and strides); weight_int8 [out, in] int8
    and weight_scale [out] float32 (row absmax, see ``quantize_weight``); bias [out] in x's
    dtype or None. Rows of x are quantized to int8 with absmax scales, the int8 x int8 ->
    int32 product is scaled by row_scale(x) * weight_scale / 127**2, and the columns of x
    holding an entry with |x| >= threshold (threshold > 0) go through a 16-bit product with
    the dequantized weight columns instead. Output in x's dtype; gradient for x (and bias).

    input_scale (static activations): a float32 tensor of one element on x's device, the fixed
    per-tensor step s of x's codes clamp(rint(x / s), -127, 127) (fastpeft.quantize's 8-bit
    absmax codes; from a calibration pass, see fastpeft.quantize_model); it must be finite and
    > 0 (not read on the host). Needs threshold 0; triton and torch backends only. The
    product is then scaled by s * weight_scale / 127. Gradients as without it (the
    straight-through estimator: dx = dy W_deq).
    """
    device = _validate(x, weight_int8, weight_scale, bias)
    threshold = _check_threshold(threshold)
    supported = SUPPORTED
    if input_scale is not None:
        _checks.input_step(input_scale, device)
        if threshold != 0:
            raise ValueError(f"static activations (input_scale) need threshold=0 (no outlier columns), "
                             f"got threshold={threshold:g}")
        supported = SUPPORTED_STATIC
    name = _backend.select(OP, device, PREFERRED_CUDA, supported, explicit=backend)
    N, K = weight_int8.shape
    x2 = _rows(x)
    if x2.shape[0] == 0 or N == 0 or K == 0:
        y = ref.int8_linear(x2, weight_int8, weight_scale, bias, threshold)
        return y.reshape(*x.shape[:-1], N)
    y = Int8LinearFunction.apply(x2, weight_int8, weight_scale, bias, threshold, name, input_scale)
    return y.reshape(*x.shape[:-1], N)
