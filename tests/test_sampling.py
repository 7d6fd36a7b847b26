"""SamplingParams validation and the batched sampler, each checked against something independent:
Hugging Face's repetition processor, float64 numpy versions of the formulas and distributions,
torch.log_softmax, and Triton's own ``tl.rand`` run by the interpreter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from gpt2fast.sampling import (
    SampledToken,
    SampleRow,
    SamplingParams,
    apply_bias_and_bans,
    apply_penalties,
    filter_logits,
    gumbel_from_uniform,
    philox_uniform,
    row_seed,
    sample,
    sample_batch,
)

# --------------------------------------------------------------------------------------------
# SamplingParams
# --------------------------------------------------------------------------------------------

INVALID = [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0), ("max_tokens", True), ("max_tokens", None),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("temperature", False),
    ("top_k", -2), ("top_k", 3.0), ("top_k", True),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.5), ("top_p", math.nan),
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", math.inf),
    ("frequency_penalty", -3.0), ("frequency_penalty", 2.01), ("frequency_penalty", math.nan),
    ("stop", ""), ("stop", 3), ("stop", ["ok", ""]), ("stop", ["ok", 5]), ("stop", [b"x"]), ("stop", {"a"}),
    ("stop_token_ids", 5), ("stop_token_ids", [1, -1]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", "12"),
    ("ignore_eos", 1), ("ignore_eos", "yes"), ("ignore_eos", None),
    ("seed", -1), ("seed", 1.0), ("seed", "7"), ("seed", True), ("seed", 2**64),
    ("n", 0), ("n", 2.0), ("n", False),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0), ("logprobs", True),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 2.0), ("min_tokens", True), ("min_tokens", None),
    ("logit_bias", [1, 2]), ("logit_bias", {"5": 1.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", {True: 1.0}),
    ("logit_bias", {5: 100.5}), ("logit_bias", {5: -101}), ("logit_bias", {5: math.nan}), ("logit_bias", {5: math.inf}),
    ("logit_bias", {5: "1"}), ("logit_bias", {5: True}), ("logit_bias", {i: 1.0 for i in range(301)}),
    ("best_of", 0), ("best_of", 2.0), ("best_of", True), ("best_of", "3"),
    ("include_stop_str_in_output", 1), ("include_stop_str_in_output", None),
    ("skip_special_tokens", "no"), ("skip_special_tokens", 0), ("spaces_between_special_tokens", None),
]

VALID = [
    dict(temperature=0), dict(temperature=1), dict(top_k=-1), dict(top_k=0), dict(top_k=50257),
    dict(top_p=1), dict(top_p=1e-9), dict(min_p=0), dict(min_p=1.0), dict(repetition_penalty=1e-3),
    dict(presence_penalty=-2, frequency_penalty=2), dict(stop="\n"), dict(stop=["a", "bc"]), dict(stop=[]),
    dict(stop_token_ids=[0, 50256]), dict(stop_token_ids=[]), dict(ignore_eos=True), dict(seed=0),
    dict(seed=2**64 - 1), dict(n=7), dict(logprobs=0), dict(logprobs=20), dict(max_tokens=1),
    dict(min_tokens=0), dict(max_tokens=5, min_tokens=5), dict(logit_bias={}), dict(logit_bias={0: -100, 50256: 100}),
    dict(logit_bias={i: 0.5 for i in range(300)}), dict(best_of=1), dict(n=3, best_of=3), dict(n=2, best_of=9),
    dict(include_stop_str_in_output=True), dict(skip_special_tokens=False), dict(spaces_between_special_tokens=False),
]


@pytest.mark.parametrize("field, value", INVALID)
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} "):
        SamplingParams(**{field: value})


def test_best_of_below_n_names_both():
    with pytest.raises(ValueError, match=r"^SamplingParams\.best_of must be an integer >= n \(3\), got 2"):
        SamplingParams(n=3, best_of=2)


@pytest.mark.parametrize("fields", VALID)
def test_valid_edge_values_are_accepted(fields):
    params = SamplingParams(**fields)
    assert all(getattr(params, name) == value for name, value in fields.items())


def test_stop_strings_and_greedy():
    assert SamplingParams().stop_strings == ()
    assert SamplingParams(stop="###").stop_strings == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop_strings == ("a", "b")
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.01).greedy


# --------------------------------------------------------------------------------------------
# Greedy and penalties
# --------------------------------------------------------------------------------------------


def greedy_row(**fields) -> SampleRow:
    return SampleRow(SamplingParams(temperature=0, **fields), seed=0, sample_index=0, step=0)


TIES = torch.tensor([[0.1, 3.0, -1.0, 3.0, 3.0], [2.5, -0.5, 2.5, 1.0, 0.7], [-1.0, -2.0, -0.5, -0.5, -3.0]])


GREEDY_CASES = [dict(temperature=0), dict(top_k=1), dict(temperature=0, logprobs=2),
                dict(temperature=0, presence_penalty=0.5)]


@pytest.mark.parametrize("fields", GREEDY_CASES)
def test_greedy_ties_go_to_the_lowest_id(fields):
    params = SamplingParams(**fields)
    rows = [SampleRow(params, seed=0, sample_index=0, step=0, output_ids=[4]) for _ in range(3)]
    assert [t.token_id for t in sample_batch(TIES, rows)] == [1, 0, 2]


PENALTY_CASES = [(1.3, 5, 17), (0.7, 1, 3), (2.0, 40, 111)]  # (penalty, prompt length, output length)


@pytest.mark.parametrize("penalty, prompt_len, output_len", PENALTY_CASES)
def test_repetition_penalty_matches_hugging_face(penalty, prompt_len, output_len):
    gen = torch.Generator().manual_seed(prompt_len)
    vocab, batch = 211, 4
    logits = torch.randn(batch, vocab, generator=gen) * 3 + 0.01  # (B, V), both signs, no zeros
    history = torch.randint(0, vocab // 3, (batch, prompt_len + output_len), generator=gen)  # repeats on purpose
    rows = [SampleRow(SamplingParams(temperature=0, repetition_penalty=penalty), seed=0, sample_index=0, step=0,
                      prompt_ids=h[:prompt_len].tolist(), output_ids=h[prompt_len:].tolist()) for h in history]
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    torch.testing.assert_close(apply_penalties(logits, rows), expected, rtol=0, atol=0)
    assert [t.token_id for t in sample_batch(logits, rows)] == expected.argmax(dim=-1).tolist()


def openai_penalties_float64(logits: np.ndarray, outputs: list[list[int]], presence: float, frequency: float):
    """OpenAI's documented formula, token by token: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence."""
    out = logits.astype(np.float64).copy()
    for b, ids in enumerate(outputs):
        for token in set(ids):
            count = ids.count(token)
            out[b, token] -= count * frequency + (count > 0) * presence
    return out


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.3), (-1.2, 1.7), (2.0, -2.0)])
def test_presence_and_frequency_penalties_follow_openai(presence, frequency):
    gen = torch.Generator().manual_seed(3)
    vocab = 97
    logits = torch.randn(3, vocab, generator=gen) + 0.01  # (B, V)
    outputs = [torch.randint(0, 20, (n,), generator=gen).tolist() for n in (1, 17, 111)]
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    rows = [SampleRow(params, seed=0, sample_index=0, step=len(o), prompt_ids=[50, 51, 52], output_ids=o)
            for o in outputs]
    expected = openai_penalties_float64(logits.numpy(), outputs, presence, frequency)
    torch.testing.assert_close(apply_penalties(logits, rows), torch.from_numpy(expected).float())  # fp32 tolerance


