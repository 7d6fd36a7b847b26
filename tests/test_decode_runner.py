"""DecodeRunner: decode steps over static, padded buffers (CUDA graphs on CUDA) give the dynamic path's tokens."""

from __future__ import annotations

import pytest
import torch

from gpt2fast import LLM, SamplingParams
from gpt2fast.cache import KVCache
from gpt2fast.config import GPT2Config
from gpt2fast.decode_runner import DecodeRunner
from gpt2fast.model import GPT2

MODEL = 'random:{"n_layer": 2, "n_embd": 48, "n_head": 3, "vocab_size": 301, "n_positions": 96}'
PARAMS = [
    SamplingParams(max_tokens=9, temperature=0),
    SamplingParams(max_tokens=7, temperature=0.9, seed=11),
    SamplingParams(max_tokens=12, temperature=1.2, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=5, temperature=0),
    SamplingParams(max_tokens=10, temperature=0.7, seed=3),
]


@pytest.fixture(scope="module")
def pair():
    common = dict(device="cpu", seed=2, max_num_seqs=8, kv_cache_tokens=1024)
    return LLM(MODEL, cuda_graphs=False, **common), LLM(MODEL, cuda_graphs=True, **common)


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 301, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("num", [1, 3, 5], ids=lambda n: f"{n}seqs")
def test_static_runner_gives_the_dynamic_tokens(pair, num):
    """3 and 5 sequences pad to buckets 4 and 8; sequences finishing at different steps shrink the batch."""
    dynamic, static = pair
    prompts, params = _prompts([1, 17, 40, 16, 5][:num], seed=num), PARAMS[:num]
    expected = [o.outputs[0].token_ids for o in dynamic.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in static.generate(prompts, params)] == expected


def test_rows_that_need_logits_take_the_hidden_mode(pair):
    dynamic, static = pair
    params = [SamplingParams(max_tokens=6, temperature=0.8, top_p=0.8, seed=1),
              SamplingParams(max_tokens=6, temperature=0)]
    prompts = _prompts([4, 9], seed=7)
    expected = [o.outputs[0].token_ids for o in dynamic.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in static.generate(prompts, params)] == expected


def test_decode_steps_go_through_the_runner_at_bucket_shapes(pair, monkeypatch):
    _, static = pair
    engine, shapes = static.engine, []
    hidden = engine.model.hidden

    def recording(input_ids, positions, cache, meta):
        shapes.append((input_ids.shape[0], tuple(meta.block_tables.shape)))
        return hidden(input_ids, positions, cache, meta)

    monkeypatch.setattr(engine.model, "hidden", recording)
    static.generate(_prompts([3, 5, 6]), SamplingParams(max_tokens=3, temperature=0))
    width = engine.max_blocks
    assert shapes[0] == (14, (3, width))  # the prefill: dynamic, 3 + 5 + 6 tokens
    assert shapes[1:] == [(4, (4, width))] * 2  # two decode steps of 3 sequences in bucket 4


def test_padding_rows_never_touch_the_cache():
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=23, n_positions=16)
    model, cache = GPT2(cfg).init_random(seed=1), KVCache(cfg, num_blocks=6, block_size=4)
    cache.data.fill_(float("nan"))
    runner = DecodeRunner(model, cache, max_num_seqs=4)
    hidden = runner.run([3, 7, 9], [0, 0, 0], [[0], [2], [5]], mode="hidden")  # bucket 4: one padding row
    assert hidden.shape == (3, 16) and hidden.isfinite().all()
    written = ~cache.data.isnan()  # (L, 2, NB, H, BS, D)
    assert written[:, :, [0, 2, 5], :, 0].all()  # slot 0 of each sequence's page, every layer, K and V
    assert written.sum() == 3 * cfg.n_layer * 2 * cfg.n_embd  # and nothing else


def test_bad_arguments():
    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8)
    model, cache = GPT2(cfg).init_random(seed=0), KVCache(cfg, num_blocks=2, block_size=4)
    runner = DecodeRunner(model, cache, max_num_seqs=2)
    with pytest.raises(ValueError, match="exceed the largest decode bucket"):
        runner.run([1, 2, 3], [0, 0, 0], [[0], [1], [1]], mode="hidden")
    with pytest.raises(ValueError, match="has no page"):
        runner.run([1], [4], [[0]], mode="hidden")
    with pytest.raises(ValueError, match="needs a temperature and a seed"):
        runner.run([1], [0], [[0]], mode="tokens")
    with pytest.raises(ValueError, match="mode must be"):
        runner.run([1], [0], [[0]], mode="logits")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeRunner(model, cache, max_num_seqs=2, use_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        LLM(MODEL, device="cpu", cuda_graphs="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_graph_replay_gives_the_eager_tokens_gpu(backend):
    common = dict(device="cuda", dtype="float16", backend=backend, seed=0, max_num_seqs=16)
    eager, graphs = LLM("random:gpt2", cuda_graphs=False, **common), LLM("random:gpt2", cuda_graphs=True, **common)
    prompts = _prompts([1, 30, 100, 7, 64, 200, 3], seed=1)
    params = [SamplingParams(max_tokens=24, temperature=t, seed=i, ignore_eos=True)
              for i, t in enumerate([0, 0.8, 0, 1.0, 0, 0.5, 0])]
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in graphs.generate(prompts, params)] == expected
