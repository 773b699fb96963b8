"""Reference knowledge-distillation loss (Hinton et al. 2015): the specification the distillation
kernels follow. Plain PyTorch, computed in float32 (float64 when given float64, for test
oracles), differentiated by autograd.

Logits are [..., V]; the rows are the leading positions, flattened. Per row, with temperature T,
student logits z, teacher logits u, q = softmax(z / T), p = softmax(u / T):

  forward_kl   D = KL(p || q) = sum_j p_j (log p_j - log q_j)
               (= F.kl_div(log q, log p, log_target=True, reduction="none").sum(-1))
  reverse_kl   D = KL(q || p) = sum_j q_j (log q_j - log p_j)
  jsd          D = (KL(p || m) + KL(q || m)) / 2,  m = (p + q) / 2
  CE           = -log softmax(z)[label]            (T = 1, as F.cross_entropy)

  row loss     = alpha * T^2 * D + (1 - alpha) * CE

Rules:
  * labels None: there is no CE term and the KD term has full weight: row loss = T^2 * D (alpha
    is not used; alpha == 0 without labels is an error, there would be nothing to learn from).
  * A row whose label == ignore_index is excluded from BOTH terms (as Liger-Kernel does): its
    loss is 0, it gets no gradient, and it does not count in "mean".
  * A term whose weight is 0 (alpha == 0: the KD term; alpha == 1: CE) is not computed at all,
    so it cannot turn the loss into NaN (e.g. CE on a label whose logit is -inf).
  * reduction "none": the row losses, shape logits.shape[:-1]; "sum": their sum; "mean": the sum
    over the counted rows divided by their number (0 when no row counts, never NaN).
  * -inf logits (masked vocabulary entries) are allowed: a term p_j (log p_j - log q_j) with
    p_j == 0 is 0 (0 log 0 = 0), so entries -inf in both student and teacher contribute nothing.
    Where the math is finite the result is finite: forward_kl with an entry -inf only in the
    teacher, reverse_kl with an entry -inf only in the student, jsd with either. forward_kl with
    an entry -inf only in the student (or reverse_kl only in the teacher) is +inf, as the math.
    Each counted row needs at least one finite logit in student and teacher; +inf / NaN logits
    are not supported. The teacher gets no gradient.
The loss is float32 (float64 for float64 inputs) whatever the logits' dtype.

Accuracy: D is evaluated as a sum of terms >= 0 of order delta^2, delta = log p - log q formed to
a few ulps of its own size (``_log_ratio``), never as a difference of log-softmaxes (whose float32
rounding, ~1e-7 log V, swamps D ~ delta^2 / 2 once delta = (u - z) / T is small, and T^2 then
multiplies it: at T = 1e4 that loss came out 5-30x too large); in float32 the loss and its
gradient stay within a few ulps of float64 at any temperature (measured <= 5e-7 relative for T
from 1 to 1e4, both backends).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")

_LN2 = math.log(2.0)
_LN3 = math.log(3.0)
_E2_COEFFS = tuple(1.0 / math.factorial(k) for k in range(2, 11))  # e^x - 1 - x = sum_{k >= 2} x^k / k!
_ATANH_COEFFS = tuple(1.0 / k for k in range(3, 17, 2))  # atanh(w) - w = w^3 / 3 + w^5 / 5 + ...
CENTER_MARGIN = 60.0  # x <= 60: e^x stays finite in float32 summed over any vocabulary


def _small(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Where the series below replace the expressions as written (those lose digits to
    cancellation near 0). float64 uses them only very near 0, where their truncation is
    below its rounding too."""
    if x.dtype == torch.float64:
        lo, hi = max(lo, -1e-3), min(hi, 1e-3)
    return (x >= lo) & (x <= hi)


