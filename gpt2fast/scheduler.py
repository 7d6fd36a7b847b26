"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every sequence has ``pending = len(token_ids) - num_computed`` tokens whose K/V are not yet in the
cache: its whole prompt when it arrives, one token per decode step, the lot again after a
preemption. A step is one flat batch mixing all of them under a token budget; a prompt longer
than what is left of the budget is prefilled in chunks over several steps.

Order: running sequences first (oldest first), then waiting ones (first come, first served).
When the pool runs out of blocks, the newest running sequence is preempted: its blocks are
released and it waits again at the front, to be recomputed (the prefix cache usually still holds
its blocks). The oldest sequence therefore always progresses, and every request finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from gpt2fast.cache import BlockPool, BlockTable, chain_hashes


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of one request: its tokens and where their K/V live.

    Example:
        >>> seq = Sequence(request_id="r", sample_index=0, token_ids=[1, 2, 3], num_prompt=3, table=BlockTable(16))
        >>> seq.pending, seq.output_ids
        (3, [])
    """

    request_id: str
    sample_index: int
    token_ids: list[int]  # prompt + generated
    num_prompt: int
    table: BlockTable
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    fork_n: int = 1  # samples to split into when the prompt is done (n > 1 share one prefill)
    status: Status = Status.WAITING
    all_logits: bool = False  # prompt scoring: every position's logits, so never served from the prefix cache

    @property
    def pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        """``len(output_ids)`` without the copy."""
        return len(self.token_ids) - self.num_prompt


@dataclass
class Batch:
    """What one model step computes: ``num_new[i]`` tokens of ``seqs[i]``, after applying ``copies``."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks

    def needs_logits(self, i: int) -> bool:
        """Sequence ``i`` reaches its last token this step, so its next token is sampled."""
        return self.seqs[i].num_computed + self.num_new[i] == len(self.seqs[i].token_ids)


class Scheduler:
    """Waiting and running queues over one block pool.

    Example:
        >>> sched = Scheduler(BlockPool(8), block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
        >>> sched.add(Sequence("a", 0, [5, 6, 7, 8, 9], 5, BlockTable(4)))
        >>> batch = sched.schedule(); batch.num_new, batch.seqs[0].table.blocks
        ([5], [0, 1])
    """

    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool, self.block_size = pool, block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.pending, budget)
            while not self._reserve(seq, num_new, batch):
                self._preempt(self.running.pop())
                preempted = True
                if seq.status is Status.WAITING:  # it was the newest itself
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new.append(num_new)
                budget -= num_new
                i += 1
        # After a preemption the pool is tight: admitting new work now would only preempt it again.
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if not self.can_admit(seq):
                break
            if seq.num_computed == 0 and not seq.all_logits:
                self._use_prefix_cache(seq)
            num_new = min(seq.pending, budget)
            if not self._reserve(seq, num_new, batch):
                if seq.status is Status.WAITING and seq.table.blocks:  # give back its prefix-cache hits meanwhile
                    seq.table.free(self.pool)
                    seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(num_new)
            budget -= num_new
        return batch

    def can_admit(self, seq: Sequence, leaving: int = 0) -> bool:
        """``max_num_seqs`` leaves room for ``seq`` and all its samples, counting those of running prompts that
        have not split into their samples yet (``fork_n``); ``leaving``: running sequences known to end first.

        Example:
            >>> sched = Scheduler(BlockPool(8), block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
            >>> sched.running.append(Sequence("a", 0, [1], 1, BlockTable(4), fork_n=3))
            >>> sched.can_admit(Sequence("b", 0, [2], 1, BlockTable(4))), sched.can_admit(Sequence("c", 0, [2], 1,
            ...     BlockTable(4), fork_n=2))
            (True, False)
        """
        return sum(s.fork_n for s in self.running) - leaving + seq.fork_n <= self.max_num_seqs

    def _reserve(self, seq: Sequence, num_new: int, batch: Batch) -> bool:
        """Give ``seq`` the blocks for ``num_new`` more tokens, or return False if the pool lacks them."""
        end = seq.num_computed + num_new
        if seq.table.blocks_needed(self.pool, seq.num_computed, end) > self.pool.num_free:
            return False
        batch.copies += seq.table.reserve(self.pool, end, seq.num_computed)
        return True

    def _use_prefix_cache(self, seq: Sequence) -> None:
        # At least the last token is computed, so the step yields logits to sample from.
        hashes = chain_hashes(seq.token_ids, self.block_size, (len(seq.token_ids) - 1) // self.block_size)
        blocks = self.pool.lookup(hashes)
        seq.table.blocks, seq.table.hashes = blocks, hashes[: len(blocks)]
        seq.num_computed = len(blocks) * self.block_size

    def _preempt(self, seq: Sequence) -> None:
        seq.table.free(self.pool)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def reserve_ahead(self, seqs: list[Sequence]) -> Batch | None:
        """A decode step of ``seqs`` whose input tokens are not in ``token_ids`` yet (the step before is still
        choosing them, on the device): blocks for one more token each, or None when the pool lacks them (this
        never preempts). ``step_done`` follows once those tokens are appended.

        Example:
            >>> sched = Scheduler(BlockPool(2), block_size=2, max_num_seqs=2, max_num_batched_tokens=8)
            >>> sched.add(Sequence("a", 0, [5, 6], 2, BlockTable(2)))
            >>> sched.step_done(sched.schedule())  # the prompt fills block 0; its next token needs block 1
            >>> sched.reserve_ahead(sched.running).num_new, sched.running[0].table.blocks
            ([1], [0, 1])
        """
        if sum(s.table.blocks_needed(self.pool, s.num_computed, s.num_computed + 1) for s in seqs) > self.pool.num_free:
            return None
        batch = Batch(list(seqs), [1] * len(seqs))
        for seq in seqs:
            batch.copies += seq.table.reserve(self.pool, seq.num_computed + 1, seq.num_computed)
        return batch

    def step_done(self, batch: Batch) -> None:
        """The model computed the batch: advance each sequence and cache its newly full blocks."""
        for seq, num_new in zip(batch.seqs, batch.num_new):
            seq.num_computed += num_new
            seq.table.register_full_blocks(self.pool, seq.token_ids, seq.num_computed)

    def fork(self, seq: Sequence, sample_index: int) -> Sequence:
        """A running sibling of ``seq`` sharing its blocks (for ``n > 1`` samples of one prompt)."""
        twin = Sequence(seq.request_id, sample_index, list(seq.token_ids), seq.num_prompt, seq.table.fork(self.pool),
                        seq.num_computed, status=Status.RUNNING)
        self.running.append(twin)
        return twin

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that is done or aborted, wherever it is."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.table.free(self.pool)
        seq.status = Status.FINISHED

    def check(self) -> None:
        """The pool's invariants, with refcounts matched against every live table."""
        self.pool.check([s.table.blocks for s in (*self.running, *self.waiting)])
