"""ops/reference.py against float64 numpy: the spec itself must be right before kernels copy it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import reference as ref
from gpt2fast.sampling import SampleRow, SamplingParams, row_seed, sample_batch

ROWS = [1, 3, 17, 111]
WIDTHS = [3, 96, 768, 1600]


def rand(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def layer_norm64(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_add_layer_norm(rows, width):
    x, res = rand(rows, width, seed=1) * 3 + 1, rand(rows, width, seed=2)
    w, b = rand(width, seed=3), rand(width, seed=4)
    expected_res = np64(res) + np64(x)
    y = ref.add_layer_norm(x, res, w, b, 1e-5)
    np.testing.assert_allclose(res.numpy(), expected_res, atol=1e-6)
    np.testing.assert_allclose(y.numpy(), layer_norm64(expected_res, np64(w), np64(b), 1e-5), atol=2e-5)


def test_layer_norm_of_a_non_contiguous_half_input():
    x = rand(40, 96, seed=5, dtype=torch.float16)[::2]  # every other row
    w, b = rand(96, seed=6, dtype=torch.float16), rand(96, seed=7, dtype=torch.float16)
    y = ref.layer_norm(x, w, b, 1e-5)
    assert y.dtype == torch.float16
    np.testing.assert_allclose(y.double().numpy(), layer_norm64(np64(x), np64(w), np64(b), 1e-5), atol=1e-2)


def gelu_tanh64(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("epilogue", ["bias", "gelu", "residual"])
def test_linear(rows, epilogue):
    k, n = 97, 131
    x, w, b, r = rand(rows, k, seed=8), rand(n, k, seed=9) * 0.2, rand(n, seed=10), rand(rows, n, seed=11)
    expected = np64(x) @ np64(w).T + np64(b)
    if epilogue == "gelu":
        expected = gelu_tanh64(expected)
    if epilogue == "residual":
        expected = expected + np64(r)
    y = ref.linear(x, w, b, gelu=epilogue == "gelu", residual=r if epilogue == "residual" else None)
    np.testing.assert_allclose(y.numpy(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", [3, 97, 768])
@pytest.mark.parametrize("gelu", [False, True])
def test_ln_linear_is_linear_of_layer_norm(rows, width, gelu):
    """fp32: LayerNorm, GEMM, bias (and GELU) in float64 numpy; the spec's fp32 is within summation error."""
    n = 131
    x = rand(rows, width, seed=15) * 3 + 2  # a mean far from 0: two-pass statistics
    g, h, w, b = rand(width, seed=16), rand(width, seed=17), rand(n, width, seed=18) / width**0.5, rand(n, seed=19)
    expected = layer_norm64(np64(x), np64(g), np64(h), 1e-5) @ np64(w).T + np64(b)
    if gelu:
        expected = gelu_tanh64(expected)
    y = ref.ln_linear(x, g, h, 1e-5, w, b, gelu=gelu)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), expected, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 17])
def test_half_ln_linear_rounds_the_normalised_row_before_the_gemm(rows):
    """fp16: the LayerNorm output is rounded to fp16 (what layer_norm returns), then the GEMM accumulates it
    exactly (fp32 here, float64 in numpy), then one rounding of the output; no bias row: ``bias=None``."""
    k, n = 96, 37
    x = rand(rows, k, seed=20, dtype=torch.float16)
    g, h = rand(k, seed=21, dtype=torch.float16), rand(k, seed=22, dtype=torch.float16)
    w = (rand(n, k, seed=23) / k**0.5).half()
    normed = layer_norm64(np64(x), np64(g), np64(h), 1e-5).astype(np.float16).astype(np.float64)
    expected = (normed @ np64(w).T).astype(np.float16)
    y = ref.ln_linear(x, g, h, 1e-5, w, None)
    assert y.dtype == torch.float16
    np.testing.assert_allclose(y.double().numpy(), expected.astype(np.float64), atol=2e-3, rtol=2e-3)


def test_embed_and_lm_head():
    wte, wpe = rand(50, 12, seed=12), rand(9, 12, seed=13)
    ids, pos = torch.tensor([49, 0, 7, 7]), torch.tensor([0, 8, 2, 3])
    np.testing.assert_allclose(ref.embed(ids, pos, wte, wpe).numpy(), np64(wte)[ids] + np64(wpe)[pos], atol=1e-6)
    x = rand(4, 12, seed=14, dtype=torch.bfloat16)
    logits = ref.lm_head(x, wte.bfloat16())
    assert logits.dtype == torch.float32
    np.testing.assert_allclose(logits.numpy(), np64(x) @ np64(wte.bfloat16()).T, atol=1e-4)


def test_lm_head_argmax_is_the_float64_argmax_and_ties_go_low():
    x, wte = rand(17, 12, seed=20), rand(301, 12, seed=21)
    expected = (np64(x) @ np64(wte).T).argmax(-1)
    assert ref.lm_head_argmax(x, wte).tolist() == expected.tolist()
    tied = torch.eye(4)[[0, 2, 1, 2]]  # ids 1 and 3 tie for x = e2
    assert ref.lm_head_argmax(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), tied).tolist() == [1]


def test_lm_head_gumbel_draws_what_the_sampler_draws():
    """Temperature-only rows: the same token as ``sample_batch`` on the logits, greedy rows take the argmax."""
    temps = [0.0, 0.5, 1.0, 1.7, 1e-6, 0.9, 3.0]
    x, wte = rand(len(temps), 16, seed=22), rand(997, 16, seed=23)
    rows = [SampleRow(SamplingParams(temperature=t), 41 + b, b % 2, b) for b, t in enumerate(temps)]
    seeds = torch.tensor([row_seed(r.seed, r.sample_index, r.step) for r in rows])
    got = ref.lm_head_gumbel(x, wte, torch.tensor(temps), seeds)
    assert got.tolist() == [t.token_id for t in sample_batch(ref.lm_head(x, wte), rows)]
    argmax = ref.lm_head_argmax(x, wte)
    assert got[0] == argmax[0] and got[4] == argmax[4]


