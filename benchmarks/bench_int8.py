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
tolerance; a wrong kernel shows as WRONG. Records also carry err_vs_exact, the error
against float64 x @ W (quantization error included), for bf16 and int8 alike.

Targets (issue 3; measured, never asserted): M >= 2048: >= 1.3x faster than base at
threshold 0, >= 1.15x at threshold 6; M <= 16: >= 1.4x faster than base; >= 2x faster
than bitsandbytes (when it is installed). Achieved TOP/s are reported against the int8
ceiling (torch._int_mm) measured in the same run, GB/s against the copy ceiling.

CPU: checks int8_linear's triton (interpreted) and torch backends (and
int8_vectorwise_quant) against fastpeft.reference.int8 with x gradients, and times the
torch path against F.linear in fp32 on a small shape.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

import common
from common import check_record, measure, timing_record

BENCH, OP = "int8", "int8_linear"
# Order run in (the time budget may cut the tail): one of each target's cases first.
M_PRIORITY = (2048, 16, 8192, 1)
KN_VALUES = ((4096, 4096), (4096, 11008), (11008, 4096))   # (in features K, out features N)
THRESHOLDS = (0.0, 6.0)
FWDBWD_THRESHOLD = 6.0
QUICK = dict(M=(2048, 16), KN=((4096, 4096),))
INT8_MAX = 127.0

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
        self.ws_mm = self.ws / INT8_MAX**2                 # the epilogue's weight factor (fp32)
        self.ws_deq = self.ws / INT8_MAX                   # W_deq = w * ws / 127 (fp32)
        self.x = {t: make_x(M, K, n_outlier_cols(K) if t > 0 else 0, g, device, dtype) for t in thresholds}
        self.dy = self.xg = None
        if grad_threshold is not None:
            self.dy = torch.randn(M, N, generator=g, device=device).to(dtype)
            self.xg = self.x[grad_threshold].clone().requires_grad_(True)
        self.bnb = {t: make_bnb(self.W, t) for t in bnb_thresholds}


def int_mm_scaled(x: torch.Tensor, L: Layer, threshold: float, quant_backend: str | None = None) -> torch.Tensor:
    """The unfused PyTorch way: quantize, torch._int_mm, scale; outlier columns in 16 bits."""
    import fastpeft
    q, row_scale, cols = fastpeft.int8_vectorwise_quant(x, threshold, backend=quant_backend)
    M = q.shape[0]
    pad = x.is_cuda and M <= 16                    # CUDA _int_mm needs more than 16 rows
    if pad:
        q = F.pad(q, (0, 0, 0, 32 - M))
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
    q, rs, cols = ref.int8_vectorwise_quant(x, threshold)
    y = (q.double() @ L.w.double().t()) * (rs.double()[:, None] * L.ws.double()[None, :]) / INT8_MAX**2
    n = 0 if cols is None else int(cols.numel())
    if n:
        y += x[:, cols].double() @ (L.w[:, cols].double() * (L.ws.double()[:, None] / INT8_MAX)).t()
    exact = x.double() @ L.W.double().t()
    return y, exact, n


def dx_reference(dy: torch.Tensor, L: Layer) -> torch.Tensor:
    from fastpeft.reference import int8 as ref
    return dy.double() @ ref.dequantize_weight(L.w, L.ws).double()


def _no_grad(fn):
    def g(*a):
        with torch.no_grad():
            return fn(*a)
    return g


# ---------------------------------------------------------------------------------------------
# GPU


def _steps(quick: bool) -> list[tuple[int, int, int]]:
    ms, kns = (QUICK["M"], QUICK["KN"]) if quick else (M_PRIORITY, KN_VALUES)
    return [(M, K, N) for M in ms for (K, N) in kns]


