// NF4 / FP4 quantization, double quantization and dequantization with bitsandbytes' layout
// (QLoRA, Dettmers et al., 2023; fastpeft/reference/nf4.py is the specification, the Triton
// kernels of kernels/nf4.py the other backend). Every output equals the reference's bit for bit.
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
//
// nf4_quant_kernel: a team of tpg threads (a power of two, 1..256) per block, 256 / tpg blocks per
// CUDA block. absmax = max |x| (a shared-memory tree over the team), inv = 1 / max(absmax, 1e-38)
// (__fdiv_rn, correctly rounded), v = clamp(x * inv, -1, 1) (__fmul_rn; 0 in an all-zero block);
// the code is the count of the 15 sorted-table midpoints strictly below v (a 4-step branchless
// binary search over them in shared memory), mapped for FP4 through `order` (nibble p: the code
// of sorted position p, a packed 64-bit argument; 0: the identity, NF4). Element 2j goes to the
// high nibble of byte j; elements past n quantize as 0.0 (the pad nibble: the code of 0.0). VEC
// (block_size a multiple of 8, x 16-byte and q 4-byte aligned): 8 elements a step (16-byte
// loads, one 32-bit store of 4 code bytes; byte by byte in a partial last step); otherwise a byte
// (2 elements) a step. The block is read twice, for the absmax then for the codes.
// nf4_double_quant_kernel: a CUDA block per nested block of 256 absmax values, a thread each:
// d = absmax - offset (__fsub_rn; offset = their mean, computed by the caller), nested = max |d|,
// q8 = the count of the dynamic map's 255 midpoints below clamp(d * (1 / max(nested, 1e-38)), -1, 1)
// (an 8-step binary search in shared memory).
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

// The largest power of two <= v (v >= 1), as a log2.
int floor_log2(int64_t v) {
  int l = 0;
  while ((int64_t{2} << l) <= v) ++l;
  return l;
}

// ---------------------------------------------------------------------------------------------
// quantize: a team of tpg threads (a power of two, 1..256) per block of block_size elements,
// 256 / tpg blocks per 256-thread CUDA block; double quantization: one CUDA block per nested block.

constexpr float kTiny = 1e-38f;  // the absmax floor before the reciprocal (reference.nf4.TINY)
constexpr int kMids = 15;        // midpoints of the sorted 16-entry table

// The count of sorted midpoints strictly below v (a v on a midpoint takes the lower entry): a
// branchless binary search, STEPS = 4 over mids[0..14], 8 over mids[0..254] (shared memory: the
// 15 words of the 4-bit table sit in distinct banks, so its lookups never conflict).
template <int STEPS>
__device__ __forceinline__ uint32_t count_below(const float* mids, float v) {
  uint32_t pos = 0;
#pragma unroll
  for (int s = STEPS - 1; s >= 0; --s) {
    const uint32_t step = 1u << s;
    pos = mids[pos + step - 1] < v ? pos + step : pos;
  }
  return pos;
}

// clamp(x * inv, -1, 1), 0 where the block's absmax is 0 (whatever 1e-38 would give), one rounding.
__device__ __forceinline__ float scaled(float x, float inv, bool nonzero) {
  const float v = nonzero ? __fmul_rn(x, inv) : 0.0f;
  return fminf(fmaxf(v, -1.0f), 1.0f);
}

// 1 / max(absmax, 1e-38), correctly rounded (torch's `1.0 / absmax.clamp(min=1e-38)`).
__device__ __forceinline__ float reciprocal(float amax) { return __fdiv_rn(1.0f, fmaxf(amax, kTiny)); }

// The 4-bit code of x: the sorted position, mapped through `order` (nibble p: the code of sorted
// position p) when REMAP (FP4); NF4's table is sorted (the identity).
template <bool REMAP>
__device__ __forceinline__ uint32_t code4(float x, float inv, bool nonzero, const float* mids, uint64_t order) {
  const uint32_t pos = count_below<4>(mids, scaled(x, inv, nonzero));
  return REMAP ? static_cast<uint32_t>(order >> (4 * pos)) & 0xFu : pos;
}

// The max of m over the team of tpg threads (aligned in the block) through red[kThreads]; every
// thread of the block calls it (tpg is the block's: uniform barriers). Starts with a barrier, so
// shared memory written before it is visible after it.
__device__ __forceinline__ float team_max(float* red, float m, int tpg) {
  const int tid = threadIdx.x, lane = tid & (tpg - 1);
  red[tid] = m;
  __syncthreads();
  for (int s = tpg / 2; s > 0; s >>= 1) {
    if (lane < s) red[tid] = fmaxf(red[tid], red[tid + s]);
    __syncthreads();
  }
  return red[tid & ~(tpg - 1)];
}

