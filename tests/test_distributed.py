"""LoRA under DDP, FSDP2 (fully_shard), FSDP1 and torch.compile: training equals one process, only
trainable values are reduced, and save_adapter / load_adapter see through every wrapper.

Two CPU processes on gloo run every distributed scenario in one spawn (a process start costs
seconds; the scenarios take tenths); rank 0 writes what it saw to a results file and each test
checks one part of it against a one-process run made here. Global batch GLOBAL_X, rank k trains
on its rows [k * B, (k + 1) * B): the mean of the two local losses is the global mean loss, so
the averaged gradients are the one-process gradients.

The base under LoRA is float, int8 (Int8Linear) or QLoRA's nf4 (QuantLinear, double quantization):
its codes a replicated uint8 buffer ("nf4"), or a frozen uint8 Parameter that FSDP2 shards
("nf4_sharded": quant_storage=torch.uint8, as FSDP-QLoRA's bnb_4bit_quant_storage), or a frozen
float32 Parameter that FSDP1 flattens with the unit's other float32 parameters ("nf4_flat")."""
import copy
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
from fastpeft.nn.qlinear import QuantLinear
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
# (wrapper, base): None a float base, else a key of BASES
TRAINED = [("ddp", None), ("ddp", "int8"), ("ddp", "nf4"), ("fsdp2", None), ("fsdp2", "int8"), ("fsdp2", "nf4"),
           ("fsdp2", "nf4_sharded"), ("fsdp1", None), ("fsdp1", "nf4_flat")]
WRAPPERS = ["ddp", "fsdp1_plain", "fsdp1", "fsdp2"]  # fsdp1: wrap_fsdp1; fsdp1_plain: FSDP1 itself

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available on this platform",
                allow_module_level=True)


BASES = {  # how each quantized base is made from tiny_llama, in place
    "int8": fastpeft.quantize_int8,
    "nf4": lambda model: fastpeft.quantize_model(model, weights="nf4", double_quant=True),
    "nf4_sharded": lambda model: fastpeft.quantize_model(model, weights="nf4", double_quant=True,
                                                         quant_storage=torch.uint8),
    # FSDP1 flattens a unit's parameters into one flat parameter of one dtype: the codes stored in
    # the model's (as FSDP-QLoRA stores bitsandbytes' codes in bf16 for FSDP1)
    "nf4_flat": lambda model: fastpeft.quantize_model(model, weights="nf4", double_quant=True,
                                                      quant_storage=torch.float32),
}
REFERENCE = {None: None, "int8": "int8", "nf4": "nf4", "nf4_sharded": "nf4", "nf4_flat": "nf4"}  # same codes
PROBE = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))  # an input of the hidden size


def base_model(base: str | None = None) -> nn.Module:
    """tiny_llama (the same weights in every process) on the ``base`` (None: float) of BASES."""
    model = tiny_llama()
    if base is not None:
        BASES[base](model)
    return model


def lora_model(base: str | None = None, r: int = RANK) -> nn.Module:
    """``base_model(base)`` with LoRA on q/k/v/o."""
    return fastpeft.inject_lora(base_model(base), TARGETS, r=r, lora_alpha=ALPHA)


def run_name(kind: str, base: str | None) -> str:
    return kind if base is None else f"{kind}_{base}"


def quant_codes(model: nn.Module) -> list:
    """The 4-bit codes (QuantLinear.weight_data) of every quantized layer, in order."""
    return [m.weight_data for m in model.modules() if isinstance(m, QuantLinear)]


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
    for kind, base in TRAINED:
        name = run_name(kind, base)
        model = lora_model(base)
        counter = ReduceCounter()
        wrapped = wrap(kind, model, counter)
        if base == "nf4_sharded":
            _unsharded_layer(model, results)
        if kind == "ddp":
            results[name] = train(wrapped, model, x, counter)
        else:
            with counter:
                results[name] = train(wrapped, model, x, counter)
        if base == "nf4_flat":  # the codes' elements this rank holds (FSDP1's sharded views), and all of them
            results["nf4_flat_codes"] = (sum(c.numel() for c in quant_codes(model)),
                                         sum(c.numel() for c in quant_codes(lora_model(base))))
        fastpeft.save_adapter(wrapped, os.path.join(out, name))
    model = lora_model()
    wrapped, counter = wrap("fsdp1_plain", model), ReduceCounter()
    before = fastpeft.lora_state_dict(wrapped)  # unshards block units before FSDP1's lazy init
    with counter:
        wrapped(x, labels=x).loss.backward()
    results["fsdp1_plain_reduced"] = counter.values
    results["fsdp1_plain_lora"] = before
    return results


