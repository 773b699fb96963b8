"""Fuzzing the ops: random shapes (empty, one, primes, more than a tile), dtypes, memory layouts
(column-major, sliced, storage offsets, expanded stride-0) and special values (NaN / inf rows, zero
rows, subnormals, the dtype's max) through the torch path, the Triton kernels (the interpreter on
the CPU) and the float64 references; and malformed arguments, which must raise a ValueError or a
TypeError naming the argument. Few examples in CI; FASTPEFT_FUZZ_EXAMPLES=N for a longer run."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastpeft
from fastpeft.ops.int8 import quantize_weight
from fastpeft.reference import bottleneck as ref_bottleneck
from fastpeft.reference import distill as ref_distill
from fastpeft.reference import fakequant as ref_fakequant
from fastpeft.reference import int8 as ref_int8
from fastpeft.reference import lora as ref_lora
from fastpeft.reference import multi_lora as ref_multi_lora

from _fuzz import DTYPES, LAYOUTS, SPECIALS, fuzz_settings, lay, sizes, tensors
from _utils import TOL, rel_err

BACKENDS = ("torch", "triton")
CLEAN = ("none",)


def clean_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(finite, clean) rows over x's last dim: finite rows hold no NaN, inf or value near the
    dtype's max (those may overflow a float32 partial sum, as in PyTorch's own ops); clean rows are
    finite rows with a normal-sized value (subnormal rows may be flushed to zero by a matmul, as
    oneDNN's and the tensor cores' are, so only their finiteness is checked)."""
    if x.numel() == 0:
        return (torch.ones(x.shape[:-1], dtype=torch.bool),) * 2
    info = torch.finfo(x.dtype)
    finite = (torch.isfinite(x) & (x.abs() < info.max / 2)).all(-1)
    return finite, finite & (x.abs() >= info.tiny).any(-1)


def check_output(name, out, ref64, dtype, rows, factor=4.0):
    """``out`` against the float64 reference: a non-finite reference entry (from a NaN or inf
    input: float64 does not overflow here) is non-finite in ``out``; the finite rows (``rows`` =
    clean_rows(x), or so) whose reference is finite in ``dtype`` stay finite (a NaN or inf stays
    in its row), and the clean ones agree within tolerance."""
    finite, clean = rows
    assert out.shape == ref64.shape and out.dtype == dtype, f"{name}: {out.shape} {out.dtype}"
    assert not bool(torch.isfinite(out[~torch.isfinite(ref64)]).any()), f"{name}: a NaN or inf was lost"
    ref_ok = torch.isfinite(ref64.to(dtype)).all(-1)
    assert bool(torch.isfinite(out[finite & ref_ok]).all()), f"{name}: a non-finite value in a finite row"
    ok = clean & ref_ok
    if ok.any():
        err = rel_err(out[ok].float(), ref64[ok])
        assert err <= TOL[dtype] * factor, f"{name}: relative error {err:.2e} on the clean rows ({dtype})"


def close(out: torch.Tensor, ref: torch.Tensor, tol: float, floor: float) -> bool:
    """||out - ref|| <= tol * max(||ref||, floor): relative, or absolute where ref is ~0."""
    return float((out.double() - ref.double()).norm()) <= tol * max(float(ref.double().norm()), floor)


# ---------------------------------------------------------------------------------------------
# outputs and gradients against the references


