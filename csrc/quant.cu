// Absmax and zero-point quantization (fastpeft/reference/quant.py is the specification).
//
// x (float32, float16 or bfloat16, contiguous, numel elements, last dim L) is viewed as
// [outer, C, inner]; the granularity (mode) picks the slot of element e:
//   kTensor   one slot                                (outer = C = 1, inner = numel)
//   kChannel  slot c = (e / inner) % C                 (C = shape[axis])
//   kGroup    slot e / g                               (groups of g along the last dim; g | L)
// Per slot, with lo / hi its min / max and b the bits:
//   absmax     scale = max(|lo|, |hi|) / (2^(b-1) - 1), zero_point 0, codes in [-qmax, qmax] (int8)
//   zeropoint  lo' = min(lo, 0), hi' = max(hi, 0); scale = (hi' - lo') / (2^b - 1) (halved where
//              hi' - lo' overflows); zero_point = clamp(rint(-lo' * (1 / scale)), 0, qmax), codes
//              in [0, qmax] (uint8)
//   scale 0 -> 1, below 2^-126 -> 2^-126; a NaN in the slot -> scale NaN and codes 0 (zero_point 0);
//   dequantize saturates (q - zp) * scale at the output dtype's largest finite value.
//   code = clamp(rint(x * (1 / scale)) + zero_point); NaN -> 0, +-inf clamp.
// 1 / scale is __frcp_rn (IEEE, as torch's `1.0 / scale`), then one fp32 multiply; the /qmax are
// IEEE divisions (__fdiv_rn); rintf rounds half to even: codes equal the reference's bit for bit.
// 4-bit codes pack two per byte along the last dim (element 2j low nibble, odd L padded with 0).
//
// Kernels:
//   tensor / channel: minmax_init (keys to +-inf) -> minmax_reduce (blocks over (chunk, channel),
//     shared-memory tree, one atomicMin / atomicMax per block and slot on order-preserving uint32
//     keys, stored in the scale / zero_point outputs themselves) -> finish (keys -> scale, zp)
//     -> codes (grid-stride over output bytes). No host synchronisation.
//   group: one pass, a team of tpg threads (power of two, 1..256) per group, several groups per
//     256-thread block: min/max tree in shared memory, scale / zp, then the codes (for 4-bit with
//     an odd g the pairs straddle groups: the codes kernel writes them instead).
//   dequantize: y = (q - zp) * scale in fp32, rounded once to T; grid-stride, 8 elements per
//     thread step: 8 (8-bit) or 4 (4-bit) bytes loaded, 16-byte stores of y; the slot looked up
//     once per 8 elements when it cannot change inside them (uniform), else per element.
#include <cstdint>
#include <string>
#include <type_traits>

#include "common.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
enum Mode : int { kTensor = 0, kChannel = 1, kGroup = 2 };
enum Scheme : int { kAbsmax = 0, kZeropoint = 1 };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Order-preserving key of a float (NaN: above +inf when positive, below -inf when negative).
__device__ __forceinline__ uint32_t fkey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float unkey(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}
constexpr uint32_t kKeyPosInf = 0xFF800000u, kKeyNegInf = 0x007FFFFFu;

__device__ __forceinline__ uint32_t umin32(uint32_t a, uint32_t b) { return a < b ? a : b; }
__device__ __forceinline__ uint32_t umax32(uint32_t a, uint32_t b) { return a > b ? a : b; }

struct QParams {
  float scale;
  int zp;
};

// fastpeft.reference.quant.MIN_SCALE: 2^-126, the smallest normal float32
constexpr float kMinScale = 1.17549435082228750797e-38f;

