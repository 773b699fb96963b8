// fastpeft._C's C++ API, declared once: the .cu files define these entry points,
// csrc/bindings.cpp exposes them to Python (keyword arguments named as the fields), and the host
// emulator of tests/cuda_emu runs them (its device reads the fields in this order; emulator.py
// reads this file for the names, kinds and defaults).
//
// Each entry point takes one parameter struct. Its fields are listed once, in an X-macro
// F(kind, name, default), where default `required` means the caller must give it (the bindings
// reject a call without it; in the struct it reads 0); kind is one of
//   ptr     a device pointer (uintptr_t; 0: none)      i64   int64_t (sizes, element strides)
//   i32     int                                        u32   uint32_t
//   flag    bool                                       f32   float
//   stream  a cudaStream_t, as an integer (uintptr_t)
// Tensors arrive as raw device pointers with element strides, a dtype code (0 float32,
// 1 float16, 2 bfloat16) and the device index; no libtorch.
#pragma once

#include <cstdint>
#include <vector>

namespace fastpeft {
// The default of a field that has none: converts to a zero of any kind.
struct Required {
  template <typename T>
  constexpr operator T() const {
    return T{};
  }
};
inline constexpr Required required{};
constexpr bool is_required(Required) { return true; }
template <typename T>
constexpr bool is_required(T) {
  return false;
}
}  // namespace fastpeft

#define FASTPEFT_KIND_ptr uintptr_t
#define FASTPEFT_KIND_i64 int64_t
#define FASTPEFT_KIND_i32 int
#define FASTPEFT_KIND_u32 uint32_t
#define FASTPEFT_KIND_flag bool
#define FASTPEFT_KIND_f32 float
#define FASTPEFT_KIND_stream uintptr_t
#define FASTPEFT_FIELD(kind, name, init) FASTPEFT_KIND_##kind name = init;
// Inside an entry point's definition (a .cu file): its fields as local variables, the stream as
// a cudaStream_t.
#define FASTPEFT_LOCAL_ptr(v) (v)
#define FASTPEFT_LOCAL_i64(v) (v)
#define FASTPEFT_LOCAL_i32(v) (v)
#define FASTPEFT_LOCAL_u32(v) (v)
#define FASTPEFT_LOCAL_flag(v) (v)
#define FASTPEFT_LOCAL_f32(v) (v)
#define FASTPEFT_LOCAL_stream(v) reinterpret_cast<cudaStream_t>(v)
#define FASTPEFT_UNPACK(kind, name, init) [[maybe_unused]] auto name = FASTPEFT_LOCAL_##kind(p.name);

// U[m, r] = out_scale * sum_k dropout(X)[m, k] * A[r, k] into fp32 U (overwritten).
#define FASTPEFT_LORA_SHRINK(F)                                                            \
  F(ptr, x, required) F(i64, s_xm, required) F(i64, s_xk, required) F(ptr, a, required)    \
  F(i64, s_ar, required) F(i64, s_ak, required) F(ptr, u, required) F(i64, s_um, required) \
  F(i64, s_ur, required) F(i64, M, required) F(i64, K, required) F(i64, R, required)       \
  F(i32, dtype, required) F(f32, out_scale, 1.0f) F(flag, dropout, false) F(ptr, seed, 0)  \
  F(u32, thr31, 0u) F(i64, split_k, 0) F(i32, device, 0) F(stream, stream, 0)

// Y[m, n] += scaling * keep(m, n) * drop_scale * sum_r U[m, r] * B[n, r] in place.
#define FASTPEFT_LORA_EXPAND(F)                                                            \
  F(ptr, y, required) F(i64, s_ym, required) F(i64, s_yn, required) F(ptr, u, required)    \
  F(i64, s_um, required) F(i64, s_ur, required) F(ptr, b, required) F(i64, s_bn, required) \
  F(i64, s_br, required) F(i64, M, required) F(i64, N, required) F(i64, R, required)       \
  F(i32, dtype, required) F(f32, scaling, 1.0f) F(flag, dropout, false) F(ptr, seed, 0)    \
  F(u32, thr31, 0u) F(f32, drop_scale, 1.0f) F(i32, device, 0) F(stream, stream, 0)

// Many adapters: U[i, r] = sum_k X[i, k] * A[indices[i], r, k] for r < its rank.
#define FASTPEFT_MULTI_LORA_SHRINK(F)                                                              \
  F(ptr, x, required) F(i64, s_xm, required) F(i64, s_xk, required) F(ptr, a, required)            \
  F(i64, s_aa, required) F(i64, s_ar, required) F(i64, s_ak, required) F(ptr, u, required)         \
  F(i64, s_um, required) F(i64, s_ur, required) F(ptr, ranks, required) F(ptr, indices, required)  \
  F(i32, index_bits, required) F(ptr, row_order, required) F(i64, M, required) F(i64, K, required) \
  F(i64, R, required) F(i64, n, required) F(i32, dtype, required) F(i32, tile, 0)                  \
  F(i64, split_k, 0) F(i64, slices, 0) F(i32, device, 0) F(stream, stream, 0)

