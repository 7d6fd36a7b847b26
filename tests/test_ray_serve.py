"""The OpenAI server as a Ray Serve application (``gpt2fast.ray_serve``), on a local Ray instance this module starts
and stops: two replicas of the tiny model behind Serve's proxy, driven by the official ``openai`` client and raw
HTTP; answers checked against offline ``LLM.generate`` and errors against ``gpt2fast serve``'s own app.

Marked ``ray`` (``pytest -m "not gpu and not ray"`` leaves them out). Without Ray installed they skip, unless
``GPT2FAST_REQUIRE_RAY`` is set (CI sets it): then they fail. The option parsing and health check at the end need no
Ray.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gpt2fast import LLM, SamplingParams
from gpt2fast.engine import Engine
from gpt2fast.ray_serve import (
    DEPLOYMENT_NAME,
    REPLICA_HEADER,
    OpenAIReplica,
    build_app,
    deployment_options,
    parse_options,
    replica_app,
)
from gpt2fast.server import make_app
from tests.serverproc import TINY_MODEL, free_port

APP = "gpt2fast"
REQUIRE_ENV = "GPT2FAST_REQUIRE_RAY"  # set (CI does): no Ray fails the Ray tests instead of skipping them
OPTIONS = {"model": TINY_MODEL, "num_replicas": 2, "max_num_seqs": 16, "cpu_threads": 1, "health_check_period_s": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def endpoint():
    """``http://127.0.0.1:PORT`` of the application on a fresh local Ray instance (stopped after the module)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f'ray[serve] is not installed (and {REQUIRE_ENV} is set): pip install -e ".[ray]"')
        pytest.skip('ray[serve] is not installed: pip install -e ".[ray]"')
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(OPTIONS), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(endpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoint + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(TINY_MODEL, device="cpu")


def complete(client: openai.OpenAI, prompt, **kwargs):
    return client.completions.create(model=TINY_MODEL, prompt=prompt, **kwargs)


def replica_metrics(endpoint: str, replicas: int, timeout: float = 30.0) -> dict[str, dict[str, float]]:
    """``/metrics`` of every replica: asked until ``replicas`` distinct ones answered (Serve picks the replica)."""
    seen: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < replicas:
        assert time.monotonic() < deadline, f"only replicas {sorted(seen)} answered /metrics"
        r = httpx.get(endpoint + "/metrics", timeout=10)
        seen[r.headers[REPLICA_HEADER]] = {
            s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(r.text) for s in f.samples}
    return seen


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def replica_pids() -> list[int]:
    """Process ids of the replicas: Ray titles each replica's process ``ray::ServeReplica:<app>:<deployment>``."""
    title = f"ServeReplica:{APP}:{DEPLOYMENT_NAME}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and title in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return pids


def healthy_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[DEPLOYMENT_NAME]
    return deployment.replica_states.get("RUNNING", 0) if deployment.status == "HEALTHY" else 0


@pytest.mark.ray
def test_seeded_completions_streams_n_and_logprobs_equal_offline_generate(client, llm):
    kw = dict(max_tokens=11, temperature=0.9, top_p=0.95, n=3, seed=1234, logprobs=2)
    got = complete(client, "The quick brown fox", **kw)
    want = llm.generate("The quick brown fox", SamplingParams(**kw))[0]
    assert [c.text for c in got.choices] == [o.text for o in want.outputs]
    for choice, out in zip(got.choices, want.outputs, strict=True):
        assert choice.logprobs.token_logprobs == pytest.approx(
            [d[t] for d, t in zip(out.logprobs, out.token_ids, strict=True)], abs=1e-4)
    assert got.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)

    stream_kw = dict(max_tokens=9, temperature=0.8, n=2, seed=99)
    chunks = list(complete(client, "Streaming works", stream=True, stream_options={"include_usage": True},
                           **stream_kw))  # fmt: skip
    want = llm.generate("Streaming works", SamplingParams(**stream_kw))[0]
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [texts[0], texts[1]] == [o.text for o in want.outputs]
    assert chunks[-1].usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)
    greedy = complete(client, "Hello", max_tokens=6, temperature=0).choices[0].text
    assert greedy == llm.generate("Hello", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text


@pytest.mark.ray
@pytest.mark.parametrize("body", [
    {"model": TINY_MODEL, "prompt": "a", "max_tokens": "x"},
    {"model": TINY_MODEL, "prompt": "a", "n": 0},
    {"model": TINY_MODEL, "prompt": "a", "max_tokens": 5000},
    {"model": TINY_MODEL, "prompt": "a", "surprise": 1},
    {"model": "other", "prompt": "a"},
])  # fmt: skip
def test_errors_are_gpt2fast_serves(endpoint, body):
    """The same status and OpenAI error body as ``gpt2fast serve``'s app answers in-process."""
    with TestClient(make_app(Engine(TINY_MODEL, device="cpu"), model_name=TINY_MODEL)) as plain:
        want = plain.post("/v1/completions", json=body)
    got = httpx.post(endpoint + "/v1/completions", json=body, timeout=30)
    assert want.status_code >= 400
    assert (got.status_code, got.json()) == (want.status_code, want.json())


@pytest.mark.ray
def test_chat_is_a_clear_error_and_unknown_routes_404(client, endpoint):
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert httpx.get(endpoint + "/v1/nothing", timeout=10).status_code == 404
    assert [m.id for m in client.models.list().data] == [TINY_MODEL]


async def _stream(http: httpx.AsyncClient, prompt: str, seed: int, hang_up_after: int | None = None,
                  max_tokens: int = 24):
    """One streamed completion: (replica, text, finished); ``hang_up_after`` chunks: close the connection then."""
    body = {"model": TINY_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "stream": True}
    text, chunks = "", 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return r.headers[REPLICA_HEADER], text, True
            if line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"]
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    return r.headers[REPLICA_HEADER], text, False
    return r.headers[REPLICA_HEADER], text, False


async def _streams(endpoint: str, count: int, hang_up_after: int | None = None, max_tokens: int = 24) -> list:
    async with httpx.AsyncClient(base_url=endpoint, timeout=60) as http:
        return await asyncio.gather(*(_stream(http, f"Stream number {i}", i, hang_up_after, max_tokens)
                                      for i in range(count)))


@pytest.mark.ray
def test_two_replicas_share_32_concurrent_streams(endpoint, llm):
    """Each replica takes a batch of 16 (max_ongoing_requests = max_num_seqs): 32 streams at once fill both."""
    results = asyncio.run(_streams(endpoint, 32))
    per_replica = Counter(replica for replica, _, _ in results)
    assert len(per_replica) == 2 and min(per_replica.values()) >= 8, per_replica
    for i, (_, text, finished) in enumerate(results):
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=i)
        assert finished and text == llm.generate(f"Stream number {i}", params)[0].outputs[0].text


