"""The benchmarks' GPU code paths at tiny shapes, so that a GPU session (rare, and short) does not
find a broken bench: every bench's ``run_gpu``, CUDA graphs on and off. Without a GPU: with CPU
tensors (the Triton kernels in the interpreter), the triton.testing timers replaced by one timed
call; with one: as they run. What is checked is that each implementation runs, is timed and is checked against its
reference, not any timing. Also: the one implementation loop (``common.time_impls``) reports a
wrong output as wrong.
"""
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_bottleneck  # noqa: E402
import bench_distill  # noqa: E402
import bench_int8  # noqa: E402
import bench_lora  # noqa: E402
import bench_multi_lora  # noqa: E402
import bench_qlora  # noqa: E402
import bench_quant  # noqa: E402
import common  # noqa: E402

# errors a record may carry here: backends and peers that do not run on this machine
EXPECTED_ERRORS = ("unavailable:", "not installed")


def _one_call(fn, ctx, *, graph=False, grad_to_none=None):
    """Stands in for triton.testing's timers: the milliseconds of one call."""
    for t in grad_to_none or ():
        t.grad = None
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@pytest.fixture(params=[False, True], ids=["eager", "graphs"])
def gpu_ctx(request, monkeypatch):
    """A GPU-run Context; ``graphs``: every shape takes the CUDA-graph path. Without a GPU its
    inputs live on the CPU and one timed call stands in for triton.testing's timers (the graph
    timer too); with one, the real thing at tiny shapes."""
    monkeypatch.setattr(common, "GRAPH_BELOW_MS", float("inf") if request.param else 0.0)
    if torch.cuda.is_available():
        return common.Context(cuda=True, quick=True)
    monkeypatch.setattr(common, "gpu_ms", _one_call)
    # two input sets still rotate; the 8 that a CPU's L2 asks for only multiply the interpreted setup
    monkeypatch.setattr(common, "input_copies", lambda set_bytes: 2)
    ctx = common.Context(cuda=True, device_type="cpu", quick=True)
    ctx.ceilings = {"copy_gbps": 10.0, "matmul_tflops": {"bf16": 0.1}, "int8_tops": 0.1}
    return ctx


def _check_records(records, ctx, min_checked=1):
    assert records
    assert not [r for r in records if r["kind"] == "error"]
    timings = [r for r in records if r["kind"] == "timing"]
    for r in timings:
        if r["error"]:
            assert r["error"].startswith(EXPECTED_ERRORS), (r["impl"], r["error"])
            continue
        assert r["ms"] is not None and r["ms"] > 0, r
        assert r.get("ok", True) is True, (r["impl"], r["mode"], r.get("note"))
        assert "check failed" not in (r.get("note") or ""), (r["impl"], r["note"])
    checked = [r for r in timings if r.get("ok") is True]
    assert len(checked) >= min_checked
    assert any(r["role"] == "auto" and r["ms"] for r in timings)
    common.finalize(records, ctx.ceilings)
    assert "## Summary" in common.markdown({"stamp": "test"}, records)
    return timings


def test_lora_gpu_path(gpu_ctx, monkeypatch):
    monkeypatch.setattr(bench_lora, "QUICK", dict(M=(3,), KN=((40, 24),), R=(4,)))
    timings = _check_records(bench_lora.run_gpu(gpu_ctx), gpu_ctx)
    impls = {(r["impl"], r["mode"]) for r in timings if r["ms"]}
    for name in ("base", "unfused", "fastpeft[triton,fused]", "fastpeft[triton,split]", "fastpeft[auto]"):
        assert {(name, "fwd"), (name, "fwdbwd")} <= impls, name
    grads = [r for r in timings if r["mode"] == "fwdbwd" and r.get("rel_errs")]
    assert grads and all(set(r["rel_errs"]) == {"dx", "dA", "dB"} for r in grads)


def test_bottleneck_gpu_path(gpu_ctx, monkeypatch):
    monkeypatch.setattr(bench_bottleneck, "QUICK_M", (5,))
    monkeypatch.setattr(bench_bottleneck, "D_MODEL", 48)
    monkeypatch.setattr(bench_bottleneck, "BOTTLENECK", 8)
    timings = _check_records(bench_bottleneck.run_gpu(gpu_ctx), gpu_ctx)
    assert any(r["impl"] == "fastpeft[triton]" and r["mode"] == "fwdbwd" and r.get("ok") for r in timings)


