"""Triton kernels (LayerNorm, add+LayerNorm, embed, write_kv) vs ``gpt2fast.ops.reference``.

On CPU these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported); shapes stay small because the interpreter runs one program at a time.
``gpu``-marked tests repeat the checks on CUDA at GPT-2 124M / 1.5B shapes.
"""

from __future__ import annotations

import pytest
import torch

from gpt2fast.ops import reference
from gpt2fast.ops.triton import available, unavailable_reason

pytestmark = pytest.mark.skipif(not available(), reason=unavailable_reason() or "triton available")

if available():
    from gpt2fast.ops.triton.embed import embed
    from gpt2fast.ops.triton.layer_norm import add_layer_norm, layer_norm
    from gpt2fast.ops.triton.write_kv import write_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5

# (rows, width): odd rows at small widths, GPT-2 widths with few rows (the interpreter is slow)
LN_SHAPES = [(1, 3), (3, 96), (17, 3), (111, 96), (1, 768), (3, 1600), (17, 1280)]
# dtype -> (atol, rtol) against the fp32-upcast reference: one rounding of an O(1..4) output in
# the storage dtype (fp16 eps 1e-3, bf16 eps 8e-3) plus a one-ulp flip when the fp32 results differ
LOW_PRECISION = {torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1.6e-2)}
INTERPRETER = not torch.cuda.is_available()


def _same_rounding(dtype: torch.dtype) -> dict:
    """Tolerance for one fp32 result rounded once to ``dtype``: bit-identical to the reference, except that the
    interpreter converts fp32 -> bf16 by truncation (GPU: round-to-nearest-even), up to 1 bf16 ulp = 2**-7."""
    if INTERPRETER and dtype == torch.bfloat16:
        return dict(atol=1e-30, rtol=2**-7)
    return dict(atol=0, rtol=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ln_inputs(rows: int, width: int, dtype: torch.dtype, seed: int = 0, strided: bool = False):
    """Random x (mean 2, std 3: a mean that cancellation would show), weight ~1, bias, all never zero."""
    g = _gen(seed)
    x = 2 + 3 * torch.randn(rows * (2 if strided else 1), width, generator=g)  # (T or 2T, C)
    w = 0.5 + torch.rand(width, generator=g)  # (C,)
    b = torch.randn(width, generator=g)  # (C,)
    x = x[::2] if strided else x  # rows of stride 2C
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), b.to(DEVICE, dtype)


def _ln_float64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * w.double() + b.double()


