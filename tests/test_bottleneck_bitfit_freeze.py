"""add_bottleneck_adapters (Houlsby / Pfeiffer), bitfit, freeze and trainable_parameters on tiny random
BERT, GPT-2 and Llama models (no download); the trainable-parameter counts of
the adapter, LoRA and BitFit papers on a BERT-base-shaped model built on the meta device."""
import copy

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import add_bottleneck_adapters, bitfit, freeze, modules, trainable_parameters
from fastpeft.nn import AdaptedProjection

transformers = pytest.importorskip("transformers")
from _hf import tiny_llama, torch_backend, train  # noqa: E402,F401  (torch_backend: autouse fixture)


# ---------------------------------------------------------------------------------------------
# tiny models

HIDDEN, LAYERS, VOCAB = 32, 2, 128


def tiny_bert(seed=0):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=2, intermediate_size=48, max_position_embeddings=32,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(cfg).float().eval()


def tiny_gpt2(seed=0):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).float().eval()


# family -> (builder, block list, attention output projection, FFN output projection, hidden)
ARCHS = {
    "bert": (tiny_bert, "bert.encoder.layer", "attention.output.dense", "output.dense", HIDDEN),
    "gpt2": (tiny_gpt2, "transformer.h", "attn.c_proj", "mlp.c_proj", HIDDEN),
    "llama": (tiny_llama, "model.layers", "self_attn.o_proj", "mlp.down_proj", 64),
}
_BUILT = {}


def build(arch):
    if arch not in _BUILT:
        _BUILT[arch] = ARCHS[arch][0]()
    return copy.deepcopy(_BUILT[arch])


def tokens(seed=1, shape=(2, 10)):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def adapted(model):
    return {n for n, m in model.named_modules() if isinstance(m, AdaptedProjection)}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def norm_params(model):
    return {f"{mn}.{pn}" for mn, m in model.named_modules() if modules.is_norm(m)
            for pn, _ in m.named_parameters(recurse=False)}


# ---------------------------------------------------------------------------------------------
# add_bottleneck_adapters


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("arch", ARCHS)
def test_placement_and_identity(arch, placement):
    _, blocks, attn, ffn, hidden = ARCHS[arch]
    model = build(arch)
    x = tokens()
    before = logits(model, x)
    old = {i: model.get_submodule(f"{blocks}.{i}.{ffn}") for i in range(LAYERS)}
    out = add_bottleneck_adapters(model, placement=placement, bottleneck=8)
    assert out is model
    leaves = (attn, ffn) if placement == "houlsby" else (ffn,)
    expected = {f"{blocks}.{i}.{leaf}" for i in range(LAYERS) for leaf in leaves}
    assert adapted(model) == expected
    assert len(expected) == (2 if placement == "houlsby" else 1) * LAYERS
    for name in expected:
        m = model.get_submodule(name)
        assert isinstance(m.adapter, fastpeft.BottleneckAdapter)
        assert (m.adapter.bottleneck, m.adapter.activation, m.adapter.scaling) == (8, "relu", 1.0)
        assert sum(p.numel() for p in m.adapter.parameters()) == 2 * hidden * 8 + 8 + hidden
    for i in range(LAYERS):  # the projection itself is kept, weights shared, reachable as before
        wrapper = model.get_submodule(f"{blocks}.{i}.{ffn}")
        assert wrapper.base_layer is old[i]
        assert wrapper.weight is old[i].weight and wrapper.bias is old[i].bias
    keys = set(model.state_dict())
    name = f"{blocks}.0.{ffn}"
    base_keys = {f"{name}.base_layer.{k}" for k in old[0].state_dict()}
    assert f"{name}.base_layer.weight" in base_keys and base_keys <= keys and f"{name}.weight" not in keys
    assert {k for k in keys if k.startswith(f"{name}.adapter.")} == {
        f"{name}.adapter.{k}" for k in ("down.weight", "down.bias", "up.weight", "up.bias")}
    torch.testing.assert_close(logits(model, x), before, rtol=1e-6, atol=1e-6)  # identity at init


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_adapters_and_norms(arch):
    model = add_bottleneck_adapters(build(arch), bottleneck=4, activation="gelu")
    train_set = {n for n in trainable(model) if ".adapter." in n}
    assert train_set and trainable(model) == train_set | norm_params(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = train(model, tokens(3), steps=3)[1]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert all(g[n] is None for g in grads), f"frozen {n} got a gradient"
    # up = 0 at init: step 1 reaches every up projection, and the down projections once up moved
    ups = [n for n in train_set if n.endswith("weight") and grads[0][n].abs().sum() > 0]
    assert len(ups) == len(adapted(model)), ups
    assert all(grads[-1][n].abs().sum() > 0 for n in train_set if n.endswith("weight")), "no grad"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable(model)


def test_unknown_architecture_and_targets():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.LayerNorm(5))
    with pytest.raises(ValueError, match=r"no transformer blocks.*o_proj.*targets=\[module names\]"):
        add_bottleneck_adapters(model)
    x = torch.randn(3, 6)
    before = model(x)
    add_bottleneck_adapters(model, targets=["0", "2"], bottleneck=2)
    assert adapted(model) == {"0", "2"}
    assert [sum(p.numel() for p in model[i].adapter.parameters()) for i in (0, 2)] == [2 * 8 * 2 + 2 + 8,
                                                                                      2 * 5 * 2 + 2 + 5]
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert trainable(model) == {n for n in trainable(model) if ".adapter." in n} | {"3.weight", "3.bias"}


