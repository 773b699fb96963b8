"""distill benchmark: fastpeft.distillation_loss and the fused-linear variant (knowledge distillation).

GPU, bf16, 8192 tokens, Llama-3's vocabulary (128256), T = 2, alpha = 0.5, labels (1/16 of the
rows ignore_index):
  * the loss on given logits, forward + backward (the student's gradient), per divergence:
    the triton kernel against the PyTorch composition (``composition``: float32 log_softmax,
    F.kl_div, F.cross_entropy, by autograd: "unfused"). Time (target:
    >= 2x faster) and peak memory above the inputs (torch.cuda.max_memory_allocated during one
    forward + backward, minus what was allocated before; target: >= 3x less).
  * the fused-linear loss from hidden states (student 2048, teacher 4096 features; the student's
    hidden states and head weight need gradients, no bias), forward + backward, forward_kl: the
    materialized logits (F.linear) with the PyTorch composition ("unfused"), the materialized logits with the fastpeft
    loss kernel, and FusedLinearDistillationLoss (chunks of rows). Peak memory above the inputs
    (target: >= 4x less than the materialized PyTorch way) and time.
Every fastpeft row also carries rel_err of the loss and gradients against the unfused one.

CPU: times the torch paths (fastpeft's closed-form backward, the chunked fused-linear loss)
against the same PyTorch ways on a small fp32 shape (outputs checked the same way).
Correctness of every backend is tests/'s (make test).
"""
from __future__ import annotations

import math

import torch

import common

BENCH = "distill"
TOKENS, VOCAB = 8192, 128256
HS, HT = 2048, 4096
T, ALPHA = 2.0, 0.5
LOSS_TARGET = {"min_speedup_vs_unfused": 2.0}
LOSS_MEM_TARGET = 3.0
FUSED_MEM_TARGET = 4.0


def run(ctx: common.Context) -> list[dict]:
    return run_gpu(ctx) if ctx.cuda else run_cpu(ctx)


def _peak_extra(ctx, fn) -> tuple[int, int] | None:
    """(peak bytes allocated during fn() above what was allocated before it, that baseline); None
    off the GPU (no allocator statistics)."""
    if ctx.device.type != "cuda":
        return None
    ctx.sync()
    ctx.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    ctx.sync()
    return torch.cuda.max_memory_allocated() - before, before


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def _labels(n: int, vocab: int, g: torch.Generator, device) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    labels[::16] = -100
    return labels


def composition(z, u, labels, divergence, temperature=T, alpha=ALPHA, ignore_index=-100):
    """The loss as written with PyTorch ops (float32 log_softmax, F.kl_div, F.cross_entropy),
    averaged over the rows whose label is not ignore_index: the "unfused" baseline."""
    F = torch.nn.functional
    zf, uf = z.float(), u.float()
    lq, lp = F.log_softmax(zf / temperature, -1), F.log_softmax(uf / temperature, -1)
    if divergence == "forward_kl":
        d = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    elif divergence == "reverse_kl":
        d = F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
    else:
        lm = torch.logaddexp(lp, lq) - math.log(2.0)
        d = 0.5 * (F.kl_div(lm, lp, log_target=True, reduction="none").sum(-1)
                   + F.kl_div(lm, lq, log_target=True, reduction="none").sum(-1))
    ce = F.cross_entropy(zf, labels, ignore_index=ignore_index, reduction="none")
    valid = labels != ignore_index
    rows = (alpha * temperature * temperature) * d + (1 - alpha) * ce
    return torch.where(valid, rows, 0.0).sum() / valid.sum().clamp(min=1)


def _memory(ctx, leaves):
    """A time_impls report: the peak memory of one more call above the inputs."""
    def report(im: common.Impl, out: dict) -> dict:
        _reset(leaves)
        peak = _peak_extra(ctx, lambda: im.fn(None))
        return {} if peak is None else {"peak_mem_extra_gib": peak[0] / 2**30, "inputs_gib": peak[1] / 2**30}
    return report


def _reset(leaves):
    for t in leaves:
        t.grad = None


def _fwdbwd(loss_fn):
    def call(_):
        loss = loss_fn()
        loss.backward()
        return loss.detach().float()
    return call


def _want(loss_fn, leaves, names) -> dict:
    """The unfused way's loss and gradients: what the other implementations are checked against."""
    _reset(leaves)
    want = {"y": _fwdbwd(loss_fn)(None)}
    want.update((n, t.grad.detach().clone()) for n, t in zip(names, leaves))
    _reset(leaves)
    return want


