"""LoRA adapters and soft prompts on disk in Hugging Face PEFT's format.

A directory holds ``adapter_config.json`` (a PEFT ``LoraConfig``) and
``adapter_model.safetensors`` with, for each adapted module at path P of the base model,
``base_model.model.P.lora_A.weight`` [r, in] and ``base_model.model.P.lora_B.weight``
[out, r]. A layer computes y = x W^T + b + scaling * (x A^T) B^T, scaling = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora), with r and lora_alpha from the config's
rank_pattern / alpha_pattern where a key matches P, else its r / lora_alpha. Files written
by PEFT's ``save_pretrained`` load here, and ``PeftModel.from_pretrained`` loads ours.

A model holding several named LoRA adapters saves one of them per directory (``adapter_name``,
by default the active one), and ``load_adapter(model, directory, adapter_name=...)`` adds
each directory as a named adapter, as PEFT's ``save_pretrained`` / ``load_adapter`` do.

A model with prompt tuning (``fastpeft.add_prompt_tuning``) is saved as a PEFT prompt-tuning
adapter instead: a ``PromptTuningConfig`` (peft_type "PROMPT_TUNING", task_type,
num_virtual_tokens, token_dim, ...) and the one tensor ``prompt_embeddings`` [T, token_dim].
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from . import _checks
from .lora import (BASE_TYPES, BIAS_MODES, active_adapters, adaptable_names, add_adapter_to, dtensor_class, fsdp1_class,
                   gather_tensors, is_distributed, is_sharded, lora_adapters, lora_modules,
                   mark_only_lora_as_trainable, model_class, replace_with_lora, tensor_index)
from .modules import (ALL_LINEAR, Pattern, canonical_name, compile_regex, name_matches, output_layer_name,
                      regex_match, unwrap_model)
from .nn.lora import DEFAULT_ADAPTER, LoRALinear, check_adapter_name, lora_scaling
from .prompt_tuning import TASK_TYPES as PROMPT_TASK_TYPES
from .prompt_tuning import DEFAULT_MODULES_TO_SAVE, add_prompt_tuning, get_prompt_tuning, input_embeddings
from .prompt_tuning import modules_to_save_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# init_lora_weights values whose saved A and B apply to the unmodified base weights as plain LoRA.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
# LoraConfig fields for features LoRALinear does not have: any truthy value is refused.
UNSUPPORTED_FIELDS = ("use_dora", "fan_in_fan_out", "layer_replication", "lora_bias",
                      "target_parameters", "trainable_token_indices", "use_qalora",
                      "alora_invocation_tokens", "use_bdlora", "arrow_config", "velora_config",
                      "kasa_config", "monteclora_config", "megatron_config")
PROMPT_KEY = "prompt_embeddings"
PROMPT_PREFIX = "base_model."  # modules_to_save keys of a prompt-learning adapter: base_model.<module>.<tensor>
PROMPT_INITS = ("RANDOM", "SAMPLE_VOCAB")  # what we write; PEFT's TEXT needs a tokenizer to rebuild the config
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - safetensors comes with transformers / the test extra
        raise ImportError("save_adapter / load_adapter need the safetensors package "
                          "(pip install safetensors)") from e
    return safetensors.torch


# ---------------------------------------------------------------------------------------------
# PEFT's matching rules: peft.tuners.tuners_utils.check_target_module_exists and
# peft.utils.other.get_pattern_key


def _what(value, field: str) -> str:
    """Where a pattern came from (a validated config's Pattern knows its field and file)."""
    return getattr(value, "what", f"adapter config {field}")


def _layer_index_ok(config: dict, name: str) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = regex_match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name, _what(pattern, "layers_pattern"),
                                full=False)
            if match:
                break
    if not match:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def _excluded(config: dict, name: str) -> bool:
    exclude = config.get("exclude_modules")
    return bool(exclude) and name_matches(name, exclude)


def peft_matches(config: dict, name: str) -> bool:
    """Whether PEFT would put LoRA on the module called ``name`` under ``config``
    (target_modules as a list or regex, exclude_modules, layers_to_transform / layers_pattern).
    Regexes are matched with their work bounded (``fastpeft.modules.regex_match``)."""
    targets = config["target_modules"]
    if _excluded(config, name) or not name_matches(name, targets):
        return False
    return isinstance(targets, str) or _layer_index_ok(config, name)


def pattern_value(pattern: dict | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key K with
    re.match(rf"(.*\\.)?({K})$", name), else ``default`` (the work of each match bounded)."""
    for key, value in (pattern or {}).items():
        if regex_match(rf"(.*\.)?({key})$", name, _what(key, "rank_pattern/alpha_pattern key"), full=False):
            return value
    return default


# ---------------------------------------------------------------------------------------------
# save


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _uniform(modules: dict, attr: str):
    values = {getattr(m, attr) for m in modules.values()}
    if len(values) > 1:
        by = {n: getattr(m, attr) for n, m in modules.items()}
        raise ValueError(f"PEFT's format has one {attr} per adapter but the LoRALinear modules differ: {by}")
    return values.pop()


def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of ``model`` under the names of the unwrapped model (``canonical_name``; for a
    wrapper and the module it wraps, which share a name, the wrapped one)."""
    return {canonical_name(n): m for n, m in model.named_modules() if n}


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {canonical_name(n): m for n, m in lora_modules(model).items()}


def _target_modules(model: nn.Module, names: list[str]):
    """The shortest target_modules under which PEFT selects exactly ``names``: their leaf
    names, else their qualified paths, else a regex of the escaped paths."""
    wanted = set(names)
    everything = list(_module_names(model))
    for candidate in (sorted({n.rpartition(".")[2] for n in names}), sorted(wanted)):
        if {n for n in everything if name_matches(n, candidate)} == wanted:
            return candidate
    return "(?:" + "|".join(re.escape(n) for n in sorted(wanted)) + ")"


def _exact(name: str) -> str:
    """A rank_pattern key that PEFT matches to module ``name`` only."""
    return "^" + re.escape(name)


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    for value in (model.__dict__.get("name_or_path"), getattr(config, "_name_or_path", None),
                  getattr(config, "name_or_path", None)):
        if isinstance(value, str) and value:
            return value
    return None


def _active_name(model: nn.Module) -> str:
    active = active_adapters(model)
    if len(active) != 1:
        raise ValueError(f"the model's LoRALinear modules have active adapters {active} (adapters: "
                         f"{lora_adapters(model)}); pass adapter_name to say which adapter")
    return active[0]


def adapter_views(model: nn.Module, adapter_name: str | None = None) -> dict[str, SimpleNamespace]:
    """Module name -> (r, lora_alpha, lora_dropout, use_rslora, scaling, lora_A, lora_B) of
    adapter ``adapter_name`` (None: the active one) in each LoRALinear holding it. Names are those
    of the unwrapped model; under FSDP, lora_A / lora_B are the local shards (``gather_tensors``
    reads them whole)."""
    model = unwrap_model(model)
    modules = _lora_layers(model)
    if not modules:
        raise ValueError("the model has no LoRALinear modules: call fastpeft.inject_lora first")
    name = _active_name(model) if adapter_name is None else adapter_name
    views = {}
    for n, m in modules.items():
        if m.has_adapter(name):
            spec = m.adapter_spec(name)
            A, B = m.adapter_weights(name)
            views[n] = SimpleNamespace(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                                       use_rslora=spec.use_rslora, scaling=spec.scaling, lora_A=A, lora_B=B)
    if not views:
        raise ValueError(f"no LoRALinear of the model holds adapter {name!r}; its adapters: "
                         f"{lora_adapters(model)}")
    return views


def adapter_config(model: nn.Module, task_type: str | None = None, adapter_name: str | None = None, *,
                   bias: str = "none", modules_to_save: list[str] | None = None) -> dict:
    """The adapter_config.json contents that describe adapter ``adapter_name`` (None: the active
    one) of the LoRALinear modules of ``model``, with PEFT's ``bias`` and ``modules_to_save``."""
    model = unwrap_model(model)
    modules = adapter_views(model, adapter_name)
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    r = Counter(m.r for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in modules.values()).most_common(1)[0][0]
    model_cls = model_class(model)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": None if task_type else {"base_model_class": model_cls.__name__,
                                                 "parent_library": model_cls.__module__},
        "base_model_name_or_path": _name_or_path(model),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": _uniform(modules, "lora_dropout"),
        "use_rslora": _uniform(modules, "use_rslora"),
        "target_modules": _target_modules(model, list(modules)),
        "rank_pattern": {_exact(n): m.r for n, m in modules.items() if m.r != r},
        "alpha_pattern": {_exact(n): _number(m.lora_alpha) for n, m in modules.items()
                          if m.lora_alpha != alpha},
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": bias,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "use_dora": False,
        "lora_bias": False,
        "layer_replication": None,
    }


