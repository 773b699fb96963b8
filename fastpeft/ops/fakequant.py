"""Fake quantization for quantization-aware training: ``fake_quantize`` with LSQ / LSQ+ gradients
for the input, the scale and the zero point. Semantics: fastpeft/reference/fakequant.py.

Registered ops (fastpeft/ops/_library.py):
  fastpeft::fake_quantize           y, with autograd
  fastpeft::fake_quantize_backward  (dx, d scale, d zero_point), the LSQ gradient scale applied
The value checks (scale finite and > 0, x finite) run in the forward's kernel without a host sync
(fastpeft._checks.check_values): the Triton kernel flags a NaN / inf x as it reads it, so there
is no second pass over x.
"""
from __future__ import annotations

import torch

from .. import _backend, _checks
from ..reference import fakequant as ref
from ..reference.quant import SCHEMES, qrange
from ._common import building_graph, on_device
from ._library import below_autograd, call, define, eager, needs_grad, register_autograd, still_eager

OP = "fake_quantize"
KERNELS = ("triton", "torch")  # in the order preferred on CUDA tensors
BITS = (8, 4)


def _validate(x, scale, zero_point, bits, scheme, axis):
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis!r} out of range for a {x.dim()}-D tensor")
        axis %= x.dim()
    want = () if axis is None else (x.shape[axis],)
    _checks.tensor("scale", scale, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    if tuple(scale.shape) != want:
        per = "tensor" if axis is None else f"index along axis {axis}"
        raise ValueError(f"scale must have shape {want} (one per {per} of x {tuple(x.shape)}), "
                         f"got {tuple(scale.shape)}")
    if zero_point is not None:
        if not isinstance(zero_point, torch.Tensor):
            raise TypeError(f"zero_point must be a torch.Tensor or None, got {type(zero_point).__name__}")
        if zero_point.dtype == torch.bool or zero_point.is_complex():
            raise TypeError(f"zero_point must be a float or integer tensor, got {zero_point.dtype}")
        if tuple(zero_point.shape) != want:
            raise ValueError(f"zero_point must have scale's shape {want}, got {tuple(zero_point.shape)}")
    _checks.same_device(x=x, scale=scale, zero_point=zero_point)
    return axis


def _slot_params(scale, zero_point, bits, scheme):
    """(scale, inv, zint) float32 [slots], contiguous."""
    s = scale.float().reshape(-1).contiguous()
    zint = ref.zero_point_int(zero_point, s, bits, scheme)
    return s, (1.0 / s).contiguous(), zint.reshape(-1).contiguous()


def _check_scale(scale: torch.Tensor) -> None:
    s = scale.reshape(-1)
    _checks.check_values((s > 0) & torch.isfinite(s), lambda: (
        f"scale must be finite and > 0 in every slot, got {s[:8].tolist()}{' ...' if s.numel() > 8 else ''}"))


def _x_message() -> str:
    return "x contains NaN or inf"


def _forward_kernel(x, scale, zero_point, bits, scheme, axis, backend):
    name = _backend.choose(OP, x.device, KERNELS, backend)
    if name == "torch" or x.numel() == 0:
        if x.numel():
            _checks.check_values(torch.isfinite(x), _x_message)
        _check_scale(scale)
        return ref.fake_quantize(x.contiguous(), scale, zero_point, bits, scheme, axis)
    from ..kernels import fakequant as k
    _check_scale(scale)
    s, inv, zint = _slot_params(scale, zero_point, bits, scheme)
    with on_device(x):
        y, bad = k.fake_quantize_fwd(x.contiguous(), s, inv, zint, qrange(bits, scheme), axis)
    _checks.check_values(bad == 0, _x_message)
    return y


def _backward_kernel(x, dy, scale, zero_point, bits, scheme, axis, backend):
    name = _backend.choose(OP, x.device, KERNELS, backend)
    if name == "torch" or x.numel() == 0:
        dx, ds, dz = ref.fake_quantize_grads(x.contiguous(), scale, zero_point, dy.contiguous(), bits, scheme,
                                             axis)
        return dx.contiguous(), ds.float(), dz.float()
    from ..kernels import fakequant as k
    s, inv, zint = _slot_params(scale, zero_point, bits, scheme)
    with on_device(x):
        dx, ds, dz = k.fake_quantize_bwd(x.contiguous(), dy.contiguous(), s, inv, zint, qrange(bits, scheme), axis)
    g = ref.grad_scale(x.numel(), s.numel(), bits, scheme)
    dz = torch.zeros_like(dz) if scheme == "absmax" else dz * g
    return dx, (ds * g).reshape(scale.shape), dz.reshape(scale.shape)


fake_quantize_op = define(
    "fake_quantize(Tensor x, Tensor scale, Tensor? zero_point, int bits, str scheme, int? axis, str? backend) "
    "-> Tensor", _forward_kernel, lambda x, *rest: torch.empty_like(x, memory_format=torch.contiguous_format))
fake_quantize_backward_op = define(
    "fake_quantize_backward(Tensor x, Tensor dy, Tensor scale, Tensor? zero_point, int bits, str scheme, "
    "int? axis, str? backend) -> (Tensor, Tensor, Tensor)", _backward_kernel,
    lambda x, dy, scale, *rest: (torch.empty_like(x, memory_format=torch.contiguous_format),
                                 scale.new_empty(scale.shape, dtype=torch.float32),
                                 scale.new_empty(scale.shape, dtype=torch.float32)))


class FakeQuantizeFunction(torch.autograd.Function):
    """Autograd of fastpeft::fake_quantize: the straight-through dx and LSQ / LSQ+ gradients."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, scheme, axis, backend, direct=False):
        """``direct``: an eager call on plain tensors: the kernels run without the dispatcher."""
        with below_autograd():
            y = call(fake_quantize_op, direct, x, scale, zero_point, bits, scheme, axis, backend)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.cfg = (bits, scheme, axis, backend, direct)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, zero_point = ctx.saved_tensors
        bits, scheme, axis, backend, direct = ctx.cfg
        if building_graph():  # create_graph: the torch backend's formulas, recorded
            dx, ds, dz = ref.fake_quantize_grads(x, scale, zero_point, dy, bits, scheme, axis)
        else:
            with below_autograd():
                dx, ds, dz = call(fake_quantize_backward_op, direct and still_eager(), x, dy, scale, zero_point,
                                  bits, scheme, axis, backend)
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        return (dx if need_x else None, ds.to(scale.dtype) if need_s else None,
                dz.to(zero_point.dtype) if (need_z and zero_point is not None) else None,
                None, None, None, None, None)


register_autograd(fake_quantize_op, FakeQuantizeFunction)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None, bits: int = 8,
                  scheme: str = "zeropoint", axis: int | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Quantize-dequantize with learnable scale and zero point (LSQ, LSQ+).

    y = (clamp(round(x / s) + z_int, qmin, qmax) - z_int) * s, z_int = clamp(round(z), qmin, qmax),
    with (qmin, qmax) = fastpeft.reference.quant.qrange(bits, scheme) and x / s computed as
    x * (1 / s) in float32 (so y equals quantize_codes -> dequantize_codes with s, z_int exactly);
    y in x's dtype. ``scale`` (> 0) and ``zero_point`` are 0-d (axis=None) or [x.shape[axis]].
    ``zero_point`` None means 0; absmax ignores it (z_int = 0). Gradients (straight-through):
    dx = dy inside the clip range, 0 outside; ds = g * sum dy * (round(v) - v inside, q - z_int
    outside); dz = g * sum dy * (0 inside, -s outside) (0 for absmax), v = x / s,
    g = 1 / sqrt(elements per slot * qmax). Details: fastpeft/reference/fakequant.py.

    x must be finite and the scale finite and > 0: checked in the op's kernel, on the device
    (CPU: a ValueError; CUDA: a device-side assertion, no host sync). Runs as the registered
    op ``torch.ops.fastpeft.fake_quantize``.
    """
    axis = _validate(x, scale, zero_point, bits, scheme, axis)
    if backend is not None:
        _backend.check_name(backend)
    zp = zero_point
    if zp is not None and not zp.is_floating_point():
        zp = zp.float()  # an integer zero point: no gradient
    args = (x, scale, zp, bits, scheme, axis, backend)
    if eager(x.device.type, x, scale, zp):  # no dispatcher round trips
        return FakeQuantizeFunction.apply(*args, True) if needs_grad(x, scale, zp) else _forward_kernel(*args)
    return fake_quantize_op(*args)