def test_penalties_apply_only_to_the_rows_that_ask():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) + 0.01
    rows = [SampleRow(SamplingParams(repetition_penalty=1.5), 0, 0, 2, [1, 2], [3, 3]),
            SampleRow(SamplingParams(), 0, 0, 2, [1, 2], [3, 3]),
            SampleRow(SamplingParams(frequency_penalty=1.0), 0, 0, 2, [1, 2], [3, 3])]
    out = apply_penalties(logits, rows)
    torch.testing.assert_close(out[1], logits[1], rtol=0, atol=0)
    changed = (out != logits).nonzero().tolist()
    assert changed == [[0, 1], [0, 2], [0, 3], [2, 3]]


# --------------------------------------------------------------------------------------------
# Statistics: sampled frequencies vs the filtered distribution, computed in float64 numpy
# --------------------------------------------------------------------------------------------

LOGITS12 = np.array([2.1, 0.3, -1.2, 1.7, 0.9, -0.4, 2.5, -2.2, 0.6, 1.1, -0.8, 0.25])
N_DRAWS = 200_000
OUTPUT12 = [6, 6, 0, 3]  # tokens already generated, for the penalties case


def expected_distribution(params: SamplingParams, output_ids: list[int]) -> np.ndarray:
    """HF's order in float64: penalties, temperature, top-k, top-p, min-p, then softmax over what is left."""
    logits = openai_penalties_float64(LOGITS12[None], [output_ids], params.presence_penalty,
                                      params.frequency_penalty)[0] if output_ids else LOGITS12.copy()
    scaled = logits / params.temperature
    keep = np.ones(len(scaled), dtype=bool)
    if params.top_k > 0:
        keep &= scaled >= np.sort(scaled)[::-1][params.top_k - 1]
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        keep[order[mass_before >= params.top_p]] = False
    keep &= np.exp(scaled - scaled.max()) >= params.min_p
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    return probs / probs.sum()


