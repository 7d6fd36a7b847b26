"""CUDA C++ prefill attention vs ``reference.attention`` / ``reference.write_kv_attention``.

fp16/bf16 run the flash kernel (csrc/kernels/attention_prefill.cuh: mma.sync for Q K^T and P V, cp.async K/V
tiles); fp32 runs the decode kernel once per query row. On CPU they run emulated, in thread orders 0, 1 and 3, with
outputs poisoned with NaN; CI reruns this file under ASan+UBSan. Sequences of 1..300 tokens across page and tile
boundaries, chunked prefill (earlier context in the pages), decode rows in the same step, rows with slot -1, pages
in random order; the caches must equal the reference's bit for bit.
"""

from __future__ import annotations

import re

import pytest
import torch

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import cuda, cuda_build, reference

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

D = 64
SCALE = D**-0.5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32: exact FMAs in another order; fp16/bf16: P is rounded to the dtype before P V (as FlashAttention does),
# one ulp of O(1) probabilities-weighted values
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
             torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}  # fmt: skip
# (seq_len, query_len) per sequence: whole prompts of odd lengths across 16-token pages and 64-row tiles, chunks
# after earlier context, a decode row, a one-token prompt
STEPS = {
    "prompts": [(1, 1), (17, 17), (70, 70), (129, 129)],
    "chunks": [(130, 40), (200, 64), (65, 1), (300, 300)],
    "mixed": [(33, 33), (90, 1), (150, 77)],
}


@pytest.fixture(autouse=True)
def _poisoned(poisoned_cuda_outputs):
    """Every output the wrappers allocate starts as NaN, so a row the kernel skips cannot pass."""


def _case(step: list[tuple[int, int]], n_head: int, block_size: int, dtype: torch.dtype, seed: int):
    """Pages in random order (a few spare), caches random everywhere (never zeros), q/k/v views of a fused qkv."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-s // block_size) for s, _ in step]
    num_blocks = sum(pages) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, i = [], 0
    for n in pages:
        tables.append(order[i : i + n])
        i += n
    meta = AttentionMetadata.build(tables, [s for s, _ in step], [q for _, q in step], block_size=block_size)
    tokens = sum(q for _, q in step)
    k_cache = torch.randn(num_blocks, n_head, block_size, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, n_head, block_size, D, generator=gen).to(dtype)
    qkv = torch.randn(tokens, 3, n_head, D, generator=gen).to(dtype)  # (T, 3, H, D) as the model lays it out
    return qkv[:, 0], qkv[:, 1], qkv[:, 2], k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("step", list(STEPS), ids=str)
def test_write_kv_attention_prefill_matches_reference(step, dtype, warp_order):
    q, k, v, k_cache, v_cache, meta = _case(STEPS[step], 3, 16, dtype, seed=len(step))
    kc, vc = k_cache.clone(), v_cache.clone()
    out = cuda.write_kv_attention(q, k, v, kc, vc, meta, SCALE)
    rk, rv = k_cache.clone(), v_cache.clone()
    expected = reference.write_kv_attention(q, k, v, rk, rv, meta, SCALE)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
    # attention alone over the caches the step wrote: the same result
    torch.testing.assert_close(cuda.attention(q, rk, rv, meta, SCALE), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [8, 32])
def test_other_page_sizes_and_one_head(block_size, dtype, warp_order):
    q, k, v, k_cache, v_cache, meta = _case([(100, 37), (45, 45)], 1, block_size, dtype, seed=block_size)
    rk, rv = k_cache.clone(), v_cache.clone()
    expected = reference.write_kv_attention(q, k, v, rk, rv, meta, SCALE)
    out = cuda.write_kv_attention(q, k, v, k_cache, v_cache, meta, SCALE)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    assert torch.equal(k_cache, rk) and torch.equal(v_cache, rv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_rows_with_slot_minus_one_store_nothing_and_read_the_cache(dtype, warp_order):
    """A padding row (slot -1) is not stored, and its position is attended from the cache as it is."""
    q, k, v, k_cache, v_cache, meta = _case([(80, 30), (20, 20)], 2, 16, dtype, seed=5)
    slots = meta.slot_mapping.clone()
    slots[[3, 29, 41]] = -1
    meta = AttentionMetadata(meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, slots, meta.logits_indices,
                             meta.max_query_len, meta.max_seq_len)  # fmt: skip
    rk, rv = k_cache.clone(), v_cache.clone()
    expected = reference.write_kv_attention(q, k, v, rk, rv, meta, SCALE)
    out = cuda.write_kv_attention(q, k, v, k_cache, v_cache, meta, SCALE)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    assert torch.equal(k_cache, rk) and torch.equal(v_cache, rv)


def test_prefill_is_one_launch_for_fp16(emu):
    q, k, v, k_cache, v_cache, meta = _case(STEPS["mixed"], 2, 16, torch.float16, seed=1)
    before = emu.launch_count()
    cuda.write_kv_attention(q, k, v, k_cache, v_cache, meta, SCALE)
    assert emu.launch_count() - before == 1


def test_misaligned_step_kv_is_refused_with_a_value_error():
    q, k, v, k_cache, v_cache, meta = _case([(20, 20)], 2, 16, torch.float16, seed=2)
    buf = torch.randn(k.numel() + 1).half()[1:].view(k.shape)
    with pytest.raises(ValueError, match=re.escape("16-byte aligned")):
        cuda.write_kv_attention(q, buf, buf, k_cache, v_cache, meta, SCALE)
