"""Shared test helpers: relative error against float64 references, per-dtype tolerances, and the
import set-up of tests run from the checkout."""
import sys
from pathlib import Path

import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere in ``out`` gives inf (never passes).

    Computed on ``out``'s device, a chunk of elements at a time (the benchmarks check outputs of
    a billion elements: no float64 copy of the whole tensor, no trip to the host)."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    out, ref = out.detach(), ref.detach().to(out.device)
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    diff = norm = torch.zeros((), dtype=torch.float64, device=out.device)
    for o, r in zip(out.reshape(-1).split(REL_ERR_CHUNK), ref.reshape(-1).split(REL_ERR_CHUNK)):
        r = r.double()
        diff = diff + (o.double() - r).square().sum()
        norm = norm + r.square().sum()
    diff, norm = diff.sqrt().item(), norm.sqrt().item()
    return diff if norm == 0 else diff / norm


REL_ERR_CHUNK = 2**24  # elements per float64 chunk of rel_err (128 MiB)


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0):
    err = rel_err(out, ref)
    tol = TOL[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"


CHECKOUT = Path(__file__).resolve().parent.parent


def import_installed_package() -> None:
    """Have ``import fastpeft`` (and Hugging Face's ``kernels``) load from the environment, not
    from the checkout's root, which ``python -m pytest`` puts first on sys.path: there the root's
    kernels/ (the source of ``fastpeft.kernels``, mapped into the package at install) would stand
    for Hugging Face's ``kernels`` package, which transformers imports. Tests test the installed
    package (``make install`` installs the checkout in editable mode, so edits need no reinstall).
    """
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != CHECKOUT]
    try:
        import fastpeft  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"fastpeft is not installed in {sys.prefix}: run `make test` (it installs it into "
                          f".venv), or `make install` and then .venv/bin/python -m pytest ...") from exc
