"""load_adapter on untrusted adapter directories: corrupted files, wrong field types, wrong
tensors, hostile regexes, path-like names, modules_to_save abuse, and fuzzed configs. Each must
raise a clear TypeError / ValueError (NotImplementedError for a well-formed request of a feature
fastpeft lacks) naming the field or tensor and the file, and leave the model exactly as it was."""
import copy
import json
import math
import os
import pickle
import shutil
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastpeft
from fastpeft import add_prompt_tuning, inject_lora, load_adapter, save_adapter

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from _hf import base, fresh, torch_backend  # noqa: E402,F401  (fixtures; torch_backend: autouse)
from _fuzz import fuzz_settings  # noqa: E402

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Regexes on which Python's re backtracks for ever (measured on "model.layers.0.self_attn.q_proj": all
# but the second still running after 5 s; the second takes 0.56 s there and over 10 minutes on a
# 47-character name); fastpeft must refuse them, quickly.
HOSTILE = [r"(.*)*(.*)*(.*)*(.*)*(.*)*X", r"(\w+\.?)+X", r"(?:.*.*)*X", r".*.*.*.*.*.*.*.*.*.*.*.*X",
           r"(?:(?:q|_|p|r|o|j|\.|\w)+)+X"]
HOSTILE_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------
# helpers


def snapshot(model):
    """Everything a load could change: tensors (names, values, dtypes), requires_grad, module
    types, forward hooks on the model."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            (len(model._forward_pre_hooks), len(model._forward_hooks)))


def assert_unchanged(model, before):
    tensors, grads, modules, hooks = snapshot(model)
    assert modules == before[2]
    assert hooks == before[3]
    assert grads == before[1]
    assert tensors.keys() == before[0].keys()
    for k, v in before[0].items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k


def fails(model, directory, exc, match=None, **kwargs):
    """load_adapter raises ``exc`` (message matching ``match``) and leaves ``model`` unchanged."""
    before = snapshot(model)
    with pytest.raises(exc, match=match) as info:
        load_adapter(model, directory, **kwargs)
    assert_unchanged(model, before)
    return str(info.value)


def read_config(d):
    with open(os.path.join(d, CONFIG)) as f:
        return json.load(f)


def write_config(d, config):
    with open(os.path.join(d, CONFIG), "w") as f:
        json.dump(config, f, allow_nan=True)


def edit_config(d, **changes):
    write_config(d, {**read_config(d), **changes})


def edit_tensors(d, change):
    path = os.path.join(d, WEIGHTS)
    tensors = safetensors_torch.load_file(path)
    safetensors_torch.save_file(change(tensors), path)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """A LoRA adapter (q_proj, v_proj, r 4, random A and B) and a prompt-tuning adapter of the tiny
    Llama, written once."""
    root = tmp_path_factory.mktemp("adapters")
    model = inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.uniform_(-0.5, 0.5)
    save_adapter(model, root / "lora")
    save_adapter(add_prompt_tuning(copy.deepcopy(base), 4, seed=0), root / "prompt")
    return root


@pytest.fixture
def lora_dir(saved, tmp_path):
    """A copy of the LoRA adapter this test may corrupt."""
    return shutil.copytree(saved / "lora", tmp_path / "lora")


@pytest.fixture
def prompt_dir(saved, tmp_path):
    return shutil.copytree(saved / "prompt", tmp_path / "prompt")


@pytest.fixture(params=["plain", "lora", "prompt"])
def target(request, fresh):
    """The model an adapter is loaded into: plain, already holding LoRA (the same modules), or
    already prompt-tuned."""
    model = fresh()
    if request.param == "lora":
        inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    elif request.param == "prompt":
        add_prompt_tuning(model, 4)
    return model


def test_the_saved_adapters_load(saved, fresh):
    """The starting point of every corruption below is a good adapter."""
    load_adapter(fresh(), saved / "lora")
    load_adapter(fresh(), saved / "prompt")


# ---------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("cut", [0, 7, 0.5, -1])
def test_truncated_safetensors(fresh, lora_dir, cut):
    path = os.path.join(lora_dir, WEIGHTS)
    with open(path, "rb") as f:
        data = f.read()
    keep = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    with open(path, "wb") as f:
        f.write(data[:keep])
    message = fails(fresh(), lora_dir, ValueError, "not a readable weights file")
    assert WEIGHTS in message


def test_safetensors_header_lies(fresh, lora_dir):
    path = os.path.join(lora_dir, WEIGHTS)
    header = json.dumps({"x": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    fails(fresh(), lora_dir, ValueError, "not a readable weights file")


class _RunsCode:
    """A pickle that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_legacy_bin_runs_no_code(fresh, lora_dir, tmp_path):
    os.remove(os.path.join(lora_dir, WEIGHTS))
    payload = _RunsCode()
    payload.marker = str(tmp_path / "code-ran")
    with open(os.path.join(lora_dir, "adapter_model.bin"), "wb") as f:
        pickle.dump({"base_model.model.x.lora_A.weight": payload}, f, protocol=2)
    fails(fresh(), lora_dir, ValueError, "adapter_model.bin")
    assert not os.path.exists(payload.marker)
    torch.save([torch.zeros(1)], os.path.join(lora_dir, "adapter_model.bin"))  # data, but not name -> tensor
    fails(fresh(), lora_dir, ValueError, "does not map names to tensors")


