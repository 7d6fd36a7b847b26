// sampling.cuh — top-k / top-p / min-p sampling from fp32 logits without sorting the vocabulary:
// the same token as gpt2fast.sampling.sample_batch for rows without penalties or logprobs.
//
// One block per row (up to 1024 threads, >= 16 tokens each), every pass a strided sweep over the
// row with deterministic block reductions (fixed order, no float atomics: a seeded row draws the
// same token every run). FlashInfer's pivot idea without its rejection loop: each floor is a
// search over the fp32 value's order-preserving uint32 key, testing 8 pivots per sweep (counts or
// masses of the tokens above each pivot), so it is exact after <= 11 sweeps.
//   1. argmax of the raw logits (ties -> lowest id): the greedy answer (T < 1e-5 or top_k == 1)
//      and the row max m = max / T.
//   2. top-k floor: the smallest key t with count(key(logit) >= t) < k is one above the k-th
//      largest raw logit (ties counted); x -> fl(x / T) is monotone, so fl(kth / T) is the k-th
//      largest scaled logit: the reference's floor bit for bit, with no divide in these sweeps.
//   3. top-p floor (over the top-k survivors s >= kfloor): a token v stays iff the softmax mass of
//      the survivors strictly above it is < p — exactly the reference's rule (its sorted prefix,
//      ties with the floor kept). That mass falls as s_v rises, so the kept set is
//      {key(s_v) >= t*}, t* the smallest key with sum_{key(s) > t*} exp(s - m) < p * Z
//      (one sweep for Z, then <= 11).
//   4. min-p floor m + logf(min_p); then one sweep drawing Gumbel noise from Philox-4x32-10 on
//      counter (token id, 0, 0, 0) and key (seed lo, seed hi) — triton.language.rand's stream,
//      bit for bit — and argmax(s + g) over the kept tokens, ties to the lowest id.
// Exactness: temperature, top-k, ties and the draw are bit-exact. The top-p mass is fp32 sums in
// a different order than torch's softmax + cumsum (whose exp differs by device anyway: CPU
// vectorised, CUDA expf), so a row whose nucleus boundary has mass within ~1e-6 of p can keep one
// token more or less than the reference; min-p can differ when a logit lies within 1 ulp of
// m + log(min_p) (logf vs torch.log). Logits must not hold NaN or +inf; top_p in (0, 1].
//
// Napkin math (GPT-2 124M, V = 50257, fp32 logits as the sampler takes them): one call moves
// B * V * 4 bytes of logits plus 32 bytes of settings and id per row from HBM: 0.20 MB at B = 1
// (0.06 us at 3.35 TB/s) and 12.9 MB at B = 64 (3.8 us). A top-k + top-p row takes up to 25
// sweeps (1 + 11 + 1 + 11 + 1; top-k only: 13, greedy: 1), re-reading its 0.2 MB from L1/L2
// (~5 MB per row). A sweep divides and exps only the tokens that can pass its floors (the raw
// logit is compared first: raw_floor), so top-p sweeps after a top-k are load + compare; a
// top-p-only row divides every token in each of its 12 mass sweeps. Bound by one SM's cache
// bandwidth and fp32 issue, not HBM: expect ~10-30 us per row, rows in parallel on up to 132
// SMs, so about the same at B = 1 and B = 64: 3-8x the HBM floor at B = 64 (unmeasured: no GPU).
#pragma once

#include <algorithm>

#include "../common.cuh"

