"""fastpeft.quant_linear / fastpeft.QuantLinear (weight-only W8A16 / W4A16) against float64.

The reference is x @ W_deq^T + bias in float64, W_deq from fastpeft/reference/quant.py's
dequantize of the same codes. The triton kernel runs under TRITON_INTERPRET=1 on the CPU
(fp32 and fp16; bf16 on a subset of the cases), with its output buffers poisoned with NaN.
"""
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.kernels import qlinear as k

from _dtypes import case_id, dtype_cases
from _quant_cases import OUT, _gen, expected, make_qweight, make_x, w_deq64
from _utils import DEVICE, assert_close

DTYPES = [torch.float32, torch.float16]
# (in, group_size, axis): groups of 32 (two per interpreter K tile, a partial last tile at
# in=96), one group per tile (64), a group spanning tiles (128), per output row at odd in, and
# per tensor
GRANS = [(64, 32, None), (96, 32, None), (256, 64, None), (256, 128, None), (70, None, 0), (64, None, None)]


# ---------------------------------------------------------------------------------------------
# forward


FORWARD_CASES = [(bits, scheme, *gran) for bits in (4, 8) for scheme in ("zeropoint", "absmax") for gran in GRANS]
# bf16 on the CPU: each bits and scheme; two groups per tile (partial last tile), a group over tiles, per row,
# per tensor
FORWARD_BF16 = [(4, "zeropoint", 96, 32, None), (8, "absmax", 256, 128, None), (4, "absmax", 70, None, 0),
                (8, "zeropoint", 64, None, None)]


@pytest.mark.parametrize("dtype,bits,scheme,K,group_size,axis",  # (the GPU: test_kernel_bf16_gpu too)
                         dtype_cases(FORWARD_CASES, FORWARD_BF16, dtypes=DTYPES + [torch.bfloat16], gpu_full=False),
                         ids=case_id)
