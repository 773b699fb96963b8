"""Absmax and zero-point quantization of tensors, and NF4 / FP4 (QLoRA's 4-bit types, with
bitsandbytes' layout): ``quantize`` / ``dequantize`` and the ``QuantizedTensor`` they exchange.
Semantics: fastpeft/reference/quant.py (absmax, zeropoint) and fastpeft/reference/nf4.py (nf4,
fp4; its ops: fastpeft/ops/nf4.py).

Registered ops (fastpeft/ops/_library.py), neither differentiable:
  fastpeft::quantize    (data, scale, zero_point) of x
  fastpeft::dequantize  (codes - zero_point) * scale in the requested dtype
``quantize`` checks that x is finite inside its kernel (fastpeft._checks.check_values: on CUDA
a device-side assertion, no host sync).

Untrusted inputs: ``check_fields`` (``nf4.check_fields`` for nf4 / fp4) is the one check of a
quantized tensor's layout (bits, scheme, axis / group_size, shape, dtypes and shapes of data /
scale / zero_point, one device) against what ``quantize`` makes. ``dequantize`` runs it before
anything is allocated or launched (in the op's kernel and in its fake, so traced calls check
too), ``QuantizedTensor.load`` runs it on a file's metadata and tensors (then also checks their
values), ``QuantizedTensor.validate`` on demand. The kernels index data, scale and zero_point as dense arrays: strided, expanded or
offset ones are copied once (``contiguous()``) before the launch.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from .. import _backend, _checks
from ..reference import quant as ref
from . import nf4
from ._common import on_device
from ._library import call, define, eager

KERNELS = ("triton", "cuda", "torch")  # in the order preferred on CUDA tensors
BITS = (8, 4)
SCHEMES = ref.SCHEMES + nf4.SCHEMES  # every scheme ``quantize`` takes
_DTYPES = {str(d).replace("torch.", ""): d for d in _checks.FLOAT_DTYPES}
FORMAT = "fastpeft.QuantizedTensor"  # the "format" entry of a saved file's metadata
_TENSORS = ("data", "scale", "zero_point")  # the tensors of a saved file
_META_PREVIEW = 80  # characters of a bad metadata entry quoted in an error


def _code_dtype(bits: int, scheme: str) -> torch.dtype:
    return torch.int8 if (bits == 8 and scheme == "absmax") else torch.uint8


def _data_shape(shape: tuple, bits: int) -> tuple:
    """The shape of the stored codes: 4-bit codes pack two per byte along the last dim."""
    return tuple(shape) if bits == 8 else (*shape[:-1], (shape[-1] + 1) // 2)


def _preview(v: object) -> str:
    """repr(v), cut to a readable length (a hostile file's shape may hold a million entries)."""
    text = repr(v)
    return text if len(text) <= _META_PREVIEW else text[:_META_PREVIEW] + "..."


def _is_int(v: object) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _check_config(bits, scheme, axis, group_size, shape, dtype, origin: str = "") -> tuple[tuple, int | None]:
    """The tensor-free fields of a quantized tensor; returns (shape as a tuple, axis in [0, ndim))."""
    if not _is_int(bits):
        raise TypeError(f"{origin}bits must be an int (8 or 4), got {type(bits).__name__} {bits!r}")
    if bits not in BITS:
        raise ValueError(f"{origin}bits must be 8 or 4, got {bits!r}")
    if not isinstance(scheme, str):
        raise TypeError(f"{origin}scheme must be a str, got {type(scheme).__name__}")
    if scheme not in ref.SCHEMES:
        raise ValueError(f"{origin}scheme must be one of {ref.SCHEMES}, got {scheme!r}")
    if not isinstance(dtype, torch.dtype) or dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{origin}dtype must be one of float32, float16, bfloat16, got {dtype!r}")
    if not isinstance(shape, (list, tuple)) or not all(_is_int(n) for n in shape):
        raise TypeError(f"{origin}shape must be a sequence of ints, got {_preview(shape)}")
    shape = tuple(shape)
    if not shape or any(n < 0 for n in shape):
        raise ValueError(f"{origin}shape must have at least one dim and no negative size, got {_preview(list(shape))}")
    if axis is not None and group_size is not None:
        raise ValueError(f"{origin}axis and group_size are exclusive (one scale per channel, or per group "
                         f"along the last dim), got axis={axis!r}, group_size={group_size!r}")
    if axis is not None:
        if not _is_int(axis):
            raise TypeError(f"{origin}axis must be an int or None, got {type(axis).__name__} {axis!r}")
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"{origin}axis {axis} is out of range for shape {_preview(list(shape))}")
        axis %= len(shape)
    if group_size is not None:
        if not _is_int(group_size):
            raise TypeError(f"{origin}group_size must be an int or None, got {type(group_size).__name__} "
                            f"{group_size!r}")
        if group_size <= 0 or shape[-1] % group_size:
            raise ValueError(f"{origin}group_size {group_size} must be > 0 and divide the last dim of shape "
                             f"{_preview(list(shape))}")
    return shape, axis


