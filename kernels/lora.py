"""Triton kernels for LoRA: y = x W^T + b + s * (dropout(x) A^T) B^T.

Four kernels, reused by forward and backward through strides:

``_lora_gemm_kernel``  the base GEMM ``Y = X Wt`` with the low-rank update fused
    into its epilogue: ``Y += s * U Bt`` (+ bias). ``U`` either comes precomputed
    (``FUSE_SHRINK=False``) or is accumulated inside the K loop from the X tiles
    already in registers (``FUSE_SHRINK=True``, r <= 64), which saves a launch and
    a second read of X; each N-tile then recomputes U for its rows, so it pays
    at small M. Backward dx = dy W + s * drop'((dy B) A) is the same kernel with W
    and A read transposed and the dropout mask applied to the update.
``_shrink_kernel``     U = scale * dropout(X) At in fp32, optionally split over K into fp32 partials.
``_grad_a_kernel``     dA = scale * V^T dropout(X), split over M into fp32 partials.
``_sum_splits_kernel`` the fixed-order sum of split partials (Y: + bias, cast; U: fp32).

Split-K (few output tiles: decode rows, the shrink's [M, r] output) never uses atomics: every split
writes its own fp32 partial ([SPLIT, M, N] / [SPLIT, M, R]) and ``_sum_splits_kernel`` adds them
in split order, so results are bitwise reproducible. Split counts are runtime arguments (no
recompilation per count) and a pure function of the shapes and the SM count
(``decode_gemm_config``, ``shrink_config``); the interpreter's SM count of 8 makes small test
shapes take the split paths.

Dropout never materializes dropout(x): the mask is the counter-based hash of
``fastpeft.reference.dropout`` evaluated on (row, col) of X inside the kernel.
Kernels only: no policy here (fastpeft/ops/lora.py decides and wraps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import autotune_enabled as _autotune_enabled
from ._common import dot as _dot
from ._common import grouped_pid as _grouped_pid
from ._common import interpreted as _interpreted
from ._common import precision as _precision
from ._common import tuning_bench as _tuning_bench
from ._common import upcast as _upcast


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _mix32(x):
    # lowbias32 (mod 2**32); x is uint32
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _keep_mask(seed, rows, cols, thr31):
    """keep[i, j] = (mix32(mix32(seed ^ mix32(row_i)) ^ col_j) >> 1) >= thr31."""
    rk = _mix32(seed.to(tl.uint32) ^ _mix32(rows.to(tl.uint32)))
    h = _mix32(rk[:, None] ^ cols.to(tl.uint32)[None, :])
    return (h >> 1).to(tl.int32) >= thr31


# The LoRA update of the GEMMs on a quantized base (kernels/nf4.py, kernels/qlinear.py: QLoRA,
# Dettmers et al. 2023), U = dropout(x) A^T (float32 [M, R], from ``_shrink_kernel``) given: the
# forward's s * U B^T goes into the base GEMM's fp32 accumulator (before or after its K loop), the
# backward's s * dropout'(V A) (V = dy B) starts it (masked while it holds the update alone): no
# second output tile live next to it. (U * s) rounded to x's dtype for tl.dot, R in BLOCK_R
# chunks; the decode GEMVs add it by split 0 in their epilogue.


@triton.jit
def update_start(acc, X, U, BL, offs_m, offs_n, mask_m, mask_n, R, s_um, s_ur, s_bn, s_br, scaling,
                 SWAP_AB: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] (SWAP_AB: acc^T [BLOCK_N, BLOCK_M]) += scaling * U @ B^T, U float32
    [M, R], B [N, R] in X's dtype (X: the GEMM's input pointer, for its dtype). The rank loop is
    not software-pipelined (usually one chunk: staging it took up to 180 KB of shared memory)."""
    dt = X.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # not pipelined: no shared-memory stages for it
        rr = r0 + offs_r
        mask_r = rr < R
        if SWAP_AB:  # acc^T += B [BLOCK_N, BLOCK_R] @ (s U)^T [BLOCK_R, BLOCK_M]
            u = tl.load(U + offs_m[None, :].to(tl.int64) * s_um + rr[:, None] * s_ur,
                        mask=mask_r[:, None] & mask_m[None, :], other=0.0)
            b = tl.load(BL + offs_n[:, None].to(tl.int64) * s_bn + rr[None, :] * s_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc = _dot(b, (u * scaling).to(dt), acc, UPCAST, PRECISION)
        else:  # acc += (s U) [BLOCK_M, BLOCK_R] @ B^T [BLOCK_R, BLOCK_N]
            u = tl.load(U + offs_m[:, None].to(tl.int64) * s_um + rr[None, :] * s_ur,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(BL + offs_n[None, :].to(tl.int64) * s_bn + rr[:, None] * s_br,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = _dot((u * scaling).to(dt), b, acc, UPCAST, PRECISION)
    return acc


@triton.jit
def update_dx_start(acc, DY, V, AL, offs_m, offs_k, mask_m, mask_k, R, s_vm, s_vr, s_ar, s_ak, scaling, drop_scale,
                    SEED, thr31, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """acc^T [BLOCK_K, BLOCK_M] += the backward's scaling * keep / (1 - p) * (V @ A)^T, V float32
    [M, R] (dy B), A [R, K] in DY's dtype, keep the forward's dropout mask at (row, col) of x
    (DROPOUT): acc^T = A^T [BLOCK_K, BLOCK_R] @ (s V)^T [BLOCK_R, BLOCK_M], masked (acc zero on entry)."""
    dt = DY.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):  # left pipelined: with num_stages=1 kernels/nf4.py's unaligned dx spilled
        rr = r0 + offs_r
        mask_r = rr < R
        v = tl.load(V + offs_m[None, :].to(tl.int64) * s_vm + rr[:, None] * s_vr,
                    mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        a = tl.load(AL + offs_k[:, None] * s_ak + rr[None, :].to(tl.int64) * s_ar,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _dot(a, (v * scaling).to(dt), acc, UPCAST, PRECISION)
    if DROPOUT:
        keep = tl.trans(_keep_mask(tl.load(SEED), offs_m, offs_k, thr31))
        acc = tl.where(keep, acc * drop_scale, 0.0)
    return acc


@triton.jit
def update_gemv(acc, X, U, BL, pid_k, offs_m, n64, mask_n, M, R, s_um, s_ur, s_bn, s_br, scaling,
                MMA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """A decode GEMV's y^T [BLOCK_N, BLOCK_M] += scaling * (U B^T)^T by split 0 only: in fp32 on
    the CUDA cores, or (MMA) as the GEMM, (s U)^T rounded to X's dtype, B's tile the register operand."""
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, tl.where(pid_k == 0, R, 0), BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        b_t = tl.load(BL + n64[:, None] * s_bn + rr[None, :] * s_br, mask=mask_n[:, None] & mask_r[None, :],
                      other=0.0)  # [BLOCK_N, BLOCK_R]
        if MMA:
            u_t = tl.load(U + offs_m[None, :].to(tl.int64) * s_um + rr[:, None] * s_ur,
                          mask=mask_r[:, None] & (offs_m < M)[None, :], other=0.0)
            acc = _dot(b_t, (u_t * scaling).to(X.dtype.element_ty), acc, UPCAST, PRECISION)
        else:
            b_t = b_t.to(tl.float32)
            for i in tl.static_range(BLOCK_M):
                ui = tl.load(U + i * s_um + rr * s_ur, mask=mask_r & (i < M), other=0.0)
                part = tl.sum(b_t * (ui * scaling)[None, :], axis=1)
                acc = tl.where(offs_m[None, :] == i, acc + part[:, None], acc)
    return acc


# ---------------------------------------------------------------------------------------------
# kernels


# M is not specialized (a new batch size reuses the compiled kernel); K_SPLIT (a multiple of
# BLOCK_K) and the partials' split strides (padded to 16 elements) always specialize alike.
@triton.jit(do_not_specialize=["M", "thr31"])
def _lora_gemm_kernel(
    X, W, BIAS, U, A, UOUT, BL, Y,
    M, N, K, R, M_BUCKET, K_SPLIT,
    s_xm, s_xk, s_wn, s_wk, s_um, s_ur, s_ar, s_ak, s_os, s_om, s_or, s_bn, s_br, s_ys, s_ym, s_yn,
    scaling, shrink_scale, drop_scale, SEED, thr31,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, STORE_U: tl.constexpr,
    SHRINK_DROPOUT: tl.constexpr, EPILOGUE_DROPOUT: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # SPLIT_K: grid (output tiles, K splits). Split s covers K in [s * K_SPLIT, (s + 1) * K_SPLIT)
    # and writes its fp32 partial at Y + s * s_ys (its partial U at UOUT + s * s_os); everything in
    # the update is linear in K, so each split adds its own s * U_s Bt (U given: split 0 adds it).
    # Without SPLIT_K (grid (output tiles, 1)) Y is the output and K_SPLIT, s_ys, s_os are unused.
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SPLIT_K:
        pid_s = tl.program_id(1)
        k_lo = pid_s * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        r_hi = tl.where(pid_s == 0, R, 0)
    else:
        pid_s = 0
        k_lo = 0
        k_hi = K
        r_hi = R

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dt = X.dtype.element_ty

    seed = 0  # the dropout seed is a device tensor, so a replayed CUDA graph uses a fresh draw
    if SHRINK_DROPOUT:
        seed = tl.load(SEED)
    if EPILOGUE_DROPOUT:
        seed = tl.load(SEED)

    # With U precomputed, the update s * U Bt (masked for backward dx) starts the
    # accumulator, so no second [BLOCK_M, BLOCK_N] tile is live next to it.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not FUSE_SHRINK:
        for r0 in range(0, r_hi, BLOCK_R):
            rr = r0 + offs_r
            u = tl.load(U + offs_m[:, None].to(tl.int64) * s_um + rr[None, :] * s_ur,
                        mask=mask_m[:, None] & (rr < R)[None, :], other=0.0)
            b = tl.load(BL + offs_n[None, :].to(tl.int64) * s_bn + rr[:, None] * s_br,
                        mask=(rr < R)[:, None] & mask_n[None, :], other=0.0)
            acc = _dot((u * scaling).to(dt), b, acc, UPCAST, PRECISION)
        if EPILOGUE_DROPOUT:
            acc = tl.where(_keep_mask(seed, offs_m, offs_n, thr31), acc * drop_scale, 0.0)
    else:
        acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    x_ptrs = X + offs_m[:, None].to(tl.int64) * s_xm + (k_lo + offs_k)[None, :] * s_xk
    w_ptrs = W + (k_lo + offs_k)[:, None] * s_wk + offs_n[None, :].to(tl.int64) * s_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):  # K_SPLIT is a multiple of BLOCK_K: only K cuts a tile
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(x, w, acc, UPCAST, PRECISION)
        if FUSE_SHRINK:
            a = tl.load(A + (k0 + offs_k)[:, None] * s_ak + offs_r[None, :] * s_ar,
                        mask=mask_k[:, None] & (offs_r < R)[None, :], other=0.0)
            if SHRINK_DROPOUT:
                x = tl.where(_keep_mask(seed, offs_m, k0 + offs_k, thr31), x, 0.0).to(dt)
            acc_u = _dot(x, a, acc_u, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * s_xk
        w_ptrs += BLOCK_K * s_wk

    if FUSE_SHRINK:  # U was accumulated from the X tiles: the update goes in the epilogue
        u = acc_u * shrink_scale
        if STORE_U:
            if SPLIT_K:
                UOUT += pid_s * s_os
            tl.store(UOUT + offs_m[:, None].to(tl.int64) * s_om + offs_r[None, :] * s_or, u,
                     mask=mask_m[:, None] & (offs_r < R)[None, :] & (pid_n == 0))
        b = tl.load(BL + offs_n[None, :].to(tl.int64) * s_bn + offs_r[:, None] * s_br,
                    mask=(offs_r < R)[:, None] & mask_n[None, :], other=0.0)
        us = (u * scaling).to(dt)
        if EPILOGUE_DROPOUT:
            lo = _dot(us, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
            acc += tl.where(_keep_mask(seed, offs_m, offs_n, thr31), lo * drop_scale, 0.0)
        else:
            acc = _dot(us, b, acc, UPCAST, PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SPLIT_K:
        Y += pid_s.to(tl.int64) * s_ys
    tl.store(Y + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "thr31"])
def _shrink_kernel(
    X, A, U, M, K, R, K_SPLIT,
    s_xm, s_xk, s_ar, s_ak, s_us, s_um, s_ur,
    out_scale, SEED, thr31,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # grid (row tiles, rank tiles, K splits): split s sums K in [s * K_SPLIT, (s + 1) * K_SPLIT)
    # into its own partial U + s * s_us (no atomics; the caller sums the partials in order)
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    dt = X.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # K_SPLIT is a multiple of BLOCK_K: only K cuts a tile
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(X + offs_m[:, None].to(tl.int64) * s_xm + kk[None, :] * s_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, kk, thr31), x, 0.0).to(dt)
        a = tl.load(A + kk[:, None] * s_ak + offs_r[None, :] * s_ar,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _dot(x, a, acc, UPCAST, PRECISION)
    acc = acc * out_scale
    u_ptrs = U + pid_k.to(tl.int64) * s_us + offs_m[:, None].to(tl.int64) * s_um + offs_r[None, :] * s_ur
    tl.store(u_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["M", "SPLIT_M", "thr31"])
def _grad_a_kernel(
    V, X, P, M, K, R, SPLIT_M,
    s_vm, s_vr, s_xm, s_xk, s_ps, s_pr, s_pk,
    out_scale, SEED, thr31,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_r = offs_r < R
    dt = X.dtype.element_ty
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    for m0 in range(pid_s * BLOCK_M, M, BLOCK_M * SPLIT_M):
        mm = m0 + offs_m
        mask_mm = mm < M
        vt = tl.load(V + mm[None, :].to(tl.int64) * s_vm + offs_r[:, None] * s_vr,
                     mask=mask_r[:, None] & mask_mm[None, :], other=0.0)
        x = tl.load(X + mm[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk,
                    mask=mask_mm[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep_mask(seed, mm, offs_k, thr31), x, 0.0).to(dt)
        acc = _dot(vt.to(dt), x, acc, UPCAST, PRECISION)
    tl.store(P + pid_s * s_ps + offs_r[:, None] * s_pr + offs_k[None, :] * s_pk, acc * out_scale,
             mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _sum_partials(P, offs, mask, S, s_ps, BLOCK: tl.constexpr):
    """sum_s P[s * s_ps + offs] for s = 0, 1, ..., S - 1, in that order, in fp32."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    p_ptrs = P + offs
    for _ in range(0, S):
        acc += tl.load(p_ptrs, mask=mask, other=0.0)
        p_ptrs += s_ps
    return acc


@triton.jit(do_not_specialize=["M", "S"])
def _sum_splits_kernel(
    P, BIAS, Y, PU, U, M, N, R, S,
    s_ps, s_ym, s_yn, s_qs, s_um, s_ur,
    HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_U: tl.constexpr, BLOCK: tl.constexpr,
):
    """Y[m, n] = sum_s P[s, m, n] (+ bias[n]) in Y's dtype and U[m, r] = sum_s PU[s, m, r], both
    summed in split order s = 0, 1, ..., S - 1 (bitwise reproducible). P [S, M, N] and PU [S, M, R]
    are fp32 partials, row-major inside a split (split strides s_ps, s_qs); a program owns BLOCK
    consecutive elements of Y and of U (flat row-major index)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if HAS_Y:
        n_elem = M.to(tl.int64) * N
        mask = offs < n_elem
        acc = _sum_partials(P, offs, mask, S, s_ps, BLOCK)
        m = offs // N
        n = offs - m * N
        if HAS_BIAS:
            acc += tl.load(BIAS + n, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + m * s_ym + n * s_yn, acc.to(Y.dtype.element_ty), mask=mask)
    if HAS_U:
        n_u = M.to(tl.int64) * R
        mask_u = offs < n_u
        acc_u = _sum_partials(PU, offs, mask_u, S, s_qs, BLOCK)
        m = offs // R
        r = offs - m * R
        tl.store(U + m * s_um + r * s_ur, acc_u, mask=mask_u)


# ---------------------------------------------------------------------------------------------
# configs

# Rows up to which lora_gemm runs the decode configs: one fixed config per row range (16, 32 and
# 64-row tiles), never autotuned (a serving loop meets every batch size in its first steps: no
# tuning pause there, and three compiled variants), split over K while the output tiles are
# fewer than two per SM (``decode_gemm_config``). Above it the autotuner picks among the large
# configs, keyed on a few row buckets (``m_bucket``), or FASTPEFT_AUTOTUNE=0 takes a fixed one.
DECODE_MAX_M = 64
# Autotune buckets above DECODE_MAX_M: a row count M is tuned as the first bucket >= M (the last
# one for anything larger), so M = 65..8192 and beyond cost four tuning runs per (N, K, flags).
M_BUCKETS = (128, 512, 2048, 8192)
# Up to MID_M rows no config taller than MID_M / 2, so that a tile is never mostly padding rows.
MID_M = 128
# Above this rank, a tile larger than 128 x 128 spills: the U and Bt tiles of 64 ranks sit in
# registers next to the fp32 accumulator.
SPILL_RANK, SPILL_TILE = 32, 128 * 128
# A K split keeps at least this many K tiles (its load pipeline fills; the partial sums it writes
# and the reduction stay a small part of its work).
MIN_K_TILES_PER_SPLIT = 4
# Elements a program of _sum_splits_kernel reduces.
SUM_BLOCK = 1024

_LARGE_M_CONFIGS = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
# Operands without the 16-element alignment hint (K or N, a row stride, or a base pointer not a
# multiple of 16: real layers are aligned) are loaded element by element, and every config above
# spills then (up to 1.5 KB of stack in 16-bit); these do not (tests/_aot.py), and are the only
# ones tried for such operands.
_UNALIGNED_CONFIGS = [(128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)]
# fp32 (3xTF32 dots: hi and lo halves of both operands): the 16-bit configs spill, aligned or not;
# these do not, either way.
_FP32_CONFIGS = [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)]


def m_bucket(M: int) -> int:
    """The autotune key of a row count above DECODE_MAX_M (see M_BUCKETS)."""
    return next((b for b in M_BUCKETS if M <= b), M_BUCKETS[-1])


_ALIGNED_ARGS = ("K", "N", "s_xm", "s_xk", "s_wn", "s_wk", "s_um", "s_ur", "s_ar", "s_ak", "s_bn", "s_br",
                 "s_ym", "s_yn")


def _aligned(args: dict) -> bool:
    """Whether the JIT sees every size and stride of the GEMM's operands as 1 or a multiple of 16
    and the X, W, Y pointers 16-byte aligned (vector loads and stores)."""
    return (all(args[k] == 1 or args[k] % 16 == 0 for k in _ALIGNED_ARGS)
            and all(args[k].data_ptr() % 16 == 0 for k in ("X", "W", "Y") if k in args))


def _prune(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    br = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    epilogue_dropout = kwargs.get("EPILOGUE_DROPOUT", named_args.get("EPILOGUE_DROPOUT", False))
    family = (_FP32_CONFIGS if named_args["X"].dtype == torch.float32
              else _LARGE_M_CONFIGS if _aligned(named_args) else _UNALIGNED_CONFIGS)
    keep = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (bm, bn, bk, c.num_warps, c.num_stages) not in family:
            continue
        if mb <= MID_M and bm > MID_M // 2:
            continue
        # above 128 x 128: spills with 64 ranks (U and Bt tiles next to the accumulator) and with
        # backward dx's dropout mask (128 x 256: 144 B of stack)
        if (br > SPILL_RANK or epilogue_dropout) and bm * bn > SPILL_TILE:
            continue
        keep.append(c)
    if keep:
        return keep
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                   c.num_stages) == family[-1]]


def _make_autotuned():
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_warps=w, num_stages=s)
        for (bm, bn, bk, w, s) in dict.fromkeys(_LARGE_M_CONFIGS + _UNALIGNED_CONFIGS + _FP32_CONFIGS)
    ]
    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "N", "K", "BLOCK_R", "FUSE_SHRINK", "EPILOGUE_DROPOUT"],
        prune_configs_by={"early_config_prune": _prune},
        do_bench=_tuning_bench,
    )(_lora_gemm_kernel)


_autotuned_gemm = None


def _gemm_launcher():
    global _autotuned_gemm
    if _autotuned_gemm is None:
        _autotuned_gemm = _make_autotuned()
    return _autotuned_gemm


def _fixed_gemm_config(M: int, block_r: int, dtype: torch.dtype, aligned: bool = True) -> dict:
    """One config per M range above DECODE_MAX_M: the interpreter's small tiles, or the GPU's
    without autotuning (FASTPEFT_AUTOTUNE=0).

    The GPU configs fit the shared memory of sm_80 (164 KiB) and sm_90 in every dtype and do not
    spill on either for aligned operands (tests/test_triton_compile.py checks it), nor on sm_90
    for unaligned ones (``_aligned``: shorter K tiles then).
    """
    if _interpreted():  # the interpreter runs one program at a time in numpy
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
    wide = dtype == torch.float32
    small = M <= MID_M or block_r > 32
    if wide:  # 3xTF32 dots (hi / lo operand halves): 8 warps, K tiles of 32, short tiles next to 64 ranks
        cfg = {"BLOCK_M": 32 if block_r > 32 else 64 if M <= MID_M else 128, "BLOCK_N": 64, "BLOCK_K": 32,
               "num_warps": 8, "num_stages": 3}
    elif not aligned:  # element-wise loads: short K tiles
        if small:
            cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4}
        else:
            cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    elif small:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    return {**cfg, "GROUP_M": 8}


def _split_count(programs: int, k_tiles: int, device: torch.device, split_k: int | None) -> tuple[int, int]:
    """(splits, K tiles per split): enough K splits for at least two programs per SM, each with at
    least MIN_K_TILES_PER_SPLIT K tiles; ``split_k`` forces a count (tests). A pure function of
    shapes and the SM count (the interpreter's is 8, so small test shapes split too)."""
    if split_k is None:
        want = 2 * _common.sm_count(device)
        split = 1 if programs >= want else min(triton.cdiv(want, programs),
                                               max(1, k_tiles // MIN_K_TILES_PER_SPLIT))
    else:
        split = max(1, min(int(split_k), k_tiles))
    per = triton.cdiv(k_tiles, split)
    return triton.cdiv(k_tiles, per), per


def decode_gemm_config(M: int, N: int, K: int, block_r: int, dtype: torch.dtype, device: torch.device,
                       split_k: int | None = None, aligned: bool = True) -> dict:
    """The GEMM's config for M <= DECODE_MAX_M rows: 16, 32 or 64-row tiles, 64 columns (the
    interpreter's: 16 or 32 x 32), and SPLIT K splits of K_SPLIT (a multiple of BLOCK_K) while
    the output tiles are fewer than two per SM: at N = 4096 on 132 SMs, 64 tiles of 64 columns
    become 5 x 64 programs. A pure function of the shapes (``split_k`` forces the split count).
    Operands without the 16-element alignment (``_aligned``) take shorter K tiles: no spills."""
    if _interpreted():
        cfg = {"BLOCK_M": 16 if M <= 16 else 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    elif dtype == torch.float32:  # 3xTF32 dots (hi / lo operand halves): short K tiles, 8 warps
        bm = 16 if M <= 16 else 64 if block_r <= 32 else 32
        cfg = {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 32 if aligned else 16, "num_warps": 8, "num_stages": 3}
    else:
        bm = 16 if M <= 16 else 32 if M <= 32 else 64
        bk = (128 if bm <= 32 else 64) if aligned else 32
        warps = 8 if bm == 64 and not aligned else 4  # (4 spill on sm_80 next to 64 ranks)
        cfg = {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": bk, "num_warps": warps, "num_stages": 4}
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split, per = _split_count(tiles, triton.cdiv(K, cfg["BLOCK_K"]), device, split_k)
    return {**cfg, "GROUP_M": 8, "SPLIT": split, "K_SPLIT": per * cfg["BLOCK_K"]}


def _block_r(r: int, cap: int = 64) -> int:
    return min(max(16, triton.next_power_of_2(r)), cap)


def update_block_r(r: int, dtype: torch.dtype, dx: bool = False) -> int:
    """The rank chunk of the quantized-base GEMMs' update: a power of two, tl.dot's smallest K
    being 16; fp32 (3xTF32) takes chunks of 16 (64 spilled on sm_80 next to the 64 x 64 and
    128 x 64 tiles). 16-bit: the forward's (``update_start``) at most 32 (64 took 160-200
    registers at kernels/qlinear.py's 128 x 128 tile, 1 block an SM; 32 leaves the base's
    count); the backward's (``update_dx_start``) 16 or 64 (32 took 212 registers on sm_90 and
    spilled on sm_80 in kernels/nf4.py's dx at its 64 x 64 and 128 x 64 tiles; 64, a chunk half
    masked at r = 32: 126-171, its rank loop's stages 90-131 KB of shared memory).
    benchmarks/NOTES.md has the counts."""
    if dtype == torch.float32:
        return _block_r(r, 16)
    if dx:
        return 16 if r <= 16 else 64
    return _block_r(r, 32)


def update_args(lora, stand_in):
    """(U, B, scaling, R, (s_um, s_ur, s_bn, s_br)) of a quantized-base GEMM's LoRA update ``lora``
    = (U [M, R], B [N, R], scaling) (the backward's: (V [M, R], A [R, K], scaling)), or stand-ins
    (never read) without one."""
    if lora is None:
        return stand_in, stand_in, 0.0, 0, (0, 0, 0, 0)
    u, b, s = lora
    return u, b, s, u.shape[1], (u.stride(0), u.stride(1), b.stride(0), b.stride(1))


def _drop_args(dropout_p: float, seed: torch.Tensor | None, like: torch.Tensor):
    """(1 / (1 - p), the seed pointer argument, the 31-bit drop threshold). ``seed``: the int64
    one-element tensor holding the 31-bit dropout seed (read by the kernel), or None without
    dropout (then ``like`` stands in for the pointer, never read)."""
    if dropout_p == 0.0:
        return 1.0, like, 0
    if seed is None:
        raise ValueError("dropout needs a seed tensor")
    return 1.0 / (1.0 - dropout_p), seed, int(dropout_p * 2**31)


def _partials(split: int, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """fp32 [split, rows, cols], row-major inside a split, splits 16 elements apart at least (the
    split stride then always specializes as a multiple of 16: one compiled kernel)."""
    ld = triton.cdiv(rows * cols, 16) * 16
    return _common.new_output((split * ld,), like, torch.float32).as_strided((split, rows, cols), (ld, cols, 1))


def _sum_splits(part: torch.Tensor | None, bias: torch.Tensor | None, y: torch.Tensor | None,
                u_part: torch.Tensor | None, u: torch.Tensor | None) -> None:
    """y = sum over splits of part (+ bias), u = sum over splits of u_part, in split order."""
    ref = part if part is not None else u_part
    split, M = ref.shape[0], ref.shape[1]
    N = part.shape[2] if part is not None else 1
    R = u_part.shape[2] if u_part is not None else 1
    n = max(M * N if part is not None else 0, M * R if u_part is not None else 0)
    if n == 0:
        return
    _sum_splits_kernel[(triton.cdiv(n, SUM_BLOCK),)](
        part if part is not None else ref, bias if bias is not None else ref, y if y is not None else ref,
        u_part if u_part is not None else ref, u if u is not None else ref, M, N, R, split,
        part.stride(0) if part is not None else 0, *(y.stride() if y is not None else (0, 0)),
        u_part.stride(0) if u_part is not None else 0, *(u.stride() if u is not None else (0, 0)),
        HAS_Y=part is not None, HAS_BIAS=bias is not None and part is not None, HAS_U=u_part is not None,
        BLOCK=SUM_BLOCK, num_warps=4)


FUSE_SHRINK_MAX_R = 64



# ---------------------------------------------------------------------------------------------
# launchers (2-D tensors; shapes and devices are checked by fastpeft.ops)


def lora_gemm(x: torch.Tensor, w: torch.Tensor, N: int, w_strides: tuple[int, int],
              bias: torch.Tensor | None, bl: torch.Tensor, bl_strides: tuple[int, int], R: int,
              scaling: float, *, u: torch.Tensor | None = None, a: torch.Tensor | None = None,
              a_strides: tuple[int, int] | None = None, store_u: bool = False,
              dropout_p: float = 0.0, seed: torch.Tensor | None = None, shrink_dropout: bool = False,
              epilogue_dropout: bool = False, split_k: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Y[m, n] = sum_k X[m, k] Wt[k, n] + s * sum_r U[m, r] Bt[r, n] (+ bias[n]).

    Operands are read through strides, so a weight and its transpose are one tensor:
    element (n, k) of the [N, K] operand is at ``w + n * s_wn + k * s_wk`` with
    ``w_strides = (s_wn, s_wk)``; element (n, r) of the [N, R] update weight is at
    ``bl + n * s_bn + r * s_br``. Either ``u`` [M, R] (fp32) is given, or ``a`` with
    ``a_strides = (s_ar, s_ak)`` and U = dropout(X) At is accumulated in
    the K loop from the X tiles (R <= 64), and returned when ``store_u``.
    ``epilogue_dropout`` applies the (row, col) mask of Y to the update (backward dx).
    Up to DECODE_MAX_M rows the K loop may be split (``decode_gemm_config``; ``split_k`` forces
    a split count): fp32 partials of Y (and U) summed in split order by a second, small kernel.
    """
    M, K = x.shape
    fuse = u is None
    if fuse and R > FUSE_SHRINK_MAX_R:
        raise ValueError(f"fused shrink supports r <= {FUSE_SHRINK_MAX_R}, got {R}")
    block_r = _block_r(R)
    decode = M <= DECODE_MAX_M or split_k is not None
    u_st = u.stride() if u is not None else (0, 0)
    aligned = _aligned({"K": K, "N": N, "s_xm": x.stride(0), "s_xk": x.stride(1), "s_wn": w_strides[0],
                        "s_wk": w_strides[1], "s_um": u_st[0], "s_ur": u_st[1],
                        "s_ar": a_strides[0] if a_strides else 0, "s_ak": a_strides[1] if a_strides else 0,
                        "s_bn": bl_strides[0], "s_br": bl_strides[1], "s_ym": N, "s_yn": 1,
                        "X": x, "W": w})  # Y is a new buffer (aligned)
    cfg = decode_gemm_config(M, N, K, block_r, x.dtype, x.device, split_k, aligned) if decode else None
    split = cfg.pop("SPLIT") if decode else 1
    k_split = cfg.pop("K_SPLIT") if decode else triton.cdiv(K, 256) * 256  # any multiple of BLOCK_K >= K
    y = _common.new_output((M, N), x, x.dtype)
    u_out = _common.new_output((M, R), x, torch.float32) if fuse and store_u else None
    y_arg = y if split == 1 else _partials(split, M, N, x)
    uo_arg = u_out if split == 1 or u_out is None else _partials(split, M, R, x)
    s_ys = 0 if split == 1 else y_arg.stride(0)
    s_os, s_om, s_or = (0, uo_arg.stride(-2), uo_arg.stride(-1)) if uo_arg is not None else (0, 0, 0)
    if uo_arg is not None and split > 1:
        s_os = uo_arg.stride(0)
    u_arg, s_um, s_ur = (x, 0, 0) if fuse else (u, u.stride(0), u.stride(1))
    a_arg, (s_ar, s_ak) = (a, a_strides) if fuse else (x, (0, 0))
    drop_scale, seed_arg, thr31 = _drop_args(dropout_p, seed, x)
    shrink_dropout = bool(fuse and shrink_dropout and dropout_p > 0)
    epilogue_dropout = bool(epilogue_dropout and dropout_p > 0)
    has_bias = bias is not None and split == 1  # split: the reduction adds it
    args = (x, w, bias if has_bias else x, u_arg, a_arg, uo_arg if uo_arg is not None else x, bl, y_arg,
            M, N, K, R, 16 if decode else m_bucket(M), k_split,
            x.stride(0), x.stride(1), w_strides[0], w_strides[1], s_um, s_ur, s_ar, s_ak, s_os, s_om, s_or,
            bl_strides[0], bl_strides[1], s_ys, y_arg.stride(-2), y_arg.stride(-1),
            float(scaling), drop_scale if shrink_dropout else 1.0,
            drop_scale if epilogue_dropout else 1.0, seed_arg, thr31)
    flags = dict(HAS_BIAS=has_bias, FUSE_SHRINK=fuse, STORE_U=uo_arg is not None,
                 SHRINK_DROPOUT=shrink_dropout, EPILOGUE_DROPOUT=epilogue_dropout, SPLIT_K=split > 1,
                 UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), BLOCK_R=block_r)
    if decode or _interpreted() or not _autotune_enabled():
        cfg = cfg if decode else _fixed_gemm_config(M, block_r, x.dtype, aligned)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
        _lora_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), 1)
        _gemm_launcher()[grid](*args, **flags)
    if split > 1:
        _sum_splits(y_arg, bias, y, uo_arg, u_out)
    return y, u_out


def shrink_config(M: int, K: int, R: int, device: torch.device, split_k: int | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> dict:
    """The shrink's tiles and K split: SPLIT splits of K_SPLIT (a multiple of BLOCK_K) while the
    row and rank tiles are fewer than two per SM (``split_k`` forces the count). Shapes only.
    No config spills on sm_80 or sm_90, aligned operands or not (tests/_aot.py)."""
    wide = dtype == torch.float32
    if _interpreted():
        cfg = {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    elif M <= 64:
        cfg = {"BLOCK_M": 16, "BLOCK_K": 64 if wide else 128, "num_warps": 8 if wide else 4, "num_stages": 3}
    else:  # 8 warps: with 64 ranks, 4 spill on sm_80 (fp32 on sm_90 too)
        cfg = {"BLOCK_M": 64, "BLOCK_K": 32 if wide else 64, "num_warps": 8, "num_stages": 3}
    block_r = _block_r(R)
    programs = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(R, block_r)
    split, per = _split_count(programs, triton.cdiv(K, cfg["BLOCK_K"]), device, split_k)
    return {**cfg, "BLOCK_R": block_r, "SPLIT": split, "K_SPLIT": per * cfg["BLOCK_K"]}


def shrink(x: torch.Tensor, a: torch.Tensor, a_strides: tuple[int, int], R: int, out_scale: float = 1.0,
           *, dropout_p: float = 0.0, seed: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """U[m, r] = out_scale * sum_k dropout(X)[m, k] At[k, r] in fp32, At read via ``a_strides = (s_ar, s_ak)``.

    Split over K (``shrink_config``; ``split_k`` forces a count) into fp32 partials that a second
    kernel sums in split order: deterministic, no atomics."""
    M, K = x.shape
    cfg = shrink_config(M, K, R, x.device, split_k, x.dtype)
    split, k_split = cfg.pop("SPLIT"), cfg.pop("K_SPLIT")
    u = _common.new_output((M, R), x, torch.float32)
    part = u[None] if split == 1 else _partials(split, M, R, x)
    drop_scale, seed_arg, thr31 = _drop_args(dropout_p, seed, x)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(R, cfg["BLOCK_R"]), split)
    _shrink_kernel[grid](
        x, a, part, M, K, R, k_split, x.stride(0), x.stride(1), a_strides[0], a_strides[1],
        part.stride(0) if split > 1 else 0, part.stride(1), part.stride(2),
        float(out_scale) * drop_scale, seed_arg, thr31,
        DROPOUT=dropout_p > 0, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), **cfg)
    if split > 1:
        _sum_splits(None, None, None, part, u)
    return u


def grad_a_config(M: int, K: int, R: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """dA's tiles and its split over M: about two programs per SM, at least 4 row tiles a slice.
    A pure function of the shapes (the interpreter's SM count is 8, so tests reach the split)."""
    if _interpreted():
        cfg = {"BLOCK_K": 32, "BLOCK_M": 32, "num_warps": 4, "num_stages": 1}
    else:  # fp32 (3xTF32): K tiles of 64 (128 spills on sm_80 next to 64 ranks)
        cfg = {"BLOCK_K": 64 if dtype == torch.float32 else 128, "BLOCK_M": 64, "num_warps": 8, "num_stages": 3}
    block_r = _block_r(R)
    programs = triton.cdiv(K, cfg["BLOCK_K"]) * triton.cdiv(R, block_r)
    split_m, want = 1, 2 * _common.sm_count(device)
    while programs * split_m * 2 <= want and split_m * 2 <= max(1, triton.cdiv(M, cfg["BLOCK_M"]) // 4):
        split_m *= 2
    return {**cfg, "BLOCK_R": block_r, "SPLIT_M": split_m}


def grad_a(v: torch.Tensor, x: torch.Tensor, out_scale: float, *, dropout_p: float = 0.0,
           seed: torch.Tensor | None = None) -> torch.Tensor:
    """dA[r, k] = out_scale * sum_m V[m, r] dropout(X)[m, k], fp32 [R, K]: split over M
    (``grad_a_config``) into fp32 partials, summed by torch.sum (deterministic)."""
    M, K = x.shape
    R = v.shape[1]
    cfg = grad_a_config(M, K, R, x.device, x.dtype)
    split_m = cfg.pop("SPLIT_M")
    parts = _common.new_output((split_m, R, K), x, torch.float32)
    drop_scale, seed_arg, thr31 = _drop_args(dropout_p, seed, x)
    _grad_a_kernel[(triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(R, cfg["BLOCK_R"]), split_m)](
        v, x, parts, M, K, R, split_m, v.stride(0), v.stride(1), x.stride(0), x.stride(1),
        parts.stride(0), parts.stride(1), parts.stride(2),
        float(out_scale) * drop_scale, seed_arg, thr31,
        DROPOUT=dropout_p > 0, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), **cfg)
    return parts[0] if split_m == 1 else parts.sum(0)