def expm1_minus_x(x: torch.Tensor) -> torch.Tensor:
    """e^x - 1 - x (>= 0) to a few ulps for every x: the Taylor series for |x| <= 1/2, else as
    written (then e^x - 1 - x has no cancellation worse than 5x). -inf gives +inf."""
    small = _small(x, -0.5, 0.5)
    xs = torch.where(small, x, torch.zeros_like(x))
    acc = torch.full_like(x, _E2_COEFFS[-1])
    for c in reversed(_E2_COEFFS[:-1]):
        acc = acc * xs + c
    xl = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, acc * xs * xs, torch.expm1(xl) - xl)


def y_minus_log1p(y: torch.Tensor) -> torch.Tensor:
    """y - log1p(y) (>= 0) for y > -1 to a few ulps: for y in [-1/2, 1] by log1p(y) = 2 atanh(w),
    w = y / (2 + y), |w| <= 1/3, as w y - 2 (atanh(w) - w) (y - 2 w = w y), else as written."""
    small = _small(y, -0.5, 1.0)
    ys = torch.where(small, y, torch.zeros_like(y))
    w = ys / (2.0 + ys)
    w2 = w * w
    acc = torch.full_like(y, _ATANH_COEFFS[-1])
    for c in reversed(_ATANH_COEFFS[:-1]):
        acc = acc * w2 + c
    yl = torch.where(small, torch.ones_like(y), y)
    return torch.where(small, w * ys - 2.0 * w * w2 * acc, yl - torch.log1p(yl))


