// emu_tests.cpp — small kernels that test the CUDA emulator itself (tests/test_cuda_emu.py).
// Built only emulated (gpt2fast.ops.cuda_build.build_emulated); each function owns its memory and
// returns plain lists, so a subprocess can run one without torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"

namespace py = pybind11;
using gpt2fast::kFullMask;
using gpt2fast::kWarpSize;

// ---- kernels -----------------------------------------------------------------------------------

// Block sum whose partials live in dynamic shared memory; `with_sync` false drops the barrier
// between writing the partials and reading them (the bug the thread orders must expose).
__global__ void block_sum_kernel(const float* x, float* out, bool with_sync) {
  float* partials = reinterpret_cast<float*>(dyn_smem);  // [num_warps]
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  float v = gpt2fast::warp_sum(x[threadIdx.x]);
  if (lane == 0) partials[warp] = v;
  if (with_sync) __syncthreads();
  v = gpt2fast::warp_sum(lane < static_cast<int>(blockDim.x / kWarpSize) ? partials[lane] : 0.0f);
  out[threadIdx.x] = v;
}

// The first warp returns early; the others wait at a barrier it never reaches.
__global__ void early_return_kernel(float* out) {
  if (threadIdx.x < kWarpSize) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Every thread reads one element past its own: the last one reads past the end of x.
__global__ void read_past_end_kernel(const float* x, float* out) {
  out[threadIdx.x] = x[threadIdx.x + 1];
}

// Reads `offset` words into a launch's dynamic shared memory of one word per thread.
__global__ void smem_read_kernel(unsigned* out, int offset) {
  out[threadIdx.x] = reinterpret_cast<const unsigned*>(dyn_smem)[threadIdx.x + offset];
}

// A 16-byte load from a pointer one float past a 16-byte boundary (the bug can_vectorize prevents).
__global__ void misaligned_vector_kernel(const float* x, float* out) {
  float v[4];
  gpt2fast::load_floats<float, 4>(x + 1, v);
  out[threadIdx.x] = v[0];
}

// Each lane reports what every warp collective gives it (out: [kinds, threads]).
__global__ void warp_ops_kernel(int* out, int width) {
  const int n = blockDim.x;
  const int t = threadIdx.x;
  const int lane = t % kWarpSize;
  const int v = 100 * t + 7;
  out[0 * n + t] = __shfl_sync(kFullMask, v, 3, width);
  out[1 * n + t] = __shfl_xor_sync(kFullMask, v, 5 % width, width);
  out[2 * n + t] = __shfl_up_sync(kFullMask, v, 1, width);
  out[3 * n + t] = __shfl_down_sync(kFullMask, v, 2, width);
  out[4 * n + t] = static_cast<int>(__ballot_sync(kFullMask, lane % 3 == 0));
  out[5 * n + t] = __any_sync(kFullMask, t == 40);
  out[6 * n + t] = __all_sync(kFullMask, lane < 31);
  out[7 * n + t] = __syncthreads_count(t % 4 == 0);
  __syncwarp();
  out[8 * n + t] =
      static_cast<int>(__float_as_uint(__shfl_sync(kFullMask, static_cast<float>(t) + 0.5f, 0)));
}

__global__ void partial_mask_kernel(int* out) { out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 0); }

// Ticket = the order in which threads first ran (one counter per block).
__global__ void ticket_kernel(int* counter, int* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(counter + blockIdx.x, 1);
}

// Reads dynamic shared memory nobody wrote: the emulator's 0xFF poison.
__global__ void poison_kernel(unsigned* out) {
  out[threadIdx.x] = reinterpret_cast<const unsigned*>(dyn_smem)[threadIdx.x];
}

// Recurses until the fiber's stack runs into its guard page (SIGSEGV, not a silent overwrite of
// the neighbouring fiber's stack).
__device__ __attribute__((noinline)) int recurse(int depth) {
  volatile char pad[256];
  pad[0] = static_cast<char>(depth);
  return depth == 0 ? 0 : recurse(depth - 1) + pad[0];
}
__global__ void stack_overflow_kernel(int* out, int depth) { out[threadIdx.x] = recurse(depth); }

// Linear index of every (block, thread) of a 3-D launch, with atomics across blocks.
__global__ void index_kernel(int* out, float* sum, int* max) {
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[block * threads + thread] = block * threads + thread;
  atomicAdd(sum, 1.0f);
  atomicMax(max, block * threads + thread);
}

// ---- host entry points -----------------------------------------------------------------------

namespace {

void check(cudaError_t err) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("launch failed: ") + cudaGetErrorName(err));
}

