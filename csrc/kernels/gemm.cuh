// gemm.cuh — the prefill linear, `out = [gelu](x @ weight.T + bias) [+ residual]` for any number of
// rows: the contract of reference.linear (x (M, K), weight (N, K) as nn.Linear stores it, fp32
// accumulation, GPT-2's tanh-GELU, one rounding at the store), and the LM head's fp32 logits
// (`x @ wte.T`, TOut = float). linear.cuh's GEMV keeps the decode batches of <= 16 rows.
//
// fp16 / bf16: tensor cores (gemm_mma_kernel), written for sm_80 and run as is on sm_90.
//   - A block of 4 warps (2 x 2) owns a kBM x kBN tile of out (128 x 128 when the grid still has
//     an H100's 132 blocks at that size, else 64 x 64, so a prefill of a few hundred rows at
//     N = 768 still spreads over the SMs); each warp a (kBM/2) x (kBN/2) sub-tile of m16n8
//     accumulators in registers (fp32).
//   - K advances in steps of kBK = 32 through a kStages = 3 deep ring of shared-memory tiles:
//     while the warps multiply step k, cp.async brings steps k + 1 and k + 2 (the loads are in
//     flight for two steps' worth of mma). Both operands are K-contiguous ("row.col": x rows and
//     weight rows), so ldmatrix without .trans gives the A and B fragments directly (mma.cuh).
//   - Shared-memory tiles are rows of kBK = 32 elements = 64 bytes = four 16-byte chunks, chunk c
//     of row r stored at chunk c ^ ((r / 2) % 4): an ldmatrix phase reads one chunk of 8
//     consecutive rows, which this XOR spreads over all 32 banks (without it, 4-way conflicts).
//   - Edges: rows past M and columns past N are zero-filled by cp.async (src size 0) and never
//     stored; K needs to be a multiple of 8 with 16-byte aligned rows (every GPT-2 width is) for
//     cp.async; otherwise the kAsync = false instantiation loads the same tiles element by element
//     (zero past K) with plain loads and stores.
//   - Epilogue in registers: bias, tanh-GELU, residual, one rounding, stored pairwise.
// fp32: CUDA cores (gemm_simt_kernel): exact fp32 FMAs, the 1e-4 contract of the fp32 model, which
//   TF32 tensor cores (10-bit mantissas) would miss. 64 x 64 tiles, 256 threads of 4 x 4 outputs,
//   K in steps of 16 through shared memory. fp32 is the accuracy reference on a GPU, not the fast
//   path.
//
// Napkin math, GPT-2 124M fp16 prefill of 512 tokens on an H100 (989 TFLOP/s dense fp16, 3.35
// TB/s): the fc projection 768 -> 3072 is 2.4 GFLOP (2.4 us at peak) over 4.7 MB of weight and 3.9
// MB of activations (2.6 us): the bytes and the FLOPs are level (arithmetic intensity ~280
// FLOP/byte, the ridge ~295), so tile reuse decides it; 128 x 128 tiles read each x row N / 128
// times from L2, not DRAM.
#pragma once

#include "../common.cuh"
#include "linear.cuh"
#include "mma.cuh"
#include "sampling.cuh"

#include <type_traits>

