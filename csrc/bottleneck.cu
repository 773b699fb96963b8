// Bottleneck adapter (Houlsby), fused forward. The specification every backend follows:
//
//   h = x W_d^T + b_d          [M, r]   accumulated in fp32
//   a = act(h), rounded to T   [M, r]   (the operand of the second GEMM)
//   z = a W_u^T + b_u          [M, d]   accumulated in fp32
//   y = x + s * z              [M, d]   in fp32, rounded to T
//
// act: relu, gelu (erf), gelu_tanh, silu; T: float, __half or __nv_bfloat16 (x, the weights, the
// biases and y all in T). x and y have a row stride and unit column stride; W_d [r, d] and
// W_u [d, r] are contiguous.
//
// One block owns BM rows of x and keeps their bottleneck activations on chip:
//   phase 1  x [BM, d] and W_d [RP, d] (r padded to the rank class RP in {32, 64, 128, 256}) are
//            streamed through shared memory in BK-column chunks (16-byte loads where aligned; the
//            next chunk is prefetched into registers while the tensor cores work on the current
//            one); 8 warps as (BM / 16) row slabs x (8 / (BM / 16)) rank groups accumulate h.
//            The accumulators pass through a small fp32 scratch, one 16-column fragment per warp
//            per round, where b_d and the activation are applied; the result, rounded to T, goes
//            to the operand buffer A [BM, RP] (zero past r). h and a never reach global memory.
//   phase 2  for each BN-column tile of d this block owns: W_u [BN, r] streamed in RK-rank
//            chunks, z = A W_u^T on tensor cores (8 warps, 2 fragments each), the accumulators
//            staged in shared memory, and the epilogue reads x again (its rows were read in
//            phase 1 and are mostly still in L2; a BM x d tile does not fit on chip for
//            d = 4096), adds s * (z + b_u) and stores y (16-byte accesses where aligned).
// grid.y splits the column tiles of phase 2 over blocks when the row blocks alone cannot fill
// the GPU (small M); each such block recomputes phase 1 for its rows.
//
// Products: m16n16k16 wmma with fp32 accumulation for fp16/bf16 (exact products); fp32 uses
// 3xTF32 (WarpMma<float, 3>, as in lora.cu) for both GEMMs, so results stay fp32-accurate.
// Shared memory is static and at most 40 KB per block (AdapterTile::SMEM_BYTES; every
// configuration is checked at compile time against the 48 KB static limit of sm_80 / sm_90), so
// 4 (sm_80) to 5 (sm_90) blocks fit on one SM. Ranks above kMaxRank = 256 are rejected.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kMaxRank = 256;
constexpr int kStaticSmemLimit = 48 * 1024;

enum Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int cmax(int a, int b) { return a > b ? a : b; }

__device__ __forceinline__ float activate(float h, int act) {
  switch (act) {
    case kRelu:
      return h < 0.0f ? 0.0f : h;  // NaN stays NaN, as torch.relu
    case kGelu:
      return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f));
    case kGeluTanh: {
      const float u = 0.79788456080286536f * (h + 0.044715f * h * h * h);
      return 0.5f * h * (1.0f + tanhf(u));
    }
    default:  // kSilu: h * sigmoid(h)
      return h / (1.0f + expf(-h));
  }
}

