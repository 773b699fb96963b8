// LLM.int8() kernels (fastpeft/reference/int8.py is the specification):
//
//   quant_rows:  row_scale[m] = max |x[m, k]| over the entries with |x| < t (all when t == 0)
//                q[m, k]      = rint((x[m, k] * L) * ((1 / (row_scale[m] * L)) * 127)), clamped to
//                               [-127, 127]; L = 2^64 for rows with row_scale < 2^-64, else 1;
//                               0 for outlier entries (|x| >= t, t > 0), NaN products and scale 0
//                col_flags[k] = 1 where some |x[m, k]| >= t (atomicOr into a zeroed array: red.or,
//                               fire and forget; outliers are rare)
//   gemm:        y[m, n] = (sum_k q'[m, k] w[n, k]) * row_scale[m] * w_scale[n] / 127^2
//                        + sum_{c in cols[0:count)} x[m, c] w[n, c] * w_scale[n] / 127   + bias[n]
//                with q' = q with the columns where col_flags != 0 zeroed.
//   dequant_matmul (the layer's backward):  dx[m, k] = sum_n dy[m, n] W_deq[n, k],
//                W_deq[n, k] = w[n, k] * (w_scale[n] / 127) (fp32), dequantized tile by tile in registers.
//
// quant_rows runs 256 threads per block and 16..256 threads per row: pass 1 reads the row and
// reduces the absmax (NaN-propagating: the max of the |x| bit patterns, so any NaN wins over
// inf), pass 2 reads it again (from L1/L2) and writes the codes; 16-byte loads when aligned.
//
// gemm multiplies int8 tiles on tensor cores (nvcuda::wmma m16n16k16, signed char operands,
// int32 accumulators; exact). Tiles move global -> registers -> shared memory, double-buffered
// in shared memory (the next chunk is loaded while the current one is multiplied; one barrier
// per chunk); the column mask of q is applied in registers. The epilogue runs in rounds of
// FMR fragment rows per warp, each finished before the next (so only the later rounds'
// accumulators stay in registers: the 128 x 128 tile fits 128 registers, 2 blocks per SM,
// without spilling): it stages the round's int32 accumulators in shared memory (summing the
// K-split warps of the small-M tile) next to its row scales, converts them to fp32 scaled by
// row_scale / 127, adds the outlier columns (the count is read on the device; chunks of 16..32
// columns of x and w are staged in shared memory and accumulated in fp32 on the CUDA cores,
// each thread adding into its own slots of the staged tile: a few dozen columns cost little
// next to the int8 main loop), scales by w_scale / 127, adds the bias and stores y with 16-byte
// stores where aligned. Byte loads of q and w (K or a stride not a multiple of 16) run on the
// 64 x 64 tile, whose registers they fit.

#include <cstdint>
#include <string>
#include <type_traits>

#include "common.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;  // 8 warps per block, both kernels
// fastpeft.reference.int8.LIFT_BELOW and LIFT: 2^-64 and 2^64
constexpr float kLiftBelow = 5.42101086242752217e-20f;
constexpr float kLift = 18446744073709551616.0f;
constexpr int64_t kMaxK = 133143;  // 127 * 127 * K < 2^31: the int32 accumulators cannot overflow

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

// The int8 code of x * inv, rounded half to even; NaN -> 0 (the reference's nan_to_num after
// its clamp: +-inf clamp to +-127).
__device__ __forceinline__ uint32_t code_byte(float x, float inv, bool outlier) {
  const float r = rintf(x * inv);
  int c = 0;  // outliers and NaN
  if (!outlier) {
    if (r >= -127.0f && r <= 127.0f) c = static_cast<int>(r);
    else if (r > 0.0f) c = 127;
    else if (r < 0.0f) c = -127;
  }
  return static_cast<uint32_t>(c) & 0xFFu;
}

