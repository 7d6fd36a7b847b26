"""The runtime against Hugging Face and against itself: batching, preemption, sharing, seeds, stops, streams."""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import hf_model, save_hf

from gpt2fast import SamplingParams
from gpt2fast.engine import LLM, Engine

RUNTIME = dict(n_layer=2, n_embd=60, n_head=5, vocab_size=777, n_positions=512)
PROMPT_LENS = [1, 2, 15, 16, 17, 64, 100, 200]
# Engine settings: roomy; a pool of 24 blocks with a small step budget (preemption + chunked prefill); no prefix cache.
POOLS = {
    "roomy": dict(),
    "tight": dict(kv_cache_tokens=512, max_num_batched_tokens=48),
    "no-prefix-cache": dict(kv_cache_tokens=512, enable_prefix_caching=False, max_num_seqs=3),
}


@pytest.fixture(scope="module")
def hf_and_folder(tmp_path_factory):
    model = hf_model(RUNTIME, seed=7)
    return model, save_hf(model, tmp_path_factory.mktemp("runtime") / "model", "safetensors")


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, RUNTIME["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENS]


def assert_all_free(engine: Engine) -> None:
    engine.scheduler.check()
    engine.pool.check([])
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_unfinished()


@pytest.fixture(scope="module")
def hf_greedy(hf_and_folder, prompts):
    """HF's greedy continuations, one prompt at a time."""
    model = hf_and_folder[0]
    return [
        model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                       pad_token_id=0)[0, len(p):].tolist()
        for p in prompts
    ]


@pytest.mark.parametrize("pool", POOLS)
def test_batched_greedy_equals_hf_one_at_a_time(hf_and_folder, prompts, hf_greedy, pool):
    llm = LLM(str(hf_and_folder[1]), device="cpu", **POOLS[pool])
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy
    assert [o.prompt_token_ids for o in outputs] == prompts
    if pool == "tight":
        assert llm.engine.scheduler.num_preemptions > 0, "the tight pool must force preemption"
    assert_all_free(llm.engine)


@pytest.fixture(scope="module")
def llm(hf_and_folder):
    return LLM(str(hf_and_folder[1]), device="cpu")


def mixed_requests(prompts):
    """16 requests of every kind: greedy, sampled, penalised, n > 1, stops."""
    kinds = [
        SamplingParams(max_tokens=9, temperature=0),
        SamplingParams(max_tokens=7, temperature=0.8, top_k=40, seed=3),
        SamplingParams(max_tokens=11, temperature=1.2, top_p=0.9, repetition_penalty=1.3),
        SamplingParams(max_tokens=5, temperature=0.7, n=3, frequency_penalty=0.5),
    ]
    short = prompts[:6]  # up to 64 tokens: the mix matters here, not the length
    return [(short[i % len(short)], kinds[i % len(kinds)]) for i in range(16)]


def test_seeded_request_is_batch_invariant(llm, prompts):
    target = (prompts[3], SamplingParams(max_tokens=15, temperature=1.0, top_k=50, seed=1234))
    alone = llm.generate([target[0]], [target[1]])[0].outputs[0].token_ids
    batch = mixed_requests(prompts)[:8] + [target] + mixed_requests(prompts)[8:]
    together = llm.generate([p for p, _ in batch], [s for _, s in batch])[8].outputs[0].token_ids
    reversed_batch = batch[::-1]
    backwards = llm.generate([p for p, _ in reversed_batch], [s for _, s in reversed_batch])[8].outputs[0].token_ids
    assert alone == together == backwards
    other_seed = SamplingParams(max_tokens=15, temperature=1.0, top_k=50, seed=1235)
    assert llm.generate([target[0]], [other_seed])[0].outputs[0].token_ids != alone
    assert_all_free(llm.engine)


