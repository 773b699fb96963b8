"""Weight-only quantized linear layer (W8A16 / W4A16): ``quant_linear``.

``y = x @ dequantize(qweight)^T + bias`` in x's dtype, the weight a QuantizedTensor
(fastpeft/ops/quant.py, semantics fastpeft/reference/quant.py) of shape [out, in].

Backends: ``triton`` (kernels/qlinear.py: a fused dequantize-GEMM, the 16-bit weight is never
materialized) and ``torch`` (the reference composition: dequantize, then F.linear). The weight
is frozen; gradients flow to x and bias. Backward: dx = dy @ W_deq by
``fastpeft::quant_linear_grad_input``: under triton the transposed fused dequantize-GEMM
(kernels/qlinear.py ``quant_linear_dx``, the weight never materialized); elsewhere W_deq in
dy's dtype by fastpeft.dequantize and a dense matmul.

Activations (``activations=``): None keeps x 16-bit (W4A16 / W8A16). "dynamic" quantizes each
row of x (token) to int8 with its absmax at run time (fastpeft.int8_vectorwise_quant's
semantics, threshold 0); "static" quantizes x with one fixed per-tensor step ``input_scale``
(from a calibration pass, fastpeft.quantize_model, or QAT), codes clamp(rint(x / s), -127, 127)
as fastpeft.quantize's 8-bit absmax codes. The kernel (kernels/qlinear.py, ``quant_linear_a8``)
then runs the int8 x int4/int8 product on the int8 tensor cores. The backward is the
straight-through estimator: dx = dy @ W_deq, as if x had not been quantized.

Registered ops (fastpeft/ops/_library.py): ``fastpeft::quant_linear`` with autograd (its
backward ``fastpeft::quant_linear_grad_input``, or under create_graph ``fastpeft::dequantize``
and a matmul) and an autocast rule (x and bias). No host sync.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import _backend, _checks
from . import _qlora
from ..reference import int8 as ref_int8
from ..reference import quant as ref_quant
from ._common import building_graph, dense, on_device, rows
from ._library import below_autograd, call, define, eager, needs_grad, register_autograd, still_eager
from .quant import QuantizedTensor, _dequantize_checked, check_fields, dequantize_op, torch_dequantize

OP = "quant_linear"
ACTIVATIONS = (None, "dynamic", "static")
KERNELS = ("triton", "torch")  # in the order preferred on CUDA tensors


def _weight(data, scale, zero_point, bits, scheme, axis, group_size, K, dtype):
    return torch_dequantize(data, scale, zero_point, bits, scheme, axis, group_size, [data.shape[0], K], dtype)


def _torch_linear(x2, data, scale, zp, bits, scheme, axis, group_size, bias):
    """The reference composition: dequantize to x's dtype, then F.linear."""
    return F.linear(x2, _weight(data, scale, zp, bits, scheme, axis, group_size, x2.shape[1], x2.dtype), bias)


def _torch_linear_a8(x2, data, scale, zp, bits, scheme, axis, group_size, bias, activations, input_scale):
    """The reference of the int8-activation path: x's codes times their step, in float32."""
    if activations == "dynamic":
        q, row_scale, _ = ref_int8.int8_vectorwise_quant(x2, 0.0)
        xd = q.float() * (row_scale / ref_int8.INT8_MAX)[:, None]
    else:
        s = input_scale.float()
        q = ref_quant.quantize_codes(x2, s, torch.zeros((), dtype=torch.int32, device=s.device), 8, "absmax")
        xd = q.float() * s
    w = _weight(data, scale, zp, bits, scheme, axis, group_size, x2.shape[1], torch.float32)
    return F.linear(xd, w, None if bias is None else bias.float()).to(x2.dtype)


def _kernel_linear(x2, data, scale, zp, bits, scheme, group_size, bias, lora=None):
    from ..kernels import qlinear as k
    data = data if data.stride(-1) == 1 else data.contiguous()
    return k.quant_linear(x2, data, scale, zp, bits, scheme, group_size, bias, lora=lora)