@pytest.mark.parametrize("content, match", [
    (b"", "not a valid JSON file"),
    (b"{\"r\": 4,", "not a valid JSON file"),
    (b"\xff\xfe\x00garbage", "not a valid JSON file"),
    (b"[1, 2]", "does not hold a JSON object"),
    (b"null", "does not hold a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "nests JSON values too deeply|not a valid JSON file"),
    (b"{\"r\": " + b"9" * 5000 + b"}", "not a valid JSON file"),
])
def test_config_is_not_json(fresh, lora_dir, content, match):
    with open(os.path.join(lora_dir, CONFIG), "wb") as f:
        f.write(content)
    message = fails(fresh(), lora_dir, ValueError, match)
    assert CONFIG in message


def test_config_size_limit(fresh, lora_dir, monkeypatch):
    monkeypatch.setattr(fastpeft.adapter_io, "MAX_CONFIG_BYTES", 64)
    fails(fresh(), lora_dir, ValueError, "refused above 64")


# ---------------------------------------------------------------------------------------------
# config fields of the wrong type or value


WRONG_FIELDS = [
    ("target_modules", [1, 2], TypeError), ("target_modules", 42, TypeError),
    ("target_modules", {"q_proj": 1}, TypeError), ("target_modules", ["q_proj", ""], ValueError),
    ("target_modules", [["q_proj"]], TypeError), ("target_modules", "(q_proj", ValueError),
    ("target_modules", "a{99999999999}", ValueError),
    ("exclude_modules", 7, TypeError), ("exclude_modules", "[", ValueError),
    ("rank_pattern", ["q_proj"], TypeError), ("rank_pattern", "q_proj", TypeError),
    ("rank_pattern", {"q_proj": "4"}, TypeError), ("rank_pattern", {"q_proj": 0}, ValueError),
    ("rank_pattern", {"q_proj": 4.0}, TypeError), ("rank_pattern", {"q_proj": None}, TypeError),
    ("rank_pattern", {"(": 4}, ValueError),
    ("alpha_pattern", {"q_proj": "8"}, TypeError), ("alpha_pattern", {"q_proj": math.nan}, ValueError),
    ("alpha_pattern", {"q_proj": True}, TypeError),
    ("layers_to_transform", "0", TypeError), ("layers_to_transform", [0, "1"], TypeError),
    ("layers_to_transform", [True], TypeError), ("layers_to_transform", -1, ValueError),
    ("layers_to_transform", 0.0, TypeError),
    ("layers_pattern", 3, TypeError), ("layers_pattern", "(", ValueError), ("layers_pattern", ["layers", 1], TypeError),
    ("r", 0, ValueError), ("r", -4, ValueError), ("r", 4.0, TypeError), ("r", "4", TypeError), ("r", True, TypeError),
    ("r", [4], TypeError),
    ("lora_alpha", "8", TypeError), ("lora_alpha", math.nan, ValueError), ("lora_alpha", math.inf, ValueError),
    ("lora_alpha", True, TypeError), ("lora_alpha", 10 ** 400, ValueError),
    ("lora_dropout", 1.0, ValueError), ("lora_dropout", -0.1, ValueError), ("lora_dropout", "0.1", TypeError),
    ("use_rslora", "false", TypeError), ("use_rslora", 1, TypeError), ("use_rslora", "true", TypeError),
    ("use_dora", "false", TypeError), ("fan_in_fan_out", 0, TypeError),
    ("bias", 0, TypeError), ("init_lora_weights", 1.5, TypeError), ("init_lora_weights", [], TypeError),
    ("peft_type", 5, ValueError), ("peft_type", "lora", ValueError),
]


@pytest.mark.parametrize("field, value, exc", WRONG_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in WRONG_FIELDS])
def test_wrong_field(target, lora_dir, field, value, exc):
    edit_config(lora_dir, **{field: value})
    message = fails(target, lora_dir, exc)
    assert CONFIG in message and field in message, message


