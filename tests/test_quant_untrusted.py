"""quantize / dequantize / QuantizedTensor.load on untrusted input: corrupted files, hand-built
quantized tensors, strided / expanded / offset / transposed operands, the edges of the float32
range, and hypothesis properties comparing the torch path, the Triton path (the interpreter on the
CPU) and fastpeft/reference/quant.py.

Contract (fastpeft/ops/quant.py): a bad file or a QuantizedTensor whose fields disagree raises
ValueError / TypeError naming the field (and the file) before anything is allocated or launched;
any memory layout gives the contiguous result; every backend equals the reference bit for bit,
the edges included. Few hypothesis examples by default (derandomized: reproducible in CI);
FASTPEFT_FUZZ_EXAMPLES=N runs N fresh random examples per property.
"""
import dataclasses
import json
import math
import pickle
import struct
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastpeft
from fastpeft import _backend
from fastpeft.kernels import quant as kquant
from fastpeft.ops import quant as opquant
from fastpeft.reference import quant as ref

from _fuzz import fuzz_settings, lay
from _utils import DEVICE

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy inf/NaN in the interpreter

CUDA_EXT = DEVICE == "cuda" and _backend.cuda_ext_status()[0]
BACKENDS = ["torch", "triton"] + (["cuda"] if CUDA_EXT else [])
EDGE_BACKENDS = BACKENDS  # the float32-range edges: overflow-safe range, minimum scale, saturation
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOAD_SECONDS = 1.0  # a rejected file must be refused within this
FUZZ_SETTINGS = fuzz_settings(25)
MAX_NUMEL = 1000  # hypothesis tensors: the interpreter runs one program at a time
SIZES = [0, 1, 2, 3, 5, 7, 13, 31, 67, 130]  # empty, one, primes, more than one interpreter tile


# ---------------------------------------------------------------------------------------------
# helpers


def sample(shape, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3).to(device, dtype)


def reference(x, bits, scheme, axis, group_size):
    """(data, scale, zero_point, unpacked codes) of the reference on x's values."""
    xc = x.detach().cpu().contiguous()
    ax = None if axis is None else axis % x.dim()
    scale, zp = ref.compute_qparams(xc, bits, scheme, ax, group_size)
    q = ref.quantize_codes(xc, scale, zp, bits, scheme, ax, group_size)
    data = ref.pack4(q) if bits == 4 else q.to(torch.int8 if scheme == "absmax" else torch.uint8)
    return data, scale, zp, q


