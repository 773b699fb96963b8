"""LLM.int8() (Dettmers et al. 2022) as registered ops: vector-wise int8 quantization and the int8
linear layer with 16-bit outlier columns.

Semantics: fastpeft/reference/int8.py. Ops (fastpeft/ops/_library.py):
  fastpeft::int8_vectorwise_quant    (q, row_scale, outlier_cols); not differentiable
  fastpeft::int8_linear              y; autograd (dx and the bias) and an autocast rule
  fastpeft::int8_linear_grad_input   dx = dy W_deq, W_deq = w_int8 * w_scale / 127
The layer's weight is frozen. int8_linear has no host sync (the outlier columns stay on the
device: a count and an index list the GEMM reads); int8_vectorwise_quant returns the outlier
columns as an index tensor whose length depends on the data, so it reads that length on the
host (one sync, in the op's kernel: a compiled graph sees an unbacked size).
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _checks
from ..reference import int8 as ref
from ..reference import quant as ref_quant
from ._common import building_graph, dense, on_device, rows
from ._library import below_autograd, call, define, eager, needs_grad, register_autograd, still_eager

OP = "int8_linear"
KERNELS = ("triton", "cuda", "torch")  # in the order preferred on CUDA tensors
KERNELS_STATIC = ("triton", "torch")  # static activation codes: no CUDA C++ kernel


def check_threshold(threshold: object) -> float:
    t = _checks.finite_float("threshold", threshold)
    if t < 0:
        raise ValueError(f"threshold must be >= 0 (0 disables the outlier decomposition), got {t}")
    return t


def _kernels(backend: str):
    """(quant_rows, int8_gemm) of a kernel backend: same signatures in kernels/ and csrc/."""
    if backend == "triton":
        from ..kernels import int8 as k
        return k.quant_rows, k.int8_gemm
    from . import _cext
    return _cext.int8_quant_rows, _cext.int8_gemm


# ---------------------------------------------------------------------------------------------
# quantization


def _quant_kernel(x, threshold, backend):
    x2 = rows(x)
    name = _backend.choose("int8_vectorwise_quant", x.device, KERNELS, backend)
    if name == "torch" or x2.numel() == 0:
        q, scale, cols = ref.int8_vectorwise_quant(x2, threshold)
    else:
        with on_device(x2):
            q, scale, flags = _kernels(name)[0](x2, threshold)
            cols = None
            if flags is not None:
                cols = torch.nonzero(flags).flatten()  # the index list is the API: its length syncs
                q[:, cols] = 0
    if cols is None:
        cols = torch.empty(0, dtype=torch.int64, device=x.device)
    return q, scale, cols


def _quant_fake(x, threshold, backend):
    M, K = math.prod(x.shape[:-1]), x.shape[-1]
    n_cols = torch.library.get_ctx().new_dynamic_size() if threshold > 0 else 0
    return (x.new_empty((M, K), dtype=torch.int8), x.new_empty((M,), dtype=torch.float32),
            x.new_empty((n_cols,), dtype=torch.int64))


int8_vectorwise_quant_op = define(
    "int8_vectorwise_quant(Tensor x, float threshold, str? backend) -> (Tensor, Tensor, Tensor)",
    _quant_kernel, _quant_fake)


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 0.0, *, backend: str | None = None):
    """Row-wise absmax int8 quantization with outlier columns (bitsandbytes' semantics).

    x: [..., K] fp32/fp16/bf16, viewed as rows [M, K]. Returns (q int8 [M, K],
    row_scale float32 [M], outlier_cols): row_scale[i] = max |x[i, :]| over the entries
    with |x| < threshold (all entries when threshold == 0); q = round(x * 127 / row_scale);
    outlier_cols = sorted int64 indices of the columns holding an entry with
    |x| >= threshold (None when threshold == 0), whose codes are all 0 in q. A row of
    zeros gives scale 0 and codes 0. Not differentiable (x is detached).

    Runs as ``torch.ops.fastpeft.int8_vectorwise_quant``. With threshold > 0 the length of
    outlier_cols depends on the data: reading it is one host sync (the layer, int8_linear,
    never needs it).
    """
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    threshold = check_threshold(threshold)
    if backend is not None:
        _backend.check_name(backend)
    q, scale, cols = call(int8_vectorwise_quant_op, eager(x.device.type, x), x.detach(), threshold, backend)
    return q, scale, (cols if threshold > 0 else None)


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
    if backend == "triton":  # the compaction zeroes q's outlier columns: the GEMM loop masks nothing
        from ..kernels import int8 as k
        cols, count = k.outlier_columns(flags, q)
        return gemm(q, row_scale, w, sw, bias, x2.dtype, x=x2, cols=cols, count=count)
    cols, count = outlier_columns(flags)
    return gemm(q, row_scale, w, sw, bias, x2.dtype, x=x2, col_flags=flags, cols=cols, count=count)


# torch._int_mm on CUDA (cuBLASLt's int8 GEMM) needs more than this many rows, and K and N multiples
# of 8; elsewhere the torch path computes the int32 sums exactly in float64.
INT_MM_MIN_ROWS = 16


def _int_mm_exact(M: int, K: int, N: int, device: torch.device) -> bool:
    """Whether torch._int_mm computes this [M, K] x [K, N] product (else: float64, exact). On the
    CPU it returns wrong sums, changing between runs, for K == 1 (torch 2.13; any M and N > 1)."""
    if device.type == "cpu":
        return K > 1
    return M > INT_MM_MIN_ROWS and K % 8 == 0 and N % 8 == 0


def _torch_linear(x2, w, sw, bias, threshold, input_scale=None):
    """The torch path: the reference, with the int32 GEMM on torch._int_mm where it runs."""
    if input_scale is None:
        q, row_scale, cols = ref.int8_vectorwise_quant(x2, threshold)
        unit = row_scale[:, None] * (sw[None, :] / ref.INT8_MAX**2)
    else:  # the static step is the dequantized value of code 1
        q, cols = _static_codes_torch(x2, input_scale).to(torch.int8), None
        unit = input_scale.float().reshape(1, 1) * (sw[None, :] / ref.INT8_MAX)
    M, K = q.shape
    if _int_mm_exact(M, K, w.shape[0], x2.device):
        acc = torch._int_mm(q, w.t())
    else:  # exact in float64: |acc| <= K * 127**2 < 2**53
        acc = q.double() @ w.double().t()
    # fp32 epilogue, as the kernels do: the int32 sums and both scales round once each
    y = acc.float() * unit
    if cols is not None and cols.numel():  # in the op's kernel: the data-dependent shape stays here
        y += x2[:, cols].float() @ ref.dequantize_weight(w[:, cols], sw).t()
    if bias is not None:
        y += bias.float()
    return y.to(x2.dtype)


def _linear_kernel(x, weight_int8, weight_scale, bias, threshold, input_scale, backend):
    N, K = weight_int8.shape
    x2 = rows(x)
    kernels = KERNELS if input_scale is None else KERNELS_STATIC
    name = _backend.choose(OP, x.device, kernels, backend)
    if x2.shape[0] == 0 or N == 0 or K == 0:
        y = ref.int8_linear(x2, weight_int8, weight_scale, bias, threshold)
    else:
        with on_device(x2):
            if name != "torch":  # the kernels read these by index
                weight_scale, bias = dense(weight_scale), dense(bias)
            if name == "torch":
                y = _torch_linear(x2, weight_int8, weight_scale, bias, threshold, input_scale)
            elif input_scale is not None:
                y = _forward_static(x2, weight_int8, weight_scale, bias, input_scale)
            else:
                y = _forward_kernels(name, x2, weight_int8, weight_scale, bias, threshold)
    return y.reshape(*x.shape[:-1], N)


def _grad_input_kernel(dy, weight_int8, weight_scale, backend):
    """dx = dy @ W_deq, W_deq = w_int8 * w_scale / 127, in dy's dtype."""
    dy2 = rows(dy)
    K = weight_int8.shape[1]
    name = _backend.choose(OP, dy.device, KERNELS, backend)
    if name == "torch" or dy2.shape[0] == 0 or K == 0:
        return _grad_input_torch(dy, weight_int8, weight_scale)
    with on_device(dy2):
        if name == "triton":
            from ..kernels import int8 as k
            dx = k.dequant_matmul(dy2, weight_int8, dense(weight_scale))
        else:  # cuda: the int8 weight tile dequantized inside the GEMM (csrc/int8.cu), as the triton kernel does
            from . import _cext
            dx = _cext.int8_dequant_matmul(dy2, weight_int8, dense(weight_scale))
    return dx.reshape(*dy.shape[:-1], K)


def _grad_input_torch(dy, weight_int8, weight_scale):
    """dx = dy @ W_deq in dy's dtype by torch ops (a float32 product), which autograd records."""
    dx = rows(dy).float() @ ref.dequantize_weight(weight_int8, weight_scale)
    return dx.to(dy.dtype).reshape(*dy.shape[:-1], weight_int8.shape[1])


int8_linear_op = define(
    "int8_linear(Tensor x, Tensor weight_int8, Tensor weight_scale, Tensor? bias, float threshold, "
    "Tensor? input_scale, str? backend) -> Tensor", _linear_kernel,
    lambda x, w, sw, b, t, s, be: x.new_empty((*x.shape[:-1], w.shape[0])),
    autocast=(0, 3))  # x and bias; the codes and float32 scales stay
int8_linear_grad_input_op = define(
    "int8_linear_grad_input(Tensor dy, Tensor weight_int8, Tensor weight_scale, str? backend) -> Tensor",
    _grad_input_kernel, lambda dy, w, sw, be: dy.new_empty((*dy.shape[:-1], w.shape[1])))


class Int8LinearFunction(torch.autograd.Function):
    """Autograd of fastpeft::int8_linear: dx through the dequantized weight (the straight-through
    estimator for the quantized activations), db = sum(dy); the weight is frozen."""

    @staticmethod
    def forward(ctx, x, weight_int8, weight_scale, bias, threshold, input_scale, backend, direct=False):
        """``direct``: an eager call on plain tensors: the kernels run without the dispatcher."""
        with below_autograd():
            y = call(int8_linear_op, direct, x, weight_int8, weight_scale, bias, threshold, input_scale, backend)
        ctx.save_for_backward(weight_int8, weight_scale)
        ctx.cfg = (backend, bias is not None, direct)
        return y

    @staticmethod
    def backward(ctx, dy):
        w, sw = ctx.saved_tensors
        backend, has_bias, direct = ctx.cfg
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dx = db = None
        if need_x and building_graph():  # create_graph: dx, linear in dy, by recorded torch ops
            dx = _grad_input_torch(dy, w, sw)
        elif need_x:
            with below_autograd():
                dx = call(int8_linear_grad_input_op, direct and still_eager(), dy, w, sw, backend)
        if need_b and has_bias:
            db = dy.reshape(-1, w.shape[0]).sum(0) if dy.numel() else dy.new_zeros(w.shape[0])
        return dx, None, None, db, None, None, None, None


register_autograd(int8_linear_op, Int8LinearFunction)


def _valid(x, w, sw, bias) -> bool:
    """Every check of ``_validate`` in one expression: the per-call fast path."""
    T = torch.Tensor
    if not (isinstance(x, T) and isinstance(w, T) and isinstance(sw, T) and (bias is None or isinstance(bias, T))):
        return False
    if w.dim() != 2 or x.dim() < 1:
        return False
    N, device = w.shape[0], x.device
    return (x.dtype in _checks.FLOAT_DTYPES and w.dtype == torch.int8 and sw.dtype == torch.float32
            and sw.dim() == 1 and sw.shape[0] == N and x.shape[-1] == w.shape[1] and w.device == device
            and sw.device == device
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == N and bias.device == device
                                  and (bias.dtype == x.dtype or torch.is_autocast_enabled(device.type)))))


