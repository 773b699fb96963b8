"""Several named LoRA adapters: LoRALinear.add/delete/set_adapter, the model-level helpers,
load/save of named adapters, and mixed batches (fastpeft.adapter_batch) against per-sample
runs, PEFT's adapter_names= batches and generate()."""
import math

import pytest
import torch
from torch import nn

import fastpeft
import fastpeft.nn.lora as lora_mod
from fastpeft import LoRALinear, adapter_batch, add_adapter, delete_adapter, load_adapter, save_adapter, set_adapter
from fastpeft.lora import lora_adapters, lora_state_dict, mark_only_lora_as_trainable

from _utils import assert_close, rel_err

transformers = pytest.importorskip("transformers")
from _hf import base, fresh, torch_backend  # noqa: E402,F401  (fixtures; torch_backend: autouse)

V = 128


def randomize(model_or_layer, seed=0):
    """Random A and B (|delta| comparable to the base) in every adapter of every LoRALinear."""
    g = torch.Generator().manual_seed(seed)
    layers = [model_or_layer] if isinstance(model_or_layer, LoRALinear) else \
        [m for m in model_or_layer.modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        for m in layers:
            for name in m.adapter_names:
                A, B = m.adapter_weights(name)
                A.copy_(torch.randn(A.shape, generator=g) / m.in_features ** 0.5)
                B.copy_(torch.randn(B.shape, generator=g) / A.shape[0] ** 0.5)


# ---------------------------------------------------------------------------------------------
# one layer


def layer_with_adapters(seed=0):
    torch.manual_seed(seed)
    m = LoRALinear(24, 20, r=4, lora_alpha=8)
    m.add_adapter("one", r=1, lora_alpha=2)
    m.add_adapter("big", r=16, lora_alpha=4, use_rslora=True)
    randomize(m, seed)
    return m


def reference_rows(m, x, names):
    """Each sample b through the layer with adapter names[b] active (or none)."""
    active = m.active_adapter
    out = []
    for b, name in enumerate(names):
        m.set_adapter(None if name == "__base__" else name)
        out.append(m(x[b:b + 1]))
    m.set_adapter(active)
    return torch.cat(out)


def test_add_adapter_keeps_default_and_state_dict_layout():
    m = LoRALinear(12, 8, r=4, lora_alpha=8)
    A, B = m.lora_A, m.lora_B
    x = torch.randn(3, 12)
    y0 = m(x)
    m.add_adapter("x", r=2, lora_alpha=6)
    assert m.lora_A is A and m.lora_B is B and (m.r, m.scaling) == (4, 2.0)
    assert m.adapter_names == ("default", "x") and m.active_adapter == "default"
    assert torch.equal(m(x), y0)
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_A_adapters.x", "lora_B_adapters.x",
                                   "_extra_state"}  # (the merged flag)
    assert m.lora_A_adapters["x"].shape == (2, 12) and m.lora_B_adapters["x"].shape == (8, 2)
    assert torch.count_nonzero(m.lora_B_adapters["x"]) == 0
    assert not m.lora_A_adapters["x"].requires_grad and A.requires_grad
    assert m.adapter_spec("x").scaling == 3.0
    assert "adapters=['default', 'x']" in repr(m)


def test_set_adapter_swaps_parameters_and_config():
    m = layer_with_adapters()
    A0, Aone, Bone = m.lora_A, m.lora_A_adapters["one"], m.lora_B_adapters["one"]
    x = torch.randn(5, 24)
    m.set_adapter("one")
    assert m.active_adapter == "one" and m.lora_A is Aone and m.lora_B is Bone
    assert m.lora_A_adapters["default"] is A0
    assert (m.r, m.lora_alpha, m.scaling) == (1, 2.0, 2.0)
    assert Aone.requires_grad and not A0.requires_grad  # only the active adapter trains
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "_extra_state", "lora_A_adapters.default",
                                   "lora_B_adapters.default", "lora_A_adapters.big", "lora_B_adapters.big"}
    expected = torch.nn.functional.linear(x, m.weight, m.bias) + 2.0 * (x @ Aone.detach().t()) @ Bone.detach().t()
    assert_close("set_adapter", m(x), expected.double(), torch.float32)
    m.set_adapter("big")
    assert m.scaling == pytest.approx(4 / math.sqrt(16)) and m.use_rslora
    m.set_adapter(None)  # no adapter: the base layer
    assert m.lora_A is None and m.r is None
    assert torch.equal(m(x), torch.nn.functional.linear(x, m.weight, m.bias))
    assert "no active adapter" in repr(m)
    m.set_adapter("default")
    assert m.lora_A is A0 and A0.requires_grad  # nothing was active before: it trains
    with pytest.raises(ValueError, match=r"no adapter 'nope'.*\['default', 'one', 'big'\]"):
        m.set_adapter("nope")


