"""examples/train_lora_ddp.py runs under torchrun with 2 CPU processes (gloo): it trains, its own
checks pass (DDP reduces only the trainable values, the processes agree, the first step's gradients
equal one process's, the reloaded adapter gives the trained logits), and the adapter it saved from
rank 0 loads here, in fastpeft and in PEFT, into a model that then fits the data better."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch has no gloo backend (torch.distributed.is_gloo_available() is False): the example "
                "runs its processes on the CPU with gloo", allow_module_level=True)

import fastpeft  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "train_lora_ddp.py")
STEPS = 20


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_lora_ddp", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def environment() -> dict:
    """The test session's environment without the Triton CPU interpreter (conftest sets it: the
    example's processes run the torch path, as a CPU run outside the tests does)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPEFT_BACKEND")}
    return env | {"OMP_NUM_THREADS": "1"}


def test_torchrun_two_processes(example, tmp_path):
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", EXAMPLE,
           "--cpu", "--steps", str(STEPS), "--out", str(out)]
    # cwd: not the checkout's root, whose kernels/ would shadow Hugging Face's kernels package
    run = subprocess.run(cmd, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-4000:]
    lines = run.stdout.splitlines()
    assert "DDP: 2 processes, backend gloo, device cpu" in lines, text
    trainable = 2 * (2 * (8 * 64 + 64 * 8) + 2 * (8 * 64 + 32 * 8))  # 2 layers: q, o 64->64; k, v 64->32 (2 kv heads)
    assert sum(p.numel() for p in example.build_model().parameters() if p.requires_grad) == trainable
    assert f"DDP all-reduced {trainable:,} values per step (trainable: {trainable:,})" in lines, text
    assert "every process holds the same LoRA weights (max |diff| to rank 0: 0.0e+00)" in lines, text
    assert any(s.startswith("first step's gradients against one process") for s in lines), text
    assert "reloaded into a fresh model: logits max |diff| 0.0e+00" in lines, text
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]

    # the saved adapter, loaded here: fastpeft and PEFT agree, and it learned the data
    ids = example.global_batch(10_000, 4)
    with fastpeft.use_backend("torch"), torch.no_grad():
        base_loss = example.build_model().eval()(input_ids=ids, labels=ids).loss
        mine = fastpeft.load_adapter(example.build_model(lora_seed=3), out).eval()
        trained_loss = mine(input_ids=ids, labels=ids).loss
        theirs = peft.PeftModel.from_pretrained(example.base_model(), str(out)).eval()
        torch.testing.assert_close(theirs(input_ids=ids).logits, mine(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert trained_loss < base_loss - 0.1, (base_loss, trained_loss)


def test_says_how_to_start_it():
    run = subprocess.run([sys.executable, EXAMPLE], env=environment(), capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(EXAMPLE))
    assert run.returncode == 2 and "start it with torchrun" in run.stderr, run.stderr