def _config_value(model: nn.Module, *names: str):
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def prompt_adapter_config(model: nn.Module, task_type: str | None = None) -> dict:
    """The adapter_config.json contents (a PEFT PromptTuningConfig) for the soft prompt that
    ``fastpeft.add_prompt_tuning`` put on ``model``."""
    model = unwrap_model(model)
    prompt = get_prompt_tuning(model)
    if prompt is None:
        raise ValueError("the model has no prompt tuning: call fastpeft.add_prompt_tuning first")
    if task_type is not None and task_type != prompt.task_type:
        raise ValueError(f"task_type={task_type!r} but the model's prompt tuning was set up for "
                         f"{prompt.task_type!r}")
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": prompt.task_type,
        "auto_mapping": None,
        "base_model_name_or_path": _name_or_path(model),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "token_dim": prompt.embedding_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": _config_value(model, "num_attention_heads", "n_head", "num_heads"),
        "num_layers": _config_value(model, "num_hidden_layers", "num_layers", "n_layer"),
        "modules_to_save": list(prompt.modules_to_save) or None,
        "prompt_tuning_init": prompt.peft_init if prompt.peft_init in PROMPT_INITS else "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }


def _is_bias(name: str) -> bool:
    """fastpeft's (and loralib's) bias rule for bias="all": the tensor's own name contains "bias"."""
    return "bias" in name.rpartition(".")[2]


def _inside(name: str, modules) -> str | None:
    """The module of ``modules`` (names) that ``name`` lies in, if any (the innermost)."""
    return max((m for m in modules if name.startswith(m + ".")), key=len, default=None)


def _peft_names(model: nn.Module, layers: dict[str, LoRALinear]) -> list[str]:
    """The module names PEFT's _set_trainable tests modules_to_save entries against: those of the
    model inside a PeftModel (prefix "base_model.model."), LoRA layers with their children."""
    names = [PREFIX + n for n in _module_names(model)]
    for n in layers:
        names += [f"{PREFIX}{n}.{c}" for c in ("base_layer", "lora_A", "lora_B", "lora_dropout")]
        names += [f"{PREFIX}{n}.{c}.{DEFAULT_ADAPTER}" for c in ("lora_A", "lora_B", "lora_dropout")]
    return names


def _modules_to_save_entries(model: nn.Module, layers: dict[str, LoRALinear], heads: list[str]) -> list[str]:
    """The shortest modules_to_save list that selects exactly the modules ``heads`` both under
    fastpeft's rule (whole module names) and under PEFT's (a raw suffix of the name): their leaf
    names, else their paths. Raises ValueError when neither does."""
    everything, peft_names = list(_module_names(model)), _peft_names(model, layers)
    wanted = set(heads)
    for candidate in (sorted({h.rpartition(".")[2] for h in heads}), sorted(wanted)):
        ours = {n for n in everything if name_matches(n, candidate)}
        theirs = {n.removeprefix(PREFIX) for n in peft_names if any(n.endswith(c) for c in candidate)}
        if ours == wanted and theirs == wanted:
            return candidate
    raise ValueError(f"save_adapter: no modules_to_save list selects exactly the modules {sorted(wanted)} "
                     f"under PEFT's rule (a raw suffix of the module name): another module's name ends in "
                     f"one of theirs")


_BIAS_ORDER = {"none": 0, "lora_only": 1, "all": 2}