def test_state_dict_round_trip_with_adapters():
    m = layer_with_adapters()
    m.set_adapter("big")
    other = LoRALinear(24, 20, r=4, lora_alpha=8)
    other.add_adapter("one", r=1, lora_alpha=2)
    other.add_adapter("big", r=16, lora_alpha=4, use_rslora=True)
    other.set_adapter("big")
    other.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 24)
    for name in ("big", "default", "one"):
        m.set_adapter(name)
        other.set_adapter(name)
        assert torch.equal(m(x), other(x))


def test_merge_uses_the_active_adapter_only():
    m = layer_with_adapters(1)
    m.set_adapter("one")
    w0 = m.weight.detach().clone()
    x = torch.randn(4, 24)
    y = m(x)
    m.merge()
    assert torch.equal(m.weight, (w0 + m.scaling * m.lora_B.detach() @ m.lora_A.detach()))
    assert_close("merged", m(x), y.double(), torch.float32)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        m.set_adapter("default")
    m.add_adapter("late", r=2)  # adding / deleting inactive adapters is fine while merged
    m.delete_adapter("late")
    m.unmerge()
    assert torch.equal(m.weight, w0)
    m.set_adapter(None)
    with pytest.raises(ValueError, match="no adapter is active"):
        m.merge()
    assert torch.equal(m.to_linear().weight, w0)


def test_layer_add_delete_errors():
    m = layer_with_adapters()
    with pytest.raises(ValueError, match="already has an adapter 'one'"):
        m.add_adapter("one", r=2)
    for bad in ("", "a.b", "__base__"):
        with pytest.raises(ValueError, match="adapter name"):
            m.add_adapter(bad)
    with pytest.raises(TypeError, match="adapter name"):
        m.add_adapter(3)
    with pytest.raises(ValueError, match="r must be > 0"):
        m.add_adapter("z", r=0)
    with pytest.raises(ValueError, match=r"'default' is the active adapter.*set_adapter"):
        m.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        m.delete_adapter("nope")
    m.delete_adapter("one")
    assert m.adapter_names == ("default", "big") and "lora_A_adapters.one" not in m.state_dict()


def test_adapter_stacks_padded_and_cached():
    m = layer_with_adapters()
    A, B, ranks, scalings = m.adapter_stacks(torch.float32, torch.device("cpu"))
    assert A.shape == (3, 16, 24) and B.shape == (3, 20, 16)
    assert ranks.dtype == torch.int32 and ranks.tolist() == [4, 1, 16]
    assert scalings.dtype == torch.float32
    assert scalings.tolist() == pytest.approx([2.0, 2.0, 1.0])
    assert torch.equal(A[1, :1], m.lora_A_adapters["one"]) and torch.count_nonzero(A[1, 1:]) == 0
    assert torch.equal(B[0, :, :4], m.lora_B) and torch.count_nonzero(B[0, :, 4:]) == 0
    assert m.adapter_stacks(torch.float32, torch.device("cpu"))[0] is A  # cached
    with torch.no_grad():
        m.lora_B_adapters["big"].add_(1.0)  # an in-place change rebuilds the stack
    A2, B2, _, _ = m.adapter_stacks(torch.float32, torch.device("cpu"))
    assert A2 is not A and torch.equal(B2[2], m.lora_B_adapters["big"])
    m.set_adapter("one")  # slots keep the order the adapters were added in
    assert m.adapter_stacks(torch.float32, torch.device("cpu"))[2].tolist() == [4, 1, 16]