std::vector<float> block_sum(const std::vector<float>& x, bool with_sync) {
  std::vector<float> out(x.size(), -1.0f);
  const int threads = static_cast<int>(x.size());
  LAUNCH(dim3(1), dim3(threads), threads / kWarpSize * sizeof(float), nullptr, block_sum_kernel)(
      x.data(), out.data(), with_sync);
  check(cudaGetLastError());
  return out;
}

void early_return(int threads) {
  std::vector<float> out(threads);
  LAUNCH(dim3(1), dim3(threads), 0, nullptr, early_return_kernel)(out.data());
  check(cudaGetLastError());
}

std::vector<float> read_past_end(int threads) {
  auto x =
      std::make_unique<float[]>(threads);  // exactly `threads` elements: ASan's redzone follows
  for (int i = 0; i < threads; ++i) x[i] = static_cast<float>(i);
  std::vector<float> out(threads);
  LAUNCH(dim3(1), dim3(threads), 0, nullptr, read_past_end_kernel)(x.get(), out.data());
  check(cudaGetLastError());
  return out;
}

std::vector<unsigned> smem_read(int offset) {
  std::vector<unsigned> out(kWarpSize);
  LAUNCH(dim3(1), dim3(kWarpSize), kWarpSize * sizeof(unsigned), nullptr, smem_read_kernel)(
      out.data(), offset);
  check(cudaGetLastError());
  return out;
}

void misaligned_vector_load() {
  std::vector<float> x(8 * kWarpSize, 1.0f), out(kWarpSize);
  LAUNCH(dim3(1), dim3(kWarpSize), 0, nullptr, misaligned_vector_kernel)(x.data(), out.data());
  check(cudaGetLastError());
}

std::vector<int> warp_ops(int threads, int width) {
  std::vector<int> out(9 * threads, -1);
  LAUNCH(dim3(1), dim3(threads), 0, nullptr, warp_ops_kernel)(out.data(), width);
  check(cudaGetLastError());
  return out;
}

void partial_mask() {
  std::vector<int> out(kWarpSize);
  LAUNCH(dim3(1), dim3(kWarpSize), 0, nullptr, partial_mask_kernel)(out.data());
  check(cudaGetLastError());
}

std::vector<int> tickets(int blocks, int threads) {
  std::vector<int> counters(blocks, 0), out(blocks * threads, -1);
  LAUNCH(dim3(blocks), dim3(threads), 0, nullptr, ticket_kernel)(counters.data(), out.data());
  check(cudaGetLastError());
  return out;
}

std::vector<unsigned> poison(int threads) {
  std::vector<unsigned> out(threads, 0);
  LAUNCH(dim3(1), dim3(threads), threads * sizeof(unsigned), nullptr, poison_kernel)(out.data());
  check(cudaGetLastError());
  return out;
}

py::tuple indices(std::vector<unsigned> grid, std::vector<unsigned> block) {
  const int total = static_cast<int>(grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2]);
  std::vector<int> out(total, -1);
  float sum = 0.0f;
  int max = -1;
  LAUNCH(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), 0, nullptr,
         index_kernel)(out.data(), &sum, &max);
  check(cudaGetLastError());
  return py::make_tuple(out, sum, max);
}

void stack_overflow(int depth) {
  std::vector<int> out(kWarpSize);
  LAUNCH(dim3(1), dim3(kWarpSize), 0, nullptr, stack_overflow_kernel)(out.data(), depth);
  check(cudaGetLastError());
}

std::string launch_error(unsigned threads, std::size_t smem) {
  std::vector<float> out(threads > 0 && threads <= 1024 ? threads : 1);
  LAUNCH(dim3(1), dim3(threads), smem, nullptr, early_return_kernel)(out.data());
  return cudaGetErrorName(cudaGetLastError());
}

}  // namespace

PYBIND11_MODULE(GPT2FAST_MODULE_NAME, m) {
  m.def("set_order", &emu::set_order);
  m.def("set_seed", &emu::set_seed);
  m.def("block_sum", &block_sum, py::arg("x"), py::arg("with_sync"));
  m.def("early_return", &early_return, py::arg("threads"));
  m.def("read_past_end", &read_past_end, py::arg("threads"));
  m.def("smem_read", &smem_read, py::arg("offset"));
  m.def("misaligned_vector_load", &misaligned_vector_load);
  m.def("warp_ops", &warp_ops, py::arg("threads"), py::arg("width"));
  m.def("partial_mask", &partial_mask);
  m.def("tickets", &tickets, py::arg("blocks"), py::arg("threads"));
  m.def("poison", &poison, py::arg("threads"));
  m.def("indices", &indices, py::arg("grid"), py::arg("block"));
  m.def("stack_overflow", &stack_overflow, py::arg("depth"));
  m.def("launch_error", &launch_error, py::arg("threads"), py::arg("smem"));
}
