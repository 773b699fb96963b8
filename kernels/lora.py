"""Triton kernels for LoRA: y = x W^T + b + s * (dropout(x) A^T) B^T.

Three kernels, reused by forward and backward through strides:

``_lora_gemm_kernel``  the base GEMM ``Y = X Wt`` with the low-rank update fused
    into its epilogue: ``Y += s * U Bt`` (+ bias). ``U`` either comes precomputed
    (``FUSE_SHRINK=False``) or is accumulated inside the K loop from the X tiles
    already in registers (``FUSE_SHRINK=True``, r <= 64), which saves a launch and
    a second read of X; each N-tile then recomputes U for its rows, so it pays
    at small M. Backward dx = dy W + s * drop'((dy B) A) is the same kernel with W
    and A read transposed and the dropout mask applied to the update.
``_shrink_kernel``     U = scale * dropout(X) At, fp32 out, optional split-K (atomics).
``_grad_a_kernel``     dA = scale * V^T dropout(X), split over M into fp32 partials.

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


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit(do_not_specialize=["thr31"])
def _lora_gemm_kernel(
    X, W, BIAS, U, A, UOUT, BL, Y,
    M, N, K, R, M_BUCKET,
    s_xm, s_xk, s_wn, s_wk, s_um, s_ur, s_ar, s_ak, s_om, s_or, s_bn, s_br, s_ym, s_yn,
    scaling, shrink_scale, drop_scale, SEED, thr31,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, STORE_U: tl.constexpr,
    SHRINK_DROPOUT: tl.constexpr, EPILOGUE_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

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
        for r0 in range(0, R, BLOCK_R):
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

    x_ptrs = X + offs_m[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk
    w_ptrs = W + offs_k[:, None] * s_wk + offs_n[None, :].to(tl.int64) * s_wn
    for k0 in range(0, K, BLOCK_K):
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
    tl.store(Y + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["thr31"])
def _shrink_kernel(
    X, A, U, M, K, R,
    s_xm, s_xk, s_ar, s_ak, s_um, s_ur,
    out_scale, SEED, thr31,
    DROPOUT: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
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
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
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
    u_ptrs = U + offs_m[:, None].to(tl.int64) * s_um + offs_r[None, :] * s_ur
    if SPLIT_K == 1:
        tl.store(u_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])
    else:
        tl.atomic_add(u_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["thr31"])
def _grad_a_kernel(
    V, X, P, M, K, R,
    s_vm, s_vr, s_xm, s_xk, s_ps, s_pr, s_pk,
    out_scale, SEED, thr31,
    DROPOUT: tl.constexpr, SPLIT_M: tl.constexpr,
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


# ---------------------------------------------------------------------------------------------
# configs

_SMALL_M_CONFIGS = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): few rows, the weight read dominates
    (16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
]
_LARGE_M_CONFIGS = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
]


# Row counts that choose among the configs: up to SMALL_M rows (decode) only the small-M configs
# (BLOCK_M <= SMALL_M, where the weight read dominates) and above it only the large ones; up to
# MID_M rows no config taller than MID_M / 2, so that a tile is never mostly padding rows.
SMALL_M, MID_M = 32, 128
# Above this rank, a tile larger than 128 x 128 spills: the U and Bt tiles of 64 ranks sit in
# registers next to the fp32 accumulator.
SPILL_RANK, SPILL_TILE = 32, 128 * 128


def _prune(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    br = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if (mb <= SMALL_M) != (bm <= SMALL_M):
            continue
        if mb <= MID_M and bm > MID_M // 2:
            continue
        if br > SPILL_RANK and bm * bn > SPILL_TILE:
            continue
        keep.append(c)
    return keep or configs[:1]


def _make_autotuned():
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_warps=w, num_stages=s)
        for (bm, bn, bk, w, s) in _SMALL_M_CONFIGS + _LARGE_M_CONFIGS
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


def _fixed_gemm_config(M: int, block_r: int, dtype: torch.dtype) -> dict:
    """One config per M range: the interpreter's small tiles, or the GPU's without autotuning.

    The GPU configs fit the shared memory of sm_80 (164 KiB) and sm_90 in every dtype
    (tests/test_triton_compile.py checks it); fp32 tiles take fewer pipeline stages.
    """
    if _interpreted():  # the interpreter runs one program at a time in numpy
        return {"BLOCK_M": 16 if M <= 16 else 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
    wide = dtype == torch.float32
    if M <= 32:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3 if wide else 4}
    elif M <= 128 or block_r > 32:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3 if wide else 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2 if wide else 3}
    return {**cfg, "GROUP_M": 8}


def _block_r(r: int, cap: int = 64) -> int:
    return min(max(16, triton.next_power_of_2(r)), cap)


def _drop_args(dropout_p: float, seed: torch.Tensor | None, like: torch.Tensor):
    """(1 / (1 - p), the seed pointer argument, the 31-bit drop threshold). ``seed``: the int64
    one-element tensor holding the 31-bit dropout seed (read by the kernel), or None without
    dropout (then ``like`` stands in for the pointer, never read)."""
    if dropout_p == 0.0:
        return 1.0, like, 0
    if seed is None:
        raise ValueError("dropout needs a seed tensor")
    return 1.0 / (1.0 - dropout_p), seed, int(dropout_p * 2**31)


FUSE_SHRINK_MAX_R = 64



# ---------------------------------------------------------------------------------------------
# launchers (2-D tensors; shapes and devices are checked by fastpeft.ops)


def lora_gemm(x: torch.Tensor, w: torch.Tensor, N: int, w_strides: tuple[int, int],
              bias: torch.Tensor | None, bl: torch.Tensor, bl_strides: tuple[int, int], R: int,
              scaling: float, *, u: torch.Tensor | None = None, a: torch.Tensor | None = None,
              a_strides: tuple[int, int] | None = None, store_u: bool = False,
              dropout_p: float = 0.0, seed: torch.Tensor | None = None, shrink_dropout: bool = False,
              epilogue_dropout: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Y[m, n] = sum_k X[m, k] Wt[k, n] + s * sum_r U[m, r] Bt[r, n] (+ bias[n]).

    Operands are read through strides, so a weight and its transpose are one tensor:
    element (n, k) of the [N, K] operand is at ``w + n * s_wn + k * s_wk`` with
    ``w_strides = (s_wn, s_wk)``; element (n, r) of the [N, R] update weight is at
    ``bl + n * s_bn + r * s_br``. Either ``u`` [M, R] (fp32) is given, or ``a`` with
    ``a_strides = (s_ar, s_ak)`` and U = dropout(X) At is accumulated in
    the K loop from the X tiles (R <= 64), and returned when ``store_u``.
    ``epilogue_dropout`` applies the (row, col) mask of Y to the update (backward dx).
    """
    M, K = x.shape
    fuse = u is None
    if fuse and R > FUSE_SHRINK_MAX_R:
        raise ValueError(f"fused shrink supports r <= {FUSE_SHRINK_MAX_R}, got {R}")
    y = _common.new_output((M, N), x, x.dtype)
    u_out = _common.new_output((M, R), x, torch.float32) if fuse and store_u else None
    u_arg, s_um, s_ur = (x, 0, 0) if fuse else (u, u.stride(0), u.stride(1))
    a_arg, (s_ar, s_ak) = (a, a_strides) if fuse else (x, (0, 0))
    uo_arg, s_om, s_or = (u_out, u_out.stride(0), u_out.stride(1)) if u_out is not None else (x, 0, 0)
    drop_scale, seed_arg, thr31 = _drop_args(dropout_p, seed, x)
    shrink_dropout = bool(fuse and shrink_dropout and dropout_p > 0)
    epilogue_dropout = bool(epilogue_dropout and dropout_p > 0)
    args = (x, w, bias if bias is not None else x, u_arg, a_arg, uo_arg, bl, y,
            M, N, K, R, max(16, triton.next_power_of_2(M)),
            x.stride(0), x.stride(1), w_strides[0], w_strides[1], s_um, s_ur, s_ar, s_ak, s_om, s_or,
            bl_strides[0], bl_strides[1], y.stride(0), y.stride(1),
            float(scaling), drop_scale if shrink_dropout else 1.0,
            drop_scale if epilogue_dropout else 1.0, seed_arg, thr31)
    flags = dict(HAS_BIAS=bias is not None, FUSE_SHRINK=fuse, STORE_U=u_out is not None,
                 SHRINK_DROPOUT=shrink_dropout, EPILOGUE_DROPOUT=epilogue_dropout,
                 UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), BLOCK_R=_block_r(R))
    if _interpreted() or not _autotune_enabled():
        cfg = _fixed_gemm_config(M, flags["BLOCK_R"], x.dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _lora_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _gemm_launcher()[grid](*args, **flags)
    return y, u_out



# Split-K of the shrink: splits until the grid has about two programs per SM, each keeping at least
# this many K tiles (its 3-stage load pipeline fills, and the fp32 atomic adds of the partial U stay
# a small part of its work).
MIN_K_TILES_PER_SPLIT = 4


def shrink(x: torch.Tensor, a: torch.Tensor, a_strides: tuple[int, int], R: int, out_scale: float = 1.0,
           *, dropout_p: float = 0.0, seed: torch.Tensor | None = None) -> torch.Tensor:
    """U[m, r] = out_scale * sum_k dropout(X)[m, k] At[k, r] in fp32, At read via ``a_strides = (s_ar, s_ak)``."""
    M, K = x.shape
    if _interpreted():
        block_m, block_k, warps, stages = 16, 32, 4, 1
    elif M <= 64:
        block_m, block_k, warps, stages = 16, 128, 4, 3
    else:
        block_m, block_k, warps, stages = 64, 64, 4, 3
    block_r = _block_r(R)
    grid_m, grid_r = triton.cdiv(M, block_m), triton.cdiv(R, block_r)
    k_tiles = triton.cdiv(K, block_k)
    split_k = 1
    if not _interpreted():
        want = 2 * _common.sm_count(x.device)
        while grid_m * grid_r * split_k * 2 <= want and split_k * 2 <= max(1, k_tiles // MIN_K_TILES_PER_SPLIT):
            split_k *= 2
    u = torch.zeros((M, R), device=x.device, dtype=torch.float32) if split_k > 1 else \
        _common.new_output((M, R), x, torch.float32)
    drop_scale, seed_arg, thr31 = _drop_args(dropout_p, seed, x)
    _shrink_kernel[(grid_m, grid_r, split_k)](
        x, a, u, M, K, R, x.stride(0), x.stride(1), a_strides[0], a_strides[1], u.stride(0), u.stride(1),
        float(out_scale) * drop_scale, seed_arg, thr31,
        DROPOUT=dropout_p > 0, SPLIT_K=split_k, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    return u


def grad_a(v: torch.Tensor, x: torch.Tensor, out_scale: float, *, dropout_p: float = 0.0,
           seed: torch.Tensor | None = None) -> torch.Tensor:
    """dA[r, k] = out_scale * sum_m V[m, r] dropout(X)[m, k], fp32 [R, K]."""
    M, K = x.shape
    R = v.shape[1]
    if _interpreted():
        block_k, block_m, warps, stages = 32, 32, 4, 1
    else:
        block_k, block_m, warps, stages = 128, 64, 8, 3
    block_r = _block_r(R)
    grid_k, grid_r = triton.cdiv(K, block_k), triton.cdiv(R, block_r)
    split_m = 1
    if not _interpreted():
        want = 2 * _common.sm_count(x.device)
        while grid_k * grid_r * split_m * 2 <= want and split_m * 2 <= max(1, triton.cdiv(M, block_m) // 4):
            split_m *= 2
    parts = _common.new_output((split_m, R, K), x, torch.float32)
    drop_scale, seed_arg, thr31 = _drop_args(dropout_p, seed, x)
    _grad_a_kernel[(grid_k, grid_r, split_m)](
        v, x, parts, M, K, R, v.stride(0), v.stride(1), x.stride(0), x.stride(1),
        parts.stride(0), parts.stride(1), parts.stride(2),
        float(out_scale) * drop_scale, seed_arg, thr31,
        DROPOUT=dropout_p > 0, SPLIT_M=split_m, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=warps, num_stages=stages)
    return parts[0] if split_m == 1 else parts.sum(0)