namespace gpt2fast {

constexpr int kGemmThreads = 128;  // 4 warps, 2 x 2
constexpr int kGemmBK = 32;        // K per pipeline stage
constexpr int kGemmStages = 3;
constexpr int kGemmChunks = kGemmBK / 8;  // 16-byte chunks per tile row

// The shared-memory offset (in elements) of chunk `chunk` of tile row `row`: the XOR swizzle.
__device__ __forceinline__ int gemm_swizzle(int row, int chunk) {
  return row * kGemmBK + ((chunk ^ ((row >> 1) & (kGemmChunks - 1))) * 8);
}

// Shared memory: kGemmStages A tiles, then kGemmStages B tiles; an int8 weight (W = int8_t) instead
// has kGemmStages raw int8 tiles (cp.async'd as stored) and one converted B tile.
template <typename T, typename W, int kBM, int kBN>
constexpr std::size_t gemm_mma_smem() {
  constexpr std::size_t a = std::size_t{kGemmStages} * kBM * kGemmBK * sizeof(T);
  if constexpr (std::is_same_v<W, T>) {
    return a + std::size_t{kGemmStages} * kBN * kGemmBK * sizeof(T);
  }
  return a + std::size_t{kGemmStages} * kBN * kGemmBK + std::size_t{kBN} * kGemmBK * sizeof(T);
}

// bias -> GELU -> residual for out[row, col] (in range), rounded once to TOut.
template <typename T, typename TOut>
__device__ __forceinline__ void gemm_store(float y, int row, int col, const T* __restrict__ bias,
                                           const T* __restrict__ residual, int64_t res_stride,
                                           bool gelu, TOut* __restrict__ out, int n_out) {
  if (bias != nullptr) y += to_float(bias[col]);
  if (gelu) y = tanh_gelu(y);
  if (residual != nullptr) y += to_float(residual[static_cast<int64_t>(row) * res_stride + col]);
  out[static_cast<int64_t>(row) * n_out + col] = from_float<TOut>(y);
}

// One kBM-row or kBN-row operand tile of step k0 (rows from `row0` of src, `rows` of them exist,
// `stride` apart) into its shared-memory stage.
template <typename T, int kRowsTile, bool kAsync>
__device__ __forceinline__ void gemm_load_tile(T* __restrict__ tile, const T* __restrict__ src,
                                               int row0, int rows, int64_t stride, int k0,
                                               int k_in) {
#pragma unroll
  for (int c = threadIdx.x; c < kRowsTile * kGemmChunks; c += kGemmThreads) {
    const int r = c / kGemmChunks, chunk = c % kGemmChunks;
    const int row = row0 + r, k = k0 + chunk * 8;
    T* dst = tile + gemm_swizzle(r, chunk);
    if constexpr (kAsync) {
      const bool inside = row < rows && k < k_in;  // k_in % 8 == 0: a chunk is all in or all out
      const T* from = inside ? src + static_cast<int64_t>(row) * stride + k : src;
      cp_async_16(dst, from, inside ? 16 : 0);
    } else {
      Packed<T, 8> v;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v.v[e] = row < rows && k + e < k_in ? src[static_cast<int64_t>(row) * stride + k + e]
                                            : from_float<T>(0.0f);
      }
      *reinterpret_cast<Packed<T, 8>*>(dst) = v;
    }
  }
}

// ---- the LM head's token choice as the GEMM's epilogue -------------------------------------
// When no row needs its logits, the LM head GEMM (x @ wte.T) never stores them: each block scores
// its tile, y for a greedy row and y / T + g for a sampled one (g: sampling.cuh gumbel_noise at
// (seed, token), bit for bit the Philox noise of sampling.py), keeps each row's best (ties to the
// lowest token) in a workspace, and the block that draws the last ticket of its row tile (the
// ticket pattern of lm_head.cuh and attention.cuh: fence, barrier, ticket; the last drawer reads
// through L2) merges the candidates of every column tile and stores the tokens.
struct GemmChoice {
  const float* temperature;  // [rows]; < kGreedyBelow: argmax; nullptr: every row's argmax
  const int64_t* seeds;      // [rows] Philox row seeds, with temperature
  float* part_score;         // [column tiles, rows] each block's best score per row
  int* part_token;           // [column tiles, rows] and its token
  int* counters;             // [row tiles] tickets, 0 on entry and left 0
  int64_t* out;              // [rows] chosen tokens
};

struct GemmRowChoice {  // one row's choice settings, read once
  bool greedy;
  float temp;
  uint64_t seed;
};

__device__ __forceinline__ GemmRowChoice gemm_row_choice(const GemmChoice& c, int row, int rows) {
  const bool greedy = row >= rows || c.temperature == nullptr ||
                      static_cast<double>(c.temperature[row]) < kGreedyBelow;
  return {greedy, greedy ? 1.0f : c.temperature[row],
          greedy ? 0 : static_cast<uint64_t>(c.seeds[row])};
}

__device__ __forceinline__ float gemm_choice_score(const GemmRowChoice& r, float y, int col) {
  return r.greedy ? y : y / r.temp + gumbel_noise(r.seed, col);
}

