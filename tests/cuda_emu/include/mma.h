// Host stand-in for the nvcuda::wmma API csrc/ uses (tests/cuda_emu; NOT CUDA).
//
// A fragment holds its whole tile, row-major in x[] (the real distribution of elements over the
// lanes is unspecified by CUDA, and csrc only touches fragments element-wise). Every wmma call
// acts in lane 0 of the warp only: lane 0's fragments start as NaN, the other lanes' are never
// written, and lane 0's stores put in memory what the warp's would. Numerics: fp16/bf16 products
// are exact; __float_to_tf32 rounds to 10 mantissa bits (nearest, ties away from zero), and mma_sync
// truncates tf32 operands to those bits (a no-op on converted values; an operand csrc forgot to
// convert loses precision instead of passing silently); each mma_sync sums in double and rounds
// once to fp32 (the tensor cores' internal accumulation order and precision are not modelled).
// int8: signed char operands (poisoned with -128, a code the kernels never produce) and int
// accumulators (poisoned with 0x7F7F7F7F); mma_sync sums exactly and wraps to int32 like the hardware.
#pragma once
#include <cstdio>
#include <limits>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

inline bool lane0() { return threadIdx.x % 32 == 0; }
// wmma's requirements on memory operands: a 256-bit aligned pointer, ldm a multiple of 16 bytes
inline void check_operand(const char* fn, const void* p, unsigned ldm, size_t element_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm * element_bytes % 16 != 0) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s: pointer %p not 32-byte aligned or ldm %u not a multiple of 16 bytes", fn,
                  p, ldm);
    emu::fault(msg);
  }
}
inline double value(float v) { return v; }
inline double value(__half v) { return __half2float(v); }
inline double value(__nv_bfloat16 v) { return __bfloat162float(v); }
inline double tf32_value(float v) { return __uint_as_float(__float_as_uint(v) & 0xFFFFE000u); }
template <typename E> E nan() { return std::numeric_limits<E>::quiet_NaN(); }
template <> inline __half nan<__half>() { return __half{0x7E00}; }
template <> inline __nv_bfloat16 nan<__nv_bfloat16>() { return __nv_bfloat16{0x7FC0}; }
template <> inline signed char nan<signed char>() { return -128; }  // "never loaded" poison of int types
template <> inline int nan<int>() { return 0x7F7F7F7F; }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = typename detail::storage<T>::type;
  element_type x[num_elements];
  fragment() {
    if (detail::lane0()) {
      for (auto& e : x) e = detail::nan<element_type>();
    }
  }
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  if (!detail::lane0()) return;
  detail::check_operand("load_matrix_sync", p, ldm, sizeof(P));
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K> void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  if (!detail::lane0()) return;
  for (auto& e : f.x) e = v;
}

// d = a b + c
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!detail::lane0()) return;
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) {
        if constexpr (std::is_same_v<T, precision::tf32>) {
          s += detail::tf32_value(a.x[i * K + k]) * detail::tf32_value(b.x[k * N + j]);
        } else {
          s += detail::value(a.x[i * K + k]) * detail::value(b.x[k * N + j]);
        }
      }
      out[i * N + j] = static_cast<float>(s);
    }
  std::memcpy(d.x, out, sizeof(out));
}

// d = a b + c on int8 operands, exact in int64 and wrapped to int32 (s32 accumulation)
template <int M, int N, int K, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, int>& d, const fragment<matrix_a, M, N, K, signed char, LA>& a,
              const fragment<matrix_b, M, N, K, signed char, LB>& b, const fragment<accumulator, M, N, K, int>& c) {
  if (!detail::lane0()) return;
  int out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      int64_t s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += int64_t{a.x[i * K + k]} * int64_t{b.x[k * N + j]};
      out[i * N + j] = static_cast<int>(static_cast<uint32_t>(s));
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K> void fill_fragment(fragment<accumulator, M, N, K, int>& f, int v) {
  if (!detail::lane0()) return;
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K>
void store_matrix_sync(int* p, const fragment<accumulator, M, N, K, int>& f, unsigned ldm, layout_t layout) {
  if (!detail::lane0()) return;
  detail::check_operand("store_matrix_sync", p, ldm, sizeof(int));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (!detail::lane0()) return;
  detail::check_operand("store_matrix_sync", p, ldm, sizeof(float));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

inline float __float_to_tf32(float v) {  // cvt.rna.tf32.f32: 10 mantissa bits, ties away from zero
  const uint32_t b = __float_as_uint(v);
  if ((b & 0x7F800000u) == 0x7F800000u) return v;  // inf, NaN
  return __uint_as_float((b + 0x1000u) & 0xFFFFE000u);
}

}  // namespace wmma
}  // namespace nvcuda
