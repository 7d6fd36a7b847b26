// The GEMV / small-M GEMM core: y[m, n] = dot(x[m, :], W[n, :]) over a range of output channels.
// Included once per instruction set by isa_*.cpp, inside that set's namespace, with LANES defined
// (16 for AVX-512, 8 for AVX2, 4 for the portable build) and GPT2FAST_ISA_AVX512 / _AVX2 (g++'s target
// pragma does not define __AVX512VNNI__ and friends in C++). Written with GCC vector extensions so one
// source serves every width; AVX-512 adds VNNI (int8) and BF16 dot-product paths in intrinsics.
//
// fp32 and bf16 weights are [N, K] row-major as they lie in the checkpoint (no repacking): a tile of NB
// output channels x MB activation rows keeps NB*MB accumulators, each K-step loads NB weight vectors and MB
// activation vectors, and the horizontal sums happen once per output. K tails are scalar (or masked).
// int8 weights are either that or, where the kernels use VNNI, panels of 16 channels (kI8Panels,
// panel_block): a vector of 16 channels' sums per row, no horizontal sums.
// Design notes and measurements: benchmarks/cpu_kernels.md.
#pragma once

// (isa.h includes the standard headers and common.h before the namespace this file is included into.)

typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef uint16_t vbf16 __attribute__((vector_size(LANES * 2)));
typedef uint32_t vu32 __attribute__((vector_size(LANES * 4)));
typedef int8_t vi8 __attribute__((vector_size(LANES)));

static inline vfloat load_f32(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bf16 -> fp32 is exact: the 16 bits become the high half. (GCC's generic lowering of these conversions
// is scalar, hence the intrinsics.)
static inline vfloat load_bf16(const uint16_t* p) {
#if defined(GPT2FAST_ISA_AVX512)
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vfloat)_mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
#elif defined(GPT2FAST_ISA_AVX2)
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vfloat)_mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
#else
  vbf16 h;
  std::memcpy(&h, p, sizeof h);
  return (vfloat)(__builtin_convertvector(h, vu32) << 16);
#endif
}

static inline vfloat load_i8(const int8_t* p) {
#if defined(GPT2FAST_ISA_AVX512)
  return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(GPT2FAST_ISA_AVX2)
  return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  vi8 q;
  std::memcpy(&q, p, sizeof q);
  return __builtin_convertvector(q, vfloat);
#endif
}

// How far ahead of its loads a block of NB channels x MB rows prefetches its weights, in bytes: the same spot
// NB rows of K fp32 weights ahead (12-48 KB for GPT-2) whatever the weights' dtype: the hardware prefetcher alone
// leaves decode short of bandwidth. int8 at batch 1 over GPT-2's layers: 8.4 ms with one block (3 KB) ahead,
// 7.7-8.1 with four (this), slower again with eight.
//
// Except fp32 weights one channel at a time (decode at batch 1): the [N, K] rows are then read as one stream, and
// 3 KB ahead in it (a whole row at GPT-2's K = 768) kept it fed best. A one-thread decode step of GPT-2 124M
// fp32, the two ways alternated step by step in one process (five processes; one of them saw no difference):
// two channels and a block ahead 29.1 / 30.7 ms, this 27.9 / 29.4 (-4%); 2 or 4 KB ahead, or a block (12 KB at
// K = 3072), was slower again.
constexpr int64_t kStreamAhead = 3072;

template <typename T, int NB, int MB>
static inline int64_t prefetch_bytes(int64_t K) {
  if constexpr (std::is_same_v<T, float> && NB == 1 && MB == 1) return std::min<int64_t>(4 * K, kStreamAhead);
  return 4 * NB * K;
}

static inline void prefetch_ahead(const void* p, int64_t bytes) {
  __builtin_prefetch(static_cast<const char*>(p) + bytes, 0, 3);
}

static inline float hsum(vfloat v) {
#if defined(GPT2FAST_ISA_AVX512)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(GPT2FAST_ISA_AVX2)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  float s = 0.0f;
  for (int i = 0; i < LANES; ++i) s += v[i];
  return s;
#endif
}

