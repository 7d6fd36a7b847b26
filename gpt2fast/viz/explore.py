"""``gpt2fast explore``: a local page to step through what the model would say next.

Type text; the page shows the model's top-10 next tokens with their probabilities as bars and the head
view (``gpt2fastViz.renderHeadView``) of the current text. Click a suggestion to append it: the page asks
again and redraws, keeping your layer/head choice.

Example:
    gpt2fast explore --model gpt2                    # prints http://127.0.0.1:8001/ ; Ctrl-C stops it
    gpt2fast explore --model gpt2 --port 0           # any free port (the printed URL says which)

HTTP (FastAPI; uvicorn serves it):

* ``GET /``: the page. Its CSS and JS are inline (no CDN: it works offline); a Content-Security-Policy
  with a per-response nonce runs only the page's own scripts, and fetches go to this server only.
  Token text reaches the page only through ``textContent`` (see ``gpt2fast.viz.assets``).
* ``POST /api/next`` with JSON ``{"text": str, "k": int (1..100, default 10)}`` ->
  ``{"text", "tokens", "token_ids", "n_tokens", "max_tokens", "context", "note", "suggestions":
  [{"text", "id", "prob"}], "trace": gpt2fast.viz.trace_payload(...)}``. Empty text means the
  ``<|endoftext|>`` token (``context`` and ``note`` say so), as unconditional generation starts.
  Bad input is a 400 (415 for a body that is not ``application/json``, 413 over 1 MB) with JSON
  ``{"error": "<what is wrong>"}`` (JSON nested too deep, or text holding half a UTF-16 surrogate
  pair, included); text over the model's context (``n_positions``, 1024 for GPT-2) is a 400 that
  also gives ``n_tokens`` and ``max_tokens``.
* ``GET /health``: ``{"status": "ok"}``.

Connections are limited as ``gpt2fast serve``'s are (``gpt2fast.http_limits``: ``--max-connections``,
``--header-timeout``, ``--body-timeout`` (then 408), ``--keep-alive-timeout``).

On a loopback address (the default) only ``Host: 127.0.0.1``, ``localhost`` or ``[::1]`` is answered
(any other gets 400), so a web page elsewhere cannot reach the explorer through DNS rebinding.

Model calls run one at a time (a lock) in a worker thread, so the server keeps answering meanwhile.
"""

from __future__ import annotations

import argparse
import html
import ipaddress
import json
import secrets
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from gpt2fast.errors import CheckpointError
from gpt2fast.http_limits import (
    BodyError,
    ConnectionLimits,
    LimitedServer,
    add_arguments,
    check_port,
    read_body,
    uvicorn_config,
)
from gpt2fast.ops import BACKENDS
from gpt2fast.quant import QUANTIZATIONS
from gpt2fast.viz.html import head_view_assets, payload_json, trace_payload

if TYPE_CHECKING:
    from gpt2fast.engine import LLM

PROG = "gpt2fast explore"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001  # next to `gpt2fast serve`'s 8000
DEFAULT_K = 10
MAX_K = 100
MAX_BODY_BYTES = 1 << 20  # a 1024-token text is a few KB; this only stops a runaway client
DEBOUNCE_MS = 250  # typing pauses this long before the page asks the model
ENDOFTEXT = "<|endoftext|>"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # as the Host header names them (IPv6 in brackets)


class RequestError(ValueError):
    """Bad input to the API: ``status`` is the HTTP status, ``extra`` more fields for the JSON error body.

    Example:
        >>> RequestError("'k' must be an integer", status=400).status
        400
    """

    def __init__(self, message: str, status: int = 400, **extra) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


