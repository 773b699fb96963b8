"""pytest set-up for the benchmarks run by pytest (benchmarks/test_*.py, pytest-benchmark): the
ratio table of test_overhead.py, printed after pytest-benchmark's own. Like tests/, it imports the
installed fastpeft, never the checkout's root."""
from __future__ import annotations

import pytest

import common  # noqa: F401  (puts tests/ on sys.path, for _utils)
from _utils import import_installed_package

import_installed_package()

_RESULTS: dict = {}


@pytest.fixture(scope="session")
def overhead_results() -> dict:
    """(layer, mode) -> median seconds per call, filled by test_overhead."""
    return _RESULTS


def ratio_rows(results: dict) -> list[list[str]]:
    """One row per (layer, mode): median us, x nn.Linear, and PEFT's time / ours for the LoRA layers."""
    from test_overhead import LAYERS, MODES
    peer = {(LAYERS[n][0], m): s for (n, m), s in results.items() if LAYERS[n][1] in ("peer", "unfused")}
    rows = []
    for mode in MODES:
        base = results.get(("nn.Linear", mode))
        for name in LAYERS:
            s = results.get((name, mode))
            if s is None:
                continue
            group, role = LAYERS[name][0], LAYERS[name][1]
            p = peer.get((group, mode))
            vs_peer = f"{p / s:.2f}" if p and role == "ours" else "-"
            rows.append([mode, name, f"{s * 1e6:.1f}", f"{s / base:.2f}" if base else "-", vs_peer])
    return rows


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    rows = ratio_rows(_RESULTS)
    head = ["mode", "layer", "median us", "x nn.Linear", "peer or unfused / ours"]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    terminalreporter.write_sep("=", "per-call overhead, one run (higher last column: fastpeft faster)")
    for r in [head] + rows:
        terminalreporter.write_line("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
