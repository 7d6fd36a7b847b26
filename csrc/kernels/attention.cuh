// attention.cuh — paged decode attention (flash-decoding: split-K over the block table, merged in
// the same launch), the contract of reference.attention for decode steps (every sequence has at
// most one query), and of reference.write_kv_attention when given the step's K and V: one launch.
//
// Split kernel, grid (num_seqs, H, num_splits), 128 threads = 4 warps. Split s of sequence b
// covers context positions [s * split_len, min((s + 1) * split_len, seq_lens[b])), split_len =
// pages_per_split * BS (the split rule is decode_splits() in gpt2fast/ops/triton/attention.py:
// shapes only, so a CUDA graph replays at any length). A warp is kKeysPerWarp groups of
// kLanesPerKey lanes: a group owns one key at a time, each lane 16 bytes of its K and V rows
// (D = 64: 8 lanes x 8 fp16/bf16, 16 lanes x 4 fp32), so a warp reads 4 (2) whole 128-byte rows
// per load and every load is one coalesced 16-byte vector. The score is the lane's kVec-element dot
// with q (pre-scaled by scale * log2 e: exp2 domain) summed over the group by xor shuffles; every
// lane keeps the online-softmax state (max m, sum l, acc for its d-slice) of its group's keys, in
// fp32, kUnroll = 2 keys per loop step so that 4 16-byte loads are in flight per lane. After
// the loop the groups merge by xor shuffles, the warps through shared memory, and the split has
// one (m, l, acc[D]). With one split the kernel stores acc / l (no workspace); otherwise it writes
// (m, l, acc) to the fp32 workspace and draws a ticket on its (sequence, head) counter: the split
// that draws the last one rescales and sums all the splits' states and stores the output (the
// ticket-counter pattern of gpt2fast/ops/triton/counters.py; the memory-ordering argument is beside
// the code). A split past the context writes the neutral (-inf, 0, 0); a sequence with no query
// this step reads nothing and its output row is never written. No thread returns before a
// barrier (loop bounds are warp-uniform; the stores are predicated; the last-split branch is
// block-uniform).
//
// With the step's K and V (k_new/v_new, write_kv_attention): the split holding the sequence's
// newest position, seq_lens[b] - 1, stores that key and value into the cache slot slots[row]
// (D threads, one element each) and takes that position from k_new/v_new after its loop over the
// others, not from the cache: no block reads the slot this launch writes, so the caches stay
// read-only (`__restrict__`), and the write costs no barrier and no second launch. A row whose slot is < 0 stores
// nothing and reads that position from the cache, as write_kv then attention would.
//
// Napkin math (GPT-2 124M decode: 12 heads x 64, fp16, 64-page tables at block 16; one layer):
// K and V of every context token, 2 * B * L * 12 * 64 * 2 bytes, + q and out + tables + the fp32
// partials (B * 12 * splits * 66 * 4 written and read back, L2-resident) when splits > 1.
//   batch 1,  L = 1024: 22 splits x 3 pages: 3.15 MB KV + 0.14 MB partials -> 0.98 us at 3.35 TB/s
//                       (264 blocks, 2 per SM; launch latency, not bytes, dominates at this size)
//   batch 64, L = 1024: 1 split: 201.3 MB -> 60.1 us (768 blocks, no merge launch)
//   batch 64, L = 128:  1 split: 25.2 MB -> 7.5 us
#pragma once

#include <cmath>
#include <type_traits>

#include "../common.cuh"

