"""Bottleneck adapter benchmark: y = x + s * up(act(down(x))), fastpeft's fused op against the
unfused PyTorch module.

GPU (bf16, d_model 4096, bottleneck 64, relu, scaling 2; M = 8192 tokens, then 2048 and 16):
per shape, forward and forward+backward,
  base      forward only: y.copy_(x), the bandwidth floor of reading x and writing y
  unfused   nn.Linear down -> act -> nn.Linear up -> * s -> + x (the PyTorch module PEFT-style
            libraries run); forward+backward by autograd, x and all four parameters get grads
  fastpeft  triton, cuda (when fastpeft.ops._cext has bottleneck_adapter_forward; its backward runs on
            triton) and auto (what fastpeft.adapter picks by itself: the summary row)
Bytes for the bandwidth figure: forward x read + y written, 2 * M * d * 2; forward+backward adds
x and dy read and dx written (5 * M * d * 2 in all). Each output (and for forward+backward dx,
dW_d, db_d, dW_u, db_u) is checked against an fp32 computation on the same inputs.

CPU: checks fastpeft.adapter's triton (interpreted) and torch backends against the float64
reference on small awkward shapes, gradients included, and times the torch path against the
unfused module.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

import common
from common import check_record, measure, timing_record

BENCH, OP = "bottleneck", "bottleneck_adapter"
D_MODEL, BOTTLENECK, ACT, SCALING = 4096, 64, "relu", 2.0
M_VALUES = (8192, 2048, 16)
QUICK_M = (8192,)
_ACT_FNS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "silu": F.silu}


# Targets of the adapter issue, stated for M = 8192 (measured on the H200, never asserted).
def target_for(mode: str, M: int) -> dict | None:
    if M < 8192:
        return None
    if mode == "fwd":
        return {"min_speedup_vs_unfused": 1.8, "min_sol": 0.70}
    return {"min_speedup_vs_unfused": 1.5}


def flops_bytes(mode: str, M: int, d: int, R: int, elt: int) -> tuple[float, float]:
    """Useful FLOPs and the HBM bytes the bandwidth figure counts."""
    if mode == "fwd":
        return 4 * M * d * R, 2 * M * d * elt
    # backward: recompute h, da = dy W_u, dx = dh W_d, dW_u = dy^T a, dW_d = dh^T x
    return 14 * M * d * R, 5 * M * d * elt


def run(ctx: common.Context) -> list[dict]:
    return run_gpu(ctx) if ctx.cuda else run_cpu(ctx)


# ---------------------------------------------------------------------------------------------
# shared pieces


class UnfusedAdapter(torch.nn.Module):
    """The PyTorch way: two nn.Linear, the activation and the residual as separate ops."""

    def __init__(self, wd, bd, wu, bu, act: str, scaling: float):
        super().__init__()
        R, d = wd.shape
        self.down = torch.nn.Linear(d, R, device=wd.device, dtype=wd.dtype)
        self.up = torch.nn.Linear(R, d, device=wd.device, dtype=wd.dtype)
        with torch.no_grad():
            for p, v in ((self.down.weight, wd), (self.down.bias, bd), (self.up.weight, wu), (self.up.bias, bu)):
                p.copy_(v)
        self.act, self.scaling = _ACT_FNS[act], scaling

    def forward(self, x):
        return x + self.up(self.act(self.down(x))) * self.scaling


class Problem:
    """One set of inputs: x, dy, the adapter's parameters (plain and as grad leaves), the module."""

    def __init__(self, M, d, R, dtype, device, gen_seed):
        g = torch.Generator(device=device).manual_seed(gen_seed)
        rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
        self.x, self.dy = rnd(M, d), rnd(M, d)
        self.params = [rnd(R, d, scale=d ** -0.5), rnd(R, scale=0.5), rnd(d, R, scale=R ** -0.5), rnd(d, scale=0.5)]
        self.xg = self.x.clone().requires_grad_(True)
        self.leaves = [p.clone().requires_grad_(True) for p in self.params]
        self.unfused = UnfusedAdapter(*self.params, ACT, SCALING)

    def grad_leaves(self, impl: str) -> list[torch.Tensor]:
        if impl == "unfused":
            m = self.unfused
            return [self.xg, m.down.weight, m.down.bias, m.up.weight, m.up.bias]
        return [self.xg] + self.leaves


def _fastpeft_call(backend):
    import fastpeft

    def call(x, wd, bd, wu, bu):
        return fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, activation=ACT, scaling=SCALING, backend=backend)
    return call


