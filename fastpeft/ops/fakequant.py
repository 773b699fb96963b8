"""Fake quantization for quantization-aware training: ``fake_quantize`` with LSQ / LSQ+ gradients
for the input, the scale and the zero point. Semantics: fastpeft/reference/fakequant.py."""
from __future__ import annotations

import contextlib

import torch

from .. import _backend, _checks
from ..reference import fakequant as ref
from ..reference.quant import SCHEMES, qrange

OP = "fake_quantize"
SUPPORTED = ("triton", "torch")
PREFERRED_CUDA = ("triton", "torch")
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
    # one host sync for every value check
    s = scale.detach()
    good = (s > 0).all() & torch.isfinite(s).all()
    if x.numel():
        good &= torch.isfinite(x.detach()).all()
    if not bool(good):
        if x.numel() and not bool(torch.isfinite(x.detach()).all()):
            raise ValueError("x contains NaN or inf")
        raise ValueError(f"scale must be finite and > 0 in every slot, got {s.flatten()[:8].tolist()}"
                         f"{' ...' if s.numel() > 8 else ''}")
    return axis


def _slot_params(scale, zero_point, bits, scheme):
    """(scale, inv, zint) float32 [slots], contiguous, without autograd history."""
    s = scale.detach().float().reshape(-1).contiguous()
    zint = ref.zero_point_int(None if zero_point is None else zero_point.detach(), s, bits, scheme)
    return s, (1.0 / s).contiguous(), zint.reshape(-1).contiguous()


class _TritonFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, scheme, axis):
        from ..kernels import fakequant as k
        s, inv, zint = _slot_params(scale, zero_point, bits, scheme)
        xc = x.contiguous()
        rng = qrange(bits, scheme)
        y = k.fake_quantize_fwd(xc, s, inv, zint, rng, axis)
        ctx.save_for_backward(xc, scale, zero_point, s, inv, zint)
        ctx.cfg = (bits, scheme, axis, zero_point is not None, rng)
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..kernels import fakequant as k
        xc, scale, zero_point, s, inv, zint = ctx.saved_tensors
        bits, scheme, axis, has_zp, rng = ctx.cfg
        dx, ds, dz = k.fake_quantize_bwd(xc, dy.contiguous(), s, inv, zint, rng, axis)
        g = ref.grad_scale(xc.numel(), s.numel(), bits, scheme)
        ds = (ds * g).reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[1] else None
        if has_zp and ctx.needs_input_grad[2]:
            dz = torch.zeros_like(dz) if scheme == "absmax" else dz * g
            dz = dz.reshape(zero_point.shape).to(zero_point.dtype)
        else:
            dz = None
        return (dx if ctx.needs_input_grad[0] else None), ds, dz, None, None, None


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
    """
    axis = _validate(x, scale, zero_point, bits, scheme, axis)
    name = _backend.select(OP, x.device, PREFERRED_CUDA, SUPPORTED, explicit=backend)
    zp = zero_point
    if zp is not None and not zp.is_floating_point():
        zp = zp.float()  # an integer zero point: no gradient
    if name == "torch" or x.numel() == 0:
        return ref.FakeQuantizeFunction.apply(x, scale, zp, bits, scheme, axis)
    with (torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()):
        return _TritonFakeQuantize.apply(x, scale, zp, bits, scheme, axis)