@pytest.mark.parametrize("arch, targets, expected, width", [
    ("llama", ["q_proj"], {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}, 64),
    ("llama", ["layers.1.mlp.up_proj"], {"model.layers.1.mlp.up_proj"}, 96),
    ("gpt2", ("c_attn",), {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}, 3 * HIDDEN),
    ("bert", ["0.intermediate.dense"], {"bert.encoder.layer.0.intermediate.dense"}, 48),
])
def test_targets(arch, targets, expected, width):
    model = build(arch)
    x = tokens()
    before = logits(model, x)
    add_bottleneck_adapters(model, targets=targets, bottleneck=3, placement="pfeiffer")
    assert adapted(model) == expected
    m = model.get_submodule(sorted(expected)[0]).adapter
    assert sum(p.numel() for p in m.parameters()) == 2 * width * 3 + 3 + width
    torch.testing.assert_close(logits(model, x), before, rtol=1e-6, atol=1e-6)


def test_errors():
    model = build("llama")
    with pytest.raises(ValueError, match="bottleneck"):
        add_bottleneck_adapters(model, bottleneck=0)
    with pytest.raises(TypeError, match="bottleneck"):
        add_bottleneck_adapters(model, bottleneck=2.5)
    with pytest.raises(ValueError, match="activation"):
        add_bottleneck_adapters(model, activation="softsign-ish")
    with pytest.raises(ValueError, match="placement must be one of"):
        add_bottleneck_adapters(model, placement="lora")
    with pytest.raises(ValueError, match="scaling"):
        add_bottleneck_adapters(model, scaling=float("inf"))
    with pytest.raises(ValueError, match=r"matches no module"):
        add_bottleneck_adapters(model, targets=["qq_proj"])
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp.*LlamaMLP.*output width"):
        add_bottleneck_adapters(model, targets=["mlp"])
    with pytest.raises(TypeError, match="list of module names"):
        add_bottleneck_adapters(model, targets="q_proj")
    with pytest.raises(TypeError, match="list of module names"):
        add_bottleneck_adapters(model, targets=[])
    with pytest.raises(ValueError, match="inside it"):
        add_bottleneck_adapters(model, targets=["layers.0", "layers.0.mlp.up_proj"])
    with pytest.raises(TypeError, match="nn.Module"):
        add_bottleneck_adapters("model")
    assert not adapted(model)  # the failed calls replaced nothing
    add_bottleneck_adapters(model, placement="pfeiffer", bottleneck=2)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*already has an adapter"):
        add_bottleneck_adapters(model, bottleneck=2)
    with pytest.raises(ValueError, match="already has an adapter"):
        add_bottleneck_adapters(model, targets=["down_proj.base_layer"])


def test_state_dict_layout_and_loading():
    plain = build("gpt2")
    model = add_bottleneck_adapters(copy.deepcopy(plain), bottleneck=4)
    with torch.no_grad():  # give the adapters weights that change the output
        for n, p in model.named_parameters():
            if ".adapter." in n:
                p.normal_(0, 0.5)
    x = tokens()
    ref = logits(model, x)
    other = add_bottleneck_adapters(build("gpt2"), bottleneck=4)
    other.load_state_dict(model.state_dict())  # strict: same layout
    torch.testing.assert_close(logits(other, x), ref, rtol=0, atol=0)
    # a state_dict from before the wrapping loads into the projections (adapters missing only)
    fresh = add_bottleneck_adapters(tiny_gpt2(seed=5), bottleneck=4)
    result = fresh.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".adapter." in k for k in result.missing_keys)
    torch.testing.assert_close(logits(fresh, x), logits(plain, x), rtol=1e-6, atol=1e-6)


