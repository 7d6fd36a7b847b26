// A whole decode step's transformer layers in one call (no Python between ops): per layer
//   qkv = LN1(residual) @ Wqkv.T + b            (linear, LayerNorm prologue)
//   attn = decode attention over the paged cache, after storing this step's K/V
//   residual += attn @ Wproj.T + b              (linear, residual epilogue, in place)
//   hidden = GELU(LN2(residual) @ Wfc.T + b)
//   residual += hidden @ Wout.T + b
// with the rounding of the reference's ops (every intermediate in the model dtype). Built once per model
// (pointers to its weights, which the Python side keeps alive), run once per decode step.
#pragma once

#include <vector>

#include "attention.h"
#include "linear.h"

namespace gpt2fast_cpu {

struct LayerPlan {
  const void* ln1_w; const void* ln1_b;
  Weight qkv; const void* qkv_b;
  Weight proj; const void* proj_b;
  const void* ln2_w; const void* ln2_b;
  Weight fc; const void* fc_b;
  Weight out; const void* out_b;
  float attn_scale;
};

class DecodePlan {
 public:
  DecodePlan(int64_t C, int64_t H, int64_t F, int dtype, float eps) : C_(C), H_(H), F_(F), dtype_(dtype), eps_(eps) {}

  void add_layer(const LayerPlan& layer) { layers_.push_back(layer); }
  int64_t num_layers() const { return int64_t(layers_.size()); }

  // residual [T, C] (model dtype) in place; caches[2 * i], caches[2 * i + 1]: layer i's K and V [NB, H, BS, D].
  void run(const Kernels& kernels, void* residual, int64_t T, const std::vector<uintptr_t>& caches, int64_t BS,
           const int32_t* block_tables, int64_t bt_stride, const int32_t* seq_lens, const int64_t* slot_mapping,
           int threads) const {  // the caller has run check_paged
    const int64_t C = C_, D = C_ / H_;
    const size_t esize = dtype_ == kF32 ? 4 : 2;
    std::vector<unsigned char> qkv(size_t(T * 3 * C) * esize), attn(size_t(T * C) * esize),
        hidden(size_t(T * F_) * esize);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerPlan& l = layers_[i];
      linear(kernels, {T, 3 * C, C, residual, C, dtype_, l.ln1_w, l.ln1_b, eps_, l.qkv, l.qkv_b, false, nullptr, 0,
                       qkv.data(), 3 * C, dtype_, threads});
      const unsigned char* q = qkv.data();
      decode_attention(kernels, {T, H_, D, BS, q, 3 * C, D, q + C * esize, 3 * C, D, q + 2 * C * esize, 3 * C, D,
                        reinterpret_cast<void*>(caches[2 * i]), reinterpret_cast<void*>(caches[2 * i + 1]), dtype_,
                        block_tables, bt_stride, seq_lens, slot_mapping, l.attn_scale, attn.data(), threads});
      linear(kernels, {T, C, C, attn.data(), C, dtype_, nullptr, nullptr, 0.0f, l.proj, l.proj_b, false, residual, C,
                       residual, C, dtype_, threads});
      linear(kernels, {T, F_, C, residual, C, dtype_, l.ln2_w, l.ln2_b, eps_, l.fc, l.fc_b, true, nullptr, 0,
                       hidden.data(), F_, dtype_, threads});
      linear(kernels, {T, C, F_, hidden.data(), F_, dtype_, nullptr, nullptr, 0.0f, l.out, l.out_b, false, residual,
                       C, residual, C, dtype_, threads});
    }
  }

 private:
  int64_t C_, H_, F_;
  int dtype_;
  float eps_;
  std::vector<LayerPlan> layers_;
};

}  // namespace gpt2fast_cpu
