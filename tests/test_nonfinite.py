"""A request whose logits go non-finite fails alone, with a clear error; its batch-mates go on unchanged.

The weights are poisoned after load: one row of the position embedding (``wpe``) becomes NaN, so exactly
the sequences that reach that position go NaN (the LM head, tied to ``wte``, stays finite for everyone
else). References: the same prompts on an unpoisoned copy of the model (seeded, so batch-invariant).
"""

from __future__ import annotations

import asyncio
import json
import math
import re

import httpx
import pytest
import torch

from gpt2fast import LLM, GenerationError, SamplingParams
from gpt2fast.sampling import SampleRow, sample_batch
from tests.serverproc import running

MODEL = 'random:{"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 1024}'  # a fast sampler
POISONED = 24  # the position whose embedding is NaN
SHORT = [464, 329, 319]  # reaches position 3 + 8 - 1: finite
OTHER = [17, 900, 3, 5]
LONG = list(range(100, 100 + POISONED + 6))  # its prefill covers the poisoned position: fails at once
CROSSING = list(range(200, 200 + POISONED - 2))  # generates tokens at 22, 23, 24, then fails
PARAMS = {  # each goes down a different sampling path of Engine._sample
    "greedy": dict(temperature=0),  # fused LM-head argmax
    "temperature": dict(temperature=0.8),  # fused LM-head Gumbel draw
    "top_p": dict(temperature=0.9, top_p=0.8),  # the backend's top-k/top-p sampler on written logits
    "logprobs": dict(temperature=0.7, logprobs=2),  # sample_batch
    "penalties": dict(temperature=0.7, presence_penalty=0.5, repetition_penalty=1.2),  # sample_batch
}


def poison(llm: LLM) -> LLM:
    with torch.no_grad():
        llm.model.wpe.weight[POISONED, 0] = float("nan")
    return llm


@pytest.fixture(scope="module")
def clean() -> LLM:
    return LLM(MODEL, device="cpu")


@pytest.fixture(scope="module", params=[False, True], ids=["dynamic", "decode-runner"])
def poisoned(request) -> LLM:
    # A small pool: blocks that held NaN K/V are soon reused by the next requests.
    return poison(LLM(MODEL, device="cpu", cuda_graphs=request.param, kv_cache_tokens=192, max_num_seqs=4))


def assert_same(got: list, want: list) -> None:
    """Same tokens, text and finish; logprobs equal to fp32 rounding (a batch's shape changes the sums' order)."""
    for g, w in zip(got, want, strict=True):
        (a,), (b,) = g.outputs, w.outputs
        assert (a.token_ids, a.text, a.finish_reason, a.error) == (b.token_ids, b.text, b.finish_reason, None)
        if b.logprobs is not None:
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert x.keys() == y.keys() and list(x.values()) == pytest.approx(list(y.values()), abs=1e-5)


def assert_idle(llm: LLM) -> None:
    llm.engine.scheduler.check()
    assert not llm.engine.has_unfinished() and llm.engine.pool.num_free == llm.engine.pool.num_blocks


@pytest.mark.parametrize("kind", list(PARAMS))
def test_only_the_requests_that_go_nan_fail_and_their_batch_mates_finish_unchanged(clean, poisoned, kind):
    params = SamplingParams(max_tokens=8, seed=5, ignore_eos=True, **PARAMS[kind])
    want = clean.generate([SHORT, OTHER], params)
    with pytest.raises(GenerationError, match=r"not finite \(NaN or infinity\) for request 'llm-\d+'") as caught:
        poisoned.generate([SHORT, LONG, OTHER, CROSSING], params)
    short, long, other, crossing = caught.value.outputs
    assert_same([short, other], want)
    assert long.outputs[0].finish_reason == "error" and long.outputs[0].token_ids == []
    assert crossing.outputs[0].finish_reason == "error" and len(crossing.outputs[0].token_ids) == 3
    assert "position 25" in crossing.error and "1 more" in str(caught.value)
    assert_idle(poisoned)
    # The blocks the failed requests filled with NaN go to the next requests, which stay exact.
    assert_same(poisoned.generate([SHORT, OTHER] * 2, params), want * 2)
    assert_idle(poisoned)


def test_a_stream_that_goes_nan_yields_what_it_had_then_raises(clean, poisoned):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = clean.generate(CROSSING, params)[0].outputs[0].text
    pieces = []
    with pytest.raises(GenerationError, match="not finite"):
        for piece in poisoned.stream(CROSSING, params):
            pieces.append(piece)
    assert want.startswith("".join(pieces)) and pieces
    assert_idle(poisoned)


def test_n_samples_of_a_nan_request_all_end_with_the_error(poisoned):
    with pytest.raises(GenerationError) as caught:
        poisoned.generate(LONG, SamplingParams(n=3, max_tokens=4, seed=1))
    assert [s.finish_reason for s in caught.value.outputs[0].outputs] == ["error"] * 3
    assert_idle(poisoned)


def test_scoring_a_prompt_that_goes_nan_fails_alone(clean, poisoned):
    engine = poisoned.engine
    engine.add_scoring_request("nan", LONG, top_n=2)
    engine.add_scoring_request("fine", SHORT, top_n=2)
    engine.add_request("gen", OTHER, SamplingParams(max_tokens=4, temperature=0))
    done = {}
    while engine.has_unfinished():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    assert done["nan"].outputs[0].finish_reason == "error" and "while scoring its prompt" in done["nan"].error
    want = torch.log_softmax(clean.logits(SHORT).double(), dim=-1)
    got = done["fine"].prompt_logprobs
    assert [got[i][SHORT[i]] for i in (1, 2)] == pytest.approx([want[i - 1, SHORT[i]].item() for i in (1, 2)],
                                                               abs=1e-5)
    assert done["gen"].outputs[0].token_ids == clean.generate(OTHER, SamplingParams(max_tokens=4, temperature=0))[0] \
        .outputs[0].token_ids
    assert_idle(poisoned)


