"""``gpt2fast serve``: arguments, the engine, and uvicorn with a shutdown that ends every stream and exits 0."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING

from gpt2fast.errors import CheckpointError
from gpt2fast.http_limits import ConnectionLimits, LimitedServer, add_arguments, check_port, uvicorn_config
from gpt2fast.ops import BACKENDS
from gpt2fast.quant import QUANTIZATIONS
from gpt2fast.server.app import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, make_app

if TYPE_CHECKING:
    from fastapi import FastAPI

API_KEY_ENV = "GPT2FAST_API_KEY"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]  # as the Host header names them (IPv6 in brackets)


def loopback_host_names(host: str) -> list[str] | None:
    """The ``Host`` header values to accept when listening on ``host``: the loopback names (and ``host``
    itself) when ``host`` is a loopback address, so a web page elsewhere cannot use the server through DNS
    rebinding; None (any ``Host``) when it listens beyond this machine.

    Example:
        >>> loopback_host_names("127.0.0.1"), loopback_host_names("0.0.0.0")
        (['127.0.0.1', 'localhost', '[::1]'], None)
        >>> loopback_host_names("::1"), loopback_host_names("127.0.0.2")[-1]
        (['127.0.0.1', 'localhost', '[::1]'], '127.0.0.2')
    """
    if host.lower() == "localhost":
        return list(LOOPBACK_HOSTS)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name: it may resolve anywhere
        return None
    if not address.is_loopback:
        return None
    name = f"[{address.compressed}]" if address.version == 6 else address.compressed
    return LOOPBACK_HOSTS + ([name] if name not in LOOPBACK_HOSTS else [])


ENGINE_FLAGS = ("kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens")  # engine fields with a flag here


def as_flags(message: str) -> str:
    """An engine message with its field names written as this command's flags.

    Example:
        >>> as_flags("kv_cache_tokens=64 is too small: raise kv_cache_tokens")
        '--kv-cache-tokens=64 is too small: raise --kv-cache-tokens'
    """
    return re.sub(r"\b(" + "|".join(ENGINE_FLAGS) + r")\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


def add_app_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's and the app's options, shared by ``gpt2fast serve`` and the Ray Serve application
    (``gpt2fast.ray_serve``); ``app_from_args`` builds the app from them.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_app_arguments(p)
        >>> p.parse_args(["--model", "m", "--quantization", "int8"]).quantization
        'int8'
    """
    p.add_argument("--model", required=True, help="random:<preset>, a Hugging Face or OpenAI folder, or a Hub id")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require `Authorization: Bearer KEY` on /v1/* (default: ${API_KEY_ENV}, else no key)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="sequences admitted beyond the batch before new requests get 503 + Retry-After")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one step (prefill chunks)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens (default: engine's)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    p.add_argument("--backend", default=None, choices=BACKENDS)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quantization", default="none", choices=["none", *QUANTIZATIONS],
                   help="int8: weight-only int8, quantized as it loads (every backend)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None)
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 on a CPU shared with other busy processes)")


def app_from_args(args: argparse.Namespace, *, allowed_hosts: list[str] | None = None,
                  body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    """The engine and the OpenAI app that ``add_app_arguments``' options describe (``--cpu-threads`` applied first).
    Bad options raise ``ValueError`` (``CheckpointError`` for a model that cannot load) naming the engine's fields
    (``kv_cache_tokens``: the Ray Serve application's option names; ``main`` writes them as flags).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_app_arguments(p)
        >>> app_from_args(p.parse_args(["--model", 'random:{"n_layer": 1, "n_embd": 8, "n_head": 2}'])).title
        'gpt2fast'
    """
    import torch

    from gpt2fast.engine import Engine

    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            raise ValueError(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
        torch.set_num_threads(args.cpu_threads)
    engine = Engine(args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                    max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    kv_cache_tokens=args.kv_cache_tokens, cuda_graphs=args.cuda_graphs, quantization=args.quantization)
    return make_app(engine, model_name=args.served_model_name or args.model, api_key=args.api_key,
                    max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, allowed_hosts=allowed_hosts,
                    body_timeout=body_timeout)


def build_parser() -> argparse.ArgumentParser:
    """``gpt2fast serve`` arguments.

    Example:
        >>> args = build_parser().parse_args(["--model", "random:gpt2", "--max-num-seqs", "8"])
        >>> args.host, args.port, args.max_num_seqs, args.max_queue
        ('127.0.0.1', 8000, 8, 256)
    """
    p = argparse.ArgumentParser(prog="gpt2fast serve", description="OpenAI-compatible completions server on the "
                                "gpt2fast engine (POST /v1/completions, GET /v1/models, /health, /metrics).")
    add_app_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds SIGTERM/SIGINT waits for open connections before cancelling them")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs time under load)")
    add_arguments(p)
    return p


class _Server(LimitedServer):
    """uvicorn, with the connection limits, told first when a signal arrives, and without re-raising the
    signal after a clean shutdown.

    (uvicorn's own ``handle_exit`` records the signal and raises it again once shut down, so SIGTERM
    would end the process with status -15 instead of 0.)
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.begin_exit()  # abort in-flight engine requests so open streams end and shutdown can complete
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"gpt2fast serve: {self.config.app.state.frontend.model_name} at http://{host}:{port}/v1 "
                  f"(POST /v1/completions; GET /v1/models, /health, /metrics)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit status (0 after a clean stop, 2 for bad arguments).

    Example:
        >>> main(["--model", "/no/such/folder"])
        2
    """
    args = build_parser().parse_args(argv)
    try:
        limits = ConnectionLimits.from_args(args)
        check_port(args.port)  # uvicorn would fail late, with an OverflowError traceback
    except ValueError as e:
        print(f"gpt2fast serve: error: {e}", file=sys.stderr)
        return 2
    try:
        app = app_from_args(args, allowed_hosts=loopback_host_names(args.host), body_timeout=limits.body_timeout)
    except (ValueError, CheckpointError) as e:
        print(f"gpt2fast serve: error: {as_flags(str(e))}", file=sys.stderr)
        return 2
    if app.state.frontend.loop.engine.is_random:
        print(f"gpt2fast serve: warning: {args.model} has random weights: completions are gibberish.", file=sys.stderr)
    if loopback_host_names(args.host) is None and not args.api_key:
        print(f"gpt2fast serve: warning: listening on {args.host} without --api-key: anyone who reaches it can use it",
              file=sys.stderr)
    config = uvicorn_config(app, limits, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on")
    server = _Server(config, on_exit=app.state.frontend.begin_shutdown)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits this way when it cannot bind or start
        return e.code if isinstance(e.code, int) else 1
    return 0