class Stack(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("backend", ["torch", "auto"])  # "auto": the Triton interpreter on CPU
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8-base"])
def test_layer_mixed_batch_equals_per_sample(int8, backend):
    m = layer_with_adapters(2)
    if int8:
        base = fastpeft.Int8Linear.from_linear(nn.Linear(24, 20), threshold=6.0)
        layer = LoRALinear.from_linear(base, r=4, lora_alpha=8)
        layer.add_adapter("one", r=1, lora_alpha=2)
        layer.add_adapter("big", r=16, lora_alpha=4, use_rslora=True)
        randomize(layer, 2)
        m = layer
    model = Stack(m).eval()
    names = ["big", "__base__", "default", "one", "big", "one"]
    x = torch.randn(6, 5, 24)
    expected = reference_rows(m, x, names)
    with torch.no_grad(), fastpeft.use_backend(backend), adapter_batch(model, names):
        y = model(x)
    assert_close("mixed", y, expected.double(), torch.float32)
    assert m.routing is None  # the block cleaned up


# ---------------------------------------------------------------------------------------------
# a tiny Llama with three adapters: ranks 1, 3, 16 on different modules


ADAPTERS = {  # name -> (r, lora_alpha, target modules)
    "x": (1, 2, ["q_proj", "v_proj"]),
    "y": (3, 6, ["k_proj", "o_proj", "down_proj"]),
    "z": (16, 8, ["q_proj", "gate_proj", "up_proj"]),
}
NAMES = ["x", "__base__", "z", "y", "x"]


def tokens(batch=len(NAMES), seq=7, seed=1):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def three_adapters(model):
    """Adapter "x" created by inject_lora (the first adapter: renamed from "default"), "y" and
    "z" by add_adapter on their own targets; random weights; "x" active."""
    r, alpha, targets = ADAPTERS["x"]
    fastpeft.inject_lora(model, targets, r=r, lora_alpha=alpha)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.rename_adapter("default", "x")
    for name in ("y", "z"):
        r, alpha, targets = ADAPTERS[name]
        add_adapter(model, name, r=r, lora_alpha=alpha, target_modules=targets)
    randomize(model, 7)
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_model_helpers_and_layout(fresh):
    model = three_adapters(fresh())
    assert lora_adapters(model) == ["x", "z", "y"]  # first seen in module order
    q = model.model.layers[0].self_attn.q_proj
    k = model.model.layers[0].self_attn.k_proj
    assert q.adapter_names == ("x", "z") and q.active_adapter == "x"
    assert k.adapter_names == ("y",) and k.active_adapter is None  # wrapped by add_adapter
    assert set(k.state_dict()) == {"weight", "bias", "lora_A_adapters.y", "lora_B_adapters.y", "_extra_state"}
    sd = lora_state_dict(model)
    assert "model.layers.0.self_attn.q_proj.lora_A" in sd and "model.layers.0.self_attn.q_proj.lora_A_adapters.z" in sd
    assert "model.layers.1.mlp.down_proj.lora_B_adapters.y" in sd
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{p}.lora_{w}" for i in (0, 1) for p in ("q_proj", "v_proj")
                         for w in "AB"}

    set_adapter(model, "y")
    assert q.active_adapter is None and k.active_adapter == "y" and k.lora_A.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.{p}.lora_{w}" for i in (0, 1) for p in ("self_attn.k_proj", "self_attn.o_proj",
                                                                     "mlp.down_proj") for w in "AB"}
    mark_only_lora_as_trainable(model)  # the active adapter's lora_A / lora_B only
    assert len([p for p in model.parameters() if p.requires_grad]) == 12

    with pytest.raises(ValueError, match=r"'y' is the active adapter.*set_adapter"):
        delete_adapter(model, "y")
    with pytest.raises(ValueError, match=r"no LoRA adapter 'zz'.*\['x', 'z', 'y'\]"):
        set_adapter(model, "zz")
    with pytest.raises(ValueError, match=r"already exists"):
        add_adapter(model, "z", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="selects no linear module"):
        add_adapter(model, "d", target_modules=["nothing"])
    set_adapter(model, None)
    torch.testing.assert_close(logits(model, tokens()), logits(fresh(), tokens()), rtol=0, atol=0)
    delete_adapter(model, "y")
    assert lora_adapters(model) == ["x", "z"] and k.adapter_names == ()
    torch.testing.assert_close(logits(model, tokens()), logits(fresh(), tokens()), rtol=0, atol=0)


def test_set_adapter_then_train_changes_only_that_adapter(fresh):
    model = three_adapters(fresh())
    set_adapter(model, "z")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = tokens(2, 8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("lora_A", "lora_B")) for n in changed)
    assert {n.rsplit(".", 1)[0] for n in changed} == {n for n, m in model.named_modules()
                                                      if isinstance(m, LoRALinear) and m.active_adapter == "z"}