def _n_sets(set_bytes: int) -> int:
    """Enough input copies that one pass over them is 3x the L2 cache (at most 8)."""
    return int(min(8, max(1, math.ceil(3 * common.l2_bytes() / max(set_bytes, 1)))))


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
        "timing": f"CUDA graphs when base fwd < {common.GRAPH_BELOW_MS} ms (inputs rotated over copies "
                  f"totalling >= 3x L2), else triton do_bench median (L2 flushed per call); paths that "
                  "sync with the host (int_mm+scale at t > 0, bnb) are timed with do_bench only, and "
                  "ratios against them use fastpeft's eager (do_bench) time",
        "check": "rel err vs float64 of the int8 layer's exact math (tol bf16 1e-2); err_vs_exact: vs "
                 "float64 x @ W",
    }
    steps = _steps(ctx.quick)
    records: list[dict] = []
    durations: dict[int, float] = {}
    for i, (M, K, N) in enumerate(steps):
        if ctx.interrupted:
            raise common.Interrupted("signal between shapes")
        guess = durations.get(M, max(durations.values(), default=5.0))
        if ctx.time_left() < guess:
            records += _placeholders(M, K, N, common.budget_spent(ctx))
            ctx.log(f"[{i + 1:2d}/{len(steps)}] M={M} K={K} N={N}: skipped (time budget)")
            continue
        ctx.log(f"[{i + 1:2d}/{len(steps)}] M={M} K={K} N={N} ...", end="")
        durations[M] = common.run_shape(
            ctx, records, lambda: _gpu_step(ctx, M, K, N, bnb_ok, bnb_why, errs, picked),
            lambda err: _placeholders(M, K, N, err), _describe, head=lambda p: f"{p['mode']} t={p['shape']['t']}")
    return records


def _placeholders(M, K, N, error: str) -> list[dict]:
    """The fastpeft[auto] records of a step that was skipped or failed."""
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


