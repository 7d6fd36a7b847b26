"""The whole model on the native CPU backend vs the reference backend: prefill op by op, decode steps through
``DecodeLayers`` (every layer in one native call), fp32 within 1e-4 and greedy tokens equal; bf16 close."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gpt2fast import LLM, SamplingParams
from gpt2fast.cache import KVCache
from gpt2fast.config import GPT2Config
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.model import GPT2
from gpt2fast.ops import CPU, REFERENCE, cpu

# Every `pip install` builds the module: a missing one is a failure here, not a skip.
assert cpu.available(), cpu.unavailable_reason()

CONFIG = GPT2Config(n_layer=3, n_embd=40, n_head=5, vocab_size=97, n_positions=64)  # K=40: not a multiple of 16


def _step(model: GPT2, cache: KVCache, tables: list[list[int]], lens: list[int], ids: list[list[int]]) -> torch.Tensor:
    """One step of several sequences, ``ids[b]`` new tokens each (the last ``len(ids[b])`` of ``lens[b]``)."""
    meta = AttentionMetadata.build(tables, lens, [len(t) for t in ids], block_size=cache.block_size)
    flat = torch.tensor([t for seq in ids for t in seq])
    positions = torch.tensor([p for seq, n in zip(ids, lens) for p in range(n - len(seq), n)])
    return model(flat, positions, cache, meta)  # (B, V)


@pytest.fixture(params=cpu.supported_isas())
def isa(request):
    previous = cpu.isa()
    cpu.select_isa(request.param)
    yield request.param
    cpu.select_isa(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_match_the_reference(isa, dtype):
    state = GPT2(CONFIG).init_random(seed=3).state_dict()
    ours = GPT2.from_state_dict(CONFIG, state, CPU, dtype=dtype)
    ref = GPT2.from_state_dict(CONFIG, state, REFERENCE, dtype=dtype)
    caches = [KVCache(CONFIG, num_blocks=12, block_size=4, dtype=dtype) for _ in range(2)]
    tables, lens = [[0, 1, 2, 3], [7, 5, 6, 4]], [7, 5]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lens]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    got, expected = (_step(m, c, tables, lens, prompts) for m, c in ((ours, caches[0]), (ref, caches[1])))
    torch.testing.assert_close(got, expected, **tol)  # prefill: op by op
    for _ in range(6):  # decode: DecodeLayers on ours, the reference's loop on ref; same tokens fed to both
        next_ids = [[int(t)] for t in expected.argmax(dim=-1)]
        lens = [n + 1 for n in lens]
        got, expected = (_step(m, c, tables, lens, next_ids) for m, c in ((ours, caches[0]), (ref, caches[1])))
        torch.testing.assert_close(got, expected, **tol)
    assert ours._decode_layers  # the decode steps did go through the one-call path (False: op by op)
    for layer in range(CONFIG.n_layer):  # and stored the same K/V in every slot the sequences own
        for table, n in zip(tables, lens):
            blocks, offsets = torch.tensor(table)[torch.arange(n) // 4], torch.arange(n) % 4
            for which in ("k", "v"):
                got, want = (getattr(c, which)[layer][blocks, :, offsets].float() for c in caches)  # (n, H, D)
                torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_panels_equal_int8_rows_on_every_isa(isa, dtype):
    """int8 weights held in panels (forced here, so machines without VNNI run it too) against the same weights as
    (N, K) rows: a prefill op by op and decode steps through DecodeLayers. Equal on VNNI (the same integer sums);
    within fp32 summation order on AVX2 and portable, whose plain loop reads the panels."""
    state = GPT2(CONFIG).init_random(seed=5).state_dict()
    panels, rows = (GPT2.from_state_dict(CONFIG, dict(state), dataclasses.replace(CPU, int8_panels=choice), dtype=dtype,
                                         quantization="int8") for choice in (lambda dtype: True, None))
    assert panels.wte.weight.shape == (7, 10, 16, 4) and rows.wte.weight.shape == (97, 40)
    caches = [KVCache(CONFIG, num_blocks=12, block_size=4, dtype=dtype) for _ in range(2)]
    tables, lens = [[0, 1, 2, 3], [7, 5, 6, 4]], [7, 5]
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lens]
    for _ in range(4):  # the prefill, then three decode steps
        got, want = (_step(m, c, tables, lens, ids) for m, c in ((panels, caches[0]), (rows, caches[1])))
        if cpu.int8_method() == "vnni":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        ids = [[int(t)] for t in want.argmax(dim=-1)]
        lens = [n + 1 for n in lens]
    assert panels._decode_layers  # the decode steps went through the one-call path


def test_greedy_generation_equals_the_reference():
    model = 'random:{"n_layer": 2, "n_embd": 48, "n_head": 3, "vocab_size": 211, "n_positions": 128}'
    prompts = [[5, 17, 3], [int(i * 37 % 211) for i in range(29)]]  # token ids: a 211-token vocabulary
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in LLM(model, backend="cpu").generate(prompts, params)]
    ref = [o.outputs[0].token_ids for o in LLM(model, backend="reference").generate(prompts, params)]
    assert ours == ref


def test_seeded_sampling_equals_the_reference():
    model = 'random:{"n_layer": 2, "n_embd": 48, "n_head": 3, "vocab_size": 211, "n_positions": 128}'
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True)
    ours = LLM(model, backend="cpu").generate([[1, 2, 3, 4]], params)[0].outputs[0].token_ids
    ref = LLM(model, backend="reference").generate([[1, 2, 3, 4]], params)[0].outputs[0].token_ids
    assert ours == ref


def test_the_plan_follows_the_model_to_another_dtype():
    model, cache = GPT2(CONFIG, CPU).init_random(seed=1), KVCache(CONFIG, num_blocks=4, block_size=4)
    meta = AttentionMetadata.build([[0]], [1], [1], block_size=4)
    model(torch.tensor([3]), torch.tensor([0]), cache, meta)
    assert model._decode_layers
    model.to(torch.bfloat16)
    cache = KVCache(CONFIG, num_blocks=4, block_size=4, dtype=torch.bfloat16)
    assert model(torch.tensor([3]), torch.tensor([0]), cache, meta).shape == (1, 97)


def test_decode_layers_refuse_bad_shapes_and_metadata():
    model, cache = GPT2(CONFIG, CPU).init_random(seed=1), KVCache(CONFIG, num_blocks=4, block_size=4)
    layers = cpu.DecodeLayers(CONFIG, [model.layer_params(i) for i in range(3)], torch.float32)
    with pytest.raises(ValueError, match="must be"):
        cpu.DecodeLayers(CONFIG, [model.layer_params(0)[:3] + (torch.randn(5),) + model.layer_params(0)[4:]],
                         torch.float32)
    with pytest.raises(ValueError, match="residual stream"):
        layers(torch.randn(1, 8), cache, AttentionMetadata.build([[0]], [1], [1], block_size=4))
    for field, value in (("block_tables", 10**6), ("seq_lens", 5)):  # a block outside the cache; a context too long
        meta = AttentionMetadata.build([[0]], [1], [1], block_size=4)
        getattr(meta, field).view(-1)[0] = value
        with pytest.raises(ValueError, match="outside the cache|block table"):
            layers(torch.randn(1, 40), cache, meta)
