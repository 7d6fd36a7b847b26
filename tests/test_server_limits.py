"""Connection limits of ``gpt2fast serve`` and ``gpt2fast explore`` against real processes on 127.0.0.1
(issue 13 item 5; ``gpt2fast.http_limits``): thousands of half-open sockets leave ``/health`` answering within
a second and write no traceback flood; stalled headers, bodies and idle keep-alive connections are closed after
their timeouts; beyond the cap a busy server answers 503 at once; running out of file descriptors logs one line
per interval. Each test is bounded in sockets and seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.serverproc import TINY_MODEL, running

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HALF_OPEN = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # headers never finished
HOLD_SECONDS = 6.0


@pytest.fixture(scope="module")
def fd_room() -> int:
    """Raise this process's own soft descriptor limit to the hard one; the sockets a test may hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield min(3000, hard - 300)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def open_half(port: int, count: int, payload: bytes = HALF_OPEN) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if payload:
            s.sendall(payload)
        socks.append(s)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def assert_health_fast(url: str) -> float:
    """A fresh client's /health: 200 within a second; returns the seconds it took."""
    start = time.monotonic()
    r = httpx.get(url + "/health", timeout=1.0)
    took = time.monotonic() - start
    assert r.status_code == 200 and took < 1.0, (r.status_code, took)
    return took


