"""Every ```python block of README.md runs (on the CPU, without a GPU), so the README cannot drift
from the code.

The rule, stated in the README at the top of "Usage": the first python block of that section,
whose first line is ``# Setup for the examples``, defines the names the other blocks share
(``device``, ``x``, ``weight``, ``linear``, ``new_model()``, ``model``, ``fresh_model``,
``input_ids``, ``batches``). Every block runs on its own: in a fresh namespace where the setup
block has just run (re-run for each block, seeded), and nothing of the blocks before it. One
test per block, named by its index, its README line and the heading above it, so a failure
names the block; tracebacks point at README.md's own lines.

Each block runs in its own temporary working directory (the files it writes land there). With
no GPU, the ops run on fastpeft's ``torch`` backend, one thread (the CPU path the README's
sentence names; under this suite's TRITON_INTERPRET=1 "auto" would take the Triton interpreter,
which is tested op by op elsewhere and far too slow for whole models; on a GPU, the default
backends). ``torch.compile`` defaults to ``backend="eager"``: Dynamo still captures the graph
(``fullgraph=True`` still fails on a graph break), but Inductor's code generation, a minute or
more on a small CPU, is left to tests/test_compile.py.

A block may be skipped only by saying so on its first line, ``# needs: <what> (<why>)``, with
<what> one of:

  cuda      runs only where torch.cuda.is_available();
  torchrun  needs a process group of several processes (DDP / FSDP under torchrun): never run
            here.

A skipped block is still compiled (its syntax checked) and reported as skipped with its reason;
any other <what> fails.
"""
import ast
import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastpeft

pytest.importorskip("transformers")  # the setup block builds a tiny Llama from its config

README = Path(__file__).resolve().parent.parent / "README.md"
SETUP_FIRST_LINE = "# Setup for the examples"
NEEDS = re.compile(r"#\s*needs:\s*(\w+)\s*(.*)")
REQUIREMENTS = {
    "cuda": "a CUDA GPU",
    "torchrun": "several processes in a process group",
}
HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Block:
    index: int
    line: int        # README line of the block's first code line (after the ``` fence)
    heading: str     # the nearest heading above it
    source: str

    @property
    def first_line(self) -> str:
        return self.source.splitlines()[0].strip() if self.source.strip() else ""

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]
        return f"{self.index:02d}-L{self.line}-{slug}"

    def code(self):
        """The block compiled with README.md's path and line numbers (for tracebacks)."""
        return compile("\n" * (self.line - 1) + self.source, str(README), "exec")


def readme_blocks() -> list[Block]:
    """Every ```python fenced block of README.md, in order."""
    blocks, heading, fence, start, body = [], "", None, 0, []
    for n, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            m = re.match(r"( *)(`{3,}|~{3,})\s*(\S*)", line)
            if m:  # (indent, fence, language)
                fence, start, body = (len(m.group(1)), m.group(2), m.group(3).lower()), n + 1, []
            elif re.match(r"#{1,6} ", line):
                heading = line.lstrip("#").strip()
        elif line.strip().startswith(fence[1]) and not line.strip().strip(fence[1][0]):
            if fence[2] == "python":
                blocks.append(Block(len(blocks), start, heading, "\n".join(body) + "\n"))
            fence = None
        else:
            indent = len(line) - len(line.lstrip(" "))
            body.append(line[min(indent, fence[0]):])  # a fence indented in a list: its body too
    assert fence is None, "README.md: a code fence is never closed"
    return blocks


BLOCKS = readme_blocks()
SETUP = next((b for b in BLOCKS if b.first_line.startswith(SETUP_FIRST_LINE)), None)


def test_readme_has_a_setup_block_first_in_usage():
    assert SETUP is not None, f"README.md has no python block starting with {SETUP_FIRST_LINE!r}"
    assert SETUP.heading == "Usage", f"the setup block sits under {SETUP.heading!r}, not 'Usage'"
    assert SETUP.index == min(b.index for b in BLOCKS if b.heading == "Usage"), \
        "the setup block must be the first python block of Usage"
    assert len(BLOCKS) >= 10, f"only {len(BLOCKS)} python blocks found in README.md"


def test_every_block_parses():
    """Syntax first, all at once: a block that does not parse names itself here."""
    for b in BLOCKS:
        try:
            ast.parse(b.source)
        except SyntaxError as e:
            pytest.fail(f"README.md line {b.line + (e.lineno or 1) - 1} (block {b.id}): {e.msg}")


def requirement(block: Block) -> tuple[str, str] | None:
    """(what, why) from a ``# needs:`` first line, or None."""
    m = NEEDS.fullmatch(block.first_line)
    if m is None:
        return None
    what, why = m.group(1), m.group(2).strip()
    if what not in REQUIREMENTS:
        pytest.fail(f"block {block.id}: unknown requirement '# needs: {what}'; use one of {sorted(REQUIREMENTS)}")
    return what, why


@contextlib.contextmanager
def fast_path(monkeypatch):
    """torch.compile with the eager backend unless a block names one; without a GPU, fastpeft's
    torch backend on one thread (the shapes are tiny); with one, the default backends."""
    compile_ = torch.compile

    def eager_compile(*args, **kwargs):
        kwargs.setdefault("backend", "eager")
        return compile_(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    threads = torch.get_num_threads()
    try:
        if HAS_CUDA:
            yield
        else:
            torch.set_num_threads(1)
            with fastpeft.use_backend("torch"):
                yield
    finally:
        torch.set_num_threads(threads)
        if "torch._dynamo" in sys.modules:  # a block compiled or exported: no cache left to other tests
            torch._dynamo.reset()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block, tmp_path, monkeypatch):
    code = block.code()
    need = requirement(block)
    if need is not None:
        what, why = need
        if what == "torchrun" or (what == "cuda" and not HAS_CUDA):
            why = f": {why.strip('()')}" if why.strip("()") else ""
            pytest.skip(f"README.md line {block.line} needs {what} ({REQUIREMENTS[what]}){why}")
    assert SETUP is not None, "README.md has no setup block"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    with fast_path(monkeypatch):
        exec(SETUP.code(), namespace)
        if block is not SETUP:
            exec(code, namespace)
