"""What fastpeft's modules share: the one way a ``from_linear`` / ``from_quantized`` starts
(``new_module``), nn.Linear's initialization for a new layer (``fresh_linear``), float32
scales that stay float32 when a model is cast to 16-bit (``Float32Buffers``), and the merge of
a LoRA update into a quantized base (``MergeableQuantized``: Int8Linear and QuantLinear)."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def new_module(cls):
    """An instance of ``cls`` whose nn.Module state is set up and nothing else: what every
    ``from_linear`` / ``from_quantized`` starts from before the class's one ``_build`` fills it
    from existing tensors (calling ``__init__`` would allocate and initialize a weight only to
    throw it away)."""
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    return obj


def fresh_linear(in_features: int, out_features: int, bias: bool, device, dtype
                 ) -> tuple[torch.Tensor, nn.Parameter | None]:
    """nn.Linear's init for a new quantized layer: the float32 weight [out, in] to quantize, and
    the frozen bias Parameter [out] in ``dtype`` (None without bias)."""
    w = torch.empty(out_features, in_features, device=device, dtype=torch.float32)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    if not bias:
        return w, None
    b = torch.empty(out_features, device=device, dtype=dtype)
    nn.init.uniform_(b, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
    return w, nn.Parameter(b, requires_grad=False)


class Float32Buffers(nn.Module):
    """``model.to(torch.bfloat16)`` casts every floating buffer; the buffers named in
    ``_float32_buffers`` (quantization scales), and their copies kept by ``MergeableQuantized.merge_``
    (``_original_<name>``), follow device moves but stay float32."""

    _float32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, *args, **kwargs):
        names = self._float32_buffers + tuple(ORIGINAL + n for n in self._float32_buffers)
        saved = {name: getattr(self, name, None) for name in names}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in saved.items():
            new = None if old is None else getattr(self, name)
            if new is not None and new.dtype != torch.float32:
                setattr(self, name, old.to(device=new.device, dtype=torch.float32))
        return out


ORIGINAL = "_original_"  # prefix of the buffers holding a quantized layer's state from before merge_


class MergeableQuantized(Float32Buffers):
    """A frozen quantized linear layer that a LoRA update can be merged into (the base_layer of
    ``LoRALinear.from_linear(int8_or_4bit_layer)``): ``merge_(delta)`` re-quantizes (dequantized
    weight + delta) with the layer's own quantizer and keeps the buffers it replaces, which
    ``unmerge_()`` restores bit for bit; ``merged_copy(delta)`` leaves the layer as it is.

    A subclass names the buffers that hold its quantized weight in ``_merge_buffers`` (codes first:
    a buffer that is never None), calls ``_no_merge_backup()`` when it is built, and implements
    ``dequantized_weight()`` (float32 [out, in]) and ``_requantized(weight)`` (buffer name -> new
    tensor, for the same shapes). While merged, ``state_dict()`` holds the buffers from before the
    merge: the layer's own state (LoRALinear records the merge and redoes it after a load).
    """

    _merge_buffers: tuple[str, ...] = ()

    def _no_merge_backup(self) -> None:
        """No merge: the ``_original_<name>`` copies are None (non-persistent buffers: they follow .to())."""
        for name in self._merge_buffers:
            self.register_buffer(ORIGINAL + name, None, persistent=False)

    @property
    def device(self) -> torch.device:
        return getattr(self, self._merge_buffers[0]).device

    @property
    def base_merged(self) -> bool:
        """Whether ``merge_`` replaced the quantized weight (until ``unmerge_``)."""
        return getattr(self, ORIGINAL + self._merge_buffers[0]) is not None

    def dequantized_weight(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _requantized(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _check_delta(self, what: str, delta: object) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(delta, torch.Tensor):
            raise TypeError(f"{name}.{what}: delta must be a torch.Tensor, got {type(delta).__name__}")
        if not delta.is_floating_point():
            raise TypeError(f"{name}.{what}: delta must be a floating-point tensor, got {delta.dtype}")
        shape = (self.out_features, self.in_features)
        if tuple(delta.shape) != shape:
            raise ValueError(f"{name}.{what}: delta shape {tuple(delta.shape)} must be the weight's {shape}")
        if delta.device != self.device:
            raise ValueError(f"{name}.{what}: delta is on {delta.device}, the layer on {self.device}")
        return delta

    @torch.no_grad()
    def merge_(self, delta: torch.Tensor) -> None:
        """Re-quantize (dequantized weight + ``delta``, float [out, in]) into the layer's buffers in
        place, with its own quantizer (how a LoRA update is merged into a quantized base);
        ``unmerge_`` restores the current buffers exactly."""
        if self.base_merged:
            raise RuntimeError(f"{type(self).__name__}.merge_: already merged; unmerge_() first")
        delta = self._check_delta("merge_", delta)
        new = self._requantized(self.dequantized_weight() + delta.float())
        for name in self._merge_buffers:
            current = getattr(self, name)
            if current is not None:
                setattr(self, ORIGINAL + name, current.clone())
        for name, value in new.items():
            getattr(self, name).copy_(value)

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Restore the quantized weight from before ``merge_``, bit for bit."""
        if not self.base_merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge_: not merged")
        for name in self._merge_buffers:
            original = getattr(self, ORIGINAL + name)
            if original is not None:
                getattr(self, name).copy_(original)
        self._drop_merge_backup()

    def _drop_merge_backup(self) -> None:
        for name in self._merge_buffers:
            setattr(self, ORIGINAL + name, None)

    def merged_copy(self, delta: torch.Tensor | None = None):
        """A new layer of this type holding this one's quantized weight, or (dequantized weight +
        ``delta``) re-quantized when ``delta`` is given; no merge state is carried over, this layer
        is unchanged."""
        if delta is not None:
            self._check_delta("merged_copy", delta)
        out = copy.deepcopy(self)
        out._drop_merge_backup()
        if delta is not None:
            out.merge_(delta)
            out._drop_merge_backup()
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """While merged (``merge_``), the buffers from before the merge: the layer's own state."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._merge_buffers:
            original = getattr(self, ORIGINAL + name)
            if original is not None and prefix + name in destination:
                destination[prefix + name] = original
