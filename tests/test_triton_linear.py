"""Triton linear (prefill tiles and the decode split-K GEMV, each epilogue) vs ``gpt2fast.ops.reference.linear``.

On CPU these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); shapes stay
small. ``gpu``-marked tests repeat the checks on CUDA at GPT-2 124M / 1.5B shapes in fp16 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from gpt2fast.ops import reference
from gpt2fast.ops.triton import available, unavailable_reason

pytestmark = pytest.mark.skipif(not available(), reason=unavailable_reason() or "triton available")

if available():
    from gpt2fast.ops.triton import linear as linear_module
    from gpt2fast.ops.triton.linear import DECODE_MAX_ROWS, PREFILL_TILES, decode_split, linear, prefill_tile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rows, K, N): rows <= 64 take the split-K decode path (row tile 16, or 64 above 16 rows), more rows the
# tl.dot tiles. Odd and GPT-2-like widths; (2, 768, 96) and (16, 300, 200) split K several ways.
SHAPES = [(1, 96, 96), (3, 97, 131), (16, 300, 200), (2, 768, 96), (17, 96, 131), (64, 300, 70), (65, 200, 70),
          (111, 97, 131)]
ROWS_ONLY = [1, 3, 17, 111]
EPILOGUES = {
    "bias": dict(bias=True),
    "bias_gelu": dict(bias=True, gelu=True),
    "bias_residual": dict(bias=True, residual=True),
    "no_bias": dict(),
    "gelu_residual": dict(bias=True, gelu=True, residual=True),
}
# dtype -> tolerance relative to the largest |reference| (used as atol scale) and rtol. fp32: ~1e-5
# (summation order only). fp16: one rounding of the output (2**-10) plus the reference's own rounding.
# bf16: the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), so up to 2 bf16 ulps (2**-7 each).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3.2e-2}


def _inputs(rows, k, n, dtype, seed=0, strided=False):
    """x (T, K) with rows of stride 2K when ``strided``; weight ~ N(0, 1/K) so outputs are O(1); bias, residual."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows * (2 if strided else 1), k, generator=g).to(DEVICE, dtype)  # (T or 2T, K)
    x = x[::2] if strided else x  # sliced after the cast, which would copy it contiguous
    w = torch.randn(n, k, generator=g) / k**0.5  # (N, K)
    b = torch.randn(n, generator=g)  # (N,)
    r = torch.randn(rows, n, generator=g)  # (T, N)
    return [x] + [t.to(DEVICE, dtype) for t in (w, b, r)]


def _check(x, w, b, r, dtype, spec):
    bias = b if spec.get("bias") else None
    residual = r if spec.get("residual") else None
    gelu = spec.get("gelu", False)
    got = linear(x, w, bias, gelu=gelu, residual=residual)
    want = reference.linear(x, w, bias, gelu=gelu, residual=residual)
    assert got.dtype == dtype and got.shape == want.shape
    tol = TOLERANCE[dtype]
    scale = float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_fp32_matches_reference(shape, epilogue):
    x, w, b, r = _inputs(*shape, torch.float32)
    _check(x, w, b, r, torch.float32, EPILOGUES[epilogue])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("epilogue", ["bias_gelu", "bias_residual", "no_bias"])
@pytest.mark.parametrize("rows", ROWS_ONLY)
def test_linear_half_matches_reference(rows, epilogue, dtype):
    x, w, b, r = _inputs(rows, 97, 131, dtype, seed=rows)
    _check(x, w, b, r, dtype, EPILOGUES[epilogue])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [3, 17, 111])  # decode with row tiles 16 and 64, prefill
def test_linear_strided_rows(rows, dtype):
    x, w, b, r = _inputs(rows, 96, 131, dtype, seed=7, strided=True)
    assert x.stride(0) == 2 * 96
    r = torch.randn(rows, 2 * 131, device=DEVICE).to(dtype)[:, :131]  # residual rows of stride 2N too
    _check(x, w, b, r, dtype, EPILOGUES["gelu_residual"])