// ---------------------------------------------------------------------------------------------
// row quantization

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
quant_rows_kernel(const T* __restrict__ x, int64_t s_xm, int64_t s_xk, int8_t* __restrict__ q, int64_t s_qm,
                  float* __restrict__ row_scale, int* __restrict__ flags, int64_t M, int64_t K, float threshold,
                  int tpr_log2) {
  constexpr int V = VEC ? 16 / static_cast<int>(sizeof(T)) : 1;
  __shared__ uint32_t red[kThreads];
  const int tid = threadIdx.x;
  const int tpr = 1 << tpr_log2;  // threads per row, 16 .. 256
  const int lane = tid & (tpr - 1);
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (kThreads >> tpr_log2) + (tid >> tpr_log2);
  const bool row_in = m < M;
  const bool outliers = threshold > 0.0f;
  const T* xr = x + (row_in ? m : 0) * s_xm;
  const int64_t step = static_cast<int64_t>(tpr) * V;

  auto load = [&](float (&v)[V], int64_t k) {
    if (VEC) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(xr + k));
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = vec_get<T>(raw, j);
    } else {
      v[0] = to_float(xr[k * s_xk]);
    }
  };

  // pass 1: absmax of the kept entries as bits (|x| >= 0: the uint order is the float order,
  // and every NaN is above inf), outlier columns flagged
  uint32_t amax = 0;
  if (row_in) {
    for (int64_t k = static_cast<int64_t>(lane) * V; k < K; k += step) {
      float v[V];
      load(v, k);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float a = fabsf(v[j]);
        if (outliers && a >= threshold) {
          if (flags != nullptr) atomicOr(flags + k + j, 1);  // rows of one block may share the column
        } else {
          amax = umax(amax, __float_as_uint(a));
        }
      }
    }
  }
  red[tid] = amax;
  __syncthreads();
  if ((tid & 15) == 0) {
    uint32_t mx = red[tid];
#pragma unroll
    for (int i = 1; i < 16; ++i) mx = umax(mx, red[tid + i]);
    red[tid] = mx;
  }
  __syncthreads();
  uint32_t bits = 0;
  const int base = tid & ~(tpr - 1);
  for (int i = 0; i < tpr; i += 16) bits = umax(bits, red[base + i]);
  const float scale = __uint_as_float(bits);
  if (!row_in) return;  // no barrier follows
  if (lane == 0) row_scale[m] = scale;
  // as the reference computes it: torch's `127.0 / (scale * lift)` is `(scale * lift).reciprocal()
  // * 127` (two roundings), which decides ties such as 63.5 vs 63.49999; a NaN scale gives codes 0.
  // lift: rows too small for a finite 127 / scale are scaled by an exact power of two first
  const float lift = scale < kLiftBelow ? kLift : 1.0f;
  const float inv = scale > 0.0f ? (1.0f / (scale * lift)) * 127.0f : 0.0f;

  // pass 2: the codes
  int8_t* qr = q + m * s_qm;
  for (int64_t k = static_cast<int64_t>(lane) * V; k < K; k += step) {
    float v[V];
    load(v, k);
    uint32_t packed[(V + 3) / 4] = {};
#pragma unroll
    for (int j = 0; j < V; ++j) {
      packed[j / 4] |= code_byte(v[j] * lift, inv, outliers && fabsf(v[j]) >= threshold) << (8 * (j % 4));
    }
    if (V == 8) {
      *reinterpret_cast<uint2*>(qr + k) = make_uint2(packed[0], packed[V > 4 ? 1 : 0]);
    } else if (V == 4) {
      *reinterpret_cast<uint32_t*>(qr + k) = packed[0];
    } else {
      qr[k] = static_cast<int8_t>(static_cast<signed char>(packed[0] & 0xFFu));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// int8 GEMM with the dequantizing epilogue
//
// Block tile BM x BN, K in chunks of BK. The 8 warps are WM (m) x WN (n) x WK (k): warp (wm, wn,
// wk) owns FM x FN fragments of 16 x 16 at rows wm*FM*16.., columns wn*FN*16.., and the k-steps
// wk*KSW .. of each chunk. A chunk of q (or w) lives in shared memory as BK/16 planes, plane kb
// holding columns kb*16 .. kb*16+15 of every row, 16 bytes per row: a fragment is 256 contiguous
// bytes (32-byte aligned, as wmma requires; no bank conflicts), and a 32-byte pad per plane keeps
// the 16-byte stores of 8 lanes (2 rows x 4 planes) on distinct banks.

template <int WM_, int WN_, int WK_, int FM_, int FN_, int KSW_, int FMR_> struct GemmTile {
  static constexpr int WM = WM_, WN = WN_, WK = WK_, FM = FM_, FN = FN_, KSW = KSW_;
  static constexpr int BM = WM * FM * 16, BN = WN * FN * 16, BK = WK * KSW * 16, KB = BK / 16;
  static constexpr int PLANE_A = BM * 16 + 32, PLANE_B = BN * 16 + 32;
  static constexpr int STAGE = KB * (PLANE_A + PLANE_B);
  static constexpr int A_LOADS = BM * KB / kThreads, B_LOADS = BN * KB / kThreads;
  // epilogue: the accumulators go through shared memory FMR fragment rows per warp at a time (a round
  // of BMR tile rows), next to the outlier columns of those rows staged OC at a time
  static constexpr int FMR = FMR_, ROUNDS = FM / FMR, BMR = WM * FMR * 16, LDC = BN + 4;
  static constexpr int EV = 8;  // contiguous outputs per thread
  static constexpr int GROUPS = BMR * BN / EV, PASSES = (GROUPS + kThreads - 1) / kThreads;
  static constexpr int C_BYTES = WK * BMR * LDC * 4;
  static constexpr int OC = C_BYTES + (32 * (BMR + BN) + BMR) * 4 <= 48 * 1024 ? 32 : 16;  // outlier columns per chunk
  static constexpr int O_BYTES = OC * (BMR + BN) * 4, R_BYTES = BMR * 4;  // outlier columns, row scales
  static constexpr int E_BYTES = C_BYTES + O_BYTES + R_BYTES;
  static constexpr int SMEM = 2 * STAGE > E_BYTES ? 2 * STAGE : E_BYTES;
  static_assert(WM * WN * WK == kThreads / 32, "8 warps");
  static_assert(KB % 4 == 0 && BM * KB % kThreads == 0 && BN * KB % kThreads == 0, "even tile loads");
  static_assert(FM % FMR == 0 && BN % EV == 0 && kThreads % (BN / EV) == 0, "epilogue rounds");
  static_assert(C_BYTES % 16 == 0, "aligned outlier staging");
  static_assert(SMEM <= 48 * 1024, "static shared memory");
};

using TileLarge = GemmTile<2, 4, 1, 4, 2, 4, 2>;   // 128 x 128, BK 64: many tiles
using TileMid = GemmTile<2, 4, 1, 2, 1, 4, 2>;     // 64 x 64, BK 64: fewer tiles than SMs
using TileDecode = GemmTile<1, 2, 4, 1, 1, 4, 1>;  // 16 x 32, BK 256, K split over 4 warps: M <= 16

// Slot s of a chunk (one 16-byte piece of one row): 4 consecutive slots are the 4 planes of a
// group of one row (64 contiguous bytes in global memory), then the next row.
template <int ROWS> __device__ __forceinline__ void slot_of(int s, int& row, int& kb) {
  row = (s >> 2) % ROWS;
  kb = (s / (4 * ROWS)) * 4 + (s & 3);
}

// 16 bytes of an int8 row from column k (zero outside [0, K) and for rows outside the matrix).
// VW16: 16-byte loads (K, the row stride and the base are multiples of 16); else byte loads.
template <bool VW16>
__device__ __forceinline__ uint4 load16(const int8_t* __restrict__ row, bool row_ok, int64_t k, int64_t K) {
  if (VW16) {
    return (row_ok && k < K) ? __ldg(reinterpret_cast<const uint4*>(row + k)) : make_uint4(0, 0, 0, 0);
  }
  uint32_t w[4] = {0, 0, 0, 0};
  if (row_ok) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      if (k + j < K) w[j / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(row[k + j])) << (8 * (j % 4));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Byte mask of columns k .. k+15: 0x00 where col_flags != 0, else 0xFF.
__device__ __forceinline__ uint4 flag_mask(const int* __restrict__ flags, bool flags_vec, int64_t k, int64_t K) {
  uint32_t w[4] = {0, 0, 0, 0};
  if (flags_vec && k + 16 <= K) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 f = __ldg(reinterpret_cast<const uint4*>(flags + k) + i);
      w[i] = (f.x ? 0u : 0xFFu) | (f.y ? 0u : 0xFF00u) | (f.z ? 0u : 0xFF0000u) | (f.w ? 0u : 0xFF000000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      if (k + j >= K || flags[k + j] == 0) w[j / 4] |= 0xFFu << (8 * (j % 4));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ uint4 and4(uint4 a, uint4 b) {
  return make_uint4(a.x & b.x, a.y & b.y, a.z & b.z, a.w & b.w);
}

template <typename T, typename Tile, bool VW16>
__global__ void __launch_bounds__(kThreads, 2)
int8_gemm_kernel(const int8_t* __restrict__ q, int64_t s_qm, const float* __restrict__ row_scale,
                 const int8_t* __restrict__ w, int64_t s_wn, const float* __restrict__ w_scale,
                 const T* __restrict__ bias, T* __restrict__ y, int64_t s_ym, int64_t M, int64_t N, int64_t K,
                 const T* __restrict__ x, int64_t s_xm, int64_t s_xk, const int* __restrict__ flags,
                 bool flags_vec, const int* __restrict__ cols, int64_t n_cols, const int* __restrict__ count,
                 bool vec_y) {
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, FM = Tile::FM, FN = Tile::FN, KSW = Tile::KSW;
  constexpr int EV = Tile::EV, LDC = Tile::LDC, BMR = Tile::BMR, FMR = Tile::FMR, OC = Tile::OC;
  constexpr int GROUP_M = 8;
  using namespace nvcuda;
  __shared__ __align__(128) unsigned char smem[Tile::SMEM];

  // grouped tile order: GROUP_M row tiles share their column tiles of w while in L2
  const int64_t tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int64_t pid = blockIdx.x, per_group = GROUP_M * tiles_n;
  const int64_t first_m = pid / per_group * GROUP_M;
  const int64_t group_m = tiles_m - first_m < GROUP_M ? tiles_m - first_m : GROUP_M;
  const int64_t m0 = (first_m + pid % per_group % group_m) * BM;
  const int64_t n0 = pid % per_group / group_m * BN;

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % Tile::WM, wn = warp / Tile::WM % Tile::WN, wk = warp / (Tile::WM * Tile::WN);

  // ---- main loop: acc[i][j] += q'[rows i] w[cols j]^T over this warp's k-steps of each chunk
  wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0);

  uint4 ra[Tile::A_LOADS], rb[Tile::B_LOADS];
  auto load_chunk = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < Tile::A_LOADS; ++i) {
      int r, kb;
      slot_of<BM>(tid + i * kThreads, r, kb);
      const bool in = m0 + r < M;
      const int64_t k = k0 + kb * 16;
      ra[i] = load16<VW16>(q + (in ? m0 + r : 0) * s_qm, in, k, K);
      if (flags != nullptr) ra[i] = and4(ra[i], flag_mask(flags, flags_vec, k, K));
    }
#pragma unroll
    for (int i = 0; i < Tile::B_LOADS; ++i) {
      int r, kb;
      slot_of<BN>(tid + i * kThreads, r, kb);
      const bool in = n0 + r < N;
      rb[i] = load16<VW16>(w + (in ? n0 + r : 0) * s_wn, in, k0 + kb * 16, K);
    }
  };
  auto store_chunk = [&](int buf) {
    unsigned char* as = smem + buf * Tile::STAGE;
    unsigned char* bs = as + Tile::KB * Tile::PLANE_A;
#pragma unroll
    for (int i = 0; i < Tile::A_LOADS; ++i) {
      int r, kb;
      slot_of<BM>(tid + i * kThreads, r, kb);
      *reinterpret_cast<uint4*>(as + kb * Tile::PLANE_A + r * 16) = ra[i];
    }
#pragma unroll
    for (int i = 0; i < Tile::B_LOADS; ++i) {
      int r, kb;
      slot_of<BN>(tid + i * kThreads, r, kb);
      *reinterpret_cast<uint4*>(bs + kb * Tile::PLANE_B + r * 16) = rb[i];
    }
  };

  const int64_t chunks = (K + BK - 1) / BK;
  if (chunks > 0) {
    load_chunk(0);
    store_chunk(0);
  }
  __syncthreads();
  for (int64_t c = 0; c < chunks; ++c) {
    const int buf = static_cast<int>(c & 1);
    if (c + 1 < chunks) load_chunk((c + 1) * BK);
    const signed char* as = reinterpret_cast<const signed char*>(smem + buf * Tile::STAGE);
    const signed char* bs = as + Tile::KB * Tile::PLANE_A;
#pragma unroll
    for (int ks = 0; ks < KSW; ++ks) {
      const int kb = wk * KSW + ks;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[FM];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(fa[i], as + kb * Tile::PLANE_A + (wm * FM + i) * 256, 16);
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, bs + kb * Tile::PLANE_B + (wn * FN + j) * 256, 16);
#pragma unroll
        for (int i = 0; i < FM; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
      }
    }
    if (c + 1 < chunks) store_chunk(buf ^ 1);  // the other buffer: read in the previous chunk, before its barrier
    __syncthreads();
  }

  // ---- epilogue, one round of BMR tile rows at a time, finished (outliers, scales, bias, stores) before
  // the next: only the later rounds' accumulators stay in registers. In pass p a thread covers round row
  // rr = tid / GPR + p * RPP and columns cc = (tid % GPR) * EV + 0..EV-1 (the same columns in every pass);
  // out = acc * row_scale / 127, then + the outlier columns, all in fp32.
  auto tile_row = [&](int round, unsigned rr) {  // row in the block tile of round row rr
    return static_cast<int>(rr / (FMR * 16) * (FM * 16) + round * FMR * 16 + rr % (FMR * 16));
  };
  constexpr int GPR = BN / EV, RPP = kThreads / GPR;  // column groups per row, rows per pass
  const unsigned rr0 = static_cast<unsigned>(tid) / GPR;  // this thread's round row in pass 0 (+ p * RPP)
  int* cs = reinterpret_cast<int*>(smem);                        // [WK][BMR][LDC]
  float* xo = reinterpret_cast<float*>(smem + Tile::C_BYTES);    // [OC][BMR]: x[rows, cols[c0 + c]]
  float* wo = xo + OC * BMR;                                     // [OC][BN]:  w[cols of the tile, cols[c0 + c]]
  float* rsc = wo + OC * BN;                                     // [BMR]: row_scale / 127 of the round's rows
  int64_t cnt = 0;
  if (cols != nullptr) {
    cnt = *count;
    cnt = cnt < 0 ? 0 : cnt;
    cnt = cnt < n_cols ? cnt : n_cols;
    cnt = cnt < K ? cnt : K;
  }
  auto stage_outliers = [&](int round, int64_t c0) {
    for (int e = tid; e < OC * BMR; e += kThreads) {
      const unsigned cc = static_cast<unsigned>(e) / BMR, rr = static_cast<unsigned>(e) % BMR;
      const int64_t col = c0 + cc < cnt ? cols[c0 + cc] : -1, m = m0 + tile_row(round, rr);
      const bool in = col >= 0 && col < K && m < M;
      xo[e] = in ? to_float(x[m * s_xm + col * s_xk]) : 0.0f;
    }
    for (int e = tid; e < OC * BN; e += kThreads) {
      const unsigned cc = static_cast<unsigned>(e) / BN, nn = static_cast<unsigned>(e) % BN;
      const int64_t col = c0 + cc < cnt ? cols[c0 + cc] : -1;
      const bool in = col >= 0 && col < K && n0 + nn < N;
      wo[e] = in ? static_cast<float>(w[(n0 + nn) * s_wn + col]) : 0.0f;
    }
  };
  const int cc = static_cast<unsigned>(tid) % GPR * EV;
  const int64_t n = n0 + cc;
  auto finish = [&](int round, unsigned rr, const float (&out)[EV]) {  // y = out * w_scale / 127 + bias
    const int64_t m = m0 + tile_row(round, rr);
    if (m >= M || n >= N) return;
    float v[EV];
#pragma unroll
    for (int e = 0; e < EV; ++e) {
      const bool in = n + e < N;
      const float ws = in ? w_scale[n + e] * (1.0f / 127.0f) : 0.0f;
      const float b = (in && bias != nullptr) ? to_float(bias[n + e]) : 0.0f;
      v[e] = out[e] * ws + b;
    }
    T* yp = y + m * s_ym + n;
    if (vec_y) {  // N, s_ym and y are multiples of EV elements: the EV outputs are all in
      constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll
      for (int h = 0; h < EV / V; ++h) {
        uint4 pk = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int e = 0; e < V; ++e) vec_put<T>(pk, e, v[h * V + e]);
        *reinterpret_cast<uint4*>(yp + h * V) = pk;
      }
    } else {
#pragma unroll
      for (int e = 0; e < EV; ++e) {
        if (n + e < N) yp[e] = from_float<T>(v[e]);
      }
    }
  };

#pragma unroll
  for (int round = 0; round < Tile::ROUNDS; ++round) {
    if (round > 0) __syncthreads();  // the previous round's accumulators and outlier columns have been read
#pragma unroll
    for (int i = 0; i < FMR; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        int* p = cs + (wk * BMR + (wm * FMR + i) * 16) * LDC + (wn * FN + j) * 16;
        wmma::store_matrix_sync(p, acc[round * FMR + i][j], LDC, wmma::mem_row_major);
      }
    for (unsigned rr = tid; rr < BMR; rr += kThreads) {
      const int64_t m = m0 + tile_row(round, rr);
      rsc[rr] = m < M ? row_scale[m] * (1.0f / 127.0f) : 0.0f;
    }
    if (cnt > 0) stage_outliers(round, 0);
    __syncthreads();
    // out = (sum of the K-split warps) * row_scale / 127; with outliers it goes back to this thread's
    // own slots of plane 0 (as bits), where the outlier chunks add to it
#pragma unroll
    for (int p = 0; p < Tile::PASSES; ++p) {
      const unsigned rr = rr0 + p * RPP;
      if (Tile::GROUPS % kThreads != 0 && rr >= BMR) continue;
      const float rs = rsc[rr];
      float out[EV];
#pragma unroll
      for (int e = 0; e < EV; ++e) {
        int sum = 0;
#pragma unroll
        for (int kk = 0; kk < Tile::WK; ++kk) sum += cs[(kk * BMR + rr) * LDC + cc + e];
        out[e] = static_cast<float>(sum) * rs;
      }
      if (cnt == 0) {
        finish(round, rr, out);
      } else {
#pragma unroll
        for (int e = 0; e < EV; ++e) cs[rr * LDC + cc + e] = __float_as_int(out[e]);
      }
    }
    if (cnt == 0) continue;
    // out[m, n] += sum_c x[m, c] w[n, c] over the outlier columns, OC at a time
    for (int64_t c0 = 0; c0 < cnt; c0 += OC) {
      if (c0 > 0) {
        __syncthreads();  // the previous chunk has been read
        stage_outliers(round, c0);
        __syncthreads();
      }
      const int nc = cnt - c0 < OC ? static_cast<int>(cnt - c0) : OC;
#pragma unroll
      for (int p = 0; p < Tile::PASSES; ++p) {
        const unsigned rr = rr0 + p * RPP;
        if (Tile::GROUPS % kThreads != 0 && rr >= BMR) continue;
        float out[EV];
#pragma unroll
        for (int e = 0; e < EV; ++e) out[e] = __int_as_float(cs[rr * LDC + cc + e]);
        for (int k = 0; k < nc; ++k) {
          const float xv = xo[k * BMR + rr];
#pragma unroll
          for (int e = 0; e < EV; ++e) out[e] += xv * wo[k * BN + cc + e];
        }
        if (c0 + OC < cnt) {
#pragma unroll
          for (int e = 0; e < EV; ++e) cs[rr * LDC + cc + e] = __float_as_int(out[e]);
        } else {
          finish(round, rr, out);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dx = dy W_deq, the int8 layer's gradient w.r.t. its input, with W_deq[n, k] = w[n, k] * (w_scale[n] / 127)
//
// Block tile BM rows of dy (and dx) x BK columns of dx; the reduction runs over N in chunks of BR. The 8 warps
// are WM (m) x WN (k); warp (wm, wn) owns FM x FN fragments of 16 x 16. Per chunk, dy [BM, BR] and the int8
// rows w[n0 .. n0+BR, k0 .. k0+BK] with their scales come to registers (16-byte loads where aligned); the
// weight is dequantized there (the fp32 product w * (w_scale / 127), as the reference's dequantize_weight,
// rounded to dy's dtype for 16-bit dy, split into TF32 hi + lo parts in the fragments for fp32 dy) and stored
// row-major next to dy, double-buffered in shared memory: no dequantized weight exists outside the tile. Tensor
// cores (wmma m16n16k16 for 16-bit dy, 3xTF32 m16n16k8 for fp32 dy) accumulate in fp32; the epilogue stages
// the accumulators in shared memory, FMR fragment rows per warp at a time, and stores dx rounded once.

template <typename S> struct DqMma {  // 16-bit operands: exact products
  static constexpr int KS = 16, PARTS = 1;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, S, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, S, nvcuda::wmma::row_major>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  template <typename F> __device__ __forceinline__ static void load(F (&f)[PARTS], const S* p, unsigned ld) {
    nvcuda::wmma::load_matrix_sync(f[0], p, ld);
  }
  __device__ __forceinline__ static void mma(Acc& acc, const FragA (&a)[PARTS], const FragB (&b)[PARTS]) {
    nvcuda::wmma::mma_sync(acc, a[0], b[0], acc);
  }
};

template <> struct DqMma<float> {  // fp32 operands: 3xTF32 (a_hi b_hi + a_hi b_lo + a_lo b_hi), about 2^-21
  static constexpr int KS = 8, PARTS = 2;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                       nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                       nvcuda::wmma::row_major>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;
  template <typename F> __device__ __forceinline__ static void load(F (&f)[PARTS], const float* p, unsigned ld) {
    nvcuda::wmma::load_matrix_sync(f[0], p, ld);
#pragma unroll
    for (int i = 0; i < f[0].num_elements; ++i) {
      const float v = f[0].x[i];
      f[0].x[i] = nvcuda::wmma::__float_to_tf32(v);
      f[1].x[i] = nvcuda::wmma::__float_to_tf32(v - f[0].x[i]);
    }
  }
  __device__ __forceinline__ static void mma(Acc& acc, const FragA (&a)[PARTS], const FragB (&b)[PARTS]) {
    nvcuda::wmma::mma_sync(acc, a[1], b[0], acc);
    nvcuda::wmma::mma_sync(acc, a[0], b[1], acc);
    nvcuda::wmma::mma_sync(acc, a[0], b[0], acc);
  }
};

template <int WM_, int WN_, int FM_, int FN_, int BR_, int FMR_, int ES_> struct DqTile {
  static constexpr int WM = WM_, WN = WN_, FM = FM_, FN = FN_, BR = BR_, ES = ES_;  // ES: bytes per element
  static constexpr int BM = WM * FM * 16, BK = WN * FN * 16;
  static constexpr int VA = 16 / ES;                             // dy elements per 16-byte slot
  static constexpr int LDA = BR + VA, LDB = BK + VA;             // + 16 bytes: conflict-free fragment loads
  static constexpr int A_BYTES = BM * LDA * ES, STAGE = A_BYTES + BR * LDB * ES;
  static constexpr int A_SLOTS = BM * BR / VA, B_SLOTS = BR * BK / 16;  // 16-byte slots of dy and of w
  static constexpr int A_LOADS = (A_SLOTS + kThreads - 1) / kThreads, B_LOADS = (B_SLOTS + kThreads - 1) / kThreads;
  static constexpr int FMR = FMR_, ROUNDS = FM / FMR, BMR = WM * FMR * 16, LDC = BK + 4, EV = 8;
  static constexpr int GPR = BK / EV, RPP = kThreads / GPR, PASSES = (BMR + RPP - 1) / RPP;
  static constexpr int C_BYTES = BMR * LDC * 4, SMEM = 2 * STAGE > C_BYTES ? 2 * STAGE : C_BYTES;
  static_assert(WM * WN == kThreads / 32, "8 warps");
  static_assert(BR % 16 == 0 && FM % FMR == 0 && kThreads % GPR == 0, "tile shape");
  static_assert(A_BYTES % 32 == 0 && (16 * LDA * ES) % 32 == 0 && (16 * LDB * ES) % 32 == 0, "wmma alignment");
  static_assert(SMEM <= 48 * 1024, "static shared memory");
};

using DqLarge = DqTile<2, 4, 4, 2, 32, 2, 2>;    // 16-bit dy: 128 x 128, N chunks of 32: many tiles
using DqMid = DqTile<2, 4, 2, 1, 32, 2, 2>;      // 16-bit dy: 64 x 64, fewer tiles than SMs
using DqSmall = DqTile<1, 8, 1, 1, 64, 1, 2>;    // 16-bit dy: 16 x 128, M <= 16
using DqLarge32 = DqTile<2, 4, 2, 2, 16, 2, 4>;  // fp32 dy: 64 x 128 (3xTF32 keeps hi and lo fragments)
using DqSmall32 = DqTile<1, 8, 1, 1, 32, 1, 4>;  // fp32 dy: 16 x 128, M <= 16

template <typename T, typename Tile, bool VEC>
__global__ void __launch_bounds__(kThreads, 2)
int8_dequant_matmul_kernel(const T* __restrict__ dy, int64_t s_dm, int64_t s_dn, const int8_t* __restrict__ w,
                           int64_t s_wn, int64_t s_wk, const float* __restrict__ w_scale, T* __restrict__ dx,
                           int64_t s_xm, int64_t M, int64_t N, int64_t K, bool vec_x) {
  using S = std::conditional_t<std::is_same_v<T, float>, float, T>;
  using Mma = DqMma<S>;
  static_assert(sizeof(S) == Tile::ES, "tile element size");
  constexpr int BM = Tile::BM, BK = Tile::BK, BR = Tile::BR, FM = Tile::FM, FN = Tile::FN, VA = Tile::VA;
  constexpr int LDA = Tile::LDA, LDB = Tile::LDB, LDC = Tile::LDC, BMR = Tile::BMR, FMR = Tile::FMR, EV = Tile::EV;
  constexpr int GROUP_M = 8;
  using namespace nvcuda;
  __shared__ __align__(128) unsigned char smem[Tile::SMEM];

  // grouped tile order, as int8_gemm_kernel (column tiles of dx are column tiles of w)
  const int64_t tiles_m = (M + BM - 1) / BM, tiles_k = (K + BK - 1) / BK;
  const int64_t pid = blockIdx.x, per_group = GROUP_M * tiles_k;
  const int64_t first_m = pid / per_group * GROUP_M;
  const int64_t group_m = tiles_m - first_m < GROUP_M ? tiles_m - first_m : GROUP_M;
  const int64_t m0 = (first_m + pid % per_group % group_m) * BM;
  const int64_t k0 = pid % per_group / group_m * BK;

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % Tile::WM, wn = warp / Tile::WM;

  typename Mma::Acc acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // slot s of dy: row s / (BR / VA), elements (s % (BR / VA)) * VA ..; slot s of w: row s / (BK / 16), 16 bytes
  // from column (s % (BK / 16)) * 16
  uint4 ra[Tile::A_LOADS], rb[Tile::B_LOADS];
  float sb[Tile::B_LOADS];
  auto load_chunk = [&](int64_t n0) {
#pragma unroll
    for (int i = 0; i < Tile::A_LOADS; ++i) {
      const unsigned s = tid + i * kThreads;
      if (Tile::A_SLOTS % kThreads != 0 && s >= Tile::A_SLOTS) break;
      const int64_t m = m0 + s / (BR / VA), n = n0 + s % (BR / VA) * VA;
      if (VEC) {
        ra[i] = m < M && n < N ? __ldg(reinterpret_cast<const uint4*>(dy + m * s_dm + n)) : make_uint4(0, 0, 0, 0);
      } else {
        ra[i] = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int e = 0; e < VA; ++e) {
          if (m < M && n + e < N) vec_put<T>(ra[i], e, to_float(dy[m * s_dm + (n + e) * s_dn]));
        }
      }
    }
#pragma unroll
    for (int i = 0; i < Tile::B_LOADS; ++i) {
      const unsigned s = tid + i * kThreads;
      if (Tile::B_SLOTS % kThreads != 0 && s >= Tile::B_SLOTS) break;
      const int64_t n = n0 + s / (BK / 16), k = k0 + s % (BK / 16) * 16;
      const bool in = n < N;
      sb[i] = in ? __fdiv_rn(w_scale[n], 127.0f) : 0.0f;
      if (VEC) {
        rb[i] = in && k < K ? __ldg(reinterpret_cast<const uint4*>(w + n * s_wn + k)) : make_uint4(0, 0, 0, 0);
      } else {
        uint32_t b[4] = {0, 0, 0, 0};
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          if (in && k + j < K) b[j / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(w[n * s_wn + (k + j) * s_wk]))
                                           << (8 * (j % 4));
        }
        rb[i] = make_uint4(b[0], b[1], b[2], b[3]);
      }
    }
  };
  auto store_chunk = [&](int buf) {
    unsigned char* as = smem + buf * Tile::STAGE;
    unsigned char* bs = as + Tile::A_BYTES;
#pragma unroll
    for (int i = 0; i < Tile::A_LOADS; ++i) {
      const unsigned s = tid + i * kThreads;
      if (Tile::A_SLOTS % kThreads != 0 && s >= Tile::A_SLOTS) break;
      *reinterpret_cast<uint4*>(as + (s / (BR / VA) * LDA + s % (BR / VA) * VA) * Tile::ES) = ra[i];
    }
#pragma unroll
    for (int i = 0; i < Tile::B_LOADS; ++i) {
      const unsigned s = tid + i * kThreads;
      if (Tile::B_SLOTS % kThreads != 0 && s >= Tile::B_SLOTS) break;
      uint4* dst = reinterpret_cast<uint4*>(bs + (s / (BK / 16) * LDB + s % (BK / 16) * 16) * Tile::ES);
#pragma unroll
      for (int h = 0; h < 16 / VA; ++h) {  // VA dequantized values per 16-byte store
        uint4 pk = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int e = 0; e < VA; ++e) {
          const int j = h * VA + e;
          const float code = static_cast<float>(static_cast<int8_t>((vec_word(rb[i], j / 4) >> (8 * (j % 4))) & 0xFFu));
          vec_put<S>(pk, e, code * sb[i]);
        }
        dst[h] = pk;
      }
    }
  };

  const int64_t chunks = (N + BR - 1) / BR;
  if (chunks > 0) {
    load_chunk(0);
    store_chunk(0);
  }
  __syncthreads();
  for (int64_t c = 0; c < chunks; ++c) {
    const int buf = static_cast<int>(c & 1);
    if (c + 1 < chunks) load_chunk((c + 1) * BR);
    const S* as = reinterpret_cast<const S*>(smem + buf * Tile::STAGE);
    const S* bs = reinterpret_cast<const S*>(smem + buf * Tile::STAGE + Tile::A_BYTES);
#pragma unroll
    for (int ks = 0; ks < BR; ks += Mma::KS) {
      typename Mma::FragB fb[FN][Mma::PARTS];
#pragma unroll
      for (int j = 0; j < FN; ++j) Mma::load(fb[j], bs + ks * LDB + (wn * FN + j) * 16, LDB);
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        typename Mma::FragA fa[Mma::PARTS];
        Mma::load(fa, as + (wm * FM + i) * 16 * LDA + ks, LDA);
#pragma unroll
        for (int j = 0; j < FN; ++j) Mma::mma(acc[i][j], fa, fb[j]);
      }
    }
    if (c + 1 < chunks) store_chunk(buf ^ 1);  // the other buffer: read in the previous chunk, before its barrier
    __syncthreads();
  }

  // ---- epilogue: round rows rr = tid / GPR + p * RPP, columns cc .. cc + EV - 1 of the tile
  float* cs = reinterpret_cast<float*>(smem);
  const unsigned rr0 = static_cast<unsigned>(tid) / Tile::GPR;
  const int cc = static_cast<unsigned>(tid) % Tile::GPR * EV;
  const int64_t k = k0 + cc;
#pragma unroll
  for (int round = 0; round < Tile::ROUNDS; ++round) {
    if (round > 0) __syncthreads();  // the previous round has been read
#pragma unroll
    for (int i = 0; i < FMR; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::store_matrix_sync(cs + (wm * FMR + i) * 16 * LDC + (wn * FN + j) * 16, acc[round * FMR + i][j], LDC,
                                wmma::mem_row_major);
      }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < Tile::PASSES; ++p) {
      const unsigned rr = rr0 + p * Tile::RPP;
      if (BMR % Tile::RPP != 0 && rr >= BMR) continue;
      const int64_t m = m0 + static_cast<int>(rr / (FMR * 16) * (FM * 16) + round * FMR * 16 + rr % (FMR * 16));
      if (m >= M || k >= K) continue;
      const float* src = cs + rr * LDC + cc;
      T* dst = dx + m * s_xm + k;
      if (vec_x) {  // K, s_xm and dx are multiples of EV elements: the EV outputs are all in
        constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll
        for (int h = 0; h < EV / V; ++h) {
          uint4 pk = make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int e = 0; e < V; ++e) vec_put<T>(pk, e, src[h * V + e]);
          *reinterpret_cast<uint4*>(dst + h * V) = pk;
        }
      } else {
#pragma unroll
        for (int e = 0; e < EV; ++e) {
          if (k + e < K) dst[e] = from_float<T>(src[e]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host side


void check_dtype(const char* func, int dtype) {
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, func,
          "unsupported dtype code " + std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16)");
}

template <typename T, typename Tile>
void launch_gemm(bool vw16, int64_t tiles, cudaStream_t stream, const int8_t* q, int64_t s_qm, const float* rs,
                 const int8_t* w, int64_t s_wn, const float* ws, const T* bias, T* y, int64_t s_ym, int64_t M,
                 int64_t N, int64_t K, const T* x, int64_t s_xm, int64_t s_xk, const int* flags, bool flags_vec,
                 const int* cols, int64_t n_cols, const int* count, bool vec_y) {
  const dim3 grid(static_cast<unsigned>(tiles));
  if (vw16) {
    int8_gemm_kernel<T, Tile, true><<<grid, kThreads, 0, stream>>>(q, s_qm, rs, w, s_wn, ws, bias, y, s_ym, M, N, K,
                                                                    x, s_xm, s_xk, flags, flags_vec, cols, n_cols,
                                                                    count, vec_y);
  } else if constexpr (!std::is_same_v<Tile, TileLarge>) {  // byte loads: not on the 128 x 128 tile
    int8_gemm_kernel<T, Tile, false><<<grid, kThreads, 0, stream>>>(q, s_qm, rs, w, s_wn, ws, bias, y, s_ym, M, N,
                                                                     K, x, s_xm, s_xk, flags, flags_vec, cols,
                                                                     n_cols, count, vec_y);
  }
}

template <typename T, typename Tile>
void launch_dequant_matmul(bool vec, int64_t tiles, cudaStream_t stream, const T* dy, int64_t s_dm, int64_t s_dn,
                           const int8_t* w, int64_t s_wn, int64_t s_wk, const float* ws, T* dx, int64_t s_xm,
                           int64_t M, int64_t N, int64_t K, bool vec_x) {
  const dim3 grid(static_cast<unsigned>(tiles));
  if (vec) {
    int8_dequant_matmul_kernel<T, Tile, true><<<grid, kThreads, 0, stream>>>(dy, s_dm, s_dn, w, s_wn, s_wk, ws, dx,
                                                                              s_xm, M, N, K, vec_x);
  } else if constexpr (!std::is_same_v<Tile, DqLarge>) {  // element loads: not on the 128 x 128 tile
    int8_dequant_matmul_kernel<T, Tile, false><<<grid, kThreads, 0, stream>>>(dy, s_dm, s_dn, w, s_wn, s_wk, ws, dx,
                                                                               s_xm, M, N, K, vec_x);
  }
}

}  // namespace

void int8_quant_rows(const Int8QuantRowsParams& p) {
  FASTPEFT_INT8_QUANT_ROWS(FASTPEFT_UNPACK)
  const char* func = "int8_quant_rows";
  require(M >= 0 && K >= 0, func, "sizes must be >= 0, got " + std::to_string(M) + " x " + std::to_string(K));
  check_dtype(func, dtype);
  require(threshold >= 0.0f, func, "threshold must be >= 0 (0: no outliers), got " + std::to_string(threshold));
  if (M == 0) return;
  require(row_scale != 0 && (K == 0 || (x != 0 && q != 0)), func, "null device pointer");
  DeviceGuard guard(device, func);

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec_width<T>();
    const bool vec = s_xk == 1 && K % V == 0 && (M == 1 || (s_xm % V == 0 && s_qm % V == 0)) && aligned16(x) &&
                     q % V == 0;
    const int64_t per_thread = vec ? V : 1;
    const int64_t pieces = ceil_div(K, per_thread);
    int tpr_log2 = 4;  // 16 .. 256 threads per row, about two pieces each
    while (tpr_log2 < 8 && (int64_t{2} << tpr_log2) < pieces) ++tpr_log2;
    const int64_t rows_per_block = kThreads >> tpr_log2;
    const int64_t blocks = ceil_div(M, rows_per_block);
    require(blocks < (int64_t{1} << 31), func, "problem too large for the grid");
    auto xp = reinterpret_cast<const T*>(x);
    auto qp = reinterpret_cast<int8_t*>(q);
    auto sp = reinterpret_cast<float*>(row_scale);
    auto fp = reinterpret_cast<int*>(col_flags);
    const dim3 grid(static_cast<unsigned>(blocks));
    if (vec) {
      quant_rows_kernel<T, true><<<grid, kThreads, 0, stream>>>(xp, s_xm, s_xk, qp, s_qm, sp, fp, M, K, threshold,
                                                                tpr_log2);
    } else {
      quant_rows_kernel<T, false><<<grid, kThreads, 0, stream>>>(xp, s_xm, s_xk, qp, s_qm, sp, fp, M, K, threshold,
                                                                 tpr_log2);
    }
    FP_CHECK_LAUNCH(func);
  });
}

void int8_gemm(const Int8GemmParams& p) {
  FASTPEFT_INT8_GEMM(FASTPEFT_UNPACK)
  const char* func = "int8_gemm";
  require(M >= 0 && N >= 0 && K >= 0, func,
          "sizes must be >= 0, got M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K));
  require(K <= kMaxK, func, "K=" + std::to_string(K) + " exceeds " + std::to_string(kMaxK) +
                                " (the int32 accumulators could overflow)");
  check_dtype(func, dtype);
  require(tile >= 0 && tile <= 3, func, "tile must be 0 (choose), 1 (128x128), 2 (64x64) or 3 (16x32)");
  require((cols == 0) == (count == 0), func, "cols and count come together (both or neither)");
  require(n_cols >= 0, func, "n_cols must be >= 0");
  if (M == 0 || N == 0) return;
  require(y != 0 && row_scale != 0 && w_scale != 0 && (K == 0 || (q != 0 && w != 0)), func, "null device pointer");
  require(cols == 0 || K == 0 || x != 0, func, "the outlier columns (cols, count) need x");
  DeviceGuard guard(device, func);

  int cfg = tile;
  if (cfg == 0) {
    if (M <= 16) cfg = 3;
    else if (ceil_div(M, TileLarge::BM) * ceil_div(N, TileLarge::BN) >= sm_count(device, func)) cfg = 1;
    else cfg = 2;
  }
  const bool vw16 = K % 16 == 0 && aligned16(q) && aligned16(w) && (M == 1 || s_qm % 16 == 0) &&
                    (N == 1 || s_wn % 16 == 0);
  if (cfg == 1 && !vw16) cfg = 2;  // byte loads of q and w need the registers of the 64 x 64 tile
  const bool flags_vec = aligned16(col_flags);
  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    const bool vec_y = N % 8 == 0 && (M == 1 || s_ym % 8 == 0) && aligned16(y);
    auto go = [&](auto tile_tag) {
      using Tile = decltype(tile_tag);
      const int64_t tiles = ceil_div(M, Tile::BM) * ceil_div(N, Tile::BN);
      require(tiles < (int64_t{1} << 31), func, "problem too large for the grid");
      launch_gemm<T, Tile>(vw16, tiles, stream, reinterpret_cast<const int8_t*>(q), s_qm,
                           reinterpret_cast<const float*>(row_scale), reinterpret_cast<const int8_t*>(w), s_wn,
                           reinterpret_cast<const float*>(w_scale), reinterpret_cast<const T*>(bias),
                           reinterpret_cast<T*>(y), s_ym, M, N, K, reinterpret_cast<const T*>(x), s_xm, s_xk,
                           reinterpret_cast<const int*>(col_flags), flags_vec, reinterpret_cast<const int*>(cols),
                           n_cols, reinterpret_cast<const int*>(count), vec_y);
    };
    if (cfg == 1) go(TileLarge{});
    else if (cfg == 2) go(TileMid{});
    else go(TileDecode{});
    FP_CHECK_LAUNCH(func);
  });
}

