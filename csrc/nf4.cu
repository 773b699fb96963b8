// NF4 / FP4 dequantization with bitsandbytes' layout (QLoRA, Dettmers et al., 2023;
// fastpeft/reference/nf4.py is the specification, the Triton kernel kernels/nf4.py the other
// backend).
//
// A tensor of n elements read flat: element e is nibble e of `data` (byte e / 2, the high nibble
// when e is even), block e / block_size. y[e] = code[nibble] * absmax[block], one fp32 multiply,
// rounded once to T. With double quantization (`nested` given) the block absmax is restored as
// dyn[q8[b]] * nested[b / 256] + offset, two roundings (__fmul_rn, __fadd_rn: no FMA merges them),
// as the reference computes it: y equals the reference bit for bit.
//
// nf4_dequant_kernel: grid-stride. VEC (n a multiple of 8, the codes 4-byte and y 16-byte
// aligned): a 32-bit load of 4 code bytes gives 8 elements of one block (block_size is a multiple
// of 8), one absmax lookup for them, 16-byte stores of y. Otherwise one element a step. The
// 16-entry table and the dynamic map are read through the read-only cache (__ldg).
#include <cstdint>
#include <string>

#include "common.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kNestedBlock = 256;  // absmax values per nested block (bitsandbytes')
constexpr int kV = 8;                  // elements per vector step: one 32-bit word of codes

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <bool DOUBLE>
__device__ __forceinline__ float block_absmax(const void* absmax, const float* nested, float offset,
                                              const float* dyn, int64_t b) {
  if (DOUBLE) {
    const uint32_t q8 = __ldg(static_cast<const uint8_t*>(absmax) + b);
    return __fadd_rn(__fmul_rn(__ldg(dyn + q8), nested[b / kNestedBlock]), offset);
  }
  return static_cast<const float*>(absmax)[b];
}

template <typename T, bool DOUBLE, bool VEC>
__global__ void __launch_bounds__(kThreads)
nf4_dequant_kernel(const uint8_t* __restrict__ data, const void* __restrict__ absmax,
                   const float* __restrict__ nested, const float* __restrict__ offset_p,
                   const float* __restrict__ code, const float* __restrict__ dyn, T* __restrict__ y, int64_t n,
                   int64_t bs) {
  const int64_t tid = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const float offset = DOUBLE ? offset_p[0] : 0.0f;
  if (VEC) {
    constexpr int per = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte store
    const int64_t steps = n / kV;
    for (int64_t v = tid; v < steps; v += stride) {
      const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(data) + v);
      const float a = block_absmax<DOUBLE>(absmax, nested, offset, dyn, v * kV / bs);
      uint4 out[kV / per];
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // byte j of the word: elements 2j (high nibble) and 2j + 1
        const uint32_t b = (w >> (8 * j)) & 0xFFu;
        vec_put<T>(out[(2 * j) / per], (2 * j) % per, __fmul_rn(__ldg(code + (b >> 4)), a));
        vec_put<T>(out[(2 * j + 1) / per], (2 * j + 1) % per, __fmul_rn(__ldg(code + (b & 0xFu)), a));
      }
      uint4* dst = reinterpret_cast<uint4*>(y + v * kV);
#pragma unroll
      for (int s = 0; s < kV / per; ++s) dst[s] = out[s];
    }
  } else {
    for (int64_t e = tid; e < n; e += stride) {
      const uint32_t b = data[e >> 1];
      const uint32_t c = (e & 1) ? (b & 0xFu) : (b >> 4);
      y[e] = from_float<T>(__fmul_rn(__ldg(code + c), block_absmax<DOUBLE>(absmax, nested, offset, dyn, e / bs)));
    }
  }
}

}  // namespace

void nf4_dequantize(const Nf4DequantizeParams& p) {
  FASTPEFT_NF4_DEQUANTIZE(FASTPEFT_UNPACK)
  const char* func = "nf4_dequantize";
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, func,
          "unsupported dtype code " + std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16)");
  require(n >= 0, func, "n must be >= 0, got " + std::to_string(n));
  require(block_size >= 2 && block_size % 2 == 0 && block_size <= 4096, func,
          "block_size must be even, in [2, 4096], got " + std::to_string(block_size));
  if (n == 0) return;
  const bool double_quant = nested != 0;
  require(data != 0 && absmax != 0 && code != 0 && y != 0, func, "null device pointer");
  require(!double_quant || (offset != 0 && dyn != 0), func, "double quantization needs offset and dyn");
  DeviceGuard guard(device, func);
  const bool vec = n % kV == 0 && block_size % kV == 0 && data % 4 == 0 && aligned16(y);
  const int64_t work = vec ? n / kV : n;
  const int64_t cap = 8LL * sm_count(device, func);
  const int64_t blocks = ceil_div(work, kThreads);
  const int grid = static_cast<int>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
  auto dp = reinterpret_cast<const uint8_t*>(data);
  auto ap = reinterpret_cast<const void*>(absmax);
  auto np = reinterpret_cast<const float*>(nested);
  auto op = reinterpret_cast<const float*>(offset);
  auto cp = reinterpret_cast<const float*>(code);
  auto yp_dyn = reinterpret_cast<const float*>(dyn);
  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    auto yp = reinterpret_cast<T*>(y);
    if (double_quant) {
      if (vec) nf4_dequant_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(dp, ap, np, op, cp, yp_dyn, yp, n, block_size);
      else nf4_dequant_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(dp, ap, np, op, cp, yp_dyn, yp, n, block_size);
    } else {
      if (vec) nf4_dequant_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(dp, ap, np, op, cp, yp_dyn, yp, n, block_size);
      else nf4_dequant_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(dp, ap, np, op, cp, yp_dyn, yp, n, block_size);
    }
    FP_CHECK_LAUNCH(func);
  });
}

}  // namespace fastpeft
