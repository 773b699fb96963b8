"""QuantLinear: weight-only quantized linear layer (W8A16 / W4A16) on fastpeft.quant_linear, and
QLoRA's 4-bit NF4 / FP4 base layer (Dettmers et al., 2023) on fastpeft.ops.nf4.nf4_linear."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import _checks
from ._common import ORIGINAL, MergeableQuantized, fresh_linear, new_module
from ..ops import nf4 as nf4_ops
from ..ops.qlinear import ACTIVATIONS, quant_linear
from ..ops.quant import BITS, QuantizedTensor, dequantize, quantize
from ..reference.quant import SCHEMES


def _check_config(bits, group_size, scheme, activations=None, input_scale=None, double_quant=False):
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if isinstance(scheme, str) and scheme in nf4_ops.SCHEMES:  # QLoRA's 4-bit base
        if bits != 4:
            raise ValueError(f"scheme {scheme!r} is a 4-bit type: bits must be 4, got {bits!r}")
        if group_size not in nf4_ops.BLOCK_SIZES or isinstance(group_size, bool):
            raise ValueError(f"{scheme}: group_size is the block size of the flattened weight, one of "
                             f"{nf4_ops.BLOCK_SIZES} (bitsandbytes' block sizes), got {group_size!r}")
        if activations is not None or input_scale is not None:
            raise ValueError(f"{scheme} weights take 16-bit activations only (activations=None), got "
                             f"activations={activations!r}")
        return
    if double_quant:
        raise ValueError(f"double_quant is for the nf4 / fp4 schemes, not {scheme!r}")
    if scheme not in SCHEMES + nf4_ops.SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES + nf4_ops.SCHEMES}, got {scheme!r}")
    if group_size is not None:
        _checks.positive_int("group_size", group_size)
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "static" and input_scale is None:
        raise ValueError("activations='static' needs input_scale (the activation step, from a calibration "
                         "pass: fastpeft.quantize_model(..., activations='static', calibration_data=...))")
    if activations != "static" and input_scale is not None:
        raise ValueError(f"input_scale is only used with activations='static', got activations={activations!r}")
    if input_scale is not None:
        _checks.step_tensor("input_scale", input_scale)  # its value, before any weight is quantized


def _check_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and compute_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be None or one of {_checks.FLOAT_DTYPES}, got {compute_dtype!r}")


QUANT_STORAGE = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def _check_quant_storage(quant_storage, scheme) -> None:
    if quant_storage is None:
        return
    if not isinstance(quant_storage, torch.dtype) or quant_storage not in QUANT_STORAGE:
        raise TypeError(f"quant_storage must be None or one of {QUANT_STORAGE}, got {quant_storage!r}")
    if not _is_4bit_float(scheme):
        raise ValueError(f"quant_storage is for the nf4 / fp4 schemes (QLoRA's base), not {scheme!r}")


def _is_4bit_float(scheme) -> bool:
    return isinstance(scheme, str) and scheme in nf4_ops.SCHEMES


def _quantize_weight(w: torch.Tensor, bits, group_size, scheme, dtype, double_quant=False) -> QuantizedTensor:
    """``w`` [out, in] quantized per group of ``group_size`` input features (None: per output row),
    or for nf4 / fp4 in flat blocks of ``group_size`` elements (double_quant: the block absmax in
    8 bits), recorded as a ``dtype`` weight."""
    with torch.no_grad():
        if _is_4bit_float(scheme):
            q = quantize(w.detach(), 4, scheme, block_size=group_size, double_quant=double_quant)
        else:
            q = quantize(w.detach(), bits, scheme, axis=0 if group_size is None else None, group_size=group_size)
    return dataclasses.replace(q, dtype=dtype)


def _frozen_copy(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class QuantLinear(MergeableQuantized):
    """y = quant_linear(x, qweight, bias) (see fastpeft.quant_linear): weight-only quantization.

    The [out, in] weight is stored as buffers ``weight_data`` (codes: uint8 [out, ceil(in / 2)]
    packed two per byte at 4 bits; int8 (absmax) or uint8 (zeropoint) [out, in] at 8 bits),
    ``weight_scale`` float32 and ``weight_zero_point`` int32, one per group of ``group_size``
    input features ([out, in / group_size]), or per output row ([out]) when group_size is None:
    about 1/4 (W4) or 1/2 (W8) of an fp16 weight's bytes plus the scales. ``bias`` [out] (in
    ``dtype``) is a frozen Parameter. The weight is frozen; gradients flow to the input.

    activations: None (16-bit activations: W4A16 / W8A16), "dynamic" (int8 per token, absmax at
    run time) or "static" (int8 with the fixed per-tensor step ``input_scale``, a float32 0-d
    buffer, e.g. calibrated by fastpeft.quantize_model or learned by QAT): W4A8 / W8A8 on the
    int8 tensor cores (see fastpeft.quant_linear).

    scheme "nf4" / "fp4" (QLoRA's 4-bit base, Dettmers et al., 2023; bitsandbytes' Linear4bit
    layout): the weight read flat in blocks of ``group_size`` elements (one of bitsandbytes'
    block sizes; blocks may straddle rows), ``weight_data`` uint8 [ceil(out * in / 2)] (element
    2j in the high nibble), ``weight_scale`` the float32 block absmax [blocks], or with
    ``double_quant`` its 8-bit codes (uint8) read with ``weight_nested_scale`` (float32
    [ceil(blocks / 256)]) and ``weight_nested_offset`` (float32 []); no zero point. Forward:
    fastpeft.ops.nf4.nf4_linear (one fused dequantize-GEMM kernel; dx by the transposed one).

    compute_dtype (None: the input's): the dtype the layer computes in, as bitsandbytes'
    Linear4bit(compute_dtype=): x (and the bias) are cast to it and y back to x's dtype.

    quant_storage (nf4 / fp4 only; None: ``weight_data`` is the uint8 buffer above): the codes
    become a frozen nn.Parameter ``weight_data`` holding the same bytes viewed as this dtype
    (zero-padded to a whole number of its elements), so that FSDP2's ``fully_shard`` shards them
    (buffers are replicated on every rank), as bitsandbytes' ``bnb_4bit_quant_storage`` does for
    FSDP-QLoRA. torch.uint8 is the choice for FSDP2: its mixed precision casts no integer
    parameter. A float dtype (e.g. torch.bfloat16) must equal a MixedPrecisionPolicy's param_dtype
    (FSDP would cast the codes by value; forward raises if it finds them cast); ``module.to(dtype)``
    keeps their bytes. Forward reads the (all-gathered) parameter back as uint8 by a view, no copy.
    The quant state is stored the same way, so FSDP shards it too: ``weight_scale`` (the absmax,
    or its uint8 codes with double_quant) and ``weight_nested_scale`` become frozen Parameters of
    quant_storage holding their bytes (read back as float32 / uint8 by a view; a copy where the
    gathered bytes are not 4-byte aligned); the nested offset (one float) stays a buffer.
    ``state_dict()`` holds the codes as uint8 [ceil(out * in / 2)] and the quant state in a default
    layer's dtypes (a DTensor shard as stored), so a default layer loads it, and this one loads a
    default layer's (or the stored bytes).

    QLoRA / LoRA on this base: ``LoRALinear.from_linear(quant_layer)``. ``merge_(delta)``
    re-quantizes (dequantized weight + delta) with the same scheme, bits, group / block size and
    double quantization, keeping the buffers it replaces; ``unmerge_()`` restores the codes, scales,
    zero points and nested absmax bit for bit; ``merged_copy(delta)`` (see
    fastpeft.nn._common.MergeableQuantized).
    """

    _float32_buffers = ("weight_scale", "input_scale", "weight_nested_scale", "weight_nested_offset")
    quant_storage: torch.dtype | None = None  # the codes' storage (a Parameter's dtype), None: a uint8 buffer
    # what merge_ re-quantizes and unmerge_ restores (the codes first: never None)
    _merge_buffers = ("weight_data", "weight_scale", "weight_zero_point", "weight_nested_scale",
                      "weight_nested_offset")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int | None = 128, scheme: str = "zeropoint", device=None, dtype=None,
                 activations: str | None = None, input_scale=None, double_quant: bool = False,
                 compute_dtype: torch.dtype | None = None, quant_storage: torch.dtype | None = None) -> None:
        super().__init__()
        _checks.positive_int("in_features", in_features)
        _checks.positive_int("out_features", out_features)
        _check_config(bits, group_size, scheme, activations, input_scale, double_quant)
        _check_compute_dtype(compute_dtype)
        _check_quant_storage(quant_storage, scheme)
        w, b = fresh_linear(in_features, out_features, bias, device, dtype)  # quantized below
        self._build(_quantize_weight(w, bits, group_size, scheme, dtype or torch.get_default_dtype(), double_quant),
                    b, activations, input_scale, compute_dtype, quant_storage)

    def _build(self, qweight: QuantizedTensor, bias: nn.Parameter | None, activations, input_scale,
               compute_dtype: torch.dtype | None = None, quant_storage: torch.dtype | None = None) -> None:
        """The one constructor path: the layer over ``qweight``'s codes, scales and zero points (as
        they are), ``bias`` (a frozen Parameter or None) kept (cast to ``compute_dtype`` if given);
        the codes a frozen Parameter of ``quant_storage`` when given."""
        self.compute_dtype = compute_dtype
        self.quant_storage = quant_storage
        if compute_dtype is not None and bias is not None and bias.dtype != compute_dtype:
            bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=bias.requires_grad)
        self.out_features, self.in_features = (int(v) for v in qweight.shape)
        self.bits, self.group_size, self.scheme = qweight.bits, qweight.group_size, qweight.scheme
        self.weight_dtype = qweight.dtype
        self.activations = activations
        if input_scale is not None:
            input_scale = _checks.step_tensor("input_scale", input_scale).to(qweight.data.device)
        self.register_buffer("input_scale", input_scale)
        if _is_4bit_float(qweight.scheme):
            double = qweight.nested_scale is not None
            logical = {"weight_data": qweight.data, "weight_scale": qweight.scale if double else qweight.scale.float(),
                       "weight_nested_scale": qweight.nested_scale}
            # the logical (dtype, numel) of each tensor quant_storage stores as bytes
            self._stored_layout = {n: (t.dtype, t.numel()) for n, t in logical.items() if t is not None}
            for name, t in logical.items():
                if name == "weight_nested_scale":
                    self.register_buffer("weight_zero_point", None)  # the state_dict's order as before
                if quant_storage is None or t is None:
                    self.register_buffer(name, t)
                else:
                    setattr(self, name, nn.Parameter(self._stored(t), requires_grad=False))
            # float32 buffers that .to(dtype) keeps float32: the absmax (not its uint8 codes), the
            # nested scale and offset, unless stored as quant_storage bytes
            self._float32_buffers = tuple(n for n in ("input_scale", "weight_nested_scale", "weight_nested_offset")
                                          + (() if double else ("weight_scale",))
                                          if n not in self._stored_names())
            self.register_buffer("weight_nested_offset", qweight.nested_offset)
        else:
            self.register_buffer("weight_data", qweight.data)
            self.register_buffer("weight_scale", qweight.scale.float())
            self.register_buffer("weight_zero_point", qweight.zero_point.to(torch.int32))
            self.register_buffer("weight_nested_scale", None)
            self.register_buffer("weight_nested_offset", None)
        self._no_merge_backup()
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128,
                    scheme: str = "zeropoint", activations: str | None = None,
                    input_scale=None, double_quant: bool = False,
                    compute_dtype: torch.dtype | None = None,
                    quant_storage: torch.dtype | None = None) -> "QuantLinear":
        """Quantize ``linear``'s weight (group_size must divide in_features; None: per output
        row); its bias is copied in its dtype (in ``compute_dtype`` when given). activations /
        input_scale / compute_dtype / quant_storage as in the constructor. scheme "nf4" / "fp4":
        bitsandbytes' 4-bit layout in flat blocks of ``group_size`` (QLoRA: ``group_size=64,
        double_quant=True``; any in_features)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        _check_config(bits, group_size, scheme, activations, input_scale, double_quant)
        _check_compute_dtype(compute_dtype)
        _check_quant_storage(quant_storage, scheme)
        self = new_module(cls)
        self._build(_quantize_weight(linear.weight, bits, group_size, scheme, linear.weight.dtype, double_quant),
                    _frozen_copy(linear.bias), activations, input_scale, compute_dtype, quant_storage)
        return self

    @classmethod
    def from_bnb(cls, layer: nn.Module, quant_storage: torch.dtype | None = None) -> "QuantLinear":
        """A 4-bit layer over a bitsandbytes ``Linear4bit``'s (LinearNF4 / LinearFP4) own codes and
        quant state (nf4 / fp4, its block size, double quantization as it has it: the same weight,
        no re-quantization); its bias is copied, and its ``compute_dtype`` kept when set. A layer
        whose codes bitsandbytes repacked for its CPU kernel is restored to its standard layout first
        (by its own state_dict). quant_storage as in the constructor."""
        _check_quant_storage(quant_storage, "nf4")
        weight = getattr(layer, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if not isinstance(layer, nn.Module) or quant_state is None:
            raise TypeError(f"QuantLinear.from_bnb expects a bitsandbytes Linear4bit with a quantized weight "
                            f"(weight.quant_state; move it to a device first), got {type(layer).__name__}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            # repacked for bitsandbytes' CPU kernel (by an eval-mode forward); Linear4bit's own
            # state_dict restores its standard packing in place, as it does whenever it saves
            layer.state_dict()
            weight = layer.weight
            quant_state = getattr(weight, "quant_state", None)
            if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
                raise ValueError("QuantLinear.from_bnb: the layer's codes are packed for bitsandbytes' CPU kernel "
                                 "and could not be restored to its standard layout")
        compute_dtype = getattr(layer, "compute_dtype", None)
        bias = getattr(layer, "bias", None)
        return cls.from_quantized(QuantizedTensor.from_bnb(weight, quant_state),
                                  None if bias is None else bias.detach(),
                                  compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else None,
                                  quant_storage=quant_storage)

    @classmethod
    def from_quantized(cls, qweight: QuantizedTensor, bias: torch.Tensor | None = None,
                       activations: str | None = None, input_scale=None,
                       compute_dtype: torch.dtype | None = None,
                       quant_storage: torch.dtype | None = None) -> "QuantLinear":
        """A layer over an already quantized [out, in] weight (its codes, scales and zero points
        as they are: e.g. learned by QAT), per output row (axis=0) or per group along in.
        bias [out] or None is copied (in its dtype); the weight's ``dtype`` is the layer's.
        quant_storage (nf4 / fp4) as in the constructor."""
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"from_quantized expects a fastpeft.QuantizedTensor, got {type(qweight).__name__}")
        if len(qweight.shape) != 2:
            raise ValueError(f"from_quantized needs a 2-D [out, in] weight, got shape {tuple(qweight.shape)}")
        if qweight.group_size is None and qweight.axis != 0:
            raise ValueError(f"from_quantized needs per-output-row (axis=0) or per-group scales, got "
                             f"axis={qweight.axis}")
        _check_config(qweight.bits, qweight.group_size, qweight.scheme, activations, input_scale)
        _check_compute_dtype(compute_dtype)
        _check_quant_storage(quant_storage, qweight.scheme)
        if _is_4bit_float(qweight.scheme):
            nf4_ops.check_fields(qweight.data, qweight.scale, qweight.nested_scale, qweight.nested_offset,
                                 qweight.scheme, qweight.group_size, qweight.shape, qweight.dtype, origin="qweight.")
        if bias is not None:
            _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
            if bias.shape[0] != qweight.shape[0]:
                raise ValueError(f"bias shape {tuple(bias.shape)} does not match {qweight.shape[0]} outputs")
        self = new_module(cls)
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        copied = dataclasses.replace(qweight, data=qweight.data.clone(), scale=qweight.scale.clone(),
                                     zero_point=clone(qweight.zero_point), nested_scale=clone(qweight.nested_scale),
                                     nested_offset=clone(qweight.nested_offset))
        self._build(copied, _frozen_copy(bias), activations, input_scale, compute_dtype, quant_storage)
        return self

    # --- the codes and quant state as stored (quant_storage) and as read

    _stored_layout: dict = {}

    def _stored_names(self) -> tuple[str, ...]:
        """The tensors held as frozen Parameters of quant_storage: the 4-bit codes, the block
        absmax (or its 8-bit codes) and the nested absmax; () without quant_storage. The nested
        offset (one float) stays a buffer: FSDP shards no 0-d tensor."""
        if self.quant_storage is None:
            return ()
        return tuple(n for n in ("weight_data", "weight_scale", "weight_nested_scale") if n in self._stored_layout)

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        """A 1-D tensor (the uint8 codes, a uint8 or float32 absmax) as quant_storage stores it: its
        bytes viewed as quant_storage, zero-padded to a whole number of its elements."""
        storage = self.quant_storage
        if storage is None or storage == t.dtype:
            return t
        raw = t.contiguous().view(torch.uint8)
        pad = -raw.numel() % storage.itemsize
        if pad:
            raw = torch.cat([raw, raw.new_zeros(pad)])
        return raw.view(storage)

    def _read(self, name: str, data: torch.Tensor) -> torch.Tensor:
        """A stored tensor (``name``: one of ``_stored_names``; the all-gathered parameter under
        FSDP) read back as its logical dtype and size: a view, or a copy where its bytes do not
        start on the dtype's alignment."""
        storage = self.quant_storage
        if storage is None or name not in self._stored_layout:
            return data
        dtype, numel = self._stored_layout[name]
        if data.dtype != storage:
            raise RuntimeError(
                f"QuantLinear: its {name}, stored as {storage}, was cast to {data.dtype} (e.g. by FSDP's "
                f"MixedPrecisionPolicy(param_dtype={data.dtype})): its bytes are lost; use quant_storage="
                f"torch.uint8 (no mixed precision casts integers) or the param_dtype as quant_storage")
        if storage == dtype:  # stored as it is
            return data
        raw = data.view(torch.uint8)[:numel * dtype.itemsize]
        if dtype == torch.uint8:
            return raw
        if raw.data_ptr() % dtype.itemsize:
            raw = raw.clone()
        return raw.view(dtype)

    def _apply(self, fn, *args, **kwargs):
        """module.to(dtype) casts floating parameters by value: codes stored as a float dtype (and their
        copy from before a merge_) keep their bytes, following device moves only."""
        names = self._stored_names() + tuple(ORIGINAL + n for n in self._stored_names())
        saved = {n: t.data for n in names if (t := getattr(self, n, None)) is not None}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in saved.items():
            new = getattr(self, name)
            if new is not None and new.dtype != old.dtype:
                kept = old.to(device=new.device)
                if isinstance(new, nn.Parameter):
                    new.data = kept
                else:
                    setattr(self, name, kept)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The codes and quant state as a default layer holds them (uint8 codes [ceil(out * in / 2)],
        the absmax or its uint8 codes, the float32 nested absmax) whatever quant_storage; a sharded
        (DTensor) parameter is left as stored (distributed checkpoints load it back as is)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._stored_names():
            t = destination.get(prefix + name)
            if type(t) in (torch.Tensor, nn.Parameter):
                destination[prefix + name] = self._read(name, t.detach())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """The codes and quant state saved by any layer (a default layer's dtypes, or a quant_storage
        layer's stored bytes: a QUANT_STORAGE dtype holding exactly their padded bytes; values of
        another float dtype, converted) load into this one's; anything else is left to nn.Module's
        own checks."""
        if not _is_4bit_float(self.scheme):
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        state_dict = dict(state_dict)
        for name, (dtype, numel) in self._stored_layout.items():
            t = state_dict.get(prefix + name)
            if type(t) not in (torch.Tensor, nn.Parameter) or t.dim() != 1:
                continue
            nbytes = numel * dtype.itemsize
            if t.dtype != dtype and t.dtype in QUANT_STORAGE and t.numel() == -(-nbytes // t.element_size()):
                # a quant_storage layer's stored bytes (padded to whole elements of its dtype)
                t = t.contiguous().view(torch.uint8)[:nbytes].clone().view(dtype)
            elif t.dtype != dtype and t.numel() == numel and t.is_floating_point() == dtype.is_floating_point:
                t = t.to(dtype)  # values in another dtype (e.g. a float64 absmax), as a default layer converts them
            if t.dtype == dtype and t.numel() == numel and name in self._stored_names():
                t = self._stored(t)
            state_dict[prefix + name] = t
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def qweight(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor over this module's buffers (the codes as uint8)."""
        if _is_4bit_float(self.scheme):
            return QuantizedTensor(self._read("weight_data", self.weight_data), self._read("weight_scale", self.weight_scale),
                                   None, 4, self.scheme, None, self.group_size,
                                   torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                                   self._read("weight_nested_scale", self.weight_nested_scale),
                                   self.weight_nested_offset)
        return QuantizedTensor(self.weight_data, self.weight_scale, self.weight_zero_point, self.bits,
                               self.scheme, 0 if self.group_size is None else None, self.group_size,
                               torch.Size((self.out_features, self.in_features)), self.weight_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] (codes - zero_point) * scale (nf4 / fp4: table[code] * absmax) in ``dtype``
        (float32 by default)."""
        return dequantize(self.qweight, dtype)

    def _requantized(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """``weight`` [out, in] quantized as this layer's is (bits, scheme, group / block size,
        double quantization), as the layer's buffers (for merge_)."""
        double = self.weight_nested_scale is not None
        q = _quantize_weight(weight, self.bits, self.group_size, self.scheme, self.weight_dtype, double)
        new = {"weight_data": q.data, "weight_scale": q.scale}
        if _is_4bit_float(self.scheme):
            if double:
                new.update(weight_nested_scale=q.nested_scale, weight_nested_offset=q.nested_offset)
            for name in self._stored_names():
                new[name] = self._stored(new[name])
        else:
            new["weight_zero_point"] = q.zero_point
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        if cd is not None and isinstance(x, torch.Tensor) and x.dtype != cd:
            return self._linear(x.to(cd)).to(x.dtype)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if self.compute_dtype is not None and bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # a model cast after the layer was built (.to(dtype) casts the bias)
        if _is_4bit_float(self.scheme):
            return nf4_ops.nf4_linear(x, self.qweight, bias)
        return quant_linear(x, self.qweight, bias, activations=self.activations, input_scale=self.input_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"scheme={self.scheme}" + (", double_quant=True" if self.weight_nested_scale is not None else "")
                + ("" if self.activations is None else f", activations={self.activations}")
                + ("" if self.compute_dtype is None else f", compute_dtype={self.compute_dtype}")
                + ("" if self.quant_storage is None else f", quant_storage={self.quant_storage}"))
