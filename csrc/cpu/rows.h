// Row kernels of the decode path, compiled per instruction set like dot.h (each isa_*.cpp includes this
// file after dot.h, in the same namespace, so they share LANES, vfloat and the loads): the LayerNorm
// prologue, the per-row int8 quantization of activations, the bias/GELU epilogue and one (sequence, head)
// of decode attention. Compiled once for the baseline, these ran as scalar SSE2 with a libm expf per
// element: a third of an int8 batch-8 decode step (perf, this machine). Here they are vector loops with
// a vector exp.
#pragma once

typedef int32_t vi32 __attribute__((vector_size(LANES * 4)));

// e**x to ~1 ulp for finite x (Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6 Taylor polynomial:
// truncation error r**7/7! < 1.3e-7 relative); below -87.3 it is 0, above 88 it saturates at e**88,
// NaN stays NaN.
static inline vfloat vexp(vfloat x) {
  const vfloat hi = vfloat{} + 88.0f, lo = vfloat{} + -87.3f;  // n stays in [-126, 127]
  const vfloat c = x > hi ? hi : (x < lo ? lo : x);                    // NaN passes through both
  const vfloat n = (c * 1.44269504f + 12582912.0f) - 12582912.0f;     // round(c / ln 2): |c / ln 2| < 2**22
  const vfloat r = (c - n * 0.693145752f) - n * 1.42860677e-6f;       // ln 2 = 0.693145752 + 1.42860677e-6
  vfloat p = vfloat{} + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi32 bits = (__builtin_convertvector(n, vi32) + 127) << 23;  // 2**n
  const vfloat y = p * (vfloat)bits;
  return x < lo ? vfloat{} : (x != x ? x : y);
}

static inline float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < LANES; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// out = LayerNorm(x) over K (fp32 in and out; may alias): two-pass statistics, fp32 vector sums.
static void layer_norm_row(const float* x, int64_t K, const float* w, const float* b, float eps, float* out) {
  vfloat s0 = {}, s1 = {};
  int64_t k = 0;
  for (; k + 2 * LANES <= K; k += 2 * LANES) {
    s0 += load_f32(x + k);
    s1 += load_f32(x + k + LANES);
  }
  for (; k + LANES <= K; k += LANES) s0 += load_f32(x + k);
  float sum = hsum(s0 + s1);
  for (; k < K; ++k) sum += x[k];
  const float mean = sum / float(K);
  vfloat q0 = {};
  k = 0;
  for (; k + LANES <= K; k += LANES) {
    const vfloat d = load_f32(x + k) - mean;
    q0 += d * d;
  }
  float sq = hsum(q0);
  for (; k < K; ++k) sq += (x[k] - mean) * (x[k] - mean);
  const float rstd = 1.0f / std::sqrt(sq / float(K) + eps);
  k = 0;
  for (; k + LANES <= K; k += LANES) {
    const vfloat y = (load_f32(x + k) - mean) * rstd * load_f32(w + k) + load_f32(b + k);
    std::memcpy(out + k, &y, sizeof y);
  }
  for (; k < K; ++k) out[k] = (x[k] - mean) * rstd * w[k] + b[k];
}

// Symmetric per-row int8 of K fp32 values (round half to even) into q[0, K), its scale and the sum of the
// int8 values (vpdpbusd's correction). A row with a NaN or infinity: q all 0, scale NaN (the outputs become
// NaN, as fp32 math would make them).
static void quantize_row(const float* row, int64_t K, int8_t* q, float* scale_out, int32_t* sum_out) {
  vfloat amax = {};
  vi32 bad = {};
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES) {
    const vfloat v = load_f32(row + k);
    const vfloat a = (vfloat)((vi32)v & 0x7fffffff);
    amax = a > amax ? a : amax;
    bad |= (v - v) != 0.0f;  // NaN or infinity
  }
  float top = hmax(amax);
  bool finite = true;
  for (int i = 0; i < LANES; ++i) finite = finite && bad[i] == 0;
  for (; k < K; ++k) {
    top = std::max(top, std::fabs(row[k]));
    finite = finite && std::isfinite(row[k]);
  }
  if (!finite) {
    std::memset(q, 0, size_t(K));
    *scale_out = NAN;
    *sum_out = 0;
    return;
  }
  const float scale = top > 0.0f ? top / 127.0f : 1.0f;
  const float inv = 1.0f / scale;
  vi32 sums = {};
  k = 0;
  for (; k + LANES <= K; k += LANES) {
    vfloat v = load_f32(row + k) * inv;
    v = v > 127.0f ? vfloat{} + 127.0f : (v < -127.0f ? vfloat{} - 127.0f : v);
    const vi32 r = __builtin_convertvector((v + 12582912.0f) - 12582912.0f, vi32);  // half to even: |v| < 2**22
    sums += r;
    const vi8 bytes = __builtin_convertvector(r, vi8);
    std::memcpy(q + k, &bytes, sizeof bytes);
  }
  int32_t sum = 0;
  for (int i = 0; i < LANES; ++i) sum += sums[i];
  for (; k < K; ++k) {
    const float v = std::min(127.0f, std::max(-127.0f, row[k] * inv));
    const int32_t r = int32_t((v + 12582912.0f) - 12582912.0f);
    q[k] = int8_t(r);
    sum += r;
  }
  *scale_out = scale;
  *sum_out = sum;
}

