"""NF4 / FP4 blockwise 4-bit quantization with bitsandbytes' semantics and layout, and QLoRA's
double quantization of the block absmax (Dettmers et al., 2023). Semantics:
fastpeft/reference/nf4.py; the QuantizedTensor that carries the result: fastpeft/ops/quant.py.

Registered ops (fastpeft/ops/_library.py), none differentiable:
  fastpeft::quantize_4bit    (packed codes uint8 [ceil(n / 2)], absmax float32 [blocks]) of x
  fastpeft::double_quant     (codes8 uint8 [blocks], nested absmax float32 [ceil(blocks / 256)],
                              offset float32 []) of an absmax vector (both: triton, or the CUDA C++
                             kernels of csrc/nf4.cu with backend="cuda", or torch)
  fastpeft::dequantize_4bit  table[code] * absmax, in the requested dtype (triton, or the CUDA C++
                             kernel of csrc/nf4.cu with backend="cuda", or torch)
  fastpeft::nf4_linear       y = x @ W_deq^T + bias, one fused dequantize-GEMM kernel (autograd:
                             dx by fastpeft::nf4_linear_grad_input, the transposed one; db)
  fastpeft::nf4_lora_linear  QLoRA's layer, y = x @ W_deq^T + bias + s * (dropout(x) A^T) B^T: the
                             LoRA shrink, then the 4-bit GEMM with s * U B^T in its epilogue
                             (fastpeft::nf4_lora_linear_fwd also returns U, kept for dB); its
                             backward through x, fastpeft::nf4_lora_linear_grad_input: V = dy B by
                             the shrink, then the transposed 4-bit GEMM starting from
                             s * dropout'(V A) (returns dx and V, kept for dA)
``quantize_4bit`` checks that x is finite inside its kernel (fastpeft._checks.check_values: on
CUDA a device-side assertion, no host sync).

``check_fields`` is the one check of a 4-bit tensor's layout (scheme, block size, shape, the
dtypes and shapes of codes, absmax and the double-quantization state, one device);
``dequantize_4bit`` runs it before anything is allocated or launched, in its kernel and in its
fake. The kernels index every operand as a dense array: strided, expanded or offset ones are
copied once (``contiguous()``) before the launch.
"""
from __future__ import annotations

import json
import math

import torch

from .. import _backend, _checks
from ..reference import nf4 as ref
from . import _qlora
from ._common import building_graph, dense, on_device, rows
from ._library import below_autograd, call, define, eager, needs_grad, register_autograd, still_eager

KERNELS = ("triton", "torch")  # in the order preferred on CUDA tensors
DEQUANTIZE_KERNELS = ("triton", "cuda", "torch")  # dequantize_4bit also has a CUDA C++ kernel (csrc/nf4.cu)
QUANTIZE_KERNELS = ("triton", "cuda", "torch")  # so do quantize_4bit and double_quant
SCHEMES = ref.SCHEMES
BLOCK_SIZES = ref.BLOCK_SIZES
DEFAULT_BLOCK_SIZE = ref.DEFAULT_BLOCK_SIZE
NESTED_BLOCK = ref.NESTED_BLOCK
_TABLES: dict = {}  # device -> the constant tables the kernels read


def _tables(device: torch.device) -> dict:
    """The codebooks and the midpoints of their sorted values, the dynamic map and its midpoints,
    on ``device`` (built once)."""
    t = _TABLES.get(device)
    if t is None:
        t = {}
        for scheme in SCHEMES:
            order = torch.tensor(ref.sorted_codes(scheme), dtype=torch.int64)
            table = ref.codebook(scheme)
            t[scheme] = (table.to(device), ref.midpoints(table[order]).to(device))
        dyn = ref.dynamic_map()
        t["dynamic"] = dyn.to(device)
        t["dynamic_mids"] = torch.cat([ref.midpoints(dyn), torch.full((1,), math.inf)]).to(device)
        _TABLES[device] = t
    return t


