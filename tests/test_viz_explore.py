"""``gpt2fast explore`` (gpt2fast.viz.explore): the JSON API against a second, independent ``LLM`` (its
``next_tokens`` and ``attention`` of the same text), bad input as 4xx with a message, the context limit, one
model call at a time; then the real process (tests/serverproc.py) driven in headless chromium: clicking a
suggestion appends exactly its text and refreshes the suggestions and the head view, hostile text stays text,
over-long text shows the server's message; and the process prints its URL and stops cleanly on a signal."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from browser import chromium, open_page, save_screenshot
from fastapi.testclient import TestClient
from serverproc import TINY_MODEL, running

from gpt2fast import LLM
from gpt2fast.viz import head_view_assets
from gpt2fast.viz.explore import MAX_BODY_BYTES, allowed_hosts_for, main, make_app

EOT = 50256
HOSTILE = ('<script>window.__pwned=1</script> <img src=x onerror="window.__pwned=2"> "double" \'single\' '
           "</textarea>&amp;")


@pytest.fixture(scope="module")
def reference() -> LLM:
    """The test's own model: the same weights as the server's, loaded separately."""
    return LLM(TINY_MODEL)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(LLM(TINY_MODEL)))


def link_probs(payload: dict) -> np.ndarray:
    """(L, H, T, T) attention rebuilt from the payload's links (all kept for short texts), 0 where none."""
    n_layer, n_head, n_tokens = payload["n_layer"], payload["n_head"], len(payload["tokens"])
    assert payload["links"]["per_row"] == n_tokens
    index = np.frombuffer(base64.b64decode(payload["links"]["index"]), dtype="<u2").reshape(n_layer * n_head, -1)
    prob = np.frombuffer(base64.b64decode(payload["links"]["prob"]), dtype="<u2").reshape(n_layer * n_head, -1)
    rows = np.repeat(np.arange(n_tokens), np.arange(1, n_tokens + 1))  # the query of each stored link
    out = np.zeros((n_layer * n_head, n_tokens, n_tokens))
    for lh in range(n_layer * n_head):
        out[lh, rows, index[lh]] = prob[lh] / 65535
    return out.reshape(n_layer, n_head, n_tokens, n_tokens)


def assert_suggestions(got: list[dict], want) -> None:
    assert [(s["id"], s["text"]) for s in got] == [(t.id, t.text) for t in want]
    np.testing.assert_allclose([s["prob"] for s in got], [t.prob for t in want], rtol=1e-5, atol=1e-9)


# ---- the API, in process -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,k", [("The dog on the ship", 1), (" odd  spacing\n\tand a tab", 7),
                                    ("Ünïcödé ✓ 日本語", None), ("<|endoftext|>Hi", 100)])
def test_next_is_next_tokens_and_attention_of_the_text(client, reference, text, k):
    body = {"text": text} if k is None else {"text": text, "k": k}
    reply = client.post("/api/next", json=body)
    assert reply.status_code == 200, reply.text
    reply = reply.json()
    ids = reference.tokenizer.encode(text, allowed_special="all")
    assert reply["token_ids"] == ids and reply["n_tokens"] == len(ids) and reply["max_tokens"] == 1024
    assert reply["context"] is None and reply["note"] is None and reply["text"] == text
    assert_suggestions(reply["suggestions"], reference.next_tokens(text, k=k or 10))
    want = reference.attention(text)
    assert reply["tokens"] == want.tokens == reply["trace"]["tokens"]
    assert (reply["trace"]["n_layer"], reply["trace"]["n_head"], reply["trace"]["qk"]) == (2, 2, None)
    np.testing.assert_allclose(link_probs(reply["trace"]), want.probs.double().numpy(), atol=1 / 65535)


def test_empty_text_means_endoftext(client, reference):
    reply = client.post("/api/next", json={"text": ""}).json()
    assert reply["token_ids"] == [EOT] and reply["tokens"] == ["<|endoftext|>"]
    assert reply["context"] == "<|endoftext|>" and "<|endoftext|>" in reply["note"]
    assert_suggestions(reply["suggestions"], reference.next_tokens([EOT], k=10))


