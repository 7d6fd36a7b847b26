"""Where weights come from: every source becomes a config plus a state dict in our canonical layout.

Sources: ``random:<preset or JSON>`` (seeded random weights), a Hugging Face folder, an OpenAI
TensorFlow folder, or a Hugging Face Hub id (cache first, then the network).

Checked at load, each failure one ``CheckpointError`` naming the file: sizes within ``MAX_SIZES`` and
``random:`` weights within available memory, before anything is allocated; the config against the
names and shapes the file's header or index lists, before any tensor is read; paths named inside files
stay inside the folder (``files.py``); every tensor is finite; a vocabulary other than GPT-2's 50257
tokens comes with its own vocab files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2fast.checkpoint.hf import load_hf_folder, read_config
from gpt2fast.checkpoint.hub import download
from gpt2fast.checkpoint.layout import trim_heap
from gpt2fast.checkpoint.openai import load_openai_folder, read_hparams
from gpt2fast.config import GPT2Config, preset
from gpt2fast.errors import CheckpointError
from gpt2fast.quant import Int8Weight, check_quantization, quantize_int8
from gpt2fast.tokenizer import GPT2_VOCAB_SIZE, VOCAB_PAIRS, vocab_files

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class Checkpoint:
    """A model's config, its weights in our layout (on CPU, as stored), and where its vocab files are."""

    config: GPT2Config
    state_dict: dict[str, torch.Tensor | Int8Weight]  # Int8Weight only for random: weights loaded with quantization
    vocab_dir: Path | None  # folder with encoder.json+vocab.bpe or vocab.json+merges.txt, if the source has one
    is_random: bool = False


def load_checkpoint(source: str | os.PathLike, *, seed: int = 0, quantization: str | None = None) -> Checkpoint:
    """Load weights from any supported source.

    ``quantization``: ``random:`` weights are quantized as they are drawn (``Int8Weight`` values in the state),
    so the float model never exists; other sources arrive as stored and ``GPT2.from_state_dict`` quantizes them
    tensor by tensor as it reads them.

    Example:
        >>> ckpt = load_checkpoint('random:{"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100}')
        >>> ckpt.config.n_layer, ckpt.state_dict["wte.weight"].shape
        (2, torch.Size([100, 64]))
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise CheckpointError(f"model must be a folder, a Hub id or random:<preset>, got {source!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if source.startswith("random:"):
        return _random(source.removeprefix("random:"), seed, check_quantization(quantization))
    folder = Path(source).expanduser()
    if not folder.exists():
        if source.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(source):
            raise CheckpointError(f"no such checkpoint folder: {source}")
        folder = download(source)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a checkpoint must be a folder (config.json or hparams.json + weights)")
    if (folder / "config.json").exists():
        _check_vocab_files(folder, read_config(folder))  # before the weights: a missing tokenizer fails fast
        config, state = load_hf_folder(folder)
    elif (folder / "hparams.json").exists():
        _check_vocab_files(folder, read_hparams(folder))
        config, state = load_openai_folder(folder)
    else:
        raise CheckpointError(
            f"{folder}: neither a Hugging Face folder (config.json) nor an OpenAI TensorFlow folder (hparams.json)"
        )
    return Checkpoint(config, state, folder)


def _check_vocab_files(folder: Path, config: GPT2Config) -> None:
    # Without its own vocab files a folder gets GPT-2's tokenizer, which is only right for GPT-2's vocabulary:
    # otherwise every prompt would fail later ("token id 15496 is outside the model's vocabulary").
    if vocab_files(folder) is not None or config.vocab_size == GPT2_VOCAB_SIZE:
        return
    present = [name for pair in VOCAB_PAIRS for name in pair if (folder / name).exists()]
    has = f"; it has only {', '.join(present)}" if present else ""
    raise CheckpointError(
        f"{folder}: the model's vocabulary has {config.vocab_size} tokens, not GPT-2's {GPT2_VOCAB_SIZE}, and the "
        f"folder lacks its tokenizer: add encoder.json + vocab.bpe (or vocab.json + merges.txt){has}"
    )


def _random(spec: str, seed: int, quantization: str | None) -> Checkpoint:
    from gpt2fast.model import GPT2, random_weights

    config = GPT2Config.from_json(spec) if spec.lstrip().startswith("{") else preset(spec)
    _check_memory(config, f"random:{spec}")
    if quantization is None:
        return Checkpoint(config, GPT2(config).init_random(seed).state_dict(), None, is_random=True)
    with torch.device("meta"):
        quantized = {name + ".weight" for name in GPT2(config, quantization=quantization).quantized_modules()}
    state: dict[str, torch.Tensor | Int8Weight] = {}
    for name, tensor in random_weights(config, seed):
        state[name] = quantize_int8(tensor) if name in quantized else tensor
        del tensor
        trim_heap()
    return Checkpoint(config, state, None, is_random=True)


def _check_memory(config: GPT2Config, where: str) -> None:
    """Refuse, before allocating, random weights that cannot fit in memory (fp32, as ``init_random`` makes them)."""
    need, have = 4 * config.num_params(), available_memory()
    if have is not None and need > have:
        raise CheckpointError(f"{where[:200]}: {config.num_params():,} parameters need {need / 2**30:.1f} GiB (fp32), "
                              f"more than the {have / 2**30:.1f} GiB of memory available")


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux's MemAvailable; free pages elsewhere), or None if unknown.

    Example:
        >>> available_memory() > 0
        True
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
