"""``LLM``: load a GPT-2 from any source and run it from Python.

v0 runs one sequence at a time through the paged KV cache: a prefill over the prompt, then one
decode step per token, never recomputing earlier tokens. The runtime issue grows this into
continuous batching behind the same names.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from gpt2fast.cache import BlockPool, KVCache, SequenceBlocks
from gpt2fast.checkpoint import load_checkpoint
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.model import GPT2
from gpt2fast.ops import default_backend, get_ops
from gpt2fast.outputs import CompletionOutput, RequestOutput
from gpt2fast.sampling import SamplingParams, sample
from gpt2fast.tokenizer import load_tokenizer

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


class LLM:
    """A GPT-2 ready to run: weights on the device, the tokenizer, and a paged KV cache.

    ``model`` is ``random:<preset or JSON>``, a Hugging Face folder, an OpenAI TensorFlow folder,
    or a Hub id. ``seed`` seeds random weights only.

    Example:
        >>> llm = LLM('random:{"n_layer": 2, "n_embd": 64, "n_head": 4}')
        >>> out = llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0))
        >>> len(out[0].outputs[0].token_ids)
        3
    """

    def __init__(
        self,
        model: str,
        *,
        backend: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        block_size: int = 16,
        seed: int = 0,
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        ops = get_ops(backend or default_backend(), self.device)
        checkpoint = load_checkpoint(model, seed=seed)
        self.config = config = checkpoint.config
        self.is_random = checkpoint.is_random
        self.tokenizer = load_tokenizer(checkpoint.vocab_dir)
        if config.vocab_size > self.tokenizer.n_vocab:
            raise ValueError(
                f"the model has {config.vocab_size} tokens but its tokenizer only {self.tokenizer.n_vocab}"
            )
        with torch.device("meta"):
            self.model = GPT2(config, ops)
        weights = {name: t.to(self.device, self.dtype) for name, t in checkpoint.state_dict.items()}
        self.model.load_state_dict(weights, strict=True, assign=True)
        self.block_size = block_size
        blocks = -(-config.n_positions // block_size)  # room for one full-context sequence
        self.cache = KVCache(config, blocks, block_size, self.dtype, self.device)
        self.pool = BlockPool(blocks)

    @property
    def backend(self) -> str:
        return self.model.ops.name

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text or ids), checked against the model; ``""`` means ``<|endoftext|>``.

        Example:
            >>> LLM("random:distilgpt2").encode("Hello world")  # doctest: +SKIP
            [15496, 995]
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, allowed_special="all")
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            eos = self.config.eos_token_id
            if eos >= self.config.vocab_size:
                raise ValueError(f"empty prompt: unconditional generation starts from <|endoftext|> (id {eos}), "
                                 f"which this model's {self.config.vocab_size}-token vocabulary lacks")
            ids = [eos]  # unconditional generation starts from <|endoftext|>
        self._check_ids(ids)
        return ids

    def _check_ids(self, ids: list[int]) -> None:
        vocab, context = self.config.vocab_size, self.config.n_positions
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        if len(ids) > context:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {context} (n_positions)")

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits of every position of ``token_ids`` in one pass: ``(T, vocab)`` float32.

        Example:
            >>> LLM('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}').logits([1, 2, 3]).shape
            torch.Size([3, 50257])
        """
        ids = list(token_ids)
        if not ids:
            raise ValueError("token_ids is empty; logits need at least one token")
        self._check_ids(ids)
        seq = SequenceBlocks(self.pool, self.block_size)
        try:
            return self._step(seq, ids, all_logits=True)
        finally:
            seq.free()

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); one ``RequestOutput`` per prompt, in order.

        Example:
            >>> llm = LLM('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}')
            >>> [o.outputs[0].finish_reason for o in llm.generate(["a", "b"], SamplingParams(max_tokens=2))]
            ['length', 'length']
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and bool(prompts) and all(isinstance(t, int) for t in prompts)
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("no prompts given")
        encoded = [self.encode(p) for p in batch]  # validate all before running any
        return [
            self._generate_one(str(i), p if isinstance(p, str) else None, ids, params)
            for i, (p, ids) in enumerate(zip(batch, encoded))
        ]

    def _generate_one(
        self, request_id: str, prompt: str | None, ids: list[int], params: SamplingParams
    ) -> RequestOutput:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        eos = self.config.eos_token_id
        generated: list[int] = []
        finish_reason = None
        seq = SequenceBlocks(self.pool, self.block_size)
        try:
            new_tokens = ids
            while finish_reason is None:
                logits = self._step(seq, new_tokens)[0]  # (V,)
                token = sample(logits, params, seed, sample_index=0, step=len(generated))
                generated.append(token)
                if token == eos and not params.ignore_eos:
                    finish_reason = "stop"
                elif len(generated) >= params.max_tokens or len(ids) + len(generated) >= self.config.n_positions:
                    finish_reason = "length"
                new_tokens = [token]
        finally:
            seq.free()
        text_ids = generated[:-1] if finish_reason == "stop" else generated
        text = self.tokenizer.decode(text_ids)
        return RequestOutput(request_id, prompt, ids, [CompletionOutput(0, text, generated, finish_reason)], True)

    def _step(self, seq: SequenceBlocks, new_tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        """Append ``new_tokens`` to ``seq`` and run them through the model; logits of the last (or all)."""
        start = seq.num_tokens
        seq.append(len(new_tokens))
        meta = AttentionMetadata.build(
            [seq.blocks], [seq.num_tokens], [len(new_tokens)], block_size=self.block_size,
            all_logits=all_logits, device=self.device,
        )
        input_ids = torch.tensor(new_tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(start, seq.num_tokens, dtype=torch.int64, device=self.device)
        return self.model(input_ids, positions, self.cache, meta)
