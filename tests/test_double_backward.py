"""Second-order gradients (a gradient taken with create_graph=True, then differentiated again, as a
gradient penalty does) through every differentiable op: the same on every backend as on a plain
PyTorch composition of the same function, or, for the distillation losses, a clear error."""
import pytest
import torch

import fastpeft
from fastpeft.ops.int8 import quantize_weight
from fastpeft.reference import bottleneck as ref_bottleneck
from fastpeft.reference import fakequant as ref_fakequant
from fastpeft.reference import lora as ref_lora
from fastpeft.reference.int8 import dequantize_weight

from _utils import DEVICE, rel_err

BACKENDS = ["torch", "triton"]
TOL = 1e-4  # float32 throughout; the two sides sum in different orders


def penalty_grads(fn, inputs: dict, wrt: list[str]):
    """d/d(params) of ||d sum(fn(**inputs)^2) / d x||^2 (the gradient penalty on x), and the
    first-order gradient itself."""
    y = fn(**inputs)
    (gx,) = torch.autograd.grad(y.square().sum(), inputs["x"], create_graph=True)
    grads = torch.autograd.grad(gx.square().sum(), [inputs[k] for k in wrt], allow_unused=True)
    return gx, {k: (torch.zeros_like(inputs[k]) if g is None else g) for k, g in zip(wrt, grads)}


def leaves(**tensors):
    return {k: (t.to(DEVICE).requires_grad_(True) if t.is_floating_point() else t.to(DEVICE))
            for k, t in tensors.items()}


def compare(op_fn, ref_fn, inputs, wrt):
    gx_ref, ref = penalty_grads(ref_fn, inputs, wrt)
    for backend in BACKENDS:
        gx, out = penalty_grads(lambda **kw: op_fn(backend=backend, **kw), inputs, wrt)
        assert rel_err(gx, gx_ref) <= TOL, backend
        for k in wrt:
            assert ref[k].abs().sum() > 0 or k == "x", f"{k}: the penalty must reach it"
            assert rel_err(out[k], ref[k]) <= TOL, f"{backend} d penalty / d {k}: {rel_err(out[k], ref[k]):.3e}"


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", [(5, 16, 12, 4), (33, 40, 24, 8)])
def test_lora_linear(shape, p):
    M, K, N, r = shape
    g = torch.Generator().manual_seed(0)
    inp = leaves(x=torch.randn(M, K, generator=g), bias=torch.randn(N, generator=g),
                 lora_A=torch.randn(r, K, generator=g) / 4, lora_B=torch.randn(N, r, generator=g) / 4)
    w = torch.randn(N, K, generator=g).to(DEVICE)
    seed = torch.tensor([1234], device=DEVICE)
    compare(lambda backend, x, bias, lora_A, lora_B: fastpeft.lora_linear(
                x, w, bias, lora_A, lora_B, 0.5, p, training=True, seed=1234, backend=backend),
            lambda x, bias, lora_A, lora_B: ref_lora.lora_linear(x, w, bias, lora_A, lora_B, 0.5, p, seed),
            inp, ["x", "bias", "lora_A", "lora_B"])