def test_missing_field(fresh, lora_dir):
    config = read_config(lora_dir)
    del config["peft_type"]
    write_config(lora_dir, config)
    fails(fresh(), lora_dir, ValueError, "peft_type")


def test_use_rslora_false_as_a_string_was_true(fresh, lora_dir):
    """Before: any non-empty string counted as true, so "false" gave the rsLoRA scaling."""
    edit_config(lora_dir, use_rslora="false")
    fails(fresh(), lora_dir, TypeError, "use_rslora.*JSON boolean")
    edit_config(lora_dir, use_rslora=False)
    assert load_adapter(fresh(), lora_dir).model.layers[0].self_attn.q_proj.scaling == 8 / 4


# ---------------------------------------------------------------------------------------------
# tensors


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_lora_tensor_dtype(target, lora_dir, dtype):
    """Only floating-point tensors are weights: an int32 A would be cast, a complex one lose its
    imaginary part (before: both loaded)."""
    edit_tensors(lora_dir, lambda t: {**t, KEY: torch.ones(t[KEY].shape, dtype=dtype)})
    message = fails(target, lora_dir, TypeError, "floating point")
    assert KEY in message and WEIGHTS in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load(fresh, lora_dir, dtype):
    edit_tensors(lora_dir, lambda t: {**t, KEY: t[KEY].to(dtype)})
    model = load_adapter(fresh(), lora_dir)
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32


@pytest.mark.parametrize("shape", [(64, 4), (5, 64), (4, 63), (4,), (1, 4, 64), ()])
def test_lora_tensor_shape(target, lora_dir, shape):
    edit_tensors(lora_dir, lambda t: {**t, KEY: torch.zeros(shape)})
    message = fails(target, lora_dir, ValueError, "has shape")
    assert KEY in message


def test_nan_weights_load(fresh, lora_dir):
    """Not checked: the values. A file's NaN weights are loaded as they are."""
    edit_tensors(lora_dir, lambda t: {**t, KEY: torch.full(t[KEY].shape, math.nan)})
    assert load_adapter(fresh(), lora_dir).model.layers[0].self_attn.q_proj.lora_A.isnan().all()


def test_prompt_tensor_dtype_and_shape(target, prompt_dir):
    path = os.path.join(prompt_dir, WEIGHTS)
    good = safetensors_torch.load_file(path)["prompt_embeddings"]
    for bad, exc in [(good.to(torch.int32), TypeError), (good.to(torch.complex64), TypeError),
                     (good[:3], ValueError), (good.t().contiguous(), ValueError)]:
        safetensors_torch.save_file({"prompt_embeddings": bad}, path)
        fails(target, prompt_dir, exc, "prompt_embeddings")