// sums[i * NB + j] = horizontal sum of acc[i][j] for every accumulator of a block. AVX-512 reduces four at a
// time (halves added, then a 4x4 transpose-add with hadd: ~5 instructions per sum instead of ~9), since at
// batch 8 the per-output sums are a real part of a step.
//
// Both reduce a copy of the accumulators (copy_block): with the kernel's own array's address taken here, GCC
// keeps that array in memory and stores every accumulator to the stack after each vpdpbusd/FMA of the K loop
// (16 stores per step at 2 x 8; int8 batch-8 decode ran store-bound at ~10 GB/s of weights).
template <typename V, int MB, int NB>
static inline void copy_block(const V (&from)[MB][NB], V (&to)[MB][NB]) {
  #pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
    #pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) to[i][j] = from[i][j];
}

// Every accumulator of a block set to `value` (zero, as a vector of the block's type).
template <typename V, int MB, int NB>
static inline void fill_block(V (&acc)[MB][NB], V value) {
  #pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
    #pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = value;
}

template <typename V, int MB, int NB>
static inline void hsums(const V (&acc_)[MB][NB], float* sums) {
  constexpr int n = MB * NB;
  V acc[MB][NB];
  copy_block(acc_, acc);
  const V* a = &acc[0][0];
  int i = 0;
#if defined(GPT2FAST_ISA_AVX512)
  auto quarter = [](V v) {
    const __m512 z = (__m512)v;
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(z), _mm512_extractf32x8_ps(z, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  };
  for (; i + 4 <= n; i += 4) {
    const __m128 ab = _mm_hadd_ps(quarter(a[i]), quarter(a[i + 1]));
    const __m128 cd = _mm_hadd_ps(quarter(a[i + 2]), quarter(a[i + 3]));
    _mm_storeu_ps(sums + i, _mm_hadd_ps(ab, cd));
  }
#endif
  for (; i < n; ++i) sums[i] = hsum((vfloat)a[i]);
}

#if defined(GPT2FAST_ISA_AVX512)
// hsums for int32 accumulators (VNNI).
template <int MB, int NB>
static inline void hsums_i32(const __m512i (&acc_)[MB][NB], int32_t* sums) {
  constexpr int n = MB * NB;
  __m512i acc[MB][NB];
  copy_block(acc_, acc);
  const __m512i* a = &acc[0][0];
  auto quarter = [](__m512i z) {
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(z), _mm512_extracti64x4_epi64(z, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  };
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128i ab = _mm_hadd_epi32(quarter(a[i]), quarter(a[i + 1]));
    const __m128i cd = _mm_hadd_epi32(quarter(a[i + 2]), quarter(a[i + 3]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(sums + i), _mm_hadd_epi32(ab, cd));
  }
  for (; i < n; ++i) sums[i] = _mm512_reduce_add_epi32(a[i]);
}
#endif

template <typename T>
static inline float scalar_weight(const T* w, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return w[i];
  } else if constexpr (std::is_same_v<T, uint16_t>) {
    return bf16_to_f32(w[i]);
  } else {
    return float(w[i]);
  }
}

template <typename T>
static inline vfloat load_weight(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load_f32(p);
  } else if constexpr (std::is_same_v<T, uint16_t>) {
    return load_bf16(p);
  } else {
    return load_i8(p);
  }
}

// NB channels x MB rows, fp32 activations, weights widened to fp32 in registers (fp32, bf16, int8).
template <typename T, int NB, int MB>
static void dot_block_widen(const float* x, int64_t ldx, const T* w, int64_t K, const float* scale, float* y,
                            int64_t ldy) {
  vfloat acc[MB][NB] = {};
  const int64_t ahead = prefetch_bytes<T, NB, MB>(K);
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES) {
    vfloat wv[NB];
    #pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      if ((k * int64_t(sizeof(T))) % 64 == 0) prefetch_ahead(w + j * K + k, ahead);
      wv[j] = load_weight(w + j * K + k);
    }
    #pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const vfloat xv = load_f32(x + i * ldx + k);
      #pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i][j] += xv * wv[j];
    }
  }
  float sums[MB * NB];
  hsums(acc, sums);
  #pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    #pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      float s = sums[i * NB + j];
      for (int64_t t = k; t < K; ++t) s += x[i * ldx + t] * scalar_weight(w + j * K, t);
      y[i * ldy + j] = scale ? s * scale[j] : s;
    }
  }
}