@fuzz_settings()
@given(st.data())
def test_lora_linear(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    M, K, N = data.draw(sizes()), data.draw(sizes(1)), data.draw(sizes(1))
    r = data.draw(st.sampled_from([1, 3, 8, 64]))
    x, *_ = data.draw(tensors((M, K), dtype, specials=SPECIALS))
    w, *_ = data.draw(tensors((N, K), dtype, scale=K ** -0.5))
    b, *_ = data.draw(tensors((N,), dtype))
    A, *_ = data.draw(tensors((r, K), dtype, scale=K ** -0.5))
    B, *_ = data.draw(tensors((N, r), dtype, scale=r ** -0.5))
    ref = ref_lora.lora_linear(x.double(), w.double(), b.double(), A.double(), B.double(), 0.5)
    for backend in BACKENDS:
        out = fastpeft.lora_linear(x, w, b, A, B, 0.5, backend=backend)
        check_output(f"lora_linear[{backend}]", out, ref, dtype, clean_rows(x))


@fuzz_settings()
@given(st.data())
def test_lora_linear_gradients(data):
    M, K, N, r = data.draw(sizes(1)), data.draw(sizes(1)), data.draw(sizes(1)), data.draw(st.sampled_from([1, 4, 16]))
    p = data.draw(st.sampled_from([0.0, 0.3]))
    ins = [data.draw(tensors(s, scale=sc))[0] for s, sc in
           [((M, K), 1.0), ((N, K), K ** -0.5), ((N,), 1.0), ((r, K), K ** -0.5), ((N, r), r ** -0.5)]]
    dy = data.draw(tensors((M, N)))[0]
    leaves64 = [t.detach().double().requires_grad_(i != 1) for i, t in enumerate(ins)]
    y64 = ref_lora.lora_linear(*leaves64, 0.5, p, 7)
    want = torch.autograd.grad(y64, [leaves64[i] for i in (0, 2, 3, 4)], dy.double())
    for backend in BACKENDS:
        leaves = [t.detach().requires_grad_(i != 1) for i, t in enumerate(ins)]
        y = fastpeft.lora_linear(*leaves, 0.5, p, training=True, seed=7, backend=backend)
        got = torch.autograd.grad(y, [leaves[i] for i in (0, 2, 3, 4)], dy)
        for name, g, w in zip(("x", "bias", "lora_A", "lora_B"), got, want):
            assert rel_err(g, w) <= TOL[torch.float32] * 8, f"{backend} d{name}"


@fuzz_settings()
@given(st.data())
def test_int8_linear(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    M, K, N = data.draw(sizes()), data.draw(sizes(1)), data.draw(sizes(1))
    threshold = data.draw(st.sampled_from([0.0, 2.5]))
    x, *_ = data.draw(tensors((M, K), dtype, specials=SPECIALS))
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(M + K + N))
    wq, ws = quantize_weight(w)
    ws_l = lay(ws, data.draw(st.sampled_from(LAYOUTS)))  # the scale vector in any layout too
    b, *_ = data.draw(tensors((N,), dtype))
    ref = ref_int8.int8_linear(x, wq, ws_l.contiguous(), b, threshold)
    for backend in BACKENDS:
        out = fastpeft.int8_linear(x, wq, ws_l, b, threshold, backend=backend)
        check_output(f"int8_linear[{backend}]", out, ref.double(), dtype, clean_rows(x), factor=8.0)


@fuzz_settings()
@given(st.data())
def test_int8_vectorwise_quant(data):
    """Codes, row scales and outlier columns: exactly the reference's, on both paths."""
    dtype = data.draw(st.sampled_from(DTYPES))
    M, K = data.draw(sizes()), data.draw(sizes())
    threshold = data.draw(st.sampled_from([0.0, 1.5]))
    x, *_ = data.draw(tensors((M, K), dtype, specials=SPECIALS))
    rq, rs, rcols = ref_int8.int8_vectorwise_quant(x.contiguous(), threshold)
    for backend in BACKENDS:
        q, s, cols = fastpeft.int8_vectorwise_quant(x, threshold, backend=backend)
        assert torch.equal(q, rq), backend
        assert torch.equal(s.nan_to_num(-1.0), rs.nan_to_num(-1.0)), backend
        assert (cols is None) == (rcols is None) and (cols is None or torch.equal(cols.long(), rcols)), backend


@fuzz_settings()
@given(st.data())
def test_quant_linear(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    M, N = data.draw(sizes()), data.draw(sizes(1))
    bits, scheme, group_size = data.draw(st.sampled_from([(8, "absmax", None), (8, "zeropoint", None),
                                                          (4, "absmax", 32), (4, "zeropoint", None)]))
    K = data.draw(sizes(1)) if group_size is None else 32 * data.draw(st.sampled_from([1, 2]))
    activations = data.draw(st.sampled_from([None, "dynamic"]))
    x, *_ = data.draw(tensors((M, K), dtype, specials=SPECIALS))
    b, *_ = data.draw(tensors((N,), dtype))
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N * K))
    qw = fastpeft.quantize(w, bits, scheme, axis=0 if group_size is None else None, group_size=group_size)
    w64 = fastpeft.dequantize(qw, torch.float32).double()
    rows_ok = clean_rows(x)
    outs = {backend: fastpeft.quant_linear(x, qw, b, activations=activations, backend=backend)
            for backend in BACKENDS}
    if activations is None:
        ref = torch.nn.functional.linear(x.double(), w64, b.double())
        for backend, out in outs.items():
            check_output(f"quant_linear[{backend}]", out, ref, dtype, rows_ok)
    # int8 activations: no exact reference here (test_act_quant.py has it); the paths agree
    a, t = outs["triton"], outs["torch"]
    finite, clean = rows_ok
    assert torch.equal(torch.isfinite(a[finite]), torch.isfinite(t[finite]))
    keep = clean & torch.isfinite(t).all(-1)
    if keep.any():
        assert rel_err(a[keep], t[keep]) <= TOL[dtype] * 8


