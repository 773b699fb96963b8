"""Triton kernels for the quantized linear layer: weight-only (W8A16 / W4A16), a fused
dequantize-GEMM, and with int8 activations (W4A8 / W8A8), an int8 tensor-core GEMM.

Semantics: ``y = x @ W_deq^T + bias`` with ``W_deq = (codes - zero_point) * scale``
(fastpeft/reference/quant.py), the weight [N, K] quantized with one scale per group of G
consecutive input features, per output row, or per tensor.

``_qlinear_kernel`` computes one [BLOCK_M, BLOCK_N] tile of y. Per K tile it loads the packed
codes of the weight tile, [BLOCK_N, BLOCK_K / 2] bytes (4-bit) or [BLOCK_N, BLOCK_K] (8-bit),
unpacks the nibbles in registers (low nibble = even k; absmax nibbles sign-extended with
``(v ^ 8) - 8``), subtracts the zero points and multiplies by the scales in fp32, rounds the
tile to x's dtype and feeds it to ``tl.dot`` with fp32 accumulation: the 16-bit weight is
never written to memory. Groups: BLOCK_K and G are powers of two, so either G is a multiple
of BLOCK_K (one scale / zero point per row and K tile, a [BLOCK_N] load) or BLOCK_K a
multiple of G (a [BLOCK_N, BLOCK_K / G] load, applied through a [BLOCK_N, BLOCK_K / G, G]
view of the tile). Per-row and per-tensor scales (``PER_ROW``) are applied once in the
epilogue: the tile then holds the integers ``codes - zero_point`` (|v| <= 255, exact in
fp16, bf16 and tf32) and the dot runs on them. 16-bit x (``SWAP_AB``) computes the tile
transposed, ``y^T = W_deq @ x^T``: the dequantized weight is the wgmma's register operand (A)
and x comes from the cp.async buffers, so no 16-bit tile is stored to shared memory in the
loop and the wgmmas stay asynchronous. Whether they do is decided by ptxas, not by the
PTX's wait depth: some tiles (128x128x64) get serialized (ptxas C7515) in the 4-bit variants;
the configs below keep wgmmas in flight in the SASS of every variant (benchmarks/NOTES.md,
"Hopper pipelining"). fp32 x (3xTF32) keeps the plain orientation: there it only costs
registers.

Decode. At M <= GEMV_MAX_M (2) the layer is bound by the read of the packed weight (plus, at 4
bits, the instructions that decode it: at HBM speed an SM must turn about 36 nibbles a cycle
into fp32), so ``_qlinear_gemv_kernel`` runs it as a GEMV, without tl.dot: a program owns
BLOCK_N output features and one K range (split-K: SPLIT_K programs along K), loads its codes
as int32 words (rows that are not whole aligned words: as bytes, packed into words in
registers) and decodes each code field with one LOP3 and one FADD: ``(word & mask) ^ MAGIC``
read as fp32 is 2**e + the field exactly (MAGIC the exponent bits, plus the sign bit for
absmax), and subtracting 2**e + offset + zero point leaves the integer q - zp in fp32, with no
int -> float conversion (those run at a fraction of the FMA rate). The weight stays fp32 (it
is not rounded to x's dtype as in ``_qlinear_kernel``) and multiplies the x row(s) in fp32;
each thread sums 16-value chunks in its registers, times the chunk's group scale (per-row /
per-tensor scales: once, in the epilogue), into a [BLOCK_N, chunks] fp32 accumulator reduced
across threads once after the loop. The K loop is ``tl.range(..., num_stages=GEMV_STAGES)``:
Triton 3.6 software-pipelines these loads too (cp.async into shared memory), so GEMV_STAGES - 1
tiles of codes and scales are in flight per program, a memory-bound loop's need (Little's law);
codes read as bytes (too narrow for cp.async) keep a register prefetch of the next tile
instead. SPLIT_K is the smallest power of two that gives >= 2 programs per SM (4096 ->
11008, W4 g128: [64, 128] tiles, 172 N tiles, SPLIT_K 2; per row: [16, 512] tiles, 688 N
tiles, SPLIT_K 1); with SPLIT_K > 1 each split writes an fp32 partial into a [SPLIT_K, M, N]
workspace and ``_qlinear_splitk_sum_kernel`` adds them in split order (deterministic: no
atomics) with the bias. GEMV_MAX_M: each further row of x costs about 1.5 instructions per
weight (its FMA and the conversion of its x chunk). Counted in the SASS of the sm_90 builds
(tests/_aot.py; not timed), instructions per weight in the K loop at M = 1 and 2 against
``_qlinear_kernel``'s small-M config: W4 g128 zero point 5.7 and 7.2 against 8.7, W8 per row
4.9 and 6.6 against 5.9, the GEMM kernel's including one int -> float conversion per weight;
at M = 4 the GEMV takes about 10 to 11. Larger M, to 16, uses ``_qlinear_kernel`` with BLOCK_M
= 16, narrow N tiles (32) and a deep K tile (256). No autotuning yet: one fixed config per M
range (also with FASTPEFT_AUTOTUNE=1); they fit sm_80 and sm_90 shared memory (tests/_aot.py,
family ``qlinear``).

Int8 activations. ``_qlinear_a8_kernel`` takes x as int8 codes (quantized before it, per row
by kernels/int8.py's ``quant_rows`` or per tensor by kernels/quant.py's ``codes_with_scale``)
with one step per row or per tensor. Per K tile (BLOCK_K divides the group: one scale and
zero point per output row and tile) the weight operand is int8: 4-bit codes unpacked minus
their zero point (|q - z| <= 15), 8-bit absmax codes as loaded, 8-bit zero-point codes as
q ^ 0x80 = q - 128 with the exact correction (z - 128) * sum_k x_q; the int8 x int8 -> int32
dot is exact, converted to fp32 and scaled by the group scale into the fp32 accumulator; the
activation step multiplies once in the epilogue. Per-row / per-tensor weight scales
(``CHAIN``) keep one int32 accumulator over all of K instead (exact, one [BLOCK_M, BLOCK_N]
tile live; the launcher checks |sum| < 2**31). Above A8_SWAP_MIN_M rows the tile is computed
transposed (y^T = W @ xq^T, ``SWAP_AB``) so that the weight operand built in registers stays
there. Triton 3.6 waits for each int8 wgmma (sm_90) before the next K step, so the large-M
configs fit two blocks per SM. This is integer-only inference (Jacob et al., 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference"): no 16-bit operand, the tensor cores' int8 rate (twice bf16's on the H100 / H200).

The backward through x (dx = dy @ W_deq) is ``_qlinear_dx_kernel``: the transposed fused
dequantize-GEMM (a program owns a K range of dx and loops over N; each weight tile unpacked,
minus its zero point, times its scale, per-row scales included, rounded to dy's dtype; the
16-bit weight never materialized), as kernels/nf4.py's ``_nf4_linear_dx_kernel``.

LoRA on the base (HAS_LORA; fastpeft/ops/qlinear.py ``quant_lora_linear``), as kernels/nf4.py's
QLoRA: U = dropout(x) A^T comes from kernels/lora.py's shrink, and scaling * U B^T is added to
``_qlinear_kernel``'s accumulator after its K loop (``update_start``; per-row scales then go into
the tile, not the epilogue, which would scale the update too) or by split 0 in the GEMV's
epilogue (``update_gemv``); dx's accumulator starts with scaling * dropout'(V A), V = dy B
(``update_dx_start``, the forward's dropout mask).

Kernels only: no policy here (fastpeft/ops/qlinear.py decides and wraps).
"""
from __future__ import annotations

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
from .lora import _block_r as _rank_tile
from .lora import _drop_args
from .lora import update_args as _update_args
from .lora import update_block_r as _block_r
from .lora import update_dx_start as _update_dx_start
from .lora import update_gemv as _update_gemv
from .lora import update_start as _update_start