def _saved_tensors(model: nn.Module, views: dict[str, SimpleNamespace], adapter: str, infer: bool,
                   bias: str | None, modules_to_save) -> tuple[str, list[str], dict[str, str]]:
    """What a LoRA adapter file holds besides lora_A / lora_B, in PEFT's format: (bias mode,
    modules_to_save entries, file key -> tensor name). With ``infer`` (saving the active adapter)
    every parameter that requires grad must be saved: the adapter's A and B; a bias (a LoRALinear's
    base bias: bias "lora_only"; any other: "all", PEFT's "base_model.model.<path>.base_layer.bias"
    for a LoRALinear's); a parameter of a module that holds no LoRALinear (modules_to_save: the
    largest such module whose parameters all train, e.g. a classifier head; its whole state is
    saved as "base_model.model.<module>.<tensor>"). Anything else raises ValueError naming it.
    ``bias`` / ``modules_to_save`` given add to what is inferred (they never drop a trained value)."""
    index = tensor_index(model)
    modules, layers = _module_names(model), _lora_layers(model)
    saved_ids = {id(t) for v in views.values() for t in (v.lora_A, v.lora_B)}
    lora_biases = {id(m.base_bias): n for n, m in layers.items() if m.base_bias is not None}
    heads, bias_mode, free_biases, lora_trained, wrong = set(), "none", [], [], []

    def trains(module: nn.Module) -> bool:
        params = list(module.parameters())
        return bool(params) and all(p.requires_grad for p in params)

    def holds_lora(name: str) -> bool:
        return name in layers or any(n.startswith(name + ".") for n in layers)

    seen = set()
    for name, (owner, attr) in index.items() if infer else ():
        p = owner._parameters.get(attr)
        if p is None or not p.requires_grad or id(p) in saved_ids or id(p) in seen:
            continue
        seen.add(id(p))
        layer = name if name in layers else _inside(name, layers)
        module = name.rpartition(".")[0]
        if id(p) in lora_biases:
            bias_mode = max(bias_mode, "lora_only", key=_BIAS_ORDER.get)
            lora_trained.append(name)
        elif layer is not None or not module:
            wrong.append(name)
        elif _is_bias(name):  # a bias alone is PEFT's bias "all", unless its module is saved whole
            free_biases.append(name)
        elif holds_lora(module):
            wrong.append(name)
        else:
            while "." in module and trains(modules[module.rpartition(".")[0]]) and \
                    not holds_lora(module.rpartition(".")[0]):
                module = module.rpartition(".")[0]
            heads.add(module)
    if wrong:
        raise ValueError(f"save_adapter: parameters {wrong[:10]} require grad but PEFT's LoRA format cannot hold "
                         f"them (they are not lora_A / lora_B of adapter {adapter!r}, not a bias, and not in a "
                         f"module without LoRA that modules_to_save could name); freeze them "
                         f"(requires_grad_(False)) to save the adapter without them")
    if modules_to_save is not None:
        if isinstance(modules_to_save, str) or not all(isinstance(e, str) and e for e in modules_to_save):
            raise TypeError(f"save_adapter: modules_to_save must be None or a list of module names, "
                            f"got {modules_to_save!r}")
        chosen = [n for n in modules if name_matches(n, list(modules_to_save))]
        if not chosen:
            raise ValueError(f"save_adapter: modules_to_save={list(modules_to_save)} selects no module of "
                             f"{type(model).__name__} (whole module names)")
        clash = [n for n in chosen if holds_lora(n) or _inside(n, layers)]
        if clash:
            raise ValueError(f"save_adapter: modules_to_save selects {clash}, which hold or lie in LoRA layers")
        heads |= set(chosen)
    heads = sorted(h for h in heads if _inside(h, heads) is None)
    if any(_inside(b, heads) is None for b in free_biases):
        bias_mode = "all"
    if bias is not None:
        if bias not in BIAS_MODES:
            raise ValueError(f"save_adapter: bias must be None or one of {BIAS_MODES}, got {bias!r}")
        if _BIAS_ORDER[bias] < _BIAS_ORDER[bias_mode]:
            trained = lora_trained + [b for b in free_biases if _inside(b, heads) is None]
            raise ValueError(f"save_adapter: bias={bias!r} would drop trained biases {trained[:10]} "
                             f"(they need bias={bias_mode!r}); freeze them to leave them out")
        bias_mode = bias
    keys = {}
    if bias_mode != "none":
        lora_bias_names = {f"{n}.{m.base_bias_name}": n for n, m in layers.items() if m.base_bias is not None}
        for name, (owner, attr) in index.items():
            if attr not in owner._parameters or _inside(name, heads) is not None:
                continue
            if name in lora_bias_names:
                if bias_mode == "all" or lora_bias_names[name] in views:
                    keys[f"{PREFIX}{lora_bias_names[name]}.base_layer.bias"] = name
            elif bias_mode == "all" and _is_bias(name) and _inside(name, layers) is None:
                keys[PREFIX + name] = name
    for name in index:
        if _inside(name, heads) is not None:
            keys[PREFIX + name] = name
    return bias_mode, _modules_to_save_entries(model, layers, heads) if heads else [], keys


