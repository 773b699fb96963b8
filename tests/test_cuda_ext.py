"""The CUDA C++ extension fastpeft._C: build, argument checks, and kernels vs float64 references.

Build checks run wherever nvcc is (CI included): the extension must have been built.
Kernel checks need a GPU (marked ``gpu``); the ``check_*`` helpers take the device so the
same checks can also drive a host emulation of the kernels."""
from __future__ import annotations

import importlib
import os
import types
import warnings

import pytest
import torch

import fastpeft
from fastpeft import _backend
from fastpeft.ops import _cext
from fastpeft.reference import int8 as ref_int8
from fastpeft.reference.dropout import dropout_threshold

HAS_GPU = torch.cuda.is_available()

from _utils import TOL, rel_err
from _cuda_checks import (BOTTLENECK_ACTS, BOTTLENECK_SHAPES, DTYPES, INT8_SPECIAL, MULTI_ORDERS, QUANT_CASES,
                          QUANT_SCHEMES, _expected_archs, _nvcc, adapter_inputs, check_adapter,
                          check_adapter_bounds, check_adapter_errors_and_empty, check_adapter_rounds_a,
                          check_dequant, check_dropout_masks, check_empty, check_expand, check_expand_bounds,
                          check_int8_errors_and_empty, check_int8_gemm, check_int8_gemm_bad_cols,
                          check_int8_gemm_bounds, check_int8_linear_flow, check_int8_quant,
                          check_int8_quant_bounds, check_lora_linear, check_multi_expand,
                          check_multi_lora_cuda_graph, check_multi_lora_errors_and_empty, check_multi_lora_flow,
                          check_multi_shrink, check_nf4_dequant, check_nf4_dequant_errors, check_nf4_double_quant,
                          check_nf4_quant, check_nf4_quant_api, check_nf4_quant_errors, check_quant, check_quant_api, check_quant_bounds, check_quant_errors,
                          check_quant_special_tensors, check_shrink, check_shrink_split_k, check_wrapper_errors)


@pytest.mark.skipif(os.environ.get("FASTPEFT_BUILD_CUDA") == "0", reason="FASTPEFT_BUILD_CUDA=0 skips the build")
def test_extension_built_when_nvcc_present():
    if _nvcc() is None:
        pytest.skip("nvcc not found (on PATH or in $CUDA_HOME/bin): fastpeft._C is not built here")
    if os.environ.get("FASTPEFT_BUILD_CUDA") != "1" and not torch.cuda.is_available():
        pytest.skip("no GPU and FASTPEFT_BUILD_CUDA is not 1: the install skips fastpeft._C (CI sets it)")
    import fastpeft._C as C
    archs = set(C.compiled_archs())
    if "FASTPEFT_CUDA_ARCHS" in os.environ:
        assert archs == _expected_archs(), archs
    elif not HAS_GPU:  # CI: the default targets
        assert {80, 90} <= archs, archs
    n = C.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    # the import checked the driver against the runtime linked in (no driver: version 0, nothing to check)
    runtime, driver = C.cuda_runtime_version(), C.cuda_driver_version()
    assert runtime >= 11000 and driver >= 0 and _cext.driver_problem(runtime, driver) is None, (runtime, driver)
    if HAS_GPU:
        assert n == torch.cuda.device_count()
        major, minor = torch.cuda.get_device_capability()
        cc = 10 * major + minor
        runs = any(a // 10 == major and a <= cc for a in archs) or max(archs) <= cc  # cubin, or PTX JIT
        assert runs, f"no compiled target runs on sm_{cc}: {sorted(archs)}"


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
    for double in (False, True):  # nf4 quantize / double quantization have CUDA C++ kernels: CPU tensors say so
        with pytest.raises(ValueError, match=r"quantize_4bit: backend 'cuda'.*need CUDA tensors \(got cpu\)"):
            fastpeft.quantize(w, 4, "nf4", block_size=32, double_quant=double, backend="cuda")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        _cext.nf4_quantize(w, torch.zeros(15), None, 64)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        _cext.nf4_double_quant(w[0], w[0, 0], torch.zeros(256))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 300])