def test_int8_gpu_path(gpu_ctx, monkeypatch):
    monkeypatch.setattr(bench_int8, "QUICK", dict(M=(5,), KN=((64, 40),)))
    timings = _check_records(bench_int8.run_gpu(gpu_ctx), gpu_ctx)
    fwd = [r for r in timings if r["mode"] == "fwd" and r["ms"]]
    assert {r["threshold"] for r in fwd} == set(bench_int8.THRESHOLDS)
    assert all(r.get("err_vs_exact") is not None for r in fwd)
    assert any(r["impl"] == "fastpeft[triton]" and r.get("ok") for r in fwd)
    assert any(r["mode"] == "fwdbwd" and r["role"] == "auto" and set(r["rel_errs"]) == {"y", "dx"} for r in timings)


def test_multi_lora_gpu_path(gpu_ctx, monkeypatch):
    monkeypatch.setattr(bench_multi_lora, "GPU_CASES", {"decode": (3, 1, 3), "prefill": (2, 5, 2)})
    monkeypatch.setattr(bench_multi_lora, "K_IN", 32)
    monkeypatch.setattr(bench_multi_lora, "N_OUT", 24)
    monkeypatch.setattr(bench_multi_lora, "RANK", 4)
    timings = _check_records(bench_multi_lora.run_gpu(gpu_ctx), gpu_ctx)
    assert {r["mode"] for r in timings if r.get("ok")} == {"layer", "update"}


# quant, distill and qlora: eager only on the CPU, where the graph timer is the same one-call stand-in the
# other benches' [graphs] runs already cover, and their interpreted setup costs ~20 s a run
EAGER_ON_CPU = pytest.mark.parametrize("gpu_ctx", [False, True] if torch.cuda.is_available() else [False],
                                       indirect=True, ids=lambda g: "graphs" if g else "eager")


@EAGER_ON_CPU
def test_quant_gpu_path(gpu_ctx, monkeypatch):
    monkeypatch.setattr(bench_quant, "QUICK_SHAPE", (4, 256))
    monkeypatch.setattr(bench_quant, "QLINEAR_KN", ((256, 48),))
    monkeypatch.setattr(bench_quant, "QLINEAR_M", (1, 3))
    timings = _check_records(bench_quant.run(gpu_ctx), gpu_ctx)
    assert {r["op"] for r in timings if r.get("ok")} == {"dequantize", "quantize", "quant_linear", "int8_activations"}


@EAGER_ON_CPU
def test_distill_gpu_path(gpu_ctx, monkeypatch):
    for name, value in (("TOKENS", 16), ("VOCAB", 300), ("HS", 16), ("HT", 32)):
        monkeypatch.setattr(bench_distill, name, value)
    timings = _check_records(bench_distill.run_gpu(gpu_ctx), gpu_ctx)
    assert {r["op"] for r in timings if r.get("ok")} == {"distillation_loss", "fused_linear_distillation"}


@EAGER_ON_CPU
def test_qlora_gpu_path(gpu_ctx, monkeypatch):
    """Every implementation over the same 4-bit codes (bitsandbytes' where installed), checked
    against one fp32 computation: PEFT + bitsandbytes included when both are installed."""
    monkeypatch.setattr(bench_qlora, "QUICK", dict(M=(3,), KN=((72, 24),)))
    monkeypatch.setattr(bench_qlora, "R", 4)
    # the end-to-end training step on a tiny Llama (its K = 64 and 96: whole NF4 blocks)
    monkeypatch.setattr(bench_qlora, "TRAIN_QUICK", dict(hidden=64, intermediate=96, layers=1, heads=4, kv_heads=2,
                                                         vocab=64, batch=2, seq=8))
    timings = _check_records(bench_qlora.run_gpu(gpu_ctx), gpu_ctx)
    ok = {(r["impl"], r["mode"]) for r in timings if r.get("ok")}
    peer = bench_qlora.bnb_status()[0] and common.peft_status()[0]
    names = ["unfused", "fastpeft[auto]"] + (["peft"] if peer else [])
    for name in names:
        assert {(name, "fwd"), (name, "fwdbwd")} <= ok, name
    # the int4 variant (other codes: timed, not compared; tests/test_qlora.py checks it) ran both modes
    assert {r["mode"] for r in timings if r["impl"] == "fastpeft[int4]" and not r["error"] and r["ms"]} == \
        {"fwd", "fwdbwd"}
    grads = [r for r in timings if r["mode"] == "fwdbwd" and r.get("rel_errs")]
    assert grads and all(set(r["rel_errs"]) == {"dx", "dA", "dB"} for r in grads)
    steps = {r["impl"]: r for r in timings if r["op"] == bench_qlora.TRAIN_OP and not r["error"]}
    assert set(steps) == {"bf16 LoRA", "fastpeft[auto]"} | ({"peft"} if peer else set())
    assert all(r["tokens_per_s"] > 0 and r["first_loss"] > 0 for r in steps.values())
    # every variant trains the same adapters (r = 4 on the 7 projections of the layer)
    assert len({r["trainable"] for r in steps.values()}) == 1
    if peer:  # the two 4-bit models start from the same codes: the same first loss
        assert abs(steps["peft"]["first_loss"] - steps["fastpeft[auto]"]["first_loss"]) < 1e-2