def diff_minus(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(a - b) - c to a few ulps of the result: a - b split exactly into its rounded value and
    rounding error (Knuth's TwoSum), so neither a large offset between a and b nor their
    near-equality costs digits. Finite inputs."""
    s = a - b
    bb = s - a
    return (s - c) + ((a - (s - bb)) - (b + bb))


def _log_ratio(z: torch.Tensor, u: torch.Tensor, temperature: float):
    """The pieces every divergence and gradient is written with, for [N, V] logits:

      q, p      softmax(z / T), softmax(u / T)
      live      entries finite in both (the others are -inf in one or both)
      delta     log p_j - log q_j on live entries (0 elsewhere), to a few ulps of its own size
                rather than of log V: with x = ((u - z) - c) / T about a centre c (detached; any
                value is exact: the q-weighted mean of u - z, at least its max - 60 T so that e^x
                is finite) and E the q-weighted mean over the entries with q > 0,
                  delta = x - lam,  lam = log1p(E[expm1(x)]) + log1p(-a0) - log(1 - p0),
                p0 being p's mass where q == 0 (-inf or underflowed student logits): as
                sum_{q>0} q e^delta = sum_{q>0} p, both normalizations sit in lam, and float32's
                error in sum(q) cancels in the ratio E[.]. Where x spans more than 60
                (E[expm1(x)] < -1/2), lam comes from the log-sum-exps instead (delta is then of
                the order of x: their rounding is small against it)
      a0, b0    [N, 1]: q's mass where the teacher is -inf, p's mass where the student is -inf
    """
    lq = F.log_softmax(z / temperature, dim=-1)
    lp = F.log_softmax(u / temperature, dim=-1)
    q, p = lq.exp(), lp.exp()
    zf, uf = ~torch.isneginf(z), ~torch.isneginf(u)
    live = zf & uf
    zero = torch.zeros_like(q)
    a0 = torch.where(zf & ~uf, q, zero).sum(-1, keepdim=True)
    b0 = torch.where(uf & ~zf, p, zero).sum(-1, keepdim=True)
    ql = torch.where(live, q, zero)
    weighted = ql > 0  # (q may underflow to 0 at finite logits: e.g. -1e4 used as a mask)
    s_live = ql.sum(-1, keepdim=True)
    has_live = s_live > 0
    s_safe = torch.where(has_live, s_live, torch.ones_like(s_live))
    # x formed without losing digits to an offset between the models' logits (diff_minus)
    diff = torch.where(live, u - z, zero)
    with torch.no_grad():
        top = torch.where(weighted, diff, torch.full_like(diff, float("-inf"))).amax(-1, keepdim=True)
        c = torch.maximum((ql * diff).sum(-1, keepdim=True) / s_safe, top - CENTER_MARGIN * temperature)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    x = torch.where(live, diff_minus(torch.where(live, u, zero), torch.where(live, z, zero), c) / temperature, zero)
    xw = torch.where(weighted, x, zero)
    s = torch.where(has_live, (ql * torch.expm1(xw)).sum(-1, keepdim=True) / s_safe, torch.zeros_like(s_live))
    # a0 or b0 == 1 (disjoint supports) makes the divergence +inf or log 2 whatever lam is
    a0s = torch.where(a0 < 1, a0, torch.zeros_like(a0))
    # p's mass where q == 0: -inf student logits and q underflowing at finite ones (whose delta
    # is finite and exact: their terms below are p_j delta_j, whatever q_j's rounding)
    p0 = torch.where(~weighted & uf, p, zero).sum(-1, keepdim=True)
    p_w = torch.where(weighted, p, zero).sum(-1, keepdim=True)
    few = p0 <= 0.5
    log_pw = torch.where(few, torch.log1p(-torch.where(few, p0, torch.zeros_like(p0))),
                         torch.log(torch.where(few, torch.ones_like(p_w), p_w)))  # log(1 - p0)
    fine = s >= -0.5
    lam = torch.log1p(torch.where(fine, s, torch.zeros_like(s))) + torch.log1p(-a0s) - log_pw
    # s < -1/2: the centre sits at max - 60 T, far above the mean (x spans more than 60), and
    # 1 + s has lost its digits; there the log-sum-exp difference is as accurate as delta needs
    u_top, z_top = u.amax(-1, keepdim=True), z.amax(-1, keepdim=True)
    lam_lse = (diff_minus(u_top, z_top, c) / temperature + torch.logsumexp((u - u_top) / temperature, -1, True)
               - torch.logsumexp((z - z_top) / temperature, -1, True))
    delta = torch.where(live, x - torch.where(fine, lam, lam_lse), zero)
    return q, p, lq, lp, live, delta, a0, b0


def _kl_terms(a: torch.Tensor, b: torch.Tensor, live: torch.Tensor, delta_ba: torch.Tensor) -> torch.Tensor:
    """sum over live entries of a_j (L_j - 1 + e^-L_j), L_j = log a_j - log b_j = -delta_ba_j (each
    term >= 0, of order a_j L_j^2: no cancellation): as a_j E2(delta_ba_j) where delta_ba_j < 1,
    else b_j (1 - (1 + delta_ba_j) e^-delta_ba_j) (the same, without overflow)."""
    big = delta_ba >= 1.0
    small_arg = torch.where(live & ~big, delta_ba, torch.zeros_like(delta_ba))
    big_arg = torch.where(live & big, delta_ba, torch.ones_like(delta_ba))
    term = torch.where(big, b * (1.0 - (1.0 + big_arg) * torch.exp(-big_arg)), a * expm1_minus_x(small_arg))
    return torch.where(live, term, torch.zeros_like(term)).sum(-1)


def _jsd_halves(q, p, live, delta, a0, b0):
    """(KL(p || m), KL(q || m)) per row, m = (p + q) / 2, as sums of terms >= 0. On live entries
    (y - log1p(y) = h(y) >= 0):
      q log(q / m) - (q - m) = q h(m / q - 1),  m / q - 1 = expm1(delta) / 2,
      p log(p / m) - (p - m) = p h(m / p - 1),  m / p - 1 = expm1(-delta) / 2,
    the one whose argument exceeds 1 (|delta| > log 3) rewritten with the other weight:
      q h(expm1(delta) / 2) = p ((1 - e) / 2 - e (delta - log 2 + log1p(e))),  e = e^-delta.
    The -inf entries contribute exactly: the sum of the (q - m) over q > 0 is b0 / 2, and
    q log(q / m) = q log 2 where p = 0."""
    zero = torch.zeros_like(q)
    a = delta.abs()
    big = live & (a > _LN3)
    a_big = torch.where(big, a, torch.ones_like(a))
    e = torch.exp(-a_big)
    big_val = (1.0 - e) / 2.0 - e * (a_big - _LN2 + torch.log1p(e))
    dq = torch.where(live & (delta <= _LN3), delta, zero)
    dp = torch.where(live & (delta >= -_LN3), delta, zero)
    tq = torch.where(delta > _LN3, p * big_val, q * y_minus_log1p(0.5 * torch.expm1(dq)))
    tp = torch.where(delta < -_LN3, q * big_val, p * y_minus_log1p(0.5 * torch.expm1(-dp)))
    h_half = _LN2 - 0.5  # h(-1/2): the other side is -inf
    kl_pm = torch.where(live, tp, zero).sum(-1) + (b0 * h_half + a0 / 2.0).squeeze(-1)
    kl_qm = torch.where(live, tq, zero).sum(-1) + (a0 * h_half + b0 / 2.0).squeeze(-1)
    return kl_pm, kl_qm


def _infinite_if(mass: torch.Tensor) -> torch.Tensor:
    """+inf where mass > 0 (a KL whose first distribution has mass where the second has none)."""
    m = mass.squeeze(-1)
    return torch.where(m > 0, torch.full_like(m, float("inf")), torch.zeros_like(m))


def _divergence(pieces, divergence: str):
    """(D per row, and for jsd KL(q || m)) from ``_log_ratio``'s pieces."""
    q, p, _, _, live, delta, a0, b0 = pieces
    if divergence == "forward_kl":  # sum p (delta - 1 + e^-delta) + sum_{p=0} q
        return _kl_terms(p, q, live, -delta) + a0.squeeze(-1) + _infinite_if(b0), None
    if divergence == "reverse_kl":
        return _kl_terms(q, p, live, delta) + b0.squeeze(-1) + _infinite_if(a0), None
    if divergence != "jsd":
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    kl_pm, kl_qm = _jsd_halves(q, p, live, delta, a0, b0)
    return 0.5 * (kl_pm + kl_qm), kl_qm


def divergence_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    divergence: str) -> torch.Tensor:
    """D per row of [N, V] logits (float32 or float64), without the T^2 factor."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return _divergence(_log_ratio(student_logits, teacher_logits, temperature), divergence)[0]


def _rows(student_logits, teacher_logits, labels, alpha, ignore_index):
    """(z, u [N, V] in float32 (float64 for float64 logits), labels [N] int64 or None, the counted
    rows [N] bool, the KD and CE weights): the rules of the module docstring."""
    V = student_logits.shape[-1]
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.reshape(-1, V).to(dt)
    u = teacher_logits.reshape(-1, V).to(dt)
    if labels is None:
        return z, u, None, torch.ones(z.shape[0], dtype=torch.bool, device=z.device), 1.0, 0.0
    lab = labels.reshape(-1).long()
    return z, u, lab, lab != ignore_index, float(alpha), 1.0 - float(alpha)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, temperature: float = 2.0, alpha: float = 0.5,
                      ignore_index: int = -100, divergence: str = "forward_kl",
                      reduction: str = "mean") -> torch.Tensor:
    """alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, labels); see the module
    docstring. No input checks (fastpeft.distillation_loss does them); autograd gives the
    student's gradient."""
    lead = student_logits.shape[:-1]
    z, u, lab, valid, kd_w, ce_w = _rows(student_logits, teacher_logits.detach(), labels, alpha, ignore_index)
    dt, n = z.dtype, z.shape[0]
    idx = valid.nonzero().squeeze(1)
    zv, uv = z.index_select(0, idx), u.index_select(0, idx)
    rows_v = torch.zeros(idx.shape[0], dtype=dt, device=z.device)
    if kd_w > 0:
        rows_v = rows_v + (kd_w * temperature * temperature) * divergence_rows(zv, uv, temperature, divergence)
    if ce_w > 0:
        rows_v = rows_v + ce_w * F.cross_entropy(zv, lab.index_select(0, idx), reduction="none")
    if reduction == "none":
        rows = torch.zeros(n, dtype=dt, device=z.device).index_put((idx,), rows_v)
        return rows.reshape(lead)
    total = rows_v.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return total / max(int(idx.shape[0]), 1)


