"""Triton kernels reading int8 weights (W8A16): the decode split-K GEMV (with and without its LayerNorm prologue),
the prefill ``tl.dot`` tiles, the LM head (logits, argmax, Gumbel-max) and the embedding, against ``reference`` on
the same ``Int8Weight`` (which dequantizes, then runs the fp32 op); then the whole model,
``LLM(..., backend="triton", quantization="int8")`` against ``backend="reference"``.

The kernels load ``q`` int8 tiles, widen them to x's dtype in registers (exact: |q| <= 127) for the dot, and apply
each channel's fp32 scale once to the fp32 sum (after the split-K merge). Under the interpreter (tests/conftest.py)
on CPU; outputs and workspaces NaN-poisoned where a skipped element could hide.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_cuda_lm_head import _check as _check_choice
from test_cuda_lm_head import _inputs as _lm_head_inputs
from test_triton_linear import EPILOGUES, TOLERANCE, _force_splits, _poisoned_empty
from test_triton_ops import _same_rounding

from gpt2fast import LLM, SamplingParams
from gpt2fast.ops import reference
from gpt2fast.ops.triton import available, unavailable_reason
from gpt2fast.quant import Int8Weight, quantize_int8, to_panels

pytestmark = pytest.mark.skipif(not available(), reason=unavailable_reason() or "triton available")

if available():
    from gpt2fast.ops.triton import embed, lm_head
    from gpt2fast.ops.triton import linear as linear_module
    from gpt2fast.ops.triton.linear import BLOCK_K_DECODE, PREFILL_TILES_W8, decode_split, linear, ln_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, K, N): rows <= 64 the split-K decode GEMV (row tiles 16 and 64), 65 and more the prefill tiles; K = 97 and
# 60 are no multiple of any K step (masked int8 loads), 300 splits K
SHAPES = [(1, 96, 96), (3, 97, 131), (16, 300, 200), (17, 60, 131), (65, 97, 70), (111, 300, 50)]


def _int8_inputs(rows: int, k: int, n: int, dtype: torch.dtype, seed: int):
    """x ~ N(0.5, 1) (T, K); an int8 weight of N(0, 1/K) values whose rows' scales differ; bias (N,); residual."""
    g = torch.Generator().manual_seed(seed)
    x = (0.5 + torch.randn(rows, k, generator=g)).to(DEVICE, dtype)
    w = quantize_int8(torch.randn(n, k, generator=g) / math.sqrt(k) * (1 + torch.rand(n, 1, generator=g)))
    w = Int8Weight(w.data.to(DEVICE), w.scale.to(DEVICE))
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    residual = torch.randn(rows, n, generator=g).to(DEVICE, dtype)
    return x, w, b, residual


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Within ``test_triton_linear.TOLERANCE`` of the largest |want| (fp32: summation order and where the scale
    multiplies; fp16/bf16: the output's rounding)."""
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol * float(want.float().abs().max()), rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_linear_matches_reference(shape, dtype, monkeypatch):
    x, w, b, residual = _int8_inputs(*shape, dtype, seed=sum(shape))
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    for spec in EPILOGUES.values():
        bias = b if spec.get("bias") else None
        res = residual if spec.get("residual") else None
        gelu = spec.get("gelu", False)
        _assert_close(linear(x, w, bias, gelu=gelu, residual=res),
                      reference.linear(x, w, bias, gelu=gelu, residual=res), dtype)  # fmt: skip


@pytest.mark.parametrize("tile", sorted(set(PREFILL_TILES_W8["fp16"])) if available() else [], ids=str)
def test_int8_every_half_prefill_tile_matches_reference(tile, monkeypatch):
    """Each fp16 tile the shape rule can pick, forced on a 111-row prefill of an int8 weight (GELU + residual)."""
    monkeypatch.setattr(linear_module, "prefill_tile", lambda etype, t, n, w_int8=False: tile)
    x, w, b, residual = _int8_inputs(111, 97, 131, torch.float16, seed=11)
    _assert_close(linear(x, w, b, gelu=True, residual=residual),
                  reference.linear(x, w, b, gelu=True, residual=residual), torch.float16)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [3, 17, 70])  # the LN prologue at row tiles 16 and 64; a prefill (LN kernel, tiles)
