"""Model-level helpers for the other parameter-efficient methods: bottleneck adapters
(Houlsby / Pfeiffer placement), BitFit, feature-based transfer, and a trainable-parameter count.

``add_bottleneck_adapters`` puts a ``fastpeft.BottleneckAdapter`` right after chosen projections of a transformer
(wrapping each in ``AdaptedProjection``) and trains only the adapters and the norms;
``bitfit`` trains only the bias terms; ``freeze`` trains only the last k blocks (a head of
your own goes on top); ``trainable_parameters`` counts what trains. Blocks and projections
are found by name on Hugging Face BERT / RoBERTa, GPT-2 and Llama / Mistral layouts; other
models take explicit ``targets=`` / ``blocks=``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import _checks
from .model import _replace, name_matches
from .nn.bottleneck import BottleneckAdapter

PLACEMENTS = ("houlsby", "pfeiffer")


@dataclass(frozen=True)
class Architecture:
    """Where a transformer family keeps its blocks and its two output projections.

    ``blocks`` names the ModuleList of blocks (the qualified name equals it or ends with "."
    + it); ``attn_out`` / ``ffn_out`` are paths inside one block.
    """
    family: str
    blocks: str
    attn_out: str
    ffn_out: str

    def describe(self) -> str:
        return f"{self.family}: {self.blocks}.<i>.{self.attn_out} and {self.blocks}.<i>.{self.ffn_out}"


ARCHITECTURES = (
    Architecture("BERT / RoBERTa", "encoder.layer", "attention.output.dense", "output.dense"),
    Architecture("GPT-2", "h", "attn.c_proj", "mlp.c_proj"),
    Architecture("Llama / Mistral", "layers", "self_attn.o_proj", "mlp.down_proj"),
)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def find_blocks(model: nn.Module) -> list[tuple[Architecture, str, nn.ModuleList]]:
    """(architecture, qualified name, block list) for every non-empty nn.ModuleList of ``model``
    whose name and blocks fit a known layout (each block holds both output projections)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for arch in ARCHITECTURES:
            if (name_matches(name, [arch.blocks])
                    and all(_has(b, arch.attn_out) and _has(b, arch.ffn_out) for b in module)):
                found.append((arch, name, module))
                break
    return found


def _known_layouts() -> str:
    return "; ".join(a.describe() for a in ARCHITECTURES)


# ---------------------------------------------------------------------------------------------
# bottleneck adapters


