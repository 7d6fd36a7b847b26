"""Block pool, block tables and the prefix cache: refcounts, copy-on-write, LRU eviction, invariants."""

from __future__ import annotations

import pytest
import torch

from gpt2fast.cache import BlockPool, BlockTable, KVCache, block_hash, chain_hashes
from gpt2fast.config import GPT2Config


def test_refcounts_follow_the_tables():
    pool = BlockPool(6)
    a = BlockTable(4)
    a.reserve(pool, 10)  # 3 blocks
    b = a.fork(pool)
    pool.check([a.blocks, b.blocks])
    assert [pool.refcount[x] for x in a.blocks] == [2, 2, 2] and pool.num_free == 3
    with pytest.raises(AssertionError, match="refcount 2 but 1 tables hold it"):
        pool.check([a.blocks])
    a.free(pool)
    b.free(pool)
    pool.check([])
    assert pool.num_free == 6


def test_copy_on_write_of_a_shared_partial_block():
    pool = BlockPool(6)
    a = BlockTable(4)
    a.reserve(pool, 6)  # blocks [0, 1]; block 1 half full
    b = a.fork(pool)
    assert a.blocks_needed(pool, 6, 7) == 1  # the copy
    copies = a.reserve(pool, 7, num_computed=6)
    assert copies == [(1, a.blocks[1])] and a.blocks[1] != b.blocks[1] and a.blocks[0] == b.blocks[0]
    assert b.reserve(pool, 7, num_computed=6) == []  # now b alone holds block 1: it writes in place
    pool.check([a.blocks, b.blocks])


def test_full_shared_blocks_are_not_copied():
    pool = BlockPool(6)
    a = BlockTable(4)
    a.reserve(pool, 8)
    b = a.fork(pool)
    assert a.reserve(pool, 9, num_computed=8) == [] and len(a.blocks) == 3
    pool.check([a.blocks, b.blocks])


def test_copy_blocks_moves_every_layer():
    cache = KVCache(GPT2Config(n_layer=3, n_embd=8, n_head=2), num_blocks=4, block_size=2)
    cache.data.normal_()
    expected = cache.data[:, :, 1].clone()
    cache.copy_blocks([(1, 3)])
    assert torch.equal(cache.data[:, :, 3], expected)


def test_prefix_cache_hit_revives_a_free_block_and_lru_eviction_takes_the_oldest():
    pool = BlockPool(3)
    tokens = list(range(8))
    hashes = chain_hashes(tokens, 4, max_blocks=2)
    t = BlockTable(4)
    t.reserve(pool, 8)
    t.register_full_blocks(pool, tokens, num_computed=8)
    cached = list(t.blocks)
    t.free(pool)
    assert pool.num_free == 3
    assert pool.lookup(hashes) == cached and pool.hit_blocks == 2
    for block in cached:
        pool.release(block)
    # Blocks were freed in order: the never-used block 2, then cached[0], cached[1]. Allocation evicts in that order.
    assert pool.allocate() == 2
    assert pool.allocate() == cached[0]
    assert pool.lookup(hashes) == []  # the chain's first block is gone, so nothing after it can hit
    pool.check()


def test_hash_depends_on_everything_before_the_block():
    same_tokens = [5, 6, 7, 8]
    assert block_hash(None, same_tokens) != block_hash(block_hash(None, [1, 2, 3, 4]), same_tokens)
    assert chain_hashes([1, 2, 3, 4] + same_tokens, 4, 9)[1] != chain_hashes([0, 2, 3, 4] + same_tokens, 4, 9)[1]


def test_prefix_caching_switch():
    pool = BlockPool(2, enable_prefix_caching=False)
    t = BlockTable(2)
    t.reserve(pool, 2)
    t.register_full_blocks(pool, [1, 2], 2)
    assert pool.lookup(chain_hashes([1, 2], 2, 1)) == []


def test_errors():
    pool = BlockPool(1)
    block = pool.allocate()
    with pytest.raises(RuntimeError, match="KV cache is full"):
        pool.allocate()
    pool.release(block)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(block)
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockPool(0)
