"""Test setup: Triton runs under its CPU interpreter when there is no GPU, and the tests import
the installed fastpeft, never the checkout's root (see _utils.import_installed_package).

TRITON_INTERPRET must be set before triton is first imported, so it happens here,
at collection, before any test module imports fastpeft's kernels.
"""
import os

import pytest
import torch

from _utils import import_installed_package

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
import_installed_package()  # after TRITON_INTERPRET: it imports fastpeft, and so triton


def _exact_bf16_conversions() -> None:
    """Harness patch: triton 3.6's interpreter converts bf16 subnormals to float32 wrongly (its
    generic ``_convert_float`` renormalizes them into float32's exponent, underflows, and
    4.4999e-39 loads as 6.2448e-39; a GPU's conversion is a 16-bit shift, exact), so every kernel
    reading bf16 subnormals computed wrong values on the CPU only. bf16 -> float32 becomes that
    shift here, and float32 -> bf16 (round to nearest even) torch's own cast."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    generic = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.bfloat16 and dst == tl.float32:
            return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        if src == tl.float32 and dst == tl.bfloat16 and rounding_mode in (None, interpreter._ir.ROUNDING_MODE.RTNE):
            return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16) \
                .view(torch.int16).numpy().view(np.uint16)
        return generic(data, src, dst, rounding_mode)

    interpreter._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _exact_bf16_conversions()


def pytest_addoption(parser):
    parser.addoption("--shard", default=None,
                     help="I/N: run only every N-th test starting at I (parallel runs in make gpu-check)")


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        if not 0 <= i < n:
            raise pytest.UsageError(f"--shard {shard}: expected I/N with 0 <= I < N")
        keep = [it for k, it in enumerate(items) if k % n == i]
        config.hook.pytest_deselected(items=[it for k, it in enumerate(items) if k % n != i])
        items[:] = keep
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs in `make gpu-check`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A value no kernel writes, by dtype: NaN for floats; -128 is no int8 code; any uint8 byte is a
# code (0xA5: unlikely); other integers their most negative value (no index, count, flag or key).
POISON = {torch.int8: -128, torch.uint8: 0xA5}


def poison_value(dtype: torch.dtype):
    if dtype in POISON:
        return POISON[dtype]
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every buffer a Triton kernel must fully write (fastpeft.kernels._common.new_output) starts
    poisoned, so an element a kernel fails to write fails the test."""
    from fastpeft.kernels import _common

    def poisoned(shape, like, dtype):
        return torch.full(shape, poison_value(dtype), device=like.device, dtype=dtype)

    monkeypatch.setattr(_common, "new_output", poisoned)
    return poisoned
