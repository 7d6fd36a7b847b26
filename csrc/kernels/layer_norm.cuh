// layer_norm.cuh — LayerNorm, and LayerNorm fused with the residual add
// (`residual += x; out = LN(residual)`), the contracts of reference.layer_norm / add_layer_norm.
//
// One block per row. Each thread reads kItems vectors of kVec elements (16-byte loads when every
// pointer and row stride allows, else kVec = 1) and keeps them in registers, so the row is read
// from memory once: the mean, then the variance around it (two-pass, like the reference: a large
// mean cannot cancel the variance away), then normalise and store. Statistics are fp32 and
// reduced with warp shuffles plus one shared-memory step; every output is rounded once, at its
// store. With the residual add, the stored residual is `T(residual + x)` and the row normalised
// is that rounded value, exactly as the reference normalises the updated residual.
#pragma once

#include "../common.cuh"

namespace gpt2fast {

// Widest row a launch accepts: the scalar path at 1024 threads x 8 items.
constexpr int kLayerNormMaxWidth = 8192;

template <typename T, int kVec, int kItems, bool kResidual>
__global__ void __launch_bounds__(1024) layer_norm_kernel(
    const T* __restrict__ x,       // [rows, width], rows x_stride apart
    T* __restrict__ residual,      // [rows, width], rows res_stride apart; += x (kResidual)
    const T* __restrict__ weight,  // [width]
    const T* __restrict__ bias,    // [width]
    T* __restrict__ out,           // [rows, width], contiguous
    int64_t x_stride, int64_t res_stride, int width, float eps) {
  const int64_t row = blockIdx.x;
  const int num_vecs = width / kVec;
  const T* x_row = x + row * x_stride;  // [width]
  float v[kItems][kVec];                // this thread's slice of the row, in fp32

  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = threadIdx.x + i * blockDim.x;  // vector index in the row
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[i][k] = 0.0f;
    if (j >= num_vecs) continue;
    load_floats<T, kVec>(x_row + j * kVec, v[i]);
    if constexpr (kResidual) {
      T* res = residual + row * res_stride + j * kVec;  // [kVec]
      float r[kVec];
      load_floats<T, kVec>(res, r);
      // normalise the sum as stored (rounded to T), like the reference normalises `residual`
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[i][k] = to_float(from_float<T>(r[k] + v[i][k]));
      store_floats<T, kVec>(res, v[i]);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum += v[i][k];
  }
  const float mean = block_sum(sum) / width;

  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (static_cast<int>(threadIdx.x + i * blockDim.x) >= num_vecs) continue;
#pragma unroll
    for (int k = 0; k < kVec; ++k) squares += (v[i][k] - mean) * (v[i][k] - mean);
  }
  // IEEE sqrt and division, not rsqrtf: this runs once per row and keeps fp32 within ~1 ulp.
  const float rstd = 1.0f / sqrtf(block_sum(squares) / width + eps);

  T* out_row = out + row * width;  // [width]
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = threadIdx.x + i * blockDim.x;
    if (j >= num_vecs) continue;
    float w[kVec], b[kVec], y[kVec];
    load_floats<T, kVec>(weight + j * kVec, w);
    load_floats<T, kVec>(bias + j * kVec, b);
#pragma unroll
    for (int k = 0; k < kVec; ++k) y[k] = (v[i][k] - mean) * rstd * w[k] + b[k];
    store_floats<T, kVec>(out_row + j * kVec, y);
  }
}

// ---- launchers ---------------------------------------------------------------------------------

