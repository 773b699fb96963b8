"""torch.compile, torch.export and FakeTensor tracing of models built on fastpeft's ops.

A tiny Llama (from a config, no download) in each of fastpeft's set-ups trains a step under
``torch.compile(fullgraph=True)`` with no graph break and gives the eager loss and gradients;
eval models export with ``torch.export(strict=True)``; and the CUDA registrations trace on fake
CUDA tensors (no GPU needed) into graphs whose nodes are the ``fastpeft::`` ops. The graph
breaks of PEFT's LoRA model are counted next to fastpeft's.

Whole models run on the torch backend here (one test runs the triton one under the
interpreter); the kernels are opaque ops to the compiler whatever the backend, and every
backend is checked against the reference in its own tests.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastpeft

from _hf import torch_path, transformers  # noqa: F401  (torch_path: the autouse fixture below)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True)
def small_world():
    torch._dynamo.reset()
    with torch_path():
        yield
    torch._dynamo.reset()


def tiny_llama(seed: int = 0, layers: int = 2) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float()


def ids(seed=1):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def calibration():
    return [ids(s) for s in (11, 12, 13)]


def build(setup: str) -> nn.Module:
    """A tiny Llama in one of fastpeft's training set-ups (what requires grad is what trains)."""
    m = tiny_llama()
    if setup == "lora_dropout":
        fastpeft.inject_lora(m, LORA_TARGETS, r=4, lora_alpha=8, lora_dropout=0.1)
    elif setup in ("int8_t0_lora", "int8_t1_lora", "int8_t6_lora"):
        # threshold 1: these small activations have outlier columns (6 rarely fires on them)
        fastpeft.quantize_int8(m, threshold=float(setup[6]), skip=("lm_head",))
        fastpeft.inject_lora(m, ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    elif setup == "qlora_nf4":  # QLoRA: an NF4 base with double quantization, LoRA with dropout on top
        fastpeft.quantize_model(m, weights="nf4", double_quant=True, skip=("lm_head",))
        fastpeft.inject_lora(m, ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    elif setup == "qlora_int4":  # LoRA on an int4 zero-point base (groups of 32)
        fastpeft.quantize_model(m, weights="int4", group_size=32, skip=("lm_head",))
        fastpeft.inject_lora(m, ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    elif setup == "w4_g32":
        fastpeft.quantize_model(m, weights="int4", group_size=32, skip=("lm_head",))
    elif setup == "w4a8_dynamic":
        fastpeft.quantize_model(m, weights="int4", group_size=32, activations="dynamic", skip=("lm_head",))
    elif setup == "w4a8_static":
        fastpeft.quantize_model(m, weights="int4", group_size=32, activations="static",
                                calibration_data=calibration(), skip=("lm_head",))
    elif setup == "bottleneck_adapters":
        fastpeft.add_bottleneck_adapters(m, bottleneck=8)
        with torch.no_grad():  # up starts at zero: make the adapters do something
            for mod in m.modules():
                if isinstance(mod, fastpeft.BottleneckAdapter):
                    mod.up.weight.normal_(0, 0.1)
    else:
        raise ValueError(setup)
    if setup.startswith("w4"):  # the quantized base is frozen: train the norms
        m.requires_grad_(False)
        for name, p in m.named_parameters():
            if "norm" in name:
                p.requires_grad_(True)
    return m.train()


SETUPS = ["lora_dropout", "int8_t0_lora", "int8_t1_lora", "int8_t6_lora", "qlora_nf4", "w4_g32", "w4a8_dynamic",
          "w4a8_static", "bottleneck_adapters"]


def lm_loss(model):
    return lambda x: model(input_ids=x, labels=x, use_cache=False).loss


def distill_losses():
    """Two losses on fastpeft's distillation ops, student = a LoRA Llama, teacher = the base."""
    teacher = tiny_llama(seed=3).eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    fastpeft.inject_lora(student, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    student.train()
    fused = fastpeft.FusedLinearDistillationLoss(temperature=2.0, alpha=0.5, chunk_size=5)

    def logits_loss(x):
        labels = x.roll(-1, 1)
        with torch.no_grad():
            t = teacher(input_ids=x, use_cache=False).logits
        s = student(input_ids=x, use_cache=False).logits
        return fastpeft.distillation_loss(s, t, labels, temperature=2.0, alpha=0.5)

    def fused_loss(x):
        labels = x.roll(-1, 1)
        with torch.no_grad():
            ht = teacher.model(input_ids=x, use_cache=False).last_hidden_state
        hs = student.model(input_ids=x, use_cache=False).last_hidden_state
        return fused(hs, student.lm_head.weight, ht, teacher.lm_head.weight, labels)

    return student, {"distillation_loss": logits_loss, "fused_linear_distillation_loss": fused_loss}


def compiled_matches_eager(model, loss_fn, x, backend="aot_eager"):
    """(graph count, graph breaks) of loss_fn under torch._dynamo.explain; then the same step
    compiled with fullgraph=True gives the eager loss and gradients (same dropout seeds)."""
    explain = torch._dynamo.explain(loss_fn)(x)
    torch._dynamo.reset()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params, "nothing trains"
    torch.manual_seed(7)
    eager = loss_fn(x)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in params}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    torch.manual_seed(7)
    loss = compiled(x)
    loss.backward()
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-6), (loss.item(), eager.item())
    for n, p in params:
        assert p.grad is not None, n
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), (n, (p.grad - grads[n]).abs().max())
    return explain.graph_count, explain.graph_break_count


@pytest.mark.parametrize("setup", SETUPS)
def test_training_step_compiles_without_graph_breaks(setup):
    m = build(setup)
    assert compiled_matches_eager(m, lm_loss(m), ids()) == (1, 0)


@pytest.mark.parametrize("name", ["distillation_loss", "fused_linear_distillation_loss"])
def test_distillation_step_compiles_without_graph_breaks(name):
    student, losses = distill_losses()
    assert compiled_matches_eager(student, losses[name], ids()) == (1, 0)


@pytest.mark.parametrize("learnable", [True, False])
def test_qat_step_compiles_without_graph_breaks(learnable):
    """Fake quantization, learnable (QATLinear: LSQ / LSQ+ on the weights and the input) or a
    min/max observer in training mode (its running statistics are buffers updated on the device)."""
    torch.manual_seed(0)
    if learnable:
        m = fastpeft.prepare_qat(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), bits=4,
                                 scheme="zeropoint")
    else:
        m = nn.Sequential(nn.Linear(16, 32), fastpeft.FakeQuantize(8, "zeropoint", learnable=False), nn.Linear(32, 4))
    m.train()
    x = torch.randn(8, 16)
    m(x)  # the first batch initializes the quantizers (a one-time step, before compiling)
    if not learnable:  # the observer's state changes every step: compare from the same state
        state = copy.deepcopy(m.state_dict())
        eager_model, compiled_model = m, copy.deepcopy(m)
        explain = torch._dynamo.explain(lambda x: compiled_model(x).sum())(x)
        compiled_model.load_state_dict(state)  # explain ran a step: back to the eager model's state
        assert (explain.graph_count, explain.graph_break_count) == (1, 0)
        f = torch.compile(lambda x: compiled_model(x).sum(), backend="aot_eager", fullgraph=True)
        assert torch.allclose(f(x), eager_model(x).sum(), rtol=1e-5)
        assert torch.equal(compiled_model[1].min_val, eager_model[1].min_val)
        return
    assert compiled_matches_eager(m, lambda x: m(x).pow(2).sum(), x) == (1, 0)


