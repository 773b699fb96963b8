// LoRA kernels: the two skinny GEMMs of  y = x W^T + b + s * (dropout(x) A^T) B^T.
//
//   shrink:  U[m, r]  = out_scale * sum_k dropout(X)[m, k] * A[r, k]      (U fp32)
//   expand:  Y[m, n] += s * keep(m, n) * drop_scale * sum_r U[m, r] * B[n, r]
//
// Every operand is addressed through element strides, so transposed views (the backward
// pass reads B^T and A^T) need no copies. Both kernels stage tiles in shared memory, multiply
// them on tensor cores (nvcuda::wmma, fp32 accumulation; fp32 inputs use 3xTF32 so results
// stay fp32-accurate) and finish in an epilogue that stages the accumulators in shared memory
// for coalesced, bounds-checked stores. Dropout is never materialized: the counter-based
// mask of fastpeft/reference/dropout.py is evaluated on (row, col) as tiles are loaded
// (shrink) or stored (expand).
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;  // 8 warps per block

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T> __device__ __forceinline__ T zero_value() { return from_float<T>(0.0f); }

// ---------------------------------------------------------------------------------------------
// shrink: block tile BM rows x BR ranks, K staged in BK chunks (register prefetch of the next
// chunk overlaps the tensor-core work on the current one); grid.z splits K (atomics into a
// zeroed U).

template <typename T, int NR, bool VEC_X> struct ShrinkTile {
  using Mma = WarpMma<T, std::is_same<T, float>::value ? 3 : 1>;
  static constexpr int BM = 128, BR = 16 * NR, BK = 32;
  static constexpr int LDS = BK + 16 / static_cast<int>(sizeof(T));  // 16-byte row padding
  static constexpr int LDC = BR + 4;
  static constexpr int V = VEC_X ? vec_width<T>() : 1;
  static constexpr int X_ROWS_PER_PASS = kThreads / (BK / V);
  static constexpr int X_LOADS = BM / X_ROWS_PER_PASS;
  static constexpr int A_LOADS = BR * BK / kThreads;
  static constexpr int STAGE_BYTES = (BM + BR) * LDS * static_cast<int>(sizeof(T));
  static constexpr int C_BYTES = BM * LDC * static_cast<int>(sizeof(float));
  static constexpr int SMEM_BYTES = STAGE_BYTES > C_BYTES ? STAGE_BYTES : C_BYTES;
  static_assert(BM == 16 * (kThreads / 32), "one 16-row slab per warp");
  static_assert(BM % X_ROWS_PER_PASS == 0 && BR * BK % kThreads == 0, "even tile loads");
};