def _gpu_step(ctx, M, K, N, bnb_ok, bnb_why, errs, picked) -> list[dict]:
    import fastpeft
    dtype, dname, elt = torch.bfloat16, "bf16", 2
    tol = common.TOL[dname]
    set_bytes = N * K + elt * M * K + elt * M * N   # the int8 paths' footprint (bf16 W doubles it)
    sets = [Layer(M, K, N, dtype, ctx.device, 2000 + j, THRESHOLDS,
                  bnb_thresholds=THRESHOLDS if bnb_ok else (), grad_threshold=FWDBWD_THRESHOLD)
            for j in range(_n_sets(set_bytes))]
    L0 = sets[0]

    def rotate(fn):
        it = itertools.cycle(sets)
        return lambda: fn(next(it))

    # base first: its time decides CUDA graphs vs do_bench for the whole shape
    probe = measure(rotate(lambda L: F.linear(L.x[0.0], L.W)), ctx)
    graph = probe.ms is not None and probe.ms < common.GRAPH_BELOW_MS

    def timed(fn, capturable=True, grads=None):
        g = graph and capturable
        return measure(rotate(fn), ctx, graph=g, eager_too=g, grad_to_none=grads)

    records: list[dict] = []
    refs: dict = {}
    for t in THRESHOLDS:
        shape = _shape(M, K, N, t)
        with torch.no_grad():
            refs[t] = y_ref, y_exact, n_out = reference(L0.x[t], L0, t)
        call = lambda backend: (lambda L: fastpeft.int8_linear(L.x[t], L.w, L.ws, None, t, backend=backend))
        # (impl, role, error, fn(L), capturable, what is timed)
        impls = [
            ("base", "base", None, lambda L: F.linear(L.x[t], L.W), True, "F.linear(x, W), bf16 W"),
            ("int_mm+scale", "unfused", None, lambda L: int_mm_scaled(L.x[t], L, t), t == 0,
             "quantize x (fastpeft.int8_vectorwise_quant) + torch._int_mm + separate scale ops"
             + (" + outlier cols in bf16 (host sync for the column list)" if t else "")
             + (" (x padded to 32 rows)" if M <= 16 else "")),
            ("bnb", "peer", None if bnb_ok else bnb_why, lambda L: L.bnb[t](L.x[t]), False,
             "bitsandbytes Linear8bitLt forward (quantizes x)"),
            ("fastpeft[triton]", "variant", errs["triton"], call("triton"), True, "int8_linear, quantize x included"),
            ("fastpeft[cuda]", "variant", errs["cuda"], call("cuda"), True, "int8_linear, quantize x included"),
            ("fastpeft[auto]", "auto", None, call(None), True, "int8_linear, quantize x included"),
        ]
        base_ms = None
        group = []
        for name, role, err, fn, capturable, what in impls:
            int8 = role != "base"
            work = flops_bytes("fwd", M, K, N, elt, int8)
            extra = {"threshold": t, "n_outlier_cols": n_out, "timed": what, "n_input_copies": len(sets)}
            if role == "auto":
                extra["picked"] = picked
            tgt = target_for("fwd", M, t, bnb_ok) if role in ("auto", "variant") else None
            if err:
                group.append(timing_record(BENCH, OP, "fwd", shape, dname, name, role, target=tgt,
                                           error=err, **work, **extra))
                continue
            fn = _no_grad(fn)
            m = probe if (role == "base" and t == 0.0 and not graph) else timed(fn, capturable)
            if m.error is None:
                try:
                    y = fn(L0)
                    extra["err_vs_exact"] = common.rel_err(y, y_exact)
                    if int8:
                        extra["rel_err"] = common.rel_err(y, y_ref)
                        extra["ok"] = extra["rel_err"] <= tol
                        if not extra["ok"]:
                            extra["note"] = f"WRONG: rel err {extra['rel_err']:.2e} > {tol:.0e}"
                    del y
                except Exception as exc:
                    extra["note"] = f"check failed: {common.short_error(exc, 120)}"
            if role == "base":
                base_ms = m.ms
            elif base_ms and m.ms:
                extra["speedup_vs_base"] = base_ms / m.ms
            group.append(timing_record(BENCH, OP, "fwd", shape, dname, name, role, m, target=tgt,
                                       **work, **extra))
        records += group
        if t != FWDBWD_THRESHOLD:
            del refs[t]
        del y_ref, y_exact

    # forward + backward at FWDBWD_THRESHOLD: x requires grad, the weight is frozen
    t = FWDBWD_THRESHOLD
    shape = _shape(M, K, N, t)
    y_ref, _, n_out = refs.pop(t)
    with torch.no_grad():
        dx_ref = dx_reference(L0.dy, L0)

    def base_fwdbwd(L):
        F.linear(L.x[t], L.W)
        return torch.mm(L.dy, L.W)

    def train(L):
        y = fastpeft.int8_linear(L.xg, L.w, L.ws, None, t)
        y.backward(L.dy)
        return y

    extra_all = {"threshold": t, "n_outlier_cols": n_out, "n_input_copies": len(sets)}
    mb = timed(_no_grad(base_fwdbwd))
    records.append(timing_record(BENCH, OP, "fwdbwd", shape, dname, "base", "base", mb,
                                 **flops_bytes("fwdbwd", M, K, N, elt, False), **extra_all,
                                 timed="F.linear(x, W) and dx = dy @ W, bf16"))
    grads = [L.xg for L in sets]
    m = timed(train, True, grads)
    extra = {"picked": picked, "timed": "int8_linear(x) forward (quantize included) + backward (dx = dy W_deq)"}
    if m.error is None:
        try:
            L0.xg.grad = None
            y = train(L0)
            errs_ = [common.rel_err(y, y_ref), common.rel_err(L0.xg.grad, dx_ref)]
            extra["rel_err"] = max(errs_)
            extra["rel_err_y_dx"] = errs_
            extra["ok"] = extra["rel_err"] <= tol
            if not extra["ok"]:
                extra["note"] = "WRONG: rel err y/dx " + "/".join(f"{e:.1e}" for e in errs_)
            del y
        except Exception as exc:
            extra["note"] = f"check failed: {common.short_error(exc, 120)}"
    if mb.ms and m.ms:
        extra["speedup_vs_base"] = mb.ms / m.ms
    records.append(timing_record(BENCH, OP, "fwdbwd", shape, dname, "fastpeft[auto]", "auto", m,
                                 **flops_bytes("fwdbwd", M, K, N, elt, True), **extra_all, **extra))
    del sets, L0, y_ref, dx_ref
    return records