def _kernel_dx(dy2, data, scale, zp, bits, scheme, group_size, in_features, lora=None):
    """dx by kernels/qlinear.py's transposed dequantize-GEMM (``lora``: its fused update)."""
    from ..kernels import qlinear as k
    data = data if data.stride(-1) == 1 else data.contiguous()
    return k.quant_linear_dx(dy2, dense(data), dense(scale), dense(zp), bits, scheme, group_size, in_features,
                             lora=lora)


def _kernel_linear_a8(x2, data, scale, zp, bits, scheme, group_size, bias, activations, input_scale):
    from ..kernels import int8 as kint8
    from ..kernels import qlinear as k
    from ..kernels import quant as kquant
    if activations == "dynamic":
        xq, xs, _ = kint8.quant_rows(x2, 0.0)
        x_mul = 1.0 / ref_int8.INT8_MAX
    else:
        xs = input_scale.reshape(1)
        xq = kquant.codes_with_scale(x2, xs)
        x_mul = 1.0
    data = data if data.stride(-1) == 1 else data.contiguous()
    return k.quant_linear_a8(xq, xs, x_mul, data, scale, zp, bits, scheme, group_size, bias, x2.dtype)


def _triton_takes(group_size, activations) -> bool:
    from ..kernels import qlinear as k
    return k.supports(group_size) if activations is None else k.supports_a8(group_size)


def _choose(device, group_size, activations, backend) -> str:
    """triton where its kernel takes the group size; else torch (an error if triton was forced)."""
    name = _backend.choose(OP, device, KERNELS, backend)
    if name == "triton" and not _triton_takes(group_size, activations):
        if _backend.forced_backend(backend) == "triton":
            lo = 16 if activations is None else 32
            raise ValueError(f"quant_linear: the triton kernel needs group_size a power of two in "
                             f"[{lo}, 1024], got {group_size}; use backend='torch'")
        name = "torch"
    return name


def _check_op_weight(op, data, scale, zero_point, bits, scheme, axis, group_size, K, dtype, bias=None) -> None:
    """The fields of an op's [out, K] weight as fastpeft.quantize makes them, with per-row,
    per-group or per-tensor scales, and the bias [out]: the registered ops are public too
    (torch.ops.fastpeft.*), and the kernels index the codes, scales and bias by these shapes.
    Reads no value."""
    _, axis = check_fields(data, scale, zero_point, bits, scheme, axis, group_size,
                           (data.shape[0] if data.dim() else 0, K), dtype)
    if axis not in (None, 0):
        raise ValueError(f"{op} supports per-output-row (axis=0), per-group or per-tensor scales; got axis={axis}")
    if bias is not None and tuple(bias.shape) != (data.shape[0],):
        raise ValueError(f"{op}: bias shape {tuple(bias.shape)} does not match {data.shape[0]} output features")


def _linear_kernel(x, data, scale, zero_point, bits, scheme, axis, group_size, bias, activations, input_scale,
                   backend):
    _check_op_weight("quant_linear", data, scale, zero_point, bits, scheme, axis, group_size, x.shape[-1], x.dtype,
                     bias)
    _validate_activations(activations, input_scale, x.device)
    N = data.shape[0]
    x2 = rows(x)
    name = _choose(x.device, group_size, activations, backend)
    w_args = (data, scale, zero_point, bits, scheme, axis, group_size)
    if x2.shape[0] == 0 or N == 0 or x2.shape[1] == 0:  # nothing to quantize: zeros (+ bias)
        y = _torch_linear(x2, *w_args, bias)
    else:
        with on_device(x2):
            if name != "torch":  # the kernels read these by index
                data, scale, zero_point, bias = dense(data), dense(scale), dense(zero_point), dense(bias)
            if activations is None:
                y = _torch_linear(x2, *w_args, bias) if name == "torch" else \
                    _kernel_linear(x2, data, scale, zero_point, bits, scheme, group_size, bias)
            elif name == "torch":
                y = _torch_linear_a8(x2, *w_args, bias, activations, input_scale)
            else:
                y = _kernel_linear_a8(x2, data, scale, zero_point, bits, scheme, group_size, bias, activations,
                                      input_scale)
    return y.reshape(*x.shape[:-1], N)


