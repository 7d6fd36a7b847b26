// tensor_core_tests.cpp — kernels that run one tensor-core instruction of csrc/kernels/mma.cuh
// each, so tests/test_cuda_tensor_core.py can check the emulator's mma.sync, ldmatrix and
// cp.async against the PTX ISA's lane-to-element tables. Built only emulated; each function owns
// its memory and returns plain lists (a subprocess runs the aborting ones without torch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/mma.cuh"

namespace py = pybind11;
using gpt2fast::kWarpSize;

// ---- kernels -----------------------------------------------------------------------------------

// Lane l passes registers a[l], b[l] and accumulators c[l]; d[l] is what mma gives it back.
template <typename T>
__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int l = threadIdx.x;
  uint32_t ra[4], rb[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[4 * l + i], acc[i] = c[4 * l + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[2 * l + i];
  gpt2fast::mma_16816<T>(acc, ra, rb);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = acc[i];
}

// Shared memory holds `words` 16-bit values (rows of 8 = 16 bytes); lane l points at row
// rows[l] (or, with rows[l] < 0, at a misaligned address: the lanes whose address is ignored).
template <int kMatrices, bool kTrans>
__global__ void ldmatrix_kernel(const uint16_t* values, int words, const int* rows, uint32_t* out) {
  auto* smem = reinterpret_cast<uint16_t*>(dyn_smem);
  for (int i = threadIdx.x; i < words; i += blockDim.x) smem[i] = values[i];
  __syncthreads();
  const int l = threadIdx.x;
  const void* row = rows[l] >= 0 ? static_cast<const void*>(smem + 8 * rows[l])
                                 : static_cast<const void*>(dyn_smem + 2);
  uint32_t r[kMatrices];
  if constexpr (kMatrices == 4) gpt2fast::ldmatrix_x4<kTrans>(r, row);
  if constexpr (kMatrices == 2) gpt2fast::ldmatrix_x2<kTrans>(r, row);
  if constexpr (kMatrices == 1) gpt2fast::ldmatrix_x1<kTrans>(r, row);
  for (int j = 0; j < kMatrices; ++j) out[kMatrices * l + j] = r[j];
}

// A (16x16 row-major) and B stored [n][k] (8x16) go through shared memory, ldmatrix and one mma,
// the way the GEMM feeds its tiles: D = A B^T + 0, row-major 16x8.
template <typename T>
__global__ void tile_kernel(const uint16_t* a, const uint16_t* b, float* d) {
  auto* sa = reinterpret_cast<uint16_t*>(dyn_smem);  // [16][16]
  uint16_t* sb = sa + 256;                           // [8][16]
  for (int i = threadIdx.x; i < 256; i += blockDim.x) sa[i] = a[i];
  for (int i = threadIdx.x; i < 128; i += blockDim.x) sb[i] = b[i];
  __syncthreads();
  const int l = threadIdx.x;
  uint32_t ra[4], rb[2];
  gpt2fast::ldmatrix_x4(ra, sa + 16 * (l % 16) + 8 * (l / 16));
  gpt2fast::ldmatrix_x2(rb, sb + 16 * (l % 8) + 8 * ((l / 8) % 2));
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  gpt2fast::mma_16816<T>(acc, ra, rb);
  const int g = l / 4, q = l % 4;
  d[8 * g + 2 * q] = acc[0];
  d[8 * g + 2 * q + 1] = acc[1];
  d[8 * (g + 8) + 2 * q] = acc[2];
  d[8 * (g + 8) + 2 * q + 1] = acc[3];
}

// Thread t copies src[16 t ..] (16 bytes, src_bytes[t] of them read) into two shared buffers, one
// group each, then records both buffers after wait_group 1 and again after wait_group 0.
__global__ void cp_async_kernel(const unsigned char* src, const int* src_bytes,
                                unsigned char* after1, unsigned char* after0) {
  const int t = threadIdx.x, n = blockDim.x;
  unsigned char* first = dyn_smem;
  unsigned char* second = dyn_smem + 16 * n;
  gpt2fast::cp_async_16(first + 16 * t, src + 16 * t, src_bytes[t]);
  gpt2fast::cp_async_commit();
  gpt2fast::cp_async_16(second + 16 * t, src + 16 * (n + t), 16);
  gpt2fast::cp_async_commit();
  gpt2fast::cp_async_wait<1>();
  for (int i = 0; i < 16; ++i) {
    after1[16 * t + i] = first[16 * t + i];
    after1[16 * (n + t) + i] = second[16 * t + i];
  }
  gpt2fast::cp_async_wait<0>();
  for (int i = 0; i < 16; ++i) {
    after0[16 * t + i] = first[16 * t + i];
    after0[16 * (n + t) + i] = second[16 * t + i];
  }
}

// Each thread copies its own 16 bytes, waits, then (with_sync) passes a barrier and reads its
// neighbour's: without the barrier the neighbour's copy may not have landed (seen in one order).
__global__ void cp_async_neighbour_kernel(const unsigned char* src, unsigned char* out,
                                          bool with_sync) {
  const int t = threadIdx.x, n = blockDim.x;
  gpt2fast::cp_async_16(dyn_smem + 16 * t, src + 16 * t, 16);
  gpt2fast::cp_async_commit();
  gpt2fast::cp_async_wait<0>();
  if (with_sync) __syncthreads();
  const int u = (t + 1) % n;
  for (int i = 0; i < 16; ++i) out[16 * t + i] = dyn_smem[16 * u + i];
}

// Misuse the emulator must abort on (kind: 0 a misaligned cp.async source, 1 a cp.async past the
// launch's shared memory, 2 an mma on a warp of 16 lanes, 3 a misaligned ldmatrix row).
__global__ void misuse_kernel(const unsigned char* src, int kind) {
  if (kind == 0) gpt2fast::cp_async_16(dyn_smem, src + 4, 16);
  if (kind == 1) gpt2fast::cp_async_16(dyn_smem + 16 * blockDim.x, src, 16);
  if (kind == 2) {
    uint32_t a[4] = {}, b[2] = {};
    float d[4] = {};
    gpt2fast::mma_16816<__half>(d, a, b);
  }
  if (kind == 3) {
    uint32_t r[4];
    gpt2fast::ldmatrix_x4(r, dyn_smem + 8);
  }
}

// ---- host entry points -----------------------------------------------------------------------

namespace {

void check(cudaError_t err) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("launch failed: ") + cudaGetErrorName(err));
}