void int8_dequant_matmul(const Int8DequantMatmulParams& p) {
  FASTPEFT_INT8_DEQUANT_MATMUL(FASTPEFT_UNPACK)
  const char* func = "int8_dequant_matmul";
  require(M >= 0 && N >= 0 && K >= 0, func,
          "sizes must be >= 0, got M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K));
  check_dtype(func, dtype);
  require(tile >= 0 && tile <= 3, func, "tile must be 0 (choose), 1 (large), 2 (64x64; fp32: large) or 3 (16-row)");
  if (M == 0 || K == 0) return;
  require(dx != 0 && (N == 0 || (dy != 0 && w != 0 && w_scale != 0)), func, "null device pointer");
  DeviceGuard guard(device, func);

  dispatch_dtype(dtype, func, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec_width<T>();
    const bool vec = s_dn == 1 && N % V == 0 && (M == 1 || s_dm % V == 0) && aligned16(dy) && s_wk == 1 &&
                     K % 16 == 0 && (N == 1 || s_wn % 16 == 0) && aligned16(w);
    const bool vec_x = K % 8 == 0 && (M == 1 || s_xm % 8 == 0) && aligned16(dx);
    auto go = [&](auto tile_tag) {
      using Tile = decltype(tile_tag);
      const int64_t tiles = ceil_div(M, Tile::BM) * ceil_div(K, Tile::BK);
      require(tiles < (int64_t{1} << 31), func, "problem too large for the grid");
      launch_dequant_matmul<T, Tile>(vec, tiles, stream, reinterpret_cast<const T*>(dy), s_dm, s_dn,
                                     reinterpret_cast<const int8_t*>(w), s_wn, s_wk,
                                     reinterpret_cast<const float*>(w_scale), reinterpret_cast<T*>(dx), s_xm, M, N, K,
                                     vec_x);
    };
    int cfg = tile;
    if (cfg == 0) {
      if (M <= 16) cfg = 3;
      else if (ceil_div(M, DqLarge::BM) * ceil_div(K, DqLarge::BK) >= sm_count(device, func)) cfg = 1;
      else cfg = 2;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (cfg == 3) go(DqSmall32{});
      else go(DqLarge32{});
    } else {
      if (cfg == 1 && vec) go(DqLarge{});
      else if (cfg == 3) go(DqSmall{});
      else go(DqMid{});  // also the 128 x 128 choice with element loads, whose registers it would exceed
    }
    FP_CHECK_LAUNCH(func);
  });
}

// The runtime / driver version pair fastpeft._C checks at import (fastpeft/ops/_cext.py: check_driver): the
// static CUDA runtime linked in needs a driver of at least its major version.
int cuda_runtime_version() { return CUDART_VERSION; }

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();  // clear: no driver is not an error here
    return 0;
  }
  return v;
}

}  // namespace fastpeft
