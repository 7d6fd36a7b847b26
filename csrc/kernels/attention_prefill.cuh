// attention_prefill.cuh — causal flash attention for prefill chunks over the paged cache, fp16/bf16
// on tensor cores: the contract of reference.attention (and of reference.write_kv_attention when
// given the chunk's K and V) for steps whose sequences have any number of queries. Decode steps
// keep attention.cuh (split-K over the pages); fp32 prefill runs that kernel once per query row
// (gpt2fast/ops/cuda.py), the exact-fp32 path.
//
// FlashAttention-2 layout. Grid (sequences, query tiles of 64, heads), 4 warps; warp w owns query
// rows 16 w .. 16 w + 15 of its tile and keeps, per row, the online-softmax state in registers:
// the running max m (exp2 domain: q is scaled by scale * log2 e), the sum l (lane-partial, summed
// over the quad at the end) and the output accumulators (16 x 64 fp32 as 8 m16n8 tiles).
//   - Sequence b's queries are the positions start .. ctx - 1 (ctx = seq_lens[b], start = ctx -
//     its query count): chunked prefill with earlier context in the pages. A query tile needs keys
//     0 .. its last position: tiles of 64 keys through a 2-stage cp.async ring (K and V, 8 KB
//     each in fp16), the next tile in flight while the warps multiply this one.
//   - Keys before `start` come from the pages (block_tables); the chunk's own keys come from k_new
//     / v_new (the step's K and V), never from the cache this launch writes: each block stores the
//     K/V rows of its own queries into their slots (slot_mapping; a row with slot -1 stores nothing
//     and reads its position from the cache, as write_kv then attention would).
//   - S = Q K^T: Q's fragments are loaded once (ldmatrix from a swizzled tile), K's by ldmatrix as
//     the GEMM's weight ([key][d] is [n][k]); 32 mma per warp per key tile. Causal mask by
//     position. P = exp2(S - m) is rounded to T and reused in registers as the A fragments of P V
//     (an m16n8 C tile pair is exactly an m16k16 A fragment); V's B fragments come from
//     ldmatrix.trans of the [key][d] tile.
//   - Shared-memory rows are 64 elements = 8 16-byte chunks, chunk c of row r at c ^ (r % 8).
//
// Numerics: fp32 scores and sums; P in T before P V (as FlashAttention and the Triton kernel do):
// relative error ~ one T ulp of the probabilities (tests: fp16 atol 2e-3, bf16 1.6e-2 at O(1)).
//
// Napkin math (GPT-2 124M, one 512-token prompt, one layer, fp16): Q K^T and P V are 2 x 2 x 12 x
// 512 x 512 / 2 x 64 = 0.4 GFLOP (causal), K/V read once per query tile: 8 tiles x 12 heads x
// 128 KB on average = 6 MB from L2. Under a microsecond of tensor-core time at H100 rates; the
// 96 blocks (8 tiles x 12 heads) under-fill 132 SMs at this size (a longer prompt or a batch fills
// them).
#pragma once

#include <cstring>

#include "../common.cuh"
#include "attention.cuh"
#include "mma.cuh"

namespace gpt2fast {

constexpr int kFlashRows = 64;     // queries per block (4 warps x 16)
constexpr int kFlashKeys = 64;     // keys per tile
constexpr int kFlashThreads = 128;
constexpr int kFlashChunks = kAttentionHeadDim / 8;  // 16-byte chunks per 64-element row

template <typename T>
constexpr std::size_t flash_smem() {
  return static_cast<std::size_t>(kFlashRows + 4 * kFlashKeys) * kAttentionHeadDim * sizeof(T);
}

__device__ __forceinline__ int flash_swizzle(int row, int chunk) {
  return row * kAttentionHeadDim + ((chunk ^ (row & 7)) * 8);
}

// Two fp32 values rounded to T, packed as one 32-bit register (the lower one in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  const Packed<T, 2> p{{from_float<T>(lo), from_float<T>(hi)}};
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  return bits;
}