template <typename T, int NR, bool VEC_X>
__global__ void __launch_bounds__(kThreads, 2)
shrink_kernel(const T* __restrict__ x, int64_t s_xm, int64_t s_xk,
              const T* __restrict__ a, int64_t s_ar, int64_t s_ak,
              float* __restrict__ u, int64_t s_um, int64_t s_ur,
              int64_t M, int64_t K, int64_t R, int64_t k_per_split, float out_scale,
              bool dropout, uint32_t seed, uint32_t thr31, bool atomic) {
  using Tile = ShrinkTile<T, NR, VEC_X>;
  constexpr int BM = Tile::BM, BR = Tile::BR, BK = Tile::BK, LDS = Tile::LDS, V = Tile::V;
  __shared__ __align__(128) unsigned char smem[Tile::SMEM_BYTES];
  __shared__ uint32_t row_key[BM];
  T* xs = reinterpret_cast<T*>(smem);
  T* as = xs + BM * LDS;
  float* cs = reinterpret_cast<float*>(smem);  // reused for the epilogue

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;

  // X slots: rows xm + i * X_ROWS_PER_PASS, columns xk .. xk + V - 1 of each chunk
  const int xm = tid / (BK / V), xk = (tid % (BK / V)) * V;
  const T* x_thread = x + (m0 + xm) * s_xm + xk * s_xk;
  const int64_t x_row_step = Tile::X_ROWS_PER_PASS * s_xm;
  // A slots: along k when k is contiguous, else along r
  const bool a_k_fast = s_ak == 1;
  const int ar = a_k_fast ? tid / BK : tid % BR, ak = a_k_fast ? tid % BK : tid / BR;
  const int a_r_step = a_k_fast ? kThreads / BK : 0, a_k_step = a_k_fast ? 0 : kThreads / BR;

  if (dropout) {
    for (int i = tid; i < BM; i += kThreads) row_key[i] = dropout_row_key(seed, static_cast<uint32_t>(m0 + i));
  }

  uint4 xv[VEC_X ? Tile::X_LOADS : 1];
  T xe[VEC_X ? 1 : Tile::X_LOADS];
  T ae[Tile::A_LOADS];

  auto load = [&](int64_t k0) {
    const bool k_in = k0 + xk < k_end;  // VEC_X: k_end and K are multiples of V
#pragma unroll
    for (int i = 0; i < Tile::X_LOADS; ++i) {
      const bool in = k_in && m0 + xm + i * Tile::X_ROWS_PER_PASS < M;
      const T* p = x_thread + i * x_row_step + k0 * s_xk;
      if (VEC_X) xv[VEC_X ? i : 0] = in ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
      else xe[VEC_X ? 0 : i] = in ? p[0] : zero_value<T>();
    }
#pragma unroll
    for (int i = 0; i < Tile::A_LOADS; ++i) {
      const int64_t r = r0 + ar + i * a_r_step, k = k0 + ak + i * a_k_step;
      ae[i] = (r < R && k < k_end) ? a[r * s_ar + k * s_ak] : zero_value<T>();
    }
  };

  auto stage = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < Tile::X_LOADS; ++i) {
      const int mm = xm + i * Tile::X_ROWS_PER_PASS;
      if (VEC_X) {
        uint4 v = xv[VEC_X ? i : 0];
        if (dropout) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (!dropout_keep(row_key[mm], static_cast<uint32_t>(k0 + xk + j), thr31)) vec_clear<T>(v, j);
          }
        }
        *reinterpret_cast<uint4*>(xs + mm * LDS + xk) = v;
      } else {
        T v = xe[VEC_X ? 0 : i];
        if (dropout && !dropout_keep(row_key[mm], static_cast<uint32_t>(k0 + xk), thr31)) v = zero_value<T>();
        xs[mm * LDS + xk] = v;
      }
    }
#pragma unroll
    for (int i = 0; i < Tile::A_LOADS; ++i) as[(ar + i * a_r_step) * LDS + ak + i * a_k_step] = ae[i];
  };

  typename Tile::Mma::Acc acc[NR];
#pragma unroll
  for (int j = 0; j < NR; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.0f);

  if (k_begin < k_end) load(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    __syncthreads();  // previous chunk consumed (and row keys written)
    stage(k0);
    __syncthreads();
    if (k0 + BK < k_end) load(k0 + BK);
    Tile::Mma::run(acc, xs + warp * 16 * LDS, LDS, as, LDS, BK);
  }

  __syncthreads();
#pragma unroll
  for (int j = 0; j < NR; ++j) {
    nvcuda::wmma::store_matrix_sync(cs + warp * 16 * Tile::LDC + j * 16, acc[j], Tile::LDC,
                                    nvcuda::wmma::mem_row_major);
  }
  __syncthreads();
  for (int idx = tid; idx < BM * BR; idx += kThreads) {
    const int mm = idx / BR, rr = idx % BR;
    const int64_t m = m0 + mm, r = r0 + rr;
    if (m < M && r < R) {
      const float v = out_scale * cs[mm * Tile::LDC + rr];
      float* p = u + m * s_um + r * s_ur;
      if (atomic) atomicAdd(p, v);
      else *p = v;
    }
  }
}