def test_merged_layer_is_not_overwritten(fresh, lora_dir):
    """Loading into a layer merged with that adapter would leave the old update in its weight."""
    model = inject_lora(fresh(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    model.model.layers[0].self_attn.q_proj.merge()
    fails(model, lora_dir, ValueError, "unmerge")


# ---------------------------------------------------------------------------------------------
# hostile regexes: refused, in well under a second, wherever a config holds one


def hostile_configs(pattern):
    yield "target_modules", {"target_modules": pattern}
    yield "exclude_modules", {"exclude_modules": pattern}
    yield "rank_pattern", {"rank_pattern": {pattern: 4}}
    yield "alpha_pattern", {"alpha_pattern": {pattern: 8}}
    yield "layers_pattern", {"layers_pattern": pattern, "layers_to_transform": [0]}


@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_pattern_is_refused_quickly(target, lora_dir, pattern):
    original = read_config(lora_dir)
    for field, changes in hostile_configs(pattern):
        if fastpeft.lora.lora_modules(target) and field not in ("rank_pattern", "alpha_pattern"):
            continue  # loading into existing LoRA layers selects no modules: only their ranks are matched
        write_config(lora_dir, {**original, **changes})
        start = time.perf_counter()
        message = fails(target, lora_dir, ValueError)
        elapsed = time.perf_counter() - start
        assert elapsed < HOSTILE_SECONDS, (field, elapsed)
        assert field in message and CONFIG in message and "could take" in message, message


def test_hostile_patterns_would_hang_re():
    """The patterns above really are catastrophic for re: a name 10 characters long already costs
    re many times what fastpeft's bound allows, and every 2 more characters multiply it."""
    from fastpeft.modules import MAX_MATCH_STEPS, _name_bound, _quick_bound
    for pattern in HOSTILE:
        assert _quick_bound(pattern, 64) > MAX_MATCH_STEPS
        assert _name_bound(pattern, "model.layers.0.self_attn.q_proj") > MAX_MATCH_STEPS


@pytest.mark.parametrize("pattern", [
    r".*\.(q|v)_proj", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r"^(?!.*mlp).*(q_proj|v_proj)",
    r"(?:\w+\.)*(?:q|v)_proj", r".*layers.*(self_attn|attention).*(q_proj|v_proj)",
    r"(?:.*?(?:model|text).*?(?:self_attn|attention|attn|mlp).*?(?:q_proj|v_proj).*?)",  # Unsloth's form
])
def test_real_regexes_still_load(fresh, lora_dir, pattern):
    edit_config(lora_dir, target_modules=pattern)
    model = load_adapter(fresh(), lora_dir)
    assert set(fastpeft.lora.lora_modules(model)) == {f"model.layers.{i}.self_attn.{p}_proj"
                                                       for i in (0, 1) for p in "qv"}


# ---------------------------------------------------------------------------------------------
# path-like names


@pytest.mark.parametrize("key", ["base_model.model.../../lm_head.lora_A.weight",
                                 "base_model.model.model.layers.0.self_attn.q_proj/../../x.lora_A.weight",
                                 "base_model.model.__class__.lora_A.weight", "/etc/passwd",
                                 "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight/.."])
def test_path_like_tensor_names(target, lora_dir, key):
    edit_tensors(lora_dir, lambda t: {**t, key: torch.zeros(4, 64)})
    fails(target, lora_dir, ValueError, "unexpected keys")


@pytest.mark.parametrize("name", ["../evil", "a.b", "", "__base__"])
def test_path_like_adapter_name(fresh, lora_dir, name):
    fails(fresh(), lora_dir, ValueError, "adapter name", adapter_name=name)


@pytest.mark.parametrize("entry", ["../lm_head", "model.layers.0.", "__class__", "lm_head/..", "."])
def test_path_like_modules_to_save(target, prompt_dir, entry):
    edit_config(prompt_dir, modules_to_save=[entry])
    edit_tensors(prompt_dir, lambda t: {**t, "base_model.lm_head.weight": torch.zeros(128, 64)})
    fails(target, prompt_dir, ValueError, "modules_to_save")


# ---------------------------------------------------------------------------------------------
# modules_to_save abuse


def proj_weights(model, fill=0.0):
    return {f"base_model.{n}": torch.full(p.shape, fill) for n, p in model.named_parameters()
            if n.endswith("_proj.weight")}


def test_one_letter_modules_to_save_selects_nothing(target, prompt_dir, base):
    """Before: "j" matched every *_proj by string suffix, and zero tensors for them zeroed all 14
    projection weights of the base model and made them trainable, for good."""
    edit_config(prompt_dir, modules_to_save=["j"])
    edit_tensors(prompt_dir, lambda t: {**t, **proj_weights(base)})
    assert len(proj_weights(base)) == 14
    fails(target, prompt_dir, ValueError, "modules_to_save")
    edit_tensors(prompt_dir, lambda t: {"prompt_embeddings": t["prompt_embeddings"]})  # no tensors at all
    if fastpeft.prompt_tuning.get_prompt_tuning(target) is None:
        fails(target, prompt_dir, ValueError, "selects no module")


@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(64, 64, dtype=torch.int32), TypeError, "floating point"),
    (torch.zeros(64, 64, dtype=torch.complex64), TypeError, "floating point"),
    (torch.zeros(64, 64, dtype=torch.bool), TypeError, "floating point"),
    (torch.zeros(32, 64), ValueError, "has shape"),
    (torch.zeros(64), ValueError, "has shape"),
])
def test_modules_to_save_tensors_are_checked_first(target, prompt_dir, bad, exc, match):
    """Every tensor is checked before anything is copied: the good tensors next to a bad one
    (the LM head's and layer 0's q_proj, checked first) are not loaded either."""
    edit_config(prompt_dir, modules_to_save=["lm_head", "q_proj"])
    edit_tensors(prompt_dir, lambda t: {**t, "base_model.lm_head.weight": torch.ones(128, 64),
                                        "base_model.model.layers.0.self_attn.q_proj.weight": torch.ones(64, 64),
                                        "base_model.model.layers.1.self_attn.q_proj.weight": bad})
    message = fails(target, prompt_dir, exc, match)
    assert "layers.1.self_attn.q_proj.weight" in message