template <typename T>
__global__ void __launch_bounds__(kFlashThreads) attention_prefill_kernel(
    const T* __restrict__ q,             // [T, H, D], strides (q_tok, q_head, 1)
    const T* __restrict__ k_cache,       // [NB, H, BS, D] contiguous, 16-byte aligned; never read
    const T* __restrict__ v_cache,       //   at a slot this launch stores
    T* k_cache_out,                      // the same caches: the stores of k_new / v_new
    T* v_cache_out,
    const T* __restrict__ k_new,         // [T, H, D], strides (kv_tok, kv_head, 1), or nullptr
    const T* __restrict__ v_new,
    const int64_t* __restrict__ slots,   // [T] cache slot of each row's K/V (with k_new)
    const int* __restrict__ cu_seqlens,  // [B + 1]
    const int* __restrict__ seq_lens,    // [B] context length including this step's queries
    const int* __restrict__ block_tables,  // [B, max_blocks]
    T* __restrict__ out,                 // [T, H, D] contiguous
    int block_size, int max_blocks, int64_t q_tok, int64_t q_head, int64_t kv_tok,
    int64_t kv_head, float scale_log2) {
  constexpr int D = kAttentionHeadDim;
  const int seq = blockIdx.x, tile = blockIdx.y, head = blockIdx.z, n_head = gridDim.z;
  const int q0 = cu_seqlens[seq], q_len = cu_seqlens[seq + 1] - q0;
  const int m_begin = tile * kFlashRows;
  if (m_begin >= q_len) return;  // block-uniform, before any barrier
  const int rows_here = q_len - m_begin < kFlashRows ? q_len - m_begin : kFlashRows;
  const int ctx = seq_lens[seq], start = ctx - q_len;  // positions of the queries: start .. ctx - 1
  const int kv_end = start + m_begin + rows_here;      // keys this tile's last query sees
  const int* table = block_tables + static_cast<int64_t>(seq) * max_blocks;
  const int64_t page_stride = static_cast<int64_t>(n_head) * block_size * D;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;

  T* qs = reinterpret_cast<T*>(dyn_smem);         // [64][D]
  T* ks = qs + kFlashRows * D;                    // [2][64][D]
  T* vs = ks + 2 * kFlashKeys * D;                // [2][64][D]

  // The chunk's K/V rows of this tile's queries, into their slots (read by later steps only).
  if (k_new != nullptr) {
    for (int i = threadIdx.x; i < rows_here * D; i += kFlashThreads) {
      const int row = q0 + m_begin + i / D, d = i % D;
      const int64_t slot = slots[row];
      if (slot >= 0) {
        const int64_t dst = slot / block_size * page_stride +
                            (static_cast<int64_t>(head) * block_size + slot % block_size) * D + d;
        const int64_t src = row * kv_tok + head * kv_head + d;
        k_cache_out[dst] = k_new[src];
        v_cache_out[dst] = v_new[src];
      }
    }
  }
  // Q tile (zeros past the tile's rows): element loads, once per block (q may be any view).
  for (int c = threadIdx.x; c < kFlashRows * kFlashChunks; c += kFlashThreads) {
    const int r = c / kFlashChunks, chunk = c % kFlashChunks;
    Packed<T, 8> v;
    const T* src = q + (q0 + m_begin + r) * q_tok + head * q_head + chunk * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) v.v[e] = r < rows_here ? src[e] : from_float<T>(0.0f);
    *reinterpret_cast<Packed<T, 8>*>(qs + flash_swizzle(r, chunk)) = v;
  }

  // K/V tile j (keys 64 j ..) into stage s: pages before `start`, k_new/v_new from there on.
  auto load_kv = [&](int j, int s) {
    T* kd = ks + s * kFlashKeys * D;
    T* vd = vs + s * kFlashKeys * D;
    for (int c = threadIdx.x; c < kFlashKeys * kFlashChunks; c += kFlashThreads) {
      const int r = c / kFlashChunks, chunk = c % kFlashChunks;
      const int pos = j * kFlashKeys + r;
      const int off = flash_swizzle(r, chunk);
      const int64_t new_row = q0 + pos - start;
      const bool fresh = pos >= start && pos < kv_end && k_new != nullptr && slots[new_row] >= 0;
      if (fresh) {
        const int64_t src = new_row * kv_tok + head * kv_head + chunk * 8;
        cp_async_16(kd + off, k_new + src, 16);
        cp_async_16(vd + off, v_new + src, 16);
      } else if (pos < kv_end) {
        const int64_t src = table[pos / block_size] * page_stride +
                            (static_cast<int64_t>(head) * block_size + pos % block_size) * D +
                            chunk * 8;
        cp_async_16(kd + off, k_cache + src, 16);
        cp_async_16(vd + off, v_cache + src, 16);
      } else {  // past the last key: zeros (masked anyway; never garbage that could be NaN)
        cp_async_16(kd + off, k_cache, 0);
        cp_async_16(vd + off, v_cache, 0);
      }
    }
  };

  const int tiles = ceil_div(kv_end, kFlashKeys);
  load_kv(0, 0);
  cp_async_commit();
  __syncthreads();  // the Q tile
  uint32_t qa[D / 16][4];  // this warp's 16 query rows as A fragments, k over D
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qa[kk], qs + flash_swizzle(warp * 16 + lane % 16, 2 * kk + lane / 16));
  }

  const int g = lane / 4, qd = lane % 4;
  const int qpos[2] = {start + m_begin + warp * 16 + g, start + m_begin + warp * 16 + g + 8};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
  }

  for (int j = 0; j < tiles; ++j) {
    if (j + 1 < tiles) load_kv(j + 1, (j + 1) % 2);
    cp_async_commit();
    cp_async_wait<1>();  // tile j has landed (for this thread) ...
    __syncthreads();     // ... for every thread
    const T* kt = ks + (j % 2) * kFlashKeys * D;
    const T* vt = vs + (j % 2) * kFlashKeys * D;

    float s[kFlashKeys / 8][4];  // scores: 8 n8 tiles of keys
#pragma unroll
    for (int i = 0; i < kFlashKeys / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int p = 0; p < kFlashKeys / 16; ++p) {
        uint32_t pair[4];
        ldmatrix_x4(pair, kt + flash_swizzle(p * 16 + lane % 8 + 8 * (lane / 16),
                                             2 * kk + (lane / 8) % 2));
        const uint32_t b0[2] = {pair[0], pair[1]}, b1[2] = {pair[2], pair[3]};
        mma_16816<T>(s[2 * p], qa[kk], b0);
        mma_16816<T>(s[2 * p + 1], qa[kk], b1);
      }
    }
    // Scale, mask (causal: key position > query position), the new row maxima over the quad.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < kFlashKeys / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kpos = j * kFlashKeys + i * 8 + 2 * qd + e % 2;
        const float v = kpos <= qpos[e / 2] ? s[i][e] * scale_log2 : -INFINITY;
        s[i][e] = v;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], v);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFullMask, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFullMask, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      base[r] = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet: exp2(-inf) = 0
      alpha[r] = exp2f(m[r] - base[r]);             // m = -inf: 0
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] *= alpha[e / 2];
    }
