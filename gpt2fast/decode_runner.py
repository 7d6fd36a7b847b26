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
* every value of a step (token ids, positions, slots, the metadata, and the per-row temperatures,
  top-k/top-p/min-p and Philox seeds of the token choice) is written into one staging buffer
  (pinned host memory on CUDA, two halves used in turn) and reaches the device in **one**
  asynchronous copy;
* the chosen tokens stay on the device (``_tokens``): the next step may take a row's input token
  from there (``from_previous``) before the host has seen it, which is how the engine launches step
  N+1 before it reads step N's tokens (``Engine(async_scheduling=True)``). They also go to the host
  in one asynchronous copy, read when the engine asks (``PendingTokens.result``).

Three modes per bucket: ``"tokens"`` runs the body and lets the LM head pick every row's token
(``ops.lm_head_gumbel``; temperature 0 rows take the argmax), ``"sampled"`` writes the logits and
draws with the backend's top-k/top-p/min-p sampler (``ops.sample_top_k_top_p``), ``"hidden"`` stops
at the final LayerNorm for rows whose logits a host-side processor needs (penalties, logprobs, logit
bias). On CUDA each (bucket, mode) is captured on first use (after one warm-up run that compiles the
kernels) and replayed; elsewhere the same static-buffer path runs eagerly, which is how the CPU tests
prove the padding and buffers right. ``SimulatedDevice`` stands in for the replay to measure the
engine's overlap on a CPU (``benchmarks/bench_runtime.py --simulated-device-us``).

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

import time
from collections.abc import Sequence

import torch

from gpt2fast.cache import KVCache
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.model import GPT2
from gpt2fast.sampling import flag_nonfinite, row_check, zero_nonfinite_rows

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MODES = ("tokens", "sampled", "hidden")
TOKEN_MODES = ("tokens", "sampled")


