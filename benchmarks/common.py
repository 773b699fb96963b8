"""Shared machinery for fastpeft's benchmarks: device, ceilings, timing, records, writers.

A benchmark module (``bench_<name>.py``) exposes ``run(ctx) -> list[dict]`` and returns
records built by ``timing_record`` (most through ``time_impls``, the one implementation loop)
or ``error_record``. The runner (``run.py``) turns them into ratios (``finalize``), a JSON
file, a markdown report and a plot. Timers: ``triton.testing.do_bench`` /
``do_bench_cudagraph`` on the GPU, ``torch.utils.benchmark.Timer`` on the CPU. Correctness is
tests/'s: the output checks of timed calls use its ``rel_err`` and ``TOL`` (tests/_utils.py).

Nothing here imports triton at module level: on a CPU-only machine the runner sets
TRITON_INTERPRET=1 before the first triton import, and that must stay possible.

Record schema (one dict per measurement; see benchmarks/README.md):
  kind       "timing" | "error" (a bench or case that could not run: bench, op, what, error)
  bench, op  benchmark module name ("lora") and op ("lora_linear")
  mode       "fwd" | "fwdbwd" (or anything a bench defines)
  shape      dict, e.g. {"M": 2048, "K": 4096, "N": 4096, "r": 16}; shape_str its text
  dtype      "bf16" | "fp16" | "fp32"
  impl       "base" | "unfused" | "peft" | "fastpeft[...]"
  role       "base" | "unfused" | "peer" | "variant" | "auto" (the one the summary shows) | "other"
             (another way to the job, e.g. another weight format: timed, never the "fastest" variant)
  ms         median milliseconds (None when it did not run; see error)
  timing     "cudagraph" | "do_bench" | "torch.utils.benchmark"; ms_eager: do_bench without graphs
  flops, bytes; tflops, gbps, sol (fraction of the roofline from the measured ceilings;
             peak: which ceiling the FLOPs/OPs run at, default the dtype; "int8" = int8_tops)
  ratio_vs_base       ms / ms(base)          (<= 1.05 means "at most 5% slower than base")
  speedup_vs_unfused  ms(unfused) / ms       (>= 1.25 means "25% faster than PEFT's way")
  speedup_vs_peer     ms(peer) / ms
  target, meets       the target text and whether it was met (None: no target / not measured)
  rel_err, rel_errs, ok  the output check of a timed call (largest relative error, per quantity,
                      within the tests' tolerance for the dtype)
  error               why it has no number (not installed, failed, skipped)
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
import math
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from _utils import TOL, rel_err  # noqa: E402  (the tests' output checks: one copy)


class _DropBnbHubWarning(logging.Filter):
    """bitsandbytes warns, when its CPU backend loads on a machine that cannot fetch its optional
    4-bit GEMM from the kernels hub (offline), that the hub kernel is unavailable: the benches use
    none of its 4-bit ops, so the line is noise in a bench log. Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBnbHubWarning())

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
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


PEERS = ("peft", "bitsandbytes")  # the peers the benches compare against


def peers_line() -> str:
    """Which peer libraries this run can compare against, with their versions."""
    parts = []
    for dist in PEERS:
        v = _version(dist)
        parts.append(f"{dist} {v}" if not v.startswith("not installed") else f"{dist} absent")
    return "Peers: " + ", ".join(parts) + "."


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


# The L2 size assumed when the device does not report it (or on the CPU, where the GPU benches'
# input rotation is not used): above the H100's and H200's 50 MiB, so it errs on more copies.
FALLBACK_L2_BYTES = 64 * 2**20


def l2_bytes() -> int:
    if torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        if size:
            return int(size)
    return FALLBACK_L2_BYTES


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

    device_type: str | None = None  # where the inputs live; default "cuda" when cuda, else "cpu"

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type or ("cuda" if self.cuda else "cpu"))

    def sync(self, quiet: bool = False) -> None:
        """Wait for the GPU (``quiet``: ignore its errors, e.g. after a failed call)."""
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception:
                if not quiet:
                    raise

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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

    @property
    def graph_rep_ms(self) -> int:  # the calls one CUDA graph holds: about this many milliseconds
        return 2 if self.quick else 5


