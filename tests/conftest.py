"""Test setup: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it happens here,
at collection, before any test module imports fastpeft's kernels.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture
def poison_outputs(monkeypatch):
    """Kernel output buffers start as NaN, so an element a kernel fails to write fails the test."""
    from fastpeft.kernels import lora as klora

    def nan_output(shape, like, dtype):
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)

    monkeypatch.setattr(klora, "_new_output", nan_output)
    return nan_output
