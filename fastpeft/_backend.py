"""Backend choice, written once for every op.

Backends:
  ``triton``  Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
  ``cuda``    the CUDA C++ extension ``fastpeft._C``: CUDA tensors.
  ``torch``   plain PyTorch with the reference semantics: any device.

``auto`` (the default) takes, for CUDA tensors, the first backend of the op's
preference list that can run (the list is ordered by what the benchmarks in
benchmarks/results measured fastest); for CPU tensors ``triton`` under the
interpreter, else ``torch``. ``FASTPEFT_BACKEND=triton|cuda|torch`` or the
``fastpeft.use_backend(...)`` context manager forces one; a forced backend that
cannot run raises ``BackendUnavailableError`` saying why.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from typing import Iterator, Sequence

import torch

BACKENDS = ("triton", "cuda", "torch")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastpeft_backend", default=None)


class BackendUnavailableError(ValueError):
    """A forced backend cannot run on these inputs, on this machine."""


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_status(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return False, f"{module} cannot be imported ({type(exc).__name__}: {exc})"
    return True, ""


def triton_status() -> tuple[bool, str]:
    return _import_status("triton")


def cuda_ext_status() -> tuple[bool, str]:
    ok, why = _import_status("fastpeft._C")
    if not ok:
        why += ("; it is built by `pip install -e .` when nvcc is found "
                "(FASTPEFT_BUILD_CUDA=1 forces the build)")
    return ok, why


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    return name


def forced_backend(explicit: str | None = None) -> str | None:
    """The backend forced by an argument, ``use_backend`` or FASTPEFT_BACKEND (None for auto)."""
    for name, source in ((explicit, "backend argument"), (_forced.get(), "fastpeft.use_backend"),
                         (os.environ.get("FASTPEFT_BACKEND"), "FASTPEFT_BACKEND")):
        if name:
            name = _check_name(name, source)
            return None if name == "auto" else name
    return None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend ('triton', 'cuda', 'torch' or 'auto') inside a ``with`` block."""
    token = _forced.set(_check_name(name, "fastpeft.use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def why_cannot_run(backend: str, device: torch.device, supported: Sequence[str]) -> str | None:
    """None when ``backend`` can run an op (supporting ``supported``) on ``device``, else why not."""
    if backend not in supported:
        return f"this op has no {backend} implementation (it has: {', '.join(supported)})"
    if backend == "torch":
        return None
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
            return None
        return (f"Triton kernels need CUDA tensors (got {device.type}); on the CPU they run "
                f"only under the interpreter, with TRITON_INTERPRET=1 set before triton is imported")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA C++ kernels need CUDA tensors (got {device.type})"
        ok, why = cuda_ext_status()
        return None if ok else why
    return f"unknown backend {backend!r}"


def select(op: str, device: torch.device, preferred_cuda: Sequence[str],
           supported: Sequence[str], explicit: str | None = None) -> str:
    """Pick the backend for ``op`` on ``device``; raise if a forced one cannot run."""
    forced = forced_backend(explicit)
    if forced is not None:
        why = why_cannot_run(forced, device, supported)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {forced!r} was forced but cannot run: {why}")
        return forced
    order = preferred_cuda if device.type == "cuda" else ("triton", "torch") if interpreter_active() else ("torch",)
    for name in order:
        if why_cannot_run(name, device, supported) is None:
            return name
    return "torch"
