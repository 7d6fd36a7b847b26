"""SamplingParams (validated on construction) and the batched sampler that turns logits into tokens.

``sample_batch(logits, rows)`` takes one row of logits per sequence in the step and applies each
row's own settings, in the order Hugging Face's ``generate`` applies them:

0. ``logit_bias`` (OpenAI) is added to the raw logits, and the row's ``banned_ids`` (the stop
   tokens while ``min_tokens`` are not yet generated) are set to ``-inf``.
1. penalties, on those logits: repetition (HF/CTRL, over prompt + output tokens), then
   presence and frequency (OpenAI, over output tokens). They apply in greedy mode too.
2. greedy rows (``temperature < 1e-5`` or ``top_k == 1``): argmax, ties to the lowest token id.
3. other rows: temperature -> top-k -> top-p -> min-p -> a Gumbel-max draw
   ``argmax(logits / T + g)``, ``g = -log(-log(u))``, which samples exactly from the softmax of
   the filtered logits without normalising them.

The uniforms ``u`` come from a counter-based RNG: ``u`` for token ``v`` of a row is a pure function
of ``(seed, sample_index, step, v)``, so a seeded request draws the same tokens whatever else is in
the batch and in whatever order. It is Philox-4x32-10 exactly as Triton's ``tl.rand(seed, offsets)``
computes it, with ``seed = row_seed(seed, sample_index, step)`` and ``offsets = token ids``: a fused
LM-head kernel that calls ``tl.rand`` with the same seeds sees the same noise, bit for bit.

Logprobs are ``log_softmax`` of the raw logits (before bias, penalties, temperature and filters), as
vLLM returns them by default. A row whose logits hold a NaN or an infinity gets no token but an error
(``SampledToken.error``); the other rows are sampled as if it were not there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # OpenAI's cap on logit_bias entries
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


# --------------------------------------------------------------------------------------------
# SamplingParams
# --------------------------------------------------------------------------------------------


# Below this temperature sampling is greedy, as in vLLM: logits / T would overflow fp32 for tiny T.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Invalid values raise ``ValueError`` naming the field.

    ``temperature=0`` is greedy (ties go to the lowest token id), and so is ``top_k=1``.
    ``top_k`` 0 or -1 (or any value >= the vocabulary size), ``top_p=1`` and ``min_p=0`` are off.
    A ``top_p`` too small for fp32 keeps just the most likely token(s). ``logprobs=N`` returns the
    chosen token's logprob and the ``N`` most likely tokens' (N in 0..20).

    vLLM's and OpenAI's extras: ``min_tokens`` (EOS and ``stop_token_ids`` cannot be drawn, and stop
    strings do not match, before that many tokens), ``logit_bias`` (token id -> bias in [-100, 100]
    added to the raw logits, at most 300 entries), ``best_of`` (sample that many, return the ``n``
    with the highest cumulative logprob), ``include_stop_str_in_output`` (keep the stop string or stop
    token's text), ``skip_special_tokens`` (False: ``<|endoftext|>`` shows in the text) and
    ``spaces_between_special_tokens`` (accepted; no effect on a byte-level BPE, see below).

    Example:
        >>> SamplingParams(max_tokens=8, temperature=0.7, top_k=40, seed=1).top_k
        40
        >>> SamplingParams(stop="\\n").stop_strings
        ('\\n',)
        >>> SamplingParams(top_p=0)
        Traceback (most recent call last):
        ...
        ValueError: SamplingParams.top_p must be in (0, 1], got 0
        >>> SamplingParams(n=2, best_of=3, logit_bias={50256: -100}).num_samples
        3
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    best_of: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # In Hugging Face's slow tokenizers this puts a space between an added special token and its
    # neighbours when they are decoded together. A byte-level BPE (GPT-2's tiktoken) decodes by joining
    # each token's bytes, so <|endoftext|> is its 13 bytes whatever this says: accepted, and no effect.
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        _check_real("temperature", self.temperature, 0.0, math.inf)
        _check_int("top_k", self.top_k, -1)  # -1 means off, as in vLLM
        _check_real("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_real("min_p", self.min_p, 0.0, 1.0)
        _check_real("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        _check_real("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_real("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_stop(self.stop)
        _check_stop_token_ids(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, _MASK64)
        _check_int("n", self.n, 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        _check_logit_bias(self.logit_bias)
        if self.best_of is not None and not (_is_int(self.best_of) and self.best_of >= self.n):
            raise ValueError(f"SamplingParams.best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        for name in ("include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def num_samples(self) -> int:
        """Sequences the request runs: ``best_of`` when set, else ``n``.

        Example:
            >>> SamplingParams(n=2).num_samples, SamplingParams(n=2, best_of=5).num_samples
            (2, 5)
        """
        return self.best_of if self.best_of is not None else self.n

    @property
    def needs_logprobs(self) -> bool:
        """True when the sampler must compute the chosen token's logprob: asked for, or ``best_of`` ranks by it.

        Example:
            >>> SamplingParams().needs_logprobs, SamplingParams(best_of=2).needs_logprobs
            (False, True)
        """
        return self.logprobs is not None or self.num_samples > self.n

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple: ``()`` when unset, one element when a single string."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (of the penalised logits)."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_logits(self) -> bool:
        """True when a logits processor (penalties, top-k/top-p/min-p, logprobs) must see the whole row.

        Otherwise the token is the argmax or a plain temperature draw, which the LM head can pick
        itself without writing the logits (``ops.lm_head_argmax`` / ``ops.lm_head_gumbel``).

        Example:
            >>> SamplingParams(temperature=0.8).needs_logits, SamplingParams(top_p=0.9).needs_logits
            (False, True)
        """
        if self.has_penalties or self.needs_logprobs or self.logit_bias:
            return True  # min_tokens needs them only while it bans tokens: the engine asks per row (banned_ids)
        return not self.greedy and (self.top_k > 1 or self.top_p < 1 or self.min_p > 0)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    ok = _is_int(value) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"SamplingParams.{name} must be an integer {bound}, got {value!r}")


def _check_real(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"SamplingParams.{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        interval = ("(" if low_open else "[") + f"{low:g}, " + (f"{high:g}]" if math.isfinite(high) else "inf)")
        raise ValueError(f"SamplingParams.{name} must be in {interval}, got {value!r}")


def _check_stop(stop: object) -> None:
    if stop is None or (isinstance(stop, str) and stop):
        return
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop):
        return
    raise ValueError(f"SamplingParams.stop must be a non-empty str or a list of non-empty str, got {stop!r}")


def _check_logit_bias(bias: object) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise ValueError(f"SamplingParams.logit_bias must be a dict of token id -> bias, got {bias!r}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"SamplingParams.logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}")
    for token, value in bias.items():
        if not _is_int(token) or token < 0:
            raise ValueError(f"SamplingParams.logit_bias keys must be token ids (integers >= 0), got {token!r}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not -100 <= value <= 100:
            raise ValueError(f"SamplingParams.logit_bias values must be in [-100, 100], got {value!r} "
                             f"for token {token}")


def _check_stop_token_ids(ids: object) -> None:
    if ids is None:
        return
    if isinstance(ids, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        return
    raise ValueError(f"SamplingParams.stop_token_ids must be a list of integers >= 0, got {ids!r}")


# --------------------------------------------------------------------------------------------
# What the sampler reads and returns
# --------------------------------------------------------------------------------------------


@dataclass
class SampleRow:
    """One row of a step's logits: whose settings apply and where it stands.

    ``seed`` is already resolved by the engine (the request's seed, or a random one for unseeded
    requests); ``step`` counts the tokens this sample has generated so far. ``banned_ids`` cannot be
    drawn this step (the engine bans the stop tokens until ``min_tokens`` are generated).
    """

    params: SamplingParams
    seed: int
    sample_index: int
    step: int
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    banned_ids: Sequence[int] | torch.Tensor = ()  # (K,) when a tensor (the engine builds it once per request)


@dataclass
class SampledToken:
    """The chosen token, and logprobs (of the raw logits) when ``params.logprobs`` is set.

    ``error`` is set (and ``token_id`` is -1) when the row's logits were not finite: no token was chosen.
    """

    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None  # most likely first
    error: str | None = None


NONFINITE = "the model's logits are not finite (NaN or infinity)"


def row_check(x: torch.Tensor) -> torch.Tensor:
    """One fp32 sum per row of ``x`` ((B, D) -> (B,)): NaN or +inf exactly when the row holds a NaN or a +inf
    (a sum of finite logits or hidden values stays far below fp32's range); ``-inf`` when it holds a
    ``-inf`` and no NaN or +inf (a masked token in logits, an error in hidden rows: ``_bad``). One
    reduction launch and no host sync: ``flag_nonfinite`` folds it into the chosen tokens.

    Example:
        >>> row_check(torch.tensor([[1.0, -float("inf")], [float("nan"), 0.0]])).tolist()
        [-inf, nan]
    """
    return x.sum(dim=-1, dtype=torch.float32)


def _bad(check: torch.Tensor, hidden: bool = False) -> torch.Tensor:
    """Rows whose ``row_check`` says non-finite: NaN or +inf for logits (``-inf`` alone is a masked token),
    any non-finite sum for hidden rows (where ``-inf`` is as wrong as the rest)."""
    return ~torch.isfinite(check) if hidden else torch.isnan(check) | (check == math.inf)


def flag_nonfinite(token_ids: torch.Tensor, check: torch.Tensor, *, hidden: bool = False) -> torch.Tensor:
    """``token_ids`` ``(B,)`` with -1 for every row that ``check`` (``row_check`` of the logits, or of the hidden
    rows with ``hidden=True``) finds non-finite. On the device, no host sync: read it with ``as_sampled``.

    Example:
        >>> check = torch.tensor([0.5, float("inf"), -float("inf")])
        >>> ids = torch.tensor([3, 4, 5])
        >>> flag_nonfinite(ids, check).tolist(), flag_nonfinite(ids, check, hidden=True).tolist()
        ([3, -1, 5], [3, -1, -1])
    """
    return token_ids.masked_fill(_bad(check, hidden), -1)


def as_sampled(token_ids: Sequence[int]) -> list[SampledToken]:
    """Chosen token ids as ``SampledToken``s; -1 (``flag_nonfinite``) becomes the non-finite error.

    Example:
        >>> as_sampled([7, -1])[1].error
        "the model's logits are not finite (NaN or infinity)"
    """
    return [SampledToken(t) if t >= 0 else SampledToken(-1, error=NONFINITE) for t in token_ids]


def mark_nonfinite(tokens: list[SampledToken], check: torch.Tensor) -> list[SampledToken]:
    """Replace the token of every row whose logits' ``row_check`` is NaN or +inf by an error (``token_id`` -1).

    Example:
        >>> mark_nonfinite([SampledToken(3), SampledToken(4)], torch.tensor([0.5, float("inf")]))[1].error
        "the model's logits are not finite (NaN or infinity)"
    """
    for b, bad in enumerate(_bad(check).tolist()):
        if bad:
            tokens[b] = SampledToken(-1, error=NONFINITE)
    return tokens


def zero_nonfinite_rows(logits: torch.Tensor, check: torch.Tensor) -> torch.Tensor:
    """``logits`` with its bad rows (by ``row_check``) set to 0, so the filters and draws that follow
    never see a row with nothing to keep (their tokens are discarded by ``flag_nonfinite``). No host sync.

    Example:
        >>> x = torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])
        >>> zero_nonfinite_rows(x, row_check(x)).tolist()
        [[1.0, 2.0], [0.0, 0.0]]
    """
    bad = _bad(check)  # (B,)
    if logits.device.type == "cpu" and not bad.any():  # no device to keep busy: skip the (B, V) copy
        return logits
    return logits.masked_fill(bad[:, None], 0.0)


# --------------------------------------------------------------------------------------------
# Counter-based RNG: Philox-4x32-10, bit-identical to triton.language.rand
# --------------------------------------------------------------------------------------------

_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
_UINT_TO_UNIFORM = 4.6566127342e-10  # Triton's scale: the largest x with (2**31 - 1) * x < 1 in fp32
_CPU_CHUNK_ELEMENTS = 2**16


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, sample_index: int, step: int) -> int:
    """The Philox seed of one draw: SplitMix64 chained over (seed, sample_index, step), top 63 bits.

    ``h = sm(seed); h = sm(h ^ sample_index); h = sm(h ^ step); return h >> 1`` where ``sm`` is the
    SplitMix64 finaliser, which spreads each input bit over the whole word. The result fits a
    non-negative int64, which Triton takes as a seed (a scalar argument or loaded from memory).

    Example:
        >>> row_seed(1, 0, 0) == row_seed(1, 0, 0) != row_seed(1, 0, 1)
        True
        >>> 0 <= row_seed(2**64 - 1, 3, 10**6) < 2**63
        True
    """
    if min(seed, sample_index, step) < 0 or max(seed, sample_index, step) > _MASK64:
        raise ValueError(f"row_seed: seed, sample_index and step must be in [0, 2**64), got {seed, sample_index, step}")
    return row_seed_at(row_seed_base(seed, sample_index), step)


def row_seed_base(seed: int, sample_index: int) -> int:
    """The part of ``row_seed`` one sample keeps for all its steps (a decode step then hashes once per row).

    Example:
        >>> row_seed_at(row_seed_base(7, 2), 5) == row_seed(7, 2, 5)
        True
    """
    return _splitmix64(_splitmix64(seed) ^ sample_index)


def row_seed_at(base: int, step: int) -> int:
    """``row_seed`` from its sample's ``row_seed_base`` (unchecked: the engine's steps are in range)."""
    return _splitmix64(base ^ step) >> 1


def _philox_first_word(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Word c0 of Philox-4x32-10 on counter (offset, 0, 0, 0) and key (seed lo, seed hi), as in
    ``triton.language.random.philox_impl``; uint32 values held in int64.

    ``seeds`` and ``offsets`` are int64 >= 0 that broadcast together, e.g. (B, 1) and (V,) -> (B, V).
    A product of two uint32 may pass 2**63 and wrap mod 2**64, which keeps bits 32..63 (the high
    word) intact; the low words are left unmasked until the next round folds them in, and every
    word that feeds a product is masked back to 32 bits.
    """
    k0, k1 = seeds & _MASK32, (seeds >> 32) & _MASK32  # the key
    shape = torch.broadcast_shapes(seeds.shape, offsets.shape)
    # Six (B, V) buffers reused in place for all rounds: fresh (B, V) temporaries per op cost more than
    # the arithmetic on a CPU (each is a new mmap and its page faults).
    c0 = offsets.expand(shape).clone()  # (B, V)
    c1, c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0), torch.zeros_like(c0)  # (B, V)
    prod_a, prod_b = torch.empty_like(c0), torch.empty_like(c0)  # (B, V)
    for _ in range(_PHILOX_ROUNDS):
        torch.mul(c0, _PHILOX_ROUND_A, out=prod_a)  # low word = new c3, high word goes into c2
        torch.mul(c2, _PHILOX_ROUND_B, out=prod_b)  # low word = new c1, high word goes into c0
        torch.bitwise_right_shift(prod_b, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        torch.bitwise_right_shift(prod_a, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c1, prod_b = prod_b, c1  # the old c1 and c3 become next round's scratch
        c3, prod_a = prod_a, c3
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def _uint32_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 held in int64: fp32 in [0, 1)."""
    as_int32 = bits.to(torch.int32)  # keeps the low 32 bits: the int32 view Triton bitcasts to
    folded = as_int32 ^ (as_int32 >> 31)  # ~x where x < 0, else x: [0, 2**31)
    return folded.to(torch.float32) * torch.full((), _UINT_TO_UNIFORM, dtype=torch.float32, device=bits.device)


def philox_uniform(seeds: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Uniforms in [0, 1): row ``b`` is ``tl.rand(seeds[b], tl.arange(0, num_cols))``, bit for bit.

    ``seeds``: (B,) int64, each in [0, 2**63). Returns (B, num_cols) float32 on ``seeds.device``.

    Example:
        >>> u = philox_uniform(torch.tensor([row_seed(7, 0, 0)]), 5)
        >>> u.shape, bool(((0 <= u) & (u < 1)).all())
        (torch.Size([1, 5]), True)
        >>> torch.equal(u[:, :3], philox_uniform(torch.tensor([row_seed(7, 0, 0)]), 3))
        True
    """
    offsets = torch.arange(num_cols, dtype=torch.int64, device=seeds.device)  # (V,)
    return _uint32_to_uniform(_philox_first_word(seeds.to(torch.int64)[:, None], offsets))


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise ``-log(-log(max(u, FLT_MIN)))``. Triton's rand can return 0; lifting it keeps
    the noise finite, so a kept token's score never falls to -inf, where it would tie with masked ones.

    Example:
        >>> gumbel_from_uniform(torch.tensor([0.0, 0.5])).isfinite().tolist()
        [True, True]
    """
    return u.clamp_min(torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()


# --------------------------------------------------------------------------------------------
# Logits processors: (B, V) float32 logits and each row's settings
# --------------------------------------------------------------------------------------------


def _to_device(data: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data (a list, a CPU tensor) as a tensor on ``device`` without a host-device sync.

    ``torch.tensor(data, device="cuda")`` waits for the whole GPU queue (the forward pass included);
    a copy from pinned memory with ``non_blocking=True`` just joins the queue.
    """
    if isinstance(data, torch.Tensor) and data.device.type != "cpu":  # already on a device
        return data.to(device, dtype)
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _batch_column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return _to_device(values, torch.float32, device)[:, None]  # (B, 1)


def _token_pairs(
    rows: Sequence[SampleRow], batch_rows: Sequence[int], with_prompt: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch row, token id) of every output token (and prompt token) of ``rows[b]``, ``b`` in ``batch_rows``.

    Returns two (N,) int64 tensors; a token that occurs k times gives k equal pairs.
    """
    per_row = [torch.as_tensor(rows[b].output_ids, dtype=torch.int64).reshape(-1) for b in batch_rows]
    if with_prompt:
        per_row = [torch.cat([torch.as_tensor(rows[b].prompt_ids, dtype=torch.int64).reshape(-1), out])
                   for b, out in zip(batch_rows, per_row)]
    lengths = torch.tensor([t.numel() for t in per_row])  # (R,)
    batch_idx = torch.repeat_interleave(torch.tensor(batch_rows, dtype=torch.int64), lengths)  # (N,)
    return _to_device(batch_idx, torch.int64, device), _to_device(torch.cat(per_row), torch.int64, device)


def _apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SampleRow], batch_rows: Sequence[int]) -> None:
    """In place, HF's ``RepetitionPenaltyLogitsProcessor``: gather, penalise, scatter back."""
    batch_idx, token_ids = _token_pairs(rows, batch_rows, with_prompt=True, device=logits.device)  # (N,), (N,)
    penalty = _batch_column([r.params.repetition_penalty for r in rows], logits.device)[batch_idx, 0]  # (N,)
    picked = logits[batch_idx, token_ids]  # (N,); repeats of a token read the same value and write the same
    logits[batch_idx, token_ids] = torch.where(picked > 0, picked / penalty, picked * penalty)


def _apply_presence_frequency_penalty(
    logits: torch.Tensor, rows: Sequence[SampleRow], batch_rows: Sequence[int]
) -> None:
    """In place, OpenAI's ``logit -= presence * (count > 0) + frequency * count`` over output tokens."""
    batch_idx, token_ids = _token_pairs(rows, batch_rows, with_prompt=False, device=logits.device)  # (N,), (N,)
    keys = batch_idx * logits.shape[-1] + token_ids  # (N,) one key per (row, token)
    sorted_keys = torch.sort(keys).values
    counts = torch.searchsorted(sorted_keys, keys, right=True) - torch.searchsorted(sorted_keys, keys)  # (N,) >= 1
    presence = _batch_column([r.params.presence_penalty for r in rows], logits.device)[batch_idx, 0]  # (N,)
    frequency = _batch_column([r.params.frequency_penalty for r in rows], logits.device)[batch_idx, 0]  # (N,)
    picked = logits[batch_idx, token_ids]  # (N,)
    logits[batch_idx, token_ids] = picked - (presence * (counts > 0) + frequency * counts)


def apply_bias_and_bans(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Each row's ``logit_bias`` added, its ``banned_ids`` set to ``-inf``: a new (B, V) tensor.

    Example:
        >>> row = SampleRow(SamplingParams(logit_bias={0: 2.5}), 0, 0, 0, banned_ids=[2])
        >>> apply_bias_and_bans(torch.tensor([[1.0, 0.0, 3.0]]), [row]).tolist()
        [[3.5, 0.0, -inf]]
    """
    logits = logits.clone()
    biased = [(b, t, v) for b, r in enumerate(rows) for t, v in (r.params.logit_bias or {}).items()]
    if biased:
        batch_idx, token_ids, values = zip(*biased)
        index = (_to_device(batch_idx, torch.int64, logits.device), _to_device(token_ids, torch.int64, logits.device))
        logits.index_put_(index, _to_device(values, torch.float32, logits.device), accumulate=True)
    for b, row in enumerate(rows):
        if len(row.banned_ids):  # one indexed fill a row: a stop list may hold thousands of ids
            logits[b].index_fill_(0, _to_device(row.banned_ids, torch.int64, logits.device), -math.inf)
    return logits


def _has_bias_or_bans(row: SampleRow) -> bool:
    return bool(row.params.logit_bias) or len(row.banned_ids) > 0


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Repetition (HF/CTRL, over prompt + output tokens), then presence/frequency (OpenAI, over output
    tokens), each on the rows that ask for it. Returns a new (B, V) tensor; only seen tokens change.

    Example:
        >>> params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5)
        >>> apply_penalties(torch.tensor([[1.0, -1.0, 3.0]]), [SampleRow(params, 0, 0, 1, [0], [1])]).tolist()
        [[0.5, -2.5, 3.0]]
    """
    logits = logits.clone()
    repetition = [b for b, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if repetition:
        _apply_repetition_penalty(logits, rows, repetition)
    presence_frequency = [b for b, r in enumerate(rows) if r.params.presence_penalty or r.params.frequency_penalty]
    if presence_frequency:
        _apply_presence_frequency_penalty(logits, rows, presence_frequency)
    return logits


def top_k_floor(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Each row's k-th largest value ((B, 1)); tokens below it fall out, ties with it stay. k <= 0: -inf.

    Example:
        >>> top_k_floor(torch.tensor([[1.0, 3.0, 2.0, 3.0], [1.0, 3.0, 2.0, 3.0]]), [2, 0]).tolist()
        [[3.0], [-inf]]
    """
    vocab = logits.shape[-1]
    active = [0 < k < vocab for k in top_k]
    k_max = max((k for k, on in zip(top_k, active) if on), default=0)
    if k_max == 0:
        return torch.full((logits.shape[0], 1), -math.inf, device=logits.device)
    top_values = torch.topk(logits, k_max, dim=-1).values  # (B, k_max), descending
    kth_index = _to_device([k - 1 if on else 0 for k, on in zip(top_k, active)], torch.int64, logits.device)  # (B,)
    inactive = _to_device([not on for on in active], torch.bool, logits.device)  # (B,)
    return top_values.gather(1, kth_index[:, None]).masked_fill_(inactive[:, None], -math.inf)  # (B, 1)


def top_p_floor(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The least likely value in each row's nucleus ((B, 1)): the smallest most-likely-first prefix whose
    probability reaches ``top_p`` ((B, 1), in [0, 1)). Always at least the top token (also when a tiny
    ``top_p`` rounded to 0 in fp32); ties with the floor stay in. ``logits`` may hold ``-inf`` for
    tokens an earlier filter removed.

    Example:
        >>> top_p_floor(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), torch.tensor([[0.8]])).tolist()  # probs .64 .09 .24 .03
        [[2.0]]
        >>> top_p_floor(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), torch.tensor([[1e-46]])).tolist()  # 0 in fp32: the top
        [[3.0]]
    """
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass of the more likely tokens
    num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp_min_(1)  # (B, 1) >= 1
    return sorted_logits.gather(1, num_kept - 1)


def min_p_floor(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """``log(min_p * max prob)`` in logit units: ``max logit + log(min_p)`` ((B, 1)); ``min_p``: (B, 1).

    Example:
        >>> min_p_floor(torch.tensor([[0.0, -1.0, -3.0]]), torch.tensor([[0.1]])).tolist()
        [[-2.3025851249694824]]
    """
    return logits.amax(dim=-1, keepdim=True) + torch.log(min_p)


def filter_logits(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Divide by temperature, then set to ``-inf`` what top-k, top-p (of the top-k survivors) and min-p
    remove: (B, V) -> (B, V) ready for a draw. No row may be greedy (temperature 0).

    Each filter gives a per-row floor and a token stays when its logit is >= every floor.

    Example:
        >>> row = SampleRow(SamplingParams(temperature=0.5, top_k=2), seed=0, sample_index=0, step=0)
        >>> filter_logits(torch.tensor([[1.0, 3.0, 2.0]]), [row])
        tensor([[-inf, 6., 4.]])
    """
    params = [r.params for r in rows]
    return filter_logits_by(logits, [p.temperature for p in params], [p.top_k for p in params],
                            [p.top_p for p in params], [p.min_p for p in params])


def filter_logits_by(
    logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
    min_p: Sequence[float],
) -> torch.Tensor:
    """``filter_logits`` with the settings as per-row lists (one entry per row of ``logits``).

    Example:
        >>> filter_logits_by(torch.tensor([[1.0, 3.0, 2.0]]), [0.5], [2], [1.0], [0.0])
        tensor([[-inf, 6., 4.]])
    """
    scaled = logits / _batch_column(temperature, logits.device)  # (B, V)
    floor = top_k_floor(scaled, top_k)  # (B, 1)
    nucleus = [b for b, p in enumerate(top_p) if p < 1]
    if nucleus:
        idx = _to_device(nucleus, torch.int64, logits.device)
        sub = scaled[idx]  # (R, V)
        sub_floor = top_p_floor(sub.masked_fill_(sub < floor[idx], -math.inf),
                                _batch_column([top_p[b] for b in nucleus], logits.device))  # (R, 1)
        floor[idx] = torch.maximum(floor[idx], sub_floor)
    if any(p > 0 for p in min_p):
        floor = torch.maximum(floor, min_p_floor(scaled, _batch_column(min_p, logits.device)))
    return scaled.masked_fill_(scaled < floor, -math.inf)


def gumbel_max_draw(filtered: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """``argmax(filtered + g)`` with Philox Gumbel noise keyed by each row's (seed, sample_index, step).

    Example:
        >>> row = SampleRow(SamplingParams(), seed=3, sample_index=0, step=0)
        >>> gumbel_max_draw(torch.tensor([[-math.inf, 0.0, -math.inf]]), [row]).tolist()
        [1]
    """
    seeds = _to_device([row_seed(r.seed, r.sample_index, r.step) for r in rows], torch.int64, filtered.device)  # (B,)
    return gumbel_max_draw_seeded(filtered, seeds)


def gumbel_max_draw_seeded(filtered: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """``gumbel_max_draw`` with the Philox row seeds given: ``seeds`` (B,) int64 on ``filtered``'s device.

    Example:
        >>> gumbel_max_draw_seeded(torch.tensor([[0.0, -math.inf]]), torch.tensor([row_seed(3, 0, 0)])).tolist()
        [0]
    """
    if filtered.device.type != "cpu":
        return _gumbel_argmax(filtered, seeds[:, None], torch.arange(filtered.shape[-1], device=filtered.device))
    # On a CPU, ~64K elements at a time keep Philox's words in the L2 cache (1.5x faster at B=64, V=50257).
    n = max(1, _CPU_CHUNK_ELEMENTS // filtered.shape[-1])  # rows per chunk
    return torch.cat([_gumbel_argmax_cpu(filtered[i : i + n], seeds[i : i + n]) for i in range(0, len(seeds), n)])


def _gumbel_argmax(filtered: torch.Tensor, seeds: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim of ``filtered + g``, ``g`` the noise at (seeds, token_ids) (broadcast)."""
    noise = gumbel_from_uniform(_uint32_to_uniform(_philox_first_word(seeds, token_ids)))  # (B, V)
    return argmax_rows(noise.add_(filtered))  # (B,)


def _gumbel_argmax_cpu(filtered: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The same draw for a few rows (R, V) -> (R,). A lone row whose filters kept few tokens draws noise
    for those alone: the others' noise cannot matter (their logit is -inf), and counting them costs
    no sync on a CPU. Elementwise torch ops give the same bits wherever an element sits, so both
    ways pick the same token."""
    if filtered.shape[0] == 1:
        kept = torch.nonzero(filtered[0] > -math.inf)[:, 0]  # (K,) ascending, so ties still go to the lowest id
        if kept.numel() <= filtered.shape[-1] // 8:
            return kept[_gumbel_argmax(filtered[0, kept][None], seeds[:, None], kept)]
    return _gumbel_argmax(filtered, seeds[:, None], torch.arange(filtered.shape[-1]))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)`` (ties -> lowest index) for (B, V) ``x``, through numpy on a CPU.

    torch's CPU argmax is a scalar loop (~140 us for V=50257); numpy's is vectorised (~5 us).

    Example:
        >>> argmax_rows(torch.tensor([[0.0, 2.0, 2.0], [5.0, 1.0, 5.0]])).tolist()
        [1, 0]
    """
    if x.device.type != "cpu":
        return torch.argmax(x, dim=-1)
    return torch.from_numpy(x.detach().float().numpy().argmax(axis=-1)).to(torch.int64)


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


def sample_batch(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[SampledToken]:
    """Choose one token per row of ``logits`` ((B, V) float, any device), each row by its own settings.

    The only host-device syncs are reading the chosen ids (and the logprobs, when asked for): per-row
    settings reach the device through pinned memory, asynchronously.

    Example:
        >>> logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
        >>> rows = [SampleRow(SamplingParams(temperature=0), 0, 0, 0),
        ...         SampleRow(SamplingParams(temperature=0.8, logprobs=1), seed=5, sample_index=0, step=0)]
        >>> tokens = sample_batch(logits, rows)
        >>> tokens[0].token_id, len(tokens[1].top_logprobs)
        (1, 1)
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"sample_batch: logits must be (len(rows)={len(rows)}, V), got {tuple(logits.shape)}")
    params = [r.params for r in rows]
    check = row_check(logits)  # (B,): a row with a NaN or infinity gets an error instead of a token
    plain = [not p.has_penalties and not p.needs_logprobs and not _has_bias_or_bans(r) for p, r in zip(params, rows)]
    if all(p.greedy for p in params) and all(plain):
        return as_sampled(flag_nonfinite(argmax_rows(logits), check).tolist())  # the common fast path

    raw = zero_nonfinite_rows(logits.float(), check)  # (B, V)
    processed = apply_bias_and_bans(raw, rows) if any(_has_bias_or_bans(r) for r in rows) else raw  # (B, V)
    if any(p.has_penalties for p in params):
        processed = apply_penalties(processed, rows)  # (B, V)
    token_ids = _choose(processed, rows)  # (B,)
    if not any(p.needs_logprobs for p in params):
        return as_sampled(flag_nonfinite(token_ids, check).tolist())
    return mark_nonfinite(_with_logprobs(raw, token_ids, rows), check)


def _choose(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Argmax for greedy rows, a filtered Gumbel-max draw for the others: (B, V) -> (B,) int64."""
    drawn = [b for b, r in enumerate(rows) if not r.params.greedy]
    if len(drawn) == len(rows):
        return gumbel_max_draw(filter_logits(logits, rows), rows)
    token_ids = argmax_rows(logits)  # (B,)
    if drawn:
        sub_rows = [rows[b] for b in drawn]
        idx = _to_device(drawn, torch.int64, logits.device)
        token_ids[idx] = gumbel_max_draw(filter_logits(logits[idx], sub_rows), sub_rows)
    return token_ids


def _with_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SampleRow]) -> list[SampledToken]:
    """Attach log_softmax(raw logits) of the chosen token and the top-N to the rows that need them
    (top-N only where ``logprobs`` is asked for; ``best_of`` alone needs the chosen token's)."""
    out = [SampledToken(t) for t in token_ids.tolist()]
    wanted = [b for b, r in enumerate(rows) if r.params.needs_logprobs]
    if len(wanted) < len(rows):
        idx = _to_device(wanted, torch.int64, raw.device)
        raw, token_ids = raw[idx], token_ids[idx]
    logprobs = torch.log_softmax(raw, dim=-1)  # (L, V)
    chosen = logprobs.gather(1, token_ids[:, None])[:, 0].tolist()  # (L,)
    top_n = min(max(rows[b].params.logprobs or 0 for b in wanted), logprobs.shape[-1])  # a tiny vocabulary: all of it
    top = torch.topk(logprobs, top_n, dim=-1)  # (L, N) likeliest first
    top_ids, top_values = top.indices.tolist(), top.values.tolist()
    for j, b in enumerate(wanted):
        n = rows[b].params.logprobs or 0
        out[b].logprob = chosen[j]
        out[b].top_logprobs = dict(zip(top_ids[j][:n], top_values[j][:n]))
    return out


def sample(logits: torch.Tensor, params: SamplingParams, seed: int, sample_index: int, step: int) -> int:
    """One row ``(V,)`` without token history (so no penalties): ``sample_batch`` on a batch of one.

    Kept for callers of the single-row API; new code calls ``sample_batch``.

    Example:
        >>> sample(torch.tensor([0.5, 2.0, 2.0]), SamplingParams(temperature=0), seed=0, sample_index=0, step=0)
        1
    """
    return sample_batch(logits[None], [SampleRow(params, seed, sample_index, step)])[0].token_id
