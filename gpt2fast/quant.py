"""Int8 weight-only quantization: symmetric, one fp32 scale per output channel.

A linear weight ``W`` ``(N, K)`` becomes ``q`` int8 ``(N, K)`` in [-127, 127] and ``scale`` fp32 ``(N,)`` with
``W ~= q * scale[:, None]`` (``scale = max|W[n]| / 127``; an all-zero row gets scale 1 and stays exact).
Activations stay in the model dtype; a backend dequantizes in registers or quantizes activations on the
fly, with fp32 accumulation either way. The tied embedding / LM head ``wte`` ``(V, C)`` is quantized the
same way: its output channels are the vocabulary rows, so an embedding lookup dequantizes one row with
one scale.

``Int8Weight`` is what an op receives where it would receive a weight tensor; ``ops/reference.py``
defines every op on it as "dequantize, then the fp32 op".

The same values may lie in **panels** (``to_panels``), the layout the native CPU backend's VNNI kernels stream:
``(ceil(N / 16), K / 4, 16, 4)`` int8, 16 output channels x 4 consecutive ``k`` per 64 bytes, so one vector load
feeds ``vpdpbusd`` 16 channels' dot products against one broadcast group of 4 activations (no per-output
horizontal sums) and each panel of 16 channels is one sequential stream. The vocabulary's last panel is padded
with zero rows. ``Int8Weight.q`` unpacks them (a copy); ``rows`` reads the embedding rows straight from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZATIONS = ("int8",)
QUANTIZE_CHUNK_BYTES = 4 << 20  # fp32 rows ``quantize_int8`` converts at a time


PANEL = 16  # output channels per panel (one AVX-512 vector of int32 sums)
PANEL_K = 4  # consecutive k per channel in a panel's 64-byte group (vpdpbusd's 4-byte dot products)


@dataclass(frozen=True)
class Int8Weight:
    """An ``(N, K)`` weight as int8 values and per-output-channel fp32 ``scale``: ``W ~= q * scale[:, None]``.

    ``data`` is ``q`` itself ``(N, K)``, or ``q`` in panels (``to_panels``; ``panels`` is then True): ``shape``
    and ``q`` are the ``(N, K)`` view either way (``N`` is ``scale``'s length).

    Example:
        >>> w = quantize_int8(torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
        >>> w.q.tolist(), w.scale.tolist(), w.shape
        ([[64, -127], [0, 0]], [0.007874015718698502, 1.0], torch.Size([2, 2]))
    """

    data: torch.Tensor  # (N, K) int8, or panels (ceil(N / 16), K / 4, 16, 4) int8
    scale: torch.Tensor  # (N,) fp32

    @property
    def panels(self) -> bool:
        """Whether ``data`` holds the values in panels."""
        return self.data.dim() == 4

    @property
    def q(self) -> torch.Tensor:
        """The int8 values ``(N, K)`` (unpacked from panels: a copy)."""
        return from_panels(self.data, self.scale.shape[0]) if self.panels else self.data

    @property
    def shape(self) -> torch.Size:
        if self.panels:
            return torch.Size((self.scale.shape[0], self.data.shape[1] * PANEL_K))
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

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
        if self.panels:  # row n: panel n // 16, lane n % 16 of every 4-k group
            n = self.scale.shape[0]
            lo, hi = map(int, torch.aminmax(ids)) if ids.numel() else (0, 0)  # one pass (the embedding, per step)
            if lo < -n or hi >= n:  # the last panel's padding rows are no rows
                raise IndexError(f"Int8Weight.rows: ids must lie in [-{n}, {n}), got {lo}..{hi}")
            ids = ids % n  # (as indexing the (N, K) values would)
            q = self.data[ids // PANEL, :, ids % PANEL, :].reshape(*ids.shape, -1)  # (*ids.shape, K)
        else:
            q = self.data[ids]  # (*ids.shape, K)
        return (q.float() * self.scale[ids].unsqueeze(-1)).to(dtype)


def panel_shape(n: int, k: int) -> tuple[int, int, int, int]:
    """The shape of an ``(n, k)`` int8 weight in panels (``k`` must be a multiple of 4).

    Example:
        >>> panel_shape(50257, 768)
        (3142, 192, 16, 4)
    """
    if k % PANEL_K:
        raise ValueError(f"int8 panels need K a multiple of {PANEL_K}, got K={k}")
    return (-(-n // PANEL), k // PANEL_K, PANEL, PANEL_K)


def to_panels(q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` ``(N, K)`` int8 rearranged into panels ``panel_shape(N, K)`` (into ``out`` when given): element
    ``[p, g, c, j]`` is ``q[16 p + c, 4 g + j]``, zero past row ``N``. No temporary the size of ``q``.

    Example:
        >>> q = torch.arange(-60, 60, dtype=torch.int8).reshape(15, 8)
        >>> p = to_panels(q)
        >>> tuple(p.shape), p[0, 1, 2].tolist() == q[2, 4:8].tolist(), p[0, 0, 15].tolist()
        ((1, 2, 16, 4), True, [0, 0, 0, 0])
        >>> torch.equal(from_panels(p, 15), q)
        True
    """
    n, k = q.shape
    shape = panel_shape(n, k)
    if out is None:
        out = torch.empty(shape, dtype=torch.int8, device=q.device)  # (ceil(N/16), K/4, 16, 4)
    full = n // PANEL
    out[:full].copy_(q[: full * PANEL].view(full, PANEL, k // PANEL_K, PANEL_K).transpose(1, 2))
    if full < shape[0]:  # the last panel's missing channels are zero
        tail = torch.zeros(PANEL, k, dtype=torch.int8, device=q.device)  # (16, K)
        tail[: n - full * PANEL] = q[full * PANEL :]
        out[full].copy_(tail.view(PANEL, k // PANEL_K, PANEL_K).transpose(0, 1))
    return out


def from_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The ``(n, K)`` int8 values of ``panels`` (``to_panels``' inverse; a copy).

    Example:
        >>> q = torch.arange(-40, 40, dtype=torch.int8).reshape(20, 4)
        >>> torch.equal(from_panels(to_panels(q), 20), q)
        True
    """
    return panels.transpose(1, 2).reshape(-1, panels.shape[1] * PANEL_K)[:n]


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


def check_int8_weight(weight: Int8Weight, x: torch.Tensor, k: int, kernels: str) -> None:
    """Raise ``ValueError`` unless ``weight`` is what the GPU kernels read: ``q`` (N, ``k``) int8, contiguous, not in
    panels, and ``scale`` a contiguous fp32 (N,), both on ``x``'s device (``kernels`` names them in the message).

    Example:
        >>> check_int8_weight(quantize_int8(torch.randn(3, 4)), torch.randn(2, 4), 4, "the CUDA kernels")
        >>> check_int8_weight(quantize_int8(torch.randn(3, 4)), torch.randn(2, 5), 5, "the CUDA kernels")
        Traceback (most recent call last):
        ...
        ValueError: weight.data must be int8 (N, 5), got torch.int8 (3, 4)
    """
    if weight.panels:
        raise ValueError(f"weight is an Int8Weight in panels (the CPU backend's layout); {kernels} take (N, K)")
    q, scale = weight.data, weight.scale
    if q.dim() != 2 or q.shape[1] != k or q.dtype != torch.int8:
        raise ValueError(f"weight.data must be int8 (N, {k}), got {q.dtype} {tuple(q.shape)}")
    if q.device != x.device or scale.device != x.device:
        raise ValueError(f"weight is on {q.device} (scale {scale.device}), x on {x.device}")
    if not q.is_contiguous():
        raise ValueError(f"weight.data must be contiguous (strides {q.stride()})")
    if scale.dtype != torch.float32 or scale.shape != (q.shape[0],) or not scale.is_contiguous():
        raise ValueError(f"weight.scale must be a contiguous float32 ({q.shape[0]},), got {scale.dtype} "
                         f"{tuple(scale.shape)}")  # fmt: skip


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
