"""Hugging Face transformers integration: Trainer checkpoints that hold the adapter only, and the
base model saved apart from its adapter.

``transformers.Trainer`` decides what a checkpoint holds in three methods: ``_save`` writes the
model (``save_pretrained``: every weight, for a model that is not a PEFT ``PeftModel``),
``_load_from_checkpoint`` reads it back on ``train(resume_from_checkpoint=...)`` and
``_load_best_model`` at the end with ``load_best_model_at_end``. It special-cases only PEFT's
own wrapper (``isinstance(model, PeftModel)``), so a fastpeft model gets full checkpoints.
``AdapterCheckpointMixin`` overrides those three methods, Trainer's documented way to change
what it does ("subclass and override"), so that a checkpoint holds the PEFT adapter files
(``save_adapter``) next to Trainer's optimizer, scheduler, RNG and trainer state, and resuming
loads the adapter (``load_adapter``) before Trainer restores the rest. A callback cannot do
it: ``on_save`` runs after the full model was written, and resuming would still look for the
full weights. ``AdapterTrainer`` is the mixin on ``transformers.Trainer``; put the mixin first
on any other Trainer subclass (``class MyTrainer(AdapterCheckpointMixin, SFTTrainer)``).

Under DeepSpeed or FSDP, Trainer saves and loads through its own engine-specific paths (sharded
or gathered state dicts); there the mixin stays out of the way and checkpoints are Trainer's own
(full), with a warning.

``base_state_dict(model)`` is the model's state dict without what fastpeft added (LoRA
weights, the merge flag, a soft prompt): the keys and values ``save_pretrained`` needs to write
a base model that ``from_pretrained`` loads without "unexpected" keys.

This module imports transformers; ``import fastpeft`` imports it only when one of these names
is first used.
"""
from __future__ import annotations

import logging
import os

import torch
import transformers
from torch import nn

from .adapter_io import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from .lora import lora_modules
from .nn.lora import EXTRA_STATE, QUANTIZED_BASES
from .prompt_tuning import PROMPT_ATTR, get_prompt_tuning

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer._save writes next to the model


def has_adapter_files(directory: str | os.PathLike | None) -> bool:
    """Whether ``directory`` holds a PEFT adapter (its config and its weights)."""
    if directory is None:
        return False
    directory = os.fspath(directory)
    return os.path.isfile(os.path.join(directory, CONFIG_NAME)) and any(
        os.path.isfile(os.path.join(directory, name)) for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME))


def _check_adapter_model(model: nn.Module, who: str) -> None:
    """A model Trainer can checkpoint as an adapter has LoRA layers or a soft prompt."""
    if not lora_modules(model) and get_prompt_tuning(model) is None:
        raise ValueError(f"{who}: model ({type(model).__name__}) has no LoRALinear modules and no prompt tuning, "
                         f"so there is no adapter to checkpoint; call fastpeft.inject_lora / load_adapter / "
                         f"add_prompt_tuning first, or use transformers.Trainer for full checkpoints")


