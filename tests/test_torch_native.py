"""The ``torch`` backend (``gpt2fast/ops/torch_native.py``) vs the naive spec ``gpt2fast.ops.reference``."""

from __future__ import annotations

import pytest
import torch

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import REFERENCE, TORCH, get_ops, reference, torch_native

LINEAR_CASES = [(1, 3, 5), (3, 17, 111), (8, 64, 96), (33, 111, 17)]  # (rows, K, N)


@pytest.mark.parametrize("rows, k, n", LINEAR_CASES)
@pytest.mark.parametrize("epilogue", ["bias", "none", "gelu", "residual", "gelu+residual"])
def test_linear_matches_reference(rows, k, n, epilogue):
    gen = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(rows, 2 * k, generator=gen)[:, ::2]  # a strided view, like a slice of a fused tensor
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    residual = torch.randn(rows, n, generator=gen) if "residual" in epilogue else None
    kwargs = dict(gelu="gelu" in epilogue, residual=residual)
    bias = None if epilogue == "none" else b
    y = torch_native.linear(x, w, bias, **kwargs)
    assert y.shape == (rows, n) and y.is_contiguous()
    torch.testing.assert_close(y, reference.linear(x, w, bias, **kwargs), atol=2e-5, rtol=1e-5)


def test_linear_low_precision_uses_the_reference():
    x, w, b = torch.randn(3, 8).bfloat16(), torch.randn(5, 8).bfloat16(), torch.randn(5).bfloat16()
    assert torch.equal(torch_native.linear(x, w, b, gelu=True), reference.linear(x, w, b, gelu=True))


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_lm_head_family_matches_reference(rows):
    gen = torch.Generator().manual_seed(rows)
    x, wte = torch.randn(rows, 48, generator=gen), torch.randn(1013, 48, generator=gen)  # an odd vocabulary
    torch.testing.assert_close(torch_native.lm_head(x, wte), reference.lm_head(x, wte), atol=1e-4, rtol=1e-5)
    assert torch.equal(torch_native.lm_head_argmax(x, wte), reference.lm_head_argmax(x, wte))
    temperature = torch.tensor([0.0, 0.8, 1.5, 0.0, 1.0, 0.3, 2.0, 0.9][:rows])
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 5
    for temps in (temperature, temperature + 0.5):  # greedy rows mixed in (none at rows=1), then every row drawing
        assert torch.equal(torch_native.lm_head_gumbel(x, wte, temps, seeds),
                           reference.lm_head_gumbel(x, wte, temps, seeds))


@pytest.mark.parametrize("vocab", [1, 2, 1013])
def test_sync_free_sampler_draws_the_references_tokens(vocab):
    """Every temperature x top_k x top_p combination (greedy, off, k = 1, k past the vocabulary), min-p on every
    third row, one -inf logit per row (a filter already ran), seeds apart: the same token as the reference."""
    combos = [(t, k, p) for t in (0.0, 0.4, 1.0, 1.7) for k in (0, 1, 3, 40, vocab + 2) for p in (0.2, 0.9, 1.0)]
    rows = len(combos)
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(rows, vocab, generator=gen) * 3  # (B, V)
    if vocab > 1:
        logits[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] = -float("inf")
    temperature = torch.tensor([t for t, _, _ in combos])
    top_k = torch.tensor([k for _, k, _ in combos], dtype=torch.int32)
    top_p = torch.tensor([p for _, _, p in combos])
    min_p = torch.tensor([0.1 if i % 3 == 0 else 0.0 for i in range(rows)])
    seeds = torch.randint(0, 2**62, (rows,), generator=gen)
    for m in (min_p, None):
        got = torch_native.sample_top_k_top_p(logits, temperature, top_k, top_p, seeds, m)
        want = reference.sample_top_k_top_p(logits, temperature, top_k, top_p, seeds, m)
        assert torch.equal(got, want)
    assert vocab == 1 or len(set(got.tolist())) > vocab // 100 + 1  # not one token everywhere


