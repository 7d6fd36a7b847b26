// The linear driver: prepares a call's activations once (LayerNorm prologue, rounding, int8/bf16
// forms), splits the output channels over threads in tiles, and runs an epilogue on each fp32 tile:
// bias, tanh-GELU, residual, store (``linear``), or the LM head's running argmax / Gumbel-max.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common.h"

namespace gpt2fast_cpu {

constexpr int64_t kTileN = 64;   // output channels per tile: a thread's unit of work
static_assert(kTileN % kPanel == 0, "a tile starts at a panel (dot.h panel_tile)");
constexpr int64_t kTileM = 64;   // activation rows per tile (prefill-sized calls)

// The arguments of one linear: y = [LN](x) @ W.T (+ bias) (GELU) (+ residual), rows [M, N].
struct LinearArgs {
  int64_t M, N, K;
  const void* x; int64_t ldx; int x_dtype;      // [M, K] fp32 or bf16 (the model dtype)
  const void* ln_w; const void* ln_b; float eps;  // [K] in x_dtype, or null: no LayerNorm prologue
  Weight w;                                       // [N, K]
  const void* bias;                               // [N] in x_dtype, or null
  bool gelu;
  const void* residual; int64_t ldr;              // [M, N] in x_dtype, or null
  void* out; int64_t ldo; int out_dtype;          // [M, N], fp32 or bf16
  int threads;
};

// Activations in every form the weight format needs, owned by this object.
class PreparedActivations {
 public:
  PreparedActivations(const Kernels& kernels, const void* x, int64_t M, int64_t K, int64_t ldx, int dtype,
                      const void* ln_w, const void* ln_b, float eps, int weight_dtype) {
    f32_.resize(size_t(M * K));
    std::vector<float> ln_w32, ln_b32;  // the LayerNorm's parameters in fp32 (a bf16 model's are converted)
    const float* w32 = static_cast<const float*>(ln_w);
    const float* b32 = static_cast<const float*>(ln_b);
    if (ln_w && dtype != kF32) {
      ln_w32.resize(size_t(K));
      ln_b32.resize(size_t(K));
      for (int64_t k = 0; k < K; ++k) {
        ln_w32[size_t(k)] = load_as_f32(ln_w, k, dtype);
        ln_b32[size_t(k)] = load_as_f32(ln_b, k, dtype);
      }
      w32 = ln_w32.data();
      b32 = ln_b32.data();
    }
    for (int64_t m = 0; m < M; ++m) {  // each row as the reference's ops see it: LN in fp32, in the model dtype
      float* row = f32_.data() + m * K;
      if (dtype == kF32) {
        std::memcpy(row, static_cast<const float*>(x) + m * ldx, size_t(K) * 4);
      } else {
        for (int64_t k = 0; k < K; ++k) row[k] = load_as_f32(x, m * ldx + k, dtype);
      }
      if (!ln_w) continue;
      kernels.layer_norm_row(row, K, w32, b32, eps, row);
      if (dtype != kF32)
        for (int64_t k = 0; k < K; ++k) row[k] = bf16_to_f32(f32_to_bf16(row[k]));
    }
    act_.M = M;
    act_.K = K;
    act_.f32 = f32_.data();
    if (weight_dtype == kBF16 && dtype == kBF16) to_bf16(M, K);  // fp32 activations: weights widened instead
    if ((weight_dtype == kI8 || weight_dtype == kI8Panels) && std::string_view(kernels.int8_method) == "vnni")
      to_u8(kernels, M, K);
  }
  const Activations& get() const { return act_; }

 private:
  void to_bf16(int64_t M, int64_t K) {
    act_.Kp = (K + 31) / 32 * 32;
    bf16_.assign(size_t(M * act_.Kp), 0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) bf16_[m * act_.Kp + k] = f32_to_bf16(f32_[m * K + k]);
    act_.bf16 = bf16_.data();
  }

  // Per-row int8 (kernels.quantize_row), zero padded to Kp, with each row's scale and sum.
  void to_u8(const Kernels& kernels, int64_t M, int64_t K) {
    act_.Kp = (K + 63) / 64 * 64;
    u8_.assign(size_t(M * act_.Kp), 0);
    u8_scale_.resize(size_t(M));
    u8_sum_.resize(size_t(M));
    for (int64_t m = 0; m < M; ++m)
      kernels.quantize_row(f32_.data() + m * K, K, u8_.data() + m * act_.Kp, &u8_scale_[size_t(m)],
                           &u8_sum_[size_t(m)]);
    act_.u8 = u8_.data();
    act_.u8_scale = u8_scale_.data();
    act_.u8_sum = u8_sum_.data();
  }