quant_linear_op = define(
    "quant_linear(Tensor x, Tensor data, Tensor scale, Tensor zero_point, int bits, str scheme, int? axis, "
    "int? group_size, Tensor? bias, str? activations, Tensor? input_scale, str? backend) -> Tensor",
    _linear_kernel, lambda *a: _linear_fake(*a),
    autocast=(0, 8))  # x and bias; codes, scales and the static step stay


def _linear_fake(x, data, scale, zero_point, bits, scheme, axis, group_size, bias, activations, input_scale, backend):
    _check_op_weight("quant_linear", data, scale, zero_point, bits, scheme, axis, group_size, x.shape[-1], x.dtype,
                     bias)
    return x.new_empty((*x.shape[:-1], data.shape[0]))


def _grad_input_kernel(dy, data, scale, zero_point, bits, scheme, axis, group_size, in_features, backend):
    """dx = dy @ W_deq [..., in] in dy's dtype. Triton (where its kernel takes the group size):
    kernels/qlinear.py ``quant_linear_dx``, the weight never materialized; else W_deq in dy's
    dtype by fastpeft::dequantize's kernel for the backend, and a matmul."""
    _check_op_weight("quant_linear_grad_input", data, scale, zero_point, bits, scheme, axis, group_size, in_features,
                     dy.dtype)
    N = data.shape[0]
    dy2 = rows(dy)
    name = _choose(dy.device, group_size, None, backend)
    if name == "torch" or dy2.shape[0] == 0 or N == 0 or in_features == 0:
        w = _dequantize_checked(data, scale, zero_point, bits, scheme, axis, group_size, (N, in_features), dy.dtype,
                                backend)
        dx = dy2 @ w
    else:
        with on_device(dy2):
            dx = _kernel_dx(dy2, data, scale, zero_point, bits, scheme, group_size, in_features)
    return dx.reshape(*dy.shape[:-1], in_features)


quant_linear_grad_input_op = define(
    "quant_linear_grad_input(Tensor dy, Tensor data, Tensor scale, Tensor zero_point, int bits, str scheme, "
    "int? axis, int? group_size, SymInt in_features, str? backend) -> Tensor",
    _grad_input_kernel, lambda dy, data, scale, zero_point, bits, scheme, axis, group_size, in_features, backend: (
        _check_op_weight("quant_linear_grad_input", data, scale, zero_point, bits, scheme, axis, group_size,
                         in_features, dy.dtype), dy.new_empty((*dy.shape[:-1], in_features)))[1])


class QuantLinearFunction(torch.autograd.Function):
    """Autograd of fastpeft::quant_linear: dx = dy @ W_deq by fastpeft::quant_linear_grad_input
    (the transposed fused kernel under triton), db = sum(dy); the codes are frozen. Under
    create_graph dx is W_deq (fastpeft::dequantize) times dy, recorded."""

    @staticmethod
    def forward(ctx, x, data, scale, zero_point, bits, scheme, axis, group_size, bias, activations, input_scale,
                backend, direct=False):
        """``direct``: an eager call on plain tensors: the kernels run without the dispatcher."""
        with below_autograd():
            y = call(quant_linear_op, direct, x, data, scale, zero_point, bits, scheme, axis, group_size, bias,
                     activations, input_scale, backend)
        ctx.save_for_backward(data, scale, zero_point)
        ctx.cfg = (bits, scheme, axis, group_size, x.shape[-1], backend, bias is not None, direct)
        return y

    @staticmethod
    def backward(ctx, dy):  # dx and db are torch ops on dy: recorded under create_graph
        data, scale, zero_point = ctx.saved_tensors
        bits, scheme, axis, group_size, K, backend, has_bias, direct = ctx.cfg
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[8]
        dx = db = None
        N = data.shape[0]
        if need_x and building_graph():  # recorded by autograd: differentiable in dy
            with below_autograd():
                w = call(dequantize_op, direct and still_eager(), data, scale, zero_point, bits, scheme, axis,
                         group_size, [N, K], dy.dtype, backend)
            dx = dy @ w
        elif need_x:
            with below_autograd():
                dx = call(quant_linear_grad_input_op, direct and still_eager(), dy, data, scale, zero_point, bits,
                          scheme, axis, group_size, K, backend)
        if need_b and has_bias:
            db = dy.reshape(-1, N).sum(0) if dy.numel() else dy.new_zeros(N)
        return dx, None, None, None, None, None, None, None, db, None, None, None, None


