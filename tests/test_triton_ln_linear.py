"""Triton ``ln_linear`` (LayerNorm fused into the next linear) vs ``gpt2fast.ops.reference.ln_linear``.

The reference is the composition ``linear(layer_norm(x))``; the Triton decode path (T <= 64) is one launch of
the split-K GEMV whose every program computes its rows' LayerNorm statistics over the full K and normalises
each x chunk before the dot, the prefill path the LayerNorm kernel then the ``tl.dot`` tiles. On CPU these
run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); shapes stay small. Inputs have
a mean far from 0 (``x * 3 + 2``), so statistics taken over part of K (one split's chunk) or in one pass
would miss the reference by far more than the tolerance.
"""

from __future__ import annotations

import pytest
import torch

from gpt2fast.launches import count_launches
from gpt2fast.ops import reference
from gpt2fast.ops.triton import available, unavailable_reason

pytestmark = pytest.mark.skipif(not available(), reason=unavailable_reason() or "triton available")

if available():
    from gpt2fast.ops.triton import counters
    from gpt2fast.ops.triton import linear as linear_module
    from gpt2fast.ops.triton.linear import BLOCK_K_DECODE, DECODE_MAX_ROWS, decode_split, ln_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5

# (rows, K, N): rows 1..16 take the decode row tile 16, 17..64 the tile 64; K odd or GPT-2's 768, N odd.
DECODE_SHAPES = [(1, 96, 37), (3, 100, 131), (16, 97, 65), (17, 96, 37), (64, 100, 33), (3, 768, 35)]
PREFILL_SHAPES = [(65, 96, 37), (111, 100, 70)]
# dtype -> tolerance relative to the largest |reference| (atol scale) and rtol: fp32 summation order; fp16:
# the output's rounding plus a normalised element that lands on the other side of an fp16 rounding boundary;
# bf16: the interpreter truncates fp32 -> bf16, so a couple of bf16 ulps.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3.2e-2}


def _inputs(rows, k, n, dtype, seed=0, strided=False):
    """x (T, K) off-centre (rows of stride 2K when ``strided``), LayerNorm weight/bias (K,), weight (N, K)
    ~ N(0, 1/K) so outputs are O(1), bias (N,)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows * (2 if strided else 1), k, generator=g) * 3 + 2).to(DEVICE, dtype)  # (T or 2T, K)
    x = x[::2] if strided else x  # sliced after the cast, which would copy it contiguous
    ln_w = torch.rand(k, generator=g) + 0.5  # (K,)
    ln_b = torch.randn(k, generator=g) * 0.1  # (K,)
    w = torch.randn(n, k, generator=g) / k**0.5  # (N, K)
    b = torch.randn(n, generator=g)  # (N,)
    return [x] + [t.to(DEVICE, dtype) for t in (ln_w, ln_b, w, b)]


def _check(x, ln_w, ln_b, w, b, gelu=False):
    got = ln_linear(x, ln_w, ln_b, EPS, w, b, gelu=gelu)
    want = reference.ln_linear(x, ln_w, ln_b, EPS, w, b, gelu=gelu)
    assert got.dtype == x.dtype and got.shape == want.shape
    tol = TOLERANCE[x.dtype]
    scale = float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)
    return got


def _poisoned_empty(real_empty):
    """``torch.empty`` that fills floats with NaN and ints with -7: an element a kernel forgets to write shows."""

    def empty(*shape, dtype=None, **kwargs):
        out = real_empty(*shape, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    return empty


def _counters_are_zero() -> bool:
    return int(counters.ticket_counters(DEVICE, 1).abs().sum()) == 0


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", DECODE_SHAPES + PREFILL_SHAPES, ids=str)
def test_ln_linear_fp32_matches_reference(shape, gelu):
    x, ln_w, ln_b, w, b = _inputs(*shape, torch.float32, seed=sum(shape))
    _check(x, ln_w, ln_b, w, None if shape[0] == 3 else b, gelu=gelu)  # rows 3: bias=None
    assert _counters_are_zero()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 96, 37), (17, 100, 65), (3, 768, 35), (65, 96, 37)], ids=str)
def test_ln_linear_half_matches_reference(shape, dtype):
    x, ln_w, ln_b, w, b = _inputs(*shape, dtype, seed=shape[0])
    _check(x, ln_w, ln_b, w, b, gelu=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [3, 17, 111])  # decode with row tiles 16 and 64, prefill
def test_ln_linear_strided_rows(rows, dtype):
    x, ln_w, ln_b, w, b = _inputs(rows, 96, 37, dtype, seed=7, strided=True)
    assert x.stride(0) == 2 * 96
    _check(x, ln_w, ln_b, w, b, gelu=True)


@pytest.mark.parametrize("rows", [1, 16, 64])
@pytest.mark.parametrize("splits", [1, 2, 5, 10])
def test_every_split_normalises_with_the_full_rows_stats(splits, rows, monkeypatch):
    """Forced split counts (1: no workspace, no ticket) with NaN-poisoned output and workspace: each split
    program must take the statistics over all of K, not its own chunk, and every partial must be written
    before the merge reads it."""
    k = 10 * BLOCK_K_DECODE["fp32"]  # 10 K steps: every forced count divides them

    def forced(n, k, block_k=128):
        return splits, k // splits

    monkeypatch.setattr(linear_module, "decode_split", forced)
    x, ln_w, ln_b, w, b = _inputs(rows, k, 37, torch.float32, seed=splits)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    _check(x, ln_w, ln_b, w, b, gelu=True)
    assert _counters_are_zero()


def test_split_rule_splits_the_test_shapes():
    """The default rule does split the decode shapes above, so the default-path tests cover the merge too."""
    assert decode_split(37, 96, BLOCK_K_DECODE["fp32"])[0] > 1
    assert decode_split(35, 768, BLOCK_K_DECODE["fp16"])[0] > 1


@pytest.mark.parametrize("rows, launches", [(1, 1), (DECODE_MAX_ROWS, 1), (DECODE_MAX_ROWS + 1, 2)])
def test_decode_is_one_launch_and_prefill_two(rows, launches):
    x, ln_w, ln_b, w, b = _inputs(rows, 96, 37, torch.float32, seed=rows)
    with count_launches(DEVICE) as seen:
        ln_linear(x, ln_w, ln_b, EPS, w, b)
    assert seen.count == launches


def test_empty_rows_and_bad_arguments():
    x, ln_w, ln_b, w, b = _inputs(3, 96, 37, torch.float32)
    assert ln_linear(x[:0], ln_w, ln_b, EPS, w, b).shape == (0, 37)
    with pytest.raises(ValueError, match="ln_weight must be a contiguous"):
        ln_linear(x, ln_w[:95], ln_b, EPS, w, b)
    with pytest.raises(ValueError, match="ln_bias must be a contiguous"):
        ln_linear(x, ln_w, ln_b.half(), EPS, w, b)
    with pytest.raises(ValueError, match="linear: x must be"):
        ln_linear(x, ln_w, ln_b, EPS, w[:, :95], b)


GPT2_LN_LINEARS = {"124M": [(768, 2304), (768, 3072)], "1.5B": [(1600, 4800), (1600, 6400)]}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 8, 16, 64, 512])
@pytest.mark.parametrize("model", GPT2_LN_LINEARS)
def test_ln_linear_gpt2_shapes_gpu(model, rows, dtype):
    for k, n in GPT2_LN_LINEARS[model]:
        x, ln_w, ln_b, w, b = _inputs(rows, k, n, dtype, seed=k + n)
        _check(x, ln_w, ln_b, w, b, gelu=n > 3 * k)
        assert _counters_are_zero()