  Activations act_;
  std::vector<float> f32_;
  std::vector<uint16_t> bf16_;
  std::vector<int8_t> u8_;
  std::vector<float> u8_scale_;
  std::vector<int32_t> u8_sum_;
};

// Runs tile(m0, m1, n0, n1, y) over every [kTileM x kTileN] tile, split over threads; y is the tile's
// fp32 products (ldy = kTileN), the epilogue's to consume (and overwrite).
template <typename Epilogue>
void for_each_tile(const Kernels& kernels, const Activations& act, const Weight& w, int64_t N, int threads,
                   Epilogue&& epilogue) {
  const int64_t tiles_n = (N + kTileN - 1) / kTileN, tiles_m = (act.M + kTileM - 1) / kTileM;
  const int64_t tiles = tiles_n * tiles_m;
  auto run = [&](int64_t t, std::vector<float>& y) {
    const int64_t tm = t / tiles_n, tn = t % tiles_n;
    const int64_t m0 = tm * kTileM, m1 = std::min(act.M, m0 + kTileM);
    const int64_t n0 = tn * kTileN, n1 = std::min(N, n0 + kTileN);
    Activations rows = act;
    rows.M = m1 - m0;
    rows.f32 = act.f32 + m0 * act.K;
    if (act.bf16) rows.bf16 = act.bf16 + m0 * act.Kp;
    if (act.u8) {
      rows.u8 = act.u8 + m0 * act.Kp;
      rows.u8_scale = act.u8_scale + m0;
      rows.u8_sum = act.u8_sum + m0;
    }
    kernels.dot_tile(rows, w, n0, n1, y.data(), kTileN);
    epilogue(m0, m1, n0, n1, y.data());
  };
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
  if (nt == 1) {
    std::vector<float> y(size_t(kTileM * kTileN));
    for (int64_t t = 0; t < tiles; ++t) run(t, y);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> y(size_t(kTileM * kTileN));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) run(t, y);
  }
}

// The epilogue of one tile with the residual and output types fixed (R, O: float or bf16 bits), so the loop
// over a row is a plain vector loop. bias: fp32 [N] or null.
template <typename R, typename O>
void store_tile(const Kernels& kernels, const LinearArgs& a, const float* bias, int64_t m0, int64_t m1, int64_t n0,
                int64_t n1, float* y) {
  const R* residual = static_cast<const R*>(a.residual);
  O* out = static_cast<O*>(a.out);
  for (int64_t m = m0; m < m1; ++m) {
    float* row = y + (m - m0) * kTileN - n0;
    if (bias || a.gelu) kernels.finish_row(row + n0, n1 - n0, bias ? bias + n0 : nullptr, a.gelu);
    for (int64_t n = n0; n < n1; ++n) {
      float v = row[n];
      if (residual) v += widen(residual[m * a.ldr + n]);
      if constexpr (std::is_same_v<O, float>) {
        out[m * a.ldo + n] = v;
      } else {
        out[m * a.ldo + n] = f32_to_bf16(v);
      }
    }
  }
}

inline void linear(const Kernels& kernels, const LinearArgs& a) {
  const PreparedActivations prepared(kernels, a.x, a.M, a.K, a.ldx, a.x_dtype, a.ln_w, a.ln_b, a.eps, a.w.dtype);
  std::vector<float> bias;
  if (a.bias) {
    bias.resize(size_t(a.N));
    for (int64_t n = 0; n < a.N; ++n) bias[size_t(n)] = load_as_f32(a.bias, n, a.x_dtype);
  }
  const float* b = a.bias ? bias.data() : nullptr;
  const bool f32_in = a.x_dtype == kF32, f32_out = a.out_dtype == kF32;
  for_each_tile(kernels, prepared.get(), a.w, a.N, a.threads,
                [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* y) {
                  if (f32_in && f32_out) {
                    store_tile<float, float>(kernels, a, b, m0, m1, n0, n1, y);
                  } else if (f32_in) {
                    store_tile<float, uint16_t>(kernels, a, b, m0, m1, n0, n1, y);
                  } else if (f32_out) {
                    store_tile<uint16_t, float>(kernels, a, b, m0, m1, n0, n1, y);
                  } else {
                    store_tile<uint16_t, uint16_t>(kernels, a, b, m0, m1, n0, n1, y);
                  }
                });
}

}  // namespace gpt2fast_cpu
