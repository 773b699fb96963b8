"""Thin wrappers over the CUDA C++ extension ``fastpeft._C`` (the ``cuda`` backend).

``fastpeft._C`` links no libtorch: it takes raw device pointers, element strides, a dtype
code and a stream, as keyword arguments named as the fields of the parameter structs in
csrc/fastpeft.h. These wrappers check the tensors, pass their pointers and strides and
torch's current stream, and fold the dropout rescale ``1 / (1 - p)`` into the scalars.

``fastpeft._C`` links the static CUDA runtime of the nvcc that built it, which needs a driver of
at least its major CUDA version; its import ends with ``check_driver`` below, which fails the
import (one warning, saying the versions and the fix) where the driver is older, so fastpeft
runs its Triton kernels there instead of failing at the first launch.
"""
from __future__ import annotations

import operator
import warnings

import torch

from .. import _checks
from .._backend import BackendUnavailableError, cuda_ext_status
from ..reference.dropout import dropout_threshold

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ---------------------------------------------------------------------------------------------
# the driver check at import

# The oldest Linux driver of each CUDA major release; its minor releases run on it too (CUDA minor version
# compatibility; NVIDIA's CUDA toolkit release notes, table 3).
MIN_LINUX_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
_driver_warned = False


def _cuda_version(v: int) -> str:
    """'13.0' for CUDART_VERSION / cudaDriverGetVersion's 13000."""
    return f"{v // 1000}.{v % 1000 // 10}"


def driver_problem(runtime: int, driver: int) -> str | None:
    """Why fastpeft._C, linked with the CUDA runtime ``runtime`` (CUDART_VERSION: 1000 * major + 10 * minor),
    cannot run with a driver that supports CUDA ``driver`` (cudaDriverGetVersion; 0: no driver), or None.

    A runtime runs on the drivers of its major version and newer (minor version compatibility). Without a
    driver there is nothing to check: no CUDA tensors reach the kernels.
    """
    if driver <= 0 or runtime <= 0 or driver // 1000 >= runtime // 1000:
        return None
    major, have = runtime // 1000, _cuda_version(driver)
    need = f"Linux driver >= {MIN_LINUX_DRIVER[major]}" if major in MIN_LINUX_DRIVER else f"a driver for CUDA {major}.x"
    return (f"fastpeft._C (the CUDA C++ kernels) was built with CUDA {_cuda_version(runtime)}, whose runtime needs an "
            f"NVIDIA driver for CUDA {major}.x ({need}), but this machine's driver supports CUDA {have} only. "
            f"fastpeft disables its CUDA C++ kernels and runs the Triton kernels instead (backend 'cuda' is "
            f"unavailable). To fix it, update the NVIDIA driver, or rebuild fastpeft._C with a CUDA "
            f"{driver // 1000}.x toolkit (at most CUDA {have}): CUDA_HOME=/usr/local/cuda-{have} "
            f"FASTPEFT_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .")


def check_driver(ext) -> str | None:
    """The last step of ``import fastpeft._C`` (csrc/bindings.cpp calls it with the module): why the import
    must fail, or None. It fails, after one RuntimeWarning per process saying the versions and the fix, when
    the installed driver is older than the CUDA runtime linked into ``ext`` (``driver_problem``); the binding
    raises ImportError with this text, so the backend choice sees the ``cuda`` backend as unavailable (saying
    why where it is forced) and runs the Triton kernels instead."""
    global _driver_warned
    why = driver_problem(int(ext.cuda_runtime_version()), int(ext.cuda_driver_version()))
    if why is not None and not _driver_warned:
        _driver_warned = True
        warnings.warn(why, RuntimeWarning, stacklevel=2)
    return why


def _extension():
    ok, why = cuda_ext_status()
    if not ok:
        raise BackendUnavailableError(f"the CUDA C++ kernels are not available: {why}")
    from .. import _C
    return _C


def _cuda_device(**tensors: torch.Tensor) -> torch.device:
    desc = ", ".join(f"{k} on {v.device}" for k, v in tensors.items())
    if any(t.device.type != "cuda" for t in tensors.values()):
        raise ValueError(f"the CUDA C++ kernels need CUDA tensors; got {desc}")
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(f"the CUDA C++ kernels need all tensors on one device; got {desc}")
    return next(iter(tensors.values())).device


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _strides(name: str, strides) -> tuple[int, int]:
    try:
        s0, s1 = (operator.index(s) for s in strides)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be two ints (element strides), got {strides!r}") from None
    return s0, s1


def _check_span(name: str, t: torch.Tensor, rows: int, cols: int, strides: tuple[int, int]) -> None:
    """The [rows, cols] operand at t.data_ptr() with these strides must lie inside t's storage."""
    if rows == 0 or cols == 0:
        return
    ends = [(rows - 1) * strides[0], (cols - 1) * strides[1]]
    lo = t.storage_offset() + sum(min(0, e) for e in ends)
    hi = t.storage_offset() + sum(max(0, e) for e in ends)
    size = t.untyped_storage().nbytes() // t.element_size()
    if lo < 0 or hi >= size:
        raise ValueError(f"{name}: a [{rows}, {cols}] operand with strides {strides} reaches elements "
                         f"{lo}..{hi}, outside its storage of {size} elements")


