// lm_head.cuh — the decode LM head fused with the token choice, for at most 16 rows: the contract of
// reference.lm_head_gumbel (greedy rows: reference.lm_head_argmax). The logits are never written.
//
// Design: the decode GEMV (linear.cuh gemv_sums) over the tied embedding wte (V, C), kLmHeadGroups
// groups of 4 vocabulary rows per block (64 tokens: 786 blocks at V = 50257, so the merge below
// reads 786 candidates a row, not 12565). Threads t * 4 + r finish each group's logit y of row t,
// token n, score it, y for a greedy row (temperature < sampling.GREEDY_BELOW) and y / T + g for a
// sampled one, g the Gumbel noise of sampling.py's Philox stream at (seed, n) (sampling.cuh
// gumbel_noise, bit for bit), and keep their best (score, token; ties to the lowest token). The
// block's best per row goes to an fp32/int32 workspace; the block that draws the last ticket (the
// ticket-counter pattern of attention.cuh, same ordering argument) takes the argmax over all blocks'
// candidates per row, stores the token and resets the counter. One launch.
//
// Exactness: the logits are fp32 sums in another order than the reference's matmul, and logf is
// not torch's log, so a row whose two best scores lie within a few fp32 ulps may pick the other
// one; the tests compare rows with a margin. A row whose scores are all NaN (a non-finite hidden
// row: the engine flags it before anyone reads the token) gets token 0.
//
// Napkin math (GPT-2 124M fp16): the weight is 77.2 MB, 23.0 us at 3.35 TB/s, as the Triton LM
// head; the candidates are 786 x T x 8 bytes (6 KB at batch 1), read back once from L2.
#pragma once

#include <type_traits>

#include "../common.cuh"
#include "linear.cuh"
#include "sampling.cuh"

namespace gpt2fast {

constexpr int kLmHeadGroups = 16;  // groups of kGemvOutputsPerBlock vocabulary rows per block
constexpr int kLmHeadTokensPerBlock = kLmHeadGroups * kGemvOutputsPerBlock;

// 3 blocks per SM for 16 rows (as the 16-row LayerNorm GEMV): at 128 registers the fp16/bf16 variant
// spilled 16 bytes on sm_80 (its running best, seed and temperature beside the GEMV's 64 accumulators).
template <typename T, int kVec, int kRows, typename W = T>
__global__ void __launch_bounds__(kGemvThreads, (kRows == kGemvMaxRows ? 3 : 4))
    lm_head_choice_kernel(
    const T* __restrict__ x,              // [rows, width], rows x_stride apart
    const W* __restrict__ wte,            // [vocab, width], contiguous (int8: times w_scale[n])
    const float* __restrict__ w_scale,    // [vocab] per-row scales of an int8 wte, else unread
    const float* __restrict__ temperature,  // [rows]; < GREEDY_BELOW: the argmax; nullptr: all argmax
    const int64_t* __restrict__ seeds,    // [rows] Philox row seeds (sampling.row_seed); with temperature
    float* __restrict__ part_score,       // [gridDim.x, rows] each block's best score per row
    int* __restrict__ part_token,         // [gridDim.x, rows] and its token
    int* __restrict__ counter,            // [1] ticket, 0 on entry and left 0
    int64_t* __restrict__ out,            // [rows] chosen token ids
    int rows, int vocab, int width, int64_t x_stride) {
  constexpr int kOut = kGemvOutputsPerBlock;
  constexpr int kValues = kRows * kOut;
  static_assert((kValues & (kValues - 1)) == 0 && kValues <= 3 * kWarpSize);
  const int num_warps = blockDim.x / kWarpSize;
  float* partials = reinterpret_cast<float*>(dyn_smem);  // [num_warps][kValues]

  // Thread i < kValues scores row t = i / kOut, token column r = i % kOut of every group.
  const int t = threadIdx.x / kOut;
  const bool scorer = threadIdx.x < kValues && t < rows;
  const bool greedy =
      !scorer || temperature == nullptr || static_cast<double>(temperature[t]) < kGreedyBelow;
  const float temp = greedy ? 1.0f : temperature[t];
  const uint64_t seed = greedy ? 0 : static_cast<uint64_t>(seeds[t]);
  ArgMax best{-INFINITY, 0x7fffffff};
  const int first = blockIdx.x * kLmHeadTokensPerBlock;
  for (int group = 0; group < kLmHeadGroups; ++group) {
    const int n0 = first + group * kOut;
    if (n0 >= vocab) break;  // block-uniform
    gemv_sums<T, kVec, kRows, false, W>(x, wte, nullptr, nullptr, nullptr, partials, rows, vocab,
                                        width, x_stride, n0);
    const int n = n0 + static_cast<int>(threadIdx.x) % kOut;
    if (scorer && n < vocab) {
      float y = 0.0f;
      for (int w = 0; w < num_warps; ++w) y += partials[w * kValues + threadIdx.x];
      if constexpr (!std::is_same_v<W, T>) y *= w_scale[n];
      const float score = greedy ? y : y / temp + gumbel_noise(seed, n);
      best = better(best, ArgMax{score, n});
    }
    __syncthreads();  // partials are rewritten by the next group
  }
  // The block's best per row: its kOut scorers meet in shared memory, lowest column first.
  __shared__ float cand_score[kValues];
  __shared__ int cand_token[kValues];
  if (threadIdx.x < kValues) {
    cand_score[threadIdx.x] = best.value;
    cand_token[threadIdx.x] = best.index;
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    ArgMax row_best{-INFINITY, 0x7fffffff};
    for (int r = 0; r < kOut; ++r) {
      row_best = better(row_best, ArgMax{cand_score[threadIdx.x * kOut + r],
                                         cand_token[threadIdx.x * kOut + r]});
    }
    part_score[static_cast<int64_t>(blockIdx.x) * rows + threadIdx.x] = row_best.value;
    part_token[static_cast<int64_t>(blockIdx.x) * rows + threadIdx.x] = row_best.index;
  }

  // The last block merges (memory ordering as attention.cuh: fence, barrier, ticket; the last
  // drawer fences after its atomic, its threads read through L2).
  __threadfence();
  __syncthreads();
  __shared__ int is_last;
  if (threadIdx.x == 0) {
    is_last = atomicAdd(counter, 1) == static_cast<int>(gridDim.x) - 1;
    __threadfence();
  }
  __syncthreads();
  if (!is_last) return;  // block-uniform
  for (int row = 0; row < rows; ++row) {
    ArgMax a{-INFINITY, 0x7fffffff};
    for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += blockDim.x) {
      const int64_t i = static_cast<int64_t>(b) * rows + row;
      a = better(a, ArgMax{__ldcg(part_score + i), __ldcg(part_token + i)});
    }
    a = block_argmax(a);
    if (threadIdx.x == 0) out[row] = a.index == 0x7fffffff ? 0 : a.index;
  }
  if (threadIdx.x == 0) *counter = 0;
}

