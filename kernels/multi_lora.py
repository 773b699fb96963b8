"""Triton kernels for many LoRA adapters in one batch (one adapter per row, inference).

    u[i]  = x[i] A_a[:r_a]^T                   (shrink, fp32)      a = indices[i], r_a = ranks[a]
    y[i] += s_a * u[i] B_a[:, :r_a]^T           (expand, fp32 accumulate, y in its dtype)

Two regimes, picked by the caller from shapes only:

decode (BGMV)   few rows, any mix of adapters. Shrink: one program per (row, K split) reads
                the row's adapter index and rank on the device and loops over rank tiles up to
                that rank; partial sums go to u[split] (no atomics, deterministic). Expand: one
                program per (row, N tile) sums the splits and adds s * u B^T to its row.
prefill (SGMV)  many rows, long runs per adapter. The rows are grouped by adapter on the
                device (``plan``: sanitized keys, then a stable torch.sort; no host sync), and
                programs take tiles of BLOCK_M consecutive rows of that order, gathering x and
                scattering y through the permutation. A tile may still hold several adapters
                (boundaries between groups, or any input order if the sort were skipped): the
                kernel loops over the distinct adapters of its tile (``a = min(keys)``, then
                the next larger key), each pass loading only its rows (masked loads), so every
                tile is correct whatever its mix; sorted input bounds the extra passes by n.

Rank tiles run only up to each adapter's rank (read on the device), so at most one tile of
padding is computed; A and B entries beyond the rank are masked out of every load (they may
hold NaN). Row keys outside [0, n) mean "no adapter": such rows get nothing (zeros when y is
a new buffer), so out-of-range indices are memory-safe. u entries beyond a row's rank, and
rows without an adapter, are never written and never read.

Kernels only: no policy here (fastpeft/ops/multi_lora.py checks, decides and wraps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import dot as _dot
from ._common import interpreted as _interpreted
from ._common import precision as _precision
from ._common import upcast as _upcast


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _row_adapter(IDX, row, RANKS, n, R):
    """(adapter, rank) of one row; rank 0 when its index is outside [0, n) (no adapter)."""
    a = tl.load(IDX + row)
    valid = (a >= 0) & (a < n)  # compared in the index's own width: no wrap-around
    a = tl.where(valid, a, 0).to(tl.int32)
    rank = tl.load(RANKS + a).to(tl.int32)
    rank = tl.where(valid, tl.minimum(tl.maximum(rank, 0), R), 0)
    return a, rank


@triton.jit
def _tile_rank(RANKS, a, R):
    return tl.minimum(tl.maximum(tl.load(RANKS + a).to(tl.int32), 0), R)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _keys_kernel(IDX, KEYS, T, n, BLOCK: tl.constexpr):
    """keys[i] = indices[i] if 0 <= indices[i] < n else n (the "no adapter" group, sorted last)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < T
    a = tl.load(IDX + offs, mask=m, other=-1)
    ok = (a >= 0) & (a < n)
    tl.store(KEYS + offs, tl.where(ok, a, n).to(KEYS.dtype.element_ty), mask=m)