def test_int8_ln_linear_matches_reference(rows, dtype):
    x, w, b, _ = _int8_inputs(rows, 300, 131, dtype, seed=rows)
    g = torch.Generator().manual_seed(rows + 1)
    ln_w = (1 + 0.3 * torch.randn(300, generator=g)).to(DEVICE, dtype)
    ln_b = (0.2 * torch.randn(300, generator=g)).to(DEVICE, dtype)
    _assert_close(ln_linear(x, ln_w, ln_b, 1e-5, w, b, gelu=True),
                  reference.ln_linear(x, ln_w, ln_b, 1e-5, w, b, gelu=True), dtype)  # fmt: skip


@pytest.mark.parametrize("rows", [3, 17])
def test_int8_scales_apply_once_after_the_split_k_merge(rows, monkeypatch):
    """Integer x and int8 q make every partial sum exact, so any split count gives the same bits -- but only if the
    scale multiplies the merged sum once: scaled partials would round differently per split count."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randint(-3, 4, (rows, 320), generator=g).float().to(DEVICE)  # (T, K)
    w = quantize_int8(torch.randn(70, 320, generator=g))
    w = Int8Weight(w.data.to(DEVICE), w.scale.to(DEVICE))
    want = None
    steps = -(-320 // BLOCK_K_DECODE["fp32"])
    for splits in (1, 2, 5, 10):
        assert steps % splits == 0
        _force_splits(monkeypatch, splits)
        got = linear(x, w, None)
        want = got if want is None else want
        assert torch.equal(got, want), f"S={splits}"
    monkeypatch.undo()
    assert decode_split(70, 320, BLOCK_K_DECODE["fp32"])[0] > 1  # the real rule splits this shape too
    # The exact sum times the scale, rounded once: float64 holds both products exactly. (The reference dequantizes
    # first, so its fp32 sum rounds 320 times; on some CPUs that differed from this by 1.3e-5 where terms cancel.)
    exact = (x.double() @ w.data.double().T * w.scale.double()).float()  # (T, N)
    assert torch.equal(want, exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 17, 33])  # LM head row tiles 16 (1, 3) and 64 (17, 33)
def test_int8_lm_head_logits_and_choice(rows, dtype, monkeypatch):
    """Logits of x . (q[v] * scale[v]) within fp32 rounding of the reference; the argmax and Gumbel-max choices hold
    their row's best float64 score and equal the reference's on all but near-tied rows."""
    x, wte, temperature, seeds = _lm_head_inputs(rows, 1013, 97, dtype, seed=rows)
    w = quantize_int8(wte.float())
    dense = w.dequantize()  # (V, C) fp32: what the int8 embedding stands for
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    torch.testing.assert_close(lm_head.lm_head(x, w), reference.lm_head(x, w), atol=2e-5, rtol=1e-5)
    _check_choice(x.float(), dense, temperature, seeds, lm_head.lm_head_gumbel(x, w, temperature, seeds))
    _check_choice(x.float(), dense, torch.zeros(rows), seeds, lm_head.lm_head_argmax(x, w))


def test_int8_lm_head_argmax_ties_go_to_the_lowest_id():
    """Two int8 rows with equal values and scales, in different vocab tiles: the lower id wins."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    wte = torch.randn(1013, 64, generator=torch.Generator().manual_seed(2))
    wte[700] = wte[130] = 10 * x.mean(dim=0)
    w = quantize_int8(wte)
    assert lm_head.lm_head_argmax(x, w).tolist() == reference.lm_head_argmax(x, w).tolist() == [130] * 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_embed_dequantizes_rows_on_lookup_bit_for_bit(dtype):
    """``q[id] * scale[id] + wpe[pos]`` in fp32, rounded once: the reference's bits (the interpreter truncates to
    bf16 where a GPU rounds: one bf16 ulp there)."""
    g = torch.Generator().manual_seed(2)
    wte = quantize_int8(torch.randn(555, 300, generator=g))  # 300: two 256-wide chunks, the second masked
    wpe = torch.randn(96, 300, generator=g).to(dtype)
    ids, pos = torch.tensor([3, 554, 0, 3]), torch.tensor([0, 1, 95, 2])
    got = embed.embed(ids, pos, wte, wpe)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.embed(ids, pos, wte, wpe), **_same_rounding(dtype))


