"""Kernel launch counting: single ops launch what their design says, and a decode step is linear in depth."""

from __future__ import annotations

import pytest
import torch

from gpt2fast.launches import _decode_step_launches, count_launches, decode_launches
from gpt2fast.ops import cuda, cuda_build
from gpt2fast.ops import triton as triton_backend
from gpt2fast.roofline import BACKEND_LAUNCHES

needs_triton = pytest.mark.skipif(not triton_backend.available(), reason=triton_backend.UNAVAILABLE)
needs_emulator = pytest.mark.skipif(bool(cuda_build.emulator_unavailable_reason()), reason="no emulated CUDA build")


@needs_triton
def test_interpreted_triton_launches_are_counted():
    from gpt2fast.ops.triton import layer_norm, linear

    x, w, b = torch.randn(3, 96), torch.rand(96), torch.randn(96)
    with count_launches("cpu") as seen:
        layer_norm.layer_norm(x, w, b, 1e-5)
    assert seen.count == 1
    with count_launches("cpu") as seen:
        linear.linear(x, torch.randn(64, 96), None)  # decode shape: split-K GEMV, merged in the same launch
    assert linear.decode_split(64, 96, linear.BLOCK_K_DECODE["fp32"])[0] > 1
    assert seen.count == 1


@needs_triton
def test_triton_decode_step_launches():
    """Per layer: four linears (split-K merged in-kernel) x 1, the two that read a LayerNorm's output with the
    LayerNorm in their prologue (ln_linear), the two after them adding the residual in their epilogue, and
    write_kv_attention's decode attention that stores the step's k/v itself (split-K merged in-kernel) = 5; per
    step: embed, the final LayerNorm and the greedy LM head's one launch (its per-vocab-tile partials merged in-kernel
    by the last program of each row tile). The test model's decode attention
    splits (2 sequences x 2 heads x 4-page tables), so its one launch includes the merge and the store from the
    newest position's split."""
    from gpt2fast.ops.triton.attention import decode_splits

    assert decode_splits(2, 2, 4)[0] > 1
    assert decode_launches("triton", "cpu") == (5, 3) == BACKEND_LAUNCHES["triton"]  # (what roofline predicts with)


@needs_triton
def test_triton_ln_linear_decode_is_one_launch():
    from gpt2fast.ops.triton import linear

    x, g, h = torch.randn(3, 96), torch.rand(96), torch.randn(96)
    with count_launches("cpu") as seen:
        linear.ln_linear(x, g, h, 1e-5, torch.randn(64, 96), None)
    assert seen.count == 1


@needs_emulator
def test_cuda_decode_step_launches():
    """Per layer: the two ln_linear GEMVs with their LayerNorm prologue, write_kv_attention (the K/V store, the
    split-K attention and its merge in one launch), the two other GEMVs; per step: embed, the final LayerNorm and
    the LM head with its token choice (one launch; the logits are never written)."""
    assert decode_launches("cuda", "cpu") == (5, 3) == BACKEND_LAUNCHES["cuda"]


@needs_emulator
def test_emulated_cuda_launches_are_counted(emu):
    x, w, b = torch.randn(3, 96), torch.rand(96), torch.randn(96)
    with count_launches("cpu") as seen:
        cuda.layer_norm(x, w, b, 1e-5)
        cuda.layer_norm(x, w, b, 1e-5)
    assert seen.count == 2


def test_torch_on_a_cpu_launches_nothing():
    with count_launches("cpu") as seen:
        torch.randn(8, 8) @ torch.randn(8, 8)
    assert seen.count == 0
    assert decode_launches("torch", "cpu") is None


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton),
                                     pytest.param("cuda", marks=needs_emulator)])
def test_int8_weights_launch_nothing_more(backend):
    """W8A16 dequantizes inside the kernels that read the weights: no dequantize launch, the same 5 per layer + 3."""
    assert decode_launches(backend, "cpu", quantization="int8") == (5, 3) == BACKEND_LAUNCHES[backend]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton),
                                     pytest.param("cuda", marks=needs_emulator)])
def test_a_decode_step_is_linear_in_depth(backend):
    per_layer, fixed = decode_launches(backend, "cpu")
    assert per_layer > 0 and fixed > 0
    assert _decode_step_launches(backend, torch.device("cpu"), 2, 3) == 3 * per_layer + fixed