@pytest.mark.parametrize("tile", sorted(set(PREFILL_TILES["fp16"])) if available() else [], ids=str)
def test_every_half_prefill_tile_matches_reference(tile, monkeypatch):
    """Each tile the shape rule can pick, forced on a 111-row prefill with bias + GELU + residual."""
    monkeypatch.setattr(linear_module, "prefill_tile", lambda etype, t, n: tile)
    x, w, b, r = _inputs(111, 97, 131, torch.float16, seed=11)
    _check(x, w, b, r, torch.float16, EPILOGUES["gelu_residual"])


@pytest.mark.parametrize(
    "t, n, tile",
    [(2048, 3072, (128, 128)), (2048, 768, (64, 128)), (512, 2304, (64, 128)), (512, 768, (64, 64)),
     (1024, 1600, (64, 128)), (100, 6400, (64, 64)), (4096, 1600, (128, 128))],
)
def test_prefill_tile_is_the_largest_that_gives_an_h100_one_program_per_sm(t, n, tile):
    bm, bn, _, _ = prefill_tile("fp16", t, n)
    assert (bm, bn) == tile
    if tile != PREFILL_TILES["fp16"][-1][:2]:
        assert -(-t // bm) * -(-n // bn) >= 132


def test_prefill_tile_falls_back_to_the_smallest():
    assert prefill_tile("bf16", 20, 96) == PREFILL_TILES["bf16"][-1]  # too small to fill: the smallest tile
    assert prefill_tile("fp32", 4096, 4096) == PREFILL_TILES["fp32"][0]


def test_decode_split_fills_an_h100():
    """The split rule: every GPT-2 124M decode linear gets >= 132 programs (one per H100 SM)."""
    for n, k in ((2304, 768), (768, 768), (3072, 768), (768, 3072)):
        splits, k_per_split = decode_split(n, k)
        assert -(-n // 32) * splits >= 132
        assert k_per_split * splits >= k > k_per_split * (splits - 1)  # no empty split
    assert decode_split(96, 96) == (1, 128)
    assert decode_split(768, 768, block_k=32) == (8, 96)  # fp32 steps K by 32


def test_linear_is_deterministic_and_empty_rows_work():
    x, w, b, r = _inputs(DECODE_MAX_ROWS, 300, 200, torch.float32, seed=3)
    first = linear(x, w, b, gelu=True)
    assert torch.equal(first, linear(x, w, b, gelu=True))  # split-K partials are summed in a fixed order
    assert linear(x[:0], w, b).shape == (0, 200)


def test_linear_rejects_mixed_dtypes_and_shapes():
    x, w, b, _ = _inputs(3, 96, 96, torch.float32)
    with pytest.raises(ValueError, match="bias has dtype"):
        linear(x, w, b.half())
    with pytest.raises(ValueError, match="x must be"):
        linear(x, w[:, :95], b)
    with pytest.raises(ValueError, match="residual must be"):
        linear(x, w, b, residual=torch.zeros(3, 95, device=DEVICE))


# ---- GPU: GPT-2 124M and 1.5B shapes -------------------------------------------------------------------

GPT2_LINEARS = {  # (K, N) of c_attn, attn c_proj, c_fc, mlp c_proj
    "124M": [(768, 2304), (768, 768), (768, 3072), (3072, 768)],
    "1.5B": [(1600, 4800), (1600, 1600), (1600, 6400), (6400, 1600)],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 8, 16, 64, 512])
@pytest.mark.parametrize("model", GPT2_LINEARS)
def test_linear_gpt2_shapes_gpu(model, rows, dtype):
    for k, n in GPT2_LINEARS[model]:
        x, w, b, r = _inputs(rows, k, n, dtype, seed=k + n)
        for spec in EPILOGUES.values():
            _check(x, w, b, r, dtype, spec)


def _poisoned_empty(real_empty):
    """``torch.empty`` that fills floats with NaN and ints with -7: an element a kernel forgets to write shows."""

    def empty(*shape, dtype=None, **kwargs):
        out = real_empty(*shape, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    return empty


@pytest.mark.parametrize("shape", [(3, 300, 200), (17, 97, 131), (65, 97, 131)], ids=str)
def test_linear_writes_every_output_and_partial(shape, monkeypatch):
    """Outputs and the split-K workspace start as NaN: a partial or output left unwritten would survive."""
    x, w, b, r = _inputs(*shape, torch.float32, seed=11)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    _check(x, w, b, r, torch.float32, EPILOGUES["gelu_residual"])
