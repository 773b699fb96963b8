"""Helpers shared by the Triton kernel modules: interpreter detection, dot precision, the
tensor-core dot with the interpreter's bf16 workaround, grouped program ordering, output
buffers and the SM count."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # older triton layouts
    from triton.language.extra.cuda import libdevice

_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 half-to-even in fp32


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The interpreter has no SMs. The split and slice choices made from the SM count then see a
# small GPU's 8, so that on the tests' small shapes they take their multi-program paths.
INTERPRETER_SM_COUNT = 8


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (INTERPRETER_SM_COUNT for CPU tensors)."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def new_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every buffer a kernel must fully write comes from here (the tests poison it: an element a
    kernel fails to write then fails them)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def autotune_enabled() -> bool:
    """FASTPEFT_AUTOTUNE=0 replaces autotuning by one fixed config per shape range."""
    return os.environ.get("FASTPEFT_AUTOTUNE", "1") != "0"


def precision(dtype: torch.dtype, exact_tf32: bool = False) -> str:
    """input_precision of fp32 dots: on the GPU they run on tensor cores, as tf32 when torch
    allows it (torch.backends.cuda.matmul.allow_tf32), else 3xTF32 (split hi/lo, about fp32's
    accuracy; an FMA "ieee" dot spills large tiles). ``exact_tf32``: one operand is exact in
    tf32 (int8 codes), so 3xTF32 is as good as fp32 and always used. "ieee" in the interpreter."""
    if dtype != torch.float32 or interpreted():
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32 and not exact_tf32:
        return "tf32"
    return "tf32x3"


def upcast(dtype: torch.dtype) -> bool:
    """bf16 operands must be upcast before tl.dot in the interpreter (triton#11584)."""
    return interpreted() and dtype == torch.bfloat16


def tuning_bench(kernel_call, quantiles=None, **kwargs):
    """The autotuners' timer: shorter than triton's default (25 ms warmup + 100 ms a config);
    tuning runs once per shape."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


@triton.jit
def rint(v, USE_LIBDEVICE: tl.constexpr):
    """Half-to-even rounding of fp32 |v| < 2**22. On the GPU: cvt.rni (libdevice rint), a separate
    instruction, so the product before it cannot be contracted into an fma with the rounding.
    The interpreter has no libdevice: (v + 1.5 * 2**23) - 1.5 * 2**23 rounds the same in numpy."""
    if USE_LIBDEVICE:
        return libdevice.rint(v)
    else:
        return (v + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in GROUP_M-row groups, so neighbouring programs share operand tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def x_tile_start(X, offs_m, offs_k, s_xm, s_xk, SWAP_AB: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(fp32 accumulator, pointers to x's first K tile) of a GEMM y = x @ W^T whose weight tile is
    made in registers: with SWAP_AB the tile is computed transposed (y^T = W @ x^T, the weight the
    dot's register operand), so the accumulator is [BLOCK_N, BLOCK_M] and x is read as x^T [K, M]."""
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_ptrs = X + offs_k[:, None] * s_xk + offs_m[None, :].to(tl.int64) * s_xm
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_ptrs = X + offs_m[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk
    return acc, x_ptrs