def parse_request(body: bytes) -> tuple[str, int]:
    """``(text, k)`` from a ``/api/next`` body, or ``RequestError`` naming what is wrong.

    Example:
        >>> parse_request(b'{"text": "The dog", "k": 3}')
        ('The dog', 3)
        >>> parse_request(b'{"text": 7}')
        Traceback (most recent call last):
        ...
        gpt2fast.viz.explore.RequestError: 'text' must be a string, got int
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep; UnicodeDecodeError is a ValueError
        raise RequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(f'the body must be a JSON object like {{"text": "..."}}, got {type(data).__name__}')
    unknown = sorted(set(data) - {"text", "k"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}: the fields are 'text' and 'k'")
    if "text" not in data:
        raise RequestError("'text' is missing: send {\"text\": \"...\"} (an empty string means <|endoftext|>)")
    text, k = data["text"], data.get("k", DEFAULT_K)
    if not isinstance(text, str):
        raise RequestError(f"'text' must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape half a UTF-16 pair (\ud800): not text, cannot be tokenized
        raise RequestError("'text' holds a lone UTF-16 surrogate (such as \\ud800 without its pair): send valid "
                           "Unicode") from None
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise RequestError(f"'k' must be an integer from 1 to {MAX_K}, got {k!r}")
    return text, k


class Explorer:
    """What the API computes, one model call at a time: ``answer(text, k)`` -> the ``/api/next`` reply.

    ``llm`` is a ``gpt2fast.LLM`` (or anything with its ``tokenizer``, ``config``, ``next_tokens``,
    ``attention`` and ``model_name``).

    Example:
        >>> from gpt2fast import LLM
        >>> reply = Explorer(LLM('random:{"n_layer": 2, "n_embd": 32, "n_head": 2}')).answer("", k=2)
        >>> reply["tokens"], reply["context"], len(reply["suggestions"])
        (['<|endoftext|>'], '<|endoftext|>', 2)
    """

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.lock = threading.Lock()  # uvicorn runs requests concurrently; the engine is not re-entrant
        self.max_tokens = int(llm.config.n_positions)

    def token_ids(self, text: str) -> list[int]:
        """The ids the model sees: the text's tokens (special tokens allowed), or ``<|endoftext|>`` when empty.
        Raises ``RequestError`` when they do not fit the context."""
        if not text:
            eos = self.llm.config.eos_token_id
            if eos >= self.llm.config.vocab_size:
                raise RequestError(f"the text is empty and this model's vocabulary has no {ENDOFTEXT} "
                                   f"(id {eos}) to start from; type some text")
            return [eos]
        ids = self.llm.tokenizer.encode(text, allowed_special="all")
        if len(ids) > self.max_tokens:
            raise RequestError(f"the text is {len(ids)} tokens long; the explorer takes at most {self.max_tokens} "
                               f"(the model's context, n_positions): shorten it", n_tokens=len(ids),
                               max_tokens=self.max_tokens)
        return ids

    def answer(self, text: str, k: int = DEFAULT_K) -> dict:
        """Top-``k`` next tokens after ``text`` and the attention of every layer/head over it, as JSON-able data."""
        ids = self.token_ids(text)
        with self.lock:
            suggestions = self.llm.next_tokens(ids, k)
            trace = self.llm.attention(ids)
        empty = not text
        return {
            "text": text,
            "tokens": list(trace.tokens),
            "token_ids": ids,
            "n_tokens": len(ids),
            "max_tokens": self.max_tokens,
            "context": ENDOFTEXT if empty else None,
            "note": f"the text is empty: predicting what follows {ENDOFTEXT}" if empty else None,
            "suggestions": [{"text": s.text, "id": s.id, "prob": s.prob} for s in suggestions],
            "trace": trace_payload(trace, title=f"{self.llm.model_name}: attention over the current text"),
        }


class _JSONResponse(JSONResponse):
    """JSON as ASCII (``\\uXXXX`` escapes), so any text, even half a UTF-16 pair, encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refusing (413) once it passes ``limit`` bytes instead of buffering it all; 408 when it
    is slower than ``timeout`` s, 503 when the server is stopping, 400 when the client hangs up mid-body."""
    try:
        return await read_body(request, limit, timeout, getattr(request.app.state, "stopping", None),
                               too_large=f"the body is over {limit // 1024} KB; send at most {limit // 1024} KB")
    except BodyError as e:
        raise RequestError(str(e), status=e.status) from None


def make_app(llm: LLM, allowed_hosts: list[str] | None = None,
             body_timeout: float = ConnectionLimits().body_timeout) -> FastAPI:
    """The explorer's web app (page + JSON API) over ``llm``. ``allowed_hosts``: accept only requests whose
    ``Host`` is one of these (``serve`` passes the loopback names when it listens on loopback, so a web page
    elsewhere cannot reach the server through DNS rebinding); None accepts any. ``body_timeout``: seconds a
    request body may take to arrive (then 408); a server sets ``app.state.stopping`` to answer bodies still
    arriving at shutdown with 503.

    Example:
        >>> from fastapi.testclient import TestClient
        >>> from gpt2fast import LLM
        >>> client = TestClient(make_app(LLM('random:{"n_layer": 2, "n_embd": 32, "n_head": 2}')))
        >>> reply = client.post("/api/next", json={"text": "The dog", "k": 3}).json()
        >>> reply["tokens"], len(reply["suggestions"]), reply["trace"]["n_layer"]
        (['The', ' dog'], 3, 2)
        >>> bad = client.post("/api/next", json={"text": "The dog", "k": 0})
        >>> bad.status_code, bad.json()["error"]
        (400, "'k' must be an integer from 1 to 100, got 0")
    """
    explorer = Explorer(llm)
    app = FastAPI(title=PROG, docs_url=None, redoc_url=None, openapi_url=None, default_response_class=_JSONResponse)
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(render_page(llm.model_name, explorer.max_tokens, nonce),
                            headers={"Content-Security-Policy": page_csp(nonce), "Cache-Control": "no-store",
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/api/next")
    async def next_tokens(request: Request) -> JSONResponse:
        try:
            # JSON only: a cross-site form cannot send it without a CORS preflight, which this server never grants
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                raise RequestError("send the body as JSON with Content-Type: application/json", status=415)
            text, k = parse_request(await _read_body(request, MAX_BODY_BYTES, body_timeout))
            reply = await run_in_threadpool(explorer.answer, text, k)  # the model runs off the event loop
        except RequestError as e:
            headers = {"Connection": "close"} if e.status in (408, 503) else None  # the rest of the body is not read
            return _JSONResponse({"error": str(e), **e.extra}, status_code=e.status, headers=headers)
        except ValueError as e:  # the engine's own checks (ids outside a small vocabulary, ...)
            return _JSONResponse({"error": str(e)}, status_code=400)
        return _JSONResponse(reply)

    return app


def page_csp(nonce: str) -> str:
    """The page's Content-Security-Policy: only its own (nonced) scripts and styles; fetches to this server only.

    Example:
        >>> page_csp("abc").split("; ")[:4]
        ["default-src 'none'", "script-src 'nonce-abc'", "style-src 'nonce-abc'", "connect-src 'self'"]
    """
    return (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


PAGE_CSS = """
.g2f-explore{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d1d1f;margin:12px 18px;
  max-width:1200px}
