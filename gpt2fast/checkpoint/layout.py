"""The canonical weight layout and the one place every checkpoint format is checked against it.

A format's reader produces ``Entry`` objects (canonical name -> tensor as stored in the file, and
whether the file keeps it transposed); ``assemble`` reports missing, extra and mis-shaped tensors
in the file's own terms, then transposes into our layout.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
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
_LAYER_NAME = re.compile(r"h\.(\d{1,9})\.")


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
    file: str | None = None  # the file holding it, when a checkpoint has several (shards)


def check_layout(found: dict[str, tuple[str, tuple[int, ...], bool]], config: GPT2Config, where: str) -> None:
    """Check names and shapes against the layout of ``config`` before any tensor is read.

    ``found`` maps each canonical name to (name in the file, shape as stored, stored transposed), as a
    file's header lists them. The layer count is compared first, so a config asking for more layers than
    the file holds fails before a layout of that size is even listed.

    Example:
        >>> cfg = GPT2Config(n_layer=40, n_embd=2, n_head=1, vocab_size=3, n_positions=2)
        >>> check_layout({"h.1.ln_1.weight": ("h.1.ln_1.weight", (2,), False)}, cfg, "demo")
        Traceback (most recent call last):
        ...
        gpt2fast.errors.CheckpointError: demo: the config says n_layer=40 but the weights hold 2 layer(s) (h.0..h.1)
    """
    layers = 1 + max((int(m.group(1)) for n in found if (m := _LAYER_NAME.match(n))), default=-1)
    if layers and config.n_layer > layers:  # fewer layers in the config: "unexpected tensor(s)" says more
        raise CheckpointError(f"{where}: the config says n_layer={config.n_layer} but the weights hold "
                              f"{layers} layer(s) (h.0..h.{layers - 1})")
    shapes = canonical_shapes(config)
    missing = [name for name in shapes if name not in found]
    if missing:
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{where}: missing tensor(s) {listed}")
    extra = sorted(source_name for name, (source_name, _, _) in found.items() if name not in shapes)
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(extra[:8])} (not part of {config})")
    for name, (source_name, shape, transposed) in found.items():
        expected = shapes[name][::-1] if transposed else shapes[name]
        if tuple(shape) != expected:
            raise CheckpointError(f"{where}: tensor {source_name!r} has shape {tuple(shape)}, expected {expected}")


def check_finite(tensor: torch.Tensor, where: str, source_name: str) -> None:
    """Refuse a tensor holding NaN or inf, naming it and the first bad element.

    One ``sum`` per tensor (about 20 ms for all of GPT-2 124M on 2 CPU cores); a non-finite sum is
    either a NaN/inf, which propagates into any sum, or an overflow, which the exact check then clears.

    Example:
        >>> check_finite(torch.tensor([1.0, float("nan")]), "a.safetensors", "ln_f.bias")
        Traceback (most recent call last):
        ...
        gpt2fast.errors.CheckpointError: a.safetensors: tensor 'ln_f.bias' holds 1 NaN/inf value(s), first at index (1,)
    """
    if torch.isfinite(tensor.sum()) or not tensor.numel():
        return
    bad = ~torch.isfinite(tensor)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"{where}: tensor {source_name!r} holds {int(bad.sum())} NaN/inf value(s), "
                              f"first at index {first}")


def assemble(entries: dict[str, Entry], config: GPT2Config, where: str) -> dict[str, torch.Tensor]:
    """Check ``entries`` against the layout of ``config`` and return the canonical state dict.

    ``where`` names the checkpoint in every error. Every tensor must be a float tensor with only finite values.

    Example:
        >>> cfg = GPT2Config(n_layer=1, n_embd=2, n_head=1, vocab_size=3, n_positions=2)
        >>> assemble({"wte.weight": Entry("wte", torch.ones(3, 2), False)}, cfg, "demo")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gpt2fast.errors.CheckpointError: demo: missing tensor(s) wpe.weight, h.0.ln_1.weight, ... and 7 more
    """
    check_layout({name: (e.source_name, tuple(e.tensor.shape), e.transposed) for name, e in entries.items()},
                 config, where)
    state: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        if not entry.tensor.is_floating_point():
            raise CheckpointError(f"{where}: tensor {entry.source_name!r} has dtype {entry.tensor.dtype}, not float")
        check_finite(entry.tensor, entry.file or where, entry.source_name)
        # A transposed view, no copy: GPT2.from_state_dict makes it contiguous, or quantizes straight from it.
        state[name] = entry.tensor.t() if entry.transposed else entry.tensor
    return state


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A quantizing load frees each float weight between int8 ones, and glibc keeps such holes resident: trimming
    after each took ``random:gpt2`` int8's peak RSS from 512 to 439 MiB (``Engine`` load, this machine).

    Example:
        >>> trim_heap()
    """
    release = _malloc_trim()
    if release is not None:
        release(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def progress(items: Iterable, total_bytes: int, desc: str) -> Iterable:
    """Wrap ``items`` in a progress bar when the checkpoint is big (and the user did not opt out)."""
    quiet = total_bytes < _PROGRESS_MIN_BYTES or os.environ.get("GPT2FAST_NO_PROGRESS")
    return tqdm(items, desc=desc, unit="tensor", disable=bool(quiet), leave=False)
