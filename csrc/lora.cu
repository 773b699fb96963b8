// LoRA kernels: the two skinny GEMMs of  y = x W^T + b + s * (dropout(x) A^T) B^T, for one adapter
// or for a batch whose rows each pick an adapter from a stack (multi-adapter serving).
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
//
// Multi-adapter batches (MULTI = true) run the same kernels with an AdapterMap: position p of
// the batch is row row_order[p] (identity without row_order), row i uses adapter a = indices[i]
// of the stacks A [n, R, K] / B [n, N, R] (R = r_max) with rank min(ranks[a], R) and scaling
// scalings[a]; an index outside [0, n) (or a rank < 1) means no adapter. A block tile reads its
// rows' adapters into shared memory and runs its K (shrink) or rank (expand) loop once per
// distinct adapter of the tile ("segment"), with the tile rows of other adapters loaded as zeros
// and the weights masked to the adapter's rank, so each row's accumulators only ever receive its
// own adapter's products and one epilogue writes them all. Rows sorted by adapter (row_order)
// make a tile one segment (two where it straddles adapters). Decode batches (every row its own
// adapter) use 16-row tiles whose 8 warps split K (shrink) or N (expand), and grid.z "slices":
// the ord-th distinct adapter of a tile belongs to block ord % slices, so the adapters of a tile
// run in parallel blocks, each writing only its own rows. Ranks, indices and row_order are read
// on the device and grids depend on shapes only (CUDA-graph safe, no host synchronization).
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
// multi-adapter batches: the per-row adapter lookup shared by both kernels

struct AdapterMap {
  const int32_t* row_order = nullptr;  // [M]: position -> row (null: identity)
  const void* indices = nullptr;       // [M]: the adapter of each row, int32 or int64 (idx64)
  const int32_t* ranks = nullptr;      // [n]
  const float* scalings = nullptr;     // [n] (expand)
  int64_t n = 0;                       // adapters in the stack
  int64_t s_wa = 0;                    // element stride between two adapters' weights
  int slices = 1;                      // blocks sharing a row tile (grid.z), see the file comment
  bool idx64 = false;
};

constexpr int32_t kNoAdapter = INT32_MAX;

// Fills a tile's row table: row[p] = the row at position m0 + p (-1: past M, or a row_order entry
// outside [0, M)); ad[p] = its adapter (-1: none); scale[p] = the adapter's scaling (when scale is
// given); mine[p] = whether this block writes the row: set here for rows without adapter (slice 0
// writes them when claim_unmapped), by for_each_adapter for the others. Position p is thread p's.
template <int BM>
__device__ __forceinline__ void map_tile_rows(const AdapterMap& map, int64_t m0, int64_t M, int slice,
                                              bool claim_unmapped, int64_t* row, int32_t* ad, float* scale,
                                              unsigned char* mine) {
  static_assert(BM <= kThreads, "one position per thread");
  const int p = threadIdx.x;
  if (p >= BM) return;
  int64_t m = -1;
  int32_t a = -1;
  if (m0 + p < M) {
    m = map.row_order != nullptr ? static_cast<int64_t>(map.row_order[m0 + p]) : m0 + p;
    if (m < 0 || m >= M) m = -1;
  }
  if (m >= 0) {
    const int64_t j = map.idx64 ? static_cast<const int64_t*>(map.indices)[m]
                                : static_cast<int64_t>(static_cast<const int32_t*>(map.indices)[m]);
    if (j >= 0 && j < map.n && map.ranks[j] >= 1) a = static_cast<int32_t>(j);
  }
  row[p] = m;
  ad[p] = a;
  if (scale != nullptr) scale[p] = a >= 0 ? map.scalings[a] : 0.0f;
  mine[p] = a < 0 && claim_unmapped && slice == 0;
}

// The smallest adapter of the tile above `after` (kNoAdapter: none left); the same in every thread.
template <int BM> __device__ __forceinline__ int32_t next_adapter(const int32_t* ad, int32_t after) {
  int32_t best = kNoAdapter;
  for (int p = 0; p < BM; ++p) {
    const int32_t a = ad[p];
    if (a > after && a < best) best = a;
  }
  return best;
}

// Whether one of the 16 rows from `first` on (a warp's row slab) uses adapter a.
__device__ __forceinline__ bool slab_uses(const int32_t* ad, int first, int32_t a) {
  bool any = false;
#pragma unroll
  for (int p = 0; p < 16; ++p) any |= ad[first + p] == a;
  return any;
}

// Calls body(a) for each adapter a of the tile that is this block's (the ord-th distinct adapter, in
// increasing order, belongs to slice ord % slices) and marks the rows of every adapter in mine[].
// Uniform over the block: body may hold __syncthreads.
template <int BM, typename F>
__device__ __forceinline__ void for_each_adapter(const int32_t* ad, unsigned char* mine, int slices, int slice,
                                                 F&& body) {
  int32_t cur = -1;
  for (int ord = 0;; ++ord) {
    cur = next_adapter<BM>(ad, cur);
    if (cur == kNoAdapter) break;
    const bool ours = ord % slices == slice;
    if (threadIdx.x < BM && ad[threadIdx.x] == cur) mine[threadIdx.x] = ours;
    if (ours) body(cur);
  }
}

