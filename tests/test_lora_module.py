"""fastpeft.LoRALinear: init, from_linear, merge/unmerge, to_linear, dropout, errors."""
import copy
import math

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.reference import lora as ref

from _utils import DEVICE, assert_close


def randomize_adapter(m: fastpeft.LoRALinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # unit-variance outputs: no fp16 overflow in any gradient
        m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / m.in_features ** 0.5)
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) / m.r ** 0.5)


def test_new_layer_is_its_base_linear():
    m = fastpeft.LoRALinear(33, 17, r=4, lora_alpha=8, device=DEVICE)
    assert m.weight.requires_grad is False and m.bias.requires_grad is False
    assert m.lora_A.requires_grad and m.lora_B.requires_grad
    assert m.lora_A.shape == (4, 33) and m.lora_B.shape == (17, 4)
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    bound = 1 / math.sqrt(33)  # kaiming-uniform with a=sqrt(5) on fan_in 33
    assert m.lora_A.abs().max() <= bound + 1e-6
    assert m.scaling == 2.0
    x = torch.randn(5, 33, device=DEVICE)
    assert torch.allclose(m(x), torch.nn.functional.linear(x, m.weight, m.bias), atol=1e-6)


def test_rslora_scaling_and_trainable_parameters():
    m = fastpeft.LoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True)
    assert m.scaling == pytest.approx(8 / 4)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B"}
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "_extra_state"}  # the merged flag


def test_from_linear_shares_the_weight():
    lin = nn.Linear(20, 12, device=DEVICE)
    m = fastpeft.LoRALinear.from_linear(lin, r=4, lora_alpha=4)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert m.weight.data_ptr() == lin.weight.data_ptr()
    assert not lin.weight.requires_grad
    assert m.lora_A.dtype == lin.weight.dtype and m.lora_A.device == lin.weight.device
    with pytest.raises(TypeError, match="nn.Linear"):
        fastpeft.LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_backward_match_reference(dtype):
    m = fastpeft.LoRALinear(40, 24, r=8, lora_alpha=16, device=DEVICE, dtype=dtype)
    randomize_adapter(m)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 40, generator=g).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(3, 7, 24, generator=g, dtype=torch.float64).to(DEVICE)
    y = m(x)
    y.backward(dy.to(dtype))
    xr = x.detach().double().requires_grad_()
    A = m.lora_A.detach().double().requires_grad_()
    B = m.lora_B.detach().double().requires_grad_()
    yr = ref.lora_linear(xr, m.weight.double(), m.bias.double(), A, B, m.scaling)
    yr.backward(dy)
    assert_close("y", y, yr, dtype)
    assert_close("dx", x.grad, xr.grad, dtype)
    assert_close("dA", m.lora_A.grad, A.grad, dtype)
    assert_close("dB", m.lora_B.grad, B.grad, dtype)
    assert m.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_merge_unmerge_is_bit_exact(dtype):
    m = fastpeft.LoRALinear(64, 48, r=8, lora_alpha=16, dtype=dtype)
    randomize_adapter(m, seed=1)
    w0 = m.weight.detach().clone()
    x = torch.randn(4, 64, dtype=dtype)
    y_unmerged = m(x)
    for _ in range(5):  # repeated cycles never drift
        m.merge()
        assert m.merged and not torch.equal(m.weight, w0)
        y_merged = m(x)
        m.unmerge()
        assert not m.merged
        assert torch.equal(m.weight, w0), "unmerge must restore the weight bit for bit"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    err = ((y_merged.double() - y_unmerged.double()).norm() / y_unmerged.double().norm()).item()
    assert err <= tol
    expected = (w0.float() + m.scaling * (m.lora_B.float() @ m.lora_A.float())).to(dtype)
    m.merge()
    assert torch.equal(m.weight, expected), "merge rounds W + s*BA once from fp32"


def test_merge_twice_and_unmerge_unmerged_warn():
    m = fastpeft.LoRALinear(8, 8, r=2)
    with pytest.warns(UserWarning, match="not merged"):
        m.unmerge()
    m.merge()
    with pytest.warns(UserWarning, match="already merged"):
        m.merge()


def test_merge_with_shared_weight_updates_the_linear_and_restores_it():
    lin = nn.Linear(16, 16)
    w0 = lin.weight.detach().clone()
    m = fastpeft.LoRALinear.from_linear(lin, r=4)
    randomize_adapter(m)
    m.merge()
    assert not torch.equal(lin.weight, w0)
    m.unmerge()
    assert torch.equal(lin.weight, w0)


