"""Triton kernel for the knowledge-distillation loss: loss and student gradient in one launch.

Semantics: fastpeft/reference/distill.py. One program per row of [N, V] logits (z: student,
u: teacher), sweeping the row's vocabulary in tiles; q = softmax(z / T), p = softmax(u / T),
delta = log p - log q. D is never a difference of log-softmaxes (whose rounding, ~1e-7 log V,
swamps D ~ delta^2 when T is large): it is built from terms of delta's own size.

  sweep 1  online softmax statistics, each with a running max and rescaled sums: for the
           student at temperature T (m_z, s_q), at T = 1 for the CE (s_1), for the teacher at T
           (m_u, s_p); and the divergence's moments, with weights w = p (forward_kl) or q
           (reverse_kl, jsd) and x = ((z - u) - C) / T (forward) or ((u - z) - C) / T:
           M1 = sum w x and F = sum w E2(x), E2(x) = e^x - 1 - x >= 0 (a series near 0), about a
           centre C (the w-weighted mean of the logit difference so far, this tile included, at
           least its max - 60 T so that e^x stays finite); each tile's move of C re-expresses
           them exactly (M1 -= S dc, F = e^-dc F + M1 expm1(-dc) + S E2(-dc)). At the end, with
           E the w-mean, s = E[expm1(x)] = (M1 + F) / S and a0, b0 the masses where the other
           side is -inf / where w == 0:
             KL(w || other) = F / S - h(s) - log(1 - b0),  h(y) = y - log1p(y)  (+inf if a0 > 0),
             log(other_j / w_j) = x_j - lam,  lam = log1p(s) + log1p(-a0) - log(1 - b0),
           every part of the size of delta (|s| > 1/2: D = lam - E[x]; s < -1/2, x spanning
           more than 60: lam from the log-sum-exps);
  sweep 2  (jsd only) KL(p || m) and KL(q || m), m = (p + q) / 2, as sums of p h(expm1(-delta) / 2)
           and q h(expm1(delta) / 2) (the larger weight's form past |delta| = log 3);
  sweep 3  (when the student needs a gradient) d loss / dz with the finished statistics, written
           in the logits' dtype (to a buffer that may be z itself: each tile is read before it is
           overwritten, by the same program):
             forward_kl  w_kd (q - p)  (= -q expm1(delta) where |delta| < 1)
             reverse_kl  w_kd q (log q - log p - D) = w_kd q (E_q[x] - x)
             jsd         w_kd q ((log q - log m) - KL(q || m)) / 2,  log q - log m = -log1p(expm1(delta) / 2)
             CE          w_ce (softmax(z) - onehot(label))
           with w_kd = alpha * T (the T^2 of the loss over the 1 / T of dz / T), all times ``scale``
           (1 / counted rows for "mean"; read from device memory: no host sync).
Sweeps 2 and 3 form the logit difference minus C exactly (_diff_minus: TwoSum), so neither an
offset between the two models' logits nor their near-equality costs delta digits; for jsd they
run on half-width tiles (BLOCK_J), which keeps its heavier per-entry math within the registers
of the other variants. A row whose label is ignore_index gets loss 0 and a zero gradient row.
Terms whose p_j (or q_j) is 0 are 0 (masked before the product), so -inf logits give no NaN where
the math is finite. Accumulation in float32 whatever the logits' dtype. expm1, log1p and E2 are
built here from exp, log and series (the interpreter has no libdevice), to a few ulps.

Kernels only: shapes, dtypes and arguments are validated by the caller (fastpeft/ops/distill.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import interpreted as _interpreted

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
MAX_BLOCK_V = 2048  # 8 fp32 values a thread per tile at 8 warps: <= 80 registers (sm_90), no spills but
# 4 bytes in the fp32 jsd variant (tests/_aot.py)
INTERP_BLOCK_V = 128  # a few tiles per row at the interpreter tests' vocab sizes
_LN2 = tl.constexpr(0.6931471805599453)
_LN3 = tl.constexpr(1.0986122886681098)
_CENTER_MARGIN = tl.constexpr(60.0)  # x <= 60: w e^x summed over any vocabulary stays finite in fp32
# the logits of the lanes past V in sweeps 2 and 3 (never stored, masked out of jsd's sums): finite,
# so that no inf - inf is computed there (the interpreter's numpy warned), and exp(-1e30 / T) = 0
_PAD = tl.constexpr(-1.0e30)


@triton.jit
def _e2_series(xs):
    """e^x - 1 - x by its Taylor series to x^10 / 10! (relative error < 3e-9 for |x| <= 1/2)."""
    acc = 2.755731922398589e-07 * xs + 2.755731922398589e-06
    acc = acc * xs + 2.48015873015873e-05
    acc = acc * xs + 1.984126984126984e-04
    acc = acc * xs + 1.388888888888889e-03
    acc = acc * xs + 8.333333333333333e-03
    acc = acc * xs + 4.1666666666666664e-02
    acc = acc * xs + 0.16666666666666666
    acc = acc * xs + 0.5
    return acc * xs * xs


@triton.jit
def _expm1_minus_x(x):
    """e^x - 1 - x (>= 0) to a few ulps for x <= 88 (+inf at -inf)."""
    small = tl.abs(x) <= 0.5
    return tl.where(small, _e2_series(tl.where(small, x, 0.0)), (tl.exp(x) - 1.0) - x)


@triton.jit
def _expm1(x):
    """e^x - 1 to a few ulps (-1 at -inf)."""
    small = tl.abs(x) <= 0.5
    xs = tl.where(small, x, 0.0)
    return tl.where(small, xs + _e2_series(xs), tl.exp(x) - 1.0)


@triton.jit
def _log1p_h(y, SERIES_ONLY: tl.constexpr):
    """(log1p(y), h(y) = y - log1p(y) >= 0) for y > -1 to a few ulps: for y in [-1/2, 1] by
    log1p(y) = 2 atanh(w), w = y / (2 + y), |w| <= 1/3 (series to w^15 / 15) and y - 2 w = w y;
    else by log (SERIES_ONLY: the caller uses only y in [-1/2, 1])."""
    small = (y >= -0.5) & (y <= 1.0)
    ys = tl.where(small, y, 0.0)
    w = ys / (2.0 + ys)
    w2 = w * w
    acc = 0.06666666666666667 * w2 + 0.07692307692307693
    acc = acc * w2 + 0.09090909090909091
    acc = acc * w2 + 0.1111111111111111
    acc = acc * w2 + 0.14285714285714285
    acc = acc * w2 + 0.2
    acc = acc * w2 + 0.3333333333333333
    tail = 2.0 * w * w2 * acc  # 2 (atanh(w) - w)
    if SERIES_ONLY:
        return 2.0 * w + tail, w * ys - tail
    else:
        big = tl.log(1.0 + y)
        return tl.where(small, 2.0 * w + tail, big), tl.where(small, w * ys - tail, y - big)


@triton.jit
def _diff_minus(a, b, c):
    """(a - b) - c in fp32 to a few ulps of the result: a - b split exactly into its rounded value
    and rounding error (Knuth's TwoSum), so neither a large offset between a and b nor their
    near-equality costs digits; +-inf where a or b is -inf."""
    s = a - b
    bb = s - a
    err = (a - (s - bb)) - (b + bb)
    return (s - c) + tl.where(err == err, err, 0.0)  # (NaN from infinite a or b)


@triton.jit
def _distill_kernel(
    Z, U, LABELS, GRAD, LOSS, SCALE,
    V, stride_z, stride_u, stride_g,
    inv_temp, kd_loss_w, kd_grad_w, ce_w, ignore_index,
    DIV: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, HAS_LABELS: tl.constexpr,
    T_IS_ONE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    u_row = U + row * stride_u
    g_row = GRAD + row * stride_g
    offs = tl.arange(0, BLOCK_V)
    offs_j = tl.arange(0, BLOCK_J)  # the later sweeps' tiles (narrower for jsd: its math needs registers)
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

    # ---- sweep 1: online softmax statistics and the divergence's moments
    m_z = tl.full([], NEG_INF, tl.float32)
    s_q = tl.zeros([], tl.float32)
    s_1 = tl.zeros([], tl.float32)
    m_u = tl.full([], NEG_INF, tl.float32)
    s_p = tl.zeros([], tl.float32)
    # the divergence's moments: x = ((o - v) - C) / T, (v, o) = (u, z) for forward_kl, (z, u)
    # else, about a centre C in logit units: the w-weighted mean of o - v so far (this tile
    # included), at least its max - 60 T so that e^x stays finite
    cc = tl.full([], NEG_INF, tl.float32)  # C; -inf: no entry finite in both yet
    diff_max = tl.full([], NEG_INF, tl.float32)  # max of o - v over the weighted entries
    s_live = tl.zeros([], tl.float32)  # sum w over the entries finite in both
    mom1 = tl.zeros([], tl.float32)  # sum w x
    mom2 = tl.zeros([], tl.float32)  # sum w E2(x)
    a_mass = tl.zeros([], tl.float32)  # sum w where the other side is -inf
    b_mass = tl.zeros([], tl.float32)  # sum of the other side's weights where w == 0
    o_live = tl.zeros([], tl.float32)  # ... where w > 0 (1 - b0 without cancellation)
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
            if DIV == 0:  # KL(p || q): weights p, x = log(q / p) + const
                w, r_w, o, v, e_o, r_o = e_p, r_p, z, u, e_q, r_q
            else:  # KL(q || p) (and jsd's delta): weights q, x = log(p / q) + const
                w, r_w, o, v, e_o, r_o = e_q, r_q, u, z, e_p, r_p
            live = (w > 0) & (o != NEG_INF)
            a_mass = a_mass * r_w + tl.sum(tl.where((w > 0) & (o == NEG_INF), w, 0.0), 0)
            b_mass = b_mass * r_o + tl.sum(tl.where(w == 0, e_o, 0.0), 0)
            o_live = o_live * r_o + tl.sum(tl.where(w > 0, e_o, 0.0), 0)
            s_live = s_live * r_w
            mom1 = mom1 * r_w
            mom2 = mom2 * r_w
            wl = tl.where(live, w, 0.0)
            sw = tl.sum(wl, 0)
            # o - v on the live entries (both finite there), 0 elsewhere: no -inf - -inf computed
            # (masked out anyway; it made the interpreter warn)
            d_live = tl.where(live, o, 0.0) - tl.where(live, v, 0.0)
            diff = tl.where(live, d_live, NEG_INF)
            diff_max = tl.maximum(diff_max, tl.max(diff, 0))
            ref = tl.where(cc == NEG_INF, 0.0, cc)
            swd = tl.sum(tl.where(live, w * (d_live - ref), 0.0), 0)
            tot = s_live + sw
            target = ref + (mom1 / inv_temp + swd) / tl.where(tot > 0, tot, 1.0)
            cc_new = tl.maximum(target, diff_max - _CENTER_MARGIN / inv_temp)
            cc_new = tl.where(diff_max == NEG_INF, NEG_INF, cc_new)  # no entry finite in both yet
            # the moments moved to the new centre, exactly; nothing to move before the first
            # finite entry
            dc = tl.where(cc == NEG_INF, 0.0, (tl.where(cc == NEG_INF, 0.0, cc_new) - ref) * inv_temp)
            mom2 = mom2 * tl.exp(-dc) + mom1 * _expm1(-dc) + s_live * _expm1_minus_x(-dc)
            mom1 = mom1 - s_live * dc
            cc = cc_new
            # (o - v rounds to eps |o - v|, a logit offset between the models; D takes it at second
            # order. The sweeps below, where delta's error is first order, split it exactly)
            x = tl.where(live, (d_live - cc) * inv_temp, 0.0)
            mom1 += tl.sum(tl.where(live, w * x, 0.0), 0)
            mom2 += tl.sum(tl.where(live, w * _expm1_minus_x(x), 0.0), 0)
            s_live += sw
            s_p = s_p * r_p + tl.sum(e_p, 0)
            m_u = mu_new
        s_q = s_q * r_q + tl.sum(e_q, 0)
        m_z = mz_new
    log_sq = tl.log(s_q)
    lse_q = m_z * inv_temp + log_sq
    log_sp = tl.zeros([], tl.float32)
    if HAS_KD:
        log_sp = tl.log(s_p)
    if HAS_CE:
        if T_IS_ONE:
            lse_1 = lse_q
        else:
            lse_1 = m_z + tl.log(s_1)

    # ---- the divergence D (sweep 2 for jsd)
    d = tl.zeros([], tl.float32)
    lam = tl.zeros([], tl.float32)
    m1 = tl.zeros([], tl.float32)
    kl_qm = tl.zeros([], tl.float32)
    cc = tl.where(cc == NEG_INF, 0.0, cc)
    if HAS_KD:
        # lam for the log-sum-exps A - B = (m_u - m_z) / T + log s_p - log s_q (needs only the
        # accuracy of delta's own size where it is used: x spanning more than 60)
        if DIV == 0:
            s_w, s_o = s_p, s_q
            lam_lse = _diff_minus(m_z, m_u, cc) * inv_temp - (log_sp - log_sq)
        else:
            s_w, s_o = s_q, s_p
            lam_lse = _diff_minus(m_u, m_z, cc) * inv_temp + (log_sp - log_sq)
        ok = s_live > 0
        den = tl.where(ok, s_live, 1.0)
        m1 = tl.where(ok, mom1 / den, 0.0)
        f2 = tl.where(ok, mom2 / den, 0.0)
        s = m1 + f2  # E[expm1(x)]
        a0 = a_mass / s_w
        b0 = b_mass / s_o
        fine = s >= -0.5
        l1p_s, h_s = _log1p_h(tl.where(fine, s, 0.0), False)
        l1p_a, h_a = _log1p_h(-tl.where(a0 < 1.0, a0, 0.0), False)
        l1p_b, h_b = _log1p_h(-tl.where(b0 < 0.5, b0, 0.0), False)
        has_o = o_live > 0  # else log(1 - b0) = log 0 = -inf, without taking it (interpreter warnings)
        l1p_b = tl.where(b0 < 0.5, l1p_b, tl.where(has_o, tl.log(tl.where(has_o, o_live, s_o) / s_o), NEG_INF))
        # not fine: the centre sits at max - 60 (x spans more than 60) and 1 + s has lost its
        # digits: lam from the log-sum-exps
        lam = tl.where(fine, l1p_s + l1p_a - l1p_b, lam_lse)
        if DIV == 2:
            # jsd uses lam at every entry: with no entry finite in both where w > 0 (s_live == 0,
            # e.g. disjoint supports) or no other-side mass there (o_live == 0), the moments give
            # lam = +inf (log(1 - b0) = log 0), delta = inf - inf = NaN and terms were lost (D half
            # of log 2 for disjoint supports); lam from the log-sum-exps then
            lam = tl.where((s_live > 0) & has_o, lam, lam_lse)
        if DIV != 2:
            d = tl.where(fine & (s <= 0.5), f2 - h_s - l1p_b, lam - m1)
            d = tl.where(a_mass > 0, float("inf"), tl.maximum(d, 0.0))
        else:
            kl_pm = tl.zeros([], tl.float32)
            for v0 in range(0, V, BLOCK_J):
                idx = v0 + offs_j
                mask = idx < V
                z = tl.load(z_row + idx, mask=mask, other=_PAD).to(tl.float32)
                u = tl.load(u_row + idx, mask=mask, other=_PAD).to(tl.float32)
                q = tl.exp((z - m_z) * inv_temp - log_sq)
                p = tl.exp((u - m_u) * inv_temp - log_sp)
                delta = _diff_minus(u, z, cc) * inv_temp - lam  # +-inf where one side is -inf
                e1 = _expm1(tl.minimum(delta, 80.0))
                y_q = 0.5 * e1  # m / q - 1
                y_p = -y_q / tl.where(e1 > -1.0, 1.0 + e1, 1.0)  # m / p - 1 (unused where e1 = -1: delta < -log 3)
                l1p_q, h_q = _log1p_h(y_q, True)
                l1p_p, h_p = _log1p_h(y_p, True)
                a = tl.abs(delta)
                e = tl.exp(-a)
                # past |delta| = log 3, with the larger weight: -> 1/2 as the smaller one -> 0
                big_val = 0.5 * (1.0 - e) - tl.where(e > 0, e * (a - _LN2 + tl.log(1.0 + e)), 0.0)
                any_mass = ((p > 0) | (q > 0)) & mask  # (p, q > 0 past V for T > 1e28)
                tp = tl.where(delta < -_LN3, q * big_val, p * h_p)
                tq = tl.where(delta > _LN3, p * big_val, q * h_q)
                kl_pm += tl.sum(tl.where(any_mass, tp, 0.0), 0)
                kl_qm += tl.sum(tl.where(any_mass, tq, 0.0), 0)
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
        # forward_kl with lam = +-inf (D = inf): NaN, so that delta is NaN and the gradient q - p
        # everywhere, without computing inf - inf (a quiet NaN raises no floating-point flag)
        lam_g = tl.where(tl.abs(lam) < float("inf"), lam, float("nan"))
        for v0 in range(0, V, BLOCK_J):
            idx = v0 + offs_j
            mask = idx < V
            z = tl.load(z_row + idx, mask=mask, other=_PAD).to(tl.float32)
            lq = (z - m_z) * inv_temp - log_sq
            q = tl.exp(lq)
            g = tl.zeros([BLOCK_J], tl.float32)
            if HAS_KD:
                u = tl.load(u_row + idx, mask=mask, other=_PAD).to(tl.float32)
                if DIV == 0:
                    p = tl.exp((u - m_u) * inv_temp - log_sp)
                    delta = lam_g - _diff_minus(z, u, cc) * inv_temp
                    small = tl.abs(delta) < 1.0
                    g += kd_grad_w * tl.where(small, -q * _expm1(tl.where(small, delta, 0.0)), q - p)
                elif DIV == 1:
                    live = (q > 0) & (u != NEG_INF)
                    g += kd_grad_w * tl.where(live, q * (m1 - _diff_minus(u, z, cc) * inv_temp), 0.0)
                else:
                    delta = _diff_minus(u, z, cc) * inv_temp - lam
                    big = delta > _LN3
                    l_q, h_unused = _log1p_h(0.5 * _expm1(tl.where(big, 0.0, delta)), True)
                    d_big = tl.where(big, delta, 1.0)
                    log_qm = tl.where(big, _LN2 - d_big - tl.log(1.0 + tl.exp(-d_big)), -l_q)
                    g += kd_grad_w * tl.where(q > 0, 0.5 * q * (log_qm - kl_qm), 0.0)
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
    # jsd's later sweeps on half-width tiles: its per-entry math needs registers
    block_j = cfg["BLOCK_V"] // 2 if divergence == "jsd" and cfg["BLOCK_V"] >= 64 else cfg["BLOCK_V"]
    t = float(temperature)
    _distill_kernel[(N,)](
        z, u, labels if labels is not None else losses, g, losses, scale,
        V, z.stride(0), u.stride(0), g.stride(0) if compute_grad else 0,
        1.0 / t, kd_weight * t * t, kd_weight * t, ce_weight, int(ignore_index),
        DIV=DIVERGENCE_CODES[divergence], HAS_KD=has_kd, HAS_CE=has_ce, HAS_LABELS=labels is not None,
        T_IS_ONE=t == 1.0, COMPUTE_GRAD=compute_grad, BLOCK_J=block_j, **cfg)
    return losses, (grad if compute_grad else None)
