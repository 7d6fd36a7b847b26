"""Attention heat maps as PNGs, for reports (``gpt2fast attention --png DIR``).

``save_pngs(trace, folder)`` writes ``attention_layer{L:02d}.png`` per layer (its heads as subplots; rows
are queries, columns keys; token labels on the axes when there are at most ``LABELLED_TOKENS`` tokens) and
``attention_model.png``, the overview of every layer x head (each map max-pooled to at most
``MODEL_CELLS`` cells a side, as in the HTML model view). Colour follows sqrt(p), so weak links still show.

``layer_figure`` and ``model_figure`` return the ``matplotlib.figure.Figure`` so tests can read the
plotted arrays back (``fig.axes[h].images[0].get_array()``). Figures are drawn on ``FigureCanvasAgg``
without ``pyplot``: no display needed, matplotlib's global state is left alone.
"""

from __future__ import annotations

import math
import pathlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from gpt2fast.viz.common import max_pool_maps, trace_probs

DPI = 110
LABELLED_TOKENS = 40
MODEL_CELLS = 64
HEADS_PER_ROW = 4
CMAP = "Blues"


def _label(token: str) -> str:
    """A token as an axis label: ``$`` would start matplotlib mathtext, a newline would break the row."""
    return token.replace("$", r"\$").replace("\n", "\u21b5").replace("\t", "\u21e5")


def _title(trace) -> str:
    model = str(getattr(trace, "model", "") or "")
    return f"{model} attention" if model else "attention"


def layer_figure(trace, layer: int) -> Figure:
    """One layer's heads as heat maps of their (T, T) attention probabilities.

    >>> from gpt2fast.viz import random_trace
    >>> fig = layer_figure(random_trace(n_layer=2, n_head=3, n_tokens=4), layer=1)
    >>> len(fig.axes[0].images), fig.axes[0].images[0].get_array().shape
    (1, (4, 4))
    """
    probs = trace_probs(trace)[layer].numpy()  # (H, T, T)
    n_head, n_tokens, _ = probs.shape
    ncols = min(n_head, HEADS_PER_ROW)
    nrows = math.ceil(n_head / ncols)
    side = 3.2 if n_tokens <= LABELLED_TOKENS else 2.8
    fig = Figure(figsize=(side * ncols, side * nrows + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).flat
    labels = [_label(str(token)) for token in trace.tokens]
    for head, ax in enumerate(axes):
        if head >= n_head:
            ax.set_axis_off()
            continue
        ax.imshow(probs[head], cmap=CMAP, norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=9)
        if n_tokens <= LABELLED_TOKENS:
            ax.set_xticks(range(n_tokens), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(n_tokens), labels, fontsize=6)
        else:
            ax.set_xlabel("key", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"{_title(trace)}, layer {layer}")
    return fig


def model_figure(trace, cells: int = MODEL_CELLS) -> Figure:
    """Every layer (rows) x head (columns) as a small map, each max-pooled to at most ``cells`` a side.

    >>> from gpt2fast.viz import random_trace
    >>> fig = model_figure(random_trace(n_layer=2, n_head=3, n_tokens=5), cells=2)
    >>> len(fig.axes), fig.axes[0].images[0].get_array().shape
    (6, (2, 2))
    """
    maps, block = max_pool_maps(trace_probs(trace), cells)  # (L, H, n, n)
    n_layer, n_head = maps.shape[:2]
    fig = Figure(figsize=(1.1 * n_head + 0.6, 1.1 * n_layer + 0.7), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            ax.imshow(maps[layer, head].numpy(), cmap=CMAP, norm=PowerNorm(0.5, vmin=0, vmax=1),
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"H{head}", fontsize=7)
            if head == 0:
                ax.set_ylabel(f"L{layer}", fontsize=7)
    pooled = f", max over {block}x{block} token blocks" if block > 1 else ""
    fig.suptitle(f"{_title(trace)}: layers x heads{pooled}", fontsize=9)
    return fig


def save_pngs(trace, folder, layers=None) -> list[pathlib.Path]:
    """Write one PNG per layer in ``layers`` (default: all) and the model overview into ``folder``
    (created); returns the paths, layers first.

    >>> import tempfile
    >>> from gpt2fast.viz import random_trace
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     [path.name for path in save_pngs(random_trace(n_layer=2), folder, layers=[1])]
    ['attention_layer01.png', 'attention_model.png']
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_layer = trace_probs(trace).shape[0]
    layers = range(n_layer) if layers is None else list(layers)
    paths = []
    for layer in layers:
        if not 0 <= layer < n_layer:
            raise ValueError(f"layer {layer} out of range: the trace has {n_layer} layers")
        path = folder / f"attention_layer{layer:02d}.png"
        layer_figure(trace, layer).savefig(path)
        paths.append(path)
    path = folder / "attention_model.png"
    model_figure(trace).savefig(path)
    paths.append(path)
    return paths