__global__ void zero_kernel(float* __restrict__ u, int64_t s_um, int64_t s_ur, int64_t M, int64_t R) {
  const int64_t total = M * R;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    u[(i / R) * s_um + (i % R) * s_ur] = 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// expand: block tile BM x BN of Y, 8 warps as 4 (m) x 2 (n), each 16 x 64; R in RK chunks.
// U and B are staged as fp32 and multiplied in TF32 (3 passes for fp32 Y, else 1: 16-bit B is
// exact in TF32, so only U is rounded to 10 mantissa bits, finer than the fp16/bf16 output).

template <typename T, bool VEC_Y> struct ExpandTile {
  using Mma = WarpMma<float, std::is_same<T, float>::value ? 3 : 1>;
  static constexpr int BM = 64, BN = 128, RK = 16;
  static constexpr int LDS = RK + 4, LDC = BN + 4;
  static constexpr int V = VEC_Y ? vec_width<T>() : 1;
  static constexpr int Y_ROWS_PER_PASS = kThreads / (BN / V);
  static constexpr int Y_LOADS = BM / Y_ROWS_PER_PASS;
  static constexpr int U_LOADS = BM * RK / kThreads;
  static constexpr int B_LOADS = BN * RK / kThreads;
  static constexpr int STAGE_BYTES = (BM + BN) * LDS * static_cast<int>(sizeof(float));
  static constexpr int C_BYTES = BM * LDC * static_cast<int>(sizeof(float));
  static constexpr int SMEM_BYTES = STAGE_BYTES > C_BYTES ? STAGE_BYTES : C_BYTES;
  static_assert(BM / 16 * (BN / 64) == kThreads / 32, "one 16 x 64 slab per warp");
  static_assert(BM % Y_ROWS_PER_PASS == 0, "even tile loads");
};

template <typename T, bool VEC_Y>
__global__ void __launch_bounds__(kThreads, 2)
expand_kernel(T* __restrict__ y, int64_t s_ym, int64_t s_yn,
              const float* __restrict__ u, int64_t s_um, int64_t s_ur,
              const T* __restrict__ b, int64_t s_bn, int64_t s_br,
              int64_t M, int64_t N, int64_t R, float scaling,
              bool dropout, uint32_t seed, uint32_t thr31, float drop_scale) {
  using Tile = ExpandTile<T, VEC_Y>;
  constexpr int BM = Tile::BM, BN = Tile::BN, RK = Tile::RK, LDS = Tile::LDS, LDC = Tile::LDC, V = Tile::V;
  __shared__ __align__(128) unsigned char smem[Tile::SMEM_BYTES];
  __shared__ uint32_t row_key[BM];
  float* us = reinterpret_cast<float*>(smem);
  float* bs = us + BM * LDS;
  float* cs = reinterpret_cast<float*>(smem);  // reused for the epilogue

  const int tid = threadIdx.x;
  const int warp = tid / 32, wm = warp % (BM / 16), wn = warp / (BM / 16);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;

  // U slots: along r; B slots: along r when r is contiguous, else along n
  const int um = tid / RK, ur = tid % RK;
  const bool b_r_fast = s_br == 1;
  const int bn = b_r_fast ? tid / RK : tid % BN, br = b_r_fast ? tid % RK : tid / BN;
  const int b_n_step = b_r_fast ? kThreads / RK : 0, b_r_step = b_r_fast ? 0 : kThreads / BN;

  if (dropout) {
    for (int i = tid; i < BM; i += kThreads) row_key[i] = dropout_row_key(seed, static_cast<uint32_t>(m0 + i));
  }

  typename Tile::Mma::Acc acc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.0f);

  for (int64_t r0 = 0; r0 < R; r0 += RK) {
    __syncthreads();  // previous chunk consumed
#pragma unroll
    for (int i = 0; i < Tile::U_LOADS; ++i) {
      const int mm = um + i * (kThreads / RK);
      const int64_t m = m0 + mm, r = r0 + ur;
      us[mm * LDS + ur] = (m < M && r < R) ? u[m * s_um + r * s_ur] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < Tile::B_LOADS; ++i) {
      const int nn = bn + i * b_n_step, rr = br + i * b_r_step;
      const int64_t n = n0 + nn, r = r0 + rr;
      bs[nn * LDS + rr] = (n < N && r < R) ? to_float(b[n * s_bn + r * s_br]) : 0.0f;
    }
    __syncthreads();
    Tile::Mma::run(acc, us + wm * 16 * LDS, LDS, bs + wn * 64 * LDS, LDS, RK);
  }

  __syncthreads();
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    nvcuda::wmma::store_matrix_sync(cs + wm * 16 * LDC + wn * 64 + j * 16, acc[j], LDC, nvcuda::wmma::mem_row_major);
  }
  __syncthreads();

  // epilogue: this thread's Y slots are rows ym + i * Y_ROWS_PER_PASS, columns yn .. yn + V - 1;
  // all loads first, then the update and the stores
  const int ym = tid / (BN / V), yn = (tid % (BN / V)) * V;
  const bool n_in = n0 + yn < N;  // VEC_Y: N is a multiple of V
  T* y_thread = y + (m0 + ym) * s_ym + (n0 + yn) * s_yn;
  const int64_t y_row_step = Tile::Y_ROWS_PER_PASS * s_ym;
  uint4 yv[VEC_Y ? Tile::Y_LOADS : 1];
  float yf[VEC_Y ? 1 : Tile::Y_LOADS];
