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

CPU: the triton kernel (interpreted) against the torch backend on small shapes, every
divergence, loss and gradients, and the fused-linear op's triton and torch backends.
"""
from __future__ import annotations

import math

import torch

import common
from common import check_record, measure, timing_record

BENCH = "distill"
TOKENS, VOCAB = 8192, 128256
HS, HT = 2048, 4096
T, ALPHA = 2.0, 0.5
LOSS_TARGET = {"min_speedup_vs_unfused": 2.0}
LOSS_MEM_TARGET = 3.0
FUSED_MEM_TARGET = 4.0


def run(ctx: common.Context) -> list[dict]:
    return run_gpu(ctx) if ctx.cuda else run_cpu(ctx)


def _peak_extra(fn) -> tuple[int, int]:
    """(peak bytes allocated during fn() above what was allocated before it, that baseline)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
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


def _loss_case(ctx, records, z, u, labels, divergence):
    import fastpeft
    shape = {"tokens": z.shape[0], "vocab": z.shape[1], "div": divergence}
    leaf = z.clone().requires_grad_()
    fast = lambda b: (lambda: fastpeft.distillation_loss(leaf, u, labels, T, ALPHA, divergence=divergence, backend=b))
    impls = [("torch composition", "unfused", lambda: composition(leaf, u, labels, divergence)),
             ("fastpeft[triton]", "variant", fast("triton")), ("fastpeft[auto]", "auto", fast(None))]
    results, mem = {}, {}
    for impl, role, loss_fn in impls:
        def step(f=loss_fn):
            leaf.grad = None
            f().backward()
        m = measure(step, ctx, grad_to_none=[leaf])
        extra = {}
        if m.error is None:
            try:
                leaf.grad = None
                peak, base = _peak_extra(step)
                mem[impl] = peak
                extra.update(peak_mem_extra_gib=peak / 2**30, inputs_gib=base / 2**30)
                loss = loss_fn()
                leaf.grad = None
                loss.backward()
                results[impl] = (loss.detach().float(), leaf.grad.detach().clone())
            except Exception as exc:
                extra["note"] = f"memory/check failed: {common.short_error(exc, 120)}"
        leaf.grad = None
        records.append(timing_record(BENCH, "distillation_loss", "fwdbwd", shape, "bf16", impl, role, m,
                                     bytes_=5 * z.numel() * z.element_size(),
                                     target=LOSS_TARGET if role != "unfused" else None, **extra))
        torch.cuda.empty_cache()
    ref = results.get("torch composition")
    for r in records[-len(impls):]:
        got = results.get(r["impl"])
        if r["role"] != "unfused" and got is not None and ref is not None:
            r["rel_err"] = max(common.rel_err(got[0], ref[0]), common.rel_err(got[1], ref[1]))
            r["ok"] = r["rel_err"] <= common.TOL["bf16"]
            if not r["ok"]:
                r["note"] = f"WRONG: rel err {r['rel_err']:.2e} against the torch composition"
        if r["role"] != "unfused" and r["impl"] in mem and mem.get("torch composition"):
            ratio = mem["torch composition"] / max(mem[r["impl"]], 1)
            r["mem_ratio_vs_unfused"] = ratio
            r["mem_target"] = f">= {LOSS_MEM_TARGET:g}x less peak memory than unfused"
            r["mem_meets"] = ratio >= LOSS_MEM_TARGET
            r.setdefault("note", f"peak +{_gib(mem[r['impl']])} vs unfused +{_gib(mem['torch composition'])}: "
                                 f"{ratio:.1f}x less "
                                 f"(target >= {LOSS_MEM_TARGET:g}x: {'met' if r['mem_meets'] else 'NOT met'})")
    ctx.log(f"  distillation_loss {divergence}: peak above inputs "
            + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items()))
    return mem


