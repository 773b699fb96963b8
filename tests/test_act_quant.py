"""Int8 activations on the quantized linear layers: dynamic (a scale per token) and static (one
calibrated step per tensor), for quant_linear / QuantLinear (W4A8, W8A8 with any weight scheme)
and int8_linear / Int8Linear (static on the LLM.int8 GEMM).

The reference: x's int8 codes (fastpeft.reference.int8's per-row absmax, or
fastpeft.reference.quant's 8-bit absmax codes with the given step) dequantized in float64,
times the float64 dequantized weight. The kernels run under the interpreter on the CPU, with
every output buffer poisoned (NaN, or -128 for int8 codes: never a code).
"""
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.kernels import quant as kquant
from fastpeft.ops.int8 import quantize_weight
from fastpeft.reference import int8 as ref8
from fastpeft.reference import quant as refq

from _dtypes import case_id, dtype_cases
from _utils import DEVICE, assert_close
from _quant_cases import OUT, _gen, make_qweight, make_x, w_deq64

DTYPES = [torch.float32, torch.float16]
# (in, group_size, axis): one group per interpreter K tile (32), a group over two tiles (64, 128),
# per output row with a partial last tile (70), per tensor
GRANS = [(64, 32, None), (96, 32, None), (256, 64, None), (256, 128, None), (70, None, 0), (64, None, None)]


def static_step(x, frac=0.6):
    """A step that clips the largest |x| (frac < 1): the clamp is exercised."""
    return torch.tensor(float(x.detach().abs().max()) * frac / 127.0, device=x.device)


