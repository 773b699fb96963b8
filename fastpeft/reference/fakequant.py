"""Reference fake quantization with learned scale and zero point (LSQ / LSQ+): the specification
the fake-quantization kernels follow.

Esser et al. 2020, "Learned Step Size Quantization" (LSQ), with the learnable offset of
Bhalgat et al. 2020 (LSQ+). Quantization as in fastpeft/reference/quant.py (``qrange``,
half-to-even rounding, x / s evaluated as x * (1 / s) in float32); the scale and zero point
are given, not computed from x. Slots: one for the whole tensor (axis=None, scale and zero
point 0-d) or one per index along ``axis`` (scale and zero point [x.shape[axis]]).

Forward, per element, all in float32 (s = scale, z = zero_point of the element's slot):
  z_int = clamp(round(z), qmin, qmax)            (absmax: z_int = 0)
  v     = x * (1 / s)
  t     = round(v) + z_int
  q     = clamp(t, qmin, qmax)
  y     = (q - z_int) * s, cast to x's dtype
This is fastpeft.reference.quant's quantize_codes -> dequantize_codes with that scale and z_int,
bit for bit.

Backward (straight-through estimator: d round(u) / du := 1, also through z_int's round and
clamp; inside = qmin <= t <= qmax):
  dL/dx = dy                      inside,   0 outside
  dL/ds = g * sum over the slot of dy * (round(v) - v   inside;  q - z_int   outside)
  dL/dz = g * sum over the slot of dy * (0              inside;  -s          outside)
with the LSQ gradient scale g = 1 / sqrt(n * qmax), n = elements per slot (x.numel() / slots)
and qmax the highest code of ``qrange`` (LSQ's Q_P). LSQ+ scales the offset's gradient by the
same g. absmax: z_int = 0 and dL/dz = 0. These are the derivatives of
  y = (clamp(rp(x / s) + zp, qmin, qmax) - zp) * s,  rp(u) = u + (round(u) - u).detach(),
  zp = z + (z_int - z).detach(),  s and z entering through gs(p) = p.detach() + (p g - (p g).detach())
(``lsq_autograd`` below builds exactly that in torch autograd; the tests compare it with
``fake_quantize_grads``). They are not the derivatives of the piecewise-constant y itself
(those are 0 for x and round(v) for s inside), so finite differences do not check them.

An element whose x is NaN takes code 0 (as in quantize_codes) and counts as outside.
"""
from __future__ import annotations

import math

import torch

from .quant import qrange


