"""quant benchmark: fastpeft.dequantize / quantize (absmax and zero-point, 8 and 4 bits).

GPU: int8 -> bf16 (absmax, one scale per row) and int4 -> bf16 (zero-point, groups of 128)
on a [16384, 8192] tensor (134 M elements: >= 256 MB moved), and quantizing it back.
Per case: the torch path (the reference's ops: "unfused") and the kernels ("triton", "cuda"
where fastpeft._C has them, auto). Bytes = codes + scales/zero points + the 16-bit tensor,
against the copy bandwidth measured in the same run. Target (issue 4, dequantize only):
>= 85% of the copy bandwidth. Each output is checked against the torch path (exactly equal).

Also quant_linear (W4A16 zero-point g128, W8A16 absmax per row; 4096 -> 11008, M in {1, 16,
2048}) against bf16 F.linear with the original weight; targets (issue 4): M = 1 >= 2.5x (W4)
/ >= 1.6x (W8) faster, M >= 2048 within 1.15x.

And the static-vs-dynamic trade-off of int8 activations (Nagel et al., 2021) on the same layer (4096 ->
11008, M in {1, 16, 2048}): W8A8 (int8_linear, threshold 0) and W4A8 (quant_linear, zero-point
g128) with a scale per token computed at run time ("dynamic") or one calibrated step
("static"), against bf16 F.linear; each checked against its torch path. No target: measured.

CPU: times the static and dynamic int8 activations on the torch path against fp32 F.linear on a
small layer. Correctness of every backend is tests/'s (make test).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

import common

BENCH = "quant"
SHAPE = (16384, 8192)
QUICK_SHAPE = (4096, 8192)
CASES = (  # (name, bits, scheme, axis, group_size)
    ("int8 absmax per-row", 8, "absmax", 0, None),
    ("int4 zeropoint g128", 4, "zeropoint", None, 128),
)


def run(ctx: common.Context) -> list[dict]:
    if not ctx.cuda:
        return run_cpu(ctx)
    records: list[dict] = []  # one list: a crash in a later part keeps the earlier parts' records
    for part in (run_gpu, run_qlinear_gpu, run_act_gpu):
        part(ctx, records)
    return records


def _case(ctx, records: list[dict], op: str, what: str, measure_case) -> None:
    """One case: its records, or an error record when it fails (e.g. out of memory); saved."""
    try:
        records += measure_case()
    except common.Interrupted:
        raise
    except Exception as exc:
        if ctx.interrupted:
            raise common.Interrupted("signal during a case") from exc
        records.append(common.error_record(BENCH, op, what, f"failed: {common.short_error(exc)}"))
    ctx.empty_cache()
    ctx.save_partial(records)


def _impls(device: torch.device):
    from fastpeft import _backend
    out = [("torch", "unfused", None)]
    for name in ("triton", "cuda"):
        why = _backend.why_cannot_run(name, device, ("triton", "cuda", "torch"))
        if name == "cuda" and why is None:
            from fastpeft.ops import _cext
            if not hasattr(_cext, "quant_quantize"):
                why = "fastpeft.ops._cext has no quant kernels"
        out.append((f"fastpeft[{name}]", "variant", why))
    out.append(("fastpeft[auto]", "auto", None))
    return out


def _backend_of(impl: str) -> str | None:
    return None if impl == "fastpeft[auto]" else impl.removeprefix("fastpeft[").removesuffix("]")


def _exact(want: torch.Tensor, field: str | None = None) -> Callable[[common.Impl, dict], dict]:
    """A time_impls report: is the output (its ``field`` for a QuantizedTensor or its first element
    for a tuple) bit-equal to the torch path's?"""
    def report(im: common.Impl, out: dict) -> dict:
        y = out["y"]
        got = y[0] if isinstance(y, tuple) else (getattr(y, field) if field else y)
        ok = bool(got.shape == want.shape and torch.equal(got, want))
        return {"ok": ok} if ok else {"ok": False, "note": "WRONG: differs from the torch path"}
    return report


