// linear.cuh — the decode linear, `out = [gelu](x @ weight.T + bias) [+ residual]` for at most
// 16 rows: the contract of reference.linear (x (T, K), weight (N, K) as nn.Linear stores it,
// fp32 accumulation, GPT-2's tanh-GELU, one rounding at the store). Bigger batches go to Triton.
// With a LayerNorm prologue (kLN) it is reference.ln_linear, `linear(layer_norm(x), ...)`, in the
// same launch: see "LayerNorm prologue" below.
//
// Design: a GEMV on CUDA cores (no tensor cores), memory-bound: the weight is the traffic.
//   - One block of 4 warps (3 where that idles no thread: gemv_warps) owns kGemvOutputsPerBlock (4)
//     consecutive outputs n and ALL K for them, so every weight element is read from DRAM exactly
//     once per call, for all T rows. Its threads split K: thread i of 128 (96) takes the 16-byte
//     weight vectors i, i + 128 (96), ... of each of the 4 weight rows (8 fp16/bf16 or 4 fp32 per
//     load; one element per load when K, the row stride or a pointer is not 16-byte aligned: the
//     scalar instantiation, kVec = 1).
//   - x rows are read straight into registers (16-byte loads of the same K slice, converted to
//     fp32 once and used for the 4 outputs): each x element is used by exactly one thread of a
//     block, so staging it in shared memory would buy no reuse. The x bytes a block reads (T K,
//     L1/L2 hits: the whole x is <= 200 KB) are T/4 of its weight bytes.
//   - fp32 accumulators acc[t][r] (T x 4, in registers: the row count is a template bucket,
//     1 / 4 / 16, so arrays are indexed by constants). A reduce-scatter butterfly sums the 4T
//     values over the warp's 32 lanes with 2T + T + ... shuffles (not 5 per value), then the
//     warps' partials meet in shared memory (dyn_smem, 4 (3) x 4T floats) and 4T threads add them
//     in warp order, apply bias -> GELU -> + residual, and store. Fixed order everywhere, no
//     atomics: the same inputs give the same bits, whatever the schedule.
//   - LayerNorm prologue (kLN, the qkv and fc projections): each block first computes the mean
//     and rstd of its rows over all K (warp w takes rows w, w + 4 (3), ...: two passes, the mean
//     then the squares around it, as layer_norm.cuh; x comes from L2, T K elements per block
//     against 4 K weight elements per row), then the K loop normalises each x vector as it loads
//     it, `(x - mean) * rstd * ln_w + ln_b`, rounded to T: the value the LayerNorm kernel would
//     have stored and this GEMV read. No launch, no (T, K) round trip through memory for the
//     LayerNorm output. The statistics' fp32 sums run in another order than layer_norm.cuh's,
//     so a value on a rounding boundary of T may round the other way: within the tests'
//     tolerances.
//   - Why not split K over blocks: 4 outputs per block already give N/4 blocks = 192 at N = 768
//     (132 H100 SMs), 576 at 2304 and 768 at 3072, each thread with 4 weight vectors (64 B) in
//     flight per K step, and need no fp32 workspace and no second launch. (At N = 768, 192
//     blocks leave 60 SMs with two and 72 with one; kGemvOutputsPerBlock = 2 would even that
//     out at twice the x reads: a choice for a GPU to measure.)
//   - Int8 weights (W8A16, W = int8_t): the same vectors of kVec elements, so an int8 weight load
//     is kVec bytes (8 beside fp16/bf16 x, 4 beside fp32), not 16. That keeps the split above:
//     K = 768 is 96 vectors, one per thread of 3 warps, where 16-byte int8 vectors would be 48
//     and idle half the block unless a block took 8 rows. At GPT-2's widths a block requests its
//     whole 4-row slab at once (3 KB of int8 at K = 768), so the load width does not bound the
//     bytes in flight; 16-byte loads with 8 rows a block at K = 3072 are for a GPU to measure.
//
// Napkin math, GPT-2 124M fp16 (2 bytes), bytes one call moves (weight + bias + x + out, + the
// residual of the two projections), and the time at an H100's 3.35 TB/s:
//   batch 1:  qkv 768 -> 2304: 3.55 MB 1.06 us; attn proj 768 -> 768: 1.19 MB 0.35 us;
//             fc 768 -> 3072: 4.73 MB 1.41 us; mlp proj 3072 -> 768: 4.73 MB 1.41 us;
//             14.2 MB a layer, 50.9 us for the 12 layers of a step.
//   batch 16: 3.64 / 1.26 / 4.85 / 4.87 MB -> 1.09 / 0.38 / 1.45 / 1.45 us (52.3 us a step): the
//             activations add 3%. But 16 rows do 16 FMAs per weight element, ~120 per clock per
//             SM at the roofline rate vs an SM's 128 fp32 FMA/clock: 16 rows is where CUDA cores
//             stop being free. Batch 64 (585.7 MB a step in benchmarks/roofline.md) is Triton's.
#pragma once

