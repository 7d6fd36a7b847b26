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

// The per-(sequence, head) work is kernels.attend (rows.h, vector loops for the machine's instruction set).
inline void decode_attention(const Kernels& kernels, const DecodeAttentionArgs& a) {
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
    for (int64_t i = 0; i < work; ++i) kernels.attend(a, i / a.H, i % a.H, q.data(), acc.data(), scores);
  }
}

}  // namespace gpt2fast_cpu
