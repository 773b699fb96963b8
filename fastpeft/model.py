"""Model-level LoRA helpers: put LoRALinear into a model, choose what trains, collect the adapter.

``inject_lora`` replaces matching ``nn.Linear`` modules in place by ``LoRALinear`` (the
base weight is shared, not copied) and freezes everything else;
``mark_only_lora_as_trainable`` and ``lora_state_dict`` follow loralib's semantics.
Everything about an injection (which modules, r, lora_alpha, dropout, rsLoRA) is read
back from the LoRALinear modules themselves; nothing else is stored on the model.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence, Union

from torch import nn

from .nn.int8 import Int8Linear
from .nn.lora import LoRALinear

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
# Module types inject_lora can wrap (LoRALinear.from_linear accepts them).
BASE_TYPES = (nn.Linear, Int8Linear)

TargetModules = Union[str, Sequence[str]]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear, for every LoRALinear in ``model`` (in module order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


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


def _check_target_modules(target_modules: object) -> TargetModules:
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
    """Qualified names of the modules inside fastpeft's own trainable modules (an Adapter's
    ``down`` / ``up`` linears): the walkers over a base model's layers ("all-linear" LoRA,
    quantization, QAT) leave them alone."""
    from .nn.adapter import Adapter
    prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, Adapter))
    if not prefixes:
        return set()
    return {n for n, _ in model.named_modules() if n.startswith(prefixes)}


def find_targets(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Qualified names of the modules ``target_modules`` selects, checked to be nn.Linear.

    "all-linear" selects every nn.Linear except the output layer (PEFT's rule). A selected
    LoRALinear raises ValueError, any other non-Linear module TypeError, no match ValueError.
    """
    target_modules = _check_target_modules(target_modules)
    if target_modules == ALL_LINEAR:
        head = output_layer_name(model)
        inner = fastpeft_internal_names(model)
        names = [n for n, m in model.named_modules()
                 if isinstance(m, BASE_TYPES) and n and n != head and n not in inner]
    else:
        names = [n for n, _ in model.named_modules() if n and name_matches(n, target_modules)]
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"module {name!r} already is a LoRALinear; inject_lora would nest LoRA")
        if not isinstance(module, BASE_TYPES):
            raise TypeError(f"target_modules={target_modules!r} matches {name!r} of type "
                            f"{type(module).__name__}; LoRA is injected into nn.Linear and Int8Linear only")
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, BASE_TYPES) and n]
        shown = ", ".join(linear[:12]) + (", ..." if len(linear) > 12 else "")
        raise ValueError(f"target_modules={target_modules!r} matches no module; nn.Linear modules "
                         f"of this model: [{shown}]")
    return names


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def replace_with_lora(model: nn.Module, ranks: Mapping[str, tuple[int, float]],
                      lora_dropout: float = 0.0, use_rslora: bool = False) -> None:
    """Replace each named nn.Linear by ``LoRALinear.from_linear`` with its (r, lora_alpha)."""
    new = {name: LoRALinear.from_linear(model.get_submodule(name), r=r, lora_alpha=alpha,
                                        lora_dropout=lora_dropout, use_rslora=use_rslora)
           for name, (r, alpha) in ranks.items()}
    for name, module in new.items():
        _replace(model, name, module)


def inject_lora(model: nn.Module, target_modules: TargetModules, r: int = 8, lora_alpha: float = 8,
                lora_dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Replace the selected nn.Linear modules of ``model`` in place by LoRALinear; return ``model``.

    ``target_modules``: a list of names (a module matches when its qualified name equals an
    entry or ends with "." + entry), a regex string (full match on the qualified name), or
    "all-linear" (every nn.Linear but ``model.get_output_embeddings()``). Each new layer
    computes y = x W^T + b + scaling * (dropout(x) A^T) B^T with W and b shared with the old
    one; B starts at zero, so the model's output is unchanged. Afterwards only lora_A and
    lora_B train (``mark_only_lora_as_trainable(model, "none")``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_lora expects an nn.Module, got {type(model).__name__}")
    names = find_targets(model, target_modules)
    replace_with_lora(model, {n: (r, lora_alpha) for n in names}, lora_dropout, use_rslora)
    mark_only_lora_as_trainable(model, "none")
    return model


def _check_bias(bias: object) -> str:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    return bias


def _is_bias_name(qualified: str) -> bool:
    return "bias" in qualified.rpartition(".")[2]


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Set requires_grad on lora_A / lora_B of every LoRALinear and clear it everywhere else.

    ``bias``: "none" trains no bias; "all" also every parameter whose own name contains
    "bias"; "lora_only" also the biases of the LoRALinear modules (loralib's semantics).
    """
    _check_bias(bias)
    mods = lora_modules(model).values()
    trainable = {id(p) for m in mods for p in (m.lora_A, m.lora_B)}
    if bias == "lora_only":
        trainable |= {id(m.base_bias) for m in mods if m.base_bias is not None}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in trainable or (bias == "all" and _is_bias_name(name)))


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict:
    """The entries of ``model.state_dict()`` that hold lora_A / lora_B, plus biases per ``bias``
    ("none" | "all": every parameter named *bias* | "lora_only": the LoRALinear biases)."""
    _check_bias(bias)
    wanted = set()
    for name, m in lora_modules(model).items():
        prefix = name + "." if name else ""
        wanted |= {prefix + "lora_A", prefix + "lora_B"}
        if bias == "lora_only" and m.base_bias is not None:
            wanted.add(prefix + m.base_bias_name)
    if bias == "all":
        wanted |= {n for n, _ in model.named_parameters(remove_duplicate=False) if _is_bias_name(n)}
    return {k: v for k, v in model.state_dict().items() if k in wanted}


def plain_linear_names(model: nn.Module, skip: Sequence[str] | str = ()) -> list[str]:
    """Qualified names of the nn.Linear modules (exact type: subclasses such as
    MultiheadAttention's out_proj are read through .weight) not matched by ``skip`` and not
    inside fastpeft's own modules (an Adapter's linears)."""
    skip = [skip] if isinstance(skip, str) else list(skip)
    inner = fastpeft_internal_names(model)
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n and n not in inner and not name_matches(n, skip)]


def quantize_int8(model: nn.Module, threshold: float = 6.0, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of ``model`` in place by ``Int8Linear.from_linear(linear, threshold)``.

    Modules whose qualified name equals an entry of ``skip`` or ends with "." + entry stay
    as they are (by default the LM head). Works on Hugging Face transformers models; LoRA
    can be injected afterwards (``inject_lora`` adapts Int8Linear layers). Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int8 expects an nn.Module, got {type(model).__name__}")
    new = {n: Int8Linear.from_linear(model.get_submodule(n), threshold=threshold)
           for n in plain_linear_names(model, skip)}
    for name, module in new.items():
        _replace(model, name, module)
    return model
