"""NF4 / FP4 (QLoRA's 4-bit types, bitsandbytes' layout): fastpeft.quantize(x, 4, "nf4" | "fp4",
block_size=, double_quant=) and dequantize.

Oracles: fastpeft/reference/nf4.py (every backend equals it bit for bit: codes, absmax, the double
quantization, dequantized values, in float32 / float16 / bfloat16, on awkward shapes), and
bitsandbytes' CPU ops where installed: codes, absmax, offset and nested absmax equal to
``bitsandbytes.functional.quantize_4bit`` (quant_type nf4 / fp4, blocksize, compress_statistics),
dequantized values equal to ``dequantize_4bit``; checkpoints in bitsandbytes' format
(``QuantizedTensor.from_bnb``) dequantize to bitsandbytes' values. Bad input fails clearly.
"""
import dataclasses
import json

import pytest
import torch

import fastpeft
from fastpeft.ops import nf4 as ops
from fastpeft.reference import nf4 as ref

from _utils import DEVICE

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

SCHEMES = ["nf4", "fp4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, block size): odd element counts, counts not a multiple of the block, a block longer
# than a row, several interpreter programs, more than 256 blocks (two nested blocks)
SHAPES = [((3, 37), 64), ((5, 130), 32), ((2, 3, 71), 128), ((1,), 64), ((9, 300), 32)]


def sample(shape, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    return x.to(device, dtype)


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def bnb_dequantize_flat(data, absmax, scheme, block_size, shape, dtype):
    """bitsandbytes' default-backend dequantize_4bit (plain PyTorch, flat blocks), unwrapped from
    its torch.compile: its CPU library gets blocks that straddle rows wrong (below)."""
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code
    compute = default_ops._dequantize_4bit_compute
    compute = getattr(compute, "__wrapped__", compute)
    return compute(data.reshape(-1), absmax, _get_4bit_code(scheme, data.device), block_size, shape, dtype)


def fields(qx):
    return [t for t in (qx.data, qx.scale, qx.nested_scale, qx.nested_offset) if t is not None]


# ---------------------------------------------------------------------------------------------
# the tables


def test_tables_are_bitsandbytes():
    F = bnb_functional()
    for scheme in SCHEMES:
        assert torch.equal(ref.codebook(scheme), F.get_4bit_type(scheme, device="cpu"))
        sorted_table = ref.codebook(scheme)[list(ref.sorted_codes(scheme))]
        assert bool((sorted_table[1:] >= sorted_table[:-1]).all())
    assert torch.equal(ref.dynamic_map(), F.create_dynamic_map())
    assert ref.codebook("nf4")[ref.zero_code("nf4")] == 0 and ref.codebook("fp4")[ref.zero_code("fp4")] == 0


# ---------------------------------------------------------------------------------------------
# the reference against bitsandbytes


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_bitsandbytes(scheme, dtype):
    """Codes, absmax, offset, nested absmax: bit for bit. Nested codes: bit for bit against
    bitsandbytes' default backend (the exact nearest entry); its CPU library's lookup table may
    pick a neighbour near a midpoint. Dequantized: bit for bit, against bitsandbytes' flat
    (default-backend) dequantization: its CPU library's AVX-512 path takes the absmax of a row's
    first block for blocks that straddle rows (a bitsandbytes bug), so its public
    dequantize_4bit is compared on whole-block rows (test_bnb_dequantize_on_layer_shapes)."""
    F = bnb_functional()
    default = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for k, (shape, bs) in enumerate(SHAPES):
        x = sample(shape, dtype, seed=k, device="cpu")
        x.view(-1)[5::11] = 0  # (not an all-zero last block: bitsandbytes' CPU path stores 1e-38 as its absmax)
        q, st = F.quantize_4bit(x, blocksize=bs, quant_type=scheme, compress_statistics=True)
        data, absmax = ref.quantize_4bit(x, scheme, bs)
        assert torch.equal(q.reshape(-1), data), (shape, bs)
        c8, nested, offset = ref.double_quant(absmax)
        assert torch.equal(st.offset, offset) and torch.equal(st.state2.absmax, nested)
        exact, _ = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
            default, absmax - offset, ref.dynamic_map(), ref.NESTED_BLOCK)
        assert torch.equal(exact, c8)
        live = nested.repeat_interleave(ref.NESTED_BLOCK)[:c8.numel()] > 0  # its CPU library writes code 0 for
        assert bool(((st.absmax.int() - c8.int())[live].abs() <= 1).all())  # a zero block; else a neighbour
        y = ref.dequantize_4bit(data, ref.dequantize_absmax(st.absmax, nested, offset), scheme, bs, shape, dtype)
        theirs = F.dequantize_blockwise(st.absmax, st.state2) + st.offset  # as dequantize_4bit does
        assert torch.equal(y, bnb_dequantize_flat(q, theirs, scheme, bs, shape, dtype))
        _, st1 = F.quantize_4bit(x, blocksize=bs, quant_type=scheme)
        assert torch.equal(st1.absmax, absmax)
        y1 = ref.dequantize_4bit(data, absmax, scheme, bs, shape, dtype)
        assert torch.equal(y1, bnb_dequantize_flat(q, absmax, scheme, bs, shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bnb_dequantize_on_layer_shapes(dtype):
    """bitsandbytes' public dequantize_4bit (its CPU library) on weights whose rows are whole blocks."""
    F = bnb_functional()
    x = sample((16, 128), dtype, seed=3, device="cpu")
    for scheme in SCHEMES:
        for double in (False, True):
            q, st = F.quantize_4bit(x, blocksize=64, quant_type=scheme, compress_statistics=double)
            qx = fastpeft.QuantizedTensor.from_bnb(q, st)
            for backend in ("torch", "triton"):
                assert torch.equal(fastpeft.dequantize(qx, backend=backend), F.dequantize_4bit(q, st))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ties_zeros_and_edges(scheme):
    """Values exactly on midpoints (lower entry), +-0, tiny values either side of 0, +-absmax, an
    all-zero block, an odd count: codes equal to bitsandbytes' and to every backend's."""
    F = bnb_functional()
    table = ref.codebook(scheme)[list(ref.sorted_codes(scheme))]
    mids = ref.midpoints(table)
    first = torch.cat([torch.tensor([1.0]), mids, -mids, table, torch.tensor([0.0, -0.0, 1e-4, -1e-4, 2.6e-3,
                                                                              -2.6e-3, -1.0])])
    first = torch.cat([first, torch.zeros(64 - first.numel())])  # block 0: absmax 1.0, so v = x exactly
    x = torch.cat([first, torch.zeros(64), torch.tensor([3.0, -3.0, 1.5, 0.0, -1.5])])  # zero block, odd tail
    q, st = F.quantize_4bit(x, blocksize=64, quant_type=scheme)
    data, absmax = ref.quantize_4bit(x, scheme, 64)
    assert torch.equal(q.reshape(-1), data) and torch.equal(st.absmax, absmax)
    codes = ref.unpack(data, x.numel())
    assert torch.equal(ref.codebook(scheme)[codes[1:16]], table[:-1])  # a midpoint takes the lower entry
    assert data[-1] & 0xF == ref.zero_code(scheme)  # the pad nibble: the code of 0.0
    qx = fastpeft.quantize(x.to(DEVICE), 4, scheme, backend="triton")
    assert torch.equal(qx.data.cpu(), data) and torch.equal(qx.scale.cpu(), absmax)


# ---------------------------------------------------------------------------------------------
# every backend against the reference


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax32", "double"])
def test_kernels_match_reference(poison_outputs, scheme, double_quant):
    """Each shape in one input dtype and one output dtype (in turn: every kernel sees all three)."""
    for k, (shape, bs) in enumerate(SHAPES):
        x = sample(shape, DTYPES[k % 3], seed=10 + k)
        got = fastpeft.quantize(x, 4, scheme, block_size=bs, double_quant=double_quant, backend="triton")
        data, absmax = ref.quantize_4bit(x.cpu(), scheme, bs)
        assert torch.equal(got.data.cpu(), data), (shape, bs)
        if double_quant:
            c8, nested, offset = ref.double_quant(absmax)
            assert torch.equal(got.scale.cpu(), c8) and torch.equal(got.nested_scale.cpu(), nested)
            assert torch.equal(got.nested_offset.cpu(), offset)
            absmax = ref.dequantize_absmax(c8, nested, offset)
        else:
            assert torch.equal(got.scale.cpu(), absmax)
        out_dtype = DTYPES[(k + 1) % 3]
        want = ref.dequantize_4bit(data, absmax, scheme, bs, shape, out_dtype)
        for backend in ("torch", "triton"):
            y = fastpeft.dequantize(got, out_dtype, backend=backend)
            assert y.dtype == out_dtype and torch.equal(y.cpu(), want), (shape, bs, backend, out_dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_error_bound_and_defaults(scheme):
    """Defaults: bits 4, blocks of 64, no double quantization. |y - x| <= absmax * (the largest
    half-gap of the table) elementwise (plus the rounding of y to the dtype)."""
    x = sample((6, 100), torch.float32, seed=4)
    qx = fastpeft.quantize(x, scheme=scheme)
    assert (qx.bits, qx.group_size, qx.block_size, qx.double_quant, qx.zero_point) == (4, 64, 64, False, None)
    table = ref.codebook(scheme).sort().values
    half_gap = float((table[1:] - table[:-1]).max()) / 2
    per_elem = qx.scale.cpu().repeat_interleave(64)[:600].reshape(6, 100)
    err = (fastpeft.dequantize(qx).cpu() - x.cpu()).abs()
    assert bool((err <= per_elem * half_gap * (1 + 1e-6)).all())
    assert fastpeft.dequantize(qx).dtype == torch.float32 and qx.nbytes == 300 + 4 * 10


def test_any_layout_and_empty():
    x = sample((40, 66), torch.bfloat16, seed=5)
    want = fastpeft.quantize(x.t().contiguous(), 4, "nf4", double_quant=True, backend="torch")
    for backend in ("torch", "triton"):
        got = fastpeft.quantize(x.t(), 4, "nf4", double_quant=True, backend=backend)  # transposed view
        assert all(torch.equal(a, b) for a, b in zip(fields(got), fields(want)))
        big = torch.zeros(2 * want.data.numel(), dtype=torch.uint8, device=x.device)
        big[1::2] = want.data  # strided codes
        strided = dataclasses.replace(want, data=big[1::2], scale=torch.stack([want.scale, want.scale], 1)[:, 1])
        assert torch.equal(fastpeft.dequantize(strided, backend=backend), fastpeft.dequantize(want, backend="torch"))
        empty = fastpeft.quantize(x[:0], 4, "fp4", double_quant=True, backend=backend)
        assert empty.data.shape == (0,) and empty.scale.shape == (0,) and float(empty.nested_offset) == 0.0
        assert fastpeft.dequantize(empty, backend=backend).shape == (0, 66)


def test_int64_offsets(monkeypatch):
    """The 64-bit index path (taken past 2**31 elements) on a small tensor: the same results."""
    from fastpeft.kernels import nf4 as knf4
    x = sample((7, 300), torch.float16, seed=9)
    want = fastpeft.quantize(x, 4, "fp4", block_size=32, double_quant=True, backend="torch")
    monkeypatch.setattr(knf4, "_int64", lambda n, pad: True)
    got = fastpeft.quantize(x, 4, "fp4", block_size=32, double_quant=True, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(fields(got), fields(want)))
    assert torch.equal(fastpeft.dequantize(got, backend="triton"), fastpeft.dequantize(want, backend="torch"))


# ---------------------------------------------------------------------------------------------
# bitsandbytes checkpoints


@pytest.mark.parametrize("scheme", SCHEMES)
def test_from_bnb_every_form(scheme):
    """Params4bit, (codes, QuantState), as_dict() packed / unpacked with a prefix, bf16 quant_storage:
    the same QuantizedTensor, dequantizing to bitsandbytes' values."""
    F = bnb_functional()
    import bitsandbytes as bnb
    w = sample((8, 128), torch.bfloat16, seed=6, device="cpu")  # rows of whole blocks (see above)
    p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=scheme, blocksize=64,
                          compress_statistics=True).to("cpu")
    want = F.dequantize_4bit(p.data, p.quant_state)
    forms = [fastpeft.QuantizedTensor.from_bnb(p), fastpeft.QuantizedTensor.from_bnb(p.data, p.quant_state)]
    packed = {f"weight.{k}": v for k, v in p.quant_state.as_dict(packed=True).items()}
    forms.append(fastpeft.QuantizedTensor.from_bnb(p.data, packed))
    forms.append(fastpeft.QuantizedTensor.from_bnb(p.data, p.quant_state.as_dict(packed=False)))
    q16, st16 = F.quantize_4bit(w, blocksize=64, quant_type=scheme, compress_statistics=True,
                                quant_storage=torch.bfloat16)
    forms.append(fastpeft.QuantizedTensor.from_bnb(q16, st16))
    for qx in forms:
        assert qx.double_quant and qx.scheme == scheme and qx.shape == (8, 128) and qx.dtype == torch.bfloat16
        assert torch.equal(fastpeft.dequantize(qx), want)
    ours = fastpeft.quantize(w, 4, scheme, double_quant=True)
    assert all(torch.equal(a, b) for a, b in zip(fields(ours), fields(forms[0])))


def test_fastpeft_tensor_in_bitsandbytes():
    """The other way: our codes and state, handed to bitsandbytes, dequantize to our values."""
    F = bnb_functional()
    x = sample((4, 128), torch.float16, seed=7, device="cpu")
    for double in (False, True):
        qx = fastpeft.quantize(x, 4, "nf4", double_quant=double)
        state2 = offset = None
        if double:
            state2 = F.QuantState(absmax=qx.nested_scale, code=ref.dynamic_map(), blocksize=256, dtype=torch.float32)
            offset = qx.nested_offset
        st = F.QuantState(absmax=qx.scale, shape=qx.shape, code=ref.codebook("nf4"), blocksize=64, quant_type="nf4",
                          dtype=qx.dtype, offset=offset, state2=state2)
        assert torch.equal(F.dequantize_4bit(qx.data.reshape(-1, 1), st), fastpeft.dequantize(qx))


def bnb_state(double=True, scheme="nf4", shape=(8, 96)):
    F = bnb_functional()
    q, st = F.quantize_4bit(sample(shape, torch.float16, seed=8, device="cpu"), blocksize=64, quant_type=scheme,
                            compress_statistics=double)
    return q, st


def _packed_with(st, **changes):
    d = st.as_dict(packed=True)
    key = next(k for k in d if "bitsandbytes__" in k)
    meta = json.loads(bytes(d[key].tolist()))
    meta.update(changes)
    d[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return d


BAD_BNB = {  # name -> (weight, quant state) builder, words the error must hold
    "blocksize-mismatch": (lambda q, st: (q, _packed_with(st, blocksize=128)), ("scale", "blocks")),
    "blocksize-invalid": (lambda q, st: (q, _packed_with(st, blocksize=48)), ("block size",)),
    "shape-mismatch": (lambda q, st: (q, _packed_with(st, shape=[8, 64])), ("weight", "bytes")),
    "row-packed": (lambda q, st: (q.reshape(8, 48), st), ("weight", "packing")),
    "quant_map": (lambda q, st: (q, {**st.as_dict(), "quant_map": ref.codebook("fp4")}), ("quant_map", "nf4")),
    "nested-map": (lambda q, st: (q, {**st.as_dict(), "nested_quant_map": -ref.dynamic_map()}),
                   ("nested_quant_map",)),
    "nested-blocksize": (lambda q, st: (q, _packed_with(st, nested_blocksize=128)), ("nested_blocksize",)),
    "nested-missing": (lambda q, st: (q, {k: v for k, v in st.as_dict().items() if k != "nested_absmax"}),
                       ("nested_absmax",)),
    "nested-short": (lambda q, st: (q, {**st.as_dict(), "nested_absmax": st.state2.absmax[:0]}), ("nested_scale",)),
    "quant_type": (lambda q, st: (q, {**st.as_dict(), "quant_type": "int4"}), ("scheme",)),
    "packed-type": (lambda q, st: (q, {k.replace("nf4", "fp4"): v for k, v in st.as_dict(packed=True).items()}),
                    ("quant_type",)),
    "packed-json": (lambda q, st: (q, {**{k: v for k, v in st.as_dict(packed=True).items() if "__" not in k},
                                       "quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)}),
                    ("JSON",)),
    "unknown-key": (lambda q, st: (q, {**st.as_dict(), "weight_format": 0}), ("weight_format",)),
    "codes-float": (lambda q, st: (q.float(), st), ("bytes",)),
    "absmax-codes-float": (lambda q, st: (q, {**st.as_dict(), "absmax": st.absmax.float()}), ("scale", "dtype")),
    "no-state": (lambda q, st: (q, None), ("quant_state",)),
}


@pytest.mark.parametrize("case", list(BAD_BNB))
def test_from_bnb_refuses_mismatches(case):
    build, words = BAD_BNB[case]
    weight, state = build(*bnb_state())
    with pytest.raises((ValueError, TypeError)) as info:
        fastpeft.QuantizedTensor.from_bnb(weight, state)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


# ---------------------------------------------------------------------------------------------
# hand-built tensors, files, arguments


def test_inconsistent_fields_fail_clearly():
    qx = fastpeft.quantize(sample((8, 100)), 4, "nf4", double_quant=True)
    plain = fastpeft.quantize(sample((8, 100)), 4, "fp4")
    cases = [
        (dataclasses.replace(plain, group_size=128), ("scale", "blocks")),          # wrong block size
        (dataclasses.replace(plain, group_size=48), ("block size",)),
        (dataclasses.replace(plain, data=plain.data.reshape(8, 50)), ("data", "flat")),  # another packing
        (dataclasses.replace(plain, data=plain.data[:-1]), ("data", "400 bytes")),
        (dataclasses.replace(plain, data=plain.data.view(torch.int8)), ("data", "uint8")),
        (dataclasses.replace(plain, scale=plain.scale.half()), ("scale", "float32")),
        (dataclasses.replace(plain, shape=torch.Size([8, 101])), ("data",)),
        (dataclasses.replace(plain, zero_point=torch.zeros(13, dtype=torch.int32)), ("zero_point",)),
        (dataclasses.replace(plain, axis=0), ("axis",)),
        (dataclasses.replace(plain, bits=8), ("bits",)),
        (dataclasses.replace(qx, nested_offset=None), ("nested_offset",)),
        (dataclasses.replace(qx, scale=qx.scale.float()), ("scale", "uint8")),
        (dataclasses.replace(qx, nested_scale=qx.nested_scale[:0]), ("nested_scale",)),
        (dataclasses.replace(qx, nested_offset=qx.nested_offset.reshape(1)), ("nested_offset",)),
        (dataclasses.replace(plain, nested_scale=qx.nested_scale, nested_offset=qx.nested_offset), ("scale",)),
    ]
    for bad, words in cases:
        for call in (lambda: fastpeft.dequantize(bad), bad.validate):
            with pytest.raises((ValueError, TypeError)) as info:
                call()
            for word in words:
                assert word in str(info.value), f"{word!r} not in: {info.value}"
    with pytest.raises(ValueError, match="nested_scale"):  # a zeropoint tensor carrying a nested state
        fastpeft.dequantize(dataclasses.replace(fastpeft.quantize(sample((2, 8)), 8, "zeropoint"),
                                                nested_scale=qx.nested_scale, nested_offset=qx.nested_offset))


def test_bad_arguments():
    x = sample((4, 64))
    for kwargs, exc, word in [
        (dict(bits=8, scheme="nf4"), ValueError, "bits"),
        (dict(bits=4, scheme="nf4", axis=0), ValueError, "axis"),
        (dict(bits=4, scheme="nf4", block_size=48), ValueError, "block size"),
        (dict(bits=4, scheme="nf4", block_size=64, group_size=32), ValueError, "block_size"),
        (dict(bits=4, scheme="fp4", double_quant=1), TypeError, "double_quant"),
        (dict(bits=4, scheme="zeropoint", block_size=64), ValueError, "block_size"),
        (dict(bits=4, scheme="absmax", double_quant=True), ValueError, "double_quant"),
        (dict(scheme="nf5"), ValueError, "nf4"),
    ]:
        with pytest.raises(exc, match=word):
            fastpeft.quantize(x, **kwargs)
    bad = x.clone()
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        fastpeft.quantize(bad, 4, "nf4")
    with pytest.raises(TypeError, match="dtype"):
        fastpeft.quantize(x.double(), 4, "nf4")
    assert fastpeft.quantize(x, 4, "nf4", group_size=128).block_size == 128


def test_save_load(tmp_path):
    from safetensors.torch import save_file
    for double in (False, True):
        qx = fastpeft.quantize(sample((5, 77), torch.bfloat16), 4, "fp4", block_size=32, double_quant=double)
        qx.save(str(tmp_path / "q.safetensors"))
        back = fastpeft.QuantizedTensor.load(str(tmp_path / "q.safetensors"), device=DEVICE)
        assert all(torch.equal(a, b) for a, b in zip(fields(back), fields(qx)))
        assert (back.scheme, back.group_size, back.shape, back.dtype) == ("fp4", 32, qx.shape, torch.bfloat16)
        assert torch.equal(fastpeft.dequantize(back), fastpeft.dequantize(qx))
    meta, tensors = qx._metadata(), {k: v.contiguous().cpu() for k, v in qx._tensors().items()}
    bad = [
        ({**meta, "double_quant": "false"}, tensors, "tensors"),
        ({**meta, "double_quant": "maybe"}, tensors, "double_quant"),
        ({**meta, "bits": "8"}, tensors, "bits"),
        ({**meta, "axis": "0"}, tensors, "axis"),
        ({**meta, "group_size": "64"}, tensors, "scale"),
        ({**meta, "group_size": "null"}, tensors, "block size"),
        (meta, {**tensors, "zero_point": torch.zeros(1, dtype=torch.int32)}, "tensors"),
        (meta, {**tensors, "nested_scale": -tensors["nested_scale"]}, "nested_scale"),
        (meta, {**tensors, "nested_offset": torch.tensor(float("nan"))}, "nested_offset"),
        (meta, {**tensors, "data": tensors["data"][:-1].clone()}, "data"),
    ]
    for i, (m, t, word) in enumerate(bad):
        path = str(tmp_path / f"bad{i}.safetensors")
        save_file(t, path, metadata=m)
        with pytest.raises((ValueError, TypeError)) as info:
            fastpeft.QuantizedTensor.load(path)
        assert path in str(info.value) and word in str(info.value).replace(path, ""), str(info.value)


def test_ops_are_registered_with_fakes():
    """torch.library.opcheck (schema, fake implementations, AOT dispatch) of the three ops."""
    x = sample((3, 40), torch.float16)
    qx = fastpeft.quantize(x, 4, "nf4", block_size=32, double_quant=True)
    plain = fastpeft.quantize(x, 4, "fp4", block_size=32)
    for backend in ("torch", "triton"):
        torch.library.opcheck(ops.quantize_4bit_op, (x, "nf4", 32, backend))
        torch.library.opcheck(ops.double_quant_op, (plain.scale, backend))
        torch.library.opcheck(ops.dequantize_4bit_op, (qx.data, qx.scale, qx.nested_scale, qx.nested_offset, "nf4",
                                                       32, [3, 40], torch.bfloat16, backend))
        torch.library.opcheck(ops.dequantize_4bit_op, (plain.data, plain.scale, None, None, "fp4", 32, [3, 40],
                                                       torch.float32, backend))


def test_double_quantization_stores_about_4_13_bits_a_weight():
    """QLoRA's figure (Dettmers et al. 2023, sec. 3): 4-bit codes, an 8-bit absmax per 64 weights, a
    32-bit nested absmax per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits a weight (4.5 without)."""
    w = torch.randn(256, 1024)
    bits = lambda q: 8 * sum(t.numel() * t.element_size() for t in (q.data, q.scale, q.nested_scale, q.nested_offset)
                             if t is not None) / w.numel()
    assert bits(fastpeft.quantize(w, 4, "nf4", block_size=64, double_quant=True)) == pytest.approx(4.127, abs=1e-3)
    assert bits(fastpeft.quantize(w, 4, "nf4", block_size=64)) == pytest.approx(4.5)


def test_torch_backend_dequantize_is_the_reference_bit_for_bit():
    """The torch backend's byte-table dequantization (ops.nf4.torch_dequantize_4bit) against the
    reference's unpack-and-gather, on odd sizes (a pad nibble), partial last blocks, every dtype."""
    from fastpeft.ops import nf4 as ops4
    g = torch.Generator().manual_seed(3)
    for shape, bs, dq, scheme in [((64, 96), 64, True, "nf4"), ((7, 37), 64, False, "fp4"), ((3, 33), 32, True, "nf4"),
                                  ((1,), 64, False, "nf4"), ((5, 100), 4096, True, "fp4"), ((2, 3, 50), 128, False, "nf4")]:
        q = fastpeft.quantize(torch.randn(*shape, generator=g), 4, scheme, block_size=bs, double_quant=dq,
                              backend="torch")
        absmax = ops4._absmax(q.scale, q.nested_scale, q.nested_offset)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            want = ref.dequantize_4bit(q.data, absmax, scheme, bs, shape, dtype)
            got = ops4.torch_dequantize_4bit(q.data, absmax, scheme, bs, shape, dtype)
            assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want), (shape, bs, dtype)