def test_mixed_batch_equals_single_adapter_models(fresh, tmp_path):
    model = three_adapters(fresh())
    for name in ADAPTERS:
        save_adapter(model, tmp_path / name, adapter_name=name)
    x = tokens()
    with torch.no_grad(), adapter_batch(model, NAMES):
        mixed = model(x).logits
    plain = logits(fresh(), x)
    for b, name in enumerate(NAMES):
        if name != "__base__":  # every adapter changes its samples' logits noticeably
            assert rel_err(mixed[b], plain[b]) > 1e-2, name
        alone = fresh() if name == "__base__" else load_adapter(fresh(), tmp_path / name)
        if name != "__base__":
            assert {m.r for m in alone.modules() if isinstance(m, LoRALinear)} == {ADAPTERS[name][0]}
        assert_close(f"sample {b} ({name})", mixed[b], logits(alone, x[b:b + 1])[0].double(), torch.float32)
    assert model.model.layers[0].self_attn.q_proj.active_adapter == "x"  # the block changes no state


def test_one_multi_lora_call_per_layer(fresh, monkeypatch):
    model = three_adapters(fresh())
    calls = []
    real = lora_mod.multi_lora

    def counting(x, lora_A, lora_B, ranks, scalings, indices, out=None, check=True):
        calls.append((tuple(x.shape), tuple(lora_A.shape), indices.dtype, check))
        return real(x, lora_A, lora_B, ranks, scalings, indices, out=out, check=check)

    monkeypatch.setattr(lora_mod, "multi_lora", counting)
    with torch.no_grad(), adapter_batch(model, NAMES) as batch:
        model(tokens())
        # one slot table per distinct set of layer adapters, moved to the device once
        assert len(batch._indices) == len({m.adapter_names for m in model.modules() if isinstance(m, LoRALinear)})
    n_layers = len([m for m in model.modules() if isinstance(m, LoRALinear)])
    assert len(calls) == n_layers
    assert all(c[0] == (len(NAMES) * 7, c[0][1]) and c[2] == torch.int32 and c[3] is False for c in calls)
    assert {c[1][0] for c in calls} == {1, 2}  # q_proj holds x and z; the others one adapter


def test_mixed_batch_equals_peft(fresh, tmp_path):
    peft = pytest.importorskip("peft")
    configs = {name: peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
               for name, (r, alpha, targets) in ADAPTERS.items()}
    theirs = peft.get_peft_model(fresh(), configs["x"], adapter_name="x")
    for name in ("y", "z"):
        theirs.add_adapter(name, configs[name])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, peft.tuners.lora.Linear):
                for name in m.lora_B:
                    w = m.lora_B[name].weight
                    w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
    theirs.save_pretrained(tmp_path)  # one directory per adapter ("x" is not "default")
    theirs.eval()
    x = tokens()
    with torch.no_grad():
        expected = theirs(input_ids=x, adapter_names=NAMES).logits

    ours = fresh()
    for name in ADAPTERS:
        load_adapter(ours, tmp_path / name, adapter_name=name)
    assert sorted(lora_adapters(ours)) == ["x", "y", "z"]
    assert ours.model.layers[1].mlp.up_proj.adapter_names == ("z",)
    with torch.no_grad(), adapter_batch(ours.eval(), NAMES):
        mixed = ours(x).logits
    assert_close("mixed vs PEFT", mixed, expected.double(), torch.float32)
    # and our named save loads in PEFT as that adapter
    set_adapter(ours, "y")
    save_adapter(ours, tmp_path / "ours_z", adapter_name="z")
    back = peft.PeftModel.from_pretrained(fresh(), tmp_path / "ours_z")
    set_adapter(ours, "z")
    assert_close("saved z in PEFT", logits(back, x), logits(ours, x).double(), torch.float32)