def _slot_view(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A per-slot tensor [slots] shaped to broadcast against x."""
    if axis is None:
        return t.reshape(())
    view = [1] * x.dim()
    view[axis] = x.shape[axis]
    return t.reshape(view)


def grad_scale(numel: int, slots: int, bits: int, scheme: str) -> float:
    """LSQ's g = 1 / sqrt(elements per slot * qmax)."""
    n = max(1, numel // max(1, slots))
    return 1.0 / math.sqrt(n * qrange(bits, scheme)[1])


def zero_point_int(zero_point: torch.Tensor | None, scale: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
    """float32 clamp(round(z), qmin, qmax) (half-to-even), zeros for absmax or no zero point."""
    if scheme == "absmax" or zero_point is None:
        return torch.zeros(scale.shape, dtype=torch.float32, device=scale.device)
    qmin, qmax = qrange(bits, scheme)
    return torch.round(zero_point.float()).clamp(qmin, qmax)


def _parts(x, scale, zero_point, bits, scheme, axis):
    qmin, qmax = qrange(bits, scheme)
    s = _slot_view(scale.float(), x, axis)
    z = _slot_view(zero_point_int(zero_point, scale, bits, scheme), x, axis)
    v = x.float() * (1.0 / s)
    t = torch.round(v) + z
    ok = ~torch.isnan(t)
    q = t.nan_to_num(0.0).clamp(qmin, qmax)
    inside = ok & (t >= qmin) & (t <= qmax)
    return s, z, v, q, inside


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int = 8,
                  scheme: str = "zeropoint", axis: int | None = None) -> torch.Tensor:
    """y = (clamp(round(x / s) + z_int, qmin, qmax) - z_int) * s in x's dtype (no autograd)."""
    s, z, _, q, _ = _parts(x, scale, zero_point, bits, scheme, axis)
    return ((q - z) * s).to(x.dtype)


def fake_quantize_grads(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                        dy: torch.Tensor, bits: int = 8, scheme: str = "zeropoint", axis: int | None = None,
                        acc_dtype: torch.dtype = torch.float32):
    """(dx in x's dtype, ds and dz as float ``acc_dtype`` tensors of scale's shape) by the formulas
    of the module docstring; the per-element terms use the float32 v, q and inside of the forward,
    the products and sums run in ``acc_dtype`` (float64 for a test oracle)."""
    s, z, v, q, inside = _parts(x, scale, zero_point, bits, scheme, axis)
    g = grad_scale(x.numel(), scale.numel(), bits, scheme)
    d = dy.to(acc_dtype)
    dx = torch.where(inside, dy, torch.zeros_like(dy)).to(x.dtype)
    ds_e = d * torch.where(inside, (torch.round(v) - v).to(acc_dtype), (q - z).to(acc_dtype))
    dz_e = d * torch.where(inside, torch.zeros_like(d), -s.to(acc_dtype).expand_as(d))
    if axis is None:
        ds, dz = ds_e.sum(), dz_e.sum()
    else:  # (a 1-D x has one element per slot: nothing to sum; sum(dim=[]) would sum everything)
        dims = [i for i in range(x.dim()) if i != axis % x.dim()]
        ds, dz = (ds_e.sum(dim=dims), dz_e.sum(dim=dims)) if dims else (ds_e, dz_e)
    if scheme == "absmax":
        dz = torch.zeros_like(dz)
    return dx, (ds * g).reshape(scale.shape), (dz * g).reshape(scale.shape)


class FakeQuantizeFunction(torch.autograd.Function):
    """Autograd of ``fake_quantize`` with the gradients of ``fake_quantize_grads`` (the torch backend)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, scheme, axis):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.cfg = (bits, scheme, axis, zero_point is not None)
        return fake_quantize(x, scale, zero_point, bits, scheme, axis)

    @staticmethod
    def backward(ctx, dy):
        x, scale, zero_point = ctx.saved_tensors
        bits, scheme, axis, has_zp = ctx.cfg
        dx, ds, dz = fake_quantize_grads(x, scale, zero_point if has_zp else None, dy, bits, scheme, axis)
        ds = ds.to(scale.dtype) if ctx.needs_input_grad[1] else None
        dz = dz.to(zero_point.dtype) if has_zp and ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), ds, dz, None, None, None


def _scaled_grad(p: torch.Tensor, g: float) -> torch.Tensor:
    """p's value exactly (a - a == 0), gradient g."""
    pg = p * g
    return p.detach() + (pg - pg.detach())


def lsq_autograd(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int = 8,
                 scheme: str = "zeropoint", axis: int | None = None) -> torch.Tensor:
    """The straight-through formulation written with .detach() tricks (LSQ's ``grad_scale`` and
    ``round_pass``), differentiated by torch autograd: an independent oracle for the gradients."""
    qmin, qmax = qrange(bits, scheme)
    g = grad_scale(x.numel(), scale.numel(), bits, scheme)
    s = _slot_view(_scaled_grad(scale, g), x, axis)
    if scheme == "absmax" or zero_point is None:
        z = torch.zeros((), dtype=s.dtype, device=x.device)
    else:
        zg = _scaled_grad(zero_point, g)
        zi = torch.round(zero_point.detach()).clamp(qmin, qmax)
        z = _slot_view(zg + (zi - zg).detach(), x, axis)
    v = x * (1.0 / s)
    rp = v + (torch.round(v) - v).detach()
    q = torch.clamp(rp + z, qmin, qmax)
    return (q - z) * s
