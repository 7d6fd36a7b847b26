"""SamplingParams validation and the sampler, tested statistically against softmax probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2fast.sampling import SamplingParams, mask_logits, sample

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.0), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(seed="1"), "seed"),
        (dict(ignore_eos=1), "ignore_eos"),
    ],
)
def test_invalid_params_name_the_field(fields, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**fields)


def test_greedy_ties_go_to_the_lowest_id():
    logits = torch.tensor([0.1, 3.0, -1.0, 3.0, 3.0])
    assert sample(logits, SamplingParams(temperature=0), 0, 0, 0) == 1
    assert sample(logits, SamplingParams(top_k=1), 0, 0, 0) == 1


def draw(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    counts = torch.zeros(logits.shape[0])
    for step in range(n):
        counts[sample(logits, params, seed=11, sample_index=0, step=step)] += 1
    return counts / n


def reference_probs(logits: torch.Tensor, temperature: float, keep: torch.Tensor) -> torch.Tensor:
    """float64 softmax over the kept tokens, computed independently of the sampler."""
    p = torch.zeros_like(logits, dtype=torch.float64)
    kept = logits.double()[keep] / temperature
    p[keep] = torch.exp(kept - kept.max()) / torch.exp(kept - kept.max()).sum()
    return p


LOGITS = torch.tensor([2.0, 1.0, 0.5, -0.5, 1.5, -3.0, 0.0])
N_DRAWS = 6000


@pytest.mark.parametrize(
    "params, keep",
    [
        (SamplingParams(temperature=1.0), [0, 1, 2, 3, 4, 5, 6]),
        (SamplingParams(temperature=0.5), [0, 1, 2, 3, 4, 5, 6]),
        (SamplingParams(temperature=2.0, top_k=3), [0, 1, 4]),
        (SamplingParams(temperature=1.0, top_p=0.6), [0, 4]),
    ],
)
def test_frequencies_match_probabilities(params, keep):
    keep_mask = torch.zeros(len(LOGITS), dtype=torch.bool)
    keep_mask[keep] = True
    expected = reference_probs(LOGITS, params.temperature, keep_mask)
    observed = draw(LOGITS, params, N_DRAWS).double()
    assert (observed[~keep_mask] == 0).all(), "a masked token was drawn"
    # 4.5 standard errors per token: a wrong distribution fails, a right one passes with near certainty.
    tolerance = 4.5 * torch.sqrt(expected * (1 - expected) / N_DRAWS) + 1e-9
    assert ((observed - expected).abs() <= tolerance).all(), (observed, expected)


def test_top_p_keeps_the_smallest_sufficient_prefix():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    masked = mask_logits(probs.log(), top_k=0, top_p=0.75)
    assert torch.isinf(masked).tolist() == [False, False, True, True]
    assert not torch.isinf(mask_logits(probs.log(), top_k=0, top_p=0.01)[0])


def test_seeded_draws_are_reproducible_and_vary_with_the_key():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)
    first = [sample(logits, params, seed=5, sample_index=0, step=s) for s in range(20)]
    assert first == [sample(logits, params, seed=5, sample_index=0, step=s) for s in range(20)]
    assert first != [sample(logits, params, seed=6, sample_index=0, step=s) for s in range(20)]
    assert len(set(first)) > 5 and not math.isnan(logits.sum())