def _check_directory(directory) -> str:
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_adapter: {directory!r} exists and is not a directory")
    return directory


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, task_type: str | None = None,
                 adapter_name: str | None = None, bias: str | None = None,
                 modules_to_save: list[str] | None = None, is_main_process: bool | None = None) -> None:
    """Write the LoRALinear modules of ``model`` to ``directory`` as a PEFT LoRA adapter, or,
    for a model with prompt tuning, its soft prompt as a PEFT prompt-tuning adapter.

    With several named adapters one is written: ``adapter_name``, by default the active one
    (an error when layers disagree on it), from the layers that hold it; keys carry no
    adapter name, as in the directories PEFT's save_pretrained writes per adapter.

    Nothing that trains is dropped. Saving the active adapter, every parameter that requires
    grad goes into the file in PEFT's format, or save_adapter raises ValueError naming it:
    biases (``mark_only_lora_as_trainable(model, bias=...)``) as PEFT's ``bias`` "lora_only"
    (only LoRALinear biases train: "base_model.model.<path>.base_layer.bias") or "all" (every
    parameter named *bias*), and the modules without LoRA whose parameters train (a classifier
    head you unfroze) as PEFT's ``modules_to_save``, their whole state under
    "base_model.model.<module>.<tensor>". ``bias`` / ``modules_to_save`` (whole module names)
    save more than what trains; they cannot leave out what trains. An inactive adapter is saved
    with these only when they are given.

    Every LoRALinear must share lora_dropout and use_rslora (PEFT keeps one of each); r and
    lora_alpha may differ per module (rank_pattern / alpha_pattern). Tensors keep their dtype.
    A prompt is saved as "prompt_embeddings" [num_virtual_tokens, token_dim] with the task_type
    given to add_prompt_tuning (``task_type`` here, if given, must agree).

    ``model`` may be wrapped for training: DistributedDataParallel, torch.compile, FSDP1
    (FullyShardedDataParallel with use_orig_params=True) or FSDP2 (fully_shard); the file holds
    the keys and values of the unwrapped model. Under FSDP the whole tensors are gathered from the
    shards (only the saved ones: ``fastpeft.lora.gather_tensors``), a collective: every rank must
    call save_adapter, and it returns on each rank once the files are written. Under DDP nothing
    is gathered: call it on every rank or on rank 0 alone. One process writes: rank 0 of the
    default process group for a model wrapped in DDP or sharded by FSDP, every caller otherwise;
    ``is_main_process`` overrides this (PEFT's argument of that name).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_adapter expects an nn.Module, got {type(model).__name__}")
    inner = unwrap_model(model)
    prompt = get_prompt_tuning(inner)
    if prompt is not None and lora_modules(inner):
        raise ValueError("the model has both LoRALinear modules and prompt tuning; a PEFT adapter "
                         "directory holds one method")
    if prompt is not None and (adapter_name, bias, modules_to_save) != (None, None, None):
        raise ValueError("save_adapter: adapter_name, bias and modules_to_save are for LoRA adapters; a soft "
                         "prompt is saved with the modules_to_save given to add_prompt_tuning")
    directory = _check_directory(directory)
    index = tensor_index(inner)
    name_of = {id(owner._parameters.get(attr, owner._buffers.get(attr))): n for n, (owner, attr) in index.items()}
    if prompt is not None:
        config = prompt_adapter_config(inner, task_type)
        keys = {PROMPT_KEY: name_of[id(prompt.weight)]}
        heads = [canonical_name(h) for h in modules_to_save_names(inner, prompt.modules_to_save)]
        keys.update({PROMPT_PREFIX + n: n for n in index if _inside(n, heads) is not None})
    else:
        views = adapter_views(inner, adapter_name)
        name = _active_name(inner) if adapter_name is None else adapter_name
        infer = name in active_adapters(inner)
        bias_mode, entries, keys = _saved_tensors(inner, views, name, infer, bias, modules_to_save)
        config = adapter_config(inner, task_type, adapter_name, bias=bias_mode, modules_to_save=entries)
        for n, m in views.items():
            keys[f"{PREFIX}{n}.lora_A.weight"] = name_of[id(m.lora_A)]
            keys[f"{PREFIX}{n}.lora_B.weight"] = name_of[id(m.lora_B)]
    values = gather_tensors(model, list(keys.values()))
    distributed = is_distributed(model)
    if is_main_process is None:
        is_main_process = not (distributed and dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if is_main_process:
        # copies: tied tensors (an embedding and its head) must not share storage in a safetensors file
        tensors = {key: values[n].to("cpu", copy=True).contiguous() for key, n in sorted(keys.items())}
        os.makedirs(directory, exist_ok=True)
        _safetensors().save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    if is_sharded(model) and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# load: everything in an adapter directory is untrusted input, checked before the model is touched


def _json_type(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    shown = repr(value)
    return f"{shown if len(shown) <= 80 else shown[:80] + '...'} ({names.get(type(value), type(value).__name__)})"


_REQUIRED = object()  # a field without a default


class _Fields:
    """Typed reads of an adapter_config.json: a wrong type raises TypeError, a wrong value
    ValueError, each naming the field and the file (``where``). A missing field or null takes the
    default, as in PEFT's config classes."""

    def __init__(self, config: dict, where: str):
        self.config, self.where = config, where

    def fail(self, exc: type, field: str, text: str):
        raise exc(f"load_adapter: {self.where}: field {field!r} {text}")

    def get(self, field: str, default=None):
        value = self.config.get(field)
        return default if value is None else value

    def flag(self, field: str, default: bool = False) -> bool:
        value = self.get(field, default)
        if not isinstance(value, bool):
            self.fail(TypeError, field, f"must be true or false (a JSON boolean), got {_json_type(value)}")
        return value

    def integer(self, field: str, default: int | None | object = _REQUIRED, minimum: int = 1) -> int | None:
        value = self.get(field, default)
        if value is _REQUIRED:
            self.fail(ValueError, field, "is missing")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(TypeError, field, f"must be an integer, got {_json_type(value)}")
        if value < minimum:
            self.fail(ValueError, field, f"must be >= {minimum}, got {value}")
        return value

    def number(self, field: str, default: float, low: float = -math.inf, high: float = math.inf) -> float:
        """A finite number in [low, high) (JSON's NaN and Infinity, which Python writes, are refused)."""
        value = self.get(field, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(TypeError, field, f"must be a number, got {_json_type(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not (math.isfinite(number) and low <= number < high):
            bounds = "" if (low, high) == (-math.inf, math.inf) else f" in [{low:g}, {high:g})"
            self.fail(ValueError, field, f"must be a finite number{bounds}, got {_json_type(value)}")
        return value

    def text(self, field: str, default: str | None = None) -> str | None:
        value = self.get(field, default)
        if value is not None and not isinstance(value, str):
            self.fail(TypeError, field, f"must be a string or null, got {_json_type(value)}")
        return value

    def names(self, field: str) -> list[str] | None:
        """null, or module names: a string (one name) or a list of non-empty strings."""
        value = self.config.get(field)
        if isinstance(value, str):
            value = [value]
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            self.fail(TypeError, field, f"must be a module name, a list of module names or null, "
                                        f"got {_json_type(self.config.get(field))}")
        if value is not None and not all(value):
            self.fail(ValueError, field, "must not hold an empty module name")
        return value

    def targets(self, field: str, regex: str = "{}") -> Pattern | list[str] | None:
        """PEFT's target_modules / exclude_modules / layers_pattern: null, a regex string (embedded
        in a larger one as ``regex`` shows, which must compile) or a list of module names (PEFT's
        sets are written as lists; for layers_pattern each entry is a regex too)."""
        value = self.config.get(field)
        what = f"load_adapter: {self.where}: field {field!r}"
        if isinstance(value, str):
            compile_regex(regex.format(value), what)
            return Pattern(value, what)
        if value is None or isinstance(value, list) and not value:
            return value
        if not isinstance(value, list):
            self.fail(TypeError, field, f"must be a regex string, a list of module names or null, "
                                        f"got {_json_type(value)}")
        names = self.names(field)
        for name in names if regex != "{}" else ():
            compile_regex(regex.format(name), what)
        return [Pattern(name, what) for name in names] if regex != "{}" else names

    def layers(self, field: str) -> int | list[int] | None:
        value = self.config.get(field)
        entries = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in entries):
            self.fail(TypeError, field, f"must be a layer index, a list of layer indices or null, "
                                        f"got {_json_type(value)}")
        if value is not None and any(v < 0 for v in entries):
            self.fail(ValueError, field, f"must hold layer indices >= 0, got {_json_type(value)}")
        return value

    def pattern_map(self, field: str, kind: str) -> dict:
        """PEFT's rank_pattern / alpha_pattern: an object from regex keys (matched as
        re.match(rf"(.*\.)?({key})$", name)) to values of ``kind``: "integer" (> 0) or "number"."""
        value = self.get(field, {})
        if not isinstance(value, dict):
            self.fail(TypeError, field, f"must be an object (module pattern -> value) or null, got {_json_type(value)}")
        out = {}
        for key, v in value.items():
            what = f"load_adapter: {self.where}: field {field!r} key {key!r}"
            compile_regex(rf"(.*\.)?({key})$", what)
            label = f"{field}[{key!r}]"
            if v is None:
                self.fail(TypeError, label, f"must be {'an integer' if kind == 'integer' else 'a number'}, got null")
            entry = _Fields({label: v}, self.where)
            out[Pattern(key, what)] = entry.integer(label) if kind == "integer" else entry.number(label, 0)
        return out


MAX_CONFIG_BYTES = 16 << 20  # adapter_config.json files take kilobytes; ours list every adapted path at most
BOOL_FIELDS = ("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora")  # UNSUPPORTED_FIELDS that are flags


def _read_config(path: str) -> dict:
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"load_adapter: {path!r} has {size} bytes; an adapter config is refused above "
                         f"{MAX_CONFIG_BYTES}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except RecursionError:
        raise ValueError(f"load_adapter: {path!r} nests JSON values too deeply") from None
    except ValueError as e:  # not UTF-8, not JSON, an integer of too many digits
        raise ValueError(f"load_adapter: {path!r} is not a valid JSON file: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {path!r} does not hold a JSON object (got {_json_type(config)})")
    return config


def _read_weights(directory: str) -> tuple[dict, str]:
    """The tensors of the adapter's weights file, loaded as data only (safetensors, or a torch file
    read with weights_only=True: no pickled code runs), and its path."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        def read():
            return _safetensors().load_file(path, device="cpu")
    elif os.path.isfile(os.path.join(directory, LEGACY_WEIGHTS_NAME)):
        path = os.path.join(directory, LEGACY_WEIGHTS_NAME)

        def read():
            return torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"load_adapter: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} "
                                f"found in {directory!r}")
    try:
        state = read()
    except (OSError, MemoryError):
        raise
    except Exception as e:  # the file's own parser refused it (truncated, corrupt): whatever it raises
        raise ValueError(f"load_adapter: {path!r} is not a readable weights file: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"load_adapter: {path!r} does not map names to tensors")
    return state, path


def _read(directory: str) -> tuple[dict, dict, str, str]:
    """(config, tensors, config path, weights path) of an adapter directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_adapter: adapter directory {directory!r} does not exist"
                                if not os.path.exists(directory) else
                                f"load_adapter: {directory!r} is not a directory")
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_adapter: {config_path!r} not found")
    config = _read_config(config_path)
    state, weights_path = _read_weights(directory)
    return config, state, config_path, weights_path


