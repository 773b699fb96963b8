"""Prompt tuning on a whole model (Lester et al., 2021), the way Hugging Face PEFT does it.

``add_prompt_tuning(model, T)`` freezes the model (but for PEFT's task head of a classifier,
its modules_to_save), registers a soft prompt P [T, D] as ``model.prompt_tuning`` (a
:class:`fastpeft.PromptTuning`) and a forward pre-hook, so the model keeps its own ``forward``
and ``generate``. On a call whose key/value cache is empty (or absent),
the hook embeds ``input_ids`` with ``model.get_input_embeddings()`` and passes
``inputs_embeds = [P; embeddings]`` [B, T + n, D] instead, with

- attention_mask [B, n] -> [1]*T + mask,  token_type_ids -> [0]*T + ids,
- labels [B, n] -> [-100]*T + labels for per-token tasks (CAUSAL_LM, TOKEN_CLS, and
  FEATURE_EXTRACTION, e.g. masked LM); SEQ_CLS labels are left as they are; QUESTION_ANS
  start/end positions are shifted by T,
- position_ids p -> [0..T-1] + (p + T), cache_position c -> [0..T-1] + (c + T).

A call with a non-empty cache (decoding after the first step of ``generate``, or the user's own
incremental decoding) finds P already in the cache: the hook only extends the attention mask
[B, cached real tokens + n] by T ones and shifts position_ids / cache_position by T. So greedy
``generate`` gives the tokens that running the full forward again at each step gives.

Outputs cover [P; tokens]: the first T positions of per-token outputs (logits, hidden states) are
the prompt, exactly as in PEFT (for encoders too; a head that pools position 0, like BERT's
sequence classifier, pools the first virtual token, as in PEFT). ``strip_prompt`` drops them.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn

from . import _checks
from .modules import name_matches
from .nn.prompt import PromptTuning

PROMPT_ATTR = "prompt_tuning"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
PER_TOKEN_LABELS = ("CAUSAL_LM", "TOKEN_CLS", "FEATURE_EXTRACTION")
# PEFT's task heads, trained (and saved) next to the prompt: its modules_to_save defaults (PEFT >=
# 0.22 lists DistilBERT's pre_classifier too: a random layer of the new head; older PEFT does not).
_CLASSIFIER_HEADS = ("classifier", "score", "pre_classifier")
DEFAULT_MODULES_TO_SAVE = {"SEQ_CLS": _CLASSIFIER_HEADS, "TOKEN_CLS": _CLASSIFIER_HEADS,
                           "QUESTION_ANS": ("qa_outputs",)}
IGNORE_INDEX = -100
_CACHE_KEYS = ("cache", "past_key_values")  # transformers >= 5 / < 5


def get_prompt_tuning(model: nn.Module) -> PromptTuning | None:
    """The PromptTuning module ``add_prompt_tuning`` put on ``model``, or None."""
    prompt = model._modules.get(PROMPT_ATTR) if isinstance(model, nn.Module) else None
    return prompt if isinstance(prompt, PromptTuning) else None


def input_embeddings(model: nn.Module) -> nn.Module:
    """``model.get_input_embeddings()``, checked to hold a [vocab, dim] weight."""
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(): prompt tuning needs the "
                        f"model's token embedding module")
    try:
        emb = get()
    except NotImplementedError:
        emb = None
    weight = getattr(emb, "weight", None)
    if not isinstance(emb, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() returned {type(emb).__name__}, "
                        f"not an embedding module with a [vocab_size, dim] weight")
    return emb


def _task_type(model: nn.Module, task_type: str | None) -> str:
    config = getattr(model, "config", None)
    if task_type == "SEQ_2_SEQ_LM" or getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError("prompt tuning of encoder-decoder models (SEQ_2_SEQ_LM) is not supported")
    if task_type is not None:
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
        return task_type
    name = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    can_generate = getattr(model, "can_generate", None)
    if (callable(can_generate) and can_generate()) or name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def _token_ids(init: object, vocab_size: int) -> torch.Tensor:
    if isinstance(init, torch.Tensor):
        if init.is_floating_point() or init.is_complex() or init.dtype == torch.bool:
            raise TypeError(f"init token ids must be an integer tensor, got {init.dtype}")
        if init.dim() == 2 and init.shape[0] == 1:  # tokenizer(..., return_tensors="pt")["input_ids"]
            init = init[0]
        if init.dim() != 1:
            raise ValueError(f"init token ids must be 1-D, got shape {tuple(init.shape)}")
        ids = init.detach().to("cpu", torch.long)
    else:
        items = list(init)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise TypeError("init token ids must be ints")
        ids = torch.tensor(items, dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("init token ids are empty")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"init token ids must lie in [0, {vocab_size}) (the model's vocabulary), "
                         f"got values in [{lo}, {hi}]")
    return ids


def _embed(emb: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return emb(ids.to(emb.weight.device)).detach().to(torch.float32).clone()


def _initial_prompt(emb: nn.Module, num_virtual_tokens: int, init: object,
                    generator: torch.Generator | None) -> tuple[str | torch.Tensor, str]:
    """(PromptTuning init, PEFT's prompt_tuning_init name) for add_prompt_tuning's ``init``."""
    vocab_size, dim = emb.weight.shape
    if isinstance(init, str):
        if init == "random":
            return "random", "RANDOM"
        if init == "vocab":
            # PEFT's SAMPLE_VOCAB: nn.Embedding(T, D) draws N(0, 1) first, then the token ids.
            torch.randn(num_virtual_tokens, dim, generator=generator)
            ids = torch.randint(0, vocab_size, (num_virtual_tokens,), generator=generator)
            return _embed(emb, ids), "SAMPLE_VOCAB"
        raise ValueError(f"init must be 'random', 'vocab', token ids or a [num_virtual_tokens, dim] tensor, "
                         f"got {init!r} (for a text, pass its token ids: tokenizer(text)['input_ids'])")
    if isinstance(init, torch.Tensor) and init.is_floating_point():
        return init, "RANDOM"
    if not isinstance(init, (torch.Tensor, Sequence)):
        raise TypeError(f"init must be 'random', 'vocab', token ids or a tensor, got {type(init).__name__}")
    ids = _token_ids(init, vocab_size)
    # PEFT's TEXT init: truncate, or repeat and truncate, to num_virtual_tokens.
    ids = ids.repeat(math.ceil(num_virtual_tokens / ids.numel()))[:num_virtual_tokens]
    return _embed(emb, ids), "RANDOM"


def modules_to_save_names(model: nn.Module, spec: Sequence[str]) -> list[str]:
    """The modules modules_to_save = ``spec`` selects: those whose qualified name equals an entry
    or ends with "." + entry (whole module names, the rule PEFT applies to target_modules lists and
    to keep modules_to_save out of LoRA's targets). PEFT's own ``_set_trainable`` tests a raw
    string suffix (``name.endswith(entry)``), under which "j" selects every q_proj ... down_proj:
    from an untrusted file that would let a one-letter entry overwrite and unfreeze them. The
    entries PEFT writes (its task heads "classifier", "score", "pre_classifier", "qa_outputs", the names users
    give) are whole module names, selected alike under both rules."""
    return [n for n, _ in model.named_modules() if n and name_matches(n, list(spec))]


def _modules_to_save_spec(task: str, modules_to_save: object) -> list[str]:
    if modules_to_save is None:
        return list(DEFAULT_MODULES_TO_SAVE.get(task, ()))
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    if not isinstance(modules_to_save, Sequence) or not all(isinstance(t, str) and t for t in modules_to_save):
        raise TypeError(f"modules_to_save must be None or a list of module names, got {modules_to_save!r}")
    return list(dict.fromkeys(modules_to_save))


def _position_limit(model: nn.Module) -> int | None:
    """Positions a learned absolute position table holds (GPT-2's wpe, BERT's position_embeddings)."""
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, nn.Embedding) and leaf in ("wpe", "position_embeddings"):
            return module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
    return None


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def add_prompt_tuning(model: nn.Module, num_virtual_tokens: int = 20,
                      init: str | Sequence[int] | torch.Tensor = "random", *,
                      task_type: str | None = None, modules_to_save: Sequence[str] | None = None,
                      seed: int | None = None) -> nn.Module:
    """Prompt-tune ``model`` in place: prepend T = num_virtual_tokens trainable embeddings P to
    every input (see the module docstring); freeze every other parameter; return ``model``.

    init: "random" P ~ N(0, 1) (PEFT's RANDOM); "vocab" P = embeddings of T token ids drawn
    uniformly from the vocabulary (PEFT's SAMPLE_VOCAB); token ids (list or integer tensor,
    e.g. a tokenized text: PEFT's TEXT) P = their embeddings, truncated or repeated to T; or a
    floating tensor [T, D]. Random draws use torch.Generator().manual_seed(seed), or the global
    RNG when seed is None, in PEFT's order: the same seed gives PEFT's prompt. P is float32.
    task_type (PEFT's: CAUSAL_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION) decides
    how labels are extended; None infers it from the model class. modules_to_save (whole module
    names: a module whose qualified name equals an entry or ends with "." + entry) stay
    trainable and are saved with the prompt; None gives PEFT's default, the task head
    ["classifier", "score", "pre_classifier"] for SEQ_CLS and TOKEN_CLS (a new head is random), ["qa_outputs"] for
    QUESTION_ANS, none otherwise; pass [] to train the prompt alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_prompt_tuning expects an nn.Module, got {type(model).__name__}")
    num_virtual_tokens = _checks.positive_int("num_virtual_tokens", num_virtual_tokens)
    if get_prompt_tuning(model) is not None:
        raise ValueError(f"{type(model).__name__} already has prompt tuning (model.{PROMPT_ATTR})")
    if hasattr(model, PROMPT_ATTR):
        raise ValueError(f"{type(model).__name__} already has an attribute {PROMPT_ATTR!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be None or an int, got {type(seed).__name__}")
    emb = input_embeddings(model)
    task = _task_type(model, task_type)
    spec = _modules_to_save_spec(task, modules_to_save)
    heads = modules_to_save_names(model, spec)
    if modules_to_save is not None and spec and not heads:
        raise ValueError(f"modules_to_save={spec} selects no module of {type(model).__name__}")
    if not _accepts(model, "inputs_embeds"):
        raise TypeError(f"{type(model).__name__}.forward takes no inputs_embeds: prompt tuning passes the "
                        f"prompt through it")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    weight, peft_init = _initial_prompt(emb, num_virtual_tokens, init, generator)
    prompt = PromptTuning(num_virtual_tokens, emb.weight.shape[1], weight, generator=generator,
                          device=emb.weight.device)
    prompt.task_type = task
    prompt.peft_init = peft_init
    prompt.position_limit = _position_limit(model)
    prompt.modules_to_save = spec
    for p in model.parameters():
        p.requires_grad_(False)
    for name in heads:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, PROMPT_ATTR, prompt)
    model.register_forward_pre_hook(_prepend_prompt, with_kwargs=True)
    return model


# ---------------------------------------------------------------------------------------------
# the forward pre-hook


def _as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return dict(kwargs)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(model).__name__} with prompt tuning: pass inputs by keyword")
        else:
            out[name] = value
    return out


def _cache_length(cache: object) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):  # legacy ((key [B, H, S, Dh], value), ...) per layer
        return int(cache[0][0].shape[-2]) if len(cache) and len(cache[0]) else 0
    raise TypeError(f"prompt tuning cannot read the length of a cache of type {type(cache).__name__}")


def _shift_positions(p: torch.Tensor, num_virtual_tokens: int, prepend: bool) -> torch.Tensor:
    shifted = p + num_virtual_tokens
    if not prepend:
        return shifted
    head = torch.arange(num_virtual_tokens, device=p.device, dtype=p.dtype).expand(*p.shape[:-1], -1)
    return torch.cat((head, shifted), dim=-1)


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int, int], why: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"prompt tuning needs {name} as a [batch, sequence] tensor, got {type(t).__name__} "
                        f"(4-D masks and static caches are not supported)")
    if t.dim() != 2:
        raise ValueError(f"prompt tuning needs {name} as a [batch, sequence] tensor, got shape {tuple(t.shape)} "
                         f"(4-D masks and static caches are not supported)")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {why} gives {shape}")