namespace gpt2fast {

constexpr int kAttentionHeadDim = 64;  // every GPT-2 size; the kernels are templated on it
constexpr int kAttentionWarps = 4;
constexpr int kAttentionThreads = kAttentionWarps * kWarpSize;
constexpr int kAttentionUnroll = 2;  // keys per group per loop step: 4 16-byte loads in flight
// Blocks per SM the split kernel is compiled for: <= 64 registers (measured: 61..64, no spills on
// sm_80/sm_90), so 32 warps per SM and a batch-64 GPT-2 grid (768 blocks) in one wave on 132 SMs.
constexpr int kAttentionMinBlocks = 8;
constexpr float kLog2e = 1.4426950408889634f;

// Online-softmax state (m, l, acc) absorbs another (m2, l2, acc2); an empty state has m = -inf
// and weighs 0 (never exp2(-inf - -inf) = NaN).
template <int N>
__device__ __forceinline__ void merge_softmax_state(float& m, float& l, float (&acc)[N], float m2,
                                                    float l2, const float (&acc2)[N]) {
  const float m_new = fmaxf(m, m2);
  const float a = m == -INFINITY ? 0.0f : exp2f(m - m_new);
  const float b = m2 == -INFINITY ? 0.0f : exp2f(m2 - m_new);
  l = l * a + l2 * b;
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = acc[i] * a + acc2[i] * b;
  m = m_new;
}

template <typename T, int kHeadDim, int kBlockSize>  // kBlockSize 0: the runtime block_size
__global__ void __launch_bounds__(kAttentionThreads, kAttentionMinBlocks)
    attention_decode_kernel(
    const T* __restrict__ q,                // [T, H, D], strides (q_tok, q_head, 1)
    const T* __restrict__ k_cache,          // [NB, H, BS, D] contiguous, 16-byte aligned; never
    const T* __restrict__ v_cache,          //   read at a slot this launch stores (see above)
    T* k_cache_out,                         // the same caches: the stores of k_new/v_new
    T* v_cache_out,
    const T* __restrict__ k_new,            // [T, H, D], strides (kv_tok, kv_head, 1), or nullptr
    const T* __restrict__ v_new,            // [T, H, D], same strides, or nullptr
    const int64_t* __restrict__ slots,      // [T] cache slot of each row's K/V (with k_new)
    const int* __restrict__ cu_seqlens,     // [B + 1] query rows of sequence b: [cu[b], cu[b+1])
    const int* __restrict__ seq_lens,       // [B] context length including this step's query
    const int* __restrict__ block_tables,   // [B, max_blocks] page ids, -1 padded
    float* __restrict__ part_ml,            // [B, H, num_splits, 2] (max, sum); unused at 1 split
    float* __restrict__ part_acc,           // [B, H, num_splits, D]; unused at 1 split
    int* __restrict__ counters,             // [B, H] tickets, 0 on entry and left 0; unused at 1
    T* __restrict__ out,                    // [T, H, D] contiguous
    int block_size_arg, int max_blocks, int split_len, int64_t q_tok, int64_t q_head,
    int64_t kv_tok, int64_t kv_head, float scale_log2) {
  constexpr int kVec = kVecElems<T>;
  constexpr int kLanesPerKey = kHeadDim / kVec;
  constexpr int kKeysPerWarp = kWarpSize / kLanesPerKey;
  constexpr int kKeysPerStep = kAttentionWarps * kKeysPerWarp * kAttentionUnroll;
  static_assert(kHeadDim % kVec == 0 && kWarpSize % kLanesPerKey == 0, "a K row spans whole lanes");
  static_assert(kHeadDim <= kAttentionThreads, "one thread per output element in the epilogue");
  const int block_size = kBlockSize > 0 ? kBlockSize : block_size_arg;
  const int seq = blockIdx.x, head = blockIdx.y, split = blockIdx.z;
  const int n_head = gridDim.y, num_splits = gridDim.z;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int group = lane / kLanesPerKey;     // which of the warp's keys this lane reads
  const int d0 = (lane % kLanesPerKey) * kVec;  // this lane's slice [d0, d0 + kVec) of D

  const int q_row = cu_seqlens[seq];
  const bool has_query = cu_seqlens[seq + 1] > q_row;
  const int split_start = split * split_len;
  const int context_end = has_query ? seq_lens[seq] : 0;  // no query: read nothing
  const int split_end =
      split_start + split_len < context_end ? split_start + split_len : context_end;

  float qs[kVec];  // q slice in the exp2 domain; q may be a strided view: scalar loads, once
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    qs[i] = has_query ? to_float(q[q_row * q_tok + head * q_head + d0 + i]) * scale_log2 : 0.0f;
  }
  const int* table = block_tables + static_cast<int64_t>(seq) * max_blocks;  // [max_blocks]
  const int64_t page_stride = static_cast<int64_t>(n_head) * block_size * kHeadDim;
  const int64_t head_offset = static_cast<int64_t>(head) * block_size * kHeadDim + d0;

