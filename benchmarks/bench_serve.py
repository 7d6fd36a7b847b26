"""Load benchmark of ``gpt2fast serve``: requests/s, time to first token and latency percentiles per concurrency.

Each concurrency level runs ``--requests-per-level x concurrency`` streaming completions (at least
8), ``concurrency`` at a time, every one with the same prompt length (``--prompt-tokens`` random
token ids, different per request) and exactly ``--max-tokens`` tokens (``ignore_eos``). Measured
on the client, per request: TTFT (request sent -> first SSE chunk with a token), latency (sent ->
``[DONE]``), and ITL = (latency - TTFT) / (tokens - 1). Reported: requests/s and output tokens/s
over the level's wall time, and p50/p90/p99 of each. Without ``--url`` a server is started on a
free 127.0.0.1 port (``--max-num-seqs`` = the largest concurrency) and stopped with SIGTERM after.
The script exits 1 (saying why on stderr) when a request failed, when ``/metrics`` still shows KV
blocks in use after the run, or when the server it started did not exit 0 on SIGTERM; else 0.

Run:
    python benchmarks/bench_serve.py --model 'random:{"n_layer": 2, "n_embd": 32, "n_head": 2}' --quick
    python benchmarks/bench_serve.py --model gpt2 --concurrency 1 8 32 128 --max-tokens 128 --out serve.json
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --served-model gpt2 --api-key sk-...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import httpx


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0


@dataclass
class Level:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    req_per_s: float
    out_tok_per_s: float
    ttft_ms: dict[str, float]
    latency_ms: dict[str, float]
    itl_ms: dict[str, float]


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 in milliseconds (nearest rank; all zeros when there is nothing).

    Example:
        >>> percentiles([0.001 * i for i in range(1, 101)])
        {'p50': 50.0, 'p90': 90.0, 'p99': 99.0}
    """
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    ranked = sorted(values)
    pick = {p: ranked[min(len(ranked) - 1, max(0, -(-p * len(ranked) // 100) - 1))] for p in (50, 90, 99)}
    return {f"p{p}": round(v * 1000, 3) for p, v in pick.items()}


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Sample(False)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Sample(False)
                if chunk["choices"] and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return Sample(False)
    return Sample(ttft is not None, ttft or 0.0, time.perf_counter() - t0, tokens)


async def run_level(url: str, headers: dict, make_body, concurrency: int, total: int) -> Level:
    """``total`` requests, ``concurrency`` in flight at any time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        async def gated(i: int) -> Sample:
            async with gate:
                return await one_request(client, url, make_body(i))

        t0 = time.perf_counter()
        samples = await asyncio.gather(*(gated(i) for i in range(total)))
        wall = time.perf_counter() - t0
    good = [s for s in samples if s.ok]
    itl = [(s.latency - s.ttft) / (s.tokens - 1) for s in good if s.tokens > 1]
    return Level(concurrency, total, total - len(good), round(wall, 3), round(len(good) / wall, 2),
                 round(sum(s.tokens for s in good) / wall, 1), percentiles([s.ttft for s in good]),
                 percentiles([s.latency for s in good]), percentiles(itl))


def body_maker(args: argparse.Namespace, model: str, vocab: int = 50257):
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(vocab - 1) for _ in range(args.prompt_tokens)] for _ in range(256)]

    def make(i: int) -> dict:
        return {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                "temperature": args.temperature, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "seed": i}

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerRun:
    """The server a run talks to, and (for one started here) how it exited."""

    url: str
    exit_status: int | None = None  # after SIGTERM, for a server started here (-9: killed, it did not stop)


@contextmanager
def started_server(args: argparse.Namespace) -> Iterator[ServerRun]:
    """``gpt2fast serve`` on a free port; stopped with SIGTERM at the end, its exit status then recorded."""
    port = free_port()
    cmd = [sys.executable, "-m", "gpt2fast", "serve", "--model", args.model, "--port", str(port),
           "--max-num-seqs", str(max(args.concurrency)), "--log-level", "warning", *args.server_args]
    if args.cpu_threads:
        cmd += ["--cpu-threads", str(args.cpu_threads)]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    run = ServerRun(url)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become healthy in 300 s")
            time.sleep(0.2)
        yield run
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                run.exit_status = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                run.exit_status = -9
            print(f"server stopped by SIGTERM: exit status {run.exit_status}", file=sys.stderr)
        else:
            run.exit_status = proc.returncode
        log.close()


def pool_state(url: str) -> dict[str, float]:
    """The server's KV block gauges from ``/metrics``: blocks used, blocks free, and the idle pool check."""
    names = ("gpt2fast_kv_blocks_used", "gpt2fast_kv_blocks_free", "gpt2fast_kv_pool_check_ok")
    state = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            state[name] = float(value)
    return state


def problems(levels: list[Level], pool: dict[str, float], exit_status: int | None) -> list[str]:
    """Why the run failed: requests that failed, KV blocks still in use, a server that did not exit 0.

    Example:
        >>> problems([], {"gpt2fast_kv_blocks_used": 0.0}, 0), problems([], {"gpt2fast_kv_blocks_used": 3.0}, None)
        ([], ['3 KV blocks still in use after the run (gpt2fast_kv_blocks_used)'])
        >>> problems([], {"gpt2fast_kv_blocks_used": 0.0}, 1)
        ['the server exited with status 1 after SIGTERM, not 0']
    """
    found = [f"{lv.errors} of {lv.requests} requests failed at concurrency {lv.concurrency}"
             for lv in levels if lv.errors]
    used = pool.get("gpt2fast_kv_blocks_used")
    if used != 0:
        found.append(f"{'no' if used is None else f'{used:g}'} KV blocks still in use after the run "
                     "(gpt2fast_kv_blocks_used)")
    if exit_status not in (None, 0):
        found.append(f"the server exited with status {exit_status} after SIGTERM, not 0")
    return found


def table(levels: list[Level]) -> str:
    head = ("| conc | reqs | err | req/s | out tok/s | TTFT p50/p90/p99 ms | latency p50/p90/p99 ms "
            "| ITL p50/p90 ms |\n|---:|---:|---:|---:|---:|---|---|---|")
    rows = [f"| {lv.concurrency} | {lv.requests} | {lv.errors} | {lv.req_per_s} | {lv.out_tok_per_s} | "
            f"{lv.ttft_ms['p50']} / {lv.ttft_ms['p90']} / {lv.ttft_ms['p99']} | "
            f"{lv.latency_ms['p50']} / {lv.latency_ms['p90']} / {lv.latency_ms['p99']} | "
            f"{lv.itl_ms['p50']} / {lv.itl_ms['p90']} |" for lv in levels]
    return "\n".join([head, *rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default='random:{"n_layer": 2, "n_embd": 32, "n_head": 2}',
                   help="model to start a server with (ignored with --url)")
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--served-model", default=None, help="the `model` field to send (default: --model)")
    p.add_argument("--api-key", default=os.environ.get("GPT2FAST_API_KEY"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--requests-per-level", type=int, default=4, help="requests per level = this x concurrency")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random prompts")
    p.add_argument("--cpu-threads", type=int, default=None, help="passed to the started server")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more `gpt2fast serve` arguments")
    p.add_argument("--quick", action="store_true", help="concurrency 1 4 16, 2 requests per level x concurrency, "
                   "8 prompt and 8 output tokens, 1 server CPU thread")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.concurrency, args.requests_per_level, args.prompt_tokens, args.max_tokens = [1, 4, 16], 2, 8, 8
        args.cpu_threads = args.cpu_threads or 1
    model = args.served_model or args.model
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    make_body = body_maker(args, model)
    server = started_server(args) if args.url is None else _given(args.url)
    with server as run:
        asyncio.run(run_level(run.url, headers, make_body, 1, 2))  # warm-up
        levels = [asyncio.run(run_level(run.url, headers, make_body, c, max(8, args.requests_per_level * c)))
                  for c in args.concurrency]
        print(f"model {model}; prompt {args.prompt_tokens} tokens, {args.max_tokens} out, "
              f"temperature {args.temperature}")
        print(table(levels))
        pool = pool_state(run.url)
        print(f"after the run: {', '.join(f'{k} {v:g}' for k, v in pool.items())}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": model, "args": {k: v for k, v in vars(args).items() if k != "api_key"},
                       "levels": [asdict(lv) for lv in levels]}, f, indent=1)
    found = problems(levels, pool, run.exit_status)
    for problem in found:
        print(f"bench_serve: FAILED: {problem}", file=sys.stderr)
    return 1 if found else 0


@contextmanager
def _given(url: str) -> Iterator[ServerRun]:
    yield ServerRun(url.rstrip("/"))


if __name__ == "__main__":
    raise SystemExit(main())
