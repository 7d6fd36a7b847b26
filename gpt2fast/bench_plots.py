"""PNG plots of a ``gpt2fast bench`` result: tokens/s vs batch size, decode time vs context, % of floor.

``write_plots(result, out)`` takes the result dict of ``gpt2fast.bench`` (the schema of ``bench.json``,
in ``gpt2fast/bench.py``'s docstring) and writes, into the folder ``out``:

* ``tokens_per_s_vs_batch.png``: decode tokens/s (log axis) per provider against batch size (log2 axis); the
  dashed line of the same colour is the floor's tokens/s, ``batch / floor_ms * 1e3``;
* ``decode_ms_vs_context.png``: batch-1 decode step time per provider against the context it attends
  over (``result["context"]``); dashed: that provider's ``floor_ms``;
* ``pct_of_floor.png``: grouped bars, one group per batch size, one bar per provider, of
  ``pct_of_floor`` (100 % = a step as fast as copying its bytes once).

A plot whose rows are missing or empty (an older ``bench.json`` has no ``"context"``) is skipped.
Each plot is built by its own function, which returns a ``matplotlib.figure.Figure`` (or None when
there is nothing to plot) so that tests can read the plotted numbers back: measured lines are
labelled with the provider name, floor lines with ``"<provider> floor"``, and bar containers
(``ax.containers``) with the provider name.

Figures are drawn on ``FigureCanvasAgg`` without ``pyplot``: no display is needed, and matplotlib's
global backend and figure registry are left as they were.

Example (re-plot a saved run):
    python -m gpt2fast.bench_plots bench-results/bench.json           # PNGs beside the JSON
    python -m gpt2fast.bench_plots bench-results/bench.json --out plots
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import sys
from collections.abc import Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
          "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # 7 is coprime with 10 colours: 70 distinct providers
DPI = 120


def _example_result() -> dict:
    """A tiny synthetic result with every section, for the doctests."""
    meta = dict(model="random:gpt2", device="cpu", device_name="cpu", dtypes=["float32"])
    decode = [dict(provider=p, backend=p, dtype="float32", batch=b, tok_s=b * s, decode_ms=1e3 / s,
                   floor_ms=50.0, pct_of_floor=5.0 * s, context=20.0)
              for p, s in (("gpt2fast[torch]/float32", 12.0), ("hf", 10.0)) for b in (1, 8)]
    context = [dict(provider=p, backend=p, dtype="float32", batch=1, context=c, decode_ms=ms + c / 10,
                    tok_s=1e3 / (ms + c / 10), floor_ms=50.0 + c / 100, pct_of_floor=50.0)
               for p, ms in (("gpt2fast[torch]/float32", 80.0), ("hf", 95.0)) for c in (32, 128)]
    return dict(meta=meta, decode=decode, prefill=[], accuracy=[], context=context)


# ---- helpers ------------------------------------------------------------------------------------------


def _providers(rows: Iterable[dict]) -> list[str]:
    """Provider names in order of first appearance."""
    return list(dict.fromkeys(row["provider"] for row in rows))


def _styles(result: dict) -> dict[str, dict]:
    """One colour and marker per provider, the same in every plot of ``result``."""
    names = _providers(row for key in ("decode", "context") for row in result.get(key) or [])
    return {name: dict(color=color, marker=marker)
            for name, color, marker in zip(names, itertools.cycle(COLORS), itertools.cycle(MARKERS))}


def _series(rows: list[dict], provider: str, x: str) -> list[dict]:
    """``provider``'s rows sorted by the ``x`` key."""
    return sorted((row for row in rows if row["provider"] == provider), key=lambda row: row[x])


def _title(what: str, result: dict, rows: list[dict]) -> str:
    meta = result.get("meta") or {}
    dtypes = meta.get("dtypes") or sorted({row["dtype"] for row in rows if "dtype" in row})
    device = meta.get("device", "?")
    name = meta.get("device_name") or device
    where = device if name == device else f"{name} ({device})"
    return f"{what}\n{meta.get('model', '?')} on {where}, {', '.join(dtypes) or '?'}"


def _new_axes() -> tuple[Figure, object]:
    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)  # PNG without pyplot or a display
    return fig, fig.add_subplot()


def _legend(ax, floor: bool) -> None:
    """Providers' lines, plus one entry for every dashed floor line; outside the axes (many providers)."""
    handles = [line for line in ax.lines if not line.get_label().endswith(" floor")] + list(ax.containers)
    if floor:
        handles.append(Line2D([], [], color="black", linestyle="--", label="floor (copy bandwidth)"))
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


# ---- the plots ----------------------------------------------------------------------------------------


