"""fastpeft.fake_quantize and fastpeft.FakeQuantize (QAT, LSQ / LSQ+) against
fastpeft/reference/fakequant.py and fastpeft/reference/quant.py.

The forward must EQUAL quantize_codes -> dequantize_codes with the same scale and rounded zero
point; dx must equal the straight-through mask times dy; ds and dz must match the reference
formulas (summed in float64) to fp32 rounding, for the triton (interpreter on CPU) and torch
backends. The formulas are checked in turn against torch autograd of the .detach() formulation.
"""
import pytest
import torch

import fastpeft
from fastpeft.reference import fakequant as rfq
from fastpeft.reference import quant as rq

from _utils import DEVICE

pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
              pytest.mark.usefixtures("poison_outputs")]
BACKENDS = ["triton", "torch"]
SCHEMES = ["zeropoint", "absmax"]
BITS = [8, 4]
CASES = [  # (shape, axis)
    ((7, 33), None),
    ((130,), None),
    ((1,), None),
    ((9, 21), 0),
    ((9, 21), 1),        # axis = last dim: slots along the fast dim
    ((3, 5, 7), 1),      # middle axis
    ((2, 3, 67), -1),
    ((67, 3), 0),
    ((1, 1), 1),
    ((700,), None),      # interpreter: 3 programs, each looping over 4 blocks (the last partial)
    ((100, 3), 1),       # slots along the fast dim, looping
    ((3, 5, 40), 1),     # middle axis, a loop with a partial block
]


def make_case(shape, axis, bits, scheme, dtype=torch.float32, seed=0, shrink=0.6):
    """x, and a scale / fractional zero point that clip part of x (scale shrunk from min/max)."""
    g = torch.Generator().manual_seed(seed + sum(shape) + 31 * bits)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.4).to(dtype)
    scale, zp = rq.compute_qparams(x, bits, scheme, None if axis is None else axis % x.dim())
    scale = scale * shrink
    zero_point = zp.float() + torch.rand(zp.shape, generator=g) * 0.8 - 0.4 + (3 if scheme == "zeropoint" else 0)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.to(DEVICE), scale.to(DEVICE), zero_point.to(DEVICE), dy.to(DEVICE)


def quant_reference(x, scale, zero_point, bits, scheme, axis):
    """dequantize_codes(quantize_codes(x)) with the rounded, clamped zero point, in x's dtype."""
    ax = None if axis is None else axis % x.dim()
    zint = rfq.zero_point_int(zero_point.cpu(), scale.cpu(), bits, scheme).to(torch.int32)
    q = rq.quantize_codes(x.cpu(), scale.cpu(), zint, bits, scheme, ax, None)
    return rq.dequantize_codes(q, scale.cpu(), zint, ax, None).to(x.dtype)


def run(backend, x, scale, zero_point, dy, bits, scheme, axis):
    x = x.clone().requires_grad_()
    s = scale.clone().requires_grad_()
    z = zero_point.clone().requires_grad_()
    y = fastpeft.fake_quantize(x, s, z, bits, scheme, axis, backend=backend)
    dx, ds, dz = torch.autograd.grad(y, (x, s, z), dy)
    return y.detach(), dx, ds, dz


