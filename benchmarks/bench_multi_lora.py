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

CPU: times the torch path against base, the PEFT loop and PEFT on small fp32 shapes (outputs
checked the same way). Correctness of every backend is tests/'s (make test).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import common
from common import timing_record

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
    # autocast_adapter_dtype=False: the adapters stay in W's dtype (PEFT would make 16-bit ones float32)
    model = get_peft_model(_OneLinear(base), cfg(0), adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, len(ranks)):
        model.add_adapter(f"a{i}", cfg(i), autocast_adapter_dtype=False)
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

    def __init__(self, seqs, tokens, n, K, N, ranks, dtype, device, seed, *, decode, peft_ok):
        g = torch.Generator(device=device).manual_seed(seed)
        rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
        r_max = max(ranks)
        self.x = rnd(seqs, tokens, K)
        self.W = rnd(N, K, scale=K ** -0.5)
        self.A = rnd(n, r_max, K, scale=K ** -0.5)
        self.B = torch.stack([rnd(N, r_max, scale=r ** -0.5) for r in ranks])
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


# ---------------------------------------------------------------------------------------------
# the implementations, GPU and CPU alike


def _impls(mode: str, case: str, shape: dict, used: int, elt: int, variants, peft_error: str | None,
           picked: str, targets: bool) -> list[common.Impl]:
    """base and, for the whole layer, PEFT's loop and PEFT; the fastpeft variants of the mode."""
    T, K, N, r = shape["M"], shape["K"], shape["N"], shape["r"]
    base_f, base_b = flops_bytes("base", T, K, N, r, used, elt)
    f, b = flops_bytes(mode, T, K, N, r, used, elt)
    impls = [common.Impl("base", "base", lambda p: F.linear(p.x, p.W), flops=base_f, bytes=base_b, check=False)]
    if mode == "layer":
        impls += [common.Impl("unfused", "unfused",
                              lambda p: peft_loop(p.x, p.W, p.A, p.B, p.rank_list, p.scaling_list, p.names),
                              capturable=False, flops=f, bytes=b),  # its Python-list gathers sync with the host
                  common.Impl("peft", "peer", lambda p: p.peft(p.x, adapter_names=p.names), error=peft_error,
                              capturable=False, flops=f, bytes=b)]
    target = target_for(case, mode, peft_error is None) if targets else None
    make = _layer_call if mode == "layer" else _update_call
    for name, role, why, backend in variants:
        impls.append(common.Impl(name, role, make(backend), error=why, flops=f, bytes=b,
                                 target=target if role in ("auto", "variant") else None,
                                 extra={"picked": picked} if role == "auto" else {}))
    return impls


def _measure_case(ctx, case: str, shape: dict, dtype, sets: list[Problem], variants, peft_ok, peft_why,
                  picked: str) -> list[dict]:
    dname, elt, p0 = common.DTYPE_NAMES[dtype], dtype.itemsize, sets[0]
    peft_error = None if peft_ok else peft_why
    if peft_error is None and p0.peft is None:
        peft_error = p0.peft_error
    graph, probe = common.use_graphs(ctx, lambda p: F.linear(p.x, p.W), sets)
    with torch.no_grad():
        y_ref, d_ref = p0.reference(torch.float32)
    records = []
    for mode, want in (("layer", y_ref), ("update", d_ref)):
        impls = _impls(mode, case, shape, p0.used, elt, variants, peft_error, picked, ctx.cuda)
        known = {"base": probe} if mode == "layer" and ctx.cuda and not graph else None
        records += common.time_impls(ctx, BENCH, OP, mode, shape, dname, impls, sets, graph=graph,
                                     want={"y": want}, known=known)
    for rec in records:
        rec["adapters_used"] = p0.used
    return records


# ---------------------------------------------------------------------------------------------
# GPU


def run_gpu(ctx: common.Context) -> list[dict]:
    import fastpeft  # noqa: F401  (fails loudly here, recorded by the runner, if broken)
    from fastpeft.ops import multi_lora as mops

    peft_ok, peft_why = common.peft_status()
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
        "timing": f"CUDA graphs (triton.testing.do_bench_cudagraph) when the base op < {common.GRAPH_BELOW_MS} ms "
                  f"(inputs rotated over copies totalling >= 3x L2; PEFT's loop cannot be captured and is timed "
                  f"eagerly, compared eager to eager), else triton.testing.do_bench median (L2 flushed per call)",
    }

    def measure_case(shape):
        case, (seqs, tokens, n) = shape["case"], GPU_CASES[shape["case"]]
        T, K, N, r = shape["M"], shape["K"], shape["N"], shape["r"]
        sets = [Problem(seqs, tokens, n, K, N, [r] * n, torch.bfloat16, ctx.device, 1000 + j,
                        decode=case == "decode", peft_ok=peft_ok)
                for j in range(common.input_copies(2 * (T * K + N * K + n * r * (K + N) + T * N)))]
        variants = _variants(ctx.device, with_torch=case == "decode")
        return _measure_case(ctx, case, shape, torch.bfloat16, sets, variants, peft_ok, peft_why,
                             auto_choice(T, n, ctx.device))

    shapes = [{"case": case, "M": s * t, "K": K_IN, "N": N_OUT, "n": n, "r": RANK}
              for case, (s, t, n) in GPU_CASES.items()]
    return common.run_shapes(ctx, shapes, measure_case, _placeholders, _describe)


def _placeholders(shape: dict, error: str) -> list[dict]:
    return [timing_record(BENCH, OP, mode, shape, "bf16", "fastpeft[auto]", "auto", error=error)
            for mode in ("layer", "update")]


def _describe(p: dict) -> str:
    vs = p.get("speedup_vs_peer") or p.get("speedup_vs_unfused")
    return (f"{common._ms(p['ms'])} ms, {common._f(p.get('ratio_vs_base'), '.3f')}x base"
            + (f", {common._f(vs, '.1f')}x vs PEFT" if p["mode"] == "layer" else "")
            + f" [{p.get('picked')}]")


# ---------------------------------------------------------------------------------------------
# CPU: the torch path's timing (correctness: tests/test_multi_lora_op.py, tests/test_multi_adapter.py)


def run_cpu(ctx: common.Context) -> list[dict]:
    peft_ok, peft_why = common.peft_status()
    ctx.bench_meta["multi_lora"] = {"peft": peft_why, "note": "CPU timings are of the torch path only"}
    ctx.log("multi_lora: CPU timings (fp32, torch path; torch.utils.benchmark medians)")
    records: list[dict] = []
    cases = list(CPU_TIMING_CASES.items())
    for case, (seqs, tokens, n, d) in cases[:1] if ctx.quick else cases:
        shape = {"case": case, "M": seqs * tokens, "K": d, "N": d, "n": n, "r": RANK}
        sets = [Problem(seqs, tokens, n, d, d, [RANK] * n, torch.float32, ctx.device, 99,
                        decode=case == "decode", peft_ok=peft_ok)]
        recs = _measure_case(ctx, case, shape, torch.float32, sets, [("fastpeft[torch]", "auto", None, "torch")],
                             peft_ok, peft_why, "torch")
        common.log_cpu_timings(ctx, recs)
        records += recs
        ctx.save_partial(records)
    return records
