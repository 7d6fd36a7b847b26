"""Ticket counters for kernels that merge their split-K partials in the same launch.

A split-K kernel (the decode linear, the decode attention) gives one output tile to ``S`` programs.
Each stores its fp32 partial, then draws a ticket with ``tl.atomic_add`` on its tile's int32 counter;
the program that draws ``S - 1`` sums the ``S`` partials, writes the output and stores 0 back. So a
counter is 0 before and after every launch, and one zeroed buffer serves every launch and every CUDA
graph replay: no memset launch, no allocation per call.

:func:`ticket_counters` hands out that buffer, one per device, created on first use with
``torch.zeros`` and at least ``MIN_SLOTS`` long. It never shrinks and is never freed: a buffer it
outgrows stays alive in ``_RETIRED``, because a CUDA graph captured earlier keeps its address. It
grows (a new, larger zeroed buffer) only outside CUDA-graph capture: an allocation and a fill there
would be recorded into the graph, so a request that needs a larger buffer during capture raises. The
warm-up run before each capture (``decode_runner``) makes it large enough, and in practice it never
grows at all: the split-K kernels ask for counters (one per tile: linear ``cdiv(N, 32)``, attention ``B * H``)
only when they split (else for 1, and never touch it), and both split rules split only while their tiles number
fewer than 2 x 132 < ``MIN_SLOTS``; the LM head's fused argmax/Gumbel draws on every call, one counter per row
tile: ``cdiv(N, 64)``.

**One stream at a time.** Every launch counts from slot 0, so two split-K kernels running at once on
two streams of one device would draw each other's tickets. Our engine runs one stream (a captured
graph replays its kernels in order on one stream too); kernels on one stream run one after another,
and each leaves its counters at 0 for the next.
"""

from __future__ import annotations

import torch

MIN_SLOTS = 1024  # 4 KB: more than any split rule asks for (fewer than 2 * 132 tiles split)

_BUFFERS: dict[torch.device, torch.Tensor] = {}  # the live buffer per device
_RETIRED: list[torch.Tensor] = []  # outgrown buffers, kept alive for graphs that captured their address


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a graph (never on a CPU; a CPU torch has no CUDA at all)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def ticket_counters(device: torch.device | str, slots: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``slots`` counters on ``device``; the same buffer every call.

    Kernels must leave it all zeros when they finish (the last program of each tile resets its
    counter). Raises ``RuntimeError`` if it would have to be created or grown during CUDA-graph capture.

    Example:
        >>> buf = ticket_counters("cpu", 10)
        >>> buf.dtype, buf.numel() >= 10, int(buf.abs().sum()), buf is ticket_counters("cpu", 3)
        (torch.int32, True, 0, True)
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _BUFFERS.get(device)
    if buf is not None and buf.numel() >= slots:
        return buf
    if _capturing(device):
        raise RuntimeError(
            f"split-K ticket counters on {device} need {slots} slots but hold "
            f"{0 if buf is None else buf.numel()}, and cannot be allocated during CUDA graph capture: "
            "run the same step once before capturing (a warm-up)"
        )
    if buf is not None:
        _RETIRED.append(buf)
    size = max(MIN_SLOTS, slots, 0 if buf is None else 2 * buf.numel())
    _BUFFERS[device] = torch.zeros(size, dtype=torch.int32, device=device)  # (size,) every counter at 0
    return _BUFFERS[device]
