"""Shared machinery for fastpeft's benchmarks: device, ceilings, timing, records, writers.

A benchmark module (``bench_<name>.py``) exposes ``run(ctx) -> list[dict]`` and returns
records built by ``timing_record`` / ``check_record``. The runner (``run.py``) turns them
into ratios (``finalize``), a JSON file, a markdown report and a plot.

Nothing here imports triton at module level: on a CPU-only machine the runner sets
TRITON_INTERPRET=1 before the first triton import, and that must stay possible.

Record schema (one dict per measurement; see benchmarks/README.md):
  kind       "timing" | "check"
  bench, op  benchmark module name ("lora") and op ("lora_linear")
  mode       "fwd" | "fwdbwd" (or anything a bench defines)
  shape      dict, e.g. {"M": 2048, "K": 4096, "N": 4096, "r": 16}; shape_str its text
  dtype      "bf16" | "fp16" | "fp32"
  impl       "base" | "unfused" | "peft" | "fastpeft[...]"
  role       "base" | "unfused" | "peer" | "variant" | "auto" (the one the summary shows)
  ms         median milliseconds (None when it did not run; see error)
  timing     "cudagraph" | "do_bench" | "perf_counter"; ms_eager: do_bench without graphs
  flops, bytes; tflops, gbps, sol (fraction of the roofline from the measured ceilings;
             peak: which ceiling the FLOPs/OPs run at, default the dtype; "int8" = int8_tops)
  ratio_vs_base       ms / ms(base)          (<= 1.05 means "at most 5% slower than base")
  speedup_vs_unfused  ms(unfused) / ms       (>= 1.25 means "25% faster than PEFT's way")
  speedup_vs_peer     ms(peer) / ms
  target, meets       the target text and whether it was met (None: no target / not measured)
  error               why it has no number (not installed, failed, skipped)
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2, "fp64": 1e-12}
GRAPH_BELOW_MS = 0.05   # a shape whose base op runs faster than this is timed in CUDA graphs


class Interrupted(Exception):
    """Raised from the SIGTERM handler so the runner can still write what it has."""


# ---------------------------------------------------------------------------------------------
# device


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def _version(dist: str) -> str:
    """Installed version of a distribution, without importing it (importing is the bench's job)."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except Exception as exc:  # missing or broken: say which
        return f"not installed ({type(exc).__name__}: {exc})"


def environment() -> dict:
    """Versions and device facts recorded in every results file."""
    env = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": _version("triton"), "peft": _version("peft"),
        "transformers": _version("transformers"), "bitsandbytes": _version("bitsandbytes"),
        "matplotlib": _version("matplotlib"),
        "numpy": _version("numpy"), "cpu_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "FASTPEFT_AUTOTUNE", "FASTPEFT_BACKEND",
                                            "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    try:
        import fastpeft
        env["fastpeft"] = fastpeft.__version__
        from fastpeft import _backend
        ok, why = _backend.cuda_ext_status()
        env["fastpeft_C"] = "importable" if ok else why
    except Exception as exc:
        env["fastpeft"] = f"import failed: {type(exc).__name__}: {exc}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                      "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                      "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None}
    return env


def l2_bytes() -> int:
    if torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        if size:
            return int(size)
    return 60 * 2**20


# ---------------------------------------------------------------------------------------------
# the context handed to every bench


@dataclass
class Context:
    cuda: bool
    quick: bool = False
    budget_s: float | None = None          # stop starting new shapes after this many seconds
    start: float = field(default_factory=time.monotonic)
    ceilings: dict = field(default_factory=dict)
    checkpoint: Callable[[list], None] | None = None   # saves partial results (set by the runner)
    notes: list = field(default_factory=list)
    interrupted: bool = False                           # set by the runner's SIGTERM handler
    bench_meta: dict = field(default_factory=dict)      # per-bench facts for the results' meta

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.cuda else "cpu")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    bench_end_s: float | None = None        # the current bench's share of the budget ends here

    def time_left(self) -> float:
        if self.budget_s is None:
            return math.inf
        left = self.budget_s - self.elapsed()
        return left if self.bench_end_s is None else min(left, self.bench_end_s - self.elapsed())

    def log(self, msg: str = "", end: str = "\n") -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}" if msg else "", end=end, flush=True)

    def save_partial(self, records: list) -> None:
        if self.checkpoint is not None:
            try:
                self.checkpoint(records)
            except Exception as exc:  # a failed checkpoint must not stop the run
                print(f"  (could not save partial results: {exc})", flush=True)

    # timing parameters: modest, so the whole suite fits its budget on the H200
    @property
    def warmup_ms(self) -> int:
        return 5 if self.quick else 10

    @property
    def rep_ms(self) -> int:
        return 15 if self.quick else 40


