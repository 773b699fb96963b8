"""Model-level LoRA: put LoRALinear into a model, choose what trains, collect the adapter.

``inject_lora`` replaces matching ``nn.Linear`` modules in place by ``LoRALinear`` (the
base weight is shared, not copied) and freezes everything else;
``mark_only_lora_as_trainable`` and ``lora_state_dict`` follow loralib's semantics.
Everything about an injection (which modules, r, lora_alpha, dropout, rsLoRA) is read
back from the LoRALinear modules themselves; nothing else is stored on the model.

Several named LoRA adapters (PEFT's names): ``add_adapter`` / ``delete_adapter`` /
``set_adapter`` apply LoRALinear's methods of the same names to every LoRALinear of a model;
the adapter made by inject_lora is "default". A layer an adapter does not target simply does
not hold it (no update there). For bottleneck adapters see ``fastpeft.add_bottleneck_adapters``.

Models wrapped for training (DDP, torch.compile, FSDP1, FSDP2's fully_shard): ``unwrap_model`` /
``canonical_name`` (fastpeft.modules) give the user's model and its names, ``gather_tensors`` the
whole tensors behind FSDP's shards (what lora_state_dict and save_adapter read), and ``wrap_fsdp1``
an FSDP1 model that reduces only what trains (``fsdp_auto_wrap_policy``: one unit per block).
"""
from __future__ import annotations

import sys
from typing import Iterable, Mapping

import torch
from torch import nn

from .modules import (ALL_LINEAR, TargetModules, canonical_name, check_target_modules, fastpeft_internal_names,
                      find_blocks, name_matches, output_layer_name, replace_module, unwrap_model)
from .nn.lora import QUANTIZED_BASES, LoRALinear, check_adapter_name