def test_graph_breaks_next_to_peft(capsys):
    """The same LoRA model with PEFT's layers and with fastpeft's: both one graph, no break."""
    peft = pytest.importorskip("peft")
    ours = build("lora_dropout")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                target_modules=LORA_TARGETS)).train()
    counts = {}
    for name, m in (("fastpeft", ours), ("peft", theirs)):
        e = torch._dynamo.explain(lm_loss(m))(ids())
        counts[name] = (e.graph_count, e.graph_break_count)
        torch._dynamo.reset()
    with capsys.disabled():
        print(f"\n  graphs / breaks of a LoRA Llama step: fastpeft {counts['fastpeft']}, PEFT {counts['peft']}")
    assert counts["fastpeft"] == (1, 0)
    assert counts["fastpeft"][1] <= counts["peft"][1]


def test_inductor_compiles_a_lora_training_step():
    """The real compiler (Inductor, C++ on the CPU) around the fastpeft ops: same loss and
    gradients as eager (fallback_random: Inductor draws the dropout seeds as eager does)."""
    m = tiny_llama(layers=1)
    fastpeft.inject_lora(m, ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    m.train()
    import torch._inductor.config as inductor_config
    with inductor_config.patch(fallback_random=True):
        assert compiled_matches_eager(m, lm_loss(m), ids(), backend="inductor") == (1, 0)


def test_triton_backend_compiles_too():
    """The triton kernels (here in the interpreter) are the same opaque op to the compiler."""
    if not fastpeft._backend.interpreter_active():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) on the CPU")
    m = tiny_llama(layers=1)
    fastpeft.inject_lora(m, ["q_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    m.train()
    with fastpeft.use_backend("triton"):
        assert compiled_matches_eager(m, lm_loss(m), ids()) == (1, 0)


@pytest.mark.parametrize("setup", ["qlora_nf4", "qlora_int4"])
def test_triton_backend_compiles_qlora_too(monkeypatch, setup):
    """LoRA's fused ops on a quantized base (fastpeft::nf4_lora_linear_fwd / _grad_input on NF4,
    fastpeft::quant_lora_linear_fwd / _grad_input on int4; the LoRA shrink and dA) under the triton
    backend: one graph, the eager loss and gradients."""
    if not fastpeft._backend.interpreter_active():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) on the CPU")
    from fastpeft.kernels import nf4 as knf4
    from fastpeft.kernels import qlinear as kq
    module, names = (knf4, ("nf4_linear", "nf4_linear_dx")) if setup == "qlora_nf4" else \
        (kq, ("quant_linear", "quant_linear_dx"))
    fused = []
    for name in names:  # record the GEMMs on the quantized base that carry the LoRA update
        launch = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _l=launch, _n=name, **k: (
            fused.append(_n) if k.get("lora") is not None else None, _l(*a, **k))[1])
    m = build(setup)
    with fastpeft.use_backend("triton"):
        assert compiled_matches_eager(m, lm_loss(m), ids()) == (1, 0)
    assert set(names) <= set(fused)  # the fused forward and dx ran


