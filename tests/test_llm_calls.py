"""``LLM`` calls that overlap or fail: every stream and generate gets all of its own outputs whoever steps the
engine, and a call that fails or is dropped leaves nothing queued. References are the same prompts generated
alone (greedy, so the text is a function of the prompt), on the same LLM before the overlapping calls."""

from __future__ import annotations

import gc

import pytest
import torch

from gpt2fast import LLM, SamplingParams
from gpt2fast.engine import Engine
from gpt2fast.sampling import MAX_LOGPROBS

MODEL = 'random:{"n_layer": 2, "n_embd": 32, "n_head": 2}'
LONG = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, device="cpu", max_num_seqs=4)


def alone(llm: LLM, prompt, params: SamplingParams = LONG) -> str:
    return llm.generate(prompt, params)[0].outputs[0].text


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished()
    engine.scheduler.check()
    assert engine.pool.num_free == engine.pool.num_blocks
    assert not llm._outputs  # nothing kept for calls that have ended


def test_a_paused_stream_keeps_what_a_generate_produced_for_it(llm):
    want_alpha, want_beta = alone(llm, "Alpha"), alone(llm, "Beta", SHORT)
    it = llm.stream("Alpha", LONG)
    first = next(it)
    beta = llm.generate("Beta", SHORT)[0].outputs[0].text  # steps the engine: Alpha advances too
    assert beta == want_beta
    assert first + "".join(it) == want_alpha and len(want_alpha) > 20
    assert_idle(llm)


def test_interleaved_streams_and_a_batch_each_get_every_piece(llm):
    prompts = ["One fish", "Two fish", [464, 3290, 319], "Red fish"]
    want = [alone(llm, p) for p in prompts]
    streams = [llm.stream(p, LONG) for p in prompts[:3]]
    got = ["", "", ""]
    for step in range(6):  # round-robin a few pieces from each
        for i, it in enumerate(streams):
            got[i] += next(it, "")
        if step == 2:
            assert llm.generate(prompts[3], LONG)[0].outputs[0].text == want[3]
    for i, it in enumerate(streams):
        got[i] += "".join(it)
    assert got == want[:3]
    assert_idle(llm)


@pytest.mark.parametrize("drop", ["close", "garbage"])
def test_a_dropped_stream_aborts_its_request_and_forgets_its_outputs(llm, drop):
    want = alone(llm, "Kept")
    kept, dropped = llm.stream("Kept", LONG), llm.stream("Dropped", LONG)
    head = next(kept)
    next(dropped)
    assert len(llm._outputs) == 2 and llm.engine.has_unfinished()
    if drop == "close":
        dropped.close()
    else:
        del dropped
        gc.collect()
    assert list(llm._outputs) == [k for k in llm.engine._requests]  # only the kept stream's request is left
    assert head + "".join(kept) == want
    assert_idle(llm)


def test_a_stream_finalised_inside_another_calls_step_is_aborted_after_that_step(llm, monkeypatch):
    """The garbage collector may close a dropped stream (one caught in a reference cycle) at any allocation,
    also in the middle of ``engine.step()``: its abort must wait until the step is over."""
    want = alone(llm, "Busy", SHORT)
    doomed = llm.stream("Doomed", LONG)
    next(doomed)
    real_step, seen = llm.engine.step, []

    def step_that_collects():
        outputs = real_step()
        if not seen:
            seen.append(len(llm.engine._requests))
            doomed.close()  # what a collection inside the step would do
            seen.append(len(llm.engine._requests))  # not aborted yet: the step still runs
        return outputs

    monkeypatch.setattr(llm.engine, "step", step_that_collects)
    assert llm.generate("Busy", SHORT)[0].outputs[0].text == want
    assert seen == [2, 2]
    assert_idle(llm)


@pytest.mark.parametrize("bad", [
    pytest.param(SamplingParams(n=10**6), id="n-beyond-max_num_seqs"),
    pytest.param("not params", id="params-not-SamplingParams"),
])
def test_a_generate_that_raises_on_its_params_queues_nothing(llm, bad):
    want = alone(llm, "a", SHORT)
    with pytest.raises(ValueError, match="n=1000000|SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=50), bad])
    assert_idle(llm)
    out = llm.generate("a", SHORT)  # no orphan runs inside the next call
    assert [o.outputs[0].text for o in out] == [want]
    assert_idle(llm)


@pytest.mark.parametrize("bad_prompt", [[1, 2, 10**6], 3.5], ids=["id-out-of-vocab", "float"])
def test_a_generate_that_raises_on_a_prompt_queues_nothing(llm, bad_prompt):
    with pytest.raises(ValueError, match="vocabulary|prompt must be"):
        llm.generate(["fine", bad_prompt], SHORT)
    assert_idle(llm)


def test_a_generate_that_fails_midway_aborts_its_requests_and_spares_a_stream(llm, monkeypatch):
    want = alone(llm, "Survivor")
    it = llm.stream("Survivor", LONG)
    head = next(it)
    real_step, calls = llm.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C inside generate
        return real_step()

    monkeypatch.setattr(llm.engine, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["x", "y"], LONG)
    monkeypatch.setattr(llm.engine, "step", real_step)
    assert len(llm.engine._requests) == 1  # the stream's, not generate's
    assert head + "".join(it) == want
    assert_idle(llm)


def test_engine_add_requests_checks_all_before_queuing_any():
    engine = Engine(MODEL, device="cpu", max_num_seqs=2)
    engine.add_request("taken", [1, 2], SHORT)
    cases = [
        ([("a", [1], SHORT), ("b", [1], SamplingParams(n=3))], "n=3 samples"),
        ([("a", [1], SHORT), ("taken", [1], SHORT)], "already in use"),
        ([("a", [1], SHORT), ("a", [2], SHORT)], "given twice"),
        ([("a", [1], SHORT), (7, [2], SHORT)], "must be a string"),
        ([("a", [1], SHORT), ("b", "", None), ("c", [10**9], SHORT)], "vocabulary"),
    ]
    for requests, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add_requests(requests)
        assert list(engine._requests) == ["taken"] and len(engine.scheduler.waiting) == 1, message
    engine.add_requests([("a", [1], SHORT), ("b", "Hi", None)])
    assert list(engine._requests) == ["taken", "a", "b"]


def test_top_n_beyond_a_tiny_vocabulary_gives_all_of_it():
    """logprobs / prompt-scoring top-N larger than the vocabulary: every token, likeliest first (no crash in step)."""
    llm = LLM('random:{"n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 8, "n_positions": 16}', device="cpu")
    ids = [1, 2, 3, 5]
    logp = torch.log_softmax(llm.logits(ids).double(), dim=-1)  # (T, 8): row i scores token i + 1
    llm.engine.add_scoring_request("s", ids, top_n=10)
    (scored,) = llm.engine.step()
    assert scored.finished and [len(e) for e in scored.prompt_logprobs[1:]] == [8, 8, 8]
    assert scored.prompt_logprobs[2] == pytest.approx(dict(enumerate(logp[1].tolist())), abs=1e-5)
    out = llm.generate(ids, SamplingParams(max_tokens=2, temperature=0, logprobs=MAX_LOGPROBS))[0].outputs[0]
    assert [len(entry) for entry in out.logprobs] == [8, 8]
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
