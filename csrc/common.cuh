// common.cuh — what every kernel header and csrc/bindings.cpp share, in both builds:
//   nvcc (the real gpt2fast._C for sm_80/sm_90) and g++ with -include csrc/emu/cuda_emu.h
//   -DCUDA_EMU (the CPU test module). Nothing here may use the torch C++ API.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#if !defined(CUDA_EMU)
#include <cuda_runtime.h>
#endif

// Every launch goes through this macro, so `<<<>>>` (not C++) never appears in a kernel file:
//   LAUNCH(grid, block, smem_bytes, stream, kernel<T, N>)(args...);
// then `return cudaGetLastError();`. Keyed on CUDA_EMU, not __CUDA_ARCH__: the launch is host
// code, compiled in nvcc's host pass where __CUDA_ARCH__ is undefined either way.
#if defined(CUDA_EMU)
#define LAUNCH(grid, block, smem, stream, ...) \
  ::emu::Launch(#__VA_ARGS__, (grid), (block), (smem), (stream), __VA_ARGS__)
#else
#define LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif

// The one name for dynamic shared memory (the emulator poisons it with 0xFF before each block).
extern __shared__ __align__(16) unsigned char dyn_smem[];

namespace gpt2fast {

// Element types the kernels take. The bindings export these codes (DTYPE_FLOAT32, ...) so that
// gpt2fast/ops/cuda.py reads them from the module instead of repeating them.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }

// Calls typed(T{}, W{}) for the element type of `dtype` and the weight type (int8_t when the
// weight is int8, else T): the dispatch every launcher of a weight-reading kernel shares.
template <typename F>
cudaError_t with_weight_types(DType dtype, bool int8, F&& typed) {
  switch (dtype) {
    case DType::kFloat32:
      return int8 ? typed(float{}, int8_t{}) : typed(float{}, float{});
    case DType::kFloat16:
      return int8 ? typed(__half{}, int8_t{}) : typed(__half{}, __half{});
    case DType::kBFloat16:
      return int8 ? typed(__nv_bfloat16{}, int8_t{}) : typed(__nv_bfloat16{}, __nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ---- fp32 <-> storage types: math in fp32, one rounding (to nearest even) at each store -----
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(int8_t v) { return static_cast<float>(v); }  // int8 weights

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- vector loads and stores ----------------------------------------------------------------
// kVecBytes-wide accesses (one 128-bit load instruction) need every pointer aligned to 16 bytes
// and every row offset a multiple of the vector; launchers check with can_vectorize() and fall
// back to a scalar instantiation (N = 1) otherwise, so no kernel ever issues a misaligned load.
constexpr int kVecBytes = 16;

template <typename T>
constexpr int kVecElems = kVecBytes / static_cast<int>(sizeof(T));  // 4 fp32, 8 fp16/bf16

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

inline bool is_aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// True when rows of `width` elements at these row strides (in elements) can be read with
// kVecBytes loads from every pointer given (nullptr entries are ignored).
template <typename T>
bool can_vectorize(std::initializer_list<const void*> ptrs, int width,
                   std::initializer_list<int64_t> strides) {
  if (width % kVecElems<T> != 0) return false;
  for (int64_t s : strides) {
    if (s % kVecElems<T> != 0) return false;
  }
  for (const void* p : ptrs) {
    if (p != nullptr && !is_aligned(p, kVecBytes)) return false;
  }
  return true;
}

// N consecutive elements at p (aligned to N * sizeof(T)), widened to fp32.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Packed<T, N> packed = *reinterpret_cast<const Packed<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(packed.v[i]);
}

// N fp32 values rounded once to T and stored at p (aligned to N * sizeof(T)).
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Packed<T, N> packed;
#pragma unroll
  for (int i = 0; i < N; ++i) packed.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Packed<T, N>*>(p) = packed;
}

// ---- reductions -------------------------------------------------------------------------------
// Butterfly: every lane ends with the same sum, added in the same order on every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024; every thread must call it).
// Warp sums go through shared memory; then every warp reduces the partials itself, so all
// threads get the identical total with no second broadcast. The closing barrier lets the next
// call reuse `partials`.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partials[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  v = warp_sum(lane < num_warps ? partials[lane] : 0.0f);
  __syncthreads();
  return v;
}

}  // namespace gpt2fast