def test_adapter_follows_projection_dtype():
    model = add_bottleneck_adapters(build("gpt2").to(torch.bfloat16), bottleneck=4, placement="pfeiffer")
    dtypes = {p.dtype for n, p in model.named_parameters() if ".adapter." in n}
    assert dtypes == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# bitfit, freeze, trainable_parameters


@pytest.mark.parametrize("arch", ARCHS)
def test_bitfit(arch):
    model = build(arch)
    biases = {n: p for n, p in model.named_parameters() if n.endswith("bias")}
    assert biases
    count = bitfit(model)
    assert isinstance(count, int) and count == sum(p.numel() for p in biases.values())
    assert trainable(model) == set(biases)
    assert trainable_parameters(model, verbose=False)[0] == count
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tokens(3), steps=1)
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == set(biases)


def test_bitfit_other_bias_names_and_errors():
    mha = nn.MultiheadAttention(8, 2)
    assert bitfit(mha) == 3 * 8 + 8  # in_proj_bias + out_proj.bias
    assert trainable(mha) == {"in_proj_bias", "out_proj.bias"}
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    with pytest.raises(ValueError, match=r"no bias parameters.*Llama.*attention_bias=False"):
        bitfit(transformers.LlamaForCausalLM(cfg))
    with pytest.raises(TypeError, match="nn.Module"):
        bitfit(None)


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_last_blocks(arch):
    _, blocks, *_ = ARCHS[arch]
    model = build(arch)
    for k in range(LAYERS + 1):
        assert freeze(model, unfreeze_last=k) is model
        keep = tuple(f"{blocks}.{i}." for i in range(LAYERS - k, LAYERS))
        assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith(keep) and keep}
    assert not trainable(freeze(model))
    with pytest.raises(ValueError, match=rf"unfreeze_last=3 but '{blocks}' holds 2 blocks"):
        freeze(model, unfreeze_last=LAYERS + 1)
    with pytest.raises(ValueError, match=">= 0"):
        freeze(model, unfreeze_last=-1)
    with pytest.raises(TypeError, match="unfreeze_last must be an int"):
        freeze(model, unfreeze_last=True)