# ---------------------------------------------------------------------------------------------
# timing: the standard timers (triton.testing on the GPU, torch.utils.benchmark on the CPU)


@dataclass
class Measured:
    ms: float | None = None
    ms_eager: float | None = None
    timing: str | None = None
    warmup_s: float | None = None
    error: str | None = None
    eager_error: str | None = None  # the eager timing of a graph-timed call failed (ms stands)
    ms_min: float | None = None     # the spread: fastest and slowest of the repeats (CPU: of the
    ms_max: float | None = None     # CPU_ROUNDS rounds' medians)


def _reset(grads: Sequence[torch.Tensor] | None) -> None:
    for t in grads or ():
        t.grad = None


def gpu_ms(fn: Callable[[], Any], ctx: Context, *, graph: bool = False,
           grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median milliseconds of one ``fn()`` on the GPU: ``triton.testing.do_bench`` (it flushes L2
    before every call), or ``triton.testing.do_bench_cudagraph`` (the calls replayed from one CUDA
    graph, no L2 flush: callers rotate their inputs over copies so that each call reads HBM, as a
    model stepping through its layers does)."""
    from triton.testing import do_bench, do_bench_cudagraph
    if graph:
        return float(do_bench_cudagraph(fn, rep=ctx.graph_rep_ms, grad_to_none=grad_to_none, return_mode="median"))
    return float(do_bench(fn, warmup=ctx.warmup_ms, rep=ctx.rep_ms, grad_to_none=grad_to_none,
                          return_mode="median"))


def cpu_stats(fns: dict[str, Callable[[], Any]], ctx: Context,
              min_time_s: float | None = None) -> dict[str, tuple[float, float, float]]:
    """Milliseconds of each callable on the CPU (``torch.utils.benchmark.Timer``, at the current
    thread count) as (median, min, max): ``CPU_ROUNDS`` blocked_autorange rounds each, taken in
    alternation so that load from other processes hits every callable alike; the median of all
    the rounds' blocks merged, and the spread of the rounds' medians."""
    from torch.utils.benchmark import Measurement, Timer
    min_time_s = (0.6 if ctx.quick else 2.0) if min_time_s is None else min_time_s
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}, label=name, num_threads=torch.get_num_threads())
              for name, fn in fns.items()}
    runs: dict[str, list] = {name: [] for name in timers}
    for _ in range(CPU_ROUNDS):
        for name, timer in timers.items():
            runs[name].append(timer.blocked_autorange(min_run_time=min_time_s / CPU_ROUNDS / max(1, len(timers))))
    return {name: (Measurement.merge(ms)[0].median * 1e3, min(m.median for m in ms) * 1e3,
                   max(m.median for m in ms) * 1e3) for name, ms in runs.items()}


def cpu_ms(fns: dict[str, Callable[[], Any]], ctx: Context, min_time_s: float | None = None) -> dict[str, float]:
    """The medians of ``cpu_stats``."""
    return {name: st[0] for name, st in cpu_stats(fns, ctx, min_time_s).items()}


CPU_ROUNDS = 5  # alternation rounds of cpu_ms


def _failed(ctx: Context, exc: Exception) -> str:
    if ctx.interrupted:  # the signal landed inside code that turned it into another error
        raise Interrupted("signal during a measurement") from exc
    if os.environ.get("FASTPEFT_BENCH_TRACEBACK"):
        traceback.print_exc()
    ctx.sync(quiet=True)
    return f"failed: {short_error(exc)}"


def _warm(fn: Callable[[], Any], ctx: Context, grads, calls: int = 2) -> float:
    """Call ``fn`` (autotuning and compilation happen here); the seconds it took."""
    t0 = time.perf_counter()
    for _ in range(calls):
        _reset(grads)
        fn()
    ctx.sync()
    return time.perf_counter() - t0


def measure(fn: Callable[[], Any], ctx: Context, *, graph: bool = False, eager_too: bool = False,
            grad_to_none: Sequence[torch.Tensor] | None = None) -> Measured:
    """Warm ``fn`` up, then time it. On the GPU: in a CUDA graph when ``graph`` (do_bench if the
    capture fails), eagerly too when ``eager_too`` (``ms_eager``). On the CPU: ``cpu_ms``.
    Never raises (but for an interrupt): a failure comes back as ``Measured.error``."""
    if not ctx.cuda:
        return measure_together({"fn": (fn, grad_to_none)}, ctx)["fn"]
    out = Measured()
    try:
        out.warmup_s = _warm(fn, ctx, grad_to_none)
        if graph:
            try:
                out.ms, out.timing = gpu_ms(fn, ctx, graph=True, grad_to_none=grad_to_none), "cudagraph"
            except Interrupted:
                raise
            except Exception as exc:
                if ctx.interrupted:
                    raise Interrupted("signal during a CUDA graph capture") from exc
                ctx.sync(quiet=True)
                out.timing = f"do_bench (CUDA graph capture failed: {short_error(exc, 160)})"
        if out.ms is None:
            out.ms = out.ms_eager = gpu_ms(fn, ctx, grad_to_none=grad_to_none)
            out.timing = out.timing or "do_bench"
        elif eager_too:
            try:
                out.ms_eager = gpu_ms(fn, ctx, grad_to_none=grad_to_none)
            except Interrupted:
                raise
            except Exception as exc:
                out.eager_error = _failed(ctx, exc)
    except Interrupted:
        raise
    except Exception as exc:
        out.error = _failed(ctx, exc)
    return out


def measure_together(fns: dict[str, tuple[Callable[[], Any], Sequence[torch.Tensor] | None]],
                     ctx: Context) -> dict[str, Measured]:
    """CPU timings of several callables in alternation (``cpu_ms``); ``fns``: name -> (fn, the
    leaves whose .grad each call sets, reset before each call). A failing fn gets its error."""
    out: dict[str, Measured] = {}
    calls: dict[str, Callable[[], Any]] = {}
    for name, (fn, grads) in fns.items():
        def call(fn=fn, grads=grads):
            _reset(grads)
            return fn()
        out[name] = m = Measured(timing="torch.utils.benchmark")
        try:
            m.warmup_s = _warm(call, ctx, None)
            calls[name] = call
        except Interrupted:
            raise
        except Exception as exc:
            m.error = _failed(ctx, exc)
    try:
        for name, (ms, lo, hi) in cpu_stats(calls, ctx).items():
            out[name].ms, out[name].ms_min, out[name].ms_max = ms, lo, hi
    except Interrupted:
        raise
    except Exception as exc:
        error = _failed(ctx, exc)
        for name in calls:
            out[name].error = error
    return out


# ---------------------------------------------------------------------------------------------
# the implementation loop: every bench times its implementations of one mode of one shape here


@dataclass
class Impl:
    """One implementation of an op, timed in one mode of one shape.

    ``fn(inputs)`` makes one call on one input set (for forward+backward it runs the backward
    too and returns the output); without ``grads`` it runs under torch.no_grad.
    """
    name: str                                   # "base", "unfused", "peft", "fastpeft[triton]", ...
    role: str                                   # "base" | "unfused" | "peer" | "variant" | "auto" | "other"
    fn: Callable[[Any], Any] | None = None
    error: str | None = None                    # why it cannot run here (recorded instead of a time)
    grads: Callable[[Any], list] | None = None  # the leaves whose .grad a call sets, in ``want``'s order
    capturable: bool = True                     # False: it syncs with the host, timed eagerly only
    flops: float | None = None
    bytes: float | None = None
    target: dict | None = None
    extra: dict = field(default_factory=dict)   # more record fields
    check: bool = True                          # False: its output is not compared (e.g. the base op)


def input_copies(set_bytes: int) -> int:
    """Enough copies of an input set that one pass over them is 3x the L2 cache (at most 8)."""
    return int(min(8, max(1, math.ceil(3 * l2_bytes() / max(set_bytes, 1)))))


def rotating(fn: Callable[[Any], Any], sets: Sequence[Any]) -> Callable[[], Any]:
    """``fn`` over the input sets in turn, one per call."""
    it = itertools.cycle(sets)
    return lambda: fn(next(it))


def no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args):
        with torch.no_grad():
            return fn(*args)
    return call


def with_backward(fwd: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    """A forward+backward call: ``fwd(inputs)``, then its backward from ``inputs.dy``; returns y."""
    def call(p):
        y = fwd(p)
        y.backward(p.dy)
        return y
    return call


def use_graphs(ctx: Context, base: Callable[[Any], Any], sets: Sequence[Any]) -> tuple[bool, Measured]:
    """Time the base op (eagerly); CUDA graphs for the whole shape when it runs under
    GRAPH_BELOW_MS (where launch overhead would dominate an eager time). Returns (graphs?, the
    base's measurement)."""
    if not ctx.cuda:  # no graphs on the CPU, and time_impls times the base with the others
        return False, Measured()
    probe = measure(rotating(no_grad(base), sets), ctx)
    return probe.ms is not None and probe.ms < GRAPH_BELOW_MS, probe


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dname: str) -> dict:
    """Record fields of an output check: the relative errors of ``got`` against ``want`` (the
    tests' rel_err), whether the largest is within the tests' tolerance for the dtype."""
    errs = {q: rel_err(got[q], want[q]) for q in want}
    worst = max(errs.values())
    extra = {"rel_err": worst, "rel_errs": errs, "ok": worst <= TOL[DTYPES[dname]]}
    if not extra["ok"]:
        extra["note"] = "WRONG: rel err " + ", ".join(f"{q} {e:.1e}" for q, e in errs.items())
    return extra


def time_impls(ctx: Context, bench: str, op: str, mode: str, shape: dict, dname: str, impls: Sequence[Impl],
               sets: Sequence[Any], *, graph: bool = False, want: dict[str, torch.Tensor] | None = None,
               known: dict[str, Measured] | None = None,
               report: Callable[[Impl, dict[str, torch.Tensor]], dict] | None = None) -> list[dict]:
    """Time each implementation and check its output on ``sets[0]``; one record each.

    GPU: each impl on its own, rotating over ``sets``, in CUDA graphs when ``graph`` (and the
    impl is capturable; then eagerly too). CPU: all impls together (``measure_together``) on
    ``sets[0]``. ``want``: the outputs to compare with: {"y": ...} checks the returned output,
    other keys the gradients of ``impl.grads`` in order. ``known``: measurements made already.
    ``report(impl, outputs)``: more record fields from every impl's outputs (the base's included).
    """
    known = known or {}
    calls = {im.name: (im.fn if im.grads else no_grad(im.fn)) for im in impls if im.error is None}
    leaves = {}
    for im in impls:  # the leaves of every input set, for the timers to reset
        if im.name in calls and im.grads:
            try:
                leaves[im.name] = [t for s in sets for t in im.grads(s)]
            except Exception as exc:
                leaves[im.name] = exc
    if not ctx.cuda:
        p0 = sets[0]
        timed = measure_together({im.name: ((lambda c=calls[im.name]: c(p0)), im.grads(p0) if im.grads else None)
                                  for im in impls if im.name in calls and im.name not in known}, ctx)
    records = []
    for im in impls:
        rec_extra = dict(im.extra)
        if im.error is not None:
            m = Measured(error=im.error)
        elif im.name in known:
            m = known[im.name]
        elif isinstance(leaves.get(im.name), Exception):
            m = Measured(error=f"failed: {short_error(leaves[im.name])}")
        elif ctx.cuda:
            g = graph and im.capturable
            m = measure(rotating(calls[im.name], sets), ctx, graph=g, eager_too=g, grad_to_none=leaves.get(im.name))
        else:
            m = timed[im.name]
        if want and (im.check or report) and m.error is None:
            try:
                outputs = _outputs(im, calls[im.name], sets[0], want)
                if im.check:
                    rec_extra.update(compare(outputs, want, dname))
                if report:
                    rec_extra.update(report(im, outputs))
            except Interrupted:
                raise
            except Exception as exc:  # a check that cannot run is no pass
                rec_extra["note"] = f"check failed: {short_error(exc, 120)}"
                if im.check:
                    rec_extra["ok"] = False
        records.append(timing_record(bench, op, mode, shape, dname, im.name, im.role, m, flops=im.flops,
                                     bytes_=im.bytes, target=im.target, n_input_copies=len(sets), **rec_extra))
    return records


def _outputs(im: Impl, call: Callable[[Any], Any], p, want: dict) -> dict:
    """What ``want`` names of one call on ``p``: "y" the output, the others the gradients."""
    _reset(im.grads(p) if im.grads else None)
    y = call(p)
    out = {"y": y} if "y" in want else {}
    grads = [t.grad for t in im.grads(p)] if im.grads else []
    out.update(zip([q for q in want if q != "y"], grads))
    return out


def run_shapes(ctx: Context, shapes: Sequence[dict], measure_shape: Callable[[dict], list[dict]],
               placeholders: Callable[[dict, str], list[dict]], describe: Callable[[dict], str],
               head: Callable[[dict], str] = lambda p: p["mode"]) -> list[dict]:
    """The shape loop of a GPU bench: stops starting shapes once the time budget cannot cover one
    more like the last one of its M (``placeholders(shape, why)`` stand in for the skipped ones),
    and runs each with ``run_shape``."""
    records: list[dict] = []
    durations: dict = {}
    for i, shape in enumerate(shapes):
        if ctx.interrupted:
            raise Interrupted("signal between shapes")
        key = shape.get("M")
        if ctx.time_left() < durations.get(key, max(durations.values(), default=5.0)):
            records += placeholders(shape, budget_spent(ctx))
            ctx.log(f"[{i + 1:2d}/{len(shapes)}] {shape_str(shape)}: skipped (time budget)")
            continue
        ctx.log(f"[{i + 1:2d}/{len(shapes)}] {shape_str(shape)} ...", end="")
        durations[key] = run_shape(ctx, records, lambda: measure_shape(shape),
                                   lambda err: placeholders(shape, err), describe, head)
    return records


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
    ctx.empty_cache()
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


def log_cpu_timings(ctx: Context, recs: list[dict]) -> None:
    """One log line per (shape, mode) of CPU timing records: each impl's ms and ratio to base."""
    finalize(recs, ctx.ceilings)
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["shape_str"], r["dtype"], r["mode"]), []).append(r)
    for (shape, dname, mode), rs in groups.items():
        line = ", ".join(f"{r['impl']} {_ms(r['ms'])} ms" + (f" ({r['ratio_vs_base']:.2f}x base)"
                                                            if r.get("ratio_vs_base") else "")
                         if r.get("ms") else f"{r['impl']}: {r['error']}" for r in rs)
        ctx.log(f"  {shape} {dname} {mode}: {line}")