def _variants(device: torch.device) -> list[tuple[str, str, str | None, object]]:
    """(impl, role, why it cannot run or None, callable(x, wd, bd, wu, bu))."""
    from fastpeft import _backend
    from fastpeft.ops import bottleneck as aops
    out = []
    for name in ("triton", "cuda"):
        why = _backend.why_cannot_run(name, device, aops.KERNELS)
        out.append((f"fastpeft[{name}]", "variant", why and f"unavailable: {why}", _fastpeft_call(name)))
    out.append(("fastpeft[auto]", "auto", None, _fastpeft_call(None)))
    return out


def auto_choice(device: torch.device) -> str:
    try:
        from fastpeft.ops import bottleneck as aops
        return aops._select(device, BOTTLENECK, None)
    except Exception as exc:
        return f"unknown ({common.short_error(exc, 80)})"


# ---------------------------------------------------------------------------------------------
# GPU


def _n_sets(set_bytes: int) -> int:
    """Enough input copies that one pass over them is 3x the L2 cache (at most 8)."""
    return int(min(8, max(1, math.ceil(3 * common.l2_bytes() / max(set_bytes, 1)))))


def run_gpu(ctx: common.Context) -> list[dict]:
    import fastpeft  # noqa: F401  (fails loudly here, recorded by the runner, if broken)
    from fastpeft.ops import bottleneck as aops

    ctx.bench_meta["bottleneck"] = {
        "d_model": D_MODEL, "bottleneck": BOTTLENECK, "activation": ACT, "scaling": SCALING,
        "KERNELS": list(aops.KERNELS),
        "bytes": "fwd: x read + y written (2*M*d*2); fwdbwd: + x, dy read, dx written (5*M*d*2)",
        "timing": f"CUDA graphs when the copy base < {common.GRAPH_BELOW_MS} ms (inputs rotated over "
                  f"copies totalling >= 3x L2), else triton do_bench median (L2 flushed per call)",
    }
    records: list[dict] = []
    ms = QUICK_M if ctx.quick else M_VALUES
    for i, M in enumerate(ms):
        shape = {"M": M, "d": D_MODEL, "R": BOTTLENECK}
        if ctx.interrupted:
            raise common.Interrupted("signal between shapes")
        if ctx.time_left() < 5.0:
            for mode in ("fwd", "fwdbwd"):
                records.append(timing_record(BENCH, OP, mode, shape, "bf16", "fastpeft[auto]", "auto",
                                             error=common.budget_spent(ctx)))
            continue
        ctx.log(f"[{i + 1}/{len(ms)}] {common.shape_str(shape)} ...", end="")
        common.run_shape(
            ctx, records, lambda: _gpu_shape(ctx, M, D_MODEL, BOTTLENECK),
            lambda err: [timing_record(BENCH, OP, mode, shape, "bf16", "fastpeft[auto]", "auto", error=err)
                         for mode in ("fwd", "fwdbwd")],
            _describe)
    return records


def _describe(p: dict) -> str:
    sol = "" if p.get("sol") is None else f", {100 * p['sol']:.0f}% SOL"
    return (f"{common._ms(p['ms'])} ms, {common._f(p.get('speedup_vs_unfused'), '.2f')}x vs "
            f"unfused{sol} [{p.get('picked')}]")


def _reference_fp32(p: Problem):
    """y and (dx, dW_d, db_d, dW_u, db_u) of the unfused computation in fp32 on the same inputs."""
    leaves = [t.float().requires_grad_(True) for t in [p.x] + p.params]
    x, wd, bd, wu, bu = leaves
    y = x + F.linear(_ACT_FNS[ACT](F.linear(x, wd, bd)), wu, bu) * SCALING
    y.backward(p.dy.float())
    return y.detach(), [t.grad for t in leaves]