@pytest.mark.parametrize("kind", ["greedy", "temperature"])
def test_a_hidden_row_holding_minus_inf_is_an_error_where_the_logits_are_never_written(clean, kind):
    """The fused LM head checks the hidden rows: -inf there is as wrong as NaN (in logits it masks a token)."""
    hidden = torch.randn(3, clean.config.n_embd, generator=torch.Generator().manual_seed(0))  # (3, C)
    hidden[1, 3] = -math.inf
    rows = [SampleRow(SamplingParams(seed=s, **PARAMS[kind]), s, 0, 0) for s in (1, 2, 3)]
    got = clean.engine._sample(hidden, rows)
    want = clean.engine._sample(hidden[[0, 2]], [rows[0], rows[2]])  # the finite rows alone
    assert (got[1].token_id, got[1].error) == (-1, "the model's logits are not finite (NaN or infinity)")
    assert [(t.token_id, t.error) for t in (got[0], got[2])] == [(t.token_id, None) for t in want]


BAD_VALUES = [math.nan, math.inf]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf"])
def test_sample_batch_gives_a_bad_row_an_error_and_the_others_their_tokens(bad):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 97, generator=gen)  # (B, V)
    logits[1, 7] = bad
    logits[3] = bad
    logits[4, :50] = -math.inf  # masked tokens are not an error
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.8, top_k=5),
              SamplingParams(logprobs=3, temperature=0.5), SamplingParams(presence_penalty=1.0),
              SamplingParams(temperature=0.7, min_p=0.05, logprobs=1)]
    rows = [SampleRow(p, seed=11, sample_index=0, step=2, output_ids=[1, 2]) for p in params]
    got = sample_batch(logits, rows)
    assert [t.error is not None for t in got] == [False, True, False, True, False]
    assert got[1].token_id == got[3].token_id == -1 and "not finite" in got[1].error
    good = [0, 2, 4]
    alone = sample_batch(logits[good], [rows[b] for b in good])
    assert [got[b] for b in good] == alone
    greedy = sample_batch(logits, [SampleRow(SamplingParams(temperature=0), 0, 0, 0)] * 5)  # the fast path
    assert [t.error is not None for t in greedy] == [False, True, False, True, False]


# ---- served: the request that goes NaN gets a clear error, its batch-mates their normal answers -----------------

SERVE = ("serve", "--model", MODEL, "--cpu-threads", "1", "--max-num-seqs", "8")


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, dict | list[dict]]:
    """Status and JSON body; for a stream, its parsed events (the ``[DONE]`` sentinel as the string)."""
    body = {"model": MODEL, **body}
    if not body.get("stream"):
        r = await client.post(url + "/v1/completions", json=body)
        return r.status_code, r.json()
    events = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line:
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return r.status_code, events


def test_a_served_request_that_goes_nan_fails_alone_with_a_clear_error(clean, monkeypatch):
    good = [  # logprobs, top_p and penalties: what used to fail the whole batch with a 500
        dict(prompt=SHORT, max_tokens=16, logprobs=2, temperature=0, ignore_eos=True),
        dict(prompt=OTHER, max_tokens=16, top_p=0.8, seed=3, ignore_eos=True),
        dict(prompt=SHORT, max_tokens=16, presence_penalty=0.5, seed=4, ignore_eos=True),
        dict(prompt=OTHER, max_tokens=16, temperature=0, stream=True, ignore_eos=True),
    ]
    bad = [dict(prompt=LONG, max_tokens=4, logprobs=2),
           dict(prompt=CROSSING, max_tokens=8, top_p=0.9, seed=1, stream=True),
           dict(prompt=LONG, max_tokens=0, echo=True, logprobs=1)]  # scoring the prompt goes NaN
    monkeypatch.setenv("POISON_WPE_ROW", str(POISONED))
    with running(*SERVE, module="tests.poisoned_serve") as server:
        async def run() -> list:
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*[_post(c, server.url, body) for body in bad + good])
        (long_status, long_body), (cross_status, cross_events), (echo_status, echo_body), *answers = asyncio.run(run())
        health = httpx.get(server.url + "/health", timeout=10)
        log = server.output()
    assert long_status == 500 and long_body["error"]["code"] == "nonfinite_logits"
    assert re.fullmatch(r"the model's logits are not finite \(NaN or infinity\) for request 'cmpl-\w+-0' when "
                        r"choosing its token at position 30; it was stopped", long_body["error"]["message"])
    assert echo_status == 500 and echo_body["error"]["code"] == "nonfinite_logits"
    assert "while scoring its prompt" in echo_body["error"]["message"]
    assert cross_status == 200 and cross_events[-1] == "[DONE]"
    assert "not finite" in cross_events[-2]["error"]["message"]
    for body, (status, answer) in zip(good, answers):
        extra = {k: body[k] for k in ("logprobs", "top_p", "presence_penalty", "seed") if k in body}
        temperature = body.get("temperature", 1.0)
        want = clean.generate(body["prompt"], SamplingParams(max_tokens=16, ignore_eos=True, temperature=temperature,
                                                             **extra))[0].outputs[0]
        assert status == 200, answer
        if body.get("stream"):
            assert answer[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in answer[:-1]) == want.text
        else:
            assert answer["choices"][0]["text"] == want.text and answer["choices"][0]["finish_reason"] == "length"
    assert health.status_code == 200 and "Traceback" not in log
