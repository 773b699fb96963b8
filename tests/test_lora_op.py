"""fastpeft.lora_linear against the float64 reference: outputs and every gradient."""

import itertools

import pytest
import torch

import fastpeft
from fastpeft import _backend
from fastpeft.reference import lora as ref
from fastpeft.reference.dropout import dropout_keep_mask, mix32

from _dtypes import case_id, dtype_cases
from _lora_cases import KERNEL_BACKENDS, check_against_reference, make
from _utils import DEVICE, TOL, assert_close, rel_err

SHAPES = [(1, 37, 45), (16, 64, 48), (33, 70, 50), (65, 96, 130)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype,shape,r", dtype_cases(itertools.product(SHAPES, [1, 4, 16, 64]),  # bf16 on the
                                                      zip(SHAPES, [1, 64, 4, 16])),  # CPU: each shape and rank once
                         ids=case_id)
def test_matches_reference(backend, dtype, shape, r, poison_outputs):
    M, K, N = shape
    x, w, b, A, B = make(M, K, N, r, dtype)
    check_against_reference(x, w, b, A, B, 2.0 / r, 0.0, 0, backend, dtype)


FUSION_CASES = [(fuse, p, shape, r) for fuse in (True, False) for p in (0.0, 0.3)
                for shape, r in [((1, 40, 33), 4), ((48, 72, 40), 16), ((20, 50, 70), 64)]]
# bf16 on the CPU: each fusion with and without dropout, each shape once
FUSION_BF16 = [(True, 0.3, (1, 40, 33), 4), (False, 0.3, (48, 72, 40), 16),
               (True, 0.0, (20, 50, 70), 64), (False, 0.0, (20, 50, 70), 64)]


@pytest.mark.parametrize("dtype,fuse,p,shape,r", dtype_cases(FUSION_CASES, FUSION_BF16), ids=case_id)
def test_triton_both_fusions_with_dropout(dtype, fuse, p, shape, r, poison_outputs):
    """The in-loop shrink and the separate shrink kernel, forward and backward, with dropout."""
    M, K, N = shape
    x, w, b, A, B = make(M, K, N, r, dtype)
    check_against_reference(x, w, b, A, B, 0.5, p, 1234, "triton", dtype, fuse_shrink=fuse)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_dropout_with_every_backend(backend, poison_outputs):
    x, w, b, A, B = make(37, 64, 40, 8, torch.float32)
    check_against_reference(x, w, b, A, B, 1.0, 0.25, 99, backend, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_large_rank_loops_over_rank_blocks(backend, poison_outputs):
    x, w, b, A, B = make(9, 40, 36, 200, torch.float32)
    check_against_reference(x, w, b, A, B, 0.25, 0.0, 0, backend, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_leading_dims_and_non_contiguous_input(backend):
    x, w, b, A, B = make(12, 24, 20, 4, torch.float32, lead=(2, 3))
    # a non-contiguous view: every other feature of a wider tensor, transposed batch dims
    wide = torch.randn(3, 2, 12, 48, device=DEVICE).transpose(0, 1)
    xv = wide[..., ::2].detach().requires_grad_(False)
    assert not xv.is_contiguous()
    y = fastpeft.lora_linear(xv, w, b, A, B, 0.5, backend=backend)
    yr = ref.lora_linear(xv.double(), w.double(), b.double(), A.double(), B.double(), 0.5)
    assert y.shape == (2, 3, 12, 20)
    assert_close("y", y, yr, torch.float32)
    check_against_reference(x, w, b, A, B, 0.5, 0.0, 0, backend, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_empty_input(backend):
    x, w, b, A, B = make(0, 16, 8, 4, torch.float32, lead=(3,))
    y = fastpeft.lora_linear(x, w, b, A, B, 1.0, backend=backend)
    assert y.shape == (3, 0, 8)
    y.sum().backward()
    assert A.grad is not None and A.grad.abs().sum() == 0 and B.grad.abs().sum() == 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_no_bias_and_trainable_bias(backend):
    x, w, _, A, B = make(10, 20, 12, 4, torch.float32, bias=False)
    check_against_reference(x, w, None, A, B, 1.0, 0.0, 0, backend, torch.float32)
    x, w, b, A, B = make(10, 20, 12, 4, torch.float32)
    b.requires_grad_()
    y = fastpeft.lora_linear(x, w, b, A, B, 1.0, backend=backend)
    y.backward(torch.ones_like(y))
    assert torch.allclose(b.grad, torch.full_like(b, 10.0))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_weight_never_gets_a_gradient(backend):
    x, w, b, A, B = make(5, 16, 8, 2, torch.float32)
    w.requires_grad_()
    fastpeft.lora_linear(x, w, b, A, B, 1.0, backend=backend).sum().backward()
    assert w.grad is None and A.grad is not None


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_fp32_adapters_on_half_base(backend):
    x, w, b, A, B = make(17, 32, 24, 8, torch.float16, adapter_dtype=torch.float32)
    y = fastpeft.lora_linear(x, w, b, A, B, 0.5, backend=backend)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    yr = ref.lora_linear(x.double(), w.double(), b.double(), A.double(), B.double(), 0.5)
    assert_close("y", y, yr, torch.float16)


def test_dropout_off_in_eval_and_same_seed_same_mask():
    x, w, b, A, B = make(64, 32, 16, 4, torch.float32)
    y_eval = fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.5, training=False)
    assert_close("eval", y_eval, ref.lora_linear(x.double(), w.double(), b.double(), A.double(), B.double(), 1.0),
                 torch.float32)
    y1 = fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.5, training=True, seed=5)
    y2 = fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.5, training=True, seed=5)
    y3 = fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.5, training=True, seed=6)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    torch.manual_seed(3)
    y4 = fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.5, training=True)
    torch.manual_seed(3)
    y5 = fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.5, training=True)
    assert torch.equal(y4, y5), "the drawn seed must follow torch.manual_seed"


