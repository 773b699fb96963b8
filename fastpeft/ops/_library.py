"""fastpeft's ops as PyTorch operators (torch.library), registered the same way for every op.

Each op is a ``fastpeft::<name>`` operator with
  * a schema (``define``);
  * one Python kernel registered for CPU and for CUDA tensors: it picks fastpeft's backend
    (triton | cuda | torch, fastpeft._backend.choose) when it runs, so the choice never enters
    a traced graph;
  * a fake implementation (shapes, dtypes, devices only) for FakeTensor tracing:
    torch.compile, torch.export, make_fx, opcheck;
  * for the differentiable ops, autograd registered with the op (``register_autograd``): an
    ``autograd.Function`` whose forward and backward call other ``fastpeft::`` ops, so
    AOTAutograd traces them into the forward and backward graphs;
  * an autocast rule: the linear-like ops cast their inputs as ``F.linear`` does; the others
    run in their inputs' dtypes, and inside every kernel autocast is off (a kernel's own
    matmuls must not change dtype under the caller's ``torch.autocast``).

This is what bitsandbytes (``_ops.py`` + ``backends/``), torchao and flash-attention do with
``torch.library.custom_op``; the lower-level ``Library`` API is used here because its eager
path is about half the per-call overhead of ``custom_op`` + ``register_autograd`` (measured on
the CPU), and a LoRA layer is called hundreds of times a step.

Eager calls on plain tensors (``eager``) skip the dispatcher: the public functions call the same
kernels and autograd Functions in Python (``call``), which saves the dispatcher's round trips
(benchmarks/test_overhead.py). Everything traced (torch.compile, torch.export, make_fx,
FakeTensor, functionalization, vmap) and every autocast region goes through the registered ops.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import _C

NAMESPACE = "fastpeft"
LIB = torch.library.Library(NAMESPACE, "DEF")
ops = torch.ops.fastpeft
DEVICE_KEYS = ("CPU", "CUDA")
_KERNEL: dict = {}  # op -> its Python kernel (the one function registered for CPU and CUDA)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_NUMBERS = (float, int)  # the exact types of a plain Python number argument (bool excluded)


def define(schema: str, kernel: Callable, fake: Callable, autocast: Sequence[int] = ()) -> torch._ops.OpOverload:
    """Define ``fastpeft::<schema>``: ``kernel`` runs it on CPU and CUDA tensors, ``fake`` gives
    its outputs' metadata, and under ``torch.autocast`` the floating tensor arguments at the
    positions ``autocast`` are cast to the autocast dtype (``register_autocast``). Schemas have
    no default values (the dispatcher would drop arguments equal to them before calling the
    Python kernels), so every caller passes every argument."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    for key in DEVICE_KEYS:
        LIB.impl(name, kernel, key)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    op = getattr(ops, name).default
    register_autocast(op, autocast)
    _KERNEL[op] = kernel
    return op


def eager(device_type: str, *tensors) -> bool:
    """True when a call runs eagerly on plain tensors: not traced by torch.compile, no tensor
    subclass (FakeTensor, FunctionalTensor, DTensor, ...) among ``tensors``, no torch-function or
    dispatch mode (FakeTensorMode, make_fx, export), no functorch transform (vmap, grad), no
    autocast on ``device_type``. The kernels can then be called directly (``call``)."""
    if (torch.compiler.is_compiling() or _C._len_torch_dispatch_stack() or _C._is_torch_function_mode_enabled()
            or _C._functorch.peek_interpreter_stack() is not None or torch.is_autocast_enabled(device_type)):
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


def still_eager() -> bool:
    """In a backward whose forward ran eagerly: is the backward eager too (not traced by compiled
    autograd or under a mode)?"""
    return not (torch.compiler.is_compiling() or _C._len_torch_dispatch_stack()
                or _C._is_torch_function_mode_enabled() or _C._functorch.peek_interpreter_stack() is not None)


def call(op: torch._ops.OpOverload, direct: bool, *args):
    """``op(*args)``, or with ``direct`` its kernel called in Python (the same function the
    dispatcher would run, without the trip through it)."""
    return _KERNEL[op](*args) if direct else op(*args)


def needs_grad(*tensors) -> bool:
    return _C.is_grad_enabled() and _C._any_requires_grad(*tensors)


def register_autograd(op: torch._ops.OpOverload, function: type[torch.autograd.Function]) -> None:
    """Autograd of ``op`` is ``function`` (its ``apply`` takes the op's arguments and calls the
    kernels under ``below_autograd()``). Without grad mode or an input that requires grad, the
    op goes straight to its device kernel."""

    def autograd_kernel(*args):
        if _C.is_grad_enabled() and _C._any_requires_grad(*args):
            return function.apply(*args)
        with _C._AutoDispatchBelowAutograd():
            return op(*args)

    LIB.impl(op._schema.name.split("::")[1], autograd_kernel, "Autograd")


def below_autograd():
    """Inside an autograd.Function: call ops past their autograd kernels."""
    return _C._AutoDispatchBelowAutograd()


def _autocast_args(args: tuple, cast: Sequence[int], device_type: str) -> tuple:
    dtype = torch.get_autocast_dtype(device_type)
    out = list(args)
    for i in cast:
        t = out[i]
        # as autocast's own casts: floating tensors of the autocast device, float64 excluded
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
                and t.device.type == device_type and t.dtype != dtype:
            out[i] = t.to(dtype)
    return tuple(out)


def register_autocast(op: torch._ops.OpOverload, cast: Sequence[int]) -> None:
    """Under ``torch.autocast``, the floating tensor arguments at positions ``cast`` are cast to
    the autocast dtype of their device (as ``F.linear``'s inputs are), then ``op`` runs with
    autocast off. torch.library.register_autocast casts to one dtype fixed at registration;
    this follows the dtype of the enclosing ``torch.autocast`` instead, and leaves the other
    arguments (int8 codes, float32 scales) as they are. ``define`` calls it for every op."""
    name = op._schema.name.split("::")[1]
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + _C._dispatch_key_for_device(device_type)
        key = getattr(_C.DispatchKey, key_name)
        keyset = _C.DispatchKeySet(key)

        def py_kernel(*args, _device_type=device_type, _keyset=keyset):
            with _C._ExcludeDispatchKeyGuard(_keyset):
                return op(*_autocast_args(args, cast, _device_type))

        # the Python dispatcher (tracing) takes py_impl; eager calls take the C++ registration
        op.py_impl(key)(py_kernel)
        LIB.impl(name, lambda _keyset_arg, *args, _k=py_kernel: _k(*args), key_name, with_keyset=True)