def test_modules_to_save_whole_names_load(fresh, prompt_dir):
    """What PEFT writes (whole module names) loads, into the named modules only."""
    edit_config(prompt_dir, modules_to_save=["q_proj"])
    model = fresh()
    twos = {k: v for k, v in proj_weights(model, 2.0).items() if k.endswith("q_proj.weight")}
    edit_tensors(prompt_dir, lambda t: {**t, **twos})
    load_adapter(model, prompt_dir)
    for i in (0, 1):
        attn = model.model.layers[i].self_attn
        assert (attn.q_proj.weight == 2.0).all() and attn.q_proj.weight.requires_grad
        assert not (attn.k_proj.weight == 2.0).all() and not attn.k_proj.weight.requires_grad


# ---------------------------------------------------------------------------------------------
# fuzzing: random JSON in each field


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.integers(-3, 70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
# strings that are module names, parts of them, or regexes over them
NAMEISH = st.text(alphabet="qvkoupjrl_.*+?|()[]{}^$\\0123456789dwsay", max_size=24)
VALUES = (JSON | NAMEISH | st.lists(NAMEISH, max_size=3) | st.dictionaries(NAMEISH, JSON_SCALARS, max_size=3)
          | st.sampled_from(["q_proj", "v_proj", "all-linear", r".*\.q_proj", "layers", "none", "gaussian",
                             "LORA", "PROMPT_TUNING", "CAUSAL_LM", "SEQ_CLS", "lm_head", "model"]))
LORA_FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules",
               "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias",
               "init_lora_weights", "use_dora", "fan_in_fan_out", "modules_to_save", "layer_replication",
               "peft_type", "task_type", "inference_mode"]
PROMPT_FIELDS = ["num_virtual_tokens", "token_dim", "task_type", "modules_to_save", "num_transformer_submodules",
                 "prompt_tuning_init", "peft_type", "num_layers", "inference_mode"]
FUZZ = fuzz_settings(25)  # derandomized in CI; FASTPEFT_FUZZ_EXAMPLES=N for N fresh examples


@pytest.fixture(scope="module")
def fuzz_dirs(saved, tmp_path_factory):
    """Copies of the adapters whose config each fuzzing example rewrites, and the original configs."""
    root = tmp_path_factory.mktemp("fuzz")
    return {kind: (shutil.copytree(saved / kind, root / kind), read_config(saved / kind)) for kind in ("lora", "prompt")}


def fuzz_once(model, directory, config, changes):
    """Load ``config`` + ``changes``: a success, or a clear error (naming the directory's file)
    that left the model unchanged. Nothing else."""
    write_config(directory, {**config, **changes})
    before = snapshot(model)
    try:
        load_adapter(model, directory)
    except (ValueError, TypeError, NotImplementedError) as e:
        assert str(directory) in str(e), (changes, e)
        assert_unchanged(model, before)


@pytest.mark.parametrize("into", ["plain", "lora"])
@FUZZ
@given(changes=st.dictionaries(st.sampled_from(LORA_FIELDS), VALUES, min_size=1, max_size=3))
def test_fuzz_lora_config(fuzz_dirs, base, into, changes):
    model = copy.deepcopy(base)
    if into == "lora":
        inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    fuzz_once(model, *fuzz_dirs["lora"], changes)


@pytest.mark.parametrize("into", ["plain", "prompt"])
@FUZZ
@given(changes=st.dictionaries(st.sampled_from(PROMPT_FIELDS), VALUES, min_size=1, max_size=3))
def test_fuzz_prompt_config(fuzz_dirs, base, into, changes):
    model = copy.deepcopy(base)
    if into == "prompt":
        add_prompt_tuning(model, 4)
    fuzz_once(model, *fuzz_dirs["prompt"], changes)
