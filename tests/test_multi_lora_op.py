"""fastpeft.multi_lora (many LoRA adapters in one batch) against the float64 reference."""

import math

import pytest
import torch

import fastpeft
from fastpeft import _backend
from fastpeft.ops import multi_lora as ops_ml
from fastpeft.reference import multi_lora as ref

from _dtypes import DTYPES, case_id, dtype_cases
from _utils import DEVICE, assert_close

KERNEL_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" and "cuda" in ops_ml.KERNELS
                                and _backend.cuda_ext_status()[0] else [])
RANKS = (1, 3, 16, 64)            # one stack, r_max = 64
SCALINGS = (0.5, 2.0, 1.0, 0.25)


@pytest.fixture
def force_regime(monkeypatch):
    def force(name):
        if name is not None:
            monkeypatch.setattr(ops_ml, "regime", lambda T, n: name)
    return force


def pattern_indices(T, n, pattern, g):
    """'mixed': every row its own draw (decode-like, -1 included); 'runs': long runs of one
    adapter, in an unsorted order, the same adapter in several runs, a run of -1."""
    if pattern == "mixed":
        return torch.randint(-1, n, (T,), generator=g)
    order = [3, 1, -1, 0, 2, 1, 3, 0][: max(1, min(8, T))]
    order = [a % n if a >= 0 else -1 for a in order]
    cuts = sorted(torch.randperm(max(T - 1, 1), generator=g)[: len(order) - 1].add(1).tolist())
    bounds = [0] + cuts + [T]
    idx = torch.empty(T, dtype=torch.int64)
    for a, lo, hi in zip(order, bounds[:-1], bounds[1:]):
        idx[lo:hi] = a
    return idx


