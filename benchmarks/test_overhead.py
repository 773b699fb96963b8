"""Per-call host overhead of fastpeft's layers, eager, at a tiny shape: pytest-benchmark.

    pytest benchmarks/test_overhead.py --benchmark-only        (make bench runs it too)

A 64 -> 64 layer and one row: the arithmetic costs next to nothing, so what is timed is the
Python, dispatcher and autograd work of one call, which is what a decode step pays per layer.
Each fastpeft layer is timed next to nn.Linear and PEFT's LoRA layer in the same run, in two
modes: "eval" (model.eval(), torch.no_grad()) and "fwd+bwd" (train mode; forward, sum, backward
to the input and the trainable parameters). One thread. The ratio table comes last
(benchmarks/conftest.py). On a machine without a GPU the layers run their torch path (the
CPU backend); with a GPU they run on CUDA tensors with the default backend.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastpeft

D, RANK, ROWS = 64, 8, 1
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _peft_layer(dropout: float) -> nn.Module:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(nn.Sequential(nn.Linear(D, D)),
                                peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules=["0"]))
    return model.base_model.model[0]


class UnfusedAdapter(nn.Module):
    """The bottleneck adapter as plain PyTorch modules: x + up(relu(down(x)))."""

    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Linear(D, D // 4), nn.Linear(D // 4, D)

    def forward(self, x):
        return x + self.up(torch.relu(self.down(x)))


def _int8_lora():
    return fastpeft.LoRALinear.from_linear(fastpeft.Int8Linear.from_linear(nn.Linear(D, D)), r=RANK,
                                           lora_alpha=2 * RANK)


# name -> (group for the ratios, role, builder); role: base (nn.Linear), peer (PEFT), unfused, ours
LAYERS = {
    "nn.Linear": ("linear", "base", lambda: nn.Linear(D, D)),
    "PEFT LoRA": ("lora", "peer", lambda: _peft_layer(0.0)),
    "LoRALinear": ("lora", "ours", lambda: fastpeft.LoRALinear(D, D, r=RANK, lora_alpha=2 * RANK)),
    "PEFT LoRA dropout": ("lora_dropout", "peer", lambda: _peft_layer(0.1)),
    "LoRALinear dropout": ("lora_dropout", "ours",
                           lambda: fastpeft.LoRALinear(D, D, r=RANK, lora_alpha=2 * RANK, lora_dropout=0.1)),
    "Int8Linear": ("int8", "ours", lambda: fastpeft.Int8Linear.from_linear(nn.Linear(D, D), threshold=6.0)),
    "Int8Linear+LoRA": ("int8_lora", "ours", _int8_lora),
    "QuantLinear W4 g32": ("quant", "ours", lambda: fastpeft.QuantLinear.from_linear(nn.Linear(D, D), bits=4,
                                                                                     group_size=32)),
    "unfused adapter": ("bottleneck", "unfused", UnfusedAdapter),
    "BottleneckAdapter": ("bottleneck", "ours", lambda: fastpeft.BottleneckAdapter(D, bottleneck=D // 4)),
}
MODES = ("eval", "fwd+bwd")


def call_of(name: str, mode: str):
    torch.manual_seed(0)
    layer = LAYERS[name][2]().to(DEVICE)
    x = torch.randn(ROWS, D, device=DEVICE)
    if mode == "eval":
        layer.eval()

        def call():
            with torch.no_grad():
                return layer(x)
    else:
        layer.train()
        x.requires_grad_(True)

        def call():
            layer(x).sum().backward()
    return call


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(LAYERS))
def test_overhead(benchmark, overhead_results, name, mode):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        call = call_of(name, mode)
        call()  # first call: imports, caches
        benchmark.group = mode
        benchmark.extra_info.update({"group": LAYERS[name][0], "role": LAYERS[name][1]})
        benchmark(call)
    finally:
        torch.set_num_threads(threads)
    overhead_results[(name, mode)] = benchmark.stats.stats.median