def test_load_into_existing_named_adapter_and_mismatch(fresh, tmp_path):
    model = three_adapters(fresh())
    save_adapter(model, tmp_path / "y", adapter_name="y")
    b_before = model.model.layers[0].self_attn.k_proj.lora_B_adapters["y"].detach().clone()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.lora_B_adapters["y"].zero_()
    load_adapter(model, tmp_path / "y", adapter_name="y")  # the layers holding "y" get its weights
    assert torch.equal(model.model.layers[0].self_attn.k_proj.lora_B_adapters["y"], b_before)
    with pytest.raises(ValueError, match="does not fit the model: missing keys"):
        load_adapter(model, tmp_path / "y", adapter_name="z")  # z is on other modules
    cfg_path = tmp_path / "y" / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"lora_alpha": 6', '"lora_alpha": 9'))
    with pytest.raises(ValueError, match=r"lora_alpha=6.*for adapter 'y'.*lora_alpha=9"):
        load_adapter(model, tmp_path / "y", adapter_name="y")
    # a new name whose keys do not fit: nothing is added
    cfg_path.write_text(cfg_path.read_text().replace('"lora_alpha": 9', '"lora_alpha": 6')
                        .replace('"down_proj"', '"down_proj", "gate_proj"'))
    with pytest.raises(ValueError, match=r"missing keys \[.*gate_proj"):
        load_adapter(model, tmp_path / "y", adapter_name="w")
    assert "w" not in lora_adapters(model)
    assert model.model.layers[0].mlp.gate_proj.adapter_names == ("z",)
    set_adapter(model, "y")
    model.model.layers[0].self_attn.q_proj.set_adapter("z")  # layers now disagree on the active one
    with pytest.raises(ValueError, match="active adapters"):
        save_adapter(model, tmp_path / "x")
    with pytest.raises(ValueError, match=r"holds adapter 'zz'.*\['x', 'z', 'y'\]"):
        save_adapter(model, tmp_path / "x", adapter_name="zz")


# ---------------------------------------------------------------------------------------------
# errors


def test_adapter_batch_errors(fresh):
    model = three_adapters(fresh())
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['zz'\].*\['x', 'z', 'y'\].*__base__"):
        with adapter_batch(model, ["x", "zz"]):
            pass
    with pytest.raises(TypeError, match="list of str"):
        adapter_batch(model, "x")
    with pytest.raises(ValueError, match="expand_size must be > 0"):
        adapter_batch(model, ["x"], expand_size=0)
    with torch.no_grad(), adapter_batch(model, ["x", "y"]):
        with pytest.raises(ValueError, match=r"got 2 adapter_names but the input's batch size is 3"):
            model(tokens(3))
        with pytest.raises(ValueError, match=r"batch size is 4.*expand_size=2"):
            model(tokens(4))
        with pytest.raises(RuntimeError, match="already inside"):
            with adapter_batch(model, ["x", "y"]):
                pass
    assert all(m.routing is None for m in model.modules() if isinstance(m, LoRALinear))
    model.train()
    with pytest.raises(RuntimeError, match="inference.*training mode"):
        with adapter_batch(model, ["x"]):
            pass
    model.eval()
    with adapter_batch(model, ["x", "y"]):  # grad enabled in eval: refused where x needs grad
        emb = model.model.embed_tokens(tokens(2)).requires_grad_()
        with pytest.raises(RuntimeError, match="requires grad"):
            model(inputs_embeds=emb)
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        with adapter_batch(model, ["x"]):
            pass


# ---------------------------------------------------------------------------------------------
# generate


def wide(model):
    """Weights x10 so greedy decoding of a random model does not repeat one token."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("bias", "norm.weight")):
                p.mul_(10.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def generate(model, x, **kw):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=5,
                              do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_equals_per_sample(fresh, beams):
    model = three_adapters(wide(fresh()))
    names = ["z", "__base__", "x", "y"]
    x = tokens(len(names), 6, seed=4)
    kw = dict(num_beams=beams, num_return_sequences=beams)
    with adapter_batch(model, names, expand_size=beams):
        mixed = generate(model, x, **kw)
    assert mixed.sequences.shape == (len(names) * beams, 6 + 5)
    set_adapter(model, None)
    plain = generate(model, x, **kw).sequences
    same = [torch.equal(mixed.sequences[b * beams:(b + 1) * beams], plain[b * beams:(b + 1) * beams])
            for b in range(len(names))]
    assert same == [name == "__base__" for name in names]  # each adapter changes what is generated
    for b, name in enumerate(names):
        set_adapter(model, None if name == "__base__" else name)
        alone = generate(model, x[b:b + 1], **kw)
        assert torch.equal(mixed.sequences[b * beams:(b + 1) * beams], alone.sequences), name
        if beams == 1:
            for s_mixed, s_alone in zip(mixed.scores, alone.scores):
                assert_close(f"scores {name}", s_mixed[b], s_alone[0].double(), torch.float32)
    set_adapter(model, "x")
    if beams > 1:  # without expand_size the grown batch is refused with a hint
        with adapter_batch(model, names), pytest.raises(ValueError, match=f"expand_size={beams}"):
            generate(model, x, **kw)
