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
``_nf4_linear_kernel``    the 4-bit linear layer (QLoRA's frozen base): y = x @ W_deq^T + bias, one
    fused dequantize-GEMM (the 4-bit tile dequantized in registers, never materialized; decode-sized
    M where the decode kernel does not apply run it with BLOCK_M 16); HAS_LORA adds QLoRA's update s * U B^T (U = dropout(x)
    A^T from kernels/lora.py's shrink) into the same accumulator. ``_nf4_linear_dx_kernel`` the
    transposed one, dx = dy @ W_deq; HAS_LORA (QLoRA's backward) starts its accumulator with
    s * dropout'(V A) (V = dy B from the shrink). Layout and tiles: the section "the 4-bit linear
    layer" below.
``_nf4_gemv_kernel``      decode (M <= DECODE_MAX_M, K whole blocks): the same layer split along K,
    the codes read as int32 words and decoded a byte at a time from a 256-entry table of nibble
    pairs, fp32 partials summed in order; M <= GEMV_MAX_M without tl.dot (a GEMV), larger M (MMA)
    with it (the section "decode" below).

Offsets are int64 when an index could pass 2**31 (INT64; the linear kernels index rows in int64).
Kernels only: shapes, dtypes and values are validated by the caller (fastpeft/ops/nf4.py); operands
must be contiguous.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import dot as _dot
from ._common import grouped_pid as _grouped_pid
from ._common import interpreted as _interpreted
from ._common import precision as _precision
from ._common import upcast as _upcast
from ._common import x_tile_start as _x_tile_start
from .lora import _drop_args
from .lora import _block_r as _rank_tile
from .lora import update_args as _update_args
from .lora import update_block_r as _block_r
from .lora import update_dx_start as _update_dx_start
from .lora import update_gemv as _update_gemv
from .lora import update_start as _update_start
from .qlinear import _gemv_split
from .qlinear import _gemv_store
from .qlinear import _qlinear_splitk_sum_kernel

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


# ---------------------------------------------------------------------------------------------
# the 4-bit linear layer: y = x @ W_deq^T + bias and dx = dy @ W_deq, dequantized in registers
#
# W [N, K] is a flat nf4 / fp4 tensor (element (n, k) is element e = n * K + k: byte e // 2, high
# nibble when e is even; block e // BS). ``_nf4_tile`` returns the float32 tile
# W_deq[offs_n, k0:k0 + BLOCK_K] (0 outside [N, K]): the codes looked up in the 16-entry table (a
# cached global gather, as ``_dequantize_4bit_kernel``), times the block absmax (double
# quantization: DYN[code8] * nested[b // 256] + offset, restored per block, two roundings: the
# launches turn off fp fusion). ALIGNED (K a multiple of BS, so rows are whole blocks and whole
# bytes): the tile's codes are [BLOCK_N, BLOCK_K / 2] contiguous bytes per row, unpacked with
# tl.join, and the absmax is one [BLOCK_N] load per tile (BS >= BLOCK_K) or [BLOCK_N, BLOCK_K /
# BS] (BS < BLOCK_K). Otherwise each element computes its byte, nibble and block from e (blocks
# straddle rows, odd K shifts the nibble parity from row to row).


@triton.jit
def _nf4_absmax(blk, mask, SCALE, NESTED, OFFSET, DYN, DOUBLE: tl.constexpr, NESTED_BS: tl.constexpr):
    """float32 absmax of blocks ``blk`` (0 where not ``mask``)."""
    if DOUBLE:
        q8 = tl.load(SCALE + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(DYN + q8) * tl.load(NESTED + blk // NESTED_BS, mask=mask, other=0.0)
        return s + tl.load(OFFSET)
    else:
        return tl.load(SCALE + blk, mask=mask, other=0.0)


@triton.jit
def _nf4_tile(DATA, SCALE, NESTED, OFFSET, CODE, DYN, offs_n, k0, N, K,
              BS: tl.constexpr, DOUBLE: tl.constexpr, ALIGNED: tl.constexpr, NESTED_BS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 W_deq[offs_n, k0 + arange(BLOCK_K)], 0 outside [N, K] (see above)."""
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    if ALIGNED:
        half = tl.arange(0, BLOCK_K // 2)
        pm = mask_n[:, None] & ((k0 + 2 * half) < K)[None, :]
        p = tl.load(DATA + n64[:, None] * (K // 2) + (k0 // 2 + half)[None, :], mask=pm, other=0).to(tl.int32)
        hi = tl.load(CODE + (p >> 4))
        lo = tl.load(CODE + (p & 15))
        # element 2j high, 2j + 1 low. Elements outside [N, K] stay finite (their x / dy are 0, or
        # they are not stored): their absmax is 0 (or the offset, double-quantized)
        w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
        KB = K // BS
        if BS >= BLOCK_K:  # the tile lies in one block of each row
            blk = n64 * KB + k0 // BS
            s = _nf4_absmax(blk, mask_n & (k0 < K), SCALE, NESTED, OFFSET, DYN, DOUBLE, NESTED_BS)
            w = w * s[:, None]
        else:
            NG: tl.constexpr = BLOCK_K // BS
            gi = k0 // BS + tl.arange(0, NG)
            blk = n64[:, None] * KB + gi[None, :]
            s = _nf4_absmax(blk, mask_n[:, None] & (gi < KB)[None, :], SCALE, NESTED, OFFSET, DYN, DOUBLE,
                            NESTED_BS)
            w = tl.reshape(tl.reshape(w, (BLOCK_N, NG, BS)) * s[:, :, None], (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = mask_n[:, None] & (offs_k < K)[None, :]
        e = n64[:, None] * K + offs_k[None, :]
        p = tl.load(DATA + (e >> 1), mask=m, other=0).to(tl.int32)
        code = (p >> (4 - 4 * (e & 1)).to(tl.int32)) & 15
        s = _nf4_absmax(e // BS, m, SCALE, NESTED, OFFSET, DYN, DOUBLE, NESTED_BS)
        w = tl.where(m, tl.load(CODE + code) * s, 0.0)
    return w


@triton.jit
def _nf4_linear_kernel(X, DATA, SCALE, NESTED, OFFSET, CODE, DYN, BIAS, Y, U, BL,
                       M, N, K, R, s_xm, s_xk, s_ym, s_yn, s_um, s_ur, s_bn, s_br, scaling,
                       BS: tl.constexpr, DOUBLE: tl.constexpr, ALIGNED: tl.constexpr, NESTED_BS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       SWAP_AB: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[BLOCK_M, BLOCK_N] = x @ W_deq^T + bias, fp32 accumulation, the weight tile dequantized in
    registers and rounded to x's dtype for tl.dot. SWAP_AB (16-bit x): the tile is computed
    transposed, y^T = W_deq @ x^T, so the dequantized weight is the dot's register operand.
    HAS_LORA (QLoRA's fused forward): + scaling * U @ B^T, U float32 [M, R] (dropout(x) A^T, from
    kernels/lora.py's shrink), B [N, R] in x's dtype; as kernels/lora.py's ``_lora_gemm_kernel``
    with U given, (U * scaling) rounded to x's dtype, dotted with the B tile, starts the
    accumulator (no second [BLOCK_M, BLOCK_N] tile live next to it); R in BLOCK_R chunks."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dt = X.dtype.element_ty
    acc, x_ptrs = _x_tile_start(X, offs_m, offs_k, s_xm, s_xk, SWAP_AB, BLOCK_M, BLOCK_N)
    if HAS_LORA:
        acc = _update_start(acc, X, U, BL, offs_m, offs_n, mask_m, mask_n, R, s_um, s_ur, s_bn, s_br, scaling,
                            SWAP_AB, UPCAST, PRECISION, BLOCK_R)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        w = _nf4_tile(DATA, SCALE, NESTED, OFFSET, CODE, DYN, offs_n, k0, N, K,
                      BS, DOUBLE, ALIGNED, NESTED_BS, BLOCK_N, BLOCK_K).to(dt)
        if SWAP_AB:
            a = tl.load(x_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
            acc = _dot(w, a, acc, UPCAST, PRECISION)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = _dot(a, tl.trans(w), acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * s_xk
    if SWAP_AB:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["thr31"])
def _nf4_linear_dx_kernel(DY, DATA, SCALE, NESTED, OFFSET, CODE, DYN, DX, V, AL,
                          M, N, K, R, s_dm, s_dn, s_xm, s_xk, s_vm, s_vr, s_ar, s_ak, scaling, drop_scale,
                          SEED, thr31,
                          BS: tl.constexpr, DOUBLE: tl.constexpr, ALIGNED: tl.constexpr, NESTED_BS: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """dx[BLOCK_M, BLOCK_K] = dy @ W_deq: the transposed dequantize-GEMM, looping over N; the
    weight tile [BLOCK_N, BLOCK_K] dequantized in registers as in the forward. Computed
    transposed, dx^T = W_deq^T @ dy^T, so the dequantized tile is the register operand.
    HAS_LORA (QLoRA's fused backward): + scaling * keep / (1 - p) * (V @ A), V float32 [M, R]
    (dy B, from kernels/lora.py's shrink), A [R, K] in dy's dtype, keep the forward's dropout mask
    at (row, col) of x (DROPOUT): the update, (V * scaling) rounded to dy's dtype and dotted with
    the A tile, masked, starts the accumulator (as kernels/lora.py's backward dx)."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    dt = DY.dtype.element_ty
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    if HAS_LORA:
        acc = _update_dx_start(acc, DY, V, AL, offs_m, offs_k, mask_m, mask_k, R, s_vm, s_vr, s_ar, s_ak, scaling,
                               drop_scale, SEED, thr31, DROPOUT, UPCAST, PRECISION, BLOCK_R)
    d_ptrs = DY + offs_n[:, None] * s_dn + offs_m[None, :].to(tl.int64) * s_dm  # dy^T [BLOCK_N, BLOCK_M]
    for n0 in range(0, N, BLOCK_N):
        w = _nf4_tile(DATA, SCALE, NESTED, OFFSET, CODE, DYN, n0 + offs_n, k0, N, K,
                      BS, DOUBLE, ALIGNED, NESTED_BS, BLOCK_N, BLOCK_K).to(dt)
        g = tl.load(d_ptrs, mask=((n0 + offs_n) < N)[:, None] & mask_m[None, :], other=0.0)
        acc = _dot(tl.trans(w), g, acc, UPCAST, PRECISION)
        d_ptrs += BLOCK_N * s_dn
    acc = tl.trans(acc)
    tl.store(DX + offs_m[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk, acc.to(DX.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


# ---------------------------------------------------------------------------------------------
# decode (M <= DECODE_MAX_M, K a multiple of the block, the codes read as int32 words): the GEMV, and
# past GEMV_MAX_M rows the same loop feeding tl.dot
#
# At decode sizes the layer is bound by the read of the packed weight and by the instructions
# that decode it, not by the multiply: ``_nf4_gemv_kernel`` runs it without tl.dot, as
# kernels/qlinear.py's ``_qlinear_gemv_kernel`` (whose module doc has the reasoning): a program
# owns BLOCK_N output features and one K range (split-K, SPLIT_K programs along K, fp32 partials
# summed in split order by kernels/qlinear.py's ``_qlinear_splitk_sum_kernel``: deterministic),
# reads its codes as [BLOCK_N, BLOCK_K / 8] int32 words with the next tile's loads in flight (a
# register prefetch: a software-pipelined tl.range also staged the dependent table gathers in
# shared memory, 126 KB a block at [16, 512]), and decodes them a byte at a time: one 8-byte
# gather from the 256-entry table of both nibbles' values (fastpeft/ops/nf4.py ``_byte_table``,
# read as int64: the low word is the high nibble's value) gives two weights, half a cached
# gather a weight where the GEMM path takes one. The weight stays fp32 and unscaled: each thread
# sums a word's 8 products table value x x in fp32 and multiplies the sum by the word's block
# absmax (blocks hold 32 or more codes: a word lies in one block; double quantization restored
# per word as in ``_nf4_absmax``), into a [BLOCK_N, words, BLOCK_M] accumulator reduced across
# threads once after the loop. The result is the reference's within fp32 rounding (products
# summed in another order, the absmax applied to a word's sum, the weight not rounded to x's
# dtype). QLoRA's update (HAS_LORA) is added by split 0 in the epilogue, in fp32.
#
# GEMV_MAX_M: each further row costs a multiply-add a weight on the CUDA cores (the tensor cores
# take them for free), so the GEMV's cut is kernels/qlinear.py's (2; counted there in the SASS, not
# timed). M = 3 to DECODE_MAX_M (16) run the same kernel with MMA: the decoded [BLOCK_N, BLOCK_K]
# tile times its word's absmax, rounded to x's dtype (the GEMM's weight, value for value), is the
# first operand of tl.dot with x^T [BLOCK_K, 16] (rows past M masked to 0); the update is the
# GEMM's, (s U)^T rounded to x's dtype dotted with B's tile. The results are the GEMM's within
# fp32 summation order. Against the 16-row GEMM it replaces (one program a [16, 32] output tile
# over all of K, its 16-entry table gathers pipelined through 128-142 KB of shared memory: 1 block
# an SM, 128 programs at N = 4096) it splits K for >= 2 programs an SM and keeps no stage in shared
# memory. sm_90 builds (benchmarks/resources.md): the GEMV [8, 512] tiles, 4 warps, about 94
# registers, 4 KB of shared memory (layout conversions), no spills; MMA [64, 64] tiles, 4 warps,
# 80-94 registers, 10 KB (the dot's operands), wgmma, 5 blocks an SM (32 and 64 x 128 tiles:
# mma.sync or 2 blocks an SM). Not timed on a GPU yet.

GEMV_MAX_M = 2  # rows of x up to which the 4-bit linear runs as a GEMV (kernels/qlinear.py's cut)
DECODE_MAX_M = 16  # rows up to which it runs the decode kernel (tl.dot past GEMV_MAX_M)


@triton.jit
def _gemv_loads(k0, k_hi, w_rows, blk_rows, mask_n, offs_w, K, SCALE, NESTED, DOUBLE: tl.constexpr,
                NESTED_BS: tl.constexpr, BS: tl.constexpr):
    """The global loads of the GEMV's K tile at k0 (none at or past k_hi): the codes as
    [BLOCK_N, PW] int32 words, and each word's block absmax ([BLOCK_N, PW]: float32, or its uint8
    code and nested absmax with double quantization, restored in the loop)."""
    kw = k0 + 8 * offs_w  # each word's first k
    m = mask_n[:, None] & (kw < k_hi)[None, :]
    p = tl.load(w_rows + k0 // 8, mask=m, other=0)
    blk = blk_rows[:, None] + (kw // BS)[None, :]
    if DOUBLE:
        return p, tl.load(SCALE + blk, mask=m, other=0), tl.load(NESTED + blk // NESTED_BS, mask=m, other=0.0)
    else:
        return p, tl.load(SCALE + blk, mask=m, other=0.0), p


@triton.jit
def _gemv_pair(PAIRS, byte):
    """The float32 values of a byte's high and low nibble: one 8-byte gather from PAIRS (int64
    [256], the high nibble's value in the low word)."""
    pair = tl.load(PAIRS + byte)
    return pair.to(tl.int32).to(tl.float32, bitcast=True), (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _nf4_gemv_kernel(X, WORDS, PAIRS, SCALE, NESTED, OFFSET, DYN, BIAS, Y, WS, U, BL,
                     M, N, K, R, K_SPLIT, s_xm, s_xk, s_ym, s_yn, s_um, s_ur, s_bn, s_br, scaling,
                     BS: tl.constexpr, DOUBLE: tl.constexpr, NESTED_BS: tl.constexpr,
                     HAS_BIAS: tl.constexpr, TO_WS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                     MMA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[:M, n tile] (TO_WS: the fp32 partial WS[pid_k, :M, n tile]) over K range pid_k (see
    above): without tl.dot, or (MMA, M up to 16) the decoded tile scaled, rounded to x's dtype and
    multiplied by x^T on the tensor cores. WORDS: the codes as int32 [N * K / 8] (K a multiple of
    BS: rows are whole words); PAIRS: int64 [256], the two nibbles' float32 values of each byte."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    PW: tl.constexpr = BLOCK_K // 8  # words per row and tile
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    # per-word partial sums [BLOCK_N, PW] for each x row (the last axis): a word's 8 values are
    # one thread's registers (the joins below add in-thread axes to the words' layout: no layout
    # conversion), so its sum needs no shuffles; the words are summed across threads after the loop
    if MMA:  # y^T [BLOCK_N, BLOCK_M] = W_deq @ x^T, the weight the dot's register operand
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, PW, BLOCK_M), dtype=tl.float32)
    offs_w = tl.arange(0, PW)
    w_rows = WORDS + n64[:, None] * (K // 8) + offs_w[None, :]
    blk_rows = n64 * (K // BS)
    offs_x = 8 * offs_w[:, None] + tl.arange(0, 8)[None, :]  # [PW, 8]: the tile's k, word by word
    offset = 0.0
    if DOUBLE:
        offset = tl.load(OFFSET)
    # a register prefetch: the next tile's words and absmax are in flight while this one is
    # decoded (a software-pipelined tl.range would also stage the dependent table gathers in
    # shared memory: 126 KB a block at [16, 512])
    p_n, s_n, t_n = _gemv_loads(k_lo, k_hi, w_rows, blk_rows, mask_n, offs_w, K, SCALE, NESTED, DOUBLE,
                                NESTED_BS, BS)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        p, s, t = p_n, s_n, t_n
        p_n, s_n, t_n = _gemv_loads(k0 + BLOCK_K, k_hi, w_rows, blk_rows, mask_n, offs_w, K, SCALE, NESTED, DOUBLE,
                                    NESTED_BS, BS)
        if DOUBLE:  # the block absmax restored (two roundings: no FMA, the launch turns fusion off)
            s = tl.load(DYN + s.to(tl.int32)) * t + offset
        h0, l0 = _gemv_pair(PAIRS, p & 255)  # byte j of each little-endian word: elements 2 j, 2 j + 1
        h1, l1 = _gemv_pair(PAIRS, (p >> 8) & 255)
        h2, l2 = _gemv_pair(PAIRS, (p >> 16) & 255)
        h3, l3 = _gemv_pair(PAIRS, (p >> 24) & 255)
        # [BLOCK_N, PW, j1, j0, t]: element 2 j + t = 4 j1 + 2 j0 + t of the word (each join makes
        # the last axis, so the first joins pick j1 and the last one t)
        w = tl.join(tl.join(tl.join(h0, h2), tl.join(h1, h3)), tl.join(tl.join(l0, l2), tl.join(l1, l3)))
        w = tl.reshape(w, (BLOCK_N, PW, 8))  # table values, in k order
        if MMA:  # W_deq's tile as the GEMM makes it: table value x absmax in fp32, rounded once
            wq = tl.reshape(w * s[:, :, None], (BLOCK_N, BLOCK_K)).to(X.dtype.element_ty)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(X + offs_m[None, :].to(tl.int64) * s_xm + offs_k[:, None] * s_xk,
                         mask=(offs_k < k_hi)[:, None] & (offs_m < M)[None, :], other=0.0)
            acc = _dot(wq, xt, acc, UPCAST, PRECISION)
        else:
            for i in tl.static_range(BLOCK_M):  # the tile is decoded once for all rows
                offs_k = k0 + offs_x
                xi = tl.load(X + i * s_xm + offs_k * s_xk, mask=(offs_k < k_hi) & (i < M), other=0.0)
                part = tl.sum(w * xi.to(tl.float32)[None, :, :], axis=2) * s  # [BLOCK_N, PW]
                acc = tl.where(offs_m[None, None, :] == i, acc + part[:, :, None], acc)
    if not MMA:
        acc = tl.sum(acc, axis=1)  # [BLOCK_N, BLOCK_M]: y^T
    if HAS_LORA:
        acc = _update_gemv(acc, X, U, BL, pid_k, offs_m, n64, mask_n, M, R, s_um, s_ur, s_bn, s_br, scaling,
                           MMA, UPCAST, PRECISION, BLOCK_M, BLOCK_R)
    _gemv_store(acc, WS, BIAS, Y, pid_k, M, N, offs_m, offs_n, mask_n, s_ym, s_yn, HAS_BIAS, TO_WS)


def _gemv_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tiles and split of the decode path. M <= GEMV_MAX_M (no tl.dot): BLOCK_M M rounded up to a
    power of two (a static loop over the rows); GPU: 4 warps, [8, 512] tiles (256 bytes of codes
    per row and tile, 32 table values a thread: [16, 512] took 156 registers, [8, 512] 94).
    MMA (M up to DECODE_MAX_M): BLOCK_M 16 (tl.dot's smallest), GPU: 4 warps, [64, 64] tiles (32
    table values a thread, as the GEMV). The interpreter: [8, 64] and [16, 64]. SPLIT_K:
    kernels/qlinear.py's rule (>= 2 programs per SM, >= 2 K tiles a split), in whole K tiles."""
    mma = M > GEMV_MAX_M
    block_m = 16 if mma else triton.next_power_of_2(M)
    if _interpreted():
        cfg = {"BLOCK_M": block_m, "BLOCK_N": 16 if mma else 8, "BLOCK_K": 64}
    elif mma:
        cfg = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    else:
        cfg = {"BLOCK_M": block_m, "BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1}
    return {**_gemv_split(cfg, N, K, device), "MMA": mma}


def gemv_applies(M: int, K: int, block_size: int, data: torch.Tensor) -> bool:
    """Whether ``nf4_linear`` takes the decode path: decode-sized M (up to DECODE_MAX_M), rows of
    whole blocks (so of whole int32 words: blocks hold 32 or more codes) and codes that can be
    read as words."""
    return (0 < M <= DECODE_MAX_M and K > 0 and K % block_size == 0 and block_size % 8 == 0
            and data.numel() % 4 == 0 and data.data_ptr() % 4 == 0)


def _nf4_gemv(x, data, scale, nested, offset, pairs, dyn, block_size: int, N: int, bias, lora, y):
    M, K = x.shape
    cfg = _gemv_config(M, N, K, x.device)
    split, k_split = cfg.pop("SPLIT_K"), cfg.pop("K_SPLIT")
    ws = _common.new_output((split, M, N), x, torch.float32) if split > 1 else y
    u, b, s, R, lora_strides = _update_args(lora, scale)
    double = nested is not None
    _nf4_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), split)](
        x, data.view(torch.int32), pairs, scale, nested if double else scale, offset if double else scale,
        dyn if double else scale, bias if bias is not None else scale, y, ws, u, b,
        M, N, K, R, k_split, x.stride(0), x.stride(1), y.stride(0), y.stride(1), *lora_strides, float(s),
        BS=block_size, DOUBLE=double, NESTED_BS=NESTED_BLOCK, HAS_BIAS=bias is not None, TO_WS=split > 1,
        HAS_LORA=lora is not None, BLOCK_R=_block_r(max(R, 1), x.dtype) if cfg["MMA"] else _rank_tile(max(R, 1)),
        UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), enable_fp_fusion=False, **cfg)
    if split > 1:
        block = 256
        _qlinear_splitk_sum_kernel[(triton.cdiv(N, block), M)](
            ws, bias if bias is not None else ws, y, M, N, split, y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, BLOCK=block)
    return y


def _linear_config(M: int, dtype: torch.dtype, aligned: bool, dx: bool = False) -> dict:
    """Tiles of the 4-bit linear kernels (``dx``: of the backward, whose BLOCK_K is the output's
    width). Interpreter: small tiles (BLOCK_K 64: blocks of 32 give two absmax per row and tile).
    GPU: as kernels/qlinear.py's fused dequantize-GEMM (BLOCK_M 16 for decode-sized M: the same
    kernel as a GEMV); fp32 (3xTF32) takes shorter K tiles. The unaligned layout (K not a
    multiple of the block) gathers byte, nibble and absmax per element: 64-wide tiles. Chosen so
    that no sm_90 or sm_80 build spills (tests/_aot.py =nf4; benchmarks/resources.md): decode
    takes 8 warps (4 spilled on sm_80 with blocks of 32 and double quantization), large M a
    128 x 64 tile (128 x 128 spilled on sm_80); warps and the M / N tiles leave each output's
    K order, so the results, as they are. Not timed yet."""
    if _interpreted():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}
    if M <= 16:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 8, "num_stages": 4}
    elif not aligned:  # 4 warps spilled (the pipelined per-element gathers)
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    elif M <= 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    if dtype == torch.float32:
        cfg.update(BLOCK_K=min(cfg["BLOCK_K"], 64 if M <= 16 else 32), num_stages=3)
    if not aligned:
        cfg.update(BLOCK_K=min(cfg["BLOCK_K"], 64))
    if dx:  # the K tile is the output's width: at most 128; the N loop takes 64 (fp32: 32) rows
        cfg.update(BLOCK_K=min(cfg["BLOCK_K"], 128), BLOCK_N=min(cfg["BLOCK_N"], 64))
        if dtype == torch.float32 and M > 16:
            cfg.update(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8)
    return {**cfg, "GROUP_M": 8}


def _weight_args(data, scale, nested, offset, code, dyn):
    double = nested is not None
    return (data, scale, nested if double else scale, offset if double else scale, code, dyn if double else code)


def nf4_linear(x, data, scale, nested, offset, code, dyn, block_size: int, N: int, bias, lora=None, pairs=None):
    """y [M, N] in x's dtype: y = x @ W_deq^T + bias, W [N, K] the flat 4-bit tensor (data uint8
    [ceil(N * K / 2)], scale float32 absmax [blocks] or with ``nested`` / ``offset`` its uint8
    double-quantized codes, ``code`` the 16 table values, ``dyn`` the dynamic map). x [M, K]
    with unit stride along K; every weight operand contiguous. ``lora`` = (U float32 [M, R],
    B [N, R] in x's dtype, scaling): + scaling * U @ B^T in the same kernel (QLoRA's forward).
    ``pairs`` (int64 [256], the byte table of both nibbles' values): decode-sized M takes the GEMV
    where ``gemv_applies``; without it, always the GEMM."""
    M, K = x.shape
    y = _common.new_output((M, N), x, x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0 and lora is None:
        y.zero_()
        return y if bias is None else y.add_(bias)
    if pairs is not None and gemv_applies(M, K, block_size, data):
        return _nf4_gemv(x, data, scale, nested, offset, pairs, dyn, block_size, N, bias, lora, y)
    aligned = K % block_size == 0
    cfg = _linear_config(M, x.dtype, aligned)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    u, b, s, R, lora_strides = _update_args(lora, scale)
    _nf4_linear_kernel[grid](
        x, *_weight_args(data, scale, nested, offset, code, dyn), bias if bias is not None else scale, y, u, b,
        M, N, K, R, x.stride(0), x.stride(1), y.stride(0), y.stride(1), *lora_strides, float(s),
        BS=block_size, DOUBLE=nested is not None, ALIGNED=aligned, NESTED_BS=NESTED_BLOCK,
        HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
        SWAP_AB=x.dtype != torch.float32, HAS_LORA=lora is not None,
        BLOCK_R=16 if lora is None else _block_r(R, x.dtype),
        enable_fp_fusion=False, **cfg)
    return y


def nf4_linear_dx(dy, data, scale, nested, offset, code, dyn, block_size: int, K: int, lora=None):
    """dx [M, K] in dy's dtype: dx = dy @ W_deq (dy [M, N], unit stride along N; the weight as for
    ``nf4_linear``). ``lora`` = (V float32 [M, R] = dy B, A [R, K] in dy's dtype, scaling,
    dropout_p, seed tensor or None): + scaling * dropout'(V @ A) in the same kernel (QLoRA's
    backward; the mask is the forward's, kernels/lora.py's counter-based one)."""
    M, N = dy.shape
    dx = _common.new_output((M, K), dy, dy.dtype)
    if M == 0 or K == 0:
        return dx
    if N == 0 and lora is None:
        return dx.zero_()
    aligned = K % block_size == 0
    cfg = _linear_config(M, dy.dtype, aligned, dx=True)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    p, seed = (0.0, None) if lora is None else lora[3:]
    v, a, s, R, lora_strides = _update_args(None if lora is None else lora[:3], scale)
    drop_scale, seed_arg, thr31 = _drop_args(p, seed, dy)
    _nf4_linear_dx_kernel[grid](
        dy, *_weight_args(data, scale, nested, offset, code, dyn), dx, v, a,
        M, N, K, R, dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), *lora_strides, float(s), drop_scale,
        seed_arg, thr31,
        BS=block_size, DOUBLE=nested is not None, ALIGNED=aligned, NESTED_BS=NESTED_BLOCK,
        UPCAST=_upcast(dy.dtype), PRECISION=_precision(dy.dtype),
        HAS_LORA=lora is not None, DROPOUT=p > 0, BLOCK_R=16 if lora is None else _block_r(R, dy.dtype, dx=True),
        enable_fp_fusion=False, **cfg)
    return dx
