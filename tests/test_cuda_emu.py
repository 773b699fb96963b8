"""The CUDA C++ kernels of csrc/ on the CPU, through an EMULATOR. Not a GPU test.

tests/cuda_emu compiles csrc/lora.cu, csrc/int8.cu, csrc/quant.cu, csrc/nf4.cu and csrc/bottleneck.cu unchanged with g++ against
stand-in CUDA headers (one OS thread per CUDA thread, a checked __syncthreads barrier, tensor-core operand rounding)
under AddressSanitizer + UBSan, and a subset under ThreadSanitizer. Patched in for fastpeft._C, it runs
the checks of _cuda_checks.py (the GPU tests of test_cuda_ext.py run them too) on CPU tensors, so CI (no GPU) checks the kernels' indexing,
bounds, barriers, dropout masks, int8 and quantization codes and numerics. What it cannot check (warp execution, the real
wmma fragment layouts and accumulation order, the memory model, performance) is listed in
tests/cuda_emu/README.md: the GPU tests of test_cuda_ext.py remain the real check.
"""
from __future__ import annotations

import subprocess

import pytest
import torch

import _cuda_checks as checks  # the check_* helpers the GPU tests use
import test_cuda_ext as ext_checks  # and those written next to the GPU tests
from cuda_emu import emulator
from fastpeft import _backend
from fastpeft.ops import _cext

pytestmark = [
    pytest.mark.skipif(emulator.compiler() is None, reason="g++ not found: the CUDA kernel emulator needs it"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: tests/test_cuda_ext.py runs the real kernels"),
]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = checks.DTYPES


@pytest.fixture(scope="module")
def device_exe():
    """The device executable of a variant ('asan' or 'tsan'), built once per module (and cached on disk)."""
    built, errors = {}, {}

    def get(variant: str):
        if variant not in built and variant not in errors:
            try:
                built[variant] = emulator.build(variant)
            except subprocess.CalledProcessError as e:
                errors[variant] = (f"the emulator does not compile csrc/ ({variant}); a CUDA API csrc/ uses may be "
                                   f"missing from tests/cuda_emu/include:\n{e.stderr}")
        if variant in errors:
            pytest.fail(errors[variant], pytrace=False)
        return built[variant]

    return get


def _one_device(**tensors: torch.Tensor) -> torch.device:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"the CUDA C++ kernels need all tensors on one device; got {devices}")
    return devices.pop()


@pytest.fixture
def emulate(monkeypatch, device_exe):
    """Routes fastpeft's cuda backend to the emulator: CPU tensors stand in for device memory."""
    def install(variant: str = "asan", fault: str | None = None) -> emulator.EmulatedExtension:
        ext = emulator.EmulatedExtension(device_exe(variant), fault=fault)
        monkeypatch.setattr(_cext, "_extension", lambda: ext)
        monkeypatch.setattr(_cext, "_cuda_device", _one_device)
        monkeypatch.setattr(_cext, "_stream", lambda device: 0)
        why_not = _backend.why_cannot_run
        monkeypatch.setattr(_backend, "why_cannot_run", lambda backend, device, supported: (
            None if backend == "cuda" and backend in supported else why_not(backend, device, supported)))
        return ext

    return install


@pytest.fixture
def emu(emulate):
    return emulate("asan")


# ---------------------------------------------------------------------------------------------
# the GPU tests' checks, on a subset of their shapes that covers every kernel instantiation


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,R,x_layout,a_transposed", [
    (1, 1000, 16, "contiguous", False),  # one row, 16-byte loads, split-K from the SM count
    (7, 33, 4, "transposed", True),  # column-major x (scalar loads), A as a transposed view, K < BK
    (7, 1000, 30, "contiguous", False),  # two rank fragments per warp
    (300, 1000, 64, "strided", False),  # three row blocks, four rank fragments
    (300, 33, 200, "contiguous", True),  # four rank blocks, the last one partial
    (7, 1000, 30, "misaligned", False),  # x not 16-byte aligned: scalar loads
])
def test_shrink(emu, dtype, M, K, R, x_layout, a_transposed):
    checks.check_shrink("cpu", dtype, M, K, R, x_layout, a_transposed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,R,split_k", [(1, 4096, 16, 0), (7, 1000, 64, 3), (130, 777, 200, 16), (3, 100, 4, 1)])
def test_shrink_split_k(emu, dtype, M, K, R, split_k):
    checks.check_shrink_split_k("cpu", dtype, M, K, R, split_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,R,x_layout,a_transposed", [(7, 1000, 16, "contiguous", False),
                                                        (300, 200, 64, "strided", True)])
