// Shared pieces of the fastpeft CUDA kernels: error checks, the dropout hash,
// element-type conversion and dispatch, and warp-level tensor-core tile products.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastpeft.h"

namespace fastpeft {

// ---------------------------------------------------------------------------------------------
// errors: every CUDA call and launch is checked; failures become std::runtime_error, which
// pybind11 turns into a Python RuntimeError naming the function.

inline void check_cuda(cudaError_t err, const char* func, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastpeft._C.") + func + ": " + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

#define FP_CUDA_CHECK(func, call) ::fastpeft::check_cuda((call), (func), #call)
#define FP_CHECK_LAUNCH(func) ::fastpeft::check_cuda(cudaGetLastError(), (func), "kernel launch")

inline void require(bool ok, const char* func, const std::string& msg) {
  if (!ok) throw std::invalid_argument(std::string("fastpeft._C.") + func + ": " + msg);
}

// ---------------------------------------------------------------------------------------------
// counter-based dropout, bit-identical to fastpeft/reference/dropout.py:
//   h(seed, i, j) = mix32(mix32(seed ^ mix32(i)) ^ j);  keep = (h >> 1) >= thr31

__host__ __device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

__host__ __device__ __forceinline__ uint32_t dropout_row_key(uint32_t seed, uint32_t row) {
  return mix32(seed ^ mix32(row));
}

__host__ __device__ __forceinline__ bool dropout_keep(uint32_t row_key, uint32_t col, uint32_t thr31) {
  return (mix32(row_key ^ col) >> 1) >= thr31;
}

// ---------------------------------------------------------------------------------------------
// element types: the dtype codes of the Python wrappers

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte vector access.
template <typename T> constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

// Bit-level element access on a uint4 holding vec_width<T>() elements; with `j` a constant
// (unrolled loops) everything stays in registers.
__device__ __forceinline__ uint32_t vec_word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}
__device__ __forceinline__ void vec_set_word(uint4& v, int w, uint32_t x) {
  if (w == 0) v.x = x;
  else if (w == 1) v.y = x;
  else if (w == 2) v.z = x;
  else v.w = x;
}

template <typename T> __device__ __forceinline__ float bits_to_float(uint32_t b);
template <> __device__ __forceinline__ float bits_to_float<float>(uint32_t b) { return __uint_as_float(b); }
template <> __device__ __forceinline__ float bits_to_float<__half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint32_t b) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
}

template <typename T> __device__ __forceinline__ uint32_t float_to_bits(float x);
template <> __device__ __forceinline__ uint32_t float_to_bits<float>(float x) { return __float_as_uint(x); }
template <> __device__ __forceinline__ uint32_t float_to_bits<__half>(float x) {
  return __half_as_ushort(__float2half_rn(x));
}
template <> __device__ __forceinline__ uint32_t float_to_bits<__nv_bfloat16>(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

template <typename T> __device__ __forceinline__ float vec_get(const uint4& v, int j) {
  constexpr int per_word = 4 / static_cast<int>(sizeof(T)), bits = 8 * static_cast<int>(sizeof(T));
  const uint32_t w = vec_word(v, j / per_word);
  return bits_to_float<T>(per_word == 1 ? w : (w >> (bits * (j % per_word))) & 0xFFFFu);
}

template <typename T> __device__ __forceinline__ void vec_put(uint4& v, int j, float x) {
  constexpr int per_word = 4 / static_cast<int>(sizeof(T)), bits = 8 * static_cast<int>(sizeof(T));
  if (per_word == 1) {
    vec_set_word(v, j, float_to_bits<T>(x));
  } else {
    const int shift = bits * (j % per_word);
    const uint32_t w = vec_word(v, j / per_word) & ~(0xFFFFu << shift);
    vec_set_word(v, j / per_word, w | (float_to_bits<T>(x) << shift));
  }
}

// Zeroes element j (exact for every T: all-zero bits are +0).
template <typename T> __device__ __forceinline__ void vec_clear(uint4& v, int j) {
  constexpr int per_word = 4 / static_cast<int>(sizeof(T)), bits = 8 * static_cast<int>(sizeof(T));
  const uint32_t keep_bits = per_word == 1 ? 0u : ~(0xFFFFu << (bits * (j % per_word)));
  vec_set_word(v, j / per_word, vec_word(v, j / per_word) & keep_bits);
}

inline bool aligned16(uintptr_t p) { return (p & 15u) == 0; }

// Calls f(T{}) with T the element type of `dtype`.
template <typename F> void dispatch_dtype(int dtype, const char* func, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: require(false, func, "unsupported dtype code " + std::to_string(dtype));
  }
}