class AdaptedProjection(nn.Module):
    """y = adapter(base_layer(x)): a bottleneck adapter right after a projection, before the
    residual add and the norm that follow it in the block (Houlsby et al., 2019).

    The projection is kept, untouched, as ``base_layer``; its state_dict keys move from
    ``<path>.weight`` / ``<path>.bias`` to ``<path>.base_layer.weight`` / ``.base_layer.bias``,
    and the adapter's are ``<path>.adapter.down.weight`` [bottleneck, width],
    ``<path>.adapter.down.bias``, ``<path>.adapter.up.weight`` [width, bottleneck] and
    ``<path>.adapter.up.bias``. A state_dict written before the wrapping (keys
    ``<path>.weight`` ...) still loads: the old keys are read into ``base_layer``. Any
    attribute the wrapper lacks (``weight``, ``bias``, ``in_features``, ``nf`` ...) is read
    from ``base_layer``.
    """

    def __init__(self, base_layer: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self._register_load_state_dict_pre_hook(_read_unwrapped_keys, with_module=True)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.base_layer(*args, **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def _read_unwrapped_keys(module: AdaptedProjection, state_dict, prefix, *_) -> None:
    for key in module.base_layer.state_dict(keep_vars=True):
        old, new = prefix + key, prefix + "base_layer." + key
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)


def output_width(module: nn.Module) -> int | None:
    """Width of the last dim a module outputs, where the module says it: ``out_features``
    (nn.Linear and fastpeft's linear layers) or ``nf`` (Hugging Face's Conv1D, GPT-2)."""
    width = getattr(module, "out_features", None)
    if width is None and type(module).__name__ == "Conv1D":
        width = getattr(module, "nf", None)
    return width if isinstance(width, int) and not isinstance(width, bool) else None


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, torch's RMSNorm, or a model's own *LayerNorm / *RMSNorm class (LlamaRMSNorm)."""
    if isinstance(module, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _inside_adapter(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), AdaptedProjection)
               for i in range(len(parts) + 1))


def _placement_targets(model: nn.Module, placement: str) -> list[str]:
    found = find_blocks(model)
    if not found:
        raise ValueError(f"add_bottleneck_adapters: found no transformer blocks in {type(model).__name__}; looked "
                         f"for the output projections of {_known_layouts()}. Pass targets=[module names] "
                         f"to put an adapter after each named module")
    names = []
    for arch, list_name, blocks in found:
        leaves = (arch.attn_out, arch.ffn_out) if placement == "houlsby" else (arch.ffn_out,)
        names += [f"{list_name}.{i}.{leaf}" for i in range(len(blocks)) for leaf in leaves]
    return names


def _explicit_targets(model: nn.Module, targets: object) -> list[str]:
    if (not isinstance(targets, (list, tuple)) or not targets
            or not all(isinstance(t, str) and t for t in targets)):
        raise TypeError(f"targets must be a non-empty list of module names, got {targets!r}")
    names = [n for n, _ in model.named_modules() if n and name_matches(n, targets)]
    if not names:
        raise ValueError(f"targets={list(targets)!r} matches no module of {type(model).__name__} "
                         f"(a name matches when it equals an entry or ends with '.' + entry)")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"targets={list(targets)!r} matches {nested[0][0]!r} and {nested[0][1]!r} "
                         f"inside it; name modules that do not contain one another")
    return names


def add_bottleneck_adapters(model: nn.Module, placement: str = "houlsby", bottleneck: int = 64,
                 activation: str = "relu", scaling: float = 1.0,
                 targets: Sequence[str] | None = None) -> nn.Module:
    """Insert bottleneck adapters y = x + scaling * up(act(down(x))) into ``model`` in place;
    train only the adapters and the norms; return ``model``.

    placement "houlsby": in every block, one adapter after the attention output projection
    and one after the FFN output projection (2 per block); "pfeiffer": one after the FFN
    output projection (1 per block). Each goes right after the projection, before the
    residual add and the norm. Found on BERT / RoBERTa (``attention.output.dense``,
    ``output.dense``), GPT-2 (``attn.c_proj``, ``mlp.c_proj``) and Llama / Mistral
    (``self_attn.o_proj``, ``mlp.down_proj``). ``targets``: a list of module names (a module
    matches when its qualified name equals an entry or ends with "." + entry) puts an adapter
    after each matching module instead of the placement's choice.

    Each adapter is ``fastpeft.BottleneckAdapter(width, bottleneck, activation, scaling)`` on the
    projection's device and dtype, width = its output features; up starts at zero, so the
    model computes what it did before. The projection becomes ``<path>.base_layer`` of an
    ``AdaptedProjection`` (state_dict: ``<path>.base_layer.weight``, ``<path>.adapter.down.weight``,
    ...; a state_dict saved before the wrapping still loads).
    Afterwards requires_grad is set on the adapters' and the norms' (LayerNorm, RMSNorm)
    parameters only; a task head of yours must be unfrozen by you
    (``model.classifier.requires_grad_(True)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_bottleneck_adapters expects an nn.Module, got {type(model).__name__}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    _checks.positive_int("bottleneck", bottleneck)
    scaling = _checks.finite_float("scaling", scaling)
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, got {type(activation).__name__}")
    names = _placement_targets(model, placement) if targets is None else _explicit_targets(model, targets)

    widths = {}
    for name in names:
        module = model.get_submodule(name)
        if _inside_adapter(model, name):
            raise ValueError(f"module {name!r} already has an adapter (or is part of one); "
                             f"add_bottleneck_adapters would nest adapters")
        widths[name] = output_width(module)
        if widths[name] is None:
            raise TypeError(f"{name!r} ({type(module).__name__}) has no known output width: adapters "
                            f"go after modules with out_features (nn.Linear and fastpeft's linear "
                            f"layers) or nf (Hugging Face Conv1D)")

    new = {}  # built in full before anything is replaced: a bad argument changes nothing
    for name in names:
        base = model.get_submodule(name)
        device, dtype = _device_dtype(base)
        new[name] = AdaptedProjection(base, BottleneckAdapter(widths[name], bottleneck, activation, scaling,
                                                    device=device, dtype=dtype))
    for name, module in new.items():
        _replace(model, name, module)
    mark_only_adapters_and_norms_as_trainable(model)
    return model


def _device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    tensors = list(module.parameters()) + list(module.buffers())
    floating = [t for t in tensors if t.is_floating_point()]
    device = tensors[0].device if tensors else None
    return device, (floating[0].dtype if floating else None)


def adapter_modules(model: nn.Module) -> dict[str, AdaptedProjection]:
    """Qualified name -> AdaptedProjection, for every adapted projection of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedProjection)}


def mark_only_adapters_and_norms_as_trainable(model: nn.Module) -> None:
    """requires_grad on the parameters of every adapter and every norm module; off elsewhere."""
    keep = {id(p) for m in adapter_modules(model).values() for p in m.adapter.parameters()}
    keep |= {id(p) for m in model.modules() if is_norm(m) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


# ---------------------------------------------------------------------------------------------
# BitFit, feature-based transfer, counting


def _unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())  # remove_duplicate=True: a tied parameter once


def bitfit(model: nn.Module) -> int:
    """BitFit (Ben Zaken et al., 2022): train only the bias terms; return how many scalar
    parameters now train.

    requires_grad is set on every parameter whose own name (after the last dot) ends with
    "bias" (``bias``, MultiheadAttention's ``in_proj_bias``; LayerNorm biases included) and
    cleared on all others. A model without biases raises ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bitfit expects an nn.Module, got {type(model).__name__}")
    params = _unique_parameters(model)
    biases = {id(p) for n, p in params if n.rpartition(".")[2].endswith("bias")}
    if not biases:
        raise ValueError(f"bitfit: {type(model).__name__} has no bias parameters, so nothing would "
                         f"train. Llama-family models have none by default (attention_bias=False and "
                         f"mlp_bias=False in the config; RMSNorm has no bias): use LoRA or adapters "
                         f"there, or build the model with biases")
    for _, p in params:
        p.requires_grad_(id(p) in biases)
    return sum(p.numel() for _, p in params if id(p) in biases)


def _block_list(model: nn.Module, blocks: str | None) -> tuple[str, nn.Module]:
    if blocks is not None:
        if not isinstance(blocks, str):
            raise TypeError(f"blocks must be a module path (str), got {type(blocks).__name__}")
        try:
            module = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"blocks={blocks!r}: {type(model).__name__} has no such module") from None
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"blocks={blocks!r} is a {type(module).__name__}; it must name the "
                            f"nn.ModuleList (or nn.Sequential) that holds the blocks")
        return blocks, module
    found = find_blocks(model)
    if len(found) != 1:
        what = ("found no transformer blocks" if not found
                else f"found several block lists ({', '.join(n for _, n, _ in found)})")
        raise ValueError(f"freeze: {what} in {type(model).__name__}; looked for {_known_layouts()}. "
                         f"Pass blocks='module.path' naming the nn.ModuleList of blocks")
    return found[0][1], found[0][2]


def freeze(model: nn.Module, unfreeze_last: int = 0, blocks: str | None = None) -> nn.Module:
    """Feature-based transfer: freeze ``model`` except its last ``unfreeze_last`` blocks; return it.

    Every parameter gets requires_grad=False, then those of the last ``unfreeze_last``
    transformer blocks get True (0 freezes all). The blocks are found by name (BERT / RoBERTa
    ``encoder.layer``, GPT-2 ``h``, Llama / Mistral ``layers``) or given as ``blocks=
    "module.path"`` of an nn.ModuleList. Embeddings, the final norm and any head the model
    already has stay frozen; the trainable head is yours, on top::

        backbone = fastpeft.freeze(transformers.AutoModel.from_pretrained("bert-base-uncased"),
                                   unfreeze_last=2)
        head = torch.nn.Linear(backbone.config.hidden_size, num_labels)
        features = backbone(**batch).last_hidden_state[:, 0]     # [CLS]
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze expects an nn.Module, got {type(model).__name__}")
    if isinstance(unfreeze_last, bool) or not isinstance(unfreeze_last, int):
        raise TypeError(f"unfreeze_last must be an int, got {type(unfreeze_last).__name__}")
    if unfreeze_last < 0:
        raise ValueError(f"unfreeze_last must be >= 0, got {unfreeze_last}")
    name, block_list = _block_list(model, blocks)
    if unfreeze_last > len(block_list):
        raise ValueError(f"unfreeze_last={unfreeze_last} but {name!r} holds {len(block_list)} blocks")
    model.requires_grad_(False)
    for block in list(block_list)[len(block_list) - unfreeze_last:]:
        block.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module, verbose: bool = True) -> tuple[int, int, float]:
    """(trainable, total, trainable / total) counted in scalar parameters, a tied (shared)
    parameter once; with ``verbose`` also print them on one line, as PEFT's
    print_trainable_parameters does. An empty model gives (0, 0, 0.0)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"trainable_parameters expects an nn.Module, got {type(model).__name__}")
    params = [p for _, p in _unique_parameters(model)]
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    fraction = trainable / total if total else 0.0
    if verbose:
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * fraction:.4f}")
    return trainable, total, fraction
