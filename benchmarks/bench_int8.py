"""int8 benchmark: LLM.int8() linear layer (fastpeft.int8_linear) against bf16 and the peers.

GPU (bf16 activations, Llama-7B layer shapes 4096->4096, 4096->11008, 11008->4096; M in
{2048, 16, 8192, 1}; thresholds 0 and 6). Per shape and threshold, forward only:
  base          F.linear(x, W) with the original bf16 weight
  int_mm+scale  the PyTorch way: fastpeft.int8_vectorwise_quant(x, t), torch._int_mm(q, w^T)
                (x padded to 32 rows when M <= 16: _int_mm needs more than 16), the
                dequantizing scale as separate elementwise ops and, for t > 0, the outlier
                columns x[:, cols] @ W_deq[:, cols]^T in bf16 added on top
  bnb           bitsandbytes Linear8bitLt(has_fp16_weights=False, threshold=t), when importable
  fastpeft      int8_linear backend "triton", "cuda" (when the backend runs), and auto (the
                summary row)
Every int8 path quantizes x inside the timed region (the weight is quantized once, outside).
One forward+backward row per (M, K, N) at threshold 6 (Int8Linear's default, what LoRA on
an int8 base trains through): fastpeft auto (x requires grad, dx = dy W_deq) against
F.linear(x, W) + dx = dy @ W in bf16.
Each output is checked against the int8 layer's exact math in float64 (codes and scales
from fastpeft.reference.int8, the int32 product computed exactly in float64) with the bf16
tolerance; a wrong kernel shows as WRONG (bnb, which quantizes W its own way, is not checked
so). Records also carry err_vs_exact, the error against float64 x @ W (quantization error
included), for bf16, bnb and int8 alike.

Targets (issue 3; measured, never asserted): M >= 2048: >= 1.3x faster than base at
threshold 0, >= 1.15x at threshold 6; M <= 16: >= 1.4x faster than base; >= 2x faster
than bitsandbytes (when it is installed). Achieved TOP/s are reported against the int8
ceiling (torch._int_mm) measured in the same run, GB/s against the copy ceiling.

CPU: times the torch path against F.linear, the int_mm way and bnb in fp32 on a small shape
(outputs checked the same way). Correctness of every backend is tests/'s (make test).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import common
from common import timing_record

BENCH, OP = "int8", "int8_linear"
# Order run in (the time budget may cut the tail): one of each target's cases first.
M_PRIORITY = (2048, 16, 8192, 1)
KN_VALUES = ((4096, 4096), (4096, 11008), (11008, 4096))   # (in features K, out features N)
THRESHOLDS = (0.0, 6.0)
FWDBWD_THRESHOLD = 6.0
QUICK = dict(M=(2048, 16), KN=((4096, 4096),))

# inputs: x ~ N(0, 1) clamped to +-5 (so that threshold 6 finds exactly the planted outliers);
# for threshold > 0, about 0.1% of the columns get a few entries of magnitude 8..20
OUTLIER_COL_FRACTION = 1e-3
OUTLIER_ROWS_PER_COL = 4
OUTLIER_MAGNITUDE = (8.0, 20.0)
X_CLAMP = 5.0


def target_for(mode: str, M: int, threshold: float, peer_measured: bool) -> dict | None:
    """Issue 3's targets, as finalize understands them (max_ratio_vs_base < 1 = a speedup)."""
    if mode != "fwd":
        return None
    t: dict = {}
    if M >= 2048:
        t["max_ratio_vs_base"] = 1 / (1.3 if threshold == 0 else 1.15)
    elif M <= 16:
        t["max_ratio_vs_base"] = 1 / 1.4
    if peer_measured:
        t["min_speedup_vs_peer"] = 2.0
    return t or None


def n_outlier_cols(K: int) -> int:
    return max(1, round(OUTLIER_COL_FRACTION * K))


def flops_bytes(mode: str, M: int, K: int, N: int, elt: int, int8: bool, dname: str = "bf16") -> dict:
    """Useful work and minimum HBM bytes of one call, as timing_record keywords."""
    f = 2 * M * N * K
    if not int8:
        b = elt * (M * K + N * K + M * N)
        return {"flops": f * (1 if mode == "fwd" else 2), "bytes_": b if mode == "fwd" else 2 * b}
    fwd_b = elt * M * K + N * K + 4 * N + elt * M * N          # x, int8 W, scales, y
    if mode == "fwd":
        return {"flops": f, "bytes_": fwd_b, "peak": "int8"}
    bwd_b = elt * M * N + N * K + 4 * N + elt * M * K           # dy, int8 W, scales, dx
    return {"flops": 2 * f, "bytes_": fwd_b + bwd_b, "flops_by_peak": {"int8": f, dname: f}}


