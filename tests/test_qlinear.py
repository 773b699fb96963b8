"""fastpeft.quant_linear / fastpeft.QuantLinear (weight-only W8A16 / W4A16) against float64.

The reference is x @ W_deq^T + bias in float64, W_deq from fastpeft/reference/quant.py's
dequantize of the same codes. The triton kernel runs under TRITON_INTERPRET=1 on the CPU
(fp32 and fp16; bf16 on the GPU only), with its output buffers poisoned with NaN.
"""
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.kernels import qlinear as k
from fastpeft.ops.quant import QuantizedTensor
from fastpeft.reference import quant as ref

from _utils import DEVICE, assert_close

DTYPES = [torch.float32, torch.float16]
# (in, group_size, axis): groups of 32 (two per interpreter K tile, a partial last tile at
# in=96), one group per tile (64), a group spanning tiles (128), per output row at odd in, and
# per tensor
GRANS = [(64, 32, None), (96, 32, None), (256, 64, None), (256, 128, None), (70, None, 0), (64, None, None)]
OUT = 40  # not a multiple of the kernel's N tile


@pytest.fixture
def poison(monkeypatch):
    def nan_output(shape, like, dtype):
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    monkeypatch.setattr(k, "_new_output", nan_output)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_qweight(N, K, bits, scheme, group_size, axis, seed=0):
    w = torch.randn(N, K, generator=_gen(seed + N + K), dtype=torch.float32) / K ** 0.5
    w[0, :] = 0.0  # an all-zero row: scale 1, exact zeros
    return fastpeft.quantize(w.to(DEVICE), bits, scheme, axis=axis, group_size=group_size, backend="torch")


def w_deq64(qw: QuantizedTensor) -> torch.Tensor:
    """The reference dequantize of the codes, in float64."""
    data = qw.data.cpu()
    q = ref.unpack4(data, qw.shape[-1], qw.scheme == "absmax") if qw.bits == 4 else data.to(torch.int32)
    return ref.dequantize_codes(q, qw.scale.cpu(), qw.zero_point.cpu(), qw.axis, qw.group_size).double()


def expected(x, qw, bias):
    y = x.detach().cpu().double() @ w_deq64(qw).t()
    return y if bias is None else y + bias.detach().cpu().double()


def make_x(M, K, dtype, seed=1):
    return torch.randn(M, K, generator=_gen(seed + M * 7 + K), dtype=torch.float32).to(DEVICE, dtype)


# ---------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,group_size,axis", GRANS)
@pytest.mark.parametrize("scheme", ["zeropoint", "absmax"])
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_forward(poison, bits, scheme, K, group_size, axis, dtype):
    qw = make_qweight(OUT, K, bits, scheme, group_size, axis)
    bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE, dtype)
    for M in (1, 5, 33):
        x = make_x(M, K, dtype)
        for b in (bias, None):
            y = fastpeft.quant_linear(x, qw, b, backend="triton")
            assert y.dtype == dtype and y.shape == (M, OUT)
            assert_close(f"triton M={M} bias={b is not None}", y, expected(x, qw, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,group_size,axis", GRANS[1:2] + GRANS[4:])
@pytest.mark.parametrize("bits", [4, 8])
def test_torch_backend_forward(bits, K, group_size, axis, dtype):
    for scheme in ("zeropoint", "absmax"):
        qw = make_qweight(OUT, K, bits, scheme, group_size, axis)
        bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE, dtype)
        for M in (1, 33):
            x = make_x(M, K, dtype)
            y = fastpeft.quant_linear(x, qw, bias, backend="torch")
            assert_close(f"torch {scheme} M={M}", y, expected(x, qw, bias), dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_leading_dims_and_strides(poison, backend):
    qw = make_qweight(OUT, 64, 4, "zeropoint", 32, None)
    big = make_x(2 * 3 * 5, 128, torch.float16).reshape(2, 3, 5, 128)
    x = big[:, :, :, ::2]  # non-unit last stride
    y = fastpeft.quant_linear(x, qw, backend=backend)
    assert y.shape == (2, 3, 5, OUT)
    assert_close("3-D strided", y.reshape(-1, OUT), expected(x.reshape(-1, 64), qw, None), torch.float16)
    xt = make_x(64, 7, torch.float32).t()  # transposed view [7, 64]
    assert_close("transposed", fastpeft.quant_linear(xt, qw, backend=backend), expected(xt, qw, None),
                 torch.float32)


def test_empty_batch():
    qw = make_qweight(OUT, 64, 4, "zeropoint", 32, None)
    y = fastpeft.quant_linear(torch.zeros(0, 3, 64, device=DEVICE), qw)
    assert y.shape == (0, 3, OUT)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 5, 33, 300])
