"""LoRA under DDP, FSDP2 (fully_shard), FSDP1 and torch.compile: training equals one process, only
trainable values are reduced, and save_adapter / load_adapter see through every wrapper.

Two CPU processes on gloo run every distributed scenario in one spawn (a process start costs
seconds; the scenarios take tenths); rank 0 writes what it saw to a results file and each test
checks one part of it against a one-process run made here. Global batch GLOBAL_X, rank k trains
on its rows [k * B, (k + 1) * B): the mean of the two local losses is the global mean loss, so
the averaged gradients are the one-process gradients.
"""
import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastpeft
from fastpeft.modules import canonical_name
from _hf import tiny_llama, torch_backend, torch_path  # noqa: F401  (torch_backend: autouse)
from _utils import rel_err

safetensors_torch = pytest.importorskip("safetensors.torch")

WORLD = 2
STEPS = 3
LR = 1e-2
VOCAB = 128  # tiny_llama's
GLOBAL_X = torch.randint(0, VOCAB, (2 * WORLD, 12), generator=torch.Generator().manual_seed(7))
EVAL_X = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 4, 8  # even sizes: FSDP2 pads no dim-0 shard, so it reduces exactly the trainable values
ODD_RANK = 3
TIMEOUT = datetime.timedelta(seconds=120)  # a collective a rank never joins fails instead of hanging
TRAINED = [("ddp", False), ("ddp", True), ("fsdp2", False), ("fsdp2", True), ("fsdp1", False)]
WRAPPERS = ["ddp", "fsdp1_plain", "fsdp1", "fsdp2"]  # fsdp1: wrap_fsdp1; fsdp1_plain: FSDP1 itself

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available on this platform",
                allow_module_level=True)


def lora_model(int8: bool = False, r: int = RANK) -> nn.Module:
    """tiny_llama with LoRA on q/k/v/o (the same weights in every process), on an int8 base if asked."""
    model = tiny_llama()
    if int8:
        fastpeft.quantize_int8(model)
    return fastpeft.inject_lora(model, TARGETS, r=r, lora_alpha=ALPHA)


def head_model() -> nn.Module:
    """A LoRA model with what else trains saved too: LoRA biases (bias="lora_only") and the LM head
    (modules_to_save), B random so that every saved tensor is non-trivial; rank ODD_RANK, so that
    FSDP2 splits lora_A [r, in] unevenly over the ranks."""
    model = lora_model(r=ODD_RANK)
    fastpeft.mark_only_lora_as_trainable(model, bias="lora_only")
    model.lm_head.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in fastpeft.lora.lora_modules(model).values():
            m.lora_B.copy_(torch.rand(m.lora_B.shape, generator=g) - 0.5)
    return model