// After every block wrote its candidates for rows m0 .. m0 + tile_rows - 1: the ticket, and the
// last block of the row tile stores their tokens. Every thread of the block calls it.
__device__ __forceinline__ void gemm_choice_merge(const GemmChoice& c, int m0, int tile_rows,
                                                  int rows) {
  __threadfence();
  __syncthreads();
  __shared__ int is_last;
  if (threadIdx.x == 0) {
    is_last = atomicAdd(c.counters + blockIdx.y, 1) == static_cast<int>(gridDim.x) - 1;
    __threadfence();
  }
  __syncthreads();
  if (!is_last) return;  // block-uniform
  for (int r = 0; r < tile_rows && m0 + r < rows; ++r) {  // block-uniform bounds
    const int row = m0 + r;
    ArgMax a{-INFINITY, 0x7fffffff};
    for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += blockDim.x) {
      const int64_t i = static_cast<int64_t>(b) * rows + row;
      a = better(a, ArgMax{__ldcg(c.part_score + i), __ldcg(c.part_token + i)});
    }
    a = block_argmax(a);
    if (threadIdx.x == 0) c.out[row] = a.index == 0x7fffffff ? 0 : a.index;
  }
  if (threadIdx.x == 0) c.counters[blockIdx.y] = 0;
}

// An int8 weight tile of step k0 as stored ([kBN][kGemmBK] bytes, two 16-byte chunks a row; rows
// from n0, `rows` of them exist), zeros past the edges. kAsync: K % 16 == 0, 16-byte aligned rows.
template <int kBN, bool kAsync>
__device__ __forceinline__ void gemm_load_int8_tile(int8_t* __restrict__ tile,
                                                    const int8_t* __restrict__ src, int rows,
                                                    int k0, int k_in) {
#pragma unroll
  for (int c = threadIdx.x; c < kBN * 2; c += kGemmThreads) {
    const int r = c / 2, k = k0 + (c % 2) * 16;
    int8_t* dst = tile + r * kGemmBK + (c % 2) * 16;
    if constexpr (kAsync) {
      const bool inside = r < rows && k < k_in;
      cp_async_16(dst, inside ? src + static_cast<int64_t>(r) * k_in + k : src, inside ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        dst[e] = r < rows && k + e < k_in ? src[static_cast<int64_t>(r) * k_in + k + e] : 0;
      }
    }
  }
}

// The raw int8 tile, widened to T (exact: |q| <= 127 fits fp16's and bf16's mantissas) into the B
// tile's swizzled layout; the scales wait for the epilogue.
template <typename T, int kBN>
__device__ __forceinline__ void gemm_widen_int8_tile(T* __restrict__ tile,
                                                     const int8_t* __restrict__ raw) {
#pragma unroll
  for (int c = threadIdx.x; c < kBN * kGemmChunks; c += kGemmThreads) {
    const int r = c / kGemmChunks, chunk = c % kGemmChunks;
    const Packed<int8_t, 8> q = *reinterpret_cast<const Packed<int8_t, 8>*>(raw + r * kGemmBK +
                                                                             chunk * 8);
    Packed<T, 8> v;
#pragma unroll
    for (int e = 0; e < 8; ++e) v.v[e] = from_float<T>(static_cast<float>(q.v[e]));
    *reinterpret_cast<Packed<T, 8>*>(tile + gemm_swizzle(r, chunk)) = v;
  }
}

template <typename T, typename TOut, int kBM, int kBN, bool kAsync, bool kChoice = false,
          typename W = T>