namespace gpt2fast {

// sampling.GREEDY_BELOW: below this temperature a row is greedy (logits / T would overflow). A double,
// compared with the fp32 temperature widened, as Python compares the fp32 value it reads back.
constexpr double kGreedyBelow = 1e-5;
constexpr int kSamplingMinTokensPerThread = 16;

// ---- Philox-4x32-10, as triton.language.random (and gpt2fast.sampling.philox_uniform) ---------
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUintToUniform = 4.6566127342e-10f;  // largest x with (2**31 - 1) * x < 1 in fp32
constexpr float kFloatMin = 1.17549435e-38f;          // FLT_MIN

// Word c0 of Philox-4x32-10 on counter (offset, 0, 0, 0) and key (seed lo, seed hi).
__device__ __forceinline__ uint32_t philox_first_word(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_a = static_cast<uint64_t>(c0) * kPhiloxRoundA;
    const uint64_t prod_b = static_cast<uint64_t>(c2) * kPhiloxRoundB;
    c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// Triton's uint_to_uniform_float: the int32 view, ~x where negative, times the scale: [0, 1).
__device__ __forceinline__ float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x ^= x >> 31;
  return static_cast<float>(x) * kUintToUniform;
}

// -log(-log(max(u, FLT_MIN))): finite for every u Philox gives, like sampling.gumbel_from_uniform.
__device__ __forceinline__ float gumbel_noise(uint64_t seed, int token) {
  const float u = fmaxf(uint_to_uniform(philox_first_word(seed, static_cast<uint32_t>(token))),
                        kFloatMin);
  return -logf(-logf(u));
}

// ---- order-preserving keys: a < b (as floats, -0 == +0, no NaN) iff key(a) < key(b) ------------
__device__ __forceinline__ uint32_t ordered_key(float f) {
  uint32_t bits = __float_as_uint(f);
  if (bits == 0x80000000u) bits = 0u;  // -0 ties with +0, as in the reference
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

constexpr uint32_t kMinusInfKey = 0x007fffffu;  // ordered_key(-inf)
constexpr uint32_t kPlusInfKey = 0xff800000u;   // ordered_key(+inf)

// The smallest raw logit r with fl(r / t) >= floor (t > 0; -inf when floor is -inf). Division by
// t > 0 is monotone, so x >= r <=> fl(x / t) >= floor: a sweep tests the scaled floor with a
// compare and divides only the tokens that pass. 32 scalar steps, the same in every thread.
__device__ __forceinline__ float raw_floor(float floor, float t) {
  uint32_t lo = kMinusInfKey, hi = kPlusInfKey;  // +inf / t = +inf >= any floor
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (key_to_float(mid) / t >= floor) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return key_to_float(lo);
}

// ---- block reductions (every thread calls; every thread gets the same answer) -------------------

struct ArgMax {
  float value;
  int index;
};

// b wins over a when larger, or equal with a lower index (ties -> lowest id, like torch.argmax).
__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const ArgMax other{__shfl_xor_sync(kFullMask, a.value, offset),
                       __shfl_xor_sync(kFullMask, a.index, offset)};
    a = better(a, other);
  }
  return a;
}

__device__ __forceinline__ ArgMax block_argmax(ArgMax a) {
  __shared__ float values[kWarpSize];
  __shared__ int indices[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  a = warp_argmax(a);
  if (lane == 0) {
    values[warp] = a.value;
    indices[warp] = a.index;
  }
  __syncthreads();
  a = lane < num_warps ? ArgMax{values[lane], indices[lane]} : ArgMax{-INFINITY, 0x7fffffff};
  a = warp_argmax(a);
  __syncthreads();
  return a;
}

// Sums each of N values over the block, in one fixed order (so every thread gets the same sums, and
// a sum over a subset of nonnegative terms is never larger than over a superset).
template <typename T, int N>
__device__ __forceinline__ void block_sum_each(T (&v)[N]) {
  __shared__ T partials[N][kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
      v[j] += __shfl_xor_sync(kFullMask, v[j], offset);
    if (lane == 0) partials[j][warp] = v[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) {
    v[j] = lane < num_warps ? partials[j][lane] : T(0);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
      v[j] += __shfl_xor_sync(kFullMask, v[j], offset);
  }
  __syncthreads();
}

// ---- the search: several pivots per sweep ----------------------------------------------------

// Pivots tested per sweep: each sweep cuts the key interval ~9-fold, so a 32-bit search takes <= 11
// sweeps instead of 32 bisection steps (the pivots share each token's load, divide and exp).
constexpr int kPivots = 8;

// The smallest key t in [lo, hi] with q(t), where q is monotone (false ... false true ... true) and
// q(hi) holds. sweep(pivots, q) evaluates q at kPivots keys in one pass over the row; it must give
// the same answer in every thread (block reductions do), so the loop is block-uniform.
template <typename Sweep>
__device__ uint32_t smallest_true(uint32_t lo, uint32_t hi, Sweep sweep) {
  while (lo < hi) {
    uint32_t pivots[kPivots];  // lo <= pivots[0] <= ... <= pivots[kPivots - 1] < hi
    bool q[kPivots];
#pragma unroll
    for (int j = 0; j < kPivots; ++j)
      pivots[j] = lo + static_cast<uint32_t>(uint64_t{hi - lo} * (j + 1) / (kPivots + 1));
    sweep(pivots, q);
    uint32_t new_lo = lo, new_hi = hi;
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      if (q[j] && pivots[j] < new_hi) new_hi = pivots[j];
      if (!q[j] && pivots[j] + 1 > new_lo) new_lo = pivots[j] + 1;
    }
    lo = new_lo, hi = new_hi;
  }
  return lo;
}

// ---- the passes over one row -------------------------------------------------------------------

__device__ ArgMax row_argmax(const float* __restrict__ x, int vocab) {
  ArgMax best{-INFINITY, 0x7fffffff};
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) best = better(best, ArgMax{x[v], v});
  return block_argmax(best);
}

