"""The test harness's patches of triton's CPU interpreter (tests/conftest.py) are needed and work:
without the ``create_dot`` patch a bf16 ``tl.dot`` multiplies raw uint16 bit patterns (triton issue
11584), without the ``_convert_float`` patch bf16 subnormals widen to the wrong float32, without the
arithmetic patch bf16 + - *, comparisons, sums and integer casts compute on the bits too; with
them, each gives what a GPU gives: exactly what torch's bf16 ops give on these inputs."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="patches triton's CPU interpreter")

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
        rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
        acc = tl.zeros((M, N), dtype=tl.float32)
        acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)

    @triton.jit
    def _widen_kernel(x_ptr, y_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(y_ptr + r, tl.load(x_ptr + r).to(tl.float32))

    @triton.jit
    def _elementwise_kernel(a_ptr, b_ptr, c_ptr, q_ptr, o_ptr, OP: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
        i = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
        a, b, c = tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i)  # bf16
        if OP == "add":
            o = a + b
        elif OP == "sub":
            o = a - b
        elif OP == "mul":
            o = a * b
        elif OP == "neg":
            o = -a
        elif OP == "mul_scalar":
            o = a * 2.5
        elif OP == "fma":
            o = tl.fma(a, b, c)
        elif OP == "where_a_gt_b":
            o = tl.where(a > b, a, c)
        elif OP == "int8_to_bf16":
            o = tl.load(q_ptr + i).to(tl.bfloat16)
        else:  # "bf16_to_int32"
            o = (a * 8.0).to(tl.int32).to(tl.float32)
        tl.store(o_ptr + i, o)

    @triton.jit
    def _row_sum_kernel(a_ptr, o_ptr, M: tl.constexpr, N: tl.constexpr):
        rm = tl.arange(0, M)
        a = tl.load(a_ptr + rm[:, None] * N + tl.arange(0, N)[None, :])  # bf16
        tl.store(o_ptr + rm, tl.sum(a, axis=1))  # (tl.max, tl.argmax, tl.cumsum widen bf16 themselves)


def _dot(a, b):
    c = torch.full((a.shape[0], b.shape[1]), float("nan"))
    _dot_kernel[(1,)](a, b, c, a.shape[0], a.shape[1], b.shape[1])
    return c


def _operands(dtype):
    """16x32 @ 32x16 of small integers and halves: every product and sum is exact in float32, so
    any correct dot gives exactly the float64 product."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-16, 17, (16, 32), generator=g) / 2
    b = torch.randint(-16, 17, (32, 16), generator=g) / 2
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dot_is_exact(dtype):
    a, b = _operands(dtype)
    assert torch.equal(_dot(a, b).double(), a.double() @ b.double())


def test_bf16_dot_without_the_patch_is_wrong(monkeypatch):
    """The patch is still needed: triton's own create_dot gets this dot wrong (once a triton
    release fixes issue 11584, this fails: then drop the patch from conftest.py)."""
    patched = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", patched.__wrapped__)
    a, b = _operands(torch.bfloat16)
    got = _dot(a, b).double()
    want = a.double() @ b.double()
    assert not torch.allclose(got, want, rtol=1e-2, atol=1e-2)


def _subnormals():
    """Every bf16 subnormal (mantissa 1..127) and zero, both signs: 256 values."""
    bits = torch.arange(0, 128, dtype=torch.int16)
    return torch.cat([bits, bits | -0x8000]).view(torch.bfloat16)


def _widen(x):
    y = torch.full(x.shape, float("nan"))
    _widen_kernel[(1,)](x, y, x.numel())
    return y


def test_bf16_subnormals_widen_exactly():
    x = _subnormals()
    assert torch.equal(_widen(x), x.float())


def test_bf16_subnormals_without_the_patch_are_wrong(monkeypatch):
    monkeypatch.setattr(interpreter, "_convert_float", interpreter._convert_float.__wrapped__)
    x = _subnormals()
    assert not torch.equal(_widen(x), x.float())


def _halves(seed, shape=(16, 32)):
    """Small halves: float32 sums and products of them are exact, so float32-then-round (what the
    patch and torch's bf16 ops do) has one right answer."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-16, 17, shape, generator=g) / 2).to(torch.bfloat16)


ELEMENTWISE = {  # op: the reference on bf16 tensors a, b, c and int8 codes q
    "add": lambda a, b, c, q: a + b,
    "sub": lambda a, b, c, q: a - b,
    "mul": lambda a, b, c, q: a * b,
    "neg": lambda a, b, c, q: -a,
    "mul_scalar": lambda a, b, c, q: a * 2.5,
    "fma": lambda a, b, c, q: (a.float() * b.float() + c.float()).bfloat16(),
    "where_a_gt_b": lambda a, b, c, q: torch.where(a > b, a, c),
    "int8_to_bf16": lambda a, b, c, q: q.bfloat16(),
    "bf16_to_int32": lambda a, b, c, q: (a * 8).int().bfloat16(),
}


def _run_elementwise(op):
    a, b, c = _halves(1) * 37, _halves(2) / 3, _halves(3)  # a * b, a + b round in bf16
    q = torch.randint(-128, 128, a.shape, generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    o = torch.full(a.shape, float("nan"), dtype=torch.bfloat16)
    _elementwise_kernel[(1,)](a, b, c, q, o, op, *a.shape)
    return o, ELEMENTWISE[op](a, b, c, q)


def _run_row_sum():
    a = _halves(5) * 3
    o = torch.full(a.shape[:1], float("nan"), dtype=torch.bfloat16)
    _row_sum_kernel[(1,)](a, o, *a.shape)
    return o, a.float().sum(1).bfloat16()


def _unpatched(monkeypatch):
    """Put back triton's own bf16 arithmetic (the _bf16_arithmetic patch's originals)."""
    builder = interpreter.InterpreterBuilder
    for name in ("binary_op", "ternary_op", "unary_op", "create_fma", "cast_impl"):
        monkeypatch.setattr(builder, name, getattr(builder, name).__wrapped__)
    monkeypatch.delattr(builder, "get_bf16")
    monkeypatch.setattr(interpreter.ReduceOps, "apply_impl", interpreter.ReduceOps.apply_impl.__wrapped__)


@pytest.mark.parametrize("op", ELEMENTWISE)
def test_bf16_elementwise_ops_and_casts_are_exact(op):
    got, want = _run_elementwise(op)
    assert torch.equal(got, want)


def test_bf16_sum_is_exact():
    got, want = _run_row_sum()
    assert torch.equal(got, want)


@pytest.mark.parametrize("op", list(ELEMENTWISE) + ["sum"])
def test_bf16_arithmetic_without_the_patch_is_wrong(op, monkeypatch):
    _unpatched(monkeypatch)
    try:
        got, want = _run_row_sum() if op == "sum" else _run_elementwise(op)
    except Exception as exc:  # mul_scalar: the interpreter has no get_bf16
        assert "get_bf16" in str(exc)
        return
    assert not torch.equal(got, want)