template <typename T, int NB, int MB>
static void widen_block(const Activations& a, const Weight& w, int64_t n, int64_t m, float* y, int64_t ldy) {
  const T* wp = static_cast<const T*>(w.data) + n * a.K;
  dot_block_widen<T, NB, MB>(a.f32 + m * a.K, a.K, wp, a.K, w.scale ? w.scale + n : nullptr, y, ldy);
}

#if defined(GPT2FAST_ISA_AVX512)
#define GPT2FAST_HAS_BF16_DOT 1
// bf16 weights x bf16 activations with vdpbf16ps: 32 products per instruction, fp32 accumulation.
template <int NB, int MB>
static void bf16_block(const Activations& a, const Weight& w, int64_t n, int64_t m, float* y, int64_t ldy) {
  const int64_t K = a.K, ahead = prefetch_bytes<uint16_t, NB, MB>(K);
  const uint16_t* wp = static_cast<const uint16_t*>(w.data) + n * K;
  __m512 acc[MB][NB];
  fill_block(acc, _mm512_setzero_ps());
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : __mmask32((1u << (K - k)) - 1);
    __m512i wv[NB];
    #pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      prefetch_ahead(wp + j * K + k, ahead);
      wv[j] = _mm512_maskz_loadu_epi16(mask, wp + j * K + k);
    }
    #pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_loadu_si512(a.bf16 + (m + i) * a.Kp + k);  // zero padded to Kp
      #pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  float sums[MB * NB];
  hsums(acc, sums);
  #pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
    #pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) y[i * ldy + j] = sums[i * NB + j];
}
#endif

#if defined(GPT2FAST_ISA_AVX512)
#define GPT2FAST_HAS_VNNI 1
// int8 weights x activations quantized per row to int8 with vpdpbusd (64 products per instruction, exact
// int32 sums). vpdpbusd multiplies unsigned by signed bytes: the weights are made unsigned on the fly
// (w ^ 0x80 = w + 128), so sum((w + 128) x) - 128 sum(x) = sum(w x), the correction once per activation
// row (its sum, from the prologue). y = that * x_scale[m] * w_scale[n].
template <int NB, int MB>
static void vnni_block(const Activations& a, const Weight& w, int64_t n, int64_t m, float* y, int64_t ldy) {
  const int64_t K = a.K, ahead = prefetch_bytes<int8_t, NB, MB>(K);
  const int8_t* wp = static_cast<const int8_t*>(w.data) + n * K;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512i acc[MB][NB];
  fill_block(acc, _mm512_setzero_si512());
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : __mmask64((uint64_t(1) << (K - k)) - 1);
    __m512i wv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      prefetch_ahead(wp + j * K + k, ahead);
      // masked bytes load as 0, flip to 128, and meet zero activation padding: they add nothing
      wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, wp + j * K + k), flip);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_loadu_si512(a.u8 + (m + i) * a.Kp + k);  // zero padded to Kp
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[j], xv);
    }
  }
  int32_t sums[MB * NB];
  hsums_i32(acc, sums);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    const int64_t correction = 128 * int64_t(a.u8_sum[m + i]);
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const int64_t s = int64_t(sums[i * NB + j]) - correction;
      y[i * ldy + j] = float(s) * a.u8_scale[m + i] * w.scale[n + j];
    }
  }
}
#endif

// int8 weights in panels (kI8Panels, common.h): 16 output channels x 4 consecutive k per 64 bytes.
#ifdef GPT2FAST_HAS_VNNI
// How far ahead in each panel a panel block prefetches. GPT-2 124M's 48 projections and LM head, one thread, the
// caches flushed before each step: 512 / 1024 / 2048 / 4096 / 8192 bytes ahead 8.5 / 8.4 / 7.9 / 7.9 / 8.1 ms at
// batch 8 (two panels x 8 rows); at batch 1 every distance within the noise of the others.
constexpr int64_t kPanelAhead = 2048;

