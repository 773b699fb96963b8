"""Nothing trained is dropped: biases (PEFT's bias "lora_only" / "all") and trained modules
(PEFT's modules_to_save: classifier heads) go into the adapter files and come back, in fastpeft and
in PEFT; PEFT's SEQ_CLS adapters load here; what cannot be saved is refused by name, and a load
writes only what its config names."""
import json
import os

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import inject_lora, load_adapter, mark_only_lora_as_trainable, save_adapter
from _hf import base, fresh, tiny_llama, torch_backend  # noqa: F401  (fixtures; torch_backend: autouse)
from _utils import rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 2])
NUM_LABELS = 3
STEPS = 3
PEFT_TOL = 1e-5  # PEFT computes the LoRA path in another order: fp32's tolerance


def train(model, steps=STEPS, labels=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(X, labels=X if labels is None else labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(X).logits


def files(d):
    with open(os.path.join(d, "adapter_config.json")) as f:
        config = json.load(f)
    return config, safetensors_torch.load_file(os.path.join(d, "adapter_model.safetensors"))


def tiny_classifier(head_seed: int | None = None) -> nn.Module:
    """tiny_llama's config as a sequence classifier (head "score", 3 labels; pad id for pooling),
    the same weights each time, but for the head when ``head_seed`` is given (a new random head)."""
    cfg = tiny_llama().config
    cfg.num_labels, cfg.pad_token_id = NUM_LABELS, 0
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(cfg).float().eval()
    if head_seed is not None:
        with torch.no_grad():
            model.score.weight.normal_(generator=torch.Generator().manual_seed(head_seed))
    return model


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# biases: the README's sequence


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_round_trip(fresh, tmp_path, bias):
    model = inject_lora(fresh(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    mark_only_lora_as_trainable(model, bias=bias)
    q = model.model.layers[0].self_attn.q_proj
    untrained = q.bias.detach().clone()
    trained = logits(train(model))
    save_adapter(model, tmp_path)
    config, tensors = files(tmp_path)
    assert config["bias"] == bias
    saved = tensors["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"]  # PEFT's name
    assert torch.equal(saved, q.bias) and not torch.equal(saved, untrained)
    assert ("base_model.model.model.layers.0.self_attn.k_proj.bias" in tensors) == (bias == "all")

    loaded = load_adapter(fresh(), tmp_path)
    assert torch.equal(logits(loaded), trained)
    assert trainable(loaded) == trainable(model)
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path)
    assert rel_err(logits(theirs), trained) <= PEFT_TOL


def test_peft_bias_adapter_loads_here(fresh, tmp_path):
    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], bias="all",
                                                          init_lora_weights=False))
    train(theirs)
    theirs.save_pretrained(tmp_path)
    assert rel_err(logits(load_adapter(fresh(), tmp_path)), logits(theirs)) <= PEFT_TOL


def test_explicit_bias_cannot_drop_trained_ones(fresh, tmp_path):
    model = inject_lora(fresh(), ["q_proj"], r=2)
    mark_only_lora_as_trainable(model, bias="all")
    with pytest.raises(ValueError, match=r"bias='lora_only' would drop trained biases \[.*k_proj\.bias"):
        save_adapter(model, tmp_path, bias="lora_only")
    mark_only_lora_as_trainable(model, bias="none")
    save_adapter(model, tmp_path, bias="all")  # more than what trains: every bias
    assert files(tmp_path)[0]["bias"] == "all" and len(files(tmp_path)[1]) > 2


# ---------------------------------------------------------------------------------------------
# modules_to_save: trained heads