__global__ void __launch_bounds__(kGemmThreads) gemm_mma_kernel(
    const T* __restrict__ x,         // [rows, k_in], rows x_stride apart
    const W* __restrict__ weight,    // [n_out, k_in], contiguous (int8: times w_scale[n])
    const float* __restrict__ w_scale,  // [n_out] per-channel scales of an int8 weight, else unread
    const T* __restrict__ bias,      // [n_out] or nullptr
    const T* __restrict__ residual,  // [rows, n_out], rows res_stride apart, or nullptr
    TOut* __restrict__ out,          // [rows, n_out], contiguous (unused with kChoice)
    int rows, int n_out, int k_in, int64_t x_stride, int64_t res_stride, bool gelu,
    GemmChoice choice) {             // kChoice: the token choice instead of the stores
  constexpr int kWM = kBM / 2, kWN = kBN / 2;  // a warp's sub-tile
  constexpr int kMT = kWM / 16, kNT = kWN / 8;  // its m16n8 tiles
  static_assert(kNT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  constexpr bool kInt8 = !std::is_same_v<W, T>;
  T* a_tiles = reinterpret_cast<T*>(dyn_smem);        // [kGemmStages][kBM * kGemmBK]
  T* b_tiles = a_tiles + kGemmStages * kBM * kGemmBK;  // [kGemmStages][kBN * kGemmBK] (T weights)
  auto* raw_tiles = reinterpret_cast<int8_t*>(b_tiles);  // int8: [kGemmStages][kBN * kGemmBK]
  T* widened = reinterpret_cast<T*>(raw_tiles + kGemmStages * kBN * kGemmBK);  // int8: [kBN * BK]
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int wm = warp / 2, wn = warp % 2;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int steps = ceil_div(k_in, kGemmBK);

  auto load_stage = [&](int step) {
    const int stage = step % kGemmStages;
    gemm_load_tile<T, kBM, kAsync>(a_tiles + stage * kBM * kGemmBK, x, m0, rows, x_stride,
                                   step * kGemmBK, k_in);
    if constexpr (kInt8) {
      gemm_load_int8_tile<kBN, kAsync>(raw_tiles + stage * kBN * kGemmBK,
                                       weight + static_cast<int64_t>(n0) * k_in, n_out - n0,
                                       step * kGemmBK, k_in);
    } else {
      gemm_load_tile<T, kBN, kAsync>(b_tiles + stage * kBN * kGemmBK,
                                     weight + static_cast<int64_t>(n0) * k_in, 0, n_out - n0, k_in,
                                     step * kGemmBK, k_in);
    }
  };

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    }
  }

  // Prologue: steps 0 .. kStages - 2 in flight, one commit group each (empty past the end).
#pragma unroll
  for (int s = 0; s < kGemmStages - 1; ++s) {
    if (s < steps) load_stage(s);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kGemmStages - 2>();  // this thread's copies of `step` have landed ...
    __syncthreads();  // ... and everyone's; and every warp is done with the stage reloaded below
    if (step + kGemmStages - 1 < steps) load_stage(step + kGemmStages - 1);
    cp_async_commit();

    const T* a_tile = a_tiles + (step % kGemmStages) * kBM * kGemmBK;
    const T* b_tile = b_tiles + (step % kGemmStages) * kBN * kGemmBK;
    if constexpr (kInt8) {  // widen this step's raw tile (no warp reads `widened` now: see above)
      gemm_widen_int8_tile<T, kBN>(widened, raw_tiles + (step % kGemmStages) * kBN * kGemmBK);
      __syncthreads();
      b_tile = widened;
    }
#pragma unroll
    for (int kk = 0; kk < kGemmBK / 16; ++kk) {
      uint32_t a[kMT][4], b[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        const int r = wm * kWM + i * 16 + lane % 16;
        ldmatrix_x4(a[i], a_tile + gemm_swizzle(r, 2 * kk + lane / 16));
      }
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        const int r = wn * kWN + j * 8 + lane % 8 + 8 * (lane / 16);
        uint32_t pair[4];
        ldmatrix_x4(pair, b_tile + gemm_swizzle(r, 2 * kk + (lane / 8) % 2));
        b[j][0] = pair[0], b[j][1] = pair[1], b[j + 1][0] = pair[2], b[j + 1][1] = pair[3];
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
      }
    }
  }
  cp_async_wait<0>();  // nothing is left in flight (the trailing groups are empty)

  const int g = lane / 4, q = lane % 4;
  if constexpr (kChoice) {
    // Each row's best over the block's columns: a lane's own, then its quad's (xor 1, 2), then the
    // two warps of the row (wn) through shared memory.
    __shared__ float cand_score[kBM][2];
    __shared__ int cand_token[kBM][2];
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = wm * kWM + i * 16 + g + 8 * half;
        const GemmRowChoice rc = gemm_row_choice(choice, m0 + r, rows);
        ArgMax best{-INFINITY, 0x7fffffff};
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const int col = n0 + wn * kWN + j * 8 + 2 * q + e % 2;
            const float y = kInt8 && col < n_out ? acc[i][j][e] * w_scale[col] : acc[i][j][e];
            const float score = gemm_choice_score(rc, y, col);
            if (col < n_out) best = better(best, ArgMax{score, col});
          }
        }