# ---------------------------------------------------------------------------------------------
# CPU: correctness of every backend that runs here, and the torch path's timing


CHECK_CASES = [
    # (name, lead dims, K, N, bias, non-contiguous x, zero row)
    ("M=5 K=40 N=24 bias, a row of zeros", (5,), 40, 24, True, False, True),
    ("x[2,3] K=72 N=40 no bias, x non-contiguous", (2, 3), 72, 40, False, True, False),
]
CPU_TIMING_SHAPE = (256, 1024, 1024)   # M, K, N


def _check_case(case, threshold, dtype, backend, gen) -> list[tuple[str, object, object, float | None]]:
    """(quantity, out, ref, tol or None for the dtype's) of one case: quantization and the layer."""
    import fastpeft
    from fastpeft.ops.int8 import quantize_weight
    from fastpeft.reference import int8 as ref
    name, lead, K, N, has_bias, noncontig, zero_row = case
    M = math.prod(lead)
    x = make_x(M, K, 2 if threshold > 0 else 0, gen, "cpu", torch.float32)
    if zero_row:
        x[min(2, M - 1)] = 0.0
    x = x.reshape(*lead, K).to(dtype)
    w, ws = quantize_weight(torch.randn(N, K, generator=gen) * K ** -0.5)
    b = torch.randn(N, generator=gen).to(dtype) if has_bias else None
    dy = torch.randn(*lead, N, generator=gen).to(dtype)
    # float64 reference on the same (rounded) inputs
    y64 = ref.int8_linear(x.double(), w, ws, None if b is None else b.double(), threshold)
    dx64 = (dy.double().reshape(-1, N) @ ref.dequantize_weight(w, ws).double()).reshape(*lead, K)
    q_ref, s_ref, c_ref = ref.int8_vectorwise_quant(x.reshape(-1, K), threshold)
    # fastpeft; a non-contiguous x is every other column of a wider leaf
    x_leaf, x_in = common.input_leaf(x, noncontig)
    b_leaf = b.clone().requires_grad_(True) if has_bias else None
    with torch.no_grad():
        q, s, c = fastpeft.int8_vectorwise_quant(x_in, threshold, backend=backend)
    y = fastpeft.int8_linear(x_in, w, ws, b_leaf, threshold, backend=backend)
    y.backward(dy)
    dx = common.input_grad(x_leaf, noncontig)
    same_cols = (c is None and c_ref is None) or (
        c is not None and c_ref is not None and torch.equal(c.cpu().long(), c_ref.cpu().long()))
    out = [("q (codes, up to ties)", q.reshape(-1, K).float(), q_ref.float(), 1e-2),
           ("row_scale", s, s_ref, 1e-6),
           ("outlier_cols", torch.zeros(1) if same_cols else None, torch.zeros(1), 0.0),
           ("y", y, y64, None), ("dx", dx, dx64, None)]
    if has_bias:
        out.append(("dbias", b_leaf.grad, dy.double().reshape(-1, N).sum(0), None))
    return out


