"""CUDA C++ decode LM head with the token choice (csrc/kernels/lm_head.cuh) vs ``gpt2fast.ops.reference``.

The independent check is float64: each row's scores (logits, or logits / T + the Philox Gumbel noise of
``gpt2fast.sampling``) from a float64 matmul; the kernel's token must hold the row's best score up to fp32
rounding, and equal the reference's token on nearly every row (the two differ only on near-ties). On CPU the
kernel runs emulated in thread orders 0 and 1 with its workspaces poisoned; CI reruns this file under
ASan+UBSan.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import misaligned

from gpt2fast.ops import cuda, cuda_build, reference
from gpt2fast.ops.triton.counters import ticket_counters
from gpt2fast.quant import Int8Weight, quantize_int8, to_panels
from gpt2fast.sampling import GREEDY_BELOW, gumbel_from_uniform, philox_uniform

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poisoned(poisoned_cuda_outputs):
    """Every output and workspace the wrapper allocates starts poisoned, so a skipped element cannot pass."""


def _inputs(rows: int, vocab: int, width: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen).to(dtype)  # (T, C)
    wte = torch.randn(vocab, width, generator=gen).to(dtype)  # (V, C)
    temperature = torch.tensor([0.0 if i % 3 == 0 else 0.5 + 0.25 * (i % 4) for i in range(rows)])  # (T,)
    seeds = torch.randint(0, 2**62, (rows,), generator=gen)  # (T,)
    return x, wte, temperature, seeds


def _check(x, wte, temperature, seeds, got):
    """``got`` holds every row's best float64 score (up to fp32 rounding) and equals the reference's tokens on
    all but near-tied rows."""
    logits = x.double() @ wte.double().T  # (T, V)
    noise = gumbel_from_uniform(philox_uniform(seeds, wte.shape[0])).double()  # (T, V)
    greedy = (temperature < GREEDY_BELOW)[:, None]
    scores = torch.where(greedy, logits, logits / temperature.double()[:, None] + noise)  # (T, V)
    best = scores.max(dim=-1).values  # (T,)
    tol = 1e-5 * (scores.abs().max(dim=-1).values + 1)
    assert got.dtype == torch.int64 and got.shape == (x.shape[0],)
    assert (scores.gather(1, got[:, None])[:, 0] >= best - tol).all(), (got, scores.argmax(-1))
    want = reference.lm_head_gumbel(x, wte, temperature, seeds)
    assert (got == want).float().mean() >= 0.9


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab,width", [(1013, 96), (4099, 97), (64, 768)], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_lm_head_choice_matches_float64(rows, vocab, width, dtype, order):
    """Row buckets 1/4/16 (40: the GEMM's logits, then the sampler kernel); greedy and sampled rows mixed; 16 and
    65 blocks (the merge), one block; K = 97 the scalar path, 768 in 3 warps."""
    x, wte, temperature, seeds = _inputs(rows, vocab, width, dtype, seed=rows + vocab + width)
    _check(x, wte, temperature, seeds, cuda.lm_head_gumbel(x, wte, temperature, seeds))
    greedy = cuda.lm_head_argmax(x, wte)
    _check(x, wte, torch.zeros(rows), seeds, greedy)


def test_ties_go_to_the_lowest_id_across_blocks_and_strided_misaligned_rows(order):
    """Two identical best rows of wte, in different blocks: the lower id wins, greedy and sampled (the noise
    differs per id, so only greedy ties); strided and misaligned x take the scalar path."""
    x, wte, _, seeds = _inputs(4, 1013, 64, torch.float32, seed=3)
    wte[700] = wte[130] = 10 * x.mean(dim=0)
    assert cuda.lm_head_argmax(x, wte).tolist() == reference.lm_head_argmax(x, wte).tolist() == [130] * 4
    wide = torch.randn(4, 200)
    wide[:, 8:72] = x
    for xs in (wide[:, 8:72], misaligned(x)):
        temperature = torch.tensor([0.0, 0.9, 0.0, 1.3])
        _check(xs, wte, temperature, seeds, cuda.lm_head_gumbel(xs, wte, temperature, seeds))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", [64, 128])
def test_gemm_choice_over_row_and_column_tiles_with_ties(tile, dtype, emu, order):
    """More than 16 rows: the GEMM with the choice as its epilogue. 150 rows (2 or 3 row tiles, each merged by
    its own last ticket), 1013 tokens (8 or 16 column tiles, the last partial); a greedy tie between tokens in
    different column tiles goes to the lower id; strided rows."""
    emu.set_gemm_tile(tile)
    try:
        x, wte, temperature, seeds = _inputs(300, 1013, 64, dtype, seed=tile)
        x = x[::2]  # (150, C), rows 2C apart
        temperature, seeds = temperature[:150], seeds[:150]
        wte[900] = wte[70] = (3 * x[5].float()).to(dtype)  # row 5's logit ~ 3 |x_5|^2 ~ 190: far above the rest
        before = emu.launch_count()
        greedy = cuda.lm_head_argmax(x, wte)
        assert emu.launch_count() - before == 1
        assert int(ticket_counters("cpu", 3).sum()) == 0  # every row tile's counter left zero
        _check(x, wte, torch.zeros(150), seeds, greedy)
        _check(x, wte, temperature, seeds, cuda.lm_head_gumbel(x, wte, temperature, seeds))
        assert greedy[5] == 70 and not (greedy == 900).any()
    finally:
        emu.set_gemm_tile(0)


def test_one_launch_leaves_the_counter_zero_and_empty_batches(emu):
    x, wte, temperature, seeds = _inputs(5, 4099, 64, torch.float16, seed=9)
    before = emu.launch_count()
    cuda.lm_head_gumbel(x, wte, temperature, seeds)
    assert emu.launch_count() - before == 1
    assert int(ticket_counters("cpu", 1)[0]) == 0
    assert cuda.lm_head_argmax(x[:0], wte).shape == (0,)
    assert emu.lm_head_blocks(4099) == 65 and emu.lm_head_blocks(64) == 1


def to_panels_weight(wte: torch.Tensor) -> Int8Weight:
    """``wte`` quantized to int8 in the CPU backend's panels."""
    w = quantize_int8(wte)
    return Int8Weight(to_panels(w.data), w.scale)


def _bad_calls():
    x, wte, temperature, seeds = _inputs(3, 50, 8, torch.float32, seed=0)
    return {
        "disagree": lambda: cuda.lm_head_argmax(x, wte[:, :7]),
        "weight has dtype": lambda: cuda.lm_head_argmax(x, wte.half()),
        "weight must be contiguous": lambda: cuda.lm_head_argmax(x, torch.randn(100, 8)[::2]),
        "temperature has dtype": lambda: cuda.lm_head_gumbel(x, wte, temperature.double(), seeds),
        "seeds must be (3,)": lambda: cuda.lm_head_gumbel(x, wte, temperature, seeds[:2]),
        "must have a vocabulary and a width": lambda: cuda.lm_head_argmax(x[:, :0], wte[:, :0]),
        "a tensor or an Int8Weight": lambda: cuda.lm_head_argmax(x, object()),
        "in panels": lambda: cuda.lm_head_argmax(x, to_panels_weight(wte)),
        "temperature and seeds must be (T,) tensors": lambda: cuda.lm_head_gumbel(x, wte, None, seeds),
    }  # fmt: skip


@pytest.mark.parametrize("message", list(_bad_calls()))
def test_bad_inputs_raise_value_error_before_any_launch(message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_calls()[message]()