def test_shrink_dropout(emu, dtype, M, K, R, x_layout, a_transposed):
    checks.check_shrink("cpu", dtype, M, K, R, x_layout, a_transposed, p=0.3, seed=99)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,R,y_layout,b_transposed", [
    (1, 50, 1, "contiguous", False),
    (1, 1000, 200, "contiguous", False),  # one row with 16-byte accesses
    (7, 1000, 4, "contiguous", True),  # 16-byte loads and stores of y, B^T view
    (70, 130, 16, "transposed", False),  # column-major y (scalar path), two row and column blocks
    (300, 257, 200, "strided", True),  # 13 rank chunks, the last partial
    (129, 1000, 64, "contiguous", False),
    (7, 1000, 16, "misaligned", True),  # y not 16-byte aligned: scalar loads and stores
])
def test_expand(emu, dtype, M, N, R, y_layout, b_transposed):
    checks.check_expand("cpu", dtype, M, N, R, y_layout, b_transposed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,R", [(7, 1000, 16), (300, 257, 64)])
def test_expand_epilogue_dropout(emu, dtype, M, N, R):
    checks.check_expand("cpu", dtype, M, N, R, b_transposed=True, p=0.3, seed=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,R", [(1, 9, 4), (70, 130, 16), (129, 1000, 64)])
def test_expand_writes_only_its_view(emu, dtype, M, N, R):
    checks.check_expand_bounds("cpu", dtype, M, N, R)


@pytest.mark.parametrize("M,K,p,seed", [(1, 7, 0.5, 0), (300, 296, 0.3, 1234), (129, 77, 0.9, 2**31 - 1),
                                        (64, 1024, 0.1, 42)])
def test_dropout_masks_match_reference(emu, M, K, p, seed):
    checks.check_dropout_masks("cpu", M, K, p, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,r", [((3, 5), 48, 40, 8), ((300,), 200, 130, 16), ((1,), 64, 96, 64)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_cuda_backend(emu, dtype, lead, K, N, r, p):
    """fastpeft.lora_linear(backend="cuda"), forward and every gradient, through the emulated kernels."""
    checks.check_lora_linear("cpu", dtype, lead, K, N, r, p)
    assert emu.calls["lora_shrink"] and emu.calls["lora_expand"], "the cuda backend did not reach the kernels"


def test_wrapper_errors_and_empty_inputs(emu):
    checks.check_wrapper_errors("cpu")
    checks.check_empty("cpu")  # K = 0 runs the zeroing kernel


# ---------------------------------------------------------------------------------------------
# LLM.int8(): row quantization (exact codes, scales, flags) and the int8 GEMM, every tile shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,threshold,x_layout", [
    (1, 37, 0.0, "contiguous"),  # one row, scalar loads (K not a multiple of the vector)
    (7, 130, 6.0, "strided"),  # planted outliers, scalar loads, special rows (zero, NaN, -inf)
    (7, 1000, 6.0, "contiguous"),  # 16-byte loads, 64..128 threads per row
    (300, 96, 0.0, "contiguous"),  # 16 threads per row, 16 rows per block; -inf row: scale inf, codes 0
    (9, 4096, 2.5, "misaligned"),  # 256 threads per row, x not 16-byte aligned: scalar loads
])
def test_int8_quant_rows(emu, dtype, M, K, threshold, x_layout):
    checks.check_int8_quant("cpu", dtype, M, K, threshold, x_layout, special=checks.INT8_SPECIAL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,threshold", [(1, 37, 0.0), (7, 130, 6.0), (33, 1024, 2.5)])
def test_int8_quant_rows_writes_only_its_views(emu, dtype, M, K, threshold):
    checks.check_int8_quant_bounds("cpu", dtype, M, K, threshold)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,threshold,tile,x_layout", [
    (1, 37, 130, 6.0, 0, "contiguous"),  # decode tile (16 x 32, K over 4 warps), byte loads of q and w
    (7, 130, 1024, 6.0, 3, "strided"),  # decode tile, 16-byte loads, 4 K chunks; outliers, special rows
    (300, 130, 256, 6.0, 1, "transposed"),  # 128 x 128 tiles, partial in m and n, two epilogue rounds
    (300, 130, 37, 0.0, 2, "contiguous"),  # 64 x 64 tiles, K < 16: zero padding in one chunk
    (70, 64, 1000, 6.0, 2, "strided"),  # K = 1000: byte loads of q and w, 16 chunks; 16-byte y stores
])
def test_int8_gemm(emu, dtype, M, N, K, threshold, tile, x_layout):
    checks.check_int8_gemm("cpu", dtype, M, N, K, threshold, bias=tile != 2, tile=tile, x_layout=x_layout,
                           special=checks.INT8_SPECIAL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,threshold,tile", [(1, 9, 37, 0.0, 0), (70, 130, 64, 6.0, 1), (20, 100, 256, 6.0, 3)])
def test_int8_gemm_writes_only_its_view(emu, dtype, M, N, K, threshold, tile):
    checks.check_int8_gemm_bounds("cpu", dtype, M, N, K, threshold, tile)


@pytest.mark.parametrize("w_layout", ["padded", "misaligned"])
def test_int8_gemm_weight_layouts(emu, w_layout):
    checks.check_int8_gemm("cpu", F16, 7, 40, 128, 6.0, w_layout=w_layout, x_layout="transposed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,threshold", [(5, 48, 64, 6.0), (150, 40, 96, 0.0)])
def test_int8_linear_flow(emu, dtype, M, N, K, threshold):
    """quant_rows -> flags -> gemm through the emulated kernels, against reference.int8_linear."""
    checks.check_int8_linear_flow("cpu", dtype, M, N, K, threshold, special=checks.INT8_SPECIAL)
    assert emu.calls["int8_quant_rows"] and emu.calls["int8_gemm"]


def test_int8_bad_cols_errors_and_empty(emu):
    checks.check_int8_gemm_bad_cols("cpu")
    checks.check_int8_errors_and_empty("cpu")


# the int8 layer's backward, dx = dy W_deq (int8_dequant_matmul): every tile, 16-byte and element loads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,dy_layout,w_layout,tile", [
    (1, 37, 130, "contiguous", "contiguous", 0),  # 16-row tile, element loads (N, K not multiples of the vectors)
    (7, 64, 256, "contiguous", "contiguous", 3),  # 16-row tile, 16-byte loads, 2 column tiles
    (130, 64, 144, "contiguous", "contiguous", 1),  # 128 x 128 (fp32: 64 x 128), 16-byte loads, 2 chunks, 2 rounds
    (70, 100, 96, "strided", "misaligned", 2),  # 64 x 64 (fp32: 64 x 128), element loads, a partial last chunk
    (33, 40, 64, "misaligned", "transposed", 0),  # chosen tile; w with column stride != 1
    (20, 48, 40, "transposed", "padded", 1),  # the 128 x 128 choice with element loads runs on 64 x 64
])
def test_int8_dequant_matmul(emu, dtype, M, N, K, dy_layout, w_layout, tile):
    ext_checks.check_int8_dequant_matmul("cpu", dtype, M, N, K, dy_layout, w_layout, tile)
    assert emu.calls["int8_dequant_matmul"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,tile", [(9, 40, 70, 0), (70, 64, 130, 2), (130, 32, 144, 1)])
def test_int8_dequant_matmul_writes_only_its_view(emu, dtype, M, N, K, tile):
    ext_checks.check_int8_dequant_matmul_bounds("cpu", dtype, M, N, K, tile)


def test_int8_dequant_matmul_errors_and_empty(emu):
    ext_checks.check_int8_dequant_matmul_errors_and_empty("cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_backward_cuda_backend(emu, dtype):
    """fastpeft.int8_linear(backend="cuda") forward and backward through the emulated kernels."""
    ext_checks.check_int8_linear_backward("cpu", dtype, (3, 5), 48, 40)


@pytest.mark.parametrize("dtype,M,N,K,tile", [(BF16, 130, 64, 144, 1), (F32, 20, 64, 256, 3)],
                         ids=["bf16-large", "f32-small"])
def test_int8_dequant_matmul_no_data_races(emulate, dtype, M, N, K, tile):
    emulate("tsan")
    ext_checks.check_int8_dequant_matmul("cpu", dtype, M, N, K, tile=tile)


# ---------------------------------------------------------------------------------------------
# absmax / zero-point quantize and dequantize: codes, scales, zero points equal to reference.quant


@pytest.mark.parametrize("dtype,bits,scheme,shape,axis,group_size", [
    (F32, 8, "absmax", (5, 33), None, None),  # per tensor: multi-block min/max, finish, codes kernel
    (F16, 4, "zeropoint", (37,), None, None),  # odd last dim: padded nibble
    (BF16, 8, "zeropoint", (7, 33), 0, None),  # per row, special slots (zero, NaN, constant, ties, -inf)
    (F32, 4, "absmax", (7, 33), 1, None),  # per column: the nibble pairs straddle channels
    (F16, 8, "absmax", (3, 5, 9), 1, None),  # middle axis (outer 3, inner 9)
    (BF16, 4, "zeropoint", (4, 6, 5), -1, None),
    (F32, 8, "zeropoint", (7, 96), None, 32),  # groups in one pass (8 threads per group)
    (F16, 4, "absmax", (5, 6), None, 3),  # odd g: scales in the group kernel, codes in the codes kernel
    (BF16, 4, "zeropoint", (9, 256), None, 128),  # 32 threads per group, even g: packed in the group kernel
    (F32, 4, "absmax", (2, 1024), None, 1024),  # 256 threads per group
    (F16, 8, "absmax", (6, 14), None, 1),
])
def test_quant(emu, dtype, bits, scheme, shape, axis, group_size):
    checks.check_quant("cpu", dtype, shape, bits, scheme, axis, group_size)


@pytest.mark.parametrize("out_dtype,bits,scheme,shape,axis,group_size,misaligned", [
    (F32, 8, "absmax", (5, 33), None, None, False),  # vector path (8 per step) + scalar tail
    (BF16, 4, "zeropoint", (7, 33), 1, None, False),  # odd last dim: scalar path, per-element slots
    (F16, 4, "absmax", (3, 4, 10), None, 10, False),  # 4-byte loads, groups not a multiple of 8
    (F32, 4, "zeropoint", (9, 256), None, 128, False),  # uniform slots per vector
    (BF16, 8, "zeropoint", (300, 40), 0, None, True),  # misaligned codes: scalar path
    (F16, 8, "absmax", (3, 5, 16), 1, None, False),  # per channel, inner 16: uniform
])
def test_dequant_random_codes(emu, out_dtype, bits, scheme, shape, axis, group_size, misaligned):
    checks.check_dequant("cpu", out_dtype, shape, bits, scheme, axis, group_size, misaligned)


@pytest.mark.parametrize("dtype,bits,scheme,shape,axis,group_size", [
    (F32, 4, "zeropoint", (37,), None, None),
    (BF16, 8, "absmax", (7, 33), 1, None),
    (F16, 4, "absmax", (5, 6), None, 3),
])
def test_quant_writes_only_its_views(emu, dtype, bits, scheme, shape, axis, group_size):
    checks.check_quant_bounds("cpu", dtype, shape, bits, scheme, axis, group_size)


@pytest.mark.parametrize("dtype,bits,scheme,shape,axis,group_size", [(F16, 4, "zeropoint", (9, 33), 0, None),
                                                                   (F32, 8, "absmax", (7, 40), None, 8)])
def test_quant_api_cuda_backend(emu, dtype, bits, scheme, shape, axis, group_size):
    """fastpeft.quantize / dequantize(backend="cuda") on a strided x, through the emulated kernels."""
    checks.check_quant_api("cpu", dtype, shape, bits, scheme, axis, group_size)
    assert emu.calls["quant_quantize"] and emu.calls["quant_dequantize"]


# NF4 / FP4 dequantize (csrc/nf4.cu): bit for bit against reference.nf4
@pytest.mark.parametrize("out_dtype,n,block_size,double,scheme,misaligned", [
    (F32, 1024, 64, True, "nf4", False),   # vector path (8 a step), 16-byte stores of fp32 (two)
    (BF16, 1000, 64, False, "fp4", False),  # vector path, 16-bit
    (F16, 771, 32, True, "nf4", False),    # odd n: the scalar path, a pad nibble
    (F32, 1024, 64, False, "nf4", True),   # codes 1 byte past aligned: the scalar path
    (BF16, 600, 2, True, "nf4", False),    # blocks of 2 (not a multiple of 8): scalar, >256 blocks (2 nested)
])
def test_nf4_dequantize(emu, out_dtype, n, block_size, double, scheme, misaligned):
    checks.check_nf4_dequant("cpu", out_dtype, n, block_size, double, scheme, misaligned)
    assert emu.calls["nf4_dequantize"]


def test_nf4_dequantize_api_cuda_backend_and_errors(emu):
    checks.check_nf4_dequant("cpu", F16, 4096, 64, True, api=True)
    assert emu.calls["nf4_dequantize"]
    checks.check_nf4_dequant_errors("cpu")


# NF4 / FP4 quantize and double quantization (csrc/nf4.cu): bit for bit against reference.nf4
@pytest.mark.parametrize("dtype,n,block_size,scheme,misaligned", [
    (F32, 1024, 64, "nf4", False),   # vector path (8 a step, two 16-byte loads), ties, an all-zero block
    (BF16, 1000, 64, "fp4", False),  # vector path, a partial last block and a partial last step
    (F16, 771, 32, "nf4", False),    # odd n: the vector path's byte-by-byte tail, the pad nibble
    (F32, 1027, 64, "fp4", True),    # x one element past aligned: the scalar path, odd n
    (BF16, 601, 2, "nf4", False),    # blocks of 2 (scalar, a thread per block), odd n
    (F16, 300, 2, "fp4", True),      # blocks of 2, fp4's order, scalar
    (F32, 13288, 4096, "fp4", False),  # blocks of 4096: 256-thread teams, 2 steps each, partial last block
    (BF16, 13289, 4096, "nf4", True),  # the same on the scalar path (8 bytes a thread), odd n
    (F32, 1, 64, "nf4", False),       # n = 1: one code and the pad nibble
    (F16, 1, 2, "fp4", False),
])
def test_nf4_quantize(emu, dtype, n, block_size, scheme, misaligned):
    checks.check_nf4_quant("cpu", dtype, n, block_size, scheme, misaligned)
    assert emu.calls["nf4_quantize"]


@pytest.mark.parametrize("nb,special", [(1, False), (700, False), (1100, True)])
def test_nf4_double_quant(emu, nb, special):
    """One value; 3 nested blocks, the last partial (700 = 2 * 256 + 188); ties and an all-zero block."""
    checks.check_nf4_double_quant("cpu", nb, special)
    assert emu.calls["nf4_double_quant"]


@pytest.mark.parametrize("dtype,shape,scheme,block_size,double", [
    (BF16, (40, 70), "nf4", 64, True), (F32, (3, 333), "fp4", 32, False), (F16, (5, 4097), "fp4", 4096, True)])
def test_nf4_quantize_api_cuda_backend_and_errors(emu, dtype, shape, scheme, block_size, double):
    checks.check_nf4_quant_api("cpu", dtype, shape, scheme, block_size, double)
    assert emu.calls["nf4_quantize"] and emu.calls["nf4_double_quant"] == int(double)
    checks.check_nf4_quant_errors("cpu")


def test_quant_special_tensors_errors_and_empty(emu):
    checks.check_quant_special_tensors("cpu", BF16)
    checks.check_quant_errors("cpu")


# ---------------------------------------------------------------------------------------------
# ThreadSanitizer: a missing or misplaced __syncthreads is a data race between the threads of a block


@pytest.mark.parametrize("check,args", [
    (checks.check_shrink, (F32, 7, 1000, 16)),  # 16-byte loads, split-K (atomics into zeroed U)
    (checks.check_shrink, (F16, 300, 33, 200, "strided", True, 0.3)),  # scalar loads, dropout
    (checks.check_shrink_split_k, (BF16, 130, 777, 30, 3)),
    (checks.check_expand, (F32, 70, 1000, 64, "contiguous", False, 0.3)),  # vector epilogue, dropout
    (checks.check_expand, (BF16, 300, 257, 200, "transposed", True)),  # scalar epilogue
    (checks.check_int8_quant, (F16, 33, 1024, 2.5)),  # block reduction of the row absmax, flags
    (checks.check_int8_gemm, (BF16, 70, 130, 256, 6.0, True, 1)),  # double-buffered chunks, 2 epilogue rounds, outliers
    (checks.check_int8_gemm, (F32, 7, 40, 512, 6.0, False, 3)),  # K-split warps summed in the epilogue
    (checks.check_quant, (F32, (7, 33), 8, "zeropoint", 0)),  # channel min/max tree + atomics, finish
    (checks.check_quant, (F16, (9, 256), 4, "absmax", None, 128)),  # group teams: shared-memory tree
    (checks.check_nf4_quant, (F16, 1000, 64, "fp4")),  # nf4 block teams (8 threads): shared-memory tree, table
    (checks.check_nf4_quant, (F32, 13289, 4096, "nf4", True)),  # 256-thread teams, scalar path
    (checks.check_nf4_double_quant, (700,)),  # one 256-thread tree per nested block
], ids=["shrink-f32", "shrink-f16-dropout", "shrink-bf16-split", "expand-f32-dropout", "expand-bf16",
        "int8-quant-f16", "int8-gemm-bf16-large", "int8-gemm-f32-decode", "quant-channel", "quant-group",
        "nf4-quant-f16", "nf4-quant-4096", "nf4-double-quant"])
def test_no_data_races(emulate, check, args):
    emulate("tsan")
    check("cpu", *args)


# ---------------------------------------------------------------------------------------------
# the emulator itself: its checks fire, and it takes fastpeft._C's arguments


def test_emulator_reports_missing_barriers(emulate):
    emulate("tsan", fault="no_barriers")  # every __syncthreads a no-op
    with pytest.raises(emulator.EmulatorFault, match="ThreadSanitizer: data race"):
        checks.check_shrink("cpu", F32, 7, 100, 16)


def test_emulator_reports_out_of_bounds_reads(emulate):
    emulate("asan", fault="short_operand")  # every input operand allocated one byte short
    with pytest.raises(emulator.EmulatorFault, match="AddressSanitizer: heap-buffer-overflow"):
        checks.check_expand("cpu", F32, 7, 50, 4)


@pytest.fixture(scope="module")
def declared_fields(tmp_path_factory):
    """Every entry point's fields as the C preprocessor reads csrc/fastpeft.h: name -> (Field, ...)."""
    tmp = tmp_path_factory.mktemp("fields")
    src = tmp / "fields.cpp"
    src.write_text('#include <cstdio>\n#include "fastpeft.h"\n'
                   '#define SHOW(kind, name, init) std::printf(" %s %s %s", #kind, #name, #init);\n'
                   '#define ENTRY(fn, Params, FIELDS) std::printf("\\n%s", #fn); FIELDS(SHOW)\n'
                   'int main() { FASTPEFT_ENTRY_POINTS(ENTRY) }\n')
    exe = tmp / "fields"
    subprocess.run([emulator.compiler(), "-std=c++20", f"-I{emulator.CSRC}", str(src), "-o", str(exe)], check=True)
    out = {}
    for line in subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split("\n")[1:]:
        name, *words = line.split()
        out[name] = tuple(emulator.Field(k, n, emulator._cpp_value(d))
                          for k, n, d in zip(words[::3], words[1::3], words[2::3]))
    return out


ENTRY_POINTS = ["lora_shrink", "lora_expand", "int8_quant_rows", "int8_gemm", "int8_dequant_matmul", "quant_quantize",
                "quant_dequantize", "nf4_dequantize", "nf4_quantize", "nf4_double_quant", "bottleneck_adapter_forward",
                "multi_lora_shrink", "multi_lora_expand"]


def test_every_entry_point_is_emulated(declared_fields):
    assert sorted(declared_fields) == sorted(ENTRY_POINTS) == sorted(emulator.OPERANDS)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_emulated_extension_reads_the_declared_fields(declared_fields, name):
    """EmulatedExtension takes the fields of csrc/fastpeft.h (read by emulator.entry_points) in the
    preprocessor's order, kinds and defaults (the device reads a call's fields in that order), and
    describes the operand of each pointer field."""
    fields = emulator.entry_points()[name]
    assert fields == declared_fields[name]
    assert any(f.default is emulator.REQUIRED for f in fields)
    ext = emulator.EmulatedExtension("/nonexistent")
    with pytest.raises(ValueError, match=f"{name}: unknown keyword"):
        getattr(ext, name)(not_a_field=1)
    with pytest.raises(ValueError, match=f"{name}: missing required keyword argument {fields[0].name}"):
        getattr(ext, name)()


# ---------------------------------------------------------------------------------------------
# bottleneck adapter (csrc/bottleneck.cu): the fused forward against the float64 spec of _cuda_checks.py


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D,R,activation,x_layout", [
    (1, 100, 24, "relu", "contiguous"),  # one row; d = 100: 16-byte loads (fp32) or scalar (16-bit); column split
    (7, 136, 64, "gelu", "padded"),  # 16-byte loads and stores on padded rows, tail column tile
    (70, 200, 256, "gelu_tanh", "misaligned"),  # the largest rank class (fp32: 16-row tiles), scalar loads
    (33, 72, 128, "silu", "contiguous"),  # rank class 128, a partial row tile
    (5, 48, 1, "relu", "broadcast"),  # r = 1 (rank fragment mostly padding), x rows with stride 0
])
def test_adapter(emu, dtype, M, D, R, activation, x_layout):
    checks.check_adapter("cpu", dtype, M, D, R, activation, x_layout)
    assert emu.calls["bottleneck_adapter_forward"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_adapter_activations_without_bias(emu, dtype, activation):
    checks.check_adapter("cpu", dtype, 20, 40, 16, activation, bias=False, scaling=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D,R,n_split", [
    (1, 100, 24, 0),  # y rows stride d + 3: scalar stores
    (70, 136, 64, 1),  # one block walks all three column tiles (the accumulator tile reuses the W_u buffer)
    (40, 300, 200, 2),  # two blocks per row tile, each with two column tiles
])
def test_adapter_writes_only_its_view(emu, dtype, M, D, R, n_split):
    checks.check_adapter_bounds("cpu", dtype, M, D, R, n_split=n_split)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_adapter_rounds_a(emu, dtype, activation):
    checks.check_adapter_rounds_a("cpu", dtype, activation)


