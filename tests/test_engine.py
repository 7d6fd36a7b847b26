"""LLM: bad input gets a clear ValueError; generation ends for the right reason."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time

import pytest
import torch
from conftest import TINY

from gpt2fast import LLM, SamplingParams
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.sampling import SampleRow, sample_batch
from tests.stop_strings import stops_completing_together


@pytest.fixture(scope="module")
def tiny(hf_folder):
    return LLM(str(hf_folder(TINY)[1]), device="cpu")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda llm: llm.logits([5, 1000]), r"token id 1000 is outside the model's vocabulary \(0..999\)"),
        (lambda llm: llm.logits([-1]), "token id -1 is outside"),
        (lambda llm: llm.logits([]), "token_ids is empty"),
        (lambda llm: llm.logits([1] * 65), "the prompt has 65 tokens; the model's context is 64"),
        (lambda llm: llm.generate([1] * 65), "the prompt has 65 tokens"),
        (lambda llm: llm.generate("Hello world"), "token id 15496 is outside"),  # GPT-2 BPE ids beyond a tiny vocab
        (lambda llm: llm.generate([1.5, 2]), "a prompt must be a string or a list of token ids"),
        (lambda llm: llm.generate([]), "no prompts given"),
        (lambda llm: llm.generate([1], {"max_tokens": 3}), "params must be a SamplingParams"),
        (lambda llm: llm.generate(""), re.escape("unconditional generation starts from <|endoftext|>")),
        (lambda llm: llm.logits([1.7]), "token ids must be integers, got 1.7"),
        (lambda llm: llm.logits([True]), "token ids must be integers, got True"),
        (lambda llm: llm.logits("abc"), "token_ids must be a list of token ids"),
        (lambda llm: llm.generate(None), "prompts must be a string"),
    ],
)
def test_bad_input(tiny, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="tpu"), "unknown backend 'tpu'"),
        (dict(dtype="int8"), "unsupported dtype 'int8'"),
        (dict(device="tpu"), "unknown device 'tpu'|not supported"),
        (dict(block_size=0), "block_size must be a positive integer"),
    ],
)
def test_bad_construction(hf_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(hf_folder(TINY)[1]), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(hf_folder):
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        LLM(str(hf_folder(TINY)[1]), device="cuda")


def test_unconditional_generation_starts_from_endoftext():
    llm = LLM('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}', device="cpu")
    out = llm.generate("", SamplingParams(max_tokens=4, seed=3))[0]
    assert out.prompt_token_ids == [50256]
    assert len(out.outputs[0].token_ids) == 4


def test_stops_at_the_end_token(hf_folder, tmp_path):
    """With eos set to a token greedy decoding emits later, generation stops there with reason 'stop'."""
    _, folder = hf_folder(TINY)
    prompt = [4, 8, 15, 16, 23, 42]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    tokens = LLM(str(folder), device="cpu").generate(prompt, greedy)[0].outputs[0].token_ids
    k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])  # first token not seen before
    eos = tokens[k]
    copy = shutil.copytree(folder, tmp_path / "eos")
    config = json.loads((copy / "config.json").read_text()) | {"eos_token_id": eos}
    (copy / "config.json").write_text(json.dumps(config))
    llm = LLM(str(copy), device="cpu")
    out = llm.generate(prompt, greedy)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == (tokens[: k + 1], "stop")
    assert out.text == llm.tokenizer.decode(tokens[:k])  # the end token is not text
    ignoring = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    assert (ignoring.token_ids, ignoring.finish_reason) == (tokens, "length")


def test_stops_at_the_context_limit(tiny):
    out = tiny.generate([7] * 61, SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_generation_never_recomputes_earlier_tokens(tiny):
    """One forward over the prompt, then exactly one new token per step; every block back afterwards."""
    engine = tiny.engine
    hidden, computed = engine.model.hidden, []

    def counting_hidden(input_ids, *args):
        computed.append(len(input_ids))
        return hidden(input_ids, *args)

    engine.model.hidden = counting_hidden
    try:
        out = tiny.generate([5] * 23, SamplingParams(max_tokens=9, temperature=0))[0]
    finally:
        del engine.model.hidden
    assert len(out.outputs[0].token_ids) == 9
    assert computed == [23] + [1] * 8
    engine.pool.check([])
    assert engine.pool.num_free == engine.pool.num_blocks


def test_seeded_sampling_is_reproducible(tiny):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, seed=1234)
    first = tiny.generate([[1, 2, 3], [9, 9]], params)
    again = tiny.generate([[9, 9], [1, 2, 3]], params)
    assert first[0].outputs[0].token_ids == again[1].outputs[0].token_ids
    assert first[1].outputs[0].token_ids == again[0].outputs[0].token_ids


def test_triton_without_gpu_or_interpreter_is_refused(monkeypatch):
    """On a CPU machine an explicit backend='triton' needs the interpreter; without it, a clear error."""
    from gpt2fast.ops import get_ops
    from gpt2fast.ops import triton as triton_backend

    monkeypatch.setattr(triton_backend, "available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU, or TRITON_INTERPRET=1"):
        get_ops("triton", torch.device("cpu"))
    assert get_ops("auto", torch.device("cpu")).name == "cpu"  # the native CPU kernels, not triton


def spy_lm_head(monkeypatch, engine) -> list[str]:
    """Record which LM-head op each step calls."""
    ops, calls = engine.model.ops, []

    def spy(name):
        op = getattr(ops, name)
        return lambda *args: (calls.append(name), op(*args))[1]

    names = ("lm_head", "lm_head_argmax", "lm_head_gumbel", "sample_top_k_top_p")
    monkeypatch.setattr(engine.model, "ops", dataclasses.replace(ops, **{n: spy(n) for n in names}))
    return calls


@pytest.mark.parametrize(
    "params, op",
    [
        ([SamplingParams(temperature=0)], "lm_head_argmax"),
        ([SamplingParams(temperature=0.9, top_k=1)], "lm_head_argmax"),
        ([SamplingParams(temperature=0.7)], "lm_head_gumbel"),
        ([SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=-1)], "lm_head_gumbel"),
        ([SamplingParams(temperature=0.7, top_p=0.9)], "lm_head+sampler"),
        ([SamplingParams(temperature=0.7, min_p=0.1)], "lm_head+sampler"),
        ([SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0)], "lm_head+sampler"),
        ([SamplingParams(temperature=0, logprobs=0)], "lm_head"),
        ([SamplingParams(temperature=0, repetition_penalty=1.2)], "lm_head"),
        ([SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.7, presence_penalty=0.5)], "lm_head"),
    ],
)
def test_the_lm_head_picks_the_token_when_no_processor_needs_logits(tiny, monkeypatch, params, op):
    """Fused choice without logits; filters only: logits + the backend's sampler; else logits + sample_batch."""
    calls = spy_lm_head(monkeypatch, tiny.engine)
    params = [dataclasses.replace(p, max_tokens=3, seed=5) for p in params]
    tiny.generate([[1, 2, 3]] * len(params), params)
    expected = ["lm_head", "sample_top_k_top_p"] if op == "lm_head+sampler" else [op]
    assert calls == expected * 3


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9, seed=77), SamplingParams(temperature=0, seed=1)])
def test_fused_choices_equal_the_sampler_on_full_sequence_logits(tiny, params):
    """The fused draw of every step is the token ``sample_batch`` picks from a one-pass recomputation."""
    prompt, steps = [3, 1, 4, 1, 5], 8
    params = dataclasses.replace(params, max_tokens=steps, ignore_eos=True)
    got = tiny.generate([prompt], params)[0].outputs[0].token_ids
    expected: list[int] = []
    for step in range(steps):
        logits = tiny.logits(prompt + expected)[-1:]  # (1, V)
        expected.append(sample_batch(logits, [SampleRow(params, params.seed, 0, step)])[0].token_id)
    assert got == expected