def peft_status() -> tuple[bool, str]:
    """Whether PEFT (the peer of the LoRA benches: its LoRA layer and get_peft_model) imports."""
    try:
        import peft
        from peft import LoraConfig, get_peft_model  # noqa: F401
        from peft.tuners.lora import Linear  # noqa: F401
        return True, f"peft {peft.__version__}"
    except Exception as exc:
        return False, f"not installed/failed: {short_error(exc)}"


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# ceilings, measured in the same run


def _time_one(fn: Callable[[], Any], ctx: Context, cpu_s: float) -> float:
    return gpu_ms(fn, ctx) if ctx.cuda else cpu_ms({"fn": fn}, ctx, min_time_s=cpu_s)["fn"]


def _copy_ceiling(ctx: Context) -> dict:
    n = (2**27 if ctx.quick else 2**28) if ctx.cuda else 2**24  # GPU: 1 GiB (0.5 quick) of fp32; CPU 64 MiB
    src = torch.randn(n, device=ctx.device)
    dst = torch.empty_like(src)
    ms = _time_one(lambda: dst.copy_(src), ctx, 0.2)
    where = "device-to-device" if ctx.cuda else "CPU"
    return {"copy_gbps": 2 * n * 4 / ms / 1e6, "copy_note": f"{where} copy of {n * 4 / 2**30:.2f} GiB, read+write bytes"}


