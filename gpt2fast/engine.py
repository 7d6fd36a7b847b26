"""The runtime: ``Engine`` (requests in, one batched model step at a time) and ``LLM`` on top of it.

``Engine`` is what a serving stack embeds: ``add_request``, ``step() -> [RequestOutput]``,
``abort``, ``has_unfinished``. Each step the scheduler picks a flat batch mixing prefills and
decodes over the paged KV cache, the model runs it once, and the sampler picks every sequence's
next token with its own settings. ``LLM`` runs offline batches and streams.
"""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from gpt2fast.cache import BlockPool, BlockTable, KVCache
from gpt2fast.checkpoint import available_memory, load_checkpoint
from gpt2fast.decode_runner import DecodeRunner, PendingTokens
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.model import GPT2, AttentionCapture
from gpt2fast.ops import check_quantization_support, default_backend, get_ops
from gpt2fast.outputs import CompletionOutput, GenerationError, RequestOutput
from gpt2fast.quant import check_quantization
from gpt2fast.sampling import (
    NONFINITE,
    SampledToken,
    SampleRow,
    SamplingParams,
    as_sampled,
    flag_nonfinite,
    row_check,
    row_seed,
    row_seed_at,
    row_seed_base,
    sample_batch,
    zero_nonfinite_rows,
)
from gpt2fast.scheduler import Batch, Scheduler, Status
from gpt2fast.scheduler import Sequence as Seq
from gpt2fast.tokenizer import load_tokenizer
from gpt2fast.trace import AttentionTrace, NextToken

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

Prompt = str | Sequence[int]
CPU_KV_CACHE_CONTEXTS = 8  # the CPU cache's default size at most: this many full contexts


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; an explicit CUDA request without CUDA raises.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but this PyTorch sees no CUDA GPU; use device='cpu'")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> fp16 on CUDA, fp32 on CPU; names like ``"bf16"`` or torch dtypes otherwise.

    Example:
        >>> resolve_dtype("auto", torch.device("cpu")), resolve_dtype("bf16", torch.device("cpu"))
        (torch.float32, torch.bfloat16)
    """
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use 'auto', 'float32', 'float16' or 'bfloat16'")


def _free_memory(device: torch.device) -> int | None:
    """Bytes free for the KV cache: the GPU's free memory, or the host's available memory (page cache included);
    None where the platform does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(eq=False)
class _Sample:
    """Output state of one sample: text decoded so far and why it ended."""

    index: int
    text: str = ""
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    seq: Seq | None = None
    error: str | None = None  # with finish_reason "error"


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    samples: list[_Sample]
    prompt_logprobs: list[dict[int, float] | None] | None = None  # a scoring request's, filled as it prefills
    prompt_ranks: list[int | None] | None = None  # each prompt token's rank at its position (1 = likeliest)
    top_n: int = 0  # a scoring request's top tokens per position
    stop_ids: frozenset[int] = frozenset()  # params.stop_token_ids, for membership tests
    banned: torch.Tensor | None = None  # (K,) int64: the tokens min_tokens bans (stop ids and EOS), built once
    # A decode row's (temperature, top_k, top_p, min_p) as the runner takes them (``Engine._queue``).
    settings: tuple[float, int, float, float] = (0.0, 0, 1.0, 0.0)

    def __post_init__(self) -> None:
        # What every decode step asks, answered once (a step at batch 64 asks 64 times).
        self.choice = _params_choice(self.params)  # how its rows choose a token once nothing is banned
        self.ban_until = self.params.min_tokens if self.banned is not None and len(self.banned) else 0
        self.seed_bases = [row_seed_base(self.seed, s.index) for s in self.samples]  # row_seed of sample i, step t
        self.hold = max((len(s) for s in self.params.stop_strings), default=1) - 1  # text a stop may still claim
        self.ranks = _ranks_samples(self.params)  # best_of > n: outputs only when finished

    @property
    def finished(self) -> bool:
        if len(self.samples) == 1:
            return self.samples[0].finish_reason is not None
        return all(s.finish_reason is not None for s in self.samples)


def _row_choice(row: SampleRow) -> str:
    """``_params_choice`` of a row this step: the host's sampler while tokens are banned (``min_tokens``)."""
    return _PENALISED if len(row.banned_ids) else _params_choice(row.params)


def _device_settings(params: SamplingParams, vocab: int) -> tuple[float, int, float, float]:
    """A row's (temperature, top_k, top_p, min_p) as the token-choosing ops take them: a greedy row's temperature
    is 0; top_k >= the vocabulary keeps every token: off (0), which also fits int32 (top_k may not)."""
    return (0.0 if params.greedy else params.temperature, params.top_k if 0 < params.top_k < vocab else 0,
            params.top_p, params.min_p)


def _ranks_samples(params: SamplingParams) -> bool:
    """True for OpenAI's ``best_of > n``: more samples run than are returned."""
    return params.num_samples > params.n