@pytest.mark.ray
def test_hang_ups_mid_stream_leave_every_replica_with_no_blocks_used(endpoint):
    """24 streams of up to 900 tokens (more than one replica takes at a time), each hung up after two chunks: every
    replica aborts its requests (counted by finish reason) and its KV pool ends with no block used and no sequence
    admitted."""
    aborted = lambda: sum(m.get("gpt2fast_finished_sequences_total{reason=abort}", 0)  # noqa: E731
                          for m in replica_metrics(endpoint, 2).values())
    before = aborted()
    results = asyncio.run(_streams(endpoint, 24, hang_up_after=2, max_tokens=900))
    assert not any(finished for _, _, finished in results)
    assert len({replica for replica, _, _ in results}) == 2

    def pools_empty() -> bool:
        return all(m["gpt2fast_kv_blocks_used"] == 0 and m["gpt2fast_num_sequences_admitted"] == 0
                   for m in replica_metrics(endpoint, 2).values())  # fmt: skip

    wait_until(pools_empty, 30, "every replica's KV pool to free the hung-up streams' blocks")
    assert aborted() - before == 24


@pytest.mark.ray
def test_a_replica_whose_engine_stopped_is_replaced(endpoint):
    """``stop_engine`` ends one replica's engine thread: its health check fails, Serve starts another replica, and
    the endpoint answers throughout."""
    from ray import serve

    before = set(replica_metrics(endpoint, 2))
    stopped = serve.get_app_handle(APP).stop_engine.remote().result(timeout_s=30)
    assert stopped in before

    def replaced() -> bool:
        return stopped not in replica_metrics(endpoint, 2) and healthy_replicas() == 2

    wait_until(replaced, 60, f"Serve to replace replica {stopped}")
    r = httpx.post(endpoint + "/v1/completions", json={"model": TINY_MODEL, "prompt": "a", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200


@pytest.mark.ray
def test_a_killed_replica_process_fails_its_requests_clearly_and_is_replaced(endpoint):
    """SIGKILL one replica's process while 24 streams run (both replicas busy): every request ends, finished or with
    a clear error (an HTTP error status, or a stream the proxy breaks off: an incomplete chunked body), none hangs and
    none is cut short silently; the endpoint keeps answering; Serve brings up a replacement."""
    replicas = replica_pids()
    assert len(replicas) == 2, replicas
    before = set(replica_metrics(endpoint, 2))

    async def run() -> list:
        async with httpx.AsyncClient(base_url=endpoint, timeout=60) as http:
            tasks = [asyncio.create_task(_stream(http, f"Killed {i}", i, max_tokens=200)) for i in range(24)]
            await asyncio.sleep(0.5)
            os.kill(replicas[0], signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)  # none may hang

    results = asyncio.run(run())
    failed = [r for r in results if isinstance(r, BaseException)]
    for error in failed:  # an error status (the assertion in _stream), or a stream the proxy broke off
        assert isinstance(error, (AssertionError, httpx.HTTPError)), repr(error)
    assert all(r[2] for r in results if not isinstance(r, BaseException)), "a stream ended early with no error"
    assert len(failed) < 24
    r = httpx.post(endpoint + "/v1/completions", json={"model": TINY_MODEL, "prompt": "a", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
    wait_until(lambda: healthy_replicas() == 2 and set(replica_metrics(endpoint, 2)) != before, 90,
               "Serve to replace the killed replica")


# ---- options (no Ray needed) ----------------------------------------------------------------------------------


def test_options_take_servers_flags_as_key_values_and_name_bad_ones():
    args = parse_options({"model": "m", "max_num_seqs": "8", "quantization": "int8", "cuda_graphs": "false",
                          "min_replicas": "1", "max_replicas": "4", "target_ongoing_requests": "3"})  # fmt: skip
    assert (args.max_num_seqs, args.quantization, args.cuda_graphs) == (8, "int8", False)
    opts = deployment_options(args, gpus_available=True)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3.0}
    assert "num_replicas" not in opts and opts["ray_actor_options"]["num_gpus"] == 1.0
    assert opts["max_ongoing_requests"] == 8  # a full batch per replica; Serve queues the rest
    five = deployment_options(parse_options({"model": "m", "max_ongoing_requests": 5}), gpus_available=False)
    assert five["max_ongoing_requests"] == 5
    for bad, message in [({"model": "m", "max_num_seqs": "many"}, "--max-num-seqs: invalid int value: 'many'"),
                         ({"model": "m", "backend": "gpu"}, "--backend: invalid choice: 'gpu'"),
                         ({"model": "m", "replicas": 2}, "unknown option replicas"),
                         ({"model": "m", "num_replicas": 0}, "num_replicas must be at least 1"),
                         ({"model": "m", "max_ongoing_requests": 0}, "max_ongoing_requests must be at least 1"),
                         ({"model": "m", "num_replicas": 2, "max_replicas": 3}, "num_replicas is fixed"),
                         ({"model": "m", "cuda_graphs": "maybe"}, "cuda_graphs must be true or false"),
                         ({}, "the following arguments are required: --model")]:
        with pytest.raises(ValueError, match=message):
            parse_options(bad)


def test_health_check_fails_once_the_engine_thread_has_died(monkeypatch):
    """The replica's health check (what Serve calls, here without Ray): fine while the engine thread runs; once an
    unexpected exception outside a step (here the idle pool check) ends the thread, the check raises, naming it."""
    replica = OpenAIReplica()
    replica.app = replica_app(parse_options({"model": TINY_MODEL, "cpu_threads": 1}))
    engine = replica.app.state.frontend.loop.engine
    with TestClient(replica.app) as http:
        replica.check_health()
        assert http.get("/health").headers[REPLICA_HEADER].startswith("pid-")  # outside Serve: the process id
        monkeypatch.setattr(engine.scheduler, "check", lambda: (_ for _ in ()).throw(MemoryError("the device is gone")))
        http.post("/v1/completions", json={"model": TINY_MODEL, "prompt": "a", "max_tokens": 3})
        wait_until(lambda: not replica.app.state.frontend.loop.alive, 10, "the engine thread to end")
        with pytest.raises(RuntimeError, match="the engine thread has ended.*the device is gone"):
            replica.check_health()
