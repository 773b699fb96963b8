"""Which implementation runs an op: the part of dispatch torch.library does not do.

torch.library sends each ``fastpeft::`` op to its CPU or CUDA kernel (fastpeft/ops/_library.py).
Inside that kernel, at run time, ``choose`` picks one of fastpeft's implementations:

  ``triton``  Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
  ``cuda``    the CUDA C++ extension ``fastpeft._C``: CUDA tensors.
  ``torch``   plain PyTorch with the reference semantics: any device.

``auto`` (the default) takes, for CUDA tensors, the first of the op's backends (its module's
``KERNELS``: Triton first, where it covers every case, then CUDA C++, then plain PyTorch; an
order by design, not yet by measurement: the benchmarks' ``fastest`` column, from a GPU run,
is what should set it) that can run; for CPU tensors
``triton`` under the interpreter, else ``torch``. An op's ``backend=`` argument,
``fastpeft.use_backend(...)`` or ``FASTPEFT_BACKEND=triton|cuda|torch`` force one (in that
order of precedence); a forced backend that cannot run raises ``BackendUnavailableError``
saying why.

Because the choice is made inside the op's kernel, when the kernel runs, it never enters a
traced graph: ``torch.compile`` and ``torch.export`` see one ``fastpeft::`` node whatever
backend will run it, and a ``use_backend`` block applies to the kernels that run inside it
(backward included only if ``.backward()`` is called inside it too).
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


def _env_reader(name: str):
    """A function reading os.environ[name] (or None) at each call: os.environ's own storage with the
    key encoded once, the same data os.environ.get reads (monkeypatch.setenv included), about 15x
    cheaper: ops read these on every call. Plain os.environ.get where CPython's layout differs."""
    env = os.environ
    data, encode, decode = getattr(env, "_data", None), getattr(env, "encodekey", None), getattr(env, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda: env.get(name)
    key = encode(name)

    def read():
        v = data.get(key)
        return None if v is None else decode(v)
    return read


_interpret_env = _env_reader("TRITON_INTERPRET")
_backend_env = _env_reader("FASTPEFT_BACKEND")


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return _interpret_env() == "1"


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


def check_name(name: object, source: str = "backend argument") -> str:
    """A valid backend name ('triton', 'cuda', 'torch' or 'auto'), lower-cased."""
    if not isinstance(name, str):
        raise TypeError(f"{source}: a backend is a str, got {type(name).__name__}")
    name = name.strip().lower()
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    return name


def forced_backend(explicit: str | None = None) -> str | None:
    """The backend forced by an argument, ``use_backend`` or FASTPEFT_BACKEND (None for auto)."""
    for name, source in ((explicit, "backend argument"), (_forced.get(), "fastpeft.use_backend"),
                         (_backend_env(), "FASTPEFT_BACKEND")):
        if name:
            name = check_name(name, source)
            return None if name == "auto" else name
    return None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend ('triton', 'cuda', 'torch' or 'auto') for the op kernels that run inside
    this ``with`` block (call ``.backward()`` inside it too for the backward kernels)."""
    token = _forced.set(check_name(name, "fastpeft.use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def why_cannot_run(backend: str, device: torch.device, kernels: Sequence[str]) -> str | None:
    """None when ``backend`` can run an op that has ``kernels`` on ``device``, else why not."""
    if backend not in kernels:
        return f"this op has no {backend} implementation (it has: {', '.join(kernels)})"
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


def torch_chosen(device: torch.device, explicit: str | None = None) -> bool:
    """Whether ``choose`` gives the torch backend on ``device`` for an op that has one, without
    ``choose``'s checks (the ops' per-call fast paths ask this). False where ``choose`` would
    raise or could pick a kernel: the caller then takes its general path, which calls ``choose``."""
    forced = forced_backend(explicit)
    if forced is not None:
        return forced == "torch"
    return device.type != "cuda" and not interpreter_active()


def choose(op: str, device: torch.device, kernels: Sequence[str], explicit: str | None = None) -> str:
    """The backend that runs ``op`` on ``device`` now. ``kernels``: the op's backends, in the
    order preferred on CUDA tensors ("torch" among them). Raises BackendUnavailableError when a
    forced backend cannot run."""
    forced = forced_backend(explicit)
    if forced is not None:
        why = why_cannot_run(forced, device, kernels)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {forced!r} was forced but cannot run: {why}")
        return forced
    if device.type == "cuda":
        order = kernels
    else:
        order = ("triton", "torch") if interpreter_active() else ("torch",)
    for name in order:
        if why_cannot_run(name, device, kernels) is None:
            return name
    return "torch"