// The k-th largest value of the row, ties counted (1 < k < vocab): with q(t) = count(key >= t) < k,
// the smallest such t is one above the k-th largest key (q holds at max_key + 1: nothing is above).
__device__ float kth_largest(const float* __restrict__ x, int vocab, int k, uint32_t max_key) {
  const auto sweep = [&](const uint32_t (&pivots)[kPivots], bool (&q)[kPivots]) {
    int count[kPivots] = {};
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
      const uint32_t key = ordered_key(x[v]);
#pragma unroll
      for (int j = 0; j < kPivots; ++j) count[j] += key >= pivots[j];
    }
    block_sum_each(count);
#pragma unroll
    for (int j = 0; j < kPivots; ++j) q[j] = count[j] < k;
  };
  return key_to_float(smallest_true(0u, max_key + 1, sweep) - 1);
}

// Sum of exp(s - m) over the survivors (x >= kfloor_raw, i.e. s >= kfloor) with key(s) > above[j],
// for each j; s = x / t.
template <int N>
__device__ void mass_above(const float* __restrict__ x, int vocab, float t, float kfloor_raw,
                           float m, const uint32_t (&above)[N], float (&mass)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) mass[j] = 0.0f;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float xv = x[v];
    if (!(xv >= kfloor_raw)) continue;  // below the top-k floor: no divide
    const float s = xv / t;
    const uint32_t key = ordered_key(s);
    if (key <= above[0]) continue;  // above[0] is the smallest
    const float e = expf(s - m);
#pragma unroll
    for (int j = 0; j < N; ++j) mass[j] += key > above[j] ? e : 0.0f;
  }
  block_sum_each(mass);
}

// The top-p floor: survivors with key(s) >= t* are the nucleus, t* the smallest key with mass
// above it < p * Z (true at key(m): nothing is above the max), searched in [key(kfloor), key(m)]
// (below key(kfloor) every survivor is kept anyway); returned as the value of t* (s >= it <=>
// key(s) >= t*: keys of real values only, -0 == +0).
__device__ float nucleus_floor(const float* __restrict__ x, int vocab, float t, float kfloor,
                               float m, float p) {
  const float kfloor_raw = raw_floor(kfloor, t);
  const uint32_t below_all[1] = {0u};  // key 0 is below -inf: Z
  float z[1];
  mass_above(x, vocab, t, kfloor_raw, m, below_all, z);
  const float bound = p * z[0];
  const auto sweep = [&](const uint32_t (&pivots)[kPivots], bool (&q)[kPivots]) {
    float mass[kPivots];
    mass_above(x, vocab, t, kfloor_raw, m, pivots, mass);
#pragma unroll
    for (int j = 0; j < kPivots; ++j) q[j] = mass[j] < bound;
  };
  return key_to_float(smallest_true(ordered_key(kfloor), ordered_key(m), sweep));
}

