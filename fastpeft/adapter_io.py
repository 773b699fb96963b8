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
from torch import nn

from . import _checks
from .lora import (BASE_TYPES, active_adapters, adaptable_names, add_adapter_to, lora_adapters, lora_modules,
                   mark_only_lora_as_trainable, replace_with_lora)
from .modules import ALL_LINEAR, name_matches, output_layer_name
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
UNSUPPORTED_FIELDS = ("use_dora", "fan_in_fan_out", "modules_to_save", "layer_replication", "lora_bias",
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
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
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
    (target_modules as a list or regex, exclude_modules, layers_to_transform / layers_pattern)."""
    targets = config["target_modules"]
    if _excluded(config, name) or not name_matches(name, targets):
        return False
    return isinstance(targets, str) or _layer_index_ok(config, name)


def pattern_value(pattern: dict | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key K with
    re.match(rf"(.*\\.)?({K})$", name), else ``default``."""
    for key, value in (pattern or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise ValueError(f"rank_pattern/alpha_pattern key {key!r} is not a valid regex: {e}") from None
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


def _target_modules(model: nn.Module, names: list[str]):
    """The shortest target_modules under which PEFT selects exactly ``names``: their leaf
    names, else their qualified paths, else a regex of the escaped paths."""
    wanted = set(names)
    everything = [n for n, _ in model.named_modules() if n]
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
    adapter ``adapter_name`` (None: the active one) in each LoRALinear holding it."""
    modules = lora_modules(model)
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


def adapter_config(model: nn.Module, task_type: str | None = None, adapter_name: str | None = None) -> dict:
    """The adapter_config.json contents that describe adapter ``adapter_name`` (None: the active
    one) of the LoRALinear modules of ``model``."""
    modules = adapter_views(model, adapter_name)
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
    r = Counter(m.r for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in modules.values()).most_common(1)[0][0]
    model_cls = type(model)
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
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
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


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, task_type: str | None = None,
                 adapter_name: str | None = None) -> None:
    """Write the LoRALinear modules of ``model`` to ``directory`` as a PEFT LoRA adapter, or,
    for a model with prompt tuning, its soft prompt as a PEFT prompt-tuning adapter.

    With several named adapters one is written: ``adapter_name``, by default the active one
    (an error when layers disagree on it), from the layers that hold it; keys carry no
    adapter name, as in the directories PEFT's save_pretrained writes per adapter.

    Every LoRALinear must share lora_dropout and use_rslora (PEFT keeps one of each); r and
    lora_alpha may differ per module (rank_pattern / alpha_pattern). Tensors keep their dtype.
    A prompt is saved as "prompt_embeddings" [num_virtual_tokens, token_dim] with the task_type
    given to add_prompt_tuning (``task_type`` here, if given, must agree).
    """
    prompt = get_prompt_tuning(model)
    if prompt is not None and lora_modules(model):
        raise ValueError("the model has both LoRALinear modules and prompt tuning; a PEFT adapter "
                         "directory holds one method")
    if prompt is not None and adapter_name is not None:
        raise ValueError("save_adapter: adapter_name is for LoRA adapters; the model's prompt tuning has none")
    config = adapter_config(model, task_type, adapter_name) if prompt is None else \
        prompt_adapter_config(model, task_type)
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_adapter: {directory!r} exists and is not a directory")
    tensors = {}
    if prompt is not None:
        tensors[PROMPT_KEY] = prompt.weight.detach().to("cpu").contiguous()
        for name in modules_to_save_names(model, prompt.modules_to_save):
            for key, value in model.get_submodule(name).state_dict().items():
                tensors[f"{PROMPT_PREFIX}{name}.{key}"] = value.detach().to("cpu").contiguous()
    for name, m in (adapter_views(model, adapter_name) if prompt is None else {}).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().to("cpu").contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().to("cpu").contiguous()
    os.makedirs(directory, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# load


def _read(directory: str) -> tuple[dict, dict]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_adapter: adapter directory {directory!r} does not exist"
                                if not os.path.exists(directory) else
                                f"load_adapter: {directory!r} is not a directory")
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_adapter: {config_path!r} not found")
    with open(config_path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {config_path!r} does not hold a JSON object")
    weights = os.path.join(directory, WEIGHTS_NAME)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(weights):
        state = _safetensors().load_file(weights, device="cpu")
    elif os.path.isfile(legacy):
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"load_adapter: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} "
                                f"found in {directory!r}")
    return config, state


def check_config(config: dict) -> None:
    """Raise for a config that is not plain LoRA on linear layers (naming the field)."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft_type must be 'LORA' or 'PROMPT_TUNING', got {config.get('peft_type')!r}")
    for field in UNSUPPORTED_FIELDS:
        if config.get(field):
            raise NotImplementedError(f"adapter config field {field}={config[field]!r} is not "
                                      f"supported by fastpeft (plain LoRA only)")
    if config.get("bias", "none") != "none":
        raise NotImplementedError(f"adapter config field bias={config['bias']!r} is not supported "
                                  f"(only 'none')")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise NotImplementedError(f"adapter config field init_lora_weights={init!r} is not supported: "
                                  f"it changes the base weights or the layer (supported: {PLAIN_INITS})")
    if config.get("target_modules") is None:
        raise ValueError("adapter config has target_modules=null; fastpeft needs the modules named")


def _ranks(config: dict, names: list[str]) -> dict[str, tuple[int, float]]:
    """module name -> (r, lora_alpha) under the config's r / lora_alpha and patterns."""
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    out = {}
    for n in names:
        r_n = pattern_value(config.get("rank_pattern"), n, r)
        alpha_n = pattern_value(config.get("alpha_pattern"), n, alpha)
        out[n] = (_checks.positive_int(f"r of {n!r}", r_n),
                  _checks.finite_float(f"lora_alpha of {n!r}", alpha_n))
    return out


def _planned_names(model: nn.Module, config: dict) -> list[str]:
    """The modules PEFT would adapt in ``model`` under ``config`` (a LoRALinear counts as the
    linear it wraps; the modules inside it are not candidates)."""
    targets = config["target_modules"]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            raise NotImplementedError("target_modules='all-linear' on a model with transformers "
                                      "Conv1D layers: fastpeft adapts nn.Linear and Int8Linear only")
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
                raise NotImplementedError(f"target_modules={targets!r} selects {n!r} of type "
                                          f"{type(module).__name__}: fastpeft adapts nn.Linear and Int8Linear only")
    if not names:
        raise ValueError(f"adapter config target_modules={targets!r} selects no module of this model")
    return names


def _parse_keys(state: dict) -> tuple[dict, list[str]]:
    """(module name, "A"|"B") -> (file key, tensor); and the keys that are not LoRA weights."""
    found, other, adapters = {}, [], set()
    for key, tensor in state.items():
        match = _KEY.fullmatch(key.removeprefix(PREFIX))
        if not match:
            other.append(key)
            continue
        slot = (match["module"], match["which"])
        if slot in found:
            raise ValueError(f"load_adapter: keys {found[slot][0]!r} and {key!r} hold the same weight")
        found[slot] = (key, tensor)
        adapters.add(match["adapter"])
    if len(adapters) > 1:
        raise ValueError(f"load_adapter: the file holds several adapters {sorted(map(str, adapters))}")
    return found, other


def _load_prompt(model: nn.Module, directory: str, config: dict, state: dict) -> nn.Module:
    subs = config.get("num_transformer_submodules")
    if subs not in (None, 1):
        raise NotImplementedError(f"adapter config num_transformer_submodules={subs!r}: fastpeft's prompt "
                                  f"tuning has one prompt (no encoder-decoder models)")
    task = config.get("task_type")
    if task is not None and task not in PROMPT_TASK_TYPES:
        raise NotImplementedError(f"adapter config task_type={task!r} is not supported for prompt tuning "
                                  f"(supported: {PROMPT_TASK_TYPES})")
    T = _checks.positive_int("adapter config num_virtual_tokens", config.get("num_virtual_tokens"))
    if PROMPT_KEY not in state:
        raise ValueError(f"load_adapter: the prompt-tuning adapter in {directory!r} has no {PROMPT_KEY!r} "
                         f"(keys: {sorted(state)})")
    tensor = state[PROMPT_KEY]
    existing = get_prompt_tuning(model)
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    # PEFT adds its task heads to modules_to_save when it loads an adapter.
    spec = list(dict.fromkeys(list(saved) + list(DEFAULT_MODULES_TO_SAVE.get(task, ()))))
    heads = _head_tensors(model, directory, spec + list(existing.modules_to_save if existing else ()),
                          {k: v for k, v in state.items() if k != PROMPT_KEY})
    dim = existing.embedding_dim if existing is not None else input_embeddings(model).weight.shape[1]
    if tuple(tensor.shape) != (T, dim) or not tensor.is_floating_point():
        raise ValueError(f"load_adapter: {PROMPT_KEY!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype} "
                         f"but num_virtual_tokens={T} and the model's embedding dim {dim} need a float ({T}, {dim})")
    token_dim = config.get("token_dim")
    if token_dim is not None and token_dim != dim:
        raise ValueError(f"load_adapter: adapter config token_dim={token_dim} but the model's embeddings "
                         f"have dim {dim}")
    if existing is not None and existing.num_virtual_tokens != T:
        raise ValueError(f"load_adapter: the model's prompt has {existing.num_virtual_tokens} virtual tokens but "
                         f"the adapter has num_virtual_tokens={T}")
    if existing is not None and task is not None and task != existing.task_type:
        raise ValueError(f"load_adapter: the model's prompt tuning is for task_type={existing.task_type!r} but "
                         f"the adapter's is {task!r}")
    if existing is None:
        add_prompt_tuning(model, T, init=tensor.to(torch.float32), task_type=task,
                          modules_to_save=spec if saved else None)
        if config.get("prompt_tuning_init") in PROMPT_INITS:
            get_prompt_tuning(model).peft_init = config["prompt_tuning_init"]
    else:
        with torch.no_grad():
            existing.weight.copy_(tensor)
    with torch.no_grad():
        for target, value in heads:
            target.copy_(value)
    return model


def _head_tensors(model: nn.Module, directory: str, spec: list[str], state: dict) -> list:
    """(model tensor, file tensor) for the modules_to_save keys "base_model.<module>.<name>" of a
    prompt-tuning adapter; raises for a key that names no tensor of a module ``spec`` selects."""
    names = sorted(modules_to_save_names(model, spec), key=len, reverse=True)
    pairs, unexpected = [], []
    for key, value in sorted(state.items()):
        path = key.removeprefix(PROMPT_PREFIX)
        name = next((n for n in names if path.startswith(n + ".")), None) if key.startswith(PROMPT_PREFIX) else None
        target = model.get_submodule(name).state_dict(keep_vars=True).get(path[len(name) + 1:]) if name else None
        if target is None:
            unexpected.append(key)
        elif tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"load_adapter: {key!r} has shape {tuple(value.shape)} but the model's {path} has "
                             f"shape {tuple(target.shape)}")
        else:
            pairs.append((target, value))
    if unexpected:
        raise ValueError(f"load_adapter: the prompt-tuning adapter in {directory!r} has keys that name no tensor "
                         f"of its modules_to_save {spec}: {unexpected}")
    return pairs


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load the PEFT LoRA adapter in ``directory`` into ``model``; return ``model``.

    ``adapter_name``: the named adapter to load into. None means the active adapter ("default"
    for a model without LoRA). A model without LoRALinear modules gets them as below, holding
    this adapter (active, trainable). In a model that has LoRA, an adapter name no layer holds
    is added next to the others (inactive, frozen) in the modules its config selects, with its
    own r / lora_alpha / target modules: LoRALinear modules get it via add_adapter, nn.Linear /
    Int8Linear ones become LoRALinear holding only it; a name layers already hold is loaded
    into those layers, which must match the adapter's modules and scalings.

    A model without LoRALinear modules first gets them where the config's target_modules
    (list, regex, "all-linear"; exclude_modules, layers_to_transform) select them, with
    r / lora_alpha from rank_pattern / alpha_pattern, lora_dropout and use_rslora, and only
    LoRA trains. A model that has them must match the adapter's modules and scalings. The
    weights are copied into lora_A / lora_B, keeping their dtype and device; keys may carry
    an adapter name ("...lora_A.default.weight"). Nothing is changed when a check fails
    (missing or unexpected keys, a wrong shape or scaling).

    A PEFT prompt-tuning adapter (peft_type "PROMPT_TUNING", one prompt: no encoder-decoder)
    goes into the model's prompt tuning, or sets it up first (``add_prompt_tuning`` with the
    config's num_virtual_tokens and task_type; the model is frozen, the prompt trains).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter expects an nn.Module, got {type(model).__name__}")
    config, state = _read(os.fspath(directory))
    if config.get("peft_type") == "PROMPT_TUNING":
        if adapter_name is not None:
            raise ValueError("load_adapter: adapter_name is for LoRA adapters; a model has one prompt")
        return _load_prompt(model, os.fspath(directory), config, state)
    check_config(config)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    lora = lora_modules(model)
    target = adapter_name if adapter_name is not None else _active_name(model) if lora else DEFAULT_ADAPTER
    existing = {n: m for n, m in lora.items() if m.has_adapter(target)}
    names = list(existing) if existing else _planned_names(model, config)
    ranks = _ranks(config, names)
    use_rslora = bool(config.get("use_rslora", False))
    found, other = _parse_keys(state)
    expected = {(n, w) for n in names for w in "AB"}
    missing = sorted(f"{PREFIX}{n}.lora_{w}.weight" for n, w in expected - found.keys())
    unexpected = sorted(other + [found[s][0] for s in found.keys() - expected])
    if missing or unexpected:
        raise ValueError(f"load_adapter: the adapter in {os.fspath(directory)!r} does not fit the model: "
                         f"missing keys {missing}, unexpected keys {unexpected}")
    for n, m in existing.items():
        r, alpha = ranks[n]
        want = lora_scaling(r, alpha, use_rslora)
        have = m.adapter_spec(target)
        if have.r != r or not math.isclose(have.scaling, want, rel_tol=1e-6):
            raise ValueError(f"load_adapter: module {n!r} has r={have.r}, lora_alpha={have.lora_alpha:g}, "
                             f"use_rslora={have.use_rslora} (scaling {have.scaling:g}) for adapter {target!r} "
                             f"but the adapter config gives r={r}, lora_alpha={alpha:g}, "
                             f"use_rslora={use_rslora} (scaling {want:g})")
    for (n, w), (key, tensor) in found.items():
        base, r = model.get_submodule(n), ranks[n][0]
        want = (r, base.in_features) if w == "A" else (base.out_features, r)
        if tuple(tensor.shape) != want:
            raise ValueError(f"load_adapter: {key!r} has shape {tuple(tensor.shape)} but the model's "
                             f"{n}.lora_{w} has shape {want}")
    dropout = config.get("lora_dropout", 0.0)
    if not lora:
        replace_with_lora(model, ranks, dropout, use_rslora)
        if target != DEFAULT_ADAPTER:
            for n in names:
                model.get_submodule(n).rename_adapter(DEFAULT_ADAPTER, target)
        mark_only_lora_as_trainable(model, "none")
    elif not existing:
        add_adapter_to(model, ranks, target, dropout, use_rslora)
    modules = lora_modules(model)
    with torch.no_grad():
        for (n, w), (_, tensor) in found.items():
            modules[n].adapter_weights(target)["AB".index(w)].copy_(tensor)
    return model