// Elements e .. e + 7 of x as float: 16-byte loads when all are inside n (x + e 16-byte aligned),
// else one at a time, 0 past n.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ x, int64_t e, int64_t n, float (&f)[kV]) {
  constexpr int per = 16 / static_cast<int>(sizeof(T));
  if (e + kV <= n) {
    const uint4* p = reinterpret_cast<const uint4*>(x + e);
#pragma unroll
    for (int s = 0; s < kV / per; ++s) {
      const uint4 w = __ldg(p + s);
#pragma unroll
      for (int j = 0; j < per; ++j) f[s * per + j] = vec_get<T>(w, j);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kV; ++j) f[j] = e + j < n ? to_float(x[e + j]) : 0.0f;
  }
}

// VEC (block_size a multiple of 8, x 16-byte and q 4-byte aligned): a thread step is 8 elements
// of one block, 16-byte loads (two for fp32), one 32-bit store of 4 code bytes (byte by byte in the
// last, partial step). Otherwise a step is one byte: elements 2j, 2j + 1. Elements past n are 0.0:
// the pad nibble of an odd n is the code of 0.0. The block is read twice (absmax, then codes).
template <typename T, bool VEC, bool REMAP>
__global__ void __launch_bounds__(kThreads)
nf4_quant_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ absmax,
                 const float* __restrict__ mids_g, uint64_t order, int64_t n, int64_t nb, int64_t bs, int tpg_log2) {
  __shared__ float mids[kMids];
  __shared__ float red[kThreads];
  const int tid = threadIdx.x, tpg = 1 << tpg_log2, lane = tid & (tpg - 1);
  if (tid < kMids) mids[tid] = mids_g[tid];
  const int64_t blk = blockIdx.x * static_cast<int64_t>(kThreads >> tpg_log2) + (tid >> tpg_log2);
  const bool in = blk < nb;
  const int64_t e0 = (in ? blk : 0) * bs;
  const int64_t len = in ? (n - e0 < bs ? n - e0 : bs) : 0;  // this block's elements
  float m = 0.0f;
  if (VEC) {
    for (int64_t c = lane; c * kV < len; c += tpg) {
      float f[kV];
      load8(x, e0 + c * kV, n, f);
#pragma unroll
      for (int j = 0; j < kV; ++j) m = fmaxf(m, fabsf(f[j]));
    }
  } else {
    for (int64_t j = lane; j < len; j += tpg) m = fmaxf(m, fabsf(to_float(x[e0 + j])));
  }
  const float amax = team_max(red, m, tpg);  // its first barrier also publishes mids
  if (!in) return;  // no barrier follows
  if (lane == 0) absmax[blk] = amax;
  const float inv = reciprocal(amax);
  const bool nz = amax > 0.0f;
  const int64_t nbytes = (n + 1) / 2;
  if (VEC) {
    for (int64_t c = lane; c * kV < len; c += tpg) {
      const int64_t e = e0 + c * kV;
      float f[kV];
      load8(x, e, n, f);
      uint32_t w = 0;
#pragma unroll
      for (int j = 0; j < kV / 2; ++j) {  // byte j: element 2j in the high nibble, 2j + 1 in the low one
        const uint32_t hi = code4<REMAP>(f[2 * j], inv, nz, mids, order);
        const uint32_t lo = code4<REMAP>(f[2 * j + 1], inv, nz, mids, order);
        w |= ((hi << 4) | lo) << (8 * j);
      }
      if (e + kV <= n) {
        *reinterpret_cast<uint32_t*>(q + e / 2) = w;
      } else {
        for (int j = 0; j < kV / 2 && e / 2 + j < nbytes; ++j) q[e / 2 + j] = static_cast<uint8_t>(w >> (8 * j));
      }
    }
  } else {
    const float zero = 0.0f;
    for (int64_t j = lane; 2 * j < len; j += tpg) {  // byte e0 / 2 + j (block_size is even)
      const int64_t e = e0 + 2 * j;
      const uint32_t hi = code4<REMAP>(to_float(x[e]), inv, nz, mids, order);
      const uint32_t lo = code4<REMAP>(e + 1 < n ? to_float(x[e + 1]) : zero, inv, nz, mids, order);
      q[e / 2] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

// Double quantization of the absmax vector a (nb values, offset its mean from the caller): CUDA
// block c owns nested block c, a thread per value: d = a - offset (0 past nb), nested[c] = max |d|,
// q8 = the count of the dynamic map's 255 midpoints below clamp(d * (1 / max(nested, 1e-38)), -1, 1).
static_assert(kThreads == kNestedBlock, "one thread per value of a nested block");

__global__ void __launch_bounds__(kThreads)
nf4_double_quant_kernel(const float* __restrict__ a, const float* __restrict__ offset_p, uint8_t* __restrict__ q8,
                        float* __restrict__ nested, const float* __restrict__ mids_g, int64_t nb) {
  __shared__ float mids[kNestedBlock];
  __shared__ float red[kThreads];
  const int tid = threadIdx.x;
  mids[tid] = mids_g[tid];
  const int64_t e = blockIdx.x * static_cast<int64_t>(kNestedBlock) + tid;
  const bool in = e < nb;
  const float d = in ? __fsub_rn(a[e], offset_p[0]) : 0.0f;
  const float amax = team_max(red, fabsf(d), kThreads);  // its first barrier also publishes mids
  if (tid == 0) nested[blockIdx.x] = amax;
  if (in) q8[e] = static_cast<uint8_t>(count_below<8>(mids, scaled(d, reciprocal(amax), amax > 0.0f)));
}

// The arguments nf4_quantize and nf4_dequantize share: a float dtype code, n >= 0, an even
// block_size in [2, 4096].
void check_layout(const char* func, int64_t dtype, int64_t n, int64_t block_size) {
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, func,
          "unsupported dtype code " + std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16)");
  require(n >= 0, func, "n must be >= 0, got " + std::to_string(n));
  require(block_size >= 2 && block_size % 2 == 0 && block_size <= 4096, func,
          "block_size must be even, in [2, 4096], got " + std::to_string(block_size));
}

}  // namespace

void nf4_dequantize(const Nf4DequantizeParams& p) {
  FASTPEFT_NF4_DEQUANTIZE(FASTPEFT_UNPACK)
  const char* func = "nf4_dequantize";
  check_layout(func, dtype, n, block_size);
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

void nf4_quantize(const Nf4QuantizeParams& p) {
  FASTPEFT_NF4_QUANTIZE(FASTPEFT_UNPACK)
  const char* func = "nf4_quantize";
  check_layout(func, dtype, n, block_size);
  if (n == 0) return;
  require(x != 0 && q != 0 && absmax != 0 && mids != 0, func, "null device pointer");
  DeviceGuard guard(device, func);
  const int64_t nb = ceil_div(n, block_size);
  const bool vec = block_size % kV == 0 && aligned16(x) && q % 4 == 0;
  // threads per block of block_size: 8 elements each (VEC), else about 4; 1 .. 256
  const int64_t want = vec ? block_size / kV : block_size / 4;
  const int tpg_log2 = floor_log2(want < 1 ? 1 : (want > kThreads ? kThreads : want));
  const int64_t blocks = ceil_div(nb, kThreads >> tpg_log2);
  require(blocks <= 0x7FFFFFFF, func, "too many blocks: n = " + std::to_string(n));
  const int grid = static_cast<int>(blocks);
  const uint64_t ord = static_cast<uint64_t>(order);
  const bool remap = ord != 0;
  auto qp = reinterpret_cast<uint8_t*>(q);
  auto ap = reinterpret_cast<float*>(absmax);
  auto mp = reinterpret_cast<const float*>(mids);
  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    auto xp = reinterpret_cast<const T*>(x);
    if (vec) {
      if (remap) nf4_quant_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(xp, qp, ap, mp, ord, n, nb, block_size, tpg_log2);
      else nf4_quant_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(xp, qp, ap, mp, ord, n, nb, block_size, tpg_log2);
    } else {
      if (remap) nf4_quant_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(xp, qp, ap, mp, ord, n, nb, block_size, tpg_log2);
      else nf4_quant_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(xp, qp, ap, mp, ord, n, nb, block_size, tpg_log2);
    }
    FP_CHECK_LAUNCH(func);
  });
}

void nf4_double_quant(const Nf4DoubleQuantParams& p) {
  FASTPEFT_NF4_DOUBLE_QUANT(FASTPEFT_UNPACK)
  const char* func = "nf4_double_quant";
  require(n >= 0, func, "n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  require(absmax != 0 && offset != 0 && q8 != 0 && nested != 0 && mids != 0, func, "null device pointer");
  DeviceGuard guard(device, func);
  const int64_t blocks = ceil_div(n, kNestedBlock);
  require(blocks <= 0x7FFFFFFF, func, "too many blocks: n = " + std::to_string(n));
  nf4_double_quant_kernel<<<static_cast<int>(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<const float*>(absmax), reinterpret_cast<const float*>(offset), reinterpret_cast<uint8_t*>(q8),
      reinterpret_cast<float*>(nested), reinterpret_cast<const float*>(mids), n);
  FP_CHECK_LAUNCH(func);
}

}  // namespace fastpeft