def test_triton_and_torch_draw_the_same_mask():
    x, w, b, A, B = make(40, 48, 24, 8, torch.float32)
    yt = fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.4, training=True, seed=77, backend="triton")
    yp = fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.4, training=True, seed=77, backend="torch")
    assert rel_err(yt, yp) <= TOL[torch.float32]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_keeps_one_minus_p(p):
    keep = dropout_keep_mask(seed=11, rows=256, cols=512, p=p)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.01, frac
    # rows and columns are not copies of each other
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])


def test_mix32_matches_plain_python():
    def py_mix32(x):
        m = 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        x ^= x >> 16
        return x
    vals = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    # and 20000 random uint32 values: the int64 products wrap, their low 32 bits must be exact
    vals += torch.randint(0, 2**32, (20000,), generator=torch.Generator().manual_seed(5)).tolist()
    t = torch.tensor(vals, dtype=torch.int64)
    got = mix32(t).tolist()
    assert got == [py_mix32(v) for v in vals]
    assert t.tolist() == vals  # the input is not modified


# --------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    x, w, b, A, B = make(4, 8, 6, 2, torch.float32)
    cases = [
        ((x[:, :7], w, b, A, B, 1.0), ValueError, "features"),
        ((x, w, b[:5], A, B, 1.0), ValueError, "bias"),
        ((x, w, b, A[:, :7], B, 1.0), ValueError, "lora_A"),
        ((x, w, b, A, B[:, :1], 1.0), ValueError, "lora_B"),
        ((x, w, b, A[:0], B[:, :0], 1.0), ValueError, "r must be > 0"),
        ((x.half(), w, b, A, B, 1.0), TypeError, "dtypes must match"),
        ((x.int(), w, b, A, B, 1.0), TypeError, "dtype"),
        ((x, w, b, A, B, float("nan")), ValueError, "scaling"),
        (("x", w, b, A, B, 1.0), TypeError, "torch.Tensor"),
        ((x, w[0], b, A, B, 1.0), ValueError, "2-D"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastpeft.lora_linear(*args)
    with pytest.raises(ValueError, match="dropout_p"):
        fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="one device"):
        fastpeft.lora_linear(x, w.to("meta"), b, A, B, 1.0)


def test_forced_backend_that_cannot_run():
    x, w, b, A, B = make(4, 8, 6, 2, torch.float32, device="cpu")
    with pytest.raises(fastpeft.BackendUnavailableError, match="cuda.*forced"):
        fastpeft.lora_linear(x, w, b, A, B, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        fastpeft.lora_linear(x, w, b, A, B, 1.0, backend="cutlass")


def test_backend_env_and_context(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    assert _backend.choose("op", dev, ("triton", "torch")) == "torch"
    with fastpeft.use_backend("triton"):  # the context manager wins over the environment
        expected = "triton" if _backend.interpreter_active() else None
        if expected:
            assert _backend.choose("op", dev, ("triton", "torch")) == "triton"
        else:
            with pytest.raises(fastpeft.BackendUnavailableError, match="TRITON_INTERPRET"):
                _backend.choose("op", dev, ("triton", "torch"))
    monkeypatch.setenv("FASTPEFT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        _backend.choose("op", dev, ("triton", "torch"))
    monkeypatch.delenv("FASTPEFT_BACKEND")
    with pytest.raises(fastpeft.BackendUnavailableError, match="no cuda implementation"):
        _backend.choose("op", dev, ("torch",), explicit="cuda")


def test_auto_on_cpu_picks_interpreter_or_torch():
    dev = torch.device("cpu")
    got = _backend.choose("lora_linear", dev, ("triton", "cuda", "torch"))
    assert got == ("triton" if _backend.interpreter_active() else "torch")


# --------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 16, 300, 1100])
@pytest.mark.parametrize("r", [8, 64])
def test_gpu_realistic_shapes(backend, dtype, M, r, poison_outputs):
    x, w, b, A, B = make(M, 1032, 776, r, dtype)
    check_against_reference(x, w, b, A, B, 2.0, 0.1, 3, backend, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 512, 2048])
def test_gpu_autotuned_configs_are_correct(M, monkeypatch, poison_outputs):
    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "1")
    for fuse in (True, False):
        x, w, b, A, B = make(M, 512, 640, 16, torch.bfloat16)
        check_against_reference(x, w, b, A, B, 1.0, 0.0, 0, "triton", torch.bfloat16, fuse_shrink=fuse)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)], ids=lambda w: "x{}A{}B{}".format(*map(int, w)))