STAT_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.15),
    SamplingParams(temperature=0.8, top_k=9, top_p=0.93, min_p=0.05),
    SamplingParams(temperature=1.2, top_k=10, top_p=0.9, presence_penalty=0.4, frequency_penalty=0.3),
]


@pytest.mark.parametrize("params", STAT_CASES)
def test_sampled_frequencies_match_the_filtered_distribution(params):
    output_ids = OUTPUT12 if params.presence_penalty or params.frequency_penalty else []
    expected = expected_distribution(params, output_ids)
    logits = torch.tensor(LOGITS12, dtype=torch.float32).expand(N_DRAWS, -1)  # (N, 12): one draw per step
    rows = [SampleRow(params, seed=99, sample_index=0, step=s, output_ids=output_ids) for s in range(N_DRAWS)]
    tokens = [t.token_id for t in sample_batch(logits, rows)]
    observed = np.bincount(tokens, minlength=len(LOGITS12)) / N_DRAWS
    assert observed[expected == 0].sum() == 0, f"a filtered-out token was drawn: {observed} vs {expected}"
    total_variation = 0.5 * np.abs(observed - expected).sum()
    assert total_variation < 0.01, (total_variation, observed.round(4), expected.round(4))


def test_a_kept_token_beats_masked_ones_even_with_extreme_noise():
    # Two finite logits in a sea of -inf: whatever the noise, the draw lands on one of them.
    logits = torch.full((64, 1000), -math.inf)
    logits[:, 17], logits[:, 900] = 0.5, -40.0
    rows = [SampleRow(SamplingParams(), seed=s, sample_index=0, step=0) for s in range(64)]
    assert {t.token_id for t in sample_batch(logits, rows)} == {17}


# --------------------------------------------------------------------------------------------
# Batch invariance: a seeded row draws the same tokens whatever else is in the batch
# --------------------------------------------------------------------------------------------

TARGET = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
NEIGHBOURS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=1.1, seed=5),
    SamplingParams(temperature=0.7, top_k=40, seed=6, logprobs=3),
    SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.5),
    SamplingParams(temperature=0.5, top_k=3, top_p=0.5),
    SamplingParams(temperature=1.5, top_k=1000),
]


def mixed_batch(target: SampleRow, vocab: int, gen: torch.Generator) -> list[SampleRow]:
    """The target row at position 5 of 16 rows with other settings, seeds and histories."""
    rows = []
    for i in range(15):
        history = torch.randint(0, vocab, (i + 3,), generator=gen).tolist()
        rows.append(SampleRow(NEIGHBOURS[i % len(NEIGHBOURS)], seed=i, sample_index=i % 3, step=target.step,
                              prompt_ids=history[:2], output_ids=history[2:]))
    return rows[:5] + [target] + rows[5:]