def _is_int(v: object) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _preview(v: object, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def check_config(scheme, block_size, shape, dtype, origin: str = "") -> tuple:
    """The tensor-free fields: scheme "nf4" or "fp4", block_size one of bitsandbytes' block sizes,
    shape non-negative ints (at least one dim), dtype a float dtype. Returns shape as a tuple."""
    if not isinstance(scheme, str):
        raise TypeError(f"{origin}scheme must be a str, got {type(scheme).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"{origin}scheme must be one of {SCHEMES}, got {scheme!r}")
    if not _is_int(block_size):
        raise TypeError(f"{origin}block size must be an int, got {type(block_size).__name__} {_preview(block_size)}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{origin}block size must be one of {BLOCK_SIZES} (bitsandbytes' block sizes), "
                         f"got {block_size}")
    if not isinstance(dtype, torch.dtype) or dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{origin}dtype must be one of float32, float16, bfloat16, got {dtype!r}")
    if not isinstance(shape, (list, tuple, torch.Size)) or not all(_is_int(n) for n in shape):
        raise TypeError(f"{origin}shape must be a sequence of ints, got {_preview(shape)}")
    shape = tuple(shape)
    if not shape or any(n < 0 for n in shape):
        raise ValueError(f"{origin}shape must have at least one dim and no negative size, got {_preview(list(shape))}")
    return shape


def layout(shape, block_size: int) -> tuple[int, int, int]:
    """(elements, packed bytes, blocks) of a tensor of ``shape``."""
    n = math.prod(shape)
    return n, (n + 1) // 2, (n + block_size - 1) // block_size


def check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype,
                 origin: str = "") -> tuple:
    """Check that the tensors are what ``quantize_4bit(x, scheme, block_size, double_quant)`` makes
    for an x of ``shape``; return shape as a tuple. Exactly: ``check_config``; data uint8 of shape
    [ceil(n / 2)] (flat, two codes a byte, bitsandbytes' order); without double quantization
    (nested_scale and nested_offset None) scale float32 [blocks]; with it scale uint8 [blocks]
    (codes into the dynamic map), nested_scale float32 [ceil(blocks / 256)] and nested_offset
    float32 []; all on one device. Reads no tensor value (no host sync). Raises TypeError (a type
    or dtype) or ValueError (a value or shape) naming the field, after ``origin``."""
    shape = check_config(scheme, block_size, shape, dtype, origin)
    n, nbytes, nb = layout(shape, block_size)
    if (nested_scale is None) != (nested_offset is None):
        raise ValueError(f"{origin}a double-quantized tensor needs both nested_scale and nested_offset "
                         f"(got {'nested_scale' if nested_offset is None else 'nested_offset'} alone)")
    double = nested_scale is not None
    tensors = [("data", data), ("scale", scale)] + ([("nested_scale", nested_scale),
                                                      ("nested_offset", nested_offset)] if double else [])
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{origin}{name} must be a torch.Tensor, got {type(t).__name__}")
    what = f"a {scheme} tensor of shape {_preview(list(shape))} ({n} elements)"
    if data.dtype != torch.uint8:
        raise TypeError(f"{origin}data has dtype {data.dtype}; {scheme} codes are packed two a byte in uint8")
    if tuple(data.shape) != (nbytes,):
        raise ValueError(f"{origin}data has shape {list(data.shape)}; {what} packs into {nbytes} bytes, stored flat "
                         f"([{nbytes}]: element 2j in the high nibble of byte j, as bitsandbytes packs)")
    want = torch.uint8 if double else torch.float32
    if scale.dtype != want:
        kind = "the 8-bit codes of a double-quantized absmax" if double else "the float32 absmax of each block"
        raise TypeError(f"{origin}scale has dtype {scale.dtype}; expected {want} ({kind})")
    if tuple(scale.shape) != (nb,):
        raise ValueError(f"{origin}scale has shape {list(scale.shape)}; {what} in blocks of {block_size} has "
                         f"{nb} blocks (a block size or quant state that does not match the codes?)")
    if double:
        n_nested = (nb + NESTED_BLOCK - 1) // NESTED_BLOCK
        for name, t, shp in (("nested_scale", nested_scale, (n_nested,)), ("nested_offset", nested_offset, ())):
            if t.dtype != torch.float32:
                raise TypeError(f"{origin}{name} has dtype {t.dtype}; expected torch.float32")
            if tuple(t.shape) != shp:
                raise ValueError(f"{origin}{name} has shape {list(t.shape)}; {nb} blocks double-quantized in "
                                 f"blocks of {NESTED_BLOCK} give {list(shp)}")
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{origin}" + ", ".join(name for name, _ in tensors) + " must be on one device, got "
                         + ", ".join(str(t.device) for _, t in tensors))
    return shape


def check_values(scale, nested_scale, nested_offset, origin: str = "") -> None:
    """The values the format promises: every absmax (or nested absmax) finite and >= 0, the offset
    finite (any code is a code). Reads the values (on CUDA an asynchronous device-side
    assertion): for files and ``validate(values=True)``, not for the dequantize hot path."""
    absmax = scale if nested_scale is None else nested_scale
    name = "scale" if nested_scale is None else "nested_scale"
    _checks.check_values(torch.isfinite(absmax) & (absmax >= 0),
                         lambda: f"{origin}{name} (a block absmax) must be finite and >= 0 in every block")
    if nested_offset is not None:
        _checks.check_values(torch.isfinite(nested_offset), lambda: f"{origin}nested_offset must be finite")


# ---------------------------------------------------------------------------------------------
# the ops

def _quantize_kernel(x, scheme, block_size, backend):
    if x.numel():
        _checks.check_values(torch.isfinite(x), lambda: "x contains NaN or inf: its block's absmax would be "
                                                        "meaningless")
    name = _backend.choose("quantize_4bit", x.device, QUANTIZE_KERNELS, backend)
    xc = x.contiguous()
    if name == "torch" or x.numel() == 0:
        return ref.quantize_4bit(xc, scheme, block_size)
    mids = _tables(x.device)[scheme][1]
    order = None if scheme == "nf4" else ref.sorted_codes(scheme)
    if name == "cuda":  # csrc/nf4.cu
        from . import _cext
        with on_device(xc):
            return _cext.nf4_quantize(xc.reshape(-1), mids, order, block_size)
    from ..kernels import nf4 as k
    with on_device(xc):
        return k.quantize_4bit(xc.reshape(-1), block_size, mids, order)