#pragma unroll
    for (int i = 0; i < kFlashKeys / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[i][e] = exp2f(s[i][e] - base[e / 2]);
        l[e / 2] += s[i][e];
      }
    }
    // O += P V: P's C tiles 2 kk and 2 kk + 1 are the A fragment of keys 16 kk .. 16 kk + 15.
#pragma unroll
    for (int kk = 0; kk < kFlashKeys / 16; ++kk) {
      const uint32_t pa[4] = {pack_pair<T>(s[2 * kk][0], s[2 * kk][1]),
                              pack_pair<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack_pair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_pair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int p = 0; p < D / 16; ++p) {
        uint32_t pair[4];
        ldmatrix_x4<true>(pair, vt + flash_swizzle(kk * 16 + lane % 8 + 8 * ((lane / 8) % 2),
                                                   2 * p + lane / 16));
        const uint32_t b0[2] = {pair[0], pair[1]}, b1[2] = {pair[2], pair[3]};
        mma_16816<T>(acc[2 * p], pa, b0);
        mma_16816<T>(acc[2 * p + 1], pa, b1);
      }
    }
    __syncthreads();  // every warp is done with stage j % 2 before tile j + 2 overwrites it
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
    l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int r = warp * 16 + g + 8 * (e / 2);  // row in the tile
    if (r < rows_here) {
      const int64_t row = q0 + m_begin + r;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        out[(row * n_head + head) * D + i * 8 + 2 * qd + e % 2] =
            from_float<T>(acc[i][e] / l[e / 2]);
      }
    }
  }
}