def test_kernel_forward(poison_outputs, bits, scheme, K, group_size, axis, dtype):
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
def test_leading_dims_and_strides(poison_outputs, backend):
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
def test_kernel_bf16_gpu(poison_outputs, bits, M):
    for K, g, axis in GRANS:
        for scheme in ("zeropoint", "absmax"):
            qw = make_qweight(OUT, K, bits, scheme, g, axis)
            x = make_x(M, K, torch.bfloat16)
            bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE, torch.bfloat16)
            y = fastpeft.quant_linear(x, qw, bias, backend="triton")
            assert_close(f"bf16 {scheme} {K} {g}", y, expected(x, qw, bias), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# backward


GRAD_CASES = [(4, "zeropoint", 96, 32, None), (8, "absmax", 64, 64, None), (4, "absmax", 70, None, 0)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,bits,scheme,K,group_size,axis",
                         dtype_cases(GRAD_CASES, GRAD_CASES[:2], dtypes=DTYPES + [torch.bfloat16]), ids=case_id)
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


# the backward's kernel (kernels/qlinear.py ``_qlinear_dx_kernel``: dx = dy @ W_deq, the weight never
# materialized): every bits, scheme and granularity (K = 96: groups of 32 past the last K tile;
# 256 with groups of 128: a group over two tiles; per row at odd K; per tensor), N = 40 (two N
# tiles, the second partial), M = 1 and 33 (three M tiles); fp32 every case, fp16 and bf16 four
@pytest.mark.parametrize("dtype,bits,scheme,K,group_size,axis",
                         [(torch.float32, *c) for c in FORWARD_CASES]
                         + [(d, *c) for d in (torch.float16, torch.bfloat16) for c in FORWARD_BF16], ids=case_id)
def test_kernel_grad_input(poison_outputs, monkeypatch, bits, scheme, K, group_size, axis, dtype):
    qw = make_qweight(OUT, K, bits, scheme, group_size, axis)
    calls = []
    launch = k.quant_linear_dx
    monkeypatch.setattr(k, "quant_linear_dx", lambda *a, **kw: (calls.append(a[0].shape), launch(*a, **kw))[1])
    for M in (1, 33):
        x = make_x(M, K, dtype).requires_grad_(True)
        dy = torch.randn(OUT, M, generator=_gen(9 + M)).to(DEVICE, dtype).t()  # a transposed view: strided rows
        fastpeft.quant_linear(x, qw, backend="triton").backward(dy)
        assert x.grad.dtype == dtype and calls[-1] == (M, OUT)
        assert_close(f"dx M={M}", x.grad, dy.cpu().double() @ w_deq64(qw), dtype)
    assert len(calls) == 2


def test_grad_input_double_backward_and_torch_fallback(monkeypatch):
    """Under create_graph dx is recorded (dequantize and a matmul: differentiable in dy), not the
    kernel; a group size the kernel does not take (48) falls back to dequantize and a matmul."""
    calls = []
    launch = k.quant_linear_dx
    monkeypatch.setattr(k, "quant_linear_dx", lambda *a, **kw: (calls.append(1), launch(*a, **kw))[1])
    qw = make_qweight(OUT, 64, 4, "zeropoint", 32, None)
    x = make_x(3, 64, torch.float32).requires_grad_(True)
    dy = torch.randn(3, OUT, generator=_gen(3)).to(DEVICE).requires_grad_(True)
    (dx,) = torch.autograd.grad(fastpeft.quant_linear(x, qw, backend="triton"), x, dy, create_graph=True)
    assert calls == [] and dx.requires_grad
    (ddy,) = torch.autograd.grad(dx.sum(), dy)
    assert_close("d(dx)/d(dy)", ddy, w_deq64(qw).sum(1).expand(3, OUT), torch.float32)
    q48 = make_qweight(OUT, 96, 4, "zeropoint", 48, None)
    x48 = make_x(3, 96, torch.float32).requires_grad_(True)
    fastpeft.quant_linear(x48, q48).backward(dy.detach())  # auto: triton where the interpreter runs
    assert calls == [] and x48.grad is not None
    assert_close("dx g=48", x48.grad, dy.detach().double() @ w_deq64(q48), torch.float32)


# ---------------------------------------------------------------------------------------------
# the module


@pytest.mark.parametrize("bits,group_size,scheme,tol", [(4, 32, "zeropoint", 0.15), (4, None, "absmax", 0.3),
                                                        (8, 64, "zeropoint", 0.01), (8, 128, "absmax", 0.02)])
def test_from_linear_close_to_fp32(poison_outputs, bits, group_size, scheme, tol):
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
    with pytest.raises(ValueError, match="qweight.scale has shape"):
        fastpeft.quant_linear(x, dataclasses.replace(qw, scale=qw.scale[:, :1]))
    with pytest.raises(ValueError, match="qweight.data has shape"):
        fastpeft.quant_linear(x, dataclasses.replace(qw, data=qw.data[:, :5]))
    for bad in (qw.data.float(), qw.data.to(torch.int32)):  # codes of another dtype: not codes
        with pytest.raises(TypeError, match="qweight.data has dtype"):
            fastpeft.quant_linear(x, dataclasses.replace(qw, data=bad))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_registered_ops_check_the_quant_state(backend):
    """torch.ops.fastpeft.quant_linear and quant_linear_grad_input are public too: a quant state that
    does not match the codes (the kernels index scales, zero points and bias by the codes' shape)
    fails with the field named, in the kernel and in the fake (torch.compile) alike."""
    if backend == "triton" and not fastpeft._backend.interpreter_active() and DEVICE == "cpu":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    qw = make_qweight(OUT, 64, 4, "zeropoint", 32, None)
    x, dy = make_x(3, 64, torch.float32), make_x(3, OUT, torch.float32)
    op, grad = torch.ops.fastpeft.quant_linear, torch.ops.fastpeft.quant_linear_grad_input
    w = (qw.data, qw.scale, qw.zero_point, 4, "zeropoint", None, 32)
    for run in (lambda f: f(), lambda f: torch.compile(f, backend="aot_eager", fullgraph=True)()):
        with pytest.raises(Exception, match="scale has shape"):
            run(lambda: op(x, qw.data, qw.scale[:, :1], qw.zero_point, 4, "zeropoint", None, 32, None, None, None,
                           backend))
        with pytest.raises(Exception, match="zero_point has shape"):
            run(lambda: grad(dy, qw.data, qw.scale, qw.zero_point[:2], 4, "zeropoint", None, 32, 64, backend))
        with pytest.raises(Exception, match="bias shape"):
            run(lambda: op(x, *w, torch.zeros(OUT + 1, device=DEVICE), None, None, backend))
        with pytest.raises(Exception, match="data has shape"):  # in_features the codes do not hold
            run(lambda: grad(dy, *w, 128, backend))
    with pytest.raises(ValueError, match="input_scale"):
        op(x, *w, None, "static", None, backend)


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


# ---------------------------------------------------------------------------------------------
# decode: the GEMV / split-K path (kernels/qlinear.py, _qlinear_gemv_kernel)


class _Spy:
    """Stands in for a JIT kernel: records each launch's grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


class _Forbidden:
    def __getitem__(self, grid):
        raise AssertionError("the GEMM kernel ran where the decode path was forced")


@pytest.fixture
def gemv(monkeypatch):
    """Forces the decode path for M <= 4 (the GEMM kernel may not run), spies on its launches;
    ``gemv.split(s)`` forces SPLIT_K = s (capped at the number of K tiles by the config)."""
    class State:
        pass
    st = State()
    st.kernel = _Spy(k._qlinear_gemv_kernel)
    st.reduce = _Spy(k._qlinear_splitk_sum_kernel)
    monkeypatch.setattr(k, "GEMV_MAX_M", 4)
    monkeypatch.setattr(k, "_qlinear_kernel", _Forbidden())
    monkeypatch.setattr(k, "_qlinear_gemv_kernel", st.kernel)
    monkeypatch.setattr(k, "_qlinear_splitk_sum_kernel", st.reduce)
    st.split = lambda s: monkeypatch.setattr(k, "_gemv_split_k", lambda n_tiles, k_tiles, device: s)
    return st


GEMV_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot: bf16 runs in the interpreter too
# GRANS plus K = 72 per row: whole int32 words of codes with a partial K tile (K = 70: bytes)
GEMV_GRANS = GRANS + [(72, None, 0)]


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@pytest.mark.parametrize("K,group_size,axis", GEMV_GRANS)
@pytest.mark.parametrize("scheme", ["zeropoint", "absmax"])
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_forward(poison_outputs, gemv, bits, scheme, K, group_size, axis, dtype):
    """M in 1..4 (M = 3: a masked row of the 4-row block), SPLIT_K 1, 2 and 3 (a K range of one
    partial tile at K = 70 and 72, of two tiles at K = 256 with 3 splits), bias or not."""
    qw = make_qweight(OUT, K, bits, scheme, group_size, axis)
    bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE, dtype)
    k_tiles = -(-K // 64)
    for M, split, b in ((1, 1, bias), (2, 2, None), (3, 3, bias), (4, 2, bias)):
        gemv.split(split)
        x = make_x(M, K, dtype)
        y = fastpeft.quant_linear(x, qw, b, backend="triton")
        assert y.dtype == dtype and y.shape == (M, OUT)
        assert_close(f"gemv M={M} split={split} bias={b is not None}", y, expected(x, qw, b), dtype)
        want = min(split, k_tiles)
        want = -(-K // (-(-k_tiles // want) * 64))  # whole K tiles per split
        assert gemv.kernel.grids[-1] == (-(-OUT // 16), want)
        assert len(gemv.reduce.grids) == sum(1 for g in gemv.kernel.grids if g[1] > 1)


@pytest.mark.parametrize("bits,scheme,group_size", [(4, "zeropoint", 64), (8, "absmax", None), (4, "absmax", 32)])
def test_gemv_split_k_sums_every_partial_once(poison_outputs, gemv, bits, scheme, group_size):
    """4 splits of one K tile each: x nonzero in one tile at a time must give that tile's
    product (no partial dropped or doubled), and x = 0 gives exactly the bias (added once,
    after the sum of the splits)."""
    K = 256
    qw = make_qweight(OUT, K, bits, scheme, group_size, 0 if group_size is None else None)
    bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE, torch.float32)
    gemv.split(4)
    for t in range(4):
        x = make_x(1, K, torch.float32)
        x[:, :64 * t] = 0
        x[:, 64 * (t + 1):] = 0
        y = fastpeft.quant_linear(x, qw, bias, backend="triton")
        assert_close(f"only tile {t}", y, expected(x, qw, bias), torch.float32)
        y0 = fastpeft.quant_linear(x, qw, None, backend="triton")
        assert_close(f"only tile {t}, no bias", y0, expected(x, qw, None), torch.float32)
    assert gemv.kernel.grids[-1][1] == 4 and len(gemv.reduce.grids) == 8
    zero = torch.zeros(2, K, device=DEVICE)
    assert torch.equal(fastpeft.quant_linear(zero, qw, bias, backend="triton"), bias.expand(2, OUT))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_strided_x_and_unaligned_codes(poison_outputs, gemv, dtype):
    """x rows with a row stride other than K and an odd offset (passed through as they are), x
    with a non-unit last stride (made contiguous by fastpeft.ops), and codes whose rows are not
    whole aligned int32 words (the kernel reads them as bytes)."""
    K = 96
    qw = make_qweight(OUT, K, 4, "zeropoint", 32, None)
    big = make_x(8, 3 * K, dtype)
    for split in (1, 2):
        gemv.split(split)
        for M in (1, 2, 3):
            x = big[: 2 * M : 2, 5 : 5 + K]  # row stride 3 K, storage offset 5
            assert x.stride() == (6 * K, 1)
            assert_close(f"rows M={M}", fastpeft.quant_linear(x, qw, backend="triton"), expected(x, qw, None),
                         dtype)
            xs = big[:M, : 2 * K : 2]  # last stride 2
            assert_close(f"cols M={M}", fastpeft.quant_linear(xs, qw, backend="triton"), expected(xs, qw, None),
                         dtype)
    import dataclasses
    kp = qw.data.shape[1]
    padded = torch.zeros(OUT, kp + 5, dtype=qw.data.dtype, device=DEVICE)
    padded[:, 1 : 1 + kp] = qw.data
    odd = dataclasses.replace(qw, data=padded[:, 1 : 1 + kp])  # row stride kp + 5, offset 1: bytes
    assert k._code_units(odd.data)[1] is False and k._code_units(qw.data)[1] is True
    x = make_x(2, K, dtype)
    assert_close("byte-read codes", fastpeft.quant_linear(x, odd, backend="triton"), expected(x, qw, None), dtype)


def test_gemv_dispatch(monkeypatch):
    """M <= GEMV_MAX_M takes the decode path, larger M the GEMM kernel."""
    spies = {name: _Spy(getattr(k, name)) for name in ("_qlinear_gemv_kernel", "_qlinear_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(k, name, spy)
    qw = make_qweight(OUT, 64, 4, "zeropoint", 32, None)
    for M in range(1, k.GEMV_MAX_M + 2):
        fastpeft.quant_linear(make_x(M, 64, torch.float32), qw, backend="triton")
    assert len(spies["_qlinear_gemv_kernel"].grids) == k.GEMV_MAX_M
    assert len(spies["_qlinear_kernel"].grids) == 1


def test_gemv_gpu_config(monkeypatch):
    """The GPU tiles and split heuristic (no kernel runs): one group per tile for groups of 128
    and 256, >= 2 programs per SM, whole K tiles per split, every K covered."""
    monkeypatch.setattr(k, "_interpreted", lambda: False)
    from fastpeft.kernels import _common
    monkeypatch.setattr(_common, "sm_count", lambda device: 132)
    cases = {  # (bits, N, K, group_size): (BLOCK_N, BLOCK_K, SPLIT_K)
        (4, 11008, 4096, None): (16, 512, 1), (4, 11008, 4096, 128): (64, 128, 2),
        (8, 11008, 4096, None): (16, 512, 1), (8, 11008, 4096, 128): (32, 128, 1),
        (4, 4096, 11008, None): (16, 512, 2), (4, 4096, 11008, 128): (64, 128, 8),
        (8, 4096, 11008, 128): (32, 128, 4), (4, 4096, 4096, 256): (32, 256, 4), (8, 4096, 4096, 256): (16, 256, 2),
        (4, 4096, 4096, 32): (16, 512, 2), (4, 11008, 4096, 1024): (16, 512, 1), (4, 512, 512, 128): (64, 128, 2),
        (8, 8, 100, None): (16, 512, 1),
    }
    for (bits, N, K, g), (bn, bk, split) in cases.items():
        cfg = k._gemv_config(1, N, K, bits, g, torch.device("cpu"))
        assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]) == (bn, bk, split), (bits, N, K, g, cfg)
        ks = cfg["K_SPLIT"]
        assert ks % bk == 0 and (cfg["SPLIT_K"] - 1) * ks < K <= cfg["SPLIT_K"] * ks
        assert g is None or g < 128 or g % bk == 0  # a tile never straddles two groups' scales
        programs = -(-N // bn) * cfg["SPLIT_K"]
        assert programs >= 2 * 132 or cfg["K_SPLIT"] < 4 * bk, (N, K, g, programs)
    assert k._gemv_config(3, 4096, 4096, 4, None, torch.device("cpu"))["BLOCK_M"] == 4


# ---------------------------------------------------------------------------------------------
# Hopper variants: the pipelined decode loop, the int8-activation kernel's int32 accumulator


class _KwargSpy:
    """Stands in for a JIT kernel: records the chosen constexprs of each launch, then launches."""

    def __init__(self, kernel, names):
        self.kernel, self.names, self.seen = kernel, names, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(tuple(kwargs[n] for n in self.names))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_gemv_pipelines_whole_words_and_prefetches_bytes(poison_outputs, monkeypatch):
    """Codes in whole int32 words (K = 72 at 8 bits) take the software-pipelined loop (NUM_STAGES
    = GEMV_STAGES), bytes (K = 70) the register-prefetch loop (NUM_STAGES 1); both give the
    reference's result."""
    spy = _KwargSpy(k._qlinear_gemv_kernel, ("WORDS", "NUM_STAGES"))
    monkeypatch.setattr(k, "_qlinear_gemv_kernel", spy)
    for K in (72, 70):
        qw = make_qweight(OUT, K, 8, "absmax", None, 0)
        x = make_x(2, K, torch.float16)
        assert_close(f"gemv K={K}", fastpeft.quant_linear(x, qw, backend="triton"), expected(x, qw, None),
                     torch.float16)
    assert spy.seen == [(True, k.GEMV_STAGES), (False, 1)]


def test_a8_int32_chain_bound():
    """One int32 accumulator over K while K * 127 * max|weight operand| < 2**31."""
    for bits, scheme, k_max in ((4, "zeropoint", 1127288), (8, "absmax", 133144), (8, "zeropoint", 66311)):
        assert k._a8_chain_exact(k_max, bits, scheme) and not k._a8_chain_exact(k_max + 1, bits, scheme)


@pytest.mark.parametrize("bits,scheme", [(4, "zeropoint"), (8, "absmax"), (8, "zeropoint")])
def test_a8_per_row_tile_sums_without_chain(poison_outputs, monkeypatch, bits, scheme):
    """Per-row scales where one int32 accumulator could overflow (forced here by a zero limit):
    each K tile's int32 dot is summed in fp32, as with groups. Both ways match the reference."""
    from fastpeft.reference import int8 as ref8
    spy = _KwargSpy(k._qlinear_a8_kernel, ("CHAIN",))
    monkeypatch.setattr(k, "_qlinear_a8_kernel", spy)
    K = 70
    qw = make_qweight(OUT, K, bits, scheme, None, 0)
    x = make_x(33, K, torch.float32)
    bias = torch.randn(OUT, generator=_gen(5)).to(DEVICE)
    q, rs, _ = ref8.int8_vectorwise_quant(x.cpu(), 0.0)
    want = (q.double() * (rs.double() / 127.0)[:, None]) @ w_deq64(qw).t() + bias.cpu().double()
    for limit in (k.A8_CHAIN_LIMIT, 0):
        monkeypatch.setattr(k, "A8_CHAIN_LIMIT", limit)
        y = fastpeft.quant_linear(x, qw, bias, activations="dynamic", backend="triton")
        assert_close(f"limit {limit}", y, want, torch.float32)
    assert spy.seen == [(True,), (False,)]