@pytest.mark.parametrize("K", [33, 1000])
@pytest.mark.parametrize("R", [1, 4, 16, 64, 200])
@pytest.mark.parametrize("x_layout,a_transposed", [("contiguous", False), ("transposed", True), ("strided", False)])
def test_shrink(dtype, M, K, R, x_layout, a_transposed):
    check_shrink("cuda", dtype, M, K, R, x_layout, a_transposed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,R", [(1, 4096, 16), (7, 1000, 64), (300, 777, 200)])
@pytest.mark.parametrize("split_k", [0, 1, 3, 16])
def test_shrink_split_k(dtype, M, K, R, split_k):
    check_shrink_split_k("cuda", dtype, M, K, R, split_k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,R", [(7, 1000, 16), (300, 200, 64)])
def test_shrink_dropout(dtype, M, K, R):
    check_shrink("cuda", dtype, M, K, R, p=0.3, seed=99)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 300])
@pytest.mark.parametrize("N", [50, 1000])
@pytest.mark.parametrize("R", [1, 4, 16, 64, 200])
@pytest.mark.parametrize("y_layout,b_transposed", [("contiguous", False), ("contiguous", True), ("transposed", False),
                                                   ("strided", True)])
def test_expand(dtype, M, N, R, y_layout, b_transposed):
    check_expand("cuda", dtype, M, N, R, y_layout, b_transposed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,R", [(7, 1000, 16), (300, 257, 64)])
def test_expand_epilogue_dropout(dtype, M, N, R):
    check_expand("cuda", dtype, M, N, R, b_transposed=True, p=0.3, seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,R", [(1, 9, 4), (70, 130, 16), (129, 1000, 64)])
def test_expand_writes_only_its_view(dtype, M, N, R):
    check_expand_bounds("cuda", dtype, M, N, R)


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,p,seed", [(1, 7, 0.5, 0), (300, 296, 0.3, 1234), (129, 77, 0.9, 2**31 - 1),
                                        (64, 1024, 0.1, 42)])
def test_dropout_masks_match_reference(M, K, p, seed):
    assert dropout_threshold(p) > 0
    check_dropout_masks("cuda", M, K, p, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,r", [((3, 5), 48, 40, 8), ((300,), 200, 130, 16), ((1,), 64, 96, 64)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_cuda_backend(dtype, lead, K, N, r, p):
    check_lora_linear("cuda", dtype, lead, K, N, r, p)


@pytest.mark.gpu
def test_wrapper_errors_and_empty_inputs():
    check_wrapper_errors("cuda")
    check_empty("cuda")
    if torch.cuda.device_count() > 1:
        x, A = torch.randn(4, 8, device="cuda:0"), torch.randn(2, 8, device="cuda:1")
        with pytest.raises(ValueError, match="one device"):
            _cext.lora_shrink(x, A, A.stride(), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 300])
@pytest.mark.parametrize("K", [37, 130, 1000, 4096])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("x_layout", ["contiguous", "strided", "misaligned"])
def test_int8_quant_rows(dtype, M, K, threshold, x_layout):
    check_int8_quant("cuda", dtype, M, K, threshold, x_layout, special=INT8_SPECIAL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,threshold", [(1, 37, 0.0), (7, 130, 6.0), (300, 1000, 6.0), (33, 4096, 2.5)])
def test_int8_quant_rows_writes_only_its_views(dtype, M, K, threshold):
    check_int8_quant_bounds("cuda", dtype, M, K, threshold)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 300])
