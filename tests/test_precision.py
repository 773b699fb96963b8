"""fastpeft.to_half: a model in bf16/fp16 with its normalizations kept in float32."""
import copy

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