def trainable_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ReduceCounter:
    """Counts the values handed to all_reduce / reduce_scatter (FSDP1, FSDP2, wrap_fsdp1's hooks),
    by wrapping those torch.distributed functions while it is entered."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter")

    def __init__(self):
        self.values, self._saved = 0, {}

    def __enter__(self):
        for name in self.NAMES:
            f = getattr(dist, name, None)
            if f is not None:
                self._saved[name] = f
                setattr(dist, name, self._counting(name, f))
        return self

    def __exit__(self, *exc):
        for name, f in self._saved.items():
            setattr(dist, name, f)

    def _counting(self, name, f):
        def call(*args, **kwargs):
            if name == "all_reduce":
                t = kwargs.get("tensor", args[0] if args else None)
            else:
                t = next((kwargs[k] for k in ("input", "input_tensor", "input_list") if k in kwargs),
                         args[1] if len(args) > 1 else None)
            self.values += t.numel() if torch.is_tensor(t) else sum(x.numel() for x in t)
            return f(*args, **kwargs)
        return call


def train(wrapped: nn.Module, inner: nn.Module, x: torch.Tensor, counter=None) -> dict:
    """STEPS AdamW steps on the causal-LM loss of x: each step's (whole) gradients of the trainable
    parameters by name, the values reduced per step, the LoRA weights after, eval logits."""
    params = {canonical_name(n): p for n, p in inner.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    wrapped.train()
    grads, reduced = [], []
    for _ in range(STEPS):
        if counter is not None:
            counter.values = 0
        loss = wrapped(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        reduced.append(counter.values if counter is not None else None)
        grads.append({n: gather_grad(p) for n, p in params.items()})
        opt.step()
    wrapped.eval()
    with torch.no_grad():
        logits = wrapped(EVAL_X).logits
    return {"grads": grads, "reduced": reduced, "trainable": sum(p.numel() for p in params.values()),
            "lora": fastpeft.lora_state_dict(wrapped), "logits": logits}


def gather_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad.detach()
    return g.full_tensor() if hasattr(g, "full_tensor") else g.clone()


# ---------------------------------------------------------------------------------------------
# the processes


def _ddp(model: nn.Module, counts: list | None = None) -> nn.Module:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    wrapped = nn.parallel.DistributedDataParallel(model)
    if counts is not None:
        def hook(state, bucket):
            counts.values += bucket.buffer().numel()
            return default_hooks.allreduce_hook(None, bucket)
        wrapped.register_comm_hook(counts, hook)
    return wrapped


def _fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp1(model: nn.Module, helper: bool) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    cpu = torch.device("cpu")
    if helper:
        return fastpeft.wrap_fsdp1(model, device_id=cpu)
    return FullyShardedDataParallel(model, use_orig_params=True, device_id=cpu,
                                    auto_wrap_policy=fastpeft.fsdp_auto_wrap_policy(model))


def wrap(kind: str, model: nn.Module, counter=None) -> nn.Module:
    if kind == "ddp":
        return _ddp(model, counter)
    if kind == "fsdp2":
        return _fsdp2(model)
    return _fsdp1(model, helper=kind == "fsdp1")


def _trained_runs(rank: int, out: str) -> dict:
    rows = GLOBAL_X.shape[0] // WORLD
    x = GLOBAL_X[rank * rows:(rank + 1) * rows]
    results = {}
    for kind, int8 in TRAINED:
        name = f"{kind}{'_int8' if int8 else ''}"
        model = lora_model(int8)
        counter = ReduceCounter()
        wrapped = wrap(kind, model, counter)
        if kind == "ddp":
            results[name] = train(wrapped, model, x, counter)
        else:
            with counter:
                results[name] = train(wrapped, model, x, counter)
        fastpeft.save_adapter(wrapped, os.path.join(out, name))
    model = lora_model()
    wrapped, counter = wrap("fsdp1_plain", model), ReduceCounter()
    before = fastpeft.lora_state_dict(wrapped)  # unshards block units before FSDP1's lazy init
    with counter:
        wrapped(x, labels=x).loss.backward()
    results["fsdp1_plain_reduced"] = counter.values
    results["fsdp1_plain_lora"] = before
    return results


def _save_runs(rank: int, out: str) -> None:
    if rank == 0:
        fastpeft.save_adapter(head_model(), os.path.join(out, "bare"))
    dist.barrier()
    for kind in WRAPPERS:
        fastpeft.save_adapter(wrap(kind, head_model()), os.path.join(out, f"save_{kind}"))
    dist.barrier()
    # loading into a wrapped model: DDP, and FSDP2 (layers in place), then saved again
    for kind in ("ddp", "fsdp2"):
        model = lora_model(r=ODD_RANK)
        fastpeft.mark_only_lora_as_trainable(model, bias="lora_only")
        model.lm_head.requires_grad_(True)
        wrapped = wrap(kind, model)
        fastpeft.load_adapter(wrapped, os.path.join(out, "bare"))
        fastpeft.save_adapter(wrapped, os.path.join(out, f"load_{kind}"))


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    try:
        with torch_path():
            results = _trained_runs(rank, out)
            _save_runs(rank, out)
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every distributed scenario, run once in WORLD processes: (results of rank 0, output folder)."""
    out = tmp_path_factory.mktemp("distributed")
    mp.start_processes(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, start_method="spawn")
    return torch.load(out / "results.pt", weights_only=False), out


@pytest.fixture(scope="module")
def one_process():
    """The reference: one process, the whole global batch (plain and int8 base)."""
    with torch_path():
        return {int8: train(model, model, GLOBAL_X) for int8 in (False, True)
                for model in [lora_model(int8)]}


def read_adapter(directory):
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    return config, safetensors_torch.load_file(os.path.join(directory, "adapter_model.safetensors"))


