"""Paged KV cache: the tensors, a pool of refcounted blocks with a prefix cache, per-sequence block tables.

Layout (DESIGN.md): per layer, K and V are ``(num_blocks, n_head, block_size, head_dim)``, so one
block of one head is contiguous. A token's slot is ``block * block_size + offset``.

Sharing: a block may sit in several tables (``n > 1`` samples of one prompt; prefix-cache hits).
Full blocks are never written again, so they are shared freely; a *partial* shared block is
copied before it is appended to (copy-on-write). Full blocks are registered in the prefix cache
under a hash of their tokens and of every token before them; a free block keeps its cached
contents until it is reused, least recently used first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

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

    @staticmethod
    def bytes_per_block(config: GPT2Config, block_size: int, dtype: torch.dtype) -> int:
        return 2 * config.n_layer * block_size * config.n_embd * dtype.itemsize

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy every layer's K and V of block ``src`` into block ``dst`` for each ``(src, dst)``."""
        if pairs:
            src, dst = (torch.tensor(x, device=self.data.device) for x in zip(*pairs))
            self.data[:, :, dst] = self.data[:, :, src]


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Key of a full block: its tokens and (through ``parent``) every token before it.

    Example:
        >>> block_hash(None, [1, 2]) == block_hash(None, [1, 2]) != block_hash(block_hash(None, [0]), [1, 2])
        True
    """
    digest = hashlib.sha256(parent or b"")
    digest.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return digest.digest()


class BlockPool:
    """Free list, reference counts and the prefix cache of KV blocks.

    Invariants (``check()``): every block is free xor referenced; refcounts equal the number of
    tables holding the block (checked against the tables passed in); the prefix cache and its
    reverse map agree.

    Example:
        >>> pool = BlockPool(4); a = pool.allocate(); pool.num_free
        3
        >>> pool.release(a); pool.num_free
        4
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.refcount = [0] * num_blocks
        # Free blocks, least recently used first: allocation evicts from the front.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block holding those tokens
        self._hash_of: dict[int, bytes] = {}  # block -> its hash, for blocks in the prefix cache
        self.hit_blocks = 0  # prefix-cache hits, counted in blocks
        self.queried_blocks = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, whether or not they hold cached tokens)."""
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"KV cache is full: all {self.num_blocks} blocks are in use")
        block, _ = self._free.popitem(last=False)
        self._uncache(block)
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more table holds ``block``."""
        if self.refcount[block] <= 0:
            raise RuntimeError(f"block {block} is free; it cannot be shared")
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise RuntimeError(f"block {block} released more often than referenced")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free[block] = None  # most recently used: evicted last

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Take a reference on the cached blocks matching the longest prefix of ``hashes``."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            if self.refcount[block] == 0:
                del self._free[block]
            self.refcount[block] += 1
            blocks.append(block)
        self.queried_blocks += len(hashes)
        self.hit_blocks += len(blocks)
        return blocks

    def register(self, block: int, h: bytes) -> None:
        """Record that full ``block`` holds the tokens keyed by ``h`` (first writer wins)."""
        if self.enable_prefix_caching and h not in self._cached and block not in self._hash_of:
            self._cached[h] = block
            self._hash_of[block] = h

    def _uncache(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._cached[h]

    def check(self, tables: Sequence[Sequence[int]] | None = None) -> None:
        """Raise AssertionError if an invariant is broken; with ``tables``, also match refcounts to them."""
        for block, count in enumerate(self.refcount):
            if count < 0 or (block in self._free) == (count > 0):
                raise AssertionError(f"block {block}: refcount {count}, free: {block in self._free}")
        if any(self._cached.get(h) != b for b, h in self._hash_of.items()) or len(self._cached) != len(self._hash_of):
            raise AssertionError("prefix cache and its reverse map disagree")
        if tables is not None:
            held = [0] * self.num_blocks
            for table in tables:
                for block in table:
                    held[block] += 1
            if held != self.refcount:
                bad = next(b for b in range(self.num_blocks) if held[b] != self.refcount[b])
                raise AssertionError(f"block {bad}: refcount {self.refcount[bad]} but {held[bad]} tables hold it")


class BlockTable:
    """The blocks one sequence's tokens live in, with copy-on-write for shared partial blocks.

    Example:
        >>> pool = BlockPool(4); table = BlockTable(block_size=2)
        >>> table.reserve(pool, num_tokens=3)  # no shared block was written into: nothing to copy
        []
        >>> table.blocks
        [0, 1]
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: list[int] = []
        self.hashes: list[bytes] = []  # hashes of the leading full blocks registered so far

    def blocks_needed(self, pool: BlockPool, num_computed: int, num_tokens: int) -> int:
        """New blocks that ``reserve`` would take, copy-on-write included."""
        grow = max(0, -(-num_tokens // self.block_size) - len(self.blocks))
        return grow + int(self._needs_copy(pool, num_computed, num_tokens))

    def reserve(self, pool: BlockPool, num_tokens: int, num_computed: int = 0) -> list[tuple[int, int]]:
        """Make room to hold ``num_tokens`` tokens, writing from ``num_computed`` on.

        Returns the ``(src, dst)`` block copies the caller must apply to the KV tensors first.
        """
        copies = []
        if self._needs_copy(pool, num_computed, num_tokens):
            index = num_computed // self.block_size
            src, dst = self.blocks[index], pool.allocate()
            pool.release(src)
            self.blocks[index] = dst
            copies.append((src, dst))
        while len(self.blocks) * self.block_size < num_tokens:
            self.blocks.append(pool.allocate())
        return copies

    def _needs_copy(self, pool: BlockPool, num_computed: int, num_tokens: int) -> bool:
        index = num_computed // self.block_size
        writes_into_existing = num_tokens > num_computed and index < len(self.blocks)
        return writes_into_existing and pool.refcount[self.blocks[index]] > 1

    def fork(self, pool: BlockPool) -> BlockTable:
        """A second table holding the same blocks (each shared, not copied)."""
        twin = BlockTable(self.block_size)
        twin.blocks, twin.hashes = list(self.blocks), list(self.hashes)
        for block in self.blocks:
            pool.share(block)
        return twin

    def register_full_blocks(self, pool: BlockPool, token_ids: Sequence[int], num_computed: int) -> None:
        """Put every block whose tokens are all computed into the prefix cache."""
        done = len(self.hashes)
        if num_computed // self.block_size <= done:  # most decode steps: no block filled up
            return
        self.hashes = chain_hashes(token_ids, self.block_size, num_computed // self.block_size, self.hashes)
        for block, h in zip(self.blocks[done:], self.hashes[done:]):
            pool.register(block, h)

    def free(self, pool: BlockPool) -> None:
        for block in self.blocks:
            pool.release(block)
        self.blocks, self.hashes = [], []


def chain_hashes(
    token_ids: Sequence[int], block_size: int, max_blocks: int, known: Sequence[bytes] = ()
) -> list[bytes]:
    """Hashes of the first ``max_blocks`` full blocks of ``token_ids``, extending the ``known`` leading ones.

    Example:
        >>> len(chain_hashes(list(range(40)), 16, max_blocks=5))
        2
    """
    hashes = list(known)
    while len(hashes) < min(max_blocks, len(token_ids) // block_size):
        i = len(hashes)
        hashes.append(block_hash(hashes[-1] if hashes else None, token_ids[i * block_size:(i + 1) * block_size]))
    return hashes