def _fused_case(ctx, records, hs, ws, ht, wt, labels):
    import fastpeft
    shape = {"tokens": hs.shape[0], "vocab": ws.shape[0], "Hs": hs.shape[1], "Ht": ht.shape[1]}
    h = hs.clone().requires_grad_()
    w = ws.clone().requires_grad_()
    mod = fastpeft.FusedLinearDistillationLoss(temperature=T, alpha=ALPHA)
    F = torch.nn.functional

    def materialized_torch():
        with torch.no_grad():
            u = F.linear(ht, wt)
        return composition(F.linear(h, w), u, labels, "forward_kl")

    def materialized_kernel():
        with torch.no_grad():
            u = F.linear(ht, wt)
        return fastpeft.distillation_loss(F.linear(h, w), u, labels, T, ALPHA)

    impls = [("materialized torch", "unfused", materialized_torch),
             ("materialized+fastpeft[auto]", "variant", materialized_kernel),
             ("fastpeft[fused-linear]", "auto", lambda: mod(h, w, ht, wt, labels))]
    results, mem = {}, {}
    for impl, role, loss_fn in impls:
        def step(f=loss_fn):
            h.grad = w.grad = None
            f().backward()
        m = measure(step, ctx, grad_to_none=[h, w])
        extra = {}
        if m.error is None:
            try:
                h.grad = w.grad = None
                peak, base = _peak_extra(step)
                mem[impl] = peak
                extra.update(peak_mem_extra_gib=peak / 2**30, inputs_gib=base / 2**30)
                h.grad = w.grad = None
                loss = loss_fn()
                loss.backward()
                results[impl] = (loss.detach().float(), h.grad.detach().clone(), w.grad.detach().clone())
            except Exception as exc:
                extra["note"] = f"memory/check failed: {common.short_error(exc, 120)}"
        h.grad = w.grad = None
        flops = 2 * 2 * hs.shape[0] * ws.shape[0] * hs.shape[1] + 2 * hs.shape[0] * ws.shape[0] * ht.shape[1]
        records.append(timing_record(BENCH, "fused_linear_distillation", "fwdbwd", shape, "bf16", impl, role, m,
                                     flops=flops + 2 * hs.shape[0] * ws.shape[0] * hs.shape[1],
                                     target=None, **extra))
        torch.cuda.empty_cache()
    ref = results.get("materialized torch")
    for r in records[-len(impls):]:
        got = results.get(r["impl"])
        if r["role"] != "unfused" and got is not None and ref is not None:
            r["rel_err"] = max(common.rel_err(a, b) for a, b in zip(got, ref))
            r["ok"] = r["rel_err"] <= common.TOL["bf16"]
            if not r["ok"]:
                r["note"] = f"WRONG: rel err {r['rel_err']:.2e} against the materialized torch way"
        if r["role"] != "unfused" and r["impl"] in mem and mem.get("materialized torch"):
            ratio = mem["materialized torch"] / max(mem[r["impl"]], 1)
            r["mem_ratio_vs_unfused"] = ratio
            if r["role"] == "auto":
                r["mem_target"] = f">= {FUSED_MEM_TARGET:g}x less peak memory than the materialized torch way"
                r["mem_meets"] = ratio >= FUSED_MEM_TARGET
            r.setdefault("note", f"peak +{_gib(mem[r['impl']])} vs materialized torch "
                                 f"+{_gib(mem['materialized torch'])}: {ratio:.1f}x less"
                                 + (f" (target >= {FUSED_MEM_TARGET:g}x: {'met' if r['mem_meets'] else 'NOT met'})"
                                    if r["role"] == "auto" else ""))
    ctx.log("  fused-linear distillation: peak above inputs " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items()))
    return mem


def run_gpu(ctx: common.Context) -> list[dict]:
    records: list[dict] = []
    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(TOKENS, VOCAB, generator=g, device=dev, dtype=torch.bfloat16) * 2
    u = (0.6 * z.float() + 1.5 * torch.randn(TOKENS, VOCAB, generator=g, device=dev)).to(torch.bfloat16)
    labels = _labels(TOKENS, VOCAB, g, dev)
    summary = {}
    for divergence in (("forward_kl",) if ctx.quick else ("forward_kl", "jsd")):
        if ctx.time_left() <= 0:
            break
        try:
            summary[f"loss {divergence} peak GiB"] = {k: v / 2**30 for k, v in
                                                      _loss_case(ctx, records, z, u, labels, divergence).items()}
        except Exception as exc:  # e.g. out of memory: record, go on
            records.append(check_record(BENCH, "distillation_loss", divergence, "bf16", "run", None, 0.0,
                                        error=f"failed: {common.short_error(exc)}"))
        ctx.save_partial(records)
    del z, u
    torch.cuda.empty_cache()
    if ctx.time_left() > 0:
        hs = torch.randn(TOKENS, HS, generator=g, device=dev, dtype=torch.bfloat16)
        ht = torch.randn(TOKENS, HT, generator=g, device=dev, dtype=torch.bfloat16)
        ws = (torch.randn(VOCAB, HS, generator=g, device=dev) * (2 / HS ** 0.5)).to(torch.bfloat16)
        wt = (torch.randn(VOCAB, HT, generator=g, device=dev) * (2 / HT ** 0.5)).to(torch.bfloat16)
        try:
            summary["fused-linear peak GiB"] = {k: v / 2**30 for k, v in
                                                _fused_case(ctx, records, hs, ws, ht, wt, labels).items()}
        except Exception as exc:
            records.append(check_record(BENCH, "fused_linear_distillation", "fused-linear", "bf16", "run", None, 0.0,
                                        error=f"failed: {common.short_error(exc)}"))
        ctx.save_partial(records)
    ctx.bench_meta["distill"] = {
        "peak memory": "torch.cuda.max_memory_allocated during one forward + backward minus the memory "
                       "allocated before it (the inputs); GiB",
        **summary}
    return records


