"""Triton kernel for the knowledge-distillation loss: loss and student gradient in one launch.

Semantics: fastpeft/reference/distill.py. One program per row of [N, V] logits (z: student,
u: teacher), sweeping the row's vocabulary in BLOCK_V tiles:

  sweep 1  online softmax statistics, each with a running max and rescaled sums: for the
           student at temperature T (m_z, s_q = sum exp((z - m_z) / T)), at T = 1 for the CE
           (s_1 = sum exp(z - m_z)), for the teacher at T (m_u, s_p), and for the KLs the running
           E[u - z] under p (forward) or E[z - u] under q (reverse), so
             forward_kl D = E_p[u - z] / T - lse_p + lse_q,  reverse_kl D = E_q[z - u] / T - lse_q + lse_p
           with lse_q = m_z / T + log s_q and lse_p = m_u / T + log s_p;
  sweep 2  (jsd only) needs the normalized p and q: KL(p || m) and KL(q || m), m = (p + q) / 2;
  sweep 3  (when the student needs a gradient) d loss / dz with the finished statistics, written
           in the logits' dtype (to a buffer that may be z itself: each tile is read before it is
           overwritten, by the same program):
             forward_kl  w_kd (q - p)
             reverse_kl  w_kd q (log q - log p - D)
             jsd         w_kd q ((log q - log m) - KL(q || m)) / 2
             CE          w_ce (softmax(z) - onehot(label))
           with w_kd = alpha * T (the T^2 of the loss over the 1 / T of dz / T), all times ``scale``
           (1 / counted rows for "mean"; read from device memory: no host sync).
A row whose label is ignore_index gets loss 0 and a zero gradient row. Terms whose p_j (or q_j)
is 0 are 0 (masked before the product), so -inf logits give no NaN where the math is finite.
Accumulation in float32 whatever the logits' dtype.

Kernels only: shapes, dtypes and arguments are validated by the caller (fastpeft/ops/distill.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import interpreted as _interpreted

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
MAX_BLOCK_V = 2048  # 8 fp32 values a thread per tile at 8 warps: no spills in any variant (tests/_aot.py)
INTERP_BLOCK_V = 128  # a few tiles per row at the interpreter tests' vocab sizes
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _distill_kernel(
    Z, U, LABELS, GRAD, LOSS, SCALE,
    V, stride_z, stride_u, stride_g,
    inv_temp, kd_loss_w, kd_grad_w, ce_w, ignore_index,
    DIV: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, HAS_LABELS: tl.constexpr,
    T_IS_ONE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    u_row = U + row * stride_u
    g_row = GRAD + row * stride_g
    offs = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    label = 0
    if HAS_LABELS:
        label64 = tl.load(LABELS + row)
        label = label64.to(tl.int32)  # in [0, V) (checked by the caller) when not ignore_index
        if label64 == ignore_index:  # excluded from both terms: zero loss, zero gradient
            if COMPUTE_GRAD:
                for v0 in range(0, V, BLOCK_V):
                    idx = v0 + offs
                    tl.store(g_row + idx, tl.zeros([BLOCK_V], tl.float32).to(GRAD.dtype.element_ty), mask=idx < V)
            tl.store(LOSS + row, 0.0)
            return

    # ---- sweep 1: online softmax statistics
    m_z = tl.full([], NEG_INF, tl.float32)
    s_q = tl.zeros([], tl.float32)
    s_1 = tl.zeros([], tl.float32)
    m_u = tl.full([], NEG_INF, tl.float32)
    s_p = tl.zeros([], tl.float32)
    acc = tl.zeros([], tl.float32)  # forward: sum e_p (u - z); reverse: sum e_q (z - u)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        mask = idx < V
        z = tl.load(z_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
        mz_new = tl.maximum(m_z, tl.max(z, 0))
        mz_safe = tl.where(mz_new == NEG_INF, 0.0, mz_new)  # a tile of -inf only: exp(-inf - 0) = 0
        e_q = tl.exp((z - mz_safe) * inv_temp)
        r_q = tl.exp((m_z - mz_safe) * inv_temp)
        if HAS_CE and not T_IS_ONE:
            s_1 = s_1 * tl.exp(m_z - mz_safe) + tl.sum(tl.exp(z - mz_safe), 0)
        if HAS_KD:
            u = tl.load(u_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
            mu_new = tl.maximum(m_u, tl.max(u, 0))
            mu_safe = tl.where(mu_new == NEG_INF, 0.0, mu_new)
            e_p = tl.exp((u - mu_safe) * inv_temp)
            r_p = tl.exp((m_u - mu_safe) * inv_temp)
            if DIV == 0:
                acc = acc * r_p + tl.sum(tl.where(e_p > 0, e_p * (u - z), 0.0), 0)
            elif DIV == 1:
                acc = acc * r_q + tl.sum(tl.where(e_q > 0, e_q * (z - u), 0.0), 0)
            s_p = s_p * r_p + tl.sum(e_p, 0)
            m_u = mu_new
        s_q = s_q * r_q + tl.sum(e_q, 0)
        m_z = mz_new
    log_sq = tl.log(s_q)
    lse_q = m_z * inv_temp + log_sq
    log_sp = tl.zeros([], tl.float32)
    lse_p = tl.zeros([], tl.float32)
    if HAS_KD:
        log_sp = tl.log(s_p)
        lse_p = m_u * inv_temp + log_sp
    if HAS_CE:
        if T_IS_ONE:
            lse_1 = lse_q
        else:
            lse_1 = m_z + tl.log(s_1)

    # ---- the divergence D (sweep 2 for jsd)
    d = tl.zeros([], tl.float32)
    kl_qm = tl.zeros([], tl.float32)
    if HAS_KD:
        if DIV == 0:
            d = acc / s_p * inv_temp - lse_p + lse_q
        elif DIV == 1:
            d = acc / s_q * inv_temp - lse_q + lse_p
        else:
            kl_pm = tl.zeros([], tl.float32)
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + offs
                mask = idx < V
                z = tl.load(z_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
                u = tl.load(u_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
                lq = (z - m_z) * inv_temp - log_sq
                lp = (u - m_u) * inv_temp - log_sp
                q = tl.exp(lq)
                p = tl.exp(lp)
                lm = tl.log(p + q) - _LN2
                kl_pm += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), 0)
                kl_qm += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), 0)
            d = 0.5 * (kl_pm + kl_qm)

    loss = tl.zeros([], tl.float32)
    if HAS_KD:
        loss += kd_loss_w * d
    if HAS_CE:
        ok = (label >= 0) & (label < V)
        z_label = tl.load(z_row + label, mask=ok, other=float("nan")).to(tl.float32)
        loss += ce_w * (lse_1 - z_label)
    tl.store(LOSS + row, loss)

    # ---- sweep 3: d loss / dz
    if COMPUTE_GRAD:
        scale = tl.load(SCALE)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            mask = idx < V
            z = tl.load(z_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
            lq = (z - m_z) * inv_temp - log_sq
            q = tl.exp(lq)
            g = tl.zeros([BLOCK_V], tl.float32)
            if HAS_KD:
                u = tl.load(u_row + idx, mask=mask, other=NEG_INF).to(tl.float32)
                lp = (u - m_u) * inv_temp - log_sp
                p = tl.exp(lp)
                if DIV == 0:
                    g += kd_grad_w * (q - p)
                elif DIV == 1:
                    g += kd_grad_w * tl.where(q > 0, q * (lq - lp - d), 0.0)
                else:
                    lm = tl.log(p + q) - _LN2
                    g += kd_grad_w * tl.where(q > 0, q * (0.5 * (lq - lm) - 0.5 * kl_qm), 0.0)
            if HAS_CE:
                if T_IS_ONE:
                    soft = q
                else:
                    soft = tl.exp(z - lse_1)
                g += ce_w * (soft - tl.where(idx == label, 1.0, 0.0))
            tl.store(g_row + idx, (g * scale).to(GRAD.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side



def config(V: int) -> dict:
    """BLOCK_V and warps: tiles of up to 2048 on the GPU (8 elements a thread; 4096-wide tiles at 8
    warps spilled in the jsd variants)."""
    if _interpreted():
        return dict(BLOCK_V=min(triton.next_power_of_2(V), INTERP_BLOCK_V), num_warps=1)
    block = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4)


def distill_loss_fwd(z: torch.Tensor, u: torch.Tensor, labels: torch.Tensor | None, temperature: float,
                     kd_weight: float, ce_weight: float, ignore_index: int, divergence: str,
                     scale: torch.Tensor, compute_grad: bool, grad: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(row losses float32 [N], d loss / dz or None).

    z, u: [N, V] (N >= 1, V >= 1), same dtype, unit stride along V (any row stride). labels: [N]
    int32/int64 (or None: no CE, every row counts). Row loss = kd_weight * T^2 * D + ce_weight *
    CE, a term skipped when its weight is 0. scale: float32 tensor of one element, the gradient's
    factor. grad: where the gradient goes ([N, V], z's dtype, unit stride along V; may be z
    itself), allocated when None."""
    N, V = z.shape
    has_kd = kd_weight > 0
    has_ce = labels is not None and ce_weight > 0
    losses = _common.new_output((N,), z, torch.float32)
    if compute_grad and grad is None:
        grad = _common.new_output((N, V), z, z.dtype)
    g = grad if compute_grad else losses  # an unused pointer when there is no gradient
    cfg = config(V)
    t = float(temperature)
    _distill_kernel[(N,)](
        z, u, labels if labels is not None else losses, g, losses, scale,
        V, z.stride(0), u.stride(0), g.stride(0) if compute_grad else 0,
        1.0 / t, kd_weight * t * t, kd_weight * t, ce_weight, int(ignore_index),
        DIV=DIVERGENCE_CODES[divergence], HAS_KD=has_kd, HAS_CE=has_ce, HAS_LABELS=labels is not None,
        T_IS_ONE=t == 1.0, COMPUTE_GRAD=compute_grad, **cfg)
    return losses, (grad if compute_grad else None)