// ---- launchers ---------------------------------------------------------------------------------

// The number of blocks (and of candidates per row in the workspaces) for a vocabulary of `vocab`.
constexpr int lm_head_blocks(int vocab) {
  return (vocab + kLmHeadTokensPerBlock - 1) / kLmHeadTokensPerBlock;
}

template <typename T, int kVec, typename W>
cudaError_t launch_lm_head_choice_rows(const T* x, const W* wte, const float* w_scale,
                                       const float* temperature,
                                       const int64_t* seeds, float* part_score, int* part_token,
                                       int* counter, int64_t* out, int rows, int vocab, int width,
                                       int64_t x_stride, cudaStream_t stream) {
  const int warps = gemv_warps(width / kVec);
  const dim3 grid(lm_head_blocks(vocab)), block(warps * kWarpSize);
  auto launch = [&](auto rows_constant) {
    constexpr int kRows = decltype(rows_constant)::value;
    const std::size_t smem = warps * kGemvOutputsPerBlock * kRows * sizeof(float);
    LAUNCH(grid, block, smem, stream, lm_head_choice_kernel<T, kVec, kRows, W>)(
        x, wte, w_scale, temperature, seeds, part_score, part_token, counter, out, rows, vocab,
        width, x_stride);
  };
  if (rows <= 1) {
    launch(std::integral_constant<int, 1>{});
  } else if (rows <= 4) {
    launch(std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, 16>{});
  }
  return cudaGetLastError();
}

// out[t] = argmax_n (logit[t, n] / T_t + g(seed_t, n)), logit = x[t] . wte[n] (T_t < GREEDY_BELOW:
// argmax_n logit[t, n]; every row when temperature and seeds are nullptr), ties to the lowest n, for
// rows <= kGemvMaxRows. With w_scale, wte is int8 and row n stands for wte[n] * w_scale[n].
// Workspaces part_score / part_token [lm_head_blocks(vocab), rows]; counter [1] zero (left zero).
inline cudaError_t lm_head_choice(const void* x, const void* wte, const float* w_scale,
                                  const float* temperature, const int64_t* seeds,
                                  float* part_score, int* part_token, int* counter, int64_t* out,
                                  int64_t rows, int64_t vocab, int64_t width, int64_t x_stride,
                                  DType dtype, cudaStream_t stream) {
  if (rows < 0 || rows > kGemvMaxRows || vocab < 1 || vocab > 0x7fff0000 || width < 1 ||
      width > 0x7fffffff || x_stride < width || counter == nullptr ||
      (temperature == nullptr) != (seeds == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int r = static_cast<int>(rows), v = static_cast<int>(vocab), c = static_cast<int>(width);
  auto typed = [&](auto zero, auto weight_zero) -> cudaError_t {
    using T = decltype(zero);
    using W = decltype(weight_zero);
    const auto* xt = static_cast<const T*>(x);
    const auto* wt = static_cast<const W*>(wte);
    if (can_vectorize<T>({x}, c, {x_stride}) && is_aligned(wte, kVecElems<T> * sizeof(W))) {
      return launch_lm_head_choice_rows<T, kVecElems<T>, W>(xt, wt, w_scale, temperature, seeds,
                                                            part_score, part_token, counter, out,
                                                            r, v, c, x_stride, stream);
    }
    return launch_lm_head_choice_rows<T, 1, W>(xt, wt, w_scale, temperature, seeds, part_score,
                                               part_token, counter, out, r, v, c, x_stride,
                                               stream);
  };
  return with_weight_types(dtype, w_scale != nullptr, typed);
}

}  // namespace gpt2fast