#pragma unroll
  for (int i = 0; i < Tile::Y_LOADS; ++i) {
    const bool in = n_in && m0 + ym + i * Tile::Y_ROWS_PER_PASS < M;
    const T* p = y_thread + i * y_row_step;
    if (VEC_Y) yv[VEC_Y ? i : 0] = in ? *reinterpret_cast<const uint4*>(p) : make_uint4(0, 0, 0, 0);
    else yf[VEC_Y ? 0 : i] = in ? to_float(p[0]) : 0.0f;
  }
#pragma unroll
  for (int i = 0; i < Tile::Y_LOADS; ++i) {
    const int mm = ym + i * Tile::Y_ROWS_PER_PASS;
    if (!n_in || m0 + mm >= M) continue;
    T* p = y_thread + i * y_row_step;
    auto update = [&](int j) {
      const float upd = scaling * cs[mm * LDC + yn + j];
      if (!dropout) return upd;
      return dropout_keep(row_key[mm], static_cast<uint32_t>(n0 + yn + j), thr31) ? upd * drop_scale : 0.0f;
    };
    if (VEC_Y) {
      uint4 v = yv[VEC_Y ? i : 0];
#pragma unroll
      for (int j = 0; j < V; ++j) vec_put<T>(v, j, vec_get<T>(v, j) + update(j));
      *reinterpret_cast<uint4*>(p) = v;
    } else {
      p[0] = from_float<T>(yf[VEC_Y ? 0 : i] + update(0));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host side


void check_sizes(const char* func, int64_t M, int64_t K, int64_t R) {
  require(M >= 0 && K >= 0, func, "sizes must be >= 0, got " + std::to_string(M) + " x " + std::to_string(K));
  require(R >= 1, func, "rank R must be >= 1, got " + std::to_string(R));
}

void check_args(const char* func, int dtype, bool dropout, uint32_t thr31) {
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, func,
          "unsupported dtype code " + std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16)");
  require(!dropout || thr31 < (1u << 31), func, "dropout threshold must be < 2**31");
}

void zero_u(float* u, int64_t s_um, int64_t s_ur, int64_t M, int64_t R, cudaStream_t stream, const char* func) {
  const int64_t blocks = std::min<int64_t>(ceil_div(M * R, kThreads), 4096);
  zero_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(u, s_um, s_ur, M, R);
  FP_CHECK_LAUNCH(func);
}

template <typename T, int NR, bool VEC_X>
void launch_shrink(dim3 grid, cudaStream_t stream, const T* x, int64_t s_xm, int64_t s_xk, const T* a,
                   int64_t s_ar, int64_t s_ak, float* u, int64_t s_um, int64_t s_ur, int64_t M, int64_t K,
                   int64_t R, int64_t k_per_split, float out_scale, bool dropout, uint32_t seed, uint32_t thr31,
                   bool atomic) {
  shrink_kernel<T, NR, VEC_X><<<grid, kThreads, 0, stream>>>(x, s_xm, s_xk, a, s_ar, s_ak, u, s_um, s_ur, M, K, R,
                                                            k_per_split, out_scale, dropout, seed, thr31, atomic);
}

}  // namespace

