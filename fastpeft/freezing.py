"""Which parameters train: BitFit (Ben Zaken et al. 2022) trains only the bias terms, ``freeze``
does feature-based transfer (only the last k blocks, and a head of your own on top), and
``trainable_parameters`` counts what trains (as PEFT's print_trainable_parameters)."""
from __future__ import annotations

from torch import nn

from .modules import find_blocks, known_layouts


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
        raise ValueError(f"freeze: {what} in {type(model).__name__}; looked for {known_layouts()}. "
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
    print_trainable_parameters does. An empty model gives (0, 0, 0.0).

    A quantized linear layer (Int8Linear, QuantLinear: int8, int4, NF4 / FP4) counts the
    in x out weights it stands for, as PEFT counts a bitsandbytes 4-bit weight, not its codes
    (buffers, or a frozen Parameter of packed bytes with ``quant_storage``) nor its scales: a
    model has the same total before and after ``quantize_model``."""
    from .nn._common import MergeableQuantized
    if not isinstance(model, nn.Module):
        raise TypeError(f"trainable_parameters expects an nn.Module, got {type(model).__name__}")
    quantized = [m for m in model.modules() if isinstance(m, MergeableQuantized)]
    codes = {id(t) for m in quantized for t in (getattr(m, n, None) for n in m._merge_buffers)
             if isinstance(t, nn.Parameter)}
    params = [p for _, p in _unique_parameters(model) if id(p) not in codes]
    total = sum(p.numel() for p in params) + sum(m.in_features * m.out_features for m in quantized)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    fraction = trainable / total if total else 0.0
    if verbose:
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * fraction:.4f}")
    return trainable, total, fraction