def test_block_tables_have_one_fixed_width(tiny, monkeypatch):
    """Every step pads its block tables to n_positions / block_size, so decode grids depend on the batch size alone."""
    engine, widths = tiny.engine, []
    hidden = engine.model.hidden

    def recording_hidden(input_ids, positions, cache, meta):
        widths.append(meta.block_tables.shape[1])
        return hidden(input_ids, positions, cache, meta)

    monkeypatch.setattr(engine.model, "hidden", recording_hidden)
    tiny.generate([[1] * 3, [2] * 40], SamplingParams(max_tokens=4, temperature=0))
    assert widths and set(widths) == {-(-engine.config.n_positions // engine.block_size)}
    with pytest.raises(ValueError, match="more than max_blocks=2"):
        AttentionMetadata.build([[0, 1, 2]], [40], [1], block_size=16, max_blocks=2)


def test_extreme_but_legal_top_k_and_top_p_in_one_batch(tiny):
    """top_k >= the vocabulary is off (also past int32), a top_p below fp32's smallest subnormal keeps the most
    likely token: each row equals what it draws alone with the plain equivalent (top_k=0; greedy)."""
    vocab, prompts = tiny.engine.config.vocab_size, [[1, 2, 3], [4, 5], [6]]

    def alone(prompt: list[int], **fields) -> list[int]:
        return tiny.generate(prompt, SamplingParams(max_tokens=6, **fields))[0].outputs[0].token_ids

    want = [alone(prompts[0], temperature=0.9, top_k=0, seed=8), alone(prompts[1], temperature=0),
            alone(prompts[2], temperature=0, repetition_penalty=1.3)]
    for big_k in (vocab, 2**31, 10**30):
        for tiny_p in (1e-46, 5e-324):
            batch = [SamplingParams(max_tokens=6, temperature=0.9, top_k=big_k, seed=8),
                     SamplingParams(max_tokens=6, temperature=0.8, top_p=tiny_p, seed=9),
                     SamplingParams(max_tokens=6, temperature=1.0, top_p=tiny_p, repetition_penalty=1.3, seed=3)]
            got = [r.outputs[0].token_ids for r in tiny.generate(prompts, batch)]
            assert got == want, (big_k, tiny_p)
            assert [r.outputs[0].token_ids for r in tiny.generate(prompts[:2], batch[:2])] == want[:2]  # the sampler
    assert tiny.engine.pool.num_free == tiny.engine.pool.num_blocks


STOP_MODEL = 'random:{"n_layer": 1, "n_embd": 32, "n_head": 2}'  # GPT-2's tokenizer: multi-character tokens


def test_the_earliest_stop_string_in_the_text_wins_not_the_first_listed():
    """Generate without stops, then stop at two strings that complete at the same token, listed so that the
    later entry starts earlier: the text ends where the earliest match starts (as OpenAI stops)."""
    llm = LLM(STOP_MODEL, device="cpu")
    for seed in range(20):
        base = dict(max_tokens=40, temperature=1.0, seed=seed)
        free = llm.generate("Once upon a time", SamplingParams(**base))[0].outputs[0]
        found = stops_completing_together(llm.tokenizer, free.text, free.token_ids)
        if found is not None:
            break
    assert found is not None, "no seed generated a usable pair of tokens"
    stops = [found[0], "never-generated-\u2603", found[1]]
    want = free.text[:min(free.text.find(s) for s in stops if s in free.text)]
    out = llm.generate("Once upon a time", SamplingParams(stop=stops, **base))[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (want, "stop", found[1])
    assert out.token_ids == free.token_ids[:len(out.token_ids)]


# ---- vLLM's and OpenAI's extras: min_tokens, logit_bias, best_of, stop-string and special-token text ----------

EOS = 50256  # GPT-2's <|endoftext|>


@pytest.fixture(scope="module")
def gpt2_vocab() -> LLM:
    return LLM(STOP_MODEL, device="cpu")


def greedy_reference(llm: LLM, ids: list[int], steps: int, bias: dict[int, float],
                     banned: dict[int, list[int]] | None = None) -> list[int]:
    """Greedy tokens from full-sequence logits in float64: argmax(logits + bias), ``banned[step]`` set to -inf."""
    out = []
    for step in range(steps):
        logits = llm.logits(ids + out)[-1].double()  # (V,)
        for token, value in bias.items():
            logits[token] += value
        for token in (banned or {}).get(step, []):
            logits[token] = -math.inf
        out.append(int(logits.argmax()))
    return out


def test_min_tokens_bans_the_end_and_stop_tokens_until_reached(gpt2_vocab):
    llm, ids = gpt2_vocab, gpt2_vocab.tokenizer.encode("Hello there")
    to_eos = dict(max_tokens=12, temperature=0, logit_bias={EOS: 100.0})
    assert llm.generate(ids, SamplingParams(**to_eos))[0].outputs[0].token_ids == [EOS]
    out = llm.generate(ids, SamplingParams(**to_eos, min_tokens=4))[0].outputs[0]
    assert out.token_ids == greedy_reference(llm, ids, 4, {EOS: 100.0}, {s: [EOS] for s in range(4)}) + [EOS]
    assert out.finish_reason == "stop" and out.stop_reason is None

    stop = greedy_reference(llm, ids, 1, {})[0]  # the token greedy picks first, made a stop token and favoured
    kw = dict(max_tokens=12, temperature=0, logit_bias={stop: 100.0}, stop_token_ids=[stop], ignore_eos=True)
    assert llm.generate(ids, SamplingParams(**kw))[0].outputs[0].token_ids == [stop]
    out = llm.generate(ids, SamplingParams(**kw, min_tokens=3))[0].outputs[0]
    assert out.token_ids == greedy_reference(llm, ids, 3, {stop: 100.0}, {s: [stop] for s in range(3)}) + [stop]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_min_tokens_writes_the_logits_only_while_it_bans_tokens():
    """Once min_tokens are out, the request (and its batch) goes back to the fused LM head: the decode runner's
    "tokens" mode. The tokens equal those of the dynamic path, which always writes the logits."""
    runner_llm = LLM(STOP_MODEL, device="cpu", cuda_graphs=True)
    modes, runner = [], runner_llm.engine.decode_runner
    run, launch = runner.run, runner.launch  # hidden steps are run; token steps launched (and overlapped)
    runner.run = lambda *a, **kw: modes.append(kw.get("mode")) or run(*a, **kw)
    runner.launch = lambda *a, **kw: modes.append(a[3]) or launch(*a, **kw)
    params = [SamplingParams(max_tokens=8, temperature=0, min_tokens=3), SamplingParams(max_tokens=8, seed=4)]
    got = runner_llm.generate(["A ship", "The dog ran"], params)
    want = LLM(STOP_MODEL, device="cpu").generate(["A ship", "The dog ran"], params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    # decode steps 1..7 of the first request: tokens 1 and 2 are still under min_tokens (banned EOS)
    assert modes[:2] == ["hidden", "hidden"] and set(modes[2:]) == {"tokens"}, modes


def test_min_tokens_with_a_long_stop_list_is_banned_once_per_request_not_per_step(gpt2_vocab):
    """150,000 stop ids (50,000 distinct) under min_tokens for 32 samples: the banned ids are built once per
    request (the old per-row, per-step Python pairs took 13.5 s here, now 0.1 s); the tokens avoid every one."""
    llm, ids = gpt2_vocab, gpt2_vocab.tokenizer.encode("Hello there")
    stops = list(range(50_000)) * 3
    start = time.perf_counter()
    out = llm.generate(ids, SamplingParams(n=32, max_tokens=8, min_tokens=8, temperature=0, stop_token_ids=stops))[0]
    elapsed = time.perf_counter() - start
    want = greedy_reference(llm, ids, 8, {}, {s: list(range(50_000)) + [EOS] for s in range(8)})
    assert [o.token_ids for o in out.outputs] == [want] * 32
    assert elapsed < 4, f"{elapsed:.1f} s"


def test_stop_strings_match_after_min_tokens_and_may_stay_in_the_output(gpt2_vocab):
    """Independent: the free greedy text cut at the first stop string that ends after min_tokens tokens' text."""
    llm, prompt = gpt2_vocab, "The ship sailed"
    base = dict(max_tokens=24, temperature=0, ignore_eos=True)
    free = llm.generate(prompt, SamplingParams(**base))[0].outputs[0]
    stop = llm.tokenizer.decode(free.token_ids[1:2])
    assert stop and stop.isascii() and free.text.count(stop) >= 2, "the test needs a stop string that recurs"
    for min_tokens in (0, 2, 5):
        boundary = len(llm.tokenizer.decode(free.token_ids[:min_tokens]))
        at = free.text.find(stop, max(0, boundary - len(stop) + 1))
        for include in (False, True):
            out = llm.generate(prompt, SamplingParams(**base, stop=stop, min_tokens=min_tokens,
                                                      include_stop_str_in_output=include))[0].outputs[0]
            if at == -1:
                assert (out.text, out.finish_reason) == (free.text, "length")
            else:
                assert out.text == free.text[:at + (len(stop) if include else 0)], (min_tokens, include)
                assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_skip_special_tokens_false_shows_endoftext_and_include_keeps_the_stop_token(gpt2_vocab):
    llm, ids = gpt2_vocab, [464, 3290]
    ignored = dict(max_tokens=3, temperature=0, logit_bias={EOS: 100.0}, ignore_eos=True)
    assert llm.generate(ids, SamplingParams(**ignored))[0].outputs[0].text == ""
    for spaces in (True, False):  # a byte-level BPE puts nothing between special tokens either way
        out = llm.generate(ids, SamplingParams(**ignored, skip_special_tokens=False,
                                               spaces_between_special_tokens=spaces))[0].outputs[0]
        assert out.text == "<|endoftext|>" * 3 and out.token_ids == [EOS] * 3
    stopping = dict(max_tokens=9, temperature=0, logit_bias={EOS: 100.0}, min_tokens=2)
    first_two = llm.tokenizer.decode(greedy_reference(llm, ids, 2, {EOS: 100.0}, {0: [EOS], 1: [EOS]}))
    for include, skip, tail in [(False, False, ""), (True, True, ""), (True, False, "<|endoftext|>")]:
        out = llm.generate(ids, SamplingParams(**stopping, include_stop_str_in_output=include,
                                               skip_special_tokens=skip))[0].outputs[0]
        assert (out.text, out.finish_reason) == (first_two + tail, "stop"), (include, skip)


def test_logit_bias_greedy_equals_the_argmax_of_reference_logits_plus_bias(gpt2_vocab):
    llm, ids = gpt2_vocab, gpt2_vocab.tokenizer.encode("A dog")
    free = greedy_reference(llm, ids, 6, {})
    bias = {free[0]: -100.0, free[2]: -100.0, 318: 4.0, 11: 6.5}
    got = llm.generate(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias=bias))[0]
    assert got.outputs[0].token_ids == greedy_reference(llm, ids, 6, bias)
    assert got.outputs[0].token_ids[0] != free[0]
    forced = llm.generate(ids, SamplingParams(max_tokens=5, temperature=0, logit_bias={995: 100}))[0].outputs[0]
    assert forced.token_ids == [995] * 5 and forced.text == " world" * 5


def test_a_seeded_request_with_logit_bias_draws_the_same_alone_or_beside_others(gpt2_vocab):
    llm = gpt2_vocab
    favoured = range(1000, 1300)  # 300 tokens, OpenAI's limit: strong enough to move a nearly flat distribution
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=7, logit_bias={t: 8.0 for t in favoured})
    alone = llm.generate("Seeded", params)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=6, temperature=0), params,
              SamplingParams(max_tokens=12, top_p=0.5, logprobs=2, seed=3, logit_bias={0: -50.0})]
    batch = llm.generate(["Other one", "Seeded", "A third"], others)
    assert batch[1].outputs[0].token_ids == alone
    unbiased = llm.generate("Seeded", dataclasses.replace(params, logit_bias=None))[0].outputs[0].token_ids
    assert sum(t in favoured for t in alone) >= 8 > sum(t in favoured for t in unbiased)