def check_config(config: dict, where: str = "adapter config") -> dict:
    """The fields of a PEFT LoraConfig that fastpeft uses, each checked (type, range; regexes
    compile), as a dict: r, lora_alpha, lora_dropout, use_rslora, target_modules,
    exclude_modules, layers_to_transform, layers_pattern, rank_pattern, alpha_pattern, bias,
    modules_to_save (a list of module names), task_type (a string or None). Raises,
    naming the field and ``where``, for a wrong type or value (TypeError / ValueError) and for a
    config that is not plain LoRA on linear layers (NotImplementedError)."""
    fields = _Fields(config, where)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: {where}: field 'peft_type' must be 'LORA' or 'PROMPT_TUNING', "
                         f"got {_json_type(config.get('peft_type'))}")
    for field in UNSUPPORTED_FIELDS:
        if fields.flag(field) if field in BOOL_FIELDS else config.get(field):
            raise NotImplementedError(f"load_adapter: {where}: adapter config field {field}={config[field]!r} "
                                      f"is not supported by fastpeft (plain LoRA only)")
    bias = fields.text("bias", "none")
    if bias not in BIAS_MODES:
        fields.fail(ValueError, "bias", f"must be one of {BIAS_MODES}, got {_json_type(bias)}")
    init = fields.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        fields.fail(TypeError, "init_lora_weights", f"must be true, false or a method name, got {_json_type(init)}")
    if init not in PLAIN_INITS:
        raise NotImplementedError(f"load_adapter: {where}: adapter config field init_lora_weights={init!r} is not "
                                  f"supported: it changes the base weights or the layer (supported: {PLAIN_INITS})")
    if config.get("target_modules") is None:
        raise ValueError(f"load_adapter: {where}: adapter config has target_modules=null; fastpeft needs the "
                         f"modules named")
    return {
        "r": fields.integer("r", 8),
        "lora_alpha": fields.number("lora_alpha", 8),
        "lora_dropout": fields.number("lora_dropout", 0.0, 0.0, 1.0),
        "use_rslora": fields.flag("use_rslora"),
        "target_modules": fields.targets("target_modules"),
        "exclude_modules": fields.targets("exclude_modules"),
        "layers_to_transform": fields.layers("layers_to_transform"),
        "layers_pattern": fields.targets("layers_pattern", regex=r"(?:^|.*?\.){}\.(?P<idx>\d+)\."),
        "rank_pattern": fields.pattern_map("rank_pattern", "integer"),
        "alpha_pattern": fields.pattern_map("alpha_pattern", "number"),
        "bias": bias,
        "modules_to_save": fields.names("modules_to_save") or [],
        "task_type": fields.text("task_type"),
    }


def _ranks(config: dict, names: list[str]) -> dict[str, tuple[int, float]]:
    """module name -> (r, lora_alpha) under the (checked) config's r / lora_alpha and patterns."""
    r, alpha = config["r"], config["lora_alpha"]
    out = {}
    for n in names:
        r_n = pattern_value(config["rank_pattern"], n, r)
        alpha_n = pattern_value(config["alpha_pattern"], n, alpha)
        out[n] = (_checks.positive_int(f"r of {n!r}", r_n), float(alpha_n))
    return out


def _planned_names(model: nn.Module, config: dict, where: str) -> list[str]:
    """The modules PEFT would adapt in ``model`` under ``config`` (a LoRALinear counts as the
    linear it wraps; the modules inside it are not candidates)."""
    targets = config["target_modules"]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            raise NotImplementedError(f"load_adapter: {where}: target_modules='all-linear' on a model with "
                                      f"transformers Conv1D layers: fastpeft adapts nn.Linear, Int8Linear and "
                                      f"QuantLinear only")
        head = output_layer_name(model)
        names = [n for n in adaptable_names(model)
                 if n != head and not _excluded(config, n) and _layer_index_ok(config, n)]
    else:
        inside = tuple(n + "." for n, m in model.named_modules() if n and isinstance(m, LoRALinear))
        names = [n for n, _ in model.named_modules()
                 if n and not n.startswith(inside) and peft_matches(config, n)]
        for n in names:
            module = model.get_submodule(n)
            if not isinstance(module, BASE_TYPES + (LoRALinear,)):
                raise NotImplementedError(f"load_adapter: {where}: target_modules={targets!r} selects {n!r} of type "
                                          f"{type(module).__name__}: fastpeft adapts nn.Linear, Int8Linear and "
                                          f"QuantLinear only")
    if not names:
        raise ValueError(f"load_adapter: {where}: adapter config target_modules={targets!r} selects no module of "
                         f"this model")
    return names


