"""gpt2fast.bench_plots: every figure plots exactly the rows it is given, and the PNGs are written.

The expected numbers are read straight from a synthetic bench result (random positive values, odd
batch sizes and contexts, rows shuffled, one provider missing a batch size) and compared with what
the figures hold (line data, bar heights and positions).
"""

import random
import sys

import matplotlib
import numpy as np
import pytest

from gpt2fast.bench_plots import (
    PLOTS,
    decode_ms_vs_context_figure,
    pct_of_floor_figure,
    tokens_per_s_figure,
    write_plots,
)

PROVIDERS = ["gpt2fast[triton]/float16", "hf", "gpt2fast[cuda]/bfloat16"]
BATCHES = [1, 3, 8]
CONTEXTS = [7, 33, 129, 511]
PARTIAL = "gpt2fast[cuda]/bfloat16"  # measured at batches 3 and 8 only, contexts 33 and 511 only
MISSING_BATCH, MISSING_CONTEXTS = 1, (7, 129)


def dtype_of(provider: str) -> str:
    return provider.split("/")[1] if "/" in provider else "float32"


def synthetic_result(seed: int = 0) -> dict:
    rng = random.Random(seed)
    decode = [dict(provider=p, backend=p, dtype=dtype_of(p), batch=b, context=rng.uniform(20, 60),
                   decode_ms=rng.uniform(5, 200), tok_s=rng.uniform(1, 900), floor_ms=rng.uniform(1, 50),
                   pct_of_floor=rng.uniform(1, 99), prompt_lens=[16] * b)
              for p in PROVIDERS for b in BATCHES if not (p == PARTIAL and b == MISSING_BATCH)]
    context = [dict(provider=p, backend=p, dtype=dtype_of(p), batch=1, context=c, decode_ms=rng.uniform(5, 200),
                    tok_s=rng.uniform(5, 200), floor_ms=rng.uniform(1, 50), pct_of_floor=rng.uniform(1, 99))
               for p in PROVIDERS for c in CONTEXTS if not (p == PARTIAL and c in MISSING_CONTEXTS)]
    rng.shuffle(decode)  # the plots must sort, not trust the order they are given
    rng.shuffle(context)
    meta = dict(model="random:gpt2-odd", device="cuda:0", device_name="Test GPU 7", dtypes=["bfloat16", "float16"])
    overhead = [dict(provider=p, batch=b, step_us=rng.uniform(10, 99), forward_us=5.0, overhead_us=3.0)
                for p in PROVIDERS for b in BATCHES]
    return dict(meta=meta, decode=decode, prefill=[], accuracy=[], context=context, overhead=overhead)


def rows_of(rows: list[dict], provider: str, x: str) -> list[dict]:
    return sorted((r for r in rows if r["provider"] == provider), key=lambda r: r[x])


def lines_by_label(fig) -> dict:
    return {line.get_label(): line for line in fig.axes[0].lines}


@pytest.fixture(scope="module")
def result() -> dict:
    return synthetic_result()


def test_tokens_per_s_plots_each_providers_rows_and_floor(result):
    fig = tokens_per_s_figure(result)
    ax = fig.axes[0]
    lines = lines_by_label(fig)
    assert set(lines) == set(PROVIDERS) | {f"{p} floor" for p in PROVIDERS}
    for p in PROVIDERS:
        rows = rows_of(result["decode"], p, "batch")
        expected_batches = [b for b in BATCHES if not (p == PARTIAL and b == MISSING_BATCH)]
        assert lines[p].get_xdata().tolist() == [r["batch"] for r in rows] == expected_batches
        np.testing.assert_array_equal(lines[p].get_ydata(), [r["tok_s"] for r in rows])
        floor_tok_s = np.array([r["batch"] for r in rows], np.float64) / np.array([r["floor_ms"] for r in rows]) * 1e3
        np.testing.assert_allclose(lines[f"{p} floor"].get_ydata(), floor_tok_s, rtol=1e-12)
        assert lines[f"{p} floor"].get_linestyle() == "--"
        assert lines[f"{p} floor"].get_color() == lines[p].get_color()
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3", "8"]
    assert "tokens/s" in ax.get_ylabel() and "batch size" in ax.get_xlabel()