// Tile geometry for element type T and rank class RP; see the file comment. Shared memory:
// the operand buffer A [BM, LDA] of T, then one region reused by the phases: the phase-1 stage
// [BM + RP, LDK] of T, the fp32 scratch [BM, LDH] of the activation rounds, the W_u chunk
// [BN, LDW] of T and the fp32 accumulator tile [BM, LDC] of the epilogue.
template <typename T, int RP> struct AdapterTile {
  static constexpr bool F32 = std::is_same<T, float>::value;
  using Mma = WarpMma<T, F32 ? 3 : 1>;
  static constexpr int E = static_cast<int>(sizeof(T));
  static constexpr int V = vec_width<T>();  // elements per 16-byte access, also the row padding
  // rows per block: the largest of 64 / 32 / 16 whose buffers fit the static limit
  static constexpr int BM = F32 ? (RP <= 64 ? 64 : RP == 128 ? 32 : 16) : (RP <= 128 ? 64 : 32);
  static constexpr int WM = BM / 16, WR = 8 / WM, NF1 = RP / 16 / WR;  // phase-1 warp grid
  static constexpr int BK = F32 && RP == 256 ? 16 : 32;
  static constexpr int BN = 4096 / BM, WN = 8 / WM, NF2 = BN / 16 / WN;  // phase-2 warp grid
  static constexpr int RK = F32 ? 16 : 32;
  static constexpr int LDK = BK + V, LDA = RP + V, LDW = RK + V;  // 16-byte row padding
  static constexpr int LDH = WR * 16 + 4, LDC = BN + 4;           // fp32 rows, 16-byte padding
  static constexpr int STAGE_ROWS = BM + RP;
  static constexpr int STAGE_SLOTS = STAGE_ROWS * (BK / V);
  static constexpr int LOADS1 = (STAGE_SLOTS + kThreads - 1) / kThreads;
  static constexpr int LOADS2 = BN * (RK / V) / kThreads;
  static constexpr int OUT_SLOTS = BM * (BN / V) / kThreads;
  static constexpr int ROUND_COLS = WR * 16, ROUND_ROWS_PER_PASS = kThreads / ROUND_COLS;
  static constexpr int A_BYTES = BM * LDA * E;
  static constexpr int STAGE_BYTES = STAGE_ROWS * LDK * E;
  static constexpr int H_BYTES = BM * LDH * 4;
  static constexpr int W_BYTES = BN * LDW * E;
  static constexpr int C_BYTES = BM * LDC * 4;
  static constexpr int REGION_BYTES = cmax(cmax(STAGE_BYTES, H_BYTES), cmax(W_BYTES, C_BYTES));
  static constexpr int SMEM_BYTES = A_BYTES + REGION_BYTES;

  static_assert(WM * WR == kThreads / 32 && WM * WN == kThreads / 32, "8 warps in both phases");
  static_assert(NF1 >= 1 && NF1 * WR * 16 == RP, "phase 1: whole rank fragments per warp");
  static_assert(NF2 >= 1 && NF2 * WN * 16 == BN, "phase 2: whole column fragments per warp");
  static_assert(BK % Mma::KS == 0 && RK % Mma::KS == 0 && RP % RK == 0, "chunks of whole k-steps");
  static_assert(BN * (RK / V) % kThreads == 0 && BM * (BN / V) % kThreads == 0, "even loads and stores");
  static_assert(kThreads % ROUND_COLS == 0 && BM % ROUND_ROWS_PER_PASS == 0, "even activation rounds");
  static_assert(A_BYTES % 128 == 0, "the reused region stays 128-byte aligned (wmma wants 32)");
  static_assert(SMEM_BYTES <= kStaticSmemLimit, "static shared memory above 48 KB");
};

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 2)
bottleneck_adapter_forward_kernel(const T* __restrict__ x, int64_t s_xm, const T* __restrict__ wd, const T* __restrict__ bd,
                       const T* __restrict__ wu, const T* __restrict__ bu, T* __restrict__ y, int64_t s_ym,
                       int64_t M, int64_t D, int R, int act, float scaling, bool vec1, bool vec_wu, bool vec_y) {
  using Tile = AdapterTile<T, RP>;
  using Mma = typename Tile::Mma;
  constexpr int BM = Tile::BM, BK = Tile::BK, BN = Tile::BN, RK = Tile::RK, V = Tile::V;
  constexpr int NF1 = Tile::NF1, NF2 = Tile::NF2, WM = Tile::WM;
  constexpr int LDK = Tile::LDK, LDA = Tile::LDA, LDW = Tile::LDW, LDH = Tile::LDH, LDC = Tile::LDC;
  __shared__ __align__(128) unsigned char smem[Tile::SMEM_BYTES];
  T* abuf = reinterpret_cast<T*>(smem);
  unsigned char* region = smem + Tile::A_BYTES;
  T* stage = reinterpret_cast<T*>(region);     // phase 1: rows 0..BM-1 x, rows BM.. W_d
  float* hs = reinterpret_cast<float*>(region);  // activation rounds
  T* wchunk = reinterpret_cast<T*>(region);    // phase 2: W_u chunk
  float* cs = reinterpret_cast<float*>(region);  // phase 2: accumulators for the epilogue

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % WM, wg = warp / WM;  // row slab; rank group (phase 1) / column group (phase 2)
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;

  // ---- phase 1: h = x W_d^T over BK-column chunks
  uint4 pre[Tile::LOADS1];
  auto load1 = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < Tile::LOADS1; ++i) {
      const int s = tid + i * kThreads;
      const int row = s / (BK / V), col = s % (BK / V) * V;
      const int64_t k = k0 + col;
      uint4 v = make_uint4(0, 0, 0, 0);
      const T* p = nullptr;
      if (s < Tile::STAGE_SLOTS) {
        if (row < BM) {
          if (m0 + row < M) p = x + (m0 + row) * s_xm;
        } else if (row - BM < R) {
          p = wd + static_cast<int64_t>(row - BM) * D;
        }
      }
      if (p != nullptr) {
        if (vec1) {  // D is a multiple of V
          if (k < D) v = __ldg(reinterpret_cast<const uint4*>(p + k));
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (k + j < D) vec_put<T>(v, j, to_float(p[k + j]));
          }
        }
      }
      pre[i] = v;
    }
  };
  auto stage1 = [&]() {
#pragma unroll
    for (int i = 0; i < Tile::LOADS1; ++i) {
      const int s = tid + i * kThreads;
      if (s < Tile::STAGE_SLOTS) {
        *reinterpret_cast<uint4*>(stage + (s / (BK / V)) * LDK + s % (BK / V) * V) = pre[i];
      }
    }
  };

  typename Mma::Acc acc[NF1];
