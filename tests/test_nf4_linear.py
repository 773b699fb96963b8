"""The 4-bit NF4 / FP4 linear layer (QLoRA's frozen base, Dettmers et al., 2023):
fastpeft.ops.nf4.nf4_linear and QuantLinear(scheme="nf4" | "fp4").

Oracles: fastpeft/reference/nf4.py's linear_4bit run in float64 (relative error: fp32 <= 1e-5,
fp16 <= 2e-3, bf16 <= 1e-2), for the output, dx and the bias gradient, on awkward shapes (M = 1,
3-D inputs, N odd, K not a multiple of the block, odd K, blocks straddling rows); and
bitsandbytes' Linear4bit (nf4, double quantization) on the CPU where installed.
"""
import dataclasses

import pytest
import torch

import fastpeft
from fastpeft.ops import nf4 as ops
from fastpeft.reference import nf4 as ref

from _utils import DEVICE

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (leading dims of x, K, N, block size, double quantization, scheme)
CASES = [
    ((1,), 100, 7, 64, True, "nf4"),        # M = 1, K not a multiple of the block: blocks straddle rows
    ((2, 3), 96, 33, 32, False, "fp4"),     # 3-D x, N odd, two blocks per K tile
    ((5,), 128, 40, 128, True, "nf4"),      # one block per row and K tile, two K tiles
    ((17,), 37, 9, 64, False, "nf4"),       # odd K (nibble parity alternates by row), two M tiles
]