def _parse_keys(state: dict, where: str) -> tuple[dict, list[str]]:
    """(module name, "A"|"B") -> (file key, tensor); and the keys that are not LoRA weights."""
    found, other, adapters = {}, [], set()
    for key, tensor in state.items():
        match = _KEY.fullmatch(key.removeprefix(PREFIX))
        if not match:
            other.append(key)
            continue
        slot = (match["module"], match["which"])
        if slot in found:
            raise ValueError(f"load_adapter: {where}: keys {found[slot][0]!r} and {key!r} hold the same weight")
        found[slot] = (key, tensor)
        adapters.add(match["adapter"])
    if len(adapters) > 1:
        raise ValueError(f"load_adapter: {where}: the file holds several adapters {sorted(map(str, adapters))}")
    return found, other


def _check_like(key: str, value: torch.Tensor, target: torch.Tensor, name: str, where: str) -> None:
    """The file's tensor ``key`` can replace the model's tensor ``name``: a floating-point tensor for a
    floating one (any float dtype: it is cast), the very dtype otherwise, and the same shape."""
    if target.is_floating_point():
        _weight_dtype(key, value, where)
    elif value.dtype != target.dtype:
        raise TypeError(f"load_adapter: {where}: {key!r} has dtype {value.dtype} but the model's {name} "
                        f"has dtype {target.dtype}")
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"load_adapter: {where}: {key!r} has shape {tuple(value.shape)} but the model's "
                         f"{name} has shape {tuple(target.shape)}")


def _weight_dtype(key: str, tensor: torch.Tensor, where: str) -> None:
    """Only floating-point tensors are weights: an integer or bool tensor would be cast, a complex
    one lose its imaginary part."""
    if not tensor.is_floating_point():
        raise TypeError(f"load_adapter: {where}: {key!r} has dtype {str(tensor.dtype).replace('torch.', '')}; "
                        f"weights must be floating point")


def _prompt_task(fields: _Fields) -> str | None:
    task = fields.text("task_type")
    if task is not None and task not in PROMPT_TASK_TYPES:
        if task in TASK_TYPES:
            raise NotImplementedError(f"load_adapter: {fields.where}: adapter config task_type={task!r} is not "
                                      f"supported for prompt tuning (supported: {PROMPT_TASK_TYPES})")
        fields.fail(ValueError, "task_type", f"must be one of PEFT's task types {TASK_TYPES} or null, got {task!r}")
    return task


def _load_prompt(model: nn.Module, config: dict, state: dict, config_path: str, weights_path: str) -> nn.Module:
    fields = _Fields(config, config_path)
    subs = fields.integer("num_transformer_submodules", 1)
    if subs != 1:
        raise NotImplementedError(f"load_adapter: {config_path}: adapter config num_transformer_submodules={subs!r}: "
                                  f"fastpeft's prompt tuning has one prompt (no encoder-decoder models)")
    task = _prompt_task(fields)
    T = fields.integer("num_virtual_tokens")
    token_dim = fields.integer("token_dim", None)
    saved = fields.names("modules_to_save") or []
    init = fields.text("prompt_tuning_init")
    if PROMPT_KEY not in state:
        raise ValueError(f"load_adapter: the prompt-tuning adapter {weights_path!r} has no {PROMPT_KEY!r} "
                         f"(keys: {sorted(state)[:20]})")
    tensor = state[PROMPT_KEY]
    existing = get_prompt_tuning(model)
    # PEFT adds its task heads to modules_to_save when it loads an adapter.
    spec = list(dict.fromkeys(saved + list(DEFAULT_MODULES_TO_SAVE.get(task, ()))))
    heads = _head_tensors(model, weights_path, spec + list(existing.modules_to_save if existing else ()),
                          {k: v for k, v in state.items() if k != PROMPT_KEY})
    dim = existing.embedding_dim if existing is not None else input_embeddings(model).weight.shape[1]
    _weight_dtype(PROMPT_KEY, tensor, weights_path)
    if tuple(tensor.shape) != (T, dim):
        raise ValueError(f"load_adapter: {weights_path}: {PROMPT_KEY!r} has shape {tuple(tensor.shape)} but "
                         f"num_virtual_tokens={T} and the model's embedding dim {dim} need ({T}, {dim})")
    if token_dim is not None and token_dim != dim:
        raise ValueError(f"load_adapter: {config_path}: adapter config token_dim={token_dim} but the model's "
                         f"embeddings have dim {dim}")
    if existing is not None and existing.num_virtual_tokens != T:
        raise ValueError(f"load_adapter: {config_path}: the model's prompt has {existing.num_virtual_tokens} virtual "
                         f"tokens but the adapter has num_virtual_tokens={T}")
    if existing is not None and task is not None and task != existing.task_type:
        raise ValueError(f"load_adapter: {config_path}: the model's prompt tuning is for "
                         f"task_type={existing.task_type!r} but the adapter's is {task!r}")
    if existing is None and saved and not modules_to_save_names(model, spec):
        raise ValueError(f"load_adapter: {config_path}: field 'modules_to_save' {saved} selects no module of "
                         f"{type(model).__name__} (whole module names)")
    # every check is done: from here on the model changes
    if existing is None:
        add_prompt_tuning(model, T, init=tensor.to(torch.float32), task_type=task,
                          modules_to_save=spec if saved else None)
        if init in PROMPT_INITS:
            get_prompt_tuning(model).peft_init = init
    else:
        with torch.no_grad():
            existing.weight.copy_(tensor)
    with torch.no_grad():
        for target, value in heads:
            target.copy_(value)
    return model


def _head_tensors(model: nn.Module, where: str, spec: list[str], state: dict) -> list:
    """(model tensor, file tensor) for the modules_to_save keys "base_model.<module>.<name>" of a
    prompt-tuning adapter, each checked: a key must name a tensor of a module ``spec`` selects
    (``modules_to_save_names``: whole module names, not string suffixes), with its shape and a
    dtype of its kind (floating point for floating tensors, the same dtype otherwise); two keys
    of one tied tensor must agree."""
    names = sorted(modules_to_save_names(model, spec), key=len, reverse=True)
    pairs, unexpected, seen = [], [], {}
    for key, value in sorted(state.items()):
        path = key.removeprefix(PROMPT_PREFIX)
        name = next((n for n in names if path.startswith(n + ".")), None) if key.startswith(PROMPT_PREFIX) else None
        target = model.get_submodule(name).state_dict(keep_vars=True).get(path[len(name) + 1:]) if name else None
        if target is None:
            unexpected.append(key)
            continue
        _check_like(key, value, target, path, where)
        tied = seen.setdefault(id(target), (key, value))
        if tied[0] != key and not torch.equal(tied[1], value.to(tied[1].dtype)):
            raise ValueError(f"load_adapter: {where}: {tied[0]!r} and {key!r} are the same tensor of the model "
                             f"(tied) but hold different values")
        pairs.append((target, value))
    if unexpected:
        raise ValueError(f"load_adapter: the prompt-tuning adapter {where!r} has keys that name no tensor of its "
                         f"modules_to_save {spec} (whole module names): {unexpected[:20]}")
    return pairs