#pragma unroll
        for (int offset = 1; offset < 4; offset *= 2) {
          best = better(best, ArgMax{__shfl_xor_sync(kFullMask, best.value, offset),
                                     __shfl_xor_sync(kFullMask, best.index, offset)});
        }
        if (q == 0) cand_score[r][wn] = best.value, cand_token[r][wn] = best.index;
      }
    }
    __syncthreads();
    if (threadIdx.x < kBM && m0 + static_cast<int>(threadIdx.x) < rows) {
      const int r = threadIdx.x;
      const ArgMax b = better(ArgMax{cand_score[r][0], cand_token[r][0]},
                              ArgMax{cand_score[r][1], cand_token[r][1]});
      const int64_t i = static_cast<int64_t>(blockIdx.x) * rows + m0 + r;
      choice.part_score[i] = b.value;
      choice.part_token[i] = b.index;
    }
    gemm_choice_merge(choice, m0, kBM, rows);
  } else {
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + wm * kWM + i * 16 + g + 8 * (e / 2);
          const int col = n0 + wn * kWN + j * 8 + 2 * q + e % 2;
          if (row < rows && col < n_out) {
            const float y = kInt8 ? acc[i][j][e] * w_scale[col] : acc[i][j][e];
            gemm_store(y, row, col, bias, residual, res_stride, gelu, out, n_out);
          }
        }
      }
    }
  }
}

// ---- fp32 on CUDA cores ------------------------------------------------------------------------

constexpr int kSimtTile = 64, kSimtBK = 16, kSimtThreads = 256;

template <bool kChoice, typename W = float>
__global__ void __launch_bounds__(kSimtThreads) gemm_simt_kernel(
    const float* __restrict__ x, const W* __restrict__ weight,
    const float* __restrict__ w_scale,  // [n_out] scales of an int8 weight, else unread
    const float* __restrict__ bias, const float* __restrict__ residual, float* __restrict__ out,
    int rows, int n_out, int k_in, int64_t x_stride, int64_t res_stride, bool gelu,
    GemmChoice choice) {
  constexpr bool kInt8 = !std::is_same_v<W, float>;
  // Tiles stored k-major ([k][row]) so the 4 x 4 outer products read rows as float4s; +4 pads
  // the stores of a column across banks.
  __shared__ __align__(16) float xs[kSimtBK][kSimtTile + 4];
  __shared__ __align__(16) float ws[kSimtBK][kSimtTile + 4];
  // 4 x 4 outputs each: rows 4 ty .. 4 ty + 3, columns 4 tx .. 4 tx + 3
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int m0 = blockIdx.y * kSimtTile, n0 = blockIdx.x * kSimtTile;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < k_in; k0 += kSimtBK) {
    for (int i = threadIdx.x; i < kSimtTile * kSimtBK; i += kSimtThreads) {
      const int r = i / kSimtBK, k = i % kSimtBK;  // consecutive threads: consecutive k (coalesced)
      const bool k_in_range = k0 + k < k_in;
      xs[k][r] = m0 + r < rows && k_in_range ? x[static_cast<int64_t>(m0 + r) * x_stride + k0 + k]
                                             : 0.0f;
      ws[k][r] = n0 + r < n_out && k_in_range
                     ? to_float(weight[static_cast<int64_t>(n0 + r) * k_in + k0 + k])
                     : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSimtBK; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(&xs[k][4 * ty]);
      const float4 b = *reinterpret_cast<const float4*>(&ws[k][4 * tx]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  if constexpr (kChoice) {  // each row's best over the tile: its 16 threads (tx) of one half-warp
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = m0 + 4 * ty + i;
      const GemmRowChoice rc = gemm_row_choice(choice, row, rows);
      ArgMax best{-INFINITY, 0x7fffffff};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = n0 + 4 * tx + j;
        if (col < n_out) {
          const float y = kInt8 ? acc[i][j] * w_scale[col] : acc[i][j];
          best = better(best, ArgMax{gemm_choice_score(rc, y, col), col});
        }
      }
#pragma unroll
      for (int offset = 1; offset < 16; offset *= 2) {
        best = better(best, ArgMax{__shfl_xor_sync(kFullMask, best.value, offset),
                                   __shfl_xor_sync(kFullMask, best.index, offset)});
      }
      if (tx == 0 && row < rows) {
        const int64_t at = static_cast<int64_t>(blockIdx.x) * rows + row;
        choice.part_score[at] = best.value;
        choice.part_token[at] = best.index;
      }
    }
    gemm_choice_merge(choice, m0, kSimtTile, rows);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = m0 + 4 * ty + i, col = n0 + 4 * tx + j;
        if (row < rows && col < n_out) {
          const float y = kInt8 ? acc[i][j] * w_scale[col] : acc[i][j];
          gemm_store(y, row, col, bias, residual, res_stride, gelu, out, n_out);
        }
      }
    }
  }
}

