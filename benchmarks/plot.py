#!/usr/bin/env python3
"""Plot a results JSON: time / base time against M, one panel per (op, mode, other dims).

    python benchmarks/plot.py benchmarks/results/<stamp>.json [out.png]

Needs matplotlib; without it this prints a note and returns (never an error).
"""
from __future__ import annotations

import json
import math
import os
import sys

STYLE = {  # impl prefix -> (color, marker, linestyle)
    "unfused": ("tab:red", "s", "--"),
    "peft": ("tab:orange", "^", "--"),
    "fastpeft[auto]": ("black", "o", "-"),
    "fastpeft[torch]": ("black", "o", "-"),
    "fastpeft[triton,fused]": ("tab:blue", "v", ":"),
    "fastpeft[triton,split]": ("tab:green", "D", ":"),
    "fastpeft[cuda]": ("tab:purple", "x", ":"),
}


def plot_results(json_path: str, png_path: str | None = None) -> str | None:
    """Write the PNG; return its path, or None (with a printed note) when it cannot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"(PNG plot skipped: matplotlib is not available: {type(exc).__name__}: {exc})")
        return None
    with open(json_path) as f:
        data = json.load(f)
    recs = [r for r in data.get("records", [])
            if r.get("kind") == "timing" and r.get("role") != "base" and r.get("ratio_vs_base")]
    if not recs:
        print("(PNG plot skipped: no timings with a base to compare against)")
        return None
    panels: dict[tuple, list[dict]] = {}
    order: dict[str, tuple] = {}  # panel text -> numeric sort key
    for r in recs:
        rest = [(k, v) for k, v in (r.get("shape") or {}).items() if k != "M"]
        other = " ".join(f"{k}={v}" for k, v in rest)
        order[other] = tuple(v if isinstance(v, (int, float)) else 0 for _, v in rest)
        panels.setdefault((r["op"], r["mode"], r.get("dtype"), other), []).append(r)
    keys = sorted(panels, key=lambda k: (k[0], order[k[3]], k[1]))
    modes = sorted({k[1] for k in keys})
    cols_keys = sorted({(k[0], k[2], k[3]) for k in keys}, key=lambda c: (c[0], c[1] or "", order[c[2]]))
    nrows, ncols = len(modes), len(cols_keys)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1, 3.2 * nrows + 0.8), squeeze=False)
    for key in keys:
        op, mode, dtype, other = key
        ax = axes[modes.index(mode)][cols_keys.index((op, dtype, other))]
        by_impl: dict[str, list[tuple[float, float]]] = {}
        for r in panels[key]:
            x = (r.get("shape") or {}).get("M", 0)
            by_impl.setdefault(r["impl"], []).append((x, r["ratio_vs_base"]))
        for impl, pts in sorted(by_impl.items()):
            pts.sort()
            color, marker, ls = STYLE.get(impl, (None, ".", "-"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=ls, color=color,
                    label=impl, linewidth=2 if impl in ("fastpeft[auto]", "fastpeft[torch]") else 1)
        targets = {r["target"].get("max_ratio_vs_base") for r in panels[key]
                   if r.get("target") and r["target"].get("max_ratio_vs_base")}
        for t in sorted(targets):
            ax.axhline(t, color="gray", linewidth=0.8, linestyle="-.")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        xs = [(r.get("shape") or {}).get("M", 0) for r in panels[key]]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log", base=2)
        ax.set_title(f"{op} {mode} {dtype}\n{other}", fontsize=8)
        ax.set_xlabel("M (tokens)", fontsize=8)
        ax.set_ylabel("time / base time", fontsize=8)
        ax.tick_params(labelsize=7)
        ys = [r["ratio_vs_base"] for r in panels[key] if r["ratio_vs_base"] and math.isfinite(r["ratio_vs_base"])]
        if ys and max(ys) > 4:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    handles = {}
    for row in axes:
        for ax in row:
            for h, l in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(l, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(7, len(handles)), fontsize=8)
    meta = data.get("meta", {})
    fig.suptitle(f"fastpeft {meta.get('stamp', '')}: time relative to the base op (lower is better; "
                 f"dash-dot = target)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = plot_results(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    if out:
        print(f"wrote {out}")
