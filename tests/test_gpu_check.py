"""scripts/gpu_check.sh (`make gpu-check`) cannot run here, but what decides its first stage can:
the script parses, every test its stage 1 names exists, and its selection (a pytest plugin the
script writes) keeps at least one test of every kernel family it names, bf16 first. A renamed test or
parameter would otherwise make stage 1 silently test nothing on the first GPU day."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    r = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    d = tmp_path_factory.mktemp("stage1")
    subprocess.run([bash, str(SCRIPT), "--stage1-plugin", str(d)], check=True)
    return d


def _spec(plugin_dir: Path) -> list[tuple]:
    """SPEC's (family, file, test) rows, read from the plugin's source (not imported: it imports torch)."""
    tree = ast.parse((plugin_dir / "stage1_select.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "SPEC")
    return [tuple(ast.literal_eval(e) for e in row.elts[:3]) for row in node.value.elts]


def test_stage1_keeps_a_test_of_every_family(plugin):
    spec = _spec(plugin)
    files = sorted({row[1] for row in spec})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]))
    script = SCRIPT.read_text()
    listed = re.search(r'STAGE1_FILES="([^"]*)"', script).group(1).split()
    assert sorted(f"tests/{f}" for f in files) == sorted(listed), "STAGE1_FILES must list SPEC's files"
    for family, file, test in spec:  # on any machine: the named test exists
        assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M), \
            f"stage 1 names {file}::{test} ({family}), which does not exist"

    def collect(*plugin_args):
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *plugin_args,
                            "--collect-only", "-q", *files],
                           cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return [line for line in r.stdout.splitlines() if "::" in line]

    # one test per (family, dtype, backend): a family's rows compete for its slot, the best match wins
    kept = collect("-p", "stage1_select", "--stage1=triton,cuda")
    for family in dict.fromkeys(row[0] for row in spec):
        tests = [f"{f}::{t}" for fam, f, t in spec if fam == family]
        assert any(t in k for t in tests for k in kept), f"stage 1 keeps no test of {family} ({tests})"
    # ordered bf16 first: no bf16 test after the first fp16 / fp32 one
    dtypes = [m.group(1) for k in kept if (m := re.search(r"torch\.(bfloat16|float16|float32)", k))]
    assert "bfloat16" in dtypes
    assert dtypes.index("bfloat16") == 0 and "bfloat16" not in dtypes[dtypes.count("bfloat16"):]