def test_n_samples_share_one_prefill(hf_and_folder):
    folder = hf_and_folder[1]
    engine = Engine(str(folder), device="cpu", enable_prefix_caching=False)
    prompt = torch.randint(0, RUNTIME["vocab_size"], (300,), generator=torch.Generator().manual_seed(9)).tolist()
    computed, peak_blocks = [], 0
    forward = engine._forward

    def counting_forward(batch):
        computed.append(sum(batch.num_new))
        return forward(batch)

    engine._forward = counting_forward
    engine.add_request("r", prompt, SamplingParams(max_tokens=20, n=4, temperature=1.0, seed=5))
    outputs = []
    while engine.has_unfinished():
        outputs = engine.step()
        peak_blocks = max(peak_blocks, engine.pool.num_blocks - engine.pool.num_free)
    samples = outputs[0].outputs
    assert [s.index for s in samples] == [0, 1, 2, 3] and all(len(s.token_ids) == 20 for s in samples)
    assert len({tuple(s.token_ids) for s in samples}) == 4, "different sample indexes draw different tokens"
    assert computed[0] == 300 and sum(computed) == 300 + 4 * 19, "one prefill, then one token per sample per step"
    separate = 4 * -(-(300 + 20) // 16)
    assert peak_blocks < separate, (peak_blocks, separate)
    assert_all_free(engine)


def test_prefix_cache_hit_across_requests(hf_and_folder, llm, prompts):
    shared = prompts[6][:64]  # 64 tokens = 4 full blocks
    before = llm.engine.pool.hit_blocks
    llm.generate(shared + [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    second = llm.generate(shared + [4, 5], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
    assert llm.engine.pool.hit_blocks - before >= 4
    uncached = LLM(str(hf_and_folder[1]), device="cpu", enable_prefix_caching=False)
    expected = uncached.generate(shared + [4, 5], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0]
    assert second == expected.token_ids
    assert_all_free(llm.engine)


def test_aborts_mid_generation_free_everything(llm, prompts):
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", p, SamplingParams(max_tokens=30, n=1 + i % 3, temperature=1.0))
    for _ in range(3):
        engine.step()
    for i in range(0, len(prompts), 2):
        engine.abort(f"abort-{i}")
    engine.scheduler.check()
    with pytest.raises(ValueError, match="unknown request id 'abort-0'"):
        engine.abort("abort-0")
    finished = set()
    while engine.has_unfinished():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {f"abort-{i}" for i in range(1, len(prompts), 2)}
    assert_all_free(engine)


def test_context_limit_clamps_with_length(llm):
    out = llm.generate([3] * 500, SamplingParams(max_tokens=40, temperature=0))[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_logprobs_equal_the_one_pass_distribution(llm, prompts):
    prompt = prompts[4]
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.9, seed=2, logprobs=3))[0].outputs[0]
    full = torch.log_softmax(llm.logits(prompt + out.token_ids[:-1]), dim=-1)  # (T, V)
    total = 0.0
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = full[len(prompt) - 1 + i]
        top = torch.topk(row, 3)
        assert set(entry) == {token} | set(top.indices.tolist())
        for t, lp in entry.items():
            assert lp == pytest.approx(row[t].item(), abs=1e-4)
        total += row[token].item()
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_engine_bad_input(llm):
    engine = llm.engine
    engine.add_request("dup", [1], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="request id 'dup' must be a string not already in use"):
        engine.add_request("dup", [2], SamplingParams(max_tokens=1))
    engine.abort("dup")
    with pytest.raises(ValueError, match="n=65 samples cannot run at once with max_num_seqs=64"):
        engine.add_request("many", [1], SamplingParams(n=65))
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(ValueError, match="token id 777 is outside"):
        llm.generate([[1], [777]])
    with pytest.raises(ValueError, match="cannot hold one full-context sequence"):
        Engine('random:{"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 64}', kv_cache_tokens=32)
    assert_all_free(engine)


# Stop strings need real text: a random model over GPT-2's own vocabulary.
GPT2_VOCAB = 'random:{"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128}'


@pytest.fixture(scope="module")
def text_llm():
    return LLM(GPT2_VOCAB, device="cpu", seed=3)


def test_stop_string_split_across_tokens_is_found_and_trimmed(text_llm):
    greedy = dict(max_tokens=30, temperature=0, ignore_eos=True)
    free = text_llm.generate("The dog on the ship", SamplingParams(**greedy))[0].outputs[0]
    pieces = [text_llm.tokenizer.decode([t]) for t in free.token_ids]
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]  # spans the boundary between tokens i and i + 1
    cut = free.text.find(stop)
    out = text_llm.generate("The dog on the ship", SamplingParams(stop=[stop, "\x00never"], **greedy))[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (free.text[:cut], "stop", stop)
    assert out.token_ids == free.token_ids[: len(out.token_ids)] and len(out.token_ids) <= i + 2
    streamed = "".join(text_llm.stream("The dog on the ship", SamplingParams(stop=stop, **greedy)))
    assert streamed == out.text, "a stream never shows text that a stop string later removes"


def test_stop_token_ids(text_llm):
    free = text_llm.generate("Hello", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    stop_token = free.token_ids[4]
    k = free.token_ids.index(stop_token)
    out = text_llm.generate("Hello", SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_token],
                                                    ignore_eos=True))[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (free.token_ids[: k + 1], "stop", stop_token)
    assert out.text == text_llm.tokenizer.decode(free.token_ids[:k])


def test_stream_pieces_join_to_the_generated_text(text_llm):
    params = SamplingParams(max_tokens=25, temperature=1.0, seed=11)
    pieces = list(text_llm.stream("Once upon a time", params))
    assert len(pieces) > 5
    assert "".join(pieces) == text_llm.generate("Once upon a time", params)[0].outputs[0].text
    assert_all_free(text_llm.engine)


def test_abandoned_stream_frees_its_blocks(text_llm):
    stream = text_llm.stream("Once upon a time", SamplingParams(max_tokens=50, temperature=1.0, seed=1))
    next(stream)
    stream.close()
    assert_all_free(text_llm.engine)


def test_progress_bar_for_big_offline_batches(text_llm, capsys):
    text_llm.generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=True)
    assert "generating" in capsys.readouterr().err
    text_llm.generate(["a", "b"], SamplingParams(max_tokens=2))  # small batches stay quiet by default
    assert "generating" not in capsys.readouterr().err


def test_pool_sized_from_tokens_or_a_memory_fraction():
    model = 'random:{"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 64}'
    assert Engine(model, kv_cache_tokens=100, block_size=16).pool.num_blocks == 7
    by_fraction = Engine(model, kv_cache_memory_fraction=0.001, block_size=16)
    bytes_per_block = 2 * 1 * 16 * 8 * 4  # K and V, 1 layer, 16 tokens, 8 wide, fp32
    assert by_fraction.pool.num_blocks * bytes_per_block > 2**20, "0.1% of this machine's free memory is over 1 MiB"
    with pytest.raises(ValueError, match="kv_cache_memory_fraction must be in"):
        Engine(model, kv_cache_memory_fraction=1.5)
    with pytest.raises(ValueError, match="not both"):
        Engine(model, kv_cache_tokens=64, kv_cache_memory_fraction=0.5)


def test_the_default_cpu_pool_holds_a_full_context_per_sequence_up_to_eight():
    """Pages of the cache are touched as blocks are used and the prefix cache's LRU reaches every block in a
    long run, so the default is what the batch can use: min(max_num_seqs, 8) contexts (RSS follows the model)."""
    model = 'random:{"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 40}'
    blocks_per_context = 3  # 40 tokens in blocks of 16
    for seqs, contexts in ((1, 1), (3, 3), (8, 8), (64, 8)):
        engine = Engine(model, max_num_seqs=seqs, block_size=16, device="cpu")
        assert engine.pool.num_blocks == contexts * blocks_per_context, seqs
    assert Engine(model, max_num_seqs=1, kv_cache_tokens=500, device="cpu").pool.num_blocks == 32


def test_a_kv_cache_larger_than_memory_is_refused_before_allocating():
    model = 'random:{"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}'
    with open("/proc/meminfo") if os.path.exists("/proc/meminfo") else open(os.devnull) as f:
        avail = next((int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:")), 2**40)
    bytes_per_token = 2 * 2 * 32 * 4  # K and V, 2 layers, 32 wide, fp32
    for tokens in (10**12, 2 * avail // bytes_per_token):
        start = time.perf_counter()
        says = (f"^kv_cache_tokens={tokens} does not fit in memory: its KV cache needs [\\d,.]+ GiB, and [\\d,.]+ GiB "
                "of cpu memory is free; lower kv_cache_tokens$")
        with pytest.raises(ValueError, match=says):
            Engine(model, kv_cache_tokens=tokens)
        assert time.perf_counter() - start < 30  # no attempt to allocate (or touch) the pages
    assert Engine(model, kv_cache_tokens=avail // bytes_per_token // 1000).pool.num_blocks > 64


def test_a_too_small_memory_fraction_is_named_as_the_cause():
    model = 'random:{"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 64}'
    for fraction in (1e-15, 1e-12):
        with pytest.raises(ValueError) as e:
            Engine(model, kv_cache_memory_fraction=fraction)
        message = str(e.value)
        assert message.startswith(f"kv_cache_memory_fraction={fraction:g} of ") and "kv_cache_tokens" not in message
        assert message.endswith("cannot hold one full-context sequence (64 tokens, 4 blocks of 16; it gives 0); "
                                "raise kv_cache_memory_fraction"), message