// ---------------------------------------------------------------------------------------------
// shrink: block tile BM rows x BR ranks, K staged in BK chunks (register prefetch of the next
// chunk overlaps the tensor-core work on the current one); grid.z splits K in two at most (atomic
// adds into a zeroed U, deterministic: see kMaxSplitK) and, for multi-adapter batches, holds the
// slices. The 8 warps are WM (rows) x WR (rank
// fragments) x WK (k): 8 x 1 x 1 for 128-row tiles (each warp a 16-row slab, all of each 32-wide
// chunk); 1 x WR x 8 / WR for 16-row tiles (decode): the warps split each chunk into 16-wide k
// slices (WR = 2 for 4 rank fragments, halving the chunk, so that the prefetched A elements fit in
// registers) and the epilogue sums their partial products.

template <typename T, int NR, bool VEC_X, int WM = 8> struct ShrinkTile {
  using Mma = WarpMma<T, std::is_same<T, float>::value ? 3 : 1>;
  static constexpr int WR = WM == 1 && NR == 4 ? 2 : 1;  // warps sharing the rank fragments
  static constexpr int WK = kThreads / 32 / WM / WR;     // warps sharing each chunk along k
  static constexpr int NRW = NR / WR;                    // rank fragments per warp
  static constexpr int KW = WK == 1 ? 32 : 16;           // k per warp and chunk
  static constexpr int BM = 16 * WM, BR = 16 * NR, BK = KW * WK;
  static constexpr int LDS = BK + 16 / static_cast<int>(sizeof(T));  // 16-byte row padding
  static constexpr int LDC = BR + 4;
  static constexpr int V = VEC_X ? vec_width<T>() : 1;
  static constexpr int X_ROWS_PER_PASS = kThreads / (BK / V);    // > BM: some threads load no X
  static constexpr int X_LOADS = X_ROWS_PER_PASS > BM ? 1 : BM / X_ROWS_PER_PASS;
  static constexpr int A_LOADS = BR * BK / kThreads;
  static constexpr int STAGE_BYTES = (BM + BR) * LDS * static_cast<int>(sizeof(T));
  static constexpr int C_BYTES = WK * BM * LDC * static_cast<int>(sizeof(float));
  static constexpr int SMEM_BYTES = STAGE_BYTES > C_BYTES ? STAGE_BYTES : C_BYTES;
  static_assert(WM * WR * WK == kThreads / 32 && NRW * WR == NR && KW % Mma::KS == 0, "8 warps, whole k-steps");
  static_assert(kThreads % (BK / V) == 0 && (BM % X_ROWS_PER_PASS == 0 || X_ROWS_PER_PASS % BM == 0),
                "even X loads");
  static_assert(BR * BK % kThreads == 0 && kThreads % BK == 0 && kThreads % BR == 0, "even A loads");
  static_assert(SMEM_BYTES + 17 * BM <= 48 * 1024, "static shared memory above 48 KB");  // + the row tables
};

