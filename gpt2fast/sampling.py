"""SamplingParams (validated on construction) and the sampler that turns logits into tokens.

Randomness is counter-based: the noise for a draw is a pure function of (seed, sample index,
step), so a seeded request gets the same tokens whatever else runs beside it. Sampling is
Gumbel-max (``argmax(logits / T + Gumbel noise)``), which is exact for the softmax distribution
and is what a fused LM-head kernel can do without materialising probabilities.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Invalid values raise ``ValueError`` naming the field.

    ``temperature=0`` is greedy (ties go to the lowest token id); ``top_k=0`` and ``top_p=1`` are off.

    Example:
        >>> SamplingParams(max_tokens=8, temperature=0.7, top_k=40, seed=1).top_k
        40
        >>> SamplingParams(top_p=0)
        Traceback (most recent call last):
        ...
        ValueError: SamplingParams.top_p must be in (0, 1], got 0
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=-1)  # -1 means off, as in vLLM
        _check_real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        _check_real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"SamplingParams.{name} must be an integer >= {minimum}, got {value!r}")


def _check_real(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"SamplingParams.{name} must be a finite number, got {value!r}")


def mask_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set every token outside the top-k / nucleus top-p set to ``-inf`` (``logits``: ``(V,)`` fp32).

    Ties at the top-k boundary are all kept; top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches ``top_p`` (always at least one token).

    Example:
        >>> mask_logits(torch.tensor([1.0, 3.0, 2.0]), top_k=2, top_p=1.0).tolist()
        [-inf, 3.0, 2.0]
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # (V,) mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits


def gumbel_noise(seed: int, sample_index: int, step: int, size: int, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise, a pure function of (seed, sample_index, step).

    Example:
        >>> a = gumbel_noise(7, 0, 3, 5, torch.device("cpu")); b = gumbel_noise(7, 0, 3, 5, torch.device("cpu"))
        >>> torch.equal(a, b), torch.equal(a, gumbel_noise(7, 0, 4, 5, torch.device("cpu")))
        (True, False)
    """
    key = hashlib.blake2b(f"{seed}:{sample_index}:{step}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device).manual_seed(int.from_bytes(key, "little") >> 1)
    uniform = torch.rand(size, generator=generator, device=device, dtype=torch.float32)
    # Clamp away from 0 so -log(-log(u)) stays finite.
    return -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(torch.float32).tiny)))


def sample(logits: torch.Tensor, params: SamplingParams, seed: int, sample_index: int, step: int) -> int:
    """Choose the next token from one row of fp32 logits ``(V,)``.

    Example:
        >>> sample(torch.tensor([0.5, 2.0, 2.0]), SamplingParams(temperature=0), seed=0, sample_index=0, step=0)
        1
    """
    if params.greedy:
        return int(torch.argmax(logits))  # torch.argmax returns the first (lowest) index among ties
    masked = mask_logits(logits.float(), params.top_k, params.top_p)
    noise = gumbel_noise(seed, sample_index, step, logits.shape[-1], logits.device)
    return int(torch.argmax(masked / params.temperature + noise))
