"""Tensor helpers the op modules share."""
from __future__ import annotations

import contextlib
import math

import torch


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., K] as [M, K] (M the product of the leading dims, 0 included) with unit stride along K:
    a view where one exists, else a copy. The kernels take such 2-D operands."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def on_device(t: torch.Tensor):
    """Kernels launch on the current CUDA device: make it ``t``'s device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when contiguous, else a contiguous copy (None stays None). The kernels read
    bias and scale vectors (and per-group scale / zero-point planes) by index, as dense arrays:
    a sliced, strided or expanded (stride 0) one is copied once, here, before
    the launch; they are small next to the operands the kernels read through strides."""
    return t if t is None or t.is_contiguous() else t.contiguous()


# ---------------------------------------------------------------------------------------------
# double backward (torch.autograd.grad(..., create_graph=True) through an op, then backward again)
#
# The autograd engine runs a backward with grad mode on exactly when its graph is being built
# (create_graph=True). The ops' backwards then compute their gradients with the torch backend's
# arithmetic, which autograd records, so second derivatives are those of the torch path on every
# backend; the kernels' backwards (not differentiable) run otherwise. Ops whose backward keeps
# no inputs to differentiate (the distillation losses keep only their gradient) refuse instead.


def building_graph() -> bool:
    """In an autograd.Function's backward: whether the backward itself is being recorded."""
    return torch.is_grad_enabled()


def vjp_with_graph(fn, inputs: tuple, needs: tuple, grad_output: torch.Tensor) -> tuple:
    """The gradients of ``fn(*inputs)`` against ``grad_output`` for the inputs flagged in
    ``needs`` (None for the others), recorded by autograd: a backward that can be differentiated.
    ``fn`` is differentiable torch arithmetic; ``inputs`` are the op's saved inputs."""
    wrt = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(fn(*inputs), wrt, grad_output, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def refuse_double_backward(op: str, why: str) -> None:
    raise RuntimeError(f"fastpeft.{op} does not support double backward (a gradient taken with "
                       f"create_graph=True and differentiated again): {why}")