#pragma unroll
  for (int j = 0; j < NF1; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.0f);
  const bool ranks_live = wg * NF1 * 16 < R;  // this warp's rank fragments are not all padding

  load1(0);
  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    __syncthreads();  // previous chunk consumed
    stage1();
    __syncthreads();
    if (k0 + BK < D) load1(k0 + BK);
    if (ranks_live) Mma::run(acc, stage + wm * 16 * LDK, LDK, stage + (BM + wg * NF1 * 16) * LDK, LDK, BK);
  }

  // ---- a = act(h + b_d) rounded to T, into A; one fragment per warp per round. The column of
  // a thread is the same in every pass (kThreads is a multiple of ROUND_COLS).
  {
    const int c = tid % Tile::ROUND_COLS, row0 = tid / Tile::ROUND_COLS;
#pragma unroll
    for (int j = 0; j < NF1; ++j) {
      __syncthreads();  // the stage (first round) or the previous round's scratch consumed
      nvcuda::wmma::store_matrix_sync(hs + wm * 16 * LDH + wg * 16, acc[j], LDH, nvcuda::wmma::mem_row_major);
      __syncthreads();
      const int col = (c / 16 * NF1 + j) * 16 + c % 16;
      const bool live = col < R;
      const float bias = live && bd != nullptr ? to_float(bd[col]) : 0.0f;
      for (int mm = row0; mm < BM; mm += Tile::ROUND_ROWS_PER_PASS) {
        const float a = live ? activate(hs[mm * LDH + c] + bias, act) : 0.0f;
        abuf[mm * LDA + col] = from_float<T>(a);
      }
    }
  }

  // ---- phase 2: per column tile, z = A W_u^T over RK-rank chunks, then y = x + s (z + b_u)
  const int64_t n_tiles = (D + BN - 1) / BN;
  const int r_lim = (R + RK - 1) / RK * RK;  // <= RP
  uint4 wpre[Tile::LOADS2];
  auto load2 = [&](int64_t n0, int r0) {
#pragma unroll
    for (int i = 0; i < Tile::LOADS2; ++i) {
      const int s = tid + i * kThreads;
      const int64_t n = n0 + s / (RK / V);
      const int r = r0 + s % (RK / V) * V;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (n < D) {
        const T* p = wu + n * R;
        if (vec_wu) {  // R is a multiple of V
          if (r < R) v = __ldg(reinterpret_cast<const uint4*>(p + r));
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (r + j < R) vec_put<T>(v, j, to_float(p[r + j]));
          }
        }
      }
      wpre[i] = v;
    }
  };

  for (int64_t t = blockIdx.y; t < n_tiles; t += gridDim.y) {
    const int64_t n0 = t * BN;
    typename Mma::Acc acc2[NF2];
#pragma unroll
    for (int j = 0; j < NF2; ++j) nvcuda::wmma::fill_fragment(acc2[j], 0.0f);
    const bool cols_live = n0 + wg * NF2 * 16 < D;

    load2(n0, 0);
    for (int r0 = 0; r0 < r_lim; r0 += RK) {
      __syncthreads();  // A written (first chunk), the previous chunk or the previous epilogue done
#pragma unroll
      for (int i = 0; i < Tile::LOADS2; ++i) {
        const int s = tid + i * kThreads;
        *reinterpret_cast<uint4*>(wchunk + (s / (RK / V)) * LDW + s % (RK / V) * V) = wpre[i];
      }
      __syncthreads();
      if (r0 + RK < r_lim) load2(n0, r0 + RK);
      if (cols_live) Mma::run(acc2, abuf + wm * 16 * LDA + r0, LDA, wchunk + wg * NF2 * 16 * LDW, LDW, RK);
    }

    __syncthreads();  // the W_u chunk, which cs overlays, consumed
#pragma unroll
    for (int j = 0; j < NF2; ++j) {
      nvcuda::wmma::store_matrix_sync(cs + wm * 16 * LDC + (wg * NF2 + j) * 16, acc2[j], LDC,
                                      nvcuda::wmma::mem_row_major);
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < Tile::OUT_SLOTS; ++i) {
      const int s = tid + i * kThreads;
      const int mm = s / (BN / V), cc = s % (BN / V) * V;
      const int64_t m = m0 + mm, n = n0 + cc;
      if (m >= M || n >= D) continue;
      const T* xp = x + m * s_xm + n;
      T* yp = y + m * s_ym + n;
      if (vec_y) {  // D is a multiple of V: all V columns are in
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xp));
        uint4 out = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float z = cs[mm * LDC + cc + j] + (bu != nullptr ? to_float(bu[n + j]) : 0.0f);
          vec_put<T>(out, j, vec_get<T>(xv, j) + scaling * z);
        }
        *reinterpret_cast<uint4*>(yp) = out;
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (n + j < D) {
            const float z = cs[mm * LDC + cc + j] + (bu != nullptr ? to_float(bu[n + j]) : 0.0f);
            yp[j] = from_float<T>(to_float(xp[j]) + scaling * z);
          }
        }
      }
    }
  }
}

}  // namespace

