"""Triton kernels for fake quantization with learned scale and zero point (LSQ / LSQ+).

Semantics: fastpeft/reference/fakequant.py (y equal to the reference bit for bit; the gradients
by its formulas). The caller passes, per slot, float32 ``scale``, ``inv`` = 1 / scale (torch's
correctly rounded division) and ``zint`` = clamp(round(zero_point), qmin, qmax).

x (contiguous) is viewed as [A, C, B] with the slot dim C in the middle (per tensor: A = C = 1,
B = numel); r = a * B + b runs over the R = A * B elements of each slot. A program owns
BLOCK_C slots and R_SPLIT of their elements, in [BLOCK_C, BLOCK_R] tiles (B > 1: along r is
contiguous) or [BLOCK_R, BLOCK_C] tiles (C_FAST, B == 1: the slot dim is the last one).
``_fwd_kernel``  one pass over x: y, and per program a flag: 1 if it read a NaN or inf x (the
    op checks the flags on the device instead of a second pass over x).
``_bwd_kernel``  one pass over x and dy: dx, and per program the partial sums of the ds and dz
    terms of its slots ([SPLITS, C]); the host sums the SPLITS partials (no atomics).
Per element: v = x * inv, clamped to [qmin - z - 1, qmax - z + 1] before rint (integer bounds:
the same inside test and codes, and |v| small for the interpreter's magic-number rint);
t = rint(v) + z; inside = qmin <= t <= qmax; q = clamp(t); a NaN x gives code 0, outside.

Kernels only: shapes, dtypes and arguments are validated by the caller.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import interpreted as _interpreted
from ._common import rint as _rint


@triton.jit
def _tile(pid_c, r0, R, C, B, C_FAST: tl.constexpr, INT64: tl.constexpr,
          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(element offsets, mask, slot indices broadcast to the tile, slot mask) of one tile."""
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rs = r0 + tl.arange(0, BLOCK_R)
    cb = cs * B
    if INT64:  # every product that can reach the element count, in 64 bits
        rs = rs.to(tl.int64)
        cb = cs.to(tl.int64) * B
    a = rs // B
    b = rs - a * B
    if C_FAST:  # [BLOCK_R, BLOCK_C]
        offs = (a * C * B + b)[:, None] + cb[None, :]
        mask = (rs < R)[:, None] & (cs < C)[None, :]
        c2 = cs[None, :]
    else:       # [BLOCK_C, BLOCK_R]
        offs = cb[:, None] + (a * C * B + b)[None, :]
        mask = (cs < C)[:, None] & (rs < R)[None, :]
        c2 = cs[:, None]
    return offs, mask, c2, cs < C