def assert_sum_close(name, out, ref, terms_abs, tol=2e-6):
    """|out - ref| within tol of the sum of |terms| (the scale of the float32 summation error)."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: not finite"
    bound = tol * terms_abs + 1e-12
    assert ((out - ref).abs() <= bound).all(), f"{name}: {out} vs {ref} (bound {bound})"


def term_sums(x, scale, zero_point, dy, bits, scheme, axis):
    """g * sum |dy * term| per slot, for the ds and dz error bounds."""
    ax = None if axis is None else axis % x.dim()
    _, ds, dz = rfq.fake_quantize_grads(x.cpu(), scale.cpu(), zero_point.cpu(), dy.cpu().abs(), bits, scheme, ax,
                                        acc_dtype=torch.float64)
    s, zz, v, q, inside = rfq._parts(x.cpu(), scale.cpu(), zero_point.cpu(), bits, scheme, ax)
    terms = torch.where(inside, (torch.round(v) - v).abs(), (q - zz).abs()).double() * dy.cpu().abs().double()
    dims = list(range(x.dim())) if ax is None else [d for d in range(x.dim()) if d != ax]
    g = rfq.grad_scale(x.numel(), scale.numel(), bits, scheme)
    return (terms.sum(dim=dims) * g).reshape(scale.shape), dz.abs()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-a{c[1]}")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_forward_and_gradients(backend, case, scheme, bits):
    shape, axis = case
    x, scale, zero_point, dy = make_case(shape, axis, bits, scheme)
    y, dx, ds, dz = run(backend, x, scale, zero_point, dy, bits, scheme, axis)
    assert torch.equal(y.cpu(), quant_reference(x, scale, zero_point, bits, scheme, axis)), "forward"
    ax = None if axis is None else axis % x.dim()
    rdx, rds, rdz = rfq.fake_quantize_grads(x.cpu(), scale.cpu(), zero_point.cpu(), dy.cpu(), bits, scheme, ax,
                                            acc_dtype=torch.float64)
    assert torch.equal(dx.cpu(), rdx), "dx"
    s_abs, z_abs = term_sums(x, scale, zero_point, dy, bits, scheme, axis)
    assert_sum_close("ds", ds, rds, s_abs)
    assert_sum_close("dz", dz, rdz, z_abs)
    if scheme == "absmax":
        assert (dz == 0).all()


@pytest.mark.parametrize("case", [((7, 33), None), ((9, 21), 1), ((3, 5, 7), 1)], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_clip_range_is_exercised(case, scheme, bits):
    """The test inputs hit both branches: some elements inside the clip range, some outside."""
    shape, axis = case
    x, scale, zero_point, dy = make_case(shape, axis, bits, scheme)
    *_, inside = rfq._parts(x.cpu(), scale.cpu(), zero_point.cpu(), bits, scheme, axis)
    assert inside.any() and (~inside).any()


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: f"{'x'.join(map(str, c[0]))}-a{c[1]}")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_formulas_match_detach_autograd(case, scheme, bits):
    """The reference formulas are the autograd derivatives of LSQ's straight-through formulation
    (round_pass and grad_scale written with .detach()), computed independently by torch."""
    shape, axis = case
    x, scale, zero_point, dy = (t.cpu() for t in make_case(shape, axis, bits, scheme))
    xx, s, z = (t.clone().requires_grad_() for t in (x, scale, zero_point))
    y = rfq.lsq_autograd(xx, s, z, bits, scheme, axis)
    assert torch.equal(y.detach(), rfq.fake_quantize(x, scale, zero_point, bits, scheme, axis))
    adx, ads, adz = torch.autograd.grad(y, (xx, s, z), dy, allow_unused=True)
    rdx, rds, rdz = rfq.fake_quantize_grads(x, scale, zero_point, dy, bits, scheme, axis, acc_dtype=torch.float64)
    assert torch.allclose(adx, rdx, rtol=1e-6, atol=0)  # s * (1 / s) is 1 to an ulp
    s_abs, z_abs = term_sums(x, scale, zero_point, dy, bits, scheme, axis)
    assert_sum_close("ds", ads, rds, s_abs, tol=1e-5)
    if scheme == "absmax":
        assert adz is None
    else:
        assert_sum_close("dz", adz, rdz, z_abs, tol=1e-5)


def test_outside_scale_gradient_matches_finite_differences():
    """Where every element is clipped, y = (q - z) s is linear in s: the LSQ ds (before the
    gradient scale) is its true derivative, checked by central differences (s is used in float32,
    so a wide step: the function is linear there)."""
    x = torch.tensor([50.0, -40.0, 70.0, -90.0], dtype=torch.float64)
    scale = torch.tensor(0.1, dtype=torch.float64)
    zp = torch.tensor(128.0, dtype=torch.float64)
    dy = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64)
    h = 1e-2
    f = lambda s: (rfq.fake_quantize(x, s, zp, 4, "zeropoint") * dy).sum()
    fd = (f(scale + h) - f(scale - h)) / (2 * h)
    _, ds, _ = rfq.fake_quantize_grads(x, scale, zp, dy, 4, "zeropoint", None, acc_dtype=torch.float64)
    g = rfq.grad_scale(4, 1, 4, "zeropoint")
    assert abs(ds.item() / g - fd.item()) < 1e-4 * abs(fd.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(backend, dtype):
    shape, axis = (5, 24), 1
    x, scale, zero_point, dy = make_case(shape, axis, 8, "zeropoint", dtype=dtype)
    y, dx, ds, dz = run(backend, x, scale, zero_point, dy, 8, "zeropoint", axis)
    assert y.dtype == dtype and dx.dtype == dtype and ds.dtype == torch.float32
    assert torch.equal(y.cpu(), quant_reference(x, scale, zero_point, 8, "zeropoint", axis))
    rdx, rds, rdz = rfq.fake_quantize_grads(x.cpu(), scale.cpu(), zero_point.cpu(), dy.cpu(), 8, "zeropoint", axis,
                                            acc_dtype=torch.float64)
    assert torch.equal(dx.cpu(), rdx)
    s_abs, z_abs = term_sums(x, scale, zero_point, dy, 8, "zeropoint", axis)
    assert_sum_close("ds", ds, rds, s_abs)
    assert_sum_close("dz", dz, rdz, z_abs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_ties(backend):
    """A transposed input, and values on exact .5 ties (half-to-even, as quantize_codes)."""
    base = (torch.arange(-40, 40, dtype=torch.float32) * 0.25 + 0.125).reshape(8, 10)
    x = base.t().to(DEVICE)  # [10, 8], non-contiguous; x / 0.25 hits odd halves
    scale = torch.full((8,), 0.25, device=DEVICE)
    zp = torch.full((8,), 7.0, device=DEVICE)
    dy = torch.ones_like(x)
    y, dx, ds, dz = run(backend, x, scale, zp, dy, 4, "zeropoint", 1)
    assert torch.equal(y.cpu(), quant_reference(x, scale, zp, 4, "zeropoint", 1))
    rdx, rds, rdz = rfq.fake_quantize_grads(x.cpu(), scale.cpu(), zp.cpu(), dy.cpu(), 4, "zeropoint", 1,
                                            acc_dtype=torch.float64)
    assert torch.equal(dx.cpu(), rdx)
    assert torch.allclose(ds.cpu().double(), rds, rtol=1e-6, atol=1e-9)
    assert torch.allclose(dz.cpu().double(), rdz, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_and_absmax_without_zero_point(backend):
    x, scale, _, dy = make_case((6, 10), None, 4, "absmax")
    xx, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y = fastpeft.fake_quantize(xx, s, None, 4, "absmax", backend=backend)
    dx, ds = torch.autograd.grad(y, (xx, s), dy)
    assert torch.equal(y.cpu(), quant_reference(x, scale, torch.zeros(()), 4, "absmax", None))
    rdx, rds, _ = rfq.fake_quantize_grads(x.cpu(), scale.cpu(), None, dy.cpu(), 4, "absmax", None,
                                          acc_dtype=torch.float64)
    assert torch.equal(dx.cpu(), rdx) and torch.allclose(ds.cpu().double(), rds, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_zero_point_and_empty(backend):
    x, scale, zp, dy = make_case((4, 9), 0, 8, "zeropoint")
    y = fastpeft.fake_quantize(x, scale, zp.round().to(torch.int32), 8, "zeropoint", 0, backend=backend)
    assert torch.equal(y.cpu(), quant_reference(x, scale, zp.round(), 8, "zeropoint", 0))
    e = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    s = torch.ones((), device=DEVICE, requires_grad=True)
    y = fastpeft.fake_quantize(e, s, torch.zeros((), device=DEVICE), backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert e.grad.shape == (0, 5) and s.grad.item() == 0.0


def test_errors():
    x = torch.randn(4, 6, device=DEVICE)
    one = torch.ones((), device=DEVICE)
    zero = torch.zeros((), device=DEVICE)
    with pytest.raises(ValueError, match="bits"):
        fastpeft.fake_quantize(x, one, zero, bits=3)
    with pytest.raises(ValueError, match="bits"):
        fastpeft.fake_quantize(x, one, zero, bits=True)
    with pytest.raises(ValueError, match="scheme"):
        fastpeft.fake_quantize(x, one, zero, scheme="minmax")
    with pytest.raises(ValueError, match="scale must have shape"):
        fastpeft.fake_quantize(x, torch.ones(6, device=DEVICE), zero)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        fastpeft.fake_quantize(x, torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE), axis=0)
    with pytest.raises(ValueError, match="zero_point must have"):
        fastpeft.fake_quantize(x, torch.ones(4, device=DEVICE), torch.zeros(3, device=DEVICE), axis=0)
    with pytest.raises(ValueError, match="axis"):
        fastpeft.fake_quantize(x, one, zero, axis=2)
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            fastpeft.fake_quantize(x, torch.tensor(bad, device=DEVICE), zero)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        fastpeft.fake_quantize(x, torch.tensor([1.0, 1.0, 0.0, 1.0], device=DEVICE), torch.zeros(4, device=DEVICE),
                               axis=0)
    xn = x.clone()
    xn[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fastpeft.fake_quantize(xn, one, zero)
    with pytest.raises(TypeError, match="dtype"):
        fastpeft.fake_quantize(x.to(torch.int32), one, zero)
    with pytest.raises(TypeError, match="zero_point"):
        fastpeft.fake_quantize(x, one, 3)
    with pytest.raises(ValueError, match="backend"):
        fastpeft.fake_quantize(x, one, zero, backend="nope")


# ---------------------------------------------------------------------------------------------
# the module


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("axis", [None, 1])
def test_module_initializes_from_first_batch_and_learns(scheme, axis):
    torch.manual_seed(0)
    fq = fastpeft.FakeQuantize(bits=4, scheme=scheme, axis=axis, num_channels=None if axis is None else 6).to(DEVICE)
    x = torch.randn(5, 6, device=DEVICE) * 3
    y = fq(x)
    scale, zp = rq.compute_qparams(x.cpu(), 4, scheme, axis)
    assert torch.equal(fq.scale.detach().cpu(), scale) and torch.equal(fq.zero_point.detach().cpu(), zp.float())
    assert bool(fq.initialized)
    assert torch.equal(y.detach().cpu(), quant_reference(x, scale, zp.float(), 4, scheme, axis))
    names = {n for n, _ in fq.named_parameters()}
    assert names == ({"scale", "zero_point"} if scheme == "zeropoint" else {"scale"})
    opt = torch.optim.SGD(fq.parameters(), lr=0.05)
    target = x.clone()
    before = ((fq(x) - target) ** 2).mean().item()
    for _ in range(20):
        opt.zero_grad()
        loss = ((fq(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert fq.scale.grad is not None and torch.isfinite(fq.scale.grad).all()
    assert loss.item() <= before
    assert not torch.equal(fq.scale.detach().cpu(), scale)  # the scale moved; a second batch does not re-init
    sd = fq.state_dict()
    fq2 = fastpeft.FakeQuantize(bits=4, scheme=scheme, axis=axis, num_channels=None if axis is None else 6)
    fq2.load_state_dict(sd)
    assert torch.equal(fq2.to(DEVICE)(x), fq(x))


def test_module_observer_when_not_learnable():
    fq = fastpeft.FakeQuantize(bits=8, scheme="zeropoint", axis=0, learnable=False, num_channels=3).to(DEVICE)
    assert len(list(fq.parameters())) == 0
    a = torch.randn(3, 7, device=DEVICE)
    b = torch.randn(3, 7, device=DEVICE) * 4
    fq(a)
    fq(b)
    both = torch.cat([a, b], dim=1).cpu()
    scale, zp = rq.compute_qparams(both, 8, "zeropoint", 0)
    assert torch.equal(fq.scale.cpu(), scale) and torch.equal(fq.zero_point.cpu(), zp.float())
    fq.eval()
    fq(torch.randn(3, 7, device=DEVICE) * 100)  # frozen in eval mode
    assert torch.equal(fq.scale.cpu(), scale)
    y = fq(a)
    assert torch.equal(y.cpu(), quant_reference(a, scale, zp.float(), 8, "zeropoint", 0))


def test_module_errors():
    with pytest.raises(ValueError, match="bits"):
        fastpeft.FakeQuantize(bits=2)
    with pytest.raises(ValueError, match="scheme"):
        fastpeft.FakeQuantize(scheme="sym")
    with pytest.raises(ValueError, match="num_channels"):
        fastpeft.FakeQuantize(axis=0)
    with pytest.raises(ValueError, match="num_channels"):
        fastpeft.FakeQuantize(num_channels=4)
    fq = fastpeft.FakeQuantize(axis=1, num_channels=4)
    with pytest.raises(ValueError, match="num_channels=4"):
        fq(torch.randn(2, 5))
    assert "bits=8" in repr(fq)


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batch_leaves_the_quantizer_as_it_was(learnable, bad):
    """A NaN / inf batch raises before the observer's range (or the first-batch scale) changes:
    the next good batch trains as if the bad one never came."""
    g = torch.Generator().manual_seed(0)
    good = torch.randn(4, 8, generator=g)
    poisoned = good.clone()
    poisoned[1, 3] = bad
    fq, twin = (fastpeft.FakeQuantize(8, "zeropoint", learnable=learnable).train() for _ in range(2))
    with pytest.raises(ValueError, match="NaN or inf"):
        fq(poisoned)
    assert torch.equal(fq(good), twin(good))
    assert all(torch.equal(a, b) for a, b in zip(fq.state_dict().values(), twin.state_dict().values()))
    layer = fastpeft.QATLinear(8, 3)
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        with torch.no_grad():
            layer.weight[0, 0] = bad
            layer(good)
    with torch.no_grad():
        layer.weight.copy_(weight)
    assert torch.isfinite(layer(good)).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_channel_on_one_dim_input(backend):
    """1-D x with axis=0: one element per channel (the torch backward summed every channel into one)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, generator=g).requires_grad_()
    scale = (torch.rand(12, generator=g) * 0.1 + 0.01).requires_grad_()
    y = fastpeft.fake_quantize(x, scale, None, 8, "absmax", axis=0, backend=backend)
    dy = torch.randn(12, generator=g)
    dx, ds = torch.autograd.grad(y, [x, scale], dy)
    wdx, wds, _ = rfq.fake_quantize_grads(x.detach(), scale.detach(), None, dy, 8, "absmax", 0, torch.float64)
    assert torch.equal(y, rfq.fake_quantize(x.detach(), scale.detach(), None, 8, "absmax", 0))
    assert torch.equal(dx, wdx) and ds.shape == (12,) and torch.allclose(ds.double(), wds, rtol=1e-5, atol=1e-8)
    fq = fastpeft.FakeQuantize(8, "absmax", axis=0, num_channels=12, learnable=False).train()
    assert fq(x.detach()).shape == (12,) and fq.scale.shape == (12,)