def test_lora_linear_frozen_adapters():
    """Only x requires grad: the forward keeps no x; the second derivative needs none."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 16, generator=g).to(DEVICE).requires_grad_(True)
    w, A, B = torch.randn(12, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g)
    w, A, B = w.to(DEVICE), A.to(DEVICE), B.to(DEVICE)
    scale = torch.ones(12, device=DEVICE, requires_grad=True)  # the penalty reaches it through y
    ref = penalty_grads(lambda x, scale: ref_lora.lora_linear(x, w, None, A, B, 0.5) * scale,
                        {"x": x, "scale": scale}, ["scale"])[1]["scale"]
    for backend in BACKENDS:
        out = penalty_grads(lambda x, scale: fastpeft.lora_linear(x, w, None, A, B, 0.5, backend=backend) * scale,
                            {"x": x, "scale": scale}, ["scale"])[1]["scale"]
        assert rel_err(out, ref) <= TOL, backend


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_bottleneck_adapter(activation):
    g = torch.Generator().manual_seed(2)
    inp = leaves(x=torch.randn(9, 16, generator=g), down_weight=torch.randn(4, 16, generator=g) / 4,
                 down_bias=torch.randn(4, generator=g), up_weight=torch.randn(16, 4, generator=g) / 4,
                 up_bias=torch.randn(16, generator=g))
    compare(lambda backend, **t: fastpeft.bottleneck_adapter(**t, activation=activation, scaling=0.7,
                                                             backend=backend),
            lambda **t: ref_bottleneck.bottleneck_adapter(**t, activation=activation, scaling=0.7),
            inp, ["x", "down_weight", "down_bias", "up_weight", "up_bias"])


def ste_linear(x, w_deq, bias, y_quantized):
    """The straight-through estimator as a composition: the value of the quantized product, the
    derivatives of x w_deq^T + b."""
    exact = x @ w_deq.t() + bias
    return exact + (y_quantized - exact).detach()


def test_int8_linear():
    g = torch.Generator().manual_seed(3)
    inp = leaves(x=torch.randn(17, 32, generator=g), bias=torch.randn(24, generator=g))
    wq, ws = quantize_weight(torch.randn(24, 32, generator=g).to(DEVICE))
    w_deq = dequantize_weight(wq, ws)
    compare(lambda backend, x, bias: fastpeft.int8_linear(x, wq, ws, bias, threshold=0.0, backend=backend),
            lambda x, bias: ste_linear(x, w_deq, bias, fastpeft.int8_linear(x, wq, ws, bias, threshold=0.0)),
            inp, ["x", "bias"])


@pytest.mark.parametrize("bits,scheme,group_size", [(8, "absmax", None), (4, "zeropoint", 16)])
def test_quant_linear(bits, scheme, group_size):
    g = torch.Generator().manual_seed(4)
    inp = leaves(x=torch.randn(6, 32, generator=g), bias=torch.randn(20, generator=g))
    qw = fastpeft.quantize(torch.randn(20, 32, generator=g).to(DEVICE), bits, scheme,
                           axis=0 if group_size is None else None, group_size=group_size)
    w_deq = fastpeft.dequantize(qw, torch.float32)
    compare(lambda backend, x, bias: fastpeft.quant_linear(x, qw, bias, backend=backend),
            lambda x, bias: ste_linear(x, w_deq, bias, fastpeft.quant_linear(x, qw, bias)),
            inp, ["x", "bias"])


@pytest.mark.parametrize("scheme", ["nf4", "zeropoint"])
def test_lora_on_a_quantized_base(scheme):
    """fastpeft.ops.nf4.nf4_lora_linear and fastpeft.ops.qlinear.quant_lora_linear (one autograd,
    fastpeft/ops/_qlora.py): under create_graph their backward is the torch composition, recorded."""
    from fastpeft.ops.nf4 import nf4_lora_linear
    from fastpeft.ops.qlinear import quant_lora_linear
    g = torch.Generator().manual_seed(5)
    inp = leaves(x=torch.randn(5, 64, generator=g), bias=torch.randn(12, generator=g),
                 lora_A=torch.randn(4, 64, generator=g) / 4, lora_B=torch.randn(12, 4, generator=g) / 4)
    if scheme == "nf4":
        qw, fn = fastpeft.quantize(torch.randn(12, 64, generator=g).to(DEVICE), 4, "nf4", block_size=32), nf4_lora_linear
    else:
        qw, fn = fastpeft.quantize(torch.randn(12, 64, generator=g).to(DEVICE), 4, scheme, group_size=16), \
            quant_lora_linear
    w_deq = fastpeft.dequantize(qw, torch.float32)
    seed = torch.tensor([99], device=DEVICE)
    compare(lambda backend, x, bias, lora_A, lora_B: fn(x, qw, bias, lora_A, lora_B, 0.5, 0.25, True, seed=99,
                                                        backend=backend),
            lambda x, bias, lora_A, lora_B: ref_lora.lora_linear(x, w_deq, bias, lora_A, lora_B, 0.5, 0.25, seed),
            inp, ["x", "bias", "lora_A", "lora_B"])


@pytest.mark.parametrize("scheme,axis", [("zeropoint", None), ("absmax", 0)])
def test_fake_quantize(scheme, axis):
    """Against the reference autograd.Function, whose backward is differentiable torch arithmetic."""
    g = torch.Generator().manual_seed(5)
    n = 1 if axis is None else 8
    inp = leaves(x=torch.randn(8, 24, generator=g) * 2, scale=torch.rand(n, generator=g) / 20 + 0.02,
                 zero_point=torch.randint(-3, 4, (n,), generator=g).float())
    if axis is None:
        inp = {**inp, "scale": inp["scale"].detach().reshape(()).requires_grad_(True),
               "zero_point": inp["zero_point"].detach().reshape(()).requires_grad_(True)}
    wrt = ["x", "scale"] + (["zero_point"] if scheme == "zeropoint" else [])
    inp = {k: v for k, v in inp.items() if k != "zero_point" or scheme == "zeropoint"}

    def ref(x, scale, zero_point=None):
        return ref_fakequant.FakeQuantizeFunction.apply(x, scale, zero_point, 8, scheme, axis)

    def op(backend, x, scale, zero_point=None):
        return fastpeft.fake_quantize(x, scale, zero_point, 8, scheme, axis, backend=backend)

    gx_ref, want = penalty_grads(ref, inp, wrt)
    for backend in BACKENDS:
        gx, out = penalty_grads(lambda **kw: op(backend, **kw), inp, wrt)
        assert rel_err(gx, gx_ref) <= TOL, backend
        for k in wrt:
            assert rel_err(out[k], want[k]) <= TOL, f"{backend} d penalty / d {k}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_losses_refuse(backend):
    """The losses keep their gradient, not their inputs: create_graph=True is an error on every
    backend, never a penalty silently dropped."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 10, generator=g).to(DEVICE).requires_grad_(True)
    t = torch.randn(4, 10, generator=g).to(DEVICE)
    loss = fastpeft.distillation_loss(z, t, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, z, create_graph=True)
    h = torch.randn(4, 8, generator=g).to(DEVICE).requires_grad_(True)
    ws, wt = torch.randn(10, 8, generator=g).to(DEVICE), torch.randn(10, 8, generator=g).to(DEVICE)
    loss = fastpeft.fused_linear_distillation_loss(h, ws, h.detach(), wt, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
    # first-order gradients are unaffected
    (gz,) = torch.autograd.grad(fastpeft.distillation_loss(z, t, backend=backend), z)
    assert torch.isfinite(gz).all() and gz.abs().sum() > 0
