"""Tiny Hugging Face models for the model-level tests (no download), and their fixtures."""
import contextlib
import copy

import pytest
import torch
from torch import nn

import fastpeft

transformers = pytest.importorskip("transformers")


@contextlib.contextmanager
def torch_path():
    """Whole models run on the op's torch backend (the kernels have their own tests; under
    the Triton CPU interpreter a model step takes seconds), on one thread: these tensors are
    tiny, and spare threads only spin when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fastpeft.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def torch_backend():
    """Every test of a module that imports this fixture runs in ``torch_path``."""
    with torch_path():
        yield


def tiny_llama(seed: int = 0) -> nn.Module:
    """2-layer Llama, float32, random weights, random attention biases (no download)."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, attention_bias=True)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return model


def train(model: nn.Module, x: torch.Tensor, steps: int, lr: float = 1e-2) -> tuple[list[float], list[dict]]:
    """AdamW (no weight decay) on the causal-LM loss of ``x`` (labels = x) over the trainable
    parameters, ``steps`` steps. Returns the loss of each step and after the last one, and each
    step's gradients by parameter name (None where a parameter got none)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses, grads = [], []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    model.eval()
    with torch.no_grad():
        losses.append(model(x, labels=x).loss.item())
    return losses, grads


@pytest.fixture(scope="module")
def base():
    """A tiny random Llama, built once per test module."""
    return tiny_llama()


@pytest.fixture
def fresh(base):
    """Makes deep copies of ``base``: a model each test may change."""
    return lambda: copy.deepcopy(base)
