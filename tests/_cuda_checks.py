"""The checks of the CUDA C++ extension fastpeft._C, each taking the device: the GPU tests
(tests/test_cuda_ext.py) run them on CUDA tensors, the emulator tests (tests/test_cuda_emu.py)
on CPU tensors through the host emulation of the kernels."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

import fastpeft
from fastpeft.ops import _cext
from fastpeft.reference import int8 as ref_int8
from fastpeft.reference import quant as ref_quant
from fastpeft.reference.dropout import dropout_2d, dropout_keep_mask
from fastpeft.reference.lora import lora_linear as ref_lora_linear

from _utils import TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = os.path.join(home, "bin", "nvcc") if home else None
    return shutil.which("nvcc") or (cand if cand and os.access(cand, os.X_OK) else None)


def _expected_archs() -> set[int]:
    return {int(a) for a in os.environ.get("FASTPEFT_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()}


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as t (2-D) in another memory layout."""
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "strided":  # neither dim contiguous
        big = torch.full((t.shape[0] * 2, t.shape[1] * 3), float("nan"), dtype=t.dtype, device=t.device)
        big[::2, ::3] = t
        return big[::2, ::3]
    if kind == "misaligned":  # row-major, starting one element past a 16-byte boundary (rows 32 bytes padded)
        pad = 16 // t.element_size()
        big = torch.full((t.shape[0], t.shape[1] + 2 * pad), float("nan"), dtype=t.dtype, device=t.device)
        big[:, 1:t.shape[1] + 1] = t
        return big[:, 1:t.shape[1] + 1]
    return t.contiguous()


def check_shrink(device, dtype, M, K, R, x_layout="contiguous", a_transposed=False, p=0.0, seed=7,
                 out_scale=0.75):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + R)
    x = layout(torch.randn(M, K, generator=g).to(device, dtype), x_layout)
    A = torch.randn(R, K, generator=g).to(device, dtype)
    if a_transposed:  # the operand as a view of a [K, R] matrix
        store = A.t().contiguous()
        a, strides = store, (store.stride(1), store.stride(0))
    else:
        a, strides = A, (A.stride(0), A.stride(1))
    u = _cext.lora_shrink(x, a, strides, R, out_scale, dropout_p=p, seed=seed)
    ref = out_scale * dropout_2d(x.double(), p, seed) @ A.double().t()
    assert u.dtype == torch.float32 and u.shape == (M, R)
    assert rel_err(u, ref) <= TOL[dtype]


def check_shrink_split_k(device, dtype, M, K, R, split_k):
    """The binding directly: explicit split-K, U a view inside a NaN buffer (padding untouched)."""
    C = _cext._extension()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    A = torch.randn(R, K, generator=g).to(device, dtype)
    buf = torch.full((M + 2, R + 3), float("nan"), device=device)
    u = buf[1:-1, 1:-2]
    C.lora_shrink(x=x.data_ptr(), s_xm=x.stride(0), s_xk=x.stride(1), a=A.data_ptr(), s_ar=A.stride(0),
                  s_ak=A.stride(1), u=u.data_ptr(), s_um=u.stride(0), s_ur=u.stride(1), M=M, K=K, R=R,
                  dtype=_cext._DTYPE_CODES[dtype], out_scale=1.0, split_k=split_k, device=x.device.index or 0, stream=_stream(device))
    assert rel_err(u, x.double() @ A.double().t()) <= TOL[dtype]
    pad = buf.clone()
    pad[1:-1, 1:-2] = float("nan")
    assert torch.isnan(pad).all(), "shrink wrote outside U"


def check_expand(device, dtype, M, N, R, y_layout="contiguous", b_transposed=False, p=0.0, seed=11,
                 scaling=1.5):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + R)
    y0 = torch.randn(M, N, generator=g).to(device, dtype)
    u = torch.randn(M, R, generator=g).to(device)
    B = torch.randn(N, R, generator=g).to(device, dtype)
    if b_transposed:  # the operand as a view of an [R, N] matrix (backward: A^T)
        store = B.t().contiguous()
        b, strides = store, (store.stride(1), store.stride(0))
    else:
        b, strides = B, (B.stride(0), B.stride(1))
    y = layout(y0.clone(), y_layout)
    out = _cext.lora_expand_(y, u, b, strides, R, scaling, dropout_p=p, seed=seed, epilogue_dropout=p > 0)
    assert out is y
    ref = y0.double() + scaling * dropout_2d(u.double() @ B.double().t(), p, seed)
    assert rel_err(y, ref) <= TOL[dtype]


def check_expand_bounds(device, dtype, M, N, R):
    """y a view inside a NaN-padded buffer: the view is updated, the padding left alone."""
    g = torch.Generator().manual_seed(5)
    buf = torch.full((M + 2, N + 3), float("nan"), dtype=dtype, device=device)
    y = buf[1:-1, 2:-1]
    y0 = torch.randn(M, N, generator=g).to(device, dtype)
    y.copy_(y0)
    u = torch.randn(M, R, generator=g).to(device)
    B = torch.randn(N, R, generator=g).to(device, dtype)
    _cext.lora_expand_(y, u, B, B.stride(), R, 0.5)
    assert rel_err(y, y0.double() + 0.5 * (u.double() @ B.double().t())) <= TOL[dtype]
    pad = buf.clone()
    pad[1:-1, 2:-1] = float("nan")
    assert torch.isnan(pad).all(), "expand wrote outside y"


def check_dropout_masks(device, M, K, p, seed):
    """Shrink with A = I and expand of ones recover the keep mask: bit-identical to the reference."""
    keep = dropout_keep_mask(seed, M, K, p).to(device)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    x = torch.ones(M, K, device=device)
    eye = torch.eye(K, device=device)
    u = _cext.lora_shrink(x, eye, eye.stride(), K, dropout_p=p, seed=seed)
    assert torch.equal(u != 0, keep)
    assert torch.all(u[keep] == scale.to(device))
    y = torch.zeros(M, K, device=device)
    ones_m, ones_k = torch.ones(M, 1, device=device), torch.ones(K, 1, device=device)
    _cext.lora_expand_(y, ones_m, ones_k, ones_k.stride(), 1, 1.0, dropout_p=p, seed=seed, epilogue_dropout=True)
    assert torch.equal(y != 0, keep)
    assert torch.all(y[keep] == scale.to(device))


def check_lora_linear(device, dtype, lead, K, N, r, p, seed=1234, scaling=2.0):
    g = torch.Generator().manual_seed(K + N + r)
    x = torch.randn(*lead, K, generator=g)
    w, bias = torch.randn(N, K, generator=g) / math.sqrt(K), torch.randn(N, generator=g)
    A, B = torch.randn(r, K, generator=g) / math.sqrt(K), torch.randn(N, r, generator=g) / math.sqrt(r)
    dy = torch.randn(*lead, N, generator=g)

    def run(dt, dev, fn, **kw):
        grads = ((x, True), (w, False), (bias, True), (A, True), (B, True))
        leaves = [t.to(dev, dt, copy=True).requires_grad_(rg) for t, rg in grads]
        y = fn(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], scaling, dropout_p=p, **kw)
        y.backward(dy.to(dev, dt))
        return [y] + [leaves[i].grad for i in (0, 2, 3, 4)]

    out = run(dtype, device, fastpeft.lora_linear, training=True, seed=seed, backend="cuda")
    ref = run(torch.float64, "cpu", ref_lora_linear, seed=seed)
    for name, o, rf in zip(("y", "dx", "dbias", "dA", "dB"), out, ref):
        assert o.dtype == dtype and o.shape == rf.shape, name
        assert rel_err(o, rf) <= TOL[dtype], f"{name}: rel err {rel_err(o, rf):.2e}"


def check_wrapper_errors(device):
    x, A = torch.randn(4, 8, device=device), torch.randn(2, 8, device=device)
    y, u, B = torch.randn(4, 6, device=device), torch.randn(4, 2, device=device), torch.randn(6, 2, device=device)
    with pytest.raises(TypeError, match="dtypes must match"):
        _cext.lora_shrink(x, A.half(), A.stride(), 2)
    with pytest.raises(TypeError, match="int8"):
        _cext.lora_shrink(x.to(torch.int8), A, A.stride(), 2)
    with pytest.raises(ValueError, match="R must be > 0"):
        _cext.lora_shrink(x, A, A.stride(), 0)
    with pytest.raises(ValueError, match="outside its storage"):
        _cext.lora_shrink(x, A, A.stride(), 3)
    with pytest.raises(ValueError, match="dropout_p"):
        _cext.lora_shrink(x, A, A.stride(), 2, dropout_p=1.0)
    with pytest.raises(TypeError, match="u has dtype"):
        _cext.lora_expand_(y, u.half(), B, B.stride(), 2, 1.0)
    with pytest.raises(ValueError, match="u has shape"):
        _cext.lora_expand_(y, u[:, :1], B, B.stride(), 2, 1.0)
    with pytest.raises(ValueError, match="outside its storage"):
        _cext.lora_expand_(y, u, B, (2, 7), 2, 1.0)
    with pytest.raises(ValueError, match="overlapping"):
        _cext.lora_expand_(torch.zeros(1, 6, device=device).expand(4, 6), u, B, B.stride(), 2, 1.0)
    with pytest.raises(ValueError, match="epilogue_dropout"):
        _cext.lora_expand_(y, u, B, B.stride(), 2, 1.0, dropout_p=0.1)


def check_empty(device):
    A = torch.randn(3, 8, device=device)
    assert _cext.lora_shrink(torch.randn(0, 8, device=device), A, A.stride(), 3).shape == (0, 3)
    u = _cext.lora_shrink(torch.randn(5, 0, device=device), torch.randn(3, 0, device=device), (0, 1), 3)
    assert torch.equal(u, torch.zeros(5, 3, device=device))
    y = torch.randn(0, 4, device=device)
    _cext.lora_expand_(y, torch.randn(0, 3, device=device), torch.randn(4, 3, device=device), (3, 1), 3, 1.0)


def _stream(device) -> int:
    return _cext._stream(torch.device(device))


