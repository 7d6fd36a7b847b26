"""Attention as one self-contained HTML page: head view, model view and query/key view.

``render_html(trace)`` returns a whole document with its CSS, JavaScript and data inline: no URL of any
kind, so it opens offline and from an e-mail attachment. A Content-Security-Policy with a per-page nonce
lets only the page's own scripts run and forbids every fetch, a second fence behind the rule that token
text never reaches the page as HTML (the JS sets ``textContent``).

The data is ``trace_payload(trace)``, embedded as ``<script type="application/json">`` with ``<``, ``>``,
``&``, U+2028 and U+2029 escaped so no token can close the script element. Its size is bounded whatever
the trace (a 1024-token trace of 12 x 12 heads gives a 4.0 MB file, 5.3 MB with its q/k vectors):

* links: for each head and query token i, the ``per_row`` strongest keys (all i + 1 of them when the
  whole trace fits ``max_links``), strongest first, as uint16 key indices and uint16 ``round(p * 65535)``;
* maps: each T x T map max-pooled to at most ``map_cells`` x ``map_cells`` for the model view;
* qk: the query and key vectors as float16, for the first tokens that fit ``max_qk_values`` (attention is
  causal, so a prefix is complete: query i needs keys 0..i only).

The page says in a visible note what it left out.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets

import numpy as np
import torch

from gpt2fast.viz.assets import CSS, JS
from gpt2fast.viz.common import max_pool_maps, trace_probs, trace_qk

VIEWS = ("all", "head", "model", "qk")
PAYLOAD_FORMAT = "gpt2fast.attention/1"
MAX_LINKS = 600_000  # stored (query, key) links over all heads: 2.4 MB of uint16 pairs, 3.2 MB as base64
MAP_CELLS = 64  # model-view maps are at most 64 x 64 cells
MAX_QK_VALUES = 1 << 19  # float16 q and k values kept: 1 MB, 1.4 MB as base64
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def links_per_row(n_layer: int, n_head: int, n_tokens: int, max_links: int = MAX_LINKS) -> int:
    """How many links each query row keeps: all of them (``n_tokens``) when every head's whole lower
    triangle fits ``max_links``, else the most that fit, at least 1.

    >>> links_per_row(12, 12, 20), links_per_row(12, 12, 1024), links_per_row(1, 1, 1024, max_links=10)
    (20, 4, 1)
    """
    if n_layer * n_head * n_tokens * (n_tokens + 1) // 2 <= max_links:
        return n_tokens
    return max(1, min(n_tokens, max_links // (n_layer * n_head * n_tokens)))


def _strongest_links(probs: torch.Tensor, per_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Per head, row i's ``min(per_row, i + 1)`` strongest keys, strongest first, rows concatenated:
    ``(index, prob)`` as (L, H, N) uint16 arrays. One layer at a time: a 1024-token trace is 600 MB."""
    n_tokens = probs.shape[-1]
    future = torch.ones(n_tokens, n_tokens, dtype=torch.bool).triu(1)
    kept = torch.arange(per_row) < (torch.arange(n_tokens) + 1)[:, None]  # (T, per_row)
    index, prob = [], []
    for layer_probs in probs:  # (H, T, T)
        # -1 above the diagonal: a future key never outranks a real one, even one whose weight underflowed to 0
        values, keys = layer_probs.masked_fill(future, -1.0).topk(per_row, dim=-1)  # (H, T, per_row)
        index.append(keys[:, kept].numpy())  # (H, N)
        prob.append(torch.round(values[:, kept].clamp(0, 1) * 65535).numpy())  # (H, N)
    return np.stack(index), np.stack(prob)