// Many adapters: Y[i, n] += scalings[a] * sum_{r < rank} U[i, r] * B[a, n, r], a = indices[i].
#define FASTPEFT_MULTI_LORA_EXPAND(F)                                                              \
  F(ptr, y, required) F(i64, s_ym, required) F(i64, s_yn, required) F(ptr, u, required)            \
  F(i64, s_um, required) F(i64, s_ur, required) F(ptr, b, required) F(i64, s_ba, required)         \
  F(i64, s_bn, required) F(i64, s_br, required) F(ptr, ranks, required) F(ptr, scalings, required) \
  F(ptr, indices, required) F(i32, index_bits, required) F(ptr, row_order, required)               \
  F(i64, M, required) F(i64, N, required) F(i64, R, required) F(i64, n, required)                  \
  F(i32, dtype, required) F(i32, tile, 0) F(i64, slices, 0) F(i32, device, 0) F(stream, stream, 0)

// LLM.int8() row quantization of X [M, K]: codes, row scales, outlier column flags.
#define FASTPEFT_INT8_QUANT_ROWS(F)                                                          \
  F(ptr, x, required) F(i64, s_xm, required) F(i64, s_xk, required) F(ptr, q, required)      \
  F(i64, s_qm, required) F(ptr, row_scale, required) F(i64, M, required) F(i64, K, required) \
  F(i32, dtype, required) F(f32, threshold, 0.0f) F(ptr, col_flags, 0) F(i32, device, 0)     \
  F(stream, stream, 0)

// The int8 GEMM with its dequantizing epilogue and the 16-bit outlier columns.
#define FASTPEFT_INT8_GEMM(F)                                                                       \
  F(ptr, q, required) F(i64, s_qm, required) F(ptr, row_scale, required) F(ptr, w, required)        \
  F(i64, s_wn, required) F(ptr, w_scale, required) F(ptr, y, required) F(i64, s_ym, required)       \
  F(i64, M, required) F(i64, N, required) F(i64, K, required) F(i32, dtype, required)               \
  F(ptr, bias, 0) F(ptr, x, 0) F(i64, s_xm, 0) F(i64, s_xk, 0) F(ptr, col_flags, 0) F(ptr, cols, 0) \
  F(i64, n_cols, 0) F(ptr, count, 0) F(i32, tile, 0) F(i32, device, 0) F(stream, stream, 0)

// dx = dy W_deq, W_deq[n, k] = w[n, k] * w_scale[n] / 127: the int8 layer's gradient w.r.t. its input.
#define FASTPEFT_INT8_DEQUANT_MATMUL(F)                                                             \
  F(ptr, dy, required) F(i64, s_dm, required) F(i64, s_dn, required) F(ptr, w, required)           \
  F(i64, s_wn, required) F(i64, s_wk, required) F(ptr, w_scale, required) F(ptr, dx, required)     \
  F(i64, s_xm, required) F(i64, M, required) F(i64, N, required) F(i64, K, required)               \
  F(i32, dtype, required) F(i32, tile, 0) F(i32, device, 0) F(stream, stream, 0)

// Absmax / zero-point quantization of a contiguous tensor (geometry: outer, C, inner, last).
#define FASTPEFT_QUANT_QUANTIZE(F)                                                             \
  F(ptr, x, required) F(ptr, q, required) F(ptr, scale, required) F(ptr, zero_point, required) \
  F(i64, outer, required) F(i64, C, required) F(i64, inner, required) F(i64, last, required)   \
  F(i32, mode, required) F(i64, group_size, required) F(i32, bits, required)                   \
  F(i32, scheme, required) F(i32, dtype, required) F(i32, device, 0) F(stream, stream, 0)

// y = (code - zero_point[slot]) * scale[slot], the geometry of quant_quantize.
#define FASTPEFT_QUANT_DEQUANTIZE(F)                                                           \
  F(ptr, q, required) F(ptr, scale, required) F(ptr, zero_point, required) F(ptr, y, required) \
  F(i64, outer, required) F(i64, C, required) F(i64, inner, required) F(i64, last, required)   \
  F(i32, mode, required) F(i64, group_size, required) F(i32, bits, required)                   \
  F(i32, scheme, required) F(i32, dtype, required) F(i32, device, 0) F(stream, stream, 0)

// The fused bottleneck adapter forward: y = x + scaling * (act(x W_d^T + b_d) W_u^T + b_u).
#define FASTPEFT_BOTTLENECK_ADAPTER_FORWARD(F)                                            \
  F(ptr, x, required) F(i64, s_xm, required) F(ptr, wd, required) F(ptr, bd, required)    \
  F(ptr, wu, required) F(ptr, bu, required) F(ptr, y, required) F(i64, s_ym, required)    \
  F(i64, M, required) F(i64, D, required) F(i64, R, required) F(i32, dtype, required)     \
  F(i32, activation, required) F(f32, scaling, 1.0f) F(i64, n_split, 0) F(i32, device, 0) \
  F(stream, stream, 0)