def int8_x(M, K, dtype, threshold, special=(), seed=0, device="cpu"):
    """Fresh x [M, K] ~ N(0, 1) (no natural outliers at threshold 6) with planted outliers when
    threshold > 0: three columns get entries of 1.2 .. 4 x threshold in a few rows, one entry is exactly
    the threshold (an outlier: |x| >= t) and one just below it (kept; it sets its row's scale).
    ``special`` (when M > 3; the outliers then go to rows >= 3): "zero" (row 0 all zeros), "nan"
    (row 1 gets a NaN), "inf" (row 2 gets a -inf: an outlier when threshold > 0), "tiny" (row 3
    scaled by 1e-40: subnormal in fp32 and bf16, 127 / its scale overflows; zeros in fp16).
    """
    g = torch.Generator().manual_seed(seed * 7919 + M * 131 + K)
    x = torch.randn(M, K, generator=g)
    first = len(special) if special and M > len(special) else 0
    if threshold > 0 and K >= 3:
        cols = torch.randperm(K, generator=g)[:3]
        for c in cols.tolist():
            rows = first + torch.randperm(M - first, generator=g)[:max(1, M // 50)]
            mag = threshold * (1.2 + 2.8 * torch.rand(len(rows), generator=g))
            x[rows, c] = torch.where(torch.rand(len(rows), generator=g) < 0.5, -mag, mag)
        x[M - 1, cols[0]] = threshold
        x[M - 1, cols[1]] = -threshold
        x[max(first, M // 2), (cols[2] + 1) % K] = -threshold * 0.999
    if first:
        if "zero" in special:
            x[0] = 0.0
        if "nan" in special:
            x[1, K // 2] = float("nan")
        if "inf" in special:
            x[2, K // 3] = float("-inf")
        if "tiny" in special:
            x[3] *= 1e-40
    return x.to(device, dtype)


def int8_codes(x, threshold, row_scale):
    """The reference's codes before it zeroes the outlier columns (what the kernels write)."""
    xf = x.float().cpu()
    kept = xf.masked_fill(xf.abs() >= threshold, 0.0) if threshold > 0 else xf
    return ref_int8.row_codes(kept, row_scale.cpu())


def check_int8_quant(device, dtype, M, K, threshold, x_layout="contiguous", special=()):
    """Codes, scales and outlier flags equal the reference's exactly (NaN scales included)."""
    x = layout(int8_x(M, K, dtype, threshold, special, device=device), x_layout)
    q, rs, flags = _cext.int8_quant_rows(x, threshold)
    rq, rrs, rcols = ref_int8.int8_vectorwise_quant(x.cpu(), threshold)
    assert q.dtype == torch.int8 and q.shape == (M, K) and q.is_contiguous()
    assert rs.dtype == torch.float32 and rs.shape == (M,)
    torch.testing.assert_close(rs.cpu(), rrs, rtol=0, atol=0, equal_nan=True)
    if threshold == 0:
        assert flags is None
        assert torch.equal(q.cpu(), rq)
        return
    assert flags.dtype == torch.int32 and flags.shape == (K,)
    assert set(flags.cpu().unique().tolist()) <= {0, 1}
    assert torch.equal(torch.nonzero(flags.cpu()).flatten(), rcols)
    if K >= 3:
        assert rcols.numel() >= 3, "the planted outlier columns were not found"
    masked = q.cpu().clone()
    masked[:, rcols] = 0
    assert torch.equal(masked, rq)  # the reference zeroes the outlier columns; the GEMM masks them
    assert torch.equal(q.cpu(), int8_codes(x, threshold, rrs))  # outlier columns: codes of the kept entries


def check_int8_quant_bounds(device, dtype, M, K, threshold, pad=5):
    """The binding directly: q, row_scale and col_flags as views inside poisoned buffers; only the views change."""
    C = _cext._extension()
    x = int8_x(M, K, dtype, threshold, ("zero",), device=device)
    qbuf = torch.full((M + 2, K + pad), -128, dtype=torch.int8, device=device)
    q = qbuf[1:-1, 1:K + 1]
    sbuf = torch.full((M + 2,), float("nan"), device=device)
    fbuf = torch.full((K + 2,), 7, dtype=torch.int32, device=device)
    fbuf[1:-1] = 0
    C.int8_quant_rows(x=x.data_ptr(), s_xm=x.stride(0), s_xk=x.stride(1), q=q.data_ptr(), s_qm=q.stride(0),
                      row_scale=sbuf[1:].data_ptr(), M=M, K=K, dtype=_cext._DTYPE_CODES[dtype], threshold=threshold, col_flags=fbuf[1:].data_ptr(),
                      device=x.device.index or 0, stream=_stream(device))
    rq, rrs, rcols = ref_int8.int8_vectorwise_quant(x.cpu(), threshold)
    assert torch.equal(q.cpu(), int8_codes(x, threshold, rrs))
    torch.testing.assert_close(sbuf[1:-1].cpu(), rrs, rtol=0, atol=0)
    want = rcols if threshold > 0 else torch.zeros(0, dtype=torch.long)
    assert torch.equal(torch.nonzero(fbuf[1:-1].cpu()).flatten(), want)
    qpad = qbuf.clone()
    qpad[1:-1, 1:K + 1] = -128
    assert torch.all(qpad == -128), "quant_rows wrote outside q"
    assert torch.isnan(sbuf[0]) and torch.isnan(sbuf[-1]), "quant_rows wrote outside row_scale"
    assert fbuf[0].item() == 7 and fbuf[-1].item() == 7, "quant_rows wrote outside col_flags"


def int8_gemm_inputs(M, N, K, dtype, threshold, special=(), seed=0, device="cpu", bias=True):
    """x, the kernels' unmasked codes q, row_scale, col_flags, cols (padded to K with decoys), count,
    and w_int8, w_scale, bias, on ``device``."""
    x = int8_x(M, K, dtype, threshold, special, seed)
    _, rs, cols = ref_int8.int8_vectorwise_quant(x, threshold)
    q = int8_codes(x, threshold, rs)
    g = torch.Generator().manual_seed(seed + 17)
    w_int8, w_scale = ref_int8.quantize_weight(torch.randn(N, K, generator=g) / math.sqrt(K))
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    flags = cols_pad = count = None
    if threshold > 0:
        flags = torch.zeros(K, dtype=torch.int32)
        flags[cols] = 1
        cols_pad = torch.zeros(K, dtype=torch.int32)  # decoys past count: column 0, which must not be added
        cols_pad[:cols.numel()] = cols.to(torch.int32)
        count = torch.tensor([cols.numel()], dtype=torch.int32)
    to = (lambda t: None if t is None else t.to(device))
    return dict(x=to(x), q=to(q), rs=to(rs), w=to(w_int8), ws=to(w_scale), bias=to(b), flags=to(flags),
                cols=to(cols_pad), count=to(count))


def int8_gemm_ref(q, rs, w, ws, bias, x=None, flags=None, cols=None):
    """float64 y of the kernel's contract: q masked by flags, outliers over the valid entries of ``cols``."""
    q, w = q.cpu().double(), w.cpu().double()  # int8 products summed exactly in float64 (< 2^53)
    if flags is not None:
        q = q.masked_fill(flags.cpu().bool()[None, :], 0)
    y = (q @ w.t()) * (rs.cpu().double()[:, None] * ws.cpu().double()[None, :]) / 127.0**2
    if cols is not None:
        cols = cols.cpu().long()
        cols = cols[(cols >= 0) & (cols < q.shape[1])]
        if cols.numel():
            wc = w[:, cols] * (ws.cpu().double()[:, None] / 127.0)
            y = y + x.cpu().double()[:, cols] @ wc.t()
    if bias is not None:
        y = y + bias.cpu().double()
    return y


def assert_rows_match(y, ref, dtype):
    """Rows whose reference is finite within tolerance; the others non-finite in the same places."""
    y, ref = y.cpu().double(), ref.cpu().double()
    bad = ~torch.isfinite(ref).all(dim=1)
    assert torch.equal(torch.isfinite(y[bad]), torch.isfinite(ref[bad])), "non-finite rows differ"
    if (~bad).any():
        err = rel_err(y[~bad], ref[~bad])
        assert err <= TOL[dtype], f"rel err {err:.2e}"


def check_int8_gemm(device, dtype, M, N, K, threshold, bias=True, tile=0, x_layout="contiguous", special=(),
                    w_layout="contiguous"):
    t = int8_gemm_inputs(M, N, K, dtype, threshold, special, device=device, bias=bias)
    x = layout(t["x"], x_layout)
    w = t["w"]
    if w_layout == "padded":  # rows 16-byte aligned but longer than K; or misaligned: byte loads
        big = torch.zeros(N, K + 16, dtype=torch.int8, device=device)
        big[:, :K] = w
        w = big[:, :K]
    elif w_layout == "misaligned":
        big = torch.zeros(N, K + 16, dtype=torch.int8, device=device)
        big[:, 1:K + 1] = w
        w = big[:, 1:K + 1]
    kw = dict(x=x, col_flags=t["flags"], cols=t["cols"], count=t["count"]) if threshold > 0 else {}
    y = _cext.int8_gemm(t["q"], t["rs"], w, t["ws"], t["bias"], dtype, tile=tile, **kw)
    assert y.dtype == dtype and y.shape == (M, N)
    n = int(t["count"].item()) if threshold > 0 else 0
    ref = int8_gemm_ref(t["q"], t["rs"], t["w"], t["ws"], t["bias"], x, t["flags"],
                        t["cols"][:n] if threshold > 0 else None)
    assert_rows_match(y, ref, dtype)


def check_int8_linear_flow(device, dtype, M, N, K, threshold, special=()):
    """quant_rows -> nonzero(col_flags) -> gemm, as the ops layer runs them, against reference.int8_linear."""
    t = int8_gemm_inputs(M, N, K, dtype, threshold, special, seed=3, device=device)
    q, rs, flags = _cext.int8_quant_rows(t["x"], threshold)
    kw = {}
    if flags is not None:
        nz = torch.nonzero(flags).flatten().to(torch.int32)
        cols = torch.zeros(K, dtype=torch.int32, device=device)
        cols[:nz.numel()] = nz
        kw = dict(x=t["x"], col_flags=flags, cols=cols, count=torch.tensor([nz.numel()], dtype=torch.int32,
                                                                            device=device))
    y = _cext.int8_gemm(q, rs, t["w"], t["ws"], t["bias"], dtype, **kw)
    ref = ref_int8.int8_linear(t["x"].cpu().double(), t["w"].cpu(), t["ws"].cpu(), t["bias"].cpu().double(),
                               threshold)
    assert_rows_match(y, ref, dtype)


def check_int8_gemm_bounds(device, dtype, M, N, K, threshold, tile=0):
    """The binding directly: y a view inside a NaN buffer (written exactly once per element, padding untouched)."""
    C = _cext._extension()
    t = int8_gemm_inputs(M, N, K, dtype, threshold, device=device)
    buf = torch.full((M + 2, N + 3), float("nan"), dtype=dtype, device=device)
    y = buf[1:-1, 2:-1]
    x = t["x"]
    ptr = (lambda v: 0 if v is None else v.data_ptr())
    C.int8_gemm(q=t["q"].data_ptr(), s_qm=t["q"].stride(0), row_scale=t["rs"].data_ptr(), w=t["w"].data_ptr(),
                s_wn=t["w"].stride(0), w_scale=t["ws"].data_ptr(), y=y.data_ptr(), s_ym=y.stride(0), M=M, N=N, K=K,
                dtype=_cext._DTYPE_CODES[dtype], bias=ptr(t["bias"]), x=x.data_ptr(), s_xm=x.stride(0), s_xk=x.stride(1), col_flags=ptr(t["flags"]),
                cols=ptr(t["cols"]), n_cols=K if threshold > 0 else 0, count=ptr(t["count"]), tile=tile,
                device=x.device.index or 0, stream=_stream(device))
    n = int(t["count"].item()) if threshold > 0 else 0
    ref = int8_gemm_ref(t["q"], t["rs"], t["w"], t["ws"], t["bias"], x, t["flags"],
                        t["cols"][:n] if threshold > 0 else None)
    assert rel_err(y, ref) <= TOL[dtype]
    pad = buf.clone()
    pad[1:-1, 2:-1] = float("nan")
    assert torch.isnan(pad).all(), "int8_gemm wrote outside y"


def check_int8_gemm_bad_cols(device, dtype=torch.float32, M=7, N=40, K=50):
    """Out-of-range entries in cols are skipped, count is clamped to len(cols): no fault, no stray reads."""
    t = int8_gemm_inputs(M, N, K, dtype, 6.0, device=device)
    cols = torch.tensor([-1, K, 2**31 - 1, 3], dtype=torch.int32, device=device)
    count = torch.tensor([1000], dtype=torch.int32, device=device)  # more than len(cols) and K
    y = _cext.int8_gemm(t["q"], t["rs"], t["w"], t["ws"], t["bias"], dtype, x=t["x"], col_flags=t["flags"],
                        cols=cols, count=count)
    ref = int8_gemm_ref(t["q"], t["rs"], t["w"], t["ws"], t["bias"], t["x"], t["flags"], cols)
    assert rel_err(y, ref) <= TOL[dtype]
    count.fill_(-5)  # negative: no outlier columns
    y = _cext.int8_gemm(t["q"], t["rs"], t["w"], t["ws"], None, dtype, x=t["x"], cols=cols, count=count)
    assert rel_err(y, int8_gemm_ref(t["q"], t["rs"], t["w"], t["ws"], None)) <= TOL[dtype]


def check_int8_errors_and_empty(device):
    x = torch.randn(4, 8, device=device)
    q8, rs = torch.zeros(4, 8, dtype=torch.int8, device=device), torch.ones(4, device=device)
    w8, ws = torch.zeros(5, 8, dtype=torch.int8, device=device), torch.ones(5, device=device)
    with pytest.raises(ValueError, match="threshold"):
        _cext.int8_quant_rows(x, -1.0)
    with pytest.raises(ValueError, match="threshold"):
        _cext.int8_quant_rows(x, float("nan"))
    with pytest.raises(TypeError, match="int8"):
        _cext.int8_quant_rows(x.to(torch.int8), 0.0)
    with pytest.raises(TypeError, match="w_int8 has dtype"):
        _cext.int8_gemm(q8, rs, w8.float(), ws, None, torch.float32)
    with pytest.raises(ValueError, match="disagree on K"):
        _cext.int8_gemm(q8, rs, w8[:, :7], ws, None, torch.float32)
    with pytest.raises(ValueError, match="row_scale has shape"):
        _cext.int8_gemm(q8, rs[:3], w8, ws, None, torch.float32)
    with pytest.raises(TypeError, match="bias has dtype"):
        _cext.int8_gemm(q8, rs, w8, ws, torch.zeros(5, device=device, dtype=torch.float16), torch.float32)
    with pytest.raises(ValueError, match="unit column stride"):
        _cext.int8_gemm(q8, rs, w8.t().contiguous().t(), ws, None, torch.float32)
    cols, count = torch.zeros(8, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="come together"):
        _cext.int8_gemm(q8, rs, w8, ws, None, torch.float32, x=x, cols=cols)
    with pytest.raises(ValueError, match="need x"):
        _cext.int8_gemm(q8, rs, w8, ws, None, torch.float32, cols=cols, count=count)
    with pytest.raises(TypeError, match="x has dtype"):
        _cext.int8_gemm(q8, rs, w8, ws, None, torch.float16, x=x, cols=cols, count=count)
    with pytest.raises(TypeError, match="out_dtype"):
        _cext.int8_gemm(q8, rs, w8, ws, None, torch.int32)
    big_k = 133144  # 127 * 127 * K would overflow the int32 accumulators
    with pytest.raises(ValueError, match="exceeds"):
        _cext.int8_gemm(torch.zeros(1, big_k, dtype=torch.int8, device=device), rs[:1],
                        torch.zeros(1, big_k, dtype=torch.int8, device=device), ws[:1], None, torch.float32)
    # empty inputs
    q, s, f = _cext.int8_quant_rows(torch.randn(0, 8, device=device), 6.0)
    assert q.shape == (0, 8) and s.shape == (0,) and torch.equal(f, torch.zeros(8, dtype=torch.int32, device=device))
    q, s, f = _cext.int8_quant_rows(torch.randn(3, 0, device=device), 0.0)
    assert q.shape == (3, 0) and torch.equal(s, torch.zeros(3, device=device)) and f is None
    assert _cext.int8_gemm(q8[:0], rs[:0], w8, ws, None, torch.float32).shape == (0, 5)
    assert _cext.int8_gemm(q8, rs, w8[:0], ws[:0], None, torch.float32).shape == (4, 0)
    b = torch.randn(5, device=device)
    y = _cext.int8_gemm(q8[:, :0], rs, w8[:, :0], ws, b, torch.float32)  # K = 0: the bias
    assert torch.equal(y, b.expand(4, 5))


def quant_x(shape, dtype, axis=None, group_size=None, special=True, seed=0, device="cpu"):
    """x of ``shape`` built slot by slot (rows of ``reference.quant.slot_view``): N(0, 1) times a per-slot
    magnitude (some slots all-positive); with ``special`` (and enough slots): slot 0 all zeros, 1 a NaN,
    2 constant -3, 3 ties (x * (1 / scale) lands on .5 for absmax 8-bit), 4 constant 2.5, 5 a -inf."""
    g = torch.Generator().manual_seed(seed * 7919 + sum(shape) * 131 + len(shape))
    if group_size is not None:
        slots, moved = math.prod(shape) // group_size, None
    elif axis is None:
        slots, moved = 1, None
    else:
        moved = list(torch.empty(shape, device="meta").movedim(axis, 0).shape)
        slots = shape[axis]
    per = math.prod(shape) // slots
    s = torch.randn(slots, per, generator=g) * torch.exp(torch.randn(slots, 1, generator=g))
    s[1::3] = s[1::3].abs()  # some slots all >= 0: zero point 0
    if special and slots >= 6:
        s[0] = 0.0
        s[1, per // 2] = float("nan")
        s[2] = -3.0
        s[3] = (torch.arange(per) % 9 - 4).float() * 0.5 + 0.25  # absmax 4.25 .. : ties and near-ties
        s[3, 0] = 63.5
        s[4] = 2.5
        s[5, per // 3] = float("-inf")
    if group_size is not None or axis is None:
        x = s.reshape(shape)
    else:
        x = s.reshape(moved).movedim(0, axis)
    return x.to(device, dtype).contiguous()


def quant_ref(x, bits, scheme, axis, group_size):
    """(data, scale, zero_point) of the reference, on the CPU."""
    x = x.cpu()
    scale, zp = ref_quant.compute_qparams(x, bits, scheme, axis, group_size)
    q = ref_quant.quantize_codes(x, scale, zp, bits, scheme, axis, group_size)
    if bits == 4:
        return ref_quant.pack4(q), scale, zp
    return q.to(torch.int8 if scheme == "absmax" else torch.uint8), scale, zp


def dequant_ref(data, scale, zp, bits, scheme, axis, group_size, shape, out_dtype):
    data, scale, zp = data.cpu(), scale.cpu(), zp.cpu()
    q = ref_quant.unpack4(data, shape[-1], scheme == "absmax") if bits == 4 else data.to(torch.int32)
    return ref_quant.dequantize_codes(q.reshape(shape), scale, zp, axis, group_size).to(out_dtype)


def assert_same(out, ref, what):
    assert out.dtype == ref.dtype and tuple(out.shape) == tuple(ref.shape), (what, out.dtype, out.shape, ref.shape)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_quant(device, dtype, shape, bits, scheme, axis=None, group_size=None, special=True, out_dtype=None):
    """quantize: data, scale, zero_point equal the reference's bit for bit; dequantize of the result too."""
    x = quant_x(shape, dtype, axis, group_size, special, device=device)
    data, scale, zp = _cext.quant_quantize(x, bits, scheme, axis, group_size)
    rdata, rscale, rzp = quant_ref(x, bits, scheme, axis, group_size)
    assert_same(data, rdata, "data")
    assert_same(scale, rscale, "scale")
    assert_same(zp, rzp, "zero_point")
    out_dtype = out_dtype or dtype
    y = _cext.quant_dequantize(data, scale, zp, bits, scheme, axis, group_size, shape, out_dtype)
    assert_same(y, dequant_ref(rdata, rscale, rzp, bits, scheme, axis, group_size, shape, out_dtype), "y")
    fin = torch.isfinite(x.cpu().float()) & torch.isfinite(y.cpu().float())  # round trip within scale / 2
    if out_dtype == torch.float32 and fin.any():
        s = ref_quant.dequantize_codes(torch.ones(shape, dtype=torch.int32), rscale, torch.zeros_like(rzp), axis,
                                       group_size)
        err = (y.cpu() - x.cpu().float()).abs()
        ok = torch.isfinite(s) & fin & (x.cpu().float().abs() < 1e30)
        assert bool((err[ok] <= s[ok] / 2 * (1 + 1e-6)).all())


def check_dequant(device, out_dtype, shape, bits, scheme, axis=None, group_size=None, misaligned=False, seed=1):
    """dequantize of random codes (every nibble / byte value), scales and zero points."""
    g = torch.Generator().manual_seed(seed + sum(shape))
    dtype, dshape = _cext._quant_data_spec(tuple(shape), bits, scheme)
    raw = torch.randint(0, 256, (math.prod(dshape) + 1,), generator=g, dtype=torch.int32).to(torch.uint8)
    data = raw.view(dtype)[1:] if misaligned else raw.view(dtype)[:-1]  # misaligned: 1 byte past the start
    data = data.reshape(dshape)
    *_, sshape = _cext._quant_geometry(tuple(shape), bits, scheme, axis, group_size)
    scale = torch.exp(torch.randn(sshape, generator=g)).float()
    zp = torch.randint(0, 16 if bits == 4 else 256, sshape, generator=g, dtype=torch.int32)
    if scheme == "absmax":
        zp.zero_()
    data, scale, zp = data.to(device), scale.to(device), zp.to(device)
    y = _cext.quant_dequantize(data, scale, zp, bits, scheme, axis, group_size, shape, out_dtype)
    assert_same(y, dequant_ref(data, scale, zp, bits, scheme, axis, group_size, shape, out_dtype), "y")


def check_nf4_dequant(device, out_dtype, n, block_size, double, scheme="nf4", misaligned=False, api=False, seed=3):
    """NF4 / FP4 dequantize (csrc/nf4.cu) of random codes (every byte value) and absmax against
    fastpeft/reference/nf4.py, bit for bit; ``misaligned``: the codes 1 byte past an aligned start
    (the scalar path); ``api``: through fastpeft.dequantize(backend="cuda") on a QuantizedTensor."""
    import fastpeft
    from fastpeft.ops import nf4 as ops_nf4
    from fastpeft.ops.quant import QuantizedTensor
    from fastpeft.reference import nf4 as ref_nf4
    g = torch.Generator().manual_seed(seed + n + block_size)
    nbytes, blocks = (n + 1) // 2, -(-n // block_size)
    raw = torch.randint(0, 256, (nbytes + 1,), generator=g, dtype=torch.int32).to(torch.uint8)
    data = raw[1:] if misaligned else raw[:-1]
    if double:
        absmax = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.int32).to(torch.uint8)
        nested = torch.exp(torch.randn(-(-blocks // 256), generator=g)).float()
        offset = torch.randn((), generator=g).float()
        want_absmax = ref_nf4.dequantize_absmax(absmax, nested, offset)
    else:
        absmax = torch.exp(torch.randn(blocks, generator=g)).float()
        nested = offset = None
        want_absmax = absmax
    want = ref_nf4.dequantize_4bit(data, want_absmax, scheme, block_size, (n,), out_dtype)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    if api:
        q = QuantizedTensor(to(data), to(absmax), None, 4, scheme, None, block_size, torch.Size((n,)), out_dtype,
                            to(nested), to(offset))
        y = fastpeft.dequantize(q, out_dtype, backend="cuda")
    else:
        tables = ops_nf4._tables(torch.device(device))
        y = _cext.nf4_dequantize(to(data), to(absmax), to(nested), to(offset), tables[scheme][0],
                                 tables["dynamic"] if double else None, block_size, n, out_dtype)
    assert_same(y, want, "y")


def check_nf4_dequant_errors(device):
    """Wrong sizes and dtypes are refused before any launch; n = 0 gives an empty tensor."""
    from fastpeft.ops import nf4 as ops_nf4
    t = ops_nf4._tables(torch.device(device))
    data = torch.zeros(32, dtype=torch.uint8, device=device)
    absmax = torch.ones(1, device=device)
    assert _cext.nf4_dequantize(data[:0], absmax[:0], None, None, t["nf4"][0], None, 64, 0, torch.float32).numel() == 0
    with pytest.raises(ValueError, match="data must be torch.uint8 with 32 elements"):
        _cext.nf4_dequantize(data[:31], absmax, None, None, t["nf4"][0], None, 64, 64, torch.float32)
    with pytest.raises(ValueError, match="absmax must be torch.uint8"):  # double quantization: uint8 codes
        _cext.nf4_dequantize(data, absmax, absmax, absmax[0], t["nf4"][0], t["dynamic"], 64, 64, torch.float32)
    with pytest.raises(ValueError, match="double quantization needs"):
        _cext.nf4_dequantize(data, absmax, absmax, None, t["nf4"][0], None, 64, 64, torch.float32)
    with pytest.raises(ValueError, match="bad n"):
        _cext.nf4_dequantize(data, absmax, None, None, t["nf4"][0], None, 63, 64, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        _cext.nf4_dequantize(data, absmax, None, None, t["nf4"][0], None, 64, 64, torch.int32)


def _nf4_quant_x(n, block_size, dtype, misaligned, special, g):
    """x [n] of dtype (normal values times log-normal magnitudes; the absmax of blocks 0, 2, 4, ... in
    their last element). ``special``: the first blocks hold 1.0 (absmax 1,
    so v = x exactly) and, in their other slots, the sorted table's float32 midpoints (ties: the strict <
    rule), their neighbours one ulp up and down, 0.0 and -0.0 (FP4's +0 / -0 midpoint); the next block
    is all zero. ``misaligned``: x starts one element past an aligned start (the scalar path)."""
    from fastpeft.ops import nf4 as ops_nf4
    vals = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    blocks = vals[:n // block_size * block_size].view(-1, block_size)[::2]
    blocks[:, -1] = 3 * blocks.abs().amax(1)  # every other block's absmax in its last element (its last thread)
    x = vals.to(dtype)
    if misaligned:
        x = torch.cat([x[:1], x])[1:]
    if special:
        mids = torch.cat([ops_nf4._tables(torch.device("cpu"))[s][1] for s in ("nf4", "fp4")])
        ties = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                          torch.tensor([0.0, -0.0, 1.0, -1.0])]).to(dtype)
        k = e = 0
        while k < ties.numel() and e < n:
            x[e] = 1.0 if e % block_size == 0 else ties[k]
            k += e % block_size != 0
            e += 1
        zb = -(-e // block_size) * block_size  # the next block: all zero
        x[zb:zb + block_size] = 0.0
    return x


def check_nf4_quant(device, dtype, n, block_size, scheme, misaligned=False, special=True, seed=5):
    """NF4 / FP4 quantize (csrc/nf4.cu) against reference.nf4.quantize_4bit, bit for bit: codes and absmax."""
    from fastpeft.ops import nf4 as ops_nf4
    from fastpeft.reference import nf4 as ref_nf4
    g = torch.Generator().manual_seed(seed + n + block_size)
    x = _nf4_quant_x(n, block_size, dtype, misaligned, special, g)
    want_q, want_absmax = ref_nf4.quantize_4bit(x, scheme, block_size)
    order = None if scheme == "nf4" else ref_nf4.sorted_codes(scheme)
    xd = x.to(device)
    if misaligned:  # keep the offset on the device: one element past a fresh allocation
        xd = torch.cat([xd[:1], xd])[1:]
    q, absmax = _cext.nf4_quantize(xd, ops_nf4._tables(torch.device(device))[scheme][1], order, block_size)
    assert_same(q, want_q, "q")
    assert_same(absmax, want_absmax, "absmax")


def _ref_double_quant(a, offset):
    """reference.nf4.double_quant around a given offset (the mean on the device, or a chosen one)."""
    from fastpeft.reference import nf4 as ref_nf4
    nested, v = ref_nf4.blockwise_scaled(a - offset, ref_nf4.NESTED_BLOCK)
    return ref_nf4.nearest(v, ref_nf4.dynamic_map()).to(torch.uint8), nested


def check_nf4_double_quant(device, nb, special=False, seed=7):
    """Double quantization (csrc/nf4.cu) against reference.nf4, bit for bit. The offset is the mean taken on
    the device (as fastpeft.ops.nf4 takes it; on the CPU: reference.nf4.double_quant itself); ``special``:
    offset 0, an all-zero nested block, then absmax values on the dynamic map's midpoints (ties), one ulp
    either side, and +-1 (nested absmax 1: v = absmax exactly)."""
    from fastpeft.ops import nf4 as ops_nf4
    from fastpeft.reference import nf4 as ref_nf4
    g = torch.Generator().manual_seed(seed + nb)
    a = torch.exp(torch.randn(nb, generator=g)).float()
    if special:
        mids = ref_nf4.midpoints(ref_nf4.dynamic_map())
        ties = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
        assert nb >= 257 + ties.numel() + 1
        a[:256] = 0.0  # an all-zero nested block
        a[256] = 1.0
        a[257:257 + ties.numel()] = ties  # nested blocks 1..3
        a[512], a[768] = -1.0, 1.0
        offset = torch.zeros((), device=device)
        want_q8, want_nested = _ref_double_quant(a, offset.cpu())
    else:
        offset = a.to(device).mean()
        want_q8, want_nested = _ref_double_quant(a, offset.cpu())
        if device == "cpu":  # the reference itself
            ref_q8, ref_nested, ref_offset = ref_nf4.double_quant(a)
            assert torch.equal(ref_offset, offset) and torch.equal(ref_q8, want_q8)
            assert torch.equal(ref_nested, want_nested)
    q8, nested = _cext.nf4_double_quant(a.to(device), offset, ops_nf4._tables(torch.device(device))["dynamic_mids"])
    assert_same(q8, want_q8, "q8")
    assert_same(nested, want_nested, "nested")


def check_nf4_quant_api(device, dtype, shape, scheme, block_size, double):
    """fastpeft.quantize(backend="cuda") on a 4-bit scheme: the QuantizedTensor's fields equal the reference's
    (the torch backend; with double quantization on a GPU, around the offset the device's mean gave)."""
    from fastpeft.reference import nf4 as ref_nf4
    g = torch.Generator().manual_seed(11 + block_size)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    got = fastpeft.quantize(x.to(device), 4, scheme, block_size=block_size, double_quant=double, backend="cuda")
    data, absmax = ref_nf4.quantize_4bit(x, scheme, block_size)
    assert_same(got.data, data, "data")
    if not double:
        assert got.nested_scale is None and got.nested_offset is None
        assert_same(got.scale, absmax, "scale")
        return
    if device == "cpu":
        assert torch.equal(got.nested_offset, ref_nf4.double_quant(absmax)[2])
    want_q8, want_nested = _ref_double_quant(absmax, got.nested_offset.cpu())
    assert_same(got.scale, want_q8, "scale")
    assert_same(got.nested_scale, want_nested, "nested_scale")


def check_nf4_quant_errors(device):
    """Wrong dtypes, sizes and block sizes are refused before any launch; empty inputs give empty outputs."""
    from fastpeft.ops import nf4 as ops_nf4
    t = ops_nf4._tables(torch.device(device))
    x = torch.ones(64, device=device)
    q, absmax = _cext.nf4_quantize(x[:0], t["nf4"][1], None, 64)
    assert q.shape == (0,) and q.dtype == torch.uint8 and absmax.shape == (0,) and absmax.dtype == torch.float32
    with pytest.raises(TypeError, match="x has dtype int32"):
        _cext.nf4_quantize(x.int(), t["nf4"][1], None, 64)
    with pytest.raises(ValueError, match="mids must be torch.float32 with 15 elements"):
        _cext.nf4_quantize(x, t["nf4"][0], None, 64)
    with pytest.raises(ValueError, match="bad block_size"):
        _cext.nf4_quantize(x, t["nf4"][1], None, 63)
    with pytest.raises(ValueError, match="bad block_size"):
        _cext.nf4_quantize(x, t["nf4"][1], None, 8192)
    with pytest.raises(ValueError, match="order must be a permutation"):
        _cext.nf4_quantize(x, t["fp4"][1], [0] * 16, 64)
    q8, nested = _cext.nf4_double_quant(x[:0], x[0], t["dynamic_mids"])
    assert q8.shape == (0,) and nested.shape == (0,)
    with pytest.raises(ValueError, match="absmax must be torch.float32"):
        _cext.nf4_double_quant(x.half(), x[0], t["dynamic_mids"])
    with pytest.raises(ValueError, match="offset must be torch.float32 with 1 elements"):
        _cext.nf4_double_quant(x, x[:2], t["dynamic_mids"])
    with pytest.raises(ValueError, match="mids must be torch.float32 with 256 elements"):
        _cext.nf4_double_quant(x, x[0], t["dynamic_mids"][:255])


def _quant_args(shape, bits, scheme, axis, group_size):
    b, code, axis, group_size, mode, outer, C, inner, last, sshape = _cext._quant_geometry(
        tuple(shape), bits, scheme, axis, group_size)
    return dict(outer=outer, C=C, inner=inner, last=last, mode=mode, group_size=group_size or 0, bits=bits,
                scheme=code), sshape


def check_quant_bounds(device, dtype, shape, bits, scheme, axis=None, group_size=None, pad=9):
    """The bindings directly, outputs as views inside poisoned buffers: only the views change."""
    C = _cext._extension()
    x = quant_x(shape, dtype, axis, group_size, device=device)
    rdata, rscale, rzp = quant_ref(x, bits, scheme, axis, group_size)
    geo, sshape = _quant_args(shape, bits, scheme, axis, group_size)
    nb, ns = rdata.numel(), max(1, math.prod(sshape))
    qbuf = torch.full((nb + 2 * pad,), 0x80, dtype=torch.uint8, device=device)
    sbuf = torch.full((ns + 2 * pad,), float("nan"), device=device)
    zbuf = torch.full((ns + 2 * pad,), -7, dtype=torch.int32, device=device)
    C.quant_quantize(x=x.data_ptr(), q=qbuf[pad:].data_ptr(), scale=sbuf[pad:].data_ptr(),
                     zero_point=zbuf[pad:].data_ptr(), **geo, dtype=_cext._DTYPE_CODES[dtype], device=x.device.index or 0, stream=_stream(device))
    assert torch.equal(qbuf[pad:pad + nb].cpu(), rdata.reshape(-1).view(torch.uint8))
    assert_same(sbuf[pad:pad + ns].reshape(rscale.shape), rscale, "scale")
    assert torch.equal(zbuf[pad:pad + ns].cpu(), rzp.reshape(-1))
    assert torch.all(qbuf[:pad] == 0x80) and torch.all(qbuf[pad + nb:] == 0x80), "quantize wrote outside q"
    assert torch.isnan(sbuf[:pad]).all() and torch.isnan(sbuf[pad + ns:]).all(), "quantize wrote outside scale"
    assert torch.all(zbuf[:pad] == -7) and torch.all(zbuf[pad + ns:] == -7), "quantize wrote outside zero_point"
    # dequantize into a poisoned buffer (a 16-byte aligned view: the vector path, and its scalar tail)
    n = math.prod(shape)
    off = 32 // torch.finfo(dtype).bits * 4  # 16 bytes in elements
    ybuf = torch.full((n + 2 * off,), float("nan"), dtype=dtype, device=device)
    d = qbuf[pad:pad + nb].clone()
    s = sbuf[pad:pad + ns].clone()
    z = zbuf[pad:pad + ns].clone()
    C.quant_dequantize(q=d.data_ptr(), scale=s.data_ptr(), zero_point=z.data_ptr(), y=ybuf[off:].data_ptr(), **geo,
                       dtype=_cext._DTYPE_CODES[dtype], device=x.device.index or 0, stream=_stream(device))
    want = dequant_ref(rdata, rscale, rzp, bits, scheme, axis, group_size, shape, dtype).reshape(-1)
    assert_same(ybuf[off:off + n], want, "y")
    assert torch.isnan(ybuf[:off]).all() and torch.isnan(ybuf[off + n:]).all(), "dequantize wrote outside y"


def check_quant_special_tensors(device, dtype):
    """Per-tensor: all zeros (scale 1), constant (scale > 0, no NaN), a NaN (scale NaN, codes 0)."""
    for fill, bits, scheme in ((0.0, 8, "absmax"), (0.0, 4, "zeropoint"), (-2.0, 8, "zeropoint"), (3.0, 4, "absmax"),
                               (float("nan"), 8, "zeropoint"), (float("nan"), 4, "absmax")):
        x = torch.randn(5, 7).to(device, dtype)
        if fill != fill:
            x[2, 3] = fill
        else:
            x.fill_(fill)
        data, scale, zp = _cext.quant_quantize(x, bits, scheme, None, None)
        rdata, rscale, rzp = quant_ref(x, bits, scheme, None, None)
        assert_same(data, rdata, "data")
        assert_same(scale, rscale, "scale")
        assert_same(zp, rzp, "zero_point")
        if fill == fill:
            assert scale.item() > 0
            y = _cext.quant_dequantize(data, scale, zp, bits, scheme, None, None, x.shape, torch.float32)
            assert torch.equal(y.cpu(), x.cpu().float())  # 0 and constants are exact
        else:
            assert math.isnan(scale.item()) and not data.cpu().any()


def check_quant_errors(device):
    x = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match="bits"):
        _cext.quant_quantize(x, 3, "absmax", None, None)
    with pytest.raises(ValueError, match="scheme"):
        _cext.quant_quantize(x, 8, "minmax", None, None)
    with pytest.raises(ValueError, match="does not divide"):
        _cext.quant_quantize(x, 8, "absmax", None, 4)
    with pytest.raises(ValueError, match="group_size"):
        _cext.quant_quantize(x, 8, "absmax", None, 0)
    with pytest.raises(ValueError, match="out of range"):
        _cext.quant_quantize(x, 8, "absmax", 2, None)
    with pytest.raises(ValueError, match="not both"):
        _cext.quant_quantize(x, 8, "absmax", 0, 3)
    with pytest.raises(ValueError, match="empty"):
        _cext.quant_quantize(x[:0], 8, "absmax", None, None)
    with pytest.raises(TypeError, match="dtype"):
        _cext.quant_quantize(x.to(torch.int32), 8, "absmax", None, None)
    data, scale, zp = _cext.quant_quantize(x, 4, "zeropoint", 1, None)
    with pytest.raises(ValueError, match="data has shape"):
        _cext.quant_dequantize(data, scale, zp, 8, "zeropoint", 1, None, (4, 6), torch.float32)
    with pytest.raises(ValueError, match="scale has shape"):
        _cext.quant_dequantize(data, scale[:3], zp, 4, "zeropoint", 1, None, (4, 6), torch.float32)
    with pytest.raises(TypeError, match="zero_point has dtype"):
        _cext.quant_dequantize(data, scale, zp.float(), 4, "zeropoint", 1, None, (4, 6), torch.float32)
    with pytest.raises(TypeError, match="data has dtype"):
        _cext.quant_dequantize(data.view(torch.int8), scale, zp, 4, "zeropoint", 1, None, (4, 6), torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        _cext.quant_dequantize(data, scale, zp, 4, "zeropoint", 1, None, (4, 6), torch.int8)
    C = _cext._extension()
    for bad in (dict(mode=3), dict(bits=5), dict(scheme=2), dict(mode=2, group_size=4), dict(last=5)):
        args = dict(outer=1, C=1, inner=24, last=6, mode=0, group_size=0, bits=8, scheme=0)
        args.update(bad)
        with pytest.raises(ValueError, match="quant_quantize"):
            C.quant_quantize(x=x.data_ptr(), q=data.data_ptr(), scale=scale.data_ptr(), zero_point=zp.data_ptr(), dtype=0,
                             device=x.device.index or 0, stream=_stream(device), **args)
    # empty dequantize; 0-d per tensor
    assert _cext.quant_dequantize(data[:, :0], scale[:0], zp[:0], 4, "zeropoint", 1, None, (4, 0), torch.float16) \
        .shape == (4, 0)
    x0 = torch.tensor(-1.5, device=device)
    d0, s0, z0 = _cext.quant_quantize(x0, 8, "zeropoint", None, None)
    assert_same(d0, quant_ref(x0, 8, "zeropoint", None, None)[0], "0-d data")
    assert _cext.quant_dequantize(d0, s0, z0, 8, "zeropoint", None, None, (), torch.float32).item() == -1.5


def check_quant_api(device, dtype, shape, bits, scheme, axis=None, group_size=None):
    """fastpeft.quantize / dequantize with backend="cuda" on a non-contiguous x: equal to the torch backend."""
    x = quant_x(shape[::-1], dtype, None, None, device=device).transpose(0, -1)  # same values, strided
    assert not x.is_contiguous()
    qx = fastpeft.quantize(x, bits, scheme, axis, group_size, backend="cuda")
    rx = fastpeft.quantize(x.cpu(), bits, scheme, axis, group_size, backend="torch")
    for name in ("data", "scale", "zero_point"):
        assert_same(getattr(qx, name), getattr(rx, name), name)
    for out in (None, torch.float32):
        assert_same(fastpeft.dequantize(qx, out, backend="cuda"), fastpeft.dequantize(rx, out, backend="torch"), "y")


# shapes x granularities: (shape, axis, group_size)
QUANT_CASES = [
    ((37,), None, None),  # per tensor, odd last dim
    ((5, 33), None, None),
    ((3, 1, 130), None, None),
    ((7, 33), 0, None),  # per row
    ((7, 33), 1, None),  # per column (channel = last dim: inner 1, pairs straddle channels)
    ((3, 5, 9), 1, None),  # middle axis
    ((4, 6, 5), -1, None),
    ((300, 40), 0, None),  # many slots
    ((7, 96), None, 32),  # groups
    ((5, 6), None, 3),  # odd g: 4-bit pairs straddle groups
    ((3, 4, 10), None, 10),
    ((9, 256), None, 128),
    ((2, 1024), None, 1024),  # 256 threads per group
    ((6, 14), None, 1),
]


INT8_SPECIAL = ("zero", "nan", "inf", "tiny")


QUANT_SCHEMES = [(8, "absmax"), (8, "zeropoint"), (4, "absmax"), (4, "zeropoint")]


BOTTLENECK_ACTS = ("relu", "gelu", "gelu_tanh", "silu")


def adapter_act64(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    if name == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))
    if name == "silu":
        return h * torch.sigmoid(h)
    raise ValueError(name)


def adapter_ref(x, wd, bd, wu, bu, activation, scaling, round_a=True):
    """y of the spec in float64 from the (dtype-valued) inputs; ``round_a=False`` skips the rounding of a."""
    x64 = x.double().cpu()
    h = x64 @ wd.double().cpu().t()
    if bd is not None:
        h = h + bd.double().cpu()
    a = adapter_act64(h, activation)
    if round_a:
        a = a.to(x.dtype).double()
    z = a @ wu.double().cpu().t()
    if bu is not None:
        z = z + bu.double().cpu()
    s = torch.tensor(scaling, dtype=torch.float32).item()
    return x64 + s * z


def adapter_inputs(M, D, R, dtype, device, bias=True, seed=0):
    """x ~ N(0, 1) and weights scaled so that h and z are O(1) (the adapter branch as large as x)."""
    g = torch.Generator().manual_seed(seed * 7919 + M * 1000 + D * 10 + R)
    x = torch.randn(M, D, generator=g)
    wd = torch.randn(R, D, generator=g) / math.sqrt(D)
    wu = torch.randn(D, R, generator=g) / math.sqrt(R)
    bd = 0.5 * torch.randn(R, generator=g) if bias else None
    bu = 0.5 * torch.randn(D, generator=g) if bias else None
    return tuple(t.to(device, dtype) if t is not None else None for t in (x, wd, bd, wu, bu))


def adapter_layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x [M, d] with unit column stride in another row layout (the kernel's contract)."""
    M, D = x.shape
    if kind == "padded":  # row stride d + 16: 16-byte aligned rows when d is a multiple of the vector
        big = torch.full((M, D + 16), float("nan"), dtype=x.dtype, device=x.device)
        big[:, :D] = x
        return big[:, :D]
    if kind == "broadcast":  # every row the same, row stride 0
        return x[:1].expand(M, D)
    return layout(x, kind)  # "contiguous", "misaligned"


def check_adapter(device, dtype, M, D, R, activation, x_layout="contiguous", bias=True, scaling=1.5, n_split=0):
    x, wd, bd, wu, bu = adapter_inputs(M, D, R, dtype, device, bias)
    x = adapter_layout(x, x_layout)
    y = _cext.bottleneck_adapter_forward(x, wd, bd, wu, bu, activation, scaling, n_split=n_split)
    assert y.dtype == dtype and y.shape == (M, D) and y.is_contiguous() and y.device == x.device
    ref = adapter_ref(x, wd, bd, wu, bu, activation, scaling)
    err = rel_err(y, ref)
    assert err <= TOL[dtype], f"y: rel err {err:.2e}"
    x64 = x.double().cpu()  # the adapter branch alone (y - x), so a small branch cannot hide behind x
    err = rel_err(y.double().cpu() - x64, ref - x64)
    assert err <= TOL[dtype], f"y - x: rel err {err:.2e}"


def check_adapter_bounds(device, dtype, M, D, R, activation="gelu", n_split=0, y_pad=3):
    """The binding directly: y a view inside a NaN buffer (row stride d + y_pad); the view is fully written
    (no NaN), the padding left alone; n_split forced (1: one block walks every column tile)."""
    C = _cext._extension()
    x, wd, bd, wu, bu = adapter_inputs(M, D, R, dtype, device, seed=1)
    buf = torch.full((M + 2, D + y_pad), float("nan"), dtype=dtype, device=device)
    y = buf[1:-1, 1:D + 1]
    C.bottleneck_adapter_forward(x=x.data_ptr(), s_xm=x.stride(0), wd=wd.data_ptr(), bd=bd.data_ptr(), wu=wu.data_ptr(),
                                 bu=bu.data_ptr(), y=y.data_ptr(), s_ym=y.stride(0), M=M, D=D, R=R,
                                 dtype=_cext._DTYPE_CODES[dtype], activation=_cext.ADAPTER_ACTIVATIONS[activation],
                                 scaling=-0.75, n_split=n_split,
                      device=x.device.index or 0, stream=_stream(device))
    assert rel_err(y, adapter_ref(x, wd, bd, wu, bu, activation, -0.75)) <= TOL[dtype]
    pad = buf.clone()
    pad[1:-1, 1:D + 1] = float("nan")
    assert torch.isnan(pad).all(), "bottleneck_adapter_forward wrote outside y"


def check_adapter_rounds_a(device, dtype, activation="gelu", M=64, D=64):
    """a is rounded to the dtype before the second GEMM, as the spec says. Built so that every sum is exact in
    fp32: W_d diagonal (h = x w, exact), no biases, W_u with two ones per row (z = a_n + a_n+1 of 16-bit a),
    s = 1 and x in multiples of 1/4. Then y equals the spec rounded to the dtype almost everywhere (act in fp32
    vs float64 may flip a rounding rarely), while skipping the rounding of a changes many elements."""
    g = torch.Generator().manual_seed(17)
    x = (torch.randint(-8, 9, (M, D), generator=g) / 4.0).to(device, dtype)
    wd = torch.diag(1.0 + torch.rand(D, generator=g)).to(device, dtype)
    wu = (torch.eye(D) + torch.eye(D).roll(1, dims=1)).to(device, dtype)
    y = _cext.bottleneck_adapter_forward(x, wd, None, wu, None, activation, 1.0)
    rounded = adapter_ref(x, wd, None, wu, None, activation, 1.0).to(dtype)
    unrounded = adapter_ref(x, wd, None, wu, None, activation, 1.0, round_a=False).to(dtype)
    y = y.cpu()
    n_rounded, n_unrounded = (y != rounded).sum().item(), (y != unrounded).sum().item()
    assert n_rounded <= max(2, y.numel() // 200), f"{n_rounded} of {y.numel()} elements differ from the spec"
    assert n_unrounded >= 10 * max(n_rounded, 1), (n_rounded, n_unrounded)


def check_adapter_errors_and_empty(device):
    x, wd, bd, wu, bu = adapter_inputs(5, 40, 8, torch.float32, device)
    with pytest.raises(ValueError, match="limit of 256"):
        big = torch.randn(257, 40, device=device)
        _cext.bottleneck_adapter_forward(x, big, None, torch.randn(40, 257, device=device), None, "relu", 1.0)
    with pytest.raises(ValueError, match="up_weight has shape"):
        _cext.bottleneck_adapter_forward(x, wd, bd, wu[:, :4], bu, "relu", 1.0)
    with pytest.raises(ValueError, match="down_weight has shape"):
        _cext.bottleneck_adapter_forward(x, wd[:, :39], bd, wu, bu, "relu", 1.0)
    with pytest.raises(ValueError, match="r must be > 0"):
        _cext.bottleneck_adapter_forward(x, wd[:0], None, wu[:, :0], None, "relu", 1.0)
    with pytest.raises(TypeError, match="dtypes must match"):
        _cext.bottleneck_adapter_forward(x, wd.half(), bd, wu, bu, "relu", 1.0)
    with pytest.raises(TypeError, match="int8"):
        _cext.bottleneck_adapter_forward(x.to(torch.int8), wd, bd, wu, bu, "relu", 1.0)
    with pytest.raises(ValueError, match="down_bias has shape"):
        _cext.bottleneck_adapter_forward(x, wd, bd[:7], wu, bu, "relu", 1.0)
    with pytest.raises(ValueError, match="up_bias has shape"):
        _cext.bottleneck_adapter_forward(x, wd, bd, wu, bd, "relu", 1.0)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        _cext.bottleneck_adapter_forward(x, wd, bd, wu, bu, "tanh", 1.0)
    with pytest.raises(ValueError, match="must be contiguous"):
        _cext.bottleneck_adapter_forward(x, wu.t(), bd, wu, bu, "relu", 1.0)
    with pytest.raises(ValueError, match="unit column stride"):
        _cext.bottleneck_adapter_forward(x.t().contiguous().t(), wd, bd, wu, bu, "relu", 1.0)
    with pytest.raises(ValueError, match="scaling must be finite"):
        _cext.bottleneck_adapter_forward(x, wd, bd, wu, bu, "relu", float("inf"))
    C = _cext._extension()  # the binding's own checks
    y = torch.empty_like(x)
    wd3, wu3 = torch.randn(300, 40, device=device), torch.randn(40, 300, device=device)
    with pytest.raises(ValueError, match="limit of 256"):
        C.bottleneck_adapter_forward(x=x.data_ptr(), s_xm=x.stride(0), wd=wd3.data_ptr(), bd=0, wu=wu3.data_ptr(),
                                     bu=0, y=y.data_ptr(), s_ym=y.stride(0), M=5, D=40, R=300, dtype=0, activation=0,
                                     stream=_stream(device))
    args = dict(x=x.data_ptr(), s_xm=x.stride(0), wd=wd.data_ptr(), bd=bd.data_ptr(), wu=wu.data_ptr(),
                bu=bu.data_ptr(), y=y.data_ptr(), s_ym=y.stride(0), M=5, D=40, R=8, stream=_stream(device))
    with pytest.raises(ValueError, match="unknown activation code 7"):
        C.bottleneck_adapter_forward(**args, dtype=0, activation=7)
    with pytest.raises(ValueError, match="dtype code 5"):
        C.bottleneck_adapter_forward(**args, dtype=5, activation=0)
    with pytest.raises(ValueError, match="unknown keyword"):
        C.bottleneck_adapter_forward(**args, dtype=0, activation=0, not_a_field=1)
    with pytest.raises(ValueError, match="missing required keyword argument activation"):
        C.bottleneck_adapter_forward(**args, dtype=0)
    with pytest.raises(TypeError, match="keyword M"):  # a size that is no integer
        C.bottleneck_adapter_forward(**{**args, "M": 5.0}, dtype=0, activation=0)
    with pytest.raises(TypeError, match="keyword wd"):  # a pointer that is no address
        C.bottleneck_adapter_forward(**{**args, "wd": -8}, dtype=0, activation=0)
    assert _cext.bottleneck_adapter_forward(x[:0], wd, bd, wu, bu, "silu", 1.0).shape == (0, 40)
    empty_d = _cext.bottleneck_adapter_forward(x[:, :0], wd[:, :0], bd, wu[:0], None, "silu", 1.0)
    assert empty_d.shape == (5, 0)


BOTTLENECK_SHAPES = [(100, 24), (136, 64), (72, 128), (1000, 256), (520, 200), (4096, 8), (4096, 64)]


MULTI_RANKS = (1, 3, 16, 64, 5)  # adapter 4 (rank 5) is used by no row: all of its weights are NaN


MULTI_SCALINGS = (0.5, 2.0, -1.25, 0.75, float("nan"))


MULTI_R_MAX = 64


def multi_indices(T, index_dtype, seed=0):
    """Fresh adapter indices in [0, 4) with rows of no adapter planted: -1, n, huge and negative values, and
    (int64) values whose low 32 bits are valid indices, which must not be truncated into them."""
    g = torch.Generator().manual_seed(seed * 31 + T)
    idx = torch.randint(0, 4, (T,), generator=g, dtype=torch.int64)
    n = len(MULTI_RANKS)
    wide = [2**32 + 1, -(2**32) + 2] if index_dtype == torch.int64 else [2**31 - 1, -(2**31)]
    for pos, v in zip((1, 4, 6, 9, 11, 12), [-1, n, 1000, -7] + wide):
        if pos < T:
            idx[pos] = v
    return idx.to(index_dtype)


def multi_row_order(idx, order, seed=0):
    """None, the rows sorted by adapter (stable), or a random permutation."""
    if order is None:
        return None
    if order == "sorted":
        perm = torch.sort(idx.cpu().to(torch.int64), stable=True).indices
    else:
        perm = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))
    return perm.to(torch.int32).to(idx.device)


def multi_adapter_rows(idx):
    """(adapter of each row as a list, -1 for none) under the spec's rule."""
    n = len(MULTI_RANKS)
    return [int(a) if 0 <= int(a) < n else -1 for a in idx.cpu().tolist()]


def multi_stack(n_out, n_in, dtype, device, seed, rank_axis):
    """An adapter stack with entries beyond each rank (and the whole unused adapter 4) NaN."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(MULTI_RANKS), MULTI_R_MAX, n_in) if rank_axis == 1 else (len(MULTI_RANKS), n_out, MULTI_R_MAX)
    w = torch.randn(*shape, generator=g)
    for a, r in enumerate(MULTI_RANKS):
        w[a] /= math.sqrt(n_in if rank_axis == 1 else r)
        if rank_axis == 1:
            w[a, r:] = float("nan")
        else:
            w[a, :, r:] = float("nan")
    w[4] = float("nan")
    return w.to(device, dtype)


def multi_shrink_ref(x, A, idx):
    u = torch.zeros(x.shape[0], MULTI_R_MAX, dtype=torch.float64)
    rows = torch.tensor(multi_adapter_rows(idx), dtype=torch.int64)
    for a, r in enumerate(MULTI_RANKS):
        sel = rows == a
        if sel.any():
            u[sel, :r] = x.double().cpu()[sel] @ A[a, :r].double().cpu().t()
    return u


def multi_expand_ref(y0, u, B, idx):
    y = y0.double().cpu().clone()
    rows = torch.tensor(multi_adapter_rows(idx), dtype=torch.int64)
    for a, r in enumerate(MULTI_RANKS):
        sel = rows == a
        if sel.any():
            s = torch.tensor(MULTI_SCALINGS[a], dtype=torch.float32).item()
            y[sel] += s * (u.double().cpu()[sel, :r] @ B[a, :, :r].double().cpu().t())
    return y


def multi_meta(device, T, index_dtype, order, seed=0):
    idx = multi_indices(T, index_dtype, seed).to(device)
    return (torch.tensor(MULTI_RANKS, dtype=torch.int32, device=device), idx,
            multi_row_order(idx, order, seed), torch.tensor(MULTI_SCALINGS, dtype=torch.float32, device=device))


def check_multi_shrink(device, dtype, T, K, index_dtype=torch.int64, order=None, tile=0, split_k=0, slices=0,
                       x_layout="contiguous"):
    """u (a view inside a NaN buffer) filled in place: the spec on every element, exact zeros beyond each row's
    rank and on rows without adapter, the padding untouched."""
    g = torch.Generator().manual_seed(T * 100 + K)
    x = adapter_layout(torch.randn(T, K, generator=g).to(device, dtype), x_layout)
    A = multi_stack(0, K, dtype, device, seed=K, rank_axis=1)
    ranks, idx, row_order, _ = multi_meta(device, T, index_dtype, order)
    buf = torch.full((T + 2, MULTI_R_MAX + 3), float("nan"), device=device)
    u = buf[1:-1, 1:-2]
    out = _cext._multi_lora_shrink(x, A, ranks, idx, u, row_order, tile=tile, split_k=split_k, slices=slices)
    assert out is u
    ref = multi_shrink_ref(x, A, idx)
    err = rel_err(u, ref)
    assert err <= TOL[dtype], f"u: rel err {err:.2e}"
    zero = torch.ones(T, MULTI_R_MAX, dtype=torch.bool)
    for i, a in enumerate(multi_adapter_rows(idx)):
        if a >= 0:
            zero[i, :MULTI_RANKS[a]] = False
    assert torch.all(u.cpu()[zero] == 0), "u not exactly 0 beyond the rank / without adapter"
    pad = buf.clone()
    pad[1:-1, 1:-2] = float("nan")
    assert torch.isnan(pad).all(), "multi_lora_shrink wrote outside u"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def check_multi_expand(device, dtype, T, N, index_dtype=torch.int64, order=None, tile=0, slices=0,
                       y_layout="contiguous"):
    """y updated in place on the rows with an adapter (the spec, and the LoRA branch y - y0 alone); rows
    without adapter bit-identical (they hold NaN, -0.0 and inf); u and B beyond each rank NaN; a y view inside a
    NaN buffer keeps its padding."""
    g = torch.Generator().manual_seed(T * 100 + N + 1)
    ranks, idx, row_order, scalings = multi_meta(device, T, index_dtype, order, seed=1)
    rows = multi_adapter_rows(idx)
    y0 = torch.randn(T, N, generator=g)
    u = torch.randn(T, MULTI_R_MAX, generator=g)
    specials = [float("nan"), -0.0, float("inf"), 1.0]
    for i, a in enumerate(rows):
        if a >= 0:
            u[i, MULTI_RANKS[a]:] = float("nan")
        else:
            u[i] = float("nan")
            y0[i, ::2] = specials[i % 4]
    y0, u = y0.to(device, dtype), u.to(device)
    B = multi_stack(N, MULTI_R_MAX, dtype, device, seed=N, rank_axis=2)
    if y_layout == "padded":  # rows of stride N + 3 inside a NaN buffer: scalar loads and stores
        buf = torch.full((T + 2, N + 3), float("nan"), dtype=dtype, device=device)
        y = buf[1:-1, 1:N + 1]
        y.copy_(y0)
    else:
        y = layout(y0.clone(), y_layout)
    out = _cext._multi_lora_expand(y, u, B, ranks, scalings, idx, row_order, tile=tile, slices=slices)
    assert out is y
    ref = multi_expand_ref(y0, u, B, idx)
    have = torch.tensor([a >= 0 for a in rows])
    if have.any():
        err = rel_err(y.cpu()[have], ref[have])
        assert err <= TOL[dtype], f"y: rel err {err:.2e}"
        base = y0.double().cpu()[have]
        err = rel_err(y.double().cpu()[have] - base, ref[have] - base)
        assert err <= TOL[dtype], f"y - y0: rel err {err:.2e}"
    assert torch.equal(_bits(y)[~have], _bits(y0)[~have]), "rows without adapter changed"
    if y_layout == "padded":
        pad = buf.clone()
        pad[1:-1, 1:N + 1] = float("nan")
        assert torch.isnan(pad).all(), "multi_lora_expand wrote outside y"


def check_multi_lora_flow(device, dtype, T, K, N, order):
    """shrink then expand through the public wrappers (int32 indices), against the composed reference."""
    g = torch.Generator().manual_seed(T + K + N)
    x = torch.randn(T, K, generator=g).to(device, dtype)
    y0 = torch.randn(T, N, generator=g).to(device, dtype)
    A = multi_stack(0, K, dtype, device, seed=3, rank_axis=1)
    B = multi_stack(N, MULTI_R_MAX, dtype, device, seed=4, rank_axis=2)
    ranks, idx, row_order, scalings = multi_meta(device, T, torch.int32, order, seed=2)
    u = torch.full((T, MULTI_R_MAX), float("nan"), device=device)
    assert _cext.multi_lora_shrink(x, A, ranks, idx, u, row_order) is u
    y = y0.clone()
    assert _cext.multi_lora_expand(y, u, B, ranks, scalings, idx, row_order) is y
    ref = multi_expand_ref(y0, multi_shrink_ref(x, A, idx), B, idx)
    assert rel_err(y, ref) <= TOL[dtype]


def check_multi_lora_errors_and_empty(device):
    T, K, N, n, R = 5, 24, 40, 3, 8
    x, y = torch.randn(T, K, device=device), torch.randn(T, N, device=device)
    A, B = torch.randn(n, R, K, device=device), torch.randn(n, N, R, device=device)
    ranks = torch.full((n,), R, dtype=torch.int32, device=device)
    s = torch.ones(n, device=device)
    idx = torch.zeros(T, dtype=torch.int64, device=device)
    u = torch.zeros(T, R, device=device)
    shrink, expand = _cext.multi_lora_shrink, _cext.multi_lora_expand
    with pytest.raises(TypeError, match="dtypes must match"):
        shrink(x, A.half(), ranks, idx, u)
    with pytest.raises(TypeError, match="int8"):
        shrink(x.to(torch.int8), A, ranks, idx, u)
    with pytest.raises(ValueError, match="A has shape"):
        shrink(x, A[:, :, :K - 1].contiguous(), ranks, idx, u)
    with pytest.raises(ValueError, match="A has shape"):
        shrink(x, A[:, :R - 1].contiguous(), ranks, idx, u)
    with pytest.raises(ValueError, match="A must be 3-D"):
        shrink(x, A[0], ranks, idx, u)
    with pytest.raises(ValueError, match="A .* must be contiguous"):
        shrink(x, A.transpose(1, 2).contiguous().transpose(1, 2), ranks, idx, u)
    with pytest.raises(ValueError, match="unit column stride"):
        shrink(x.t().contiguous().t(), A, ranks, idx, u)
    with pytest.raises(TypeError, match="ranks has dtype int64"):
        shrink(x, A, ranks.long(), idx, u)
    with pytest.raises(ValueError, match="ranks has shape"):
        shrink(x, A, ranks[:2], idx, u)
    with pytest.raises(TypeError, match="indices has dtype int16"):
        shrink(x, A, ranks, idx.to(torch.int16), u)
    with pytest.raises(ValueError, match="indices has shape"):
        shrink(x, A, ranks, idx[:4], u)
    with pytest.raises(ValueError, match="indices must be contiguous"):
        shrink(x, A, ranks, torch.zeros(2 * T, dtype=torch.int64, device=device)[::2], u)
    with pytest.raises(TypeError, match="u has dtype float16"):
        shrink(x, A, ranks, idx, u.half())
    with pytest.raises(ValueError, match="u has shape"):
        shrink(x, A, ranks, idx, u[:4])
    with pytest.raises(ValueError, match="overlapping"):
        shrink(x, A, ranks, idx, torch.zeros(1, R, device=device).expand(T, R))
    with pytest.raises(TypeError, match="row_order has dtype int64"):
        shrink(x, A, ranks, idx, u, torch.arange(T, device=device))
    with pytest.raises(ValueError, match="row_order has shape"):
        shrink(x, A, ranks, idx, u, torch.arange(T - 1, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="scalings has dtype float64"):
        expand(y, u, B, ranks, s.double(), idx)
    with pytest.raises(ValueError, match="scalings has shape"):
        expand(y, u, B, ranks, s[:1], idx)
    with pytest.raises(ValueError, match="B has shape"):
        expand(y, u, B[:, :N - 1].contiguous(), ranks, s, idx)
    with pytest.raises(TypeError, match="dtypes must match"):
        expand(y.half(), u, B, ranks, s, idx)
    with pytest.raises(ValueError, match="overlapping"):
        expand(torch.zeros(1, N, device=device).expand(T, N), u, B, ranks, s, idx)
    with pytest.raises(ValueError, match="unit column stride"):
        expand(y.t().contiguous().t(), u, B, ranks, s, idx)
    with pytest.raises(ValueError, match="tile must be"):
        _cext._multi_lora_shrink(x, A, ranks, idx, u, tile=-1)
    C = _cext._extension()  # the binding's own checks
    args = dict(x=x.data_ptr(), s_xm=x.stride(0), s_xk=1, a=A.data_ptr(), s_aa=R * K, s_ar=K, s_ak=1, u=u.data_ptr(),
                s_um=R, s_ur=1, ranks=ranks.data_ptr(), indices=idx.data_ptr(), row_order=0, M=T, K=K, R=R,
                stream=_stream(device))
    with pytest.raises(ValueError, match="index_bits must be 32 or 64"):
        C.multi_lora_shrink(**args, index_bits=16, n=n, dtype=0)
    args["index_bits"] = 64
    with pytest.raises(ValueError, match="tile must be 0"):
        C.multi_lora_shrink(**args, n=n, dtype=0, tile=3)
    with pytest.raises(ValueError, match="slices must be in"):
        C.multi_lora_shrink(**args, n=n, dtype=0, slices=100000)
    with pytest.raises(ValueError, match="dtype code 7"):
        C.multi_lora_shrink(**args, n=n, dtype=7)
    with pytest.raises(ValueError, match="adapter count n"):
        C.multi_lora_shrink(**args, n=-1, dtype=0)
    with pytest.raises(ValueError, match="index_bits must be 32 or 64"):
        C.multi_lora_expand(y=y.data_ptr(), s_ym=N, s_yn=1, u=u.data_ptr(), s_um=R, s_ur=1, b=B.data_ptr(),
                            s_ba=N * R, s_bn=R, s_br=1, ranks=ranks.data_ptr(), scalings=s.data_ptr(),
                            indices=idx.data_ptr(), index_bits=8, row_order=0, M=T, N=N, R=R, n=n, dtype=0,
                            stream=_stream(device))
    # empty batches, K = 0 (u all zeros), an empty stack (every row without adapter)
    assert shrink(x[:0], A, ranks, idx[:0], u[:0]).shape == (0, R)
    assert expand(y[:0], u[:0], B, ranks, s, idx[:0]).shape == (0, N)
    u_nan = torch.full((T, R), float("nan"), device=device)
    shrink(x[:, :0], A[:, :, :0], ranks, idx, u_nan)
    assert torch.equal(u_nan, torch.zeros(T, R, device=device))
    u_nan = torch.full((T, R), float("nan"), device=device)
    empty_ranks = ranks[:0]
    shrink(x, A[:0], empty_ranks, idx, u_nan)
    assert torch.equal(u_nan, torch.zeros(T, R, device=device))
    y_before = y.clone()
    expand(y, u, B[:0], empty_ranks, s[:0], idx)
    assert torch.equal(y, y_before)


def check_multi_lora_cuda_graph(dtype=torch.float16, T=33, K=256, N=136):
    """shrink + expand captured in a CUDA graph: replays follow new indices, ranks and row_order written into
    the captured tensors (everything is read on the device)."""
    dev = "cuda"
    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, K, generator=g).to(dev, dtype)
    A = multi_stack(0, K, dtype, dev, seed=5, rank_axis=1)
    B = multi_stack(N, MULTI_R_MAX, dtype, dev, seed=6, rank_axis=2)
    ranks, idx, row_order, scalings = multi_meta(dev, T, torch.int64, "sorted")
    u = torch.empty(T, MULTI_R_MAX, device=dev)
    y0 = torch.randn(T, N, generator=g).to(dev, dtype)
    y = y0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        _cext.multi_lora_shrink(x, A, ranks, idx, u, row_order)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _cext.multi_lora_shrink(x, A, ranks, idx, u, row_order)
        _cext.multi_lora_expand(y, u, B, ranks, scalings, idx, row_order)
    for seed in (1, 2):
        new_idx = multi_indices(T, torch.int64, seed).to(dev)
        idx.copy_(new_idx)
        row_order.copy_(multi_row_order(new_idx, "shuffled", seed))
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        ref = multi_expand_ref(y0, multi_shrink_ref(x, A, new_idx), B, new_idx)
        assert rel_err(y, ref) <= TOL[dtype]


MULTI_INDEX_DTYPES = [torch.int32, torch.int64]


MULTI_ORDERS = [None, "sorted", "shuffled"]