void lora_shrink(uintptr_t x, int64_t s_xm, int64_t s_xk, uintptr_t a, int64_t s_ar, int64_t s_ak,
                 uintptr_t u, int64_t s_um, int64_t s_ur, int64_t M, int64_t K, int64_t R, int dtype,
                 float out_scale, bool dropout, uint32_t seed, uint32_t thr31, int64_t split_k, int device,
                 uintptr_t stream_handle) {
  const char* func = "lora_shrink";
  check_sizes(func, M, K, R);
  check_args(func, dtype, dropout, thr31);
  require(split_k >= 0, func, "split_k must be >= 0 (0 chooses)");
  if (M == 0) return;
  require(u != 0 && (K == 0 || (x != 0 && a != 0)), func, "null device pointer");
  DeviceGuard guard(device, func);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (K == 0) {
    zero_u(reinterpret_cast<float*>(u), s_um, s_ur, M, R, stream, func);
    return;
  }

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    const int nr = R <= 16 ? 1 : R <= 32 ? 2 : 4;
    constexpr int BM = 128, BK = 32;
    const int64_t gx = ceil_div(M, BM), gy = ceil_div(R, 16 * nr);
    require(gx < (int64_t{1} << 31) && gy <= 65535, func, "problem too large for the grid");
    int64_t split = split_k;
    if (split == 0) {
      const int64_t want = 2 * static_cast<int64_t>(sm_count(device, func));
      split = gx * gy >= want ? 1 : std::min(ceil_div(want, gx * gy), std::max<int64_t>(1, K / 256));
    }
    const int64_t k_per_split = ceil_div(ceil_div(K, std::min<int64_t>(split, 65535)), BK) * BK;
    split = ceil_div(K, k_per_split);
    const bool atomic = split > 1;
    if (atomic) zero_u(reinterpret_cast<float*>(u), s_um, s_ur, M, R, stream, func);

    constexpr int V = vec_width<T>();
    const bool vec = s_xk == 1 && K % V == 0 && (M == 1 || s_xm % V == 0) && aligned16(x);
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(split));
    auto xp = reinterpret_cast<const T*>(x);
    auto ap = reinterpret_cast<const T*>(a);
    auto up = reinterpret_cast<float*>(u);
    auto go = [&](auto nr_tag, auto vec_tag) {
      launch_shrink<T, decltype(nr_tag)::value, decltype(vec_tag)::value>(
          grid, stream, xp, s_xm, s_xk, ap, s_ar, s_ak, up, s_um, s_ur, M, K, R, k_per_split, out_scale, dropout,
          seed, thr31, atomic);
    };
    using One = std::integral_constant<int, 1>;
    using Two = std::integral_constant<int, 2>;
    using Four = std::integral_constant<int, 4>;
    if (vec) {
      if (nr == 1) go(One{}, std::true_type{});
      else if (nr == 2) go(Two{}, std::true_type{});
      else go(Four{}, std::true_type{});
    } else {
      if (nr == 1) go(One{}, std::false_type{});
      else if (nr == 2) go(Two{}, std::false_type{});
      else go(Four{}, std::false_type{});
    }
    FP_CHECK_LAUNCH(func);
  });
}

void lora_expand(uintptr_t y, int64_t s_ym, int64_t s_yn, uintptr_t u, int64_t s_um, int64_t s_ur,
                 uintptr_t b, int64_t s_bn, int64_t s_br, int64_t M, int64_t N, int64_t R, int dtype,
                 float scaling, bool dropout, uint32_t seed, uint32_t thr31, float drop_scale, int device,
                 uintptr_t stream_handle) {
  const char* func = "lora_expand";
  check_sizes(func, M, N, R);
  check_args(func, dtype, dropout, thr31);
  if (M == 0 || N == 0) return;
  require(y != 0 && u != 0 && b != 0, func, "null device pointer");
  DeviceGuard guard(device, func);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    constexpr int BM = 64, BN = 128;
    const int64_t gx = ceil_div(M, BM), gy = ceil_div(N, BN);
    require(gx < (int64_t{1} << 31) && gy <= 65535, func, "problem too large for the grid");
    constexpr int V = vec_width<T>();
    const bool vec = s_yn == 1 && N % V == 0 && (M == 1 || s_ym % V == 0) && aligned16(y);
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    auto yp = reinterpret_cast<T*>(y);
    auto up = reinterpret_cast<const float*>(u);
    auto bp = reinterpret_cast<const T*>(b);
    if (vec) {
      expand_kernel<T, true><<<grid, kThreads, 0, stream>>>(yp, s_ym, s_yn, up, s_um, s_ur, bp, s_bn, s_br, M, N, R,
                                                           scaling, dropout, seed, thr31, drop_scale);
    } else {
      expand_kernel<T, false><<<grid, kThreads, 0, stream>>>(yp, s_ym, s_yn, up, s_um, s_ur, bp, s_bn, s_br, M, N,
                                                            R, scaling, dropout, seed, thr31, drop_scale);
    }
    FP_CHECK_LAUNCH(func);
  });
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear: no driver or no device is not an error here
    return 0;
  }
  return n;
}

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) from the -gencode targets it compiled.
std::vector<int> compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  std::vector<int> archs = {__CUDA_ARCH_LIST__};
  for (int& a : archs) a /= 10;
  return archs;
#else
  return {};
#endif
}

}  // namespace fastpeft
