"""inject_lora, mark_only_lora_as_trainable, lora_state_dict on a tiny random Llama; LoRALinear
against PEFT's lora.Linear."""
import copy
import re

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import LoRALinear, inject_lora, lora_state_dict, mark_only_lora_as_trainable

transformers = pytest.importorskip("transformers")
from _hf import tiny_llama, torch_backend, train  # noqa: E402,F401  (torch_backend: autouse fixture)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def tokens(seed=1, shape=(2, 12)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def lora_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def layer_names(*leaves, layers=(0, 1)):
    out = set()
    for i in layers:
        for leaf in leaves:
            part = "self_attn" if leaf in ATTN else "mlp"
            out.add(f"model.layers.{i}.{part}.{leaf}")
    return out


# ---------------------------------------------------------------------------------------------
# which modules get LoRA


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], layer_names("q_proj", "v_proj")),
    (("self_attn.o_proj",), layer_names("o_proj")),
    (["model.layers.1.mlp.up_proj"], {"model.layers.1.mlp.up_proj"}),
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj", layer_names("gate_proj", "up_proj")),
    (r".*\.1\.self_attn\.[qk]_proj", layer_names("q_proj", "k_proj", layers=(1,))),
    ("all-linear", layer_names(*ATTN, *MLP)),
    ("ALL-LINEAR", layer_names(*ATTN, *MLP)),
])
def test_inject_selects(model, targets, expected):
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
    out = inject_lora(model, targets, r=4, lora_alpha=8)
    assert out is model
    assert lora_names(model) == expected
    assert not isinstance(model.lm_head, LoRALinear)
    m = model.get_submodule(sorted(expected)[0])
    assert (m.r, m.lora_alpha, m.scaling) == (4, 8.0, 2.0)
    with torch.no_grad():  # B = 0: the model computes what it did before
        torch.testing.assert_close(model(x).logits, before, rtol=1e-6, atol=1e-6)


def test_list_entries_match_whole_name_parts():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    model.add_module("xq_proj", nn.Linear(4, 4))
    inject_lora(model, ["q_proj"], r=2)
    assert lora_names(model) == {"q_proj"}


def test_regex_is_a_full_match(model):
    with pytest.raises(ValueError, match=r"matches no module \(a string is a regex .* pass a list: \['q_proj'\]\)"):
        inject_lora(model, "q_proj")  # a regex string must match the whole qualified name; the error says so
    with pytest.raises(ValueError, match=r"matches no module; "):  # no hint when a list would not match either
        inject_lora(model, "qq_proj")


def test_inject_options_and_rslora(model):
    inject_lora(model, ["v_proj"], r=16, lora_alpha=32, lora_dropout=0.1, use_rslora=True)
    m = model.model.layers[0].self_attn.v_proj
    assert (m.r, m.lora_alpha, m.lora_dropout, m.use_rslora) == (16, 32.0, 0.1, True)
    assert m.scaling == pytest.approx(32 / 4)
    assert m.lora_A.shape == (16, 64) and m.lora_B.shape == (32, 16)