def test_lm_head_low_precision_weights_use_the_reference():
    x, wte = torch.randn(2, 16), torch.randn(50, 16).bfloat16()
    assert torch.equal(torch_native.lm_head(x, wte), reference.lm_head(x, wte))


def test_backend_names():
    cpu = torch.device("cpu")
    assert get_ops("torch", cpu) is TORCH and get_ops("reference", cpu) is REFERENCE
    assert get_ops("auto", cpu).name == "cpu"  # the native kernels (tests/test_cpu_ops.py)
    assert REFERENCE.linear is reference.linear and TORCH.linear is torch_native.linear


# (context lengths, block size, heads, head dim): odd lengths, one long among short ones, partial last blocks.
DECODE_CASES = [
    ([1], 16, 2, 8),
    ([3, 17, 111], 16, 3, 5),
    ([40, 1023, 2, 17, 64, 65, 300, 9], 16, 12, 64),
    ([5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5], 4, 2, 16),
    ([250, 7, 129], 32, 4, 7),
]


def _paged(lens: list[int], block_size: int, n_head: int, head_dim: int, gen: torch.Generator):
    """A cache poisoned with NaN everywhere no sequence owns, each sequence's blocks at random places."""
    tables, num_blocks = [], sum(-(-n // block_size) for n in lens) + 3
    free = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.full((num_blocks, n_head, block_size, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    for n in lens:
        table = [free.pop() for _ in range(-(-n // block_size))]
        for pos in range(n):
            block, offset = table[pos // block_size], pos % block_size
            k_cache[block, :, offset] = torch.randn(n_head, head_dim, generator=gen)
            v_cache[block, :, offset] = torch.randn(n_head, head_dim, generator=gen)
        tables.append(table)
    return tables, k_cache, v_cache


@pytest.mark.parametrize("lens,block_size,n_head,head_dim", DECODE_CASES)
@pytest.mark.parametrize("group_bytes", [1, 64 << 10, 1 << 30])  # one sequence per group, the default-ish, all
def test_decode_attention_matches_reference(lens, block_size, n_head, head_dim, group_bytes, monkeypatch):
    monkeypatch.setattr(torch_native, "DECODE_GROUP_BYTES", group_bytes)
    gen = torch.Generator().manual_seed(len(lens) * 31 + block_size)
    tables, k_cache, v_cache = _paged(lens, block_size, n_head, head_dim, gen)
    meta = AttentionMetadata.build(tables, lens, [1] * len(lens), block_size=block_size, max_blocks=70)
    q = torch.randn(len(lens), n_head, head_dim, generator=gen)
    got = torch_native.attention(q, k_cache, v_cache, meta, 0.37)
    torch.testing.assert_close(got, reference.attention(q, k_cache, v_cache, meta, 0.37), atol=2e-6, rtol=1e-5)


def test_decode_attention_leaves_padding_rows_alone():
    """The static decode runner's padding: rows past the real batch own no query and have context 0."""
    gen = torch.Generator().manual_seed(5)
    tables, k_cache, v_cache = _paged([9, 30], 8, 2, 4, gen)
    real = AttentionMetadata.build(tables, [9, 30], [1, 1], block_size=8, max_blocks=6)
    padded = AttentionMetadata.build([*tables, [], []], [9, 30, 0, 0], [1, 1, 0, 0], block_size=8, max_blocks=6)
    q = torch.randn(4, 2, 4, generator=gen)
    got = torch_native.attention(q, k_cache, v_cache, padded, 0.5)
    torch.testing.assert_close(got[:2], reference.attention(q[:2], k_cache, v_cache, real, 0.5))


def test_prefill_attention_is_the_reference():
    gen = torch.Generator().manual_seed(6)
    tables, k_cache, v_cache = _paged([12, 20], 8, 2, 4, gen)
    meta = AttentionMetadata.build(tables, [12, 20], [5, 1], block_size=8, max_blocks=6)
    q = torch.randn(6, 2, 4, generator=gen)
    torch.testing.assert_close(torch_native.attention(q, k_cache, v_cache, meta, 0.5),
                               reference.attention(q, k_cache, v_cache, meta, 0.5))