def _bias_targets(model: nn.Module, index: dict, names: list[str], heads: list[str], bias: str) -> dict[str, str]:
    """File key -> tensor name of the biases a LoRA adapter with PEFT's ``bias`` may hold: for
    "lora_only" and "all" the base bias of each adapted module P ("base_model.model.P.base_layer.bias",
    PEFT's name, whatever the module is now: nn.Linear, Int8Linear, QuantLinear or LoRALinear); for "all" also
    every other parameter named *bias* outside LoRA layers and the modules_to_save."""
    if bias == "none":
        return {}
    keys = {}
    for n in names:
        module = model.get_submodule(n)
        attr = module.base_bias_name if isinstance(module, LoRALinear) else "bias"
        if f"{n}.{attr}" in index:
            keys[f"{PREFIX}{n}.base_layer.bias"] = f"{n}.{attr}"
    if bias == "all":
        layers = names + [canonical_name(n) for n in lora_modules(model)]
        for n, (owner, attr) in index.items():
            if attr in owner._parameters and _is_bias(n) and _inside(n, layers) is None and _inside(n, heads) is None:
                keys[PREFIX + n] = n
    return keys


def _wrapper_bias(path: str, heads: list[str], index: dict) -> str | None:
    """For PEFT's bias "all" keys of a head in its in-memory names, "<head>.original_module.<bias>"
    and "<head>.modules_to_save[.<adapter name>].<bias>" (PEFT strips the adapter name only right
    before a tensor's own name), the model's "<head>.<bias>"; None for anything else."""
    head = _inside(path, heads)
    if head is None:
        return None
    where, _, rest = path.removeprefix(head + ".").partition(".")
    candidates = [rest] + ([rest.partition(".")[2]] if where == "modules_to_save" else [])
    if where in ("original_module", "modules_to_save"):
        for name in candidates:
            if f"{head}.{name}" in index and _is_bias(name):
                return f"{head}.{name}"
    return None


def _extra_tensors(model: nn.Module, config: dict, names: list[str], keys: list[str], state: dict,
                   where: str) -> tuple[list, list[str], list[str], list[str]]:
    """The biases and modules_to_save tensors of a LoRA adapter file (``keys``: those that are not
    lora_A / lora_B), each checked against the model: ([(model tensor, file tensor)], the modules
    modules_to_save selects, missing keys, unexpected keys).

    modules_to_save selects whole module names (``fastpeft.prompt_tuning.modules_to_save_names``),
    the config's entries and PEFT's task heads for its task_type ("classifier", "score",
    "pre_classifier" for SEQ_CLS and TOKEN_CLS, "qa_outputs" for QUESTION_ANS, which PEFT adds when it loads); a key
    "base_model.model.<module>.<tensor>" must name a parameter or persistent buffer of one of them,
    and every tensor of the modules the config names must be in the file (PEFT writes each whole).
    PEFT's bias "all" also writes a head's biases under its in-memory names (``_wrapper_bias``); they are
    checked and skipped ("<module>.bias" is the trained one). Biases: ``_bias_targets``. Nothing else of the base model is written."""
    index = tensor_index(model)
    modules = list(_module_names(model))
    task_heads = list(DEFAULT_MODULES_TO_SAVE.get(config["task_type"], ()))
    spec = list(dict.fromkeys(config["modules_to_save"] + task_heads))
    heads = [n for n in modules if name_matches(n, spec)]
    heads = [h for h in heads if _inside(h, heads) is None]
    named = [h for h in heads if name_matches(h, config["modules_to_save"])]
    layers = names + [canonical_name(n) for n in lora_modules(model)]
    clash = [h for h in heads if h in layers or _inside(h, layers) or any(n.startswith(h + ".") for n in layers)]
    if clash:
        raise ValueError(f"load_adapter: {where}: modules_to_save {spec} selects {clash}, which are or hold LoRA "
                         f"layers")
    targets = _bias_targets(model, index, names, heads, config["bias"])
    targets.update({PREFIX + n: n for n in index if _inside(n, heads) is not None})
    pairs, unexpected, seen = [], [], {}
    for key in sorted(keys):
        value, name = state[key], targets.get(key)
        quirk = None
        if name is None and config["bias"] == "all" and key.startswith(PREFIX):
            name = quirk = _wrapper_bias(key.removeprefix(PREFIX), heads, index)
        if name is None:
            unexpected.append(key)
            continue
        owner, attr = index[name]
        target = getattr(owner, attr)
        _check_like(key, value, target, name, where)
        if quirk is not None:
            continue
        tied = seen.setdefault(id(target), (key, value))
        if tied[0] != key and not torch.equal(tied[1], value.to(tied[1].dtype)):
            raise ValueError(f"load_adapter: {where}: {tied[0]!r} and {key!r} are the same tensor of the model "
                             f"(tied) but hold different values")
        pairs.append((target, value))
    missing = [PREFIX + n for n in index if _inside(n, named) is not None and PREFIX + n not in state]
    return pairs, heads, missing, unexpected


