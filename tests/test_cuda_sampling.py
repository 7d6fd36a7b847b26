"""CUDA C++ top-k / top-p / min-p sampler (csrc/kernels/sampling.cuh) vs ``gpt2fast.sampling.sample_batch``.

The kernel must pick the very token ``sample_batch`` picks: same temperature, top-k (ties kept), top-p
(of the top-k survivors), min-p and Philox Gumbel noise. Temperature, top-k, ties and the draw are
bit-exact on any data; the top-p mass is summed in fp32 in another order than torch's softmax +
cumsum, so exact equality is tested on rows whose nucleus boundary is at least ``MARGIN`` of mass
away from ``top_p`` (checked in float64 for every row), and the distribution by a frequency test.
On CPU the kernel runs through the emulated module in thread orders 0 and 1 with outputs poisoned
(-1); ``gpu``-marked tests repeat the comparison with ``gpt2fast._C`` at GPT-2's vocabulary.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from gpt2fast import sampling
from gpt2fast.ops import cuda, cuda_build
from gpt2fast.sampling import SampleRow, SamplingParams, row_seed, sample_batch

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

GPT2_VOCAB = 50257
SANITIZED = os.environ.get(cuda.SANITIZE_ENV, "0") == "1"  # the ASan+UBSan build at -O0: fewer draws
TEMPERATURES = [0.0, 0.3, 1.0, 2.0]
TOP_PS = [0.05, 0.5, 0.9, 1.0]
# Mass between any nucleus boundary and top_p, and distance (relative) between any logit and the min-p floor,
# that a row must keep to be compared token for token: the kernel's and torch's fp32 sums differ by ~1e-6 at
# most (<= 16 rounding steps of a 50257-term sum), min-p floors by an ulp of logf vs torch.log.
MARGIN = 1e-4


@pytest.fixture(autouse=True)
def _poisoned(poisoned_cuda_outputs):
    """Every ``out`` the wrapper allocates starts as -1, so a row the kernel skips cannot pass."""


def _top_ks(vocab: int) -> list[int]:
    return [0, 1, 2, 40, vocab]  # 0 and vocab: off; 1: greedy


def _mixed_params(vocab: int) -> list[SamplingParams]:
    """Every temperature x top_k x top_p; min_p 0.05 on every third row."""
    combos = [(t, k, p) for t in TEMPERATURES for k in _top_ks(vocab) for p in TOP_PS]
    return [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=0.05 if i % 3 == 0 else 0.0)
            for i, (t, k, p) in enumerate(combos)]  # fmt: skip


def _rows(params: list[SamplingParams], first_seed: int = 1000) -> list[SampleRow]:
    return [SampleRow(p, seed=first_seed + i, sample_index=i % 3, step=7 * i) for i, p in enumerate(params)]


def _kernel_args(rows: list[SampleRow], device: str = "cpu") -> dict[str, torch.Tensor]:
    ps = [r.params for r in rows]
    return dict(
        temperature=torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=device),  # (B,)
        top_k=torch.tensor([p.top_k for p in ps], dtype=torch.int32, device=device),  # (B,)
        top_p=torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=device),  # (B,)
        seeds=torch.tensor([row_seed(r.seed, r.sample_index, r.step) for r in rows], dtype=torch.int64,
                           device=device),  # (B,)
        min_p=torch.tensor([p.min_p for p in ps], dtype=torch.float32, device=device),  # (B,)
    )


def _sample(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    return cuda.sample_top_k_top_p(logits, **_kernel_args(rows, str(logits.device)))


def _expected(logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
    return [t.token_id for t in sample_batch(logits, rows)]


# ---- data: rows whose floors are well separated (checked in float64) --------------------------------


def _margin(row: torch.Tensor, params: SamplingParams) -> float:
    """How far (in mass) the row's nucleus boundaries lie from top_p, and (relative) its logits from the min-p
    floor, in float64 with the reference's definitions; inf when neither filter applies."""
    if params.greedy:
        return math.inf
    scaled = (row / torch.tensor(params.temperature, dtype=torch.float32)).double().numpy()  # (V,) fp32 division
    vocab, k = scaled.size, params.top_k
    kfloor = np.sort(scaled)[::-1][k - 1] if 0 < k < vocab else -np.inf
    margin = math.inf
    if params.top_p < 1:
        survivors = np.sort(scaled[scaled >= kfloor])[::-1]  # descending
        e = np.exp(survivors - survivors[0])
        before = np.concatenate([[0.0], np.cumsum(e)[:-1]]) / e.sum()  # mass strictly before each position
        first_of_group = np.concatenate([[True], survivors[1:] != survivors[:-1]])
        p = float(np.float32(params.top_p))
        margin = float(np.abs(before[first_of_group] - p).min())
    if params.min_p > 0:
        floor = scaled.max() + math.log(np.float32(params.min_p))
        finite = scaled[np.isfinite(scaled)]
        margin = min(margin, float(np.abs(finite - floor).min()) / max(1.0, abs(floor)))
    return margin


