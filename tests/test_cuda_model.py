"""The whole model on backend='cuda' (the CUDA C++ kernels, emulated on this CPU) against the reference backend.

Every op of a step runs in CUDA C++ (``ops.cuda_ops``): decode steps the GEMV linears and split-K decode
attention, prefills the tensor-core GEMM and flash attention (fp32: CUDA-core GEMM, the decode kernel per query).
A test replaces the fallback table with one that raises on every call and runs the whole engine.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gpt2fast.ops as ops_module
from gpt2fast import LLM, SamplingParams
from gpt2fast.ops import Ops, cuda, cuda_build, get_ops

pytestmark = pytest.mark.skipif(
    bool(cuda_build.emulator_unavailable_reason()), reason=cuda_build.emulator_unavailable_reason() or "available"
)

# Head dim 64 (the CUDA attention kernel's), odd everything else: 3 heads, an MLP of 200, 555 tokens.
TINY = 'random:{"n_layer": 2, "n_embd": 192, "n_head": 3, "n_inner": 200, "vocab_size": 555, "n_positions": 80}'


@pytest.fixture(scope="module")
def pair():
    common = dict(device="cpu", seed=3, kv_cache_tokens=320)
    return LLM(TINY, backend="torch", **common), LLM(TINY, backend="cuda", **common)


def test_backend_is_chosen(pair):
    assert [llm.backend for llm in pair] == ["torch", "cuda"]


def test_same_logits_as_the_reference(pair):
    """One pass over 37 tokens: a prefill (the GEMM, flash attention's fp32 path, the LM head's logits)."""
    reference, fast = pair
    ids = torch.randint(0, 555, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.testing.assert_close(fast.logits(ids), reference.logits(ids), atol=1e-4, rtol=0)


def test_same_greedy_tokens_through_the_runtime(pair):
    """Prefills, then decode steps of three sequences at once: every decode op on the CUDA kernels."""
    reference, fast = pair
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 555, (n,), generator=gen).tolist() for n in (1, 17, 33)]
    params = SamplingParams(max_tokens=6, temperature=0)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, params)] == expected


def test_same_sampled_tokens_through_the_cuda_sampler(pair):
    """Top-k and top-p rows draw through the CUDA sampler (no sort), temperature-only rows in the LM head:
    the same tokens as the reference backend's sampler, seed for seed."""
    reference, fast = pair
    prompts = [[5, 9, 2], [100, 7]]
    params = [SamplingParams(max_tokens=5, temperature=0.9, top_k=20, seed=4),
              SamplingParams(max_tokens=5, temperature=1.1, top_p=0.8, seed=8)]
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, params)] == expected


def test_decode_steps_run_the_cuda_kernels(pair, monkeypatch):
    """The dispatch: a decode step's linears and attention reach the CUDA wrappers, not the fallback."""
    _, fast = pair
    calls: list[str] = []
    names = ("linear", "ln_linear", "attention", "write_kv", "write_kv_attention", "embed", "layer_norm",
             "sample_top_k_top_p")
    for name in names:
        op = getattr(cuda, name)
        monkeypatch.setattr(cuda, name, lambda *a, _op=op, _name=name, **k: (calls.append(_name), _op(*a, **k))[1])
    fast.engine.model.ops = get_ops("cuda", torch.device("cpu"))  # rebuilt: it binds the patched wrappers
    try:
        fast.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.5, top_k=3))
    finally:
        monkeypatch.undo()
        fast.engine.model.ops = get_ops("cuda", torch.device("cpu"))
    # the decode step's: GEMVs with and without the LayerNorm prologue, the fused K/V store + attention (the prefill
    # of 3 tokens, a longer query, takes write_kv and the fallback's attention), the final LayerNorm, the sampler
    assert {"linear", "ln_linear", "write_kv_attention", "write_kv", "embed", "layer_norm",
            "sample_top_k_top_p"} <= set(calls)


def test_static_decode_runner_on_the_cuda_kernels(pair):
    """The CUDA-graph runner's static, padded buffers (run eagerly here) through the CUDA kernels: 3 sequences
    pad to bucket 4, so a padding row meets every kernel and must leave the real rows alone."""
    reference, _ = pair
    static = LLM(TINY, backend="cuda", device="cpu", seed=3, kv_cache_tokens=320, cuda_graphs=True)
    prompts = [[1, 2], [3] * 20, [4, 5, 6]]
    params = SamplingParams(max_tokens=5, temperature=0)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in static.generate(prompts, params)] == expected


def _raising_table() -> Ops:
    """An op table whose every function raises: installed as the cuda backend's fallback, any use of it fails."""

    def raiser(name: str):
        def op(*args, **kwargs):
            raise AssertionError(f"the fallback's {name} was called: the cuda backend must run it in CUDA C++")

        return op

    functions = {f.name: raiser(f.name) for f in dataclasses.fields(Ops) if f.type.startswith("Callable[...")}
    return Ops(name="raising", **functions)


# dtype -> logits tolerance vs the reference backend: fp32 the 1e-4 contract; fp16/bf16 round every activation
# (the reference upcasts each op to fp32 and rounds its output: the same roundings, other summation orders)
MODEL_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1.5e-1}


@pytest.mark.parametrize("dtype", list(MODEL_TOLERANCE))
def test_every_op_of_generate_and_logits_runs_in_cuda_cpp(dtype, monkeypatch):
    """The fallback raises on every function; generate (greedy and seeded sampling, odd prompt lengths, prompts
    longer than max_num_batched_tokens: chunked prefill, a shared prefix: prefix caching) and logits() still
    run, equal to the reference backend (fp32 tokens exactly; logits within MODEL_TOLERANCE)."""
    monkeypatch.setattr(ops_module, "TORCH", _raising_table())
    common = dict(device="cpu", seed=3, kv_cache_tokens=320, dtype=dtype, max_num_batched_tokens=24,
                  enable_prefix_caching=True)  # fmt: skip
    fast = LLM(TINY, backend="cuda", **common)
    reference = LLM(TINY, backend="reference", **common)
    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(0, 555, (35,), generator=gen).tolist()
    prompts = [shared + [1, 2], torch.randint(0, 555, (1,), generator=gen).tolist(), shared + [9],
               torch.randint(0, 555, (50,), generator=gen).tolist()]  # fmt: skip
    ids = torch.randint(0, 555, (61,), generator=gen).tolist()
    torch.testing.assert_close(fast.logits(ids), reference.logits(ids), atol=MODEL_TOLERANCE[dtype], rtol=0)
    if dtype != "float32":
        return  # fp16/bf16 tokens may flip at near-ties of the logits; the logits above are the contract
    params = [SamplingParams(max_tokens=6, temperature=0), SamplingParams(max_tokens=6, temperature=0.8, seed=5),
              SamplingParams(max_tokens=6, temperature=1.0, top_k=30, top_p=0.9, seed=6),
              SamplingParams(max_tokens=6, temperature=0)]  # fmt: skip
    for _ in range(2):  # the second pass hits the prefix cache
        expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
        assert [o.outputs[0].token_ids for o in fast.generate(prompts, params)] == expected
    assert fast.engine.scheduler.pool.hit_blocks > 0  # the shared prefix came from the cache