@pytest.mark.parametrize("body,content_type,status,message", [
    (b'{"text": "a"', "application/json", 400, "not valid JSON"),
    (b"\xff\xfe\x00", "application/json", 400, "not valid JSON"),
    (b'["a"]', "application/json", 400, "must be a JSON object"),
    (b"{}", "application/json", 400, "'text' is missing"),
    (b'{"text": 3}', "application/json", 400, "'text' must be a string, got int"),
    (b'{"text": null}', "application/json", 400, "'text' must be a string, got NoneType"),
    (b'{"text": "a", "k": "3"}', "application/json", 400, "'k' must be an integer from 1 to 100, got '3'"),
    (b'{"text": "a", "k": 0}', "application/json", 400, "got 0"),
    (b'{"text": "a", "k": 101}', "application/json", 400, "got 101"),
    (b'{"text": "a", "k": 2.5}', "application/json", 400, "got 2.5"),
    (b'{"text": "a", "k": true}', "application/json", 400, "got True"),
    (b'{"text": "a", "top": 3}', "application/json", 400, "unknown field(s) 'top'"),
    (b'{"text": "a"}', "text/plain", 415, "Content-Type: application/json"),
    (b'{"text": "' + b"a" * MAX_BODY_BYTES + b'"}', "application/json", 413, "over 1024 KB"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "not valid JSON"),  # nested past the recursion limit
    (b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400, "not valid JSON"),
    (b'{"text": "\\ud800", "k": 2}', "application/json", 400, "lone UTF-16 surrogate"),  # escaped half a pair
    (b'{"text": "a\\udc00\\ud800b"}', "application/json", 400, "lone UTF-16 surrogate"),
    (b'{"\\ud800": 1, "text": "a"}', "application/json", 400, "unknown field(s) '\\ud800'"),
    (b'{"text": "a", "k": 1e309}', "application/json", 400, "got inf"),
])
def test_bad_requests_get_a_message_not_a_500(client, body, content_type, status, message):
    reply = client.post("/api/next", content=body, headers={"Content-Type": content_type})
    assert reply.status_code == status
    assert message in reply.json()["error"]


