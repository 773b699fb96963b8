"""Bottleneck adapter benchmark: y = x + s * up(act(down(x))), fastpeft's fused op against the
unfused PyTorch module.

GPU (bf16, d_model 4096, bottleneck 64, relu, scaling 2; M = 8192 tokens, then 2048 and 16):
per shape, forward and forward+backward,
  base      forward only: y.copy_(x), the bandwidth floor of reading x and writing y
  unfused   nn.Linear down -> act -> nn.Linear up -> * s -> + x (the PyTorch module PEFT-style
            libraries run); forward+backward by autograd, x and all four parameters get grads
  fastpeft  triton, cuda (when fastpeft.ops._cext has bottleneck_adapter_forward; its backward runs on
            triton) and auto (what fastpeft.bottleneck_adapter picks by itself: the summary row)
Bytes for the bandwidth figure: forward x read + y written, 2 * M * d * 2; forward+backward adds
x and dy read and dx written (5 * M * d * 2 in all). Each output (and for forward+backward dx,
dW_d, db_d, dW_u, db_u) is checked against an fp32 computation on the same inputs.

CPU: times the torch path against the same baselines on a smaller fp32 shape (outputs checked
the same way). Correctness of every backend is tests/'s (make test).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import common
from common import timing_record

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
        self.out = torch.empty_like(self.x)  # the copy base writes here

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
    """What bottleneck_adapter picks by itself at the benchmark's bottleneck width."""
    try:
        from fastpeft.ops import bottleneck as aops
        return aops._choose(device, BOTTLENECK, None)
    except Exception as exc:
        return f"unknown ({common.short_error(exc, 80)})"


# ---------------------------------------------------------------------------------------------
# the implementations, GPU and CPU alike


def _reference_fp32(p: Problem) -> tuple[torch.Tensor, dict]:
    """y and the gradients (dx, dW_d, db_d, dW_u, db_u) of the unfused computation in fp32."""
    leaves = [t.float().requires_grad_(True) for t in [p.x] + p.params]
    x, wd, bd, wu, bu = leaves
    y = x + F.linear(_ACT_FNS[ACT](F.linear(x, wd, bd)), wu, bu) * SCALING
    y.backward(p.dy.float())
    return y.detach(), dict(zip(("dx", "dW_d", "db_d", "dW_u", "db_u"), (t.grad for t in leaves)))


def _impls(mode: str, shape: dict, elt: int, variants, picked: str, targets: bool) -> list[common.Impl]:
    """The copy base (forward only), the unfused module and the fastpeft variants of one mode."""
    f, b = flops_bytes(mode, shape["M"], shape["d"], shape["R"], elt)
    fwd = mode == "fwd"
    impls = [common.Impl("base", "base", lambda p: p.out.copy_(p.x), bytes=b, check=False)] if fwd else []
    impls.append(common.Impl("unfused", "unfused", (lambda p: p.unfused(p.x)) if fwd else
                             common.with_backward(lambda p: p.unfused(p.xg)), flops=f, bytes=b,
                             grads=None if fwd else (lambda p: p.grad_leaves("unfused"))))
    target = target_for(mode, shape["M"]) if targets else None
    for name, role, why, call in variants:
        impls.append(common.Impl(
            name, role, (lambda p, c=call: c(p.x, *p.params)) if fwd else common.with_backward(lambda p, c=call: c(p.xg, *p.leaves)),
            error=why, grads=None if fwd else (lambda p: p.grad_leaves("fastpeft")), flops=f, bytes=b,
            target=target if role in ("auto", "variant") else None,
            extra={"picked": picked} if role == "auto" else {}))
    return impls


def _measure_shape(ctx, shape: dict, dtype, sets: list[Problem], variants, picked: str) -> list[dict]:
    dname, elt = common.DTYPE_NAMES[dtype], dtype.itemsize
    graph, probe = common.use_graphs(ctx, lambda p: p.out.copy_(p.x), sets)
    y_ref, grads_ref = _reference_fp32(sets[0])
    records = []
    for mode, want in (("fwd", {"y": y_ref}), ("fwdbwd", grads_ref)):
        impls = _impls(mode, shape, elt, variants, picked, ctx.cuda)
        known = {"base": probe} if mode == "fwd" and ctx.cuda and not graph else None
        records += common.time_impls(ctx, BENCH, OP, mode, shape, dname, impls, sets, graph=graph, want=want,
                                     known=known)
    return records


# ---------------------------------------------------------------------------------------------
# GPU


def run_gpu(ctx: common.Context) -> list[dict]:
    import fastpeft  # noqa: F401  (fails loudly here, recorded by the runner, if broken)
    from fastpeft.ops import bottleneck as aops

    ctx.bench_meta["bottleneck"] = {
        "d_model": D_MODEL, "bottleneck": BOTTLENECK, "activation": ACT, "scaling": SCALING,
        "KERNELS": list(aops.KERNELS),
        "bytes": "fwd: x read + y written (2*M*d*2); fwdbwd: + x, dy read, dx written (5*M*d*2)",
        "timing": f"CUDA graphs (triton.testing.do_bench_cudagraph) when the copy base < {common.GRAPH_BELOW_MS} "
                  f"ms (inputs rotated over copies totalling >= 3x L2), else triton.testing.do_bench median "
                  f"(L2 flushed per call)",
    }
    variants, picked = _variants(ctx.device), auto_choice(ctx.device)

    def measure_shape(shape):
        M, d, R = shape["M"], shape["d"], shape["R"]
        sets = [Problem(M, d, R, torch.bfloat16, ctx.device, 1000 + j)
                for j in range(common.input_copies(2 * 4 * M * d))]
        return _measure_shape(ctx, shape, torch.bfloat16, sets, variants, picked)

    shapes = [{"M": M, "d": D_MODEL, "R": BOTTLENECK} for M in (QUICK_M if ctx.quick else M_VALUES)]
    return common.run_shapes(ctx, shapes, measure_shape, _placeholders, _describe)


def _placeholders(shape: dict, error: str) -> list[dict]:
    return [timing_record(BENCH, OP, mode, shape, "bf16", "fastpeft[auto]", "auto", error=error)
            for mode in ("fwd", "fwdbwd")]


def _describe(p: dict) -> str:
    sol = "" if p.get("sol") is None else f", {100 * p['sol']:.0f}% SOL"
    return (f"{common._ms(p['ms'])} ms, {common._f(p.get('speedup_vs_unfused'), '.2f')}x vs "
            f"unfused{sol} [{p.get('picked')}]")


# ---------------------------------------------------------------------------------------------
# CPU: the torch path's timing (correctness: tests/test_bottleneck.py)


CPU_TIMING_SHAPE = (512, 1024, 64)


def run_cpu(ctx: common.Context) -> list[dict]:
    ctx.bench_meta["bottleneck"] = {"note": "CPU timings are of the torch path only"}
    ctx.log("bottleneck: CPU timings (fp32, torch path; torch.utils.benchmark medians)")
    M, d, R = CPU_TIMING_SHAPE
    variants = [("fastpeft[torch]", "auto", None, _fastpeft_call("torch"))]
    records = _measure_shape(ctx, {"M": M, "d": d, "R": R}, torch.float32,
                             [Problem(M, d, R, torch.float32, ctx.device, 99)], variants, "torch")
    common.log_cpu_timings(ctx, records)
    return records