def test_time_impls_reports_a_wrong_output():
    """A wrong implementation comes out as ok=False with the failing quantity in the note; a
    failing one as its error; the CPU timer gives every other one a time."""
    ctx = common.Context(cuda=False, quick=True)
    x = torch.randn(8, 16)
    w = torch.randn(4, 16)
    want = {"y": x @ w.t()}

    def broken(_):
        raise RuntimeError("no kernel")

    impls = [common.Impl("right", "auto", lambda _: x @ w.t()),
             common.Impl("wrong", "variant", lambda _: 1.01 * (x @ w.t())),
             common.Impl("misshapen", "variant", lambda _: (x @ w.t())[:4]),
             common.Impl("crashes", "variant", broken),
             common.Impl("absent", "variant", error="unavailable: not here")]
    recs = {r["impl"]: r for r in common.time_impls(ctx, "t", "op", "fwd", {"M": 8}, "fp32", impls, [None],
                                                    want=want)}
    assert recs["right"]["ok"] is True and recs["right"]["ms"] > 0
    assert recs["wrong"]["ok"] is False and "WRONG" in recs["wrong"]["note"] and "y" in recs["wrong"]["note"]
    assert recs["misshapen"]["ok"] is False and "check failed" in recs["misshapen"]["note"]
    assert recs["crashes"]["ms"] is None and "no kernel" in recs["crashes"]["error"]
    assert recs["absent"]["error"] == "unavailable: not here"


def test_ratios_compare_like_with_like():
    """When only one side of a ratio was timed in CUDA graphs, the graph-timed side's eager time is
    used (and the record says so); the fastest variant is picked on one basis too."""
    def rec(impl, role, ms, ms_eager=None, timing="do_bench"):
        return common.timing_record("b", "op", "fwd", {"M": 1}, "bf16", impl, role,
                                    common.Measured(ms=ms, ms_eager=ms_eager, timing=timing))

    base = rec("base", "base", 1.0, 2.0, "cudagraph")
    eager_variant = rec("v1", "variant", 3.0)  # its capture failed: eager only
    graphed_variant = rec("v2", "variant", 1.5, 3.5, "cudagraph")
    auto = rec("auto", "auto", 1.5, 3.5, "cudagraph")
    peer = rec("peer", "peer", 7.0)  # syncs with the host: eager only
    common.finalize([base, eager_variant, graphed_variant, auto, peer], {})
    assert eager_variant["ratio_vs_base"] == pytest.approx(1.5) and "eager" in eager_variant["ratio_vs_base_basis"]
    assert graphed_variant["ratio_vs_base"] == pytest.approx(1.5) and "ratio_vs_base_basis" not in graphed_variant
    assert auto["speedup_vs_peer"] == pytest.approx(2.0) and "eager" in auto["speedup_vs_peer_basis"]
    assert auto["fastest"] == "v1" and auto["auto_vs_fastest"] == pytest.approx(3.5 / 3.0)


# ---------------------------------------------------------------------------------------------
# the CPU report (`make bench` without a GPU)


def _rec(op, mode, M, impl, role, ms, lo, hi, target=None, **shape):
    return common.timing_record("b", op, mode, {"M": M, **shape}, "fp32", impl, role,
                                common.Measured(ms=ms, ms_min=lo, ms_max=hi, timing="torch.utils.benchmark"),
                                target=target)


def test_ratio_ranges_follow_the_spreads():
    base = _rec("op", "fwd", 4, "base", "base", 1.0, 0.9, 1.2)
    ours = _rec("op", "fwd", 4, "ours", "auto", 2.0, 1.8, 2.5)
    peer = _rec("op", "fwd", 4, "peer", "peer", 3.0, 2.0, 4.0)
    common.finalize([base, ours, peer], {})
    assert ours["ratio_vs_base"] == pytest.approx(2.0)
    assert ours["ratio_vs_base_range"] == pytest.approx((1.8 / 1.2, 2.5 / 0.9))
    assert ours["speedup_vs_peer_range"] == pytest.approx((2.0 / 2.5, 4.0 / 1.8))
    row = common.summary_rows([base, ours, peer])[0]
    assert "2.000 (1.800-2.500)" in row and "1.50 (0.80-2.22)" in row