@triton.jit
def _unpack(p, BITS: tl.constexpr, SIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 codes [ROWS, COLS] of a loaded tile of code bytes: [ROWS, COLS / 2] packed nibbles
    (4-bit: low nibble = even column; absmax nibbles sign-extended with ``(v ^ 8) - 8``) or
    [ROWS, COLS] bytes (8-bit)."""
    p = p.to(tl.int32)
    if BITS == 4:
        lo = p & 15
        hi = (p >> 4) & 15
        if SIGNED:  # two's complement nibbles
            lo = (lo ^ 8) - 8
            hi = (hi ^ 8) - 8
        return tl.reshape(tl.join(lo, hi), (ROWS, COLS))  # element 2j low, 2j+1 high
    else:
        return p


@triton.jit
def _scaled_tile(q, k0, s_rows, z_rows, mask_n, NUM_GROUPS, s_sg, HAS_ZP: tl.constexpr, PER_ROW: tl.constexpr,
                 ROW_SCALE: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 (q - zero point) * scale of the int32 codes q [BLOCK_N, BLOCK_K] at K offset k0 (rows
    ``s_rows`` / ``z_rows`` of the scales and zero points, ``mask_n`` the rows inside N). PER_ROW
    (per-row or per-tensor scales): times the row scale only with ROW_SCALE (the forward applies
    it in its epilogue instead). Groups: G >= BLOCK_K, the tile lies in one group; else NG = BLOCK_K
    / G whole groups per tile."""
    if PER_ROW:
        if HAS_ZP:
            q = q - tl.load(z_rows, mask=mask_n, other=0)[:, None]
        w = q.to(tl.float32)
        if ROW_SCALE:
            w = w * tl.load(s_rows, mask=mask_n, other=0.0)[:, None]
    elif G >= BLOCK_K:  # the whole K tile lies in one group
        g = k0 // G
        s = tl.load(s_rows + g * s_sg, mask=mask_n, other=0.0)
        if HAS_ZP:
            q = q - tl.load(z_rows + g * s_sg, mask=mask_n, other=0)[:, None]
        w = q.to(tl.float32) * s[:, None]
    else:  # NG whole groups per K tile
        NG: tl.constexpr = BLOCK_K // G
        gi = k0 // G + tl.arange(0, NG)
        gmask = mask_n[:, None] & (gi < NUM_GROUPS)[None, :]
        goff = gi[None, :] * s_sg
        s = tl.load(s_rows[:, None] + goff, mask=gmask, other=0.0)
        q3 = tl.reshape(q, (BLOCK_N, NG, G))
        if HAS_ZP:
            q3 = q3 - tl.load(z_rows[:, None] + goff, mask=gmask, other=0)[:, :, None]
        w = tl.reshape(q3.to(tl.float32) * s[:, :, None], (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def _qlinear_kernel(
    X, DATA, SCALE, ZP, BIAS, Y, U, BL,
    M, N, K, KP, NUM_GROUPS, R,
    s_xm, s_xk, s_dn, s_dk, s_sn, s_sg, s_ym, s_yn, s_um, s_ur, s_bn, s_br, scaling,
    BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, PER_ROW: tl.constexpr,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    SWAP_AB: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # SWAP_AB: the tile is computed transposed, y^T [BLOCK_N, BLOCK_M] = W_deq @ x^T, so that the
    # dequantized weight is the dot's first (register) operand (see the module doc). HAS_LORA
    # (LoRA on the quantized base): scaling * U B^T (kernels/lora.py ``update_start``) is added to
    # the accumulator after the K loop (before it, the update's tiles stayed live across the loop:
    # about 30 more registers); per-row scales then go into the tile (an epilogue scale would
    # scale the update too)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dt = X.dtype.element_ty
    PK: tl.constexpr = BLOCK_K * BITS // 8  # bytes of codes per row and K tile
    offs_p = tl.arange(0, PK)

    acc, x_ptrs = _x_tile_start(X, offs_m, offs_k, s_xm, s_xk, SWAP_AB, BLOCK_M, BLOCK_N)
    d_ptrs = DATA + offs_n[:, None].to(tl.int64) * s_dn + offs_p[None, :] * s_dk
    s_rows = SCALE + offs_n.to(tl.int64) * s_sn
    z_rows = ZP + offs_n.to(tl.int64) * s_sn
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        if SWAP_AB:
            a = tl.load(x_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_p = (k0 * BITS // 8 + offs_p) < KP
        p = tl.load(d_ptrs, mask=mask_n[:, None] & mask_p[None, :], other=0)
        q = _unpack(p, BITS, SIGNED, BLOCK_N, BLOCK_K)
        # per row: an integer tile, the scale applied in the epilogue (with HAS_LORA: in the tile)
        w = _scaled_tile(q, k0, s_rows, z_rows, mask_n, NUM_GROUPS, s_sg, HAS_ZP, PER_ROW, HAS_LORA, G, BLOCK_N,
                         BLOCK_K)
        if SWAP_AB:
            acc = _dot(w.to(dt), a, acc, UPCAST, PRECISION)
        else:
            acc = _dot(a, tl.trans(w.to(dt)), acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * s_xk
        d_ptrs += PK * s_dk

    if HAS_LORA:
        acc = _update_start(acc, X, U, BL, offs_m, offs_n, mask_m, mask_n, R, s_um, s_ur, s_bn, s_br, scaling,
                            SWAP_AB, UPCAST, PRECISION, BLOCK_R)
    if SWAP_AB:
        acc = tl.trans(acc)
    if PER_ROW and not HAS_LORA:
        acc = acc * tl.load(s_rows, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["thr31"])
def _qlinear_dx_kernel(
    DY, DATA, SCALE, ZP, DX, V, AL,
    M, N, K, KP, NUM_GROUPS, R,
    s_dm, s_dn, s_dxm, s_dxk, s_wn, s_wk, s_sn, s_sg, s_vm, s_vr, s_ar, s_ak, scaling, drop_scale, SEED, thr31,
    BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, PER_ROW: tl.constexpr,
    G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx[BLOCK_M, BLOCK_K] = dy @ W_deq, the transposed dequantize-GEMM: a program owns a K range
    of dx and loops over N, each [BLOCK_N, BLOCK_K] weight tile unpacked and scaled in registers
    (per-row scales too: the sum runs over the rows), rounded to dy's dtype, as the forward's.
    Computed transposed, dx^T = W_deq^T @ dy^T, so the weight tile is the dot's first operand.
    HAS_LORA (LoRA's backward through x): scaling * dropout'(V A) (kernels/lora.py
    ``update_dx_start``, V = dy B) starts the accumulator."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    dt = DY.dtype.element_ty
    PK: tl.constexpr = BLOCK_K * BITS // 8  # bytes of codes per row and K tile
    offs_p = k0 * BITS // 8 + tl.arange(0, PK)
    mask_p = offs_p < KP
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    if HAS_LORA:
        acc = _update_dx_start(acc, DY, V, AL, offs_m, offs_k, mask_m, mask_k, R, s_vm, s_vr, s_ar, s_ak, scaling,
                               drop_scale, SEED, thr31, DROPOUT, UPCAST, PRECISION, BLOCK_R)
    g_ptrs = DY + offs_n[:, None] * s_dn + offs_m[None, :].to(tl.int64) * s_dm  # dy^T [BLOCK_N, BLOCK_M]
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        mask_n = rows < N
        r64 = rows.to(tl.int64)
        p = tl.load(DATA + r64[:, None] * s_wn + offs_p[None, :] * s_wk, mask=mask_n[:, None] & mask_p[None, :],
                    other=0)
        q = _unpack(p, BITS, SIGNED, BLOCK_N, BLOCK_K)
        w = _scaled_tile(q, k0, SCALE + r64 * s_sn, ZP + r64 * s_sn, mask_n, NUM_GROUPS, s_sg, HAS_ZP, PER_ROW,
                         True, G, BLOCK_N, BLOCK_K)
        g = tl.load(g_ptrs, mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        acc = _dot(tl.trans(w.to(dt)), g, acc, UPCAST, PRECISION)
        g_ptrs += BLOCK_N * s_dn
    acc = tl.trans(acc)
    tl.store(DX + offs_m[:, None].to(tl.int64) * s_dxm + offs_k[None, :] * s_dxk, acc.to(DX.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _qlinear_a8_kernel(
    XQ, XS, DATA, SCALE, ZP, BIAS, Y,
    M, N, K, KP, X_MUL,
    s_xm, s_xk, s_xs, s_dn, s_dk, s_sn, s_sg, s_ym, s_yn,
    BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, PER_ROW: tl.constexpr,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, CHAIN: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """int8 activations x int4 / int8 weight codes on the int8 tensor cores (see the module doc).
    SWAP_AB: the tile is computed transposed, y^T [BLOCK_N, BLOCK_M] = W @ xq^T, so that the
    weight operand built in registers stays there (wgmma's register operand). CHAIN (per-row
    scales): one int32 accumulator over all of K."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    PK: tl.constexpr = BLOCK_K * BITS // 8
    offs_p = tl.arange(0, PK)
    SHIFT: tl.constexpr = 128 if (BITS == 8 and HAS_ZP) else 0  # uint8 codes -> int8 (q - 128)

    ACC_DT: tl.constexpr = tl.int32 if CHAIN else tl.float32
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC_DT)
        x_ptrs = XQ + offs_k[:, None] * s_xk + offs_m[None, :].to(tl.int64) * s_xm
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
        x_ptrs = XQ + offs_m[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk
    xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)  # CHAIN: sum_k xq (8-bit zero points' correction)
    d_ptrs = DATA + offs_n[:, None].to(tl.int64) * s_dn + offs_p[None, :] * s_dk
    s_rows = SCALE + offs_n.to(tl.int64) * s_sn
    z_rows = ZP + offs_n.to(tl.int64) * s_sn
    if PER_ROW and HAS_ZP:
        z = tl.load(z_rows, mask=mask_n, other=0)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        if SWAP_AB:
            a = tl.load(x_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0)  # xq^T [BLOCK_K, BLOCK_M]
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        mask_p = (k0 * BITS // 8 + offs_p) < KP
        p = tl.load(d_ptrs, mask=mask_n[:, None] & mask_p[None, :], other=0)
        if not PER_ROW:  # BLOCK_K divides G: the K tile lies in one group
            g = k0 // G
            if HAS_ZP:
                z = tl.load(z_rows + g * s_sg, mask=mask_n, other=0)
        if BITS == 8:  # the bytes are the operand: int8 codes, or uint8 ^ 0x80 = q - 128 as int8
            if HAS_ZP:
                w = (p ^ 0x80).to(tl.int8, bitcast=True)
            else:
                w = p
        else:
            q = _unpack(p, BITS, SIGNED, BLOCK_N, BLOCK_K)
            if HAS_ZP:
                q = q - z[:, None]  # |q - z| <= 15
            w = q.to(tl.int8)
        # sum_k (q - z) a = sum_k (q - 128) a - (z - 128) sum_k a for 8-bit zero points
        if SWAP_AB:
            if CHAIN:  # exact: the launcher checks that |sum| < 2**31 over all of K
                acc = tl.dot(w, a, acc, out_dtype=tl.int32)
                if HAS_ZP and BITS == 8:
                    xsum += tl.sum(a.to(tl.int32), axis=0)
            else:
                d = tl.dot(w, a, out_dtype=tl.int32)
                if HAS_ZP and BITS == 8:
                    d -= (z - SHIFT)[:, None] * tl.sum(a.to(tl.int32), axis=0)[None, :]
                if PER_ROW:
                    acc += d.to(tl.float32)
                else:
                    acc += d.to(tl.float32) * tl.load(s_rows + g * s_sg, mask=mask_n, other=0.0)[:, None]
        else:
            if CHAIN:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
                if HAS_ZP and BITS == 8:
                    xsum += tl.sum(a.to(tl.int32), axis=1)
            else:
                d = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
                if HAS_ZP and BITS == 8:
                    d -= tl.sum(a.to(tl.int32), axis=1)[:, None] * (z - SHIFT)[None, :]
                if PER_ROW:
                    acc += d.to(tl.float32)
                else:
                    acc += d.to(tl.float32) * tl.load(s_rows + g * s_sg, mask=mask_n, other=0.0)[None, :]
        x_ptrs += BLOCK_K * s_xk
        d_ptrs += PK * s_dk

    if CHAIN:
        if HAS_ZP and BITS == 8:
            if SWAP_AB:
                acc -= (z - SHIFT)[:, None] * xsum[None, :]
            else:
                acc -= xsum[:, None] * (z - SHIFT)[None, :]
        acc = acc.to(tl.float32)
    if SWAP_AB:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    if PER_ROW:
        acc = acc * tl.load(s_rows, mask=mask_n, other=0.0)[None, :]
    xs = tl.load(XS + offs_m * s_xs, mask=mask_m, other=0.0)
    acc = acc * (xs * X_MUL)[:, None]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# decode: the GEMV / split-K path (M <= GEMV_MAX_M)

GEMV_MAX_M = 2  # quant_linear takes the GEMV path up to this many rows (see the module doc)
GEMV_STAGES = 4  # software-pipeline stages of the decode loop over whole words (2-3 tiles in flight)


@triton.jit
def _gemv_field(src, SHIFT: tl.constexpr, FBITS: tl.constexpr, MAGIC, E: tl.constexpr, zf):
    """fp32 ``code - zero_point`` of the FBITS-bit field at bit SHIFT of each int32 of src, with
    no int -> float conversion: ``(src & mask) ^ MAGIC`` read as fp32 is exactly
    2**(23 - SHIFT) + the field, MAGIC holding that exponent (it puts the field on the units of
    the mantissa; SHIFT + FBITS <= 23) and, for absmax, the field's sign bit (two's complement
    -> offset binary); E = 2**(23 - SHIFT) + the offset, zf the zero point in fp32 (the sum is
    exact). MAGIC is a runtime argument: held in a register, it lets ptxas fuse the AND and the
    XOR into one LOP3 (two immediates do not fit one instruction)."""
    MASK: tl.constexpr = ((1 << FBITS) - 1) << SHIFT
    return ((src & MASK) ^ MAGIC).to(tl.float32, bitcast=True) - (E + zf)


@triton.jit
def _gemv_tile_loads(k0, k_hi, d_ptrs, s_rows, z_rows, mask_n, offs_c, KPU, NUM_GROUPS, s_dk, s_sg,
                     BITS: tl.constexpr, WORDS: tl.constexpr, HAS_ZP: tl.constexpr, PER_ROW: tl.constexpr,
                     G: tl.constexpr, BLOCK_K: tl.constexpr):
    """The global loads of _qlinear_gemv_kernel's K tile at k0 (none at or past k_hi): the codes
    as [BLOCK_N, PW] int32 words (read as words, or as bytes and packed: a loop-carried tile of
    bytes would take a register a byte), and the scales / zero points of the tile's group
    ([BLOCK_N]) or of its chunks' groups ([BLOCK_N, NC]); per-row scales give the codes back in
    their place."""
    U: tl.constexpr = 32 if WORDS else 8  # bits per loaded unit
    PU: tl.constexpr = BLOCK_K * BITS // U
    PW: tl.constexpr = BLOCK_K * BITS // 32
    live = k0 < k_hi
    pu0 = k0 * BITS // U
    p = tl.load(d_ptrs + pu0 * s_dk, mask=mask_n[:, None] & ((pu0 + tl.arange(0, PU)) < KPU)[None, :] & live,
                other=0)
    if not WORDS:  # little-endian words of 4 bytes: byte j = 2 j1 + j0 of each word
        lo, hi = tl.split(tl.reshape(p.to(tl.int32), (p.shape[0], PW, 2, 2)))  # j0 = 0, 1
        b0, b2 = tl.split(lo)
        b1, b3 = tl.split(hi)
        p = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)
    s = p
    z = p
    if not PER_ROW:
        if G >= BLOCK_K:
            g = k0 // G
            s = tl.load(s_rows + g * s_sg, mask=mask_n & live, other=0.0)
            if HAS_ZP:
                z = tl.load(z_rows + g * s_sg, mask=mask_n & live, other=0)
        else:
            gi = (k0 + offs_c) // G
            gmask = mask_n[:, None] & (gi < NUM_GROUPS)[None, :] & live
            s = tl.load(s_rows[:, None] + gi[None, :] * s_sg, mask=gmask, other=0.0)
            if HAS_ZP:
                z = tl.load(z_rows[:, None] + gi[None, :] * s_sg, mask=gmask, other=0)
    return p, s, z


@triton.jit
def _gemv_tile(acc, p, s, z, z_row, k0, X, M, K, s_xm, s_xk, offs_m, offs_x, MAGIC0, MAGIC1, MAGIC2, MAGIC3, MAGIC4,
               BITS: tl.constexpr, HAS_ZP: tl.constexpr, PER_ROW: tl.constexpr, G: tl.constexpr, OFF: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NC: tl.constexpr,
               CH: tl.constexpr, CW: tl.constexpr):
    """_qlinear_gemv_kernel's math on one K tile (codes p, scales s, zero points z as loaded by
    _gemv_tile_loads): acc [BLOCK_N, NC, BLOCK_M] += the tile's per-chunk partial sums."""
    zf = 0.0  # the zero point in fp32 (absmax: none)
    if PER_ROW:
        if HAS_ZP:
            zf = z_row
    elif G >= BLOCK_K:  # the whole K tile lies in one group: [BLOCK_N] scales
        s = s[:, None]
        if HAS_ZP:
            zf = z.to(tl.float32)[:, None, None]
    elif HAS_ZP:  # [BLOCK_N, NC]: each chunk's group
        zf = z.to(tl.float32)[:, :, None]
    # w [BLOCK_N, NC, CH]: q - zp, exact in fp32, in k order. Fields that would reach bit 23
    # (the exponent) are shifted down first, to bit 8 or more (a mask of the low bits of a
    # shifted word becomes a bit-field extract, which ptxas does not fuse with the XOR)
    p = tl.reshape(p, (BLOCK_N, NC, CW))
    if BITS == 4:  # 8 nibbles a word, k = 8 u + j for nibble j
        t = p >> 12  # nibbles 5, 6, 7 at bits 8, 12, 16
        ev = tl.join(tl.join(_gemv_field(p, 0, 4, MAGIC0, 8388608.0 + OFF, zf),
                             _gemv_field(p, 16, 4, MAGIC4, 128.0 + OFF, zf)),
                     tl.join(_gemv_field(p, 8, 4, MAGIC2, 32768.0 + OFF, zf),
                             _gemv_field(t, 12, 4, MAGIC3, 2048.0 + OFF, zf)))
        od = tl.join(tl.join(_gemv_field(p, 4, 4, MAGIC1, 524288.0 + OFF, zf),
                             _gemv_field(t, 8, 4, MAGIC2, 32768.0 + OFF, zf)),
                     tl.join(_gemv_field(p, 12, 4, MAGIC3, 2048.0 + OFF, zf),
                             _gemv_field(t, 16, 4, MAGIC4, 128.0 + OFF, zf)))
        w = tl.reshape(tl.join(ev, od), (BLOCK_N, NC, CH))  # [.., u, j2, j1, j0]: j = 4 j2 + 2 j1 + j0
    else:  # 4 bytes a word, k = 4 u + j for byte j
        w = tl.join(tl.join(_gemv_field(p, 0, 8, MAGIC0, 8388608.0 + OFF, zf),
                            _gemv_field(p >> 8, 8, 8, MAGIC1, 32768.0 + OFF, zf)),
                    tl.join(_gemv_field(p, 8, 8, MAGIC1, 32768.0 + OFF, zf),
                            _gemv_field(p >> 16, 8, 8, MAGIC1, 32768.0 + OFF, zf)))
        w = tl.reshape(w, (BLOCK_N, NC, CH))
    for i in tl.static_range(BLOCK_M):  # the weight tile is decoded once for all rows
        offs_k = k0 + offs_x
        xi = tl.load(X + i * s_xm + offs_k * s_xk, mask=(offs_k < K) & (i < M), other=0.0)
        part = tl.sum(w * xi.to(tl.float32)[None, :, :], axis=2)  # [BLOCK_N, NC]
        if not PER_ROW:
            part = part * s
        acc = tl.where(offs_m[None, None, :] == i, acc + part[:, :, None], acc)

    return acc


@triton.jit
def _qlinear_gemv_kernel(
    X, DATA, SCALE, ZP, BIAS, Y, WS, U, BL,
    M, N, K, KPU, NUM_GROUPS, K_SPLIT, R, MAGIC0, MAGIC1, MAGIC2, MAGIC3, MAGIC4,
    s_xm, s_xk, s_dn, s_dk, s_sn, s_sg, s_ym, s_yn, s_um, s_ur, s_bn, s_br, scaling,
    BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, PER_ROW: tl.constexpr,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, TO_WS: tl.constexpr, WORDS: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CH: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """y[:M, n tile] over K range pid_k (K_SPLIT wide), without tl.dot (see the module doc): into
    y with the bias (TO_WS False) or as the fp32 partial WS[pid_k, :M, n tile]. DATA: the codes
    as int32 words (WORDS: rows of whole aligned words) or uint8 bytes, KPU of them per row;
    MAGICj: _gemv_field's MAGIC for the field at bit j * BITS. NUM_STAGES > 1 (words only):
    the K loop is software-pipelined by Triton (cp.async into shared memory). HAS_LORA: + scaling
    * U B^T, added in fp32 by split 0 (kernels/lora.py ``update_gemv``)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    UNIT: tl.constexpr = 32 if WORDS else 8  # bits per loaded unit
    PU: tl.constexpr = BLOCK_K * BITS // UNIT  # units of codes per row and K tile
    NC: tl.constexpr = BLOCK_K // CH  # K chunks per tile (CH divides G: one group per chunk)
    CW: tl.constexpr = CH * BITS // 32  # words of codes per row and chunk
    OFF: tl.constexpr = (1 << (BITS - 1)) if SIGNED else 0  # absmax: code = (field ^ OFF) - OFF
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)

    # per-chunk partial sums [BLOCK_N, NC] for each x row (the last dim): a chunk is a run of
    # one thread's registers, so the sum over its CH values needs no shuffles; the chunks are
    # summed (across threads) once, after the loop
    acc = tl.zeros((BLOCK_N, NC, BLOCK_M), dtype=tl.float32)
    d_ptrs = DATA + offs_n[:, None].to(tl.int64) * s_dn + tl.arange(0, PU)[None, :] * s_dk
    s_rows = SCALE + offs_n.to(tl.int64) * s_sn
    z_rows = ZP + offs_n.to(tl.int64) * s_sn
    offs_c = tl.arange(0, NC) * CH
    offs_x = offs_c[:, None] + tl.arange(0, CH)[None, :]  # [NC, CH]: the tile's k, chunk by chunk
    z_row = 0.0
    if PER_ROW and HAS_ZP:  # one zero point per row; the scale in the epilogue
        z_row = tl.load(z_rows, mask=mask_n, other=0).to(tl.float32)[:, None, None]
    if NUM_STAGES > 1:  # whole words: cp.async copies of the next NUM_STAGES - 1 tiles stay in flight
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            p, s, z = _gemv_tile_loads(k0, k_hi, d_ptrs, s_rows, z_rows, mask_n, offs_c, KPU, NUM_GROUPS, s_dk, s_sg,
                                       BITS, WORDS, HAS_ZP, PER_ROW, G, BLOCK_K)
            acc = _gemv_tile(acc, p, s, z, z_row, k0, X, M, K, s_xm, s_xk, offs_m, offs_x,
                             MAGIC0, MAGIC1, MAGIC2, MAGIC3, MAGIC4, BITS, HAS_ZP, PER_ROW, G, OFF,
                             BLOCK_M, BLOCK_N, BLOCK_K, NC, CH, CW)
    else:  # bytes (too narrow for cp.async): register prefetch, the next tile's loads in flight
        p_n, s_n, z_n = _gemv_tile_loads(k_lo, k_hi, d_ptrs, s_rows, z_rows, mask_n, offs_c, KPU, NUM_GROUPS, s_dk,
                                         s_sg, BITS, WORDS, HAS_ZP, PER_ROW, G, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            p, s, z = p_n, s_n, z_n
            p_n, s_n, z_n = _gemv_tile_loads(k0 + BLOCK_K, k_hi, d_ptrs, s_rows, z_rows, mask_n, offs_c, KPU,
                                             NUM_GROUPS, s_dk, s_sg, BITS, WORDS, HAS_ZP, PER_ROW, G, BLOCK_K)
            acc = _gemv_tile(acc, p, s, z, z_row, k0, X, M, K, s_xm, s_xk, offs_m, offs_x,
                             MAGIC0, MAGIC1, MAGIC2, MAGIC3, MAGIC4, BITS, HAS_ZP, PER_ROW, G, OFF,
                             BLOCK_M, BLOCK_N, BLOCK_K, NC, CH, CW)

    acc = tl.sum(acc, axis=1)  # [BLOCK_N, BLOCK_M]: y^T
    if PER_ROW:
        acc = acc * tl.load(s_rows, mask=mask_n, other=0.0)[:, None]
    if HAS_LORA:
        acc = _update_gemv(acc, X, U, BL, pid_k, offs_m, offs_n.to(tl.int64), mask_n, M, R, s_um, s_ur, s_bn, s_br,
                           scaling, False, False, "ieee", BLOCK_M, BLOCK_R)
    _gemv_store(acc, WS, BIAS, Y, pid_k, M, N, offs_m, offs_n, mask_n, s_ym, s_yn, HAS_BIAS, TO_WS)


@triton.jit
def _gemv_store(acc, WS, BIAS, Y, pid_k, M, N, offs_m, offs_n, mask_n, s_ym, s_yn, HAS_BIAS: tl.constexpr,
                TO_WS: tl.constexpr):
    """A decode GEMV's epilogue, acc [BLOCK_N, BLOCK_M] = y^T of split pid_k: into y with the bias,
    or (TO_WS) as the fp32 partial WS[pid_k, m, n] that _qlinear_splitk_sum_kernel sums."""
    mask = mask_n[:, None] & (offs_m < M)[None, :]
    if TO_WS:
        tl.store(WS + (pid_k * M + offs_m)[None, :].to(tl.int64) * N + offs_n[:, None], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(Y + offs_m[None, :].to(tl.int64) * s_ym + offs_n[:, None] * s_yn, acc.to(Y.dtype.element_ty),
                 mask=mask)


@triton.jit
def _qlinear_splitk_sum_kernel(WS, BIAS, Y, M, N, SPLIT_K, s_ym, s_yn,
                               HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n tile] = the sum over the splits, in split order, of WS[s, m, n tile], + bias, in y's dtype."""
    m = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):  # a fixed order: the result does not depend on scheduling
        acc += tl.load(WS + (s * M + m).to(tl.int64) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + m.to(tl.int64) * s_ym + offs * s_yn, acc.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# configs


def _fixed_config(M: int, dtype: torch.dtype) -> dict:
    """The interpreter's small tiles (BLOCK_K 64: g = 32 exercises two groups per tile, g >= 64
    one), or the GPU's config per M range. The fp32 dequantized tile is BLOCK_N * BLOCK_K /
    threads registers; fp32 x (3xTF32 keeps hi and lo parts) takes a shorter K tile."""
    if _interpreted():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}
    if M <= 16:  # decode: the packed weight read dominates; narrow N tiles keep every SM busy
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}
        if dtype == torch.float32:
            cfg.update(BLOCK_K=128, num_stages=3)
    elif M <= 128:  # 16-bit: 32-row tiles (the wgmma's N): 7 wgmmas in flight, 3-4 blocks per SM
        cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
        if dtype == torch.float32:
            cfg.update(BLOCK_M=64, BLOCK_K=64)
    else:  # 16-bit: K tiles of 32 keep a wgmma in flight in every variant's SASS at two blocks per SM
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 4}
        if dtype == torch.float32:
            cfg.update(BLOCK_N=64, BLOCK_K=32, num_stages=3)
    return {**cfg, "GROUP_M": 8}



def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def supports(group_size: int | None) -> bool:
    """Whether the kernel handles this granularity: per row / per tensor, or power-of-two groups."""
    return group_size is None or (_is_pow2(group_size) and 16 <= group_size <= 1024)


def _scale_layout(scale: torch.Tensor, group_size: int | None, what: str) -> tuple:
    """(PER_ROW, s_sn, s_sg, NUM_GROUPS, G) of the weight's scales for the GEMM kernels: per row
    [N] or per tensor [] (s_sn 0; G a placeholder 16), or groups [N, K / G]."""
    if not supports(group_size):
        raise ValueError(f"{what} kernel: group_size must be a power of two in [16, 1024], got {group_size}")
    if group_size is None:
        return True, scale.stride(0) if scale.dim() == 1 else 0, 0, 1, 16
    return False, scale.stride(0), scale.stride(1), scale.shape[1], group_size


# ---------------------------------------------------------------------------------------------
# launcher (x 2-D with unit stride in the last dim; shapes and devices are checked by fastpeft.ops)


def quant_linear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bits: int, scheme: str, group_size: int | None, bias: torch.Tensor | None,
                 lora=None) -> torch.Tensor:
    """y [M, N] in x's dtype: y = x @ ((codes - zero_point) * scale)^T + bias.

    x [M, K] fp16/bf16/fp32; data [N, ceil(K / 2)] uint8 (4-bit, packed along K) or [N, K]
    int8/uint8 (8-bit), contiguous rows; scale float32 and zero_point int32 of shape
    [N, K / group_size] (groups along K), [N] (per row) or [] (per tensor); bias [N] or None.
    group_size must satisfy ``supports``. ``lora`` = (U float32 [M, R], B [N, R] in x's dtype,
    scaling): + scaling * U @ B^T in the same kernel (LoRA on the quantized base).
    """
    M, K = x.shape
    N = data.shape[0]
    y = _common.new_output((M, N), x, x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0 and lora is None:
        y.zero_()
        return y if bias is None else y.add_(bias)
    per_row, s_sn, s_sg, num_groups, g = _scale_layout(scale, group_size, "quant_linear")
    if M <= GEMV_MAX_M:
        return _quant_linear_gemv(x, data, scale, zero_point, bits, scheme, per_row, g, s_sn, s_sg, num_groups,
                                  bias, y, lora)
    u, b, s, R, lora_strides = _update_args(lora, scale)
    cfg = _fixed_config(M, x.dtype)
    kp = data.shape[1]
    args = (x, data, scale, zero_point, bias if bias is not None else scale, y, u, b,
            M, N, K, kp, num_groups, R,
            x.stride(0), x.stride(1), data.stride(0), data.stride(1), s_sn, s_sg, y.stride(0), y.stride(1),
            *lora_strides, float(s))
    # per-row scales leave an integer tile (exact in tf32) unless the update puts them in it
    flags = dict(BITS=bits, SIGNED=scheme == "absmax", HAS_ZP=scheme == "zeropoint", PER_ROW=per_row,
                 G=g, HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype),
                 PRECISION=_precision(x.dtype, exact_tf32=per_row and lora is None), SWAP_AB=x.dtype != torch.float32,
                 HAS_LORA=lora is not None, BLOCK_R=16 if lora is None else _block_r(R, x.dtype))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _qlinear_kernel[grid](*args, **flags, **cfg)
    return y



def _dx_config(M: int, dtype: torch.dtype) -> dict:
    """Tiles of the backward (``_qlinear_dx_kernel``; BLOCK_K is the output's width, BLOCK_N the
    reduction's): the interpreter's small tiles (BLOCK_K 64: groups of 32 give two a tile), or the
    GPU's per M range, as kernels/nf4.py's dx (fp32, 3xTF32: shorter tiles)."""
    if _interpreted():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}
    if M <= 16:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    elif M <= 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}
    if dtype == torch.float32:
        cfg.update(BLOCK_N=32, BLOCK_K=64, num_stages=3)
    return {**cfg, "GROUP_M": 8}


def quant_linear_dx(dy: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    bits: int, scheme: str, group_size: int | None, K: int, lora=None) -> torch.Tensor:
    """dx [M, K] in dy's dtype: dy [M, N] (unit stride along N) @ W_deq, W the packed weight as for
    ``quant_linear`` (codes [N, ceil(K * bits / 8)], unit stride along K; scale and zero point
    dense), never materialized: the transposed fused dequantize-GEMM. ``lora`` = (V float32 [M, R]
    = dy B, A [R, K] in dy's dtype, scaling, dropout_p, seed tensor or None): + scaling *
    dropout'(V @ A) in the same kernel (the mask the forward's, kernels/lora.py's counter-based one)."""
    M, N = dy.shape
    dx = _common.new_output((M, K), dy, dy.dtype)
    if M == 0 or K == 0:
        return dx
    if N == 0 and lora is None:
        return dx.zero_()
    per_row, s_sn, s_sg, num_groups, g = _scale_layout(scale, group_size, "quant_linear_dx")
    cfg = _dx_config(M, dy.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    p, seed = (0.0, None) if lora is None else lora[3:]
    v, a, s, R, lora_strides = _update_args(None if lora is None else lora[:3], scale)
    drop_scale, seed_arg, thr31 = _drop_args(p, seed, dy)
    _qlinear_dx_kernel[grid](
        dy, data, scale, zero_point, dx, v, a, M, N, K, data.shape[1], num_groups, R,
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), data.stride(0), data.stride(1), s_sn, s_sg,
        *lora_strides, float(s), drop_scale, seed_arg, thr31,
        BITS=bits, SIGNED=scheme == "absmax", HAS_ZP=scheme == "zeropoint", PER_ROW=per_row, G=g,
        UPCAST=_upcast(dy.dtype), PRECISION=_precision(dy.dtype),  # scaled tiles: not exact in tf32
        HAS_LORA=lora is not None, DROPOUT=p > 0, BLOCK_R=16 if lora is None else _block_r(R, dy.dtype, dx=True),
        **cfg)
    return dx


def _gemv_config(M: int, N: int, K: int, bits: int, group_size: int | None, device: torch.device) -> dict:
    """Tiles and split of the decode path. BLOCK_M: M rounded up to a power of two (a static
    loop over the rows). GPU: 4 warps, 16-value chunks (CH); [16, 512] tiles (64 fp32 values a
    thread; 256 or 512 bytes of codes per row and tile) for per-row scales and groups >= 512
    or < 128; for groups of 128 and 256, [8192 / G, G] tiles at 4 bits and [4096 / G, G] at 8
    (the per-row zero points and scales of the wider tile took about 150 registers), so that
    the tile lies in one group: one scale per row (the per-chunk scale loads of smaller groups
    cost layout conversions through shared memory). The interpreter: [16, 64] tiles (groups of
    32: two per tile). SPLIT_K from _gemv_split_k, in whole K tiles."""
    block_m = triton.next_power_of_2(M)
    if _interpreted():
        cfg = {"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 64, "CH": 16}
    else:
        block_k = group_size if group_size in (128, 256) else 512
        block_n = (8192 if bits == 4 or block_k == 512 else 4096) // block_k
        cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "CH": 16,
               "num_warps": 4, "num_stages": 1}
    return _gemv_split(cfg, N, K, device)


def _gemv_split(cfg: dict, N: int, K: int, device: torch.device) -> dict:
    """A decode GEMV's tiles ``cfg`` with its K split (SPLIT_K splits of K_SPLIT, whole K tiles),
    by _gemv_split_k: the rule of this module's GEMV and kernels/nf4.py's."""
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    split = max(1, min(_gemv_split_k(triton.cdiv(N, cfg["BLOCK_N"]), k_tiles, device), k_tiles))
    k_split = triton.cdiv(k_tiles, split) * cfg["BLOCK_K"]
    return {**cfg, "K_SPLIT": k_split, "SPLIT_K": triton.cdiv(K, k_split)}


def _gemv_split_k(n_tiles: int, k_tiles: int, device: torch.device) -> int:
    """SPLIT_K of the decode path. GPU: the smallest power of two that gives at least 2 programs
    per SM (n_tiles * SPLIT_K >= 2 * SMs), keeping >= 2 K tiles per split. The interpreter: 2
    (tests force others through this function)."""
    if _interpreted():
        return 2
    want = 2 * _common.sm_count(device)
    split = 1
    while n_tiles * split < want and 2 * (split * 2) <= k_tiles:
        split *= 2
    return split


def _gemv_magics(bits: int, scheme: str) -> tuple[int, ...]:
    """MAGIC0..4 of _qlinear_gemv_kernel: the fp32 bits of 2**(23 - j * bits), for the field at
    bit j * bits (used up to bit 16), with the field's sign bit for absmax codes."""
    off = 1 << (bits - 1) if scheme == "absmax" else 0
    return tuple(((150 - j * bits) << 23) | (off << (j * bits)) if j * bits <= 16 else 0 for j in range(5))


def _code_units(data: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The codes as int32 words when every row is whole aligned words, else as uint8 bytes."""
    d = data.view(torch.uint8) if data.dtype == torch.int8 else data
    if d.shape[1] % 4 == 0 and d.stride(0) % 4 == 0 and d.storage_offset() % 4 == 0 and d.data_ptr() % 4 == 0:
        return d.view(torch.int32), True
    return d, False


def _quant_linear_gemv(x, data, scale, zero_point, bits, scheme, per_row, g, s_sn, s_sg, num_groups,
                       bias, y, lora=None) -> torch.Tensor:
    """The decode path of ``quant_linear`` (M <= GEMV_MAX_M), into y (``lora``: as quant_linear's)."""
    M, K = x.shape
    N = data.shape[0]
    cfg = _gemv_config(M, N, K, bits, None if per_row else g, x.device)
    split = cfg.pop("SPLIT_K")
    k_split = cfg.pop("K_SPLIT")
    ws = _common.new_output((split, M, N), x, torch.float32) if split > 1 else y  # y: WS is not written
    units, words = _code_units(data)
    cfg["NUM_STAGES"] = GEMV_STAGES if words else 1
    b = bias if bias is not None else scale
    u, bl, s, R, lora_strides = _update_args(lora, scale)
    _qlinear_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), split)](
        x, units, scale, zero_point, b, y, ws, u, bl,
        M, N, K, units.shape[1], num_groups, k_split, R, *_gemv_magics(bits, scheme),
        x.stride(0), x.stride(1), units.stride(0), units.stride(1), s_sn, s_sg, y.stride(0), y.stride(1),
        *lora_strides, float(s),
        BITS=bits, SIGNED=scheme == "absmax", HAS_ZP=scheme == "zeropoint", PER_ROW=per_row, G=g,
        HAS_BIAS=bias is not None, TO_WS=split > 1, WORDS=words, HAS_LORA=lora is not None,
        BLOCK_R=_rank_tile(max(R, 1)), **cfg)
    if split > 1:
        block = min(1024, triton.next_power_of_2(N))
        _qlinear_splitk_sum_kernel[(triton.cdiv(N, block), M)](
            ws, b, y, M, N, split, y.stride(0), y.stride(1), HAS_BIAS=bias is not None, BLOCK=block)
    return y


def _a8_config(M: int, group_size: int | None) -> dict:
    """Tiles of the W*A8 kernel: the int8 dot wants K tiles of >= 32; BLOCK_K never exceeds the
    group (one scale per row and K tile). Chosen so that no sm_90 / sm_80 build spills (registers
    read from tests/_aot.py's table: at most about 240 a thread); not timed yet."""
    if _interpreted():
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    elif M <= 16:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}
    elif M <= 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}
    else:  # grouped: the per-tile int32 product and the fp32 sum are both live: narrower N tiles
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128 if group_size is None else 64, "BLOCK_K": 64,
               "num_warps": 8, "num_stages": 3}
    if group_size is not None:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)
    return {**cfg, "GROUP_M": 8}


A8_CHAIN_LIMIT = 2**31  # |int32 sums| of the per-row kernel's single accumulator stay below this
# Above this many rows (the tiles of 64 and 128 rows, wgmma-sized on sm_90) the W*A8 kernel takes
# the transposed tile; the 16-row tiles run mma.sync either way, where the transposed form only
# costs registers (it spilled the sm_80 build for byte-unaligned codes)
A8_SWAP_MIN_M = 16


def _a8_chain_exact(K: int, bits: int, scheme: str) -> bool:
    """Whether one int32 accumulator over all of K cannot overflow: |xq| <= 127 times the largest
    |weight operand| (4 bits: |q - z| <= 15; 8-bit absmax 127; 8-bit zero point: |q - z| <= 255
    after the correction, |q - 128| <= 128 before it). Else (K beyond 66311 at 8 bits) each K
    tile's int32 dot is converted to fp32 and summed there."""
    wmax = 15 if bits == 4 else (255 if scheme == "zeropoint" else 127)
    return K * 127 * wmax < A8_CHAIN_LIMIT


def supports_a8(group_size: int | None) -> bool:
    """Granularities of the W*A8 kernel: per row / per tensor, or power-of-two groups >= 32."""
    return group_size is None or (_is_pow2(group_size) and 32 <= group_size <= 1024)


def quant_linear_a8(xq: torch.Tensor, x_scale: torch.Tensor, x_mul: float, data: torch.Tensor,
                    scale: torch.Tensor, zero_point: torch.Tensor, bits: int, scheme: str,
                    group_size: int | None, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] in out_dtype: y = (xq * x_scale * x_mul) @ ((codes - zero_point) * scale)^T + bias.

    xq [M, K] int8 activation codes (unit stride along K); x_scale float32 [M] (one per row:
    dynamic, x_mul = 1 / 127 for absmax row scales) or one element (static: the per-tensor
    step, x_mul = 1); the weight as for ``quant_linear`` (4-bit any scheme, 8-bit absmax int8
    or zeropoint uint8 codes). Per K tile: the int8 x int8 -> int32 dot of the codes with
    (codes - zero_point) (4 bits: |v| <= 15; 8-bit zeropoint: q - 128 and the exact integer
    correction (z - 128) * sum_k xq), times the group's scale, accumulated in fp32; the row
    scale of x in the epilogue. group_size must satisfy ``supports_a8``.
    """
    M, K = xq.shape
    N = data.shape[0]
    y = _common.new_output((M, N), xq, out_dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        return y if bias is None else y.add_(bias)
    if not supports_a8(group_size):
        raise ValueError(f"quant_linear (int8 activations) kernel: group_size must be a power of two "
                         f"in [32, 1024], got {group_size}")
    per_row = group_size is None
    if per_row:
        s_sn = scale.stride(0) if scale.dim() == 1 else 0
        s_sg, g = 0, 32
    else:
        s_sn, s_sg, g = scale.stride(0), scale.stride(1), group_size
    cfg = _a8_config(M, group_size)
    args = (xq, x_scale, data, scale, zero_point, bias if bias is not None else scale, y,
            M, N, K, data.shape[1], float(x_mul),
            xq.stride(0), xq.stride(1), x_scale.stride(0) if x_scale.dim() == 1 and x_scale.numel() > 1 else 0,
            data.stride(0), data.stride(1), s_sn, s_sg, y.stride(0), y.stride(1))
    flags = dict(BITS=bits, SIGNED=scheme == "absmax", HAS_ZP=scheme == "zeropoint", PER_ROW=per_row,
                 G=g, HAS_BIAS=bias is not None, CHAIN=per_row and _a8_chain_exact(K, bits, scheme),
                 SWAP_AB=M > A8_SWAP_MIN_M)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _qlinear_a8_kernel[grid](*args, **flags, **cfg)
    return y
