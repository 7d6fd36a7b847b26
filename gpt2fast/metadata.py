"""AttentionMetadata: what a model step needs to know about the flat batch's sequences.

A step runs any mix of prefills and decodes as one flat batch of T tokens. Sequence ``b``
contributes ``query_lens[b]`` tokens (the newest of its ``seq_lens[b]`` context tokens) and owns
cache blocks ``block_tables[b]``. Kernels read these tensors; nothing here depends on a backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat batch over the paged KV cache.

    Example:
        >>> m = AttentionMetadata.build(block_tables=[[7], [2, 5]], seq_lens=[3, 20], query_lens=[3, 1],
        ...                             block_size=16)
        >>> m.slot_mapping.tolist(), m.cu_seqlens_q.tolist(), m.logits_indices.tolist()
        ([112, 113, 114, 83], [0, 3, 4], [2, 3])
    """

    cu_seqlens_q: torch.Tensor  # (B + 1,) int32: query rows of sequence b are [cu[b], cu[b+1])
    seq_lens: torch.Tensor  # (B,) int32: context length of each sequence *including* this step's tokens
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with -1
    slot_mapping: torch.Tensor  # (T,) int64: block * block_size + offset, -1 = padding token (not stored)
    logits_indices: torch.Tensor  # (N,) int64: rows of the flat batch whose logits are wanted
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        seq_lens: Sequence[int],
        query_lens: Sequence[int],
        *,
        block_size: int,
        all_logits: bool = False,
        needs_logits: Sequence[bool] | None = None,
        max_blocks: int | None = None,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Lay out a step from host-side lists.

        Logits rows: every token if ``all_logits``; else the last token of each sequence with
        ``needs_logits[b]`` (default: every sequence with tokens in this step).

        ``block_tables`` is padded with -1 to ``max_blocks`` columns when given (the engine passes
        ``n_positions / block_size``), else to the widest table. A fixed width keeps the decode
        kernels' grids a function of the batch size alone, so a captured CUDA graph replays at any
        context length.

        Example:
            >>> AttentionMetadata.build([[0]], [1], [1], block_size=16).seq_lens.tolist()
            [1]
            >>> AttentionMetadata.build([[4]], [1], [1], block_size=16, max_blocks=3).block_tables.tolist()
            [[4, -1, -1]]
        """
        if not len(block_tables) == len(seq_lens) == len(query_lens):
            raise ValueError("block_tables, seq_lens and query_lens must have one entry per sequence")
        widest = max((len(t) for t in block_tables), default=0)
        if max_blocks is not None and widest > max_blocks:
            raise ValueError(f"a block table has {widest} blocks, more than max_blocks={max_blocks}")
        slots: list[int] = []
        cu = [0]
        for table, seq_len, q_len in zip(block_tables, seq_lens, query_lens):
            if not 0 <= q_len <= seq_len <= len(table) * block_size:
                raise ValueError(
                    f"need 0 <= query_len ({q_len}) <= seq_len ({seq_len}) <= blocks * block_size "
                    f"({len(table)} * {block_size})"
                )
            slots += [table[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
            cu.append(cu[-1] + q_len)
        width = widest if max_blocks is None else max_blocks
        if all_logits:
            logits_rows = list(range(cu[-1]))
        else:
            wanted = needs_logits if needs_logits is not None else [q > 0 for q in query_lens]
            logits_rows = [end - 1 for end, want in zip(cu[1:], wanted) if want]
        # One host-to-device transfer per dtype: each tensor creation costs ~7 us, a decode step has few to spare.
        int32 = torch.tensor(cu + list(seq_lens) + [b for t in block_tables for b in (*t, *[-1] * (width - len(t)))],
                             dtype=torch.int32, device=device)
        int64 = torch.tensor(slots + logits_rows, dtype=torch.int64, device=device)
        num_seqs, num_tokens = len(seq_lens), len(slots)
        return cls(
            cu_seqlens_q=int32[: num_seqs + 1],
            seq_lens=int32[num_seqs + 1: 2 * num_seqs + 1],
            block_tables=int32[2 * num_seqs + 1:].view(num_seqs, width),
            slot_mapping=int64[:num_tokens],
            logits_indices=int64[num_tokens:],
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
        )