// ---- launcher ----------------------------------------------------------------------------------

// Prefill attention for sequences with any number of queries (max_query_len of them at most), T =
// fp16 or bf16, head_dim 64. With k_new / v_new (write_kv_attention, rows 16-byte aligned): stores
// them at slots first in effect (no block reads a slot this launch writes). Arguments as
// attention_decode's.
inline cudaError_t attention_prefill(const void* q, void* k_cache, void* v_cache, const void* k_new,
                                     const void* v_new, const int64_t* slots,
                                     const int* cu_seqlens, const int* seq_lens,
                                     const int* block_tables, void* out, int64_t num_seqs,
                                     int64_t max_query_len, int64_t n_head, int64_t head_dim,
                                     int64_t block_size, int64_t max_blocks, int64_t q_tok,
                                     int64_t q_head, int64_t kv_tok, int64_t kv_head, float scale,
                                     DType dtype, cudaStream_t stream) {
  if (num_seqs < 0 || num_seqs > 0x7fffffff || max_query_len < 0 || n_head < 1 ||
      n_head > 65535 || head_dim != kAttentionHeadDim || block_size < 1 || max_blocks < 0 ||
      (k_new == nullptr) != (v_new == nullptr) || (k_new != nullptr && slots == nullptr) ||
      dtype == DType::kFloat32 || ceil_div(static_cast<int>(max_query_len), kFlashRows) > 65535) {
    return cudaErrorInvalidValue;
  }
  if (num_seqs == 0 || max_query_len == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(num_seqs),
                  static_cast<unsigned>(ceil_div(static_cast<int>(max_query_len), kFlashRows)),
                  static_cast<unsigned>(n_head));
  const float scale_log2 = scale * kLog2e;
  auto typed = [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    if (k_new != nullptr &&
        !can_vectorize<T>({k_new, v_new}, kAttentionHeadDim, {kv_tok, kv_head})) {
      return cudaErrorInvalidValue;  // cp.async reads the chunk's K/V rows in 16-byte chunks
    }
    LAUNCH(grid, dim3(kFlashThreads), flash_smem<T>(), stream, attention_prefill_kernel<T>)(
        static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),
        static_cast<T*>(k_cache), static_cast<T*>(v_cache), static_cast<const T*>(k_new),
        static_cast<const T*>(v_new), slots, cu_seqlens, seq_lens, block_tables,
        static_cast<T*>(out), static_cast<int>(block_size), static_cast<int>(max_blocks), q_tok,
        q_head, kv_tok, kv_head, scale_log2);
    return cudaGetLastError();
  };
  return dtype == DType::kFloat16 ? typed(__half{}) : typed(__nv_bfloat16{});
}

}  // namespace gpt2fast
