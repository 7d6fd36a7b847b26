"""``gpt2fast serve`` as a real process, driven by the official ``openai`` client; answers checked against ``LLM``.

The server and the offline ``LLM`` load the same seeded random weights, so every seeded or greedy
completion must equal ``LLM.generate`` with the same ``SamplingParams``; logprobs of an echoed
prompt are recomputed here with ``torch.log_softmax(LLM.logits(ids))``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gpt2fast import LLM, SamplingParams
from gpt2fast.engine import Engine
from gpt2fast.server import EngineLoop, make_app
from gpt2fast.server.protocol import token_text
from gpt2fast.server.serve import loopback_host_names
from tests.serverproc import TINY_MODEL, running
from tests.stop_strings import stops_completing_together

# Server and tests share two busy cores: one torch thread each (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "sk-test-server"


@pytest.fixture(scope="module")
def server():
    with running("serve", "--model", TINY_MODEL, "--api-key", KEY, "--max-num-seqs", "16", "--cpu-threads", "1") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(TINY_MODEL, device="cpu")


def complete(client: openai.OpenAI, prompt, **kwargs):
    return client.completions.create(model=TINY_MODEL, prompt=prompt, **kwargs)


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics by name (labels folded into the name as name{k=v})."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def token_texts(llm: LLM, ids: list[int]) -> list[str]:
    return [llm.tokenizer.decode([t]) for t in ids]


def test_health_models_and_chat_is_a_clear_error(server, client):
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY_MODEL]
    assert client.models.retrieve(TINY_MODEL).id == TINY_MODEL
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert "chat template" in e.value.message and "/v1/completions" in e.value.message


def test_seeded_n_samples_with_logprobs_equal_offline_generate(client, llm):
    prompt, kw = "The quick brown fox", dict(max_tokens=11, temperature=0.9, top_p=0.95, n=3, seed=1234, logprobs=2)
    got = complete(client, prompt, **kw)
    ref = llm.generate(prompt, SamplingParams(**kw))[0]
    assert [c.index for c in got.choices] == [0, 1, 2]
    for choice, want in zip(got.choices, ref.outputs):
        assert choice.text == want.text and choice.finish_reason == want.finish_reason
        lp = choice.logprobs
        assert lp.tokens == token_texts(llm, want.token_ids)
        assert lp.token_logprobs == pytest.approx([d[t] for d, t in zip(want.logprobs, want.token_ids)], abs=1e-4)
        for top, entry in zip(lp.top_logprobs, want.logprobs):
            best_two = sorted(entry.items(), key=lambda kv: -kv[1])[:2]
            assert len(top) <= 3 and all(llm.tokenizer.decode([t]) in top for t, _ in best_two)
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert len({c.text for c in got.choices}) > 1, "n samples with one seed must still differ from each other"
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert got.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    assert got.object == "text_completion" and got.model == TINY_MODEL and got.id.startswith("cmpl-")


def test_the_earliest_stop_string_in_the_text_wins(client, llm):
    """Independent of the engine's stop logic: generate without stops, then cut the text where the earliest stop
    starts. The stops complete at the same token; the one listed later spans two tokens and starts earlier."""
    for seed in range(20):
        base = dict(max_tokens=40, temperature=1.0, seed=seed)
        free = llm.generate("Once upon a time", SamplingParams(**base))[0].outputs[0]
        found = stops_completing_together(llm.tokenizer, free.text, free.token_ids)
        if found is not None:
            break
    assert found is not None, "no seed generated a usable pair of tokens"
    stops = [found[0], "never-generated-\u2603", found[1]]
    want = free.text[:min(free.text.find(s) for s in stops if s in free.text)]
    got = complete(client, "Once upon a time", stop=stops, **base).choices[0]
    assert (got.text, got.finish_reason) == (want, "stop")
    chunks = list(complete(client, "Once upon a time", stop=stops, stream=True, **base))
    assert "".join(c.choices[0].text for c in chunks) == want  # held-back text never leaks past the stop
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_streaming_n_with_usage_equals_offline(client, llm):
    kw = dict(max_tokens=9, temperature=0.8, n=2, seed=99, logprobs=1)
    chunks = list(complete(client, "Streaming works", stream=True, stream_options={"include_usage": True}, **kw))
    ref = llm.generate("Streaming works", SamplingParams(**kw))[0]
    texts, tokens, finishes = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        c = chunk.choices[0]
        assert not finishes[c.index], "nothing may follow a choice's finish_reason"
        texts[c.index] += c.text
        tokens[c.index] += c.logprobs.tokens
        if c.finish_reason:
            finishes[c.index].append(c.finish_reason)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    for i, want in enumerate(ref.outputs):
        assert texts[i] == want.text and finishes[i] == [want.finish_reason]
        assert tokens[i] == token_texts(llm, want.token_ids)


def test_raw_sse_is_data_lines_ending_in_done(server, llm):
    body = {"model": TINY_MODEL, "prompt": "Raw", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    want = llm.generate("Raw", SamplingParams(max_tokens=5, temperature=0))[0].outputs[0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason


def test_lists_of_prompts_and_token_ids_index_choices_prompt_major(client, llm):
    kw = dict(max_tokens=6, temperature=1.0, n=2, seed=5)
    texts = ["Hello there", "A"]
    for prompt in (texts, [llm.tokenizer.encode(t) for t in texts]):
        got = complete(client, prompt, **kw)
        ref = llm.generate(prompt, SamplingParams(**kw))
        assert [c.index for c in got.choices] == [0, 1, 2, 3]
        assert [c.text for c in got.choices] == [o.text for r in ref for o in r.outputs]
        assert got.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    single = complete(client, llm.tokenizer.encode("Hello there"), max_tokens=4, temperature=0)
    assert single.choices[0].text == llm.generate("Hello there", SamplingParams(max_tokens=4, temperature=0))[0] \
        .outputs[0].text


def test_echo_scores_the_prompt_against_log_softmax_of_the_logits(client, llm):
    prompt = "The dog on the ship ran away"
    ids = llm.tokenizer.encode(prompt)
    got = complete(client, prompt, max_tokens=0, echo=True, logprobs=3).choices[0]
    assert got.text == prompt and got.finish_reason == "length"
    logp = torch.log_softmax(llm.logits(ids).double(), dim=-1)  # (T, V), recomputed here in float64
    lp = got.logprobs
    assert lp.tokens == token_texts(llm, ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i in range(1, len(ids)):
        top3 = logp[i - 1].topk(3).indices.tolist()
        assert set(token_texts(llm, top3)) <= set(lp.top_logprobs[i]), i
    assert lp.text_offset == [len(llm.tokenizer.decode(ids[:i])) for i in range(len(ids))]

    grown = complete(client, prompt, max_tokens=4, echo=True, temperature=0)
    want_text = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].text
    assert grown.choices[0].text == prompt + want_text and grown.usage.completion_tokens == 4


def test_penalties_and_extra_sampling_fields_equal_offline(client, llm):
    kw = dict(max_tokens=10, temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3, seed=11)
    extra = dict(top_k=20, min_p=0.01, repetition_penalty=1.3)
    got = complete(client, "Penalties apply", extra_body=extra, **kw).choices[0]
    want = llm.generate("Penalties apply", SamplingParams(**kw, **extra))[0].outputs[0]
    assert got.text == want.text and got.finish_reason == want.finish_reason


# ---- vLLM's extensions, logit_bias and best_of: as tools built for vLLM/OpenAI servers send them ----------------


def test_continuous_usage_stats_put_each_choices_counts_in_every_chunk(client, llm):
    """guidellm always sends vLLM's ``continuous_usage_stats``: every chunk carries its choice's prompt and
    completion tokens so far (counted here from the chunks' own logprobs tokens), the last chunk the totals."""
    kw = dict(max_tokens=7, temperature=0.8, n=2, seed=21, logprobs=0)
    ref = llm.generate("Usage counts", SamplingParams(**kw))[0]
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(complete(client, "Usage counts", stream=True, stream_options=options, **kw))
    prompt, seen, texts = len(ref.prompt_token_ids), {0: 0, 1: 0}, {0: "", 1: ""}
    for chunk in chunks[:-1]:
        c = chunk.choices[0]
        seen[c.index] += len(c.logprobs.tokens)
        texts[c.index] += c.text
        assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (prompt, seen[c.index])
        assert chunk.usage.total_tokens == prompt + seen[c.index]
    assert [texts[i] for i in (0, 1)] == [o.text for o in ref.outputs]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    # vLLM's include_usage defaults to True beside continuous_usage_stats; turned off, no usage at all
    alone = list(complete(client, "Usage counts", stream=True, stream_options={"continuous_usage_stats": True}, **kw))
    assert all(c.usage is not None for c in alone) and alone[-1].choices == []
    off = list(complete(client, "Usage counts", stream=True, stream_options={"include_usage": False,
                                                                              "continuous_usage_stats": True}, **kw))
    assert all(c.usage is None for c in off) and all(c.choices for c in off)


def test_vllm_sampling_extensions_equal_offline(client, llm):
    """min_tokens, include_stop_str_in_output, skip_special_tokens, spaces_between_special_tokens: the same
    text as LLM.generate with the same SamplingParams fields."""
    cases = [
        dict(max_tokens=20, temperature=0.9, seed=3, stop=[" the", "e"], min_tokens=4, include_stop_str_in_output=True),
        dict(max_tokens=20, temperature=0.9, seed=3, stop=[" the", "e"], min_tokens=4),
        dict(max_tokens=6, temperature=0.7, seed=8, ignore_eos=True, logit_bias={50256: 3.0}, skip_special_tokens=False,
             spaces_between_special_tokens=False),
        dict(max_tokens=9, temperature=0, logit_bias={50256: 100.0}, min_tokens=3, include_stop_str_in_output=True,
             skip_special_tokens=False),
    ]
    for case in cases:
        openai_fields = {k: case[k] for k in ("max_tokens", "temperature", "seed", "stop") if k in case}
        extra = {k: v for k, v in case.items() if k not in openai_fields}
        extra["logit_bias"] = {str(t): b for t, b in extra.get("logit_bias", {}).items()} or None
        got = complete(client, "Extensions apply", extra_body=extra, **openai_fields).choices[0]
        want = llm.generate("Extensions apply", SamplingParams(**case))[0].outputs[0]
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason), case
    assert want.text.endswith("<|endoftext|>") and want.finish_reason == "stop"


