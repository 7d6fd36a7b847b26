// The LM head (x @ wte.T, no bias) fused with the token choice: greedy argmax or Gumbel-max with the
// sampler's Philox noise (gpt2fast/sampling.py), so the [M, V] logits are never written. Each tile
// keeps its rows' best (score, id); tiles are merged in id order, so ties go to the lowest id.
#pragma once

#include <cfloat>
#include <limits>

#include "linear.h"

namespace gpt2fast_cpu {

// Word c0 of Philox-4x32-10 at counter (offset, 0, 0, 0), key (seed lo, seed hi): triton's tl.rand.
inline uint32_t philox_c0(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = uint64_t(c0) * 0xD2511F53u, pb = uint64_t(c2) * 0xCD9E8D57u;
    c0 = uint32_t(pb >> 32) ^ c1 ^ k0;
    c2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Gumbel(0, 1) noise of token `offset` for `seed`: -log(-log(max(u, FLT_MIN))), u as Triton makes it.
inline float gumbel_noise(uint64_t seed, uint32_t offset) {
  const int32_t bits = int32_t(philox_c0(seed, offset));
  const float u = float(bits ^ (bits >> 31)) * 4.6566127342e-10f;
  return -std::log(-std::log(std::max(u, FLT_MIN)));
}

struct Best {
  float score;
  int64_t id;
};

// numpy's argmax order: the first NaN wins, else the largest value, ties to the lowest id.
inline bool better(float score, const Best& best) {
  if (std::isnan(best.score)) return false;
  return std::isnan(score) || score > best.score;
}

// A greedy row's tile in two plain loops (max, then its first index) when it holds no NaN; false: it does, and
// the caller's exact loop (numpy's NaN rule) runs instead. Same result as that loop otherwise.
inline bool greedy_tile(const float* row, int64_t n0, int64_t n1, Best& b) {
  float mx = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t n = n0; n < n1; ++n) {
    nan |= row[n] != row[n];
    mx = row[n] > mx ? row[n] : mx;
  }
  if (nan) return false;
  if (b.id < 0 || mx > b.score) {  // b.score NaN: an earlier NaN wins, mx > NaN is false
    int64_t n = n0;
    while (row[n] != mx) ++n;
    b = Best{mx, n};
  }
  return true;
}

// temperature/seeds null: greedy for every row. Rows with temperature < greedy_below are greedy too.
inline void lm_head_pick(const Kernels& kernels, const void* x, int64_t M, int64_t K, int x_dtype, const Weight& wte,
                         int64_t V, const float* temperature, const int64_t* seeds, float greedy_below, int threads,
                         int64_t* ids) {
  const PreparedActivations prepared(kernels, x, M, K, K, x_dtype, nullptr, nullptr, 0.0f, wte.dtype);
  const int64_t tiles_n = (V + kTileN - 1) / kTileN;
  const Best none{-std::numeric_limits<float>::infinity(), -1};
  std::vector<Best> best(size_t(tiles_n * M), none);  // [tile, row]
  for_each_tile(kernels, prepared.get(), wte, V, threads,
                [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, const float* y) {
                  for (int64_t m = m0; m < m1; ++m) {
                    Best& b = best[size_t((n0 / kTileN) * M + m)];
                    const bool sample = temperature && !(temperature[m] < greedy_below);  // NaN: drawn, as the reference does
                    const float* row = y + (m - m0) * kTileN - n0;  // row[n]: logit n
                    if (!sample && greedy_tile(row, n0, n1, b)) continue;
                    for (int64_t n = n0; n < n1; ++n) {
                      float s = y[(m - m0) * kTileN + (n - n0)];
                      if (sample) s = s / temperature[m] + gumbel_noise(uint64_t(seeds[m]), uint32_t(n));
                      if (b.id < 0 || better(s, b)) b = Best{s, n};
                    }
                  }
                });
  for (int64_t m = 0; m < M; ++m) {
    Best b = none;
    for (int64_t t = 0; t < tiles_n; ++t) {
      const Best& c = best[size_t(t * M + m)];
      if (b.id < 0 || better(c.score, b)) b = c;
    }
    ids[m] = b.id;
  }
}

}  // namespace gpt2fast_cpu