// y clamped to T's finite range (NaN compares false and stays): the cast cannot overflow to inf
template <typename T> __device__ __forceinline__ float saturate(float y);
template <> __device__ __forceinline__ float saturate<float>(float y) { return y; }
template <> __device__ __forceinline__ float saturate<__half>(float y) {
  return y > 65504.0f ? 65504.0f : (y < -65504.0f ? -65504.0f : y);
}
template <> __device__ __forceinline__ float saturate<__nv_bfloat16>(float y) {
  constexpr float kTop = 3.38953138925153547590e+38f;  // the largest finite bf16
  return y > kTop ? kTop : (y < -kTop ? -kTop : y);
}

// scale and zero_point of a slot from its min / max keys.
__device__ __forceinline__ QParams qparams(uint32_t kmin, uint32_t kmax, int scheme, int qmax) {
  const bool nan = kmax > kKeyPosInf || kmin < kKeyNegInf;
  const float lo = unkey(kmin), hi = unkey(kmax);
  float scale;
  int zp = 0;
  if (scheme == kAbsmax) {
    scale = __fdiv_rn(fmaxf(fabsf(lo), fabsf(hi)), static_cast<float>(qmax));
  } else {
    // where hi' - lo' overflows to inf, the halves (exact at that size) give the same rounding
    const float hi2 = fmaxf(hi, 0.0f), lo2 = fminf(lo, 0.0f), d = hi2 - lo2;
    scale = d == __uint_as_float(0x7F800000u) ? 2.0f * __fdiv_rn(0.5f * hi2 - 0.5f * lo2, static_cast<float>(qmax))
                     : __fdiv_rn(d, static_cast<float>(qmax));
  }
  if (scale == 0.0f) scale = 1.0f;
  if (scale < kMinScale) scale = kMinScale;  // subnormal ranges: 1 / scale stays finite
  if (nan) scale = __uint_as_float(0x7FC00000u);
  if (scheme == kZeropoint) {
    const float z = rintf(-fminf(lo, 0.0f) * __frcp_rn(scale));
    zp = z != z ? 0 : static_cast<int>(fminf(fmaxf(z, 0.0f), static_cast<float>(qmax)));
  }
  return {scale, zp};
}

// The code of x: clamp(rint(x * inv) + zp, qmin, qmax), NaN -> 0; low 8 bits.
__device__ __forceinline__ uint32_t code_of(float x, float inv, float zpf, float qmin, float qmax) {
  const float r = rintf(x * inv) + zpf;
  const int c = r != r ? 0 : static_cast<int>(fminf(fmaxf(r, qmin), qmax));
  return static_cast<uint32_t>(c) & 0xFFu;
}

template <int MODE>
__device__ __forceinline__ int64_t slot_of(int64_t e, int64_t C, int64_t inner, int64_t g) {
  if (MODE == kTensor) return 0;
  if (MODE == kChannel) return (e / inner) % C;
  return e / g;
}

// ---------------------------------------------------------------------------------------------
// tensor / channel reductions

__global__ void __launch_bounds__(kThreads)
minmax_init_kernel(uint32_t* __restrict__ kmin, uint32_t* __restrict__ kmax, int64_t slots) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; s < slots;
       s += static_cast<int64_t>(gridDim.x) * kThreads) {
    kmin[s] = 0xFFFFFFFFu;
    kmax[s] = 0u;
  }
}