template <typename T, int NR, bool VEC_X, int WM, bool MULTI>
__global__ void __launch_bounds__(kThreads, 2)
shrink_kernel(const T* __restrict__ x, int64_t s_xm, int64_t s_xk,
              const T* __restrict__ a, int64_t s_ar, int64_t s_ak,
              float* __restrict__ u, int64_t s_um, int64_t s_ur,
              int64_t M, int64_t K, int64_t R, int64_t k_per_split, float out_scale,
              bool dropout, const int64_t* __restrict__ seed, uint32_t thr31, bool atomic, AdapterMap map) {
  using Tile = ShrinkTile<T, NR, VEC_X, WM>;
  constexpr int BM = Tile::BM, BR = Tile::BR, BK = Tile::BK, KW = Tile::KW, LDS = Tile::LDS, LDC = Tile::LDC;
  constexpr int V = Tile::V;
  __shared__ __align__(128) unsigned char smem[Tile::SMEM_BYTES];
  __shared__ uint32_t row_key[BM];
  __shared__ int64_t tile_row[MULTI ? BM : 1];
  __shared__ int32_t tile_ad[MULTI ? BM : 1];
  __shared__ unsigned char tile_mine[MULTI ? BM : 1];
  T* xs = reinterpret_cast<T*>(smem);
  T* as = xs + BM * LDS;
  float* cs = reinterpret_cast<float*>(smem);  // reused for the epilogue

  const int tid = threadIdx.x;
  const int warp = tid / 32, wm = WM == 8 ? warp : warp % WM;
  const int wr = Tile::WR == 1 ? 0 : warp / WM % Tile::WR, wk = Tile::WK == 1 ? 0 : warp / WM / Tile::WR;
  const int slice = MULTI ? static_cast<int>(blockIdx.z % static_cast<unsigned>(map.slices)) : 0;
  const int64_t kz = MULTI ? blockIdx.z / static_cast<unsigned>(map.slices) : blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int64_t k_begin = kz * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;

  // X slots: positions xm + i * X_ROWS_PER_PASS, columns xk .. xk + V - 1 of each chunk
  const int xm = tid / (BK / V), xk = (tid % (BK / V)) * V;
  const bool x_slot = Tile::X_ROWS_PER_PASS <= BM || xm < BM;  // this thread loads X
  const T* x_thread = x + (m0 + xm) * s_xm + xk * s_xk;  // single adapter: position = row
  const int64_t x_row_step = Tile::X_ROWS_PER_PASS * s_xm;
  // A slots: along k when k is contiguous, else along r
  const bool a_k_fast = s_ak == 1;
  const int ar = a_k_fast ? tid / BK : tid % BR, ak = a_k_fast ? tid % BK : tid / BR;
  const int a_r_step = a_k_fast ? kThreads / BK : 0, a_k_step = a_k_fast ? 0 : kThreads / BR;

  if (dropout) {  // the seed lives in device memory: a replayed CUDA graph reads a fresh draw
    const uint32_t seed32 = static_cast<uint32_t>(*seed);
    for (int i = tid; i < BM; i += kThreads) row_key[i] = dropout_row_key(seed32, static_cast<uint32_t>(m0 + i));
  }
  if constexpr (MULTI) {
    map_tile_rows<BM>(map, m0, M, slice, true, tile_row, tile_ad, nullptr, tile_mine);
    __syncthreads();
  }

  uint4 xv[VEC_X ? Tile::X_LOADS : 1];
  T xe[VEC_X ? 1 : Tile::X_LOADS];
  T ae[Tile::A_LOADS];

  // loads chunk k0 of a segment: the X rows of adapter seg (MULTI), its weights aw up to its rank
  auto load = [&](int64_t k0, int32_t seg, int64_t rank, const T* aw) {
    const bool k_in = x_slot && k0 + xk < k_end;  // VEC_X: k_end and K are multiples of V
#pragma unroll
    for (int i = 0; i < Tile::X_LOADS; ++i) {
      const int mm = xm + i * Tile::X_ROWS_PER_PASS;
      const bool in = k_in && (MULTI ? tile_ad[mm] == seg : m0 + xm + i * Tile::X_ROWS_PER_PASS < M);
      const T* p = !MULTI ? x_thread + i * x_row_step + k0 * s_xk
                          : in ? x + tile_row[mm] * s_xm + (k0 + xk) * s_xk : x;
      if (VEC_X) xv[VEC_X ? i : 0] = in ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
      else xe[VEC_X ? 0 : i] = in ? p[0] : zero_value<T>();
    }
#pragma unroll
    for (int i = 0; i < Tile::A_LOADS; ++i) {
      const int64_t r = r0 + ar + i * a_r_step, k = k0 + ak + i * a_k_step;
      ae[i] = (r < rank && k < k_end) ? aw[r * s_ar + k * s_ak] : zero_value<T>();
    }
  };

  auto stage = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < Tile::X_LOADS; ++i) {
      if (!x_slot) break;
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

  typename Tile::Mma::Acc acc[Tile::NRW];
#pragma unroll
  for (int j = 0; j < Tile::NRW; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.0f);

  // the K loop of one segment: nf of this warp's rank fragments (the others are padding); warps whose
  // slab holds none of the segment's rows, or whose fragments are all padding (!live), skip the products
  auto run_segment = [&](int32_t seg, int64_t rank, const T* aw, int nf, bool live) {
    if (k_begin < k_end) load(k_begin, seg, rank, aw);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
      __syncthreads();  // previous chunk consumed (and row keys written)
      stage(k0);
      __syncthreads();
      if (k0 + BK < k_end) load(k0 + BK, seg, rank, aw);
      if (live) {
        Tile::Mma::run(acc, xs + wm * 16 * LDS + wk * KW, LDS, as + wr * Tile::NRW * 16 * LDS + wk * KW, LDS, KW,
                       nf);
      }
    }
  };

  if constexpr (MULTI) {
    for_each_adapter<BM>(tile_ad, tile_mine, map.slices, slice, [&](int32_t ad) {
      const int64_t rank = map.ranks[ad] < R ? map.ranks[ad] : R;
      if (r0 >= rank) return;  // this rank tile is all padding for the adapter: its columns stay 0
      const int64_t frags = (rank - r0 + 15) / 16 - wr * Tile::NRW;  // of this warp's
      const int nf = frags < Tile::NRW ? static_cast<int>(frags) : Tile::NRW;
      run_segment(ad, rank, a + ad * map.s_wa, nf, nf > 0 && (WM == 1 || slab_uses(tile_ad, wm * 16, ad)));
    });
  } else {
    run_segment(0, R, a, Tile::NRW, true);
  }

  __syncthreads();