@triton.jit
def _elem(x, inv, z, QMIN: tl.constexpr, QMAX: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """(v, rint(v), q as fp32, inside) of fp32 x."""
    v = x * inv
    ok = v == v
    vc = tl.minimum(tl.maximum(tl.where(ok, v, 0.0), QMIN - z - 1.0), QMAX - z + 1.0)
    r = _rint(vc, USE_LIBDEVICE)
    t = r + z
    inside = ok & (t >= QMIN) & (t <= QMAX)
    q = tl.where(ok, tl.minimum(tl.maximum(t, QMIN), QMAX), 0.0)
    return v, r, q, inside


@triton.jit
def _fwd_kernel(
    X, Y, BAD, SCALE, INV, ZINT, R, C, B, R_SPLIT,
    QMIN: tl.constexpr, QMAX: tl.constexpr, C_FAST: tl.constexpr, INT64: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_j = tl.program_id(1)
    if INT64:  # pid_j * R_SPLIT reaches R, which may pass 2**31: widen before the product
        start = pid_j.to(tl.int64) * R_SPLIT
    else:
        start = pid_j * R_SPLIT
    bad = tl.zeros((1,), tl.int32)
    for k0 in range(0, R_SPLIT, BLOCK_R):
        offs, mask, c2, cmask = _tile(pid_c, start + k0, R, C, B, C_FAST, INT64, BLOCK_R, BLOCK_C)
        s = tl.load(SCALE + c2, mask=c2 < C, other=1.0)
        inv = tl.load(INV + c2, mask=c2 < C, other=1.0)
        z = tl.load(ZINT + c2, mask=c2 < C, other=0.0)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        v, r, q, inside = _elem(x, inv, z, QMIN, QMAX, USE_LIBDEVICE)
        y = (q - z) * s
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        finite = tl.abs(x) < float("inf")  # False for NaN and +-inf (masked lanes hold 0)
        bad = tl.maximum(bad, tl.max(tl.max(tl.where(finite, 0, 1), axis=1), axis=0))
    tl.store(BAD + pid_c * tl.num_programs(1) + pid_j + tl.arange(0, 1), bad)


@triton.jit
def _bwd_kernel(
    X, DY, DX, PDS, PDZ, SCALE, INV, ZINT, R, C, B, R_SPLIT,
    QMIN: tl.constexpr, QMAX: tl.constexpr, C_FAST: tl.constexpr, INT64: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_j = tl.program_id(1)
    if INT64:  # pid_j * R_SPLIT reaches R, which may pass 2**31: widen before the product
        start = pid_j.to(tl.int64) * R_SPLIT
    else:
        start = pid_j * R_SPLIT
    if C_FAST:
        acc_s = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        acc_z = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    else:
        acc_s = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        acc_z = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
    for k0 in range(0, R_SPLIT, BLOCK_R):
        offs, mask, c2, cmask = _tile(pid_c, start + k0, R, C, B, C_FAST, INT64, BLOCK_R, BLOCK_C)
        s = tl.load(SCALE + c2, mask=c2 < C, other=1.0)
        inv = tl.load(INV + c2, mask=c2 < C, other=1.0)
        z = tl.load(ZINT + c2, mask=c2 < C, other=0.0)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        v, r, q, inside = _elem(x, inv, z, QMIN, QMAX, USE_LIBDEVICE)
        tl.store(DX + offs, tl.where(inside, dy, 0.0).to(DX.dtype.element_ty), mask=mask)
        dym = tl.where(mask, dy, 0.0)
        acc_s += dym * tl.where(inside, r - v, q - z)
        acc_z += dym * tl.where(inside, 0.0, -s)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if C_FAST:
        ps = tl.sum(acc_s, axis=0)
        pz = tl.sum(acc_z, axis=0)
    else:
        ps = tl.sum(acc_s, axis=1)
        pz = tl.sum(acc_z, axis=1)
    tl.store(PDS + pid_j * C + cs, ps, mask=cs < C)
    tl.store(PDZ + pid_j * C + cs, pz, mask=cs < C)


# ---------------------------------------------------------------------------------------------
# host side




def _geometry(shape: tuple[int, ...], axis: int | None) -> tuple[int, int, int]:
    """(A, C, B) of the [A, C, B] view."""
    n = math.prod(shape)
    if axis is None:
        return 1, 1, n
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _config(A: int, C: int, B: int, device: torch.device) -> dict:
    """Grid and block sizes: about 4 waves of programs on the GPU, a few programs interpreted."""
    R = A * B
    c_fast = B == 1 and C > 1
    interp = _interpreted()
    if c_fast:
        block_c = min(triton.next_power_of_2(C), 128)
        block_r = max(1, min(triton.next_power_of_2(R), (64 if interp else 2048) // block_c))
    else:
        block_r = min(triton.next_power_of_2(R), 64 if interp else 1024)
        block_c = max(1, min(triton.next_power_of_2(C), (64 if interp else 2048) // block_r))
    c_blocks = triton.cdiv(C, block_c)
    r_blocks = triton.cdiv(R, block_r)
    target = 3 if interp else 4 * _common.sm_count(device)
    splits_wanted = max(1, triton.cdiv(target, c_blocks))
    r_split = block_r * triton.cdiv(r_blocks, min(r_blocks, splits_wanted))
    splits = triton.cdiv(R, r_split)
    warps = 4 if block_r * block_c <= 1024 else 8
    return dict(R=R, C=C, B=B, r_split=r_split, splits=splits, grid=(c_blocks, splits), c_fast=c_fast,
                block_r=block_r, block_c=block_c, warps=warps)


def _launch_setup(x, axis, bits_range):
    shape = tuple(x.shape)
    A, C, B = _geometry(shape, axis)
    cfg = _config(A, C, B, x.device)
    qmin, qmax = bits_range
    n = math.prod(shape)
    extra = (cfg["block_r"] + 1) * max(cfg["block_c"], 1) * B
    const = dict(QMIN=float(qmin), QMAX=float(qmax), C_FAST=cfg["c_fast"], INT64=n + extra >= 2**31,
                 USE_LIBDEVICE=not _interpreted(), BLOCK_R=cfg["block_r"], BLOCK_C=cfg["block_c"])
    return cfg, const


def fake_quantize_fwd(x: torch.Tensor, scale: torch.Tensor, inv: torch.Tensor, zint: torch.Tensor,
                      qrange: tuple[int, int], axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y like x, bad): y = (clamp(rint(x * inv) + zint, qmin, qmax) - zint) * scale, cast to x's
    dtype; bad int32 [programs], 1 where a program read a NaN or inf in x, else 0.

    x contiguous fp32/fp16/bf16 with >= 1 element; scale, inv, zint contiguous float32 [slots]."""
    y = _common.new_output(tuple(x.shape), x, x.dtype)
    cfg, const = _launch_setup(x, axis, qrange)
    bad = _common.new_output((cfg["grid"][0] * cfg["grid"][1],), x, torch.int32)
    _fwd_kernel[cfg["grid"]](
        x, y, bad, scale, inv, zint, cfg["R"], cfg["C"], cfg["B"], cfg["r_split"],
        num_warps=cfg["warps"], **const)
    return y, bad


def fake_quantize_bwd(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, inv: torch.Tensor,
                      zint: torch.Tensor, qrange: tuple[int, int], axis: int | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, ds_sum float32 [slots], dz_sum float32 [slots]): the straight-through dx and the
    per-slot sums of dy * (inside ? rint(v) - v : q - zint) and dy * (inside ? 0 : -scale),
    before LSQ's gradient scale. dy contiguous, x's shape (any float dtype)."""
    dx = _common.new_output(tuple(x.shape), x, x.dtype)
    cfg, const = _launch_setup(x, axis, qrange)
    pds = _common.new_output((cfg["splits"], cfg["C"]), x, torch.float32)
    pdz = _common.new_output((cfg["splits"], cfg["C"]), x, torch.float32)
    _bwd_kernel[cfg["grid"]](
        x, dy, dx, pds, pdz, scale, inv, zint, cfg["R"], cfg["C"], cfg["B"], cfg["r_split"],
        num_warps=cfg["warps"], **const)
    return dx, pds.sum(0), pdz.sum(0)
