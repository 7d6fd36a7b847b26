"""Counting kernel launches: a decode step's launch count is a tracked number (DESIGN.md).

At GPT-2 124M a decode step moves ~250 MB (75 us on an H100) but, without CUDA graphs, launches
~150 kernels of a few microseconds each: the count is what stands between eager decode and the
floor. It is counted where the launches are seen:

* on CUDA, by ``torch.profiler``: every GPU kernel, whoever launched it (torch, Triton, ``gpt2fast._C``);
* on a CPU, the kernels run on the Triton interpreter (each ``kernel[grid](...)`` call) and the
  CUDA emulator (its ``launch_count()``). The torch backend has no kernels on a CPU: ``None``.

``decode_launches`` measures a model's decode step at 1 and 2 layers with the same widths, so the
count is ``per_layer * n_layer + fixed`` for any depth (the launches do not depend on width).

Example:
    >>> decode_launches("torch", "cpu") is None
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Launches:
    """Kernel launches seen inside ``count_launches``; ``None`` where nothing launches kernels."""

    count: int | None = None


@contextlib.contextmanager
def count_launches(device: torch.device | str) -> Iterator[Launches]:
    """Count the kernel launches of the block (see the module docstring for how, per device).

    Example:
        >>> with count_launches("cpu") as seen:
        ...     _ = torch.ones(3) + 1  # torch on a CPU launches no kernels
        >>> seen.count
        0
    """
    device = torch.device(device)
    seen = Launches(0)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            yield seen
            torch.cuda.synchronize(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        seen.count = sum(1 for e in kernels if not e.name.startswith(("Memcpy", "Memset")))
        return
    with _count_interpreted(seen), _count_emulated(seen):
        yield seen


@contextlib.contextmanager
def _count_interpreted(seen: Launches) -> Iterator[None]:
    """Triton interpreter launches: ``InterpretedFunction.run`` is what ``kernel[grid](...)`` calls."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        yield
        return
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            seen.count += 1
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counting_run
    try:
        yield
    finally:
        InterpretedFunction.run = run


@contextlib.contextmanager
def _count_emulated(seen: Launches) -> Iterator[None]:
    """CUDA emulator launches, when the emulated module is already loaded (nothing else launches on it)."""
    from gpt2fast.ops import cuda_build

    modules = [m for m in cuda_build._LOADED.values() if hasattr(m, "launch_count")]
    before = sum(m.launch_count() for m in modules)
    try:
        yield
    finally:
        seen.count += sum(m.launch_count() for m in modules) - before


def decode_launches(backend: str, device: torch.device | str = "cpu", batch: int = 2,
                    quantization: str | None = None) -> tuple[int, int] | None:
    """``(per_layer, fixed)`` kernel launches of one eager decode step of ``batch`` sequences on ``backend``
    (no CUDA graphs), measured on random 1- and 2-layer models of head dim 64 (``quantization="int8"``: with
    int8 weights); ``None`` for the torch and reference backends on a CPU (no kernels). GPT-2 124M's step
    launches ``per_layer * 12 + fixed``.

    Example:
        >>> decode_launches("torch", "cpu") is None
        True
    """
    device = torch.device(device)
    if backend in ("torch", "reference") and device.type == "cpu":
        return None
    counts = [_decode_step_launches(backend, device, batch, n_layer, quantization) for n_layer in (1, 2)]
    return counts[1] - counts[0], 2 * counts[0] - counts[1]


def _decode_step_launches(backend: str, device: torch.device, batch: int, n_layer: int,
                          quantization: str | None = None) -> int:
    from gpt2fast.engine import Engine
    from gpt2fast.sampling import SamplingParams

    model = f'random:{{"n_layer": {n_layer}, "n_embd": 128, "n_head": 2, "vocab_size": 97, "n_positions": 64}}'
    engine = Engine(model, backend=backend, device=device, cuda_graphs=False, kv_cache_tokens=256,
                    quantization=quantization)
    for i in range(batch):
        engine.add_request(str(i), [1 + i, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    engine.step()  # the prefills (and the kernels' compiles)
    engine.step()  # a first decode step: every decode kernel compiled
    with count_launches(device) as seen:
        engine.step()
    return seen.count