def _unsharded_layer(model: nn.Module, results: dict) -> None:
    """The sharded 4-bit base (fully_shard applied): each codes tensor's local and whole sizes, the
    codes left in buffers, and a default QuantLinear loaded from the first layer's whole state
    (its shards gathered) run on PROBE."""
    from torch.distributed.tensor import DTensor

    codes = quant_codes(model)
    results["nf4_sharded_codes"] = [(c.to_local().numel() if isinstance(c, DTensor) else c.numel(), c.numel())
                                    for c in codes]
    results["nf4_sharded_buffers"] = [n for n, _ in model.named_buffers()
                                      if n.endswith(("weight_data", "weight_scale", "weight_nested_scale"))]
    results["nf4_sharded_state"] = [(t.to_local().numel() if isinstance(t, DTensor) else t.numel(), t.numel())
                                    for m in model.modules() if isinstance(m, QuantLinear)
                                    for t in (m.weight_scale, m.weight_nested_scale)]
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in layer.state_dict().items()}
    plain = QuantLinear(64, 64, scheme="nf4", group_size=64, double_quant=True)
    plain.load_state_dict(state)
    with torch.no_grad():
        results["nf4_sharded_unsharded"] = plain(PROBE)


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
    """The reference: one process, the whole global batch (each base of REFERENCE)."""
    with torch_path():
        return {base: train(model, model, GLOBAL_X) for base in set(REFERENCE.values())
                for model in [lora_model(base)]}


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


@pytest.mark.parametrize("kind, base", TRAINED)
def test_training_equals_one_process(runs, one_process, kind, base):
    got, ref = runs[0][run_name(kind, base)], one_process[REFERENCE[base]]
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


@pytest.mark.parametrize("kind, base", TRAINED)
def test_only_trainable_values_are_reduced(runs, kind, base):
    got = runs[0][run_name(kind, base)]
    assert got["trainable"] == 3584  # r 4 on q/k/v/o of tiny_llama
    assert got["reduced"] == [got["trainable"]] * STEPS


def test_fsdp1_shards_the_4bit_base(runs):
    """quant_storage=torch.float32: the codes are float32 Parameters that FSDP1 flattens with the
    unit's other weights and shards: after training, a rank holds about half of their elements
    (a flat parameter's shard boundary need not fall between two layers)."""
    local, whole = runs[0]["nf4_flat_codes"]
    assert 0 < local < whole and abs(local * WORLD - whole) <= 0.1 * whole, (local, whole)