def _seed_tensor(seed, device: torch.device, p: float) -> torch.Tensor | None:
    """The dropout seed in device memory, as the kernels read it: an int64 tensor of at least one
    element on ``device`` (used as given), or an int (its low 32 bits, copied to the device);
    None without dropout."""
    if p == 0.0:
        return None
    if isinstance(seed, torch.Tensor):
        _checks.tensor("seed", seed, dtypes=(torch.int64,))
        if seed.numel() < 1 or seed.device != device:
            raise ValueError(f"seed must hold one int64 on {device}, got shape {tuple(seed.shape)} on "
                             f"{seed.device}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    return torch.full((1,), int(seed) & 0xFFFFFFFF, dtype=torch.int64, device=device)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, a_strides: tuple[int, int], R: int,
                out_scale: float = 1.0, *, dropout_p: float = 0.0, seed: int | torch.Tensor = 0) -> torch.Tensor:
    """U = out_scale * dropout(x) A^T, a new float32 [M, R] tensor.

    x: [M, K] (any strides); A: the [R, K] operand whose element (r, k) is at
    ``a.data_ptr() + r * a_strides[0] + k * a_strides[1]`` elements (a transposed view of
    another matrix works too), same dtype as x (fp32, fp16 or bf16). dropout_p > 0 drops
    element (m, k) of x by the counter-based mask of ``fastpeft.reference.dropout`` for
    ``seed`` (an int, or an int64 tensor on x's device that the kernel reads: a CUDA graph then
    replays with the value in memory) and scales the kept ones by 1 / (1 - p). Accumulates in fp32.
    """
    _checks.tensor("x", x, ndim=2)
    _checks.tensor("a", a)
    device = _cuda_device(x=x, a=a)
    _checks.tensor("x", x, dtypes=_DTYPE_CODES)
    _checks.same_dtype(x=x, a=a)
    R = _checks.positive_int("R", R)
    s_ar, s_ak = _strides("a_strides", a_strides)
    M, K = x.shape
    _check_span("a", a, R, K, (s_ar, s_ak))
    p = _checks.probability("dropout_p", dropout_p)
    scale = _checks.finite_float("out_scale", out_scale) * (1.0 / (1.0 - p) if p > 0.0 else 1.0)
    seed_t = _seed_tensor(seed, device, p)
    ext = _extension()
    u = torch.empty((M, R), dtype=torch.float32, device=device)
    ext.lora_shrink(x=x.data_ptr(), s_xm=x.stride(0), s_xk=x.stride(1), a=a.data_ptr(), s_ar=s_ar, s_ak=s_ak,
                    u=u.data_ptr(), s_um=u.stride(0), s_ur=u.stride(1), M=M, K=K, R=R, dtype=_DTYPE_CODES[x.dtype],
                    out_scale=scale, dropout=p > 0.0, seed=0 if seed_t is None else seed_t.data_ptr(),
                    thr31=dropout_threshold(p), split_k=0, device=device.index or 0,
                    stream=_stream(device))
    return u


def lora_expand_(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, b_strides: tuple[int, int], R: int,
                 scaling: float, *, dropout_p: float = 0.0, seed: int | torch.Tensor = 0,
                 epilogue_dropout: bool = False) -> torch.Tensor:
    """y += scaling * drop(U B^T) in place; returns y.

    y: [M, N] (any strides, no overlapping elements); u: float32 [M, R]; B: the [N, R]
    operand whose element (n, r) is at ``b.data_ptr() + n * b_strides[0] + r * b_strides[1]``
    elements, same dtype as y. With ``epilogue_dropout`` and dropout_p > 0 the update of
    y[m, n] is multiplied by keep(m, n) / (1 - p), the mask of ``fastpeft.reference.dropout``
    on (row, col) of y for ``seed`` (the backward of dropout on the LoRA input). Accumulates
    in fp32 and rounds once into y.
    """
    _checks.tensor("y", y, ndim=2)
    _checks.tensor("u", u, ndim=2)
    _checks.tensor("b", b)
    device = _cuda_device(y=y, u=u, b=b)
    _checks.tensor("y", y, dtypes=_DTYPE_CODES)
    _checks.tensor("u", u, dtypes=(torch.float32,))
    _checks.same_dtype(y=y, b=b)
    R = _checks.positive_int("R", R)
    M, N = y.shape
    if tuple(u.shape) != (M, R):
        raise ValueError(f"u has shape {tuple(u.shape)}; expected [{M}, {R}] for y {tuple(y.shape)} and R={R}")
    if any(st == 0 and n > 1 for st, n in zip(y.stride(), y.shape)):
        raise ValueError(f"y (shape {tuple(y.shape)}, strides {y.stride()}) has overlapping elements; "
                         f"it is updated in place")
    s_bn, s_br = _strides("b_strides", b_strides)
    _check_span("b", b, N, R, (s_bn, s_br))
    p = _checks.probability("dropout_p", dropout_p)
    if p > 0.0 and not epilogue_dropout:
        raise ValueError("dropout_p > 0 applies only with epilogue_dropout=True in lora_expand_")
    scaling = _checks.finite_float("scaling", scaling)
    seed_t = _seed_tensor(seed, device, p)
    ext = _extension()
    ext.lora_expand(y=y.data_ptr(), s_ym=y.stride(0), s_yn=y.stride(1), u=u.data_ptr(), s_um=u.stride(0),
                    s_ur=u.stride(1), b=b.data_ptr(), s_bn=s_bn, s_br=s_br, M=M, N=N, R=R,
                    dtype=_DTYPE_CODES[y.dtype], scaling=scaling,
                    dropout=p > 0.0, seed=0 if seed_t is None else seed_t.data_ptr(), thr31=dropout_threshold(p),
                    drop_scale=1.0 / (1.0 - p), device=device.index or 0, stream=_stream(device))
    return y


# ---------------------------------------------------------------------------------------------
# LLM.int8(): row quantization and the int8 GEMM with its dequantizing epilogue

def _vector(name: str, t: torch.Tensor, n: int, dtypes) -> None:
    """t must be a contiguous 1-D tensor of n elements with one of ``dtypes``."""
    _checks.tensor(name, t, ndim=1, dtypes=dtypes)
    if t.shape[0] != n:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{n}]")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _unit_col_stride(name: str, t: torch.Tensor) -> None:
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) needs unit column stride")