def test_loopback_host_names_are_allowed_and_others_refused(reference):
    """DNS rebinding: a page elsewhere can send to the loopback port with its own Host. An IPv6 Host comes in
    brackets ([::1]), which is how the explorer must list it."""
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("192.168.1.10") is None
    for address in ("127.0.0.1", "::1"):
        client = TestClient(make_app(reference, allowed_hosts=allowed_hosts_for(address)))
        for host in ("127.0.0.1:8001", "localhost:8001", "[::1]:8001", "[::1]"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, (address, host)
        for host in ("evil.example", "evil.example:8001", "::1"):
            reply = client.post("/api/next", json={"text": "a"}, headers={"Host": host})
            assert reply.status_code == 400 and "Invalid host" in reply.text, (address, host)


def _ipv6_loopback_port() -> int | None:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as s:
            return s.getsockname()[1]
    except OSError:
        return None


@pytest.mark.skipif(_ipv6_loopback_port() is None, reason="no IPv6 loopback here")
def test_the_explorer_on_ipv6_loopback_answers_its_own_url():
    """``gpt2fast explore --host ::1``: the printed URL http://[::1]:PORT/ works; a foreign Host does not."""
    port = _ipv6_loopback_port()
    cmd = [sys.executable, "-m", "gpt2fast", "explore", "--model", TINY_MODEL, "--host", "::1", "--port", str(port)]
    url = f"http://[::1]:{port}"
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            deadline = time.monotonic() + 90
            while True:  # any HTTP answer means it listens (before the fix it was a 400 to every request)
                assert proc.poll() is None and time.monotonic() < deadline, "the explorer did not start"
                try:
                    health = httpx.get(url + "/health", timeout=2)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            assert health.status_code == 200, health.text
            reply = httpx.post(url + "/api/next", json={"text": "The dog", "k": 2}, timeout=30)
            assert reply.status_code == 200 and reply.json()["tokens"] == ["The", " dog"]
            assert httpx.get(url + "/", timeout=10).status_code == 200
            assert httpx.get(url + "/health", headers={"Host": "evil.example"}, timeout=10).status_code == 400
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_text_over_the_context_is_refused(client, reference):
    text = " a" * 1024
    assert len(reference.tokenizer.encode(text)) == 1024
    reply = client.post("/api/next", json={"text": text})
    assert reply.status_code == 200
    assert reply.json()["n_tokens"] == 1024 and len(reply.json()["trace"]["tokens"]) == 1024
    assert_suggestions(reply.json()["suggestions"], reference.next_tokens(text))
    for n_tokens in (1025, 4099):
        reply = client.post("/api/next", json={"text": " a" * n_tokens})
        assert reply.status_code == 400
        assert reply.json() == {"error": f"the text is {n_tokens} tokens long; the explorer takes at most 1024 (the "
                                         "model's context, n_positions): shorten it",
                                "n_tokens": n_tokens, "max_tokens": 1024}


def test_page_is_self_contained_under_a_nonce_csp(client):
    pages = [client.get("/") for _ in range(2)]
    nonces = []
    for page in pages:
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        nonce = re.fullmatch(r"default-src 'none'; script-src 'nonce-([\w-]+)'; style-src 'nonce-\1'; "
                             r"connect-src 'self'; .*", csp).group(1)
        nonces.append(nonce)
        tags = re.findall(r"<(script|style)([^>]*)>", page.text)
        assert len(tags) == 4  # the style, the config (JSON, not run), the views' JS and the explorer's JS
        for tag, attrs in tags:
            assert f'nonce="{nonce}"' in attrs or attrs == ' type="application/json" id="g2f-config"', (tag, attrs)
        for external in ("http://", "https://", "src=", "href=", "url(", "@import", "<link", "<img", "<iframe"):
            assert external not in page.text, external
        css, js = head_view_assets()
        assert css in page.text and js in page.text
    assert nonces[0] != nonces[1]


class OverlapRecorder:
    """An LLM stand-in that counts how many model calls run at once (each holds the model a little while)."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self.active, self.peak, self.calls = llm, 0, 0, 0
        self.guard = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.llm, name)

    @contextmanager
    def busy(self):
        with self.guard:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.02)
        try:
            yield
        finally:
            with self.guard:
                self.active -= 1

    def next_tokens(self, ids, k=10):
        with self.busy():
            return self.llm.next_tokens(ids, k)

    def attention(self, ids, qk=False):
        with self.busy():
            return self.llm.attention(ids, qk=qk)


def test_model_calls_never_overlap(reference):
    recorder = OverlapRecorder(LLM(TINY_MODEL))
    texts = [f"Request number {i} says" for i in range(6)]

    async def ask_all():
        transport = httpx.ASGITransport(app=make_app(recorder))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*(http.post("/api/next", json={"text": t, "k": 3}) for t in texts))

    replies = asyncio.run(ask_all())
    assert (recorder.calls, recorder.peak) == (2 * len(texts), 1)
    for text, reply in zip(texts, replies):
        assert_suggestions(reply.json()["suggestions"], reference.next_tokens(text, k=3))


def test_main_bad_input_exits_2(capsys):
    assert main(["--model", "/no/such/folder", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("gpt2fast explore: error: ")
    assert main(["--model", TINY_MODEL, "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "gpt2fast explore: error: --port must be from 0 to 65535, got 70000"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["--model", TINY_MODEL, "--port", str(port)]) == 2
    assert f"gpt2fast explore: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main([]) == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err


# ---- the real process, in chromium --------------------------------------------------------------------------

SETTLED = """() => {
  const root = document.getElementById('g2f-explore'), box = document.getElementById('g2f-text');
  return ['ready', 'error'].includes(root.dataset.state) && root.dataset.shown === box.value;
}"""
SUGGESTIONS = ("els => els.map(e => ({text: e.dataset.text, id: Number(e.dataset.id), "
               "prob: Number(e.dataset.prob), label: e.querySelector('.g2f-sugg-text').textContent, "
               "bar: e.querySelector('.g2f-sugg-bar').style.width}))")
LINES = "els => els.map(e => ['data-q', 'data-k', 'data-h', 'data-p'].map(name => Number(e.getAttribute(name))))"


@pytest.fixture(scope="module")
def server():
    with running("explore", "--model", TINY_MODEL, ready_path="/") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def settle(page, state: str = "ready") -> None:
    page.wait_for_function(SETTLED, timeout=20_000)
    assert page.get_attribute("#g2f-explore", "data-state") == state, page.text_content("#g2f-error")


def shown_suggestions(page) -> list[dict]:
    got = page.eval_on_selector_all(".g2f-suggestion", SUGGESTIONS)
    for s in got:
        assert s["label"] == s["text"].replace("\n", "\u21b5").replace("\t", "\u21e5")
        assert float(s["bar"].rstrip("%")) == pytest.approx(100 * s["prob"], abs=1e-3)
    return got


def assert_head_view(page, want, layer: int, head: int) -> None:
    """The head view draws ``want`` (an AttentionTrace): its tokens, and every link of (layer, head) at its weight."""
    assert page.eval_on_selector_all(".g2f-left .g2f-tok", "els => els.map(e => e.title.replace(/^\\d+: /, ''))") \
        == want.tokens
    assert (page.input_value("select.g2f-layer"), page.input_value("select.g2f-head")) == (str(layer), str(head))
    lines = page.eval_on_selector_all("svg.g2f-lines line", LINES)
    n_tokens = len(want.tokens)
    assert sorted((q, k) for q, k, _, _ in lines) == [(q, k) for q in range(n_tokens) for k in range(q + 1)]
    probs = want.probs[layer, head].double().numpy()
    for q, k, h, p in lines:
        assert h == head and abs(p - probs[q, k]) <= 1e-4 + 5e-4 * probs[q, k]


def test_clicking_a_suggestion_appends_it_and_refreshes(browser, server, reference, tmp_path):
    text = "The dog on the ship"
    with open_page(browser) as (page, errors):
        page.goto(server.url + "/")
        settle(page)  # the empty text: what follows <|endoftext|>
        assert_suggestions(shown_suggestions(page), reference.next_tokens([EOT]))
        page.fill("#g2f-text", text)
        settle(page)
        before = shown_suggestions(page)
        assert_suggestions(before, reference.next_tokens(text))
        assert_head_view(page, reference.attention(text), layer=0, head=0)

        page.locator(".g2f-suggestion").nth(2).click()
        settle(page)
        new_text = page.input_value("#g2f-text")
        assert new_text == text + before[2]["text"]
        after = shown_suggestions(page)
        assert_suggestions(after, reference.next_tokens(new_text))
        assert [s["id"] for s in after] != [s["id"] for s in before]
        page.mouse.move(1, 1)  # no token hovered: every line drawn
        assert_head_view(page, reference.attention(new_text), layer=0, head=0)

        page.select_option("select.g2f-layer", "1")
        page.select_option("select.g2f-head", "1")
        assert_head_view(page, reference.attention(new_text), layer=1, head=1)
        page.locator(".g2f-suggestion").nth(0).click()  # the reader's layer/head stay chosen across steps
        settle(page)
        newest = page.input_value("#g2f-text")
        assert newest == new_text + after[0]["text"]
        assert_suggestions(shown_suggestions(page), reference.next_tokens(newest))
        page.mouse.move(1, 1)
        assert_head_view(page, reference.attention(newest), layer=1, head=1)
        save_screenshot(page, "explore_after_two_clicks", tmp_path, full_page=True)
    assert errors == []


def test_hostile_text_stays_text(browser, server, reference, tmp_path):
    with open_page(browser) as (page, errors):
        page.goto(server.url + "/")
        settle(page)
        page.fill("#g2f-text", HOSTILE)
        settle(page)
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.input_value("#g2f-text") == HOSTILE
        tokens = page.eval_on_selector_all(".g2f-left .g2f-tok", "els => els.map(e => e.textContent)")
        assert "".join(tokens) == HOSTILE and tokens == reference.attention(HOSTILE).tokens
        assert page.query_selector_all("#g2f-explore img, #g2f-explore script") == []
        assert_suggestions(shown_suggestions(page), reference.next_tokens(HOSTILE))
        page.locator(".g2f-left .g2f-tok").nth(1).hover()
        page.locator(".g2f-suggestion").nth(1).click()
        settle(page)
        assert page.input_value("#g2f-text").startswith(HOSTILE)
        assert page.evaluate("typeof window.__pwned") == "undefined"
        save_screenshot(page, "explore_hostile_text", tmp_path, full_page=True)
    assert errors == []


def test_long_text_up_to_the_context_then_a_message(browser, server, reference, tmp_path):
    with open_page(browser) as (page, errors):
        page.goto(server.url + "/")
        settle(page)
        page.fill("#g2f-text", " a" * 1024)
        settle(page)
        assert page.evaluate("document.querySelectorAll('.g2f-left .g2f-tok').length") == 1024
        assert 0 < page.evaluate("document.querySelectorAll('svg.g2f-lines line').length") <= 5000
        page.fill("#g2f-text", " a" * 1100)
        settle(page, "error")
        message = page.text_content("#g2f-error")
        assert message == ("the text is 1100 tokens long; the explorer takes at most 1024 (the model's context, "
                           "n_positions): shorten it")
        assert page.is_visible("#g2f-error") and page.query_selector_all(".g2f-suggestion") == []
        save_screenshot(page, "explore_too_long", tmp_path)
        page.fill("#g2f-text", "Short again")
        settle(page)
        assert not page.is_visible("#g2f-error")
        assert_suggestions(shown_suggestions(page), reference.next_tokens("Short again"))
    # chromium logs every non-2xx fetch as a console error; the 400 was the point here
    assert [e for e in errors if "status of 400" not in e] == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_prints_its_url_and_stops_cleanly(sig):
    with running("explore", "--model", TINY_MODEL, ready_path="/health") as server:
        assert f"at {server.url}/ (Ctrl-C to stop)" in server.output()
        assert server.stop(sig) == 0
        output = server.output()
    assert "gpt2fast explore: stopped" in output and "Traceback" not in output