def test_fsdp2_shards_the_4bit_base(runs):
    """quant_storage=torch.uint8: FSDP2 shards the codes (each rank holds half of every one) and the
    quant state (the absmax codes and the nested absmax's bytes: each rank holds its part, FSDP2
    padding the last), none is left in a buffer, and their shards gathered make a layer equal to
    the one-process one."""
    sizes = runs[0]["nf4_sharded_codes"]
    assert len(sizes) == 14  # q/k/v/o, gate/up/down of both layers (lm_head is not quantized)
    assert all(local * WORLD == whole for local, whole in sizes)
    assert runs[0]["nf4_sharded_buffers"] == []
    state = runs[0]["nf4_sharded_state"]
    assert len(state) == 28 and all(0 < local < whole and local >= whole // WORLD for local, whole in state), state
    replicated = base_model("nf4")
    assert [c.numel() for c in quant_codes(replicated)] == [whole for _, whole in sizes]
    with torch.no_grad():
        want = replicated.model.layers[0].self_attn.q_proj(PROBE)
    assert torch.equal(runs[0]["nf4_sharded_unsharded"], want)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_quant_storage_layer(storage):
    """One process: codes and quant state stored as frozen ``storage`` Parameters (K * N / 2 = 83
    bytes of codes, 3 absmax codes, one nested absmax: padded for a float storage) compute what
    the default buffers do, keep their bytes through merge_ / unmerge_ and .to(dtype), and their
    state dict and a default layer's load into each other, with and without double quantization."""
    linear = nn.Linear(33, 5)
    for double in (True, False):
        make = lambda s=None: QuantLinear.from_linear(linear, scheme="nf4", group_size=64,  # noqa: E731
                                                      double_quant=double, quant_storage=s)
        default, layer = make(), make(storage)
        names = ("weight_data", "weight_scale") + (("weight_nested_scale",) if double else ())
        for name in names:
            t = getattr(layer, name)
            assert isinstance(t, nn.Parameter) and not t.requires_grad and t.dtype == storage, name
            assert name not in dict(layer.named_buffers())
        assert trainable_numel(layer) == 0 and fastpeft.trainable_parameters(layer, verbose=False)[1] == 5 * 33 + 5
        with torch.no_grad():
            want = default(PROBE[:, :33])
            assert torch.equal(layer(PROBE[:, :33]), want)
            stored = {n: getattr(layer, n).view(torch.uint8).clone() for n in names}
            layer.merge_(torch.full((5, 33), 0.1))
            assert not torch.equal(layer(PROBE[:, :33]), want)
            assert layer.state_dict()["weight_data"].dtype == torch.uint8  # the codes from before the merge
            layer.unmerge_()
            cast = copy.deepcopy(layer).half().float()  # the bias is cast, the stored bytes are kept
            for n in names:
                for t in (getattr(layer, n), getattr(cast, n)):
                    assert t.dtype == storage and torch.equal(t.view(torch.uint8), stored[n]), n
            state, default_state = layer.state_dict(), default.state_dict()
            assert state["weight_data"].dtype == torch.uint8 and state["weight_data"].shape == (83,)
            for key, value in default_state.items():
                assert key in state and state[key].dtype == value.dtype and torch.equal(state[key], value), key
            other, again = make(), make(storage)
            other.load_state_dict(state)
            again.load_state_dict(default_state)
            assert torch.equal(other(PROBE[:, :33]), want) and torch.equal(again(PROBE[:, :33]), want)
            # the stored (padded) bytes as a quant_storage layer's parameters hold them load too
            stored_state = {k: v for k, v in layer.state_dict(keep_vars=True).items()}
            stored_state.update({n: getattr(layer, n).detach() for n in names})
            third = make()
            third.load_state_dict(stored_state)
            assert torch.equal(third(PROBE[:, :33]), want)
            if double:  # a float64 nested absmax (a value, not stored bytes) is converted, not reinterpreted
                values = dict(default_state, weight_nested_scale=default_state["weight_nested_scale"].double())
                fourth = make(storage)
                fourth.load_state_dict(values)
                assert torch.equal(fourth(PROBE[:, :33]), want)
            if storage != torch.uint8:  # cast by value (as a mixed-precision policy of another dtype would)
                layer.weight_scale.data = layer.weight_scale.data.to(torch.float16)
                with pytest.raises(RuntimeError, match="weight_scale, stored as .* was cast to torch.float16"):
                    layer(PROBE[:, :33])
    with pytest.raises(TypeError, match="quant_storage must be None or one of"):
        make(torch.int8)
    with pytest.raises(ValueError, match="quant_storage is for the nf4 / fp4 schemes"):
        QuantLinear.from_linear(linear, scheme="zeropoint", group_size=None, quant_storage=torch.uint8)
    with pytest.raises(ValueError, match="quant_storage is for weights='nf4' / 'fp4'"):
        fastpeft.quantize_model(tiny_llama(), weights="int4", quant_storage=torch.uint8)


def test_plain_fsdp1_reduces_frozen_values_too(runs):
    """Why wrap_fsdp1: FSDP1 reduces each unit's flat parameter whole, frozen weights included.
    (Its LoRA weights, read whole before the first step, are those of the same model unwrapped.)"""
    assert runs[0]["fsdp1_plain_reduced"] > 5 * 3584
    bare = fastpeft.lora_state_dict(lora_model())
    got = runs[0]["fsdp1_plain_lora"]
    assert got.keys() == bare.keys() and all(torch.equal(got[k], bare[k]) for k in bare)


@pytest.mark.parametrize("kind, base", TRAINED)
def test_adapter_from_wrapped_model_loads(runs, kind, base):
    name = run_name(kind, base)
    trained = runs[0][name]["logits"]
    fresh = base_model(base)
    fastpeft.load_adapter(fresh, runs[1] / name)
    with torch.no_grad():
        assert rel_err(fresh(EVAL_X).logits, trained) <= 1e-6
    if base is not None:
        return  # PEFT has no base of fastpeft's quantized ones: its LoRA on the float base computes another model
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