// argmax(s + g) over the kept tokens (x >= floor_raw); the others score -inf (and tie at the
// lowest id if all do). Only kept tokens are divided and get noise.
__device__ ArgMax gumbel_argmax(const float* __restrict__ x, int vocab, float t, float floor_raw,
                                uint64_t seed) {
  ArgMax best{-INFINITY, 0x7fffffff};
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float xv = x[v];
    best = better(best, ArgMax{xv >= floor_raw ? xv / t + gumbel_noise(seed, v) : -INFINITY, v});
  }
  return block_argmax(best);
}

__global__ void __launch_bounds__(1024) sample_top_k_top_p_kernel(
    const float* __restrict__ logits,       // [rows, vocab], contiguous
    const float* __restrict__ temperature,  // [rows]; < kGreedyBelow: argmax; nullptr: every row's
    const int32_t* __restrict__ top_k,      // [rows]; <= 0 or >= vocab: off; 1: argmax; nullptr: off
    const float* __restrict__ top_p,        // [rows]; in (0, 1], 1: off; nullptr: off
    const float* __restrict__ min_p,        // [rows]; <= 0: off; nullptr: off for every row
    const int64_t* __restrict__ seeds,      // [rows]; sampling.row_seed, in [0, 2**63)
    int64_t* __restrict__ out,              // [rows]: token ids
    int vocab) {
  const int64_t row = blockIdx.x;
  const float* x = logits + row * vocab;  // [vocab]
  const ArgMax top = row_argmax(x, vocab);
  const float t = temperature != nullptr ? temperature[row] : 0.0f;
  const int k = top_k != nullptr ? top_k[row] : 0;
  if (static_cast<double>(t) < kGreedyBelow || k == 1) {  // block-uniform
    if (threadIdx.x == 0) out[row] = top.index;
    return;
  }
  const float m = top.value / t;  // the scaled max: fl(x / t) is monotone in x
  float floor = -INFINITY;        // a token stays when its scaled logit is >= every floor
  if (k > 1 && k < vocab) floor = kth_largest(x, vocab, k, ordered_key(top.value)) / t;
  const float p = top_p != nullptr ? top_p[row] : 1.0f;
  if (p < 1.0f && m > -INFINITY) floor = fmaxf(floor, nucleus_floor(x, vocab, t, floor, m, p));
  const float mp = min_p != nullptr ? min_p[row] : 0.0f;
  if (mp > 0.0f) floor = fmaxf(floor, m + logf(mp));
  const uint64_t seed = static_cast<uint64_t>(seeds[row]);
  const ArgMax drawn = gumbel_argmax(x, vocab, t, raw_floor(floor, t), seed);
  if (threadIdx.x == 0) out[row] = drawn.index;
}

// ---- launcher ----------------------------------------------------------------------------------

// out[r] = the token sample_batch picks for row r (see the kernel's arguments for the settings).
// Threads per row: one per kSamplingMinTokensPerThread tokens, whole warps, 32..1024.
inline cudaError_t sample_top_k_top_p(const float* logits, const float* temperature,
                                      const int32_t* top_k, const float* top_p, const float* min_p,
                                      const int64_t* seeds, int64_t* out, int64_t rows, int vocab,
                                      cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || vocab < 1) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int64_t per_thread = kSamplingMinTokensPerThread;
  const int warps = static_cast<int>(std::clamp<int64_t>(
      (vocab + per_thread * kWarpSize - 1) / (per_thread * kWarpSize), 1, 1024 / kWarpSize));
  const int threads = warps * kWarpSize;
  LAUNCH(dim3(static_cast<unsigned>(rows)), dim3(threads), 0, stream, sample_top_k_top_p_kernel)(
      logits, temperature, top_k, top_p, min_p, seeds, out, vocab);
  return cudaGetLastError();
}

}  // namespace gpt2fast
