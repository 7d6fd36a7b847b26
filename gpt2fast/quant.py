"""Int8 weight-only quantization: symmetric, one fp32 scale per output channel.

A linear weight ``W`` ``(N, K)`` becomes ``q`` int8 ``(N, K)`` in [-127, 127] and ``scale`` fp32 ``(N,)`` with
``W ~= q * scale[:, None]`` (``scale = max|W[n]| / 127``; an all-zero row gets scale 1 and stays exact).
Activations stay in the model dtype; a backend dequantizes in registers or quantizes activations on the
fly, with fp32 accumulation either way. The tied embedding / LM head ``wte`` ``(V, C)`` is quantized the
same way: its output channels are the vocabulary rows, so an embedding lookup dequantizes one row with
one scale.

``Int8Weight`` is what an op receives where it would receive a weight tensor; ``ops/reference.py``
defines every op on it as "dequantize, then the fp32 op".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZATIONS = ("int8",)
QUANTIZE_CHUNK_BYTES = 4 << 20  # fp32 rows ``quantize_int8`` converts at a time


@dataclass(frozen=True)
class Int8Weight:
    """An ``(N, K)`` weight as int8 values ``q`` and per-output-channel fp32 ``scale``: ``W ~= q * scale[:, None]``.

    Example:
        >>> w = quantize_int8(torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
        >>> w.q.tolist(), w.scale.tolist(), w.shape
        ([[64, -127], [0, 0]], [0.007874015718698502, 1.0], torch.Size([2, 2]))
    """

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) fp32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q * scale[:, None]`` in ``dtype`` (computed in fp32) ``(N, K)``.

        Example:
            >>> quantize_int8(torch.tensor([[2.0, -1.0]])).dequantize().double().round(decimals=3).tolist()
            [[2.0, -1.008]]
        """
        return (self.q.float() * self.scale[:, None]).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` dequantized ``(len(ids), K)`` (the embedding lookup of a quantized ``wte``).

        Example:
            >>> w = quantize_int8(torch.tensor([[1.0, 0.5], [4.0, -2.0]]))
            >>> w.rows(torch.tensor([1])).double().round(decimals=3).tolist()
            [[4.0, -2.016]]
        """
        return (self.q[ids].float() * self.scale[ids, None]).to(dtype)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 of an ``(N, K)`` weight (math in fp32, round half to even).

    Example:
        >>> w = torch.randn(5, 7)
        >>> bool((quantize_int8(w).dequantize() - w).abs().max() <= w.abs().max() / 254 + 1e-6)
        True
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8: a weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)  # (N, K)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)  # (N,)
    rows = max(1, QUANTIZE_CHUNK_BYTES // (4 * max(k, 1)))
    for start in range(0, n, rows):  # row blocks: the fp32 temporaries stay small, even for a 154 MB wte
        w = weight[start : start + rows].float()  # (rows, K)
        amax = w.abs().amax(dim=1)  # (rows,)
        scale[start : start + rows] = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[start : start + rows] = torch.round(w / scale[start : start + rows, None]).clamp_(-127, 127)
    return Int8Weight(q, scale)


def check_quantization(quantization: str | None) -> str | None:
    """``None`` (or ``"none"``) or one of ``QUANTIZATIONS``; anything else raises ``ValueError``.

    Example:
        >>> check_quantization("int8"), check_quantization(None)
        ('int8', None)
    """
    if quantization is None or quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)} or None")
    return quantization