def cumulative_logprob_float64(llm: LLM, ids: list[int], tokens: list[int]) -> float:
    logprobs = torch.log_softmax(llm.logits(ids + tokens).double(), dim=-1)  # (T, V)
    return sum(logprobs[len(ids) - 1 + i, t].item() for i, t in enumerate(tokens))


def test_best_of_returns_the_n_samples_with_the_highest_cumulative_logprob(gpt2_vocab):
    llm, ids = gpt2_vocab, gpt2_vocab.tokenizer.encode("Best of five")
    kw = dict(max_tokens=8, temperature=1.0, seed=11)
    every = llm.generate(ids, SamplingParams(**kw, n=5))[0].outputs  # the same seeds: the same five samples
    scores = [cumulative_logprob_float64(llm, ids, o.token_ids) for o in every]
    ranked = sorted(range(5), key=lambda i: -scores[i])
    assert scores[ranked[1]] - scores[ranked[2]] > 1e-3, "near-tied samples: pick another seed"
    best = llm.generate(ids, SamplingParams(**kw, n=2, best_of=5))[0]
    assert [o.index for o in best.outputs] == [0, 1]
    assert [o.token_ids for o in best.outputs] == [every[i].token_ids for i in ranked[:2]]
    assert [o.text for o in best.outputs] == [every[i].text for i in ranked[:2]]
    assert [o.cumulative_logprob for o in best.outputs] == pytest.approx([scores[i] for i in ranked[:2]], abs=1e-3)
    assert best.num_generated_tokens == sum(len(o.token_ids) for o in every)
    assert best.outputs[0].logprobs is None  # ranked by logprobs, but none were asked for