void bottleneck_adapter_forward(const BottleneckAdapterForwardParams& p) {
  FASTPEFT_BOTTLENECK_ADAPTER_FORWARD(FASTPEFT_UNPACK)
  const char* func = "bottleneck_adapter_forward";
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, func,
          "unsupported dtype code " + std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16)");
  require(activation >= kRelu && activation <= kSilu, func,
          "unknown activation code " + std::to_string(activation) + " (0 relu, 1 gelu, 2 gelu_tanh, 3 silu)");
  require(M >= 0 && D >= 0, func, "sizes must be >= 0, got M=" + std::to_string(M) + ", d=" + std::to_string(D));
  require(R >= 1, func, "bottleneck size r must be >= 1, got " + std::to_string(R));
  require(R <= kMaxRank, func,
          "bottleneck size r=" + std::to_string(R) + " exceeds the CUDA kernel's limit of " +
              std::to_string(kMaxRank) + " (the bottleneck activations of a row tile are kept on chip)");
  require(n_split >= 0, func, "n_split must be >= 0 (0 chooses)");
  if (M == 0 || D == 0) return;
  require(x != 0 && wd != 0 && wu != 0 && y != 0, func, "null device pointer");
  require(M == 1 || s_ym >= D, func, "the rows of y overlap (row stride " + std::to_string(s_ym) + " < d)");
  DeviceGuard guard(device, func);

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto rp_tag) {
      constexpr int RP = decltype(rp_tag)::value;
      using Tile = AdapterTile<T, RP>;
      const int64_t gx = ceil_div(M, Tile::BM), n_tiles = ceil_div(D, Tile::BN);
      require(gx < (int64_t{1} << 31), func, "too many rows for the grid");
      int64_t split = n_split;
      if (split == 0) {  // fill the GPU with column splits when the row blocks alone cannot
        const int64_t sms = sm_count(device, func);
        split = gx >= sms ? 1 : ceil_div(sms, gx);
      }
      split = std::min<int64_t>(std::min<int64_t>(split, n_tiles), 65535);
      constexpr int V = vec_width<T>();
      const bool vec_x = D % V == 0 && aligned16(x) && (M == 1 || s_xm % V == 0);
      const bool vec1 = vec_x && aligned16(wd);
      const bool vec_wu = R % V == 0 && aligned16(wu);
      const bool vec_y = vec_x && aligned16(y) && (M == 1 || s_ym % V == 0);
      const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(split));
      bottleneck_adapter_forward_kernel<T, RP><<<grid, kThreads, 0, stream>>>(
          reinterpret_cast<const T*>(x), s_xm, reinterpret_cast<const T*>(wd), reinterpret_cast<const T*>(bd),
          reinterpret_cast<const T*>(wu), reinterpret_cast<const T*>(bu), reinterpret_cast<T*>(y), s_ym, M, D,
          static_cast<int>(R), activation, scaling, vec1, vec_wu, vec_y);
      FP_CHECK_LAUNCH(func);
    };
    if (R <= 32) go(std::integral_constant<int, 32>{});
    else if (R <= 64) go(std::integral_constant<int, 64>{});
    else if (R <= 128) go(std::integral_constant<int, 128>{});
    else go(std::integral_constant<int, 256>{});
  });
}

}  // namespace fastpeft
