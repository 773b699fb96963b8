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
# Under pytest-xdist (make test runs a worker a core), each worker takes its share of the cores
# for torch's CPU ops instead of all of them, so that workers do not oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
import_installed_package()  # after TRITON_INTERPRET: it imports fastpeft, and so triton


def _bf16_to_f32(bits):
    """bf16 bit patterns (the interpreter stores bf16 as uint16) -> float32, exactly: a 16-bit shift."""
    import numpy as np

    return (np.asarray(bits).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(data):
    """float32 -> bf16 bit patterns, rounded to nearest even (torch's cast, as a GPU's cvt.rn)."""
    import numpy as np

    bits = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
    return bits.numpy().view(np.uint16).reshape(np.shape(data))


def _exact_bf16_conversions() -> None:
    """Harness patch: triton 3.6's interpreter converts bf16 subnormals to float32 wrongly (its
    generic ``_convert_float`` renormalizes them into float32's exponent, underflows, and
    4.4999e-39 loads as 6.2448e-39; a GPU's conversion is a 16-bit shift, exact), so every kernel
    reading bf16 subnormals computed wrong values on the CPU only. bf16 -> float32 becomes that
    shift here, and float32 -> bf16 (round to nearest even) torch's own cast."""
    import triton.language as tl
    from triton.runtime import interpreter

    generic = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.bfloat16 and dst == tl.float32:
            return _bf16_to_f32(data)
        if src == tl.float32 and dst == tl.bfloat16 and rounding_mode in (None, interpreter._ir.ROUNDING_MODE.RTNE):
            return _f32_to_bf16(data)
        return generic(data, src, dst, rounding_mode)

    convert.__wrapped__ = generic  # tests/test_interpreter_patch.py runs without the patch too
    interpreter._convert_float = convert


def _bf16_dot() -> None:
    """Harness patch: triton 3.6's interpreter multiplies bf16 ``tl.dot`` operands as their raw
    uint16 bit patterns (it stores bf16 as uint16 and ``InterpreterBuilder.create_dot`` hands them
    to ``np.matmul`` unconverted; triton issue 11584), so every bf16 matmul kernel gave garbage on
    the CPU. A bf16 dot always accumulates in float32 (triton rejects out_dtype=bfloat16), so
    widening the operands to float32 first (exact) gives what a GPU's bf16 MMA computes: exact
    products summed in float32. tests/test_interpreter_patch.py checks that the patch is needed
    (through the original, kept as ``create_dot.__wrapped__``) and that it works."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    generic = builder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle(_bf16_to_f32(h.data), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return generic(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot.__wrapped__ = generic
    builder.create_dot = create_dot


def _bf16_arithmetic() -> None:
    """Harness patch: the rest of triton 3.6's interpreter computes on bf16's uint16 bit patterns
    too, silently: bf16 + - * between tensors, tl.fma, comparisons of two bf16 tensors, tl.sum of
    bf16 (all numpy on the raw bits), casts between bf16 and integers or float64 (``astype`` of the
    bits, int8 -> bf16 included); and it has no ``get_bf16``, so ``bf16_tensor * 2.5`` raises. The
    kernels avoided all of this on the CPU only (fp32 detours), so the GPU's bf16 code went
    untested. Here each such op widens its bf16 operands to float32 (exact) and rounds a bf16 result
    back once, to nearest even, as a GPU's bf16 add and multiply do. (A bf16 tl.sum here rounds
    once, where a GPU rounds every partial sum to bf16: widen before summing.) Atomics on bf16
    still raise (the interpreter has none)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
    is_bf16 = lambda h: isinstance(h, handle) and h.dtype.scalar == tl.bfloat16
    widen = lambda h: handle(_bf16_to_f32(h.data), tl.float32) if is_bf16(h) else h

    def in_fp32(method):
        def run(self, *args):
            if not any(is_bf16(a) for a in args):
                return method(self, *args)
            out = method(self, *(widen(a) for a in args))
            # a float32 result stands for a bf16 one (results of comparisons are bool)
            return handle(_f32_to_bf16(out.data), tl.bfloat16) if out.data.dtype == np.float32 else out
        run.__wrapped__ = method
        return run

    for name in ("binary_op", "ternary_op", "unary_op", "create_fma"):
        setattr(builder, name, in_fp32(getattr(builder, name)))

    cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == dst_ty or tl.float32 in (src_ty, dst_ty) or tl.bfloat16 not in (src_ty, dst_ty):
            return cast(self, src, dst_type)  # float32 <-> bf16: _convert_float, exact
        if src_ty == tl.bfloat16:
            return cast(self, widen(src), dst_type)
        return handle(_f32_to_bf16(cast(self, src, tl.float32).data), tl.bfloat16)

    cast_impl.__wrapped__ = cast
    builder.cast_impl = cast_impl
    builder.get_bf16 = lambda self, value: handle(_f32_to_bf16(np.array([value], dtype=np.float32)), tl.bfloat16)

    def retyped(t, dtype, data):
        return tl.core.tensor(handle(data, dtype), t.type.with_element_ty(dtype))

    reduce = interpreter.ReduceOps.apply_impl  # tl.sum's (tl.max, tl.argmax, tl.cumsum widen bf16 themselves)

    def apply_impl(self, input):
        bf16 = [t.dtype == tl.bfloat16 for t in input]
        if not any(bf16):
            return reduce(self, input)
        out = reduce(self, tuple(retyped(t, tl.float32, _bf16_to_f32(t.handle.data)) if b else t
                                 for t, b in zip(input, bf16)))
        single = not isinstance(out, (list, tuple))
        out = [out] if single else list(out)
        for i, (t, b) in enumerate(zip(out, bf16)):  # (a reduction with indices adds int32 outputs)
            if b and t.dtype == tl.float32:
                out[i] = retyped(t, tl.bfloat16, _f32_to_bf16(t.handle.data))
        return out[0] if single else out

    apply_impl.__wrapped__ = reduce
    interpreter.ReduceOps.apply_impl = apply_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _exact_bf16_conversions()
    _bf16_dot()
    _bf16_arithmetic()


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