def test_prompt_logprobs_are_vllms_against_float64_log_softmax(client, llm):
    prompt = "The dog on the ship ran away"
    ids = llm.tokenizer.encode(prompt)
    got = complete(client, prompt, max_tokens=2, temperature=0, echo=True, logprobs=1,
                   extra_body={"prompt_logprobs": 3}).choices[0]
    field = got.model_extra["prompt_logprobs"]
    logp = torch.log_softmax(llm.logits(ids).double(), dim=-1)  # (T, V)
    assert len(field) == len(ids) and field[0] is None
    for i in range(1, len(ids)):
        row, token = logp[i - 1], ids[i]
        entry = field[i]
        assert next(iter(entry)) == str(token)  # the prompt's own token first, then the top 3
        assert entry[str(token)]["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        # 1 + the tokens more likely; fp32 on the server may order near-ties (within 1e-5) either way
        rank = entry[str(token)]["rank"]
        assert int((row > row[token] + 1e-5).sum()) + 1 <= rank <= int((row > row[token] - 1e-5).sum()) + 1
        top3 = row.topk(3).indices.tolist()
        assert set(entry) == {str(t) for t in [token, *top3]}
        for rank, t in enumerate(top3, start=1):
            if t != token:
                assert entry[str(t)]["rank"] == rank and entry[str(t)]["logprob"] == pytest.approx(row[t].item(),
                                                                                                    abs=1e-4)
        assert all(v["decoded_token"] == llm.tokenizer.decode([int(t)]) for t, v in entry.items())
    assert all(len(top) <= 2 for top in got.logprobs.top_logprobs[1:])  # echo's logprobs=1 keeps its own top-N


def test_return_tokens_as_token_ids_names_every_logprobs_token_by_id(client, llm):
    prompt = "Caf\u00e9 \u2603 tokens"
    ids = llm.tokenizer.encode(prompt)
    got = complete(client, prompt, max_tokens=5, temperature=0, echo=True, logprobs=2,
                   extra_body={"return_tokens_as_token_ids": True}).choices[0]
    want = llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0))[0].outputs[0]
    assert got.text == prompt + want.text
    assert got.logprobs.tokens == [f"token_id:{t}" for t in ids + want.token_ids]
    assert all(re.fullmatch(r"token_id:\d+", k) for top in got.logprobs.top_logprobs[1:] for k in top)
    plain = complete(client, prompt, max_tokens=5, temperature=0, echo=True, logprobs=2).choices[0]
    # without it, a token that is part of a character has no text of its own (``bytes:\xe2\x98``)
    assert plain.logprobs.tokens == [token_text(llm.tokenizer, t) for t in ids + want.token_ids]
    assert any(t.startswith("bytes:") for t in plain.logprobs.tokens)