#include "../common.cuh"

#include <type_traits>

namespace gpt2fast {

constexpr int kGemvMaxRows = 16;           // decode batches of at most this many rows
constexpr int kGemvWarps = 4;              // warps per block, splitting K (at most; see gemv_warps)
constexpr int kGemvThreads = kGemvWarps * kWarpSize;

// Warps per block for rows of num_vecs vectors: 4, or 3 where that leaves no thread without a
// vector in the last round while 4 would idle a warp or more: K = 768 in fp16/bf16 is 96 16-byte
// vectors, one per thread of 3 warps (4 warps: 32 threads idle the whole call); fp32 at 768 is
// 192 (2 each).
// K = 3072 (384 vectors) and 1600 fp16 (200) keep 4.
constexpr int gemv_warps(int num_vecs) {
  return num_vecs % kGemvThreads != 0 && num_vecs % (3 * kWarpSize) == 0 ? 3 : 4;
}
constexpr int kGemvOutputsPerBlock = 4;    // outputs n per block (weight rows it streams)

// GPT-2's gelu_new, 0.5 y (1 + tanh(z)) with z = sqrt(2/pi) (y + 0.044715 y^3), written as
// y / (1 + exp(-2z)): the same function with no cancellation in 1 + tanh(z) for negative y, and
// expf (not __expf) keeps it within a few fp32 ulps. z = +-inf gives y or -0, never NaN.
// Measured (tests/test_cuda_linear.py, y in [-12, 12]): max abs error 5.1e-7 vs float64 and
// 4.8e-7 vs torch's fp32 F.gelu(approximate="tanh"); relative error <= 2.5e-6 for |y| <= 5, where
// the tanh form loses up to 30% of its (tiny, < 1e-6) negative-tail values to cancellation.
__device__ __forceinline__ float tanh_gelu(float y) {
  const float z = 0.7978845608028654f * (y + 0.044715f * y * y * y);
  return y / (1.0f + expf(-2.0f * z));
}

// Sums each of kValues values (a power of two) over the 32 lanes of a warp. Each stage halves
// the values a lane still carries: at lane bit kOffset the lane keeps one half, sends the other
// to its partner and adds the partner's copy of the half it keeps (kValues/2 shuffles, then
// kValues/4, ...). Once one value is left the remaining stages are a plain butterfly. Afterwards
// value `lane * (kValues / 32) + i` sits in v[i] (kValues >= 32), or value `lane / (32 /
// kValues)` in v[0] on every lane of its group (kValues < 32). Every warp lane must call it.
template <int kCount, int kOffset, int kValues>
__device__ __forceinline__ void warp_reduce_scatter(float (&v)[kValues], int lane) {
  if constexpr (kOffset > 0) {
    if constexpr (kCount > 1) {
      constexpr int kHalf = kCount / 2;
      const bool upper = (lane & kOffset) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, kOffset);
      }
      warp_reduce_scatter<kHalf, kOffset / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], kOffset);
      warp_reduce_scatter<1, kOffset / 2>(v, lane);
    }
  }
}