def test_kernel_bf16_gpu(poison, bits, M):
    for K, g, axis in GRANS:
        for scheme in ("zeropoint", "absmax"):
            qw = make_qweight(OUT, K, bits, scheme, g, axis)
            x = make_x(M, K, torch.bfloat16)
            bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE, torch.bfloat16)
            y = fastpeft.quant_linear(x, qw, bias, backend="triton")
            assert_close(f"bf16 {scheme} {K} {g}", y, expected(x, qw, bias), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bits,scheme,K,group_size,axis", [(4, "zeropoint", 96, 32, None),
                                                           (8, "absmax", 64, 64, None),
                                                           (4, "absmax", 70, None, 0)])
def test_grads(backend, bits, scheme, K, group_size, axis, dtype):
    qw = make_qweight(OUT, K, bits, scheme, group_size, axis)
    M = 5
    x = make_x(M, K, dtype).reshape(1, M, K).requires_grad_(True)
    bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE, dtype).requires_grad_(True)
    dy = torch.randn(1, M, OUT, generator=_gen(9)).to(DEVICE, dtype)
    fastpeft.quant_linear(x, qw, bias, backend=backend).backward(dy)
    dy64 = dy.cpu().double().reshape(M, OUT)
    assert_close("dx", x.grad.reshape(M, K), dy64 @ w_deq64(qw), dtype)
    assert_close("dbias", bias.grad, dy64.sum(0), dtype)


# ---------------------------------------------------------------------------------------------
# the module


@pytest.mark.parametrize("bits,group_size,scheme,tol", [(4, 32, "zeropoint", 0.15), (4, None, "absmax", 0.3),
                                                        (8, 64, "zeropoint", 0.01), (8, 128, "absmax", 0.02)])
def test_from_linear_close_to_fp32(poison, bits, group_size, scheme, tol):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48).to(DEVICE)
    ql = fastpeft.QuantLinear.from_linear(lin, bits=bits, group_size=group_size, scheme=scheme)
    assert (ql.bits, ql.group_size, ql.scheme) == (bits, group_size, scheme)
    x = make_x(7, 128, torch.float32)
    y, y_ref = ql(x), lin(x)
    err = ((y - y_ref).norm() / y_ref.norm()).item()
    assert err < tol, f"quantized layer relative error {err:.3f} >= {tol}"
    # exactly the dequantized layer
    assert_close("vs W_deq", y, expected(x, ql.qweight, lin.bias), torch.float32)
    assert torch.equal(ql.dequantized_weight().cpu().double(), w_deq64(ql.qweight))
    assert not any(p.requires_grad for p in ql.parameters())


def test_module_passes_input_grads():
    ql = fastpeft.QuantLinear(64, OUT, bits=4, group_size=32).to(DEVICE)
    x = make_x(3, 64, torch.float32).requires_grad_(True)
    ql(x).sum().backward()
    assert_close("dx", x.grad, torch.ones(3, OUT, dtype=torch.float64) @ w_deq64(ql.qweight), torch.float32)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = fastpeft.QuantLinear(128, OUT, bits=4, group_size=64).to(DEVICE)
    torch.manual_seed(1)
    b = fastpeft.QuantLinear(128, OUT, bits=4, group_size=64).to(DEVICE)
    sd = a.state_dict()
    assert set(sd) == {"weight_data", "weight_scale", "weight_zero_point", "bias"}
    b.load_state_dict(sd)
    for key, v in b.state_dict().items():
        assert v.dtype == sd[key].dtype and torch.equal(v, sd[key]), key
    x = make_x(4, 128, torch.float32)
    assert torch.equal(a(x), b(x))