@fuzz_settings()
@given(st.data())
def test_bottleneck_adapter(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    M, d, R = data.draw(sizes()), data.draw(sizes(1)), data.draw(st.sampled_from([1, 5, 16]))
    act = data.draw(st.sampled_from(ref_bottleneck.ACTIVATIONS))
    x, *_ = data.draw(tensors((M, d), dtype, specials=SPECIALS))
    wd, *_ = data.draw(tensors((R, d), dtype, scale=d ** -0.5))
    bd, *_ = data.draw(tensors((R,), dtype))
    wu, *_ = data.draw(tensors((d, R), dtype, scale=R ** -0.5))
    bu, *_ = data.draw(tensors((d,), dtype))
    ref = ref_bottleneck.bottleneck_adapter(x.double(), wd.double(), bd.double(), wu.double(), bu.double(), act, 0.7)
    for backend in BACKENDS:
        out = fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, act, 0.7, backend=backend)
        check_output(f"bottleneck_adapter[{backend}]", out, ref, dtype, clean_rows(x))


@fuzz_settings()
@given(st.data())
def test_bottleneck_adapter_gradients(data):
    M, d, R = data.draw(sizes(1)), data.draw(sizes(1)), data.draw(st.sampled_from([1, 5, 16]))
    act = data.draw(st.sampled_from(ref_bottleneck.ACTIVATIONS))
    ins = [data.draw(tensors(s, scale=sc))[0] for s, sc in
           [((M, d), 1.0), ((R, d), d ** -0.5), ((R,), 1.0), ((d, R), R ** -0.5), ((d,), 1.0)]]
    dy = data.draw(tensors((M, d)))[0]
    l64 = [t.detach().double().requires_grad_() for t in ins]
    want = torch.autograd.grad(ref_bottleneck.bottleneck_adapter(*l64, act, 0.7), l64, dy.double())
    for backend in BACKENDS:
        leaves = [t.detach().requires_grad_() for t in ins]
        got = torch.autograd.grad(fastpeft.bottleneck_adapter(*leaves, act, 0.7, backend=backend), leaves, dy)
        for i, (g, w) in enumerate(zip(got, want)):
            assert rel_err(g, w) <= TOL[torch.float32] * 8, f"{backend} gradient {i}"