  // This step's key and value: position new_pos reads them from k_new/v_new (-1: not this split).
  // A row with slot -1 stores nothing, so its position reads the cache as it is (as the reference).
  const int64_t slot = k_new != nullptr && has_query ? slots[q_row] : -1;
  const bool has_new = slot >= 0 && split_start <= context_end - 1 &&
                       context_end - 1 < split_start + split_len;
  const int new_pos = context_end - 1;  // taken after the loop (has_new), which stops before it
  const int loop_end = has_new ? new_pos : split_end;
  const int64_t new_row =
      static_cast<int64_t>(q_row) * kv_tok + static_cast<int64_t>(head) * kv_head;
  if (has_new && threadIdx.x < kHeadDim) {  // store them in the cache, for the steps after this one
    const int64_t dst = slot / block_size * page_stride +
                        static_cast<int64_t>(head) * block_size * kHeadDim +
                        slot % block_size * kHeadDim + threadIdx.x;
    k_cache_out[dst] = k_new[new_row + threadIdx.x];
    v_cache_out[dst] = v_new[new_row + threadIdx.x];
  }

  float m = -INFINITY, l = 0.0f, acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;
  // `base` is the same on every lane of a warp: the shuffles inside see whole warps.
  for (int base = split_start + warp * kKeysPerWarp; base < loop_end; base += kKeysPerStep) {
    float kf[kAttentionUnroll][kVec], vf[kAttentionUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kAttentionUnroll; ++u) {  // issue every load before any math
      const int pos = base + u * kAttentionWarps * kKeysPerWarp + group;
      if (pos < loop_end) {
        const int64_t off = table[pos / block_size] * page_stride + head_offset +
                            static_cast<int64_t>(pos % block_size) * kHeadDim;
        load_floats<T, kVec>(k_cache + off, kf[u]);
        load_floats<T, kVec>(v_cache + off, vf[u]);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) kf[u][i] = vf[u][i] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kAttentionUnroll; ++u) {
      const int pos = base + u * kAttentionWarps * kKeysPerWarp + group;
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < kVec; ++i) s += qs[i] * kf[u][i];
#pragma unroll
      for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) {
        s += __shfl_xor_sync(kFullMask, s, offset);
      }
      if (pos < loop_end) {
        const float m_new = fmaxf(m, s);
        const float alpha = exp2f(m - m_new);  // m = -inf on the first key: 0
        const float p = exp2f(s - m_new);
        l = l * alpha + p;
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] = acc[i] * alpha + p * vf[u][i];
        m = m_new;
      }
    }
  }

  // The newest position, from k_new/v_new: warp 0 computes its score (every group alike, so the
  // shuffles see the whole warp) and its group 0 takes it into its state. Outside the loop, so the
  // loop carries no extra register or branch.
  if (has_new && warp == 0) {
    float kf[kVec], vf[kVec];
    load_floats<T, kVec>(k_new + new_row + d0, kf);
    load_floats<T, kVec>(v_new + new_row + d0, vf);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) s += qs[i] * kf[i];
#pragma unroll
    for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) {
      s += __shfl_xor_sync(kFullMask, s, offset);
    }
    if (group == 0) {
      const float m_new = fmaxf(m, s);
      const float alpha = exp2f(m - m_new);
      const float p = exp2f(s - m_new);
      l = l * alpha + p;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = acc[i] * alpha + p * vf[i];
      m = m_new;
    }
  }

  // Groups of a warp -> one state (every lane of a d-slice ends with the same values).