def same_adapter(a, b):
    (config_a, tensors_a), (config_b, tensors_b) = read_adapter(a), read_adapter(b)
    assert config_a == config_b
    assert sorted(tensors_a) == sorted(tensors_b)
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("kind, int8", TRAINED)
def test_training_equals_one_process(runs, one_process, kind, int8):
    got, ref = runs[0][f"{kind}{'_int8' if int8 else ''}"], one_process[int8]
    for step, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
        assert g.keys() == r.keys()
        for n in r:
            torch.testing.assert_close(g[n], r[n], rtol=1e-5, atol=1e-8, msg=lambda m: f"step {step} {n}: {m}")
    # compared as tensors (fp32's 1e-5): Adam divides by each gradient's running RMS, so where a
    # gradient is tiny, a difference in its last bits moves that one element by a larger fraction of lr
    assert got["lora"].keys() == ref["lora"].keys()
    for n in ref["lora"]:
        assert rel_err(got["lora"][n], ref["lora"][n]) <= 1e-5, n
    assert rel_err(got["logits"], ref["logits"]) <= 1e-5


@pytest.mark.parametrize("kind, int8", TRAINED)
def test_only_trainable_values_are_reduced(runs, kind, int8):
    got = runs[0][f"{kind}{'_int8' if int8 else ''}"]
    assert got["trainable"] == 3584  # r 4 on q/k/v/o of tiny_llama
    assert got["reduced"] == [got["trainable"]] * STEPS


def test_plain_fsdp1_reduces_frozen_values_too(runs):
    """Why wrap_fsdp1: FSDP1 reduces each unit's flat parameter whole, frozen weights included.
    (Its LoRA weights, read whole before the first step, are those of the same model unwrapped.)"""
    assert runs[0]["fsdp1_plain_reduced"] > 5 * 3584
    bare = fastpeft.lora_state_dict(lora_model())
    got = runs[0]["fsdp1_plain_lora"]
    assert got.keys() == bare.keys() and all(torch.equal(got[k], bare[k]) for k in bare)


@pytest.mark.parametrize("kind, int8", TRAINED)
def test_adapter_from_wrapped_model_loads(runs, kind, int8):
    name = f"{kind}{'_int8' if int8 else ''}"
    trained = runs[0][name]["logits"]
    fresh = tiny_llama()
    if int8:
        fastpeft.quantize_int8(fresh)
    fastpeft.load_adapter(fresh, runs[1] / name)
    with torch.no_grad():
        assert rel_err(fresh(EVAL_X).logits, trained) <= 1e-6
    if int8:
        return  # PEFT has no int8 base of fastpeft's: its LoRA on the float base computes another model
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), runs[1] / name).eval()
    with torch.no_grad():
        assert rel_err(theirs(EVAL_X).logits, trained) <= 1e-5


# ---------------------------------------------------------------------------------------------
# saving and loading through wrappers


@pytest.mark.parametrize("kind", WRAPPERS)
def test_save_through_wrapper_equals_bare(runs, kind):
    same_adapter(runs[1] / f"save_{kind}", runs[1] / "bare")
    config, tensors = read_adapter(runs[1] / "bare")
    assert config["bias"] == "lora_only" and config["modules_to_save"] == ["lm_head"]
    assert "base_model.model.model.layers.1.self_attn.o_proj.base_layer.bias" in tensors
    assert tensors["base_model.model.lm_head.weight"].shape == (VOCAB, 64)


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_load_into_wrapped_model(runs, kind):
    same_adapter(runs[1] / f"load_{kind}", runs[1] / "bare")


def test_compiled_model(tmp_path):
    model = head_model()
    fastpeft.save_adapter(model, tmp_path / "bare")
    fastpeft.save_adapter(torch.compile(model), tmp_path / "compiled")
    same_adapter(tmp_path / "compiled", tmp_path / "bare")
    assert fastpeft.lora_state_dict(torch.compile(model)).keys() == fastpeft.lora_state_dict(model).keys()

    compiled = torch.compile(tiny_llama())
    assert fastpeft.load_adapter(compiled, tmp_path / "bare") is compiled
    fastpeft.save_adapter(compiled, tmp_path / "again")
    same_adapter(tmp_path / "again", tmp_path / "bare")
    with torch.no_grad():
        assert torch.equal(compiled._orig_mod(EVAL_X).logits, model(EVAL_X).logits)
