"""The architecture holds: imports point one way through the layers (reference -> kernels / csrc
-> ops -> nn -> model-level -> the package), and the README's layout names every module there is."""
import ast
import re

import pytest

from _utils import CHECKOUT

# rank of each layer: a module may import from its own layer or a lower one, never a higher one
RANKS = {"foundation": 0, "reference": 0, "kernels": 1, "csrc": 1, "ops": 2, "nn": 3, "model": 4, "package": 5}
FOUNDATION = ("_backend", "_checks")  # helpers every layer above the kernels uses; they import no fastpeft module


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "kernels" or parts[:2] == ["fastpeft", "kernels"]:
        return "kernels"
    if parts == ["fastpeft"]:
        return "package"
    if parts[1] == "_C":
        return "csrc"
    if parts[1] in FOUNDATION:
        return "foundation"
    return parts[1] if parts[1] in ("reference", "ops", "nn") else "model"


def sources():
    """(module name as installed, path) of every Python file of the package."""
    for path in sorted([*(CHECKOUT / "fastpeft").rglob("*.py"), *(CHECKOUT / "kernels").rglob("*.py")]):
        parts = list(path.relative_to(CHECKOUT).with_suffix("").parts)
        if parts[0] == "kernels":
            parts.insert(0, "fastpeft")
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports(module: str, path) -> list[tuple[int, str]]:
    """(line, imported fastpeft module) of every import in the file, lazy ones included."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            out += [(node.lineno, base)] if node.module else [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in out if m.split(".")[0] in ("fastpeft", "kernels")]


def test_imports_point_one_way():
    wrong = []
    for module, path in sources():
        mine = layer_of(module)
        for line, target in imports(module, path):
            theirs = layer_of(target)
            if mine == "foundation" or RANKS[theirs] > RANKS[mine] or (mine == "kernels" and theirs != "kernels"):
                wrong.append(f"{path.relative_to(CHECKOUT)}:{line} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_checker_sees_a_backward_import(tmp_path):
    bad = tmp_path / "fastpeft" / "ops"
    bad.mkdir(parents=True)
    (bad / "x.py").write_text("from ..nn.lora import LoRALinear\nimport fastpeft.lora\n")
    found = imports("fastpeft.ops.x", bad / "x.py")
    assert found == [(1, "fastpeft.nn.lora"), (2, "fastpeft.lora")]
    assert [RANKS[layer_of(m)] > RANKS["ops"] for _, m in found] == [True, True]


def readme_layout() -> str:
    text = (CHECKOUT / "README.md").read_text()
    m = re.search(r"## Architecture and layout\n(.*?)(\n## |\Z)", text, re.S)
    assert m, "README.md has no '## Architecture and layout' section"
    return m.group(1)


@pytest.mark.parametrize("folder", ["fastpeft", "fastpeft/ops", "fastpeft/nn", "fastpeft/reference", "kernels",
                                    "csrc", "benchmarks", "tests"])
def test_readme_layout_names_every_module(folder):
    """Each source file (private helpers included) is named in the README's layout block."""
    layout = readme_layout()
    names = sorted(p.name for p in (CHECKOUT / folder).iterdir()
                   if p.suffix in (".py", ".cu", ".cuh", ".h", ".cpp") and p.name != "__init__.py"
                   and not (folder in ("tests", "benchmarks") and p.name.startswith("test_")))
    missing = [n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", layout)]
    assert not missing, f"README's layout does not name {folder}/: {missing}"