def test_adapter_errors_and_empty(emu):
    checks.check_adapter_errors_and_empty("cpu")


@pytest.mark.parametrize("check,args", [
    (checks.check_adapter, (F16, 70, 136, 64, "gelu", "padded")),  # vector paths, 4 activation rounds
    (checks.check_adapter_bounds, (F32, 20, 200, 256, "silu", 1)),  # 16-row tiles, one block per row tile
], ids=["adapter-f16", "adapter-f32-r256"])
def test_adapter_no_data_races(emulate, check, args):
    emulate("tsan")
    check("cpu", *args)


# ---------------------------------------------------------------------------------------------
# multi-adapter LoRA (csrc/lora.cu, MULTI kernels): ranks 1, 3, 16, 64 in one stack (and an unused adapter of
# NaN), NaN beyond every rank, rows without adapter (-1, n, huge, negative, int64 values that truncate to valid
# ones), against the float64 spec of _cuda_checks.py

I32, I64 = torch.int32, torch.int64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,index_dtype,order,tile,split_k,slices,x_layout", [
    (1, 96, I64, None, 0, 0, 0, "contiguous"),  # decode tile, one row, 16-byte loads
    (37, 100, I32, None, 2, 0, 0, "contiguous"),  # odd T, 3 decode tiles, 5 slices (fp16/bf16: scalar loads)
    (37, 33, I64, "sorted", 1, 0, 0, "misaligned"),  # one 128-row tile of sorted rows, scalar loads, K < BK
    (300, 96, I32, "shuffled", 1, 0, 0, "padded"),  # 128-row tiles of permuted rows: every adapter in each tile
    (300, 40, I64, "sorted", 2, 0, 1, "contiguous"),  # decode tiles, one block walks every segment of its tile
    (1, 1000, I32, None, 0, 0, 0, "contiguous"),  # split-K from the SM count: atomics into a zeroed u
    (20, 1000, I64, "shuffled", 2, 3, 3, "padded"),  # split-K x slices
])
def test_multi_lora_shrink(emu, dtype, T, K, index_dtype, order, tile, split_k, slices, x_layout):
    checks.check_multi_shrink("cpu", dtype, T, K, index_dtype, order, tile, split_k, slices, x_layout)
    assert emu.calls["multi_lora_shrink"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,index_dtype,order,tile,slices,y_layout", [
    (1, 136, I32, None, 0, 0, "contiguous"),  # decode tile, one row, 16-byte epilogue
    (37, 130, I64, None, 2, 0, "contiguous"),  # odd T and N, decode tiles, 5 slices, scalar epilogue
    (37, 50, I32, "sorted", 1, 0, "padded"),  # one 64-row tile of sorted rows; y inside a NaN buffer
    (300, 136, I64, "shuffled", 1, 0, "contiguous"),  # 64-row tiles of permuted rows, 5 slices
    (300, 136, I32, "sorted", 2, 1, "misaligned"),  # decode tiles walking every segment; y not 16-byte aligned
    (70, 264, I64, "shuffled", 0, 2, "padded"),  # forced 2 slices, 3 column tiles (the last 8 wide)
])
def test_multi_lora_expand(emu, dtype, T, N, index_dtype, order, tile, slices, y_layout):
    checks.check_multi_expand("cpu", dtype, T, N, index_dtype, order, tile, slices, y_layout)
    assert emu.calls["multi_lora_expand"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [None, "sorted"])
def test_multi_lora_flow(emu, dtype, order):
    """The public wrappers (the ops layer's calls): shrink then expand, int32 indices."""
    checks.check_multi_lora_flow("cpu", dtype, 37, 64, 72, order)


def test_multi_lora_errors_and_empty(emu):
    checks.check_multi_lora_errors_and_empty("cpu")


@pytest.mark.parametrize("check,args", [
    (checks.check_multi_shrink, (F16, 20, 300, I64, "shuffled", 2, 2, 3)),  # decode tiles: K split over warps,
    # partial sums in the epilogue, slices, split-K atomics
    (checks.check_multi_expand, (BF16, 70, 136, I32, "shuffled", 1, 0)),  # 64-row tiles, several segments each
], ids=["multi-shrink-f16", "multi-expand-bf16"])
def test_multi_lora_no_data_races(emulate, check, args):
    emulate("tsan")
    check("cpu", *args)