def _best(outputs: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The ``n`` samples with the highest cumulative logprob (equal ones in sample order), indexed 0..n-1."""
    ranked = sorted(outputs, key=lambda o: -o.cumulative_logprob)[:n]  # sorted() is stable: ties keep their order
    for i, out in enumerate(ranked):
        out.index = i
    return ranked


def _prompt_ids(prompt: object) -> list[int]:
    """A token-id prompt as a list, refusing by name what only looks like one (bytes, bools)."""
    if isinstance(prompt, bytes | bytearray | memoryview):  # a Sequence of ints, but text meant: decode it first
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__} "
                         "(decode it to a str first)")
    if not isinstance(prompt, Sequence):
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool)]
    if bad:
        raise ValueError(f"a prompt must be a string or a list of token ids, got {bad[0]!r} "
                         f"({type(bad[0]).__name__}) in a {type(prompt).__name__}")
    return list(prompt)


@dataclass(eq=False)
class _InFlight:
    """A decode step launched through the runner whose tokens the host has not read yet."""

    seqs: list[Seq]  # its rows, in order
    pending: PendingTokens
    batch: Batch | None = None  # launched ahead: the scheduler advances it once the previous step's tokens are in


_PENALISED = "host"  # a row only the host sampler can serve (penalties, logprobs, logit bias, banned ids)


def _params_choice(params: SamplingParams) -> str:
    """How a decode row's token can be chosen on the device while nothing is banned: ``"tokens"`` (the LM head
    picks it), ``"sampled"`` (the backend's top-k/top-p/min-p sampler over written logits), or ``"host"``
    (``sample_batch``: penalties, logprobs, logit bias)."""
    if not params.needs_logits:
        return "tokens"
    if params.has_penalties or params.needs_logprobs or params.logit_bias:
        return _PENALISED
    return "sampled"


class Engine:
    """Continuous batching over a paged KV cache; one ``step()`` is one model forward.

    KV cache size: ``kv_cache_tokens`` tokens, or ``kv_cache_memory_fraction`` of the device's
    free memory (host memory on CPU); by default 90% of free GPU memory, or on CPU a full context per
    sequence the batch holds, ``min(max_num_seqs, 8)`` (the cache's pages are touched as blocks are used, and
    the prefix cache's LRU order walks through all of them in a long run, so its size ends up in RSS). It must
    hold at least one full-context sequence, so every request can finish.
    A prompt plus ``max_tokens`` beyond the context is clamped: the sample ends there with
    ``finish_reason="length"``. ``cuda_graphs`` (default: on for CUDA) runs plain decode steps
    through ``DecodeRunner``'s static buffers, replayed as one CUDA graph per batch-size bucket; on a
    CPU ``cuda_graphs=True`` runs the same runner eagerly (how the tests check it). ``async_scheduling``
    (default: on with the decode runner) launches decode step N+1 before reading step N's tokens, which stay
    on the device for it; step N's text, stop checks and outputs are done while N+1 runs, and a sequence
    found finished drops the one token it got too many. Each ``step()`` still returns one step's outputs
    (the first overlapped one launches two steps). ``quantization="int8"``
    quantizes the weights as they load (``gpt2fast.quant``; ``GPT2.from_state_dict``); every backend has int8
    kernels, and a table without them (``Ops.quantizations``) would be refused here, before any weight loads.

    Example:
        >>> engine = Engine('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}')
        >>> engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
        >>> while engine.has_unfinished():
        ...     outputs = engine.step()
        >>> outputs[0].finished, len(outputs[0].outputs[0].token_ids)
        (True, 2)
    """

    def __init__(
        self,
        model: str,
        *,
        backend: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        kv_cache_tokens: int | None = None,
        kv_cache_memory_fraction: float | None = None,
        enable_prefix_caching: bool = True,
        cuda_graphs: bool | None = None,
        seed: int = 0,
        quantization: str | None = None,
        async_scheduling: bool | None = None,
    ) -> None:
        self.quantization = check_quantization(quantization)
        self.block_size = _positive_int("block_size", block_size)
        _positive_int("max_num_seqs", max_num_seqs)
        _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        ops = get_ops(backend or default_backend(), self.device)
        check_quantization_support(ops, self.quantization)
        checkpoint = load_checkpoint(model, seed=seed, quantization=self.quantization)
        self.config = config = checkpoint.config
        self.is_random = checkpoint.is_random
        self.tokenizer = load_tokenizer(checkpoint.vocab_dir)
        if config.vocab_size > self.tokenizer.n_vocab:
            raise ValueError(
                f"the model has {config.vocab_size} tokens but its tokenizer only {self.tokenizer.n_vocab}"
            )
        self.model = GPT2.from_state_dict(config, checkpoint.state_dict, ops, self.device, self.dtype,
                                          self.quantization, consume=True)
        num_blocks = self._num_blocks(kv_cache_tokens, kv_cache_memory_fraction, max_num_seqs)
        self.cache = KVCache(config, num_blocks, block_size, self.dtype, self.device)
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, block_size, max_num_seqs, max_num_batched_tokens)
        self.max_blocks = -(-config.n_positions // block_size)  # every block table's width: shapes fixed per batch size
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True, False or None, got {cuda_graphs!r}")
        # Decode steps through static buffers: CUDA graphs on CUDA, the same runner eagerly elsewhere (tests).
        self.decode_runner = DecodeRunner(self.model, self.cache, max_num_seqs) if cuda_graphs else None
        if async_scheduling is None:
            async_scheduling = self.decode_runner is not None
        if not isinstance(async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True, False or None, got {async_scheduling!r}")
        if async_scheduling and self.decode_runner is None:
            raise ValueError("async_scheduling launches decode steps through the decode runner: it needs cuda_graphs "
                             "(on a CPU, cuda_graphs=True runs that runner eagerly)")
        self.async_scheduling = async_scheduling
        self._inflight: _InFlight | None = None  # a launched decode step whose tokens the host has not read
        self._requests: dict[str, _Request] = {}

    def _num_blocks(self, tokens: int | None, fraction: float | None, max_num_seqs: int) -> int:
        cfg, bs = self.config, self.block_size
        if tokens is not None and fraction is not None:
            raise ValueError("give kv_cache_tokens or kv_cache_memory_fraction, not both")
        if fraction is not None and not (isinstance(fraction, float | int) and 0 < fraction <= 1):
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction!r}")
        block_bytes = KVCache.bytes_per_block(cfg, bs, self.dtype)
        free = _free_memory(self.device)
        if tokens is None and (fraction is not None or self.device.type != "cpu"):
            if free is None:
                raise ValueError("this platform does not say how much memory is free; give kv_cache_tokens")
            fraction = fraction or 0.9
            blocks = int(free * fraction // block_bytes)
            name, source = "kv_cache_memory_fraction", f"kv_cache_memory_fraction={fraction:g} of {_gib(free)} free"
        else:
            if tokens is None:  # whole blocks per context: each sequence can reach n_positions
                tokens = min(max_num_seqs, CPU_KV_CACHE_CONTEXTS) * -(-cfg.n_positions // bs) * bs
            else:
                tokens = _positive_int("kv_cache_tokens", tokens)
            blocks = -(-tokens // bs)
            name, source = "kv_cache_tokens", f"a KV cache of {blocks} blocks of {bs} tokens"
            if free is not None and blocks * block_bytes > free:  # before allocating: torch would fail or overcommit
                raise ValueError(f"kv_cache_tokens={tokens} does not fit in memory: its KV cache needs "
                                 f"{_gib(blocks * block_bytes)}, and {_gib(free)} of {self.device.type} memory is "
                                 "free; lower kv_cache_tokens")
        needed = -(-cfg.n_positions // bs)
        if blocks < needed:
            raise ValueError(f"{source} cannot hold one full-context sequence ({cfg.n_positions} tokens, {needed} "
                             f"blocks of {bs}; it gives {blocks}); raise {name}")
        return blocks

    @property
    def backend(self) -> str:
        return self.model.ops.name

    # ---- requests -------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text or ids), checked against the model; ``""`` means ``<|endoftext|>``.

        Example:
            >>> Engine('random:{"n_layer": 1, "n_embd": 8, "n_head": 2}').encode("Hello world")
            [15496, 995]
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, allowed_special="all")
        else:
            ids = _prompt_ids(prompt)
        if not ids:
            eos = self.config.eos_token_id
            if eos >= self.config.vocab_size:
                raise ValueError(f"empty prompt: unconditional generation starts from <|endoftext|> (id {eos}), "
                                 f"which this model's {self.config.vocab_size}-token vocabulary lacks")
            ids = [eos]  # unconditional generation starts from <|endoftext|>
        self.check_ids(ids)
        return ids

    def check_ids(self, ids: Sequence[int]) -> None:
        """Raise ValueError unless ``ids`` are ints inside the vocabulary and fit the context."""
        vocab, context = self.config.vocab_size, self.config.n_positions
        not_int = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)]
        if not_int:
            raise ValueError(f"token ids must be integers, got {not_int[0]!r}")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        if len(ids) > context:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {context} (n_positions)")

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a request; its samples appear in ``step()`` outputs as tokens arrive."""
        self.add_requests([(request_id, prompt, params)])

    def add_requests(self, requests: Sequence[tuple[str, Prompt, SamplingParams | None]]) -> None:
        """Queue several ``(request_id, prompt, params)`` at once, or none: all are checked before any is queued.

        Example:
            >>> engine = Engine('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}', max_num_seqs=4)
            >>> try:
            ...     engine.add_requests([("a", "Hi", None), ("b", "Yo", SamplingParams(n=5))])
            ... except ValueError as e:
            ...     print(e, engine.has_unfinished())
            n=5 samples cannot run at once with max_num_seqs=4 False
        """
        checked, seen = [], set()
        for request_id, prompt, params in requests:
            ids, params = self._check_request(request_id, prompt, params)
            if request_id in seen:
                raise ValueError(f"request id {request_id!r} is given twice")
            seen.add(request_id)
            checked.append((request_id, prompt, ids, params))
        for request_id, prompt, ids, params in checked:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            samples = [_Sample(i, logprobs=[] if params.logprobs is not None else None,
                               cumulative_logprob=0.0 if params.needs_logprobs else None)
                       for i in range(params.num_samples)]
            request = _Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, seed, samples,
                               stop_ids=frozenset(params.stop_token_ids or ()), banned=self._banned_ids(params))
            self._queue(request, Seq(request_id, 0, list(ids), len(ids), BlockTable(self.block_size),
                                     fork_n=params.num_samples))

    def add_scoring_request(self, request_id: str, prompt: Prompt, top_n: int = 0) -> None:
        """Queue a request that only prefills its prompt and samples nothing: prompt scoring.

        It waits for KV blocks, is ordered and preempted like any prefill (never served from the prefix
        cache: every position's logits are needed). Its one output, when the prefill is done, is finished
        with ``prompt_logprobs`` (each prompt token's log-probability and the ``top_n`` likeliest tokens at
        each position, ``log_softmax`` of the fp32 logits) and one empty sample (``finish_reason="length"``).

        Example:
            >>> engine = Engine('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}')
            >>> engine.add_scoring_request("s", [1, 2, 3], top_n=2)
            >>> out = engine.step()[0]
            >>> out.finished, out.prompt_logprobs[0], len(out.prompt_logprobs[1]), out.outputs[0].token_ids
            (True, None, 3, [])
        """
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=top_n)  # checks top_n; never sampled
        ids, params = self._check_request(request_id, prompt, params)
        request = _Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, 0, [_Sample(0)],
                           prompt_logprobs=[None] * len(ids), prompt_ranks=[None] * len(ids), top_n=top_n)
        self._queue(request, Seq(request_id, 0, list(ids), len(ids), BlockTable(self.block_size), all_logits=True))

    def _check_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None
                       ) -> tuple[list[int], SamplingParams]:
        """Everything ``add_request`` checks, queuing nothing: the prompt's token ids and the params to use."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or request_id in self._requests:
            raise ValueError(f"request id {request_id!r} must be a string not already in use")
        if params.num_samples > self.scheduler.max_num_seqs:
            field = "n" if params.best_of is None else "best_of"
            raise ValueError(f"{field}={params.num_samples} samples cannot run at once with "
                             f"max_num_seqs={self.scheduler.max_num_seqs}")
        self._check_logit_bias(params)
        return self.encode(prompt), params

    def _queue(self, request: _Request, first: Seq) -> None:
        request.settings = _device_settings(request.params, self.config.vocab_size)
        request.samples[0].seq = first
        self._requests[request.request_id] = request
        self.scheduler.add(first)

    def _check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.config.vocab_size
        bad = [t for t in params.logit_bias or {} if t >= vocab]
        if bad:
            raise ValueError(f"SamplingParams.logit_bias: token id {bad[0]} is outside the model's vocabulary "
                             f"(0..{vocab - 1})")

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks."""
        request = self._requests.pop(request_id, None)
        if request is None:
            raise ValueError(f"unknown request id {request_id!r}")
        for sample in request.samples:
            if sample.seq is not None and sample.seq.status is not Status.FINISHED:
                self.scheduler.finish(sample.seq)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one model forward over the scheduled batch; outputs of every request that advanced (a ``best_of > n``
        request only once it has finished: which samples are best is known only then).

        With ``async_scheduling`` a plain decode step stays in flight when this returns: the next call launches
        the step after it first, then reads it (``_launch_ahead``)."""
        if self._inflight is None:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                if self.scheduler.has_unfinished():
                    raise RuntimeError("the scheduler could not place any sequence; the KV cache is too small")
                return []
            self.cache.copy_blocks(batch.copies)
            if self.decode_runner is None or not self._plain_decode(batch):
                return self._advance(*self._step_dynamic(batch))
            mode = self._mode(batch.seqs)
            if mode == _PENALISED or not self.async_scheduling:
                sampled = self._decode_static(batch.seqs, mode)
                self.scheduler.step_done(batch)
                return self._advance(batch.seqs, sampled)
            self._inflight = _InFlight(batch.seqs, self._launch(batch.seqs, mode))
            self.scheduler.step_done(batch)
        current = self._inflight
        self._inflight = self._launch_ahead(current.seqs)
        outputs = self._advance(current.seqs, as_sampled(current.pending.result()))
        if self._inflight is not None:  # its input tokens are in the sequences now: advance it
            ahead = self._inflight.batch
            live = [i for i, seq in enumerate(ahead.seqs) if seq.status is Status.RUNNING]
            self.scheduler.step_done(Batch([ahead.seqs[i] for i in live], [ahead.num_new[i] for i in live]))
            if not live:  # every row of it finished (or was aborted) with the step just read: nothing to wait for
                self._inflight.pending.result()
                self._inflight = None
        return outputs

    def _advance(self, seqs: list[Seq], sampled: list[SampledToken], scored: Sequence[Seq] = ()
                 ) -> list[RequestOutput]:
        """Append each sequence's token (stop checks, text), finish what ended; the outputs of the advanced requests."""
        advanced: dict[str, _Request] = {}
        for seq, token in zip(seqs, sampled):
            if seq.status is Status.FINISHED:  # aborted, or it ended a step before this token (launched ahead)
                continue
            request = self._requests[seq.request_id]
            if request.finished:  # a sibling sample failed this step and took the request with it
                continue
            if token.error is not None:
                self._fail(request, f"{token.error} for request {request.request_id!r} when choosing its token "
                                    f"at position {len(seq.token_ids)}; it was stopped")
            else:
                self._append(request, seq, token)
            advanced[request.request_id] = request
        for seq in scored:  # prompt scoring whose prefill is done: finished, nothing sampled
            request = self._requests[seq.request_id]
            sample = request.samples[0]
            if sample.error is not None:
                self._fail(request, sample.error)
            elif sample.finish_reason is None:
                sample.finish_reason = "length"
                self.scheduler.finish(seq)
            advanced[request.request_id] = request
        outputs = []
        for r in advanced.values():
            finished = r.finished
            if finished or not r.ranks:  # a best_of > n request's best samples are known only at the end
                outputs.append(self._output(r, finished))
            if finished:
                del self._requests[r.request_id]
        return outputs

    def _launch_ahead(self, previous: list[Seq]) -> _InFlight | None:
        """Launch the decode step after the in-flight one (rows ``previous``) before its tokens reach the host.

        Each running sequence adds the token the in-flight step is choosing for it, read on the device
        (``DecodeRunner.launch(from_previous=...)``); one whose in-flight token is surely its last (``max_tokens``,
        the context) sits it out. None when the next step may not be that plain decode: waiting work that could
        be admitted, a running sequence outside the flight, a row for the host's sampler, or too few free
        blocks (the caller then reads the tokens and schedules as usual, preempting if it must).
        """
        sched = self.scheduler
        row_of = {id(seq): i for i, seq in enumerate(previous)}
        seqs, ending, context = [], 0, self.config.n_positions
        for seq in sched.running:
            if id(seq) not in row_of:
                return None
            last = seq.num_output + 1 >= self._requests[seq.request_id].params.max_tokens
            if last or len(seq.token_ids) + 1 >= context:  # its in-flight token ends it (by length)
                ending += 1
                continue
            seqs.append(seq)
        # Work the scheduler would admit once the in-flight tokens are in: read them first, as without overlap. (A
        # sequence that ends by a token, EOS or a stop, is known to end only once read: a request waiting for its
        # slot starts one step later than without overlap, as with vLLM's async scheduling; results are the same.)
        if sched.waiting and sched.can_admit(sched.waiting[0], leaving=ending):
            return None
        if not seqs or len(seqs) > sched.max_num_batched_tokens:
            return None
        mode = self._mode(seqs, ahead=1)
        if mode == _PENALISED:
            return None
        batch = sched.reserve_ahead(seqs)
        if batch is None:
            return None
        self.cache.copy_blocks(batch.copies)
        pending = self._launch(seqs, mode, ahead=1, from_previous=[row_of[id(seq)] for seq in seqs])
        return _InFlight(seqs, pending, batch)

    def _mode(self, seqs: list[Seq], ahead: int = 0) -> str:
        """The runner mode for a decode step of ``seqs``: the most general one a row needs (``_params_choice``;
        ``"host"`` while min_tokens bans tokens). ``ahead=1``: the step after the one in flight."""
        choices = set()
        for seq in seqs:
            request = self._requests[seq.request_id]
            choices.add(_PENALISED if seq.num_output + ahead < request.ban_until else request.choice)
        return _PENALISED if _PENALISED in choices else "sampled" if "sampled" in choices else "tokens"

    def _row(self, seq: Seq) -> SampleRow:
        request = self._requests[seq.request_id]
        params, step = request.params, seq.num_output
        banned = request.banned if request.banned is not None and step < params.min_tokens else ()
        return SampleRow(params, request.seed, seq.sample_index, step, request.prompt_ids, seq.output_ids, banned)

    def _banned_ids(self, params: SamplingParams) -> torch.Tensor | None:
        """The tokens that would end a sample, banned while ``min_tokens`` are not yet generated (as vLLM):
        ``(K,)`` on the device, built once per request (a stop list may be long; the steps are many)."""
        if not params.min_tokens:
            return None
        stops = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stops.add(self.config.eos_token_id)
        ids = sorted(t for t in stops if t < self.config.vocab_size)
        return torch.tensor(ids, dtype=torch.int64, device=self.device)  # (K,)

    def _fail(self, request: _Request, message: str) -> None:
        """End every unfinished sample of ``request`` with ``finish_reason="error"`` and free its blocks."""
        for sample in request.samples:
            if sample.finish_reason is None:
                sample.finish_reason, sample.error = "error", message
                if sample.seq is not None and sample.seq.status is not Status.FINISHED:
                    self.scheduler.finish(sample.seq)

    def _step_dynamic(self, batch: Batch) -> tuple[list[Seq], list[SampledToken], list[Seq]]:
        """Any step (prefills, chunks, decodes, forks): metadata built to this batch's shapes.

        Returns the sampled sequences and their tokens, and the scoring sequences whose prefill is done.
        """
        wants = [batch.needs_logits(i) for i in range(len(batch.seqs))]
        ready = [seq for seq, want in zip(batch.seqs, wants) if want and not seq.all_logits]
        if any(seq.all_logits for seq in batch.seqs):  # prompt scoring: every row, then the samplers' rows
            hidden = self._score_chunks(batch, wants, self._forward(batch, all_rows=True))
        else:
            hidden = self._forward(batch)  # (N, C), one row per sequence in `ready`
        scored = [seq for seq, want in zip(batch.seqs, wants)
                  if seq.all_logits and (want or self._requests[seq.request_id].samples[0].error)]
        self.scheduler.step_done(batch)
        rows, seqs, logit_rows = [], [], []
        for row, seq in enumerate(ready):
            for s in self._fork(seq):
                rows.append(self._row(s))
                seqs.append(s)
                logit_rows.append(row)
        if len(logit_rows) != len(ready):  # a fork: its samples share their prompt's hidden row
            hidden = hidden.index_select(0, torch.tensor(logit_rows, device=hidden.device))
        return seqs, self._sample(hidden, rows) if rows else [], scored

    def _score_chunks(self, batch: Batch, wants: list[bool], hidden: torch.Tensor) -> torch.Tensor:
        """Record the prompt logprobs of the scoring sequences' rows of ``hidden`` (T, C: every token of the
        batch); return the last rows of the other sequences that sample ((N, C))."""
        keep, row = [], 0
        for seq, n, want in zip(batch.seqs, batch.num_new, wants):
            if seq.all_logits:
                self._record_prompt_logprobs(seq, hidden[row:row + n])
            elif want:
                keep.append(row + n - 1)
            row += n
        return hidden.index_select(0, torch.tensor(keep, dtype=torch.long, device=hidden.device))

    def _record_prompt_logprobs(self, seq: Seq, hidden: torch.Tensor) -> None:
        """Row ``j`` of ``hidden`` ((n, C), positions from ``seq.num_computed``) scores the token after it."""
        request = self._requests[seq.request_id]
        start = seq.num_computed
        following = seq.token_ids[start + 1:start + 1 + hidden.shape[0]]  # one short at the prompt's end
        if not following:
            return
        logits = self.model.ops.lm_head(hidden[:len(following)], self.model.wte_weight).float()  # (m, V)
        if not torch.isfinite(logits).all():  # failed in step(), once the scheduler is done with the batch
            request.samples[0].error = f"{NONFINITE} for request {request.request_id!r} while scoring its prompt"
            return
        logprobs = torch.log_softmax(logits, dim=-1)  # (m, V)
        chosen_t = logprobs.gather(1, torch.tensor(following, device=logprobs.device)[:, None])  # (m, 1)
        chosen = chosen_t[:, 0].tolist()
        ranks = ((logprobs > chosen_t).sum(dim=-1) + 1).tolist()  # vLLM's rank: 1 + how many are likelier
        # (m, N) likeliest first; a vocabulary smaller than N gives all it has
        top = logprobs.topk(min(request.top_n, logprobs.shape[-1]), dim=-1) if request.top_n else None
        top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
        for j, token in enumerate(following):
            entry = {token: chosen[j]}
            if top is not None:
                entry.update(zip(top_ids[j], top_values[j]))
            request.prompt_logprobs[start + 1 + j] = entry
            request.prompt_ranks[start + 1 + j] = ranks[j]

    @staticmethod
    def _plain_decode(batch: Batch) -> bool:
        """Every sequence adds its one newest token and samples the next: the shape a CUDA graph replays."""
        return all(n == 1 and seq.pending == 1 and seq.fork_n == 1 and not seq.all_logits
                   for seq, n in zip(batch.seqs, batch.num_new))

    def _decode_static(self, seqs: list[Seq], mode: str) -> list[SampledToken]:
        """A plain decode step through the static-buffer runner (a CUDA graph replay on CUDA), waited for."""
        if mode != _PENALISED:
            return as_sampled(self._launch(seqs, mode).result())  # -1: the row went non-finite
        token_ids = [seq.token_ids[-1] for seq in seqs]
        positions = [seq.num_computed for seq in seqs]
        hidden = self.decode_runner.run(token_ids, positions, [seq.table.blocks for seq in seqs], mode="hidden")
        return self._sample(hidden, [self._row(seq) for seq in seqs])

    def _launch(self, seqs: list[Seq], mode: str, ahead: int = 0, from_previous: list[int] | None = None
                ) -> PendingTokens:
        """Launch a token-choosing decode step of ``seqs``: each adds the token at ``num_computed``, its newest,
        or with ``ahead=1`` the one the in-flight step chose in row ``from_previous[i]``, still on the device.

        Per row, what ``_fused_choice`` gives (a greedy row's seed is never used: 0) and, when ``"sampled"``, the
        top-k/top-p/min-p settings as ``_sample`` passes them (``_Request.settings``)."""
        settings, seeds = [], []
        for seq in seqs:
            request = self._requests[seq.request_id]
            settings.append(request.settings)
            greedy = not request.settings[0]
            seeds.append(0 if greedy else row_seed_at(request.seed_bases[seq.sample_index], seq.num_output + ahead))
        temps, top_k, top_p, min_p = zip(*settings)
        token_ids = [seq.token_ids[-1] for seq in seqs] if not ahead else [0] * len(seqs)
        positions = [seq.num_computed for seq in seqs]
        sampling = dict(top_k=top_k, top_p=top_p, min_p=min_p) if mode == "sampled" else {}
        return self.decode_runner.launch(token_ids, positions, [seq.table.blocks for seq in seqs], mode, temps, seeds,
                                         from_previous, **sampling)

    def _forward(self, batch: Batch, all_rows: bool = False) -> torch.Tensor:
        ids, positions = [], []
        for seq, n in zip(batch.seqs, batch.num_new):
            ids += seq.token_ids[seq.num_computed:seq.num_computed + n]
            positions += range(seq.num_computed, seq.num_computed + n)
        meta = AttentionMetadata.build(
            [s.table.blocks for s in batch.seqs], [s.num_computed + n for s, n in zip(batch.seqs, batch.num_new)],
            batch.num_new, block_size=self.block_size, max_blocks=self.max_blocks, device=self.device,
            needs_logits=[batch.needs_logits(i) for i in range(len(batch.seqs))], all_logits=all_rows,
        )
        ids_and_positions = torch.tensor([ids, positions], device=self.device)  # (2, T)
        return self.model.hidden(ids_and_positions[0], ids_and_positions[1], self.cache, meta)

    def _sample(self, hidden: torch.Tensor, rows: list[SampleRow]) -> list[SampledToken]:
        """Project ``hidden`` (N, C) and choose a token per row.

        When no row needs a logits processor, the LM head picks the tokens itself (argmax, or a
        Gumbel-max draw with the sampler's Philox noise, so the same token as ``sample_batch``) and
        the (N, V) logits are never written. Rows with only top-k/top-p/min-p filters go to the
        backend's sampler (the CUDA backend's needs no sort); penalties or logprobs to ``sample_batch``.

        A row whose logits hold a NaN or infinity gets an error instead of a token (``SampledToken.error``).
        Where the logits are written, their row sums say so; where they never are, the hidden row's sum
        does (weights are finite, checked at load: a finite hidden row gives finite logits). One reduction
        either way, read with the tokens, no extra sync.
        """
        ops, wte = self.model.ops, self.model.wte_weight  # a tensor, or an Int8Weight
        choices = {_row_choice(r) for r in rows}
        if choices != {"tokens"}:  # a row needs the logits written
            logits = ops.lm_head(hidden, wte)  # (N, V)
            if _PENALISED in choices:
                return sample_batch(logits, rows)
            check = row_check(logits)  # (N,)
            logits = zero_nonfinite_rows(logits, check)
            dev, vocab = logits.device, logits.shape[-1]
            temps, top_k, top_p, min_p = zip(*(_device_settings(r.params, vocab) for r in rows))
            seeds = self._fused_choice(rows)[1]
            f32 = dict(dtype=torch.float32, device=dev)
            token_ids = ops.sample_top_k_top_p(
                logits, torch.tensor(temps, **f32), torch.tensor(top_k, dtype=torch.int32, device=dev),
                torch.tensor(top_p, **f32), torch.tensor(seeds, dtype=torch.int64, device=dev),
                torch.tensor(min_p, **f32),
            )  # (N,)
            return as_sampled(flag_nonfinite(token_ids, check).tolist())
        check = row_check(hidden)  # (N,)
        if all(r.params.greedy for r in rows):
            token_ids = ops.lm_head_argmax(hidden, wte)  # (N,)
        else:
            temps, seeds = self._fused_choice(rows)
            token_ids = ops.lm_head_gumbel(hidden, wte, torch.tensor(temps, dtype=torch.float32, device=hidden.device),
                                           torch.tensor(seeds, dtype=torch.int64, device=hidden.device))
        return as_sampled(flag_nonfinite(token_ids, check, hidden=True).tolist())

    @staticmethod
    def _fused_choice(rows: list[SampleRow]) -> tuple[list[float], list[int]]:
        """Per-row temperature (0: greedy) and Philox row seed, as ``ops.lm_head_gumbel`` takes them."""
        temps = [0.0 if r.params.greedy else r.params.temperature for r in rows]
        return temps, [row_seed(r.seed, r.sample_index, r.step) for r in rows]

    def _fork(self, seq: Seq) -> list[Seq]:
        """A finished prompt of an ``n > 1`` request splits into its samples, sharing the prompt's blocks."""
        if seq.fork_n == 1:
            return [seq]
        request = self._requests[seq.request_id]
        family = [seq] + [self.scheduler.fork(seq, i) for i in range(1, seq.fork_n)]
        seq.fork_n = 1
        for sample, s in zip(request.samples, family):
            sample.seq = s
        return family

    def _append(self, request: _Request, seq: Seq, token: SampledToken) -> None:
        params, sample = request.params, request.samples[seq.sample_index]
        seq.token_ids.append(token.token_id)
        if sample.logprobs is not None:
            sample.logprobs.append({token.token_id: token.logprob, **(token.top_logprobs or {})})
        if sample.cumulative_logprob is not None:
            sample.cumulative_logprob += token.logprob
        t = token.token_id
        # Stop strings match only in text after the first min_tokens tokens (vLLM's detokenizer does the same).
        check_stops = seq.num_output > params.min_tokens
        if t == self.config.eos_token_id and not params.ignore_eos:
            sample.finish_reason = "stop"
        elif t in request.stop_ids:
            sample.finish_reason, sample.stop_reason = "stop", t
        if sample.finish_reason is None or params.include_stop_str_in_output:
            # The end token is text only when asked for (skip_special_tokens=False), even when ignored.
            if t != self.tokenizer.eot_token or not params.skip_special_tokens:
                delta = sample.decoder.decode(self.tokenizer.decode_single_token_bytes(t))
                self._add_text(sample, params, delta, check_stops and sample.finish_reason is None)
            if sample.finish_reason is None and (seq.num_output >= params.max_tokens
                                                 or len(seq.token_ids) >= self.config.n_positions):
                sample.finish_reason = "length"
        if sample.finish_reason is not None:
            if sample.stop_reason is None or isinstance(sample.stop_reason, int):
                tail = sample.decoder.decode(b"", final=True)
                self._add_text(sample, params, tail, check_stops and sample.finish_reason == "length")
            self.scheduler.finish(seq)

    @staticmethod
    def _add_text(sample: _Sample, params: SamplingParams, delta: str, check_stops: bool = True) -> None:
        """Append decoded text; a stop string (also one split across tokens) ends the sample, trimmed after it
        (``include_stop_str_in_output``) or before it."""
        if not delta:
            return
        start = len(sample.text)
        sample.text += delta
        if not check_stops:
            return
        # The earliest match in the text wins, whichever entry of ``stop`` it is (as OpenAI stops).
        hits = [(at, stop) for stop in params.stop_strings
                if (at := sample.text.find(stop, max(0, start - len(stop) + 1))) != -1]
        if hits:
            at, stop = min(hits, key=lambda hit: hit[0])
            sample.text = sample.text[:at + len(stop)] if params.include_stop_str_in_output else sample.text[:at]
            sample.finish_reason, sample.stop_reason = "stop", stop

    def _output(self, request: _Request, finished: bool) -> RequestOutput:
        # While a stop string could still be completing, hold its possible start back from the visible text.
        hold = request.hold
        outputs = []
        for sample in request.samples:
            seq = sample.seq
            text = sample.text if sample.finish_reason or not hold else sample.text[:-hold]
            tokens = seq.output_ids if seq is not None and seq.num_prompt <= len(seq.token_ids) else []
            outputs.append(CompletionOutput(sample.index, text, tokens, sample.finish_reason,
                                            list(sample.logprobs) if sample.logprobs is not None else None,
                                            sample.cumulative_logprob, sample.stop_reason, sample.error))
        generated = sum(len(o.token_ids) for o in outputs)
        if request.ranks:
            outputs = _best(outputs, request.params.n)
        scores, ranks = request.prompt_logprobs, request.prompt_ranks
        return RequestOutput(request.request_id, request.prompt, request.prompt_ids, outputs, finished, generated,
                             list(scores) if scores is not None else None, list(ranks) if ranks is not None else None)

    # ---- one pass, for verification ---------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits of every position of ``token_ids`` in one pass: ``(T, vocab)`` float32."""
        if isinstance(token_ids, str) or not isinstance(token_ids, Sequence):
            raise ValueError(f"token_ids must be a list of token ids, got {type(token_ids).__name__}")
        ids = list(token_ids)
        if not ids:
            raise ValueError("token_ids is empty; logits need at least one token")
        return self.model.ops.lm_head(self.one_pass(ids), self.model.wte_weight)

    def one_pass(self, ids: list[int], *, last_only: bool = False, capture: AttentionCapture | None = None
                 ) -> torch.Tensor:
        """Final hidden rows ``(T, C)`` (``(1, C)`` with ``last_only``) of one sequence, outside the scheduler.

        The sequence borrows KV blocks from the pool for this one forward and gives them back, so
        nothing of it stays behind; ``capture`` records its attention (``GPT2.hidden``).

        Example:
            >>> engine = Engine('random:{"n_layer": 1, "n_embd": 8, "n_head": 2}')
            >>> free = engine.pool.num_free
            >>> engine.one_pass([1, 2, 3]).shape, engine.pool.num_free == free
            (torch.Size([3, 8]), True)
        """
        self.check_ids(ids)
        table = BlockTable(self.block_size)
        try:
            table.reserve(self.pool, len(ids))
            meta = AttentionMetadata.build([table.blocks], [len(ids)], [len(ids)], block_size=self.block_size,
                                           all_logits=not last_only, max_blocks=self.max_blocks, device=self.device)
            ids_and_positions = torch.tensor([ids, list(range(len(ids)))], device=self.device)  # (2, T)
            return self.model.hidden(ids_and_positions[0], ids_and_positions[1], self.cache, meta, capture=capture)
        finally:
            table.free(self.pool)


