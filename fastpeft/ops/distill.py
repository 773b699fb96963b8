"""Knowledge distillation (Hinton et al. 2015) as autograd ops: input checks, backend choice, the
Functions. Semantics: fastpeft/reference/distill.py.

``distillation_loss``: the loss kernel computes the loss and the student's gradient in its
forward (fastpeft/kernels/distill.py), so nothing vocabulary-sized but that gradient is kept;
backward only scales it by grad_output.
``fused_linear_distillation_loss``: the same from hidden states and LM heads, a chunk of rows
at a time: each chunk's logits (two matmuls), the loss kernel on them (its gradient written
over the student chunk's logits), then at once the chunk's share of the gradients of the
student's hidden states, head weight and bias (two matmuls and a sum), so the [tokens, vocab]
logits never exist whole (Liger-Kernel's fused-linear approach).

Backends: ``triton`` (the kernel) and ``torch`` (the reference loss and its closed-form gradient,
fastpeft.reference.distill.distillation_grad; the fused-linear op chunks it the same way).

Registered ops (fastpeft/ops/_library.py), each with autograd:
  fastpeft::distillation_loss              the loss (``_fwd``: the loss and the student's gradient)
  fastpeft::fused_linear_distillation_loss the loss (``_fwd``: the loss and the three gradients)
No host sync: the labels are range-checked on the device inside the kernels
(fastpeft._checks.check_values); the backward scales the saved gradient by grad_output in place
(as Liger-Kernel does), so a second backward through the same graph is refused by autograd's
saved-tensor check.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .. import _backend, _checks
from ..reference import distill as ref
from ._common import building_graph, on_device, refuse_double_backward, rows
from ._library import below_autograd, call, define, eager, needs_grad, register_autograd

OP = "distillation_loss"
KERNELS = ("triton", "torch")  # in the order preferred on CUDA tensors
DIVERGENCES = ref.DIVERGENCES
REDUCTIONS = ref.REDUCTIONS
FUSED_REDUCTIONS = ("mean", "sum")
CHUNK_ELEMENTS = 2**26  # default chunk: about this many logits (128 MiB in bf16) per chunk and model


# ---------------------------------------------------------------------------------------------
# checks


def check_options(temperature, alpha, ignore_index, divergence, reduction, reductions=REDUCTIONS):
    """Validate the scalar options; returns (temperature, alpha) as floats."""
    temperature = _checks.finite_float("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    alpha = _checks.finite_float("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in reductions:
        raise ValueError(f"reduction must be one of {reductions}, got {reduction!r}")
    return temperature, alpha


def _check_labels(labels, rows_shape, V, ignore_index, device, what="student_logits"):
    """labels: integer tensor of shape ``rows_shape`` on ``device`` (the values are checked in the
    op's kernel: ``_check_label_values``)."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(rows_shape):
        raise ValueError(f"labels must have shape {tuple(rows_shape)} ({what}'s shape without the vocab dim), "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but {what} is on {device}")


def _check_label_values(labels, V, ignore_index) -> None:
    """Each label in [0, V) or ignore_index, on the device (no host sync on CUDA)."""
    if labels is None or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    _checks.check_values(~bad, lambda: (f"labels must be in [0, {V}) or ignore_index ({ignore_index}); "
                                        f"got {labels[bad].flatten()[:4].tolist()}"))


def _check_logits(student_logits, teacher_logits):
    _checks.tensor("student_logits", student_logits, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("teacher_logits", teacher_logits, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"vocab mismatch: student_logits {tuple(student_logits.shape)} has "
                         f"{student_logits.shape[-1]} classes, teacher_logits {tuple(teacher_logits.shape)} "
                         f"has {teacher_logits.shape[-1]}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.shape[-1] == 0:
        raise ValueError(f"the vocab dim of the logits is empty (shape {tuple(student_logits.shape)})")
    _checks.same_device(student_logits=student_logits, teacher_logits=teacher_logits)


def _weights(labels, alpha):
    """(kd weight, ce weight): labels None -> KD only at full weight."""
    return (1.0, 0.0) if labels is None else (alpha, 1.0 - alpha)


def _grad_scale(labels, ignore_index, reduction, n_rows, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(counted rows as a device tensor, the gradient's factor float32 [1]) without a host sync."""
    if labels is None:
        count = torch.full((1,), n_rows, dtype=torch.float32, device=device)
    else:
        count = (labels.reshape(-1) != ignore_index).sum().to(torch.float32).reshape(1)
    if reduction == "mean":
        return count, 1.0 / count.clamp(min=1.0)
    return count, torch.ones(1, dtype=torch.float32, device=device)


def _reduce(row_losses: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return row_losses.sum()
    return (row_losses.sum() / count.clamp(min=1.0)).reshape(())


NO_DOUBLE_BACKWARD = ("its forward computes the gradient and keeps only that (not the logits), so the "
                      "gradient has no graph to differentiate; compute the loss with fastpeft.reference.distill"
                      " for higher-order gradients")


def _scale_grad_(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad *= g (grad_output, one element) in place: no copy of a logits-sized tensor and no host
    read of g. The saved gradient is used up: autograd refuses a second backward (its version
    counter changed)."""
    return grad.mul_(g.reshape(()).to(torch.float32))


# ---------------------------------------------------------------------------------------------
# the loss on logits


def _loss_kernel(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, divergence, reduction,
                 need_grad, backend):
    """(the loss, d loss / d student_logits [..., V] in the student's dtype, or an empty placeholder
    without need_grad): both from one pass of the triton kernel, or the torch reference."""
    V = student_logits.shape[-1]
    shape = student_logits.shape
    _check_label_values(labels, V, ignore_index)
    name = _backend.choose(OP, student_logits.device, KERNELS, backend)
    z, u = rows(student_logits), rows(teacher_logits)
    lab = None if labels is None else labels.reshape(-1)
    count, scale = _grad_scale(labels, ignore_index, reduction, z.shape[0], z.device)
    if name == "torch" or z.numel() == 0:
        row_losses = ref.distillation_loss(z, u, lab, temperature, alpha, ignore_index, divergence, "none").float()
        grad = None
        if need_grad:
            grad = (ref.distillation_grad(z, u, lab, temperature, alpha, ignore_index, divergence)
                    * scale).to(student_logits.dtype)
    else:
        from ..kernels import distill as k
        if lab is not None and lab.dtype not in (torch.int32, torch.int64):
            lab = lab.long()
        kd_w, ce_w = _weights(labels, alpha)
        with on_device(z):
            row_losses, grad = k.distill_loss_fwd(z, u, lab.contiguous() if lab is not None else None, temperature,
                                            kd_w, ce_w, ignore_index, divergence, scale, need_grad)
    loss = row_losses.reshape(shape[:-1]) if reduction == "none" else _reduce(row_losses, count, reduction)
    grad = grad.reshape(shape) if need_grad else student_logits.new_empty(0)
    return loss, grad


def _loss_fake(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, divergence, reduction,
               need_grad, backend):
    shape = student_logits.shape
    loss = student_logits.new_empty(shape[:-1] if reduction == "none" else (), dtype=torch.float32)
    return loss, student_logits.new_empty(shape if need_grad else (0,))


_LOSS_ARGS = ("Tensor student_logits, Tensor teacher_logits, Tensor? labels, float temperature, float alpha, "
              "int ignore_index, str divergence, str reduction")
distillation_loss_fwd_op = define(
    f"distillation_loss_fwd({_LOSS_ARGS}, bool need_grad, str? backend) -> (Tensor, Tensor)", _loss_kernel,
    _loss_fake)
distillation_loss_op = define(
    f"distillation_loss({_LOSS_ARGS}, str? backend) -> Tensor",
    lambda *a: _loss_kernel(*a[:8], False, a[8])[0], lambda *a: _loss_fake(*a[:8], False, a[8])[0])


class DistillationLossFunction(torch.autograd.Function):
    """Autograd of fastpeft::distillation_loss: forward keeps only the student's gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, temperature, alpha, ignore_index, divergence,
                reduction, backend, direct=False):
        """``direct``: an eager call on plain tensors: the kernel runs without the dispatcher."""
        with below_autograd():
            loss, grad = call(distillation_loss_fwd_op, direct, student_logits, teacher_logits, labels, temperature,
                              alpha, ignore_index, divergence, reduction, True, backend)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, g):
        if building_graph():
            refuse_double_backward("distillation_loss", NO_DOUBLE_BACKWARD)
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(g.reshape(*g.shape, 1).to(torch.float32))
        else:
            _scale_grad_(grad, g)
        return grad, None, None, None, None, None, None, None, None, None


register_autograd(distillation_loss_op, DistillationLossFunction)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, temperature: float = 2.0, alpha: float = 0.5,
                      ignore_index: int = -100, divergence: str = "forward_kl", reduction: str = "mean", *,
                      backend: str | None = None) -> torch.Tensor:
    """Knowledge-distillation loss (Hinton et al. 2015), per row of [..., V] logits:

        alpha * T^2 * D(softmax(teacher / T), softmax(student / T)) + (1 - alpha) * CE(student, label)

    D: "forward_kl" KL(p_teacher || q_student), "reverse_kl" KL(q || p), "jsd" the Jensen-Shannon
    divergence (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2; CE at T = 1. labels None: no CE
    term, loss T^2 * D (alpha unused; alpha == 0 is then an error). Rows whose label is
    ignore_index count in neither term. reduction "mean" (over the counted rows; 0 when none
    count), "sum" or "none" (the row losses, shape logits.shape[:-1]). Logits fp32 / fp16 /
    bf16 (student and teacher may differ: each is read in its own dtype), the same shape and
    device for both; the loss is float32; -inf logits are masked entries (0 log 0 = 0). The
    teacher gets no gradient. Exact rules: fastpeft/reference/distill.py.

    The triton backend computes the loss and d loss / d student_logits in one kernel launch
    (online softmax, float32 accumulation); the gradient (in the student's dtype) is all that is
    kept for backward. Labels are range-checked on the device (CPU: a ValueError; CUDA: a
    device-side assertion, no host sync). Runs as ``torch.ops.fastpeft.distillation_loss``. The
    torch backend (the CPU path; on CUDA tensors only when forced) is the reference, which
    selects the counted rows by value: on CUDA tensors that reads their number on the host.
    """
    _check_logits(student_logits, teacher_logits)
    temperature, alpha = check_options(temperature, alpha, ignore_index, divergence, reduction)
    if labels is None and alpha == 0.0:
        raise ValueError("alpha == 0 weights only the cross-entropy term, which needs labels")
    V = student_logits.shape[-1]
    _check_labels(labels, student_logits.shape[:-1], V, ignore_index, student_logits.device)
    if backend is not None:
        _backend.check_name(backend)
    args = (student_logits, teacher_logits.detach(), labels, temperature, alpha, int(ignore_index), divergence,
            reduction, backend)
    if eager(student_logits.device.type, student_logits, teacher_logits, labels):  # no dispatcher round trips
        if needs_grad(student_logits):
            return DistillationLossFunction.apply(*args, True)
        return _loss_kernel(*args[:8], False, backend)[0]
    return distillation_loss_op(*args)


# ---------------------------------------------------------------------------------------------
# the fused-linear loss on hidden states


def default_chunk_size(n_rows: int, vocab: int) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS logits, a multiple of 16 when that is >= 16."""
    c = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if c >= 16:
        c -= c % 16
    return max(1, min(c, n_rows))


def _chunk_loss_torch(z, u, lab, temperature, alpha, ignore_index, divergence, scale, need_grad):
    """The reference on one chunk: (row losses, scale * d(row losses)/dz in z's dtype, or None)."""
    row_losses = ref.distillation_loss(z, u, lab, temperature, alpha, ignore_index, divergence, "none").float()
    grad = None
    if need_grad:
        grad = (ref.distillation_grad(z, u, lab, temperature, alpha, ignore_index, divergence) * scale).to(z.dtype)
    return row_losses, grad


def _accumulate_weight_grad(acc: torch.Tensor, gz: torch.Tensor, h: torch.Tensor, block: int = 16384) -> None:
    """acc (float32 [V, H]) += gz^T h. For 16-bit inputs each product is formed in their dtype
    (float32 accumulation inside the matmul) in blocks of vocabulary rows, then added in float32."""
    if gz.dtype == torch.float32:
        acc.addmm_(gz.t(), h)
        return
    for v0 in range(0, gz.shape[1], block):
        acc[v0:v0 + block] += torch.mm(gz[:, v0:v0 + block].t(), h).float()


def _fused_kernel(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                  teacher_bias, temperature, alpha, ignore_index, divergence, reduction, chunk_size, need_h, need_w,
                  need_b, backend):
    """(loss, grad of student_hidden, of student_weight, of student_bias), the gradients already
    d loss / d (...) (an empty placeholder where not needed), a chunk of rows at a time."""
    ws, wt, bs, bt = student_weight, teacher_weight, student_bias, teacher_bias
    V = ws.shape[0]
    N = math.prod(student_hidden.shape[:-1])
    hs = student_hidden.reshape(N, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(N, teacher_hidden.shape[-1])
    _check_label_values(labels, V, ignore_index)
    name = _backend.choose(OP, hs.device, KERNELS, backend)
    need_b = need_b and bs is not None
    need_z = need_h or need_w or need_b
    kd_w, ce_w = _weights(labels, alpha)
    count, scale = _grad_scale(labels, ignore_index, reduction, N, hs.device)
    lab = None if labels is None else labels.reshape(-1)
    if lab is not None and lab.dtype not in (torch.int32, torch.int64):
        lab = lab.long()
    row_losses = torch.empty(N, dtype=torch.float32, device=hs.device)
    grad_h = torch.empty(hs.shape, dtype=hs.dtype, device=hs.device) if need_h else None
    grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=ws.device) if need_b else None
    with on_device(hs):
        for c0 in range(0, N, chunk_size):
            c1 = min(N, c0 + chunk_size)
            h = hs[c0:c1]
            z = F.linear(h, ws, bs)
            u = F.linear(ht[c0:c1], wt, bt)
            lab_c = None if lab is None else lab[c0:c1].contiguous()
            if name == "triton":
                from ..kernels import distill as k
                r, gz = k.distill_loss_fwd(z, u, lab_c, temperature, kd_w, ce_w, ignore_index, divergence,
                                           scale, need_z, grad=z if need_z else None)
            else:
                r, gz = _chunk_loss_torch(z, u, lab_c, temperature, alpha, ignore_index, divergence, scale, need_z)
            del u
            row_losses[c0:c1] = r
            if need_h:
                torch.mm(gz, ws, out=grad_h[c0:c1])
            if need_w:
                _accumulate_weight_grad(grad_w, gz, h)
            if need_b:
                grad_b += gz.sum(0, dtype=torch.float32)
            del z, gz
    empty = lambda: hs.new_empty(0)  # a placeholder per output: outputs must not alias each other
    return (_reduce(row_losses, count, reduction), empty() if grad_h is None else grad_h.reshape(student_hidden.shape),
            empty() if grad_w is None else grad_w.to(ws.dtype), empty() if grad_b is None else grad_b.to(bs.dtype))


def _fused_fake(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                teacher_bias, temperature, alpha, ignore_index, divergence, reduction, chunk_size, need_h, need_w,
                need_b, backend):
    empty = lambda: student_hidden.new_empty(0)
    need_b = need_b and student_bias is not None
    return (student_hidden.new_empty((), dtype=torch.float32),
            student_hidden.new_empty(student_hidden.shape) if need_h else empty(),
            student_weight.new_empty(student_weight.shape) if need_w else empty(),
            student_bias.new_empty(student_bias.shape) if need_b else empty())


_FUSED_ARGS = ("Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, "
               "Tensor? labels, Tensor? student_bias, Tensor? teacher_bias, float temperature, float alpha, "
               "int ignore_index, str divergence, str reduction, int chunk_size")
fused_linear_distillation_loss_fwd_op = define(
    f"fused_linear_distillation_loss_fwd({_FUSED_ARGS}, bool need_h, bool need_w, bool need_b, str? backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)", _fused_kernel, _fused_fake)
fused_linear_distillation_loss_op = define(
    f"fused_linear_distillation_loss({_FUSED_ARGS}, str? backend) -> Tensor",
    lambda *a: _fused_kernel(*a[:13], False, False, False, a[13])[0],
    lambda *a: _fused_fake(*a[:13], False, False, False, a[13])[0])


class FusedLinearDistillationFunction(torch.autograd.Function):
    """Autograd of fastpeft::fused_linear_distillation_loss: the forward computes the gradients
    of the student's hidden states, head weight and bias; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, labels, bs, bt, temperature, alpha, ignore_index, divergence, reduction,
                chunk_size, backend, direct=False):
        """``direct``: an eager call on plain tensors: the kernels run without the dispatcher."""
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5]
        with below_autograd():
            loss, gh, gw, gb = call(fused_linear_distillation_loss_fwd_op, direct, hs, ws, ht, wt, labels, bs, bt,
                                    temperature, alpha, ignore_index, divergence, reduction, chunk_size, need_h,
                                    need_w, need_b, backend)
        ctx.save_for_backward(gh, gw, gb)
        ctx.needs = (need_h, need_w, need_b and bs is not None)
        return loss

    @staticmethod
    def backward(ctx, g):
        if building_graph():
            refuse_double_backward("fused_linear_distillation_loss", NO_DOUBLE_BACKWARD)
        gh, gw, gb = (_scale_grad_(t, g) if need else None for t, need in zip(ctx.saved_tensors, ctx.needs))
        return gh, gw, None, None, None, gb, None, None, None, None, None, None, None, None, None


register_autograd(fused_linear_distillation_loss_op, FusedLinearDistillationFunction)


def _check_linear(name_h, h, name_w, w, name_b, b):
    _checks.tensor(name_h, h, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(name_w, w, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if h.shape[-1] != w.shape[1]:
        raise ValueError(f"{name_h} {tuple(h.shape)} has {h.shape[-1]} features but {name_w} {tuple(w.shape)} "
                         f"expects {w.shape[1]} ([vocab, hidden])")
    if b is not None:
        _checks.tensor(name_b, b, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"{name_b} {tuple(b.shape)} must have {w.shape[0]} entries (the vocab of {name_w})")
    _checks.same_dtype(**{name_h: h, name_w: w, name_b: b})


def fused_linear_distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                   teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                                   labels: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
                                   teacher_bias: torch.Tensor | None = None, temperature: float = 2.0,
                                   alpha: float = 0.5, ignore_index: int = -100, divergence: str = "forward_kl",
                                   reduction: str = "mean", chunk_size: int | None = None, *,
                                   backend: str | None = None) -> torch.Tensor:
    """``distillation_loss(student_hidden @ student_weight^T + student_bias, teacher_hidden @
    teacher_weight^T + teacher_bias, labels, ...)`` without materializing the [N, V] logits.

    student_hidden [..., Hs], student_weight [V, Hs], teacher_hidden [..., Ht] (same leading
    shape), teacher_weight [V, Ht], biases [V] or None, labels [...] or None. Rows go through in
    chunks of ``chunk_size`` (default: about 2**26 / V rows): each chunk's logits, the loss kernel
    on them, and at once the chunk's share of the gradients for student_hidden, student_weight
    and student_bias (whichever require grad; the weight and bias gradients accumulate in
    float32). Only the gradients are kept for backward, which scales them by grad_output. The
    teacher gets no gradient. reduction "mean" or "sum" (per-row losses would need the per-row
    grad_output before the weight gradient could be summed). Labels are range-checked on the
    device. Runs as ``torch.ops.fastpeft.fused_linear_distillation_loss``; no host sync.
    """
    _check_linear("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    _check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same rows (leading shape)")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"vocab mismatch: student_weight {tuple(student_weight.shape)} has {student_weight.shape[0]} "
                         f"rows, teacher_weight {tuple(teacher_weight.shape)} has {teacher_weight.shape[0]}")
    if student_weight.shape[0] == 0:
        raise ValueError(f"the vocab is empty (student_weight {tuple(student_weight.shape)})")
    _checks.same_dtype(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    _checks.same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    temperature, alpha = check_options(temperature, alpha, ignore_index, divergence, reduction, FUSED_REDUCTIONS)
    if labels is None and alpha == 0.0:
        raise ValueError("alpha == 0 weights only the cross-entropy term, which needs labels")
    V = student_weight.shape[0]
    _check_labels(labels, student_hidden.shape[:-1], V, ignore_index, student_hidden.device, "student_hidden")
    N = math.prod(student_hidden.shape[:-1])
    if chunk_size is None:
        chunk_size = default_chunk_size(N, V)
    else:
        _checks.positive_int("chunk_size", chunk_size)
    if backend is not None:
        _backend.check_name(backend)
    args = (student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(), labels, student_bias,
            None if teacher_bias is None else teacher_bias.detach(), temperature, alpha, int(ignore_index),
            divergence, reduction, chunk_size, backend)
    if eager(student_hidden.device.type, *args[:7]):  # no dispatcher round trips
        if needs_grad(student_hidden, student_weight, student_bias):
            return FusedLinearDistillationFunction.apply(*args, True)
        return _fused_kernel(*args[:13], False, False, False, backend)[0]
    return fused_linear_distillation_loss_op(*args)
