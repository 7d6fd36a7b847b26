// embed.cuh — token plus position embedding, `out[t] = wte[ids[t]] + wpe[positions[t]]`, added
// in fp32 and rounded once to the tables' dtype: the contract of reference.embed.
//
// One block per token gathers its two rows with 16-byte vectors (8 fp16/bf16, 4 fp32; one element
// per load when the width, a row stride or a pointer is not 16-byte aligned) and writes one row.
// A pure gather: nothing to reduce, nothing to share.
//
// Ids are not validated on the host (that would cost a device-to-host sync per step; the engine
// checks prompt ids, Engine.check_ids, and sampled ids come from the vocabulary). The kernel
// never reads out of bounds instead: a token whose id is outside [0, vocab) or whose position is
// outside [0, n_positions) gets a row of NaN, which stays in that row (every later op is row-wise
// or per sequence) and shows in its logits rather than passing as a plausible embedding.
//
// Napkin math, GPT-2 124M fp16: per token two 1.5 KB rows read and one written, + 16 bytes of
// int64 id and position: batch 1 4.6 KB (0.001 us at 3.35 TB/s: launch-bound), batch 64 0.30 MB
// (0.09 us), a 1024-token prefill 4.7 MB (1.4 us).
#pragma once

#include <algorithm>
#include <type_traits>

#include "../common.cuh"

namespace gpt2fast {

constexpr int kEmbedMaxThreads = 256;

template <typename T, typename Index, int kVec, typename W = T>
__global__ void __launch_bounds__(kEmbedMaxThreads) embed_kernel(
    const Index* __restrict__ ids,        // [tokens], ids_stride apart
    const Index* __restrict__ positions,  // [tokens], pos_stride apart
    const W* __restrict__ wte,            // [vocab, width], rows wte_stride apart (int8: x w_scale)
    const float* __restrict__ w_scale,    // [vocab] row scales of an int8 wte, else unread
    const T* __restrict__ wpe,            // [n_positions, width], rows wpe_stride apart
    T* __restrict__ out,                  // [tokens, width], contiguous
    int64_t ids_stride, int64_t pos_stride, int64_t vocab, int64_t n_positions, int width,
    int64_t wte_stride, int64_t wpe_stride) {
  const int64_t token = blockIdx.x;
  const int64_t id = static_cast<int64_t>(ids[token * ids_stride]);
  const int64_t pos = static_cast<int64_t>(positions[token * pos_stride]);
  const bool valid = id >= 0 && id < vocab && pos >= 0 && pos < n_positions;
  const W* tok_row = wte + (valid ? id : 0) * wte_stride;  // [width]
  const float row_scale = std::is_same_v<W, T> || !valid ? 1.0f : w_scale[id];
  const T* pos_row = wpe + (valid ? pos : 0) * wpe_stride;  // [width]
  T* out_row = out + token * width;                          // [width]
  const float nan = __int_as_float(0x7fc00000);
  for (int j = threadIdx.x; j < width / kVec; j += blockDim.x) {
    float y[kVec];
    if (valid) {
      float p[kVec];
      load_floats<W, kVec>(tok_row + j * kVec, y);
      load_floats<T, kVec>(pos_row + j * kVec, p);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if constexpr (!std::is_same_v<W, T>) y[e] *= row_scale;  // the row dequantized, in fp32
        y[e] += p[e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) y[e] = nan;
    }
    store_floats<T, kVec>(out_row + j * kVec, y);
  }
}

// ---- launchers ---------------------------------------------------------------------------------

template <typename T, typename Index, typename W>
cudaError_t launch_embed_typed(const void* ids, const void* positions, const void* wte,
                               const float* w_scale, const void* wpe, void* out, int64_t tokens,
                               int64_t ids_stride, int64_t pos_stride, int64_t vocab,
                               int64_t n_positions, int width, int64_t wte_stride,
                               int64_t wpe_stride, cudaStream_t stream) {
  const auto* it = static_cast<const Index*>(ids);
  const auto* pt = static_cast<const Index*>(positions);
  const auto* tt = static_cast<const W*>(wte);
  const auto* et = static_cast<const T*>(wpe);
  auto* ot = static_cast<T*>(out);
  const dim3 grid(static_cast<unsigned>(tokens));
  constexpr int kVec = kVecElems<T>;
  if (can_vectorize<T>({wpe, out}, width, {wpe_stride}) && wte_stride % kVec == 0 &&
      is_aligned(wte, kVec * sizeof(W))) {
    const dim3 block(std::min(round_up(width / kVec, kWarpSize), kEmbedMaxThreads));
    LAUNCH(grid, block, 0, stream, embed_kernel<T, Index, kVec, W>)(
        it, pt, tt, w_scale, et, ot, ids_stride, pos_stride, vocab, n_positions, width,
        wte_stride, wpe_stride);
  } else {
    const dim3 block(std::min(round_up(width, kWarpSize), kEmbedMaxThreads));
    LAUNCH(grid, block, 0, stream, embed_kernel<T, Index, 1, W>)(
        it, pt, tt, w_scale, et, ot, ids_stride, pos_stride, vocab, n_positions, width,
        wte_stride, wpe_stride);
  }
  return cudaGetLastError();
}

template <typename Index>
cudaError_t launch_embed(const void* ids, const void* positions, const void* wte,
                         const float* w_scale, const void* wpe, void* out, int64_t tokens,
                         int64_t ids_stride, int64_t pos_stride, int64_t vocab,
                         int64_t n_positions, int width, int64_t wte_stride, int64_t wpe_stride,
                         DType dtype, cudaStream_t stream) {
  return with_weight_types(dtype, w_scale != nullptr, [&](auto zero, auto weight_zero) {
    return launch_embed_typed<decltype(zero), Index, decltype(weight_zero)>(
        ids, positions, wte, w_scale, wpe, out, tokens, ids_stride, pos_stride, vocab, n_positions,
        width, wte_stride, wpe_stride, stream);
  });
}

// out[t] = wte[ids[t]] + wpe[positions[t]] in `dtype` (wpe's and out's), added in fp32; an id or
// position out of range gives a NaN row. With w_scale, wte is int8 and row n stands for wte[n] *
// w_scale[n] (dequantized on lookup).
inline cudaError_t embed(const void* ids, const void* positions, const void* wte,
                         const float* w_scale, const void* wpe, void* out, int64_t tokens,
                         int64_t ids_stride, int64_t pos_stride, int index_bytes, int64_t vocab,
                         int64_t n_positions, int64_t width, int64_t wte_stride,
                         int64_t wpe_stride, DType dtype, cudaStream_t stream) {
  if (tokens < 0 || tokens > 0x7fffffff || width < 0 || width > 0x7fffffff || vocab < 0 ||
      n_positions < 0 || (vocab > 1 && wte_stride < width) ||
      (n_positions > 1 && wpe_stride < width) || (index_bytes != 4 && index_bytes != 8)) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0 || width == 0) return cudaSuccess;
  const int w = static_cast<int>(width);
  if (index_bytes == 8) {
    return launch_embed<int64_t>(ids, positions, wte, w_scale, wpe, out, tokens, ids_stride,
                                 pos_stride, vocab, n_positions, w, wte_stride, wpe_stride, dtype,
                                 stream);
  }
  return launch_embed<int32_t>(ids, positions, wte, w_scale, wpe, out, tokens, ids_stride,
                               pos_stride, vocab, n_positions, w, wte_stride, wpe_stride, dtype,
                               stream);
}

}  // namespace gpt2fast