def run_gpu(ctx: common.Context, records: list[dict]) -> None:
    """dequantize and quantize, each kernel against the torch path (bit-equal outputs)."""
    import fastpeft
    rows, cols = QUICK_SHAPE if ctx.quick else SHAPE
    g = torch.Generator(device=ctx.device).manual_seed(0)
    x = torch.randn(rows, cols, generator=g, device=ctx.device, dtype=torch.bfloat16)
    for cname, bits, scheme, axis, group in CASES:
        if ctx.time_left() <= 0:
            records.append(common.error_record(BENCH, "dequantize", cname, common.budget_spent(ctx)))
            continue
        shape = {"rows": rows, "cols": cols, "case": cname}

        def measure_case():
            ref_q = fastpeft.quantize(x, bits, scheme, axis=axis, group_size=group, backend="torch")
            ref_y = fastpeft.dequantize(ref_q, backend="torch")
            nbytes = ref_q.nbytes + 2 * x.numel()
            out = []
            for op in ("dequantize", "quantize"):
                target = {"min_sol": 0.85} if op == "dequantize" else None
                impls = []
                for impl, role, why in _impls(x.device):
                    backend = _backend_of(impl)
                    extra = {}
                    if op == "dequantize":
                        fn = lambda _, b=backend: fastpeft.dequantize(ref_q, backend=b)
                    elif backend in ("triton", "cuda") and why is None:  # the kernel alone
                        fn = lambda _, k=fastpeft.ops.quant._kernels(backend)[0]: k(x, bits, scheme, axis, group)
                        extra["timed"] = "the quantize kernel alone"
                    else:
                        fn = lambda _, b=backend: fastpeft.quantize(x, bits, scheme, axis=axis, group_size=group,
                                                                    backend=b)
                        extra["timed"] = "fastpeft.quantize, its check that x is finite included"
                    impls.append(common.Impl(impl, role, fn, error=why and f"unavailable: {why}", bytes=nbytes,
                                             target=target if role != "unfused" else None, check=False,
                                             extra=extra if op == "quantize" else {}))
                report = _exact(ref_y) if op == "dequantize" else _exact(ref_q.data, "data")
                out += common.time_impls(ctx, BENCH, op, "fwd", shape, "bf16", impls, [None], want={"y": ref_y},
                                         report=report)
            return out

        _case(ctx, records, "quantize", cname, measure_case)
        ctx.log(f"  quant {cname}: done")


QLINEAR_M = (1, 16, 2048)
QLINEAR_KN = ((4096, 11008),)
QLINEAR_CASES = (("W4A16 zeropoint g128", 4, "zeropoint", 128), ("W8A16 absmax per-row", 8, "absmax", None))


def qlinear_target(M: int, bits: int) -> dict | None:
    """Issue 4's targets for the weight-only quantized linear layer."""
    if M == 1:
        return {"max_ratio_vs_base": 1 / (2.5 if bits == 4 else 1.6)}
    if M >= 2048:
        return {"max_ratio_vs_base": 1.15}
    return None


class _Layer:
    """One input set of a quantized layer: x, the bf16 weight and its quantized forms."""

    def __init__(self, M, K, N, g, device, qcase=None, act=False, dtype=torch.bfloat16):
        import fastpeft
        self.x = torch.randn(M, K, generator=g, device=device).to(dtype)
        self.W = (torch.randn(N, K, generator=g, device=device) / K ** 0.5).to(dtype)
        if qcase is not None:
            _, bits, scheme, group = qcase
            self.qw = fastpeft.quantize(self.W, bits, scheme, axis=None if group else 0, group_size=group)
        if act:  # {"W8A8 dynamic": fn(backend), ...} of the int8-activation layers on this set
            step = (self.x.float().abs().amax() / 127).reshape(())
            self.act = {f"{case} {a}": fn for case in ACT_CASES for a, fn in _act_fns(self.x, self.W, case, step).items()}


def run_qlinear_gpu(ctx: common.Context, records: list[dict]) -> None:
    """quant_linear (fused dequantize-GEMM) against bf16 F.linear with the original weight, the
    inputs rotated over copies (no L2 flush in CUDA graphs)."""
    import fastpeft
    g = torch.Generator(device=ctx.device).manual_seed(1)
    for K, N in QLINEAR_KN:
        for qcase in QLINEAR_CASES:
            cname, bits = qcase[0], qcase[1]
            for M in QLINEAR_M:
                if ctx.time_left() <= 0:
                    break
                shape = {"M": M, "K": K, "N": N, "case": cname}

                def measure_case():
                    flops = 2 * M * N * K
                    qbytes = N * K * bits // 8  # the codes; scales and zero points are small
                    n = common.input_copies(2 * (N * K + M * K + M * N) + qbytes)
                    sets = [_Layer(M, K, N, g, ctx.device, qcase) for _ in range(n)]
                    ours_bytes = sets[0].qw.nbytes + 2 * (M * K + M * N)
                    target = qlinear_target(M, bits)
                    impls = [common.Impl("base", "base", lambda p: F.linear(p.x, p.W), flops=flops,
                                         bytes=2 * (N * K + M * K + M * N), check=False)]
                    impls += [common.Impl(name, role, lambda p, b=backend: fastpeft.quant_linear(p.x, p.qw, backend=b),
                                          flops=flops, bytes=ours_bytes, target=target if role != "unfused" else None)
                              for name, role, backend in (("torch", "unfused", "torch"),
                                                          ("fastpeft[triton]", "variant", "triton"),
                                                          ("fastpeft[auto]", "auto", None))]
                    p0 = sets[0]
                    want = {"y": F.linear(p0.x.float(), fastpeft.dequantize(p0.qw, torch.float32, backend="torch"))}
                    return common.time_impls(ctx, BENCH, "quant_linear", "fwd", shape, "bf16", impls, sets,
                                             graph=M <= GRAPH_MAX_M, want=want)

                _case(ctx, records, "quant_linear", common.shape_str(shape), measure_case)
            ctx.log(f"  quant_linear {cname} {K}->{N}: done")