def tokens_per_s_figure(result: dict) -> Figure | None:
    """Decode tokens/s against batch size, one line per provider, its floor dashed; None without decode rows.

    Example:
        >>> fig = tokens_per_s_figure(_example_result())
        >>> [line.get_label() for line in fig.axes[0].lines]
        ['gpt2fast[torch]/float32', 'gpt2fast[torch]/float32 floor', 'hf', 'hf floor']
        >>> fig.axes[0].lines[2].get_xdata().tolist(), fig.axes[0].lines[2].get_ydata().tolist()
        ([1, 8], [10.0, 80.0])
        >>> fig.axes[0].lines[3].get_ydata().tolist()  # batch / floor_ms * 1e3
        [20.0, 160.0]
        >>> tokens_per_s_figure({"meta": {}, "decode": []}) is None
        True
    """
    rows = result.get("decode") or []
    if not rows:
        return None
    fig, ax = _new_axes()
    styles = _styles(result)
    for provider in _providers(rows):
        series = _series(rows, provider, "batch")
        batch = [row["batch"] for row in series]
        ax.plot(batch, [row["tok_s"] for row in series], label=provider, **styles[provider])
        ax.plot(batch, [row["batch"] / row["floor_ms"] * 1e3 for row in series], label=f"{provider} floor",
                linestyle="--", linewidth=1, color=styles[provider]["color"])
    batches = sorted({row["batch"] for row in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, labels=[str(b) for b in batches])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yscale("log")  # batch 1 and batch 64 differ by ~50x: a linear axis flattens batch 1 to zero
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("decode throughput (tokens/s, log scale)")
    ax.set_title(_title("Decode tokens/s vs batch size", result, rows))
    ax.grid(True, alpha=0.3)
    _legend(ax, floor=True)
    return fig


def decode_ms_vs_context_figure(result: dict) -> Figure | None:
    """Batch-1 decode step time against context length, one line per provider, its floor dashed.

    None when ``result`` has no ``"context"`` rows (a bench.json from before they were measured).

    Example:
        >>> fig = decode_ms_vs_context_figure(_example_result())
        >>> hf = [line for line in fig.axes[0].lines if line.get_label() == "hf"][0]
        >>> hf.get_xdata().tolist(), hf.get_ydata().round(1).tolist()
        ([32, 128], [98.2, 107.8])
        >>> decode_ms_vs_context_figure({"meta": {}, "decode": []}) is None
        True
    """
    rows = result.get("context") or []
    if not rows:
        return None
    fig, ax = _new_axes()
    styles = _styles(result)
    for provider in _providers(rows):
        series = _series(rows, provider, "context")
        context = [row["context"] for row in series]
        ax.plot(context, [row["decode_ms"] for row in series], label=provider, **styles[provider])
        ax.plot(context, [row["floor_ms"] for row in series], label=f"{provider} floor",
                linestyle="--", linewidth=1, color=styles[provider]["color"])
    ax.set_xlabel("context (tokens attended to)")
    ax.set_ylabel("decode step time, batch 1 (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(_title("Decode step time vs context length", result, rows))
    ax.grid(True, alpha=0.3)
    _legend(ax, floor=True)
    return fig


def pct_of_floor_figure(result: dict) -> Figure | None:
    """Grouped bars of % of floor: a group per batch size, a bar per provider measured at it; None without rows.

    A provider missing at some batch size has no bar there (its other bars keep their places).

    Example:
        >>> fig = pct_of_floor_figure(_example_result())
        >>> ax = fig.axes[0]
        >>> [(c.get_label(), c.datavalues.tolist()) for c in ax.containers]
        [('gpt2fast[torch]/float32', [60.0, 60.0]), ('hf', [50.0, 50.0])]
        >>> [t.get_text() for t in ax.get_xticklabels()]
        ['1', '8']
    """
    rows = result.get("decode") or []
    if not rows:
        return None
    fig, ax = _new_axes()
    styles = _styles(result)
    providers = _providers(rows)
    batches = sorted({row["batch"] for row in rows})
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        series = _series(rows, provider, "batch")
        x = [batches.index(row["batch"]) - 0.4 + (i + 0.5) * width for row in series]
        ax.bar(x, [row["pct_of_floor"] for row in series], width, label=provider, color=styles[provider]["color"])
    ax.axhline(100, color="black", linestyle="--", linewidth=1, label="100 % = at the floor")
    ax.set_ylim(0, 1.1 * max(100, *(row["pct_of_floor"] for row in rows)))  # the 100 % line clear of the frame
    ax.set_xticks(range(len(batches)), labels=[str(b) for b in batches])
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("% of floor (floor time / step time, %)")
    ax.set_title(_title("Decode speed as % of the memory-bandwidth floor", result, rows))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# ---- files --------------------------------------------------------------------------------------------

PLOTS = {  # file name -> the figure it holds; written in this order
    "tokens_per_s_vs_batch.png": tokens_per_s_figure,
    "decode_ms_vs_context.png": decode_ms_vs_context_figure,
    "pct_of_floor.png": pct_of_floor_figure,
}


def write_plots(result: dict, out: str | os.PathLike) -> list[pathlib.Path]:
    """Write the PNG plots of ``result`` into the folder ``out`` (made if missing); returns the paths written.

    A plot whose rows are missing or empty is not written and not returned.

    Example:
        >>> import tempfile
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> [p.name for p in write_plots(_example_result(), out)]
        ['tokens_per_s_vs_batch.png', 'decode_ms_vs_context.png', 'pct_of_floor.png']
        >>> (out / "pct_of_floor.png").read_bytes()[:4]
        b'\\x89PNG'
        >>> [p.name for p in write_plots(_example_result() | {"context": []}, out / "old")]
        ['tokens_per_s_vs_batch.png', 'pct_of_floor.png']
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in PLOTS.items():
        fig = figure(result)
        if fig is not None:
            fig.savefig(out / name, dpi=DPI)
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    """Re-plot a saved ``bench.json``: ``python -m gpt2fast.bench_plots BENCH_JSON [--out DIR]``.

    Example:
        >>> import tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "bench.json"
        >>> _ = path.write_text(json.dumps(_example_result()))
        >>> main([str(path)])  # doctest: +ELLIPSIS
        wrote .../tokens_per_s_vs_batch.png
        wrote .../decode_ms_vs_context.png
        wrote .../pct_of_floor.png
        0
    """
    parser = argparse.ArgumentParser(prog="python -m gpt2fast.bench_plots", description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=pathlib.Path, help="a bench.json written by gpt2fast bench")
    parser.add_argument("--out", type=pathlib.Path, help="folder for the PNGs (default: the JSON's folder)")
    args = parser.parse_args(argv)
    for path in write_plots(json.loads(args.bench_json.read_text()), args.out or args.bench_json.parent):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