def test_logit_bias_moves_greedy_to_the_biased_argmax_and_matches_offline(client, llm):
    ids = llm.tokenizer.encode("Bias this")
    logits = llm.logits(ids)[-1].double()  # (V,)
    first = int(logits.argmax())
    banned = complete(client, ids, max_tokens=1, temperature=0, logit_bias={str(first): -100})
    logits[first] -= 100
    assert banned.choices[0].logprobs is None and llm.tokenizer.encode(banned.choices[0].text) == [int(logits.argmax())]
    forced = complete(client, ids, max_tokens=4, temperature=0, logit_bias={"995": 100})
    assert forced.choices[0].text == " world" * 4
    kw = dict(max_tokens=10, temperature=1.0, seed=17)
    bias = {t: 8.0 for t in range(2000, 2300)}
    want = llm.generate("Bias this", SamplingParams(**kw, logit_bias=bias))[0].outputs[0].text
    both = complete(client, ["Another prompt", "Bias this"], logit_bias={str(t): b for t, b in bias.items()}, **kw)
    assert both.choices[1].text == want  # seeded: the same alone offline as beside another prompt here
    assert want != llm.generate("Bias this", SamplingParams(**kw))[0].outputs[0].text


def test_best_of_returns_the_n_likeliest_of_best_of_samples_and_bills_them_all(client, llm):
    ids = llm.tokenizer.encode("Best of four")
    kw = dict(max_tokens=8, temperature=1.0, seed=9)
    every = llm.generate(ids, SamplingParams(**kw, n=4))[0].outputs
    logp = [torch.log_softmax(llm.logits(ids + o.token_ids).double(), dim=-1) for o in every]
    scores = [sum(lp[len(ids) - 1 + i, t].item() for i, t in enumerate(o.token_ids)) for lp, o in zip(logp, every)]
    ranked = sorted(range(4), key=lambda i: -scores[i])
    got = complete(client, ids, n=2, best_of=4, logprobs=1, **kw)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [every[i].text for i in ranked[:2]]
    assert [sum(c.logprobs.token_logprobs) for c in got.choices] == pytest.approx([scores[i] for i in ranked[:2]],
                                                                                  abs=1e-3)
    assert got.usage.completion_tokens == sum(len(o.token_ids) for o in every)
    assert got.usage.prompt_tokens == len(ids)