// The sums over K of rows x (LayerNorm'd with stats[2 t], stats[2 t + 1] when kLN) times weight rows
// n0 .. n0 + kGemvOutputsPerBlock - 1, one partial per warp: partials[w * kValues + t * kOut + r]
// (kValues = kRows * kOut). Every thread of the block calls it; it ends with a barrier, after which
// threads i < kValues add their column over the warps in warp order.
template <typename T, int kVec, int kRows, bool kLN, typename W = T>
__device__ __forceinline__ void gemv_sums(const T* __restrict__ x, const W* __restrict__ weight,
                                          const T* __restrict__ ln_weight,
                                          const T* __restrict__ ln_bias, const float* stats,
                                          float* partials, int rows, int n_out, int k_in,
                                          int64_t x_stride, int n0) {
  constexpr int kOut = kGemvOutputsPerBlock;
  constexpr int kValues = kRows * kOut;  // acc[t * kOut + r]: row t, output n0 + r
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_vecs = k_in / kVec;

  // Outputs past n_out (the last block of an N that is not a multiple of kOut) re-read the last
  // weight row and are never stored: every thread keeps the same control flow.
  const W* w_row[kOut];  // [kOut][k_in]
#pragma unroll
  for (int r = 0; r < kOut; ++r) {
    const int n = n0 + r < n_out ? n0 + r : n_out - 1;
    w_row[r] = weight + static_cast<int64_t>(n) * k_in;
  }

  float acc[kValues];
#pragma unroll
  for (int i = 0; i < kValues; ++i) acc[i] = 0.0f;

  for (int j = threadIdx.x; j < num_vecs; j += blockDim.x) {
    float w[kOut][kVec];
#pragma unroll
    for (int r = 0; r < kOut; ++r) load_floats<W, kVec>(w_row[r] + j * kVec, w[r]);
    float g[kLN ? kVec : 1], h[kLN ? kVec : 1];  // this slice of the LayerNorm's weight and bias
    if constexpr (kLN) {
      load_floats<T, kVec>(ln_weight + j * kVec, g);
      load_floats<T, kVec>(ln_bias + j * kVec, h);
    }
#pragma unroll
    for (int t = 0; t < kRows; ++t) {
      if (t < rows) {
        float xv[kVec];
        load_floats<T, kVec>(x + t * x_stride + j * kVec, xv);
        if constexpr (kLN) {
          const float mean = stats[2 * t], rstd = stats[2 * t + 1];
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            xv[e] = to_float(from_float<T>((xv[e] - mean) * rstd * g[e] + h[e]));
          }
        }
#pragma unroll
        for (int r = 0; r < kOut; ++r) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[t * kOut + r] += w[r][e] * xv[e];
        }
      }
    }
  }

  warp_reduce_scatter<kValues, kWarpSize / 2>(acc, lane);
  if constexpr (kValues >= kWarpSize) {
    constexpr int kPerLane = kValues / kWarpSize;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) partials[warp * kValues + lane * kPerLane + i] = acc[i];
  } else {
    constexpr int kGroup = kWarpSize / kValues;  // lanes holding the same sum
    if (lane % kGroup == 0) partials[warp * kValues + lane / kGroup] = acc[0];
  }
  __syncthreads();
}

// __launch_bounds__(128, 4): at most 128 registers a thread, so 4 blocks (16 warps) fit an SM to
// keep loads in flight. (With no minimum, ptxas capped the 4-row fp16 variant at 64 and spilled.)
// The 16-row LayerNorm variant holds the LayerNorm's weight and bias slices besides 64 accumulators
// and 4 weight vectors: 3 blocks (at most 168 registers), where 128 spilled 260 bytes on sm_80.
template <int kRows, bool kLN>
constexpr int gemv_min_blocks() {
  return kLN && kRows == kGemvMaxRows ? 3 : 4;
}