def make(T, K, N, dtype, *, ranks=RANKS, r_max=64, pattern="mixed", seed=0, device=DEVICE, nan=True):
    g = torch.Generator().manual_seed(seed + 1000 * T + K + 7 * N)
    n = len(ranks)
    x = torch.randn(T, K, generator=g, dtype=torch.float64)
    A = torch.randn(n, r_max, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    B = torch.randn(n, N, r_max, generator=g, dtype=torch.float64)
    for a, r in enumerate(ranks):
        B[a] /= math.sqrt(max(1, min(r, r_max)))
        if nan:  # garbage beyond each rank must never reach the result
            A[a, r:] = float("nan")
            B[a, :, r:] = float("nan")
    rk = torch.tensor(ranks, dtype=torch.int32)
    s = torch.tensor([SCALINGS[a % len(SCALINGS)] for a in range(n)], dtype=torch.float32)
    idx = pattern_indices(T, n, pattern, g)
    to = lambda t: t.to(device, dtype)
    return to(x), to(A), to(B), rk.to(device), s.to(device), idx.to(device)


def reference(x, A, B, ranks, s, idx, out=None):
    d = lambda t: t.detach().cpu().double()
    return ref.multi_lora(d(x), d(A), d(B), ranks.cpu(), s.cpu().double(), idx.cpu(),
                          None if out is None else d(out))


# --------------------------------------------------------------------------------- numerics


SHAPES = [(1, 37, 45), (37, 70, 50), (100, 64, 72)]


# (backend, regime): the torch backend has no regimes
BACKEND_REGIMES = [(b, r) for b in KERNEL_BACKENDS for r in ("decode", "prefill")] + [("torch", None)]


@pytest.mark.parametrize("backend,regime", BACKEND_REGIMES, ids=lambda v: v or "-")
@pytest.mark.parametrize("dtype,pattern,shape", dtype_cases([(p, s) for p in ("mixed", "runs") for s in SHAPES],
                                                            [("mixed", SHAPES[0]), ("runs", SHAPES[1])]),
                         ids=case_id)  # bf16 on the CPU: each pattern once, on the shapes that run fast in decode
def test_matches_reference(backend, regime, dtype, pattern, shape, poison_outputs, force_regime):
    force_regime(regime)
    T, K, N = shape
    x, A, B, rk, s, idx = make(T, K, N, dtype, pattern=pattern)
    y = fastpeft.multi_lora(x, A, B, rk, s, idx, backend=backend)
    assert y.dtype == dtype and y.shape == (T, N)
    assert_close("y", y, reference(x, A, B, rk, s, idx), dtype)
    none = idx < 0
    assert torch.all(y[none] == 0), "rows without an adapter must be zero"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_out_in_place(backend, dtype, regime, poison_outputs, force_regime):
    force_regime(regime)
    x, A, B, rk, s, idx = make(41, 48, 40, dtype, pattern="runs", seed=3)
    out = torch.randn(41, 40, device=DEVICE).to(dtype)
    out0 = out.clone()
    got = fastpeft.multi_lora(x, A, B, rk, s, idx, out=out, backend=backend)
    assert got is out
    assert_close("out", out, reference(x, A, B, rk, s, idx, out0), dtype)
    none = idx < 0
    assert torch.equal(out[none], out0[none]), "rows without an adapter must be left alone"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_leading_dims_and_strided_inputs(backend, regime, force_regime):
    force_regime(regime)
    T, K, N = 24, 40, 36
    x, A, B, rk, s, idx = make(T, K, N, torch.float32, pattern="mixed", seed=5)
    # x [2, 3, 4, K] from every other column of a wider tensor; indices in x's leading shape
    wide = torch.zeros(2, 3, 4, 2 * K, device=DEVICE)
    wide[..., ::2] = x.reshape(2, 3, 4, K)
    xv = wide[..., ::2]
    # the stacks as slices of larger ones: non-contiguous A and B
    A_big = torch.full((4, 70, K + 3), float("nan"), device=DEVICE)
    A_big[:, :64, :K] = A
    B_big = torch.full((4, N, 80), float("nan"), device=DEVICE)
    B_big[:, :, 5:69] = B
    Av, Bv = A_big[:, :64, :K], B_big[:, :, 5:69]
    assert not (xv.is_contiguous() or Av.is_contiguous() or Bv.is_contiguous())
    y = fastpeft.multi_lora(xv, Av, Bv, rk, s, idx.reshape(2, 3, 4), backend=backend)
    assert y.shape == (2, 3, 4, N)
    assert_close("y", y.reshape(T, N), reference(x, A, B, rk, s, idx), torch.float32)
    # out as a transposed view (not viewable as rows): still updated in place
    out_t = torch.randn(N, T, device=DEVICE)
    out = out_t.t()
    out0 = out.clone()
    got = fastpeft.multi_lora(xv.reshape(T, K), Av, Bv, rk, s, idx, out=out, backend=backend)
    assert got is out
    assert_close("out", out, reference(x, A, B, rk, s, idx, out0), torch.float32)


@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_split_k_partials(regime, poison_outputs, force_regime, monkeypatch):
    """More SMs than the interpreter's default: the shrink splits K into partial sums."""
    from fastpeft.kernels import _common
    from fastpeft.kernels import multi_lora as kml
    monkeypatch.setattr(_common, "sm_count", lambda device: 64)
    force_regime(regime)
    x, A, B, rk, s, idx = make(20, 300, 40, torch.float32, pattern="runs", seed=9)
    T, K = x.shape
    cfg = (kml.decode_config(T, K, 40, 64, x.device) if regime == "decode"
           else kml.prefill_config(T, K, 40, 64, x.dtype, x.device))
    assert cfg["SPLIT_K"] > 1
    y = fastpeft.multi_lora(x, A, B, rk, s, idx, backend="triton")
    assert_close("y", y, reference(x, A, B, rk, s, idx), torch.float32)


def test_prefill_tiles_correct_in_any_order(poison_outputs, force_regime, monkeypatch):
    """Row tiles mixing adapters in any order (no sort at all) are still right: the kernels loop
    over the distinct adapters of each tile."""
    from fastpeft.kernels import multi_lora as kml
    force_regime("prefill")

    def unsorted_plan(indices, n):
        keys = torch.where((indices >= 0) & (indices < n), indices, torch.full_like(indices, n))
        return keys.to(torch.int32), torch.arange(indices.shape[0], device=indices.device)

    monkeypatch.setattr(kml, "plan", unsorted_plan)
    x, A, B, rk, s, idx = make(50, 40, 33, torch.float32, pattern="mixed", seed=2)
    y = fastpeft.multi_lora(x, A, B, rk, s, idx, backend="triton")
    assert_close("y", y, reference(x, A, B, rk, s, idx), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_broken_adapter_stays_on_its_rows(backend, regime, force_regime):
    """inf / NaN inside one adapter's rank (a broken adapter) poisons that adapter's rows only:
    rows of other adapters in the same tile, and rows without an adapter, stay exact."""
    force_regime(regime)
    x, A, B, rk, s, idx = make(40, 36, 30, torch.float32, pattern="mixed", seed=8, nan=False)
    A[0, 0, 3] = float("inf")
    B[0, 5, 0] = float("nan")
    y = fastpeft.multi_lora(x, A, B, rk, s, idx, backend=backend)
    want = reference(x, A, B, rk, s, idx)
    other = (idx != 0).cpu()
    assert (idx == 0).any() and other.any()
    assert_close("other rows", y.cpu()[other], want[other], torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_one_adapter_many_ranks_and_large_rank(backend, force_regime):
    """r_max above one rank tile (loops over tiles), rank 1 next to it; one adapter per stack."""
    for regime in ("decode", "prefill"):
        force_regime(regime)
        x, A, B, rk, s, idx = make(19, 36, 30, torch.float32, ranks=(100, 1, 70), r_max=100, seed=4)
        y = fastpeft.multi_lora(x, A, B, rk, s, idx, backend=backend)
        assert_close(f"y {regime}", y, reference(x, A, B, rk, s, idx), torch.float32)
        x, A, B, rk, s, idx = make(9, 36, 30, torch.float32, ranks=(5,), r_max=8, seed=4)
        y = fastpeft.multi_lora(x, A, B, rk, s, idx, backend=backend)
        assert_close(f"y n=1 {regime}", y, reference(x, A, B, rk, s, idx), torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_unchecked_out_of_range_values_are_memory_safe(backend, regime, poison_outputs, force_regime):
    """check=False: indices outside [-1, n) mean "no adapter"; ranks are clamped to [0, r_max]."""
    force_regime(regime)
    x, A, B, rk, s, idx = make(30, 40, 24, torch.float32, seed=6)
    idx = idx.clone()
    idx[::4] = torch.tensor([4, -2, 2**40, -(2**40), 1000, 7, -5, 4], device=DEVICE)[: len(idx[::4])]
    want = reference(x, A, B, rk, s, torch.where((idx >= -1) & (idx < 4), idx, -1))
    y = fastpeft.multi_lora(x, A, B, rk, s, idx, check=False, backend=backend)
    assert_close("y", y, want, torch.float32)
    assert torch.all(y[(idx < 0) | (idx >= 4)] == 0)
    # ranks outside [1, r_max] (finite stacks: a clamped rank reads up to r_max)
    x, A, B, rk, s, idx = make(30, 40, 24, torch.float32, seed=6, nan=False)
    bad_ranks = torch.tensor([0, 500, -3, 16], dtype=torch.int32, device=DEVICE)
    y = fastpeft.multi_lora(x, A, B, bad_ranks, s, idx, check=False, backend=backend)
    assert_close("y bad ranks", y, reference(x, A, B, bad_ranks, s, idx), torch.float32)
    assert torch.all(y[(idx == 0) | (idx == 2)] == 0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_index_and_rank_dtypes_and_scalings(backend):
    x, A, B, rk, s, idx = make(21, 32, 24, torch.float32, seed=8)
    want = reference(x, A, B, rk, s, idx)
    for rdt in (torch.int32, torch.int64):
        for idt in (torch.int32, torch.int64):
            for sdt in (torch.float32, torch.float64):
                y = fastpeft.multi_lora(x, A, B, rk.to(rdt), s.to(sdt), idx.to(idt), backend=backend)
                assert_close(f"y {rdt} {idt} {sdt}", y, want, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_empty_inputs(backend):
    x, A, B, rk, s, idx = make(4, 16, 8, torch.float32)
    y = fastpeft.multi_lora(x[:0].reshape(0, 0, 16), A, B, rk, s, idx[:0].reshape(0, 0), backend=backend)
    assert y.shape == (0, 0, 8)
    out = torch.empty(0, 8, device=DEVICE)
    assert fastpeft.multi_lora(x[:0], A, B, rk, s, idx[:0], out=out, backend=backend) is out


def test_auto_backend_on_cpu_and_regime_rule():
    dev = torch.device("cpu")
    got = _backend.choose(ops_ml.OP, dev, ops_ml.KERNELS)
    assert got == ("triton" if _backend.interpreter_active() else "torch")
    assert ops_ml.regime(1, 8) == "decode" and ops_ml.regime(64, 64) == "decode"
    assert ops_ml.regime(8192, 8) == "prefill" and ops_ml.regime(512, 8) == "prefill"
    assert ops_ml.regime(512, 1000) == "decode" and ops_ml.regime(8192, 10**5) == "prefill"


def test_no_host_sync_without_check(monkeypatch, force_regime):
    """check=False reads no tensor value on the host (CPU stand-in for the GPU's sync check)."""
    x, A, B, rk, s, idx = make(20, 32, 24, torch.float32, seed=1)
    want = reference(x, A, B, rk, s, idx)

    def forbidden(*a, **k):
        raise AssertionError("host read of a tensor value inside multi_lora")

    from fastpeft.kernels import multi_lora as kml
    for regime in ("decode", "prefill"):
        force_regime(regime)
        for backend in ("torch", "triton"):
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "__bool__", "nonzero", "unique"):
                    m.setattr(torch.Tensor, name, forbidden)
                # the torch backend groups rows by adapter on the host for CPU tensors only: check the
                # path every other device takes (a gather per row, no read)
                m.setattr(ops_ml, "HOST_GROUPED", ())
                if backend == "triton":  # the interpreter itself reads values: launches are not checked
                    for name in ("_bgmv_shrink_kernel", "_bgmv_expand_kernel", "_sgmv_shrink_kernel",
                                 "_sgmv_expand_kernel", "_keys_kernel"):
                        m.setattr(kml, name, _NoLaunch())
                y = fastpeft.multi_lora(x, A, B, rk, s, idx, check=False, backend=backend)
            if backend == "torch":
                assert_close("y", y, want, torch.float32)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def test_cuda_backend_plumbing_with_stand_in_kernels(monkeypatch, force_regime):
    """The cuda path's arguments, checked on the CPU: stand-ins for _cext.multi_lora_shrink / expand
    with the extension's documented contract (u fully written; the expand adds, leaving rows without
    an adapter alone; int32 ranks; row_order None or an int32 permutation)."""
    from fastpeft.ops import _cext
    calls = []

    def shrink(x2, A, ranks, indices, u, row_order=None):
        assert x2.stride(1) == 1 and A.is_contiguous() and ranks.dtype == torch.int32
        assert u.dtype == torch.float32 and u.shape == (x2.shape[0], A.shape[1])
        if row_order is not None:
            assert row_order.dtype == torch.int32
            assert torch.equal(row_order.sort().values.long(), torch.arange(x2.shape[0]))
        n, r_max, _ = A.shape
        safe, keep = ref.row_keep(ranks, indices, n, r_max)
        full = torch.bmm(A[safe].double(), x2.double()[:, :, None])[:, :, 0]
        u.copy_(torch.where(keep, full, torch.zeros((), dtype=torch.float64)))
        calls.append(("shrink", row_order is not None))

    def expand(y2, u, B, ranks, scalings, indices, row_order=None):
        assert y2.stride(1) == 1 and B.is_contiguous() and ranks.dtype == torch.int32
        assert scalings.dtype == torch.float32
        n = B.shape[0]
        safe, keep = ref.row_keep(ranks, indices, n, B.shape[2])
        Bm = torch.where(keep[:, None, :], B[safe].double(), torch.zeros((), dtype=torch.float64))
        d = torch.bmm(Bm, u.double()[:, :, None])[:, :, 0] * scalings.double()[safe, None]
        y2.add_(torch.where(keep[:, :1], d, torch.zeros((), dtype=torch.float64)).to(y2.dtype))
        calls.append(("expand", row_order is not None))

    monkeypatch.setattr(_cext, "multi_lora_shrink", shrink, raising=False)
    monkeypatch.setattr(_cext, "multi_lora_expand", expand, raising=False)
    real_why = _backend.why_cannot_run
    monkeypatch.setattr(_backend, "why_cannot_run",
                        lambda b, d, s: None if b == "cuda" and "cuda" in s else real_why(b, d, s))
    assert "cuda" in ops_ml.KERNELS
    for regime in ("decode", "prefill"):
        force_regime(regime)
        x, A, B, rk, s, idx = make(23, 40, 30, torch.float32, pattern="runs", seed=12, device="cpu")
        y = fastpeft.multi_lora(x, A, B, rk.long(), s, idx, backend="cuda")
        assert_close("y", y, reference(x, A, B, rk, s, idx), torch.float32)
        out = torch.randn(23, 30)
        out0 = out.clone()
        assert fastpeft.multi_lora(x, A, B, rk, s, idx, out=out, backend="cuda") is out
        assert_close("out", out, reference(x, A, B, rk, s, idx, out0), torch.float32)
        assert calls[-4:] == [("shrink", regime == "prefill"), ("expand", regime == "prefill")] * 2


# --------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    x, A, B, rk, s, idx = make(6, 16, 12, torch.float32)
    cases = [
        ((x[:, :15], A, B, rk, s, idx), ValueError, "features"),
        ((x, A, B[:, :, :63], rk, s, idx), ValueError, "lora_B shape"),
        ((x, A, B[:3], rk, s, idx), ValueError, "lora_B shape"),
        ((x, A[:, :0], B[:, :, :0], rk, s, idx), ValueError, "r_max >= 1"),
        ((x, A, B, rk[:3], s, idx), ValueError, "ranks"),
        ((x, A, B, rk, s[:2], idx), ValueError, "scalings"),
        ((x, A, B, rk, s, idx[:5]), ValueError, "indices shape"),
        ((x.half(), A, B, rk, s, idx), TypeError, "dtypes must match"),
        ((x, A, B, rk.float(), s, idx), TypeError, "ranks has dtype"),
        ((x, A, B, rk, s, idx.float()), TypeError, "indices has dtype"),
        ((x, A, B, rk, s.int(), idx), TypeError, "scalings has dtype"),
        ((x, A[0], B, rk, s, idx), ValueError, "3-D"),
        (("x", A, B, rk, s, idx), TypeError, "torch.Tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastpeft.multi_lora(*args)
    with pytest.raises(ValueError, match="out shape"):
        fastpeft.multi_lora(x, A, B, rk, s, idx, out=torch.zeros(6, 11, device=DEVICE))
    with pytest.raises(TypeError, match="out has dtype"):
        fastpeft.multi_lora(x, A, B, rk, s, idx, out=torch.zeros(6, 12, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="stride of 0"):
        fastpeft.multi_lora(x, A, B, rk, s, idx, out=torch.zeros(1, 12, device=DEVICE).expand(6, 12))
    with pytest.raises(ValueError, match="one device"):
        fastpeft.multi_lora(x, A, B, rk.to("meta"), s, idx)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_checked_values(backend):
    x, A, B, rk, s, idx = make(6, 16, 12, torch.float32)
    for bad in (4, -2, 2**40):
        i = idx.clone()
        i[3] = bad
        with pytest.raises(ValueError, match=r"indices must be in \[-1, 4\).*row 3"):
            fastpeft.multi_lora(x, A, B, rk, s, i, backend=backend)
    for bad in (0, 65, -1):
        r = rk.clone()
        r[2] = bad
        with pytest.raises(ValueError, match=r"ranks must be in \[1, r_max=64\].*adapter 2"):
            fastpeft.multi_lora(x, A, B, r, s, idx, backend=backend)


def test_inference_only():
    x, A, B, rk, s, idx = make(6, 16, 12, torch.float32)
    for name in ("x", "A", "B"):
        args = {"x": x, "A": A, "B": B}
        args[name] = args[name].clone().requires_grad_()
        with pytest.raises(RuntimeError, match="multi-adapter batches are inference-only"):
            fastpeft.multi_lora(args["x"], args["A"], args["B"], rk, s, idx)
        with torch.no_grad():
            y = fastpeft.multi_lora(args["x"], args["A"], args["B"], rk, s, idx)
        assert not y.requires_grad
    with torch.inference_mode():
        fastpeft.multi_lora(x.clone(), A, B, rk, s, idx)


def test_forced_backend_that_cannot_run():
    x, A, B, rk, s, idx = make(4, 16, 8, torch.float32, device="cpu")
    with pytest.raises(fastpeft.BackendUnavailableError, match="multi_lora"):
        fastpeft.multi_lora(x, A, B, rk, s, idx, backend="cuda")


# --------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("T", [1, 37, 700, 4099])
@pytest.mark.parametrize("pattern", ["mixed", "runs"])
def test_gpu_realistic_shapes(backend, dtype, T, pattern, poison_outputs):
    x, A, B, rk, s, idx = make(T, 1032, 776, dtype, ranks=(1, 3, 16, 64, 8, 64), pattern=pattern)
    y = fastpeft.multi_lora(x, A, B, rk, s, idx, backend=backend)
    assert_close("y", y, reference(x, A, B, rk, s, idx), dtype, factor=50 if dtype == torch.float32 else 1)
    out = torch.randn(T, 776, device="cuda").to(dtype)
    out0 = out.clone()
    fastpeft.multi_lora(x, A, B, rk, s, idx, out=out, backend=backend)
    assert_close("out", out, reference(x, A, B, rk, s, idx, out0), dtype, factor=50 if dtype == torch.float32 else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("T", [8, 600])
def test_gpu_cuda_graph_replay_with_new_indices(backend, T):
    """Captured once (check=True is a device-side assertion, captured too), replayed with new
    indices, ranks and scalings copied into the static buffers: no host sync anywhere inside."""
    K, N = 256, 192
    x, A, B, rk, s, idx = make(T, K, N, torch.bfloat16, pattern="runs", nan=False)
    base = torch.randn(T, N, device="cuda").to(torch.bfloat16)
    out = torch.empty_like(base)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            out.copy_(base)
            fastpeft.multi_lora(x, A, B, rk, s, idx, out=out, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out.copy_(base)
        fastpeft.multi_lora(x, A, B, rk, s, idx, out=out, check=True, backend=backend)
        fresh = fastpeft.multi_lora(x, A, B, rk, s, idx, backend=backend)
    g = torch.Generator().manual_seed(11)
    for trial in range(3):
        pat = "mixed" if trial % 2 else "runs"
        idx.copy_(pattern_indices(T, 4, pat, g).to("cuda"))
        rk.copy_(torch.randint(1, 65, (4,), generator=g, dtype=torch.int32).to("cuda"))
        s.copy_(torch.rand(4, generator=g).to("cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(f"out {trial}", out, reference(x, A, B, rk, s, idx, base), torch.bfloat16)
        assert_close(f"fresh {trial}", fresh, reference(x, A, B, rk, s, idx), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("T", [64, 8192])
def test_gpu_no_sync_with_or_without_check(backend, T):
    x, A, B, rk, s, idx = make(T, 512, 256, torch.bfloat16, pattern="runs", nan=False)
    for check in (False, True):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                y = fastpeft.multi_lora(x, A, B, rk, s, idx, check=check, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_close("y", y, reference(x, A, B, rk, s, idx), torch.bfloat16)


# --------------------------------------------------------------------------------- split-K, variants


@pytest.mark.parametrize("regime", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_partials_are_deterministic(regime, dtype, poison_outputs, force_regime, monkeypatch):
    """The shrink's K splits go to separate partials that the expand adds in split order (the split
    count a runtime argument): the result is right, and bitwise the same on a second run."""
    from fastpeft.kernels import _common
    from fastpeft.kernels import multi_lora as kml
    monkeypatch.setattr(_common, "sm_count", lambda device: 64)
    force_regime(regime)
    x, A, B, rk, s, idx = make(20, 300, 40, dtype, pattern="runs", seed=11)
    T, K = x.shape
    cfg = (kml.decode_config(T, K, 40, 64, x.device) if regime == "decode"
           else kml.prefill_config(T, K, 40, 64, x.dtype, x.device))
    assert cfg["SPLIT_K"] > 1
    out = torch.randn(T, 40, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    y1 = fastpeft.multi_lora(x, A, B, rk, s, idx, out=out.clone(), backend="triton")
    y2 = fastpeft.multi_lora(x, A, B, rk, s, idx, out=out.clone(), backend="triton")
    assert torch.equal(y1, y2), "split-K multi_lora is not bitwise reproducible"
    assert_close("y", y1, reference(x, A, B, rk, s, idx, out), dtype)


def test_decode_configs_are_few_over_batch_sizes(monkeypatch):
    """Decode batches T = 1..1024 (on 132 SMs) take at most two shrink tiles and two expand tiles per
    layer shape; the split count and T are runtime arguments, so that is the number of compiled
    variants of each kernel (the old rule derived ~10 (BLOCK_K, BLOCK_N, SPLIT_K) constexpr sets
    from T = 1..128)."""
    from fastpeft.kernels import _common
    from fastpeft.kernels import multi_lora as kml
    monkeypatch.setattr(kml, "_interpreted", lambda: False)
    monkeypatch.setattr(_common, "sm_count", lambda device: 132)
    dev = torch.device("cpu")
    for K, N in ((4096, 4096), (4096, 11008), (11008, 4096), (1000, 776)):
        for r_max in (8, 16, 64):
            for aligned in ((True, True), (False, False)):
                cfgs = [kml.decode_config(T, K, N, r_max, dev, *aligned) for T in range(1, 1025)]
                assert len({c["BLOCK_K"] for c in cfgs}) <= 2 and len({c["BLOCK_N"] for c in cfgs}) <= 2
                for T, c in zip(range(1, 1025), cfgs):
                    assert c["K_SPLIT"] % c["BLOCK_K"] == 0 and c["SPLIT_K"] * c["K_SPLIT"] >= K
                    assert (c["SPLIT_K"] - 1) * c["K_SPLIT"] < K  # no empty split
