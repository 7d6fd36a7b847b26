"""Load benchmark of ``gpt2fast serve``: requests/s, time to first token and latency percentiles per concurrency.

Each concurrency level runs ``--requests-per-level x concurrency`` streaming completions (at least
8), ``concurrency`` at a time, every one with the same prompt length (``--prompt-tokens`` random
token ids, different per request) and exactly ``--max-tokens`` tokens (``ignore_eos``). Measured
on the client, per request: TTFT (request sent -> first SSE chunk with a token), latency (sent ->
``[DONE]``), and ITL = (latency - TTFT) / (tokens - 1). Reported: requests/s and output tokens/s
over the level's wall time, and p50/p90/p99 of each. Without ``--url`` a server is started on a
free 127.0.0.1 port (``--max-num-seqs`` = the largest concurrency) and stopped with SIGTERM after;
the script checks it exits 0 and that ``/metrics`` shows every KV block free at the end.

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


@contextmanager
def started_server(args: argparse.Namespace):
    """``gpt2fast serve`` on a free port; yields its URL; SIGTERM at the end must give exit status 0."""
    port = free_port()
    cmd = [sys.executable, "-m", "gpt2fast", "serve", "--model", args.model, "--port", str(port),
           "--max-num-seqs", str(max(args.concurrency)), "--log-level", "warning", *args.server_args]
    if args.cpu_threads:
        cmd += ["--cpu-threads", str(args.cpu_threads)]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
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
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(60)
            print(f"server stopped by SIGTERM: exit status {status}", file=sys.stderr)
        log.close()


def pool_state(url: str) -> str:
    wanted = ("gpt2fast_kv_blocks_used ", "gpt2fast_kv_blocks_free ", "gpt2fast_kv_pool_check_ok ")
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return ", ".join(line for line in lines if line.startswith(wanted))


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
    with server as url:
        asyncio.run(run_level(url, headers, make_body, 1, 2))  # warm-up
        levels = [asyncio.run(run_level(url, headers, make_body, c, max(8, args.requests_per_level * c)))
                  for c in args.concurrency]
        print(f"model {model}; prompt {args.prompt_tokens} tokens, {args.max_tokens} out, "
              f"temperature {args.temperature}")
        print(table(levels))
        print(f"after the run: {pool_state(url)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": model, "args": {k: v for k, v in vars(args).items() if k != "api_key"},
                       "levels": [asdict(lv) for lv in levels]}, f, indent=1)
    return 0 if all(lv.errors == 0 for lv in levels) else 1


@contextmanager
def _given(url: str):
    yield url.rstrip("/")


if __name__ == "__main__":
    raise SystemExit(main())
