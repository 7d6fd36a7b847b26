"""The ``torch`` backend (``gpt2fast/ops/torch_native.py``) vs the naive spec ``gpt2fast.ops.reference``."""

from __future__ import annotations

import pytest
import torch

from gpt2fast.ops import REFERENCE, TORCH, get_ops, reference, torch_native

LINEAR_CASES = [(1, 3, 5), (3, 17, 111), (8, 64, 96), (33, 111, 17)]  # (rows, K, N)


@pytest.mark.parametrize("rows, k, n", LINEAR_CASES)
@pytest.mark.parametrize("epilogue", ["bias", "none", "gelu", "residual", "gelu+residual"])
def test_linear_matches_reference(rows, k, n, epilogue):
    gen = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(rows, 2 * k, generator=gen)[:, ::2]  # a strided view, like a slice of a fused tensor
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    residual = torch.randn(rows, n, generator=gen) if "residual" in epilogue else None
    kwargs = dict(gelu="gelu" in epilogue, residual=residual)
    bias = None if epilogue == "none" else b
    y = torch_native.linear(x, w, bias, **kwargs)
    assert y.shape == (rows, n) and y.is_contiguous()
    torch.testing.assert_close(y, reference.linear(x, w, bias, **kwargs), atol=2e-5, rtol=1e-5)


def test_linear_low_precision_uses_the_reference():
    x, w, b = torch.randn(3, 8).bfloat16(), torch.randn(5, 8).bfloat16(), torch.randn(5).bfloat16()
    assert torch.equal(torch_native.linear(x, w, b, gelu=True), reference.linear(x, w, b, gelu=True))


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_lm_head_family_matches_reference(rows):
    gen = torch.Generator().manual_seed(rows)
    x, wte = torch.randn(rows, 48, generator=gen), torch.randn(1013, 48, generator=gen)  # an odd vocabulary
    torch.testing.assert_close(torch_native.lm_head(x, wte), reference.lm_head(x, wte), atol=1e-4, rtol=1e-5)
    assert torch.equal(torch_native.lm_head_argmax(x, wte), reference.lm_head_argmax(x, wte))
    temperature = torch.tensor([0.0, 0.8, 1.5, 0.0, 1.0, 0.3, 2.0, 0.9][:rows])
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 5
    for temps in (temperature, temperature + 0.5):  # greedy rows mixed in (none at rows=1), then every row drawing
        assert torch.equal(torch_native.lm_head_gumbel(x, wte, temps, seeds),
                           reference.lm_head_gumbel(x, wte, temps, seeds))


def test_lm_head_low_precision_weights_use_the_reference():
    x, wte = torch.randn(2, 16), torch.randn(50, 16).bfloat16()
    assert torch.equal(torch_native.lm_head(x, wte), reference.lm_head(x, wte))


def test_backend_names():
    cpu = torch.device("cpu")
    assert get_ops("torch", cpu) is TORCH and get_ops("reference", cpu) is REFERENCE
    assert get_ops("auto", cpu) is TORCH
    assert REFERENCE.linear is reference.linear and TORCH.linear is torch_native.linear