@pytest.mark.parametrize("vocab", [1000, 50257])
@pytest.mark.parametrize("target_params", [TARGET, SamplingParams(temperature=0.8, top_k=50, seed=77)])
def test_seeded_row_is_batch_invariant(vocab, target_params):
    gen = torch.Generator().manual_seed(vocab)
    alone, in_batch, reversed_batch = [], [], []
    for step in range(3):
        target = SampleRow(target_params, seed=target_params.seed, sample_index=1, step=step,
                           prompt_ids=[1, 2, 3], output_ids=list(range(step)))
        rows = mixed_batch(target, vocab, gen)
        logits = torch.randn(len(rows), vocab, generator=gen) * 2 + 0.01  # (16, V)
        alone.append(sample_batch(logits[5:6], [target])[0].token_id)
        in_batch.append(sample_batch(logits, rows)[5].token_id)
        reversed_batch.append(sample_batch(logits.flip(0), rows[::-1])[-6].token_id)
    assert alone == in_batch == reversed_batch


def test_the_cpu_shortcut_draws_what_the_dense_formula_draws():
    # argmax(filtered + g) over the whole vocabulary, built from the public pieces; the sampler may
    # skip noise for filtered-out tokens, which must not change a single draw.
    gen = torch.Generator().manual_seed(11)
    vocab = 50257
    logits = torch.randn(25, vocab, generator=gen) * 3 + 0.01
    params = [SamplingParams(top_k=k) for k in (1000, 40, 2)] + [SamplingParams(min_p=0.2), SamplingParams()]
    rows = [SampleRow(params[i % len(params)], seed=3, sample_index=0, step=i) for i in range(25)]
    filtered = filter_logits(logits, rows)
    seeds = torch.tensor([row_seed(r.seed, r.sample_index, r.step) for r in rows])
    dense = torch.argmax(filtered + gumbel_from_uniform(philox_uniform(seeds, vocab)), dim=-1)
    assert [t.token_id for t in sample_batch(logits, rows)] == dense.tolist()


def test_different_seeds_steps_and_samples_draw_differently():
    logits = torch.randn(1, 5000, generator=torch.Generator().manual_seed(0)) + 0.01

    def draws(seed: int, sample_index: int = 0) -> list[int]:
        return [sample(logits[0], SamplingParams(seed=seed), seed, sample_index, step) for step in range(20)]

    first = draws(5)
    assert first == draws(5)
    assert first != draws(6) and first != draws(5, sample_index=1)
    assert len(set(first)) > 10


# --------------------------------------------------------------------------------------------
# Logprobs: of the raw logits, whatever penalties and filters chose the token
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_top", [0, 1, 5, 20])
def test_logprobs_are_log_softmax_of_the_raw_logits(num_top):
    gen = torch.Generator().manual_seed(num_top)
    logits = torch.randn(4, 1023, generator=gen) * 2 + 0.01
    settings = [dict(temperature=0), dict(temperature=0.7, top_k=30, seed=1),
                dict(temperature=1.3, top_p=0.5, repetition_penalty=1.4), dict(temperature=0, frequency_penalty=1.0)]
    rows = [SampleRow(SamplingParams(logprobs=num_top, **s), seed=9, sample_index=0, step=2, prompt_ids=[5, 6],
                      output_ids=[7, 7]) for s in settings]
    expected = torch.log_softmax(logits.double(), dim=-1)  # (B, V)
    for b, token in enumerate(sample_batch(logits, rows)):
        torch.testing.assert_close(token.logprob, expected[b, token.token_id].item(), rtol=1e-5, atol=1e-5)
        values = list(token.top_logprobs.values())
        assert len(values) == num_top and values == sorted(values, reverse=True)
        top = torch.topk(expected[b], num_top)
        assert list(token.top_logprobs) == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), top.values, rtol=1e-5, atol=1e-5)


def test_logprobs_only_where_asked():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1)) + 0.01
    rows = [SampleRow(SamplingParams(temperature=0, logprobs=2), 0, 0, 0), SampleRow(SamplingParams(seed=1), 1, 0, 0)]
    with_lp, without = sample_batch(logits, rows)
    assert with_lp.logprob is not None and len(with_lp.top_logprobs) == 2
    assert without.logprob is None and without.top_logprobs is None


# --------------------------------------------------------------------------------------------
# logit_bias, the stop tokens banned before min_tokens, and the logprob best_of ranks by
# --------------------------------------------------------------------------------------------


