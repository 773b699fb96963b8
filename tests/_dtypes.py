"""Dtype parametrizations: float32, float16 and bfloat16 in every kernel test, on the GPU and on the
CPU (bf16 kernels run right in triton's interpreter with the harness patches in conftest.py).

The interpreter is slow, so where adding bf16 to a test's full product of cases would cost much CI
time, bf16 runs on the CPU on a subset chosen to reach every code path at least once (each shape,
rank, flag, gradient); the GPU runs the full product (or the subset too, where a GPU-only test
covers bf16 already).
"""
import torch

from _utils import DEVICE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_cases(cases, bf16_cases, dtypes=DTYPES, gpu_full=True):
    """[(dtype, *case)] for ``@pytest.mark.parametrize("dtype,...", ...)``: every case of ``cases``
    in each dtype, except bf16 on the CPU: only the cases of ``bf16_cases`` (each one of ``cases``).
    ``gpu_full=False``: the GPU too runs bf16 on ``bf16_cases`` only (where a GPU-only test of the
    module covers bf16 more widely). A case is the tuple of the other parameters' values; a value
    that is not a tuple stands alone."""
    as_tuple = lambda c: c if isinstance(c, tuple) else (c,)
    cases, bf16_cases = [as_tuple(c) for c in cases], [as_tuple(c) for c in bf16_cases]
    missing = [c for c in bf16_cases if c not in cases]
    if missing:
        raise ValueError(f"bf16 cases {missing} are not among the cases")
    subset = DEVICE == "cpu" or not gpu_full
    return [(d, *c) for d in dtypes for c in (bf16_cases if d == torch.bfloat16 and subset else cases)]


def case_id(value):
    """Test ids of dtype_cases' values: torch.bfloat16, 33x70x50, 4, ..."""
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    return str(value)