def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """target <- value (a whole tensor from a file); an FSDP2 DTensor gets its shard of it
    (``distribute_tensor``, a collective: every rank must call this, in the same order)."""
    dtensor = dtensor_class()
    if dtensor is not None and isinstance(target, dtensor):
        from torch.distributed.tensor import distribute_tensor
        value = distribute_tensor(value.to(target.to_local().device, target.dtype), target.device_mesh,
                                  target.placements)
    target.copy_(value)


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load the PEFT LoRA adapter in ``directory`` into ``model``; return ``model``.

    ``adapter_name``: the named adapter to load into. None means the active adapter ("default"
    for a model without LoRA). A model without LoRALinear modules gets them as below, holding
    this adapter (active, trainable). In a model that has LoRA, an adapter name no layer holds
    is added next to the others (inactive, frozen) in the modules its config selects, with its
    own r / lora_alpha / target modules: LoRALinear modules get it via add_adapter, nn.Linear /
    Int8Linear / QuantLinear ones become LoRALinear holding only it; a name layers already hold is loaded
    into those layers, which must match the adapter's modules and scalings (and not be merged
    with it).

    A model without LoRALinear modules first gets them where the config's target_modules
    (list, regex, "all-linear"; exclude_modules, layers_to_transform) select them, with
    r / lora_alpha from rank_pattern / alpha_pattern, lora_dropout and use_rslora, and only
    LoRA trains (with the config's bias, and its modules_to_save). A model that has them must
    match the adapter's modules and scalings. The weights are copied into lora_A / lora_B,
    keeping their dtype and device; keys may carry an adapter name ("...lora_A.default.weight").

    PEFT's ``bias`` ("lora_only", "all") and ``modules_to_save`` (a trained classifier head:
    PEFT's SEQ_CLS / TOKEN_CLS adapters) load too: the biases into the model's biases, the
    modules' tensors into those modules, in place (``_extra_tensors`` says which keys may write
    what). fastpeft keeps one copy of them, not one per adapter as PEFT's wrapper does, so they
    load only into a model that holds no other named adapter.

    ``model`` may be wrapped in DistributedDataParallel or torch.compile (the unwrapped model is
    loaded; load on every rank), or sharded by FSDP2 (fully_shard) when its LoRA layers already
    hold the adapter (inject_lora or load_adapter before fully_shard): each rank takes its shard
    (``distribute_tensor``, a collective: every rank must call it). FSDP1 models are refused: load
    before wrapping.

    The directory is untrusted input: tensors are read as data only (safetensors, or
    adapter_model.bin with torch.load(weights_only=True)); every config field fastpeft uses is
    checked for its type and range (TypeError / ValueError naming the field and the file);
    regexes are matched with their work bounded (``fastpeft.modules.regex_match``); every
    tensor's name, shape and dtype (floating point) is checked. All of it happens before the
    model is touched: a failed load leaves the model as it was. The values of the weights are
    not checked (NaN weights load).

    A PEFT prompt-tuning adapter (peft_type "PROMPT_TUNING", one prompt: no encoder-decoder)
    goes into the model's prompt tuning, or sets it up first (``add_prompt_tuning`` with the
    config's num_virtual_tokens and task_type; the model is frozen, the prompt trains).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter expects an nn.Module, got {type(model).__name__}")
    wrapped, model = model, unwrap_model(model)
    fsdp = fsdp1_class()
    if fsdp is not None and fsdp.fsdp_modules(wrapped):
        raise NotImplementedError("load_adapter into an FSDP1 (FullyShardedDataParallel) model is not supported: "
                                  "load into the model before wrapping it, on every rank")
    raw, state, config_path, weights_path = _read(os.fspath(directory))
    if raw.get("peft_type") == "PROMPT_TUNING":
        if adapter_name is not None:
            raise ValueError("load_adapter: adapter_name is for LoRA adapters; a model has one prompt")
        _load_prompt(model, raw, state, config_path, weights_path)
        return wrapped
    config = check_config(raw, config_path)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    lora = lora_modules(model)
    target = adapter_name if adapter_name is not None else _active_name(model) if lora else DEFAULT_ADAPTER
    existing = {n: m for n, m in lora.items() if m.has_adapter(target)}
    if not existing and is_sharded(model):
        raise NotImplementedError(f"load_adapter: no LoRA layer of this FSDP2 (fully_shard) model holds adapter "
                                  f"{target!r}, and layers made now would not be sharded: load the adapter (or "
                                  f"inject_lora) before fully_shard")
    names = list(existing) if existing else _planned_names(model, config, config_path)
    ranks = _ranks(config, names)
    use_rslora = bool(config.get("use_rslora", False))
    found, other = _parse_keys(state, weights_path)
    extras, heads, missing_extra, unexpected_extra = _extra_tensors(model, config, names, other, state, weights_path)
    expected = {(n, w) for n in names for w in "AB"}
    missing = sorted([f"{PREFIX}{n}.lora_{w}.weight" for n, w in expected - found.keys()] + missing_extra)
    unexpected = sorted(unexpected_extra + [found[s][0] for s in found.keys() - expected])
    if missing or unexpected:
        heads_missing = f" (the modules_to_save {config['modules_to_save']} are saved whole)" if missing_extra else ""
        raise ValueError(f"load_adapter: the adapter in {os.fspath(directory)!r} does not fit the model: "
                         f"missing keys {missing[:20]}, unexpected keys {unexpected[:20]}{heads_missing}")
    others = [a for a in lora_adapters(model) if a != target]
    if extras and others:
        raise NotImplementedError(f"load_adapter: {config_path}: the adapter holds biases or modules_to_save "
                                  f"(bias={config['bias']!r}, modules_to_save={config['modules_to_save']}) but the "
                                  f"model holds other adapters {others}: fastpeft keeps one copy of the base "
                                  f"model's biases and heads, which they share")
    for n, m in existing.items():
        r, alpha = ranks[n]
        have = m.adapter_spec(target)
        if m.merged and m.active_adapter == target:
            raise ValueError(f"load_adapter: module {n!r} is merged with adapter {target!r}: loading new weights "
                             f"would leave the old ones in its weight; call unmerge() first")
        # r first: a rank no layer can have never reaches the scaling's arithmetic
        if have.r != r or not math.isclose(have.scaling, lora_scaling(r, alpha, use_rslora), rel_tol=1e-6):
            raise ValueError(f"load_adapter: {config_path}: module {n!r} has r={have.r}, lora_alpha={have.lora_alpha:g}, "
                             f"use_rslora={have.use_rslora} (scaling {have.scaling:g}) for adapter {target!r} "
                             f"but the adapter config gives r={r}, lora_alpha={alpha:g}, use_rslora={use_rslora}")
    for (n, w), (key, tensor) in found.items():
        base, r = model.get_submodule(n), ranks[n][0]
        _weight_dtype(key, tensor, weights_path)
        want = (r, base.in_features) if w == "A" else (base.out_features, r)
        if tuple(tensor.shape) != want:
            raise ValueError(f"load_adapter: {weights_path}: {key!r} has shape {tuple(tensor.shape)} but the model's "
                             f"{n}.lora_{w} has shape {want}")
    # every check is done: from here on the model changes
    dropout = config["lora_dropout"]
    if not lora:
        replace_with_lora(model, ranks, dropout, use_rslora)
        if target != DEFAULT_ADAPTER:
            for n in names:
                model.get_submodule(n).rename_adapter(DEFAULT_ADAPTER, target)
        mark_only_lora_as_trainable(model, config["bias"])
        for h in heads:
            model.get_submodule(h).requires_grad_(True)
    elif not existing:
        add_adapter_to(model, ranks, target, dropout, use_rslora)
    modules = lora_modules(model)
    with torch.no_grad():
        for (n, w), (_, tensor) in found.items():
            _assign(modules[n].adapter_weights(target)["AB".index(w)], tensor)
        for tensor, value in extras:
            _assign(tensor, value)
    return wrapped