def _prepend_prompt(model: nn.Module, args: tuple, kwargs: dict):
    prompt = get_prompt_tuning(model)
    if prompt is None:
        return None
    T = prompt.num_virtual_tokens
    kw = _as_kwargs(model, args, kwargs)
    input_ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    if input_ids is not None and embeds is not None:
        raise ValueError("pass input_ids or inputs_embeds, not both (prompt tuning prepends the prompt "
                         "to the embeddings of input_ids)")
    if input_ids is None and embeds is None:
        raise ValueError("pass input_ids or inputs_embeds")
    if embeds is None:
        _checks.tensor("input_ids", input_ids, ndim=2)
        batch, n = input_ids.shape
        what = f"input_ids {tuple(input_ids.shape)}"
    else:
        _checks.tensor("inputs_embeds", embeds, ndim=3)
        batch, n = embeds.shape[:2]
        what = f"inputs_embeds {tuple(embeds.shape)}"
    cache = next((kw[k] for k in _CACHE_KEYS if kw.get(k) is not None), None)
    past = _cache_length(cache)
    prepend = past == 0
    if not prepend and past < T:
        raise ValueError(f"the cache holds {past} positions, fewer than the {T} virtual tokens: it was not "
                         f"filled with the prompt")
    real_past = 0 if prepend else past - T
    if prompt.position_limit is not None and kw.get("position_ids") is None \
            and T + real_past + n > prompt.position_limit:
        raise ValueError(f"{T} virtual tokens + {real_past + n} tokens exceed the model's "
                         f"{prompt.position_limit} positions")

    mask = kw.get("attention_mask")
    if mask is not None:
        _check_2d("attention_mask", mask, (batch, real_past + n),
                  what + (f" after {real_past} cached tokens" if real_past else ""))
        kw["attention_mask"] = torch.cat((mask.new_ones(batch, T), mask), dim=1)
    for key in ("position_ids", "cache_position"):
        if kw.get(key) is not None:
            kw[key] = _shift_positions(kw[key], T, prepend)
    if not prepend:
        return (), kw

    if embeds is None:
        embeds = input_embeddings(model)(input_ids)
    kw["input_ids"] = None
    kw["inputs_embeds"] = prompt(embeds)
    token_types = kw.get("token_type_ids")
    if token_types is not None:
        _check_2d("token_type_ids", token_types, (batch, n), what)
        kw["token_type_ids"] = torch.cat((token_types.new_zeros(batch, T), token_types), dim=1)
    labels = kw.get("labels")
    if labels is not None and prompt.task_type in PER_TOKEN_LABELS:
        _check_2d("labels", labels, (batch, n), what)
        kw["labels"] = torch.cat((labels.new_full((batch, T), IGNORE_INDEX), labels), dim=1)
    if prompt.task_type == "QUESTION_ANS":
        for key in ("start_positions", "end_positions"):
            if kw.get(key) is not None:
                kw[key] = kw[key] + T
    return (), kw