// y[0, n) += bias (if any), then tanh-GELU (if gelu) written as x * (1 - 1 / (1 + e**(2u))), like the Triton
// kernels: within ~1e-7 of torch's.
static void finish_row(float* y, int64_t n, const float* bias, bool gelu) {
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    vfloat v = load_f32(y + i);
    if (bias) v += load_f32(bias + i);
    if (gelu) {
      const vfloat u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      v = v * (1.0f - 1.0f / (1.0f + vexp(2.0f * u)));
    }
    std::memcpy(y + i, &v, sizeof v);
  }
  for (; i < n; ++i) {
    float v = y[i] + (bias ? bias[i] : 0.0f);
    if (gelu) {
      const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      v = v * (1.0f - 1.0f / (1.0f + std::exp(2.0f * u)));
    }
    y[i] = v;
  }
}

// One (sequence, head) of decode attention: scores over the context, softmax, weighted sum of V. Two passes
// over the cache rows (K then V) so both are plain vector loops; q and acc: [D] scratch, scores: [len].
template <typename T>
static void attend_typed(const DecodeAttentionArgs& a, int64_t s, int64_t h, float* q, float* acc,
                         std::vector<float>& scores) {
  const int64_t D = a.D, head_stride = a.BS * D, block_stride = a.H * a.BS * D, len = a.seq_lens[s];
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const T* qs = static_cast<const T*>(a.q) + s * a.q_tok + h * a.q_head;
  for (int64_t d = 0; d < D; ++d) q[d] = widen(qs[d]) * a.scale;
  scores.resize(size_t(len));
  const int32_t* table = a.block_tables + s * a.bt_stride;
  float running_max = -INFINITY;
  const int64_t row_bytes = D * int64_t(sizeof(T));
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t offset = h * head_stride + (pos % a.BS) * D;
    const T* k = kc + table[pos / a.BS] * block_stride + offset;
    // Each block's rows of this head are one 4 KiB piece (fp32, D 64, 16 rows) somewhere else in the cache,
    // which no hardware prefetcher predicts: fetch the same row of the next block, and this row of V for the
    // second pass, while this one is scored.
    const T* next_k = pos + a.BS < len ? kc + table[(pos + a.BS) / a.BS] * block_stride + offset : nullptr;
    const T* this_v = vc + table[pos / a.BS] * block_stride + offset;
    for (int64_t byte = 0; byte < row_bytes; byte += 64) {
      if (next_k) __builtin_prefetch(reinterpret_cast<const char*>(next_k) + byte, 0, 3);
      __builtin_prefetch(reinterpret_cast<const char*>(this_v) + byte, 0, 3);
    }
    vfloat dot = {};
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES) dot += load_f32(q + d) * load_weight(k + d);
    float score = hsum(dot);
    for (; d < D; ++d) score += q[d] * widen(k[d]);
    scores[size_t(pos)] = score;
    running_max = score > running_max || score != score ? score : running_max;  // NaN sticks
  }
  float denom = 0.0f;
  {
    vfloat sum = {};
    int64_t i = 0;
    for (; i + LANES <= len; i += LANES) {
      const vfloat p = vexp(load_f32(scores.data() + i) - running_max);
      std::memcpy(scores.data() + i, &p, sizeof p);
      sum += p;
    }
    denom = hsum(sum);
    for (; i < len; ++i) {
      scores[size_t(i)] = std::exp(scores[size_t(i)] - running_max);
      denom += scores[size_t(i)];
    }
  }
  std::fill(acc, acc + D, 0.0f);
  for (int64_t pos = 0; pos < len; ++pos) {
    const T* v = vc + table[pos / a.BS] * block_stride + h * head_stride + (pos % a.BS) * D;
    const float p = scores[size_t(pos)];
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES) {
      const vfloat y = load_f32(acc + d) + p * load_weight(v + d);
      std::memcpy(acc + d, &y, sizeof y);
    }
    for (; d < D; ++d) acc[d] += p * widen(v[d]);
  }
  T* out = static_cast<T*>(a.out) + (s * a.H + h) * D;
  for (int64_t d = 0; d < D; ++d) {  // a NaN score (NaN in q or K) makes the row NaN, as in the reference
    const float y = running_max != running_max ? NAN : acc[d] / denom;
    if constexpr (std::is_same_v<T, float>) {
      out[d] = y;
    } else {
      out[d] = f32_to_bf16(y);
    }
  }
}

static void attend(const DecodeAttentionArgs& a, int64_t s, int64_t h, float* q, float* acc,
                   std::vector<float>& scores) {
  if (a.dtype == kF32) {
    attend_typed<float>(a, s, h, q, acc, scores);
  } else {
    attend_typed<uint16_t>(a, s, h, q, acc, scores);
  }
}
