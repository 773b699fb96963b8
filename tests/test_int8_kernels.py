"""fastpeft.kernels.int8 (Triton) launchers against fastpeft/reference/int8.py.

Runs under TRITON_INTERPRET=1 on the CPU (fp32, fp16 and bf16: the kernels upcast bf16 dot
operands there) and for real on a GPU. Integer results (codes, flags, column lists) must be
exact; float outputs meet DESIGN.md's relative-error tolerances against float64.
"""
import pytest
import torch

from fastpeft.kernels import int8 as k
from fastpeft.reference import int8 as ref

from _utils import DEVICE, assert_close  # rel_err moves both to the CPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 5, 33]
KS = [37, 70, 130]
THRESHOLD = 6.0
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy: 0 * inf in the interpreter


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_x(M, K, dtype, outliers=True, seed=0):
    """randn rows (|x| < 6 in practice) with a few planted outliers: column 3 twice, the last
    column once, and one entry exactly at the threshold (|x| >= t counts)."""
    g = _gen(seed + 7 * M + K)
    x = torch.randn(M, K, generator=g, dtype=torch.float64) * 1.5
    x.clamp_(-5.5, 5.5)
    if outliers:
        x[0, 3] = 9.5
        x[M - 1, 3] = -17.0
        x[M // 2, K - 1] = 12.25
        x[(M + 1) // 3, K // 2] = -THRESHOLD
        x[M - 1, 1] = 5.875  # just below: not an outlier
    return x.to(DEVICE, dtype)


def make_w(N, K, seed=1):
    w = torch.randn(N, K, generator=_gen(seed + N + K), dtype=torch.float64) / K ** 0.5
    q, s = ref.quantize_weight(w.float())
    return q.to(DEVICE), s.to(DEVICE)


def unzeroed_codes(x, threshold):
    """The reference's codes before its outlier-column zeroing (quant_rows leaves those columns)."""
    xf = x.float().cpu()
    out = ref.outlier_mask(xf, threshold)
    kept = xf if out is None else xf.masked_fill(out, 0.0)
    _, scale, _ = ref.int8_vectorwise_quant(x.cpu(), threshold)
    return ref.row_codes(kept, scale)


def check_quant(x, threshold):
    q, scale, flags = k.quant_rows(x, threshold)
    rq, rscale, rcols = ref.int8_vectorwise_quant(x.cpu(), threshold)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (x.shape[0],)
    assert torch.equal(scale.cpu().nan_to_num(nan=-1.0), rscale.nan_to_num(nan=-1.0)), "row_scale"
    assert torch.equal(q.cpu(), unzeroed_codes(x, threshold)), "codes"
    if threshold == 0:
        assert flags is None
        assert torch.equal(q.cpu(), rq)
    else:
        assert flags.dtype == torch.int32 and flags.shape == (x.shape[1],)
        assert set(flags.unique().tolist()) <= {0, 1}
        assert torch.equal(torch.nonzero(flags.cpu()).flatten(), rcols), "outlier columns"
        qz = q.cpu().clone()
        qz[:, rcols] = 0
        assert torch.equal(qz, rq)
    return q, scale, flags


# ---------------------------------------------------------------------------------------------
# quant_rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("MK", [(M, K) for M in ROWS for K in KS] + [(5, 4500)],  # 4500: chunked on the GPU too
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_quant_rows_matches_reference(dtype, MK, threshold, poison_outputs):
    M, K = MK
    x = make_x(M, K, dtype)
    q, _, flags = check_quant(x, threshold)
    if threshold:
        assert flags[3] == 1 and flags[K - 1] == 1 and flags[K // 2] == 1 and flags[1] == 0
        assert q[0, 3] == 0 and q[M - 1, 3] == 0  # outlier entries give code 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_rows_rounds_ties_to_even(dtype, poison_outputs):
    # row max 254 -> 127 / 254 = 0.5 exactly: odd integers land on .5 ties
    odd = torch.arange(-253, 254, 2, dtype=torch.float64)
    x = torch.zeros(3, odd.numel() + 1, dtype=torch.float64)
    x[:, :-1] = odd
    x[:, -1] = 254.0
    x[1] *= -1
    x[2] = torch.randn(x.shape[1], generator=_gen(2), dtype=torch.float64)
    x = x.to(DEVICE, dtype)
    q, _, _ = check_quant(x, 0.0)
    expect = torch.round(odd * 0.5)
    assert torch.equal(q[0, :-1].cpu().double(), expect)
    assert torch.equal(q[1, :-1].cpu().double(), -expect)
    assert q[0, 0] == -126 and q[0, 1] == -126 and q[0, -2] == 126  # -126.5 -> -126, -125.5 -> -126


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_quant_rows_bad_rows_stay_in_their_row(dtype, threshold, poison_outputs):
    M, K = 7, 70
    x = make_x(M, K, dtype, outliers=False)
    x[1] = 0.0
    x[2, 5] = float("nan")
    x[3, 9] = float("inf")
    x[4, :] = float("-inf")
    x[5, 0] = float("nan")
    x[5, 1] = float("inf")
    q, scale, flags = check_quant(x, threshold)
    assert scale[1] == 0 and (q[1] == 0).all()
    assert scale[2].isnan() and (q[2] == 0).all()
    good = [0, 6]
    qg, sg, _ = k.quant_rows(x[good].contiguous(), threshold)
    assert torch.equal(q[good], qg) and torch.equal(scale[good], sg)
    if threshold:
        assert flags[9] == 1 and flags.sum() == K  # the -inf row flags every column


def test_lift_constants_are_the_references():
    assert (k.LIFT_BELOW, k.LIFT) == (ref.LIFT_BELOW, ref.LIFT)


def test_quant_rows_tiny_scale(poison_outputs):
    """Rows of subnormals and of tiny normals (127 / scale would overflow to inf, making every code
    +-127): the codes of the exact quotients, as the reference."""
    x = make_x(5, 37, torch.float32, outliers=False)
    x[2] = x[2] * 1e-40
    x[2, 4] = 0.0
    x[3] = x[3] * 1e-37
    x[4] = x[4] * 2.0**-64  # at the lifting bound
    check_quant(x, 0.0)
    q, scale, _ = k.quant_rows(x, 0.0)
    exact = torch.round(x.double().cpu() * 127 / scale.double().cpu()[:, None])
    assert (q.cpu().double() - exact).abs().max() <= 1  # two fp32 roundings of the quotient: ties may differ
    assert q[2, 4] == 0 and (q[2:].abs().amax(dim=1) == 127).all()
    assert (q[2:].abs() < 127).any(dim=1).all(), "not every nonzero code saturates"


def test_quant_rows_row_strided_input(poison_outputs):
    big = make_x(9, 130, torch.float16)
    check_quant(big[:, :100], THRESHOLD)  # stride(0) = 130


def test_quant_rows_empty():
    q, s, f = k.quant_rows(torch.zeros(0, 5, device=DEVICE), THRESHOLD)
    assert q.shape == (0, 5) and s.shape == (0,) and torch.equal(f.cpu(), torch.zeros(5, dtype=torch.int32))
    q, s, f = k.quant_rows(torch.ones(3, 0, device=DEVICE), 0.0)
    assert q.shape == (3, 0) and torch.equal(s.cpu(), torch.zeros(3)) and f is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_quant_rows_matches_bitsandbytes(dtype, threshold):
    F = pytest.importorskip("bitsandbytes.functional")
    x = make_x(33, 130, dtype)  # no zero rows: bitsandbytes turns 0 * inf into an undefined cast
    bq, bscale, bcols = F.int8_vectorwise_quant(x.cpu().clone(), threshold)
    q, scale, flags = k.quant_rows(x, threshold)
    assert torch.equal(scale.cpu(), bscale.float())
    if threshold:
        cols = torch.nonzero(flags.cpu()).flatten()
        assert torch.equal(cols, bcols.long())
        q = q.clone()
        q[:, cols.to(q.device)] = 0
    # bitsandbytes multiplies by 127 / scale in fp32 too: codes equal up to rounding ties
    diff = (q.cpu().int() - bq.int()).abs()
    assert diff.max() <= 1
    if diff.any():
        v = (x.float().cpu() * (127.0 / bscale[:, None]))[diff > 0]
        assert ((v - v.floor() - 0.5).abs() < 1e-3).all(), "codes differ away from a tie"


# ---------------------------------------------------------------------------------------------
# outlier_columns


@pytest.mark.parametrize("K", [1, 37, 130, 300])
@pytest.mark.parametrize("pattern", ["none", "some", "all", "last"])
def test_outlier_columns(K, pattern, poison_outputs):
    flags = torch.zeros(K, dtype=torch.int32)
    if pattern == "some":
        flags = (torch.rand(K, generator=_gen(K)) < 0.2).int()
        flags[0] = 1
    elif pattern == "all":
        flags[:] = 1
    elif pattern == "last":
        flags[-1] = 1
    cols, count = k.outlier_columns(flags.to(DEVICE))
    assert cols.dtype == torch.int32 and cols.shape == (K,) and count.dtype == torch.int32 and count.shape == (1,)
    assert cols.device.type == DEVICE and count.device.type == DEVICE
    want = torch.nonzero(flags).flatten()
    n = int(count.item())
    assert n == want.numel()
    assert torch.equal(cols[:n].cpu().long(), want)


# ---------------------------------------------------------------------------------------------
# int8_gemm


def run_gemm(x, w, ws, bias, threshold, out_dtype=None):
    q, scale, flags = k.quant_rows(x, threshold)
    if flags is None:
        return k.int8_gemm(q, scale, w, ws, bias, out_dtype or x.dtype)
    cols, count = k.outlier_columns(flags)
    return k.int8_gemm(q, scale, w, ws, bias, out_dtype or x.dtype, x=x, col_flags=flags, cols=cols, count=count)


def reference_linear(x, w, ws, bias, threshold):
    return ref.int8_linear(x.cpu().double(), w.cpu(), ws.cpu(), None if bias is None else bias.cpu().double(),
                           threshold)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("KN", [(37, 70), (130, 37), (70, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_int8_gemm_matches_reference(dtype, M, KN, threshold, poison_outputs):
    K, N = KN
    x = make_x(M, K, dtype)
    w, ws = make_w(N, K)
    bias = (torch.randn(N, generator=_gen(N), dtype=torch.float64) * 0.1).to(DEVICE, dtype)
    y = run_gemm(x, w, ws, bias, threshold)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close("y", y, reference_linear(x, w, ws, bias, threshold), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_gemm_reference_codes_and_int64_cols(dtype, poison_outputs):
    """The reference's own q (outlier columns already zero) and int64 column list, no bias."""
    M, K, N = 20, 100, 45
    x = make_x(M, K, dtype)
    w, ws = make_w(N, K)
    q, scale, cols = ref.int8_vectorwise_quant(x.cpu(), THRESHOLD)
    count = torch.tensor([cols.numel()], dtype=torch.int32)
    y = k.int8_gemm(q.to(DEVICE), scale.to(DEVICE), w, ws, None, dtype, x=x, cols=cols.to(DEVICE),
                    count=count.to(DEVICE))
    assert_close("y", y, reference_linear(x, w, ws, None, THRESHOLD), dtype)


@pytest.mark.parametrize("flagged", [False, True])
def test_int8_gemm_is_exact_in_int32(flagged, poison_outputs):
    """With unit scales (127 * 127 / 127^2) the fp32 output is the int32 GEMM, exactly."""
    M, K, N = 33, 130, 70
    g = _gen(5)
    q = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    flags = (torch.rand(K, generator=g) < 0.1).int() if flagged else None
    qm = q.clone()
    if flagged:
        qm[:, flags.bool()] = 0
    acc = qm.long() @ w.long().t()
    ones = lambda n: torch.full((n,), 127.0, device=DEVICE)
    y = k.int8_gemm(q.to(DEVICE), ones(M), w.to(DEVICE), ones(N), None, torch.float32,
                    col_flags=None if flags is None else flags.to(DEVICE))
    assert torch.equal(torch.round(y.cpu().double()).long(), acc)
    assert (y.cpu().double() - acc).abs().max() <= 1e-6 * acc.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_int8_gemm_bad_rows_stay_in_their_row(dtype, threshold, poison_outputs):
    M, K, N = 6, 70, 37
    x = make_x(M, K, dtype)
    x[1] = 0.0
    x[2, 7] = float("nan")
    x[4, 11] = float("inf")
    w, ws = make_w(N, K)
    bias = torch.randn(N, generator=_gen(3)).to(DEVICE, dtype)
    y = run_gemm(x, w, ws, bias, threshold)
    good = [0, 3, 5]
    assert torch.isfinite(y[good]).all()
    assert_close("good rows", y[good], reference_linear(x, w, ws, bias, threshold)[good], dtype)
    assert torch.equal(y[1], bias.to(dtype))  # zero row: scale 0, codes 0, y = bias
    assert not torch.isfinite(y[2]).any() and not torch.isfinite(y[4]).any()


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_int8_gemm_out_dtype_and_row_strides(out_dtype, poison_outputs):
    M, K, N = 5, 70, 130
    big = make_x(M, 2 * K, torch.float16)
    x = big[:, K:]  # stride(0) = 2K
    w_big, ws = make_w(N, 2 * K)
    w = w_big[:, :K]  # row-strided weight codes
    ws = ws.clone()
    bias = torch.randn(N, generator=_gen(4), dtype=torch.float32).to(DEVICE)
    y = run_gemm(x, w, ws, bias, THRESHOLD, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    yr = reference_linear(x, w, ws, bias, THRESHOLD)
    assert_close("y", y, yr, out_dtype)


def test_int8_gemm_empty():
    w, ws = make_w(8, 16)
    y = k.int8_gemm(torch.zeros(0, 16, dtype=torch.int8, device=DEVICE), torch.zeros(0, device=DEVICE),
                    w, ws, None, torch.float16)
    assert y.shape == (0, 8) and y.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# dequant_matmul


def _tf32_factor(dtype):
    return 50.0 if k._precision(dtype) == "tf32" else 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("NK", [(37, 70), (130, 37), (70, 130)], ids=lambda s: "x".join(map(str, s)))
def test_dequant_matmul_matches_reference(dtype, M, NK, poison_outputs):
    N, K = NK
    w, ws = make_w(N, K)
    dy = torch.randn(M, N, generator=_gen(M + N), dtype=torch.float64).to(DEVICE, dtype)
    dx = k.dequant_matmul(dy, w, ws)
    assert dx.dtype == dtype and dx.shape == (M, K)
    ref_dx = dy.cpu().double() @ ref.dequantize_weight(w.cpu(), ws.cpu()).double()
    assert_close("dx", dx, ref_dx, dtype, factor=_tf32_factor(dtype))


def test_dequant_matmul_small_gradients_do_not_underflow_fp16(poison_outputs):
    """dy ~ 1e-2, w_scale ~ 1e-2: dy * w_scale / 127 ~ 1e-6 is an fp16 subnormal (a few bits),
    W_deq and dx ~ 1e-4 are normal: the W tile is the one scaled."""
    N, K = 70, 37
    w, ws = make_w(N, K)
    ws = ws * 0.02
    dy = (torch.randn(9, N, generator=_gen(9), dtype=torch.float64) * 1e-2).to(DEVICE, torch.float16)
    dx = k.dequant_matmul(dy, w, ws)
    assert dx.abs().max() > 6.2e-5 * 4  # the output itself is normal
    assert_close("dx", dx, dy.cpu().double() @ ref.dequantize_weight(w.cpu(), ws.cpu()).double(), torch.float16)


def test_dequant_matmul_empty():
    w, ws = make_w(8, 16)
    dx = k.dequant_matmul(torch.zeros(0, 8, device=DEVICE), w, ws)
    assert dx.shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# outlier columns zeroed before the GEMM (no mask in its K loop)


@pytest.mark.parametrize("M", [1, 5, 32, 33, 70, 130])
def test_outlier_columns_zeroes_the_codes(M, poison_outputs):
    """outlier_columns(flags, q) sets q's flagged columns to 0 and nothing else: in the compaction
    program itself (M <= ZERO_FUSED_MAX_M) or by _zero_columns_kernel (ZERO_ROWS rows a
    program), in a row-strided view, without touching the columns around it."""
    assert k.ZERO_FUSED_MAX_M == 32 and k.ZERO_ROWS == 64  # the cases above straddle both
    K = 70
    g = _gen(M + 3)
    big = torch.randint(-127, 128, (M, 2 * K), generator=g, dtype=torch.int8)
    flags = (torch.rand(K, generator=g) < 0.15).int()
    flags[0] = flags[K - 1] = 1
    want = big.clone()
    want[:, K:][:, flags.bool()] = 0
    qb = big.to(DEVICE)
    cols, count = k.outlier_columns(flags.to(DEVICE), qb[:, K:])
    assert torch.equal(qb.cpu(), want)
    n = int(count.item())
    assert torch.equal(cols[:n].cpu().long(), torch.nonzero(flags).flatten())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [5, 33])
def test_int8_gemm_on_zeroed_codes_equals_masked_gemm(dtype, M, poison_outputs):
    """The layer's path (quant_rows, outlier_columns zeroing q, the GEMM without col_flags) gives
    the GEMM's masked result bit for bit; the zeroed codes are int8_vectorwise_quant's, and
    int8_gemm's col_flags path leaves the caller's q as it was."""
    K, N = 130, 37
    x = make_x(M, K, dtype)
    w, ws = make_w(N, K)
    bias = (torch.randn(N, generator=_gen(N), dtype=torch.float64) * 0.1).to(DEVICE, dtype)
    q, scale, flags = k.quant_rows(x, THRESHOLD)
    q_before = q.clone()
    cols, count = k.outlier_columns(flags)
    y_masked = k.int8_gemm(q, scale, w, ws, bias, dtype, x=x, col_flags=flags, cols=cols, count=count)
    assert torch.equal(q, q_before)
    cols_z, count_z = k.outlier_columns(flags, q)
    assert torch.equal(q.cpu(), ref.int8_vectorwise_quant(x.cpu(), THRESHOLD)[0])
    y = k.int8_gemm(q, scale, w, ws, bias, dtype, x=x, cols=cols_z, count=count_z)
    assert torch.equal(y, y_masked)
    assert_close("y", y, reference_linear(x, w, ws, bias, THRESHOLD), dtype)


# --------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 300, 2048])
def test_gpu_autotuned_configs_are_correct(M, monkeypatch, poison_outputs):
    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "1")
    K, N = 1024, 768
    x = make_x(M, K, torch.bfloat16)
    w, ws = make_w(N, K)
    bias = torch.randn(N, generator=_gen(2)).to(DEVICE, torch.bfloat16)
    for threshold in (0.0, THRESHOLD):
        y = run_gemm(x, w, ws, bias, threshold)
        assert_close("y", y, reference_linear(x, w, ws, bias, threshold), torch.bfloat16)
    dy = torch.randn(M, N, generator=_gen(M)).to(DEVICE, torch.bfloat16)
    dx = k.dequant_matmul(dy, w, ws)
    assert_close("dx", dx, dy.cpu().double() @ ref.dequantize_weight(w.cpu(), ws.cpu()).double(), torch.bfloat16)