template <typename T, int kVec, int kRows, bool kLN, typename W = T>
__global__ void __launch_bounds__(kGemvThreads, (gemv_min_blocks<kRows, kLN>())) linear_gemv_kernel(
    const T* __restrict__ x,          // [rows, k_in], rows x_stride apart
    const W* __restrict__ weight,     // [n_out, k_in], contiguous (int8: W ~= weight * w_scale[n])
    const float* __restrict__ w_scale,  // [n_out] per-output-channel scales (int8 W), else unread
    const T* __restrict__ bias,       // [n_out], or nullptr
    const T* __restrict__ residual,   // [rows, n_out], rows res_stride apart, or nullptr
    const T* __restrict__ ln_weight,  // [k_in] (kLN; else unread)
    const T* __restrict__ ln_bias,    // [k_in] (kLN; else unread)
    T* __restrict__ out,              // [rows, n_out], contiguous
    int rows, int n_out, int k_in, int64_t x_stride, int64_t res_stride, bool gelu, float eps) {
  constexpr int kOut = kGemvOutputsPerBlock;
  constexpr int kValues = kRows * kOut;  // acc[t * kOut + r]: row t, output n0 + r
  static_assert((kValues & (kValues - 1)) == 0 && kValues <= 3 * kWarpSize);
  const int num_warps = blockDim.x / kWarpSize;  // gemv_warps: 3 or 4
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n0 = blockIdx.x * kOut;
  const int num_vecs = k_in / kVec;

  // LayerNorm statistics of the block's rows: stats[2 t] the mean, stats[2 t + 1] the rstd.
  __shared__ float stats[2 * kRows];
  if constexpr (kLN) {
    for (int t = warp; t < rows; t += num_warps) {  // warp-uniform: every lane reaches the shuffles
      const T* x_row = x + t * x_stride;             // [k_in]
      float sum = 0.0f;
      for (int j = lane; j < num_vecs; j += kWarpSize) {
        float v[kVec];
        load_floats<T, kVec>(x_row + j * kVec, v);
#pragma unroll
        for (int e = 0; e < kVec; ++e) sum += v[e];
      }
      const float mean = warp_sum(sum) / k_in;
      float squares = 0.0f;
      for (int j = lane; j < num_vecs; j += kWarpSize) {
        float v[kVec];
        load_floats<T, kVec>(x_row + j * kVec, v);
#pragma unroll
        for (int e = 0; e < kVec; ++e) squares += (v[e] - mean) * (v[e] - mean);
      }
      // IEEE sqrt and division, as layer_norm.cuh: once per row
      const float rstd = 1.0f / sqrtf(warp_sum(squares) / k_in + eps);
      if (lane == 0) {
        stats[2 * t] = mean;
        stats[2 * t + 1] = rstd;
      }
    }
    __syncthreads();
  }

  float* partials = reinterpret_cast<float*>(dyn_smem);  // [num_warps][kValues]
  gemv_sums<T, kVec, kRows, kLN, W>(x, weight, ln_weight, ln_bias, stats, partials, rows, n_out,
                                    k_in, x_stride, n0);

  if (threadIdx.x < kValues) {
    const int t = threadIdx.x / kOut;
    const int n = n0 + static_cast<int>(threadIdx.x) % kOut;
    if (t < rows && n < n_out) {
      float y = 0.0f;
      for (int w = 0; w < num_warps; ++w) y += partials[w * kValues + threadIdx.x];
      if constexpr (!std::is_same_v<W, T>) y *= w_scale[n];  // int8: the channel's scale, once
      if (bias != nullptr) y += to_float(bias[n]);
      if (gelu) y = tanh_gelu(y);
      if (residual != nullptr) y += to_float(residual[t * res_stride + n]);
      out[static_cast<int64_t>(t) * n_out + n] = from_float<T>(y);
    }
  }
}

// ---- launchers ---------------------------------------------------------------------------------

// The operands of one launch, typed (W: the weight's element type, T or int8_t with w_scale).
template <typename T, typename W = T>
struct GemvArgs {
  const T* x;
  const W* weight;
  const float* w_scale;
  const T* bias;
  const T* residual;
  const T* ln_weight;
  const T* ln_bias;
  T* out;
  int rows, n_out, k_in;
  int64_t x_stride, res_stride;
  bool gelu;
  float eps;
};

template <typename T, typename W, int kVec, int kRows, bool kLN>
void launch_gemv(const GemvArgs<T, W>& a, cudaStream_t stream) {
  const int warps = gemv_warps(a.k_in / kVec);
  const dim3 grid(ceil_div(a.n_out, kGemvOutputsPerBlock)), block(warps * kWarpSize);
  const std::size_t smem = warps * kGemvOutputsPerBlock * kRows * sizeof(float);
  LAUNCH(grid, block, smem, stream, linear_gemv_kernel<T, kVec, kRows, kLN, W>)(
      a.x, a.weight, a.w_scale, a.bias, a.residual, a.ln_weight, a.ln_bias, a.out, a.rows,
      a.n_out, a.k_in, a.x_stride, a.res_stride, a.gelu, a.eps);
}

