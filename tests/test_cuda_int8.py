"""CUDA C++ kernels reading int8 weights (W8A16): the GEMV (with and without its LayerNorm prologue), the GEMM and
the LM head (logits and token choice), against ``reference`` on the same ``Int8Weight`` (which dequantizes, then
runs the fp32 op).

The kernels read ``q`` int8 ``(N, K)`` and apply each channel's scale once, after the fp32 sum over K; activations
stay in the model dtype. Run emulated in thread orders 0 and 1 with NaN-poisoned outputs; shapes hit the vector
path (K a multiple of the vector, aligned ``q``) and the scalar one (odd K, a misaligned ``q``). Above 16 rows the
GEMM takes them (``test_int8_gemm_matches_reference``).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_cuda_linear import EPILOGUES, TOLERANCE, _expected_close
from test_cuda_lm_head import _check, _inputs

from gpt2fast import LLM, SamplingParams
from gpt2fast.ops import cuda, cuda_build, reference
from gpt2fast.quant import Int8Weight, quantize_int8

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poisoned(poisoned_cuda_outputs):
    """Every output the wrappers allocate starts as NaN, so an element the kernel skips cannot pass."""


def _int8_inputs(rows: int, k: int, n: int, dtype: torch.dtype, seed: int):
    """x ~ N(0.5, 1), an int8 weight of N(0, 1/K) values (scales differ per row), bias and residual."""
    g = torch.Generator().manual_seed(seed)
    x = (0.5 + torch.randn(rows, k, generator=g)).to(dtype)
    w = quantize_int8(torch.randn(n, k, generator=g) / math.sqrt(k) * (1 + torch.rand(n, 1, generator=g)))
    b = torch.randn(n, generator=g).to(dtype)
    residual = torch.randn(rows, n, generator=g).to(dtype)
    return x, w, b, residual


def _misaligned_int8(w: Int8Weight) -> Int8Weight:
    """The same values one byte past a 16-byte boundary (the scalar path)."""
    buf = torch.empty(w.data.numel() + 32, dtype=torch.int8)
    shift = (16 - buf.data_ptr() % 16) % 16 + 1
    view = buf[shift : shift + w.data.numel()].view(w.data.shape)
    view.copy_(w.data)
    return Int8Weight(view, w.scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", [(96, 96), (97, 131), (768, 72)], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_linear_matches_reference(rows, k, n, dtype, order):
    x, w, b, residual = _int8_inputs(rows, k, n, dtype, seed=rows + k + n)
    for epilogue in EPILOGUES.values():
        bias = b if epilogue.get("bias") else None
        res = residual if epilogue.get("residual") else None
        gelu = epilogue.get("gelu", False)
        y = cuda.linear(x, w, bias, gelu=gelu, residual=res)
        _expected_close(y, x, w.dequantize(), bias, res, gelu)  # reference.linear on the dequantized weight
        torch.testing.assert_close(y, reference.linear(x, w, bias, gelu=gelu, residual=res),
                                   **{key: v * 2 + 1e-5 for key, v in TOLERANCE[dtype].items()})  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_ln_linear_and_a_misaligned_weight(dtype, order):
    x, w, b, _ = _int8_inputs(5, 768, 40, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    ln_w, ln_b = (1 + 0.3 * torch.randn(768, generator=g)).to(dtype), (0.2 * torch.randn(768, generator=g)).to(dtype)
    for weight in (w, _misaligned_int8(w)):
        y = cuda.ln_linear(x, ln_w, ln_b, 1e-5, weight, b, gelu=True)
        normed = reference.layer_norm(x, ln_w, ln_b, 1e-5)
        _expected_close(y, normed, w.dequantize(), b, None, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 16])
def test_int8_lm_head_choice_matches_float64(rows, dtype, order):
    """The choice over x . (q[n] * scale[n]): every row's pick holds its best float64 score (up to fp32 rounding),
    and equals the reference's on all but near-tied rows (``_check``)."""
    x, wte, temperature, seeds = _inputs(rows, 1013, 96, dtype, seed=rows)
    w = quantize_int8(wte.float())
    dense = w.dequantize()  # (V, C) fp32: what the int8 weight stands for
    _check(x.float(), dense, temperature, seeds, cuda.lm_head_gumbel(x, w, temperature, seeds))
    _check(x.float(), dense, torch.zeros(rows), seeds, cuda.lm_head_argmax(x, w))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,k,n", [(17, 96, 72), (130, 64, 200), (40, 97, 50)], ids=str)