def _quantize_fake(x, scheme, block_size, backend):
    n = x.numel()
    return (x.new_empty(((n + 1) // 2,), dtype=torch.uint8),
            x.new_empty(((n + block_size - 1) // block_size,), dtype=torch.float32))


def _double_quant_kernel(absmax, backend):
    name = _backend.choose("double_quant", absmax.device, QUANTIZE_KERNELS, backend)
    if name == "torch" or absmax.numel() == 0:
        return ref.double_quant(absmax)
    a = absmax.contiguous()
    offset = a.mean()  # as the reference (and bitsandbytes): torch's float32 mean on the device
    if name == "cuda":  # csrc/nf4.cu
        from . import _cext
        with on_device(a):
            q8, nested = _cext.nf4_double_quant(a, offset, _tables(a.device)["dynamic_mids"])
        return q8, nested, offset
    from ..kernels import nf4 as k
    with on_device(a):
        q8, nested = k.double_quant(a, offset, _tables(a.device)["dynamic_mids"])
    return q8, nested, offset


def _double_quant_fake(absmax, backend):
    nb = absmax.numel()
    return (absmax.new_empty((nb,), dtype=torch.uint8),
            absmax.new_empty(((nb + NESTED_BLOCK - 1) // NESTED_BLOCK,), dtype=torch.float32),
            absmax.new_empty((), dtype=torch.float32))


# The torch backend's dequantization: the reference's values (table[code] * absmax[block] in
# float32, the same products), in three tensor ops instead of eight: a 256-entry table of both
# nibbles' values gathered by byte (no unpacking, no interleaving), then one multiply by the
# block absmax. On the CPU it is most of a 4-bit layer's cost outside its GEMM: the table is read
# as 256 int64 pairs (a 1-D gather, 2.3x faster than gathering 2-float rows on this project's
# VM), indexed by int64 (faster than int32 there), and the absmax multiplies the gathered buffer
# in place (a second fresh buffer cost 5x the multiply in page faults).
_BYTE_TABLES: dict = {}  # (scheme, device) -> float32 [256, 2]: (table[b >> 4], table[b & 15])


def _byte_table(scheme: str, device: torch.device) -> torch.Tensor:
    key = (scheme, str(device))
    t = _BYTE_TABLES.get(key)
    if t is None:
        b = torch.arange(256, device=device)
        cb = ref.codebook(scheme, device)
        t = torch.stack((cb[b >> 4], cb[b & 15]), dim=1)
        if device.type != "meta" and not t.is_inference():  # (an inference tensor stays out of the cache)
            _BYTE_TABLES[key] = t
    return t


def _pairs(scheme: str, device: torch.device) -> torch.Tensor:
    """The byte table read as int64 [256] (low word: the high nibble's value): the GEMV's."""
    return _byte_table(scheme, device).view(torch.int64).view(256)


def torch_dequantize_4bit(data, absmax, scheme, block_size, shape, dtype) -> torch.Tensor:
    """ref.dequantize_4bit(data, absmax, scheme, block_size, shape, dtype), bit for bit (absmax:
    float32 [blocks], dequantized when double-quantized)."""
    n = math.prod(shape)
    vals = _pairs(scheme, data.device).index_select(0, data.reshape(-1).long()).view(torch.float32)
    nb = absmax.numel()
    full = nb * block_size  # >= vals.numel(): an odd n's pad nibble shares the last block
    if vals.numel() < full:
        vals = torch.nn.functional.pad(vals, (0, full - vals.numel()))
    w = vals.view(nb, block_size).mul_(absmax.reshape(nb, 1)).view(-1)  # vals is this call's own buffer
    return (w if full == n else w[:n]).to(dtype).reshape(tuple(shape))


def torch_dequantize(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype) -> torch.Tensor:
    """The torch backend of dequantize_4bit: the reference's values."""
    return torch_dequantize_4bit(data, _absmax(scale, nested_scale, nested_offset), scheme, block_size, shape, dtype)


def _dequantize_checked(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype, backend):
    """dequantize_4bit once ``check_fields`` passed (shape a tuple)."""
    name = _backend.choose("dequantize_4bit", data.device, DEQUANTIZE_KERNELS, backend)
    if name == "torch" or data.numel() == 0:
        return torch_dequantize(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype)
    tables = _tables(data.device)
    if name == "cuda":  # csrc/nf4.cu
        from . import _cext
        with on_device(data):
            return _cext.nf4_dequantize(data, scale, nested_scale, nested_offset, tables[scheme][0],
                                        tables["dynamic"] if nested_scale is not None else None, block_size,
                                        math.prod(shape), dtype).reshape(shape)
    from ..kernels import nf4 as k
    dense = [None if t is None else t.contiguous() for t in (data, scale, nested_scale, nested_offset)]
    with on_device(data):
        return k.dequantize_4bit(*dense, tables[scheme][0], tables["dynamic"], block_size, shape, dtype)


def _dequantize_kernel(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype, backend):
    shape = check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype)
    return _dequantize_checked(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype, backend)


def _dequantize_fake(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype, backend):
    shape = check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype)
    return data.new_empty(shape, dtype=dtype)


quantize_4bit_op = define(
    "quantize_4bit(Tensor x, str scheme, int block_size, str? backend) -> (Tensor, Tensor)",
    _quantize_kernel, _quantize_fake)
double_quant_op = define(
    "double_quant(Tensor absmax, str? backend) -> (Tensor, Tensor, Tensor)", _double_quant_kernel, _double_quant_fake)
dequantize_4bit_op = define(
    "dequantize_4bit(Tensor data, Tensor scale, Tensor? nested_scale, Tensor? nested_offset, str scheme, "
    "int block_size, SymInt[] shape, ScalarType dtype, str? backend) -> Tensor", _dequantize_kernel, _dequantize_fake)


# ---------------------------------------------------------------------------------------------
# the functions fastpeft.quantize / fastpeft.dequantize call for scheme "nf4" / "fp4"

def quantize_4bit(x: torch.Tensor, scheme: str = "nf4", block_size: int = DEFAULT_BLOCK_SIZE,
                  double_quant: bool = False, *, backend: str | None = None):
    """(data, scale, nested_scale, nested_offset) of x, bitsandbytes' ``quantize_4bit(x, blocksize,
    compress_statistics=double_quant, quant_type=scheme)``: x read flat in blocks of
    ``block_size``; data uint8 [ceil(n / 2)] (element 2j in the high nibble); scale the float32
    block absmax [blocks], or with ``double_quant`` its 8-bit codes (uint8 [blocks]) with
    nested_scale float32 [ceil(blocks / 256)] and nested_offset float32 [] (else both None).
    x must be finite (checked in the op's kernel). Runs as ``torch.ops.fastpeft.quantize_4bit``
    (and ``fastpeft::double_quant``)."""
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    check_config(scheme, block_size, tuple(x.shape), x.dtype)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if backend is not None:
        _backend.check_name(backend)
    direct = eager(x.device.type, x)
    data, absmax = call(quantize_4bit_op, direct, x.detach(), scheme, block_size, backend)
    if not double_quant:
        return data, absmax, None, None
    q8, nested, offset = call(double_quant_op, direct, absmax, backend)
    return data, q8, nested, offset


def dequantize_4bit(data, scale, nested_scale, nested_offset, scheme: str, block_size: int, shape,
                    dtype: torch.dtype, *, backend: str | None = None) -> torch.Tensor:
    """table[code] * absmax[block] in float32 (absmax = DYNAMIC[code8] * nested_scale[b // 256] +
    nested_offset when double-quantized), cast once to ``dtype``, of ``shape``: bitsandbytes'
    ``dequantize_4bit``. The fields are checked against each other first (``check_fields``).
    Runs as ``torch.ops.fastpeft.dequantize_4bit``."""
    shape = check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype)
    if backend is not None:
        _backend.check_name(backend)
    return dequantize_checked(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype, backend)


def dequantize_checked(data, scale, nested_scale, nested_offset, scheme, block_size, shape, dtype, backend):
    """``dequantize_4bit`` once ``check_fields`` passed: the kernel called directly when eager, else
    the registered op (which checks again, for traced calls)."""
    args = (data, scale, nested_scale, nested_offset, scheme, block_size)
    if eager(data.device.type, data, scale, nested_scale, nested_offset):  # no dispatcher round trip
        return _dequantize_checked(*args, shape, dtype, backend)
    return dequantize_4bit_op(*args, list(shape), dtype, backend)


# ---------------------------------------------------------------------------------------------
# bitsandbytes' Params4bit + QuantState (object or checkpoint entries) -> the fields

_BNB_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_type", "blocksize", "dtype",
             "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_BNB_PACKED = "bitsandbytes__"  # the packed entry: "quant_state.bitsandbytes__nf4" (JSON bytes)
_BNB_JSON_MAX = 1 << 16  # bytes: a real packed quant state is about 200
_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in _checks.FLOAT_DTYPES}


def _bnb_state_dict(quant_state) -> dict:
    """A QuantState (read through its attributes) or its ``as_dict`` form (packed or not, keys
    with or without a "<module>.weight." prefix) as one dict of ``_BNB_KEYS`` entries."""
    origin = "from_bnb: "
    if not isinstance(quant_state, dict):
        if not all(hasattr(quant_state, a) for a in ("absmax", "code", "blocksize", "quant_type", "shape", "dtype")):
            raise TypeError(f"{origin}quant_state must be a bitsandbytes QuantState or its as_dict() entries, got "
                            f"{type(quant_state).__name__}")
        qs = quant_state
        out = {"absmax": qs.absmax, "quant_map": qs.code, "quant_type": qs.quant_type, "blocksize": qs.blocksize,
               "dtype": qs.dtype, "shape": qs.shape}
        state2 = getattr(qs, "state2", None)
        if state2 is not None:
            out.update(nested_absmax=state2.absmax, nested_quant_map=state2.code, nested_blocksize=state2.blocksize,
                       nested_dtype=state2.dtype, nested_offset=getattr(qs, "offset", None))
        return out
    out, packed = {}, None
    for key, value in quant_state.items():
        if not isinstance(key, str):
            raise TypeError(f"{origin}quant_state keys must be str, got {type(key).__name__}")
        tail = key.split(".")[-1]
        if tail.startswith(_BNB_PACKED):
            if packed is not None:
                raise ValueError(f"{origin}quant_state holds two packed entries: {packed[0]!r} and {key!r}")
            packed = (key, value)
        elif tail in _BNB_KEYS:
            if tail in out:
                raise ValueError(f"{origin}quant_state holds {tail!r} twice (under two prefixes?)")
            out[tail] = value
        else:
            raise ValueError(f"{origin}unexpected quant_state entry {key!r}; bitsandbytes' entries are "
                             f"{', '.join(_BNB_KEYS)} and quant_state.{_BNB_PACKED}<quant_type>")
    if packed is not None:
        key, value = packed
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1 \
                or value.numel() > _BNB_JSON_MAX:
            raise ValueError(f"{origin}{key!r} must be a 1-D uint8 tensor of JSON (at most {_BNB_JSON_MAX} bytes)")
        try:  # the packed JSON entry of a checkpoint: read on the host, once, at conversion
            extra = json.loads(bytes(value.tolist()).decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{origin}{key!r} is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"{origin}{key!r} must hold a JSON object, got {_preview(extra)}")
        for k, v in extra.items():
            if k not in _BNB_KEYS or k in out:
                raise ValueError(f"{origin}{key!r} holds an unexpected or repeated entry {k!r}")
            out[k] = v
        if out.get("quant_type") != key.split(".")[-1][len(_BNB_PACKED):]:
            raise ValueError(f"{origin}{key!r} says quant_type {_preview(out.get('quant_type'))}")
    return out


def _bnb_dtype(value, name: str) -> torch.dtype:
    if isinstance(value, str):
        value = _DTYPE_NAMES.get(value, value)
    if not isinstance(value, torch.dtype) or value not in _checks.FLOAT_DTYPES:
        raise TypeError(f"from_bnb: {name} must be float32, float16 or bfloat16, got {_preview(value)}")
    return value


def _bnb_table(value, table: torch.Tensor, name: str, what: str, device) -> None:
    """``value`` must be the float32 table (compared on its device: no host sync on CUDA)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or tuple(value.shape) != tuple(table.shape):
        raise ValueError(f"from_bnb: {name} must be a float32 tensor of shape {list(table.shape)} ({what})")
    if value.device != device:
        raise ValueError(f"from_bnb: {name} is on {value.device}, the absmax on {device}")
    _checks.check_values(value == table.to(value.device),
                         lambda: f"from_bnb: {name} is not {what}: fastpeft dequantizes with the standard table")


def from_bnb(weight, quant_state) -> dict:
    """The QuantizedTensor fields (data, scale, nested_scale, nested_offset, scheme, block_size,
    shape, dtype) of a bitsandbytes 4-bit weight: packed codes (any quant_storage dtype, stored
    [(n + 1) // 2 / itemsize, 1] or flat) and its QuantState (object or ``as_dict`` entries).
    Raises ValueError / TypeError naming the field that does not match."""
    origin = "from_bnb: "
    st = _bnb_state_dict(quant_state)
    missing = [k for k in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape") if st.get(k) is None]
    if missing:
        raise ValueError(f"{origin}the quant state has no {', '.join(missing)}")
    scheme, block_size = st["quant_type"], st["blocksize"]
    dtype = _bnb_dtype(st["dtype"], "dtype")
    shape = st["shape"]
    if isinstance(shape, (list, tuple)):  # JSON gives a list, QuantState a torch.Size
        shape = tuple(shape)
    shape = check_config(scheme, block_size, shape, dtype, origin)
    n, nbytes, nb = layout(shape, block_size)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{origin}weight must be a tensor (a bnb.nn.Params4bit or its packed codes), got "
                        f"{type(weight).__name__}")
    w = weight.detach()
    if w.dim() not in (1, 2) or (w.dim() == 2 and w.shape[1] != 1):
        raise ValueError(f"{origin}weight has shape {list(w.shape)}; bitsandbytes stores 4-bit codes flat, "
                         f"[(n + 1) // 2, 1] bytes (here [{nbytes}, 1]): a [rows, cols / 2] tensor is another "
                         f"packing (codes along each row)")
    if w.is_floating_point() or w.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        data = w.contiguous().view(torch.uint8).reshape(-1) if w.numel() else w.reshape(-1).to(torch.uint8)
    else:
        raise TypeError(f"{origin}weight has dtype {w.dtype}; expected the packed codes (uint8, or another "
                        f"quant_storage dtype holding them)")
    if data.numel() != nbytes:
        raise ValueError(f"{origin}weight holds {data.numel()} bytes of codes; shape {list(shape)} ({n} elements) "
                         f"packs into {nbytes} (a quant state of another weight?)")
    absmax = st["absmax"]
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"{origin}absmax must be a tensor, got {type(absmax).__name__}")
    _bnb_table(st["quant_map"], ref.codebook(scheme), "quant_map", f"bitsandbytes' {scheme} codebook", absmax.device)
    nested = [k for k in ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset")
              if st.get(k) is not None]
    if nested and len(nested) != 5:
        raise ValueError(f"{origin}a double-quantized state needs nested_absmax, nested_quant_map, "
                         f"nested_blocksize, nested_dtype and nested_offset; got only {', '.join(nested)}")
    nested_scale = nested_offset = None
    if nested:
        if st["nested_blocksize"] != NESTED_BLOCK or isinstance(st["nested_blocksize"], bool):
            raise ValueError(f"{origin}nested_blocksize must be {NESTED_BLOCK} (bitsandbytes' quantize_4bit), got "
                             f"{_preview(st['nested_blocksize'])}")
        if _bnb_dtype(st["nested_dtype"], "nested_dtype") != torch.float32:
            raise ValueError(f"{origin}nested_dtype must be float32, got {_preview(st['nested_dtype'])}")
        _bnb_table(st["nested_quant_map"], ref.dynamic_map(), "nested_quant_map", "bitsandbytes' 8-bit dynamic map",
                   absmax.device)
        nested_scale = st["nested_absmax"]
        off = st["nested_offset"]
        if isinstance(off, torch.Tensor):
            if off.numel() != 1 or not off.is_floating_point():
                raise ValueError(f"{origin}nested_offset must be one float, got a {off.dtype} tensor of shape "
                                 f"{list(off.shape)}")
            nested_offset = off.detach().reshape(()).to(torch.float32)
        elif isinstance(off, (int, float)) and not isinstance(off, bool):
            nested_offset = torch.tensor(float(off), dtype=torch.float32, device=absmax.device)
        else:
            raise TypeError(f"{origin}nested_offset must be a number, got {type(off).__name__}")
        scale = absmax
    else:
        scale = absmax.float() if absmax.dtype in (torch.float16, torch.bfloat16) else absmax
    return {"data": data, "scale": scale, "nested_scale": nested_scale, "nested_offset": nested_offset,
            "scheme": scheme, "block_size": block_size, "shape": shape, "dtype": dtype}


# ---------------------------------------------------------------------------------------------
# the 4-bit linear layer (QLoRA's frozen base, Dettmers et al., 2023): y = x @ W_deq^T + bias

def _absmax(scale, nested_scale, nested_offset):
    return scale if nested_scale is None else ref.dequantize_absmax(scale, nested_scale, nested_offset)


def _weight_dense(data, scale, nested_scale, nested_offset):
    return [None if t is None else t.contiguous() for t in (data, scale, nested_scale, nested_offset)]


def _torch_linear(x2, data, scale, nested_scale, nested_offset, scheme, block_size, out_features, bias):
    """The torch backend of the 4-bit linear layer on 2-D x (ref.linear_4bit): the weight in
    float32, rounded once to x's dtype, one GEMM in it."""
    w = torch_dequantize(data, scale, nested_scale, nested_offset, scheme, block_size, (out_features, x2.shape[-1]),
                         x2.dtype)
    return torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x2.dtype))


def _linear_kernel(x, data, scale, nested_scale, nested_offset, scheme, block_size, out_features, bias, backend):
    K = x.shape[-1]
    check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, (out_features, K), x.dtype)
    name = _backend.choose("nf4_linear", x.device, KERNELS, backend)
    x2 = rows(x)
    if name == "torch" or x2.shape[0] == 0 or K == 0 or out_features == 0:
        y = _torch_linear(x2, data, scale, nested_scale, nested_offset, scheme, block_size, out_features, bias)
    else:
        from ..kernels import nf4 as k
        tables = _tables(x.device)
        with on_device(x2):
            y = k.nf4_linear(x2, *_weight_dense(data, scale, nested_scale, nested_offset), tables[scheme][0],
                             tables["dynamic"], block_size, out_features, dense(bias), pairs=_pairs(scheme, x.device))
    return y.reshape(*x.shape[:-1], out_features)


def _linear_fake(x, data, scale, nested_scale, nested_offset, scheme, block_size, out_features, bias, backend):
    check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, (out_features, x.shape[-1]), x.dtype)
    return x.new_empty((*x.shape[:-1], out_features))


def _grad_input_kernel(dy, data, scale, nested_scale, nested_offset, scheme, block_size, in_features, backend):
    N = dy.shape[-1]
    check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, (N, in_features), dy.dtype)
    name = _backend.choose("nf4_linear", dy.device, KERNELS, backend)
    dy2 = rows(dy)
    if name == "torch" or dy2.shape[0] == 0 or N == 0 or in_features == 0:
        # ref.linear_4bit_grad_input: dy @ W, W rounded once to dy's dtype
        w = torch_dequantize(data, scale, nested_scale, nested_offset, scheme, block_size, (N, in_features), dy2.dtype)
        dx = dy2 @ w
    else:
        from ..kernels import nf4 as k
        tables = _tables(dy.device)
        with on_device(dy2):
            dx = k.nf4_linear_dx(dy2, *_weight_dense(data, scale, nested_scale, nested_offset), tables[scheme][0],
                                 tables["dynamic"], block_size, in_features)
    return dx.reshape(*dy.shape[:-1], in_features)