def run(ctx: common.Context) -> list[dict]:
    return run_gpu(ctx) if ctx.cuda else run_cpu(ctx)


# ---------------------------------------------------------------------------------------------
# shared pieces


def make_x(M: int, K: int, n_out: int, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """[M, K] N(0, 1) clamped to +-X_CLAMP; ``n_out`` random columns get up to
    OUTLIER_ROWS_PER_COL entries of magnitude 8..20 (random signs)."""
    x = torch.randn(M, K, generator=gen, device=device).clamp_(-X_CLAMP, X_CLAMP)
    if n_out:
        cols = torch.randperm(K, generator=gen, device=device)[:n_out]
        r = min(M, OUTLIER_ROWS_PER_COL)
        rows = torch.stack([torch.randperm(M, generator=gen, device=device)[:r] for _ in range(n_out)])
        lo, hi = OUTLIER_MAGNITUDE
        mag = lo + (hi - lo) * torch.rand(n_out, r, generator=gen, device=device)
        sign = torch.where(torch.rand(n_out, r, generator=gen, device=device) < 0.5, -1.0, 1.0)
        x[rows, cols[:, None].expand(-1, r)] = mag * sign
    return x.to(dtype)


def bnb_status(device: torch.device) -> tuple[bool, str]:
    """Whether bitsandbytes' Linear8bitLt runs on ``device`` (tried on a tiny layer)."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        return False, f"not installed/failed: {common.short_error(exc, 200)}"
    try:
        W = torch.randn(32, 64, device=device) / 8
        x = torch.randn(32, 64, device=device)
        x[0, 5] = 10.0
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        for t in THRESHOLDS:
            make_bnb(W.to(dt), t)(x.to(dt))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True, f"bitsandbytes {getattr(bnb, '__version__', '?')}"
    except Exception as exc:
        return False, ("not installed/failed: bitsandbytes imports but Linear8bitLt fails: "
                       f"{common.short_error(exc, 200)}")


def make_bnb(W: torch.Tensor, threshold: float):
    """bitsandbytes Linear8bitLt holding W quantized (its own row absmax, from fp16 W)."""
    import bitsandbytes as bnb
    N, K = W.shape
    layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(W.detach().to("cpu", torch.float16), requires_grad=False,
                                     has_fp16_weights=False)
    return layer.to(W.device)  # moving the fp16 weight off the CPU (or onto it) quantizes it


def probe_backend(name: str, device: torch.device) -> str | None:
    """None when int8_linear(backend=name) runs here (both thresholds), else why not."""
    import fastpeft
    from fastpeft.ops.int8 import quantize_weight
    try:
        w, s = quantize_weight(torch.randn(64, 64, device=device))
        x = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
        x[0, 5] = 10.0
        for t in THRESHOLDS:
            fastpeft.int8_linear(x, w, s, None, t, backend=name)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as exc:
        return f"unavailable: {common.short_error(exc)}"


def auto_choice(device: torch.device) -> str:
    try:
        from fastpeft import _backend
        from fastpeft.ops import int8 as iops
        return _backend.choose(iops.OP, device, iops.KERNELS)
    except Exception as exc:
        return f"unknown ({common.short_error(exc, 80)})"


class Layer:
    """One rotation set: bf16 W, its int8 codes and scales, x per threshold, dy, bnb layers."""

    def __init__(self, M, K, N, dtype, device, seed, thresholds, bnb_thresholds=(), grad_threshold=None):
        from fastpeft.ops.int8 import quantize_weight
        g = torch.Generator(device=device).manual_seed(seed)
        self.W = (torch.randn(N, K, generator=g, device=device) * K ** -0.5).to(dtype)
        self.w, self.ws = quantize_weight(self.W)          # once, outside every timed region
        self.w_t = self.w.t()                              # column-major [K, N] for torch._int_mm
        self.ws_mm = self.ws / 127.0**2                    # the epilogue's weight factor (fp32)
        self.ws_deq = self.ws / 127.0                      # W_deq = w * ws / 127 (fp32), 127: the largest code
        self.x = {t: make_x(M, K, n_outlier_cols(K) if t > 0 else 0, g, device, dtype) for t in thresholds}
        self.dy = self.xg = None
        if grad_threshold is not None:
            self.dy = torch.randn(M, N, generator=g, device=device).to(dtype)
            self.xg = self.x[grad_threshold].clone().requires_grad_(True)
        self.bnb = {t: make_bnb(self.W, t) for t in bnb_thresholds}


def int_mm_scaled(x: torch.Tensor, L: Layer, threshold: float, quant_backend: str | None = None) -> torch.Tensor:
    """The unfused PyTorch way: quantize, torch._int_mm, scale; outlier columns in 16 bits."""
    import fastpeft
    from fastpeft.ops.int8 import INT_MM_MIN_ROWS  # fewer rows are padded to twice as many
    q, row_scale, cols = fastpeft.int8_vectorwise_quant(x, threshold, backend=quant_backend)
    M = q.shape[0]
    pad = x.is_cuda and M <= INT_MM_MIN_ROWS
    if pad:
        q = F.pad(q, (0, 0, 0, 2 * INT_MM_MIN_ROWS - M))
    acc = torch._int_mm(q, L.w_t)
    if pad:
        acc = acc[:M]
    y = acc.float() * row_scale[:, None] * L.ws_mm[None, :]
    if cols is not None and cols.numel():
        w_cols = (L.w[:, cols].float() * L.ws_deq[:, None]).to(x.dtype)
        y += (x[:, cols] @ w_cols.t()).float()
    return y.to(x.dtype)


def reference(x: torch.Tensor, L: Layer, threshold: float):
    """(y of the int8 layer in float64 (exact int32 product), x @ W in float64, #outlier cols)."""
    from fastpeft.reference import int8 as ref
    cols = ref.int8_vectorwise_quant(x, threshold)[2]
    y = ref.int8_linear(x.double(), L.w, L.ws, None, threshold)
    return y, x.double() @ L.W.double().t(), 0 if cols is None else int(cols.numel())


def dx_reference(dy: torch.Tensor, L: Layer) -> torch.Tensor:
    from fastpeft.reference import int8 as ref
    return dy.double() @ ref.dequantize_weight(L.w, L.ws).double()


# ---------------------------------------------------------------------------------------------
# the implementations, GPU and CPU alike


def _work(mode, shape, elt, int8, dname) -> dict:
    """flops, bytes and the throughput-peak fields of one record, as Impl keywords."""
    w = flops_bytes(mode, shape["M"], shape["K"], shape["N"], elt, int8, dname)
    return {"flops": w.pop("flops"), "bytes": w.pop("bytes_"), "extra": w}


def _fwd_impls(shape, elt, dname, avail: dict, picked: str, cuda: bool, peer_measured: bool) -> list[common.Impl]:
    """One threshold's forward: base, int_mm+scale, bnb and the fastpeft variants. ``avail``: impl
    -> None when it runs here, else why not; fastpeft variants missing from it are not run."""
    import fastpeft
    from fastpeft.ops.int8 import INT_MM_MIN_ROWS
    M, t = shape["M"], shape["t"]
    what = "int8_linear, quantize x included"
    call = lambda backend: (lambda L: fastpeft.int8_linear(L.x[t], L.w, L.ws, None, t, backend=backend))
    impls = [
        ("base", "base", lambda L: F.linear(L.x[t], L.W), True, "F.linear(x, W), bf16 W"),
        ("int_mm+scale", "unfused", lambda L: int_mm_scaled(L.x[t], L, t, None if cuda else "torch"), t == 0,
         "quantize x (fastpeft.int8_vectorwise_quant) + torch._int_mm + separate scale ops"
         + (" + outlier cols in bf16 (host sync for the column list)" if t else "")
         + (" (x padded to 32 rows)" if cuda and M <= INT_MM_MIN_ROWS else "")),
        ("bnb", "peer", lambda L: L.bnb[t](L.x[t]), False, "bitsandbytes Linear8bitLt forward (quantizes x)"),
    ] + [(name, role, call(backend), True, what) for name, role, backend in _VARIANTS if name in avail]
    target = target_for("fwd", M, t, peer_measured) if cuda else None
    out = []
    for name, role, fn, capturable, timed in impls:
        work = _work("fwd", shape, elt, role != "base", dname)
        work["extra"].update(timed=timed, **({"picked": picked} if role == "auto" else {}))
        # the base (bf16 W) and bnb (its own codes, quantized from fp16 W) do not compute the int8 layer's
        # math: they carry err_vs_exact only
        out.append(common.Impl(name, role, fn, error=avail.get(name), capturable=capturable,
                               check=role not in ("base", "peer"),
                               target=target if role in ("auto", "variant") else None, **work))
    return out


_VARIANTS = (("fastpeft[triton]", "variant", "triton"), ("fastpeft[cuda]", "variant", "cuda"),
             ("fastpeft[auto]", "auto", None), ("fastpeft[torch]", "auto", "torch"))


def _fwdbwd_impls(shape, elt, dname, picked: str, backend: str | None) -> list[common.Impl]:
    import fastpeft
    t = shape["t"]

    train = common.with_backward(lambda L: fastpeft.int8_linear(L.xg, L.w, L.ws, None, t, backend=backend))
    name = "fastpeft[auto]" if backend is None else f"fastpeft[{backend}]"
    return [common.Impl("base", "base", lambda L: (F.linear(L.x[t], L.W), torch.mm(L.dy, L.W)), check=False,
                        **_work("fwdbwd", shape, elt, False, dname)),
            common.Impl(name, "auto", train, grads=lambda L: [L.xg], **_with_extra(
                _work("fwdbwd", shape, elt, True, dname), picked=picked,
                timed="int8_linear(x) forward (quantize included) + backward (dx = dy W_deq)"))]


def _with_extra(work: dict, **fields) -> dict:
    work["extra"].update(fields)
    return work


def _measure_step(ctx, M, K, N, dtype, sets: list[Layer], avail: dict, picked: str, peer_measured: bool,
                  fwdbwd_backend: str | None) -> list[dict]:
    """Every threshold's forward and the forward+backward row of one (M, K, N)."""
    dname, elt, L0 = common.DTYPE_NAMES[dtype], dtype.itemsize, sets[0]
    graph, probe = common.use_graphs(ctx, lambda L: F.linear(L.x[0.0], L.W), sets)
    records = []
    for t in THRESHOLDS:
        shape = _shape(M, K, N, t)
        with torch.no_grad():
            y_ref, y_exact, n_out = reference(L0.x[t], L0, t)
        impls = _fwd_impls(shape, elt, dname, avail, picked, ctx.cuda, peer_measured)
        known = {"base": probe} if t == 0.0 and ctx.cuda and not graph else None
        recs = common.time_impls(ctx, BENCH, OP, "fwd", shape, dname, impls, sets, graph=graph, want={"y": y_ref},
                                 known=known, report=lambda im, out, ye=y_exact: {"err_vs_exact": common.rel_err(out["y"], ye)})
        records += _tagged(recs, t, n_out)
        del y_ref, y_exact
    t = FWDBWD_THRESHOLD
    with torch.no_grad():
        y_ref, _, n_out = reference(L0.x[t], L0, t)
        dx_ref = dx_reference(L0.dy, L0)
    impls = _fwdbwd_impls(_shape(M, K, N, t), elt, dname, picked, fwdbwd_backend)
    recs = common.time_impls(ctx, BENCH, OP, "fwdbwd", _shape(M, K, N, t), dname, impls, sets, graph=graph,
                             want={"y": y_ref, "dx": dx_ref})
    return records + _tagged(recs, t, n_out)


def _tagged(recs: list[dict], t: float, n_out: int) -> list[dict]:
    for r in recs:
        r.update(threshold=t, n_outlier_cols=n_out)
    return recs


# ---------------------------------------------------------------------------------------------
# GPU


def _steps(quick: bool) -> list[dict]:
    ms, kns = (QUICK["M"], QUICK["KN"]) if quick else (M_PRIORITY, KN_VALUES)
    return [{"M": M, "K": K, "N": N} for M in ms for (K, N) in kns]


def run_gpu(ctx: common.Context) -> list[dict]:
    import fastpeft  # noqa: F401  (fails loudly here, recorded by the runner, if broken)
    from fastpeft import _backend
    from fastpeft.ops import int8 as iops

    bnb_ok, bnb_why = bnb_status(ctx.device)
    errs = {name: probe_backend(name, ctx.device) for name in ("triton", "cuda")}
    picked = auto_choice(ctx.device)
    cuda_ok, cuda_why = _backend.cuda_ext_status()
    ctx.bench_meta["int8"] = {
        "bitsandbytes": bnb_why,
        "fastpeft._C": "importable" if cuda_ok else cuda_why,
        "backend triton": errs["triton"] or "runs", "backend cuda": errs["cuda"] or "runs",
        "auto picks": picked, "KERNELS": list(iops.KERNELS),
        "inputs": f"x ~ N(0,1) clamped to +-{X_CLAMP:g}; threshold > 0: {OUTLIER_COL_FRACTION:.1%} of the "
                  f"columns (at least 1) with up to {OUTLIER_ROWS_PER_COL} entries of magnitude "
                  f"{OUTLIER_MAGNITUDE[0]:g}..{OUTLIER_MAGNITUDE[1]:g}; W ~ N(0, 1/K) in bf16, quantized per "
                  "row once (not timed); bias None",
        "timed": "every int8 path includes quantizing x (and finding outlier columns) in the timed "
                 "region; int_mm+scale = fastpeft.int8_vectorwise_quant (auto backend; t > 0 syncs "
                 "with the host for the outlier column list) + torch._int_mm (x padded to 32 rows when "
                 "M <= 16) + separate fp32 scale ops + bf16 outlier matmul; bnb = Linear8bitLt forward",
        "timing": f"CUDA graphs (triton.testing.do_bench_cudagraph) when base fwd < {common.GRAPH_BELOW_MS} ms "
                  f"(inputs rotated over copies totalling >= 3x L2), else triton.testing.do_bench median (L2 "
                  "flushed per call); paths that sync with the host (int_mm+scale at t > 0, bnb) are timed "
                  "with do_bench only, and ratios against them use fastpeft's eager (do_bench) time",
        "check": "rel err vs float64 of the int8 layer's exact math (the tests' bf16 tolerance); err_vs_exact: "
                 "vs float64 x @ W",
    }
    avail = {"base": None, "int_mm+scale": None, "bnb": None if bnb_ok else bnb_why,
             "fastpeft[triton]": errs["triton"], "fastpeft[cuda]": errs["cuda"], "fastpeft[auto]": None}

    def measure_step(step):
        M, K, N = step["M"], step["K"], step["N"]
        set_bytes = N * K + 2 * M * K + 2 * M * N   # the int8 paths' footprint (bf16 W doubles it)
        sets = [Layer(M, K, N, torch.bfloat16, ctx.device, 2000 + j, THRESHOLDS,
                      bnb_thresholds=THRESHOLDS if bnb_ok else (), grad_threshold=FWDBWD_THRESHOLD)
                for j in range(common.input_copies(set_bytes))]
        return _measure_step(ctx, M, K, N, torch.bfloat16, sets, avail, picked, bnb_ok, None)

    return common.run_shapes(ctx, _steps(ctx.quick), measure_step, _placeholders, _describe,
                             head=lambda p: f"{p['mode']} t={p['shape']['t']}")


def _placeholders(step: dict, error: str) -> list[dict]:
    """The fastpeft[auto] records of a step that was skipped or failed."""
    M, K, N = step["M"], step["K"], step["N"]
    recs = [timing_record(BENCH, OP, "fwd", _shape(M, K, N, t), "bf16", "fastpeft[auto]", "auto", error=error)
            for t in THRESHOLDS]
    recs.append(timing_record(BENCH, OP, "fwdbwd", _shape(M, K, N, FWDBWD_THRESHOLD), "bf16", "fastpeft[auto]",
                              "auto", error=error))
    return recs


def _shape(M, K, N, t) -> dict:
    return {"M": M, "K": K, "N": N, "t": int(t) if float(t).is_integer() else t}


def _describe(p: dict) -> str:
    r = p.get("ratio_vs_base")
    return (f"{common._f(None if not r else 1 / r, '.2f')}x faster than base"
            + (f", {p['speedup_vs_unfused']:.2f}x vs int_mm" if p.get("speedup_vs_unfused") else "")
            + (f", {p['speedup_vs_peer']:.2f}x vs bnb" if p.get("speedup_vs_peer") else "")
            + ("" if p.get("ok", True) else " WRONG"))


# ---------------------------------------------------------------------------------------------
# CPU: the torch path's timing (correctness: tests/test_int8*.py)


CPU_TIMING_SHAPE = (256, 1024, 1024)   # M, K, N


def run_cpu(ctx: common.Context) -> list[dict]:
    bnb_ok, bnb_why = bnb_status(torch.device("cpu"))
    ctx.bench_meta["int8"] = {"bitsandbytes": bnb_why,
                              "note": "CPU timings are of the torch path only (torch._int_mm on the CPU); "
                                      "bnb's CPU module dequantizes its weight instead of running int8"}
    ctx.log("int8: CPU timings (fp32, torch path; torch.utils.benchmark medians, interleaved)")
    M, K, N = CPU_TIMING_SHAPE
    sets = [Layer(M, K, N, torch.float32, torch.device("cpu"), 99, THRESHOLDS,
                  bnb_thresholds=THRESHOLDS if bnb_ok else (), grad_threshold=FWDBWD_THRESHOLD)]
    avail = {"base": None, "int_mm+scale": None, "bnb": None if bnb_ok else bnb_why, "fastpeft[torch]": None}
    records = _measure_step(ctx, M, K, N, torch.float32, sets, avail, "torch", bnb_ok, "torch")
    common.log_cpu_timings(ctx, records)
    return records
