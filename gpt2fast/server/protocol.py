"""OpenAI's completions protocol: request validation, error bodies, and the pieces of a response.

Nothing here touches the engine: a request is checked against the model's tokenizer and limits
(``ModelLimits``) and turned into token ids plus one ``SamplingParams``; responses are built from
the engine's cumulative ``RequestOutput`` objects.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import tiktoken
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpt2fast.sampling import MAX_LOGIT_BIAS, SamplingParams
from gpt2fast.sampling import MAX_LOGPROBS as MAX_PROMPT_LOGPROBS  # vLLM's default max_logprobs (20)

MAX_N = 128  # OpenAI's own cap on n (and on best_of)
MAX_LOGPROBS = 5  # OpenAI's cap on completions logprobs
MAX_STOP = 4  # OpenAI's cap on stop sequences
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.

    Example:
        >>> e = ApiError(400, "n must be <= 4", param="n")
        >>> e.status, e.body()["error"]["type"], e.body()["error"]["param"]
        (400, 'invalid_request_error', 'n')
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``, type ``server_error`` for 5xx."""
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# In a body that decodes as UTF-8 (which refuses encoded surrogates), a surrogate reaches a parsed string only as a
# \u escape of D800-DFFF. The pattern may match more (a valid pair, an escaped backslash): then the full check runs.
_MAY_HOLD_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # "unrolled": linear, no backtracking blow-up
OTHER_LISTS = 64  # JSON lists a request may hold besides its prompts (the prompt list, stop, stop_token_ids...)


def count_json_lists(body: bytes) -> int:
    """The lists in a JSON text, counted on its bytes: the ``[`` outside strings.

    Example:
        >>> count_json_lists(b'{"prompt": [[1], [2]], "stop": ["[[", "\\\\\\"["]}')
        4
    """
    return _JSON_STRING.sub(b"", body).count(b"[")


def check_json_lists(body: bytes, max_prompts: int) -> None:
    """ApiError 400 when a JSON body holds more lists than a request of ``max_prompts`` prompts can, counted on the
    raw bytes (``[`` outside strings) at C speed: a body of 200,000 tiny prompts is refused before it is parsed.

    Example:
        >>> check_json_lists(b'{"prompt": [[1], [2]], "stop": ["[[[["]}', max_prompts=2)
        >>> check_json_lists(b'{"prompt": [' + b"[1]," * 99 + b'[1]]}', max_prompts=2)
        Traceback (most recent call last):
        ...
        gpt2fast.server.protocol.ApiError: The request holds 101 JSON lists: one request may send at most 2 prompts \
(prompts x n)
    """
    limit = max_prompts + OTHER_LISTS
    if body.count(b"[") <= limit:  # every list has one; most bodies stop here
        return
    lists = count_json_lists(body)
    if lists > limit:
        raise ApiError(400, f"The request holds {lists} JSON lists: one request may send at most {max_prompts} "
                       "prompts (prompts x n)", param="prompt")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(body: bytes) -> dict:
    """The request body as a JSON object, or ApiError 400 saying what is wrong with it.

    Example:
        >>> parse_json_object(b'{"model": "gpt2"}')
        {'model': 'gpt2'}
        >>> parse_json_object(b'[1]')
        Traceback (most recent call last):
        ...
        gpt2fast.server.protocol.ApiError: The request body must be a JSON object, got a list
        >>> parse_json_object(b'{"prompt": "\\\\ud800"}')
        Traceback (most recent call last):
        ...
        gpt2fast.server.protocol.ApiError: The request body holds a lone UTF-16 surrogate (an escape such as \
\\ud800 without its pair), which is not text; send valid Unicode
    """
    if not body.strip():
        raise ApiError(400, "The request body is empty; send a JSON object", code="invalid_json")
    try:
        text = body.decode("utf-8")  # JSON on the wire is UTF-8 (RFC 8259); json.loads would also take UTF-16/32
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, f"We could not parse the JSON body of your request ({e}). The API expects a JSON "
                       "payload", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, got a {type(data).__name__}",
                       code="invalid_json")
    try:  # JSON may escape half a UTF-16 pair; such a string cannot be tokenized, echoed or encoded as UTF-8
        if _MAY_HOLD_SURROGATE.search(text):  # a scan of the text spares most bodies a second pass over the data
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "The request body holds a lone UTF-16 surrogate (an escape such as \\ud800 without its "
                       "pair), which is not text; send valid Unicode", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply", code="invalid_json") from None
    return data