def rnd(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert not torch.isnan(a).any()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def ref_weight(q):
    """float64 W_deq [N, K] of a QuantizedTensor (the reference's float32 values)."""
    absmax = q.scale if q.nested_scale is None else ref.dequantize_absmax(q.scale.cpu(), q.nested_scale.cpu(),
                                                                         q.nested_offset.cpu())
    return ref.dequantize_4bit(q.data.cpu(), absmax.cpu(), q.scheme, q.group_size, q.shape, torch.float32).double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(poison_outputs, case, dtype):
    lead, K, N, bs, dq, scheme = CASES[case]
    q = fastpeft.quantize(rnd(N, K, seed=case, scale=0.05), 4, scheme, block_size=bs, double_quant=dq)
    w = ref_weight(q)
    x = rnd(*lead, K, dtype=dtype, seed=10 + case)
    if case == 1:  # non-contiguous x
        x = rnd(*lead[:-1], K, lead[-1], dtype=dtype, seed=10 + case).transpose(-1, -2)
    b = rnd(N, dtype=dtype, seed=20 + case)
    dy = rnd(*lead, N, dtype=dtype, seed=30 + case)
    want = x.double().cpu() @ w.T + b.double().cpu()
    want_dx = dy.double().cpu() @ w
    for backend in ("triton", "torch"):
        xg, bg = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        with fastpeft.use_backend(backend):
            y = ops.nf4_linear(xg, q, bg)
            assert y.dtype == dtype and y.shape == (*lead, N)
            y.backward(dy)
        assert rel(y, want) <= TOL[dtype], (backend, rel(y, want))
        assert xg.grad.dtype == dtype and rel(xg.grad, want_dx) <= TOL[dtype], (backend, rel(xg.grad, want_dx))
        assert rel(bg.grad, dy.double().cpu().reshape(-1, N).sum(0)) <= TOL[dtype]


# the decode path (kernels/nf4.py ``_nf4_gemv_kernel``: M <= DECODE_MAX_M, K whole blocks, the codes
# read as int32 words; past GEMV_MAX_M with tl.dot): (leading dims of x, K, N, block size, double quantization, scheme, bias).
# The interpreter splits K in two where there are 2 K tiles or more (64 wide): fp32 partials summed
# by the split-K sum kernel, the bias added there
GEMV_CASES = [
    ((1,), 256, 9, 64, True, "nf4", True),     # M = 1, split-K (2 x 2 tiles), N odd, bias in the sum
    ((2,), 192, 33, 32, False, "fp4", False),  # M = 2, an uneven split (2 tiles + 1), 3 N tiles
    ((1, 1), 64, 16, 64, True, "nf4", True),   # one K tile: no split, the bias in the GEMV itself
    ((2,), 256, 5, 256, False, "nf4", True),   # blocks of 256: a block spans K tiles
    # M = 3 to DECODE_MAX_M: the same kernel with tl.dot (MMA; BLOCK_M 16, masked rows)
    ((3,), 192, 21, 64, True, "nf4", True),    # M = 3, an uneven split, N odd, 2 N tiles
    ((2, 8), 128, 16, 32, False, "fp4", False),  # M = 16 (3-D x), blocks of 32: 2 absmax a K tile
    ((5,), 64, 33, 64, False, "nf4", True),    # one K tile: no split, the bias in the kernel
]


def _gemv_calls(monkeypatch):
    from fastpeft.kernels import nf4 as knf4
    calls = []
    gemv = knf4._nf4_gemv
    monkeypatch.setattr(knf4, "_nf4_gemv", lambda *a: (calls.append(a[0].shape[0]), gemv(*a))[1])
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(GEMV_CASES)))
def test_decode_gemv_matches_reference(poison_outputs, monkeypatch, case, dtype):
    lead, K, N, bs, dq, scheme, bias = GEMV_CASES[case]
    q = fastpeft.quantize(rnd(N, K, seed=case, scale=0.05), 4, scheme, block_size=bs, double_quant=dq)
    x = rnd(*lead, K, dtype=dtype, seed=40 + case)
    b = rnd(N, dtype=dtype, seed=50 + case) if bias else None
    want = x.double().cpu() @ ref_weight(q).T + (0 if b is None else b.double().cpu())
    calls = _gemv_calls(monkeypatch)
    with fastpeft.use_backend("triton"):
        y = ops.nf4_linear(x, q, b)
    assert calls == [x.numel() // K]  # the GEMV ran
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert rel(y, want) <= TOL[dtype], rel(y, want)


def test_decode_gemv_only_where_it_applies(monkeypatch):
    """M past DECODE_MAX_M, K not whole blocks, and codes that cannot be read as int32 words (a
    view at an odd byte offset) take the GEMM, with the same result."""
    from fastpeft.kernels import nf4 as knf4
    calls = _gemv_calls(monkeypatch)
    q = fastpeft.quantize(rnd(8, 128, scale=0.05), 4, "nf4", block_size=64, double_quant=True)
    w = ref_weight(q)
    with fastpeft.use_backend("triton"):
        x = rnd(knf4.DECODE_MAX_M + 1, 128, seed=1)
        assert rel(ops.nf4_linear(x, q), x.double() @ w.T) <= 1e-5 and calls == []
        q2 = fastpeft.quantize(rnd(8, 96, scale=0.05), 4, "nf4", block_size=64)
        x2 = rnd(1, 96, seed=2)
        assert rel(ops.nf4_linear(x2, q2), x2.double() @ ref_weight(q2).T) <= 1e-5 and calls == []
        shifted = torch.empty(q.data.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:]
        shifted.copy_(q.data)
        q3 = dataclasses.replace(q, data=shifted)
        x3 = rnd(1, 128, seed=3)
        assert rel(ops.nf4_linear(x3, q3), x3.double() @ w.T) <= 1e-5 and calls == []
        assert rel(ops.nf4_linear(x3, q), x3.double() @ w.T) <= 1e-5 and calls == [1]


def test_no_grad_and_empty(poison_outputs):
    q = fastpeft.quantize(rnd(6, 40, scale=0.05), 4, "nf4", block_size=32, double_quant=True)
    x = rnd(2, 40)
    with fastpeft.use_backend("triton"):
        y = ops.nf4_linear(x, q)  # no grad needed: the kernel directly
        assert rel(y, x.double().cpu() @ ref_weight(q).T) <= 1e-5
        assert ops.nf4_linear(x[:0], q).shape == (0, 6)
        x0 = rnd(0, 40).requires_grad_()
        y0 = ops.nf4_linear(x0, q, rnd(6))
        y0.sum().backward()
        assert y0.shape == (0, 6) and x0.grad.shape == (0, 40)


def test_double_backward():
    """dx under create_graph is the torch composition, recorded: d(dx)/d(dy) exists."""
    q = fastpeft.quantize(rnd(5, 64, scale=0.05), 4, "nf4", block_size=64)
    x = rnd(3, 64).requires_grad_()
    y = ops.nf4_linear(x, q)
    dy = torch.ones_like(y, requires_grad=True)
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    (ddy,) = torch.autograd.grad(dx.sum(), dy)
    assert rel(ddy, ref_weight(q).sum(1).expand(3, 5)) <= 1e-6


def test_quant_linear_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(72, 21, device=DEVICE)
    ql = fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="nf4", group_size=64, double_quant=True)
    assert ql.weight_scale.dtype == torch.uint8 and ql.weight_nested_scale.dtype == torch.float32
    assert ql.weight_zero_point is None and not ql.bias.requires_grad
    assert "scheme=nf4" in repr(ql) and "double_quant=True" in repr(ql)
    q = fastpeft.quantize(lin.weight.detach(), 4, "nf4", block_size=64, double_quant=True)
    for name in ("data", "scale", "nested_scale", "nested_offset"):
        assert torch.equal(getattr(ql.qweight, name), getattr(q, name))
    assert torch.equal(ql.dequantized_weight(), fastpeft.dequantize(q, torch.float32))
    x = rnd(2, 3, 72, seed=1).requires_grad_()
    y = ql(x)
    assert rel(y.detach(), x.detach().double() @ ref_weight(q).T + lin.bias.detach().double()) <= 1e-5
    y.sum().backward()
    assert x.grad is not None and ql.bias.grad is None
    assert not any(p.requires_grad for p in ql.parameters())
    ql.bias.requires_grad_(True)  # a trainable bias (BitFit on the 4-bit base) gets its gradient
    ql(x).sum().backward()
    assert torch.allclose(ql.bias.grad, torch.full((21,), 6.0, device=DEVICE))
    # a 16-bit model keeps float32 nested absmax / offset and the uint8 codes
    half = fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="fp4", group_size=32).to(torch.bfloat16)
    assert half.weight_scale.dtype == torch.float32 and half.bias.dtype == torch.bfloat16
    ql.to(torch.float16)
    assert ql.weight_scale.dtype == torch.uint8 and ql.weight_nested_offset.dtype == torch.float32
    assert ql(x.detach().half()).dtype == torch.float16
    # from_quantized copies the fields
    fq = fastpeft.QuantLinear.from_quantized(q, lin.bias)
    assert torch.equal(fq(x.detach()), ops.nf4_linear(x.detach(), q, lin.bias.detach()))
    # state_dict: the uint8 absmax codes and float32 nested fields load into another nf4 layer
    sd = ql.state_dict()
    assert sorted(sd) == ["bias", "weight_data", "weight_nested_offset", "weight_nested_scale", "weight_scale"]
    other = fastpeft.QuantLinear.from_linear(torch.nn.Linear(72, 21), bits=4, scheme="nf4", group_size=64,
                                             double_quant=True).to(torch.float16)
    other.load_state_dict(sd)
    assert torch.equal(other(x.detach().half()), ql(x.detach().half()))
    # the constructor
    fresh = fastpeft.QuantLinear(40, 9, bits=4, scheme="nf4", group_size=64, double_quant=True)
    assert fresh(rnd(1, 40)).shape == (1, 9)


