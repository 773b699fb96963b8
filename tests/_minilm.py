"""300 generated sentences and the mean-pooled sentence embedding of a Hugging Face encoder: the
real-weights checks of test_int8_real_weights.py and test_quantize_model.py (all-MiniLM-L6-v2)."""
import itertools

import torch

SUBJECTS = ["The cat", "A developer", "My neighbour", "The committee", "An old sailor", "The new GPU"]
VERBS = ["quietly reads", "loudly rejects", "carefully repairs", "never trusts", "often paints"]
OBJECTS = ["the morning paper", "a broken bicycle", "every pull request", "the tax forms", "a blue door",
           "the quarterly report", "an unfinished novel", "the garden fence", "a quantized matrix",
           "the distant mountains"]


def sentences() -> list[str]:
    return [f"{s} {v} {o}." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]  # 300


def embed(model, tok, texts):
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    e = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)
