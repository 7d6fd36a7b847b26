"""Triton LM head vs ``gpt2fast.ops.reference.lm_head``, and its fused choices vs the sampler.

``lm_head_argmax`` must equal ``torch.argmax`` of the reference logits (ties -> lowest id) and
``lm_head_gumbel`` must pick what ``sampling.sample_batch`` picks for temperature-only rows with the same
row seeds. Both are one launch that merges its per-vocab-tile partials in-kernel (the last program of a row
tile to draw a ticket merges): the tests pin down that the counters are back to zero after every call, that
every partial and id is written before it is read (NaN-poisoned buffers), that exact ties across vocab tiles
and merge steps go to the lowest id, and that the ids are the same bits whichever program merges (the
interpreter's programs run forward, reversed and shuffled). The interpreter runs programs one at a time, so
no test here can see a race: the memory ordering is argued in the kernel's comments. On CPU these run under
the Triton interpreter (tests/conftest.py); ``gpu``-marked tests repeat them on CUDA at GPT-2 124M / 1.5B
shapes in fp16 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from gpt2fast.launches import count_launches
from gpt2fast.ops import reference
from gpt2fast.ops.triton import available, unavailable_reason
from gpt2fast.sampling import SampleRow, SamplingParams, row_seed, sample_batch
from tests.triton_programs import ORDERS, needs_interpreter, run_programs_in

pytestmark = pytest.mark.skipif(not available(), reason=unavailable_reason() or "triton available")

if available():
    from gpt2fast.ops.triton import counters
    from gpt2fast.ops.triton import lm_head as lm_head_module
    from gpt2fast.ops.triton.lm_head import _tiles, lm_head, lm_head_argmax, lm_head_gumbel

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


# ---- the one-launch merge: tickets, counters, program order ------------------------------------------------

ODD_ROWS = [1, 3, 17, 33]  # row tiles of 16 (1, 3) and 64 (17, 33)
ODD_VOCABS = [1013, 777]
# (low, high) token ids given the same wte row, in a vocabulary of 1013: one vocab tile; different tiles and
# merge steps; the first and the last (masked-tail) tile
TIE_PAIRS = [(5, 6), (40, 900), (0, 1012), (70, 600)]


def _counters_are_zero() -> bool:
    return int(counters.ticket_counters(DEVICE, 1).abs().sum()) == 0


def _mixed_temperatures(rows):
    """Greedy (0, 1e-6: below GREEDY_BELOW) and sampled rows interleaved."""
    return torch.tensor([(0.0, 0.7, 1e-6, 1.3, 0.05)[i % 5] for i in range(rows)], device=DEVICE)


def _poisoned_empty(real_empty):
    """``torch.empty`` that fills floats with NaN and ints with -7: an element a kernel forgets to write shows."""

    def empty(*shape, dtype=None, **kwargs):
        out = real_empty(*shape, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    return empty




@pytest.mark.parametrize("v", ODD_VOCABS)
@pytest.mark.parametrize("rows", ODD_ROWS)
def test_one_launch_per_choice_matching_the_reference_and_leaving_counters_zero(rows, v):
    """argmax and Gumbel (greedy and sampled rows mixed) each run as one launch, equal ``reference``'s
    ``lm_head_argmax`` / ``lm_head_gumbel``, give the same bits when called again and leave every counter 0."""
    x, wte = _inputs(rows, 40, v, torch.float32, seed=rows + v)
    temps, seeds = _mixed_temperatures(rows), _row_seeds(rows, 2024, rows)
    want_argmax = reference.lm_head_argmax(x, wte)
    want_gumbel = reference.lm_head_gumbel(x, wte, temps, seeds)
    assert _counters_are_zero()  # also creates the buffer, so no fill kernel is counted below
    for _ in range(2):
        with count_launches(DEVICE) as argmax_launches:
            got_argmax = lm_head_argmax(x, wte)
        assert _counters_are_zero()
        with count_launches(DEVICE) as gumbel_launches:
            got_gumbel = lm_head_gumbel(x, wte, temps, seeds)
        assert _counters_are_zero()
        assert (argmax_launches.count, gumbel_launches.count) == (1, 1)
        assert torch.equal(got_argmax, want_argmax) and torch.equal(got_gumbel, want_gumbel)
    if rows > 1:  # greedy rows and a sampled row that draws another token than its argmax: both kinds are here
        assert not torch.equal(want_gumbel, want_argmax)


def test_logits_are_one_launch_and_draw_no_ticket(monkeypatch):
    """MODE 0 stores logits: one launch, and it never asks for (or touches) the ticket counters."""
    monkeypatch.setattr(lm_head_module, "ticket_counters", lambda *a: pytest.fail("MODE 0 asked for counters"))
    x, wte = _inputs(3, 40, 777, torch.float32, seed=8)
    with count_launches(DEVICE) as seen:
        got = lm_head(x, wte)
    assert seen.count == 1
    _assert_logits_close(got, reference.lm_head(x, wte))


@pytest.mark.parametrize("rows", [1, 17, 33, 111, 512])
def test_one_counter_per_row_tile_within_the_first_buffer(rows, monkeypatch):
    """The choice asks for cdiv(N, BLOCK_M) counters: at the largest decode bucket (512 rows) 8, far below
    ``MIN_SLOTS``, so the buffer made by the warm-up never has to grow (it cannot during graph capture)."""
    block_m = _tiles("fp32", rows)[0]
    assert -(-rows // block_m) <= counters.MIN_SLOTS
    if rows > 111:
        return  # the arithmetic above is the point; the interpreter is slow at 512 rows
    asked = []
    real = counters.ticket_counters
    monkeypatch.setattr(lm_head_module, "ticket_counters", lambda dev, slots: asked.append(slots) or real(dev, slots))
    x, wte = _inputs(rows, 32, 77, torch.float32, seed=rows)
    assert torch.equal(lm_head_argmax(x, wte), reference.lm_head_argmax(x, wte))
    assert asked == [-(-rows // block_m)] and _counters_are_zero()


def _tied_inputs(rows, pairs, v=1013, c=40, seed=9):
    """wte rows ``high`` copy ``low`` for every pair, and row r of x strongly prefers ``pairs[r % len][0]``: its
    logits for low and high are exactly equal and beat every other token."""
    x, wte = _inputs(rows, c, v, torch.float32, seed=seed)
    for low, high in pairs:
        wte[high] = wte[low]
    lows = [pairs[r % len(pairs)][0] for r in range(rows)]
    x = x + 20 * wte[lows] / wte[lows].norm(dim=-1, keepdim=True)  # (N, C)
    logits = reference.lm_head(x, wte)  # (N, V)
    highs = [pairs[r % len(pairs)][1] for r in range(rows)]
    r = torch.arange(rows)
    assert torch.equal(logits[r, lows], logits[r, highs]) and logits.argmax(-1).tolist() == lows
    return x, wte, lows


def _merge_two_tiles_a_step(monkeypatch):
    """The in-kernel merge takes 2 vocab tiles a step instead of all 16 (fp32, 16 rows) or 32 (64 rows) at once."""
    monkeypatch.setattr(lm_head_module, "_merge_tiles", lambda etype, block_m, warps, w_int8=False: 2)


@needs_interpreter
@pytest.mark.parametrize("two_a_step", [False, True], ids=["default_step", "two_tiles_a_step"])
@pytest.mark.parametrize("rows", [3, 33])
def test_exact_ties_across_vocab_tiles_and_merge_steps_go_to_the_lowest_id(rows, two_a_step, monkeypatch):
    """Equal maxima in one tile, in two tiles, in two merge steps (at two tiles a step) and in the masked last
    tile: the lowest id wins whichever program merges (forward, reversed, shuffled), for argmax and for greedy
    rows of the Gumbel path."""
    assert lm_head_module._merge_tiles("fp32", 16, 4) * 64 >= 1013  # the default: one step at 16 rows
    if two_a_step:
        _merge_two_tiles_a_step(monkeypatch)
    x, wte, lows = _tied_inputs(rows, TIE_PAIRS)
    greedy = torch.zeros(rows, device=DEVICE)
    for order in ORDERS:
        run_programs_in(order, monkeypatch)
        assert lm_head_argmax(x, wte).tolist() == lows, order
        assert lm_head_gumbel(x, wte, greedy, _row_seeds(rows, 1, 1)).tolist() == lows, order
        assert _counters_are_zero()


@needs_interpreter
@pytest.mark.parametrize("rows", [3, 33])
def test_the_same_ids_whichever_vocab_tile_draws_the_last_ticket(rows, monkeypatch):
    """Random inputs (fp32 and fp16), programs run forward, reversed and shuffled, merge steps of the default size
    and of two vocab tiles: identical ids, equal to the reference, counters back to 0 after each call."""
    temps, seeds = _mixed_temperatures(rows), _row_seeds(rows, 77, 3)
    for dtype in (torch.float32, torch.float16):
        x, wte = _inputs(rows, 40, 1013, dtype, seed=rows)
        want = (reference.lm_head_argmax(x, wte), reference.lm_head_gumbel(x, wte, temps, seeds))
        for two_a_step in (False, True):
            if two_a_step:
                _merge_two_tiles_a_step(monkeypatch)
            for order in ORDERS:
                run_programs_in(order, monkeypatch)
                got = (lm_head_argmax(x, wte), lm_head_gumbel(x, wte, temps, seeds))
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (dtype, two_a_step, order)
                assert _counters_are_zero()


@pytest.mark.parametrize("rows", [3, 33])
def test_poisoned_workspace_and_output_are_written_before_read(rows, monkeypatch):
    """Partials, partial ids and the chosen ids start as NaN / -7, twice in a row: a partial the merge read before
    its program wrote it, an id no program stored, or a counter left nonzero (the second call's merge would never
    run) would show."""
    x, wte = _inputs(rows, 40, 777, torch.float32, seed=10 + rows)
    temps, seeds = _mixed_temperatures(rows), _row_seeds(rows, 3, 4)
    want = (reference.lm_head_argmax(x, wte), reference.lm_head_gumbel(x, wte, temps, seeds))
    assert _counters_are_zero()
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    for _ in range(2):
        assert torch.equal(lm_head_argmax(x, wte), want[0])
        assert torch.equal(lm_head_gumbel(x, wte, temps, seeds), want[1])
        assert _counters_are_zero()


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
