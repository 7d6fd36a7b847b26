// gpt2fast._cpu: the native CPU kernels, bound with pybind11. Pointers and sizes in (integers: the
// Python wrappers in gpt2fast/ops/cpu.py pass tensor.data_ptr() after checking every tensor); the GIL
// is released while a kernel runs. The instruction set is chosen once at import (cpuid), or forced
// with select_isa / GPT2FAST_CPU_ISA (the wrappers read the env var).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "common.h"
#include "decode_plan.h"
#include "lm_head.h"
#include "linear.h"

namespace py = pybind11;

namespace gpt2fast_cpu {
Kernels portable_kernels();
#if defined(__x86_64__)
Kernels avx2_kernels();
Kernels avx512_kernels();
#endif
}  // namespace gpt2fast_cpu

namespace {

using namespace gpt2fast_cpu;

// Instruction sets this machine runs, best first.
std::vector<std::string> supported_isas() {
  std::vector<std::string> isas;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16"))
    isas.push_back("avx512");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("avx2");
#endif
  isas.push_back("portable");
  return isas;
}

Kernels kernels_for(const std::string& name) {
#if defined(__x86_64__)
  if (name == "avx512") return avx512_kernels();
  if (name == "avx2") return avx2_kernels();
#endif
  return portable_kernels();
}

Kernels g_kernels = kernels_for(supported_isas().front());

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void select_isa(const std::string& name) {
  for (const auto& isa : supported_isas()) {
    if (isa == name) {
      g_kernels = kernels_for(name);
      return;
    }
  }
  throw std::invalid_argument("instruction set '" + name + "' is not available on this CPU");
}

void linear_binding(int64_t M, int64_t N, int64_t K, uintptr_t x, int64_t ldx, int x_dtype, uintptr_t ln_w,
                    uintptr_t ln_b, float eps, uintptr_t w, int w_dtype, uintptr_t w_scale, uintptr_t bias, bool gelu,
                    uintptr_t residual, int64_t ldr, uintptr_t out, int64_t ldo, int out_dtype, int threads) {
  const LinearArgs args{M, N, K, ptr<const void>(x), ldx, x_dtype, ptr<const void>(ln_w), ptr<const void>(ln_b), eps,
                        Weight{ptr<const void>(w), w_dtype, ptr<const float>(w_scale)}, ptr<const void>(bias), gelu,
                        ptr<const void>(residual), ldr, ptr<void>(out), ldo, out_dtype, threads};
  const Kernels kernels = g_kernels;  // by value: a select_isa from another thread cannot change it midway
  py::gil_scoped_release release;
  linear(kernels, args);
}

void lm_head_pick_binding(int64_t M, int64_t K, uintptr_t x, int x_dtype, uintptr_t wte, int w_dtype,
                          uintptr_t w_scale, int64_t V, uintptr_t temperature, uintptr_t seeds, float greedy_below,
                          int threads, uintptr_t ids) {
  const Kernels kernels = g_kernels;
  py::gil_scoped_release release;
  lm_head_pick(kernels, ptr<const void>(x), M, K, x_dtype, Weight{ptr<const void>(wte), w_dtype, ptr<const float>(w_scale)},
               V, ptr<const float>(temperature), ptr<const int64_t>(seeds), greedy_below, threads, ptr<int64_t>(ids));
}

void decode_attention_binding(int64_t S, int64_t H, int64_t D, int64_t BS, uintptr_t q, int64_t q_tok, int64_t q_head,
                              uintptr_t k, int64_t k_tok, int64_t k_head, uintptr_t v, int64_t v_tok, int64_t v_head,
                              uintptr_t k_cache, uintptr_t v_cache, int dtype, uintptr_t block_tables,
                              int64_t bt_stride, uintptr_t seq_lens, uintptr_t slot_mapping, float scale,
                              int64_t bt_width, int64_t num_blocks, uintptr_t out, int threads) {
  check_paged(S, ptr<const int32_t>(block_tables), bt_stride, bt_width, ptr<const int32_t>(seq_lens),
              ptr<const int64_t>(slot_mapping), num_blocks, BS);
  const DecodeAttentionArgs args{S, H, D, BS, ptr<const void>(q), q_tok, q_head, ptr<const void>(k), k_tok, k_head,
                                 ptr<const void>(v), v_tok, v_head, ptr<void>(k_cache), ptr<void>(v_cache), dtype,
                                 ptr<const int32_t>(block_tables), bt_stride, ptr<const int32_t>(seq_lens),
                                 ptr<const int64_t>(slot_mapping), scale, ptr<void>(out), threads};
  const Kernels kernels = g_kernels;
  py::gil_scoped_release release;
  decode_attention(kernels, args);
}

Weight weight_of(uintptr_t data, int dtype, uintptr_t scale) {
  return Weight{ptr<const void>(data), dtype, ptr<const float>(scale)};
}

}  // namespace