#pragma unroll
  for (int j = 0; j < Tile::NRW; ++j) {
    nvcuda::wmma::store_matrix_sync(cs + (wk * BM + wm * 16) * LDC + (wr * Tile::NRW + j) * 16, acc[j], LDC,
                                    nvcuda::wmma::mem_row_major);
  }
  __syncthreads();
  for (int idx = tid; idx < BM * BR; idx += kThreads) {
    const int mm = idx / BR, rr = idx % BR;
    const int64_t m = MULTI ? tile_row[mm] : m0 + mm, r = r0 + rr;
    const bool ours = MULTI ? m >= 0 && tile_mine[mm] : m < M;
    if (ours && r < R) {
      float sum = cs[mm * LDC + rr];
#pragma unroll
      for (int w = 1; w < Tile::WK; ++w) sum += cs[(w * BM + mm) * LDC + rr];
      const float v = out_scale * sum;
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
// expand: block tile BM x BN of Y, R in RK chunks; WM warps along the rows: 4 (64 x 128 tiles,
// 4 x 2 warps, each 16 x 64) or 1 (16 x 128 tiles for decode, 1 x 8 warps, each 16 x 16).
// U and B are staged as fp32 and multiplied in TF32 (3 passes for fp32 Y, else 1: 16-bit B is
// exact in TF32, so only U is rounded to 10 mantissa bits, finer than the fp16/bf16 output).

template <typename T, bool VEC_Y, int WM = 4> struct ExpandTile {
  using Mma = WarpMma<float, std::is_same<T, float>::value ? 3 : 1>;
  static constexpr int WN = kThreads / 32 / WM;
  static constexpr int NF = WM == 1 ? 1 : 4;  // 16-column fragments per warp
  static constexpr int BM = 16 * WM, BN = 16 * NF * WN, RK = 16;
  static constexpr int LDS = RK + 4, LDC = BN + 4;
  static constexpr int V = VEC_Y ? vec_width<T>() : 1;
  static constexpr int Y_ROWS_PER_PASS = kThreads / (BN / V);
  static constexpr int Y_LOADS = BM / Y_ROWS_PER_PASS;
  static constexpr int U_LOADS = BM * RK / kThreads;
  static constexpr int B_LOADS = BN * RK / kThreads;
  static constexpr int STAGE_BYTES = (BM + BN) * LDS * static_cast<int>(sizeof(float));
  static constexpr int C_BYTES = BM * LDC * static_cast<int>(sizeof(float));
  static constexpr int SMEM_BYTES = STAGE_BYTES > C_BYTES ? STAGE_BYTES : C_BYTES;
  static_assert(WM * WN == kThreads / 32, "one 16 x 16NF slab per warp");
  static_assert(BM % Y_ROWS_PER_PASS == 0 && BM * RK % kThreads == 0, "even tile loads");
  static_assert(BN * RK % kThreads == 0 && kThreads % BN == 0, "even B loads");
};

template <typename T, bool VEC_Y, int WM, bool MULTI>
__global__ void __launch_bounds__(kThreads, 2)
expand_kernel(T* __restrict__ y, int64_t s_ym, int64_t s_yn,
              const float* __restrict__ u, int64_t s_um, int64_t s_ur,
              const T* __restrict__ b, int64_t s_bn, int64_t s_br,
              int64_t M, int64_t N, int64_t R, float scaling,
              bool dropout, const int64_t* __restrict__ seed, uint32_t thr31, float drop_scale, AdapterMap map) {
  using Tile = ExpandTile<T, VEC_Y, WM>;
  constexpr int BM = Tile::BM, BN = Tile::BN, RK = Tile::RK, LDS = Tile::LDS, LDC = Tile::LDC, V = Tile::V;
  constexpr int NF = Tile::NF;
  __shared__ __align__(128) unsigned char smem[Tile::SMEM_BYTES];
  __shared__ uint32_t row_key[BM];
  __shared__ int64_t tile_row[MULTI ? BM : 1];
  __shared__ int32_t tile_ad[MULTI ? BM : 1];
  __shared__ float tile_scale[MULTI ? BM : 1];
  __shared__ unsigned char tile_mine[MULTI ? BM : 1];
  float* us = reinterpret_cast<float*>(smem);
  float* bs = us + BM * LDS;
  float* cs = reinterpret_cast<float*>(smem);  // reused for the epilogue

  const int tid = threadIdx.x;
  const int warp = tid / 32, wm = warp % WM, wn = warp / WM;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;

  // U slots: along r; B slots: along r when r is contiguous, else along n
  const int um = tid / RK, ur = tid % RK;
  const bool b_r_fast = s_br == 1;
  const int bn = b_r_fast ? tid / RK : tid % BN, br = b_r_fast ? tid % RK : tid / BN;
  const int b_n_step = b_r_fast ? kThreads / RK : 0, b_r_step = b_r_fast ? 0 : kThreads / BN;

  if (dropout) {  // the seed lives in device memory: a replayed CUDA graph reads a fresh draw
    const uint32_t seed32 = static_cast<uint32_t>(*seed);
    for (int i = tid; i < BM; i += kThreads) row_key[i] = dropout_row_key(seed32, static_cast<uint32_t>(m0 + i));
  }
  if constexpr (MULTI) {  // rows without adapter are nobody's: never written
    map_tile_rows<BM>(map, m0, M, static_cast<int>(blockIdx.z), false, tile_row, tile_ad, tile_scale, tile_mine);
    __syncthreads();
  }

  typename Tile::Mma::Acc acc[NF];
#pragma unroll
  for (int j = 0; j < NF; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.0f);

  // the rank loop of one segment (adapter seg, rank chunks up to `rank`, weights bw)
  auto run_segment = [&](int32_t seg, int64_t rank, const T* bw, bool live) {
    for (int64_t r0 = 0; r0 < rank; r0 += RK) {
      __syncthreads();  // previous chunk consumed
#pragma unroll
      for (int i = 0; i < Tile::U_LOADS; ++i) {
        const int mm = um + i * (kThreads / RK);
        const int64_t m = MULTI ? tile_row[mm] : m0 + mm, r = r0 + ur;
        const bool in = (MULTI ? tile_ad[mm] == seg : m < M) && r < rank;
        us[mm * LDS + ur] = in ? u[m * s_um + r * s_ur] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < Tile::B_LOADS; ++i) {
        const int nn = bn + i * b_n_step, rr = br + i * b_r_step;
        const int64_t n = n0 + nn, r = r0 + rr;
        bs[nn * LDS + rr] = (n < N && r < rank) ? to_float(bw[n * s_bn + r * s_br]) : 0.0f;
      }
      __syncthreads();
      if (live) Tile::Mma::run(acc, us + wm * 16 * LDS, LDS, bs + wn * NF * 16 * LDS, LDS, RK);
    }
  };

  if constexpr (MULTI) {
    for_each_adapter<BM>(tile_ad, tile_mine, map.slices, static_cast<int>(blockIdx.z), [&](int32_t ad) {
      const int64_t rank = map.ranks[ad] < R ? map.ranks[ad] : R;
      run_segment(ad, rank, b + ad * map.s_wa, WM == 1 || slab_uses(tile_ad, wm * 16, ad));
    });
  } else {
    run_segment(0, R, b, true);
  }

  __syncthreads();
#pragma unroll
  for (int j = 0; j < NF; ++j) {
    nvcuda::wmma::store_matrix_sync(cs + wm * 16 * LDC + wn * NF * 16 + j * 16, acc[j], LDC,
                                    nvcuda::wmma::mem_row_major);
  }
  __syncthreads();

  // epilogue: this thread's Y slots are positions ym + i * Y_ROWS_PER_PASS, columns yn .. yn + V - 1;
  // all loads first, then the update and the stores
  const int ym = tid / (BN / V), yn = (tid % (BN / V)) * V;
  const bool n_in = n0 + yn < N;  // VEC_Y: N is a multiple of V
  T* y_thread = y + (m0 + ym) * s_ym + (n0 + yn) * s_yn;  // single adapter: position = row
  const int64_t y_row_step = Tile::Y_ROWS_PER_PASS * s_ym;
  uint4 yv[VEC_Y ? Tile::Y_LOADS : 1];
  float yf[VEC_Y ? 1 : Tile::Y_LOADS];
#pragma unroll
  for (int i = 0; i < Tile::Y_LOADS; ++i) {
    const int mm = ym + i * Tile::Y_ROWS_PER_PASS;
    // MULTI: the rows of this block's adapters
    const bool in = n_in && (MULTI ? tile_mine[mm] != 0 : m0 + ym + i * Tile::Y_ROWS_PER_PASS < M);
    const T* p = !MULTI ? y_thread + i * y_row_step : in ? y + tile_row[mm] * s_ym + (n0 + yn) * s_yn : y;
    if (VEC_Y) yv[VEC_Y ? i : 0] = in ? *reinterpret_cast<const uint4*>(p) : make_uint4(0, 0, 0, 0);
    else yf[VEC_Y ? 0 : i] = in ? to_float(p[0]) : 0.0f;
  }
#pragma unroll
  for (int i = 0; i < Tile::Y_LOADS; ++i) {
    const int mm = ym + i * Tile::Y_ROWS_PER_PASS;
    if (!n_in || (MULTI ? tile_mine[mm] == 0 : m0 + mm >= M)) continue;
    T* p = !MULTI ? y_thread + i * y_row_step : y + tile_row[mm] * s_ym + (n0 + yn) * s_yn;
    auto update = [&](int j) {
      const float upd = (MULTI ? tile_scale[mm] : scaling) * cs[mm * LDC + yn + j];
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

using One = std::integral_constant<int, 1>;
using Two = std::integral_constant<int, 2>;
using Four = std::integral_constant<int, 4>;

// f(NR tag) for rank fragments per warp nr (1, 2 or 4); f(bool tag) for a flag
template <typename F> void dispatch_nr(int nr, F&& f) {
  if (nr == 1) f(One{});
  else if (nr == 2) f(Two{});
  else f(Four{});
}
template <typename F> void dispatch_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

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

// The K split of the shrinks is at most two, which makes it deterministic without a workspace:
// each element of U is zeroed, then receives exactly two atomic adds, and 0 + a is exact, so it
// ends as fl(a + b) = fl(b + a) whichever split adds first (IEEE addition is commutative; with
// subnormals flushed, ftz(ftz(a) + ftz(b)) is symmetric too). Three or more partial sums in an
// arbitrary order would round differently from run to run. A larger split would need an fp32
// [split, M, R] workspace (a pointer these entry points do not take) reduced in a fixed order.
constexpr int64_t kMaxSplitK = 2;

// K per split (a multiple of bk) for `blocks` blocks per K range: split_k > 0 asks for that many
// splits; 0 chooses enough to give every SM two blocks, with at least 256 K per split; either is
// capped at kMaxSplitK and max_split.
int64_t k_per_split_for(int64_t split_k, int64_t blocks, int64_t K, int bk, int64_t max_split, int device,
                        const char* func) {
  int64_t split = split_k;
  if (split == 0) {
    const int64_t want = 2 * static_cast<int64_t>(sm_count(device, func));
    split = blocks >= want ? 1 : std::min(ceil_div(want, blocks), std::max<int64_t>(1, K / 256));
  }
  split = std::min<int64_t>({split, max_split, kMaxSplitK});
  return ceil_div(ceil_div(K, split), bk) * bk;
}

template <typename T, int NR, bool VEC_X, int WM, bool MULTI>
void launch_shrink(dim3 grid, cudaStream_t stream, const T* x, int64_t s_xm, int64_t s_xk, const T* a,
                   int64_t s_ar, int64_t s_ak, float* u, int64_t s_um, int64_t s_ur, int64_t M, int64_t K,
                   int64_t R, int64_t k_per_split, float out_scale, bool dropout, const int64_t* seed, uint32_t thr31,
                   bool atomic, const AdapterMap& map) {
  shrink_kernel<T, NR, VEC_X, WM, MULTI><<<grid, kThreads, 0, stream>>>(
      x, s_xm, s_xk, a, s_ar, s_ak, u, s_um, s_ur, M, K, R, k_per_split, out_scale, dropout, seed, thr31, atomic, map);
}

template <typename T, bool VEC_Y, int WM, bool MULTI>
void launch_expand(dim3 grid, cudaStream_t stream, T* y, int64_t s_ym, int64_t s_yn, const float* u, int64_t s_um,
                   int64_t s_ur, const T* b, int64_t s_bn, int64_t s_br, int64_t M, int64_t N, int64_t R,
                   float scaling, bool dropout, const int64_t* seed, uint32_t thr31, float drop_scale,
                   const AdapterMap& map) {
  expand_kernel<T, VEC_Y, WM, MULTI><<<grid, kThreads, 0, stream>>>(
      y, s_ym, s_yn, u, s_um, s_ur, b, s_bn, s_br, M, N, R, scaling, dropout, seed, thr31, drop_scale, map);
}

// multi-adapter batches: tile 1 = the 128-row (shrink) / 64-row (expand) tiles, 2 = the 16-row decode
// tiles; 0 chooses by the row count. slices 0 chooses: 1 for large tiles of sorted rows, else up to
// 8 (large) or 16 (decode) blocks per tile, no more than adapters or rows.
constexpr int64_t kLargeTileRows = 512;
// single adapter: rows up to which the shrink takes the 16-row decode tiles
constexpr int64_t kSmallShrinkRows = 16;
constexpr int64_t kMaxSlices = 256;

void check_multi_args(const char* func, int64_t n, int index_bits, int tile, int64_t slices) {
  require(n >= 0 && n < INT32_MAX, func, "adapter count n must be in [0, 2**31 - 1), got " + std::to_string(n));
  require(index_bits == 32 || index_bits == 64, func,
          "index_bits must be 32 or 64 (int32 or int64 indices), got " + std::to_string(index_bits));
  require(tile >= 0 && tile <= 2, func, "tile must be 0 (choose), 1 (large) or 2 (decode), got " +
                                            std::to_string(tile));
  require(slices >= 0 && slices <= kMaxSlices, func,
          "slices must be in [0, " + std::to_string(kMaxSlices) + "] (0 chooses), got " + std::to_string(slices));
}

bool large_tile(int tile, int64_t M) { return tile == 0 ? M >= kLargeTileRows : tile == 1; }

int choose_slices(int64_t slices, bool large, int64_t M, int64_t n, bool sorted) {
  if (slices == 0) slices = large ? (sorted ? 1 : std::min<int64_t>(n, 8)) : std::min<int64_t>({n, M, 16});
  return static_cast<int>(std::max<int64_t>(slices, 1));
}

AdapterMap adapter_map(uintptr_t row_order, uintptr_t indices, int index_bits, uintptr_t ranks, uintptr_t scalings,
                       int64_t n, int64_t s_wa) {
  AdapterMap map;
  map.row_order = reinterpret_cast<const int32_t*>(row_order);
  map.indices = reinterpret_cast<const void*>(indices);
  map.idx64 = index_bits == 64;
  map.ranks = reinterpret_cast<const int32_t*>(ranks);
  map.scalings = reinterpret_cast<const float*>(scalings);
  map.n = n;
  map.s_wa = s_wa;
  return map;
}

}  // namespace

void lora_shrink(const LoraShrinkParams& p) {
  FASTPEFT_LORA_SHRINK(FASTPEFT_UNPACK)
  const char* func = "lora_shrink";
  check_sizes(func, M, K, R);
  check_args(func, dtype, dropout, thr31);
  require(!dropout || seed != 0, func, "dropout needs the device pointer of its int64 seed");
  require(split_k >= 0, func, "split_k must be >= 0 (0 chooses)");
  if (M == 0) return;
  require(u != 0 && (K == 0 || (x != 0 && a != 0)), func, "null device pointer");
  DeviceGuard guard(device, func);
  if (K == 0) {
    zero_u(reinterpret_cast<float*>(u), s_um, s_ur, M, R, stream, func);
    return;
  }

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    // decode rows (M <= 16): 16-row tiles whose 8 warps split K, one rank fragment per block (more
    // blocks along R, since K splits in two at most); else 128-row tiles, up to 4 rank fragments
    const bool small = M <= kSmallShrinkRows;
    const int nr = small || R <= 16 ? 1 : R <= 32 ? 2 : 4;
    const int BM = small ? 16 : 128;
    const int BK = small ? ShrinkTile<T, 1, false, 1>::BK : ShrinkTile<T, 1, false, 8>::BK;
    const int64_t gx = ceil_div(M, BM), gy = ceil_div(R, 16 * nr);
    require(gx < (int64_t{1} << 31) && gy <= 65535, func, "problem too large for the grid");
    const int64_t k_per_split = k_per_split_for(split_k, gx * gy, K, BK, 65535, device, func);
    const int64_t split = ceil_div(K, k_per_split);
    const bool atomic = split > 1;
    if (atomic) zero_u(reinterpret_cast<float*>(u), s_um, s_ur, M, R, stream, func);

    constexpr int V = vec_width<T>();
    const bool vec = s_xk == 1 && K % V == 0 && (M == 1 || s_xm % V == 0) && aligned16(x);
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(split));
    auto run = [&](auto nr_tag, auto vec_tag, auto wm_tag) {
      launch_shrink<T, decltype(nr_tag)::value, decltype(vec_tag)::value, decltype(wm_tag)::value, false>(
          grid, stream, reinterpret_cast<const T*>(x), s_xm, s_xk, reinterpret_cast<const T*>(a), s_ar, s_ak,
          reinterpret_cast<float*>(u), s_um, s_ur, M, K, R, k_per_split, out_scale, dropout,
          reinterpret_cast<const int64_t*>(seed), thr31, atomic, AdapterMap{});
    };
    dispatch_flag(vec, [&](auto vec_tag) {
      if (small) {
        run(One{}, vec_tag, One{});
      } else {
        dispatch_nr(nr, [&](auto nr_tag) { run(nr_tag, vec_tag, std::integral_constant<int, 8>{}); });
      }
    });
    FP_CHECK_LAUNCH(func);
  });
}

void lora_expand(const LoraExpandParams& p) {
  FASTPEFT_LORA_EXPAND(FASTPEFT_UNPACK)
  const char* func = "lora_expand";
  check_sizes(func, M, N, R);
  check_args(func, dtype, dropout, thr31);
  require(!dropout || seed != 0, func, "dropout needs the device pointer of its int64 seed");
  if (M == 0 || N == 0) return;
  require(y != 0 && u != 0 && b != 0, func, "null device pointer");
  DeviceGuard guard(device, func);

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    constexpr int BM = 64, BN = 128;
    const int64_t gx = ceil_div(M, BM), gy = ceil_div(N, BN);
    require(gx < (int64_t{1} << 31) && gy <= 65535, func, "problem too large for the grid");
    constexpr int V = vec_width<T>();
    const bool vec = s_yn == 1 && N % V == 0 && (M == 1 || s_ym % V == 0) && aligned16(y);
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    dispatch_flag(vec, [&](auto vec_tag) {
      launch_expand<T, decltype(vec_tag)::value, 4, false>(
          grid, stream, reinterpret_cast<T*>(y), s_ym, s_yn, reinterpret_cast<const float*>(u), s_um, s_ur,
          reinterpret_cast<const T*>(b), s_bn, s_br, M, N, R, scaling, dropout,
          reinterpret_cast<const int64_t*>(seed), thr31, drop_scale,
          AdapterMap{});
    });
    FP_CHECK_LAUNCH(func);
  });
}