def run_cpu(ctx: common.Context) -> list[dict]:
    from fastpeft import _backend
    records: list[dict] = []
    interp = _backend.interpreter_active()
    tri_ok, tri_why = _backend.triton_status()
    bnb_ok, bnb_why = bnb_status(torch.device("cpu"))
    ctx.bench_meta["int8"] = {"bitsandbytes": bnb_why, "triton_interpreter": interp,
                              "note": "CPU timings are of the torch path only (torch._int_mm on the CPU); "
                                      "Triton (interpreted) is checked for correctness, not timed; bnb's "
                                      "CPU module dequantizes its weight instead of running int8"}
    configs = [("torch", (torch.float32, torch.float16, torch.bfloat16))]
    if tri_ok and interp:
        configs.append(("triton", (torch.float32, torch.float16)))
    else:
        why = tri_why or "TRITON_INTERPRET=1 was not set before triton was imported"
        records.append(check_record(BENCH, OP, "triton backend", "-", "all", None, 0.0,
                                    error=f"not checked: {why}"))
    cases = CHECK_CASES[:1] if ctx.quick else CHECK_CASES
    ctx.log(f"int8: correctness against fastpeft.reference.int8 in float64 ({len(cases)} cases x "
            f"thresholds {', '.join(f'{t:g}' for t in THRESHOLDS)})")
    for backend, dtypes in configs:
        for dtype in dtypes:
            dname = common.DTYPE_NAMES[dtype]
            for case in cases:
                for t in THRESHOLDS:
                    common.run_check(ctx, records, BENCH, OP, f"int8_linear[{backend}] {case[0]} t={t:g}", dname,
                                     lambda: _check_case(case, t, dtype, backend, torch.Generator().manual_seed(11)))
    ctx.save_partial(records)

    ctx.log("int8: CPU timings (fp32, torch path; perf_counter medians, interleaved)")
    records += _cpu_timings(ctx, *CPU_TIMING_SHAPE, bnb_ok, bnb_why)
    ctx.save_partial(records)
    return records


def _cpu_timings(ctx, M, K, N, bnb_ok, bnb_why) -> list[dict]:
    import fastpeft
    dtype, dname, elt = torch.float32, "fp32", 4
    L = Layer(M, K, N, dtype, torch.device("cpu"), 99, THRESHOLDS,
              bnb_thresholds=THRESHOLDS if bnb_ok else (), grad_threshold=FWDBWD_THRESHOLD)
    recs: list[dict] = []
    groups = [("fwd", t) for t in THRESHOLDS] + [("fwdbwd", FWDBWD_THRESHOLD)]
    for mode, t in groups:
        shape = _shape(M, K, N, t)
        if mode == "fwd":
            table = {
                "base": ("base", _no_grad(lambda: F.linear(L.x[t], L.W)), None, None),
                "int_mm+scale": ("unfused", _no_grad(lambda: int_mm_scaled(L.x[t], L, t, "torch")), None, None),
                "bnb": ("peer", _no_grad(lambda: L.bnb[t](L.x[t])), None, None if bnb_ok else bnb_why),
                "fastpeft[torch]": ("auto", _no_grad(lambda: fastpeft.int8_linear(L.x[t], L.w, L.ws, None, t,
                                                                                 backend="torch")), None, None),
            }
        else:
            table = {
                "base": ("base", _no_grad(lambda: (F.linear(L.x[t], L.W), torch.mm(L.dy, L.W))), None, None),
                "fastpeft[torch]": ("auto", lambda: fastpeft.int8_linear(L.xg, L.w, L.ws, None, t,
                                                                        backend="torch").backward(L.dy),
                                    [L.xg], None),
            }
        timed = common.measure_cpu_interleaved(
            {name: (fn, grads) for name, (role, fn, grads, err) in table.items() if not err}, ctx)
        for name, (role, fn, grads, err) in table.items():
            extra = {"threshold": t, "picked": "torch (CPU)"} if role == "auto" else {"threshold": t}
            recs.append(timing_record(BENCH, OP, mode, shape, dname, name, role, timed.get(name), error=err,
                                      **flops_bytes(mode, M, K, N, elt, role != "base", dname), **extra))
    common.finalize(recs, ctx.ceilings)
    for mode, t in groups:
        line = ", ".join(f"{r['impl']} {common._ms(r['ms'])} ms" + (f" ({r['ratio_vs_base']:.2f}x base)"
                                                                  if r.get("ratio_vs_base") else "")
                         if r.get("ms") else f"{r['impl']}: {r['error']}"
                         for r in recs if r["mode"] == mode and r["threshold"] == t)
        ctx.log(f"  M={M} K={K} N={N} t={t:g} fp32 {mode}: {line}")
    return recs