def test_partial_gradients(backend, wants, poison_outputs):
    """Only the requested gradients are computed, and each is right on its own."""
    x, w, b, A, B = make(20, 48, 36, 8, torch.float32)
    for t, want in zip((x, A, B), wants):
        t.requires_grad_(want)
    y = fastpeft.lora_linear(x, w, b, A, B, 0.7, dropout_p=0.2, training=True, seed=4, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    ref.lora_linear(leaves[0], w.double(), b.double(), leaves[1], leaves[2], 0.7, 0.2, 4).backward(dy.double())
    for name, t, leaf, want in zip(("dx", "dA", "dB"), (x, A, B), leaves, wants):
        if want:
            assert_close(name, t.grad, leaf.grad, torch.float32)
        else:
            assert t.grad is None


def test_dropout_p_checked_when_not_training():
    """An impossible dropout_p is an error in eval mode too (it was silently ignored)."""
    x, w, b, A, B = make(3, 8, 5, 2, torch.float32)
    for p in (1.5, -0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            fastpeft.lora_linear(x, w, b, A, B, 0.5, p, training=False)
        with pytest.raises(ValueError, match="dropout_p"):
            fastpeft.ops.lora_update(x, A, B, 0.5, p, training=False)


# --------------------------------------------------------------------------------- split-K (deterministic)
# The K splits (the decode GEMM's, the shrink's) and dA's row split write fp32 partials that a
# second kernel (torch.sum for dA) adds in a fixed order: no atomics. Every split is a pure function
# of the shapes and the SM count (the interpreter's is 8), or forced with ``split_k``, so these
# tests execute each path under the interpreter too.


def _lora_kernels():
    from fastpeft.kernels import lora as k
    return k


def _force_splits(monkeypatch, split_k):
    """fastpeft.lora_linear with every lora_gemm and shrink launch split split_k ways over K."""
    k = _lora_kernels()
    gemm, shrink = k.lora_gemm, k.shrink
    monkeypatch.setattr(k, "lora_gemm", lambda *a, **kw: gemm(*a, **{**kw, "split_k": split_k}))
    monkeypatch.setattr(k, "shrink", lambda *a, **kw: shrink(*a, **{**kw, "split_k": split_k}))


def _outputs_and_grads(x, w, b, A, B, s, p, seed, backend="triton", **kw):
    for t in (x, A, B):
        t.grad = None
    y = fastpeft.lora_linear(x, w, b, A, B, s, dropout_p=p, training=True, seed=seed, backend=backend, **kw)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device, y.dtype))
    return [y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()]