class AdapterCheckpointMixin:
    """Trainer checkpoints of a fastpeft model hold its adapter only.

    Mixed in before a ``transformers.Trainer`` (sub)class, it changes three things:

    - every checkpoint (``checkpoint-<step>/``) and ``trainer.save_model(dir)`` write
      ``adapter_config.json`` + ``adapter_model.safetensors`` (``fastpeft.save_adapter`` of the
      unwrapped model, from the process that saves) instead of the full model; Trainer still
      writes its optimizer, scheduler, RNG and trainer state, the tokenizer (processing class)
      and ``training_args.bin`` as usual;
    - ``trainer.train(resume_from_checkpoint=...)`` (a path, or True for the last checkpoint)
      loads the checkpoint's adapter into the model (``fastpeft.load_adapter``: the model must
      already hold the same LoRA layers, e.g. from the same ``inject_lora`` call), then Trainer
      restores the rest: the run continues as if never stopped;
    - ``load_best_model_at_end`` loads the best checkpoint's adapter.

    A checkpoint folder without adapter files (one a plain Trainer wrote) is left to Trainer.
    Under DeepSpeed or FSDP, Trainer's own saving and loading run unchanged (full checkpoints),
    with a warning at construction. The saved directories load with ``fastpeft.load_adapter`` and
    with ``peft.PeftModel.from_pretrained``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self._adapter_checkpoints():
            logger.warning("%s: DeepSpeed / FSDP is enabled: checkpoints are Trainer's own (the full model), "
                           "not adapter files", type(self).__name__)
        elif self.model is not None:  # (None with model_init: checked when saving)
            _check_adapter_model(self._unwrapped(self.model), type(self).__name__)

    def _adapter_checkpoints(self) -> bool:
        """Whether checkpoints are adapter files: not under DeepSpeed / FSDP, whose engines save
        and load the model themselves."""
        return not (getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False))

    def _unwrapped(self, model: nn.Module) -> nn.Module:
        """``model`` without DDP / torch.compile wrappers (the module whose names the adapter uses)."""
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter (not the model) to ``output_dir``, with the processing class and the
        training arguments as Trainer writes them."""
        if not self._adapter_checkpoints():
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self._unwrapped(self.model)
        _check_adapter_model(model, type(self).__name__)
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving the adapter to %s", output_dir)
        save_adapter(model, output_dir)
        tokenizer = getattr(self.data_collator, "tokenizer", None)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the checkpoint's adapter into the model (Trainer restores optimizer, scheduler and
        RNG after this); a checkpoint without adapter files is left to Trainer."""
        if not (self._adapter_checkpoints() and has_adapter_files(resume_from_checkpoint)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading the adapter from %s", resume_from_checkpoint)
        load_adapter(self._unwrapped(self.model if model is None else model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """With ``load_best_model_at_end``: load the best checkpoint's adapter."""
        best = self.state.best_model_checkpoint
        if not (self._adapter_checkpoints() and has_adapter_files(best)):
            return super()._load_best_model()
        logger.info("Loading the best adapter from %s (score: %s)", best, self.state.best_metric)
        load_adapter(self._unwrapped(self.model), best)


class AdapterTrainer(AdapterCheckpointMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints hold the fastpeft model's adapter only (see
    ``AdapterCheckpointMixin``); it takes Trainer's arguments."""


def base_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` without what fastpeft's LoRA and prompt tuning added: the state of
    the base model, with its keys, for ``model.save_pretrained(dir, state_dict=...)``.

    Dropped: under each LoRALinear its ``lora_*`` tensors (every named adapter) and its merge
    flag; the soft prompt. A merged layer contributes its weight from before the merge (its
    ``state_dict`` holds that one), so the base never carries an update twice. A quantized base
    (``Int8Linear``, ``QuantLinear``: QLoRA's 4-bit one) is refused (``TypeError`` naming the
    module): its codes are no weight ``from_pretrained`` can load into the float model; save the
    float model before quantizing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"base_state_dict expects an nn.Module, got {type(model).__name__}")
    dropped = []
    for name, m in lora_modules(model).items():
        if isinstance(m.base_layer, QUANTIZED_BASES):
            raise TypeError(f"base_state_dict: module {name!r} has an {type(m.base_layer).__name__} base "
                            f"(quantized codes), which from_pretrained cannot load into the float model; save "
                            f"it before quantizing (quantize_int8 / quantize_model)")
        prefix = name + "." if name else ""
        dropped.append((prefix, lambda local: local.startswith("lora_") or local == EXTRA_STATE))
    if get_prompt_tuning(model) is not None:
        dropped.append((PROMPT_ATTR + ".", lambda local: True))
    out = {}
    for key, value in model.state_dict().items():
        if not any(key.startswith(prefix) and drop(key[len(prefix):].split(".")[0]) for prefix, drop in dropped):
            out[key] = value
    return out
