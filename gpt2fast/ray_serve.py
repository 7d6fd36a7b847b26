"""The OpenAI-compatible server as a Ray Serve application: ``gpt2fast serve``'s app in every replica, one endpoint.

    serve run gpt2fast.ray_serve:app model=random:gpt2 num_replicas=2 max_num_seqs=16   # pip install -e ".[ray]"

or from Python ``serve.run(build_app({"model": "random:gpt2", "num_replicas": 2}))``. Options: ``gpt2fast serve``'s
engine and app flags as ``key=value`` (``model``, ``backend``, ``dtype``, ``quantization``, ``max_num_seqs``,
``kv_cache_tokens``, ``api_key``, ...: ``server.serve.add_app_arguments``) and the deployment's (``build_parser``):
``num_replicas``, or autoscaling with ``min_replicas`` / ``max_replicas`` / ``target_ongoing_requests``;
``num_gpus`` / ``num_cpus`` per replica (default: a GPU where the cluster has GPUs); ``max_ongoing_requests``;
``health_check_period_s``. A bad or unknown option is a ``ValueError`` naming it.

Each replica is a Ray actor process holding one ``Engine`` and the very app ``gpt2fast serve`` runs
(``app_from_args``): the same parsing, validation, OpenAI errors, SSE and ``/metrics``. Serve's proxy owns the port
and routes each request, streams included, to a lightly loaded replica. A replica takes ``max_ongoing_requests`` at a
time (default ``max_num_seqs``, a full batch); Serve queues the rest and hands each to the first replica with room,
instead of replicas queueing behind their own batches while another idles (a replica's own admission still bounds
requests with a large ``n``). A client that hangs up is cancelled through the proxy: the replica aborts the request
and frees its blocks. ``check_health`` fails once the engine thread has ended, and Serve replaces the replica. Every
response names its replica in ``x-gpt2fast-replica``. Not done: a request never spans replicas (no tensor or pipeline
parallelism), replicas share no KV or prefix cache, and ``/metrics`` is the answering replica's alone.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from gpt2fast.server.serve import add_app_arguments, app_from_args

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

REPLICA_HEADER = "x-gpt2fast-replica"
DEPLOYMENT_NAME = "OpenAIServer"
# The deployment's options (the rest are the app's: add_app_arguments); autoscaling keys replace num_replicas.
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests")


class _RaisingParser(argparse.ArgumentParser):
    """A parser that raises ``ValueError`` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"gpt2fast.ray_serve: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The application's options: ``gpt2fast serve``'s engine and app flags, then the deployment's.

    Example:
        >>> build_parser().parse_args(["--model", "m", "--num-replicas", "2"]).num_replicas
        2
    """
    p = _RaisingParser(prog="gpt2fast.ray_serve", add_help=False)
    add_app_arguments(p)
    p.add_argument("--num-replicas", type=int, default=None, help="replicas (default 1; not with autoscaling)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling: requests per replica Serve aims for")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 where Ray has GPUs)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica (default 1)")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests a replica takes at a time; Serve queues the rest (default: max_num_seqs)")
    p.add_argument("--health-check-period-s", type=float, default=10.0, help="seconds between replica health checks")
    return p


def parse_options(options: dict[str, Any]) -> argparse.Namespace:
    """``key=value`` options (``serve run``'s, or a dict from Python) as the parsed flags; ``ValueError`` on a bad one.

    ``True``/``False`` (or the strings ``true``/``false``) are accepted for ``cuda_graphs``.

    Example:
        >>> args = parse_options({"model": "random:gpt2", "max_num_seqs": "8", "cuda_graphs": "false"})
        >>> args.max_num_seqs, args.cuda_graphs, args.num_replicas
        (8, False, None)
        >>> parse_options({"model": "m", "max_num_seq": 8})
        Traceback (most recent call last):
        ...
        ValueError: gpt2fast.ray_serve: unknown option max_num_seq; see gpt2fast/ray_serve.py for the options
    """
    known = {a.dest for a in build_parser()._actions}
    argv: list[str] = []
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"gpt2fast.ray_serve: unknown option {key}; see gpt2fast/ray_serve.py for the options")
        if key == "cuda_graphs":
            on = str(value).lower()
            if on not in ("true", "false"):
                raise ValueError(f"gpt2fast.ray_serve: cuda_graphs must be true or false, got {value!r}")
            if on == "false":
                argv.append("--no-cuda-graphs")
            continue
        argv += [f"--{key.replace('_', '-')}", str(value)]
    args = build_parser().parse_args(argv)
    autoscaling = [k for k in AUTOSCALING_KEYS if getattr(args, k) is not None]
    if autoscaling and args.num_replicas is not None:
        raise ValueError(f"gpt2fast.ray_serve: num_replicas is fixed; {', '.join(autoscaling)} are for autoscaling: "
                         "give one or the other")
    for key in ("num_replicas", "min_replicas", "max_replicas", "max_ongoing_requests"):
        value = getattr(args, key)
        if value is not None and value < (0 if key == "min_replicas" else 1):
            raise ValueError(f"gpt2fast.ray_serve: {key} must be at least {0 if key == 'min_replicas' else 1}, "
                             f"got {value}")
    return args


def deployment_options(args: argparse.Namespace, gpus_available: bool) -> dict[str, Any]:
    """``serve.deployment`` options for ``args``: replicas or autoscaling, resources, the requests each replica takes
    at a time (``max_ongoing_requests``, default ``max_num_seqs``) and the health-check period.

    Example:
        >>> opts = deployment_options(parse_options({"model": "m", "num_replicas": 2, "max_num_seqs": 4}), False)
        >>> opts["num_replicas"], opts["ray_actor_options"], opts["max_ongoing_requests"]
        (2, {'num_cpus': 1.0, 'num_gpus': 0.0}, 4)
    """
    options: dict[str, Any] = {"name": DEPLOYMENT_NAME, "max_ongoing_requests": args.max_ongoing_requests or
                               args.max_num_seqs, "health_check_period_s": args.health_check_period_s}
    if any(getattr(args, k) is not None for k in AUTOSCALING_KEYS):
        options["autoscaling_config"] = {k: getattr(args, k) for k in AUTOSCALING_KEYS if getattr(args, k) is not None}
    else:
        options["num_replicas"] = args.num_replicas or 1
    gpus = args.num_gpus if args.num_gpus is not None else (1.0 if gpus_available else 0.0)
    options["ray_actor_options"] = {"num_cpus": args.num_cpus if args.num_cpus is not None else 1.0, "num_gpus": gpus}
    return options


class OpenAIReplica:
    """One replica: the engine and the OpenAI app built in the replica's process (``serve.ingress``'s builder), a
    health check on its engine thread, and ``stop_engine`` for an operator (a ``DeploymentHandle`` call, not HTTP).
    """

    app: FastAPI  # set by Serve's ASGI wrapper from the builder

    def check_health(self) -> None:
        """Raise once the engine thread has ended: Serve marks the replica unhealthy and starts another."""
        loop = self.app.state.frontend.loop
        if not loop.alive:
            raise RuntimeError(f"gpt2fast replica {os.getpid()}: the engine thread has ended"
                               + (f" ({loop.failure!r})" if loop.failure is not None else ""))

    def stop_engine(self) -> str:
        """Stop this replica's engine (its requests end as aborted) and return the replica's name; the next health
        check has Serve replace it."""
        self.app.state.frontend.loop.stop()
        return self.app.state.replica


class _ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that answered (``x-gpt2fast-replica``)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def replica_app(args: argparse.Namespace) -> FastAPI:
    """The app one replica serves: ``gpt2fast serve``'s over a fresh engine, with the replica's name on every response.

    Example:
        >>> app = replica_app(parse_options({"model": 'random:{"n_layer": 1, "n_embd": 8, "n_head": 2}'}))
        >>> app.state.frontend.model_name.startswith("random:")
        True
    """
    app = app_from_args(args)  # any Host: Serve's proxy is where the network policy lives
    app.state.replica = _replica_name()
    app.add_middleware(_ReplicaHeader, replica=app.state.replica)
    return app


def _replica_name() -> str:
    """Serve's id of this replica, or the process id outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a replica (a test building the app directly), or an older Ray
        return f"pid-{os.getpid()}"


def build_app(options: dict[str, Any]) -> Application:
    """The Ray Serve application for ``options`` (see the module docstring): ``serve run`` calls it with the
    ``key=value`` arguments, Python with a dict.

    Example (needs ray[serve]; a running Ray instance serves it):
        >>> from ray import serve  # doctest: +SKIP
        >>> handle = serve.run(build_app({"model": "random:gpt2", "num_replicas": 2}))  # doctest: +SKIP
    """
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ImportError('gpt2fast.ray_serve needs Ray Serve: pip install -e ".[ray]"') from e
    args = parse_options(options)

    def build() -> FastAPI:  # runs in each replica's process
        return replica_app(args)

    replica = serve.ingress(build)(OpenAIReplica)
    return serve.deployment(replica, **deployment_options(args, _gpus_available(ray))).bind()


def _gpus_available(ray: Any) -> bool:
    """Whether replicas should take a GPU by default: the Ray cluster has GPUs, or (``serve run`` builds the app
    before it connects to Ray) this machine has one."""
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


app = build_app  # `serve run gpt2fast.ray_serve:app key=value ...` calls it with the options
