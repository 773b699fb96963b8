"""fastpeft.kernels.quant (Triton) launchers against fastpeft/reference/quant.py.

Runs under TRITON_INTERPRET=1 on the CPU and for real on a GPU. Codes (packed or not), scales
and zero points must EQUAL the reference's; dequantize must equal the reference's
``dequantize`` (fp32 ``dequantize_codes``, saturated, cast to the output dtype), the edges of the
float32 range included. Every output buffer starts poisoned.
"""
import pytest
import torch

from fastpeft.kernels import quant as k
from fastpeft.reference import quant as ref

from _utils import DEVICE

pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
              pytest.mark.usefixtures("poison_outputs")]  # numpy NaN/inf in the interpreter
SCHEMES = ["absmax", "zeropoint"]
BITS = [8, 4]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_x(shape, dtype, seed=0, shift=0.3):
    x = torch.randn(shape, generator=_gen(seed + sum(shape)), dtype=torch.float64) * 2.0 + shift
    return x.to(DEVICE, dtype)


def reference(x, bits, scheme, axis, gs):
    xc = x.cpu()
    rs, rz = ref.compute_qparams(xc, bits, scheme, axis, gs)
    q = ref.quantize_codes(xc, rs, rz, bits, scheme, axis, gs)
    if bits == 8:
        data = q.to(torch.int8 if scheme == "absmax" else torch.uint8)
    else:
        data = ref.pack4(q)
    return data, rs, rz, q


def check(x, bits, scheme, axis=None, gs=None, out_dtypes=None):
    data, scale, zp = k.quantize(x, bits, scheme, axis, gs)
    rdata, rs, rz, q = reference(x, bits, scheme, axis, gs)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert scale.shape == rs.shape == tuple(ref.slot_shape(x.shape, axis, gs)) and zp.shape == rz.shape
    assert data.dtype == rdata.dtype and data.shape == rdata.shape
    assert torch.equal(scale.cpu().nan_to_num(nan=-1.0), rs.nan_to_num(nan=-1.0)), "scale"
    assert torch.equal(zp.cpu(), rz), "zero_point"
    assert torch.equal(data.cpu(), rdata), "codes"
    for dt in out_dtypes or (x.dtype,):
        y = k.dequantize(data, scale, zp, bits, scheme, axis, gs, x.shape, dt)
        ry = ref.dequantize(q, rs, rz, axis, gs, dt)
        assert y.dtype == dt and y.shape == x.shape
        assert torch.equal(y.cpu().nan_to_num(nan=1234.0), ry.nan_to_num(nan=1234.0)), "dequantize"
    return data, scale, zp