// NF4 / FP4 dequantize, bitsandbytes' layout: y[e] = code[nibble e of data] * absmax[e / block_size]
// (nested given: double quantization, absmax holds uint8 codes, restored as
// dyn[absmax[b]] * nested[b / 256] + offset[0]); y contiguous, n elements of dtype.
#define FASTPEFT_NF4_DEQUANTIZE(F)                                                             \
  F(ptr, data, required) F(ptr, absmax, required) F(ptr, nested, 0) F(ptr, offset, 0)          \
  F(ptr, code, required) F(ptr, dyn, 0) F(ptr, y, required) F(i64, n, required)                 \
  F(i64, block_size, required) F(i32, dtype, required) F(i32, device, 0) F(stream, stream, 0)

// NF4 / FP4 quantize, bitsandbytes' layout: x (n elements of dtype, contiguous) -> q (uint8
// [ceil(n / 2)], element 2j in the high nibble of byte j) and absmax (float32 [ceil(n / block_size)]);
// mids: the 15 float32 midpoints of the sorted table; order: nibble p = the code of sorted
// position p, 0 for the identity (NF4).
#define FASTPEFT_NF4_QUANTIZE(F)                                                                \
  F(ptr, x, required) F(ptr, q, required) F(ptr, absmax, required) F(ptr, mids, required)        \
  F(i64, order, 0) F(i64, n, required) F(i64, block_size, required) F(i32, dtype, required)      \
  F(i32, device, 0) F(stream, stream, 0)

// Double quantization of n float32 absmax values around offset[0] (their mean, from the caller)
// in blocks of 256: q8 (uint8 [n]) and nested (float32 [ceil(n / 256)]); mids: the 255 float32
// midpoints of the dynamic map (and a 256th entry, read, unused).
#define FASTPEFT_NF4_DOUBLE_QUANT(F)                                                            \
  F(ptr, absmax, required) F(ptr, offset, required) F(ptr, q8, required) F(ptr, nested, required) \
  F(ptr, mids, required) F(i64, n, required) F(i32, device, 0) F(stream, stream, 0)

// Every entry point: E(name, Params, FIELDS).
#define FASTPEFT_ENTRY_POINTS(E)                                                                   \
  E(lora_shrink, LoraShrinkParams, FASTPEFT_LORA_SHRINK)                                           \
  E(lora_expand, LoraExpandParams, FASTPEFT_LORA_EXPAND)                                           \
  E(multi_lora_shrink, MultiLoraShrinkParams, FASTPEFT_MULTI_LORA_SHRINK)                          \
  E(multi_lora_expand, MultiLoraExpandParams, FASTPEFT_MULTI_LORA_EXPAND)                          \
  E(int8_quant_rows, Int8QuantRowsParams, FASTPEFT_INT8_QUANT_ROWS)                                \
  E(int8_gemm, Int8GemmParams, FASTPEFT_INT8_GEMM)                                                 \
  E(int8_dequant_matmul, Int8DequantMatmulParams, FASTPEFT_INT8_DEQUANT_MATMUL)                    \
  E(quant_quantize, QuantQuantizeParams, FASTPEFT_QUANT_QUANTIZE)                                  \
  E(quant_dequantize, QuantDequantizeParams, FASTPEFT_QUANT_DEQUANTIZE)                            \
  E(nf4_dequantize, Nf4DequantizeParams, FASTPEFT_NF4_DEQUANTIZE)                                  \
  E(nf4_quantize, Nf4QuantizeParams, FASTPEFT_NF4_QUANTIZE)                                        \
  E(nf4_double_quant, Nf4DoubleQuantParams, FASTPEFT_NF4_DOUBLE_QUANT)                             \
  E(bottleneck_adapter_forward, BottleneckAdapterForwardParams, FASTPEFT_BOTTLENECK_ADAPTER_FORWARD)

namespace fastpeft {

#define FASTPEFT_DECLARE_ENTRY(name, Params, FIELDS) \
  struct Params {                                    \
    FIELDS(FASTPEFT_FIELD)                           \
  };                                                 \
  void name(const Params& p);
FASTPEFT_ENTRY_POINTS(FASTPEFT_DECLARE_ENTRY)
#undef FASTPEFT_DECLARE_ENTRY

int cuda_device_count();          // CUDA devices this module's runtime sees (0 without a driver or GPU)
std::vector<int> compiled_archs();  // the sm_XX targets built into the module
int cuda_runtime_version();         // CUDART_VERSION the module was built and linked with (1000 * major + 10 * minor)
int cuda_driver_version();          // the CUDA version the installed driver supports (cudaDriverGetVersion; 0: none)

}  // namespace fastpeft