def x_deq64(x, activations, step):
    """float64 [M, K]: x's int8 codes times their step, as the reference quantizers define them."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    if activations == "dynamic":
        q, rs, _ = ref8.int8_vectorwise_quant(x2.cpu(), 0.0)
        return q.double() * (rs.double() / 127.0)[:, None]
    s = step.cpu()
    q = refq.quantize_codes(x2.cpu(), s, torch.zeros((), dtype=torch.int32), 8, "absmax")
    assert q.abs().max() <= 127
    return q.double() * s.double()


def expected(x, qw, bias, activations, step):
    y = x_deq64(x, activations, step) @ w_deq64(qw).t()
    return y if bias is None else y + bias.detach().cpu().double()


# ---------------------------------------------------------------------------------------------
# the static codes kernel


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
def test_codes_with_scale_equal_reference(poison_outputs, dtype):
    x = make_x(37, 53, dtype)
    x[3, 5] = float("nan")
    for frac in (1.0, 0.3):
        s = static_step(x.nan_to_num(0.0), frac).reshape(1)
        q = kquant.codes_with_scale(x, s)
        want = refq.quantize_codes(x.cpu(), s.cpu().reshape(()), torch.zeros((), dtype=torch.int32), 8, "absmax")
        assert q.dtype == torch.int8
        assert torch.equal(q.cpu().to(torch.int32), want)
        if frac < 1:
            assert (want.abs() == 127).sum() > 10  # clipping happened
    assert q[3, 5] == 0


# ---------------------------------------------------------------------------------------------
# quant_linear with int8 activations


A8_CASES = [(act, bits, scheme, *gran) for act in ("dynamic", "static") for bits in (4, 8)
            for scheme in ("zeropoint", "absmax") for gran in GRANS]
# bf16 on the CPU: each activation mode, bits and scheme; a group per tile, a group over tiles, per row, per tensor
A8_BF16 = [("dynamic", 4, "zeropoint", 64, 32, None), ("static", 8, "absmax", 256, 128, None),
           ("dynamic", 8, "zeropoint", 70, None, 0), ("static", 4, "absmax", 64, None, None)]


@pytest.mark.parametrize("dtype,activations,bits,scheme,K,group_size,axis",  # (the GPU: test_a8_kernel_bf16_gpu)
                         dtype_cases(A8_CASES, A8_BF16, dtypes=DTYPES + [torch.bfloat16], gpu_full=False), ids=case_id)
def test_a8_kernel_matches_reference(poison_outputs, activations, bits, scheme, K, group_size, axis, dtype):
    qw = make_qweight(OUT, K, bits, scheme, group_size, axis)
    bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE, dtype)
    for M in (1, 5, 33):
        x = make_x(M, K, dtype)
        x[-1, :] = 0.0  # an all-zero row: dynamic scale 0, codes 0
        step = static_step(x) if activations == "static" else None
        for b in (bias, None):
            for backend in ("triton", "torch"):
                y = fastpeft.quant_linear(x, qw, b, activations=activations, input_scale=step, backend=backend)
                assert y.dtype == dtype and y.shape == (M, OUT)
                assert_close(f"{backend} M={M} bias={b is not None}", y, expected(x, qw, b, activations, step),
                             dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("activations", ["dynamic", "static"])
@pytest.mark.parametrize("M", [1, 5, 33, 300])
def test_a8_kernel_bf16_gpu(poison_outputs, activations, M):
    """bf16 inputs at the GPU tile configs (M ranges) and larger K (the CPU runs a few bf16 cases above)."""
    for K, g, axis in GRANS + [(1024, 128, None), (1000, None, 0)]:
        for bits, scheme in ((4, "zeropoint"), (4, "absmax"), (8, "zeropoint"), (8, "absmax")):
            qw = make_qweight(OUT, K, bits, scheme, g, axis)
            x = make_x(M, K, torch.bfloat16)
            bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE, torch.bfloat16)
            step = static_step(x) if activations == "static" else None
            y = fastpeft.quant_linear(x, qw, bias, activations=activations, input_scale=step, backend="triton")
            assert_close(f"bf16 {bits} {scheme} {K} {g}", y, expected(x, qw, bias, activations, step),
                         torch.bfloat16)
    w, sw = quantize_weight(torch.randn(OUT, 1000, generator=_gen(1)).to(DEVICE) / 1000 ** 0.5)
    x = make_x(M, 1000, torch.bfloat16)
    step = static_step(x)
    want = x_deq64(x, "static", step) @ ref8.dequantize_weight(w.cpu(), sw.cpu()).double().t()
    assert_close("int8_linear static bf16", fastpeft.int8_linear(x, w, sw, None, 0.0, input_scale=step,
                                                                 backend="triton"), want, torch.bfloat16)


def test_a8_8bit_zeropoint_extreme_codes(poison_outputs):
    """8-bit zero-point codes 0 and 255 with zero points 0 / 255 (q - 128 and the (z - 128) sum
    correction at their ends) are exact in the int32 accumulator."""
    K = 64
    w = torch.randn(OUT, K, generator=_gen(3))
    w[1] = w[1].abs() + 0.1  # all positive: zero point 0
    w[2] = -w[2].abs() - 0.1  # all negative: zero point 255
    qw = fastpeft.quantize(w.to(DEVICE), 8, "zeropoint", axis=0, backend="torch")
    assert qw.zero_point[1] == 0 and qw.zero_point[2] == 255
    x = make_x(9, K, torch.float32)
    x[0] = x[0].abs().max()  # a row of equal entries: every code 127
    y = fastpeft.quant_linear(x, qw, activations="dynamic", backend="triton")
    assert_close("extremes", y, expected(x, qw, None, "dynamic", None), torch.float32)


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_a8_leading_dims_strides_and_grads(poison_outputs, activations):
    qw = make_qweight(OUT, 64, 4, "zeropoint", 32, None)
    big = make_x(2 * 3 * 5, 128, torch.float32).reshape(2, 3, 5, 128)
    x = big[:, :, :, ::2].clone().requires_grad_(True)
    xs = big[:, :, :, ::2]  # non-unit last stride
    step = static_step(xs) if activations == "static" else None
    y = fastpeft.quant_linear(xs, qw, activations=activations, input_scale=step, backend="triton")
    assert y.shape == (2, 3, 5, OUT)
    assert_close("strided", y.reshape(-1, OUT), expected(xs, qw, None, activations, step), torch.float32)
    # backward: the straight-through estimator, dx = dy @ W_deq
    bias = torch.randn(OUT, generator=_gen(4)).to(DEVICE).requires_grad_(True)
    dy = torch.randn(2, 3, 5, OUT, generator=_gen(8)).to(DEVICE)
    fastpeft.quant_linear(x, qw, bias, activations=activations, input_scale=step, backend="triton").backward(dy)
    assert_close("dx", x.grad.reshape(-1, 64), dy.reshape(-1, OUT).double().cpu() @ w_deq64(qw), torch.float32)
    assert_close("dbias", bias.grad, dy.reshape(-1, OUT).double().sum(0), torch.float32)


def test_a8_group_fallback_and_errors():
    qw16 = make_qweight(OUT, 64, 4, "zeropoint", 16, None)  # groups of 16: no int8 kernel
    x = make_x(3, 64, torch.float32)
    y = fastpeft.quant_linear(x, qw16, activations="dynamic")  # auto: the torch composition
    assert_close("g16", y, expected(x, qw16, None, "dynamic", None), torch.float32)
    with pytest.raises(ValueError, match=r"\[32, 1024\]"):
        fastpeft.quant_linear(x, qw16, activations="dynamic", backend="triton")
    qw = make_qweight(OUT, 64, 4, "zeropoint", 32, None)
    with pytest.raises(ValueError, match="activations"):
        fastpeft.quant_linear(x, qw, activations="int8")
    with pytest.raises(ValueError, match="needs input_scale"):
        fastpeft.quant_linear(x, qw, activations="static")
    with pytest.raises(ValueError, match="only used with"):
        fastpeft.quant_linear(x, qw, activations="dynamic", input_scale=torch.tensor(0.1))
    with pytest.raises(ValueError, match="one value"):
        fastpeft.quant_linear(x, qw, activations="static", input_scale=torch.ones(2))
    with pytest.raises(TypeError, match="float32"):
        fastpeft.quant_linear(x, qw, activations="static", input_scale=torch.tensor(1, dtype=torch.int32))
    y = fastpeft.quant_linear(torch.zeros(0, 64), qw, activations="dynamic")
    assert y.shape == (0, OUT)


# ---------------------------------------------------------------------------------------------
# int8_linear with a static activation step


@pytest.mark.parametrize("dtype,M,K,N", dtype_cases([(1, 64, 40), (5, 96, 33), (33, 200, 70)], [(5, 96, 33)],
                                                  dtypes=DTYPES + [torch.bfloat16], gpu_full=False), ids=case_id)
def test_int8_linear_static_matches_reference(poison_outputs, M, K, N, dtype):
    x = make_x(M, K, dtype)
    w, sw = quantize_weight(torch.randn(N, K, generator=_gen(M + K)).to(DEVICE) / K ** 0.5)
    bias = torch.randn(N, generator=_gen(5)).to(DEVICE, dtype)
    step = static_step(x)
    want = x_deq64(x, "static", step) @ ref8.dequantize_weight(w.cpu(), sw.cpu()).double().t() + bias.cpu().double()
    for backend in ("triton", "torch"):
        y = fastpeft.int8_linear(x, w, sw, bias, threshold=0.0, input_scale=step, backend=backend)
        assert y.dtype == dtype
        assert_close(backend, y, want, dtype)


def test_int8_linear_static_errors():
    x = make_x(3, 64, torch.float32)
    w, sw = quantize_weight(torch.randn(8, 64))
    with pytest.raises(ValueError, match="threshold=0"):
        fastpeft.int8_linear(x, w, sw, threshold=6.0, input_scale=torch.tensor(0.1))
    with pytest.raises(ValueError, match="one value"):
        fastpeft.int8_linear(x, w, sw, threshold=0.0, input_scale=torch.ones(3))
    with pytest.raises(fastpeft.BackendUnavailableError, match="cuda"):
        fastpeft.int8_linear(x, w, sw, threshold=0.0, input_scale=torch.tensor(0.1), backend="cuda")


# ---------------------------------------------------------------------------------------------
# modules


@pytest.mark.parametrize("activations", [None, "dynamic", "static"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantlinear_activation_modes(poison_outputs, bits, activations):
    lin = nn.Linear(128, OUT).to(DEVICE)
    x = make_x(7, 128, torch.float32)
    step = static_step(x, 1.0) if activations == "static" else None
    m = fastpeft.QuantLinear.from_linear(lin, bits=bits, group_size=64, activations=activations, input_scale=step)
    assert m.activations == activations and (m.input_scale is None) == (activations != "static")
    y = m(x)
    assert_close("module", y, expected(x, m.qweight, lin.bias, activations, step) if activations else
                 x.double().cpu() @ w_deq64(m.qweight).t() + lin.bias.detach().double().cpu(), torch.float32)
    # state_dict round trip (the step is a float32 buffer, kept under a bf16 cast)
    m2 = fastpeft.QuantLinear(128, OUT, bits=bits, group_size=64, activations=activations,
                              input_scale=None if step is None else 1.0)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), y)
    if step is not None:
        assert m.to(torch.bfloat16).input_scale.dtype == torch.float32
    # from_quantized over the same codes is the same layer
    m3 = fastpeft.QuantLinear.from_quantized(m.qweight, lin.bias, activations=activations, input_scale=step)
    assert torch.equal(m3(x), y)


def test_quantlinear_activation_config_errors():
    lin = nn.Linear(64, 8)
    with pytest.raises(ValueError, match="needs input_scale"):
        fastpeft.QuantLinear.from_linear(lin, activations="static")
    with pytest.raises(ValueError, match="only used with"):
        fastpeft.QuantLinear.from_linear(lin, activations="dynamic", input_scale=0.1)
    with pytest.raises(ValueError, match="activations"):
        fastpeft.QuantLinear(64, 8, activations="per-token")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="input_scale"):
            fastpeft.QuantLinear.from_linear(lin, activations="static", input_scale=bad)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        fastpeft.QuantLinear.from_quantized(lin.weight)
    qt = fastpeft.quantize(torch.randn(8, 64), 4, "zeropoint", axis=1)
    with pytest.raises(ValueError, match="axis=1"):
        fastpeft.QuantLinear.from_quantized(qt)


def test_int8linear_static_module(poison_outputs):
    lin = nn.Linear(96, OUT).to(DEVICE)
    x = make_x(6, 96, torch.float32)
    step = static_step(x)
    m = fastpeft.Int8Linear.from_linear(lin, threshold=0.0, input_scale=step)
    want = x_deq64(x, "static", step) @ m.dequantized_weight().double().cpu().t() + lin.bias.detach().double().cpu()
    assert_close("Int8Linear static", m(x), want, torch.float32)
    assert "input_scale" in m.state_dict()
    m2 = fastpeft.Int8Linear(96, OUT, threshold=0.0, input_scale=1.0)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), m(x))
    assert "input_scale" not in fastpeft.Int8Linear.from_linear(lin, threshold=0.0).state_dict()
    with pytest.raises(ValueError, match="threshold=0"):
        fastpeft.Int8Linear.from_linear(lin, input_scale=step)