GRAPH_MAX_M = 16  # the decode-size rows whose layer is timed in CUDA graphs (launch overhead dominates)


ACT_CASES = ("W8A8", "W4A8")


def _act_fns(x, W, case: str, step: torch.Tensor):
    """{activations: fn(backend)} of one int8-activation layer case."""
    import fastpeft
    if case == "W8A8":
        from fastpeft.ops.int8 import quantize_weight
        w, sw = quantize_weight(W)
        return {"dynamic": lambda be: fastpeft.int8_linear(x, w, sw, None, 0.0, backend=be),
                "static": lambda be: fastpeft.int8_linear(x, w, sw, None, 0.0, input_scale=step, backend=be)}
    qw = fastpeft.quantize(W, 4, "zeropoint", group_size=128)
    return {act: (lambda be, act=act: fastpeft.quant_linear(x, qw, activations=act,
                                                            input_scale=step if act == "static" else None,
                                                            backend=be))
            for act in ("dynamic", "static")}


def _act_impls(M: int, K: int, N: int, backend_of_variants: str | None) -> list[common.Impl]:
    """bf16 (fp32 on the CPU) F.linear and the static / dynamic int8-activation layers (W8A8, W4A8)
    of an input set (a _Layer built with act=True)."""
    flops = 2 * M * N * K
    impls = [common.Impl("F.linear", "base", lambda p: F.linear(p.x, p.W), flops=flops, check=False)]
    for case in ACT_CASES:
        for act in ("dynamic", "static"):
            impls.append(common.Impl(f"{case} {act}", "variant",
                                     lambda p, name=f"{case} {act}": p.act[name](backend_of_variants), flops=flops))
    return impls


def run_act_gpu(ctx: common.Context, records: list[dict]) -> None:
    """Static vs dynamic int8 activations (W8A8, W4A8) against bf16 F.linear, each checked
    against its torch path, the inputs rotated over copies."""
    g = torch.Generator(device=ctx.device).manual_seed(2)
    for K, N in QLINEAR_KN:
        for M in QLINEAR_M:
            if ctx.time_left() <= 0:
                break
            shape = {"M": M, "K": K, "N": N}

            def measure_case():
                # bf16 W, its int8 codes and its int4 codes (about 2 + 1 + 0.5 bytes a weight)
                n = common.input_copies(2 * (M * K + M * N) + 7 * N * K // 2)
                sets = [_Layer(M, K, N, g, ctx.device, act=True) for _ in range(n)]
                out = []
                for im in _act_impls(M, K, N, None):  # each against its own torch path: a want each
                    want = {"y": sets[0].act[im.name]("torch")} if im.check else None
                    out += common.time_impls(ctx, BENCH, "int8_activations", "fwd", shape, "bf16", [im], sets,
                                             graph=M <= GRAPH_MAX_M, want=want)
                return out

            _case(ctx, records, "int8_activations", common.shape_str(shape), measure_case)
        ctx.log(f"  int8 activations {K}->{N}: done")


# ---------------------------------------------------------------------------------------------
# CPU: the static-vs-dynamic trade-off on the torch path (correctness: tests/test_quant*.py,
# tests/test_act_quant.py)


CPU_ACT_SHAPE = (256, 1024, 1024)  # M, K, N


def run_cpu(ctx: common.Context) -> list[dict]:
    M, K, N = CPU_ACT_SHAPE
    ctx.bench_meta["quant"] = {"note": "CPU: int8 activations (static / dynamic) on the torch path only; "
                                       "quantize / dequantize / quant_linear are timed on the GPU"}
    ctx.log("quant: CPU timings of int8 activations (fp32, torch path; torch.utils.benchmark medians)")
    layer = _Layer(M, K, N, torch.Generator().manual_seed(2), "cpu", act=True, dtype=torch.float32)
    impls = [dataclasses.replace(im, check=False) for im in _act_impls(M, K, N, "torch")]
    records = common.time_impls(ctx, BENCH, "int8_activations", "fwd", {"M": M, "K": K, "N": N}, "fp32",
                                impls, [layer])
    common.log_cpu_timings(ctx, records)
    return records