def int8_quant_rows(x: torch.Tensor, threshold: float):
    """LLM.int8() row quantization of a 2-D x: ``(q, row_scale, col_flags)``.

    row_scale[m] = max |x[m, k]| over the entries with |x| < threshold (every entry when
    threshold == 0), float32 [M]; q[m, k] = round-half-even(x[m, k] * 127 / row_scale[m]) as int8
    [M, K] (contiguous), clamped to [-127, 127], 0 for outlier entries (|x| >= threshold > 0), for
    NaN and where row_scale is 0. col_flags: int32 [K], 1 for each column holding an outlier,
    else 0; None when threshold == 0. The outlier *columns* are not zeroed in q: ``int8_gemm``
    masks them with col_flags. x: fp32, fp16 or bf16, any strides.
    """
    _checks.tensor("x", x, ndim=2)
    device = _cuda_device(x=x)
    _checks.tensor("x", x, dtypes=_DTYPE_CODES)
    threshold = _checks.finite_float("threshold", threshold)
    if threshold < 0.0:
        raise ValueError(f"threshold must be >= 0 (0: no outliers), got {threshold}")
    M, K = x.shape
    ext = _extension()
    q = torch.empty((M, K), dtype=torch.int8, device=device)
    row_scale = torch.empty((M,), dtype=torch.float32, device=device)
    flags = torch.zeros((K,), dtype=torch.int32, device=device) if threshold > 0.0 else None
    ext.int8_quant_rows(x=x.data_ptr(), s_xm=x.stride(0), s_xk=x.stride(1), q=q.data_ptr(), s_qm=q.stride(0),
                        row_scale=row_scale.data_ptr(), M=M, K=K, dtype=_DTYPE_CODES[x.dtype], threshold=threshold,
                        col_flags=flags.data_ptr() if flags is not None else 0,
                        device=device.index or 0, stream=_stream(device))
    return q, row_scale, flags


def int8_gemm(q: torch.Tensor, row_scale: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, *, x: torch.Tensor | None = None,
              col_flags: torch.Tensor | None = None, cols: torch.Tensor | None = None,
              count: torch.Tensor | None = None, tile: int = 0) -> torch.Tensor:
    """y = (q' @ w_int8^T) * row_scale[:, None] * w_scale[None, :] / 127^2 + outliers + bias, [M, N].

    q: int8 [M, K], w_int8: int8 [N, K] (both with unit column stride); row_scale float32 [M],
    w_scale float32 [N]; bias [N] of out_dtype or None; out_dtype fp32, fp16 or bf16. int32
    accumulation on int8 tensor cores, fp32 epilogue, rounded once to out_dtype.
    q' = q with the columns where ``col_flags`` (int32 [K]) is nonzero set to 0.
    Outliers (with ``cols`` and ``count``, which need ``x``):
    sum over c in cols[:count] of x[m, c] * w_int8[n, c] * w_scale[n] / 127 in fp32, with x [M, K]
    of out_dtype (any strides), cols int32 1-D (the first ``count`` entries valid), count int32 [1]
    read on the device (no host sync), clamped to [0, min(len(cols), K)].
    ``tile`` forces a tile shape (0 chooses; 1: 128x128, 64x64 where K or a row stride of q or w_int8 is not
    a multiple of 16; 2: 64x64, 3: 16x32) for tests.
    """
    _checks.tensor("q", q, ndim=2)
    _checks.tensor("w_int8", w_int8, ndim=2)
    tensors = dict(q=q, row_scale=row_scale, w_int8=w_int8, w_scale=w_scale, bias=bias, x=x, col_flags=col_flags,
                   cols=cols, count=count)
    device = _cuda_device(**{k: v for k, v in tensors.items() if v is not None})
    if out_dtype not in _DTYPE_CODES:
        raise TypeError(f"out_dtype {out_dtype} is not supported; supported: float32, float16, bfloat16")
    _checks.tensor("q", q, dtypes=(torch.int8,))
    _checks.tensor("w_int8", w_int8, dtypes=(torch.int8,))
    M, K = q.shape
    N = w_int8.shape[0]
    if w_int8.shape[1] != K:
        raise ValueError(f"q {tuple(q.shape)} and w_int8 {tuple(w_int8.shape)} disagree on K")
    _unit_col_stride("q", q)
    _unit_col_stride("w_int8", w_int8)
    _vector("row_scale", row_scale, M, (torch.float32,))
    _vector("w_scale", w_scale, N, (torch.float32,))
    if bias is not None:
        _vector("bias", bias, N, (out_dtype,))
    if col_flags is not None:
        _vector("col_flags", col_flags, K, (torch.int32,))
    if (cols is None) != (count is None):
        raise ValueError("cols and count come together (both or neither)")
    if cols is not None:
        if x is None:
            raise ValueError("the outlier columns (cols, count) need x")
        _checks.tensor("cols", cols, ndim=1, dtypes=(torch.int32,))
        if cols.numel() > 1 and cols.stride(0) != 1:
            raise ValueError(f"cols must be contiguous, got stride {cols.stride()}")
        _vector("count", count, 1, (torch.int32,))
    if x is not None:
        _checks.tensor("x", x, ndim=2, dtypes=(out_dtype,))
        if tuple(x.shape) != (M, K):
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [{M}, {K}] like q")
    if isinstance(tile, bool) or tile not in (0, 1, 2, 3):
        raise ValueError(f"tile must be 0, 1, 2 or 3, got {tile!r}")
    ext = _extension()
    y = torch.empty((M, N), dtype=out_dtype, device=device)

    def ptr(t):
        return t.data_ptr() if t is not None else 0

    ext.int8_gemm(q=q.data_ptr(), s_qm=q.stride(0), row_scale=row_scale.data_ptr(), w=w_int8.data_ptr(),
                  s_wn=w_int8.stride(0), w_scale=w_scale.data_ptr(), y=y.data_ptr(), s_ym=y.stride(0), M=M, N=N, K=K,
                  dtype=_DTYPE_CODES[out_dtype], bias=ptr(bias),
                  x=ptr(x), s_xm=x.stride(0) if x is not None else 0, s_xk=x.stride(1) if x is not None else 0,
                  col_flags=ptr(col_flags), cols=ptr(cols), n_cols=cols.numel() if cols is not None else 0,
                  count=ptr(count), tile=tile, device=device.index or 0, stream=_stream(device))
    return y