SHRINK_SPLIT_CASES = [
    (70, 300, 16, 2, 0.0),    # 2 splits of 5 K tiles (interpreter tiles)
    (5, 520, 64, 4, 0.3),     # 4 splits, dropout on x
    (33, 260, 200, 3, 0.0),   # uneven 3-way split, 4 rank tiles (the last partial)
    (1, 300, 4, 5, 0.0),      # 5 splits, the last shorter
]


@pytest.mark.parametrize("dtype,M,K,R,split_k,p", dtype_cases(SHRINK_SPLIT_CASES, SHRINK_SPLIT_CASES[1:3]),
                         ids=case_id)
def test_shrink_split_k_matches_reference_and_is_deterministic(dtype, M, K, R, split_k, p, poison_outputs):
    from fastpeft.ops.lora import new_seed
    from fastpeft.reference.dropout import dropout_2d
    k = _lora_kernels()
    g = torch.Generator().manual_seed(M + K + R)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    A = torch.randn(R, K, generator=g, dtype=torch.float64) / K ** 0.5
    xd, Ad = x.to(DEVICE, dtype), A.to(DEVICE, dtype)
    assert k.shrink_config(M, K, R, xd.device, split_k)["SPLIT"] > 1
    seed = new_seed(xd.device, 17) if p else None

    def run():
        return k.shrink(xd, Ad, (Ad.stride(0), Ad.stride(1)), R, 0.5, dropout_p=p, seed=seed, split_k=split_k)

    u1, u2 = run(), run()
    assert u1.dtype == torch.float32 and torch.equal(u1, u2), "split-K shrink is not bitwise reproducible"
    ref = 0.5 * dropout_2d(xd.double().cpu(), p, 17) @ Ad.double().cpu().t()
    assert_close("u", u1, ref, dtype)


# (fuse, p, shape, r, split_k): each shape with both fusions, dropout on one of them (forward: on x
# in the fused shrink or the shrink kernel; backward: on the dx update)
GEMM_SPLIT_CASES = [(True, 0.3, (1, 300, 45), 16, 2), (False, 0.0, (1, 300, 45), 16, 2),
                    (True, 0.0, (20, 260, 70), 4, 3), (False, 0.3, (20, 260, 70), 4, 3),
                    (True, 0.3, (64, 300, 40), 64, 5), (False, 0.0, (64, 300, 40), 64, 5),
                    (True, 0.0, (3, 130, 33), 1, 4), (False, 0.3, (3, 130, 33), 1, 4)]
GEMM_SPLIT_BF16 = GEMM_SPLIT_CASES[::2]  # bf16 on the CPU: every shape, the fused path


@pytest.mark.parametrize("dtype,fuse,p,shape,r,split_k", dtype_cases(GEMM_SPLIT_CASES, GEMM_SPLIT_BF16), ids=case_id)
def test_split_k_gemm_forward_backward(dtype, fuse, p, shape, r, split_k, poison_outputs, monkeypatch):
    """Every lora_gemm (forward y, backward dx) and shrink split over K: the output and every gradient
    against the float64 reference, and the same bits on a second run."""
    _force_splits(monkeypatch, split_k)
    M, K, N = shape
    x, w, b, A, B = make(M, K, N, r, dtype)
    first = _outputs_and_grads(x, w, b, A, B, 0.5, p, 1234, fuse_shrink=fuse)
    second = _outputs_and_grads(x, w, b, A, B, 0.5, p, 1234, fuse_shrink=fuse)
    for name, t1, t2 in zip(("y", "dx", "dA", "dB"), first, second):
        assert torch.equal(t1, t2), f"{name} differs between two runs"
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, A, B)]
    yr = ref.lora_linear(leaves[0], w.cpu().double(), b.cpu().double(), leaves[1], leaves[2], 0.5, p, 1234)
    yr.backward(torch.randn(yr.shape, generator=torch.Generator().manual_seed(3)).to(dtype).double())
    for name, got, want in zip(("y", "dx", "dA", "dB"), first, [yr, *(t.grad for t in leaves)]):
        assert_close(name, got, want, dtype)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's tiles and SM count choose these splits")