def _grad_input_fake(dy, data, scale, nested_scale, nested_offset, scheme, block_size, in_features, backend):
    check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, (dy.shape[-1], in_features), dy.dtype)
    return dy.new_empty((*dy.shape[:-1], in_features))


nf4_linear_op = define(
    "nf4_linear(Tensor x, Tensor data, Tensor scale, Tensor? nested_scale, Tensor? nested_offset, str scheme, "
    "int block_size, SymInt out_features, Tensor? bias, str? backend) -> Tensor",
    _linear_kernel, _linear_fake, autocast=(0, 8))  # x and bias; the codes and absmax stay
nf4_linear_grad_input_op = define(
    "nf4_linear_grad_input(Tensor dy, Tensor data, Tensor scale, Tensor? nested_scale, Tensor? nested_offset, "
    "str scheme, int block_size, SymInt in_features, str? backend) -> Tensor",
    _grad_input_kernel, _grad_input_fake)


class NF4LinearFunction(torch.autograd.Function):
    """Autograd of fastpeft::nf4_linear: dx = dy @ W_deq by fastpeft::nf4_linear_grad_input (the
    transposed dequantize-GEMM: no weight materialized), db = sum(dy); the codes are frozen.
    Under create_graph the backward is the torch composition (dequantize, matmul), recorded."""

    @staticmethod
    def forward(ctx, x, data, scale, nested_scale, nested_offset, scheme, block_size, out_features, bias, backend,
                direct=False):
        with below_autograd():
            y = call(nf4_linear_op, direct, x, data, scale, nested_scale, nested_offset, scheme, block_size,
                     out_features, bias, backend)
        ctx.save_for_backward(data, scale, nested_scale, nested_offset)
        ctx.cfg = (scheme, block_size, x.shape[-1], backend, bias is not None, direct)
        return y

    @staticmethod
    def backward(ctx, dy):
        data, scale, nested_scale, nested_offset = ctx.saved_tensors
        scheme, block_size, K, backend, has_bias, direct = ctx.cfg
        dx = db = None
        N = dy.shape[-1]
        if ctx.needs_input_grad[0]:
            if building_graph():  # recorded by autograd: differentiable in dy
                w = torch_dequantize(data, scale, nested_scale, nested_offset, scheme, block_size, (N, K), dy.dtype)
                dx = dy @ w
            else:
                with below_autograd():
                    dx = call(nf4_linear_grad_input_op, direct and still_eager(), dy, data, scale, nested_scale,
                              nested_offset, scheme, block_size, K, backend)
        if ctx.needs_input_grad[8] and has_bias:
            db = dy.reshape(-1, N).sum(0) if dy.numel() else dy.new_zeros(N)
        return dx, None, None, None, None, None, None, None, db, None, None