def _layout(n: int, width: int) -> dict[str, tuple[int, torch.dtype, int]]:
    """Where each staged value of bucket ``n`` lies in the staging buffer: name -> (byte offset, dtype, count).

    Every field starts on an 8-byte boundary, so each is a plain view of the one buffer.

    Example:
        >>> _layout(2, 3)["tables"]
        (136, torch.int32, 6)
    """
    fields = [("ids", torch.int64, n), ("positions", torch.int64, n), ("slots", torch.int64, n),
              ("src", torch.int64, n), ("seeds", torch.int64, n), ("temperature", torch.float32, n),
              ("top_p", torch.float32, n), ("min_p", torch.float32, n), ("top_k", torch.int32, n),
              ("cu_seqlens", torch.int32, n + 1), ("seq_lens", torch.int32, n), ("tables", torch.int32, n * width)]
    layout, offset = {}, 0
    for name, dtype, count in fields:
        layout[name] = (offset, dtype, count)
        offset += -(-count * dtype.itemsize // 8) * 8
    return layout


def _nbytes(layout: dict[str, tuple[int, torch.dtype, int]]) -> int:
    offset, dtype, count = max(layout.values(), key=lambda f: f[0])
    return offset + -(-count * dtype.itemsize // 8) * 8


class PendingTokens:
    """The token ids a launched decode step chose, on their way to the host: ``result()`` waits for them.

    Example:
        >>> PendingTokens(torch.tensor([4, 2, 0]), 2).result()
        [4, 2]
    """

    def __init__(self, tokens: torch.Tensor, num_rows: int, event: torch.cuda.Event | None = None) -> None:
        self._tokens, self._num_rows, self._event = tokens, num_rows, event

    def result(self) -> list[int]:
        """The chosen ids, one per real row (-1: the row went non-finite); blocks until the step is done."""
        if self._event is not None:
            self._event.synchronize()
        return self._tokens[: self._num_rows].tolist()


class SimulatedDevice:
    """A stand-in for the GPU behind a ``DecodeRunner``: a launched step "runs" for ``device_us`` microseconds
    after the previous one ends (one stream), and reading its tokens waits until then, spinning.

    The host's work stays real (scheduling, staging, bookkeeping, text), the device's is a clock: what
    proves on a CPU that the engine keeps the device busy. Tokens are made up (a fixed cycle over the
    vocabulary), so use it with ``ignore_eos``. ``log`` records ``("launch", k)`` and ``("sync", k)`` in
    the order they happen; ``waited_s`` the host's total wait.

    Example:
        >>> device = SimulatedDevice(50.0, vocab_size=7)
        >>> first, second = device.launch(2), device.launch(1)
        >>> first.result(), second.result(), device.log
        ([0, 3], [2], [('launch', 0), ('launch', 1), ('sync', 0), ('sync', 1)])
    """

    def __init__(self, device_us: float, vocab_size: int) -> None:
        if not device_us > 0:
            raise ValueError(f"device_us must be positive, got {device_us!r}")
        self.device_us, self.vocab_size = float(device_us), vocab_size
        self.free_at = 0.0  # perf_counter seconds when the last launched step completes
        self.launched = 0
        self.waited_s = 0.0
        self.log: list[tuple[str, int]] = []

    def launch(self, num_rows: int) -> PendingTokens:
        step = self.launched
        self.launched += 1
        self.free_at = max(time.perf_counter(), self.free_at) + self.device_us * 1e-6
        self.log.append(("launch", step))
        tokens = [(step * 2 + 3 * i) % self.vocab_size for i in range(num_rows)]
        return _SimulatedTokens(self, step, self.free_at, tokens)


class _SimulatedTokens(PendingTokens):
    def __init__(self, device: SimulatedDevice, step: int, done_at: float, tokens: list[int]) -> None:
        self._device, self._step, self._done_at, self._ids = device, step, done_at, tokens

    def result(self) -> list[int]:
        start = now = time.perf_counter()
        while now < self._done_at:
            now = time.perf_counter()
        self._device.waited_s += now - start
        self._device.log.append(("sync", self._step))
        return self._ids


class DecodeRunner:
    """Runs decode steps of up to ``max_num_seqs`` sequences through static buffers (CUDA graphs on CUDA)."""

    def __init__(self, model: GPT2, cache: KVCache, max_num_seqs: int, use_graphs: bool | None = None) -> None:
        cfg = model.config
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.max_blocks = -(-cfg.n_positions // self.block_size)
        self.vocab_size = cfg.vocab_size
        self.buckets = [b for b in BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.device = cache.data.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {self.device}")
        n, dev, cuda = self.buckets[-1], self.device, self.device.type == "cuda"
        self._layouts = {b: _layout(b, self.max_blocks) for b in self.buckets}
        size = max(_nbytes(layout) for layout in self._layouts.values())
        self._staged = torch.zeros(size, dtype=torch.uint8, device=dev)  # every value of a step, on the device
        self._staging = torch.zeros(2, size, dtype=torch.uint8, pin_memory=cuda)  # host halves, used in turn
        self._host_views = [{b: self._views(self._staging[half], b, numpy=True) for b in self.buckets}
                            for half in range(2)]
        self._device_views = {b: self._views(self._staged, b) for b in self.buckets}
        sizes = {b: _nbytes(self._layouts[b]) for b in self.buckets}  # each bucket's copy: (source, destination)
        self._copies = [{b: (self._staging[half, :size], self._staged[:size]) for b, size in sizes.items()}
                        for half in range(2)]
        self._rows = torch.arange(n, device=dev)  # logits rows: one per sequence, never restaged
        self._tokens = torch.zeros(n, dtype=torch.int64, device=dev)  # the last token step's choices, kept
        self._host_tokens = torch.zeros(2, n, dtype=torch.int64, pin_memory=cuda)
        self._events = [torch.cuda.Event() for _ in range(2)] if cuda else [None, None]
        self._half = 0
        self._graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # one memory pool for all graphs
        self.simulator: SimulatedDevice | None = None

    def _views(self, buffer: torch.Tensor, n: int, numpy: bool = False) -> dict:
        views = {}
        for name, (offset, dtype, count) in self._layouts[n].items():
            view = buffer[offset : offset + count * dtype.itemsize].view(dtype)
            views[name] = view.numpy() if numpy else view
        if numpy:
            views["tables"] = views["tables"].reshape(n, self.max_blocks)
        return views

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

    def simulate(self, device_us: float) -> SimulatedDevice:
        """Replace the replay by a ``SimulatedDevice`` of ``device_us`` per step (token modes only)."""
        self.simulator = SimulatedDevice(device_us, self.vocab_size)
        return self.simulator

    def run(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        mode: str = "tokens",
        temperature: Sequence[float] | None = None,
        seeds: Sequence[int] | None = None,
        **sampling: Sequence,
    ) -> torch.Tensor:
        """One decode step, waited for: sequence ``i`` adds ``token_ids[i]`` at ``positions[i]`` (its context
        is ``positions[i] + 1`` tokens, in pages ``block_tables[i]``).

        Token modes return the chosen ids ``(b,)`` int64 (-1 for a row that went non-finite);
        ``mode="hidden"`` returns the final hidden rows ``(b, C)``. Arguments as ``launch``.
        """
        if mode == "hidden":
            b, n = self._stage(token_ids, positions, block_tables, mode, temperature, seeds, None, sampling)
            return self._replay(n, mode)[:b]
        pending = self.launch(token_ids, positions, block_tables, mode, temperature, seeds, **sampling)
        return torch.tensor(pending.result(), dtype=torch.int64)

    def launch(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        mode: str = "tokens",
        temperature: Sequence[float] | None = None,
        seeds: Sequence[int] | None = None,
        from_previous: Sequence[int] | None = None,
        *,
        top_k: Sequence[int] | None = None,
        top_p: Sequence[float] | None = None,
        min_p: Sequence[float] | None = None,
    ) -> PendingTokens:
        """Launch one token-choosing decode step and return at once; ``.result()`` of the answer waits.

        ``temperature``/``seeds`` per row, as ``ops.lm_head_gumbel`` takes them; ``mode="sampled"`` also takes
        ``top_k`` (0: off)/``top_p``/``min_p`` per row, as ``ops.sample_top_k_top_p``. ``from_previous[i] >= 0``
        makes row ``i``'s input token the one the previous token step chose in its row ``from_previous[i]``,
        still on the device (``token_ids[i]`` is then ignored).

        Example:
            >>> from gpt2fast.config import GPT2Config
            >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8)
            >>> runner = DecodeRunner(GPT2(cfg).init_random(), KVCache(cfg, num_blocks=2, block_size=4), 2)
            >>> first = runner.launch([5], [0], [[0]], temperature=[0.0], seeds=[1])
            >>> second = runner.launch([0], [1], [[0]], temperature=[0.0], seeds=[2], from_previous=[0])
            >>> chosen = first.result()  # the host sees step 1's token only now; step 2 already used it
            >>> second.result() == runner.run(chosen, [1], [[0]], temperature=[0.0], seeds=[2]).tolist()
            True
        """
        if mode not in TOKEN_MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}" if mode not in MODES else
                             f"launch runs the token modes {TOKEN_MODES}; use run() for {mode!r}")
        sampling = dict(top_k=top_k, top_p=top_p, min_p=min_p)
        b, n = self._stage(token_ids, positions, block_tables, mode, temperature, seeds, from_previous, sampling)
        if self.simulator is not None:
            return self.simulator.launch(b)
        out = self._replay(n, mode)
        event = self._events[self._half]
        if event is None:  # a CPU: the step already ran
            return PendingTokens(out, b)
        host = self._host_tokens[self._half]
        host[:n].copy_(self._tokens[:n], non_blocking=True)
        event.record()
        return PendingTokens(host, b, event)

    def _replay(self, n: int, mode: str) -> torch.Tensor:
        if not self.use_graphs:
            return self._step(n, mode)
        key = (n, mode)
        if key not in self._graphs:
            self._graphs[key] = self._capture(n, mode)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _stage(self, token_ids, positions, block_tables, mode, temperature, seeds, from_previous, sampling
               ) -> tuple[int, int]:
        """Write this step's values, padding rows ``b..n-1``, into a host staging half; copy it to the device
        in one asynchronous copy. Returns ``(b, n)``: real rows, bucket."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        b = len(token_ids)
        if not b or not len(positions) == len(block_tables) == b:
            raise ValueError("token_ids, positions and block_tables need one entry per sequence, at least one")
        if from_previous is not None and len(from_previous) != b:
            raise ValueError("from_previous needs one entry per sequence")
        n, bs, width = self.bucket(b), self.block_size, self.max_blocks
        if mode != "hidden" and (temperature is None or seeds is None or len(temperature) != b or len(seeds) != b):
            raise ValueError(f"mode={mode!r} needs a temperature and a seed per sequence")
        if mode == "sampled" and any(v is None or len(v) != b for v in sampling.values()):
            raise ValueError("mode='sampled' needs top_k, top_p and min_p per sequence")
        self._half ^= 1
        v = self._host_views[self._half][n]
        tables = v["tables"]
        tables.fill(-1)
        slots = v["slots"]
        for i, (pos, table) in enumerate(zip(positions, block_tables)):
            page = pos // bs
            if len(table) > width or page >= len(table) or table[page] < 0:
                raise ValueError(f"position {pos} has no page in block table {list(table)}")
            slots[i] = table[page] * bs + pos % bs
            tables[i, : len(table)] = table
        slots[b:] = -1
        v["ids"][:b], v["ids"][b:] = token_ids, 0
        v["src"][:b], v["src"][b:] = from_previous if from_previous is not None else -1, -1
        v["positions"][:b], v["positions"][b:] = positions, 0
        v["cu_seqlens"][: b + 1], v["cu_seqlens"][b + 1 :] = range(b + 1), b
        v["seq_lens"][:b], v["seq_lens"][b:] = positions, 0
        v["seq_lens"][:b] += 1
        if mode != "hidden":
            v["temperature"][:b], v["temperature"][b:] = temperature, 0.0
            v["seeds"][:b], v["seeds"][b:] = seeds, 0
        if mode == "sampled":
            v["top_k"][:b], v["top_k"][b:] = sampling["top_k"], 0
            v["top_p"][:b], v["top_p"][b:] = sampling["top_p"], 1.0
            v["min_p"][:b], v["min_p"][b:] = sampling["min_p"], 0.0
        source, destination = self._copies[self._half][n]
        destination.copy_(source, non_blocking=True)
        return b, n

    def _meta(self, n: int) -> AttentionMetadata:
        v = self._device_views[n]
        return AttentionMetadata(
            cu_seqlens_q=v["cu_seqlens"],
            seq_lens=v["seq_lens"],
            block_tables=v["tables"].view(n, self.max_blocks),
            slot_mapping=v["slots"],
            logits_indices=self._rows[:n],
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,  # an upper bound: the shapes must not depend on this step
        )

    def _step(self, n: int, mode: str) -> torch.Tensor:
        """The step itself, on the static buffers of bucket ``n`` (what a graph captures)."""
        model, v = self.model, self._device_views[n]
        src = v["src"]
        # A row's token from the previous step, still on the device (clamped: a non-finite row's -1 is dropped
        # by the engine, but it must not index the embedding meanwhile), else the staged one.
        ids = torch.where(src < 0, v["ids"], self._tokens[src.clamp(min=0)].clamp(min=0))  # (n,)
        hidden = model.hidden(ids, v["positions"], self.cache, self._meta(n))  # (n, C)
        if mode == "hidden":
            return hidden
        if mode == "tokens":
            tokens = model.ops.lm_head_gumbel(hidden, model.wte_weight, v["temperature"], v["seeds"])  # (n,)
            tokens = flag_nonfinite(tokens, row_check(hidden), hidden=True)  # in the graph, read with the tokens
        else:
            logits = model.ops.lm_head(hidden, model.wte_weight)  # (n, V)
            check = row_check(logits)  # (n,)
            tokens = model.ops.sample_top_k_top_p(zero_nonfinite_rows(logits, check), v["temperature"], v["top_k"],
                                                  v["top_p"], v["seeds"], v["min_p"])  # (n,)
            tokens = flag_nonfinite(tokens, check)
        self._tokens[:n].copy_(tokens)
        return tokens

    def _capture(self, n: int, mode: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compiles the kernels, settles the allocator) on a side stream, then capture.

        The warm-up writes the same K/V the replay will; it must leave ``_tokens`` as it found them."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            kept = self._tokens.clone()  # the warm-up overwrites the previous step's tokens, which the replay reads
            self._step(n, mode)
            self._tokens.copy_(kept)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(n, mode)
        return graph, out
