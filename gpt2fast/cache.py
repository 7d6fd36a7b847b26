"""Paged KV cache: a pool of fixed-size blocks, the tensors behind them, per-sequence block lists.

Layout (DESIGN.md): per layer, K and V are ``(num_blocks, n_head, block_size, head_dim)``, so one
block of one head is contiguous. A token's slot is ``block * block_size + offset``.
"""

from __future__ import annotations

import torch

from gpt2fast.config import GPT2Config


class KVCache:
    """The K and V tensors of every layer, carved from one allocation.

    Example:
        >>> cache = KVCache(GPT2Config(n_layer=2, n_embd=8, n_head=2), num_blocks=3, block_size=4)
        >>> cache.k[1].shape
        torch.Size([3, 2, 4, 4])
    """

    def __init__(
        self,
        config: GPT2Config,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (config.n_layer, 2, num_blocks, config.n_head, block_size, config.head_dim)
        self.data = torch.empty(shape, dtype=dtype, device=device)
        self.k = list(self.data[:, 0].unbind(0))  # n_layer x (NB, H, BS, D)
        self.v = list(self.data[:, 1].unbind(0))


class BlockPool:
    """Free list and reference counts of cache blocks.

    Invariant (``check()``): every block is free xor referenced, and a free block has count 0.

    Example:
        >>> pool = BlockPool(4); a = pool.allocate(); pool.num_free
        3
        >>> pool.release(a); pool.num_free
        4
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"KV cache is full: all {self.num_blocks} blocks are in use")
        block = self._free.pop()
        self.refcount[block] = 1
        return block

    def release(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise RuntimeError(f"block {block} released more often than referenced")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)

    def check(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for block, count in enumerate(self.refcount):
            if (block in free) == (count > 0) or count < 0:
                raise AssertionError(f"block {block}: refcount {count}, on free list: {block in free}")


class SequenceBlocks:
    """The blocks one sequence owns, growing as tokens are appended.

    Example:
        >>> seq = SequenceBlocks(BlockPool(4), block_size=2)
        >>> seq.append(3); seq.blocks, seq.num_tokens
        ([0, 1], 3)
    """

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool, self.block_size = pool, block_size
        self.blocks: list[int] = []
        self.num_tokens = 0

    def append(self, num_new: int) -> None:
        """Make room for ``num_new`` more tokens, allocating blocks as needed."""
        needed = -(-(self.num_tokens + num_new) // self.block_size)
        while len(self.blocks) < needed:
            self.blocks.append(self.pool.allocate())
        self.num_tokens += num_new

    def free(self) -> None:
        for block in self.blocks:
            self.pool.release(block)
        self.blocks, self.num_tokens = [], 0
