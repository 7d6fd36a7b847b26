"""``gpt2fast serve`` under load and faults: 200 concurrent streams, clients that vanish, a bad request among
good ones, extreme but legal sampling values among good ones, and SIGTERM in the middle of a load run. Streams
are compared with offline ``LLM.generate``; the KV pool's state is read from ``/metrics`` (blocks used/free,
and ``BlockPool.check`` run when idle).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpt2fast import LLM, SamplingParams
from tests.serverproc import TINY_MODEL, running

# Server and tests share two busy cores: one torch thread each (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SERVE_ARGS = ("serve", "--model", TINY_MODEL, "--max-num-seqs", "64", "--max-queue", "1024", "--cpu-threads", "1",
              "--kv-cache-tokens", "32768")


@pytest.fixture(scope="module")
def server():
    with running(*SERVE_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(TINY_MODEL, device="cpu")


@dataclass
class Stream:
    """What one streaming client saw."""

    status: int = 0
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, list[str]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    error: dict | None = None

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"


async def stream(client: httpx.AsyncClient, url: str, body: dict, *, leave_after: int | None = None,
                 started: asyncio.Event | None = None) -> Stream:
    """POST a streaming completion and read it; ``leave_after`` events, then hang up (close the connection)."""
    seen = Stream()
    async with client.stream("POST", url + "/v1/completions", json={"model": TINY_MODEL, "stream": True, **body}) as r:
        seen.status = r.status_code
        if r.status_code != 200:
            seen.error = json.loads(await r.aread())["error"]
            return seen
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            seen.events.append(line.removeprefix("data: "))
            if started is not None:
                started.set()
            if seen.events[-1] == "[DONE]" or (leave_after is not None and len(seen.events) >= leave_after):
                break
            for choice in json.loads(seen.events[-1])["choices"]:
                i = choice["index"]
                seen.texts[i] = seen.texts.get(i, "") + choice["text"]
                if choice["finish_reason"] is not None:
                    seen.finish.setdefault(i, []).append(choice["finish_reason"])
    return seen


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    """/metrics once the engine has nothing left in flight and has run its idle pool check."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["gpt2fast_num_requests_running"] == 0 and m["gpt2fast_num_requests_waiting"] == 0
        if idle and m["gpt2fast_kv_blocks_used"] == 0 and m["gpt2fast_num_sequences_admitted"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not go idle: {m}")
        time.sleep(0.05)


def assert_pool_clean(m: dict[str, float]) -> None:
    assert m["gpt2fast_kv_blocks_used"] == 0
    assert m["gpt2fast_kv_blocks_free"] == m["gpt2fast_kv_blocks_total"] > 0
    assert m["gpt2fast_kv_pool_check_ok"] == 1


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))


def request(i: int) -> dict:
    """Request ``i`` of a load run: greedy, odd lengths, some with a penalty (per-row settings in one batch).

    Greedy because on a CPU one sampled row makes the whole batch draw Philox noise over the vocabulary
    (seeded sampling is checked against offline in test_server.py).
    """
    body = {"prompt": f"Request {i} says that the weather", "max_tokens": 3 + i % 7, "temperature": 0}
    return body | ({"presence_penalty": 1.5} if i % 3 == 0 else {})


def params(body: dict) -> SamplingParams:
    return SamplingParams(**{k: v for k, v in body.items() if k not in ("prompt", "model", "stream")})


def test_200_concurrent_streams_are_complete_and_correct_and_free_every_block(server, llm):
    bodies = [request(i) for i in range(200)]
    checks_before = metrics(server.url)["gpt2fast_kv_pool_checks_total"]

    async def run() -> list[Stream]:
        async with client() as c:
            return await asyncio.gather(*(stream(c, server.url, b) for b in bodies))

    seen = asyncio.run(run())
    want = llm.generate([b["prompt"] for b in bodies], [params(b) for b in bodies], use_tqdm=False)
    for i, (s, w) in enumerate(zip(seen, want)):
        assert s.status == 200 and s.done, (i, s)
        assert s.texts.get(0, "") == w.outputs[0].text, i
        assert s.finish == {0: [w.outputs[0].finish_reason]}, i
    m = wait_idle(server.url)
    assert_pool_clean(m)
    assert m["gpt2fast_kv_pool_checks_total"] > checks_before, "the pool was checked after the load"
    assert m["gpt2fast_time_to_first_token_seconds_count"] >= 200