register_autograd(nf4_linear_op, NF4LinearFunction)


def nf4_linear(x: torch.Tensor, qweight, bias: torch.Tensor | None = None, *,
               backend: str | None = None) -> torch.Tensor:
    """The 4-bit linear layer of QLoRA (Dettmers et al., 2023) and bitsandbytes' Linear4bit:
    y = x @ dequantize(qweight)^T + bias, in x's dtype.

    x: [..., in] fp32/fp16/bf16 (any leading dims and strides). qweight: the [out, in] weight
    quantized by ``fastpeft.quantize(w, 4, "nf4" | "fp4", block_size=, double_quant=)`` (or read
    from bitsandbytes, ``QuantizedTensor.from_bnb``): flat blocks of any supported size, in may
    be any size (blocks may straddle rows). bias: [out] in x's dtype, or None. The triton backend
    is one fused kernel (kernels/nf4.py): the 4-bit tile is dequantized in registers (table
    lookup, block absmax, double-quantized absmax restored per block) and fed to tl.dot in x's
    dtype with fp32 accumulation; the weight is never materialized. The torch backend
    dequantizes to x's dtype and runs F.linear (the reference, fastpeft/reference/nf4.py).
    Gradients for x (dx = dy @ W_deq, the transposed dequantize-GEMM) and bias; the weight is
    frozen. Under ``torch.autocast`` x and bias are cast to the autocast dtype first.

    Runs as the registered op ``torch.ops.fastpeft.nf4_linear`` (backward:
    ``fastpeft::nf4_linear_grad_input``); no host sync.
    """
    N, device = _check_linear(x, qweight, bias)
    if backend is not None:
        _backend.check_name(backend)
    args = (x, qweight.data, qweight.scale, qweight.nested_scale, qweight.nested_offset, qweight.scheme,
            qweight.group_size, N, bias, backend)
    if eager(device.type, x, qweight.data, qweight.scale, qweight.nested_scale, qweight.nested_offset, bias):
        return NF4LinearFunction.apply(*args, True) if needs_grad(x, bias) else _linear_kernel(*args)
    return nf4_linear_op(*args)


