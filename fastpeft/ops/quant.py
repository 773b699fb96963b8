"""Absmax and zero-point quantization of tensors: ``quantize`` / ``dequantize`` and the
``QuantizedTensor`` they exchange. Semantics: fastpeft/reference/quant.py.

Registered ops (fastpeft/ops/_library.py), neither differentiable:
  fastpeft::quantize    (data, scale, zero_point) of x
  fastpeft::dequantize  (codes - zero_point) * scale in the requested dtype
``quantize`` checks that x is finite inside its kernel (fastpeft._checks.check_values: on CUDA
a device-side assertion, no host sync).
"""
from __future__ import annotations

import dataclasses
import json

import torch

from .. import _backend, _checks
from ..reference import quant as ref
from ._common import on_device
from ._library import call, define, eager

KERNELS = ("triton", "cuda", "torch")  # in the order preferred on CUDA tensors
BITS = (8, 4)
_DTYPES = {str(d).replace("torch.", ""): d for d in _checks.FLOAT_DTYPES}


@dataclasses.dataclass
class QuantizedTensor:
    """Codes and quantization parameters of a tensor.

    ``data``: int8 (absmax) or uint8 (zeropoint) codes in the tensor's layout; 4-bit codes
    packed two per byte along the last dim ([..., ceil(last / 2)]). ``scale`` float32 and
    ``zero_point`` int32 have one entry per slot (tensor, channel along ``axis``, or group
    of ``group_size`` along the last dim). ``shape`` and ``dtype`` are the original's.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    scheme: str
    axis: int | None
    group_size: int | None
    shape: torch.Size
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero_point))

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """The same codes and parameters on ``device``."""
        return dataclasses.replace(self, data=self.data.to(device), scale=self.scale.to(device),
                                   zero_point=self.zero_point.to(device))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)

    def _metadata(self) -> dict[str, str]:
        return {"format": "fastpeft.QuantizedTensor", "bits": str(self.bits), "scheme": self.scheme,
                "axis": json.dumps(self.axis), "group_size": json.dumps(self.group_size),
                "shape": json.dumps(list(self.shape)), "dtype": str(self.dtype).replace("torch.", "")}

    def save(self, path: str) -> None:
        """Write a safetensors file (tensors data/scale/zero_point, the rest as metadata)."""
        from safetensors.torch import save_file
        save_file({"data": self.data.contiguous(), "scale": self.scale.contiguous(),
                   "zero_point": self.zero_point.contiguous()}, path, metadata=self._metadata())

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> "QuantizedTensor":
        from safetensors import safe_open
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "fastpeft.QuantizedTensor":
                raise ValueError(f"{path} is not a fastpeft.QuantizedTensor file (metadata {meta})")
            t = {k: f.get_tensor(k) for k in ("data", "scale", "zero_point")}
        return cls(t["data"], t["scale"], t["zero_point"], int(meta["bits"]), meta["scheme"],
                   json.loads(meta["axis"]), json.loads(meta["group_size"]),
                   torch.Size(json.loads(meta["shape"])), _DTYPES[meta["dtype"]])


def _validate(x, bits, scheme, axis, group_size):
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if scheme not in ref.SCHEMES:
        raise ValueError(f"scheme must be one of {ref.SCHEMES}, got {scheme!r}")
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


def _code_dtype(bits: int, scheme: str) -> torch.dtype:
    return torch.int8 if (bits == 8 and scheme == "absmax") else torch.uint8


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
    shape = tuple(x.shape)
    data_shape = (*shape[:-1], (shape[-1] + 1) // 2) if bits == 4 else shape
    slots = ref.slot_shape(x.shape, axis, group_size)
    return (x.new_empty(data_shape, dtype=_code_dtype(bits, scheme)), x.new_empty(slots, dtype=torch.float32),
            x.new_empty(slots, dtype=torch.int32))


def torch_dequantize(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype) -> torch.Tensor:
    """The torch backend of dequantize: the reference's unpacking and (q - zero_point) * scale."""
    q = ref.unpack4(data, shape[-1], scheme == "absmax") if bits == 4 else data.to(torch.int32)
    return ref.dequantize_codes(q, scale, zero_point, axis, group_size).to(dtype).reshape(shape)


def _dequantize_kernel(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype, backend):
    name = _backend.choose("dequantize", data.device, KERNELS, backend)
    if name == "torch" or data.numel() == 0:
        return torch_dequantize(data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype)
    with on_device(data):
        return _kernels(name)[1](data, scale, zero_point, bits, scheme, axis, group_size, shape, dtype)


quantize_op = define(
    "quantize(Tensor x, int bits, str scheme, int? axis, int? group_size, str? backend) -> (Tensor, Tensor, Tensor)",
    _quantize_kernel, _quantize_fake)
dequantize_op = define(
    "dequantize(Tensor data, Tensor scale, Tensor zero_point, int bits, str scheme, int? axis, int? group_size, "
    "SymInt[] shape, ScalarType dtype, str? backend) -> Tensor", _dequantize_kernel,
    lambda data, scale, zp, bits, scheme, axis, g, shape, dtype, backend: data.new_empty(shape, dtype=dtype))


def quantize(x: torch.Tensor, bits: int = 8, scheme: str = "absmax", axis: int | None = None,
             group_size: int | None = None, *, backend: str | None = None) -> QuantizedTensor:
    """Quantize ``x`` to ``bits`` (8 or 4) with one scale per tensor, per index along ``axis``,
    or per group of ``group_size`` along the last dim.

    absmax: symmetric codes in [-(2^(b-1)-1), 2^(b-1)-1], scale = absmax / qmax, zero_point 0.
    zeropoint: codes in [0, 2^b - 1]; the slot's min (or 0) maps to the lowest code and its max
    (or 0) to the highest, and 0.0 dequantizes to exactly 0.0. An all-zero slot gets scale 1.
    |dequantize(quantize(x)) - x| <= scale / 2 elementwise. 4-bit codes are packed two per byte.
    x must be finite (checked in the op's kernel: on CUDA a device-side assertion, no host sync).
    Not differentiable. Runs as ``torch.ops.fastpeft.quantize``.
    """
    axis = _validate(x, bits, scheme, axis, group_size)
    if backend is not None:
        _backend.check_name(backend)
    data, scale, zp = call(quantize_op, eager(x.device.type, x), x.detach(), bits, scheme, axis, group_size, backend)
    return QuantizedTensor(data, scale, zp, bits, scheme, axis, group_size, x.shape, x.dtype)


def dequantize(qx: QuantizedTensor, dtype: torch.dtype | None = None, *,
               backend: str | None = None) -> torch.Tensor:
    """(codes - zero_point) * scale, in ``dtype`` (default: the original tensor's dtype).
    Runs as ``torch.ops.fastpeft.dequantize``."""
    if not isinstance(qx, QuantizedTensor):
        raise TypeError(f"dequantize expects a QuantizedTensor, got {type(qx).__name__}")
    dtype = qx.dtype if dtype is None else dtype
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    if backend is not None:
        _backend.check_name(backend)
    direct = eager(qx.data.device.type, qx.data, qx.scale, qx.zero_point)  # no dispatcher round trips
    return call(dequantize_op, direct, qx.data, qx.scale, qx.zero_point, qx.bits, qx.scheme, qx.axis, qx.group_size,
                list(qx.shape), dtype, backend)
