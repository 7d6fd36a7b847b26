// Shared pieces of the native CPU kernels: dtypes, bf16 rounding, the per-call argument structs and the
// table of kernels one instruction set provides. Kernels take raw pointers and sizes (no torch); the
// Python wrappers in gpt2fast/ops/cpu.py check shapes, dtypes and contiguity before calling.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace gpt2fast_cpu {

// kI8Panels: int8 weights in panels, [ceil(N / 16)][K / 4][16][4] (16 output channels x 4 consecutive k per
// 64 bytes, zero rows past N; gpt2fast/quant.py to_panels), with fp32 scales like kI8.
enum DType : int { kF32 = 0, kBF16 = 1, kI8 = 2, kI8Panels = 3 };
constexpr int64_t kPanel = 16;  // output channels per panel (kI8Panels)

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN stays NaN: what torch's float -> bfloat16 cast does.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_f32(v); }

inline float load_as_f32(const void* p, int64_t i, int dtype) {
  return dtype == kF32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

inline void store_from_f32(void* p, int64_t i, int dtype, float v) {
  if (dtype == kF32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  }
}

// The activations a linear reads, prepared once per call (LayerNorm applied, rounded as the reference
// rounds), in the forms the weight formats need.
struct Activations {
  int64_t M = 0, K = 0;
  const float* f32 = nullptr;     // [M, K] fp32 (the model dtype's values)
  const uint16_t* bf16 = nullptr; // [M, Kp] bf16, Kp = K rounded up to 32, zero padded (bf16 weights)
  const int8_t* u8 = nullptr;     // [M, Kp] activations quantized to int8, Kp rounded up to 64, zero padded
  const float* u8_scale = nullptr;  // [M] per-row scale of the int8 activations
  const int32_t* u8_sum = nullptr;  // [M] sum over k of the int8 activations (vpdpbusd's correction)
  int64_t Kp = 0;
};

// One weight matrix [N, K] row-major (out-major, like nn.Linear), fp32, bf16 or int8 with fp32 scales [N], or
// int8 in panels (kI8Panels).
struct Weight {
  const void* data = nullptr;
  int dtype = kF32;
  const float* scale = nullptr;
};

// One decode attention call (attention.h): every sequence has one query token.
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

// y[m, n - n0] for n in [n0, n1), all M rows: the fp32 dot products (int8: scales applied), no bias.
using DotTileFn = void (*)(const Activations&, const Weight&, int64_t n0, int64_t n1, float* y, int64_t ldy);

// What one instruction set provides (dot.h and rows.h, compiled by each isa_*.cpp).
struct Kernels {
  const char* isa;
  DotTileFn dot_tile;
  const char* int8_method;  // "vnni" (activations quantized per row) or "dequant" (weights widened in registers)
  // out = LayerNorm(x) of one fp32 row of K (may alias x)
  void (*layer_norm_row)(const float* x, int64_t K, const float* w, const float* b, float eps, float* out);
  // one row of K to int8 (q[0, K)), its scale (NaN for a non-finite row) and the sum of its int8 values
  void (*quantize_row)(const float* row, int64_t K, int8_t* q, float* scale, int32_t* sum);
  // y[0, n) += bias (null: none), then tanh-GELU if gelu, in place
  void (*finish_row)(float* y, int64_t n, const float* bias, bool gelu);
  // decode attention of sequence s, head h; q, acc: [D] scratch; scores: [context] scratch
  void (*attend)(const DecodeAttentionArgs& a, int64_t s, int64_t h, float* q, float* acc,
                 std::vector<float>& scores);
};

}  // namespace gpt2fast_cpu