def _check_linear(x, qweight, bias) -> tuple:
    """The checks of ``nf4_linear``'s arguments; returns (out features, device)."""
    from .quant import QuantizedTensor
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if not isinstance(qweight, QuantizedTensor):
        raise TypeError(f"qweight must be a fastpeft.QuantizedTensor (fastpeft.quantize(weight, 4, 'nf4')), "
                        f"got {type(qweight).__name__}")
    if qweight.scheme not in SCHEMES:
        raise ValueError(f"nf4_linear needs an nf4 / fp4 weight, got scheme {qweight.scheme!r} "
                         f"(fastpeft.quant_linear takes absmax / zeropoint weights)")
    shape = check_fields(qweight.data, qweight.scale, qweight.nested_scale, qweight.nested_offset, qweight.scheme,
                         qweight.group_size, qweight.shape, qweight.dtype, origin="qweight.")
    if len(shape) != 2:
        raise ValueError(f"qweight must be a quantized 2-D [out, in] weight, got shape {list(shape)}")
    N, K = shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but qweight {list(shape)} "
                         f"expects {K}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        if bias.shape[0] != N:
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match {N} output features")
    device = _checks.same_device(x=x, qweight_data=qweight.data, bias=bias)
    if bias is not None and not torch.is_autocast_enabled(device.type):
        _checks.same_dtype(x=x, bias=bias)
    return N, device