#pragma unroll
  for (int offset = kLanesPerKey; offset < kWarpSize; offset *= 2) {
    const float m2 = __shfl_xor_sync(kFullMask, m, offset);
    const float l2 = __shfl_xor_sync(kFullMask, l, offset);
    float acc2[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc2[i] = __shfl_xor_sync(kFullMask, acc[i], offset);
    merge_softmax_state(m, l, acc, m2, l2, acc2);
  }
  // Warps -> the split's state, through shared memory.
  __shared__ float warp_ml[kAttentionWarps][2];
  __shared__ float warp_acc[kAttentionWarps][kHeadDim];
  if (group == 0) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) warp_acc[warp][d0 + i] = acc[i];
    if (lane == 0) {
      warp_ml[warp][0] = m;
      warp_ml[warp][1] = l;
    }
  }
  __syncthreads();
  if (threadIdx.x < kHeadDim) {
    const int d = threadIdx.x;
    float sm = -INFINITY, sl = 0.0f, sacc[1] = {0.0f};
#pragma unroll
    for (int w = 0; w < kAttentionWarps; ++w) {
      const float wacc[1] = {warp_acc[w][d]};
      merge_softmax_state(sm, sl, sacc, warp_ml[w][0], warp_ml[w][1], wacc);
    }
    if (num_splits == 1) {
      // a sequence with a query has at least one key (position 0) in its only split: sl > 0
      if (has_query) {
        const int64_t row = static_cast<int64_t>(q_row) * n_head + head;
        out[row * kHeadDim + d] = from_float<T>(sacc[0] / sl);
      }
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * n_head + head) * num_splits + split;
      part_acc[part * kHeadDim + d] = sacc[0];
      if (d == 0) {
        part_ml[part * 2] = sm;
        part_ml[part * 2 + 1] = sl;
      }
    }
  }
  if (num_splits == 1) return;  // block-uniform, and no barrier follows on this path

  // The last split of (seq, head) to finish merges them all. Memory ordering (the emulator runs
  // blocks one after another, so no test can check this): the threads that stored a partial fence
  // (__threadfence: fence.sc at gpu scope) before the barrier, so those stores are ordered before
  // thread 0's ticket, an atomicAdd at gpu scope; the counter's chain of read-modify-writes
  // carries every earlier split's fence to the split that draws the last ticket, whose thread 0
  // fences again after its atomic (the acquire side). Its barrier then orders the other threads'
  // loads after that fence, and they load through L2 (__ldcg, ld.global.cg): the SM's L1 is not
  // coherent, and a line of this workspace cached there by an earlier block or launch must not be
  // read instead. No block waits for another, so any grid size runs, and the last split resets the
  // counter to 0 for the next launch (or graph replay), which the stream's kernel order publishes.
  __threadfence();
  __syncthreads();
  __shared__ int is_last;
  const int64_t tile = static_cast<int64_t>(seq) * n_head + head;
  if (threadIdx.x == 0) {
    is_last = atomicAdd(counters + tile, 1) == num_splits - 1;
    __threadfence();
  }
  __syncthreads();
  if (!is_last) return;
  if (threadIdx.x == 0) counters[tile] = 0;  // every ticket of the tile is drawn
  if (threadIdx.x >= kHeadDim || !has_query) return;  // no query this step: no output row
  const int d = threadIdx.x;
  const int64_t first = tile * num_splits;
  float max_all = -INFINITY;
  for (int s = 0; s < num_splits; ++s) max_all = fmaxf(max_all, __ldcg(part_ml + (first + s) * 2));
  // split 0 holds position 0, so max_all is finite; splits past the context weigh exp2(-inf) = 0
  float sum = 0.0f, total = 0.0f;
  for (int s = 0; s < num_splits; ++s) {  // fixed order: the same bits whichever split is last
    const float w = exp2f(__ldcg(part_ml + (first + s) * 2) - max_all);
    sum += w * __ldcg(part_ml + (first + s) * 2 + 1);
    total += w * __ldcg(part_acc + (first + s) * kHeadDim + d);
  }
  out[(static_cast<int64_t>(q_row) * n_head + head) * kHeadDim + d] = from_float<T>(total / sum);
}

// ---- launchers ---------------------------------------------------------------------------------

// One launch's operands (attention_decode's, below), untyped.
struct AttentionDecodeArgs {
  const void* q;
  void* k_cache;
  void* v_cache;
  const void* k_new;  // nullptr: attention only
  const void* v_new;
  const int64_t* slots;
  const int* cu_seqlens;
  const int* seq_lens;
  const int* block_tables;
  float* part_ml;
  float* part_acc;
  int* counters;
  void* out;
  int num_seqs, n_head, head_dim, block_size, max_blocks, num_splits, pages_per_split;
  int64_t q_tok, q_head, kv_tok, kv_head;
  float scale;
};

