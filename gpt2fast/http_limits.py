"""Connection limits for the HTTP commands (``serve``, ``explore``): what uvicorn lacks against idle and slow clients.

uvicorn (its h11 protocol) already gives the idle keep-alive timeout (``timeout_keep_alive``), a cap on the
size of a request's headers (``h11_max_incomplete_event_size``) and the listen backlog; we use those. It has
no header-read or body-read timeout, and nothing caps connections that never finish a request
(``limit_concurrency`` answers 503 only once a whole request has arrived), so sockets that never complete
their headers pile up until file descriptors run out and every accept() logs a traceback. Added here:

* ``LimitedH11Protocol``: uvicorn's ``H11Protocol`` with
  - a connection cap: at ``max_connections`` a new connection closes the one that has waited longest for a
    request (headers not begun or not finished, or idle between keep-alive requests); when none is waiting, the
    upload (a request whose body is still arriving) that received its last bytes longest ago is answered 408 and
    closed, so stalled uploads cannot hold the cap for ``body_timeout``; when every connection has a whole
    request (the app is working on its answer), the new connection gets a 503 at once and is closed. Each is
    counted and logged once per interval;
  - a header timeout: a request's headers must be complete ``header_timeout`` s after its connection opened
    (or after its first byte on a kept-alive connection), else the connection is closed;
  - a body timeout: ``read_body`` answers 408 when a body is not complete ``body_timeout`` s after the app
    starts reading it; a body nobody reads (the app answered first) has its connection closed a second later.
* ``read_body``: the body with a size limit, that timeout, and a stop event (503 at shutdown, not a 500).
* ``raise_fd_limit``: the soft ``RLIMIT_NOFILE`` raised to the hard limit; the cap kept below it.
* ``LimitedServer``: a ``uvicorn.Server`` whose loop logs running out of file descriptors once per interval
  instead of a traceback per failed accept().
* ``add_arguments`` / ``ConnectionLimits.from_args`` (and ``check_port``): flags shared by ``serve``, ``explore``.

At internet scale put a reverse proxy (nginx, envoy) in front anyway: TLS, auth, per-client rate limits.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from starlette.requests import ClientDisconnect, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("uvicorn.error")

FD_RESERVE = 256  # descriptors kept for everything but connections: model files, threads, the GPU driver
LOG_INTERVAL = 10.0  # seconds between two log lines about refused connections or a full descriptor table
BODY_GRACE = 1.0  # the protocol closes an unread body this long after read_body would have answered 408
MAX_HEADER_BYTES = 16 * 1024  # h11's default, stated: larger request headers get 400


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections a server keeps open and how long it waits for a client.

    Example:
        >>> ConnectionLimits().max_connections, ConnectionLimits(header_timeout=2).header_timeout
        (1024, 2)
        >>> ConnectionLimits(body_timeout=0)
        Traceback (most recent call last):
        ...
        ValueError: --body-timeout must be a positive number of seconds, got 0
    """

    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ValueError(f"--max-connections must be a positive integer, got {self.max_connections!r}")
        for flag, value in (("--header-timeout", self.header_timeout), ("--body-timeout", self.body_timeout),
                            ("--keep-alive-timeout", self.keep_alive_timeout)):
            if not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ValueError(f"{flag} must be a positive number of seconds, got {value!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConnectionLimits:
        """The limits ``add_arguments`` parsed (ValueError naming the flag for a bad value)."""
        return cls(args.max_connections, args.header_timeout, args.body_timeout, args.keep_alive_timeout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--max-connections``, ``--header-timeout``, ``--body-timeout`` and ``--keep-alive-timeout``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> ConnectionLimits.from_args(p.parse_args(["--header-timeout", "3"])).header_timeout
        3.0
    """
    d = ConnectionLimits()
    group = parser.add_argument_group("connection limits (put a reverse proxy in front at internet scale)")
    group.add_argument("--max-connections", type=int, default=d.max_connections,
                       help="open connections; beyond it the longest-idle one (else the most stalled upload: 408) is "
                       "closed, or the new one gets 503 "
                       f"(default {d.max_connections}; kept below the file-descriptor limit)")
    group.add_argument("--header-timeout", type=float, default=d.header_timeout,
                       help=f"seconds a client has to send a request's headers (default {d.header_timeout:g})")
    group.add_argument("--body-timeout", type=float, default=d.body_timeout,
                       help=f"seconds a client has to send a request's body; then 408 (default {d.body_timeout:g})")
    group.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout,
                       help=f"seconds an idle connection stays open between requests (default "
                       f"{d.keep_alive_timeout:g})")


def check_port(port: object) -> int:
    """``port`` if it is a TCP port number (0: any free one), else ValueError naming ``--port``.

    Example:
        >>> check_port(8000)
        8000
        >>> check_port(99999)
        Traceback (most recent call last):
        ...
        ValueError: --port must be from 0 to 65535, got 99999
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {port!r}")
    return port


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit (where the OS allows it); returns the soft limit.

    Example:
        >>> raise_fd_limit() >= 64
        True
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        for target in (hard, 1 << 20, 10240):  # macOS refuses RLIM_INFINITY; 10240 is its OPEN_MAX
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                break
            except (ValueError, OSError):
                continue
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(requested: int, fd_limit: int) -> int:
    """``requested``, lowered so connections leave descriptors for everything else.

    Example:
        >>> connection_cap(1024, 1 << 20), connection_cap(1024, 1024), connection_cap(1024, 256)
        (1024, 768, 128)
    """
    return max(1, min(requested, max(fd_limit - FD_RESERVE, fd_limit // 2)))


class _EveryInterval:
    """Counts events and logs one line about them at most once per ``LOG_INTERVAL`` seconds."""

    def __init__(self, message: Callable[[int], str], level: int = logging.WARNING) -> None:
        self.message, self.level, self.count, self.last = message, level, 0, -float("inf")

    def __call__(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= LOG_INTERVAL:
            logger.log(self.level, self.message(self.count))
            self.count, self.last = 0, now


class _Guard:
    """What every connection of one server shares: the cap, the timeouts, and who is waiting for a request."""

    def __init__(self, limits: ConnectionLimits, cap: int) -> None:
        self.limits, self.cap, self.open = limits, cap, 0
        self.waiting: dict[LimitedH11Protocol, None] = {}  # insertion order: the longest-waiting first
        self.uploading: dict[LimitedH11Protocol, None] = {}  # bodies arriving, the one idle longest first
        self.refused = _EveryInterval(lambda n: f"{n} connection(s) refused with 503: all {cap} connections "
                                      "(--max-connections) are busy with requests")
        self.evicted = _EveryInterval(lambda n: f"{n} idle, incomplete or stalled connection(s) closed to make room: "
                                      f"{cap} connections (--max-connections) are open", logging.INFO)


_REFUSAL_BODY = (b'{"error":{"message":"The server has too many open connections; retry shortly",'
                 b'"type":"server_error","param":null,"code":"too_many_connections"}}')
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY)
_EVICTED_BODY = (b'{"error":{"message":"The request body stalled while all connections (--max-connections) were in '
                 b'use; the connection was closed to make room","type":"invalid_request_error","param":null,'
                 b'"code":"request_timeout"}}')
_EVICTED = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(_EVICTED_BODY)).encode() + b"\r\n\r\n" + _EVICTED_BODY)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection cap, the header timeout and the unread-body timeout.

    Built by ``uvicorn_config`` (``functools.partial`` with the server's ``_Guard``); see the module docstring.
    """

    def __init__(self, *args: Any, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.counted = self.refused = False
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        if guard.open >= guard.cap:
            victim = next(iter(guard.waiting), None)
            if victim is None:  # else the upload that made no progress for longest (a whole request is never taken)
                victim = next(iter(guard.uploading), None)
                if (victim is not None and victim.conn.our_state is h11.SEND_RESPONSE  # the app has not answered
                        and not victim.transport.is_closing()):
                    victim.transport.write(_EVICTED)
            if victim is None:  # every connection has a whole request: this one cannot be served now
                self.transport, self.refused = transport, True
                transport.write(_REFUSAL)
                transport.close()
                guard.refused()
                return
            victim.drop()
            guard.evicted()
        super().connection_made(transport)
        guard.open += 1
        self.counted = True
        self._wait_for_request()
        self.header_timer = self.loop.call_later(guard.limits.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.header_timer is None and self.conn.their_state is h11.IDLE:  # a kept-alive request begins
            self.header_timer = self.loop.call_later(self.guard.limits.header_timeout, self._headers_too_slow)
        super().data_received(data)
        self._follow_request(progress=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()

    def _follow_request(self, progress: bool = False) -> None:
        """Move the timers, the waiting list and the upload list along with h11's view of the client's side."""
        if self.transport.is_closing():
            return
        theirs = self.conn.their_state
        if theirs is not h11.SEND_BODY:
            self.body_timer = _cancel(self.body_timer)
            self.guard.uploading.pop(self, None)
        elif progress or self not in self.guard.uploading:  # bytes arrived: to the end, the last to be evicted
            self.guard.uploading.pop(self, None)
            self.guard.uploading[self] = None
        if theirs is h11.IDLE:
            if self.header_timer is None:  # idle between requests: uvicorn's keep-alive timer runs
                self._wait_for_request()
            return
        self.guard.waiting.pop(self, None)
        self.header_timer = _cancel(self.header_timer)
        if theirs is h11.SEND_BODY and self.body_timer is None:
            self.body_timer = self.loop.call_later(self.guard.limits.body_timeout + BODY_GRACE, self.drop)

    def _wait_for_request(self) -> None:
        self.guard.waiting.pop(self, None)
        self.guard.waiting[self] = None  # to the end: the newest waiter is the last to be closed

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE:
            self.drop()

    def drop(self) -> None:
        """Close this connection now (no complete request, or a body that stalled)."""
        self._release()
        if not self.transport.is_closing():
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    def _release(self) -> None:
        self.header_timer = _cancel(self.header_timer)
        self.body_timer = _cancel(self.body_timer)
        self.guard.waiting.pop(self, None)
        self.guard.uploading.pop(self, None)
        if self.counted:
            self.counted = False
            self.guard.open -= 1


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def uvicorn_config(app: Any, limits: ConnectionLimits, **kwargs: Any) -> uvicorn.Config:
    """A ``uvicorn.Config`` for ``app`` with ``limits``: the file-descriptor limit raised, the cap below it.

    Example:
        >>> config = uvicorn_config(lambda scope, receive, send: None, ConnectionLimits(keep_alive_timeout=2))
        >>> config.timeout_keep_alive, config.http.keywords["guard"].cap <= 1024
        (2, True)
    """
    fd_limit = raise_fd_limit()
    cap = connection_cap(limits.max_connections, fd_limit)
    protocol = functools.partial(LimitedH11Protocol, guard=_Guard(limits, cap))
    # ws="none": no route speaks WebSocket, and an upgraded connection would leave the cap's count. loop="asyncio":
    # LimitedServer learns of failed accept()s from asyncio's loop exception handler; uvloop (which uvicorn's "auto"
    # picks once installed: ray[serve] and uvicorn[standard] bring it) reports none, so descriptor exhaustion would pass
    # unlogged
    config = uvicorn.Config(app, http=protocol, ws="none", loop="asyncio",  # type: ignore[arg-type]
                            timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, **kwargs)
    if cap < limits.max_connections:  # after Config: it sets up uvicorn's logging
        logger.warning("--max-connections %d lowered to %d: the file-descriptor limit is %d (raise it with "
                       "ulimit -n)", limits.max_connections, cap, fd_limit)
    return config


class LimitedServer(uvicorn.Server):
    """A ``uvicorn.Server`` that calls ``on_exit`` and sets ``stopping`` (an ``asyncio.Event`` for ``read_body``)
    first when a signal arrives, and whose event loop logs running out of file descriptors once per interval
    (asyncio logs a traceback for every failed accept()).

    Example (blocks)::

        LimitedServer(uvicorn_config(app, ConnectionLimits(), port=8000)).run()
    """

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self.stopping = asyncio.Event()
        self.aio: asyncio.AbstractEventLoop | None = None
        self.out_of_fds = _EveryInterval(lambda n: f"out of file descriptors: {n} accept() call(s) failed and "
                                         "new connections wait (raise ulimit -n or lower --max-connections)",
                                         logging.ERROR)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.begin_exit()
        super().handle_exit(sig, frame)

    def begin_exit(self) -> None:
        """Call ``on_exit`` and set ``stopping`` (safe in a signal handler: the event is set from the loop)."""
        if self.on_exit is not None:
            self.on_exit()
        if self.aio is not None:
            self.aio.call_soon_threadsafe(self.stopping.set)

    async def startup(self, sockets: list | None = None) -> None:
        self.aio = asyncio.get_running_loop()
        self.aio.set_exception_handler(self._loop_exception)
        await super().startup(sockets)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self.out_of_fds()  # asyncio pauses accepting for a second by itself
        else:
            loop.default_exception_handler(context)


class BodyError(Exception):
    """The body could not be read: ``status`` 413 (too large), 408 (too slow), 400 (client gone), 503 (stopping).

    Example:
        >>> BodyError(408, "slow").status
        408
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, limit: int, timeout: float, stopping: asyncio.Event | None = None,
                    too_large: str | None = None) -> bytes:
    """The request body, or ``BodyError``: over ``limit`` bytes (Content-Length first, then counted), not complete
    within ``timeout`` seconds, the client gone, or ``stopping`` set (the server is shutting down).

    Example (in a route)::

        body = await read_body(request, 1 << 20, timeout=30.0)
    """
    too_large = too_large or f"The request body is larger than this server accepts ({limit} bytes)"
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyError(413, too_large)

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyError(413, too_large)
            chunks.append(chunk)
        return b"".join(chunks)

    reading = asyncio.ensure_future(collect())
    waits = {reading} | ({asyncio.ensure_future(stopping.wait())} if stopping is not None else set())
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    if reading.done() and not reading.cancelled():
        try:
            return reading.result()
        except ClientDisconnect:
            raise BodyError(400, "The client disconnected before the request body was complete") from None
    if stopping is not None and stopping.is_set():
        raise BodyError(503, "The server is shutting down; the request body was not read")
    raise BodyError(408, f"The request body did not arrive within {timeout:g} s (--body-timeout)")