@fuzz_settings()
@given(st.data())
def test_fake_quantize(data):
    """Forward and every gradient against the reference; a NaN or inf input is a ValueError on
    both paths."""
    dtype = data.draw(st.sampled_from(DTYPES))
    shape = tuple(data.draw(sizes(1, 37)) for _ in range(data.draw(st.integers(1, 3))))
    bits, scheme = data.draw(st.sampled_from([(8, "zeropoint"), (8, "absmax"), (4, "zeropoint"), (4, "absmax")]))
    axis = data.draw(st.sampled_from([None] + list(range(-len(shape), len(shape)))))
    x, _, special = data.draw(tensors(shape, dtype, specials=SPECIALS))
    n = () if axis is None else (shape[axis],)
    g = torch.Generator().manual_seed(len(shape))
    scale = torch.rand(n, generator=g) * 0.1 + 0.01
    zp = torch.randint(-8, 8, n, generator=g).float() if scheme == "zeropoint" else None
    if not bool(torch.isfinite(x).all()):
        for backend in BACKENDS:
            with pytest.raises(ValueError, match="NaN or inf"):
                fastpeft.fake_quantize(x, scale, zp, bits, scheme, axis, backend=backend)
        return
    ref_axis = None if axis is None else axis % len(shape)
    want = ref_fakequant.fake_quantize(x.contiguous(), scale, zp, bits, scheme, ref_axis)
    dy = torch.randn(shape, generator=g).to(dtype)
    wdx, wds, wdz = ref_fakequant.fake_quantize_grads(x.contiguous(), scale, zp, dy, bits, scheme, ref_axis,
                                                      acc_dtype=torch.float64)
    for backend in BACKENDS:
        xl, sl = x.detach().requires_grad_(), scale.clone().requires_grad_()
        zl = None if zp is None else zp.clone().requires_grad_()
        y = fastpeft.fake_quantize(xl, sl, zl, bits, scheme, axis, backend=backend)
        assert torch.equal(y, want), f"{backend}: forward"
        grads = torch.autograd.grad(y, [t for t in (xl, sl, zl) if t is not None], dy)
        assert torch.equal(grads[0], wdx), f"{backend}: dx"
        assert rel_err(grads[1], wds) <= 1e-4, f"{backend}: dscale"
        if zl is not None:
            assert rel_err(grads[2], wdz) <= 1e-4, f"{backend}: dzero_point"


@fuzz_settings()
@given(st.data())
def test_distillation_loss(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    rows, V = data.draw(sizes()), data.draw(sizes(1))
    divergence = data.draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd"]))
    temperature = data.draw(st.sampled_from([0.5, 1.0, 4.0]))
    with_labels = data.draw(st.booleans())
    z, *_ = data.draw(tensors((rows, V), dtype, specials=("none", "zero_row", "subnormal_row"), scale=3.0))
    u, *_ = data.draw(tensors((rows, V), dtype, scale=3.0))
    labels = None
    if with_labels:
        labels = torch.randint(-1, V, (rows,), generator=torch.Generator().manual_seed(rows + V))
        labels[labels < 0] = -100
    want = ref_distill.distillation_loss(z.double(), u.double(), labels, temperature, 0.5, -100, divergence, "sum")
    zl64 = z.detach().double().requires_grad_()
    want_g = torch.autograd.grad(ref_distill.distillation_loss(zl64, u.double(), labels, temperature, 0.5, -100,
                                                               divergence, "sum"), zl64)[0]
    for backend in BACKENDS:
        zl = z.detach().requires_grad_()
        loss = fastpeft.distillation_loss(zl, u, labels, temperature, 0.5, -100, divergence, "sum", backend=backend)
        (gz,) = torch.autograd.grad(loss, zl)
        tol = TOL[dtype] * 16
        assert close(loss, want, tol, 1.0), f"{backend}: loss"
        assert close(gz, want_g, tol, 1.0), f"{backend}: gradient"


@fuzz_settings()
@given(st.data())
def test_multi_lora(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    T, K, N = data.draw(sizes()), data.draw(sizes(1)), data.draw(sizes(1))
    n, r_max = data.draw(st.integers(1, 4)), data.draw(st.sampled_from([1, 4, 16]))
    g = torch.Generator().manual_seed(T * 7 + K)
    x, *_ = data.draw(tensors((T, K), dtype, specials=SPECIALS))
    A = (torch.randn(n, r_max, K, generator=g) * K ** -0.5).to(dtype)
    B = (torch.randn(n, N, r_max, generator=g) * r_max ** -0.5).to(dtype)
    ranks = torch.randint(1, r_max + 1, (n,), generator=g)
    scalings = torch.rand(n, generator=g) + 0.5
    indices = torch.randint(-1, n, (T,), generator=g)
    ref = ref_multi_lora.multi_lora(x.double(), A.double(), B.double(), ranks, scalings.double(), indices)
    rows_ok = tuple(r | (indices < 0) for r in clean_rows(x))
    for backend in BACKENDS:
        out = fastpeft.multi_lora(x, A, B, ranks, scalings, indices, backend=backend)
        check_output(f"multi_lora[{backend}]", out, ref, dtype, rows_ok)


# ---------------------------------------------------------------------------------------------
# malformed arguments: a ValueError or TypeError naming the argument, on every path


def _lora_args():
    return dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_A=torch.randn(2, 8),
                lora_B=torch.randn(6, 2))


def _int8_args():
    wq, ws = quantize_weight(torch.randn(6, 8))
    return dict(x=torch.randn(4, 8), weight_int8=wq, weight_scale=ws, bias=torch.randn(6))


def _bottleneck_args():
    return dict(x=torch.randn(4, 8), down_weight=torch.randn(2, 8), down_bias=torch.randn(2),
                up_weight=torch.randn(8, 2), up_bias=torch.randn(8))


def _fakequant_args():
    return dict(x=torch.randn(4, 8), scale=torch.rand(8) + 0.1, zero_point=torch.zeros(8))


def _distill_args():
    return dict(student_logits=torch.randn(4, 8), teacher_logits=torch.randn(4, 8), labels=torch.randint(0, 8, (4,)))


def _multi_lora_args():
    return dict(x=torch.randn(4, 8), lora_A=torch.randn(2, 3, 8), lora_B=torch.randn(2, 6, 3),
                ranks=torch.tensor([3, 2]), scalings=torch.tensor([1.0, 0.5]), indices=torch.tensor([0, 1, -1, 0]))


OPS = {
    "lora_linear": (_lora_args, lambda a, backend: fastpeft.lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"],
                                                                        a["lora_B"], 0.5, backend=backend)),
    "int8_linear": (_int8_args, lambda a, backend: fastpeft.int8_linear(**a, backend=backend)),
    "bottleneck_adapter": (_bottleneck_args, lambda a, backend: fastpeft.bottleneck_adapter(**a, backend=backend)),
    "fake_quantize": (_fakequant_args, lambda a, backend: fastpeft.fake_quantize(
        a["x"], a["scale"], a["zero_point"], 8, "zeropoint", axis=1, backend=backend)),
    "distillation_loss": (_distill_args, lambda a, backend: fastpeft.distillation_loss(**a, backend=backend)),
    "multi_lora": (_multi_lora_args, lambda a, backend: fastpeft.multi_lora(**a, backend=backend)),
}
MUTATIONS = ["int32", "complex", "bool", "extra_dim", "shape", "not_a_tensor", "float64_index"]