def test_int8_gemm_matches_reference(rows, k, n, dtype, warp_order):
    """More than 16 rows: the GEMM widens each int8 weight tile to the dtype in shared memory (tensor cores for
    fp16/bf16, CUDA cores for fp32) and scales each column once in the epilogue; K = 97 the element-wise loader."""
    x, w, b, residual = _int8_inputs(rows, k, n, dtype, seed=rows * k + n)
    for epilogue in EPILOGUES.values():
        bias = b if epilogue.get("bias") else None
        res = residual if epilogue.get("residual") else None
        gelu = epilogue.get("gelu", False)
        y = cuda.linear(x, w, bias, gelu=gelu, residual=res)
        _expected_close(y, x, w.dequantize(), bias, res, gelu)
    for weight in (w, _misaligned_int8(w)):  # the aligned int8 rows go through cp.async, the misaligned don't
        _expected_close(cuda.linear(x, weight, b), x, w.dequantize(), b, None, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_lm_head_logits_and_choice_above_16_rows(dtype, warp_order):
    x, wte, temperature, seeds = _inputs(40, 1013, 96, dtype, seed=40)
    w = quantize_int8(wte.float())
    dense = w.dequantize()  # (V, C) fp32
    torch.testing.assert_close(cuda.lm_head(x, w), reference.lm_head(x, w), atol=2e-5, rtol=1e-5)
    _check(x.float(), dense, temperature, seeds, cuda.lm_head_gumbel(x, w, temperature, seeds))
    _check(x.float(), dense, torch.zeros(40), seeds, cuda.lm_head_argmax(x, w))


def test_int8_weights_the_kernels_cannot_read_raise_value_error():
    x, w, b, _ = _int8_inputs(3, 64, 24, torch.float32, seed=1)
    with pytest.raises(ValueError, match="weight.scale must be a contiguous float32"):
        cuda.linear(x, Int8Weight(w.data, w.scale.double()), b)
    with pytest.raises(ValueError, match="weight.data must be int8"):
        cuda.linear(x, Int8Weight(w.data.to(torch.int16), w.scale), b)
    with pytest.raises(ValueError, match="weight.data must be contiguous"):
        cuda.linear(x, Int8Weight(torch.zeros(24, 128, dtype=torch.int8)[:, ::2], w.scale), b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 16, 64])
@pytest.mark.parametrize("k,n", [(768, 2304), (768, 768), (768, 3072), (3072, 768), (1600, 6400), (6400, 1600)])
def test_gpu_int8_linear_matches_reference(k, n, rows, dtype):
    """The compiled GEMV (up to 16 rows) and tensor-core GEMM (64) on GPT-2 124M / 1.5B int8 projections."""
    x, w, b, residual = (t.cuda() if isinstance(t, torch.Tensor) else t
                         for t in _int8_inputs(rows, k, n, dtype, seed=rows + k + n))  # fmt: skip
    w = Int8Weight(w.data.cuda(), w.scale.cuda())
    y = cuda.linear(x, w, b, gelu=True, residual=residual)
    _expected_close(y, x, w.dequantize(), b, residual, True)


# ---- the whole model: LLM(..., backend="cuda", quantization="int8") -------------------------------------------

# A random Hugging Face GPT2LMHeadModel (save_pretrained): head dim 64 (the CUDA attention kernels'), odd everything
# else
HF_ODD = dict(n_layer=2, n_embd=128, n_head=2, n_inner=200, vocab_size=555, n_positions=96)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_model_logits_and_tokens_equal_the_int8_reference(dtype, hf_folder):
    """Prefill (the GEMM, 37 and 61 tokens) and decode (the GEMV, the LM head's fused choice) read int8 weights:
    logits within 1e-4 of the int8 reference in fp32 (bf16: 1.5e-1, every activation rounded in both), greedy tokens
    equal in fp32."""
    folder = str(hf_folder(HF_ODD)[1])
    common = dict(device="cpu", kv_cache_tokens=256, dtype=dtype, quantization="int8")
    fast = LLM(folder, backend="cuda", **common)
    reference_llm = LLM(folder, backend="reference", **common)
    assert fast.engine.model.quantization == "int8" and fast.backend == "cuda"
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 555, (61,), generator=gen).tolist()
    tol = 1e-4 if dtype == "float32" else 1.5e-1
    torch.testing.assert_close(fast.logits(ids), reference_llm.logits(ids), atol=tol, rtol=0)
    if dtype != "float32":
        return
    prompts = [torch.randint(0, 555, (n,), generator=gen).tolist() for n in (37, 1, 20)]
    params = SamplingParams(max_tokens=6, temperature=0)
    expected = [o.outputs[0].token_ids for o in reference_llm.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, params)] == expected


def test_int8_embed_dequantizes_rows_on_lookup(order):
    g = torch.Generator().manual_seed(2)
    wte = quantize_int8(torch.randn(555, 128, generator=g))
    for dtype in DTYPES:
        wpe = torch.randn(96, 128, generator=g).to(dtype)
        ids, pos = torch.tensor([3, 554, 0, 3]), torch.tensor([0, 1, 95, 2])
        torch.testing.assert_close(cuda.embed(ids, pos, wte, wpe), reference.embed(ids, pos, wte, wpe), atol=0, rtol=0)