def test_lm_head_gumbel_frequencies_follow_the_softmax():
    """4000 seeded draws from one row of 5 tokens at T = 0.8 land within 4 sigma of softmax(logits / T)."""
    n, temperature = 4000, 0.8
    x, wte = rand(1, 6, seed=24).expand(n, 6), rand(5, 6, seed=25)
    probs = torch.softmax(ref.lm_head(x[:1], wte)[0].double() / temperature, -1)  # (5,)
    draws = ref.lm_head_gumbel(x, wte, torch.full((n,), temperature), torch.arange(n) * 7919 + 3)
    freq = torch.bincount(draws, minlength=5).double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() < 4 * sigma + 1e-3).all(), (freq, probs)


def dense_causal_attention64(q, k, v, scale):
    """One sequence, contiguous K/V (L, H, D), queries are the last n positions."""
    n, L = q.shape[0], k.shape[0]
    scores = np.einsum("nhd,lhd->hnl", q, k) * scale
    scores[:, np.arange(L)[None, :] > (L - n + np.arange(n))[:, None]] = -np.inf
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hnl,lhd->nhd", p, v)


# (context length, new query tokens) per sequence: prefills, decodes, chunked prefill, block edges.
BATCHES = [
    [(1, 1)],
    [(15, 15), (16, 1), (17, 17)],
    [(100, 1), (33, 10), (5, 5), (64, 1)],
]


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("batch", BATCHES)
def test_paged_write_and_attention(batch, block_size):
    n_head, head_dim = 3, 8
    gen = torch.Generator().manual_seed(15)
    num_blocks = sum(-(-L // block_size) for L, _ in batch) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, non-monotonic block tables
    tables, full_k, full_v = [], [], []
    for L, _ in batch:
        nb = -(-L // block_size)
        tables.append(order[:nb])
        order = order[nb:]
        full_k.append(torch.randn(L, n_head, head_dim, generator=gen))
        full_v.append(torch.randn(L, n_head, head_dim, generator=gen))
    k_cache = torch.full((num_blocks, n_head, block_size, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    # Earlier context first (as a previous step would have), then this step's tokens through one flat batch.
    past = AttentionMetadata.build(tables, [L - n for L, n in batch], [L - n for L, n in batch], block_size=block_size)
    ref.write_kv(torch.cat([k[: L - n] for k, (L, n) in zip(full_k, batch)]),
                 torch.cat([v[: L - n] for v, (L, n) in zip(full_v, batch)]), k_cache, v_cache, past.slot_mapping)
    meta = AttentionMetadata.build(tables, [L for L, _ in batch], [n for _, n in batch], block_size=block_size)
    ref.write_kv(torch.cat([k[L - n:] for k, (L, n) in zip(full_k, batch)]),
                 torch.cat([v[L - n:] for v, (L, n) in zip(full_v, batch)]), k_cache, v_cache, meta.slot_mapping)
    q = torch.randn(sum(n for _, n in batch), n_head, head_dim, generator=gen)
    out = ref.attention(q, k_cache, v_cache, meta, head_dim**-0.5)
    start = 0
    for (L, n), k, v in zip(batch, full_k, full_v):
        expected = dense_causal_attention64(np64(q[start:start + n]), np64(k), np64(v), head_dim**-0.5)
        np.testing.assert_allclose(out[start:start + n].numpy(), expected, atol=1e-5)
        start += n


@pytest.mark.parametrize("batch", BATCHES)
def test_write_kv_attention_stores_the_step_and_attends_over_it(batch):
    """The fused op's definition against dense float64 attention: the cache holds only the earlier context (NaN
    elsewhere) and ``write_kv_attention`` must store this step's k/v before attending (a missed store is NaN)."""
    n_head, head_dim, block_size = 2, 8, 4
    gen = torch.Generator().manual_seed(16)
    num_blocks = sum(-(-L // block_size) for L, _ in batch) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for L, _ in batch:
        tables.append(order[: -(-L // block_size)])
        order = order[len(tables[-1]):]
    full_k = [torch.randn(L, n_head, head_dim, generator=gen) for L, _ in batch]
    full_v = [torch.randn(L, n_head, head_dim, generator=gen) for L, _ in batch]
    k_cache = torch.full((num_blocks, n_head, block_size, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    past = AttentionMetadata.build(tables, [L - n for L, n in batch], [L - n for L, n in batch], block_size=block_size)
    ref.write_kv(torch.cat([k[: L - n] for k, (L, n) in zip(full_k, batch)]),
                 torch.cat([v[: L - n] for v, (L, n) in zip(full_v, batch)]), k_cache, v_cache, past.slot_mapping)
    meta = AttentionMetadata.build(tables, [L for L, _ in batch], [n for _, n in batch], block_size=block_size)
    q = torch.randn(sum(n for _, n in batch), n_head, head_dim, generator=gen)
    out = ref.write_kv_attention(q, torch.cat([k[L - n:] for k, (L, n) in zip(full_k, batch)]),
                                 torch.cat([v[L - n:] for v, (L, n) in zip(full_v, batch)]), k_cache, v_cache, meta,
                                 head_dim**-0.5)
    start = 0
    for (L, n), k, v in zip(batch, full_k, full_v):
        expected = dense_causal_attention64(np64(q[start:start + n]), np64(k), np64(v), head_dim**-0.5)
        np.testing.assert_allclose(out[start:start + n].numpy(), expected, atol=1e-5)
        start += n