def mutate(t: torch.Tensor, how: str):
    if how == "int32":
        return t.to(torch.int32) if t.is_floating_point() else t.float()
    if how == "complex":
        return t.to(torch.complex64)
    if how == "bool":
        return t != 0
    if how == "extra_dim":
        return t.unsqueeze(-1)
    if how == "shape":
        return torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)
    if how == "not_a_tensor":
        return t.tolist()
    if how == "float64_index":
        return t.double() if not t.is_floating_point() else t.to(torch.int64)
    raise ValueError(how)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("how", MUTATIONS)
def test_malformed_arguments_are_named(op, how):
    """Each tensor argument in turn made malformed: either the op still computes what the
    reference computes (a mutation that is a valid input, such as an extra leading dim of x)
    or it raises a ValueError/TypeError whose message names that argument."""
    make, call = OPS[op]
    for name in make():
        args = make()
        args[name] = mutate(args[name], how)
        for backend in BACKENDS:
            try:
                call(args, backend)
            except (ValueError, TypeError) as exc:
                assert name in str(exc), f"{op}({name} {how}) [{backend}]: {exc!r} does not name {name}"
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"{op}({name} {how}) [{backend}]: {type(exc).__name__}: {exc}") from exc
            else:
                assert (name, how) in VALID_MUTATIONS.get(op, ()), f"{op}({name} {how}) [{backend}] was accepted"


# mutations that are valid inputs (the op's documented contract accepts them)
VALID_MUTATIONS = {
    "distillation_loss": {("labels", "int32")},
    "fake_quantize": {("zero_point", "int32"), ("zero_point", "float64_index"),  # integer zero points
                      ("x", "extra_dim")},  # [4, 8, 1]: axis 1 still has the 8 channels
}