def _draw_row(vocab: int, gen: torch.Generator) -> torch.Tensor:
    """A peaked row like an LM's: up to 12 'head' tokens far above a randn tail (so every nucleus boundary
    falls in the head, where mass steps are large), exact ties in head and tail, -inf tokens, -0.0 and +0.0."""
    head = min(12, vocab)
    base = 2 * math.log(vocab) + 10  # head >> tail even at temperature 2
    row = 2 * torch.randn(vocab, generator=gen)  # (V,)
    pos = torch.randperm(vocab, generator=gen)
    row[pos[:head]] = base + 6 * torch.rand(head, generator=gen)
    row[pos[1]] = row[pos[0]]  # a tie in the head
    if vocab > head:
        tail = pos[head:]
        row[tail[1]] = row[tail[0]]  # a tie in the tail
        row[tail[2 : 2 + max(1, len(tail) // 50)]] = -math.inf
        if len(tail) > 10:
            row[tail[-1]], row[tail[-2]] = 0.0, -0.0
    else:
        row[pos[-1]] = -math.inf
    return row


def _separated_logits(params: list[SamplingParams], vocab: int, seed: int) -> torch.Tensor:
    """(B, V) fp32, each row redrawn until its margin is >= MARGIN (asserted: the comparison is meaningful)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        for _ in range(50):
            row = _draw_row(vocab, gen)
            if _margin(row, p) >= MARGIN:
                break
        assert _margin(row, p) >= MARGIN, (p, _margin(row, p))
        out.append(row)
    return torch.stack(out)  # (B, V)


# ---- token for token ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [7, 1000])
def test_matches_sample_batch_on_mixed_settings(vocab, order):
    params = _mixed_params(vocab)
    rows = _rows(params, first_seed=vocab)
    logits = _separated_logits(params, vocab, seed=vocab)  # (80, V)
    got = _sample(logits, rows)
    assert got.dtype == torch.int64 and got.shape == (len(rows),)
    assert got.tolist() == _expected(logits, rows)


def _gpt2_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=1.0, top_k=40, top_p=0.9),
        SamplingParams(temperature=0.3, top_p=0.5),
        SamplingParams(temperature=2.0, top_k=GPT2_VOCAB, top_p=0.05, min_p=0.05),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=0.0, top_p=0.9),
        SamplingParams(temperature=2.0, min_p=0.1),
    ]


def test_matches_sample_batch_at_gpt2_vocab(order):
    params = _gpt2_params()
    logits = _separated_logits(params, GPT2_VOCAB, seed=1)  # (6, 50257)
    rows = _rows(params, first_seed=5)
    assert _sample(logits, rows).tolist() == _expected(logits, rows)


@pytest.mark.parametrize("vocab", [7, 1000])
def test_top_k_and_temperature_are_exact_on_any_data(vocab, order):
    """Without top-p and min-p nothing is summed: plain randn rows and rows of integers (ties everywhere)."""
    params = [SamplingParams(temperature=t, top_k=k) for t in TEMPERATURES for k in _top_ks(vocab)] * 2
    gen = torch.Generator().manual_seed(vocab + 1)
    logits = torch.randn(len(params), vocab, generator=gen)  # (40, V)
    logits[len(params) // 2 :] = torch.randint(-3, 4, (len(params) // 2, vocab), generator=gen).float()
    rows = _rows(params, first_seed=3)
    assert _sample(logits, rows).tolist() == _expected(logits, rows)


def test_ties_in_the_nucleus_and_at_the_top_k_floor(order):
    """Integer logits: top-k and top-p floors fall inside groups of equal values, which stay whole."""
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p) for k in (0, 2, 40, 300) for p in (0.5, 0.9)]
    gen = torch.Generator().manual_seed(11)
    logits = []
    for p in params:
        for _ in range(50):
            row = torch.randint(-4, 5, (1000,), generator=gen).float() * 1.5  # (V,) 9 values, ~111 ties each
            if _margin(row, p) >= MARGIN:
                break
        assert _margin(row, p) >= MARGIN
        logits.append(row)
    logits = torch.stack(logits)  # (8, 1000)
    rows = _rows(params, first_seed=21)
    assert _sample(logits, rows).tolist() == _expected(logits, rows)


def test_minus_zero_ties_with_zero_at_both_floors(order):
    """-0.0 == +0.0: the top-k floor (k = 2) is 0.0 and both zeros stay, and the nucleus (mass above the zeros
    is 0.576 < 0.6) keeps them together; -5 never comes back."""
    draws = 200
    row = torch.tensor([1.0, 0.0, -0.0, -5.0])  # (V,) probabilities after the filters: .576 .212 .212 0
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.6)
    rows = [SampleRow(params, seed=s, sample_index=0, step=1) for s in range(draws)]
    logits = row.expand(draws, 4).contiguous()  # (200, 4)
    got = _sample(logits, rows)
    assert got.tolist() == _expected(logits, rows)
    assert set(got.tolist()) == {0, 1, 2}


def test_distinct_logits_that_scale_to_the_top_k_floor_stay(order):
    """5.00001001 and the float below it divide by 0.3 to the same fp32 value: with k = 2 the floor is that value,
    so the reference keeps both; the kernel compares raw logits with raw_floor and must keep both too."""
    a = 5.000010013580322
    b = float(np.nextafter(np.float32(a), np.float32(-1)))
    t = torch.tensor(0.3)
    assert torch.tensor(a) / t == torch.tensor(b) / t
    row = torch.tensor([5.5, a, b, 4.0, 3.0, 0.0])  # (V,)
    params = SamplingParams(temperature=0.3, top_k=2)
    rows = [SampleRow(params, seed=s, sample_index=1, step=0) for s in range(200)]
    logits = row.expand(len(rows), 6).contiguous()  # (200, 6)
    kept = sampling.filter_logits(logits[:1], rows[:1])[0] > -math.inf
    assert kept.tolist() == [True, True, True, False, False, False]
    got = _sample(logits, rows)
    assert got.tolist() == _expected(logits, rows)
    assert set(got.tolist()) == {0, 1, 2}


# ---- what must never happen ------------------------------------------------------------------------------


def test_filtered_and_minus_inf_tokens_are_never_drawn(emu):
    """Many seeds over one row: every draw is a token the reference's filters keep, never a -inf one."""
    vocab, draws = 40, 80 if SANITIZED else 300
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(vocab, generator=gen)  # (V,)
    row[::3] = -math.inf
    params = SamplingParams(temperature=1.5, top_k=9, top_p=0.8)
    logits = row.expand(draws, vocab).contiguous()  # (draws, 40)
    rows = [SampleRow(params, seed=s, sample_index=0, step=0) for s in range(draws)]
    got = _sample(logits, rows)
    kept = sampling.filter_logits(logits[:1], rows[:1])[0] > -math.inf  # (V,)
    assert bool(kept[got].all()) and bool(torch.isfinite(row[got]).all())
    assert len(set(got.tolist())) > 1  # it does sample
    assert got.tolist() == _expected(logits, rows)


def test_a_row_of_minus_inf_and_greedy_rows(emu):
    """All -inf: every score is -inf and the lowest id wins, as in sample_batch (top-p off: the reference's
    top_p_floor has no answer for such a row). Greedy: argmax of the raw logits, ties to the lowest id."""
    logits = torch.tensor([[-math.inf] * 5, [1.0, 3.0, 3.0, -math.inf, 2.0], [1.0, 3.0, 3.0, 0.0, 2.0],
                           [-math.inf, 0.0, -math.inf, -math.inf, -math.inf]])  # fmt: skip
    params = [SamplingParams(top_k=3), SamplingParams(temperature=0.0, top_p=0.5), SamplingParams(top_k=1),
              SamplingParams(top_k=2, top_p=0.5)]  # fmt: skip
    rows = _rows(params)  # two drawn rows: sample_batch's lone-row CPU path cannot take an all -inf row
    assert _sample(logits, rows).tolist() == _expected(logits, rows) == [0, 1, 1, 1]


def test_greedy_threshold_and_empty_batch(emu):
    """fp32(1e-5) is just below 1e-5: greedy for sample_batch (and ops.reference, which compares the fp32 value
    as a double), so for the kernel too; the next fp32 up samples."""
    assert emu.SAMPLING_GREEDY_BELOW == sampling.GREEDY_BELOW
    edge = float(np.float32(sampling.GREEDY_BELOW))
    above = float(np.nextafter(np.float32(edge), np.float32(1)))
    assert edge < sampling.GREEDY_BELOW < above
    logits = torch.tensor([[0.0, 1e-4, 0.0]] * 2)  # (2, 3): at T = 1e-5 the draw is a coin flip between ...
    logits[1] = torch.tensor([0.0, -1e-3, 0.0])  # ... ids 0 and 2 (argmax: 0) in row 1
    greedy = _rows([SamplingParams(temperature=edge)] * 2)
    assert _sample(logits, greedy).tolist() == _expected(logits, greedy) == [1, 0]
    sampled = [SampleRow(SamplingParams(temperature=above), seed=s, sample_index=0, step=0) for s in range(40)]
    row1 = logits[1].expand(40, 3).contiguous()  # (40, 3)
    got = _sample(row1, sampled)
    assert got.tolist() == _expected(row1, sampled) and set(got.tolist()) == {0, 2}
    assert _sample(torch.randn(0, 9), []).shape == (0,)


def test_a_top_p_that_rounds_to_zero_keeps_the_top_tokens(emu):
    """A top_p below fp32's smallest subnormal is 0 in the (B,) fp32 settings: the nucleus is still the most
    likely token (with its ties), as in sample_batch; alone or after top-k, min-p, any temperature."""
    vocab = 111
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(5))  # (5, 111)
    logits[2, [4, 90]] = logits[2].max() + 0.5  # row 2: two tied maxima
    settings = [(0.9, 0, 1e-46, 0.0), (1.5, 40, 5e-324, 0.0), (0.9, 0, 1e-46, 0.0), (0.7, 3, 1e-46, 0.05),
                (2.0, vocab, 1e-46, 0.0)]
    rows = _rows([SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in settings])
    assert float(_kernel_args(rows)["top_p"][0]) == 0.0  # what the kernel sees
    got = _sample(logits, rows).tolist()
    assert got == _expected(logits, rows)
    assert [got[b] for b in (0, 1, 3, 4)] == [int(logits[b].argmax()) for b in (0, 1, 3, 4)] and got[2] in (4, 90)
    seeds = [SampleRow(rows[2].params, seed=s, sample_index=0, step=0) for s in range(40)]
    tied = _sample(logits[2].expand(40, vocab).contiguous(), seeds).tolist()
    assert set(tied) == {4, 90} and tied == _expected(logits[2].expand(40, vocab).contiguous(), seeds)


# ---- the distribution --------------------------------------------------------------------------------------


def test_frequencies_match_the_filtered_softmax(emu):
    """1200 seeds of one row (150 in the slow sanitized run): each kept token's frequency within 4 sigma of its
    filtered softmax probability, filtered tokens never; and every draw equals sample_batch's."""
    vocab, draws = 12, 150 if SANITIZED else 1200
    row = torch.tensor([2.0, 1.5, 1.5, 0.3, -0.2, 1.0, -1.0, 0.7, 2.2, -3.0, 0.0, -math.inf])  # (V,)
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05)
    rows = [SampleRow(params, seed=s, sample_index=s % 2, step=s // 2) for s in range(draws)]
    logits = row.expand(draws, vocab).contiguous()  # (draws, 12)
    got = _sample(logits, rows)
    assert got.tolist() == _expected(logits, rows)
    probs = torch.softmax(sampling.filter_logits(row[None], rows[:1])[0].double(), dim=-1)  # (V,)
    assert 2 < int((probs > 0).sum()) < 8  # top-k, top-p and min-p all cut something
    counts = torch.bincount(got, minlength=vocab).double()  # (V,)
    sigma = (draws * probs * (1 - probs)).sqrt()
    assert bool((counts[probs == 0] == 0).all())
    assert bool(((counts - draws * probs).abs() <= 4 * sigma + 1e-9).all()), (counts, draws * probs)


# ---- bad inputs -------------------------------------------------------------------------------------------


def _bad_calls():
    logits = torch.randn(3, 10)
    args = _kernel_args(_rows([SamplingParams()] * 3))

    def call(**changes):
        return lambda: cuda.sample_top_k_top_p(**({"logits": logits, **args} | changes))

    return {
        "(B, V)": call(logits=logits[0]),
        "float32 logits": call(logits=logits.double()),
        "logits must be contiguous": call(logits=torch.randn(10, 3).t()),
        "temperature must be (3,)": call(temperature=args["temperature"][:2]),
        "top_k has dtype torch.int64": call(top_k=args["top_k"].long()),
        "top_p has dtype torch.float64": call(top_p=args["top_p"].double()),
        "seeds has dtype torch.int32": call(seeds=args["seeds"].int()),
        "min_p must be (3,)": call(min_p=torch.zeros(4)),
        "seeds must be contiguous": call(seeds=torch.zeros(6, dtype=torch.int64)[::2]),
        "1 <= V": call(logits=torch.randn(3, 0)),
    }


@pytest.mark.parametrize("message", list(_bad_calls()))
def test_bad_inputs_raise_value_error_before_any_launch(message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_calls()[message]()


# ---- nvcc and the GPU ---------------------------------------------------------------------------------------


@pytest.mark.skipif(cuda_build.nvcc_path() is None, reason="nvcc not found: the resource report needs the toolkit")
def test_nvcc_compiles_the_sampler_without_spills():
    records = [r for r in cuda_build.resource_report((80, 90)) if "sample_top_k_top_p_kernel" in r.name]
    assert {r.arch for r in records if r.entry} == {80, 90}
    assert all(r.spill_stores == r.spill_loads == r.stack_frame == 0 for r in records), records
    assert all(r.registers <= 64 for r in records if r.entry)  # __launch_bounds__(1024)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_sample_batch_at_gpt2_vocab_batch_64():
    params = (_gpt2_params() * 11)[:64]
    logits = _separated_logits(params, GPT2_VOCAB, seed=2).cuda()  # (64, 50257)
    rows = _rows(params, first_seed=77)
    assert _sample(logits, rows).tolist() == _expected(logits, rows)
    plain = [SamplingParams(temperature=t, top_k=k) for t in TEMPERATURES for k in _top_ks(GPT2_VOCAB)] * 4
    noisy = torch.randn(len(plain), GPT2_VOCAB, device="cuda")  # (80, 50257)
    plain_rows = _rows(plain, first_seed=9)
    assert _sample(noisy, plain_rows).tolist() == _expected(noisy, plain_rows)