def _validate(x, weight_int8, weight_scale, bias):
    if _valid(x, weight_int8, weight_scale, bias):
        return x.device
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
    device = _checks.same_device(x=x, weight_int8=weight_int8, weight_scale=weight_scale, bias=bias)
    if bias is not None and not torch.is_autocast_enabled(device.type):  # autocast casts both
        _checks.same_dtype(x=x, bias=bias)
    return device


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
    Under ``torch.autocast``, x and bias are cast to the autocast dtype first (as F.linear's
    inputs), so y has that dtype.

    input_scale (static activations): a float32 tensor of one element on x's device, the fixed
    per-tensor step s of x's codes clamp(rint(x / s), -127, 127) (fastpeft.quantize's 8-bit
    absmax codes; from a calibration pass, see fastpeft.quantize_model); it must be finite and
    > 0 (not read on the host). Needs threshold 0; triton and torch backends only. The
    product is then scaled by s * weight_scale / 127. Gradients as without it (the
    straight-through estimator: dx = dy W_deq).

    Runs as the registered op ``torch.ops.fastpeft.int8_linear``; no host sync on the triton and
    cuda backends (the outlier columns are found and used on the device). The torch backend
    (the CPU path; on CUDA tensors only when forced) gathers the outlier columns by value: with
    threshold > 0 on CUDA tensors that reads their count on the host.
    """
    device = _validate(x, weight_int8, weight_scale, bias)
    threshold = check_threshold(threshold)
    if input_scale is not None:
        _checks.input_step(input_scale, device)
        if threshold != 0:
            raise ValueError(f"static activations (input_scale) need threshold=0 (no outlier columns), "
                             f"got threshold={threshold:g}")
    if backend is not None:
        _backend.check_name(backend)
    args = (x, weight_int8, weight_scale, bias, threshold, input_scale, backend)
    if eager(device.type, x, weight_int8, weight_scale, bias, input_scale):  # no dispatcher round trips
        return Int8LinearFunction.apply(*args, True) if needs_grad(x, bias) else _linear_kernel(*args)
    return int8_linear_op(*args)
