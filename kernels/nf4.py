"""Triton kernels for NF4 / FP4 blockwise quantization (bitsandbytes' layout), double quantization
of the block absmax, and dequantization.

Semantics: fastpeft/reference/nf4.py, bit for bit (codes, absmax, nested codes and dequantized
values EQUAL to the reference's).

Layout: a tensor of n elements read flat, in blocks of BS (even, a power of two) elements; codes
packed two a byte, element 2j in the high nibble; absmax float32 [ceil(n / BS)].

``_quantize_4bit_kernel``  a program owns R consecutive blocks, as a [R, BS / 2, 2] tile (the two
    elements of each output byte along the last axis): block absmax, v = clamp(x * div_rn(1,
    max(absmax, 1e-38)), -1, 1), code = the count of the 15 midpoints of the sorted table below v
    (then the sorted position -> code, for FP4: nibble p of the constexpr ORDER), the pair split
    and packed. Elements past n
    load as 0: the pad nibble of an odd n is the code of 0.0, as bitsandbytes pads.
``_double_quant_kernel``   a program owns R nested blocks of 256 absmax values: d = absmax - offset
    (offset = the mean, computed by the caller with torch), nested absmax, the nearest entry of the
    256-entry dynamic map by an 8-step branchless binary search over its 255 midpoints (+inf pad).
``_dequantize_4bit_kernel`` a program owns R blocks as [R, BS / 2] bytes: each block's absmax
    (double quantization: DYN[code8] * nested[b // 256] + offset, two roundings: the launch turns
    off fp fusion so no FMA merges them), the two nibbles looked up in the 16-entry table (a cached
    global load), scaled, interleaved in registers (tl.join) so the stores stay contiguous.

Offsets are int64 when an index could pass 2**31 (INT64). Kernels only: shapes, dtypes and values
are validated by the caller (fastpeft/ops/nf4.py); operands must be contiguous.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import interpreted as _interpreted

TINY = tl.constexpr(1e-38)  # the absmax floor before the reciprocal (reference.nf4.TINY)
NESTED_BLOCK = 256


@triton.jit
def _rows(pid, R: tl.constexpr, INT64: tl.constexpr):
    if INT64:
        return pid.to(tl.int64) * R + tl.arange(0, R)
    else:
        return pid * R + tl.arange(0, R)


@triton.jit
def _recip(amax):
    """div_rn(1, max(amax, 1e-38)): torch's ``1.0 / absmax.clamp(min=1e-38)``."""
    floor = tl.full(amax.shape, TINY, tl.float32)
    return tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.maximum(amax, floor))