register_autograd(quant_linear_op, QuantLinearFunction)


# ---------------------------------------------------------------------------------------------
# LoRA on the W4A16 / W8A16 base, fused: y = x @ W_deq^T + bias + scaling * (dropout(x) A^T) B^T
#
# fastpeft/ops/_qlora.py holds what every quantized base shares (the LoRA shrink, then the base's
# GEMM with the update in its accumulator; the backward's mirror; the autograd); here the int4 /
# int8 GEMMs (kernels/qlinear.py ``_qlinear_kernel``, the decode GEMV and ``_qlinear_dx_kernel``,
# HAS_LORA) where the triton kernel takes the group size, else the torch composition.

def _lora_forward(x, data, scale, zero_point, bits, scheme, axis, group_size, bias, lora_A, lora_B, scaling,
                  dropout_p, seed, backend):
    """(y [..., out] in x's dtype, U = dropout(x) A^T float32 [M, r])."""
    w_args = (data, scale, zero_point, bits, scheme, axis, group_size)
    _check_op_weight("quant_lora_linear", *w_args, x.shape[-1], x.dtype, bias)
    use_kernel = _choose(x.device, group_size, None, backend) != "torch"

    def fused(x2, lora):
        return _kernel_linear(x2, dense(data), dense(scale), dense(zero_point), bits, scheme, group_size, dense(bias),
                              lora)
    return _qlora.forward(x, lora_A, lora_B, scaling, dropout_p, seed, data.shape[0],
                          lambda x2: _torch_linear(x2, *w_args, bias), fused if use_kernel else None)


def _lora_kernel(*args):
    return _lora_forward(*args)[0]


def _lora_fake(x, data, scale, zero_point, bits, scheme, axis, group_size, bias, lora_A, lora_B, *rest):
    _check_op_weight("quant_lora_linear", data, scale, zero_point, bits, scheme, axis, group_size, x.shape[-1], x.dtype,
                     bias)
    return _qlora.forward_fake(x, lora_A, lora_B, data.shape[0])


def _lora_grad_input_fake(dy, data, scale, zero_point, bits, scheme, axis, group_size, in_features, lora_A, lora_B,
                          *rest):
    _check_op_weight("quant_lora_linear", data, scale, zero_point, bits, scheme, axis, group_size, in_features,
                     dy.dtype)
    return _qlora.grad_input_fake(dy, lora_A, lora_B, in_features)


_LORA_ARGS = ("Tensor x, Tensor data, Tensor scale, Tensor zero_point, int bits, str scheme, int? axis, "
              "int? group_size, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
              "Tensor? seed, str? backend")
quant_lora_linear_op = define(f"quant_lora_linear({_LORA_ARGS}) -> Tensor", _lora_kernel,
                              lambda *a: _lora_fake(*a)[0], autocast=(0, 8, 9, 10))
quant_lora_linear_fwd_op = define(f"quant_lora_linear_fwd({_LORA_ARGS}) -> (Tensor, Tensor)", _lora_forward,
                                  _lora_fake)