std::vector<float> mma(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b,
                       const std::vector<float>& c, bool bf16) {
  if (a.size() != 4 * kWarpSize || b.size() != 2 * kWarpSize || c.size() != 4 * kWarpSize)
    throw std::invalid_argument("a: 128 registers, b: 64, c: 128 floats");
  std::vector<float> d(4 * kWarpSize, -1.0f);
  if (bf16) {
    LAUNCH(dim3(1), dim3(kWarpSize), 0, nullptr, mma_kernel<__nv_bfloat16>)(a.data(), b.data(),
                                                                           c.data(), d.data());
  } else {
    LAUNCH(dim3(1), dim3(kWarpSize), 0, nullptr, mma_kernel<__half>)(a.data(), b.data(), c.data(),
                                                                    d.data());
  }
  check(cudaGetLastError());
  return d;
}

std::vector<uint32_t> ldmatrix(const std::vector<uint16_t>& values, const std::vector<int>& rows,
                               int matrices, bool trans) {
  if (rows.size() != kWarpSize || values.size() % 8 != 0)
    throw std::invalid_argument("rows: one per lane; values: whole 8-element rows");
  std::vector<uint32_t> out(matrices * kWarpSize, 0xdeadbeefu);
  const int words = static_cast<int>(values.size());
  const size_t smem = values.size() * 2;
  const dim3 one(1), warp(kWarpSize);
#define GPT2FAST_LDMATRIX(M, TR)                                                  \
  if (matrices == M && trans == TR)                                               \
    LAUNCH(one, warp, smem, nullptr, ldmatrix_kernel<M, TR>)(values.data(), words, \
                                                            rows.data(), out.data());
  GPT2FAST_LDMATRIX(1, false)
  GPT2FAST_LDMATRIX(1, true)
  GPT2FAST_LDMATRIX(2, false)
  GPT2FAST_LDMATRIX(2, true)
  GPT2FAST_LDMATRIX(4, false)
  GPT2FAST_LDMATRIX(4, true)
#undef GPT2FAST_LDMATRIX
  check(cudaGetLastError());
  return out;
}