def int8_dequant_matmul(dy: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, *,
                        tile: int = 0) -> torch.Tensor:
    """dx = dy @ W_deq, a new contiguous [M, K] tensor in dy's dtype: the int8 layer's gradient w.r.t. its input.

    W_deq[n, k] = w_int8[n, k] * (w_scale[n] / 127) in fp32 (``reference.int8.dequantize_weight``), computed per
    tile inside the GEMM (no dequantized weight is materialized): rounded to dy's dtype for fp16 / bf16 dy
    (tensor cores, fp32 accumulation), split into TF32 hi + lo parts for fp32 dy (3xTF32, about fp32
    accuracy). dy: [M, N] fp32, fp16 or bf16, any strides; w_int8: int8 [N, K], any strides (16-byte loads
    where rows are contiguous and aligned); w_scale: float32 [N], contiguous. ``tile`` forces a tile shape
    (0 chooses; 1: 128x128 (fp32: 64x128), 2: 64x64 (fp32: as 1), 3: 16-row) for tests.
    """
    _checks.tensor("dy", dy, ndim=2)
    _checks.tensor("w_int8", w_int8, ndim=2)
    _checks.tensor("w_scale", w_scale)
    device = _cuda_device(dy=dy, w_int8=w_int8, w_scale=w_scale)
    _checks.tensor("dy", dy, dtypes=_DTYPE_CODES)
    _checks.tensor("w_int8", w_int8, dtypes=(torch.int8,))
    M, N = dy.shape
    K = w_int8.shape[1]
    if w_int8.shape[0] != N:
        raise ValueError(f"dy {tuple(dy.shape)} and w_int8 {tuple(w_int8.shape)} disagree on N (dy's columns, "
                         f"w_int8's rows)")
    _vector("w_scale", w_scale, N, (torch.float32,))
    if isinstance(tile, bool) or tile not in (0, 1, 2, 3):
        raise ValueError(f"tile must be 0, 1, 2 or 3, got {tile!r}")
    ext = _extension()
    dx = torch.empty((M, K), dtype=dy.dtype, device=device)
    if M == 0 or K == 0:
        return dx
    ext.int8_dequant_matmul(dy=dy.data_ptr(), s_dm=dy.stride(0), s_dn=dy.stride(1), w=w_int8.data_ptr(),
                            s_wn=w_int8.stride(0), s_wk=w_int8.stride(1), w_scale=w_scale.data_ptr(), dx=dx.data_ptr(),
                            s_xm=dx.stride(0), M=M, N=N, K=K, dtype=_DTYPE_CODES[dy.dtype], tile=tile,
                            device=device.index or 0, stream=_stream(device))
    return dx


# ---------------------------------------------------------------------------------------------
# absmax / zero-point quantization (fastpeft/reference/quant.py is the specification)

_QUANT_SCHEMES = {"absmax": 0, "zeropoint": 1}


def _quant_geometry(shape: tuple[int, ...], bits, scheme, axis, group_size):
    """Checked (bits, scheme code, axis, group_size, mode, outer, C, inner, last, slot shape) for a tensor shape."""
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if scheme not in _QUANT_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(_QUANT_SCHEMES)}")
    ndim = len(shape)
    numel = 1
    for n in shape:
        numel *= n
    last = shape[-1] if ndim else 1
    if ndim == 0 and bits == 4:
        raise ValueError("4-bit codes pack along the last dim; a 0-d tensor has none")
    if axis is not None and group_size is not None:
        raise ValueError("give axis (per channel) or group_size (groups along the last dim), not both")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if ndim == 0 or last % group_size:
            raise ValueError(f"group_size {group_size} does not divide the last dim of shape {tuple(shape)}")
        return bits, _QUANT_SCHEMES[scheme], None, group_size, 2, 1, 1, numel, last, \
            (*shape[:-1], last // group_size)
    if axis is None:
        return bits, _QUANT_SCHEMES[scheme], None, None, 0, 1, 1, numel, last, ()
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis!r} is out of range for a {ndim}-d tensor")
    axis %= ndim
    outer = inner = 1
    for n in shape[:axis]:
        outer *= n
    for n in shape[axis + 1:]:
        inner *= n
    return bits, _QUANT_SCHEMES[scheme], axis, None, 1, outer, shape[axis], inner, last, (shape[axis],)


def _quant_data_spec(shape, bits, scheme):
    """(dtype, shape) of the stored codes."""
    if bits == 4:
        return torch.uint8, (*shape[:-1], (shape[-1] + 1) // 2)
    return (torch.int8 if scheme == "absmax" else torch.uint8), tuple(shape)


def quant_quantize(x: torch.Tensor, bits: int, scheme: str, axis: int | None, group_size: int | None):
    """Absmax / zero-point quantization of x: ``(data, scale, zero_point)`` as fastpeft/reference/quant.py.

    x: fp32, fp16 or bf16, any shape and strides (a contiguous copy is taken when needed), not empty.
    axis=None and group_size=None: one scale; axis=k: one per index along dim k; group_size=g: groups of g
    along the last dim. data: int8 (absmax, 8-bit), uint8 (zeropoint, 8-bit), or uint8 [..., ceil(last / 2)]
    with two 4-bit codes per byte (element 2j in the low nibble; absmax nibbles two's complement).
    scale float32 and zero_point int32 of ``reference.quant.slot_shape``. No host synchronisation.
    """
    _checks.tensor("x", x)
    device = _cuda_device(x=x)
    _checks.tensor("x", x, dtypes=_DTYPE_CODES)
    shape = tuple(x.shape)
    bits, code, axis, group_size, mode, outer, C, inner, last, sshape = _quant_geometry(shape, bits, scheme, axis,
                                                                                      group_size)
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {shape}): its slots have no min / max")
    ext = _extension()
    xc = x.contiguous()
    dtype, dshape = _quant_data_spec(shape, bits, scheme)
    data = torch.empty(dshape, dtype=dtype, device=device)
    scale = torch.empty(sshape, dtype=torch.float32, device=device)
    zero_point = torch.empty(sshape, dtype=torch.int32, device=device)
    ext.quant_quantize(x=xc.data_ptr(), q=data.data_ptr(), scale=scale.data_ptr(), zero_point=zero_point.data_ptr(),
                       outer=outer, C=C, inner=inner, last=last, mode=mode, group_size=group_size or 0, bits=bits,
                       scheme=code, dtype=_DTYPE_CODES[x.dtype], device=device.index or 0,
                       stream=_stream(device))
    return data, scale, zero_point