void multi_lora_shrink(const MultiLoraShrinkParams& p) {
  FASTPEFT_MULTI_LORA_SHRINK(FASTPEFT_UNPACK)
  const char* func = "multi_lora_shrink";
  check_sizes(func, M, K, R);
  check_args(func, dtype, false, 0);
  check_multi_args(func, n, index_bits, tile, slices);
  require(split_k >= 0, func, "split_k must be >= 0 (0 chooses)");
  if (M == 0) return;
  require(u != 0 && indices != 0 && (n == 0 || ranks != 0) && (n == 0 || K == 0 || (x != 0 && a != 0)), func,
          "null device pointer");
  DeviceGuard guard(device, func);
  if (K == 0 || n == 0) {  // no products: every element of U is 0
    zero_u(reinterpret_cast<float*>(u), s_um, s_ur, M, R, stream, func);
    return;
  }

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    const int nr = R <= 16 ? 1 : R <= 32 ? 2 : 4;
    const bool large = large_tile(tile, M);
    const int BM = large ? 128 : 16;
    const int BK = large ? ShrinkTile<T, 1, false, 8>::BK
                         : nr == 4 ? ShrinkTile<T, 4, false, 1>::BK : ShrinkTile<T, 1, false, 1>::BK;
    const int64_t gx = ceil_div(M, BM), gy = ceil_div(R, 16 * nr);
    require(gx < (int64_t{1} << 31) && gy <= 65535, func, "problem too large for the grid");
    AdapterMap map = adapter_map(row_order, indices, index_bits, ranks, 0, n, s_aa);
    map.slices = choose_slices(slices, large, M, n, row_order != 0);
    const int64_t k_per_split = k_per_split_for(split_k, gx * gy * map.slices, K, BK, 65535 / map.slices, device,
                                                func);
    const int64_t split = ceil_div(K, k_per_split);
    const bool atomic = split > 1;
    if (atomic) zero_u(reinterpret_cast<float*>(u), s_um, s_ur, M, R, stream, func);

    constexpr int V = vec_width<T>();
    const bool vec = s_xk == 1 && K % V == 0 && (M == 1 || s_xm % V == 0) && aligned16(x);
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(split * map.slices));
    dispatch_nr(nr, [&](auto nr_tag) {
      dispatch_flag(vec, [&](auto vec_tag) {
        dispatch_flag(large, [&](auto large_tag) {
          launch_shrink<T, decltype(nr_tag)::value, decltype(vec_tag)::value, decltype(large_tag)::value ? 8 : 1,
                        true>(grid, stream, reinterpret_cast<const T*>(x), s_xm, s_xk, reinterpret_cast<const T*>(a),
                              s_ar, s_ak, reinterpret_cast<float*>(u), s_um, s_ur, M, K, R, k_per_split, 1.0f,
                              false, nullptr, 0u, atomic, map);
        });
      });
    });
    FP_CHECK_LAUNCH(func);
  });
}