def biased_float64(logits: torch.Tensor, biases: list[dict[int, float]]) -> torch.Tensor:
    """logits + bias in float64, one dict per row: a plain loop, independent of the sampler's scatter."""
    out = logits.double().clone()
    for b, bias in enumerate(biases):
        for token, value in bias.items():
            out[b, token] += value
    return out


@pytest.mark.parametrize("vocab", [17, 1023, 50257])
def test_greedy_with_logit_bias_is_the_argmax_of_logits_plus_bias(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=gen) * 3 + 0.01  # (6, V)
    top = logits.argmax(-1).tolist()
    biases = [{}, {top[1]: -100.0}, {vocab - 1: 100.0}, {3: 7.5, top[3]: -2.0, 0: 1.25},
              {t: -100.0 for t in torch.topk(logits[4], 5).indices.tolist()}, {top[5]: 100.0, 2: 100.0}]
    rows = [SampleRow(SamplingParams(temperature=0, logit_bias=bias), 0, 0, 0) for bias in biases]
    got = [t.token_id for t in sample_batch(logits, rows)]
    assert got == biased_float64(logits, biases).argmax(-1).tolist()
    assert got[1] != top[1] and got[2] == vocab - 1 and got[4] not in torch.topk(logits[4], 5).indices.tolist()


def test_apply_bias_and_bans_adds_and_masks_only_what_each_row_names():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))  # (3, 40)
    rows = [SampleRow(SamplingParams(logit_bias={1: 2.0, 39: -3.0}), 0, 0, 0, banned_ids=[5, 6]),
            SampleRow(SamplingParams(), 0, 0, 0), SampleRow(SamplingParams(logit_bias={1: 0.5}), 0, 0, 0)]
    want = biased_float64(logits, [{1: 2.0, 39: -3.0}, {}, {1: 0.5}])
    want[0, [5, 6]] = -math.inf
    torch.testing.assert_close(apply_bias_and_bans(logits, rows).double(), want)


def test_sampled_frequencies_follow_the_biased_distribution_and_banned_tokens_never_come():
    bias = {2: 1.5, 6: -100.0, 9: 2.0}
    banned = [0, 3]  # two likely tokens, as the engine bans the stop tokens before min_tokens
    params, draws = SamplingParams(temperature=0.8, logit_bias=bias), N_DRAWS // 2  # expected TV ~0.004
    logits = torch.tensor(LOGITS12, dtype=torch.float32).expand(draws, -1)  # (N, 12): one draw per step
    rows = [SampleRow(params, seed=5, sample_index=0, step=s, banned_ids=banned) for s in range(draws)]
    observed = np.bincount([t.token_id for t in sample_batch(logits, rows)], minlength=12) / draws
    scaled = LOGITS12.copy()
    for token, value in bias.items():
        scaled[token] += value
    scaled[banned] = -np.inf
    expected = np.exp((scaled - scaled.max()) / 0.8)
    expected /= expected.sum()
    assert observed[banned].sum() == 0
    assert 0.5 * np.abs(observed - expected).sum() < 0.01, (observed.round(4), expected.round(4))


@pytest.mark.parametrize("vocab", [1000, 50257])
def test_a_seeded_row_with_logit_bias_is_batch_invariant(vocab):
    gen = torch.Generator().manual_seed(3 * vocab)
    params = SamplingParams(temperature=0.9, top_k=100, seed=31, logit_bias={7: 3.0, 11: -100.0, vocab - 1: 2.5})
    alone, in_batch = [], []
    for step in range(4):
        target = SampleRow(params, seed=31, sample_index=2, step=step, prompt_ids=[1], output_ids=list(range(step)),
                           banned_ids=[13] if step < 2 else ())
        rows = mixed_batch(target, vocab, gen)
        logits = torch.randn(len(rows), vocab, generator=gen) * 2 + 0.01  # (16, V)
        alone.append(sample_batch(logits[5:6], [target])[0].token_id)
        in_batch.append(sample_batch(logits, rows)[5].token_id)
    assert alone == in_batch