# ---------------------------------------------------------------------------------------------
# CPU: the interpreted kernel against the torch backend


CHECK_CASES = (  # (divergence, temperature, alpha)
    ("forward_kl", 2.0, 0.5), ("reverse_kl", 1.0, 0.3), ("jsd", 0.7, 1.0), ("forward_kl", 1.5, 0.0))


def run_cpu(ctx: common.Context) -> list[dict]:
    import fastpeft
    from fastpeft import _backend
    records: list[dict] = []
    if not (_backend.interpreter_active() and _backend.triton_status()[0]):
        return [check_record(BENCH, "distillation_loss", "triton backend", "-", "all", None, 0.0,
                             error="not checked: the Triton interpreter is not active")]
    g = torch.Generator().manual_seed(0)
    N, V, H = 12, 300, 32
    z = torch.randn(N, V, generator=g) * 2
    u = 0.6 * z + torch.randn(N, V, generator=g) * 1.5
    labels = _labels(N, V, g, "cpu")
    for divergence, temp, alpha in CHECK_CASES[:2] if ctx.quick else CHECK_CASES:
        for dtype in (torch.float32, torch.float16):
            dname = common.DTYPE_NAMES[dtype]
            name = f"triton vs torch: {divergence} T={temp} alpha={alpha}"
            try:
                out = {}
                for backend in ("triton", "torch"):
                    leaf = z.to(dtype).detach().clone().requires_grad_()
                    loss = fastpeft.distillation_loss(leaf, u.to(dtype), labels, temp, alpha, divergence=divergence,
                                                      backend=backend)
                    loss.backward()
                    out[backend] = (loss.detach(), leaf.grad)
                for i, q in enumerate(("loss", "d student")):
                    records.append(check_record(BENCH, "distillation_loss", name, dname, q,
                                                common.rel_err(out["triton"][i], out["torch"][i]), common.TOL[dname]))
            except Exception as exc:
                records.append(check_record(BENCH, "distillation_loss", name, dname, "all", None, 0.0,
                                            error=f"failed: {common.short_error(exc)}"))
    for divergence in ("forward_kl", "reverse_kl", "jsd"):  # the GPU baseline computes the same loss
        a = composition(z, u, labels, divergence)
        b = fastpeft.distillation_loss(z, u, labels, T, ALPHA, divergence=divergence, backend="torch")
        records.append(check_record(BENCH, "distillation_loss", f"torch composition vs reference: {divergence}",
                                    "fp32", "loss", common.rel_err(a, b), common.TOL["fp32"]))
    hs, ht = torch.randn(N, H, generator=g), torch.randn(N, 2 * H, generator=g)
    ws, wt = torch.randn(V, H, generator=g) / H ** 0.5, torch.randn(V, 2 * H, generator=g) / (2 * H) ** 0.5
    bs = torch.randn(V, generator=g) * 0.1
    try:
        out = {}
        for backend in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
            loss = fastpeft.fused_linear_distillation_loss(leaves[0], leaves[1], ht, wt, labels, leaves[2],
                                                           temperature=T, alpha=ALPHA, chunk_size=5, backend=backend)
            loss.backward()
            out[backend] = (loss.detach(), *(t.grad for t in leaves))
        for i, q in enumerate(("loss", "d hidden", "d weight", "d bias")):
            records.append(check_record(BENCH, "fused_linear_distillation", "triton vs torch: chunks of 5 rows",
                                        "fp32", q, common.rel_err(out["triton"][i], out["torch"][i]),
                                        common.TOL["fp32"]))
    except Exception as exc:
        records.append(check_record(BENCH, "fused_linear_distillation", "triton vs torch", "fp32", "all", None, 0.0,
                                    error=f"failed: {common.short_error(exc)}"))
    n_ok = sum(r["ok"] for r in records)
    ctx.log(f"distill: {n_ok}/{len(records)} triton-vs-torch checks passed; GPU timings and memory need CUDA")
    return records
