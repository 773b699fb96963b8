"""fastpeft.to_half: a model in bf16/fp16 with its normalizations kept in float32."""
import copy
import pickle

import pytest
import torch
from torch import nn

import fastpeft

pytest.importorskip("transformers")
from _hf import tiny_llama, torch_backend  # noqa: E402,F401  (torch_backend: autouse fixture)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_to_half_keeps_norms_in_fp32_and_stays_close(dtype):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    half = fastpeft.to_half(copy.deepcopy(model), dtype=dtype)
    for name, p in half.named_parameters():
        expected = torch.float32 if "norm" in name else dtype
        assert p.dtype == expected, name
    out = half(ids).logits
    assert out.dtype == dtype
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(1), ref.flatten(1)).min()
    assert cos > 0.99


def test_to_half_on_plain_modules_and_errors():
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    fastpeft.to_half(m)
    assert m[0].weight.dtype == torch.bfloat16 and m[1].weight.dtype == torch.float32
    y = m(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        fastpeft.to_half(m, dtype=torch.float64)
    with pytest.raises(TypeError, match="nn.Module"):
        fastpeft.to_half("model")


def _our_hooks(model):
    """(module name, forward pre-hooks, forward hooks) of every module with any."""
    return [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks]


def _half_llama():
    model = fastpeft.to_half(tiny_llama(), dtype=torch.float16)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_to_half_model_pickles_and_saves_whole(tmp_path):
    model, ids = _half_llama()
    with torch.no_grad():
        ref = model(ids).logits
    copies = [pickle.loads(pickle.dumps(model))]
    torch.save(model, tmp_path / "model.pt")
    copies.append(torch.load(tmp_path / "model.pt", weights_only=False))
    for copy_ in copies:
        assert _our_hooks(copy_) == _our_hooks(model)
        with torch.no_grad():
            out = copy_(ids).logits
        assert out.dtype == torch.float16 and torch.equal(out, ref)
        assert all(p.dtype == (torch.float32 if "norm" in n else torch.float16) for n, p in copy_.named_parameters())


def test_to_half_twice_replaces_its_hooks():
    model, ids = _half_llama()
    with torch.no_grad():
        ref = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _our_hooks(model)
    assert hooks and all(pre == 1 and post == 1 for _, pre, post in hooks)
    fastpeft.to_half(model, dtype=torch.float16)
    assert _our_hooks(model) == hooks  # one pre-hook and one hook per kept module, not two
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())  # fp32 norms not rounded
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    # another dtype replaces the hooks too: the outputs come back in it
    fastpeft.to_half(model, dtype=torch.bfloat16)
    assert _our_hooks(model) == hooks
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
    # a user's own hook is left alone
    handle = model.model.norm.register_forward_hook(lambda m, a, o: None)
    fastpeft.to_half(model, dtype=torch.bfloat16)
    assert len(model.model.norm._forward_hooks) == 2
    handle.remove()