def test_best_of_gets_the_chosen_tokens_logprob_of_the_raw_logits_without_top_n():
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(4)) + 0.01
    rows = [SampleRow(SamplingParams(n=1, best_of=3, seed=2, logit_bias={5: 9.0}), 2, 1, 0),
            SampleRow(SamplingParams(n=2, best_of=2, seed=2), 2, 1, 0)]
    ranked, plain = sample_batch(logits, rows)
    expected = torch.log_softmax(logits[0].double(), dim=-1)[ranked.token_id].item()
    assert ranked.logprob == pytest.approx(expected, abs=1e-5) and ranked.top_logprobs == {}
    assert plain.logprob is None


# --------------------------------------------------------------------------------------------
# The counter-based RNG: Philox exactly as Triton's tl.rand computes it
# --------------------------------------------------------------------------------------------


# Run in a child process: Triton picks the interpreter when it is imported (tl.rand itself is
# @triton.jit), so TRITON_INTERPRET must be set before any import of triton in that process.
TRITON_RAND_SCRIPT = """
import json, sys

import torch
import triton
import triton.language as tl


@triton.jit
def _rand_rows_kernel(out_ptr, seeds_ptr, num_cols, BLOCK: tl.constexpr):
    # out_ptr: (S, num_cols) float32; seeds_ptr: (S,) int64, loaded from memory as a fused kernel would
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + row)
    tl.store(out_ptr + row * num_cols + cols, tl.rand(seed, cols), mask=cols < num_cols)


def main(out_path, seeds, all_num_cols, device, block):
    seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
    results = {}
    for num_cols in all_num_cols:
        out = torch.empty(len(seeds), num_cols, dtype=torch.float32, device=device)
        _rand_rows_kernel[(len(seeds), triton.cdiv(num_cols, block))](out, seeds, num_cols, BLOCK=block)
        results[num_cols] = out.cpu()
    torch.save(results, out_path)


main(sys.argv[1], **json.loads(sys.argv[2]))
"""

PHILOX_SEEDS = [0, 1, 12345, 2**31 - 1, 2**31, 2**32 + 5, 2**62 + 3, 2**63 - 1, row_seed(2**64 - 1, 3, 10**6)]
PHILOX_COLS = [1, 7, 50257]


def triton_rand(folder: Path, device: str, interpret: bool, block: int) -> dict[int, torch.Tensor]:
    """``tl.rand(seed, 0..C-1)`` for every seed in PHILOX_SEEDS and C in PHILOX_COLS: {C: (S, C)}."""
    script, out_path = folder / "triton_rand.py", folder / "triton_rand.pt"
    script.write_text(TRITON_RAND_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    args = json.dumps(dict(seeds=PHILOX_SEEDS, all_num_cols=PHILOX_COLS, device=device, block=block))
    done = subprocess.run([sys.executable, str(script), str(out_path), args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_path)


@pytest.fixture(scope="module")
def interpreted_triton_rand(tmp_path_factory) -> dict[int, torch.Tensor]:
    return triton_rand(tmp_path_factory.mktemp("triton_rand"), "cpu", interpret=True, block=16384)


@pytest.mark.parametrize("num_cols", PHILOX_COLS)
def test_philox_uniform_equals_triton_rand_bit_for_bit(interpreted_triton_rand, num_cols):
    expected = interpreted_triton_rand[num_cols]  # (S, C)
    got = philox_uniform(torch.tensor(PHILOX_SEEDS, dtype=torch.int64), num_cols)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_philox_uniform_equals_compiled_triton_rand_on_gpu(tmp_path):
    expected = triton_rand(tmp_path, "cuda", interpret=False, block=1024)
    seeds = torch.tensor(PHILOX_SEEDS, dtype=torch.int64, device="cuda")
    for num_cols in PHILOX_COLS:
        got = philox_uniform(seeds, num_cols).cpu()
        assert torch.equal(got.view(torch.int32), expected[num_cols].view(torch.int32))


def splitmix64_float_free(x: int) -> int:
    """SplitMix64's output function, written from the published constants with numpy uint64."""
    with np.errstate(over="ignore"):
        z = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return int(z ^ (z >> np.uint64(31)))


ROW_SEED_CASES = [(0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 0, 1), (2**64 - 1, 7, 123456), (42, 3, 2**40)]


@pytest.mark.parametrize("seed, sample_index, step", ROW_SEED_CASES)
def test_row_seed_is_the_documented_splitmix_chain(seed, sample_index, step):
    assert splitmix64_float_free(0) == 0xE220A8397B1DCDAF  # SplitMix64's first output from state 0
    h = splitmix64_float_free(splitmix64_float_free(splitmix64_float_free(seed) ^ sample_index) ^ step)
    assert row_seed(seed, sample_index, step) == h >> 1 < 2**63


def test_row_seeds_of_neighbouring_keys_differ():
    seeds = {row_seed(s, i, t) for s in range(8) for i in range(4) for t in range(64)}
    assert len(seeds) == 8 * 4 * 64


# --------------------------------------------------------------------------------------------
# Shapes and the single-row API the engine still calls
# --------------------------------------------------------------------------------------------


def test_single_row_sample_matches_sample_batch():
    logits = torch.randn(777, generator=torch.Generator().manual_seed(2)) + 0.01
    params = SamplingParams(temperature=0.8, top_k=20, seed=4)
    for step in range(5):
        token = sample(logits, params, seed=4, sample_index=2, step=step)
        assert token == sample_batch(logits[None], [SampleRow(params, 4, 2, step)])[0].token_id
    assert sample(logits, SamplingParams(temperature=0), 0, 0, 0) == int(torch.argmax(logits))


def test_logits_must_have_one_row_per_sample_row():
    with pytest.raises(ValueError, match="sample_batch"):
        sample_batch(torch.ones(3, 10), [greedy_row()])
    with pytest.raises(ValueError, match="sample_batch"):
        sample_batch(torch.ones(10), [greedy_row()])
    assert sample_batch(torch.ones(0, 10), []) == []
    assert isinstance(sample_batch(torch.ones(1, 10) + 0.5, [greedy_row()])[0], SampledToken)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 9e-6])
