// bindings.cpp — the Python module, and nothing else: pointers arrive as integers
// (tensor.data_ptr()), then sizes, a dtype code and a stream (cudaStream_t as an integer).
// gpt2fast/ops/cuda.py checks every tensor before a pointer gets here.
//
// Built twice from this same file:
//   nvcc -x cu ... -DGPT2FAST_MODULE_NAME=_C           -> gpt2fast._C (sm_80, sm_90; setup.py)
//   g++ -include emu/cuda_emu.h -DGPT2FAST_MODULE_NAME=_C_emu -> the CPU test module
//                                                        (gpt2fast/ops/cuda_build.py)
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/layer_norm.cuh"
#include "kernels/sampling.cuh"

#ifndef GPT2FAST_MODULE_NAME
#define GPT2FAST_MODULE_NAME _C
#endif

namespace py = pybind11;
using gpt2fast::DType;

namespace {

void check(cudaError_t err, const char* op) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(op) + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

DType dtype_of(int code) {
  if (code < 0 || code > static_cast<int>(DType::kBFloat16)) {
    throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

template <typename T = void>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t stream_of(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace

PYBIND11_MODULE(GPT2FAST_MODULE_NAME, m) {
  m.doc() = "gpt2fast CUDA kernels: raw-pointer entry points (use gpt2fast.ops.cuda)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(DType::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(DType::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(DType::kBFloat16);
  m.attr("LAYER_NORM_MAX_WIDTH") = gpt2fast::kLayerNormMaxWidth;

  m.def(
      "layer_norm",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t out,
         int64_t rows, int width, int64_t x_stride, float eps, int dtype, std::uintptr_t stream) {
        check(gpt2fast::layer_norm(ptr(x), ptr(weight), ptr(bias), ptr(out), rows, width, x_stride,
                                   eps, dtype_of(dtype), stream_of(stream)),
              "layer_norm");
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("rows"),
      py::arg("width"), py::arg("x_stride"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "out[r] = LayerNorm(x[r]); out contiguous (rows, width)");

  m.def(
      "add_layer_norm",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t bias,
         std::uintptr_t out, int64_t rows, int width, int64_t x_stride, int64_t res_stride,
         float eps, int dtype, std::uintptr_t stream) {
        check(gpt2fast::add_layer_norm(ptr(x), ptr(residual), ptr(weight), ptr(bias), ptr(out),
                                       rows, width, x_stride, res_stride, eps, dtype_of(dtype),
                                       stream_of(stream)),
              "add_layer_norm");
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("out"),
      py::arg("rows"), py::arg("width"), py::arg("x_stride"), py::arg("res_stride"), py::arg("eps"),
      py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "residual[r] += x[r]; out[r] = LayerNorm(residual[r])");

  m.attr("SAMPLING_GREEDY_BELOW") = gpt2fast::kGreedyBelow;
  m.def(
      "sample_top_k_top_p",
      [](std::uintptr_t logits, std::uintptr_t temperature, std::uintptr_t top_k,
         std::uintptr_t top_p, std::uintptr_t min_p, std::uintptr_t seeds, std::uintptr_t out,
         int64_t rows, int vocab, std::uintptr_t stream) {
        check(gpt2fast::sample_top_k_top_p(
                  ptr<const float>(logits), ptr<const float>(temperature),
                  ptr<const int32_t>(top_k), ptr<const float>(top_p), ptr<const float>(min_p),
                  ptr<const int64_t>(seeds), ptr<int64_t>(out), rows, vocab, stream_of(stream)),
              "sample_top_k_top_p");
      },
      py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
      py::arg("min_p"), py::arg("seeds"), py::arg("out"), py::arg("rows"), py::arg("vocab"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "out[r] = the token sample_batch draws for fp32 logits row r (temperature, top-k, top-p, "
      "min-p; min_p 0 = off for every row)");

#if defined(CUDA_EMU)
  m.attr("EMULATED") = true;
  m.def(
      "set_order", &emu::set_order, py::arg("order"),
      "Thread order of later launches: 0 forward, 1 reverse, 2 shuffled; -1 reads EMU_ORDER again");
  m.def("order", &emu::order, "The thread order launches use now");
  m.def("set_seed", &emu::set_seed, py::arg("seed"), "Seed of the shuffled order (EMU_ORDER=2)");
#else
  m.attr("EMULATED") = false;
#endif
}