def _matmul_ceiling(ctx: Context) -> dict:
    s, dtype = (8192, torch.bfloat16) if ctx.cuda else (1024, torch.float32)
    a = torch.randn(s, s, device=ctx.device, dtype=dtype)
    b = torch.randn(s, s, device=ctx.device, dtype=dtype)
    ms = _time_one(lambda: torch.mm(a, b), ctx, 0.3)
    name = DTYPE_NAMES[dtype]
    where = "" if ctx.cuda else f", CPU, {torch.get_num_threads()} threads"
    return {"matmul_tflops": {name: 2 * s**3 / ms / 1e9}, "matmul_note": f"torch.mm {s}^3 {name} on randn data{where}"}


def _int8_ceiling(ctx: Context) -> dict:
    s = 8192 if ctx.cuda else 512
    g = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randint(-127, 128, (s, s), generator=g, device=ctx.device, dtype=torch.int8)
    bt = torch.randint(-127, 128, (s, s), generator=g, device=ctx.device, dtype=torch.int8).t()
    # bt: a column-major second operand, as a linear layer's weight [N, K] gives it
    ms = _time_one(lambda: torch._int_mm(a, bt), ctx, 0.2)
    where = "" if ctx.cuda else f", CPU, {torch.get_num_threads()} threads"
    return {"int8_tops": 2 * s**3 / ms / 1e9, "int8_note": f"torch._int_mm {s}^3 int8 -> int32 on random codes{where}"}