def hold_and_poll(server, port: int, count: int) -> list[float]:
    """Hold ``count`` half-open sockets for HOLD_SECONDS, replacing a tenth of them (new ones) every half second,
    and poll /health from a fresh client throughout."""
    socks = open_half(port, count)
    times = []
    try:
        deadline = time.monotonic() + HOLD_SECONDS
        while time.monotonic() < deadline:
            times.append(assert_health_fast(server.url))
            fresh = open_half(port, count // 10)
            close_all(socks[:count // 10])
            socks = socks[count // 10:] + fresh
            time.sleep(0.5)
    finally:
        close_all(socks)
    return times


def assert_quiet_log(server) -> None:
    out = server.output()
    assert "Traceback" not in out and len(out) < 20_000, out[-3000:]


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends before it closes ``sock``; fails unless it closes within ``seconds``."""
    sock.settimeout(seconds)
    data = b""
    start = time.monotonic()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"still open after {time.monotonic() - start:.1f} s (received {data[:80]!r})")
    except ConnectionResetError:
        pass
    return data


def trickles_until_closed(sock: socket.socket, seconds: float) -> float:
    """Send a byte every 0.1 s until the server closes ``sock``; the seconds that took (fails after ``seconds``)."""
    sock.settimeout(0.1)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            sock.sendall(b" ")
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed
            return time.monotonic() - start
    pytest.fail(f"a body that nobody reads kept its connection open for {seconds} s")


def test_serve_answers_health_within_a_second_while_thousands_of_sockets_hang(fd_room):
    # Started with a soft limit of 256 descriptors, the server raises it to the hard limit. With the defaults
    # (header timeout 10 s > the hold, --max-connections 1024 < the sockets held) the cap closes the
    # longest-waiting half-open sockets, so a fresh client always gets in.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.ExitStack() as stack:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the server inherits 256
        try:
            server = stack.enter_context(running("serve", "--model", TINY_MODEL, "--cpu-threads", "1"))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if os.path.exists(f"/proc/{server.proc.pid}/limits"):  # Linux
            with open(f"/proc/{server.proc.pid}/limits") as f:
                line = next(x for x in f if x.startswith("Max open files")).split()
            assert line[3:5] == [str(hard), str(hard)], line
        times = hold_and_poll(server, port_of(server.url), fd_room)
        assert len(times) >= 6
        assert httpx.get(server.url + "/health", timeout=2).status_code == 200
        assert_quiet_log(server)


@pytest.fixture(scope="module")
def strict():
    """A server with short timeouts and a small cap."""
    with running("serve", "--model", TINY_MODEL, "--cpu-threads", "1", "--max-connections", "20",
                 "--header-timeout", "1.5", "--body-timeout", "1.5", "--keep-alive-timeout", "1") as server:
        yield server


def test_stalled_headers_bodies_and_idle_connections_are_closed_after_their_timeouts(strict):
    port = port_of(strict.url)
    silent, partial = open_half(port, 1, b""), open_half(port, 1)
    post = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"model\"")
    stalled_body = open_half(port, 1, post)
    unread_body = open_half(port, 1, post.replace(b"/v1/completions", b"/health"))  # answered 405, never read
    trickle = unread_body[0]
    kept_alive = open_half(port, 1, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    start = time.monotonic()
    assert trickle.recv(65536).startswith(b"HTTP/1.1 405")
    assert 1.0 < trickles_until_closed(trickle, 6) < 5  # --body-timeout 1.5 (+1 s grace), though bytes keep coming
    reply = closed_within(kept_alive[0], 3)  # answered, then closed by --keep-alive-timeout 1
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"status":"ok"}'), reply
    assert closed_within(silent[0], 3) == b""  # --header-timeout 1.5
    assert closed_within(partial[0], 3) == b""
    reply = closed_within(stalled_body[0], 3)  # --body-timeout 1.5: 408 naming the flag
    assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout" in reply, reply
    assert time.monotonic() - start < 9
    close_all(silent + partial + stalled_body + unread_body + kept_alive)
    assert httpx.get(strict.url + "/health", timeout=1).status_code == 200
    assert_quiet_log(strict)


def post(body: bytes, length: int | None = None) -> bytes:
    """A ``POST /v1/completions`` carrying ``body`` (announcing ``length`` bytes: more means a stalled upload)."""
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body) if length is None else length, body))


# A whole request the server works on for seconds (1020 decode steps of the tiny model, ~3 ms each on a CPU).
GENERATING = post(json.dumps({"model": TINY_MODEL, "prompt": [7] * 4, "max_tokens": 1020, "ignore_eos": True}).encode())
STALLED = post(b"{", 1_000_000)


def assert_still_answering(socks: list[socket.socket]) -> None:
    """Each of ``socks`` is open, its request still being answered (or it was answered 200): never closed."""
    for s in socks:
        s.settimeout(0.05)
        try:
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        except TimeoutError:
            pass


def test_beyond_the_cap_a_busy_server_answers_503_at_once(strict):
    port = port_of(strict.url)
    busy = open_half(port, 20, GENERATING)  # 20 requests the server is answering: none may be closed for room
    time.sleep(0.3)
    try:
        start = time.monotonic()
        r = httpx.get(strict.url + "/health", timeout=1)
        assert r.status_code == 503 and time.monotonic() - start < 1
        assert r.json()["error"]["code"] == "too_many_connections" and r.headers["retry-after"] == "1"
        assert_still_answering(busy)
    finally:
        close_all(busy)  # the server aborts their requests
    time.sleep(0.3)
    assert_health_fast(strict.url)
    out = strict.output()
    assert out.count("refused with 503") == 1 and "Traceback" not in out, out[-2000:]


def test_at_the_cap_the_longest_stalled_upload_makes_room_never_a_request_being_answered(strict):
    port = port_of(strict.url)
    busy = open_half(port, 10, GENERATING)
    time.sleep(0.2)
    uploads = open_half(port, 10, STALLED)  # with busy: the cap (20), every connection in a request
    time.sleep(0.2)
    uploads[0].sendall(b" ")  # the oldest upload makes progress: now the last to be evicted
    time.sleep(0.1)
    try:
        for _ in range(4):
            assert_health_fast(strict.url)  # closes the upload that received nothing for longest
            uploads += open_half(port, 1, STALLED)  # the cap full again (the newest upload: the last to go)
        for sock in uploads[1:5]:
            reply = closed_within(sock, 1)
            assert reply.startswith(b"HTTP/1.1 408") and b"--max-connections" in reply, reply
        assert_still_answering(busy)
        reply = closed_within(uploads[0], 4)  # it made progress: not evicted, closed later by --body-timeout 1.5
        assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout" in reply, reply
        for sock in uploads[5:]:  # evicted too (a refill may come before the /health ahead of it left), or timed out
            assert closed_within(sock, 4).startswith(b"HTTP/1.1 408")
    finally:
        close_all(busy + uploads)
    time.sleep(0.3)
    assert_health_fast(strict.url)
    assert_quiet_log(strict)


def test_more_stalled_uploads_than_the_cap_leave_health_answering(strict):
    uploads = open_half(port_of(strict.url), 20, STALLED)
    time.sleep(0.2)  # their headers read: uploads, not connections waiting for a request
    uploads += open_half(port_of(strict.url), 10, STALLED)  # each beyond the cap (20) closes the most stalled one
    try:
        assert_health_fast(strict.url)
        reply = closed_within(uploads[0], 1)  # the oldest upload made room for the first one beyond the cap
        assert reply.startswith(b"HTTP/1.1 408") and b"--max-connections" in reply, reply
        for sock in uploads[1:]:  # made room (408, or closed before its headers were read), or timed out (408)
            reply = closed_within(sock, 4)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply
    finally:
        close_all(uploads)
    assert_quiet_log(strict)


def test_sigterm_answers_stalled_uploads_503_and_exits_0():
    post = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"model\": ")
    with running("serve", "--model", TINY_MODEL, "--cpu-threads", "1", "--shutdown-timeout", "5") as server:
        uploads = open_half(port_of(server.url), 3, post)
        time.sleep(0.3)
        start = time.monotonic()
        server.proc.send_signal(15)
        replies = [closed_within(s, 4) for s in uploads]
        assert server.proc.wait(10) == 0
        out = server.output()
    assert time.monotonic() - start < 4
    for reply in replies:
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), reply
        assert json.loads(body)["error"]["code"] == "shutting_down"
    assert "Traceback" not in out and "Exception in ASGI application" not in out, out[-3000:]
    close_all(uploads)


def test_explore_keeps_answering_and_a_client_hanging_up_mid_upload_leaves_no_traceback(fd_room):
    with running("explore", "--model", TINY_MODEL, "--max-connections", "100", "--header-timeout", "30",
                 "--body-timeout", "1.5") as server:
        port = port_of(server.url)
        socks = open_half(port, min(1000, fd_room))
        try:
            for _ in range(4):
                assert_health_fast(server.url)
                time.sleep(0.25)
        finally:
            close_all(socks)
        upload = open_half(port, 1, b"POST /api/next HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                    b"\r\nContent-Length: 1000\r\n\r\n{\"text\": ")[0]
        time.sleep(0.3)
        upload.close()  # hangs up mid-body
        time.sleep(0.3)
        assert httpx.post(server.url + "/api/next", json={"text": "Hi", "k": 2}, timeout=10).status_code == 200
        stalled = open_half(port, 1, b"POST /api/next HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                     b"\r\nContent-Length: 1000\r\n\r\n{")[0]
        reply = closed_within(stalled, 5)  # --body-timeout 1.5: 408, and the connection closed with it (as serve)
        assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower(), reply
        assert_quiet_log(server)


def test_bad_ports_and_a_kv_cache_over_memory_exit_2_with_one_line():
    cases = {  # the other port cases run in-process below
        ("serve", "--port", "99999"): "gpt2fast serve: error: --port must be from 0 to 65535, got 99999",
        ("explore", "--port", "-1"): "gpt2fast explore: error: --port must be from 0 to 65535, got -1",
        ("serve", "--kv-cache-tokens", "1000000000000"): "gpt2fast serve: error: --kv-cache-tokens=1000000000000 "
                                                         "does not fit in memory: its KV cache needs 476,837.16 GiB",
    }
    runs = {case: subprocess.Popen([sys.executable, "-m", "gpt2fast", case[0], "--model", TINY_MODEL, *case[1:]],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for case in cases}
    for case, proc in runs.items():
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 2, (case, out, err)
        lines = [line for line in err.splitlines() if "warning: " not in line]  # random weights are announced
        assert len(lines) == 1 and lines[0].startswith(cases[case]), err


@pytest.mark.parametrize("main", ["serve", "explore"])
@pytest.mark.parametrize("flag, value, says", [
    ("--port", "-1", "--port must be from 0 to 65535, got -1"),
    ("--port", "99999", "--port must be from 0 to 65535, got 99999"),
    ("--max-connections", "0", "--max-connections must be a positive integer, got 0"),
    ("--header-timeout", "-1", "--header-timeout must be a positive number of seconds, got -1.0"),
    ("--body-timeout", "nan", "--body-timeout must be a positive number of seconds, got nan"),
    ("--keep-alive-timeout", "inf", "--keep-alive-timeout must be a positive number of seconds, got inf"),
])
def test_bad_limits_exit_2_naming_the_flag(main, flag, value, says, capsys):
    from gpt2fast.server.serve import main as serve_main
    from gpt2fast.viz.explore import main as explore_main

    run = serve_main if main == "serve" else explore_main
    assert run(["--model", TINY_MODEL, "--port", "0", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"gpt2fast {main}: error: {says}"


def test_running_out_of_descriptors_logs_one_line_per_interval_not_a_traceback_per_accept():
    # A uvicorn server in a child process whose descriptors are used up: every accept() fails with EMFILE.
    script = r"""
import os, resource, socket, threading, time
from gpt2fast.http_limits import ConnectionLimits, LimitedServer, uvicorn_config

async def app(scope, receive, send):
    pass

listener = socket.create_server(("127.0.0.1", 0))
client = socket.socket()
server = LimitedServer(uvicorn_config(app, ConnectionLimits(), lifespan="off", log_level="warning"))

def fill_then_connect():
    while not server.started:
        time.sleep(0.05)
    hogs = []
    try:
        while True:
            hogs.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    client.connect(listener.getsockname())  # queued by the kernel; the server's accept() gets EMFILE
    time.sleep(2.5)  # asyncio retries accept() every second
    for fd in hogs:
        os.close(fd)
    server.should_exit = True

resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
threading.Thread(target=fill_then_connect, daemon=True).start()
server.run(sockets=[listener])
print("stopped")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "stopped" in out, out[-3000:]
    assert out.count("out of file descriptors") == 1, out[-3000:]
    assert "Traceback" not in out and len(out) < 5000, out[-3000:]
