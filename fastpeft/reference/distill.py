"""Reference knowledge-distillation loss (Hinton et al. 2015): the specification the distillation
kernels follow. Plain PyTorch composition (log_softmax + KL / JSD + cross_entropy), computed in
float32 (float64 when given float64, for test oracles), differentiated by autograd.

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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_j a_j (log a_j - log b_j) per row, with the terms where a_j == 0 set to 0 before the
    product (so -inf - -inf never reaches the value or the gradient)."""
    a = log_a.exp()
    live = a > 0
    diff = torch.where(live, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(-1)


def divergence_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    divergence: str) -> torch.Tensor:
    """D per row of [N, V] logits (float32 or float64), without the T^2 factor."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "forward_kl":
        return _kl_rows(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl_rows(log_q, log_p)
    if divergence != "jsd":
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    # log m = logaddexp(log p, log q) - log 2; entries -inf in both stay -inf without a NaN
    # gradient (logaddexp's backward at (-inf, -inf) is NaN, so those entries go in as 0)
    both_dead = torch.isneginf(log_p) & torch.isneginf(log_q)
    zero = torch.zeros_like(log_p)
    lm = torch.logaddexp(torch.where(both_dead, zero, log_p), torch.where(both_dead, zero, log_q)) - math.log(2.0)
    lm = torch.where(both_dead, torch.full_like(lm, float("-inf")), lm)
    return 0.5 * (_kl_rows(log_p, lm) + _kl_rows(log_q, lm))


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
    by the closed forms (q = softmax(z / T), p = softmax(u / T), w_kd = T^2 weight of D / T):

      forward_kl  w_kd * T * (q - p)
      reverse_kl  w_kd * T * q (log q - log p - D)
      jsd         w_kd * T * q ((log q - log m) - KL(q || m)) / 2,   m = (p + q) / 2
      CE          w_ce * (softmax(z) - onehot(label))

    with the rules of the module docstring (entries with q_j == 0 contribute 0; ignored rows get
    0). The torch backend of fastpeft.distillation_loss runs this; the tests check it against the
    autograd of ``distillation_loss``."""
    z, u, lab, valid, kd_w, ce_w = _rows(student_logits, teacher_logits, labels, alpha, ignore_index)
    V, dt = z.shape[1], z.dtype
    grad = torch.zeros_like(z)
    if kd_w > 0:
        log_q = F.log_softmax(z / temperature, dim=-1)
        log_p = F.log_softmax(u / temperature, dim=-1)
        q = log_q.exp()
        if divergence == "forward_kl":
            g = q - log_p.exp()
        else:
            if divergence == "reverse_kl":
                log_other = log_p
            elif divergence == "jsd":
                both_dead = torch.isneginf(log_p) & torch.isneginf(log_q)
                zero = torch.zeros_like(log_p)
                log_other = torch.logaddexp(torch.where(both_dead, zero, log_p),
                                            torch.where(both_dead, zero, log_q)) - math.log(2.0)
            else:
                raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
            live = q > 0
            diff = torch.where(live, log_q - log_other, torch.zeros_like(q))
            kl = (q * diff).sum(-1, keepdim=True)  # D (reverse_kl) or KL(q || m) (jsd)
            g = torch.where(live, q * (diff - kl), torch.zeros_like(q))
            if divergence == "jsd":
                g = 0.5 * g
        grad = grad + (kd_w * temperature) * g
    if ce_w > 0:
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        onehot = F.one_hot(safe, V).to(dt)
        grad = grad + ce_w * (F.softmax(z, dim=-1) - onehot)
    return torch.where(valid[:, None], grad, torch.zeros_like(grad))