@pytest.mark.parametrize("rows,width", LN_SHAPES)
def test_layer_norm_fp32_matches_reference_and_float64(rows, width):
    x, w, b = _ln_inputs(rows, width, torch.float32, seed=rows * 7 + width)
    y = layer_norm(x, w, b, EPS)  # (T, C)
    assert y.dtype == torch.float32 and y.shape == (rows, width)
    torch.testing.assert_close(y, reference.layer_norm(x, w, b, EPS), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), _ln_float64(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,width", LN_SHAPES)
def test_add_layer_norm_fp32_updates_residual_and_matches_reference(rows, width):
    x, w, b = _ln_inputs(rows, width, torch.float32, seed=rows + width)
    residual = torch.randn(rows, width, generator=_gen(99)).to(DEVICE)  # (T, C)
    expected_residual = residual.clone()
    expected = reference.add_layer_norm(x, expected_residual, w, b, EPS)
    y = add_layer_norm(x, residual, w, b, EPS)
    torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)  # one fp32 add: exact
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), _ln_float64(residual, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
@pytest.mark.parametrize("rows,width", [(3, 96), (17, 3), (1, 1600)])
def test_layer_norm_low_precision(rows, width, dtype):
    atol, rtol = LOW_PRECISION[dtype]
    x, w, b = _ln_inputs(rows, width, dtype, seed=width)
    y = layer_norm(x, w, b, EPS)
    assert y.dtype == dtype
    torch.testing.assert_close(y, reference.layer_norm(x, w, b, EPS), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
@pytest.mark.parametrize("rows,width", [(3, 96), (1, 1600)])
def test_add_layer_norm_low_precision_rounds_residual_like_reference(rows, width, dtype):
    atol, rtol = LOW_PRECISION[dtype]
    x, w, b = _ln_inputs(rows, width, dtype, seed=width + 1)
    residual = torch.randn(rows, width, generator=_gen(5)).to(DEVICE, dtype)
    expected_residual = residual.clone()
    expected = reference.add_layer_norm(x, expected_residual, w, b, EPS)
    y = add_layer_norm(x, residual, w, b, EPS)
    # both add in fp32 and round once to the residual dtype
    torch.testing.assert_close(residual, expected_residual, **_same_rounding(dtype))
    torch.testing.assert_close(y, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("rows,width", [(17, 96), (3, 768)])
def test_layer_norms_take_strided_rows(rows, width):
    x, w, b = _ln_inputs(rows, width, torch.float32, seed=3, strided=True)
    assert not x.is_contiguous()
    torch.testing.assert_close(layer_norm(x, w, b, EPS), reference.layer_norm(x, w, b, EPS), atol=1e-5, rtol=1e-5)
    big = torch.randn(rows, 2 * width, generator=_gen(4)).to(DEVICE)  # (T, 2C): residual = left half, strided rows
    residual, expected_residual = big[:, :width], big[:, :width].clone()
    right = big[:, width:].clone()
    expected = reference.add_layer_norm(x, expected_residual, w, b, EPS)
    torch.testing.assert_close(add_layer_norm(x, residual, w, b, EPS), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)
    assert torch.equal(big[:, width:], right)  # the other half of each row is untouched


def test_layer_norm_rejects_what_it_cannot_run():
    x, w, b = _ln_inputs(4, 8, torch.float32)
    with pytest.raises(ValueError, match="last dim"):
        layer_norm(torch.randn(8, 4, device=DEVICE).t(), w, b, EPS)  # (4, 8), column stride 4
    with pytest.raises(ValueError, match="dtype"):
        layer_norm(x, w.half(), b, EPS)
    with pytest.raises(ValueError, match="residual shape"):
        add_layer_norm(x, torch.randn(3, 8, device=DEVICE), w, b, EPS)


def _table(vocab: int, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(vocab, width, generator=_gen(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,width", [(1, 3), (17, 96), (3, 1600)])
def test_embed_matches_reference(tokens, width, dtype, index_dtype):
    wte, wpe = _table(50, width, 1, dtype), _table(20, width, 2, dtype)  # (V, C), (P, C)
    ids = torch.randint(0, 5, (tokens,), generator=_gen(tokens)).to(DEVICE, index_dtype)  # repeats ids
    positions = torch.randint(0, 20, (tokens,), generator=_gen(tokens + 1)).to(DEVICE, index_dtype)
    out = embed(ids, positions, wte, wpe)
    # one fp32 add, one rounding, like the reference
    torch.testing.assert_close(out, reference.embed(ids, positions, wte, wpe), **_same_rounding(dtype))


def test_embed_takes_strided_ids_and_rows():
    packed = torch.tensor([[4, 4, 9, 0, 4], [0, 1, 2, 3, 4]], device=DEVICE).t().contiguous().t()  # (2, T) strided
    ids, positions = packed[0], packed[1]
    assert ids.stride(0) == 2
    wte = _table(10, 2 * 96, 3, torch.float32)[:, :96]  # rows of stride 192
    wpe = _table(8, 96, 4, torch.float32)
    expected = reference.embed(ids, positions, wte, wpe)
    torch.testing.assert_close(embed(ids, positions, wte, wpe), expected, atol=0, rtol=0)


# (T, H, D, BS, NB): odd token counts, block sizes 16 and 32
KV_SHAPES = [(1, 2, 16, 16, 3), (17, 3, 64, 16, 4), (37, 2, 24, 32, 3)]
KV_DTYPES = [  # (k/v dtype, cache dtype)
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
]  # fmt: skip


def _slots(tokens: int, num_slots: int, seed: int) -> torch.Tensor:
    """Distinct random slots with every third token padding (-1)."""
    slots = torch.randperm(num_slots, generator=_gen(seed))[:tokens]
    slots[::3] = -1
    return slots.to(DEVICE)


@pytest.mark.parametrize("src,dst", KV_DTYPES)
@pytest.mark.parametrize("tokens,heads,head_dim,block_size,num_blocks", KV_SHAPES)
def test_write_kv_from_fused_qkv_leaves_unwritten_slots_poisoned(tokens, heads, head_dim, block_size, num_blocks,
                                                                  src, dst):
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=_gen(tokens)).to(DEVICE, src)  # (T, 3, H, D)
    k, v = qkv[:, 1], qkv[:, 2]  # (T, H, D) views, token stride 3*H*D
    assert k.stride(0) == 3 * heads * head_dim
    k_cache = torch.full((num_blocks, heads, block_size, head_dim), float("nan"), dtype=dst, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = _slots(tokens, num_blocks * block_size, seed=tokens + heads)
    reference.write_kv(k, v, expected_k, expected_v, slots)
    write_kv(k, v, k_cache, v_cache, slots)
    # a copy is exact, a cast rounds once like the reference; NaN (poison) wherever nothing was written
    tol = _same_rounding(dst) if src != dst else dict(atol=0, rtol=0)
    torch.testing.assert_close(k_cache, expected_k, equal_nan=True, **tol)
    torch.testing.assert_close(v_cache, expected_v, equal_nan=True, **tol)
    written = int((slots >= 0).sum())
    assert int((~k_cache.isnan()).sum()) == written * heads * head_dim


def test_write_kv_rejects_what_it_cannot_run():
    k = torch.randn(2, 1, 4, device=DEVICE)
    cache = torch.zeros(2, 1, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="int64"):
        write_kv(k, k, cache, cache.clone(), torch.tensor([0, 1], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="dtype|float16"):
        write_kv(k.half(), k.half(), cache, cache.clone(), torch.tensor([0, 1], device=DEVICE))


# GPU: GPT-2 124M (C=768, H=12) and 1.5B (C=1600, H=25) shapes in fp16 and bf16
GPU_CONFIGS = [(768, 12), (1600, 25)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width,heads", GPU_CONFIGS)
@pytest.mark.parametrize("tokens", [1, 64, 1023])
def test_gpu_gpt2_shapes(tokens, width, heads, dtype):
    atol, rtol = LOW_PRECISION[dtype]
    x, w, b = _ln_inputs(tokens, width, dtype, seed=tokens)
    torch.testing.assert_close(layer_norm(x, w, b, EPS), reference.layer_norm(x, w, b, EPS), atol=atol, rtol=rtol)
    residual = torch.randn(tokens, width, device=DEVICE, dtype=dtype)
    expected_residual = residual.clone()
    expected = reference.add_layer_norm(x, expected_residual, w, b, EPS)
    torch.testing.assert_close(add_layer_norm(x, residual, w, b, EPS), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)

    wte, wpe = _table(50257, width, 1, dtype), _table(1024, width, 2, dtype)
    ids = torch.randint(0, 50257, (tokens,), device=DEVICE)
    positions = torch.randint(0, 1024, (tokens,), device=DEVICE)
    expected = reference.embed(ids, positions, wte, wpe)
    torch.testing.assert_close(embed(ids, positions, wte, wpe), expected, atol=0, rtol=0)

    head_dim, block_size = width // heads, 16
    num_blocks = -(-tokens // block_size) + 2
    qkv = torch.randn(tokens, 3, heads, head_dim, device=DEVICE, dtype=dtype)  # (T, 3, H, D)
    k_cache = torch.full((num_blocks, heads, block_size, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = _slots(tokens, num_blocks * block_size, seed=tokens)
    reference.write_kv(qkv[:, 1], qkv[:, 2], expected_k, expected_v, slots)
    write_kv(qkv[:, 1], qkv[:, 2], k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, expected_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, atol=0, rtol=0, equal_nan=True)
