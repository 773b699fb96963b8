"""Many LoRA adapters in one batch: each sample names its adapter (PEFT's ``adapter_names=``).

    with fastpeft.adapter_batch(model, ["sql", "__base__", "chat", "sql"]):
        out = model.generate(input_ids)          # input_ids: [4, S]

Inside the block every LoRALinear computes, for a row of sample b,

    y = base(x) + scaling_a * (x A_a^T) B_a^T     with a = adapter_names[b]

and nothing for "__base__" or for an adapter that layer does not hold: PEFT's mixed-batch
semantics. Each layer makes ONE ``multi_lora`` call over the whole batch, on its cached stack
of adapters (``LoRALinear.adapter_stacks``). The per-sample slot numbers are built once per
block on the host and moved to each device once (one small tensor per distinct set of layer
adapters); at a forward they are only expanded over the sequence on the device, so no layer
syncs with the host. Inference only: refused while the model trains with gradients enabled.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._checks import positive_int
from .lora import lora_adapters, lora_modules
from .nn.lora import BASE_ADAPTER, LoRALinear


def _layer_device(m: LoRALinear) -> torch.device:
    return m.base_layer.device if m.base_layer is not None else m.weight.device


class AdapterBatch:
    """The routing of one ``adapter_batch`` block: sample -> adapter slot, per layer kind."""

    def __init__(self, model: nn.Module, adapter_names: Sequence[str], expand_size: int = 1) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"adapter_batch expects an nn.Module, got {type(model).__name__}")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list of str (one per sample), got "
                            f"{type(adapter_names).__name__}")
        if not adapter_names or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"adapter_names must be a non-empty list of str, got {adapter_names!r}")
        self.model = model
        self.adapter_names = list(adapter_names)
        self.expand_size = positive_int("expand_size", expand_size)
        self._layers: dict[LoRALinear, tuple] = {}
        self._indices: dict[tuple, torch.Tensor] = {}  # (slots, device) -> [batch] int32
        self._expanded: dict[tuple, torch.Tensor] = {}  # (slots, device, batch, seq) -> [rows]

    def __enter__(self) -> "AdapterBatch":
        model = self.model
        if model.training and torch.is_grad_enabled():
            raise RuntimeError("fastpeft.adapter_batch is for inference (as PEFT's adapter_names=): the "
                               "model is in training mode with gradients enabled; call model.eval() "
                               "or use torch.no_grad()")
        layers = lora_modules(model)
        if not layers:
            raise ValueError("adapter_batch: the model has no LoRALinear modules")
        known = lora_adapters(model)
        unknown = sorted({n for n in self.adapter_names if n != BASE_ADAPTER and n not in known})
        if unknown:
            raise ValueError(f"adapter_batch: unknown adapter name(s) {unknown}; the model's adapters: "
                             f"{known} (and {BASE_ADAPTER!r} for none)")
        merged = [n for n, m in layers.items() if m.merged]
        if merged:
            raise ValueError(f"adapter_batch: layers {merged} are merged; unmerge them first")
        busy = [n for n, m in layers.items() if m.routing is not None]
        if busy:
            raise RuntimeError("adapter_batch: the model is already inside an adapter_batch block")
        for m in layers.values():
            slots = m.adapter_names
            key = (slots, _layer_device(m))
            if key not in self._indices:
                where = {name: i for i, name in enumerate(slots)}
                idx = [where.get(name, -1) for name in self.adapter_names]
                self._indices[key] = torch.tensor(idx, dtype=torch.int32).to(key[1])
            self._layers[m] = key
        for m in self._layers:
            m.routing = self
        return self

    def __exit__(self, *exc) -> bool:
        for m in self._layers:
            m.routing = None
        self._layers.clear()
        self._expanded.clear()
        return False

    def row_indices(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """The adapter slot (-1: none) of each row of x.reshape(-1, in) in ``layer``: int32 on
        x's device. The batch is x.shape[0]: len(adapter_names) samples, or expand_size times
        as many (generate's repeat_interleave for num_beams / num_return_sequences)."""
        key = self._layers.get(layer)
        if key is None or layer.adapter_names != key[0]:
            raise RuntimeError("adapter_batch: the layer's adapters changed inside the block "
                               "(add/delete_adapter); leave the block first")
        n, batch = len(self.adapter_names), x.shape[0]
        repeat = 1 if batch == n else self.expand_size if batch == n * self.expand_size else 0
        if repeat == 0:
            hint = ""
            if batch % n == 0 and batch > n:
                hint = (f"; generate() with num_beams / num_return_sequences = {batch // n} repeats each "
                        f"sample: pass expand_size={batch // n} to adapter_batch")
            raise ValueError(f"adapter_batch: got {n} adapter_names but the input's batch size is {batch} "
                             f"(x of shape {tuple(x.shape)}){hint}")
        rows = x.numel() // x.shape[-1]
        ekey = (key, batch, rows)
        idx = self._expanded.get(ekey)
        if idx is None:
            idx = self._indices[key]
            if idx.device != x.device:
                idx = idx.to(x.device)
            per_sample = (rows // batch) * repeat
            if per_sample > 1:
                idx = idx.repeat_interleave(per_sample)  # on the device, output size known
            self._expanded[ekey] = idx
        return idx


def adapter_batch(model: nn.Module, adapter_names: Sequence[str], *, expand_size: int = 1) -> AdapterBatch:
    """Context manager: inside it, sample b of every batch runs with LoRA adapter
    ``adapter_names[b]`` ("__base__": no adapter), in one kernel call per layer.

    ``adapter_names`` has one entry per sample (its tokens all use it); a forward whose batch
    size (x.shape[0]) differs raises ValueError. ``expand_size`` = generate()'s
    max(num_beams, num_return_sequences): batches of len(adapter_names) * expand_size rows
    then repeat each name expand_size times, as generate repeats each sample (batches of
    len(adapter_names) rows, an encoder's, still work). Unknown names raise ValueError listing
    the model's adapters. Inference only: RuntimeError when the model is in training mode with
    gradients enabled, and on inputs that require grad. Merged layers are refused.
    """
    return AdapterBatch(model, adapter_names, expand_size)
