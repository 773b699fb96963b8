"""Finding and replacing the submodules of a model: the one place the model-level helpers
(LoRA injection, quantization, QAT, bottleneck adapters, freezing) select layers and swap them.

Names follow PEFT's rule (``name_matches``): a list entry matches a qualified module name it
equals or ends with after a dot; a string is a regular expression that must match the whole
name. Transformer blocks and their two output projections are found by name on Hugging Face
BERT / RoBERTa, GPT-2 and Llama / Mistral layouts (``find_blocks``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from .nn.bottleneck import BottleneckAdapter

ALL_LINEAR = "all-linear"

TargetModules = Union[str, Sequence[str]]


def output_layer_name(model: nn.Module) -> str | None:
    """Qualified name of ``model.get_output_embeddings()`` (the LM head), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        out = getter()
    except (NotImplementedError, AttributeError):
        return None
    if out is None:
        return None
    return next((name for name, m in model.named_modules() if m is out), None)


def name_matches(name: str, target_modules: TargetModules) -> bool:
    """PEFT's rule: a regex string full-matches ``name``; a list entry equals ``name``
    or is a suffix of it after a dot."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def check_target_modules(target_modules: object) -> TargetModules:
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {e}") from None
        return target_modules
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        entries = list(target_modules)
        if not entries or not all(isinstance(t, str) and t for t in entries):
            raise ValueError(f"target_modules must be a non-empty list of non-empty names, a regex "
                             f"string or {ALL_LINEAR!r}; got {target_modules!r}")
        return entries
    raise TypeError(f"target_modules must be a list of names, a regex string or {ALL_LINEAR!r}, "
                    f"got {type(target_modules).__name__}")


def fastpeft_internal_names(model: nn.Module) -> set[str]:
    """Qualified names of the modules inside fastpeft's own trainable modules (a BottleneckAdapter's
    ``down`` / ``up`` linears): the walkers over a base model's layers ("all-linear" LoRA,
    quantization, QAT) leave them alone."""
    prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, BottleneckAdapter))
    if not prefixes:
        return set()
    return {n for n, _ in model.named_modules() if n.startswith(prefixes)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` of ``model`` (a direct child of its parent)."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def plain_linear_names(model: nn.Module, skip: Sequence[str] | str = ()) -> list[str]:
    """Qualified names of the nn.Linear modules (exact type: subclasses such as
    MultiheadAttention's out_proj are read through .weight) not matched by ``skip`` and not
    inside fastpeft's own modules (a BottleneckAdapter's linears)."""
    skip = [skip] if isinstance(skip, str) else list(skip)
    inner = fastpeft_internal_names(model)
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n and n not in inner and not name_matches(n, skip)]


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


def known_layouts() -> str:
    return "; ".join(a.describe() for a in ARCHITECTURES)


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


def device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    tensors = list(module.parameters()) + list(module.buffers())
    floating = [t for t in tensors if t.is_floating_point()]
    device = tensors[0].device if tensors else None
    return device, (floating[0].dtype if floating else None)
