"""The FastAPI app: routes, API keys, body limits, admission, and turning engine outputs into OpenAI JSON/SSE."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import Receive, Scope, Send

from gpt2fast.engine import Engine
from gpt2fast.http_limits import BodyError, ConnectionLimits, read_body
from gpt2fast.outputs import CompletionOutput, RequestOutput
from gpt2fast.sampling import SamplingParams
from gpt2fast.server.loop import EngineLoop
from gpt2fast.server.metrics import ServerMetrics
from gpt2fast.server.protocol import (
    DEFAULT_MAX_TOKENS,
    MAX_N,
    ApiError,
    CompletionRequest,
    LogprobsWriter,
    ModelLimits,
    Prompt,
    StreamOptions,
    check_json_lists,
    check_lengths,
    check_prompt_count,
    merge_logprobs,
    parse_json_object,
    prompt_logprobs_field,
    split_prompts,
    validation_error,
)

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_QUEUE = 256
DEFAULT_BODY_TIMEOUT = ConnectionLimits().body_timeout
CHAT_MESSAGE = ("GPT-2 is a base model with no chat template, so /v1/chat/completions is not served. Send the text "
                "to continue to /v1/completions instead.")


class AsciiJSONResponse(JSONResponse):
    """JSON as ASCII (``\\uXXXX`` escapes): whatever text gets in, even half a UTF-16 pair, the body encodes.

    Example:
        >>> AsciiJSONResponse({"text": "caf\u00e9 \\ud800"}).body
        b'{"text":"caf\\\\u00e9 \\\\ud800"}'
    """

    def render(self, content: Any) -> bytes:
        """``content`` as compact ASCII JSON; NaN or infinity raise (JSON has neither)."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class Frontend:
    """What the HTTP side shares: the engine loop, the limits, and how many sequences are admitted.

    Example:
        >>> front = Frontend(Engine('random:{"n_layer": 1, "n_embd": 8, "n_head": 2}', max_num_seqs=2),
        ...                  model_name="tiny", api_key=None, max_queue=1, max_body_bytes=1024)
        >>> front.admit(3)
        >>> try:
        ...     front.admit(1)
        ... except ApiError as e:
        ...     print(e.status, e.headers, e.message)
        503 {'Retry-After': '1'} The server is busy: 3 sequences are running or queued (limit 3); retry shortly
    """

    def __init__(self, engine: Engine, *, model_name: str, api_key: str | None, max_queue: int,
                 max_body_bytes: int, body_timeout: float = DEFAULT_BODY_TIMEOUT) -> None:
        if max_queue < 0 or max_body_bytes < 1:
            raise ValueError(f"max_queue must be >= 0 and max_body_bytes >= 1, got {max_queue}, {max_body_bytes}")
        self.metrics = ServerMetrics()
        self.loop = EngineLoop(engine, self.metrics)
        self.model_name, self.api_key, self.max_body_bytes = model_name, api_key, max_body_bytes
        self.body_timeout = body_timeout
        self.stopping: asyncio.Event | None = None  # set at shutdown: bodies still arriving are answered 503
        self.aio: asyncio.AbstractEventLoop | None = None  # the server's event loop, once its lifespan starts
        self.capacity = self.loop.max_num_seqs + max_queue  # sequences in flight: the batch plus the queue
        cfg = engine.config
        self.limits = ModelLimits(engine.tokenizer, cfg.vocab_size, cfg.n_positions, cfg.eos_token_id, self.capacity)
        self.quantization = engine.quantization  # None or "int8": in the model card of GET /v1/models
        self.created = int(time.time())
        self.admitted = 0
        self.shutting_down = False

    def begin_shutdown(self) -> None:
        """Refuse new requests and abort the ones in flight (safe to call from a signal handler)."""
        if not self.shutting_down:
            self.shutting_down = True
            self.loop.close()
            if self.aio is not None and self.stopping is not None:  # call_soon_threadsafe: safe in a signal handler
                self.aio.call_soon_threadsafe(self.stopping.set)

    def admit(self, seqs: int) -> None:
        """Count ``seqs`` more sequences in flight, or ApiError 503: shutting down, engine stopped, or full."""
        if self.shutting_down:
            raise ApiError(503, "The server is shutting down", code="shutting_down")
        if self.loop.ended:  # nothing would ever answer the request
            raise ApiError(503, "The engine has stopped; see the server log", code="engine_stopped")
        if self.admitted + seqs > self.capacity:
            raise ApiError(503, f"The server is busy: {self.admitted} sequences are running or queued (limit "
                           f"{self.capacity}); retry shortly", code="overloaded", headers={"Retry-After": "1"})
        self.admitted += seqs
        self.metrics.admitted.set(self.admitted)

    def release(self, seqs: int) -> None:
        """Give back what ``admit(seqs)`` took (the request ended, however it ended)."""
        self.admitted -= seqs
        self.metrics.admitted.set(self.admitted)

    async def score(self, ids: list[int], top_n: int) -> tuple[list, list]:
        """Prompt logprobs and ranks: a prefill-only engine request, queued (waiting for KV blocks) like any other."""
        future = asyncio.get_running_loop().create_future()

        def deliver(kind: str, payload: object) -> None:
            if future.done():
                return
            if kind == "scored":
                future.set_result(payload)
            else:
                future.set_exception(payload if kind == "error" else ApiError(
                    503, "The server is shutting down; the request was not finished", code="shutting_down"))

        request_id = self.loop.score(ids, top_n, deliver)
        try:
            return await future
        except asyncio.CancelledError:  # nobody waits for it any more
            self.loop.abort(request_id)
            raise


