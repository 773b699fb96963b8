"""Every Triton launch fastpeft makes on a GPU compiles for sm_90 (and its fixed configs
for sm_80 too) and fits the shared memory of the chip, checked here without a GPU.

The launches are captured from the real launchers (tests/_aot.py) and compiled ahead of
time with the ptxas shipped in triton's wheel, in a subprocess without TRITON_INTERPRET.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _ptxas() -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return p if p.exists() else None


@pytest.mark.skipif(_ptxas() is None, reason="triton's CUDA backend (ptxas) is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every launch is compiled for real by the "
                    "other tests and by tests/_aot.py --warm in make gpu-check")
def test_every_launch_compiles_for_the_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["AOT_ARCHS"] = "90"
    tuned = subprocess.run([sys.executable, str(HERE / "_aot.py"), "--tuned"], env=env,
                           capture_output=True, text=True, timeout=1500)
    assert tuned.returncode == 0, tuned.stdout[-6000:] + tuned.stderr[-4000:]
    env["AOT_ARCHS"] = "80,90"
    fixed = subprocess.run([sys.executable, str(HERE / "_aot.py"), "--fixed"], env=env,
                           capture_output=True, text=True, timeout=1500)
    assert fixed.returncode == 0, fixed.stdout[-6000:] + fixed.stderr[-4000:]
    assert "all launches compiled and fit" in tuned.stdout and "all launches compiled and fit" in fixed.stdout