def test_tiny_temperatures_are_greedy_not_overflowed(temperature):
    """logits / T overflows fp32 for tiny T; such rows must pick the argmax, not token 0."""
    logits = torch.tensor([[1.0, 5.0, -2.0, 4.0]])
    row = SampleRow(SamplingParams(temperature=temperature, seed=1), seed=1, sample_index=0, step=0)
    assert sample_batch(logits, [row])[0].token_id == 1


# A top_p below fp32's smallest subnormal (~1.4e-45) rounds to 0 in the (B, 1) column the filter compares with.
TINY_TOP_PS = [1e-46, 5e-324, 1e-45]


@pytest.mark.parametrize("top_p", TINY_TOP_PS)
def test_a_top_p_too_small_for_fp32_keeps_just_the_top_tokens(top_p):
    """The nucleus is always at least the most likely token (with its ties), never empty: such rows draw
    the argmax (ties: one of the tied maxima), alone in a batch and beside other rows."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 111, generator=gen)  # (5, 111)
    logits[3, [7, 50]] = logits[3].max() + 1.0  # row 3: two tied maxima
    rows = [SampleRow(SamplingParams(temperature=0.9, top_p=top_p, top_k=k, seed=5), seed=5, sample_index=b, step=b)
            for b, k in enumerate([0, 0, 40, 0, 3])]
    rows[1] = SampleRow(SamplingParams(temperature=0.7, top_p=0.9), seed=5, sample_index=1, step=0)  # a normal row
    filtered = filter_logits(logits, rows)  # (5, 111)
    for b in (0, 2, 3, 4):
        top = logits[b] == logits[b].max()
        assert torch.equal(torch.isfinite(filtered[b]), top), b
    drawn = [t.token_id for t in sample_batch(logits, rows)]
    assert [drawn[b] for b in (0, 2, 4)] == [int(logits[b].argmax()) for b in (0, 2, 4)]
    assert drawn[3] in (7, 50)
    assert sample_batch(logits[:1], rows[:1])[0].token_id == int(logits[0].argmax())
    with_penalty = SamplingParams(temperature=1.0, top_p=top_p, repetition_penalty=1.5)
    penalised = apply_penalties(logits[:1], [SampleRow(with_penalty, 0, 0, 0, [int(logits[0].argmax())])])
    row = SampleRow(with_penalty, 1, 0, 0, [int(logits[0].argmax())])
    assert sample_batch(logits[:1], [row])[0].token_id == int(penalised[0].argmax())
