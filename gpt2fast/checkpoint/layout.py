"""The canonical weight layout and the one place every checkpoint format is checked against it.

A format's reader produces ``Entry`` objects (canonical name -> tensor as stored in the file, and
whether the file keeps it transposed); ``assemble`` reports missing, extra and mis-shaped tensors
in the file's own terms, then transposes into our layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from gpt2fast.config import GPT2Config
from gpt2fast.errors import CheckpointError

# GPT-2's checkpoints (HF Conv1D, OpenAI TF) store these (in, out); we keep (out, in) like nn.Linear.
TRANSPOSED_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Only show a progress bar for checkpoints big enough to make a person wait.
_PROGRESS_MIN_BYTES = 256 * 2**20


def canonical_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of our layout (see ``gpt2fast/model.py``).

    Example:
        >>> shapes = canonical_shapes(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=4))
        >>> shapes["h.0.attn.c_attn.weight"], len(shapes)  # 2 embeddings + 12 per layer + final LayerNorm
        ((24, 8), 16)
    """
    c, f = config.n_embd, config.mlp_width
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, c),
        "wpe.weight": (config.n_positions, c),
    }
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (c,),
            p + "ln_1.bias": (c,),
            p + "attn.c_attn.weight": (3 * c, c),
            p + "attn.c_attn.bias": (3 * c,),
            p + "attn.c_proj.weight": (c, c),
            p + "attn.c_proj.bias": (c,),
            p + "ln_2.weight": (c,),
            p + "ln_2.bias": (c,),
            p + "mlp.c_fc.weight": (f, c),
            p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (c, f),
            p + "mlp.c_proj.bias": (c,),
        }
    shapes |= {"ln_f.weight": (c,), "ln_f.bias": (c,)}
    return shapes


def is_transposed(name: str) -> bool:
    return name.startswith("h.") and name.endswith(TRANSPOSED_SUFFIXES)


@dataclass
class Entry:
    """One tensor of a checkpoint, under its canonical name."""

    source_name: str  # the name in the file, for error messages
    tensor: torch.Tensor  # as stored in the file
    transposed: bool  # the file stores it (in, out)


def assemble(entries: dict[str, Entry], config: GPT2Config, where: str) -> dict[str, torch.Tensor]:
    """Check ``entries`` against the layout of ``config`` and return the canonical state dict.

    ``where`` names the checkpoint in every error.

    Example:
        >>> cfg = GPT2Config(n_layer=1, n_embd=2, n_head=1, vocab_size=3, n_positions=2)
        >>> assemble({"wte.weight": Entry("wte", torch.ones(3, 2), False)}, cfg, "demo")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gpt2fast.errors.CheckpointError: demo: missing tensor(s) wpe.weight, h.0.ln_1.weight, ... and 7 more
    """
    shapes = canonical_shapes(config)
    missing = [name for name in shapes if name not in entries]
    if missing:
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{where}: missing tensor(s) {listed}")
    extra = sorted(entry.source_name for name, entry in entries.items() if name not in shapes)
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(extra[:8])} (not part of {config})")
    state: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        expected = shapes[name][::-1] if entry.transposed else shapes[name]
        if tuple(entry.tensor.shape) != expected:
            raise CheckpointError(
                f"{where}: tensor {entry.source_name!r} has shape {tuple(entry.tensor.shape)}, expected {expected}"
            )
        if not entry.tensor.is_floating_point():
            raise CheckpointError(f"{where}: tensor {entry.source_name!r} has dtype {entry.tensor.dtype}, not float")
        state[name] = entry.tensor.t().contiguous() if entry.transposed else entry.tensor
    return state


def progress(items: Iterable, total_bytes: int, desc: str) -> Iterable:
    """Wrap ``items`` in a progress bar when the checkpoint is big (and the user did not opt out)."""
    quiet = total_bytes < _PROGRESS_MIN_BYTES or os.environ.get("GPT2FAST_NO_PROGRESS")
    return tqdm(items, desc=desc, unit="tensor", disable=bool(quiet), leave=False)
