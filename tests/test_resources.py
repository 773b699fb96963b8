"""benchmarks/resources.md (registers, spills, shared memory, blocks per SM and the sm_90 wgmma
wait depth of every launchable Triton config, written by ``tests/_aot.py --table``) is current,
and no launchable config in it spills or needs more shared memory than a block may have.

Regenerating the table compiles about 2000 kernels (minutes to an hour on 2 cores, less with
triton's cache warm), too slow for CI, so the staleness check is cheap: the table's header holds
the sha256 of its inputs (kernels/*.py, fastpeft/ops/*.py, tests/_aot.py, triton's version and
the table format) and this test recomputes it. Any edit to those files, even a comment, asks for
a regeneration: ``.venv/bin/python -P tests/_aot.py --table``. tests/test_triton_compile.py
compiles the launches for real and applies the same rules (tests/_aot.judge).
"""
import re

import pytest

import _aot

REGENERATE = f"the table is stale: regenerate it with `{_aot.REGENERATE}` (from the repository root)"


@pytest.fixture(scope="module")
def table():
    if not _aot.TABLE.exists():
        pytest.fail(f"{_aot.TABLE} is missing: write it with `{_aot.REGENERATE}`")
    return _aot.read_table()


def test_table_is_current(table):
    digest, rows, _ = table
    assert digest == _aot.inputs_hash(), REGENERATE
    assert rows, "the table lists no launch"


def test_every_family_is_in_the_table(table):
    text = _aot.TABLE.read_text()
    missing = [f for f in _aot.FAMILIES if f"\n## {f}\n" not in text]
    assert not missing, f"no rows for {missing}: {REGENERATE}"


def test_every_kernel_module_is_captured():
    """A kernels/ module with Triton kernels needs a launch list in tests/_aot.py (a family)."""
    modules = sorted(p.stem for p in (_aot.ROOT / "kernels").glob("*.py")
                     if not p.stem.startswith("_") and "@triton.jit" in p.read_text())
    missing = [m for m in modules if m not in _aot.FAMILIES]
    assert not missing, f"kernels/{missing} have no launch list in tests/_aot.py (FAMILIES): the table misses them"


def test_no_launchable_config_spills_or_exceeds_shared_memory(table):
    _, rows, problems = table
    found = []
    for row in rows:
        for arch in _aot.TABLE_ARCHS:
            r, name = row[arch], f"{row['label']} ({row['id']}) sm_{arch}"
            if r is None:
                found.append(f"{name}: does not compile")
                continue
            if r["over"]:
                if row["launched"] == "fixed":
                    found.append(f"{name}: {r['smem']} B of shared memory > {_aot.SHARED_LIMIT[arch]}")
                continue  # an autotune config that does not fit is skipped by the autotuner
            accepted = (any(re.search(k, f"{row['label']} sm_{arch}") for k in _aot.KNOWN_SPILLS)
                        or (row["launched"] == "tuned" and arch in _aot.TUNED_SPILLS_ACCEPTED))
            if r["spill"] and not accepted:
                found.append(f"{name}: spills {r['spill']} B")
    assert not found, "launchable configs that spill or do not fit:\n" + "\n".join(found)
    assert not problems, "the table's Problems section:\n" + "\n".join(problems)


def test_known_spills_still_spill(table):
    """An accepted spill that is gone is deleted from tests/_aot.KNOWN_SPILLS."""
    _, rows, _ = table
    spilling = [f"{row['label']} sm_{arch}" for row in rows for arch in _aot.TABLE_ARCHS
                if row[arch] and row[arch]["spill"] and not row[arch]["over"]]
    gone = [k for k in _aot.KNOWN_SPILLS if not any(re.search(k, s) for s in spilling)]
    assert not gone, f"KNOWN_SPILLS entries that match no spilling config any more: {gone}"


@pytest.mark.parametrize("regs,warps,smem,arch,expected", [
    (32, 4, 0, 90, (16, "regs")),          # 4 KB registers a block: 16 blocks; 128 threads: 16 too
    (255, 8, 0, 90, (1, "regs")),          # 256 x 32 registers a warp: 2 warps a sub-partition
    (128, 4, 0, 90, (4, "regs")),
    (32, 4, 16384, 90, (13, "smem")),      # 228 KB / (16 KB + 1 KB reserved)
    (32, 4, 16384, 80, (9, "smem")),       # 164 KB / 17 KB
    (40, 4, 16384, 90, (12, "regs")),      # 40 x 32 = 1280 registers a warp: 12 warps a sub-partition
    (24, 1, 0, 90, (32, "blocks")),
    (16, 2, 0, 80, (32, "threads")),       # threads and blocks both bound at 32
    (114, 8, 98304, 90, (2, "smem")),      # both bound at 2: shared memory named first
    (64, 16, 0, 90, (2, "regs")),          # 32 K registers a block
])
def test_blocks_per_sm(regs, warps, smem, arch, expected):
    assert _aot.blocks_per_sm(regs, warps, smem, arch) == expected


PTX = """
$L__BB0_1:
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};
\twgmma.wait_group.sync.aligned 0;
\t@%p1 bra \t$L__BB0_1;
\twgmma.wait_group.sync.aligned 0;
$L__BB0_4:                              // =>This Inner Loop Header: Depth=1
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};
\twgmma.wait_group.sync.aligned 1;
\t@%p2 bra \t$L__BB0_4;
\twgmma.wait_group.sync.aligned 0;
"""


def test_wait_depth_of_the_main_loop_from_ptx():
    assert _aot.ptx_mma(PTX) == {"mma": "wgmma", "main_waits": [1], "other_waits": [0]}
    assert _aot.ptx_mma("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};") == \
        {"mma": "mma", "main_waits": [], "other_waits": []}
    assert _aot.ptx_mma("\tld.global.v4.b32 {...};")["mma"] == ""
