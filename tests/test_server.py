"""``gpt2fast serve`` as a real process, driven by the official ``openai`` client; answers checked against ``LLM``.

The server and the offline ``LLM`` load the same seeded random weights, so every seeded or greedy
completion must equal ``LLM.generate`` with the same ``SamplingParams``; logprobs of an echoed
prompt are recomputed here with ``torch.log_softmax(LLM.logits(ids))``.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from gpt2fast import LLM, SamplingParams
from gpt2fast.engine import Engine
from gpt2fast.server import EngineLoop
from tests.serverproc import TINY_MODEL, running

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


def test_stop_string_trims_the_text_like_offline(client, llm):
    base = dict(max_tokens=20, temperature=1.0, seed=7)
    ids = llm.generate("Once upon a time", SamplingParams(**base))[0].outputs[0].token_ids
    stop = next(t for t in token_texts(llm, ids[4:]) if t.strip().isalpha())  # a word it will generate
    got = complete(client, "Once upon a time", stop=[stop, "never-generated"], **base).choices[0]
    want = llm.generate("Once upon a time", SamplingParams(stop=[stop, "never-generated"], **base))[0].outputs[0]
    assert got.finish_reason == want.finish_reason == "stop"
    assert got.text == want.text and stop not in got.text


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