// Block (bx, by): channels by, by + gridDim.y, ...; of each, elements j = bx*256 + tid + k*gridDim.x*256 of
// its outer * inner elements (j -> (o, i) = (j / inner, j % inner), at (o * C + c) * inner + i).
template <typename T>
__global__ void __launch_bounds__(kThreads)
minmax_reduce_kernel(const T* __restrict__ x, uint32_t* __restrict__ kmin, uint32_t* __restrict__ kmax,
                     int64_t outer, int64_t C, int64_t inner) {
  __shared__ uint32_t red_min[kThreads];
  __shared__ uint32_t red_max[kThreads];
  const int tid = threadIdx.x;
  const int64_t J = outer * inner;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    uint32_t mn = 0xFFFFFFFFu, mx = 0u;
    for (int64_t j = blockIdx.x * static_cast<int64_t>(kThreads) + tid; j < J;
         j += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int64_t o = j / inner, i = j - o * inner;
      const uint32_t k = fkey(to_float(x[(o * C + c) * inner + i]));
      mn = umin32(mn, k);
      mx = umax32(mx, k);
    }
    red_min[tid] = mn;
    red_max[tid] = mx;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (tid < s) {
        red_min[tid] = umin32(red_min[tid], red_min[tid + s]);
        red_max[tid] = umax32(red_max[tid], red_max[tid + s]);
      }
      __syncthreads();
    }
    if (tid == 0) {
      atomicMin(kmin + c, red_min[0]);
      atomicMax(kmax + c, red_max[0]);
    }
    __syncthreads();  // red_* are reused by the next channel
  }
}

// keys (in the scale / zero_point buffers) -> scale, zero_point
__global__ void __launch_bounds__(kThreads)
finish_kernel(float* __restrict__ scale, int* __restrict__ zp, int64_t slots, int scheme, int qmax) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; s < slots;
       s += static_cast<int64_t>(gridDim.x) * kThreads) {
    const QParams p = qparams(__float_as_uint(scale[s]), static_cast<uint32_t>(zp[s]), scheme, qmax);
    scale[s] = p.scale;
    zp[s] = p.zp;
  }
}