// ---- launchers ---------------------------------------------------------------------------------

// The tile: 128 x 128 once the grid has a block for each of an H100's 132 SMs, else 64 x 64.
// Tests pin one with set_gemm_tile (64 or 128; 0 restores the rule) to run both on small shapes.
constexpr int kGemmLargeGridBlocks = 132;
inline int g_gemm_tile = 0;
inline bool gemm_large_tiles(int rows, int n_out) {
  if (g_gemm_tile != 0) return g_gemm_tile == 128;
  return static_cast<int64_t>(ceil_div(rows, 128)) * ceil_div(n_out, 128) >= kGemmLargeGridBlocks;
}
inline bool set_gemm_tile(int tile) {
  if (tile != 0 && tile != 64 && tile != 128) return false;
  g_gemm_tile = tile;
  return true;
}

// The launch grid (column tiles, row tiles) of a GEMM of rows x n_out: what the choice's
// workspaces and ticket counters are sized by.
inline dim3 gemm_grid(int rows, int n_out, DType dtype) {
  const int tile = dtype == DType::kFloat32 ? kSimtTile : gemm_large_tiles(rows, n_out) ? 128 : 64;
  return dim3(ceil_div(n_out, tile), ceil_div(rows, tile));
}

// The operands of one GEMM launch (W: the weight's element type, T or int8_t with w_scale).
template <typename T, typename TOut, typename W = T>
struct GemmArgs {
  const T* x;
  const W* weight;
  const float* w_scale;
  const T* bias;
  const T* residual;
  TOut* out;
  int rows, n_out, k_in;
  int64_t x_stride, res_stride;
  bool gelu;
  GemmChoice choice;
};

// Whether cp.async can load the tiles: 16-byte chunks of whole rows (K a multiple of a chunk's
// elements, x's rows and the weight 16-byte aligned).
template <typename T, typename W>
bool gemm_async(const void* x, const void* weight, int k_in, int64_t x_stride) {
  return can_vectorize<T>({x}, k_in, {x_stride}) && is_aligned(weight, kVecBytes) &&
         k_in % (kVecBytes / static_cast<int>(sizeof(W))) == 0;
}

template <typename T, typename TOut, typename W, int kBM, int kBN, bool kChoice>
void launch_gemm_mma(const GemmArgs<T, TOut, W>& a, dim3 grid, cudaStream_t stream) {
  constexpr std::size_t smem = gemm_mma_smem<T, W, kBM, kBN>();
  auto launch = [&](auto async) {
    LAUNCH(grid, dim3(kGemmThreads), smem, stream,
           gemm_mma_kernel<T, TOut, kBM, kBN, decltype(async)::value, kChoice, W>)(
        a.x, a.weight, a.w_scale, a.bias, a.residual, a.out, a.rows, a.n_out, a.k_in, a.x_stride,
        a.res_stride, a.gelu, a.choice);
  };
  if (gemm_async<T, W>(a.x, a.weight, a.k_in, a.x_stride)) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

template <typename T, typename TOut, typename W, bool kChoice>
cudaError_t launch_gemm_typed(const GemmArgs<T, TOut, W>& a, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    const dim3 grid = gemm_grid(a.rows, a.n_out, DType::kFloat32);
    LAUNCH(grid, dim3(kSimtThreads), 0, stream, gemm_simt_kernel<kChoice, W>)(
        a.x, a.weight, a.w_scale, a.bias, a.residual, a.out, a.rows, a.n_out, a.k_in, a.x_stride,
        a.res_stride, a.gelu, a.choice);
  } else {
    const dim3 grid = gemm_grid(a.rows, a.n_out, DType::kFloat16);
    if (gemm_large_tiles(a.rows, a.n_out)) {
      launch_gemm_mma<T, TOut, W, 128, 128, kChoice>(a, grid, stream);
    } else {
      launch_gemm_mma<T, TOut, W, 64, 64, kChoice>(a, grid, stream);
    }
  }
  return cudaGetLastError();
}