void multi_lora_expand(const MultiLoraExpandParams& p) {
  FASTPEFT_MULTI_LORA_EXPAND(FASTPEFT_UNPACK)
  const char* func = "multi_lora_expand";
  check_sizes(func, M, N, R);
  check_args(func, dtype, false, 0);
  check_multi_args(func, n, index_bits, tile, slices);
  if (M == 0 || N == 0 || n == 0) return;  // n == 0: no row has an adapter
  require(y != 0 && u != 0 && b != 0 && ranks != 0 && scalings != 0 && indices != 0, func, "null device pointer");
  DeviceGuard guard(device, func);

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    const bool large = large_tile(tile, M);
    const int BM = large ? 64 : 16, BN = 128;
    const int64_t gx = ceil_div(M, BM), gy = ceil_div(N, BN);
    require(gx < (int64_t{1} << 31) && gy <= 65535, func, "problem too large for the grid");
    AdapterMap map = adapter_map(row_order, indices, index_bits, ranks, scalings, n, s_ba);
    map.slices = choose_slices(slices, large, M, n, row_order != 0);
    constexpr int V = vec_width<T>();
    const bool vec = s_yn == 1 && N % V == 0 && (M == 1 || s_ym % V == 0) && aligned16(y);
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(map.slices));
    dispatch_flag(vec, [&](auto vec_tag) {
      dispatch_flag(large, [&](auto large_tag) {
        launch_expand<T, decltype(vec_tag)::value, decltype(large_tag)::value ? 4 : 1, true>(
            grid, stream, reinterpret_cast<T*>(y), s_ym, s_yn, reinterpret_cast<const float*>(u), s_um, s_ur,
            reinterpret_cast<const T*>(b), s_bn, s_br, M, N, R, 1.0f, false, nullptr, 0u, 1.0f, map);
      });
    });
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