def measure_ceilings(ctx: Context) -> dict:
    """Copy bandwidth (read + write bytes), dense matmul throughput on random data and the
    int8 GEMM throughput of torch._int_mm (``int8_tops``, T OP/s); a failed one is an error
    entry and loses nothing else."""
    ceil: dict = {}
    for measure_one, key in ((_copy_ceiling, "error"), (_matmul_ceiling, "error"), (_int8_ceiling, "int8_error")):
        try:
            ceil.update(measure_one(ctx))
        except Exception as exc:
            ceil[key] = (ceil.get(key, "") + " " if key in ceil else "") + f"{measure_one.__name__} failed: {short_error(exc)}"
        ctx.empty_cache()
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
           "ms": m.ms, "ms_min": m.ms_min, "ms_max": m.ms_max, "ms_eager": m.ms_eager, "timing": m.timing,
           "warmup_s": m.warmup_s,
           **({"eager_error": m.eager_error} if m.eager_error else {}),
           "flops": flops, "bytes": bytes_, "target": target, "error": error or m.error}
    rec.update(extra)
    return rec


def error_record(bench: str, op: str, what: str, error: str) -> dict:
    """A bench, or a case of one, that could not run (crashed, skipped, unavailable)."""
    return {"kind": "error", "bench": bench, "op": op, "what": what, "error": error}


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


