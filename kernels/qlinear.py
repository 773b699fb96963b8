"""Triton kernel for the weight-only quantized linear layer (W8A16 / W4A16): a fused
dequantize-GEMM.

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
fp16, bf16 and tf32) and the dot runs on them.

Decode (M <= 16) uses a small-M config, BLOCK_M = 16 with narrow N tiles (32) and a deep K
tile (256), rather than split-K: at M = 1 the kernel is bound by the read of the packed
weight, N / 32 programs keep the SMs busy for the layer sizes of interest (N >= 4096), and
no fp32 workspace, atomics or second reduction pass are needed. No autotuning yet: one fixed
config per M range (also with FASTPEFT_AUTOTUNE=1); they fit sm_80 and sm_90 shared memory
(tests/_aot.py, family ``qlinear``).

The backward (dx = dy @ W_deq) is not a kernel: fastpeft/ops/qlinear.py dequantizes the
weight (fastpeft.dequantize) and runs a dense matmul.

Kernels only: no policy here (fastpeft/ops/qlinear.py decides and wraps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot as _dot
from ._common import grouped_pid as _grouped_pid
from ._common import interpreted as _interpreted
from ._common import precision as _precision
from ._common import upcast as _upcast


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
def _qlinear_kernel(
    X, DATA, SCALE, ZP, BIAS, Y,
    M, N, K, KP, NUM_GROUPS,
    s_xm, s_xk, s_dn, s_dk, s_sn, s_sg, s_ym, s_yn,
    BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, PER_ROW: tl.constexpr,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dt = X.dtype.element_ty
    PK: tl.constexpr = BLOCK_K * BITS // 8  # bytes of codes per row and K tile
    offs_p = tl.arange(0, PK)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_ptrs = X + offs_m[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk
    d_ptrs = DATA + offs_n[:, None].to(tl.int64) * s_dn + offs_p[None, :] * s_dk
    s_rows = SCALE + offs_n.to(tl.int64) * s_sn
    z_rows = ZP + offs_n.to(tl.int64) * s_sn
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_p = (k0 * BITS // 8 + offs_p) < KP
        p = tl.load(d_ptrs, mask=mask_n[:, None] & mask_p[None, :], other=0)
        q = _unpack(p, BITS, SIGNED, BLOCK_N, BLOCK_K)
        if PER_ROW:  # integer tile; the scale is applied in the epilogue
            if HAS_ZP:
                q = q - tl.load(z_rows, mask=mask_n, other=0)[:, None]
            w = q.to(tl.float32)
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
        acc = _dot(a, tl.trans(w.to(dt)), acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * s_xk
        d_ptrs += PK * s_dk

    if PER_ROW:
        acc = acc * tl.load(s_rows, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


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
    elif M <= 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
        if dtype == torch.float32:
            cfg.update(BLOCK_K=64)
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
        if dtype == torch.float32:
            cfg.update(BLOCK_N=64, BLOCK_K=32)
    return {**cfg, "GROUP_M": 8}


def _new_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every buffer a kernel must fully write comes from here (tests poison it)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def supports(group_size: int | None) -> bool:
    """Whether the kernel handles this granularity: per row / per tensor, or power-of-two groups."""
    return group_size is None or (_is_pow2(group_size) and 16 <= group_size <= 1024)


# ---------------------------------------------------------------------------------------------
# launcher (x 2-D with unit stride in the last dim; shapes and devices are checked by fastpeft.ops)


def quant_linear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bits: int, scheme: str, group_size: int | None, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] in x's dtype: y = x @ ((codes - zero_point) * scale)^T + bias.

    x [M, K] fp16/bf16/fp32; data [N, ceil(K / 2)] uint8 (4-bit, packed along K) or [N, K]
    int8/uint8 (8-bit), contiguous rows; scale float32 and zero_point int32 of shape
    [N, K / group_size] (groups along K), [N] (per row) or [] (per tensor); bias [N] or None.
    group_size must satisfy ``supports``.
    """
    M, K = x.shape
    N = data.shape[0]
    y = _new_output((M, N), x, x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        return y if bias is None else y.add_(bias)
    if not supports(group_size):
        raise ValueError(f"quant_linear kernel: group_size must be a power of two in [16, 1024], got {group_size}")
    per_row = group_size is None
    if per_row:
        s_sn = scale.stride(0) if scale.dim() == 1 else 0
        s_sg, num_groups, g = 0, 1, 16
    else:
        s_sn, s_sg, num_groups, g = scale.stride(0), scale.stride(1), scale.shape[1], group_size
    cfg = _fixed_config(M, x.dtype)
    kp = data.shape[1]
    args = (x, data, scale, zero_point, bias if bias is not None else scale, y,
            M, N, K, kp, num_groups,
            x.stride(0), x.stride(1), data.stride(0), data.stride(1), s_sn, s_sg, y.stride(0), y.stride(1))
    flags = dict(BITS=bits, SIGNED=scheme == "absmax", HAS_ZP=scheme == "zeropoint", PER_ROW=per_row,
                 G=g, HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype),
                 PRECISION=_precision(x.dtype, exact_tf32=per_row))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _qlinear_kernel[grid](*args, **flags, **cfg)
    return y
