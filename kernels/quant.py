"""Triton kernels for absmax and zero-point quantization (8 and 4 bits) and dequantization.

Semantics: fastpeft/reference/quant.py, bit for bit (scale, zero point and codes are EQUAL to the
reference's; dequantize computes the reference's fp32 ``(q - zp) * scale`` then casts).

Per slot (lo, hi = min, max; NaN flag), in fp32 as the reference evaluates it under torch:
  absmax     scale = div_rn(max(|lo|, |hi|), qmax)                 (torch: an exact division)
  zeropoint  scale = div_rn(hi' - lo', qmax), hi' = max(hi, 0), lo' = min(lo, 0); where
             hi' - lo' overflows to inf, 2 * div_rn(hi' / 2 - lo' / 2, qmax) (the same rounding)
  scale 0 -> 1, below MIN_SCALE -> MIN_SCALE, NaN slot -> NaN; inv = div_rn(1, scale) (torch's
  ``1.0 / scale``);
  zp = rint(clamp(nan->0(-min(lo, 0) * inv), 0, qmax));
  code = clamp(rint(x * inv) + zp, qmin, qmax) with a NaN product giving code 0 (nan_to_num).
  dequantize: (q - zp) * scale in fp32, clamped to the output dtype's finite range, cast.
  Clamping the product to [qmin - zp, qmax - zp] before rint is the same (integer bounds, rint
  monotone) and keeps |v| small for the interpreter's magic-number rint.

Kernels:
``_group_kernel``     groups along the last dim, fused: a program owns BLOCK_S groups of
    ``x.view(S, g)`` in registers: min/max, qparams, codes (4-bit: the tile is [BLOCK_S, g/2, 2],
    split into the two nibbles and packed), one pass over x. Used for 8 bits and for 4 bits with
    an even group (odd groups straddle bytes: they take the generic path below).
``_row_stats_kernel`` partial min/max/NaN of the rows of a 2-D view [S, L] (slot = row): grid
    (row blocks, SPLITS column ranges); partials [S, SPLITS] (a NaN row writes NaN).
    Per-tensor ([1, N]), axis 0 ([C, N / C]), other axes (on ``x.movedim(axis, 0).contiguous()``,
    a copy for the statistics only; the codes kernel reads x in place), odd 4-bit groups.
``_col_stats_kernel`` partial min/max/NaN of the columns of [R, K] (axis = last dim): grid
    (column blocks, SPLITS row ranges); partials [SPLITS, K].
``_finish_kernel``    reduces the partials of each slot: scale, zero point, inv (no host sync).
``_codes_kernel``     elementwise over the output bytes (4-bit: two codes per byte), looking up
    each element's slot: tensor 0, ``e // DIV`` (axis 0, groups), ``e % MOD`` (last axis),
    ``(e // DIV) % MOD`` (middle axis), e = the flat element index.
``_dequant_kernel``   elementwise over contiguous blocks of code bytes, same slot lookup (a pair
    of nibbles shares one lookup when the group is even); the 4-bit results are interleaved in
    registers (tl.join) so the stores stay contiguous.

Kernels only: shapes, dtypes and arguments are validated by the caller (fastpeft/ops/quant.py);
the launchers take contiguous copies of strided operands (the kernels index them as dense).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import interpreted as _interpreted
from ._common import rint as _rint

# slot modes of the elementwise kernels
_TENSOR, _DIV, _MOD, _DIVMOD = 0, 1, 2, 3
# the smallest scale (reference.quant.MIN_SCALE): 2**-126, the smallest normal float32
MIN_SCALE = tl.constexpr(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _qparams(lo, hi, nan, QMAX: tl.constexpr, ABSMAX: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """(scale, inv, zp as fp32) of slots with min lo, max hi and NaN flag ``nan`` (bool)."""
    qmax = tl.full(lo.shape, QMAX, tl.float32)
    if ABSMAX:
        scale = tl.math.div_rn(tl.maximum(tl.abs(lo), tl.abs(hi)), qmax)
        lo2 = lo
    else:
        lo2 = tl.minimum(lo, 0.0)
        hi2 = tl.maximum(hi, 0.0)
        d = hi2 - lo2
        halved = 2.0 * tl.math.div_rn(0.5 * hi2 - 0.5 * lo2, qmax)  # exact halves where d overflows
        scale = tl.where(d == float("inf"), halved, tl.math.div_rn(d, qmax))
    scale = tl.where(scale == 0.0, 1.0, scale)
    scale = tl.where(scale < MIN_SCALE, MIN_SCALE, scale)
    scale = tl.where(nan, float("nan"), scale)
    inv = tl.math.div_rn(tl.full(lo.shape, 1.0, tl.float32), scale)
    if ABSMAX:
        zp = tl.zeros(lo.shape, tl.float32)
    else:
        t = -lo2 * inv
        t = tl.where(t == t, t, 0.0)
        zp = _rint(tl.minimum(tl.maximum(t, 0.0), QMAX), USE_LIBDEVICE)
    return scale, inv, zp


@triton.jit
def _codes(x, inv, zp, QMIN: tl.constexpr, QMAX: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """int32 codes of fp32 x: clamp(rint(x * inv) + zp, QMIN, QMAX), 0 where the product is NaN."""
    v = x * inv
    ok = v == v
    v = tl.minimum(tl.maximum(tl.where(ok, v, 0.0), QMIN - zp), QMAX - zp)
    q = _rint(v, USE_LIBDEVICE) + zp
    return tl.where(ok, q, 0.0).to(tl.int32)


@triton.jit
def _slot(e, DIV, MOD, SLOT_MODE: tl.constexpr, GROUP: tl.constexpr):
    if SLOT_MODE == 1:
        if GROUP > 0:
            return e // GROUP
        else:
            return e // DIV
    elif SLOT_MODE == 2:
        return e % MOD
    else:
        return (e // DIV) % MOD


@triton.jit
def _elements(u, m, K, P, FOUR_BIT: tl.constexpr, EVEN: tl.constexpr):
    """(e0, e, mask) of the elementwise kernels' units u (valid where m): 8-bit, unit = element
    (e0 = e = u); 4-bit, unit = code byte = elements (e0, e0 + 1) of one row, e [BLOCK, 2],
    the pad element of an odd last dim masked."""
    if FOUR_BIT:
        if EVEN:
            e0 = 2 * u
            c0 = e0
        else:
            r = u // P
            c0 = 2 * (u - r * P)
            e0 = r * K + c0
        t = tl.arange(0, 2)[None, :]
        e = e0[:, None] + t
        if EVEN:
            mask = m[:, None] & (t < 2)
        else:
            mask = m[:, None] & ((c0[:, None] + t) < K)
        return e0, e, mask
    else:
        return u, u, m


@triton.jit
def _slot_params(PARAM, ZP, e0, e, m, mask, DIV, MOD, OTHER, SLOT_MODE: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZP: tl.constexpr, FOUR_BIT: tl.constexpr, PAIR_SAME: tl.constexpr):
    """(param, zero point as fp32) of each element's slot: PARAM is the codes kernel's inv or the
    dequantize kernel's scale (OTHER where masked); a pair of nibbles shares one lookup when
    PAIR_SAME."""
    if SLOT_MODE == 0:
        p = tl.load(PARAM)
        if HAS_ZP:
            zp = tl.load(ZP).to(tl.float32)
        else:
            zp = 0.0
    else:
        if FOUR_BIT and PAIR_SAME:
            s = _slot(e0, DIV, MOD, SLOT_MODE, GROUP)[:, None]
            smask = m[:, None]
        else:
            s = _slot(e, DIV, MOD, SLOT_MODE, GROUP)
            smask = mask
        p = tl.load(PARAM + s, mask=smask, other=OTHER)
        if HAS_ZP:
            zp = tl.load(ZP + s, mask=smask, other=0).to(tl.float32)
        else:
            zp = 0.0
    return p, zp


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _group_kernel(
    X, Q, SCALE, ZP, S,
    G: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, ABSMAX: tl.constexpr,
    FOUR_BIT: tl.constexpr, USE_LIBDEVICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = rows < S
    base = rows.to(tl.int64) * G
    if FOUR_BIT:  # [BLOCK_S, BLOCK_G / 2, 2]: element 2h + t of each group
        h = tl.arange(0, BLOCK_G // 2)
        t = tl.arange(0, 2)
        col = 2 * h[None, :, None] + t[None, None, :]
        mask = mask_s[:, None, None] & (col < G)
        x = tl.load(X + base[:, None, None] + col, mask=mask, other=0.0).to(tl.float32)
        lo = tl.min(tl.min(tl.where(mask, x, float("inf")), axis=2), axis=1)
        hi = tl.max(tl.max(tl.where(mask, x, float("-inf")), axis=2), axis=1)
        nan = tl.max(tl.max((x != x).to(tl.int32), axis=2), axis=1) > 0
    else:
        col = tl.arange(0, BLOCK_G)[None, :]
        mask = mask_s[:, None] & (col < G)
        x = tl.load(X + base[:, None] + col, mask=mask, other=0.0).to(tl.float32)
        lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
        hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    scale, inv, zp = _qparams(lo, hi, nan, QMAX, ABSMAX, USE_LIBDEVICE)
    tl.store(SCALE + rows, scale, mask=mask_s)
    tl.store(ZP + rows, zp.to(tl.int32), mask=mask_s)
    if FOUR_BIT:
        q = _codes(x, inv[:, None, None], zp[:, None, None], QMIN, QMAX, USE_LIBDEVICE)
        q0, q1 = tl.split(q)
        byte = ((q0 & 0xF) | ((q1 & 0xF) << 4)).to(tl.uint8)
        tl.store(Q + rows[:, None].to(tl.int64) * (G // 2) + h[None, :], byte,
                 mask=mask_s[:, None] & (h < G // 2)[None, :])
    else:
        q = _codes(x, inv[:, None], zp[:, None], QMIN, QMAX, USE_LIBDEVICE)
        tl.store(Q + base[:, None] + col, q.to(Q.dtype.element_ty), mask=mask)


@triton.jit
def _row_stats_kernel(X, PLO, PHI, S, L, L_SPLIT, SPLITS, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = rows < S
    x_row = X + rows[:, None].to(tl.int64) * L
    offs = tl.arange(0, BLOCK_L)
    lo = tl.full((BLOCK_S,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    nan = tl.zeros((BLOCK_S,), tl.int32)
    start = pid_j.to(tl.int64) * L_SPLIT
    for k0 in range(0, L_SPLIT, BLOCK_L):
        cols = start + k0 + offs
        mask = mask_s[:, None] & (cols < L)[None, :]
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=1))
        nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), axis=1))
    lo = tl.where(nan > 0, float("nan"), lo)
    hi = tl.where(nan > 0, float("nan"), hi)
    tl.store(PLO + rows * SPLITS + pid_j, lo, mask=mask_s)
    tl.store(PHI + rows * SPLITS + pid_j, hi, mask=mask_s)


@triton.jit
def _col_stats_kernel(X, PLO, PHI, R, K, R_SPLIT, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_j = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = cols < K
    offs = tl.arange(0, BLOCK_R)
    lo = tl.full((BLOCK_K,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    nan = tl.zeros((BLOCK_K,), tl.int32)
    start = pid_j * R_SPLIT
    for r0 in range(0, R_SPLIT, BLOCK_R):
        rows = start + r0 + offs
        mask = (rows < R)[:, None] & mask_k[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), axis=0))
    lo = tl.where(nan > 0, float("nan"), lo)
    hi = tl.where(nan > 0, float("nan"), hi)
    tl.store(PLO + pid_j * K + cols, lo, mask=mask_k)
    tl.store(PHI + pid_j * K + cols, hi, mask=mask_k)


@triton.jit
def _finish_kernel(
    PLO, PHI, SCALE, ZP, INV, S, SPLITS, s_slot, s_split,
    QMAX: tl.constexpr, ABSMAX: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = slots < S
    offs = tl.arange(0, BLOCK_P)
    lo = tl.full((BLOCK_S,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    nan = tl.zeros((BLOCK_S,), tl.int32)
    for p0 in range(0, SPLITS, BLOCK_P):
        p = p0 + offs
        mask = mask_s[:, None] & (p < SPLITS)[None, :]
        off = slots[:, None] * s_slot + p[None, :] * s_split
        a = tl.load(PLO + off, mask=mask, other=float("inf"))
        b = tl.load(PHI + off, mask=mask, other=float("-inf"))
        nan = tl.maximum(nan, tl.max((a != a).to(tl.int32), axis=1))
        lo = tl.minimum(lo, tl.min(tl.where(a == a, a, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(b == b, b, float("-inf")), axis=1))
    scale, inv, zp = _qparams(lo, hi, nan > 0, QMAX, ABSMAX, USE_LIBDEVICE)
    tl.store(SCALE + slots, scale, mask=mask_s)
    tl.store(ZP + slots, zp.to(tl.int32), mask=mask_s)
    tl.store(INV + slots, inv, mask=mask_s)


@triton.jit
def _codes_kernel(
    X, Q, INV, ZP, N_UNITS, K, P, DIV, MOD,
    SLOT_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, QMIN: tl.constexpr,
    QMAX: tl.constexpr, FOUR_BIT: tl.constexpr, EVEN: tl.constexpr, PAIR_SAME: tl.constexpr,
    INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, RECIP: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        u = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        u = pid * BLOCK + tl.arange(0, BLOCK)
    m = u < N_UNITS
    e0, e, mask = _elements(u, m, K, P, FOUR_BIT, EVEN)
    inv, zp = _slot_params(INV, ZP, e0, e, m, mask, DIV, MOD, 1.0, SLOT_MODE, GROUP, HAS_ZP, FOUR_BIT,
                           PAIR_SAME)
    if RECIP:  # INV holds the scale itself: inv = 1 / scale as torch's ``1.0 / scale`` rounds it
        inv = tl.math.div_rn(1.0, inv)
    x = tl.load(X + e, mask=mask, other=0.0).to(tl.float32)
    q = _codes(x, inv, zp, QMIN, QMAX, USE_LIBDEVICE)
    if FOUR_BIT:
        q = tl.where(mask, q, 0)  # the pad code of an odd last dim is 0
        q0, q1 = tl.split(q)
        tl.store(Q + u, ((q0 & 0xF) | ((q1 & 0xF) << 4)).to(tl.uint8), mask=m)
    else:
        tl.store(Q + u, q.to(Q.dtype.element_ty), mask=m)


@triton.jit
def _dequant_kernel(
    D, SCALE, ZP, Y, N_UNITS, K, P, DIV, MOD,
    SLOT_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, SIGNED: tl.constexpr,
    FOUR_BIT: tl.constexpr, EVEN: tl.constexpr, PAIR_SAME: tl.constexpr, INT64: tl.constexpr,
    TOP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        u = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        u = pid * BLOCK + tl.arange(0, BLOCK)
    m = u < N_UNITS
    d = tl.load(D + u, mask=m, other=0)
    if FOUR_BIT:
        b = d.to(tl.int32)
        if SIGNED:  # two's complement nibbles: arithmetic shifts sign-extend
            n0 = (b << 28) >> 28
            n1 = (b << 24) >> 28
        else:
            n0 = b & 0xF
            n1 = b >> 4
        q = tl.join(n0, n1).to(tl.float32)  # [BLOCK, 2]
    else:
        q = d.to(tl.float32)
    e0, e, mask = _elements(u, m, K, P, FOUR_BIT, EVEN)
    sc, zp = _slot_params(SCALE, ZP, e0, e, m, mask, DIV, MOD, 0.0, SLOT_MODE, GROUP, HAS_ZP, FOUR_BIT,
                          PAIR_SAME)
    y = (q - zp) * sc
    y = tl.where(y > TOP, TOP, tl.where(y < -TOP, -TOP, y))  # saturate (NaN compares false: stays)
    tl.store(Y + e, y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side



def _qrange(bits: int, scheme: str) -> tuple[int, int]:
    if scheme == "absmax":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _slot_shape(shape, axis, group_size) -> tuple[int, ...]:
    if group_size is not None:
        return (*shape[:-1], shape[-1] // group_size)
    if axis is None:
        return ()
    return (shape[axis],)


def _data_shape(shape, bits) -> tuple[int, ...]:
    return tuple(shape) if bits == 8 else (*shape[:-1], (shape[-1] + 1) // 2)


def _slot_mode(shape, axis, group_size) -> tuple[int, int, int, int]:
    """(SLOT_MODE, DIV, MOD, GROUP) of the elementwise kernels: slot of the flat element e."""
    if group_size is not None:
        return _DIV, group_size, 1, group_size
    if axis is None:
        return _TENSOR, 1, 1, 0
    inner = math.prod(shape[axis + 1:])
    if axis == 0:
        return _DIV, max(inner, 1), 1, 0
    if axis == len(shape) - 1:
        return _MOD, 1, shape[axis], 0
    return _DIVMOD, max(inner, 1), shape[axis], 0


def _units(shape, bits) -> tuple[int, int, int, bool]:
    """(units, K, P, EVEN): the elementwise kernels run over bytes of the code tensor."""
    K = shape[-1]
    P = K if bits == 8 else (K + 1) // 2
    rows = math.prod(shape[:-1])
    return rows * P, K, P, bits == 8 or K % 2 == 0


def _elementwise_config(bits: int) -> tuple[int, int]:
    """(BLOCK units, num_warps): contiguous blocks of code bytes per program."""
    if _interpreted():
        return 64, 4
    return (2048, 8) if bits == 8 else (1024, 8)


def _stats(x2: torch.Tensor, S: int, L: int, by_col: bool, bits: int, scheme: str,
           scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """Fills scale and zp (flat, [S]) from the min/max of the rows (or columns) of x2 [.., L];
    returns inv [S]."""
    interp = _interpreted()
    inv = _common.new_output((S,), x2, torch.float32)
    if by_col:  # x2 [R, S]: slot = column
        R = L
        block_k = 16 if interp else min(128, max(16, triton.next_power_of_2(S)))
        block_r = 8 if interp else 32
        kb = triton.cdiv(S, block_k)
        want = 4 if interp else max(1, 528 // kb)
        splits = max(1, min(want, triton.cdiv(R, block_r)))
        r_split = triton.cdiv(triton.cdiv(R, block_r), splits) * block_r
        splits = triton.cdiv(R, r_split)
        plo = _common.new_output((splits, S), x2, torch.float32)
        phi = _common.new_output((splits, S), x2, torch.float32)
        _col_stats_kernel[(kb, splits)](x2, plo, phi, R, S, r_split, BLOCK_R=block_r, BLOCK_K=block_k,
                                        num_warps=4)
        s_slot, s_split = 1, S
    else:  # x2 [S, L]: slot = row
        block_l = 16 if interp else min(2048, max(128, triton.next_power_of_2(L)))
        block_s = 2 if interp else max(1, min(triton.next_power_of_2(S), 4096 // block_l))
        sb = triton.cdiv(S, block_s)
        want = 4 if interp else max(1, 528 // sb)
        splits = max(1, min(want, triton.cdiv(L, block_l)))
        l_split = triton.cdiv(triton.cdiv(L, block_l), splits) * block_l
        splits = triton.cdiv(L, l_split)
        plo = _common.new_output((S, splits), x2, torch.float32)
        phi = _common.new_output((S, splits), x2, torch.float32)
        _row_stats_kernel[(sb, splits)](x2, plo, phi, S, L, l_split, splits, BLOCK_S=block_s, BLOCK_L=block_l,
                                        num_warps=4 if block_s * block_l <= 2048 else 8)
        s_slot, s_split = splits, 1
    block_s = 16 if interp else 128
    block_p = 4 if interp else min(32, triton.next_power_of_2(splits))
    _, qmax = _qrange(bits, scheme)
    _finish_kernel[(triton.cdiv(S, block_s),)](
        plo, phi, scale, zp, inv, S, splits, s_slot, s_split,
        QMAX=float(qmax), ABSMAX=scheme == "absmax", USE_LIBDEVICE=not interp,
        BLOCK_S=block_s, BLOCK_P=block_p, num_warps=4)
    return inv


def quantize(x: torch.Tensor, bits: int, scheme: str, axis: int | None, group_size: int | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data, scale, zero_point) of contiguous x (fp32/fp16/bf16, >= 1 dim), equal to the reference's.

    scale float32 and zero_point int32 of ``slot_shape`` (groups: [..., last / g]; axis k:
    [shape[k]]; tensor: []). data: the codes in x's layout, int8 (absmax, 8 bits), uint8
    (zeropoint, 8 bits) or, for 4 bits, uint8 [..., ceil(last / 2)] packed as ``pack4`` (low
    nibble = even element, absmax nibbles in two's complement, odd last dim padded with code 0).
    An empty x gives empty data and scale 1 / zero point 0 for its (element-less) slots.
    A strided x is read through a contiguous copy.
    """
    x = x.contiguous()
    shape = tuple(x.shape)
    qmin, qmax = _qrange(bits, scheme)
    absmax = scheme == "absmax"
    data = _common.new_output(_data_shape(shape, bits), x, torch.int8 if (bits == 8 and absmax) else torch.uint8)
    sshape = _slot_shape(shape, axis, group_size)
    scale = _common.new_output(sshape, x, torch.float32)
    zp = _common.new_output(sshape, x, torch.int32)
    if x.numel() == 0:
        scale.fill_(1.0)
        zp.zero_()
        return data, scale, zp
    interp = _interpreted()
    N = x.numel()
    S = max(1, math.prod(sshape))
    if group_size is not None and (bits == 8 or group_size % 2 == 0) and (interp or group_size <= 4096):
        g = group_size
        block_g = max(2, triton.next_power_of_2(g))
        block_s = 4 if interp else max(1, min(64, 4096 // block_g, triton.next_power_of_2(S)))
        _group_kernel[(triton.cdiv(S, block_s),)](
            x, data, scale, zp, S, G=g, QMIN=float(qmin), QMAX=float(qmax), ABSMAX=absmax,
            FOUR_BIT=bits == 4, USE_LIBDEVICE=not interp, BLOCK_S=block_s, BLOCK_G=block_g,
            num_warps=4 if block_s * block_g <= 2048 else 8)
        return data, scale, zp
    if group_size is not None:  # odd 4-bit groups (or huge ones): slots are rows of [S, g]
        inv = _stats(x, S, group_size, False, bits, scheme, scale, zp)
    elif axis is None:
        inv = _stats(x, 1, N, False, bits, scheme, scale, zp)
    elif axis == len(shape) - 1 and len(shape) > 1:
        inv = _stats(x, S, N // S, True, bits, scheme, scale, zp)
    elif axis == 0:
        inv = _stats(x, S, N // S, False, bits, scheme, scale, zp)
    else:  # a middle axis: the statistics read a moved copy; the codes read x in place
        inv = _stats(x.movedim(axis, 0).contiguous(), S, N // S, False, bits, scheme, scale, zp)
    mode, div, mod, group = _slot_mode(shape, axis, group_size)
    units, K, P, even = _units(shape, bits)
    block, warps = _elementwise_config(bits)
    _codes_kernel[(triton.cdiv(units, block),)](
        x, data, inv, zp, units, K, P, div, mod,
        SLOT_MODE=mode, GROUP=group, HAS_ZP=not absmax, QMIN=float(qmin), QMAX=float(qmax),
        FOUR_BIT=bits == 4, EVEN=even, PAIR_SAME=bits == 4 and group % 2 == 0 and group > 0,
        INT64=N + 2 * block >= 2**31, USE_LIBDEVICE=not interp, BLOCK=block, RECIP=False, num_warps=warps)
    return data, scale, zp


def codes_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes [x.shape] of x with a GIVEN per-tensor absmax step (8 bits): the reference's
    ``quantize_codes(x, scale, 0, 8, "absmax")``, i.e. clamp(rint(x * (1 / scale)), -127, 127),
    NaN -> 0; ``scale`` float32 with one element, read on the device (no host sync, no extra
    launch: the kernel takes its reciprocal). Static activation quantization
    (fastpeft.quant_linear / int8_linear with an input_scale)."""
    x = x if x.is_contiguous() else x.contiguous()
    q = _common.new_output(tuple(x.shape), x, torch.int8)
    N = x.numel()
    if N == 0:
        return q
    interp = _interpreted()
    qmin, qmax = _qrange(8, "absmax")
    block, warps = _elementwise_config(8)
    _codes_kernel[(triton.cdiv(N, block),)](
        x, q, scale, scale, N, 1, 1, 1, 1,
        SLOT_MODE=_TENSOR, GROUP=0, HAS_ZP=False, QMIN=float(qmin), QMAX=float(qmax),
        FOUR_BIT=False, EVEN=True, PAIR_SAME=False,
        INT64=N + 2 * block >= 2**31, USE_LIBDEVICE=not interp, BLOCK=block, RECIP=True, num_warps=warps)
    return q


def dequantize(data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, scheme: str,
               axis: int | None, group_size: int | None, shape, out_dtype: torch.dtype) -> torch.Tensor:
    """y [shape] in out_dtype: (q - zero_point) * scale in float32, saturated to out_dtype's finite
    range, then cast (q unpacked from the 4-bit nibbles, two's complement for absmax). data, scale
    and zero_point as ``quantize`` makes them (shapes and dtypes checked by the caller; strided
    ones are read through contiguous copies)."""
    data, scale, zero_point = data.contiguous(), scale.contiguous(), zero_point.contiguous()
    shape = tuple(shape)
    y = _common.new_output(shape, data, out_dtype)
    N = math.prod(shape)
    if N == 0:
        return y
    mode, div, mod, group = _slot_mode(shape, axis, group_size)
    units, K, P, even = _units(shape, bits)
    block, warps = _elementwise_config(bits)
    absmax = scheme == "absmax"
    _dequant_kernel[(triton.cdiv(units, block),)](
        data, scale, zero_point, y, units, K, P, div, mod,
        SLOT_MODE=mode, GROUP=group, HAS_ZP=not absmax, SIGNED=absmax, FOUR_BIT=bits == 4, EVEN=even,
        PAIR_SAME=bits == 4 and group % 2 == 0 and group > 0, INT64=N + 2 * block >= 2**31,
        TOP=torch.finfo(out_dtype).max, BLOCK=block,
        num_warps=warps)
    return y