def trace_payload(trace, title: str | None = None, *, max_links: int = MAX_LINKS, map_cells: int = MAP_CELLS,
                  max_qk_values: int = MAX_QK_VALUES) -> dict:
    """The JSON-able data the views' JavaScript reads (``window.gpt2fastViz``, see ``gpt2fast.viz.assets``).

    Keys: ``format``, ``title``, ``model``, ``tokens`` (list of str), ``n_layer``, ``n_head``,
    ``links`` = {``per_row``, ``index``, ``prob``}: base64 little-endian uint16 arrays laid out
    (layer, head, query i, rank < min(per_row, i + 1)), strongest first, prob = round(p * 65535);
    ``maps`` = {``size``, ``block``, ``pool``: "max", ``data``}: base64 uint8 round(255 * sqrt(p)) of the
    max-pooled maps, (layer, head, size, size); ``qk``: None or {``n_tokens``, ``head_dim``, ``q``, ``k``}:
    base64 little-endian float16 (layer, head, n_tokens, head_dim) for the first ``n_tokens`` tokens.

    >>> from gpt2fast.viz import random_trace
    >>> payload = trace_payload(random_trace(n_layer=2, n_head=3, n_tokens=5, head_dim=4))
    >>> payload["links"]["per_row"], payload["maps"]["size"], payload["qk"]["n_tokens"]
    (5, 5, 5)
    >>> sorted(payload)
    ['format', 'links', 'maps', 'model', 'n_head', 'n_layer', 'qk', 'title', 'tokens']
    """
    probs = trace_probs(trace)  # (L, H, T, T)
    n_layer, n_head, n_tokens, _ = probs.shape
    if n_tokens > 65535:
        raise ValueError(f"at most 65535 tokens fit the payload's uint16 key indices, got {n_tokens}")
    model = str(getattr(trace, "model", "") or "")
    per_row = links_per_row(n_layer, n_head, n_tokens, max_links)
    index, prob = _strongest_links(probs, per_row)
    maps, block = max_pool_maps(probs, map_cells)  # (L, H, n, n)
    payload = {
        "format": PAYLOAD_FORMAT,
        "title": title or (f"{model} attention" if model else "Attention"),
        "model": model,
        "tokens": [str(token) for token in trace.tokens],
        "n_layer": n_layer,
        "n_head": n_head,
        "links": {"per_row": per_row, "index": _b64(index, "<u2"), "prob": _b64(prob, "<u2")},
        "maps": {"size": maps.shape[-1], "block": block, "pool": "max",
                 "data": _b64(torch.round(maps.clamp(0, 1).sqrt() * 255).numpy(), "u1")},
        "qk": None,
    }
    qk = trace_qk(trace)
    if qk is not None and n_tokens > 0:
        queries, keys = qk  # (L, H, T, D)
        head_dim = queries.shape[-1]
        kept = max(1, min(n_tokens, max_qk_values // (2 * n_layer * n_head * head_dim)))
        payload["qk"] = {"n_tokens": kept, "head_dim": head_dim,
                         "q": _b64(queries[:, :, :kept].numpy(), "<f2"), "k": _b64(keys[:, :, :kept].numpy(), "<f2")}
    return payload


def payload_json(payload: dict) -> str:
    """``payload`` as JSON that is safe inside ``<script type="application/json">``: ``<``, ``>``, ``&``,
    U+2028 and U+2029 are written as ``\\uXXXX`` escapes, which ``JSON.parse`` reads back unchanged.

    >>> payload_json({"t": "</script><b>&"})
    '{"t":"\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e\\\\u0026"}'
    """
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return text.translate(str.maketrans(_JSON_ESCAPES))


def head_view_assets() -> tuple[str, str]:
    """``(css, js)`` of the views, for a page that embeds them itself (the explorer): put the CSS in a
    ``<style>``, the JS in a ``<script>``, then call ``gpt2fastViz.renderHeadView(element, payload)`` with a
    ``trace_payload`` (call it again with the next payload to redraw).

    >>> css, js = head_view_assets()
    >>> ".g2f-tok" in css, "renderHeadView" in js
    (True, True)
    """
    return CSS, JS


def _parts(trace, view: str, title: str | None, nonce: str) -> tuple[str, str]:
    """``(title, body)``: the page's title and its style, root element, data and scripts."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    payload = trace_payload(trace, title)
    data = payload_json(payload)
    page_id = "g2f-" + hashlib.sha1(data.encode()).hexdigest()[:12]
    attr = f' nonce="{nonce}"' if nonce else ""
    body = f"""<style{attr}>{CSS}</style>
<div class="g2f-root" id="{page_id}" data-view="{view}"></div>
<script type="application/json" id="{page_id}-data">{data}</script>
<script{attr}>{JS}</script>
<script{attr}>gpt2fastViz.renderPending();</script>
"""
    return payload["title"], body


def render_fragment(trace, view: str = "all", title: str | None = None) -> str:
    """The views as an HTML fragment (style, root, data, scripts) to put inside another page: what a
    Jupyter ``_repr_html_`` returns. Several fragments may share one page. Same arguments as ``render_html``.

    >>> from gpt2fast.viz import random_trace
    >>> render_fragment(random_trace(n_tokens=3)).startswith("<style>")
    True
    """
    return _parts(trace, view, title, nonce="")[1]


def render_html(trace, view: str = "all", title: str | None = None) -> str:
    """One self-contained HTML document showing ``trace``: ``view`` is "all" (tabs for the three views),
    "head", "model" (the grid; a click opens the head view) or "qk". ``title`` defaults to the model name.

    >>> from gpt2fast.viz import random_trace
    >>> page = render_html(random_trace(n_tokens=4), view="head", title="demo <1>")
    >>> page.startswith("<!DOCTYPE html>"), "<title>demo &lt;1&gt;</title>" in page, "https://" in page
    (True, True, False)
    """
    nonce = secrets.token_urlsafe(16)
    title, body = _parts(trace, view, title, nonce)
    csp = f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
</head>
<body>
{body}</body>
</html>
"""