# ---------------------------------------------------------------------------------------------
# QLoRA's layer, fused: y = x @ W_deq^T + bias + scaling * (dropout(x) A^T) B^T
#
# fastpeft/ops/_qlora.py holds what every quantized base shares (U = dropout(x) A^T by the LoRA
# shrink, then the base's GEMM with scaling * U B^T in its accumulator; the backward's mirror; the
# autograd). Here: the 4-bit GEMMs (kernels/nf4.py ``_nf4_linear_kernel`` / the decode kernel /
# ``_nf4_linear_dx_kernel``, HAS_LORA) and the NF4 / FP4 weight's torch composition.

def _lora_forward(x, data, scale, nested_scale, nested_offset, scheme, block_size, out_features, bias,
                  lora_A, lora_B, scaling, dropout_p, seed, backend):
    """(y [..., out] in x's dtype, U = dropout(x) A^T float32 [M, r]) (fastpeft/ops/_qlora.py ``forward``)."""
    K = x.shape[-1]
    check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, (out_features, K), x.dtype)
    use_kernel = _backend.choose("nf4_linear", x.device, KERNELS, backend) != "torch"

    def fused(x2, lora):
        from ..kernels import nf4 as k
        tables = _tables(x.device)
        return k.nf4_linear(x2, *_weight_dense(data, scale, nested_scale, nested_offset), tables[scheme][0],
                            tables["dynamic"], block_size, out_features, dense(bias), lora=lora,
                            pairs=_pairs(scheme, x.device))
    return _qlora.forward(x, lora_A, lora_B, scaling, dropout_p, seed, out_features, lambda x2: _torch_linear(
        x2, data, scale, nested_scale, nested_offset, scheme, block_size, out_features, bias),
        fused if use_kernel else None)


def _lora_kernel(*args):
    return _lora_forward(*args)[0]


def _lora_fake(x, data, scale, nested_scale, nested_offset, scheme, block_size, out_features, bias,
               lora_A, lora_B, scaling, dropout_p, seed, backend):
    check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, (out_features, x.shape[-1]), x.dtype)
    return _qlora.forward_fake(x, lora_A, lora_B, out_features)


