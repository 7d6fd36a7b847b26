"""The engine thread: the only code that touches the ``Engine`` once the server runs.

It drains a thread-safe inbox (add, abort, score, close, stop) between steps, steps while
anything is unfinished, and otherwise blocks on the inbox. What each request is owed goes back
to the asyncio loop in one ``call_soon_threadsafe`` per iteration, as ``deliver(kind, payload)``
calls: ``"output"`` (the cumulative ``RequestOutput``), ``"scored"`` (prompt logprobs and ranks),
``"error"`` (an ``ApiError``), ``"aborted"`` (the server is closing). Scoring is an engine request
like any other (``Engine.add_scoring_request``): it waits for KV blocks in the scheduler's queue.

Every add and score is answered, even when the thread ends: on its way out (stopped, or killed by an
unexpected exception) it answers what it took but never handled and what is still in the inbox, and
one sent after that is answered at once (503 ``engine_stopped``, or ``"aborted"`` after a clean stop).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from gpt2fast.engine import Engine
from gpt2fast.outputs import RequestOutput
from gpt2fast.sampling import SamplingParams
from gpt2fast.server.metrics import ServerMetrics
from gpt2fast.server.protocol import ApiError

log = logging.getLogger("gpt2fast.server")

Deliver = Callable[[str, Any], None]  # runs on the asyncio loop: (kind, payload)


@dataclass
class _Live:
    """An engine request in flight, as the thread tracks it for metrics and for aborts."""

    deliver: Deliver
    arrival: float
    n: int  # samples (0 for prompt scoring, which samples nothing)
    tokens: int = 0
    last_token: float | None = None
    done: set[int] = field(default_factory=set)  # samples that have finished
    score: bool = False  # prompt scoring: delivers "scored" (the prompt logprobs) once, when its prefill is done


class EngineLoop:
    """Owns an ``Engine`` on one thread; every other thread talks to it through ``add``/``abort``/``score``.

    Example:
        >>> import asyncio
        >>> from gpt2fast.outputs import RequestOutput
        >>> async def demo():
        ...     loop = EngineLoop(Engine('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}'))
        ...     loop.start(asyncio.get_running_loop())
        ...     done = asyncio.get_running_loop().create_future()
        ...     def deliver(kind, out):
        ...         if kind == "output" and out.finished:
        ...             done.set_result(out)
        ...     loop.add("r0", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0), deliver)
        ...     out = await done
        ...     loop.stop()
        ...     return len(out.outputs[0].token_ids), loop.engine.pool.num_free == loop.engine.pool.num_blocks
        >>> asyncio.run(demo())
        (3, True)
    """

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.max_num_seqs = engine.scheduler.max_num_seqs
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()  # put() is safe from a signal handler
        self._pending: deque[tuple] = deque()  # taken from the inbox, not yet handled (answered if the thread ends)
        self._lock = threading.Lock()  # an add/score either reaches the inbox before the thread ends, or is answered
        self._ended = False  # the thread takes no more work
        self._live: dict[str, _Live] = {}
        self._score_ids = itertools.count()  # next() is atomic under the GIL: any thread may score
        self._outbox: list[tuple[Deliver, str, Any]] = []
        self._closed = False
        self._dirty = True  # something changed since the last idle pool check
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # why the thread died, if it did
        self.metrics.blocks_total.set(engine.pool.num_blocks)
        self._publish()

    # ---- any thread -----------------------------------------------------------------------------

    def start(self, aloop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; results are delivered on ``aloop``."""
        self._aloop = aloop
        self._thread = threading.Thread(target=self._run, name="gpt2fast-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def ended(self) -> bool:
        """True once the thread takes no more work: it was stopped, or it died (``failure`` says why)."""
        return self._ended or self.failure is not None

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, deliver: Deliver) -> None:
        """Queue an engine request; ``deliver`` gets its outputs (or an error, or ``"aborted"``)."""
        self._submit(("add", request_id, prompt_ids, params, deliver, time.monotonic()))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (the client went away: nothing is delivered)."""
        self._inbox.put(("abort", request_id))

    def score(self, prompt_ids: list[int], top_n: int, deliver: Deliver) -> str:
        """Prompt logprobs: ``deliver("scored", (entries, ranks))``, ``entries[i]`` for token ``i`` (``None`` for the
        first) and ``ranks[i]`` its rank in the model's next-token distribution (1 = likeliest; ``None`` first).

        Queued through the scheduler like any prefill; returns its request id, for ``abort``.
        """
        request_id = f"score-{next(self._score_ids)}"
        self._submit(("score", request_id, prompt_ids, top_n, deliver))
        return request_id

    def close(self) -> None:
        """Abort everything in flight (each is told ``"aborted"``) and refuse what comes after."""
        self._inbox.put(("close",))

    def stop(self, timeout: float = 30.0) -> None:
        """Close, then end the thread and wait for it."""
        self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    def _submit(self, command: tuple) -> None:
        """Queue an add/score for the thread, or, once it has ended, answer it at once (nothing would read it)."""
        with self._lock:
            if not self._ended:
                self._inbox.put(command)
                return
        self._answer_unhandled([command])
        self._flush()

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        if self.engine.device.type == "cuda":  # a new thread starts on device 0; the engine may live elsewhere
            torch.cuda.set_device(self.engine.device)
        try:
            while True:
                self._take(block=not self.engine.has_unfinished())
                while self._pending:
                    command = self._pending[0]  # left in place while handled: if that raises, it is still answered
                    if command[0] == "stop":
                        self._pending.popleft()
                        self._abort_all()
                        return
                    self._handle(command)
                    self._pending.popleft()
                if self.engine.has_unfinished():
                    self._step()
                self._publish()
                self._flush()
        except BaseException as e:  # the thread must not die silently: /health turns 503
            self.failure = e
            log.exception("the engine thread stopped")
            self._fail_all(ApiError(500, f"the engine stopped: {e}"))
        finally:
            with self._lock:
                self._ended = True
            self._take(block=False)  # what was queued before that: nobody else will ever read it
            self._answer_unhandled(self._pending)
            self._pending.clear()
            self._flush()

    def _take(self, block: bool) -> None:
        """Move what the inbox holds to ``_pending`` (waiting for a first command when ``block``)."""
        if block:
            self._pending.append(self._inbox.get())
        while True:
            try:
                self._pending.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _answer_unhandled(self, commands: Iterable[tuple]) -> None:
        """Tell the senders of adds and scores the thread will never handle: an error if it died, else aborted."""
        stopped = ApiError(503, "The engine has stopped; see the server log", code="engine_stopped")
        for command in commands:
            if command[0] == "add":
                self._send(command[4], *(("error", stopped) if self.failure is not None else ("aborted", None)))
            elif command[0] == "score":
                self._send(command[4], "error", stopped)

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            self._add(*command[1:])
        elif kind == "abort":
            live = self._live.pop(command[1], None)
            if live is not None:
                self.engine.abort(command[1])
                self.metrics.finished.labels("abort").inc(live.n - len(live.done))
                self._dirty = True
        elif kind == "score":
            self._score(*command[1:])
        elif kind == "close":
            self._closed = True
            self._abort_all()

    def _add(self, request_id: str, ids: list[int], params: SamplingParams, deliver: Deliver, arrival: float) -> None:
        if self._closed:
            self._send(deliver, "aborted", None)
            return
        try:
            self.engine.add_request(request_id, ids, params)
        except ValueError as e:
            self._send(deliver, "error", ApiError(400, str(e)))
            return
        self._live[request_id] = _Live(deliver, arrival, params.n)
        self.metrics.prompt_tokens.inc(len(ids))
        self._dirty = True

    def _score(self, request_id: str, ids: list[int], top_n: int, deliver: Deliver) -> None:
        if self._closed:
            self._send(deliver, "error", ApiError(503, "the server is shutting down", code="shutting_down"))
            return
        try:
            self.engine.add_scoring_request(request_id, ids, top_n)
        except ValueError as e:
            self._send(deliver, "error", ApiError(400, str(e)))
            return
        self._live[request_id] = _Live(deliver, time.monotonic(), 0, score=True)
        self._dirty = True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed step fails what was in it; the server keeps serving
            log.exception("engine step failed")
            self.metrics.step_errors.inc()
            self._fail_all(ApiError(500, f"the engine failed a step: {e}"))
            return
        now = time.monotonic()
        self._dirty = True
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            if live.score:
                if out.finished:
                    del self._live[out.request_id]
                    self._send(live.deliver, *(("scored", (out.prompt_logprobs, out.prompt_ranks)) if out.error is None
                                               else ("error", ApiError(500, out.error, code="nonfinite_logits"))))
                continue
            self._observe(live, out, now)
            if out.finished:
                del self._live[out.request_id]
                self.metrics.e2e.observe(now - live.arrival)
            self._send(live.deliver, "output", out)

    def _observe(self, live: _Live, out: RequestOutput, now: float) -> None:
        tokens, samples = out.num_generated_tokens, out.outputs  # every sample's tokens, also best_of's unreturned
        if tokens > live.tokens:
            self.metrics.generation_tokens.inc(tokens - live.tokens)
            if live.last_token is None:
                self.metrics.ttft.observe(now - live.arrival)
            else:
                self.metrics.itl.observe(now - live.last_token)
            live.tokens, live.last_token = tokens, now
        for s in samples:
            if s.finish_reason is not None and s.index not in live.done:
                live.done.add(s.index)
                self.metrics.finished.labels(s.finish_reason).inc()

    def _abort_all(self) -> None:
        for request_id, live in list(self._live.items()):
            self.engine.abort(request_id)
            self.metrics.finished.labels("abort").inc(live.n - len(live.done))
            self._send(live.deliver, "aborted", None)
        self._live.clear()
        self._dirty = True

    def _fail_all(self, error: ApiError) -> None:
        for request_id, live in list(self._live.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine may be what broke; the client still hears why
                log.exception("abort after a failure")
            self._send(live.deliver, "error", error)
        self._live.clear()

    def _publish(self) -> None:
        """Gauges from the engine's state; the pool's invariants checked whenever the engine falls idle."""
        scheduler, pool, m = self.engine.scheduler, self.engine.pool, self.metrics
        m.running.set(len(scheduler.running))
        m.waiting.set(len(scheduler.waiting))
        m.blocks_free.set(pool.num_free)
        m.blocks_used.set(pool.num_blocks - pool.num_free)
        if self._dirty and not self.engine.has_unfinished():
            self._dirty = False
            try:
                scheduler.check()
                ok = 1
            except AssertionError:
                log.exception("KV block pool check failed")
                ok = 0
            m.pool_ok.set(ok)
            m.pool_checks.inc()

    def _send(self, deliver: Deliver, kind: str, payload: Any) -> None:
        with self._lock:  # the engine thread and, once it has ended, _submit's callers
            self._outbox.append((deliver, kind, payload))

    def _flush(self) -> None:
        with self._lock:
            if not self._outbox or self._aloop is None:
                return
            batch, self._outbox = self._outbox, []
        try:
            self._aloop.call_soon_threadsafe(_deliver_all, batch)
        except RuntimeError:  # the asyncio loop has closed: nobody is left to tell
            pass


def _deliver_all(batch: list[tuple[Deliver, str, Any]]) -> None:
    for deliver, kind, payload in batch:
        try:
            deliver(kind, payload)
        except Exception:
            log.exception("delivering %s failed", kind)