// Threads per row: one vector each up to 1024 vectors, then 2, 4 or 8 vectors each; whole warps.
// 768 fp16 -> 96 threads x 1 item; 1600 fp32 -> 416 x 1; an odd 1599 (scalar) -> 800 x 2.
// Only item counts a width up to kLayerNormMaxWidth can need are instantiated (fp16 vectors: 1;
// fp32 vectors: 1, 2; scalar: 1, 2, 4, 8), so every compiled variant is one that can run.
template <typename T, int kVec, bool kResidual>
cudaError_t launch_layer_norm_rows(const T* x, T* residual, const T* weight, const T* bias, T* out,
                                   int rows, int width, int64_t x_stride, int64_t res_stride,
                                   float eps, cudaStream_t stream) {
  constexpr int kMaxItems = ceil_div(kLayerNormMaxWidth / kVec, 1024);
  const int num_vecs = width / kVec;
  const int items = num_vecs <= 1024 ? 1 : num_vecs <= 2048 ? 2 : num_vecs <= 4096 ? 4 : 8;
  const dim3 grid(rows), block(round_up(ceil_div(num_vecs, items), kWarpSize));
  if (items == 1) {
    LAUNCH(grid, block, 0, stream, layer_norm_kernel<T, kVec, 1, kResidual>)(
        x, residual, weight, bias, out, x_stride, res_stride, width, eps);
  } else if constexpr (kMaxItems >= 2) {
    if (items == 2) {
      LAUNCH(grid, block, 0, stream, layer_norm_kernel<T, kVec, 2, kResidual>)(
          x, residual, weight, bias, out, x_stride, res_stride, width, eps);
    } else if constexpr (kMaxItems >= 4) {
      if (items == 4) {
        LAUNCH(grid, block, 0, stream, layer_norm_kernel<T, kVec, 4, kResidual>)(
            x, residual, weight, bias, out, x_stride, res_stride, width, eps);
      } else {
        LAUNCH(grid, block, 0, stream, layer_norm_kernel<T, kVec, 8, kResidual>)(
            x, residual, weight, bias, out, x_stride, res_stride, width, eps);
      }
    }
  }
  return cudaGetLastError();
}

template <typename T, bool kResidual>
cudaError_t launch_layer_norm_typed(const void* x, void* residual, const void* weight,
                                    const void* bias, void* out, int64_t rows, int width,
                                    int64_t x_stride, int64_t res_stride, float eps,
                                    cudaStream_t stream) {
  const auto* xt = static_cast<const T*>(x);
  auto* rt = static_cast<T*>(residual);
  const auto* wt = static_cast<const T*>(weight);
  const auto* bt = static_cast<const T*>(bias);
  auto* ot = static_cast<T*>(out);
  if (can_vectorize<T>({x, residual, weight, bias, out}, width,
                       {x_stride, kResidual ? res_stride : 0})) {
    return launch_layer_norm_rows<T, kVecElems<T>, kResidual>(
        xt, rt, wt, bt, ot, static_cast<int>(rows), width, x_stride, res_stride, eps, stream);
  }
  return launch_layer_norm_rows<T, 1, kResidual>(xt, rt, wt, bt, ot, static_cast<int>(rows), width,
                                                 x_stride, res_stride, eps, stream);
}

template <bool kResidual>
cudaError_t launch_layer_norm(const void* x, void* residual, const void* weight, const void* bias,
                              void* out, int64_t rows, int width, int64_t x_stride,
                              int64_t res_stride, float eps, DType dtype, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || width < 1 || width > kLayerNormMaxWidth ||
      x_stride < width || (kResidual && res_stride < width)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_layer_norm_typed<float, kResidual>(x, residual, weight, bias, out, rows, width,
                                                       x_stride, res_stride, eps, stream);
    case DType::kFloat16:
      return launch_layer_norm_typed<__half, kResidual>(x, residual, weight, bias, out, rows, width,
                                                        x_stride, res_stride, eps, stream);
    case DType::kBFloat16:
      return launch_layer_norm_typed<__nv_bfloat16, kResidual>(
          x, residual, weight, bias, out, rows, width, x_stride, res_stride, eps, stream);
  }
  return cudaErrorInvalidValue;
}

// out[r] = LN(x[r]) for `rows` rows of `width`; x rows x_stride elements apart, out contiguous.
inline cudaError_t layer_norm(const void* x, const void* weight, const void* bias, void* out,
                              int64_t rows, int width, int64_t x_stride, float eps, DType dtype,
                              cudaStream_t stream) {
  return launch_layer_norm<false>(x, nullptr, weight, bias, out, rows, width, x_stride, 0, eps,
                                  dtype, stream);
}

// residual[r] += x[r] (rounded to the dtype), then out[r] = LN(residual[r]).
inline cudaError_t add_layer_norm(const void* x, void* residual, const void* weight,
                                  const void* bias, void* out, int64_t rows, int width,
                                  int64_t x_stride, int64_t res_stride, float eps, DType dtype,
                                  cudaStream_t stream) {
  return launch_layer_norm<true>(x, residual, weight, bias, out, rows, width, x_stride, res_stride,
                                 eps, dtype, stream);
}

}  // namespace gpt2fast