@triton.jit
def _quantize_4bit_kernel(X, Q, ABSMAX, MID, N, NBLOCKS, NBYTES,
                          BS: tl.constexpr, R: tl.constexpr, ORDER: tl.constexpr, INT64: tl.constexpr):
    rows = _rows(tl.program_id(0), R, INT64)
    half = tl.arange(0, BS // 2)
    e0 = rows[:, None] * BS + 2 * half[None, :]  # [R, BS/2]: the even element of each byte
    e = tl.join(e0, e0 + 1)  # [R, BS/2, 2]
    x = tl.load(X + e, mask=e < N, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=2), axis=1)  # [R]
    tl.store(ABSMAX + rows, amax, mask=rows < NBLOCKS)
    inv = _recip(amax)
    v = x * inv[:, None, None]
    v = tl.where(amax[:, None, None] > 0.0, v, 0.0)  # an all-zero block: codes of 0.0 whatever 1e-38 flushes to
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    pos = tl.zeros(v.shape, tl.int32)
    for i in tl.static_range(15):
        pos += (tl.load(MID + i) < v).to(tl.int32)
    if ORDER != 0:  # the code of sorted position p: nibble p of ORDER
        code = ((tl.full(pos.shape, ORDER, tl.int64) >> (4 * pos).to(tl.int64)) & 0xF).to(tl.int32)
    else:
        code = pos
    hi, lo = tl.split(code)
    b = rows[:, None] * (BS // 2) + half[None, :]
    tl.store(Q + b, ((hi << 4) | lo).to(tl.uint8), mask=b < NBYTES)


@triton.jit
def _double_quant_kernel(A, OFFSET, Q8, NESTED, MID, NB, NNESTED,
                         R: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    rows = _rows(tl.program_id(0), R, INT64)
    e = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    m = e < NB
    off = tl.load(OFFSET)
    d = tl.where(m, tl.load(A + e, mask=m, other=0.0) - off, 0.0)
    amax = tl.max(tl.abs(d), axis=1)
    tl.store(NESTED + rows, amax, mask=rows < NNESTED)
    inv = _recip(amax)
    v = tl.where(amax[:, None] > 0.0, d * inv[:, None], 0.0)
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    pos = tl.zeros(v.shape, tl.int32)  # the count of midpoints below v: MID[255] = +inf caps it at 255
    for s in tl.static_range(8):
        step = 128 >> s
        pos = tl.where(tl.load(MID + pos + (step - 1)) < v, pos + step, pos)
    tl.store(Q8 + e, pos.to(tl.uint8), mask=m)


@triton.jit
def _dequantize_4bit_kernel(D, SCALE, NESTED, OFFSET, CODE, DYN, Y, N, NBYTES, NBLOCKS,
                            BS: tl.constexpr, R: tl.constexpr, DOUBLE: tl.constexpr, INT64: tl.constexpr,
                            NESTED_BS: tl.constexpr):
    rows = _rows(tl.program_id(0), R, INT64)
    rm = rows < NBLOCKS
    if DOUBLE:
        q8 = tl.load(SCALE + rows, mask=rm, other=0).to(tl.int32)
        s = tl.load(DYN + q8) * tl.load(NESTED + rows // NESTED_BS, mask=rm, other=0.0)
        s = s + tl.load(OFFSET)
    else:
        s = tl.load(SCALE + rows, mask=rm, other=0.0)
    half = tl.arange(0, BS // 2)
    b = rows[:, None] * (BS // 2) + half[None, :]
    d = tl.load(D + b, mask=b < NBYTES, other=0).to(tl.int32)
    hi = tl.load(CODE + (d >> 4)) * s[:, None]
    lo = tl.load(CODE + (d & 0xF)) * s[:, None]
    y = tl.reshape(tl.join(hi, lo), (R, BS))  # element 2j from the high nibble, 2j + 1 from the low
    e = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    tl.store(Y + e, y.to(Y.dtype.element_ty), mask=e < N)


# ---------------------------------------------------------------------------------------------
# host side

def _tile(block_size: int) -> int:
    """R: blocks per program (a power of two), about 4096 elements a program (1024 interpreted)."""
    target = 1024 if _interpreted() else 4096
    return max(1, target // block_size)


def _int64(n_elements: int, pad: int) -> bool:
    return n_elements + pad >= 2**31


def quantize_4bit(x, block_size: int, mids, order):
    """(packed uint8 [ceil(n / 2)], absmax float32 [blocks]) of the contiguous float tensor x;
    ``mids`` float32 [15] (the sorted table's midpoints), ``order`` the code of each sorted
    position (16 ints; None: the identity, NF4)."""
    n = x.numel()
    nb = (n + block_size - 1) // block_size
    nbytes = (n + 1) // 2
    q = _common.new_output((nbytes,), x, torch.uint8)
    absmax = _common.new_output((nb,), x, torch.float32)
    if n == 0:
        return q, absmax
    R = _tile(block_size)
    grid = (triton.cdiv(nb, R),)
    packed = 0 if order is None else sum(int(c) << (4 * i) for i, c in enumerate(order))
    _quantize_4bit_kernel[grid](x, q, absmax, mids, n, nb, nbytes, BS=block_size, R=R, ORDER=packed,
                                INT64=_int64(n, 2 * R * block_size), num_warps=8)
    return q, absmax


def double_quant(absmax, offset, dyn_mids):
    """(codes8 uint8 [blocks], nested float32 [ceil(blocks / 256)]) of the contiguous float32
    absmax with its mean ``offset`` (float32 []); ``dyn_mids`` float32 [256]: the dynamic map's
    255 midpoints and +inf."""
    nb = absmax.numel()
    n_nested = (nb + NESTED_BLOCK - 1) // NESTED_BLOCK
    q8 = _common.new_output((nb,), absmax, torch.uint8)
    nested = _common.new_output((n_nested,), absmax, torch.float32)
    if nb == 0:
        return q8, nested
    R = 1 if _interpreted() else 4
    _double_quant_kernel[(triton.cdiv(n_nested, R),)](absmax, offset, q8, nested, dyn_mids, nb, n_nested, R=R,
                                                BLOCK=NESTED_BLOCK, INT64=_int64(nb, 2 * R * NESTED_BLOCK),
                                                num_warps=4)
    return q8, nested


def dequantize_4bit(data, scale, nested, offset, code, dyn, block_size: int, shape, out_dtype):
    """y [shape] in out_dtype: code[nibble] * absmax[block] in float32, cast once. ``scale`` is the
    float32 absmax, or with ``nested`` (float32 [ceil(blocks / 256)]) and ``offset`` (float32 [])
    the uint8 double-quantized one, read through ``dyn`` (the 256-entry dynamic map). ``code``:
    the 16 float32 table values."""
    shape = tuple(shape)
    n = math.prod(shape)
    y = _common.new_output(shape, data, out_dtype)
    if n == 0:
        return y
    nb = (n + block_size - 1) // block_size
    R = _tile(block_size)
    double = nested is not None
    _dequantize_4bit_kernel[(triton.cdiv(nb, R),)](
        data, scale, nested if double else scale, offset if double else scale, code, dyn if double else code,
        y, n, (n + 1) // 2, nb, BS=block_size, R=R, DOUBLE=double, INT64=_int64(n, 2 * R * block_size),
        NESTED_BS=NESTED_BLOCK, num_warps=4, enable_fp_fusion=False)
    return y
