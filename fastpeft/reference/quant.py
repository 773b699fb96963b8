"""Reference absmax and zero-point quantization: the specification the quant kernels follow.

Granularity (one scale per "slot"):
  axis=None, group_size=None   one slot for the whole tensor
  axis=k                       one slot per index along dim k (per channel)
  group_size=g                 slots of g consecutive elements along the last dim
                               (the last dim must be a multiple of g)

Schemes, with b = bits in {8, 4}; lo and hi are the min and max of each slot:
  absmax     qmax = 2**(b-1) - 1;  scale = max(|lo|, |hi|) / qmax
             q = clamp(round(x / scale), -qmax, qmax)            signed codes, zero_point = 0
  zeropoint  qmax = 2**b - 1;      lo' = min(lo, 0), hi' = max(hi, 0)  (0 stays representable)
             scale = (hi' - lo') / qmax;  zero_point = clamp(round(-lo' / scale), 0, qmax)
             q = clamp(round(x / scale) + zero_point, 0, qmax)   unsigned codes
  dequantize: x' = (q - zero_point) * scale, so 0.0 maps to exactly 0.0.
A slot whose scale would be 0 (all zeros) gets scale 1. round() is half-to-even; x / scale is
computed as x * (1 / scale) in float32. A NaN in a slot makes that slot's scale NaN and its
codes 0; other slots are unaffected.

Edges of the float32 range, the same in every backend:
  * hi' - lo' overflows to inf when the slot spans more than the float32 range (e.g.
    [-3e38, 3e38]); the scale is then 2 * ((hi' / 2 - lo' / 2) / qmax): halving is exact at
    that magnitude, so this is the correctly rounded (hi' - lo') / qmax, finite.
  * a scale below MIN_SCALE (the smallest normal float32, 2**-126: a slot whose range is
    subnormal-sized) is raised to MIN_SCALE, so 1 / scale is finite (0.0 still gives code
    zero_point and dequantizes to 0.0) and x / scale keeps float32's relative precision. Such a
    slot uses fewer than all its codes.
  * dequantize saturates: (q - zero_point) * scale is clamped to the output dtype's largest
    finite value before the cast (a NaN slot stays NaN). Rounding zero_point to an integer moves
    the end of the code grid up to scale / 2 past the slot's range, which for data at the
    dtype's max (float16's 65504, float32's 3.4e38) lies beyond it: saturation keeps that end
    finite and within the bound below.
Error bound, for finite x: w = dequantize(quantize(x)) in float32 satisfies
|w - x| <= scale * (1/2 + 2**-13) elementwise (scale / 2 from the rounding to a code, and at
most qmax * 2**-21 * scale from the float32 rounding of x * (1 / scale) and of the product;
qmax * 2**-21 < 2**-13). A float16 / bfloat16 w is that float32 value saturated and rounded
to the dtype.

Codes are stored as int8 (absmax) or uint8 (zeropoint); 4-bit codes are packed two per byte
along the last dim, element 2j in the low nibble and 2j+1 in the high one (absmax nibbles in
two's complement), an odd last dim padded with a zero code.
"""
from __future__ import annotations

import math

import torch

SCHEMES = ("absmax", "zeropoint")
MIN_SCALE = torch.finfo(torch.float32).tiny  # 2**-126, the smallest normal float32
ERROR_BOUND = 0.5 + 2.0**-13  # |dequantize(quantize(x)) - x| <= ERROR_BOUND * scale (float32)


def qrange(bits: int, scheme: str) -> tuple[int, int]:
    """(lowest, highest) code."""
    if scheme == "absmax":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def slot_view(x: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    """x as [slots, elements per slot] (a copy when axis is not the first dim)."""
    if group_size is not None:
        return x.reshape(x.numel() // group_size, group_size)
    if axis is None:
        return x.reshape(1, x.numel())
    moved = x.movedim(axis, 0)  # sizes spelled out: a 0-size dim makes -1 ambiguous
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))


def slot_shape(shape: torch.Size, axis: int | None, group_size: int | None) -> tuple[int, ...]:
    """The shape of scale and zero_point."""
    if group_size is not None:
        return (*shape[:-1], shape[-1] // group_size)
    if axis is None:
        return ()
    return (shape[axis],)


def compute_qparams(x: torch.Tensor, bits: int, scheme: str, axis: int | None = None,
                    group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32), both of ``slot_shape``."""
    s = slot_view(x.float(), axis, group_size)
    if s.shape[1] == 0:  # empty slots: nothing to scale
        s = s.new_zeros(s.shape[0], 1)
    lo, hi = s.amin(dim=1), s.amax(dim=1)
    nan = torch.isnan(s).any(dim=1)
    qmin, qmax = qrange(bits, scheme)
    if scheme == "absmax":
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = range_over(lo, hi, qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = scale.clamp(min=MIN_SCALE)  # NaN stays NaN
    scale = torch.where(nan, torch.full_like(scale, float("nan")), scale)
    if scheme == "zeropoint":
        zp = torch.round(-lo * (1.0 / scale)).nan_to_num(0.0).clamp(qmin, qmax).to(torch.int32)
    shape = slot_shape(x.shape, axis, group_size)
    return scale.reshape(shape), zp.reshape(shape)


def range_over(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> torch.Tensor:
    """float32 (hi - lo) / qmax for lo <= 0 <= hi, correctly rounded even where hi - lo
    overflows float32: there both halves are huge, so halving them is exact, and
    2 * ((hi / 2 - lo / 2) / qmax) is the same rounding of the same quotient."""
    d = hi - lo
    halved = 2.0 * ((0.5 * hi - 0.5 * lo) / qmax)
    return torch.where(torch.isinf(d), halved, d / qmax)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, scheme: str,
                   axis: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """Unpacked codes (int32) of x, same shape as x."""
    s = slot_view(x.float(), axis, group_size)
    inv = (1.0 / scale.reshape(-1, 1))
    qmin, qmax = qrange(bits, scheme)
    q = torch.round(s * inv) + zero_point.reshape(-1, 1).float()
    q = q.nan_to_num(0.0).clamp(qmin, qmax).to(torch.int32)
    if group_size is not None or axis is None:
        return q.reshape(x.shape)
    moved = list(x.movedim(axis, 0).shape)
    return q.reshape(moved).movedim(0, axis)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     axis: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """float32 (q - zero_point) * scale for unpacked codes q."""
    if group_size is not None:
        g = q.reshape(-1, group_size).float()
        out = (g - zero_point.reshape(-1, 1).float()) * scale.reshape(-1, 1)
        return out.reshape(q.shape)
    if axis is None:
        return (q.float() - zero_point.float()) * scale
    view = [1] * q.dim()
    view[axis] = q.shape[axis]
    return (q.float() - zero_point.reshape(view).float()) * scale.reshape(view)


def saturate(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 y clamped to ``dtype``'s finite range (NaN stays NaN): the cast then cannot
    overflow to inf."""
    top = torch.finfo(dtype).max
    return y.clamp(-top, top)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None,
               group_size: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized tensor in ``dtype``: ``dequantize_codes`` in float32, saturated, cast."""
    return saturate(dequantize_codes(q, scale, zero_point, axis, group_size), dtype).to(dtype)


def pack4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per uint8 along the last dim (low nibble first; odd length padded)."""
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nib = (q & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack4(packed: torch.Tensor, last: int, signed: bool) -> torch.Tensor:
    """int32 codes [..., last] from ``pack4`` output (two's complement nibbles when signed)."""
    p = packed.to(torch.int32)
    q = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    q = q[..., :last]
    return torch.where(q > 7, q - 16, q) if signed else q