def _graphed(r: dict) -> bool:
    return r.get("timing") == "cudagraph"


def _speedup(ref: dict | None, r: dict) -> tuple[float | None, str | None]:
    """ms(ref) / ms(r), like with like: when only one of them was timed in CUDA graphs (the
    other could only be timed eagerly: it syncs with the host, or its capture failed), the
    graph-timed one's eager time (``ms_eager``) is used; the basis is returned then (None
    otherwise; no ratio when that eager time is missing)."""
    ms = r.get("ms")
    if not ref or not ms or not ref.get("ms"):
        return None, None
    if _graphed(r) == _graphed(ref):
        return ref["ms"] / ms, None
    ref_ms, r_ms = (ref["ms"], r.get("ms_eager")) if _graphed(r) else (ref.get("ms_eager"), ms)
    if not ref_ms or not r_ms:
        return None, None
    return ref_ms / r_ms, "eager (one side could not be timed in CUDA graphs)"


def _speedup_range(ref: dict | None, r: dict) -> tuple[float, float] | None:
    """The range of ms(ref) / ms(r) that the two spreads allow (slowest over fastest, both ways);
    None without spreads, or when one side was timed in CUDA graphs and the other not."""
    if not ref or ref is r or _graphed(r) != _graphed(ref):
        return None
    if not all(x.get(k) for x in (ref, r) for k in ("ms_min", "ms_max")):
        return None
    return ref["ms_min"] / r["ms_max"], ref["ms_max"] / r["ms_min"]


def _comparable_ms(recs: list[dict]) -> dict:
    """id(record) -> the ms to rank ``recs`` by: their ms when all were timed alike, else the
    eager times."""
    if len({_graphed(r) for r in recs}) <= 1:
        return {id(r): r["ms"] for r in recs}
    return {id(r): r.get("ms_eager") or (r["ms"] if not _graphed(r) else math.inf) for r in recs}