// codes from scale / zero_point: 8-bit, one byte per element; 4-bit, byte b of the packed
// [rows, Lp] output holds elements 2p, 2p + 1 of row r (b = r * Lp + p).
template <typename T, int MODE, int BITS>
__global__ void __launch_bounds__(kThreads)
codes_kernel(const T* __restrict__ x, const float* __restrict__ scale, const int* __restrict__ zp,
             uint8_t* __restrict__ q, int64_t nbytes, int64_t C, int64_t inner, int64_t g, int64_t L,
             float qmin, float qmax) {
  const int64_t Lp = (L + 1) / 2;
  auto code = [&](int64_t e) {
    const int64_t s = slot_of<MODE>(e, C, inner, g);
    return code_of(to_float(x[e]), __frcp_rn(scale[s]), static_cast<float>(zp[s]), qmin, qmax);
  };
  for (int64_t b = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (BITS == 8) {
      q[b] = static_cast<uint8_t>(code(b));
    } else {
      const int64_t r = b / Lp, p = b - r * Lp, e = r * L + 2 * p;
      const uint32_t hi = 2 * p + 1 < L ? code(e + 1) : 0u;
      q[b] = static_cast<uint8_t>((code(e) & 0xFu) | ((hi & 0xFu) << 4));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// groups: one pass. Team t of the block (tpg threads) owns group blockIdx.x * (256 / tpg) + t.
// CODES: write the codes too (8-bit, or 4-bit with an even g: a group's bytes are its own).

template <typename T, int BITS, bool CODES>
__global__ void __launch_bounds__(kThreads)
group_quant_kernel(const T* __restrict__ x, float* __restrict__ scale, int* __restrict__ zp,
                   uint8_t* __restrict__ q, int64_t groups, int64_t g, int64_t L, int tpg_log2, int scheme,
                   int qmax, float qmin_f) {
  __shared__ uint32_t red_min[kThreads];
  __shared__ uint32_t red_max[kThreads];
  const int tid = threadIdx.x, tpg = 1 << tpg_log2, lane = tid & (tpg - 1);
  const int64_t grp = blockIdx.x * static_cast<int64_t>(kThreads >> tpg_log2) + (tid >> tpg_log2);
  const bool in = grp < groups;
  const T* xg = x + (in ? grp : 0) * g;
  uint32_t mn = 0xFFFFFFFFu, mx = 0u;
  if (in) {
    for (int64_t j = lane; j < g; j += tpg) {
      const uint32_t k = fkey(to_float(xg[j]));
      mn = umin32(mn, k);
      mx = umax32(mx, k);
    }
  }
  red_min[tid] = mn;
  red_max[tid] = mx;
  __syncthreads();
  for (int s = tpg / 2; s > 0; s >>= 1) {  // tpg is the same for the whole block: uniform barriers
    if (lane < s) {
      red_min[tid] = umin32(red_min[tid], red_min[tid + s]);
      red_max[tid] = umax32(red_max[tid], red_max[tid + s]);
    }
    __syncthreads();
  }
  if (!in) return;  // no barrier follows
  const int base = tid & ~(tpg - 1);
  const QParams p = qparams(red_min[base], red_max[base], scheme, qmax);
  if (lane == 0) {
    scale[grp] = p.scale;
    zp[grp] = p.zp;
  }
  if (!CODES) return;
  const float inv = __frcp_rn(p.scale), zpf = static_cast<float>(p.zp), qmax_f = static_cast<float>(qmax);
  if (BITS == 8) {
    uint8_t* qg = q + grp * g;
    for (int64_t j = lane; j < g; j += tpg) {
      qg[j] = static_cast<uint8_t>(code_of(to_float(xg[j]), inv, zpf, qmin_f, qmax_f));
    }
  } else {  // g even, so every group starts at an even column: its bytes are (grp * g) / 2 ...
    const int64_t e0 = grp * g, r = e0 / L, col = e0 - r * L;
    uint8_t* qg = q + r * ((L + 1) / 2) + col / 2;
    for (int64_t j = lane; j < g / 2; j += tpg) {
      const uint32_t lo = code_of(to_float(xg[2 * j]), inv, zpf, qmin_f, qmax_f);
      const uint32_t hi = code_of(to_float(xg[2 * j + 1]), inv, zpf, qmin_f, qmax_f);
      qg[j] = static_cast<uint8_t>((lo & 0xFu) | ((hi & 0xFu) << 4));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dequantize

constexpr int kDqV = 8;  // elements per thread step

template <int BITS>
__device__ __forceinline__ int code_at(const uint8_t* __restrict__ q, int64_t e, int64_t L, bool sign) {
  if (BITS == 8) {
    const uint32_t b = q[e];
    return sign ? static_cast<int>(static_cast<int8_t>(b)) : static_cast<int>(b);
  }
  const int64_t r = e / L, col = e - r * L;
  const uint32_t b = q[r * ((L + 1) / 2) + col / 2];
  const int n = static_cast<int>((b >> (4 * (col & 1))) & 0xFu);
  return sign && n > 7 ? n - 16 : n;
}

// VEC: 16-byte stores of y (aligned), 8-byte (8-bit) / 4-byte (4-bit, even L) aligned loads of q;
// elements [numel / 8 * 8, numel) are done one by one. UNIFORM: the 8 elements of a step share a slot.
template <typename T, int MODE, int BITS, bool VEC, bool UNIFORM>
__global__ void __launch_bounds__(kThreads)
dequant_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale, const int* __restrict__ zp,
               T* __restrict__ y, int64_t numel, int64_t C, int64_t inner, int64_t g, int64_t L, bool sign) {
  const int64_t tid = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const float s0 = MODE == kTensor ? scale[0] : 0.0f;
  const float z0 = MODE == kTensor ? static_cast<float>(zp[0]) : 0.0f;
  auto value = [&](int c, int64_t e) {
    if (MODE == kTensor) return saturate<T>((static_cast<float>(c) - z0) * s0);
    const int64_t s = slot_of<MODE>(e, C, inner, g);
    return saturate<T>((static_cast<float>(c) - static_cast<float>(zp[s])) * scale[s]);
  };
  int64_t done = 0;
  if (VEC) {
    const int64_t steps = numel / kDqV;
    for (int64_t v = tid; v < steps; v += stride) {
      const int64_t e0 = v * kDqV;
      int c[kDqV];
      if (BITS == 8) {
        const uint2 w = __ldg(reinterpret_cast<const uint2*>(q + e0));
#pragma unroll
        for (int j = 0; j < kDqV; ++j) {
          const uint32_t b = ((j < 4 ? w.x : w.y) >> (8 * (j & 3))) & 0xFFu;
          c[j] = sign ? static_cast<int>(static_cast<int8_t>(b)) : static_cast<int>(b);
        }
      } else {
        const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(q + e0 / 2));
#pragma unroll
        for (int j = 0; j < kDqV; ++j) {
          const int n = static_cast<int>((w >> (4 * j)) & 0xFu);
          c[j] = sign && n > 7 ? n - 16 : n;
        }
      }
      float out[kDqV];
      if (UNIFORM && MODE != kTensor) {
        const int64_t s = slot_of<MODE>(e0, C, inner, g);
        const float sc = scale[s], zf = static_cast<float>(zp[s]);
#pragma unroll
        for (int j = 0; j < kDqV; ++j) out[j] = saturate<T>((static_cast<float>(c[j]) - zf) * sc);
      } else {
#pragma unroll
        for (int j = 0; j < kDqV; ++j) out[j] = value(c[j], e0 + j);
      }
      constexpr int W = 16 / static_cast<int>(sizeof(T));
#pragma unroll
      for (int h = 0; h < kDqV / W; ++h) {
        uint4 pk = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int j = 0; j < W; ++j) vec_put<T>(pk, j, out[h * W + j]);
        *reinterpret_cast<uint4*>(y + e0 + h * W) = pk;
      }
    }
    done = steps * kDqV;
  }
  for (int64_t e = done + tid; e < numel; e += stride) y[e] = from_float<T>(value(code_at<BITS>(q, e, L, sign), e));
}

// ---------------------------------------------------------------------------------------------
// host side

struct Geometry {
  int64_t outer, C, inner, last, g, numel, slots, nbytes;
  int mode;
};

Geometry check_geometry(const char* func, int64_t outer, int64_t C, int64_t inner, int64_t last, int mode,
                        int64_t group_size, int bits, int scheme) {
  require(outer >= 0 && C >= 0 && inner >= 0 && last >= 0, func, "sizes must be >= 0");
  require(bits == 8 || bits == 4, func, "bits must be 8 or 4, got " + std::to_string(bits));
  require(scheme == kAbsmax || scheme == kZeropoint, func,
          "scheme must be 0 (absmax) or 1 (zeropoint), got " + std::to_string(scheme));
  require(mode == kTensor || mode == kChannel || mode == kGroup, func,
          "mode must be 0 (tensor), 1 (channel) or 2 (group), got " + std::to_string(mode));
  Geometry geo{outer, C, inner, last, 0, outer * C * inner, 0, 0, mode};
  require(geo.numel == 0 || (last >= 1 && geo.numel % last == 0), func, "the last dim must divide numel");
  if (mode == kTensor) {
    require(outer == 1 && C == 1, func, "per-tensor mode takes outer = C = 1");
    geo.slots = 1;
  } else if (mode == kChannel) {
    geo.slots = C;
  } else {
    require(outer == 1 && C == 1, func, "group mode takes outer = C = 1");
    require(group_size >= 1, func, "group_size must be >= 1, got " + std::to_string(group_size));
    require(last % group_size == 0, func, "group_size " + std::to_string(group_size) +
                                              " does not divide the last dim " + std::to_string(last));
    geo.g = group_size;
    geo.slots = geo.numel / group_size;
  }
  geo.nbytes = bits == 8 ? geo.numel : (last == 0 ? 0 : geo.numel / last * ((last + 1) / 2));
  return geo;
}

int grid_for(int64_t work, int device, const char* func) {
  const int64_t cap = 8LL * sm_count(device, func);
  const int64_t b = ceil_div(work, kThreads);
  return static_cast<int>(b < 1 ? 1 : (b < cap ? b : cap));
}

template <typename T, int MODE, int BITS>
void launch_codes(const Geometry& geo, const T* x, const float* s, const int* z, uint8_t* q, float qmin, float qmax,
                  int device, cudaStream_t stream, const char* func) {
  codes_kernel<T, MODE, BITS><<<grid_for(geo.nbytes, device, func), kThreads, 0, stream>>>(
      x, s, z, q, geo.nbytes, geo.C, geo.inner, geo.g, geo.last, qmin, qmax);
  FP_CHECK_LAUNCH(func);
}

}  // namespace

void quant_quantize(const QuantQuantizeParams& p) {
  FASTPEFT_QUANT_QUANTIZE(FASTPEFT_UNPACK)
  const char* func = "quant_quantize";
  const Geometry geo = check_geometry(func, outer, C, inner, last, mode, group_size, bits, scheme);
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, func,
          "unsupported dtype code " + std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16)");
  require(geo.numel > 0, func, "cannot quantize an empty tensor (its slots have no min / max)");
  require(x != 0 && q != 0 && scale != 0 && zero_point != 0, func, "null device pointer");
  DeviceGuard guard(device, func);
  const int qmax = scheme == kAbsmax ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
  const float qmin_f = scheme == kAbsmax ? -static_cast<float>(qmax) : 0.0f, qmax_f = static_cast<float>(qmax);
  auto sp = reinterpret_cast<float*>(scale);
  auto zpp = reinterpret_cast<int*>(zero_point);
  auto qp = reinterpret_cast<uint8_t*>(q);

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    auto xp = reinterpret_cast<const T*>(x);
    if (mode == kGroup) {
      int tpg_log2 = 0;  // threads per group: about 4 elements each, 1 .. 256
      while (tpg_log2 < 8 && (int64_t{4} << tpg_log2) < geo.g) ++tpg_log2;
      const int64_t blocks = ceil_div(geo.slots, kThreads >> tpg_log2);
      require(blocks < (int64_t{1} << 31), func, "problem too large for the grid");
      const dim3 grid(static_cast<unsigned>(blocks));
      if (bits == 8) {
        group_quant_kernel<T, 8, true><<<grid, kThreads, 0, stream>>>(xp, sp, zpp, qp, geo.slots, geo.g, geo.last,
                                                                      tpg_log2, scheme, qmax, qmin_f);
      } else if (geo.g % 2 == 0) {
        group_quant_kernel<T, 4, true><<<grid, kThreads, 0, stream>>>(xp, sp, zpp, qp, geo.slots, geo.g, geo.last,
                                                                      tpg_log2, scheme, qmax, qmin_f);
      } else {
        group_quant_kernel<T, 4, false><<<grid, kThreads, 0, stream>>>(xp, sp, zpp, qp, geo.slots, geo.g, geo.last,
                                                                       tpg_log2, scheme, qmax, qmin_f);
      }
      FP_CHECK_LAUNCH(func);
      if (bits == 4 && geo.g % 2 != 0) {
        launch_codes<T, kGroup, 4>(geo, xp, sp, zpp, qp, qmin_f, qmax_f, device, stream, func);
      }
      return;
    }
    auto kmin = reinterpret_cast<uint32_t*>(scale);
    auto kmax = reinterpret_cast<uint32_t*>(zero_point);
    minmax_init_kernel<<<grid_for(geo.slots, device, func), kThreads, 0, stream>>>(kmin, kmax, geo.slots);
    FP_CHECK_LAUNCH(func);
    const int64_t J = geo.outer * geo.inner;  // elements per slot
    const int64_t gy = geo.slots < 65535 ? geo.slots : 65535;
    const int64_t want = 4LL * sm_count(device, func);  // blocks in all
    int64_t gx = ceil_div(J, kThreads * 4LL);  // >= 4 elements per thread
    const int64_t per_channel = ceil_div(want, gy);
    gx = gx < per_channel ? gx : per_channel;
    gx = gx < 1 ? 1 : gx;
    minmax_reduce_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(
        xp, kmin, kmax, geo.outer, geo.C, geo.inner);
    FP_CHECK_LAUNCH(func);
    finish_kernel<<<grid_for(geo.slots, device, func), kThreads, 0, stream>>>(sp, zpp, geo.slots, scheme, qmax);
    FP_CHECK_LAUNCH(func);
    if (mode == kTensor) {
      if (bits == 8) launch_codes<T, kTensor, 8>(geo, xp, sp, zpp, qp, qmin_f, qmax_f, device, stream, func);
      else launch_codes<T, kTensor, 4>(geo, xp, sp, zpp, qp, qmin_f, qmax_f, device, stream, func);
    } else {
      if (bits == 8) launch_codes<T, kChannel, 8>(geo, xp, sp, zpp, qp, qmin_f, qmax_f, device, stream, func);
      else launch_codes<T, kChannel, 4>(geo, xp, sp, zpp, qp, qmin_f, qmax_f, device, stream, func);
    }
  });
}