# T (the batch size) and the decode expand's split count are not specialized: a new batch size
# reuses the compiled kernels (decode_config gives at most two tiles per kernel over all batches).
@triton.jit(do_not_specialize=["T"])
def _bgmv_shrink_kernel(
    X, A, RANKS, IDX, U, T, K, n, R, K_SPLIT,
    s_xm, s_xk, s_al, s_ar, s_ak, s_us, s_um, s_ur,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    pid_k = tl.program_id(1)
    a, rank = _row_adapter(IDX, row, RANKS, n, R)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    x_row = X + row.to(tl.int64) * s_xm
    a_base = A + a.to(tl.int64) * s_al
    u_row = U + pid_k.to(tl.int64) * s_us + row.to(tl.int64) * s_um
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        mr = rr < rank
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            mk = kk < K
            xv = tl.load(x_row + kk * s_xk, mask=mk, other=0.0).to(tl.float32)
            av = tl.load(a_base + rr[:, None] * s_ar + kk[None, :] * s_ak,
                         mask=mr[:, None] & mk[None, :], other=0.0).to(tl.float32)
            acc += av * xv[None, :]
        tl.store(u_row + rr * s_ur, tl.sum(acc, axis=1), mask=mr)


@triton.jit(do_not_specialize=["T", "SPLIT_K"])
def _bgmv_expand_kernel(
    Y, U, B, RANKS, SCALINGS, IDX, T, N, n, R, SPLIT_K,
    s_us, s_um, s_ur, s_bl, s_bn, s_br, s_ym, s_yn,
    ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    a, rank = _row_adapter(IDX, row, RANKS, n, R)
    s = tl.load(SCALINGS + a).to(tl.float32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    b_base = B + a.to(tl.int64) * s_bl
    u_row = U + row.to(tl.int64) * s_um
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        mr = rr < rank
        u = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for sp in range(SPLIT_K):
            u += tl.load(u_row + sp * s_us + rr * s_ur, mask=mr, other=0.0)
        b = tl.load(b_base + offs_n[:, None].to(tl.int64) * s_bn + rr[None, :] * s_br,
                    mask=mn[:, None] & mr[None, :], other=0.0).to(tl.float32)
        acc += b * u[None, :]
    out = tl.sum(acc, axis=1) * s
    y_ptrs = Y + row.to(tl.int64) * s_ym + offs_n * s_yn
    if ACCUMULATE:  # rows without an adapter are left alone
        m_y = mn & (rank > 0)
        out += tl.load(y_ptrs, mask=m_y, other=0.0).to(tl.float32)
    else:
        m_y = mn
    tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=m_y)


@triton.jit(do_not_specialize=["T"])
def _sgmv_shrink_kernel(
    X, A, RANKS, KEYS, PERM, U, T, K, n, R, K_SPLIT,
    s_xm, s_xk, s_al, s_ar, s_ak, s_us, s_um, s_ur,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = offs_m < T
    keys = tl.load(KEYS + offs_m, mask=mm, other=n).to(tl.int32)
    rows = tl.load(PERM + offs_m, mask=mm, other=0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    x_rows = X + rows[:, None] * s_xm
    u_rows = U + pid_k.to(tl.int64) * s_us + offs_m[:, None].to(tl.int64) * s_um
    a = tl.min(keys, axis=0)
    while a < n:  # one pass per distinct adapter of the tile, each on its own rows
        sel = keys == a
        rank = _tile_rank(RANKS, a, R)
        a_base = A + a.to(tl.int64) * s_al
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + offs_r
            mr = rr < rank
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + offs_k
                mk = kk < K
                xt = tl.load(x_rows + kk[None, :] * s_xk, mask=sel[:, None] & mk[None, :], other=0.0)
                at = tl.load(a_base + kk[:, None] * s_ak + rr[None, :] * s_ar,
                             mask=mk[:, None] & mr[None, :], other=0.0)
                acc = _dot(xt, at, acc, UPCAST, PRECISION)
            tl.store(u_rows + rr[None, :] * s_ur, acc, mask=sel[:, None] & mr[None, :])
        a = tl.min(tl.where(keys > a, keys, n), axis=0)


# SPLIT_K stays a constexpr here: a runtime count (a loop the compiler cannot unroll) spills on
# sm_80 (8 to 24 B); prefill's split takes few values (powers of two from the row tiles).
@triton.jit(do_not_specialize=["T"])
def _sgmv_expand_kernel(
    Y, U, B, RANKS, SCALINGS, KEYS, PERM, T, N, n, R,
    s_us, s_um, s_ur, s_bl, s_bn, s_br, s_ym, s_yn,
    ACCUMULATE: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = offs_m < T
    keys = tl.load(KEYS + offs_m, mask=mm, other=n).to(tl.int32)
    rows = tl.load(PERM + offs_m, mask=mm, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    dt = B.dtype.element_ty
    u_rows = U + offs_m[:, None].to(tl.int64) * s_um
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a = tl.min(keys, axis=0)
    while a < n:  # every adapter of the tile adds into the same accumulator, on its own rows
        sel = keys == a
        rank = _tile_rank(RANKS, a, R)
        s = tl.load(SCALINGS + a).to(tl.float32)
        b_base = B + a.to(tl.int64) * s_bl + offs_n[None, :].to(tl.int64) * s_bn
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + offs_r
            mr = rr < rank
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for sp in range(SPLIT_K):  # the splits' partials, in split order
                u += tl.load(u_rows + sp * s_us + rr[None, :] * s_ur, mask=sel[:, None] & mr[None, :], other=0.0)
            b = tl.load(b_base + rr[:, None] * s_br, mask=mr[:, None] & mn[None, :], other=0.0)
            # only this adapter's rows take the product: a non-finite weight of one adapter
            # (0 * inf = NaN on the other rows of the tile) stays on that adapter's rows
            d = _dot((u * s).to(dt), b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
            acc += tl.where(sel[:, None], d, 0.0)
        a = tl.min(tl.where(keys > a, keys, n), axis=0)
    y_ptrs = Y + rows[:, None] * s_ym + offs_n[None, :] * s_yn
    if ACCUMULATE:  # rows without an adapter are left alone
        m_y = (mm & (keys < n))[:, None] & mn[None, :]
        acc += tl.load(y_ptrs, mask=m_y, other=0.0).to(tl.float32)
    else:
        m_y = mm[:, None] & mn[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_y)


# ---------------------------------------------------------------------------------------------
# configs (fixed, keyed on shapes; tests/_aot.py checks they compile without spills)



def _block_r(r_max: int) -> int:
    """Rank tile: r_max rounded up to a power of two in [16, 64]; larger stacks loop over tiles."""
    return min(max(16, triton.next_power_of_2(r_max)), 64)


def _split(K: int, block_k: int, programs: int, want: int, min_tiles: int) -> tuple[int, int]:
    """(split count, K per split): enough programs for ``want``, at least ``min_tiles`` K tiles each."""
    k_tiles = triton.cdiv(K, block_k)
    split = 1
    while programs * split * 2 <= want and (split * 2) * min_tiles <= k_tiles:
        split *= 2
    k_split = triton.cdiv(k_tiles, split) * block_k
    return triton.cdiv(K, k_split), k_split



def _partials(split: int, T: int, R: int, like: torch.Tensor) -> torch.Tensor:
    """u: fp32 [split, T, R], row-major inside a split, splits 16 elements apart at least (the split
    stride then always specializes as a multiple of 16, whatever T)."""
    ld = triton.cdiv(T * R, 16) * 16
    return _common.new_output((split * ld,), like, torch.float32).as_strided((split, T, R), (ld, R, 1))


def _aligned(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, y: torch.Tensor) -> tuple[bool, bool]:
    """Whether the shrink's (x, A) and the expand's (B, y) rows allow vector access: unit inner
    strides and row strides that are multiples of 16 elements (Triton's divisibility hint).
    Without it every element needs its own address: the tiles shrink so that they do not spill."""
    rows16 = lambda *v: all(s % 16 == 0 for s in v)
    shrink = x.stride(1) == A.stride(2) == 1 and rows16(x.stride(0), A.stride(0), A.stride(1))
    expand = B.stride(2) == y.stride(1) == 1 and rows16(B.stride(0), B.stride(1), y.stride(0))
    return shrink, expand


def decode_config(T: int, K: int, N: int, r_max: int, device: torch.device,
                  shrink_aligned: bool = True, expand_aligned: bool = True) -> dict:
    """Per-row programs, two tiles per kernel whatever the batch size (so at most two compiled
    variants of each over T = 1..1024; the split count is a runtime argument): the shrink's K tile
    and the expand's N tile are as wide as registers allow ([BLOCK_R, BLOCK_K] and
    [BLOCK_N, BLOCK_R] fp32 products of 4096 elements, 32 a thread), or narrow (64 and 32) while T
    rows of the wide tile would give fewer than two programs per SM. The shrink then splits K so
    that T * SPLIT_K programs fill the GPU."""
    block_r = _block_r(r_max)
    want = 2 * _common.sm_count(device)
    if _interpreted():
        block_k, block_n = 32, 32
    else:
        wide_k = (4096 if shrink_aligned else 2048) // block_r
        wide_n = (4096 if expand_aligned else 2048) // block_r
        block_k = wide_k if T * triton.cdiv(K, wide_k) >= want else min(wide_k, 64)
        block_n = wide_n if T * triton.cdiv(N, wide_n) >= want else min(wide_n, 32)
    split, k_split = _split(K, block_k, T, want, 1)
    return dict(BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=block_n, SPLIT_K=split, K_SPLIT=k_split)


def prefill_config(T: int, K: int, N: int, r_max: int, dtype: torch.dtype, device: torch.device,
                   shrink_aligned: bool = True, expand_aligned: bool = True) -> dict:
    """Row tiles of the shrink (BLOCK_M x BLOCK_K, split over K when the row tiles are few) and
    of the expand (BLOCK_M_E x BLOCK_N). Unaligned rows (``_aligned``) and fp32 (whose 3xTF32
    dots take more registers) get smaller tiles, so that nothing spills (tests/_aot.py)."""
    block_r = _block_r(r_max)
    wide = dtype == torch.float32
    if _interpreted():
        bm, bk, bm_e, bn_e, warps, stages, warps_e = 16, 32, 16, 32, 4, 1, 4
    else:
        bm = 64 if T >= 2048 and not (wide and block_r > 32) else 32 if T >= 512 else 16
        bk = 32 if wide or not shrink_aligned else 64
        bm_e = 32 if wide and block_r > 16 else 64
        bn_e = 128 if expand_aligned and not (wide and block_r > 32) else 64
        warps, stages, warps_e = 4, (2 if block_r > 16 else 3), 8
    split, k_split = _split(K, bk, triton.cdiv(T, bm), 2 * _common.sm_count(device), 4)
    return dict(BLOCK_R=block_r, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=split, K_SPLIT=k_split,
                BLOCK_M_E=bm_e, BLOCK_N=bn_e, num_warps=warps, num_stages=stages, num_warps_e=warps_e)


# ---------------------------------------------------------------------------------------------
# launchers (2-D tensors; shapes, dtypes and devices are checked by fastpeft.ops.multi_lora)


def plan(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys sorted ascending, permutation): rows grouped by adapter, "no adapter" (key n) last.

    All on the device: one Triton launch and a torch.sort, no host sync."""
    T = indices.shape[0]
    kdt = torch.int16 if n < 2**15 - 1 else torch.int32
    keys = _common.new_output((T,), indices, kdt)
    block = 1024
    _keys_kernel[(triton.cdiv(T, block),)](indices, keys, T, n, BLOCK=block)
    skeys, perm = torch.sort(keys, stable=True)
    return skeys, perm


def multi_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor,
               scalings: torch.Tensor, indices: torch.Tensor, y: torch.Tensor | None,
               regime: str) -> torch.Tensor:
    """y[i] (+)= s_a * (x[i] A_a[:r_a]^T) B_a[:, :r_a]^T, a = indices[i]; returns y.

    x [T, K]; A [n, R, K]; B [n, N, R] (any strides); ranks [n] int; scalings [n] float32;
    indices [T] int (contiguous). ``y`` [T, N] is added into in place, or (None) a new buffer
    holding the update alone (zero rows without an adapter). ``regime``: "decode" or "prefill".
    """
    T, K = x.shape
    n, R, _ = A.shape
    N = B.shape[1]
    accumulate = y is not None
    if y is None:
        y = _common.new_output((T, N), x, x.dtype)
    aligned = _aligned(x, A, B, y)
    if regime == "decode":
        cfg = decode_config(T, K, N, R, x.device, *aligned)
        u = _partials(cfg["SPLIT_K"], T, R, x)
        _bgmv_shrink_kernel[(T, cfg["SPLIT_K"])](
            x, A, ranks, indices, u, T, K, n, R, cfg["K_SPLIT"],
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
            u.stride(0), u.stride(1), u.stride(2),
            BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=4 if cfg["BLOCK_K"] * cfg["BLOCK_R"] >= 4096 else 2, num_stages=2)
        _bgmv_expand_kernel[(T, triton.cdiv(N, cfg["BLOCK_N"]))](
            y, u, B, ranks, scalings, indices, T, N, n, R, cfg["SPLIT_K"],
            u.stride(0), u.stride(1), u.stride(2), B.stride(0), B.stride(1), B.stride(2),
            y.stride(0), y.stride(1),
            ACCUMULATE=accumulate, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
            num_warps=4 if cfg["BLOCK_N"] * cfg["BLOCK_R"] >= 4096 else 2, num_stages=1)
        return y
    if regime != "prefill":
        raise ValueError(f"unknown regime {regime!r}")
    cfg = prefill_config(T, K, N, R, x.dtype, x.device, *aligned)
    keys, perm = plan(indices, n)
    u = _partials(cfg["SPLIT_K"], T, R, x)
    flags = dict(UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), BLOCK_R=cfg["BLOCK_R"])
    _sgmv_shrink_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), cfg["SPLIT_K"])](
        x, A, ranks, keys, perm, u, T, K, n, R, cfg["K_SPLIT"],
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
        u.stride(0), u.stride(1), u.stride(2),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **flags)
    grid = (triton.cdiv(T, cfg["BLOCK_M_E"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _sgmv_expand_kernel[grid](
        y, u, B, ranks, scalings, keys, perm, T, N, n, R,
        u.stride(0), u.stride(1), u.stride(2), B.stride(0), B.stride(1), B.stride(2),
        y.stride(0), y.stride(1),
        ACCUMULATE=accumulate, SPLIT_K=cfg["SPLIT_K"],
        BLOCK_M=cfg["BLOCK_M_E"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps_e"], num_stages=1, **flags)
    return y
