"""torch.autocast(bfloat16) on the CPU: a tiny Llama with fastpeft's LoRA (on a float, a W4 QuantLinear
or an int8 base) trains a step under autocast and matches PEFT's LoRA model on the same weights
under the same autocast.

Both models round every autocast op to bfloat16, in different places (fastpeft's LoRA is one op,
PEFT's three), so they are compared with each other and with the float32 run of PEFT's model:
fastpeft must be as close to float32 as PEFT is. Measured here: logits about 1% from float32 for
both, LoRA gradients 2-3%.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastpeft

from _hf import torch_backend, transformers  # noqa: F401  (torch_backend: autouse fixture)
from _utils import rel_err as rel

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


def models(setup: str):
    """(fastpeft model, PEFT model): the same weights (PEFT's base holds the dequantized weights of
    fastpeft's quantized layers), LoRA with the same random A and B."""
    base = tiny_llama()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    targets = TARGETS
    if setup == "w4":  # the MLP in W4 (g16), LoRA on the attention projections
        fastpeft.quantize_model(ours, weights="int4", group_size=16, skip=("lm_head", *TARGETS))
    elif setup.startswith("int8"):  # every linear in int8, LoRA on q and v
        fastpeft.quantize_int8(ours, threshold=float(setup[len("int8_t"):]), skip=("lm_head",))
        targets = ["q_proj", "v_proj"]
    for name, mod in ours.named_modules():
        if isinstance(mod, (fastpeft.QuantLinear, fastpeft.Int8Linear)):
            with torch.no_grad():
                theirs.get_submodule(name).weight.copy_(mod.dequantized_weight())
    fastpeft.inject_lora(ours, targets, r=4, lora_alpha=8)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    for name, mod in ours.named_modules():
        if isinstance(mod, fastpeft.LoRALinear):
            other = theirs.base_model.model.get_submodule(name)
            with torch.no_grad():
                mod.lora_A.copy_(torch.randn(mod.lora_A.shape, generator=g) * 0.2)
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.2)
                other.lora_A["default"].weight.copy_(mod.lora_A)
                other.lora_B["default"].weight.copy_(mod.lora_B)
    return ours.train(), theirs.train()


def train_step(model, autocast: bool):
    """(logits, LoRA gradients in name order, logits after one SGD step)."""
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    params = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda t: t[0])
    opt = torch.optim.SGD([p for _, p in params], lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = [p.grad.clone() for _, p in params]
    assert all(p.grad.dtype == torch.float32 for _, p in params)  # the adapters stay float32
    opt.step()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        after = model(input_ids=ids, use_cache=False).logits
    return out.logits.detach(), grads, after


@pytest.mark.parametrize("setup", ["lora", "w4", "int8_t0", "int8_t1", "int8_t6"])
def test_autocast_training_step_matches_peft(setup):
    ours, theirs = models(setup)
    fp32 = copy.deepcopy(theirs)
    o_logits, o_grads, o_after = train_step(ours, autocast=True)
    t_logits, t_grads, t_after = train_step(theirs, autocast=True)
    f_logits, f_grads, f_after = train_step(fp32, autocast=False)
    assert o_logits.dtype == t_logits.dtype == torch.bfloat16
    assert len(o_grads) == len(t_grads) > 0
    # with each other: two bfloat16 roundings apart
    assert rel(o_logits, t_logits) <= 2e-2
    assert rel(o_after, t_after) <= 2e-2
    assert max(rel(a, b) for a, b in zip(o_grads, t_grads)) <= 6e-2
    # against float32: as close as PEFT is (with room for bfloat16 rounding noise)
    assert rel(o_logits, f_logits) <= 1.5 * rel(t_logits, f_logits) + 5e-3
    assert rel(o_after, f_after) <= 1.5 * rel(t_after, f_after) + 5e-3
    o_err = max(rel(a, b) for a, b in zip(o_grads, f_grads))
    t_err = max(rel(a, b) for a, b in zip(t_grads, f_grads))
    assert o_err <= 1.5 * t_err + 1e-2, (o_err, t_err)
