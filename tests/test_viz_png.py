"""gpt2fast.viz PNG heat maps: the plotted arrays are the trace's probabilities (float64 numpy reference for
the max-pooled overview), the files are PNGs of the drawn size, and token labels survive matplotlib."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from gpt2fast.viz import layer_figure, model_figure, save_pngs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_trace(n_layer: int, n_head: int, n_tokens: int, seed: int = 0, tokens: list[str] | None = None):
    rng = np.random.default_rng(seed)
    tokens = tokens if tokens is not None else [f" w{i}" for i in range(n_tokens)]
    n_tokens = len(tokens)
    scores = np.where(np.tri(n_tokens, dtype=bool), 3 * rng.standard_normal((n_layer, n_head, n_tokens, n_tokens)),
                      -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return SimpleNamespace(tokens=tokens, probs=torch.tensor(probs, dtype=torch.float32), queries=None, keys=None,
                           model="fake-gpt")


def max_pool(maps: np.ndarray, block: int) -> np.ndarray:
    """(..., T, T) -> (..., ceil(T/block), ceil(T/block)) block maxima, zero-padded (probabilities are >= 0)."""
    n_tokens = maps.shape[-1]
    size = -(-n_tokens // block)
    padded = np.zeros(maps.shape[:-2] + (size * block, size * block))
    padded[..., :n_tokens, :n_tokens] = maps
    return padded.reshape(maps.shape[:-2] + (size, block, size, block)).max(axis=(-3, -1))


@pytest.mark.parametrize("n_layer,n_head,n_tokens", [(1, 1, 1), (2, 3, 7), (2, 5, 45)])
def test_layer_figure_plots_each_heads_probs(n_layer, n_head, n_tokens):
    trace = fake_trace(n_layer, n_head, n_tokens, seed=n_tokens)
    for layer in range(n_layer):
        fig = layer_figure(trace, layer)
        images = [ax.images[0] for ax in fig.axes if ax.images]
        assert len(images) == n_head
        for head, image in enumerate(images):
            np.testing.assert_array_equal(np.asarray(image.get_array()), trace.probs[layer, head].numpy())
        labels = [tick.get_text() for tick in fig.axes[0].get_yticklabels()]
        assert (labels == trace.tokens) == (n_tokens <= 40), "token labels only when there are few tokens"


@pytest.mark.parametrize("n_tokens,cells,block", [(6, 64, 1), (70, 64, 2), (131, 16, 9)])
def test_model_figure_plots_max_pooled_maps(n_tokens, cells, block):
    n_layer, n_head = 3, 2
    trace = fake_trace(n_layer, n_head, n_tokens, seed=3)
    fig = model_figure(trace, cells=cells)
    assert len(fig.axes) == n_layer * n_head
    want = max_pool(trace.probs.double().numpy(), block)
    for i, ax in enumerate(fig.axes):
        got = np.asarray(ax.images[0].get_array())
        assert got.shape[0] <= cells
        np.testing.assert_allclose(got, want[i // n_head, i % n_head], rtol=1e-6)


def test_save_pngs_writes_pngs(tmp_path):
    trace = fake_trace(3, 2, 9, tokens=["$x$", " a\nb", " <b>", "\\n", "\ufffd", " é", "$", " 1", " 2"])
    paths = save_pngs(trace, tmp_path / "pngs")
    assert [p.name for p in paths] == ["attention_layer00.png", "attention_layer01.png", "attention_layer02.png",
                                       "attention_model.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, _ = imread(path).shape
        assert height > 100 and width > 100
    assert [p.name for p in save_pngs(trace, tmp_path, layers=[2])] == ["attention_layer02.png", "attention_model.png"]
    with pytest.raises(ValueError, match="out of range"):
        save_pngs(trace, tmp_path, layers=[3])
