"""See inside the model: attention views of an ``AttentionTrace`` (``LLM.attention(text)``).

* ``render_html(trace, view="all"|"head"|"model"|"qk", title=None) -> str``: one self-contained page;
  ``render_fragment(...)``: the same without ``<html>``/``<head>``, for Jupyter's ``_repr_html_``;
* ``save_pngs(trace, folder, layers=None) -> list[Path]``: matplotlib heat maps for reports;
* ``head_view_assets() -> (css, js)`` and ``trace_payload(trace) -> dict``: the same views inside another
  page (the explorer): ``gpt2fastViz.renderHeadView(element, payload)`` in the browser;
* ``random_trace(...)``: a made-up trace to try them without a model.

>>> page = render_html(random_trace(n_layer=1, n_head=2, n_tokens=3))
>>> "gpt2fastViz.renderPending()" in page
True
"""

from gpt2fast.viz.common import random_trace
from gpt2fast.viz.html import head_view_assets, payload_json, render_fragment, render_html, trace_payload
from gpt2fast.viz.png import layer_figure, model_figure, save_pngs

__all__ = ["head_view_assets", "layer_figure", "model_figure", "payload_json", "random_trace", "render_fragment",
           "render_html", "save_pngs", "trace_payload"]