class _Job:
    """One HTTP completion request: its engine requests (one per prompt, each with ``n`` samples) and their outputs."""

    def __init__(self, frontend: Frontend, prompts: list[Prompt], params: SamplingParams, *, n: int, echo: bool,
                 logprobs: int | None, generate: bool = True, prompt_logprobs: int | None = None,
                 token_ids: bool = False) -> None:
        self.frontend, self.prompts, self.params = frontend, prompts, params
        self.n, self.echo, self.logprobs, self.generate = n, echo, logprobs, generate
        self.prompt_logprobs, self.token_ids = prompt_logprobs, token_ids  # vLLM's extras
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.engine_ids = [f"{self.id}-{i}" for i in range(len(prompts))]
        self.outputs: list[RequestOutput | None] = [None] * len(prompts)
        self.scores: list[list | None] = [None] * len(prompts)
        self.prompt_scores: list[list | None] = [None] * len(prompts)  # vLLM's prompt_logprobs field, per prompt
        self.open: set[int] = set()  # prompts whose engine request has not ended
        self.error: ApiError | None = None
        self.aborted = False
        self.changed = asyncio.Event()
        self.seqs = len(prompts) * params.num_samples  # best_of of them run
        self.closed = False

    async def start(self) -> None:
        """Score prompts if echoed with logprobs, then submit every prompt (or finish at once for max_tokens=0)."""
        if self.echo and self.logprobs is not None:
            for i, prompt in enumerate(self.prompts):
                self.scores[i] = (await self.frontend.score(prompt.ids, self.logprobs))[0]
        if self.prompt_logprobs is not None:  # through the same scoring pass as echo (a separate one: its own top-N)
            tokenizer = self.frontend.limits.tokenizer
            for i, prompt in enumerate(self.prompts):
                entries, ranks = await self.frontend.score(prompt.ids, self.prompt_logprobs)
                self.prompt_scores[i] = prompt_logprobs_field(tokenizer, entries, ranks)
        if not self.generate:  # max_tokens=0: the echo (and its logprobs) is the whole answer
            samples = [CompletionOutput(j, "", [], "length", [] if self.logprobs is not None else None)
                       for j in range(self.n)]
            self.outputs = [RequestOutput(rid, p.text, p.ids, samples, True)
                            for rid, p in zip(self.engine_ids, self.prompts)]
            self.changed.set()
            return
        for i, prompt in enumerate(self.prompts):
            self.open.add(i)
            self.frontend.loop.add(self.engine_ids[i], prompt.ids, self.params, self._deliver_for(i))

    def _deliver_for(self, i: int):
        def deliver(kind: str, payload: object) -> None:
            if kind == "output" and payload.error is not None:  # its logits went non-finite: it alone fails
                kind, payload = "error", ApiError(500, payload.error, code="nonfinite_logits")
            if kind == "output":
                self.outputs[i] = payload
                if payload.finished:
                    self.open.discard(i)
            else:
                self.open.discard(i)
                if kind == "error":
                    self.error = self.error or payload
                else:
                    self.aborted = True
            self.changed.set()

        return deliver

    @property
    def done(self) -> bool:
        return not self.open

    async def updates(self) -> AsyncIterator[None]:
        """Wake once per batch of deliveries (outputs are cumulative, so a slow reader skips ahead)."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            yield
            if self.done:
                return

    def close(self) -> None:
        """Abort what still runs (the client left, or the response ended) and give the admission back."""
        if self.closed:
            return
        self.closed = True
        for i in self.open:
            self.frontend.loop.abort(self.engine_ids[i])
        self.open.clear()
        self.frontend.release(self.seqs)

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        completion = sum(out.num_generated_tokens for out in self.outputs if out is not None)  # best_of's too
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.frontend.model_name, "choices": choices, "system_fingerprint": None}


class _ChoiceStream:
    """What one choice has sent so far; ``delta`` is the next piece of it."""

    def __init__(self, job: _Job, index: int) -> None:
        self.index, self.sent_text, self.sent_tokens, self.finished = index, 0, 0, False
        self.writer = (LogprobsWriter(job.frontend.limits.tokenizer, token_ids=job.token_ids,
                                      skip_special_tokens=job.params.skip_special_tokens)
                       if job.logprobs is not None else None)

    def prefix(self, prompt: Prompt, scores: list | None) -> dict:
        """The echoed prompt (and its logprobs), as the choice's first piece."""
        logprobs = self.writer.write(prompt.ids, scores) if self.writer is not None else None
        return {"index": self.index, "text": prompt.text, "logprobs": logprobs, "finish_reason": None}

    def delta(self, sample: CompletionOutput) -> dict | None:
        text, tokens = sample.text[self.sent_text:], sample.token_ids[self.sent_tokens:]
        finish = sample.finish_reason if not self.finished else None
        if not text and not tokens and finish is None:
            return None
        logprobs = None
        if self.writer is not None:
            logprobs = self.writer.write(tokens, (sample.logprobs or [])[self.sent_tokens:len(sample.token_ids)],
                                         generated=True)
        self.sent_text, self.sent_tokens = len(sample.text), len(sample.token_ids)
        self.finished = finish is not None
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _complete_body(job: _Job) -> dict:
    """The non-streaming response: every choice whole, in prompt-major order, with usage."""
    choices = []
    for i, (prompt, out) in enumerate(zip(job.prompts, job.outputs)):
        for sample in out.outputs:
            stream = _ChoiceStream(job, i * job.n + sample.index)
            head = stream.prefix(prompt, job.scores[i]) if job.echo else {"text": "", "logprobs": None}
            tail = stream.delta(sample)  # a finished sample always has a last piece: its finish_reason
            choices.append({"index": stream.index, "text": head["text"] + tail["text"],
                            "logprobs": merge_logprobs(head["logprobs"], tail["logprobs"]),
                            "finish_reason": tail["finish_reason"]})
            if job.prompt_logprobs is not None:
                choices[-1]["prompt_logprobs"] = job.prompt_scores[i]
    body = job.envelope(choices)
    body["usage"] = job.usage()
    return body


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def _usage_field(job: _Job, options: StreamOptions | None, stream: _ChoiceStream) -> dict:
    """A chunk's ``usage``: the choice's counts so far (vLLM's ``continuous_usage_stats``), ``None`` before the
    final usage chunk (``include_usage``), or no field."""
    if options is None or not options.usage:
        return {}
    if not options.continuous_usage:
        return {"usage": None}
    prompt = len(job.prompts[stream.index // job.n].ids)
    return {"usage": {"prompt_tokens": prompt, "completion_tokens": stream.sent_tokens,
                      "total_tokens": prompt + stream.sent_tokens}}


async def _stream_events(job: _Job, options: StreamOptions | None) -> AsyncIterator[str]:
    """Server-sent events: one chunk per choice piece, the final piece with ``finish_reason``, then ``[DONE]``."""
    streams = {}
    for i, prompt in enumerate(job.prompts):
        for j in range(job.n):
            stream = streams[i * job.n + j] = _ChoiceStream(job, i * job.n + j)
            if job.echo:
                yield _sse(job.envelope([stream.prefix(prompt, job.scores[i])]) | _usage_field(job, options, stream))
    async for _ in job.updates():
        for i, out in enumerate(job.outputs):
            for sample in out.outputs if out is not None else []:
                stream = streams[i * job.n + sample.index]
                piece = stream.delta(sample)
                if piece is not None:
                    yield _sse(job.envelope([piece]) | _usage_field(job, options, stream))
    if job.error is not None:
        yield _sse(job.error.body())
    else:
        for stream in streams.values():  # the server is closing: every choice still open ends here
            if not stream.finished:
                yield _sse(job.envelope([{"index": stream.index, "text": "", "logprobs": None,
                                          "finish_reason": "abort"}]) | _usage_field(job, options, stream))
        if options is not None and options.usage:
            yield _sse(job.envelope([]) | {"usage": job.usage()})
    yield _sse("[DONE]")


class _JobStream(StreamingResponse):
    """A streaming response that always closes its job, however the response ends (done, disconnect, cancel)."""

    def __init__(self, job: _Job, options: StreamOptions | None) -> None:
        super().__init__(_stream_events(job, options), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def _read_body(request: Request, frontend: Frontend) -> bytes:
    """The body, or ApiError: 413 over ``max_body_bytes``, 408 slower than ``body_timeout``, 503 shutting down."""
    try:
        return await read_body(request, frontend.max_body_bytes, frontend.body_timeout, frontend.stopping)
    except BodyError as e:
        code = {413: "request_too_large", 408: "request_timeout", 503: "shutting_down"}.get(e.status)
        headers = {"Connection": "close"} if e.status in (408, 503) else None  # the rest of the body is not read
        raise ApiError(e.status, str(e), code=code, headers=headers) from None


def _check_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}",
                       code="unsupported_media_type")


async def _parse_request(request: Request, frontend: Frontend) -> CompletionRequest:
    _check_json(request)
    body = await _read_body(request, frontend)
    check_json_lists(body, frontend.limits.max_seqs)  # a list of 200,000 prompts costs a parse: refuse it first
    data = parse_json_object(body)
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    if req.model != frontend.model_name:
        raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{frontend.model_name}`",
                       param="model", code="model_not_found")
    req.check_unsupported()
    return req


def _prompt_size(prompt: object) -> int:
    """Characters or token ids in a (not yet checked) prompt, roughly."""
    if isinstance(prompt, list):
        return len(prompt) + sum(len(p) for p in prompt if isinstance(p, str | list))
    return len(prompt) if isinstance(prompt, str) else 0


async def _new_job(req: CompletionRequest, frontend: Frontend) -> _Job:
    """Check the prompts against the model, admit the request, and build its job (not yet started)."""
    check_prompt_count(req.prompt, frontend.limits)  # a huge list is refused before anything walks it
    if _prompt_size(req.prompt) > 8192:  # tokenizing a long text off the event loop keeps other streams flowing
        prompts = await asyncio.to_thread(split_prompts, req.prompt, frontend.limits)
    else:
        prompts = split_prompts(req.prompt, frontend.limits)
    n = req.n or 1
    samples, name = (n, "n") if req.best_of is None else (req.best_of, "best_of")  # best_of >= n: checked already
    if samples > min(MAX_N, frontend.loop.max_num_seqs):
        raise ApiError(400, f"{name}={samples} is more samples than run at once here (max_num_seqs="
                       f"{frontend.loop.max_num_seqs})", param=name)
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    check_lengths(prompts, max_tokens, samples, frontend.limits, name)
    # validated even when nothing is generated
    params = req.sampling_params(max(max_tokens, 1), frontend.limits.vocab_size)
    frontend.admit(len(prompts) * samples)
    return _Job(frontend, prompts, params, n=n, echo=bool(req.echo), logprobs=req.logprobs, generate=max_tokens > 0,
                prompt_logprobs=req.prompt_logprobs, token_ids=bool(req.return_tokens_as_token_ids))


async def _unless_gone(work: Awaitable[None], request: Request) -> bool:
    """Run ``work`` while watching for ``http.disconnect``; False (``work`` cancelled, its cancellation awaited) if the
    client disconnected first. ``work``'s own exception propagates."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(work), asyncio.ensure_future(gone())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # a cancelled score has sent its abort
    if tasks[0] in done:
        tasks[0].result()
        return True
    return False


async def _until_done_or_gone(job: _Job, request: Request) -> bool:
    """Wait for every output; False if the client disconnected first."""
    async def finished() -> None:
        async for _ in job.updates():
            pass

    return await _unless_gone(finished(), request)


def _error_response(frontend: Frontend, error: ApiError) -> Response:
    frontend.metrics.requests.labels(str(error.status)).inc()
    return AsciiJSONResponse(error.body(), status_code=error.status, headers=error.headers)


def make_app(engine: Engine, *, model_name: str, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
             max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_hosts: list[str] | None = None,
             body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    """The OpenAI-compatible app over ``engine``; its engine thread runs for the app's lifespan.

    ``allowed_hosts``: answer only requests whose ``Host`` is one of these (others get 400), so a web
    page elsewhere cannot reach a loopback server through DNS rebinding; None accepts any. ``body_timeout``:
    seconds a request body may take to arrive (then 408).

    Example:
        >>> from fastapi.testclient import TestClient
        >>> app = make_app(Engine('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}'), model_name="tiny")
        >>> with TestClient(app) as client:
        ...     r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3})
        >>> r.status_code, r.json()["usage"]
        (200, {'prompt_tokens': 1, 'completion_tokens': 3, 'total_tokens': 4})
    """
    frontend = Frontend(engine, model_name=model_name, api_key=api_key, max_queue=max_queue,
                        max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    app = FastAPI(title="gpt2fast", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=AsciiJSONResponse)
    app.state.frontend = frontend
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    _add_error_handlers(app)
    keyed = [Depends(_check_key)]
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_api_route("/v1/models", _models, methods=["GET"], dependencies=keyed)
    app.add_api_route("/v1/models/{model_id:path}", _model, methods=["GET"], dependencies=keyed)
    app.add_api_route("/v1/chat/completions", _chat, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/completions", _completions, methods=["POST"], dependencies=keyed)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    frontend: Frontend = app.state.frontend
    frontend.aio, frontend.stopping = asyncio.get_running_loop(), asyncio.Event()  # an Event belongs to one loop
    frontend.loop.start(frontend.aio)
    yield
    frontend.begin_shutdown()
    await asyncio.to_thread(frontend.loop.stop)


def _frontend(request: Request) -> Frontend:
    return request.app.state.frontend


async def _check_key(request: Request) -> None:
    """ApiError 401 unless the server has no key or ``Authorization: Bearer KEY`` carries it."""
    api_key = _frontend(request).api_key
    if api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "You didn't provide an API key. Send it in an Authorization header using Bearer "
                       "auth (Authorization: Bearer YOUR_KEY)", code="missing_api_key")
    if not hmac.compare_digest(key.strip().encode(), api_key.encode()):
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


async def _health(request: Request) -> Response:
    frontend = _frontend(request)
    ok = frontend.loop.alive and not frontend.shutting_down
    return AsciiJSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


async def _metrics(request: Request) -> Response:
    return Response(_frontend(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_card(frontend: Frontend) -> dict:
    return {"id": frontend.model_name, "object": "model", "created": frontend.created, "owned_by": "gpt2fast",
            "max_model_len": frontend.limits.n_positions, "quantization": frontend.quantization}


async def _models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(_frontend(request))]}


async def _model(request: Request, model_id: str) -> dict:
    frontend = _frontend(request)
    if model_id != frontend.model_name:
        raise ApiError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
    return _model_card(frontend)


async def _chat() -> Response:
    raise ApiError(400, CHAT_MESSAGE, code="chat_template_missing")


async def _completions(request: Request) -> Response:
    frontend = _frontend(request)
    req = await _parse_request(request, frontend)
    job = await _new_job(req, frontend)
    try:
        started = await _unless_gone(job.start(), request)  # scoring (echo, prompt_logprobs) may wait for blocks
    except BaseException:
        job.close()
        raise
    if not started:
        job.close()
        return Response(status_code=499)
    if req.stream:
        frontend.metrics.requests.labels("200").inc()
        return _JobStream(job, req.stream_options)
    try:
        if not await _until_done_or_gone(job, request):
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    finally:
        job.close()
    if job.error is not None:
        raise job.error
    if job.aborted:
        raise ApiError(503, "The server is shutting down; the request was not finished", code="shutting_down")
    frontend.metrics.requests.labels("200").inc()
    return AsciiJSONResponse(_complete_body(job))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        return _error_response(_frontend(request), error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        where = f"{request.method} {request.url.path}"
        message = f"Invalid URL ({where})" if error.status_code == 404 else f"{error.detail} ({where})"
        return _error_response(_frontend(request), ApiError(error.status_code, message,
                                                            headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> Response:
        return _error_response(_frontend(request), ApiError(500, f"Internal server error: {type(error).__name__}"))