def _memory_ratios(ctx, recs: list[dict], unfused: str, target: float, target_roles: tuple, what: str) -> None:
    """Each fastpeft record's peak memory against the unfused one's (and the target where it applies)."""
    mem = {r["impl"]: r["peak_mem_extra_gib"] for r in recs if r.get("peak_mem_extra_gib") is not None}
    for r in recs:
        if r["role"] == "unfused" or r["impl"] not in mem or not mem.get(unfused):
            continue
        ratio = mem[unfused] / max(mem[r["impl"]], 2**-30)
        r["mem_ratio_vs_unfused"] = ratio
        verdict = ""
        if r["role"] in target_roles:
            r["mem_target"] = f">= {target:g}x less peak memory than {what}"
            r["mem_meets"] = ratio >= target
            verdict = f" (target >= {target:g}x: {'met' if r['mem_meets'] else 'NOT met'})"
        r.setdefault("note", f"peak +{mem[r['impl']]:.2f} GiB vs {what} +{mem[unfused]:.2f} GiB: "
                             f"{ratio:.1f}x less{verdict}")
    ctx.log("  peak above inputs: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items()))


def _loss_case(ctx, z, u, labels, divergence) -> list[dict]:
    import fastpeft
    shape = {"tokens": z.shape[0], "vocab": z.shape[1], "div": divergence}
    leaf = z.clone().requires_grad_()
    fast = lambda b: (lambda: fastpeft.distillation_loss(leaf, u, labels, T, ALPHA, divergence=divergence, backend=b))
    unfused = lambda: composition(leaf, u, labels, divergence)
    impls = [common.Impl(name, role, _fwdbwd(fn), grads=lambda _: [leaf], bytes=5 * z.numel() * z.element_size(),
                         target=LOSS_TARGET if role != "unfused" else None, check=role != "unfused")
             for name, role, fn in (("torch composition", "unfused", unfused),
                                    ("fastpeft[triton]", "variant", fast("triton")),
                                    ("fastpeft[auto]", "auto", fast(None)))]
    recs = common.time_impls(ctx, BENCH, "distillation_loss", "fwdbwd", shape, "bf16", impls, [None],
                             want=_want(unfused, [leaf], ["d student"]), report=_memory(ctx, [leaf]))
    _memory_ratios(ctx, recs, "torch composition", LOSS_MEM_TARGET, ("variant", "auto"), "unfused")
    return recs


def _fused_case(ctx, hs, ws, ht, wt, labels) -> list[dict]:
    import fastpeft
    F = torch.nn.functional
    shape = {"tokens": hs.shape[0], "vocab": ws.shape[0], "Hs": hs.shape[1], "Ht": ht.shape[1]}
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    mod = fastpeft.FusedLinearDistillationLoss(temperature=T, alpha=ALPHA)

    def teacher():
        with torch.no_grad():
            return F.linear(ht, wt)

    materialized = lambda: composition(F.linear(h, w), teacher(), labels, "forward_kl")
    tokens, vocab = hs.shape[0], ws.shape[0]
    # the student's logits forward and both backward GEMMs, and the teacher's logits
    flops = 3 * 2 * tokens * vocab * hs.shape[1] + 2 * tokens * vocab * ht.shape[1]
    impls = [common.Impl(name, role, _fwdbwd(fn), grads=lambda _: [h, w], flops=flops, check=role != "unfused")
             for name, role, fn in (
                 ("materialized torch", "unfused", materialized),
                 ("materialized+fastpeft[auto]", "variant",
                  lambda: fastpeft.distillation_loss(F.linear(h, w), teacher(), labels, T, ALPHA)),
                 ("fastpeft[fused-linear]", "auto", lambda: mod(h, w, ht, wt, labels)))]
    recs = common.time_impls(ctx, BENCH, "fused_linear_distillation", "fwdbwd", shape, "bf16", impls, [None],
                             want=_want(materialized, [h, w], ["d hidden", "d weight"]), report=_memory(ctx, [h, w]))
    _memory_ratios(ctx, recs, "materialized torch", FUSED_MEM_TARGET, ("auto",), "the materialized torch way")
    return recs


def run_gpu(ctx: common.Context) -> list[dict]:
    records: list[dict] = []
    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(TOKENS, VOCAB, generator=g, device=dev, dtype=torch.bfloat16) * 2
    u = (0.6 * z.float() + 1.5 * torch.randn(TOKENS, VOCAB, generator=g, device=dev)).to(torch.bfloat16)
    labels = _labels(TOKENS, VOCAB, g, dev)
    for divergence in (("forward_kl",) if ctx.quick else ("forward_kl", "jsd")):
        if ctx.time_left() <= 0:
            break
        try:
            records += _loss_case(ctx, z, u, labels, divergence)
        except Exception as exc:  # e.g. out of memory: record, go on
            records.append(common.error_record(BENCH, "distillation_loss", divergence,
                                               f"failed: {common.short_error(exc)}"))
        ctx.empty_cache()
        ctx.save_partial(records)
    del z, u
    ctx.empty_cache()
    if ctx.time_left() > 0:
        hs = torch.randn(TOKENS, HS, generator=g, device=dev, dtype=torch.bfloat16)
        ht = torch.randn(TOKENS, HT, generator=g, device=dev, dtype=torch.bfloat16)
        ws = (torch.randn(VOCAB, HS, generator=g, device=dev) * (2 / HS ** 0.5)).to(torch.bfloat16)
        wt = (torch.randn(VOCAB, HT, generator=g, device=dev) * (2 / HT ** 0.5)).to(torch.bfloat16)
        try:
            records += _fused_case(ctx, hs, ws, ht, wt, labels)
        except Exception as exc:
            records.append(common.error_record(BENCH, "fused_linear_distillation", "fused-linear",
                                               f"failed: {common.short_error(exc)}"))
        ctx.save_partial(records)
    ctx.bench_meta["distill"] = {
        "peak memory": "torch.cuda.max_memory_allocated during one forward + backward minus the memory "
                       "allocated before it (the inputs); GiB (peak_mem_extra_gib)"}
    return records


# ---------------------------------------------------------------------------------------------
# CPU: the torch paths' timing (correctness: tests/test_distill.py)


CPU_SHAPE = (256, 8192, 256)  # tokens, vocabulary, student hidden size (the teacher's: twice)


def run_cpu(ctx: common.Context) -> list[dict]:
    ctx.bench_meta["distill"] = {"note": "CPU timings are of the torch paths only (the PyTorch composition, "
                                         "fastpeft's closed-form torch backward, the chunked fused-linear loss)"}
    ctx.log("distill: CPU timings (fp32, torch path; torch.utils.benchmark medians)")
    import fastpeft
    N, V, H = CPU_SHAPE
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, V, generator=g) * 2
    u = 0.6 * z + torch.randn(N, V, generator=g) * 1.5
    labels = _labels(N, V, g, "cpu")
    leaf = z.clone().requires_grad_()
    unfused = lambda: composition(leaf, u, labels, "forward_kl")
    impls = [common.Impl("torch composition", "unfused", _fwdbwd(unfused), grads=lambda _: [leaf], check=False),
             common.Impl("fastpeft[torch]", "auto", _fwdbwd(lambda: fastpeft.distillation_loss(
                 leaf, u, labels, T, ALPHA, backend="torch")), grads=lambda _: [leaf])]
    records = common.time_impls(ctx, BENCH, "distillation_loss", "fwdbwd", {"tokens": N, "vocab": V},
                                "fp32", impls, [None], want=_want(unfused, [leaf], ["d student"]))
    hs, ht = torch.randn(N, H, generator=g), torch.randn(N, 2 * H, generator=g)
    ws, wt = torch.randn(V, H, generator=g) / H ** 0.5, torch.randn(V, 2 * H, generator=g) / (2 * H) ** 0.5
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    F = torch.nn.functional
    materialized = lambda: composition(F.linear(h, w), F.linear(ht, wt).detach(), labels, "forward_kl")
    fused = lambda: fastpeft.fused_linear_distillation_loss(h, w, ht, wt, labels, temperature=T, alpha=ALPHA,
                                                            backend="torch")
    impls = [common.Impl("materialized torch", "unfused", _fwdbwd(materialized), grads=lambda _: [h, w], check=False),
             common.Impl("fastpeft[fused-linear,torch]", "auto", _fwdbwd(fused), grads=lambda _: [h, w])]
    records += common.time_impls(ctx, BENCH, "fused_linear_distillation", "fwdbwd",
                                 {"tokens": N, "vocab": V, "Hs": H, "Ht": 2 * H}, "fp32", impls, [None],
                                 want=_want(materialized, [h, w], ["d hidden", "d weight"]))
    common.log_cpu_timings(ctx, records)
    return records