def test_splits_chosen_from_shapes_under_the_interpreter(poison_outputs):
    """Without forcing: the shapes alone make the interpreter take the decode GEMM's K split, the
    shrink's K split and dA's row split, through the public op (forward and backward)."""
    k = _lora_kernels()
    dev = torch.device("cpu")
    assert k.decode_gemm_config(1, 45, 300, 16, torch.float32, dev)["SPLIT"] == 2
    assert k.shrink_config(70, 300, 16, dev)["SPLIT"] == 2
    assert k.grad_a_config(260, 64, 16, dev)["SPLIT_M"] == 2
    for (M, K, N), fuse in (((1, 300, 45), True), ((70, 300, 40), False), ((260, 64, 40), None)):
        x, w, b, A, B = make(M, K, N, 16, torch.float32)
        check_against_reference(x, w, b, A, B, 0.5, 0.2, 7, "triton", torch.float32, fuse_shrink=fuse)


def test_decode_split_fills_an_h100(monkeypatch):
    """The decode rule on 132 SMs: N = 4096 in 64-column tiles gives 64 tiles, so K splits 5 ways
    (320 programs, >= 2 per SM); N = 11008 (172 tiles) splits in 2; a wide N needs no split.
    The shrink at M = 2048 (32 row tiles) splits 8 ways (64 K tiles, 8 each). Config arithmetic only (no launch)."""
    k = _lora_kernels()
    from fastpeft.kernels import _common
    monkeypatch.setattr(k, "_interpreted", lambda: False)
    monkeypatch.setattr(_common, "sm_count", lambda device: 132)
    dev = torch.device("cpu")
    for M in (1, 16, 32, 64):
        cfg = k.decode_gemm_config(M, 4096, 4096, 16, torch.bfloat16, dev)
        assert (cfg["BLOCK_N"], cfg["SPLIT"]) == (64, 5) and cfg["K_SPLIT"] % cfg["BLOCK_K"] == 0
        assert cfg["SPLIT"] * 64 >= 2 * 132
    assert k.decode_gemm_config(1, 11008, 4096, 16, torch.bfloat16, dev)["SPLIT"] == 2
    assert k.decode_gemm_config(1, 32000, 4096, 16, torch.bfloat16, dev)["SPLIT"] == 1
    assert k.shrink_config(2048, 4096, 16, dev)["SPLIT"] == 8


def test_compiled_variants_are_bounded_by_row_buckets(monkeypatch):
    """Batch sizes map to few configs: M = 1..64 to three decode tiles (never autotuned), and
    M = 65..8192 to four autotune buckets; split counts, K_SPLIT and M are runtime values."""
    k = _lora_kernels()
    from fastpeft.kernels import _common
    monkeypatch.setattr(k, "_interpreted", lambda: False)
    monkeypatch.setattr(_common, "sm_count", lambda device: 132)
    dev = torch.device("cpu")
    tiles = {tuple((c, v) for c, v in k.decode_gemm_config(M, 4096, 4096, 16, torch.bfloat16, dev).items()
                   if c not in ("SPLIT", "K_SPLIT")) for M in range(1, k.DECODE_MAX_M + 1)}
    assert len(tiles) == 3
    assert {k.m_bucket(M) for M in range(k.DECODE_MAX_M + 1, 8193)} == set(k.M_BUCKETS)
    assert len(k.M_BUCKETS) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("M,K,N", [(1, 4096, 4096), (16, 4096, 11008), (64, 11008, 4096), (300, 4096, 1024)])
def test_gpu_split_k_paths_are_right_and_deterministic(backend, M, K, N, poison_outputs):
    """Decode and mid-size shapes on the GPU's own SM count: the K splits chosen there (triton: the
    decode GEMM's and the shrink's partials; cuda: the shrink's two atomic adds) give the reference
    and the same bits on a second run, forward and backward."""
    x, w, b, A, B = make(M, K, N, 16, torch.bfloat16)
    check_against_reference(x, w, b, A, B, 1.0, 0.1, 5, backend, torch.bfloat16)
    first = _outputs_and_grads(x, w, b, A, B, 1.0, 0.1, 5, backend)
    second = _outputs_and_grads(x, w, b, A, B, 1.0, 0.1, 5, backend)
    for name, t1, t2 in zip(("y", "dx", "dA", "dB"), first, second):
        assert torch.equal(t1, t2), f"{name} differs between two runs"