std::vector<float> tile(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b,
                        bool bf16) {
  if (a.size() != 256 || b.size() != 128) throw std::invalid_argument("a: 16x16, b: 8x16");
  std::vector<float> d(128, -1.0f);
  const size_t smem = (256 + 128) * 2;
  if (bf16) {
    LAUNCH(dim3(1), dim3(kWarpSize), smem, nullptr, tile_kernel<__nv_bfloat16>)(a.data(), b.data(),
                                                                               d.data());
  } else {
    LAUNCH(dim3(1), dim3(kWarpSize), smem, nullptr, tile_kernel<__half>)(a.data(), b.data(),
                                                                        d.data());
  }
  check(cudaGetLastError());
  return d;
}

py::tuple cp_async(const std::vector<unsigned char>& src, const std::vector<int>& src_bytes) {
  const int n = static_cast<int>(src_bytes.size());
  if (src.size() != 32u * n) throw std::invalid_argument("src: 32 bytes per thread");
  alignas(16) static unsigned char buffer[32 * 1024];
  std::copy(src.begin(), src.end(), buffer);
  std::vector<unsigned char> after1(32 * n, 0), after0(32 * n, 0);
  LAUNCH(dim3(1), dim3(n), 32 * n, nullptr, cp_async_kernel)(buffer, src_bytes.data(),
                                                            after1.data(), after0.data());
  check(cudaGetLastError());
  return py::make_tuple(after1, after0);
}

std::vector<unsigned char> cp_async_neighbour(int threads, bool with_sync) {
  alignas(16) static unsigned char buffer[16 * 1024];
  for (int i = 0; i < 16 * threads; ++i) buffer[i] = static_cast<unsigned char>(i * 7 + 1);
  std::vector<unsigned char> out(16 * threads, 0);
  LAUNCH(dim3(1), dim3(threads), 16 * threads, nullptr, cp_async_neighbour_kernel)(
      buffer, out.data(), with_sync);
  check(cudaGetLastError());
  return out;
}

void misuse(int kind) {
  alignas(16) static unsigned char buffer[64 * 16];
  const int threads = kind == 2 ? 16 : kWarpSize;
  LAUNCH(dim3(1), dim3(threads), 16 * threads, nullptr, misuse_kernel)(buffer, kind);
  check(cudaGetLastError());
}

}  // namespace

PYBIND11_MODULE(GPT2FAST_MODULE_NAME, m) {
  m.def("set_order", &emu::set_order);
  m.def("mma", &mma, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("bf16"));
  m.def("ldmatrix", &ldmatrix, py::arg("values"), py::arg("rows"), py::arg("matrices"),
        py::arg("trans"));
  m.def("tile", &tile, py::arg("a"), py::arg("b"), py::arg("bf16"));
  m.def("cp_async", &cp_async, py::arg("src"), py::arg("src_bytes"));
  m.def("cp_async_neighbour", &cp_async_neighbour, py::arg("threads"), py::arg("with_sync"));
  m.def("misuse", &misuse, py::arg("kind"));
}
