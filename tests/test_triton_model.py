"""The whole model on backend='triton' (the interpreter here) against the reference backend."""

from __future__ import annotations

import pytest
import torch

from gpt2fast import LLM, SamplingParams
from gpt2fast.ops import get_ops
from gpt2fast.ops import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.available(), reason=triton_backend.UNAVAILABLE)

# Odd sizes: 5 heads of 12, an MLP of 100, a vocabulary of 777.
TINY = 'random:{"n_layer": 2, "n_embd": 60, "n_head": 5, "n_inner": 100, "vocab_size": 777, "n_positions": 96}'


@pytest.fixture(scope="module")
def pair():
    common = dict(device="cpu", seed=4, kv_cache_tokens=256)
    return LLM(TINY, backend="torch", **common), LLM(TINY, backend="triton", **common)


def test_backend_is_chosen(pair):
    assert [llm.backend for llm in pair] == ["torch", "triton"]


def test_same_logits_as_the_reference(pair):
    reference, fast = pair
    ids = torch.randint(0, 777, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.testing.assert_close(fast.logits(ids), reference.logits(ids), atol=1e-4, rtol=0)


def test_same_greedy_tokens_through_the_runtime(pair):
    """Prefill, chunked prefill, decode and a batch of sequences all run on the Triton kernels."""
    reference, fast = pair
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 777, (n,), generator=gen).tolist() for n in (1, 17, 40)]
    params = SamplingParams(max_tokens=6, temperature=0)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, params)] == expected


def test_same_seeded_draws_through_the_fused_lm_head(pair):
    """Temperature-only rows are drawn inside the Triton LM head (Gumbel-max), greedy rows there too;
    a top-p row sends the batch through logits and the sampler. Every path matches the reference backend."""
    reference, fast = pair
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 777, (n,), generator=gen).tolist() for n in (3, 20)]
    for params in ([SamplingParams(max_tokens=5, temperature=0.8, seed=9), SamplingParams(max_tokens=5, temperature=0)],
                   [SamplingParams(max_tokens=5, temperature=1.1, top_p=0.9, seed=3)] * 2):
        expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
        assert [o.outputs[0].token_ids for o in fast.generate(prompts, params)] == expected


def test_auto_is_not_triton_without_cuda():
    if not torch.cuda.is_available():  # the native CPU kernels (tests/test_cpu_ops.py), never the interpreter
        assert get_ops("auto", torch.device("cpu")).name == "cpu"