def test_dropout_masks_change_between_calls_in_a_compiled_graph():
    """The dropout seed is drawn inside the graph: two calls of the compiled step use two masks."""
    m = build("lora_dropout")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, fastpeft.LoRALinear):
                mod.lora_B.normal_()
    f = torch.compile(lm_loss(m), backend="aot_eager", fullgraph=True)
    x = ids()
    assert f(x).item() != f(x).item()


# --------------------------------------------------------------------------------- export


def eval_models():
    out = {}
    m = tiny_llama()
    fastpeft.inject_lora(m, LORA_TARGETS, r=4, lora_alpha=8)
    out["lora"] = m
    for t in (0.0, 1.0, 6.0):
        m = tiny_llama()
        fastpeft.quantize_int8(m, threshold=t, skip=("lm_head",))
        out[f"int8_t{t:g}"] = m
    m = tiny_llama()
    fastpeft.quantize_model(m, weights="int4", group_size=32, skip=("lm_head",))
    out["w4_g32"] = m
    m = tiny_llama()
    fastpeft.quantize_model(m, weights="int4", group_size=32, activations="dynamic", skip=("lm_head",))
    out["w4a8_dynamic"] = m
    m = tiny_llama()
    fastpeft.add_bottleneck_adapters(m, bottleneck=8)
    out["bottleneck_adapters"] = m
    return {k: v.eval() for k, v in out.items()}


class LogitsOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def fastpeft_nodes(graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "fastpeft" in str(n.target)}