def test_metrics_count_tokens_and_the_pool_ends_clean(server, client):
    before = metrics(server)
    prompt = "Count these tokens"
    got = complete(client, prompt, max_tokens=5, n=2, temperature=0.5, extra_body={"ignore_eos": True})
    after = metrics(server)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert got.usage.completion_tokens == 10 and grew("gpt2fast_generation_tokens_total") == 10
    assert grew("gpt2fast_prompt_tokens_total") == got.usage.prompt_tokens
    assert grew("gpt2fast_time_to_first_token_seconds_count") == 1  # one engine request
    assert grew("gpt2fast_inter_token_latency_seconds_count") == 4  # four more steps, each adding 2 tokens
    assert grew("gpt2fast_requests_total{status=200}") == 1
    assert grew("gpt2fast_finished_sequences_total{reason=length}") == 2
    assert after["gpt2fast_kv_blocks_used"] == 0 and after["gpt2fast_num_requests_running"] == 0
    assert after["gpt2fast_kv_blocks_free"] == after["gpt2fast_kv_blocks_total"] > 0
    assert after["gpt2fast_kv_pool_check_ok"] == 1 and after["gpt2fast_num_sequences_admitted"] == 0


def test_engine_loop_fails_the_requests_of_a_broken_step_and_keeps_serving():
    """In-process: one ``Engine.step`` raises; its request hears a 500 error, the next request completes."""
    engine = Engine(TINY_MODEL, device="cpu")
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real_step()

    engine.step = flaky_step

    async def run() -> list[tuple[str, object]]:
        loop = EngineLoop(engine)
        loop.start(asyncio.get_running_loop())
        heard: list[tuple[str, object]] = []
        for rid in ("broken", "fine"):
            done = asyncio.Event()

            def deliver(kind, payload, done=done):
                if kind != "output" or payload.finished:
                    heard.append((kind, payload))
                    done.set()

            loop.add(rid, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0), deliver)
            await asyncio.wait_for(done.wait(), 30)
        loop.stop()
        return heard

    (kind1, error), (kind2, out) = asyncio.run(run())
    assert kind1 == "error" and error.status == 500 and "injected failure" in error.message
    assert kind2 == "output" and len(out.outputs[0].token_ids) == 4
    assert engine.pool.num_free == engine.pool.num_blocks
    engine.scheduler.check()