// The argument checks gemm and gemm_choice share.
inline bool gemm_shape_ok(int64_t rows, int64_t n_out, int64_t k_in, int64_t x_stride) {
  return rows >= 0 && rows <= 0x7fffffff && n_out >= 0 && n_out <= 0x7fffffff && k_in >= 0 &&
         k_in <= 0x7fffffff && x_stride >= k_in && ceil_div(static_cast<int>(rows), 64) <= 65535;
}

// out[t] = [gelu](x[t] @ weight.T + bias) [+ residual[t]] for any number of rows (bias and
// residual may be nullptr), out contiguous in x's dtype, or fp32 logits when fp32_out (the LM
// head: no bias, GELU or residual). x rows x_stride apart, residual rows res_stride apart. With
// w_scale, weight is int8 (n_out, k_in) standing for weight[n] * w_scale[n] (W8A16).
inline cudaError_t gemm(const void* x, const void* weight, const float* w_scale, const void* bias,
                        const void* residual, void* out, int64_t rows, int64_t n_out,
                        int64_t k_in, int64_t x_stride, int64_t res_stride, bool gelu,
                        bool fp32_out, DType dtype, cudaStream_t stream) {
  if (!gemm_shape_ok(rows, n_out, k_in, x_stride) || (residual != nullptr && res_stride < n_out) ||
      (fp32_out && (bias != nullptr || residual != nullptr || gelu))) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || n_out == 0) return cudaSuccess;
  auto typed = [&](auto zero, auto out_zero, auto weight_zero) -> cudaError_t {
    using T = decltype(zero);
    using TOut = decltype(out_zero);
    using W = decltype(weight_zero);
    const GemmArgs<T, TOut, W> a{static_cast<const T*>(x),        static_cast<const W*>(weight),
                                 w_scale,                         static_cast<const T*>(bias),
                                 static_cast<const T*>(residual), static_cast<TOut*>(out),
                                 static_cast<int>(rows),          static_cast<int>(n_out),
                                 static_cast<int>(k_in),          x_stride,
                                 res_stride,                      gelu,
                                 GemmChoice{}};
    return launch_gemm_typed<T, TOut, W, false>(a, stream);
  };
  auto weights = [&](auto zero, auto out_zero) -> cudaError_t {
    return w_scale != nullptr ? typed(zero, out_zero, int8_t{}) : typed(zero, out_zero, zero);
  };
  switch (dtype) {
    case DType::kFloat32:
      return weights(float{}, float{});
    case DType::kFloat16:
      return fp32_out ? weights(__half{}, float{}) : weights(__half{}, __half{});
    case DType::kBFloat16:
      return fp32_out ? weights(__nv_bfloat16{}, float{})
                      : weights(__nv_bfloat16{}, __nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// out[t] = argmax_n (logit[t, n] / T_t + g(seed_t, n)), logit = x[t] . wte[n] (T_t <
// GREEDY_BELOW or temperature nullptr: argmax_n logit[t, n]), ties to the lowest n, for any number
// of rows, through the GEMM with the choice as its epilogue (the logits are never stored). With
// w_scale, wte is int8 and row n stands for wte[n] * w_scale[n].
// Workspaces part_score / part_token [gemm_grid.x, rows]; counters [gemm_grid.y], zero (left zero).
inline cudaError_t gemm_choice(const void* x, const void* wte, const float* w_scale,
                               const float* temperature, const int64_t* seeds, float* part_score,
                               int* part_token, int* counters, int64_t* out, int64_t rows,
                               int64_t vocab, int64_t width, int64_t x_stride, DType dtype,
                               cudaStream_t stream) {
  if (!gemm_shape_ok(rows, vocab, width, x_stride) || vocab < 1 || vocab > 0x7fff0000 ||
      width < 1 || counters == nullptr || (temperature == nullptr) != (seeds == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const GemmChoice choice{temperature, seeds, part_score, part_token, counters, out};
  auto typed = [&](auto zero, auto weight_zero) -> cudaError_t {
    using T = decltype(zero);
    using W = decltype(weight_zero);
    const GemmArgs<T, float, W> a{static_cast<const T*>(x), static_cast<const W*>(wte), w_scale,
                                  nullptr, nullptr, nullptr, static_cast<int>(rows),
                                  static_cast<int>(vocab), static_cast<int>(width), x_stride, 0,
                                  false, choice};
    return launch_gemm_typed<T, float, W, true>(a, stream);
  };
  return with_weight_types(dtype, w_scale != nullptr, typed);
}

}  // namespace gpt2fast
