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

#include "kernels/attention.cuh"
#include "kernels/attention_prefill.cuh"
#include "kernels/embed.cuh"
#include "kernels/gemm.cuh"
#include "kernels/layer_norm.cuh"
#include "kernels/linear.cuh"
#include "kernels/lm_head.cuh"
#include "kernels/sampling.cuh"
#include "kernels/write_kv.cuh"

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

// The LM head's token choice, fused into the decode GEMV (lm_head_choice) or into the GEMM's
// epilogue (gemm_choice): the same operands, so one binding shape for both.
using ChooseFn = cudaError_t (*)(const void*, const void*, const float*, const float*,
                                 const int64_t*, float*, int*, int*, int64_t*, int64_t, int64_t,
                                 int64_t, int64_t, DType, cudaStream_t);

template <ChooseFn kChoose>
void def_choice(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [name](std::uintptr_t x, std::uintptr_t wte, std::uintptr_t temperature,
             std::uintptr_t seeds, std::uintptr_t part_score, std::uintptr_t part_token,
             std::uintptr_t counters, std::uintptr_t out, int64_t rows, int64_t vocab,
             int64_t width, int64_t x_stride, int dtype, std::uintptr_t stream,
             std::uintptr_t w_scale) {
        check(kChoose(ptr(x), ptr(wte), ptr<const float>(w_scale), ptr<const float>(temperature),
                      ptr<const int64_t>(seeds), ptr<float>(part_score), ptr<int>(part_token),
                      ptr<int>(counters), ptr<int64_t>(out), rows, vocab, width, x_stride,
                      dtype_of(dtype), stream_of(stream)),
              name);
      },
      py::arg("x"), py::arg("wte"), py::arg("temperature"), py::arg("seeds"),
      py::arg("part_score"), py::arg("part_token"), py::arg("counters"), py::arg("out"),
      py::arg("rows"), py::arg("vocab"), py::arg("width"), py::arg("x_stride"), py::arg("dtype"),
      py::arg("stream"), py::arg("w_scale") = 0, py::call_guard<py::gil_scoped_release>(), doc);
}

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

  m.attr("ATTENTION_HEAD_DIM") = gpt2fast::kAttentionHeadDim;
  m.def(
      "write_kv",
      [](std::uintptr_t k, std::uintptr_t v, std::uintptr_t k_cache, std::uintptr_t v_cache,
         std::uintptr_t slots, int64_t tokens, int n_head, int head_dim, int block_size,
         int64_t k_tok, int64_t k_head, int64_t v_tok, int64_t v_head, int64_t c_block,
         int64_t c_head, int64_t c_slot, int src_dtype, int cache_dtype, std::uintptr_t stream) {
        check(gpt2fast::write_kv(ptr(k), ptr(v), ptr(k_cache), ptr(v_cache),
                                 ptr<const int64_t>(slots), tokens, n_head, head_dim, block_size,
                                 k_tok, k_head, v_tok, v_head, c_block, c_head, c_slot,
                                 dtype_of(src_dtype), dtype_of(cache_dtype), stream_of(stream)),
              "write_kv");
      },
      py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
      py::arg("tokens"), py::arg("n_head"), py::arg("head_dim"), py::arg("block_size"),
      py::arg("k_tok"), py::arg("k_head"), py::arg("v_tok"), py::arg("v_head"), py::arg("c_block"),
      py::arg("c_head"), py::arg("c_slot"), py::arg("src_dtype"), py::arg("cache_dtype"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "cache[slot / BS, h, slot % BS, :] = k[t, h, :] (and v) for every t with slot >= 0");

  m.def(
      "attention_decode",
      [](std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t k_new,
         std::uintptr_t v_new, std::uintptr_t slots, std::uintptr_t cu_seqlens,
         std::uintptr_t seq_lens, std::uintptr_t block_tables, std::uintptr_t part_ml,
         std::uintptr_t part_acc, std::uintptr_t counters, std::uintptr_t out, int num_seqs,
         int n_head, int head_dim, int block_size, int max_blocks, int num_splits,
         int pages_per_split, int64_t q_tok, int64_t q_head, int64_t kv_tok, int64_t kv_head,
         float scale, int dtype, std::uintptr_t stream) {
        const gpt2fast::AttentionDecodeArgs args{
            ptr(q), ptr(k_cache), ptr(v_cache), ptr(k_new), ptr(v_new), ptr<const int64_t>(slots),
            ptr<const int>(cu_seqlens), ptr<const int>(seq_lens), ptr<const int>(block_tables),
            ptr<float>(part_ml), ptr<float>(part_acc), ptr<int>(counters), ptr(out), num_seqs,
            n_head, head_dim, block_size, max_blocks, num_splits, pages_per_split, q_tok, q_head,
            kv_tok, kv_head, scale};
        check(gpt2fast::attention_decode(args, dtype_of(dtype), stream_of(stream)),
              "attention_decode");
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_new"), py::arg("v_new"),
      py::arg("slots"), py::arg("cu_seqlens"), py::arg("seq_lens"), py::arg("block_tables"),
      py::arg("part_ml"), py::arg("part_acc"), py::arg("counters"), py::arg("out"),
      py::arg("num_seqs"), py::arg("n_head"), py::arg("head_dim"), py::arg("block_size"),
      py::arg("max_blocks"), py::arg("num_splits"), py::arg("pages_per_split"), py::arg("q_tok"),
      py::arg("q_head"), py::arg("kv_tok"), py::arg("kv_head"), py::arg("scale"), py::arg("dtype"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "paged decode attention, split-K over the block table merged in the same launch; with "
      "k_new/v_new (0: none) and slots, the step's K/V stored and attended (write_kv_attention)");

  m.def(
      "attention_prefill",
      [](std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t k_new,
         std::uintptr_t v_new, std::uintptr_t slots, std::uintptr_t cu_seqlens,
         std::uintptr_t seq_lens, std::uintptr_t block_tables, std::uintptr_t out,
         int64_t num_seqs, int64_t max_query_len, int64_t n_head, int64_t head_dim,
         int64_t block_size, int64_t max_blocks, int64_t q_tok, int64_t q_head, int64_t kv_tok,
         int64_t kv_head, float scale, int dtype, std::uintptr_t stream) {
        check(gpt2fast::attention_prefill(
                  ptr(q), ptr(k_cache), ptr(v_cache), ptr(k_new), ptr(v_new),
                  ptr<const int64_t>(slots), ptr<const int>(cu_seqlens), ptr<const int>(seq_lens),
                  ptr<const int>(block_tables), ptr(out), num_seqs, max_query_len, n_head,
                  head_dim, block_size, max_blocks, q_tok, q_head, kv_tok, kv_head, scale,
                  dtype_of(dtype), stream_of(stream)),
              "attention_prefill");
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_new"), py::arg("v_new"),
      py::arg("slots"), py::arg("cu_seqlens"), py::arg("seq_lens"), py::arg("block_tables"),
      py::arg("out"), py::arg("num_seqs"), py::arg("max_query_len"), py::arg("n_head"),
      py::arg("head_dim"), py::arg("block_size"), py::arg("max_blocks"), py::arg("q_tok"),
      py::arg("q_head"), py::arg("kv_tok"), py::arg("kv_head"), py::arg("scale"),
      py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "causal flash attention of prefill chunks over the paged cache (fp16/bf16, tensor cores); "
      "with k_new/v_new (0: none) and slots, the chunk's K/V stored and attended");

  m.def("lm_head_blocks", &gpt2fast::lm_head_blocks, py::arg("vocab"),
        "blocks of the decode LM head (candidates per row in its workspaces)");
  def_choice<gpt2fast::lm_head_choice>(
      m, "lm_head_choice",
      "out[t] = the LM head's token for row t (argmax, or Gumbel-max at temperature[t]), rows <= "
      "LINEAR_MAX_ROWS, the logits never written; w_scale: wte is int8, row n scaled by "
      "w_scale[n]");
  m.attr("LINEAR_MAX_ROWS") = gpt2fast::kGemvMaxRows;
  m.def("gemv_warps", &gpt2fast::gemv_warps, py::arg("num_vecs"),
        "warps per block of the decode GEMV for rows of num_vecs vectors (3 or 4)");
  m.def(
      "linear",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t residual,
         std::uintptr_t out, int64_t rows, int64_t n_out, int64_t k_in, int64_t x_stride,
         int64_t res_stride, bool gelu, int dtype, std::uintptr_t stream, std::uintptr_t w_scale) {
        check(gpt2fast::linear(ptr(x), ptr(weight), ptr<const float>(w_scale), ptr(bias),
                               ptr(residual), nullptr, nullptr, ptr(out), rows, n_out, k_in,
                               x_stride, res_stride, gelu, 0.0f, dtype_of(dtype),
                               stream_of(stream)),
              "linear");
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("out"),
      py::arg("rows"), py::arg("n_out"), py::arg("k_in"), py::arg("x_stride"),
      py::arg("res_stride"), py::arg("gelu"), py::arg("dtype"), py::arg("stream"),
      py::arg("w_scale") = 0, py::call_guard<py::gil_scoped_release>(),
      "out[t] = [gelu](x[t] @ weight.T + bias) [+ residual[t]], rows <= LINEAR_MAX_ROWS; bias and "
      "residual 0 when absent; w_scale: weight is int8, its row n scaled by w_scale[n]");
  m.def(
      "gemm",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t residual,
         std::uintptr_t out, int64_t rows, int64_t n_out, int64_t k_in, int64_t x_stride,
         int64_t res_stride, bool gelu, bool fp32_out, int dtype, std::uintptr_t stream,
         std::uintptr_t w_scale) {
        check(gpt2fast::gemm(ptr(x), ptr(weight), ptr<const float>(w_scale), ptr(bias),
                             ptr(residual), ptr(out), rows, n_out, k_in, x_stride, res_stride,
                             gelu, fp32_out, dtype_of(dtype), stream_of(stream)),
              "gemm");
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("out"),
      py::arg("rows"), py::arg("n_out"), py::arg("k_in"), py::arg("x_stride"),
      py::arg("res_stride"), py::arg("gelu"), py::arg("fp32_out"), py::arg("dtype"),
      py::arg("stream"), py::arg("w_scale") = 0, py::call_guard<py::gil_scoped_release>(),
      "out[t] = [gelu](x[t] @ weight.T + bias) [+ residual[t]] for any rows (tensor cores for "
      "fp16/bf16); fp32_out: fp32 logits x @ weight.T (no bias, GELU or residual)");
  m.def(
      "gemm_grid",
      [](int rows, int n_out, int dtype) {
        const dim3 grid = gpt2fast::gemm_grid(rows, n_out, dtype_of(dtype));
        return py::make_tuple(grid.x, grid.y);
      },
      py::arg("rows"), py::arg("n_out"), py::arg("dtype"),
      "(column tiles, row tiles) of the GEMM's grid: gemm_choice's workspace and counter sizes");
  def_choice<gpt2fast::gemm_choice>(
      m, "gemm_choice",
      "the LM head GEMM with argmax / Gumbel-max as its epilogue, any rows; the logits are never "
      "stored");
  m.def("set_gemm_tile", &gpt2fast::set_gemm_tile, py::arg("tile"),
        "pin the GEMM's tile size (64 or 128) for tests, 0: chosen by the grid size; False (and no "
        "change) for any other value");
  m.def(
      "ln_linear",
      [](std::uintptr_t x, std::uintptr_t ln_weight, std::uintptr_t ln_bias, float eps,
         std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t out, int64_t rows,
         int64_t n_out, int64_t k_in, int64_t x_stride, bool gelu, int dtype,
         std::uintptr_t stream, std::uintptr_t w_scale) {
        check(gpt2fast::linear(ptr(x), ptr(weight), ptr<const float>(w_scale), ptr(bias), nullptr,
                               ptr(ln_weight), ptr(ln_bias), ptr(out), rows, n_out, k_in,
                               x_stride, n_out, gelu, eps, dtype_of(dtype), stream_of(stream)),
              "ln_linear");
      },
      py::arg("x"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("eps"), py::arg("weight"),
      py::arg("bias"), py::arg("out"), py::arg("rows"), py::arg("n_out"), py::arg("k_in"),
      py::arg("x_stride"), py::arg("gelu"), py::arg("dtype"), py::arg("stream"),
      py::arg("w_scale") = 0, py::call_guard<py::gil_scoped_release>(),
      "out[t] = [gelu](LayerNorm(x[t]) @ weight.T + bias) in one launch, rows <= LINEAR_MAX_ROWS; "
      "bias 0 when absent");

  m.def(
      "embed",
      [](std::uintptr_t ids, std::uintptr_t positions, std::uintptr_t wte, std::uintptr_t wpe,
         std::uintptr_t out, int64_t tokens, int64_t ids_stride, int64_t pos_stride,
         int index_bytes, int64_t vocab, int64_t n_positions, int64_t width, int64_t wte_stride,
         int64_t wpe_stride, int dtype, std::uintptr_t stream, std::uintptr_t w_scale) {
        check(gpt2fast::embed(ptr(ids), ptr(positions), ptr(wte), ptr<const float>(w_scale),
                              ptr(wpe), ptr(out), tokens, ids_stride, pos_stride, index_bytes,
                              vocab, n_positions, width, wte_stride, wpe_stride, dtype_of(dtype),
                              stream_of(stream)),
              "embed");
      },
      py::arg("ids"), py::arg("positions"), py::arg("wte"), py::arg("wpe"), py::arg("out"),
      py::arg("tokens"), py::arg("ids_stride"), py::arg("pos_stride"), py::arg("index_bytes"),
      py::arg("vocab"), py::arg("n_positions"), py::arg("width"), py::arg("wte_stride"),
      py::arg("wpe_stride"), py::arg("dtype"), py::arg("stream"), py::arg("w_scale") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "out[t] = wte[ids[t]] + wpe[positions[t]] (fp32 add); an id or position out of range gives "
      "a NaN row; w_scale: wte is int8, row n scaled by w_scale[n]");

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
  m.def("launch_count", &emu::launch_count, "Kernel launches run so far in this process");
#else
  m.attr("EMULATED") = false;
#endif
}
