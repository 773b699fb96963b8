#!/usr/bin/env python3
"""Plot a results JSON: time relative to the base op, one panel per (op, mode, dtype, other dims).

    python benchmarks/plot.py benchmarks/results/<stamp>.json [out.png]

A panel that measured several M (token counts) draws time / base time against M, one line per
implementation, with its target as a dash-dot line where it has one; a panel with one M (a CPU
run) draws one bar per implementation, with the spread (min-max over the repeats) as an error
bar. Only panels with data are drawn. Needs matplotlib; without it this prints a note and
returns (never an error).
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
ROLE_COLORS = {"unfused": "tab:red", "peer": "tab:orange", "auto": "black", "variant": "tab:blue"}
MAX_COLS = 4


def panels_of(data: dict) -> dict[tuple, list[dict]]:
    """The panels with data: (op, mode, dtype, other dims) -> the records to draw (those with a
    ratio to their base op; the base op itself is the line / bar at 1)."""
    panels: dict[tuple, list[dict]] = {}
    for r in data.get("records", []):
        if r.get("kind") != "timing" or r.get("role") == "base" or not r.get("ratio_vs_base"):
            continue
        other = " ".join(f"{k}={v}" for k, v in (r.get("shape") or {}).items() if k != "M")
        panels.setdefault((r["op"], r["mode"], r.get("dtype"), other), []).append(r)
    return panels


def _sort_key(key: tuple, recs: list[dict]) -> tuple:
    dims = tuple(v if isinstance(v, (int, float)) else 0
                 for k, v in (recs[0].get("shape") or {}).items() if k != "M")
    return (key[0], key[2] or "", dims, key[1])


def _ratio_spread(r: dict) -> tuple[float, float] | None:
    rng = r.get("ratio_vs_base_range")
    return (rng[0], rng[1]) if rng else None


def _draw_lines(ax, recs: list[dict]) -> bool:
    """time / base against M; returns whether a target line was drawn."""
    by_impl: dict[str, list[tuple[float, float]]] = {}
    for r in recs:
        by_impl.setdefault(r["impl"], []).append(((r.get("shape") or {}).get("M", 0), r["ratio_vs_base"]))
    for impl, pts in sorted(by_impl.items()):
        pts.sort()
        color, marker, ls = STYLE.get(impl, (None, ".", "-"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=ls, color=color,
                label=impl, linewidth=2 if impl in ("fastpeft[auto]", "fastpeft[torch]") else 1)
    targets = sorted({r["target"]["max_ratio_vs_base"] for r in recs
                      if r.get("target") and r["target"].get("max_ratio_vs_base")})
    for t in targets:
        ax.axhline(t, color="gray", linewidth=0.8, linestyle="-.", label="target")
    xs = [(r.get("shape") or {}).get("M", 0) for r in recs]
    if min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)", fontsize=8)
    return bool(targets)


def _draw_bars(ax, recs: list[dict]) -> bool:
    """One bar of time / base per implementation, the spread as an error bar; returns whether a
    target line was drawn."""
    recs = sorted(recs, key=lambda r: r["impl"])
    ys = [r["ratio_vs_base"] for r in recs]
    lo = [y - (_ratio_spread(r) or (y, y))[0] for y, r in zip(ys, recs)]
    hi = [(_ratio_spread(r) or (y, y))[1] - y for y, r in zip(ys, recs)]
    colors = [STYLE[r["impl"]][0] if r["impl"] in STYLE else ROLE_COLORS.get(r.get("role"), "tab:gray")
              for r in recs]
    pos = range(len(recs))
    ax.barh(list(pos), ys, xerr=[lo, hi], color=colors, alpha=0.8, capsize=3)
    ax.set_yticks(list(pos), [r["impl"] for r in recs], fontsize=7)
    targets = sorted({r["target"]["max_ratio_vs_base"] for r in recs
                      if r.get("target") and r["target"].get("max_ratio_vs_base")})
    for t in targets:
        ax.axvline(t, color="gray", linewidth=0.8, linestyle="-.")
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("time / base time (lower is better)", fontsize=8)
    return bool(targets)


def build_figure(data: dict):
    """The figure (None when no panel has data) and the number of panels drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = panels_of(data)
    if not panels:
        return None, 0
    keys = sorted(panels, key=lambda k: _sort_key(k, panels[k]))
    ncols = min(MAX_COLS, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 0.5, 3.2 * nrows + 0.9), squeeze=False)
    flat = [ax for row in axes for ax in row]
    any_target = False
    for ax, key in zip(flat, keys):
        op, mode, dtype, other = key
        recs = panels[key]
        several_m = len({(r.get("shape") or {}).get("M") for r in recs}) > 1
        any_target |= (_draw_lines if several_m else _draw_bars)(ax, recs)
        if several_m:
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_ylabel("time / base time", fontsize=8)
            ys = [r["ratio_vs_base"] for r in recs if math.isfinite(r["ratio_vs_base"])]
            if ys and max(ys) > 4:
                ax.set_yscale("log")
        title = f"{op} {mode} {dtype or ''}\n{other}" + ("" if several_m else f" M={(recs[0].get('shape') or {}).get('M', '-')}")
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in flat[len(keys):]:
        ax.remove()  # no empty panel
    handles = {}
    for ax in flat[:len(keys)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(7, len(handles)), fontsize=8)
    meta = data.get("meta", {})
    device = meta.get("device") or "?"
    fig.suptitle(f"fastpeft {meta.get('stamp', '')} ({device}): time relative to the base op, lower is better"
                 + ("; bars: median, min-max over the repeats" if any(not _several(panels[k]) for k in keys) else "")
                 + ("; dash-dot: target" if any_target else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.95))
    return fig, len(keys)


def _several(recs: list[dict]) -> bool:
    return len({(r.get("shape") or {}).get("M") for r in recs}) > 1


def plot_results(json_path: str, png_path: str | None = None) -> str | None:
    """Write the PNG; return its path, or None (with a printed note) when it cannot."""
    try:
        import matplotlib  # noqa: F401
    except Exception as exc:
        print(f"(PNG plot skipped: matplotlib is not available: {type(exc).__name__}: {exc})")
        return None
    with open(json_path) as f:
        data = json.load(f)
    fig, n = build_figure(data)
    if fig is None:
        print("(PNG plot skipped: no timings with a base to compare against)")
        return None
    import matplotlib.pyplot as plt
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