// Row-count buckets 1, 4, 16: the accumulators are kRows x 4 registers, so a single-row decode
// does not pay a 16-row register file (occupancy is what hides DRAM latency in a GEMV).
template <typename T, typename W, int kVec, bool kLN>
cudaError_t launch_linear_rows(const GemvArgs<T, W>& a, cudaStream_t stream) {
  if (a.rows <= 1) {
    launch_gemv<T, W, kVec, 1, kLN>(a, stream);
  } else if (a.rows <= 4) {
    launch_gemv<T, W, kVec, 4, kLN>(a, stream);
  } else {
    launch_gemv<T, W, kVec, 16, kLN>(a, stream);
  }
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t launch_linear_typed(const void* x, const void* weight, const float* w_scale,
                                const void* bias, const void* residual, const void* ln_weight,
                                const void* ln_bias, void* out, int rows, int n_out, int k_in,
                                int64_t x_stride, int64_t res_stride, bool gelu, float eps,
                                cudaStream_t stream) {
  const GemvArgs<T, W> a{static_cast<const T*>(x),         static_cast<const W*>(weight),
                         w_scale,                          static_cast<const T*>(bias),
                         static_cast<const T*>(residual),  static_cast<const T*>(ln_weight),
                         static_cast<const T*>(ln_bias),   static_cast<T*>(out),
                         rows,                             n_out,
                         k_in,                             x_stride,
                         res_stride,                       gelu,
                         eps};
  const bool ln = ln_weight != nullptr;
  // x, weight and the LayerNorm's vectors are read in vectors of kVecElems<T> elements (an int8
  // weight: that many bytes); bias, residual and out are touched once per output.
  const bool vec = can_vectorize<T>({x, ln_weight, ln_bias}, k_in, {x_stride}) &&
                   is_aligned(weight, kVecElems<T> * sizeof(W));
  if (vec) {
    return ln ? launch_linear_rows<T, W, kVecElems<T>, true>(a, stream)
              : launch_linear_rows<T, W, kVecElems<T>, false>(a, stream);
  }
  return ln ? launch_linear_rows<T, W, 1, true>(a, stream)
            : launch_linear_rows<T, W, 1, false>(a, stream);
}

// out[t] = [gelu](LN(x[t]) @ weight.T + bias) [+ residual[t]] for rows <= kGemvMaxRows, where LN
// is LayerNorm(ln_weight, ln_bias, eps) when ln_weight is given and the identity when it is
// nullptr (both LayerNorm vectors, or neither). bias and residual may be nullptr. x rows x_stride
// apart, residual rows res_stride apart, out contiguous. With w_scale, weight is int8 (n_out,
// k_in) and the weight it stands for is weight[n] * w_scale[n] (W8A16: x stays in `dtype`).
inline cudaError_t linear(const void* x, const void* weight, const float* w_scale,
                          const void* bias, const void* residual, const void* ln_weight,
                          const void* ln_bias, void* out, int64_t rows, int64_t n_out,
                          int64_t k_in, int64_t x_stride, int64_t res_stride, bool gelu, float eps,
                          DType dtype, cudaStream_t stream) {
  if (rows < 0 || rows > kGemvMaxRows || n_out < 0 || n_out > 0x7fffffff || k_in < 0 ||
      k_in > 0x7fffffff || x_stride < k_in || (residual != nullptr && res_stride < n_out) ||
      (ln_weight == nullptr) != (ln_bias == nullptr) || (ln_weight != nullptr && k_in == 0)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || n_out == 0) return cudaSuccess;
  const int r = static_cast<int>(rows), n = static_cast<int>(n_out), k = static_cast<int>(k_in);
  return with_weight_types(dtype, w_scale != nullptr, [&](auto zero, auto weight_zero) {
    return launch_linear_typed<decltype(zero), decltype(weight_zero)>(
        x, weight, w_scale, bias, residual, ln_weight, ln_bias, out, r, n, k, x_stride, res_stride,
        gelu, eps, stream);
  });
}

}  // namespace gpt2fast
