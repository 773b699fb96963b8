"""Knowledge distillation of causal language models: ``distill``, a small training loop around
fastpeft.distillation_loss (or the fused-linear variant).

The student can be a smaller model, the teacher itself with LoRA (self-distillation:
``fastpeft.inject_lora(copy.deepcopy(teacher), ...)``), or a quantized copy with LoRA on top
(``fastpeft.quantize_int8`` / ``fastpeft.quantize_model``, then ``inject_lora``), as long as
some of its parameters require grad. Teacher and student must share the vocabulary.

Positions and labels follow Hugging Face's causal-LM convention: the logits at position t
predict token t + 1, so the labels are shifted left by one (the last position gets
ignore_index). A batch's "labels" are used when given (ignore_index marks positions to skip),
else the input_ids with the padding (attention_mask == 0) set to ignore_index. Positions whose
shifted label is ignore_index count in neither the KD nor the CE term (fastpeft.distillation_loss).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .ops import distill as ops


def _inputs(batch, device: torch.device) -> dict:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError("each batch must be a tensor of input_ids or a dict with 'input_ids' "
                        f"(and optionally 'attention_mask', 'labels'); got {type(batch).__name__}")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def shifted_labels(inputs: dict, ignore_index: int = -100) -> torch.Tensor:
    """Next-token labels [B, L]: labels (or input_ids with padding -> ignore_index) shifted left
    by one, the last position ignore_index."""
    labels = inputs.get("labels")
    if labels is None:
        labels = inputs["input_ids"].clone()
        mask = inputs.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, ignore_index)
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def _logits(out) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _hidden_and_head(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, nn.Linear]:
    """The last hidden state (from ``model.base_model``) and the LM head (an nn.Linear): the
    logits are head(hidden), for models whose logits are exactly that."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or base is None or base is model:
        raise TypeError(f"fused_linear=True needs a Hugging Face model with an nn.Linear output layer and a "
                        f"base_model (got head {type(head).__name__})")
    out = base(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batches(batches: Iterable, steps: int | None):
    """Yield batches: one pass when steps is None, else ``steps`` of them, re-iterating
    ``batches`` when it runs out (an exhausted iterator ends the loop early)."""
    done = 0
    while True:
        it = iter(batches)
        reiterable = it is not batches
        got = False
        for b in it:
            got = True
            yield b
            done += 1
            if steps is not None and done >= steps:
                return
        if steps is None or not got or not reiterable:
            return


class _Progress:
    """tqdm when installed, else one line rewritten in place."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total, self.bar = enabled, total, None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="distill")
            except ImportError:
                self.bar = None

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        else:
            total = f"/{self.total}" if self.total else ""
            print(f"\rdistill step {step}{total}  loss {loss:.4f}", end="", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(flush=True)


def distillation_step_loss(student: nn.Module, teacher: nn.Module, inputs: dict, temperature: float = 2.0,
                           alpha: float = 0.5, divergence: str = "forward_kl", ignore_index: int = -100,
                           fused_linear: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """The loss of one batch (inputs on the student's device): the teacher's logits without
    gradient, the student's with, next-token labels (``shifted_labels``), the fused loss."""
    labels = shifted_labels(inputs, ignore_index)
    model_in = {k: v for k, v in inputs.items() if k != "labels"}
    t_dev = _model_device(teacher)
    t_in = {k: (v.to(t_dev) if isinstance(v, torch.Tensor) else v) for k, v in model_in.items()}
    if fused_linear:
        with torch.no_grad():
            t_hidden, t_head = _hidden_and_head(teacher, t_in)
        s_hidden, s_head = _hidden_and_head(student, model_in)
        dev, dt = s_hidden.device, s_hidden.dtype
        return ops.fused_linear_distillation_loss(
            s_hidden, s_head.weight, t_hidden.to(dev, dt), t_head.weight.to(dev, dt), labels, s_head.bias,
            None if t_head.bias is None else t_head.bias.to(dev, dt), temperature, alpha, ignore_index,
            divergence, "mean", chunk_size)
    with torch.no_grad():
        t_logits = _logits(teacher(**t_in))
    s_logits = _logits(student(**model_in))
    return ops.distillation_loss(s_logits, t_logits.to(s_logits.device, s_logits.dtype), labels, temperature,
                                 alpha, ignore_index, divergence, "mean")


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer | None = None,
            steps: int | None = None, temperature: float = 2.0, alpha: float = 0.5, divergence: str = "forward_kl",
            lr: float = 1e-4, max_grad_norm: float | None = None, ignore_index: int = -100,
            fused_linear: bool = False, chunk_size: int | None = None, progress: bool = True) -> list[float]:
    """Train ``student`` to match ``teacher`` (Hinton et al. 2015); returns the loss of every step.

    Per step: teacher (eval mode, no gradient) and student (train mode) run on the batch, the
    loss alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE(student, next token) (see
    fastpeft.distillation_loss; ``divergence`` "forward_kl" | "reverse_kl" | "jsd") is averaged
    over the positions with a label, and ``optimizer`` (default AdamW(lr) over the student's
    parameters that require grad) takes a step, after clipping the gradient norm to
    ``max_grad_norm`` when given.

    batches: an iterable of dicts with "input_ids" [B, L] and optionally "attention_mask",
    "labels" (other keys go to the models as they are), or of input_ids tensors. steps: how many
    steps (cycling over ``batches`` again when it is re-iterable); None: one pass (so an endless
    iterator needs ``steps``).
    fused_linear: compute the loss from the last hidden states and the LM heads
    (fastpeft.fused_linear_distillation_loss, chunks of ``chunk_size`` rows) instead of from the
    models' logits, for models whose logits are exactly ``lm_head(base_model(...)[0])``.
    progress: a tqdm bar when tqdm is installed, else a status line.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError(f"student and teacher must be nn.Modules, got {type(student).__name__} and "
                        f"{type(teacher).__name__}")
    if student is teacher:
        raise ValueError("student and teacher are the same module; distil into a copy "
                         "(e.g. fastpeft.inject_lora(copy.deepcopy(teacher), ...))")
    ops.check_options(temperature, alpha, ignore_index, divergence, "mean")
    if steps is not None:
        from . import _checks
        _checks.positive_int("steps", steps)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no parameter that requires grad: nothing to train "
                         "(e.g. fastpeft.inject_lora(student, 'all-linear') first)")
    teacher_params = {id(p) for p in teacher.parameters()}
    if any(id(p) in teacher_params for p in params):
        raise ValueError("the student trains parameters it shares with the teacher; distil into a copy")
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr)
    device = _model_device(student)
    teacher_was_training, student_was_training = teacher.training, student.training
    teacher.eval()
    student.train()
    history: list[float] = []
    bar = _Progress(progress, steps)
    try:
        for batch in _batches(batches, steps):
            inputs = _inputs(batch, device)
            loss = distillation_step_loss(student, teacher, inputs, temperature, alpha, divergence, ignore_index,
                                          fused_linear, chunk_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            history.append(float(loss.detach()))
            bar.update(len(history), history[-1])
    finally:
        bar.close()
        teacher.train(teacher_was_training)
        student.train(student_was_training)
    return history