def test_to_linear_returns_merged_copy():
    m = fastpeft.LoRALinear(30, 10, r=4, lora_alpha=8, bias=True)
    randomize_adapter(m)
    w0 = m.weight.detach().clone()
    lin = m.to_linear()
    assert type(lin) is nn.Linear and torch.equal(m.weight, w0) and not m.merged
    x = torch.randn(6, 30)
    assert_close("to_linear", lin(x), m(x).double(), torch.float32)
    assert lin.weight.data_ptr() != m.weight.data_ptr()
    m.merge()
    assert torch.equal(m.to_linear().weight, m.weight)


def test_dropout_only_in_training():
    m = fastpeft.LoRALinear(32, 16, r=4, lora_dropout=0.5)
    randomize_adapter(m)
    x = torch.randn(64, 32)
    m.eval()
    e1, e2 = m(x), m(x)
    assert torch.equal(e1, e2)
    m.train()
    t1, t2 = m(x), m(x)
    assert not torch.equal(t1, t2) and not torch.equal(t1, e1)


def test_no_bias_layer():
    m = fastpeft.LoRALinear(12, 6, r=2, bias=False)
    assert m.bias is None
    assert m(torch.randn(2, 12)).shape == (2, 6)
    assert "bias=False" in repr(m)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(r=0), ValueError, "r must be > 0"),
    (dict(r=2.5), TypeError, "r must be an int"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(lora_alpha=float("inf")), ValueError, "lora_alpha"),
])
def test_bad_config(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        fastpeft.LoRALinear(8, 8, **kwargs)
    with pytest.raises(ValueError, match="in_features"):
        fastpeft.LoRALinear(0, 8)


def test_moves_with_to_and_keeps_unmerge_state():
    m = fastpeft.LoRALinear(8, 4, r=2)
    randomize_adapter(m)
    w0 = m.weight.detach().clone()
    m.merge()
    m = m.to(torch.float64)
    m.unmerge()
    assert m.weight.dtype == torch.float64 and torch.equal(m.weight, w0.double())


def test_wrong_input_features_message():
    m = fastpeft.LoRALinear(8, 4, r=2)
    with pytest.raises(ValueError, match="x has 5 features"):
        m(torch.randn(3, 5))


def _merged_pair(base: str, seed: int):
    """A LoRALinear (float or int8 base) with a nonzero update, and a fresh one of the same shape."""
    g = torch.Generator().manual_seed(seed)

    def layer():
        lin = nn.Linear(24, 10)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(10, 24, generator=g))
        if base == "int8":
            lin = fastpeft.Int8Linear.from_linear(lin, threshold=0.0)
        out = fastpeft.LoRALinear.from_linear(lin, r=4, lora_alpha=8)
        with torch.no_grad():
            out.lora_A.copy_(torch.randn(4, 24, generator=g))
            out.lora_B.copy_(torch.randn(10, 4, generator=g))
        return out

    return layer(), layer()


@pytest.mark.parametrize("base", ["float", "int8"])
def test_merged_state_round_trips_both_ways(base):
    """The state of a merged layer is its unmerged weight plus the merged flag: loaded into a fresh
    layer it gives the merged outputs bit for bit (and unmerges to the unmerged ones); an unmerged
    state loaded into a merged layer replaces its original weight (no stale merge left behind)."""
    trained, fresh = _merged_pair(base, 0)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    y_unmerged = trained(x)
    trained.merge()
    y_merged = trained(x)
    fresh.load_state_dict(copy.deepcopy(trained.state_dict()))
    assert fresh.merged and torch.equal(fresh(x), y_merged)
    fresh.unmerge()
    assert torch.equal(fresh(x), y_unmerged)
    other, merged_target = _merged_pair(base, 2)
    merged_target.merge()
    merged_target.load_state_dict(other.state_dict())
    assert not merged_target.merged and torch.equal(merged_target(x), other(x))
    merged_target.merge()
    merged_target.unmerge()
    assert torch.equal(merged_target(x), other(x)), "unmerge restored a stale weight"
    state = {k: v for k, v in other.state_dict().items() if not k.endswith("_extra_state")}
    fresh.load_state_dict(state)  # saved without the flag: an unmerged layer
    assert not fresh.merged and torch.equal(fresh(x), other(x))