def validation_error(err: ValidationError) -> ApiError:
    """The first pydantic error as OpenAI words it, naming the field in ``param``.

    Example:
        >>> try:
        ...     CompletionRequest.model_validate({"model": "m", "n": "2"})
        ... except ValidationError as e:
        ...     error = validation_error(e)
        >>> print(error.param, "|", error.message)
        n | Invalid value for 'n': Input should be a valid integer (got "2")
    """
    first = err.errors(include_url=False)[0]
    name = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":  # nested ones by their path: stream_options.bogus
        path = ".".join(str(part) for part in first["loc"])
        return ApiError(400, f"Unrecognized request argument supplied: {path}", param=path)
    message = first["msg"].removeprefix("Value error, ")
    shown = json.dumps(first.get("input"), default=str)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ApiError(400, f"Invalid value for '{name}': {message} (got {shown})", param=name)


# ---- the request ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """``stream_options`` of a streaming request: ``include_usage`` adds a last chunk with the token counts;
    vLLM's ``continuous_usage_stats`` also puts the choice's counts so far in every chunk.

    ``include_usage`` left out is False (OpenAI), except beside ``continuous_usage_stats``, where it is
    True as vLLM has it (there it defaults to True).

    Example:
        >>> StreamOptions.model_validate({"include_usage": True}).usage
        True
        >>> StreamOptions.model_validate({"continuous_usage_stats": True}).continuous_usage
        True
    """

    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = False
    include_obfuscation: bool | None = None  # sent by some clients; meaningless here

    @property
    def usage(self) -> bool:
        """True when the stream ends with a usage chunk."""
        return self.include_usage if self.include_usage is not None else bool(self.continuous_usage_stats)

    @property
    def continuous_usage(self) -> bool:
        """True when every chunk carries usage (vLLM: only together with ``include_usage``)."""
        return self.usage and bool(self.continuous_usage_stats)


class CompletionRequest(BaseModel):
    """``POST /v1/completions``: OpenAI's fields plus vLLM's extensions that mean something for GPT-2
    (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens``,
    ``include_stop_str_in_output``, ``skip_special_tokens``, ``spaces_between_special_tokens``,
    ``prompt_logprobs``, ``return_tokens_as_token_ids``), by vLLM's names and meanings. Strict types:
    ``"1"`` is no number, ``true`` no integer. ``null`` means the default. Any other field is a 400.

    Example:
        >>> CompletionRequest.model_validate({"model": "gpt2", "prompt": "Hi", "n": 2}).n
        2
    """

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: str
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]]: checked by ``split_prompts``
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    suffix: str | None = None
    user: str | None = None
    # extras (vLLM's names)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = Field(None, ge=0)
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True  # accepted; see SamplingParams
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_PROMPT_LOGPROBS)
    return_tokens_as_token_ids: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and any(t < 0 for t in ids):
            raise ValueError("token ids are >= 0")
        return ids

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(bias)}")
        for token, value in bias.items():
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"keys must be token ids written as decimal strings, got {token!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {value!r} for token {token}")
        return bias

    def check_unsupported(self) -> None:
        """ApiError 400 for OpenAI fields this server cannot honour (rather than silently ignoring them), and
        for fields that contradict each other.

        Example:
            >>> CompletionRequest.model_validate({"model": "m", "suffix": "!"}).check_unsupported()
            Traceback (most recent call last):
            ...
            gpt2fast.server.protocol.ApiError: suffix is not supported: GPT-2 has no insertion mode
        """
        n = self.n or 1
        if self.best_of is not None and self.best_of < n:
            raise ApiError(400, f"best_of must be greater than or equal to n, got best_of={self.best_of} and n={n}",
                           param="best_of")
        if self.best_of is not None and self.best_of > n and self.stream:
            raise ApiError(400, "best_of > n cannot be streamed: the best completions are known only at the end; "
                           "set stream to false or best_of to n", param="best_of")
        max_tokens = DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        if (self.min_tokens or 0) > max_tokens:
            raise ApiError(400, f"min_tokens ({self.min_tokens}) must be less than or equal to max_tokens "
                           f"({max_tokens})", param="min_tokens")
        if self.prompt_logprobs is not None and self.stream:  # vLLM's rule: a stream chunk has no field for them
            raise ApiError(400, "prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        if self.suffix:
            raise ApiError(400, "suffix is not supported: GPT-2 has no insertion mode", param="suffix")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled",
                           param="stream_options")

    def sampling_params(self, max_tokens: int, vocab_size: int | None = None) -> SamplingParams:
        """One ``SamplingParams`` for every prompt of the request (``max_tokens`` >= 1, already checked);
        ``logit_bias`` ids are checked against ``vocab_size`` when given.

        Example:
            >>> r = CompletionRequest.model_validate({"model": "m", "temperature": 0, "top_k": 5, "seed": 1})
            >>> p = r.sampling_params(4); p.max_tokens, p.temperature, p.top_k, p.seed
            (4, 0.0, 5, 1)
        """
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        bias = {int(token): value for token, value in self.logit_bias.items()} if self.logit_bias else None
        outside = [t for t in bias or {} if vocab_size is not None and t >= vocab_size]
        if outside:
            raise ApiError(400, f"logit_bias: token id {outside[0]} is outside the model's vocabulary "
                           f"(0..{vocab_size - 1})", param="logit_bias")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0),
                top_k=pick(self.top_k, 0), min_p=pick(self.min_p, 0.0),
                repetition_penalty=pick(self.repetition_penalty, 1.0),
                presence_penalty=pick(self.presence_penalty, 0.0), frequency_penalty=pick(self.frequency_penalty, 0.0),
                stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=bool(self.ignore_eos), seed=self.seed,
                n=pick(self.n, 1), logprobs=self.logprobs, best_of=self.best_of, logit_bias=bias,
                min_tokens=min(pick(self.min_tokens, 0), max_tokens),  # above max_tokens only for max_tokens=0
                include_stop_str_in_output=bool(self.include_stop_str_in_output),
                skip_special_tokens=pick(self.skip_special_tokens, True),
                spaces_between_special_tokens=pick(self.spaces_between_special_tokens, True),
            )
        except ValueError as e:  # a bound the model above does not mirror: still a 400 naming the field
            message = str(e)
            name = message.split(".", 1)[1].split(" ", 1)[0] if message.startswith("SamplingParams.") else None
            raise ApiError(400, message.replace("SamplingParams.", ""), param=name) from None


@dataclass(frozen=True)
class ModelLimits:
    """What a prompt is checked against: the tokenizer, the vocabulary, the context, and what runs at once.

    Example:
        >>> from gpt2fast.tokenizer import load_tokenizer
        >>> limits = ModelLimits(load_tokenizer(), vocab_size=50257, n_positions=1024, eos_token_id=50256, max_seqs=8)
        >>> limits.n_positions, limits.tokenizer.encode("Hello")
        (1024, [15496])
    """

    tokenizer: tiktoken.Encoding
    vocab_size: int
    n_positions: int
    eos_token_id: int
    max_seqs: int  # sequences one request may ask for (prompts x n)


@dataclass
class Prompt:
    """One prompt of a request: its token ids and the text echoed for it.

    Example:
        >>> Prompt(ids=[15496, 995], text="Hello world").ids
        [15496, 995]
    """

    ids: list[int]
    text: str


def check_prompt_count(prompt: Any, limits: ModelLimits) -> None:
    """ApiError 400 when ``prompt`` lists more prompts than one request may run; O(1), so a huge list is refused
    before any of its elements is looked at.

    Example:
        >>> from gpt2fast.tokenizer import load_tokenizer
        >>> check_prompt_count([[1]] * 9, ModelLimits(load_tokenizer(), 50257, 1024, 50256, 8))
        Traceback (most recent call last):
        ...
        gpt2fast.server.protocol.ApiError: 9 prompts: one request may send at most 8 prompts (prompts x n)
    """
    if isinstance(prompt, list) and len(prompt) > limits.max_seqs and not _is_int(prompt[0]):
        raise ApiError(400, f"{len(prompt)} prompts: one request may send at most {limits.max_seqs} prompts "
                       "(prompts x n)", param="prompt")


def split_prompts(prompt: Any, limits: ModelLimits) -> list[Prompt]:
    """The request's ``prompt`` as checked token-id lists (a string, strings, ids, or lists of ids).

    ``null`` or ``""`` starts from ``<|endoftext|>`` (unconditional), as OpenAI documents. Their count is
    checked first (``check_prompt_count``), each prompt's length before its token ids.

    Example:
        >>> from gpt2fast.tokenizer import load_tokenizer
        >>> limits = ModelLimits(load_tokenizer(), 50257, 1024, 50256, 8)
        >>> [p.ids for p in split_prompts(["Hello world", ""], limits)]
        [[15496, 995], [50256]]
        >>> split_prompts([[1, 2], [3]], limits)[1].text
        '$'
    """
    check_prompt_count(prompt, limits)
    if prompt is None or isinstance(prompt, str):
        prompts = [prompt or ""]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(t) for t in p)
                                                     for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and not prompt:
        raise ApiError(400, "prompt is an empty list; give a string, strings, token ids or lists of token ids",
                       param="prompt")
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids (integers), or a list "
                       "of lists of token ids", param="prompt")
    return [_one_prompt(p, i, limits) for i, p in enumerate(prompts)]


def _is_int(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _one_prompt(prompt: str | list[int], index: int, limits: ModelLimits) -> Prompt:
    where = f"prompt {index}" if index else "the prompt"
    if isinstance(prompt, str):
        ids, text = limits.tokenizer.encode(prompt, allowed_special="all"), prompt
        if not ids:
            ids = [limits.eos_token_id]
    else:
        if not prompt:
            raise ApiError(400, f"{where} is an empty list of token ids", param="prompt")
        ids, text = list(prompt), None
    if len(ids) > limits.n_positions:
        raise ApiError(400, f"This model's maximum context length is {limits.n_positions} tokens, however {where} "
                       f"has {len(ids)} tokens. Please reduce the prompt.", param="prompt",
                       code="context_length_exceeded")
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} in {where} is outside the model's vocabulary (0..{limits.vocab_size - 1})",
                       param="prompt")
    return Prompt(ids, text if text is not None else limits.tokenizer.decode(ids, errors="replace"))


def check_lengths(prompts: Sequence[Prompt], max_tokens: int, n: int, limits: ModelLimits, n_name: str = "n"
                  ) -> None:
    """ApiError 400 when a prompt plus ``max_tokens`` exceeds the context, or prompts x ``n`` samples (the field
    ``n_name``: ``n``, or ``best_of`` when more samples run than return) is too many.

    Example:
        >>> from gpt2fast.tokenizer import load_tokenizer
        >>> limits = ModelLimits(load_tokenizer(), 50257, 8, 50256, 4)
        >>> check_lengths([Prompt([1, 2, 3], "")], max_tokens=5, n=4, limits=limits)  # 3 + 5 fits in 8
        >>> check_lengths([Prompt([1, 2, 3], "")], max_tokens=6, n=1, limits=limits)
        Traceback (most recent call last):
        ...
        gpt2fast.server.protocol.ApiError: This model's maximum context length is 8 tokens, however you requested 9 \
tokens (3 in your prompt; 6 for the completion). Please reduce your prompt; or completion length.
    """
    for prompt in prompts:
        if len(prompt.ids) + max_tokens > limits.n_positions:
            raise ApiError(400, f"This model's maximum context length is {limits.n_positions} tokens, however you "
                           f"requested {len(prompt.ids) + max_tokens} tokens ({len(prompt.ids)} in your prompt; "
                           f"{max_tokens} for the completion). Please reduce your prompt; or completion length.",
                           param="max_tokens", code="context_length_exceeded")
    if len(prompts) * n > limits.max_seqs:
        raise ApiError(400, f"{len(prompts)} prompts x {n_name}={n} is {len(prompts) * n} sequences; this server runs "
                       f"at most {limits.max_seqs} for one request", param=n_name if len(prompts) == 1 else "prompt")


# ---- the response ---------------------------------------------------------------------------------


def token_text(tokenizer: tiktoken.Encoding, token: int) -> str:
    """A token's text; a token that is only part of a UTF-8 character is written ``bytes:\\xNN`` as OpenAI does.

    Example:
        >>> from gpt2fast.tokenizer import load_tokenizer
        >>> enc = load_tokenizer()
        >>> token_text(enc, 995), token_text(enc, 447)
        (' world', 'bytes:\\\\xe2\\\\x80')
    """
    raw = tokenizer.decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class LogprobsWriter:
    """Builds OpenAI's completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset).

    ``entries[i]`` is the engine's ``{chosen_id: logprob, top ids...}`` for token ``i`` (``None``
    for a prompt's first token, which has no logprob). Offsets count characters of the decoded
    text, continuing across calls. ``token_ids`` writes tokens as ``"token_id:N"`` (vLLM's
    ``return_tokens_as_token_ids``), which names even a token that is part of a character.
    ``skip_special_tokens``: generated ``<|endoftext|>`` tokens are not in the text, so they take no
    characters (an echoed prompt's are, and do).

    Example:
        >>> from gpt2fast.tokenizer import load_tokenizer
        >>> w = LogprobsWriter(load_tokenizer())
        >>> w.write([15496, 995], [None, {995: -1.0, 11: -0.5}])["text_offset"]
        [0, 5]
    """

    tokenizer: tiktoken.Encoding
    offset: int = 0
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    token_ids: bool = False
    skip_special_tokens: bool = False

    def _name(self, token: int) -> str:
        return f"token_id:{token}" if self.token_ids else token_text(self.tokenizer, token)

    def write(self, tokens: Sequence[int], entries: Sequence[dict[int, float] | None], generated: bool = False
              ) -> dict:
        """The logprobs object of the next ``tokens`` (``entries[i]`` for ``tokens[i]``; ``generated``: completion
        tokens, not an echoed prompt), offsets continuing on."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(tokens, entries):
            out["tokens"].append(self._name(token))
            out["text_offset"].append(self.offset)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(_finite(entry[token]))
                ranked = sorted(entry.items(), key=lambda kv: -kv[1])
                out["top_logprobs"].append({self._name(t): _finite(lp) for t, lp in ranked})
            if not (generated and self.skip_special_tokens and token == self.tokenizer.eot_token):
                self.offset += len(self.decoder.decode(self.tokenizer.decode_single_token_bytes(token)))
        return out


def _finite(x: float) -> float:
    """JSON has no -inf: a token with zero probability is written as the most negative float (as vLLM does)."""
    return x if math.isfinite(x) else -9999.0


def prompt_logprobs_field(tokenizer: tiktoken.Encoding, entries: Sequence[dict[int, float] | None],
                          ranks: Sequence[int | None]) -> list[dict | None]:
    """vLLM's ``prompt_logprobs`` of a choice: per prompt token ``None`` (the first) or
    ``{token id: {"logprob", "rank", "decoded_token"}}``, the prompt's own token first, then the top-N.

    ``rank`` is 1 + the number of tokens more likely than it; the top-N are ranked 1..N in order.

    Example:
        >>> from gpt2fast.tokenizer import load_tokenizer
        >>> prompt_logprobs_field(load_tokenizer(), [None, {995: -2.0, 11: -0.5}], [None, 2])
        [None, {'995': {'logprob': -2.0, 'rank': 2, 'decoded_token': ' world'}, \
'11': {'logprob': -0.5, 'rank': 1, 'decoded_token': ','}}]
    """
    out: list[dict | None] = []
    for entry, rank in zip(entries, ranks):
        if entry is None:
            out.append(None)
            continue
        token, *_ = entry  # the prompt's own token comes first
        ranks_in_top = {t: i + 1 for i, t in enumerate(sorted(entry, key=lambda t: -entry[t]))}
        out.append({str(t): {"logprob": _finite(entry[t]), "rank": rank if t == token else ranks_in_top[t],
                             "decoded_token": tokenizer.decode([t], errors="replace")} for t in entry})
    return out


def merge_logprobs(a: dict | None, b: dict | None) -> dict | None:
    """Concatenate two logprobs objects (prompt part, then completion part); either may be None.

    Example:
        >>> part = {"tokens": ["a"], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
        >>> merge_logprobs(part, part)["tokens"], merge_logprobs(None, part) is part
        (['a', 'a'], True)
    """
    if a is None or b is None:
        return a if b is None else b
    return {key: a[key] + b[key] for key in a}
