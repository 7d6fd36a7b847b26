"""The server's Prometheus metrics, in a ``CollectorRegistry`` of their own (one per app).

Counters and histograms are updated where things happen (HTTP handlers, the engine thread);
gauges are what the engine thread publishes after each step. prometheus_client's metrics are
thread-safe, so both sides write them directly.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Buckets in seconds: CPU tiny models answer in milliseconds, a loaded GPU in tenths of a second.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Everything ``GET /metrics`` reports, prefixed ``gpt2fast_``.

    Example:
        >>> m = ServerMetrics()
        >>> m.prompt_tokens.inc(3)
        >>> b"gpt2fast_prompt_tokens_total 3.0" in m.render()
        True
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("gpt2fast_requests", "Completion requests answered, by HTTP status",
                                ["status"], registry=registry)
        self.finished = Counter("gpt2fast_finished_sequences", "Sequences (choices) ended, by finish reason",
                                ["reason"], registry=registry)
        self.prompt_tokens = Counter("gpt2fast_prompt_tokens", "Prompt tokens admitted", registry=registry)
        self.generation_tokens = Counter("gpt2fast_generation_tokens", "Tokens generated", registry=registry)
        self.running = Gauge("gpt2fast_num_requests_running", "Sequences in the running batch", registry=registry)
        self.waiting = Gauge("gpt2fast_num_requests_waiting", "Sequences waiting to be scheduled", registry=registry)
        self.admitted = Gauge("gpt2fast_num_sequences_admitted", "Sequences of in-flight HTTP requests",
                              registry=registry)
        self.blocks_used = Gauge("gpt2fast_kv_blocks_used", "KV cache blocks held by sequences", registry=registry)
        self.blocks_free = Gauge("gpt2fast_kv_blocks_free", "KV cache blocks free (cached prefixes included)",
                                 registry=registry)
        self.blocks_total = Gauge("gpt2fast_kv_blocks_total", "KV cache blocks in the pool", registry=registry)
        self.pool_ok = Gauge("gpt2fast_kv_pool_check_ok", "1 if the block pool's invariants held at the last "
                             "idle check (BlockPool.check against every live table), else 0", registry=registry)
        self.pool_checks = Counter("gpt2fast_kv_pool_checks", "Idle-time block pool checks run", registry=registry)
        self.ttft = Histogram("gpt2fast_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("gpt2fast_inter_token_latency_seconds", "Time between a request's successive tokens",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("gpt2fast_e2e_request_latency_seconds", "Arrival to last token of an engine request",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.step_errors = Counter("gpt2fast_engine_errors", "Engine steps that raised", registry=registry)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