// P panels (16 P channels) x MB rows of int8 panels with vpdpbusd: one 64-byte load of a panel is 16 channels x 4 k,
// each row's 4 int8 activations of that k are broadcast, and acc[i][p] holds 16 channels' int32 sums outright (no
// horizontal sums). The same exact sums as vnni_block (weights flipped to unsigned, 128 sum(x) taken off once).
// Channels from n; `valid` of them are real (the rest of the last panel is padding: neither read nor written).
template <int P, int MB>
static void panel_block(const Activations& a, const Weight& w, int64_t n, int64_t m, int64_t valid, float* y,
                        int64_t ldy) {
  const int64_t K = a.K, stride = kPanel * K;  // bytes per panel
  const int8_t* wp = static_cast<const int8_t*>(w.data) + (n / kPanel) * stride;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512i acc[MB][P];
  fill_block(acc, _mm512_setzero_si512());
  for (int64_t k = 0; k < K; k += 4) {
    __m512i wv[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const int8_t* group = wp + p * stride + k * kPanel;
      prefetch_ahead(group, kPanelAhead);
      wv[p] = _mm512_xor_si512(_mm512_loadu_si512(group), flip);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      int32_t four;  // this row's activations k..k+3
      std::memcpy(&four, a.u8 + (m + i) * a.Kp + k, 4);
      const __m512i xv = _mm512_set1_epi32(four);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) acc[i][p] = _mm512_dpbusd_epi32(acc[i][p], wv[p], xv);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    const __m512i correction = _mm512_set1_epi32(128 * a.u8_sum[m + i]);
    const __m512 x_scale = _mm512_set1_ps(a.u8_scale[m + i]);
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const int64_t left = valid - p * kPanel;
      const __mmask16 mask = left >= kPanel ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][p], correction));
      const __m512 w_scale = _mm512_maskz_loadu_ps(mask, w.scale + n + p * kPanel);
      _mm512_mask_storeu_ps(y + i * ldy + p * kPanel, mask, _mm512_mul_ps(_mm512_mul_ps(sums, x_scale), w_scale));
    }
  }
}

using PanelFn = void (*)(const Activations&, const Weight&, int64_t, int64_t, int64_t, float*, int64_t);
// Few rows: 4 panels (a whole 64-channel tile) x up to 4 rows; more: 2 panels x up to 8 rows (16 accumulators, each
// weight vector serves 8 rows). Same caches-flushed measurement as kPanelAhead, batch 8: 2 x 8 7.9, 3 x 8 8.0,
// 4 x 4 9.3 ms; batch 1: 1, 2 or 4 panels within the noise.
constexpr int kPanelWideP = 4, kPanelWideMB = 4, kPanelTallP = 2, kPanelTallMB = 8;

struct PanelBlocks {
  PanelFn fn[kPanelWideP][kPanelTallMB];
};

template <int P = 1, int MB = 1>
constexpr void fill_panel_blocks(PanelBlocks& b) {
  if constexpr (MB <= kPanelWideMB || P <= kPanelTallP) b.fn[P - 1][MB - 1] = panel_block<P, MB>;
  if constexpr (MB < kPanelTallMB) {
    fill_panel_blocks<P, MB + 1>(b);
  } else if constexpr (P < kPanelWideP) {
    fill_panel_blocks<P + 1, 1>(b);
  }
}

static constexpr PanelBlocks kPanelBlocks = [] {
  PanelBlocks b{};
  fill_panel_blocks(b);
  return b;
}();

// y[m * ldy + (n - n0)] for panels' channels [n0, n1); n0 is a multiple of 16 (tiles are kTileN = 64 wide).
static void panel_tile(const Activations& a, const Weight& w, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const bool tall = a.M > kPanelWideMB;
  const int64_t max_p = tall ? kPanelTallP : kPanelWideP, max_mb = tall ? kPanelTallMB : kPanelWideMB;
  for (int64_t n = n0; n < n1; n += max_p * kPanel) {
    const int np = int(std::min(max_p, (n1 - n + kPanel - 1) / kPanel));
    for (int64_t m = 0; m < a.M; m += max_mb) {
      const int mb = int(std::min(max_mb, a.M - m));
      kPanelBlocks.fn[np - 1][mb - 1](a, w, n, m, n1 - n, y + m * ldy + (n - n0), ldy);
    }
  }
}
#else
// Without VNNI (AVX2, portable): a plain loop over fp32 activations and the panels' int8 values (a model holds
// panels only where the kernels quantize activations for VNNI; this serves a select_isa after it was built).
static void panel_tile(const Activations& a, const Weight& w, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t K = a.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* lane = static_cast<const int8_t*>(w.data) + (n / kPanel) * kPanel * K + (n % kPanel) * 4;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.f32 + m * K;
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[k] * float(lane[(k / 4) * 4 * kPanel + k % 4]);
      y[m * ldy + (n - n0)] = s * w.scale[n];
    }
  }
}
#endif

