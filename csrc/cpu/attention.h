// Paged decode attention that also stores the step's K/V: every sequence has exactly one query (its
// newest token), whose key and value go to its cache slot first; then per (sequence, head) one pass
// of online softmax over the sequence's blocks. Cache layout [NB, H, BS, D] (one block of one head is
// contiguous), fp32 or bf16; math in fp32.
#pragma once

#include <omp.h>

#include <stdexcept>
#include <type_traits>
#include <string>
#include <vector>

#include "common.h"

namespace gpt2fast_cpu {

struct DecodeAttentionArgs {
  int64_t S, H, D, BS;                    // sequences (= query tokens), heads, head dim, block size
  const void* q; int64_t q_tok, q_head;   // [S, H, D] element strides (token, head); dim stride 1
  const void* k; int64_t k_tok, k_head;   // this step's keys, same layout
  const void* v; int64_t v_tok, v_head;   // this step's values
  void* k_cache; void* v_cache;           // [NB, H, BS, D] contiguous
  int dtype;                              // of q, k, v, caches and out
  const int32_t* block_tables; int64_t bt_stride;  // [S, max_blocks]
  const int32_t* seq_lens;                // [S] context length including this token
  const int64_t* slot_mapping;            // [S] block * BS + offset, -1: padding (nothing stored)
  float scale;
  void* out;                              // [S, H, D] contiguous
  int threads;
};

// Every block id, context length and slot the step will touch lies inside the cache and the tables (a row with
// context 0 is padding: nothing read). Throws std::invalid_argument (Python: ValueError) before any access.
inline void check_paged(int64_t S, const int32_t* block_tables, int64_t bt_stride, int64_t bt_width,
                        const int32_t* seq_lens, const int64_t* slot_mapping, int64_t num_blocks, int64_t BS) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("decode attention: " + what); };
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = seq_lens[s], slot = slot_mapping[s];
    if (len < 0 || len > bt_width * BS) fail("sequence " + std::to_string(s) + " has context " + std::to_string(len) +
                                             ", more than its block table holds");
    if (slot < -1 || slot >= num_blocks * BS) fail("slot " + std::to_string(slot) + " is outside the cache");
    for (int64_t j = 0; j < (len + BS - 1) / BS; ++j) {
      const int64_t block = block_tables[s * bt_stride + j];
      if (block < 0 || block >= num_blocks) fail("block id " + std::to_string(block) + " is outside the cache");
    }
  }
}

// One (sequence, head): scores over the context, softmax, weighted sum of V; two passes over the cache rows so
// both inner loops are plain vector loops (T: float or bf16 bits).
template <typename T>
void attend_one(const DecodeAttentionArgs& a, int64_t s, int64_t h, float* q, float* acc, std::vector<float>& scores) {
  const int64_t D = a.D, head_stride = a.BS * D, block_stride = a.H * a.BS * D, len = a.seq_lens[s];
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const T* qs = static_cast<const T*>(a.q) + s * a.q_tok + h * a.q_head;
  for (int64_t d = 0; d < D; ++d) q[d] = widen(qs[d]) * a.scale;
  scores.resize(size_t(len));
  float running_max = -INFINITY;
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t block = a.block_tables[s * a.bt_stride + pos / a.BS];
    const T* k = kc + block * block_stride + h * head_stride + (pos % a.BS) * D;
    float score = 0.0f;
#pragma omp simd reduction(+ : score)
    for (int64_t d = 0; d < D; ++d) score += q[d] * widen(k[d]);
    scores[size_t(pos)] = score;
    running_max = std::max(running_max, score);
  }
  std::fill(acc, acc + D, 0.0f);
  float denom = 0.0f;
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t block = a.block_tables[s * a.bt_stride + pos / a.BS];
    const T* v = vc + block * block_stride + h * head_stride + (pos % a.BS) * D;
    const float p = std::exp(scores[size_t(pos)] - running_max);
    denom += p;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += p * widen(v[d]);
  }
  T* out = static_cast<T*>(a.out) + (s * a.H + h) * D;
  for (int64_t d = 0; d < D; ++d) {  // a NaN score (NaN in q or K) makes the row NaN, as in the reference
    const float y = acc[d] / denom;
    if constexpr (std::is_same_v<T, float>) {
      out[d] = std::isnan(running_max) ? NAN : y;
    } else {
      out[d] = f32_to_bf16(std::isnan(running_max) ? NAN : y);
    }
  }
}

inline void decode_attention(const DecodeAttentionArgs& a) {
  const int64_t D = a.D, head_stride = a.BS * D, block_stride = a.H * a.BS * D;
  for (int64_t s = 0; s < a.S; ++s) {  // store first: the attention below reads the new token from the cache
    const int64_t slot = a.slot_mapping[s];
    if (slot < 0) continue;
    const int64_t base = (slot / a.BS) * block_stride + (slot % a.BS) * D;
    for (int64_t h = 0; h < a.H; ++h)
      for (int64_t d = 0; d < D; ++d) {
        store_from_f32(a.k_cache, base + h * head_stride + d, a.dtype, load_as_f32(a.k, s * a.k_tok + h * a.k_head + d, a.dtype));
        store_from_f32(a.v_cache, base + h * head_stride + d, a.dtype, load_as_f32(a.v, s * a.v_tok + h * a.v_head + d, a.dtype));
      }
  }
  const int64_t work = a.S * a.H;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(a.threads, work)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> q(static_cast<size_t>(D)), acc(static_cast<size_t>(D)), scores;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < work; ++i) {
      if (a.dtype == kF32) {
        attend_one<float>(a, i / a.H, i % a.H, q.data(), acc.data(), scores);
      } else {
        attend_one<uint16_t>(a, i / a.H, i % a.H, q.data(), acc.data(), scores);
      }
    }
  }
}

}  // namespace gpt2fast_cpu