def test_a_best_of_request_has_no_partial_output_and_bad_values_raise(gpt2_vocab):
    engine = gpt2_vocab.engine
    engine.add_request("best", [1, 2, 3], SamplingParams(max_tokens=4, n=1, best_of=3, seed=1))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert len(outputs) == 1 and outputs[0].finished and len(outputs[0].outputs) == 1
    assert outputs[0].num_generated_tokens == 12
    with pytest.raises(ValueError, match=r"logit_bias: token id 50257 is outside the model's vocabulary"):
        engine.add_request("bias", [1], SamplingParams(logit_bias={50257: 1.0}))
    with pytest.raises(ValueError, match=r"best_of=65 samples cannot run at once with max_num_seqs=64"):
        engine.add_request("many", [1], SamplingParams(best_of=65))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("prompt, message", [
    ([True, False], r"a prompt must be a string or a list of token ids, got True \(bool\) in a list"),
    ((1, False), r"a prompt must be a string or a list of token ids, got False \(bool\) in a tuple"),
    (b"Hello", r"a prompt must be a string or a list of token ids, got bytes \(decode it to a str first\)"),
    (bytearray(b"\x01\x02"), r"got bytearray \(decode it to a str first\)"),
    ([b"Hi", b"there"], r"got (bytes \(decode it to a str first\)|b'Hi' \(bytes\) in a list)"),  # a batch, or one
])
def test_prompts_that_only_look_like_token_ids_are_refused_by_name(tiny, prompt, message):
    """Bools used to say "got list"; bytes were taken as token ids (b"Hello" -> [72, 101, 108, 108, 111])."""
    for call in (tiny.engine.encode, tiny.generate, lambda p: "".join(tiny.stream(p))):
        with pytest.raises(ValueError, match=message):
            call(prompt)
    assert not tiny.engine.has_unfinished()