def broken_check() -> None:
    """An unexpected exception outside ``Engine.step`` (here in the idle pool check) kills the engine thread."""
    raise KeyError("simulated bug")


def test_after_the_engine_thread_dies_requests_get_503_at_once():
    """In-process over ASGI: the request that was running completes; later ones (plain, streaming, echo-scored)
    get 503 ``engine_stopped`` within seconds instead of waiting forever, and give their admission back."""
    engine = Engine(TINY_MODEL, device="cpu")
    app = make_app(engine, model_name="tiny")
    frontend = app.state.frontend
    engine.scheduler.check = broken_check  # after make_app: the loop checked the pool once when it was built
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}

    async def run() -> tuple[httpx.Response, httpx.Response, list[httpx.Response]]:
        frontend.loop.start(asyncio.get_running_loop())
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                first = await asyncio.wait_for(c.post("/v1/completions", json=body), 30)
                deadline = time.monotonic() + 10
                while frontend.loop.alive:
                    assert time.monotonic() < deadline, "the engine thread did not die"
                    await asyncio.sleep(0.01)
                health = await c.get("/health")
                later = [await asyncio.wait_for(c.post("/v1/completions", json=body | extra), 10)
                         for extra in ({}, {"stream": True}, {"echo": True, "logprobs": 1, "max_tokens": 0})]
        finally:
            frontend.begin_shutdown()
            await asyncio.to_thread(frontend.loop.stop)
        return first, health, later

    first, health, later = asyncio.run(run())
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 2
    assert health.status_code == 503 and isinstance(frontend.loop.failure, KeyError)
    for r in later:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_stopped" and "server log" in r.json()["error"]["message"]
    assert frontend.admitted == 0


