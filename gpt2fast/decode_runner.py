"""Decode steps over static buffers, one set of shapes per batch-size bucket: what CUDA graphs replay.

A decode step (every sequence adds one token) has the same shapes whenever its batch size is the
same, so it can be captured once as a CUDA graph and replayed: one launch instead of ~150, which
at GPT-2 124M is most of a step's time (``gpt2fast.roofline``). A graph replays fixed device
addresses, so everything a step reads lives in buffers allocated once, here, and each step only
copies its values in:

* the batch is padded up to its bucket (1, 2, 4, 8, 16, 32, 64, ..., ``max_num_seqs``); a padding
  row has token 0, slot ``-1`` (``write_kv`` skips it) and owns no query (``cu_seqlens`` stops
  growing), so attention writes nothing for it and it never touches the cache;
* block tables have one fixed width (``n_positions / block_size``), so the decode attention's
  split count, and with it every grid, depends on the bucket alone;
* the per-row temperatures and Philox seeds of the fused token choice are device buffers too, so
  each replay samples fresh tokens.

Two modes per bucket: ``"tokens"`` runs the body and lets the LM head pick every row's token
(``ops.lm_head_gumbel``; temperature 0 rows take the argmax), ``"hidden"`` stops at the final
LayerNorm for rows whose logits a processor needs. On CUDA each (bucket, mode) is captured on
first use (after one warm-up run that compiles the kernels) and replayed; elsewhere the same
static-buffer path runs eagerly, which is how the CPU tests prove the padding and buffers right.

Example:
    >>> from gpt2fast.cache import KVCache
    >>> from gpt2fast.config import GPT2Config
    >>> from gpt2fast.model import GPT2
    >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8)
    >>> model, cache = GPT2(cfg).init_random(seed=0), KVCache(cfg, num_blocks=2, block_size=4)
    >>> runner = DecodeRunner(model, cache, max_num_seqs=3)
    >>> runner.buckets
    [1, 2, 3]
    >>> runner.run([5], [0], [[1, -1]], mode="hidden").shape  # one token at position 0, page 1
    torch.Size([1, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpt2fast.cache import KVCache
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.model import GPT2
from gpt2fast.sampling import flag_nonfinite, row_check

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MODES = ("tokens", "hidden")


class DecodeRunner:
    """Runs decode steps of up to ``max_num_seqs`` sequences through static buffers (CUDA graphs on CUDA)."""

    def __init__(self, model: GPT2, cache: KVCache, max_num_seqs: int, use_graphs: bool | None = None) -> None:
        cfg = model.config
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.max_blocks = -(-cfg.n_positions // self.block_size)
        self.buckets = [b for b in BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.device = cache.data.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {self.device}")
        n, dev = self.buckets[-1], self.device
        # One int64 block: token ids, positions, slots, logits rows (arange) -> one copy per step.
        self._int64 = torch.zeros(4, n, dtype=torch.int64, device=dev)  # (4, B)
        self._int64[3] = torch.arange(n, device=dev)
        # One int32 block: cu_seqlens (B + 1), seq_lens (B), then the block tables (B, max_blocks).
        self._int32 = torch.zeros(2 * n + 1 + n * self.max_blocks, dtype=torch.int32, device=dev)
        self._temperature = torch.zeros(n, dtype=torch.float32, device=dev)  # (B,)
        self._seeds = torch.zeros(n, dtype=torch.int64, device=dev)  # (B,)
        self._graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # one memory pool for all graphs

    def bucket(self, num_seqs: int) -> int:
        """The smallest bucket holding ``num_seqs`` sequences.

        Example:
            >>> from gpt2fast.config import GPT2Config
            >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8)
            >>> runner = DecodeRunner(GPT2(cfg).init_random(), KVCache(cfg, num_blocks=2, block_size=4), 6)
            >>> runner.buckets, runner.bucket(3)
            ([1, 2, 4, 6], 4)
        """
        for b in self.buckets:
            if b >= num_seqs:
                return b
        raise ValueError(f"{num_seqs} sequences exceed the largest decode bucket ({self.buckets[-1]})")

    def run(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        mode: str = "tokens",
        temperature: Sequence[float] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One decode step: sequence ``i`` adds ``token_ids[i]`` at ``positions[i]`` (its context is
        ``positions[i] + 1`` tokens, in pages ``block_tables[i]``).

        ``mode="tokens"``: returns the chosen token ids ``(b,)`` (``temperature``/``seeds`` per row, as
        ``ops.lm_head_gumbel`` takes them; -1 for a row whose hidden state went non-finite, whose logits
        are never written); ``mode="hidden"``: the final hidden rows ``(b, C)``.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        b = len(token_ids)
        if not b or not len(positions) == len(block_tables) == b:
            raise ValueError("token_ids, positions and block_tables need one entry per sequence, at least one")
        n = self.bucket(b)
        self._stage(token_ids, positions, block_tables, n, temperature, seeds, mode)
        if not self.use_graphs:
            return self._step(n, mode)[:b]
        key = (n, mode)
        if key not in self._graphs:
            self._graphs[key] = self._capture(n, mode)
        graph, out = self._graphs[key]
        graph.replay()
        return out[:b]

    def _stage(self, token_ids, positions, block_tables, n, temperature, seeds, mode) -> None:
        """Copy this step's values into the static buffers, padding rows ``b..n-1``."""
        b, bs, width = len(token_ids), self.block_size, self.max_blocks
        slots = []
        for pos, table in zip(positions, block_tables):
            if len(table) > width or pos // bs >= len(table) or table[pos // bs] < 0:
                raise ValueError(f"position {pos} has no page in block table {list(table)}")
            slots.append(table[pos // bs] * bs + pos % bs)
        pad = n - b
        int64 = torch.tensor([[*token_ids, *[0] * pad], [*positions, *[0] * pad], [*slots, *[-1] * pad]])  # (3, n)
        self._int64[:3, :n].copy_(int64, non_blocking=True)
        tables = [t for table in block_tables for t in (*table, *[-1] * (width - len(table)))]
        int32 = torch.tensor([*range(b + 1), *[b] * pad, *[p + 1 for p in positions], *[0] * pad,
                              *tables, *[-1] * (pad * width)], dtype=torch.int32)  # fmt: skip
        self._int32[: int32.numel()].copy_(int32, non_blocking=True)  # cu_seqlens, seq_lens and tables of n rows
        if mode == "tokens":
            if temperature is None or seeds is None or len(temperature) != b or len(seeds) != b:
                raise ValueError("mode='tokens' needs a temperature and a seed per sequence")
            self._temperature[:n].copy_(torch.tensor([*temperature, *[0.0] * pad], dtype=torch.float32))
            self._seeds[:n].copy_(torch.tensor([*seeds, *[0] * pad], dtype=torch.int64))

    def _meta(self, n: int) -> AttentionMetadata:
        width = self.max_blocks
        return AttentionMetadata(
            cu_seqlens_q=self._int32[: n + 1],
            seq_lens=self._int32[n + 1 : 2 * n + 1],
            block_tables=self._int32[2 * n + 1 : 2 * n + 1 + n * width].view(n, width),
            slot_mapping=self._int64[2, :n],
            logits_indices=self._int64[3, :n],
            max_query_len=1,
            max_seq_len=width * self.block_size,  # an upper bound: the shapes must not depend on this step
        )

    def _step(self, n: int, mode: str) -> torch.Tensor:
        """The step itself, on the static buffers of bucket ``n`` (what a graph captures)."""
        model = self.model
        hidden = model.hidden(self._int64[0, :n], self._int64[1, :n], self.cache, self._meta(n))  # (n, C)
        if mode == "hidden":
            return hidden
        tokens = model.ops.lm_head_gumbel(hidden, model.wte_weight, self._temperature[:n], self._seeds[:n])  # (n,)
        return flag_nonfinite(tokens, row_check(hidden), hidden=True)  # (n,): in the graph, read with the tokens

    def _capture(self, n: int, mode: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compiles the kernels, settles the allocator) on a side stream, then capture."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step(n, mode)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(n, mode)
        return graph, out
