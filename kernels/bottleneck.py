"""Triton kernels for the bottleneck adapter: y = x + s * (act(x W_d^T + b_d) W_u^T + b_u).

Numerics: fastpeft/reference/bottleneck.py. R (the bottleneck) is padded to BLOCK_R, a power of
two in [16, MAX_BLOCK_R]; a program holds [BLOCK_M, BLOCK_R] fp32 tiles of the bottleneck.

``_bottleneck_fwd_kernel``        a program owns BLOCK_M rows: h = x W_d^T + b_d over K tiles of d,
    a = act(h) rounded to x's dtype (kept in registers), then per N tile of d
    y = x + s * (a W_u^T + b_u). The second pass walks the N tiles backwards, so the x tiles
    read last in the first pass (the likeliest still in L2) are re-read first.
``_bottleneck_bwd_rows_kernel``   a program owns BLOCK_M rows: recomputes h (K loop over x),
    da = dy W_u (N loop over dy), dh = s * da * act'(h); stores a (x's dtype) and dh (fp32),
    [M, R] each, for the weight gradients; then dx = dy + dh W_d (N loop, backwards again).
``_bottleneck_bwd_weights_kernel`` a program owns BLOCK_N columns of d and one of SPLIT_M slices
    of the rows, and reads dy, x, a and dh once: dW_u = s dy^T a, db_u = s sum(dy),
    dW_d = dh^T x, db_d = sum(dh) (stored by the column-0 programs), as fp32 partials
    [SPLIT_M, ...] summed by the caller: deterministic, no atomics.

Kernels only: no policy here (fastpeft/ops/bottleneck.py decides and wraps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import autotune_enabled as _autotune_enabled
from ._common import dot as _dot
from ._common import interpreted as _interpreted
from ._common import precision as _precision
from ._common import tuning_bench as _tuning_bench
from ._common import upcast as _upcast

ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
MAX_BLOCK_R = 256  # the largest bottleneck the kernels take (its fp32 tiles live in registers)

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_K = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_GELU_C = tl.constexpr(0.044715)


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _tanh(u):
    # 1 - 2 / (e^{2u} + 1): saturates to +-1 without NaN (tl has no tanh in the interpreter)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.maximum(h, 0.0)
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.erf(h * _SQRT1_2))
    elif ACT == 2:
        out = 0.5 * h * (1.0 + _tanh(_GELU_K * (h + _GELU_C * h * h * h)))
    else:
        out = h * tl.sigmoid(h)
    return out


@triton.jit
def _act_and_grad(h, ACT: tl.constexpr):
    """(act(h), act'(h)) in fp32."""
    if ACT == 0:
        pos = h > 0.0
        out = tl.where(pos, h, 0.0)
        grad = tl.where(pos, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(h * _SQRT1_2))
        out = h * cdf
        grad = cdf + h * (tl.exp(-0.5 * h * h) * _INV_SQRT_2PI)
    elif ACT == 2:
        t = _tanh(_GELU_K * (h + _GELU_C * h * h * h))
        out = 0.5 * h * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _GELU_K * (1.0 + 3.0 * _GELU_C * h * h)
    else:
        sg = tl.sigmoid(h)
        out = h * sg
        grad = sg * (1.0 + h * (1.0 - sg))
    return out, grad


@triton.jit
def _down_proj(X, WD, BD, lm, mask_m, D, R, s_xm, s_xk, s_wdr, s_wdk, s_bd,
               HAS_BD: tl.constexpr, X_EVICT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """h = X[lm] W_d^T + b_d: [BLOCK_M, BLOCK_R] fp32 (0 in the padded columns); X points at the
    tile's first row, lm = arange(BLOCK_M)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    x_ptrs = X + lm[:, None] * s_xm + offs_k[None, :] * s_xk
    w_ptrs = WD + offs_r[None, :] * s_wdr + offs_k[:, None] * s_wdk
    for k0 in range(0, D, BLOCK_K):
        mask_k = (k0 + offs_k) < D
        # W_d is read by every program: evict_last; x as the caller says
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0, eviction_policy=X_EVICT)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0, eviction_policy="evict_last")
        h = _dot(x, w, h, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * s_xk
        w_ptrs += BLOCK_K * s_wdk
    if HAS_BD:
        h += tl.load(BD + offs_r * s_bd, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    return h


# ---------------------------------------------------------------------------------------------
# kernels


# M is not specialized (a new row count reuses the compiled kernel; M_BUCKET keys the autotuner)
@triton.jit(do_not_specialize=["M"])
def _bottleneck_fwd_kernel(
    X, WD, BD, WU, BU, Y,
    M, D, R, M_BUCKET,
    s_xm, s_xk, s_wdr, s_wdk, s_bd, s_wun, s_wur, s_bu, s_ym, s_yn,
    scaling,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # 64-bit only in the scalar tile bases; offsets inside a tile are 32-bit (fewer registers)
    row0 = tl.program_id(0) * BLOCK_M
    lm = tl.arange(0, BLOCK_M)
    mask_m = (row0 + lm) < M
    X += row0.to(tl.int64) * s_xm
    Y += row0.to(tl.int64) * s_ym
    dt = X.dtype.element_ty

    # x stays in L2 for the second pass (evict_last)
    h = _down_proj(X, WD, BD, lm, mask_m, D, R, s_xm, s_xk, s_wdr, s_wdk, s_bd,
                   HAS_BD, "evict_last", UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    a = _act(h, ACT).to(dt)

    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    n_tiles = tl.cdiv(D, BLOCK_N)
    for i in range(0, n_tiles):
        nn = (n_tiles - 1 - i) * BLOCK_N + offs_n  # backwards: see the module docstring
        mask_n = nn < D
        w = tl.load(WU + nn[None, :] * s_wun + offs_r[:, None] * s_wur,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0, eviction_policy="evict_last")
        z = _dot(a, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
        if HAS_BU:
            z += tl.load(BU + nn * s_bu, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        # last use of x, and y is not read back: first out of L2
        x = tl.load(X + lm[:, None] * s_xm + nn[None, :] * s_xk, mask=mask, other=0.0, eviction_policy="evict_first")
        y = x.to(tl.float32) + scaling * z
        tl.store(Y + lm[:, None] * s_ym + nn[None, :] * s_yn, y.to(Y.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


# (M stays specialized here: without it the 16 x 64 x 128, BLOCK_R 256 config spills 16 bytes)
@triton.jit
def _bottleneck_bwd_rows_kernel(
    X, DY, WD, BD, WU, DX, A_OUT, DH_OUT,
    M, D, R, M_BUCKET,
    s_xm, s_xk, s_dym, s_dyn, s_wdr, s_wdk, s_bd, s_wun, s_wur, s_dxm, s_dxn,
    scaling,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, NEED_DX: tl.constexpr, STORE_AH: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    lm = tl.arange(0, BLOCK_M)
    mask_m = (row0 + lm) < M
    X += row0.to(tl.int64) * s_xm
    DY += row0.to(tl.int64) * s_dym
    DX += row0.to(tl.int64) * s_dxm
    A_OUT += row0.to(tl.int64) * R
    DH_OUT += row0.to(tl.int64) * R
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    dt = X.dtype.element_ty

    # x is not read again here; dy is (evict_last in the da loop, below)
    h = _down_proj(X, WD, BD, lm, mask_m, D, R, s_xm, s_xk, s_wdr, s_wdk, s_bd,
                   HAS_BD, "evict_first", UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    a, g = _act_and_grad(h, ACT)
    mask_mr = mask_m[:, None] & mask_r[None, :]
    if STORE_AH:
        tl.store(A_OUT + lm[:, None] * R + offs_r[None, :], a.to(dt), mask=mask_mr)

    # da = dy W_u: W_u [D, R] read as [BLOCK_N, BLOCK_R] tiles
    da = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dy_ptrs = DY + lm[:, None] * s_dym + offs_n[None, :] * s_dyn
    wu_ptrs = WU + offs_n[:, None] * s_wun + offs_r[None, :] * s_wur
    for n0 in range(0, D, BLOCK_N):
        mask_n = (n0 + offs_n) < D
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0, eviction_policy="evict_last")
        w = tl.load(wu_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0, eviction_policy="evict_last")
        da = _dot(dy, w, da, UPCAST, PRECISION)
        dy_ptrs += BLOCK_N * s_dyn
        wu_ptrs += BLOCK_N * s_wun
    dh = (scaling * da) * g
    if STORE_AH:
        tl.store(DH_OUT + lm[:, None] * R + offs_r[None, :], dh, mask=mask_mr)

    if NEED_DX:  # dx = dy + dh W_d, W_d [R, D] read as [BLOCK_R, BLOCK_N] tiles
        dh_op = dh.to(dt)
        n_tiles = tl.cdiv(D, BLOCK_N)
        for i in range(0, n_tiles):
            nn = (n_tiles - 1 - i) * BLOCK_N + offs_n
            mask_n = nn < D
            w = tl.load(WD + offs_r[:, None] * s_wdr + nn[None, :] * s_wdk,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0, eviction_policy="evict_last")
            acc = _dot(dh_op, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
            mask = mask_m[:, None] & mask_n[None, :]
            dy = tl.load(DY + lm[:, None] * s_dym + nn[None, :] * s_dyn, mask=mask, other=0.0)
            dx = dy.to(tl.float32) + acc
            tl.store(DX + lm[:, None] * s_dxm + nn[None, :] * s_dxn, dx.to(DX.dtype.element_ty), mask=mask,
                     eviction_policy="evict_first")


@triton.jit
def _bottleneck_bwd_weights_kernel(
    X, DY, A, DH, P_WU, P_WD, P_BU, P_BD,
    M, D, R,
    s_xm, s_xk, s_dym, s_dyn,
    scaling,
    SPLIT_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < D
    mask_r = offs_r < R
    dt = X.dtype.element_ty

    acc_wu = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    acc_wd = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    acc_bu = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_bd = tl.zeros((BLOCK_R,), dtype=tl.float32)
    # 64-bit row offsets only in the scalar bases, advanced by a whole slice stride per step
    row0 = pid_s * BLOCK_M
    X += row0.to(tl.int64) * s_xm
    DY += row0.to(tl.int64) * s_dym
    A += row0.to(tl.int64) * R
    DH += row0.to(tl.int64) * R
    step = BLOCK_M * SPLIT_M
    for m0 in range(row0, M, step):
        mask_mm = (m0 + offs_m) < M
        mask_mn = mask_mm[:, None] & mask_n[None, :]
        mask_mr = mask_mm[:, None] & mask_r[None, :]
        dy = tl.load(DY + offs_m[:, None] * s_dym + offs_n[None, :] * s_dyn, mask=mask_mn, other=0.0)
        x = tl.load(X + offs_m[:, None] * s_xm + offs_n[None, :] * s_xk, mask=mask_mn, other=0.0)
        a = tl.load(A + offs_m[:, None] * R + offs_r[None, :], mask=mask_mr, other=0.0)
        dh = tl.load(DH + offs_m[:, None] * R + offs_r[None, :], mask=mask_mr, other=0.0)
        X += step * s_xm
        DY += step * s_dym
        A += step * R
        DH += step * R
        acc_wu = _dot(tl.trans(dy), a, acc_wu, UPCAST, PRECISION)
        acc_wd = _dot(tl.trans(dh.to(dt)), x, acc_wd, UPCAST, PRECISION)
        acc_bu += tl.sum(dy.to(tl.float32), axis=0)
        acc_bd += tl.sum(dh, axis=0)

    base_wu = P_WU + pid_s.to(tl.int64) * D * R
    tl.store(base_wu + offs_n[:, None] * R + offs_r[None, :], acc_wu * scaling,
             mask=mask_n[:, None] & mask_r[None, :])
    base_wd = P_WD + pid_s.to(tl.int64) * R * D
    tl.store(base_wd + offs_r[:, None] * D + offs_n[None, :], acc_wd, mask=mask_r[:, None] & mask_n[None, :])
    tl.store(P_BU + pid_s * D + offs_n, acc_bu * scaling, mask=mask_n & (pid_r == 0))
    tl.store(P_BD + pid_s * R + offs_r, acc_bd, mask=mask_r & (pid_n == 0))


# ---------------------------------------------------------------------------------------------
# configs: (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages)

# 16-bit: N tiles of 64 (a [BLOCK_M, 128] fp32 z tile next to the x tile costs ~200 registers
# at 4 warps). fp32 (3xTF32 dots, hi/lo operand halves): small tiles only, or it spills.
_ROW_CONFIGS = [
    (64, 128, 64, 8, 4), (32, 128, 64, 4, 4), (16, 128, 64, 4, 4), (64, 64, 64, 4, 3),
    (128, 64, 64, 8, 3), (32, 64, 64, 8, 3), (16, 64, 64, 8, 3),
]
_ROW_CONFIGS_FP32 = [(16, 32, 32, 4, 2), (16, 32, 32, 8, 2), (16, 32, 32, 4, 3)]


def _rows_fit(bm: int, br: int, warps: int) -> bool:
    """Two [BLOCK_M, BLOCK_R] fp32 tiles live across the loops: keep them <= 64 registers a thread."""
    return 2 * bm * br <= 64 * 32 * warps


def _prune(configs, named_args, **kwargs):
    br = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    mb = named_args["M_BUCKET"]
    fp32 = named_args["X"].dtype == torch.float32
    keep = [c for c in configs if (c.kwargs["BLOCK_K"] == 32) == fp32
            and (fp32 or (_rows_fit(c.kwargs["BLOCK_M"], br, c.num_warps) and c.kwargs["BLOCK_M"] <= max(16, mb)))
            and not (fp32 and br > 128 and c.num_warps < 8)]
    return keep or configs[-1:]


def _autotune(kernel):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for (bm, bk, bn, w, s) in _ROW_CONFIGS + _ROW_CONFIGS_FP32]
    return triton.autotune(configs=configs, key=["M_BUCKET", "D", "BLOCK_R"],
                           prune_configs_by={"early_config_prune": _prune}, do_bench=_tuning_bench)(kernel)


_tuned: dict = {}


def _fwd_launcher():
    if "fwd" not in _tuned:
        _tuned["fwd"] = _autotune(_bottleneck_fwd_kernel)
    return _tuned["fwd"]


def _bwd_rows_launcher():
    if "bwd" not in _tuned:
        _tuned["bwd"] = _autotune(_bottleneck_bwd_rows_kernel)
    return _tuned["bwd"]


# tests/_aot.py compiles every config of each autotuned launcher (getter -> factory)
_AOT_AUTOTUNED = {"_fwd_launcher": lambda: _autotune(_bottleneck_fwd_kernel),
                  "_bwd_rows_launcher": lambda: _autotune(_bottleneck_bwd_rows_kernel)}


def _fixed_rows_config(M: int, block_r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """One config per (row tiles, BLOCK_R, dtype) range: the interpreter's small tiles, or the GPU's
    without autotuning (FASTPEFT_AUTOTUNE=0). A program owns BLOCK_M rows, so BLOCK_M is the
    largest of 64, 32, 16 that still gives every SM a program. tests/_aot.py checks that they
    compile without spills."""
    if _interpreted():  # the interpreter runs one program at a time in numpy
        return {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32}
    if dtype == torch.float32:  # 3xTF32 dots: hi/lo operand halves double the registers
        cfg = (16, 32, 32, 8 if block_r > 128 else 4, 2)
    else:
        n_sm = _common.sm_count(device)
        bm = next((b for b in (64, 32) if triton.cdiv(M, b) >= n_sm), 16)
        if block_r <= 64:
            cfg = {64: (64, 128, 64, 8, 4), 32: (32, 128, 64, 4, 4), 16: (16, 128, 64, 4, 4)}[bm]
        elif block_r <= 128:
            cfg = {64: (64, 128, 64, 8, 3), 32: (32, 128, 64, 8, 3), 16: (16, 128, 64, 4, 3)}[bm]
        else:
            cfg = (32, 64, 64, 8, 3) if bm >= 32 else (16, 64, 64, 8, 3)
    bm, bk, bn, warps, stages = cfg
    return {"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def block_r(R: int) -> int:
    """BLOCK_R for a bottleneck R (raises above MAX_BLOCK_R)."""
    if not 1 <= R <= MAX_BLOCK_R:
        raise ValueError(f"the adapter kernels take a bottleneck of 1..{MAX_BLOCK_R}, got {R}")
    return max(16, triton.next_power_of_2(R))




# Autotune keys: a row count M is tuned as the first bucket >= M (the last for anything larger).
# The buckets up to 128 are where the candidate row tiles change (BLOCK_M <= bucket); above, a
# few wider buckets, so M = 1..8192 and beyond cost at most six tuning runs per (D, BLOCK_R).
M_BUCKETS = (16, 32, 64, 128, 2048, 8192)


def _m_bucket(M: int) -> int:
    return next((b for b in M_BUCKETS if M <= b), M_BUCKETS[-1])


def _launch_rows(kernel, launcher, M: int, br: int, x: torch.Tensor, args, flags) -> None:
    if _interpreted() or not _autotune_enabled():
        cfg = _fixed_rows_config(M, br, x.dtype, x.device)
        kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](*args, **flags, **cfg)
    else:
        launcher()[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](*args, **flags)


# ---------------------------------------------------------------------------------------------
# launchers (2-D tensors, any strides; shapes, dtypes and devices are checked by fastpeft.ops)


def bottleneck_fwd(x: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor | None, wu: torch.Tensor,
                bu: torch.Tensor | None, activation: str, scaling: float) -> torch.Tensor:
    """y = x + s * (act(x W_d^T + b_d) W_u^T + b_u): x [M, D], wd [R, D], wu [D, R] (any strides)."""
    M, D = x.shape
    R = wd.shape[0]
    br = block_r(R)
    y = _common.new_output((M, D), x, x.dtype)
    args = (x, wd, bd if bd is not None else wd, wu, bu if bu is not None else wu, y,
            M, D, R, _m_bucket(M),
            x.stride(0), x.stride(1), wd.stride(0), wd.stride(1), bd.stride(0) if bd is not None else 0,
            wu.stride(0), wu.stride(1), bu.stride(0) if bu is not None else 0, y.stride(0), y.stride(1),
            float(scaling))
    flags = dict(ACT=ACTIVATION_CODES[activation], HAS_BD=bd is not None, HAS_BU=bu is not None,
                 UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), BLOCK_R=br)
    _launch_rows(_bottleneck_fwd_kernel, _fwd_launcher, M, br, x, args, flags)
    return y


def bottleneck_bwd_rows(x: torch.Tensor, dy: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor | None,
                     wu: torch.Tensor, activation: str, scaling: float, need_dx: bool = True,
                     store_ah: bool = True):
    """(dx, a, dh): dx = dy + dh W_d in x's dtype (None unless ``need_dx``); a = act(h) [M, R] in
    x's dtype and dh = s (dy W_u) * act'(h) [M, R] fp32 (None unless ``store_ah``)."""
    M, D = x.shape
    R = wd.shape[0]
    br = block_r(R)
    dx = _common.new_output((M, D), x, x.dtype) if need_dx else None
    a = _common.new_output((M, R), x, x.dtype) if store_ah else None
    dh = _common.new_output((M, R), x, torch.float32) if store_ah else None
    dx_arg, (s_dxm, s_dxn) = (dx, dx.stride()) if need_dx else (x, (0, 0))
    args = (x, dy, wd, bd if bd is not None else wd, wu, dx_arg, a if store_ah else x, dh if store_ah else x,
            M, D, R, _m_bucket(M),
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), wd.stride(0), wd.stride(1),
            bd.stride(0) if bd is not None else 0, wu.stride(0), wu.stride(1), s_dxm, s_dxn,
            float(scaling))
    flags = dict(ACT=ACTIVATION_CODES[activation], HAS_BD=bd is not None, NEED_DX=bool(need_dx),
                 STORE_AH=bool(store_ah), UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
                 BLOCK_R=br)
    _launch_rows(_bottleneck_bwd_rows_kernel, _bwd_rows_launcher, M, br, x, args, flags)
    return dx, a, dh


def _weights_config(R: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_R, num_warps, num_stages): two fp32 accumulators [BLOCK_N, BLOCK_R]
    per program; bottlenecks wider than BLOCK_R are split over programs (each reads its dy and x
    tiles again). The interpreter's BLOCK_R of 16 makes the tests cover that split."""
    br = block_r(R)
    if _interpreted():
        return 16, 32, 16, 4, 1
    if dtype == torch.float32:
        return 16, 64, min(br, 64), 4, 2
    br = min(br, 128)
    # BLOCK_N 128 only next to BLOCK_R 64: with 16 or 32 it spills on sm_80 (tests/_aot.py)
    return 32, 128 if br == 64 else 64, br, 8, 2


def split_m(M: int, D: int, R: int, dtype: torch.dtype, device: torch.device) -> int:
    """Row slices of the weight-gradient kernel: about two programs per SM, >= 2 row tiles a slice."""
    block_m, block_n, br = _weights_config(R, dtype)[:3]
    tiles, m_tiles = triton.cdiv(D, block_n) * triton.cdiv(R, br), triton.cdiv(M, block_m)
    want = 2 * _common.sm_count(device)
    split = 1
    while tiles * split * 2 <= want and split * 2 <= m_tiles // 2:
        split *= 2
    return split


def bottleneck_bwd_weights(x: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, dh: torch.Tensor,
                        scaling: float):
    """(dW_d [R, D], db_d [R], dW_u [D, R], db_u [D]) in fp32 from x, dy [M, D], a, dh [M, R]."""
    M, D = x.shape
    R = a.shape[1]
    bm, bn, br, warps, stages = _weights_config(R, x.dtype)
    split = split_m(M, D, R, x.dtype, x.device)
    p_wu = _common.new_output((split, D, R), x, torch.float32)
    p_wd = _common.new_output((split, R, D), x, torch.float32)
    p_bu = _common.new_output((split, D), x, torch.float32)
    p_bd = _common.new_output((split, R), x, torch.float32)
    _bottleneck_bwd_weights_kernel[(triton.cdiv(D, bn), split, triton.cdiv(R, br))](
        x, dy, a, dh, p_wu, p_wd, p_bu, p_bd, M, D, R,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), float(scaling),
        SPLIT_M=split, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=warps, num_stages=stages)
    if split == 1:
        return p_wd[0], p_bd[0], p_wu[0], p_bu[0]
    return p_wd.sum(0), p_bd.sum(0), p_wu.sum(0), p_bu.sum(0)
