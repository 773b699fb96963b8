#!/usr/bin/env python3
"""Run fastpeft's benchmarks on the device at hand (what `make bench` calls).

    python benchmarks/run.py [--only lora[,int8...]] [--quick] [--budget SECONDS] [--stamp NAME]

GPU: times every op against its baselines, prints progress per shape and a summary table,
and writes benchmarks/results/<YYYY-MM-DD>-<gpu>.json, .md and .png.
CPU: times the torch paths against the same baselines on smaller shapes; writes to
benchmarks/out/ (not committed). Correctness is `make test`'s; every timed output is also
checked against a float64 / fp32 computation with the tests' tolerances.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import textwrap
import traceback

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # must happen before anything imports triton: the kernels then run in its interpreter
    os.environ["TRITON_INTERPRET"] = "1"

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402

# name -> module in benchmarks/; each module has run(ctx) -> list[dict]
BENCHES = {
    "lora": "bench_lora",
    "int8": "bench_int8",
    "quant": "bench_quant",
    "bottleneck": "bench_bottleneck",
    "multi_lora": "bench_multi_lora",
    "distill": "bench_distill",
    "qlora": "bench_qlora",
    "overhead": "bench_overhead",
}
DEFAULT_GPU_BUDGET_S = 180.0


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[],
                    help=f"run only these benches (comma-separated; any of {', '.join(BENCHES)})")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and shorter timings")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds after which no new shape starts (GPU default {DEFAULT_GPU_BUDGET_S:.0f}; "
                         "0 = no limit)")
    ap.add_argument("--stamp", default=None, help="file name stem (default <YYYY-MM-DD>-<gpu-slug>)")
    ap.add_argument("--out-dir", default=None,
                    help="where results go (default benchmarks/results on a GPU, benchmarks/out on CPU)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = ap.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown bench(es) {unknown}; known: {list(BENCHES)}")
    args.names = names
    return args


_CTX: list = []


def _on_sigterm(signum, frame):
    for ctx in _CTX:
        ctx.interrupted = True
    raise common.Interrupted(f"signal {signum}")


def main(argv=None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    gpu_name = torch.cuda.get_device_name(0) if CUDA else None
    stamp = args.stamp or f"{common.today()}-{common.gpu_slug(gpu_name) if CUDA else 'cpu'}"
    out_dir = args.out_dir or os.path.join(HERE, "results" if CUDA else "out")
    path_base = common.unique_path_base(out_dir, stamp)  # never overwrites an earlier run
    stamp = os.path.basename(path_base)
    budget = args.budget if args.budget is not None else (DEFAULT_GPU_BUDGET_S if CUDA else 0)
    ctx = common.Context(cuda=CUDA, quick=args.quick, budget_s=budget or None)
    _CTX.append(ctx)

    print("=" * 100)
    if CUDA:
        print(f"fastpeft benchmarks on {gpu_name} (torch {torch.__version__}, CUDA {torch.version.cuda}); "
              + (f"time budget {budget:.0f} s" if budget else "no time budget"))
        print(f"FASTPEFT_AUTOTUNE={os.environ.get('FASTPEFT_AUTOTUNE', '(unset: autotune)')}: the first "
              "call of each kernel per shape tunes/compiles it (warm-up, not timed)")
    else:
        print(f"No CUDA GPU found: a CPU run ({torch.get_num_threads()} threads). "
              + common.peers_line())
        print(textwrap.fill(common.CPU_SCOPE, 100))
        print("Times are medians with their spread (min-max over the repeats); ratios come from one run.")
    print("=" * 100, flush=True)

    env = common.environment()
    meta = {"stamp": stamp, "date": common.today(), "device": gpu_name or "cpu", "quick": args.quick,
            "budget_s": budget or None, "benches": args.names, "environment": env, "ceilings": {},
            "notes": ctx.notes, "bench_meta": ctx.bench_meta, "interrupted": False, "duration_s": 0.0,
            "python": common.python_info()}
    if not CUDA:
        ctx.notes.append("CPU run: GPU kernels need CUDA; CPU timings are of the torch path only "
                         "(the Triton kernels run in the interpreter under make test, never timed)")

    done: list[dict] = []
    current: list[dict] = []

    def checkpoint(records):
        current[:] = records
        meta["duration_s"] = ctx.elapsed()
        common.write_results(path_base, meta, common.finalize(done + list(records), meta["ceilings"]))

    ctx.checkpoint = checkpoint
    failed_benches = []
    try:
        ctx.log("measuring ceilings (copy bandwidth, dense matmul, int8 matmul)")
        meta["ceilings"] = ctx.ceilings = common.measure_ceilings(ctx)
        c = ctx.ceilings
        mm = ", ".join(f"{k} {v:.1f} TFLOP/s" if v >= 1 else f"{k} {v * 1e3:.0f} GFLOP/s"
                       for k, v in (c.get("matmul_tflops") or {}).items())
        ctx.log(f"ceilings: copy {common._f(c.get('copy_gbps'), '.0f')} GB/s; matmul {mm or '-'}"
                + (f"; int8 {c['int8_tops']:.1f} TOP/s" if (c.get("int8_tops") or 0) >= 1
                   else f"; int8 {c['int8_tops'] * 1e3:.0f} GOP/s" if c.get("int8_tops") else "")
                + (f"; {c['error']}" if c.get("error") else "")
                + (f"; {c['int8_error']}" if c.get("int8_error") else ""))
        for i, name in enumerate(args.names):
            if ctx.budget_s is not None:  # each bench gets an equal share of what is left
                ctx.bench_end_s = None
                ctx.bench_end_s = ctx.elapsed() + ctx.time_left() / (len(args.names) - i)
            ctx.log(f"== {name} ({BENCHES[name]}.py)")
            current.clear()
            try:
                mod = importlib.import_module(BENCHES[name])
                recs = mod.run(ctx)
                done.extend(recs)
            except common.Interrupted:
                raise
            except Exception as exc:
                traceback.print_exc()
                failed_benches.append(name)
                done.extend(current)
                done.append(common.error_record(name, name, f"bench {name} crashed",
                                                f"failed: {common.short_error(exc)}"))
            current.clear()
    except (common.Interrupted, KeyboardInterrupt) as exc:
        meta["interrupted"] = True
        done.extend(current)
        print(f"\nINTERRUPTED ({exc or 'keyboard'}): writing what was measured", flush=True)
        ctx.notes.append(f"run interrupted ({exc or 'keyboard'}); results are partial")

    meta["duration_s"] = ctx.elapsed()
    records = common.finalize(done, meta["ceilings"])
    jpath, mpath = common.write_results(path_base, meta, records)
    written = [jpath, mpath]
    if not args.no_plot:
        try:
            import plot
            png = plot.plot_results(jpath, path_base + ".png")
            if png:
                written.append(png)
        except Exception as exc:
            print(f"(plot skipped: {common.short_error(exc)})")

    wrong = [r for r in records if r.get("kind") == "timing" and r.get("ok") is False]
    print("\n" + "=" * 100)
    print(f"Results ({'GPU: ' + gpu_name if CUDA else f'CPU, {torch.get_num_threads()} threads'})")
    print(common.correctness_line(records))
    for r in records:
        if r.get("kind") == "error":
            print(f"  DID NOT RUN {r['bench']} {r['op']} {r['what']}: {r['error']}")
    for r in wrong:
        print(f"  WRONG OUTPUT {r['impl']} {r['mode']} {r['shape_str']}: {r.get('note')}")
    if not CUDA:
        det = common.detail_rows(records)
        if det:
            print("\nCPU timings: medians (min-max over the repeats); ratios against the same run's baselines, "
                  "with the range the spreads allow:")
            cols = (0, 1, 2, 3, 9, 10, 11)
            print(common.text_table(*common.drop_empty_columns([common.DETAIL_HEADERS[i] for i in cols],
                                                               [[row[i] for i in cols] for row in det])))
    summ = common.summary_rows(records)
    if summ:
        print("\nSummary (x base = ms / base ms, lower is better; vs unfused/peer = their ms / ours, higher "
              "is better):")
        print(common.text_table(*common.drop_empty_columns(common.SUMMARY_HEADERS, summ)))
    if not CUDA:
        print("\nNo CUDA GPU here: these are the torch path's CPU timings; the GPU kernels and their targets "
              "need `make bench` on a GPU.")
    print("\nwrote: " + ", ".join(_show(p) for p in written))
    print(f"total {ctx.elapsed():.0f} s" + ("  (INTERRUPTED: partial results)" if meta["interrupted"] else ""))
    if meta["interrupted"]:
        return 2
    return 1 if (wrong or failed_benches) else 0


def _show(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


if __name__ == "__main__":
    sys.exit(main())
