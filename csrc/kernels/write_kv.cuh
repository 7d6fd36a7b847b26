// write_kv.cuh — store each token's key and value into its paged-cache slot, the contract of
// reference.write_kv: cache[slot / BS, h, slot % BS, :] = k[t, h, :] (and v), slot -1 skipped.
//
// One block per token: it reads the token's slot once, and a padding token (slot < 0) returns at
// once (no barrier or shuffle anywhere, so the early return is safe). Its threads stride over the
// token's H * D / kVec vectors, each copying one vector of K and one of V: kVec = 16 bytes of the
// source (8 fp16/bf16, 4 fp32) when every pointer is 16-byte aligned and every stride and D is a
// multiple of kVec, else kVec = 1 (scalar). An fp32 source into an fp16/bf16 cache widens to fp32
// and rounds once at the store (a 16-byte load, an 8-byte store). k/v may be strided views of the
// fused (T, 3, H, D) qkv output: token and head strides are arguments; D is contiguous. Slots are
// not bounds-checked on the device (the wrapper trusts AttentionMetadata, like the Triton kernel).
//
// Napkin math (GPT-2 124M decode, fp16, per layer): K and V read and written, 4 * B * 768 * 2
// bytes, plus 8-byte slots: batch 1 -> 6.2 KB (~2 ns at the H100's 3.35 TB/s: launch-bound);
// batch 64 -> 394 KB -> 0.12 us. Grid (T): 64 blocks of 96 threads at batch 64.
#pragma once

#include "../common.cuh"

namespace gpt2fast {

constexpr int kWriteKvMaxThreads = 256;

template <typename TIn, typename TCache, int kVec>
__global__ void __launch_bounds__(kWriteKvMaxThreads) write_kv_kernel(
    const TIn* __restrict__ k,            // [T, H, D], strides (k_tok, k_head, 1)
    const TIn* __restrict__ v,            // [T, H, D], strides (v_tok, v_head, 1)
    TCache* __restrict__ k_cache,         // [NB, H, BS, D], strides (c_block, c_head, c_slot, 1)
    TCache* __restrict__ v_cache,         // [NB, H, BS, D], same strides as k_cache
    const int64_t* __restrict__ slots,    // [T] block * BS + offset; -1 = padding, skipped
    int n_head, int head_dim, int block_size, int64_t k_tok, int64_t k_head, int64_t v_tok,
    int64_t v_head, int64_t c_block, int64_t c_head, int64_t c_slot) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slots[token];
  if (slot < 0) return;  // the whole block: a padding token writes nothing
  const int64_t block = slot / block_size;
  const int64_t offset = slot % block_size;
  const int vecs_per_head = head_dim / kVec;
  for (int i = threadIdx.x; i < n_head * vecs_per_head; i += blockDim.x) {
    const int h = i / vecs_per_head;
    const int d = (i % vecs_per_head) * kVec;
    const int64_t dst = block * c_block + h * c_head + offset * c_slot + d;
    float kv[kVec];
    load_floats<TIn, kVec>(k + token * k_tok + h * k_head + d, kv);
    store_floats<TCache, kVec>(k_cache + dst, kv);
    load_floats<TIn, kVec>(v + token * v_tok + h * v_head + d, kv);
    store_floats<TCache, kVec>(v_cache + dst, kv);
  }
}

// ---- launchers ---------------------------------------------------------------------------------

template <typename TIn, typename TCache>
cudaError_t launch_write_kv_typed(const void* k, const void* v, void* k_cache, void* v_cache,
                                  const int64_t* slots, int64_t tokens, int n_head, int head_dim,
                                  int block_size, int64_t k_tok, int64_t k_head, int64_t v_tok,
                                  int64_t v_head, int64_t c_block, int64_t c_head, int64_t c_slot,
                                  cudaStream_t stream) {
  const auto* kt = static_cast<const TIn*>(k);
  const auto* vt = static_cast<const TIn*>(v);
  auto* kc = static_cast<TCache*>(k_cache);
  auto* vc = static_cast<TCache*>(v_cache);
  // 16 bytes of the source per vector; the cache side then needs kVec * sizeof(TCache) <= 16
  // bytes of alignment, which the same checks (16-byte pointers, strides in whole vectors) give.
  const bool vectors = can_vectorize<TIn>({k, v, k_cache, v_cache}, head_dim,
                                          {k_tok, k_head, v_tok, v_head, c_block, c_head, c_slot});
  const int vec = vectors ? kVecElems<TIn> : 1;
  const int work = n_head * (head_dim / vec);
  const dim3 grid(static_cast<unsigned>(tokens));
  const int threads = round_up(work, kWarpSize);
  const dim3 block(threads < kWriteKvMaxThreads ? threads : kWriteKvMaxThreads);
  if (vectors) {
    LAUNCH(grid, block, 0, stream, write_kv_kernel<TIn, TCache, kVecElems<TIn>>)(
        kt, vt, kc, vc, slots, n_head, head_dim, block_size, k_tok, k_head, v_tok, v_head, c_block,
        c_head, c_slot);
  } else {
    LAUNCH(grid, block, 0, stream, write_kv_kernel<TIn, TCache, 1>)(
        kt, vt, kc, vc, slots, n_head, head_dim, block_size, k_tok, k_head, v_tok, v_head, c_block,
        c_head, c_slot);
  }
  return cudaGetLastError();
}

// k/v [T, H, D] (dtype `src`) into caches [NB, H, BS, D] (dtype `cache`): the same dtype, or fp32
// into fp16/bf16. Strides in elements; the last dim of every tensor is contiguous.
inline cudaError_t write_kv(const void* k, const void* v, void* k_cache, void* v_cache,
                            const int64_t* slots, int64_t tokens, int n_head, int head_dim,
                            int block_size, int64_t k_tok, int64_t k_head, int64_t v_tok,
                            int64_t v_head, int64_t c_block, int64_t c_head, int64_t c_slot,
                            DType src, DType cache, cudaStream_t stream) {
  if (tokens < 0 || tokens > 0x7fffffff || n_head < 1 || head_dim < 1 || block_size < 1 ||
      static_cast<int64_t>(n_head) * head_dim > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0) return cudaSuccess;
#define GPT2FAST_WRITE_KV(TIn, TCache)                                                            \
  return launch_write_kv_typed<TIn, TCache>(k, v, k_cache, v_cache, slots, tokens, n_head,        \
                                            head_dim, block_size, k_tok, k_head, v_tok, v_head, \
                                            c_block, c_head, c_slot, stream)
  if (src == cache) {
    switch (src) {
      case DType::kFloat32:
        GPT2FAST_WRITE_KV(float, float);
      case DType::kFloat16:
        GPT2FAST_WRITE_KV(__half, __half);
      case DType::kBFloat16:
        GPT2FAST_WRITE_KV(__nv_bfloat16, __nv_bfloat16);
    }
  } else if (src == DType::kFloat32 && cache == DType::kFloat16) {
    GPT2FAST_WRITE_KV(float, __half);
  } else if (src == DType::kFloat32 && cache == DType::kBFloat16) {
    GPT2FAST_WRITE_KV(float, __nv_bfloat16);
  }
#undef GPT2FAST_WRITE_KV
  return cudaErrorInvalidValue;
}

}  // namespace gpt2fast
