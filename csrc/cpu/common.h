// Shared pieces of the native CPU kernels: dtypes, bf16 rounding, the per-call argument structs and the
// table of kernels one instruction set provides. Kernels take raw pointers and sizes (no torch); the
// Python wrappers in gpt2fast/ops/cpu.py check shapes, dtypes and contiguity before calling.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace gpt2fast_cpu {

enum DType : int { kF32 = 0, kBF16 = 1, kI8 = 2 };

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

// tanh-GELU with tanh written as 2*sigmoid(2u)-1, like the Triton kernels: max error ~1e-7 vs torch's.
inline float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x * (1.0f - 1.0f / (1.0f + std::exp(2.0f * u)));
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

// One weight matrix [N, K] row-major (out-major, like nn.Linear), fp32, bf16 or int8 with fp32 scales [N].
struct Weight {
  const void* data = nullptr;
  int dtype = kF32;
  const float* scale = nullptr;
};

// y[m, n - n0] for n in [n0, n1), all M rows: the fp32 dot products (int8: scales applied), no bias.
using DotTileFn = void (*)(const Activations&, const Weight&, int64_t n0, int64_t n1, float* y, int64_t ldy);

struct Kernels {
  const char* isa;
  DotTileFn dot_tile;
  const char* int8_method;  // "vnni" (activations quantized per row) or "dequant" (weights widened in registers)
};

}  // namespace gpt2fast_cpu
