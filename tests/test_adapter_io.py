"""save_adapter / load_adapter: round trips, and Hugging Face PEFT files both ways."""
import json
import os
import warnings

import pytest
import torch
from torch import nn

from fastpeft import LoRALinear, inject_lora, load_adapter, save_adapter

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
peft = pytest.importorskip("peft")
from _hf import base, fresh, torch_backend  # noqa: E402,F401  (fixtures; torch_backend: autouse)
from _utils import rel_err  # noqa: E402


X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(X).logits



def train(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(X, labels=X).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def read_config(d):
    with open(os.path.join(d, "adapter_config.json")) as f:
        return json.load(f)


def shapes(model):
    return {n: (m.r, tuple(m.lora_A.shape), tuple(m.lora_B.shape), m.scaling)
            for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ---------------------------------------------------------------------------------------------
# our own round trip


def test_round_trip(fresh, tmp_path):
    model = train(inject_lora(fresh(), ["q_proj", "v_proj"], r=4, lora_alpha=8))
    save_adapter(model, tmp_path)
    cfg = read_config(tmp_path)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert (cfg["bias"], cfg["fan_in_fan_out"], cfg["use_rslora"]) == ("none", False, False)
    assert cfg["inference_mode"] is True
    assert cfg["task_type"] is None and cfg["base_model_name_or_path"] is None
    tensors = safetensors_torch.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    assert len(tensors) == 8

    loaded = load_adapter(fresh(), tmp_path)
    assert shapes(loaded) == shapes(model)
    assert torch.equal(logits(loaded), logits(model))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_load_into_injected_model_keeps_dtype(fresh, tmp_path):
    model = train(inject_lora(fresh(), ["k_proj"], r=2, lora_alpha=4))
    save_adapter(model, tmp_path)
    target = inject_lora(fresh().to(torch.bfloat16), ["k_proj"], r=2, lora_alpha=4)
    A = target.model.layers[0].self_attn.k_proj.lora_A
    load_adapter(target, tmp_path)
    assert target.model.layers[0].self_attn.k_proj.lora_A is A and A.dtype == torch.bfloat16
    assert torch.equal(A, model.model.layers[0].self_attn.k_proj.lora_A.detach().bfloat16())


def test_config_details(fresh, tmp_path):
    model = fresh()
    model.config._name_or_path = "org/tiny-llama"
    inject_lora(model, ["model.layers.0.self_attn.q_proj"], r=4, lora_alpha=8, lora_dropout=0.05)
    save_adapter(model, tmp_path, task_type="CAUSAL_LM")
    cfg = read_config(tmp_path)
    # "q_proj" would also select layer 1's q_proj, so the path is written out
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    assert cfg["base_model_name_or_path"] == "org/tiny-llama"
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["lora_dropout"] == 0.05
    loaded = load_adapter(fresh(), tmp_path)
    assert set(shapes(loaded)) == {"model.layers.0.self_attn.q_proj"}
    assert loaded.model.layers[0].self_attn.q_proj.lora_dropout == 0.05
    with pytest.raises(ValueError, match="task_type"):
        save_adapter(model, tmp_path, task_type="causal")


class Nested(nn.Module):
    """A module whose qualified names end in each other: "q" and "sub.q"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.q = nn.Linear(8, 8)
        self.sub = nn.Module()
        self.sub.q = nn.Linear(8, 6)

    def forward(self, x):
        return self.q(x).sum(-1, keepdim=True) + self.sub.q(x)


def test_regex_fallback_and_exact_rank_pattern(tmp_path):
    model = inject_lora(Nested(), "q", r=3)
    save_adapter(model, tmp_path / "a")
    cfg = read_config(tmp_path / "a")
    assert isinstance(cfg["target_modules"], str)  # neither "q" nor ["q"] selects only "q"
    assert set(shapes(load_adapter(Nested(), tmp_path / "a"))) == {"q"}

    model = inject_lora(Nested(), ["sub.q"], r=2, lora_alpha=2)
    inject_lora(model, "q", r=4, lora_alpha=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.uniform_(-1, 1)
    save_adapter(model, tmp_path / "b")
    cfg = read_config(tmp_path / "b")
    assert len(cfg["rank_pattern"]) == 1 and len(cfg["alpha_pattern"]) == 1
    loaded = load_adapter(Nested(), tmp_path / "b")
    assert shapes(loaded) == shapes(model)
    theirs = peft.PeftModel.from_pretrained(Nested(), tmp_path / "b")
    x = torch.randn(5, 8)
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-6)
    assert theirs.base_model.model.q.lora_A["default"].weight.shape == (4, 8)
    assert theirs.base_model.model.sub.q.lora_A["default"].weight.shape == (2, 8)


# ---------------------------------------------------------------------------------------------
# PEFT -> fastpeft


PEFT_CONFIGS = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "rslora": dict(target_modules=["q_proj", "v_proj"], use_rslora=True),
    "patterns": dict(target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"^model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
                     alpha_pattern={"v_proj": 3}),
    "regex": dict(target_modules=r".*\.mlp\.(up|down)_proj"),
    "all-linear": dict(target_modules="all-linear"),
    "exclude+layers": dict(target_modules=["q_proj", "o_proj", "up_proj"], exclude_modules=["o_proj"],
                           layers_to_transform=[1]),
    # regexes whose work fastpeft's quick bound cannot clear for every name (Unsloth writes this form;
    # a regex rank_pattern key): the bound worked out on each real name clears them
    "lazy-regex": dict(target_modules=r"(?:.*?(?:model).*?(?:self_attn|mlp).*?(?:q_proj|v_proj|down_proj).*?)",
                       rank_pattern={r"(?:\w+\.)*layers\.1\.\w+\.(?:q|v)_proj": 2}, alpha_pattern={r".*down_.*": 2}),
    "layers_pattern": dict(target_modules=["q_proj", "down_proj"], layers_pattern="layers", layers_to_transform=0),
}


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_peft_adapter_loads_here(fresh, tmp_path, kind):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **PEFT_CONFIGS[kind])
    theirs = peft.get_peft_model(fresh(), cfg)
    Bs = [m.lora_B["default"].weight for m in theirs.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert Bs and all(B.abs().sum() > 0 for B in Bs)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)

    ours = load_adapter(fresh(), tmp_path)
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.Linear)}
    assert set(shapes(ours)) == peft_names
    for n, m in theirs.named_modules():
        if isinstance(m, peft.tuners.lora.Linear):
            mine = ours.get_submodule(n.removeprefix("base_model.model."))
            assert mine.r == m.r["default"] and mine.scaling == pytest.approx(m.scaling["default"])
    assert "lm_head" not in " ".join(shapes(ours))
    assert rel_err(logits(ours), expected) <= 1e-5


def test_adapter_name_in_keys(fresh, tmp_path):
    cfg = peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(fresh(), cfg)
    theirs.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    tensors = safetensors_torch.load_file(path)
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    safetensors_torch.save_file(renamed, path)
    assert rel_err(logits(load_adapter(fresh(), tmp_path)), logits(theirs)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# fastpeft -> PEFT


def _ranks(model):
    inject_lora(model, ["q_proj", "k_proj"], r=4, lora_alpha=8)
    inject_lora(model, ["v_proj"], r=2, lora_alpha=16)
    inject_lora(model, ["model.layers.1.mlp.up_proj"], r=8, lora_alpha=8)
    return model


OURS = {
    "list": lambda m: inject_lora(m, ["q_proj", "v_proj"], r=4, lora_alpha=8),
    "rslora": lambda m: inject_lora(m, ["q_proj", "o_proj"], r=4, lora_alpha=8, use_rslora=True),
    "ranks": _ranks,
    "regex": lambda m: inject_lora(m, r"model\.layers\.0\.(self_attn\.k|mlp\.gate)_proj", r=4, lora_alpha=4),
    "all-linear": lambda m: inject_lora(m, "all-linear", r=2, lora_alpha=4),
}


@pytest.mark.parametrize("kind", list(OURS))
def test_our_adapter_loads_in_peft(fresh, tmp_path, kind):
    ours = train(OURS[kind](fresh()))
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path)
    signs = ("Unexpected keyword", "did not match", "missing", "Missing")
    bad = [str(w.message) for w in caught if any(s in str(w.message) for s in signs)]
    assert not bad
    for n, m in theirs.named_modules():
        if isinstance(m, peft.tuners.lora.Linear):
            mine = ours.get_submodule(n.removeprefix("base_model.model."))
            assert m.r["default"] == mine.r and m.scaling["default"] == pytest.approx(mine.scaling)
            assert torch.equal(m.lora_B["default"].weight, mine.lora_B)
    assert len([m for m in theirs.modules() if isinstance(m, peft.tuners.lora.Linear)]) == len(shapes(ours))
    assert rel_err(logits(theirs), logits(ours)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def saved(fresh, tmp_path):
    save_adapter(train(inject_lora(fresh(), ["q_proj", "v_proj"], r=4, lora_alpha=8), steps=2), tmp_path)
    return tmp_path


def edit_config(d, **changes):
    cfg = read_config(d)
    cfg.update(changes)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("field, value, exc", [
    ("use_dora", True, NotImplementedError),
    ("fan_in_fan_out", True, NotImplementedError),
    ("bias", "lora", ValueError),
    ("modules_to_save", ["lm_head"], ValueError),  # names the head, whose weight the file lacks
    ("layer_replication", [[0, 2]], NotImplementedError),
    ("lora_bias", True, NotImplementedError),
    ("init_lora_weights", "pissa", NotImplementedError),
    ("peft_type", "IA3", ValueError),
    ("target_modules", None, ValueError),
])
def test_unsupported_config(fresh, saved, field, value, exc):
    edit_config(saved, **{field: value})
    model = fresh()
    with pytest.raises(exc, match=field):
        load_adapter(model, saved)
    assert not shapes(model)


def test_non_linear_target(fresh, saved):
    edit_config(saved, target_modules=["embed_tokens"])
    with pytest.raises(NotImplementedError, match="embed_tokens.*Embedding"):
        load_adapter(fresh(), saved)
    edit_config(saved, target_modules=["nothing_here"])
    with pytest.raises(ValueError, match="selects no module"):
        load_adapter(fresh(), saved)


def test_key_errors(fresh, saved):
    path = os.path.join(saved, "adapter_model.safetensors")
    good = safetensors_torch.load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    safetensors_torch.save_file({**good, key: torch.zeros(5, 64)}, path)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*\(5, 64\).*\(4, 64\)"):
        load_adapter(fresh(), saved)

    safetensors_torch.save_file({k: v for k, v in good.items() if k != key}, path)
    with pytest.raises(ValueError, match=r"missing keys \[.*q_proj\.lora_A\.weight"):
        load_adapter(fresh(), saved)

    extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    safetensors_torch.save_file({**good, extra: torch.zeros(32, 4)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \[.*k_proj\.lora_B\.weight"):
        load_adapter(fresh(), saved)

    model = fresh()
    safetensors_torch.save_file({**good, "base_model.model.lm_head.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['base_model\.model\.lm_head\.weight'\]"):
        load_adapter(model, saved)
    assert not shapes(model)  # a failed load changes nothing


def test_existing_lora_must_match(fresh, saved):
    with pytest.raises(ValueError, match=r"q_proj.*lora_alpha=16.*lora_alpha=8"):
        load_adapter(inject_lora(fresh(), ["q_proj", "v_proj"], r=4, lora_alpha=16), saved)
    with pytest.raises(ValueError, match="r=2"):
        load_adapter(inject_lora(fresh(), ["q_proj", "v_proj"], r=2, lora_alpha=4), saved)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_adapter(inject_lora(fresh(), ["q_proj"], r=4, lora_alpha=8), saved)


def test_missing_files(fresh, saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(fresh(), tmp_path / "nope")
    os.remove(os.path.join(saved, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(fresh(), saved)
    os.remove(os.path.join(saved, "adapter_config.json"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(fresh(), saved)
    with pytest.raises(TypeError, match="nn.Module"):
        load_adapter(None, saved)


def test_save_errors(fresh, tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear"):
        save_adapter(fresh(), tmp_path)
    model = inject_lora(fresh(), ["q_proj"], lora_dropout=0.1)
    inject_lora(model, ["v_proj"], lora_dropout=0.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        save_adapter(model, tmp_path)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError):
        save_adapter(inject_lora(fresh(), ["q_proj"]), afile)
