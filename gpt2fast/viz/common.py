"""What every view reads from a trace: checked tokens and probabilities, and max-pooled overview maps.

A trace is duck-typed (``gpt2fast.trace.AttentionTrace`` or anything with the same attributes):
``tokens`` (list of str, T), ``probs`` ((n_layer, n_head, T, T) float), optional ``queries`` and ``keys``
((n_layer, n_head, T, head_dim) float, or None) and ``model`` (str).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def trace_probs(trace) -> torch.Tensor:
    """``trace.probs`` as a float32 CPU tensor, checked against ``trace.tokens``.

    >>> trace_probs(random_trace(n_layer=2, n_head=3, n_tokens=4)).shape
    torch.Size([2, 3, 4, 4])
    """
    probs = torch.as_tensor(trace.probs).detach().to("cpu", torch.float32)  # (L, H, T, T)
    n_tokens = len(trace.tokens)
    if probs.ndim != 4 or probs.shape[2:] != (n_tokens, n_tokens):
        raise ValueError(f"probs must be (n_layer, n_head, T, T) with T = len(tokens) = {n_tokens}, "
                         f"got {tuple(probs.shape)}")
    return probs


def trace_qk(trace) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(queries, keys)`` as float32 CPU tensors (n_layer, n_head, T, head_dim), or None when not captured.

    >>> trace_qk(random_trace(head_dim=None)) is None
    True
    >>> trace_qk(random_trace(n_layer=1, n_head=2, n_tokens=3, head_dim=5))[0].shape
    torch.Size([1, 2, 3, 5])
    """
    queries, keys = getattr(trace, "queries", None), getattr(trace, "keys", None)
    if queries is None or keys is None:
        return None
    queries = torch.as_tensor(queries).detach().to("cpu", torch.float32)  # (L, H, T, D)
    keys = torch.as_tensor(keys).detach().to("cpu", torch.float32)  # (L, H, T, D)
    probs_shape = torch.as_tensor(trace.probs).shape
    if queries.shape != keys.shape or queries.ndim != 4 or queries.shape[:3] != probs_shape[:3]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must both be "
                         f"(n_layer, n_head, T, head_dim) matching probs {tuple(probs_shape)}")
    return queries, keys


def max_pool_maps(probs: torch.Tensor, cells: int) -> tuple[torch.Tensor, int]:
    """Each (T, T) map max-pooled to at most ``cells`` x ``cells``; returns ``(maps, block)`` where a cell
    covers ``block`` x ``block`` token pairs (the last row/column of cells may cover fewer). Max, not mean:
    one sharp link (a head parking on token 0) stays visible however many tokens share its cell.

    >>> maps, block = max_pool_maps(torch.arange(25.0).reshape(1, 1, 5, 5), cells=2)
    >>> block, maps.tolist()
    (3, [[[[12.0, 14.0], [22.0, 24.0]]]])
    """
    n_layer, n_head, n_tokens, _ = probs.shape
    block = -(-n_tokens // cells)  # ceil
    if block == 1:
        return probs.clone(), 1
    flat = probs.reshape(n_layer * n_head, 1, n_tokens, n_tokens)
    pooled = torch.nn.functional.max_pool2d(flat, kernel_size=block, stride=block, ceil_mode=True)
    return pooled.reshape(n_layer, n_head, *pooled.shape[-2:]), block  # (L, H, n, n)


def random_trace(n_layer: int = 2, n_head: int = 3, n_tokens: int = 5, head_dim: int | None = 4, seed: int = 0,
                 tokens: list[str] | None = None, model: str = "random") -> SimpleNamespace:
    """A made-up trace with the attributes the views read: causal softmax rows of random scores (the
    softmax of ``q.k / sqrt(head_dim)`` when ``head_dim`` is given, so the query/key view agrees with it).
    For examples and for trying the views without a model.

    >>> trace = random_trace(n_tokens=3)
    >>> trace.tokens, float(trace.probs[0, 0, 0, 1]), round(float(trace.probs[1, 2, 2].sum()), 6)
    (['t0', ' t1', ' t2'], 0.0, 1.0)
    """
    gen = torch.Generator().manual_seed(seed)
    tokens = list(tokens) if tokens is not None else [f"{' ' if i else ''}t{i}" for i in range(n_tokens)]
    n_tokens = len(tokens)
    queries = keys = None
    if head_dim is None:
        scores = 3 * torch.randn(n_layer, n_head, n_tokens, n_tokens, generator=gen)  # (L, H, T, T)
    else:
        queries = 2 * torch.randn(n_layer, n_head, n_tokens, head_dim, generator=gen)  # (L, H, T, D)
        keys = 2 * torch.randn(n_layer, n_head, n_tokens, head_dim, generator=gen)  # (L, H, T, D)
        scores = queries @ keys.transpose(-1, -2) / head_dim**0.5  # (L, H, T, T)
    future = torch.ones(n_tokens, n_tokens, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # (L, H, T, T)
    return SimpleNamespace(tokens=tokens, token_ids=list(range(n_tokens)), probs=probs, queries=queries,
                           keys=keys, model=model)
