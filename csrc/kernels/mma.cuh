// mma.cuh — the tensor-core and async-copy instructions the GEMM and flash-prefill kernels use,
// one function each: inline PTX under nvcc (sm_80+), the emulator's model of the same instruction
// under CUDA_EMU (csrc/emu/cuda_emu.h, "tensor-core PTX"), so a kernel tested on the CPU runs the
// same fragment layouts it runs on the chip.
//
//   mma_16816<T>(d, a, b)      d += A (16x16, row) * B (16x8, col), fp16/bf16 in, fp32 accumulate
//   ldmatrix_x{1,2,4}[_trans]  8x8 matrices of 16-bit elements from shared memory into fragments
//   cp_async_16(dst, src, n)   16 bytes global -> shared, the last 16 - n zero-filled (n in 0..16)
//   cp_async_commit / cp_async_wait<N>
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"; g = lane / 4,
// q = lane % 4; each 32-bit register holds two elements, the lower-numbered in its low half):
//   A (16x16): a[0] = A[g][2q, 2q+1]      a[1] = A[g+8][2q, 2q+1]
//              a[2] = A[g][2q+8, 2q+9]    a[3] = A[g+8][2q+8, 2q+9]
//   B (16x8):  b[0] = B[2q, 2q+1][g]      b[1] = B[2q+8, 2q+9][g]
//   C, D:      c[0], c[1] = C[g][2q, 2q+1]  c[2], c[3] = C[g+8][2q, 2q+1]
// ldmatrix: matrix j's row r is read from the address lane 8 j + r passes; lane l receives
// row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix j in register j (.trans: column l / 4,
// rows 2 (l % 4) and 2 (l % 4) + 1). So an x4 over a row-major 16x16 tile, lane l pointing at
// row (l % 16), column 8 (l / 16), yields A's fragment; over an [n][k] tile it yields B's (two n8
// tiles at once: rows n = l % 8 + 8 (l / 16), column 8 ((l / 8) % 2)).
#pragma once

#include "../common.cuh"

namespace gpt2fast {

template <typename T>
struct MmaType;  // the PTX type name of a 16-bit element
template <>
struct MmaType<__half> {
  static constexpr int kEmu = 0;  // emu::kMmaF16
};
template <>
struct MmaType<__nv_bfloat16> {
  static constexpr int kEmu = 1;  // emu::kMmaBf16
};

#if defined(CUDA_EMU)
#define GPT2FAST_LOC , std::source_location loc = std::source_location::current()
#else
#define GPT2FAST_LOC
#endif

// d += A * B for one m16n8k16 tile (T = __half or __nv_bfloat16, fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2] GPT2FAST_LOC) {
#if defined(CUDA_EMU)
  const float c[4] = {d[0], d[1], d[2], d[3]};
  emu::mma_m16n8k16(d, a, b, c, MmaType<T>::kEmu, loc);
#else
  if constexpr (MmaType<T>::kEmu == 0) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

#if !defined(CUDA_EMU)
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: row = this lane's 16-byte row (shared memory).
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row GPT2FAST_LOC) {
#if defined(CUDA_EMU)
  emu::ldmatrix(r, 4, kTrans, row, loc);
#else
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row)));
  }
#endif
}

// .x2: rows from lanes 0..15 (the others' addresses are ignored but must be valid to compute).
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row GPT2FAST_LOC) {
#if defined(CUDA_EMU)
  emu::ldmatrix(r, 2, kTrans, row, loc);
#else
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_address(row)));
  }
#endif
}

// .x1: rows from lanes 0..7.
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row GPT2FAST_LOC) {
#if defined(CUDA_EMU)
  emu::ldmatrix(r, 1, kTrans, row, loc);
#else
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(smem_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(smem_address(row)));
  }
#endif
}

// cp.async.cg.shared.global (L2 only: tiles are reused from shared memory, not L1): 16 bytes from
// src (16-byte aligned) to dst (shared, 16-byte aligned); only src_bytes of them are read, the
// rest are zeros (src_bytes = 0 reads nothing: the tile edges past M, N or K).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src,
                                            int src_bytes GPT2FAST_LOC) {
#if defined(CUDA_EMU)
  emu::cp_async(dst, src, 16, src_bytes, true, loc);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)),
               "l"(src), "r"(src_bytes));
#endif
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(CUDA_EMU)
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight. The data
// is visible to this thread only: a __syncthreads must follow before other threads read it.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(CUDA_EMU)
  emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

#undef GPT2FAST_LOC

}  // namespace gpt2fast