# ---------------------------------------------------------------------------------------------
# outputs


_PER_TOKEN_KEYS = ("last_hidden_state", "start_logits", "end_logits")


def strip_prompt(outputs, num_virtual_tokens: int):
    """A copy of a model output without the first ``num_virtual_tokens`` positions (the prompt)
    in its per-token tensors: last_hidden_state, every hidden_states entry, logits when 3-D
    [B, L, C] (causal LM, token classification, masked LM), start_logits / end_logits.
    Sequence-level outputs (pooler_output, 2-D classification logits, loss) and attentions
    are kept as they are."""
    T = _checks.positive_int("num_virtual_tokens", num_virtual_tokens)

    def cut(name, t):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] < T:
            raise ValueError(f"strip_prompt: {name} of shape {tuple(getattr(t, 'shape', ()))} has no "
                             f"{T} prompt positions in dim 1")
        return t[:, T:]

    items = dict(outputs.items()) if hasattr(outputs, "items") else None
    if items is None:
        raise TypeError(f"strip_prompt expects a model output (a mapping), got {type(outputs).__name__}")
    for key, value in items.items():
        if value is None:
            continue
        if key in _PER_TOKEN_KEYS or (key == "logits" and isinstance(value, torch.Tensor) and value.dim() == 3):
            items[key] = cut(key, value)
        elif key == "hidden_states":
            items[key] = tuple(cut(f"hidden_states[{i}]", h) for i, h in enumerate(value))
    return type(outputs)(**items)