.g2f-explore h1{font-size:19px;margin:0 0 2px}
.g2f-explore h2{font-size:15px;margin:14px 0 4px}
.g2f-explore .g2f-sub{color:#555;font-size:12px;margin:0 0 8px}
.g2f-text{box-sizing:border-box;width:100%;font:14px/1.4 ui-monospace,Menlo,Consolas,monospace;padding:6px 8px;
  border:1px solid #b8bfcc;border-radius:4px;resize:vertical}
.g2f-status{color:#555;font-size:12px;min-height:1.4em;margin:2px 0}
.g2f-error{color:#900;background:#fdecec;border-left:3px solid #d33;padding:4px 8px;margin:4px 0}
.g2f-error[hidden]{display:none}
.g2f-suggestions{list-style:none;margin:0;padding:0}
.g2f-suggestion{display:grid;grid-template-columns:190px 280px 80px;gap:10px;align-items:center;width:max-content;
  font:inherit;background:none;border:1px solid transparent;border-radius:4px;padding:1px 6px;cursor:pointer;
  text-align:left}
.g2f-suggestion:hover,.g2f-suggestion:focus{border-color:#8aa4d6;background:#f4f6fa}
.g2f-sugg-text{font:13px ui-monospace,Menlo,Consolas,monospace;white-space:pre;overflow:hidden;text-overflow:ellipsis;
  background:#eef0f5;border-radius:3px;padding:0 4px;justify-self:start;max-width:180px}
.g2f-sugg-track{height:12px;background:#eef0f5;border-radius:2px}
.g2f-sugg-bar{height:12px;background:#1f5fbf;min-width:1px;border-radius:2px}
.g2f-sugg-prob{font-size:12px;color:#333;text-align:right;font-variant-numeric:tabular-nums}
.g2f-explore-head{font-size:13px}
"""

# The explorer's own script; gpt2fastViz (gpt2fast.viz.assets) is loaded before it. Text from the model or the
# reader only ever goes through textContent, dataset and title, never HTML.
PAGE_JS = r"""
(function () {
  "use strict";
  var config = JSON.parse(document.getElementById("g2f-config").textContent);
  var root = document.getElementById("g2f-explore"), box = document.getElementById("g2f-text");
  var list = document.getElementById("g2f-suggestions"), status = document.getElementById("g2f-status");
  var error = document.getElementById("g2f-error"), host = document.getElementById("g2f-head");
  var latest = 0, timer = null, view = null, choice = {layer: 0, head: 0};

  function shown(tok) { return tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
  function percent(p) { return (100 * p).toFixed(p >= 0.1 ? 1 : p >= 0.001 ? 2 : 4) + "%"; }
  function el(tag, cls, parent) {
    var node = document.createElement(tag);
    node.className = cls;
    parent.appendChild(node);
    return node;
  }
  function remember() { if (view) choice = {layer: view.state.layer, head: view.state.head}; }
  function settle(state, text) {  // tests (and people) can tell which text the page now shows
    root.dataset.shown = text;
    root.dataset.state = state;
    root.dataset.updates = String(Number(root.dataset.updates || 0) + 1);
  }

  function showSuggestions(suggestions) {
    list.textContent = "";
    suggestions.forEach(function (s, rank) {
      var button = el("button", "g2f-suggestion", el("li", "", list));
      button.type = "button";
      button.dataset.text = s.text;
      button.dataset.id = String(s.id);
      button.dataset.prob = String(s.prob);
      button.title = "append token " + s.id + " (p = " + s.prob.toPrecision(4) + ")";
      el("span", "g2f-sugg-text", button).textContent = shown(s.text);
      el("span", "g2f-sugg-bar", el("span", "g2f-sugg-track", button)).style.width = (100 * s.prob).toFixed(3) + "%";
      el("span", "g2f-sugg-prob", button).textContent = percent(s.prob);
      button.setAttribute("aria-label", (rank + 1) + ": " + s.text + ", " + percent(s.prob));
    });
  }

  function show(reply, text) {
    error.hidden = true;
    error.textContent = "";
    showSuggestions(reply.suggestions);
    remember();
    view = gpt2fastViz.renderHeadView(host, reply.trace, choice);
    status.textContent = reply.n_tokens + " of at most " + reply.max_tokens + " tokens" +
      (reply.note ? " \u00b7 " + reply.note : "") + ". Click a token to append it.";
    settle("ready", text);
  }

  function fail(message, text) {
    remember();
    view = null;
    list.textContent = "";
    host.textContent = "";
    error.textContent = message;
    error.hidden = false;
    status.textContent = "";
    settle("error", text);
  }

  function ask(text) {
    var mine = ++latest;
    clearTimeout(timer);
    root.dataset.state = "busy";
    status.textContent = "Asking the model\u2026";
    fetch("api/next", {method: "POST", headers: {"Content-Type": "application/json"},
                       body: JSON.stringify({text: text, k: config.k})})
      .then(function (response) {
        return response.json().then(function (body) { return {ok: response.ok, code: response.status, body: body}; });
      })
      .then(function (reply) {
        if (mine !== latest) return;  // the text changed meanwhile: a newer answer is on its way
        if (reply.ok) show(reply.body, text);
        else fail((reply.body && reply.body.error) || "the server answered " + reply.code, text);
      })
      .catch(function (e) { if (mine === latest) fail("no answer from the server: " + e.message, text); });
  }

  box.addEventListener("input", function () {
    clearTimeout(timer);
    root.dataset.state = "typing";
    timer = setTimeout(function () { ask(box.value); }, config.debounce_ms);
  });
  list.addEventListener("click", function (event) {
    var button = event.target.closest(".g2f-suggestion");
    if (!button) return;
    box.value += button.dataset.text;
    box.focus();
    box.setSelectionRange(box.value.length, box.value.length);
    ask(box.value);
  });
  ask(box.value);
})();
"""


def render_page(model: str, max_tokens: int, nonce: str) -> str:
    """The explorer's HTML: the viz CSS/JS and the explorer's own, inline, each tag carrying ``nonce``.

    Example:
        >>> page = render_page("<gpt2>", 1024, "n0nce")
        >>> "<title>gpt2fast explore \u00b7 &lt;gpt2&gt;</title>" in page, page.count('nonce="n0nce"')
        (True, 3)
    """
    css, js = head_view_assets()
    config = payload_json({"k": DEFAULT_K, "max_tokens": max_tokens, "debounce_ms": DEBOUNCE_MS, "model": model})
    name = html.escape(model)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{PROG} \u00b7 {name}</title>
<style nonce="{nonce}">{css}{PAGE_CSS}</style>
</head>
<body>
<main class="g2f-explore" id="g2f-explore" data-state="loading">
<h1>Next-token explorer</h1>
<div class="g2f-sub">{name} \u00b7 up to {max_tokens} tokens \u00b7 type, or click a token to append it</div>
<label for="g2f-text">Text</label>
<textarea id="g2f-text" class="g2f-text" rows="4" spellcheck="false" autofocus
  placeholder="Type some text (empty: what follows &lt;|endoftext|&gt;)"></textarea>
<div class="g2f-status" id="g2f-status" role="status"></div>
<div class="g2f-error" id="g2f-error" role="alert" hidden></div>
<h2>Next token</h2>
<ol class="g2f-suggestions" id="g2f-suggestions"></ol>
<h2>Head view of the current text</h2>
<div class="g2f-explore-head" id="g2f-head"></div>
</main>
<script type="application/json" id="g2f-config">{config}</script>
<script nonce="{nonce}">{js}</script>
<script nonce="{nonce}">{PAGE_JS}</script>
</body>
</html>
"""


def listen(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one), or ValueError saying why not.

    Example:
        >>> sock = listen("127.0.0.1", 0)
        >>> sock.getsockname()[1] > 0
        True
        >>> sock.close()
    """
    check_port(port)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def url_of(sock: socket.socket) -> str:
    """The ``http://host:port/`` a listening socket serves.

    Example:
        >>> sock = listen("127.0.0.1", 0)
        >>> url_of(sock) == f"http://127.0.0.1:{sock.getsockname()[1]}/"
        True
        >>> sock.close()
    """
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def allowed_hosts_for(address: str) -> list[str] | None:
    """The ``Host`` header values to accept on a socket bound to ``address``: the loopback names (and the
    address itself) for a loopback address, so a web page elsewhere cannot reach the explorer through DNS
    rebinding; None (any ``Host``) otherwise.

    Example:
        >>> allowed_hosts_for("::1"), allowed_hosts_for("0.0.0.0")
        (['127.0.0.1', 'localhost', '[::1]'], None)
        >>> allowed_hosts_for("127.0.0.5")
        ['127.0.0.1', 'localhost', '[::1]', '127.0.0.5']
    """
    try:
        ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 address may carry a zone: fe80::1%eth0
    except ValueError:
        return list(LOOPBACK_HOSTS) if address.lower() == "localhost" else None
    if not ip.is_loopback:
        return None
    name = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    return list(LOOPBACK_HOSTS) + ([name] if name not in LOOPBACK_HOSTS else [])


class _Terminated(Exception):
    """SIGTERM arrived: stop like Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def serve(llm: LLM, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, sock: socket.socket | None = None,
          limits: ConnectionLimits | None = None) -> None:
    """Serve the explorer over ``llm`` on ``host:port`` (or on the listening ``sock``) until Ctrl-C or SIGTERM,
    within ``limits`` (connections and timeouts; see ``gpt2fast.http_limits``).

    Prints the URL once it listens. uvicorn catches SIGINT/SIGTERM, finishes the requests in flight, and raises
    the signal again when it is done; we take that as the end (no traceback). Example (blocks)::

        from gpt2fast import LLM
        serve(LLM("gpt2"), port=8001)   # open http://127.0.0.1:8001/
    """
    limits = limits or ConnectionLimits()
    sock = sock if sock is not None else listen(host, port)
    app = make_app(llm, allowed_hosts=allowed_hosts_for(sock.getsockname()[0]), body_timeout=limits.body_timeout)
    server = LimitedServer(uvicorn_config(app, limits, log_level="warning", access_log=False, lifespan="off"))
    app.state.stopping = server.stopping
    print(f"{PROG}: serving {llm.model_name} at {url_of(sock)} (Ctrl-C to stop)", flush=True)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread only
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
    print(f"{PROG}: stopped", flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``gpt2fast explore``.

    Example:
        >>> args = build_parser().parse_args(["--model", "gpt2"])
        >>> args.host, args.port
        ('127.0.0.1', 8001)
    """
    parser = argparse.ArgumentParser(prog=PROG, description="Serve a local page: top-10 next tokens, click to "
                                     "append one, and the head view of the current text.")
    parser.add_argument("--model", required=True, help="random:<preset>, a Hugging Face or OpenAI folder, or a Hub id")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: "
                        "this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 = any free port")
    parser.add_argument("--backend", default=None, choices=BACKENDS)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quantization", default="none", choices=["none", *QUANTIZATIONS],
                        help="int8: weight-only int8, quantized as it loads (cpu, torch backends)")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``gpt2fast explore ARGS``: listen, load the model, serve until Ctrl-C/SIGTERM; returns the exit status
    (0, or 2 with a one-line message for bad input: a model that does not load, a port that is taken).

    Example:
        >>> main(["--model", "/no/such/folder", "--port", "0"])
        2
    """
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse has printed usage and the error (or --help)
        return e.code if isinstance(e.code, int) else 2
    from gpt2fast.engine import LLM

    try:
        limits = ConnectionLimits.from_args(args)
        sock = listen(args.host, args.port)  # before loading the model: a taken port fails at once
        try:
            llm = LLM(args.model, backend=args.backend, dtype=args.dtype, device=args.device, max_num_seqs=1,
                      quantization=args.quantization)
        except BaseException:
            sock.close()
            raise
    except (ValueError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if llm.is_random:
        print(f"{PROG}: warning: {args.model} has random weights: its suggestions are gibberish. "
              "Pass real weights (a Hub id, a Hugging Face or OpenAI folder) for real text.", file=sys.stderr)
    serve(llm, sock=sock, limits=limits)
    return 0