GRANULARITIES = [  # (shape, axis, group_size)
    ((7, 33), None, None),
    ((130,), None, None),        # 1-D, several splits in the interpreter
    ((9, 21), 0, None),
    ((9, 21), 1, None),           # axis = last dim
    ((3, 5, 7), 1, None),         # middle axis
    ((3, 5, 7), 2, None),
    ((3, 5, 7), 0, None),
    ((5, 32), None, 16),
    ((3, 64), None, 32),
    ((2, 3, 96), None, 32),
    ((4, 96), None, 16),
    ((3, 33), None, 11),          # odd groups: the 4-bit path goes through stats + codes kernels
    ((2, 5), None, 5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("gran", GRANULARITIES, ids=lambda g: f"{'x'.join(map(str, g[0]))}-a{g[1]}-g{g[2]}")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_matches_reference(bits, scheme, gran, dtype):
    shape, axis, gs = gran
    check(make_x(shape, dtype), bits, scheme, axis, gs)


@pytest.mark.parametrize("gran", [((7, 33), None, None), ((9, 21), 1, None), ((3, 64), None, 32),
                                  ((3, 5, 7), 1, None)], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_bf16(bits, scheme, gran):
    shape, axis, gs = gran
    check(make_x(shape, torch.bfloat16), bits, scheme, axis, gs,
          out_dtypes=(torch.bfloat16, torch.float32, torch.float16))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_out_dtypes(bits, scheme):
    check(make_x((6, 32), torch.float32), bits, scheme, None, 16,
          out_dtypes=(torch.float32, torch.float16, torch.bfloat16))


@pytest.mark.parametrize("gran", [((1,), None, None), ((1,), 0, None), ((1, 1), 1, None), ((1, 2), None, 1),
                                  ((1, 1, 1), 1, None), ((3, 1), None, 1), ((2, 67), None, None),
                                  ((67, 3), 1, None), ((2, 131), 0, None)], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_awkward_sizes(bits, scheme, gran):
    shape, axis, gs = gran
    check(make_x(shape, torch.float32, shift=-0.7), bits, scheme, axis, gs)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_rounds_ties_to_even(bits, scheme):
    qmax = ref.qrange(bits, scheme)[1]
    # absmax: slot max 2 * qmax -> inv = 1/2: odd integers land on .5 ties
    odd = torch.arange(-2 * qmax + 1, 2 * qmax, 2, dtype=torch.float32)
    x = torch.cat([odd, torch.tensor([2.0 * qmax])]).to(DEVICE)
    check(x.reshape(1, -1), bits, scheme, 0)


@pytest.mark.parametrize("gran", [((4, 32), None, 16), ((4, 32), 0, None), ((4, 32), 1, None),
                                  ((4, 6), None, 3), ((3, 4, 6), 1, None)], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_special_slots(bits, scheme, gran):
    """A NaN slot gets scale NaN and codes 0 and spares the others; an all-zero slot scale 1;
    a constant slot a nonzero finite scale and exact round trip of the constant."""
    shape, axis, gs = gran
    x = make_x(shape, torch.float32).cpu()
    s = ref.slot_view(x, axis, gs).clone()
    s[0, 1] = float("nan")
    s[1] = 0.0
    s[2] = -1.25
    if axis is None and gs is None:
        x = s.reshape(shape)
    elif gs is not None:
        x = s.reshape(shape)
    else:
        moved = list(x.movedim(axis, 0).shape)
        x = s.reshape(moved).movedim(0, axis).contiguous()
    data, scale, zp = check(x.to(DEVICE), bits, scheme, axis, gs)
    flat_scale = scale.cpu().reshape(-1)
    assert torch.isnan(flat_scale[0]) and not torch.isnan(flat_scale[1:]).any()
    assert flat_scale[1] == 1.0
    assert 0 < flat_scale[2] < float("inf")
    y = k.dequantize(data, scale, zp, bits, scheme, axis, gs, x.shape, torch.float32).cpu()
    ys = ref.slot_view(y, axis, gs)
    assert torch.equal(ys[1], torch.zeros_like(ys[1]))
    assert torch.equal(ys[2], torch.full_like(ys[2], -1.25))
    assert torch.isnan(ys[0]).all() and not torch.isnan(ys[1:]).any()


def test_nan_slot_codes_are_zero():
    x = torch.tensor([[1.0, float("nan"), 3.0, -2.0], [1.0, 2.0, 3.0, 4.0]], device=DEVICE)
    for bits in BITS:
        for scheme in SCHEMES:
            data, scale, zp = check(x, bits, scheme, 0)
            codes = data[0] if bits == 8 else data[0]
            assert (codes.cpu() == 0).all() and zp[0] == 0


@pytest.mark.parametrize("gran", [((0,), None, None), ((0, 4), 1, None), ((3, 0), 0, None), ((0, 32), None, 16),
                                  ((2, 0, 5), None, None)], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_empty(bits, scheme, gran):
    shape, axis, gs = gran
    x = torch.zeros(shape, device=DEVICE)
    data, scale, zp = k.quantize(x, bits, scheme, axis, gs)
    assert data.shape == (shape if bits == 8 else (*shape[:-1], (shape[-1] + 1) // 2))
    assert scale.shape == zp.shape == tuple(ref.slot_shape(x.shape, axis, gs))
    assert (scale == 1).all() and (zp == 0).all()
    y = k.dequantize(data, scale, zp, bits, scheme, axis, gs, shape, torch.float16)
    assert y.shape == shape and y.dtype == torch.float16


def test_full_code_range_and_exact_zero():
    x = make_x((4, 64), torch.float32)
    x[:, 5] = 0.0
    for bits in BITS:
        for scheme in SCHEMES:
            data, scale, zp = check(x, bits, scheme, None, 32)
            q = data.cpu().to(torch.int32) if bits == 8 else ref.unpack4(data.cpu(), 64, scheme == "absmax")
            lo, hi = ref.qrange(bits, scheme)
            if scheme == "zeropoint":
                assert q.min() == lo and q.max() == hi
            else:
                assert torch.maximum(q.min().abs(), q.max().abs()) == hi
            y = k.dequantize(data, scale, zp, bits, scheme, None, 32, x.shape, torch.float32).cpu()
            assert (y[:, 5] == 0).all()
            s = scale.cpu().repeat_interleave(32, dim=-1)
            assert ((y - x.cpu()).abs() <= s / 2 * (1 + 1e-6)).all()


EDGE_ROWS = {  # name -> (dtype, a [4, 6] tensor's rows: each a slot with axis=0)
    "float32-range": (torch.float32, [[-3e38, 3e38, 0.0, 1.0, -1.0, 2e38],             # hi - lo overflows
                                      [-3.4028234663852886e38, 3.4028234663852886e38, 0.0, 5.0, -5.0, 1.0],
                                      [1e-40, -3e-41, 0.0, 5e-45, 2e-39, -1e-39],      # a subnormal range
                                      [0.0, 1.0, -2.0, 3e-39, 0.5, -0.25]]),
    "bfloat16-subnormal": (torch.bfloat16, [[2.2959e-39, 0.0, -1e-39, 3.6734e-40, 1e-40, 0.0],
                                            [3.3895e38, -3.3895e38, 0.0, 1.0, -1.0, 2.0],
                                            [1.0, -1.0, 1e-39, 0.0, 0.25, 3.0],
                                            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]),
    "float16-max": (torch.float16, [[-65504.0, 65504.0, 0.0, 1.0, -1.0, 2.0],
                                    [65504.0, 0.5, -20000.0, 0.0, 3.0, -3.0],
                                    [6e-8, -6e-8, 0.0, 1e-7, 0.0, 0.0],                # float16 subnormals
                                    [-65504.0, 1.0, 2.0, 3.0, 4.0, 5.0]]),
}


@pytest.mark.parametrize("case", list(EDGE_ROWS))
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_float32_range_edges(bits, scheme, case):
    """A range wider than float32's (finite scale, halved), subnormal ranges (scale MIN_SCALE),
    the dtype's max (dequantize saturates), bf16 subnormals (read exactly under the interpreter):
    scales, codes and dequantized values equal to the reference's, per row and per tensor."""
    dtype, rows = EDGE_ROWS[case]
    x = torch.tensor(rows, dtype=torch.float64).to(DEVICE, dtype)
    for axis in (0, None):
        data, scale, zp = check(x, bits, scheme, axis, None, out_dtypes=(dtype, torch.float32))
        assert torch.isfinite(scale).all() and bool((scale >= ref.MIN_SCALE).all())
        y = k.dequantize(data, scale, zp, bits, scheme, axis, None, x.shape, dtype)
        assert torch.isfinite(y).all() and bool((y[x == 0] == 0).all())


@pytest.mark.parametrize("bits,scheme", [(8, "absmax"), (4, "zeropoint")])
def test_launchers_read_strided_operands(bits, scheme):
    """The launchers index their operands as dense arrays: strided, transposed, offset or
    expanded (stride 0) ones must be read as their values."""
    x = make_x((6, 16), torch.float32)
    data, scale, zp = k.quantize(x, bits, scheme, None, 4)
    want = k.dequantize(data, scale, zp, bits, scheme, None, 4, x.shape, torch.float32)
    wide = torch.zeros(6, 8, dtype=scale.dtype, device=DEVICE)
    wide[:, ::2] = scale
    assert torch.equal(k.dequantize(data, wide[:, ::2], zp, bits, scheme, None, 4, x.shape, torch.float32), want)
    assert torch.equal(k.dequantize(data, scale.t().contiguous().t(), zp.t().contiguous().t(), bits, scheme, None, 4,
                                    x.shape, torch.float32), want)
    flat = torch.zeros(data.numel() + 5, dtype=data.dtype, device=DEVICE)
    flat[5:] = data.reshape(-1)
    assert torch.equal(k.dequantize(flat[5:].view(data.shape), scale, zp, bits, scheme, None, 4, x.shape,
                                    torch.float32), want)
    row = x[:1].expand(6, 16)  # stride 0
    got = k.quantize(row, bits, scheme, None, 4)
    for g, r in zip(got, reference(row.contiguous(), bits, scheme, None, 4)):
        assert torch.equal(g.cpu(), r)
    codes = got[0][:1].expand_as(got[0])
    assert torch.equal(k.dequantize(codes, got[1], got[2], bits, scheme, None, 4, x.shape, torch.float32),
                       k.dequantize(got[0], got[1], got[2], bits, scheme, None, 4, x.shape, torch.float32))
    t = x.t().contiguous().t()
    for g, r in zip(k.quantize(t, bits, scheme, 1, None), reference(x, bits, scheme, 1, None)):
        assert torch.equal(g.cpu(), r)