# ---------------------------------------------------------------------------------------------
# timing


def do_bench_ms(fn: Callable[[], Any], ctx: Context, grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median of triton.testing.do_bench (it flushes L2 before every call)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=ctx.warmup_ms, rep=ctx.rep_ms, grad_to_none=grad_to_none,
                          return_mode="median"))


def cudagraph_ms(fn: Callable[[], Any], ctx: Context, grad_to_none: Sequence[torch.Tensor] | None = None,
                 replays: int = 10) -> float:
    """Median per-call time of ``fn`` replayed from one CUDA graph holding n calls.

    No L2 flush: callers rotate their inputs (several weight copies) so that each call
    reads from HBM, as a model stepping through its layers does.
    """
    target_ms = 2.0 if ctx.quick else 5.0

    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()

    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            call()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        n = int(min(256, max(4, target_ms / estimate)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                call()
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / n)
    del graph
    torch.cuda.current_stream().wait_stream(stream)
    return float(statistics.median(times))


def cpu_ms(fn: Callable[[], Any], ctx: Context, min_time_s: float | None = None, max_reps: int = 50) -> float:
    """Median wall-clock milliseconds of ``fn`` on the CPU (time.perf_counter)."""
    min_time_s = (0.15 if ctx.quick else 0.4) if min_time_s is None else min_time_s
    fn()
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


@dataclass
class Measured:
    ms: float | None = None
    ms_eager: float | None = None
    timing: str | None = None
    warmup_s: float | None = None
    error: str | None = None


def run_check(ctx: "Context", records: list[dict], bench: str, op: str, name: str, dname: str,
              results: Callable[[], Iterable[tuple]]) -> list[dict]:
    """One correctness case of a CPU run: ``results()`` yields (quantity, out, ref) or
    (quantity, out, ref, tol) (tol None: the dtype's ``TOL``); a failure gives one failed record.
    Appends the check records to ``records``, logs a PASS / FAIL line, returns the records."""
    t0 = time.perf_counter()
    tol = TOL[dname]
    try:
        recs = [check_record(bench, op, name, dname, q, rel_err(out, ref), tol if not t or t[0] is None else t[0])
                for q, out, ref, *t in results()]
    except Interrupted:
        raise
    except Exception as exc:
        recs = [check_record(bench, op, name, dname, "all", None, tol, error=f"failed: {short_error(exc)}")]
    records += recs
    worst = max((r["rel_err"] for r in recs if r["rel_err"] is not None), default=None)
    bad = ", ".join(r["quantity"] for r in recs if not r["ok"])
    ctx.log(f"  {'PASS' if not bad else 'FAIL'} {name[:76]:<62} {dname}  max rel err {_f(worst, '.1e')} "
            f"(tol {tol:.0e}, {', '.join(r['quantity'] for r in recs)})" + (f"  failing: {bad}" if bad else "")
            + f"  {time.perf_counter() - t0:.1f} s")
    return recs


def budget_spent(ctx: "Context") -> str:
    """The error of a record skipped because the time budget ran out."""
    return f"skipped: time budget ({ctx.budget_s:.0f} s) spent"


def run_shape(ctx: "Context", records: list[dict], measure: Callable[[], list[dict]],
              failed: Callable[[str], list[dict]], describe: Callable[[dict], str],
              head: Callable[[dict], str] = lambda p: p["mode"]) -> float:
    """One GPU benchmark shape: ``measure()`` gives its records; any failure but an interrupt
    (e.g. out of memory) gives ``failed(error)`` instead and the run goes on. Frees the
    allocator cache, appends to ``records``, prints the progress line (``progress_line`` with
    ``describe`` and ``head``), saves the partial results. Returns the seconds the shape took."""
    t0 = time.monotonic()
    try:
        recs = measure()
    except Interrupted:
        raise
    except Exception as exc:  # whole-shape failure: record, go on
        if ctx.interrupted:
            raise Interrupted("signal during a shape") from exc
        recs = failed(f"failed: {short_error(exc)}")
    torch.cuda.empty_cache()
    seconds = time.monotonic() - t0
    records += recs
    print(" " + progress_line(recs, ctx, describe, head) + f"  ({seconds:.1f} s)", flush=True)
    ctx.save_partial(records)
    return seconds


def progress_line(recs: list[dict], ctx: "Context", describe: Callable[[dict], str],
                  head: Callable[[dict], str] = lambda p: p["mode"]) -> str:
    """One line per shape: each fastpeft[auto] record's ``head`` and ``describe(record)`` (or its
    error), with the target verdict."""
    finalize(recs, ctx.ceilings)
    parts = []
    for p in recs:
        if p["role"] != "auto":
            continue
        if p.get("ms") is None:
            parts.append(f"{head(p)}: {p.get('error')}")
            continue
        parts.append(f"{head(p)} {describe(p)}"
                     + ("" if p.get("meets") is None else (" ok" if p["meets"] else " MISS")))
    return " | ".join(parts)


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def measure(fn: Callable[[], Any], ctx: Context, *, graph: bool = False, eager_too: bool = False,
            grad_to_none: Sequence[torch.Tensor] | None = None, warmup_calls: int = 2) -> Measured:
    """Warm ``fn`` up (autotuning and compilation happen here), then time it.

    On the GPU: CUDA graphs when ``graph`` (falling back to do_bench if capture fails),
    and also eager do_bench when ``eager_too``. On the CPU: perf_counter medians.
    Never raises: a failure comes back as ``Measured.error``.
    """
    out = Measured()

    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        return fn()

    try:
        t0 = time.perf_counter()
        for _ in range(warmup_calls):
            call()
        if ctx.cuda:
            torch.cuda.synchronize()
        out.warmup_s = time.perf_counter() - t0
        if not ctx.cuda:
            out.ms, out.timing = cpu_ms(call, ctx), "perf_counter"
            return out
        if graph:
            try:
                out.ms, out.timing = cudagraph_ms(fn, ctx, grad_to_none), "cudagraph"
            except Interrupted:
                raise
            except Exception as exc:
                torch.cuda.synchronize()
                out.timing = f"do_bench (CUDA graph capture failed: {short_error(exc, 160)})"
        if out.ms is None or eager_too:
            eager = do_bench_ms(fn, ctx, grad_to_none)
            out.ms_eager = eager
            if out.ms is None:
                out.ms = eager
                out.timing = out.timing or "do_bench"
    except Interrupted:
        raise
    except Exception as exc:
        if ctx.interrupted:  # the signal landed inside code that turned it into another error
            raise Interrupted("signal during a measurement") from exc
        out.error = f"failed: {short_error(exc)}"
        if os.environ.get("FASTPEFT_BENCH_TRACEBACK"):
            traceback.print_exc()
        if ctx.cuda:
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    return out


def measure_cpu_interleaved(fns: dict, ctx: Context, min_time_s: float | None = None,
                            max_rounds: int = 40) -> dict:
    """CPU timings of several callables taken in alternation (round robin), so that load
    from other processes hits every one of them alike. ``fns``: name -> (fn, grad_to_none).
    Returns name -> Measured (median ms over rounds); a failing fn gets its error."""
    min_time_s = (0.6 if ctx.quick else 2.0) if min_time_s is None else min_time_s
    out: dict = {}
    calls: dict = {}
    for name, (fn, grads) in fns.items():
        def call(fn=fn, grads=grads):
            if grads:
                for t in grads:
                    t.grad = None
            return fn()
        m = Measured(timing="perf_counter (interleaved)")
        try:
            t0 = time.perf_counter()
            call()
            call()
            m.warmup_s = time.perf_counter() - t0
            calls[name] = call
        except Interrupted:
            raise
        except Exception as exc:
            m.error = f"failed: {short_error(exc)}"
        out[name] = m
    times: dict = {name: [] for name in calls}
    t_end = time.perf_counter() + min_time_s
    rounds = 0
    while calls and (rounds < 5 or (time.perf_counter() < t_end and rounds < max_rounds)):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    for name, ts in times.items():
        out[name].ms = float(statistics.median(ts))
    return out


# ---------------------------------------------------------------------------------------------
# ceilings, measured in the same run


def measure_ceilings(ctx: Context) -> dict:
    """Copy bandwidth (read + write bytes), dense matmul throughput on random data and the
    int8 GEMM throughput of torch._int_mm (``int8_tops``, T OP/s)."""
    ceil: dict = {}
    try:
        if ctx.cuda:
            n = 2**28 if not ctx.quick else 2**27  # 1 GiB (0.5 GiB quick) of fp32
            src = torch.randn(n, device="cuda")
            dst = torch.empty_like(src)
            ms = do_bench_ms(lambda: dst.copy_(src), ctx)
            ceil["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
            ceil["copy_note"] = f"device-to-device copy of {src.numel() * 4 / 2**30:.2f} GiB, read+write bytes"
            del src, dst
            s = 8192
            a = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
            ms = do_bench_ms(lambda: torch.mm(a, b), ctx)
            ceil["matmul_tflops"] = {"bf16": 2 * s**3 / ms / 1e9}
            ceil["matmul_note"] = f"torch.mm {s}x{s}x{s} bf16 on randn data"
            del a, b
            torch.cuda.empty_cache()
        else:
            src = torch.randn(2**24)
            dst = torch.empty_like(src)
            ms = cpu_ms(lambda: dst.copy_(src), ctx, min_time_s=0.2)
            ceil["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
            ceil["copy_note"] = "CPU copy of 64 MiB, read+write bytes"
            s = 1024
            a, b = torch.randn(s, s), torch.randn(s, s)
            ms = cpu_ms(lambda: torch.mm(a, b), ctx, min_time_s=0.3)
            ceil["matmul_tflops"] = {"fp32": 2 * s**3 / ms / 1e9}
            ceil["matmul_note"] = f"CPU torch.mm {s}^3 fp32 on randn data, {torch.get_num_threads()} threads"
    except Exception as exc:
        ceil["error"] = f"failed: {short_error(exc)}"
    try:  # int8 tensor-core throughput (TOP/s) for the int8 benches; its failure loses nothing else
        s = 8192 if ctx.cuda else 512
        g = torch.Generator(device=ctx.device).manual_seed(0)
        a = torch.randint(-127, 128, (s, s), generator=g, device=ctx.device, dtype=torch.int8)
        w = torch.randint(-127, 128, (s, s), generator=g, device=ctx.device, dtype=torch.int8)
        bt = w.t()  # column-major second operand, as a linear layer's weight [N, K] gives it
        ms = (do_bench_ms(lambda: torch._int_mm(a, bt), ctx) if ctx.cuda
              else cpu_ms(lambda: torch._int_mm(a, bt), ctx, min_time_s=0.2, max_reps=10))
        ceil["int8_tops"] = 2 * s**3 / ms / 1e9
        ceil["int8_note"] = (f"torch._int_mm {s}x{s}x{s} int8 -> int32 on random codes"
                             + ("" if ctx.cuda else f", CPU, {torch.get_num_threads()} threads"))
        del a, w, bt
        if ctx.cuda:
            torch.cuda.empty_cache()
    except Exception as exc:
        ceil["int8_error"] = f"int8 ceiling failed: {short_error(exc)}"
    return ceil


def peak_of(ceilings: dict, key: str | None) -> float | None:
    """Measured peak (T FLOP/s or T OP/s) for a record's ``peak`` key: a matmul dtype
    (``"bf16"``, ``"fp32"``) or ``"int8"`` (torch._int_mm)."""
    if key == "int8":
        return ceilings.get("int8_tops")
    return (ceilings.get("matmul_tflops") or {}).get(key)


def ideal_compute_ms(r: dict, ceilings: dict) -> float | None:
    """Time of a record's FLOPs at the measured peaks: ``flops_by_peak`` ({peak key: flops},
    for work split across units, e.g. an int8 forward and a bf16 backward) when present,
    else ``flops`` at the peak of ``peak`` (default: the record's dtype)."""
    parts = r.get("flops_by_peak") or {r.get("peak") or r.get("dtype"): r.get("flops")}
    total = 0.0
    for key, f in parts.items():
        p = peak_of(ceilings, key)
        if not f or not p:
            return None
        total += f / (p * 1e9)
    return total


# ---------------------------------------------------------------------------------------------
# records


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def timing_record(bench: str, op: str, mode: str, shape: dict, dtype: str, impl: str, role: str,
                  m: Measured | None = None, *, flops: float | None = None, bytes_: float | None = None,
                  target: dict | None = None, error: str | None = None, **extra) -> dict:
    m = m or Measured()
    rec = {"kind": "timing", "bench": bench, "op": op, "mode": mode, "shape": dict(shape),
           "shape_str": shape_str(shape), "dtype": dtype, "impl": impl, "role": role,
           "ms": m.ms, "ms_eager": m.ms_eager, "timing": m.timing, "warmup_s": m.warmup_s,
           "flops": flops, "bytes": bytes_, "target": target, "error": error or m.error}
    rec.update(extra)
    return rec


def check_record(bench: str, op: str, name: str, dtype: str, quantity: str, rel_err: float | None,
                 tol: float, error: str | None = None, **extra) -> dict:
    ok = rel_err is not None and math.isfinite(rel_err) and rel_err <= tol and error is None
    rec = {"kind": "check", "bench": bench, "op": op, "name": name, "dtype": dtype, "quantity": quantity,
           "rel_err": rel_err, "tol": tol, "ok": ok, "error": error}
    rec.update(extra)
    return rec


def input_leaf(x: torch.Tensor, noncontig: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf requiring grad, the input to pass): a non-contiguous input is every other
    column of a wider leaf."""
    if not noncontig:
        leaf = x.clone().requires_grad_(True)
        return leaf, leaf
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    leaf = wide.requires_grad_(True)
    return leaf, leaf[..., ::2]


def input_grad(leaf: torch.Tensor, noncontig: bool) -> torch.Tensor:
    """The gradient of the input made by ``input_leaf``."""
    return leaf.grad[..., ::2] if noncontig else leaf.grad


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere (or no tensor) gives inf."""
    if out is None or ref is None:
        return math.inf
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return math.inf
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def _group_key(r: dict) -> tuple:
    return (r.get("bench"), r.get("op"), r.get("mode"), r.get("dtype"), r.get("shape_str"))


def _target_text(t: dict | None) -> str:
    if not t:
        return ""
    parts = []
    if "max_ratio_vs_base" in t:
        v = t["max_ratio_vs_base"]
        parts.append(f"<={v:.2f}x base" if v >= 1 else f">={1 / v:.2f}x faster than base")
    if "min_speedup_vs_unfused" in t:
        parts.append(f">={t['min_speedup_vs_unfused']:.2f}x vs unfused")
    if "min_speedup_vs_peer" in t:
        parts.append(f">={t['min_speedup_vs_peer']:.2f}x vs peer")
    if "min_sol" in t:
        parts.append(f">={100 * t['min_sol']:.0f}% of copy bandwidth")
    return ", ".join(parts)


def _speedup(ref: dict | None, r: dict) -> tuple[float | None, str | None]:
    """ms(ref) / ms(r), like with like: when the reference could only be timed eagerly
    (do_bench, e.g. it syncs with the host and cannot be captured) and r was timed in CUDA
    graphs, r's eager time is used; the basis is returned then (None otherwise)."""
    ms = r.get("ms")
    if not ref or not ms:
        return None, None
    if r.get("timing") == "cudagraph" and ref.get("timing") != "cudagraph" and r.get("ms_eager"):
        return ref["ms"] / r["ms_eager"], "eager (the reference was not timed in CUDA graphs)"
    return ref["ms"] / ms, None


def finalize(records: list[dict], ceilings: dict) -> list[dict]:
    """Fill throughput, roofline fraction, ratios against the group's baselines and targets."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("kind") == "timing":
            groups.setdefault(_group_key(r), []).append(r)
    copy_gbps = ceilings.get("copy_gbps")
    for recs in groups.values():
        def ms_of(role):
            for r in recs:
                if r["role"] == role and r.get("ms"):
                    return r["ms"]
            return None
        def rec_of(role):
            return next((r for r in recs if r["role"] == role and r.get("ms")), None)
        base = ms_of("base")
        for r in recs:
            ms = r.get("ms")
            r["tflops"] = r["flops"] / ms / 1e9 if ms and r.get("flops") else None
            r["gbps"] = r["bytes"] / ms / 1e6 if ms and r.get("bytes") else None
            ideal = []
            compute_ms = ideal_compute_ms(r, ceilings) if r["tflops"] else None
            if compute_ms:
                ideal.append(compute_ms)
            if r["gbps"] and copy_gbps:
                ideal.append(r["bytes"] / (copy_gbps * 1e6))
            r["sol"] = max(ideal) / ms if ideal and ms else None
            r["ratio_vs_base"] = ms / base if ms and base else None
            r["speedup_vs_unfused"], basis_u = _speedup(rec_of("unfused"), r)
            r["speedup_vs_peer"], basis_p = _speedup(rec_of("peer"), r)
            for key, basis in (("speedup_vs_unfused_basis", basis_u), ("speedup_vs_peer_basis", basis_p)):
                if basis:
                    r[key] = basis
            t = r.get("target")
            r["target_str"] = _target_text(t)
            meets = None
            if t and ms:
                verdicts = []
                if "max_ratio_vs_base" in t:
                    verdicts.append(None if r["ratio_vs_base"] is None else r["ratio_vs_base"] <= t["max_ratio_vs_base"])
                if "min_speedup_vs_unfused" in t:
                    verdicts.append(None if r["speedup_vs_unfused"] is None
                                    else r["speedup_vs_unfused"] >= t["min_speedup_vs_unfused"])
                if "min_speedup_vs_peer" in t:
                    verdicts.append(None if r["speedup_vs_peer"] is None
                                    else r["speedup_vs_peer"] >= t["min_speedup_vs_peer"])
                if "min_sol" in t:
                    verdicts.append(None if r["sol"] is None else r["sol"] >= t["min_sol"])
                if verdicts and None not in verdicts:
                    meets = all(verdicts)
            r["meets"] = meets
        # which fastpeft variant was fastest in this group (the "auto" record carries it)
        cands = ([r for r in recs if r["role"] == "variant" and r.get("ms")]
                 or [r for r in recs if r["role"] == "auto" and r.get("ms")])
        if cands:
            best = min(cands, key=lambda r: r["ms"])
            for r in recs:
                if r["role"] == "auto":
                    r["fastest"] = best["impl"]
                    r["auto_vs_fastest"] = r["ms"] / best["ms"] if r.get("ms") else None
    return records


# ---------------------------------------------------------------------------------------------
# tables


def _f(v, spec: str = ".3g", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return format(v, spec)
    return str(v)


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if v < 1 else f"{v:.3f}")


def text_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


SUMMARY_HEADERS = ("op", "mode", "shape", "dtype", "base ms", "fastpeft ms", "x base", "vs unfused",
                   "vs peer", "auto picked", "fastest", "target", "meets")


def _sort_key(r: dict) -> tuple:
    s = r.get("shape") or {}
    return (r.get("bench") or "", r.get("op") or "", r.get("mode") or "",
            tuple(sorted((k, v) for k, v in s.items() if k != "M")), s.get("M", 0))


def _short_impl(impl: str | None) -> str:
    """'fastpeft[triton,split]' -> 'triton,split'."""
    if not impl:
        return "-"
    m = re.fullmatch(r"fastpeft\[(.*)\]", impl)
    return m.group(1) if m else impl


def summary_rows(records: list[dict]) -> list[list[str]]:
    """One row per (op, mode, shape): the 'auto' record against its baselines."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("kind") == "timing":
            groups.setdefault(_group_key(r), []).append(r)
    prim = [next((r for r in g if r["role"] == "auto"), None) for g in groups.values()]
    for p in sorted((p for p in prim if p is not None), key=_sort_key):
        base = next((r for r in groups[_group_key(p)] if r["role"] == "base"), {})
        rows.append([p["op"], p["mode"], p["shape_str"], p["dtype"], _ms(base.get("ms")),
                     _ms(p.get("ms")) if p.get("ms") else (p.get("error") or "-")[:40],
                     _f(p.get("ratio_vs_base"), ".3f"), _f(p.get("speedup_vs_unfused"), ".2f"),
                     _f(p.get("speedup_vs_peer"), ".2f"), p.get("picked") or "-",
                     _short_impl(p.get("fastest")), p.get("target_str") or "-", _f(p.get("meets"))])
    return rows


DETAIL_HEADERS = ("shape", "mode", "impl", "ms", "timing", "ms eager", "TFLOP/s", "GB/s", "%SOL",
                  "x base", "vs unfused", "rel err", "target", "meets", "note")


def detail_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in sorted((r for r in records if r.get("kind") == "timing"), key=_sort_key):
        timing = r.get("timing") or "-"
        rows.append([r["shape_str"], r["mode"], r["impl"], _ms(r.get("ms")),
                     "graph" if timing == "cudagraph" else timing, _ms(r.get("ms_eager")),
                     _f(r.get("tflops"), ".3g"), _f(r.get("gbps"), ".3g"),
                     _f(None if r.get("sol") is None else 100 * r["sol"], ".0f"),
                     _f(r.get("ratio_vs_base"), ".3f"), _f(r.get("speedup_vs_unfused"), ".2f"),
                     _f(r.get("rel_err"), ".1e"), r.get("target_str") or "", _f(r.get("meets"), none=""),
                     (r.get("error") or r.get("note") or "")[:120]])
    return rows


CHECK_HEADERS = ("op", "check", "dtype", "quantity", "rel err", "tol", "ok")


def check_rows(records: list[dict]) -> list[list[str]]:
    return [[r["op"], r["name"], r["dtype"], r["quantity"], _f(r.get("rel_err"), ".2e"), _f(r["tol"], ".0e"),
             ("PASS" if r["ok"] else "FAIL") + (f" ({r['error']})" if r.get("error") else "")]
            for r in records if r.get("kind") == "check"]


def markdown(meta: dict, records: list[dict]) -> str:
    env, ceil = meta.get("environment", {}), meta.get("ceilings", {})
    gpu = env.get("gpu", {}).get("name") if env.get("gpu") else None
    lines = [f"# fastpeft benchmarks: {meta.get('stamp')}", "",
             f"- device: {gpu or 'CPU (no CUDA GPU)'}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"triton {env.get('triton')}, peft {env.get('peft')}, python {env.get('python')}",
             f"- fastpeft {env.get('fastpeft')}; fastpeft._C: {env.get('fastpeft_C')}; "
             f"env: {env.get('env')}"]
    if ceil:
        mm = ceil.get("matmul_tflops") or {}
        lines.append(f"- measured ceilings: copy {_f(ceil.get('copy_gbps'), '.0f')} GB/s "
                     f"({ceil.get('copy_note', '')}); matmul "
                     + ", ".join(f"{k} {v:.0f} TFLOP/s" if v >= 10 else f"{k} {v * 1e3:.0f} GFLOP/s"
                                 for k, v in mm.items())
                     + f" ({ceil.get('matmul_note', '')})"
                     + (f"; int8 {_f(ceil['int8_tops'], '.4g')} TOP/s ({ceil.get('int8_note', '')})"
                        if ceil.get("int8_tops") else "")
                     + (f"; {ceil['error']}" if ceil.get("error") else "")
                     + (f"; {ceil['int8_error']}" if ceil.get("int8_error") else ""))
    lines.append(f"- run took {meta.get('duration_s', 0):.0f} s" + ("; INTERRUPTED" if meta.get("interrupted") else ""))
    for n in meta.get("notes", []):
        lines.append(f"- {n}")
    lines += ["", "Ratios: `x base` = ms / ms(base op), lower is better; `vs unfused` / `vs peer` = "
              "ms(unfused PyTorch way / PEFT's layer) / ms, higher is better. See benchmarks/README.md.", ""]
    summ = summary_rows(records)
    if summ:
        lines += ["## Summary", "", md_table(SUMMARY_HEADERS, summ), ""]
    checks = check_rows(records)
    if checks:
        n_ok = sum(1 for r in records if r.get("kind") == "check" and r["ok"])
        lines += ["## Correctness checks", "", f"{n_ok}/{len(checks)} passed", "",
                  md_table(CHECK_HEADERS, checks), ""]
    det = detail_rows(records)
    if det:
        lines += ["## Details", "", md_table(DETAIL_HEADERS, det), ""]
    extra = meta.get("bench_meta") or {}
    if extra:
        lines += ["## Bench notes", ""]
        for k, v in extra.items():
            lines.append(f"- {k}: {json.dumps(v, default=str)}")
        lines.append("")
    return "\n".join(lines)


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def write_results(path_base: str, meta: dict, records: list[dict]) -> tuple[str, str]:
    """Write <path_base>.json and <path_base>.md; return their paths."""
    os.makedirs(os.path.dirname(path_base) or ".", exist_ok=True)
    jpath, mpath = path_base + ".json", path_base + ".md"
    tmp = jpath + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable({"meta": meta, "records": records}), f, indent=1)
    os.replace(tmp, jpath)
    with open(mpath, "w") as f:
        f.write(markdown(meta, records))
    return jpath, mpath


def python_info() -> str:
    return f"{sys.executable} (python {platform.python_version()})"