@pytest.mark.parametrize("N,K", [(37, 130), (130, 37), (1000, 1000), (256, 4096)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("tile", [0, 1, 2, 3])
def test_int8_gemm(dtype, M, N, K, threshold, tile):
    check_int8_gemm("cuda", dtype, M, N, K, threshold, bias=M != 7, tile=tile, x_layout="strided",
                    special=INT8_SPECIAL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_layout", ["padded", "misaligned"])
@pytest.mark.parametrize("M,N,K", [(7, 130, 1024), (300, 64, 256)])
def test_int8_gemm_weight_layouts(dtype, w_layout, M, N, K):
    check_int8_gemm("cuda", dtype, M, N, K, 6.0, w_layout=w_layout, x_layout="transposed")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,threshold,tile", [(1, 9, 37, 0.0, 0), (70, 130, 1000, 6.0, 1), (129, 1000, 64, 6.0, 2),
                                                  (16, 200, 300, 6.0, 3)])
def test_int8_gemm_writes_only_its_view(dtype, M, N, K, threshold, tile):
    check_int8_gemm_bounds("cuda", dtype, M, N, K, threshold, tile)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (300, 1000, 1000), (2048, 512, 1024)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_linear_flow(dtype, M, N, K, threshold):
    check_int8_linear_flow("cuda", dtype, M, N, K, threshold, special=INT8_SPECIAL)


@pytest.mark.gpu
def test_int8_bad_cols_errors_and_empty():
    check_int8_gemm_bad_cols("cuda")
    check_int8_errors_and_empty("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("shape,axis,group_size", QUANT_CASES)
def test_quant(dtype, bits, scheme, shape, axis, group_size):
    check_quant("cuda", dtype, shape, bits, scheme, axis, group_size)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("shape,axis,group_size", [((4096, 4097), None, None), ((1000, 3001), 1, None),
                                                   ((3, 2000, 333), 0, None), ((2048, 4096), None, 128),
                                                   ((511, 768), None, 256)])
def test_quant_large(dtype, bits, scheme, shape, axis, group_size):
    check_quant("cuda", dtype, shape, bits, scheme, axis, group_size, special=False)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("n,block_size,double,scheme,misaligned", [
    (4096 * 1024, 64, True, "nf4", False), (1000, 64, False, "fp4", False), (771, 32, True, "nf4", False),
    (1024, 64, False, "nf4", True), (600, 2, True, "nf4", False)])
def test_nf4_dequantize(out_dtype, n, block_size, double, scheme, misaligned):
    """csrc/nf4.cu against reference.nf4, bit for bit: the vector and scalar paths, double quantization."""
    check_nf4_dequant("cuda", out_dtype, n, block_size, double, scheme, misaligned)


@pytest.mark.gpu
def test_nf4_dequantize_api_and_errors():
    check_nf4_dequant("cuda", torch.bfloat16, 4096, 64, True, api=True)
    check_nf4_dequant_errors("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,block_size,scheme,misaligned", [
    (4096 * 1024, 64, "nf4", False), (1000, 64, "fp4", False), (771, 32, "nf4", False), (1027, 64, "fp4", True),
    (601, 2, "nf4", False), (300, 2, "fp4", True), (13288, 4096, "fp4", False), (13289, 4096, "nf4", True),
    (1, 64, "nf4", False), (1, 2, "fp4", False)])
def test_nf4_quantize(dtype, n, block_size, scheme, misaligned):
    """csrc/nf4.cu's quantize against reference.nf4, bit for bit: the vector and scalar paths, ties."""
    check_nf4_quant("cuda", dtype, n, block_size, scheme, misaligned)


@pytest.mark.gpu
@pytest.mark.parametrize("nb,special", [(1, False), (700, False), (1100, True), (65536, False)])
def test_nf4_double_quant(nb, special):
    check_nf4_double_quant("cuda", nb, special)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape,scheme,block_size,double", [
    (torch.bfloat16, (40, 70), "nf4", 64, True), (torch.float32, (3, 333), "fp4", 32, False),
    (torch.float16, (5, 4097), "fp4", 4096, True), (torch.bfloat16, (4096, 4096), "nf4", 64, True)])