#ifndef GPT2FAST_CPU_MODULE
#define GPT2FAST_CPU_MODULE _cpu  // the sanitized test build is named _cpu_asan (gpt2fast/ops/cpu_build.py)
#endif

PYBIND11_MODULE(GPT2FAST_CPU_MODULE, m) {
  m.doc() = "gpt2fast's native CPU kernels (see gpt2fast/ops/cpu.py for the typed wrappers)";
  m.def("supported_isas", &supported_isas, "instruction sets this CPU runs, best first");
  m.def("isa", [] { return std::string(g_kernels.isa); }, "the instruction set in use");
  m.def("int8_method", [] { return std::string(g_kernels.int8_method); }, "'vnni' or 'dequant'");
  m.def("select_isa", &select_isa, "use this instruction set's kernels from now on");
  m.def("linear", &linear_binding);
  m.def("lm_head_pick", &lm_head_pick_binding);
  m.def("decode_attention", &decode_attention_binding);
  py::class_<DecodePlan>(m, "DecodePlan")
      .def(py::init<int64_t, int64_t, int64_t, int, float>())
      .def("add_layer",
           [](DecodePlan& plan, uintptr_t ln1_w, uintptr_t ln1_b, uintptr_t qkv, int qkv_dtype, uintptr_t qkv_scale,
              uintptr_t qkv_b, uintptr_t proj, int proj_dtype, uintptr_t proj_scale, uintptr_t proj_b, uintptr_t ln2_w,
              uintptr_t ln2_b, uintptr_t fc, int fc_dtype, uintptr_t fc_scale, uintptr_t fc_b, uintptr_t out,
              int out_dtype, uintptr_t out_scale, uintptr_t out_b, float attn_scale) {
             plan.add_layer(LayerPlan{ptr<const void>(ln1_w), ptr<const void>(ln1_b), weight_of(qkv, qkv_dtype, qkv_scale),
                                      ptr<const void>(qkv_b), weight_of(proj, proj_dtype, proj_scale),
                                      ptr<const void>(proj_b), ptr<const void>(ln2_w), ptr<const void>(ln2_b),
                                      weight_of(fc, fc_dtype, fc_scale), ptr<const void>(fc_b),
                                      weight_of(out, out_dtype, out_scale), ptr<const void>(out_b), attn_scale});
           })
      .def("num_layers", &DecodePlan::num_layers)
      .def("run", [](const DecodePlan& plan, uintptr_t residual, int64_t T, const std::vector<uintptr_t>& caches,
                     int64_t BS, uintptr_t block_tables, int64_t bt_stride, int64_t bt_width, int64_t num_blocks,
                     uintptr_t seq_lens, uintptr_t slot_mapping, int threads) {
        if (caches.size() != size_t(2 * plan.num_layers())) throw std::invalid_argument("one K and one V cache per layer");
        check_paged(T, ptr<const int32_t>(block_tables), bt_stride, bt_width, ptr<const int32_t>(seq_lens),
                    ptr<const int64_t>(slot_mapping), num_blocks, BS);
        const Kernels kernels = g_kernels;
        py::gil_scoped_release release;
        plan.run(kernels, ptr<void>(residual), T, caches, BS, ptr<const int32_t>(block_tables), bt_stride,
                 ptr<const int32_t>(seq_lens), ptr<const int64_t>(slot_mapping), threads);
      });
}
