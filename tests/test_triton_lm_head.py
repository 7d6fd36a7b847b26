"""Triton LM head vs ``gpt2fast.ops.reference.lm_head``, and its fused choices vs the sampler.

``lm_head_argmax`` must equal ``torch.argmax`` of the reference logits (ties -> lowest id) and
``lm_head_gumbel`` must pick what ``sampling.sample_batch`` picks for temperature-only rows with the same
row seeds. On CPU these run under the Triton interpreter (tests/conftest.py); ``gpu``-marked tests repeat
them on CUDA at GPT-2 124M / 1.5B shapes in fp16 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from gpt2fast.ops import reference
from gpt2fast.ops.triton import available, unavailable_reason
from gpt2fast.sampling import SampleRow, SamplingParams, row_seed, sample_batch

pytestmark = pytest.mark.skipif(not available(), reason=unavailable_reason() or "triton available")

if available():
    from gpt2fast.ops.triton.lm_head import lm_head, lm_head_argmax, lm_head_gumbel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rows, C, V): odd vocabularies (tails masked), rows on both sides of the 16-row tile switch
SHAPES = [(1, 96, 999), (3, 97, 1001), (17, 96, 999), (111, 96, 1001)]
# Logits are fp32 in every dtype and the reference upcasts the same fp16/bf16 values, so only the
# summation order differs: 1e-5 of the largest |logit| for all three (_assert_logits_close).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(rows, c, v, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows * (2 if strided else 1), c, generator=g).to(DEVICE, dtype)  # (N or 2N, C)
    x = x[::2] if strided else x
    wte = (torch.randn(v, c, generator=g) / c**0.25).to(DEVICE, dtype)  # (V, C): logits of std ~C**0.25
    return x, wte


def _assert_logits_close(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lm_head_logits_match_reference(shape, dtype):
    x, wte = _inputs(*shape, dtype, strided=shape[0] == 3)
    _assert_logits_close(lm_head(x, wte), reference.lm_head(x, wte))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lm_head_argmax_is_torch_argmax(shape, dtype):
    x, wte = _inputs(*shape, dtype, seed=1, strided=shape[0] == 17)
    assert torch.equal(lm_head_argmax(x, wte).cpu(), torch.argmax(reference.lm_head(x, wte), dim=-1).cpu())


@pytest.mark.parametrize("pair", [(5, 6), (5, 900), (0, 998)], ids=str)
@pytest.mark.parametrize("rows", [1, 17])
def test_lm_head_argmax_exact_tie_goes_to_lowest_id(rows, pair):
    """Two identical wte rows (in one vocab tile, or in different ones) are both the max: the lower id wins."""
    low, high = pair
    x, wte = _inputs(rows, 96, 999, torch.float32, seed=2)
    wte[high] = wte[low]
    x = x + 10 * wte[low] / wte[low].norm()  # every row now prefers token `low` (and its twin) by a wide margin
    logits = reference.lm_head(x, wte)
    assert torch.equal(logits[:, low], logits[:, high]) and bool((logits.argmax(-1) == low).all())
    assert lm_head_argmax(x, wte).tolist() == [low] * rows


def _sampler_choice(logits, temperatures, seed, step):
    rows = [SampleRow(SamplingParams(temperature=t), seed=seed, sample_index=i, step=step)
            for i, t in enumerate(temperatures)]
    return [s.token_id for s in sample_batch(logits, rows)]


def _row_seeds(n, seed, step):
    return torch.tensor([row_seed(seed, i, step) for i in range(n)], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lm_head_gumbel_matches_sample_batch(shape, dtype):
    rows = shape[0]
    x, wte = _inputs(*shape, dtype, seed=3)
    logits = reference.lm_head(x, wte)
    seeds = ((0, 0), (12345, 7), (2**64 - 1, 10**6))
    for seed, step in seeds[:1] if rows > 100 else seeds:  # 111 rows: one seed (the interpreter's Philox is slow)
        temps = [(0.3, 0.7, 1.0, 1.9, 0.05)[i % 5] for i in range(rows)]
        got = lm_head_gumbel(x, wte, torch.tensor(temps, device=DEVICE), _row_seeds(rows, seed, step))
        assert got.tolist() == _sampler_choice(logits, temps, seed, step)


def test_lm_head_gumbel_flat_logits_follow_the_noise_alone():
    """All logits 0: the draw is the argmax of the Philox Gumbel noise, so it must be the sampler's token
    exactly, and different seeds must spread over the vocabulary."""
    x = torch.zeros(8, 96, device=DEVICE)
    wte = torch.randn(1001, 96, device=DEVICE)
    temps = [1.0] * 8
    got = lm_head_gumbel(x, wte, torch.tensor(temps, device=DEVICE), _row_seeds(8, 99, 3))
    assert got.tolist() == _sampler_choice(torch.zeros(8, 1001, device=DEVICE), temps, 99, 3)
    assert len(set(got.tolist())) > 4


def test_lm_head_gumbel_greedy_rows_take_the_argmax():
    """Temperatures below sampling.GREEDY_BELOW are greedy, as in the sampler (temperature 0 included)."""
    x, wte = _inputs(4, 96, 999, torch.float32, seed=4)
    temps = [0.0, 1.0, 1e-6, 0.5]
    got = lm_head_gumbel(x, wte, torch.tensor(temps, device=DEVICE), _row_seeds(4, 5, 0))
    logits = reference.lm_head(x, wte)
    assert got.tolist() == _sampler_choice(logits, temps, 5, 0)
    assert got[0] == logits[0].argmax() and got[2] == logits[2].argmax()


def test_lm_head_full_gpt2_vocab_one_row():
    """V = 50257 (odd, 393 vocab tiles of 128): the masked tail, logits and argmax (fp16: the interpreter is slow)."""
    x, wte = _inputs(1, 96, 50257, torch.float16, seed=5)
    wte[50256] = 4 * wte[50256].abs().max() * torch.sign(x[0])  # the last token, in the masked tile, wins
    want = reference.lm_head(x, wte)
    _assert_logits_close(lm_head(x, wte), want)
    assert lm_head_argmax(x, wte).tolist() == [50256] == want.argmax(-1).tolist()


def test_lm_head_writes_every_logit_and_partial(monkeypatch):
    """Logits, per-tile partials and ids start as NaN / -7: anything left unwritten would show."""
    real_empty = torch.empty

    def poisoned(*shape, dtype=None, **kwargs):
        out = real_empty(*shape, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    x, wte = _inputs(17, 96, 1001, torch.float32, seed=6)
    want = reference.lm_head(x, wte)
    monkeypatch.setattr(torch, "empty", poisoned)
    _assert_logits_close(lm_head(x, wte), want)
    assert torch.equal(lm_head_argmax(x, wte), want.argmax(-1))


def test_lm_head_input_checks():
    x, wte = _inputs(2, 96, 999, torch.float32)
    with pytest.raises(ValueError, match="must match"):
        lm_head(x, wte.half())
    with pytest.raises(ValueError, match="seeds must be"):
        lm_head_gumbel(x, wte, torch.ones(2, device=DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="temperature must be"):
        lm_head_gumbel(x, wte, torch.ones(3, device=DEVICE), _row_seeds(2, 0, 0))
    assert lm_head_argmax(x[:0], wte).shape == (0,)


# ---- GPU: GPT-2 124M and 1.5B shapes -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 16, 64, 200])
@pytest.mark.parametrize("c", [768, 1600], ids=["124M", "1.5B"])
def test_lm_head_gpt2_shapes_gpu(c, rows, dtype):
    """Tensor-core sums differ from the reference in order only; a choice may differ from the reference's only on
    a near-tie, so the chosen token's score must be within that tolerance of the best."""
    x, wte = _inputs(rows, c, 50257, dtype, seed=c + rows)
    want = reference.lm_head(x, wte)  # (N, V)
    _assert_logits_close(lm_head(x, wte), want)
    tol = 1e-5 * float(want.abs().max())
    picked = lm_head_argmax(x, wte)
    assert bool((want.gather(1, picked[:, None])[:, 0] >= want.max(-1).values - tol).all())
    temps = torch.full((rows,), 0.8, device=DEVICE)
    drawn = lm_head_gumbel(x, wte, temps, _row_seeds(rows, 1, 2)).tolist()
    expected = _sampler_choice(want, temps.tolist(), 1, 2)
    assert sum(a != b for a, b in zip(drawn, expected)) <= max(1, rows // 100)