def test_errors(model):
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp.*LlamaMLP"):
        inject_lora(model, ["mlp"])
    with pytest.raises(ValueError, match=r"matches no module.*q_proj"):
        inject_lora(model, ["qq_proj"])
    with pytest.raises(ValueError, match="not a valid regex"):
        inject_lora(model, "(")
    with pytest.raises(TypeError, match="target_modules"):
        inject_lora(model, 3)
    with pytest.raises(ValueError, match="target_modules"):
        inject_lora(model, [])
    with pytest.raises(ValueError, match="r must be > 0"):
        inject_lora(model, ["q_proj"], r=0)
    with pytest.raises(TypeError, match="r must be an int"):
        inject_lora(model, ["q_proj"], r=2.5)
    with pytest.raises(ValueError, match="lora_dropout"):
        inject_lora(model, ["q_proj"], lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_alpha"):
        inject_lora(model, ["q_proj"], lora_alpha=float("nan"))
    assert not lora_names(model)  # nothing was replaced by the failed calls
    inject_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*already"):
        inject_lora(model, ["q_proj"])
    with pytest.raises(TypeError, match="nn.Module"):
        inject_lora("model", ["q_proj"])


def test_weight_is_shared_not_copied(model):
    old = model.model.layers[1].self_attn.q_proj
    w_ptr, b_ptr = old.weight.data_ptr(), old.bias.data_ptr()
    inject_lora(model, ["q_proj"])
    new = model.model.layers[1].self_attn.q_proj
    assert isinstance(new, LoRALinear) and new is not old
    assert new.weight is old.weight and new.bias is old.bias
    assert new.weight.data_ptr() == w_ptr and new.bias.data_ptr() == b_ptr


# ---------------------------------------------------------------------------------------------
# what trains


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_sets(model):
    inject_lora(model, ["q_proj", "v_proj"])
    lora = {f"{n}.lora_{w}" for n in layer_names("q_proj", "v_proj") for w in "AB"}
    assert trainable(model) == lora
    mark_only_lora_as_trainable(model, "all")
    assert trainable(model) == lora | {f"{n}.bias" for n in layer_names(*ATTN)}
    mark_only_lora_as_trainable(model, "lora_only")
    assert trainable(model) == lora | {f"{n}.bias" for n in layer_names("q_proj", "v_proj")}
    mark_only_lora_as_trainable(model)
    assert trainable(model) == lora
    with pytest.raises(ValueError, match="bias must be one of"):
        mark_only_lora_as_trainable(model, "some")


def test_lora_state_dict(model):
    inject_lora(model, ["q_proj", "v_proj"])
    full = model.state_dict()
    lora = {f"{n}.lora_{w}" for n in layer_names("q_proj", "v_proj") for w in "AB"}
    sd = lora_state_dict(model)
    assert set(sd) == lora
    assert all(torch.equal(sd[k], full[k]) for k in sd)
    assert set(lora_state_dict(model, "all")) == lora | {f"{n}.bias" for n in layer_names(*ATTN)}
    lora_biases = {f"{n}.bias" for n in layer_names("q_proj", "v_proj")}
    assert set(lora_state_dict(model, "lora_only")) == lora | lora_biases
    with pytest.raises(ValueError, match="bias must be one of"):
        lora_state_dict(model, None)
    assert lora_state_dict(nn.Linear(2, 2)) == {}


def test_training_changes_only_lora(model):
    inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(model, tokens(3), steps=4)[0]
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".lora_" in n), n


def test_training_lora_only_biases(model):
    inject_lora(model, ["q_proj"], r=4)
    mark_only_lora_as_trainable(model, "lora_only")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tokens(3), steps=2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.{k}" for n in layer_names("q_proj") for k in ("lora_A", "lora_B", "bias")}


def test_exports():
    for name in ("inject_lora", "mark_only_lora_as_trainable", "lora_state_dict",
                 "save_adapter", "load_adapter"):
        assert name in fastpeft.__all__ and callable(getattr(fastpeft, name))


# ---------------------------------------------------------------------------------------------
# one layer against PEFT's


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("use_rslora, bias", [(False, True), (True, False)])
def test_layer_parity_with_peft(use_rslora, bias, backend):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    in_f, out_f, r, alpha = 24, 40, 4, 8
    linear = nn.Linear(in_f, out_f, bias=bias)
    ours = LoRALinear.from_linear(copy.deepcopy(linear), r=r, lora_alpha=alpha, use_rslora=use_rslora)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=use_rslora,
                          init_lora_weights=False)
    theirs = peft.tuners.lora.Linear(copy.deepcopy(linear), "default", config=cfg, r=r, lora_alpha=alpha,
                                     lora_dropout=0.0, use_rslora=use_rslora, init_lora_weights=False)
    with torch.no_grad():
        ours.lora_A.normal_()
        ours.lora_B.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    assert theirs.scaling["default"] == pytest.approx(ours.scaling)
    x = torch.randn(3, 5, in_f)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(3, 5, out_f)
    with fastpeft.use_backend(backend):  # "auto": the Triton interpreter when conftest set it
        y1 = ours(x1)
        y1.backward(g)
    y2 = theirs(x2)
    y2.backward(g)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-5)
    assert ours.weight.grad is None
    assert re.search(r"r=4", repr(ours))