@pytest.mark.skipif(DEVICE == "cpu" and not __import__("fastpeft")._backend.interpreter_active(),
                    reason="needs the triton backend (a GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("case", [((700,), None), ((9, 21), 1), ((3, 5, 40), 1), ((67, 3), 0)],
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-a{c[1]}")
def test_int64_offsets_give_the_same_bits(case, monkeypatch):
    """The 64-bit offset variant (taken above 2**31 elements: every product that can reach the element
    count, pid * R_SPLIT included, widened first) computes exactly what the 32-bit one does; forced
    here on small tensors, several programs along the split dim."""
    from fastpeft.kernels import fakequant as kfq
    shape, axis = case
    x, scale, zero_point, dy = make_case(shape, axis, 8, "zeropoint")
    want = run("triton", x, scale, zero_point, dy, 8, "zeropoint", axis)
    setup = kfq._launch_setup

    def int64_setup(*a, **kw):
        cfg, const = setup(*a, **kw)
        assert not const["INT64"]
        return cfg, {**const, "INT64": True}

    monkeypatch.setattr(kfq, "_launch_setup", int64_setup)
    got = run("triton", x, scale, zero_point, dy, 8, "zeropoint", axis)
    for name, g, w in zip(("y", "dx", "ds", "dz"), got, want):
        assert torch.equal(g, w), f"{name}: the INT64 variant differs"