def check_fields(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype,
                 origin: str = "") -> tuple[tuple, int | None]:
    """Check that (data, scale, zero_point) are what ``quantize(x, bits, scheme, axis, group_size)``
    makes for an x of ``shape``, and that ``dtype`` is a float dtype; return (shape as a tuple,
    axis in [0, ndim)). Exactly: bits 8 or 4; a known scheme; axis in [-ndim, ndim) or
    group_size > 0 dividing the last dim (not both); shape non-negative ints; data of the
    scheme's code dtype and of shape ``shape`` (4 bits: last dim ceil(last / 2)); scale float32
    and zero_point int32 of ``reference.quant.slot_shape``; all three on one device. Reads no
    tensor value (no host sync). Raises TypeError (a type or dtype) or ValueError (a value or
    shape) naming the field, after ``origin`` (e.g. the file)."""
    shape, axis = _check_config(bits, scheme, axis, group_size, shape, dtype, origin)
    for name, t in (("data", data), ("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{origin}{name} must be a torch.Tensor, got {type(t).__name__}")
    code = _code_dtype(bits, scheme)
    if data.dtype != code:
        raise TypeError(f"{origin}data has dtype {data.dtype}; {bits}-bit {scheme} codes are {code}")
    if tuple(data.shape) != _data_shape(shape, bits):
        raise ValueError(f"{origin}data has shape {list(data.shape)}; a {bits}-bit tensor of shape "
                         f"{_preview(list(shape))} stores codes of shape {_preview(list(_data_shape(shape, bits)))}")
    slots = tuple(ref.slot_shape(shape, axis, group_size))
    for name, t, want in (("scale", scale, torch.float32), ("zero_point", zero_point, torch.int32)):
        if t.dtype != want:
            raise TypeError(f"{origin}{name} has dtype {t.dtype}; expected {want}")
        if tuple(t.shape) != slots:
            raise ValueError(f"{origin}{name} has shape {list(t.shape)}; axis={axis}, group_size={group_size} "
                             f"of shape {_preview(list(shape))} gives {_preview(list(slots))}")
    if not data.device == scale.device == zero_point.device:
        raise ValueError(f"{origin}data, scale and zero_point must be on one device, got {data.device}, "
                         f"{scale.device}, {zero_point.device}")
    return shape, axis


def _check_values(data, scale, zero_point, bits, scheme, origin: str = "") -> None:
    """The values the format promises: every scale finite and > 0, zero points inside the code
    range (0 for absmax), absmax codes inside [-qmax, qmax] (-128, or a 4-bit nibble 8, is no
    code). Reads the values (on CUDA an asynchronous device-side assertion): for files and
    ``validate(values=True)``, not for the dequantize hot path."""
    _checks.check_values(torch.isfinite(scale) & (scale > 0),
                         lambda: f"{origin}scale must be finite and > 0 in every slot")
    qmin, qmax = ref.qrange(bits, scheme)
    if scheme == "absmax":
        _checks.check_values(zero_point == 0, lambda: f"{origin}zero_point must be 0 for absmax")
    else:
        _checks.check_values((zero_point >= qmin) & (zero_point <= qmax),
                             lambda: f"{origin}zero_point must be in [{qmin}, {qmax}] for {bits}-bit {scheme}")
    if scheme == "absmax":
        if bits == 8:
            codes_ok = data != qmin - 1
        else:  # the two's complement nibble of qmin - 1 = -8
            nibble = 1 << (bits - 1)
            codes_ok = ((data & 0xF) != nibble) & ((data >> 4) != nibble)
        _checks.check_values(codes_ok, lambda: f"{origin}data holds a code outside [{qmin}, {qmax}]")


@dataclasses.dataclass
class QuantizedTensor:
    """Codes and quantization parameters of a tensor.

    absmax / zeropoint: ``data`` int8 (absmax) or uint8 (zeropoint) codes in the tensor's layout;
    4-bit codes packed two per byte along the last dim ([..., ceil(last / 2)], element 2j in the
    low nibble). ``scale`` float32 and ``zero_point`` int32 have one entry per slot (tensor,
    channel along ``axis``, or group of ``group_size`` along the last dim). Every scale is finite
    and > 0 and every zero point a code.

    nf4 / fp4 (bits 4, bitsandbytes' layout): the tensor read flat in blocks of ``group_size``
    (its ``block_size``; the last block may be shorter); ``data`` uint8 [ceil(n / 2)], element 2j
    in the HIGH nibble; ``zero_point`` None; ``scale`` the float32 absmax of each block
    [blocks], or with double quantization (``double_quant``) its uint8 codes into the 8-bit
    dynamic map, read with ``nested_scale`` (float32 [ceil(blocks / 256)]) and ``nested_offset``
    (float32 []): absmax = DYNAMIC[scale] * nested_scale[b // 256] + nested_offset.

    ``shape`` and ``dtype`` are the original's. Construction checks nothing (it is on the
    quantize path); ``dequantize`` checks the layout (``check_fields`` / ``nf4.check_fields``),
    ``load`` the layout and the values, ``validate`` either on demand. ``from_bnb`` converts
    bitsandbytes' Params4bit codes and QuantState.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    scheme: str
    axis: int | None
    group_size: int | None
    shape: torch.Size
    dtype: torch.dtype
    nested_scale: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def block_size(self) -> int | None:
        """nf4 / fp4: the block size (``group_size``); None for the other schemes."""
        return self.group_size if self.scheme in nf4.SCHEMES else None

    @property
    def double_quant(self) -> bool:
        """Whether the block absmax is itself quantized (nf4 / fp4 only)."""
        return self.nested_scale is not None

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, by field name (the names of a saved file's tensors)."""
        names = ("data", "scale", "zero_point", "nested_scale", "nested_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """The same codes and parameters on ``device``."""
        return dataclasses.replace(self, **{k: t.to(device) for k, t in self._tensors().items()})

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)

    def _check_fields(self, origin: str = "") -> tuple:
        if isinstance(self.scheme, str) and self.scheme in nf4.SCHEMES:
            _check_4bit_config(self.bits, self.axis, self.zero_point, origin)
            return nf4.check_fields(self.data, self.scale, self.nested_scale, self.nested_offset, self.scheme,
                                    self.group_size, self.shape, self.dtype, origin), None
        if self.nested_scale is not None or self.nested_offset is not None:
            raise ValueError(f"{origin}nested_scale / nested_offset belong to the nf4 / fp4 schemes, not "
                             f"{self.scheme!r}")
        return check_fields(self.data, self.scale, self.zero_point, self.bits, self.scheme, self.axis,
                            self.group_size, self.shape, self.dtype, origin)

    def validate(self, values: bool = False) -> "QuantizedTensor":
        """Raise TypeError / ValueError naming the first field that is not what ``quantize``
        makes (``check_fields``); with ``values``, also a scale that is not finite and > 0 (nf4 /
        fp4: a block absmax not finite and >= 0), a zero point or code outside the code range (a
        host read of those tensors). Returns self."""
        self._check_fields()
        if values:
            self._check_values()
        return self

    def _check_values(self, origin: str = "") -> None:
        if self.scheme in nf4.SCHEMES:
            nf4.check_values(self.scale, self.nested_scale, self.nested_offset, origin)
        else:
            _check_values(self.data, self.scale, self.zero_point, self.bits, self.scheme, origin)

    def _metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "bits": str(self.bits), "scheme": self.scheme,
                "axis": json.dumps(self.axis), "group_size": json.dumps(self.group_size),
                "shape": json.dumps(list(self.shape)), "dtype": str(self.dtype).replace("torch.", "")}
        if self.scheme in nf4.SCHEMES:
            meta["double_quant"] = json.dumps(self.double_quant)
        return meta

    def save(self, path: str) -> None:
        """Write a safetensors file (the tensors: data, scale, and zero_point or, for a
        double-quantized nf4 / fp4 tensor, nested_scale and nested_offset; the rest as metadata),
        after checking the layout (``validate``): no file that ``load`` would refuse."""
        from safetensors.torch import save_file
        self.validate()
        save_file({k: t.contiguous() for k, t in self._tensors().items()}, path, metadata=self._metadata())

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> "QuantizedTensor":
        """Read a file ``save`` wrote, trusting nothing in it: safetensors only (no pickle); the
        metadata parsed as JSON and checked before any tensor is read, then the tensors against
        it (``check_fields``) and their values (finite positive scales, zero points and codes in
        range; nf4 / fp4: finite absmax >= 0), all on the CPU; only then moved to ``device``. A
        bad file raises ValueError or TypeError naming the file and the field."""
        from safetensors import SafetensorError, safe_open
        origin = f"{path}: "
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path} is not a {FORMAT} file (metadata {_preview(meta)})")
                fields = _parse_metadata(meta, origin)
                bits, scheme, axis, group_size, shape, dtype = fields
                if isinstance(scheme, str) and scheme in nf4.SCHEMES:
                    _check_4bit_config(bits, axis, None, origin)
                    shape = nf4.check_config(scheme, group_size, shape, dtype, origin)
                    double = _parse_flag(meta, "double_quant", origin)
                    expected = ["data", "scale"] + (["nested_scale", "nested_offset"] if double else [])
                else:
                    shape, axis = _check_config(*fields, origin=origin)
                    expected = list(_TENSORS)
                names = sorted(f.keys())
                if names != sorted(expected):
                    raise ValueError(f"{origin}holds tensors {names}; expected {sorted(expected)}")
                tensors = {k: f.get_tensor(k) for k in expected}
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
        qx = cls(tensors["data"], tensors["scale"], tensors.get("zero_point"), bits, scheme, axis, group_size,
                 torch.Size(shape), dtype, tensors.get("nested_scale"), tensors.get("nested_offset"))
        qx._check_fields(origin)
        qx._check_values(origin)
        return qx.to(device)

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "QuantizedTensor":
        """A bitsandbytes 4-bit weight as a QuantizedTensor that dequantizes to the same values
        as ``bitsandbytes.functional.dequantize_4bit(weight, quant_state)``.

        ``weight``: a ``bnb.nn.Params4bit`` (its ``quant_state`` is used when ``quant_state`` is
        None) or the packed codes (any ``quant_storage`` dtype, e.g. [(n + 1) // 2, 1] uint8).
        ``quant_state``: a ``bitsandbytes.functional.QuantState``, or its serialized form as a
        checkpoint holds it (``QuantState.as_dict()``, packed or not: "absmax", "quant_map",
        "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4" ..., with or
        without the "<module>.weight." prefix); bitsandbytes need not be installed for a dict.
        Nothing is trusted: the quant type, block sizes, codebooks (they must be bitsandbytes'
        standard NF4 / FP4 tables and 8-bit dynamic map), shapes and dtypes are checked against
        the codes (ValueError / TypeError naming the field). No copy where the tensors are
        already dense; float16 / bfloat16 absmax become float32 (exactly, as bitsandbytes does)."""
        if quant_state is None:
            quant_state = getattr(weight, "quant_state", None)
            if quant_state is None:
                raise ValueError("from_bnb: give the quant_state (the weight carries none: not a quantized "
                                 "bnb.nn.Params4bit)")
        fields = nf4.from_bnb(weight, quant_state)
        qx = cls(fields["data"], fields["scale"], None, 4, fields["scheme"], None, fields["block_size"],
                 torch.Size(fields["shape"]), fields["dtype"], fields["nested_scale"], fields["nested_offset"])
        qx._check_fields("from_bnb: ")
        return qx


def _check_4bit_config(bits, axis, zero_point, origin: str = "") -> None:
    """The fields an nf4 / fp4 tensor fixes: bits 4, no axis, no zero point."""
    if not _is_int(bits) or bits != 4:
        raise ValueError(f"{origin}bits must be 4 for the nf4 / fp4 schemes, got {_preview(bits)}")
    if axis is not None:
        raise ValueError(f"{origin}axis must be None for the nf4 / fp4 schemes (blocks of the flattened tensor), "
                         f"got {_preview(axis)}")
    if zero_point is not None:
        raise ValueError(f"{origin}zero_point must be None for the nf4 / fp4 schemes (their codebooks hold 0.0)")


def _parse_flag(meta: dict, key: str, origin: str) -> bool:
    raw = meta.get(key)
    if raw not in ("true", "false"):
        raise ValueError(f"{origin}metadata {key} must be 'true' or 'false', got {_preview(raw)}")
    return raw == "true"


def _parse_metadata(meta: dict, origin: str) -> tuple:
    """(bits, scheme, axis, group_size, shape, dtype) of a file's metadata: numbers and shape
    as JSON, types left to ``_check_config``; a missing or unparsable entry is a ValueError."""
    raw = {}
    for key in ("bits", "scheme", "axis", "group_size", "shape", "dtype"):
        if not isinstance(meta.get(key), str):
            raise ValueError(f"{origin}metadata has no {key!r} entry (a string)")
        raw[key] = meta[key]
    parsed = {}
    for key in ("bits", "axis", "group_size", "shape"):
        try:
            parsed[key] = json.loads(raw[key])
        except (ValueError, RecursionError):  # JSONDecodeError, an over-long int, absurd nesting
            raise ValueError(f"{origin}metadata {key} = {_preview(raw[key])} cannot be parsed as JSON") from None
    if raw["dtype"] not in _DTYPES:
        raise ValueError(f"{origin}dtype {_preview(raw['dtype'])} is not one of {', '.join(_DTYPES)}")
    return parsed["bits"], raw["scheme"], parsed["axis"], parsed["group_size"], parsed["shape"], _DTYPES[raw["dtype"]]


def _validate(x, bits, scheme, axis, group_size):
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if scheme not in ref.SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if axis is not None and group_size is not None:
        raise ValueError("give axis (one scale per channel) or group_size (groups along the last dim), not both")
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis!r} out of range for a {x.dim()}-D tensor")
        axis %= x.dim()
    if group_size is not None:
        _checks.positive_int("group_size", group_size)
        if x.shape[-1] % group_size:
            raise ValueError(f"group_size {group_size} does not divide the last dim {x.shape[-1]} "
                             f"(shape {tuple(x.shape)})")
    return axis


def _kernels(backend: str):
    """(quantize, dequantize) of a kernel backend: same signatures in kernels/ and csrc/."""
    if backend == "triton":
        from ..kernels import quant as k
        return k.quantize, k.dequantize
    from . import _cext
    return _cext.quant_quantize, _cext.quant_dequantize


def _quantize_kernel(x, bits, scheme, axis, group_size, backend):
    if x.numel():
        _checks.check_values(torch.isfinite(x), lambda: "x contains NaN or inf: its slot's scale would be "
                                                        "meaningless")
    name = _backend.choose("quantize", x.device, KERNELS, backend)
    xc = x.contiguous()
    if name == "torch" or x.numel() == 0:
        scale, zp = ref.compute_qparams(xc, bits, scheme, axis, group_size)
        q = ref.quantize_codes(xc, scale, zp, bits, scheme, axis, group_size)
        data = ref.pack4(q) if bits == 4 else q.to(_code_dtype(bits, scheme))
        return data, scale, zp
    with on_device(xc):
        return _kernels(name)[0](xc, bits, scheme, axis, group_size)


def _quantize_fake(x, bits, scheme, axis, group_size, backend):
    slots = ref.slot_shape(x.shape, axis, group_size)
    return (x.new_empty(_data_shape(x.shape, bits), dtype=_code_dtype(bits, scheme)),
            x.new_empty(slots, dtype=torch.float32), x.new_empty(slots, dtype=torch.int32))


def torch_dequantize(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype) -> torch.Tensor:
    """The torch backend of dequantize: the reference's unpacking and (q - zero_point) * scale,
    saturated to dtype's finite range (reference.quant.dequantize)."""
    q = ref.unpack4(data, shape[-1], scheme == "absmax") if bits == 4 else data.to(torch.int32)
    return ref.dequantize(q, scale, zero_point, axis, group_size, dtype).reshape(shape)


def _dequantize_checked(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype, backend):
    """dequantize once ``check_fields`` passed (shape a tuple, axis in [0, ndim))."""
    name = _backend.choose("dequantize", data.device, KERNELS, backend)
    if name == "torch" or data.numel() == 0:
        return torch_dequantize(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype)
    # the kernels index all three as dense arrays (a no-op when they already are)
    data, scale, zero_point = data.contiguous(), scale.contiguous(), zero_point.contiguous()
    with on_device(data):
        return _kernels(name)[1](data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype)


def _dequantize_kernel(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype, backend):
    shape, axis = check_fields(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype)
    return _dequantize_checked(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype, backend)


def _dequantize_fake(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype, backend):
    shape, _ = check_fields(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype)
    return data.new_empty(shape, dtype=dtype)


quantize_op = define(
    "quantize(Tensor x, int bits, str scheme, int? axis, int? group_size, str? backend) -> (Tensor, Tensor, Tensor)",
    _quantize_kernel, _quantize_fake)
dequantize_op = define(
    "dequantize(Tensor data, Tensor scale, Tensor zero_point, int bits, str scheme, int? axis, int? group_size, "
    "SymInt[] shape, ScalarType dtype, str? backend) -> Tensor", _dequantize_kernel, _dequantize_fake)


def quantize(x: torch.Tensor, bits: int | None = None, scheme: str = "absmax", axis: int | None = None,
             group_size: int | None = None, *, block_size: int | None = None, double_quant: bool = False,
             backend: str | None = None) -> QuantizedTensor:
    """Quantize ``x`` to ``bits`` (8 or 4; None: 8, or 4 for nf4 / fp4) with one scale per tensor,
    per index along ``axis``, or per group of ``group_size`` along the last dim; or, for nf4 /
    fp4, per block of ``block_size`` (default 64) elements of the flattened tensor.

    absmax: symmetric codes in [-(2^(b-1)-1), 2^(b-1)-1], scale = absmax / qmax, zero_point 0.
    zeropoint: codes in [0, 2^b - 1]; the slot's min (or 0) maps to the lowest code and its max
    (or 0) to the highest (or, where rounding the zero point shifts the grid, the one below),
    and 0.0 dequantizes to exactly 0.0. An all-zero slot gets scale 1, a slot narrower than
    qmax * 2^-126 the smallest normal scale 2^-126 (so 1 / scale is finite; such a slot uses
    fewer codes); a range wider than float32's (e.g. [-3e38, 3e38]) still gets a finite scale.
    |dequantize(quantize(x), float32) - x| <= scale * (1/2 + 2^-13) elementwise (scale / 2 plus
    float32 rounding: reference.quant.ERROR_BOUND); other dtypes round that float32 value once.
    4-bit codes are packed two per byte.

    nf4 / fp4 (QLoRA's NormalFloat and bitsandbytes' FP4; Dettmers et al., 2023): bitsandbytes'
    ``quantize_4bit(x, blocksize=block_size, compress_statistics=double_quant, quant_type=scheme)``
    bit for bit (fastpeft/reference/nf4.py): each element becomes the code of the table entry
    nearest to x / absmax of its block, packed two a byte in bitsandbytes' order; ``block_size``
    one of 32, 64, ..., 4096 (``group_size`` is the same field: give either); ``double_quant``
    stores the block absmax in 8 bits (blocks of 256, mean subtracted), QLoRA's double
    quantization. ``axis`` must be None.

    Any strides. Empty x (0 rows) gives empty codes. x must be finite (checked in the op's kernel:
    on CUDA a device-side assertion, no host sync). Not differentiable. Runs as
    ``torch.ops.fastpeft.quantize`` (nf4 / fp4: ``fastpeft::quantize_4bit`` and
    ``fastpeft::double_quant``).
    """
    if isinstance(scheme, str) and scheme in nf4.SCHEMES:
        if bits is not None and (isinstance(bits, bool) or bits != 4):
            raise ValueError(f"{scheme} is a 4-bit scheme: bits must be 4 (or None), got {bits!r}")
        if axis is not None:
            raise ValueError(f"{scheme} quantizes the flattened tensor in blocks (block_size): axis must be None, "
                             f"got {axis!r}")
        if block_size is not None and group_size is not None and block_size != group_size:
            raise ValueError(f"block_size and group_size are one field for {scheme}: give one, got "
                             f"block_size={block_size!r}, group_size={group_size!r}")
        size = block_size if block_size is not None else group_size
        size = nf4.DEFAULT_BLOCK_SIZE if size is None else size
        data, scale, nested, offset = nf4.quantize_4bit(x, scheme, size, double_quant, backend=backend)
        return QuantizedTensor(data, scale, None, 4, scheme, None, size, x.shape, x.dtype, nested, offset)
    if block_size is not None:
        raise ValueError(f"block_size is for the nf4 / fp4 schemes (blocks of the flattened tensor); {scheme!r} "
                         f"takes axis or group_size")
    if double_quant is not False:
        raise ValueError(f"double_quant is for the nf4 / fp4 schemes, not {scheme!r}")
    bits = 8 if bits is None else bits
    axis = _validate(x, bits, scheme, axis, group_size)
    if backend is not None:
        _backend.check_name(backend)
    data, scale, zp = call(quantize_op, eager(x.device.type, x), x.detach(), bits, scheme, axis, group_size, backend)
    return QuantizedTensor(data, scale, zp, bits, scheme, axis, group_size, x.shape, x.dtype)


def dequantize(qx: QuantizedTensor, dtype: torch.dtype | None = None, *,
               backend: str | None = None) -> torch.Tensor:
    """(codes - zero_point) * scale, in ``dtype`` (default: the original tensor's dtype),
    computed in float32 and saturated to ``dtype``'s finite range before the cast (a NaN scale
    gives NaN); nf4 / fp4: table[code] * absmax of the block in float32, cast once (bitsandbytes'
    ``dequantize_4bit``). ``qx``'s fields are checked against each other first (``check_fields``:
    a hand-built or loaded QuantizedTensor whose codes, scales or zero points do not match its
    shape, bits, scheme, axis or group_size raises TypeError / ValueError naming the field);
    strided tensors are fine. Runs as ``torch.ops.fastpeft.dequantize`` (nf4 / fp4:
    ``fastpeft::dequantize_4bit``)."""
    if not isinstance(qx, QuantizedTensor):
        raise TypeError(f"dequantize expects a QuantizedTensor, got {type(qx).__name__}")
    shape, axis = qx._check_fields()
    dtype = qx.dtype if dtype is None else dtype
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    if backend is not None:
        _backend.check_name(backend)
    if qx.scheme in nf4.SCHEMES:
        return nf4.dequantize_checked(qx.data, qx.scale, qx.nested_scale, qx.nested_offset, qx.scheme,
                                      qx.group_size, shape, dtype, backend)
    args = (qx.data, qx.scale, qx.zero_point, qx.bits, qx.scheme, axis, qx.group_size)
    if eager(qx.data.device.type, qx.data, qx.scale, qx.zero_point):  # no dispatcher round trip, no second check
        return _dequantize_checked(*args, shape, dtype, backend)
    return dequantize_op(*args, list(shape), dtype, backend)
