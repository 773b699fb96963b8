"""The CUDA C++ extension fastpeft._C: build, argument checks, and kernels vs float64 references.

Build checks run wherever nvcc is (CI included): the extension must have been built.
Kernel checks need a GPU (marked ``gpu``); the ``check_*`` helpers take the device so the
same checks can also drive a host emulation of the kernels."""
from __future__ import annotations

import os

import pytest
import torch

import fastpeft
from fastpeft.ops import _cext
from fastpeft.reference.dropout import dropout_threshold

HAS_GPU = torch.cuda.is_available()

from _cuda_checks import (BOTTLENECK_ACTS, BOTTLENECK_SHAPES, DTYPES, INT8_SPECIAL, MULTI_ORDERS, QUANT_CASES,
                          QUANT_SCHEMES, _expected_archs, _nvcc, adapter_inputs, check_adapter,
                          check_adapter_bounds, check_adapter_errors_and_empty, check_adapter_rounds_a,
                          check_dequant, check_dropout_masks, check_empty, check_expand, check_expand_bounds,
                          check_int8_errors_and_empty, check_int8_gemm, check_int8_gemm_bad_cols,
                          check_int8_gemm_bounds, check_int8_linear_flow, check_int8_quant,
                          check_int8_quant_bounds, check_lora_linear, check_multi_expand,
                          check_multi_lora_cuda_graph, check_multi_lora_errors_and_empty, check_multi_lora_flow,
                          check_multi_shrink, check_quant, check_quant_api, check_quant_bounds, check_quant_errors,
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