using BlockFn = void (*)(const Activations&, const Weight&, int64_t, int64_t, float*, int64_t);
// Blocks up to kNB channels x kMB rows. Few rows (decode at small batch): 4 channels x up to 4 rows, so
// four weight streams run at once. More rows: 2 channels x up to 8 rows, so each weight vector loaded
// from memory serves 8 rows (a batch of 8 reads the weights once, not twice). AVX2 has 16 vector
// registers, not 32: half as many accumulators there.
constexpr int kNB = 4, kMB = 8;
#if LANES == 16
constexpr int kWideNB = 4, kWideMB = 4, kTallNB = 2, kTallMB = 8;
#else
constexpr int kWideNB = 2, kWideMB = 4, kTallNB = 1, kTallMB = 8;
#endif

struct Blocks {
  BlockFn fn[kNB][kMB];
};

// Every (NB, MB) instantiation of one block kernel that a tile can use, edges included.
template <template <int, int> class Pick, int NB = 1, int MB = 1>
constexpr void fill_blocks(Blocks& b) {
  if constexpr ((NB <= kWideNB && MB <= kWideMB) || (NB <= kTallNB && MB <= kTallMB)) b.fn[NB - 1][MB - 1] = Pick<NB, MB>::fn;
  if constexpr (MB < kMB) {
    fill_blocks<Pick, NB, MB + 1>(b);
  } else if constexpr (NB < kNB) {
    fill_blocks<Pick, NB + 1, 1>(b);
  }
}

template <template <int, int> class Pick>
constexpr Blocks make_blocks() {
  Blocks b{};
  fill_blocks<Pick>(b);
  return b;
}

template <int NB, int MB> struct PickF32 { static constexpr BlockFn fn = widen_block<float, NB, MB>; };
#ifdef GPT2FAST_HAS_BF16_DOT
template <int NB, int MB> struct PickBF16 { static constexpr BlockFn fn = bf16_block<NB, MB>; };
#else
template <int NB, int MB> struct PickBF16 { static constexpr BlockFn fn = widen_block<uint16_t, NB, MB>; };
#endif
#ifdef GPT2FAST_HAS_VNNI
template <int NB, int MB> struct PickI8 { static constexpr BlockFn fn = vnni_block<NB, MB>; };
#else
template <int NB, int MB> struct PickI8 { static constexpr BlockFn fn = widen_block<int8_t, NB, MB>; };
#endif

template <int NB, int MB> struct PickBF16Widen { static constexpr BlockFn fn = widen_block<uint16_t, NB, MB>; };

// By weight dtype; [3]: bf16 weights with fp32 activations (no bf16 copy of them: widened, not rounded)
static constexpr Blocks kBlocks[4] = {make_blocks<PickF32>(), make_blocks<PickBF16>(), make_blocks<PickI8>(),
                                      make_blocks<PickBF16Widen>()};

// y[m * ldy + (n - n0)] for m in [0, M), n in [n0, n1).
static void dot_tile(const Activations& a, const Weight& w, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (w.dtype == kI8Panels) return panel_tile(a, w, n0, n1, y, ldy);
  const Blocks& blocks = kBlocks[w.dtype == kBF16 && a.bf16 == nullptr ? 3 : w.dtype];
  const bool tall = a.M > kWideMB;
  // One row of fp32 (3-12 KB for GPT-2) at batch 1: one channel at a time, a single stream (kStreamAhead;
  // four channels were slower still); int8 rows are a quarter of that and keep four (8.1 ms with four, 8.6
  // with two).
  const int64_t wide_nb = a.M == 1 && w.dtype == kF32 ? 1 : kWideNB;
  const int64_t max_nb = tall ? kTallNB : wide_nb, max_mb = tall ? kTallMB : kWideMB;
  for (int64_t n = n0; n < n1; n += max_nb) {
    const int nb = int(std::min(max_nb, n1 - n));
    for (int64_t m = 0; m < a.M; m += max_mb) {
      const int mb = int(std::min(max_mb, a.M - m));
      blocks.fn[nb - 1][mb - 1](a, w, n, m, y + m * ldy + (n - n0), ldy);
    }
  }
}

static bool int8_uses_vnni() {
#ifdef GPT2FAST_HAS_VNNI
  return true;
#else
  return false;
#endif
}
