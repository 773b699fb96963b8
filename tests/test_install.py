"""setup.py's build plan: what `make` prints before pip runs (`setup.py --cuda-plan`), and the
choice it reports (FASTPEFT_BUILD_CUDA=0 / 1 / unset) is the one the build makes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _plan(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTPEFT_BUILD_CUDA"}
    if value is not None:
        env["FASTPEFT_BUILD_CUDA"] = value
    return subprocess.run([sys.executable, "setup.py", "--cuda-plan"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_plan_without_the_extension():
    out = _plan("0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fastpeft._C (the CUDA C++ extension): not built: FASTPEFT_BUILD_CUDA=0"


def test_plan_on_request():
    out = _plan("1")
    if shutil.which("nvcc") or os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc")):
        assert out.returncode == 0, out.stderr
        assert "building with nvcc for sm_80, sm_90" in out.stdout and "FASTPEFT_BUILD_CUDA=0 skips it" in out.stdout
    else:
        assert out.returncode != 0 and "nvcc was not found" in out.stderr


def test_plan_by_default_follows_the_gpu():
    """Unset: built where a GPU is visible (and nvcc found), else not, saying which."""
    out = _plan(None)
    assert out.returncode == 0, out.stderr
    gpus = Path("/proc/driver/nvidia/gpus")
    if not (gpus.is_dir() and any(gpus.iterdir())) and shutil.which("nvidia-smi") is None:  # surely no GPU
        assert "not built: no NVIDIA GPU visible (FASTPEFT_BUILD_CUDA=1 builds it anyway)" in out.stdout
    elif "not built" in out.stdout:
        assert "no NVIDIA GPU visible" in out.stdout or "nvcc not found" in out.stdout
    else:
        assert "a GPU is visible and nvcc found" in out.stdout


@pytest.mark.parametrize("value", ["yes", "2"])
def test_plan_refuses_a_bad_value(value):
    out = _plan(value)
    assert out.returncode != 0 and f"FASTPEFT_BUILD_CUDA={value!r}: expected 0, 1 or unset" in out.stderr