EXPECTED_OPS = {"lora": "fastpeft.lora_linear", "int8_t0": "fastpeft.int8_linear", "int8_t1": "fastpeft.int8_linear",
                "int8_t6": "fastpeft.int8_linear",
                "w4_g32": "fastpeft.quant_linear", "w4a8_dynamic": "fastpeft.quant_linear",
                "bottleneck_adapters": "fastpeft.bottleneck_adapter"}


@pytest.mark.parametrize("name", list(EXPECTED_OPS))
def test_strict_export_of_eval_models(name):
    model = LogitsOnly(eval_models()[name])
    x = ids()
    ep = torch.export.export(model, (x,), strict=True)
    nodes = fastpeft_nodes(ep.graph)
    assert any(EXPECTED_OPS[name] in n for n in nodes), nodes
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), model(x), atol=1e-5)


def test_strict_export_of_lora_in_train_mode_with_dropout():
    model = LogitsOnly(build("lora_dropout"))
    x = ids()
    ep = torch.export.export(model, (x,), strict=True)
    nodes = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("fastpeft.lora_linear" in n for n in nodes) and any("randint" in n for n in nodes), nodes
    torch.manual_seed(3)
    got = ep.module()(x)
    torch.manual_seed(3)
    assert torch.allclose(got, model(x), atol=1e-5)


def layer_stack(name: str) -> nn.Module:
    """Two layers of a set-up, nothing else: Hugging Face's Llama cannot run on fake CUDA tensors in a
    CPU-only torch build (its slicing asks for a CUDA device guard, which such a build lacks), so
    the fake-CUDA traces take the fastpeft layers without the model around them."""
    torch.manual_seed(0)
    lin = lambda: nn.Linear(32, 32)
    if name == "lora":
        layers = [fastpeft.LoRALinear.from_linear(lin(), r=4, lora_alpha=8) for _ in range(2)]
    elif name.startswith("int8"):
        t = float(name[len("int8_t"):])
        layers = [fastpeft.LoRALinear.from_linear(fastpeft.Int8Linear.from_linear(lin(), threshold=t), r=4),
                  fastpeft.Int8Linear.from_linear(lin(), threshold=t)]
    elif name.startswith("w4"):
        act = "dynamic" if name == "w4a8_dynamic" else None
        layers = [fastpeft.QuantLinear.from_linear(lin(), bits=4, group_size=16, activations=act) for _ in range(2)]
    else:
        layers = [lin(), fastpeft.BottleneckAdapter(32, bottleneck=8)]
    return nn.Sequential(layers[0], nn.GELU(), layers[1]).eval()


@pytest.mark.parametrize("name", list(EXPECTED_OPS))
def test_cuda_registrations_trace_on_fake_cuda_tensors(name):
    """make_fx with every parameter, buffer and input a fake CUDA tensor: the fake implementations
    of the ops give the graph (no GPU, no CUDA kernel runs), and its nodes are the fastpeft ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    model = layer_stack(name)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    with FakeTensorMode(allow_non_fake_inputs=False):
        fake_state = {k: torch.empty(v.shape, dtype=v.dtype, device="cuda") for k, v in state.items()}
        x = torch.empty(3, 5, 32, device="cuda")

        def run(state, x):
            with torch.no_grad():
                return torch.func.functional_call(model, state, (x,))

        gm = make_fx(run, tracing_mode="fake")(fake_state, x)
    nodes = fastpeft_nodes(gm.graph)
    assert any(EXPECTED_OPS[name] in n for n in nodes), nodes
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.meta["val"].device.type == "cuda" and tuple(out.meta["val"].shape) == (3, 5, 32)


def test_compiled_observer_refuses_a_nonfinite_batch_and_keeps_its_state():
    """The batch check is a graph node under torch.compile (no graph break): a NaN batch raises
    when the graph runs, and the observed range and scale stay those of the good batches."""
    fq = fastpeft.FakeQuantize(8, "zeropoint", learnable=False).train()
    compiled = torch.compile(fq, fullgraph=True)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    compiled(x)
    state = {k: v.clone() for k, v in fq.state_dict().items()}
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="value check failed"):
        compiled(bad)
    assert all(torch.equal(v, fq.state_dict()[k]) for k, v in state.items())