def test_decode_ms_vs_context_plots_each_providers_rows_and_floor(result):
    fig = decode_ms_vs_context_figure(result)
    lines = lines_by_label(fig)
    assert set(lines) == set(PROVIDERS) | {f"{p} floor" for p in PROVIDERS}
    for p in PROVIDERS:
        rows = rows_of(result["context"], p, "context")
        expected = [c for c in CONTEXTS if not (p == PARTIAL and c in MISSING_CONTEXTS)]
        assert lines[p].get_xdata().tolist() == expected
        np.testing.assert_array_equal(lines[p].get_ydata(), [r["decode_ms"] for r in rows])
        assert lines[f"{p} floor"].get_xdata().tolist() == expected
        np.testing.assert_array_equal(lines[f"{p} floor"].get_ydata(), [r["floor_ms"] for r in rows])
        assert lines[f"{p} floor"].get_linestyle() == "--"
    ax = fig.axes[0]
    assert "(ms)" in ax.get_ylabel() and "context" in ax.get_xlabel() and "tokens" in ax.get_xlabel()


def test_pct_of_floor_bars_heights_and_groups(result):
    fig = pct_of_floor_figure(result)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(b) for b in BATCHES]
    assert [c.get_label() for c in ax.containers] == list(dict.fromkeys(r["provider"] for r in result["decode"]))
    assert len(ax.patches) == len(result["decode"])  # one bar per row, none for the missing batch
    for container in ax.containers:
        rows = rows_of(result["decode"], container.get_label(), "batch")
        heights = [bar.get_height() for bar in container.patches]
        np.testing.assert_array_equal(heights, [r["pct_of_floor"] for r in rows])
        groups = [round(bar.get_x() + bar.get_width() / 2) for bar in container.patches]  # tick index of its batch
        assert [BATCHES[g] for g in groups] == [r["batch"] for r in rows]
    hundred = [line for line in ax.lines if np.all(np.asarray(line.get_ydata()) == 100)]
    assert len(hundred) == 1
    assert "%" in ax.get_ylabel()


def test_provider_order_is_first_appearance_in_the_rows(result):
    order = list(dict.fromkeys(r["provider"] for r in result["decode"]))
    fig = tokens_per_s_figure(result)
    measured = [line.get_label() for line in fig.axes[0].lines if not line.get_label().endswith(" floor")]
    assert measured == order


@pytest.mark.parametrize("figure", [tokens_per_s_figure, decode_ms_vs_context_figure, pct_of_floor_figure])
def test_titles_name_model_device_and_dtypes(result, figure):
    title = figure(result).axes[0].get_title()
    for word in ("random:gpt2-odd", "Test GPU 7", "cuda:0", "bfloat16", "float16"):
        assert word in title


def test_write_plots_writes_every_png(result, tmp_path):
    out = tmp_path / "made" / "here"
    written = write_plots(result, out)
    assert written == [out / name for name in PLOTS]
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOTS)
    for path in written:
        data = path.read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 10_000


@pytest.mark.parametrize("change, missing", [  # change: section -> its new rows, None = the key is absent
    ({"context": None}, {"decode_ms_vs_context.png"}),  # a bench.json from before context rows
    ({"context": []}, {"decode_ms_vs_context.png"}),
    ({"decode": []}, {"tokens_per_s_vs_batch.png", "pct_of_floor.png"}),
    ({"decode": None, "context": None}, set(PLOTS)),
])
def test_missing_sections_skip_their_plots(result, tmp_path, change, missing):
    partial = {k: v for k, v in result.items() if k not in change} | {k: v for k, v in change.items() if v is not None}
    written = write_plots(partial, tmp_path)
    assert [p.name for p in written] == [name for name in PLOTS if name not in missing]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_no_pyplot_and_no_backend_change(result, tmp_path):
    """Plotting must not pull in pyplot (a global figure registry, a display backend) nor switch the backend."""
    pyplot_before = "matplotlib.pyplot" in sys.modules  # another test file may have imported it; then only the backend
    backend_before = matplotlib.rcParams._get_backend_or_none()
    write_plots(result, tmp_path)
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before
    assert matplotlib.rcParams._get_backend_or_none() == backend_before