def _lora_grad_input(dy, data, scale, zero_point, bits, scheme, axis, group_size, in_features, lora_A, lora_B,
                     scaling, dropout_p, seed, backend):
    """(dx = dy W_deq + scaling * dropout'((dy B) A) [..., in] in dy's dtype, V = dy B float32 [M, r])."""
    _check_op_weight("quant_lora_linear", data, scale, zero_point, bits, scheme, axis, group_size, in_features,
                     dy.dtype)
    use_kernel = _choose(dy.device, group_size, None, backend) != "torch"

    def fused(dy2, lora):
        return _kernel_dx(dy2, data, scale, zero_point, bits, scheme, group_size, in_features, lora)
    return _qlora.grad_input(dy, lora_A, lora_B, scaling, dropout_p, seed, in_features, lambda dtype: _weight(
        data, scale, zero_point, bits, scheme, axis, group_size, in_features, dtype), fused if use_kernel else None)


quant_lora_linear_grad_input_op = define(
    "quant_lora_linear_grad_input(Tensor dy, Tensor data, Tensor scale, Tensor zero_point, int bits, str scheme, "
    "int? axis, int? group_size, SymInt in_features, Tensor lora_A, Tensor lora_B, float scaling, "
    "float dropout_p, Tensor? seed, str? backend) -> (Tensor, Tensor)",
    _lora_grad_input, _lora_grad_input_fake)

# Autograd of fastpeft::quant_lora_linear (fastpeft/ops/_qlora.py): dx and V = dy B by
# fastpeft::quant_lora_linear_grad_input (fused), dA from V, dB = scaling * dy^T U, db = sum(dy).
QuantLoRALinearFunction = _qlora.lora_function(
    "QuantLoRALinearFunction", quant_lora_linear_fwd_op, quant_lora_linear_grad_input_op, 3, 4,
    lambda w, K: (*w, K),  # data, scale, zero_point, bits, scheme, axis, group_size; in_features
    lambda w, K, dtype: _weight(*w, K, dtype))
register_autograd(quant_lora_linear_op, QuantLoRALinearFunction)


def _validate(x, qweight, bias) -> tuple[torch.device, int | None]:
    """(device, qweight's axis in [0, 2) or None) after checking every field of ``qweight`` against
    the others (fastpeft.ops.quant.check_fields: code dtype, packed shape, slot shapes, devices), and
    what quant_linear adds: a 2-D weight, per-row / per-group / per-tensor scales, x's features."""
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if not isinstance(qweight, QuantizedTensor):
        raise TypeError(f"qweight must be a fastpeft.QuantizedTensor (fastpeft.quantize(weight, ...)), "
                        f"got {type(qweight).__name__}")
    shape, axis = check_fields(qweight.data, qweight.scale, qweight.zero_point, qweight.bits, qweight.scheme,
                               qweight.axis, qweight.group_size, qweight.shape, qweight.dtype, origin="qweight.")
    if len(shape) != 2:
        raise ValueError(f"qweight must be a quantized 2-D [out, in] weight, got shape {shape}")
    N, K = shape
    if axis is not None and axis != 0:
        raise ValueError(f"quant_linear supports per-output-row (axis=0), per-group (group_size along "
                         f"in) or per-tensor scales; got axis={qweight.axis} (one scale per input feature)")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but qweight "
                         f"{shape} expects {K}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        if bias.shape[0] != N:
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match {N} output features")
    device = _checks.same_device(x=x, qweight_data=qweight.data, bias=bias)
    if bias is not None and not torch.is_autocast_enabled(device.type):  # autocast casts both
        _checks.same_dtype(x=x, bias=bias)
    return device, axis


def _validate_activations(activations, input_scale, device) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "static":
        if input_scale is None:
            raise ValueError("activations='static' needs input_scale (the per-tensor step of the int8 "
                             "activation codes, e.g. from fastpeft.quantize_model's calibration)")
        _checks.input_step(input_scale, device)
    elif input_scale is not None:
        raise ValueError(f"input_scale is only used with activations='static', got activations={activations!r}")