def test_matches_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = torch.nn.Linear(72, 20)
    l4 = bnb.nn.Linear4bit(72, 20, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                           quant_type="nf4")
    l4.load_state_dict(lin.state_dict())
    l4 = l4.to("cpu")
    x = rnd(3, 72, seed=2)
    want = l4(x).detach()
    # bitsandbytes' own codes, read through from_bnb: the same weight, the same output
    q = fastpeft.QuantizedTensor.from_bnb(l4.weight, l4.weight.quant_state)
    ours = fastpeft.QuantLinear.from_quantized(q, lin.bias)
    for backend in ("torch", "triton"):
        with fastpeft.use_backend(backend):
            assert rel(ours(x), want) <= 1e-5, backend
    # quantized by fastpeft from the float weight (equal codes up to bitsandbytes' CPU double-quant edges)
    ql = fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="nf4", group_size=64, double_quant=True)
    with fastpeft.use_backend("triton"):
        assert rel(ql(x), want) <= 1e-3


def test_bad_input_fails_clearly():
    q = fastpeft.quantize(rnd(6, 40, scale=0.05), 4, "nf4", block_size=32, double_quant=True)
    x = rnd(2, 40)
    with pytest.raises(ValueError, match="expects 40"):
        ops.nf4_linear(rnd(2, 41), q)
    with pytest.raises(ValueError, match="scale has shape"):  # a block size that does not match the codes
        ops.nf4_linear(x, dataclasses.replace(q, group_size=64))
    with pytest.raises(ValueError, match="block size must be one of"):
        ops.nf4_linear(x, dataclasses.replace(q, group_size=48))
    with pytest.raises(ValueError, match="data has shape"):  # K * N not matching the codes
        ops.nf4_linear(x, dataclasses.replace(q, data=q.data[:-1]))
    with pytest.raises(ValueError, match="data has shape"):
        ops.nf4_linear(rnd(2, 20), dataclasses.replace(q, shape=torch.Size((6, 20))))
    with pytest.raises(ValueError, match="2-D"):
        ops.nf4_linear(rnd(2, 5), fastpeft.quantize(rnd(6, 8, 5), 4, "nf4"))
    with pytest.raises(ValueError, match="bias shape"):
        ops.nf4_linear(x, q, rnd(7))
    with pytest.raises(TypeError, match="dtype"):
        ops.nf4_linear(x.long(), q)
    with pytest.raises(TypeError, match="bias"):
        ops.nf4_linear(x, q, rnd(6).half())
    with pytest.raises(TypeError, match="QuantizedTensor"):
        ops.nf4_linear(x, q.data)
    with pytest.raises(ValueError, match="nf4 / fp4 weight"):
        ops.nf4_linear(x, fastpeft.quantize(rnd(6, 40), 4, "absmax", group_size=20))
    with pytest.raises(ValueError, match="nested_scale has shape"):
        ops.nf4_linear(x, dataclasses.replace(q, nested_scale=q.nested_scale.repeat(2)))
    lin = torch.nn.Linear(40, 6)
    with pytest.raises(ValueError, match="bits must be 4"):
        fastpeft.QuantLinear.from_linear(lin, bits=8, scheme="nf4", group_size=64)
    with pytest.raises(ValueError, match="block size"):
        fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="nf4", group_size=100)
    with pytest.raises(ValueError, match="16-bit activations"):
        fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="nf4", group_size=64, activations="dynamic")
    with pytest.raises(ValueError, match="double_quant"):
        fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="zeropoint", group_size=8, double_quant=True)
    with pytest.raises(TypeError, match="double_quant"):
        fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="nf4", group_size=64, double_quant=1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_registered_ops(backend):
    q = fastpeft.quantize(rnd(12, 40, scale=0.05), 4, "nf4", block_size=32, double_quant=True)
    f = fastpeft.quantize(rnd(12, 40, scale=0.05), 4, "fp4", block_size=64)
    qa = lambda q: (q.data, q.scale, q.nested_scale, q.nested_offset, q.scheme, q.group_size)  # noqa: E731
    with fastpeft.use_backend(backend):
        torch.library.opcheck(torch.ops.fastpeft.nf4_linear.default,
                              (rnd(2, 3, 40).requires_grad_(), *qa(q), 12, rnd(12).requires_grad_(), None))
        torch.library.opcheck(torch.ops.fastpeft.nf4_linear_grad_input.default, (rnd(3, 12), *qa(f), 40, None))
