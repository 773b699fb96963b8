"""Multi-adapter LoRA benchmark: a batch whose rows use different adapters, on one 4096 -> 4096
layer in bf16, fastpeft.multi_lora against the base linear and PEFT's mixed-batch forward.

GPU cases (every adapter rank 16, scaling 2):
  decode   64 sequences x 1 token, 64 distinct adapters (every row its own)
  prefill  8 sequences x 1024 tokens (M = 8192), 8 adapters, one per sequence, unsorted order
Per case, two modes:
  layer   the whole layer: base F.linear(x, W), then multi_lora(..., out=y) adding the updates
          (check=False, as the serving path calls it), against
            base     F.linear(x, W)                          (ratio_vs_base: LoRA overhead + 1)
            unfused  PEFT's mixed-batch loop in plain torch (tuners/lora/layer.py
                     _mixed_batch_forward: per unique adapter, gather its rows with a Python index
                     list, lora_B(lora_A(x_rows)) * s, scatter-add back)
            peft     a PeftModel (get_peft_model + add_adapter, 64 or 8 adapters) around an
                     nn.Linear sharing W, called with adapter_names=[...] per sequence, where
                     peft is installed
          fastpeft variants: triton, cuda (when the extension has the gathered kernels), torch
          (decode only: its per-row gathers are large at M = 8192), auto (the summary row)
  update  multi_lora alone (a new output) against the same base: ratio_vs_base is the overhead
Each output is checked against an fp32 computation on the same inputs. Inputs (weights and
adapters included) rotate over copies totalling >= 3x L2, so graph-timed calls read HBM.

CPU: checks multi_lora's triton (interpreted, both regimes) and torch backends, and the PEFT
harness itself, against the float64 reference on small awkward shapes (NaN beyond each rank),
and times the torch path against base, the PEFT loop and PEFT on small shapes.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

import common
from common import check_record, measure, timing_record

BENCH, OP = "multi_lora", "multi_lora"
K_IN = N_OUT = 4096
RANK, SCALING = 16, 2.0
# name -> (sequences, tokens per sequence, adapters in the stack)
GPU_CASES = {"decode": (64, 1, 64), "prefill": (8, 1024, 8)}
CPU_TIMING_CASES = {"decode": (64, 1, 64, 1024), "prefill": (8, 128, 8, 1024)}  # + K = N


def target_for(case: str, mode: str, peft_ok: bool) -> dict | None:
    """Targets of the multi-adapter issue (measured on the H200, never asserted)."""
    if mode != "layer":
        return None
    if case == "decode":
        return {"max_ratio_vs_base": 1.20, ("min_speedup_vs_peer" if peft_ok else "min_speedup_vs_unfused"): 5.0}
    return {"max_ratio_vs_base": 1.10}


def flops_bytes(mode: str, T: int, K: int, N: int, r: int, used: int, elt: int) -> tuple[float, float]:
    """Useful FLOPs and minimum HBM bytes: base GEMM (layer), the shrink and expand, the adapters
    the batch uses (``used`` distinct ones) read once."""
    lora_f = 2 * T * r * (K + N)
    lora_b = elt * used * r * (K + N)
    if mode == "base":
        return 2 * T * N * K, elt * (T * K + N * K + T * N)
    if mode == "layer":
        return 2 * T * N * K + lora_f, elt * (T * K + N * K + T * N) + lora_b
    return lora_f, elt * (T * K + T * N) + lora_b


def run(ctx: common.Context) -> list[dict]:
    return run_gpu(ctx) if ctx.cuda else run_cpu(ctx)


# ---------------------------------------------------------------------------------------------
# shared pieces


def _peft_status() -> tuple[bool, str]:
    try:
        import peft
        from peft import LoraConfig, get_peft_model  # noqa: F401
        return True, f"peft {peft.__version__}"
    except Exception as exc:
        return False, f"not installed/failed: {common.short_error(exc)}"


class _OneLinear(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def make_peft_model(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ranks: list[int], scalings: list[float]):
    """A PeftModel around nn.Linear(W) with adapters "a0".."a{n-1}" holding A[i, :r_i], B[i, :, :r_i]."""
    from peft import LoraConfig, get_peft_model
    N, K = W.shape
    base = torch.nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    base.weight = torch.nn.Parameter(W, requires_grad=False)
    cfg = lambda i: LoraConfig(r=ranks[i], lora_alpha=scalings[i] * ranks[i], target_modules=["proj"],
                               lora_dropout=0.0)
    model = get_peft_model(_OneLinear(base), cfg(0), adapter_name="a0")
    for i in range(1, len(ranks)):
        model.add_adapter(f"a{i}", cfg(i))
    layer = model.base_model.model.proj
    with torch.no_grad():
        for i, r in enumerate(ranks):
            layer.lora_A[f"a{i}"].weight.copy_(A[i, :r])
            layer.lora_B[f"a{i}"].weight.copy_(B[i, :, :r])
    model.eval()
    return model


def peft_loop(x, W, A, B, ranks: list[int], scalings: list[float], names: list[str]):
    """PEFT's _mixed_batch_forward in plain torch: base, then per unique adapter a Python-list
    gather of its samples, lora_B(lora_A(rows)) * scaling, and a scatter-add back."""
    result = F.linear(x, W)
    for name in set(names):
        if name == "__base__":
            continue
        i = int(name[1:])
        rows = [j for j, item in enumerate(names) if item == name]
        sub = x[rows]
        result[rows] += F.linear(F.linear(sub, A[i, :ranks[i]]), B[i, :, :ranks[i]]) * scalings[i]
    return result


class Problem:
    """One layer's inputs: x [seqs, tokens, K], W, the adapter stacks, per-sequence adapters."""

    def __init__(self, seqs, tokens, n, K, N, ranks, dtype, device, seed, *, decode, peft_ok, nan=False):
        g = torch.Generator(device=device).manual_seed(seed)
        rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
        r_max = max(ranks)
        self.x = rnd(seqs, tokens, K)
        self.W = rnd(N, K, scale=K ** -0.5)
        self.A = rnd(n, r_max, K, scale=K ** -0.5)
        self.B = torch.stack([rnd(N, r_max, scale=r ** -0.5) for r in ranks])
        if nan:
            for i, r in enumerate(ranks):
                self.A[i, r:] = float("nan")
                self.B[i, :, r:] = float("nan")
        self.rank_list = list(ranks)
        self.scaling_list = [SCALING / (1 + (i % 3)) for i in range(n)]
        self.ranks = torch.tensor(self.rank_list, dtype=torch.int32, device=device)
        self.scalings = torch.tensor(self.scaling_list, dtype=torch.float32, device=device)
        cpu = torch.Generator().manual_seed(seed)
        if decode:  # every sequence its own adapter (as far as there are adapters)
            seq_adapter = torch.randperm(max(n, seqs), generator=cpu)[:seqs] % n
        else:  # one adapter per sequence, in a shuffled (unsorted) order
            seq_adapter = torch.randperm(seqs, generator=cpu) % n
        self.names = [f"a{int(a)}" for a in seq_adapter]
        self.idx = seq_adapter[:, None].expand(seqs, tokens).reshape(-1).to(device)
        self.used = len(set(self.names))
        self.peft = None
        self.peft_error = None
        if peft_ok:
            try:
                self.peft = make_peft_model(self.W, self.A, self.B, self.rank_list, self.scaling_list)
            except Exception as exc:
                self.peft_error = f"failed: {common.short_error(exc)}"

    def reference(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer output, update alone) computed in ``dtype`` by the reference."""
        from fastpeft.reference import multi_lora as ref
        c = lambda t: t.to(dtype)
        x2 = c(self.x).reshape(-1, self.x.shape[-1])
        d = ref.multi_lora_delta(x2, c(self.A), c(self.B), self.ranks, self.scalings.to(dtype), self.idx)
        d = d.reshape(*self.x.shape[:-1], -1)
        return F.linear(c(self.x), c(self.W)) + d, d


def _layer_call(backend):
    import fastpeft

    def call(p):
        y = F.linear(p.x, p.W)
        fastpeft.multi_lora(p.x, p.A, p.B, p.ranks, p.scalings, p.idx, out=y, check=False, backend=backend)
        return y
    return call


def _update_call(backend):
    import fastpeft

    def call(p):
        return fastpeft.multi_lora(p.x, p.A, p.B, p.ranks, p.scalings, p.idx, check=False, backend=backend)
    return call


def _variants(device: torch.device, with_torch: bool) -> list[tuple[str, str, str | None, str | None]]:
    """(impl, role, why it cannot run or None, backend argument)."""
    from fastpeft import _backend
    from fastpeft.ops import multi_lora as mops
    names = ("triton", "cuda") + (("torch",) if with_torch else ())
    out = []
    for name in names:
        why = _backend.why_cannot_run(name, device, mops.KERNELS)
        out.append((f"fastpeft[{name}]", "variant", why and f"unavailable: {why}", name))
    out.append(("fastpeft[auto]", "auto", None, None))
    return out


def auto_choice(T: int, n: int, device: torch.device) -> str:
    try:
        from fastpeft import _backend
        from fastpeft.ops import multi_lora as mops
        name = _backend.choose(mops.OP, device, mops.KERNELS)
        return f"{name},{mops.regime(T, n)}" if name == "triton" else name
    except Exception as exc:
        return f"unknown ({common.short_error(exc, 80)})"


def _no_grad(fn):
    def g(*a):
        with torch.no_grad():
            return fn(*a)
    return g


# ---------------------------------------------------------------------------------------------
# GPU


def _n_sets(set_bytes: int) -> int:
    """Enough input copies that one pass over them is 3x the L2 cache (at most 8)."""
    return int(min(8, max(1, math.ceil(3 * common.l2_bytes() / max(set_bytes, 1)))))


def run_gpu(ctx: common.Context) -> list[dict]:
    import fastpeft  # noqa: F401  (fails loudly here, recorded by the runner, if broken)
    from fastpeft.ops import multi_lora as mops

    peft_ok, peft_why = _peft_status()
    elt = 2
    base_b = flops_bytes("base", 64, K_IN, N_OUT, RANK, 0, elt)[1]
    ad_b = elt * 64 * RANK * (K_IN + N_OUT)
    ctx.bench_meta["multi_lora"] = {
        "peft": peft_why, "KERNELS": list(mops.KERNELS),
        "rank": RANK, "scaling": SCALING, "cases": {k: {"sequences": s, "tokens": t, "adapters": n}
                                                  for k, (s, t, n) in GPU_CASES.items()},
        "decode_floor": (f"the 64 distinct adapters hold {ad_b / 2**20:.0f} MiB against the base weight's "
                         f"{base_b / 2**20:.0f} MiB (with x and y): at equal bandwidth the layer cannot take "
                         f"less than {(base_b + ad_b) / base_b:.2f}x the base time"),
        "timing": f"CUDA graphs when the base op < {common.GRAPH_BELOW_MS} ms (inputs rotated over copies "
                  f"totalling >= 3x L2; PEFT's loop cannot be captured and is timed eagerly, compared "
                  f"eager to eager), else triton do_bench median (L2 flushed per call)",
    }
    records: list[dict] = []
    cases = list(GPU_CASES.items())
    for i, (case, (seqs, tokens, n)) in enumerate(cases):
        T = seqs * tokens
        shape = {"case": case, "M": T, "K": K_IN, "N": N_OUT, "n": n, "r": RANK}
        if ctx.interrupted:
            raise common.Interrupted("signal between shapes")
        if ctx.time_left() < 5.0:
            for mode in ("layer", "update"):
                records.append(timing_record(BENCH, OP, mode, shape, "bf16", "fastpeft[auto]", "auto",
                                             error=common.budget_spent(ctx)))
            continue
        ctx.log(f"[{i + 1}/{len(cases)}] {common.shape_str(shape)} ...", end="")
        common.run_shape(
            ctx, records, lambda: _gpu_case(ctx, case, seqs, tokens, n, peft_ok, peft_why),
            lambda err: [timing_record(BENCH, OP, mode, shape, "bf16", "fastpeft[auto]", "auto", error=err)
                         for mode in ("layer", "update")],
            _describe)
    return records


def _describe(p: dict) -> str:
    vs = p.get("speedup_vs_peer") or p.get("speedup_vs_unfused")
    return (f"{common._ms(p['ms'])} ms, {common._f(p.get('ratio_vs_base'), '.3f')}x base"
            + (f", {common._f(vs, '.1f')}x vs PEFT" if p["mode"] == "layer" else "")
            + f" [{p.get('picked')}]")


def _gpu_case(ctx, case, seqs, tokens, n, peft_ok, peft_why) -> list[dict]:
    T, K, N, r, elt, dname = seqs * tokens, K_IN, N_OUT, RANK, 2, "bf16"
    shape = {"case": case, "M": T, "K": K, "N": N, "n": n, "r": r}
    set_bytes = elt * (T * K + N * K + n * r * (K + N) + T * N)
    sets = [Problem(seqs, tokens, n, K, N, [r] * n, torch.bfloat16, ctx.device, 1000 + j,
                    decode=case == "decode", peft_ok=peft_ok) for j in range(_n_sets(set_bytes))]
    p0 = sets[0]
    used = p0.used
    peft_error = None if peft_ok else peft_why
    if peft_error is None and p0.peft is None:
        peft_error = p0.peft_error
    picked = auto_choice(T, n, ctx.device)
    with torch.no_grad():
        y_ref, d_ref = p0.reference(torch.float32)

    def rotate(fn):
        it = itertools.cycle(sets)
        return lambda: fn(next(it))

    base = lambda p: F.linear(p.x, p.W)
    probe = measure(rotate(_no_grad(base)), ctx)
    graph = probe.ms is not None and probe.ms < common.GRAPH_BELOW_MS
    timed = lambda fn: measure(rotate(_no_grad(fn)), ctx, graph=graph, eager_too=graph)
    variants = _variants(ctx.device, with_torch=case == "decode")
    records: list[dict] = []
    tables = {
        "layer": [("base", "base", None, base, None),
                  ("unfused", "unfused", None,
                   lambda p: peft_loop(p.x, p.W, p.A, p.B, p.rank_list, p.scaling_list, p.names), y_ref),
                  ("peft", "peer", peft_error, lambda p: p.peft(p.x, adapter_names=p.names), y_ref)]
                 + [(name, role, why, _layer_call(be), y_ref) for name, role, why, be in variants],
        "update": [("base", "base", None, base, None)]
                  + [(name, role, why, _update_call(be), d_ref) for name, role, why, be in variants],
    }
    for mode, impls in tables.items():
        for name, role, err, fn, want in impls:
            f, b = flops_bytes("base" if role == "base" else mode, T, K, N, r, used, elt)
            extra = {"picked": picked} if role == "auto" else {}
            tgt = target_for(case, mode, peft_error is None) if role in ("auto", "variant") else None
            if err:
                records.append(timing_record(BENCH, OP, mode, shape, dname, name, role, flops=f, bytes_=b,
                                             target=tgt, error=err, **extra))
                continue
            m = probe if (role == "base" and not graph) else timed(fn)
            if want is not None and m.error is None:
                try:
                    extra["rel_err"] = common.rel_err(_no_grad(fn)(p0).float(), want)
                    extra["ok"] = extra["rel_err"] <= common.TOL[dname]
                    if not extra["ok"]:
                        extra["note"] = f"WRONG: rel err {extra['rel_err']:.2e} > {common.TOL[dname]:.0e}"
                except Exception as exc:
                    extra["note"] = f"check failed: {common.short_error(exc, 120)}"
            records.append(timing_record(BENCH, OP, mode, shape, dname, name, role, m, flops=f, bytes_=b,
                                         target=tgt, **extra))
    for rec in records:
        rec["n_input_copies"] = len(sets)
        rec["adapters_used"] = used
    del sets, p0
    return records


# ---------------------------------------------------------------------------------------------
# CPU: correctness of every backend that runs here (and of the PEFT harness), torch path timings


CHECK_CASES = [
    # (name, sequences, tokens, K, N, ranks (r_max = max), decode-like)
    ("T=7 K=37 N=45 n=4 r={1,3,16,64}, every row its own adapter", 7, 1, 37, 45, (1, 3, 16, 64), True),
    ("T=3x23 K=40 N=33 n=3 r={5,64,2}, runs per sequence", 3, 23, 40, 33, (5, 64, 2), False),
    ("T=1 K=64 N=48 n=2 r={8,16}", 1, 1, 64, 48, (8, 16), True),
]


def _check_case(case, dtype, backend, regime):
    import fastpeft
    from fastpeft.ops import multi_lora as mops
    name, seqs, tokens, K, N, ranks, decode = case
    p = Problem(seqs, tokens, len(ranks), K, N, ranks, dtype, torch.device("cpu"), 7, decode=decode,
                peft_ok=False, nan=True)
    want, want_d = p.reference()
    saved = mops.regime
    if regime is not None:
        mops.regime = lambda T, n: regime
    try:
        with torch.no_grad():
            y = F.linear(p.x, p.W)
            fastpeft.multi_lora(p.x, p.A, p.B, p.ranks, p.scalings, p.idx.reshape(seqs, tokens), out=y,
                                backend=backend)
            d = fastpeft.multi_lora(p.x, p.A, p.B, p.ranks, p.scalings, p.idx, backend=backend)
    finally:
        mops.regime = saved
    return [("y (out)", y, want), ("update", d, want_d)]


def _check_peft(case):
    name, seqs, tokens, K, N, ranks, decode = case
    p = Problem(seqs, tokens, len(ranks), K, N, ranks, torch.float32, torch.device("cpu"), 7, decode=decode,
                peft_ok=True)
    if p.peft is None:
        raise RuntimeError(p.peft_error)
    want, _ = p.reference()
    with torch.no_grad():
        return [("peft", p.peft(p.x, adapter_names=p.names), want),
                ("peft loop (unfused)", peft_loop(p.x, p.W, p.A, p.B, p.rank_list, p.scaling_list, p.names), want)]


def run_cpu(ctx: common.Context) -> list[dict]:
    from fastpeft import _backend
    records: list[dict] = []
    interp = _backend.interpreter_active()
    tri_ok, tri_why = _backend.triton_status()
    peft_ok, peft_why = _peft_status()
    ctx.bench_meta["multi_lora"] = {"peft": peft_why, "triton_interpreter": interp,
                                    "note": "CPU timings are of the torch path only; Triton (interpreted) "
                                            "is checked for correctness, not timed"}
    configs = [("torch", None, (torch.float32, torch.float16, torch.bfloat16))]
    if tri_ok and interp:
        configs += [("triton", "decode", (torch.float32, torch.float16)),
                    ("triton", "prefill", (torch.float32, torch.float16))]
    else:
        why = tri_why or "TRITON_INTERPRET=1 was not set before triton was imported"
        records.append(check_record(BENCH, OP, "triton backend", "-", "all", None, 0.0, error=f"not checked: {why}"))
    cases = CHECK_CASES[:2] if ctx.quick else CHECK_CASES
    ctx.log(f"multi_lora: correctness against the float64 reference ({len(cases)} cases, NaN beyond each rank)")
    jobs = [(f"multi_lora[{be}{',' + rg if rg else ''}] {c[0]}", dt, lambda c=c, dt=dt, be=be, rg=rg:
             _check_case(c, dt, be, rg)) for be, rg, dts in configs for dt in dts for c in cases]
    if peft_ok:
        jobs += [(f"PEFT harness {c[0]}", torch.float32, lambda c=c: _check_peft(c)) for c in cases]
    else:
        records.append(check_record(BENCH, OP, "PEFT harness", "-", "all", None, 0.0, error=f"not checked: {peft_why}"))
    for cname, dtype, job in jobs:
        common.run_check(ctx, records, BENCH, OP, cname, common.DTYPE_NAMES[dtype], job)
    ctx.save_partial(records)
    ctx.log("multi_lora: CPU timings (fp32, torch path; perf_counter medians)")
    timing_cases = list(CPU_TIMING_CASES.items())[:1] if ctx.quick else list(CPU_TIMING_CASES.items())
    for case, (seqs, tokens, n, d) in timing_cases:
        records += _cpu_timings(ctx, case, seqs, tokens, n, d, peft_ok, peft_why)
        ctx.save_partial(records)
    return records


def _cpu_timings(ctx, case, seqs, tokens, n, d, peft_ok, peft_why) -> list[dict]:
    T, r, dname, elt = seqs * tokens, RANK, "fp32", 4
    shape = {"case": case, "M": T, "K": d, "N": d, "n": n, "r": r}
    p = Problem(seqs, tokens, n, d, d, [r] * n, torch.float32, ctx.device, 99, decode=case == "decode",
                peft_ok=peft_ok)
    peft_error = None if peft_ok else peft_why
    if peft_error is None and p.peft is None:
        peft_error = p.peft_error
    table = {"base": ("base", lambda: F.linear(p.x, p.W), None),
             "unfused": ("unfused", lambda: peft_loop(p.x, p.W, p.A, p.B, p.rank_list, p.scaling_list, p.names),
                         None),
             "peft": ("peer", lambda: p.peft(p.x, adapter_names=p.names), peft_error),
             "fastpeft[torch]": ("auto", lambda: _layer_call("torch")(p), None)}
    timed = common.measure_cpu_interleaved({k: (_no_grad(fn), None) for k, (role, fn, err) in table.items()
                                            if not err}, ctx)
    recs = []
    for name, (role, fn, err) in table.items():
        f, b = flops_bytes("base" if role == "base" else "layer", T, d, d, r, p.used, elt)
        recs.append(timing_record(BENCH, OP, "layer", shape, dname, name, role, timed.get(name), flops=f,
                                  bytes_=b, error=err, **({"picked": "torch (CPU)"} if role == "auto" else {})))
    common.finalize(recs, ctx.ceilings)
    line = ", ".join(f"{r['impl']} {common._ms(r['ms'])} ms" if r.get("ms") else f"{r['impl']}: {r['error']}"
                     for r in recs)
    ctx.log(f"  {common.shape_str(shape)} fp32 layer: {line}")
    return recs