def test_clients_that_disconnect_mid_stream_free_their_blocks_at_once(server):
    before = metrics(server.url)
    body = {"prompt": "A long story", "max_tokens": 900, "temperature": 0, "ignore_eos": True}

    async def run() -> list[Stream]:
        async with client() as c:
            return await asyncio.gather(*(stream(c, server.url, body, leave_after=3) for _ in range(20)))

    t0 = time.monotonic()
    seen = asyncio.run(run())
    assert all(s.status == 200 and len(s.events) == 3 and not s.done for s in seen)
    m = wait_idle(server.url, timeout=10)
    assert_pool_clean(m)
    aborted = m.get("gpt2fast_finished_sequences_total{reason=abort}", 0) - before.get(
        "gpt2fast_finished_sequences_total{reason=abort}", 0)
    generated = m["gpt2fast_generation_tokens_total"] - before["gpt2fast_generation_tokens_total"]
    assert aborted == 20, "every vanished client's request was aborted"
    assert generated < 20 * 900 / 2, f"the requests ran on after their clients left ({generated} tokens)"
    assert time.monotonic() - t0 < 20
    # the server still serves
    after = httpx.post(server.url + "/v1/completions", json={"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 2},
                       timeout=30)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2


def test_a_non_streaming_client_that_gives_up_aborts_its_request(server):
    before = metrics(server.url)
    body = {"model": TINY_MODEL, "prompt": "Wait for me", "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    m = wait_idle(server.url, timeout=10)
    assert_pool_clean(m)
    assert m.get("gpt2fast_finished_sequences_total{reason=abort}", 0) - before.get(
        "gpt2fast_finished_sequences_total{reason=abort}", 0) == 1
    assert m["gpt2fast_generation_tokens_total"] - before["gpt2fast_generation_tokens_total"] < 900


def test_a_bad_parameter_among_good_requests_fails_alone(server, llm):
    good = [request(i) for i in range(12)]
    bad = [{"prompt": "bad", "temperature": 5}, {"prompt": "bad", "max_tokens": 4, "not_a_field": 1},
           {"prompt": [[50257]], "max_tokens": 2}]

    async def run() -> list[Stream]:
        async with client() as c:
            return await asyncio.gather(*(stream(c, server.url, b) for b in good[:6] + bad + good[6:]))

    seen = asyncio.run(run())
    failed = seen[6:9]
    assert [s.status for s in failed] == [400, 400, 400]
    assert [s.error["param"] for s in failed] == ["temperature", "not_a_field", "prompt"]
    want = llm.generate([b["prompt"] for b in good], [params(b) for b in good], use_tqdm=False)
    for s, w in zip(seen[:6] + seen[9:], want):
        assert s.status == 200 and s.done and s.texts[0] == w.outputs[0].text
    assert_pool_clean(wait_idle(server.url))


# Values the protocol accepts that the engine's sampler must take in its stride, in the same steps as the good
# requests (sampled rows send the whole batch through the logits sampler): each with the plain equivalent it
# must draw the same tokens as offline.
EXTREME = [({"top_k": 2**31, "temperature": 0.9, "seed": 5}, {"top_k": 0, "temperature": 0.9, "seed": 5}),
           ({"top_k": 10**30, "temperature": 1.1, "seed": 6}, {"temperature": 1.1, "seed": 6}),
           ({"top_p": 1e-46, "temperature": 0.9, "seed": 7}, {"temperature": 0}),
           ({"top_p": 5e-324, "temperature": 0.9, "seed": 8, "presence_penalty": 0.5},
            {"temperature": 0, "presence_penalty": 0.5})]


def test_extreme_but_legal_values_among_good_requests_disturb_nothing(server, llm):
    good = [request(i) | {"max_tokens": 24, "ignore_eos": True} for i in range(12)]
    odd = [{"prompt": f"Odd {i} but legal", "max_tokens": 24, "ignore_eos": True} | fields
           for i, (fields, _) in enumerate(EXTREME)]

    async def run() -> list[Stream]:
        async with client() as c:
            return await asyncio.gather(*(stream(c, server.url, b) for b in good[:6] + odd + good[6:]))

    seen = asyncio.run(run())
    plain = [{k: v for k, v in b.items() if k not in extreme} | fields for b, (extreme, fields) in zip(odd, EXTREME)]
    bodies = good[:6] + plain + good[6:]
    want = llm.generate([b["prompt"] for b in bodies], [params(b) for b in bodies], use_tqdm=False)
    for s, b, w in zip(seen, bodies, want):
        assert s.status == 200 and s.done and s.error is None, (b, s.events[-2:])
        assert s.texts[0] == w.outputs[0].text and s.finish[0] == ["length"], b
    assert_pool_clean(wait_idle(server.url))


def test_sigterm_during_a_load_run_ends_every_stream_and_exits_0():
    body = {"prompt": "Keep going", "max_tokens": 600, "temperature": 0, "ignore_eos": True}
    with running(*SERVE_ARGS) as srv:
        async def run() -> list[Stream]:
            async with client() as c:
                started = [asyncio.Event() for _ in range(30)]
                tasks = [asyncio.ensure_future(stream(c, srv.url, body, started=e)) for e in started]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
                srv.proc.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*tasks), 60)

        seen = asyncio.run(run())
        status = srv.proc.wait(30)
        output = srv.output()
    assert status == 0, output
    for s in seen:
        assert s.status == 200 and s.done, s.events[-3:]
        assert s.finish[0] in (["abort"], ["length"])
    assert sum(s.finish[0] == ["abort"] for s in seen) >= 20, "SIGTERM came while the streams were running"
    assert "Finished server process" in output
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.url + "/health", timeout=2)


def test_sigint_mid_stream_also_stops_cleanly():
    body = {"prompt": "Ctrl-C", "max_tokens": 800, "temperature": 0, "ignore_eos": True}
    with running(*SERVE_ARGS) as srv:
        async def run() -> Stream:
            async with client() as c:
                started = asyncio.Event()
                task = asyncio.ensure_future(stream(c, srv.url, body, started=started))
                await asyncio.wait_for(started.wait(), 60)
                srv.proc.send_signal(signal.SIGINT)
                return await asyncio.wait_for(task, 60)

        seen = asyncio.run(run())
        assert srv.proc.wait(30) == 0, srv.output()
    assert seen.done and seen.finish[0] == ["abort"]