def _gpu_shape(ctx, M, d, R) -> list[dict]:
    shape, dname, elt = {"M": M, "d": d, "R": R}, "bf16", 2
    sets = [Problem(M, d, R, torch.bfloat16, ctx.device, 1000 + j) for j in range(_n_sets(elt * 4 * M * d))]
    p0 = sets[0]
    picked = auto_choice(ctx.device)
    y_ref, g_ref = _reference_fp32(p0)
    records: list[dict] = []
    out = {id(p): torch.empty_like(p.x) for p in sets}

    def rotate(fn):
        it = itertools.cycle(sets)
        return lambda: fn(next(it))

    def base_fwd(p):
        return out[id(p)].copy_(p.x)

    probe = measure(rotate(base_fwd), ctx)
    graph = probe.ms is not None and probe.ms < common.GRAPH_BELOW_MS
    timed = lambda fn, grads=None: measure(rotate(fn), ctx, graph=graph, eager_too=graph, grad_to_none=grads)
    variants = _variants(ctx.device)

    # -- forward
    fwd_impls = [("base", "base", None, base_fwd), ("unfused", "unfused", None, lambda p: p.unfused(p.x))]
    fwd_impls += [(name, role, why, (lambda c: lambda p: c(p.x, *p.params))(call))
                  for name, role, why, call in variants]
    for name, role, err, fn in fwd_impls:
        f, b = flops_bytes("fwd", M, d, R, elt)
        extra = {"picked": picked} if role == "auto" else {}
        tgt = target_for("fwd", M) if role in ("auto", "variant") else None
        if err:
            records.append(timing_record(BENCH, OP, "fwd", shape, dname, name, role, flops=f, bytes_=b,
                                         target=tgt, error=err, **extra))
            continue

        def nograd(fn=fn):
            def g(p):
                with torch.no_grad():
                    return fn(p)
            return g
        m = probe if (role == "base" and not graph) else timed(nograd())
        if role != "base" and m.error is None:
            try:
                extra["rel_err"] = common.rel_err(nograd()(p0), y_ref)
                extra["ok"] = extra["rel_err"] <= common.TOL[dname]
                if not extra["ok"]:
                    extra["note"] = f"WRONG: rel err {extra['rel_err']:.2e} > {common.TOL[dname]:.0e}"
            except Exception as exc:
                extra["note"] = f"check failed: {common.short_error(exc, 120)}"
        records.append(timing_record(BENCH, OP, "fwd", shape, dname, name, role, m, flops=f if role != "base"
                                     else None, bytes_=b, target=tgt, **extra))

    # -- forward + backward (x and all four parameters get gradients)
    def train(fwd):
        def g(p):
            y = fwd(p)
            y.backward(p.dy)
            return y
        return g

    bwd_impls = [("unfused", "unfused", None, train(lambda p: p.unfused(p.xg)))]
    bwd_impls += [(name, role, why, train((lambda c: lambda p: c(p.xg, *p.leaves))(call)))
                  for name, role, why, call in variants]
    for name, role, err, fn in bwd_impls:
        f, b = flops_bytes("fwdbwd", M, d, R, elt)
        extra = {"picked": picked} if role == "auto" else {}
        tgt = target_for("fwdbwd", M) if role in ("auto", "variant") else None
        if err:
            records.append(timing_record(BENCH, OP, "fwdbwd", shape, dname, name, role, flops=f, bytes_=b,
                                         target=tgt, error=err, **extra))
            continue
        m = timed(fn, [t for p in sets for t in p.grad_leaves(name)])
        if m.error is None:
            try:
                for t in p0.grad_leaves(name):
                    t.grad = None
                fn(p0)
                errs = [common.rel_err(t.grad, r) for t, r in zip(p0.grad_leaves(name), g_ref)]
                extra["rel_err"] = max(errs)
                extra["rel_err_dx_dWd_dbd_dWu_dbu"] = errs
                extra["ok"] = extra["rel_err"] <= common.TOL[dname]
                if not extra["ok"]:
                    extra["note"] = "WRONG: rel err dx/dWd/dbd/dWu/dbu " + "/".join(f"{e:.1e}" for e in errs)
            except Exception as exc:
                extra["note"] = f"check failed: {common.short_error(exc, 120)}"
        records.append(timing_record(BENCH, OP, "fwdbwd", shape, dname, name, role, m, flops=f, bytes_=b,
                                     target=tgt, **extra))
    for rec in records:
        rec["n_input_copies"] = len(sets)
    return records


# ---------------------------------------------------------------------------------------------
# CPU: correctness of every backend that runs here, and the torch path's timing


CHECK_CASES = [
    # (name, lead dims, d, bottleneck, activation, biases, non-contiguous x)
    ("M=7 d=40 R=24 relu", (7,), 40, 24, "relu", True, False),
    ("x[2,3] d=33 R=5 gelu_tanh, x non-contiguous", (2, 3), 33, 5, "gelu_tanh", True, True),
    ("M=1 d=72 R=16 silu", (1,), 72, 16, "silu", True, False),
    ("M=19 d=48 R=12 gelu, no biases", (19,), 48, 12, "gelu", False, False),
]
CPU_TIMING_SHAPE = (512, 1024, 64)