def fused_linear_distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                   teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                                   labels: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
                                   teacher_bias: torch.Tensor | None = None, temperature: float = 2.0,
                                   alpha: float = 0.5, ignore_index: int = -100, divergence: str = "forward_kl",
                                   reduction: str = "mean") -> torch.Tensor:
    """The unfused composition: both logits materialized by F.linear (the teacher's without
    gradient), then ``distillation_loss``."""
    z = F.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        u = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return distillation_loss(z, u, labels, temperature, alpha, ignore_index, divergence, reduction)


def distillation_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, temperature: float = 2.0, alpha: float = 0.5,
                      ignore_index: int = -100, divergence: str = "forward_kl") -> torch.Tensor:
    """d row_loss[i] / d student_logits[i, :] for every row: the gradient of the row losses of
    ``distillation_loss(..., reduction="none")``, [N, V] in float32 (float64 for float64 logits),
    by the closed forms (q = softmax(z / T), p = softmax(u / T), w_kd = T^2 weight of D / T,
    delta = log p - log q from ``_log_ratio``, exact to a few ulps of its own size):

      forward_kl  w_kd * T * (q - p)                                 (= -q expm1(delta) where |delta| < 1)
      reverse_kl  w_kd * T * q (log q - log p - D)                   (= q (-delta - D))
      jsd         w_kd * T * q ((log q - log m) - KL(q || m)) / 2,   m = (p + q) / 2,
                  log q - log m = -log1p(expm1(delta) / 2)           (log 2 where p = 0)
      CE          w_ce * (softmax(z) - onehot(label))

    with the rules of the module docstring (entries with q_j == 0 contribute 0; ignored rows get
    0; where D is +inf the KD gradient is not meaningful). The torch backend of
    fastpeft.distillation_loss runs this; the tests check it against the autograd of
    ``distillation_loss``."""
    z, u, lab, valid, kd_w, ce_w = _rows(student_logits, teacher_logits, labels, alpha, ignore_index)
    V, dt = z.shape[1], z.dtype
    grad = torch.zeros_like(z)
    if kd_w > 0:
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        pieces = _log_ratio(z, u, temperature)
        q, p, _, _, live, delta, _, _ = pieces
        zero = torch.zeros_like(q)
        if divergence == "forward_kl":
            small = live & (delta.abs() < 1.0)
            g = torch.where(small, -q * torch.expm1(torch.where(small, delta, zero)), q - p)
        elif divergence == "reverse_kl":
            d = _divergence(pieces, divergence)[0].unsqueeze(-1)
            g = torch.where(live, q * (-delta - d), zero)
        else:
            kl_qm = _divergence(pieces, divergence)[1].unsqueeze(-1)
            big = delta > _LN3
            d_small = torch.where(live & ~big, delta, zero)
            d_big = torch.where(live & big, delta, torch.ones_like(delta))
            log_qm = torch.where(big, -(d_big - _LN2 + torch.log1p(torch.exp(-d_big))),
                                 -torch.log1p(0.5 * torch.expm1(d_small)))
            log_qm = torch.where(live, log_qm, torch.full_like(q, _LN2))  # p == 0: m = q / 2
            g = torch.where(q > 0, 0.5 * q * (log_qm - kl_qm), zero)
        grad = grad + (kd_w * temperature) * g
    if ce_w > 0:
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        onehot = F.one_hot(safe, V).to(dt)
        grad = grad + ce_w * (F.softmax(z, dim=-1) - onehot)
    return torch.where(valid[:, None], grad, torch.zeros_like(grad))