def test_freeze_after_add_adapters_and_blocks_override():
    model = add_bottleneck_adapters(build("llama"), bottleneck=2)
    freeze(model, unfreeze_last=1)  # the block list is still found with adapters in it
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    seq = nn.Sequential(nn.Embedding(10, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"no transformer blocks.*blocks='module\.path'"):
        freeze(seq, unfreeze_last=1)
    freeze(seq, unfreeze_last=2, blocks="1")
    assert trainable(seq) == {"1.1.weight", "1.1.bias", "1.2.weight", "1.2.bias"}
    with pytest.raises(ValueError, match="no such module"):
        freeze(seq, blocks="2")
    with pytest.raises(TypeError, match="Embedding.*nn.ModuleList"):
        freeze(seq, blocks="0")


def test_trainable_parameters(capsys):
    model = build("gpt2")  # lm_head.weight is tied to transformer.wte.weight: counted once
    assert model.lm_head.weight is model.transformer.wte.weight
    all_with_dupes = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    total = all_with_dupes - model.lm_head.weight.numel()
    assert trainable_parameters(model, verbose=False) == (total, total, 1.0)
    assert capsys.readouterr().out == ""
    n = bitfit(model)
    t, tot, frac = trainable_parameters(model)
    assert (t, tot) == (n, total) and frac == pytest.approx(n / total)
    assert capsys.readouterr().out == (f"trainable params: {n:,} || all params: {total:,} || "
                                       f"trainable%: {100 * n / total:.4f}\n")
    assert trainable_parameters(nn.ReLU(), verbose=False) == (0, 0, 0.0)


def test_trainable_parameters_count_quantized_weights_as_weights():
    """A quantized linear counts its in x out weights (as PEFT counts a bitsandbytes 4-bit weight),
    not its codes or scales: the same total before and after quantize_model, whether the codes
    are buffers (int8, int4, nf4) or a frozen Parameter of packed bytes (quant_storage)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16))
    total = trainable_parameters(base, verbose=False)[1]
    variants = [lambda m: fastpeft.quantize_int8(m), lambda m: fastpeft.quantize_model(m, weights="int4", group_size=32),
                lambda m: fastpeft.quantize_model(m, weights="nf4", double_quant=True),
                lambda m: fastpeft.quantize_model(m, weights="nf4", quant_storage=torch.uint8)]
    for quantize in variants:
        model = quantize(copy.deepcopy(base))
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        assert trainable_parameters(model, verbose=False)[1] == total
        fastpeft.inject_lora(model, ["0", "2"], r=2)
        lora = 2 * (64 + 32) + 2 * (32 + 16)  # A [r, in] and B [out, r] of both layers
        assert trainable_parameters(model, verbose=False)[:2] == (lora, total + lora)


def test_exports():
    for name in ("add_bottleneck_adapters", "bitfit", "freeze", "trainable_parameters"):
        assert name in fastpeft.__all__ and callable(getattr(fastpeft, name))


# ---------------------------------------------------------------------------------------------
# trainable-parameter counts (Houlsby et al. 2019, Pfeiffer et al. 2021, Hu et al. 2021, Ben Zaken et al.
# 2022) on a BERT-base-shaped model (meta device: no memory)


def bert_base_meta():
    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072)
    with torch.device("meta"):
        return transformers.BertModel(cfg)


def test_bert_base_parameter_counts():
    base = bert_base_meta()
    total = trainable_parameters(base, verbose=False)[1]
    rows = [("BERT-base (full fine-tuning)", total, total)]

    one = add_bottleneck_adapters(bert_base_meta(), targets=["encoder.layer.0.output.dense"], bottleneck=32)
    adapter = sum(p.numel() for p in one.encoder.layer[0].output.dense.adapter.parameters())
    assert adapter == 2 * 768 * 32 + 32 + 768  # 49,952: "about 50K"
    rows.append(("one adapter, bottleneck 32 (d=768)", adapter, None))
    for placement in ("houlsby", "pfeiffer"):
        m = add_bottleneck_adapters(bert_base_meta(), placement=placement, bottleneck=32)
        per = 2 if placement == "houlsby" else 1
        assert len(adapted(m)) == per * 12
        t = trainable_parameters(m, verbose=False)[0]
        assert t == per * 12 * adapter + sum(p.numel() for n, p in m.named_parameters() if "LayerNorm" in n)
        rows.append((f"{placement.capitalize()} adapters, bottleneck 32 (+ LayerNorms)", t, total))

    attn = ["query", "key", "value", "attention.output.dense"]
    ffn = ["intermediate.dense", "output.dense"]  # "output.dense" also matches attention.output.dense
    lora = fastpeft.inject_lora(bert_base_meta(), attn + ffn, r=4, lora_alpha=8)
    assert sum(isinstance(m, fastpeft.LoRALinear) for m in lora.modules()) == 6 * 12
    lora_total = trainable_parameters(lora, verbose=False)[0]
    per_layer = lora_total // 12
    assert per_layer * 12 == lora_total
    assert per_layer == 4 * (4 * (768 + 768) + 2 * (768 + 3072))  # 55,296: "about 50K per layer"
    assert 45_000 <= per_layer <= 60_000
    lora_attn = trainable_parameters(fastpeft.inject_lora(bert_base_meta(), attn, r=4), verbose=False)[0]
    rows.append(("LoRA r=4, W_q W_k W_v W_o + FFN, per layer", per_layer, None))
    rows.append(("LoRA r=4, W_q W_k W_v W_o + FFN, 12 layers", lora_total, total))
    rows.append(("LoRA r=4, W_q W_k W_v W_o only, per layer", lora_attn // 12, None))

    bias = bitfit(bert_base_meta())
    assert 0.0008 <= bias / total <= 0.0012  # "about 0.1%"
    rows.append(("BitFit (all biases)", bias, total))

    print("\n| method | trainable params | % of BERT-base |\n|---|---:|---:|")
    for label, n, of in rows:
        print(f"| {label} | {n:,} | {'' if of is None else f'{100 * n / of:.3f}%'} |")


def test_base_model_walkers_leave_adapter_linears_alone():
    """inject_lora("all-linear"), quantize_model and prepare_qat act on the base model's linears,
    never on the down / up linears inside the adapters."""
    model = add_bottleneck_adapters(tiny_llama(), "pfeiffer", bottleneck=8)
    n_adapters = len(adapted(model))
    inner = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".adapter." in n}
    assert len(inner) == 2 * n_adapters
    lora = fastpeft.inject_lora(copy.deepcopy(model), "all-linear", r=2)
    assert all(type(lora.get_submodule(n)) is nn.Linear for n in inner)
    assert sum(isinstance(m, fastpeft.LoRALinear) for m in lora.modules()) > 0
    q = fastpeft.quantize_model(copy.deepcopy(model), weights="int8", group_size=None)
    assert all(type(q.get_submodule(n)) is nn.Linear for n in inner)
    assert sum(isinstance(m, fastpeft.QuantLinear) for m in q.modules()) > 0
    qat = fastpeft.prepare_qat(copy.deepcopy(model), bits=8)
    assert all(type(qat.get_submodule(n)) is nn.Linear for n in inner)
