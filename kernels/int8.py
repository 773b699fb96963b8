"""Triton kernels for LLM.int8(): vector-wise quantization and the int8 GEMM with fp16 outliers.

Semantics: fastpeft/reference/int8.py. Five kernels:

``_quant_rows_kernel``   one pass per row (a program owns ROWS rows; chunks of BLOCK_K over K,
    the second chunk loop re-reads the row from cache; a row that fits one chunk stays in
    registers): ``row_scale = max |x|`` over the entries with |x| < t,
    ``q = rint(x * (127 / row_scale))`` clamped to [-127, 127], 0 for outlier entries, a zero
    scale or NaN; ``col_flags[k] = 1`` where any row has an outlier. ``127 / row_scale`` and the
    product round in fp32 exactly as the reference does under torch (which evaluates
    ``127.0 / s`` as ``reciprocal(s) * 127``, as bitsandbytes does too), then ``rint`` rounds
    half-to-even like ``torch.round``: the codes equal the reference's bit for bit.
``_outlier_columns_kernel``  one program compacts the flags into an ascending index list
    with a running ``cumsum`` over chunks; the count stays on the device (no host sync). Given
    the codes q, it also sets their outlier columns to 0 (int8_vectorwise_quant's q): for up to
    ZERO_FUSED_MAX_M rows in the same program, after a barrier, from the list it just wrote (the
    decode path keeps its three launches); for more rows ``_zero_columns_kernel`` does it, a
    program per ZERO_ROWS rows, M x count byte stores in all.
``_int8_gemm_kernel``    ``acc_i32 = q @ w_int8^T`` on int8 tensor cores, a plain int8 dot per K
    tile (the outlier columns of q are already 0: nothing is masked in the loop), then a second
    loop over the outlier list, 16 columns at a time (the count is read in the kernel: a dynamic
    bound), adding ``x[:, c] @ w_int8[:, c]^T`` in x's dtype (int8 codes are exact in fp16/bf16;
    fp32 x runs 3xTF32, exact for the int8 side) with fp32 accumulation into the same tile:
    ``y = (acc_i32 * row_scale[m] / 127 + sum_c x[m, c] w_int8[n, c]) * w_scale[n] / 127 + bias[n]``,
    the reference's sum with one accumulator live. On sm_90 Triton 3.6 waits for every int8
    wgmma before the next K step (it pipelines only dots with an fp32 accumulator), so the
    large-M configs are chosen to fit two blocks per SM: one block's wgmmas run while the
    other waits (benchmarks/NOTES.md, "Hopper pipelining").
``_dequant_matmul_kernel``  ``dx = dy @ W_deq``, W_deq[n, k] = w_int8[n, k] * w_scale[n] / 127:
    each int8 W tile is widened to fp32, scaled per row n, rounded to dy's dtype and fed to
    the tensor cores with fp32 accumulation. Scaling W rather than dy: W_deq has the range of
    the original weight (representable in the model's dtype), while dy * w_scale / 127 can
    underflow fp16 for small gradients; both add one rounding of the same size otherwise.
    16-bit dy (SWAP_AB) computes the transposed tile ``dx^T = W_deq^T @ dy^T``: the dequantized
    weight is then the register operand of the wgmma (the int8 codes reach shared memory by
    cp.async, the 16-bit tile never does) and the mainloop keeps wgmma groups in flight; fp32
    dy (3xTF32, three dots) keeps the plain orientation, which needs fewer registers there.

Kernels only: no policy here (fastpeft/ops/int8.py decides and wraps).
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
from ._common import rint as _rint
from ._common import tuning_bench as _tuning_bench
from ._common import upcast as _upcast

_QMAX = tl.constexpr(127.0)  # the largest int8 code: LLM.int8()'s symmetric range [-127, 127]
# rows whose scale is below _LIFT_BELOW are scaled by _LIFT first: fastpeft.reference.int8's
# LIFT_BELOW and LIFT (the kernels import no other layer; tests/test_int8_kernels.py checks they agree)
LIFT_BELOW = 2.0**-64
LIFT = 2.0**64
_LIFT_BELOW = tl.constexpr(LIFT_BELOW)
_LIFT = tl.constexpr(LIFT)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _absmax_chunk(x, kk, K, FLAGS, threshold, HAS_THRESHOLD: tl.constexpr):
    """Per row of the fp32 chunk x: (max |x| below the threshold, any NaN); flags outlier columns."""
    ax = tl.abs(x)
    if HAS_THRESHOLD:
        out = ax >= threshold
        ax = tl.where(out, 0.0, ax)
        hit = tl.max(out.to(tl.int32), axis=0)
        tl.store(FLAGS + kk, hit, mask=(hit > 0) & (kk < K))  # every writer stores 1: no race
    return tl.max(ax, axis=1), tl.max((x != x).to(tl.int32), axis=1)


@triton.jit
def _codes_chunk(x, lift, inv, threshold, HAS_THRESHOLD: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """int8 codes of the fp32 chunk x: rint((x * lift) * inv) in [-127, 127]; 0 for NaN and outliers."""
    v = (x * lift[:, None]) * inv[:, None]
    v = tl.where(v == v, v, 0.0)  # NaN rows, 0 * inf
    if HAS_THRESHOLD:
        v = tl.where(tl.abs(x) >= threshold, 0.0, v)
    v = tl.minimum(tl.maximum(v, -_QMAX), _QMAX)
    return _rint(v, USE_LIBDEVICE).to(tl.int8)


@triton.jit
def _quant_rows_kernel(
    X, Q, SCALE, FLAGS, M, K, s_xm, s_xk, s_qm, s_qk, threshold,
    HAS_THRESHOLD: tl.constexpr, ONE_CHUNK: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * ROWS + tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    x_row = X + offs_m[:, None].to(tl.int64) * s_xm
    q_row = Q + offs_m[:, None].to(tl.int64) * s_qm
    if ONE_CHUNK:  # the row fits one chunk: it stays in registers between the two passes
        mask = mask_m[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_row + offs_k[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
        amax, nans = _absmax_chunk(x, offs_k, K, FLAGS, threshold, HAS_THRESHOLD)
    else:  # pass 1 over the chunks
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        nans = tl.zeros((ROWS,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_row + kk[None, :] * s_xk, mask=mask_m[:, None] & (kk < K)[None, :],
                        other=0.0).to(tl.float32)
            m, n = _absmax_chunk(x, kk, K, FLAGS, threshold, HAS_THRESHOLD)
            amax = tl.maximum(amax, m)
            nans = tl.maximum(nans, n)
    scale = tl.where(nans > 0, float("nan"), amax)
    tl.store(SCALE + offs_m, scale, mask=mask_m)

    # inv = 127 / (scale * lift) exactly as torch evaluates the reference's `127.0 / (row_scale * lift)`,
    # which is reciprocal(row_scale * lift) * 127 (two fp32 roundings); 0 for a zero or NaN scale;
    # lift: the reference's exact power of two for rows too small for a finite 127 / scale
    pos = scale > 0
    lift = tl.where(scale < _LIFT_BELOW, _LIFT, 1.0)
    inv = tl.where(pos, tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.where(pos, scale * lift, 1.0)) * _QMAX,
                   0.0)
    if ONE_CHUNK:
        tl.store(q_row + offs_k[None, :] * s_qk,
                 _codes_chunk(x, lift, inv, threshold, HAS_THRESHOLD, USE_LIBDEVICE), mask=mask)
    else:  # pass 2 reads the rows again (from cache)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask = mask_m[:, None] & (kk < K)[None, :]
            x = tl.load(x_row + kk[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + kk[None, :] * s_qk,
                     _codes_chunk(x, lift, inv, threshold, HAS_THRESHOLD, USE_LIBDEVICE), mask=mask)


@triton.jit
def _zero_listed_columns(Q, COLS, count, r_lo, r_hi, s_qm, s_qk, ROWS: tl.constexpr, BLOCK_J: tl.constexpr):
    """Q[r, COLS[j]] = 0 for rows r_lo <= r < r_hi and j < count."""
    offs_r = tl.arange(0, ROWS)
    offs_j = tl.arange(0, BLOCK_J)
    for j0 in range(0, count, BLOCK_J):
        jj = j0 + offs_j
        mask_j = jj < count
        c = tl.load(COLS + jj, mask=mask_j, other=0).to(tl.int64)
        for r0 in range(r_lo, r_hi, ROWS):
            rr = r0 + offs_r
            tl.store(Q + rr[:, None].to(tl.int64) * s_qm + c[None, :] * s_qk, tl.zeros((ROWS, BLOCK_J), tl.int8),
                     mask=(rr < r_hi)[:, None] & mask_j[None, :])


@triton.jit
def _outlier_columns_kernel(FLAGS, COLS, COUNT, Q, K, M, s_qm, s_qk,
                            ZERO_Q: tl.constexpr, ROWS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    base = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), axis=0)
    for k0 in range(0, K, BLOCK):
        kk = k0 + offs
        f = (tl.load(FLAGS + kk, mask=kk < K, other=0) != 0).to(tl.int32)
        pos = base + tl.cumsum(f, axis=0) - 1
        tl.store(COLS + pos, kk, mask=f > 0)
        base += tl.sum(f, axis=0)
    tl.store(COUNT, base)
    if ZERO_Q:  # the list this program just wrote: visible to all its threads after the barrier
        tl.debug_barrier()
        _zero_listed_columns(Q, COLS, base, 0, M, s_qm, s_qk, ROWS, BLOCK_J)


@triton.jit
def _zero_columns_kernel(Q, COLS, COUNT, M, s_qm, s_qk, ROWS: tl.constexpr, BLOCK_J: tl.constexpr):
    r_lo = tl.program_id(0) * ROWS
    _zero_listed_columns(Q, COLS, tl.load(COUNT), r_lo, tl.minimum(r_lo + ROWS, M), s_qm, s_qk, ROWS, BLOCK_J)


@triton.jit
def _int8_gemm_kernel(
    Q, RS, W, WS, BIAS, X, COLS, COUNT, Y,
    M, N, K, M_BUCKET, RS_MUL,
    s_qm, s_qk, s_rs, s_wn, s_wk, s_xm, s_xk, s_ym, s_yn,
    HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    q_ptrs = Q + offs_m[:, None].to(tl.int64) * s_qm + offs_k[None, :] * s_qk
    w_ptrs = W + offs_k[:, None] * s_wk + offs_n[None, :].to(tl.int64) * s_wn
    for k0 in range(0, K, BLOCK_K):  # the operands go from cp.async buffers straight to the tensor cores
        mask_k = (k0 + offs_k) < K
        a = tl.load(q_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        q_ptrs += BLOCK_K * s_qk
        w_ptrs += BLOCK_K * s_wk

    # One fp32 accumulator in units of w_scale[n] / 127: the int32 part times row_scale[m] * RS_MUL,
    # then the outlier columns on top, so no second [BLOCK_M, BLOCK_N] tile is live next to it.
    rs = tl.load(RS + offs_m * s_rs, mask=mask_m, other=0.0)
    y = acc.to(tl.float32) * (rs * RS_MUL)[:, None]
    if HAS_OUTLIERS:
        dt = X.dtype.element_ty
        offs_j = tl.arange(0, 16)
        count = tl.load(COUNT)
        for j0 in range(0, count, 16):
            jj = j0 + offs_j
            mask_j = jj < count
            c = tl.load(COLS + jj, mask=mask_j, other=0).to(tl.int64)
            xa = tl.load(X + offs_m[:, None].to(tl.int64) * s_xm + c[None, :] * s_xk,
                         mask=mask_m[:, None] & mask_j[None, :], other=0.0)
            wb = tl.load(W + c[:, None] * s_wk + offs_n[None, :].to(tl.int64) * s_wn,
                         mask=mask_j[:, None] & mask_n[None, :], other=0)
            if UPCAST:  # the interpreter turns int8 -> bf16 into garbage: go through fp32
                y = _dot(xa, wb.to(tl.float32), y, UPCAST, PRECISION)
            else:
                y = _dot(xa, wb.to(dt), y, UPCAST, PRECISION)
    ws = tl.load(WS + offs_n, mask=mask_n, other=0.0)
    y = y * (ws * (1.0 / _QMAX))[None, :]

    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn, y.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequant_matmul_kernel(
    DY, W, WS, DX, M, N, K, M_BUCKET,
    s_dm, s_dn, s_wn, s_wk, s_xm, s_xk,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # output tile [BLOCK_M, BLOCK_K] of dx [M, K]; the reduction runs over N in BLOCK_N steps.
    # SWAP_AB: the tile is computed transposed, [BLOCK_K, BLOCK_M] = W_deq^T @ dy^T, so that the
    # dequantized weight is the dot's first (register) operand
    pid_m, pid_k = _grouped_pid(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    dt = DY.dtype.element_ty

    if SWAP_AB:
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        d_ptrs = DY + offs_n[:, None] * s_dn + offs_m[None, :].to(tl.int64) * s_dm
        w_ptrs = W + offs_k[:, None] * s_wk + offs_n[None, :].to(tl.int64) * s_wn
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        d_ptrs = DY + offs_m[:, None].to(tl.int64) * s_dm + offs_n[None, :] * s_dn
        w_ptrs = W + offs_n[:, None].to(tl.int64) * s_wn + offs_k[None, :] * s_wk
    for n0 in range(0, N, BLOCK_N):
        mask_n = (n0 + offs_n) < N
        s = tl.math.div_rn(tl.load(WS + n0 + offs_n, mask=mask_n, other=0.0),
                           tl.full((BLOCK_N,), _QMAX, tl.float32))
        if SWAP_AB:
            d = tl.load(d_ptrs, mask=mask_n[:, None] & mask_m[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
            acc = _dot((w.to(tl.float32) * s[None, :]).to(dt), d, acc, UPCAST, PRECISION)
        else:
            d = tl.load(d_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
            acc = _dot(d, (w.to(tl.float32) * s[:, None]).to(dt), acc, UPCAST, PRECISION)
        d_ptrs += BLOCK_N * s_dn
        w_ptrs += BLOCK_N * s_wn
    if SWAP_AB:
        acc = tl.trans(acc)
    tl.store(DX + offs_m[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk, acc.to(DX.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


# ---------------------------------------------------------------------------------------------
# configs

# int8 GEMM (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_GEMM_SMALL_M = [  # decode: the int8 weight read dominates; narrow N tiles keep every SM busy
    (16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 32, 512, 4, 3), (16, 64, 512, 4, 3),
    (16, 128, 256, 4, 3), (32, 64, 256, 4, 4),
]
# int8 tensor cores, BLOCK_K 128 (k32 per wgmma, 4 of them per stage) or 64. Each int8 wgmma is
# waited for before the next K step (Triton 3.6, sm_90), so every large config fits two blocks
# per SM (<= 128 registers at 8 warps, <= 255 at 4; <= 113 KB of shared memory): one block's
# wgmmas run while the other block waits (benchmarks/NOTES.md, "Hopper pipelining")
_GEMM_LARGE_M = [
    (128, 128, 128, 8, 3), (128, 128, 128, 4, 3), (128, 128, 64, 8, 4), (64, 128, 128, 4, 4),
    (64, 256, 128, 8, 2),
]
# dequant_matmul (BLOCK_M, BLOCK_K = output columns, BLOCK_N = reduction, num_warps, num_stages)
# The int8 W tile is widened to fp32 for its scaling: BLOCK_K * BLOCK_N / threads registers.
# BLOCK_N = 32 (the reduction) is for fp32 dy only (3xTF32 keeps hi and lo parts of both tiles).
# The transposed 16-bit tiles (SWAP_AB) hold the scaled weight fragment in registers: the
# configs that reached 255 registers on sm_90 and spilled on sm_80 that way are left out, and
# 128x256 output tiles, whose wgmmas ptxas serializes (wait 0 after each in the SASS).
_DEQ_SMALL_M = [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (16, 128, 128, 8, 4), (32, 64, 64, 4, 4),
                (16, 64, 32, 4, 3), (16, 128, 32, 4, 3)]
_DEQ_LARGE_M = [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 32, 4, 3),
                (128, 64, 32, 4, 3), (128, 128, 32, 8, 3)]


def _prune(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    keep = [c for c in configs
            if (mb <= 32) == (c.kwargs["BLOCK_M"] <= 32) and not (mb <= 128 and c.kwargs["BLOCK_M"] > 64)]
    if "DY" in named_args:  # dequant_matmul: the fp32 configs are those with a 32-wide reduction
        wide = named_args["DY"].dtype == torch.float32
        keep = [c for c in keep if (c.kwargs["BLOCK_N"] == 32) == wide]
    elif kwargs.get("HAS_OUTLIERS") and named_args["X"].dtype == torch.float32:
        # the 3xTF32 outlier dot next to a wide accumulator spills: at most 64 fp32 per thread
        keep = [c for c in keep if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps] or keep
    return keep or configs[:1]


def _configs(table, out_block: str, red_block: str):
    return [triton.Config({"BLOCK_M": bm, out_block: bo, red_block: br, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for (bm, bo, br, w, s) in table]


def _make_gemm_autotuned():
    return triton.autotune(
        configs=_configs(_GEMM_SMALL_M + _GEMM_LARGE_M, "BLOCK_N", "BLOCK_K"),
        key=["M_BUCKET", "N", "K", "HAS_OUTLIERS", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune},
        do_bench=_tuning_bench,
    )(_int8_gemm_kernel)


def _make_dequant_autotuned():
    return triton.autotune(
        configs=_configs(_DEQ_SMALL_M + _DEQ_LARGE_M, "BLOCK_K", "BLOCK_N"),
        key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": _prune},
        do_bench=_tuning_bench,
    )(_dequant_matmul_kernel)


_autotuned: dict = {}


def _gemm_launcher():
    if "gemm" not in _autotuned:
        _autotuned["gemm"] = _make_gemm_autotuned()
    return _autotuned["gemm"]


def _dequant_launcher():
    if "dequant" not in _autotuned:
        _autotuned["dequant"] = _make_dequant_autotuned()
    return _autotuned["dequant"]


# tests/_aot.py swaps each launcher getter for a recorder of its autotuner's configs
_AOT_AUTOTUNED = {"_gemm_launcher": _make_gemm_autotuned, "_dequant_launcher": _make_dequant_autotuned}


def _fixed_gemm_config(M: int, K: int) -> dict:
    """The interpreter's small tiles, or the GPU's config per M range without autotuning
    (fits the shared memory of sm_80 and sm_90: tests/test_triton_compile.py checks it).
    Rows of q and W that are not 16-byte aligned (K % 16) load byte by byte: smaller tiles.
    Above 32 rows: two blocks per SM on sm_90 (see _GEMM_LARGE_M)."""
    if _interpreted():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
    if M <= 32:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}
    elif K % 16:  # byte loads: 32-row tiles keep sm_80 and sm_90 builds free of spills
        cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}
    elif M <= 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}
    return {**cfg, "GROUP_M": 8}


def _fixed_dequant_config(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """BLOCK_K tiles the output columns, BLOCK_N the reduction. fp32 dy (3xTF32: hi and lo
    parts of both operands in registers) and unaligned rows take narrower tiles."""
    if _interpreted():
        return {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32, "GROUP_M": 4}
    if M <= 32:
        cfg = {"BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4}
        if dtype == torch.float32:
            cfg.update(BLOCK_N=32, num_stages=3)
    elif dtype == torch.float32 or N % 16 or K % 16:
        cfg = {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
    elif M <= 128:
        cfg = {"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {**cfg, "GROUP_M": 8}


def _quant_config(M: int, K: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_K, num_warps) of the quantization kernel."""
    if _interpreted():  # chunks of 64: K > 64 exercises the two-pass loop
        return 2, min(64, max(16, triton.next_power_of_2(K))), 4
    block_k = min(4096, max(128, triton.next_power_of_2(K)))
    rows = max(1, min(16, 2048 // block_k, triton.next_power_of_2(M)))
    warps = 8 if rows * block_k >= 4096 else 4
    return rows, block_k, warps


def _m_bucket(M: int) -> int:
    return max(16, triton.next_power_of_2(M))



# ---------------------------------------------------------------------------------------------
# launchers (2-D tensors with unit stride in the last dim; shapes and devices are checked by
# fastpeft.ops)


def quant_rows(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Vector-wise int8 quantization of x [M, K] (fp16/bf16/fp32), one pass per row.

    row_scale[i] = max_k |x[i, k]| over the entries with |x| < t (all when t == 0), float32 [M];
    q[i, k] = rint(x[i, k] * (127 / row_scale[i])) in [-127, 127], int8 [M, K], 0 for outlier
    entries (|x| >= t), a zero scale and NaN products; a row holding NaN gets scale NaN and
    codes 0. col_flags: int32 [K], 1 where some row has |x| >= t (None when t == 0). Outlier
    COLUMNS are not zeroed in q: a row block cannot see the other rows' flags
    (``outlier_columns(col_flags, q)`` zeroes them).
    """
    M, K = x.shape
    threshold = float(threshold)
    q = _common.new_output((M, K), x, torch.int8)
    scale = _common.new_output((M,), x, torch.float32)
    flags = torch.zeros((K,), device=x.device, dtype=torch.int32) if threshold > 0 else None
    if M == 0:
        return q, scale, flags
    if K == 0:
        return q, scale.zero_(), flags
    rows, block_k, warps = _quant_config(M, K)
    _quant_rows_kernel[(triton.cdiv(M, rows),)](
        x, q, scale, flags if flags is not None else scale, M, K,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), threshold,
        HAS_THRESHOLD=threshold > 0, ONE_CHUNK=K <= block_k, USE_LIBDEVICE=not _interpreted(),
        ROWS=rows, BLOCK_K=block_k, num_warps=warps)
    return q, scale, flags


# q of up to this many rows has its outlier columns zeroed by the compaction program itself
ZERO_FUSED_MAX_M = 32
ZERO_ROWS = 64  # rows per program of _zero_columns_kernel


def outlier_columns(col_flags: torch.Tensor, q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols int32 [K], count int32 [1]) on col_flags' device, without a host sync: the first
    ``count`` entries of cols are the indices k with col_flags[k] != 0, ascending; the rest is
    unspecified.

    q: int8 codes [M, K] (quant_rows' q) or None. Given, its listed columns are set to 0 in
    place, which makes it int8_vectorwise_quant's q: the int8 GEMM then needs no mask. Up to
    ZERO_FUSED_MAX_M rows: in the same launch; more: one more launch of M / ZERO_ROWS programs.
    """
    K = col_flags.shape[0]
    cols = _common.new_output((K,), col_flags, torch.int32)
    count = _common.new_output((1,), col_flags, torch.int32)
    if K == 0:
        return cols, count.zero_()
    M = 0 if q is None else q.shape[0]
    fused = 0 < M <= ZERO_FUSED_MAX_M
    qa = q if fused else cols
    block = 64 if _interpreted() else min(2048, max(128, triton.next_power_of_2(K)))
    _outlier_columns_kernel[(1,)](col_flags, cols, count, qa, K, M, qa.stride(0), qa.stride(-1),
                                  ZERO_Q=fused, ROWS=ZERO_FUSED_MAX_M, BLOCK_J=32, BLOCK=block, num_warps=4)
    if M > ZERO_FUSED_MAX_M:
        _zero_columns_kernel[(triton.cdiv(M, ZERO_ROWS),)](q, cols, count, M, q.stride(0), q.stride(1),
                                                           ROWS=ZERO_ROWS, BLOCK_J=32, num_warps=4)
    return cols, count


def int8_gemm(q: torch.Tensor, row_scale: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, *, x: torch.Tensor | None = None,
              col_flags: torch.Tensor | None = None, cols: torch.Tensor | None = None,
              count: torch.Tensor | None = None, row_scale_mul: float = 1.0 / 127) -> torch.Tensor:
    """y [M, N] in out_dtype: the int8 linear layer with its dequantizing epilogue fused.

        y[m, n] = (sum_k q'[m, k] w_int8[n, k]) * row_scale[m] * row_scale_mul * w_scale[n] / 127
                + (sum_{j < count} x[m, cols[j]] w_int8[n, cols[j]]) * w_scale[n] / 127
                + bias[n]

    q [M, K] int8, row_scale [M] float32 (or one element, shared by every row: a static
    per-tensor activation step, with row_scale_mul = 1), w_int8 [N, K] int8, w_scale [N] float32, bias [N]
    (any float dtype) or None. q' = q with the columns where col_flags != 0 masked to 0 (q
    itself when col_flags is None; the masking zeroes a copy of q with outlier_columns: the
    layer passes q already zeroed and no col_flags, so that the GEMM loop is a plain int8 dot).
    The outlier term needs x [M, K] (fp16/bf16/fp32, the 16-bit path runs in x's dtype with
    fp32 accumulation), cols (int32 or int64) and count (int32 [1], read on the device); it is
    skipped when cols is None.
    """
    M, K = q.shape
    N = w_int8.shape[0]
    y = _common.new_output((M, N), q, out_dtype)
    if M == 0 or N == 0:
        return y
    has_outliers = cols is not None
    if has_outliers and (x is None or count is None):
        raise ValueError("int8_gemm: the outlier term needs x, cols and count")
    if col_flags is not None:  # q' in a copy (q is the caller's)
        q = q.clone()
        outlier_columns(col_flags, q)
    xa = x if has_outliers else q
    args = (q, row_scale, w_int8, w_scale, bias if bias is not None else row_scale, xa,
            cols if has_outliers else q, count if has_outliers else q, y,
            M, N, K, _m_bucket(M), float(row_scale_mul),
            q.stride(0), q.stride(1), row_scale.stride(0) if row_scale.numel() > 1 else 0, w_int8.stride(0), w_int8.stride(1),
            xa.stride(0) if has_outliers else 0, xa.stride(1) if has_outliers else 0, y.stride(0), y.stride(1))
    xdt = x.dtype if has_outliers else torch.float16
    flags = dict(HAS_BIAS=bias is not None, HAS_OUTLIERS=has_outliers,
                 UPCAST=_upcast(xdt), PRECISION=_precision(xdt, exact_tf32=True))
    if _interpreted() or not _autotune_enabled():
        cfg = _fixed_gemm_config(M, K)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _int8_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _gemm_launcher()[grid](*args, **flags)
    return y


def dequant_matmul(dy: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """dx [M, K] in dy's dtype: dx[m, k] = sum_n dy[m, n] * w_int8[n, k] * w_scale[n] / 127.

    dy [M, N] fp16/bf16/fp32, w_int8 [N, K] int8, w_scale [N] float32. The W tile is
    dequantized in fp32 (w_scale[n] / 127 rounded as the reference's dequantize_weight) and
    rounded to dy's dtype for the tensor-core dot (fp32 dy: 3xTF32, or tf32 when
    torch.backends.cuda.matmul.allow_tf32); fp32 accumulation. 16-bit dy: the transposed tile
    (SWAP_AB, see the module doc).
    """
    M, N = dy.shape
    K = w_int8.shape[1]
    dx = _common.new_output((M, K), dy, dy.dtype)
    if M == 0 or K == 0:
        return dx
    args = (dy, w_int8, w_scale, dx, M, N, K, _m_bucket(M),
            dy.stride(0), dy.stride(1), w_int8.stride(0), w_int8.stride(1), dx.stride(0), dx.stride(1))
    flags = dict(UPCAST=_upcast(dy.dtype), PRECISION=_precision(dy.dtype), SWAP_AB=dy.dtype != torch.float32)
    if _interpreted() or not _autotune_enabled():
        cfg = _fixed_dequant_config(M, N, K, dy.dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
        _dequant_matmul_kernel[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
        _dequant_launcher()[grid](*args, **flags)
    return dx
