"""The CUDA C++ extension fastpeft._C: build, argument checks, and kernels vs float64 references.

Build checks run wherever nvcc is (CI included): the extension must have been built.
Kernel checks need a GPU (marked ``gpu``); the ``check_*`` helpers take the device so the
same checks can also drive a host emulation of the kernels.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

import fastpeft
from fastpeft.ops import _cext
from fastpeft.reference.dropout import dropout_2d, dropout_keep_mask, dropout_threshold
from fastpeft.reference.lora import lora_linear as ref_lora_linear

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOL)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = os.path.join(home, "bin", "nvcc") if home else None
    return shutil.which("nvcc") or (cand if cand and os.access(cand, os.X_OK) else None)


def _expected_archs() -> set[int]:
    return {int(a) for a in os.environ.get("FASTPEFT_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in the output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


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


# ---------------------------------------------------------------------------------------------
# build (CI has nvcc but no GPU: the extension must still be built, import, and list its archs)


@pytest.mark.skipif(os.environ.get("FASTPEFT_BUILD_CUDA") == "0", reason="FASTPEFT_BUILD_CUDA=0 skips the build")
def test_extension_built_when_nvcc_present():
    if _nvcc() is None:
        pytest.skip("nvcc not found (on PATH or in $CUDA_HOME/bin): fastpeft._C is not built here")
    import fastpeft._C as C
    archs = set(C.compiled_archs())
    if "FASTPEFT_CUDA_ARCHS" in os.environ:
        assert archs == _expected_archs(), archs
    elif not HAS_GPU:  # CI: the default targets
        assert {80, 90} <= archs, archs
    n = C.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    if HAS_GPU:
        assert n == torch.cuda.device_count()
        major, minor = torch.cuda.get_device_capability()
        cc = 10 * major + minor
        runs = any(a // 10 == major and a <= cc for a in archs) or max(archs) <= cc  # cubin, or PTX JIT
        assert runs, f"no compiled target runs on sm_{cc}: {sorted(archs)}"


# ---------------------------------------------------------------------------------------------
# argument checks (no GPU needed: they fail before reaching the extension)


def test_cpu_tensors_rejected():
    x, a = torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="need CUDA tensors.*cpu"):
        _cext.lora_shrink(x, a, a.stride(), 2)
    y, u, b = torch.randn(4, 6), torch.randn(4, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="need CUDA tensors.*cpu"):
        _cext.lora_expand_(y, u, b, b.stride(), 2, 1.0)


def test_forced_cuda_backend_on_cpu_says_why():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    A, B = torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="CUDA"):
        fastpeft.lora_linear(x, w, None, A, B, 1.0, backend="cuda")


# ---------------------------------------------------------------------------------------------
# kernel checks, parametrized by device


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
    C.lora_shrink(x.data_ptr(), x.stride(0), x.stride(1), A.data_ptr(), A.stride(0), A.stride(1),
                  u.data_ptr(), u.stride(0), u.stride(1), M, K, R, _cext._DTYPE_CODES[dtype],
                  out_scale=1.0, split_k=split_k, device=x.device.index or 0, stream=_stream(device))
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


# ---------------------------------------------------------------------------------------------
# GPU tests


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 300])
@pytest.mark.parametrize("K", [33, 1000])
@pytest.mark.parametrize("R", [1, 4, 16, 64, 200])
@pytest.mark.parametrize("x_layout,a_transposed", [("contiguous", False), ("transposed", True), ("strided", False)])
def test_shrink(dtype, M, K, R, x_layout, a_transposed):
    check_shrink("cuda", dtype, M, K, R, x_layout, a_transposed)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,R", [(1, 4096, 16), (7, 1000, 64), (300, 777, 200)])
@pytest.mark.parametrize("split_k", [0, 1, 3, 16])
def test_shrink_split_k(dtype, M, K, R, split_k):
    check_shrink_split_k("cuda", dtype, M, K, R, split_k)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,R", [(7, 1000, 16), (300, 200, 64)])
def test_shrink_dropout(dtype, M, K, R):
    check_shrink("cuda", dtype, M, K, R, p=0.3, seed=99)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 300])
@pytest.mark.parametrize("N", [50, 1000])
@pytest.mark.parametrize("R", [1, 4, 16, 64, 200])
@pytest.mark.parametrize("y_layout,b_transposed", [("contiguous", False), ("contiguous", True), ("transposed", False),
                                                   ("strided", True)])
def test_expand(dtype, M, N, R, y_layout, b_transposed):
    check_expand("cuda", dtype, M, N, R, y_layout, b_transposed)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,R", [(7, 1000, 16), (300, 257, 64)])
def test_expand_epilogue_dropout(dtype, M, N, R):
    check_expand("cuda", dtype, M, N, R, b_transposed=True, p=0.3, seed=5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,R", [(1, 9, 4), (70, 130, 16), (129, 1000, 64)])
def test_expand_writes_only_its_view(dtype, M, N, R):
    check_expand_bounds("cuda", dtype, M, N, R)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M,K,p,seed", [(1, 7, 0.5, 0), (300, 296, 0.3, 1234), (129, 77, 0.9, 2**31 - 1),
                                        (64, 1024, 0.1, 42)])
def test_dropout_masks_match_reference(M, K, p, seed):
    assert dropout_threshold(p) > 0
    check_dropout_masks("cuda", M, K, p, seed)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,r", [((3, 5), 48, 40, 8), ((300,), 200, 130, 16), ((1,), 64, 96, 64)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_cuda_backend(dtype, lead, K, N, r, p):
    check_lora_linear("cuda", dtype, lead, K, N, r, p)


@pytest.mark.gpu
@needs_gpu
def test_wrapper_errors_and_empty_inputs():
    check_wrapper_errors("cuda")
    check_empty("cuda")
    if torch.cuda.device_count() > 1:
        x, A = torch.randn(4, 8, device="cuda:0"), torch.randn(2, 8, device="cuda:1")
        with pytest.raises(ValueError, match="one device"):
            _cext.lora_shrink(x, A, A.stride(), 2)