def quant_linear(x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None, *,
                 activations: str | None = None, input_scale: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """Weight-only quantized linear: y = x @ dequantize(qweight)^T + bias, in x's dtype.

    x: [..., in] fp32/fp16/bf16 (any leading dims and strides). qweight: the [out, in] weight
    quantized by ``fastpeft.quantize`` with bits 8 or 4, scheme "zeropoint" or "absmax", and
    one scale per group of ``group_size`` input features, per output row (axis=0) or per
    tensor. bias: [out] in x's dtype, or None. Gradients for x (dx = dy @ W_deq) and bias; the
    weight is frozen. The triton kernel needs a power-of-two group size (16 to 1024; 32 to 1024
    with int8 activations); other group sizes run the torch composition unless the triton
    backend is forced (then an error). Under ``torch.autocast``, x and bias are cast to the
    autocast dtype first (as F.linear's inputs), so y has that dtype.

    activations: None (x stays 16-bit), "dynamic" (int8 per row of x, absmax computed at run
    time) or "static" (int8 with the given per-tensor step ``input_scale``, a float32 tensor of
    one element on x's device that must be finite and > 0: it is not read on the host).

    Runs as the registered op ``torch.ops.fastpeft.quant_linear``; no host sync.
    """
    device, axis = _validate(x, qweight, bias)
    _validate_activations(activations, input_scale, device)
    if backend is not None:
        _backend.check_name(backend)
    args = (x, qweight.data, qweight.scale, qweight.zero_point, qweight.bits, qweight.scheme, axis,
            qweight.group_size, bias, activations, input_scale, backend)
    if eager(device.type, x, qweight.data, qweight.scale, qweight.zero_point, bias, input_scale):
        return QuantLinearFunction.apply(*args, True) if needs_grad(x, bias) else _linear_kernel(*args)
    return quant_linear_op(*args)


def quant_lora_linear(x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False, *,
                      seed: int | None = None, backend: str | None = None) -> torch.Tensor:
    """LoRA (Hu et al., 2021) on a frozen weight-only quantized base, its forward fused:
    y = x @ dequantize(qweight)^T + bias + scaling * (dropout(x) A^T) B^T, in x's dtype.

    x, qweight, bias as ``quant_linear`` (x stays 16-bit: no int8 activations); lora_A [r, in],
    lora_B [out, r] (another float dtype than x's: the update computes in x's dtype, the
    gradients come back in theirs). Dropout (``dropout_p`` when ``training``):
    fastpeft.lora_linear's counter-based mask and seed. The triton backend (where its kernel takes
    the group size) is two launches: U = dropout(x) A^T in float32 by the LoRA shrink kernel, then
    ``quant_linear``'s kernel (or its decode GEMV) with scaling * U B^T in its accumulator; y is
    rounded once from float32. dx is fused the same way (V = dy B by the shrink, then the
    transposed dequantize-GEMM starting from scaling * dropout'(V A)). The torch backend computes
    the unfused layer. Gradients for x, bias, lora_A and lora_B, as the unfused layer's. Runs as
    the registered op ``torch.ops.fastpeft.quant_lora_linear``; no host sync.
    """
    from . import lora as lora_ops
    device, axis = _validate(x, qweight, bias)
    N = qweight.shape[0]
    A, B, scaling, p = _qlora.check_adapter(x, lora_A, lora_B, N, scaling, dropout_p, training, device)
    if backend is not None:
        _backend.check_name(backend)
    args = (x, qweight.data, qweight.scale, qweight.zero_point, qweight.bits, qweight.scheme, axis,
            qweight.group_size, bias, A, B, scaling, p, lora_ops._dropout_seed(device, p, seed), backend)
    if eager(device.type, x, qweight.data, qweight.scale, qweight.zero_point, bias, A, B):
        return QuantLoRALinearFunction.apply(*args, True) if needs_grad(x, bias, A, B) else _lora_kernel(*args)
    return quant_lora_linear_op(*args)