// ---------------------------------------------------------------------------------------------
// warp tile products on tensor cores (nvcuda::wmma, sm_80+), fp32 accumulation.
//
// WarpMma<S, PASSES>::run accumulates acc[j] += A[16 x k] * B_j[k x 16] for NF column
// fragments j, where A is row-major in shared memory (element (i, k) at a[i * lda + k]) and
// B_j is column-major (element (k, c) at b[(j * 16 + c) * ldb + k]). S is the staged type:
// __half / __nv_bfloat16 use m16n16k16 (exact products); float uses TF32 m16n16k8, with
// PASSES = 3 splitting both operands into TF32 hi + lo parts (a_hi b_hi + a_hi b_lo + a_lo b_hi),
// which is accurate to about 2^-21, and PASSES = 1 a single TF32 product. `nf` (<= NF, default
// all) limits the product to the first nf column fragments; the others are left untouched.

template <typename S, int PASSES> struct WarpMma;

template <typename S> struct WarpMma16 {
  static constexpr int KS = 16;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, S, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, S, nvcuda::wmma::col_major>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

  template <int NF>
  __device__ __forceinline__ static void run(Acc (&acc)[NF], const S* a, int lda, const S* b, int ldb, int klen,
                                             int nf = NF) {
#pragma unroll 1
    for (int k = 0; k < klen; k += KS) {
      FragA fa;
      nvcuda::wmma::load_matrix_sync(fa, a + k, lda);
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        if (j >= nf) break;
        FragB fb;
        nvcuda::wmma::load_matrix_sync(fb, b + j * 16 * ldb + k, ldb);
        nvcuda::wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
};

template <> struct WarpMma<__half, 1> : WarpMma16<__half> {};
template <> struct WarpMma<__nv_bfloat16, 1> : WarpMma16<__nv_bfloat16> {};

template <int PASSES> struct WarpMma<float, PASSES> {
  static_assert(PASSES == 1 || PASSES == 3, "TF32 products take 1 or 3 passes");
  static constexpr int KS = 8;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                       nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                       nvcuda::wmma::col_major>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;

  template <typename Frag>
  __device__ __forceinline__ static void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
      const float v = hi.x[i];
      hi.x[i] = nvcuda::wmma::__float_to_tf32(v);
      if (PASSES == 3) lo.x[i] = nvcuda::wmma::__float_to_tf32(v - hi.x[i]);
    }
  }

  template <int NF>
  __device__ __forceinline__ static void run(Acc (&acc)[NF], const float* a, int lda, const float* b, int ldb,
                                             int klen, int nf = NF) {
#pragma unroll 1
    for (int k = 0; k < klen; k += KS) {
      FragA a_hi, a_lo;
      nvcuda::wmma::load_matrix_sync(a_hi, a + k, lda);
      split(a_hi, a_lo);
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        if (j >= nf) break;
        FragB b_hi, b_lo;
        nvcuda::wmma::load_matrix_sync(b_hi, b + j * 16 * ldb + k, ldb);
        split(b_hi, b_lo);
        if (PASSES == 3) {
          nvcuda::wmma::mma_sync(acc[j], a_lo, b_hi, acc[j]);
          nvcuda::wmma::mma_sync(acc[j], a_hi, b_lo, acc[j]);
        }
        nvcuda::wmma::mma_sync(acc[j], a_hi, b_hi, acc[j]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// host-side helpers shared by the launchers

constexpr int kMaxDevices = 64;

// Makes `device` current for the launch and restores the caller's device afterwards (this
// module carries its own static CUDA runtime, but the current context is shared with torch's).
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* func) {
    require(device >= 0 && device < kMaxDevices, func, "bad device index " + std::to_string(device));
    FP_CUDA_CHECK(func, cudaGetDevice(&prev_));
    if (prev_ != device) FP_CUDA_CHECK(func, cudaSetDevice(device));
    else prev_ = -1;
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// Multiprocessor count of `device`, read once.
inline int sm_count(int device, const char* func) {
  static int cache[kMaxDevices] = {};
  if (cache[device] == 0) {
    int n = 0;
    FP_CUDA_CHECK(func, cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n > 0 ? n : 1;
  }
  return cache[device];
}


}  // namespace fastpeft