def finalize(records: list[dict], ceilings: dict) -> list[dict]:
    """Fill throughput, roofline fraction, ratios against the group's baselines and targets."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("kind") == "timing":
            groups.setdefault(_group_key(r), []).append(r)
    copy_gbps = ceilings.get("copy_gbps")
    for recs in groups.values():
        def rec_of(role):
            return next((r for r in recs if r["role"] == role and r.get("ms")), None)
        base = rec_of("base")
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
            vs_base, basis_b = _speedup(base, r)
            r["ratio_vs_base"] = 1 / vs_base if vs_base else None
            r["speedup_vs_unfused"], basis_u = _speedup(rec_of("unfused"), r)
            r["speedup_vs_peer"], basis_p = _speedup(rec_of("peer"), r)
            rng = _speedup_range(base, r)
            r["ratio_vs_base_range"] = (1 / rng[1], 1 / rng[0]) if rng else None
            r["speedup_vs_unfused_range"] = _speedup_range(rec_of("unfused"), r)
            r["speedup_vs_peer_range"] = _speedup_range(rec_of("peer"), r)
            for key, basis in (("ratio_vs_base_basis", basis_b), ("speedup_vs_unfused_basis", basis_u),
                               ("speedup_vs_peer_basis", basis_p)):
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
        autos = [r for r in recs if r["role"] == "auto" and r.get("ms")]
        if cands:
            rank = _comparable_ms(cands + [r for r in autos if r not in cands])
            best = min(cands, key=lambda r: rank[id(r)])
            for r in recs:
                if r["role"] == "auto":
                    r["fastest"] = best["impl"]
                    r["auto_vs_fastest"] = (rank[id(r)] / rank[id(best)] if r.get("ms") and rank[id(best)]
                                            and math.isfinite(rank[id(r)]) else None)
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


def _ms_spread(r: dict) -> str:
    """'median (min-max)' of a record's milliseconds; the median alone without a spread."""
    if r.get("ms") is None:
        return "-"
    lo, hi = r.get("ms_min"), r.get("ms_max")
    return _ms(r["ms"]) + (f" ({_ms(lo)}-{_ms(hi)})" if lo is not None and hi is not None else "")


def _ratio(r: dict, key: str, spec: str) -> str:
    """A ratio, with the range its two spreads allow when there is one: '1.22 (0.95-1.60)'."""
    v, rng = r.get(key), r.get(key + "_range")
    if v is None:
        return "-"
    return _f(v, spec) + (f" ({format(rng[0], spec)}-{format(rng[1], spec)})" if rng else "")


def drop_empty_columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """The table without the columns that no row fills (every cell '-' or empty)."""
    rows = [list(map(str, r)) for r in rows]
    keep = [i for i in range(len(headers)) if any(r[i] not in ("-", "") for r in rows)] if rows else list(range(len(headers)))
    return [headers[i] for i in keep], [[r[i] for i in keep] for r in rows]


def correctness(records: list[dict]) -> tuple[int, int, int]:
    """(checked, wrong, unchecked) over the timed outputs that are not the base op's."""
    timed = [r for r in records if r.get("kind") == "timing" and r.get("role") != "base" and r.get("ms")]
    checked = [r for r in timed if r.get("ok") is not None]
    return len(checked), sum(r["ok"] is False for r in checked), len(timed) - len(checked)


def correctness_line(records: list[dict]) -> str:
    checked, wrong, unchecked = correctness(records)
    if not checked:
        return "Correctness: no timed output was checked"
    head = (f"Correctness: {checked - wrong}/{checked} timed outputs match their reference" if not wrong
            else f"Correctness: {wrong} of {checked} timed outputs are WRONG (see WRONG OUTPUTS)")
    return head + (" (float64 / fp32 computations, the tests' tolerances)"
                   + (f"; {unchecked} timed without a check" if unchecked else ""))


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
        rows.append([p["op"], p["mode"], p["shape_str"], p["dtype"], _ms_spread(base),
                     _ms_spread(p) if p.get("ms") else (p.get("error") or "-")[:40],
                     _ratio(p, "ratio_vs_base", ".3f"), _ratio(p, "speedup_vs_unfused", ".2f"),
                     _ratio(p, "speedup_vs_peer", ".2f"), p.get("picked") or "-",
                     _short_impl(p.get("fastest")), p.get("target_str") or "-", _f(p.get("meets"))])
    return rows