def test_cpu_summary_drops_the_columns_it_cannot_fill():
    recs = common.finalize([_rec("op", "fwd", 4, "base", "base", 1.0, 0.9, 1.2),
                            _rec("op", "fwd", 4, "ours", "auto", 2.0, 1.8, 2.5)], {})
    headers, rows = common.drop_empty_columns(common.SUMMARY_HEADERS, common.summary_rows(recs))
    assert "target" not in headers and "meets" not in headers and "vs peer" not in headers
    assert "x base" in headers and len(rows[0]) == len(headers)
    text = common.markdown({"stamp": "t", "environment": {}}, recs)
    assert "no timed output was checked" in text.splitlines()[2]  # none was: it says so, first
    assert "| target |" not in text


def test_plot_draws_only_panels_with_data():
    """CPU records (one M per shape: bars with their spread) and GPU-like records (several M:
    lines, a target) in one file: one panel each, none empty, the target drawn; a group that
    holds only its base op gets no panel."""
    pytest.importorskip("matplotlib")
    import plot

    recs = []
    for mode in ("eval", "fwd+bwd"):  # CPU-like: one M
        recs += [_rec("lora", mode, 1, "nn.Linear", "base", 1.0, 0.9, 1.1, K=64),
                 _rec("lora", mode, 1, "PEFT LoRA", "peer", 4.0, 3.5, 5.0, K=64),
                 _rec("lora", mode, 1, "LoRALinear", "auto", 3.0, 2.5, 3.2, K=64)]
    recs += [_rec("alone", "fwd", 1, "base", "base", 1.0, 1.0, 1.0)]  # nothing to compare: no panel
    for M in (1, 16, 2048):  # GPU-like: several M, a target
        recs += [_rec("lora_linear", "fwd", M, "base", "base", 1.0, 1.0, 1.0, K=4096),
                 _rec("lora_linear", "fwd", M, "fastpeft[auto]", "auto", 1.1, 1.1, 1.1,
                      target={"max_ratio_vs_base": 1.15}, K=4096)]
    common.finalize(recs, {})
    fig, n = plot.build_figure({"meta": {"stamp": "t", "device": "cpu"}, "records": recs})
    try:
        assert n == 3 and len(fig.axes) == 3
        for ax in fig.axes:
            drawn = [p for p in ax.patches if p.get_width() > 0] + [ln for ln in ax.lines if len(ln.get_xdata()) > 1]
            assert drawn, ax.get_title()
        lines = next(ax for ax in fig.axes if ax.get_title().startswith("lora_linear"))
        assert any(list(ln.get_ydata()) == [1.15, 1.15] for ln in lines.lines)  # the target
        assert "dash-dot: target" in fig._suptitle.get_text()
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    fig, n = plot.build_figure({"meta": {}, "records": recs[:3] + recs[6:7]})
    try:
        assert n == 1 and "target" not in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_cpu_run_reports_correctness_first_and_never_overwrites(tmp_path, monkeypatch, capsys):
    """Two CPU runs into one folder: two reports, the first left as it was; the report leads with
    the correctness of what it timed, and says what a CPU run cannot measure."""
    import types

    import run

    fake = types.ModuleType("fake_bench")

    def fake_run(ctx):
        x, w = torch.randn(8, 16), torch.randn(4, 16)
        impls = [common.Impl("base", "base", lambda _: x @ w.t(), check=False),
                 common.Impl("ours", "auto", lambda _: x @ w.t())]
        return common.time_impls(ctx, "fake", "op", "fwd", {"M": 8}, "fp32", impls, [None], want={"y": x @ w.t()})

    fake.run = fake_run
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setattr(run, "BENCHES", {"fake": "fake_bench"})
    monkeypatch.setattr(run, "CUDA", False)
    monkeypatch.setattr(common, "measure_ceilings", lambda ctx: {})
    monkeypatch.setattr(common, "CPU_ROUNDS", 2)
    args = ["--quick", "--out-dir", str(tmp_path), "--stamp", "s", "--no-plot"]
    assert run.main(args) == 0
    first = (tmp_path / "s.md").read_text()
    assert run.main(args) == 0
    assert (tmp_path / "s.md").read_text() == first and (tmp_path / "s-2.md").exists()
    assert (tmp_path / "s-2.json").exists()
    out = capsys.readouterr().out
    results = out[out.rindex("Results (CPU"):]
    assert results.splitlines()[1].startswith("Correctness: 1/1 timed outputs match")
    assert "What a CPU run measures" in first and "cannot measure" in first
    assert first.splitlines()[2].startswith("**Correctness: 1/1")
    assert " (" in results  # times with their spread