void quant_dequantize(const QuantDequantizeParams& p) {
  FASTPEFT_QUANT_DEQUANTIZE(FASTPEFT_UNPACK)
  const char* func = "quant_dequantize";
  const Geometry geo = check_geometry(func, outer, C, inner, last, mode, group_size, bits, scheme);
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, func,
          "unsupported dtype code " + std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16)");
  if (geo.numel == 0) return;
  require(q != 0 && scale != 0 && zero_point != 0 && y != 0, func, "null device pointer");
  DeviceGuard guard(device, func);
  const bool sign = scheme == kAbsmax;
  const bool vec = aligned16(y) && (bits == 8 ? q % 8 == 0 : (q % 4 == 0 && last % 2 == 0));
  const bool uniform = mode == kTensor || (mode == kChannel && geo.inner % kDqV == 0) ||
                       (mode == kGroup && geo.g % kDqV == 0);
  auto qp = reinterpret_cast<const uint8_t*>(q);
  auto sp = reinterpret_cast<const float*>(scale);
  auto zpp = reinterpret_cast<const int*>(zero_point);

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    auto yp = reinterpret_cast<T*>(y);
    const int grid = grid_for(ceil_div(geo.numel, vec ? kDqV : 1), device, func);
    auto go = [&](auto mode_tag, auto bits_tag) {
      constexpr int M = decltype(mode_tag)::value, B = decltype(bits_tag)::value;
      if (vec && uniform) {
        dequant_kernel<T, M, B, true, true><<<grid, kThreads, 0, stream>>>(qp, sp, zpp, yp, geo.numel, geo.C,
                                                                           geo.inner, geo.g, geo.last, sign);
      } else if (vec) {
        dequant_kernel<T, M, B, true, false><<<grid, kThreads, 0, stream>>>(qp, sp, zpp, yp, geo.numel, geo.C,
                                                                            geo.inner, geo.g, geo.last, sign);
      } else {
        dequant_kernel<T, M, B, false, false><<<grid, kThreads, 0, stream>>>(qp, sp, zpp, yp, geo.numel, geo.C,
                                                                             geo.inner, geo.g, geo.last, sign);
      }
      FP_CHECK_LAUNCH(func);
    };
    auto by_bits = [&](auto mode_tag) {
      if (bits == 8) go(mode_tag, std::integral_constant<int, 8>{});
      else go(mode_tag, std::integral_constant<int, 4>{});
    };
    if (mode == kTensor) by_bits(std::integral_constant<int, kTensor>{});
    else if (mode == kChannel) by_bits(std::integral_constant<int, kChannel>{});
    else by_bits(std::integral_constant<int, kGroup>{});
  });
}

}  // namespace fastpeft
