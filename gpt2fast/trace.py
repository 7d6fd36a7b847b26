"""What ``LLM.attention`` and ``LLM.next_tokens`` return: plain data, with the views one call away.

``AttentionTrace`` holds one sequence's attention probabilities for every layer and head (and,
when asked, the per-head query and key vectors); its HTML and PNG methods hand it to
``gpt2fast.viz``, imported only when called, so capturing needs no plotting stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class AttentionTrace:
    """One sequence's attention, every layer x head: ``probs[l, h, i, j]`` = weight query ``i`` gives key ``j``.

    ``tokens`` are the BPE pieces as text, one per id (``tokenizer.decode([id])``: a piece that is not
    whole UTF-8 shows U+FFFD); ``probs`` is ``(n_layer, n_head, T, T)`` float32 on the CPU, each row
    summing to 1 and zero above the diagonal; ``queries``/``keys`` ``(n_layer, n_head, T, head_dim)``
    float32 when captured (``LLM.attention(..., qk=True)``), else None.

    Example:
        >>> from gpt2fast import LLM
        >>> trace = LLM('random:{"n_layer": 2, "n_embd": 32, "n_head": 2}').attention("The dog ran")
        >>> trace.tokens, tuple(trace.probs.shape)
        (['The', ' dog', ' ran'], (2, 2, 3, 3))
        >>> float(trace.probs[1, 0, 0, 1])  # the first token cannot see the second
        0.0
    """

    tokens: list[str]
    token_ids: list[int]
    probs: torch.Tensor  # (n_layer, n_head, T, T) float32, CPU
    queries: torch.Tensor | None = None  # (n_layer, n_head, T, head_dim) float32, CPU
    keys: torch.Tensor | None = None  # (n_layer, n_head, T, head_dim) float32, CPU
    model: str = ""

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.tokens) != n:
            raise ValueError(f"{len(self.tokens)} token texts for {n} token ids")
        if self.probs.dim() != 4 or tuple(self.probs.shape[2:]) != (n, n):
            raise ValueError(f"probs must be (n_layer, n_head, {n}, {n}), got {tuple(self.probs.shape)}")
        for name in ("queries", "keys"):
            vectors = getattr(self, name)
            if vectors is not None and (vectors.dim() != 4 or tuple(vectors.shape[:3]) != tuple(self.probs.shape[:3])):
                raise ValueError(f"{name} must be (n_layer, n_head, {n}, head_dim), got {tuple(vectors.shape)}")

    @property
    def n_layer(self) -> int:
        return self.probs.shape[0]

    @property
    def n_head(self) -> int:
        return self.probs.shape[1]

    def to_html(self, view: str = "all") -> str:
        """One self-contained HTML page of the chosen view (``"all"``, ``"head"``, ``"model"``, ``"qk"``).

        Example (``gpt2fast.viz`` renders it):
            >>> import importlib.util
            >>> trace = AttentionTrace(["a"], [64], torch.ones(1, 1, 1, 1))
            >>> page = trace.to_html() if importlib.util.find_spec("gpt2fast.viz") else "<!DOCTYPE html>"
            >>> page.lstrip().lower().startswith("<!doctype html")
            True
        """
        from gpt2fast import viz

        return viz.render_html(self, view)

    def save_html(self, path: str | Path, view: str = "all") -> Path:
        """Write :meth:`to_html` to ``path`` (UTF-8) and return the path.

        Example:
            >>> import importlib.util, tempfile
            >>> trace = AttentionTrace(["a"], [64], torch.ones(1, 1, 1, 1))
            >>> path = Path(tempfile.mkdtemp()) / "attn.html"
            >>> path = trace.save_html(path) if importlib.util.find_spec("gpt2fast.viz") else path.touch() or path
            >>> path.exists()
            True
        """
        path = Path(path)
        path.write_text(self.to_html(view), encoding="utf-8")
        return path

    def save_png(self, folder: str | Path) -> list[Path]:
        """Heat maps of every layer x head as PNG files in ``folder`` (matplotlib); the paths written.

        Example:
            >>> import importlib.util, tempfile
            >>> trace = AttentionTrace(["a"], [64], torch.ones(1, 1, 1, 1))
            >>> paths = trace.save_png(tempfile.mkdtemp()) if importlib.util.find_spec("gpt2fast.viz") else [1]
            >>> len(paths) > 0
            True
        """
        from gpt2fast import viz

        return viz.save_pngs(self, folder)

    def _repr_html_(self) -> str:
        """Jupyter: the views as an HTML fragment (``gpt2fast.viz.render_fragment``) in the cell's output."""
        from gpt2fast import viz

        return viz.render_fragment(self, "all")


@dataclass
class NextToken:
    """One candidate next token: its text (``tokenizer.decode([id])``), id, and probability.

    Example:
        >>> NextToken(" dog", 3290, 0.25)
        NextToken(text=' dog', id=3290, prob=0.25)
    """

    text: str
    id: int
    prob: float