def ref_dequantize(qx, dtype):
    data = qx.data.cpu()
    q = ref.unpack4(data, qx.shape[-1], qx.scheme == "absmax") if qx.bits == 4 else data.to(torch.int32)
    return ref.dequantize(q.reshape(qx.shape), qx.scale.cpu(), qx.zero_point.cpu(), qx.axis, qx.group_size, dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values, NaN equal to NaN."""
    a, b = a.cpu(), b.cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def step(qx) -> torch.Tensor:
    """Each element's scale, broadcast to the tensor's shape (float64)."""
    ones = torch.ones(qx.shape, dtype=torch.int32)
    return ref.dequantize_codes(ones, qx.scale.cpu(), torch.zeros_like(qx.zero_point.cpu()), qx.axis,
                                qx.group_size).double()


def assert_guarantees(qx, x, w32):
    """The README's promises for finite x: |w - x| <= scale * ERROR_BOUND (w in float32) and 0.0
    dequantizes to exactly 0.0."""
    xd, wd = x.detach().cpu().double(), w32.cpu().double()
    assert torch.isfinite(wd).all(), "a finite x dequantizes to finite values"
    err = (wd - xd).abs()
    bound = step(qx) * ref.ERROR_BOUND
    assert bool((err <= bound).all()), f"|w - x| <= scale * {ref.ERROR_BOUND}: worst excess {(err - bound).max()}"
    assert bool((wd[xd == 0] == 0).all()), "0.0 dequantizes to exactly 0.0"


LAYOUTS = ["offset", "sliced", "transposed", "expanded"]


# ---------------------------------------------------------------------------------------------
# corrupted files


def good_qx(device="cpu"):
    """A 4-bit zero-point [8, 64] bf16 tensor in groups of 32 (what the files hold)."""
    x = sample((8, 64), torch.bfloat16, device=device)
    return fastpeft.quantize(x, 4, "zeropoint", group_size=32, backend="torch")


def write(path, tensors=None, drop=(), **meta):
    """A safetensors file of good_qx() with tensors replaced or dropped and metadata entries
    changed (None: removed)."""
    from safetensors.torch import save_file
    qx = good_qx()
    t = {"data": qx.data, "scale": qx.scale, "zero_point": qx.zero_point}
    t.update(tensors or {})
    t = {k: v.contiguous() for k, v in t.items() if k not in drop}
    m = {**qx._metadata(), **meta}
    save_file(t, str(path), metadata={k: v for k, v in m.items() if v is not None})
    return path


def raw_file(path, header: dict, payload: bytes = b""):
    """A safetensors file written by hand: 8-byte little-endian header length, JSON header, bytes."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)
    return path


def assert_refused(path, *names):
    """load(path) raises ValueError / TypeError within LOAD_SECONDS, naming the file and each of
    ``names`` (outside the file's name); the file and its folder are unchanged, and a good file
    still loads and dequantizes afterwards."""
    before = path.read_bytes()
    listing = sorted(p.name for p in path.parent.iterdir())
    t0 = time.perf_counter()
    with pytest.raises((ValueError, TypeError)) as info:
        fastpeft.QuantizedTensor.load(str(path))
    elapsed = time.perf_counter() - t0
    message = str(info.value)
    assert elapsed < LOAD_SECONDS, f"took {elapsed:.2f} s to refuse"
    assert str(path) in message, f"the file is not named: {message}"
    rest = message.replace(str(path), "")
    for name in names:
        assert name in rest, f"{name!r} not in: {message}"
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == listing
    good = good_qx()
    good.save(str(path.parent / "good.safetensors"))
    back = fastpeft.QuantizedTensor.load(str(path.parent / "good.safetensors"))
    assert same(fastpeft.dequantize(back), fastpeft.dequantize(good, backend="torch"))
    (path.parent / "good.safetensors").unlink()
    return message


def test_good_file_round_trip(tmp_path):
    qx = good_qx()
    qx.save(str(tmp_path / "q.safetensors"))
    back = fastpeft.QuantizedTensor.load(str(tmp_path / "q.safetensors"))
    for f in ("data", "scale", "zero_point"):
        assert same(getattr(back, f), getattr(qx, f))
    assert (back.bits, back.scheme, back.axis, back.group_size, back.shape, back.dtype) == \
        (qx.bits, qx.scheme, qx.axis, qx.group_size, qx.shape, qx.dtype)


BAD_METADATA = [  # (entry, value: None removes it, names the message must hold)
    ("shape", "[8, 2048]", ("data", "shape")),  # more codes claimed than stored: segfaulted on Triton
    ("shape", "[8, 48]", ("group_size",)),      # fewer: returned garbage
    ("shape", "[8, 96]", ("data", "shape")),
    ("shape", "[16, 32]", ("data", "shape")),   # as many codes, another shape
    ("shape", "[512]", ("data", "shape")),
    ("shape", "[-8, 64]", ("shape",)),
    ("shape", "[8.0, 64]", ("shape",)),
    ("shape", "[8, true]", ("shape",)),
    ("shape", "[]", ("shape",)),
    ("shape", '"8x64"', ("shape",)),
    ("shape", '{"rows": 8}', ("shape",)),
    ("shape", "[8, 64", ("shape",)),
    ("shape", "[" * 50000 + "]" * 50000, ("shape",)),  # nesting past the recursion limit
    ("shape", "[" + "1, " * 100000 + "64]", ("data", "shape")),  # a huge rank
    ("shape", "[100000000000000000000000000000, 64]", ("data", "shape")),
    ("shape", None, ("shape",)),
    ("bits", "3", ("bits",)),
    ("bits", "8", ("data", "shape")),  # 8-bit codes would be [8, 64]
    ("bits", "4.0", ("bits",)),
    ("bits", '"4"', ("bits",)),
    ("bits", "true", ("bits",)),
    ("bits", "", ("bits",)),
    ("bits", "9" * 5000, ("bits",)),  # beyond Python's int-parsing limit
    ("bits", None, ("bits",)),
    ("scheme", "evil", ("scheme",)),
    ("scheme", "absmax", ("zero_point",)),  # 4-bit absmax codes are uint8 too: the zero points give it away
    ("scheme", None, ("scheme",)),
    ("axis", "0", ("axis", "group_size")),
    ("axis", "5", ("axis",)),
    ("axis", '"0"', ("axis",)),
    ("axis", "1.5", ("axis",)),
    ("axis", None, ("axis",)),
    ("group_size", "null", ("scale", "shape")),
    ("group_size", "16", ("scale", "shape")),
    ("group_size", "0", ("group_size",)),
    ("group_size", "-32", ("group_size",)),
    ("group_size", "7", ("group_size",)),
    ("group_size", "true", ("group_size",)),
    ("group_size", None, ("group_size",)),
    ("dtype", "float64", ("dtype",)),
    ("dtype", "int8", ("dtype",)),
    ("dtype", "evil", ("dtype",)),
    ("dtype", None, ("dtype",)),
    ("format", "something.else", ("fastpeft.QuantizedTensor",)),
    ("format", None, ("fastpeft.QuantizedTensor",)),
]


@pytest.mark.parametrize("entry,value,names", BAD_METADATA,
                         ids=[f"{e}={v if v is None or len(v) < 20 else v[:12] + '...'}" for e, v, _ in BAD_METADATA])
def test_load_refuses_bad_metadata(tmp_path, entry, value, names):
    assert_refused(write(tmp_path / "bad.safetensors", **{entry: value}), *names)


def _bad_tensors():
    qx = good_qx()
    d, s, z = qx.data, qx.scale, qx.zero_point
    return {
        "data-float": ({"data": d.float()}, ("data", "dtype")),
        "data-int8": ({"data": d.view(torch.int8)}, ("data", "dtype")),
        "data-flat": ({"data": d.reshape(-1)}, ("data", "shape")),
        "data-short": ({"data": d[:, :31]}, ("data", "shape")),
        "data-long": ({"data": torch.cat([d, d], 1)}, ("data", "shape")),
        "scale-half": ({"scale": s.half()}, ("scale", "dtype")),
        "scale-float64": ({"scale": s.double()}, ("scale", "dtype")),
        "scale-rows": ({"scale": s[:, 0]}, ("scale", "shape")),
        "scale-short": ({"scale": s[:7]}, ("scale", "shape")),
        "scale-scalar": ({"scale": s[0, 0]}, ("scale", "shape")),
        "scale-nan": ({"scale": s.clone().index_fill_(1, torch.tensor([1]), float("nan"))}, ("scale",)),
        "scale-inf": ({"scale": s.clone().index_fill_(1, torch.tensor([0]), float("inf"))}, ("scale",)),
        "scale-zero": ({"scale": s.clone().index_fill_(0, torch.tensor([3]), 0.0)}, ("scale",)),
        "scale-negative": ({"scale": -s}, ("scale",)),
        "zero_point-float": ({"zero_point": z.float()}, ("zero_point", "dtype")),
        "zero_point-int64": ({"zero_point": z.long()}, ("zero_point", "dtype")),
        "zero_point-shape": ({"zero_point": z.t()}, ("zero_point", "shape")),
        "zero_point-high": ({"zero_point": z.clone().fill_(16)}, ("zero_point",)),
        "zero_point-negative": ({"zero_point": z.clone().fill_(-1)}, ("zero_point",)),
        "bool-data": ({"data": d.bool()}, ("data", "dtype")),
    }


@pytest.mark.parametrize("case", list(_bad_tensors()))
def test_load_refuses_bad_tensors(tmp_path, case):
    tensors, names = _bad_tensors()[case]
    assert_refused(write(tmp_path / "bad.safetensors", tensors), *names)


def test_load_refuses_missing_and_extra_tensors(tmp_path):
    assert_refused(write(tmp_path / "bad.safetensors", drop=("scale",)), "tensors")
    assert_refused(write(tmp_path / "bad2.safetensors", {"extra": torch.zeros(1)}), "tensors")


def test_load_refuses_out_of_range_absmax_codes(tmp_path):
    """-128 is no 8-bit absmax code, nibble 8 (-8) no 4-bit one: a file holding them is corrupt."""
    x = sample((4, 16)).cpu()
    q8 = fastpeft.quantize(x, 8, "absmax", axis=0, backend="torch")
    bad = q8.data.clone()
    bad[1, 3] = -128
    from safetensors.torch import save_file
    save_file({"data": bad, "scale": q8.scale, "zero_point": q8.zero_point}, str(tmp_path / "a.safetensors"),
              metadata=q8._metadata())
    assert_refused(tmp_path / "a.safetensors", "data")
    q4 = fastpeft.quantize(x, 4, "absmax", axis=0, backend="torch")
    bad = q4.data.clone()
    bad[2, 1] = 0x8F  # high nibble 8
    save_file({"data": bad, "scale": q4.scale, "zero_point": q4.zero_point}, str(tmp_path / "b.safetensors"),
              metadata=q4._metadata())
    assert_refused(tmp_path / "b.safetensors", "data")


def test_load_refuses_truncated_files(tmp_path):
    whole = write(tmp_path / "whole.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", whole[:8])
    for cut in (0, 3, 8, 8 + header_len // 2, 8 + header_len, len(whole) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(whole[:cut])
        assert_refused(path, "safetensors")


def test_load_refuses_non_safetensors_payloads(tmp_path):
    payloads = {
        "pickle": pickle.dumps({"data": [1, 2, 3]}),
        "json": json.dumps({"data": [1, 2, 3]}).encode(),
        "text": b"fastpeft.QuantizedTensor\n" * 4,
        "zeros": bytes(64),
        "huge-header-length": struct.pack("<Q", 2**62) + b"{}",
    }
    for name, payload in payloads.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(payload)
        assert_refused(path, "safetensors")
    torch_file = tmp_path / "torch.safetensors"
    torch.save({"data": torch.zeros(3)}, str(torch_file))
    assert_refused(torch_file, "safetensors")


def test_load_refuses_hand_written_headers(tmp_path):
    """Headers safetensors' writer would never produce: non-string metadata values, offsets past
    the end of the file, overlapping tensors, an unknown dtype."""
    meta = good_qx()._metadata()
    good = {"data": {"dtype": "U8", "shape": [8, 32], "data_offsets": [0, 256]},
            "scale": {"dtype": "F32", "shape": [8, 2], "data_offsets": [256, 320]},
            "zero_point": {"dtype": "I32", "shape": [8, 2], "data_offsets": [320, 384]}}
    payload = bytes(256) + struct.pack("<16f", *[0.5] * 16) + struct.pack("<16i", *[3] * 16)
    assert fastpeft.QuantizedTensor.load(str(raw_file(tmp_path / "ok.safetensors", {"__metadata__": meta, **good},
                                                      payload))).shape == (8, 64)
    cases = {
        "meta-int": ({"__metadata__": {**meta, "bits": 4}, **good}, payload),
        "past-end": ({"__metadata__": meta, **good,
                      "zero_point": {"dtype": "I32", "shape": [8, 2], "data_offsets": [320, 100000]}}, payload),
        "overlap": ({"__metadata__": meta, **good,
                     "scale": {"dtype": "F32", "shape": [8, 2], "data_offsets": [200, 264]}}, payload),
        "dtype": ({"__metadata__": meta, **good, "data": {"dtype": "Q7", "shape": [8, 32], "data_offsets": [0, 256]}},
                  payload),
        "shape-vs-bytes": ({"__metadata__": meta, **good,
                            "data": {"dtype": "U8", "shape": [8, 2048], "data_offsets": [0, 256]}}, payload),
    }
    for name, (header, data) in cases.items():
        assert_refused(raw_file(tmp_path / f"{name}.safetensors", header, data), "safetensors")


def test_save_refuses_an_inconsistent_tensor(tmp_path):
    bad = dataclasses.replace(good_qx(), scale=torch.ones(3))
    with pytest.raises(ValueError, match="scale"):
        bad.save(str(tmp_path / "never.safetensors"))
    assert not (tmp_path / "never.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# hand-built QuantizedTensors


def bad_fields(qx):
    """(id, changes to the good QuantizedTensor qx, the names its error must hold): every field
    wrong in type, in value, or against the others."""
    d, s, z = qx.data, qx.scale, qx.zero_point
    return [
        ("data-float", {"data": d.float()}, ("data",)),
        ("data-int8", {"data": d.view(torch.int8)}, ("data",)),
        ("data-short", {"data": d[:, :16]}, ("data",)),
        ("data-flat", {"data": d.reshape(-1)}, ("data",)),
        ("data-str", {"data": "codes"}, ("data",)),
        ("scale-columns", {"scale": s[:, :1]}, ("scale",)),  # read out of bounds on the Triton path
        ("scale-flat", {"scale": s.reshape(-1)}, ("scale",)),
        ("scale-float64", {"scale": s.double()}, ("scale",)),
        ("scale-scalar", {"scale": s[0, 0]}, ("scale",)),
        ("scale-none", {"scale": None}, ("scale",)),
        ("zero_point-short", {"zero_point": z[:4]}, ("zero_point",)),
        ("zero_point-float", {"zero_point": z.float()}, ("zero_point",)),
        ("zero_point-int64", {"zero_point": z.long()}, ("zero_point",)),
        ("zero_point-int", {"zero_point": 0}, ("zero_point",)),
        ("bits-3", {"bits": 3}, ("bits",)),
        ("bits-16", {"bits": 16}, ("bits",)),
        ("bits-bool", {"bits": True}, ("bits",)),
        ("bits-str", {"bits": "4"}, ("bits",)),
        ("bits-float", {"bits": 4.0}, ("bits",)),
        ("bits-none", {"bits": None}, ("bits",)),
        ("bits-8", {"bits": 8}, ("data",)),  # 8-bit codes of [8, 64] would be [8, 64]
        ("scheme-evil", {"scheme": "evil"}, ("scheme",)),
        ("scheme-none", {"scheme": None}, ("scheme",)),
        ("scheme-int", {"scheme": 4}, ("scheme",)),
        ("axis-and-group", {"axis": 0}, ("axis", "group_size")),
        ("axis-out", {"axis": 2, "group_size": None}, ("axis",)),
        ("axis-out-negative", {"axis": -3, "group_size": None}, ("axis",)),
        ("axis-float", {"axis": 1.0, "group_size": None}, ("axis",)),
        ("axis-str", {"axis": "0", "group_size": None}, ("axis",)),
        ("axis-bool", {"axis": True, "group_size": None}, ("axis",)),
        ("axis-0", {"axis": 0, "group_size": None}, ("scale",)),  # a valid axis; the scales are per group
        ("group-0", {"group_size": 0}, ("group_size",)),
        ("group-negative", {"group_size": -32}, ("group_size",)),
        ("group-7", {"group_size": 7}, ("group_size",)),
        ("group-float", {"group_size": 32.0}, ("group_size",)),
        ("group-str", {"group_size": "32"}, ("group_size",)),
        ("group-bool", {"group_size": True}, ("group_size",)),
        ("group-16", {"group_size": 16}, ("scale",)),  # valid; the scales are for 32
        ("group-none", {"group_size": None}, ("scale",)),
        ("shape-more", {"shape": (8, 2048)}, ("data", "shape")),  # segfaulted on the Triton path
        ("shape-fewer", {"shape": (8, 48)}, ("group_size",)),
        ("shape-same-bytes", {"shape": (16, 32)}, ("data",)),
        ("shape-rank", {"shape": (8, 1, 64)}, ("data",)),
        ("shape-negative", {"shape": (-8, 64)}, ("shape",)),
        ("shape-float", {"shape": (8.0, 64)}, ("shape",)),
        ("shape-empty", {"shape": ()}, ("shape",)),
        ("shape-str", {"shape": "8x64"}, ("shape",)),
        ("shape-none", {"shape": None}, ("shape",)),
        ("shape-bool", {"shape": (8, True)}, ("shape",)),
        ("dtype-float64", {"dtype": torch.float64}, ("dtype",)),
        ("dtype-int8", {"dtype": torch.int8}, ("dtype",)),
        ("dtype-str", {"dtype": "float32"}, ("dtype",)),
        ("dtype-none", {"dtype": None}, ("dtype",)),
    ]


BAD_FIELD_IDS = [case[0] for case in bad_fields(good_qx())]


def bad_field(case_id):
    """(a QuantizedTensor with one field wrong, the names its error must hold)."""
    qx = good_qx(DEVICE)
    _, changes, names = next(c for c in bad_fields(qx) if c[0] == case_id)
    return dataclasses.replace(qx, **changes), names


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", BAD_FIELD_IDS)
def test_dequantize_refuses_inconsistent_fields(backend, case):
    qx, names = bad_field(case)
    with pytest.raises((ValueError, TypeError)) as info:
        fastpeft.dequantize(qx, torch.float32, backend=backend)
    for name in names:
        assert name in str(info.value), str(info.value)
    with pytest.raises((ValueError, TypeError)):
        qx.validate()


def test_registered_op_refuses_inconsistent_arguments():
    """torch.ops.fastpeft.dequantize (the dispatcher's path, and the fake under tracing) checks too."""
    qx = good_qx(DEVICE)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.fastpeft.dequantize(qx.data, qx.scale[:, :1], qx.zero_point, 4, "zeropoint", None, 32, [8, 64],
                                      torch.float32, "triton")
    with pytest.raises(ValueError, match="data"):
        torch.ops.fastpeft.dequantize(qx.data, qx.scale, qx.zero_point, 4, "zeropoint", None, 32, [8, 2048],
                                      torch.float32, None)
    from torch._subclasses.fake_tensor import FakeTensorMode
    short = qx.zero_point[:3]
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="zero_point"):
        fake = [mode.from_tensor(t) for t in (qx.data, qx.scale, short)]
        torch.ops.fastpeft.dequantize(*fake, 4, "zeropoint", None, 32, [8, 64], torch.float32, None)


def test_devices_must_match():
    qx = good_qx(DEVICE)
    bad = dataclasses.replace(qx, scale=qx.scale.to("meta"))
    with pytest.raises(ValueError, match="one device"):
        fastpeft.dequantize(bad)


def test_validate_values():
    qx = good_qx(DEVICE)
    assert qx.validate(values=True) is qx
    with pytest.raises(ValueError, match="scale"):
        dataclasses.replace(qx, scale=-qx.scale).validate(values=True)
    with pytest.raises(ValueError, match="zero_point"):
        dataclasses.replace(qx, zero_point=qx.zero_point + 16).validate(values=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_axis_is_normalized(backend):
    """A hand-built tensor with axis=-1 means the last dim (the Triton path read it as another)."""
    x = sample((5, 7, 6))
    qx = fastpeft.quantize(x, 4, "zeropoint", axis=2, backend="torch")
    want = fastpeft.dequantize(qx, backend="torch")
    assert same(fastpeft.dequantize(dataclasses.replace(qx, axis=-1), backend=backend), want)
    assert same(fastpeft.dequantize(dataclasses.replace(qx, axis=-3 + 2), backend=backend), want)


# ---------------------------------------------------------------------------------------------
# memory layouts


GRANULARITIES = [(None, None), (0, None), (1, None), (None, 6)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits,scheme", [(8, "absmax"), (4, "zeropoint")])
@pytest.mark.parametrize("axis,group_size", GRANULARITIES, ids=str)
def test_quantize_any_layout(backend, layout, bits, scheme, axis, group_size):
    x = lay(sample((5, 18), seed=3), layout)
    got = fastpeft.quantize(x, bits, scheme, axis=axis, group_size=group_size, backend=backend)
    data, scale, zp, _ = reference(x, bits, scheme, axis, group_size)
    assert same(got.data, data) and same(got.scale, scale) and same(got.zero_point, zp)


@pytest.mark.parametrize("field", ["data", "scale", "zero_point"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits,scheme", [(8, "zeropoint"), (4, "absmax"), (4, "zeropoint")])
@pytest.mark.parametrize("axis,group_size", GRANULARITIES, ids=str)
def test_dequantize_any_layout(field, layout, bits, scheme, axis, group_size):
    """Every backend reads a strided / offset / transposed / expanded data, scale or zero_point as
    its values (the Triton path read them as contiguous: wrong values or out-of-bounds reads).
    Rows of x repeat, so the codes and the per-group and per-row parameters are constant along
    dim 0 and a stride-0 copy of them is the same tensor."""
    x = sample((1, 18), seed=4).expand(5, 18).clone()
    x[:, 0] = 0.0
    qx = fastpeft.quantize(x, bits, scheme, axis=axis, group_size=group_size, backend="torch")
    t = lay(getattr(qx, field), layout)
    if not same(t.contiguous(), getattr(qx, field)):
        pytest.skip("not constant along dim 0: no stride-0 copy of it")
    want = ref_dequantize(qx, torch.float32)
    strided = dataclasses.replace(qx, **{field: t})
    for backend in BACKENDS:
        assert same(fastpeft.dequantize(strided, torch.float32, backend=backend), want), backend


# ---------------------------------------------------------------------------------------------
# float32 range edges and empty tensors


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("values", [[-3e38, 3e38, 0.0, 1.0], [-3.4028234663852886e38, 3.4028234663852886e38, 0.0, -1.0],
                                    [0.0, 3.4028234663852886e38, -3.4028234663852886e38, 2.0]], ids=["3e38", "max", "max-"])
def test_range_wider_than_float32(backend, bits, values):
    """hi - lo overflowed to inf: scale inf, every element NaN. Now a finite scale, the bound, 0 -> 0."""
    x = torch.tensor(values, device=DEVICE)
    qx = fastpeft.quantize(x, bits, "zeropoint", backend=backend)
    data, scale, zp, _ = reference(x, bits, "zeropoint", None, None)
    assert same(qx.scale, scale) and same(qx.zero_point, zp) and same(qx.data, data)
    assert math.isfinite(float(qx.scale)) and float(qx.scale) > 0
    w = fastpeft.dequantize(qx, torch.float32, backend=backend)
    assert same(w, ref_dequantize(qx, torch.float32))
    assert_guarantees(qx, x, w)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,scheme", [(8, "absmax"), (8, "zeropoint"), (4, "absmax"), (4, "zeropoint")])
def test_subnormal_slots(backend, dtype, bits, scheme):
    """A slot of subnormals had a subnormal scale whose reciprocal is inf: 0 * inf = NaN gave 0.0
    the code 0 (not the zero point) and |w - x| beyond scale / 2. The scale is now at least
    MIN_SCALE (the smallest normal float32)."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.zeros(4, 6, dtype=torch.float64)
    x[0] = torch.tensor([1e-40, -3e-41, 0.0, 5e-45, 2e-39, -1e-39])      # subnormal slot
    x[1] = torch.tensor([tiny, -tiny, 0.0, tiny / 2, 3 * tiny, -2 * tiny])  # around the smallest normal
    x[2] = torch.tensor([0.0, 1.0, -2.0, 3e-39, 0.5, -0.25])              # normal slot with a subnormal
    x[3] = torch.tensor([127 * tiny, 0.0, -tiny, 100 * tiny, 1e-40, 1e-36])
    x = x.to(DEVICE, dtype)
    qx = fastpeft.quantize(x, bits, scheme, axis=0, backend=backend)
    data, scale, zp, _ = reference(x, bits, scheme, 0, None)
    assert same(qx.scale, scale) and same(qx.zero_point, zp) and same(qx.data, data)
    assert bool((qx.scale >= ref.MIN_SCALE).all())
    w = fastpeft.dequantize(qx, torch.float32, backend=backend)
    assert same(w, ref_dequantize(qx, torch.float32))
    assert_guarantees(qx, x, w)
    assert same(fastpeft.dequantize(qx, backend=backend), ref_dequantize(qx, dtype))


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,scheme", [(8, "absmax"), (8, "zeropoint"), (4, "absmax"), (4, "zeropoint")])
def test_dtype_max_saturates(backend, dtype, bits, scheme):
    """fp16 +-65504 (and bf16 / fp32 max): the rounded zero point puts the grid's end up to
    scale / 2 past the range, beyond the dtype's max (-65760.9 for 8 bits), and the cast gave
    -inf. dequantize now saturates at the dtype's max: finite, within the bound, as the reference."""
    top = torch.finfo(dtype).max
    x = torch.tensor([[-top, top, 0.0, 1.0], [top, 0.5, -top / 3, 0.0]], device=DEVICE, dtype=dtype)
    qx = fastpeft.quantize(x, bits, scheme, axis=0, backend=backend)
    w32 = fastpeft.dequantize(qx, torch.float32, backend=backend)
    assert same(w32, ref_dequantize(qx, torch.float32))
    assert_guarantees(qx, x, w32)
    w = fastpeft.dequantize(qx, backend=backend)
    assert same(w, ref_dequantize(qx, dtype)) and bool(torch.isfinite(w).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape,axis,group_size", [((0, 4), 0, None), ((0, 4), 1, None), ((0, 4), None, None),
                                                   ((0, 4), None, 2), ((3, 0), 0, None), ((3, 0), None, 2),
                                                   ((2, 0, 5), 1, None), ((0, 3, 5), 0, None)], ids=str)
def test_empty_inputs(backend, bits, shape, axis, group_size):
    """0 rows quantize to empty codes (0-row axis=0 failed in a reshape) and 0-row 4-bit codes
    dequantize to an empty tensor of the right shape (failed in unpack4)."""
    x = torch.zeros(shape, device=DEVICE)
    qx = fastpeft.quantize(x, bits, "zeropoint", axis=axis, group_size=group_size, backend=backend)
    assert tuple(qx.data.shape) == opquant._data_shape(shape, bits)
    assert tuple(qx.scale.shape) == tuple(ref.slot_shape(torch.Size(shape), qx.axis, group_size))
    y = fastpeft.dequantize(qx, torch.float16, backend=backend)
    assert y.shape == shape and y.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# hypothesis properties


@st.composite
def quant_cases(draw):
    """(x, layout, bits, scheme, axis, group_size, out dtype): shapes with empty, one, prime and
    beyond-one-tile sizes; values from subnormal to the dtype's max, with zero, constant,
    subnormal and +-max rows; x in a drawn memory layout."""
    shape = draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= MAX_NUMEL))
    dtype = draw(st.sampled_from(DTYPES))
    bits, scheme = draw(st.sampled_from([8, 4])), draw(st.sampled_from(ref.SCHEMES))
    kind = draw(st.sampled_from(["tensor", "axis", "group"]))
    axis = draw(st.integers(-len(shape), len(shape) - 1)) if kind == "axis" else None
    divisors = [g for g in range(1, max(shape[-1], 1) + 1) if shape[-1] % g == 0] if shape[-1] else [1, 2, 4]
    group_size = draw(st.sampled_from(divisors)) if kind == "group" else None
    info = torch.finfo(dtype)
    magnitude = draw(st.sampled_from([1e-41, 1e-6, 1.0, 300.0, 1e30, float(info.max)]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).clamp(-info.max, info.max)
    if x.numel():
        rows = x.reshape(-1, shape[-1])
        for special in draw(st.lists(st.sampled_from(["zero", "constant", "subnormal", "max", "min"]), max_size=3)):
            r = rows[draw(st.integers(0, rows.shape[0] - 1))]
            if special == "zero":
                r.zero_()
            elif special == "constant":
                r.fill_(-2.5)
            elif special == "subnormal":
                r.mul_(info.tiny / 8 / max(magnitude, 1.0))  # the dtype's subnormals
            elif r.numel():
                r[draw(st.integers(0, r.numel() - 1))] = info.max if special == "max" else -info.max
    x = x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", *LAYOUTS]))
    if layout == "expanded" and x.shape[0]:
        x = x[:1].expand(x.shape).contiguous()  # the values a stride-0 view of the first slice has
    out = draw(st.sampled_from(DTYPES))
    return lay(x.to(DEVICE), layout), bits, scheme, axis, group_size, out


@FUZZ_SETTINGS
@given(case=quant_cases(), data=st.data())
def test_fuzz_quantize_dequantize(case, data):
    """Every backend's codes, scales and zero points equal the reference's; dequantize (in float32
    and a drawn dtype, with data / scale / zero_point in drawn layouts) equals the reference's;
    the promises hold (|w - x| <= scale * ERROR_BOUND, 0.0 stays 0.0, finite)."""
    x, bits, scheme, axis, group_size, out = case
    want_data, want_scale, want_zp, _ = reference(x, bits, scheme, axis, group_size)
    for backend in BACKENDS:
        qx = fastpeft.quantize(x, bits, scheme, axis=axis, group_size=group_size, backend=backend)
        assert same(qx.data, want_data) and same(qx.scale, want_scale) and same(qx.zero_point, want_zp), backend
        w32 = fastpeft.dequantize(qx, torch.float32, backend=backend)
        assert same(w32, ref_dequantize(qx, torch.float32)), backend
        assert_guarantees(qx, x, w32)
        layouts = {f: data.draw(st.sampled_from(["contiguous", "offset", "sliced", "transposed"]), label=f)
                   for f in ("data", "scale", "zero_point")}
        moved = dataclasses.replace(qx, **{f: lay(getattr(qx, f), how) for f, how in layouts.items()})
        assert same(fastpeft.dequantize(moved, out, backend=backend), ref_dequantize(qx, out)), (backend, layouts)


@FUZZ_SETTINGS
@given(case=quant_cases(), where=st.floats(0, 1), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_fuzz_nonfinite_rows(case, where, bad):
    """quantize refuses NaN / inf (a ValueError naming x) on every backend; the Triton kernels'
    own semantics for them (a NaN slot: scale NaN, codes 0) still equal the reference's."""
    x, bits, scheme, axis, group_size, _ = case
    if x.numel() == 0:
        return
    x = x.contiguous().clone()
    x.view(-1)[min(int(where * x.numel()), x.numel() - 1)] = bad
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            fastpeft.quantize(x, bits, scheme, axis=axis, group_size=group_size, backend=backend)
    ax = None if axis is None else axis % x.dim()
    data, scale, zp = kquant.quantize(x, bits, scheme, ax, group_size)
    want_data, want_scale, want_zp, _ = reference(x, bits, scheme, axis, group_size)
    assert same(data, want_data) and same(scale, want_scale) and same(zp, want_zp)


def _bad_quantize_args(x):
    """(kwargs, the argument the message must name)."""
    return [({"bits": 3}, "bits"), ({"bits": True}, "bits"), ({"bits": "8"}, "bits"),
            ({"scheme": "evil"}, "scheme"), ({"scheme": None}, "scheme"),
            ({"axis": x.dim()}, "axis"), ({"axis": -x.dim() - 1}, "axis"), ({"axis": 0.5}, "axis"),
            ({"group_size": 0}, "group_size"), ({"group_size": -2}, "group_size"), ({"group_size": 2.0}, "group_size"),
            ({"group_size": x.shape[-1] + 1}, "group_size"), ({"axis": 0, "group_size": 1}, "group_size"),
            ({"x": x.double()}, "x"), ({"x": x.int()}, "x"), ({"x": x.tolist()}, "x"), ({"x": x.reshape(-1)[0]}, "x")]


@FUZZ_SETTINGS
@given(which=st.integers(0, 16), case=st.sampled_from(BAD_FIELD_IDS), backend=st.sampled_from(["torch", "triton"]),
       shape=st.sampled_from([(3, 5), (2, 4, 6), (7, 1)]))
def test_fuzz_rejected_inputs_name_the_argument(which, case, backend, shape):
    """Every rejected argument of quantize, and every inconsistent field of a QuantizedTensor given
    to dequantize, raises ValueError / TypeError naming it, on every backend."""
    x = sample(shape)
    kwargs, name = _bad_quantize_args(x)[which]
    args = {"x": x, "bits": 8, "scheme": "absmax", "axis": None, "group_size": None, **kwargs}
    with pytest.raises((ValueError, TypeError)) as info:
        fastpeft.quantize(args.pop("x"), **args, backend=backend)
    assert name in str(info.value), str(info.value)
    qx, names = bad_field(case)
    with pytest.raises((ValueError, TypeError)) as info:
        fastpeft.dequantize(qx, torch.float32, backend=backend)
    assert all(n in str(info.value) for n in names), str(info.value)
