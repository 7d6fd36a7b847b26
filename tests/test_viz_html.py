"""gpt2fast.viz HTML views: the payload against the probabilities it encodes (decoded here with numpy,
independently of the page's JS), the page's safety properties, and the page itself in headless chromium
(tests/browser.py): pickers, hover, model grid, query/key view, hostile text, and a 1024-token trace."""

from __future__ import annotations

import base64
import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from browser import chromium, open_page, save_screenshot

from gpt2fast.viz import head_view_assets, render_fragment, render_html, trace_payload

HOSTILE = ["<script>window.__pwned=1</script>", '<img src=x onerror="window.__pwned=1">', " \"quoted\" 'single'",
           "</script><script>window.__pwned=1</script>", " a&amp;b", "\u2028line\u2029sep", "<!--", " ok"]
SIZES = [(1, 1, 1, 3), (2, 3, 7, 5), (3, 2, 17, 8)]  # (n_layer, n_head, T, head_dim)


def fake_trace(n_layer: int, n_head: int, n_tokens: int, head_dim: int | None = 6, seed: int = 0,
               tokens: list[str] | None = None, model: str = "fake-gpt") -> SimpleNamespace:
    """Rows of a causal softmax in float64 numpy; with ``head_dim`` they are softmax(q.k / sqrt(d))."""
    rng = np.random.default_rng(seed)
    tokens = tokens if tokens is not None else [f" w{i}" for i in range(n_tokens)]
    n_tokens = len(tokens)
    queries = keys = None
    if head_dim is None:
        scores = 3 * rng.standard_normal((n_layer, n_head, n_tokens, n_tokens))
    else:
        queries = 2 * rng.standard_normal((n_layer, n_head, n_tokens, head_dim))
        keys = 2 * rng.standard_normal((n_layer, n_head, n_tokens, head_dim))
        scores = queries @ keys.swapaxes(-1, -2) / np.sqrt(head_dim)
    scores = np.where(np.tri(n_tokens, dtype=bool), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    def as_torch(a):
        return None if a is None else torch.tensor(a, dtype=torch.float32)

    return SimpleNamespace(tokens=tokens, probs=as_torch(probs), queries=as_torch(queries), keys=as_torch(keys),
                           model=model)


def decode_links(payload: dict) -> list[list[list[list[tuple[int, float]]]]]:
    """links[layer][head][query] = [(key, p), ...] from the payload's base64 arrays."""
    links = payload["links"]
    index = np.frombuffer(base64.b64decode(links["index"]), dtype="<u2")
    prob = np.frombuffer(base64.b64decode(links["prob"]), dtype="<u2") / 65535
    n_tokens, n_layer, n_head = len(payload["tokens"]), payload["n_layer"], payload["n_head"]
    counts = [min(links["per_row"], i + 1) for i in range(n_tokens)]
    assert index.size == prob.size == n_layer * n_head * sum(counts)
    out, pos = [], 0
    for _ in range(n_layer):
        out.append([])
        for _ in range(n_head):
            rows = []
            for count in counts:
                rows.append(list(zip(index[pos:pos + count].tolist(), prob[pos:pos + count].tolist())))
                pos += count
            out[-1].append(rows)
    return out


@pytest.mark.parametrize("n_layer,n_head,n_tokens,head_dim", SIZES)
def test_payload_keeps_every_link_when_small(n_layer, n_head, n_tokens, head_dim):
    trace = fake_trace(n_layer, n_head, n_tokens, head_dim, seed=n_tokens)
    payload = trace_payload(trace)
    probs = trace.probs.double().numpy()
    assert payload["links"]["per_row"] == n_tokens
    for layer, heads in enumerate(decode_links(payload)):
        for head, rows in enumerate(heads):
            for query, row in enumerate(rows):
                keys = [key for key, _ in row]
                assert sorted(keys) == list(range(query + 1))
                got = np.array([p for _, p in row])
                np.testing.assert_allclose(got, probs[layer, head, query, keys], atol=1 / 65535)
                assert (np.diff(got) <= 0).all(), "strongest first"


def test_payload_keeps_the_strongest_links_when_large():
    trace = fake_trace(2, 3, 61, head_dim=None, seed=5)
    payload = trace_payload(trace, max_links=2 * 3 * 61 * 5)
    assert payload["links"]["per_row"] == 5
    probs = trace.probs.double().numpy()
    for layer, heads in enumerate(decode_links(payload)):
        for head, rows in enumerate(heads):
            for query, row in enumerate(rows):
                want = np.argsort(-probs[layer, head, query, :query + 1], kind="stable")[:5]
                assert [key for key, _ in row][:1] == [int(want[0])]
                assert {key for key, _ in row} == set(want.tolist())
                np.testing.assert_allclose([p for _, p in row], probs[layer, head, query, want], atol=1 / 65535)


@pytest.mark.parametrize("n_tokens,cells", [(5, 64), (70, 8), (33, 16)])
def test_payload_maps_are_max_pooled(n_tokens, cells):
    trace = fake_trace(2, 2, n_tokens, head_dim=None, seed=1)
    maps = trace_payload(trace, map_cells=cells)["maps"]
    block = -(-n_tokens // cells)
    size = -(-n_tokens // block)
    assert (maps["block"], maps["size"]) == (block, size) and size <= cells
    probs = trace.probs.double().numpy()
    padded = np.zeros((2, 2, size * block, size * block))
    padded[:, :, :n_tokens, :n_tokens] = probs
    want = padded.reshape(2, 2, size, block, size, block).max(axis=(3, 5))
    got = np.frombuffer(base64.b64decode(maps["data"]), dtype=np.uint8).reshape(2, 2, size, size)
    np.testing.assert_allclose(got, np.round(np.sqrt(want) * 255), atol=1)  # float32 vs float64 at .5


def test_payload_qk_is_float16_and_a_prefix_when_large():
    trace = fake_trace(2, 3, 9, head_dim=5, seed=2)
    qk = trace_payload(trace)["qk"]
    assert (qk["n_tokens"], qk["head_dim"]) == (9, 5)
    queries = np.frombuffer(base64.b64decode(qk["q"]), dtype="<f2").reshape(2, 3, 9, 5)
    np.testing.assert_array_equal(queries, trace.queries.numpy().astype(np.float16))
    small = trace_payload(trace, max_qk_values=2 * 2 * 3 * 5 * 4)["qk"]
    keys = np.frombuffer(base64.b64decode(small["k"]), dtype="<f2").reshape(2, 3, 4, 5)
    assert small["n_tokens"] == 4
    np.testing.assert_array_equal(keys, trace.keys[:, :, :4].numpy().astype(np.float16))
    assert trace_payload(fake_trace(1, 2, 3, head_dim=None))["qk"] is None


def embedded_json(page: str) -> str:
    match = re.search(r'<script type="application/json" id="[\w-]+">(.*?)</script>', page, re.S)
    assert match, "payload script not found"
    return match.group(1)


def test_page_is_self_contained():
    page = render_html(fake_trace(2, 3, 7, seed=3))
    for external in ("http://", "https://", "src=", "href=", "url(", "@import", "<link", "<img", "<iframe"):
        assert external not in page, external
    assert "default-src 'none'" in page  # the browser itself refuses any fetch
    css, js = head_view_assets()
    assert css in page and js in page


def test_payload_json_escapes_what_could_end_the_script():
    trace = fake_trace(1, 2, len(HOSTILE), tokens=HOSTILE, model="</script><b>model</b>")
    page = render_html(trace, title=None)
    data = embedded_json(page)
    for raw in ("<", ">", "&", "\u2028", "\u2029"):
        assert raw not in data, repr(raw)
    payload = json.loads(data)
    assert payload["tokens"] == HOSTILE and payload["model"] == "</script><b>model</b>"
    assert "<title>&lt;/script&gt;&lt;b&gt;model&lt;/b&gt; attention</title>" in page


def test_render_html_rejects_unknown_view_and_bad_shapes():
    with pytest.raises(ValueError, match="view"):
        render_html(fake_trace(1, 1, 3), view="heads")
    bad = fake_trace(1, 1, 3)
    bad.tokens = bad.tokens[:2]
    with pytest.raises(ValueError, match="len\\(tokens\\)"):
        render_html(bad)


# ---- in the browser -------------------------------------------------------------------------------------

LINES = ("els => els.map(e => ['data-q', 'data-k', 'data-p', 'data-h', 'stroke-opacity']"
         ".map(name => Number(e.getAttribute(name))))")


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def open_file(page, tmp_path, trace, view="all", name="attention.html"):
    path = tmp_path / name
    path.write_text(render_html(trace, view=view), encoding="utf-8")
    page.goto(path.as_uri())
    page.wait_for_selector(".g2f-root[data-g2f-done]", state="attached")


def drawn_lines(page) -> list[list[float]]:
    return page.eval_on_selector_all(".g2f-head-section svg.g2f-lines line", LINES)


def assert_lines_are(lines, probs: np.ndarray, head: int):
    """Every drawn line is a (query, key) link with opacity = its weight; every link of the head is drawn."""
    n_tokens = probs.shape[-1]
    assert sorted((q, k) for q, k, *_ in lines) == [(q, k) for q in range(n_tokens) for k in range(q + 1)]
    for q, k, p, h, opacity in lines:
        assert h == head and p == opacity
        assert abs(p - probs[q, k]) <= 1e-5 + 5e-4 * probs[q, k]
    for q in range(n_tokens):
        strongest = max((line for line in lines if line[0] == q), key=lambda line: line[2])
        assert probs[q, strongest[1]] >= probs[q].max() - 5e-4, "the strongest line goes to the argmax key"


def test_head_view_follows_the_pickers(browser, tmp_path):
    trace = fake_trace(2, 3, 7, head_dim=5, seed=11)
    probs = trace.probs.double().numpy()
    with open_page(browser) as (page, errors):
        open_file(page, tmp_path, trace)
        before = drawn_lines(page)
        assert_lines_are(before, probs[0, 0], head=0)
        page.select_option(".g2f-head-section select.g2f-layer", "1")
        page.select_option(".g2f-head-section select.g2f-head", "2")
        after = drawn_lines(page)
        assert_lines_are(after, probs[1, 2], head=2)
        assert sorted(before) != sorted(after)
        page.select_option(".g2f-head-section select.g2f-head", "all")
        assert sorted({h for *_, h, _ in drawn_lines(page)}) == [0, 1, 2]
        assert len(drawn_lines(page)) == 3 * 7 * 8 // 2
        save_screenshot(page, "viz_head_view_all_heads", tmp_path)
    assert errors == []


def test_hovering_a_token_isolates_its_lines(browser, tmp_path):
    trace = fake_trace(2, 2, 9, head_dim=4, seed=12)
    with open_page(browser) as (page, errors):
        open_file(page, tmp_path, trace, view="head")
        page.locator(".g2f-left .g2f-tok").nth(4).hover()
        assert sorted((q, k) for q, k, *_ in drawn_lines(page)) == [(4, k) for k in range(5)]
        shaded = page.eval_on_selector_all(".g2f-right .g2f-tok", "els => els.map(e => e.style.background !== '')")
        assert shaded == [True] * 5 + [False] * 4
        page.locator(".g2f-right .g2f-tok").nth(6).hover()
        assert sorted((q, k) for q, k, *_ in drawn_lines(page)) == [(q, 6) for q in range(6, 9)]
        save_screenshot(page, "viz_head_view_hover", tmp_path)
        page.mouse.move(1, 1)
        assert len(drawn_lines(page)) == 9 * 10 // 2
    assert errors == []


def test_model_view_grid_opens_a_head(browser, tmp_path):
    n_layer, n_head = 3, 4
    trace = fake_trace(n_layer, n_head, 6, head_dim=None, seed=13)
    with open_page(browser) as (page, errors):
        open_file(page, tmp_path, trace, view="model")
        cells = page.eval_on_selector_all(".g2f-cell", "els => els.map(e => [+e.dataset.layer, +e.dataset.head])")
        assert sorted(cells) == [[layer, head] for layer in range(n_layer) for head in range(n_head)]
        save_screenshot(page, "viz_model_view", tmp_path)
        page.click('.g2f-cell[data-layer="2"][data-head="1"]')
        assert page.get_attribute(".g2f-root", "data-active") == "head"
        assert page.input_value(".g2f-head-section select.g2f-layer") == "2"
        assert page.input_value(".g2f-head-section select.g2f-head") == "1"
        assert_lines_are(drawn_lines(page), trace.probs.double().numpy()[2, 1], head=1)
        assert page.is_visible(".g2f-head-section svg.g2f-lines")
    assert errors == []


def test_qk_view_shows_the_vectors_and_their_softmax(browser, tmp_path):
    head_dim = 7
    trace = fake_trace(2, 3, 6, head_dim=head_dim, seed=14)
    probs = trace.probs.double().numpy()
    with open_page(browser) as (page, errors):
        open_file(page, tmp_path, trace, view="qk")
        page.select_option("select.g2f-qk-layer", "1")
        page.select_option("select.g2f-qk-head", "2")
        page.select_option("select.g2f-qk-query", "4")
        bands = page.eval_on_selector_all(".g2f-band", "els => els.map(e => e.querySelectorAll('.g2f-dim').length)")
        assert bands == [head_dim] * 3
        scores = page.eval_on_selector_all(".g2f-score",
                                           "els => els.map(e => Number(e.textContent.split('softmax ')[1]))")
        np.testing.assert_allclose(scores, probs[1, 2, 4, :5], atol=5e-3)  # q, k travel as float16
        chosen = page.eval_on_selector(".g2f-score-tok.g2f-chosen", "e => Number(e.dataset.key)")
        assert chosen == int(np.argmax(probs[1, 2, 4]))
        q = page.eval_on_selector_all(".g2f-band-q .g2f-dim", "els => els.map(e => Number(e.title.split(': ')[1]))")
        np.testing.assert_allclose(q, trace.queries[1, 2, 4].numpy(), rtol=2e-3, atol=1e-3)
        save_screenshot(page, "viz_qk_view", tmp_path)
        open_file(page, tmp_path, fake_trace(1, 2, 4, head_dim=None), view="qk", name="no_qk.html")
        assert "no query/key vectors" in page.text_content(".g2f-qk-note")
        assert page.query_selector_all(".g2f-band") == []
    assert errors == []


def test_hostile_tokens_render_as_text(browser, tmp_path):
    trace = fake_trace(2, 2, len(HOSTILE), head_dim=4, tokens=HOSTILE, model='<img src=x onerror="window.__pwned=1">')
    with open_page(browser) as (page, errors):
        open_file(page, tmp_path, trace)
        assert page.evaluate("typeof window.__pwned") == "undefined"
        for side in ("left", "right"):
            texts = page.eval_on_selector_all(f".g2f-{side} .g2f-tok", "els => els.map(e => e.textContent)")
            assert texts == HOSTILE
        assert page.query_selector_all(".g2f-root img, .g2f-root script") == []
        assert page.title() == trace.model + " attention"
        page.locator(".g2f-left .g2f-tok").nth(0).hover()
        page.click('.g2f-tab[data-view="qk"]')
        options = page.eval_on_selector_all("select.g2f-qk-query option", "els => els.map(e => e.textContent)")
        assert options == [f"{i}: {token}" for i, token in enumerate(HOSTILE)]
        scores = page.eval_on_selector_all(".g2f-score-tok", "els => els.map(e => e.textContent)")
        assert scores == HOSTILE
        assert page.evaluate("typeof window.__pwned") == "undefined"
        save_screenshot(page, "viz_qk_view_hostile", tmp_path)
    assert errors == []


def test_1024_tokens_render_quickly_with_bounded_lines(browser, tmp_path):
    n_layer, n_head, n_tokens = 2, 3, 1024
    trace = fake_trace(n_layer, n_head, n_tokens, head_dim=None, seed=15)
    path = tmp_path / "long.html"
    path.write_text(render_html(trace), encoding="utf-8")
    with open_page(browser) as (page, errors):
        start = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_selector(".g2f-root[data-g2f-done]", state="attached")
        before = drawn_lines(page)
        page.select_option(".g2f-head-section select.g2f-head", "2")
        after = drawn_lines(page)
        elapsed = time.perf_counter() - start
        assert elapsed < 5.0, f"load + switching a head took {elapsed:.1f} s"
        assert 0 < len(before) <= 5000 and 0 < len(after) <= 5000
        assert {h for *_, h, _ in after} == {2}
        note = page.text_content(".g2f-head-note")
        assert "strongest of up to 1024 links per token" in note and "Drawing 5000 of" in note
        assert {q for q, *_ in after} == set(range(n_tokens)), "every token keeps its strongest lines"
        probs = trace.probs.double().numpy()[0, 2]
        for q in range(n_tokens):
            strongest = max((line for line in after if line[0] == q), key=lambda line: line[2])
            assert probs[q, strongest[1]] >= probs[q].max() - 5e-4
        for q, k, p, *_ in after[:50]:
            assert abs(p - probs[q, k]) <= 1e-5 + 5e-4 * probs[q, k]
        assert page.evaluate("document.querySelectorAll('.g2f-cell canvas').length") == n_layer * n_head
        assert page.evaluate("document.querySelector('.g2f-cell canvas').width") == 64
        save_screenshot(page, "viz_head_view_1024_tokens", tmp_path)
    assert errors == []


def test_two_fragments_share_a_page(browser, tmp_path):
    """As in a notebook: two outputs on one page, each rendered into its own root."""
    first, second = fake_trace(1, 2, 3, seed=16), fake_trace(2, 3, 4, seed=17)
    path = tmp_path / "notebook.html"
    path.write_text("<!DOCTYPE html><meta charset='utf-8'><body>" + render_fragment(first, view="model") +
                    "<p>between</p>" + render_fragment(second, view="model"), encoding="utf-8")
    with open_page(browser) as (page, errors):
        page.goto(path.as_uri())
        counts = page.eval_on_selector_all(".g2f-root", "els => els.map(e => e.querySelectorAll('.g2f-cell').length)")
        assert counts == [2, 6]
    assert errors == []