def test_int8_weights_the_kernels_cannot_read_raise_value_error():
    x, w, b, _ = _int8_inputs(3, 64, 24, torch.float32, seed=1)
    with pytest.raises(ValueError, match="weight.scale must be a contiguous float32"):
        linear(x, Int8Weight(w.data, w.scale.double()), b)
    with pytest.raises(ValueError, match="weight.data must be int8"):
        linear(x, Int8Weight(w.data.to(torch.int16), w.scale), b)
    with pytest.raises(ValueError, match="in panels"):
        linear(x, Int8Weight(to_panels(w.data), w.scale), b)
    with pytest.raises(ValueError, match=r"lm_head: x must be \(N, C\) and wte \(V, C\), got \(2, 65\) and \(24, 64\)"):
        lm_head.lm_head(torch.randn(2, 65), w)
    with pytest.raises(ValueError, match="weight.scale must be a contiguous float32"):
        lm_head.lm_head_argmax(torch.randn(2, 64), Int8Weight(w.data, w.scale[:12]))
    with pytest.raises(ValueError, match="weight.data must be contiguous"):
        embed.embed(torch.tensor([1]), torch.tensor([0]), Int8Weight(torch.zeros(24, 128, dtype=torch.int8)[:, ::2],
                                                                     w.scale), torch.randn(4, 64))


GPT2_LINEARS = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (1600, 4800), (1600, 6400), (6400, 1600)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 16, 64, 512])
def test_int8_linear_and_lm_head_gpt2_shapes_gpu(rows, dtype):
    """GPT-2 124M and 1.5B projections and the 50257-token LM head on a GPU, against the reference: the compiled
    kernels (tensor-core tl.dot on widened int8 tiles), not the interpreter."""
    for k, n in GPT2_LINEARS:
        x, w, b, residual = _int8_inputs(rows, k, n, dtype, seed=k + n)
        _assert_close(linear(x, w, b, gelu=True, residual=residual),
                      reference.linear(x, w, b, gelu=True, residual=residual), dtype)  # fmt: skip
    x, wte, temperature, seeds = _lm_head_inputs(min(rows, 64), 50257, 768, dtype, seed=rows)
    x, w = x.cuda(), quantize_int8(wte.float().cuda())
    torch.testing.assert_close(lm_head.lm_head(x, w), reference.lm_head(x, w), atol=2e-2, rtol=1e-2)
    _check_choice(x.float().cpu(), w.dequantize().cpu(), torch.zeros(x.shape[0]), seeds,
                  lm_head.lm_head_argmax(x, w).cpu())  # fmt: skip


# ---- the whole model: LLM(..., backend="triton", quantization="int8") ----------------------------------------

# A random Hugging Face GPT2LMHeadModel (save_pretrained) of odd sizes: 5 heads of 12, an MLP of 100, a vocabulary
# of 777 (as tests/test_triton_model.py's)
HF_ODD = dict(n_layer=2, n_embd=60, n_head=5, n_inner=100, vocab_size=777, n_positions=96)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_model_logits_and_tokens_equal_the_int8_reference(dtype, hf_folder):
    """A 70-token prefill (the tl.dot tiles) and a 40-token one (the split-K GEMV) give the int8 reference's logits
    (fp32: within 1e-4; bf16: 1.5e-1, every activation rounded in both); generation -- prefill, then decode steps
    through the fused LM head -- gives its greedy tokens and, in fp32, its logprobs within 1e-4 at every step."""
    folder = str(hf_folder(HF_ODD)[1])
    common = dict(device="cpu", kv_cache_tokens=256, dtype=dtype, quantization="int8")
    fast, reference_llm = LLM(folder, backend="triton", **common), LLM(folder, backend="reference", **common)
    assert fast.engine.model.quantization == "int8" and fast.backend == "triton"
    gen = torch.Generator().manual_seed(5)
    tol = 1e-4 if dtype == "float32" else 1.5e-1
    for length in (70, 40):
        ids = torch.randint(0, 777, (length,), generator=gen).tolist()
        torch.testing.assert_close(fast.logits(ids), reference_llm.logits(ids), atol=tol, rtol=0)
    prompts = [torch.randint(0, 777, (n,), generator=gen).tolist() for n in (37, 1, 20)]
    greedy = SamplingParams(max_tokens=6, temperature=0, logprobs=3 if dtype == "float32" else None)
    expected, got = reference_llm.generate(prompts, greedy), fast.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    if dtype == "float32":
        for mine, theirs in zip(got, expected, strict=True):
            for step, want in zip(mine.outputs[0].logprobs, theirs.outputs[0].logprobs, strict=True):
                assert step.keys() == want.keys()
                assert all(abs(step[t] - want[t]) <= 1e-4 for t in want), (step, want)
