"""Model-level bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021's placement):
``add_bottleneck_adapters`` puts a ``fastpeft.BottleneckAdapter`` right after chosen projections
of a transformer (wrapping each in ``fastpeft.nn.AdaptedProjection``) and trains only the
adapters and the norms. Blocks and projections are found by name (fastpeft.modules.find_blocks)
on Hugging Face BERT / RoBERTa, GPT-2 and Llama / Mistral layouts; other models take explicit
``targets=``.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from . import _checks
from .modules import device_dtype, find_blocks, is_norm, known_layouts, name_matches, output_width, replace_module
from .nn.bottleneck import AdaptedProjection, BottleneckAdapter

PLACEMENTS = ("houlsby", "pfeiffer")


def _inside_adapter(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), AdaptedProjection)
               for i in range(len(parts) + 1))


def _placement_targets(model: nn.Module, placement: str) -> list[str]:
    found = find_blocks(model)
    if not found:
        raise ValueError(f"add_bottleneck_adapters: found no transformer blocks in {type(model).__name__}; looked "
                         f"for the output projections of {known_layouts()}. Pass targets=[module names] "
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
        device, dtype = device_dtype(base)
        new[name] = AdaptedProjection(base, BottleneckAdapter(widths[name], bottleneck, activation, scaling,
                                                    device=device, dtype=dtype))
    for name, module in new.items():
        replace_module(model, name, module)
    mark_only_bottleneck_adapters_and_norms_as_trainable(model)
    return model


def bottleneck_modules(model: nn.Module) -> dict[str, AdaptedProjection]:
    """Qualified name -> AdaptedProjection, for every adapted projection of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedProjection)}


def mark_only_bottleneck_adapters_and_norms_as_trainable(model: nn.Module) -> None:
    """requires_grad on the parameters of every adapter and every norm module; off elsewhere."""
    keep = {id(p) for m in bottleneck_modules(model).values() for p in m.adapter.parameters()}
    keep |= {id(p) for m in model.modules() if is_norm(m) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