template <typename T, int kBlockSize>
cudaError_t launch_attention_decode_typed(const AttentionDecodeArgs& a, cudaStream_t stream) {
  constexpr int D = kAttentionHeadDim;
  const dim3 grid(a.num_seqs, a.n_head, a.num_splits), block(kAttentionThreads);
  LAUNCH(grid, block, 0, stream, attention_decode_kernel<T, D, kBlockSize>)(
      static_cast<const T*>(a.q), static_cast<const T*>(a.k_cache),
      static_cast<const T*>(a.v_cache), static_cast<T*>(a.k_cache), static_cast<T*>(a.v_cache),
      static_cast<const T*>(a.k_new), static_cast<const T*>(a.v_new), a.slots, a.cu_seqlens,
      a.seq_lens, a.block_tables, a.part_ml, a.part_acc, a.counters, static_cast<T*>(a.out),
      a.block_size, a.max_blocks, a.pages_per_split * a.block_size, a.q_tok, a.q_head, a.kv_tok,
      a.kv_head, a.scale * kLog2e);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_attention_decode_bs(const AttentionDecodeArgs& a, cudaStream_t stream) {
  // Block sizes 16 and 32 get constant page arithmetic (shifts); other sizes divide at run time.
  if (a.block_size == 16) return launch_attention_decode_typed<T, 16>(a, stream);
  if (a.block_size == 32) return launch_attention_decode_typed<T, 32>(a, stream);
  return launch_attention_decode_typed<T, 0>(a, stream);
}

// Decode attention: out[cu[b]] = softmax(q K^T * scale) V over sequence b's first seq_lens[b]
// cache positions, for every b with a query (cu[b+1] - cu[b] == 1; 0 = skipped, row not written).
// Caches [NB, H, BS, D] contiguous and 16-byte aligned; out [T, H, D] contiguous; q rows strided.
// Workspaces part_ml [B, H, num_splits, 2], part_acc [B, H, num_splits, D] fp32 and counters
// [B, H] int32, zero and left zero (all unused at 1 split). With k_new/v_new ([T, H, D],
// strides (kv_tok, kv_head, 1), 16-byte aligned rows) and slots: write_kv_attention, the row's
// K/V stored at its slot (-1: not stored) and used for position seq_lens[b] - 1.
inline cudaError_t attention_decode(const AttentionDecodeArgs& a, DType dtype,
                                    cudaStream_t stream) {
  const int vec = dtype == DType::kFloat32 ? 4 : 8;  // elements per 16-byte vector
  if (a.head_dim != kAttentionHeadDim || a.num_seqs < 0 || a.n_head < 1 || a.n_head > 65535 ||
      a.block_size < 1 || a.max_blocks < 0 || a.num_splits < 1 || a.num_splits > 65535 ||
      a.pages_per_split < 1 ||
      static_cast<int64_t>(a.num_splits) * a.pages_per_split < a.max_blocks ||
      static_cast<int64_t>(a.pages_per_split) * a.block_size > 0x7fffffff ||
      !is_aligned(a.k_cache, kVecBytes) || !is_aligned(a.v_cache, kVecBytes) ||
      !is_aligned(a.out, kVecBytes) || (a.num_splits > 1 && a.counters == nullptr) ||
      (a.k_new == nullptr) != (a.v_new == nullptr) ||
      (a.k_new != nullptr &&
       (a.slots == nullptr || !is_aligned(a.k_new, kVecBytes) || !is_aligned(a.v_new, kVecBytes) ||
        a.kv_tok % vec != 0 || a.kv_head % vec != 0))) {
    return cudaErrorInvalidValue;
  }
  if (a.num_seqs == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_attention_decode_bs<float>(a, stream);
    case DType::kFloat16:
      return launch_attention_decode_bs<__half>(a, stream);
    case DType::kBFloat16:
      return launch_attention_decode_bs<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpt2fast