def _check_case(case, dtype, backend, gen):
    """y and every gradient of fastpeft.adapter next to the float64 reference on the same inputs."""
    import fastpeft
    from fastpeft.reference import bottleneck as ref
    name, lead, d, R, act, has_bias, noncontig = case
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dtype)
    x, dy = rnd(*lead, d), rnd(*lead, d)
    params = [rnd(R, d, scale=d ** -0.5), rnd(R, scale=0.5) if has_bias else None,
              rnd(d, R, scale=R ** -0.5), rnd(d, scale=0.5) if has_bias else None]
    s = 0.7
    ref_x = x.double().requires_grad_(True)
    ref_p = [None if t is None else t.double().requires_grad_(True) for t in params]
    y64 = ref.bottleneck_adapter(ref_x, *ref_p, act, s)
    y64.backward(dy.double())
    x_leaf, x_in = common.input_leaf(x, noncontig)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in params]
    y = fastpeft.bottleneck_adapter(x_in, *leaves, activation=act, scaling=s, backend=backend)
    y.backward(dy)
    out = [("y", y, y64), ("dx", common.input_grad(x_leaf, noncontig), ref_x.grad)]
    for q, t, r in zip(("dW_d", "db_d", "dW_u", "db_u"), leaves, ref_p):
        if t is not None:
            out.append((q, t.grad, r.grad))
    return out


def run_cpu(ctx: common.Context) -> list[dict]:
    from fastpeft import _backend
    records: list[dict] = []
    interp = _backend.interpreter_active()
    tri_ok, tri_why = _backend.triton_status()
    ctx.bench_meta["bottleneck"] = {"triton_interpreter": interp,
                                 "note": "CPU timings are of the torch path only; Triton (interpreted) is "
                                         "checked for correctness, not timed"}
    configs = [("torch", (torch.float32, torch.float16, torch.bfloat16))]
    if tri_ok and interp:
        configs.append(("triton", (torch.float32, torch.float16)))
    else:
        why = tri_why or "TRITON_INTERPRET=1 was not set before triton was imported"
        records.append(check_record(BENCH, OP, "triton backend", "-", "all", None, 0.0, error=f"not checked: {why}"))
    cases = CHECK_CASES[:2] if ctx.quick else CHECK_CASES
    ctx.log(f"adapter: correctness against the float64 reference ({len(cases)} cases)")
    for backend, dtypes in configs:
        for dtype in dtypes:
            dname = common.DTYPE_NAMES[dtype]
            for case in cases:
                common.run_check(ctx, records, BENCH, OP, f"adapter[{backend}] {case[0]}", dname,
                                 lambda: _check_case(case, dtype, backend, torch.Generator().manual_seed(7)))
    ctx.save_partial(records)
    ctx.log("adapter: CPU timings (fp32, torch path; perf_counter medians)")
    records += _cpu_timings(ctx, *CPU_TIMING_SHAPE)
    ctx.save_partial(records)
    return records


def _no_grad_call(fn):
    with torch.no_grad():
        return fn()


def _cpu_timings(ctx, M, d, R) -> list[dict]:
    shape, dname, elt = {"M": M, "d": d, "R": R}, "fp32", 4
    p = Problem(M, d, R, torch.float32, ctx.device, 99)
    call = _fastpeft_call("torch")
    nograd = lambda fn: (lambda: _no_grad_call(fn))
    fwd = {"base": ("base", nograd(lambda: torch.empty_like(p.x).copy_(p.x)), None),
           "unfused": ("unfused", nograd(lambda: p.unfused(p.x)), None),
           "fastpeft[torch]": ("auto", nograd(lambda: call(p.x, *p.params)), None)}
    bwd = {"unfused": ("unfused", lambda: p.unfused(p.xg).backward(p.dy), p.grad_leaves("unfused")),
           "fastpeft[torch]": ("auto", lambda: call(p.xg, *p.leaves).backward(p.dy), p.grad_leaves("fastpeft"))}
    recs = []
    for mode, table in (("fwd", fwd), ("fwdbwd", bwd)):
        timed = common.measure_cpu_interleaved({n: (fn, grads) for n, (role, fn, grads) in table.items()}, ctx)
        for name, (role, fn, grads) in table.items():
            f, b = flops_bytes(mode, M, d, R, elt)
            recs.append(timing_record(BENCH, OP, mode, shape, dname, name, role, timed.get(name),
                                      flops=None if role == "base" else f, bytes_=b,
                                      **({"picked": "torch (CPU)"} if role == "auto" else {})))
    common.finalize(recs, ctx.ceilings)
    for mode in ("fwd", "fwdbwd"):
        line = ", ".join(f"{r['impl']} {common._ms(r['ms'])} ms" if r.get("ms") else f"{r['impl']}: {r['error']}"
                         for r in recs if r["mode"] == mode)
        ctx.log(f"  {common.shape_str(shape)} fp32 {mode}: {line}")
    return recs