BIAS_MODES = ("none", "all", "lora_only")
# Module types inject_lora can wrap (LoRALinear.from_linear accepts them): nn.Linear and the
# quantized layers (Int8Linear; QuantLinear, e.g. QLoRA's 4-bit NF4 base from quantize_model).
BASE_TYPES = (nn.Linear,) + QUANTIZED_BASES


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear, for every LoRALinear in ``model`` (in module order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def find_targets(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Qualified names of the modules ``target_modules`` selects, checked to be nn.Linear.

    "all-linear" selects every nn.Linear except the output layer (PEFT's rule). A selected
    LoRALinear raises ValueError, any other non-Linear module TypeError, no match ValueError.
    """
    target_modules = check_target_modules(target_modules)
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
                            f"{type(module).__name__}; LoRA is injected into nn.Linear, Int8Linear and "
                            f"QuantLinear only")
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, BASE_TYPES) and n]
        shown = ", ".join(linear[:12]) + (", ..." if len(linear) > 12 else "")
        hint = ""
        if isinstance(target_modules, str) and any(name_matches(n, [target_modules]) for n in linear):
            hint = (f" (a string is a regex that must match the whole qualified name, as in PEFT; to select "
                    f"the modules named {target_modules!r} in every block, pass a list: [{target_modules!r}])")
        raise ValueError(f"target_modules={target_modules!r} matches no module{hint}; nn.Linear modules "
                         f"of this model: [{shown}]")
    return names


def replace_with_lora(model: nn.Module, ranks: Mapping[str, tuple[int, float]],
                      lora_dropout: float = 0.0, use_rslora: bool = False) -> None:
    """Replace each named nn.Linear by ``LoRALinear.from_linear`` with its (r, lora_alpha)."""
    new = {name: LoRALinear.from_linear(model.get_submodule(name), r=r, lora_alpha=alpha,
                                        lora_dropout=lora_dropout, use_rslora=use_rslora)
           for name, (r, alpha) in ranks.items()}
    for name, module in new.items():
        replace_module(model, name, module)


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
    """Set requires_grad on lora_A / lora_B of every LoRALinear (its active adapter) and clear
    it everywhere else (inactive adapters included).

    ``bias``: "none" trains no bias; "all" also every parameter whose own name contains
    "bias"; "lora_only" also the biases of the LoRALinear modules (loralib's semantics).
    """
    _check_bias(bias)
    mods = lora_modules(model).values()
    trainable = {id(p) for m in mods for p in (m.lora_A, m.lora_B) if p is not None}
    if bias == "lora_only":
        trainable |= {id(m.base_bias) for m in mods if m.base_bias is not None}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in trainable or (bias == "all" and _is_bias_name(name)))


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict:
    """The entries of ``model.state_dict()`` that hold lora_A / lora_B (and the inactive named
    adapters, lora_A_adapters.<name> / lora_B_adapters.<name>), plus biases per ``bias``
    ("none" | "all": every parameter named *bias* | "lora_only": the LoRALinear biases).

    ``model`` may be wrapped for training (DDP, torch.compile, FSDP1 with use_orig_params=True,
    FSDP2): the keys are those of the unwrapped model and the values whole tensors, gathered from
    the shards under FSDP (``gather_tensors``; then every rank must call it, and every rank gets
    the whole dict)."""
    _check_bias(bias)
    inner = unwrap_model(model)
    index = tensor_index(inner)
    wanted = set()
    for name, m in lora_modules(inner).items():
        prefix = f"{canonical_name(name)}." if canonical_name(name) else ""
        wanted |= {prefix + k for k, _ in m.named_parameters(remove_duplicate=False) if k.startswith("lora_")}
        if bias == "lora_only" and m.base_bias is not None:
            wanted.add(prefix + m.base_bias_name)
    if bias == "all":
        wanted |= {n for n, (m, attr) in index.items() if attr in m._parameters and _is_bias_name(n)}
    return gather_tensors(model, [n for n in index if n in wanted])


# ---------------------------------------------------------------------------------------------
# models wrapped for training: DDP, torch.compile, FSDP1, FSDP2 (fully_shard)


def _loaded(module_name: str, attr: str):
    """``attr`` of the torch module ``module_name`` if that module was imported, else None: a model
    can only be wrapped by a class whose module was imported, so nothing is imported here."""
    module = sys.modules.get(module_name)
    return getattr(module, attr, None) if module is not None else None


def fsdp1_class():
    """FSDP1's FullyShardedDataParallel, if it was imported."""
    return _loaded("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")


def dtensor_class():
    """DTensor (FSDP2's parameters), if it was imported."""
    return _loaded("torch.distributed.tensor", "DTensor")


def model_class(model: nn.Module) -> type:
    """The class of ``model`` before FSDP2's fully_shard, which makes it an instance of a new
    subclass (FSDP<class name>) of FSDPModule and its class."""
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None or not isinstance(model, fsdp_module):
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, fsdp_module))


def tensor_index(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """State-dict name -> (owning module, attribute) for every parameter and persistent buffer of
    ``model`` (tied tensors under each of their names), names as in the unwrapped model
    (``canonical_name``). Raises for FSDP1 with use_orig_params=False, whose modules no longer
    hold their parameters."""
    out = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        tensors = list(m._parameters.items()) + [(k, b) for k, b in m._buffers.items()
                                                   if k not in m._non_persistent_buffers_set]
        for attr, t in tensors:
            if t is None:
                continue
            if attr == "_flat_param":
                raise NotImplementedError("FSDP1 with use_orig_params=False keeps flat parameters only; wrap the "
                                          "model with FullyShardedDataParallel(..., use_orig_params=True) "
                                          "(or use FSDP2's fully_shard) to save or read its adapter")
            out[canonical_name(f"{prefix}.{attr}" if prefix else attr)] = (m, attr)
    return out


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds parameters sharded across processes (FSDP1 units or FSDP2's
    DTensors): reading them whole is then a collective that every rank must join."""
    fsdp, dtensor = fsdp1_class(), dtensor_class()
    return (fsdp is not None and bool(fsdp.fsdp_modules(model))) or \
        (dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()))


def is_distributed(model: nn.Module) -> bool:
    """Whether ``model`` is trained by several processes: wrapped in DDP or sharded by FSDP."""
    while isinstance(model, nn.Module) and "_orig_mod" in model._modules:
        model = model._modules["_orig_mod"]
    return isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded(model)


def _whole(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    dtensor = dtensor_class()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def gather_tensors(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The whole (unsharded, detached) tensors called ``names`` in the unwrapped ``model``, in that
    order. Plain tensors (and DDP's, which every rank holds whole) are returned as they are, FSDP2's
    DTensors gathered with ``DTensor.full_tensor()``, FSDP1's flat-parameter views inside
    ``FullyShardedDataParallel.summon_full_params`` of the one unit that holds them (only the units
    that hold a wanted tensor are unsharded, one at a time, and copied from). Under FSDP this is a
    collective: every rank must call it with the same names, in the same order, and every rank gets
    the whole tensors."""
    inner = unwrap_model(model)
    index = tensor_index(inner)
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in index]
    if unknown:
        raise KeyError(f"the model has no parameters or buffers {unknown[:10]}")
    out = {}
    fsdp = fsdp1_class()
    units = fsdp.fsdp_modules(model) if fsdp is not None else []
    if units:
        fsdp.fsdp_modules(model, root_only=True)  # finds the roots by lazy-initializing them: an inner unit
        owner = {}                                # summoned first would take itself for a root
        for unit in units:  # pre-order: a nested unit overrides the unit around it
            owner.update({id(p): unit for p in unit.module.parameters()})
        for unit in units:  # ignored_states (wrap_fsdp1's trainable parameters) are whole: no unit holds them
            for p in getattr(unit, "_ignored_params", ()):
                owner.pop(id(p), None)
        held = {}
        for n in names:
            m, attr = index[n]
            unit = owner.get(id(m._parameters[attr])) if attr in m._parameters else None
            if unit is not None:
                held.setdefault(id(unit), []).append(n)
        for unit in units:
            if id(unit) in held:
                with fsdp.summon_full_params(unit, recurse=False, writeback=False):
                    for n in held[id(unit)]:
                        m, attr = index[n]
                        out[n] = getattr(m, attr).detach().clone()  # the unsharded storage is freed on exit
    for n in names:
        if n not in out:
            m, attr = index[n]
            out[n] = _whole(getattr(m, attr))
    return {n: out[n] for n in names}


def fsdp_auto_wrap_policy(model: nn.Module):
    """An FSDP1 ``auto_wrap_policy`` putting each transformer block in its own unit: the classes
    named in ``model._no_split_modules`` (Hugging Face models), else the block classes of the known
    layouts (``fastpeft.modules.find_blocks``), as PEFT's ``fsdp_auto_wrap_policy`` does for the
    blocks. It shards the base model block by block; it cannot by itself keep FSDP1 from reducing
    frozen values, since a LoRALinear holds lora_A / lora_B next to its frozen weight and FSDP1
    reduces a unit's flat parameter whole: ``wrap_fsdp1`` keeps the trainable parameters out of
    the flat parameters for that."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    inner = unwrap_model(model)
    wanted = set(getattr(inner, "_no_split_modules", None) or ())
    classes = {type(m) for m in inner.modules() if type(m).__name__ in wanted}
    if not classes:
        classes = {type(block) for _, _, blocks in find_blocks(inner) for block in blocks}
    return ModuleWrapPolicy(classes)


def wrap_fsdp1(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """``FullyShardedDataParallel(model, use_orig_params=True, ...)`` that reduces only the trainable
    values: the frozen base is sharded (by default one unit per block, ``fsdp_auto_wrap_policy``);
    the parameters that train (LoRA, biases, heads: a few MB) stay whole on every rank
    (``ignored_states``) and their gradients are averaged over the process group by one
    all-reduce each, as soon as each is accumulated. FSDP1 alone would reduce every unit's flat
    parameter whole (frozen weights included), 8 to 20 times the trainable values on a small
    Llama.

    Call it on every rank after inject_lora / mark_only_lora_as_trainable (what trains is read
    here) and give it what you would give FSDP (``device_id``, ``process_group``, ``mixed_precision``,
    ...; ``ignored_states`` are added to). With ``device_id`` the trainable parameters move there
    too (FSDP moves only what it manages). Mixed precision does not apply to them, and under
    FSDP1's ``no_sync()`` they are still reduced at each backward. save_adapter / load_adapter /
    lora_state_dict read and write the returned model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_fsdp1 expects an nn.Module, got {type(model).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_fsdp1: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    if fsdp_kwargs.get("use_orig_params") is False:
        raise ValueError("wrap_fsdp1: use_orig_params must be True (save_adapter reads the original parameters)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("wrap_fsdp1: no parameter of the model requires grad; call inject_lora (or "
                         "mark_only_lora_as_trainable) first")
    device = fsdp_kwargs.get("device_id")
    if device is not None:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        for p in trainable:
            p.data = p.data.to(device)
    group = fsdp_kwargs.get("process_group")
    if isinstance(group, tuple):  # HYBRID_SHARD's (intra-node, inter-node) pair: average over all of them
        group = None
    fsdp_kwargs = dict(fsdp_kwargs, use_orig_params=True,
                       ignored_states=list(fsdp_kwargs.get("ignored_states") or ()) + trainable)
    fsdp_kwargs.setdefault("auto_wrap_policy", fsdp_auto_wrap_policy(model))
    wrapped = FullyShardedDataParallel(model, **fsdp_kwargs)
    size = dist.get_world_size(group)

    def average(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(size)

    for p in trainable:
        p.register_post_accumulate_grad_hook(average)
    return wrapped


# ---------------------------------------------------------------------------------------------
# several named LoRA adapters


def lora_adapters(model: nn.Module) -> list[str]:
    """The names of the LoRA adapters held by any LoRALinear of ``model`` (first seen first)."""
    names: dict[str, None] = {}
    for m in lora_modules(model).values():
        names.update(dict.fromkeys(m.adapter_names))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The distinct active adapters of the LoRALinear modules of ``model`` (normally one)."""
    names: dict[str, None] = {}
    for m in lora_modules(model).values():
        if m.active_adapter is not None:
            names[m.active_adapter] = None
    return list(names)


def _known_adapter(model: nn.Module, adapter_name: object) -> str:
    known = lora_adapters(model)
    if adapter_name not in known:
        raise ValueError(f"the model has no LoRA adapter {adapter_name!r}; its adapters: {known}")
    return adapter_name


def adaptable_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules a LoRA adapter can target: nn.Linear, Int8Linear,
    QuantLinear and LoRALinear, not inside a LoRALinear or a fastpeft BottleneckAdapter."""
    lora = [n + "." for n, m in model.named_modules() if isinstance(m, LoRALinear) and n]
    inner = fastpeft_internal_names(model)
    return [n for n, m in model.named_modules()
            if n and isinstance(m, (LoRALinear,) + BASE_TYPES) and n not in inner
            and not n.startswith(tuple(lora))]


def add_adapter(model: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                target_modules: TargetModules | None = None, lora_dropout: float = 0.0,
                use_rslora: bool = False) -> nn.Module:
    """Add the LoRA adapter ``adapter_name`` (inactive, B = 0) to ``model``; return ``model``.

    ``target_modules=None``: every LoRALinear of the model gets it. Otherwise the modules it
    selects (as in ``inject_lora``; "all-linear" skips the output layer): a LoRALinear gets
    the adapter next to its others, an nn.Linear / Int8Linear / QuantLinear becomes a LoRALinear holding
    only this adapter (no adapter active there until ``set_adapter``). Nothing is changed when
    a check fails (a name a selected layer already holds, no module selected).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_adapter expects an nn.Module, got {type(model).__name__}")
    check_adapter_name(adapter_name)
    if target_modules is None:
        names = list(lora_modules(model))
        if not names:
            raise ValueError("add_adapter: the model has no LoRALinear modules; call "
                             "fastpeft.inject_lora first or pass target_modules")
    else:
        target_modules = check_target_modules(target_modules)
        candidates = adaptable_names(model)
        if target_modules == ALL_LINEAR:
            head = output_layer_name(model)
            names = [n for n in candidates if n != head]
        else:
            names = [n for n in candidates if name_matches(n, target_modules)]
        if not names:
            raise ValueError(f"add_adapter: target_modules={target_modules!r} selects no linear module")
    held = [n for n in names if isinstance(model.get_submodule(n), LoRALinear)
            and model.get_submodule(n).has_adapter(adapter_name)]
    if held:
        raise ValueError(f"add_adapter: adapter {adapter_name!r} already exists in {held}; "
                         f"delete_adapter it first to replace it")
    add_adapter_to(model, {n: (r, lora_alpha) for n in names}, adapter_name, lora_dropout, use_rslora)
    return model


def add_adapter_to(model: nn.Module, ranks: Mapping[str, tuple[int, float]], adapter_name: str,
                   lora_dropout: float = 0.0, use_rslora: bool = False) -> None:
    """Put the inactive adapter ``adapter_name`` with its (r, lora_alpha) on each named module
    (a LoRALinear, or an nn.Linear / Int8Linear / QuantLinear that becomes one). All checks come first."""
    new = {}
    for name, (r, alpha) in ranks.items():
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            new[name] = LoRALinear.from_linear(module, r=r, lora_alpha=alpha,
                                               lora_dropout=lora_dropout, use_rslora=use_rslora)
    for name, (r, alpha) in ranks.items():
        if name in new:
            layer = new[name]
            layer.rename_adapter(layer.active_adapter, adapter_name)
            layer.set_adapter(None)
            replace_module(model, name, layer)
        else:
            model.get_submodule(name).add_adapter(adapter_name, r, alpha, lora_dropout, use_rslora)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove the LoRA adapter ``adapter_name`` from every LoRALinear holding it; return ``model``.
    The active adapter cannot be deleted: ``set_adapter`` another one (or None) first. A layer
    left without adapters stays a LoRALinear computing its base layer."""
    _known_adapter(model, adapter_name)
    if adapter_name in active_adapters(model):
        others = [n for n in lora_adapters(model) if n != adapter_name]
        raise ValueError(f"delete_adapter: {adapter_name!r} is the active adapter; call "
                         f"fastpeft.set_adapter(model, other) first (other adapters: {others}, or None)")
    for m in lora_modules(model).values():
        if m.has_adapter(adapter_name):
            m.delete_adapter(adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: str | None) -> nn.Module:
    """Make ``adapter_name`` the active LoRA adapter of every LoRALinear of ``model``; layers
    that do not hold it get no active adapter (they compute their base). None: no adapter
    anywhere (the base model). Only the active adapter trains (see LoRALinear.set_adapter).
    Refused while any layer is merged. Returns ``model``."""
    if adapter_name is not None:
        _known_adapter(model, adapter_name)
    modules = lora_modules(model)
    merged = [n for n, m in modules.items() if m.merged and m.active_adapter != adapter_name]
    if merged:
        raise ValueError(f"set_adapter: layers {merged} are merged; unmerge them first")
    for m in modules.values():
        m.set_adapter(adapter_name if adapter_name is not None and m.has_adapter(adapter_name) else None)
    return model