DETAIL_HEADERS = ("shape", "mode", "impl", "ms", "timing", "ms eager", "TFLOP/s", "GB/s", "%SOL",
                  "x base", "vs unfused", "rel err", "target", "meets", "note")


def detail_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in sorted((r for r in records if r.get("kind") == "timing"), key=_sort_key):
        timing = r.get("timing") or "-"
        rows.append([r["shape_str"], r["mode"], r["impl"], _ms_spread(r),
                     "graph" if timing == "cudagraph" else timing, _ms(r.get("ms_eager")),
                     _f(r.get("tflops"), ".3g"), _f(r.get("gbps"), ".3g"),
                     _f(None if r.get("sol") is None else 100 * r["sol"], ".0f"),
                     _ratio(r, "ratio_vs_base", ".3f"), _ratio(r, "speedup_vs_unfused", ".2f"),
                     _f(r.get("rel_err"), ".1e"), r.get("target_str") or "", _f(r.get("meets"), none=""),
                     (r.get("error") or r.get("note") or "")[:120]])
    return rows


def error_rows(records: list[dict]) -> list[list[str]]:
    return [[r["bench"], r["op"], r["what"], r["error"]] for r in records if r.get("kind") == "error"]


CPU_SCOPE = (
    "What a CPU run measures: the torch path of each op (what fastpeft runs on a CPU) against the "
    "unfused PyTorch way and the peers installed here (PEFT's layers, bitsandbytes), timed together "
    "in one run, in alternation, at this machine's thread count; every timed output is checked "
    "against a float64 / fp32 computation. What it cannot measure: the GPU kernels (compiled Triton, "
    "CUDA C++ fastpeft._C) and so the GPU targets (`make bench` on a GPU), and the roofline "
    "fractions. The Triton kernels' correctness on the CPU (in Triton's interpreter) is `make test`'s.")


def markdown(meta: dict, records: list[dict]) -> str:
    env, ceil = meta.get("environment", {}), meta.get("ceilings", {})
    gpu = env.get("gpu", {}).get("name") if env.get("gpu") else None
    lines = [f"# fastpeft benchmarks: {meta.get('stamp')}", "", f"**{correctness_line(records)}**", ""]
    if not gpu:
        lines += [CPU_SCOPE, ""]
    lines += [f"- device: {gpu or 'CPU (no CUDA GPU)'}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
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
              "ms(unfused PyTorch way / PEFT's layer) / ms, higher is better. See benchmarks/README.md."
              + (" Times are medians, with the spread (min-max over the repeats) in parentheses; a ratio's "
                 "parentheses give the range that the two spreads allow." if not gpu else ""), ""]
    summ = summary_rows(records)
    if summ:
        lines += ["## Summary", "", md_table(*drop_empty_columns(SUMMARY_HEADERS, summ)), ""]
    wrong = [r for r in records if r.get("kind") == "timing" and r.get("ok") is False]
    if wrong:
        lines += ["## WRONG OUTPUTS", ""] + [f"- {r['impl']} {r['mode']} {r['shape_str']}: {r.get('note')}"
                                             for r in wrong] + [""]
    errors = error_rows(records)
    if errors:
        lines += ["## Did not run", "", md_table(("bench", "op", "what", "why"), errors), ""]
    det = detail_rows(records)
    if det:
        lines += ["## Details", "", md_table(*drop_empty_columns(DETAIL_HEADERS, det)), ""]
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


RESULT_SUFFIXES = (".json", ".md", ".png")


def unique_path_base(out_dir: str, stamp: str) -> str:
    """``out_dir/stamp``, or ``stamp-2``, ``stamp-3``, ...: the first for which no results file
    exists yet, so that a run never overwrites an earlier one."""
    base, n = os.path.join(out_dir, stamp), 1
    while any(os.path.exists(base + sfx) for sfx in RESULT_SUFFIXES):
        n += 1
        base = os.path.join(out_dir, f"{stamp}-{n}")
    return base


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