def quant_dequantize(data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, scheme: str,
                     axis: int | None, group_size: int | None, shape, out_dtype: torch.dtype) -> torch.Tensor:
    """y = (code - zero_point) * scale in fp32, rounded once to ``out_dtype``, a new tensor of ``shape``.

    data, scale, zero_point as ``quant_quantize`` returns them for a tensor of ``shape`` with the same
    bits, scheme, axis and group_size (dtypes and shapes are checked).
    """
    _checks.tensor("data", data)
    _checks.tensor("scale", scale)
    _checks.tensor("zero_point", zero_point)
    device = _cuda_device(data=data, scale=scale, zero_point=zero_point)
    if out_dtype not in _DTYPE_CODES:
        raise TypeError(f"out_dtype {out_dtype} is not supported; supported: float32, float16, bfloat16")
    try:
        shape = tuple(operator.index(n) for n in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(n < 0 for n in shape):
        raise ValueError(f"bad shape {shape}")
    bits, code, axis, group_size, mode, outer, C, inner, last, sshape = _quant_geometry(shape, bits, scheme, axis,
                                                                                      group_size)
    dtype, dshape = _quant_data_spec(shape, bits, scheme)
    _checks.tensor("data", data, dtypes=(dtype,))
    if tuple(data.shape) != dshape:
        raise ValueError(f"data has shape {tuple(data.shape)}; expected {dshape} for shape {shape} at {bits} bits")
    _checks.tensor("scale", scale, dtypes=(torch.float32,))
    _checks.tensor("zero_point", zero_point, dtypes=(torch.int32,))
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if tuple(t.shape) != sshape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {sshape}")
    ext = _extension()
    y = torch.empty(shape, dtype=out_dtype, device=device)
    if y.numel() == 0:
        return y
    dc, sc, zc = data.contiguous(), scale.contiguous(), zero_point.contiguous()
    ext.quant_dequantize(q=dc.data_ptr(), scale=sc.data_ptr(), zero_point=zc.data_ptr(), y=y.data_ptr(), outer=outer,
                         C=C, inner=inner, last=last, mode=mode, group_size=group_size or 0, bits=bits, scheme=code,
                         dtype=_DTYPE_CODES[out_dtype], device=device.index or 0,
                         stream=_stream(device))
    return y


# ---------------------------------------------------------------------------------------------
# bottleneck adapter (Houlsby), fused forward (fastpeft/reference/bottleneck.py is the specification)

ADAPTER_ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
BOTTLENECK_MAX_RANK = 256  # csrc/bottleneck.cu keeps a row tile's bottleneck activations on chip


def nf4_dequantize(data: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor | None, offset: torch.Tensor | None,
                   code: torch.Tensor, dyn: torch.Tensor | None, block_size: int, n: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """NF4 / FP4 dequantize (bitsandbytes' layout, fastpeft/reference/nf4.py): a new flat tensor of ``n``
    elements of ``out_dtype``, y[e] = code[nibble e] * absmax[e // block_size] in fp32, rounded once.

    data uint8 [ceil(n / 2)]; absmax float32 [ceil(n / block_size)], or with double quantization
    (``nested`` float32 [ceil(blocks / 256)], ``offset`` float32 [] or [1], ``dyn`` float32 [256]) its
    uint8 codes; code float32 [16]. Sizes and dtypes are checked here (fastpeft.ops.nf4.check_fields
    checks the rest); operands are read as contiguous copies where they are not."""
    double = nested is not None
    tensors = {"data": data, "absmax": absmax, "code": code}
    if double:
        if offset is None or dyn is None:
            raise ValueError("double quantization needs nested, offset and dyn")
        tensors.update(nested=nested, offset=offset, dyn=dyn)
    for name, t in tensors.items():
        _checks.tensor(name, t)
    device = _cuda_device(**tensors)
    if out_dtype not in _DTYPE_CODES:
        raise TypeError(f"out_dtype {out_dtype} is not supported; supported: float32, float16, bfloat16")
    n, block_size = operator.index(n), operator.index(block_size)
    if n < 0 or block_size < 2 or block_size % 2 or block_size > 4096:
        raise ValueError(f"bad n {n} or block_size {block_size} (even, in [2, 4096])")
    blocks = -(-n // block_size)
    want = {"data": ((n + 1) // 2, torch.uint8), "absmax": (blocks, torch.uint8 if double else torch.float32),
            "code": (16, torch.float32)}
    if double:
        want.update(nested=(-(-blocks // 256), torch.float32), offset=(1, torch.float32), dyn=(256, torch.float32))
    for name, (size, dtype) in want.items():
        t = tensors[name]
        if t.dtype != dtype or t.numel() != size:
            raise ValueError(f"{name} must be {dtype} with {size} elements for n={n}, block_size={block_size}; "
                             f"got {t.dtype} with {t.numel()}")
    ext = _extension()
    y = torch.empty(n, dtype=out_dtype, device=device)
    if n == 0:
        return y
    dense = {name: t.contiguous() for name, t in tensors.items()}
    ptr = lambda name: dense[name].data_ptr() if name in dense else 0  # noqa: E731
    ext.nf4_dequantize(data=ptr("data"), absmax=ptr("absmax"), nested=ptr("nested"), offset=ptr("offset"),
                       code=ptr("code"), dyn=ptr("dyn"), y=y.data_ptr(), n=n, block_size=block_size,
                       dtype=_DTYPE_CODES[out_dtype], device=device.index or 0, stream=_stream(device))
    return y


def _nf4_block_size(block_size) -> int:
    block_size = operator.index(block_size)
    if block_size < 2 or block_size % 2 or block_size > 4096:
        raise ValueError(f"bad block_size {block_size} (even, in [2, 4096])")
    return block_size


def _nf4_table(name: str, t: torch.Tensor, size: int) -> None:
    if t.dtype != torch.float32 or t.numel() != size:
        raise ValueError(f"{name} must be torch.float32 with {size} elements; got {t.dtype} with {t.numel()}")


def _nf4_order(order) -> int:
    """The code of each sorted position (16 ints, a permutation of 0..15; None: the identity) packed
    as the kernel's int64 field: nibble p = the code of position p, 0 for the identity."""
    if order is None:
        return 0
    codes = [operator.index(c) for c in order]
    if sorted(codes) != list(range(16)):
        raise ValueError(f"order must be a permutation of 0..15 (the code of each sorted position), got {order!r}")
    packed = sum(c << (4 * p) for p, c in enumerate(codes))
    return packed - (1 << 64) if packed >= 1 << 63 else packed  # the same 64 bits as a signed int64


def nf4_quantize(x: torch.Tensor, mids: torch.Tensor, order, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 / FP4 quantize (bitsandbytes' layout, fastpeft/reference/nf4.py ``quantize_4bit``): x (fp32, fp16
    or bf16, any shape, read flat in row-major order; a contiguous copy where it is not) ->
    (packed codes uint8 [ceil(n / 2)], element 2j in the high nibble; absmax float32 [ceil(n / block_size)]).

    mids: float32 [15], the midpoints of the sorted table (fastpeft.ops.nf4._tables); order: the code of
    each sorted position (16 ints; None: the identity, NF4). block_size even, in [2, 4096]. x is not checked
    for NaN / inf (fastpeft.ops.nf4 does that); no host synchronisation."""
    _checks.tensor("x", x)
    _checks.tensor("mids", mids)
    device = _cuda_device(x=x, mids=mids)
    _checks.tensor("x", x, dtypes=_DTYPE_CODES)
    _nf4_table("mids", mids, 15)
    block_size, packed = _nf4_block_size(block_size), _nf4_order(order)
    n = x.numel()
    ext = _extension()
    q = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=device)
    if n == 0:
        return q, absmax
    xc, mc = x.contiguous(), mids.contiguous()
    ext.nf4_quantize(x=xc.data_ptr(), q=q.data_ptr(), absmax=absmax.data_ptr(), mids=mc.data_ptr(), order=packed,
                     n=n, block_size=block_size, dtype=_DTYPE_CODES[x.dtype], device=device.index or 0,
                     stream=_stream(device))
    return q, absmax


def nf4_double_quant(absmax: torch.Tensor, offset: torch.Tensor, mids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QLoRA's double quantization (fastpeft/reference/nf4.py ``double_quant``) of the float32 block absmax
    (any shape, read flat) around ``offset`` (float32, one element: its mean, computed by the caller) ->
    (codes8 uint8 [nb], nested absmax float32 [ceil(nb / 256)]). mids: float32 [256], the dynamic map's 255
    midpoints and a pad (fastpeft.ops.nf4._tables(device)["dynamic_mids"])."""
    tensors = {"absmax": absmax, "offset": offset, "mids": mids}
    for name, t in tensors.items():
        _checks.tensor(name, t)
    device = _cuda_device(**tensors)
    _nf4_table("absmax", absmax, absmax.numel())
    _nf4_table("offset", offset, 1)
    _nf4_table("mids", mids, 256)
    nb = absmax.numel()
    ext = _extension()
    q8 = torch.empty(nb, dtype=torch.uint8, device=device)
    nested = torch.empty(-(-nb // 256), dtype=torch.float32, device=device)
    if nb == 0:
        return q8, nested
    ac, oc, mc = absmax.contiguous(), offset.contiguous(), mids.contiguous()
    ext.nf4_double_quant(absmax=ac.data_ptr(), offset=oc.data_ptr(), q8=q8.data_ptr(), nested=nested.data_ptr(),
                         mids=mc.data_ptr(), n=nb, device=device.index or 0, stream=_stream(device))
    return q8, nested


def bottleneck_adapter_forward(x2: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
                    up_weight: torch.Tensor, up_bias: torch.Tensor | None, activation: str, scaling: float,
                    *, n_split: int = 0) -> torch.Tensor:
    """y2 = x2 + scaling * (act(x2 W_d^T + b_d) W_u^T + b_u), a new contiguous [M, d] tensor.

    x2: [M, d] with unit column stride (any row stride), fp32, fp16 or bf16; down_weight W_d
    [r, d] and up_weight W_u [d, r] contiguous; down_bias [r] and up_bias [d] (or None); all of
    x2's dtype; 1 <= r <= BOTTLENECK_MAX_RANK. activation: "relu", "gelu" (erf), "gelu_tanh" or
    "silu". h accumulates in fp32, a = act(h) is rounded to x2's dtype before the second GEMM
    (fp32 accumulation), and y = x + scaling * z is computed in fp32 and rounded once.
    ``n_split`` (tests) forces how many blocks share the d columns of a row tile (0 chooses).
    """
    _checks.tensor("x2", x2, ndim=2)
    _checks.tensor("down_weight", down_weight, ndim=2)
    _checks.tensor("up_weight", up_weight, ndim=2)
    tensors = dict(x2=x2, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight, up_bias=up_bias)
    present = {k: v for k, v in tensors.items() if v is not None}
    for name in ("down_bias", "up_bias"):
        if tensors[name] is not None:
            _checks.tensor(name, tensors[name], ndim=1)
    device = _cuda_device(**present)
    _checks.tensor("x2", x2, dtypes=_DTYPE_CODES)
    _checks.same_dtype(**present)
    M, D = x2.shape
    R = down_weight.shape[0]
    if R < 1:
        raise ValueError(f"the bottleneck r must be > 0; down_weight has shape {tuple(down_weight.shape)}")
    if tuple(down_weight.shape) != (R, D):
        raise ValueError(f"down_weight has shape {tuple(down_weight.shape)}; expected [r, {D}] for x2 "
                         f"{tuple(x2.shape)}")
    if tuple(up_weight.shape) != (D, R):
        raise ValueError(f"up_weight has shape {tuple(up_weight.shape)}; expected [{D}, {R}] for x2 "
                         f"{tuple(x2.shape)} and down_weight {tuple(down_weight.shape)}")
    if R > BOTTLENECK_MAX_RANK:
        raise ValueError(f"bottleneck r={R} exceeds the CUDA kernel's limit of {BOTTLENECK_MAX_RANK}")
    if down_bias is not None:
        _vector("down_bias", down_bias, R, (x2.dtype,))
    if up_bias is not None:
        _vector("up_bias", up_bias, D, (x2.dtype,))
    for name, w in (("down_weight", down_weight), ("up_weight", up_weight)):
        if not w.is_contiguous():
            raise ValueError(f"{name} (shape {tuple(w.shape)}, strides {w.stride()}) must be contiguous")
    _unit_col_stride("x2", x2)
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, got {type(activation).__name__}")
    if activation not in ADAPTER_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ADAPTER_ACTIVATIONS)}")
    scaling = _checks.finite_float("scaling", scaling)
    if isinstance(n_split, bool) or not isinstance(n_split, int) or n_split < 0:
        raise ValueError(f"n_split must be an int >= 0 (0 chooses), got {n_split!r}")
    ext = _extension()
    y2 = torch.empty((M, D), dtype=x2.dtype, device=device)
    if M == 0 or D == 0:
        return y2

    def ptr(t):
        return t.data_ptr() if t is not None else 0

    ext.bottleneck_adapter_forward(x=x2.data_ptr(), s_xm=x2.stride(0), wd=down_weight.data_ptr(), bd=ptr(down_bias),
                                   wu=up_weight.data_ptr(), bu=ptr(up_bias), y=y2.data_ptr(), s_ym=y2.stride(0), M=M,
                                   D=D, R=R, dtype=_DTYPE_CODES[x2.dtype],
                                   activation=ADAPTER_ACTIVATIONS[activation], scaling=scaling, n_split=n_split,
                                   device=device.index or 0, stream=_stream(device))
    return y2


# ---------------------------------------------------------------------------------------------
# multi-adapter LoRA (one adapter per row, from a stack): the shrink / expand of csrc/lora.cu

_INDEX_BITS = {torch.int32: 32, torch.int64: 64}


def _multi_lora_common(name_x: str, x2: torch.Tensor, name_w: str, w: torch.Tensor, ranks: torch.Tensor,
                       indices: torch.Tensor, u: torch.Tensor, row_order: torch.Tensor | None,
                       scalings: torch.Tensor | None = None):
    """Checks shared by the multi-adapter shrink and expand; returns (device, T, n, r_max)."""
    _checks.tensor(name_x, x2, ndim=2)
    _checks.tensor(name_w, w, ndim=3)
    _checks.tensor("ranks", ranks, ndim=1)
    _checks.tensor("indices", indices, ndim=1)
    _checks.tensor("u", u, ndim=2)
    if row_order is not None:
        _checks.tensor("row_order", row_order, ndim=1)
    if scalings is not None:
        _checks.tensor("scalings", scalings, ndim=1)
    tensors = {name_x: x2, name_w: w, "ranks": ranks, "indices": indices, "u": u, "row_order": row_order,
               "scalings": scalings}
    device = _cuda_device(**{k: v for k, v in tensors.items() if v is not None})
    _checks.tensor(name_x, x2, dtypes=_DTYPE_CODES)
    _checks.same_dtype(**{name_x: x2, name_w: w})
    _checks.tensor("u", u, dtypes=(torch.float32,))
    T = x2.shape[0]
    n = w.shape[0]
    r_max = u.shape[1]
    _vector("ranks", ranks, n, (torch.int32,))
    _vector("indices", indices, T, tuple(_INDEX_BITS))
    if row_order is not None:
        _vector("row_order", row_order, T, (torch.int32,))
    if scalings is not None:
        _vector("scalings", scalings, n, (torch.float32,))
    if u.shape[0] != T:
        raise ValueError(f"u has shape {tuple(u.shape)}; expected [{T}, r_max] for {name_x} {tuple(x2.shape)}")
    if not w.is_contiguous():
        raise ValueError(f"{name_w} (shape {tuple(w.shape)}, strides {w.stride()}) must be contiguous")
    _unit_col_stride(name_x, x2)
    return device, T, n, r_max


def _multi_lora_shrink(x2: torch.Tensor, A: torch.Tensor, ranks: torch.Tensor, indices: torch.Tensor,
                       u: torch.Tensor, row_order: torch.Tensor | None = None, *, tile: int = 0, split_k: int = 0,
                       slices: int = 0) -> torch.Tensor:
    """multi_lora_shrink with the kernel's launch choices exposed (tests): ``tile`` 0 chooses, 1 forces
    the 128-row tiles, 2 the 16-row decode tiles; ``split_k`` and ``slices`` 0 choose."""
    device, T, n, r_max = _multi_lora_common("x2", x2, "A", A, ranks, indices, u, row_order)
    K = x2.shape[1]
    if tuple(A.shape[1:]) != (r_max, K):
        raise ValueError(f"A has shape {tuple(A.shape)}; expected [n, {r_max}, {K}] for x2 {tuple(x2.shape)} "
                         f"and u {tuple(u.shape)}")
    if any(st == 0 and s > 1 for st, s in zip(u.stride(), u.shape)):
        raise ValueError(f"u (shape {tuple(u.shape)}, strides {u.stride()}) has overlapping elements; "
                         f"it is written in place")
    for name, v in (("tile", tile), ("split_k", split_k), ("slices", slices)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 chooses), got {v!r}")
    ext = _extension()
    if T == 0 or r_max == 0:
        return u
    ext.multi_lora_shrink(x=x2.data_ptr(), s_xm=x2.stride(0), s_xk=x2.stride(1), a=A.data_ptr(), s_aa=A.stride(0),
                          s_ar=A.stride(1), s_ak=A.stride(2), u=u.data_ptr(), s_um=u.stride(0), s_ur=u.stride(1),
                          ranks=ranks.data_ptr(), indices=indices.data_ptr(), index_bits=_INDEX_BITS[indices.dtype],
                          row_order=row_order.data_ptr() if row_order is not None else 0, M=T, K=K, R=r_max, n=n,
                          dtype=_DTYPE_CODES[x2.dtype], tile=tile, split_k=split_k, slices=slices,
                          device=device.index or 0, stream=_stream(device))
    return u


def multi_lora_shrink(x2: torch.Tensor, A: torch.Tensor, ranks: torch.Tensor, indices: torch.Tensor,
                      u: torch.Tensor, row_order: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-adapter LoRA shrink, in place: ``u[i, :r] = x2[i] A[a, :r]^T`` (fp32 accumulation) with
    ``a = indices[i]`` and ``r = ranks[a]``; ``u[i, r:] = 0``, and ``u[i] = 0`` for rows without adapter
    (``indices[i]`` outside ``[0, n)``, -1 by convention). Returns u.

    x2: [T, in] with unit column stride (fp32, fp16 or bf16); A: contiguous [n, r_max, in] of x2's dtype
    (entries ``A[a, ranks[a]:]`` are never read); ranks: int32 [n], 1 <= ranks[a] <= r_max, read on the
    device; indices: int32 or int64 [T]; u: float32 [T, r_max] (any strides). row_order: None, or an int32
    permutation of range(T) listing the rows in processing order, e.g. sorted by adapter, so consecutive
    rows share weight tiles. No host synchronization: CUDA-graph safe.
    """
    return _multi_lora_shrink(x2, A, ranks, indices, u, row_order)


def _multi_lora_expand(y2: torch.Tensor, u: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor,
                       scalings: torch.Tensor, indices: torch.Tensor, row_order: torch.Tensor | None = None, *,
                       tile: int = 0, slices: int = 0) -> torch.Tensor:
    """multi_lora_expand with the kernel's launch choices exposed (tests): ``tile`` 0 chooses, 1 forces
    the 64-row tiles, 2 the 16-row decode tiles; ``slices`` 0 chooses."""
    device, T, n, r_max = _multi_lora_common("y2", y2, "B", B, ranks, indices, u, row_order, scalings)
    N = y2.shape[1]
    if tuple(B.shape[1:]) != (N, r_max):
        raise ValueError(f"B has shape {tuple(B.shape)}; expected [n, {N}, {r_max}] for y2 {tuple(y2.shape)} "
                         f"and u {tuple(u.shape)}")
    if any(st == 0 and s > 1 for st, s in zip(y2.stride(), y2.shape)):
        raise ValueError(f"y2 (shape {tuple(y2.shape)}, strides {y2.stride()}) has overlapping elements; "
                         f"it is updated in place")
    for name, v in (("tile", tile), ("slices", slices)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 chooses), got {v!r}")
    ext = _extension()
    if T == 0 or N == 0 or r_max == 0 or n == 0:
        return y2
    ext.multi_lora_expand(y=y2.data_ptr(), s_ym=y2.stride(0), s_yn=y2.stride(1), u=u.data_ptr(), s_um=u.stride(0),
                          s_ur=u.stride(1), b=B.data_ptr(), s_ba=B.stride(0), s_bn=B.stride(1), s_br=B.stride(2),
                          ranks=ranks.data_ptr(), scalings=scalings.data_ptr(), indices=indices.data_ptr(),
                          index_bits=_INDEX_BITS[indices.dtype],
                          row_order=row_order.data_ptr() if row_order is not None else 0, M=T, N=N, R=r_max, n=n,
                          dtype=_DTYPE_CODES[y2.dtype], tile=tile, slices=slices, device=device.index or 0,
                          stream=_stream(device))
    return y2


def multi_lora_expand(y2: torch.Tensor, u: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor,
                      scalings: torch.Tensor, indices: torch.Tensor,
                      row_order: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-adapter LoRA expand, in place: ``y2[i] += scalings[a] * u[i, :r] B[a, :, :r]^T`` with
    ``a = indices[i]``, ``r = ranks[a]``, accumulated in fp32 and rounded once to y2's dtype; rows without
    adapter (``indices[i]`` outside ``[0, n)``) are left untouched. Returns y2.

    y2: [T, out] with unit column stride (fp32, fp16 or bf16); u: float32 [T, r_max] (any strides;
    ``u[i, r:]`` never read); B: contiguous [n, out, r_max] of y2's dtype (``B[a, :, ranks[a]:]`` never
    read); ranks int32 [n] and scalings float32 [n], read on the device; indices int32 or int64 [T];
    row_order as in ``multi_lora_shrink``. No host synchronization: CUDA-graph safe.
    """
    return _multi_lora_expand(y2, u, B, ranks, scalings, indices, row_order)
