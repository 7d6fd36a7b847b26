"""Incremental decoding through the paged KV cache equals one full pass (the cache is never wrong)."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
from conftest import ODD

from gpt2fast.cache import BlockPool, BlockTable, KVCache
from gpt2fast.checkpoint import load_checkpoint
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.model import GPT2

BLOCK_SIZES = [1, 16, 32]
PREFILL_LENS = [1, 15, 17]


def build_model(folder) -> GPT2:
    ckpt = load_checkpoint(str(folder))
    return GPT2.from_state_dict(ckpt.config, ckpt.state_dict)


class SequenceBlocks:
    """A block table plus its token count: the bookkeeping the scheduler does, done by hand."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool, self.table, self.num_tokens = pool, BlockTable(block_size), 0

    @property
    def blocks(self) -> list[int]:
        return self.table.blocks

    def append(self, n: int) -> None:
        assert self.table.reserve(self.pool, self.num_tokens + n, self.num_tokens) == []
        self.num_tokens += n

    def free(self) -> None:
        self.table.free(self.pool)


def scrambled_pool(num_blocks: int, seed: int) -> BlockPool:
    """A pool that hands blocks out in random order, so block tables are not 0, 1, 2, ..."""
    pool = BlockPool(num_blocks)
    order = list(pool._free)
    random.Random(seed).shuffle(order)
    pool._free = OrderedDict.fromkeys(order)
    return pool


def poisoned_cache(model: GPT2, num_blocks: int, block_size: int) -> KVCache:
    cache = KVCache(model.config, num_blocks, block_size)
    cache.data.fill_(float("nan"))  # a read of a slot nobody wrote turns the logits into NaN
    return cache


def step(model, cache, seqs: list[SequenceBlocks], chunks: list[list[int]], all_logits=False) -> torch.Tensor:
    """Append ``chunks[i]`` to ``seqs[i]`` and run all of them as one flat batch."""
    starts = [s.num_tokens for s in seqs]
    for seq, chunk in zip(seqs, chunks):
        seq.append(len(chunk))
    meta = AttentionMetadata.build([s.blocks for s in seqs], [s.num_tokens for s in seqs],
                                   [len(c) for c in chunks], block_size=cache.block_size, all_logits=all_logits)
    ids = torch.tensor([t for c in chunks for t in c])
    positions = torch.tensor([p for st, c in zip(starts, chunks) for p in range(st, st + len(c))])
    return model(ids, positions, cache, meta)


@pytest.fixture(scope="module")
def odd_model(hf_folder):
    return build_model(hf_folder(ODD)[1])


@pytest.mark.parametrize("prefill_len", PREFILL_LENS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_incremental_equals_single_pass(odd_model, block_size, prefill_len):
    ids = torch.randint(0, ODD["vocab_size"], (50,), generator=torch.Generator().manual_seed(3)).tolist()
    num_blocks = 2 * -(-len(ids) // block_size)
    cache = poisoned_cache(odd_model, num_blocks, block_size)
    pool = scrambled_pool(num_blocks, seed=block_size)

    full_seq = SequenceBlocks(pool, block_size)
    full = step(odd_model, cache, [full_seq], [ids], all_logits=True)  # (50, V)
    full_seq.free()

    seq = SequenceBlocks(pool, block_size)
    rows = [step(odd_model, cache, [seq], [ids[:prefill_len]], all_logits=True)]
    rows += [step(odd_model, cache, [seq], [[t]]) for t in ids[prefill_len:]]
    incremental = torch.cat(rows)
    assert torch.isfinite(incremental).all()
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    seq.free()
    pool.check()
    assert pool.num_free == num_blocks


def test_mixed_prefill_and_decode_in_one_flat_batch(odd_model):
    """A batch holding one sequence's prefill and two others' decode steps gives each its own logits."""
    block_size = 16
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, ODD["vocab_size"], (n,), generator=gen).tolist() for n in (3, 20, 33)]
    expected = []
    for p in prompts:
        cache, pool = poisoned_cache(odd_model, 8, block_size), BlockPool(8)
        expected.append(step(odd_model, cache, [SequenceBlocks(pool, block_size)], [p], all_logits=True))

    cache, pool = poisoned_cache(odd_model, 16, block_size), scrambled_pool(16, seed=9)
    seqs = [SequenceBlocks(pool, block_size) for _ in prompts]
    # Sequences 1 and 2 are already decoding when sequence 0 arrives with its whole prompt.
    step(odd_model, cache, seqs[1:], [prompts[1][:-1], prompts[2][:-1]])
    logits = step(odd_model, cache, seqs, [prompts[0], prompts[1][-1:], prompts[2][-1:]])  # (3, V)
    for i in range(3):
        torch.testing.assert_close(logits[i], expected[i][-1], atol=1e-5, rtol=0)


def test_padding_slots_are_not_written(odd_model):
    """Tokens with slot -1 (padding in a fixed-size batch) leave the cache untouched."""
    cache = KVCache(odd_model.config, 2, 4)
    cache.data.normal_()
    before = cache.data.clone()
    meta = AttentionMetadata.build([[0]], [0], [0], block_size=4)
    meta.slot_mapping = torch.tensor([-1, -1])
    meta.logits_indices = torch.tensor([0, 1])
    odd_model(torch.tensor([1, 2]), torch.tensor([0, 1]), cache, meta)
    assert torch.equal(cache.data, before)