def test_nf4_quantize_api_and_errors(dtype, shape, scheme, block_size, double):
    check_nf4_quant_api("cuda", dtype, shape, scheme, block_size, double)
    check_nf4_quant_errors("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("bits,scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("shape,axis,group_size", QUANT_CASES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_dequant_random_codes(out_dtype, bits, scheme, shape, axis, group_size, misaligned):
    check_dequant("cuda", out_dtype, shape, bits, scheme, axis, group_size, misaligned)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("shape,axis,group_size", [((37,), None, None), ((7, 33), 1, None), ((5, 6), None, 3),
                                                   ((9, 256), None, 128), ((300, 40), 0, None)])
def test_quant_writes_only_its_views(dtype, bits, scheme, shape, axis, group_size):
    check_quant_bounds("cuda", dtype, shape, bits, scheme, axis, group_size)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_special_tensors(dtype):
    check_quant_special_tensors("cuda", dtype)


@pytest.mark.gpu
def test_quant_errors_and_empty():
    check_quant_errors("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("shape,axis,group_size", [((9, 33), None, None), ((9, 33), 0, None), ((7, 40), None, 8)])
def test_quant_api_cuda_backend(dtype, bits, scheme, shape, axis, group_size):
    check_quant_api("cuda", dtype, shape, bits, scheme, axis, group_size)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 300])
@pytest.mark.parametrize("D,R", BOTTLENECK_SHAPES)
def test_adapter(dtype, M, D, R):
    check_adapter("cuda", dtype, M, D, R, "gelu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D,R", [(2048, 4096, 64), (2048, 1000, 256)])
def test_adapter_large(dtype, M, D, R):
    check_adapter("cuda", dtype, M, D, R, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", BOTTLENECK_ACTS)
@pytest.mark.parametrize("M,D,R", [(1, 100, 24), (300, 520, 200), (129, 4096, 64)])
def test_adapter_activations(dtype, activation, M, D, R):
    check_adapter("cuda", dtype, M, D, R, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D,R", [(1, 100, 24), (70, 136, 64), (300, 1000, 256)])
@pytest.mark.parametrize("x_layout", ["padded", "misaligned", "broadcast"])
@pytest.mark.parametrize("bias", [True, False])
def test_adapter_layouts(dtype, M, D, R, x_layout, bias):
    check_adapter("cuda", dtype, M, D, R, "gelu", x_layout, bias=bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D,R,n_split", [(1, 100, 24, 0), (70, 136, 64, 1), (300, 1000, 256, 3), (9, 4096, 16, 0)])
def test_adapter_writes_only_its_view(dtype, M, D, R, n_split):
    check_adapter_bounds("cuda", dtype, M, D, R, n_split=n_split)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", BOTTLENECK_ACTS)
def test_adapter_rounds_a(dtype, activation):
    check_adapter_rounds_a("cuda", dtype, activation)


@pytest.mark.gpu
def test_adapter_errors_and_empty():
    check_adapter_errors_and_empty("cuda")


def test_adapter_cpu_tensors_rejected():
    x, wd, bd, wu, bu = adapter_inputs(3, 8, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="need CUDA tensors.*cpu"):
        _cext.bottleneck_adapter_forward(x, wd, bd, wu, bu, "relu", 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 37, 300])
@pytest.mark.parametrize("K", [33, 1000])
@pytest.mark.parametrize("order", MULTI_ORDERS)
@pytest.mark.parametrize("tile", [1, 2])
def test_multi_lora_shrink(dtype, T, K, order, tile):
    check_multi_shrink("cuda", dtype, T, K, torch.int64 if T % 2 else torch.int32, order, tile)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K", [(1, 4096), (64, 4096), (2048, 4096)])  # decode, small batch, prefill (tile 0)
@pytest.mark.parametrize("order", MULTI_ORDERS)
def test_multi_lora_shrink_large(dtype, T, K, order):
    check_multi_shrink("cuda", dtype, T, K, torch.int64, order)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,split_k,slices", [(1, 4096, 0, 1), (7, 1000, 3, 4), (300, 777, 16, 2), (37, 96, 1, 16)])
@pytest.mark.parametrize("x_layout", ["padded", "misaligned"])
def test_multi_lora_shrink_split_slices_layouts(dtype, T, K, split_k, slices, x_layout):
    check_multi_shrink("cuda", dtype, T, K, torch.int64, "shuffled", 2, split_k, slices, x_layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 37, 300])
@pytest.mark.parametrize("N", [50, 136])
@pytest.mark.parametrize("order", MULTI_ORDERS)
@pytest.mark.parametrize("tile", [1, 2])
def test_multi_lora_expand(dtype, T, N, order, tile):
    check_multi_expand("cuda", dtype, T, N, torch.int32 if T % 2 else torch.int64, order, tile)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N", [(1, 4096), (64, 11008), (2048, 4096)])
@pytest.mark.parametrize("order", MULTI_ORDERS)
def test_multi_lora_expand_large(dtype, T, N, order):
    check_multi_expand("cuda", dtype, T, N, torch.int32, order)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,slices", [(1, 130, 1), (37, 1000, 3), (300, 136, 16)])
@pytest.mark.parametrize("y_layout", ["padded", "misaligned"])
def test_multi_lora_expand_slices_layouts(dtype, T, N, slices, y_layout):
    check_multi_expand("cuda", dtype, T, N, torch.int64, "sorted", 0, slices, y_layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,N", [(1, 4096, 4096), (64, 4096, 11008), (2048, 4096, 4096)])
@pytest.mark.parametrize("order", [None, "sorted"])
def test_multi_lora_flow(dtype, T, K, N, order):
    check_multi_lora_flow("cuda", dtype, T, K, N, order)


@pytest.mark.gpu
def test_multi_lora_errors_and_empty():
    check_multi_lora_errors_and_empty("cuda")


@pytest.mark.gpu
def test_multi_lora_cuda_graph():
    check_multi_lora_cuda_graph()


def test_multi_lora_cpu_tensors_rejected():
    x, A = torch.randn(3, 8), torch.randn(2, 4, 8)
    ranks, idx = torch.tensor([4, 2], dtype=torch.int32), torch.tensor([0, -1, 1])
    with pytest.raises(ValueError, match="need CUDA tensors.*cpu"):
        _cext.multi_lora_shrink(x, A, ranks, idx, torch.empty(3, 4))
    with pytest.raises(ValueError, match="need CUDA tensors.*cpu"):
        _cext.multi_lora_expand(torch.randn(3, 6), torch.randn(3, 4), torch.randn(2, 6, 4), ranks, torch.ones(2), idx)


# ---------------------------------------------------------------------------------------------
# the driver check at import (fastpeft._C links the static CUDA runtime of its nvcc): versions mocked


def test_driver_problem_versions():
    assert _cext.driver_problem(13000, 13000) is None
    assert _cext.driver_problem(13000, 13020) is None  # a newer driver
    assert _cext.driver_problem(12080, 12020) is None  # minor version compatibility
    assert _cext.driver_problem(13000, 0) is None  # no driver: no CUDA tensors, nothing to check
    why = _cext.driver_problem(13000, 12040)
    assert why is not None
    for part in ("CUDA 13.0", "CUDA 12.4", "580.65.06", "Triton", "update the NVIDIA driver", "CUDA_HOME",
                 "FASTPEFT_BUILD_CUDA=1"):
        assert part in why, (part, why)
    assert "Linux driver >= 525.60.13" in _cext.driver_problem(12020, 11080)


def _fake_extension(runtime: int, driver: int):
    return types.SimpleNamespace(cuda_runtime_version=lambda: runtime, cuda_driver_version=lambda: driver)


def test_check_driver_warns_once(monkeypatch):
    """check_driver: None (the import goes on) or why the import fails, with one warning per process."""
    monkeypatch.setattr(_cext, "_driver_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cext.check_driver(_fake_extension(13000, 13000)) is None
        assert _cext.check_driver(_fake_extension(13000, 0)) is None
    with pytest.warns(RuntimeWarning, match=r"built with CUDA 13\.0.*supports CUDA 12\.8 only") as record:
        why = _cext.check_driver(_fake_extension(13000, 12080))
    assert len(record) == 1 and why == str(record[0].message) and "update the NVIDIA driver" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second import attempt fails again, without a second warning
        assert _cext.check_driver(_fake_extension(13000, 12080)) == why


def test_old_driver_falls_back_to_triton(monkeypatch):
    """An import of fastpeft._C failing as its binding does when check_driver says why (ImportError with that
    text): the cuda backend is unavailable (saying why where it is forced), and auto picks the next backend,
    Triton, where cuda would have come first."""
    monkeypatch.setattr(_cext, "_driver_warned", False)
    real_import = importlib.import_module

    def import_module(name, package=None):
        if name == "fastpeft._C":
            why = _cext.check_driver(_fake_extension(13000, 12040))
            if why is not None:
                raise ImportError(why)
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    _backend._import_status.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="CUDA 12.4"):
            ok, why = _backend.cuda_ext_status()
        assert not ok and "CUDA 13.0" in why and "update the NVIDIA driver" in why
        cuda = torch.device("cuda")
        if _backend.triton_status()[0]:
            assert _backend.choose("int8_linear", cuda, ("cuda", "triton", "torch")) == "triton"
        assert _backend.choose("int8_linear", cuda, ("cuda", "torch")) == "torch"
        with pytest.raises(_backend.BackendUnavailableError, match="backend 'cuda' was forced.*CUDA 12.4"):
            _backend.choose("int8_linear", cuda, ("cuda", "triton", "torch"), "cuda")
    finally:
        _backend._import_status.cache_clear()


_STUB_API = """// fastpeft's C++ API as stubs, the versions from the environment: csrc/bindings.cpp's import, without CUDA
#include <cstdlib>
#include "fastpeft.h"
namespace fastpeft {
#define STUB(name, Params, FIELDS) void name(const Params&) {}
FASTPEFT_ENTRY_POINTS(STUB)
int cuda_device_count() { return 0; }
std::vector<int> compiled_archs() { return {}; }
int cuda_runtime_version() { return std::atoi(std::getenv("STUB_RUNTIME")); }
int cuda_driver_version() { return std::atoi(std::getenv("STUB_DRIVER")); }
}  // namespace fastpeft
"""

_STUB_IMPORT = """import importlib.machinery, importlib.util, sys, torch
stub = sys.argv[1]
class Finder:  # fastpeft._C from the stub build
    def find_spec(self, name, path=None, target=None):
        if name == "fastpeft._C":
            loader = importlib.machinery.ExtensionFileLoader(name, stub)
            return importlib.util.spec_from_file_location(name, stub, loader=loader)
sys.meta_path.insert(0, Finder())
from fastpeft import _backend
ok, why = _backend.cuda_ext_status()
print(ok)
print(_backend.choose("int8_linear", torch.device("cuda"), ("cuda", "triton", "torch")))
print(why)
"""


@pytest.fixture(scope="module")
def stub_extension(tmp_path_factory):
    """csrc/bindings.cpp built as fastpeft._C with stub kernels (g++ and pybind11's headers, no CUDA)."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path
    cxx = shutil.which("g++") or shutil.which("c++")
    try:
        import pybind11
        pybind_inc = pybind11.get_include()
    except ImportError:  # torch ships pybind11's headers
        pybind_inc = str(Path(torch.__file__).parent / "include")
    if cxx is None or not (Path(pybind_inc) / "pybind11" / "pybind11.h").is_file():
        pytest.skip("needs a C++ compiler and pybind11's headers")
    tmp = tmp_path_factory.mktemp("stub_ext")
    (tmp / "stub.cpp").write_text(_STUB_API)
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    out = tmp / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([cxx, "-O0", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-shared", f"-I{pybind_inc}",
                    f"-I{sysconfig.get_paths()['include']}", f"-I{csrc}", str(csrc / "bindings.cpp"),
                    str(tmp / "stub.cpp"), "-o", str(out)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("driver,imports", [(13000, True), (0, True), (12040, False)])
def test_binding_import_checks_the_driver(stub_extension, driver, imports):
    """The real binding's import with the versions mocked: a driver older than the runtime (13.0) fails the
    import with one warning saying why; fastpeft then runs the Triton kernels where cuda came first."""
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "STUB_RUNTIME": "13000", "STUB_DRIVER": str(driver), "PYTHONWARNINGS": "default"}
    res = subprocess.run([sys.executable, "-c", _STUB_IMPORT, str(stub_extension)], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert res.returncode == 0, res.stderr
    ok, chosen, why = res.stdout.splitlines()[:3]
    warned = [line for line in res.stderr.splitlines() if "RuntimeWarning: fastpeft._C" in line]
    if imports:
        assert (ok, chosen) == ("True", "cuda") and not warned, res.stdout + res.stderr
    else:
        assert (ok, chosen) == ("False", "triton" if _backend.triton_status()[0] else "torch"), res.stdout
        assert "ImportError: fastpeft._C (the CUDA C++ kernels) was built with CUDA 13.0" in why
        assert "CUDA 12.4 only" in why and "update the NVIDIA driver" in why
        assert len(warned) == 1, res.stderr


# ---------------------------------------------------------------------------------------------
# the int8 layer's backward: dx = dy W_deq with the weight dequantized inside the GEMM


def _w_layout(w: torch.Tensor, kind: str) -> torch.Tensor:
    """The int8 [N, K] weight in another layout: padded rows, rows one byte past 16-byte alignment, or a
    transposed view (column stride != 1: element loads)."""
    N, K = w.shape
    if kind in ("padded", "misaligned"):
        big = torch.zeros(N, K + 19, dtype=torch.int8, device=w.device)
        off = 1 if kind == "misaligned" else 0
        big[:, off:off + K] = w
        return big[:, off:off + K]
    if kind == "transposed":
        return w.t().contiguous().t()
    return w.contiguous()


def int8_dequant_inputs(M, N, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + M * 131 + N * 17 + K)
    w_int8, w_scale = ref_int8.quantize_weight(torch.randn(N, K, generator=g) * 0.05)
    w_scale[N // 2] = 0.0  # an all-zero row of W_deq
    dy = torch.randn(M, N, generator=g)
    return dy.to(device, dtype), w_int8.to(device), w_scale.to(device)


def int8_dequant_ref(dy, w_int8, w_scale):
    """float64 dy @ W_deq, with W_deq the reference's fp32 dequantize_weight."""
    return dy.cpu().double() @ ref_int8.dequantize_weight(w_int8.cpu(), w_scale.cpu()).double()


def check_int8_dequant_matmul(device, dtype, M, N, K, dy_layout="contiguous", w_layout="contiguous", tile=0):
    from _cuda_checks import layout
    dy, w, ws = int8_dequant_inputs(M, N, K, dtype, device)
    dx = _cext.int8_dequant_matmul(layout(dy, dy_layout), _w_layout(w, w_layout), ws, tile=tile)
    assert dx.dtype == dtype and dx.shape == (M, K) and dx.is_contiguous()
    err = rel_err(dx, int8_dequant_ref(dy, w, ws))
    assert err <= TOL[dtype], f"relative error {err:.3e} > {TOL[dtype]:.0e}"


def check_int8_dequant_matmul_bounds(device, dtype, M, N, K, tile=0):
    """The binding directly: dx a view inside a NaN buffer (every element written, padding untouched)."""
    C = _cext._extension()
    dy, w, ws = int8_dequant_inputs(M, N, K, dtype, device, seed=1)
    buf = torch.full((M + 2, K + 3), float("nan"), dtype=dtype, device=device)
    dx = buf[1:-1, 2:-1]
    C.int8_dequant_matmul(dy=dy.data_ptr(), s_dm=dy.stride(0), s_dn=dy.stride(1), w=w.data_ptr(), s_wn=w.stride(0),
                          s_wk=w.stride(1), w_scale=ws.data_ptr(), dx=dx.data_ptr(), s_xm=dx.stride(0), M=M, N=N, K=K,
                          dtype=_cext._DTYPE_CODES[dtype], tile=tile, device=dy.device.index or 0,
                          stream=torch.cuda.current_stream().cuda_stream if dy.is_cuda else 0)
    assert rel_err(dx, int8_dequant_ref(dy, w, ws)) <= TOL[dtype]
    pad = buf.clone()
    pad[1:-1, 2:-1] = float("nan")
    assert torch.isnan(pad).all(), "int8_dequant_matmul wrote outside dx"


def check_int8_dequant_matmul_errors_and_empty(device):
    dy, w, ws = int8_dequant_inputs(4, 6, 8, torch.float32, device)
    with pytest.raises(TypeError, match="w_int8 has dtype"):
        _cext.int8_dequant_matmul(dy, w.float(), ws)
    with pytest.raises(TypeError, match="dy has dtype"):
        _cext.int8_dequant_matmul(dy.double(), w, ws)
    with pytest.raises(ValueError, match="disagree on N"):
        _cext.int8_dequant_matmul(dy[:, :5], w, ws)
    with pytest.raises(ValueError, match="w_scale has shape"):
        _cext.int8_dequant_matmul(dy, w, ws[:5])
    with pytest.raises(ValueError, match="tile"):
        _cext.int8_dequant_matmul(dy, w, ws, tile=4)
    assert _cext.int8_dequant_matmul(dy[:0], w, ws).shape == (0, 8)
    assert _cext.int8_dequant_matmul(dy, w[:, :0], ws).shape == (4, 0)
    dx = _cext.int8_dequant_matmul(dy[:, :0], w[:0], ws[:0])  # N = 0: dx = 0
    assert dx.shape == (4, 8) and torch.equal(dx, torch.zeros_like(dx))


def check_int8_linear_backward(device, dtype, lead, K, N, threshold=6.0):
    """fastpeft.int8_linear(backend="cuda"): dx (and the bias gradient) against the reference's fp32 W_deq."""
    g = torch.Generator().manual_seed(K + N)
    w_int8, w_scale = ref_int8.quantize_weight(torch.randn(N, K, generator=g) * 0.05)
    w_int8, w_scale = w_int8.to(device), w_scale.to(device)
    x = torch.randn(*lead, K, generator=g).to(device, dtype).requires_grad_()
    bias = torch.randn(N, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(*lead, N, generator=g).to(device, dtype)
    y = fastpeft.int8_linear(x, w_int8, w_scale, bias, threshold, backend="cuda")
    y.backward(dy)
    ref = int8_dequant_ref(dy.reshape(-1, N), w_int8, w_scale).reshape(*lead, K)
    assert x.grad.dtype == dtype and rel_err(x.grad, ref) <= TOL[dtype]
    assert rel_err(bias.grad, dy.double().reshape(-1, N).sum(0)) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 37, 130), (7, 64, 256), (130, 64, 144), (300, 1000, 1000), (33, 40, 64),
                                   (2048, 4096, 1024)])
@pytest.mark.parametrize("tile", [0, 1, 2, 3])
def test_int8_dequant_matmul(dtype, M, N, K, tile):
    check_int8_dequant_matmul("cuda", dtype, M, N, K, tile=tile)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dy_layout", ["transposed", "strided", "misaligned"])
@pytest.mark.parametrize("w_layout", ["contiguous", "padded", "misaligned", "transposed"])
def test_int8_dequant_matmul_layouts(dtype, dy_layout, w_layout):
    check_int8_dequant_matmul("cuda", dtype, 70, 100, 96, dy_layout, w_layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,tile", [(9, 40, 70, 0), (70, 64, 130, 2), (130, 64, 144, 1), (5, 64, 256, 3)])
def test_int8_dequant_matmul_writes_only_its_view(dtype, M, N, K, tile):
    check_int8_dequant_matmul_bounds("cuda", dtype, M, N, K, tile)


@pytest.mark.gpu
def test_int8_dequant_matmul_errors_and_empty():
    check_int8_dequant_matmul_errors_and_empty("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N", [((3, 5), 48, 40), ((300,), 1000, 130), ((2, 1024), 4096, 4096)])
def test_int8_linear_backward_cuda_backend(dtype, lead, K, N):
    check_int8_linear_backward("cuda", dtype, lead, K, N)