class LLM:
    """A GPT-2 ready to run from Python: offline batches, streaming, and full-sequence logits.

    ``model`` is ``random:<preset or JSON>``, a Hugging Face folder, an OpenAI TensorFlow folder,
    or a Hub id; keyword arguments go to ``Engine`` (backend, dtype, device, block_size, ...).

    Example:
        >>> llm = LLM('random:{"n_layer": 2, "n_embd": 64, "n_head": 4}')
        >>> out = llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0))
        >>> len(out[0].outputs[0].token_ids)
        3
    """

    def __init__(self, model: str, **engine_args) -> None:
        self.engine = Engine(model, **engine_args)
        self.tokenizer, self.config, self.model = self.engine.tokenizer, self.engine.config, self.engine.model
        self.device, self.dtype, self.is_random = self.engine.device, self.engine.dtype, self.engine.is_random
        self.quantization = self.engine.quantization
        self.model_name = model
        self._next_id = 0
        # The latest output of every request a live generate/stream of this LLM owns (None until the first):
        # whichever call steps the engine files each output here, and each call reads its own.
        self._outputs: dict[str, RequestOutput | None] = {}
        self._stepping = False
        self._dropped: list[str] = []  # requests of streams finalised during a step: aborted right after it

    @property
    def backend(self) -> str:
        return self.engine.backend

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits of every position of ``token_ids`` in one pass: ``(T, vocab)`` float32.

        Example:
            >>> LLM('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}').logits([1, 2, 3]).shape
            torch.Size([3, 50257])
        """
        return self.engine.logits(token_ids)

    def attention(self, text_or_ids: str | Sequence[int], *, qk: bool = False) -> AttentionTrace:
        """Every layer's and head's attention probabilities over one text (or token ids), in one forward.

        The selected backend computes them with its attention variant that returns probabilities
        (``ops.attention_with_probs``), outside the scheduler; the KV blocks it borrows are freed after.
        ``qk=True`` also keeps each head's query and key vectors. Raises ValueError for empty input,
        more tokens than the context (``n_positions``), or ids outside the vocabulary.

        Example:
            >>> llm = LLM('random:{"n_layer": 2, "n_embd": 32, "n_head": 2}')
            >>> trace = llm.attention("The dog on the ship ran", qk=True)
            >>> trace.tokens[:3], tuple(trace.probs.shape), tuple(trace.queries.shape)
            (['The', ' dog', ' on'], (2, 2, 6, 6), (2, 2, 6, 16))
            >>> bool(torch.allclose(trace.probs.sum(-1), torch.ones(2, 2, 6)))
            True
        """
        if not isinstance(qk, bool):
            raise ValueError(f"qk must be True or False, got {qk!r}")
        ids = self._inspected_ids(text_or_ids)
        capture = AttentionCapture(qk=qk)
        self.engine.one_pass(ids, last_only=True, capture=capture)
        probs = torch.stack([p[0] for p in capture.probs]).float().cpu()  # (L, H, T, T): the one sequence
        vectors = [torch.stack(v).float().cpu() if qk else None for v in (capture.queries, capture.keys)]
        return AttentionTrace(self._token_texts(ids), ids, probs, *vectors, model=self.model_name)

    def next_tokens(self, text_or_ids: str | Sequence[int], k: int = 10) -> list[NextToken]:
        """The ``k`` likeliest next tokens after ``text_or_ids``, likeliest first (ties: lower id first).

        Probabilities are the softmax of the last position's fp32 logits (temperature 1, no filters).
        Raises ValueError for empty input, too many tokens, bad ids, or ``k`` outside ``1..vocab_size``.

        Example:
            >>> llm = LLM('random:{"n_layer": 2, "n_embd": 32, "n_head": 2}')
            >>> top = llm.next_tokens("Hello", k=3)
            >>> len(top), top[0].prob >= top[1].prob >= top[2].prob, top[0].text == llm.tokenizer.decode([top[0].id])
            (3, True, True)
        """
        vocab = self.config.vocab_size
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
            raise ValueError(f"k must be an integer from 1 to the vocabulary size {vocab}, got {k!r}")
        hidden = self.engine.one_pass(self._inspected_ids(text_or_ids), last_only=True)  # (1, C)
        probs = torch.softmax(self.model.ops.lm_head(hidden, self.model.wte_weight)[0].float(), dim=-1).cpu()  # (V,)
        # A stable descending sort keeps equal probabilities in id order (torch.topk promises no order for ties).
        top_probs, top_ids = torch.sort(probs, descending=True, stable=True)
        return [NextToken(self.tokenizer.decode([i]), i, p)
                for i, p in zip(top_ids[:k].tolist(), top_probs[:k].tolist())]

    def _inspected_ids(self, text_or_ids: str | Sequence[int]) -> list[int]:
        """Token ids of a text or id list to look inside of: never empty (no implicit <|endoftext|>), checked."""
        if isinstance(text_or_ids, str) and not text_or_ids:
            raise ValueError("the text is empty; give at least one token of text")
        if isinstance(text_or_ids, Sequence) and not isinstance(text_or_ids, str) and not text_or_ids:
            raise ValueError("the token id list is empty; give at least one token")
        return self.engine.encode(text_or_ids)  # type and id checks; the context length (n_positions)

    def _token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt together (continuous batching); one ``RequestOutput`` per prompt, in order.

        ``prompts``: a string, a list of token ids, or a list of either. ``params``: one for all,
        or one per prompt. A progress bar shows for big batches (``use_tqdm``: default from 64 prompts).
        Everything is checked before anything is queued (ValueError); whatever this call queued is aborted
        if it ends early (an exception, Ctrl-C). Other calls (a paused ``stream``) may run meanwhile; each
        gets all of its own outputs. If a request's logits go non-finite, the others still finish, then
        ``GenerationError`` names it (its ``outputs`` hold every result; the failed sample's
        ``finish_reason`` is ``"error"``).

        Example:
            >>> llm = LLM('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}')
            >>> [o.outputs[0].finish_reason for o in llm.generate(["a", "b"], SamplingParams(max_tokens=2))]
            ['length', 'length']
        """
        batch = self._as_batch(prompts)
        if isinstance(params, Sequence):
            if len(params) != len(batch):
                raise ValueError(f"got {len(params)} SamplingParams for {len(batch)} prompts; give one or one each")
            per_prompt = list(params)
        else:
            per_prompt = [params] * len(batch)
        ids = self._add_all(batch, per_prompt)
        try:
            with tqdm(total=len(ids), desc="generating", unit="prompt",
                      disable=not (use_tqdm if use_tqdm is not None else len(ids) >= 64)) as bar:
                unfinished = set(ids)  # nothing of a new request is finished before this loop steps it
                while unfinished:
                    for out in self._step():
                        if out.finished and out.request_id in unfinished:
                            unfinished.discard(out.request_id)
                            bar.update()
            results = [self._outputs[i] for i in ids]
        finally:
            self._release(ids)
        self._raise_failed(results)
        return results

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text in pieces as tokens arrive (sample 0 of the request).

        The request is queued at the first ``next()``. Other calls may step the engine while the caller
        holds a piece; nothing of this stream is lost. Closing the iterator early (``close()``, ``break``,
        garbage collection) aborts the request. If its logits go non-finite, the text so far has been
        yielded and ``GenerationError`` says why.

        Example:
            >>> llm = LLM('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}')
            >>> pieces = list(llm.stream("Hi", SamplingParams(max_tokens=4, seed=0)))
            >>> "".join(pieces) == llm.generate("Hi", SamplingParams(max_tokens=4, seed=0))[0].outputs[0].text
            True
        """
        (request_id,) = self._add_all([prompt], [params])
        sent = 0
        try:
            while True:
                out = self._outputs[request_id]  # other calls may have stepped the engine since the last look
                if out is not None:
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                        continue  # look again: while the caller held this piece, others may have stepped
                    if out.finished:
                        break
                self._step()
        finally:  # also when the caller stops early (close(), or the iterator is garbage-collected)
            self._release([request_id])
        self._raise_failed([out])

    def _step(self) -> list[RequestOutput]:
        """One engine step; each output goes to the live call that owns its request, whichever call steps."""
        if not self.engine.has_unfinished():  # only an abort from outside the LLM gets here
            raise RuntimeError("the engine has nothing left to run, but a request of this LLM is unfinished")
        self._stepping = True
        try:
            outputs = self.engine.step()
        finally:
            self._stepping = False
        for out in outputs:
            if out.request_id in self._outputs:
                self._outputs[out.request_id] = out
        dropped, self._dropped = self._dropped, []
        self._release(dropped)
        return outputs

    def _release(self, ids: list[str]) -> None:
        """Forget ``ids``' outputs and abort those still running (the call ended early)."""
        for request_id in ids:
            self._outputs.pop(request_id, None)
        if self._stepping:  # the garbage collector finalised a stream inside engine.step(): abort after it
            self._dropped += ids
            return
        for request_id in ids:
            if request_id in self.engine._requests:
                self.engine.abort(request_id)

    @staticmethod
    def _raise_failed(outputs: list[RequestOutput]) -> None:
        failed = [out for out in outputs if out.error is not None]
        if failed:
            more = f" ({len(failed) - 1} more requests failed too)" if len(failed) > 1 else ""
            raise GenerationError(failed[0].error + more, outputs)

    def _as_batch(self, prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if not isinstance(prompts, str | Sequence):
            raise ValueError(f"prompts must be a string, a list of token ids, or a list of those; got {prompts!r}")
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and bool(prompts) and all(isinstance(t, int) for t in prompts)
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("no prompts given")
        return batch

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams | None]) -> list[str]:
        """Queue every prompt, or none (``Engine.add_requests`` checks them all first); their ids, in order."""
        ids = [f"llm-{self._next_id + i}" for i in range(len(prompts))]
        self.engine.add_requests(list(zip(ids, prompts, params)))
        self._next_id += len(ids)
        self._outputs.update(dict.fromkeys(ids))
        return ids
