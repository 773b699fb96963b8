"""fastpeft.quantize / dequantize / QuantizedTensor against the reference and its guarantees."""
import pytest
import torch

import fastpeft
from fastpeft import _backend
from fastpeft.reference import quant as ref

from _utils import DEVICE

KERNEL_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" and _backend.cuda_ext_status()[0] else [])
BACKENDS = KERNEL_BACKENDS + ["torch"]
GRANULARITIES = [(None, None), (0, None), (-1, None), (1, None), (None, 16)]


def sample(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3).to(DEVICE, dtype)


def step(qx: fastpeft.QuantizedTensor) -> torch.Tensor:
    """The scale of each element's slot, broadcast to the tensor's shape."""
    ones = torch.ones(qx.shape, dtype=torch.int32, device=qx.device)
    return ref.dequantize_codes(ones, qx.scale, torch.zeros_like(qx.zero_point), qx.axis, qx.group_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
@pytest.mark.parametrize("axis,group_size", GRANULARITIES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_round_trip_guarantees(backend, bits, scheme, axis, group_size, dtype):
    x = sample((3, 5, 32), dtype)
    qx = fastpeft.quantize(x, bits, scheme, axis=axis, group_size=group_size, backend=backend)
    assert qx.shape == x.shape and qx.dtype == dtype and qx.bits == bits
    assert qx.scale.dtype == torch.float32 and qx.zero_point.dtype == torch.int32
    expect = ref.slot_shape(x.shape, None if axis is None else axis % 3, group_size)
    assert tuple(qx.scale.shape) == expect and tuple(qx.zero_point.shape) == expect
    # the same codes and parameters as the reference
    ax = None if axis is None else axis % 3
    s, z = ref.compute_qparams(x, bits, scheme, ax, group_size)
    assert torch.equal(qx.scale, s) and torch.equal(qx.zero_point, z)
    codes = ref.quantize_codes(x, s, z, bits, scheme, ax, group_size)
    unpacked = ref.unpack4(qx.data, 32, scheme == "absmax") if bits == 4 else qx.data.to(torch.int32)
    assert torch.equal(unpacked, codes)
    lo, hi = ref.qrange(bits, scheme)
    assert int(codes.min()) == lo or int(codes.max()) == hi, "the full code range is used"
    y = fastpeft.dequantize(qx, torch.float32, backend=backend)
    assert y.shape == x.shape and y.dtype == torch.float32
    # scale / 2 plus the float32 rounding of x * (1 / scale) and of the product: scale * ERROR_BOUND
    err = (y.double() - x.double()).abs()
    assert bool((err <= step(qx).double() * ref.ERROR_BOUND).all()), "|deq - x| <= scale * (1/2 + 2^-13)"
    assert fastpeft.dequantize(qx, backend=backend).dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_zero_is_exact_and_constant_slots(backend, bits):
    x = sample((4, 32))
    x[0] = 0.0           # an all-zero slot (axis 0): scale 1, codes at the zero point
    x[1] = 2.5           # a constant slot
    x[2, 3] = 0.0
    qx = fastpeft.quantize(x, bits, "zeropoint", axis=0, backend=backend)
    assert torch.isfinite(qx.scale).all() and bool((qx.scale > 0).all())
    assert qx.scale[0] == 1.0
    y = fastpeft.dequantize(qx, backend=backend)
    assert bool((y[0] == 0).all()) and y[2, 3] == 0.0, "0.0 dequantizes to exactly 0.0"
    assert torch.allclose(y[1], x[1], rtol=0, atol=float(qx.scale[1]) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_last_dim_packs_and_unpacks(backend):
    x = sample((3, 7))
    qx = fastpeft.quantize(x, 4, "absmax", axis=0, backend=backend)
    assert qx.data.shape == (3, 4) and qx.data.dtype == torch.uint8
    y = fastpeft.dequantize(qx, backend=backend)
    assert bool(((y.double() - x.double()).abs() <= step(qx).double() * ref.ERROR_BOUND).all())


def test_memory_and_storage_dtypes():
    x = sample((64, 128), torch.float16)
    assert fastpeft.quantize(x, 8, "absmax", backend="torch").data.dtype == torch.int8
    assert fastpeft.quantize(x, 8, "zeropoint", backend="torch").data.dtype == torch.uint8
    q4 = fastpeft.quantize(x, 4, "zeropoint", group_size=32, backend="torch")
    assert q4.data.dtype == torch.uint8 and q4.data.numel() == x.numel() // 2  # a quarter of fp16's bytes


def test_save_load_and_to(tmp_path):
    x = sample((8, 64), torch.bfloat16)
    qx = fastpeft.quantize(x, 4, "zeropoint", group_size=32, backend="torch")
    path = str(tmp_path / "q.safetensors")
    qx.save(path)
    back = fastpeft.QuantizedTensor.load(path)
    for f in ("data", "scale", "zero_point"):
        assert torch.equal(getattr(back, f), getattr(qx, f).cpu())
    assert (back.bits, back.scheme, back.axis, back.group_size, back.shape, back.dtype) == \
        (qx.bits, qx.scheme, qx.axis, qx.group_size, qx.shape, qx.dtype)
    moved = qx.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.data, qx.data.cpu())
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a fastpeft.QuantizedTensor"):
        fastpeft.QuantizedTensor.load(str(tmp_path / "plain.safetensors"))


def test_bad_inputs():
    x = sample((4, 30))
    with pytest.raises(ValueError, match="bits"):
        fastpeft.quantize(x, bits=3)
    with pytest.raises(ValueError, match="scheme"):
        fastpeft.quantize(x, scheme="minmax")
    with pytest.raises(ValueError, match="does not divide"):
        fastpeft.quantize(x, group_size=16)
    with pytest.raises(ValueError, match="axis"):
        fastpeft.quantize(x, axis=2)
    with pytest.raises(ValueError, match="not both"):
        fastpeft.quantize(x, axis=0, group_size=15)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fastpeft.quantize(bad)
    with pytest.raises(TypeError, match="dtype"):
        fastpeft.quantize(x.int())
    with pytest.raises(TypeError, match="QuantizedTensor"):
        fastpeft.dequantize(x)
    empty = fastpeft.quantize(x[:0], backend="torch")
    assert fastpeft.dequantize(empty).shape == (0, 30)