_LORA_ARGS = ("Tensor x, Tensor data, Tensor scale, Tensor? nested_scale, Tensor? nested_offset, str scheme, "
              "int block_size, SymInt out_features, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
              "float dropout_p, Tensor? seed, str? backend")
nf4_lora_linear_op = define(f"nf4_lora_linear({_LORA_ARGS}) -> Tensor", _lora_kernel,
                            lambda *a: _lora_fake(*a)[0], autocast=(0, 8, 9, 10))
nf4_lora_linear_fwd_op = define(f"nf4_lora_linear_fwd({_LORA_ARGS}) -> (Tensor, Tensor)", _lora_forward, _lora_fake)


def _lora_grad_input(dy, data, scale, nested_scale, nested_offset, scheme, block_size, in_features, lora_A, lora_B,
                     scaling, dropout_p, seed, backend):
    """(dx = dy W_deq + scaling * dropout'((dy B) A) [..., in] in dy's dtype, V = dy B float32
    [M, r]) (fastpeft/ops/_qlora.py ``grad_input``; triton: kernels/nf4.py ``nf4_linear_dx``)."""
    N = dy.shape[-1]
    check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, (N, in_features), dy.dtype)
    use_kernel = _backend.choose("nf4_linear", dy.device, KERNELS, backend) != "torch"

    def fused(dy2, lora):
        from ..kernels import nf4 as k
        tables = _tables(dy.device)
        return k.nf4_linear_dx(dy2, *_weight_dense(data, scale, nested_scale, nested_offset), tables[scheme][0],
                               tables["dynamic"], block_size, in_features, lora=lora)
    return _qlora.grad_input(dy, lora_A, lora_B, scaling, dropout_p, seed, in_features, lambda dtype: torch_dequantize(
        data, scale, nested_scale, nested_offset, scheme, block_size, (N, in_features), dtype),
        fused if use_kernel else None)


def _lora_grad_input_fake(dy, data, scale, nested_scale, nested_offset, scheme, block_size, in_features, lora_A,
                          lora_B, scaling, dropout_p, seed, backend):
    check_fields(data, scale, nested_scale, nested_offset, scheme, block_size, (dy.shape[-1], in_features), dy.dtype)
    return _qlora.grad_input_fake(dy, lora_A, lora_B, in_features)


nf4_lora_linear_grad_input_op = define(
    "nf4_lora_linear_grad_input(Tensor dy, Tensor data, Tensor scale, Tensor? nested_scale, Tensor? nested_offset, "
    "str scheme, int block_size, SymInt in_features, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
    "Tensor? seed, str? backend) -> (Tensor, Tensor)",
    _lora_grad_input, _lora_grad_input_fake)


# Autograd of fastpeft::nf4_lora_linear (fastpeft/ops/_qlora.py): dx and V = dy B by
# fastpeft::nf4_lora_linear_grad_input (fused), dA from V, dB = scaling * dy^T U, db = sum(dy).
NF4LoRALinearFunction = _qlora.lora_function(
    "NF4LoRALinearFunction", nf4_lora_linear_fwd_op, nf4_lora_linear_grad_input_op, 4, 3,
    lambda w, K: (*w[:6], K),  # data, scale, nested_scale, nested_offset, scheme, block_size; in_features
    lambda w, K, dtype: torch_dequantize(*w[:6], (w[6], K), dtype))
register_autograd(nf4_lora_linear_op, NF4LoRALinearFunction)


def nf4_lora_linear(x: torch.Tensor, qweight, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False, *,
                    seed: int | None = None, backend: str | None = None) -> torch.Tensor:
    """QLoRA's layer (Dettmers et al., 2023) with its forward fused:
    y = x @ dequantize(qweight)^T + bias + scaling * (dropout(x) A^T) B^T, in x's dtype.

    x, qweight, bias as ``nf4_linear``; lora_A [r, in], lora_B [out, r] (another float dtype than
    x's: the update computes in x's dtype, the gradients come back in theirs). Dropout
    (``dropout_p`` when ``training``): fastpeft.lora_linear's counter-based mask and seed. The
    triton backend is two launches: U = dropout(x) A^T in float32 by the LoRA shrink kernel, then
    the 4-bit GEMM (``nf4_linear``'s kernel) with scaling * U B^T added in its epilogue; y is
    rounded once from the float32 accumulator. The torch backend computes the unfused layer.
    Gradients for x, bias, lora_A and lora_B, as the unfused layer's; dx is fused the same way
    (V = dy B by the shrink, then the transposed 4-bit GEMM starting from scaling *
    dropout'(V A); see ``NF4LoRALinearFunction``). Runs as the registered op ``torch.ops.fastpeft.nf4_lora_linear``;
    no host sync.
    """
    from . import lora as lora_ops
    N, device = _check_linear(x, qweight, bias)
    A, B, scaling, p = _qlora.check_adapter(x, lora_A, lora_B, N, scaling, dropout_p, training, device)
    if backend is not None:
        _backend.check_name(backend)
    args = (x, qweight.data, qweight.scale, qweight.nested_scale, qweight.nested_offset, qweight.scheme,
            qweight.group_size, N, bias, A, B, scaling, p, lora_ops._dropout_seed(device, p, seed), backend)
    if eager(device.type, x, qweight.data, qweight.scale, qweight.nested_scale, qweight.nested_offset, bias, A, B):
        return NF4LoRALinearFunction.apply(*args, True) if needs_grad(x, bias, A, B) else _lora_kernel(*args)
    return nf4_lora_linear_op(*args)