def test_requests_queued_when_the_engine_thread_dies_hear_an_error():
    """Adds and scores the thread took but never handled, and those sent after it died, each hear 503."""
    engine = Engine(TINY_MODEL, device="cpu")
    real_add = engine.add_request

    def add_request(request_id, *args):
        if request_id == "boom":
            raise KeyError("simulated bug")  # not a ValueError: nothing expects it, the thread dies
        return real_add(request_id, *args)

    engine.add_request = add_request
    params = SamplingParams(max_tokens=2, temperature=0)

    async def run() -> tuple[EngineLoop, dict[str, tuple[str, object]]]:
        aloop = asyncio.get_running_loop()
        heard = {name: aloop.create_future() for name in ("boom", "queued", "scored", "late", "late_score")}

        def deliver_to(name: str):
            return lambda kind, payload: heard[name].done() or heard[name].set_result((kind, payload))

        loop = EngineLoop(engine)
        loop.add("boom", [1, 2, 3], params, deliver_to("boom"))
        loop.add("queued", [4, 5], params, deliver_to("queued"))
        loop.score([1, 2, 3], 0, deliver_to("scored"))
        loop.start(aloop)  # the thread takes all three at once and dies on the first
        await asyncio.wait_for(asyncio.gather(heard["boom"], heard["queued"], heard["scored"]), 10)
        loop.add("late", [6], params, deliver_to("late"))
        loop.score([6, 7], 1, deliver_to("late_score"))
        await asyncio.wait_for(asyncio.gather(heard["late"], heard["late_score"]), 10)
        loop.stop(5)
        return loop, {name: future.result() for name, future in heard.items()}

    loop, heard = asyncio.run(run())
    assert isinstance(loop.failure, KeyError) and loop.ended and not loop.alive
    for name, (kind, error) in heard.items():
        assert kind == "error" and error.status == 503 and error.code == "engine_stopped", (name, kind, error)


def test_a_loopback_server_answers_only_loopback_host_names():
    """DNS rebinding: a page elsewhere can make the browser send to 127.0.0.1 with the page's own Host."""
    allowed = loopback_host_names("::1")
    with TestClient(make_app(Engine(TINY_MODEL, device="cpu"), model_name="tiny", allowed_hosts=allowed)) as c:
        for host in ("[::1]:8000", "[::1]", "127.0.0.1:8000", "localhost:8000"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "::1", "localhost.evil.example"):
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi"}, headers={"Host": host})
            assert r.status_code == 400 and "invalid host" in r.text.lower(), host
    assert loopback_host_names("0.0.0.0") is None and loopback_host_names("192.168.1.10") is None


@pytest.mark.parametrize("skip", [True, False])
def test_text_offsets_point_into_the_text_when_end_tokens_are_generated(client, llm, skip):
    """Generated <|endoftext|> tokens are text only with skip_special_tokens=False: the offsets follow the text."""
    eot, prompt = "<|endoftext|>", "Hi there"
    got = complete(client, prompt, max_tokens=4, echo=True, logprobs=1, seed=1,
                   logit_bias={str(llm.tokenizer.eot_token): 100},  # every generated token is the end token
                   extra_body={"ignore_eos": True, "skip_special_tokens": skip}).choices[0]
    pieces = token_texts(llm, llm.tokenizer.encode(prompt))
    assert got.logprobs.tokens == pieces + [eot] * 4
    held = pieces + ["" if skip else eot] * 4  # each token's text as the response's text holds it
    assert got.text == "".join(held)
    assert got.logprobs.text_offset == [sum(map(len, held[:i])) for i in range(len(held))]