def test_to_keeps_codes_and_float32_scales():
    ql = fastpeft.QuantLinear(64, OUT, bits=8, group_size=32, scheme="absmax")
    ql = ql.to(DEVICE).to(torch.float16)
    assert ql.weight_scale.dtype == torch.float32
    assert ql.weight_zero_point.dtype == torch.int32 and ql.weight_data.dtype == torch.int8
    assert ql.bias.dtype == torch.float16
    x = make_x(3, 64, torch.float16)
    assert_close("fp16 module", ql(x), expected(x, ql.qweight, ql.bias), torch.float16)


@pytest.mark.parametrize("bits,ratio", [(4, 0.25), (8, 0.5)])
def test_memory(bits, ratio):
    ql = fastpeft.QuantLinear(1024, 64, bias=False, bits=bits, group_size=128)
    fp16 = 1024 * 64 * 2
    data = ql.weight_data.numel() * ql.weight_data.element_size()
    total = sum(t.numel() * t.element_size() for t in ql.buffers())
    assert data == fp16 * ratio
    assert total <= fp16 * (ratio + 8 / (2 * 128))  # + 4-byte scale and zero point per 128 weights


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs():
    qw = make_qweight(OUT, 64, 4, "zeropoint", 32, None)
    x = make_x(3, 64, torch.float32)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        fastpeft.quant_linear(x, torch.zeros(OUT, 64))
    with pytest.raises(ValueError, match="features"):
        fastpeft.quant_linear(make_x(3, 32, torch.float32), qw)
    with pytest.raises(TypeError, match="dtypes must match"):
        fastpeft.quant_linear(x, qw, torch.zeros(OUT, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="bias shape"):
        fastpeft.quant_linear(x, qw, torch.zeros(OUT + 1, device=DEVICE))
    with pytest.raises(ValueError, match="one device"):
        fastpeft.quant_linear(x, qw, torch.zeros(OUT, device="meta"))
    with pytest.raises(TypeError, match="dtype"):
        fastpeft.quant_linear(x.to(torch.int32), qw)
    per_col = fastpeft.quantize(torch.randn(OUT, 64), 8, "absmax", axis=1, backend="torch")
    with pytest.raises(ValueError, match="axis=1"):
        fastpeft.quant_linear(x, per_col)
    three_d = fastpeft.quantize(torch.randn(2, OUT, 64), 8, "absmax", group_size=32, backend="torch")
    with pytest.raises(ValueError, match="2-D"):
        fastpeft.quant_linear(x, three_d)
    import dataclasses
    with pytest.raises(ValueError, match="scale shape"):
        fastpeft.quant_linear(x, dataclasses.replace(qw, scale=qw.scale[:, :1]))
    with pytest.raises(ValueError, match="data shape"):
        fastpeft.quant_linear(x, dataclasses.replace(qw, data=qw.data[:, :5]))


def test_group_size_not_power_of_two():
    qw = make_qweight(OUT, 96, 4, "zeropoint", 48, None)
    x = make_x(3, 96, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        fastpeft.quant_linear(x, qw, backend="triton")
    # auto selection falls back to the torch composition
    assert_close("g=48", fastpeft.quant_linear(x, qw), expected(x, qw, None), torch.float32)


def test_module_bad_config():
    with pytest.raises(ValueError, match="bits"):
        fastpeft.QuantLinear(64, 8, bits=3)
    with pytest.raises(ValueError, match="scheme"):
        fastpeft.QuantLinear(64, 8, scheme="minmax")
    with pytest.raises(ValueError, match="does not divide"):
        fastpeft.QuantLinear.from_linear(nn.Linear(96, 8), group_size=64)
    with pytest.raises(TypeError, match="nn.Linear"):
        fastpeft.QuantLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="in_features"):
        fastpeft.QuantLinear(0, 8)