def test_trained_head_round_trip(tmp_path):
    model = inject_lora(tiny_classifier(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    model.score.requires_grad_(True)
    trained = logits(train(model, labels=LABELS))
    save_adapter(model, tmp_path)
    config, tensors = files(tmp_path)
    assert config["modules_to_save"] == ["score"] and config["bias"] == "none"
    assert torch.equal(tensors["base_model.model.score.weight"], model.score.weight)

    loaded = load_adapter(tiny_classifier(head_seed=1), tmp_path)  # another random head: overwritten
    assert torch.equal(logits(loaded), trained)
    assert trainable(loaded) == trainable(model)
    theirs = peft.PeftModel.from_pretrained(tiny_classifier(head_seed=1), tmp_path)
    assert rel_err(logits(theirs), trained) <= PEFT_TOL


def test_peft_seq_cls_adapter_loads_here(tmp_path):
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = train(peft.get_peft_model(tiny_classifier(), config), labels=LABELS)
    theirs.save_pretrained(tmp_path)
    # PEFT's classification heads (>= 0.22 adds DistilBERT's pre_classifier)
    assert files(tmp_path)[0]["modules_to_save"] == list(getattr(peft.peft_model, "CLASSIFIER_MODULE_NAMES",
                                                                 ("classifier", "score")))

    ours = load_adapter(tiny_classifier(head_seed=1), tmp_path)
    assert rel_err(logits(ours), logits(theirs)) <= PEFT_TOL
    assert "score.weight" in trainable(ours)
    again = tmp_path / "again"
    save_adapter(ours, again, task_type="SEQ_CLS")
    back = peft.PeftModel.from_pretrained(tiny_classifier(head_seed=2), again)
    assert rel_err(logits(back), logits(theirs)) <= PEFT_TOL


class Classifier(nn.Module):
    """A head with a bias (PEFT's bias "all" then also writes its in-memory names), and a norm whose
    leaf name ends another module's ("norm" ends "pre_norm": PEFT's suffix rule needs the path)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.q = nn.Linear(8, 8)
        self.pre_norm = nn.LayerNorm(8)
        self.body = nn.Module()
        self.body.norm = nn.LayerNorm(8)
        self.body.proj = nn.Linear(8, 8)
        self.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(self.body.proj(self.body.norm(self.q(self.pre_norm(x)))))


def test_peft_bias_all_head_with_bias_loads_here(tmp_path):
    cfg = peft.LoraConfig(r=2, target_modules=["q"], bias="all", modules_to_save=["classifier"],
                          init_lora_weights=False)
    theirs = peft.get_peft_model(Classifier(), cfg)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    keys = set(files(tmp_path)[1])
    assert "base_model.model.classifier.0.bias" in keys and "base_model.model.classifier.original_module.0.bias" in keys
    x = torch.randn(5, 8)
    ours = load_adapter(Classifier(), tmp_path)
    assert rel_err(ours(x), theirs(x)) <= PEFT_TOL


def test_whole_trained_module_and_ambiguous_leaf(tmp_path):
    model = inject_lora(Classifier(), ["q"], r=2)
    model.classifier.requires_grad_(True)
    model.body.norm.requires_grad_(True)
    with torch.no_grad():
        for p in [*model.classifier.parameters(), *model.body.norm.parameters(), model.q.lora_B]:
            p.add_(torch.randn_like(p) * 0.1)
    save_adapter(model, tmp_path)
    config, tensors = files(tmp_path)
    assert config["modules_to_save"] == ["body.norm", "classifier"]  # "norm" would select pre_norm in PEFT
    assert "base_model.model.classifier.2.bias" in tensors and config["bias"] == "none"
    x = torch.randn(5, 8)
    assert torch.equal(load_adapter(Classifier(), tmp_path)(x), model(x))
    theirs = peft.PeftModel.from_pretrained(Classifier(), tmp_path)
    assert rel_err(theirs(x), model(x)) <= PEFT_TOL


# ---------------------------------------------------------------------------------------------
# what cannot be saved, what may not be loaded


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.q(x) * self.scale


def test_unrepresentable_parameters_are_named(fresh, tmp_path):
    model = inject_lora(fresh(), ["q_proj"], r=2)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)  # a LoRA layer's base weight
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*requires_grad_\(False\)"):
        save_adapter(model, tmp_path)
    model = inject_lora(Scaled(), ["q"], r=2)
    model.scale.requires_grad_(True)  # on the root: no module to name in modules_to_save
    with pytest.raises(ValueError, match=r"\['scale'\]"):
        save_adapter(model, tmp_path)
    assert not os.path.exists(tmp_path / "adapter_config.json")


def test_modules_to_save_writes_only_what_it_names(tmp_path):
    model = inject_lora(tiny_classifier(), ["q_proj", "v_proj"], r=4)
    model.score.requires_grad_(True)
    save_adapter(model, tmp_path)
    config, tensors = files(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")

    def edited(**changes):
        with open(os.path.join(tmp_path, "adapter_config.json"), "w") as f:
            json.dump({**config, **changes}, f)

    target = tiny_classifier(head_seed=1)
    state = {k: v.clone() for k, v in target.state_dict().items()}
    # "j" is no module's whole name: PEFT's raw suffix test would select every *_proj
    edited(modules_to_save=["j"])
    safetensors_torch.save_file({**tensors, "base_model.model.model.layers.0.self_attn.k_proj.weight":
                                 torch.zeros(32, 64)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \[.*k_proj\.weight.*score\.weight"):
        load_adapter(target, tmp_path)
    edited(modules_to_save=["score"], bias="lora_only")  # a bias of a module LoRA does not adapt
    safetensors_torch.save_file({**tensors, "base_model.model.model.layers.0.self_attn.k_proj.bias":
                                 torch.zeros(32)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.bias"):
        load_adapter(target, tmp_path)
    edited(modules_to_save=["score", "norm"])  # named, not in the file
    safetensors_torch.save_file(tensors, path)
    with pytest.raises(ValueError, match=r"missing keys \['base_model\.model\.model\.norm\.weight'\]"):
        load_adapter(target, tmp_path)
    edited(modules_to_save=["layers"])  # holds the LoRA layers
    with pytest.raises(ValueError, match="hold LoRA layers"):
        load_adapter(target, tmp_path)
    safetensors_torch.save_file({**tensors, "base_model.model.score.weight": torch.zeros(NUM_LABELS, 64,
                                                                                        dtype=torch.int32)}, path)
    edited()
    with pytest.raises(TypeError, match="score.weight.*int32"):
        load_adapter(target, tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())  # nothing was written
    assert not fastpeft.lora.lora_modules(target)


def test_heads_with_other_adapters_are_refused(tmp_path):
    model = inject_lora(tiny_classifier(), ["q_proj"], r=4)
    model.score.requires_grad_(True)
    save_adapter(model, tmp_path)
    other = fastpeft.add_adapter(inject_lora(tiny_classifier(), ["v_proj"], r=2), "x", target_modules=["q_proj"])
    head = other.score.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="other adapters"):
        load_adapter(other, tmp_path, adapter_name="y")
    assert torch.equal(other.score.weight, head) and "y" not in fastpeft.lora.lora_adapters(other)


def test_config_bias_is_checked(fresh, tmp_path):
    model = inject_lora(fresh(), ["q_proj"], r=2)
    save_adapter(model, tmp_path)
    config = files(tmp_path)[0]
    with open(os.path.join(tmp_path, "adapter_config.json"), "w") as f:
        json.dump({**config, "bias": "some"}, f)
    with pytest.raises(ValueError, match="field 'bias' must be one of"):
        load_adapter(fresh(), tmp_path)
